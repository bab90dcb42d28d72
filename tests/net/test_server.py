"""The threaded SCP (router.net.server.Server): regressions for the review of its
request handling, C-MOVE/C-GET, limits and cancel detection.

Every test runs in-process servers on 127.0.0.1 (port 0) and talks to them with our
client or with a raw socket speaking PDUs (``RawPeer``) where a peer has to misbehave.
Nothing sleeps: waits are socket timeouts, queues and events with a bound.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import re
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import router.net.server as server_module
from router.dicom import dimse, uids
from router.dicom.association import Association, Role
from router.dicom.dataset import decode_dataset, encode_dataset
from router.dicom.errors import DIMSEError
from router.dicom.negotiation import AcceptorPolicy, accepted_contexts, build_request
from router.dicom.pdu import AAssociateAC, AAssociateRJ, PDataTF, decode_pdu, encode_pdu
from router.net.client import AssociationRejectedError, ClientAssociation, connect
from router.net.connection import Connection
from router.net.server import (
    AssociationInfo,
    CancelToken,
    Handlers,
    MoveDestination,
    Request,
    Server,
    StoreSink,
)
from tests.faults.test_server_faults import drain_threads, pdata, raw_connect, read_pdu
from tests.helpers import make_study

AE = "NETSCP"
CALLING = "NETSCU"
IO_TIMEOUT = 5.0
CT = "1.2.840.10008.5.1.4.1.1.2"
ELE = uids.EXPLICIT_VR_LITTLE_ENDIAN
ILE = uids.IMPLICIT_VR_LITTLE_ENDIAN
FIND = uids.STUDY_ROOT_QR_FIND
MOVE = uids.STUDY_ROOT_QR_MOVE
GET = uids.STUDY_ROOT_QR_GET
MPPS = uids.MODALITY_PERFORMED_PROCEDURE_STEP


# ---------------------------------------------------------------------------
# Servers, clients and a raw peer
# ---------------------------------------------------------------------------


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """Start servers (any SOP class, any transfer syntax); all shut down at teardown."""
    servers: list[Server] = []

    def start(handlers: Handlers | None = None, **kwargs: Any) -> Server:
        kwargs.setdefault("policy", AcceptorPolicy())
        kwargs.setdefault("ae_title", AE)
        server = Server(handlers or Handlers(), host="127.0.0.1", port=0, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.shutdown()


def client(port: int, contexts: list[tuple[str, list[str]]], **kwargs: Any) -> ClientAssociation:
    return connect("127.0.0.1", port, calling_ae=CALLING, called_ae=AE, contexts=contexts,
                   acse_timeout=IO_TIMEOUT, dimse_timeout=IO_TIMEOUT, **kwargs)


def command_set(*elements: tuple[int, bytes]) -> bytes:
    """A command set from (element number, value bytes) pairs, implicit VR LE with its
    group length: for command sets the codec refuses to build (PS3.7 §6.3.1)."""
    body = b"".join(struct.pack("<HHI", 0, tag, len(value)) + value
                    for tag, value in sorted(elements))
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def us(value: int) -> bytes:
    return struct.pack("<H", value)


class RawPeer:
    """A requestor that writes PDUs itself (so it can send what our client never would)
    and reads the server's answers back as DIMSE messages."""

    def __init__(self, port: int, contexts: list[tuple[str, list[str]]]) -> None:
        self.sock = raw_connect(port)
        self.port = self.sock.getsockname()[1]
        rq = build_request(calling_ae_title=CALLING, called_ae_title=AE, contexts=contexts)
        self.sock.sendall(encode_pdu(rq))
        ac = decode_pdu(read_pdu(self.sock))
        assert isinstance(ac, AAssociateAC)
        self.contexts = accepted_contexts(rq, ac)

    def send(self, context_id: int, command: bytes | dimse.DimseMessage,
             dataset: bytes | None = None, *, fragment: int = 1 << 14) -> None:
        raw = command if isinstance(command, bytes) else dimse.encode_command(command)
        out = [pdata(context_id, command=True, last=True, data=raw)]
        if dataset is not None:
            pieces = [dataset[i:i + fragment] for i in range(0, len(dataset), fragment)]
            out += [pdata(context_id, command=False, last=i == len(pieces) - 1, data=p)
                    for i, p in enumerate(pieces or [b""])]
        self.sock.sendall(b"".join(out))

    def receive(self) -> tuple[int, Any, bytes | None]:
        """The next DIMSE message: (context ID, message, data set or None)."""
        command = bytearray()
        data = bytearray()
        message = None
        context_id = 0
        while True:
            pdu = decode_pdu(read_pdu(self.sock))
            assert isinstance(pdu, PDataTF), f"expected P-DATA-TF, got {pdu}"
            for pdv in pdu.pdvs:
                context_id = pdv.context_id
                if pdv.is_command:
                    command += pdv.data
                    if pdv.is_last:
                        message = dimse.decode_command(bytes(command))
                        if not message.has_dataset:
                            return context_id, message, None
                else:
                    data += pdv.data
                    if pdv.is_last:
                        return context_id, message, bytes(data)

    def echo(self, message_id: int = 99) -> None:
        """A C-ECHO round trip: the association is still in step."""
        self.send(self.context_for(uids.VERIFICATION_SOP_CLASS), dimse.CEchoRQ(
            message_id=message_id, affected_sop_class_uid=uids.VERIFICATION_SOP_CLASS))
        _, rsp, _ = self.receive()
        assert isinstance(rsp, dimse.CEchoRSP)
        assert (rsp.message_id_being_responded_to, rsp.status) == (message_id, 0)

    def context_for(self, abstract_syntax: str) -> int:
        [cid] = [c for c, ctx in self.contexts.items() if ctx.abstract_syntax == abstract_syntax]
        return cid

    def close(self) -> None:
        self.sock.close()


