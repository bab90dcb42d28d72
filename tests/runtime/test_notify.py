"""The router under systemd's Type=notify and WatchdogSec= (router/notify.py), with a
datagram socket standing in for systemd: what the real router sends, and when."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.router import Router

# Seconds to wait for a notification that must come.
WAIT = 30.0


class FakeManager:
    """The receiving end of NOTIFY_SOCKET, in the abstract namespace as systemd's is."""

    def __init__(self) -> None:
        self.name = f"@dicom-router-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.received: list[dict[str, str]] = []

    def next(self, timeout: float = WAIT) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in data.splitlines() if line)
        self.received.append(message)
        return message

    def until(self, key: str, value: str | None = None, *, skip_watchdog: bool = True,
              timeout: float = WAIT) -> dict[str, str]:
        """The next message holding ``key`` (equal to ``value`` if given); the ones
        before it are kept in :attr:`received`."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(deadline - time.monotonic(), 0.01))
            if key in message and (value is None or message[key] == value):
                return message


@pytest.fixture
def manager() -> Iterator[FakeManager]:
    fake = FakeManager()
    yield fake
    fake.sock.close()


def test_ready_reload_watchdog_worker_loss_and_stopping(tmp_path: Path,
                                                        manager: FakeManager) -> None:
    router = Router(tmp_path, workers=2, env={"NOTIFY_SOCKET": manager.name,
                                              "WATCHDOG_USEC": "600000"})
    try:
        # READY=1 only once both workers said hello.
        ready = manager.until("READY")
        router.wait_for("ready: 2 workers serving")
        assert ready["STATUS"] == (f"2 of 2 workers serving on 127.0.0.1:{router.port}; "
                                   "configuration generation 1")
        assert not any("READY" in m for m in manager.received[:-1])

        # Watchdog pings keep coming from the supervisor's loop (half of 0.6 s).
        for _ in range(3):
            manager.until("WATCHDOG", "1")

        # Only the supervisor speaks: the workers did not inherit the variables.
        workers = router.status()["workers"]
        assert isinstance(workers, list) and len(workers) == 2
        for worker in workers:
            environ = Path(f"/proc/{worker['pid']}/environ").read_bytes().split(b"\0")
            assert not [v for v in environ if v.startswith((b"NOTIFY_SOCKET=",
                                                            b"WATCHDOG_"))]

        # A reload is bracketed by RELOADING=1 (with the clock systemd >= 253 checks)
        # and READY=1.
        router.write_config(extra='[acceptance]\ncalled_ae = ["ROUTER", "ROUTER2"]\n')
        router.proc.send_signal(signal.SIGHUP)
        reloading = manager.until("RELOADING", "1")
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 < now_usec - int(reloading["MONOTONIC_USEC"]) < WAIT * 1e6
        assert "configuration generation 2" in manager.until("READY", "1")["STATUS"]

        # A refused reload still ends in READY=1, and the status says why.
        router.config.write_text(router.config.read_text() + "\nbogus = 1\n")
        router.proc.send_signal(signal.SIGHUP)
        manager.until("RELOADING", "1")
        refused = manager.until("READY", "1")
        assert "last reload refused" in refused["STATUS"] and "bogus" in refused["STATUS"]

        # A worker lost and replaced shows in STATUS, without a second READY=1.
        os.kill(int(workers[0]["pid"]), signal.SIGKILL)
        assert manager.until("STATUS")["STATUS"].startswith("1 of 2 workers serving")
        while not manager.until("STATUS")["STATUS"].startswith("2 of 2 workers serving"):
            pass
        assert "READY" not in manager.received[-1]

        # SIGTERM: STOPPING=1 before the drain; the watchdog is still fed while draining.
        router.proc.send_signal(signal.SIGTERM)
        stopping = manager.until("STOPPING", "1")
        assert stopping["STATUS"].startswith("draining")
        assert router.proc.wait(WAIT) == 0
    finally:
        router.stop()


def test_a_watchdog_meant_for_another_process_is_left_alone(tmp_path: Path,
                                                           manager: FakeManager) -> None:
    # WATCHDOG_PID names another process (sd_watchdog_enabled(3)): no pings from us.
    router = Router(tmp_path, workers=1, env={"NOTIFY_SOCKET": manager.name,
                                              "WATCHDOG_USEC": "200000",
                                              "WATCHDOG_PID": "1"})
    try:
        manager.until("READY", "1")
        router.proc.send_signal(signal.SIGTERM)
        manager.until("STOPPING", "1")
        assert router.proc.wait(WAIT) == 0
        assert not any("WATCHDOG" in m for m in manager.received)
    finally:
        router.stop()


def test_without_notify_socket_the_router_runs_as_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)  # the helper starts from os.environ
    router = Router(tmp_path, workers=1)
    try:
        router.wait_for("ready: 1 workers serving")
        assert "cannot notify" not in router.log()
    finally:
        assert router.stop() == 0
