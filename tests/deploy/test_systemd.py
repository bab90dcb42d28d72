"""deploy/systemd: the unit file and the sample configuration it runs.

What is proved, without running systemd (no test machine boots it as PID 1):

- ``systemd-analyze verify`` accepts the unit with nothing to say (it exits 0 on an
  unknown key or a bad value, warning on stderr, so stderr must be empty). It checks
  that the ExecStart binary exists: the test verifies a copy whose ExecStart names this
  checkout's ``dicom-router``, the one change made to it.
- ExecStart parses with the router's own argparse, and the sample router.toml and
  rules.toml it names load with the router's own loaders, as ``run`` would load them.
- The unit agrees with that configuration: the spool is writable under
  ProtectSystem=strict, TimeoutStopSec covers the drain, a port below 1024 comes with
  CAP_NET_BIND_SERVICE, reload asks the router and waits for its answer, no
  SystemCallFilter= takes io_uring away from the workers, and the unit waits for the
  router's READY=1 and watches its pings.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from router.cli import build_parser
from router.config import Config, load_config
from router.snapshot import Snapshot
from tests.deploy.conftest import DEPLOY

UNIT = DEPLOY / "systemd" / "dicom-router.service"
SAMPLE_CONFIG = DEPLOY / "systemd" / "router.toml"
INSTALLED_BINARY = "/opt/dicom-router/bin/dicom-router"  # deploy/README.md installs it there
#: How long the supervisor may take beyond [timeouts] drain_grace to exit after SIGTERM:
#: it SIGKILLs workers still alive 5 s after the grace period and gives itself 5 s more
#: (router/supervisor.py, _drain and _timers).
DRAIN_MARGIN = 10.0
IO_URING = ("io_uring_setup", "io_uring_enter", "io_uring_register")


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file -> [(key, value)] in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    logical = ""
    for raw in text.splitlines():
        line = logical + raw.strip()
        logical = ""
        if line.endswith("\\"):  # continued on the next line (systemd.syntax(7))
            logical = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], key: str, section: str = "Service"
           ) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], key: str, section: str = "Service") -> str:
    found = values(unit, key, section)
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times: {found}"
    return found[0]


def seconds(span: str) -> float:
    """A systemd time span ("60", "90s", "1min 30s") in seconds (systemd.time(7))."""
    units = {"us": 1e-6, "ms": 1e-3, "": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0,
             "min": 60.0, "h": 3600.0, "hr": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), span
    return sum(float(n) * units[u] for n, u in parts)


def exec_argv(line: str) -> list[str]:
    # Leading "@-:+!" are systemd's prefixes, not part of the command (systemd.service(5)).
    return shlex.split(line.lstrip("@-:+!"))


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT.read_text())


@pytest.fixture(scope="module")
def config(unit: dict[str, list[tuple[str, str]]]) -> Config:
    """The sample configuration, loaded the way ExecStart's command line loads it."""
    args = build_parser().parse_args(exec_argv(one(unit, "ExecStart"))[1:])
    overrides = {"spool": args.spool, "host": args.host, "port": args.port,
                 "workers": args.workers}
    return load_config(SAMPLE_CONFIG, overrides=overrides)


