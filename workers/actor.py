"""AssociationActor: one inbound association in a worker's event loop (DESIGN.md D3).

Theory of operation
-------------------
The actor is an ``asyncio.BufferedProtocol`` that owns one sans-I/O
:class:`router.dicom.association.Association` and nothing else. The event loop
reads straight into the actor's buffer (``get_buffer``/``buffer_updated``: no
per-read ``bytes`` object), the engine turns the bytes into events, and the
actor answers them:

- A-ASSOCIATE-RQ: negotiated against the worker's acceptance policy (pure
  function), accepted or rejected with the right A-ASSOCIATE-RJ.
- C-ECHO: answered at once.
- C-STORE: the data set streams into a :class:`workers.spool.SpoolWriter` as
  its fragments arrive (memory stays bounded whatever the size); on the last
  fragment the writer goes to the group committer with the worker's rules
  (:class:`workers.routing.Dispatcher`), which place it in the destinations'
  queues, and the C-STORE-RSP is sent only when that future says the file is
  fsync'd and linked (D4). The queues' actors are then told of the new files.
  A rule's reject status, a drop, or -- for a transparent rule -- the
  destination's own status is answered instead. Anything else fails with a
  DIMSE status and nothing is acknowledged that is not kept.
- Release, abort, peer loss, ARTIM: per the PS3.8 table in the engine; an
  instance still being received when the association dies is discarded.

Messages are handled one at a time in arrival order: while a C-STORE waits for
its commit, later events wait in the actor's mailbox (the peer may not send
another request before our response unless asynchronous operations were
negotiated, and we never negotiate them). If the mailbox grows past a bound,
reading pauses (TCP flow control is the back-pressure, D3).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import itertools
import logging
import os
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

from router.config import Config, Destination
from router.dicom import dimse, uids
from router.dicom.association import Association, Role
from router.dicom.dataset import InstanceIdentity, decode_dataset
from router.dicom.errors import DIMSEError, ProtocolError
from router.dicom.events import (
    NEED_DATA,
    AssociationAborted,
    AssociationRequested,
    CommandReceived,
    CommandRejected,
    ConnectionClosed,
    DataReceived,
    Event,
    ReleaseRequested,
    _Sentinel,
)
from router.dicom.negotiation import (
    LOCAL_LIMIT_EXCEEDED,
    AcceptorPolicy,
    NegotiatedContext,
    negotiate_explained,
)
from router.dicom.pdu import AAssociateAC, AAssociateRJ
from router.net.client import rejected_answer, response_for
from router.net.connection import ack_now
from rules import AssociationInfo
from workers.logcontext import serving
from workers.moves import Originator, note_sub_operation_status
from workers.nservices import (
    forget_commitment,
    relay_n_request,
    remember_commitment,
    requestor_of,
)
from workers.outbound import OutboundError
from workers.qr import (
    FIND_MODELS,
    GET_MODELS,
    MOVE_MODELS,
    FindProxy,
    GetProxy,
    MoveProxy,
    Request,
)
from workers.routing import Dispatcher, Routed
from workers.spool import (
    GroupCommitter,
    Placed,
    Placement,
    RingCommitter,
    Spool,
    SpoolWriter,
    status_for_error,
)

__all__ = ["ActorSettings", "AssociationActor", "AssociationStats"]

# Seconds a relayed Storage Commitment N-ACTION's association stays open after the
# answer, for a PACS that sends the result on it (PS3.4 J.3.3) as soon as it has
# checked its storage; one that takes longer opens an association of its own.
REPORT_LINGER: Final = 5.0

log = logging.getLogger("workers.actor")

RECV_BUFFER = 1 << 20
# Events waiting behind a pending commit before we stop reading the socket.
MAILBOX_HIGH_WATER = 256
# What a peer may send while a C-FIND, C-MOVE or C-GET runs, held for after it
# (AssociationActor._held): a request or two; far more is not waiting its turn.
MAX_HELD_EVENTS = 64
MAX_HELD_BYTES = 4 << 20
# Largest C-FIND identifier taken (queries are a few hundred bytes).
MAX_IDENTIFIER = 1 << 20
# Largest data set whose routing (reading the attributes rules need) runs on the loop;
# bigger ones are routed on the commit thread.
LOOP_ROUTING_MAX_BYTES = 4 << 20

def new_receive_buffer() -> memoryview:
    """A receive buffer for actors (RECV_BUFFER bytes; large reads are cheap)."""
    return memoryview(bytearray(RECV_BUFFER))
_ids = itertools.count(1)


@dataclass(frozen=True, slots=True, kw_only=True)
class ActorSettings:
    """What every actor of a worker shares (immutable; a reload makes a new one)."""

    policy: AcceptorPolicy
    artim_timeout: float = 30.0
    idle_timeout: float | None = 600.0
    worker_id: int = 0
    # A relayed query, retrieve or N-service still unanswered after this is failed.
    operation_timeout: float | None = 3600.0
    # This worker's share of [router] max_associations; None = no bound.
    max_associations: int | None = None


@dataclass(slots=True, kw_only=True)
class AssociationStats:
    """Counters for the close log line and the supervisor's events."""

    association_id: str
    peer: tuple[str, int]
    calling_ae: str = ""
    called_ae: str = ""
    started: float = field(default_factory=time.monotonic)
    instances: int = 0
    failed: int = 0
    bytes_stored: int = 0
    outcome: str = "open"


