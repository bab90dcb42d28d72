"""Loopback ports for tests: pick a free one, wait for a foreign server to listen on one."""

from __future__ import annotations

import select
import socket
import time
from typing import Protocol


class _Exited(Protocol):
    def poll(self) -> int | None: ...


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    The kernel picks it (bind to port 0); we close the socket and hand the number to the
    server under test. Between our close and the server's bind another process may take
    the port. That race is small (the kernel cycles through the ephemeral range before
    reusing a number) and is accepted: a server that fails to bind exits, and
    ``wait_for_port(..., proc=...)`` reports that at once instead of timing out.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class PortTimeout(TimeoutError):
    """Nothing listened on the port within the time allowed."""


def wait_for_port(
    host: str, port: int, timeout: float = 10.0, *, proc: _Exited | None = None
) -> None:
    """Block until a TCP connect to ``host:port`` succeeds, at most ``timeout`` seconds.

    This is the one place where the tests wait for time to pass: a foreign binary
    (storescp, dcmqrscp, Orthanc) gives no readiness signal we could block on, so we retry
    ``connect`` while it answers "connection refused" only, with a short back-off (5 ms
    doubling to 100 ms). Any other error is raised at once. If ``proc`` (anything with
    ``poll()``) has exited, there is no point waiting: raise ``RuntimeError``.

    The probe connection is closed right away; DICOM servers log it as an aborted
    association and carry on.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PortTimeout(f"nothing listening on {host}:{port} after {timeout:.1f} s")
        try:
            with socket.create_connection((host, port), timeout=remaining):
                return
        except ConnectionRefusedError:
            pass
        if proc is not None and (code := proc.poll()) is not None:
            raise RuntimeError(f"process exited with code {code} before listening on {port}")
        # A blocking wait with no descriptors: the back-off between connect attempts.
        select.select([], [], [], min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.1)
