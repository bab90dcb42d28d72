"""C-STORE into the running router (supervisor + workers, spool) vs DCMTK storescp -od.

Prints, for ~500 KB CT-like instances sent by 8 DCMTK storescu streams in
parallel (each its own folder, ``storescu +sd``, TCP_NODELAY=1):

    instances/s and MB/s into
      (a) ``dicom-router run`` with 1 worker, fsync on
      (b) ``dicom-router run`` with 2 workers, fsync on
      (c) ``storescp --fork -od DIR`` (a process per association, so the 8 streams
          are served at once; files written, no fsync: DCMTK has no fsync option)
      and, for reference, the router with 2 workers and fsync off (the cost of
      durability);
    each one's ratio to (c): the goal is (b) >= 1.0;
    the peak RSS of the supervisor and of each worker (for storescp: the largest
      of its processes), sampled every ~50 ms while the senders run;
    the CPU seconds of the best run by process kind: the receiver's main process,
      its children (router workers, storescp's forked children), the storescu
      senders, this script (RSS sampler, router log reader) and the rest of the
      machine (kernel threads such as jbd2 and kworker), with the machine's busy
      share (100% = every core busy for the whole run; waiting on the disk is
      idle). The kernel counts CPU time in 10 ms ticks: "rest" may read a little
      below 0 and "busy" a little above 100%.

Each receiver is started once (the router: until it logs "ready: N workers
serving"; storescp: until its port answers), gets one warm-up run, then
``--repeat`` timed runs; the best is kept. Before every run the spool's
``unrouted/`` (no rules here: the router keeps every instance there) or storescp's
output folder is emptied and the disk synced, so
every run starts from the same disk state; after it, the files that landed are
counted and a wrong count is reported.

A last line puts the goal's ratio beside a second one, for information: the time
until every file is on the disk. A receiver that does not fsync (storescp) has
written its files only into the page cache when its senders finish (the dirty
limit here is GBs), so after its timed window the benchmark runs sync(2) and times
it too; a receiver that fsyncs has paid that inside its window. The goal's ratio
stays the one in the table.

The router runs at log level INFO, its default and the level at which the
supervisor logs its "ready" line (it logs one line per stored instance there);
its log is read on a pipe and only shown when it reports warnings or errors.

    .venv/bin/python bench/bench_router_store.py [--count 400] [--repeat 2] [--dir /var/tmp]

This is a benchmark, not a test: it asserts nothing and prints figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import dcmtk_binary, make_data, wait_ready  # noqa: E402
from tests.helpers.net import free_port, wait_for_port  # noqa: E402
from workers.spool import SPARE_SUFFIX  # noqa: E402

STREAMS = 8
SIZE_KB = 500
SAMPLE_INTERVAL = 0.05  # seconds between RSS samples
ROUTER_AE = "ROUTER"
STOP_TIMEOUT = 60.0  # SIGTERM drains; a router still running after this is killed

CONFIG = """\
[router]
ae_title = "{ae}"
workers = {workers}
[[router.listen]]
host = "127.0.0.1"
port = {port}
[spool]
path = "{spool}"
fsync = {fsync}
[logging]
level = "INFO"
"""


class Receiver:
    """A C-STORE SCP under test: a process tree, and the folder its instances land in."""

    name: str
    fsync: bool
    proc: subprocess.Popen[str]
    landing: Path
    port: int

    def label(self, proc: psutil.Process) -> str:
        raise NotImplementedError

    def clear(self) -> None:
        """Empty the landing folder and sync the disk: every run starts from the same state."""
        self.landing.mkdir(parents=True, exist_ok=True)  # the spool makes it on first use
        for entry in os.scandir(self.landing):
            os.unlink(entry.path)
        os.sync()

    def landed(self) -> int:
        return sum(1 for e in os.scandir(self.landing) if e.is_file())

    def check(self) -> list[str]:
        """Problems seen besides the file count (none by default)."""
        return []

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of (the main process, its descendants).

        Descendants = those alive now plus, through the main process's
        children_* times, those that exited and were reaped: a sum that only
        grows, so the difference of two readings is what the tree used between
        them.
        """
        root = psutil.Process(self.proc.pid)
        times = root.cpu_times()
        main = float(times.user + times.system)
        kids = float(times.children_user + times.children_system)
        for child in root.children(recursive=True):
            try:
                times = child.cpu_times()
                kids += times.user + times.system
            except psutil.Error:
                pass  # exited between listing and reading: its parent will account for it
        return main, kids

    def stop(self) -> None:
        raise NotImplementedError


