"""Broken peers against the threaded SCP (router.net.server.Server) over real sockets.

The standard these tests hold the server to: bad input gets a clear answer and loses
nothing. The peer gets the right A-ASSOCIATE-RJ (PS3.8 §9.3.4, Table 9-21) or A-ABORT
(§9.3.8, Table 9-26); the server logs one line naming the association and saying why;
it closes the transport (at once, or after ARTIM in Sta13); it keeps serving everyone
else; and every association thread ends once its peer is gone.

Each test gets its own in-process ``Server`` on a free 127.0.0.1 port with a short ARTIM
(``rig`` fixture). The fixture's teardown is a check of its own, run after every test:
the association threads drain (bounded joins, no sleeps), the accept thread is alive, a
fresh client still gets its C-ECHO answered, and nothing was logged with a traceback.

Peers are raw sockets sending PDUs built with ``build_request``/``encode_pdu`` and then
corrupted, our own client, and DCMTK (echoscu, storescu) where a real peer matters.
Nothing here sleeps: every wait is a socket timeout, a queue or an event with a bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import random
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.dicom import dimse, uids
from router.dicom.events import AssociationAborted
from router.dicom.negotiation import (
    AcceptorPolicy,
    NegotiatedContext,
    accepted_contexts,
    build_request,
    negotiate,
)
from router.dicom.pdu import (
    PDU,
    PDV,
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRP,
    AReleaseRQ,
    PDataTF,
    decode_pdu,
    encode_pdu,
)
from router.net.client import AssociationRejectedError, connect
from router.net.server import AssociationInfo, Handlers, Request, Server
from tests.helpers import Dcmtk, Procs, dcmtk_env, make_ct

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"  # proposed by the tests, never accepted
ELE = uids.EXPLICIT_VR_LITTLE_ENDIAN

AE = "ROUTER"
CALLING = "FAULTS"
ARTIM = 0.5
# When a close that ARTIM causes may arrive, measured from just before the last send.
ARTIM_WINDOW = (0.4, 3.0)
MAX_PDU = 65536  # what the server advertises: small, so an oversized PDU is cheap to send
IO_TIMEOUT = 5.0  # every socket, queue and event wait is bounded by this

POLICY = AcceptorPolicy(
    ae_titles=frozenset({AE}),
    calling_ae_titles=frozenset({CALLING, "ECHOSCU", "STORESCU"}),
    abstract_syntaxes={uids.VERIFICATION_SOP_CLASS: None, CT_IMAGE_STORAGE: None},
    maximum_length=MAX_PDU,
)

# Context IDs 1, 3, 5 (build_request numbers them in order); 5 is refused.
CONTEXTS = [
    (uids.VERIFICATION_SOP_CLASS, [ELE]),
    (CT_IMAGE_STORAGE, [ELE]),
    (MR_IMAGE_STORAGE, [ELE]),
]
ECHO_CTX, CT_CTX, REFUSED_CTX = 1, 3, 5

RELEASE_RQ = encode_pdu(AReleaseRQ())
RELEASE_RP = encode_pdu(AReleaseRP())
USER_ABORT = encode_pdu(AAbort(source=0, reason=0))
UNKNOWN_PDU = b"\x09\x00\x00\x00\x00\x04\x00\x00\x00\x00"  # PDU type 09H: not in PS3.8 §9.3.1


# ---------------------------------------------------------------------------
# The server under test and what its handlers saw
# ---------------------------------------------------------------------------


class Sink:
    """A C-STORE stream sink that records what happened to it.

    With a ``gate``, the first ``write`` holds the association's thread until the gate
    opens: a test can then act (kill the peer) while the data set is provably mid-way.
    """

    def __init__(self, gate: threading.Event | None) -> None:
        self.gate = gate
        self.received = 0
        self.first_write = threading.Event()
        self.aborted = threading.Event()
        self.closed = threading.Event()

    def write(self, data: memoryview) -> None:
        self.received += len(data)
        if not self.first_write.is_set():
            self.first_write.set()
            if self.gate is not None:
                self.gate.wait(IO_TIMEOUT)

    def close(self) -> int:
        self.closed.set()
        return dimse.SUCCESS

    def abort(self) -> None:
        self.aborted.set()


class Recorder:
    """The server's handlers: every callback lands in a queue the test can wait on."""

    def __init__(self) -> None:
        self.gate: threading.Event | None = None
        self.sinks: queue.Queue[Sink] = queue.Queue()
        self.aborted: queue.Queue[tuple[AssociationInfo, AssociationAborted]] = queue.Queue()
        self.closed: queue.Queue[tuple[AssociationInfo | None, dict[str, Any]]] = queue.Queue()

    def handlers(self) -> Handlers:
        return Handlers(
            on_c_store_stream=self._sink,
            on_aborted=lambda info, event: self.aborted.put((info, event)),
            on_closed=lambda info, stats: self.closed.put((info, stats)),
        )

    def _sink(self, request: Request) -> Sink:
        sink = Sink(self.gate)
        self.sinks.put(sink)
        return sink

    def next_closed(self) -> tuple[AssociationInfo | None, dict[str, Any]]:
        """The next association to finish (on_closed runs after its close log line)."""
        return self.closed.get(timeout=IO_TIMEOUT)


