"""Router configuration: one TOML file read into one frozen :class:`Config`.

Theory of operation
-------------------
``dicom-router run [--config FILE] [--port N] [--host H] [--workers N] [--spool DIR]``
calls :func:`load_config`; ``dicom-router status`` calls it with the same
arguments to find the admin socket, and SIGHUP calls it again to reload. With no
file the router runs on :data:`EMBEDDED_DEFAULT`, which is ordinary TOML going
through the same parser, so ``config show`` can print it and it can never drift
from what the code does.

Parsing is strict, because a typo that silently falls back to a default is the
worst kind of configuration error: TOML is typed and nothing is converted (a
string is not a number, ``true`` is not ``1``), unknown tables and keys are
refused with a "did you mean", and the first problem stops the load with a
:class:`ConfigError` whose ``str()`` is one line naming the file, the line (found
by a simple scan, as tomllib gives no positions), the key and what is expected::

    router.toml:4: [router] workers: expected an integer from 1 to 256 or "auto", got "two"

The CLI prints that line and exits with code 2; a reload logs it and keeps the
configuration it has. The result is immutable and passed down explicitly
(STYLE.md §8): nothing here is a module-level setting.

Schema
------
Every table and key is optional; an empty file is the embedded default::

    [router]
    ae_title = "DICOM-ROUTER"   # our AE title (1-16 characters, case-sensitive)
    workers = "auto"            # worker processes: 1-256, or "auto" = one per CPU core
    max_associations = 1000     # open at once over all workers; past it A-ASSOCIATE-RJ

    [[router.listen]]           # repeat the table for more addresses
    host = "0.0.0.0"            # default 0.0.0.0 (every IPv4 interface)
    port = 11112                # 1-65535, default 11112
    tls = false                 # DICOM over TLS (PS3.15 Annex B); with tls = true:
    # tls_cert = "router.pem"   #   our certificate (chain) and
    # tls_key = "router.key"    #   its private key, PEM, both required;
    # tls_ca = "peers.pem"      #   optional: peers must present a certificate from these CAs
    proxy_protocol = false      # true: every connection starts with a PROXY protocol
                                # header (v1 or v2; HAProxy send-proxy[-v2]) naming the
                                # modality's address, which rules and logs then use
    # proxy_from = ["10.0.0.5", "10.1.0.0/24"]  # optional: only these may connect

    [acceptance]
    called_ae = ["DICOM-ROUTER", "ARCHIVE"]  # called AE titles answered; default
                                # [router] ae_title; "any" answers to every title
    calling_ae = ["CT1", "MR1"] # allow list of calling AE titles; default "any"
    sop_classes = ["CTImageStorage", "1.2.840.10008.5.1.4.1.1.4"]
                                # UIDs or pydicom keywords; default "storage" =
                                # every storage SOP class pydicom knows
    transfer_syntaxes = ["ExplicitVRLittleEndian", "JPEG2000Lossless"]
                                # UIDs or keywords; default "any" (what the sender proposes)
    max_pdu = 1048576           # largest PDU we receive: 4096 to 16777216 bytes

    [spool]
    path = "/var/spool/dicom-router"
    fsync = true                # false loses acknowledged instances on power loss

    [timeouts]                  # seconds; integers or decimals
    artim = 30                  # association request/release timer (PS3.8 §9.1.5)
    idle = 600                  # close an association quiet this long; 0 = never
    drain_grace = 30            # on SIGTERM, wait this long before aborting associations
    heartbeat_interval = 1      # worker heartbeat period
    heartbeat_timeout = 10      # a silent worker is restarted after this long
    operation = 3600            # a relayed C-FIND/C-MOVE/C-GET or N-service still
                                # unanswered after this long is cancelled upstream and
                                # failed to the requestor; 0 = no limit

    [admin]
    socket = "/run/dicom-router/admin.sock"  # default <spool path>/run/admin.sock

    [logging]
    level = "INFO"              # DEBUG, INFO, WARNING, ERROR or CRITICAL

    [routing]
    rules = "rules.d"           # a rule file or a folder of *.toml rule files (rules/);
                                # default: no rules, every instance is unmatched
    unmatched = "keep"          # an instance no rule routes: "keep" (in <spool>/unrouted/)
                                # or "reject" (C-STORE answered 0124H, not authorized)
    mpps = "pacs"               # relay MPPS N-CREATE/N-SET to this destination, often
                                # a RIS (PS3.4 F); default: MPPS is not served
    storage_commitment = "pacs" # relay Storage Commitment N-ACTION there, and its
                                # N-EVENT-REPORT back to the requestor (PS3.4 J)

    [[destination]]             # repeat for each destination rules forward to
    name = "pacs"               # used in rules, logs and the spool (letters, digits, - _ .)
    host = "10.1.2.3"
    port = 104
    ae_title = "PACS"           # the destination's (called) AE title
    calling_ae = "DICOM-ROUTER" # ours on this association; default [router] ae_title
    tls = false                 # DICOM over TLS (PS3.15 B.1); with tls = true, optional:
    # tls_ca = "pacs-ca.pem"    #   trust these CAs (or the node's own certificate), not
                                #   the system's trust store
    # tls_cert = "router.pem"   #   our certificate and its key (PEM), for a node that
    # tls_key = "router.key"    #   requires one (mutual TLS)
    # tls_server_name = "pacs.example.org"  # the name its certificate carries, when
                                #   host is an address the certificate does not name
    # tls_check_hostname = false  # tls_ca alone decides (a pinned certificate that
                                #   names no host); needs tls_ca
    concurrency = 2             # outbound associations, in total over all workers
    max_pdu = 1048576           # largest PDU we accept from it
    timeout = 30                # seconds for connect, negotiation and each response
    idle = 5                    # seconds an idle outbound association stays open
    retry = { initial = 2, max = 300, attempts = 20 }
                                # back-off (seconds, doubling with jitter) and how many
                                # failed deliveries before the dead-letter folder
    move_mode = "direct"        # as a C-MOVE upstream: "direct" asks it to move to the
                                # requestor's destination itself (it must know it);
                                # "proxy" to move to this router, which relays each
                                # instance (it must know the router's AE title)

Decisions worth knowing:

- Verification (C-ECHO) is always accepted, whatever ``sop_classes`` lists, in
  the transfer syntaxes listed plus implicit and explicit VR little endian: it
  is how an engineer tests a connection, and it stores nothing.
- ``"any"``/``"storage"`` is a string and a list is a list: ``calling_ae =
  "CT1"`` is refused rather than read as a one-element list, so a single title
  cannot be confused with the keyword.
- Relative paths (``[spool] path``, ``[admin] socket``) are relative to the
  folder of the configuration file, not to the working directory, so a service
  finds its spool wherever it is started from; ``~`` is expanded. ``--spool``
  on the command line is relative to the working directory, as a shell user
  expects.
- The admin socket defaults to ``<spool>/run/admin.sock``: ``status`` derives
  the same path from the same file and flags, with no other shared state. Set
  ``[admin] socket`` when the spool is on a network volume, where Unix sockets
  may not work, or when the path would exceed the 107 bytes a socket path allows.
- ``--host``/``--port`` replace the listeners with a single one (the first
  listener's host or port where a flag is missing).
- A TLS listener's certificate, key and CA files are loaded when the
  configuration is checked, so a wrong one stops start-up (or a reload) rather
  than the first association; workers load them again at start and on reload,
  so a renewed certificate takes effect with ``dicom-router reload``.
- A destination that cannot be reached is retried for ever at its back-off
  ceiling: an unreachable PACS over a weekend must not empty its queue into the
  dead-letter folder. ``retry.attempts`` counts only deliveries the destination
  answered with a failure status; a permanent failure (PS3.4 B.2.3: A9xx, Cxxx,
  0122H, 0124H; or no presentation context for the instance) goes to the
  dead-letter folder at once.
- The rule files are checked against the destination names when the router
  starts and on each reload (``rules/``), not here: ``load_config`` only
  resolves their path.
- Unknown top-level tables are refused with the list of known ones. Adding a
  table means adding it to ``_SCHEMA`` and reading it in ``_Parser.config``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeGuard

from router.dicom import uids
from router.dicom.negotiation import AcceptorPolicy
from router.tls import EncryptedKeyError, client_context, require_peer_certificates, server_context
from rules.conditions import parse_networks

__all__ = [
    "COMMAND_LINE",
    "DEFAULT_AE_TITLE",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "EMBEDDED_DEFAULT",
    "EMBEDDED_SOURCE",
    "LOG_LEVELS",
    "MAX_ASSOCIATIONS",
    "MAX_WORKERS",
    "Config",
    "ConfigError",
    "Destination",
    "Listen",
    "RetryPolicy",
    "as_reloaded",
    "cgroup_cpu_limit",
    "config_from_text",
    "default_spool_dir",
    "default_workers",
    "destination_name_problem",
    "load_config",
    "parse_config",
    "read_config_text",
]

DEFAULT_AE_TITLE: Final = "DICOM-ROUTER"
#: Hosts that bind every address (on Linux "::" takes IPv4 too, dual-stack).
_WILDCARDS: Final = frozenset({"0.0.0.0", "::", ""})
DEFAULT_HOST: Final = "0.0.0.0"
DEFAULT_PORT: Final = 11112
MAX_WORKERS: Final = 256
MAX_ASSOCIATIONS: Final = 1_000_000  # [router] max_associations: a typo guard, not a tuning
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: ``Config.source`` when no file was given.
EMBEDDED_SOURCE: Final = "<embedded default>"
#: ``ConfigError.file`` for a bad command-line override.
COMMAND_LINE: Final = "command line"

# Where the admin socket goes when [admin] socket is not set, relative to the spool.
_ADMIN_SOCKET_IN_SPOOL: Final = Path("run", "admin.sock")
# sockaddr_un.sun_path is 108 bytes on Linux, NUL included (104 on the BSDs).
_MAX_SOCKET_PATH: Final = 107
# A PDU is held whole in memory while it arrives (a P-DATA-TF's fragments are cut
# from it), so our Maximum Length (PS3.8 D.1) bounds each association's memory:
# 16 MiB at most, and never 0 (no limit), which lets a peer send an instance of any
# size as one PDU. 1 MiB (the default) already makes reads big (DESIGN.md §4).
MAX_PDU: Final = 16 << 20
MIN_PDU: Final = 4096
_UID_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]+)*")

EMBEDDED_DEFAULT: Final = """\
# dicom-router: the embedded default configuration, used when `dicom-router run`
# is given no --config file. A copy of it is a good start for your own.

