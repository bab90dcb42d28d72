"""C-STORE receive throughput: our SCP (discarding) vs DCMTK storescp --ignore.

Issue 2's benchmark. Prints, for ~500 KB CT-like instances and for ~2 KB ones,
with DCMTK storescu as the sender (one stream, then two in parallel):

    instances/s and MB/s into (a) our SCP with a discard handler and
    (b) DCMTK ``storescp --ignore`` (``--fork`` for two streams, so that DCMTK
    serves them in parallel too), and the ratio a/b.

Every DCMTK process runs with TCP_NODELAY=1 (DESIGN.md §4: with Nagle on, a
message costs 40-90 ms). A last row sends ``--nagle`` tiny instances (one stream)
with the sender left at its default, Nagle on, as many real modalities are: a
receiver that delays its ACKs then costs the sender ~40 ms per instance; ours
acknowledges at once (TCP_QUICKACK).

    .venv/bin/python bench/bench_store_scp.py [--ct 400] [--tiny 3000] [--nagle 100]

This is a benchmark, not a test: it asserts nothing and prints figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import dcmtk_binary, make_data  # noqa: E402
from tests.helpers.net import free_port, wait_for_port  # noqa: E402


class Receiver:
    def __init__(self, name: str, argv_for_port, ready_line: bool) -> None:
        self.name = name
        self.port = free_port()
        self.proc = subprocess.Popen(
            argv_for_port(self.port), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=dict(os.environ, TCP_NODELAY="1"), text=True)
        if ready_line:
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if not line.startswith("READY"):
                raise RuntimeError(f"{name} did not start: {line!r}")
        else:
            wait_for_port("127.0.0.1", self.port, timeout=10, proc=self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def send(port: int, dirs: Sequence[Path], nagle: bool) -> float:
    """Run one storescu per folder in parallel; seconds until all are done."""
    env = dict(os.environ)
    if not nagle:
        env["TCP_NODELAY"] = "1"
    else:
        env.pop("TCP_NODELAY", None)
    storescu = dcmtk_binary("storescu")
    start = time.perf_counter()
    procs = [subprocess.Popen([storescu, "-aec", "BENCH", "+sd", "-nh", "127.0.0.1",
                               str(port), str(d)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for d in dirs]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed ({p.returncode}): {err[-500:]}")
    return time.perf_counter() - start


def measure(receiver: Receiver, dirs: Sequence[Path], repeat: int, nagle: bool) -> float:
    """Best of ``repeat`` runs, in seconds (the least disturbed by the machine)."""
    send(receiver.port, dirs, nagle)  # warm-up: page cache, imports, first accept
    return min(send(receiver.port, dirs, nagle) for _ in range(repeat))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", type=int, default=400, help="number of ~500 KB instances")
    parser.add_argument("--tiny", type=int, default=3000, help="number of ~2 KB instances")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (best kept)")
    parser.add_argument("--nagle", type=int, default=100,
                        help="tiny instances sent with the sender's Nagle on (0: skip)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    receivers: list[Receiver] = []
    try:
        def scp(processes: int) -> Receiver:
            return Receiver(f"router SCP x{processes}", lambda port: [
                sys.executable, str(ROOT / "bench" / "scp_discard.py"), "--port", str(port),
                "--processes", str(processes)], ready_line=True)

        ours = scp(1)
        receivers.append(ours)
        # One Python process runs on one core: parallel streams get one process
        # each, as the router's workers will (DESIGN.md D8); the single-process
        # figure is printed too.
        ours_pre = scp(2)
        receivers.append(ours_pre)
        dcmtk = Receiver("storescp --ignore",
                         lambda port: [dcmtk_binary("storescp"), "--ignore", str(port)],
                         ready_line=False)
        receivers.append(dcmtk)
        # storescp serves one association at a time; for parallel streams DCMTK's
        # own answer is --fork (a process per association), so that is the anchor.
        dcmtk_fork = Receiver("storescp --ignore --fork",
                              lambda port: [dcmtk_binary("storescp"), "--ignore", "--fork",
                                            str(port)],
                              ready_line=False)
        receivers.append(dcmtk_fork)
        print(f"{'data':<14}{'streams':>8}{'sender':>8}{'procs':>6}  {'router SCP':>22}  "
              f"{'storescp --ignore':>22}  {'ratio':>6}")
        runs = [("ct", args.ct, 1, False, 1), ("ct", args.ct, 2, False, 1),
                ("ct", args.ct, 2, False, 2),
                ("tiny", args.tiny, 1, False, 1), ("tiny", args.tiny, 2, False, 1),
                ("tiny", args.tiny, 2, False, 2),
                ("tiny", args.nagle, 1, True, 1)]
        for kind, count, streams, nagle, processes in runs:
            if count <= 0:
                continue
            dirs = make_data(tmp / "data", kind, count, streams)
            size = sum(f.stat().st_size for d in dirs for f in d.iterdir())
            repeat = 1 if nagle else args.repeat
            t_ours = measure(ours if processes == 1 else ours_pre, dirs, repeat, nagle)
            t_dcmtk = measure(dcmtk if streams == 1 else dcmtk_fork, dirs, repeat, nagle)
            label = f"{kind} {size / count / 1024:.0f} KB"

            def fig(t: float, count: int = count, size: int = size) -> str:
                return f"{count / t:8.0f} inst/s {size / t / 1e6:7.1f} MB/s"

            print(f"{label:<14}{streams:>8}{'nagle' if nagle else 'nodelay':>8}{processes:>6}  "
                  f"{fig(t_ours):>22}  {fig(t_dcmtk):>22}  {t_dcmtk / t_ours:6.2f}",
                  flush=True)
            shutil.rmtree(tmp / "data")
    finally:
        for r in receivers:
            r.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
