"""The query/retrieve proxy: requestor -> (Orthanc | router -> Orthanc), one run prints all.

Orthanc 1.10 runs on loopback as the PACS (its own config and storage, ``TCP_NODELAY=1``
in its environment, started by ``tests.helpers.orthanc.start_orthanc``), loaded through
its REST API with generated studies: 50 patients x 1 study x 2 series x 10 instances of
~16 KB CT (``tests.helpers.data.make_study``), 1000 instances in all; loading is not
measured. A DCMTK ``storescp --fork`` (one file per instance into a temporary folder)
is the C-MOVE destination, known to Orthanc as ``VIEWER_SCP``. A second router in
proxy mode (``move_mode = "proxy"``, AE ``ROUTERP``, known to Orthanc) gives the
C-MOVE row where Orthanc moves to the router and the router relays each instance. The router
(``dicom-router run``, 2 workers) proxies to Orthanc with one rule, ``query = ["pacs"]``
and ``retrieve = ["pacs"]``; storescp is one of its ``[[destination]]`` tables too, as
the router only relays moves to destinations it knows.

Each figure is taken twice, (a) straight against Orthanc and (b) through the router,
and the ratio b/a of the rates is printed:

1. C-FIND (study root) responses per second, for a STUDY-level query matching every
   study (50) and an IMAGE-level query matching every instance of the database (1000).
   Measured with our own blocking client (``router.net.client.connect(...).find``, every
   response decoded) and, for reference, with DCMTK ``findscu`` (its default output:
   one "Find Response: N (Pending)" line per match, counted). A query is: associate,
   C-FIND, read to the final response, release (findscu: the whole process); a run is
   20 STUDY-level queries in a row, or 1 IMAGE-level query: ~1000 responses either way.
2. C-MOVE throughput in instances per second: 20 studies (400 instances, ~6.6 MB) moved
   to storescp one after the other on one association by our client; in (b) the router
   relays each C-MOVE (direct mode: Orthanc sends the instances to storescp itself).
   Timed from the first C-MOVE request to the last final response; then storescp's
   folder is counted (and emptied for the next run).
3. C-GET throughput in instances per second: the same 20 studies by C-GET, one after
   the other on one association of our client, each instance taken in memory by
   ``on_store`` (nothing written); in (b) the router relays the sub-operations.

Each figure gets one warm-up run per setup, then ``--repeat`` timed runs with (a) and
(b) taking turns; the best (shortest) run of each is kept. Counts are checked: both
setups must return the same number of matches, the moves and gets must complete every
instance (final response counts, and the files storescp wrote). The CPU time of the
best runs is shown: the requestor (this process, or findscu), the router (supervisor
and workers) and Orthanc. Anything odd (a count that differs, a failed status, a
router warning or error in its log) is printed at the end with the log excerpt.

Every DCMTK process gets ``TCP_NODELAY=1``; the router and this client bind / connect
127.0.0.1 on free ports (Orthanc and storescp bind 0.0.0.0: they have no option).
Every process started is stopped at the end, also on an exception, Ctrl-C or SIGTERM.

    .venv/bin/python bench/bench_qr.py [--repeat 5] [--dir /var/tmp]

This is a benchmark, not a test: it asserts nothing and prints figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
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
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import dcmtk_binary, wait_ready  # noqa: E402
from router.dicom import dimse, uids  # noqa: E402
from router.net.client import connect  # noqa: E402
from tests.helpers.data import make_study  # noqa: E402
from tests.helpers.dcmtk import dcmtk_env  # noqa: E402
from tests.helpers.net import free_port, wait_for_port  # noqa: E402
from tests.helpers.orthanc import Orthanc, start_orthanc  # noqa: E402
from tests.helpers.procs import Proc, Procs  # noqa: E402

PATIENTS, SERIES, INSTANCES, SIZE_KB = 50, 2, 10, 16  # one study per patient
MOVE_STUDIES = 20  # studies moved (and got) per run: 400 instances
# C-FINDs per run, each on its own association: ~1000 responses a run at either level.
QUERIES = {"STUDY": 20, "IMAGE": 1}
WORKERS = 2
PACS_AE, ROUTER_AE, SINK_AE, CALLING_AE = "ORTHANC", "ROUTER", "VIEWER_SCP", "BENCH"
PROXY_AE = "ROUTERP"  # the second router, in proxy mode: Orthanc knows it as a modality
STOP_TIMEOUT = 30.0  # SIGTERM drains (drain_grace 5 s); still running after this: killed
TOOL_TIMEOUT = 120.0  # one findscu, one move or get of all studies
LANDED_TIMEOUT = 5.0  # storescp writes before it answers: the files should be there at once

ELE, ILE = uids.EXPLICIT_VR_LITTLE_ENDIAN, uids.IMPLICIT_VR_LITTLE_ENDIAN
PENDING = (0xFF00, 0xFF01)

CONFIG = """\
[router]
ae_title = "{ae}"
workers = {workers}
[[router.listen]]
host = "127.0.0.1"
port = {port}
[spool]
path = "{spool}"
[timeouts]
drain_grace = 5
[logging]
level = "INFO"
[routing]
rules = "rules.toml"
[[destination]]
name = "pacs"
host = "127.0.0.1"
port = {pacs_port}
ae_title = "{pacs_ae}"
timeout = 30
move_mode = "{move_mode}"
[[destination]]
name = "viewer"
host = "127.0.0.1"
port = {sink_port}
ae_title = "{sink_ae}"
"""

RULES = """\
[[rule]]
name = "the PACS answers queries and retrieves"
[rule.then]
query = ["pacs"]
retrieve = ["pacs"]
"""

# findscu's default output (log level INFO): a line per response, then its data set.
FIND_RESPONSE = re.compile(r"^I: Find Response: \d+ \(Pending\)", re.MULTILINE)

STUDY_KEYS = ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate",
              "ModalitiesInStudy")
IMAGE_KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "SeriesInstanceUID",
              "StudyInstanceUID")


@dataclass(frozen=True)
class Endpoint:
    """Where a requestor sends its requests: Orthanc itself, or the router."""

    label: str
    ae: str
    port: int


class Router:
    """``dicom-router run`` (2 workers) proxying queries and retrieves to Orthanc."""

    def __init__(self, home: Path, pacs: Orthanc, sink_port: int, *, ae: str = ROUTER_AE,
                 move_mode: str = "direct", port: int | None = None) -> None:
        self.port = port or free_port()
        self.ae = ae
        home.mkdir()
        config = home / "router.toml"
        (home / "rules.toml").write_text(RULES)
        config.write_text(CONFIG.format(ae=ae, workers=WORKERS, port=self.port,
                                        move_mode=move_mode,
                                        spool=home / "spool", pacs_port=pacs.dicom_port,
                                        pacs_ae=pacs.aet, sink_port=sink_port,
                                        sink_ae=SINK_AE))
        self.log: deque[str] = deque(maxlen=40)
        self.problems: list[str] = []
        self.lines = 0
        # Its own session: Ctrl-C reaches this script only, which then stops it cleanly.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "run", "--config", str(config)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert self.proc.stderr is not None
        wait_ready(self.proc, self.proc.stderr, marker="ready: ", keep=self._keep,
                   log=lambda: "".join(self.log), what="the router")
        self._reader = threading.Thread(target=self._read, name="router log", daemon=True)
        self._reader.start()

    def _keep(self, line: str) -> None:
        self.lines += 1
        self.log.append(line)
        if any(f" {level} " in line or line.startswith(f"{level} ")
               for level in ("WARNING", "ERROR", "CRITICAL")) or "Traceback" in line:
            self.problems.append(line.rstrip())

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._keep(line)

    def stop(self) -> None:
        """SIGTERM (it drains), then SIGKILL to its session if it is still there."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.problems.append(f"did not exit within {STOP_TIMEOUT:.0f} s of SIGTERM: "
                                     "killed")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers left behind, if any
        code = self.proc.wait()
        self._reader.join(10)
        if code != 0:
            self.problems.append(f"exited with {code} after SIGTERM (expected 0)")


