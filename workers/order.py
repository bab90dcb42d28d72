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

    <root>/order/<destination>/<bucket>/<hash>.<stem>.dcm

``<hash>`` is 16 hex digits of a BLAKE2b hash of the SOP Instance UID, ``<bucket>``
its first two, so a bucket lists about 1/256 of the queue. A sender that has claimed
a queued file lists the bucket before sending it (:func:`older_version`): a marker of
the same hash with a smaller stem (stems sort by arrival, see workers/spool.py) whose
queued file still exists means an older version is still to be delivered, and the
newer one waits for it. A marker whose queued file is gone (a crash between the two
removals, a file removed by hand) is stale, and is removed when seen.

Markers are removed after the queued file leaves the queue (delivered, or moved to
``dead/``), so that a crash in between leaves a stale marker, never a queued file
without its marker. They are not fsync'd: after a power loss a file may be queued
without its marker and is then delivered in queue order alone. A 64-bit hash that two
UIDs share only makes one of them wait for the other.

Everything here is best effort: a marker that cannot be made or removed costs the
order of that instance, never its delivery. Calls block and own no thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
from pathlib import Path
from typing import Final

__all__ = [
    "ORDER_DIR",
    "is_link_of",
    "mark",
    "marker_path",
    "older_version",
    "remove",
    "sweep",
    "uid_hash",
    "unmark",
]

log = logging.getLogger("workers.order")

ORDER_DIR: Final = "order"
_HASH_CHARS: Final = 16
_QUEUE_DIR: Final = "queue"


def uid_hash(uid: str) -> str:
    """The 16 hex digits a SOP Instance UID's markers are named by."""
    return hashlib.blake2b(uid.encode("ascii", "replace"),
                           digest_size=_HASH_CHARS // 2).hexdigest()


def _bucket(root: Path, destination: str, digest: str) -> Path:
    return root / ORDER_DIR / destination / digest[:2]


def marker_path(root: Path, destination: str, name: str, uid: str) -> Path:
    digest = uid_hash(uid)
    return _bucket(root, destination, digest) / f"{digest}.{name}"


def mark(root: Path, destination: str, name: str, uid: str) -> Path | None:
    """Make the order marker of ``queue/<destination>/<name>``, of SOP Instance ``uid``;
    its path, or None if it could not be made (said in the log)."""
    queued = root / _QUEUE_DIR / destination / name
    marker = marker_path(root, destination, name, uid)
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


def unmark(root: Path, destination: str, name: str, uid: str) -> None:
    """Remove the order marker of ``<name>``, which has left ``destination``'s queue."""
    remove(marker_path(root, destination, name, uid))


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


def older_version(root: Path, destination: str, name: str, uid: str) -> str | None:
    """The oldest queued file of ``destination`` that holds an older version of SOP
    Instance ``uid`` than ``name`` does; None if there is none (or it cannot be told)."""
    digest = uid_hash(uid)
    bucket = _bucket(root, destination, digest)
    prefix = digest + "."
    try:
        names = os.listdir(bucket)
    except OSError:
        return None
    older = sorted(marker[len(prefix):] for marker in names
                   if marker.startswith(prefix) and marker[len(prefix):] < name)
    queue = root / _QUEUE_DIR / destination
    for candidate in older:
        if os.path.lexists(queue / candidate):
            return candidate
        with contextlib.suppress(OSError):  # stale: its file left the queue
            os.unlink(bucket / (prefix + candidate))
    return None


def sweep(root: Path) -> int:
    """Remove the stale markers of every destination (at start-up, while no worker
    runs): those whose queued file is gone, which would otherwise keep its data on
    disk. How many went."""
    removed = 0
    top = root / ORDER_DIR
    try:
        destinations = os.listdir(top)
    except FileNotFoundError:
        return 0
    for destination in destinations:
        queue = root / _QUEUE_DIR / destination
        try:
            buckets = os.listdir(top / destination)
        except OSError:
            continue
        for bucket in buckets:
            try:
                markers = os.listdir(top / destination / bucket)
            except OSError:
                continue
            for marker in markers:
                if os.path.lexists(queue / marker[_HASH_CHARS + 1:]):
                    continue
                try:
                    os.unlink(top / destination / bucket / marker)
                    removed += 1
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        log.warning("stale order marker %s/%s/%s not removed: %s",
                                    destination, bucket, marker, exc)
    return removed
