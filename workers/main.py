"""A worker process: one event loop serving the associations handed to it (D2, D3).

    python -m workers.main --worker-id N --channel-fd FD --run-dir DIR [--config FILE] [--spool DIR]

Theory of operation
-------------------
The supervisor spawns this as a clean interpreter with one end of an AF_UNIX
SEQPACKET channel (``--channel-fd``). Each datagram on it carries one accepted
TCP connection (router.fdpass); the worker wraps it with
``loop.connect_accepted_socket`` and an :class:`~workers.actor.AssociationActor`
runs it. Everything else (hello, heartbeats with load, association and
instance events; reload, drain and stop from the supervisor) travels over
ZeroMQ (router.control), in a context this process creates itself.

End of file on the channel means the supervisor is gone: the worker stops
taking connections, lets the open associations finish (drain grace), and
exits. A configuration it cannot load exits with :data:`BOOT_ERROR`, which
tells the supervisor to stop respawning (gunicorn's WORKER_BOOT_ERROR).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import psutil
import zmq
import zmq.asyncio

from router import control, logline
from router.config import Config, ConfigError, Listen
from router.dicom import dimse, uids
from router.fdpass import BadHandoff, adopt_channel, recv_connection
from router.proxy_protocol import ProxyProtocolError, read_proxy_header
from router.snapshot import Snapshot, SnapshotError
from router.tls import server_context
from rules import RuleError, RuleSet
from rules.conditions import peer_address
from workers.actor import (
    ActorSettings,
    AssociationActor,
    new_receive_buffer,
)
from workers.forward import DestinationActor, transparent_failure_status
from workers.logcontext import LibraryLogFilter
from workers.moves import Originator
from workers.nservices import sweep_commitments
from workers.qr import FIND_MODELS, GET_MODELS, MOVE_MODELS
from workers.routing import Dispatcher, InstanceRouter
from workers.spool import QUEUE_DIR, TMP_DIR, GroupCommitter, RingCommitter, Spool

log = logging.getLogger("workers.main")

BOOT_ERROR = 3
# After the grace period, the instances being forwarded get this long for their
# answers (workers/forward.py DestinationActor.finish): inside the supervisor's
# wait before SIGKILL, with time left to exit.
FINISH_SENDS = control.DRAIN_KILL_AFTER - 2.0
# Seconds between two sweeps of the spool's records (Worker._sweep).
SWEEP_EVERY = 3600.0
# Spool files made ahead per step while idle (Worker._stock): a few ms of the loop at most.
STOCK_STEP = 16
# Seconds without an association before files are made ahead. Studies arrive as bursts
# of associations (a series each, back to back) spread over both workers: a worker
# whose association just closed is usually between two of them, and making files then
# competes for the cores with the other worker's traffic (measured on the 8-stream
# benchmark: 768 inodes made by one worker during the other's last streams).
STOCK_AFTER_IDLE = 1.0


def _aio(sock: Any) -> zmq.asyncio.Socket:
    """The sockets of a zmq.asyncio context are awaitable (router.control types
    them as plain sockets, being shared with synchronous callers)."""
    assert isinstance(sock, zmq.asyncio.Socket)
    return sock


def share_of(config: Config, concurrency: int, worker_id: int) -> int:
    """This worker's part of a destination's ``concurrency`` outbound associations.

    The total is honoured exactly: with 2 workers, concurrency 3 gives 2 + 1 and
    concurrency 1 gives 1 + 0. A worker with no part hands the instances it queues to
    one that has (workers 1 to ``concurrency``, see :meth:`Worker._hand_off`).
    """
    base, extra = divmod(concurrency, config.workers)
    return base + (1 if worker_id <= extra else 0)


def settings_for(config: Config, worker_id: int, rules: RuleSet | None = None) -> ActorSettings:
    policy = config.to_acceptor_policy()
    if rules is not None and policy.abstract_syntaxes is not None:
        # Query and retrieve rules make this node a C-FIND / C-MOVE SCP for those
        # models (D7); an identifier is small, so the two little endian syntaxes are
        # all it needs.
        native = (uids.EXPLICIT_VR_LITTLE_ENDIAN, uids.IMPLICIT_VR_LITTLE_ENDIAN)
        models = ((FIND_MODELS if rules.has_query_rules else ())
                  + (MOVE_MODELS + GET_MODELS if rules.has_retrieve_rules else ())
                  + ((uids.MODALITY_PERFORMED_PROCEDURE_STEP,) if config.mpps else ())
                  + ((uids.STORAGE_COMMITMENT_PUSH_MODEL,) if config.storage_commitment
                     else ()))
        if models:
            policy = dataclasses.replace(policy, abstract_syntaxes={
                **policy.abstract_syntaxes, **dict.fromkeys(models, native)})
    return ActorSettings(policy=policy, artim_timeout=config.artim_timeout,
                         idle_timeout=config.idle_timeout, worker_id=worker_id,
                         operation_timeout=config.operation_timeout,
                         # The listener gives each connection to the least loaded
                         # worker, so equal shares bound the router's total.
                         max_associations=-(-config.max_associations // config.workers))


class Worker:
    """The worker's state: its actors, its spool, its line to the supervisor."""

    def __init__(self, config: Config, *, worker_id: int, channel_fd: int, run_dir: Path,
                 overrides: dict[str, object], rules: RuleSet | None = None) -> None:
        self.config = config
        self.rules = rules if rules is not None else RuleSet.empty()
        self.forwarders: dict[str, DestinationActor] = {}
        self.dispatcher: Dispatcher | None = None
        self.worker_id = worker_id
        self.overrides = overrides
        self.channel = adopt_channel(channel_fd)
        self.channel.setblocking(False)
        self.run_dir = run_dir
        self.settings = settings_for(config, worker_id, self.rules)
        self.spool = Spool(config.spool, fsync=config.fsync)
        self.committer: GroupCommitter | RingCommitter  # made in run(), on the loop
        self.actors: set[AssociationActor] = set()
        self.receive_buffer = new_receive_buffer()  # shared by this worker's actors
        self.served = 0
        # Hand-offs read from the channel (good or bad), and those among them whose
        # actor is not made yet: the heartbeat reports both, so the supervisor never
        # sees a connection it handed us as neither pending nor open (_heartbeat).
        self.handoffs_taken = 0
        self.adopting = 0
        self._figures_failed = False  # psutil failed at the last heartbeat (logged once)
        self.exit_code = 0
        self.spooled_bytes = 0
        self.instances_stored = 0
        self.instances_failed = 0
        # Relays in flight: our temporary actor id -> who asked (see _worker_actor).
        self.relays: dict[str, control.ActorAddress] = {}
        self.relay_ids = 0
        # Transparent sends another worker makes for us (see _send_elsewhere): our
        # temporary actor id -> (that worker, the answer).
        self.sends_elsewhere: dict[str, tuple[int, asyncio.Future[tuple[int, str | None]]]] = {}
        self.hand_offs = 0
        self.shares_out = 0  # files of a backlog passed on (_share_with), for the turn
        # Workers the supervisor said died (WorkerGone) and has not said are back
        # (WorkerReady): what is sent to them waits in ZeroMQ for their replacement.
        self.gone: set[int] = set()
        # Server TLS contexts by listener port: loaded at start and at each reload
        # (_load_tls), so a file replaced on disk takes effect with a reload only.
        self.tls_contexts: dict[int, ssl.SSLContext] = {}
        # Lines about connections that never became associations, which anyone who
        # can connect can cause at will: a few per address a minute, then counted.
        self.log_budget = logline.Throttle()
        # Destinations removed by a reload: their actors while they stop, and what
        # the stopped ones delivered.
        self.retiring: set[DestinationActor] = set()
        self.forwarded_earlier = 0
        self.generation = 0
        self.stopping = False
        self.stopping_now = False  # a second SIGTERM/SIGINT, or a Stop while draining
        self.stop_signals = 0
        self.finish_by = 0.0  # draining: when the forwards still going are cut off
        self.swept_at = -math.inf  # the first heartbeat sweeps
        self.stock_failed: str | None = None  # why making spool files ahead fails
        self.restocking: asyncio.Task[None] | None = None
        self.restock_timer: asyncio.TimerHandle | None = None
        self.idle_since = time.monotonic()
        self.process = psutil.Process()
        self.process.cpu_percent()  # prime: the next call measures since now
        self.started = time.monotonic()

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.committer = RingCommitter.open(GroupCommitter(self.spool), self.loop)
        self.done = asyncio.Event()
        self.ctx = zmq.asyncio.Context()
        endpoints = control.Endpoints.for_run_dir(str(self.run_dir),
                                                  admin_path=self.config.admin_socket)
        self.sockets = control.connect_worker(self.ctx, endpoints, self.worker_id)
        await self._send(control.Hello(worker_id=self.worker_id, pid=os.getpid(),
                                       generation=self.generation))
        self._start_forwarders()
        self._load_tls()
        self.loop.add_reader(self.channel.fileno(), self._on_handoff)
        try:
            # What a worker that died left in tmp/ (partial files, its spares): after
            # the hello, so that a replacement serves without waiting for this.
            self.spool.recover(dead_only=True)
        except OSError as exc:
            log.error("worker %d: spool %s: %s", self.worker_id, self.spool.root, exc)
        self._restock()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_stop_signal, sig)
        tasks = [asyncio.create_task(self._heartbeats()),
                 asyncio.create_task(self._receive(self.sockets.broadcast, "broadcast",
                                                   self._from_supervisor)),
                 asyncio.create_task(self._receive(self.sockets.control,
                                                   "message from the supervisor",
                                                   self._on_direct)),
                 asyncio.create_task(self._receive(self.sockets.inbox, "actor message",
                                                   self._on_inbox))]
        for task in tasks:
            task.add_done_callback(self._essential_ended)
        await self.done.wait()
        self._say_held(everything=True)
        direct = tasks[2]  # the supervisor's own line: a Stop may still come (_stop_now)
        for task in tasks:
            if task is not direct:
                task.cancel()
        # The instances being forwarded get their answers, within the grace period
        # (and a little after, before the supervisor's SIGKILL): see finish().
        left = max(0.0, self.finish_by - time.monotonic()) if self.stopping else 0.0
        await asyncio.gather(*(forwarder.finish(left)
                               for forwarder in self.forwarders.values()))
        direct.cancel()
        self.committer.close()
        try:
            self.spool.discard_spares()
        except OSError as exc:
            log.warning("worker %d: spool %s: cannot delete its spare files in tmp/: %s",
                        self.worker_id, self.spool.root, exc)
        self.sockets.close()
        self.ctx.term()
        return self.exit_code

    def _essential_ended(self, task: asyncio.Task[None]) -> None:
        """The heartbeat and the receivers run until the worker stops. One that
        fails leaves a worker the supervisor would kill only at the heartbeat
        timeout, without saying why: say it, and exit for a replacement now."""
        if task.cancelled() or self.done.is_set():
            return
        exc = task.exception()
        log.critical("worker %d: %s ended: %s; exiting to be replaced", self.worker_id,
                     task.get_coro().__qualname__,  # type: ignore[union-attr]
                     f"{type(exc).__name__}: {exc}" if exc else "returned")
        self.exit_code = 1
        self.done.set()

    # ----------------------------------------------------------- forwarding

    def _start_forwarders(self) -> None:
        """One DestinationActor per destination; each takes up its queue on disk."""
        wanted = {d.name: d for d in self.config.destinations}
        for name in list(self.forwarders):
            if name not in wanted:
                forwarder = self.forwarders.pop(name)
                log.warning("worker %d: destination %s removed; %d queued instance(s) stay "
                            "in its queue folder", self.worker_id, name, forwarder.depth)
                self.retiring.add(forwarder)
                self.loop.create_task(self._retire(forwarder))
        for name, destination in wanted.items():
            share = share_of(self.config, destination.concurrency, self.worker_id)
            if name in self.forwarders:
                self.forwarders[name].update(destination, share)
                continue
            forwarder = DestinationActor(destination, self.spool, share=share,
                                         worker_id=self.worker_id, fsync=self.config.fsync,
                                         on_event=self._forward_event,
                                         hand_off=functools.partial(self._hand_off, name),
                                         share_with=functools.partial(self._share_with, name),
                                         relay=functools.partial(self._send_elsewhere, name))
            self.forwarders[name] = forwarder
            forwarder.start()
            forwarder.scan()
        self.dispatcher = Dispatcher(InstanceRouter(self.config, self.rules), self.forwarders)

    async def _retire(self, forwarder: DestinationActor) -> None:
        """Stop a removed destination's actor; what it delivered stays counted: the
        "fwd" total of status went back to 0 when a reload renamed a destination."""
        try:
            await forwarder.finish(forwarder.destination.timeout,
                                   "destination removed by a reload")
        finally:
            self.retiring.discard(forwarder)
            self.forwarded_earlier += forwarder.stats.delivered

    def _forwarded(self) -> int:
        """Instances this worker delivered since it started, to any destination."""
        return self.forwarded_earlier + sum(
            f.stats.delivered for f in (*self.forwarders.values(), *self.retiring))

    def _forward_event(self, kind: str, fields: dict[str, Any]) -> None:
        pass  # counted in each DestinationActor's stats; logged there

    def _hand_off(self, destination: str, name: str) -> None:
        """A destination this worker has no association for (its ``concurrency`` is
        less than the workers): tell a worker that has one about the new queue file,
        by actor message (D2). If that worker is away, the file waits in the queue
        and its replacement takes it up when it scans at start."""
        # With every sender dead, the message waits for a replacement; that one
        # scans the queue at start too, so either way the file is taken up.
        self._send_enqueue(self._senders_of(destination) or 1, destination, name)

    def _share_with(self, destination: str, name: str) -> bool:
        """A backlog of ``destination`` here: the workers with associations for it
        take the new file in turn, this one included (True: another one took it).
        Each takes the part sent to it, not the whole backlog, so they all finish
        about together; a file sent to a worker that dies is taken up from the queue
        folder by its replacement's scan at start."""
        senders = self._sending_workers(destination)
        if senders < 2:
            return False
        self.shares_out += 1
        target = 1 + self.shares_out % senders
        if target == self.worker_id or target in self.gone:
            return False
        # Not taken (its queue to that worker is full): it stays here.
        return self._send_enqueue(target, destination, name) is None

    def _send_enqueue(self, target: int, destination: str,
                      name: str) -> control.ActorUnreachable | None:
        """Tell worker ``target`` of queue file ``name`` of ``destination``: it takes it
        (workers with no part of the concurrency pass it on); why not, if it cannot."""
        return self._send_actor(control.ActorMessage.between(
            control.ActorAddress(worker_id=self.worker_id, actor_id="worker"),
            control.ActorAddress(worker_id=target, actor_id="worker"), "enqueue",
            {"destination": destination, "name": name}))

    def _sending_workers(self, destination: str) -> int:
        """How many workers have associations for ``destination``: workers 1 to that
        number (share_of)."""
        return min(self.config.destination(destination).concurrency, self.config.workers)

    def _senders_of(self, destination: str) -> int | None:
        """Another worker with associations for ``destination`` (it has none here):
        workers 1 to its ``concurrency`` have them (share_of), taken in turn, those
        not known to be dead first; None if every one of them is."""
        senders = self._sending_workers(destination)
        for _ in range(senders):
            self.hand_offs += 1
            target = 1 + self.hand_offs % senders
            if target not in self.gone:
                return target
        return None

    async def _send_elsewhere(self, destination: str, path: Path,
                              originator: Originator | None = None) -> tuple[int, str | None]:
        """A transparent send for a destination this worker has no association for:
        another worker that has one sends the held file (it is in the shared spool)
        and answers with the destination's status, so the destination never sees
        more associations than its ``concurrency``. If that worker dies first, the
        supervisor says so (WorkerGone) and the sender is told to try again later.

        While every worker that sends to ``destination`` is dead, this one sends it
        over an association of its own instead of waiting for a replacement (which
        may be seconds away, or never come while it keeps dying): their
        associations died with them, so the destination's count is kept."""
        target = self._senders_of(destination)
        forwarder = self.forwarders.get(destination)
        if target is None and forwarder is not None:
            return await forwarder.send_here(path, originator)
        if target is None:
            return transparent_failure_status(), f"destination {destination} is gone"
        self.relay_ids += 1
        temp = f"send-{self.relay_ids}"
        future: asyncio.Future[tuple[int, str | None]] = self.loop.create_future()
        self.sends_elsewhere[temp] = (target, future)
        message = control.ActorMessage.between(
            control.ActorAddress(worker_id=self.worker_id, actor_id=temp),
            control.ActorAddress(worker_id=target, actor_id="worker"), "send",
            {"destination": destination, "path": str(path),
             "originator": None if originator is None else originator.to_record()})
        try:
            # Delivered here if a reload made this worker a sender meanwhile.
            unreachable = self._send_actor(message)
            if unreachable is not None:
                return transparent_failure_status(), str(unreachable)
            return await future
        finally:
            del self.sends_elsewhere[temp]

    async def _send_for(self, message: control.ActorMessage) -> None:
        """Another worker's transparent send (see _send_elsewhere), over our own
        associations; its answer is the destination's status."""
        forwarder = self.forwarders.get(str(message.body.get("destination")))
        path = message.body.get("path")
        comment: str | None
        if forwarder is None:
            status, comment = (transparent_failure_status(),
                               f"destination {message.body.get('destination')} is gone")
        elif not isinstance(path, str) or Path(path).parent != self.spool.root / TMP_DIR:
            # Only a file held in the spool is ever sent for another worker.
            status, comment = dimse.PROCESSING_FAILURE, f"not a held spool file: {path!r}"
        else:
            status, comment = await forwarder.send_here(
                Path(path), Originator.from_record(message.body.get("originator")))
        self._send_actor(message.reply("sent", {"status": status, "comment": comment}))

    def _sent_elsewhere(self, message: control.ActorMessage) -> None:
        _, future = self.sends_elsewhere[message.to_actor]
        status, comment = message.body.get("status"), message.body.get("comment")
        if future.done():
            return
        if message.kind == "sent" and isinstance(status, int) \
                and (comment is None or isinstance(comment, str)):
            future.set_result((status, comment))
        else:
            future.set_result((transparent_failure_status(),
                               f"worker {message.from_worker} did not send it: "
                               f"{message.body.get('reason', message.kind)}"))

    def _worker_gone(self, worker_id: int) -> None:
        log.info("worker %d: worker %d is gone: what it was sending for this one is answered "
                 "A700H, new transparent sends go elsewhere", self.worker_id, worker_id)
        self.gone.add(worker_id)
        for target, future in self.sends_elsewhere.values():
            if target == worker_id and not future.done():
                future.set_result((transparent_failure_status(),
                                   f"worker {worker_id}, which was sending it, died"))

    def _rescan(self) -> None:
        for forwarder in self.forwarders.values():
            forwarder.scan()

    # ------------------------------------------------------------ hand-offs

    def _on_handoff(self) -> None:
        while True:
            try:
                got = recv_connection(self.channel)
            except BlockingIOError:
                return
            except BadHandoff as exc:
                self.handoffs_taken += 1
                log.warning("worker %d: bad hand-off: %s", self.worker_id, exc)
                continue
            if got is None:
                log.warning("worker %d: the supervisor is gone; draining", self.worker_id)
                self._begin_drain(self.config.drain_grace)
                return
            sock, header = got
            self.handoffs_taken += 1
            self.served += 1
            # recv_connection checked it: (host, port).
            peer = cast(tuple[str, int], header["peer"])
            port = cast(int, header["local_port"])
            context = None
            if header["tls"]:
                try:
                    context = self._server_tls(port)
                except (OSError, ssl.SSLError) as exc:
                    log.error("worker %d: connection from %s:%d closed: no TLS for it: %s",
                              self.worker_id, *peer, exc)
                    sock.close()
                    continue
            spec = self._listener(port)
            self.adopting += 1
            self.loop.create_task(self._adopt(
                sock, peer, context, proxy=spec if spec and spec.proxy_protocol else None,
                port=port))

    def _listener(self, port: int) -> Listen | None:
        """This configuration's listener on ``port`` (after ``--port``, the first)."""
        spec = next((s for s in self.config.listen if s.port == port), None)
        return spec if spec is not None or len(self.config.listen) > 1 \
            else self.config.listen[0]

    def _load_tls(self) -> None:
        """Load the TLS context of each TLS listener of this configuration. One whose
        files do not load now keeps the context it had: a certificate being replaced
        while a reload came, or a worker restarted after a bad copy, must not end
        TLS on that port (the supervisor checked the files when it took them)."""
        loaded: dict[int, ssl.SSLContext] = {}
        for spec in self.config.listen:
            if not spec.tls or spec.tls_cert is None or spec.tls_key is None:
                continue
            try:
                loaded[spec.port] = server_context(spec.tls_cert, spec.tls_key, spec.tls_ca)
            except (OSError, ssl.SSLError) as exc:
                kept = self.tls_contexts.get(spec.port)
                log.error("worker %d: TLS files of port %d do not load (%s): %s", self.worker_id,
                          spec.port, exc, "the previous ones stay" if kept is not None
                          else "its connections are closed until they do")
                if kept is not None:
                    loaded[spec.port] = kept
        self.tls_contexts = loaded

    def _server_tls(self, port: int) -> ssl.SSLContext:
        """The TLS context of the listener on ``port``: loaded by :meth:`_load_tls`,
        or now if it could not be then."""
        context = self.tls_contexts.get(port)
        if context is None:
            spec = self._listener(port)
            if spec is None or not spec.tls or spec.tls_cert is None or spec.tls_key is None:
                raise OSError(f"no TLS listener on port {port} in this configuration")
            context = server_context(spec.tls_cert, spec.tls_key, spec.tls_ca)
            self.tls_contexts[port] = context
        return context

    async def _proxied_peer(self, sock: socket.socket, peer: tuple[str, int],
                            spec: Listen) -> tuple[str, int] | None:
        """The client's address from the PROXY header that starts ``sock``, read
        within ARTIM; None (and one log line) if the connection may not be served."""
        balancer = peer_address(peer[0])
        if spec.proxy_from and (balancer is None
                                or not any(balancer in net for net in spec.proxy_from)):
            if self._may_log(f"connections refused on port {spec.port} (not a proxy_from "
                             "balancer)", peer):
                log.warning("worker %d: connection from %s:%d closed: port %d takes "
                            "connections from its proxy_from balancers only",
                            self.worker_id, *peer, spec.port)
            return None
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.config.artim_timeout):
                header = await read_proxy_header(sock)
        except (ProxyProtocolError, TimeoutError) as exc:
            why = exc if isinstance(exc, ProxyProtocolError) else \
                f"no PROXY header in {self.config.artim_timeout:g} s"
            if self._may_log(f"connections without a good PROXY header on port {spec.port}",
                             peer):
                log.warning("worker %d: connection from %s:%d closed: %s", self.worker_id,
                            *peer, why)
            return None
        return header.source or peer

    async def _adopt(self, sock: socket.socket, peer: tuple[str, int],
                     context: ssl.SSLContext | None = None, *,
                     proxy: Listen | None = None, port: int = 0) -> None:
        made: list[AssociationActor] = []

        def factory() -> AssociationActor:
            if not made:
                self.adopting -= 1  # counted as an actor from here
            actor = AssociationActor(self.settings, self.spool, self.committer,
                                     on_closed=self._actor_closed, on_event=self._actor_event,
                                     receive_buffer=self.receive_buffer,
                                     dispatcher=lambda: self.dispatcher,
                                     over_limit=self._over_limit,
                                     peer=peer, proxied=proxy is not None)
            self.actors.add(actor)
            made.append(actor)
            return actor
        try:
            if proxy is not None:
                client = await self._proxied_peer(sock, peer, proxy)
                if client is None:
                    sock.close()
                    return
                peer = client
            if context is None:
                await self.loop.connect_accepted_socket(factory, sock=sock)
            else:
                # The handshake is bounded like an association request (ARTIM).
                await self.loop.connect_accepted_socket(
                    factory, sock=sock, ssl=context,
                    ssl_handshake_timeout=self.config.artim_timeout)
        except OSError as exc:  # ssl.SSLError and TimeoutError are OSErrors too
            if context is None:
                log.info("worker %d: connection lost before it was served: %s",
                         self.worker_id, exc)
            else:
                # asyncio ends a handshake past its timeout (ARTIM) with
                # ConnectionAbortedError; some failures carry no message at all.
                why = (f"no handshake within ARTIM ({self.config.artim_timeout:g} s)"
                       if isinstance(exc, TimeoutError | ConnectionAbortedError)
                       else str(exc) or type(exc).__name__)
                if self._may_log(f"failed TLS handshakes on port {port}", peer):
                    log.warning("worker %d: TLS handshake with %s:%d on port %d failed: %s",
                                self.worker_id, *peer, port, why)
            sock.close()
            for actor in made:
                if actor.transport is None:  # never connected: it will not close itself
                    self._actor_closed(actor)
        finally:
            if not made:  # it never became an actor: no longer being adopted either
                self.adopting -= 1

    def _over_limit(self) -> bool:
        """Whether this worker has more associations than its share of max_associations,
        asked by each as its A-ASSOCIATE-RQ arrives. Connections that sent none yet
        (in their TLS handshake, or silent) do not count: as many stalled ones as the
        limit would lock every modality out until ARTIM closed them."""
        limit = self.settings.max_associations
        return limit is not None and len(self.actors) > limit and sum(
            actor.requested for actor in self.actors) > limit

    def _actor_closed(self, actor: AssociationActor) -> None:
        self.actors.discard(actor)
        if self.stopping and not self.actors:
            self.done.set()
        if not self.actors:
            self.idle_since = time.monotonic()
        self._restock()

    def _restock(self) -> None:
        """Make empty spool files ahead once idle for STOCK_AFTER_IDLE (Spool.stock):
        called at start, when an association closes and on each heartbeat."""
        if not self._idle() or not (self.restocking is None or self.restocking.done()):
            return
        wait = self.idle_since + STOCK_AFTER_IDLE - time.monotonic()
        if wait > 0:
            if self.restock_timer is None:
                self.restock_timer = self.loop.call_later(wait, self._restock_due)
            return
        self.restocking = self.loop.create_task(self._stock())

    def _restock_due(self) -> None:
        self.restock_timer = None
        self._restock()

    def _idle(self) -> bool:
        # Nothing inbound and nothing waiting to go out: queued instances are delivered
        # first, the files can wait.
        return not (self.actors or self.stopping
                    or any(f.depth for f in self.forwarders.values()))

    async def _stock(self) -> None:
        # In steps of a few ms at most, each after the loop has run what was ready: an
        # association arriving meanwhile stops it and waits for one step only.
        made = False
        while self._idle():
            try:
                more = self.spool.stock(STOCK_STEP)
                made = True
                if not more:
                    break
            except OSError as exc:
                # Once per episode: tried on every heartbeat, a read-only or full spool
                # made this line every second in each worker (an outside campaign).
                said = f"{type(exc).__name__}: {exc.errno}"
                if said != self.stock_failed:
                    log.warning("worker %d: cannot make spool files ahead in %s: %s "
                                "(said once until it changes)", self.worker_id,
                                self.spool.tmp, exc)
                self.stock_failed = said
                return
            await asyncio.sleep(0)
        if made and self.stock_failed is not None:
            log.info("worker %d: spool files are made ahead again in %s", self.worker_id,
                     self.spool.tmp)
            self.stock_failed = None

    def _actor_event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind == "instance.stored":
            self.spooled_bytes += int(fields.get("bytes", 0))
            self.instances_stored += 1
            return  # counted in the heartbeat, not sent one by one
        if kind == "instance.failed":
            self.instances_failed += 1
            return
        # Reporting is best effort: it must never disturb an association.
        try:
            message = self._event_message(kind, fields)
        except (TypeError, ValueError, control.ControlError) as exc:
            log.error("worker %d: cannot report %s: %s", self.worker_id, kind, exc)
            return
        self.loop.create_task(self._send(message))

    def _event_message(self, kind: str, fields: dict[str, Any]) -> control.Message:
        if kind == "association.opened":
            return control.AssociationOpened(worker_id=self.worker_id, **fields)
        if kind == "association.closed":
            return control.AssociationClosed(worker_id=self.worker_id, **fields)
        raise ValueError(f"no control message for event {kind!r}")

    # ----------------------------------------------------------- supervisor

    async def _send(self, message: control.Message) -> None:
        with contextlib.suppress(zmq.ZMQError):
            await _aio(self.sockets.control).send_multipart(message.to_wire())

    def _folder_wanted(self, folder: str) -> bool:
        """Whether the spool keeps watching ``folder``: not the queue of a destination
        a reload removed (its instances stay there; nothing of ours goes there)."""
        top, _, destination = folder.partition("/")
        return top != QUEUE_DIR or any(d.name == destination
                                       for d in self.config.destinations)

    async def _heartbeats(self) -> None:
        while True:
            try:
                # A spool folder an operator removed or moved aside is made again and
                # used from now on (see Spool.refresh), not only when a commit trips.
                self.spool.refresh(self._folder_wanted)
            except OSError as exc:
                log.error("worker %d: spool %s: %s", self.worker_id, self.spool.root, exc)
            # The heartbeat is what keeps this worker alive: the figures in it must
            # not stop it. psutil reads /proc, which fails with EMFILE when every
            # descriptor is taken (the state a heartbeat most needs to get through).
            try:
                mem, cpu = self.process.memory_info().rss, self.process.cpu_percent()
            except (OSError, psutil.Error) as exc:
                mem, cpu = 0, 0.0
                if not self._figures_failed:
                    log.warning("worker %d: cannot read its own RSS and CPU: %s",
                                self.worker_id, exc)
                self._figures_failed = True
            else:
                self._figures_failed = False
            await self._send(control.Heartbeat(
                worker_id=self.worker_id, open_associations=len(self.actors) + self.adopting,
                handoffs_taken=self.handoffs_taken,
                spool_bytes=self.spooled_bytes, rss=mem, cpu_percent=cpu,
                served_total=self.served, instances_stored=self.instances_stored,
                instances_failed=self.instances_failed,
                instances_forwarded=self._forwarded(),
                queued=sum(f.depth for f in self.forwarders.values()), pid=os.getpid(),
                failing={name: [f.stats.last_error, f.stats.failing_since, f.stats.failed_at]
                         for name, f in self.forwarders.items()
                         # A worker with no part of the concurrency sends nothing: what
                         # a sender finishing after the reload saw is not news.
                         if f.stats.failing_since and f.share}))
            self._restock()
            self._say_held()
            self._sweep()
            await asyncio.sleep(self.config.heartbeat_interval)  # a timer, not a poll

    def _sweep(self) -> None:
        """Hourly upkeep of the spool's records that have no process of their own,
        by one worker (the first) of the spool."""
        now = time.monotonic()
        if self.worker_id != 1 or now < self.swept_at + SWEEP_EVERY:
            return
        self.swept_at = now
        try:
            sweep_commitments(self.spool.root, time.time())
        except OSError as exc:
            log.error("worker %d: spool %s: %s", self.worker_id, self.spool.root, exc)

    def _say_held(self, *, everything: bool = False) -> None:
        """One line for each address whose lines the log budget held back."""
        for held in self.log_budget.due(time.monotonic(), everything=everything):
            if held.addresses == 1 and not held.more_addresses:
                where = f"from {held.top}"
            else:
                where = (f"from {'more than ' if held.more_addresses else ''}"
                         f"{held.addresses} addresses, most from {held.top} "
                         f"({held.top_lines})")
            log.warning("worker %d: %d more %s %s in the last %.0f s, not logged one by one",
                        self.worker_id, held.lines, held.what, where, held.seconds)

    def _may_log(self, what: str, peer: tuple[str, int]) -> bool:
        return self.log_budget.allow(what, peer[0], time.monotonic())

    async def _receive(self, sock: Any, what: str,
                       handle: Callable[[control.Message], None]) -> None:
        """Receive, decode and hand on messages from one socket, forever."""
        while True:
            frames = await _aio(sock).recv_multipart()
            try:
                message = control.from_wire(frames)
            except control.ControlError as exc:
                log.warning("worker %d: bad %s: %s", self.worker_id, what, exc)
                continue
            handle(message)

    def _on_direct(self, message: control.Message) -> None:
        """From the supervisor to this worker alone (the welcome reply, reload, drain)."""
        if isinstance(message, control.Reply) and message.ok:
            generation = message.result.get("generation")
            if isinstance(generation, int):
                self.generation = generation
        else:
            self._from_supervisor(message)

    # --------------------------------------------------------------- actors

    def _on_inbox(self, message: control.Message) -> None:
        """Messages for actors of this worker from other processes (D2, D3)."""
        if isinstance(message, control.ActorMessage):
            self._deliver(message)

    def _deliver(self, message: control.ActorMessage) -> None:
        """Local delivery: a call into the actor (remote ones went over ZeroMQ)."""
        if message.to_actor == "worker":
            self._worker_actor(message)
        elif message.to_actor in self.sends_elsewhere:
            self._sent_elsewhere(message)
        elif message.to_actor in self.relays:
            asker = self.relays.pop(message.to_actor)
            self._send_actor(control.ActorMessage.between(
                control.ActorAddress(worker_id=self.worker_id, actor_id="worker"), asker, "relayed",
                {"via": message.from_worker, "kind": message.kind, "body": message.body}))
        elif message.kind == "error":
            self._error_received(message)
        else:
            # A PUSH socket reconnects to a restarted worker: stale mail lands here.
            self._send_actor(message.reply("error", {"reason": "no such actor",
                                                     "actor": message.to_actor}))

    def _error_received(self, message: control.ActorMessage) -> None:
        """An error for an actor that asked nothing, or no longer waits: said, never
        answered (two workers would otherwise send each other errors for ever)."""
        log.warning("worker %d: error from worker %d (%s) for %s: %s", self.worker_id,
                    message.from_worker, message.from_actor, message.to_actor,
                    message.body.get("reason", "no reason given"))

    def _worker_actor(self, message: control.ActorMessage) -> None:
        """The worker's own actor: 'ping' -> 'pong'; 'relay' pings another worker
        and forwards its answer, a worker-to-worker round trip on demand."""
        if message.kind == "ping":
            self._send_actor(message.reply("pong", {"worker_id": self.worker_id,
                                                    "pid": os.getpid()}))
        elif message.kind == "enqueue":
            forwarder = self.forwarders.get(str(message.body.get("destination")))
            name = message.body.get("name")
            if forwarder is not None and isinstance(name, str):
                # With no part of the destination's concurrency here (a reload between
                # the sender's decision and this), enqueue hands it to a worker that
                # has one: dropped, it stayed queued until a restart.
                forwarder.enqueue(name, handed=True)
        elif message.kind == "send":
            self.loop.create_task(self._send_for(message))
        elif message.kind == "error":
            self._error_received(message)
        elif message.kind == "relay":
            target = message.body.get("to_worker")
            if not isinstance(target, int):
                self._send_actor(message.reply("error", {"reason": "relay needs to_worker"}))
                return
            self.relay_ids += 1
            temp = f"relay-{self.relay_ids}"
            self.relays[temp] = message.sender
            self._send_actor(control.ActorMessage.between(
                control.ActorAddress(worker_id=self.worker_id, actor_id=temp),
                control.ActorAddress(worker_id=target, actor_id="worker"), "ping"))
        else:
            self._send_actor(message.reply("error", {"reason": f"unknown kind {message.kind}"}))

    def _send_actor(self, message: control.ActorMessage) -> control.ActorUnreachable | None:
        """Deliver ``message`` here or over ZeroMQ; why it could not be sent, if not."""
        if control.route(message, self.worker_id) == "local":
            self._deliver(message)
            return None
        try:
            self.sockets.send_actor(message)
        except control.ActorUnreachable as exc:
            log.warning("worker %d: %s", self.worker_id, exc)
            return exc
        return None

    def _from_supervisor(self, message: control.Message) -> None:
        if isinstance(message, control.Stop):
            # A drain already going: the operator asked twice (a second SIGTERM).
            if self.stopping:
                self._stop_now("a second SIGTERM or SIGINT to the supervisor")
            else:
                self._begin_drain(0.0)
        elif self.done.is_set():
            return  # stopping: the forwards are finishing, and a Stop alone matters
        elif isinstance(message, control.Drain):
            self._begin_drain(message.grace)
        elif isinstance(message, control.Reload):
            self._reload(message.generation, Path(message.snapshot))
        elif isinstance(message, control.Rescan):
            self._rescan()
        elif isinstance(message, control.WorkerGone):
            self._worker_gone(message.worker_id)
        elif isinstance(message, control.WorkerReady):
            self.gone.discard(message.worker_id)

    def _reload(self, generation: int, snapshot: Path) -> None:
        if generation <= self.generation:
            return  # already have it (it may come by more than one path)
        try:
            config, rules = Snapshot.from_file(snapshot).load(overrides=self.overrides)
        except (ConfigError, RuleError, SnapshotError) as exc:
            log.error("worker %d: reload refused, keeping the running config: %s",
                      self.worker_id, " / ".join(str(exc).splitlines()))
            return
        # Open associations keep the settings they started with; new ones get these.
        # Rules swap atomically: each commit reads the dispatcher once.
        if config.log_level != self.config.log_level:
            log.warning("worker %d: log level %s, was %s", self.worker_id, config.log_level,
                        self.config.log_level)
            logging.getLogger().setLevel(config.log_level)
        self.config, self.settings = config, settings_for(config, self.worker_id, rules)
        self._load_tls()  # renewed certificates take effect from here
        self.rules = rules
        self._start_forwarders()
        self.generation = generation
        log.info("worker %d: configuration generation %d loaded", self.worker_id, generation)

    def _on_stop_signal(self, signum: int) -> None:
        """SIGTERM or SIGINT to this worker (Ctrl-C reaches the whole process group):
        the first drains, as the supervisor's Drain does; a second one means now. The
        supervisor's Drain counts for nothing here, so a single Ctrl-C, which both it
        and the signal bring, stays a drain."""
        self.stop_signals += 1
        if self.stop_signals == 1:
            self._begin_drain(self.config.drain_grace)
        else:
            self._stop_now(f"{signal.Signals(signum).name} again")

    def _stop_now(self, why: str) -> None:
        """Stop without the rest of the grace period: open associations are aborted
        (what they had acknowledged is in the spool) and the forwards going on are cut
        off (they stay queued: the destination may get those again)."""
        if self.stopping_now:
            return
        self.stopping_now = True
        log.warning("worker %d: stopping now (%s): %d open association(s) aborted, "
                    "forwards cut off", self.worker_id, why, len(self.actors))
        self._begin_drain(0.0)
        self.finish_by = time.monotonic()
        self._abort_all("router stopping at once")
        for forwarder in self.forwarders.values():
            self.loop.create_task(forwarder.stop("the router is stopping at once"))

    def _begin_drain(self, grace: float) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.finish_by = time.monotonic() + grace + FINISH_SENDS
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.channel.fileno())
        log.info("worker %d: draining %d open associations (grace %.0f s)", self.worker_id,
                 len(self.actors), grace)
        if not self.actors:
            self.done.set()
            return
        self.loop.call_later(grace, self._abort_all)

    def _abort_all(self, why: str = "router stopping: drain grace period over") -> None:
        for actor in list(self.actors):
            actor.abort(why)
        if not self.actors:
            self.done.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workers.main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    # The configuration the supervisor checked (router/snapshot.py), not the file.
    parser.add_argument("--snapshot", type=Path, required=True)
    parser.add_argument("--spool", type=Path, default=None)
    args = parser.parse_args(argv)
    overrides: dict[str, object] = {"spool": args.spool}
    try:
        config, rules = Snapshot.from_file(args.snapshot).load(overrides=overrides)
    except (ConfigError, RuleError, SnapshotError) as exc:
        print(f"worker {args.worker_id}: {exc}", file=sys.stderr)
        return BOOT_ERROR
    # A line per instance received and per instance forwarded: skip what our format
    # does not show (the logging HOWTO's "Optimization": caller, thread, process).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logline.configure(config.log_level, f"%(asctime)s %(levelname)s worker-{args.worker_id} "
                                         "%(name)s: %(message)s")
    # Python warnings (pydicom's on odd data) as log lines, not bare stderr text, and
    # any library's line named after the association it came from.
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(LibraryLogFilter())
    worker = Worker(config, worker_id=args.worker_id, channel_fd=args.channel_fd,
                    run_dir=args.run_dir, overrides=overrides,
                    rules=rules)
    return asyncio.run(worker.run())


if __name__ == "__main__":
    sys.exit(main())
