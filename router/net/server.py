"""Server API: accept associations and dispatch DIMSE indications to handlers.

Theory of operation
-------------------
:class:`Server` owns one listening socket; its accept loop hands each new
connection to a thread that runs one :class:`AssociationHandler` over a
blocking :class:`~router.net.connection.Connection` (one association per
thread, as DCMTK's tools and pynetdicom do, but without any polling: each thread
blocks in ``recv_into`` until bytes or a deadline arrive).

Negotiation is the pure :func:`router.dicom.negotiation.negotiate` against the
server's :class:`AcceptorPolicy`, plus an optional ``on_requested`` hook that
may reject; past ``max_associations`` open at once, a newcomer is still read
but answered with A-ASSOCIATE-RJ "local limit exceeded" (PS3.8 Table 9-21).
Each DIMSE request goes to the handler registered for it in :class:`Handlers`;
a C-STORE handler can instead take the data set as a stream
(``on_c_store_stream``), so an instance of any size is never held in memory.
Other data sets (identifiers, attribute lists) are held whole, up to
``max_dataset_size``. A request that cannot be served (an invalid command set,
a missing data set, a handler that fails) gets a failure status, never silence.
C-FIND/C-MOVE/C-GET handlers are generators: between results the association
is checked, without blocking, for a C-CANCEL (PS3.7 §9.3.2.3 / §9.3.3.3 /
§9.3.4.3). Sub-operations of C-MOVE go out on a new association to the
destination, opened when the first instance is ready and reopened if a later
one needs a presentation context it lacks; those of C-GET go back on the same
association (PS3.4 C.4.2/C.4.3). Each instance is read when its turn comes, so
an unreadable file is one failed sub-operation.

This is the library's SCP for scripts and tests; the router's worker processes
(DESIGN.md D3) drive the same engine from an event loop.
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from router.dicom import dimse, uids
from router.dicom.association import Association, Role
from router.dicom.dataset import decode_dataset, encode_dataset, read_part10_header
from router.dicom.errors import ProtocolError
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
)
from router.dicom.negotiation import (
    LOCAL_LIMIT_EXCEEDED,
    MAX_PRESENTATION_CONTEXTS,
    AcceptorPolicy,
    NegotiatedContext,
    negotiate_explained,
)
from router.dicom.pdu import AAssociateAC, AAssociateRJ, AAssociateRQ
from router.net.client import (
    DEFAULT_MAX_DATASET_SIZE,
    DEFAULT_MAX_INFLATED_SIZE,
    ClientAssociation,
    NetworkError,
    connect,
    file_chunks,
    rejected_answer,
    response_for,
)
from router.net.connection import Connection, PeerTimeout, configure_socket

__all__ = [
    "AssociationInfo",
    "CancelToken",
    "Handlers",
    "MoveDestination",
    "Request",
    "Server",
    "StoreSink",
]

log = logging.getLogger("router.net.server")


@dataclass(frozen=True, slots=True, kw_only=True)
class AssociationInfo:
    """Who is on the other end; passed to every handler."""

    id: str
    calling_ae: str
    called_ae: str
    peer: tuple[str, int]
    request: AAssociateRQ

    def __str__(self) -> str:
        return f"{self.id} {self.calling_ae}->{self.called_ae} {self.peer[0]}:{self.peer[1]}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One DIMSE request indication with its data set (raw bytes, as received)."""

    assoc: AssociationInfo
    context: NegotiatedContext
    message: Any
    dataset_bytes: bytes | None = None
    max_inflated_size: int | None = DEFAULT_MAX_INFLATED_SIZE

    def dataset(self, *, stop_before_pixels: bool = False) -> Dataset | None:
        """The data set decoded with pydicom (None if the message had none).

        A deflated one (PS3.5 A.5) is refused (DIMSEError, C000H) if it would
        inflate past ``max_inflated_size``."""
        if self.dataset_bytes is None:
            return None
        return decode_dataset(self.dataset_bytes, self.context.transfer_syntax,
                              stop_before_pixels=stop_before_pixels,
                              max_inflated_size=self.max_inflated_size)


class StoreSink(Protocol):
    """Receives one C-STORE data set as it arrives (``on_c_store_stream``)."""

    def write(self, data: memoryview) -> None: ...

    def close(self) -> int:
        """All fragments written: return the C-STORE status to answer with."""
        ...

    def abort(self) -> None:
        """The association ended before the last fragment: discard."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class MoveDestination:
    """Where a C-MOVE's sub-operations go (the move destination AE resolved)."""

    host: str
    port: int
    ae_title: str


