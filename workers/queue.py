"""The delivery queues on disk: what waits, what failed and why (DESIGN.md D4).

Layout (inside the spool root, beside ``tmp/``; see ``workers/spool.py``)::

    queue/<destination>/<stem>.dcm     waiting for delivery, oldest name first
    queue/<destination>/<stem>.json    ... and its failures so far, if any:
                                       {"failures", "first", "last", "failing",
                                        "not_before", "reason"}
    dead/<destination>/<stem>.dcm      given up on ...
    dead/<destination>/<stem>.json     ... and why: {"reason", "status", "attempts", "time",
                                       "sop_instance_uid"}
    unrouted/<stem>.dcm                no rule routed it

The files are the state: nothing here is kept in memory, so ``dicom-router queue``
works whether the router runs or not, and any number of processes may use it.
Moves are renames inside one filesystem (atomic); the reason file of a dead letter is
written (and made durable) before its instance moves, so a dead letter never lacks a
reason, and a reason left without its instance (a crash between the two) is ignored
and overwritten. A retry moves the instance back into the queue first and then drops
its reason.

A queued instance's failure record keeps its attempts across restarts (a router
restarted daily would otherwise retry an instance the destination keeps refusing for
ever), how long it has been failing (``retry.give_up_after`` is measured against that;
see note_failure) and when its back-off ends, so that every worker sharing the queue
keeps the same count and the same back-off. Best effort: written without fsync, since
a lost record only costs a few more attempts. A record whose instance is gone
(delivered, purged) is garbage, removed when the queue is next taken up from disk.
Names given by an operator are checked to be destination names (router/config.py):
a path must not reach outside the queues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeGuard

from router.config import destination_name_problem
from workers import order
from workers.spool import DEAD_DIR, QUEUE_DIR, SUFFIX, UNROUTED_DIR

__all__ = [
    "DeadLetter",
    "FailureRecord",
    "QueueSummary",
    "Retried",
    "counts",
    "dead_letters",
    "failure_record",
    "failure_records",
    "forget_failures",
    "known_destinations",
    "move_to_dead",
    "note_failure",
    "purge_dead",
    "queue_folder",
    "queued",
    "queued_counts",
    "retry_dead",
    "summarize",
    "unrouted_count",
    "unrouted_files",
]

_REASON_SUFFIX: Final = ".json"
_TMP: Final = ".tmp"
_STALE_TMP_SECONDS: Final = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """An instance a destination will not get without an operator's retry."""

    destination: str
    name: str
    path: Path
    reason: str
    status: int | None
    attempts: int
    time: float
    sop_instance_uid: str | None = None
    # The newer version of the instance queued behind it when it failed: sending it
    # again after that one may leave the destination with the old version.
    superseded_by: str | None = None
    # A rule's change could not be made: it is the instance as received, and retried
    # it would go out without the change (retry_dead keeps it unless told).
    unchanged: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueSummary:
    destination: str
    queued: int
    queued_bytes: int
    oldest: float | None  # mtime of the oldest queued file
    dead: int


