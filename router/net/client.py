"""Client API: open an association and send any DIMSE request (blocking).

    from router.net.client import connect
    with connect("pacs", 104, calling_ae="ME", called_ae="PACS",
                 contexts=[(CT_IMAGE_STORAGE, [EXPLICIT_VR_LITTLE_ENDIAN])]) as assoc:
        assoc.echo()
        assoc.store("ct.dcm")
        for status, identifier in assoc.find(query):
            ...

Every method sends one DIMSE request (PS3.7 §9-10) and returns the final
response; C-FIND/C-MOVE/C-GET return iterators of responses so pending results
arrive as they come (closing one early sends a C-CANCEL and reads the rest of
the answers). A C-GET's C-STORE sub-operations (PS3.4 C.4.3) arrive on this
association and go to ``on_store``; any other request the peer sends meanwhile
(an N-EVENT-REPORT from a Storage Commitment SCP...) goes to ``on_request``, or
is refused with 0211H. Files are sent as they are on disk (D5: the data set
bytes after the file meta, streamed in PDU-sized pieces), never decoded unless
the negotiated transfer syntax forces a conversion.

Data sets other than C-STORE's (C-FIND identifiers, N-service attribute lists)
are held whole, so they are capped (``max_dataset_size``), and a deflated one is
never inflated past ``max_inflated_size``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import logging
import os
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

from pydicom.dataset import Dataset

from router.dicom import dimse, uids
from router.dicom.association import Association, Role
from router.dicom.dataset import (
    decode_dataset,
    encode_dataset,
    read_part10_header,
    transcode,
)
from router.dicom.errors import LocalProtocolError, ProtocolError
from router.dicom.events import (
    AssociationAborted,
    AssociationEstablished,
    AssociationRejected,
    CommandReceived,
    CommandRejected,
    ConnectionClosed,
    DataReceived,
    Event,
    ReleaseRequested,
)
from router.dicom.negotiation import NegotiatedContext, build_request, context_for_instance
from router.dicom.pdu import AAssociateRJ, UserIdentityRQ, reject_meaning
from router.net.connection import Connection, PeerTimeout

__all__ = [
    "DEFAULT_MAX_DATASET_SIZE",
    "DEFAULT_MAX_INFLATED_SIZE",
    "AssociationAbortedError",
    "AssociationRejectedError",
    "ClientAssociation",
    "DatasetTooLargeError",
    "NetworkError",
    "RequestHandler",
    "ResponseRejectedError",
    "StoreHandler",
    "connect",
    "file_chunks",
    "rejected_answer",
    "response_for",
    "response_to",
]

log = logging.getLogger("router.net.client")

DEFAULT_TRANSFER_SYNTAXES = (
    uids.EXPLICIT_VR_LITTLE_ENDIAN,
    uids.IMPLICIT_VR_LITTLE_ENDIAN,
)

#: Largest data set held whole (C-FIND identifiers, N-service attribute lists...).
DEFAULT_MAX_DATASET_SIZE = 64 << 20
#: Largest size a deflated data set may inflate to (PS3.5 A.5: a zip bomb guard).
DEFAULT_MAX_INFLATED_SIZE = 256 << 20

# A C-GET sub-operation handler: (request, data set bytes, transfer syntax) -> status.
StoreHandler = Callable[[dimse.CStoreRQ, bytes, str], int]
# Any other request the peer sends on our association:
# (context ID, request, data set bytes or None) -> (status, reply data set or None).
RequestHandler = Callable[[int, Any, bytes | None], tuple[int, Dataset | None]]


def file_chunks(path: Path, offset: int, size: int) -> Iterator[tuple[bytes, bool]]:
    """The bytes of ``path`` from ``offset`` in pieces of ``size``, each with a
    last flag (one empty, last piece for an empty tail): bounded memory.

    An odd total gets one trailing NUL byte: only a deflated data set can be
    odd (PS3.5 A.5 streams are padded so in files, not all writers do), and
    DCMTK aborts the association on an odd P-DATA fragment ("DIMSE: Odd
    Fragment Length"); inflate ignores what follows the end of the stream."""
    total = 0
    with path.open("rb") as fh:
        fh.seek(offset)
        chunk = fh.read(size)
        while True:
            following = fh.read(size)
            total += len(chunk)
            if not following and total % 2:
                chunk += b"\x00"
            yield chunk, not following
            if not following:
                return
            chunk = following


class NetworkError(ProtocolError):
    """The association could not be used (rejected, aborted, closed)."""


class AssociationRejectedError(NetworkError):
    def __init__(self, rj: AAssociateRJ) -> None:
        super().__init__(
            f"association rejected: {reject_meaning(int(rj.source), int(rj.reason))} "
            f"(result {int(rj.result)}, source {int(rj.source)}, reason {rj.reason})"
        )
        self.reject = rj


class AssociationAbortedError(NetworkError):
    def __init__(self, event: AssociationAborted | None, what: str = "") -> None:
        detail = event.detail if event else "connection closed"
        super().__init__(f"association aborted{': ' + what if what else ''} ({detail})")
        self.event = event


class DatasetTooLargeError(NetworkError):
    """A data set the peer sent exceeded ``max_dataset_size``: we aborted."""


class ResponseRejectedError(NetworkError):
    """The response we waited for arrived, but its command set is invalid
    (PS3.7 Annex C); ``detail`` says why. The association is left as it is."""

    def __init__(self, message_id: int, detail: str) -> None:
        super().__init__(f"invalid response to message {message_id}: {detail}")
        self.detail = detail


def response_to(command_field: int, message_id: int, status: int,
                **fields: Any) -> dimse.DimseMessage | None:
    """The response (Command Field | 8000H, PS3.7 Table E.1-1) to request
    ``command_field``, or None if there is no such message type.

    Only the ``fields`` the response class has are set (None values dropped):
    every response's fields but Message ID Being Responded To and Status are
    optional, so any request can be answered knowing just its ID."""
    cls = _RESPONSE_TYPES.get(command_field | 0x8000)
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in fields.items() if k in names and v is not None}
    return cls(message_id_being_responded_to=message_id, status=status, **kwargs)


