"""workers.outbound: what an association for queued instances proposes, and how
opening one fails.

End to end with DCMTK's storescp (it picks Explicit VR LE from any list that has it) in
tests/runtime/test_forwarding.py, over TLS in tests/runtime/test_tls_destination.py;
here the proposal's shape and its bound.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest

from router.config import Destination
from router.dicom.negotiation import build_request
from workers.outbound import OutboundAssociation, OutboundError, instance_contexts, open_association

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
ILE, ELE, EBE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"


def test_each_held_syntax_in_a_context_of_its_own() -> None:
    """The acceptor chooses within a context, never between contexts: the held syntax
    alone is accepted wherever supported; the little endian ones are the fallback."""
    assert instance_contexts([(CT, EBE)]) == [(CT, [EBE]), (CT, [ELE, ILE])]
    assert instance_contexts([(CT, ILE)]) == [(CT, [ILE]), (CT, [ELE])]
    assert instance_contexts([(CT, ELE)]) == [(CT, [ELE]), (CT, [ILE])]


def test_compressed_alone_and_nothing_proposed_twice() -> None:
    assert instance_contexts([(CT, ILE), (CT, ELE), (MR, JPEG_LOSSLESS), (CT, EBE)]) == [
        (CT, [ELE]), (CT, [ILE]), (MR, [JPEG_LOSSLESS]), (CT, [EBE]), (CT, [ELE, ILE])]


def test_over_the_limit_the_latest_pairs_are_kept_whole() -> None:
    """The last pair is the instance about to be sent: it always fits, with its fallback;
    a pair whose contexts do not all fit is left out, not cut in half."""
    pairs = [(f"1.2.3.{n}", ELE) for n in range(70)]
    contexts = instance_contexts(pairs, limit=128)
    assert len(contexts) == 128
    assert contexts[-2:] == [("1.2.3.69", [ELE]), ("1.2.3.69", [ILE])]
    assert contexts[0] == ("1.2.3.6", [ELE])
    assert len(instance_contexts([(CT, EBE), (MR, ELE)], limit=3)) == 2


def test_a_server_name_tls_cannot_use_fails_before_connecting() -> None:
    """A name with an empty label raised UnicodeError inside asyncio after the TCP
    connect: the sender crashed and restarted every 2 s, and each try left a silent
    connection open that held up a PACS doing one handshake at a time (an outside
    campaign). The configuration refuses such names now; the sender checks too."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    request = build_request(calling_ae_title="ROUTER", called_ae_title="PACS",
                            contexts=[("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])])
    try:
        with pytest.raises(OutboundError, match="as the TLS server name"):
            asyncio.run(OutboundAssociation.open(
                "127.0.0.1", server.getsockname()[1], request, timeout=5,
                ssl_context=ssl.create_default_context(), server_hostname="pacs..example.org"))
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    finally:
        server.close()


def test_tls_files_gone_are_said_once_per_line(tmp_path: Path) -> None:
    """The log line named the destination twice: the forwarder names it already."""
    destination = Destination(name="pacs", host="127.0.0.1", port=104, ae_title="PACS",
                              tls=True, tls_ca=tmp_path / "gone.pem")
    with pytest.raises(OutboundError) as raised:
        asyncio.run(open_association(destination, [(CT, [ELE])], label="pacs#1.0"))
    assert str(raised.value).startswith(f"cannot use its TLS files ({tmp_path / 'gone.pem'})")


@pytest.mark.parametrize(("field", "value", "ok"), [
    ("affected_sop_instance_uid", "1.2.3.4.999", False),
    ("affected_sop_class_uid", "1.2.840.10008.5.1.4.1.1.4", False),
    ("affected_sop_instance_uid", None, True),   # U: may be left out
])
def test_a_c_store_response_for_another_instance_is_no_delivery(
        field: str, value: str | None, ok: bool) -> None:
    """PS3.7 Table 9.3-2: the response's Affected SOP Class and Instance UIDs equal the
    request's where present. A destination answering Success for another instance was
    taken as having ours, and the queued copy was deleted (an outside hostile-input
    campaign): now a processing failure (0110H), retried, naming what it said."""
    import dataclasses

    from router.dicom import dimse
    from workers.outbound import _checked_response

    rq = dimse.CStoreRQ(message_id=7, affected_sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        affected_sop_instance_uid="1.2.3.4")
    rsp = dataclasses.replace(dimse.CStoreRSP(
        message_id_being_responded_to=7, status=0, affected_sop_class_uid=rq.affected_sop_class_uid,
        affected_sop_instance_uid=rq.affected_sop_instance_uid), **{field: value})
    checked = _checked_response(rsp, rq)
    assert (checked is rsp) == ok
    if not ok:
        assert checked.status == 0x0110
        assert f"answered for another SOP {field.split('_')[2]}: {value}" == checked.error_comment


def test_a_context_accepted_in_a_syntax_not_offered_is_said_and_not_used(
        caplog: pytest.LogCaptureFixture) -> None:
    """A peer accepting our CT context in JPEG Baseline, which we never offered for it
    (PS3.8 9.3.3.2: it picks one of ours). The context is not used, and the log said
    nothing: the instance went to dead letters as if the peer took no CT at all."""
    import logging
    import struct

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(6)
        rq = await reader.readexactly(struct.unpack(">I", head[2:])[0])
        body = (struct.pack(">HH", 1, 0) + rq[4:36] + bytes(32)
                + item(0x10, b"1.2.840.10008.3.1.1.1")
                + item(0x21, bytes([1, 0, 0, 0]) + item(0x40, b"1.2.840.10008.1.2.4.50"))
                + item(0x50, item(0x51, struct.pack(">I", 16384))))
        writer.write(struct.pack(">BBI", 2, 0, len(body)) + body)
        await writer.drain()
        await reader.read()  # until the router closes
        writer.close()
        ended.set()

    ended = asyncio.Event()

    async def run() -> int:
        server = await asyncio.start_server(peer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        destination = Destination(name="pacs", host="127.0.0.1", port=port, ae_title="PACS")
        assoc = await open_association(destination, [(CT, [ELE])], label="pacs#1.0")
        usable = len(assoc.engine.contexts)
        assoc.abort("test over")
        await ended.wait()
        server.close()
        await server.wait_closed()
        return usable

    with caplog.at_level(logging.WARNING, logger="workers.outbound"):
        assert asyncio.run(run()) == 0
    said = [r.getMessage() for r in caplog.records]
    assert said == ["pacs#1.0 accepted presentation context 1 (CT Image Storage "
                    f"({CT})) in JPEG Baseline (Process 1) (1.2.840.10008.1.2.4.50), "
                    f"which was not offered for it (Explicit VR Little Endian ({ELE})): "
                    "not used (PS3.8 9.3.3.2)"], said
