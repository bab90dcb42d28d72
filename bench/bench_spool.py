"""Spool throughput: 512 KB instances made durable on this disk, files/s.

Rows, each on a fresh spool in a temporary directory on the disk under test
(``--dir``, default /var/tmp, which is disk-backed where /tmp may be tmpfs):

    raw fsync       write + fsync(file), no rename: the figure DESIGN.md §4 quotes
                    (~590 files/s one at a time on this machine class)
    one at a time   Spool: write, fsync(file), rename, fsync(incoming/) per instance
    group commit N  N sender threads, each: write, GroupCommitter.submit, wait for its
                    future; one directory fsync per batch
    no fsync        Spool(fsync=False), one at a time: the cost without durability

Each instance is written as 64 KiB fragments (memoryviews), as P-DATA would bring it.
Latency is from ``begin`` to durable (finish returned / future resolved).

    .venv/bin/python bench/bench_spool.py [--count 600] [--size-kb 512] [--dir /var/tmp]

This is a benchmark, not a test: it asserts nothing and prints figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.spool import GroupCommitter, Spool, SpoolWriter  # noqa: E402

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
FRAGMENT = 64 * 1024


def begin(spool: Spool, i: int) -> SpoolWriter:
    return spool.begin(sop_class_uid=CT_STORAGE, sop_instance_uid=f"1.2.826.0.1.3680043.2.{i}",
                       transfer_syntax=EXPLICIT_LE, calling_ae="BENCH", called_ae="ROUTER",
                       association_id="bench")


def feed(writer: SpoolWriter, data: memoryview) -> None:
    for start in range(0, len(data), FRAGMENT):
        writer.write(data[start:start + FRAGMENT])


def raw_fsync(root: Path, data: memoryview, count: int) -> list[float]:
    latencies = []
    for i in range(count):
        t0 = time.perf_counter()
        fd = os.open(root / f"{i}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for start in range(0, len(data), FRAGMENT):
                os.write(fd, data[start:start + FRAGMENT])
            os.fsync(fd)
        finally:
            os.close(fd)
        latencies.append(time.perf_counter() - t0)
    return latencies


def one_at_a_time(root: Path, data: memoryview, count: int, *, fsync: bool) -> list[float]:
    latencies = []
    with Spool(root, fsync=fsync) as spool:
        for i in range(count):
            t0 = time.perf_counter()
            writer = begin(spool, i)
            feed(writer, data)
            writer.finish()
            latencies.append(time.perf_counter() - t0)
    return latencies


def group_commit(root: Path, data: memoryview, count: int, senders: int) -> tuple[list[float], int]:
    latencies: list[float] = []
    lock = threading.Lock()
    with Spool(root) as spool, GroupCommitter(spool) as committer:

        def sender(k: int) -> None:
            mine = []
            for i in range(k, count, senders):
                t0 = time.perf_counter()
                writer = begin(spool, i)
                feed(writer, data)
                committer.submit(writer).result()
                mine.append(time.perf_counter() - t0)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=sender, args=(k,)) for k in range(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return latencies, committer.batches


def measure(label: str, base: Path, run: Callable[[Path], object], count: int,
            size: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="spool-", dir=base))
    try:
        os.sync()  # start each row with no dirty pages of the previous one
        t0 = time.perf_counter()
        result = run(root)
        elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(root)
    latencies, extra = result if isinstance(result, tuple) else (result, "")
    assert isinstance(latencies, list)
    lat = sorted(latencies)
    p50 = statistics.median(lat) * 1e3
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3
    note = f"  {count / extra:5.1f} files/batch" if extra else ""
    print(f"{label:<18} {count / elapsed:8.0f} files/s {count * size / elapsed / 1e6:7.0f} MB/s"
          f"   latency p50 {p50:6.2f} ms  p99 {p99:6.2f} ms{note}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=600, help="instances per row")
    parser.add_argument("--size-kb", type=int, default=512, help="instance size in KB")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where to make the temporary spools (the disk under test)")
    args = parser.parse_args()
    size = args.size_kb * 1000
    data = memoryview(os.urandom(size))
    count = args.count
    base = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=args.dir))
    try:
        print(f"{count} instances of {args.size_kb} KB per row, spool under {base} "
              f"({os.cpu_count()} CPUs)")
        measure("raw fsync", base, lambda r: raw_fsync(r, data, count), count, size)
        measure("one at a time", base, lambda r: one_at_a_time(r, data, count, fsync=True),
                count, size)
        for senders in (2, 4, 8):
            measure(f"group commit x{senders}", base,
                    lambda r, s=senders: group_commit(r, data, count, s), count, size)
        measure("no fsync", base, lambda r: one_at_a_time(r, data, count, fsync=False),
                count, size)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