@dataclasses.dataclass
class Rig:
    server: Server
    rec: Recorder

    @property
    def port(self) -> int:
        return int(self.server.port)


def drain_threads(server: Server, timeout: float = IO_TIMEOUT) -> None:
    """Wait, with bounded joins, until the server has no association thread left."""
    deadline = time.monotonic() + timeout
    while True:
        with server._lock:
            threads = list(server._threads)
        if not threads:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            names = sorted(t.name for t in threads)
            raise AssertionError(f"association threads still running: {names}")
        # A thread is registered just before it is started; join the started ones.
        started = [t for t in threads if t.ident is not None]
        if started:
            started[0].join(remaining)


def assert_serves(port: int) -> None:
    """A well-behaved client still gets its association and C-ECHO answered."""
    with connect("127.0.0.1", port, calling_ae=CALLING, called_ae=AE,
                 acse_timeout=IO_TIMEOUT, dimse_timeout=IO_TIMEOUT) as assoc:
        assert assoc.echo() == dimse.SUCCESS


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    """Records from our code at ERROR or with a traceback: none may appear here."""
    return [f"{r.name}: {r.getMessage()}" for r in records
            if r.name.startswith("router") and (r.exc_info or r.levelno >= logging.ERROR)]


@pytest.fixture
def rig(caplog: pytest.LogCaptureFixture) -> Iterator[Rig]:
    caplog.set_level(logging.INFO, logger="router")
    rec = Recorder()
    server = Server(rec.handlers(), ae_title=AE, host="127.0.0.1", port=0, policy=POLICY,
                    artim_timeout=ARTIM).start()
    try:
        yield Rig(server, rec)
        # Run after every test: the server is intact and cleans up after its peers.
        rec.gate = None
        drain_threads(server)
        assert server._accept_thread is not None and server._accept_thread.is_alive()
        assert_serves(server.port)
        drain_threads(server)
        with server._lock:
            assert not server._handlers_live
        assert not tracebacks(caplog.get_records("call") + caplog.get_records("teardown"))
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------
# Raw-socket peer helpers
# ---------------------------------------------------------------------------


def raw_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU, header included (PS3.8 §9.3.1: type, reserved, 32-bit length)."""
    header = recv_exact(sock, 6)
    (length,) = struct.unpack_from(">I", header, 2)
    return header + recv_exact(sock, length)


def wait_closed(sock: socket.socket, timeout: float = ARTIM_WINDOW[1]) -> tuple[bytes, float]:
    """Read until the server closes (EOF or reset): (bytes that came first, seconds waited)."""
    start = time.monotonic()
    deadline = start + timeout
    data = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"server did not close the connection within {timeout} s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            continue  # the deadline check above reports it
        if not chunk:
            break
        data += chunk
    return bytes(data), time.monotonic() - start


def split_pdus(data: bytes) -> list[PDU]:
    """Decode a byte stream the server sent: it must be whole, valid PDUs only."""
    out: list[PDU] = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 6, f"truncated PDU header at {pos}: {data[pos:].hex()}"
        (length,) = struct.unpack_from(">I", data, pos + 2)
        end = pos + 6 + length
        assert end <= len(data), f"truncated PDU at {pos}: {length} bytes announced"
        out.append(decode_pdu(data[pos:end]))
        pos = end
    return out


def request(*, called: str = AE, calling: str = CALLING,
            contexts: list[tuple[str, list[str]]] | None = None) -> AAssociateRQ:
    return build_request(calling_ae_title=calling, called_ae_title=called,
                         contexts=contexts or CONTEXTS)


def pdata(context_id: int, *, command: bool, last: bool, data: bytes) -> bytes:
    """One P-DATA-TF with one PDV (PS3.8 §9.3.5, message control header Annex E.2)."""
    pdv = PDV(context_id=context_id, is_command=command, is_last=last, data=data)
    return encode_pdu(PDataTF(pdvs=(pdv,)))


def echo_command(message_id: int = 1) -> bytes:
    return dimse.encode_command(dimse.CEchoRQ(
        message_id=message_id, affected_sop_class_uid=uids.VERIFICATION_SOP_CLASS))


def store_command(message_id: int = 1) -> bytes:
    return dimse.encode_command(dimse.CStoreRQ(
        message_id=message_id, affected_sop_class_uid=CT_IMAGE_STORAGE,
        affected_sop_instance_uid="1.2.826.0.1.3680043.2.1143.1"))


def associate(sock: socket.socket) -> dict[int, NegotiatedContext]:
    """Send our A-ASSOCIATE-RQ, read the AC: the server is now in Sta6."""
    rq = request()
    sock.sendall(encode_pdu(rq))
    ac = decode_pdu(read_pdu(sock))
    assert isinstance(ac, AAssociateAC)
    contexts = accepted_contexts(rq, ac)
    assert sorted(contexts) == [ECHO_CTX, CT_CTX]
    return contexts


def logged(caplog: pytest.LogCaptureFixture, port: int, fragment: str) -> list[str]:
    """Log lines from router.net* that name the peer's port and contain ``fragment``."""
    named = re.compile(rf"\b{port}\b")
    return [m for r in caplog.records if r.name.startswith("router.net")
            for m in [r.getMessage()] if named.search(m) and fragment in m]


