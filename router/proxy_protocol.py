"""The PROXY protocol header a load balancer puts before a connection's own bytes.

HAProxy (``send-proxy`` / ``send-proxy-v2``), AWS NLB, F5 and others open their own
TCP connection to the router, so the router would see the balancer's address as the
peer: rules on ``peer`` and every log line would name the balancer. With the PROXY
protocol the balancer first sends one header naming the client's address, then the
client's bytes unchanged. The specification is HAProxy's ``proxy-protocol.txt``
(version 1: one text line; version 2: a binary block).

A listener with ``proxy_protocol = true`` requires the header on every connection:
a receiver must never guess whether one is there, or any client could spoof its
address by sending one (the specification, section 2). ``proxy_from`` narrows who may
send it at all.

The parser is pure (bytes in, :class:`ProxyHeader` out); :func:`read_proxy_header`
reads exactly the header from a socket and not one byte of the DICOM stream behind
it, so the association (or the TLS handshake) starts on the untouched stream.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Final

__all__ = ["V1_MAX_LENGTH", "V2_SIGNATURE", "ProxyHeader", "ProxyProtocolError",
           "parse_v1", "parse_v2", "read_proxy_header", "v2_length"]

# Version 2 starts with this signature, chosen to be invalid as any text protocol's
# first bytes (section 2.2); version 1 with "PROXY ". Both are at least 15 bytes, so
# the first 8 tell them apart without reading past a header.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
_PREFIX_LENGTH: Final = 8
V1_MAX_LENGTH: Final = 107  # "the maximum line length", CRLF included (section 2.1)
_V2_FIXED: Final = 16
# Version 2 command (low nibble of byte 13) and address family / transport (byte 14).
_LOCAL, _PROXY = 0x0, 0x1
_TCP4, _TCP6 = 0x11, 0x21
_ADDRESS_SIZES: Final = {_TCP4: 12, _TCP6: 36}
# Every family / transport byte the specification defines (section 2.2): UNSPEC,
# TCP and UDP over IPv4 and IPv6, UNIX stream and datagram. Other values "must be
# rejected as invalid by receivers".
_FAMILIES: Final = frozenset({0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32})


class ProxyProtocolError(Exception):
    """The connection does not start with a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header: ``source`` is the client's (address, port), or None when the
    header says the connection is the balancer's own (v2 LOCAL, e.g. a health
    check; v1 UNKNOWN; an address family other than TCP over IPv4/IPv6): then the
    connection's own address stands."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


def parse_v1(line: bytes) -> ProxyHeader:
    """A version 1 header: ``PROXY TCP4|TCP6 src dst sport dport\\r\\n`` or
    ``PROXY UNKNOWN ...\\r\\n``, the whole line including its CRLF."""
    if len(line) > V1_MAX_LENGTH:
        raise ProxyProtocolError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
    if not line.startswith(V1_PREFIX) or not line.endswith(b"\r\n"):
        raise ProxyProtocolError(f"not a PROXY v1 line: {line[:40]!r}")
    try:
        fields = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyProtocolError(f"PROXY v1 line is not ASCII: {line[:40]!r}") from None
    if fields[1] == "UNKNOWN":  # anything may follow; the receiver ignores it
        return ProxyHeader(1, None, None)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"malformed PROXY v1 line: {line[:-2]!r}")
    version = 4 if fields[1] == "TCP4" else 6
    source = _address(fields[2], fields[4], version)
    destination = _address(fields[3], fields[5], version)
    return ProxyHeader(1, source, destination)


def v2_length(fixed: bytes) -> int:
    """The length of the address block that follows a version 2 header's first 16
    bytes, after checking them."""
    if len(fixed) != _V2_FIXED or not fixed.startswith(V2_SIGNATURE):
        raise ProxyProtocolError("not a PROXY v2 header")
    if fixed[12] >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2 header of version {fixed[12] >> 4}")
    if fixed[12] & 0x0F not in (_LOCAL, _PROXY):
        raise ProxyProtocolError(f"PROXY v2 header with unknown command {fixed[12] & 0x0F}")
    length: int = struct.unpack_from("!H", fixed, 14)[0]
    return length