def rejected_answer(event: CommandRejected, who: object,
                    logger: logging.Logger) -> dimse.DimseMessage | str | None:
    """What a command set the engine framed but could not use (PS3.7 Annex C) gets,
    said in one line of ``logger`` naming association ``who``: the response to send
    (with the engine's status: 0211H, 0212H or C000H); or, for an unknown Command
    Field, which has no response type, the reason to abort with (the peer would
    wait for ever); or None: an invalid response or C-CANCEL is dropped."""
    field, mid = event.command_field, event.message_id
    if field & 0x8000 or field == dimse.CommandField.C_CANCEL_RQ:
        logger.warning("association %s: dropped an invalid command set (command field "
                       "0x%04X, message %d): %s", who, field, mid, event.detail)
        return None
    rsp = response_to(field, mid, event.status)
    if rsp is None:
        detail = (f"invalid request with unknown command field 0x{field:04X} "
                  f"(message {mid}): {event.detail}")
        logger.warning("association %s: %s; aborting", who, detail)
        return detail
    logger.warning("association %s: invalid request (command field 0x%04X, message %d): "
                   "%s; answered 0x%04X", who, field, mid, event.detail, event.status)
    return rsp


_RESPONSE_TYPES: dict[int, Any] = {
    int(field): cls for field, cls in dimse.MESSAGE_TYPES.items()
    if issubclass(cls, dimse.DimseResponse)
}


def response_for(rq: Any, status: int, **fields: Any) -> dimse.DimseMessage:
    """The response to request ``rq`` with ``status``, echoing the SOP class and
    instance (Affected or Requested, PS3.7 §9.3 / §10.3 U(=) fields) and the
    event or action type; ``fields`` add to or override these."""
    echoed: dict[str, Any] = {
        "affected_sop_class_uid": getattr(rq, "affected_sop_class_uid", None)
        or getattr(rq, "requested_sop_class_uid", None),
        "affected_sop_instance_uid": getattr(rq, "affected_sop_instance_uid", None)
        or getattr(rq, "requested_sop_instance_uid", None),
        "event_type_id": getattr(rq, "event_type_id", None),
        "action_type_id": getattr(rq, "action_type_id", None),
    }
    echoed.update(fields)
    rsp = response_to(int(rq.command_field), rq.message_id, status, **echoed)
    if rsp is None:  # pragma: no cover - every request type has its response type
        raise LocalProtocolError(f"no response type for {type(rq).__name__}")
    return rsp