def assert_one_line_reason(caplog: pytest.LogCaptureFixture, port: int, fragment: str) -> None:
    lines = logged(caplog, port, fragment)
    assert lines, (f"no log line names port {port} with {fragment!r}:\n"
                   + "\n".join(r.getMessage() for r in caplog.records))
    assert all("\n" not in line for line in lines)


# ---------------------------------------------------------------------------
# 1. A-ASSOCIATE-RJ with the right result/source/reason
# ---------------------------------------------------------------------------

REJECTIONS = [
    # (id, request, (result, source, reason)) -- PS3.8 §9.3.4 Table 9-21
    pytest.param(request(called="WRONG"), (1, 1, 7), id="called-AE-not-recognized"),
    pytest.param(request(calling="STRANGER"), (1, 1, 3), id="calling-AE-not-recognized"),
    pytest.param(request(contexts=[(MR_IMAGE_STORAGE, [ELE])]), (1, 1, 1),
                 id="no-acceptable-context"),  # AcceptorPolicy.reject_if_no_context
    pytest.param(dataclasses.replace(request(),
                                     application_context_name="1.2.840.10008.3.1.1.2"),
                 (1, 1, 2), id="application-context-not-supported"),
    pytest.param(dataclasses.replace(request(), protocol_version=2), (1, 2, 2),
                 id="protocol-version-without-bit-0"),  # provider (ACSE), AE-6
]


@pytest.mark.parametrize("called", [AE.ljust(16).encode(), b"  " + AE.ljust(14).encode()])
def test_the_ac_sends_back_the_rq_fixed_fields_as_received(rig: Rig, called: bytes) -> None:
    """PS3.8 Table 9-17: bytes 11-74 of the A-ASSOCIATE-AC (the AE title fields and 32
    reserved bytes) are sent with the values received in the A-ASSOCIATE-RQ. They
    were made again from the titles, padding and reserved bytes lost."""
    raw = bytearray(encode_pdu(request()))
    raw[10:26] = called  # leading spaces: not significant (PS3.5 AE), kept as received
    raw[42:74] = bytes(range(1, 33))  # "shall be sent with 00H", "not tested" on receipt
    with raw_connect(rig.port) as sock:
        sock.sendall(bytes(raw))
        ac = read_pdu(sock)
        assert ac[0] == 0x02, ac[:10]
        assert ac[10:74] == raw[10:74]
        assert ac[6:10] == b"\x00\x01\x00\x00"  # protocol version; reserved, sent as 0
        sock.sendall(RELEASE_RQ)
        assert read_pdu(sock)[0] == 0x06
    rig.rec.next_closed()


@pytest.mark.parametrize(("rq", "expected"), REJECTIONS)
def test_rejection_bytes_then_close_after_artim(
    rig: Rig, rq: AAssociateRQ, expected: tuple[int, int, int]
) -> None:
    """The RJ carries the Table 9-21 values; then AE-8 starts ARTIM and, since this peer
    never closes, ARTIM closes the transport (Sta13, Evt18, AA-2)."""
    with raw_connect(rig.port) as sock:
        started = time.monotonic()
        sock.sendall(encode_pdu(rq))
        raw = read_pdu(sock)
        assert raw == bytes([0x03, 0, 0, 0, 0, 4, 0, *expected])
        rj = decode_pdu(raw)
        assert isinstance(rj, AAssociateRJ)
        assert (int(rj.result), int(rj.source), rj.reason) == expected
        rest, _ = wait_closed(sock)
        waited = time.monotonic() - started
    assert rest == b""
    assert ARTIM_WINDOW[0] <= waited <= ARTIM_WINDOW[1]
    rig.rec.next_closed()
    assert_serves(rig.port)


