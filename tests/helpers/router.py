"""``dicom-router run`` as a subprocess for tests: its config, its log, its commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.helpers.net import free_port

READY_TIMEOUT = 30.0


class Router:
    """``dicom-router run`` in a subprocess, its log collected line by line."""

    def __init__(self, tmp: Path, *, workers: int = 2, extra: str = "",
                 port: int | None = None, router_extra: str = "",
                 preexec_fn: Callable[[], None] | None = None,
                 env: dict[str, str] | None = None, drain_grace: float = 5) -> None:
        self.port = port or free_port()
        self.drain_grace = drain_grace
        self.spool = tmp / "spool"
        self.config = tmp / "router.toml"
        self.router_extra = router_extra  # more keys of the [router] table
        self.write_config(workers=workers, extra=extra)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "run", "--config", str(self.config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})), preexec_fn=preexec_fn)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def write_config(self, *, workers: int = 2, extra: str = "") -> None:
        self.config.write_text(
            f'[router]\nae_title = "ROUTER"\nworkers = {workers}\n{self.router_extra}'
            f'[[router.listen]]\nhost = "127.0.0.1"\nport = {self.port}\n'
            f'[spool]\npath = "{self.spool}"\n'
            f'[timeouts]\nartim = 2\ndrain_grace = {self.drain_grace}\n'
            f'heartbeat_interval = 0.2\n'
            f'heartbeat_timeout = 3\n{extra}')

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float = READY_TIMEOUT, start: int = 0) -> int:
        """Index of the first log line from ``start`` containing ``text``."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for i in range(start, len(self.lines)):
                    if text in self.lines[i]:
                        return i
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    raise AssertionError(f"{text!r} not logged; log:\n" + "\n".join(self.lines))
                self.changed.wait(remaining)

    def log(self) -> str:
        with self.changed:
            return "\n".join(self.lines)

    def status(self) -> dict[str, object]:
        done = subprocess.run([sys.executable, "-m", "router.cli", "status", "--json",
                               "--config", str(self.config)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    def command(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``dicom-router ARGS --config <this router's file>``."""
        return subprocess.run([sys.executable, "-m", "router.cli", *args,
                               "--config", str(self.config)],
                              capture_output=True, text=True, timeout=timeout)

    def wait_count(self, text: str, count: int, timeout: float = READY_TIMEOUT) -> None:
        """Wait until ``count`` log lines contain ``text``."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while sum(text in line for line in self.lines) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    got = sum(text in line for line in self.lines)
                    raise AssertionError(f"{count} x {text!r} not logged (got {got}); log:\n"
                                         + "\n".join(self.lines[-200:]))
                self.changed.wait(remaining)

    def count(self, text: str) -> int:
        """Log lines so far containing ``text``."""
        with self.changed:
            return sum(text in line for line in self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(10)
        return self.proc.returncode


def leftovers(tmp: Path) -> list[Path]:
    """What in a spool's ``tmp/`` is not an empty file made ahead (Spool.stock): a
    partial instance, or a spare still holding a delivered instance's bytes."""
    return sorted(p for p in tmp.iterdir()
                  if p.suffix != ".spare" or p.stat().st_size != 0)