[router]
ae_title = "DICOM-ROUTER"     # our AE title; also the called AE title we answer to
workers = "auto"              # one worker process per CPU core
max_associations = 1000       # open at once; more are rejected, transient ("try later")

[[router.listen]]
host = "0.0.0.0"              # every IPv4 interface
port = 11112

[acceptance]
# called_ae = ["DICOM-ROUTER"]  # default: [router] ae_title; "any" answers to every title
calling_ae = "any"            # or an allow list, e.g. ["CT1", "MR1"]
sop_classes = "storage"       # every storage SOP class, or a list of UIDs or keywords
transfer_syntaxes = "any"     # every one of the standard (PS3.6), or a list of UIDs or keywords
max_pdu = 1048576             # bytes, 4096 to 16777216

[spool]
# path = "/var/spool/dicom-router"  # default: this as root, else
#                                   # $XDG_DATA_HOME/dicom-router/spool
fsync = true                  # acknowledge an instance only once it is on disk

[timeouts]                    # seconds
artim = 30
idle = 600                    # 0 = never close an idle association
drain_grace = 30
heartbeat_interval = 1
heartbeat_timeout = 10

[admin]
# socket = "/run/dicom-router/admin.sock"  # default: <spool path>/run/admin.sock

[logging]
level = "INFO"

[routing]
# rules = "rules.d"           # a rule file or a folder of them (see rules/)
unmatched = "keep"            # no rule matched: "keep" in <spool>/unrouted/, or "reject"

# [[destination]]             # one table per node the rules forward to
# name = "pacs"
# host = "10.1.2.3"
# port = 104
# ae_title = "PACS"
"""


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


class ConfigError(Exception):
    """A configuration the router refuses; ``str()`` is one line for the operator.

    ``file`` is the path as given (or ``"command line"`` for a bad flag),
    ``key`` where in the file (``"[router] workers"``, ``"[[router.listen]] #2
    port"``, empty for whole-file problems such as TOML syntax), ``line`` the
    1-based line when it could be found.
    """

    def __init__(self, file: str, key: str, message: str, line: int | None = None) -> None:
        self.file = file
        self.key = key
        self.message = message
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        text = ": ".join(part for part in (where, self.key, self.message) if part)
        return " ".join(text.splitlines())  # one line, whatever a message contains

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str, str, int | None]]:
        return (ConfigError, (self.file, self.key, self.message, self.line))


@dataclass(frozen=True, slots=True, kw_only=True)
class Listen:
    """One address the listener accepts associations on.

    Port 0 (an ephemeral port) is allowed here for tests that build a
    :class:`Config` in code; a file or ``--port`` must name a real port.
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    tls: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # Every connection starts with a PROXY protocol header (router/proxy_protocol.py),
    # from a balancer at one of ``proxy_from`` (empty: from anywhere).
    proxy_protocol: bool = False
    proxy_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def __post_init__(self) -> None:
        if (problem := _host_problem(self.host)) is not None:
            raise ValueError(f"Listen.host: {problem}")
        if self.proxy_from and not self.proxy_protocol:
            raise ValueError("Listen: proxy_from needs proxy_protocol")
        if self.tls and (self.tls_cert is None or self.tls_key is None):
            raise ValueError("Listen: tls needs tls_cert and tls_key")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not (
            0 <= self.port <= 65535
        ):
            raise ValueError(f"Listen.port: expected 0-65535, got {self.port!r}")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (f"{host}:{self.port}" + (" (TLS)" if self.tls else "")
                + (" (PROXY protocol)" if self.proxy_protocol else ""))


_DESTINATION_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


#: Seconds a queued instance may keep failing before it goes to dead letters.
GIVE_UP_AFTER: Final = 259_200.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """When a failed delivery is tried again (DESIGN.md D4).

    The n-th retry waits ``min(max, initial * 2**(n-1))`` seconds, less a
    random jitter of up to a quarter, so that many queued instances (or many
    routers) do not retry in lock step. ``attempts`` failed deliveries that the
    destination answered move the instance to the dead-letter folder; so does
    failing for ``give_up_after`` seconds since its first failure, whatever the
    failures were: one refused A7xx while the destination took nothing else is
    not counted (the destination may be full), and without this bound an
    instance such a destination refuses for its own sake would be retried for
    ever. Three days outlasts a weekend; a dead letter is kept and can be sent
    again with ``dicom-router queue retry``.
    """

    initial: float = 2.0
    max: float = 300.0
    attempts: int = 20
    give_up_after: float = GIVE_UP_AFTER

    def __post_init__(self) -> None:
        if _seconds_problem(self.initial, zero_ok=False) or _seconds_problem(
                self.max, zero_ok=False) or self.max < self.initial:
            raise ValueError(f"RetryPolicy: expected 0 < initial <= max, got {self!r}")
        if not _is_int(self.attempts) or self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts: expected >= 1, got {self.attempts!r}")
        if _seconds_problem(self.give_up_after, zero_ok=False):
            raise ValueError(f"RetryPolicy.give_up_after: expected > 0, got "
                             f"{self.give_up_after!r}")

    def delay(self, failures: int, random: float) -> float:
        """Seconds to wait after ``failures`` consecutive failures (>= 1);
        ``random`` in [0, 1) gives the jitter."""
        base = min(self.max, self.initial * 2.0 ** min(max(failures - 1, 0), 60))
        return base * (1.0 - 0.25 * random)


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    """A DICOM node rules forward to (``[[destination]]``)."""

    name: str
    host: str
    port: int
    ae_title: str
    calling_ae: str = DEFAULT_AE_TITLE
    tls: bool = False
    tls_ca: Path | None = None
    # Ours, for a node that requires a client certificate (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # The name its certificate must carry, when that is not ``host`` (say a PACS
    # reached by IP address whose certificate names it by DNS name); also sent as SNI.
    tls_server_name: str | None = None
    tls_check_hostname: bool = True
    concurrency: int = 2
    max_pdu: int = 1_048_576
    timeout: float = 30.0
    idle: float = 5.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    move_mode: str = "direct"

    def __post_init__(self) -> None:
        problems = [
            ("name", destination_name_problem(self.name)),
            ("host", _host_problem(self.host)),
            ("port", _port_problem(self.port) if self.port else None),
            ("ae_title", ae_title_problem(self.ae_title)),
            ("calling_ae", ae_title_problem(self.calling_ae)),
            ("tls_cert", None if (self.tls_cert is None) == (self.tls_key is None)
             else "tls_cert and tls_key go together"),
            ("tls_server_name", None if self.tls_server_name is None
             else _host_problem(self.tls_server_name)),
            ("tls", None if self.tls or (self.tls_ca is None and self.tls_cert is None
                                          and self.tls_server_name is None
                                          and self.tls_check_hostname)
             else "TLS settings are given but tls is false"),
            ("concurrency", None if _is_int(self.concurrency) and 1 <= self.concurrency <= 64
             else "expected 1 to 64"),
            ("max_pdu", max_pdu_problem(self.max_pdu)),
            ("timeout", _seconds_problem(self.timeout, zero_ok=False)),
            ("idle", _seconds_problem(self.idle, zero_ok=True)),
            ("move_mode", None if self.move_mode in ("direct", "proxy")
             else f'expected "direct" or "proxy", got {self.move_mode!r}'),
        ]
        for name, problem in problems:
            if problem is not None:
                raise ValueError(f"Destination.{name}: {problem}")

    def __str__(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port}{', TLS' if self.tls else ''})"

    @property
    def tls_files(self) -> tuple[Path, ...]:
        """The TLS files it names: its CA bundle, our certificate and key."""
        return tuple(path for path in (self.tls_ca, self.tls_cert, self.tls_key)
                     if path is not None)

    def link(self) -> tuple[object, ...]:
        """What an open association to it was made with: one opened with other
        values (before a reload) is not used again. A reload that turns TLS on must
        not leave instances going out in plain text on a busy association."""
        return (self.host, self.port, self.ae_title, self.calling_ae, self.max_pdu,
                self.tls, self.tls_ca, self.tls_cert, self.tls_key, self.tls_server_name,
                self.tls_check_hostname)

    def is_peer(self, calling_ae: str, address: str) -> bool:
        """Whether an association calling from ``calling_ae`` at ``address`` is this
        node: its AE title, or an address its host name resolves to (a PACS may call
        from another AE title than it answers to). Resolves the name: blocking."""
        if calling_ae.strip() == self.ae_title:
            return True
        try:
            peer = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        try:
            return peer == ipaddress.ip_address(self.host)
        except ValueError:
            pass  # a host name
        try:
            infos = socket.getaddrinfo(self.host, None, proto=socket.IPPROTO_TCP)
        except OSError:
            return False
        return any(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) == peer
                   for info in infos)


