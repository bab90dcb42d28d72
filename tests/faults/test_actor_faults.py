"""Hostile and broken peers against the worker's AssociationActor, byte for byte.

The PDUs are built here with ``struct`` and the command sets with pydicom, not with
the router's encoder, and several are sent in one write so that the engine has read
them all before the actor answers the first: the case where an A-ABORT or a stray
PDU behind a request made that request stale.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset

from tests.workers.test_actor import LoopServer
from workers.spool import GroupCommitter

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT = "1.2.840.10008.1.2"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LoopServer]:
    srv = LoopServer(tmp_path / "spool")
    yield srv
    srv.stop()


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(called: str = "ROUTER", abstract: str = VERIFICATION, *,
                 contexts: int = 1, syntaxes: int = 1, user_items: int = 0) -> bytes:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2) with ``contexts`` presentation contexts (IDs 1, 3,
    ... then again from 1), each proposing Implicit VR LE ``syntaxes`` times, and
    ``user_items`` extra SCP/SCU role selection sub-items."""
    context = b"".join(
        _item(0x20, bytes([(2 * n + 1) % 256, 0, 0, 0]) + _item(0x30, abstract.encode())
              + _item(0x40, IMPLICIT.encode()) * syntaxes)
        for n in range(contexts))
    roles = _item(0x54, struct.pack(">H", len(abstract)) + abstract.encode() + b"\x01\x00")
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4")
                 + roles * user_items)
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + b"HOSTILE".ljust(16)
            + bytes(32) + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    return struct.pack(">BBI", 1, 0, len(body)) + body


def _data_set(**elements: object) -> bytes:
    """A data set in Implicit VR Little Endian, by pydicom."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = BytesIO()
    write_dataset(_fp(body), ds)
    return body.getvalue()


# A private OB element of 100 KB: what follows it is past the identity's 64 KiB.
_BULK = struct.pack("<HHI", 0x0009, 0x1001, 100_000) + bytes(100_000)

RELEASE_RQ = struct.pack(">BBI", 5, 0, 4) + bytes(4)
ABORT = struct.pack(">BBI", 7, 0, 4) + bytes(4)


def command(**elements: object) -> bytes:
    """A command set (PS3.7 6.3.1) in Implicit VR Little Endian, by pydicom."""
    body = BytesIO(_data_set(**elements))
    group = Dataset()
    group.CommandGroupLength = len(body.getvalue())
    head = BytesIO()
    write_dataset(_fp(head), group)
    return head.getvalue() + body.getvalue()


def _fp(buffer: BytesIO) -> object:
    from pydicom.filebase import DicomFileLike
    fp = DicomFileLike(buffer)
    fp.is_little_endian, fp.is_implicit_VR = True, True
    return fp


def p_data(data: bytes, *, is_command: bool = True, last: bool = True) -> bytes:
    """One P-DATA-TF with one PDV on context 1 (PS3.8 9.3.5, Annex E.2)."""
    pdv = struct.pack(">IBB", len(data) + 2, 1, int(is_command) | (int(last) << 1)) + data
    return struct.pack(">BBI", 4, 0, len(pdv)) + pdv


ECHO_RQ = command(AffectedSOPClassUID=VERIFICATION, CommandField=0x0030, MessageID=1,
                  CommandDataSetType=0x0101)


def associated(port: int, abstract: str = VERIFICATION) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq(abstract=abstract))
    assert read_pdu(sock)[0] == 0x02, "A-ASSOCIATE-AC"
    return sock


def answers_until_not_data(port: int, abstract: str, payload: bytes) -> list[tuple[int, bytes]]:
    """Associate on ``abstract``, send ``payload`` in one write, and read every PDU
    (type, body) up to and including the first that is not a P-DATA-TF."""
    return answers_from(port, associate_rq(abstract=abstract), payload)


def answers_from(port: int, rq: bytes, payload: bytes) -> list[tuple[int, bytes]]:
    """:func:`answers_until_not_data` with the A-ASSOCIATE-RQ ``rq`` as given."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(rq)
        assert read_pdu(sock)[0] == 0x02, "A-ASSOCIATE-AC"
        sock.sendall(payload)
        pdus = [read_pdu(sock)]
        while pdus[-1][0] == 0x04:
            pdus.append(read_pdu(sock))
    return pdus


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = _read(sock, 6)
    if not header:
        return 0, b""
    kind, _, length = struct.unpack(">BBI", header)
    return kind, _read(sock, length)


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return data
        data += chunk
    return data


