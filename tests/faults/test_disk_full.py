"""A real full disk under the running router: its spool on a 4 MiB tmpfs.

DCMTK storescu sends more than fits. What must hold: every instance answered 0x0000 is
in the spool whole and byte for byte; every other one is answered A700 (Out of
Resources, PS3.4 Annex B.2.3) and leaves nothing behind (no partial file, nothing in
tmp/); the log says why in one line per instance; the association itself goes on; once
space is freed, the same router stores again without a restart.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Dcmtk, make_ct
from tests.helpers.router import Router, leftovers

pytestmark = pytest.mark.interop

SIZE_KB = 900
TMPFS_BYTES = 4 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/spool as a 4 MiB tmpfs: ENOSPC for real, from the kernel."""
    mount = tmp_path / "spool"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0755",
                           "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs for the full-disk test: {done.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs needs root: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _sent(dcmtk: Dcmtk, router: Router, files: list[Path]) -> str:
    # -nh: storescu stops at the first failed store by default
    done = dcmtk.run("storescu", "-nh", "-aet", "MOD", "-aec", "ROUTER", "127.0.0.1",
                     str(router.port), *map(str, files))
    return done.stdout + done.stderr


def test_full_disk_answers_a700_keeps_every_acknowledged_and_recovers(
        tmp_path: Path, small_disk: Path, dcmtk: Dcmtk) -> None:
    data = tmp_path / "data"
    data.mkdir()
    files = [data / f"{i}.dcm" for i in range(8)]  # ~7 MiB for a 4 MiB disk
    for i, path in enumerate(files):
        make_ct(path, size_kb=SIZE_KB, seed=i)
    router = Router(tmp_path, extra="[routing]\nunmatched = \"keep\"\n")
    try:
        router.wait_for("ready: 2 workers serving")
        _sent(dcmtk, router, files)
        router.wait_count(" C-STORE ", len(files))
        stores = [line for line in router.log().splitlines() if " C-STORE " in line]
        ok = [line for line in stores if "status 0x0000" in line]
        full = [line for line in stores if "status 0xA700" in line]
        assert len(ok) + len(full) == len(files), "\n".join(stores)
        assert 1 <= len(ok) < len(files) and full
        # One line per refused instance says why, naming the association.
        why = [line for line in router.log().splitlines()
               if "No space left on device" in line and "association" in line]
        assert len(why) >= len(full)
        kept = sorted((small_disk / "unrouted").glob("*.dcm"))
        assert len(kept) == len(ok)
        sent = {p.read_bytes()[-(SIZE_KB - 4) * 1024:]: p for p in files}
        for path in kept:  # whole, byte for byte: the tail of the pixel data matches
            assert path.read_bytes()[-(SIZE_KB - 4) * 1024:] in sent
        assert leftovers(small_disk / "tmp") == []

        # Space again (an operator moved the kept ones away): the same router stores.
        for path in kept:
            path.unlink()
        start = len(stores)
        _sent(dcmtk, router, files[:2])
        router.wait_count(" C-STORE ", len(files) + 2)
        again = [line for line in router.log().splitlines() if " C-STORE " in line][start:]
        assert all("status 0x0000" in line for line in again), "\n".join(again)
    finally:
        assert router.stop() == 0
