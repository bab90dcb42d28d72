"""DestinationActor: delivers one destination's queue from one worker (DESIGN.md D3-D5).

Theory of operation
-------------------
Each worker runs one actor per configured destination. The actor owns an
in-memory schedule of the instances waiting in ``queue/<destination>/`` (names
only: the files are the truth, see ``workers/queue.py``) and up to ``share``
sender tasks, each with at most one outbound association
(:class:`workers.outbound.OutboundAssociation`). ``share`` is this worker's part of the
destination's ``concurrency`` (``workers.main.share_of``).

- Work arrives by :meth:`DestinationActor.enqueue` (this worker's actors, right
  after the commit that made the file), by :meth:`scan` (start-up, restart of
  another worker, ``dicom-router queue retry``) and by :meth:`send_now`
  (transparent forwarding: no queue, the inbound C-STORE waits for the answer).
  A worker whose ``share`` is 0 sends neither itself: queued files go to a
  worker that has associations for the destination (``hand_off``), and so do
  transparent sends (``relay``, answered with that worker's result), so that
  the destination never sees more than ``concurrency`` associations.
  A worker whose senders all have an instance waiting already passes new ones
  to the other workers with a share, in turn with itself (``share_with``): the
  instances of one association all arrive at one worker, and a modality's burst
  would otherwise go out over that worker's share alone.
- A sender takes the oldest due instance and *claims* it: it opens the queued
  file and takes an exclusive, non-blocking open-file-description lock
  (``F_OFD_SETLK``) on one byte of it far beyond its end, at an offset derived
  from the destination's name. The file is a hard link shared with other
  destinations' queues; each destination locks its own byte, so they never
  exclude each other, while two workers serving the same destination do:
  another worker that holds it is delivering it, so this one forgets it; an
  instance already gone (or replaced) was delivered meanwhile. The claim lives
  until the file is deleted (delivered), moved to ``dead/`` or released for a
  later retry, and the kernel drops it when the descriptor closes or the
  process dies -- so a crash re-delivers at most what was in flight (D4:
  duplicates only there). The claimed descriptor is the one the data set is
  read from. (An earlier design locked a claim file per instance: one more
  inode made and deleted per instance, which on ext4 without a journal costs
  a scan past every inode deleted in the last minute.)
- The association proposes one presentation context per (SOP class, transfer
  syntax) this actor has sent lately, the needed one included, and the data set
  goes out byte for byte as stored (D5). An instance whose pair was not proposed
  makes the sender release and open a new association.
- The destination's status (PS3.4 B.2.3): success and warning delete the file.
  A permanent failure (refused: SOP class not supported or not authorized;
  data set does not match SOP class; cannot understand; no accepted context)
  moves it to ``dead/`` at once with the reason. Any other failure, or an
  association lost or unanswered in the middle of it, retries it after an
  exponential back-off with jitter (:class:`router.config.RetryPolicy`); after
  ``attempts`` such failures it goes to ``dead/``. Out of resources (A7xx) and
  a destination that stops answering mid-store (a timeout) also make the whole
  queue wait, and count as a failure of the instance only if the destination
  took others since its last one (``_stalled``): a PACS that is full or hung
  fails every instance. An abort or a closed connection is the instance's
  failure: a destination that aborts on what it cannot parse would otherwise
  stall the queue behind it for good.
- A destination that cannot be reached (refused, timed out, association
  rejected) backs off as a whole: every sender waits, and the instances keep
  their place and count no failure, however long that lasts.
- Senders wait on an ``asyncio.Event`` whose timeout is the next timer (the
  earliest retry, the end of the back-off, the idle timeout of an open
  association): nothing polls. An association idle for ``idle`` seconds is
  released.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import heapq
import itertools
import logging
import math
import os
import random
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from router import logline
from router.config import Destination
from router.dicom import dimse, uids
from router.dicom.dataset import Part10, part10_from_meta, read_part10_header
from router.dicom.errors import DIMSEError
from workers.logcontext import serving
from workers.moves import Originator
from workers.order import sweep_destination, versions
from workers.outbound import (
    OutboundAssociation,
    OutboundError,
    instance_contexts,
    open_association,
    uid_name,
)
from workers.queue import (
    failure_record,
    failure_records,
    forget_failures,
    move_to_dead,
    note_failure,
    queue_folder,
    queued,
)
from workers.spool import Spool

__all__ = ["DestinationActor", "is_permanent_failure", "transparent_failure_status"]

# Why a queued file cannot be claimed that no retry changes (see _deliver).
_CLAIM_NEVER: Final = frozenset((errno.EACCES, errno.EPERM, errno.ELOOP, errno.EISDIR,
                                 errno.ENOTDIR, errno.ENAMETOOLONG))

log = logging.getLogger("workers.forward")

# Presentation contexts one association may carry (PS3.8 §9.3.2.2: odd IDs 1-255).
_MAX_CONTEXTS: Final = 128
#: Queued instances one actor keeps in memory; the rest wait on disk (bounded memory).
MAX_IN_MEMORY: Final = 10_000
# A write lock needs a descriptor open for writing; nothing is ever written with it.
_CLAIM_FLAGS: Final = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
# struct flock (Linux, LP64): l_type, l_whence, l_start, l_len, l_pid, padding.
_FLOCK: Final = struct.Struct("hhqqi4x")
# Claim bytes lie at 2**40 + a 40-bit hash of the destination's name: past the end
# of any instance, one per destination.
_CLAIM_BASE: Final = 1 << 40
# A back-off that ends this close to now is over (the wall clock of the record and the
# monotonic one of the schedule drift apart by a few milliseconds).
_BACK_OFF_SLACK: Final = 0.01
# A newer version of an instance whose older one another sender is delivering checks
# again after this long, doubled each time, up to _HELD_MOST (seconds).
_HELD_FIRST: Final = 0.025
_HELD_MOST: Final = 5.0
# Seconds between two sweeps of a destination's stale order markers (workers/order.py).
_SWEEP_EVERY: Final = 600.0


def claim_offset(destination: str) -> int:
    """The byte a destination's senders lock in a queued file to claim it."""
    digest = hashlib.blake2b(destination.encode(), digest_size=5).digest()
    return _CLAIM_BASE + int.from_bytes(digest, "big")