def response(body: bytes) -> Dataset:
    """The command set in a P-DATA-TF's only PDV."""
    from pydicom.filereader import read_dataset
    return read_dataset(BytesIO(body[6:]), is_implicit_VR=True, is_little_endian=True)


def response_status(body: bytes) -> int:
    """The Status (0000,0900) of the command set in a P-DATA-TF's only PDV."""
    return int(response(body).Status)


def store_rq(message_id: int, sop_instance_uid: str, *, with_data_set: bool = True) -> bytes:
    """A C-STORE-RQ command set for a CT instance (PS3.7 9.3.1.1)."""
    return command(AffectedSOPClassUID=CT, CommandField=0x0001, MessageID=message_id,
                   Priority=0, CommandDataSetType=0x0000 if with_data_set else 0x0101,
                   AffectedSOPInstanceUID=sop_instance_uid)


def released(sock: socket.socket) -> None:
    """Release the association (A-RELEASE-RQ, RP expected) and close the socket."""
    sock.sendall(RELEASE_RQ)
    assert read_pdu(sock)[0] == 0x06
    sock.close()


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    with caplog.at_level(logging.INFO):
        yield
    bad = [r for r in caplog.records if r.exc_info or r.name == "asyncio"]
    assert not bad, "\n".join(r.getMessage() for r in bad)


@pytest.mark.parametrize("tail", [
    pytest.param(RELEASE_RQ + ABORT, id="release+abort"),
    pytest.param(p_data(ECHO_RQ) + RELEASE_RQ + ABORT, id="echo+release+abort"),
    pytest.param(p_data(ECHO_RQ) + ABORT, id="echo+abort"),
    pytest.param(RELEASE_RQ + RELEASE_RQ, id="release twice"),
    pytest.param(RELEASE_RQ + p_data(ECHO_RQ), id="release+p-data"),
])
def test_an_association_ended_behind_a_request_closes_cleanly(
        server: LoopServer, tail: bytes, no_tracebacks: None) -> None:
    sock = associated(server.port)
    sock.sendall(tail)
    while read_pdu(sock)[0] not in (0, 0x06, 0x07):
        pass  # an answer to the echo, say; then A-RELEASE-RP, A-ABORT or the close
    sock.close()  # as a peer does on either (PS3.8 Sta13 waits for it, or ARTIM)
    actor = server.wait_closed(1)[0]
    assert actor.stats.outcome.startswith(("aborted", "released")), actor.stats.outcome


