"""The main process: listener and supervisor (DESIGN.md D2; gunicorn's arbiter shape).

Theory of operation
-------------------
One thread, one ``zmq.Poller`` over: the listening sockets, the workers'
control ROUTER, the broadcast XPUB, the admin ROUTER, and a wake-up socket
that signal handlers write to (``signal.set_wakeup_fd``). The poll timeout is
the nearest timer (heartbeat check, respawn back-off, drain deadline): nothing
sleeps and nothing polls on a clock.

- Listener: a readable listening socket is accepted until EAGAIN; each
  connection goes to the ready worker with the fewest open associations (its
  last heartbeat's, plus the hand-offs it had not read from its channel when it
  sent that heartbeat), over that worker's AF_UNIX channel
  (router.fdpass). A busy or dead channel means the next worker; with none,
  the connection is closed and the log says why. DICOM bytes are never read here.
- Workers are clean interpreters (``python -m workers.main``) holding one
  channel end. They load the configuration snapshot the supervisor checked
  (router/snapshot.py), never the files, which may have been edited since. A
  worker that exits is respawned, with exponential back-off when it keeps dying
  young; one whose heartbeats stop is killed (SIGKILL) and respawned; one that
  exits with BOOT_ERROR stops the router (its config can never work, so
  respawning would only spin).
- Signals only enqueue (gunicorn): SIGTERM/SIGINT drain (stop accepting,
  broadcast Drain, wait for the workers up to the grace period, then SIGKILL
  what is left, exit 0), and a second one while draining stops now (Stop:
  open associations aborted, forwards cut off); SIGHUP reloads (a config that fails validation is
  refused with one log line and the running one stays); SIGCHLD reaps.
- Admin: ``status`` answers a table of workers over the admin socket.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import zmq

import router
from router import control
from router.config import Config, ConfigError, as_reloaded, default_spool_dir
from router.fdpass import ChannelBusy, ChannelClosed, HandoffError, channel_pair, send_connection
from router.notify import Notifier, service_manager_variables
from router.snapshot import Snapshot, prune, snapshot_path
from router.tls import expiry_problem
from rules import RuleError, RuleSet
from workers import order
from workers.queue import queued_counts
from workers.spool import Spool

log = logging.getLogger("router.supervisor")

BOOT_ERROR = 3  # workers.main.BOOT_ERROR
_RESPAWN_MIN, _RESPAWN_MAX = 0.1, 30.0
# What the status counts per worker slot (see WorkerSlot.count).
_COUNTS: Final = ("served", "stored", "failed", "forwarded")
_STABLE_AFTER = 10.0  # a worker that lived this long resets the back-off
_MAX_WAITING = 1024  # connections held while no worker takes them (see _watch)
_RUN_DIR_CHECK = 5.0  # seconds between looks for a removed run folder
_STALL_FORGIVEN = 1.0  # seconds the loop may wake late before it counts as its own stall


@dataclass(slots=True)
class WorkerSlot:
    """What the supervisor knows of worker N (the slot outlives each process)."""

    worker_id: int
    proc: subprocess.Popen[bytes] | None = None
    channel: socket.socket | None = None
    started: float = 0.0
    ready: bool = False
    last_heartbeat: float = 0.0
    open_associations: int = 0  # as of its last heartbeat
    # Connections handed to this process, and those it had read from its channel at
    # its last heartbeat: the difference is still in the channel, or was when the
    # heartbeat left. Resetting a count on each heartbeat instead would forget the
    # ones handed off just before a heartbeat that left before they were read, and
    # send the next connection to a worker that already has it waiting.
    handed_off: int = 0
    handoffs_taken: int = 0
    rss: int = 0
    cpu_percent: float = 0.0
    restarts: int = 0
    backoff: float = _RESPAWN_MIN
    respawn_at: float | None = None
    # Counts since the worker process started, from its heartbeats, and those of the
    # processes that held this slot before it (a restart must not lose them).
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTS, 0))
    earlier: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTS, 0))
    queued: int = 0
    # Destinations failing in this worker: name -> (last error, since, last failure).
    failing: dict[str, tuple[str, float, float]] = field(default_factory=dict)

    def count(self, key: str) -> int:
        """``key`` of :data:`_COUNTS` since the router started."""
        return self.earlier[key] + self.totals[key]

    def retire(self) -> None:
        """Its process is gone: keep what it counted."""
        for key in _COUNTS:
            self.earlier[key] += self.totals[key]
        self.totals = dict.fromkeys(_COUNTS, 0)
        self.queued = 0
        self.failing = {}

    @property
    def load(self) -> int:
        return self.open_associations + self.handed_off - self.handoffs_taken

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Supervisor:
    def __init__(self, config: Config, *, config_path: Path | None,
                 overrides: dict[str, object], snapshot: Snapshot,
                 rules: RuleSet | None = None) -> None:
        self.config = config
        # What workers load (router/snapshot.py): the texts this config came from.
        self.snapshot = snapshot
        self.rules = rules  # as loaded with it, for the start-up line (say_rules)
        self.config_path = config_path
        self.overrides = overrides
        self.generation = 1
        # What the last accepted reload did not change until a restart (see _reload).
        self.reload_warning: str | None = None
        self.run_dir = config.spool / "run"
        self.slots = [WorkerSlot(worker_id=i) for i in range(1, config.workers + 1)]
        self.listeners: list[socket.socket] = []
        # Ports whose listeners are TLS ones (the worker makes the handshake).
        self.tls_ports: set[int] = set()
        self.signals: deque[int] = deque()
        self.draining_until: float | None = None
        self.stopping_now = False  # a second SIGTERM/SIGINT came while draining
        self.exit_code = 0
        self.connection_ids = 0
        self.started = time.monotonic()
        # Connections accepted while no worker is ready (start-up, all workers
        # restarting): handed off as soon as one says hello, closed past a bound.
        self.waiting: deque[tuple[socket.socket, tuple[Any, ...], int, float]] = deque()
        self._turn_started = time.monotonic()  # when the loop last came out of its poll
        self._spool_lock = -1  # see _lock_spool
        self._run_dir_checked = 0.0  # see _restore_run_dir
        self.announced_ready = False
        # While connections wait: the channels watched for room (POLLOUT), the
        # listeners not polled (a full hold leaves newcomers in the kernel's backlog),
        # and the workers whose channel was full (said once per episode).
        self.watched: set[socket.socket] = set()
        self.accepting = True
        self.busy_workers: set[int] = set()
        # systemd's Type=notify and WatchdogSec= (router/notify.py); inert elsewhere.
        self.notifier = Notifier.from_environment()
        self.watchdog_at: float | None = None

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        self._install_signals()  # first: a SIGHUP or SIGTERM now waits for the loop
        log.info("dicom-router: %s", self.config.describe())
        if self.rules is not None:
            say_rules(self.config, self.rules)
        self._check_certificates()
        try:
            if not self._lock_spool():
                # Not 2: the other router may be on its way out (a restart), and a
                # service manager should try again.
                return 1
            raise_open_files_limit()
            report = Spool(self.config.spool, fsync=self.config.fsync).recover()
        except OSError as exc:
            # Not 2 either: a disk not mounted yet at boot is worth retrying; a folder
            # it may not write is said once a restart, in this one line.
            log.error("spool %s: cannot use it: %s (set [spool] path to a folder this "
                      "user may write)", self.config.spool, exc.strerror or exc)
            return 1
        stale = order.sweep(self.config.spool)
        if stale:
            log.info("spool %s: %d stale order marker(s) removed (their instances had left "
                     "the queue)", self.config.spool, stale)
        queues = {dest: n for dest, n in queued_counts(self.config.spool).items() if n}
        log.info("spool %s: %d instance(s) queued for delivery%s, %d received and not yet "
                 "routed, %d partial instance(s) discarded (never acknowledged), %d spare "
                 "file(s) deleted", self.config.spool, sum(queues.values()),
                 f" ({', '.join(f'{d}: {n}' for d, n in sorted(queues.items()))})"
                 if queues else "", report.completed, report.removed_temporary,
                 report.removed_spares)
        configured = {d.name for d in self.config.destinations}
        for dest, count in sorted(queues.items()):
            if dest not in configured:
                # A destination renamed or removed from the file: nothing would ever
                # say that its instances wait there for nobody.
                log.warning("spool %s: %d instance(s) queued for destination %s, which is "
                            "not configured: they wait there until it is again",
                            self.config.spool, count, dest)
        self.ctx = zmq.Context()
        self.sockets = control.bind_supervisor(self.ctx, self.run_dir,
                                               admin_path=self.config.admin_socket)
        prune(self.run_dir, keep=None)  # a previous run's
        self.snapshot.write(self.run_dir, self.generation)
        try:
            self._listen()
        except OSError as exc:
            log.error("cannot listen: %s", exc)
            self._close()
            # Not 2 (a configuration the router refuses): the port may be free in a
            # moment (a previous instance still closing, an address not up yet at
            # boot), and a service manager should try again, which it does not on 2.
            return 1
        for slot in self.slots:
            self._spawn(slot)
        self.notifier.status(f"starting {len(self.slots)} workers")
        if self.notifier.watchdog_interval is not None:
            self.watchdog_at = time.monotonic()
        try:
            self._loop()
        finally:
            self._close()
        return self.exit_code

    def _lock_spool(self) -> bool:
        """Take the spool for this router alone: False if another router has it.

        Two routers on one spool wreck each other: the second deleted the first's
        spare files, bound its control sockets over the first's (status, reload and
        heartbeats of restarted workers then went to the wrong supervisor), and each
        delivered the other's queues (an outside campaign ran one by hand beside the
        systemd unit). An flock on the spool folder itself, not on a file in it that
        a clean-up could remove; released by the kernel however this process ends,
        and not inherited by the workers (close-on-exec)."""
        spool = self.config.spool
        default = spool == default_spool_dir()
        if not default and not spool.exists() and not spool.parent.exists():
            # A spool on a disk not mounted yet: made with its parents, it took
            # instances onto the root file system, hidden once the disk mounted over
            # them (an outside campaign). The router makes the spool folder only.
            raise OSError(errno.ENOENT, f"its parent folder {spool.parent} does not exist "
                                        "(a disk not mounted yet?)")
        spool.mkdir(parents=default, exist_ok=True)
        fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            log.error("spool %s is in use by another dicom-router: two routers must "
                      "not share a spool (give this one its own [spool] path)",
                      self.config.spool)
            return False
        except OSError as exc:  # ENOLCK: a filesystem without flock (some NFS mounts)
            os.close(fd)
            log.warning("spool %s cannot be locked (%s): nothing stops a second router "
                        "on it", self.config.spool, exc.strerror or exc)
            return True
        if self._spool_lock >= 0:
            os.close(self._spool_lock)
        self._spool_lock = fd  # held until the process ends
        return True

    def _spool_relocked(self) -> bool:
        """The spool folder was removed and made again (see _restore_run_dir): the
        lock is on the folder that is gone, and a second router would lock the new
        one unopposed. Lock the new one; False if another router has it already."""
        if self._spool_lock < 0:
            return True
        try:
            held, now = os.fstat(self._spool_lock), os.stat(self.config.spool)
        except OSError:
            return True  # gone right now: the next look takes it again
        if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
            return True
        log.warning("spool %s was made again under the running router: locking it "
                    "again", self.config.spool)
        return self._lock_spool()

    def _listen(self) -> None:
        for spec in self.config.listen:
            sock = socket.create_server((spec.host, spec.port), backlog=1024,
                                        reuse_port=False)
            sock.setblocking(False)
            self.listeners.append(sock)
            host, port = sock.getsockname()[:2]
            if spec.tls:
                self.tls_ports.add(port)
            log.info("listening on %s:%d%s%s", host, port, " (TLS)" if spec.tls else "",
                     " (PROXY protocol)" if spec.proxy_protocol else "")

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        if router.held_signals:  # arrived while starting (router/__init__.py)
            self.signals.extend(router.held_signals)
            router.held_signals.clear()
            self._wake_w.send(b"\0")

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signals.append(signum)  # only enqueue; the loop handles it

    def _loop(self) -> None:
        self.poller = poller = zmq.Poller()
        for sock in self.listeners:
            poller.register(sock, zmq.POLLIN)
        poller.register(self.sockets.control, zmq.POLLIN)
        poller.register(self.sockets.broadcast, zmq.POLLIN)
        poller.register(self.sockets.admin, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while True:
            timeout = self._next_timer()
            try:
                wait_ms = None if timeout is None else int(max(timeout, 0) * 1000) + 1
                due = None if timeout is None else time.monotonic() + max(timeout, 0)
                ready = dict(poller.poll(wait_ms))
            except zmq.ZMQError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if due is not None:
                self._forgive_own_stall(time.monotonic() - due)
            self._turn_started = time.monotonic()
            # zmq.Poller reports plain sockets by file number.
            if self._wake_r.fileno() in ready:
                with contextlib.suppress(BlockingIOError):
                    while self._wake_r.recv(512):
                        pass
            self._handle_signals()
            self._reap()
            if self.waiting and any(ch.fileno() in ready for ch in self.watched):
                self._retry_waiting()
            for sock in list(self.listeners):
                if sock.fileno() in ready:
                    self._accept(sock)
            if self.sockets.control in ready:
                self._worker_messages()
            if self.sockets.broadcast in ready:
                with contextlib.suppress(zmq.Again):
                    while True:
                        self.sockets.broadcast.recv(zmq.NOBLOCK)
            if self.sockets.admin in ready:
                with contextlib.suppress(zmq.Again):
                    while True:
                        control.answer_admin(self.sockets.admin, self._admin)
            if self._timers():
                return

    # -------------------------------------------------------------- timers

    def _next_timer(self) -> float | None:
        now = time.monotonic()
        deadlines = [s.respawn_at for s in self.slots if s.respawn_at is not None]
        if self.watchdog_at is not None:
            deadlines.append(self.watchdog_at)
        deadlines += [s.last_heartbeat + self.config.heartbeat_timeout for s in self.slots
                      if s.proc is not None]
        if self.draining_until is not None:
            deadlines.append(self.draining_until)
        if self.waiting:
            deadlines.append(self.waiting[0][3] + self.config.artim_timeout)
        return min(deadlines) - now if deadlines else None

    def _forgive_own_stall(self, late: float) -> None:
        """The poll came back ``late`` seconds after it was due: the supervisor itself
        did not run meanwhile (SIGSTOP, a VM paused or migrated, heavy swapping). The
        workers did, and their heartbeats wait unread: that time is not held against
        them. It was, and on SIGCONT every healthy worker was killed for "no heartbeat
        for 13 s", its associations aborted (an outside campaign)."""
        if late < _STALL_FORGIVEN:
            return
        # It did not run for at least ``late``, maybe since long before: what it has
        # not read proves nothing against the workers, who get a fresh start.
        log.warning("the supervisor did not run for %.1f s or more (stopped, or the "
                    "machine stalled): worker heartbeats are judged afresh from now", late)
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is not None:
                slot.last_heartbeat = max(slot.last_heartbeat, now)

    def _timers(self) -> bool:
        """Run what is due; True when the supervisor should exit."""
        now = time.monotonic()
        # Stopped while handling what the poll returned, not in the poll itself.
        self._forgive_own_stall(now - self._turn_started)
        self._turn_started = now
        if now >= self._run_dir_checked + _RUN_DIR_CHECK:
            self._run_dir_checked = now
            self._restore_run_dir()
        if self.watchdog_at is not None and now >= self.watchdog_at:
            # From the loop itself, draining included: a loop that stops turning
            # stops the pings, and systemd restarts the router.
            self.notifier.watchdog()
            self.watchdog_at = now + (self.notifier.watchdog_interval or 0.0)
        expired = 0
        while self.waiting and now >= self.waiting[0][3] + self.config.artim_timeout:
            conn, peer, _, _ = self.waiting.popleft()
            if not expired:
                log.error("no worker took the connection from %s:%s in %.0f s; closing "
                          "it", *peer[:2], self.config.artim_timeout)
            expired += 1
            conn.close()
        if expired:
            if expired > 1:
                log.error("... and %d more held as long", expired - 1)
            self._watch()
        if self.draining_until is not None:
            alive = [s for s in self.slots if s.proc is not None]
            if not alive:
                log.info("all workers stopped; exiting")
                return True
            if now >= self.draining_until:
                for slot in alive:
                    log.warning("worker %d (pid %s) still running after the grace period: "
                                "SIGKILL", slot.worker_id, slot.pid)
                    self._kill(slot)
                self.draining_until = now + 5.0
            return False
        for slot in self.slots:
            if slot.respawn_at is not None and now >= slot.respawn_at:
                slot.respawn_at = None
                self._spawn(slot)
            elif slot.proc is not None and now > slot.last_heartbeat + \
                    self.config.heartbeat_timeout:
                log.error("worker %d (pid %s) sent no heartbeat for %.0f s: killing it",
                          slot.worker_id, slot.pid, now - slot.last_heartbeat)
                self._kill(slot)
                slot.last_heartbeat = now  # the reaper takes it from here
        return False

    # ------------------------------------------------------------- workers

    def _restore_run_dir(self) -> None:
        """Put back ``<spool>/run/`` if something removed it under the running router
        (a clean-up job, an rm -rf of the spool): its sockets, which status, reload
        and restarted workers connect to, and the configuration snapshot a worker
        starts from. Without them a worker that died was replaced by one that could
        not start ("cannot read config-1.msgpack"), and the router stopped with exit
        code 2, which systemd does not restart (an outside campaign)."""
        snapshot = snapshot_path(self.run_dir, self.generation)
        if not snapshot.exists():
            log.warning("%s was removed under the running router: making it again",
                        self.run_dir)
            try:
                self.sockets.rebind()
                self.snapshot.write(self.run_dir, self.generation)
            except (OSError, zmq.ZMQError) as exc:
                log.error("cannot make %s again: %s", self.run_dir, exc)
        if not self._spool_relocked():
            log.error("another dicom-router took spool %s while it was being made "
                      "again: stop one of them", self.config.spool)

    def _spawn(self, slot: WorkerSlot) -> None:
        self._restore_run_dir()
        sup_end, worker_end = channel_pair()
        fd = worker_end.fileno()
        argv = [sys.executable, "-m", "workers.main", "--worker-id", str(slot.worker_id),
                "--channel-fd", str(fd), "--run-dir", str(self.run_dir),
                "--spool", str(self.config.spool),
                "--snapshot", str(snapshot_path(self.run_dir, self.generation))]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
        for name in service_manager_variables:  # the supervisor speaks for the router
            env.pop(name, None)
        slot.proc = subprocess.Popen(argv, pass_fds=[fd], env=env)
        worker_end.close()
        slot.channel = sup_end
        slot.started = slot.last_heartbeat = time.monotonic()
        slot.ready = False
        slot.open_associations = slot.handed_off = slot.handoffs_taken = 0
        log.info("worker %d started (pid %d)", slot.worker_id, slot.proc.pid)

    def _kill(self, slot: WorkerSlot) -> None:
        if slot.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(signal.SIGKILL)

    def _reap(self) -> None:
        for slot in self.slots:
            proc = slot.proc
            if proc is None or proc.poll() is None:
                continue
            code = proc.returncode
            lived = time.monotonic() - slot.started
            slot.proc = None
            slot.ready = False
            slot.retire()
            if slot.channel is not None:
                if slot.channel in self.watched:
                    self.poller.unregister(slot.channel)
                    self.watched.discard(slot.channel)
                slot.channel.close()
                slot.channel = None
            self._tell_workers(control.WorkerGone(worker_id=slot.worker_id))
            if self.draining_until is not None:
                log.info("worker %d (pid %d) exited with %s", slot.worker_id, proc.pid, code)
                continue
            if code == BOOT_ERROR:
                log.error("worker %d cannot start with this configuration; stopping the "
                          "router", slot.worker_id)
                self.exit_code = 2
                self._drain(0.0)
                continue
            slot.restarts += 1
            slot.backoff = _RESPAWN_MIN if lived > _STABLE_AFTER else min(
                slot.backoff * 2, _RESPAWN_MAX)
            slot.respawn_at = time.monotonic() + slot.backoff
            log.error("worker %d (pid %d) died (%s) after %.1f s; restarting in %.1f s",
                      slot.worker_id, proc.pid, _describe_exit(code), lived, slot.backoff)
            self.notifier.status(self._status_line())

    def _worker_messages(self) -> None:
        while True:
            try:
                identity, message = control.recv_routed(self.sockets.control, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except control.ControlError as exc:
                log.warning("bad message from a worker: %s", exc)
                continue
            slot = self._slot_for(identity)
            if slot is None:
                continue
            if isinstance(message, control.Hello):
                slot.ready = True
                slot.last_heartbeat = time.monotonic()
                control.send_message(self.sockets.control, control.Reply.success(
                    {"generation": self.generation}), identity=identity)
                log.info("worker %d ready (pid %d)", slot.worker_id, message.pid)
                self._tell_workers(control.WorkerReady(worker_id=slot.worker_id))
                if not self.announced_ready and all(s.ready for s in self.slots):
                    self.announced_ready = True
                    log.info("ready: %d workers serving", len(self.slots))
                    self.notifier.ready(self._status_line())
                elif self.draining_until is None:
                    self.notifier.status(self._status_line())
                self._retry_waiting()
            elif isinstance(message, control.Heartbeat):
                self._heartbeat(slot, message)
            elif isinstance(message, control.AssociationClosed | control.InstanceStored):
                pass  # counted in the heartbeats, which are exact

    @staticmethod
    def _heartbeat(slot: WorkerSlot, message: control.Heartbeat) -> None:
        if message.pid and message.pid != slot.pid:
            return  # its dead predecessor's, left unread in the queue
        slot.last_heartbeat = time.monotonic()
        slot.open_associations = message.open_associations
        # More than it was given: a heartbeat its dead predecessor left in the queue.
        slot.handoffs_taken = min(message.handoffs_taken, slot.handed_off)
        slot.rss, slot.cpu_percent = message.rss, message.cpu_percent
        slot.totals = {"served": message.served_total, "stored": message.instances_stored,
                       "failed": message.instances_failed,
                       "forwarded": message.instances_forwarded}
        slot.queued = message.queued
        slot.failing = {
            name: (value[0], float(value[1]), float(value[2]))
            for name, value in message.failing.items()
            if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)
            and all(isinstance(v, int | float) for v in value[1:])}

    def _slot_for(self, identity: bytes) -> WorkerSlot | None:
        for slot in self.slots:
            if control.worker_identity(slot.worker_id) == identity:
                return slot
        return None

    # ------------------------------------------------------------- accept

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            self._hand_off(conn, peer, listener.getsockname()[1])
            if not self.accepting:
                return

    def _hand_off(self, conn: socket.socket, peer: tuple[Any, ...], local_port: int) -> None:
        if not self.waiting and self._try_hand_off(conn, peer, local_port):
            return
        if any(s.proc is not None for s in self.slots):
            # Workers are starting, or their channels are full (a burst of
            # connections): it waits in our hands, after those already waiting, until
            # a hello or room in a channel (the peer sees a slow association set-up,
            # not a refusal).
            self.waiting.append((conn, peer, local_port, time.monotonic()))
            self._watch()
            return
        log.error("no worker ready for the connection from %s:%s; closing it", *peer[:2])
        conn.close()

    def _try_hand_off(self, conn: socket.socket, peer: tuple[Any, ...],
                      local_port: int) -> bool:
        """Pass ``conn`` to the least loaded worker that takes it; False if none did."""
        candidates = sorted((s for s in self.slots if s.ready and s.channel is not None),
                            key=lambda s: s.load)
        self.connection_ids += 1
        header = {"connection_id": self.connection_ids, "peer": [str(peer[0]), int(peer[1])],
                  "local_port": local_port, "tls": local_port in self.tls_ports}
        for slot in candidates:
            assert slot.channel is not None
            try:
                send_connection(slot.channel, conn, header)
            except (ChannelBusy, ChannelClosed) as exc:
                if slot.worker_id not in self.busy_workers:  # once per episode
                    self.busy_workers.add(slot.worker_id)
                    log.warning("worker %d cannot take connections for now (%s)",
                                slot.worker_id, exc)
                continue
            except HandoffError as exc:
                log.error("hand-off to worker %d failed: %s", slot.worker_id, exc)
                continue
            if slot.worker_id in self.busy_workers:
                self.busy_workers.discard(slot.worker_id)
                log.info("worker %d takes connections again", slot.worker_id)
            slot.handed_off += 1
            return True
        return False

    def _retry_waiting(self) -> None:
        """Hand off the connections held, oldest first, while a worker takes them."""
        while self.waiting:
            conn, peer, local_port, _ = self.waiting[0]
            if not self._try_hand_off(conn, peer, local_port):
                break
            self.waiting.popleft()
        self._watch()

    def _watch(self) -> None:
        """Poll the ready workers' channels for room while connections are held, and
        stop accepting while the hold is full: what arrives then waits in the
        listen backlog, where TCP keeps it, instead of being closed here."""
        wanted = {s.channel for s in self.slots if s.ready and s.channel is not None} \
            if self.waiting else set()
        for channel in self.watched - wanted:
            self.poller.unregister(channel)
        for channel in wanted - self.watched:
            self.poller.register(channel, zmq.POLLOUT)
        self.watched = wanted
        full = len(self.waiting) >= _MAX_WAITING
        if full and self.accepting:
            log.warning("%d connections waiting for a worker: not accepting more until "
                        "they are handed off", len(self.waiting))
            for sock in self.listeners:
                self.poller.unregister(sock)
        elif not full and not self.accepting:
            for sock in self.listeners:
                self.poller.register(sock, zmq.POLLIN)
        self.accepting = not full

    # ------------------------------------------------------------ signals

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self.draining_until is None:
                    self._drain(self.config.drain_grace)
                else:
                    self._stop_now(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                self._reload()
            # SIGCHLD: _reap runs after every wake-up.

    def _drain(self, grace: float) -> None:
        if self.draining_until is not None:
            return
        log.info("draining: no new associations; open ones get %.0f s", grace)
        self.notifier.stopping(f"draining: open associations get {grace:.0f} s")
        for sock in self.listeners:
            self.poller.unregister(sock)
            sock.close()
        self.listeners = []
        for slot in self.slots:
            slot.respawn_at = None
        self._tell_workers(control.Drain(grace=grace))
        self.draining_until = time.monotonic() + grace + control.DRAIN_KILL_AFTER

    def _stop_now(self, signal_name: str) -> None:
        """A second SIGTERM or SIGINT while draining: the operator will not wait for the
        grace period. Workers abort their open associations and cut off their forwards
        (nothing acknowledged is lost: it is in the spool); what still runs after
        DRAIN_KILL_AFTER is killed. Said, where it was ignored without a word."""
        if self.stopping_now:
            log.warning("%s again: already stopping; workers still running are killed "
                        "within %.0f s", signal_name, control.DRAIN_KILL_AFTER)
            return
        self.stopping_now = True
        log.warning("%s while draining: stopping now: open associations are aborted "
                    "and forwards cut off", signal_name)
        self._tell_workers(control.Stop())
        if self.draining_until is not None:
            self.draining_until = min(self.draining_until,
                                      time.monotonic() + control.DRAIN_KILL_AFTER)

    def _tell_workers(self, message: control.Message) -> None:
        """Send to every live worker over its own control connection.

        Not the broadcast socket: a worker that just said hello may not have its
        subscription in place yet (PUB/SUB's slow joiner) and would miss it; the
        DEALER it said hello on is connected, so this always arrives.
        """
        for slot in self.slots:
            if slot.proc is not None:
                with contextlib.suppress(zmq.ZMQError):
                    control.send_message(self.sockets.control, message,
                                         identity=control.worker_identity(slot.worker_id),
                                         flags=zmq.NOBLOCK)

    def _reload(self) -> str | None:
        """Load the configuration file again; the reason it was refused, or None
        (``reload_warning`` then says what it does not change until a restart)."""
        self.reload_warning = None
        serving = self.announced_ready and self.draining_until is None
        if serving:
            self.notifier.reloading()
        try:
            snapshot, config, ruleset = Snapshot.read(self.config_path,
                                                      overrides=self.overrides)
        except (ConfigError, RuleError) as exc:
            return self._reload_refused(" / ".join(str(exc).splitlines()), serving)
        except Exception as exc:
            # A reload must never take the running router down: a parser failing in a
            # way nobody foresaw (a RecursionError once) is a refused reload too.
            return self._reload_refused(f"cannot read the configuration: "
                                        f"{type(exc).__name__}: {exc}", serving)
        # The spool holds the queue, the lock and the admin socket: moved under a
        # running router, every operator command (status, reload, queue) looked in the
        # new place and found no router, while it went on in the old one.
        for what, old, new in (("[spool] path", self.config.spool, config.spool),
                               ("admin_socket", self.config.admin_socket,
                                config.admin_socket)):
            if old != new:
                return self._reload_refused(
                    f"{what} changed from {old} to {new}: it moves with a restart only "
                    f"(the running router's queue and control socket are in {old})",
                    serving)
        # The sockets and the workers stay as they are; the workers take new TLS
        # certificates and proxy_from, though (router/config.py as_reloaded).
        config, restart_only = as_reloaded(config, self.config)
        snapshot = snapshot.reloaded(self.snapshot)
        if restart_only:
            self.reload_warning = (f"{' and '.join(restart_only)} changed: they take effect "
                                   "at the next restart")
            log.warning("reload: %s", self.reload_warning)
        try:
            written = snapshot.write(self.run_dir, self.generation + 1)
        except OSError as exc:
            return self._reload_refused(
                f"cannot write {snapshot_path(self.run_dir, self.generation + 1)}: {exc}",
                serving)
        if config.log_level != self.config.log_level:
            # At WARNING, so that the log going quiet (or loud) says why.
            log.warning("reload: log level %s, was %s", config.log_level, self.config.log_level)
            logging.getLogger().setLevel(config.log_level)  # workers set theirs on Reload
        self.config, self.snapshot = config, snapshot
        self.generation += 1
        prune(self.run_dir, keep=self.generation - 1)
        self._tell_workers(control.Reload(generation=self.generation, snapshot=str(written)))
        self._check_certificates()
        say_rules(config, ruleset)
        log.info("configuration generation %d loaded from %s", self.generation,
                 config.source)
        if serving:
            self.notifier.ready(self._status_line())
        return None

    def _check_certificates(self) -> None:
        """Say which of our certificates (listeners', destinations' client ones) have
        expired, are not valid yet or expire soon."""
        ours = [(f"port {listen.port}", listen.tls_cert) for listen in self.config.listen]
        ours += [(f"destination {d.name}", d.tls_cert) for d in self.config.destinations]
        for where, cert in ours:
            if cert is not None and (problem := expiry_problem(cert)) is not None:
                log.warning("TLS certificate of %s: %s", where, problem)

    def _reload_refused(self, why: str, serving: bool) -> str:
        """Say a reload was refused (log, and systemd's STATUS=); the reply's reason."""
        log.error("reload refused, the running configuration stays: %s", why)
        if serving:
            self.notifier.ready(f"{self._status_line()}; last reload refused: {why}")
        return f"refused, the running configuration stays: {why}"

    def _failing(self) -> dict[str, dict[str, object]]:
        """Destinations failing since their last delivery, over the workers: since the
        earliest failure, with the latest error."""
        merged: dict[str, tuple[str, float, float]] = {}
        for slot in self.slots:
            for name, (error, since, at) in slot.failing.items():
                seen = merged.get(name)
                merged[name] = (error, since, at) if seen is None else (
                    error if at > seen[2] else seen[0], min(since, seen[1]), max(at, seen[2]))
        return {name: {"error": error, "since": since, "at": at}
                for name, (error, since, at) in merged.items()}

    def _status_line(self) -> str:
        """What ``systemctl status`` shows (STATUS=)."""
        ready = sum(s.ready for s in self.slots)
        where = ", ".join(":".join(map(str, sock.getsockname()[:2]))
                          for sock in self.listeners) or "no address (draining)"
        return (f"{ready} of {len(self.slots)} workers serving on {where}; "
                f"configuration generation {self.generation}")

    # -------------------------------------------------------------- admin

    def _admin(self, command: control.Command) -> control.Reply:
        if command.name == "status":
            now = time.monotonic()
            workers = [{
                "worker_id": s.worker_id, "pid": s.pid or 0, "ready": s.ready,
                "uptime": round(now - s.started, 1) if s.proc else 0.0,
                "open_associations": s.open_associations, "rss": s.rss,
                "cpu_percent": s.cpu_percent, "served_total": s.count("served"),
                "restarts": s.restarts, "instances_stored": s.count("stored"),
                "instances_failed": s.count("failed"),
                "instances_forwarded": s.count("forwarded"), "queued": s.queued,
            } for s in self.slots]
            return control.Reply.success({
                "pid": os.getpid(), "uptime": round(now - self.started, 1),
                "generation": self.generation, "config": self.config.source,
                "spool": str(self.config.spool), "draining": self.draining_until is not None,
                "workers": workers, "failing": self._failing()})
        if command.name == "reload":
            # Said to the caller too: `dicom-router reload` (systemctl reload, kubectl
            # exec) must not report success for a file the router refused.
            refused = self._reload()
            if refused is not None:
                return control.Reply.failure(refused)
            return control.Reply.success({"generation": self.generation,
                                          "warning": self.reload_warning})
        if command.name == "rescan":
            self._tell_workers(control.Rescan())
            return control.Reply.success({})
        return control.Reply.failure(f"unknown command {command.name!r}")

    # -------------------------------------------------------------- close

    def _close(self) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                self._kill(slot)
                slot.proc.wait()
            if slot.channel is not None:
                slot.channel.close()
        for sock in self.listeners:
            sock.close()
        for conn, *_ in self.waiting:
            conn.close()
        self.sockets.close()
        self.ctx.term()
        self.notifier.close()


def say_rules(config: Config, ruleset: RuleSet) -> None:
    """How many rules route instances, at start and reload; a warning when a rules
    path holds none (a folder of *.tml files, an empty file): the router started and
    every instance went to unrouted/ without a word (an outside campaign)."""
    if config.rules is None:
        return  # no [routing] rules: README's "every instance is kept" by design
    store = sum(1 for rule in ruleset.rules if not rule.routes_queries)
    if store:
        log.info("rules: %d routing instances, %d query/retrieve, from %s", store,
                 len(ruleset.rules) - store, config.rules)
        return
    fate = "is kept in <spool>/unrouted/" if config.unmatched == "keep" else \
        "is refused (unmatched = \"reject\")"
    log.warning("rules: %s holds no rule routing instances (a folder reads *.toml files "
                "only): every instance %s", config.rules, fate)


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def raise_open_files_limit() -> None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (workers inherit it),
    saying so in the log.

    Why: every association holds a socket and a spool file, every forwarder its
    outbound sockets. systemd starts services with a soft limit of 1024 (hard 524288)
    and a worker past its soft limit cannot even receive the next connection's
    descriptor from the listener: the kernel drops it and the modality sees the
    connection close with no A-ASSOCIATE-RJ. The hard limit is the administrator's
    bound; the soft one is only a default for programs that use select().
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if resource.RLIM_INFINITY in (soft, hard) or soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("open files limit stays %d (cannot raise it to %d: %s)", soft, hard, exc)
        return
    log.info("open files limit raised from %d to %d", soft, hard)
