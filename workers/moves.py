"""C-MOVEs the router issues for a requestor: who the sub-operations are for.

In proxy mode (``move_mode = "proxy"`` on the upstream's ``[[destination]]``) the
router asks the upstream to move to the router itself. The upstream's C-STORE
sub-operations then carry this router's AE title as Move Originator AE Title and the
C-MOVE's message ID as Move Originator Message ID (PS3.7 §9.3.1.1), and may arrive on
any association, in any worker. The message ID is therefore allocated here, unique
over every worker of the spool, by creating ``<spool>/moves/<message ID>.json``
exclusively; the file names the requestor's destination, the upstream and the
process that runs the move. The worker that receives a sub-operation from that
upstream (Destination.is_peer: its AE title or address; from anyone else it is an
ordinary C-STORE, routed by the rules) reads it and relays the instance there,
answering the upstream with the destination's status, so the upstream's own counts
and failed-UID list, which the requestor gets relayed, are true end to end.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from workers.spool import is_live

__all__ = ["MOVES_DIR", "end_move", "move_of", "register_move"]

MOVES_DIR: Final = "moves"
# A record older than this belongs to a move nobody waits for any more (a crash).
_STALE_SECONDS: Final = 24 * 3600


def register_move(spool: Path, destination: str, upstream: str) -> int:
    """A message ID (1-65535) no other running move of this spool uses, recorded with
    the destination, the upstream (its ``[[destination]]`` name: only it may deliver
    the sub-operations) and this process, whose death ends the move."""
    folder = spool / MOVES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"destination": destination, "upstream": upstream,
                         "pid": os.getpid()})
    start = random.randrange(1, 65536)
    for offset in range(65535):
        mid = (start + offset - 1) % 65535 + 1
        path = folder / f"{mid}.json"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > _STALE_SECONDS:
                    path.unlink()
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(record)
        return mid
    raise OSError("no free C-MOVE message ID: 65535 moves in progress")


def move_of(spool: Path, message_id: int | None,
            from_upstream: Callable[[str], bool]) -> tuple[str | None, int]:
    """Whose sub-operation a C-STORE is: the destination of the router's running
    move it belongs to (or None), and how many running moves could claim it.
    ``message_id`` is its Move Originator Message ID; ``from_upstream(name)`` says
    whether the association comes from the upstream ``name`` (Destination.is_peer),
    asked only of the upstreams of running moves: only a move's own upstream may
    deliver into it, whatever else calls with its message ID.

    The Move Originator AE Title is not needed for that, nor trusted: some
    upstreams put their own there (pynetdicom's move SCP does). Both fields are
    optional in a C-STORE-RQ (PS3.7 Table 9.3-1): without a message ID, a C-STORE
    from an upstream with exactly one proxied move running belongs to that move
    (dcmjs-dimse sends none); with two or more, nothing says which: None, and the
    rules route it."""
    if message_id is not None:
        record = _live_record(spool / MOVES_DIR / f"{int(message_id)}.json")
        running = [] if record is None else [record]
    else:
        try:
            paths = list((spool / MOVES_DIR).glob("*.json"))
        except OSError:
            paths = []
        running = [r for r in map(_live_record, paths) if r is not None]
    running = [r for r in running
               if isinstance(r.get("upstream"), str) and from_upstream(r["upstream"])]
    destination = running[0].get("destination") if len(running) == 1 else None
    return (destination if isinstance(destination, str) else None), len(running)


def _live_record(path: Path) -> dict[str, Any] | None:
    """The record in ``path``; None if there is none, or the process that made it is
    dead (a killed worker's move: nothing waits for it, and it is removed)."""
    try:
        record = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None  # ended meanwhile, or not ours
    if not isinstance(record, dict):
        return None
    pid = record.get("pid")
    if isinstance(pid, int) and pid > 0 and not is_live(pid):
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return record


def end_move(spool: Path, message_id: int) -> None:
    with contextlib.suppress(OSError):
        (spool / MOVES_DIR / f"{message_id}.json").unlink()
