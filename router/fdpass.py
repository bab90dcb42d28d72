"""Hand an accepted TCP connection to a worker process (DESIGN.md D2).

Theory of operation
-------------------
ZeroMQ cannot carry sockets, so the listener passes each accepted connection's
file descriptor (``SCM_RIGHTS`` ancillary data, unix(7)) over an AF_UNIX
``SOCK_SEQPACKET`` channel, one per worker, made by :func:`channel_pair` before
the worker is spawned. Each hand-off is one datagram: a small msgpack header
(:data:`FDPASS_VERSION`, connection id, peer address, local port, TLS flag) and
exactly one descriptor. SEQPACKET keeps message boundaries, so a header is never
split or glued to the next one, and it is connection-oriented, so either side
sees the other's death (``EPIPE`` / end of file).

Ownership is the whole point of this module:

- :func:`send_connection` closes the sender's copy of the connection as soon
  as the descriptor is in the channel. The worker owns the connection from then
  on; a listener that kept its copy would keep the TCP connection alive after
  the worker closed it (the peer would never see end of file) and could read or
  write bytes that belong to the worker's association. When the send fails
  (:class:`ChannelBusy`, :class:`ChannelClosed`, :class:`BadHandoff`) nothing
  was passed and the caller still owns the connection: try another worker or
  close it.
- :func:`recv_connection` leaks nothing whatever arrives: with more than one
  descriptor, a truncated control message (``MSG_CTRUNC``: more descriptors
  than we left room for; the kernel drops those that did not fit), a truncated
  or invalid header, or a descriptor that is not a stream socket, every
  descriptor received is closed before :class:`BadHandoff` is raised.
  Received descriptors are close-on-exec (``MSG_CMSG_CLOEXEC``), like every
  descriptor Python creates (PEP 446).

We call ``sendmsg``/``recvmsg`` directly rather than ``socket.send_fds`` /
``socket.recv_fds`` (which are thin wrappers over them): in CPython 3.11 both
ignore their ``flags`` argument, and we need ``MSG_NOSIGNAL`` and
``MSG_CMSG_CLOEXEC``.

The listener never waits for a worker: its end of each channel is non-blocking
(:func:`channel_pair` makes it so), and a full channel raises
:class:`ChannelBusy` at once so the listener can pick another worker.

Spawning a worker (the supervisor's side)::

    sup_end, worker_end = channel_pair()
    fd = worker_end.fileno()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.main", "--channel-fd", str(fd), ...],
        pass_fds=[fd],          # the child gets this descriptor, same number, inheritable
    )
    worker_end.close()          # only the child holds it now: EOF/EPIPE mean "worker gone"

and in the worker, ``channel = adopt_channel(args.channel_fd)``. Both ends are
created close-on-exec (PEP 446); ``pass_fds`` clears the flag in the child only,
so no other child of the supervisor inherits any channel, and the worker is a
clean interpreter (no fork of the supervisor's state), as ``workers.main`` expects.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import resource
import socket
from collections.abc import Mapping
from typing import Final

import msgpack

__all__ = [
    "FDPASS_VERSION",
    "MAX_HEADER_BYTES",
    "BadHandoff",
    "ChannelBusy",
    "ChannelClosed",
    "HandoffError",
    "adopt_channel",
    "channel_pair",
    "recv_connection",
    "send_connection",
]

#: Version of the hand-off header; the ``"v"`` key of every header.
FDPASS_VERSION: Final = 1
#: Largest header accepted. A real one is about 60 bytes.
MAX_HEADER_BYTES: Final = 1024
# One descriptor is expected; room for a few more lets us see (and close) a
# surplus instead of having the kernel truncate it silently.
_FD_ROOM: Final = 4
_INT_SIZE: Final = array.array("i").itemsize
# The kernel refuses more descriptors in flight than RLIMIT_NOFILE: the channel is full.
_BUSY_ERRNOS: Final = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ETOOMANYREFS})
_GONE_ERRNOS: Final = frozenset(
    {errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOTCONN}
)
# The keys of a header besides "v", all required, no others allowed.
_HEADER_KEYS: Final = ("connection_id", "peer", "local_port", "tls")


class HandoffError(Exception):
    """Root of the errors of this module; ``str()`` is one line."""


class ChannelBusy(HandoffError):
    """The worker's channel is full (EAGAIN): nothing was sent, the caller still owns
    the connection and should try another worker."""


class ChannelClosed(HandoffError):
    """The worker's end of the channel is gone: nothing was sent, the caller still
    owns the connection; the worker has died or is exiting."""


class BadHandoff(HandoffError):
    """A malformed hand-off: a header that does not validate (on either side), or
    descriptors that are not exactly one stream socket. Nothing is leaked: on the
    sending side the connection was not sent and is still the caller's; on the
    receiving side every descriptor received has been closed."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A connected AF_UNIX SOCK_SEQPACKET pair: ``(supervisor_end, worker_end)``.

    Both are close-on-exec. The supervisor's end is non-blocking, so
    :func:`send_connection` on it never waits for a worker; the worker's end is
    blocking (the worker may make it non-blocking for its event loop). Pass the
    worker's end to the child with ``Popen(..., pass_fds=[worker_end.fileno()])``
    and close it in the supervisor right after (see the module docstring).
    """
    sup_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sup_end.setblocking(False)
    return sup_end, worker_end


def adopt_channel(fd: int) -> socket.socket:
    """The worker's side: wrap the channel descriptor inherited through ``pass_fds``.

    Checks that it is an AF_UNIX SOCK_SEQPACKET socket and makes it close-on-exec
    again, so the worker's own children do not inherit it.
    """
    try:
        channel = socket.socket(fileno=fd)
    except OSError as exc:
        raise HandoffError(f"channel fd {fd}: not a socket ({exc.strerror})") from None
    if channel.family != socket.AF_UNIX or channel.type != socket.SOCK_SEQPACKET:
        kind = f"{_name(channel.family)}/{_name(channel.type)}"
        channel.detach()  # not ours to close: the caller passed a wrong number
        raise HandoffError(f"channel fd {fd}: expected AF_UNIX/SOCK_SEQPACKET, got {kind}")
    channel.set_inheritable(False)
    return channel


def send_connection(
    channel: socket.socket, conn: socket.socket, header: Mapping[str, object]
) -> None:
    """Pass ``conn`` with ``header`` to the worker at the other end of ``channel``,
    then close ``conn`` (the sender's copy).

    ``header`` holds ``connection_id`` (int >= 0), ``peer`` (``(host, port)``),
    ``local_port`` (int) and ``tls`` (bool); the version key ``"v"`` is added
    (if present it must be :data:`FDPASS_VERSION`). ``conn`` is closed after a
    successful send because the worker owns the connection now and the listener
    must never touch it again (module docstring). On :class:`ChannelBusy`,
    :class:`ChannelClosed` or :class:`BadHandoff` nothing was sent and ``conn``
    is left open: it is still the caller's. Any other ``OSError`` (a closed
    ``channel``, ...) propagates, with ``conn`` likewise left open.
    """
    payload = _encode_header(header)
    if channel.family != socket.AF_UNIX or channel.type != socket.SOCK_SEQPACKET:
        raise BadHandoff("the channel must be an AF_UNIX SOCK_SEQPACKET socket")
    fd = conn.fileno()
    if fd < 0:
        raise BadHandoff("the connection is already closed")
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    try:
        # SEQPACKET sends are atomic: all of the datagram (and the descriptor) or nothing.
        channel.sendmsg([payload], rights, socket.MSG_NOSIGNAL)
    except TimeoutError:  # a blocking channel with a timeout
        raise ChannelBusy("worker channel full (send timed out)") from None
    except OSError as exc:
        if exc.errno in _BUSY_ERRNOS:
            raise ChannelBusy(f"worker channel full ({errno.errorcode[exc.errno]})") from None
        if exc.errno in _GONE_ERRNOS:
            raise ChannelClosed(
                f"worker channel closed ({errno.errorcode[exc.errno]})"
            ) from None
        raise
    conn.close()


def recv_connection(channel: socket.socket) -> tuple[socket.socket, dict[str, object]] | None:
    """Receive one connection from ``channel``: ``(socket, header)``, or None at end
    of file (the supervisor closed its end).

    The header has ``connection_id`` (int), ``peer`` (``(host, port)`` tuple),
    ``local_port`` (int) and ``tls`` (bool). The socket keeps the family and type
    of the descriptor (``socket.socket(fileno=...)`` reads them from the kernel)
    and its blocking mode matches the descriptor's ``O_NONBLOCK`` flag. Raises
    :class:`BadHandoff` (with every received descriptor closed) on anything
    malformed. On a non-blocking channel with nothing to read, ``BlockingIOError``
    propagates, as it does from ``recv``.
    """
    data, ancdata, msg_flags, _ = channel.recvmsg(
        MAX_HEADER_BYTES, socket.CMSG_SPACE(_FD_ROOM * _INT_SIZE), socket.MSG_CMSG_CLOEXEC
    )
    fds = _received_fds(ancdata)
    if not data and not fds and not msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        return None  # SEQPACKET: zero bytes is end of file (we never send empty datagrams)
    problems = []
    if msg_flags & socket.MSG_CTRUNC:
        if fds:
            problems.append(f"descriptors truncated (more than {_FD_ROOM} sent)")
        else:
            # The kernel could not install even one here: this process is at its
            # RLIMIT_NOFILE (the usual cause), and the connection is lost.
            problems.append("descriptor dropped by the kernel: this process is out of file "
                            "descriptors (limit "
                            f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]})")
    if msg_flags & socket.MSG_TRUNC:
        problems.append(f"header longer than {MAX_HEADER_BYTES} bytes")
    if len(fds) != 1:
        problems.append(f"{len(fds)} descriptors received, expected 1")
    if problems:
        _close_all(fds)
        raise BadHandoff("; ".join(problems))
    (fd,) = fds
    try:
        header = _decode_header(data)
    except BadHandoff:
        os.close(fd)
        raise
    try:
        conn = socket.socket(fileno=fd)
    except OSError as exc:
        os.close(fd)
        raise BadHandoff(f"the descriptor is not a socket ({exc.strerror})") from None
    if conn.type != socket.SOCK_STREAM:
        kind = _name(conn.type)
        conn.close()
        raise BadHandoff(f"the descriptor is a {kind} socket, expected SOCK_STREAM")
    # socket(fileno=...) assumes blocking; make the object agree with the descriptor.
    conn.setblocking(os.get_blocking(fd))
    return conn, header


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % _INT_SIZE])
    return fds.tolist()


def _name(constant: int) -> str:
    return getattr(constant, "name", str(constant))  # an IntEnum, or a plain int if unknown


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):  # the kernel just gave us these: cannot fail
            os.close(fd)


def _encode_header(header: Mapping[str, object]) -> bytes:
    fields = dict(header)
    version = fields.pop("v", FDPASS_VERSION)
    if version != FDPASS_VERSION or type(version) is not int:
        raise BadHandoff(f"header version {version!r}, this side speaks {FDPASS_VERSION}")
    clean = _validate(fields)
    packed: bytes = msgpack.packb({"v": FDPASS_VERSION, **clean}, use_bin_type=True)
    if len(packed) > MAX_HEADER_BYTES:
        raise BadHandoff(f"header is {len(packed)} bytes, more than {MAX_HEADER_BYTES}")
    return packed


def _decode_header(data: bytes) -> dict[str, object]:
    try:
        fields = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_HEADER_BYTES,
            max_bin_len=0,
            max_array_len=8,
            max_map_len=16,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise BadHandoff(f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(fields, dict):
        raise BadHandoff(f"header is a {type(fields).__name__}, expected a map")
    version = fields.pop("v", None)
    if type(version) is not int or version != FDPASS_VERSION:
        raise BadHandoff(f"header version {version!r}, this side speaks {FDPASS_VERSION}")
    return _validate(fields)


def _validate(fields: dict[str, object]) -> dict[str, object]:
    """The header without its version, checked and normalised (peer as a tuple)."""
    missing = [k for k in _HEADER_KEYS if k not in fields]
    if missing:
        raise BadHandoff(f"header lacks {', '.join(missing)}")
    unknown = sorted(str(k) for k in fields if k not in _HEADER_KEYS)
    if unknown:
        raise BadHandoff(f"header has unknown keys {', '.join(unknown)}")
    conn_id, peer, local_port, tls = (fields[k] for k in _HEADER_KEYS)
    if type(conn_id) is not int or conn_id < 0:
        raise BadHandoff(f"header connection_id: expected an int >= 0, got {conn_id!r:.40}")
    if type(local_port) is not int or not 0 <= local_port <= 0xFFFF:
        raise BadHandoff(f"header local_port: expected a port number, got {local_port!r:.40}")
    if type(tls) is not bool:
        raise BadHandoff(f"header tls: expected a bool, got {tls!r:.40}")
    if (
        not isinstance(peer, list | tuple)
        or len(peer) != 2
        or type(peer[0]) is not str
        or type(peer[1]) is not int
        or not 0 <= peer[1] <= 0xFFFF
    ):
        raise BadHandoff(f"header peer: expected (host, port), got {peer!r:.60}")
    return {"connection_id": conn_id, "peer": (peer[0], peer[1]), "local_port": local_port,
            "tls": tls}
