"""Store and forward end to end: storescu -> (router | naive forwarder) -> storescp.

Prints, in one run, for three scenarios (``--only`` picks one):

``500k`` and ``2k``: ~500 KB CT instances (400 per run), then ~2 KB ones (2000
per run), sent by 2 DCMTK storescu streams in parallel (each its own folder,
``storescu +sd``), instances/s and MB/s of

    (a) direct: storescu -> DCMTK ``storescp --fork -od DIR`` (a process per
        association, so both streams are served at once; files written, no
        fsync: DCMTK has none);
    (b) storescu -> ``dicom-router run`` (2 workers, fsync on, one rule
        forwarding everything to one destination with ``concurrency = 2``,
        which ``--concurrency`` changes) -> the same storescp;
    (c) storescu -> a naive pynetdicom forwarder -> the same storescp. It is the
        forwarder a site engineer writes with pynetdicom: an AE whose C-STORE
        handler sends each instance on over an association it keeps open (one
        per inbound association, so the two streams stay two streams; opened at
        the first instance, released with the inbound one) and answers with the
        downstream status; no spool, pynetdicom's defaults otherwise. It runs in
        its own process (this script with ``--naive-forwarder``), so its CPU
        time is its own. Its sockets get TCP_NODELAY, as every DCMTK process
        here gets ``TCP_NODELAY=1``. pynetdicom races here: the downstream
        association's reactor thread may take the C-STORE-RSP that
        ``send_c_store`` waits for (logged "Received unexpected C-STORE service
        message"), which then waits out its DIMSE timeout (30 s) and aborts the
        association; ~2 KB instances with Nagle off hit it about once in a few
        thousand. A timed run that stalled so is reported and followed by one
        more (at most 2 more); the best run is kept as always;
    (c') the same forwarder left at pynetdicom's default, Nagle on, as a site
        engineer would run it: each instance then waits ~40 ms for a delayed
        ACK (DESIGN.md §4), so this row sends at most 400 instances per run.

    Throughput of (b) is end to end: from the start of the first storescu until
    the router has logged "forward sink: ... status 0x0000" for the last
    instance (read from its log as it comes) or the last storescu is done,
    whichever is later; the files in storescp's folder are then counted. (a),
    (c) and (c') are synchronous: storescu's end is the end. The time the
    senders took is shown too.

    The ratios of instances/s b/a (goal >= 0.45 for 500 KB), b/c (goal >= 10)
    and b/c'; the CPU seconds of each process kind in the best run of each
    setup (storescu senders, storescp with its forked children, router
    supervisor, router workers, naive forwarder, this script, and the machine's
    busy share: 100% = every core busy for the whole run); and the router's CPU
    per GB forwarded (supervisor + workers, in (b)) against storescp +
    storescu's per GB in (a) for the same data: goal router <= 1.5x.

``100m``: 3 instances of ~100 MB (one square 16-bit frame, 7240 x 7240: see
``make_big_ct``) over 1 stream, (a)
and (b) only (the naive forwarder is left out): MB/s, the ratio b/a, and the
router's peak RSS per process (supervisor, each worker), sampled every ~50 ms
during every run: goal < 100 MB per process.

The peak RSS of every process kind is printed for every setup. The CPU time of a
process tree is read with psutil as a difference over the run: the process, its
live descendants and (through ``children_*`` times) the reaped ones; storescu's is
this script's reaped children (``getrusage``).

Each scenario starts its storescp once, then for each setup its receiver once
(the router: until it logs "ready: 2 workers serving"; storescp and the naive
forwarder: until they listen), gives it one warm-up run and ``--repeat`` timed
runs, and keeps the best (shortest end to end). Before every run storescp's folder
is emptied and the disk synced; after a router run the spool is checked: the
router deletes what it delivered, so ``queue/sink/`` (and ``tmp/``, ``incoming/``,
``unrouted/``, ``dead/``) must be empty -- what is left is reported, then removed.
Every DCMTK process runs with ``TCP_NODELAY=1`` (DESIGN.md §4); everything binds
127.0.0.1 on free ports (storescp binds 0.0.0.0: it has no option). The router logs
at INFO (its default: a line per instance received and per instance forwarded) and
its log is only shown when it reports warnings or errors. Every process started is
stopped at the end, also on Ctrl-C or SIGTERM.

    .venv/bin/python bench/bench_forward.py [--only 500k|2k|100m] [--count [NAME=]N]
        [--repeat 2] [--dir /var/tmp]

This is a benchmark, not a test: it asserts nothing and prints figures.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import dcmtk_binary, make_data, wait_ready  # noqa: E402
from tests.helpers.data import make_ct, to_bytes  # noqa: E402
from tests.helpers.net import free_port, wait_for_port  # noqa: E402
from workers.spool import SPARE_SUFFIX  # noqa: E402

SAMPLE_INTERVAL = 0.05  # seconds between RSS samples
ROUTER_AE, SINK_AE, NAIVE_AE, SENDER_AE = "ROUTER", "SINK", "NAIVE", "BENCH"
DESTINATION = "sink"
WORKERS = 2
STOP_TIMEOUT = 60.0  # SIGTERM drains; a router still running after this is killed
NAGLE_COUNT = 400  # instances per run at most for (c')
NAIVE_DIMSE_TIMEOUT = 30.0  # pynetdicom's default, left as it is
MAX_EXTRA_RUNS = 2  # more runs when the naive forwarder stalled in one
SETTLE_TIMEOUT = 2.0  # the router logs a delivery just before it deletes the file
GOAL_B_A, GOAL_B_C, GOAL_CPU, GOAL_RSS_MB = 0.45, 10.0, 1.5, 100

CONFIG = """\
[router]
ae_title = "{ae}"
workers = {workers}
[[router.listen]]
host = "127.0.0.1"
port = {port}
[spool]
path = "{spool}"
fsync = true
[logging]
level = "INFO"
[routing]
rules = "rules.toml"
[[destination]]
name = "{dest}"
host = "127.0.0.1"
port = {sink_port}
ae_title = "{sink_ae}"
concurrency = {concurrency}
"""

RULES = """\
[[rule]]
name = "all"
[rule.then]
forward = ["{dest}"]
"""

# "forward sink: <uid> <file> status 0x0000 in 3 ms" (workers/forward.py)
FORWARD = re.compile(rf"forward {DESTINATION}: \S+ \S+ status 0x([0-9A-F]{{4}}) in (\d+) ms")


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    kind: str  # "ct", "tiny" (make_data) or "big" (make_big_ct)
    size_kb: float
    count: int
    streams: int
    naive: bool  # run setups (c) and (c') too


SCENARIOS = {
    "500k": Scenario("500k", "~500 KB CT instances", "ct", 500, 400, 2, naive=True),
    "2k": Scenario("2k", "~2 KB instances", "tiny", 2, 2000, 2, naive=True),
    "100m": Scenario("100m", "~100 MB CT instances", "big", 100 * 1024, 3, 1, naive=False),
}


def make_big_ct(path: Path, size_kb: float, seed: int) -> None:
    """A CT instance of about ``size_kb`` KiB with one square frame.

    ``make_ct`` keeps 512 columns, which past ~64 MB needs more than the 65535 rows
    Rows (US) can say: here Rows = Columns (7240 for 100 MiB).
    """
    ds = make_ct(size_kb=2, seed=seed)
    side = math.isqrt(int(size_kb * 1024) // 2)
    ds.Rows = ds.Columns = side
    ds.PixelData = random.Random(seed).randbytes(side * side * 2)
    ds["PixelData"].VR = "OW"
    path.write_bytes(to_bytes(ds))


def generate(root: Path, scenario: Scenario, count: int) -> list[Path]:
    if scenario.kind != "big":
        return make_data(root, scenario.kind, count, scenario.streams, size_kb=scenario.size_kb)
    dirs = [root / f"big-{i}" for i in range(scenario.streams)]
    for d in dirs:
        d.mkdir(parents=True)
    for i in range(count):
        make_big_ct(dirs[i % scenario.streams] / f"{i:06d}.dcm", scenario.size_kb, seed=i)
    return dirs


def tree_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds so far of (process ``pid``, its descendants).

    Descendants = those alive now (zombies included) plus, through the children_*
    times, those that exited and were reaped: a sum that only grows, so the
    difference of two readings is what the tree used between them. A child reaped
    while the tree is read (storescp reaps its association's process a few ms after
    storescu is done) would be missed, or counted twice: the root's children_* times
    are read before and after the descendants, and the reading is retried if they
    moved.
    """
    root = psutil.Process(pid)
    for _ in range(10):
        before = root.cpu_times()
        kids = 0.0
        for child in root.children(recursive=True):
            try:
                times = child.cpu_times()
            except psutil.Error:
                continue  # gone before it could be read: its parent accounts for it
            kids += times.user + times.system + times.children_user + times.children_system
        after = root.cpu_times()
        if (before.children_user, before.children_system) == (
                after.children_user, after.children_system):
            break
    return (float(after.user + after.system),
            float(kids + after.children_user + after.children_system))


