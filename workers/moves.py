"""C-MOVEs the router issues for a requestor: who the sub-operations are for.

In proxy mode (``move_mode = "proxy"`` on the upstream's ``[[destination]]``) the
router asks the upstream to move to the router itself. The upstream's C-STORE
sub-operations then carry this router's AE title as Move Originator AE Title and the
C-MOVE's message ID as Move Originator Message ID (PS3.7 §9.3.1.1), and may arrive on
any association, in any worker. The message ID is therefore allocated here, unique
over every worker of the spool, by creating ``<spool>/moves/<message ID>.json``
exclusively; the file names the requestor's destination. The worker that receives a
sub-operation reads it and relays the instance there, answering the upstream with
the destination's status, so the upstream's own counts and failed-UID list, which
the requestor gets relayed, are true end to end.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from pathlib import Path
from typing import Final

__all__ = ["MOVES_DIR", "end_move", "move_destination_of", "moves_from", "register_move"]

MOVES_DIR: Final = "moves"
# A record older than this belongs to a move nobody waits for any more (a crash).
_STALE_SECONDS: Final = 24 * 3600


def register_move(spool: Path, originator_ae: str, destination: str,
                  upstream_ae: str = "") -> int:
    """A message ID (1-65535) no other running move of this spool uses, recorded with
    the AE title the upstream will name as originator, the destination, and the
    upstream's own AE title (which its sub-operations' associations call from)."""
    folder = spool / MOVES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"originator": originator_ae, "destination": destination,
                         "upstream": upstream_ae})
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


def move_destination_of(spool: Path, originator_ae: str | None, message_id: int | None,
                        calling_ae: str = "") -> str | None:
    """The destination of the router's move a C-STORE is a sub-operation of: the one
    with its Move Originator Message ID, if its Move Originator AE Title is the one
    that move was issued with, or if it comes from that move's upstream (some
    upstreams put their own AE title there; pynetdicom's qrscp does).

    Both fields are optional in a C-STORE-RQ (PS3.7 Table 9.3-1): without a message
    ID, a C-STORE from an upstream that has exactly one proxied move running
    belongs to that move (dcmjs-dimse sends none). With two or more, nothing says
    which: None, and the rules route it."""
    calling_ae = calling_ae.strip()
    if message_id is not None:
        record = _record(spool / MOVES_DIR / f"{int(message_id)}.json")
        if record is None:
            return None
        if (record.get("originator", "").strip() != (originator_ae or "").strip()
                and (not calling_ae or record.get("upstream", "").strip() != calling_ae)):
            return None
        destination = record.get("destination")
        return destination if isinstance(destination, str) else None
    running = moves_from(spool, calling_ae)
    if len(running) != 1:
        return None
    destination = running[0].get("destination")
    return destination if isinstance(destination, str) else None


def moves_from(spool: Path, upstream_ae: str) -> list[dict[str, str]]:
    """The records of the proxied moves running with ``upstream_ae`` as upstream."""
    upstream_ae = upstream_ae.strip()
    if not upstream_ae:
        return []
    try:
        paths = list((spool / MOVES_DIR).glob("*.json"))
    except OSError:
        return []
    return [r for r in map(_record, paths)
            if r is not None and r.get("upstream", "").strip() == upstream_ae]


def _record(path: Path) -> dict[str, str] | None:
    try:
        record = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None  # ended meanwhile, or not ours
    return record if isinstance(record, dict) else None


def end_move(spool: Path, message_id: int) -> None:
    with contextlib.suppress(OSError):
        (spool / MOVES_DIR / f"{message_id}.json").unlink()