class CancelToken:
    """Set when the requestor sent a C-CANCEL for the running operation."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def __bool__(self) -> bool:
        return self.cancelled


Instance = Dataset | str | os.PathLike[str]
FindResult = tuple[int, Dataset | None]
NResult = tuple[int, Dataset | None]


@dataclass(slots=True, kw_only=True)
class Handlers:
    """Handlers per DIMSE indication (PS3.7) and per association event.

    Unset DIMSE handlers answer with a sensible default: C-ECHO succeeds; the
    others fail with 0x0112/0x0122-class statuses (service not supported).
    """

    on_c_echo: Callable[[Request], int] | None = None
    on_c_store: Callable[[Request], int] | None = None
    on_c_store_stream: Callable[[Request], StoreSink] | None = None
    on_c_find: Callable[[Request, CancelToken], Iterable[FindResult]] | None = None
    on_c_move: Callable[[Request, CancelToken],
                        tuple[MoveDestination | None, Iterable[Instance]]] | None = None
    on_c_get: Callable[[Request, CancelToken], Iterable[Instance]] | None = None
    on_n_event_report: Callable[[Request], NResult] | None = None
    on_n_get: Callable[[Request], NResult] | None = None
    on_n_set: Callable[[Request], NResult] | None = None
    on_n_action: Callable[[Request], NResult] | None = None
    on_n_create: Callable[[Request], NResult] | None = None
    on_n_delete: Callable[[Request], NResult] | None = None
    # Association-level events.
    on_requested: Callable[[AssociationInfo], AAssociateRJ | None] | None = None
    on_accepted: Callable[[AssociationInfo], None] | None = None
    on_rejected: Callable[[AssociationInfo, AAssociateRJ], None] | None = None
    on_released: Callable[[AssociationInfo], None] | None = None
    on_aborted: Callable[[AssociationInfo, AssociationAborted], None] | None = None
    on_closed: Callable[[AssociationInfo | None, dict[str, Any]], None] | None = None


_N_HANDLERS: dict[type, str] = {
    dimse.NEventReportRQ: "on_n_event_report",
    dimse.NGetRQ: "on_n_get",
    dimse.NSetRQ: "on_n_set",
    dimse.NActionRQ: "on_n_action",
    dimse.NCreateRQ: "on_n_create",
    dimse.NDeleteRQ: "on_n_delete",
}


class _Refuse:
    """Reads a data set nobody will keep and answers with a failure status."""

    def __init__(self, status: int) -> None:
        self.status = status

    def write(self, data: memoryview) -> None:
        pass

    def close(self) -> int:
        return self.status

    def abort(self) -> None:
        pass


class AssociationHandler:
    """Runs one inbound association to completion (one thread)."""

    def __init__(self, server: Server, sock: socket.socket, *,
                 over_limit: bool = False) -> None:
        self.server = server
        self.handlers = server.handlers
        self.conn = Connection(sock, Association(Role.ACCEPTOR),
                               artim_timeout=server.artim_timeout)
        self.assoc = self.conn.assoc
        self.info: AssociationInfo | None = None
        # Accepted while max_associations were already open: refused at
        # negotiation (A-ASSOCIATE-RJ), not dropped, so the peer knows why.
        self.over_limit = over_limit
        self.started = time.monotonic()
        self.stats: dict[str, Any] = {"instances": 0, "messages": 0, "outcome": "closed"}
        self._pending: deque[Event] = deque()
        # Message IDs of C-CANCELs that arrived while a C-GET sub-operation
        # waited for its C-STORE-RSP; the next _cancelled() consumes them.
        self._cancel_ids: set[int] = set()

    # ------------------------------------------------------------ main loop

    def run(self) -> None:
        try:
            self.assoc.connection_made()
            self.conn.flush()
            while True:
                event = self._next()
                if isinstance(event, ConnectionClosed):
                    break
                try:
                    self._dispatch(event)
                except _Ended:
                    continue  # the event that ended it is pending: handle it next
        except Exception as exc:  # a handler bug must not leave the peer hanging
            log.exception("association %s failed: %s", self.info or self.conn.peer, exc)
            self.stats["outcome"] = f"error: {exc}"
            self.assoc.abort(f"internal error: {exc}")
            self.conn.flush()
        finally:
            self.conn.close()
            # Free the slot before on_closed runs: whoever waits for that
            # callback may open the next association at once.
            self.server._association_ended(self)
            self._log_close()

    def _next(self, *, queued: bool = True) -> Event:
        """The next event: first those ``_cancelled`` set aside (unless
        ``queued`` is False: a C-GET waiting for its C-STORE-RSP reads past them)."""
        if queued and self._pending:
            return self._pending.popleft()
        try:
            return self.conn.next_event(self.server.idle_timeout)
        except PeerTimeout:
            # PS3.8 has no timer for an established association; a peer that
            # went silent must not hold this thread forever.
            detail = f"no PDU from the peer for {self.server.idle_timeout:.0f} s"
            self.stats["outcome"] = f"aborted: {detail}"
            log.warning("association %s: %s, aborting", self.info or self.conn.peer, detail)
            self.assoc.abort(detail)
            self.conn.flush()
            self.conn.close()
            return self.conn.next_event()

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, AssociationRequested):
            self._on_request(event.request)
        elif isinstance(event, CommandReceived):
            self.stats["messages"] += 1
            self._on_command(event)
        elif isinstance(event, CommandRejected):
            self.stats["messages"] += 1
            self._on_rejected(event)
        elif isinstance(event, ReleaseRequested):
            self.stats["outcome"] = "released"
            self.assoc.release_response()
            self.conn.flush()
            if self.info and self.handlers.on_released:
                self.handlers.on_released(self.info)
        elif isinstance(event, AssociationAborted):
            self.stats["outcome"] = f"aborted: {event.detail}"
            log.info("association %s aborted: %s", self.info or self.conn.peer, event.detail)
            if self.info and self.handlers.on_aborted:
                self.handlers.on_aborted(self.info, event)
        elif isinstance(event, DataReceived):  # pragma: no cover - engine orders these
            raise ProtocolError("data set fragment outside a request")

    def _log_close(self) -> None:
        took = time.monotonic() - self.started
        detail = self.assoc.abort_detail
        if self.stats["outcome"] == "closed" and detail:
            # Aborted (Sta2, AA-1) or refused by the provider (AE-6) before any
            # association existed: the engine issues no indication then, so this
            # line is the only place to say why.
            self.stats["outcome"] = detail if detail.startswith("rejected") else (
                f"aborted: {detail}")
        who = str(self.info) if self.info else f"{self.conn.peer[0]}:{self.conn.peer[1]}"
        log.info("association %s closed: %s, %.3f s, %d messages, %d instances, "
                 "%d bytes in, %d bytes out", who, self.stats["outcome"], took,
                 self.stats["messages"], self.stats["instances"],
                 self.assoc.bytes_received, self.assoc.bytes_sent)
        if self.handlers.on_closed:
            self.handlers.on_closed(self.info, dict(self.stats, seconds=took))

    # --------------------------------------------------------- negotiation

    def _on_request(self, rq: AAssociateRQ) -> None:
        info = AssociationInfo(id=self.server._next_association_id(),
                               calling_ae=rq.calling_ae_title, called_ae=rq.called_ae_title,
                               peer=self.conn.peer, request=rq)
        self.info = info
        answer: AAssociateAC | AAssociateRJ
        if self.over_limit:
            log.warning("association %s: %d associations already open (max_associations)",
                        info, self.server.max_associations)
            answer, why = LOCAL_LIMIT_EXCEEDED, ""
        else:
            answer, why = negotiate_explained(rq, self.server.policy)
            if not isinstance(answer, AAssociateRJ) and self.handlers.on_requested:
                answer = self.handlers.on_requested(info) or answer
        if isinstance(answer, AAssociateRJ):
            self.stats["outcome"] = (f"rejected (result {int(answer.result)}, source "
                                     f"{int(answer.source)}, reason {answer.reason})")
            log.info("association %s rejected: result %d source %d reason %d%s", info,
                     answer.result, answer.source, answer.reason, f": {why}" if why else "")
            self.assoc.reject(answer)
            self.conn.flush()
            if self.handlers.on_rejected:
                self.handlers.on_rejected(info, answer)
            return
        contexts = self.assoc.accept(answer)
        self.conn.flush()
        self.stats["outcome"] = "open"
        log.info("association %s accepted: %d of %d contexts", info, len(contexts),
                 len(rq.presentation_contexts))
        if self.handlers.on_accepted:
            self.handlers.on_accepted(info)

    # ----------------------------------------------------------- messages

    def _on_command(self, event: CommandReceived) -> None:
        msg = event.message
        ctx = self.assoc.contexts[event.context_id]
        assert self.info is not None
        if isinstance(msg, _NEEDS_DATASET) and not msg.has_dataset:
            # PS3.7 §9.3 / §10.3: this request carries a data set (an instance,
            # an identifier, a modification list); without one there is
            # nothing to act on, and waiting for it would wait for ever.
            log.warning("association %s: %s (message %d) says no data set follows "
                        "(Command Data Set Type 0101H) but one is required: answered 0xC000",
                        self.info, type(msg).__name__, msg.message_id)
            self._respond(ctx, response_for(msg, dimse.CANNOT_UNDERSTAND))
            return
        if isinstance(msg, dimse.CStoreRQ):
            self._c_store(ctx, msg)
            return
        data: bytes | None = None
        if msg.has_dataset:
            data = self._read_dataset(self.server.max_dataset_size)
            if data is None:
                self._too_large(ctx, msg)
                return
        request = Request(assoc=self.info, context=ctx, message=msg, dataset_bytes=data,
                          max_inflated_size=self.server.max_inflated_size)
        if isinstance(msg, dimse.CEchoRQ):
            status = self.handlers.on_c_echo(request) if self.handlers.on_c_echo else 0
            self._respond(ctx, dimse.CEchoRSP(message_id_being_responded_to=msg.message_id,
                                              affected_sop_class_uid=msg.affected_sop_class_uid,
                                              status=status))
        elif isinstance(msg, dimse.CFindRQ):
            self._c_find(request)
        elif isinstance(msg, dimse.CMoveRQ):
            self._c_move(request)
        elif isinstance(msg, dimse.CGetRQ):
            self._c_get(request)
        elif isinstance(msg, dimse.CCancelRQ):
            pass  # nothing running for it (PS3.7 §9.3.2.3: may arrive after the end)
        elif type(msg) in _N_HANDLERS:
            self._n_service(request)
        else:
            log.warning("association %s: unexpected %s", self.info, type(msg).__name__)

    def _on_rejected(self, event: CommandRejected) -> None:
        """A framed command set the engine could not use (PS3.7 Annex C): a
        request is answered with the engine's status, a response dropped."""
        if event.has_dataset:
            self._drain()
        answer = rejected_answer(event, self.info or self.conn.peer, log)
        if isinstance(answer, str):
            self.stats["outcome"] = f"aborted: {answer}"
            self.assoc.abort(answer)
            self.conn.flush()
        elif answer is not None:
            self.assoc.send_message(event.context_id, answer)
            self.conn.flush()

    def _too_large(self, ctx: NegotiatedContext, msg: Any) -> None:
        """A data set past ``max_dataset_size`` was read and dropped: refuse."""
        status = _TOO_LARGE_STATUS.get(type(msg), dimse.CANNOT_UNDERSTAND)
        log.warning("association %s: %s (message %s) data set larger than %d bytes "
                    "(max_dataset_size): answered 0x%04X", self.info, type(msg).__name__,
                    getattr(msg, "message_id", "?"), self.server.max_dataset_size or 0, status)
        if isinstance(msg, dimse.DimseRequest):
            self._respond(ctx, response_for(msg, status))

    def _read_dataset(self, limit: int | None) -> bytes | None:
        """The data set that follows a command; None if it went past ``limit``
        bytes (it is then read to its end and dropped).

        Fragments go into one BytesIO, whose getvalue() hands its buffer over
        as ``bytes`` without a copy: each byte is copied once, and handlers
        still get immutable (hashable) bytes."""
        buf: io.BytesIO | None = io.BytesIO()
        size = 0
        while True:
            event = self._next()
            if not isinstance(event, DataReceived):
                self._lost(event)
            size += len(event.data)
            if buf is not None:
                if limit is not None and size > limit:
                    buf = None  # free what was kept; the rest is only counted
                else:
                    buf.write(event.data)
            if event.last:
                return None if buf is None else buf.getvalue()

    def _drain(self, *, queued: bool = True) -> None:
        """Read and drop a data set nobody will use."""
        while True:
            event = self._next(queued=queued)
            if not isinstance(event, DataReceived):
                self._lost(event)
            if event.last:
                return

    def _lost(self, event: Event) -> NoReturn:
        """The association ended in the middle of a message."""
        self._pending.appendleft(event)
        raise _Ended

    def _respond(self, ctx: NegotiatedContext, rsp: Any, dataset: bytes | None = None) -> None:
        self.assoc.send_message(ctx.context_id, rsp, dataset)
        self.conn.flush()

    def _c_store(self, ctx: NegotiatedContext, msg: dimse.CStoreRQ) -> None:
        assert self.info is not None
        request = Request(assoc=self.info, context=ctx, message=msg,
                          max_inflated_size=self.server.max_inflated_size)
        sink: StoreSink
        if msg.affected_sop_class_uid != ctx.abstract_syntax:
            # The context was negotiated for another SOP class (PS3.8 §7.1.1.13):
            # the data set is read and dropped, and the sender told so.
            log.warning("association %s C-STORE of %s on context %d, which was accepted "
                        "for %s: refused 0x0122", self.info, msg.affected_sop_class_uid,
                        ctx.context_id, ctx.abstract_syntax)
            sink = _Refuse(dimse.SOP_CLASS_NOT_SUPPORTED)
        elif self.handlers.on_c_store_stream is not None:
            try:
                sink = self.handlers.on_c_store_stream(request)
            except Exception as exc:  # cannot even start storing (disk full...)
                sink = _Refuse(self._store_failed(msg, exc))
        elif self.handlers.on_c_store is not None:
            sink = _Collect(self.handlers.on_c_store, request)
        else:
            # Nobody stores it: never acknowledge what is not kept.
            sink = _Refuse(dimse.SOP_CLASS_NOT_SUPPORTED)
        size = 0
        failed: int | None = None
        while True:
            event = self._next()
            if not isinstance(event, DataReceived):
                if failed is None:
                    sink.abort()
                self._lost(event)
            size += len(event.data)
            if failed is None:
                try:
                    sink.write(event.data)
                except Exception as exc:
                    # The rest of the data set is still read (the peer sends it
                    # anyway), then refused; the association goes on.
                    failed = self._store_failed(msg, exc)
                    self._abort_sink(sink)
            if event.last:
                break
        if failed is not None:
            status = failed
        else:
            try:
                status = sink.close()
            except Exception:
                log.exception("C-STORE handler failed for %s", msg.affected_sop_instance_uid)
                status = dimse.PROCESSING_FAILURE
        if dimse.status_category(status) in (dimse.StatusCategory.SUCCESS,
                                             dimse.StatusCategory.WARNING):
            self.stats["instances"] += 1
        log.info("association %s C-STORE %s %s %d bytes status 0x%04X", self.info,
                 msg.affected_sop_class_uid, msg.affected_sop_instance_uid, size, status)
        self._respond(ctx, dimse.CStoreRSP(
            message_id_being_responded_to=msg.message_id,
            affected_sop_class_uid=msg.affected_sop_class_uid,
            affected_sop_instance_uid=msg.affected_sop_instance_uid, status=status))

    def _store_failed(self, msg: dimse.CStoreRQ, exc: Exception) -> int:
        """The status for a sink that failed: A700 (out of resources, PS3.4
        B.2.3) when the disk is full, 0110H otherwise."""
        full = isinstance(exc, OSError) and exc.errno in _DISK_FULL
        status = dimse.REFUSED_OUT_OF_RESOURCES if full else dimse.PROCESSING_FAILURE
        log.warning("association %s C-STORE %s: storing failed (%s: %s): answering 0x%04X",
                    self.info, msg.affected_sop_instance_uid, type(exc).__name__, exc, status)
        return status

    def _abort_sink(self, sink: StoreSink) -> None:
        try:
            sink.abort()
        except Exception:
            log.exception("association %s: discarding a failed C-STORE failed", self.info)

    # ---------------------------------------------------- cancel detection

    def _cancelled(self, message_id: int, token: CancelToken) -> bool:
        """Non-blocking check for a C-CANCEL of ``message_id`` (no polling loop:
        one non-blocking read of what has arrived, between two results).

        Reading stops at the first event that is not a C-CANCEL: it waits in
        ``_pending`` for the operation to end, and nothing after it is read
        (a peer that streams other requests meanwhile is not buffered)."""
        if message_id in self._cancel_ids:
            self._cancel_ids.discard(message_id)
            token.cancelled = True
        while not self._pending:
            got = self.assoc.next_event()
            if got is NEED_DATA:
                if self.conn.closed:
                    break
                if self.assoc.pdu_in_progress:
                    # A PDU has begun (DCMTK writes header and body separately):
                    # finish reading it, within a bound, before deciding.
                    try:
                        got = self.conn.next_event(_PDU_COMPLETION_TIMEOUT)
                    except PeerTimeout:
                        break
                elif self.conn.read_available():
                    continue
                else:
                    break
            assert not isinstance(got, type(NEED_DATA))
            if isinstance(got, CommandReceived) and isinstance(got.message, dimse.CCancelRQ):
                if got.message.message_id_being_responded_to == message_id:
                    token.cancelled = True
                continue
            self._pending.append(got)
            if isinstance(got, AssociationAborted | ConnectionClosed):
                raise _Ended
        return token.cancelled

    # ------------------------------------------------------------ C-FIND

    def _c_find(self, request: Request) -> None:
        msg = request.message
        ctx = request.context
        token = CancelToken()

        def rsp(status: int, has_dataset: bool) -> dimse.CFindRSP:
            return dimse.CFindRSP(message_id_being_responded_to=msg.message_id,
                                  affected_sop_class_uid=msg.affected_sop_class_uid,
                                  status=status, has_dataset=has_dataset)

        if self.handlers.on_c_find is None:
            self._respond(ctx, rsp(dimse.SOP_CLASS_NOT_SUPPORTED, False))
            return
        final = dimse.SUCCESS
        try:
            for status, identifier in self.handlers.on_c_find(request, token):
                if self._cancelled(msg.message_id, token):
                    final = dimse.CANCEL
                    break
                if dimse.status_category(status) is not dimse.StatusCategory.PENDING:
                    final = status
                    break
                payload = (encode_dataset(identifier, ctx.transfer_syntax)
                           if identifier is not None else None)
                self._respond(ctx, rsp(status, payload is not None), payload)
            else:
                if self._cancelled(msg.message_id, token):
                    final = dimse.CANCEL
        except _Ended:
            raise
        except Exception:
            log.exception("C-FIND handler failed")
            final = dimse.CANNOT_UNDERSTAND
        self._respond(ctx, rsp(final, False))

    # ------------------------------------------------- C-MOVE and C-GET

    def _c_move(self, request: Request) -> None:
        msg = request.message
        ctx = request.context
        if self.handlers.on_c_move is None:
            self._respond(ctx, self._retrieve_rsp(msg, dimse.SOP_CLASS_NOT_SUPPORTED))
            return
        token = CancelToken()
        try:
            destination, found = self.handlers.on_c_move(request, token)
            # Only the list: each instance is read when its turn comes.
            instances = list(found) if destination is not None else []
        except Exception:
            # PS3.4 C.4.2.1.5: C000H "Failed: Unable to process".
            log.exception("association %s: C-MOVE handler failed", self.info)
            self._respond(ctx, self._retrieve_rsp(msg, dimse.CANNOT_UNDERSTAND))
            return
        if destination is None:
            log.warning("association %s: C-MOVE destination %s unknown: answered 0xA801",
                        self.info, msg.move_destination)
            self._respond(ctx, self._retrieve_rsp(msg, dimse.MOVE_DESTINATION_UNKNOWN))
            return
        target = _MoveTarget(self.server, destination,
                             originator=(request.assoc.calling_ae, msg.message_id))
        try:
            self._sub_operations(request, instances, token, target.store)
        finally:
            target.close()

    def _c_get(self, request: Request) -> None:
        msg = request.message
        ctx = request.context
        if self.handlers.on_c_get is None:
            self._respond(ctx, self._retrieve_rsp(msg, dimse.SOP_CLASS_NOT_SUPPORTED))
            return
        token = CancelToken()
        try:
            instances = list(self.handlers.on_c_get(request, token))
        except Exception:
            # PS3.4 C.4.3.1.4: C000H "Failed: Unable to process".
            log.exception("association %s: C-GET handler failed", self.info)
            self._respond(ctx, self._retrieve_rsp(msg, dimse.CANNOT_UNDERSTAND))
            return
        self._sub_operations(request, instances, token, self._store_here)

    def _sub_operations(self, request: Request, instances: list[Instance], token: CancelToken,
                        store: Callable[[_Item], int]) -> None:
        msg = request.message
        ctx = request.context
        name = "C-MOVE" if isinstance(msg, dimse.CMoveRQ) else "C-GET"
        remaining = len(instances)
        completed = failed = warning = 0
        failed_uids: list[str] = []
        refused: int | None = None
        for instance in instances:
            if self._cancelled(msg.message_id, token):
                break
            uid: str | None = None
            try:
                item = _load(instance)
                uid = item.sop_instance
                status = store(item)
            except _Refused as exc:
                log.warning("association %s %s: %s; refusing the %d sub-operations left",
                            self.info, name, exc, remaining)
                refused = exc.status
                break
            except _Ended:
                raise
            except Exception as exc:  # one bad instance fails one sub-operation
                log.warning("association %s %s sub-operation for %s failed: %s: %s",
                            self.info, name, uid or instance, type(exc).__name__, exc)
                status = dimse.PROCESSING_FAILURE
            remaining -= 1
            category = dimse.status_category(status)
            if category is dimse.StatusCategory.SUCCESS:
                completed += 1
            elif category is dimse.StatusCategory.WARNING:
                warning += 1
            else:
                failed += 1
                if uid is not None:
                    failed_uids.append(uid)
            if remaining:
                self._respond(ctx, self._retrieve_rsp(msg, dimse.PENDING, remaining,
                                                      completed, failed, warning))
        if token.cancelled:
            final = dimse.CANCEL
        elif refused is not None:
            # PS3.4 Table C.4-2: a refusal carries completed, failed and warning
            # counts, not remaining; what could not be attempted failed.
            final = refused
            failed += remaining
        elif failed and not completed and not warning:
            # Every sub-operation failed: a failure, not the B000H warning
            # ("Sub-operations Complete - One or more Failures"), PS3.4
            # C.4.2.1.5 / C.4.3.1.4; A702H "Refused: Out of Resources - Unable
            # to perform sub-operations", as pynetdicom answers then.
            final = dimse.OUT_OF_RESOURCES_UNABLE_TO_PERFORM_SUB_OPERATIONS
        elif failed or warning:
            final = dimse.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
        else:
            final = dimse.SUCCESS
        payload = None
        if failed_uids:
            # PS3.4 C.4.2.1.4.3 / C.4.3.1.3.3: Failed SOP Instance UID List.
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = failed_uids
            payload = encode_dataset(ds, ctx.transfer_syntax)
        left = remaining if token.cancelled else None
        rsp = self._retrieve_rsp(msg, final, left, completed, failed, warning,
                                 has_dataset=payload is not None)
        self._respond(ctx, rsp, payload)

    def _retrieve_rsp(self, msg: Any, status: int, remaining: int | None = None,
                      completed: int | None = None, failed: int | None = None,
                      warning: int | None = None, *, has_dataset: bool = False) -> Any:
        cls = dimse.CMoveRSP if isinstance(msg, dimse.CMoveRQ) else dimse.CGetRSP
        return cls(message_id_being_responded_to=msg.message_id,
                   affected_sop_class_uid=msg.affected_sop_class_uid, status=status,
                   number_of_remaining_sub_operations=_us(remaining),
                   number_of_completed_sub_operations=_us(completed),
                   number_of_failed_sub_operations=_us(failed),
                   number_of_warning_sub_operations=_us(warning), has_dataset=has_dataset)

    def _store_here(self, item: _Item) -> int:
        """C-GET sub-operation: C-STORE back on this association (PS3.4 C.4.3).

        Sent in the item's own transfer syntax if the requestor accepted it
        there; an uncompressed item otherwise goes in another accepted
        uncompressed syntax, converted (getscu proposes explicit LE, explicit BE
        and implicit LE in one context per class, so only one is accepted).
        """
        ctx = fallback = None
        for c in self.assoc.contexts.values():
            if c.abstract_syntax != item.sop_class or not c.requestor_scp:
                continue
            if c.transfer_syntax == item.transfer_syntax:
                ctx = c
                break
            if fallback is None and uids.is_uncompressed(c.transfer_syntax) and \
                    uids.is_uncompressed(item.transfer_syntax):
                fallback = c
        ctx = ctx or fallback
        if ctx is None:
            log.warning("C-GET: no context where the requestor is SCP for %s in %s",
                        item.sop_class, item.transfer_syntax)
            return dimse.PROCESSING_FAILURE
        mid = (self.stats["messages"] + 1000) % 65536 or 1
        self.stats["messages"] += 1
        rq = dimse.CStoreRQ(message_id=mid, affected_sop_class_uid=item.sop_class,
                            affected_sop_instance_uid=item.sop_instance)
        if ctx.transfer_syntax != item.transfer_syntax:
            ds = item.dataset
            if ds is None:
                ds = decode_dataset(b"".join(c for c, _ in item.chunks(1 << 20)),
                                    item.transfer_syntax)
            self.assoc.send_message(ctx.context_id, rq, encode_dataset(ds, ctx.transfer_syntax))
            self.conn.flush()
        else:
            self.assoc.send_message(ctx.context_id, rq)
            # Stream the data set in PDU-sized pieces: memory stays bounded.
            size = max(self.assoc.max_send_fragment, 1 << 16)
            for chunk, last in item.chunks(size):
                self.assoc.send_data(ctx.context_id, chunk, last)
                self.conn.flush()
        while True:
            event = self._next(queued=False)
            if isinstance(event, CommandRejected):
                if event.has_dataset:
                    self._drain(queued=False)
                if event.command_field & 0x8000 and event.message_id == mid:
                    log.warning("association %s C-GET: invalid C-STORE-RSP to message %d: %s",
                                self.info, mid, event.detail)
                    return dimse.PROCESSING_FAILURE
                log.warning("association %s C-GET: dropped an invalid command set while "
                            "waiting for a C-STORE-RSP: %s", self.info, event.detail)
                continue
            if isinstance(event, CommandReceived):
                m = event.message
                if isinstance(m, dimse.CStoreRSP) and m.message_id_being_responded_to == mid:
                    if m.has_dataset:
                        self._drain(queued=False)
                    return int(m.status)
                if isinstance(m, dimse.CCancelRQ):
                    # Not into _pending: _next() reads that first, so the same
                    # C-CANCEL came straight back here, forever (busy loop).
                    self._cancel_ids.add(m.message_id_being_responded_to)
                    continue
                log.warning("association %s C-GET: dropped %s that came while waiting for "
                            "a C-STORE-RSP", self.info, type(m).__name__)
                if m.has_dataset:
                    self._drain(queued=False)
                continue
            self._lost(event)

    # ---------------------------------------------------------- N-services

    def _n_service(self, request: Request) -> None:
        msg = request.message
        name = _N_HANDLERS[type(msg)]
        handler = getattr(self.handlers, name)
        reply: Dataset | None = None
        if handler is None:
            status = dimse.SOP_CLASS_NOT_SUPPORTED
        else:
            try:
                status, reply = handler(request)
            except Exception:
                log.exception("%s handler failed", name)
                status = dimse.PROCESSING_FAILURE
        sop_instance = getattr(msg, "affected_sop_instance_uid", None) or getattr(
            msg, "requested_sop_instance_uid", None)
        if reply is not None and sop_instance is None and "AffectedSOPInstanceUID" in reply:
            sop_instance = str(reply.AffectedSOPInstanceUID)
        if reply is not None:
            # A handler passes an assigned instance UID as (0000,1000) in the reply,
            # as pynetdicom's do; command elements never go in a data set (PS3.7 §6.3).
            reply = Dataset({tag: elem for tag, elem in reply.items() if tag >> 16})
        if isinstance(msg, dimse.NCreateRQ):
            sop_instance = _created_instance(msg, status, sop_instance)
        payload = encode_dataset(reply, request.context.transfer_syntax) if reply else None
        self._respond(request.context,
                      response_for(msg, status, affected_sop_instance_uid=sop_instance,
                                   has_dataset=payload is not None),
                      payload)