def parse_v2(fixed: bytes, block: bytes) -> ProxyHeader:
    """A version 2 header: its first 16 bytes and the address block (with any TLVs,
    which are skipped) of :func:`v2_length` bytes."""
    if len(block) != v2_length(fixed):
        raise ProxyProtocolError("PROXY v2 address block of the wrong length")
    family = fixed[13]
    if family not in _FAMILIES:
        raise ProxyProtocolError(f"PROXY v2 header with unknown address family 0x{family:02X}")
    if fixed[12] & 0x0F == _LOCAL or family not in _ADDRESS_SIZES:
        # LOCAL: the balancer's own connection (health check); an unsupported family
        # (UNIX, UDP, unspecified) "must" be accepted with the real addresses.
        return ProxyHeader(2, None, None)
    if len(block) < _ADDRESS_SIZES[family]:
        raise ProxyProtocolError(f"PROXY v2 address block of {len(block)} bytes is too "
                                 f"short for {'TCP4' if family == _TCP4 else 'TCP6'}")
    size = 4 if family == _TCP4 else 16
    src = ipaddress.ip_address(block[:size])
    dst = ipaddress.ip_address(block[size:2 * size])
    sport, dport = struct.unpack_from("!HH", block, 2 * size)
    return ProxyHeader(2, (str(src), sport), (str(dst), dport))


def _address(host: str, port: str, version: int) -> tuple[str, int]:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1 address {host!r} is not an IP address") from None
    if address.version != version:
        raise ProxyProtocolError(f"PROXY v1 address {host} is not IPv{version}")
    if not port.isdigit() or int(port) > 65535 or (len(port) > 1 and port[0] == "0"):
        raise ProxyProtocolError(f"PROXY v1 port {port!r} is not 0-65535")
    return str(address), int(port)


# ------------------------------------------------------------------ reading


async def read_proxy_header(sock: socket.socket) -> ProxyHeader:
    """Read the PROXY header at the start of ``sock`` (non-blocking) and nothing
    after it. Raises :class:`ProxyProtocolError` on anything else, including the
    connection closing first. The caller bounds the wait (ARTIM)."""
    loop = asyncio.get_running_loop()
    prefix = await _read_exactly(loop, sock, _PREFIX_LENGTH)
    if V2_SIGNATURE.startswith(prefix):
        fixed = prefix + await _read_exactly(loop, sock, _V2_FIXED - _PREFIX_LENGTH)
        block = await _read_exactly(loop, sock, v2_length(fixed))
        return parse_v2(fixed, block)
    if not prefix.startswith(V1_PREFIX):
        raise ProxyProtocolError(f"no PROXY header: the connection starts with {prefix!r}")
    line = bytearray(prefix)
    while True:
        # The line ends at its first CRLF: peek, and take what comes before it (or
        # all of it, which is then all header) without touching what follows.
        await _readable(loop, sock)
        try:
            chunk = sock.recv(V1_MAX_LENGTH - len(line) + 1, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise ProxyProtocolError(f"connection lost in the PROXY header: {exc}") from None
        if not chunk:
            raise ProxyProtocolError("connection closed in the PROXY header")
        end = (bytes(line[-1:]) + chunk).find(b"\r\n")
        take = len(chunk) if end < 0 else end + 2 - len(line[-1:])
        line += sock.recv(take)
        if end >= 0:
            return parse_v1(bytes(line))
        if b"\n" in line:  # a bare LF: the line ended, but not as the protocol says
            raise ProxyProtocolError("PROXY v1 line ends in LF without CR")
        if len(line) > V1_MAX_LENGTH:
            raise ProxyProtocolError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")


async def _read_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                        count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        try:
            chunk = await loop.sock_recv(sock, count - len(data))
        except OSError as exc:
            raise ProxyProtocolError(f"connection lost in the PROXY header: {exc}") from None
        if not chunk:
            raise ProxyProtocolError("connection closed in the PROXY header"
                                     if data else "connection closed before a PROXY header")
        data += chunk
    return bytes(data)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock, wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock)
