"""The durable spool: inbound C-STORE data sets streamed to disk, acknowledged after durable.

Theory of operation
-------------------
DESIGN.md D4. An inbound instance becomes a Part 10 file (PS3.10 §7) in three steps:

1. :meth:`Spool.begin` creates ``tmp/<stem>.part`` and writes the preamble, ``DICM``
   and the file meta (group 0002, explicit VR little endian, naming the transfer syntax);
2. :meth:`SpoolWriter.write` appends each P-DATA fragment of the data set as it arrives,
   unchanged, with ``os.write`` on the descriptor: no buffer, no copy, memory bounded
   whatever the size;
3. the commit: ``fsync(file)``, ``rename(tmp/<stem>.part -> incoming/<stem>.dcm)``,
   ``fsync(incoming/)``. Only after the directory fsync may the C-STORE be answered
   with Success.

On disk (one spool per volume; any number of processes and threads may share it)::

    <root>/tmp/<stem>.part        in progress, flock()ed by the writing process
    <root>/incoming/<stem>.dcm    complete and durable, ready to be queued

    <stem> = <time_ns, 20 digits>-<pid>-<counter>, e.g. 01734950012345678901-4242-17

The stem is minted by the spool and never comes from the data set or the peer (the
AE titles travel inside the file meta instead): the counter is unique within a
process, the pid among live processes, and the clock between a process and an earlier
one that had the same pid. Names sort by arrival. ``tmp/`` and ``incoming/`` are on one
filesystem, so the rename is atomic and a later hard link from ``incoming/`` into each
destination's queue (another directory beside them) is possible.

A crash leaves at most ``.part`` files in ``tmp/``; :meth:`Spool.recover` deletes them.
Every writer holds an exclusive ``flock`` on its temporary file from creation until
after the rename; the kernel drops it when the process dies. ``recover`` deletes only
the files whose lock it can take, so a worker restarted by the supervisor can recover
while the other workers keep writing into the same ``tmp/``.

Group commit: :class:`GroupCommitter` runs the commit for many writers on one thread.
It takes every writer queued so far and, for each, asks its router (the rules) for a
:class:`Placement`: the folders the file is hard-linked into as received
(``queue/<destination>/``, ``unrouted/``; ``incoming/`` when there is no router),
modified copies for destinations whose rules change the data set, nothing at all
(dropped or rejected), or *held* in ``tmp/`` for a transparent send. It fsyncs the file,
links it into each folder, unlinks the temporary name, then fsyncs each folder touched
by the batch once, and only then resolves the batch's futures: every instance has its
own fsync and its links before a directory fsync and before it is acknowledged; only
the directory fsyncs are shared. A crash between two links leaves extra links of an
instance that was never acknowledged: the sender sends it again, a destination may get
it twice, nothing is lost.

The full layout::

    <root>/tmp/<stem>.part              in progress (or held for a transparent send)
    <root>/tmp/<stem>.spare             a delivered file kept to write over, or an
                                        empty file made ahead (or in progress,
                                        written over)
    <root>/incoming/<stem>.dcm          committed with no router (library use)
    <root>/queue/<destination>/<stem>.dcm   waiting for delivery (workers/forward.py)
    <root>/dead/<destination>/<stem>.dcm    delivery gave up; <stem>.json says why
    <root>/order/<destination>/<xxx>/<hash>.<key>.<stem>.dcm
                                        a queued file's order marker, a hard link
                                        (workers/order.py)
    <root>/unrouted/<stem>.dcm          no rule routed it ([routing] unmatched = "keep")

Spare files: a delivered instance's file is not always deleted. :meth:`Spool.retire`
renames it to ``tmp/<stem>.spare`` (when it has no other link and is small), and the
next :meth:`Spool.begin` of the same process writes over it instead of creating a file
(keeping that name until its commit). Creating and deleting an inode per instance is
the costliest part of spooling on ext4 without a journal, where allocating an inode
scans past every inode freed in the last minute (measured: 11% of a forwarding
worker's CPU), and writing over allocated blocks makes the fsync cheaper. A spare is
an unlocked file in ``tmp/``, so :meth:`Spool.recover` deletes it like any leftover;
a writer that reuses one locks it first, as it locks a new one, and truncates it to
what it wrote before the commit reads it. A spare is written over only after a
directory fsync of the folder it left, started after it left, has completed: before
that a crash (or a journal that commits the rename after the overwritten data) could
bring its old name back holding another instance's bytes. In the usual flow the
next group commit into that destination's queue is that fsync.

Files made ahead: a worker with no association open calls :meth:`Spool.stock` to
make up to :data:`FRESH_SPARES` empty files in ``tmp/`` for the next instances to
be written into, so that a burst (a CT study of a thousand instances) allocates no
inode on the path to its acknowledgements. On the 8-stream C-STORE benchmark's
disk (ext4 without a journal, whose inode allocator scans past every recently
freed inode) an inode costs 150-450 us of CPU, a third of the worker's time per
instance; on ext4 with a journal about 7 us, where the pool costs as little as it
saves. They hold no data blocks, never had another name, and are written over at
once. Spares are per process: the name's pid says whose, and
:meth:`Spool.recover` with ``dead_only`` (a worker starting) deletes only those of
processes that are gone, with the partial files those left.

Errors are ``OSError``; :func:`status_for_error` maps them to the DIMSE status the
C-STORE is answered with (A700H out of resources for a full disk, 0110H otherwise).
A writer that fails removes its temporary file at once; the spool stays usable.
The calls block, and the caller picks the thread; the one exception is
:class:`RingCommitter`, which commits on an asyncio loop with the fsyncs done by the
kernel through io_uring (see :mod:`workers.uring`), :class:`GroupCommitter` doing what
it does not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import enum
import errno
import fcntl
import functools
import itertools
import logging
import os
import queue
import select
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final, TypeVar

from router.dicom.dataset import part10_meta_bytes
from router.dicom.dimse import PROCESSING_FAILURE, REFUSED_OUT_OF_RESOURCES, SUCCESS
from router.dicom.errors import DIMSEError, LocalProtocolError
from workers import order, uring

__all__ = [
    "DEAD_DIR",
    "INCOMING_DIR",
    "IOV_MAX",
    "QUEUE_DIR",
    "UNROUTED_DIR",
    "GroupCommitter",
    "Placed",
    "Placement",
    "RecoveryReport",
    "Spool",
    "SpoolWriter",
    "status_for_error",
]

#: Buffers one writev or sendmsg may take (POSIX IOV_MAX; 1024 on Linux).
IOV_MAX: Final = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024

log = logging.getLogger("workers.spool")

_T = TypeVar("_T")

TMP_DIR: Final = "tmp"
INCOMING_DIR: Final = "incoming"
QUEUE_DIR: Final = "queue"
DEAD_DIR: Final = "dead"
UNROUTED_DIR: Final = "unrouted"
_QUEUE_PREFIX: Final = QUEUE_DIR + "/"
TMP_SUFFIX: Final = ".part"
SPARE_SUFFIX: Final = ".spare"
SUFFIX: Final = ".dcm"

# errnos that mean "no room now, try later" rather than "broken": PS3.4 B.2.3 A700H.
# Spare files a spool keeps per process, and the largest file kept as one: at most
# 64 MiB of disk, and big instances (a rare case) pay for their own inode.
SPARES: Final = 16
SPARE_MAX_BYTES: Final = 4 << 20
# Empty files a process makes ahead (Spool.stock): inodes only, no data blocks.
FRESH_SPARES: Final = 1024
# Requests an io_uring of RingCommitter holds: a file fsync per instance in flight and a
# folder fsync per folder; more than that waits for the commit thread.
RING_ENTRIES: Final = 256
_SPARE_FLAGS: Final = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW

_OUT_OF_RESOURCES: Final = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE))

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_CREATE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
# One counter per process (next() on itertools.count is atomic under the GIL); the pid
# in the stem keeps forked children apart although they inherit its position.
_counter = itertools.count()

# Offset of the (0002,0000) group length value in part10_meta_bytes' output:
# preamble, "DICM", then tag (4), VR (2) and length (2).
_GROUP_LENGTH_OFFSET: Final = 128 + 4 + 8
_META_START: Final = _GROUP_LENGTH_OFFSET + 4


def status_for_error(exc: BaseException) -> int:
    """The C-STORE status (PS3.4 B.2.3, PS3.7 Annex C) for a failure to spool an instance.

    A700H (refused: out of resources) when the disk or quota is full or descriptors ran
    out: the sender may retry later. A :class:`~router.dicom.errors.DIMSEError` keeps its
    own status. Anything else, EIO included, is 0110H (processing failure).
    """
    if isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES:
        return REFUSED_OUT_OF_RESOURCES
    if isinstance(exc, DIMSEError):
        return exc.status
    return PROCESSING_FAILURE


@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryReport:
    """What :meth:`Spool.recover` found: temporary files removed, instances kept."""

    removed_temporary: int  # partial instances (never acknowledged)
    completed: int
    removed_spares: int = 0  # spare files: nothing was in them


# Writes a whole Part 10 file (a rule's modified copy) to the open file given.
CopyWriter = Callable[[BinaryIO], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """Where a complete instance goes at commit (DESIGN.md D4), decided by the router.

    - ``links``: spool folders (relative to the root: ``"queue/pacs"``, ``"unrouted"``)
      that get the file exactly as received, as hard links: one copy on disk however
      many destinations share it.
    - ``copies``: (folder, writer) for the destinations whose rules changed the data
      set: each writer writes a whole new Part 10 file, which is fsync'd and renamed
      into its folder like the original.
    - ``hold``: keep the file in ``tmp/`` (locked, not fsync'd) for an immediate
      transparent send; the caller ends it with :meth:`SpoolWriter.release`.
    - ``note``: anything the caller wants back in :class:`Placed` (the routing decision).

    No links, copies or hold: the instance is dropped (or rejected) and leaves nothing.
    """

    links: tuple[str, ...] = ()
    copies: tuple[tuple[str, CopyWriter], ...] = ()
    hold: bool = False
    note: object = None

    def __post_init__(self) -> None:
        for folder in (*self.links, *(folder for folder, _ in self.copies)):
            if not _is_spool_folder(folder):
                raise ValueError(f"Placement: {folder!r} is not a spool folder")
        if self.hold and (self.links or self.copies):
            raise ValueError("Placement: a held instance is not also placed")

    @property
    def keeps_nothing(self) -> bool:
        return not (self.links or self.copies or self.hold)


@functools.lru_cache(maxsize=1024)
def _is_spool_folder(folder: str) -> bool:
    # Cached: a placement is made per instance, over a handful of folder names.
    parts = Path(folder).parts
    return bool(parts) and not Path(folder).is_absolute() and ".." not in parts \
        and parts[0] != TMP_DIR


INCOMING: Final = Placement(links=(INCOMING_DIR,))

# (writer, its temporary file) -> Placement; runs on the commit thread. A committer
# also takes the Placement itself, when it was decided already.
Router = Callable[["SpoolWriter", Path], Placement]


@dataclass(frozen=True, slots=True, kw_only=True)
class Placed:
    """A committed instance: the placement and the durable files it made."""

    placement: Placement
    paths: tuple[Path, ...] = ()
    held: Path | None = None
    markers: tuple[Path, ...] = ()  # the files' order markers (workers/order.py)

    @property
    def path(self) -> Path | None:
        """The first durable file (the one in the first link folder), if any."""
        return self.paths[0] if self.paths else None


class Spool:
    """A spool directory: ``root/tmp/`` for instances in progress, ``root/incoming/`` for
    durable ones (see the module docstring for the layout).

    ``fsync=False`` skips every fsync (benchmarks and tests only: nothing is durable).
    Holds two directory descriptors; :meth:`close` releases them.
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.tmp = self.root / TMP_DIR
        self.incoming = self.root / INCOMING_DIR
        self.fsync = fsync
        for path in (self.tmp, self.incoming):
            _make_dirs(path, fsync=fsync)
        self._tmp_fd = os.open(self.tmp, _DIR_FLAGS)
        try:
            incoming_fd = os.open(self.incoming, _DIR_FLAGS)
        except BaseException:
            os.close(self._tmp_fd)
            raise
        # incoming/ here from the start; other folders (queue/<dest>, unrouted...)
        # opened on first use.
        self._dir_fds: dict[str, int] = {INCOMING_DIR: incoming_fd}
        self._dir_lock = threading.Lock()
        # This process's spare files in tmp/: (name, size, folder it left, the number of
        # fsyncs of that folder started before it left); see retire().
        self._spares: deque[tuple[str, int, str, int]] = deque()
        # Empty files this process made ahead in tmp/ (stock()), to write instances into.
        self._fresh: deque[str] = deque()
        # Per folder: directory fsyncs started, and the latest one known complete.
        self._syncs_started: dict[str, int] = {}
        self._synced: dict[str, int] = {}
        # Descriptors of folders replaced by refresh(): closed only in close(), since
        # another thread may hold the number at this moment.
        self._stale_fds: list[int] = []

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def discard_spares(self) -> int:
        """Delete this process's spare files, at a clean stop; how many. A spare made
        of a delivered instance still holds its bytes, patient data the router no
        longer needs, which stayed on disk until the next start's recover() (or for
        good, if the router never started again); the empty ones go too, so that
        tmp/ is empty after a clean stop. No writer may be open."""
        removed = 0
        while self._spares or self._fresh:
            name = self._spares.popleft()[0] if self._spares else self._fresh.popleft()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self._tmp_fd)
                removed += 1
        return removed

    def close(self) -> None:
        """Release the directory descriptors; writers still open must be done first."""
        with self._dir_lock:
            for fd in (*self._dir_fds.values(), *self._stale_fds):
                os.close(fd)
            self._dir_fds = {}
            self._stale_fds = []
        if self._tmp_fd >= 0:
            os.close(self._tmp_fd)
            self._tmp_fd = -1

    @property
    def _incoming_fd(self) -> int:
        """incoming/'s descriptor (-1 once closed): the one in ``_dir_fds``, which
        :meth:`refresh` replaces if the folder is made again."""
        return self._dir_fds.get(INCOMING_DIR, -1)

    def dir_fd(self, folder: str) -> int:
        """A descriptor of spool folder ``folder`` (made, durably, if missing)."""
        fd = self._dir_fds.get(folder)
        if fd is not None:
            return fd
        with self._dir_lock:
            fd = self._dir_fds.get(folder)
            if fd is None:
                _make_dirs(self.root / folder, fsync=self.fsync)
                fd = self._dir_fds[folder] = os.open(self.root / folder, _DIR_FLAGS)
            return fd

    def refresh(self, wanted: Callable[[str], bool] | None = None) -> list[str]:
        """Make again and reopen the folders removed, moved or replaced under us; returns
        their names (``tmp``, ``incoming``, ``queue/pacs``...).

        Why: the spool keeps a descriptor per folder and links files through it. An
        operator who deletes ``unrouted/`` to empty it, or moves ``queue/pacs/`` aside,
        would otherwise make every later commit there fail (a removed folder: ENOENT)
        or land where no forwarder looks (a moved one), until a restart. The commit
        paths call this when a link, rename or create meets ENOENT, and retry once;
        the worker calls it on every heartbeat, which bounds the time files can go to
        a moved folder. A folder is made again durably (its parent fsync'd). Raises
        ``OSError`` if it cannot be made or opened.

        A folder ``wanted`` says no to (the queue of a destination a reload removed)
        is let go instead, gone or not: an operator who deletes that empty queue
        folder saw it made again, with this warning, at the next heartbeat. Its
        descriptor is closed with the spool (a commit may hold its number now).
        """
        revived: list[str] = []
        with self._dir_lock:
            for folder, fd in [(TMP_DIR, self._tmp_fd), *self._dir_fds.items()]:
                path = self.root / folder
                if wanted is not None and folder != TMP_DIR and not wanted(folder):
                    del self._dir_fds[folder]
                    self._stale_fds.append(fd)
                    continue
                if fd < 0 or _names_fd(path, fd):
                    continue
                _make_dirs(path, fsync=self.fsync)
                new = os.open(path, _DIR_FLAGS)
                self._stale_fds.append(fd)
                if folder == TMP_DIR:
                    self._tmp_fd = new
                else:
                    self._dir_fds[folder] = new
                revived.append(folder)
        for folder in revived:
            log.warning("spool %s: folder %s/ was removed or replaced while the router ran;"
                        " made it again", self.root, folder)
        return revived

    def sync_dir(self, folder: str) -> None:
        if self.fsync:
            ticket = self._dir_sync_started(folder)
            os.fsync(self.dir_fd(folder))
            self._dir_synced(folder, ticket)

    def _dir_sync_started(self, folder: str) -> int:
        """A directory fsync of ``folder`` starts now: its ticket for
        :meth:`_dir_synced` (what :meth:`_left_durably` counts on)."""
        with self._dir_lock:
            ticket = self._syncs_started[folder] = self._syncs_started.get(folder, 0) + 1
        return ticket

    def _dir_synced(self, folder: str, ticket: int) -> None:
        with self._dir_lock:
            if ticket > self._synced.get(folder, 0):
                self._synced[folder] = ticket

    def recover(self, *, dead_only: bool = False) -> RecoveryReport:
        """Delete the temporary files no live writer holds; count the complete instances.

        D4: on start, temporary files are discarded -- they were never acknowledged.
        Files locked by a writer in any live process (this one included) are left alone,
        so any process sharing the spool may call this at any time. ``dead_only``
        (a worker starting beside live ones) also leaves the files whose name holds
        the pid of a live process: their spares (unlocked, but theirs to write into).
        """
        removed = spares = 0
        with os.scandir(self._tmp_fd) as entries:
            names = [e.name for e in entries if e.is_file(follow_symlinks=False)]
        if dead_only:
            live = functools.cache(is_live)  # one question per pid, not per file
            names = [name for name in names if not live(_minter(name))]
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=self._tmp_fd)
            except FileNotFoundError:
                continue  # its writer finished (renamed it) meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a live writer's
            try:
                os.unlink(name, dir_fd=self._tmp_fd)
                if name.endswith(SPARE_SUFFIX):
                    spares += 1
                else:
                    removed += 1
            except FileNotFoundError:
                pass  # renamed by its writer between our open and its unlock
            finally:
                os.close(fd)  # after the unlink: see _create_locked
        with os.scandir(self._incoming_fd) as entries:
            completed = sum(
                1 for e in entries if e.name.endswith(SUFFIX) and e.is_file(follow_symlinks=False)
            )
        if removed or spares or not dead_only:
            log.info("spool %s: removed %d partial instance(s) and %d spare file(s) from "
                     "%s/, %d instance(s) in %s/", self.root, removed, spares, TMP_DIR,
                     completed, INCOMING_DIR)
        return RecoveryReport(removed_temporary=removed, completed=completed,
                              removed_spares=spares)

    def stock(self, most: int) -> int:
        """Make up to ``most`` empty files in ``tmp/`` for :meth:`begin` to write
        into, while this process holds fewer than :data:`FRESH_SPARES`; return how
        many it made. Nothing is fsync'd: an empty file lost in a crash is no loss,
        and one left over is deleted by :meth:`recover`. ``OSError`` (a full disk,
        no inodes left) stops it; what was made stays usable."""
        made = 0
        while made < most and len(self._fresh) < FRESH_SPARES:
            name = _mint_stem() + SPARE_SUFFIX
            os.close(self._in(TMP_DIR, functools.partial(_create, name)))
            self._fresh.append(name)
            made += 1
        return made

    @property
    def stocked(self) -> int:
        """Empty files this process has made ahead and not yet written into."""
        return len(self._fresh)

    def begin(
        self,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str,
        called_ae: str,
        association_id: str,
    ) -> SpoolWriter:
        """Start spooling one instance: a new temporary file holding its Part 10 file meta.

        The meta (PS3.10 §7.1) records the SOP class and instance (from the C-STORE-RQ),
        the transfer syntax the data set arrives in, and the association's AE titles:
        the calling AE as Source (0002,0016) and Sending (0002,0017) AE Title, the
        called AE as Receiving AE Title (0002,0018). Values unfit for the meta raise
        :class:`~router.dicom.errors.LocalProtocolError` before any file exists;
        ``OSError`` if the file cannot be created or written.
        """
        meta = _meta(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax=transfer_syntax,
            calling_ae=calling_ae,
            called_ae=called_ae,
        )
        stem, tmp_name, fd, stale = self._create_locked()
        writer = SpoolWriter(
            self,
            stem=stem,
            fd=fd,
            tmp_name=tmp_name,
            stale_size=stale,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax=transfer_syntax,
            calling_ae=calling_ae,
            called_ae=called_ae,
            association_id=association_id,
        )
        writer._write_all(memoryview(meta))
        writer.dataset_offset = len(meta)
        return writer

    def retire(self, folder: str, name: str, fd: int, *, marker: Path | None = None) -> None:
        """Remove the delivered file ``folder/name`` (open as ``fd``) from its folder,
        then its order ``marker`` if it has one (workers/order.py).

        If it has no other link (no other destination still waits for it) and is at
        most :data:`SPARE_MAX_BYTES`, it becomes one of this process's spare files
        while fewer than :data:`SPARES` are kept; else it is deleted. A spare is
        written over only once a later fsync of ``folder`` has completed (see
        :meth:`_left_durably`). Raises
        ``FileNotFoundError`` if it is gone already. Nothing is fsync'd: after a
        crash the file is back in its folder and is delivered again (D4 allows
        duplicates there), or it is a leftover in ``tmp/`` that recover() deletes.
        """
        st = os.fstat(fd)
        links = st.st_nlink
        if marker is not None and order.is_link_of(marker, st):
            links -= 1  # the marker goes below, after the file: see workers/order.py
        if links == 1 and st.st_size <= SPARE_MAX_BYTES and len(self._spares) < SPARES:
            spare = _mint_stem() + SPARE_SUFFIX
            with self._dir_lock:
                before = self._syncs_started.get(folder, 0)
            self._in(folder, lambda fd: os.rename(name, spare, src_dir_fd=fd,
                                                  dst_dir_fd=self._tmp_fd))
            self._spares.append((spare, st.st_size, folder, before))
        else:
            self._in(folder, lambda fd: os.unlink(name, dir_fd=fd))
        if marker is not None:
            order.remove(marker)

    def _in(self, folder: str, call: Callable[[int], _T]) -> _T:
        """``call(descriptor of folder)`` (``tmp`` too); on ENOENT, once more if
        :meth:`refresh` made a folder again (the file's own absence raises again)."""
        try:
            return call(self._tmp_fd if folder == TMP_DIR else self.dir_fd(folder))
        except FileNotFoundError:
            if not self.refresh():
                raise
            return call(self._tmp_fd if folder == TMP_DIR else self.dir_fd(folder))

    def _left_durably(self, folder: str, before: int) -> bool:
        """Has a spare's removal from ``folder`` reached the disk? Only then may it be
        written over: until a directory fsync that started after the rename has
        completed, a crash can bring the old name back, and it must not come back
        holding another instance's bytes. Group commits into that folder (the usual
        single-destination case) make it so within a batch."""
        if not self.fsync:
            return True  # nothing is durable anyway
        with self._dir_lock:
            return self._synced.get(folder, 0) > before

    def _create_locked(self) -> tuple[str, str, int, int]:
        """A temporary file, flock()ed: (stem, its name in tmp/, descriptor, bytes of
        earlier content in it). A spare file when there is one (a delivered file
        first: its blocks are allocated already), else an empty one made ahead, else
        a new file.

        ``recover`` unlinks a file while holding its lock and unlocks after; so a file
        we lock and find still linked is ours for good. Losing that race (recover ran
        between our open and our flock) only costs a fresh name.
        """
        for _ in range(len(self._spares)):
            name, size, folder, before = self._spares.popleft()
            if not self._left_durably(folder, before):
                self._spares.append((name, size, folder, before))
                continue
            fd = self._lock_spare(name)
            if fd is not None:
                return _mint_stem(), name, fd, size
        while self._fresh:
            name = self._fresh.popleft()
            fd = self._lock_spare(name)
            if fd is not None:
                return _mint_stem(), name, fd, 0
        for _ in range(8):
            stem = _mint_stem()
            fd = self._in(TMP_DIR, functools.partial(_create, stem + TMP_SUFFIX))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # recover() holds it and will unlink it
                continue
            except BaseException:
                _discard(fd, stem + TMP_SUFFIX, self._tmp_fd)
                raise
            if os.fstat(fd).st_nlink:
                return stem, stem + TMP_SUFFIX, fd, 0
            os.close(fd)
        raise OSError(errno.EAGAIN, f"cannot create a temporary file in {self.tmp}")

    def _lock_spare(self, name: str) -> int | None:
        """The spare ``tmp/name`` open and flock()ed, or None if it is gone: recover()
        took it, or tmp/ was made again (see :meth:`_create_locked`)."""
        try:
            fd = os.open(name, _SPARE_FLAGS, dir_fd=self._tmp_fd)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_nlink:
                return fd
        except OSError:
            pass
        os.close(fd)
        return None

    def _sync_incoming(self) -> None:
        if self.fsync:
            os.fsync(self._incoming_fd)