@pytest.mark.parametrize("tail", [
    pytest.param(p_data(ECHO_RQ), id="p-data"),
    pytest.param(RELEASE_RQ, id="release"),
    pytest.param(b"\x42", id="garbage byte"),
    pytest.param(associate_rq(), id="second request"),
])
def test_a_pdu_behind_the_request_gets_an_a_abort(server: LoopServer, tail: bytes,
                                                  no_tracebacks: None) -> None:
    """PS3.8 Table 9-10, Sta3: any PDU before our answer is AA-8, an A-ABORT."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(associate_rq() + tail)
        assert read_pdu(sock)[0] == 0x07  # and nothing before it
    server.wait_closed(1)


def test_an_invalid_request_is_answered_and_the_association_goes_on(
        server: LoopServer, no_tracebacks: None) -> None:
    """PS3.7 Annex C: a command set the router cannot use still gets a response."""
    sock = associated(server.port, abstract=CT)
    # A C-STORE whose SOP Instance UID is not a UID (DCMTK sends these as given).
    bad = store_rq(7, "1.2.3.4a")
    sock.sendall(p_data(bad) + p_data(b"\x08\x00\x18\x00\x00\x00\x00\x00", is_command=False))
    kind, body = read_pdu(sock)
    assert kind == 0x04
    status = response_status(body)
    assert status & 0xF000 in (0xA000, 0xC000) or status in (0x0211, 0x0212), hex(status)
    # The association is still there. A C-ECHO on the CT context is refused: a context
    # carries its own abstract syntax only (PS3.8 7.1.1.13), 0122H.
    echo = command(AffectedSOPClassUID=VERIFICATION, CommandField=0x0030, MessageID=8,
                   CommandDataSetType=0x0101)
    sock.sendall(p_data(echo))
    kind, body = read_pdu(sock)
    assert kind == 0x04 and response_status(body) == 0x0122
    released(sock)
    assert server.wait_closed(1)[0].stats.instances == 0


def test_an_unknown_command_field_aborts(server: LoopServer, no_tracebacks: None) -> None:
    """No response type exists to answer it, and the peer would wait for ever."""
    sock = associated(server.port)
    sock.sendall(p_data(command(AffectedSOPClassUID=VERIFICATION, CommandField=0x0FF0,
                                MessageID=1, CommandDataSetType=0x0101)))
    assert read_pdu(sock)[0] == 0x07
    sock.close()
    assert "unknown command field" in server.wait_closed(1)[0].stats.outcome


def test_c_store_without_a_data_set_is_refused_and_leaks_nothing(
        server: LoopServer, no_tracebacks: None) -> None:
    """PS3.7 9.3.1.1: a C-STORE-RQ carries its instance. 200 of them without one each
    get C000H; no spool file stays open (it used to leak a descriptor each)."""
    fds = len(os.listdir("/proc/self/fd"))
    sock = associated(server.port, abstract=CT)
    for mid in range(1, 201):
        sock.sendall(p_data(store_rq(mid, f"1.2.3.{mid}", with_data_set=False)))
        kind, body = read_pdu(sock)
        assert kind == 0x04 and response_status(body) == 0xC000
    released(sock)
    actor = server.wait_closed(1)[0]
    assert actor.stats.instances == 0 and actor.stats.failed == 200
    assert len(os.listdir("/proc/self/fd")) <= fds + 2  # the loop's own, give or take


def test_a_peer_that_never_reads_cannot_fill_the_worker_memory(server: LoopServer) -> None:
    """Requests whose responses the peer never reads: once our send buffer is past
    its high-water mark the router stops reading, and TCP holds the peer back. It
    used to read on and queue every response (200 MB of C-ECHO-RQ: +216 MB RSS)."""
    sock = associated(server.port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    batch = p_data(ECHO_RQ) * 10_000  # 0.9 MB
    sock.settimeout(2)
    sent = 0
    with contextlib.suppress(TimeoutError):
        while sent < 64 << 20:
            sock.sendall(batch)
            sent += len(batch)
    actor = server.actors[0]
    assert actor.transport is not None
    buffered = actor.transport.get_write_buffer_size()
    # Bounded by the answers to one read (RECV_BUFFER, 1 MiB of requests) past the
    # transport's high-water mark: a few MiB at most, whatever the peer sends.
    assert buffered < 4 << 20, (sent, buffered)
    assert sent < 32 << 20, sent  # what the sockets hold, not what the router queued
    sock.close()
    server.wait_closed(1)


@pytest.mark.parametrize(("shape", "accepted"), [
    pytest.param({"contexts": 128, "syntaxes": 40, "user_items": 128}, True, id="the most"),
    pytest.param({"contexts": 129}, False, id="129 contexts"),
    # (Under the 256 KiB cap on the PDU: a longer one is refused at its header.)
    pytest.param({"contexts": 5_000}, False, id="5k contexts"),
    # An item's length has 16 bits: ~3,000 sub-items fit in a context or user info.
    pytest.param({"syntaxes": 3_000}, False, id="3k transfer syntaxes"),
    pytest.param({"user_items": 2_000}, False, id="2k role selections"),
])
def test_a_request_of_countless_items_is_refused_at_once(
        server: LoopServer, shape: dict[str, int], accepted: bool,
        no_tracebacks: None) -> None:
    """PS3.8 9.3.2.2: context IDs are odd, 1-255, so 128 contexts at most. A request of
    ~230,000 tiny contexts (under the 4 MiB cap of the time) used to be decoded and answered item by
    item, blocking a worker's loop for seconds: several at once starved its heartbeat
    and the supervisor killed it with every association on it."""
    rq = associate_rq(**shape)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(rq)
        kind, _ = read_pdu(sock)
    assert kind == (0x02 if accepted else 0x07), hex(kind)
    actor = server.wait_closed(1)[0]
    if not accepted:
        assert "more than" in actor.stats.outcome, actor.stats.outcome


@pytest.fixture
def idle_server(tmp_path: Path) -> Iterator[LoopServer]:
    srv = LoopServer(tmp_path / "spool", idle=1.0)
    yield srv
    srv.stop()


def _until_abort(sock: socket.socket, every: float, send: bytes) -> float:
    """Send ``send`` every ``every`` s until the router aborts; seconds it took."""
    import time
    started = time.monotonic()
    sock.settimeout(every)
    while time.monotonic() - started < 10:
        try:
            kind, _ = read_pdu(sock)
        except TimeoutError:
            sock.sendall(send)
            continue
        if kind in (0, 0x07):
            return time.monotonic() - started
    raise AssertionError("not aborted in 10 s")


def test_a_silent_peer_is_aborted_after_the_idle_timeout(idle_server: LoopServer) -> None:
    sock = associated(idle_server.port)
    took = _until_abort(sock, 5.0, b"")
    sock.close()
    assert 0.9 < took < 3.0, took
    assert "no whole PDU" in idle_server.wait_closed(1)[0].stats.outcome


def test_a_peer_trickling_bytes_is_idle_all_the_same(idle_server: LoopServer) -> None:
    """One byte of a PDU every 0.3 s re-armed the idle timer for ever: 40 such peers
    held every association slot. Only whole PDUs count as activity now."""
    sock = associated(idle_server.port)
    pdu = iter(p_data(ECHO_RQ) * 100)
    took = _until_abort(sock, 0.3, bytes([next(pdu)]))
    sock.close()
    assert took < 3.0, took
    assert "no whole PDU" in idle_server.wait_closed(1)[0].stats.outcome


def test_a_peer_sending_requests_is_not_idle(idle_server: LoopServer) -> None:
    import time
    sock = associated(idle_server.port)
    started = time.monotonic()
    while time.monotonic() - started < 3.0:  # three idle timeouts
        sock.sendall(p_data(ECHO_RQ))
        assert read_pdu(sock)[0] == 0x04
        time.sleep(0.4)
    released(sock)
    assert idle_server.wait_closed(1)[0].stats.outcome == "released"


@pytest.mark.parametrize(("data", "status", "comment"), [
    pytest.param(_data_set(SOPClassUID=CT, SOPInstanceUID="1.2.3.999", PatientID="X"),
                 0xA900, "the data set's SOP Instance UID is 1.2.3.999", id="other instance"),
    pytest.param(_data_set(SOPClassUID="1.2.840.10008.5.1.4.1.1.4", SOPInstanceUID="1.2.3.7"),
                 0xA900, "the data set's SOP Class UID is 1.2.840.10008.5.1.4.1.1.4",
                 id="other class"),
    pytest.param(_data_set(PatientID="X", PatientName="NO^UIDS"), 0xC000,
                 "the data set has no SOP Class UID", id="no uids"),
    pytest.param(b"%PDF-1.4 this is not a data set" * 40, 0xC000, "the data set ",
                 id="garbage"),
    pytest.param(b"\x08\x00\x16\x00\xff\x00\x00\x00" + b"1.2" * 8, 0xC000,
                 "the data set ends inside an element", id="truncated"),
    # Broken past the first 64 KiB, where the UIDs were found well-formed: such data
    # sets used to be acknowledged, for every destination to refuse (or crash on).
    pytest.param(_data_set(SOPClassUID=CT, SOPInstanceUID="1.2.3.7") + _BULK
                 + struct.pack("<HHI", 0x7FE0, 0x0010, 200_000) + bytes(100_000), 0xC000,
                 "the data set ends inside an element", id="truncated-late"),
    pytest.param(_data_set(SOPClassUID=CT, SOPInstanceUID="1.2.3.7") + _BULK
                 + struct.pack("<HHI", 0x0040, 0x0275, 0xFFFFFFFF)
                 + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
                 + struct.pack("<HHI", 0x0040, 0x0009, 4) + b"SPS1", 0xC000,
                 "the data set ends inside a sequence that is never closed",
                 id="unclosed-sequence-late"),
    pytest.param(_data_set(SOPClassUID=CT, SOPInstanceUID="1.2.3.7") + _BULK
                 + struct.pack("<HHI", 0x0040, 0x0275, 0xFFFFFFFF)
                 + struct.pack("<HHI", 0x0040, 0x0009, 4) + b"SPS1"
                 + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), 0xC000,
                 "the data set does not parse: expected an item, found (0040,0009)",
                 id="no-item-late"),
    # Sequences 200 deep (a sequence bomb): refused as it arrives; it was decoded by
    # pydicom at commit and answered 0110H, a failure the sender may retry for ever.
    pytest.param(_data_set(SOPClassUID=CT, SOPInstanceUID="1.2.3.7")
                 + (struct.pack("<HHI", 0x0040, 0x0275, 0xFFFFFFFF)
                    + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)) * 200, 0xC000,
                 "the data set does not parse: sequences nested deeper than 64",
                 id="sequence-bomb"),
])
def test_a_data_set_that_is_not_the_instance_named_is_refused(
        server: LoopServer, no_tracebacks: None, data: bytes, status: int,
        comment: str) -> None:
    """PS3.4 B.2.3, as DCMTK's storescp answers: a data set naming another instance or
    SOP class is A900H, one that is no data set or lacks the UIDs C000H; nothing of it
    is kept. The association goes on: the next, good, instance is stored."""
    sock = associated(server.port, abstract=CT)
    sock.sendall(p_data(store_rq(1, "1.2.3.7")) + p_data(data[:20], is_command=False, last=False)
                 + p_data(data[20:], is_command=False))
    kind, body = read_pdu(sock)
    assert kind == 0x04 and response_status(body) == status
    said = str(response(body).get("ErrorComment", ""))
    assert said.startswith(comment), said
    good = _data_set(SOPClassUID=CT, SOPInstanceUID="1.2.3.8", PatientID="OK")
    sock.sendall(p_data(store_rq(2, "1.2.3.8")) + p_data(good, is_command=False))
    kind, body = read_pdu(sock)
    assert kind == 0x04 and response_status(body) == 0x0000
    released(sock)
    actor = server.wait_closed(1)[0]
    assert actor.stats.instances == 1 and actor.stats.failed == 1
    stored = sorted((server.spool.root / "incoming").iterdir())
    assert len(stored) == 1 and stored[0].read_bytes().endswith(good)
    assert [p.name for p in (server.spool.root / "tmp").iterdir()
            if p.stat().st_size] == []


STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


@pytest.mark.parametrize(("field", "abstract"), [
    pytest.param(0x0020, STUDY_FIND, id="C-FIND"),
    pytest.param(0x0021, "1.2.840.10008.5.1.4.1.2.2.2", id="C-MOVE"),
    pytest.param(0x0010, "1.2.840.10008.5.1.4.1.2.2.3", id="C-GET"),
])
def test_a_query_without_an_identifier_is_refused_at_once(
        server: LoopServer, no_tracebacks: None, field: int, abstract: str) -> None:
    """PS3.7 9.1.2.1 (and 9.1.3.1, 9.1.4.1): the Identifier is mandatory. A request
    without one (CommandDataSetType 0101H) gets C000H at once. It used to get no answer,
    and the next data set on the association (another request's: a C-STORE's patient
    data) was taken for its identifier and sent upstream as a query."""
    sock = associated(server.port, abstract=abstract)
    extra = {"MoveDestination": "VIEWER"} if field == 0x0021 else {}
    sock.sendall(p_data(command(AffectedSOPClassUID=abstract, CommandField=field,
                                MessageID=7, Priority=0, CommandDataSetType=0x0101,
                                **extra)))
    kind, body = read_pdu(sock)
    assert kind == 0x04
    answer = response(body)
    assert (answer.MessageIDBeingRespondedTo, answer.Status) == (7, 0xC000)
    assert answer.ErrorComment == "request without an identifier"
    released(sock)


@pytest.mark.parametrize(("identifier", "said"), [
    pytest.param(_data_set(QueryRetrieveLevel="STUDY", PatientID="x" * (1 << 20)),
                 "identifier larger than 1048576 bytes", id="too-large"),
    pytest.param(b"\x08\x00\x52\x00\xff\xff\x00\x00STUDY", "identifier does not decode: ",
                 id="undecodable"),
])
def test_a_query_refused_for_its_identifier_says_why_in_the_log(
        server: LoopServer, no_tracebacks: None, caplog: pytest.LogCaptureFixture,
        identifier: bytes, said: str) -> None:
    """C000H with the reason as Error Comment, and one log line naming the association
    and the reason: there was none, and the operator could not tell why a viewer's
    query failed."""
    sock = associated(server.port, abstract=STUDY_FIND)
    sock.sendall(p_data(command(AffectedSOPClassUID=STUDY_FIND, CommandField=0x0020,
                                MessageID=9, Priority=0, CommandDataSetType=0x0000)))
    step = 60_000  # fragments within the router's maximum PDU length
    for start in range(0, len(identifier), step):
        sock.sendall(p_data(identifier[start : start + step], is_command=False,
                            last=start + step >= len(identifier)))
    kind, body = read_pdu(sock)
    assert kind == 0x04
    answer = response(body)
    assert (answer.MessageIDBeingRespondedTo, answer.Status) == (9, 0xC000)
    assert str(answer.ErrorComment).startswith(said[:40])
    released(sock)
    lines = [r.getMessage() for r in caplog.records if "C-FIND 9 refused" in r.getMessage()]
    assert len(lines) == 1 and f"refused with 0xC000: {said}" in lines[0], \
        [r.getMessage() for r in caplog.records]


def test_a_c_store_from_a_requestor_that_took_the_scp_role_only_is_refused(
        server: LoopServer, no_tracebacks: None) -> None:
    """PS3.7 D.3.3.4: with SCP/SCU role selection SCU=0, SCP=1 for CT accepted, the
    requestor may not invoke C-STORE on it. It gets 0122H and nothing is stored; it
    used to be stored."""
    request = bytearray(associate_rq(abstract=CT, user_items=1))
    # The role selection sub-item ends the PDU: SCU role 0, SCP role 1.
    request[-2:] = b"\x00\x01"
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(bytes(request))
    assert read_pdu(sock)[0] == 0x02
    sock.sendall(p_data(store_rq(1, "1.2.3.4")) + p_data(_data_set(
        SOPClassUID=CT, SOPInstanceUID="1.2.3.4"), is_command=False))
    kind, body = read_pdu(sock)
    assert kind == 0x04 and response_status(body) == 0x0122
    released(sock)
    actor = server.wait_closed(1)[0]
    assert (actor.stats.instances, actor.stats.failed) == (0, 1)
    assert not list(server.spool.root.rglob("*.dcm"))


@pytest.mark.parametrize("fragment", [2, 4])
def test_a_data_set_in_thousands_of_tiny_fragments_is_stored(
        server: LoopServer, no_tracebacks: None, fragment: int) -> None:
    """PS3.8 9.3.5 leaves the size of each PDV to the sender, and CTN's send_image
    sends about one per element. Arriving together, more than 1,024 of them went to
    one writev, which Linux refuses past IOV_MAX (EINVAL): 0110H, nothing kept.
    Here 2-byte and 4-byte fragments, 100 PDVs to a P-DATA-TF, all sent at once."""
    data = _data_set(SOPClassUID=CT, SOPInstanceUID="1.2.3.9", PatientID="TINY",
                     ReferencedImageSequence=[_referenced(n) for n in range(150)])
    pieces = [data[i:i + fragment] for i in range(0, len(data), fragment)]
    assert len(pieces) > 1024 * 2
    pdvs = [struct.pack(">IBB", len(piece) + 2, 1, 2 if n == len(pieces) - 1 else 0) + piece
            for n, piece in enumerate(pieces)]
    pdus = b"".join(
        struct.pack(">BBI", 4, 0, sum(map(len, pdvs[k:k + 100]))) + b"".join(pdvs[k:k + 100])
        for k in range(0, len(pdvs), 100))
    sock = associated(server.port, abstract=CT)
    sock.sendall(p_data(store_rq(1, "1.2.3.9")) + pdus)
    kind, body = read_pdu(sock)
    assert kind == 0x04 and response_status(body) == 0x0000
    released(sock)
    (stored,) = (server.spool.root / "incoming").iterdir()
    assert stored.read_bytes().endswith(data)


@pytest.mark.parametrize("control", [0x01, 0x00])  # command, data set: not the last
def test_empty_fragments_are_refused_with_an_abort(server: LoopServer, no_tracebacks: None,
                                                   control: int) -> None:
    """A fragment that is not a message's last carries data (PS3.8 9.3.5.1). Empty
    command fragments were kept one object each, outside the command-set bound: a
    peer grew a worker's memory 1.3 MB per MiB sent, without limit, and empty data
    fragments cost 0.8 s of its loop per MiB (an outside campaign)."""
    sock = associated(server.port, abstract=CT)
    if control == 0x00:  # a data set needs its command first
        sock.sendall(p_data(store_rq(1, "1.2.3.10")))
    empty = struct.pack(">IBB", 2, 1, control)
    sock.sendall(struct.pack(">BBI", 4, 0, len(empty) * 1000) + empty * 1000)
    kind, body = read_pdu(sock)
    assert kind == 0x07 and body[2:4] == b"\x02\x06", body  # A-ABORT, provider, reason 6
    sock.close()
    actor = server.wait_closed(1)[0]
    assert actor.stats.instances == 0
    assert not list((server.spool.root / "incoming").iterdir())


def _referenced(n: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CT
    item.ReferencedSOPInstanceUID = f"1.2.3.9.{n}"
    return item


def test_an_association_request_too_long_to_be_real_is_aborted_at_its_header(
        server: LoopServer, no_tracebacks: None) -> None:
    """Anyone may connect, and a peer not yet associated made the worker hold what its
    A-ASSOCIATE-RQ's length promised, up to 4 MiB: 300 connections that never sent
    the last byte held 1.2 GB until ARTIM. Past 256 KiB the header is enough for an
    A-ABORT (PS3.8 9.3.8), before any of the body arrives."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(struct.pack(">BBI", 1, 0, (256 << 10) + 1))
        kind, _ = read_pdu(sock)
    assert kind == 0x07, hex(kind)  # Sta2 + Evt19: AA-1 (PS3.8 Table 9-10)
    actor = server.wait_closed(1)[0]
    assert "exceeds the limit 262144" in actor.stats.outcome, actor.stats.outcome


