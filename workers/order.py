"""Delivery order of the versions of one instance (same SOP Instance UID) in a queue.

Theory of operation
-------------------
A modality or a workstation that corrects an instance sends it again with the same
SOP Instance UID, and a destination that keeps the last version it got must get the
versions in the order the router acknowledged them. Within a worker the queue is
taken oldest first, but that is not enough: the two versions may have been received
by two workers (each delivers from its own schedule), an older one may be waiting for
a retry while the newer one goes, or two senders may carry them at once. After a
destination's outage, with its queue drained by every worker together, the stale
version arriving last is the usual outcome, not a rare one.

So each queued file gets an *order marker*, a hard link (a directory entry, no new
inode) made at the commit, before the instance is acknowledged::

    <root>/order/<destination>/<bucket>/<hash>.<key>.<stem>.dcm

``<hash>`` is 16 hex digits of a BLAKE2b hash of the SOP Instance UID, ``<bucket>``
its first three, so a bucket lists about 1/4,096 of the queue. ``<key>`` is the time of
the commit in nanoseconds (20 digits): the order of the acknowledgements, which is
not that of the stems (a stem is minted when the C-STORE begins, and a big instance
begun first may be acknowledged last). A sender that has claimed a queued file lists
the bucket before sending it (:func:`versions`): a marker of the same hash with a
smaller key whose queued file still exists means an older version is still to be
delivered, and the newer one waits for it. A marker whose queued file is gone (a
crash between the two removals, a file removed by hand) is stale, and is removed
when seen, by :func:`sweep` at start-up and by :func:`sweep_destination` once a
destination's queue is empty.

Markers are removed after the queued file leaves the queue (delivered, or moved to
``dead/``), so that a crash in between leaves a stale marker, never a queued file
without its marker. They are not fsync'd: after a power loss a file may be queued
without its marker and is then delivered in queue order alone. A 64-bit hash that two
UIDs share only makes one of them wait for the other. A stale marker keeps its
file's data on disk until it is removed.

Cost, measured on this project's ext4: making a marker 6 us, removing one 3 us;
listing a bucket at a claim costs about 0.5 us per marker in it. With 256 buckets
(two hex digits, the layout before) that was 170 us at a 100,000-instance backlog
and 2 ms at a million, per claim: after a weekend's outage of a big site's PACS, the
catch-up spent more on this than on sending. With 4,096 buckets it is about 15 us and
120 us; the empty buckets a big queue leaves cost 4 KiB each (16 MiB at most per
destination). More buckets would cost more of that than they save. Buckets of two
digits, from a spool of an earlier version, are moved into the new ones by
:func:`sweep` at start-up.

Everything here is best effort: a marker that cannot be made or removed costs the
order of that instance, never its delivery. Calls block and own no thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "ORDER_DIR",
    "Versions",
    "is_link_of",
    "key_of_stem",
    "mark",
    "remove",
    "sweep",
    "sweep_destination",
    "uid_hash",
    "unmark",
    "versions",
]

log = logging.getLogger("workers.order")

ORDER_DIR: Final = "order"
_HASH_CHARS: Final = 16
_KEY_CHARS: Final = 20
_QUEUE_DIR: Final = "queue"  # workers.spool.QUEUE_DIR (spool imports this module)


def uid_hash(uid: str) -> str:
    """The 16 hex digits a SOP Instance UID's markers are named by."""
    return hashlib.blake2b(uid.encode("ascii", "replace"),
                           digest_size=_HASH_CHARS // 2).hexdigest()


_BUCKET_CHARS: Final = 3
_OLD_BUCKET_CHARS: Final = 2  # the layout of versions before 2026-11


def _bucket(root: Path, destination: str, digest: str) -> Path:
    return root / ORDER_DIR / destination / digest[:_BUCKET_CHARS]


def _split(marker: str) -> tuple[str, str, str] | None:
    """(hash, key, queued name) of a marker's name; None if it is not one."""
    digest, dot, rest = marker.partition(".")
    key, dot2, name = rest.partition(".")
    if not (dot and dot2 and len(digest) == _HASH_CHARS and len(key) == _KEY_CHARS
            and key.isdigit() and name):
        return None
    return digest, key, name


def mark(root: Path, destination: str, name: str, uid: str,
         key: str | None = None) -> Path | None:
    """Make the order marker of ``queue/<destination>/<name>``, of SOP Instance
    ``uid``, acknowledged now (or at ``key``); its path, or None if it could not be
    made (said in the log)."""
    queued = root / _QUEUE_DIR / destination / name
    digest = uid_hash(uid)
    marker = _bucket(root, destination, digest) / \
        f"{digest}.{key or f'{time.time_ns():0{_KEY_CHARS}d}'}.{name}"
    try:
        try:
            os.link(queued, marker, follow_symlinks=False)
        except FileNotFoundError:
            if not queued.parent.is_dir():
                raise
            marker.parent.mkdir(parents=True, exist_ok=True)
            os.link(queued, marker, follow_symlinks=False)
    except FileExistsError:
        pass
    except OSError as exc:
        log.warning("order marker of %s/%s (%s) not made: %s; its versions go in queue "
                    "order alone", destination, name, uid, exc)
        return None
    return marker


def key_of_stem(name: str) -> str | None:
    """The key a queued file's stem gives it (the time its C-STORE began): for a
    file queued again (``queue retry``), whose commit is long past."""
    key = name[:_KEY_CHARS]
    return key if key.isdigit() else None


@dataclass(frozen=True, slots=True)
class Versions:
    """What a queued file's bucket says of the versions of its instance."""

    own: Path | None = None  # its own marker
    older: str | None = None  # the oldest older version still queued (its file name)
    newer: str | None = None  # a newer version still queued


def versions(root: Path, destination: str, name: str, uid: str) -> Versions:
    """The marker of queued file ``name`` (SOP Instance ``uid``) of ``destination``
    and the other versions of its instance still queued there. ``name`` need not be
    queued (a transparent send): then every queued version is older."""
    digest = uid_hash(uid)
    bucket = _bucket(root, destination, digest)
    try:
        names = os.listdir(bucket)
    except OSError:
        return Versions()
    found = [(parts[1], parts[2], marker) for marker in names
             if marker.startswith(digest) and (parts := _split(marker)) is not None]
    own = next(((key, marker) for key, queued, marker in found if queued == name), None)
    older: str | None = None
    newer: str | None = None
    queue = root / _QUEUE_DIR / destination
    for key, queued, marker in sorted(found):
        if queued == name:
            continue
        is_older = own is None or (key, queued) < (own[0], name)
        if (older is not None if is_older else newer is not None):
            continue
        if not os.path.lexists(queue / queued):
            with contextlib.suppress(OSError):  # stale: its file left the queue
                os.unlink(bucket / marker)
            continue
        if is_older:
            older = queued
        else:
            newer = queued
    return Versions(None if own is None else bucket / own[1], older, newer)


def unmark(root: Path, destination: str, name: str, uid: str) -> None:
    """Remove the order marker of ``<name>``, which has left ``destination``'s queue."""
    marker = versions(root, destination, name, uid).own
    if marker is not None:
        remove(marker)


def remove(marker: Path) -> None:
    """Remove an order marker, if it is there."""
    try:
        os.unlink(marker)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("order marker %s not removed: %s", marker, exc)


def is_link_of(marker: Path, st: os.stat_result) -> bool:
    """Is ``marker`` a link of the file whose status is ``st``?"""
    try:
        own = os.stat(marker, follow_symlinks=False)
    except OSError:
        return False
    return (own.st_ino, own.st_dev) == (st.st_ino, st.st_dev)


def sweep(root: Path) -> int:
    """Remove the stale markers of every destination (at start-up, while no worker
    runs): those whose queued file is gone, which would otherwise keep its data on
    disk. How many went. Markers in buckets of the earlier layout are moved into
    this one's first (no worker looks there)."""
    try:
        destinations = os.listdir(root / ORDER_DIR)
    except FileNotFoundError:
        return 0
    for destination in destinations:
        _move_old_buckets(root, destination)
    return sum(sweep_destination(root, destination) for destination in destinations)


def _move_old_buckets(root: Path, destination: str) -> None:
    top = root / ORDER_DIR / destination
    try:
        buckets = [b for b in os.listdir(top) if len(b) == _OLD_BUCKET_CHARS]
    except OSError:
        return
    for bucket in buckets:
        old = top / bucket
        try:
            for marker in os.listdir(old):
                if _split(marker) is None:
                    continue  # not a marker: sweep_destination removes it, next
                new = _bucket(root, destination, marker)  # a marker starts with its hash
                new.mkdir(exist_ok=True)
                os.replace(old / marker, new / marker)
            with contextlib.suppress(OSError):  # not empty: removed at the next start
                old.rmdir()
        except OSError as exc:
            # Best effort, as all of this: a marker left behind is stale to
            # sweep_destination at worst, and its instance goes in queue order alone.
            log.warning("order markers in %s not moved to this version's buckets: %s",
                        old, exc)


def sweep_destination(root: Path, destination: str) -> int:
    """:func:`sweep` for one destination; safe while its queue is being written and
    delivered (a marker is made after its file is queued, removed after it left)."""
    removed = 0
    top = root / ORDER_DIR / destination
    queue = root / _QUEUE_DIR / destination
    try:
        buckets = os.listdir(top)
    except OSError:
        return 0
    for bucket in buckets:
        try:
            markers = os.listdir(top / bucket)
        except OSError:
            continue
        for marker in markers:
            parts = _split(marker)
            if parts is not None and os.path.lexists(queue / parts[2]):
                continue
            try:
                os.unlink(top / bucket / marker)
                removed += 1
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("stale order marker %s/%s/%s not removed: %s",
                                destination, bucket, marker, exc)
    return removed
