"""OutboundAssociation: a requestor association in the worker's event loop.

Theory of operation
-------------------
The destination side of DESIGN.md D3/D5. Like the inbound
:class:`workers.actor.AssociationActor`, this is an ``asyncio.BufferedProtocol``
that owns one sans-I/O :class:`router.dicom.association.Association`, here in the
requestor role; unlike it, its user is a coroutine (the destination actor's
sender task), so the API awaits:

    assoc = await OutboundAssociation.open(host, port, request, timeout=30)
    rsp = await assoc.store(path, part10)       # the file's data set, as stored
    await assoc.release()

Events from the engine queue up and the coroutine waiting for one is woken;
nothing polls. ``store`` streams the data set from disk in pieces and respects
the transport's flow control (``pause_writing``/``resume_writing``), so a slow
destination holds at most the transport's high-water mark of one instance in
memory, whatever the instance size. Each wait has a timeout; when it expires the
association is aborted (PS3.8 A-ABORT) and :class:`OutboundError` raised.

Errors are one class with a ``transient`` flag: a refused or dropped connection,
a timeout, an abort or a transient association rejection (PS3.8 Table 9-21 result
2) may succeed later; a permanent rejection (result 1: our AE title or theirs is
wrong) will not until someone changes a configuration, but is still retried at
the back-off ceiling by the caller, since that someone may be on the phone now.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Final

from pydicom.uid import UID

from router.config import Destination
from router.dicom import dimse, uids
from router.dicom.association import Association, Buffer, Role
from router.dicom.dataset import Part10, transcode
from router.dicom.errors import DIMSEError, ProtocolError
from router.dicom.events import (
    NEED_DATA,
    AssociationAborted,
    AssociationEstablished,
    AssociationRejected,
    CommandReceived,
    CommandRejected,
    ConnectionClosed,
    DataReceived,
    Event,
    ReleaseRequested,
    _Sentinel,
)
from router.dicom.fsm import State
from router.dicom.negotiation import NegotiatedContext, build_request, context_for_instance
from router.dicom.pdu import AAssociateRQ, PresentationContextResult, reject_meaning
from router.tls import client_context
from workers.moves import Originator
from workers.spool import IOV_MAX

__all__ = ["OutboundAssociation", "OutboundError", "instance_contexts", "instance_syntaxes",
           "open_association",
           "proposal_syntaxes",
           "tls_context"]

log = logging.getLogger("workers.outbound")

# Bytes of a data set read from disk per step; the engine cuts them into PDUs.
READ_SIZE: Final = 1 << 20
# Transport write buffer bounds: pause the sender above, resume below.
WRITE_HIGH_WATER: Final = 4 << 20
WRITE_LOW_WATER: Final = 1 << 20
RECV_BUFFER: Final = 1 << 16  # responses are small
# The largest data set converted to another transfer syntax for a destination that
# does not take it as stored: conversion holds it in memory several times over.
MAX_CONVERTED_BYTES: Final = 256 << 20
# Events read but not yet taken by the coroutine: past the high mark the socket is
# no longer read (TCP flow control holds the peer) until they are down to the low
# one. A C-FIND relay whose requestor reads slowly stops taking matches, and this
# keeps the upstream's from piling up here instead.
_EVENTS_HIGH: Final = 64
_EVENTS_LOW: Final = 16
# Requests of the peer's held while we wait for a response (n_request): a PACS sends
# one commitment result; past a few, a peer that floods us is ignored, as before.
_MAX_HELD: Final = 8


class OutboundError(Exception):
    """The destination could not be reached or the association failed.

    ``transient`` is False only for a permanent association rejection.
    """

    def __init__(self, message: str, *, transient: bool = True, stalled: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        #: The destination stopped answering or taking data (a wait timed out), rather
        #: than refusing, aborting or closing: its state more than the request's.
        self.stalled = stalled


class OutboundAssociation(asyncio.BufferedProtocol):
    """One association we requested; see the module docstring."""

    def __init__(self, request: AAssociateRQ, *, timeout: float, label: str) -> None:
        self.engine = Association(Role.REQUESTOR)
        self.request = request
        #: (abstract syntax, transfer syntax) pairs each proposed in a context of its
        #: own: the peer had its say on each. A syntax among others may have lost to
        #: the peer's preference (pynetdicom picks Implicit VR from [Explicit,
        #: Implicit]) although the peer takes it: an instance in it is worth a new
        #: association, not a conversion (workers/forward.py).
        self.offered = frozenset((pc.abstract_syntax, pc.transfer_syntaxes[0])
                                 for pc in request.presentation_contexts
                                 if len(pc.transfer_syntaxes) == 1)
        self.timeout = timeout
        self.label = label
        self.transport: asyncio.Transport | None = None
        self._buffer = memoryview(bytearray(RECV_BUFFER))
        self._events: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost = False
        # The TLS alert that ended the connection, with what it usually means.
        self._tls_failure: str | None = None
        self.client_certificate = False
        # Destination.link() of what it was opened for (see open_association).
        self.link: tuple[object, ...] = ()
        self._reading_paused = False
        self._ids = itertools.cycle(range(1, 65536))
        # Requests the peer sent while we waited for a response of ours (context ID,
        # message, data set): for next_request, after that response.
        self._held: deque[tuple[int, dimse.DimseMessage, bytes | None]] = deque()
        self.current_find: tuple[int, int] | None = None
        # Armed by cancel(): aborts an operation the peer has not ended in time.
        self._cancel_timer: asyncio.TimerHandle | None = None
        # Data sets are read into one buffer, reused for each READ_SIZE step: a fresh
        # 500 KB bytes object per instance cost page faults and munmap, more than the
        # copy itself. _flush makes sure nothing refers to it once a step is sent.
        self._read_buffer: bytearray | None = None
        # The socket, when we may write it ourselves (plain TCP): see _flush.
        self._fd = -1

    # ------------------------------------------------------------------ opening

    @classmethod
    async def open(cls, host: str, port: int, request: AAssociateRQ, *, timeout: float,
                   ssl_context: ssl.SSLContext | None = None,
                   server_hostname: str | None = None, client_certificate: bool = False,
                   label: str = "") -> OutboundAssociation:
        """Connect and negotiate; raises :class:`OutboundError` if that fails.
        ``client_certificate``: ``ssl_context`` presents one (for the log's hints)."""
        loop = asyncio.get_running_loop()
        label = label or f"{request.called_ae_title}@{host}:{port}"
        protocol = cls(request, timeout=timeout, label=label)
        protocol.client_certificate = client_certificate
        name = (server_hostname or host) if ssl_context else None
        if ssl_context is not None:
            try:  # before connecting: asyncio leaves the socket open when this fails
                ssl_context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=name)
            except (UnicodeError, ValueError) as exc:
                raise OutboundError(f"cannot use {name!r} as the TLS server name: "
                                    f"{exc}") from None
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: protocol, host, port, ssl=ssl_context,
                                       server_hostname=name),
                timeout)
        except OSError as exc:  # TimeoutError and ssl.SSLError among them
            reason = _connect_failure(exc, tls=ssl_context is not None)
            if isinstance(exc, ssl.SSLError) and (hint := _tls_hint(exc, client_certificate)):
                reason += f" ({hint})"
            raise OutboundError(f"cannot connect to {host}:{port}: {reason}") from exc
        try:
            event = await protocol._next_event()
        except BaseException:
            # Cancelled while negotiating (the destination removed by a reload, the
            # worker draining): nobody else has this association, so nobody else
            # would close it; a PACS that never answers kept one socket per reload.
            protocol._close()
            raise
        if isinstance(event, AssociationEstablished):
            _say_unusable(event, label)
            return protocol
        protocol._close()
        if isinstance(event, AssociationRejected):
            rj = event.reject
            permanent = int(rj.result) == 1
            raise OutboundError(
                f"{label} rejected the association ({'permanent' if permanent else 'transient'}"
                f": {reject_meaning(int(rj.source), int(rj.reason))}; source {int(rj.source)}"
                f", reason {int(rj.reason)})", transient=not permanent)
        raise OutboundError(f"{label}: association failed during negotiation: "
                            f"{protocol._why(event)}")

    # ---------------------------------------------------------------- protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if transport.get_extra_info("sslcontext") is None:
                self._fd = sock.fileno()
        self.engine.request(self.request)
        self.engine.connection_made()
        self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.engine.receive_data(self._buffer[:nbytes])
        self._collect()

    def eof_received(self) -> bool:
        self.engine.receive_data(b"")
        self._collect()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if isinstance(exc, ssl.SSLError):
            # An alert from the peer (say, TLS 1.3's "certificate required", which
            # comes after the handshake): without it the log said only that the
            # connection closed.
            hint = _tls_hint(exc, self.client_certificate)
            self._tls_failure = (f"TLS: {getattr(exc, 'reason', None) or exc}"
                                 + (f" ({hint})" if hint else ""))
        if self.engine.state is not State.STA1:
            with contextlib.suppress(ProtocolError):
                self.engine.receive_data(b"")
        self._collect()
        self._writable.set()  # a sender waiting to write finds out at once
        if not self._events or not isinstance(self._events[-1], ConnectionClosed):
            self._events.append(ConnectionClosed())
        self._wake()

    def _why(self, event: Event) -> str:
        """What ``event`` (the end of the association) was, with the TLS alert that
        ended it, if one did, and what that alert usually means."""
        why = _describe(event)
        return why if self._tls_failure is None else f"{why}; {self._tls_failure}"

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ------------------------------------------------------------------- API

    @property
    def contexts(self) -> dict[int, NegotiatedContext]:
        return dict(self.engine.contexts)

    @property
    def is_associated(self) -> bool:
        return self.engine.is_established and not self._lost

    def context_for(self, sop_class: str, transfer_syntax: str) -> NegotiatedContext | None:
        """The accepted context to send this SOP class in this transfer syntax, if any."""
        for ctx in self.engine.contexts.values():
            if (ctx.abstract_syntax == sop_class and ctx.transfer_syntax == transfer_syntax
                    and ctx.requestor_scu):
                return ctx
        return None

    def context_to_send(self, sop_class: str, transfer_syntax: str) -> NegotiatedContext | None:
        """The accepted context to send an instance stored in ``transfer_syntax``: one
        in that syntax (sent as it is on disk, D5), else, for a native syntax, one in
        another native syntax, which :meth:`store` converts to (PS3.5 10: every node
        takes Implicit VR Little Endian, not every one takes what we stored)."""
        return context_for_instance((c for c in self.engine.contexts.values()
                                     if c.requestor_scu), sop_class, transfer_syntax)

    async def store(self, path: Path, part10: Part10, ctx: NegotiatedContext, *,
                    originator: Originator | None = None,
                    fd: int | None = None) -> dimse.CStoreRSP:
        """C-STORE the data set of ``path``; the response. As it is on disk (D5) when
        ``ctx`` has its transfer syntax, else decoded and encoded in ``ctx``'s (see
        :meth:`context_to_send`) before anything is sent.

        ``fd``, if given, is ``path`` already open for reading (it stays open).
        Raises :class:`OutboundError` if the association fails meanwhile,
        ``OSError`` if the file cannot be read (the association is then aborted:
        half a data set cannot be taken back) and :class:`DIMSEError` if it cannot
        be converted (nothing was sent then).
        """
        converted: bytes | None = None
        if ctx.transfer_syntax != part10.transfer_syntax:
            size = (os.fstat(fd).st_size if fd is not None else path.stat().st_size) \
                - part10.dataset_offset
            if size > MAX_CONVERTED_BYTES:
                raise DIMSEError(
                    f"{size >> 20} MiB is too large to convert to "
                    f"{ctx.transfer_syntax} (at most {MAX_CONVERTED_BYTES >> 20} MiB): "
                    f"{self.label} takes it in no syntax it is stored in",
                    status=dimse.CANNOT_UNDERSTAND)
            # Whole data sets in memory, decoded and encoded by pydicom: off the event
            # loop, or a big one stalls every association of this worker (and its
            # heartbeat: the supervisor killed it, again after each restart).
            # (to_thread: in this task's context, so pydicom's lines name whom we serve)
            converted = await asyncio.to_thread(
                _converted, path, fd, part10, ctx.transfer_syntax)
        mid = next(self._ids)
        # A relayed C-MOVE sub-operation names the requestor's move (workers/moves.py).
        rq = dimse.CStoreRQ(
            message_id=mid,
            affected_sop_class_uid=part10.sop_class_uid,
            affected_sop_instance_uid=part10.sop_instance_uid,
            priority=dimse.Priority.MEDIUM if originator is None else originator.priority,
            move_originator_application_entity_title=(
                None if originator is None else originator.ae_title),
            move_originator_message_id=None if originator is None else originator.message_id)
        self._require_associated()
        self.engine.send_message(ctx.context_id, rq)
        self._flush()
        try:
            if converted is not None:
                await self._send_bytes(ctx, converted)
            elif fd is None:
                with open(path, "rb", buffering=0) as fh:
                    await self._send_file(ctx, fh.fileno(), part10.dataset_offset)
            else:
                await self._send_file(ctx, fd, part10.dataset_offset)
        except OSError:
            self.abort("cannot read the instance being sent")
            raise
        while True:
            msg = (await self._next_command("while waiting for the C-STORE response")).message
            if isinstance(msg, dimse.CStoreRSP) and msg.message_id_being_responded_to == mid:
                return _checked_response(msg, rq)
            log.warning("%s: ignoring %s while waiting for C-STORE-RSP %d", self.label,
                        type(msg).__name__, mid)
            if msg.has_dataset:
                await self._drain()

    def refuses_sop_class(self, sop_class: str) -> bool:
        """Whether the destination answered every context we proposed for
        ``sop_class`` "abstract syntax not supported" (PS3.8 §9.3.3.2, Table 9-18,
        result 3): it does not take the class in any syntax, not just not ours."""
        request, accept = self.engine.request_pdu, self.engine.accept_pdu
        if request is None or accept is None:
            return False
        ids = {pc.context_id for pc in request.presentation_contexts
               if pc.abstract_syntax == sop_class}
        results = [pc.result for pc in accept.presentation_contexts if pc.context_id in ids]
        return bool(results) and all(
            r is PresentationContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED for r in results)

    def context_for_model(self, abstract_syntax: str) -> NegotiatedContext | None:
        """An accepted context for ``abstract_syntax`` (any transfer syntax), if any."""
        for ctx in self.engine.contexts.values():
            if ctx.abstract_syntax == abstract_syntax and ctx.requestor_scu:
                return ctx
        return None

    async def find(self, ctx: NegotiatedContext, identifier: bytes, *,
                   priority: dimse.Priority = dimse.Priority.MEDIUM,
                   max_identifier: int = 16 << 20,
                   ) -> AsyncIterator[tuple[dimse.DimseResponse, bytes | None]]:
        """C-FIND (PS3.7 §9.1.2): each response with its identifier (encoded in the
        context's transfer syntax), as it arrives; the last one is the final status.

        :attr:`current_find` holds the operation while it runs, for :meth:`cancel`.
        """
        rq = dimse.CFindRQ(message_id=next(self._ids), affected_sop_class_uid=ctx.abstract_syntax,
                           priority=priority)
        async for item in self._operation(ctx, rq, identifier, dimse.CFindRSP, max_identifier):
            yield item

    async def move(self, ctx: NegotiatedContext, identifier: bytes, destination: str, *,
                   priority: dimse.Priority = dimse.Priority.MEDIUM,
                   message_id: int | None = None, max_identifier: int = 16 << 20,
                   ) -> AsyncIterator[tuple[dimse.DimseResponse, bytes | None]]:
        """C-MOVE (PS3.7 §9.1.4) to ``destination``: each response (pending ones with
        sub-operation counts) with its identifier, as it arrives; the last is final."""
        rq = dimse.CMoveRQ(message_id=message_id or next(self._ids),
                           affected_sop_class_uid=ctx.abstract_syntax,
                           move_destination=destination, priority=priority)
        async for item in self._operation(ctx, rq, identifier, dimse.CMoveRSP, max_identifier):
            yield item

    async def _operation(self, ctx: NegotiatedContext, rq: dimse.CFindRQ | dimse.CMoveRQ,
                         identifier: bytes, response: type[dimse.DimseResponse],
                         max_identifier: int,
                         ) -> AsyncIterator[tuple[dimse.DimseResponse, bytes | None]]:
        mid = rq.message_id
        self._require_associated()
        self.engine.send_message(ctx.context_id, rq, identifier)
        self._flush()
        self.current_find = (ctx.context_id, mid)
        try:
            while True:
                msg = (await self._next_command(f"during {type(rq).__name__[:-2]}")).message
                data = await self._read(max_identifier) if msg.has_dataset else None
                if not (isinstance(msg, response)
                        and getattr(msg, "message_id_being_responded_to", None) == mid):
                    log.warning("%s: ignoring %s during message %d", self.label,
                                type(msg).__name__, mid)
                    continue
                yield msg, data
                if dimse.status_category(msg.status) is not dimse.StatusCategory.PENDING:
                    return
        finally:
            self._operation_ended()

    async def get(self, ctx: NegotiatedContext, identifier: bytes, *,
                  priority: dimse.Priority = dimse.Priority.MEDIUM,
                  max_identifier: int = 16 << 20,
                  ) -> AsyncIterator[tuple[dimse.DimseMessage, int, bytes | None]]:
        """C-GET (PS3.7 §9.1.3): yields, as they arrive, the C-STORE-RQ sub-operations the
        peer sends on this association (PS3.4 C.4.3) as (request, context ID, None) and
        the C-GET responses as (response, context ID, identifier).

        After a C-STORE-RQ the caller must take its data set with :meth:`fragments`
        and answer it with :meth:`reply_store` before asking for the next item.
        """
        mid = next(self._ids)
        self._require_associated()
        self.engine.send_message(ctx.context_id, dimse.CGetRQ(
            message_id=mid, affected_sop_class_uid=ctx.abstract_syntax, priority=priority),
            identifier)
        self._flush()
        self.current_find = (ctx.context_id, mid)
        try:
            while True:
                event = await self._next_command("during C-GET")
                msg = event.message
                if isinstance(msg, dimse.CStoreRQ):
                    yield msg, event.context_id, None
                    continue
                data = await self._read(max_identifier) if msg.has_dataset else None
                if not (isinstance(msg, dimse.CGetRSP)
                        and msg.message_id_being_responded_to == mid):
                    log.warning("%s: ignoring %s during C-GET %d", self.label,
                                type(msg).__name__, mid)
                    continue
                yield msg, event.context_id, data
                if dimse.status_category(msg.status) is not dimse.StatusCategory.PENDING:
                    return
        finally:
            self._operation_ended()

    def _operation_ended(self) -> None:
        self.current_find = None
        if self._cancel_timer is not None:
            self._cancel_timer.cancel()
            self._cancel_timer = None

    async def fragments(self) -> AsyncIterator[tuple[bytes, bool]]:
        """The data set of the request just received, fragment by fragment (bounded
        memory: each is yielded as it arrives), with a last flag."""
        while True:
            event = await self._next_event()
            if not isinstance(event, DataReceived):
                raise OutboundError(f"{self.label}: {self._why(event)} inside a data set")
            yield bytes(event.data), event.last
            if event.last:
                return

    async def n_request(self, ctx: NegotiatedContext, rq: dimse.DimseMessage,
                      dataset: bytes | None, *, max_dataset: int = 16 << 20,
                      ) -> tuple[dimse.DimseResponse, bytes | None]:
        """Send one request (a DIMSE-N one: N-CREATE, N-SET, N-ACTION, N-EVENT-REPORT...)
        and return its response with the response's data set, if any."""
        mid = getattr(rq, "message_id")  # noqa: B009 - every request has one
        self._require_associated()
        self.engine.send_message(ctx.context_id, rq, dataset)
        self._flush()
        while True:
            command = await self._next_command(
                f"while waiting for the {type(rq).__name__[:-2]} response")
            msg = command.message
            data = await self._read(max_dataset) if msg.has_dataset else None
            if (isinstance(msg, dimse.DimseResponse)
                    and getattr(msg, "message_id_being_responded_to", None) == mid):
                return msg, data
            if not isinstance(msg, dimse.DimseResponse) and len(self._held) < _MAX_HELD:
                # A request of the peer's, sent before its answer to ours (a PACS's
                # commitment result, PS3.4 J.3.3): taken up after it, never dropped.
                self._held.append((command.context_id, msg, data))
                continue
            log.warning("%s: ignoring %s while waiting for message %d", self.label,
                        type(msg).__name__, mid)

    def next_message_id(self) -> int:
        return next(self._ids)

    async def next_request(self, *, max_dataset: int = 16 << 20,
                           ) -> tuple[int, dimse.DimseMessage, bytes | None]:
        """The next request the peer sends on this association (context ID, message,
        data set), as a PACS sends a Storage Commitment N-EVENT-REPORT on the
        association of the N-ACTION (PS3.4 J.3.3). Raises :class:`OutboundError` when
        the association ends or the peer sends nothing within ``timeout``."""
        if self._held:
            return self._held.popleft()
        event = await self._next_command("while waiting for a request")
        data = await self._read(max_dataset) if event.message.has_dataset else None
        return event.context_id, event.message, data

    def held_requests(self) -> list[tuple[int, dimse.DimseMessage, bytes | None]]:
        """The requests the peer sent that no :meth:`next_request` took, taken."""
        held = list(self._held)
        self._held.clear()
        return held

    def respond(self, context_id: int, rsp: dimse.DimseMessage, data: bytes | None) -> None:
        """Answer a request the peer sent (see :meth:`next_request`)."""
        if self.engine.may_send_data:
            self.engine.send_message(context_id, rsp, data)
            self._flush()

    def reply_store(self, context_id: int, rq: dimse.CStoreRQ, status: int,
                    comment: str | None = None) -> None:
        """Answer a C-STORE sub-operation the peer sent (PS3.7 §9.3.1.2)."""
        if not self.is_associated:
            return
        self.engine.send_message(context_id, dimse.CStoreRSP(
            message_id_being_responded_to=rq.message_id,
            affected_sop_class_uid=rq.affected_sop_class_uid,
            affected_sop_instance_uid=rq.affected_sop_instance_uid, status=status,
            error_comment=dimse.error_comment(comment or "")))
        self._flush()

    def cancel(self) -> None:
        """C-CANCEL (PS3.7 §9.3.2.3) of the C-FIND, C-MOVE or C-GET in progress.

        The peer answers it with its final response (Cancel, or whatever it had
        come to). One that has not within ``timeout`` seconds -- it ignores C-CANCEL
        and goes on sending matches or sub-operations -- is aborted, and the
        operation ends with :class:`OutboundError`: else it would run on until the
        router-wide operation limit, its output thrown away."""
        if self.current_find is None or not self.is_associated:
            return
        context_id, mid = self.current_find
        self.engine.send_message(context_id, dimse.CCancelRQ(message_id_being_responded_to=mid))
        self._flush()
        if self._cancel_timer is None:
            self._cancel_timer = asyncio.get_running_loop().call_later(
                self.timeout, self._cancel_expired)

    def _cancel_expired(self) -> None:
        self._cancel_timer = None
        if self.current_find is not None:
            detail = f"no final response within {self.timeout:g} s of C-CANCEL"
            log.warning("%s: %s: aborting", self.label, detail)
            self.abort(detail)

    async def _read(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if not isinstance(event, DataReceived):
                raise OutboundError(f"{self.label}: {self._why(event)} inside a data set")
            size += len(event.data)
            if size > limit:
                self.abort(f"a data set larger than {limit} bytes")
                raise OutboundError(f"{self.label}: sent a data set larger than {limit} bytes")
            parts.append(bytes(event.data))
            if event.last:
                return b"".join(parts)

    async def release(self) -> None:
        """A-RELEASE (PS3.8 §7.2); aborts if the peer does not answer in time."""
        if not self.is_associated:
            self._close()
            return
        self.engine.release()
        self._flush()
        try:
            while True:
                event = await self._next_event()
                if isinstance(event, ConnectionClosed):
                    break
        except OutboundError:
            pass  # _next_event aborted it already
        self._close()

    def abort(self, detail: str) -> None:
        """A-ABORT and close (from the sender, or from outside on shutdown)."""
        if not self._lost and self.engine.state is not State.STA1:
            self.engine.abort(detail)
            self._flush()
        self._close()

    # -------------------------------------------------------------- internals

    def _require_associated(self) -> None:
        if not self.is_associated:
            raise OutboundError(f"{self.label}: the association is no longer established")

    async def _send_bytes(self, ctx: NegotiatedContext, data: bytes) -> None:
        """Send ``data`` as one data set, in steps that let flow control work."""
        view = memoryview(data)
        for start in range(0, len(view), READ_SIZE):
            chunk = view[start:start + READ_SIZE]
            self._require_associated()
            self.engine.send_data(ctx.context_id, chunk, start + READ_SIZE >= len(view))
            self._flush()
            if not self._writable.is_set():
                await self._wait_writable()
        if not view:
            self.engine.send_data(ctx.context_id, b"", True)
            self._flush()

    async def _send_file(self, ctx: NegotiatedContext, fd: int, offset: int) -> None:
        """Send the file open as ``fd`` from ``offset`` to its end as one data set."""
        start, end = offset, os.fstat(fd).st_size
        if self._read_buffer is None:
            self._read_buffer = bytearray(READ_SIZE)
        buffer = memoryview(self._read_buffer)
        while True:
            count = os.preadv(fd, [buffer], offset) if offset < end else 0
            if count <= 0 and offset < end:
                raise OSError(f"the file ended at byte {offset} of {end} while being sent")
            offset += count
            last = offset >= end
            chunk = buffer[:count]
            if last and (offset - start) % 2 and count < READ_SIZE:
                # An odd data set (only deflated ones can be; PS3.5 A.5 pads them in
                # files, not every writer does): DCMTK refuses odd fragments. Every
                # step but the last is READ_SIZE (even), so the odd one has room.
                buffer[count] = 0
                chunk = buffer[:count + 1]
            self._require_associated()
            self.engine.send_data(ctx.context_id, chunk, last)
            self._flush()  # after it, nothing refers to the buffer any more
            if not self._writable.is_set():
                await self._wait_writable()
            if last:
                return

    async def _wait_writable(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._writable.wait()
        except TimeoutError:
            detail = f"destination took no data for {self.timeout:g} s"
            self.abort(detail)
            raise OutboundError(f"{self.label}: {detail}", stalled=True) from None

    async def _next_command(self, during: str) -> CommandReceived:
        """The next usable DIMSE command from the destination. A command set that
        cannot be used (``CommandRejected``) is skipped with its data set; anything
        else (abort, closed) raises :class:`OutboundError` naming ``during``."""
        while True:
            event = await self._next_event()
            if isinstance(event, CommandReceived):
                return event
            if not isinstance(event, CommandRejected):
                raise OutboundError(f"{self.label}: {self._why(event)} {during}")
            if event.has_dataset:
                await self._drain()

    async def _drain(self) -> None:
        while True:
            event = await self._next_event()
            if not isinstance(event, DataReceived):
                raise OutboundError(f"{self.label}: {self._why(event)}")
            if event.last:
                return

    async def _next_event(self) -> Event:
        while not self._events:
            if self._lost:
                return ConnectionClosed()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                # asyncio.timeout, not wait_for: no task per wait (one per response).
                async with asyncio.timeout(self.timeout):
                    await self._waiter
            except TimeoutError:
                detail = f"no answer in {self.timeout:g} s"
                self.abort(detail)
                raise OutboundError(f"{self.label}: {detail}", stalled=True) from None
            finally:
                self._waiter = None
        event = self._events.popleft()
        if self._reading_paused and len(self._events) <= _EVENTS_LOW:
            self._reading_paused = False
            if self.transport is not None and not self._lost:
                self.transport.resume_reading()
        if isinstance(event, ReleaseRequested):
            # A peer may not release an association it did not request (PS3.8
            # §7.2): the engine answers it per the table; we just go on.
            self.engine.release_response()
            self._flush()
        return event

    def _collect(self) -> None:
        while True:
            event = self.engine.next_event()
            if event is NEED_DATA:
                break
            assert not isinstance(event, _Sentinel)
            self._events.append(event)
        if len(self._events) > _EVENTS_HIGH and not self._reading_paused and \
                self.transport is not None and not self._lost:
            self.transport.pause_reading()
            self._reading_paused = True
        self._flush()
        self._wake()

    def _wake(self) -> None:
        if self._events and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _flush(self) -> None:
        """Hand what the engine has to send to the socket.

        The engine gives PDU headers and slices of the data set as separate buffers.
        On plain TCP with nothing queued in the transport they go out with ``writev``
        straight from the buffers (Python 3.11's ``writelines`` joins them into one
        copy first); what the socket does not take, or everything on TLS, is handed
        to the transport as a copy, so no buffer of ours is referred to afterwards.
        """
        transport = self.transport
        if transport is None:
            return
        chunks = self.engine.data_to_send()
        if chunks and not transport.is_closing():
            if self._fd >= 0 and not transport.get_write_buffer_size():
                chunks = self._write_direct(chunks)
            if chunks:
                transport.write(b"".join(chunks))
        if self.engine.wants_close and not transport.is_closing():
            transport.close()

    def _write_direct(self, chunks: list[Buffer]) -> list[Buffer]:
        """writev as much of ``chunks`` as the socket takes now; the rest."""
        pending = list(chunks)
        while pending:
            batch = min(len(pending), IOV_MAX)
            try:
                sent = os.writev(self._fd, pending[:batch])
            except OSError:
                break  # full (EAGAIN), or broken: the transport meets that on its write
            done = 0
            while done < batch and sent >= (size := memoryview(pending[done]).nbytes):
                sent -= size
                done += 1
            if done < batch:  # the socket is full: keep the unsent part of this one
                pending[done] = memoryview(pending[done])[sent:]
                del pending[:done]
                break
            del pending[:done]
        return pending

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


# OpenSSL's names of the alerts a server sends about the client's certificate.
_TLS_HINTS: Final = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires a client certificate: set tls_cert "
                                         "and tls_key",
    "TLSV1_ALERT_UNKNOWN_CA": "it does not trust our certificate's issuer",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it finds our certificate expired",
    "WRONG_VERSION_NUMBER": "is that port TLS? It did not answer as a TLS server",
}


def _connect_failure(exc: OSError, *, tls: bool) -> str:
    """Why connecting failed, in an operator's words."""
    if isinstance(exc, TimeoutError):
        return "timed out" + (" connecting or in the TLS handshake" if tls else "")
    if exc.errno and not isinstance(exc, ssl.SSLError):
        # asyncio's strerror is "Connect call failed (address)": the errno's own words
        # ("Connection refused") say what an operator needs. (An SSLError's errno is
        # the TLS library's own.)
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


def _tls_hint(exc: ssl.SSLError, presented: bool) -> str | None:
    """What a TLS failure usually means, for the log line (``presented``: we sent a
    client certificate); None if nothing useful."""
    reason = getattr(exc, "reason", None) or ""
    if reason == "SSLV3_ALERT_HANDSHAKE_FAILURE":
        # TLS 1.2's catch-all: no version or cipher suite in common (a node on the
        # retired AES profile, PS3.15 B.3), or a client certificate it wanted.
        common = ("no TLS version or cipher suite in common (the router speaks BCP 195: "
                  "TLS 1.2 and later)")
        return common if presented else (f"{common}, or it requires a client certificate: "
                                         "tls_cert and tls_key")
    return _TLS_HINTS.get(reason)


def _describe(event: Event) -> str:
    if isinstance(event, AssociationAborted):
        who = "we aborted" if event.local else ("the provider aborted" if event.provider
                                                else "the peer aborted")
        detail = f": {event.detail}" if event.detail else ""
        return f"{who} (source {event.source}, reason {event.reason}){detail}"
    if isinstance(event, ConnectionClosed):
        return "the connection closed"
    return type(event).__name__


def tls_context(destination: Destination) -> ssl.SSLContext | None:
    """The client TLS context for ``destination`` (PS3.15 B.1), None without TLS.

    Kept while its files are unchanged: loading the system's trust store costs
    milliseconds, each association again; a renewed certificate is taken at once."""
    if not destination.tls:
        return None
    key = (destination.link(), tuple(_signature(path) for path in destination.tls_files))
    kept = _TLS_CONTEXTS.get(destination.name)
    if kept is not None and kept[0] == key:
        return kept[1]
    context = client_context(ca=destination.tls_ca, cert=destination.tls_cert,
                             key=destination.tls_key,
                             check_hostname=destination.tls_check_hostname)
    _TLS_CONTEXTS[destination.name] = (key, context)  # one per destination: bounded
    return context


_TLS_CONTEXTS: dict[str, tuple[object, ssl.SSLContext]] = {}


def _signature(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def proposal_syntaxes(transfer_syntax: str) -> list[str]:
    """Transfer syntaxes to propose for a relayed message that arrived in
    ``transfer_syntax``: that one first (no re-encoding when accepted), then the two
    little endian ones every node must take (PS3.5 §10.1)."""
    return list(dict.fromkeys((transfer_syntax, uids.EXPLICIT_VR_LITTLE_ENDIAN,
                               uids.IMPLICIT_VR_LITTLE_ENDIAN)))


def instance_syntaxes(transfer_syntax: str) -> list[str]:
    """Transfer syntaxes to propose for an instance held in ``transfer_syntax``: a
    native one as :func:`proposal_syntaxes` (converted if the destination takes only
    another); a compressed one alone (the router does not decompress)."""
    if uids.is_uncompressed(transfer_syntax):
        return proposal_syntaxes(transfer_syntax)
    return [transfer_syntax]


def instance_contexts(pairs: Sequence[tuple[str, str]], limit: int = 128,
                      ) -> list[tuple[str, list[str]]]:
    """Presentation contexts for instances held as ``pairs`` of (SOP class, transfer
    syntax), the last ones first when they do not all fit in ``limit`` contexts.

    Each held syntax is proposed in a context of its own, and for a native one the
    two little endian ones in another. In one context [held, Explicit LE, Implicit
    LE] the acceptor picks (PS3.8 §9.3.2.2), and DCMTK's storescp picks Explicit LE
    whatever comes first: a big endian or an implicit VR instance was then converted
    although the destination takes it as it is, and converting implicit VR makes
    private elements UN. With its own context the held syntax is accepted wherever
    it is supported, and ``context_for_instance`` prefers it; the other context
    serves destinations that take only what PS3.5 §10.1 requires."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    groups: list[list[tuple[str, tuple[str, ...]]]] = []
    for sop_class, transfer_syntax in reversed(pairs):
        wanted: list[tuple[str, tuple[str, ...]]] = [(sop_class, (transfer_syntax,))]
        if uids.is_uncompressed(transfer_syntax):
            fallback = tuple(ts for ts in (uids.EXPLICIT_VR_LITTLE_ENDIAN,
                                           uids.IMPLICIT_VR_LITTLE_ENDIAN)
                             if ts != transfer_syntax)
            wanted.append((sop_class, fallback))
        new = [c for c in wanted if c not in seen]
        if len(seen) + len(new) > limit:
            break
        seen.update(new)
        groups.append(new)
    return [(sop, list(syntaxes)) for group in reversed(groups) for sop, syntaxes in group]


async def open_association(destination: Destination,
                           contexts: list[tuple[str, list[str]]], *, label: str,
                           roles: dict[str, tuple[bool, bool]] | None = None,
                           ) -> OutboundAssociation:
    """An association to ``destination`` as our AE (its ``calling_ae``) proposing
    ``contexts`` (and ``roles``), with its PDU size, timeout and TLS; raises
    :class:`OutboundError`."""
    request = build_request(calling_ae_title=destination.calling_ae,
                            called_ae_title=destination.ae_title, contexts=contexts,
                            maximum_length=destination.max_pdu, roles=roles or None)
    try:
        context = tls_context(destination)
    except (OSError, ValueError) as exc:  # a TLS file changed on disk since it was checked
        files = ", ".join(map(str, destination.tls_files))
        raise OutboundError(f"cannot use its TLS files ({files}): {exc}") from None
    assoc = await OutboundAssociation.open(destination.host, destination.port, request,
                                           timeout=destination.timeout,
                                           ssl_context=context, label=label,
                                           server_hostname=destination.tls_server_name,
                                           client_certificate=destination.tls_cert is not None)
    assoc.link = destination.link()
    return assoc


def uid_name(uid: str) -> str:
    """A UID with its name, for the log: "CT Image Storage (1.2.840...)"."""
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def _say_unusable(event: AssociationEstablished, label: str) -> None:
    """One line for contexts the peer accepted in a transfer syntax we did not offer
    for them (or in none): PS3.8 §9.3.3.2 has it pick one of ours, so they are not
    used (accepted_contexts). Without it, the instance went to dead letters as if
    the peer had refused its SOP class."""
    offered = {item.context_id: item for item in event.request.presentation_contexts}
    for item in event.accept.presentation_contexts:
        if item.result != PresentationContextResult.ACCEPTANCE or \
                item.context_id in event.contexts or item.context_id not in offered:
            continue
        proposed = offered[item.context_id]
        log.warning("%s accepted presentation context %d (%s) in %s, which was not offered "
                    "for it (%s): not used (PS3.8 9.3.3.2)", label, item.context_id,
                    uid_name(proposed.abstract_syntax),
                    uid_name(item.transfer_syntax) if item.transfer_syntax else "no syntax",
                    ", ".join(map(uid_name, proposed.transfer_syntaxes)))


def _checked_response(rsp: dimse.CStoreRSP, rq: dimse.CStoreRQ) -> dimse.CStoreRSP:
    """``rsp``, or a failure in its place when it names another instance or SOP class
    than ``rq``: PS3.7 Table 9.3-2 has them equal to the request's where present. A
    destination answering Success for some other instance has not said it holds ours;
    taken as delivered, the queued copy was deleted (an outside hostile-input
    campaign). Absent, they are allowed (U)."""
    for field in ("affected_sop_instance_uid", "affected_sop_class_uid"):
        named = getattr(rsp, field)
        if named is not None and named != getattr(rq, field):
            kind = "instance" if "instance" in field else "class"
            comment = f"answered for another SOP {kind}: {named}"
            return dataclasses.replace(rsp, status=dimse.PROCESSING_FAILURE,
                                       error_comment=dimse.error_comment(comment))
    return rsp


def _converted(path: Path, fd: int | None, part10: Part10, transfer_syntax: str) -> bytes:
    return transcode(_read_from(path, fd, part10.dataset_offset), part10.transfer_syntax,
                     transfer_syntax)


def _read_from(path: Path, fd: int | None, offset: int) -> bytes:
    """The bytes of ``path`` (or of ``fd``, open on it) from ``offset`` to its end."""
    if fd is None:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read()
    parts, size = [], os.fstat(fd).st_size
    while offset < size:
        part = os.pread(fd, size - offset, offset)  # partial past 2 GiB
        if not part:
            raise OSError(f"the file ended at byte {offset} of {size} while being read")
        parts.append(part)
        offset += len(part)
    return b"".join(parts)
