"""router/notify.py: the sd_notify(3) datagrams, read from a real socket."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.notify import Notifier


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_messages_on_a_path_socket(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path}, pid=42)
    assert notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("2 of 2 workers serving\nsecond line")
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 of 2 workers serving second line\n"
    notifier.reloading()
    reloading = sock.recv(4096).decode().splitlines()
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    assert int(reloading[1].split("=")[1]) > 0
    notifier.stopping("draining")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining\n"
    notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1\n"
    notifier.close()


@pytest.mark.parametrize(("environ", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),  # another process's
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_the_period(environ: dict[str, str],
                                              interval: float | None) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "/run/x", **environ}, pid=42)
    assert notifier.watchdog_interval == interval


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"}, pid=42)
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")  # no socket, no error
    notifier.watchdog()


def test_abstract_namespace_address() -> None:
    assert Notifier("@systemd/notify").address == b"\0systemd/notify"


def test_a_manager_gone_is_logged_once_and_never_raises(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="router.notify"):
        for _ in range(3):
            notifier.watchdog()
    assert [r.getMessage() for r in caplog.records if "cannot notify" in r.getMessage()] \
        and len(caplog.records) == 1