def destination_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a destination's name, or None."""
    # The name is a directory of the spool: no separators, no dot files, short.
    if isinstance(name, str) and _DESTINATION_NAME_RE.fullmatch(name):
        return None
    return ("expected a name of 1 to 64 letters, digits, '-', '_' or '.', not starting "
            f"with '.' or '-', got {_show(name)}")


def default_workers(*, cgroup_root: Path = Path("/sys/fs/cgroup"),
                    proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """One worker per CPU this process may run on, 1 to :data:`MAX_WORKERS`.

    The affinity mask rather than ``os.cpu_count()``: a container pinned to
    two cores of a 64-core host should start two workers, not 64. And no more
    than its CPU quota allows, rounded up (:func:`cgroup_cpu_limit`): a Kubernetes
    pod with ``limits.cpu: 2`` or a unit with ``CPUQuota=200%`` sees every core
    of the node in its affinity mask, and 64 workers sharing two CPUs' worth of
    time would only cost memory and context switches.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if limit is not None:
        count = min(count, limit)
    return max(1, min(count, MAX_WORKERS))


def cgroup_cpu_limit(cgroup_root: Path = Path("/sys/fs/cgroup"),
                     proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The CPUs this process's CFS bandwidth quota allows, rounded up, or None when
    there is none (or it cannot be read).

    The process's cgroup comes from ``/proc/self/cgroup``; the quota of that cgroup
    and of each ancestor counts, the smallest wins. cgroup v2 ("0::<path>"):
    ``<root>/<path>/cpu.max``, "<quota> <period>" or "max <period>". cgroup v1
    ("<n>:...cpu...:<path>"): ``<root>/cpu/<path>/cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``, -1 being none. A container with its own cgroup namespace
    sees its cgroup as "/", at the root.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "" and line.startswith("0::"):
            base, read = cgroup_root, _cpu_max
        elif "cpu" in controllers.split(","):
            base, read = cgroup_root / "cpu", _cfs_quota
        else:
            continue
        folder = base / path.strip().lstrip("/")
        while base == folder or base in folder.parents:
            limit = read(folder)
            if limit is not None:
                limits.append(limit)
            folder = folder.parent
    return min(limits) if limits else None


def _cpu_max(folder: Path) -> int | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()
        return None if quota == "max" else _cpus(int(quota), int(period))
    except (OSError, ValueError):
        return None


def _cfs_quota(folder: Path) -> int | None:
    try:
        return _cpus(int((folder / "cpu.cfs_quota_us").read_text()),
                     int((folder / "cpu.cfs_period_us").read_text()))
    except (OSError, ValueError):
        return None


def _cpus(quota: int, period: int) -> int | None:
    return math.ceil(quota / period) if quota > 0 and period > 0 else None


def default_spool_dir(
    *, environ: Mapping[str, str] | None = None, euid: int | None = None
) -> Path:
    """Where the spool goes when neither the file nor ``--spool`` says.

    As root: ``/var/spool/dicom-router`` -- a system service, where an IT
    engineer looks for a spool (FHS §5.14). Anyone else: the per-user data
    directory of the XDG base directory spec, ``$XDG_DATA_HOME/dicom-router/spool``,
    or ``~/.local/share/dicom-router/spool`` when that is unset or relative
    (the spec says to ignore relative values). A service under its own
    unprivileged user should set ``[spool] path``. ``environ`` and ``euid``
    default to this process's; tests pass their own.
    """
    env = os.environ if environ is None else environ
    if euid is None:
        euid = os.geteuid() if hasattr(os, "geteuid") else -1
    if euid == 0:
        return Path("/var/spool/dicom-router")
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and Path(xdg).is_absolute():
        base = Path(xdg)
    else:
        home = env.get("HOME")
        base = (Path(home) if home else Path.home()) / ".local" / "share"
    return base / "dicom-router" / "spool"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything the router runs on; built by :func:`load_config`.

    - ``ae_title``: our own AE title (logs; the calling AE title of outbound
      associations once destinations exist).
    - ``ae_titles``: called AE titles we answer to; ``None`` = any.
    - ``calling_ae_allow``: calling AE titles let in; ``None`` = any.
    - ``listen``: the addresses to accept on, at least one, no duplicates.
    - ``workers``: worker processes, 1 to :data:`MAX_WORKERS`.
    - ``max_associations``: inbound associations open at once over all workers,
      each worker taking its share (rounded up); a newcomer past a worker's share is
      rejected, transient, local-limit-exceeded (PS3.8 Table 9-21), a "try later"
      that modalities retry, rather than running the worker out of descriptors.
    - ``spool``, ``admin_socket``: absolute paths.
    - ``sop_classes``: SOP class UIDs accepted; ``None`` = every storage SOP
      class (:func:`router.dicom.uids.storage_sop_classes`). Verification is
      accepted either way (see :meth:`to_acceptor_policy`).
    - ``transfer_syntaxes``: transfer syntax UIDs accepted; ``None`` = whatever
      the requestor proposes. Of several acceptable ones, the requestor's first
      choice wins (``AcceptorPolicy.prefer_requestor_order``): we forward bytes
      and do not transcode, so the sender's preference is the one that matters.
    - ``max_pdu``: our maximum PDU receive length (PS3.8 Annex D.1), 4096 to 16 MiB.
    - ``artim_timeout`` (PS3.8 §9.1.5), ``idle_timeout`` (``None`` = never),
      ``drain_grace`` (SIGTERM grace before open associations are aborted),
      ``heartbeat_interval``, ``heartbeat_timeout``: seconds.
    - ``fsync``: fsync spooled instances before acknowledging them (DESIGN D4).
    - ``destinations``: where rules may forward, by name.
    - ``rules``: the rule file or folder (absolute), ``None`` for none.
    - ``unmatched``: what happens to an instance no rule routes: ``"keep"`` it
      in the spool's ``unrouted/`` folder, or ``"reject"`` it.
    - ``mpps``, ``storage_commitment``: the destination these N-services are
      relayed to, or ``None`` (not served).
    - ``source``: the file it came from, or :data:`EMBEDDED_SOURCE`.
    """

    ae_title: str = DEFAULT_AE_TITLE
    ae_titles: frozenset[str] | None = frozenset({DEFAULT_AE_TITLE})
    calling_ae_allow: frozenset[str] | None = None
    # A factory: Listen validates with helpers defined further down this module.
    listen: tuple[Listen, ...] = field(default_factory=lambda: (Listen(),))
    workers: int = field(default_factory=default_workers)
    max_associations: int = 1000
    spool: Path
    admin_socket: Path
    sop_classes: frozenset[str] | None = None
    transfer_syntaxes: tuple[str, ...] | None = None
    max_pdu: int = 1_048_576
    artim_timeout: float = 30.0
    idle_timeout: float | None = 600.0
    drain_grace: float = 30.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    operation_timeout: float | None = 3600.0
    fsync: bool = True
    log_level: str = "INFO"
    destinations: tuple[Destination, ...] = ()
    rules: Path | None = None
    unmatched: str = "keep"
    mpps: str | None = None
    storage_commitment: str | None = None
    source: str = "<code>"

    def __post_init__(self) -> None:
        # The parser gives the operator a precise message first; these checks
        # keep a Config built in code (tests, reload plumbing) just as sound.
        problems = [
            ("ae_title", ae_title_problem(self.ae_title)),
            *(("ae_titles", ae_title_problem(t)) for t in self.ae_titles or ()),
            *(("calling_ae_allow", ae_title_problem(t)) for t in self.calling_ae_allow or ()),
            ("workers", _workers_problem(self.workers)),
            ("max_associations", _max_associations_problem(self.max_associations)),
            ("max_pdu", max_pdu_problem(self.max_pdu)),
            ("artim_timeout", _seconds_problem(self.artim_timeout, zero_ok=False)),
            ("idle_timeout", None if self.idle_timeout is None
             else _seconds_problem(self.idle_timeout, zero_ok=False)),
            ("drain_grace", _seconds_problem(self.drain_grace, zero_ok=True)),
            ("heartbeat_interval", _seconds_problem(self.heartbeat_interval, zero_ok=False)),
            ("heartbeat_timeout", _seconds_problem(self.heartbeat_timeout, zero_ok=False)),
            ("log_level", None if self.log_level in LOG_LEVELS
             else f"expected one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"),
            *(("sop_classes", _uid_problem(u)) for u in self.sop_classes or ()),
            *(("transfer_syntaxes", _uid_problem(u)) for u in self.transfer_syntaxes or ()),
        ]
        if not self.listen:
            problems.append(("listen", "expected at least one address"))
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            problems.append(("destinations", "duplicate names"))
        if self.unmatched not in ("keep", "reject"):
            problems.append(("unmatched", f'expected "keep" or "reject", got {self.unmatched!r}'))
        if len(set(self.listen)) != len(self.listen):
            problems.append(("listen", "duplicate addresses"))
        for name in ("ae_titles", "calling_ae_allow", "sop_classes", "transfer_syntaxes"):
            if getattr(self, name) is not None and not getattr(self, name):
                problems.append((name, "empty: nothing would be accepted; use None for any"))
        if self.heartbeat_timeout <= self.heartbeat_interval:
            problems.append(("heartbeat_timeout", "must exceed heartbeat_interval"))
        for name in ("spool", "admin_socket"):
            if not getattr(self, name).is_absolute():
                problems.append((name, "expected an absolute path"))
        for name, problem in problems:
            if problem is not None:
                raise ValueError(f"Config.{name}: {problem}")

    @property
    def is_embedded_default(self) -> bool:
        """True when no configuration file was given (the first log line says so)."""
        return self.source == EMBEDDED_SOURCE

    def describe(self) -> str:
        """One line for the start-up log: where the config came from and the essentials."""
        origin = "embedded default config" if self.is_embedded_default else f"config {self.source}"
        listen = ", ".join(str(item) for item in self.listen)
        plural = "" if self.workers == 1 else "s"
        return (
            f"{origin}: AE title {self.ae_title} on {listen}, "
            f"{self.workers} worker{plural}, spool {self.spool}"
        )

    def destination(self, name: str) -> Destination:
        """The destination called ``name``; KeyError if there is none."""
        for destination in self.destinations:
            if destination.name == name:
                return destination
        raise KeyError(name)

    def destination_with_ae(self, ae_title: str) -> Destination | None:
        """The (first) destination whose AE title is ``ae_title``; None if none is."""
        return next((d for d in self.destinations if d.ae_title == ae_title), None)

    def to_acceptor_policy(self) -> AcceptorPolicy:
        """The :class:`AcceptorPolicy` that ``negotiate`` answers associations with.

        Called AE titles not in ``ae_titles`` are rejected with
        called-AE-title-not-recognized, calling ones not in
        ``calling_ae_allow`` with calling-AE-title-not-recognized, and an
        association with no acceptable presentation context with no-reason
        (PS3.8 §9.3.4 Table 9-21; see :func:`router.dicom.negotiation.negotiate`).
        Each SOP class accepts ``transfer_syntaxes`` (or any); Verification
        always, in those plus the two little endian native syntaxes, since
        PS3.5 §10.1 obliges every peer to offer implicit VR little endian and
        an echo carries no dataset that could care.
        """
        classes = uids.storage_sop_classes() if self.sop_classes is None else self.sop_classes
        abstract: dict[str, tuple[str, ...] | None] = dict.fromkeys(classes)
        if self.transfer_syntaxes is None:
            abstract[uids.VERIFICATION_SOP_CLASS] = None
        else:
            native = (uids.EXPLICIT_VR_LITTLE_ENDIAN, uids.IMPLICIT_VR_LITTLE_ENDIAN)
            abstract[uids.VERIFICATION_SOP_CLASS] = tuple(
                dict.fromkeys((*self.transfer_syntaxes, *native))
            )
        return AcceptorPolicy(
            ae_titles=self.ae_titles,
            calling_ae_titles=self.calling_ae_allow,
            abstract_syntaxes=abstract,
            transfer_syntaxes=self.transfer_syntaxes,
            maximum_length=self.max_pdu,
        )


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def as_reloaded(new: Config, running: Config) -> tuple[Config, list[str]]:
    """The configuration a reload runs: ``new``, but for what only a restart changes,
    kept as in ``running``; and what those changes are ("listen addresses", "worker
    count"), for the operator.

    - The listening sockets are the supervisor's, bound at start: a listener of
      ``running`` keeps its address and its kind (TLS, PROXY protocol) and takes
      ``new``'s settings (certificates, ``proxy_from``) only where ``new`` has one
      of the same address and kind. Taken from ``new`` as it was, a port moved in
      the file left the old socket open with no listener for it: plain connections
      were served on the PROXY port and TLS ones closed (an outside campaign).
    - The worker processes are the ones started: each one's share of
      ``max_associations`` and of a destination's ``concurrency`` divides by their
      number, which a reload said waited for a restart and applied at once.
    """
    def kind(spec: Listen) -> tuple[str, int, bool, bool]:
        return spec.host, spec.port, spec.tls, spec.proxy_protocol

    offered = {kind(spec): spec for spec in new.listen}
    listen = tuple(offered.get(kind(spec), spec) for spec in running.listen)
    changed = [what for what, differs in (
        ("listen addresses", sorted(offered) != sorted(map(kind, running.listen))),
        ("worker count", new.workers != running.workers)) if differs]
    return dataclasses.replace(new, listen=listen, workers=running.workers), changed


def load_config(path: Path | None, *, overrides: Mapping[str, object] | None = None,
                check_files: bool = True) -> Config:
    """Read ``path`` (``None``: :data:`EMBEDDED_DEFAULT`) and apply command-line overrides.

    ``overrides`` are the ``run``/``status`` flags by name: ``port``, ``host``
    (int, str: replace the listeners with one), ``workers`` (int or
    ``"auto"``), ``spool`` (str or Path, relative to the working directory).
    ``None`` values are ignored, so argparse defaults can be passed straight
    through. ``check_files``: read the TLS files it names, to refuse what cannot be
    used; False for a process that does not use them (``status``, ``queue``: an
    operator may not read the private key) or that runs what the supervisor checked
    (a worker: a key replaced on disk since must not keep it from starting, and
    stop the router; it is read when a TLS association needs it). Raises
    :class:`ConfigError`.
    """
    return config_from_text(read_config_text(path), path, overrides=overrides,
                            check_files=check_files)


def config_from_text(text: str, path: Path | None, *,
                     overrides: Mapping[str, object] | None = None,
                     check_files: bool = True) -> Config:
    """The configuration ``text`` read from ``path`` (``None``: the embedded default),
    named after it in errors, its relative paths resolved against its folder; see
    :func:`load_config`. Raises :class:`ConfigError`."""
    if path is None:
        return parse_config(text, EMBEDDED_SOURCE, overrides=overrides,
                            check_files=check_files)
    return parse_config(text, str(path), base_dir=path.absolute().parent,
                        overrides=overrides, check_files=check_files)


def read_config_text(path: Path | None) -> str:
    """The text of configuration file ``path`` (``None``: :data:`EMBEDDED_DEFAULT`);
    raises :class:`ConfigError`."""
    if path is None:
        return EMBEDDED_DEFAULT
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror or exc}") from exc
    try:
        # utf-8-sig: editors on Windows write a BOM, which tomllib would call a syntax error.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(source, "", "not UTF-8 text (TOML files are UTF-8)", line) from exc


