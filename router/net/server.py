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
may reject. Each DIMSE request goes to the handler registered for it in
:class:`Handlers`; a C-STORE handler can instead take the data set as a stream
(``on_c_store_stream``), so an instance of any size is never held in memory.
C-FIND/C-MOVE/C-GET handlers are generators: between results the association
is checked, without blocking, for a C-CANCEL (PS3.7 §9.3.2.3 / §9.3.3.3 /
§9.3.4.3). Sub-operations of C-MOVE go out on a new association to the
destination; those of C-GET go back on the same association (PS3.4 C.4.2/C.4.3).

This is the library's SCP for scripts and tests; the router's worker processes
(DESIGN.md D3) drive the same engine from an event loop.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from pydicom.dataset import Dataset

from router.dicom import dimse, uids
from router.dicom.association import Association, Role
from router.dicom.dataset import decode_dataset, encode_dataset, read_part10_header
from router.dicom.errors import ProtocolError
from router.dicom.events import (
    NEED_DATA,
    AssociationAborted,
    AssociationRequested,
    CommandReceived,
    ConnectionClosed,
    DataReceived,
    Event,
    ReleaseRequested,
)
from router.dicom.negotiation import AcceptorPolicy, NegotiatedContext, negotiate
from router.dicom.pdu import AAssociateRJ, AAssociateRQ
from router.net.client import ClientAssociation, NetworkError, connect, file_chunks
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

_ids = itertools.count(1)


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

    def dataset(self, *, stop_before_pixels: bool = False) -> Dataset | None:
        """The data set decoded with pydicom (None if the message had none)."""
        if self.dataset_bytes is None:
            return None
        return decode_dataset(self.dataset_bytes, self.context.transfer_syntax,
                              stop_before_pixels=stop_before_pixels)


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


