"""router.proxy_protocol: the PROXY header parser, and the reader that takes the header
and not one byte of the association behind it.

The header bytes here are written out from HAProxy's proxy-protocol.txt (sections 2.1
and 2.2), not made by our own encoder; the end-to-end test with a real HAProxy
(``send-proxy`` and ``send-proxy-v2``) is in tests/runtime/test_proxy_listener.py.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from router.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    parse_v1,
    parse_v2,
    read_proxy_header,
    v2_length,
)

# The first bytes of an A-ASSOCIATE-RQ (PS3.8 9.3.2): what follows the header.
ASSOCIATE = b"\x01\x00\x00\x00\x00\xcd\x00\x01\x00\x00ROUTER          "


def v2(command: int, family: int, block: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(block)) + block


TCP4_BLOCK = bytes([192, 0, 2, 7, 10, 0, 0, 1]) + struct.pack("!HH", 50123, 104)
TCP6_BLOCK = (socket.inet_pton(socket.AF_INET6, "2001:db8::7")
              + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + struct.pack("!HH", 4242, 11112))


@pytest.mark.parametrize(("line", "header"), [
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 50123 104\r\n",
     ProxyHeader(1, ("192.0.2.7", 50123), ("10.0.0.1", 104))),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 11112\r\n",
     ProxyHeader(1, ("2001:db8::7", 4242), ("2001:db8::1", 11112))),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, None, None)),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", ProxyHeader(1, None, None)),
])
def test_v1_lines(line: bytes, header: ProxyHeader) -> None:
    assert parse_v1(line) == header


@pytest.mark.parametrize(("line", "why"), [
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 50123\r\n", "malformed"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 50123 104 x\r\n", "malformed"),
    (b"PROXY UDP4 192.0.2.7 10.0.0.1 50123 104\r\n", "malformed"),
    (b"PROXY TCP4 2001:db8::7 10.0.0.1 50123 104\r\n", "is not IPv4"),
    (b"PROXY TCP6 192.0.2.7 2001:db8::1 50123 104\r\n", "is not IPv6"),
    (b"PROXY TCP4 pacs.example 10.0.0.1 50123 104\r\n", "not an IP address"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 104\r\n", "not 0-65535"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 050123 104\r\n", "not 0-65535"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 -1 104\r\n", "not 0-65535"),
    (b"PROXY TCP4  192.0.2.7 10.0.0.1 50123 104\r\n", "malformed"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.1 50123 104\n", "not a PROXY v1 line"),
    (b"PROXY TCP4 \xc3\xa9 10.0.0.1 50123 104\r\n", "not ASCII"),
    (b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", "longer than 107"),
])
def test_v1_refused(line: bytes, why: str) -> None:
    with pytest.raises(ProxyProtocolError, match=why):
        parse_v1(line)


@pytest.mark.parametrize(("header", "parsed"), [
    (v2(0x1, 0x11, TCP4_BLOCK), ProxyHeader(2, ("192.0.2.7", 50123), ("10.0.0.1", 104))),
    (v2(0x1, 0x21, TCP6_BLOCK), ProxyHeader(2, ("2001:db8::7", 4242), ("2001:db8::1", 11112))),
    # TLVs after the addresses (here PP2_TYPE_AUTHORITY, 0x02) are skipped.
    (v2(0x1, 0x11, TCP4_BLOCK + b"\x02\x00\x04pacs"),
     ProxyHeader(2, ("192.0.2.7", 50123), ("10.0.0.1", 104))),
    # LOCAL (a balancer's own health check): the connection's addresses stand.
    (v2(0x0, 0x00, b""), ProxyHeader(2, None, None)),
    (v2(0x0, 0x11, TCP4_BLOCK), ProxyHeader(2, None, None)),
    # Unix sockets and UDP "must" be accepted, with the real addresses (2.2).
    (v2(0x1, 0x31, b"\x00" * 216), ProxyHeader(2, None, None)),
    (v2(0x1, 0x12, TCP4_BLOCK), ProxyHeader(2, None, None)),
])
def test_v2_headers(header: bytes, parsed: ProxyHeader) -> None:
    assert v2_length(header[:16]) == len(header) - 16
    assert parse_v2(header[:16], header[16:]) == parsed


@pytest.mark.parametrize(("fixed", "why"), [
    (V2_SIGNATURE + b"\x11\x11\x00\x0c", "of version 1"),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c", "unknown command 2"),
    (b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c", "not a PROXY v2 header"),
])
def test_v2_refused(fixed: bytes, why: str) -> None:
    with pytest.raises(ProxyProtocolError, match=why):
        v2_length(fixed)


@pytest.mark.parametrize("family", [0x77, 0x13, 0x41])
def test_v2_unknown_family_is_refused(family: int) -> None:
    """Family bytes the specification does not define "must be rejected as invalid
    by receivers" (2.2); 0x77 was taken like UNSPEC."""
    header = v2(0x1, family, TCP4_BLOCK)
    with pytest.raises(ProxyProtocolError, match=f"unknown address family 0x{family:02X}"):
        parse_v2(header[:16], header[16:])


