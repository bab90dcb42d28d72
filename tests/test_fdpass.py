"""router.fdpass: connections handed to another process over AF_UNIX SEQPACKET.

The cross-process test passes a real TCP connection (127.0.0.1) to a child started the
way the supervisor will start workers (``subprocess.Popen(..., pass_fds=[fd])``); the
child reads and writes on it. The rest run in this process, where ``/proc/self/fd``
shows that nothing leaks: surplus and truncated descriptors, bad headers, and
descriptors that are not stream sockets are all closed by the receiver. A closed
descriptor is also seen from the other side: the peer of a socketpair reads end of
file once no process holds its partner.

Nothing sleeps: every wait is a socket timeout or ``Popen.communicate(timeout=...)``.

This module is also the child: ``python -m tests.test_fdpass child FD``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from router.fdpass import (
    FDPASS_VERSION,
    MAX_HEADER_BYTES,
    BadHandoff,
    ChannelBusy,
    ChannelClosed,
    HandoffError,
    adopt_channel,
    channel_pair,
    recv_connection,
    send_connection,
)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 5.0


def _header(**changes: object) -> dict[str, object]:
    header: dict[str, object] = {
        "connection_id": 7, "peer": ("127.0.0.1", 40000), "local_port": 11112, "tls": False,
    }
    header.update(changes)
    return header


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _raw_send(channel: socket.socket, payload: bytes, fds: list[int]) -> None:
    """Send like a buggy or hostile sender: any payload, any number of descriptors."""
    socket.send_fds(channel, [payload], fds)


def _pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """n socketpairs: the ends to send, and their peers (with a timeout, to read EOF)."""
    ends, peers = [], []
    for _ in range(n):
        end, peer = socket.socketpair()
        peer.settimeout(TIMEOUT)
        ends.append(end)
        peers.append(peer)
    return ends, peers


def _assert_all_closed(peers: list[socket.socket]) -> None:
    """Each peer reads EOF: no process holds its partner any more."""
    for peer in peers:
        assert peer.recv(1) == b""
        peer.close()


@pytest.fixture
def channel() -> Iterator[tuple[socket.socket, socket.socket]]:
    sup_end, worker_end = channel_pair()
    worker_end.settimeout(TIMEOUT)
    yield sup_end, worker_end
    sup_end.close()
    worker_end.close()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Child processes of one test, killed (if still running) and reaped at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)


# ---------------------------------------------------------------- across processes


def test_connection_handed_to_child_process(
    channel: tuple[socket.socket, socket.socket], children: list[subprocess.Popen[bytes]]
) -> None:
    sup_end, worker_end = channel
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        conn, peer = listener.accept()
    fd = worker_end.fileno()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.test_fdpass", "child", str(fd)],
        cwd=ROOT, pass_fds=[fd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    children.append(proc)
    worker_end.close()  # the child holds it now

    send_connection(sup_end, conn, _header(connection_id=42, peer=peer, tls=True))
    assert conn.fileno() == -1, "the sender's copy must be closed after sending"

    with client:
        client.sendall(b"ping\n")
        reply = client.makefile("rb").readline()
        assert reply == b"pong 42 True AF_INET SOCK_STREAM\n"
        # The child closed its socket. EOF reaches us only if no other process (this
        # one included) still holds the server side of the connection.
        assert client.recv(1) == b""

    sup_end.close()  # the child's next recv_connection returns None: it exits 0
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err.decode()
    assert out == b"eof\n"


def _child(fd: int) -> int:
    """Receive one connection, answer one line on it, close it; then expect EOF."""
    channel = adopt_channel(fd)
    channel.settimeout(TIMEOUT)
    received = recv_connection(channel)
    assert received is not None
    conn, header = received
    with conn:
        conn.settimeout(TIMEOUT)
        line = conn.makefile("rb").readline()
        assert line == b"ping\n", line
        conn.sendall(
            f"pong {header['connection_id']} {header['tls']} "
            f"{conn.family.name} {conn.type.name}\n".encode()
        )
    if recv_connection(channel) is not None:
        return 1
    print("eof", flush=True)
    return 0


# ---------------------------------------------------------------- in one process


def test_channel_pair_shape() -> None:
    sup_end, worker_end = channel_pair()
    with sup_end, worker_end:
        for end in (sup_end, worker_end):
            assert end.family == socket.AF_UNIX
            assert end.type == socket.SOCK_SEQPACKET
            assert not end.get_inheritable(), "close-on-exec until pass_fds says otherwise"
        assert sup_end.gettimeout() == 0.0, "the listener never waits for a worker"
        assert worker_end.gettimeout() is None


def test_round_trip_keeps_socket_kind_and_mode(
    channel: tuple[socket.socket, socket.socket],
) -> None:
    sup_end, worker_end = channel
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        conn, peer = listener.accept()
    conn.setblocking(False)
    send_connection(sup_end, conn, _header(connection_id=3, peer=peer, local_port=1234))
    received = recv_connection(worker_end)
    assert received is not None
    got, header = received
    with got, client:
        assert header == {"connection_id": 3, "peer": peer, "local_port": 1234, "tls": False}
        assert (got.family, got.type) == (socket.AF_INET, socket.SOCK_STREAM)
        assert got.gettimeout() == 0.0, "O_NONBLOCK travels with the descriptor"
        assert not got.get_inheritable(), "received descriptors are close-on-exec"
        got.setblocking(True)
        client.sendall(b"x")
        assert got.recv(1) == b"x"


def test_eof_returns_none(channel: tuple[socket.socket, socket.socket]) -> None:
    sup_end, worker_end = channel
    sup_end.close()
    assert recv_connection(worker_end) is None


@pytest.mark.parametrize("count", [0, 3])
def test_wrong_descriptor_count_closes_all(
    channel: tuple[socket.socket, socket.socket], count: int
) -> None:
    sup_end, worker_end = channel
    ends, peers = _pairs(count)
    _raw_send(sup_end, msgpack.packb({"v": FDPASS_VERSION, **_header()}),
              [e.fileno() for e in ends])
    for end in ends:
        end.close()  # only the copies in flight remain
    before = _open_fds()
    with pytest.raises(BadHandoff, match=f"{count} descriptors received, expected 1"):
        recv_connection(worker_end)
    assert _open_fds() == before
    _assert_all_closed(peers)


def test_truncated_descriptors_closed(channel: tuple[socket.socket, socket.socket]) -> None:
    """More descriptors than the receiver has room for: MSG_CTRUNC, nothing leaks."""
    sup_end, worker_end = channel
    ends, peers = _pairs(8)
    _raw_send(sup_end, msgpack.packb({"v": FDPASS_VERSION, **_header()}),
              [e.fileno() for e in ends])
    for end in ends:
        end.close()
    before = _open_fds()
    with pytest.raises(BadHandoff, match="truncated"):
        recv_connection(worker_end)
    assert _open_fds() == before
    _assert_all_closed(peers)


def test_receiver_out_of_descriptors_says_so(
        channel: tuple[socket.socket, socket.socket]) -> None:
    """A worker at its RLIMIT_NOFILE: the kernel drops the descriptor (MSG_CTRUNC, none
    received) and the error must name the cause, not "more than 4 sent"."""
    import resource

    sup_end, worker_end = channel
    ends, peers = _pairs(1)
    _raw_send(sup_end, msgpack.packb({"v": FDPASS_VERSION, **_header()}),
              [ends[0].fileno()])
    ends[0].close()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no number left
    try:
        with pytest.raises(BadHandoff, match=rf"out of file descriptors \(limit {lowest_free}\)"):
            recv_connection(worker_end)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    _assert_all_closed(peers)


def _pack(fields: object) -> bytes:
    packed: bytes = msgpack.packb(fields)
    return packed


_GOOD = {"v": FDPASS_VERSION, "connection_id": 1, "peer": ["::1", 5], "local_port": 2,
         "tls": False}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_pack({**_GOOD, "v": 2}), "version 2"),
        (_pack({k: v for k, v in _GOOD.items() if k != "v"}), "version None"),
        (_pack({**_GOOD, "v": True}), "version True"),
        (_pack({k: v for k, v in _GOOD.items() if k != "tls"}), "lacks tls"),
        (_pack({**_GOOD, "extra": 1}), "unknown keys extra"),
        (_pack({**_GOOD, "connection_id": "1"}), "connection_id"),
        (_pack({**_GOOD, "connection_id": -1}), "connection_id"),
        (_pack({**_GOOD, "local_port": 70000}), "local_port"),
        (_pack({**_GOOD, "tls": 1}), "tls"),
        (_pack({**_GOOD, "peer": "::1"}), "peer"),
        (_pack({**_GOOD, "peer": ["::1", "5"]}), "peer"),
        (_pack([1, 2, 3]), "expected a map"),
        (b"\xc1", "not valid msgpack"),
        (_pack(_GOOD) + b"\x00", "not valid msgpack"),
        (_pack({**_GOOD, "tls": "x" * MAX_HEADER_BYTES}), "longer than"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_header_closes_descriptor(
    channel: tuple[socket.socket, socket.socket], payload: bytes, reason: str
) -> None:
    sup_end, worker_end = channel
    ends, peers = _pairs(1)
    _raw_send(sup_end, payload, [ends[0].fileno()])
    ends[0].close()
    before = _open_fds()
    with pytest.raises(BadHandoff, match=reason) as info:
        recv_connection(worker_end)
    assert "\n" not in str(info.value)
    assert _open_fds() == before
    _assert_all_closed(peers)


def test_descriptor_not_a_socket_closed(channel: tuple[socket.socket, socket.socket]) -> None:
    sup_end, worker_end = channel
    read_end, write_end = os.pipe()
    _raw_send(sup_end, _pack(_GOOD), [read_end])
    os.close(read_end)
    before = _open_fds()
    with pytest.raises(BadHandoff, match="not a socket"):
        recv_connection(worker_end)
    assert _open_fds() == before
    # No reader left anywhere: writing to the pipe fails.
    with pytest.raises(BrokenPipeError):
        os.write(write_end, b"x")
    os.close(write_end)


def test_datagram_socket_rejected(channel: tuple[socket.socket, socket.socket]) -> None:
    sup_end, worker_end = channel
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        _raw_send(sup_end, _pack(_GOOD), [udp.fileno()])
    before = _open_fds()
    with pytest.raises(BadHandoff, match="SOCK_DGRAM"):
        recv_connection(worker_end)
    assert _open_fds() == before


# ---------------------------------------------------------------- sender's errors


def test_full_channel_raises_busy_and_keeps_connection(
    channel: tuple[socket.socket, socket.socket],
) -> None:
    sup_end, worker_end = channel
    sup_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's minimum
    sent = 0
    for _ in range(1000):
        conn, peer = socket.socketpair()
        peer.close()
        try:
            send_connection(sup_end, conn, _header(connection_id=sent))
        except ChannelBusy:
            break
        sent += 1
    else:
        pytest.fail("the channel never filled up")
    assert conn.fileno() != -1, "a failed send leaves the connection with the caller"
    conn.close()
    assert sent > 0
    for n in range(sent):  # the worker catches up: everything arrives, in order
        received = recv_connection(worker_end)
        assert received is not None
        received[0].close()
        assert received[1]["connection_id"] == n


def test_closed_channel_raises_and_keeps_connection(
    channel: tuple[socket.socket, socket.socket],
) -> None:
    sup_end, worker_end = channel
    worker_end.close()
    conn, peer = socket.socketpair()
    with conn, peer:
        with pytest.raises(ChannelClosed):
            send_connection(sup_end, conn, _header())
        assert conn.fileno() != -1


@pytest.mark.parametrize(
    "header",
    [_header(v=2), _header(tls="no"), {"connection_id": 1}, _header(peer=("h",)),
     _header(extra=True)],
)
def test_invalid_header_not_sent(
    channel: tuple[socket.socket, socket.socket], header: dict[str, object]
) -> None:
    sup_end, worker_end = channel
    conn, peer = socket.socketpair()
    with conn, peer:
        with pytest.raises(BadHandoff):
            send_connection(sup_end, conn, header)
        assert conn.fileno() != -1
    worker_end.setblocking(False)
    with pytest.raises(BlockingIOError):
        recv_connection(worker_end)  # nothing was sent


def test_adopt_channel_rejects_other_sockets() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        with pytest.raises(HandoffError, match="AF_INET/SOCK_STREAM"):
            adopt_channel(tcp.fileno())
        assert tcp.fileno() != -1, "a wrong descriptor is left alone, not closed"


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "child":
        sys.exit("usage: python -m tests.test_fdpass child FD")
    sys.exit(_child(int(sys.argv[2])))