def is_permanent_failure(status: int) -> bool:
    """True for a C-STORE failure that retrying cannot cure (PS3.4 B.2.3, PS3.7 C).

    A9xx (data set does not match SOP class), Cxxx (cannot understand), 0122H
    (SOP class not supported), 0124H (not authorized), 0117H (invalid object
    instance), 0111H (duplicate SOP instance). Out of resources (A7xx),
    processing failure (0110H) and the rest may pass on a later try.
    """
    return (0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF
            or status in (dimse.SOP_CLASS_NOT_SUPPORTED, dimse.NOT_AUTHORIZED,
                          dimse.INVALID_OBJECT_INSTANCE, dimse.DUPLICATE_SOP_INSTANCE))


def transparent_failure_status() -> int:
    """What a transparently forwarded C-STORE is answered when the destination
    gives no status at all (unreachable, aborted): A700H, refused out of
    resources, which tells the sender to try again later."""
    return dimse.REFUSED_OUT_OF_RESOURCES


@dataclass(slots=True)
class _Entry:
    name: str
    failures: int = 0
    uid: str | None = None  # its SOP Instance UID, once read: for the log and dead/
    # DestinationActor.stats.delivered when it last failed for the destination's state
    # (refused for want of resources, association lost or timed out): see _stalled.
    stalled_at: int = -1
    recorded: bool = False  # it had a failure record on disk when last claimed
    waited: float = 0.0  # the record's not_before this worker has waited for
    held: int = 0  # times it waited for an older version of its instance (workers/order.py)
    marker: Path | None = None  # its order marker, found when it was claimed
    # Bound for dead/ (why, status, newer version) when the move there failed: only the
    # move is tried again. Sent again, a refused instance went out every few seconds
    # for as long as the disk stayed full.
    verdict: tuple[str, int | None, str | None] | None = None
    burials: int = 0  # moves to dead/ that failed

    @property
    def shown(self) -> str:
        """For the log: its file name, and its SOP Instance UID once read."""
        return f"{self.name} ({self.uid})" if self.uid else self.name


@dataclass(slots=True)
class _Urgent:
    """A transparent send: the inbound C-STORE waits for ``future``."""

    path: Path
    future: asyncio.Future[tuple[int, str | None]]
    originator: Originator | None = None  # a relayed C-MOVE sub-operation's requestor


@dataclass(slots=True, kw_only=True)
class ForwardStats:
    delivered: int = 0
    delivered_bytes: int = 0
    retried: int = 0
    dead: int = 0
    associations: int = 0
    # The destination's trouble since its last delivery (status, `queue ls`): the last
    # error, when the first one since came, and when the last one did (wall clock).
    # An unreachable destination keeps its queue (the instances count no failure), so
    # this is where a destination that rejects every association shows, for good.
    last_error: str = ""
    failing_since: float = 0.0
    failed_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def failed(self, reason: str, now: float) -> None:
        self.last_error, self.failed_at = reason, now
        self.failing_since = self.failing_since or now


