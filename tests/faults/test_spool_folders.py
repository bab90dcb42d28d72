"""An operator removes spool folders under a running router (rm -rf unrouted/ to empty
it, the queue of a destination, tmp/ itself): DCMTK storescu keeps getting Success for
every instance, those instances land in the folders made again, and the destination
still receives every one it is owed. Before the fix every later commit into a removed
folder failed with 0x0110 until the router was restarted.
"""

from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path

import pytest

from tests.helpers import Dcmtk, Procs, make_ct, received_files, storescp_server
from tests.helpers.net import free_port
from tests.helpers.router import Router

pytestmark = pytest.mark.interop


def _study(folder: Path, count: int, modality: str, seed: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = [folder / f"{i}.dcm" for i in range(count)]
    for i, path in enumerate(paths):
        make_ct(path, size_kb=16, modality=modality, seed=seed * 100 + i)
    return paths


def _remove(folder: Path) -> None:
    """rm -rf as an operator's: an idle worker may be making spool files in tmp/ at
    that moment (Spool.stock), and a file made between the listing and the rmdir
    leaves it "not empty"; the operator runs it again."""
    deadline = time.monotonic() + 10
    while True:
        try:
            shutil.rmtree(folder)
            return
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY or time.monotonic() > deadline:
                raise


def test_removed_spool_folders_are_made_again_without_a_failed_store(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    port = free_port()
    scp = storescp_server(tmp_path, procs, port=port, aet="PACS", args=["+B"], dcmtk=dcmtk)
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "CT to PACS"\n[rule.when]\nModality = "CT"\n'
        '[rule.then]\nforward = ["pacs"]\n')
    router = Router(tmp_path, extra=(
        '[routing]\nrules = "rules.toml"\nunmatched = "keep"\n[[destination]]\n'
        f'name = "pacs"\nhost = "127.0.0.1"\nport = {port}\nae_title = "PACS"\nidle = 1\n'))

    def send(tag: str, seed: int) -> list[Path]:
        ct = _study(tmp_path / f"ct-{tag}", 5, "CT", seed)
        mr = _study(tmp_path / f"mr-{tag}", 5, "MR", seed + 1)
        done = dcmtk.run("storescu", "-aet", "MOD", "-aec", "ROUTER", "127.0.0.1",
                         str(router.port), *map(str, ct + mr))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "status=0110" not in (done.stdout + done.stderr).lower()
        return ct

    try:
        router.wait_for("ready: 2 workers serving")
        sent = send("a", 1)
        router.wait_count("forward pacs:", 5)
        spool = router.spool
        assert len(list((spool / "unrouted").glob("*.dcm"))) == 5
        for folder in ("unrouted", "queue/pacs", "tmp"):
            _remove(spool / folder)
        sent += send("b", 3)
        router.wait_count("forward pacs:", 10)
        stores = [line for line in router.log().splitlines() if " C-STORE " in line]
        assert len(stores) == 20 and all("status 0x0000" in line for line in stores)
        assert router.count("was removed or replaced while the router ran") >= 1
        assert len(list((spool / "unrouted").glob("*.dcm"))) == 5  # the new MR ones
    finally:
        assert router.stop() == 0
    got = {p.read_bytes()[-4096:] for p in received_files(scp.outdir)}
    assert len(got) == 10 and got == {p.read_bytes()[-4096:] for p in sent}