def _created_instance(msg: dimse.NCreateRQ, status: int, uid: str | None) -> str | None:
    """Affected SOP Instance UID of an N-CREATE-RSP (PS3.7 §10.1.5.1.4): only
    when the instance was created (success, or a warning: created with
    changes), then always: the requestor's, the handler's, or a new one."""
    if dimse.status_category(status) not in (dimse.StatusCategory.SUCCESS,
                                             dimse.StatusCategory.WARNING):
        return None
    if uid is None:
        uid = str(generate_uid(prefix=None))
        log.info("N-CREATE of %s: instance UID %s assigned", msg.affected_sop_class_uid, uid)
    return uid


def _us(count: int | None) -> int | None:
    # Sub-operation counts are US (PS3.7 Table E.1-1): more than 65535
    # instances are reported as 65535, never as an encoding error.
    return None if count is None else min(count, 0xFFFF)


# Requests whose data set is mandatory (PS3.7 §9.1 / §10.1: the instance,
# identifier or modification list is M). N-CREATE's attribute list is U.
_NEEDS_DATASET = (dimse.CStoreRQ, dimse.CFindRQ, dimse.CMoveRQ, dimse.CGetRQ, dimse.NSetRQ)

# What a request whose data set exceeds max_dataset_size is answered with:
# "Refused: out of resources" where the service defines it (PS3.4 C.4.1.1.4),
# "unable to process" for the retrieves, "resource limitation" for DIMSE-N
# (PS3.7 Annex C).
_TOO_LARGE_STATUS: dict[type, int] = {
    dimse.CFindRQ: dimse.REFUSED_OUT_OF_RESOURCES,
    dimse.CMoveRQ: dimse.CANNOT_UNDERSTAND,
    dimse.CGetRQ: dimse.CANNOT_UNDERSTAND,
    **dict.fromkeys(_N_HANDLERS, dimse.RESOURCE_LIMITATION),
}