@dataclass(frozen=True, slots=True)
class _Response:
    message: Any
    dataset: bytes | None


def connect(
    host: str,
    port: int,
    *,
    calling_ae: str = "DICOM-ROUTER",
    called_ae: str = "ANY-SCP",
    contexts: Sequence[tuple[str, Sequence[str]]] | None = None,
    roles: Mapping[str, tuple[bool, bool]] | None = None,
    max_pdu: int = 1 << 20,
    user_identity: UserIdentityRQ | None = None,
    acse_timeout: float = 30.0,
    dimse_timeout: float | None = None,
    on_store: StoreHandler | None = None,
    on_request: RequestHandler | None = None,
    max_dataset_size: int | None = DEFAULT_MAX_DATASET_SIZE,
    max_inflated_size: int | None = DEFAULT_MAX_INFLATED_SIZE,
) -> ClientAssociation:
    """Open an association; raises :class:`AssociationRejectedError` if refused.

    ``contexts``: (abstract syntax, transfer syntaxes) pairs to propose;
    verification alone if not given. ``roles``: SOP class -> (scu, scp) role
    selection proposals (PS3.7 D.3.3.4), e.g. the storage classes with
    ``(False, True)`` for C-GET. ``on_request`` answers requests other than
    C-STORE that the peer sends while we wait (none: 0211H). Data sets other
    than C-STORE's larger than ``max_dataset_size`` abort the association
    (:class:`DatasetTooLargeError`); None means no limit.
    """
    proposed = list(contexts or [(uids.VERIFICATION_SOP_CLASS, DEFAULT_TRANSFER_SYNTAXES)])
    rq = build_request(
        calling_ae_title=calling_ae,
        called_ae_title=called_ae,
        contexts=proposed,
        maximum_length=max_pdu,
        roles=roles,
        user_identity=user_identity,
    )
    assoc = Association(Role.REQUESTOR)
    assoc.request(rq)
    conn = Connection.open(host, port, assoc, connect_timeout=acse_timeout,
                           artim_timeout=acse_timeout)
    event = conn.next_event(acse_timeout)
    if isinstance(event, AssociationEstablished):
        return ClientAssociation(conn, dimse_timeout=dimse_timeout, on_store=on_store,
                                 on_request=on_request, max_dataset_size=max_dataset_size,
                                 max_inflated_size=max_inflated_size)
    conn.close()
    if isinstance(event, AssociationRejected):
        raise AssociationRejectedError(event.reject)
    raise AssociationAbortedError(event if isinstance(event, AssociationAborted) else None,
                                  "during association negotiation")


