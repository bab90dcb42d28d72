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

The record also keeps the requestor's AE title, C-MOVE message ID and priority
(:class:`Originator`): the relayed sub-operations carry them as Move Originator AE
Title and Message ID (PS3.7 §9.3.1.1: the AE that invoked the C-MOVE the C-STORE is a
sub-operation of, which for the destination is the requestor, not this router) and
as their priority (PS3.4 C.4.2.1.2: the C-MOVE's, the same for all of them).

A C-STORE without a Move Originator Message ID (the field is optional, PS3.7 Table
9.3-1; dcmjs-dimse sends none) is taken into a move only when the instance lies
within what the move asked for: the record keeps the move's unique key values
(the StudyInstanceUIDs of a STUDY-level move, say). Anything else the upstream sends
meanwhile -- an auto-routed study, a storescu borrowing its AE title -- is an
ordinary C-STORE, routed by the rules. Two running moves may both want it (two
viewers retrieving the same study): the upstream then sends it once for each, and
each copy goes to a move that has not had that instance yet, the oldest first.
Which move had which instance is kept in ``<message ID>.got/``, a file per SOP
Instance UID, created exclusively: whichever worker takes a copy, no move gets an
instance twice while another misses it. They were routed by the rules instead, into
``unrouted/`` by default, while the upstream was answered Success and the
requestors were told the move had completed (an outside Q/R campaign).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from router.dicom import dimse, uids
from workers.spool import is_live

__all__ = [
    "MOVES_DIR",
    "MoveScope",
    "Originator",
    "SubOperations",
    "end_move",
    "key_text",
    "move_of",
    "move_scope",
    "note_sub_operation",
    "note_sub_operation_status",
    "originator_of",
    "register_move",
    "sub_operations_of",
    "sweep_ended",
]

MOVES_DIR: Final = "moves"
# <message ID>.got/<SOP Instance UID>: the move had that instance (see the docstring).
_GOT: Final = ".got"
_SOP_INSTANCE_UID: Final = 0x00080018
# <message ID>.relayed: a byte when a sub-operation is relayed, another when its
# destination has answered, saying how.
_RELAYED: Final = ".relayed"
_STARTED, _COMPLETED, _FAILED, _WARNING = b".", b"c", b"f", b"w"
# A record older than this belongs to a move nobody waits for any more (a crash).
_STALE_SECONDS: Final = 24 * 3600

# The unique key of each Query/Retrieve Level (PS3.4 C.6.1.1.2-C.6.1.1.5 and
# C.6.2.1.2-C.6.2.1.4): PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID.
_LEVEL_KEYS: Final = {"PATIENT": 0x00100020, "STUDY": 0x0020000D,
                      "SERIES": 0x0020000E, "IMAGE": 0x00080018}

#: What a move asked for: the unique key tag of its level and the values asked
#: (a C-MOVE may list several UIDs, PS3.4 C.4.2.2.1).
MoveScope = tuple[int, frozenset[str]]


@dataclass(frozen=True, slots=True)
class Originator:
    """Who invoked a C-MOVE and how: what its C-STORE sub-operations carry as Move
    Originator AE Title and Message ID (PS3.7 §9.3.1.1) and as priority (PS3.4
    C.4.2.1.2)."""

    ae_title: str
    message_id: int
    priority: dimse.Priority = dimse.Priority.MEDIUM

    def to_record(self) -> list[object]:
        """As a move record or a message between workers holds it (JSON, msgpack)."""
        return [self.ae_title, self.message_id, int(self.priority)]

    @classmethod
    def from_record(cls, value: object) -> Originator | None:
        """The inverse of :meth:`to_record`; None for anything it did not make."""
        if not (isinstance(value, list) and len(value) == 3):
            return None
        ae, mid, priority = value
        if not (isinstance(ae, str) and type(mid) is int and 0 <= mid <= 0xFFFF
                and type(priority) is int and priority in tuple(dimse.Priority)):
            return None
        return cls(ae, mid, dimse.Priority(priority))


def move_scope(identifier: Dataset) -> MoveScope | None:
    """The scope of a C-MOVE with ``identifier``; None when it names no level or no
    value of that level's unique key (then only sub-operations carrying the move's
    message ID are taken into it)."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    tag = _LEVEL_KEYS.get(level)
    if tag is None or tag not in identifier:
        return None
    value = identifier[tag].value
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    found = frozenset(v for v in (key_text(v) for v in values) if v)
    return (tag, found) if found else None


def key_text(value: object) -> str:
    """A unique key's value as a move's scope holds it and an instance's is compared
    with it: text, without the padding (space, or NUL for UIDs; PS3.5 §6.2)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip(" \0")


def register_move(spool: Path, destination: str, upstream: str,
                  scope: MoveScope | None = None, originator: Originator | None = None) -> int:
    """A message ID (1-65535) no other running move of this spool uses, recorded with
    the destination, the upstream (its ``[[destination]]`` name: only it may deliver
    the sub-operations), the move's ``scope`` (see the module docstring), the
    requestor's ``originator`` and this process, whose death ends the move."""
    folder = spool / MOVES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    sweep_ended(spool, time.time())
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
        # The ID is ours: what a move of the same ID left (a killed worker's) must
        # not count for this one.
        _forget(spool, mid)
        _got(spool, mid).mkdir()
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({
                "destination": destination, "upstream": upstream, "pid": os.getpid(),
                "started": time.time(),
                "scope": None if scope is None else [scope[0], sorted(scope[1])],
                "originator": None if originator is None else originator.to_record()}))
        return mid
    raise OSError("no free C-MOVE message ID: 65535 moves in progress")