_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})

# How long a started PDU may take to arrive whole while we look for a C-CANCEL.
_PDU_COMPLETION_TIMEOUT = 1.0

_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept(2), Linux: "pending network errors on the new socket" are returned by
# accept and "should be treated like EAGAIN by retrying".
_ACCEPT_RETRY_ERRORS = frozenset(
    code for code in (getattr(errno, name, None) for name in (
        "ENETDOWN", "EPROTO", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
        "EOPNOTSUPP", "ENETUNREACH", "ECONNABORTED"))
    if code is not None)


class _Ended(Exception):
    """The association ended while a handler was in the middle of something."""


class _Refused(Exception):
    """The remaining sub-operations cannot be performed (``status`` says why)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Collect:
    """Adapts a whole-data-set ``on_c_store`` handler to the streaming interface."""

    def __init__(self, handler: Callable[[Request], int], request: Request) -> None:
        self.handler = handler
        self.request = request
        self.data = io.BytesIO()  # one copy per byte (see _read_dataset)

    def write(self, data: memoryview) -> None:
        self.data.write(data)

    def close(self) -> int:
        req = self.request
        full = Request(assoc=req.assoc, context=req.context, message=req.message,
                       dataset_bytes=self.data.getvalue(),
                       max_inflated_size=req.max_inflated_size)
        self.data = io.BytesIO()
        return self.handler(full)

    def abort(self) -> None:
        self.data = io.BytesIO()


@dataclass(slots=True)
class _Item:
    """One instance to send as a sub-operation: a file (sent as is) or a Dataset."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    path: Path | None = None
    offset: int = 0
    dataset: Dataset | None = field(default=None)

    def chunks(self, size: int) -> Iterator[tuple[bytes, bool]]:
        """The data set bytes in pieces of ``size``, each with a last flag."""
        if self.path is None:
            assert self.dataset is not None
            yield encode_dataset(self.dataset, self.transfer_syntax), True
            return
        yield from file_chunks(self.path, self.offset, size)