def parse_config(
    text: str,
    source: str,
    *,
    base_dir: Path | None = None,
    overrides: Mapping[str, object] | None = None,
    check_files: bool = True,
) -> Config:
    """Parse TOML ``text``; ``source`` names it in errors and in ``Config.source``.

    Relative paths in the text resolve against ``base_dir`` (the file's
    folder when called from :func:`load_config`; default the working
    directory). Raises :class:`ConfigError`.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already ends "(at line L, column C)"; keep it whole.
        found = re.search(r"at line (\d+)", str(exc))
        line = int(found[1]) if found else None
        raise ConfigError(source, "", f"invalid TOML: {exc}", line) from exc
    except RecursionError as exc:  # tomllib recurses into nested tables and arrays
        raise ConfigError(source, "", "invalid TOML: tables or arrays nested too "
                                      "deeply") from exc
    return _Parser(source, text, base_dir, overrides or {}, check_files).config(data)


# ---------------------------------------------------------------------------
# Checks shared by the parser and Config.__post_init__: a message or None
# ---------------------------------------------------------------------------


def _tls_why(exc: ssl.SSLError) -> str:
    """OpenSSL's reason for ``exc`` (an error made by hand has none)."""
    return str(getattr(exc, "reason", None) or exc.strerror or exc)