def move_of(spool: Path, message_id: int | None, from_upstream: Callable[[str], bool],
            instance_value: Callable[[int], str | None] | None = None,
            stream: str | None = None) -> tuple[str | None, int, int | None]:
    """Whose sub-operation a C-STORE is: the destination of the router's running
    move it belongs to (or None), how many running moves could claim it, and the
    message ID of the one that does (for :func:`note_sub_operation`).
    ``message_id`` is its Move Originator Message ID; ``from_upstream(name)`` says
    whether the association comes from the upstream ``name`` (Destination.is_peer),
    asked only of the upstreams of running moves: only a move's own upstream may
    deliver into it, whatever else calls with its message ID.

    The Move Originator AE Title is not needed for that, nor trusted: some
    upstreams put their own there (pynetdicom's move SCP does). Both fields are
    optional in a C-STORE-RQ (PS3.7 Table 9.3-1): without a message ID, a C-STORE
    from a move's upstream belongs to it only if the instance is within the move's
    scope, ``instance_value(tag)`` giving the instance's value of the scope's key
    (asked only then; None: the C-STORE belongs to no move). If two running moves
    could claim it, it goes to the move its association (``stream``) serves, else to
    the oldest that has not had that instance yet (see the module docstring); to
    none if each has had it (None: the rules route it)."""
    if message_id is not None:
        paths = [spool / MOVES_DIR / f"{int(message_id)}.json"]
    else:
        try:
            paths = list((spool / MOVES_DIR).glob("*.json"))
        except OSError:
            paths = []
    # (message ID: the record's file name, record)
    records = [(int(path.stem), record) for path in paths if path.stem.isdigit()
               and (record := _live_record(path)) is not None
               and isinstance(record.get("destination"), str)]
    records = [(mid, r) for mid, r in records
               if isinstance(r.get("upstream"), str) and from_upstream(r["upstream"])]
    running = [(mid, r) for mid, r in records if not r.get("ended")]
    ended = [(mid, r) for mid, r in records if r.get("ended")]
    if message_id is not None or not records:
        if len(running) != 1:
            return None, len(running), None
        return running[0][1]["destination"], 1, running[0][0]
    running = [(mid, r) for mid, r in running if _in_scope(r.get("scope"), instance_value)]
    ended = [(mid, r) for mid, r in ended if _in_scope(r.get("scope"), instance_value)]
    uid = instance_value(_SOP_INSTANCE_UID) if (running or ended) and instance_value else None
    if uid is None or not uids.is_plain_uid(uid) or (not running and stream is None):
        if len(running) != 1:
            return None, len(running), None  # nothing to tell the moves' copies apart
        return running[0][1]["destination"], 1, running[0][0]
    running.sort(key=lambda m: (m[1].get("started", 0.0), m[0]))
    if stream is not None:
        # An upstream sends a move's sub-operations on an association of their own
        # (DCMTK, pynetdicom): the copies on one association are one move's. Each
        # association is bound to one move, at its first copy, and each move to one
        # association. Taken copy by copy instead, a move whose own association was
        # done first ended while copies it needed were still coming on the other:
        # they went to the other move twice, and it missed them.
        bound = {mid: _bound(spool, mid) for mid, _ in running}
        for mid, record in running:
            if bound[mid] == stream:
                _claim(spool, mid, uid)
                return record["destination"], len(running), mid
        # Which association the upstream uses for which move, nothing says: the
        # bindings may be crossed, and a move then ends (its final response, after
        # the upstream's own association for it) while copies it lacks still come on
        # the association bound to it. They are its own all the same (end_move).
        for mid, record in ended:
            if _bound(spool, mid) == stream and _claim(spool, mid, uid):
                return record["destination"], len(running), mid
        for mid, record in running:
            if bound[mid] is None and not _had(spool, mid, uid) and _bind(spool, mid, stream):
                _claim(spool, mid, uid)
                return record["destination"], len(running), mid
    for mid, record in running:
        if _claim(spool, mid, uid):
            return record["destination"], len(running), mid
    if len(running) == 1:  # the upstream sends it again: it is this move's all the same
        return running[0][1]["destination"], 1, running[0][0]
    return None, len(running), None