def test_v2_address_block_too_short_for_its_family() -> None:
    header = v2(0x1, 0x21, TCP4_BLOCK)  # TCP6 says 36 bytes; 12 came
    with pytest.raises(ProxyProtocolError, match="too short for TCP6"):
        parse_v2(header[:16], header[16:])


async def _read(chunks: list[bytes], *, close: bool = False) -> tuple[ProxyHeader, bytes]:
    """Send ``chunks`` to one end of a socket pair, one at a time with a loop turn
    between them, while the other end reads the header; return it and the rest."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)

        async def feed() -> None:
            for chunk in chunks:
                theirs.sendall(chunk)
                await asyncio.sleep(0.01)
            if close:
                theirs.shutdown(socket.SHUT_WR)

        feeding = asyncio.get_running_loop().create_task(feed())
        try:
            async with asyncio.timeout(5):
                header = await read_proxy_header(ours)
        finally:
            await feeding
        rest = b""
        while True:
            try:
                rest += ours.recv(4096)
            except BlockingIOError:
                break
        return header, rest


@pytest.mark.parametrize("split", [
    [b"PROXY TCP4 192.0.2.7 10.0.0.1 50123 104\r\n" + ASSOCIATE],
    # In pieces, the CR and LF in different reads, the association right behind.
    [b"PRO", b"XY TCP4 192.0.2.7", b" 10.0.0.1 50123 104\r", b"\n" + ASSOCIATE],
    [b"PROXY TCP4 192.0.2.7 10.0.0.1 50123 104", b"\r\n", ASSOCIATE],
])
def test_reader_takes_a_v1_line_and_nothing_after_it(split: list[bytes]) -> None:
    header, rest = asyncio.run(_read(split))
    assert header.source == ("192.0.2.7", 50123)
    assert rest == ASSOCIATE


@pytest.mark.parametrize("cut", [1, 8, 12, 16, 20])
def test_reader_takes_a_v2_header_and_nothing_after_it(cut: int) -> None:
    header = v2(0x1, 0x11, TCP4_BLOCK + b"\x02\x00\x04pacs")
    parsed, rest = asyncio.run(_read([header[:cut], header[cut:] + ASSOCIATE]))
    assert parsed.source == ("192.0.2.7", 50123)
    assert rest == ASSOCIATE


@pytest.mark.parametrize(("chunks", "why"), [
    ([ASSOCIATE], "no PROXY header: the connection starts with"),
    ([b"PROXY TCP4 " + b"1" * 120], "longer than 107"),
    # Ended by a bare LF: it was reported as too long, once the PDU behind filled it.
    ([b"PROXY TCP4 192.0.2.7 10.0.0.1 50123 104\n" + ASSOCIATE], "ends in LF without CR"),
    ([b"PROXY TCP4 192.0.2.7 10.0."], "connection closed in the PROXY header"),
    ([b""], "connection closed before a PROXY header"),
    ([V2_SIGNATURE + b"\x21\x11\x00\x0c" + TCP4_BLOCK[:5]], "closed in the PROXY header"),
])
def test_reader_refuses(chunks: list[bytes], why: str) -> None:
    with pytest.raises(ProxyProtocolError, match=why):
        asyncio.run(_read(chunks, close=True))
