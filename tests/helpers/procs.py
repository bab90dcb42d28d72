"""Subprocesses owned by one test: started with logs on disk, always stopped at teardown.

Each process runs in its own session (process group), so servers that fork a child per
association (dcmqrscp, storescp --fork) are stopped with all their children. Stopping is
gunicorn's graceful shape: SIGTERM to the group, wait, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path


def _tail(path: Path, limit: int = 20_000) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    if len(data) > limit:
        data = b"[... cut ...]\n" + data[-limit:]
    return data.decode("utf-8", "replace")


class Proc:
    """One started subprocess; stdout and stderr go to files for post-mortem reading."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        logdir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> None:
        self.name = name
        self.args = [str(a) for a in args]
        self.stdout_path = logdir / f"{name}.stdout"
        self.stderr_path = logdir / f"{name}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """Exit code, or None while running."""
        return self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (the process and anything it forked)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM the group, wait up to ``timeout``, then SIGKILL. Returns the exit code.

        Forked children are signalled too, even when the leader has already exited.
        """
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(timeout)
        # Children left in the group (e.g. an association still being served).
        self.signal(signal.SIGKILL)
        return self.popen.returncode

    def log(self) -> str:
        """stdout and stderr so far, labelled, for failure messages."""
        parts = [f"--- {self.name}: {' '.join(self.args)} (pid {self.pid}, "
                 f"exit {self.popen.poll()})"]
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            text = _tail(path)
            if text:
                parts.append(f"--- {self.name} {label}:\n{text.rstrip()}")
        return "\n".join(parts)

    def __repr__(self) -> str:
        return f"Proc({self.name!r}, pid={self.pid}, exit={self.popen.poll()})"


class Procs:
    """The processes a test started. The ``procs`` fixture stops them all at teardown."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._procs: list[Proc] = []

    def start(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> Proc:
        """Start ``args``; ``name`` (default: the program's base name, numbered) labels logs."""
        base = name or Path(str(args[0])).name
        taken = {p.name for p in self._procs}
        unique, n = base, 1
        while unique in taken:
            n += 1
            unique = f"{base}-{n}"
        proc = Proc(unique, [str(a) for a in args], logdir=self.logdir, env=env, cwd=cwd)
        self._procs.append(proc)
        return proc

    def __iter__(self) -> Iterator[Proc]:
        return iter(list(self._procs))

    def __len__(self) -> int:
        return len(self._procs)

    def stop_all(self, timeout: float = 5.0) -> None:
        """Stop every process, newest first (clients before the servers they talk to)."""
        for proc in reversed(self._procs):
            proc.stop(timeout)

    def logs(self) -> str:
        return "\n".join(p.log() for p in self._procs)