_STREAM: Final = ".stream"  # in <message ID>.got/: the association bound to the move


def _got(spool: Path, message_id: int) -> Path:
    """The folder of what the move ``message_id`` had: made with the move, gone at its
    end, so nothing is taken into an ended move (see _claim)."""
    return spool / MOVES_DIR / f"{message_id}{_GOT}"


def _bound(spool: Path, message_id: int) -> str | None:
    """The association the move ``message_id`` is bound to, if any yet."""
    try:
        return (_got(spool, message_id) / _STREAM).read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _bind(spool: Path, message_id: int, stream: str) -> bool:
    """Bind the move ``message_id`` to association ``stream``, unless another took it
    first or it has ended: whether it is bound to it now."""
    path = _got(spool, message_id) / _STREAM
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(stream)
    return True


def _had(spool: Path, message_id: int, uid: str) -> bool:
    return (_got(spool, message_id) / uid).exists()


def _claim(spool: Path, message_id: int, uid: str) -> bool:
    """Whether the move ``message_id`` takes instance ``uid`` now: False if it had it,
    or has ended since its record was read (its folder is gone with it: a copy for
    the other move went to the ended one's destination, and the other missed it)."""
    path = _got(spool, message_id) / uid
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    except (FileExistsError, FileNotFoundError):
        return False
    except OSError:
        return True  # cannot say: as before, the first candidate takes it
    return True


def originator_of(spool: Path, message_id: int) -> Originator | None:
    """The requestor of the running move ``message_id`` (see :func:`register_move`);
    None if it ended or recorded none."""
    record = _live_record(spool / MOVES_DIR / f"{int(message_id)}.json")
    return None if record is None else Originator.from_record(record.get("originator"))


def _in_scope(scope: object, instance_value: Callable[[int], str | None] | None) -> bool:
    """Whether the instance is within a record's ``scope``: [tag, [values]]."""
    if instance_value is None or not isinstance(scope, list) or len(scope) != 2:
        return False
    tag, values = scope
    if not isinstance(tag, int) or not isinstance(values, list):
        return False
    value = instance_value(tag)
    return value is not None and value in values


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