class Server:
    """A process tree under measurement: a receiver, or a forwarder in the middle."""

    name: str
    ae: str
    port: int
    proc: subprocess.Popen[str]

    def __init__(self) -> None:
        self.log: deque[str] = deque(maxlen=30)
        self.problems: list[str] = []
        self.stalls = 0  # the naive forwarder's DIMSE timeouts

    def label(self, proc: psutil.Process) -> str:
        raise NotImplementedError

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far by process kind."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _keep(self, line: str) -> None:
        self.log.append(line)
        if " WARNING " in line or " ERROR " in line or " CRITICAL " in line or (
                line.startswith(("WARNING ", "ERROR ", "CRITICAL "))):
            self.problems.append(line.rstrip())

    def _stop(self, timeout: float) -> int:
        """SIGTERM, wait ``timeout`` s, then SIGKILL the process and what it forked."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        # Kept as psutil.Process objects: kill() checks the pid was not reused.
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
            self.problems.append(f"did not exit within {timeout:.0f} s of SIGTERM: killed")
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        return code


class Sink(Server):
    """DCMTK storescp, a process per association, writing files into ``landing``."""

    def __init__(self, tmp: Path) -> None:
        super().__init__()
        self.name, self.ae = "storescp --fork -od", SINK_AE
        self.port = free_port()
        self.landing = tmp / "storescp-out"
        self.landing.mkdir()
        argv = [dcmtk_binary("storescp"), "--fork", "-dhl", "-aet", SINK_AE,
                "-od", str(self.landing), str(self.port)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, text=True,
                                     env=dict(os.environ, TCP_NODELAY="1"))
        # storescp gives no readiness signal: its port answering is the event.
        wait_for_port("127.0.0.1", self.port, timeout=10, proc=self.proc)

    def label(self, proc: psutil.Process) -> str:
        return "storescp"  # parent and forked children alike: the peak is the largest

    def cpu(self) -> dict[str, float]:
        return {"storescp": sum(tree_cpu(self.proc.pid))}

    def clear(self) -> None:
        for entry in os.scandir(self.landing):
            os.unlink(entry.path)

    def landed(self) -> int:
        return sum(1 for e in os.scandir(self.landing) if e.is_file())

    def stop(self) -> None:
        self._stop(5)


class Router(Server):
    """``dicom-router run``: 2 workers, fsync on, everything forwarded to the sink."""

    def __init__(self, tmp: Path, sink: Sink, concurrency: int) -> None:
        super().__init__()
        self.name, self.ae = f"router, {WORKERS} workers, fsync", ROUTER_AE
        self.port = free_port()
        home = tmp / "router"
        home.mkdir()
        self.spool = home / "spool"
        config = home / "router.toml"
        (home / "rules.toml").write_text(RULES.format(dest=DESTINATION))
        config.write_text(CONFIG.format(ae=ROUTER_AE, workers=WORKERS, port=self.port,
                                        spool=self.spool, dest=DESTINATION,
                                        sink_port=sink.port, sink_ae=sink.ae,
                                        concurrency=concurrency))
        self.changed = threading.Condition()
        self.received = 0  # "C-STORE ... bytes status 0x0000" lines
        self.delivered: list[float] = []  # when each "forward sink: ... 0x0000" was read
        self.took: list[int] = []  # and the ms it says the destination took
        self.eof = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "run", "--config", str(config)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, env=dict(os.environ, TCP_NODELAY="1"))
        assert self.proc.stderr is not None
        wait_ready(self.proc, self.proc.stderr, marker="ready: ", keep=self._keep,
                   log=lambda: "".join(self.log), what=self.name)
        # The log goes on (two lines per instance at INFO): keep reading so the pipe never
        # fills and blocks the router, and time the deliveries as they are logged.
        self._reader = threading.Thread(target=self._read_log, name="router log", daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            now = time.perf_counter()
            self._keep(line)
            if " C-STORE " in line and " bytes status 0x0000" in line:
                with self.changed:
                    self.received += 1
            elif (m := FORWARD.search(line)) is not None:
                with self.changed:
                    if m.group(1) == "0000":
                        self.delivered.append(now)
                        self.took.append(int(m.group(2)))
                        self.changed.notify_all()
                    else:
                        self.problems.append(line.rstrip())
        with self.changed:
            self.eof = True
            self.changed.notify_all()

    def wait_delivered(self, target: int, timeout: float) -> float | None:
        """When the ``target``-th delivery was logged (perf_counter), or None if it was
        not within ``timeout`` s (or the router's log ended)."""
        with self.changed:
            self.changed.wait_for(lambda: len(self.delivered) >= target or self.eof, timeout)
            return self.delivered[target - 1] if len(self.delivered) >= target else None

    def took_since(self, first: int) -> list[int]:
        with self.changed:
            return self.took[first:]

    def counts(self) -> tuple[int, int]:
        with self.changed:
            return self.received, len(self.delivered)

    def label(self, proc: psutil.Process) -> str:
        if proc.pid == self.proc.pid:
            return "router supervisor"
        cmd = proc.cmdline()
        if "--worker-id" in cmd:
            return f"router worker {cmd[cmd.index('--worker-id') + 1]}"
        return f"router other {proc.pid}"

    def cpu(self) -> dict[str, float]:
        main, kids = tree_cpu(self.proc.pid)
        return {"router sup": main, "router workers": kids}

    def leftovers(self) -> list[Path]:
        """Files the spool still holds: none once everything is delivered."""
        found: list[Path] = []
        for sub in ("tmp", "incoming", "unrouted", f"queue/{DESTINATION}", "dead"):
            folder = self.spool / sub
            if folder.is_dir():
                # tmp/*.spare: delivered files the router keeps to write over (spool.py)
                found += [p for p in folder.rglob("*")
                          if p.is_file() and p.suffix != SPARE_SUFFIX]
        return found

    def settle(self) -> list[str]:
        """Wait (bounded) for the spool to empty; report and remove what stays."""
        # A poll, not an event: the router logs a delivery and then unlinks the file,
        # and nothing tells the outside when it did. Bounded; it only checks.
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not left:
            return []
        where = sorted({str(p.parent.relative_to(self.spool)) for p in left})
        for path in left:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return [f"{len(left)} file(s) left in the spool ({', '.join(where)}) "
                f"{SETTLE_TIMEOUT:.0f} s after the last delivery; removed"]

    def stop(self) -> None:
        code = self._stop(STOP_TIMEOUT)
        self._reader.join(STOP_TIMEOUT)
        if code != 0:
            self.problems.append(f"exited with {code} after SIGTERM (expected 0)")


class Naive(Server):
    """The naive pynetdicom forwarder: this script with ``--naive-forwarder``."""

    def __init__(self, sink: Sink, nodelay: bool) -> None:
        super().__init__()
        self.name, self.ae = "naive pynetdicom forwarder", NAIVE_AE
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--naive-forwarder",
             str(self.port), str(sink.port), str(int(nodelay))],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        wait_ready(self.proc, self.proc.stdout, marker="READY", keep=self._keep,
                   log=lambda: "".join(self.log), what=self.name)
        self._reader = threading.Thread(target=self._read_log, name="naive log", daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._keep(line)
            if "DIMSE timeout reached" in line:
                self.stalls += 1

    def label(self, proc: psutil.Process) -> str:
        return "naive forwarder"

    def cpu(self) -> dict[str, float]:
        return {"naive": sum(tree_cpu(self.proc.pid))}

    def stop(self) -> None:
        code = self._stop(10)
        self._reader.join(10)
        if code != 0:
            self.problems.append(f"exited with {code} after SIGTERM (expected 0)")


def naive_forwarder(port: int, sink_port: int, nodelay: int) -> int:
    """The naive forwarder of setup (c); runs until SIGTERM.

    ``nodelay``: set TCP_NODELAY on its sockets, inbound and outbound, as every DCMTK
    peer here gets ``TCP_NODELAY=1`` (pynetdicom leaves Nagle on).
    """
    import logging
    import socket

    from pydicom.uid import CTImageStorage
    from pynetdicom import AE, StoragePresentationContexts, evt
    from pynetdicom.association import Association

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ae = AE(ae_title=NAIVE_AE)
    ae.dimse_timeout = NAIVE_DIMSE_TIMEOUT  # pynetdicom's default, said out loud
    ae.supported_contexts = StoragePresentationContexts
    ae.add_requested_context(CTImageStorage)
    downstream: dict[Association, Association] = {}

    def no_nagle(assoc: Association) -> None:
        if nodelay and assoc.dul.socket and assoc.dul.socket.socket:
            assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_open(event: Any) -> None:
        no_nagle(event.assoc)

    def on_store(event: Any) -> int:
        down = downstream.get(event.assoc)
        if down is None or not down.is_established:
            down = ae.associate("127.0.0.1", sink_port, ae_title=SINK_AE)
            downstream[event.assoc] = down
            if not down.is_established:
                return 0xA700  # refused: out of resources (the sink is not there)
            no_nagle(down)
        ds = event.dataset
        ds.file_meta = event.file_meta
        rsp = down.send_c_store(ds)
        return int(rsp.Status) if "Status" in rsp else 0xC000  # no answer: cannot process

    def on_close(event: Any) -> None:
        down = downstream.pop(event.assoc, None)
        if down is not None and down.is_established:
            down.release()

    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_open),
                                           (evt.EVT_C_STORE, on_store),
                                           (evt.EVT_CONN_CLOSE, on_close)])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("READY", flush=True)
    stop.wait()
    assert server is not None  # block=False returns the server
    server.shutdown()
    return 0


