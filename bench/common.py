"""What the benchmarks share: finding DCMTK's binaries, generating test data, and
waiting for a server they started to say it is ready.

Imported with the repository root on ``sys.path`` (each benchmark puts it there).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Final

from tests.helpers.data import make_ct, make_tiny
from tests.helpers.dcmtk import which_binary

START_TIMEOUT: Final = 30.0  # seconds: a server not ready by then is killed


def dcmtk_binary(name: str) -> str:
    """DCMTK's ``name`` (not pynetdicom's script of the same name), or exit saying so."""
    path = which_binary(name)
    if path is None:
        sys.exit(f"{name} not found: install DCMTK (scripts/setup --system)")
    return path


def make_data(root: Path, kind: str, count: int, streams: int, *,
              size_kb: float = 500) -> list[Path]:
    """``count`` instances ("ct" of ``size_kb``, or "tiny") split over ``streams``
    folders, one per sender."""
    dirs = [root / f"{kind}-{i}" for i in range(streams)]
    for d in dirs:
        d.mkdir(parents=True)
    for i in range(count):
        path = dirs[i % streams] / f"{i:06d}.dcm"
        if kind == "ct":
            make_ct(path, size_kb=size_kb, seed=i)
        else:
            make_tiny(path, seed=i)
    return dirs


def wait_ready(proc: subprocess.Popen[str], stream: IO[str], *, marker: str,
               keep: Callable[[str], None], log: Callable[[], str], what: str) -> None:
    """Read ``stream`` of ``proc`` line by line, each line to ``keep``, up to the first
    that contains ``marker`` (the router's "ready: " line). Readiness is that event,
    read as it comes; the timer is only a deadline: a server not ready within
    :data:`START_TIMEOUT` is killed, which ends the read with EOF. If it never gets
    ready, ``proc`` is killed and reaped and ``RuntimeError`` says so with ``log()``.
    """
    deadline = threading.Timer(START_TIMEOUT, proc.kill)
    deadline.start()
    try:
        while line := stream.readline():
            keep(line)
            if marker in line:
                return
        raise RuntimeError(f"{what} exited with {proc.wait()} before it was ready "
                           f"(deadline {START_TIMEOUT:.0f} s):\n" + log())
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        deadline.cancel()