def test_a_release_in_the_middle_of_a_c_store_says_what_it_dropped(
        server: LoopServer, caplog: pytest.LogCaptureFixture, no_tracebacks: None) -> None:
    """C-STORE-RQ, half its data set, then A-RELEASE-RQ: released, nothing kept (the
    sender was never told it was), but the only line was "closed: released, 0
    instances": an operator looking for the instance could not tell it ever came."""
    data = _data_set(SOPClassUID=CT, SOPInstanceUID="1.2.3.10", PatientID="HALF")
    sock = associated(server.port, abstract=CT)
    sock.sendall(p_data(store_rq(7, "1.2.3.10"))
                 + p_data(data[:20], is_command=False, last=False))
    released(sock)
    actor = server.wait_closed(1)[0]
    assert actor.stats.failed == 1 and actor.stats.instances == 0
    said = [r.getMessage() for r in caplog.records if "discarded" in r.getMessage()]
    assert len(said) == 1 and "C-STORE 7 1.2.3.10 discarded before its data set ended: " \
        "the peer released the association" in said[0], said
    assert not any((server.spool.root / "incoming").iterdir())


class _GatedCommitter:
    """The spool's committer, holding each commit until ``gate`` is set: the time a
    big instance's fsync takes, made as long as the test needs."""

    def __init__(self, inner: GroupCommitter) -> None:
        self.inner = inner
        self.entered, self.gate = threading.Event(), threading.Event()

    def submit(self, writer: Any, route: Any = None) -> concurrent.futures.Future[Any]:
        out: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def commit() -> None:
            self.entered.set()
            self.gate.wait(10)
            done = self.inner.submit(writer, route)
            done.add_done_callback(lambda f: out.set_exception(exc) if (
                exc := f.exception()) is not None else out.set_result(f.result()))

        threading.Thread(target=commit, daemon=True).start()
        return out

    def close(self) -> None:
        self.gate.set()
        self.inner.close()


