"""DCMTK (and Orthanc) as independent peers: locate the binaries, run tools, start servers.

Under CI (``CI=true``) a missing binary fails the test: there the interop tests must run.
Elsewhere it skips with a hint to run ``scripts/setup --system``.

Facts about DCMTK 3.6.7 that shape this module:

- It leaves Nagle on unless the environment has ``TCP_NODELAY=1`` (DESIGN.md §4): every
  DCMTK process started here gets ``dcmtk_env()``.
- storescp and dcmqrscp have no option to choose the listen address: they bind 0.0.0.0.
  Tests connect to 127.0.0.1 on a free port; the server is reachable from outside for the
  test's lifetime, which is accepted.
- dcmqrscp's HostTable takes an IP address despite the comment in the sample config.
  Its quota is capped at 500 studies and 1024 MB per study (larger values are clamped with
  a warning), and it deletes the oldest studies beyond the quota: so it gets copies of the
  caller's files, never the originals.
- dcmqridx records the path it is given: give it absolute paths.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, NoReturn

from .net import free_port, wait_for_port
from .procs import Proc, Procs

DCMTK_TOOLS = (
    "echoscu",
    "storescu",
    "storescp",
    "findscu",
    "movescu",
    "getscu",
    "dcmqrscp",
    "dcmqridx",
    "dcmdump",
    "dcmconv",
)

ORTHANC_DEBIAN_PATH = "/usr/sbin/Orthanc"

#: How long a server may take to start listening before the test fails.
SERVER_START_TIMEOUT = 15.0


def missing(what: str) -> NoReturn:
    """Skip the test because ``what`` is not installed, or fail it under CI."""
    import pytest  # here, so that bench/ can import these helpers without pytest

    msg = f"{what} not installed: run scripts/setup --system"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{msg} (CI=true: interop tests must run, not skip)", pytrace=False)
    pytest.skip(msg)


def dcmtk_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``os.environ`` for DCMTK processes: ``TCP_NODELAY=1`` (Nagle off).

    DCMDICTPATH is left as it is (Debian's DCMTK finds its dictionary without it).
    """
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


