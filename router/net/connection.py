"""Blocking socket driver for the sans-I/O engine.

Theory of operation
-------------------
:class:`Connection` joins one :class:`router.dicom.association.Association` to
one TCP socket and does nothing else: it writes what the engine queues
(scatter-gather ``sendmsg``, no copies), reads into one large reusable buffer
(DESIGN.md §4: big ``recv_into`` reads are ~2x faster than small ones), keeps
the ARTIM deadline the engine asks for, and hands events to its caller.

It blocks in exactly one place, ``recv_into`` with a socket timeout equal to
the nearest deadline (ARTIM or the caller's own), so there is no polling and a
peer that goes silent is noticed on time. Every socket gets TCP_NODELAY: a DIMSE
exchange is request/response, and Nagle plus delayed ACK costs 40-90 ms per
message (DESIGN.md §4).

Used by the client API (one association per object) and by the threaded
server (one thread per inbound association).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Iterator

from router.dicom.association import Association, Role
from router.dicom.events import NEED_DATA, ConnectionClosed, Event, _Sentinel

__all__ = ["Connection", "PeerTimeout", "ack_now", "configure_socket"]

log = logging.getLogger("router.net")

RECV_BUFFER = 1 << 20

# Linux only; elsewhere the kernel's delayed ACK stays as it is.
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
# sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_BATCH = 512


def _set_timeval(sock: socket.socket, option: int, seconds: float) -> None:
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("@ll", whole, micro))


def ack_now(sock: socket.socket) -> bool:
    """Acknowledge what has arrived at once (TCP_QUICKACK); False if not possible.

    A sender that leaves Nagle on (DCMTK's default, and many modalities) holds
    back the rest of a message until what it sent is acknowledged, and Linux
    delays that ACK by up to 40 ms: 40 ms per instance (DESIGN.md §4). Callers
    do this only when they wait in the middle of a message: between messages
    our response carries the ACK, and a bare one is an extra packet.
    """
    if _QUICKACK is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
    except OSError:
        return False
    return True


class PeerTimeout(TimeoutError):
    """The peer did not answer within the caller's timeout."""


def configure_socket(sock: socket.socket) -> None:
    """Per-socket options every DICOM connection here gets."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class Connection:
    """One association over one blocking socket."""

    def __init__(
        self,
        sock: socket.socket,
        assoc: Association,
        *,
        artim_timeout: float = 30.0,
        send_timeout: float | None = 60.0,
        recv_buffer: int = RECV_BUFFER,
    ) -> None:
        configure_socket(sock)
        self.sock = sock
        self.assoc = assoc
        self.artim_timeout = artim_timeout
        # A peer that stops reading must not hold a thread forever (PS3.8 has
        # no timer for it; this is the transport's own guard).
        self.send_timeout = send_timeout
        self.quickack = _QUICKACK is not None
        self._buf = bytearray(recv_buffer)
        self._view = memoryview(self._buf)
        self._artim_armed: int | None = None
        # The socket stays in blocking mode and the kernel keeps the timeouts
        # (SO_SNDTIMEO / SO_RCVTIMEO): Python's timeout mode costs a poll()
        # per call and an ioctl per mode switch, 4 syscalls per message.
        sock.settimeout(None)
        self._rcvtimeo = 0.0  # 0 = none
        _set_timeval(sock, socket.SO_SNDTIMEO, send_timeout or 0.0)
        self._artim_deadline: float | None = None
        self.closed = False
        try:
            self.peer: tuple[str, int] = sock.getpeername()[:2]
        except OSError:
            self.peer = ("?", 0)

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        assoc: Association,
        *,
        connect_timeout: float = 30.0,
        artim_timeout: float = 30.0,
    ) -> Connection:
        """Requestor side: open the TCP connection the engine asks for (AE-1)."""
        if assoc.role is not Role.REQUESTOR or not assoc.wants_connect:
            raise ValueError("open() is for a requestor that has called request()")
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        conn = cls(sock, assoc, artim_timeout=artim_timeout)
        assoc.connection_made()
        conn.flush()
        return conn

    # ----------------------------------------------------------------- output

    def flush(self) -> None:
        """Write everything the engine has queued; close if it asked to."""
        chunks = self.assoc.data_to_send()
        if chunks and not self.closed:
            self._send_all(chunks)
        self._sync_timer()
        if self.assoc.wants_close:
            self.close()

    def _send_all(self, chunks: list[bytes | bytearray | memoryview]) -> None:
        pending = list(chunks)
        i = 0
        try:
            while i < len(pending):
                batch = pending[i:i + _IOV_BATCH]
                sent = self.sock.sendmsg(batch)
                # Advance over what went out; a partial write leaves a tail.
                for buf in batch:
                    n = len(buf)
                    if sent >= n:
                        sent -= n
                        i += 1
                        continue
                    pending[i] = memoryview(buf)[sent:]
                    break
        except (TimeoutError, BlockingIOError):  # SO_SNDTIMEO ran out
            log.warning("peer %s:%s stopped reading for %.0f s: closing the connection",
                        *self.peer, self.send_timeout or 0)
            self._transport_lost()
        except OSError as exc:
            log.debug("send to %s failed: %s", self.peer, exc)
            self._transport_lost()

    # ------------------------------------------------------------------ input

    def next_event(self, timeout: float | None = None) -> Event:
        """Block until the engine has an event, ``timeout`` seconds at most.

        Raises :class:`PeerTimeout` if the caller's timeout passes first (the
        association is left as it is: the caller decides whether to abort).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            event = self.assoc.next_event()
            if event is not NEED_DATA:
                assert not isinstance(event, _Sentinel)
                self.flush()
                return event
            self.flush()
            if self.closed:
                # The engine has nothing more and the line is gone.
                self.assoc.receive_data(b"")
                event = self.assoc.next_event()
                if event is NEED_DATA:
                    return ConnectionClosed()
                assert not isinstance(event, _Sentinel)
                return event
            self._read(deadline)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Iterate over events until the connection closes."""
        while True:
            event = self.next_event(timeout)
            yield event
            if isinstance(event, ConnectionClosed):
                return

    def read_available(self) -> bool:
        """Read what the socket holds right now, without blocking.

        True if anything happened (bytes fed to the engine, or the peer closed:
        the engine then reports it); False if there was nothing to read. A
        non-blocking ``recv`` (MSG_DONTWAIT) rather than ``select``: no limit on
        the descriptor number, and one syscall instead of two."""
        if self.closed:
            return False
        try:
            n = self.sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            log.debug("receive from %s failed: %s", self.peer, exc)
            self._transport_lost()
            return True
        if n == 0:
            self._transport_lost()
            return True
        self.assoc.receive_data(self._view[:n])
        return True

    def _read(self, deadline: float | None) -> None:
        now = time.monotonic()
        wait: float | None = None
        for limit in (deadline, self._artim_deadline):
            if limit is not None:
                remaining = max(limit - now, 0.0)
                wait = remaining if wait is None else min(wait, remaining)
        if self.quickack and self.assoc.mid_message:
            self._ack_now()
        try:
            self._set_rcvtimeo(wait)
            n = self.sock.recv_into(self._buf)
        except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO ran out
            now = time.monotonic()
            artim_due = self._artim_deadline is not None and now >= self._artim_deadline
            if not artim_due and (deadline is None or now < deadline):
                return  # woke a little early (the timeout is kept coarse): look again
            if artim_due:
                log.info("ARTIM timer expired for %s:%s in %s", *self.peer,
                         self.assoc.state.name)
                self._artim_deadline = None
                self.assoc.timer_expired()
                return
            raise PeerTimeout(f"no answer from {self.peer[0]}:{self.peer[1]}") from None
        except OSError as exc:
            log.debug("receive from %s failed: %s", self.peer, exc)
            self._transport_lost()
            return
        if n == 0:
            self._transport_lost()
            return
        self.assoc.receive_data(self._view[:n])

    # ------------------------------------------------------------------ misc

    def _set_rcvtimeo(self, wait: float | None) -> None:
        """Kernel receive timeout for the next read (None: block).

        Only changed when it differs by more than 10% (and 1 ms): a deadline a
        few percent late is harmless for ARTIM and idle timers, and a steady
        timeout then costs no syscall per read."""
        want = 0.0 if wait is None else max(wait, 0.001)
        current = self._rcvtimeo
        if want == current or (want and current and abs(want - current) <= max(
                0.1 * want, 0.001)):
            return
        _set_timeval(self.sock, socket.SO_RCVTIMEO, want)
        self._rcvtimeo = want

    def _ack_now(self) -> None:
        if not ack_now(self.sock):
            self.quickack = False

    def _sync_timer(self) -> None:
        generation = self.assoc.artim
        if generation == self._artim_armed:
            return
        self._artim_armed = generation
        self._artim_deadline = (
            None if generation is None else time.monotonic() + self.artim_timeout
        )

    def _transport_lost(self) -> None:
        self.assoc.receive_data(b"")
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()
