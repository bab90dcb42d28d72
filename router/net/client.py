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
arrive as they come. A C-GET's C-STORE sub-operations (PS3.4 C.4.3) arrive on
this association and go to ``on_store``. Files are sent as they are on disk
(D5: the data set bytes after the file meta, streamed in PDU-sized pieces),
never decoded unless the negotiated transfer syntax forces a conversion.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pydicom.dataset import Dataset

from router.dicom import dimse, uids
from router.dicom.association import Association, Role
from router.dicom.dataset import decode_dataset, encode_dataset, read_part10_header
from router.dicom.errors import LocalProtocolError, ProtocolError
from router.dicom.events import (
    AssociationAborted,
    AssociationEstablished,
    AssociationRejected,
    CommandReceived,
    ConnectionClosed,
    DataReceived,
    Event,
    ReleaseRequested,
)
from router.dicom.negotiation import NegotiatedContext, build_request
from router.dicom.pdu import AAssociateRJ, UserIdentityRQ
from router.net.connection import Connection, PeerTimeout

__all__ = [
    "AssociationAbortedError",
    "AssociationRejectedError",
    "ClientAssociation",
    "NetworkError",
    "StoreHandler",
    "connect",
    "file_chunks",
]

log = logging.getLogger("router.net.client")

DEFAULT_TRANSFER_SYNTAXES = (
    uids.EXPLICIT_VR_LITTLE_ENDIAN,
    uids.IMPLICIT_VR_LITTLE_ENDIAN,
)

# A C-GET sub-operation handler: (request, data set bytes, transfer syntax) -> status.
StoreHandler = Callable[[dimse.CStoreRQ, bytes, str], int]


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
            f"association rejected: result {int(rj.result)}, source {int(rj.source)}, "
            f"reason {rj.reason}"
        )
        self.reject = rj


class AssociationAbortedError(NetworkError):
    def __init__(self, event: AssociationAborted | None, what: str = "") -> None:
        detail = event.detail if event else "connection closed"
        super().__init__(f"association aborted{': ' + what if what else ''} ({detail})")
        self.event = event


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
) -> ClientAssociation:
    """Open an association; raises :class:`AssociationRejectedError` if refused.

    ``contexts``: (abstract syntax, transfer syntaxes) pairs to propose;
    verification alone if not given. ``roles``: SOP class -> (scu, scp) role
    selection proposals (PS3.7 D.3.3.4), e.g. the storage classes with
    ``(False, True)`` for C-GET.
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
        return ClientAssociation(conn, dimse_timeout=dimse_timeout, on_store=on_store)
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
    ) -> None:
        self._conn = conn
        self._assoc = conn.assoc
        self.dimse_timeout = dimse_timeout
        self.on_store = on_store
        self._ids = itertools.cycle(range(1, 65536))
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

    def _require_associated(self) -> None:
        if not self.is_associated:
            raise NetworkError("the association is not established")

    def _receive(self, message_id: int) -> _Response:
        """Wait for the response to ``message_id`` (with its data set, if any)."""
        while True:
            event = self._conn.next_event(self.dimse_timeout)
            if isinstance(event, CommandReceived):
                msg = event.message
                dataset = self._read_dataset(event.context_id) if msg.has_dataset else None
                self.messages_received += 1
                if isinstance(msg, dimse.CStoreRQ):
                    self._store_sub_operation(event.context_id, msg, dataset or b"")
                    continue
                responded = getattr(msg, "message_id_being_responded_to", None)
                if responded != message_id:
                    log.warning("ignoring %s for message %s (waiting for %s)",
                                type(msg).__name__, responded, message_id)
                    continue
                return _Response(msg, dataset)
            self._unexpected(event)

    def _read_dataset(self, context_id: int) -> bytes:
        parts: list[bytes] = []
        while True:
            event = self._conn.next_event(self.dimse_timeout)
            if isinstance(event, DataReceived):
                parts.append(bytes(event.data))
                if event.last:
                    return b"".join(parts)
                continue
            self._unexpected(event)

    def _unexpected(self, event: Event) -> None:
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
                raw = path.read_bytes()[header.dataset_offset:]
                ds = decode_dataset(raw, header.transfer_syntax)
                payload = encode_dataset(ds, ctx.transfer_syntax)
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
        try:
            return self.context_for(sop_class, transfer_syntax)
        except LocalProtocolError:
            if not uids.is_uncompressed(transfer_syntax):
                raise
        for ctx in self._assoc.contexts.values():
            if ctx.abstract_syntax == sop_class and ctx.requestor_scu and \
                    uids.is_uncompressed(ctx.transfer_syntax):
                return ctx
        raise LocalProtocolError(
            f"no accepted presentation context for {sop_class} in {transfer_syntax} "
            "or another uncompressed transfer syntax")

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
        while True:
            rsp = self._receive(mid)
            status = int(rsp.message.status)
            identifier = (decode_dataset(rsp.dataset, ctx.transfer_syntax)
                          if rsp.dataset else None)
            yield status, identifier
            if dimse.status_category(status) is not dimse.StatusCategory.PENDING:
                return

    def move(self, query: Dataset, destination: str, *, model: str = uids.STUDY_ROOT_QR_MOVE,
             priority: dimse.Priority = dimse.Priority.MEDIUM) -> Iterator[dimse.CMoveRSP]:
        """C-MOVE (PS3.7 §9.1.4): yields each response (pending ones carry counts)."""
        ctx = self.context_for(model)
        mid = self._next_id()
        self._send(ctx, dimse.CMoveRQ(message_id=mid, affected_sop_class_uid=model,
                                      priority=priority, move_destination=destination),
                   encode_dataset(query, ctx.transfer_syntax))
        while True:
            rsp = self._receive(mid).message
            yield rsp
            if dimse.status_category(rsp.status) is not dimse.StatusCategory.PENDING:
                return

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
        while True:
            rsp = self._receive(mid).message
            yield rsp
            if dimse.status_category(rsp.status) is not dimse.StatusCategory.PENDING:
                return

    def cancel(self, message_id: int, model: str | None = None) -> None:
        """C-CANCEL (PS3.7 §9.3.2.3) for the operation ``message_id``."""
        ctx = (self.context_for(model) if model else
               next(iter(self._assoc.contexts.values())))
        self._send(ctx, dimse.CCancelRQ(message_id_being_responded_to=message_id))

    # ------------------------------------------------------------ DIMSE-N

    def _n_request(self, sop_class: str, msg: Any,
                   dataset: Dataset | None) -> tuple[Any, Dataset | None]:
        ctx = self.context_for(sop_class)
        payload = encode_dataset(dataset, ctx.transfer_syntax) if dataset is not None else None
        self._send(ctx, msg, payload)
        rsp = self._receive(msg.message_id)
        reply = decode_dataset(rsp.dataset, ctx.transfer_syntax) if rsp.dataset else None
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