def wait_readable(server: Server) -> None:
    """Block until the server's one association has bytes to read (what the test sent
    is there before the server looks for it). poll(), not select(): any fd number."""
    [handler] = list(server._handlers_live)
    poller = select.poll()
    poller.register(handler.conn.sock, select.POLLIN)
    assert poller.poll(IO_TIMEOUT * 1000), "what the peer sent never arrived"


def big_payload(size: int) -> dict[str, bytes]:
    """Attributes making a data set ``size`` bytes bigger (an OB element)."""
    return {"EncapsulatedDocument": bytes(size)}


def lines(caplog: pytest.LogCaptureFixture, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("router") and fragment in r.getMessage()]


def ct_dataset(**attrs: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "NET"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def study_query(**keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = keys.pop("StudyInstanceUID", "")
    for key, value in keys.items():
        setattr(ds, key, value)
    return ds


class Store:
    """A storage SCP's handlers: records each instance, answers ``status`` (a fixed
    value or a function of the request)."""

    def __init__(self, status: int | Callable[[Request], int] = dimse.SUCCESS) -> None:
        self.status = status
        self.stored: list[Request] = []
        self.lock = threading.Lock()

    def on_c_store(self, req: Request) -> int:
        with self.lock:
            self.stored.append(req)
        return self.status(req) if callable(self.status) else self.status


# ---------------------------------------------------------------------------
# Association IDs (finding 1): per server, never module-level
# ---------------------------------------------------------------------------


def test_association_ids_come_from_the_server_and_name_the_process(
        serve: Callable[..., Server]) -> None:
    assert not hasattr(server_module, "_ids"), "module-level association counter is back"
    seen: queue.Queue[str] = queue.Queue()
    server = serve(Handlers(on_accepted=lambda info: seen.put(info.id)))
    for _ in range(3):
        with client(server.port, [(uids.VERIFICATION_SOP_CLASS, [ELE])]) as assoc:
            assert assoc.echo() == 0
    ids = [seen.get(timeout=IO_TIMEOUT) for _ in range(3)]
    assert ids == [f"a{os.getpid()}-{n}" for n in (1, 2, 3)]
    other = serve(Handlers(on_accepted=lambda info: seen.put(info.id)))
    with client(other.port, [(uids.VERIFICATION_SOP_CLASS, [ELE])]) as assoc:
        assert assoc.echo() == 0
    assert seen.get(timeout=IO_TIMEOUT) == f"a{os.getpid()}-1"  # its own counter


# ---------------------------------------------------------------------------
# Finding 2: a request without its mandatory data set is answered at once
# ---------------------------------------------------------------------------

MISSING_DATASET = [
    pytest.param(CT, dimse.CStoreRQ(message_id=5, affected_sop_class_uid=CT,
                                    affected_sop_instance_uid="1.2.3.4", has_dataset=False),
                 dimse.CStoreRSP, id="C-STORE"),
    pytest.param(FIND, dimse.CFindRQ(message_id=5, affected_sop_class_uid=FIND,
                                     has_dataset=False), dimse.CFindRSP, id="C-FIND"),
    pytest.param(MOVE, dimse.CMoveRQ(message_id=5, affected_sop_class_uid=MOVE,
                                     move_destination="X", has_dataset=False),
                 dimse.CMoveRSP, id="C-MOVE"),
    pytest.param(GET, dimse.CGetRQ(message_id=5, affected_sop_class_uid=GET,
                                   has_dataset=False), dimse.CGetRSP, id="C-GET"),
    pytest.param(MPPS, dimse.NSetRQ(message_id=5, requested_sop_class_uid=MPPS,
                                    requested_sop_instance_uid="1.2.3.4", has_dataset=False),
                 dimse.NSetRSP, id="N-SET"),
]


@pytest.mark.parametrize(("sop_class", "rq", "rsp_type"), MISSING_DATASET)
def test_request_without_its_data_set_is_answered_c000(
        serve: Callable[..., Server], caplog: pytest.LogCaptureFixture, sop_class: str,
        rq: Any, rsp_type: type) -> None:
    caplog.set_level(logging.INFO, logger="router")
    called: list[str] = []
    store = Store()

    def record(name: str) -> Callable[..., Any]:
        def handler(*args: Any) -> Any:
            called.append(name)
            raise AssertionError("a handler ran for a request without its data set")
        return handler

    server = serve(Handlers(on_c_store=store.on_c_store, on_c_find=record("find"),
                            on_c_move=record("move"), on_c_get=record("get"),
                            on_n_set=record("n_set")))
    peer = RawPeer(server.port, [(uids.VERIFICATION_SOP_CLASS, [ELE]), (sop_class, [ELE])])
    try:
        peer.send(peer.context_for(sop_class), rq)
        _, rsp, data = peer.receive()
        assert isinstance(rsp, rsp_type)
        assert (rsp.message_id_being_responded_to, rsp.status, data) == (5, 0xC000, None)
        peer.echo()  # and the association carries on
    finally:
        peer.close()
    assert called == [] and store.stored == []
    assert any("0101H" in line and str(peer.port) in line for line in lines(caplog, "0xC000"))


# ---------------------------------------------------------------------------
# CommandRejected (the engine's new event): invalid requests get an answer
# ---------------------------------------------------------------------------


def test_invalid_request_is_answered_with_the_engines_status(
        serve: Callable[..., Server], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router")
    store = Store()
    server = serve(Handlers(on_c_store=store.on_c_store))
    peer = RawPeer(server.port, [(uids.VERIFICATION_SOP_CLASS, [ELE]), (CT, [ELE])])
    try:
        # A C-STORE-RQ whose SOP Instance UID is not a UID, with its data set: the
        # data set is drained and the request refused 0212H (mistyped argument).
        bad_store = command_set((0x0002, CT.encode() + b"\0"), (0x0100, us(0x0001)),
                                (0x0110, us(41)), (0x0700, us(0)), (0x0800, us(1)),
                                (0x1000, b"1.2.x!"))
        peer.send(peer.context_for(CT), bad_store, b"\x08\x00\x16\x00\x02\x00\x00\x00AB" * 5000)
        _, rsp, _ = peer.receive()
        assert isinstance(rsp, dimse.CStoreRSP)
        assert (rsp.message_id_being_responded_to, rsp.status) == (41, 0x0212)
        assert rsp.affected_sop_class_uid is None  # optional: left out, never guessed
        peer.echo()
    finally:
        peer.close()
    assert store.stored == []
    [line] = lines(caplog, "invalid request")
    assert str(peer.port) in line and "0x0212" in line


def test_invalid_request_of_unknown_type_aborts_with_a_reason(
        serve: Callable[..., Server], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router")
    server = serve()
    peer = RawPeer(server.port, [(uids.VERIFICATION_SOP_CLASS, [ELE])])
    try:
        peer.send(1, command_set((0x0100, us(0x0077)), (0x0110, us(3)), (0x0800, us(0x0101))))
        pdu = decode_pdu(read_pdu(peer.sock))
        assert type(pdu).__name__ == "AAbort"
    finally:
        peer.close()
    drain_threads(server)
    assert any("unknown command field 0x0077" in line for line in lines(caplog, "aborting"))


# ---------------------------------------------------------------------------
# Findings 3, 4, 5, 7: C-MOVE and C-GET
# ---------------------------------------------------------------------------


class Retrieve:
    """on_c_move / on_c_get over a fixed list of instances."""

    def __init__(self, instances: list[Any], destination: MoveDestination | None = None,
                 error: Exception | None = None) -> None:
        self.instances = instances
        self.destination = destination
        self.error = error

    def on_c_move(self, req: Request, token: CancelToken) -> tuple[MoveDestination | None,
                                                                   list[Any]]:
        if self.error is not None:
            raise self.error
        return self.destination, self.instances

    def on_c_get(self, req: Request, token: CancelToken) -> list[Any]:
        if self.error is not None:
            raise self.error
        return self.instances


def destination_of(server: Server) -> MoveDestination:
    return MoveDestination(host="127.0.0.1", port=server.port, ae_title=AE)


def move(port: int, **kwargs: Any) -> list[dimse.CMoveRSP]:
    with client(port, [(MOVE, [ELE]), (uids.VERIFICATION_SOP_CLASS, [ELE])]) as assoc:
        responses = list(assoc.move(study_query(), "DEST", model=MOVE, **kwargs))
        assert assoc.echo() == 0  # the association outlives whatever went wrong
    return responses


def get(port: int, on_store: Callable[[dimse.CStoreRQ, bytes, str], int]) -> list[dimse.CGetRSP]:
    contexts = [(GET, [ELE]), (CT, [ELE]), (uids.VERIFICATION_SOP_CLASS, [ELE])]
    with client(port, contexts, roles={CT: (False, True)}, on_store=on_store) as assoc:
        responses = list(assoc.get(study_query(), model=GET))
        assert assoc.echo() == 0
    return responses


def counts(rsp: Any) -> tuple[int | None, ...]:
    return (rsp.number_of_remaining_sub_operations, rsp.number_of_completed_sub_operations,
            rsp.number_of_failed_sub_operations, rsp.number_of_warning_sub_operations)


def test_move_where_every_sub_operation_fails_is_a_failure(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    """PS3.4 C.4.2.1.5 (Table C.4-2): B000H means "one or more failures"; all failed
    is a failure: A702H, as pynetdicom answers."""
    files = make_study(tmp_path, 1, 3, size_kb=4)
    dest = serve(Handlers(on_c_store=Store(dimse.REFUSED_OUT_OF_RESOURCES).on_c_store))
    scp = serve(Handlers(on_c_move=Retrieve(files, destination_of(dest)).on_c_move))
    *pending, final = move(scp.port)
    assert [counts(r) for r in pending] == [(2, 0, 1, 0), (1, 0, 2, 0)]
    assert final.status == 0xA702
    assert counts(final) == (None, 0, 3, 0)
    assert dimse.status_category(final.status) is dimse.StatusCategory.FAILURE


def test_move_with_some_failures_is_still_a_warning(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    files = make_study(tmp_path, 1, 3, size_kb=4)
    first = str(decode_uid(files[0]))
    dest = serve(Handlers(on_c_store=Store(
        lambda req: 0xA700 if req.message.affected_sop_instance_uid == first else 0
    ).on_c_store))
    scp = serve(Handlers(on_c_move=Retrieve(files, destination_of(dest)).on_c_move))
    final = move(scp.port)[-1]
    assert (final.status, counts(final)) == (0xB000, (None, 2, 1, 0))


def decode_uid(path: Path) -> str:
    from router.dicom.dataset import read_part10_header
    return read_part10_header(path).sop_instance_uid


def test_get_where_every_sub_operation_fails_is_a_failure(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    files = make_study(tmp_path, 1, 2, size_kb=4)
    scp = serve(Handlers(on_c_get=Retrieve(files).on_c_get))
    *_, final = get(scp.port, lambda rq, data, ts: dimse.REFUSED_OUT_OF_RESOURCES)
    assert (final.status, counts(final)) == (0xA702, (None, 0, 2, 0))


@pytest.mark.parametrize("operation", ["move", "get"])
def test_handler_exception_is_a_c000_answer_not_an_abort(
        serve: Callable[..., Server], operation: str, caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    retrieve = Retrieve([], error=RuntimeError("index offline"))
    scp = serve(Handlers(on_c_move=retrieve.on_c_move, on_c_get=retrieve.on_c_get))
    responses = (move(scp.port) if operation == "move"
                 else get(scp.port, lambda rq, data, ts: 0))
    assert [r.status for r in responses] == [0xC000]
    assert lines(caplog, "handler failed")


def test_move_without_destination_is_a801(serve: Callable[..., Server]) -> None:
    scp = serve(Handlers(on_c_move=Retrieve([Path("/nonexistent")], None).on_c_move))
    assert [r.status for r in move(scp.port)] == [0xA801]


def test_unreadable_instances_fail_one_sub_operation_each_and_are_read_lazily(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    """The second file does not exist until the first sub-operation has been stored:
    instances must be read one by one, when their turn comes. The third is not DICOM."""
    [first, later] = make_study(tmp_path / "study", 1, 2, size_kb=4)
    pending_path = tmp_path / "arrives-later.dcm"
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not DICOM at all" * 20)
    scp = serve(Handlers(on_c_get=Retrieve([first, pending_path, garbage]).on_c_get))
    stored: list[str] = []

    def on_store(rq: dimse.CStoreRQ, data: bytes, ts: str) -> int:
        stored.append(rq.affected_sop_instance_uid)
        if len(stored) == 1:
            later.rename(pending_path)
        return 0

    *pending, final = get(scp.port, on_store)
    assert stored == [decode_uid(first), decode_uid(pending_path)]
    assert [counts(r) for r in pending] == [(2, 1, 0, 0), (1, 2, 0, 0)]
    assert (final.status, counts(final)) == (0xB000, (None, 2, 1, 0))


def test_move_of_a_missing_file_counts_one_failure(
        serve: Callable[..., Server], tmp_path: Path) -> None:
    files = make_study(tmp_path, 1, 2, size_kb=4)
    dest_store = Store()
    dest = serve(Handlers(on_c_store=dest_store.on_c_store))
    instances = [files[0], tmp_path / "gone.dcm", files[1]]
    scp = serve(Handlers(on_c_move=Retrieve(instances, destination_of(dest)).on_c_move))
    final = move(scp.port)[-1]
    assert (final.status, counts(final)) == (0xB000, (None, 2, 1, 0))
    assert len(dest_store.stored) == 2


def test_move_to_an_unreachable_destination_is_refused(
        serve: Callable[..., Server], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """PS3.4 C.4.2.1.5: A702H, with what could not be done counted as failed (a
    refusal carries no remaining count)."""
    files = make_study(tmp_path, 1, 3, size_kb=4)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        closed_port = taken.getsockname()[1]
    nowhere = MoveDestination(host="127.0.0.1", port=closed_port, ae_title="NOWHERE")
    scp = serve(Handlers(on_c_move=Retrieve(files, nowhere).on_c_move))
    responses = move(scp.port)
    assert [(r.status, counts(r)) for r in responses] == [(0xA702, (None, 0, 3, 0))]
    assert lines(caplog, "unreachable")


class StallingSink:
    """Holds the first C-STORE's response until ``release`` is set."""

    def __init__(self, release: threading.Event, stalled: list[bool]) -> None:
        self.release = release
        self.stall = not stalled
        stalled.append(True)

    def write(self, data: memoryview) -> None:
        pass

    def close(self) -> int:
        if self.stall:
            self.release.wait(IO_TIMEOUT * 2)
        return dimse.SUCCESS

    def abort(self) -> None:
        pass


def test_stalled_move_destination_fails_that_sub_operation(
        serve: Callable[..., Server], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A destination that never answers a C-STORE costs ``move_timeout``, one failed
    sub-operation and its association; the next sub-operation reconnects."""
    caplog.set_level(logging.INFO, logger="router")
    files = make_study(tmp_path, 1, 2, size_kb=4)
    release = threading.Event()
    stalled: list[bool] = []
    dest = serve(Handlers(on_c_store_stream=lambda req: StallingSink(release, stalled)))
    scp = serve(Handlers(on_c_move=Retrieve(files, destination_of(dest)).on_c_move),
                move_timeout=0.5)
    try:
        started = time.monotonic()
        final = move(scp.port)[-1]
        took = time.monotonic() - started
    finally:
        release.set()
    assert (final.status, counts(final)) == (0xB000, (None, 1, 1, 0))
    assert took < IO_TIMEOUT
    assert len(stalled) == 2  # the second went out on a new association
    assert lines(caplog, "sent no C-STORE-RSP")


def test_sub_operation_counts_are_clamped_to_us() -> None:
    """More than 65535 sub-operations: reported as 65535 (US), never an encoding error."""
    rq = dimse.CMoveRQ(message_id=1, affected_sop_class_uid=MOVE, move_destination="X")
    rsp = server_module.AssociationHandler._retrieve_rsp(
        None, rq, dimse.PENDING, 70_000, 65_536, 100_000, 3)  # type: ignore[arg-type]
    assert counts(rsp) == (0xFFFF, 0xFFFF, 0xFFFF, 3)
    dimse.encode_command(rsp)


# ---------------------------------------------------------------------------
# Finding 6: N-CREATE-RSP Affected SOP Instance UID
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "requested", "from_handler", "expected"), [
    (0x0000, None, None, "generated"),
    (0x0000, "1.2.3.4", None, "1.2.3.4"),
    (0x0000, None, "1.2.3.5", "1.2.3.5"),
    (0x0107, None, None, "generated"),  # warning: created, with changes
    (0x0110, "1.2.3.4", None, None),
    (0x0110, None, "1.2.3.5", None),
], ids=["success-generated", "success-requested", "success-handler", "warning-generated",
        "failure-requested", "failure-handler"])
def test_n_create_response_instance_uid(serve: Callable[..., Server], status: int,
                                        requested: str | None, from_handler: str | None,
                                        expected: str | None) -> None:
    def on_n_create(req: Request) -> tuple[int, Dataset | None]:
        reply = None
        if from_handler:
            reply = Dataset()
            reply.AffectedSOPInstanceUID = from_handler
        return status, reply

    server = serve(Handlers(on_n_create=on_n_create))
    attributes = Dataset()
    attributes.PatientID = "NET"
    with client(server.port, [(MPPS, [ELE])]) as assoc:
        rsp, _ = assoc.n_create(MPPS, requested, attributes)
    assert rsp.status == status
    if expected == "generated":
        assert rsp.affected_sop_instance_uid and rsp.affected_sop_instance_uid.startswith("2.25.")
    else:
        assert rsp.affected_sop_instance_uid == expected


# ---------------------------------------------------------------------------
# Finding 8: data sets held whole are capped; _cancelled stops at a foreign command
# ---------------------------------------------------------------------------


def test_oversized_query_is_refused_and_the_association_goes_on(
        serve: Callable[..., Server], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="router")
    seen: list[Request] = []

    def on_c_find(req: Request, token: CancelToken) -> Iterator[tuple[int, Dataset | None]]:
        seen.append(req)
        yield from ()

    server = serve(Handlers(on_c_find=on_c_find, on_n_set=lambda req: (0, None)),
                   max_dataset_size=4096)
    with client(server.port, [(FIND, [ELE]), (MPPS, [ELE]),
                              (uids.VERIFICATION_SOP_CLASS, [ELE])]) as assoc:
        assert list(assoc.find(study_query(PatientComments="X" * 5000), model=FIND)) == [
            (0xA700, None)]
        modification = Dataset()
        modification.PatientComments = "Y" * 5000
        rsp, _ = assoc.n_set(MPPS, "1.2.3", modification)
        assert rsp.status == dimse.RESOURCE_LIMITATION
        assert list(assoc.find(study_query(), model=FIND)) == [(0, None)]  # small: served
        assert assoc.echo() == 0
    assert len(seen) == 1
    assert len(lines(caplog, "max_dataset_size")) == 2


def test_cancel_check_stops_reading_at_the_first_other_command(
        serve: Callable[..., Server]) -> None:
    """While a C-FIND runs, a peer sends three C-ECHO-RQs: the cancel check sets the
    first aside (answered after the C-FIND) and decodes nothing after it, so a peer
    streaming requests cannot make it buffer them all; all three are answered after."""
    handlers_seen: list[int] = []
    echoes_sent = threading.Event()
    server: Server | None = None

    def on_c_find(req: Request, token: CancelToken) -> Iterator[tuple[int, Dataset | None]]:
        yield dimse.PENDING, study_query(StudyInstanceUID="1.2.1")
        assert echoes_sent.wait(IO_TIMEOUT)
        assert server is not None
        wait_readable(server)
        yield dimse.PENDING, study_query(StudyInstanceUID="1.2.2")
        # The check before the second result has run: what did it keep?
        assert server is not None
        [handler] = list(server._handlers_live)
        handlers_seen.append(len(handler._pending))

    server = serve(Handlers(on_c_find=on_c_find))
    peer = RawPeer(server.port, [(uids.VERIFICATION_SOP_CLASS, [ELE]), (FIND, [ELE])])
    try:
        peer.send(peer.context_for(FIND), dimse.CFindRQ(message_id=1, affected_sop_class_uid=FIND),
                  encode_dataset(study_query(), ELE))
        _, first, _ = peer.receive()
        assert first.status == dimse.PENDING
        for mid in (11, 12, 13):
            peer.send(1, dimse.CEchoRQ(message_id=mid,
                                       affected_sop_class_uid=uids.VERIFICATION_SOP_CLASS))
        echoes_sent.set()
        answers = [peer.receive()[1] for _ in range(5)]
    finally:
        peer.close()
    assert [(type(m).__name__, m.message_id_being_responded_to, m.status) for m in answers] == [
        ("CFindRSP", 1, dimse.PENDING), ("CFindRSP", 1, 0),
        ("CEchoRSP", 11, 0), ("CEchoRSP", 12, 0), ("CEchoRSP", 13, 0)]
    assert handlers_seen == [1]


# ---------------------------------------------------------------------------
# Finding 9: deflated data sets never inflate past max_inflated_size
# ---------------------------------------------------------------------------


def test_deflate_bomb_in_a_query_is_refused(serve: Callable[..., Server]) -> None:
    errors: list[Exception] = []

    def on_c_find(req: Request, token: CancelToken) -> Iterator[tuple[int, Dataset | None]]:
        try:
            req.dataset()
        except DIMSEError as exc:
            errors.append(exc)
            raise
        yield from ()

    server = serve(Handlers(on_c_find=on_c_find), max_inflated_size=1 << 20)
    # 4 MiB of zeros in an OB element, deflated to a few KiB (PS3.5 A.5).
    raw = (struct.pack("<HH2sHI", 0x0042, 0x0011, b"OB", 0, 4 << 20) + bytes(4 << 20))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = deflater.compress(raw) + deflater.flush()
    bomb += b"\0" * (len(bomb) & 1)
    assert len(bomb) < 64 << 10
    peer = RawPeer(server.port, [(FIND, [uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN])])
    try:
        peer.send(peer.context_for(FIND),
                  dimse.CFindRQ(message_id=2, affected_sop_class_uid=FIND), bomb)
        _, rsp, _ = peer.receive()
    finally:
        peer.close()
    assert rsp.status == 0xC000
    [error] = errors
    assert "inflates to more than 1048576 bytes" in str(error)


def test_request_dataset_passes_its_inflate_limit() -> None:
    ds = Dataset()
    ds.EncapsulatedDocument = bytes(60_000)
    data = encode_dataset(ds, uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN)
    ctx = accepted_contexts(*_pair(uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN))[1]
    info = AssociationInfo(id="t", calling_ae="A", called_ae="B", peer=("x", 0),
                           request=_pair(ELE)[0])
    small = Request(assoc=info, context=ctx, message=None, dataset_bytes=data,
                    max_inflated_size=10_000)
    with pytest.raises(DIMSEError, match="inflates to more than 10000"):
        small.dataset()
    assert Request(assoc=info, context=ctx, message=None,
                   dataset_bytes=data).dataset() == decode_dataset(
        data, uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN)


def _pair(ts: str) -> tuple[Any, Any]:
    from router.dicom.negotiation import negotiate
    rq = build_request(calling_ae_title="A", called_ae_title="B", contexts=[(FIND, [ts])])
    ac = negotiate(rq, AcceptorPolicy())
    assert not isinstance(ac, AAssociateRJ)
    return rq, ac


# ---------------------------------------------------------------------------
# Finding 10: the cancel check works on any descriptor number, without select()
# ---------------------------------------------------------------------------


def test_read_available_is_non_blocking_and_fd_number_agnostic() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        b = socket.create_connection(listener.getsockname()[:2], timeout=IO_TIMEOUT)
        a, _ = listener.accept()
    high = os.dup2(a.fileno(), 1500)
    a.close()
    sock = socket.socket(fileno=high)
    try:
        assoc = Association(Role.ACCEPTOR)
        assoc.connection_made()
        conn = Connection(sock, assoc)
        assert conn.read_available() is False  # nothing there: no wait, no error
        b.sendall(b"\x01\x00")
        assert conn.read_available() is True
        assert assoc.pdu_in_progress
        b.close()
        assert conn.read_available() is True  # EOF, handed to the engine
        assert conn.read_available() is False  # closed now
    finally:
        sock.close()
        b.close()


def test_cancel_detected_on_a_descriptor_above_1024(serve: Callable[..., Server]) -> None:
    """select() cannot watch descriptors >= FD_SETSIZE (1024); the server's cancel
    check must still see a C-CANCEL on such a connection."""
    placeholders = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        cancel_arrived = threading.Event()
        observed: list[bool] = []
        server: Server | None = None

        def on_c_find(req: Request, token: CancelToken) -> Iterator[tuple[int, Dataset]]:
            assert server is not None
            [handler] = list(server._handlers_live)
            assert handler.conn.sock.fileno() >= 1024
            yield dimse.PENDING, study_query(StudyInstanceUID="1.2.1")
            assert cancel_arrived.wait(IO_TIMEOUT)
            wait_readable(server)
            yield dimse.PENDING, study_query(StudyInstanceUID="1.2.2")
            observed.append(bool(token))

        server = serve(Handlers(on_c_find=on_c_find))
        peer = RawPeer(server.port, [(FIND, [ELE])])
        try:
            peer.send(1, dimse.CFindRQ(message_id=7, affected_sop_class_uid=FIND),
                      encode_dataset(study_query(), ELE))
            assert peer.receive()[1].status == dimse.PENDING
            peer.send(1, dimse.CCancelRQ(message_id_being_responded_to=7))
            cancel_arrived.set()
            _, final, _ = peer.receive()
        finally:
            peer.close()
        assert final.status == dimse.CANCEL
        assert observed == []  # the second result was never asked for after the cancel
    finally:
        for fd in placeholders:
            os.close(fd)


def test_server_module_does_not_select() -> None:
    source = Path(server_module.__file__).read_text()
    assert not re.search(r"^import select|select\.select|conn\._read\(", source, re.M)


# ---------------------------------------------------------------------------
# Finding 11: a sink that fails while writing
# ---------------------------------------------------------------------------


class OkSink:
    def write(self, data: memoryview) -> None:
        pass

    def close(self) -> int:
        return dimse.SUCCESS

    def abort(self) -> None:
        pass


class FailingSink:
    def __init__(self, error: Exception, log: list[str]) -> None:
        self.error = error
        self.log = log

    def write(self, data: memoryview) -> None:
        self.log.append("write")
        raise self.error

    def close(self) -> int:
        self.log.append("close")
        return dimse.SUCCESS

    def abort(self) -> None:
        self.log.append("abort")


@pytest.mark.parametrize(("error", "status"), [
    (OSError(errno.ENOSPC, "No space left on device"), 0xA700),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 0xA700),
    (OSError(errno.EIO, "Input/output error"), 0x0110),
    (ValueError("broken sink"), 0x0110),
], ids=["ENOSPC", "EDQUOT", "EIO", "bug"])
def test_sink_write_failure_is_answered_and_the_sink_aborted(
        serve: Callable[..., Server], caplog: pytest.LogCaptureFixture, error: Exception,
        status: int) -> None:
    caplog.set_level(logging.INFO, logger="router")
    calls: list[list[str]] = []

    def on_stream(req: Request) -> StoreSink:
        calls.append([])
        if len(calls) == 1:
            return FailingSink(error, calls[-1])
        return OkSink()

    server = serve(Handlers(on_c_store_stream=on_stream))
    ds = ct_dataset(**big_payload(200_000))  # several P-DATA fragments
    with client(server.port, [(CT, [ELE])], max_pdu=16384) as assoc:
        assert assoc.store(ds).status == status
        assert assoc.store(ct_dataset()).status == 0  # the association goes on
    assert calls[0] == ["write", "abort"]
    assert len(lines(caplog, f"answering 0x{status:04X}")) == 1


def test_sink_that_cannot_be_created_is_answered(
        serve: Callable[..., Server]) -> None:
    def on_stream(req: Request) -> StoreSink:
        raise OSError(errno.ENOSPC, "No space left on device")

    server = serve(Handlers(on_c_store_stream=on_stream))
    with client(server.port, [(CT, [ELE])]) as assoc:
        assert assoc.store(ct_dataset()).status == 0xA700
        assert assoc.store(ct_dataset()).status == 0xA700


# ---------------------------------------------------------------------------
# Finding 12: accept errors and max_associations
# ---------------------------------------------------------------------------


class FlakyListener:
    """The listening socket, whose first accept() fails as a pending network error."""

    def __init__(self, sock: socket.socket, errors: list[int]) -> None:
        self._sock = sock
        self.errors = errors

    def accept(self) -> tuple[socket.socket, Any]:
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        return self._sock.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.mark.parametrize("code", [errno.ECONNABORTED, errno.EPROTO, errno.ENETUNREACH,
                                  errno.EHOSTUNREACH])
def test_accept_retries_pending_network_errors(code: int) -> None:
    server = Server(Handlers(), ae_title=AE, host="127.0.0.1", port=0,
                    policy=AcceptorPolicy())
    server._sock = FlakyListener(server._sock, [code, code])  # type: ignore[assignment]
    server.start()
    try:
        with client(server.port, [(uids.VERIFICATION_SOP_CLASS, [ELE])]) as assoc:
            assert assoc.echo() == 0
        assert server._accept_thread is not None and server._accept_thread.is_alive()
    finally:
        server.shutdown()


def test_associations_past_the_limit_are_rejected_transient(
        serve: Callable[..., Server]) -> None:
    closed: queue.Queue[AssociationInfo | None] = queue.Queue()
    server = serve(Handlers(on_closed=lambda info, stats: closed.put(info)),
                   max_associations=1)
    first = client(server.port, [(uids.VERIFICATION_SOP_CLASS, [ELE])])
    try:
        with pytest.raises(AssociationRejectedError) as caught:
            client(server.port, [(uids.VERIFICATION_SOP_CLASS, [ELE])])
        rj = caught.value.reject
        # PS3.8 Table 9-21: rejected-transient, service-provider (presentation
        # related function), local-limit-exceeded.
        assert (int(rj.result), int(rj.source), rj.reason) == (2, 3, 2)
        assert first.echo() == 0
    finally:
        first.release()
    infos = [closed.get(timeout=IO_TIMEOUT), closed.get(timeout=IO_TIMEOUT)]
    assert len({info.id for info in infos if info is not None}) == 2
    with client(server.port, [(uids.VERIFICATION_SOP_CLASS, [ELE])]) as again:
        assert again.echo() == 0