_N_HANDLERS: dict[type, tuple[str, type]] = {
    dimse.NEventReportRQ: ("on_n_event_report", dimse.NEventReportRSP),
    dimse.NGetRQ: ("on_n_get", dimse.NGetRSP),
    dimse.NSetRQ: ("on_n_set", dimse.NSetRSP),
    dimse.NActionRQ: ("on_n_action", dimse.NActionRSP),
    dimse.NCreateRQ: ("on_n_create", dimse.NCreateRSP),
    dimse.NDeleteRQ: ("on_n_delete", dimse.NDeleteRSP),
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

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.handlers = server.handlers
        self.conn = Connection(sock, Association(Role.ACCEPTOR),
                               artim_timeout=server.artim_timeout)
        self.assoc = self.conn.assoc
        self.info: AssociationInfo | None = None
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
            self._log_close()

    def _next(self) -> Event:
        if self._pending:
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
        info = AssociationInfo(id=f"a{next(_ids)}", calling_ae=rq.calling_ae_title,
                               called_ae=rq.called_ae_title, peer=self.conn.peer, request=rq)
        self.info = info
        answer = negotiate(rq, self.server.policy)
        if not isinstance(answer, AAssociateRJ) and self.handlers.on_requested:
            answer = self.handlers.on_requested(info) or answer
        if isinstance(answer, AAssociateRJ):
            self.stats["outcome"] = (f"rejected (result {int(answer.result)}, source "
                                     f"{int(answer.source)}, reason {answer.reason})")
            log.info("association %s rejected: result %d source %d reason %d", info,
                     answer.result, answer.source, answer.reason)
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
        if isinstance(msg, dimse.CStoreRQ):
            self._c_store(ctx, msg)
            return
        data = self._read_dataset() if msg.has_dataset else None
        request = Request(assoc=self.info, context=ctx, message=msg, dataset_bytes=data)
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

    def _read_dataset(self) -> bytes:
        parts: list[bytes] = []
        while True:
            event = self._next()
            if isinstance(event, DataReceived):
                parts.append(bytes(event.data))
                if event.last:
                    return b"".join(parts)
            else:
                self._lost(event)

    def _lost(self, event: Event) -> None:
        """The association ended in the middle of a message."""
        self._pending.appendleft(event)
        raise _Ended

    def _respond(self, ctx: NegotiatedContext, rsp: Any, dataset: bytes | None = None) -> None:
        self.assoc.send_message(ctx.context_id, rsp, dataset)
        self.conn.flush()

    def _c_store(self, ctx: NegotiatedContext, msg: dimse.CStoreRQ) -> None:
        assert self.info is not None
        request = Request(assoc=self.info, context=ctx, message=msg)
        sink: StoreSink
        if msg.affected_sop_class_uid != ctx.abstract_syntax:
            # The context was negotiated for another SOP class (PS3.8 §7.1.1.13):
            # the data set is read and dropped, and the sender told so.
            log.warning("association %s C-STORE of %s on context %d, which was accepted "
                        "for %s: refused 0x0122", self.info, msg.affected_sop_class_uid,
                        ctx.context_id, ctx.abstract_syntax)
            sink = _Refuse(dimse.SOP_CLASS_NOT_SUPPORTED)
        elif self.handlers.on_c_store_stream is not None:
            sink = self.handlers.on_c_store_stream(request)
        elif self.handlers.on_c_store is not None:
            sink = _Collect(self.handlers.on_c_store, request)
        else:
            # Nobody stores it: never acknowledge what is not kept.
            sink = _Refuse(dimse.SOP_CLASS_NOT_SUPPORTED)
        size = 0
        while True:
            event = self._next()
            if not isinstance(event, DataReceived):
                sink.abort()
                self._lost(event)
                return
            size += len(event.data)
            sink.write(event.data)
            if event.last:
                break
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

    # ---------------------------------------------------- cancel detection

    def _cancelled(self, message_id: int, token: CancelToken) -> bool:
        """Non-blocking check for a C-CANCEL of ``message_id`` (no polling loop:
        one zero-timeout look at the socket between two results)."""
        if message_id in self._cancel_ids:
            self._cancel_ids.discard(message_id)
            token.cancelled = True
        while True:
            event = self.assoc.next_event()
            if event is NEED_DATA:
                if self.conn.closed:
                    break
                if self.assoc.pdu_in_progress:
                    # A PDU has begun (DCMTK writes header and body separately):
                    # finish reading it, within a bound, before deciding.
                    try:
                        self.conn._read(time.monotonic() + _PDU_COMPLETION_TIMEOUT)
                    except PeerTimeout:
                        break
                    continue
                readable, _, _ = select.select([self.conn.sock], [], [], 0)
                if not readable:
                    break
                self.conn._read(None)
                continue
            assert not isinstance(event, type(NEED_DATA))
            if isinstance(event, CommandReceived) and isinstance(event.message, dimse.CCancelRQ):
                if event.message.message_id_being_responded_to == message_id:
                    token.cancelled = True
                continue
            self._pending.append(event)
            if isinstance(event, AssociationAborted | ConnectionClosed):
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
        destination, instances = self.handlers.on_c_move(request, token)
        if destination is None:
            self._respond(ctx, self._retrieve_rsp(msg, dimse.MOVE_DESTINATION_UNKNOWN))
            return
        items = [_load(i) for i in instances]
        proposals = sorted({(item.sop_class, item.transfer_syntax) for item in items})
        contexts = _storage_proposals(proposals)
        try:
            sub = connect(destination.host, destination.port,
                          calling_ae=self.server.ae_title, called_ae=destination.ae_title,
                          contexts=contexts) if items else None
        except (OSError, NetworkError) as exc:
            log.warning("C-MOVE destination %s unreachable: %s", destination.ae_title, exc)
            # PS3.4 C.4.2.1.5: "Refused: Out of Resources - Unable to perform
            # sub-operations".
            self._respond(ctx, self._retrieve_rsp(msg, 0xA702))
            return
        try:
            originator = (request.assoc.calling_ae, msg.message_id)
            self._sub_operations(request, items, token,
                                 lambda item: _store_via(sub, item, originator))
        finally:
            if sub is not None:
                sub.release()

    def _c_get(self, request: Request) -> None:
        msg = request.message
        ctx = request.context
        if self.handlers.on_c_get is None:
            self._respond(ctx, self._retrieve_rsp(msg, dimse.SOP_CLASS_NOT_SUPPORTED))
            return
        token = CancelToken()
        items = [_load(i) for i in self.handlers.on_c_get(request, token)]
        self._sub_operations(request, items, token, self._store_here)

    def _sub_operations(self, request: Request, items: list[_Item], token: CancelToken,
                        store: Callable[[_Item], int]) -> None:
        msg = request.message
        ctx = request.context
        remaining = len(items)
        completed = failed = warning = 0
        failed_uids: list[str] = []
        for item in items:
            if self._cancelled(msg.message_id, token):
                break
            try:
                status = store(item)
            except (OSError, ProtocolError) as exc:
                log.warning("sub-operation for %s failed: %s", item.sop_instance, exc)
                status = dimse.PROCESSING_FAILURE
            remaining -= 1
            category = dimse.status_category(status)
            if category is dimse.StatusCategory.SUCCESS:
                completed += 1
            elif category is dimse.StatusCategory.WARNING:
                warning += 1
            else:
                failed += 1
                failed_uids.append(item.sop_instance)
            if remaining:
                self._respond(ctx, self._retrieve_rsp(msg, dimse.PENDING, remaining,
                                                      completed, failed, warning))
        if token.cancelled:
            final = dimse.CANCEL
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
        rsp = self._retrieve_rsp(msg, final, remaining if token.cancelled else None,
                                 completed, failed, warning, has_dataset=payload is not None)
        self._respond(ctx, rsp, payload)

    def _retrieve_rsp(self, msg: Any, status: int, remaining: int | None = None,
                      completed: int | None = None, failed: int | None = None,
                      warning: int | None = None, *, has_dataset: bool = False) -> Any:
        cls = dimse.CMoveRSP if isinstance(msg, dimse.CMoveRQ) else dimse.CGetRSP
        return cls(message_id_being_responded_to=msg.message_id,
                   affected_sop_class_uid=msg.affected_sop_class_uid, status=status,
                   number_of_remaining_sub_operations=remaining,
                   number_of_completed_sub_operations=completed,
                   number_of_failed_sub_operations=failed,
                   number_of_warning_sub_operations=warning, has_dataset=has_dataset)

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
            event = self._next()
            if isinstance(event, CommandReceived):
                m = event.message
                if isinstance(m, dimse.CStoreRSP) and m.message_id_being_responded_to == mid:
                    return int(m.status)
                if isinstance(m, dimse.CCancelRQ):
                    # Not into _pending: _next() reads that first, so the same
                    # C-CANCEL came straight back here, forever (busy loop).
                    self._cancel_ids.add(m.message_id_being_responded_to)
                    continue
                log.warning("C-GET: unexpected %s while waiting for C-STORE-RSP",
                            type(m).__name__)
                continue
            self._lost(event)

    # ---------------------------------------------------------- N-services

    def _n_service(self, request: Request) -> None:
        msg = request.message
        name, rsp_cls = _N_HANDLERS[type(msg)]
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
        sop_class = getattr(msg, "affected_sop_class_uid", None) or getattr(
            msg, "requested_sop_class_uid", None)
        sop_instance = getattr(msg, "affected_sop_instance_uid", None) or getattr(
            msg, "requested_sop_instance_uid", None)
        if reply is not None and sop_instance is None and "AffectedSOPInstanceUID" in reply:
            sop_instance = str(reply.AffectedSOPInstanceUID)
        if reply is not None:
            # A handler passes an assigned instance UID as (0000,1000) in the reply,
            # as pynetdicom's do; command elements never go in a data set (PS3.7 §6.3).
            reply = Dataset({tag: elem for tag, elem in reply.items() if tag >> 16})
        payload = encode_dataset(reply, request.context.transfer_syntax) if reply else None
        kwargs: dict[str, Any] = {"message_id_being_responded_to": msg.message_id,
                                  "status": status, "has_dataset": payload is not None}
        kwargs["affected_sop_class_uid"] = sop_class
        kwargs["affected_sop_instance_uid"] = sop_instance
        for attr in ("event_type_id", "action_type_id"):
            if getattr(msg, attr, None) is not None:
                kwargs[attr] = getattr(msg, attr)
        self._respond(request.context, rsp_cls(**kwargs), payload)


# How long a started PDU may take to arrive whole while we look for a C-CANCEL.
_PDU_COMPLETION_TIMEOUT = 1.0

_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _Ended(Exception):
    """The association ended while a handler was in the middle of something."""


class _Collect:
    """Adapts a whole-data-set ``on_c_store`` handler to the streaming interface."""

    def __init__(self, handler: Callable[[Request], int], request: Request) -> None:
        self.handler = handler
        self.request = request
        self.parts: list[bytes] = []

    def write(self, data: memoryview) -> None:
        self.parts.append(bytes(data))

    def close(self) -> int:
        req = self.request
        full = Request(assoc=req.assoc, context=req.context, message=req.message,
                       dataset_bytes=b"".join(self.parts))
        return self.handler(full)

    def abort(self) -> None:
        self.parts.clear()


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


def _storage_proposals(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    out: dict[str, list[str]] = {}
    for sop_class, ts in pairs:
        out.setdefault(sop_class, []).append(ts)
    return list(out.items())


def _store_via(sub: ClientAssociation | None, item: _Item, originator: tuple[str, int]) -> int:
    """C-MOVE sub-operation; the originator is the C-MOVE requestor's AE title and
    message ID (PS3.7 §9.1.1.1, Move Originator AE Title / Message ID)."""
    assert sub is not None
    instance: Instance
    if item.dataset is not None:
        instance = item.dataset
    else:
        assert item.path is not None
        instance = item.path
    return int(sub.store(instance, move_originator=originator).status)


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
    ) -> None:
        self.handlers = handlers or Handlers()
        self.ae_title = ae_title
        self.policy = policy or AcceptorPolicy()
        self.artim_timeout = artim_timeout
        self.idle_timeout = idle_timeout
        self._sock = socket.create_server((host, port), reuse_port=False, backlog=128)
        self.host, self.port = self._sock.getsockname()[:2]
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._handlers_live: set[AssociationHandler] = set()

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
            handler = AssociationHandler(self, sock)
            thread = threading.Thread(target=self._run, args=(handler,), daemon=True,
                                      name=f"assoc-{peer_port}")
            with self._lock:
                self._threads.add(thread)
                self._handlers_live.add(handler)
            thread.start()

    def _run(self, handler: AssociationHandler) -> None:
        try:
            handler.run()
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())
                self._handlers_live.discard(handler)

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
