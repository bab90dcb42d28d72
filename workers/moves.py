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

__all__ = ["MOVES_DIR", "end_move", "move_destination_of", "register_move"]

MOVES_DIR: Final = "moves"
# A record older than this belongs to a move nobody waits for any more (a crash).
_STALE_SECONDS: Final = 24 * 3600


def register_move(spool: Path, originator_ae: str, destination: str) -> int:
    """A message ID (1-65535) no other running move of this spool uses, recorded with
    the AE title the upstream will name as originator and the destination."""
    folder = spool / MOVES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"originator": originator_ae, "destination": destination})
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


def move_destination_of(spool: Path, originator_ae: str, message_id: int) -> str | None:
    """The destination of the router's move ``message_id``, if the sub-operation's
    originator AE title is the one that move was issued with."""
    try:
        record = json.loads((spool / MOVES_DIR / f"{int(message_id)}.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("originator", "").strip() != originator_ae.strip():
        return None
    destination = record.get("destination")
    return destination if isinstance(destination, str) else None


def end_move(spool: Path, message_id: int) -> None:
    with contextlib.suppress(OSError):
        (spool / MOVES_DIR / f"{message_id}.json").unlink()