class ClientAssociation:
    """An established association, requestor side."""

    def __init__(
        self,
        conn: Connection,
        *,
        dimse_timeout: float | None = None,
        on_store: StoreHandler | None = None,
        on_request: RequestHandler | None = None,
        max_dataset_size: int | None = DEFAULT_MAX_DATASET_SIZE,
        max_inflated_size: int | None = DEFAULT_MAX_INFLATED_SIZE,
    ) -> None:
        self._conn = conn
        self._assoc = conn.assoc
        #: The Error Comment (0000,0902) of the last C-FIND/C-MOVE/C-GET's final
        #: response, if it had one: what the peer says about a failure or warning.
        self.final_comment: str | None = None
        self.dimse_timeout = dimse_timeout
        self.on_store = on_store
        self.on_request = on_request
        self.max_dataset_size = max_dataset_size
        self.max_inflated_size = max_inflated_size
        self._ids = itertools.cycle(range(1, 65536))
        # Presentation context of each operation still in progress: its
        # C-CANCEL goes on the same one (PS3.7 §9.3.2.3).
        self._operation_contexts: dict[int, int] = {}
        self.current_message_id: int | None = None
        self.messages_sent = 0
        self.messages_received = 0

    # ---------------------------------------------------------- introspection

    @property
    def is_associated(self) -> bool:
        return self._assoc.is_established and not self._conn.closed

    @property
    def contexts(self) -> Mapping[int, NegotiatedContext]:
        return self._assoc.contexts

    @property
    def peer(self) -> tuple[str, int]:
        return self._conn.peer

    @property
    def peer_max_pdu(self) -> int:
        return self._assoc.peer_max_pdu

    @property
    def bytes_to_send(self) -> int:
        return self._assoc.bytes_to_send

    def __enter__(self) -> ClientAssociation:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.release()
        else:
            self.abort()

    # ------------------------------------------------------------- contexts

    def context_for(self, abstract_syntax: str, transfer_syntax: str | None = None,
                    *, scp: bool = False) -> NegotiatedContext:
        """An accepted context for the SOP class (and TS, if given).

        ``scp=True`` looks for one where we (the requestor) act as SCP.
        """
        for ctx in self._assoc.contexts.values():
            if ctx.abstract_syntax != abstract_syntax:
                continue
            if transfer_syntax is not None and ctx.transfer_syntax != transfer_syntax:
                continue
            if scp and not ctx.requestor_scp:
                continue
            if not scp and not ctx.requestor_scu:
                continue
            return ctx
        ts = f" with transfer syntax {transfer_syntax}" if transfer_syntax else ""
        raise LocalProtocolError(f"no accepted presentation context for {abstract_syntax}{ts}")

    def _next_id(self) -> int:
        return next(self._ids)

    # -------------------------------------------------------------- sending

    def _send(self, ctx: NegotiatedContext, msg: Any, dataset: bytes | None = None) -> None:
        self._require_associated()
        self._assoc.send_message(ctx.context_id, msg, dataset)
        self._conn.flush()
        self.messages_sent += 1
        if dimse.is_request(msg) and not isinstance(msg, dimse.CCancelRQ):
            self.current_message_id = msg.message_id
            self._operation_contexts[msg.message_id] = ctx.context_id

    def _require_associated(self) -> None:
        if not self.is_associated:
            raise NetworkError("the association is not established")

    def _receive(self, message_id: int, timeout: float | None = None) -> _Response:
        """Wait for the response to ``message_id`` (with its data set, if any),
        answering the peer's requests meanwhile (C-GET sub-operations...)."""
        if timeout is None:
            timeout = self.dimse_timeout
        while True:
            event = self._conn.next_event(timeout)
            if isinstance(event, CommandRejected):
                self._rejected(event, message_id)
                continue
            if not isinstance(event, CommandReceived):
                self._unexpected(event)
            msg = event.message
            self.messages_received += 1
            if isinstance(msg, dimse.CStoreRQ):
                if not msg.has_dataset:
                    log.warning("C-STORE-RQ from %s:%s without a data set: answered 0xC000",
                                *self.peer)
                    self._assoc.send_message(event.context_id,
                                             response_for(msg, dimse.CANNOT_UNDERSTAND))
                    self._conn.flush()
                    continue
                # Handed over whole (the on_store API): no cap but the peer's.
                data = self._read_dataset(None, timeout)
                self._store_sub_operation(event.context_id, msg, data)
                continue
            dataset = (self._read_dataset(self.max_dataset_size, timeout)
                       if msg.has_dataset else None)
            if isinstance(msg, dimse.CCancelRQ):
                log.warning("ignoring C-CANCEL-RQ from %s:%s: we perform no operation",
                            *self.peer)
                continue
            if not isinstance(msg, dimse.DimseResponse):
                self._answer_request(event.context_id, msg, dataset)
                continue
            responded = getattr(msg, "message_id_being_responded_to", None)
            if responded != message_id:
                log.warning("ignoring %s for message %s (waiting for %s)",
                            type(msg).__name__, responded, message_id)
                continue
            if dimse.status_category(msg.status) is not dimse.StatusCategory.PENDING:
                self._operation_contexts.pop(message_id, None)
            return _Response(msg, dataset)

    def _read_dataset(self, limit: int | None, timeout: float | None) -> bytes:
        """The data set that follows a command, each byte copied once (BytesIO.getvalue()
        hands its buffer over as bytes)."""
        buf = io.BytesIO()
        size = 0
        while True:
            event = self._conn.next_event(timeout)
            if not isinstance(event, DataReceived):
                self._unexpected(event)
            size += len(event.data)
            if limit is not None and size > limit:
                self.abort()
                raise DatasetTooLargeError(
                    f"{self.peer[0]}:{self.peer[1]} sent a data set larger than {limit} "
                    "bytes (max_dataset_size): association aborted")
            buf.write(event.data)
            if event.last:
                return buf.getvalue()

    def _drain(self, timeout: float | None) -> None:
        """Read and drop a data set nobody will use."""
        while True:
            event = self._conn.next_event(timeout)
            if not isinstance(event, DataReceived):
                self._unexpected(event)
            if event.last:
                return

    def _rejected(self, event: CommandRejected, awaited: int) -> None:
        """A framed but invalid command set (PS3.7 Annex C): drain its data set;
        raise if it is the response we wait for, answer it if it is a request."""
        if event.has_dataset:
            self._drain(self.dimse_timeout)
        field = event.command_field
        if field & 0x8000 and event.message_id == awaited:
            self._operation_contexts.pop(awaited, None)
            raise ResponseRejectedError(awaited, event.detail)
        if not field & 0x8000 and field != dimse.CommandField.C_CANCEL_RQ:
            rsp = response_to(field, event.message_id, event.status)
            if rsp is not None:
                log.warning("invalid request (command field 0x%04X, message %d) from %s:%s: "
                            "%s; answered 0x%04X", field, event.message_id, *self.peer,
                            event.detail, event.status)
                self._assoc.send_message(event.context_id, rsp)
                self._conn.flush()
                return
        log.warning("dropping an invalid command set (command field 0x%04X, message %d) "
                    "from %s:%s: %s", field, event.message_id, *self.peer, event.detail)

    def _answer_request(self, context_id: int, rq: Any, dataset: bytes | None) -> None:
        """A request from the peer other than C-STORE: ``on_request`` answers it
        (none: 0211H unrecognized operation, PS3.7 Annex C)."""
        status, reply = dimse.UNRECOGNIZED_OPERATION, None
        if self.on_request is None:
            log.warning("%s from %s:%s refused with 0x0211: no on_request handler",
                        type(rq).__name__, *self.peer)
        else:
            try:
                status, reply = self.on_request(context_id, rq, dataset)
            except Exception:
                log.exception("on_request handler failed for %s", type(rq).__name__)
                status, reply = dimse.PROCESSING_FAILURE, None
        ctx = self._assoc.contexts[context_id]
        payload = encode_dataset(reply, ctx.transfer_syntax) if reply is not None else None
        rsp = response_for(rq, status, has_dataset=payload is not None)
        self._assoc.send_message(context_id, rsp, payload)
        self._conn.flush()

    def _unexpected(self, event: Event) -> NoReturn:
        if isinstance(event, ReleaseRequested):
            # The peer wants to release while we wait for an answer (PS3.8
            # allows it): answer, and report that the operation did not finish.
            self._assoc.release_response()
            self._conn.flush()
            raise NetworkError("peer released the association during an operation")
        if isinstance(event, AssociationAborted):
            raise AssociationAbortedError(event)
        if isinstance(event, ConnectionClosed):
            raise AssociationAbortedError(None)
        raise NetworkError(f"unexpected {type(event).__name__}")

    def _store_sub_operation(self, context_id: int, rq: dimse.CStoreRQ, data: bytes) -> None:
        ctx = self._assoc.contexts[context_id]
        status = dimse.SOP_CLASS_NOT_SUPPORTED
        if self.on_store is not None:
            try:
                status = self.on_store(rq, data, ctx.transfer_syntax)
            except Exception:
                log.exception("on_store handler failed for %s", rq.affected_sop_instance_uid)
                status = dimse.PROCESSING_FAILURE
        rsp = dimse.CStoreRSP(
            message_id_being_responded_to=rq.message_id,
            affected_sop_class_uid=rq.affected_sop_class_uid,
            affected_sop_instance_uid=rq.affected_sop_instance_uid,
            status=status,
        )
        self._assoc.send_message(context_id, rsp)
        self._conn.flush()

    # ------------------------------------------------------------ DIMSE-C

    def echo(self) -> int:
        """C-ECHO (PS3.7 §9.1.5); returns the status."""
        ctx = self.context_for(uids.VERIFICATION_SOP_CLASS)
        mid = self._next_id()
        self._send(ctx, dimse.CEchoRQ(message_id=mid,
                                         affected_sop_class_uid=uids.VERIFICATION_SOP_CLASS))
        return int(self._receive(mid).message.status)

    def store(
        self,
        instance: Dataset | str | os.PathLike[str],
        *,
        priority: dimse.Priority = dimse.Priority.MEDIUM,
        move_originator: tuple[str, int] | None = None,
    ) -> dimse.CStoreRSP:
        """C-STORE (PS3.7 §9.1.1) of a file (sent as is) or a pydicom Dataset."""
        mid = self._next_id()
        originator_ae, originator_id = move_originator or (None, None)
        if isinstance(instance, Dataset):
            sop_class = str(instance.SOPClassUID)
            sop_instance = str(instance.SOPInstanceUID)
            ctx = self.context_for(sop_class)
            payload: bytes | None = encode_dataset(instance, ctx.transfer_syntax)
            path = None
        else:
            path = Path(instance)
            header = read_part10_header(path)
            sop_class, sop_instance = header.sop_class_uid, header.sop_instance_uid
            ctx = self._context_for_file(sop_class, header.transfer_syntax)
            payload = None
            if ctx.transfer_syntax != header.transfer_syntax:
                # Only between uncompressed syntaxes: decode and re-encode.
                payload = transcode(path.read_bytes()[header.dataset_offset:],
                                    header.transfer_syntax, ctx.transfer_syntax)
        rq = dimse.CStoreRQ(
            message_id=mid,
            affected_sop_class_uid=sop_class,
            affected_sop_instance_uid=sop_instance,
            priority=priority,
            move_originator_application_entity_title=originator_ae,
            move_originator_message_id=originator_id,
        )
        if payload is not None or path is None:
            self._send(ctx, rq, payload or b"")
        else:
            self._send_file(ctx, rq, path, header.dataset_offset)
        rsp = self._receive(mid).message
        assert isinstance(rsp, dimse.CStoreRSP)
        return rsp

    def _context_for_file(self, sop_class: str, transfer_syntax: str) -> NegotiatedContext:
        ctx = context_for_instance((c for c in self._assoc.contexts.values()
                                    if c.requestor_scu), sop_class, transfer_syntax)
        if ctx is not None:
            return ctx
        if uids.is_uncompressed(transfer_syntax):
            raise LocalProtocolError(
                f"no accepted presentation context for {sop_class} in {transfer_syntax} "
                "or another uncompressed transfer syntax")
        raise LocalProtocolError(f"no accepted presentation context for {sop_class} "
                                 f"with transfer syntax {transfer_syntax}")

    def _send_file(self, ctx: NegotiatedContext, rq: Any, path: Path, offset: int) -> None:
        """Stream the data set from disk in PDU-sized pieces: memory stays bounded."""
        self._send(ctx, rq)
        for chunk, last in file_chunks(path, offset, max(self._assoc.max_send_fragment, 1 << 16)):
            self._assoc.send_data(ctx.context_id, chunk, last)
            self._conn.flush()

    def find(
        self, query: Dataset, *, model: str = uids.STUDY_ROOT_QR_FIND,
        priority: dimse.Priority = dimse.Priority.MEDIUM,
    ) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND (PS3.7 §9.1.2): yields (status, identifier) as responses arrive."""
        ctx = self.context_for(model)
        mid = self._next_id()
        self._send(ctx, dimse.CFindRQ(message_id=mid, affected_sop_class_uid=model,
                                      priority=priority),
                   encode_dataset(query, ctx.transfer_syntax))
        with contextlib.closing(self._responses(mid)) as responses:
            for rsp in responses:
                status = int(rsp.message.status)
                identifier = (decode_dataset(rsp.dataset, ctx.transfer_syntax,
                                             max_inflated_size=self.max_inflated_size)
                              if rsp.dataset else None)
                yield status, identifier

    def move(self, query: Dataset, destination: str, *, model: str = uids.STUDY_ROOT_QR_MOVE,
             priority: dimse.Priority = dimse.Priority.MEDIUM) -> Iterator[dimse.CMoveRSP]:
        """C-MOVE (PS3.7 §9.1.4): yields each response (pending ones carry counts)."""
        ctx = self.context_for(model)
        mid = self._next_id()
        self._send(ctx, dimse.CMoveRQ(message_id=mid, affected_sop_class_uid=model,
                                      priority=priority, move_destination=destination),
                   encode_dataset(query, ctx.transfer_syntax))
        with contextlib.closing(self._responses(mid)) as responses:
            for rsp in responses:
                yield rsp.message

    def get(
        self, query: Dataset, *, model: str = uids.STUDY_ROOT_QR_GET,
        priority: dimse.Priority = dimse.Priority.MEDIUM, on_store: StoreHandler | None = None,
    ) -> Iterator[dimse.CGetRSP]:
        """C-GET (PS3.7 §9.1.3): the instances arrive as C-STOREs on this association."""
        if on_store is not None:
            self.on_store = on_store
        ctx = self.context_for(model)
        mid = self._next_id()
        self._send(ctx, dimse.CGetRQ(message_id=mid, affected_sop_class_uid=model,
                                     priority=priority),
                   encode_dataset(query, ctx.transfer_syntax))
        with contextlib.closing(self._responses(mid)) as responses:
            for rsp in responses:
                yield rsp.message

    def _responses(self, message_id: int) -> Generator[_Response, None, None]:
        """The responses to a C-FIND/C-MOVE/C-GET, the final one last.

        If the caller stops early (the generator is closed: ``break``, ``close()``;
        the C-FIND/C-MOVE/C-GET generators close this one with them), the
        operation is cancelled (PS3.7 §9.3.2.3) and its remaining responses
        read, so the association is ready for the next request."""
        done = False
        try:
            while True:
                rsp = self._receive(message_id)
                done = dimse.status_category(rsp.message.status) \
                    is not dimse.StatusCategory.PENDING
                if done:
                    self.final_comment = getattr(rsp.message, "error_comment", None)
                yield rsp
                if done:
                    return
        except GeneratorExit:
            if not done:
                self._cancel_and_drain(message_id)
            raise
        finally:
            if done:
                self._operation_contexts.pop(message_id, None)

    def _cancel_and_drain(self, message_id: int) -> None:
        # Runs inside generator.close(): nothing may be raised from here, so a
        # failure is logged, and a peer that does not answer is aborted.
        if not self.is_associated:
            return
        timeout = self.dimse_timeout if self.dimse_timeout is not None else \
            self._conn.artim_timeout
        try:
            self.cancel(message_id)
            while dimse.status_category(self._receive(message_id, timeout).message.status) \
                    is dimse.StatusCategory.PENDING:
                pass
        except PeerTimeout:
            log.warning("no final response from %s:%s to message %d within %.0f s of our "
                        "C-CANCEL: aborting", *self.peer, message_id, timeout)
            self.abort()
        except (ProtocolError, OSError) as exc:
            log.warning("cancelling message %d on %s:%s failed: %s", message_id, *self.peer,
                        exc)
        finally:
            self._operation_contexts.pop(message_id, None)

    def cancel(self, message_id: int, model: str | None = None) -> None:
        """C-CANCEL (PS3.7 §9.3.2.3) for the operation ``message_id``, on the
        presentation context that operation uses (``model`` and then any context
        serve only for an operation this association does not know of)."""
        context_id = self._operation_contexts.get(message_id)
        if context_id is not None:
            ctx = self._assoc.contexts[context_id]
        elif model:
            ctx = self.context_for(model)
        else:
            ctx = next(iter(self._assoc.contexts.values()))
        self._send(ctx, dimse.CCancelRQ(message_id_being_responded_to=message_id))

    # ------------------------------------------------------------ DIMSE-N

    def _n_request(self, sop_class: str, msg: Any,
                   dataset: Dataset | None) -> tuple[Any, Dataset | None]:
        ctx = self.context_for(sop_class)
        payload = encode_dataset(dataset, ctx.transfer_syntax) if dataset is not None else None
        self._send(ctx, msg, payload)
        rsp = self._receive(msg.message_id)
        reply = (decode_dataset(rsp.dataset, ctx.transfer_syntax,
                                max_inflated_size=self.max_inflated_size)
                 if rsp.dataset else None)
        return rsp.message, reply

    def n_event_report(self, sop_class: str, sop_instance: str, event_type_id: int,
                       info: Dataset | None = None) -> tuple[Any, Dataset | None]:
        """N-EVENT-REPORT (PS3.7 §10.1.1)."""
        msg = dimse.NEventReportRQ(message_id=self._next_id(), affected_sop_class_uid=sop_class,
                                   affected_sop_instance_uid=sop_instance,
                                   event_type_id=event_type_id, has_dataset=info is not None)
        return self._n_request(sop_class, msg, info)

    def n_get(self, sop_class: str, sop_instance: str,
              attributes: Sequence[int] = ()) -> tuple[Any, Dataset | None]:
        """N-GET (PS3.7 §10.1.2); no ``attributes`` asks for all of them.

        Tags may be any ints (pydicom's ``Tag`` included)."""
        msg = dimse.NGetRQ(message_id=self._next_id(), requested_sop_class_uid=sop_class,
                           requested_sop_instance_uid=sop_instance,
                           attribute_identifier_list=tuple(int(a) for a in attributes) or None)
        return self._n_request(sop_class, msg, None)

    def n_set(self, sop_class: str, sop_instance: str,
              modification: Dataset) -> tuple[Any, Dataset | None]:
        """N-SET (PS3.7 §10.1.3)."""
        msg = dimse.NSetRQ(message_id=self._next_id(), requested_sop_class_uid=sop_class,
                           requested_sop_instance_uid=sop_instance)
        return self._n_request(sop_class, msg, modification)

    def n_action(self, sop_class: str, sop_instance: str, action_type_id: int,
                 info: Dataset | None = None) -> tuple[Any, Dataset | None]:
        """N-ACTION (PS3.7 §10.1.4)."""
        msg = dimse.NActionRQ(message_id=self._next_id(), requested_sop_class_uid=sop_class,
                              requested_sop_instance_uid=sop_instance,
                              action_type_id=action_type_id, has_dataset=info is not None)
        return self._n_request(sop_class, msg, info)

    def n_create(self, sop_class: str, sop_instance: str | None = None,
                 attributes: Dataset | None = None) -> tuple[Any, Dataset | None]:
        """N-CREATE (PS3.7 §10.1.5)."""
        msg = dimse.NCreateRQ(message_id=self._next_id(), affected_sop_class_uid=sop_class,
                              affected_sop_instance_uid=sop_instance,
                              has_dataset=attributes is not None)
        return self._n_request(sop_class, msg, attributes)

    def n_delete(self, sop_class: str, sop_instance: str) -> tuple[Any, Dataset | None]:
        """N-DELETE (PS3.7 §10.1.6)."""
        msg = dimse.NDeleteRQ(message_id=self._next_id(), requested_sop_class_uid=sop_class,
                              requested_sop_instance_uid=sop_instance)
        return self._n_request(sop_class, msg, None)

    # ---------------------------------------------------- release / abort

    def release(self) -> None:
        """A-RELEASE (PS3.8 §7.2); waits for the peer's answer."""
        if not self.is_associated:
            self._conn.close()
            return
        self._assoc.release()
        self._conn.flush()
        try:
            # ReleaseCompleted (AR-3) then ConnectionClosed; late P-DATA in Sta7
            # (AR-6) has nobody waiting for it any more and is dropped.
            while not isinstance(self._conn.next_event(self._conn.artim_timeout),
                                 ConnectionClosed):
                pass
        except PeerTimeout:
            log.warning("no A-RELEASE-RP from %s:%s; aborting", *self.peer)
            self.abort()
        finally:
            self._conn.close()

    def abort(self) -> None:
        """A-ABORT (PS3.8 §7.3): tell the peer and drop the connection."""
        self._assoc.abort()
        self._conn.flush()
        self._conn.close()