class Sampler(threading.Thread):
    """Peak RSS per process of some process trees while a run goes on.

    The one timer loop in this benchmark: it measures, it synchronises nothing.
    """

    def __init__(self, servers: Sequence[Server]) -> None:
        super().__init__(name="rss sampler", daemon=True)
        self.servers = [(s, psutil.Process(s.proc.pid)) for s in servers]
        self.peak: dict[str, int] = {}
        self._labels: dict[int, str] = {}
        self._done = threading.Event()

    def sample(self) -> None:
        for server, root in self.servers:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    label = self._labels.get(p.pid) or self._labels.setdefault(
                        p.pid, server.label(p))
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue  # exited between listing and reading
                if rss:  # a zombie reads 0
                    self.peak[label] = max(self.peak.get(label, 0), rss)

    def run(self) -> None:
        self.sample()
        while not self._done.wait(SAMPLE_INTERVAL):
            self.sample()

    def finish(self) -> dict[str, int]:
        self._done.set()
        self.join()
        self.sample()
        return self.peak


def send(ae: str, port: int, dirs: Sequence[Path]) -> tuple[float, float]:
    """Run one storescu per folder in parallel: (start, end) in perf_counter time."""
    env = dict(os.environ, TCP_NODELAY="1")
    storescu = dcmtk_binary("storescu")
    procs: list[subprocess.Popen[str]] = []
    start = time.perf_counter()
    try:
        for d in dirs:
            procs.append(subprocess.Popen(
                [storescu, "-aet", SENDER_AE, "-aec", ae, "+sd", "-nh", "127.0.0.1", str(port),
                 str(d)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, text=True))
        errors = []
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                errors.append(f"storescu failed ({p.returncode}): {err[-500:]}")
        end = time.perf_counter()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if errors:
        raise RuntimeError("\n".join(errors))
    return start, end


def _children_cpu() -> float:
    """CPU seconds of this process's reaped children (the storescu senders)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _busy(times: Any) -> float:
    idle = times.idle + getattr(times, "iowait", 0.0)
    return float(sum(times) - idle)


@dataclass
class Run:
    sent: float  # seconds until every storescu was done
    elapsed: float  # seconds until the last instance was at the sink
    forwarded: float | None  # the router: seconds until it logged the last delivery
    took: list[int]  # the router: ms each delivery took, as logged
    landed: int
    cpu: dict[str, float]  # by process kind
    busy: float  # CPU seconds of the whole machine
    peak: dict[str, int]


@dataclass
class Result:
    setup: str
    count: int  # instances per run
    size: int  # bytes per run
    runs: list[Run] = field(default_factory=list)  # timed runs; warm-up excluded
    peak: dict[str, int] = field(default_factory=dict)  # over every run, warm-up included
    problems: list[str] = field(default_factory=list)

    @property
    def best(self) -> Run | None:
        return min(self.runs, key=lambda r: r.elapsed, default=None)

    def rate(self) -> float | None:
        """Instances per second of the best run."""
        return self.count / self.best.elapsed if self.best else None


def _snapshot(servers: Sequence[Server]) -> dict[str, float]:
    cpu = {"storescu": _children_cpu(), "bench": float(sum(psutil.Process().cpu_times()[:2])),
           "busy": _busy(psutil.cpu_times())}
    for server in servers:
        cpu.update(server.cpu())
    return cpu


def run_once(entry: Server, sink: Sink, dirs: Sequence[Path], count: int,
             size: int) -> tuple[Run | None, list[str]]:
    """One run through ``entry`` (the sink itself, the router or the naive forwarder)."""
    sink.clear()
    os.sync()  # every run starts from the same disk state
    servers = [sink] if entry is sink else [entry, sink]
    router = entry if isinstance(entry, Router) else None
    received0, delivered0 = router.counts() if router else (0, 0)
    target = delivered0 + count
    cpu0 = _snapshot(servers)
    sampler = Sampler(servers)
    sampler.start()
    problems: list[str] = []
    delivered: float | None = None
    try:
        start, sent = send(entry.ae, entry.port, dirs)
        end: float | None = sent
        if router is not None:
            delivered = router.wait_delivered(target, timeout=60 + size / 10e6)
            # The last delivery may be logged while storescu still releases its
            # association: the run ends when both are done, as (a)'s ends with storescu.
            end = None if delivered is None else max(sent, delivered)
            if delivered is None:
                received, forwarded = router.counts()
                problems.append(f"the router received {received - received0} and delivered "
                                f"{forwarded - delivered0} of {count} instances in "
                                f"{time.perf_counter() - start:.0f} s; its log ends:\n"
                                + "".join(router.log).rstrip())
    finally:
        peak = sampler.finish()
    cpu1 = _snapshot(servers)
    landed = sink.landed()
    if landed != count:
        problems.append(f"{landed} instances at the sink, {count} sent")
    if router is not None:
        problems += router.settle()
    if end is None:
        return None, problems
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu1}
    busy = cpu.pop("busy")
    return Run(sent=sent - start, elapsed=end - start,
               forwarded=None if delivered is None else delivered - start,
               took=router.took_since(delivered0) if router else [], landed=landed, cpu=cpu,
               busy=busy, peak=peak), problems


def measure(setup: str, make: Callable[[], Server], sink: Sink, dirs: Sequence[Path],
            repeat: int) -> Result:
    """Start the entry once; one warm-up run (page cache, imports, first associations),
    then ``repeat`` timed runs. The entry is stopped at the end (unless it is the sink)."""
    files = [f for d in dirs for f in d.iterdir()]
    count, size = len(files), sum(f.stat().st_size for f in files)
    result = Result(setup, count, size)
    entry = make()
    extra = 0
    try:
        i = 0
        while i < 1 + repeat + extra:
            what = "warm-up" if i == 0 else f"run {i}"
            stalls = entry.stalls
            run, problems = run_once(entry, sink, dirs, count, size)
            result.problems += [f"{what}: {p}" for p in problems]
            if run is None:
                result.problems.append(f"{what}: no figures; the remaining runs are skipped")
                break
            if stalled := entry.stalls - stalls:
                again = bool(i) and extra < MAX_EXTRA_RUNS
                extra += again
                result.problems.append(
                    f"{what}: {stalled} DIMSE timeout(s) ({NAIVE_DIMSE_TIMEOUT:.0f} s each, "
                    f"pynetdicom's default): {run.elapsed:.1f} s"
                    + ("; one more run" if again else ""))
            if i:
                result.runs.append(run)
            i += 1
            for label, rss in run.peak.items():
                result.peak[label] = max(result.peak.get(label, 0), rss)
    finally:
        if entry is not sink:
            entry.stop()
    if entry is not sink:
        result.problems += entry.problems[:5]
        if len(entry.problems) > 5:
            result.problems.append(f"... {len(entry.problems) - 5} more log lines")
    return result


KINDS = ("storescu", "storescp", "router sup", "router workers", "naive", "bench")


def report(scenario: Scenario, repeat: int, results: list[Result], cores: int) -> None:
    count, size = results[0].count, results[0].size
    print(f"\n== {scenario.name}: {scenario.what} ({size // count:,} bytes each), "
          f"{count} per run ({size / 1e6:,.0f} MB) over {scenario.streams} "
          f"storescu stream{'s' if scenario.streams > 1 else ''}; best of {repeat} after 1 "
          f"warm-up")
    print(f"{'setup':<36}{'count':>6}{'inst/s':>8}{'MB/s':>8}{'sent s':>8}{'e2e s':>8}  CPU s:"
          + "".join(f"{k:>9}" for k in ("storescu", "storescp", "rtr sup", "rtr wrk",
                                       "naive", "bench"))
          + f"{'busy':>6}")
    for r in results:
        b = r.best
        if b is None:
            print(f"{r.setup:<36}{r.count:6}  (no figures: see the warnings)")
            continue
        print(f"{r.setup:<36}{r.count:6}{r.count / b.elapsed:8.1f}{r.size / 1e6 / b.elapsed:8.1f}"
              f"{b.sent:8.3f}{b.elapsed:8.3f}        "
              + "".join(f"{b.cpu[k]:9.2f}" if k in b.cpu else f"{'-':>9}" for k in KINDS)
              + f"{b.busy / (cores * b.elapsed):6.0%}")
    by = {r.setup.split()[0]: r for r in results}
    a, b_, c, c_ = (by.get(k) for k in ("(a)", "(b)", "(c)", "(c')"))
    if a and b_ and (ra := a.rate()) and (rb := b_.rate()):
        goal = f" (goal >= {GOAL_B_A})" if scenario.name == "500k" else ""
        line = f"ratios (instances/s): b/a {rb / ra:.2f}{goal}"
        if c and (rc := c.rate()):
            line += f", b/c {rb / rc:.1f} (goal >= {GOAL_B_C:.0f})"
        if c_ and (rc_ := c_.rate()):
            line += f", b/c' {rb / rc_:.1f}"
        print(line)
        assert a.best and b_.best
        if b_.best.forwarded is not None and b_.best.took:
            took = sorted(b_.best.took)
            print(f"router in (b): last delivery logged at {b_.best.forwarded:.3f} s (senders "
                  f"done at {b_.best.sent:.3f} s); each delivery took (as logged) median "
                  f"{took[len(took) // 2]} ms, "
                  f"p95 {took[int(len(took) * 0.95)]} ms, max {took[-1]} ms")
        router = b_.best.cpu["router sup"] + b_.best.cpu["router workers"]
        direct = a.best.cpu["storescu"] + a.best.cpu["storescp"]
        print(f"CPU per GB: router (supervisor + workers) in (b) {router / (size / 1e9):.1f} s/GB"
              f" ({router / count * 1e3:.2f} ms/instance); storescp + storescu in (a) "
              f"{direct / (size / 1e9):.1f} s/GB ({direct / count * 1e3:.2f} ms/instance); "
              "ratio " + (f"{router / direct:.2f}" if direct > 0 else "-")
              + f" (goal <= {GOAL_CPU})")
    for r in results:
        if r.peak:
            text = ", ".join(f"{label} {rss / 2**20:.0f}" for label, rss in sorted(r.peak.items()))
            goal = (f" (goal < {GOAL_RSS_MB} per router process)"
                    if any(k.startswith("router") for k in r.peak) else "")
            print(f"peak RSS MB {r.setup.split()[0]}: {text}{goal}")
    for r in results:
        for problem in r.problems:
            print(f"WARNING {r.setup}: {problem}")


def parse_counts(values: Sequence[str], only: str | None,
                 parser: argparse.ArgumentParser) -> dict[str, int]:
    counts = {name: s.count for name, s in SCENARIOS.items()}
    for value in values:
        name, _, number = value.rpartition("=")
        if not name:
            if only is None:
                parser.error("--count N without a scenario name needs --only")
            name = only
        if name not in SCENARIOS or not number.isdigit():
            parser.error(f"--count {value}: expected N or NAME=N, NAME one of "
                         f"{', '.join(SCENARIOS)}")
        counts[name] = int(number)
        if counts[name] < SCENARIOS[name].streams:
            parser.error(f"--count {value}: at least {SCENARIOS[name].streams}")
    return counts


def subset(root: Path, dirs: Sequence[Path], count: int) -> list[Path]:
    """The first ``count`` instances of ``dirs`` (make_data deals them out in turn),
    hard-linked into as many folders under ``root``."""
    out = []
    for j, d in enumerate(dirs):
        folder = root / d.name
        folder.mkdir(parents=True)
        for f in sorted(d.iterdir())[:count // len(dirs) + (j < count % len(dirs))]:
            os.link(f, folder / f.name)
        out.append(folder)
    return out


def run_scenario(scenario: Scenario, count: int, home: Path, repeat: int, cores: int,
                 concurrency: int) -> None:
    """Generate the data, start the sink, measure each setup, print, clean up."""
    home.mkdir()
    try:
        dirs = generate(home / "data", scenario, count)
        with contextlib.ExitStack() as stack:
            sink = Sink(home)
            stack.callback(sink.stop)
            setups: list[tuple[str, Callable[[], Server], Sequence[Path]]] = [
                ("(a) storescu -> storescp", lambda: sink, dirs),
                ("(b) storescu -> router -> storescp",
                 lambda: Router(home, sink, concurrency), dirs)]
            if scenario.naive:
                setups.append(("(c) storescu -> naive -> storescp",
                               lambda: Naive(sink, nodelay=True), dirs))
                # Nagle costs it ~40 ms an instance: fewer instances say as much.
                few = dirs if count <= NAGLE_COUNT else subset(home / "few", dirs, NAGLE_COUNT)
                setups.append(("(c') naive, Nagle on (default)",
                               lambda: Naive(sink, nodelay=False), few))
            results = [measure(setup, make, sink, data, repeat) for setup, make, data in setups]
        report(scenario, repeat, results, cores)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _terminate(signum: int, frame: Any) -> None:
    sys.exit(128 + signum)  # SystemExit: the finally blocks stop every process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(SCENARIOS), help="run one scenario")
    parser.add_argument("--count", action="append", default=[], metavar="[NAME=]N",
                        help="instances per run of scenario NAME (a bare N: the --only one); "
                             + ", ".join(f"default {s.count} for {n}"
                                         for n, s in SCENARIOS.items()))
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per figure (best kept)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the data, the spool and storescp's output go, in a "
                             "temporary folder (disk-backed: /tmp may be tmpfs)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="the destination's concurrency in (b) (default 2: one association "
                             "per worker; 1 leaves one worker sending and the other handing "
                             "its instances over)")
    parser.add_argument("--naive-forwarder", nargs=3, type=int,
                        metavar=("PORT", "SINK_PORT", "NODELAY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_forwarder:
        return naive_forwarder(*args.naive_forwarder)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    counts = parse_counts(args.count, args.only, parser)
    signal.signal(signal.SIGTERM, _terminate)

    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-forward-", dir=args.dir))
    began = time.monotonic()
    try:
        fs = psutil.disk_partitions(all=True)
        mount = max((p for p in fs if str(tmp).startswith(p.mountpoint)),
                    key=lambda p: len(p.mountpoint), default=None)
        print(f"{cores} cores; data, spool and storescp output in {tmp.parent}"
              + (f" ({mount.fstype}, {mount.device})" if mount else "")
              + "; every DCMTK process with TCP_NODELAY=1")
        print("(a) storescu -> storescp --fork -od (a process per association, no fsync)")
        print(f"(b) storescu -> router ({WORKERS} workers, fsync on, 1 rule forwarding all to "
              f"1 destination, concurrency {args.concurrency}) -> same storescp")
        print("(c) storescu -> naive pynetdicom forwarder (own process, one downstream "
              "association per inbound one, TCP_NODELAY set) -> same storescp")
        print(f"(c') the same naive forwarder with pynetdicom's default, Nagle on (at most "
              f"{NAGLE_COUNT} instances per run)")
        print("sent s: until every storescu was done; e2e s: until the last instance was at "
              "the sink (for (b): the router logged its delivery, or later if the senders "
              "were not done yet); inst/s and MB/s are from e2e; CPU s of the best run")
        for name in [args.only] if args.only else list(SCENARIOS):
            run_scenario(SCENARIOS[name], counts[name], tmp / name, args.repeat, cores,
                         args.concurrency)
        print(f"\ntotal {time.monotonic() - began:.0f} s")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