def tree_cpu(pid: int) -> float:
    """CPU seconds so far of process ``pid`` and its live children (the router's workers
    live for the whole run; Orthanc is a single process)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def own_cpu() -> float:
    """CPU seconds of this process (the client) and its reaped children (findscu)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ru.ru_utime + ru.ru_stime


# -- the operations ------------------------------------------------------------------------


def query(level: str, keys: Sequence[str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key in keys:
        setattr(ds, key, "")
    return ds


def repeated(op: Callable[[Endpoint, str, Sequence[str]], tuple[int, list[str]]],
             times: int, level: str, keys: Sequence[str],
             ) -> Callable[[Endpoint], tuple[int, list[str]]]:
    """``op`` ``times`` times in a row, one run: the responses and problems added up."""
    def run(end: Endpoint) -> tuple[int, list[str]]:
        total, problems = 0, []
        for _ in range(times):
            count, more = op(end, level, keys)
            total += count
            problems += more
        return total, problems
    return run


def client_find(end: Endpoint, level: str, keys: Sequence[str]) -> tuple[int, list[str]]:
    """Associate, C-FIND, count the pending responses, release."""
    matches, problems = 0, []
    with connect("127.0.0.1", end.port, calling_ae=CALLING_AE, called_ae=end.ae,
                 contexts=[(uids.STUDY_ROOT_QR_FIND, [ELE])], dimse_timeout=60) as assoc:
        for status, _identifier in assoc.find(query(level, keys)):
            if status in PENDING:
                matches += 1
            elif status != 0x0000:
                problems.append(f"final C-FIND status 0x{status:04X}")
    return matches, problems


def findscu(end: Endpoint, level: str, keys: Sequence[str]) -> tuple[int, list[str]]:
    """DCMTK findscu at its default log level: its "Find Response" lines are counted."""
    args = [dcmtk_binary("findscu"), "-S", "-aet", CALLING_AE, "-aec", end.ae,
            "-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        args += ["-k", key]
    done = subprocess.run([*args, "127.0.0.1", str(end.port)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace",
                          timeout=TOOL_TIMEOUT, env=dcmtk_env())
    out = done.stdout + done.stderr
    problems = []
    if done.returncode != 0 or "E: " in out or "W: " in out:
        lines = [ln for ln in out.splitlines() if ln.startswith(("E: ", "W: "))]
        problems.append(f"findscu exited with {done.returncode}: " + " | ".join(lines[:5]))
    return len(FIND_RESPONSE.findall(out)), problems


def final_counts(final: Any, what: str, expected: int) -> tuple[int, list[str]]:
    """Completed sub-operations of a final C-MOVE/C-GET response; problems if any."""
    completed = final.number_of_completed_sub_operations or 0
    failed = final.number_of_failed_sub_operations or 0
    warning = final.number_of_warning_sub_operations or 0
    problems = []
    if final.status != 0x0000 or failed or warning or completed != expected:
        problems.append(f"{what}: final status 0x{final.status:04X}, completed {completed}, "
                        f"failed {failed}, warning {warning} (expected {expected})")
    return completed, problems


def client_move(end: Endpoint, studies: Sequence[tuple[str, int]]) -> tuple[int, list[str]]:
    """C-MOVE each study to storescp, one after the other, on one association."""
    done, problems = 0, []
    with connect("127.0.0.1", end.port, calling_ae=CALLING_AE, called_ae=end.ae,
                 contexts=[(uids.STUDY_ROOT_QR_MOVE, [ELE])], dimse_timeout=60) as assoc:
        for uid, count in studies:
            q = query("STUDY", ())
            q.StudyInstanceUID = uid
            final = None
            for rsp in assoc.move(q, SINK_AE):
                final = rsp
            if final is None:
                problems.append(f"C-MOVE of {uid}: no response")
                continue
            completed, more = final_counts(final, f"C-MOVE of {uid}", count)
            done += completed
            problems += more
    return done, problems


def client_get(end: Endpoint, studies: Sequence[tuple[str, int]]) -> tuple[int, list[str]]:
    """C-GET each study, one after the other, on one association; kept in memory."""
    done, problems = 0, []
    received: list[int] = []

    def on_store(rq: dimse.CStoreRQ, data: bytes, transfer_syntax: str) -> int:
        received.append(len(data))
        return 0x0000

    contexts = [(uids.STUDY_ROOT_QR_GET, [ELE]), (str(CTImageStorage), [ELE, ILE])]
    with connect("127.0.0.1", end.port, calling_ae=CALLING_AE, called_ae=end.ae,
                 contexts=contexts, roles={str(CTImageStorage): (False, True)},
                 on_store=on_store, dimse_timeout=60) as assoc:
        for uid, count in studies:
            q = query("STUDY", ())
            q.StudyInstanceUID = uid
            final = None
            for rsp in assoc.get(q):
                final = rsp
            if final is None:
                problems.append(f"C-GET of {uid}: no response")
                continue
            completed, more = final_counts(final, f"C-GET of {uid}", count)
            done += completed
            problems += more
    expected = sum(c for _, c in studies)
    if len(received) != expected:
        problems.append(f"{len(received)} C-STORE sub-operations received, {expected} expected")
    return done, problems


# -- measuring -----------------------------------------------------------------------------


@dataclass
class Run:
    elapsed: float
    count: int
    cpu: dict[str, float]  # "client", "router", "orthanc", "storescp"


@dataclass
class Figure:
    section: str
    name: str  # the query or the retrieve
    tool: str  # the requestor
    unit: str  # "resp/s" or "inst/s"
    expected: int
    op: Callable[[Endpoint], tuple[int, list[str]]]
    before: Callable[[], None] = lambda: None  # untimed, before each run
    after: Callable[[int], list[str]] = lambda count: []  # untimed, after each run
    runs: dict[str, list[Run]] = field(default_factory=dict)  # by endpoint label
    problems: list[str] = field(default_factory=list)

    def best(self, label: str) -> Run | None:
        return min(self.runs.get(label, []), key=lambda r: r.elapsed, default=None)


class Bench:
    def __init__(self, routers: Sequence[Router], pacs: Orthanc, sink: Proc) -> None:
        self.routers, self.pacs, self.sink = routers, pacs, sink

    def cpu(self) -> dict[str, float]:
        # Both routers: the one not being measured idles (a heartbeat a second).
        return {"client": own_cpu(),
                "router": sum(tree_cpu(r.proc.pid) for r in self.routers),
                "orthanc": tree_cpu(self.pacs.proc.pid), "storescp": tree_cpu(self.sink.pid)}

    def once(self, fig: Figure, end: Endpoint, timed: bool) -> None:
        what = f"{end.label}, {'run' if timed else 'warm-up'}"
        fig.before()
        cpu0 = self.cpu()
        start = time.perf_counter()
        try:
            count, problems = fig.op(end)
        except Exception as e:  # reported; the other figures still run
            fig.problems.append(f"{what}: {type(e).__name__}: {e}")
            return
        elapsed = time.perf_counter() - start
        cpu1 = self.cpu()
        problems += fig.after(count)
        if count != fig.expected:
            problems.append(f"{count} counted, {fig.expected} expected")
        fig.problems += [f"{what}: {p}" for p in problems]
        if timed:
            fig.runs.setdefault(end.label, []).append(
                Run(elapsed, count, {k: cpu1[k] - cpu0[k] for k in cpu1}))

    def measure(self, fig: Figure, ends: Sequence[Endpoint], repeat: int) -> None:
        for end in ends:
            self.once(fig, end, timed=False)
        for _ in range(repeat):
            for end in ends:  # taking turns: a drift of the machine hits both alike
                self.once(fig, end, timed=True)


# -- setup ---------------------------------------------------------------------------------


def generate(root: Path) -> list[tuple[str, list[Path]]]:
    """The studies: (Study Instance UID, files), one study per patient."""
    studies: list[tuple[str, list[Path]]] = []
    for p in range(PATIENTS):
        uid = str(generate_uid())
        files = make_study(root / f"p{p:03d}", n_series=SERIES, n_instances=INSTANCES,
                           size_kb=SIZE_KB, patient_id=f"BENCH{p:04d}",
                           patient_name=f"Bench^Patient{p:04d}", study_uid=uid, seed=p)
        studies.append((uid, files))
    return studies


def load(pacs: Orthanc, files: Sequence[Path]) -> None:
    """POST every file to Orthanc's REST API, 4 at a time (its HTTP threads)."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for result in pool.map(pacs.upload, files):
            if result.get("Status") != "Success":
                raise RuntimeError(f"Orthanc did not store an instance: {result}")


def start_sink(procs: Procs, landing: Path) -> tuple[Proc, int]:
    """DCMTK storescp (a process per association) writing each instance into ``landing``.

    Not single-process: a router's workers each keep an association to a destination
    open while there is work (and ``idle`` seconds after), and a single-process
    storescp would serve them one after the other."""
    landing.mkdir()
    for _ in range(3):  # a port taken between free_port() and storescp's bind: again
        port = free_port()
        # --fork: the two routers' workers may each hold an association to it at once.
        proc = procs.start([dcmtk_binary("storescp"), "--fork", "-aet", SINK_AE,
                            "-od", str(landing), "-uf", "-dhl", str(port)],
                           name="storescp", env=dcmtk_env())
        try:
            wait_for_port("127.0.0.1", port, timeout=10, proc=proc)
        except RuntimeError:
            proc.stop()
            continue
        return proc, port
    raise RuntimeError("storescp did not start:\n" + proc.log())


def landed(landing: Path) -> int:
    return sum(1 for e in os.scandir(landing) if e.is_file())


def clear(landing: Path) -> None:
    for entry in os.scandir(landing):
        os.unlink(entry.path)


def check_landed(landing: Path, expected: int) -> list[str]:
    """storescp answers each C-STORE once its file is written: count (bounded wait)."""
    deadline = time.monotonic() + LANDED_TIMEOUT
    while (n := landed(landing)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return [] if n == expected else [f"{n} files in storescp's folder, {expected} expected"]


# -- report --------------------------------------------------------------------------------


def report(figures: Sequence[Figure], ends: Sequence[Endpoint], repeat: int) -> None:
    a, b = (e.label for e in ends)
    cols = ("a client", "a orthnc", "b client", "b router", "b orthnc")
    section = None
    for fig in figures:
        if fig.section != section:
            section = fig.section
            print(f"\n== {section}; best of {repeat} after 1 warm-up each")
            print(f"{'':<38}{'count':>6}{'(a) s':>8}{'(a) /s':>8}{'(b) s':>8}{'(b) /s':>8}"
                  f"{'b/a':>6}  CPU ms/1000:" + "".join(f"{c:>9}" for c in cols))
        ra, rb = fig.best(a), fig.best(b)
        label = f"{fig.name}, {fig.tool}"
        if ra is None or rb is None:
            print(f"{label:<38}{fig.expected:6}  (no figures: see the warnings)")
            continue
        rate_a, rate_b = ra.count / ra.elapsed, rb.count / rb.elapsed
        cpu = (ra.cpu["client"] / ra.count, ra.cpu["orthanc"] / ra.count,
               rb.cpu["client"] / rb.count, rb.cpu["router"] / rb.count,
               rb.cpu["orthanc"] / rb.count)
        print(f"{label:<38}{rb.count:6}{ra.elapsed:8.3f}{rate_a:8.0f}{rb.elapsed:8.3f}"
              f"{rate_b:8.0f}{rate_b / rate_a:6.2f}  {'':12}"
              + "".join(f"{c * 1e6:9.0f}" for c in cpu))


def run(tmp: Path, repeat: int) -> list[str]:
    """Set everything up, measure, print; returns the warnings."""
    warnings: list[str] = []
    procs = Procs(tmp / "logs")
    pacs: Orthanc | None = None
    router: Router | None = None
    proxy: Router | None = None
    try:
        began = time.monotonic()
        studies = generate(tmp / "data")
        files = [f for _, fs in studies for f in fs]
        size = sum(f.stat().st_size for f in files)
        landing = tmp / "storescp-out"
        sink, sink_port = start_sink(procs, landing)
        proxy_port = free_port()
        pacs = start_orthanc(procs, tmp / "orthanc", aet=PACS_AE,
                             modalities={"viewer": (SINK_AE, "127.0.0.1", sink_port),
                                         "router": (PROXY_AE, "127.0.0.1", proxy_port)})
        load(pacs, files)
        stored = pacs.statistics()["CountInstances"]
        router = Router(tmp / "router", pacs, sink_port)
        proxy = Router(tmp / "router-proxy", pacs, sink_port, ae=PROXY_AE, move_mode="proxy",
                       port=proxy_port)
        print(f"setup: {PATIENTS} patients x 1 study x {SERIES} series x {INSTANCES} "
              f"instances = {len(files)} CT instances of {size // len(files):,} bytes "
              f"({size / 1e6:.1f} MB) generated and loaded into Orthanc by REST in "
              f"{time.monotonic() - began:.1f} s (not measured); Orthanc holds {stored}")
        if stored != len(files):
            warnings.append(f"Orthanc holds {stored} instances, {len(files)} uploaded")

        ends = [Endpoint("(a)", pacs.aet, pacs.dicom_port),
                Endpoint("(b)", ROUTER_AE, router.port)]
        moved = [(uid, len(fs)) for uid, fs in studies[:MOVE_STUDIES]]
        n_moved = sum(c for _, c in moved)
        finds = [("STUDY", STUDY_KEYS, PATIENTS, f"STUDY, {PATIENTS} matches"),
                 ("IMAGE", IMAGE_KEYS, len(files), f"IMAGE, {len(files)} matches")]
        c_find = ("1. C-FIND (study root) matching every study / every instance, responses/s; "
                  "a run: n x (associate, C-FIND, release)")
        figures = [Figure(c_find, f"{QUERIES[level]} x {name}", tool, "resp/s",
                          count * QUERIES[level], repeated(op, QUERIES[level], level, keys))
                   for level, keys, count, name in finds
                   for tool, op in (("our client", client_find), ("findscu", findscu))]
        figures.append(Figure(
            f"2. C-MOVE to storescp, instances/s; {MOVE_STUDIES} studies one after the other "
            "on one association of our client", f"{MOVE_STUDIES} studies", "our client",
            "inst/s", n_moved, lambda end: client_move(end, moved),
            before=lambda: clear(landing), after=lambda _: check_landed(landing, n_moved)))
        proxied = Figure(
            f"2b. C-MOVE in proxy mode: Orthanc moves to the router, which relays each "
            f"instance to storescp; (b) is the router {PROXY_AE} (move_mode = \"proxy\")",
            f"{MOVE_STUDIES} studies", "our client",
            "inst/s", n_moved, lambda end: client_move(end, moved),
            before=lambda: clear(landing), after=lambda _: check_landed(landing, n_moved))
        figures.append(Figure(
            f"3. C-GET, instances/s; the same {MOVE_STUDIES} studies, one association of our "
            "client, instances kept in memory", f"{MOVE_STUDIES} studies", "our client",
            "inst/s", n_moved, lambda end: client_get(end, moved)))
        print(f"(a) straight to Orthanc {pacs.aet} (127.0.0.1:{pacs.dicom_port}); (b) through "
              f"the router ({WORKERS} workers, query and retrieve rule -> Orthanc); "
              "rates from the best run's elapsed time; CPU ms per 1000 responses or "
              "instances in the best runs, of the requestor (this process or findscu), the "
              "router (supervisor + workers) and Orthanc (read from /proc: 10 ms ticks, "
              "indicative)")

        bench = Bench([router, proxy], pacs, sink)
        for fig in figures:
            bench.measure(fig, ends, repeat)
        proxy_ends = [ends[0], Endpoint("(b)", PROXY_AE, proxy.port)]
        bench.measure(proxied, proxy_ends, repeat)
        figures.insert(len(figures) - 1, proxied)
        report(figures, ends, repeat)
        for fig in figures:
            warnings += [f"{fig.name}, {fig.tool}: {p}" for p in fig.problems]
            counts = {e.label: {r.count for r in fig.runs.get(e.label, [])} for e in ends}
            if counts["(a)"] and counts["(b)"] and counts["(a)"] != counts["(b)"]:
                warnings.append(f"{fig.name}, {fig.tool}: counts differ, (a) "
                                f"{sorted(counts['(a)'])}, (b) {sorted(counts['(b)'])}")
    finally:
        if proxy is not None:
            proxy.stop()
        if router is not None:
            router.stop()
            if router.problems:
                warnings.append(f"router: {len(router.problems)} warning/error line(s) in its "
                                "log; the first ones:\n  "
                                + "\n  ".join(router.problems[:10]))
            if router.problems or warnings:
                warnings.append("router log, last lines:\n  "
                                + "  ".join(router.log).rstrip())
            print(f"router log: {router.lines} lines, {len(router.problems)} warning/error")
        if pacs is not None:
            pacs.kill()  # SIGTERM would take 3.5 s; the storage is thrown away
        procs.stop_all()
    return warnings


def _terminate(signum: int, frame: Any) -> None:
    sys.exit(128 + signum)  # SystemExit: the finally blocks stop every process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per figure and "
                        "setup (best kept)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the data, Orthanc's storage, the spool and storescp's "
                             "output go, in a temporary folder")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="bench-qr-", dir=args.dir))
    began = time.monotonic()
    try:
        print(f"{os.cpu_count()} cores; data, Orthanc storage and storescp output in "
              f"{tmp.parent}; every DCMTK process (Orthanc included) with TCP_NODELAY=1")
        warnings = run(tmp, args.repeat)
        for warning in warnings:
            print(f"WARNING {warning}")
        print(f"\ntotal {time.monotonic() - began:.0f} s")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
