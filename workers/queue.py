"""The delivery queues on disk: what waits, what failed and why (DESIGN.md D4).

Layout (inside the spool root, beside ``tmp/``; see ``workers/spool.py``)::

    queue/<destination>/<stem>.dcm     waiting for delivery, oldest name first
    queue/<destination>/<stem>.json    ... and its failures so far, if any:
                                       {"failures", "first", "reason"}
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
ever) and when it first failed (``retry.give_up_after`` counts from then). Best
effort: written without fsync, since a lost record only costs a few more attempts.
A record whose instance is gone (delivered by another worker, purged) is garbage,
removed when the queue is next taken up from disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from workers.spool import DEAD_DIR, QUEUE_DIR, SUFFIX, UNROUTED_DIR

__all__ = [
    "DeadLetter",
    "FailureRecord",
    "QueueSummary",
    "dead_letters",
    "failure_record",
    "failure_records",
    "forget_failures",
    "move_to_dead",
    "note_failure",
    "purge_dead",
    "queue_folder",
    "queued",
    "queued_counts",
    "retry_dead",
    "summarize",
]

_REASON_SUFFIX: Final = ".json"


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


def queued(root: Path, destination: str) -> list[str]:
    """Names of the instances waiting for ``destination``, oldest first."""
    return [e.name for e in _files(root / QUEUE_DIR / destination)]


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """A queued instance's failed deliveries so far."""

    failures: int  # those that count towards retry.attempts
    first: float  # time.time() of the first failure of any kind
    reason: str  # the last one's


def note_failure(root: Path, destination: str, name: str, *, counted: bool, reason: str,
                 now: float) -> FailureRecord:
    """Add one failed delivery (``counted`` towards the attempts or not) to the record
    of the queued instance ``name``; the record as it now is."""
    before = failure_record(root, destination, name)
    record = FailureRecord(
        failures=(before.failures if before else 0) + counted,
        first=before.first if before else now, reason=reason)
    path = _failure_path(root, destination, name)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(OSError):  # best effort: see the module docstring
        tmp.write_text(json.dumps({"failures": record.failures, "first": record.first,
                                   "reason": reason}), encoding="utf-8")
        os.replace(tmp, path)
    return record


def failure_record(root: Path, destination: str, name: str) -> FailureRecord | None:
    try:
        raw = json.loads(_failure_path(root, destination, name).read_text("utf-8"))
        failures, first = raw["failures"], raw["first"]
        if not isinstance(failures, int) or not isinstance(first, int | float):
            return None
        return FailureRecord(max(failures, 0), float(first), str(raw.get("reason", "")))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def forget_failures(root: Path, destination: str, name: str) -> None:
    with contextlib.suppress(OSError):
        _failure_path(root, destination, name).unlink()


def failure_records(root: Path, destination: str) -> set[str]:
    """Names of the queued instances of ``destination`` that have a failure record;
    records whose instance is gone are removed."""
    folder = root / QUEUE_DIR / destination
    try:
        with os.scandir(folder) as entries:
            stems = {e.name.removesuffix(_REASON_SUFFIX) for e in entries
                     if e.name.endswith(_REASON_SUFFIX) and not e.name.startswith(".")}
    except OSError:
        return set()
    names = set()
    for stem in stems:
        if (folder / f"{stem}{SUFFIX}").exists():
            names.add(f"{stem}{SUFFIX}")
        else:
            with contextlib.suppress(OSError):
                (folder / f"{stem}{_REASON_SUFFIX}").unlink()
    return names


def _failure_path(root: Path, destination: str, name: str) -> Path:
    return root / QUEUE_DIR / destination / f"{name.removesuffix(SUFFIX)}{_REASON_SUFFIX}"


def move_to_dead(root: Path, destination: str, name: str, *, reason: str,
                 status: int | None, attempts: int, fsync: bool = True,
                 sop_instance_uid: str | None = None) -> Path:
    """Move a queued instance to the dead-letter folder with its reason (and its SOP
    Instance UID, when it was read: the file name is the router's, not the
    instance's); its new path."""
    dead = root / DEAD_DIR / destination
    dead.mkdir(parents=True, exist_ok=True)
    stem = name.removesuffix(SUFFIX)
    record = {"destination": destination, "reason": reason, "status": status,
              "attempts": attempts, "time": time.time(), "sop_instance_uid": sop_instance_uid}
    tmp = dead / f".{stem}{_REASON_SUFFIX}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, dead / f"{stem}{_REASON_SUFFIX}")
    target = dead / name
    os.replace(root / QUEUE_DIR / destination / name, target)
    if fsync:
        _sync_dir(dead)
    forget_failures(root, destination, name)
    return target


def dead_letters(root: Path, destination: str | None = None) -> Iterator[DeadLetter]:
    """The dead letters of one destination (or all), oldest first."""
    for dest in [destination] if destination else _folders(root, DEAD_DIR):
        folder = root / DEAD_DIR / dest
        for entry in _files(folder):
            stem = entry.name.removesuffix(SUFFIX)
            record: dict[str, Any] = {}
            with contextlib.suppress(OSError, ValueError):
                record = json.loads((folder / f"{stem}{_REASON_SUFFIX}").read_text("utf-8"))
            status = record.get("status")
            uid = record.get("sop_instance_uid")
            yield DeadLetter(
                destination=dest, name=entry.name, path=Path(entry.path),
                reason=str(record.get("reason", "(no reason recorded)")),
                status=status if isinstance(status, int) else None,
                attempts=int(record.get("attempts", 0) or 0),
                time=float(record.get("time", 0.0) or entry.stat().st_mtime),
                sop_instance_uid=uid if isinstance(uid, str) else None)


def retry_dead(root: Path, destination: str | None = None, name: str | None = None) -> int:
    """Move dead letters back into their queue (all, one destination's, or the one
    named ``name``, with or without ``.dcm``); how many moved."""
    moved = 0
    wanted = None if name is None else name.removesuffix(SUFFIX) + SUFFIX
    for letter in list(dead_letters(root, destination)):
        if wanted is not None and letter.name != wanted:
            continue
        queue = root / QUEUE_DIR / letter.destination
        queue.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(letter.path, queue / letter.name)
        except FileNotFoundError:
            continue  # someone else retried or purged it meanwhile
        with contextlib.suppress(FileNotFoundError):
            (letter.path.parent / (letter.name.removesuffix(SUFFIX) + _REASON_SUFFIX)).unlink()
        moved += 1
    return moved


def purge_dead(root: Path, destination: str) -> int:
    """Delete the dead letters of ``destination``; how many went."""
    purged = 0
    for letter in list(dead_letters(root, destination)):
        with contextlib.suppress(FileNotFoundError):
            letter.path.unlink()
            purged += 1
        with contextlib.suppress(FileNotFoundError):
            (letter.path.parent / (letter.name.removesuffix(SUFFIX) + _REASON_SUFFIX)).unlink()
    return purged


def summarize(root: Path, destinations: list[str] | None = None) -> list[QueueSummary]:
    """One summary per destination (configured ones plus any found on disk)."""
    names = dict.fromkeys([*(destinations or []), *_folders(root, QUEUE_DIR),
                           *_folders(root, DEAD_DIR)])
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


def queued_counts(root: Path) -> dict[str, int]:
    """How many instances wait in each destination's queue (no file is stat'ed)."""
    return {dest: len(_files(root / QUEUE_DIR / dest)) for dest in _folders(root, QUEUE_DIR)}


def unrouted_count(root: Path) -> int:
    return len(_files(root / UNROUTED_DIR))


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
