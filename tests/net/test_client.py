"""The client (router.net.client): regressions for requests the peer sends while we
wait, invalid responses, data set limits and C-CANCEL.

The peer is either our own Server (``serve`` from tests/net/test_server.py) or a
``ScriptedSCP``: our engine on the acceptor side, in a thread, sending exactly what a
test needs in the order it needs it (a Storage Commitment SCP's N-EVENT-REPORT in the
middle of an N-ACTION, an invalid response, a C-CANCEL check...).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset

from router.dicom import dimse, uids
from router.dicom.association import Association, Role
from router.dicom.dataset import decode_dataset, encode_dataset
from router.dicom.errors import DIMSEError
from router.dicom.events import (
    AssociationRequested,
    CommandReceived,
    ConnectionClosed,
    DataReceived,
    Event,
    ReleaseRequested,
)
from router.dicom.negotiation import AcceptorPolicy, NegotiatedContext, negotiate
from router.dicom.pdu import AAssociateRJ
from router.net.client import (
    ClientAssociation,
    DatasetTooLargeError,
    NetworkError,
    ResponseRejectedError,
    connect,
)
from router.net.connection import Connection
from router.net.server import CancelToken, Handlers, Request, Server
from tests.faults.test_server_faults import pdata
from tests.net.test_server import (
    ELE,
    FIND,
    GET,
    IO_TIMEOUT,
    MOVE,
    big_payload,
    command_set,
    lines,
    serve,
    study_query,
    us,
)

__all__ = ["serve"]  # the fixture, imported for the tests below

COMMITMENT = uids.STORAGE_COMMITMENT_PUSH_MODEL
COMMITMENT_INSTANCE = uids.STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE
VERIFICATION = uids.VERIFICATION_SOP_CLASS


# ---------------------------------------------------------------------------
# A scripted SCP
# ---------------------------------------------------------------------------


class PeerSide:
    """The acceptor's side of one association, driven step by step by a script."""

    def __init__(self, sock: socket.socket, policy: AcceptorPolicy) -> None:
        self.conn = Connection(sock, Association(Role.ACCEPTOR))
        self.assoc = self.conn.assoc
        self.assoc.connection_made()
        self.conn.flush()
        event = self.next()
        assert isinstance(event, AssociationRequested), event
        answer = negotiate(event.request, policy)
        assert not isinstance(answer, AAssociateRJ)
        self.contexts: dict[int, NegotiatedContext] = dict(self.assoc.accept(answer))
        self.conn.flush()

    def next(self) -> Event:
        return self.conn.next_event(IO_TIMEOUT)

    def receive(self) -> tuple[int, Any, bytes | None]:
        """The next DIMSE message: (context ID, message, data set or None)."""
        event = self.next()
        assert isinstance(event, CommandReceived), event
        if not event.message.has_dataset:
            return event.context_id, event.message, None
        data = bytearray()
        while True:
            part = self.next()
            assert isinstance(part, DataReceived), part
            data += part.data
            if part.last:
                return event.context_id, event.message, bytes(data)

    def send(self, context_id: int, msg: Any, dataset: bytes | None = None) -> None:
        self.assoc.send_message(context_id, msg, dataset)
        self.conn.flush()

    def send_raw(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
        """A command set written by hand (one our codec would refuse to build)."""
        out = pdata(context_id, command=True, last=True, data=command)
        if dataset is not None:
            out += pdata(context_id, command=False, last=True, data=dataset)
        self.conn.sock.sendall(out)

    def context_for(self, abstract_syntax: str) -> int:
        [cid] = [c for c, ctx in self.contexts.items() if ctx.abstract_syntax == abstract_syntax]
        return cid

    def finish(self) -> None:
        """The requestor releases; answer, and wait for it to close."""
        event = self.next()
        assert isinstance(event, ReleaseRequested), event
        self.assoc.release_response()
        self.conn.flush()
        while not isinstance(self.next(), ConnectionClosed):
            pass


class ScriptedSCP:
    """Listens on 127.0.0.1, runs ``script`` over the first association in a thread;
    ``join()`` re-raises what went wrong in the script."""

    def __init__(self, script: Callable[[PeerSide], None],
                 policy: AcceptorPolicy | None = None) -> None:
        self.script = script
        self.policy = policy or AcceptorPolicy()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(IO_TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True, name="scripted-scp")
        self.thread.start()

    def _run(self) -> None:
        try:
            sock, _ = self.listener.accept()
            side = PeerSide(sock, self.policy)
            try:
                self.script(side)
            finally:
                side.conn.close()
        except BaseException as exc:  # reported by join()
            self.errors.append(exc)
        finally:
            self.listener.close()

    def join(self) -> None:
        self.thread.join(IO_TIMEOUT * 2)
        assert not self.thread.is_alive(), "the scripted SCP did not finish"
        if self.errors:
            raise self.errors[0]


def client(port: int, contexts: list[tuple[str, list[str]]], **kwargs: Any) -> ClientAssociation:
    kwargs.setdefault("dimse_timeout", IO_TIMEOUT)
    return connect("127.0.0.1", port, calling_ae="NETSCU", called_ae="ANY-SCP",
                   contexts=contexts, acse_timeout=IO_TIMEOUT, **kwargs)


def commitment_info() -> Dataset:
    ds = Dataset()
    ds.TransactionUID = "1.2.3.4.5"
    return ds


# ---------------------------------------------------------------------------
# Finding 13: requests from the peer while we wait (Storage Commitment)
# ---------------------------------------------------------------------------


def commitment_script(seen: list[Any]) -> Callable[[PeerSide], None]:
    """N-ACTION-RQ in; before answering it, an N-EVENT-REPORT-RQ out on the same
    association (PS3.4 J.3.3: the SCP may report on the association the SCU opened)."""

    def script(peer: PeerSide) -> None:
        ctx, action, info = peer.receive()
        assert isinstance(action, dimse.NActionRQ) and info is not None
        report = Dataset()
        report.TransactionUID = "1.2.3.4.5"
        peer.send(ctx, dimse.NEventReportRQ(
            message_id=77, affected_sop_class_uid=COMMITMENT,
            affected_sop_instance_uid=COMMITMENT_INSTANCE, event_type_id=1, has_dataset=True),
            encode_dataset(report, peer.contexts[ctx].transfer_syntax))
        rsp_ctx, rsp, _ = peer.receive()
        seen.append((rsp_ctx, rsp))
        peer.send(ctx, dimse.NActionRSP(message_id_being_responded_to=action.message_id,
                                        status=0, action_type_id=1))
        peer.finish()

    return script


def test_event_report_during_an_operation_goes_to_on_request() -> None:
    seen: list[Any] = []
    scp = ScriptedSCP(commitment_script(seen))
    got: list[tuple[int, Any, Dataset | None]] = []

    def on_request(context_id: int, rq: Any, data: bytes | None) -> tuple[int, Dataset | None]:
        got.append((context_id, rq, decode_dataset(data, ELE) if data else None))
        return 0, None

    with client(scp.port, [(COMMITMENT, [ELE])], on_request=on_request) as assoc:
        rsp, _ = assoc.n_action(COMMITMENT, COMMITMENT_INSTANCE, 1, commitment_info())
        assert rsp.status == 0
    scp.join()
    [(ctx, rq, report)] = got
    assert isinstance(rq, dimse.NEventReportRQ) and rq.message_id == 77
    assert report is not None and report.TransactionUID == "1.2.3.4.5"
    [(rsp_ctx, answer)] = seen
    assert rsp_ctx == ctx
    assert isinstance(answer, dimse.NEventReportRSP)
    assert (answer.message_id_being_responded_to, answer.status, answer.event_type_id,
            answer.affected_sop_class_uid, answer.affected_sop_instance_uid) == (
        77, 0, 1, COMMITMENT, COMMITMENT_INSTANCE)


def failing_handler(context_id: int, rq: Any, data: bytes | None) -> tuple[int, None]:
    raise RuntimeError("bug in the handler")


@pytest.mark.parametrize(("handler", "status"), [
    (None, 0x0211),
    (failing_handler, 0x0110),
], ids=["no-handler", "handler-raises"])
def test_request_without_a_handler_is_refused_not_dropped(
        handler: Any, status: int, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Any] = []
    scp = ScriptedSCP(commitment_script(seen))
    with client(scp.port, [(COMMITMENT, [ELE])], on_request=handler) as assoc:
        rsp, _ = assoc.n_action(COMMITMENT, COMMITMENT_INSTANCE, 1, commitment_info())
        assert rsp.status == 0
    scp.join()
    [(_, answer)] = seen
    assert isinstance(answer, dimse.NEventReportRSP)
    assert (answer.message_id_being_responded_to, answer.status) == (77, status)


# ---------------------------------------------------------------------------
# CommandRejected on the client
# ---------------------------------------------------------------------------


def bad_echo_rsp(message_id: int) -> bytes:
    """A C-ECHO-RSP whose Affected SOP Class UID is not a UID (engine: 0212H)."""
    return command_set((0x0002, b"1.2.x!"), (0x0100, us(0x8030)), (0x0120, us(message_id)),
                       (0x0800, us(0x0101)), (0x0900, us(0)))


def test_invalid_response_to_the_awaited_message_raises() -> None:
    def script(peer: PeerSide) -> None:
        ctx, rq, _ = peer.receive()
        peer.send_raw(ctx, bad_echo_rsp(rq.message_id))
        ctx, rq, _ = peer.receive()  # the association goes on
        peer.send(ctx, dimse.CEchoRSP(message_id_being_responded_to=rq.message_id, status=0))
        peer.finish()

    scp = ScriptedSCP(script)
    with client(scp.port, [(VERIFICATION, [ELE])]) as assoc:
        with pytest.raises(ResponseRejectedError, match=r"1\.2\.x!") as caught:
            assoc.echo()
        assert isinstance(caught.value, NetworkError)
        assert assoc.echo() == 0
    scp.join()


def test_invalid_command_sets_that_are_not_ours_are_drained_or_answered(
        caplog: pytest.LogCaptureFixture) -> None:
    """While we wait: an invalid response to another message (with a data set) is
    drained and dropped; an invalid request is answered with the engine's status."""
    caplog.set_level(logging.INFO, logger="router")
    seen: list[Any] = []

    def script(peer: PeerSide) -> None:
        ctx, rq, _ = peer.receive()
        stray = command_set((0x0002, b"1.2.x!"), (0x0100, us(0x8030)), (0x0120, us(999)),
                            (0x0800, us(1)), (0x0900, us(0)))
        peer.send_raw(ctx, stray, b"\x10\x00\x10\x00\x04\x00\x00\x00ABCD")
        bad_request = command_set((0x0002, b"1.2.y!"), (0x0100, us(0x0030)),
                                  (0x0110, us(55)), (0x0800, us(0x0101)))
        peer.send_raw(ctx, bad_request)
        seen.append(peer.receive())
        peer.send(ctx, dimse.CEchoRSP(message_id_being_responded_to=rq.message_id, status=0))
        peer.finish()

    scp = ScriptedSCP(script)
    with client(scp.port, [(VERIFICATION, [ELE])]) as assoc:
        assert assoc.echo() == 0
    scp.join()
    [(_, answer, _)] = seen
    assert isinstance(answer, dimse.CEchoRSP)
    assert (answer.message_id_being_responded_to, answer.status) == (55, 0x0212)
    assert lines(caplog, "dropping an invalid command set")
    assert lines(caplog, "invalid request")


# ---------------------------------------------------------------------------
# Findings 8 and 9: data sets held whole are capped, deflate is bounded
# ---------------------------------------------------------------------------


def big_find(identifier: Dataset) -> Callable[[Request, CancelToken],
                                              Iterator[tuple[int, Dataset | None]]]:
    def on_c_find(req: Request, token: CancelToken) -> Iterator[tuple[int, Dataset | None]]:
        yield dimse.PENDING, identifier

    return on_c_find


def test_oversized_identifier_aborts_with_a_clear_error(
        serve: Callable[..., Server]) -> None:
    identifier = study_query(**big_payload(200_000))  # type: ignore[arg-type]
    server = serve(Handlers(on_c_find=big_find(identifier)))
    assoc = client(server.port, [(FIND, [ELE])], max_dataset_size=100_000)
    with pytest.raises(DatasetTooLargeError, match="larger than 100000 bytes"):
        list(assoc.find(study_query(), model=FIND))
    assert not assoc.is_associated
    # The default cap (64 MiB) lets it through.
    with client(server.port, [(FIND, [ELE])]) as again:
        [(status, got), (final, _)] = list(again.find(study_query(), model=FIND))
        assert (status, final) == (dimse.PENDING, 0)
        assert got is not None and len(got.EncapsulatedDocument) == 200_000


def test_oversized_n_get_reply_aborts(serve: Callable[..., Server]) -> None:
    reply = Dataset()
    reply.EncapsulatedDocument = bytes(50_000)
    server = serve(Handlers(on_n_get=lambda req: (0, reply)))
    assoc = client(server.port, [(uids.MODALITY_PERFORMED_PROCEDURE_STEP, [ELE])],
                   max_dataset_size=10_000)
    with pytest.raises(DatasetTooLargeError):
        assoc.n_get(uids.MODALITY_PERFORMED_PROCEDURE_STEP, "1.2.3")
    assert not assoc.is_associated


def test_deflated_identifier_is_not_inflated_past_the_limit(
        serve: Callable[..., Server]) -> None:
    identifier = study_query(**big_payload(2 << 20))  # type: ignore[arg-type]
    server = serve(Handlers(on_c_find=big_find(identifier)))
    deflated = uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
    with (client(server.port, [(FIND, [deflated])], max_inflated_size=1 << 20) as assoc,
          pytest.raises(DIMSEError, match="inflates to more than 1048576")):
        list(assoc.find(study_query(), model=FIND))


# ---------------------------------------------------------------------------
# Finding 15: C-CANCEL on the operation's context; closing a generator cancels
# ---------------------------------------------------------------------------

OPERATIONS = {
    "find": (FIND, dimse.CFindRQ, dimse.CFindRSP),
    "move": (MOVE, dimse.CMoveRQ, dimse.CMoveRSP),
    "get": (GET, dimse.CGetRQ, dimse.CGetRSP),
}


def retrieve_script(model: str, rsp_type: type, seen: list[Any], *,
                    extra_pending: bool = False,
                    answer_cancel: bool = True) -> Callable[[PeerSide], None]:
    """One pending response, then the C-CANCEL must come on the operation's context;
    then (optionally one more pending, already in flight, and) the final FE00; then a
    C-ECHO to prove the association is in step."""

    def script(peer: PeerSide) -> None:
        ctx, rq, _ = peer.receive()
        assert peer.contexts[ctx].abstract_syntax == model

        def rsp(status: int) -> Any:
            return rsp_type(message_id_being_responded_to=rq.message_id,
                            affected_sop_class_uid=model, status=status)

        peer.send(ctx, rsp(dimse.PENDING))
        cancel_ctx, cancel, _ = peer.receive()
        seen.append((cancel_ctx == ctx, cancel))
        if not answer_cancel:
            peer.next()  # the requestor gives up and aborts
            return
        if extra_pending:
            peer.send(ctx, rsp(dimse.PENDING))
        peer.send(ctx, rsp(dimse.CANCEL))
        echo_ctx, echo, _ = peer.receive()
        peer.send(echo_ctx, dimse.CEchoRSP(message_id_being_responded_to=echo.message_id,
                                           status=0))
        peer.finish()

    return script


def start(assoc: ClientAssociation, operation: str) -> Iterator[Any]:
    model = OPERATIONS[operation][0]
    if operation == "find":
        return assoc.find(study_query(), model=model)
    if operation == "move":
        return assoc.move(study_query(), "DEST", model=model)
    return assoc.get(study_query(), model=model)


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_cancel_goes_on_the_operations_context(operation: str) -> None:
    model, _, rsp_type = OPERATIONS[operation]
    seen: list[Any] = []
    scp = ScriptedSCP(retrieve_script(model, rsp_type, seen))
    # Verification first: context 1, which the old code sent every C-CANCEL on.
    with client(scp.port, [(VERIFICATION, [ELE]), (model, [ELE])]) as assoc:
        responses = start(assoc, operation)
        next(responses)
        assert assoc.current_message_id is not None
        assoc.cancel(assoc.current_message_id)
        rest = list(responses)
        assert assoc.echo() == 0
    scp.join()
    [(same_context, cancel)] = seen
    assert isinstance(cancel, dimse.CCancelRQ) and same_context
    final = rest[-1]
    assert (final[0] if operation == "find" else final.status) == dimse.CANCEL


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_closing_the_generator_cancels_and_drains(operation: str) -> None:
    model, _, rsp_type = OPERATIONS[operation]
    seen: list[Any] = []
    scp = ScriptedSCP(retrieve_script(model, rsp_type, seen, extra_pending=True))
    with client(scp.port, [(VERIFICATION, [ELE]), (model, [ELE])]) as assoc:
        for _ in start(assoc, operation):
            break  # the caller has seen enough
        assert assoc.echo() == 0  # the pending and final responses were read
    scp.join()
    [(same_context, cancel)] = seen
    assert isinstance(cancel, dimse.CCancelRQ) and same_context
    assert cancel.message_id_being_responded_to == 1


def test_closing_the_generator_aborts_a_peer_that_never_ends(
        caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Any] = []
    scp = ScriptedSCP(retrieve_script(FIND, dimse.CFindRSP, seen, answer_cancel=False))
    assoc = client(scp.port, [(FIND, [ELE])], dimse_timeout=0.5)
    results = assoc.find(study_query(), model=FIND)
    next(results)
    results.close()
    assert not assoc.is_associated
    scp.join()
    assert len(seen) == 1
    assert lines(caplog, "C-CANCEL: aborting")