class Router(Receiver):
    def __init__(self, tmp: Path, workers: int, fsync: bool) -> None:
        self.workers, self.fsync = workers, fsync
        self.name = f"router, {workers} worker{'s' if workers > 1 else ''}"
        self.port = free_port()
        tag = f"router-{workers}w-{'fsync' if fsync else 'nofsync'}"
        spool = tmp / tag
        config = tmp / f"{tag}.toml"
        config.write_text(CONFIG.format(ae=ROUTER_AE, workers=workers, port=self.port,
                                        spool=spool, fsync="true" if fsync else "false"))
        self.landing = spool / "unrouted"
        self.spool_tmp = spool / "tmp"
        self.log: deque[str] = deque(maxlen=30)
        self.problems: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "run", "--config", str(config)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, env=dict(os.environ, TCP_NODELAY="1"))
        assert self.proc.stderr is not None
        wait_ready(self.proc, self.proc.stderr, marker="ready: ", keep=self._keep,
                   log=lambda: "".join(self.log), what=self.name)
        # The log goes on (a line per instance at INFO): keep reading so the pipe never
        # fills and blocks the router.
        self._reader = threading.Thread(target=self._read_log, name=f"{tag} log", daemon=True)
        self._reader.start()

    def _keep(self, line: str) -> None:
        self.log.append(line)
        if " WARNING " in line or " ERROR " in line or " CRITICAL " in line:
            self.problems.append(line.rstrip())

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._keep(line)

    def label(self, proc: psutil.Process) -> str:
        if proc.pid == self.proc.pid:
            return "supervisor"
        cmd = proc.cmdline()
        if "--worker-id" in cmd:
            return f"worker {cmd[cmd.index('--worker-id') + 1]}"
        return f"other {proc.pid}"

    def check(self) -> list[str]:
        left = sum(1 for e in os.scandir(self.spool_tmp) if not e.name.endswith(SPARE_SUFFIX))
        return [f"{left} file(s) left in {self.spool_tmp}"] if left else []

    def stop(self) -> None:
        # Kept as psutil.Process objects: kill() checks the pid was not reused.
        workers = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.terminate()  # SIGTERM: drain and exit 0
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            for worker in workers:
                with contextlib.suppress(psutil.NoSuchProcess):
                    worker.kill()
            code = self.proc.wait()
            self.problems.append(f"did not exit within {STOP_TIMEOUT:.0f} s of SIGTERM: killed")
        self._reader.join(STOP_TIMEOUT)
        if code != 0:
            self.problems.append(f"exited with {code} after SIGTERM (expected 0)")


class StoreSCP(Receiver):
    def __init__(self, tmp: Path) -> None:
        self.name, self.fsync = "storescp --fork -od", False
        self.port = free_port()
        self.landing = tmp / "storescp-out"
        self.landing.mkdir()
        # --fork: a process per association, DCMTK's way to serve parallel streams
        # (without it the 8 storescu would be served one after another).
        self.argv = [dcmtk_binary("storescp"), "--fork", "-od", str(self.landing), str(self.port)]
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=dict(os.environ, TCP_NODELAY="1"), text=True)
        # storescp gives no readiness signal: its port answering is the event.
        wait_for_port("127.0.0.1", self.port, timeout=10, proc=self.proc)

    def label(self, proc: psutil.Process) -> str:
        return "storescp" if proc.pid == self.proc.pid else f"child {proc.pid}"

    def stop(self) -> None:
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for child in children:  # an association still being served (none once senders are done)
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