@pytest.mark.parametrize(("rq", "expected"), [
    *REJECTIONS[:4],
    # A provider rejection (AE-6, Table 9-6) has no indication: the engine's
    # abort_detail carries the reason to the close line.
    REJECTIONS[4],
])
def test_rejection_is_logged(
    rig: Rig, caplog: pytest.LogCaptureFixture, rq: AAssociateRQ, expected: tuple[int, int, int]
) -> None:
    with raw_connect(rig.port) as sock:
        port = sock.getsockname()[1]
        sock.sendall(encode_pdu(rq))
        assert isinstance(decode_pdu(read_pdu(sock)), AAssociateRJ)
    # We close at once: Evt17 in Sta13 (AR-5) ends it, well before ARTIM would.
    _, stats = rig.rec.next_closed()
    assert stats["seconds"] < ARTIM
    result, source, reason = expected
    assert_one_line_reason(caplog, port, f"result {result} source {source} reason {reason}")


@pytest.mark.interop
def test_echoscu_wrong_called_ae(rig: Rig, dcmtk: Dcmtk, caplog: pytest.LogCaptureFixture) -> None:
    done = dcmtk.run("echoscu", "-aet", "ECHOSCU", "-aec", "WRONG", "127.0.0.1", str(rig.port),
                     timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Association Rejected" in output
    assert "Rejected Permanent, Source: Service User" in output
    assert "Called AE Title Not Recognized" in output
    info, stats = rig.rec.next_closed()
    assert info is not None and info.calling_ae == "ECHOSCU"
    assert stats["outcome"] == "rejected (result 1, source 1, reason 7)"


def test_own_client_wrong_called_ae(rig: Rig) -> None:
    with pytest.raises(AssociationRejectedError) as caught:
        connect("127.0.0.1", rig.port, calling_ae=CALLING, called_ae="WRONG",
                acse_timeout=IO_TIMEOUT)
    assert caught.value.reject == AAssociateRJ(result=1, source=1, reason=7)
    rig.rec.next_closed()


# ---------------------------------------------------------------------------
# 2. ARTIM: silent peers are dropped
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"\x01\x00\x00"], ids=["nothing", "half-a-header"])
def test_artim_drops_silent_peer_in_sta2(
    rig: Rig, caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    """AE-5 starts ARTIM on connection; no complete A-ASSOCIATE-RQ before it expires
    means Evt18 in Sta2 -> AA-2: close, and nothing sent."""
    with raw_connect(rig.port) as sock:
        port = sock.getsockname()[1]
        started = time.monotonic()
        if sent:
            sock.sendall(sent)
        data, _ = wait_closed(sock)
        waited = time.monotonic() - started
    assert data == b""
    assert ARTIM_WINDOW[0] <= waited <= ARTIM_WINDOW[1]
    rig.rec.next_closed()
    assert_one_line_reason(caplog, port, "ARTIM timer expired")
    assert logged(caplog, port, "in STA2")


# ---------------------------------------------------------------------------
# 3. Garbage and malformed PDUs
# ---------------------------------------------------------------------------

def _random_bytes() -> bytes:
    data = random.Random(0).randbytes(200)
    assert data[0] not in range(1, 8)  # not a PDU type: Evt19 from the first byte
    return data


def _overrunning_rq() -> bytes:
    raw = bytearray(encode_pdu(request()))
    # The first item of the variable field (application context, at offset 74) now
    # announces 0xFFF0 bytes: it runs far past the end of the PDU (PS3.8 §9.3.2).
    assert raw[74] == 0x10
    struct.pack_into(">H", raw, 76, 0xFFF0)
    return bytes(raw)


PRE_ASSOCIATION = [
    # (bytes, log fragment, (source, reason) of the A-ABORT). Sta2 + Evt19 is AA-1
    # (Table 9-10), which sends service-user source, reason 0 (Table 9-9).
    pytest.param(_random_bytes(), "unrecognized PDU type 0xCD", (0, 0), id="random-bytes"),
    pytest.param(UNKNOWN_PDU, "unrecognized PDU type 0x09", (0, 0), id="unknown-pdu-type"),
    pytest.param(_overrunning_rq(), "overruns its container", (0, 0), id="rq-item-overrun"),
    # A well-formed PDU out of place: Sta2 + Evt10 -> AA-1, service-user source.
    pytest.param(pdata(1, command=True, last=True, data=echo_command()),
                 "unexpected PDataTF PDU in STA2", (0, 0), id="p-data-before-rq"),
]


@pytest.mark.parametrize(("payload", "fragment", "expected"), PRE_ASSOCIATION)
def test_garbage_before_association(
    rig: Rig, caplog: pytest.LogCaptureFixture, payload: bytes, fragment: str,
    expected: tuple[int, int],
) -> None:
    """Sta2: A-ABORT (AA-1), ARTIM, close; one log line with the reason."""
    with raw_connect(rig.port) as sock:
        port = sock.getsockname()[1]
        started = time.monotonic()
        sock.sendall(payload)
        abort = decode_pdu(read_pdu(sock))
        assert abort == AAbort(source=expected[0], reason=expected[1])
        rest, _ = wait_closed(sock)
        waited = time.monotonic() - started
    assert rest == b""
    assert ARTIM_WINDOW[0] <= waited <= ARTIM_WINDOW[1]
    info, stats = rig.rec.next_closed()
    assert info is None  # never associated: on_aborted has nobody to report
    assert stats["outcome"].startswith("aborted: ") and fragment in stats["outcome"]
    assert rig.rec.aborted.empty()
    assert_one_line_reason(caplog, port, fragment)
    assert_serves(rig.port)


@pytest.mark.parametrize("payload", [_random_bytes(), UNKNOWN_PDU, _overrunning_rq()],
                         ids=["random-bytes", "unknown-pdu-type", "rq-item-overrun"])
def test_invalid_pdu_in_sta2_aborts_with_service_user_source(rig: Rig, payload: bytes) -> None:
    with raw_connect(rig.port) as sock:
        sock.sendall(payload)
        assert decode_pdu(read_pdu(sock)) == AAbort(source=0, reason=0)
    rig.rec.next_closed()


def _oversized_pdata() -> bytes:
    """A P-DATA-TF one byte longer than the maximum length the server advertised (PS3.8
    Annex D.1): header, one PDV item filling it."""
    length = MAX_PDU + 1
    pdv = struct.pack(">IBB", length - 4, ECHO_CTX, 0x00) + bytes(length - 6)
    return struct.pack(">BBI", 0x04, 0, length) + pdv


def _overrunning_pdv() -> bytes:
    raw = bytearray(pdata(ECHO_CTX, command=True, last=True, data=echo_command()))
    struct.pack_into(">I", raw, 6, len(raw))  # PDV item length past the PDU's end
    return bytes(raw)


AFTER_ASSOCIATION = [
    # (bytes, A-ABORT reason with source 2 per Table 9-26, log fragment)
    pytest.param(UNKNOWN_PDU, 1, "unrecognized PDU type 0x09", id="unknown-pdu-type"),
    pytest.param(pdata(REFUSED_CTX, command=True, last=True, data=echo_command()), 6,
                 f"presentation context {REFUSED_CTX}, which was not accepted",
                 id="pdv-on-unaccepted-context"),
    pytest.param(pdata(ECHO_CTX, command=False, last=True, data=bytes(16)), 5,
                 "data set fragment without a command", id="data-pdv-without-command"),
    pytest.param(pdata(ECHO_CTX, command=True, last=True,
                       data=b"\x08\x00\x10\x00\x02\x00\x00\x00AB"), 6,
                 "undecodable DIMSE command set", id="undecodable-command-set"),
    pytest.param(encode_pdu(request()), 2, "unexpected AAssociateRQ PDU in STA6",
                 id="associate-rq-in-sta6"),
    pytest.param(RELEASE_RP, 2, "unexpected AReleaseRP PDU in STA6", id="release-rp-in-sta6"),
    pytest.param(_oversized_pdata(), 6, f"exceeds the maximum length {MAX_PDU}",
                 id="p-data-over-max-length"),
    pytest.param(_overrunning_pdv(), 6, "overruns the PDU", id="pdv-item-overrun"),
]


@pytest.mark.parametrize(("payload", "reason", "fragment"), AFTER_ASSOCIATION)
def test_malformed_after_association(
    rig: Rig, caplog: pytest.LogCaptureFixture, payload: bytes, reason: int, fragment: str
) -> None:
    """Sta6 + Evt19 (or an unexpected PDU) -> AA-8: A-ABORT from the service provider
    with the Table 9-26 reason, A-P-ABORT indication, ARTIM, close."""
    with raw_connect(rig.port) as sock:
        port = sock.getsockname()[1]
        associate(sock)
        started = time.monotonic()
        sock.sendall(payload)
        raw = read_pdu(sock)
        assert raw == bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, reason])
        assert decode_pdu(raw) == AAbort(source=2, reason=reason)
        rest, _ = wait_closed(sock)
        waited = time.monotonic() - started
    assert rest == b""
    assert ARTIM_WINDOW[0] <= waited <= ARTIM_WINDOW[1]
    info, event = rig.rec.aborted.get(timeout=IO_TIMEOUT)
    assert info.peer[1] == port
    assert (event.source, event.reason, event.provider, event.local) == (2, reason, True, True)
    assert fragment in event.detail
    _, stats = rig.rec.next_closed()
    assert stats["outcome"] == f"aborted: {event.detail}"
    assert_one_line_reason(caplog, port, f"aborted: {event.detail}")
    assert_serves(rig.port)