def _files(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return sorted((e for e in entries if e.name.endswith(SUFFIX)
                           and e.is_file(follow_symlinks=False)), key=lambda e: e.name)
    except FileNotFoundError:
        return []


def _folders(root: Path, top: str) -> list[str]:
    try:
        with os.scandir(root / top) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def queue_folder(destination: str) -> str:
    """The spool folder (relative to the root) holding ``destination``'s queue."""
    return f"{QUEUE_DIR}/{destination}"


def dead_folder(destination: str) -> str:
    """The spool folder (relative to the root) holding ``destination``'s dead letters."""
    return f"{DEAD_DIR}/{destination}"


def queued(root: Path, destination: str) -> list[str]:
    """Names of the instances waiting for ``destination``, oldest first."""
    return [e.name for e in _files(root / QUEUE_DIR / destination)]


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """A queued instance's failed deliveries so far."""

    failures: int  # those that count towards retry.attempts
    first: float  # time.time() of the first failure of any kind
    reason: str  # the last one's
    last: float = 0.0  # time.time() of the last failure
    failing: float = 0.0  # seconds it has been failing: see note_failure
    not_before: float = 0.0  # time.time() before which it is not tried again

    @property
    def written(self) -> bool:
        """False when the record could not be written (see note_failure)."""
        return self.last >= 0


def note_failure(root: Path, destination: str, name: str, *, counted: bool, reason: str,
                 now: float, retry_in: float, max_gap: float) -> FailureRecord:
    """Add one failed delivery (``counted`` towards the attempts or not) to the record
    of the queued instance ``name``, to be tried again ``retry_in`` seconds from
    ``now`` (a worker that takes the instance up earlier waits until then: every
    worker of a spool keeps the same back-off); the record as it now is.

    ``failing`` is the time ``retry.give_up_after`` is measured against: the time
    between two failures counts only when they are at most ``max_gap`` seconds apart
    (the instance was being retried all along). A longer gap means it was not tried
    at all -- the destination could not be reached, the router was stopped -- and
    that time is nobody's failure: a PACS down over a long weekend must not send
    every instance that had failed once before into dead letters at its first
    refusal after."""
    before = failure_record(root, destination, name)
    failing = 0.0
    if before is not None:
        gap = now - (before.last or before.first)
        failing = before.failing + (gap if 0 <= gap <= max_gap else 0.0)
    record = FailureRecord(
        failures=(before.failures if before else 0) + counted,
        first=before.first if before else now, reason=reason, last=now,
        failing=failing, not_before=now + retry_in)
    path = _failure_path(root, destination, name)
    tmp = path.with_name(f".{path.name}.tmp")
    try:  # best effort: see the module docstring
        tmp.write_text(json.dumps({
            "failures": record.failures, "first": record.first, "last": record.last,
            "failing": record.failing, "not_before": record.not_before,
            "reason": reason}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        return dataclasses.replace(record, last=-1.0)  # not written
    return record


# Bounds of a record's numbers: a record that is not the router's (edited, corrupt)
# is ignored rather than trusted with an infinite or absurd time.
_MAX_FAILURES: Final = 1 << 31
_MAX_TIME: Final = 1e11  # the year 5138


def failure_record(root: Path, destination: str, name: str) -> FailureRecord | None:
    try:
        raw = json.loads(_failure_path(root, destination, name).read_text("utf-8"))
        if not isinstance(raw, dict):
            return None
        failures = raw["failures"]
        if not _is_int(failures, _MAX_FAILURES - 1):
            return None
        times = [_time(raw.get(key, 0.0)) for key in ("first", "last", "failing",
                                                      "not_before")]
        if any(t is None for t in times) or "first" not in raw:
            return None
        first, last, failing, not_before = (float(t or 0.0) for t in times)
        return FailureRecord(failures, first, str(raw.get("reason", "")), last=last,
                             failing=failing, not_before=not_before)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _time(value: object) -> float | None:
    """A record's time or duration: a finite number from 0 to _MAX_TIME, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer of 400 digits
        return None
    return number if math.isfinite(number) and 0 <= number <= _MAX_TIME else None


def forget_failures(root: Path, destination: str, name: str) -> None:
    with contextlib.suppress(OSError):
        _failure_path(root, destination, name).unlink()


def failure_records(root: Path, destination: str) -> set[str]:
    """Names of the queued instances of ``destination`` that have a failure record;
    records whose instance is gone are removed, and so are records a killed worker
    left half written."""
    folder = root / QUEUE_DIR / destination
    try:
        with os.scandir(folder) as entries:
            names = [e.name for e in entries if e.name.endswith((_REASON_SUFFIX, _TMP))]
    except OSError:
        return set()
    recorded = set()
    now = time.time()
    for name in names:
        stem = name.removesuffix(_REASON_SUFFIX)
        if name.startswith("."):
            # Half written by a killed worker -- or being written by a live one now:
            # only an old one is garbage.
            with contextlib.suppress(OSError):
                if now - (folder / name).stat().st_mtime > _STALE_TMP_SECONDS:
                    (folder / name).unlink()
        elif not (folder / f"{stem}{SUFFIX}").exists():
            with contextlib.suppress(OSError):
                (folder / name).unlink()
        else:
            recorded.add(f"{stem}{SUFFIX}")
    return recorded


def _failure_path(root: Path, destination: str, name: str) -> Path:
    return root / QUEUE_DIR / destination / f"{name.removesuffix(SUFFIX)}{_REASON_SUFFIX}"


def move_to_dead(root: Path, destination: str, name: str, *, reason: str,
                 status: int | None, attempts: int, fsync: bool = True,
                 sop_instance_uid: str | None = None, superseded_by: str | None = None,
                 ) -> Path:
    """Move a queued instance to the dead-letter folder with its reason (and its SOP
    Instance UID, when it was read: the file name is the router's, not the
    instance's; and the newer version queued behind it, if one was); its new path."""
    dead = write_dead_reason(root, destination, name, reason=reason, status=status,
                             attempts=attempts, fsync=fsync, sop_instance_uid=sop_instance_uid,
                             superseded_by=superseded_by)
    target = dead / name
    os.replace(root / QUEUE_DIR / destination / name, target)
    if fsync:
        _sync_dir(dead)
    forget_failures(root, destination, name)
    if sop_instance_uid is not None:
        order.unmark(root, destination, name, sop_instance_uid)
    return target


def write_dead_reason(root: Path, destination: str, name: str, *, reason: str,
                      status: int | None, attempts: int, fsync: bool = True,
                      sop_instance_uid: str | None = None, superseded_by: str | None = None,
                      unchanged: bool = False) -> Path:
    """Write why dead letter ``name`` of ``destination`` is one, before the letter
    itself is put there (a letter is never without its reason); the folder.
    ``unchanged``: a rule's change could not be made to it, so it is the instance as
    received, which the rule would not have sent (see :func:`retry_dead`)."""
    dead = root / DEAD_DIR / destination
    dead.mkdir(parents=True, exist_ok=True)
    stem = name.removesuffix(SUFFIX)
    record: dict[str, object] = {
        "destination": destination, "reason": reason, "status": status,
        "attempts": attempts, "time": time.time(), "sop_instance_uid": sop_instance_uid}
    if superseded_by is not None:
        record["superseded_by"] = superseded_by
    if unchanged:
        record["unchanged"] = True
    tmp = dead / f".{stem}{_REASON_SUFFIX}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, dead / f"{stem}{_REASON_SUFFIX}")
    return dead


def dead_letters(root: Path, destination: str | None = None) -> Iterator[DeadLetter]:
    """The dead letters of one destination (or all), oldest first."""
    for dest in [_checked(destination)] if destination else _destinations(root, DEAD_DIR):
        folder = root / DEAD_DIR / dest
        for entry in _files(folder):
            stem = entry.name.removesuffix(SUFFIX)
            record: object = {}
            with contextlib.suppress(OSError, ValueError):
                record = json.loads((folder / f"{stem}{_REASON_SUFFIX}").read_text("utf-8"))
            if not isinstance(record, dict):
                record = {}  # not the router's: the letter is listed all the same
            status, attempts, uid, newer = (record.get(key) for key in (
                "status", "attempts", "sop_instance_uid", "superseded_by"))
            when = _time(record.get("time"))
            if not when:
                with contextlib.suppress(OSError):
                    when = entry.stat().st_mtime
            yield DeadLetter(
                destination=dest, name=entry.name, path=Path(entry.path),
                reason=str(record.get("reason", "(no reason recorded)")),
                status=status if _is_int(status, 0xFFFF) else None,
                attempts=attempts if _is_int(attempts, _MAX_FAILURES) else 0,
                time=when or 0.0,
                sop_instance_uid=uid if isinstance(uid, str) else None,
                superseded_by=newer if isinstance(newer, str) else None,
                unchanged=record.get("unchanged") is True)


def _is_int(value: object, most: int) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most


def _checked(destination: str) -> str:
    """``destination`` if it names a queue folder (router/config.py's rule for
    destination names), else ValueError: a path would reach outside the spool's
    queues (``..``, ``/``), and an empty name would mean every destination."""
    problem = destination_name_problem(destination)
    if problem is not None:
        raise ValueError(f"not a destination name: {problem}")
    return destination


@dataclass(frozen=True, slots=True)
class Retried:
    """What :func:`retry_dead` did."""

    moved: int
    # Superseded letters left in dead/ (see DeadLetter.superseded_by).
    kept: tuple[DeadLetter, ...] = ()
    # Letters left in dead/ because their destination is not configured, by it.
    unconfigured: dict[str, int] = field(default_factory=dict)


def retry_dead(root: Path, destination: str | None = None, name: str | None = None, *,
               superseded: bool = False, configured: Collection[str] | None = None,
               unchanged: bool = False) -> Retried:
    """Move dead letters back into their queue (all, one destination's, or the one
    named ``name``, with or without ``.dcm``). Superseded ones stay unless
    ``superseded``: the newer version behind each may be delivered by now, and the
    old one sent after it would replace the correction at the destination. So do
    those of a destination not in ``configured`` (if given): in its queue nobody
    would send them, and a dead letter at least says it failed. And those a rule's
    change could not be made to, unless ``unchanged``: sent, they would go out as
    received, without the change (a pseudonymisation, say) the rule asks for."""
    moved = 0
    kept = []
    unconfigured: dict[str, int] = {}
    wanted = None if name is None else name.removesuffix(SUFFIX) + SUFFIX
    for letter in list(dead_letters(root, destination)):
        if wanted is not None and letter.name != wanted:
            continue
        if (letter.superseded_by is not None and not superseded) or (
                letter.unchanged and not unchanged):
            kept.append(letter)
            continue
        if configured is not None and letter.destination not in configured:
            unconfigured[letter.destination] = unconfigured.get(letter.destination, 0) + 1
            continue
        queue = root / QUEUE_DIR / letter.destination
        queue.mkdir(parents=True, exist_ok=True)
        # A failure record left in the queue (a crash while the letter was moved to
        # dead/) would hand the retried instance its old attempts.
        forget_failures(root, letter.destination, letter.name)
        try:
            os.replace(letter.path, queue / letter.name)
        except FileNotFoundError:
            continue  # someone else retried or purged it meanwhile
        if letter.sop_instance_uid is not None:
            # In the order of its versions again (workers/order.py), at the time it
            # was received, not now: a newer version still queued waits for it.
            order.mark(root, letter.destination, letter.name, letter.sop_instance_uid,
                       order.key_of_stem(letter.name))
        with contextlib.suppress(FileNotFoundError):
            (letter.path.parent / (letter.name.removesuffix(SUFFIX) + _REASON_SUFFIX)).unlink()
        moved += 1
    return Retried(moved, tuple(kept), unconfigured)


def purge_dead(root: Path, destination: str) -> int:
    """Delete the dead letters of ``destination``; how many went."""
    _checked(destination)
    purged = 0
    for letter in list(dead_letters(root, destination)):
        with contextlib.suppress(FileNotFoundError):
            letter.path.unlink()
            purged += 1
        with contextlib.suppress(FileNotFoundError):
            (letter.path.parent / (letter.name.removesuffix(SUFFIX) + _REASON_SUFFIX)).unlink()
    return purged


def known_destinations(root: Path, configured: list[str] | None = None) -> list[str]:
    """The configured destinations, then any other with instances queued or dead
    letters (a folder whose name no destination could have is not one: put there by
    hand). The empty folders a removed or renamed destination leaves behind are not
    listed: status, queue ls and the Prometheus export showed them for good."""
    return list(dict.fromkeys([*(configured or []), *_destinations(root, QUEUE_DIR),
                               *_destinations(root, DEAD_DIR)]))


def _destinations(root: Path, top: str) -> list[str]:
    """The folders of ``top`` (queue/ or dead/) named as a destination may be, with
    files in them."""
    return [name for name in _folders(root, top)
            if destination_name_problem(name) is None and _holds_files(root / top / name)]


def _holds_files(folder: Path) -> bool:
    """Whether ``folder`` holds an instance or a dead letter (the first one found
    answers: a queue of 200,000 is not listed for it)."""
    try:
        with os.scandir(folder) as entries:
            return any(e.name.endswith(SUFFIX) and e.is_file(follow_symlinks=False)
                       for e in entries)
    except FileNotFoundError:
        return False


def summarize(root: Path, destinations: list[str] | None = None) -> list[QueueSummary]:
    """One summary per destination (configured ones plus any found on disk)."""
    names = known_destinations(root, destinations)
    out = []
    for dest in names:
        files = _files(root / QUEUE_DIR / dest)
        sizes = []
        oldest = None
        for entry in files:
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat()
                sizes.append(st.st_size)
                oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
        out.append(QueueSummary(destination=dest, queued=len(files), queued_bytes=sum(sizes),
                                oldest=oldest, dead=len(_files(root / DEAD_DIR / dest))))
    return out


def counts(root: Path, destinations: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Queued and dead instances of each destination (configured ones plus any found
    on disk), counted on disk: the spool's own answer, whichever worker holds them."""
    return {dest: {"queued": len(_files(root / QUEUE_DIR / dest)),
                   "dead": len(_files(root / DEAD_DIR / dest))}
            for dest in known_destinations(root, destinations)}


def queued_counts(root: Path) -> dict[str, int]:
    """How many instances wait in each destination's queue (no file is stat'ed)."""
    return {dest: len(_files(root / QUEUE_DIR / dest)) for dest in _folders(root, QUEUE_DIR)}


def unrouted_count(root: Path) -> int:
    return len(_files(root / UNROUTED_DIR))


def unrouted_files(root: Path) -> list[Path]:
    """The instances kept in unrouted/, oldest first (names sort by arrival)."""
    return [Path(e.path) for e in _files(root / UNROUTED_DIR)]


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