#: Seconds an ended move bound to an association still takes the copies it lacks
#: from it (see move_of); then its record goes.
ENDED_GRACE: Final = 30.0


def end_move(spool: Path, message_id: int) -> None:
    """The move ``message_id`` is over: its record goes, or, if an association was
    bound to it, is marked ended for :data:`ENDED_GRACE` seconds (see move_of)."""
    folder = spool / MOVES_DIR
    path = folder / f"{message_id}.json"
    record = _live_record(path) if _bound(spool, message_id) is not None else None
    if record is not None:
        record["ended"] = time.time()
        tmp = folder / f".{message_id}.ending"
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, path)
            return
    with contextlib.suppress(OSError):
        path.unlink()
    _forget(spool, message_id)


def sweep_ended(spool: Path, now: float) -> None:
    """Remove the records of moves ended more than :data:`ENDED_GRACE` ago."""
    folder = spool / MOVES_DIR
    with contextlib.suppress(OSError):
        for path in folder.glob("*.json"):
            record = _live_record(path)
            ended = record.get("ended") if record is not None else None
            if isinstance(ended, int | float) and now - ended > ENDED_GRACE \
                    and path.stem.isdigit():
                with contextlib.suppress(OSError):
                    path.unlink()
                _forget(spool, int(path.stem))


def _forget(spool: Path, message_id: int) -> None:
    """Remove the tally and the instances had of move ``message_id``."""
    with contextlib.suppress(OSError):
        (spool / MOVES_DIR / f"{message_id}{_RELAYED}").unlink()
    got = _got(spool, message_id)
    with contextlib.suppress(OSError):
        for entry in os.scandir(got):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
    with contextlib.suppress(OSError):
        got.rmdir()


def note_sub_operation(spool: Path, message_id: int) -> None:
    """One more sub-operation of the move ``message_id`` is being relayed (in any
    worker). The move's proxy reads the tally when the upstream sends no pending
    responses (they are optional): it then knows the move did something, and must
    not hand it to another upstream that would send it all again."""
    _tally(spool, message_id, _STARTED, create=True)


def note_sub_operation_status(spool: Path, message_id: int, status: int) -> None:
    """The destination answered a relayed sub-operation of ``message_id`` with
    ``status``: the counts of a move the upstream breaks off without pending
    responses are then still the true ones (PS3.4 C.4.2.1.4)."""
    category = dimse.status_category(status)
    # Not created if missing: the move has ended meanwhile, and a tally made now
    # would be left behind.
    _tally(spool, message_id, _COMPLETED if category is dimse.StatusCategory.SUCCESS
           else _WARNING if category is dimse.StatusCategory.WARNING else _FAILED,
           create=False)


def _tally(spool: Path, message_id: int, mark: bytes, *, create: bool) -> None:
    # One byte appended: an atomic append, whichever worker writes (O_APPEND).
    with contextlib.suppress(OSError):
        fd = os.open(spool / MOVES_DIR / f"{message_id}{_RELAYED}",
                     os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0),
                     0o644)
        try:
            os.write(fd, mark)
        finally:
            os.close(fd)


@dataclass(frozen=True, slots=True)
class SubOperations:
    """The sub-operations of a proxied move relayed so far: how many started, and
    the destination's answers to them by category; started but not answered ones
    are in flight."""

    started: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0

    @property
    def in_flight(self) -> int:
        return max(0, self.started - self.completed - self.failed - self.warning)


def sub_operations_of(spool: Path, message_id: int) -> SubOperations:
    """The sub-operations of the move ``message_id`` relayed so far."""
    try:
        tally = (spool / MOVES_DIR / f"{message_id}{_RELAYED}").read_bytes()
    except OSError:
        return SubOperations()
    return SubOperations(started=tally.count(_STARTED), completed=tally.count(_COMPLETED),
                         failed=tally.count(_FAILED), warning=tally.count(_WARNING))