class Sampler(threading.Thread):
    """Peak RSS per process of a receiver's tree while the senders run.

    The one timer loop in this benchmark: it measures, it synchronises nothing.
    """

    def __init__(self, receiver: Receiver) -> None:
        super().__init__(name="rss sampler", daemon=True)
        self.receiver = receiver
        self.root = psutil.Process(receiver.proc.pid)
        self.peak: dict[str, int] = {}
        self._labels: dict[int, str] = {}
        self._done = threading.Event()

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                label = self._labels.get(p.pid) or self._labels.setdefault(
                    p.pid, self.receiver.label(p))
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


def send(port: int, dirs: Sequence[Path]) -> float:
    """Run one storescu per folder in parallel; seconds until all are done."""
    env = dict(os.environ, TCP_NODELAY="1")
    storescu = dcmtk_binary("storescu")
    start = time.perf_counter()
    procs = [subprocess.Popen([storescu, "-aec", ROUTER_AE, "+sd", "-nh", "127.0.0.1",
                               str(port), str(d)], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for d in dirs]
    errors = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            errors.append(f"storescu failed ({p.returncode}): {err[-500:]}")
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError("\n".join(errors))
    return elapsed


def _children_cpu() -> float:
    """CPU seconds of this process's reaped children (the storescu senders)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _own(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _busy(times: Any) -> float:
    idle = times.idle + getattr(times, "iowait", 0.0)
    return float(sum(times) - idle)


@dataclass
class Run:
    elapsed: float
    landed: int
    cpu_main: float
    cpu_children: float
    cpu_senders: float
    cpu_bench: float  # this script: the RSS sampler, the router log reader
    synced: float  # seconds of sync(2) after the window (receivers without fsync), else 0
    cpu_busy: float  # the whole machine
    peak: dict[str, int]


@dataclass
class Result:
    receiver: str
    fsync: bool
    runs: list[Run] = field(default_factory=list)  # timed runs; warm-up excluded
    peak: dict[str, int] = field(default_factory=dict)  # over every run, warm-up included
    problems: list[str] = field(default_factory=list)

    @property
    def best(self) -> Run:
        return min(self.runs, key=lambda r: r.elapsed)


def run_once(receiver: Receiver, dirs: Sequence[Path], count: int) -> Run:
    receiver.clear()
    main0, kids0 = receiver.cpu()
    me = psutil.Process()
    senders0, busy0, bench0 = _children_cpu(), _busy(psutil.cpu_times()), _own(me)
    sampler = Sampler(receiver)
    sampler.start()
    elapsed = send(receiver.port, dirs)
    peak = sampler.finish()
    senders1, busy1, bench1 = _children_cpu(), _busy(psutil.cpu_times()), _own(me)
    main1, kids1 = receiver.cpu()
    synced = 0.0
    if not receiver.fsync:  # outside the window and its CPU figures: see the docstring
        start = time.perf_counter()
        os.sync()
        synced = time.perf_counter() - start
    return Run(elapsed=elapsed, landed=receiver.landed(), cpu_main=main1 - main0,
               cpu_children=kids1 - kids0, cpu_senders=senders1 - senders0,
               cpu_bench=bench1 - bench0, cpu_busy=busy1 - busy0, synced=synced, peak=peak)


def measure(receiver: Receiver, dirs: Sequence[Path], count: int, repeat: int) -> Result:
    """One warm-up run (page cache, imports, first accept), then ``repeat`` timed runs."""
    result = Result(receiver.name, receiver.fsync)
    try:
        for i in range(1 + repeat):
            run = run_once(receiver, dirs, count)
            if i:
                result.runs.append(run)
            for label, rss in run.peak.items():
                result.peak[label] = max(result.peak.get(label, 0), rss)
            what = "warm-up" if i == 0 else f"run {i}"
            if run.landed != count:
                result.problems.append(f"{what}: {run.landed} instances landed, "
                                       f"{count} sent")
            result.problems.extend(f"{what}: {p}" for p in receiver.check())
    finally:
        receiver.stop()
    if isinstance(receiver, Router):
        result.problems.extend(receiver.problems[:5])
        if len(receiver.problems) > 5:
            result.problems.append(f"... {len(receiver.problems) - 5} more log lines")
    return result


def _rss(result: Result) -> str:
    mb = {k: v / 2**20 for k, v in result.peak.items()}
    if "supervisor" in mb:
        workers = sorted(k for k in mb if k.startswith("worker"))
        return f"sup {mb['supervisor']:.0f}, " + ", ".join(
            f"w{k.split()[1]} {mb[k]:.0f}" for k in workers)
    if not mb:
        return "-"
    return f"max {max(mb.values()):.0f} of {len(mb)} procs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=400,
                        help=f"~{SIZE_KB} KB instances per run, over {STREAMS} streams")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per figure (best kept)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the spools, storescp's output and the data go "
                             "(disk-backed: /tmp may be tmpfs)")
    args = parser.parse_args()
    if args.count < STREAMS or args.repeat < 1:
        parser.error(f"--count must be at least {STREAMS} and --repeat at least 1")

    tmp = Path(tempfile.mkdtemp(prefix="bench-router-", dir=args.dir))
    try:
        dirs = make_data(tmp / "data", "ct", args.count, STREAMS, size_kb=SIZE_KB)
        size = sum(f.stat().st_size for d in dirs for f in d.iterdir())
        cores = os.cpu_count() or 1
        factories = [lambda: Router(tmp, 1, fsync=True), lambda: Router(tmp, 2, fsync=True),
                     lambda: StoreSCP(tmp), lambda: Router(tmp, 2, fsync=False)]
        results = [measure(make(), dirs, args.count, args.repeat) for make in factories]
        anchor = results[2].best.elapsed

        fs = psutil.disk_partitions(all=True)
        mount = max((p for p in fs if str(tmp).startswith(p.mountpoint)),
                    key=lambda p: len(p.mountpoint), default=None)
        print(f"{cores} cores, CT instances of {size / args.count / 1024:.0f} KB "
              f"({size // args.count} bytes): {args.count} per run over {STREAMS} parallel "
              f"storescu streams (TCP_NODELAY=1)")
        print(f"best of {args.repeat} runs after 1 warm-up; spool and storescp output on "
              f"{tmp.parent}" + (f" ({mount.fstype}, {mount.device})" if mount else "")
              + "; CPU s of the best run")
        print(f"{'receiver':<22}{'fsync':>6}{'inst/s':>8}{'MB/s':>8}{'vs storescp':>12}  "
              f"{'peak RSS MB':<24}{'CPU s: main':>12}{'children':>9}{'storescu':>9}"
              f"{'bench':>6}{'rest':>6}{'busy':>6}")
        for r in results:
            b = r.best
            rest = b.cpu_busy - b.cpu_main - b.cpu_children - b.cpu_senders - b.cpu_bench
            print(f"{r.receiver:<22}{'yes' if r.fsync else 'no':>6}"
                  f"{args.count / b.elapsed:8.0f}{size / b.elapsed / 1e6:8.1f}"
                  f"{anchor / b.elapsed:12.2f}  {_rss(r):<24}{b.cpu_main:12.2f}"
                  f"{b.cpu_children:9.2f}{b.cpu_senders:9.2f}{b.cpu_bench:6.2f}{rest:6.2f}"
                  f"{b.cpu_busy / (cores * b.elapsed):6.0%}")
        scp, router = results[2].best, results[1].best
        on_disk = scp.elapsed + scp.synced
        print(f"until on disk: storescp {on_disk:.2f} s ({scp.elapsed:.2f} s + sync "
              f"{scp.synced:.2f} s) = {args.count / on_disk:.0f} inst/s; router, 2 workers, "
              f"fsync: {router.elapsed:.2f} s, ratio {on_disk / router.elapsed:.2f} "
              f"(information only: the goal is the ratio in the table)")
        for r in results:
            for problem in r.problems:
                print(f"WARNING {r.receiver}: {problem}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