def _load(instance: Instance) -> _Item:
    if isinstance(instance, Dataset):
        ts = str(getattr(getattr(instance, "file_meta", None), "TransferSyntaxUID", "")
                 or uids.EXPLICIT_VR_LITTLE_ENDIAN)
        return _Item(sop_class=str(instance.SOPClassUID),
                     sop_instance=str(instance.SOPInstanceUID), transfer_syntax=ts,
                     dataset=instance)
    path = Path(instance)
    header = read_part10_header(path)
    return _Item(sop_class=header.sop_class_uid, sop_instance=header.sop_instance_uid,
                 transfer_syntax=header.transfer_syntax, path=path,
                 offset=header.dataset_offset)


class _MoveTarget:
    """The C-MOVE destination (PS3.4 C.4.2): associated on demand.

    The first instance opens the association, proposing one context per (SOP
    class, transfer syntax) seen so far (an uncompressed one also in explicit
    and implicit VR LE, for conversion). An instance whose pair was not
    proposed reopens it with that pair added; one proposed but refused fails
    on its own. A destination that stops answering for ``move_timeout`` fails
    that sub-operation and loses the association; the next one reconnects.
    """

    def __init__(self, server: Server, destination: MoveDestination,
                 originator: tuple[str, int]) -> None:
        self.server = server
        self.destination = destination
        # Move Originator AE Title / Message ID (PS3.7 §9.1.1.1).
        self.originator = originator
        self.sub: ClientAssociation | None = None
        self.pairs: dict[tuple[str, str], None] = {}  # proposed, in order
        self.proposed: set[tuple[str, str]] = set()  # on the open association

    def store(self, item: _Item) -> int:
        wanted = _pairs_for(item)
        if self.sub is not None and not self.sub.is_associated:
            self.sub = None
        if self.sub is not None and not wanted <= self.proposed:
            self._release()
        if self.sub is None:
            self._open(wanted)
        assert self.sub is not None
        instance: Instance
        if item.dataset is not None:
            instance = item.dataset
        else:
            assert item.path is not None
            instance = item.path
        try:
            return int(self.sub.store(instance, move_originator=self.originator).status)
        except PeerTimeout:
            log.warning("C-MOVE destination %s sent no C-STORE-RSP for %s within %.0f s: "
                        "aborting its association", self.destination.ae_title,
                        item.sop_instance, self.server.move_timeout or 0)
            self.sub.abort()
            self.sub = None
            return dimse.PROCESSING_FAILURE

    def _open(self, wanted: set[tuple[str, str]]) -> None:
        for pair in sorted(wanted):
            self.pairs[pair] = None
        if len(self.pairs) > MAX_PRESENTATION_CONTEXTS:
            # More pairs than an association carries: keep the newest ones.
            self.pairs = dict.fromkeys(list(self.pairs)[-MAX_PRESENTATION_CONTEXTS:])
        contexts = [(sop_class, [ts]) for sop_class, ts in self.pairs]
        timeout = self.server.move_timeout
        try:
            self.sub = connect(self.destination.host, self.destination.port,
                               calling_ae=self.server.ae_title,
                               called_ae=self.destination.ae_title, contexts=contexts,
                               acse_timeout=timeout if timeout is not None else 30.0,
                               dimse_timeout=timeout)
        except (OSError, NetworkError) as exc:
            # PS3.4 C.4.2.1.5: A702H "Refused: Out of Resources - Unable to
            # perform sub-operations".
            raise _Refused(f"destination {self.destination.ae_title} at "
                           f"{self.destination.host}:{self.destination.port} unreachable: "
                           f"{exc}", dimse.OUT_OF_RESOURCES_UNABLE_TO_PERFORM_SUB_OPERATIONS
                           ) from None
        self.proposed = set(self.pairs)

    def _release(self) -> None:
        sub, self.sub = self.sub, None
        if sub is None:
            return
        try:
            sub.release()
        except (OSError, ProtocolError) as exc:
            log.info("releasing the association to %s failed: %s",
                     self.destination.ae_title, exc)
            sub.abort()

    def close(self) -> None:
        self._release()