# ---------------------------------------------------------------------------
# 4. The peer goes away in the middle of a data set
# ---------------------------------------------------------------------------


def test_peer_abort_mid_data_set(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    with raw_connect(rig.port) as sock:
        port = sock.getsockname()[1]
        associate(sock)
        sock.sendall(pdata(CT_CTX, command=True, last=True, data=store_command())
                     + pdata(CT_CTX, command=False, last=False, data=bytes(1000))
                     + USER_ABORT)
        rest, _ = wait_closed(sock)  # AA-3 closes at once, no ARTIM
    assert rest == b""
    sink = rig.rec.sinks.get(timeout=IO_TIMEOUT)
    info, event = rig.rec.aborted.get(timeout=IO_TIMEOUT)
    assert info.peer[1] == port
    assert event == AssociationAborted(source=0, reason=0, provider=False, local=False,
                                       detail="A-ABORT received from peer (source 0, reason 0)")
    _, stats = rig.rec.next_closed()
    assert sink.received == 1000
    assert sink.aborted.is_set() and not sink.closed.is_set()
    assert stats["instances"] == 0
    assert_one_line_reason(caplog, port, "aborted: A-ABORT received from peer")


@pytest.mark.parametrize("how", ["reset", "close"])
def test_transport_lost_mid_data_set(
    rig: Rig, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """TCP RST or FIN without A-ABORT: Evt17 in Sta6 -> AA-4, an A-P-ABORT indication."""
    sock = raw_connect(rig.port)
    port = sock.getsockname()[1]
    try:
        associate(sock)
        sock.sendall(pdata(CT_CTX, command=True, last=True, data=store_command())
                     + pdata(CT_CTX, command=False, last=False, data=bytes(1000)))
        sink = rig.rec.sinks.get(timeout=IO_TIMEOUT)
        assert sink.first_write.wait(IO_TIMEOUT)
        if how == "reset":  # close() with a zero linger sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    info, event = rig.rec.aborted.get(timeout=IO_TIMEOUT)
    assert info.peer[1] == port
    assert (event.source, event.reason, event.provider, event.local) == (2, 0, True, False)
    _, stats = rig.rec.next_closed()
    assert sink.aborted.is_set() and not sink.closed.is_set()
    assert stats["instances"] == 0
    assert_one_line_reason(caplog, port, "aborted: connection closed by peer")
    assert not tracebacks(caplog.records)


def test_c_store_on_a_context_for_another_sop_class_is_refused(rig: Rig) -> None:
    """A CT instance sent on the Verification context (PS3.8 §7.1.1.13) is answered
    0122H 'SOP Class not supported' (PS3.7 Annex C) and never reaches a handler."""
    with raw_connect(rig.port) as sock:
        associate(sock)
        sock.sendall(pdata(ECHO_CTX, command=True, last=True, data=store_command())
                     + pdata(ECHO_CTX, command=False, last=True, data=bytes(16)))
        reply = decode_pdu(read_pdu(sock))
        sock.sendall(RELEASE_RQ)
        assert isinstance(decode_pdu(read_pdu(sock)), AReleaseRP)
    _, stats = rig.rec.next_closed()
    assert isinstance(reply, PDataTF)
    rsp = dimse.decode_command(bytes(reply.pdvs[0].data))
    assert isinstance(rsp, dimse.CStoreRSP)
    assert rsp.status == 0x0122
    assert stats["instances"] == 0


@pytest.mark.interop
def test_storescu_killed_mid_send(
    rig: Rig, dcmtk: Dcmtk, procs: Procs, tmp_path: Path
) -> None:
    """kill -9 a real sender while its 50 MB data set is on the wire."""
    path = tmp_path / "big.dcm"
    make_ct(path, size_kb=50_000)
    gate = threading.Event()
    rig.rec.gate = gate  # the first write holds the server until storescu is dead
    proc = procs.start([dcmtk.storescu, "-aet", "STORESCU", "-aec", AE, "127.0.0.1",
                        str(rig.port), str(path)], env=dcmtk_env())
    try:
        sink = rig.rec.sinks.get(timeout=30)
        assert sink.first_write.wait(IO_TIMEOUT)
        proc.signal(signal.SIGKILL)
        assert proc.wait(IO_TIMEOUT) == -signal.SIGKILL
    finally:
        gate.set()
    info, event = rig.rec.aborted.get(timeout=IO_TIMEOUT)
    assert info.calling_ae == "STORESCU"
    assert event.provider and not event.local
    _, stats = rig.rec.next_closed()
    assert sink.aborted.is_set() and not sink.closed.is_set()
    assert 0 < sink.received < path.stat().st_size
    assert stats["instances"] == 0
    assert_serves(rig.port)


# ---------------------------------------------------------------------------
# 5. Release collision over sockets (our requestor engine vs a scripted acceptor)
# ---------------------------------------------------------------------------


def test_release_collision_requestor_over_sockets(caplog: pytest.LogCaptureFixture) -> None:
    """Both sides send A-RELEASE-RQ before reading the other's (PS3.8 §7.2.2).

    Deterministic: ``connect()`` stops reading once it has the AC, and ``release()``
    sends its RQ before it reads again, while the scripted acceptor writes its RQ right
    behind the AC. So our requestor always meets the acceptor's RQ in Sta7 (AR-8 ->
    Sta9), answers it (AR-9 -> Sta11), and closes on the acceptor's RP (AR-3). The
    acceptor seeing RQ then RP, before it sent any RP, proves that path was taken.

    The acceptor side of a collision cannot be provoked against ``Server``: it never
    issues an A-RELEASE request itself; tests/dicom/test_association.py covers it in
    memory.
    """
    caplog.set_level(logging.INFO, logger="router")
    seen: list[object] = []
    failures: list[BaseException] = []

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(IO_TIMEOUT)

        def acceptor() -> None:
            try:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(IO_TIMEOUT)
                    rq = decode_pdu(read_pdu(conn))
                    assert isinstance(rq, AAssociateRQ)
                    ac = negotiate(rq, AcceptorPolicy())
                    conn.sendall(encode_pdu(ac) + RELEASE_RQ)
                    seen.append(decode_pdu(read_pdu(conn)))  # its RQ: we are in Sta10
                    seen.append(decode_pdu(read_pdu(conn)))  # its RP: AR-10 -> Sta12
                    conn.sendall(RELEASE_RP)  # AR-4
                    seen.append(wait_closed(conn)[0])
            except BaseException as exc:  # reported by the test thread
                failures.append(exc)

        thread = threading.Thread(target=acceptor, name="collision-acceptor")
        thread.start()
        try:
            client = connect("127.0.0.1", listener.getsockname()[1], calling_ae=CALLING,
                             called_ae="PEER", acse_timeout=IO_TIMEOUT)
            client.release()
        finally:
            thread.join(IO_TIMEOUT)
    assert not thread.is_alive()
    assert not failures, failures
    assert seen == [AReleaseRQ(), AReleaseRP(), b""]
    assert not client.is_associated
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------
# 6. Bounded fuzz of the running server
# ---------------------------------------------------------------------------


def _base_streams() -> list[list[bytes]]:
    rq = encode_pdu(request())
    echo = pdata(ECHO_CTX, command=True, last=True, data=echo_command())
    store = pdata(CT_CTX, command=True, last=True, data=store_command(2))
    data = [pdata(CT_CTX, command=False, last=False, data=bytes(100)),
            pdata(CT_CTX, command=False, last=True, data=bytes(50))]
    return [
        [rq, echo, RELEASE_RQ],
        [rq, store, *data, echo, RELEASE_RQ],
        [rq, echo, USER_ABORT],
    ]


BASE_STREAMS = _base_streams()
LENGTHS = [0, 1, 3, 4, 5, 6, 0x44, 0x45, 0xFFFF, MAX_PDU, MAX_PDU + 1, 0x7FFF_FFFF, 0xFFFF_FFFF]
MUTATIONS = ("byte", "u16", "pdu-length", "pdu-type", "truncate", "insert", "drop", "duplicate")


@st.composite
def mutated_streams(draw: st.DrawFn) -> list[bytes]:
    """A valid PDU sequence with 1-3 mutations, cut into 1-4 writes."""
    pdus = [bytearray(p) for p in draw(st.sampled_from(BASE_STREAMS))]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(pdus) - 1))
        pdu = pdus[i]
        op = draw(st.sampled_from(MUTATIONS))
        if op == "byte" and pdu:
            pdu[draw(st.integers(0, len(pdu) - 1))] = draw(st.integers(0, 255))
        elif op == "u16" and len(pdu) >= 2:
            struct.pack_into(">H", pdu, draw(st.integers(0, len(pdu) - 2)),
                             draw(st.sampled_from([0, 1, 2, 0xFF, 0x100, 0xFFFF])))
        elif op == "pdu-length" and len(pdu) >= 6:
            struct.pack_into(">I", pdu, 2, draw(st.sampled_from(LENGTHS)))
        elif op == "pdu-type" and pdu:
            pdu[0] = draw(st.integers(0, 9))
        elif op == "truncate":
            del pdu[draw(st.integers(0, len(pdu))):]
        elif op == "insert":
            at = draw(st.integers(0, len(pdu)))
            pdu[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "drop" and len(pdus) > 1:
            del pdus[i]
        elif op == "duplicate":
            pdus.insert(i, bytearray(pdu))
    stream = b"".join(pdus)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=3)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(pieces=mutated_streams())