def _show(value: object) -> str:
    """A value as the operator wrote it in TOML, escaped to stay on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"  # the only TOML type left


def ae_title_problem(title: object) -> str | None:
    # PS3.5 §6.2 (AE): 16 characters of the default repertoire, no backslash
    # or control characters; leading/trailing spaces are not significant.
    if not isinstance(title, str):
        return f"expected an AE title (a string), got {_show(title)}"
    if not 1 <= len(title) <= 16 or not title.strip(" "):
        return f"expected an AE title of 1 to 16 characters, got {_show(title)}"
    if title != title.strip(" "):
        return f"AE title {_show(title)} has leading or trailing spaces, which DICOM ignores"
    if not title.isascii() or not title.isprintable() or "\\" in title:
        return (
            f"AE title {_show(title)} may not contain a backslash, control or non-ASCII "
            "characters"
        )
    return None


def _host_problem(host: object) -> str | None:
    if not isinstance(host, str):
        return f"expected a host name or IP address (a string), got {_show(host)}"
    if not host or any(c.isspace() for c in host) or not host.isprintable():
        return f"expected a host name or IP address, got {_show(host)}"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            # What the resolver and TLS's server name will do with it: an empty
            # label ("pacs..org") or one over 63 characters failed each connection.
            host.encode("idna")
        except UnicodeError:
            return (f"expected a host name or IP address, got {_show(host)} (an empty "
                    "label, or one longer than 63 characters)")
    return None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML's true is no 1


def _port_problem(port: object) -> str | None:
    if _is_int(port) and 1 <= port <= 65535:
        return None
    return f"expected an integer from 1 to 65535, got {_show(port)}"


def _max_associations_problem(count: object) -> str | None:
    if _is_int(count) and 1 <= count <= MAX_ASSOCIATIONS:
        return None
    return f"expected an integer from 1 to {MAX_ASSOCIATIONS}, got {_show(count)}"


def _workers_problem(workers: object) -> str | None:
    if _is_int(workers) and 1 <= workers <= MAX_WORKERS:
        return None
    return f'expected an integer from 1 to {MAX_WORKERS} or "auto", got {_show(workers)}'


def max_pdu_problem(size: object) -> str | None:
    if _is_int(size) and MIN_PDU <= size <= MAX_PDU:
        return None
    why = (" (0, no limit, would let a peer send a whole instance as one PDU, held in "
           "memory)" if size == 0 else "")
    return f"expected an integer from {MIN_PDU} to {MAX_PDU}{why}, got {_show(size)}"


def _attempts_problem(value: object) -> str | None:
    if _is_int(value) and 1 <= value <= 1_000_000:
        return None
    return f"expected an integer from 1 to 1000000, got {_show(value)}"


def _concurrency_problem(value: object) -> str | None:
    if _is_int(value) and 1 <= value <= 64:
        return None
    return f"expected an integer from 1 to 64, got {_show(value)}"


def _seconds_problem(seconds: object, *, zero_ok: bool) -> str | None:
    # An integer is a fine number of seconds; a bool or a string is not.
    if (
        isinstance(seconds, int | float)
        and not isinstance(seconds, bool)
        and math.isfinite(seconds)
        and (seconds >= 0 if zero_ok else seconds > 0)
    ):
        return None
    bound = ">= 0" if zero_ok else "> 0"
    return f"expected a number of seconds {bound}, got {_show(seconds)}"


def _uid_problem(uid: str) -> str | None:
    # PS3.5 §9.1: digits and dots, at most 64 characters. Leading zeros in a
    # component are tolerated, as from peers: vendor UIDs sometimes have them.
    if len(uid) <= 64 and _UID_RE.fullmatch(uid):
        return None
    return f"{_show(uid)} is not a UID (digits and dots, at most 64 characters)"


def _uid_type(uid: str) -> str | None:
    from pydicom._uid_dict import UID_dictionary

    entry = UID_dictionary.get(uid)
    return None if entry is None else str(entry[1])


# pydicom's UID types in the words our messages use for the two we ask for.
_KIND_NAMES: Final = {
    "SOP Class": "SOP class",
    "Meta SOP Class": "meta SOP class",
    "Transfer Syntax": "transfer syntax",
}


def _squash(name: str) -> str:
    # "CT Image Storage", "ct_image_storage" and "CTImageStorage" all meet here.
    return "".join(c for c in name.lower() if c.isalnum())


def _suggest(name: str, candidates: Sequence[str]) -> str | None:
    """The closest candidate, for "did you mean"; case and punctuation ignored."""
    by_squashed = {_squash(c): c for c in candidates}
    if _squash(name) in by_squashed:
        return by_squashed[_squash(name)]
    close = difflib.get_close_matches(_squash(name), list(by_squashed), n=1, cutoff=0.75)
    return by_squashed[close[0]] if close else None


# ---------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------

# Every table and its keys, in documentation order; the single list of what a
# file may contain. A new table (e.g. [[destination]]) starts with a line here.
_SCHEMA: Final[dict[tuple[str, ...], tuple[str, ...]]] = {
    ("router",): ("ae_title", "workers", "max_associations", "listen"),
    ("router", "listen"): ("host", "port", "tls", "tls_cert", "tls_key", "tls_ca",
                           "proxy_protocol", "proxy_from"),
    ("acceptance",): ("called_ae", "calling_ae", "sop_classes", "transfer_syntaxes", "max_pdu"),
    ("spool",): ("path", "fsync"),
    ("timeouts",): ("artim", "idle", "drain_grace", "heartbeat_interval", "heartbeat_timeout",
                    "operation"),
    ("admin",): ("socket",),
    ("logging",): ("level",),
    ("routing",): ("rules", "unmatched", "mpps", "storage_commitment"),
    ("destination",): ("name", "host", "port", "ae_title", "calling_ae", "tls", "tls_ca",
                       "tls_cert", "tls_key", "tls_server_name", "tls_check_hostname",
                       "concurrency", "max_pdu", "timeout", "idle", "retry", "move_mode"),
    ("destination", "retry"): ("initial", "max", "attempts", "give_up_after"),
}
_TOP_LEVEL: Final = tuple(table[0] for table in _SCHEMA if len(table) == 1)
_ARRAYS_OF_TABLES: Final = frozenset({("router", "listen"), ("destination",)})
_OVERRIDES: Final = ("port", "host", "workers", "spool")


@dataclass(frozen=True, slots=True, kw_only=True)
class _At:
    """Where a value sits: its label in messages and what to scan for its line."""

    table: tuple[str, ...] = ()
    index: int | None = None  # position in an array of tables, 0-based
    key: str | None = None
    item: str | None = None  # an offending array item, to find its own line

    def label(self) -> str:
        if not self.table:
            return self.key or ""
        name = ".".join(self.table)
        head = f"[{name}]" if self.index is None else f"[[{name}]] #{self.index + 1}"
        return head if self.key is None else f"{head} {self.key}"

    def __call__(self, key: str) -> _At:
        return dataclasses.replace(self, key=key)

    @property
    def name(self) -> str:
        """The key, for the places that always have one."""
        assert self.key is not None
        return self.key


def _table_label(table: tuple[str, ...]) -> str:
    name = ".".join(table)
    return f"[[{name}]]" if table in _ARRAYS_OF_TABLES else f"[{name}]"


_HEADER_RE: Final = re.compile(r"\s*(\[\[?)([^\[\]]+)\]\]?\s*(?:#.*)?$")


def _find_line(text: str, at: _At) -> int | None:
    """The 1-based line of ``at`` in ``text``, found by a plain scan, or None.

    tomllib reports no positions, so this follows table headers and looks for
    ``key =`` (or ``key.``) in the right one, then for the offending item
    quoted after it. Inline tables and odd quoting are not followed: the
    message is still complete without a line number.
    """
    lines = text.splitlines()
    seen: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    index: int | None = None
    key_re = None
    if at.key is not None:
        key = re.escape(at.key)
        key_re = re.compile(rf"""\s*(?:{key}|"{key}"|'{key}')\s*[.=]""")
    for number, line in enumerate(lines, 1):
        header = _HEADER_RE.match(line)
        if header:
            table = tuple(part.strip().strip("\"'") for part in header[2].split("."))
            index = None
            if header[1] == "[[":
                index = seen[table] = seen.get(table, -1) + 1
            if at.key is None and table == at.table and (at.index is None or index == at.index):
                return number
            # A sub-table [a.key] stands for the key itself when the key is a table.
            if at.key is not None and table == (*at.table, at.key):
                return number
            continue
        if key_re is None or table != at.table or index != at.index or not key_re.match(line):
            continue
        if at.item is None:
            return number
        for offset, later in enumerate(lines[number - 1 :]):
            if offset and _HEADER_RE.match(later):
                break
            if json.dumps(at.item) in later or f"'{at.item}'" in later:
                return number + offset
        return number
    return None


class _Parser:
    """Walks the parsed TOML once, validating as it builds a :class:`Config`."""

    def __init__(
        self, source: str, text: str, base_dir: Path | None, overrides: Mapping[str, object],
        check_files: bool = True,
    ) -> None:
        self.source = source
        self.check_files = check_files
        self.text = text
        self.base_dir = base_dir
        self.overrides = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(self.overrides) - set(_OVERRIDES)
        if unknown:  # a bug in the caller, not an operator mistake
            raise ValueError(f"unknown overrides {sorted(unknown)}; known: {_OVERRIDES}")

    def fail(self, at: _At, message: str) -> ConfigError:
        return ConfigError(self.source, at.label(), message, _find_line(self.text, at))

    def fail_flag(self, name: str, message: str) -> ConfigError:
        return ConfigError(COMMAND_LINE, f"--{name}", message)

    # -- structure ---------------------------------------------------------

    def config(self, data: dict[str, object]) -> Config:
        self.check_keys(data, _At(), _TOP_LEVEL)
        router = self.section(data, "router")
        acceptance = self.section(data, "acceptance")
        spool = self.section(data, "spool")
        timeouts = self.section(data, "timeouts")
        admin = self.section(data, "admin")
        logging = self.section(data, "logging")
        routing = self.section(data, "routing")

        at = _At(table=("router",))
        ae_title = self.ae_title(router, at("ae_title"), DEFAULT_AE_TITLE)
        workers = self.workers(router, at("workers"))
        max_associations = self.integer(router, at("max_associations"), 1000,
                                        _max_associations_problem)
        listen = self.listen(router, at("listen"))

        at = _At(table=("acceptance",))
        called = self.ae_titles(acceptance, at("called_ae"), frozenset({ae_title}))
        calling = self.ae_titles(acceptance, at("calling_ae"), None)
        sop_classes = self.uids(acceptance, at("sop_classes"), "storage", "SOP class")
        syntaxes = self.uids(acceptance, at("transfer_syntaxes"), "any", "transfer syntax")
        max_pdu = self.integer(acceptance, at("max_pdu"), 1_048_576, max_pdu_problem)

        at = _At(table=("spool",))
        spool_path = self.spool_path(spool, at("path"))
        fsync = self.boolean(spool, at("fsync"), True)

        at = _At(table=("timeouts",))
        artim = self.seconds(timeouts, at("artim"), 30.0, zero_ok=False)
        idle = self.seconds(timeouts, at("idle"), 600.0, zero_ok=True)
        drain_grace = self.seconds(timeouts, at("drain_grace"), 30.0, zero_ok=True)
        beat = self.seconds(timeouts, at("heartbeat_interval"), 1.0, zero_ok=False)
        beat_timeout = self.seconds(timeouts, at("heartbeat_timeout"), 10.0, zero_ok=False)
        operation = self.seconds(timeouts, at("operation"), 3600.0, zero_ok=True)
        if beat_timeout <= beat:
            raise self.fail(
                at("heartbeat_timeout"),
                f"expected more than heartbeat_interval ({_show(beat)}), got {_show(beat_timeout)}",
            )

        admin_socket = self.admin_socket(admin, _At(table=("admin",), key="socket"), spool_path)
        level = self.log_level(logging, _At(table=("logging",), key="level"))

        at = _At(table=("routing",))
        rules = self.path(routing, at("rules"))
        if rules is not None and self.check_files and not rules.exists():
            # Said here, with the file, line and key, not later by the rules loader
            # with the path alone.
            raise self.fail(at("rules"), f"no such file or folder: {rules}")
        unmatched = self.string(routing, at("unmatched"), "keep")
        if unmatched not in ("keep", "reject"):
            raise self.fail(at("unmatched"), f'expected "keep" or "reject", got {_show(unmatched)}')
        destinations = self.destinations(data, ae_title)
        relays: dict[str, str | None] = {}
        for key in ("mpps", "storage_commitment"):
            if key not in routing:
                relays[key] = None
                continue
            name = self.string(routing, at(key), "")
            if not any(d.name == name for d in destinations):
                known = ", ".join(d.name for d in destinations) or "none"
                raise self.fail(at(key), f"{_show(name)} is not a [[destination]] name "
                                         f"(known: {known})")
            relays[key] = name

        return Config(
            ae_title=ae_title,
            ae_titles=called,
            calling_ae_allow=calling,
            listen=listen,
            workers=workers,
            max_associations=max_associations,
            spool=spool_path,
            admin_socket=admin_socket,
            sop_classes=None if sop_classes is None else frozenset(sop_classes),
            transfer_syntaxes=syntaxes,
            max_pdu=max_pdu,
            artim_timeout=artim,
            idle_timeout=idle or None,  # 0 in the file means "never"
            drain_grace=drain_grace,
            heartbeat_interval=beat,
            heartbeat_timeout=beat_timeout,
            operation_timeout=operation or None,  # 0 in the file means "no limit"
            fsync=fsync,
            log_level=level,
            destinations=destinations,
            rules=rules,
            unmatched=unmatched,
            mpps=relays["mpps"],
            storage_commitment=relays["storage_commitment"],
            source=self.source,
        )

    def destinations(self, data: Mapping[str, object], ae_title: str) -> tuple[Destination, ...]:
        value = data.get("destination", [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(_At(key="destination"),
                            f"expected [[destination]] tables, got {_show(value)}")
        out: list[Destination] = []
        for index, entry in enumerate(value):
            at = _At(table=("destination",), index=index)
            self.check_keys(entry, at, _SCHEMA[("destination",)])
            for required in ("name", "host", "port", "ae_title"):
                if required not in entry:
                    raise self.fail(at, f'"{required}" is missing (name, host, port and '
                                        "ae_title are required)")
            name = entry["name"]
            if (problem := destination_name_problem(name)) is not None:
                raise self.fail(at("name"), problem)
            assert isinstance(name, str)
            if any(d.name == name for d in out):
                raise self.fail(at("name"), f"a destination named {_show(name)} is already "
                                            "defined")
            host = self.string(entry, at("host"), "")
            if (problem := _host_problem(host)) is not None:
                raise self.fail(at("host"), problem)
            retry = self.retry(entry, at("retry"))
            out.append(Destination(
                name=name,
                host=host,
                port=self.integer(entry, at("port"), 104, _port_problem),
                ae_title=self.ae_title(entry, at("ae_title"), ""),
                calling_ae=self.ae_title(entry, at("calling_ae"), ae_title),
                **self.destination_tls(entry, at),
                concurrency=self.integer(entry, at("concurrency"), 2, _concurrency_problem),
                max_pdu=self.integer(entry, at("max_pdu"), 1_048_576, max_pdu_problem),
                timeout=self.seconds(entry, at("timeout"), 30.0, zero_ok=False),
                idle=self.seconds(entry, at("idle"), 5.0, zero_ok=True),
                retry=retry,
                move_mode=self.move_mode(entry, at("move_mode")),
            ))
        return tuple(out)

    def move_mode(self, entry: Mapping[str, object], at: _At) -> str:
        value = self.string(entry, at, "direct")
        if value not in ("direct", "proxy"):
            raise self.fail(at, f'expected "direct" or "proxy", got {_show(value)}')
        return value

    def retry(self, entry: Mapping[str, object], at: _At) -> RetryPolicy:
        """``retry = { initial, max, attempts }``; errors name "retry" and its key."""
        value = entry.get("retry", {})
        if not isinstance(value, dict):
            raise self.fail(at, "expected a table { initial, max, attempts, give_up_after }, "
                                f"got {_show(value)}")
        known = _SCHEMA[("destination", "retry")]
        for key in value:
            if key not in known:
                guess = _suggest(key, known)
                hint = f'; did you mean "{guess}"?' if guess else ""
                raise self.fail(at, f"unknown key {key!r}{hint} (known keys: {', '.join(known)})")
        problems = {
            "initial": _seconds_problem(value.get("initial", 2.0), zero_ok=False),
            "max": _seconds_problem(value.get("max", 300.0), zero_ok=False),
            "attempts": _attempts_problem(value.get("attempts", 20)),
            "give_up_after": _seconds_problem(value.get("give_up_after", GIVE_UP_AFTER),
                                              zero_ok=False),
        }
        for key, problem in problems.items():
            if problem is not None:
                raise self.fail(at, f"{key}: {problem}")
        initial = float(value.get("initial", 2.0))
        ceiling = float(value.get("max", 300.0))
        if ceiling < initial:
            raise self.fail(at, f"max: expected at least initial ({_show(initial)}), got "
                                f"{_show(ceiling)}")
        attempts = value.get("attempts", 20)
        assert isinstance(attempts, int)
        return RetryPolicy(initial=initial, max=ceiling, attempts=attempts,
                           give_up_after=float(value.get("give_up_after", GIVE_UP_AFTER)))

    def check_keys(self, table: Mapping[str, object], at: _At, known: Sequence[str]) -> None:
        for key, value in table.items():
            if key in known:
                continue
            top = not at.table
            is_table = isinstance(value, dict)
            if top and is_table:
                where = _At(table=(key,))
                guess = _suggest(key, _TOP_LEVEL)
                hint = f"; did you mean [{guess}]?" if guess else ""
                known_list = ", ".join(f"[{name}]" for name in known)
                raise self.fail(where, f"unknown table{hint} (known tables: {known_list})")
            guess = _suggest(key, known)
            if guess is not None:
                hint = f'; did you mean "{guess}"?'
            else:
                # The right key in the wrong table is a common slip: say where it lives.
                home = next((t for t, keys in _SCHEMA.items() if key in keys), None)
                hint = f"; it belongs in {_table_label(home)}" if home else ""
            if top:
                tables = ", ".join(f"[{name}]" for name in known)
                message = f"unknown top-level key{hint} (known tables: {tables})"
            else:
                message = f"unknown key{hint} (known keys: {', '.join(known)})"
            raise self.fail(at(key), message)

    def section(self, data: Mapping[str, object], name: str) -> dict[str, object]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise self.fail(_At(key=name), f"expected a table [{name}], got {_show(value)}")
        self.check_keys(value, _At(table=(name,)), _SCHEMA[(name,)])
        return value

    # -- scalars -----------------------------------------------------------

    def string(self, table: Mapping[str, object], at: _At, default: str) -> str:
        value = table.get(at.name, default)
        if not isinstance(value, str):
            raise self.fail(at, f"expected a string, got {_show(value)}")
        return value

    def boolean(self, table: Mapping[str, object], at: _At, default: bool) -> bool:
        value = table.get(at.name, default)
        if not isinstance(value, bool):
            raise self.fail(at, f"expected true or false, got {_show(value)}")
        return value

    def integer(
        self,
        table: Mapping[str, object],
        at: _At,
        default: int,
        problem: Callable[[object], str | None],
    ) -> int:
        value = table.get(at.name, default)
        if (message := problem(value)) is not None:
            raise self.fail(at, message)
        assert isinstance(value, int)  # problem() checked it
        return value

    def seconds(
        self, table: Mapping[str, object], at: _At, default: float, *, zero_ok: bool
    ) -> float:
        value = table.get(at.name, default)
        if (message := _seconds_problem(value, zero_ok=zero_ok)) is not None:
            raise self.fail(at, message)
        assert isinstance(value, int | float)  # _seconds_problem checked it
        return float(value)

    def ae_title(self, table: Mapping[str, object], at: _At, default: str) -> str:
        value = table.get(at.name, default)
        if (problem := ae_title_problem(value)) is not None:
            raise self.fail(at, problem)
        assert isinstance(value, str)  # ae_title_problem checked it
        return value

    def workers(self, router: Mapping[str, object], at: _At) -> int:
        # The file's value is checked even when --workers wins, so that a
        # latent error does not surface only once the flag is dropped.
        value = router.get("workers", "auto")
        if value != "auto" and (message := _workers_problem(value)) is not None:
            raise self.fail(at, message)
        flag = self.overrides.get("workers")
        if flag is not None:
            if flag != "auto" and (message := _workers_problem(flag)) is not None:
                raise self.fail_flag("workers", message)
            value = flag
        if value == "auto":
            return default_workers()
        assert isinstance(value, int)  # _workers_problem checked it
        return value

    def log_level(self, table: Mapping[str, object], at: _At) -> str:
        value = self.string(table, at, "INFO")
        # Level names are not case-sensitive to Python's logging; spare the operator.
        if value.upper() in LOG_LEVELS:
            return value.upper()
        raise self.fail(at, f"expected one of {', '.join(LOG_LEVELS)}, got {_show(value)}")

    # -- lists -------------------------------------------------------------

    def ae_titles(
        self, table: Mapping[str, object], at: _At, default: frozenset[str] | None
    ) -> frozenset[str] | None:
        if at.name not in table:
            return default
        value = table[at.name]
        if value == "any":
            return None
        if not isinstance(value, list):
            raise self.fail(at, f'expected "any" or an array of AE titles, got {_show(value)}')
        if not value:
            raise self.fail(at, 'expected "any" or an array of AE titles, got an empty array')
        for title in value:
            if (problem := ae_title_problem(title)) is not None:
                item = title if isinstance(title, str) else None
                raise self.fail(dataclasses.replace(at, item=item), problem)
        return frozenset(value)

    def uids(
        self, table: Mapping[str, object], at: _At, any_word: str, kind: str
    ) -> tuple[str, ...] | None:
        """A list of UIDs or pydicom keywords of ``kind``, in order, without repeats."""
        if at.name not in table:
            return None
        value = table[at.name]
        if value == any_word:
            return None
        expected = f'expected "{any_word}" or an array of {kind} UIDs or keywords'
        if not isinstance(value, list):
            raise self.fail(at, f"{expected}, got {_show(value)}")
        if not value:
            raise self.fail(at, f"{expected}, got an empty array")
        found: dict[str, None] = {}
        for entry in value:
            if not isinstance(entry, str):
                raise self.fail(at, f"{expected}, got an item {_show(entry)}")
            found[self.uid(entry, dataclasses.replace(at, item=entry), kind)] = None
        return tuple(found)

    def uid(self, entry: str, at: _At, kind: str) -> str:
        types = ("SOP Class", "Meta SOP Class") if kind == "SOP class" else ("Transfer Syntax",)
        if entry[:1].isdigit():
            if (problem := _uid_problem(entry)) is not None:
                raise self.fail(at, problem)
            # Unknown UIDs are fine (private SOP classes); a known one of another kind is not.
            known_type = _uid_type(entry)
            if known_type is not None and known_type not in types:
                what = _KIND_NAMES.get(known_type, known_type)
                raise self.fail(at, f"{entry} is a {what} UID, not a {kind}")
            return entry
        keywords = uids.uid_keywords()
        if entry in keywords:
            uid, uid_type = keywords[entry]
            if uid_type not in types:
                what = _KIND_NAMES.get(uid_type, uid_type)
                raise self.fail(at, f"{_show(entry)} is a {what}, not a {kind}")
            return uid
        guess = _suggest(entry, [k for k, (_, t) in keywords.items() if t in types])
        hint = f'; did you mean "{guess}"?' if guess else ""
        raise self.fail(at, f"unknown {kind} {_show(entry)}{hint}")

    def listen(self, router: Mapping[str, object], at: _At) -> tuple[Listen, ...]:
        value = router.get("listen", [{}])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(at, f"expected [[router.listen]] tables, got {_show(value)}")
        if not value:
            raise self.fail(at, "expected at least one [[router.listen]] table, got none")
        out: list[Listen] = []
        for index, entry in enumerate(value):
            where = _At(table=("router", "listen"), index=index)
            self.check_keys(entry, where, _SCHEMA[("router", "listen")])
            host = self.string(entry, where("host"), DEFAULT_HOST)
            if (problem := _host_problem(host)) is not None:
                raise self.fail(where("host"), problem)
            port = self.integer(entry, where("port"), DEFAULT_PORT, _port_problem)
            listen = Listen(host=host, port=port, **self.listen_tls(entry, where),
                            **self.listen_proxy(entry, where))
            for number, earlier in enumerate(out, 1):
                if (earlier.host, earlier.port) == (host, port):
                    raise self.fail(where, f"{listen} is already listed as #{number}")
                if earlier.port != port:
                    continue
                wildcard = next((h for h in (earlier.host, host) if h in _WILDCARDS), None)
                if wildcard is not None:
                    # Bound at start, the second failed "Address already in use", exit 1
                    # (worth a retry: the unit restarted it every 5 s for ever).
                    raise self.fail(where("host") if "host" in entry else where,
                                    f"{listen} and listener #{number}, {earlier}, overlap: "
                                    f"{wildcard} is every address of this machine on port "
                                    f"{port}; give the port to one of them")
                # The port tells the workers which connections are TLS ones, and
                # which start with a PROXY header.
                for key in ("tls", "proxy_protocol", "proxy_from"):
                    theirs = getattr(earlier, key)
                    if theirs != getattr(listen, key):
                        shown = (f"[{', '.join(str(n) for n in theirs)}]"
                                 if key == "proxy_from" else _show(theirs))
                        raise self.fail(where(key) if key in entry else where,
                                        f"listener #{number} on port {port} has {key} = "
                                        f"{shown}: listeners sharing a port must agree on {key}")
            out.append(listen)
        return self.listen_flags(tuple(out))

    def listen_tls(self, entry: Mapping[str, object], where: _At) -> dict[str, Any]:
        """A listener's tls, tls_cert, tls_key and tls_ca, checked by loading them."""
        tls = self.boolean(entry, where("tls"), False)
        paths = {key: self.path(entry, where(key)) for key in ("tls_cert", "tls_key", "tls_ca")}
        if not tls:
            for key, value in paths.items():
                if value is not None:
                    raise self.fail(where(key), f"{key} is set but tls is false")
            return {}
        for name in ("tls_cert", "tls_key"):
            if paths[name] is None:
                raise self.fail(where("tls"), f"tls = true needs {name} (a PEM file)")
        cert, private, ca = paths["tls_cert"], paths["tls_key"], paths["tls_ca"]
        assert cert is not None and private is not None
        if self.check_files:
            self.readable(paths, where)
            context = self.key_pair(lambda: server_context(cert, private), cert, private,
                                    where("tls_key"))
            if ca is not None:
                self.trusted(context, ca, where("tls_ca"))
        return {"tls": True, "tls_cert": cert, "tls_key": private, "tls_ca": ca}

    def destination_tls(self, entry: Mapping[str, object], at: _At) -> dict[str, Any]:
        """A destination's tls settings, its files checked by loading them: else each
        delivery failed on them, unseen until someone looked at the queue."""
        tls = self.boolean(entry, at("tls"), False)
        paths = {key: self.path(entry, at(key)) for key in ("tls_ca", "tls_cert", "tls_key")}
        server_name = entry.get("tls_server_name")
        if server_name is not None and (problem := _host_problem(server_name)) is not None:
            raise self.fail(at("tls_server_name"), problem)
        if isinstance(server_name, str):
            # The absolute form names the same host; certificates never carry the dot.
            server_name = server_name.rstrip(".") or server_name
        check_hostname = self.boolean(entry, at("tls_check_hostname"), True)
        given = [key for key in ("tls_ca", "tls_cert", "tls_key", "tls_server_name",
                                 "tls_check_hostname") if key in entry]
        if not tls:
            if given:
                raise self.fail(at(given[0]), f"{given[0]} is set but tls is false")
            return {}
        ca, cert, private = paths["tls_ca"], paths["tls_cert"], paths["tls_key"]
        if (cert is None) != (private is None):
            missing = "tls_key" if private is None else "tls_cert"
            raise self.fail(at("tls_key" if cert is None else "tls_cert"),
                            f"{missing} is missing: a client certificate needs tls_cert "
                            "and tls_key (PEM files)")
        if not check_hostname and ca is None:
            raise self.fail(at("tls_check_hostname"),
                            "tls_check_hostname = false needs tls_ca: without a host name "
                            "to check, a certificate any public CA issued to anybody "
                            "would be accepted")
        if not check_hostname and server_name is not None:
            raise self.fail(at("tls_server_name"), "tls_server_name is the host name to "
                                                   "check, but tls_check_hostname is false")
        if self.check_files:
            self.readable(paths, at)
            if ca is not None:
                # A context without the system's trust store: counting its
                # certificates must count tls_ca's alone (a CRL file holds none).
                self.trusted(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), ca, at("tls_ca"))
            if cert is not None:
                self.key_pair(lambda: client_context(ca=ca, cert=cert, key=private,
                                                     check_hostname=check_hostname),
                              cert, private, at("tls_key"))
        return {"tls": True, "tls_ca": ca, "tls_cert": cert, "tls_key": private,
                "tls_server_name": server_name, "tls_check_hostname": check_hostname}

    def key_pair(self, load: Callable[[], ssl.SSLContext], cert: Path | None,
                 private: Path | None, at: _At) -> ssl.SSLContext:
        """The context ``load`` makes with certificate ``cert`` and key ``private``,
        or a one-line failure at ``at`` saying what is wrong with them."""
        try:
            return load()
        except EncryptedKeyError:
            raise self.fail(at, f"{private} is encrypted, and the router cannot ask for its "
                                "pass phrase: give it the key unencrypted, readable by its "
                                "account only") from None
        except ssl.SSLError as exc:
            raise self.fail(at, f"{cert} and {private} are not a PEM certificate and its "
                                f"private key ({_tls_why(exc)})") from None

    def readable(self, paths: Mapping[str, Path | None], where: _At) -> None:
        for name, path in paths.items():
            if path is not None:
                try:
                    path.open("rb").close()
                except OSError as exc:
                    raise self.fail(where(name), f"cannot read {path}: {exc.strerror}") from None

    def trusted(self, context: ssl.SSLContext, ca: Path, at: _At) -> None:
        """Check ``tls_ca`` by loading it into ``context``."""
        try:
            require_peer_certificates(context, ca)
        except ssl.SSLError as exc:
            raise self.fail(at, f"{ca} holds no PEM certificate ({_tls_why(exc)})") from None

    def listen_proxy(self, entry: Mapping[str, object], where: _At) -> dict[str, Any]:
        """A listener's proxy_protocol and proxy_from (addresses or CIDR networks)."""
        proxy = self.boolean(entry, where("proxy_protocol"), False)
        if "proxy_from" not in entry:
            return {"proxy_protocol": proxy}
        at = where("proxy_from")
        if not proxy:
            raise self.fail(at, "proxy_from is set but proxy_protocol is false")
        value = entry["proxy_from"]
        if not isinstance(value, list) or not value or \
                not all(isinstance(v, str) for v in value):
            raise self.fail(at, "expected a non-empty list of IP addresses or networks "
                                f"(CIDR, strings), got {_show(value)}")
        try:
            networks = parse_networks(value)
        except ValueError as exc:
            raise self.fail(at, str(exc)) from None
        return {"proxy_protocol": True, "proxy_from": networks}

    def listen_flags(self, listen: tuple[Listen, ...]) -> tuple[Listen, ...]:
        host, port = self.overrides.get("host"), self.overrides.get("port")
        if host is None and port is None:
            return listen
        if host is not None and (message := _host_problem(host)) is not None:
            raise self.fail_flag("host", message)
        if port is not None and (message := _port_problem(port)) is not None:
            raise self.fail_flag("port", message)
        if len(listen) > 1:
            # Which of them would the flag move? It replaced them all with the first,
            # moved: a TLS or PROXY listener beside it was gone without a word (an
            # outside campaign).
            raise self.fail_flag("port" if port is not None else "host",
                                 f"the configuration has {len(listen)} listeners "
                                 "([[router.listen]]); --host and --port apply to one: "
                                 "change them in the file")
        first = listen[0]
        return (
            dataclasses.replace(
                first,
                host=host if isinstance(host, str) else first.host,
                port=port if isinstance(port, int) else first.port,
            ),
        )

    # -- paths -------------------------------------------------------------

    def path(self, table: Mapping[str, object], at: _At) -> Path | None:
        if at.name not in table:
            return None
        value = table[at.name]
        if not isinstance(value, str):
            raise self.fail(at, f"expected a path (a string), got {_show(value)}")
        if not value or "\0" in value:
            raise self.fail(at, f"expected a path, got {_show(value)}")
        path = Path(value).expanduser()
        if path.is_absolute():
            return path
        # Relative to the configuration file, wherever the router was started from.
        return (self.base_dir or Path.cwd()) / path

    def spool_path(self, spool: Mapping[str, object], at: _At) -> Path:
        from_file = self.path(spool, at)  # checked even when --spool wins, as for workers
        flag = self.overrides.get("spool")
        if flag is None:
            return from_file or default_spool_dir()
        if not isinstance(flag, str | os.PathLike) or not os.fspath(flag):
            raise self.fail_flag("spool", f"expected a directory, got {flag!r}")
        return Path(flag).expanduser().absolute()  # relative to the shell's directory

    def admin_socket(self, admin: Mapping[str, object], at: _At, spool: Path) -> Path:
        explicit = self.path(admin, at)
        socket = explicit or spool / _ADMIN_SOCKET_IN_SPOOL
        size = len(os.fsencode(socket))
        if size > _MAX_SOCKET_PATH:
            what = f"{_show(str(socket))} is" if explicit else f"the default {socket} is"
            raise self.fail(
                at,
                f"{what} {size} bytes long, more than the {_MAX_SOCKET_PATH} a Unix socket "
                "path allows; set [admin] socket to a shorter path",
            )
        return socket