def test_systemd_analyze_verify_accepts_the_unit(systemd_analyze: str, tmp_path: Path) -> None:
    text = UNIT.read_text()
    # ExecStart and ExecReload (verify checks that each binary exists).
    assert text.count(INSTALLED_BINARY) == 2, f"ExecStart no longer runs {INSTALLED_BINARY}"
    ours = Path(sys.executable).with_name("dicom-router")
    assert ours.is_file(), f"{ours} missing: run scripts/setup"
    copy = tmp_path / UNIT.name  # verify wants the unit's own name
    copy.write_text(text.replace(INSTALLED_BINARY, str(ours)))
    done = subprocess.run([systemd_analyze, "verify", str(copy)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), (
        f"systemd-analyze verify: exit {done.returncode}\n{done.stdout}{done.stderr}")


def test_exec_start_parses_and_its_config_loads(unit: dict[str, list[tuple[str, str]]],
                                                config: Config) -> None:
    argv = exec_argv(one(unit, "ExecStart"))
    assert argv[0] == INSTALLED_BINARY
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    # deploy/README.md installs the sample as this file, and rules.toml next to it.
    assert args.config == Path("/etc/dicom-router/router.toml")
    assert args.config.name == SAMPLE_CONFIG.name
    assert config.rules == SAMPLE_CONFIG.parent / "rules.toml"
    # What `run` reads and checks, refusing to start on a problem (RuleError).
    _, _, rules = Snapshot.read(Path(config.source))
    assert len(rules.rules) >= 1
    assert config.source == str(SAMPLE_CONFIG)


def test_spool_is_writable_under_protect_system_strict(
        unit: dict[str, list[tuple[str, str]]], config: Config) -> None:
    assert one(unit, "ProtectSystem") == "strict"
    writable = [Path("/var/lib") / d for v in values(unit, "StateDirectory") for d in v.split()]
    writable += [Path(p.lstrip("-")) for v in values(unit, "ReadWritePaths") for p in v.split()]
    assert config.spool.is_absolute()
    assert any(config.spool.is_relative_to(w) for w in writable), (
        f"spool {config.spool} is read-only under ProtectSystem=strict (writable: {writable})")
    # The control sockets live in the spool: writable too, by the same rule.
    assert any(config.admin_socket.is_relative_to(w) for w in writable)


def test_stop_timeout_covers_the_drain(unit: dict[str, list[tuple[str, str]]],
                                       config: Config) -> None:
    assert values(unit, "KillSignal") in ([], ["SIGTERM"])  # SIGTERM drains
    timeout = seconds(one(unit, "TimeoutStopSec"))
    needed = config.drain_grace + DRAIN_MARGIN
    assert timeout > needed, (
        f"TimeoutStopSec={timeout:g} s: the router may need drain_grace "
        f"{config.drain_grace:g} s + {DRAIN_MARGIN:g} s = {needed:g} s to stop")


def test_reload_asks_the_router_and_waits_for_its_answer(
        unit: dict[str, list[tuple[str, str]]]) -> None:
    """`dicom-router reload` with ExecStart's binary and config: it exits 2 when the
    router refuses the file, so `systemctl reload` fails visibly (a bare kill -HUP
    would report success whatever the router made of it)."""
    argv = exec_argv(one(unit, "ExecReload"))
    start = exec_argv(one(unit, "ExecStart"))
    assert argv[0] == start[0], (argv, start)
    args = build_parser().parse_args(argv[1:])
    assert args.command == "reload", argv
    assert args.config == build_parser().parse_args(start[1:]).config


def test_runs_unprivileged_and_restarts_on_failure(
        unit: dict[str, list[tuple[str, str]]], config: Config) -> None:
    assert one(unit, "User") not in ("root", "0")
    assert one(unit, "Restart") == "on-failure"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices"):
        assert one(unit, key) == "yes", key
    # Ports below 1024 need the capability, kept in the bounding set as well.
    if any(listen.port < 1024 for listen in config.listen):
        for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
            assert "CAP_NET_BIND_SERVICE" in capabilities(values(unit, key)), key


def test_started_when_ready_and_watched(unit: dict[str, list[tuple[str, str]]]) -> None:
    # The router sends READY=1 and pings WATCHDOG=1 (tests/runtime/test_notify.py
    # shows it does, to a socket standing in for systemd); only the supervisor speaks.
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    watchdog = seconds(one(unit, "WatchdogSec"))
    # Pings every WatchdogSec/2 from a loop that wakes at least that often; the
    # slowest thing it does in line is a reload's parse, well under a second.
    assert 10 <= watchdog <= 120
    assert one(unit, "Restart") == "on-failure"  # covers a watchdog kill


def capabilities(assignments: list[str]) -> set[str]:
    """The set that CapabilityBoundingSet= or AmbientCapabilities= lines leave: each
    line adds, "~" lines remove, an empty one resets (systemd.exec(5))."""
    caps: set[str] = set()
    for value in assignments:
        if not value:
            caps = set()
        elif value.startswith("~"):
            caps -= set(value[1:].split())
        else:
            caps |= set(value.split())
    return caps


def test_the_port_104_instructions_work(systemd_analyze: str, tmp_path: Path) -> None:
    """Uncommenting the two lines the unit points at grants CAP_NET_BIND_SERVICE."""
    text = UNIT.read_text()
    lines = ("AmbientCapabilities=CAP_NET_BIND_SERVICE",
             "CapabilityBoundingSet=CAP_NET_BIND_SERVICE")
    for line in lines:
        assert text.count(f"\n#{line}\n") == 1, line
        text = text.replace(f"\n#{line}\n", f"\n{line}\n")
    unit = parse_unit(text)
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        assert capabilities(values(unit, key)) == {"CAP_NET_BIND_SERVICE"}, key
    ours = Path(sys.executable).with_name("dicom-router")
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_BINARY, str(ours)))
    done = subprocess.run([systemd_analyze, "verify", str(copy)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


@cache
def _syscall_group(systemd_analyze: str, group: str) -> frozenset[str]:
    """The system calls of ``@group``, nested groups expanded, as this systemd knows it."""
    done = subprocess.run([systemd_analyze, "syscall-filter", group], capture_output=True,
                          text=True, timeout=60, check=True)
    calls: set[str] = set()
    for line in done.stdout.splitlines()[1:]:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        calls |= _syscall_group(systemd_analyze, name) if name.startswith("@") else {name}
    return frozenset(calls)


def _filter_entries(unit: dict[str, list[tuple[str, str]]]) -> Iterator[tuple[bool, str]]:
    for value in values(unit, "SystemCallFilter"):
        deny = value.startswith("~")
        for name in value.lstrip("~").split():
            yield deny, name.split(":")[0]  # "name:errno" sets the error number only


def io_uring_problems(unit: dict[str, list[tuple[str, str]]], systemd_analyze: str
                      ) -> list[str]:
    """What in the unit's SystemCallFilter= lines keeps the workers from io_uring."""
    allowed: set[str] = set()
    denied: set[str] = set()
    allow_list = False
    for deny, name in _filter_entries(unit):
        calls = _syscall_group(systemd_analyze, name) if name.startswith("@") else {name}
        (denied if deny else allowed).update(calls)
        allow_list |= not deny
    problems = [f"SystemCallFilter= denies {call}" for call in IO_URING if call in denied]
    if allow_list:
        problems += [f"SystemCallFilter= does not allow {call}" for call in IO_URING
                     if call not in allowed]
    return problems


def test_no_system_call_filter_takes_io_uring_away(
        unit: dict[str, list[tuple[str, str]]], systemd_analyze: str) -> None:
    """A filter without io_uring_setup would silently force the workers' commit thread
    (workers/uring.py): fsyncs stay durable but lose the kernel's asynchronous path."""
    assert io_uring_problems(unit, systemd_analyze) == []


@pytest.mark.parametrize("line", [
    "SystemCallFilter=@basic-io @network-io @file-system",
    "SystemCallFilter=~io_uring_setup",
    "SystemCallFilter=@system-service\nSystemCallFilter=~@aio",
])
def test_the_io_uring_check_sees_a_filter_that_drops_it(line: str, systemd_analyze: str
                                                        ) -> None:
    """The check above is only worth having if it fails on such filters."""
    unit = parse_unit(f"[Service]\n{line}\n")
    assert any("io_uring_setup" in p for p in io_uring_problems(unit, systemd_analyze))


def test_sample_files_are_the_installed_ones() -> None:
    """deploy/README.md copies these; keep the list there and here the same."""
    readme = (DEPLOY / "README.md").read_text()
    for name in ("dicom-router.service", "router.toml", "rules.toml",
                 "dicom-router-metrics.service", "dicom-router-metrics.timer"):
        assert (DEPLOY / "systemd" / name).is_file()
        assert f"systemd/{name}" in readme, f"deploy/README.md does not install {name}"


METRICS = DEPLOY / "systemd" / "dicom-router-metrics.service"
METRICS_TIMER = DEPLOY / "systemd" / "dicom-router-metrics.timer"


def test_systemd_analyze_verify_accepts_the_metrics_units(systemd_analyze: str,
                                                          tmp_path: Path) -> None:
    ours = Path(sys.executable).with_name("dicom-router")
    for source in (METRICS, METRICS_TIMER):
        (tmp_path / source.name).write_text(
            source.read_text().replace(INSTALLED_BINARY, str(ours)))
    done = subprocess.run([systemd_analyze, "verify", str(tmp_path / METRICS_TIMER.name),
                           str(tmp_path / METRICS.name)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), (
        f"systemd-analyze verify: exit {done.returncode}\n{done.stdout}{done.stderr}")


def test_the_metrics_unit_writes_where_it_may(unit: dict[str, list[tuple[str, str]]]) -> None:
    """Its command parses as `status --prometheus FILE` with the router's own argparse,
    for the router's configuration, as the router's user, and FILE is in the one folder
    ProtectSystem=strict leaves it writable."""
    metrics = parse_unit(METRICS.read_text())
    argv = exec_argv(one(metrics, "ExecStart"))
    assert argv[0] == INSTALLED_BINARY
    args = build_parser().parse_args(argv[1:])
    assert args.command == "status" and args.prometheus
    assert args.config == exec_argv_config(unit)
    assert one(metrics, "User") == one(unit, "User")
    assert one(metrics, "ProtectSystem") == "strict"
    assert Path(args.prometheus).parent == Path(one(metrics, "ReadWritePaths"))
    assert one(metrics, "Type") == "oneshot"
    timer = parse_unit(METRICS_TIMER.read_text())
    assert seconds(one(timer, "OnUnitActiveSec", "Timer")) == 60


def exec_argv_config(unit: dict[str, list[tuple[str, str]]]) -> Path:
    args = build_parser().parse_args(exec_argv(one(unit, "ExecStart"))[1:])
    return Path(args.config)