def test_fuzz_running_server(
    rig: Rig, caplog: pytest.LogCaptureFixture, pieces: list[bytes]
) -> None:
    """Every connection ends with a close, answered only with valid PDUs, nothing but
    A-ABORTs after an A-ABORT or A-ASSOCIATE-RJ; no traceback. We half-close after sending, so a
    sequence that leaves the association open ends with Evt17 rather than a hang; the
    ARTIM paths without our FIN are the tests above. (The fixture's teardown checks
    that the server still serves and that its threads drain.)"""
    with raw_connect(rig.port) as sock:
        with contextlib.suppress(OSError):  # the server may close while we still write
            for piece in pieces:
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)
        data, waited = wait_closed(sock)
    assert waited <= ARTIM_WINDOW[1]
    replies = split_pdus(data)
    for i, pdu in enumerate(replies):
        if isinstance(pdu, AAbort | AAssociateRJ):
            # Sta13 from here on: PS3.8 Table 9-10 allows only AA-7 (another A-ABORT, for
            # an A-ASSOCIATE-RQ or an invalid PDU) or AA-6 (ignore).
            after = replies[i + 1:]
            assert all(isinstance(p, AAbort) for p in after), f"{after} sent after {pdu}"
        if isinstance(pdu, AAbort):
            assert pdu.source in (0, 2)
    assert not tracebacks(caplog.records)