class AssociationActor(asyncio.BufferedProtocol):
    """Runs one inbound association to completion inside the event loop."""

    def __init__(
        self,
        settings: ActorSettings,
        spool: Spool,
        committer: GroupCommitter | RingCommitter,
        *,
        on_closed: Callable[[AssociationActor], None] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        receive_buffer: memoryview | None = None,
        dispatcher: Callable[[], Dispatcher | None] | None = None,
        over_limit: Callable[[], bool] | None = None,
        peer: tuple[str, int] | None = None,
        proxied: bool = False,
    ) -> None:
        self.settings = settings
        # ``peer`` came from a PROXY protocol header: the socket's peer is the balancer.
        self.proxied = proxied
        # Requested while the worker already had its share of associations open: the
        # request is rejected (see _requested), never served. Asked when the request
        # arrives: asked at adoption, TLS handshakes under way either filled the
        # limit (stalled ones) or were let past it; asked at connection, silent
        # connections filled it.
        self._over_limit = over_limit
        # Sent its A-ASSOCIATE-RQ: counted against max_associations from then on.
        self.requested = False
        # Read at each commit: a reload swaps the worker's dispatcher, and an
        # instance is routed by the rules current when its data set completed.
        self.dispatcher = dispatcher
        self.spool = spool
        self.committer = committer
        self.on_closed = on_closed
        self.on_event = on_event
        self.engine = Association(Role.ACCEPTOR)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        # One receive buffer can serve every actor of a worker: the event loop
        # reads into it and calls buffer_updated before it serves any other
        # transport, and the engine copies what it keeps. The worker passes
        # its own; alone, an actor makes one.
        self._view = receive_buffer if receive_buffer is not None else new_receive_buffer()
        self._mailbox: deque[Event] = deque()
        self._busy = False  # a C-STORE is waiting for its commit
        self._finish_when_done = False  # the connection ended while _busy
        # How the peer came: " over TLSv1.3 (certificate CN=...)" (its open lines say it).
        self._tls = ""
        self._paused = False  # reading paused (see _sync_reading)
        self._backlogged = False  # the mailbox is past MAILBOX_HIGH_WATER
        self._writer: SpoolWriter | None = None
        self._store: tuple[NegotiatedContext, dimse.CStoreRQ] | None = None
        self._artim: asyncio.TimerHandle | None = None
        self._artim_generation: int | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._idle_count = 0  # engine.pdus_received when last looked at
        self._idle_since = 0.0  # loop time of the last whole PDU
        self._closed = False
        self._store_error = 0  # DIMSE status if the spool failed mid instance
        # Whether the data set being stored is the instance its command names.
        self._identity: InstanceIdentity | None = None
        # A C-FIND/C-MOVE whose identifier is arriving: (context, request, parts, size).
        self._query: tuple[NegotiatedContext, Any, list[bytes], int] | None = None
        # The C-FIND, C-MOVE or C-GET being answered by upstreams.
        self._find: tuple[NegotiatedContext, _Retrieval,
                          FindProxy | MoveProxy | GetProxy] | None = None
        # Events held while a C-FIND, C-MOVE or C-GET runs: a further request (and
        # what comes behind it) waits for its end, see _held.
        self._deferred: deque[Event] = deque()
        self._deferred_bytes = 0
        self._cancelled_held: set[int] = set()  # message IDs: see _cancel_held
        # Relayed N-requests (MPPS, Storage Commitment) not answered yet, and whether
        # the peer's A-RELEASE-RQ waits for them.
        self._relaying = 0
        self._release_waiting = False
        self._releasing = False  # a release came while a C-GET ran: see _end_get_for_release
        # C-GET sub-operations sent to the requestor, waiting for its C-STORE-RSP.
        self._sub_operations: dict[int, asyncio.Future[dimse.CStoreRSP]] = {}
        self._sub_ids = itertools.cycle(range(1, 65536))
        self._writable = asyncio.Event()
        self._writable.set()
        # The listener's word for the peer (the hand-off header), until the socket's:
        # a connection reset before it is served has no peer name any more.
        self.stats = AssociationStats(association_id=f"w{settings.worker_id}-a{next(_ids)}",
                                      peer=peer or ("?", 0))
        # This association as the carrier of a move's sub-operations, unique over the
        # workers and their restarts (workers/moves.py binds it to one move).
        self._stream = f"{os.getpid()}-{self.stats.association_id}"

    # ------------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if peer and not self.proxied:
            self.stats.peer = (str(peer[0]), int(peer[1]))
        tls = transport.get_extra_info("ssl_object")
        if tls is not None:
            self._tls = f" over {tls.version() or 'TLS'} ({_certificate_said(tls)})"
        self.engine.connection_made()
        self._after_engine()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self.engine.receive_data(self._view[:nbytes])
        self._pump()
        if self.engine.mid_message:
            self._ack_now()

    def eof_received(self) -> bool:
        self.engine.receive_data(b"")
        self._pump()
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self.engine.receive_data(b"")
            self._pump()
        self._finish()

    # --------------------------------------------------------------- events

    def _pump(self) -> None:
        """Take every event the engine has and handle them in order."""
        while True:
            event = self.engine.next_event()
            if event is NEED_DATA:
                break
            assert not isinstance(event, _Sentinel)
            self._mailbox.append(event)
        self._run_mailbox()
        self._after_engine()

    def _run_mailbox(self) -> None:
        token = serving.set(self._serving)
        try:
            self._run_events()
        finally:
            serving.reset(token)

    def _run_events(self) -> None:
        mailbox = self._mailbox
        while mailbox and not self._busy:
            event = mailbox.popleft()
            if self._find is not None and self._held(event):
                continue
            if (isinstance(event, DataReceived) and not event.last and mailbox
                    and isinstance(mailbox[0], DataReceived) and self._query is None):
                # Fragments that arrived together go to disk in one writev: a sender
                # with 16 KiB PDUs (DCMTK's default) makes 32 per 500 KB instance.
                run = [event]
                while mailbox and isinstance(mailbox[0], DataReceived) and not run[-1].last:
                    run.append(mailbox.popleft())  # type: ignore[arg-type]
                self._store_fragments(run)
                continue
            self._handle(event)
        if len(self._mailbox) > MAILBOX_HIGH_WATER:
            self._backlogged = True
        elif len(self._mailbox) < MAILBOX_HIGH_WATER // 2:
            self._backlogged = False
        self._sync_reading()

    def _sync_reading(self) -> None:
        """Read from the peer unless events are backlogged or our answers are (a
        peer that sends requests and never reads the responses would otherwise
        fill this worker's memory with them): TCP flow control holds the rest."""
        if self.transport is None or self._closed:
            return
        hold = self._backlogged or not self._writable.is_set()
        if hold and not self._paused:
            self.transport.pause_reading()
            self._paused = True
        elif self._paused and not hold:
            self.transport.resume_reading()
            self._paused = False

    def _held(self, event: Event) -> bool:
        """Hold ``event`` while a C-FIND, C-MOVE or C-GET runs, if it is a further
        request or comes behind one: True. No asynchronous operations are ever
        negotiated, so the window is one operation (PS3.7 D.3.3.3); a peer that
        sends another meanwhile has it served after, as DCMTK's SCPs do, in order.
        What the running operation needs passes: its C-CANCEL, the requestor's
        C-STORE-RSPs to a C-GET's sub-operations, and the end of the association."""
        if isinstance(event, AssociationAborted | ConnectionClosed):
            return False
        if isinstance(event, ReleaseRequested):
            # Answered once the operation has sent its last response (PS3.8 Sta8: the
            # acceptor may still send P-DATA before the A-RELEASE-RP), as DCMTK's
            # SCPs and pynetdicom do; it was answered at once, and the requestor
            # never got its C-FIND matches or its C-MOVE's final response.
            self._deferred.append(event)
            if (self._find is not None and isinstance(self._find[2], GetProxy)
                    and not self._releasing):
                self._end_get_for_release()
            return True
        if isinstance(event, CommandReceived) and (
                isinstance(event.message, dimse.CCancelRQ)
                or not dimse.is_request(event.message)):
            return False
        if not self._deferred:
            if not isinstance(event, CommandReceived | CommandRejected):
                return False
            assert self._find is not None
            log.warning("association %s: %s while %s %d runs (no asynchronous operations "
                        "were negotiated): held until it ends", self._who(),
                        _event_name(event), _operation_name(self._find[1]),
                        self._find[1].message_id)
        if not self.engine.may_send_data:
            return True  # aborted already: nothing more is served
        # Reading goes on (the running operation's C-CANCEL and C-STORE-RSPs must get
        # through), so what is held is bounded here: past it, the peer is not
        # waiting its turn at all, and the association is aborted.
        self._deferred_bytes += len(event.data) if isinstance(event, DataReceived) else 0
        if len(self._deferred) >= MAX_HELD_EVENTS or self._deferred_bytes > MAX_HELD_BYTES:
            self.abort(f"more than {MAX_HELD_EVENTS} messages or {MAX_HELD_BYTES >> 20} MiB "
                       "sent while an operation runs (no asynchronous operations were "
                       "negotiated)")
            return True
        self._deferred.append(event)
        return True

    def _end_get_for_release(self) -> None:
        """A-RELEASE-RQ while a C-GET runs: the requestor, in Sta7, may send no
        P-DATA (PS3.8 Table 9-10: Evt9 only in Sta6 and Sta8), so it can answer no
        more C-STORE sub-operation (its C-STORE-RSP would be Evt10 in our Sta8:
        AA-8, an abort). The C-GET is cancelled: no sub-operation starts, those
        waiting for their answer fail, and it ends Cancel (FE00H) with its counts,
        before the A-RELEASE-RP (a review found a held release ending in an abort)."""
        assert self._find is not None
        self._releasing = True
        log.info("association %s: A-RELEASE-RQ while C-GET %d runs: its sub-operations "
                 "stop (the requestor can answer none now) and it ends", self._who(),
                 self._find[1].message_id)
        self._find[2].cancel()
        for future in self._sub_operations.values():
            if not future.done():
                future.set_exception(OutboundError("the requestor released the association"))

    def _answer_release(self) -> None:
        # Unless an A-ABORT came behind the A-RELEASE-RQ: then it is aborted.
        if self.engine.may_answer_release:
            self.stats.outcome = "released"
            self._discard_store("the peer released the association")
            self.engine.release_response()

    def _cancel_held(self, message_id: int) -> None:
        """A C-CANCEL of a held C-FIND, C-MOVE or C-GET: when its turn comes it is
        answered Cancel, FE00H (PS3.7 9.3.2.3), and never started (nothing is asked
        upstream for nobody). Its answer keeps its place: one operation at a time."""
        if any(isinstance(e, CommandReceived)
               and isinstance(e.message, dimse.CFindRQ | dimse.CMoveRQ | dimse.CGetRQ)
               and e.message.message_id == message_id for e in self._deferred):
            log.info("association %s: C-CANCEL of held request %d: it will not start",
                     self._who(), message_id)
            self._cancelled_held.add(message_id)
        else:
            # It has no response (PS3.7 9.3.2.3): an operator sees here a requestor
            # cancelling the wrong message (or one whose final response crossed it).
            log.info("association %s: C-CANCEL of message %d, which no running or held "
                     "C-FIND, C-MOVE or C-GET has: nothing to cancel", self._who(),
                     message_id)

    def _release_held(self) -> None:
        """The running operation ended: what was held is handled, in order."""
        if self._deferred and not self._closed:
            self._mailbox.extendleft(reversed(self._deferred))
            self._deferred.clear()
            self._deferred_bytes = 0
            self._run_mailbox()
            self._after_engine()

    def _handle(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            if self._query is not None:
                self._query_data(event)
            else:
                self._store_data(event)
        elif isinstance(event, CommandReceived):
            self._command(event)
        elif isinstance(event, CommandRejected):
            self._rejected(event)
        elif isinstance(event, AssociationRequested):
            # Unless a PDU that came with the request already ended it (AA-8).
            if self.engine.may_answer_association:
                self._requested(event)
        elif isinstance(event, ReleaseRequested):
            if self._relaying:
                # Relayed N-requests still to be answered: the A-RELEASE-RP waits for
                # them (PS3.8 Sta8 may still send P-DATA), as the requestor does.
                self._release_waiting = True
            else:
                self._answer_release()
        elif isinstance(event, AssociationAborted):
            self.stats.outcome = f"aborted: {event.detail}"
            self._discard_store(self.stats.outcome)
        elif isinstance(event, ConnectionClosed):
            self._discard_store("the connection closed")
            if self.transport is not None:
                self.transport.close()

    def _requested(self, event: AssociationRequested) -> None:
        rq = event.request
        self.stats.calling_ae, self.stats.called_ae = rq.calling_ae_title, rq.called_ae_title
        answer: AAssociateAC | AAssociateRJ
        self.requested = True
        if self._over_limit is not None and self._over_limit():
            # One line, with the association's closing one: a flood of newcomers
            # was three lines each.
            answer, why = LOCAL_LIMIT_EXCEEDED, (
                f"worker {self.settings.worker_id} has {self.settings.max_associations or 0} "
                "associations open, its share of [router] max_associations: transient")
        else:
            answer, why = negotiate_explained(rq, self.settings.policy)
        if isinstance(answer, AAssociateRJ):
            self.stats.outcome = (f"rejected (result {int(answer.result)} source "
                                  f"{int(answer.source)} reason {answer.reason})")
            log.log(logging.WARNING if answer is LOCAL_LIMIT_EXCEEDED else logging.INFO,
                    "association %s%s rejected: %s%s", self._who(), self._tls,
                    self.stats.outcome, f": {why}" if why else "")
            self.engine.reject(answer)
            return
        contexts = self.engine.accept(answer)
        log.info("association %s%s accepted: %d of %d contexts", self._who(), self._tls,
                 len(contexts), len(rq.presentation_contexts))
        self._emit("association.opened")

    def _command(self, event: CommandReceived) -> None:
        msg = event.message
        ctx = self.engine.contexts[event.context_id]
        if not self.engine.may_send_data and dimse.is_request(msg):
            # The peer ended the association behind its request (an A-ABORT in the
            # same read): nobody is left to answer. Its data set, if any, was not
            # delivered either (the engine drops it), so nothing is stored.
            log.info("association %s: %s not served: the association ended behind it",
                     self._who(), type(msg).__name__)
            return
        sop_class = getattr(msg, "affected_sop_class_uid", None) or \
            getattr(msg, "requested_sop_class_uid", None)
        if (sop_class is not None and sop_class != ctx.abstract_syntax
                and dimse.is_request(msg) and not isinstance(msg, dimse.CStoreRQ)):
            # PS3.8 7.1.1.13: a context carries messages of its own abstract syntax
            # (C-STORE reads its data set first, in _store_begin).
            log.warning("association %s: %s of %s on a context for %s: refused",
                        self._who(), type(msg).__name__, sop_class, ctx.abstract_syntax)
            self._refuse(ctx, msg, dimse.SOP_CLASS_NOT_SUPPORTED,
                         f"presentation context {ctx.context_id} is for "
                         f"{ctx.abstract_syntax}")
        elif (dimse.is_request(msg) and not ctx.requestor_scu
              and not isinstance(msg, dimse.NEventReportRQ)):
            # PS3.7 D.3.3.4: the requestor negotiated the SCP role alone for this SOP
            # class (Table D.3-10), so it may not invoke its operations here. But an
            # N-EVENT-REPORT is the SCP's to send (Storage Commitment results come on
            # an association whose requestor takes the SCP role, PS3.4 J.3.3).
            log.warning("association %s: %s on context %d, where the requestor took the "
                        "SCP role only: refused", self._who(), type(msg).__name__,
                        ctx.context_id)
            self.stats.failed += isinstance(msg, dimse.CStoreRQ)
            self._refuse(ctx, msg, dimse.SOP_CLASS_NOT_SUPPORTED,
                         "not negotiated in the SCU role for this SOP class")
        elif (isinstance(msg, dimse.CFindRQ | dimse.CMoveRQ | dimse.CGetRQ)
              and not msg.has_dataset):
            # PS3.7 9.1.2.1, 9.1.3.1, 9.1.4.1: the Identifier is mandatory. Waiting for
            # one would take the next data set (another request's) for it.
            log.warning("association %s: %s %d without an identifier: refused", self._who(),
                        _operation_name(msg), msg.message_id)
            self._refuse(ctx, msg, dimse.CANNOT_UNDERSTAND, "request without an identifier")
        elif isinstance(msg, dimse.CStoreRQ) and not msg.has_dataset:
            # PS3.7 9.3.1.1: a C-STORE-RQ carries the instance. Nothing to store, and
            # no data set will come to end it: answered here.
            log.warning("association %s: C-STORE-RQ %d without a data set: refused",
                        self._who(), msg.message_id)
            self.stats.failed += 1
            self._refuse(ctx, msg, dimse.CANNOT_UNDERSTAND, "C-STORE-RQ without a data set")
        elif isinstance(msg, dimse.CStoreRQ):
            self._store_begin(ctx, msg)
        elif isinstance(msg, dimse.CEchoRQ):
            self.engine.send_message(ctx.context_id, dimse.CEchoRSP(
                message_id_being_responded_to=msg.message_id,
                affected_sop_class_uid=msg.affected_sop_class_uid, status=dimse.SUCCESS))
        elif ((isinstance(msg, dimse.CFindRQ) and msg.affected_sop_class_uid in FIND_MODELS)
              or (isinstance(msg, dimse.CMoveRQ) and msg.affected_sop_class_uid in MOVE_MODELS)
              or (isinstance(msg, dimse.CGetRQ) and msg.affected_sop_class_uid in GET_MODELS)):
            self._query = (ctx, msg, [], 0)
        elif self._relayed_service(msg) is not None:
            if msg.has_dataset:
                self._query = (ctx, msg, [], 0)
            else:
                self._start_n(ctx, msg, None)
        elif isinstance(msg, dimse.CStoreRSP):
            # The requestor's answer to a C-GET sub-operation we relayed to it.
            waiting = self._sub_operations.pop(msg.message_id_being_responded_to, None)
            if waiting is not None and not waiting.done():
                waiting.set_result(msg)
            else:
                # Late (its sub-operation timed out), repeated, or never asked for.
                log.warning("association %s: C-STORE-RSP to message %d (status 0x%04X), "
                            "which no C-STORE of ours waits for: ignored", self._who(),
                            msg.message_id_being_responded_to, int(msg.status))
        elif isinstance(msg, dimse.CCancelRQ):
            # PS3.7 §9.3.2.3: only a running C-FIND, C-MOVE or C-GET can be cancelled.
            running = self._find
            if running is not None and \
                    running[1].message_id == msg.message_id_being_responded_to:
                log.info("association %s: C-CANCEL of %s %d", self._who(),
                         _operation_name(running[1]), msg.message_id_being_responded_to)
                running[2].cancel()
            else:
                self._cancel_held(msg.message_id_being_responded_to)
        elif dimse.is_request(msg):
            self._unsupported(ctx, msg)

    def _rejected(self, event: CommandRejected) -> None:
        """A framed command set the engine could not use (PS3.7 Annex C): a request
        is answered with the engine's status (0211H, 0212H or C000H), a response
        is dropped, and an unknown Command Field, which has no response to wait
        for, ends the association. Its data set, if any, is read and dropped."""
        self._discard_store()
        self._query = None
        if not self.engine.may_send_data:
            return  # ended behind it: nobody to answer
        answer = rejected_answer(event, self._who(), log)
        if isinstance(answer, str):
            self.abort(answer)
        elif answer is not None:
            self.stats.failed += event.command_field == dimse.CommandField.C_STORE_RQ
            self.engine.send_message(event.context_id, answer)

    def _unsupported(self, ctx: NegotiatedContext, msg: Any) -> None:
        """A request this worker does not serve yet: answer 0x0211, drop its data."""
        log.warning("association %s: %s not supported here", self._who(), type(msg).__name__)
        # Its data set, if any, arrives with no _store and is dropped.
        self._discard_store()
        rsp_cls = dimse.MESSAGE_TYPES[dimse.CommandField(msg.command_field | 0x8000)]
        fields: dict[str, Any] = {"message_id_being_responded_to": msg.message_id,
                                  "status": dimse.UNRECOGNIZED_OPERATION}
        sop_class = getattr(msg, "affected_sop_class_uid", None)
        if sop_class is not None and "affected_sop_class_uid" in rsp_cls.__dataclass_fields__:
            fields["affected_sop_class_uid"] = sop_class
        self.engine.send_message(ctx.context_id, rsp_cls(**fields))

    # -------------------------------------------------------------- C-STORE

    def _store_begin(self, ctx: NegotiatedContext, msg: dimse.CStoreRQ) -> None:
        self._discard_store()  # none is open (the engine ends each data set); never leak one
        self._store = (ctx, msg)
        self._store_error = 0
        if msg.affected_sop_class_uid != ctx.abstract_syntax:
            # Negotiated for another SOP class (PS3.8 §7.1.1.13): read and refuse.
            log.warning("association %s C-STORE of %s on a context for %s: refused",
                        self._who(), msg.affected_sop_class_uid, ctx.abstract_syntax)
            self._writer = None
            return
        self._identity = InstanceIdentity(ctx.transfer_syntax, msg.affected_sop_class_uid,
                                          msg.affected_sop_instance_uid)
        try:
            self._writer = self.spool.begin(
                sop_class_uid=msg.affected_sop_class_uid,
                sop_instance_uid=msg.affected_sop_instance_uid,
                transfer_syntax=ctx.transfer_syntax,
                calling_ae=self.stats.calling_ae, called_ae=self.stats.called_ae,
                association_id=self.stats.association_id)
        except (OSError, ProtocolError) as exc:
            # OSError: the disk; ProtocolError: values a file meta cannot hold.
            log.error("association %s: cannot open a spool file: %s", self._who(), exc)
            self._writer = None
            self._store_error = status_for_error(exc)

    def _store_fragments(self, run: list[DataReceived]) -> None:
        """Consecutive fragments of one data set: one write, then the last's handling."""
        writer = self._writer
        identity = self._identity
        if identity is not None:
            for e in run[:-1]:
                if identity.status:  # refused already; a 0 still walks the framing
                    break
                identity.feed(e.data, last=False)
        if writer is not None and not self._store_error:
            try:
                writer.write_many([e.data for e in run[:-1]])
            except OSError as exc:
                log.error("association %s: spool write failed: %s", self._who(), exc)
                self._store_error = status_for_error(exc)
                writer.abort()
                self._writer = None
        self._store_data(run[-1])

    def _store_data(self, event: DataReceived) -> None:
        writer = self._writer
        if self._identity is not None:
            self._identity.feed(event.data, last=event.last)
        if writer is not None and not self._store_error:
            try:
                writer.write(event.data)
            except OSError as exc:
                log.error("association %s: spool write failed: %s", self._who(), exc)
                self._store_error = status_for_error(exc)
                writer.abort()
                self._writer = None
        if not event.last:
            return
        if self._store is None:  # data of an unsupported request
            return
        ctx, msg = self._store
        self._store = None
        writer, self._writer = self._writer, None
        identity, self._identity = self._identity, None
        if writer is None:
            status = self._store_error or dimse.SOP_CLASS_NOT_SUPPORTED
            self._store_respond(ctx, msg, status, None, 0)
            return
        size = writer.bytes_written
        if identity is not None and identity.status:
            # PS3.4 B.2.3: not the instance the command names, or not a data set.
            writer.abort()
            log.warning("association %s C-STORE %s refused: %s", self._who(),
                        msg.affected_sop_instance_uid, identity.reason)
            self._store_respond(ctx, msg, identity.status, None, size,
                                comment=identity.reason)
            return
        self._busy = True
        dispatcher = self._dispatcher()
        route: Callable[[SpoolWriter, Path], Placement] | Placement | None = None
        if dispatcher is not None:
            info = self._association_info()
            mid = msg.move_originator_message_id
            # Maybe a sub-operation of a move this router proxies (workers/moves.py).
            sub_operation = mid is not None or \
                info.calling_ae in dispatcher.router.proxy_upstreams
            route = functools.partial(dispatcher.router.route, association=info,
                                      sub_operation=sub_operation,
                                      move_message_id=None if mid is None else int(mid),
                                      stream=self._stream if sub_operation else None)
            if not sub_operation and (not dispatcher.router.rules.needs_dataset
                                      or size <= LOOP_ROUTING_MAX_BYTES):
                # Decide here, where it costs no hand-over of the GIL to the commit
                # thread and back, and lets the RingCommitter commit it without that
                # thread. Rules that read attributes read the header of a file just
                # written (~70 us from the page cache); past LOOP_ROUTING_MAX_BYTES
                # the thread reads it, so a walk over a big data set never stalls the
                # loop.
                with contextlib.suppress(Exception):  # raises again there, and is answered
                    route = route(writer, writer.tmp_path)
        future = self.committer.submit(writer, route)
        loop_thread = threading.get_ident()

        def committed(f: Future[Placed]) -> None:
            if threading.get_ident() == loop_thread:  # resolved by the RingCommitter
                self.loop.call_soon(self._committed, ctx, msg, f, size, writer, dispatcher)
            else:
                self.loop.call_soon_threadsafe(self._committed, ctx, msg, f, size, writer,
                                               dispatcher)

        future.add_done_callback(committed)

    def _committed(self, ctx: NegotiatedContext, msg: dimse.CStoreRQ,
                   future: Future[Placed], size: int, writer: SpoolWriter,
                   dispatcher: Dispatcher | None) -> None:
        exc = future.exception()
        if exc is not None:
            self._busy = False
            # A data set the rules cannot read keeps its DIMSEError's status (C000H)
            # and says why; disk trouble is A700H or 0110H (status_for_error).
            if isinstance(exc, DIMSEError):
                log.warning("association %s: %s refused: %s", self._who(),
                            msg.affected_sop_instance_uid, exc)
                self._store_respond(ctx, msg, exc.status, None, size, comment=str(exc))
            else:
                log.error("association %s: commit of %s failed: %s", self._who(),
                          msg.affected_sop_instance_uid, exc)
                self._store_respond(ctx, msg, status_for_error(exc) if isinstance(
                    exc, OSError) else dimse.PROCESSING_FAILURE, None, size)
        else:
            placed = future.result()
            routed = placed.placement.note
            if not isinstance(routed, Routed) or dispatcher is None:
                self._busy = False
                self._store_respond(ctx, msg, dimse.SUCCESS, placed, size)
            elif routed.transparent is not None and placed.held is not None:
                # Stay busy: the answer is the destination's (D4 transparent mode).
                self.loop.create_task(self._transparent(
                    ctx, msg, placed, routed, size, writer, dispatcher))
                return
            else:
                self._busy = False
                dispatcher.enqueued(placed)
                self._store_respond(ctx, msg, routed.status, placed, size,
                                    comment=routed.comment, routed=routed)
        self._store_done()

    async def _transparent(self, ctx: NegotiatedContext, msg: dimse.CStoreRQ, placed: Placed,
                           routed: Routed, size: int, writer: SpoolWriter,
                           dispatcher: Dispatcher) -> None:
        assert routed.transparent is not None and placed.held is not None
        try:
            status, comment = await dispatcher.send_now(routed.transparent, placed.held,
                                                        routed.originator)
        finally:
            writer.release()
        # Relayed as is, a status that is not final would be taken for one: the
        # destination failed to store it.
        status, comment = dimse.final_store_status(status, comment, routed.transparent)
        if routed.move is not None:
            note_sub_operation_status(self.spool.root, routed.move, status)
        self._busy = False
        self._store_respond(ctx, msg, status, None, size, comment=comment, routed=routed)
        self._store_done()

    def _store_done(self) -> None:
        """A commit (or transparent send) has ended: serve what waited behind it, and
        close if the connection ended meanwhile (see _finish)."""
        self._run_mailbox()
        self._after_engine()
        if self._finish_when_done and not self._busy:
            self._finish()

    def _store_respond(self, ctx: NegotiatedContext, msg: dimse.CStoreRQ, status: int,
                       placed: Placed | None, size: int, *, comment: str | None = None,
                       routed: Routed | None = None) -> None:
        ok = dimse.status_category(status) in (dimse.StatusCategory.SUCCESS,
                                               dimse.StatusCategory.WARNING)
        if ok:
            self.stats.instances += 1
            self.stats.bytes_stored += size
        else:
            self.stats.failed += 1
        where = f" -> {placed.path.name}" if placed is not None and placed.path else ""
        why = f" [{routed.describe()}]" if routed is not None else ""
        if not self.engine.may_send_data:
            # Kept if it was committed, and sent on: the sender will likely send it
            # again, and the destination get it twice.
            why += " (not answered: the association ended first)"
        log.info("association %s C-STORE %s %s %d bytes status 0x%04X%s%s", self._who(),
                 msg.affected_sop_class_uid, msg.affected_sop_instance_uid, size, status,
                 where, why)
        self._emit("instance.stored" if ok else "instance.failed",
                   sop_class_uid=msg.affected_sop_class_uid,
                   sop_instance_uid=msg.affected_sop_instance_uid, bytes=size, status=status)
        if not self.engine.may_send_data:
            return  # aborted meanwhile: the file is kept, nobody to tell
        self.engine.send_message(ctx.context_id, dimse.CStoreRSP(
            message_id_being_responded_to=msg.message_id,
            affected_sop_class_uid=msg.affected_sop_class_uid,
            affected_sop_instance_uid=msg.affected_sop_instance_uid, status=status,
            error_comment=None if ok or not comment else dimse.error_comment(comment)))

    # --------------------------------------------------------------- C-FIND

    def _query_data(self, event: DataReceived) -> None:
        assert self._query is not None
        ctx, msg, parts, size = self._query
        size += len(event.data)
        if size <= MAX_IDENTIFIER:
            parts.append(bytes(event.data))
        self._query = (ctx, msg, parts, size)
        if not event.last:
            return
        self._query = None
        if size > MAX_IDENTIFIER:
            self._refuse_logged(ctx, msg, dimse.CANNOT_UNDERSTAND,
                                f"identifier larger than {MAX_IDENTIFIER} bytes")
            return
        if msg.message_id in self._cancelled_held:
            self._cancelled_held.discard(msg.message_id)
            self._refuse(ctx, msg, dimse.CANCEL, "cancelled before it started")
        elif isinstance(msg, dimse.CFindRQ):
            self._start_find(ctx, msg, b"".join(parts))
        elif isinstance(msg, dimse.CMoveRQ | dimse.CGetRQ):
            self._start_move(ctx, msg, b"".join(parts))
        else:
            self._start_n(ctx, msg, b"".join(parts))

    def _refuse_logged(self, ctx: NegotiatedContext, msg: Any, status: int,
                       comment: str) -> None:
        """Refuse a request, with the log line saying why (the callers of _refuse
        that log their own, with more to say, call it directly)."""
        log.warning("association %s: %s %d refused with 0x%04X: %s", self._who(),
                    _operation_name(msg), msg.message_id, status, comment)
        self._refuse(ctx, msg, status, comment)

    def _refuse(self, ctx: NegotiatedContext, msg: Any, status: int,
                comment: str) -> None:
        if isinstance(msg, dimse.CFindRQ):
            self._find_respond(ctx, msg, status, None, comment)
        elif isinstance(msg, dimse.CMoveRQ | dimse.CGetRQ):
            self._move_respond(ctx, msg, status, (None, None, None, None), None, comment)
        elif self.engine.may_send_data:
            self.engine.send_message(ctx.context_id, response_for(
                msg, status, error_comment=dimse.error_comment(comment)))
            self._after_engine()

    # ----------------------------------------------------------- N-services

    def _relayed_service(self, msg: Any) -> str | None:
        """The SOP class of a DIMSE-N request this router relays, else None."""
        dispatcher = self._dispatcher()
        if dispatcher is None:
            return None
        config = dispatcher.router.config
        mpps, commitment = uids.MODALITY_PERFORMED_PROCEDURE_STEP, \
            uids.STORAGE_COMMITMENT_PUSH_MODEL
        if config.mpps and (
                (isinstance(msg, dimse.NCreateRQ) and msg.affected_sop_class_uid == mpps)
                or (isinstance(msg, dimse.NSetRQ) and msg.requested_sop_class_uid == mpps)):
            return mpps
        if config.storage_commitment and (
                (isinstance(msg, dimse.NActionRQ) and msg.requested_sop_class_uid == commitment)
                or (isinstance(msg, dimse.NEventReportRQ)
                and msg.affected_sop_class_uid == commitment)):
            return commitment
        return None

    def _start_n(self, ctx: NegotiatedContext, msg: Any, data: bytes | None) -> None:
        self._relaying += 1
        self.loop.create_task(self._run_n_counted(ctx, msg, data))

    async def _run_n_counted(self, ctx: NegotiatedContext, msg: Any,
                             data: bytes | None) -> None:
        try:
            await self._run_n(ctx, msg, data)
        finally:
            self._relaying -= 1
            if not self._relaying and self._release_waiting:
                self._release_waiting = False
                self._answer_release()
                self._after_engine()

    async def _run_n(self, ctx: NegotiatedContext, msg: Any, data: bytes | None) -> None:
        dispatcher = self._dispatcher()
        sop_class = self._relayed_service(msg)
        if dispatcher is None or sop_class is None:
            return
        config = dispatcher.router.config
        name = type(msg).__name__[:-2]
        label = f"{self._who()} #{msg.message_id}"
        ts = ctx.transfer_syntax
        uid = action_uid = None
        destination: Destination | None = None
        try:
            if isinstance(msg, dimse.NEventReportRQ):
                # PS3.4 J.3.3: the PACS reports back. Only the PACS may: a report from
                # anyone else, relayed, would tell the modality that instances are
                # safe that no PACS committed, and it may then delete them.
                assert config.storage_commitment is not None
                pacs = config.destination(config.storage_commitment)
                if not await self.loop.run_in_executor(
                        None, pacs.is_peer, self.stats.calling_ae, self.stats.peer[0]):
                    why = f"a commitment result is only taken from {pacs.name}"
                    self._refuse(ctx, msg, dimse.PROCESSING_FAILURE, why)
                    log.warning("association %s: %s refused: %s", self._who(), name, why)
                    return
                uid, destination, why = self._requestor(config, data, ts)
                if destination is None:
                    self._refuse(ctx, msg, dimse.PROCESSING_FAILURE, why)
                    log.warning("association %s: %s refused: %s", self._who(), name, why)
                    return
                async with asyncio.timeout(self.settings.operation_timeout):
                    rsp, rsp_data = await relay_n_request(destination, msg, data, ts,
                                                          label=label, sop_class=sop_class,
                                                          as_scp=True)
            else:
                target = config.mpps if sop_class == uids.MODALITY_PERFORMED_PROCEDURE_STEP \
                    else config.storage_commitment
                assert target is not None
                destination = config.destination(target)
                if isinstance(msg, dimse.NActionRQ):
                    if config.destination_with_ae(self.stats.calling_ae) is None:
                        # The result comes back later on an association of the
                        # PACS's own (PS3.4 J.3.3), which the router can only relay
                        # to a [[destination]]: refused now, not lost then.
                        why = (f"no [[destination]] has AE title {self.stats.calling_ae} "
                               "to send the commitment result to")
                        self._refuse(ctx, msg, dimse.PROCESSING_FAILURE, why)
                        log.warning("association %s: %s refused: %s", self._who(), name, why)
                        return
                    action_uid = remember_commitment(self.spool.root, data, ts,
                                                     self.stats.calling_ae)
                # The PACS may send the result on this same association (PS3.4
                # J.3.3): it is kept open a while after the answer to take it.
                serve = self._serve_report if isinstance(msg, dimse.NActionRQ) else None
                async with asyncio.timeout(self.settings.operation_timeout):
                    rsp, rsp_data = await relay_n_request(
                        destination, msg, data, ts, label=label, sop_class=sop_class,
                        serve=serve, linger=min(REPORT_LINGER, destination.timeout / 2))
        except OutboundError as exc:
            self._forget_failed_action(action_uid)
            where = f"{destination.name if destination else '?'}: {exc}"
            log.warning("association %s: %s relay to %s", self._who(), name, where)
            self._refuse(ctx, msg, dimse.PROCESSING_FAILURE, where)
            return
        except DIMSEError as exc:
            self._forget_failed_action(action_uid)
            # A data set that cannot be read or converted for the other side (ours
            # or the upstream's answer): answered, never left waiting (PS3.7 10.1).
            log.warning("association %s: %s not relayed: %s", self._who(), name, exc)
            self._refuse(ctx, msg, exc.status, str(exc))
            return
        except TimeoutError:
            self._forget_failed_action(action_uid)
            detail = f"no answer in {self.settings.operation_timeout:.0f} s"
            log.warning("association %s: %s relay: %s", self._who(), name, detail)
            self._refuse(ctx, msg, dimse.PROCESSING_FAILURE, detail)
            return
        except OSError as exc:  # the commitment record in the spool (after TimeoutError)
            self._forget_failed_action(action_uid)
            log.error("association %s: %s not relayed: %s", self._who(), name, exc)
            self._refuse(ctx, msg, dimse.PROCESSING_FAILURE, str(exc))
            return
        if dimse.status_category(rsp.status) is dimse.StatusCategory.SUCCESS:
            if uid is not None:  # the report is delivered
                forget_commitment(self.spool.root, uid)
        else:
            self._forget_failed_action(action_uid)
        log.info("association %s: %s relayed to %s: status 0x%04X", self._who(), name,
                 destination.name, rsp.status)
        if self.engine.may_send_data:
            self.engine.send_message(ctx.context_id, dataclasses.replace(
                rsp, message_id_being_responded_to=msg.message_id), rsp_data)
            self._after_engine()

    def _requestor(self, config: Config, data: bytes | None, ts: str,
                   ) -> tuple[str | None, Destination | None, str]:
        """(Transaction UID, the destination of who asked for that commitment, or
        None and why not) for a Storage Commitment result's data set."""
        uid, requestor = requestor_of(self.spool.root, data, ts)
        destination = None if requestor is None else config.destination_with_ae(requestor)
        why = ("" if destination is not None else f"transaction {uid} unknown"
               if requestor is None else
               f"requestor {requestor} of transaction {uid} is not a destination")
        return uid, destination, why

    async def _serve_report(self, msg: Any, data: bytes | None,
                            ts: str) -> tuple[Any, bytes | None]:
        """A request the PACS sent on the association of a relayed Storage Commitment
        N-ACTION: its result (PS3.4 J.3.3), relayed to whoever asked as one sent on
        an association of the PACS's own is (_run_n); anything else is refused."""
        name = type(msg).__name__[:-2]
        where = f"association {self._who()}: {name} on the N-ACTION's association"
        dispatcher = self._dispatcher()
        if dispatcher is None or not isinstance(msg, dimse.NEventReportRQ) or \
                msg.affected_sop_class_uid != uids.STORAGE_COMMITMENT_PUSH_MODEL:
            log.warning("%s refused: only a Storage Commitment result is taken there",
                        where)
            return response_for(msg, dimse.UNRECOGNIZED_OPERATION, error_comment=(
                "only a Storage Commitment result is taken here")), None
        uid, destination, why = self._requestor(dispatcher.router.config, data, ts)
        try:
            if destination is None:
                raise OutboundError(why, transient=False)
            async with asyncio.timeout(self.settings.operation_timeout):
                rsp, rsp_data = await relay_n_request(
                    destination, msg, data, ts, label=f"{self._who()} result",
                    sop_class=uids.STORAGE_COMMITMENT_PUSH_MODEL, as_scp=True)
        except (OutboundError, DIMSEError, TimeoutError, OSError) as exc:
            detail = str(exc) or f"no answer in {self.settings.operation_timeout:.0f} s"
            status = exc.status if isinstance(exc, DIMSEError) else dimse.PROCESSING_FAILURE
            log.warning("%s not relayed: %s", where, detail)
            return response_for(msg, status,
                                error_comment=dimse.error_comment(detail)), None
        if uid is not None and dimse.status_category(rsp.status) is \
                dimse.StatusCategory.SUCCESS:
            forget_commitment(self.spool.root, uid)  # the report is delivered
        log.info("%s relayed to %s: status 0x%04X", where, destination.name, rsp.status)
        return dataclasses.replace(rsp, message_id_being_responded_to=msg.message_id), \
            rsp_data

    def _forget_failed_action(self, action_uid: str | None) -> None:
        """A relayed N-ACTION failed: its requestor hears so and will ask again. Its
        commitment record goes: kept, it would wait for a report that is not coming
        (for ever), or have one relayed for a request the requestor was told failed."""
        if action_uid is not None:
            forget_commitment(self.spool.root, action_uid)

    def _start_move(self, ctx: NegotiatedContext, msg: dimse.CMoveRQ | dimse.CGetRQ,
                    raw: bytes) -> None:
        """C-MOVE (direct) or C-GET through the upstream the retrieve rules name."""
        dispatcher = self._dispatcher()
        try:
            identifier = decode_dataset(raw, ctx.transfer_syntax)
        except (ProtocolError, ValueError) as exc:
            self._refuse_logged(ctx, msg, dimse.CANNOT_UNDERSTAND,
                                f"identifier does not decode: {exc}")
            return
        if dispatcher is None:
            self._refuse_logged(ctx, msg, dimse.UNABLE_TO_PROCESS,
                                "no retrieve rule matches this request")
            return
        config = dispatcher.router.config
        # PS3.4 C.4.2.1.5: the destination must be known here, not only upstream.
        requested = (config.destination_with_ae(msg.move_destination)
                     if isinstance(msg, dimse.CMoveRQ) else None)
        if isinstance(msg, dimse.CMoveRQ) and requested is None:
            log.info("association %s: C-MOVE %d to unknown destination %r refused",
                     self._who(), msg.message_id, msg.move_destination)
            self._refuse(ctx, msg, dimse.MOVE_DESTINATION_UNKNOWN,
                         f"move destination {msg.move_destination} is not configured here")
            return
        info = self._association_info()
        decision = dispatcher.router.rules.evaluate_retrieve(info, identifier,
                                                             datetime.datetime.now())
        if not decision.upstreams:
            log.info("association %s: %s %d refused: no retrieve rule matches",
                     self._who(), _operation_name(msg), msg.message_id)
            self._refuse(ctx, msg, dimse.UNABLE_TO_PROCESS, "no retrieve rule matches this request")
            return
        if isinstance(msg, dimse.CGetRQ) and not self.storage_contexts():
            # Nothing the upstream sends could reach the requestor: Orthanc and
            # dcmqrscp then failed each instance, and the requestor got C000H or A702H
            # with no word of why (an outside Q/R campaign). Said here, nobody asked.
            why = ("the requestor accepted no Storage SOP Class in the SCP role "
                   "(SCP/SCU Role Selection, PS3.7 D.3.3.4)")
            log.warning("association %s: C-GET %d refused: %s", self._who(),
                        msg.message_id, why)
            self._refuse(ctx, msg, dimse.OUT_OF_RESOURCES_UNABLE_TO_PERFORM_SUB_OPERATIONS,
                         "no storage context accepted in the SCP role")
            return
        upstreams = [config.destination(name) for name in decision.upstreams]
        level = str(identifier.get("QueryRetrieveLevel", "")).strip() or "?"
        request = Request(msg.affected_sop_class_uid, raw, ctx.transfer_syntax,
                          f"{self._who()} #{msg.message_id}", msg.priority,
                          decision.query_changes)
        proxy: MoveProxy | GetProxy
        if isinstance(msg, dimse.CMoveRQ):
            log.info("association %s: C-MOVE %d (%s) to %s -> %s", self._who(), msg.message_id,
                     level, msg.move_destination, decision.describe())
            assert requested is not None
            proxy = MoveProxy(
                request, upstreams=upstreams, move_destination=msg.move_destination,
                spool=self.spool.root,
                router_ae=config.ae_title, destination_name=requested.name,
                originator=Originator(self.stats.calling_ae, msg.message_id, msg.priority),
                respond=lambda status, counts, data, comment: self._move_respond(
                    ctx, msg, status, counts, data, comment))
        else:
            log.info("association %s: C-GET %d (%s) -> %s", self._who(), msg.message_id,
                     level, decision.describe())
            proxy = GetProxy(
                request, upstreams=upstreams, relay=self,
                respond=lambda status, counts, data, comment: self._move_respond(
                    ctx, msg, status, counts, data, comment))
        self._find = (ctx, msg, proxy)
        self.loop.create_task(self._run_find(proxy))

    # StoreRelay (workers.qr): the C-GET sub-operations go out on this association.

    def storage_contexts(self) -> list[NegotiatedContext]:
        return [c for c in self.engine.contexts.values() if c.requestor_scp]

    def begin_store(self, ctx: NegotiatedContext, rq: dimse.CStoreRQ) -> int:
        if not self.engine.may_send_data:
            raise OutboundError("the requestor's association ended")
        if self._releasing:
            raise OutboundError("the requestor released the association")
        mid = next(self._sub_ids)
        self.engine.send_message(ctx.context_id, dimse.CStoreRQ(
            message_id=mid, affected_sop_class_uid=rq.affected_sop_class_uid,
            affected_sop_instance_uid=rq.affected_sop_instance_uid, priority=rq.priority))
        self._sub_operations[mid] = self.loop.create_future()
        self._after_engine()
        return mid

    def store_data(self, ctx: NegotiatedContext, data: bytes, last: bool) -> None:
        if self.engine.may_send_data:
            self.engine.send_data(ctx.context_id, data, last)
            self._after_engine()

    async def writable(self) -> None:
        await self._writable.wait()

    def store_result(self, message_id: int) -> asyncio.Future[dimse.CStoreRSP]:
        return self._sub_operations[message_id]

    def pause_writing(self) -> None:
        # The transport's buffer is past its high-water mark (64 KiB by default).
        self._writable.clear()
        self._sync_reading()

    def resume_writing(self) -> None:
        self._writable.set()
        self._sync_reading()

    def _move_respond(self, ctx: NegotiatedContext, msg: dimse.CMoveRQ | dimse.CGetRQ,
                      status: int,
                      counts: tuple[int | None, int | None, int | None, int | None],
                      data: bytes | None, comment: str | None) -> None:
        if not self.engine.may_send_data:
            return
        remaining, completed, failed, warning = counts
        if status == dimse.CANCEL:
            # PS3.4 C.4.2.3.1, C.4.3.3.1: a Cancel response "shall contain" the
            # completed, failed and warning counts, 0 when nothing was done.
            completed, failed, warning = completed or 0, failed or 0, warning or 0
        rsp_type = dimse.CMoveRSP if isinstance(msg, dimse.CMoveRQ) else dimse.CGetRSP
        self.engine.send_message(ctx.context_id, rsp_type(
            message_id_being_responded_to=msg.message_id,
            affected_sop_class_uid=msg.affected_sop_class_uid, status=status,
            number_of_remaining_sub_operations=remaining,
            number_of_completed_sub_operations=completed,
            number_of_failed_sub_operations=failed,
            number_of_warning_sub_operations=warning,
            has_dataset=data is not None,
            error_comment=dimse.error_comment(comment or "")), data)
        self._after_engine()

    def _start_find(self, ctx: NegotiatedContext, msg: dimse.CFindRQ, raw: bytes) -> None:
        dispatcher = self._dispatcher()
        try:
            identifier = decode_dataset(raw, ctx.transfer_syntax)
        except (ProtocolError, ValueError) as exc:
            self._refuse_logged(ctx, msg, dimse.CANNOT_UNDERSTAND,
                                f"identifier does not decode: {exc}")
            return
        decision = None
        if dispatcher is not None:
            info = self._association_info()
            decision = dispatcher.router.rules.evaluate_query(info, identifier,
                                                              datetime.datetime.now())
        if decision is None or not decision.upstreams:
            log.info("association %s: C-FIND %d refused: no query rule matches",
                     self._who(), msg.message_id)
            self._find_respond(ctx, msg, dimse.UNABLE_TO_PROCESS, None,
                               "no query rule matches this query")
            return
        assert dispatcher is not None
        config = dispatcher.router.config
        upstreams = [config.destination(name) for name in decision.upstreams]
        request = Request(msg.affected_sop_class_uid, raw, ctx.transfer_syntax,
                          f"{self._who()} #{msg.message_id}", msg.priority,
                          decision.query_changes)
        log.info("association %s: C-FIND %d (%s) -> %s", self._who(), msg.message_id,
                 str(identifier.get("QueryRetrieveLevel", "")).strip() or "?",
                 decision.describe())
        # Matches name the router as where to retrieve from when it retrieves for
        # this requestor too (a worklist has nothing to retrieve).
        retrieve_ae = None
        if msg.affected_sop_class_uid != uids.MODALITY_WORKLIST_INFORMATION_FIND:
            retrieving = dispatcher.router.rules.evaluate_retrieve(
                info, identifier, datetime.datetime.now())
            if retrieving.upstreams:
                retrieve_ae = self.stats.called_ae
        proxy = FindProxy(
            request, upstreams=upstreams, result_changes=decision.result_changes,
            retrieve_ae_title=retrieve_ae, writable=self.writable,
            respond=lambda status, data, comment: self._find_respond(
                ctx, msg, status, data, comment))
        self._find = (ctx, msg, proxy)
        self.loop.create_task(self._run_find(proxy))

    async def _run_find(self, proxy: FindProxy | MoveProxy | GetProxy) -> None:
        running = self._find
        try:
            async with asyncio.timeout(self.settings.operation_timeout):
                await proxy.run()
        except TimeoutError:
            # The router-wide limit (D7): the upstream association was aborted when
            # run() was cancelled (its operation ends with it); fail the request.
            detail = (f"no final answer from upstream in "
                      f"{self.settings.operation_timeout:.0f} s")
            log.warning("association %s: %s", self._who(), detail)
            if isinstance(proxy, FindProxy):
                proxy.cancel()
                if running is not None and not proxy.answered:
                    self._refuse(running[0], running[1], dimse.REFUSED_OUT_OF_RESOURCES,
                                 detail)
            else:
                # After sub-operations, C001H with their counts, not A702H (PS3.4
                # C.4.2.1.5: that refusal says none could be performed).
                proxy.expire(detail)
        finally:
            self._find = None
            self._sync_idle()
            self._release_held()

    def _find_respond(self, ctx: NegotiatedContext, msg: dimse.CFindRQ, status: int,
                      data: bytes | None, comment: str | None) -> None:
        if not self.engine.may_send_data:
            return  # the requestor went away: nobody to tell
        self.engine.send_message(ctx.context_id, dimse.CFindRSP(
            message_id_being_responded_to=msg.message_id,
            affected_sop_class_uid=msg.affected_sop_class_uid, status=status,
            has_dataset=data is not None,
            error_comment=dimse.error_comment(comment or "")), data)
        self._after_engine()

    def _discard_store(self, why: str | None = None) -> None:
        """The association ended mid data set (``why``): nothing was acknowledged,
        drop it, and say so -- the sender still has it, but an operator looking for
        the instance must find why it is not here."""
        if why is not None and self._store is not None:
            msg = self._store[1]
            self.stats.failed += 1
            log.warning("association %s: C-STORE %d %s discarded before its data set "
                        "ended: %s", self._who(), msg.message_id,
                        msg.affected_sop_instance_uid, why)
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._store = None
        self._identity = None

    # ----------------------------------------------------------------- output

    def _after_engine(self) -> None:
        """Write what the engine queued, keep its timers, close when it says."""
        transport = self.transport
        if transport is None:
            return
        chunks = self.engine.data_to_send()
        if chunks and not transport.is_closing():
            transport.writelines(chunks)
        self._sync_artim()
        self._sync_idle()
        if self.engine.wants_close and not transport.is_closing():
            transport.close()

    def _sync_artim(self) -> None:
        generation = self.engine.artim
        if generation == self._artim_generation:
            return
        self._artim_generation = generation
        if self._artim is not None:
            self._artim.cancel()
            self._artim = None
        if generation is not None:
            self._artim = self.loop.call_later(self.settings.artim_timeout, self._artim_fired,
                                               generation)

    def _artim_fired(self, generation: int) -> None:
        if self.engine.artim != generation:
            return
        log.info("association %s: ARTIM timer expired in %s", self._who(),
                 self.engine.state.name)
        self.engine.timer_expired()
        self._pump()

    def _sync_idle(self) -> None:
        """Keep the idle timer armed while associated (PS3.8 has no timer there; a
        silent peer must not hold the actor for ever). Cheap on every PDU: it only
        notes the PDU count; the timer, armed once, looks when it fires."""
        count = self.engine.pdus_received
        if count != self._idle_count:
            self._idle_count, self._idle_since = count, self.loop.time()
        if self._idle is None and self.settings.idle_timeout and self.engine.is_associated:
            self._idle = self.loop.call_at(self._idle_since + self.settings.idle_timeout,
                                           self._idle_fired)

    def _idle_fired(self) -> None:
        self._idle = None
        if self._closed or not self.engine.is_associated:
            return
        now, timeout = self.loop.time(), self.settings.idle_timeout or 0.0
        if self._busy or self._find is not None:
            # The peer waits for us (a commit, an upstream's answers): not idle.
            self._idle_since = now
        elif self.engine.pdus_received == self._idle_count and \
                now - self._idle_since >= timeout:
            detail = f"no whole PDU from the peer for {timeout:.0f} s"
            log.warning("association %s: %s, aborting", self._who(), detail)
            self.stats.outcome = f"aborted: {detail}"
            self.engine.abort(detail)
            self._after_engine()
            if self.transport is not None:
                self.transport.close()
            return
        self._sync_idle()

    def _ack_now(self) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None:
            ack_now(sock)  # a Nagle-on sender is waiting for it (see ack_now)

    def abort(self, detail: str) -> None:
        """Abort from outside (drain grace over, worker stopping)."""
        if self._closed or self._finish_when_done:
            return  # gone already (its commit ends it)
        self.stats.outcome = f"aborted: {detail}"
        self.engine.abort(detail)
        self._discard_store(self.stats.outcome)
        self._after_engine()
        if self.transport is not None:
            self.transport.close()

    # ----------------------------------------------------------------- end

    def _finish(self) -> None:
        if self._closed:
            return
        if self._busy:
            # A complete instance is being committed (or sent on, transparent): its
            # outcome belongs in the closing line, and the association is not over
            # for the worker before it ends (a drain would stop under it). The
            # commit's end calls this again.
            self._finish_when_done = True
            return
        self._closed = True
        self._writable.set()  # nothing waits for a requestor that is gone
        self._discard_store()
        for event in self._deferred:  # held behind an operation: never served
            if isinstance(event, CommandReceived):
                self.stats.failed += isinstance(event.message, dimse.CStoreRQ)
                log.warning("association %s: %s not served: the association ended while "
                            "it was held", self._who(), _event_name(event))
        self._deferred.clear()
        running = self._find
        if running is not None and isinstance(running[2], FindProxy | GetProxy):
            # Nobody is left to read the matches, or to store what a C-GET relays on
            # this association: stop the upstreams' work. (A C-MOVE goes on: its
            # sub-operations go elsewhere and are the point, not their report.)
            running[2].cancel()
        for future in self._sub_operations.values():
            # Nobody will answer them: they fail now, not at the upstream's timeout
            # (the PACS, blocked on its C-STORE, could not act on the C-CANCEL).
            if not future.done():
                future.set_exception(OutboundError("the requestor's association ended"))
        self._sub_operations.clear()
        for handle in (self._artim, self._idle):
            if handle is not None:
                handle.cancel()
        if self.stats.outcome == "open":
            # No release or abort indication: say what the engine knows (an
            # AA-1 abort or AE-6 provider rejection before association).
            detail = self.engine.abort_detail
            self.stats.outcome = ("connection closed" if not detail else detail
                                  if detail.startswith("rejected") else f"aborted: {detail}")
        took = time.monotonic() - self.stats.started
        log.info("association %s closed: %s, %.3f s, %d instances (%d failed), %d bytes stored",
                 self._who(), self.stats.outcome, took, self.stats.instances, self.stats.failed,
                 self.stats.bytes_stored)
        self._emit("association.closed", outcome=self.stats.outcome, seconds=took,
                   instances=self.stats.instances, failed=self.stats.failed,
                   bytes=self.stats.bytes_stored)
        if self.on_closed is not None:
            self.on_closed(self)

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.on_event is None:
            return
        base: dict[str, Any] = {"association_id": self.stats.association_id}
        if kind.startswith("association."):
            base.update(peer=self.stats.peer, calling_ae=self.stats.calling_ae,
                        called_ae=self.stats.called_ae)
        self.on_event(kind, {**base, **fields})

    def _dispatcher(self) -> Dispatcher | None:
        """The worker's current rules and destinations (a reload swaps them)."""
        return self.dispatcher() if self.dispatcher is not None else None

    def _association_info(self) -> AssociationInfo:
        """What association conditions of the rules look at."""
        return AssociationInfo(calling_ae=self.stats.calling_ae,
                               called_ae=self.stats.called_ae, peer=self.stats.peer[0])

    def _serving(self) -> str:
        """The prefix of other libraries' lines logged while this actor works."""
        return f"association {self._who()}"

    def _who(self) -> str:
        s = self.stats
        aes = f" {s.calling_ae}->{s.called_ae}" if s.calling_ae else ""
        return f"{s.association_id}{aes} {s.peer[0]}:{s.peer[1]}"


_Retrieval = dimse.CFindRQ | dimse.CMoveRQ | dimse.CGetRQ


def _certificate_said(tls: ssl.SSLObject) -> str:
    """The peer's certificate subject, as the log names it: which modality came in
    is the first question when a TLS port is shared (PS3.15 B.1 node authentication)."""
    cert = tls.getpeercert()  # empty unless the listener verified one (tls_ca)
    if not cert:
        return "no client certificate checked"
    names = cast(tuple[tuple[tuple[str, str], ...], ...], cert.get("subject", ()))
    subject = ", ".join(f"{_SUBJECT_KEYS[key]}={value}" for rdn in names
                        for key, value in rdn if key in _SUBJECT_KEYS)
    return f"certificate {subject or 'without a subject name'}"


_SUBJECT_KEYS: Final = {"commonName": "CN", "organizationName": "O",
                        "organizationalUnitName": "OU"}


def _event_name(event: CommandReceived | CommandRejected) -> str:
    if isinstance(event, CommandRejected):
        return "a request it could not read"
    msg = event.message
    return f"{_operation_name(msg)} {getattr(msg, 'message_id', '')}".rstrip()


def _operation_name(msg: dimse.DimseMessage) -> str:
    """"C-FIND", "N-ACTION"...: the operation a request opens (its command field)."""
    return msg.command_field.name.replace("_", "-").removesuffix("-RQ")