class DestinationActor:
    """One destination's deliveries in one worker; see the module docstring."""

    def __init__(self, destination: Destination, spool: Spool, *, share: int,
                 worker_id: int = 0, fsync: bool = True,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 hand_off: Callable[[str], None] | None = None,
                 share_with: Callable[[str], bool] | None = None,
                 relay: Callable[[Path, Originator | None],
                                 Awaitable[tuple[int, str | None]]] | None = None,
                 rng: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.destination = destination
        self.spool = spool
        # 0: this worker has no association of its own for this destination: what it
        # queues goes to a worker that has (hand_off), and so do its transparent sends
        # (relay), so that the destination never sees more than its concurrency.
        self.share = max(0, share)
        self.hand_off = hand_off
        # A backlog is spread over every worker with associations for the destination
        # (True: another worker took the file), not only this one's share.
        self.share_with = share_with
        self.relay = relay
        self.worker_id = worker_id
        self.fsync = fsync
        self.on_event = on_event
        self.rng = rng
        self.clock = clock
        self.wall_clock = wall_clock  # failure records outlive the process (workers/queue.py)
        self.stats = ForwardStats()
        self._ready: deque[_Entry] = deque()
        self._delayed: list[tuple[float, int, _Entry]] = []
        self._seq = itertools.count()
        self._known: set[str] = set()
        self._urgent: deque[_Urgent] = deque()
        self._wake = asyncio.Event()
        self._senders: list[asyncio.Task[None]] = []
        self._open: set[OutboundAssociation] = set()
        self._down_failures = 0
        self._down_until = 0.0
        # Senders waiting for work with an open association, and senders opening one.
        self._parked_open = 0
        self._connecting = 0
        # Failures for the destination's state in a row (A7xx, no answer): see _stalled.
        self._stalled_failures = 0
        self._closing = False
        self._sending: dict[str, str] = {}  # sender label -> the file it is sending
        # Senders opening an association: nothing of theirs is out yet (finish).
        self._opening: dict[str, asyncio.Task[Any]] = {}
        self._overflow = False  # queued instances on disk that _known does not hold
        # (SOP class, transfer syntax) pairs sent lately, most recent last.
        self._pairs: dict[tuple[str, str], None] = {}
        # Queued names -> entries holding newer versions of the same instance, waiting
        # for them to leave the queue (workers/order.py).
        self._behind: dict[str, list[_Entry]] = {}
        self._sweep_after = 0.0  # when the queue may next be swept of stale markers
        self._claim_lock = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET,
                                       claim_offset(destination.name), 1, 0)

    # ------------------------------------------------------------------ API

    @property
    def name(self) -> str:
        return self.destination.name

    @property
    def folder(self) -> Path:
        return self.spool.root / queue_folder(self.destination.name)

    @property
    def depth(self) -> int:
        """Instances this actor knows are waiting (its own view of the queue)."""
        return len(self._known)

    def start(self) -> None:
        """A sender for each index below ``share`` that has none running (one above it,
        after a reload lowered the share, ends once its instance is answered)."""
        for index in range(self.share):
            if index < len(self._senders) and not self._senders[index].done():
                continue
            task = asyncio.get_running_loop().create_task(
                self._sender(index), name=f"forward-{self.name}-{index}")
            if index < len(self._senders):
                self._senders[index] = task
            else:
                self._senders.append(task)

    def _running(self) -> list[asyncio.Task[None]]:
        return [task for task in self._senders if not task.done()]

    def enqueue(self, name: str, *, handed: bool = False) -> None:
        """An instance was just committed to this destination's queue; ``handed``: by
        another worker, which keeps it from being passed on again."""
        if self.share == 0:
            if self.hand_off is not None:
                self.hand_off(name)
            return
        if name in self._known or self._closing:
            return
        if (not handed and self.share_with is not None and len(self._ready) >= self.share
                and self.share_with(name)):
            # Every sender here has one waiting already: one modality's burst lands on
            # one worker, and would otherwise go out over that worker's part of the
            # destination's concurrency alone while the other workers' stay idle.
            return
        if len(self._known) >= MAX_IN_MEMORY:
            # Memory stays bounded however long the destination is away: the rest
            # waits on disk and is taken up by a scan once the schedule runs low.
            self._overflow = True
            return
        self._known.add(name)
        self._ready.append(_Entry(name))
        self._wake.set()

    def scan(self) -> int:
        """Take up the files in the queue folder not known yet, oldest first, up to
        :data:`MAX_IN_MEMORY` in all; how many."""
        self._overflow = False
        if self.share == 0:
            return 0  # the workers with associations for it take up the queue
        before = len(self._known)
        failure_records(self.spool.root, self.name)  # removes those left by the dead
        for name in queued(self.spool.root, self.name):
            self.enqueue(name, handed=True)  # every worker with a share scans it too
            if self._overflow:
                break
        found = len(self._known) - before
        if found:
            log.info("destination %s: %d queued instance(s) taken up from disk%s", self.name,
                     found, " (more wait on disk)" if self._overflow else "")
        return found

    def update(self, destination: Destination, share: int) -> None:
        """A reload changed its settings: new associations use them, and one opened
        with other connection settings is released after its current instance."""
        if destination.link() != self.destination.link() and self._down_until:
            # The back-off was earned against the old address (or AE title, TLS...):
            # the operator's fix is tried now, not after up to retry.max.
            log.info("destination %s: its connection settings changed: trying it now",
                     destination.name)
            self._down_until, self._down_failures = 0.0, 0
        self.destination = destination
        had, self.share = self.share, max(0, share)
        self._wake.set()  # an idle sender holding an outdated association lets it go
        if self.share:
            # From 0 too: a worker that had no part of the concurrency had no sender,
            # and what it queued after the reload stayed queued until a restart.
            self.start()
            if not had:
                self.scan()
        # A lower share: the senders above it end once their instance is answered;
        # the last of them hands the rest on if none is left (_sender).
        else:
            # This worker sends no more: what it last saw of the destination would stay
            # in status and in dicom_router_destination_failing_seconds for ever, the
            # destination long since delivering through the others (an outside campaign).
            self.stats.last_error, self.stats.failing_since = "", 0.0

    async def send_now(self, path: Path,
                       originator: Originator | None = None) -> tuple[int, str | None]:
        """Send ``path`` at once, ahead of the queue; the destination's status
        (or A700H and why, if it gave none). For transparent forwarding: through a
        worker that has associations for the destination when this one has none.
        A relayed C-MOVE sub-operation names its requestor, ``originator``, as Move
        Originator and has its priority (workers/moves.py)."""
        if self.share == 0 and self.relay is not None:
            return await self.relay(path, originator)
        return await self.send_here(path, originator)

    async def send_here(self, path: Path,
                        originator: Originator | None = None) -> tuple[int, str | None]:
        """:meth:`send_now` over this worker's own associations."""
        future: asyncio.Future[tuple[int, str | None]] = \
            asyncio.get_running_loop().create_future()
        self._urgent.append(_Urgent(path, future, originator))
        self._wake.set()
        if not self._running():
            self.start()
        if not self._running():  # share 0 and no relay: one sender for transparent sends
            task = asyncio.get_running_loop().create_task(
                self._sender(0), name=f"forward-{self.name}-urgent")
            self._senders[:1] = [task]
        return await future

    async def finish(self, timeout: float, why: str = "the router is stopping") -> None:
        """Stop after the instances being sent: no new one is taken, each sender waits
        for the destination's answer to the one it is sending and releases its
        association. Cut off there, the destination could have an instance the router
        still holds as queued, and get it again: a duplicate on every stop. What is
        still going after ``timeout`` seconds is cut off all the same (:meth:`stop`)."""
        self._closing = True
        self._wake.set()
        for label, task in list(self._opening.items()):
            # No answer to wait for; a PACS that never answers the A-ASSOCIATE-RQ
            # would hold the stop for the whole timeout.
            log.info("destination %s: the send of %s is given up while connecting (%s); "
                     "it stays queued", self.name, self._sending.get(label, "an instance"), why)
            task.cancel()
        running = [task for task in self._senders if not task.done()]
        if running and timeout > 0:
            await asyncio.wait(running, timeout=timeout)
        await self.stop(why)

    async def stop(self, why: str = "the router is stopping") -> None:
        """Stop the senders; in-flight associations are aborted (their instances stay
        queued and are delivered by whoever scans next)."""
        self._closing = True
        self._wake.set()
        for name in sorted(self._sending.values()):
            # The destination may have it already, and gets it again when it is back
            # (at least once): the log must say why there are two.
            log.warning("destination %s: the send of %s was cut off (%s); it stays queued, "
                        "and the destination may get it twice", self.name, name, why)
        for assoc in list(self._open):
            assoc.abort(why)
        for task in self._senders:
            task.cancel()
        for task in self._senders:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for urgent in self._urgent:
            if not urgent.future.done():
                urgent.future.set_result((transparent_failure_status(), "the router is stopping"))

    # --------------------------------------------------------------- senders

    async def _sender(self, index: int) -> None:
        assoc: OutboundAssociation | None = None
        label = f"{self.name}#{self.worker_id}.{index}"
        try:
            while not self._closing and not self._surplus(index):
                job = await self._next_job(assoc, index)
                if job is None:  # idle: let the association go
                    if assoc is not None:
                        await assoc.release()
                        self._open.discard(assoc)
                        assoc = None
                    continue
                try:
                    assoc = await self._deliver(job, assoc, label)
                except Exception:
                    self._give_back(job)
                    raise
            if assoc is not None:  # finish(), or surplus: the instance sent was answered
                await assoc.release()
                self._open.discard(assoc)
                assoc = None
            if not self._closing and self.share == 0 and not [
                    t for t in self._running() if t is not asyncio.current_task()]:
                self._pass_on_all()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("destination %s: sender %d failed; restarting it", self.name, index)
            if not self._closing:
                self._senders[index] = asyncio.get_running_loop().create_task(
                    self._sender(index), name=f"forward-{self.name}-{index}")
        finally:
            if assoc is not None:
                assoc.abort("sender stopped")
                self._open.discard(assoc)

    def _surplus(self, index: int) -> bool:
        """A sender above the share a reload lowered (a destination's concurrency),
        with no transparent send waiting: it ends, so that the destination sees no
        more associations than configured."""
        return index >= self.share and not self._urgent

    def _pass_on_all(self) -> None:
        """The share went to 0 and the last sender here ended: what this worker held
        goes to the workers that send to the destination now (hand_off), their
        failure records and order markers on disk going with the files."""
        names = list(self._known)
        self._known.clear()
        self._ready.clear()
        self._delayed.clear()
        self._behind.clear()
        if names and self.hand_off is not None:
            log.info("destination %s: this worker has no part of its concurrency now; "
                     "%d queued instance(s) passed on", self.name, len(names))
            for name in names:
                self.hand_off(name)

    async def _next_job(self, assoc: OutboundAssociation | None,
                        index: int = 0) -> _Entry | _Urgent | None:
        holding = assoc is not None and assoc.is_associated
        idle_deadline = self.clock() + self.destination.idle if holding else math.inf
        if holding:
            self._parked_open += 1
        try:
            return await self._wait_job(assoc, holding, idle_deadline, index)
        finally:
            if holding:
                self._parked_open -= 1

    async def _wait_job(self, assoc: OutboundAssociation | None, holding: bool,
                        idle_deadline: float, index: int = 0) -> _Entry | _Urgent | None:
        """The next job for a sender, None to release its association (idle).

        Work goes first to a sender that holds an open association: a second one is
        opened only while the first is busy. And a held association that has nothing
        to do is let go at once when another sender is opening one: a node that
        serves one association at a time (storescp without --fork) would otherwise
        keep the newcomer in its backlog until our idle timer ran out."""
        while not self._closing:
            self._wake.clear()
            if (holding and self._connecting) or self._surplus(index):
                return None
            if (not holding and self._parked_open and (
                    self._urgent or (self._ready and self.clock() >= self._down_until))):
                # Work the sender holding an association takes at once: let it.
                self._wake.set()
                await asyncio.sleep(0)
                continue
            if self._urgent:
                return self._urgent.popleft()
            now = self.clock()
            deadlines = [idle_deadline]
            if now < self._down_until:
                deadlines.append(self._down_until)
            else:
                while self._delayed and self._delayed[0][0] <= now:
                    self._ready.append(heapq.heappop(self._delayed)[2])
                if not self._ready and self._overflow and len(self._known) < MAX_IN_MEMORY // 2:
                    self.scan()
                if self._ready:
                    return self._ready.popleft()
                if self._delayed:
                    deadlines.append(self._delayed[0][0])
            deadline = min(deadlines)
            if deadline <= now:
                if deadline == idle_deadline:
                    return None
                continue
            timeout = None if deadline == math.inf else deadline - now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            if assoc is not None and (not assoc.is_associated
                                      or assoc.link != self.destination.link()):
                return None  # gone, or opened with what a reload has changed since
        return None

    async def _deliver(self, job: _Entry | _Urgent, assoc: OutboundAssociation | None,
                       label: str) -> OutboundAssociation | None:
        """Send one instance; the association to go on with (None if it is gone)."""
        urgent = job if isinstance(job, _Urgent) else None
        entry = job if isinstance(job, _Entry) else None
        fd = -1  # our claim on a queued file; each outcome below takes it over
        if entry is not None:
            path = self.folder / entry.name
            try:
                fd = self._claim(path)
            except OSError as exc:
                # A file the router may not open for writing, or not a file it can
                # open at all (a link: ELOOP under O_NOFOLLOW; a folder), which no
                # retry will change. Anything else is this machine's trouble of the
                # moment (EMFILE, EROFS, EIO), not the instance's nor the destination's:
                # retried, not counted. It once went to dead/ as "permanent", never
                # sent, whenever the move to dead/ did not fail the same way.
                mine = exc.errno in _CLAIM_NEVER
                self._failed(entry, None, -1, f"cannot claim the queued file: {exc}", None,
                             permanent=mine, counted=mine)
                return assoc
            if fd < 0:
                # Another sender has it (or it is gone): what waits for it checks
                # again shortly, since this worker will not see it end.
                self._left(entry.name, later=True)
                return assoc
            if entry.verdict is not None:
                self._bury(entry, fd, *entry.verdict)
                return assoc
            if self._not_yet(entry):
                self._unclaim(path, fd)
                return assoc
            source = fd  # the data set is read from the claimed descriptor
        else:
            assert urgent is not None
            path = urgent.path
            try:
                source = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                self._failed(None, urgent, -1, f"cannot read the instance: {exc}", None,
                             permanent=True)
                return assoc
        # pydicom's lines meanwhile (converting it, say) name what is being sent.
        who = f"destination {self.name}, {path.name}"
        serving.set(lambda: who)  # this sender task's own context: no reset needed
        self._sending[label] = path.name  # until this ends, one way or another (stop)
        try:
            try:
                part10 = _identity(source, path)
                if entry is not None:
                    entry.uid = part10.sop_instance_uid
            except (DIMSEError, OSError) as exc:
                fd, claim = -1, fd
                self._failed(entry, urgent, claim, f"cannot read the queued file: {exc}",
                             None, permanent=True)
                return assoc
            # Never ahead of an older version of the instance (workers/order.py).
            found = versions(self.spool.root, self.name, path.name, part10.sop_instance_uid)
            if entry is not None:
                entry.marker = found.own
                if found.older is not None:
                    self._hold_behind(entry, found.older)
                    return assoc  # the finally ends our claim
            elif found.older is not None:
                # A transparent send or a relayed sub-operation: its sender is told to
                # try again (A700H) once the queued version has gone.
                self._failed(None, urgent, -1, f"an older version is queued for {self.name}",
                             None, permanent=False)
                return assoc
            pair = (part10.sop_class_uid, part10.transfer_syntax)
            if assoc is None or not assoc.is_associated or pair not in assoc.offered \
                    or assoc.link != self.destination.link():
                if assoc is not None:
                    await assoc.release()
                    self._open.discard(assoc)
                    assoc = None
                try:
                    assoc = await self._associate(pair, label)
                except OutboundError as exc:
                    self._unreachable(exc)
                    fd, claim = -1, fd
                    self._put_back(entry, urgent, claim, str(exc))
                    return None
            ctx = assoc.context_to_send(*pair)
            if ctx is None:
                reason = (f"{self.destination} accepts no presentation context for "
                          f"{uid_name(pair[0])} in {uid_name(pair[1])}")
                if not uids.is_uncompressed(pair[1]):
                    reason += " (the router does not decompress)"
                elif pair[1] != uids.IMPLICIT_VR_LITTLE_ENDIAN:
                    reason += " nor in Explicit or Implicit VR Little Endian"
                fd, claim = -1, fd
                # A transparent sender must not be told to try again (A700H): it never
                # will get through. 0122H if the destination said it does not support
                # the SOP class (PS3.7 Annex C), else C000H, cannot understand (PS3.4
                # B.2.3): not in a syntax the router can send it in.
                # The Error Comment holds 64 characters (LO): the long reason is logged.
                unsendable = ((dimse.SOP_CLASS_NOT_SUPPORTED,
                               f"{self.name} does not support this SOP class")
                              if assoc.refuses_sop_class(pair[0]) else
                              (dimse.CANNOT_UNDERSTAND,
                               f"{self.name} takes it in no syntax the router can send"))
                self._failed(entry, urgent, claim, reason, None, permanent=True,
                             answer=unsendable)
                return assoc
            started = self.clock()
            try:
                rsp = await assoc.store(path, part10, ctx, fd=source,
                                        originator=None if urgent is None else urgent.originator)
            except DIMSEError as exc:  # it cannot be converted: nothing was sent
                fd, claim = -1, fd
                self._failed(entry, urgent, claim, str(exc), None, permanent=True,
                             answer=(dimse.CANNOT_UNDERSTAND, str(exc)))
                return assoc
            except (OutboundError, OSError) as exc:
                self._open.discard(assoc)
                assoc.abort("delivery failed")
                fd, claim = -1, fd
                if not isinstance(exc, OutboundError):  # a file we cannot read: for good
                    self._failed(entry, urgent, claim, str(exc), None, permanent=True)
                    return None
                # The destination stopped answering or taking data (a hung PACS): its
                # state more than the instance's, as for A7xx. An abort or a closed
                # connection counts as the instance's failure: a destination that
                # aborts on one instance (it cannot parse it) must not stall the
                # queue behind it, and such an instance ends in dead/.
                counted = entry is None or not exc.stalled or self._stalled(entry, str(exc))
                self._failed(entry, urgent, claim, str(exc), None, permanent=False,
                             counted=counted)
                return None
            except Exception as exc:
                # Our own failure on this instance (pydicom failing where no one
                # foresaw: a conversion once raised outside its guard). Given back, it
                # failed again at once, for ever, each time leaving an association open
                # until the destination refused more (an outside campaign): the
                # association is aborted and the instance kept in dead/, saying why.
                log.exception("destination %s: sending %s failed", self.name, path.name)
                self._open.discard(assoc)
                assoc.abort("internal error")
                fd, claim = -1, fd
                why = f"internal error: {type(exc).__name__}: {logline.first_line(exc)[:200]}"
                self._failed(entry, urgent, claim, why, None, permanent=True)
                return None
            fd, claim = -1, fd
            self._answered(entry, urgent, claim, path, part10, rsp, self.clock() - started)
            return assoc
        finally:
            self._sending.pop(label, None)
            self._unclaim(path, fd)
            if urgent is not None:
                os.close(source)

    async def _associate(self, pair: tuple[str, str], label: str) -> OutboundAssociation:
        self._pairs.pop(pair, None)
        self._pairs[pair] = None
        while len(self._pairs) > _MAX_CONTEXTS:
            del self._pairs[next(iter(self._pairs))]
        d = self.destination
        # An instance is sent as stored when the destination takes its syntax; a native
        # one may also go in the two every node takes (converted: see context_to_send).
        contexts = instance_contexts(list(self._pairs), _MAX_CONTEXTS)
        self._connecting += 1
        self._wake.set()  # an idle sender holding an association lets it go (_wait_job)
        task = asyncio.current_task()
        assert task is not None
        self._opening[label] = task
        try:
            assoc = await open_association(d, contexts, label=label)
        finally:
            self._connecting -= 1
            self._opening.pop(label, None)
        self._open.add(assoc)
        self.stats.associations += 1
        if self._down_failures:
            log.info("destination %s is reachable again", d)
        self._down_failures = 0
        self._down_until = 0.0
        return assoc

    # ------------------------------------------------------------- outcomes

    def _claim(self, path: Path) -> int:
        """Claim a queued file for this sender: a locked descriptor to read it from, or
        -1 (another worker is delivering it, or it is gone). See the module's notes."""
        try:
            fd = os.open(path, _CLAIM_FLAGS)
        except FileNotFoundError:
            return -1  # delivered, or moved to dead/, meanwhile
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, self._claim_lock)
            # Still the queued file? A claim that ended (delivered, moved) between our
            # open and our lock left us a descriptor of a file no longer queued.
            st, now = os.fstat(fd), os.stat(path, follow_symlinks=False)
            if (st.st_ino, st.st_dev) == (now.st_ino, now.st_dev):
                return fd
        except (BlockingIOError, PermissionError, FileNotFoundError):
            pass  # EAGAIN/EACCES: locked by another worker's sender
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return -1

    def _not_yet(self, entry: _Entry) -> bool:
        """Read the failure record of ``entry``, just claimed (workers/queue.py): its
        attempts are the record's, whoever made them -- none once it is gone, as after
        a ``queue retry`` -- and while its back-off runs (another worker of the spool
        failed it lately, see note_failure) it goes back to wait: True."""
        record = failure_record(self.spool.root, self.name, entry.name)
        if record is None:
            # Gone since this worker saw it: retried from dead/, fresh attempts. (Never
            # written -- a spool that takes no record -- the count here stands.)
            if entry.recorded:
                entry.failures, entry.recorded = 0, False
            return False
        entry.recorded, entry.failures = True, record.failures
        if record.not_before == entry.waited:
            return False  # waited for once: a wall clock that lags must not hold it again
        # At most the longest back-off: a wall clock set back must not hold it for hours.
        wait = min(record.not_before - self.wall_clock(), self.destination.retry.max)
        entry.waited = record.not_before
        if wait <= _BACK_OFF_SLACK:
            return False
        self._wait(entry, wait)
        return True

    def _unclaim(self, path: Path, fd: int) -> None:
        """End a claim: closing the descriptor drops its lock."""
        if fd >= 0:
            os.close(fd)

    def _answered(self, entry: _Entry | None, urgent: _Urgent | None, fd: int, path: Path,
                  part10: Part10, rsp: dimse.CStoreRSP, took: float) -> None:
        status = int(rsp.status)
        category = dimse.status_category(status)
        ok = category in (dimse.StatusCategory.SUCCESS, dimse.StatusCategory.WARNING)
        # A transparent send or a move's sub-operation goes from the file it is
        # being received into: its name (a .part or a recycled .spare) says nothing.
        # A warning (B000H, 0107H: attributes coerced or dropped) is delivered, but
        # not as sent: a WARNING line, where an operator looks.
        log.log(logging.INFO if category is dimse.StatusCategory.SUCCESS else logging.WARNING,
                "forward %s: %s %s status 0x%04X in %.0f ms%s", self.name,
                part10.sop_instance_uid, "as received" if urgent else path.name, status,
                took * 1000, f" ({rsp.error_comment})" if rsp.error_comment else "")
        if urgent is not None:
            if not urgent.future.done():
                urgent.future.set_result((status, rsp.error_comment))
            if ok:
                self._count_delivered(path, part10, status)
            return
        assert entry is not None
        if ok:
            with contextlib.suppress(FileNotFoundError):
                # Still holding the claim (see _claim); the file may live on as a spare.
                self.spool.retire(queue_folder(self.name), entry.name, fd,
                                  marker=entry.marker)
            self._unclaim(path, fd)
            self._left(entry.name)
            if entry.recorded:  # only the claim's holder writes records: it is current
                forget_failures(self.spool.root, self.name, entry.name)
            self._count_delivered(path, part10, status)
            return
        permanent = is_permanent_failure(status)
        comment = f" ({rsp.error_comment})" if rsp.error_comment else ""
        reason = f"{self.destination} answered status 0x{status:04X}{comment}"
        counted = True
        if 0xA700 <= status <= 0xA7FF:
            counted = self._stalled(entry, reason)
        self._failed(entry, None, fd, reason, status, permanent=permanent, counted=counted)

    def _stalled(self, entry: _Entry, reason: str) -> bool:
        """A delivery failed for the state of the destination more than of the
        instance: refused out of resources (A7xx, PS3.4 B.2.3: a full disk), or no
        answer mid-store within the destination's timeout (a PACS that hangs).
        The whole queue waits, with the back-off of an unreachable destination; and
        the failure counts towards the instance's attempts only if the destination
        took others since its last one -- else a PACS full over a weekend, or hung
        until someone restarts it, would turn its queue into dead letters in an hour
        (20 attempts), while an instance that fails alone still ends there."""
        self._stalled_failures += 1
        delay = self.destination.retry.delay(self._stalled_failures, self.rng())
        self._down_until = max(self._down_until, self.clock() + delay)
        log.warning("destination %s: %s; its queue (%d waiting) waits %.1f s", self.destination,
                    reason, len(self._known), delay)
        counted = entry.stalled_at >= 0 and self.stats.delivered > entry.stalled_at
        entry.stalled_at = self.stats.delivered
        return counted

    def _count_delivered(self, path: Path, part10: Part10, status: int) -> None:
        self.stats.delivered += 1
        self.stats.last_error, self.stats.failing_since = "", 0.0
        self._stalled_failures = 0
        self._emit("instance.forwarded", destination=self.name,
                   sop_instance_uid=part10.sop_instance_uid, status=status)

    def _failed(self, entry: _Entry | None, urgent: _Urgent | None, fd: int, reason: str,
                status: int | None, *, permanent: bool, counted: bool = True,
                answer: tuple[int, str] | None = None) -> None:
        """A delivery failed: ``status`` is the destination's, if it gave one;
        ``answer`` the status and comment a transparent sender gets when it did not
        (else A700H and ``reason``)."""
        self.stats.failed(reason, self.wall_clock())
        if urgent is not None:
            if status is None:
                log.warning("forward %s: %s not sent: %s", self.name, urgent.path.name, reason)
            if not urgent.future.done():
                urgent.future.set_result(
                    (status, reason) if status is not None
                    else answer or (transparent_failure_status(), reason))
            return
        assert entry is not None
        retry = self.destination.retry
        failures = entry.failures + counted
        delay = retry.delay(max(failures, 1), self.rng())
        # Failures further apart than the longest back-off (twice, for the jitter and
        # a queue that waited) and the time a store may take: the instance was not
        # being tried in between, and that time does not count as failing.
        record = note_failure(self.spool.root, self.name, entry.name, counted=counted,
                              reason=reason, now=self.wall_clock(), retry_in=delay,
                              max_gap=2 * retry.max + self.destination.timeout)
        entry.recorded = record.written
        entry.failures = record.failures if record.written else failures
        entry.waited = record.not_before  # this worker's schedule waits for it below
        attempts = retry.attempts
        failing_for = record.failing
        expired = failing_for >= retry.give_up_after
        # A newer version of the instance waits behind this one (workers/order.py): it
        # is what the destination must end with, so this one, which failed, gives way
        # (kept in dead/) rather than hold the correction back for all its retries.
        newer = None if permanent or entry.uid is None or entry.marker is None else \
            versions(self.spool.root, self.name, entry.name, entry.uid).newer
        if permanent or newer is not None or entry.failures >= attempts or expired:
            why = (reason if permanent
                   else f"{reason}; superseded by {newer}, a newer version of the "
                        f"instance, queued behind it" if newer is not None
                   else f"{reason}; gave up after {entry.failures} attempts"
                   if entry.failures >= attempts
                   else f"{reason}; gave up: failing for {logline.duration(failing_for)} "
                        f"(retry.give_up_after)")
            self._bury(entry, fd, why, status, newer)
            return
        self.stats.retried += 1
        log.warning("forward %s: %s failed (%s); %s in %.1f s", self.name, entry.shown,
                    reason, f"retry {entry.failures} of {attempts - 1}" if counted else
                    "not counted (the destination takes nothing now): retry", delay)
        self._unclaim(self.folder / entry.name, fd)
        self._wait(entry, delay)
        self._emit("instance.retry", destination=self.name, name=entry.name, reason=reason)

    def _bury(self, entry: _Entry, fd: int, why: str, status: int | None,
              newer: str | None) -> None:
        """Move ``entry``, claimed as ``fd``, to dead/ for ``why``. If that fails (a
        full or read-only disk) it stays queued with its verdict, and the move alone
        is tried again after a back-off: forgetting it would strand it until a
        restart, and sending it again would repeat what the destination refused."""
        try:
            move_to_dead(self.spool.root, self.name, entry.name, reason=why, status=status,
                         attempts=entry.failures, fsync=self.fsync,
                         sop_instance_uid=entry.uid, superseded_by=newer)
        except FileNotFoundError:
            pass
        except OSError as exc:
            entry.verdict = (why, status, newer)
            entry.burials += 1
            delay = self.destination.retry.delay(entry.burials, self.rng())
            log.error("forward %s: %s: cannot move it to dead/ (%s); it stays queued, "
                      "not sent again, and the move is tried again in %.1f s: %s", self.name,
                      entry.shown, exc, delay, why)
            self._unclaim(self.folder / entry.name, fd)
            self._wait(entry, delay)
            return
        else:
            self.stats.dead += 1
            log.warning("forward %s: %s moved to dead/%s: %s", self.name, entry.shown,
                        self.name, why)
            self._emit("instance.dead", destination=self.name, name=entry.name, reason=why)
        self._unclaim(self.folder / entry.name, fd)
        self._left(entry.name)

    def _hold_behind(self, entry: _Entry, older: str) -> None:
        """``entry`` holds a newer version of an instance than the queued file
        ``older`` (workers/order.py): it waits until this worker has seen ``older``
        leave the queue, and ``older`` is taken up first if this worker did not
        have it yet (another worker received it)."""
        entry.held += 1
        log.log(logging.INFO if entry.held == 1 else logging.DEBUG,
                "forward %s: %s waits for %s, an older version of the instance, to be "
                "delivered first", self.name, entry.shown, older)
        self._behind.setdefault(older, []).append(entry)
        if older not in self._known:
            self._known.add(older)
            self._ready.appendleft(_Entry(older))
            self._wake.set()

    def _left(self, name: str, *, later: bool = False) -> None:
        """``name`` left this worker's schedule: forgotten, and what waited for it
        goes again -- at once if it left the queue, or (``later``) after a short wait
        that grows when another sender has it, since its end will not be seen here."""
        self._known.discard(name)
        for entry in self._behind.pop(name, ()):
            if later:
                self._wait(entry, min(_HELD_FIRST * 2 ** min(entry.held, 16), _HELD_MOST))
            else:
                self._ready.appendleft(entry)
                self._wake.set()
        if not self._known and self.clock() >= self._sweep_after:
            # Markers of files that left the queue otherwise (removed by hand, a
            # crash) keep their data on disk: gone once the queue has run dry.
            self._sweep_after = self.clock() + _SWEEP_EVERY
            if swept := sweep_destination(self.spool.root, self.name):
                log.info("destination %s: %d stale order marker(s) removed", self.name,
                         swept)

    def _give_back(self, job: _Entry | _Urgent) -> None:
        """A delivery failed in a way nothing foresaw (its sender restarts): the
        instance is tried again after the back-off -- it stayed in ``_known``, so no
        scan would take it up again -- and a transparent sender is told to retry."""
        if isinstance(job, _Urgent):
            if not job.future.done():
                job.future.set_result((transparent_failure_status(),
                                       "the router failed to send it"))
        else:
            self._wait(job, self.destination.retry.delay(max(job.failures, 1), self.rng()))

    def _wait(self, entry: _Entry, delay: float) -> None:
        """Schedule ``entry`` to be taken up again ``delay`` seconds from now."""
        heapq.heappush(self._delayed, (self.clock() + delay, next(self._seq), entry))

    def _put_back(self, entry: _Entry | None, urgent: _Urgent | None, fd: int,
                  reason: str) -> None:
        """Not attempted (the destination is unreachable): same place, no failure."""
        if urgent is not None:
            if not urgent.future.done():
                urgent.future.set_result((transparent_failure_status(), reason))
            return
        assert entry is not None
        self._unclaim(self.folder / entry.name, fd)
        self._ready.appendleft(entry)

    def _unreachable(self, exc: OutboundError) -> None:
        self._down_failures += 1
        delay = self.destination.retry.delay(self._down_failures, self.rng())
        self._down_until = self.clock() + delay
        self.stats.failed(str(exc), self.wall_clock())
        log.warning("destination %s: %s; %d waiting, next try in %.1f s", self.destination,
                    exc, len(self._known), delay)

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, fields)


def _identity(fd: int, path: Path) -> Part10:
    """SOP class, instance, transfer syntax and data set offset of a queued file (open
    as ``fd``): from the file meta the spool wrote (a 2 KiB read), else by reading its
    data set."""
    return part10_from_meta(os.pread(fd, 2048, 0)) or read_part10_header(path)