# ---------------------------------------------------------------------------
# 7. Thread and socket hygiene after a mix of all of the above
# ---------------------------------------------------------------------------


def _open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
    return count


def test_threads_and_sockets_drain_after_faults(caplog: pytest.LogCaptureFixture) -> None:
    """Many broken peers at once, some left silent until ARTIM: once they are gone,
    Server._threads is empty and the process holds no more sockets than before."""
    caplog.set_level(logging.INFO, logger="router")
    before = _open_sockets()
    rec = Recorder()
    server = Server(rec.handlers(), ae_title=AE, host="127.0.0.1", port=0, policy=POLICY,
                    artim_timeout=ARTIM).start()
    try:
        with contextlib.ExitStack() as stack:
            peers = [stack.enter_context(raw_connect(server.port)) for _ in range(24)]
            for i, sock in enumerate(peers):
                kind = i % 6
                if kind == 0:
                    continue  # silent: ARTIM
                if kind == 1:
                    sock.sendall(UNKNOWN_PDU)
                elif kind == 2:
                    sock.sendall(encode_pdu(request(called="WRONG")))
                else:
                    associate(sock)
                    if kind == 3:
                        sock.sendall(pdata(CT_CTX, command=True, last=True,
                                           data=store_command()) + USER_ABORT)
                    elif kind == 4:
                        sock.sendall(_overrunning_pdv())
                    else:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
            # The ARTIM and abort paths close from the server side...
            for sock in peers[::6]:
                assert wait_closed(sock)[0] == b""
        # ...and everything else ends once our side is closed.
        drain_threads(server)
        for _ in range(len(peers)):
            rec.next_closed()
        assert rec.closed.empty()
        with server._lock:
            assert not server._threads and not server._handlers_live
        assert_serves(server.port)
        drain_threads(server)
        assert server._accept_thread is not None and server._accept_thread.is_alive()
    finally:
        server.shutdown()
    assert not tracebacks(caplog.records)
    assert _open_sockets() <= before


def test_reset_before_accept_does_not_stop_the_server(rig: Rig) -> None:
    """A connection reset while it waits in the accept queue (a port scan, an L4 health
    check) used to kill the accept thread: getpeername() raised ENOTCONN there. Holding
    the server's registry lock parks the accept thread right after its previous accept,
    so the second connection is provably reset before it is accepted."""
    with rig.server._lock:
        first = raw_connect(rig.port)
        second = raw_connect(rig.port)
        second.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        second.close()
    first.close()
    rig.rec.next_closed()
    assert_serves(rig.port)