class _State(enum.Enum):
    OPEN = "open"  # taking fragments
    FAILED = "failed"  # a write failed; the file is gone, further fragments are dropped
    COMMITTING = "committing"  # finish() or a GroupCommitter owns it now
    DONE = "done"  # in incoming/, durable
    HELD = "held"  # kept in tmp/ for a transparent send; release() ends it
    ABORTED = "aborted"  # discarded by abort() or a failed commit


class SpoolWriter:
    """One instance being spooled; the :class:`~router.net.server.StoreSink` shape.

    Made by :meth:`Spool.begin`. Feed it the data set's fragments in order with
    :meth:`write`, then either :meth:`close` (StoreSink: commit now, return the status)
    or :meth:`finish` (commit now, return the path or raise), or hand it to
    :meth:`GroupCommitter.submit`. :meth:`abort` discards it. One thread at a time.

    ``dataset_offset`` is where the data set starts in the file (the meta's length),
    ``bytes_written`` how many data set bytes were written, ``path`` the final path
    once committed.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        stem: str,
        fd: int,
        tmp_name: str | None = None,
        stale_size: int = 0,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        calling_ae: str,
        called_ae: str,
        association_id: str,
    ) -> None:
        self.spool = spool
        self.name = stem + SUFFIX
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = transfer_syntax
        self.calling_ae = calling_ae
        self.called_ae = called_ae
        self.association_id = association_id
        self.dataset_offset = 0
        self.bytes_written = 0
        self.path: Path | None = None
        self.markers: tuple[Path, ...] = ()  # order markers its commit made
        self._fd = fd
        self._tmp_name = tmp_name or stem + TMP_SUFFIX
        # Bytes a reused spare file held before (see Spool.retire): what lies past our
        # own end is cut off before the commit.
        self._stale_size = stale_size
        self._state = _State.OPEN
        self._error: OSError | None = None

    def __repr__(self) -> str:
        return (f"<SpoolWriter {self.name} {self._state.value} {self.calling_ae}->"
                f"{self.called_ae} {self.sop_instance_uid} {self.bytes_written} bytes>")

    @property
    def status(self) -> int | None:
        """The failure status to answer with if a write failed, else None."""
        return None if self._error is None else status_for_error(self._error)

    def write(self, data: memoryview) -> None:
        """Append one fragment of the data set (PS3.8 Annex E), as received.

        An ``OSError`` (ENOSPC...) removes the temporary file and propagates; the writer
        then drops further fragments, so the caller can read the rest of the message
        and answer with :attr:`status` (or :meth:`close`'s).
        """
        if self._state is _State.OPEN:
            self._write_all(data)
            self.bytes_written += data.nbytes
        elif self._state is not _State.FAILED:
            raise ValueError(f"write to a {self._state.value} spool writer")

    def write_many(self, fragments: list[memoryview]) -> None:
        """:meth:`write` for several fragments in order, with one ``writev``."""
        if self._state is not _State.OPEN:
            if self._state is not _State.FAILED:
                raise ValueError(f"write to a {self._state.value} spool writer")
            return
        views = [f if f.ndim == 1 and f.itemsize == 1 else f.cast("B") for f in fragments]
        # writev takes at most IOV_MAX buffers (EINVAL past it): a sender of tiny PDVs,
        # one per element (CTN), has thousands arrive in one read.
        for start in range(0, len(views), IOV_MAX):
            batch = views[start:start + IOV_MAX]
            total = sum(v.nbytes for v in batch)
            try:
                written = os.writev(self._fd, batch)
            except BaseException as exc:
                self._fail(exc)
                raise
            if written < total:  # a short write (signal, nearly full disk): one by one
                for view in batch:
                    if written >= view.nbytes:
                        written -= view.nbytes
                        continue
                    self._write_all(view[written:])
                    written = 0
            self.bytes_written += total

    def close(self) -> int:
        """StoreSink: commit now (fsync, rename, directory fsync) and return the status.

        0000H once durable; after a failure the status from :func:`status_for_error`,
        the reason logged here (this returns a status rather than raising).
        """
        if self._error is not None:
            return status_for_error(self._error)
        try:
            self.finish()
        except OSError as exc:
            log.warning("spool %s: cannot commit %s (%s): %s", self.spool.root,
                        self.sop_instance_uid, self.association_id, exc)
            return status_for_error(exc)
        return SUCCESS

    def finish(self) -> Path:
        """Commit now: fsync the file, rename it into ``incoming/``, fsync ``incoming/``.

        Returns the final path. On ``OSError`` nothing is left behind.
        """
        self._start_commit()
        path = self._sync_and_rename()
        try:
            self.spool._sync_incoming()
        except BaseException:
            self._unpublish()
            raise
        self._state = _State.DONE
        return path

    def abort(self) -> None:
        """Discard: close and delete the temporary file (the association ended early).

        Idempotent; does nothing once a commit has started.
        """
        if self._state is _State.OPEN:
            self._state = _State.ABORTED
            _discard(self._fd, self._tmp_name, self.spool._tmp_fd)

    # --- the pieces of a commit, shared with GroupCommitter -------------------

    def _start_commit(self) -> None:
        if self._error is not None:
            raise OSError(self._error.errno, f"spooling failed earlier: {self._error.strerror}")
        if self._state is not _State.OPEN:
            raise ValueError(f"commit of a {self._state.value} spool writer")
        end = self.dataset_offset + self.bytes_written
        if self._stale_size > end:
            # A reused spare: the rules and the commit must see our bytes only.
            try:
                os.ftruncate(self._fd, end)
            except OSError as exc:
                self._fail(exc)
                raise
        self._state = _State.COMMITTING

    def _sync_and_rename(self) -> Path:
        """fsync, rename into incoming/, close; on any error, delete and re-raise."""
        spool = self.spool
        try:
            if spool.fsync:
                os.fsync(self._fd)
            spool._in(INCOMING_DIR, lambda fd: os.rename(
                self._tmp_name, self.name, src_dir_fd=spool._tmp_fd, dst_dir_fd=fd))
        except BaseException:
            self._state = _State.ABORTED
            _discard(self._fd, self._tmp_name, spool._tmp_fd)
            raise
        # Unlocked only now, after the rename: recover() must never see it unlocked in tmp/.
        # (close cannot lose data already fsync'd; without fsync nothing is promised.)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self.path = spool.incoming / self.name
        return self.path

    @property
    def tmp_path(self) -> Path:
        """The temporary file (valid while the writer is open, committing or held)."""
        return self.spool.tmp / self._tmp_name

    def _place(self, placement: Placement) -> tuple[tuple[Path, ...], set[str]]:
        """Commit by ``placement``: fsync once, link/copy into each folder, drop tmp/.

        Returns the files made and the folders to fsync; on error removes what it made
        (nothing was acknowledged) and re-raises.
        """
        if placement.links and self.spool.fsync:
            try:
                os.fsync(self._fd)
            except BaseException:
                self._abandon()
                raise
        return self._publish(placement)

    def _publish(self, placement: Placement) -> tuple[tuple[Path, ...], set[str]]:
        """:meth:`_place` once the file is fsync'd (or needs no fsync): the copies,
        links and rename; the caller fsyncs the folders it returns."""
        spool = self.spool
        if placement.hold:
            self._state = _State.HELD
            return (), set()
        if placement.keeps_nothing:
            self._abandon()
            return (), set()
        made: list[tuple[str, Path]] = []
        renamed = False
        try:
            for number, (folder, write) in enumerate(placement.copies):
                made.append((folder, self._copy(number, folder, write)))
            for index, folder in enumerate(placement.links):
                if index < len(placement.links) - 1:
                    spool._in(folder, lambda fd: os.link(
                        self._tmp_name, self.name, src_dir_fd=spool._tmp_fd, dst_dir_fd=fd,
                        follow_symlinks=False))
                else:
                    # The last folder takes the file itself: one directory operation
                    # fewer than a link and an unlink, for the usual single destination.
                    spool._in(folder, lambda fd: os.rename(
                        self._tmp_name, self.name, src_dir_fd=spool._tmp_fd, dst_dir_fd=fd))
                    renamed = True
                made.append((folder, spool.root / folder / self.name))
        except BaseException:
            for folder, path in made:
                with contextlib.suppress(OSError):
                    os.unlink(path.name, dir_fd=spool.dir_fd(folder))
            self._state = _State.ABORTED
            if renamed:  # only the rename itself can have failed after it: nothing in tmp/
                with contextlib.suppress(OSError):
                    os.close(self._fd)
            else:
                _discard(self._fd, self._tmp_name, spool._tmp_fd)
            raise
        self._state = _State.DONE
        # Before the acknowledgement: the versions of one instance are delivered in the
        # order they were acknowledged (workers/order.py).
        self.markers = tuple(
            marker for folder, _ in made if folder.startswith(_QUEUE_PREFIX)
            for marker in [order.mark(spool.root, folder[len(_QUEUE_PREFIX):], self.name,
                                      self.sop_instance_uid)] if marker is not None)
        if renamed:
            # Unlocked only after the rename: recover() never sees it unlocked in tmp/.
            with contextlib.suppress(OSError):
                os.close(self._fd)
        else:
            # The temporary name goes while the lock is held (see _create_locked).
            _discard(self._fd, self._tmp_name, spool._tmp_fd)
        # Links first (the file as received), then the changed copies.
        ordered = made[len(placement.copies):] + made[:len(placement.copies)]
        self.path = ordered[0][1]
        return tuple(path for _, path in ordered), {folder for folder, _ in made}

    def _copy(self, number: int, folder: str, write: CopyWriter) -> Path:
        spool = self.spool
        tmp_name = f"{self.name[: -len(SUFFIX)]}.{number}{TMP_SUFFIX}"
        fd = _create(tmp_name, spool._tmp_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with os.fdopen(os.dup(fd), "wb") as fh:
                write(fh)
            if spool.fsync:
                os.fsync(fd)
            spool._in(folder, lambda dir_fd: os.rename(
                tmp_name, self.name, src_dir_fd=spool._tmp_fd, dst_dir_fd=dir_fd))
        except BaseException:
            _discard(fd, tmp_name, spool._tmp_fd)
            raise
        os.close(fd)
        return spool.root / folder / self.name

    def release(self) -> None:
        """End a held instance (transparent send done or failed): delete it."""
        if self._state is _State.HELD:
            self._state = _State.ABORTED
            _discard(self._fd, self._tmp_name, self.spool._tmp_fd)

    def _unpublish(self) -> None:
        """The directory fsync failed: the rename may not be durable, so take it back."""
        self._state = _State.ABORTED
        self.path = None
        with contextlib.suppress(OSError):
            os.unlink(self.name, dir_fd=self.spool._incoming_fd)

    def _abandon(self) -> None:
        """The commit ends without a file (dropped, cancelled, fsync failed): discard."""
        self._state = _State.ABORTED
        _discard(self._fd, self._tmp_name, self.spool._tmp_fd)

    def _fail(self, exc: BaseException) -> None:
        """A write failed: remember an ``OSError`` for :attr:`status`, drop the file;
        further fragments are dropped too."""
        self._state = _State.FAILED
        if isinstance(exc, OSError):
            self._error = exc
        _discard(self._fd, self._tmp_name, self.spool._tmp_fd)

    def _write_all(self, data: memoryview) -> None:
        # os.write may write less than asked (a signal, a nearly full disk): loop on
        # slices of the same view, which copy nothing.
        view = data if data.ndim == 1 and data.itemsize == 1 else data.cast("B")
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except BaseException as exc:
            self._fail(exc)
            raise


class GroupCommitter:
    """Commits writers of one spool on a background thread, a batch at a time.

    :meth:`submit` queues a writer whose data set is complete and returns a future. The
    thread blocks on a ``queue.SimpleQueue`` (C-implemented: a ``threading.Condition``
    cost the event loop ~10% of its time in ``notify`` at full rate) until writers are
    queued, takes all of them, fsyncs
    and renames each, fsyncs ``incoming/`` once, then resolves every future of the batch
    with the final path -- so no future resolves before its file's fsync, its rename
    and a directory fsync after that rename. A writer whose commit fails gets the
    ``OSError`` (see :func:`status_for_error`) and leaves no file; a failed directory
    fsync fails the whole batch and removes its files. For asyncio, wrap the future with
    ``asyncio.wrap_future``. :meth:`close` commits what is queued and stops the thread.
    """

    def __init__(self, spool: Spool, *, name: str = "spool-commit") -> None:
        self.spool = spool
        self.batches = 0  # directory fsyncs done; for metrics and tests
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders submit() against close()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __enter__(self) -> GroupCommitter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(self, writer: SpoolWriter,
               route: Router | Placement | None = None) -> concurrent.futures.Future[Placed]:
        """Queue ``writer`` (all fragments written) for commit; the future gives a
        :class:`Placed`.

        ``route`` decides the :class:`Placement` on the commit thread, once the data set
        is complete (the router's rules read it there), or is that placement, decided
        already; without one the instance goes to ``incoming/``. A writer whose write
        failed gets a future that has already failed; so does one whose ``route`` raised
        (the exception is the future's).
        """
        if writer.spool is not self.spool:
            raise ValueError(f"{writer!r} belongs to another spool than {self.spool.root}")
        future: concurrent.futures.Future[Placed] = concurrent.futures.Future()
        try:
            writer._start_commit()
        except OSError as exc:
            future.set_exception(exc)
            return future
        if route is not None and not isinstance(route, Placement):
            # The rules run in the submitter's context, so what pydicom logs while
            # they read the data set names the association (workers.logcontext).
            route = _in_context(route, contextvars.copy_context())
        with self._lock:
            if self._closing:
                writer._abandon()
                raise RuntimeError("GroupCommitter is closed")
            self._queue.put((writer, future, route))
        return future

    def close(self) -> None:
        """Commit every writer already submitted, then stop the thread. Idempotent."""
        with self._lock:
            if not self._closing:
                self._closing = True
                self._queue.put(None)  # after every job: the thread commits them first
        self._thread.join()

    def _run(self) -> None:
        while True:
            batch: list[_Job] = []
            job = self._queue.get()
            stop = job is None
            if job is not None:
                batch.append(job)
            while not stop:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                else:
                    batch.append(job)
            if batch:
                self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Job]) -> None:
        placed: list[tuple[SpoolWriter, concurrent.futures.Future[Placed], Placed]] = []
        folders: set[str] = set()
        for writer, future, route in batch:
            if not future.set_running_or_notify_cancel():
                writer._abandon()
                continue
            try:
                placement = _placement(writer, route)
                paths, touched = writer._place(placement)
            except Exception as exc:  # the future carries it; the thread must go on
                if writer._state is _State.COMMITTING:
                    writer._abandon()
                future.set_exception(exc)
                continue
            folders |= touched
            result = Placed(placement=placement, paths=paths, markers=writer.markers,
                            held=writer.tmp_path if placement.hold else None)
            if not touched:  # dropped, rejected or held: no directory to make durable
                future.set_result(result)
                continue
            placed.append((writer, future, result))
        if not placed:
            return
        try:
            for folder in sorted(folders):
                self.spool.sync_dir(folder)
        except Exception as exc:
            for _, future, result in placed:
                _take_back(result)
                future.set_exception(exc)
            return
        self.batches += 1
        for _, future, result in placed:
            future.set_result(result)


_Job = tuple[SpoolWriter, "concurrent.futures.Future[Placed]", "Router | Placement | None"]


def _in_context(route: Router, context: contextvars.Context) -> Router:
    def routed(writer: SpoolWriter, path: Path) -> Placement:
        return context.run(route, writer, path)
    return routed


def _take_back(placed: Placed) -> None:
    """A folder fsync failed: its renames and links may not be durable, and nothing
    was acknowledged, so remove the files the commit made."""
    for path in (*placed.paths, *placed.markers):
        with contextlib.suppress(OSError):
            path.unlink()


def _placement(writer: SpoolWriter, route: Router | Placement | None) -> Placement:
    if route is None:
        return INCOMING
    if isinstance(route, Placement):
        return route
    return route(writer, writer.tmp_path)


class RingCommitter:
    """Commits on the event loop's thread, the fsyncs done by the kernel through io_uring.

    Same :meth:`submit` as :class:`GroupCommitter`, and the same promise: no future
    resolves before its file's fsync, its links and rename, and a directory fsync
    that started after them. A placement already decided (a :class:`Placement`, or
    ``None`` for ``incoming/``) and without changed copies is committed here: the file's
    fsync runs in the kernel; when it completes the loop links and renames (metadata
    calls of a few microseconds), and one fsync per folder, again in the kernel, covers
    every rename made since the last pass; then the futures resolve, on the loop.
    Nothing of ours waits for the GIL. Dropped and held instances, and every instance
    of a spool without fsync, need no disk wait and are settled at once. A router
    callable (the actor leaves the rules to the commit thread for data sets over
    ``LOOP_ROUTING_MAX_BYTES`` and for C-MOVE sub-operations) or a placement with
    copies goes to ``fallback``.

    Why: see :mod:`workers.uring`; on the 8-stream C-STORE benchmark it cut the workers'
    CPU per instance by a quarter. Build with :meth:`open`, which gives the plain
    ``fallback`` where io_uring is unavailable. One event loop owns it.
    """

    def __init__(self, fallback: GroupCommitter, loop: asyncio.AbstractEventLoop,
                 ring: uring.Ring | None) -> None:
        if (ring is None) == fallback.spool.fsync:
            raise ValueError("RingCommitter: a ring exactly when the spool fsyncs")
        self.spool = fallback.spool
        self.fallback = fallback
        self._loop = loop
        self._ring = ring
        self._ids = itertools.count(1)
        # fsync of a file in flight: user data -> its job
        self._files: dict[int, _RingJob] = {}
        # fsync of a folder in flight: user data -> (folder, ticket, jobs it covers)
        self._folders: dict[int, tuple[str, int, list[_RingJob]]] = {}
        self._closing = False
        self.batches = 0  # folder fsync passes; for metrics and tests
        if ring is not None:
            loop.add_reader(ring.eventfd, self._reap)

    @classmethod
    def open(cls, fallback: GroupCommitter,
             loop: asyncio.AbstractEventLoop) -> RingCommitter | GroupCommitter:
        """A RingCommitter over ``fallback``, or ``fallback`` itself (said in the log)
        when the spool fsyncs and the kernel refuses io_uring."""
        if not fallback.spool.fsync:
            return cls(fallback, loop, None)
        try:
            ring = uring.Ring(RING_ENTRIES)
        except OSError as exc:
            log.info("spool %s: commits on a thread (io_uring unavailable: %s)",
                     fallback.spool.root, exc.strerror or exc)
            return fallback
        return cls(fallback, loop, ring)

    def submit(self, writer: SpoolWriter,
               route: Router | Placement | None = None) -> concurrent.futures.Future[Placed]:
        """As :meth:`GroupCommitter.submit`; call it on the loop's thread."""
        placement = INCOMING if route is None else route
        if self._closing or not isinstance(placement, Placement) or placement.copies:
            return self.fallback.submit(writer, route)
        if writer.spool is not self.spool:
            raise ValueError(f"{writer!r} belongs to another spool than {self.spool.root}")
        ring = self._ring if placement.links else None
        # Room for its fsync and one per folder it goes to; else the thread takes it.
        if ring is not None and ring.room < 1 + len(placement.links):
            return self.fallback.submit(writer, route)
        future: concurrent.futures.Future[Placed] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        try:
            writer._start_commit()
            if ring is None:  # nothing to wait for
                paths, _ = writer._publish(placement)
                future.set_result(Placed(placement=placement, paths=paths,
                                         markers=writer.markers,
                                         held=writer.tmp_path if placement.hold else None))
                return future
        except OSError as exc:  # the writer has cleaned up
            future.set_exception(exc)
            return future
        key = next(self._ids)
        try:
            ring.fsync([(writer._fd, key)])
        except OSError as exc:  # the kernel refused the request
            writer._abandon()
            future.set_exception(exc)
            return future
        self._files[key] = _RingJob(writer, future, placement)
        return future

    def _reap(self) -> None:
        ring = self._ring
        assert ring is not None
        renamed: dict[str, list[_RingJob]] = {}
        for key, result in ring.completions():
            # A key we do not know: a request whose submission raised (and was failed).
            job = self._files.pop(key, None)
            if job is not None:
                self._file_synced(job, result, renamed)
                continue
            synced = self._folders.pop(key, None)
            if synced is not None:
                self._folder_synced(*synced, result)
        if not renamed:
            return
        self.batches += 1
        requests = []
        for folder, jobs in renamed.items():
            key = next(self._ids)
            self._folders[key] = (folder, self.spool._dir_sync_started(folder), jobs)
            requests.append((self.spool.dir_fd(folder), key))
        try:
            ring.fsync(requests)
        except OSError:  # no room or refused: fsync them here, blocking the loop once
            for fd, key in requests:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    self._folder_synced(*self._folders.pop(key), -(exc.errno or errno.EIO))
                else:
                    self._folder_synced(*self._folders.pop(key), 0)

    def _file_synced(self, job: _RingJob, result: int,
                     renamed: dict[str, list[_RingJob]]) -> None:
        writer = job.writer
        if result < 0:
            writer._abandon()
            job.future.set_exception(OSError(-result, f"fsync of {writer.name}: "
                                             f"{os.strerror(-result)}"))
            return
        try:
            paths, touched = writer._publish(job.placement)
        except Exception as exc:
            job.future.set_exception(exc)
            return
        job.result = Placed(placement=job.placement, paths=paths, markers=writer.markers)
        job.folders = set(touched)
        for folder in touched:
            renamed.setdefault(folder, []).append(job)

    def _folder_synced(self, folder: str, ticket: int, jobs: list[_RingJob],
                       result: int) -> None:
        if result < 0:
            exc = OSError(-result, f"fsync of {folder}: {os.strerror(-result)}")
            for job in jobs:
                self._fail_placed(job, exc)
            return
        self.spool._dir_synced(folder, ticket)
        for job in jobs:
            job.folders.discard(folder)
            if not job.folders and not job.future.done():
                assert job.result is not None
                job.future.set_result(job.result)

    @staticmethod
    def _fail_placed(job: _RingJob, exc: OSError) -> None:
        """The folder's fsync failed: the renames may not be durable, take them back."""
        if job.future.done():
            return
        if job.result is not None:
            _take_back(job.result)
        job.future.set_exception(exc)

    def close(self) -> None:
        """Finish every commit in flight (blocking), then close the ring and the thread."""
        self._closing = True
        ring = self._ring
        if ring is not None and ring.fd >= 0:
            with contextlib.suppress(Exception):  # the loop may be closed already
                self._loop.remove_reader(ring.eventfd)
            poller = select.poll()
            poller.register(ring.eventfd, select.POLLIN)
            while self._files or self._folders:
                poller.poll()
                self._reap()
            ring.close()
        self.fallback.close()


@dataclass(slots=True, eq=False)
class _RingJob:
    writer: SpoolWriter
    future: concurrent.futures.Future[Placed]
    placement: Placement
    result: Placed | None = None
    folders: set[str] = field(default_factory=set)


# --- helpers ------------------------------------------------------------------


def _mint_stem() -> str:
    """A new file stem (see the module docstring): arrival time, pid, counter."""
    return f"{time.time_ns():020d}-{os.getpid()}-{next(_counter)}"


def _minter(name: str) -> int:
    """The pid in the file name ``name`` (a stem and a suffix, see _mint_stem); 0 for
    a name not of our making."""
    parts = name.split("-", 2)
    if len(parts) != 3 or not parts[1].isascii() or not parts[1].isdigit():
        return 0
    return int(parts[1])


def is_live(pid: int) -> bool:
    """Is ``pid`` (from :func:`_minter`, or a record's) a live process? 0 says no. A
    pid reused by an unrelated process says yes: its files then wait for the next
    start of the router (the supervisor's recover)."""
    if not 0 < pid < 1 << 31:  # 0 would ask about our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it lives, as another user
    return True


def _create(name: str, dir_fd: int) -> int:
    """A new file ``name`` in the folder open as ``dir_fd`` (never an existing one)."""
    return os.open(name, _CREATE_FLAGS, 0o644, dir_fd=dir_fd)


def _discard(fd: int, name: str, dir_fd: int) -> None:
    """Close and delete a temporary file, best effort: recover() gets what is left."""
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)  # before close: the lock keeps recover() off it
    with contextlib.suppress(OSError):
        os.close(fd)


def _names_fd(path: Path, fd: int) -> bool:
    """Does ``path`` still name the directory open as ``fd``? (A removed directory has
    no links; a moved or replaced one has another inode at ``path``.) Errors other
    than its absence say yes: better keep a descriptor than churn on EACCES."""
    try:
        st = os.fstat(fd)
        if not st.st_nlink:
            return False
        there = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return (st.st_dev, st.st_ino) == (there.st_dev, there.st_ino)


def _make_dirs(path: Path, *, fsync: bool) -> None:
    """mkdir -p, fsyncing the parent of each directory made so that the entry is durable."""
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue  # another process sharing the spool made it
        if fsync:
            fd = os.open(directory.parent, _DIR_FLAGS)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _meta(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    calling_ae: str,
    called_ae: str,
) -> bytes:
    """part10_meta_bytes plus Sending and Receiving AE Title (PS3.10 Table 7.1-1).

    They follow (0002,0016), the last element part10_meta_bytes writes, so they are
    appended and the group length patched.
    """
    meta = part10_meta_bytes(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=transfer_syntax,
        source_ae_title=calling_ae,  # validates it as an AE title, too
    )
    if not _is_ae_title(called_ae):
        raise LocalProtocolError(
            f"spool: called AE title must be 1-16 printable ASCII characters: {called_ae!r}")
    extra = _ae_element(0x0017, calling_ae) + _ae_element(0x0018, called_ae)
    (length,) = struct.unpack_from("<I", meta, _GROUP_LENGTH_OFFSET)
    if length != len(meta) - _META_START:
        raise AssertionError("part10_meta_bytes layout changed")  # a bug, not bad input
    return b"".join((
        meta[:_GROUP_LENGTH_OFFSET],
        struct.pack("<I", length + len(extra)),
        meta[_META_START:],
        extra,
    ))


def _is_ae_title(text: str) -> bool:
    # PS3.5 Table 6.2-1 AE, as part10_meta_bytes checks the Source AE Title.
    return (len(text.strip(" ")) > 0 and len(text) <= 16 and text.isascii()
            and text.isprintable() and "\\" not in text)


def _ae_element(element: int, ae: str) -> bytes:
    value = ae.encode("ascii")
    if len(value) & 1:
        value += b" "  # PS3.5 §6.2: AE is space-padded to even length
    return struct.pack("<HH2sH", 0x0002, element, b"AE", len(value)) + value