def _pairs_for(item: _Item) -> set[tuple[str, str]]:
    pairs = {(item.sop_class, item.transfer_syntax)}
    if uids.is_uncompressed(item.transfer_syntax):
        pairs |= {(item.sop_class, uids.EXPLICIT_VR_LITTLE_ENDIAN),
                  (item.sop_class, uids.IMPLICIT_VR_LITTLE_ENDIAN)}
    return pairs


class Server:
    """A DICOM SCP: listen, accept, one thread per association."""

    def __init__(
        self,
        handlers: Handlers | None = None,
        *,
        ae_title: str = "DICOM-ROUTER",
        host: str = "127.0.0.1",
        port: int = 11112,
        policy: AcceptorPolicy | None = None,
        artim_timeout: float = 30.0,
        idle_timeout: float | None = 600.0,
        move_timeout: float | None = 60.0,
        max_associations: int = 256,
        max_dataset_size: int | None = DEFAULT_MAX_DATASET_SIZE,
        max_inflated_size: int | None = DEFAULT_MAX_INFLATED_SIZE,
    ) -> None:
        """``move_timeout``: how long a C-MOVE destination may take to answer
        (association and each C-STORE) before that sub-operation fails.
        ``max_associations``: open at once; more are refused (A-ASSOCIATE-RJ,
        transient, local limit exceeded). ``max_dataset_size``: the largest
        data set held whole (identifiers, attribute lists; C-STORE streams and
        has no limit). ``max_inflated_size``: the largest a deflated data set
        may inflate to in :meth:`Request.dataset`. None: no limit."""
        self.handlers = handlers or Handlers()
        self.ae_title = ae_title
        self.policy = policy or AcceptorPolicy()
        self.artim_timeout = artim_timeout
        self.idle_timeout = idle_timeout
        self.move_timeout = move_timeout
        self.max_associations = max_associations
        self.max_dataset_size = max_dataset_size
        self.max_inflated_size = max_inflated_size
        self._sock = socket.create_server((host, port), reuse_port=False, backlog=128)
        self.host, self.port = self._sock.getsockname()[:2]
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._handlers_live: set[AssociationHandler] = set()
        # Handlers holding one of the max_associations slots.
        self._admitted: set[AssociationHandler] = set()
        # Association IDs for logs and handlers: unique within this server
        # and process (a restarted router does not reuse the last one's).
        self._association_ids = itertools.count(1)
        self._id_prefix = f"a{os.getpid()}-"

    def serve_forever(self) -> None:
        """Accept until :meth:`shutdown`; blocks in ``accept()`` (no polling)."""
        log.info("listening on %s:%d as %s", self.host, self.port, self.ae_title)
        while not self._stopping:
            try:
                sock, _ = self._sock.accept()
            except OSError as exc:
                if self._stopping:
                    return
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    # Out of descriptors or memory: the pending connection waits
                    # in the backlog. Back off briefly instead of spinning, and
                    # keep serving: the associations that end free resources.
                    log.error("accept failed (%s); retrying in 0.5 s", exc.strerror)
                    self._stopped.wait(0.5)
                    continue
                if exc.errno in _ACCEPT_RETRY_ERRORS:
                    # That connection failed before we took it; the next may not.
                    log.info("accept failed (%s): connection dropped, accepting the next",
                             exc.strerror)
                    continue
                raise
            try:
                configure_socket(sock)
                peer_port = sock.getpeername()[1]
            except OSError as exc:
                # Reset by the peer before we got to it (a port scan, an L4
                # health check): nothing to serve, and no reason to stop accepting.
                log.info("connection dropped before it was served: %s", exc)
                sock.close()
                continue
            with self._lock:
                over_limit = len(self._admitted) >= self.max_associations
            handler = AssociationHandler(self, sock, over_limit=over_limit)
            thread = threading.Thread(target=self._run, args=(handler,), daemon=True,
                                      name=f"assoc-{peer_port}")
            with self._lock:
                self._threads.add(thread)
                self._handlers_live.add(handler)
                if not over_limit:
                    self._admitted.add(handler)
            thread.start()

    def _run(self, handler: AssociationHandler) -> None:
        try:
            handler.run()
        finally:
            self._association_ended(handler)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _association_ended(self, handler: AssociationHandler) -> None:
        with self._lock:
            self._handlers_live.discard(handler)
            self._admitted.discard(handler)

    def _next_association_id(self) -> str:
        return f"{self._id_prefix}{next(self._association_ids)}"

    def start(self) -> Server:
        """Serve in a background thread; returns self (for ``with``)."""
        self._accept_thread = threading.Thread(target=self.serve_forever, daemon=True,
                                               name=f"accept-{self.port}")
        self._accept_thread.start()
        return self

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, abort what is still open, wait for the threads."""
        self._stopping = True
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        self._sock.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with self._lock:
            live = list(self._handlers_live)
            threads = list(self._threads)
        for handler in live:
            with contextlib.suppress(OSError):
                handler.conn.sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()


def iter_instances(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Files under the given files/folders, recursively, in a stable order."""
    for p in paths:
        path = Path(p)
        if path.is_dir():
            yield from sorted(x for x in path.rglob("*") if x.is_file())
        else:
            yield path