@dataclass(frozen=True, slots=True)
class Dcmtk:
    """Absolute paths of the DCMTK tools the tests use."""

    echoscu: str
    storescu: str
    storescp: str
    findscu: str
    movescu: str
    getscu: str
    dcmqrscp: str
    dcmqridx: str
    dcmdump: str
    dcmconv: str

    def run(
        self, tool: str, *args: str | os.PathLike[str], timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``tool`` (a field name, e.g. ``"storescu"``) to completion; see ``run_tool``."""
        return run_tool([getattr(self, tool), *args], timeout=timeout)


def which_binary(name: str) -> str | None:
    """Like ``shutil.which``, but skips scripts (files starting with ``#!``).

    pynetdicom installs Python console scripts named echoscu, storescu, storescp, findscu,
    getscu and movescu into the venv's bin/: with the venv activated they would shadow
    DCMTK's binaries of the same names.
    """
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(folder or ".", name)
        if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
            continue
        try:
            with open(candidate, "rb") as f:
                if f.read(2) == b"#!":
                    continue
        except OSError:
            continue
        return os.path.abspath(candidate)
    return None


def find_dcmtk() -> tuple[Dcmtk | None, list[str]]:
    """Locate the DCMTK tools on PATH: (Dcmtk or None, names of missing tools)."""
    found = {name: which_binary(name) for name in DCMTK_TOOLS}
    absent = [name for name, path in found.items() if path is None]
    if absent:
        return None, absent
    return Dcmtk(**{name: str(path) for name, path in found.items()}), []


def require_dcmtk() -> Dcmtk:
    """The DCMTK tools, or skip (fail under CI) naming the missing ones."""
    tools, absent = find_dcmtk()
    if tools is None:
        missing(f"DCMTK ({', '.join(absent)})")
    return tools


def find_orthanc() -> str | None:
    """Path of the Orthanc server binary (PATH, then Debian's /usr/sbin/Orthanc)."""
    path = which_binary("Orthanc")
    if path is None and os.access(ORTHANC_DEBIAN_PATH, os.X_OK):
        path = ORTHANC_DEBIAN_PATH
    return path


def require_orthanc() -> str:
    """Path of the Orthanc binary, or skip (fail under CI)."""
    path = find_orthanc()
    if path is None:
        missing("Orthanc")
    return path


def run_tool(
    args: Sequence[str | os.PathLike[str]],
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool to completion; stdout/stderr captured as text, no stdin.

    ``env`` defaults to ``dcmtk_env()``. A tool still running after ``timeout`` seconds is
    killed and ``subprocess.TimeoutExpired`` propagates. The exit code is not checked:
    assert on ``returncode`` (and show ``stdout``/``stderr`` in the message).
    """
    return subprocess.run(
        [str(a) for a in args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        env=dict(env) if env is not None else dcmtk_env(),
        check=False,
    )


def start_server(
    procs: Procs,
    make_args: Callable[[int], Sequence[str | os.PathLike[str]]],
    port: int | None,
    *,
    name: str,
    env: Mapping[str, str] | None = None,
    attempts: int = 3,
) -> tuple[int, Proc]:
    """Start a server listening on ``port`` (a free one if None) and wait until it listens.

    With a port we picked, a server that exits before listening because the port is in use
    (another process took it in the meantime, see ``free_port``) is retried on a new port,
    up to ``attempts`` times. ``make_args(port)`` returns the command line.
    """
    tries = attempts if port is None else 1
    for attempt in range(1, tries + 1):
        use = port if port is not None else free_port()
        proc = procs.start(make_args(use), name=name, env=env or dcmtk_env())
        try:
            wait_for_port("127.0.0.1", use, SERVER_START_TIMEOUT, proc=proc)
        except RuntimeError:
            proc.stop()
            if attempt == tries or "in use" not in proc.log().lower():
                raise RuntimeError(f"{name} did not start:\n{proc.log()}") from None
            continue
        except TimeoutError:
            raise TimeoutError(f"{name} did not listen on {use}:\n{proc.log()}") from None
        return use, proc
    raise AssertionError("unreachable")


class StoreSCP(NamedTuple):
    """A running storescp: unpacks as ``port, outdir``."""

    port: int
    outdir: Path
    proc: Proc


def storescp_server(
    tmp_path: Path,
    procs: Procs,
    port: int | None = None,
    *,
    aet: str = "STORESCP",
    args: Sequence[str] = (),
    dcmtk: Dcmtk | None = None,
) -> StoreSCP:
    """Start DCMTK storescp writing every received instance into ``tmp_path/<name>/``.

    Single process (storescp's default; no ``--fork``), accepts all transfer syntaxes it
    knows (``+xa``), no reverse DNS (``-dhl``), flat output named by SOP Instance UID
    (``-uf``: ``CT.1.2.3....dcm``; a second copy of an instance overwrites the first).
    ``args`` are appended before the port (e.g. ``["--ignore"]``, ``["-pdu", "131072"]``).
    Returns ``(port, outdir, proc)``; ``port, outdir, _ = ...`` or ``.port``/``.outdir``.
    Binds 0.0.0.0: DCMTK 3.6.7's storescp has no listen-address option.
    """
    tools = dcmtk or require_dcmtk()
    name = _unique_name(procs, "storescp")
    outdir = tmp_path / name
    outdir.mkdir(parents=True)

    def make_args(p: int) -> list[str]:
        return [tools.storescp, "--single-process", "-aet", aet, "-od", str(outdir), "-uf",
                "-fe", ".dcm", "+xa", "-dhl", *args, str(p)]

    used, proc = start_server(procs, make_args, port, name=name)
    return StoreSCP(used, outdir, proc)


def received_files(outdir: Path) -> list[Path]:
    """Files storescp wrote into ``outdir``, sorted by name."""
    return sorted(p for p in outdir.iterdir() if p.is_file())


def dcmqrscp_server(
    tmp_path: Path,
    procs: Procs,
    port: int | None = None,
    files: Iterable[Path | str] = (),
    *,
    aet: str = "QRSCP",
    move_destinations: Mapping[str, tuple[str, int]] | None = None,
    args: Sequence[str] = (),
    dcmtk: Dcmtk | None = None,
) -> int:
    """Start DCMTK dcmqrscp serving ``files`` as AE ``aet`` (Q/R find, move, get; store).

    ``files`` are copied into the storage area ``tmp_path/<name>/<aet>/`` and indexed with
    dcmqridx before the server starts, so they are queryable as soon as it listens.
    ``move_destinations`` maps a C-MOVE destination AE title to (host, port); dcmqrscp only
    moves to AEs in this table. Any peer may connect (``ANY``). dcmqrscp forks a child per
    association (its default); ``procs`` stops the whole process group. Returns the port.
    """
    tools = dcmtk or require_dcmtk()
    name = _unique_name(procs, "dcmqrscp")
    home = tmp_path / name
    storage = home / aet
    storage.mkdir(parents=True)

    copies: list[str] = []
    for i, src in enumerate(files):
        dst = storage / f"{i:06d}_{Path(src).name}"
        shutil.copyfile(src, dst)
        copies.append(str(dst.resolve()))
    _index(tools, storage, copies)

    config = home / "dcmqrscp.cfg"

    def make_args(p: int) -> list[str]:
        config.write_text(_dcmqrscp_config(p, aet, storage.resolve(), move_destinations or {}))
        return [tools.dcmqrscp, "-c", str(config), "-dhl", *args, str(p)]

    used, _ = start_server(procs, make_args, port, name=name)
    return used


def _index(tools: Dcmtk, storage: Path, files: list[str]) -> None:
    # dcmqrscp needs an index.dat even when empty; dcmqridx with no file creates one.
    for start in range(0, max(len(files), 1), 200):  # keep the command line short
        done = run_tool([tools.dcmqridx, str(storage), *files[start : start + 200]])
        if done.returncode != 0:
            raise RuntimeError(f"dcmqridx failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def _dcmqrscp_config(
    port: int, aet: str, storage: Path, move_destinations: Mapping[str, tuple[str, int]]
) -> str:
    """dcmqrscp.cfg text: one storage area, a HostTable entry per move destination."""
    _check_aet(aet)
    hosts = []
    for i, (dest, (host, dport)) in enumerate(sorted(move_destinations.items())):
        _check_aet(dest)
        hosts.append(f"dest{i} = ({dest}, {host}, {int(dport)})")
    return "\n".join(
        [
            f"NetworkTCPPort = {port}",
            "MaxPDUSize = 131072",
            "MaxAssociations = 32",
            "HostTable BEGIN",
            *hosts,
            "HostTable END",
            "VendorTable BEGIN",
            "VendorTable END",
            "AETable BEGIN",
            # Quota: dcmqrscp's maximum; beyond it, it deletes the oldest studies.
            f"{aet} {storage} RW (500, 1024mb) ANY",
            "AETable END",
            "",
        ]
    )


def _check_aet(aet: str) -> None:
    if not (1 <= len(aet) <= 16) or any(c in aet for c in " ,()=\\\t\n"):
        raise ValueError(f"AE title unusable in a dcmqrscp config: {aet!r}")


def _unique_name(procs: Procs, base: str) -> str:
    taken = {p.name for p in procs}
    name, n = base, 1
    while name in taken or (procs.logdir / f"{name}.stdout").exists():
        n += 1
        name = f"{base}-{n}"
    return name