def test_an_abort_right_behind_a_whole_data_set_closes_after_its_commit(
        server: LoopServer, caplog: pytest.LogCaptureFixture, no_tracebacks: None) -> None:
    """C-STORE-RQ and its whole data set, then A-ABORT while the commit runs. The
    instance is complete and kept (and forwarded), but the association's closing line
    came first, "0 instances", and the worker counted the association gone (a drain
    could end with the commit under way). It closes once the commit is done, counts
    the instance, and its line says the sender was never told."""
    gated = _GatedCommitter(server.committer)
    server.committer = gated  # type: ignore[assignment]
    data = _data_set(SOPClassUID=CT, SOPInstanceUID="1.2.3.11", PatientID="WHOLE")
    sock = associated(server.port, abstract=CT)
    sock.sendall(p_data(store_rq(3, "1.2.3.11")) + p_data(data, is_command=False))
    assert gated.entered.wait(10)
    sock.sendall(ABORT)
    assert read_pdu(sock) == (0, b"")  # the router closed the connection
    sock.close()
    gated.gate.set()
    actor = server.wait_closed(1)[0]
    assert actor.stats.instances == 1 and actor.stats.failed == 0, actor.stats
    said = [r.getMessage() for r in caplog.records]
    stored = next(i for i, line in enumerate(said) if "C-STORE" in line and "1.2.3.11" in line)
    closed = next(i for i, line in enumerate(said) if " closed: " in line)
    assert stored < closed, said
    assert "not answered: the association ended first" in said[stored], said[stored]
    assert "1 instances" in said[closed], said[closed]
