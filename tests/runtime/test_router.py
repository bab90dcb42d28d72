"""The real router (supervisor + worker processes) driven by DCMTK.

Each test starts ``dicom-router run`` as a subprocess on a free loopback port
with its own spool, waits for its "ready" log line (an event, not a sleep),
and checks the outcome in the spool, the exit code and the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest

from router import control
from router.dicom.dataset import read_part10_header
from tests.helpers import Procs
from tests.helpers.data import make_ct, make_study
from tests.helpers.dcmtk import Dcmtk, dcmtk_env, storescp_server
from tests.helpers.net import free_port
from tests.helpers.router import Router, leftovers
from workers.spool import FRESH_SPARES

pytestmark = pytest.mark.interop

@pytest.fixture
def router(tmp_path: Path) -> Iterator[Router]:
    r = Router(tmp_path)
    try:
        r.wait_for("ready: 2 workers serving")
        yield r
    finally:
        r.stop()
        # No worker may outlive the router.
        for line in r.lines:
            if "started (pid " in line:
                pid = int(line.rsplit("pid ", 1)[1].rstrip(")"))
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)


def _dataset(path: Path) -> bytes:
    return path.read_bytes()[read_part10_header(path).dataset_offset:]


def _spooled(router: Router) -> list[Path]:
    return sorted((router.spool / "unrouted").glob("*.dcm"))


def test_64_concurrent_storescu_into_2_workers(router: Router, dcmtk: Dcmtk,
                                               tmp_path: Path) -> None:
    studies = [make_study(tmp_path / f"s{i}", n_series=1, n_instances=2, size_kb=16,
                          patient_id=f"P{i}") for i in range(64)]

    def send(files: list[Path]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([dcmtk.storescu, "-aet", "MODALITY", "-aec", "ROUTER",
                               "127.0.0.1", str(router.port), *map(str, files)],
                              capture_output=True, text=True, timeout=120, env=dcmtk_env())

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(send, studies))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    sent = {_dataset(f) for files in studies for f in files}
    spooled = _spooled(router)
    assert len(spooled) == len(sent) == 128
    assert {_dataset(p) for p in spooled} == sent
    for path in spooled[:3]:
        assert pydicom.dcmread(path).file_meta.SourceApplicationEntityTitle == "MODALITY"
    status = router.status()
    workers = status["workers"]
    assert isinstance(workers, list) and len(workers) == 2
    assert all(w["pid"] > 0 and w["served_total"] > 0 for w in workers), workers


def test_kill_9_worker_mid_transfer(router: Router, dcmtk: Dcmtk, tmp_path: Path) -> None:
    """kill -9 of a worker while it and the other worker each have an association
    in flight: the supervisor replaces it within 2 s; the other worker's
    association completes; every acknowledged instance is intact in the spool;
    no partial file is visible as complete."""
    big = tmp_path / "big"
    big.mkdir()
    # Long enough that the victim's association is still in flight when the second
    # one arrives, even on a loaded CI machine (6 of these once finished in 0.5 s).
    for i in range(16):
        make_ct(big / f"{i}.dcm", size_kb=20_000, seed=i)
    medium = tmp_path / "medium"
    medium.mkdir()
    for i in range(8):
        make_ct(medium / f"{i}.dcm", size_kb=5_000, seed=100 + i)
    pids = {w["worker_id"]: w["pid"] for w in router.status()["workers"]}  # type: ignore[index, union-attr]

    def storescu(folder: Path) -> subprocess.Popen[str]:
        return subprocess.Popen([dcmtk.storescu, "-aec", "ROUTER", "--max-pdu", "16384",
                                 "127.0.0.1", str(router.port),
                                 *sorted(map(str, folder.iterdir()))],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dcmtk_env())

    victim_sender = storescu(big)
    first = router.wait_for("C-STORE")
    victim = 1 if "worker-1" in router.lines[first] else 2
    survivor = 3 - victim
    other_sender = storescu(medium)  # least loaded: goes to the other worker
    router.wait_for(f"worker-{survivor} workers.actor: association", start=first)
    killed_at = time.monotonic()
    os.kill(pids[victim], signal.SIGKILL)
    router.wait_for(f"worker {victim} ready", start=first + 1)
    replaced_in = time.monotonic() - killed_at
    victim_sender.communicate(timeout=60)
    other_out, _ = other_sender.communicate(timeout=120)
    assert replaced_in < 2.0, f"worker replaced (ready again) in {replaced_in:.2f} s"
    assert other_sender.returncode == 0, other_out
    spooled = {_dataset(p) for p in _spooled(router)}
    for f in medium.iterdir():
        assert _dataset(f) in spooled
    # Every acknowledged instance is there, intact; nothing else is.
    acknowledged = {line.split(" C-STORE ", 1)[1].split()[1]
                    for line in router.lines if " C-STORE " in line and "0x0000" in line}
    in_spool = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                for p in _spooled(router)}
    assert acknowledged <= in_spool
    originals = {_dataset(f) for folder in (big, medium) for f in folder.iterdir()}
    assert spooled <= originals  # no truncated instance among the complete ones
    assert not list((router.spool / "unrouted").glob("*.part"))
    # What the killed worker left in tmp/ (its partial file, its spares) is gone: its
    # replacement swept it at start, leaving the other worker's spares alone.
    assert not [p.name for p in (router.spool / "tmp").iterdir()
                if f"-{pids[victim]}-" in p.name]
    assert [p for p in (router.spool / "tmp").iterdir() if f"-{pids[survivor]}-" in p.name]


def test_instances_are_written_into_files_made_while_idle(router: Router, dcmtk: Dcmtk,
                                                         tmp_path: Path) -> None:
    """An idle worker makes empty files in tmp/ ahead (Spool.stock); the instances of
    the next association are written into them: no inode is allocated on the way to
    their acknowledgements. What lands is byte for byte what was sent."""
    tmp = router.spool / "tmp"
    deadline = time.monotonic() + 60
    # Until both workers made all they make: with only a first batch, the worker that
    # gets the association may not have started (a loaded machine), and would then
    # create files for it, which is right but not what this test is about.
    while len(list(tmp.glob("*.spare"))) < 2 * FRESH_SPARES:
        assert time.monotonic() < deadline, "no spool files made ahead"
        time.sleep(0.05)
    made = {p.stat().st_ino for p in tmp.glob("*.spare")}
    assert all(p.stat().st_size == 0 for p in tmp.glob("*.spare"))
    study = make_study(tmp_path / "s", n_series=1, n_instances=12, size_kb=64)
    done = subprocess.run([dcmtk.storescu, "-aet", "MODALITY", "-aec", "ROUTER", "127.0.0.1",
                           str(router.port), *map(str, study)],
                          capture_output=True, text=True, timeout=60, env=dcmtk_env())
    assert done.returncode == 0, done.stderr
    spooled = _spooled(router)
    assert {_dataset(p) for p in spooled} == {_dataset(f) for f in study}
    assert {p.stat().st_ino for p in spooled} <= made
    assert not leftovers(tmp)


def test_sigterm_drains_and_exits_0(router: Router, dcmtk: Dcmtk) -> None:
    done = dcmtk.run("echoscu", "-aec", "ROUTER", "127.0.0.1", str(router.port))
    assert done.returncode == 0
    assert router.stop() == 0
    # Its socket files go with it: `status` after a clean stop waited out its whole
    # timeout on the admin socket file left behind, to say "stale socket?".
    assert not [p.name for p in (router.spool / "run").iterdir() if p.is_socket()]
    started = time.monotonic()
    status = router.command("status", "--timeout", "20")
    assert status.returncode != 0 and time.monotonic() - started < 10, status
    assert "all workers stopped" in router.log()


def test_client_that_sends_nothing_is_dropped_after_artim(router: Router) -> None:
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(64) == b""
        assert 1.0 < time.monotonic() - started < 8.0  # artim = 2 s in the test config
    router.wait_for("ARTIM timer expired")


def test_garbage_gets_an_abort_and_the_router_keeps_serving(router: Router,
                                                           dcmtk: Dcmtk) -> None:
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(b"\x09\x00\x00\x00\x00\x02\x00\x00")
        reply = sock.recv(64)
        assert reply[:1] == b"\x07"  # A-ABORT
    router.wait_for("unrecognized PDU type 0x09")
    assert dcmtk.run("echoscu", "-aec", "ROUTER", "127.0.0.1",
                     str(router.port)).returncode == 0


def test_sighup_reload_valid_and_invalid(router: Router, dcmtk: Dcmtk) -> None:
    # Valid: the router answers to a second called AE title after the reload.
    router.write_config(extra='[acceptance]\ncalled_ae = ["ROUTER", "ROUTER2"]\n')
    router.proc.send_signal(signal.SIGHUP)
    router.wait_for("configuration generation 2 loaded")
    at = len(router.lines)
    for w in (1, 2):
        router.wait_for(f"worker {w}: configuration generation 2 loaded", start=0)
    assert dcmtk.run("echoscu", "-aec", "ROUTER2", "127.0.0.1",
                     str(router.port)).returncode == 0
    # Invalid: refused with one line, the running config stays.
    router.config.write_text(router.config.read_text() + "\nbogus = 1\n")
    router.proc.send_signal(signal.SIGHUP)
    router.wait_for("reload refused", start=at)
    assert dcmtk.run("echoscu", "-aec", "ROUTER2", "127.0.0.1",
                     str(router.port)).returncode == 0
    # `dicom-router reload` (what systemctl reload and kubectl exec run) says so too,
    # with exit code 2 and the reason, not a success.
    # The case the CLI cannot see by itself: a valid file whose rules do not validate.
    (router.config.parent / "rules.toml").write_text(
        '[[rule]]\nname = "x"\n[rule.then]\nforward = ["nowhere"]\n')
    router.config.write_text(router.config.read_text().replace(
        "\nbogus = 1\n", '\n[routing]\nrules = "rules.toml"\n'))
    refused = router.command("reload")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "refused" in refused.stderr and "nowhere" in refused.stderr, refused.stderr
    (router.config.parent / "rules.toml").write_text(
        '[[rule]]\nname = "x"\n[rule.then]\ndrop = true\n')
    done = router.command("reload")
    assert done.returncode == 0 and "reloaded: configuration generation 3" in done.stdout, (
        done.stdout + done.stderr)


def test_a_reload_sets_the_log_level(router: Router, dcmtk: Dcmtk) -> None:
    """[logging] level reloaded as "reloaded" and changed nothing, while a worker
    restarted later took it: half the associations vanished from the log (an outside
    campaign). Every process now takes it with the reload."""
    router.wait_for("ready: 2 workers serving")
    router.write_config(extra='[logging]\nlevel = "WARNING"\n')
    assert router.command("reload").returncode == 0
    router.wait_for("reload: log level WARNING, was INFO")
    for w in (1, 2):
        router.wait_for(f"worker {w}: log level WARNING, was INFO")
    before = router.count("closed: released")
    for _ in range(4):  # both workers
        assert dcmtk.run("echoscu", "-aec", "ROUTER", "127.0.0.1",
                         str(router.port)).returncode == 0
    router.write_config()  # INFO again: said, and heard
    assert router.command("reload").returncode == 0
    for w in (1, 2):
        router.wait_for(f"worker {w}: configuration generation 3 loaded")
    assert router.count("closed: released") == before
    assert dcmtk.run("echoscu", "-aec", "ROUTER", "127.0.0.1",
                     str(router.port)).returncode == 0
    router.wait_count("closed: released", before + 1)


def test_a_sighup_while_starting_is_a_reload_not_the_end(tmp_path: Path,
                                                         dcmtk: Dcmtk) -> None:
    """SIGHUP before the supervisor handled signals (the first ~0.3 s) killed the
    router: exit 129, not a line logged (an outside operations campaign). It is
    taken up as a reload once the router runs."""
    router = Router(tmp_path, workers=1)
    try:
        router.wait_for("dicom-router: config ")
        router.proc.send_signal(signal.SIGHUP)
        router.wait_for("ready: 1 workers serving")
        router.wait_for("configuration generation 2 loaded")
        done = dcmtk.run("echoscu", "-aec", "ROUTER", "127.0.0.1", str(router.port))
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        assert router.stop() == 0


def test_a_reload_says_what_it_cannot_change(router: Router, tmp_path: Path) -> None:
    """An outside campaign: a reload took a new [spool] path without a word, and from
    then on status, reload and queue looked there and found no router, while it ran
    on in the old spool; a changed worker count or port reloaded as "reloaded" alone;
    and `reload --config other.toml` checked that file, then reloaded the router's
    own and said "reloaded"."""
    router.wait_for("ready: 2 workers serving")
    original = router.config.read_text()
    moved = tmp_path / "elsewhere"
    router.config.write_text(original.replace(f'path = "{router.spool}"', f'path = "{moved}"'))
    router.proc.send_signal(signal.SIGHUP)
    line = router.lines[router.wait_for("reload refused")]
    assert f"[spool] path changed from {router.spool} to {moved}: it moves with a " \
        "restart only" in line, line
    router.write_config(workers=1)
    done = router.command("reload")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == "reloaded: configuration generation 2; worker count changed: they " \
        "take effect at the next restart\n", done.stdout
    other = tmp_path / "other.toml"
    other.write_text(original)
    wrong = subprocess.run([sys.executable, "-m", "router.cli", "reload", "--config",
                            str(other)], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2, wrong
    assert f"runs on {router.config}, not on {other}" in wrong.stderr, wrong.stderr
    assert router.count("configuration generation 3 loaded") == 0


def test_the_cli_finds_the_router_after_its_spool_path_was_edited(
        router: Router, tmp_path: Path) -> None:
    """The CLI finds the router through the file's [spool] path; once an operator had
    edited it, status said the running router was down (exit 3, dicom_router_up 0, its
    queues empty) and reload "no router answering" instead of why it refuses. The
    router started on the same file is now found by its command line."""
    router.wait_for("ready: 2 workers serving")
    moved = tmp_path / "elsewhere"
    router.config.write_text(router.config.read_text().replace(
        f'path = "{router.spool}"', f'path = "{moved}"'))
    done = router.command("status", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["pid"] == router.proc.pid and result["spool"] == str(router.spool)
    assert f"answers at {router.spool}/run/admin.sock, not at {moved}/run/admin.sock" \
        in done.stderr, done.stderr
    prometheus = router.command("status", "--prometheus", "-")
    assert "dicom_router_up 1" in prometheus.stdout, prometheus.stdout + prometheus.stderr
    refused = router.command("reload")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"[spool] path changed from {router.spool} to {moved}" in refused.stderr
    assert refused.stderr.count("answers at") == 1, refused.stderr


def test_workers_restarted_after_the_files_were_edited_run_the_checked_configuration(
        router: Router, dcmtk: Dcmtk, tmp_path: Path) -> None:
    """Workers load what the supervisor checked (router/snapshot.py), not the files.
    With router.toml and the rules left invalid on disk (a refused reload, or an
    operator halfway through an edit), a worker that dies is replaced and serves the
    running configuration. Before, it read the invalid file, could not start, and
    that stopped the router."""
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "all"\n[rule.then]\ndrop = true\n')
    router.write_config(extra='[acceptance]\ncalled_ae = ["ROUTER", "ROUTER2"]\n'
                              f'[routing]\nrules = "{rules}"\n')
    router.proc.send_signal(signal.SIGHUP)
    for w in (1, 2):
        router.wait_for(f"worker {w}: configuration generation 2 loaded")
    pids = [int(w["pid"]) for w in router.status()["workers"]]  # type: ignore[union-attr]

    # Both files invalid on disk; the reload is refused.
    rules.write_text('[[rule]]\nname = "all"\n[rule.then]\nforward = ["nowhere"]\n')
    router.config.write_text(router.config.read_text() + "\nbogus = 1\n")
    router.proc.send_signal(signal.SIGHUP)
    router.wait_for("reload refused")

    # Both workers die: every association now goes to a replacement.
    at = len(router.lines)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for w in (1, 2):
        router.wait_for(f"worker {w} ready", start=at)
    assert router.proc.poll() is None, router.log()
    assert "cannot start" not in router.log()
    # They run generation 2: the second called AE title, and the rule that drops.
    assert dcmtk.run("echoscu", "-aec", "ROUTER2", "127.0.0.1",
                     str(router.port)).returncode == 0
    make_ct(tmp_path / "ct.dcm", size_kb=20)
    sent = dcmtk.run("storescu", "-aec", "ROUTER", "127.0.0.1", str(router.port),
                     str(tmp_path / "ct.dcm"))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    router.wait_for('[drop by rule "all"]', start=at)
    assert not _spooled(router)


@pytest.mark.parametrize(("text", "expected"), [
    ("[router]\nworkers = \"two\"\n", "workers"),
    ("[router]\nbogus = 1\n", "bogus"),
    ("[router\n", "router.toml"),
])
def test_bad_config_stops_start_up_with_one_line(tmp_path: Path, text: str,
                                                 expected: str) -> None:
    config = tmp_path / "router.toml"
    config.write_text(text)
    done = subprocess.run([sys.executable, "-m", "router.cli", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "router.toml" in lines[0], done.stderr


def test_kill_9_of_the_main_process_loses_nothing_acknowledged(
        tmp_path: Path, dcmtk: Dcmtk) -> None:
    """kill -9 of the supervisor mid transfer: its workers see the hand-off
    channel close, finish what they have and exit; on restart every
    acknowledged instance is there and temporary files are gone."""
    r = Router(tmp_path)
    r.wait_for("ready: 2 workers serving")
    big = tmp_path / "big"
    big.mkdir()
    for i in range(4):
        make_ct(big / f"{i}.dcm", size_kb=10_000, seed=i)
    worker_pids = [int(line.rsplit("pid ", 1)[1].rstrip(")"))
                   for line in r.lines if "started (pid " in line]
    sender = subprocess.Popen([dcmtk.storescu, "-aec", "ROUTER", "--max-pdu", "16384",
                               "127.0.0.1", str(r.port), *sorted(map(str, big.iterdir()))],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dcmtk_env())
    r.wait_for("C-STORE")  # at least one instance acknowledged
    r.proc.kill()
    r.proc.wait(10)
    sender.communicate(timeout=60)
    for pid in worker_pids:  # orphaned workers drain and exit by themselves
        _wait_gone(pid, 30)
    r.reader.join(10)
    acknowledged = sum(1 for line in r.lines if "status 0x0000" in line)
    assert acknowledged >= 1
    r2 = Router(tmp_path, port=r.port)
    try:
        r2.wait_for("ready: 2 workers serving")
        spooled = {_dataset(p) for p in _spooled(r2)}
        assert len(spooled) >= acknowledged
        for line in r.lines:
            if "status 0x0000" in line:
                uid = line.split(" C-STORE ", 1)[1].split()[1]
                assert any(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == uid
                           for p in _spooled(r2)), uid
        assert not leftovers(r2.spool / "tmp")
    finally:
        r2.stop()


def test_worker_that_stops_heartbeating_is_replaced(router: Router) -> None:
    """SIGSTOP a worker: no heartbeats; after heartbeat_timeout (3 s here) the
    supervisor kills it and starts another."""
    pids = [w["pid"] for w in router.status()["workers"]]  # type: ignore[index, union-attr]
    os.kill(pids[0], signal.SIGSTOP)
    try:
        at = router.wait_for("sent no heartbeat", timeout=15)
        router.wait_for("worker 1 ready", start=at)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[0], signal.SIGCONT)
    new = [w["pid"] for w in router.status()["workers"]]  # type: ignore[index, union-attr]
    assert new[0] != pids[0] and new[1] == pids[1]


def test_a_supervisor_stopped_longer_than_the_heartbeat_timeout_keeps_its_workers(
        router: Router) -> None:
    """SIGSTOP the supervisor for 5 s (heartbeat_timeout 3 s here) with a pynetdicom
    association open: the workers go on serving, and on SIGCONT the supervisor, which
    read their heartbeats late, killed them both and aborted the association (an
    outside campaign; a VM paused or migrated does the same). Now it knows it did not
    run, and the workers and the association live on."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    router.wait_for("ready: 2 workers serving")
    pids = [w["pid"] for w in router.status()["workers"]]  # type: ignore[index, union-attr]
    ae = AE(ae_title="PATIENT")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", router.port, ae_title="ROUTER")
    assert assoc.is_established
    at = len(router.lines)
    os.kill(router.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(5.0)  # how long the supervisor stays stopped, not a wait for an event
        assert assoc.send_c_echo().Status == 0x0000  # the workers serve meanwhile
    finally:
        os.kill(router.proc.pid, signal.SIGCONT)
    router.wait_for("the supervisor did not run for", start=at)
    echo = assoc.send_c_echo()
    assert "Status" in echo and echo.Status == 0x0000, router.log()
    assoc.release()
    assert [w["pid"] for w in router.status()["workers"]] == pids  # type: ignore[index, union-attr]
    assert router.count("sent no heartbeat") == 0, router.log()


def _second_router_on_its_spool(router: Router, tmp_path: Path,
                                 ) -> subprocess.CompletedProcess[str]:
    """`dicom-router run` of ``router``'s configuration on another port, to its end."""
    second = tmp_path / "second.toml"  # the same, but for the port
    second.write_text(router.config.read_text().replace(
        f"port = {router.port}", f"port = {free_port()}"))
    return subprocess.run(
        [sys.executable, "-m", "router.cli", "run", "--config", str(second)],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_a_second_router_on_the_same_spool_is_refused(router: Router, tmp_path: Path) -> None:
    """`dicom-router run` by hand beside the running one, on its spool (an outside
    campaign): it started, deleted the first's spare files, took over its control
    sockets (status and reload of the first failed from then on) and its restarted
    workers' heartbeats. Now it exits 1 at once, saying why, and the first runs on."""
    router.wait_for("ready: 2 workers serving")
    spares = sorted((router.spool / "tmp").glob("*.spare"))
    proc = _second_router_on_its_spool(router, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"spool {router.spool} is in use by another dicom-router" in proc.stdout + proc.stderr
    assert "worker 1 started" not in proc.stdout + proc.stderr
    assert sorted((router.spool / "tmp").glob("*.spare")) == spares
    assert len(router.status()["workers"]) == 2  # type: ignore[arg-type]


def test_a_run_folder_removed_under_the_router_is_made_again(router: Router) -> None:
    """rm -rf <spool>/run while the router runs (an outside campaign; a clean-up job
    does it too): status and reload failed from then on, and a worker that died was
    replaced by one that could not read its configuration, which stopped the router
    with exit code 2. Now the folder, its sockets and the snapshot are made again:
    status answers, and a killed worker is replaced and serves."""
    import shutil

    router.wait_for("ready: 2 workers serving")
    pids = [w["pid"] for w in router.status()["workers"]]  # type: ignore[index, union-attr]
    shutil.rmtree(router.spool / "run")
    router.wait_for("was removed under the running router: making it again")
    assert len(router.status()["workers"]) == 2  # type: ignore[arg-type]
    at = len(router.lines)
    os.kill(int(pids[0]), signal.SIGKILL)  # type: ignore[call-overload]
    router.wait_for("worker 1 ready", start=at)
    workers = router.status()["workers"]
    assert [w["pid"] for w in workers][1] == pids[1]  # type: ignore[index, union-attr]
    assert router.proc.poll() is None


def test_a_spool_removed_and_made_again_is_locked_again(router: Router,
                                                        tmp_path: Path) -> None:
    """A review: the one-router-per-spool lock was held on the folder's inode, so once
    the spool was removed (and made again by the router itself) a second router
    locked the new folder unopposed. The supervisor now locks it again."""
    import shutil

    router.wait_for("ready: 2 workers serving")
    shutil.rmtree(router.spool)
    router.wait_for("was made again under the running router: locking it again")
    proc = _second_router_on_its_spool(router, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "is in use by another dicom-router" in proc.stdout + proc.stderr


def _wait_gone(pid: int, timeout: float) -> None:
    """Wait for a process that is not our child to exit (pidfd: no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        import select

        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"process {pid} still running after {timeout} s"
    finally:
        os.close(fd)


def _as_worker_99(router: Router,
                  messages: list[control.ActorMessage]) -> control.ActorMessage:
    """Send ``messages`` to worker 1 over ZeroMQ as a worker 99 would (this test
    binds worker 99's inbox); the first actor message that comes back."""
    import zmq

    endpoints = control.Endpoints.for_run_dir(str(router.spool / "run"))
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        inbox.bind(endpoints.actor(99))
        push.connect(endpoints.actor(1))
        for message in messages:
            control.send_message(push, message)
        assert inbox.poll(10_000), "no answer from worker 1"
        reply = control.recv_message(inbox)
    finally:
        push.close(linger=0)
        inbox.close(linger=0)
        ctx.term()
    assert isinstance(reply, control.ActorMessage)
    return reply


def test_actor_round_trip_between_worker_processes(router: Router) -> None:
    """Actor addresses span processes (D2): worker 1's own actor, asked by this
    test to relay, pings worker 2's actor over ZeroMQ and forwards the pong."""
    reply = _as_worker_99(router, [control.ActorMessage(
        to_worker=1, to_actor="worker", from_worker=99, from_actor="test",
        kind="relay", body={"to_worker": 2})])
    assert (reply.kind, reply.from_worker, reply.to_actor) == ("relayed", 1, "test")
    assert reply.body["via"] == 2 and reply.body["kind"] == "pong"
    pong = reply.body["body"]
    assert isinstance(pong, dict) and pong["worker_id"] == 2
    status = router.status()
    assert pong["pid"] == status["workers"][1]["pid"]  # type: ignore[index, call-overload]


def test_an_error_between_workers_is_not_answered(router: Router) -> None:
    """An error is an answer: answering it with another error would have two workers
    send errors to each other for ever (a late reply to a temporary actor that is
    gone, say, after its worker restarted). This test plays worker 99: an error to
    worker 1's own actor, then an answer to an actor it does not have, then a ping;
    the first and only answer that comes back is the pong."""
    reply = _as_worker_99(router, [control.ActorMessage(
        to_worker=1, to_actor=to_actor, from_worker=99, from_actor="test", kind=kind,
        body={"reason": "no such actor"} if kind == "error" else {})
        for to_actor, kind in (("worker", "error"), ("send-gone", "error"), ("worker", "ping"))])
    assert reply.kind == "pong", reply
    router.wait_for("worker 1: error from worker 99")


def test_a_low_open_files_limit_is_raised_for_the_workers(tmp_path: Path,
                                                          dcmtk: Dcmtk) -> None:
    """Started with a soft RLIMIT_NOFILE of 64 (systemd's default is 1024), 100
    connections at once must still reach a worker: the router raises the soft limit to
    the hard one, so no descriptor is dropped on its way to a worker (which would close
    the modality's connection without an A-ASSOCIATE-RJ)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard < 512:
        pytest.skip(f"the hard open files limit here is {hard}: not a case for this test")

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))

    router = Router(tmp_path, workers=1, preexec_fn=low)
    try:
        router.wait_for("ready: 1 workers serving")
        assert router.count(f"open files limit raised from 64 to {hard}") == 1
        with contextlib.ExitStack() as stack:
            for _ in range(100):
                stack.enter_context(socket.create_connection(("127.0.0.1", router.port)))
            done = dcmtk.run("echoscu", "-aec", "ROUTER", "127.0.0.1", str(router.port))
            assert done.returncode == 0, done.stdout + done.stderr
        router.wait_count("closed:", 101)  # the 100 and the echo's own
        assert router.count("out of file descriptors") == 0
        assert router.count("bad hand-off") == 0
    finally:
        assert router.stop() == 0


def test_a_port_in_use_exits_1_with_one_line(tmp_path: Path) -> None:
    """Not 2, which means a refused configuration (systemd: RestartPreventExitStatus=2):
    a taken port may be free in a moment, so a service manager should retry."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        router = Router(tmp_path, port=taken.getsockname()[1])
        try:
            assert router.proc.wait(timeout=30) == 1
        finally:
            router.stop()
    router.reader.join(timeout=10)
    assert router.count("cannot listen") == 1, router.log()


def test_past_max_associations_newcomers_get_a_transient_rejection(
        tmp_path: Path, dcmtk: Dcmtk) -> None:
    """[router] max_associations = 2: two pynetdicom associations held open, then DCMTK
    echoscu is rejected transient / local-limit-exceeded (PS3.8 Table 9-21), which a
    modality retries; once one is released, echoscu is served again."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    router = Router(tmp_path, workers=1, router_extra="max_associations = 2\n")
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = []
    try:
        router.wait_for("ready: 1 workers serving")
        for _ in range(2):
            assoc = ae.associate("127.0.0.1", router.port, ae_title="ROUTER")
            assert assoc.is_established
            held.append(assoc)
        refused = dcmtk.run("echoscu", "-aec", "ROUTER", "127.0.0.1", str(router.port))
        said = refused.stdout + refused.stderr
        assert refused.returncode != 0, said
        assert "Rejected Transient" in said and "Local Limit Exceeded" in said, said
        assert router.count(" rejected: rejected (result 2 source 3 reason 2): worker 1 has "
                            "2 associations open, its share of [router] max_associations: "
                            "transient") == 1
        # One line and the association's closing one: it was three.
        router.wait_count("ECHOSCU->ROUTER", 2)
        assert len([line for line in router.lines if "ECHOSCU->ROUTER" in line]) == 2
        held.pop().release()
        router.wait_count("HOLDER->ROUTER", 3)  # accepted, accepted, closed
        served = dcmtk.run("echoscu", "-aec", "ROUTER", "127.0.0.1", str(router.port))
        assert served.returncode == 0, served.stdout + served.stderr
    finally:
        for assoc in held:
            assoc.release()
        assert router.stop() == 0


def test_silent_connections_do_not_fill_max_associations(tmp_path: Path,
                                                         dcmtk: Dcmtk) -> None:
    """Connections that send no A-ASSOCIATE-RQ (a port scanner, a load balancer's
    health check, a hung client) counted against max_associations until ARTIM closed
    them: as many as the limit locked every modality out, "try later", for ARTIM
    (30 s by default) and again with each new batch. The limit counts associations
    requested now."""
    import socket

    router = Router(tmp_path, workers=1, router_extra="max_associations = 2\n")
    silent: list[socket.socket] = []
    try:
        router.wait_for("ready: 1 workers serving")
        silent = [socket.create_connection(("127.0.0.1", router.port), timeout=10)
                  for _ in range(4)]
        served = dcmtk.run("echoscu", "-aec", "ROUTER", "127.0.0.1", str(router.port))
        assert served.returncode == 0, served.stdout + served.stderr
        assert router.count("max_associations") == 0
    finally:
        for sock in silent:
            sock.close()
        assert router.stop() == 0


@pytest.mark.parametrize("max_pdu", [1, 100])
def test_a_peer_with_a_tiny_maximum_pdu_length_is_rejected_and_told_why(
        tmp_path: Path, max_pdu: int) -> None:
    """pynetdicom proposing a maximum PDU length of 1 or 100 bytes: A-ASSOCIATE-RJ
    (permanent, service-user, no-reason-given), and the log line says why. At 1 byte
    no PDV would ever fit; at 100 every C-FIND match or C-GET sub-operation we sent
    would be cut into PDUs that are more header than data."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    router = Router(tmp_path, workers=1)
    ae = AE(ae_title="TINY")
    ae.add_requested_context(Verification)
    received: list[object] = []
    try:
        router.wait_for("ready: 1 workers serving")
        assoc = ae.associate("127.0.0.1", router.port, ae_title="ROUTER", max_pdu=max_pdu,
                             evt_handlers=[(evt.EVT_PDU_RECV,
                                            lambda e: received.append(e.pdu))])
        assert not assoc.is_established
        [rj] = received  # read the PDU: see test_b_rejected_by_us for why
        assert type(rj).__name__ == "A_ASSOCIATE_RJ"
        assert (rj.result, rj.source, rj.reason_diagnostic) == (1, 1, 1)  # type: ignore[attr-defined]
        router.wait_for(f"rejected: rejected (result 1 source 1 reason 1): maximum PDU "
                        f"length {max_pdu} is under 256 bytes")
    finally:
        assert router.stop() == 0


def test_connections_held_while_the_workers_channels_are_full_are_handed_off(
        router: Router) -> None:
    """Both workers stopped (SIGSTOP) for a second while 700 peers ask to associate:
    the hand-off channels fill (a few hundred descriptors each), the supervisor holds the
    rest. Once the workers read again, the held connections are handed off as the
    channels drain, and every peer gets its A-ASSOCIATE-AC. Before, held connections
    went only on a worker's hello: they were closed after ARTIM (2 s here) without
    an answer, well-behaved peers among them."""
    from tests.faults.test_actor_faults import associate_rq, read_pdu

    router.wait_for("ready: 2 workers serving")
    pids = [int(w["pid"]) for w in router.status()["workers"]]  # type: ignore[union-attr]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    peers: list[socket.socket] = []
    try:
        for _ in range(700):
            sock = socket.create_connection(("127.0.0.1", router.port), timeout=20)
            sock.sendall(associate_rq())
            peers.append(sock)
        # Well within the heartbeat timeout (3 s here): the workers are not replaced.
        router.wait_for("cannot take connections for now", timeout=1.5)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    try:
        answers = [read_pdu(sock)[0] for sock in peers]
    finally:
        for sock in peers:
            sock.close()
    assert answers == [0x02] * len(peers), answers
    assert router.count("no worker took the connection") == 0, router.log()


def test_a_connection_reset_before_it_is_served_is_logged_with_its_peer(
        router: Router) -> None:
    """The socket has no peer name once reset: the log takes the listener's."""
    import struct

    router.wait_for("ready: 2 workers serving")
    at = len(router.lines)
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", router.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
    router.wait_count(" closed: ", 20)
    closed = [line for line in router.lines[at:] if " closed: " in line]
    assert closed and not [line for line in closed if "?:0" in line], closed


def test_a_data_set_not_in_its_contexts_transfer_syntax_is_refused(
        router: Router, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends files as they are, on an Explicit VR Little Endian (or JPEG
    Baseline, or Deflated) context, whose data sets are Implicit VR: pydicom's own
    SC_rgb_jpeg.dcm, and a CT and its deflated copy labelled so. The router answered
    0000H, spooled them under the explicit syntax, and forwarded what no DCMTK-based
    destination can parse (an outside conformance campaign): now C000H, nothing kept
    (PS3.5 10: a message's data set is in its context's transfer syntax)."""
    import zlib
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage

    from tests.helpers.data import pydicom_test_files

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    source = tmp_path / "ct.dcm"
    make_ct(source, size_kb=24, seed=4)
    ds = pydicom.dcmread(source)
    ds_implicit = BytesIO()
    out = pydicom.filebase.DicomFileLike(ds_implicit)
    out.is_little_endian, out.is_implicit_VR = True, True
    pydicom.filewriter.write_dataset(out, ds)
    mislabelled = {}
    for syntax, body in ((pydicom.uid.ExplicitVRLittleEndian, ds_implicit.getvalue()),
                         (pydicom.uid.DeflatedExplicitVRLittleEndian,
                          zlib.compress(ds_implicit.getvalue())[2:-4])):
        meta = ds.file_meta
        meta.TransferSyntaxUID = syntax
        head = BytesIO()
        write_file_meta_info(head, meta, enforce_standard=True)
        path = tmp_path / f"{syntax}.dcm"
        path.write_bytes(bytes(128) + b"DICM" + head.getvalue() + body + b"\0" * (len(body) % 2))
        mislabelled[syntax] = path
    [jpeg] = [p for p in pydicom_test_files() if p.name == "SC_rgb_jpeg.dcm"]
    ae = AE(ae_title="MISLABEL")
    for syntax in (pydicom.uid.ExplicitVRLittleEndian,
                   pydicom.uid.DeflatedExplicitVRLittleEndian):
        ae.add_requested_context(CTImageStorage, syntax)
    ae.add_requested_context(SecondaryCaptureImageStorage, pydicom.uid.JPEGBaseline8Bit)
    assoc = ae.associate("127.0.0.1", router.port, ae_title="ROUTER")
    assert assoc.is_established
    try:
        answers = [int(assoc.send_c_store(path).Status)
                   for path in (*mislabelled.values(), jpeg, source)]
    finally:
        assoc.release()
    assert answers == [0xC000, 0xC000, 0xC000, 0x0000]
    router.wait_count("the data set is not in the explicit VR its transfer syntax says", 3)
    assert [read_part10_header(p).sop_instance_uid for p in _spooled(router)] == \
        [read_part10_header(source).sop_instance_uid]


def test_a_deflated_data_set_giving_its_uid_twice_is_refused(
        router: Router, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file in Deflated Explicit VR Little Endian (PS3.5 A.5), as it
    is, whose data set gives (0008,0018) a second time after 100 KB of private data.
    Readers disagree on which value counts, so the router answers C000H and keeps
    nothing, as it does for the same data set not deflated. The deflated data set was
    walked only as far as its first UIDs, and acknowledged."""
    import struct
    import zlib

    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    source, twice = tmp_path / "ct.dcm", tmp_path / "twice.dcm"
    make_ct(source, size_kb=24, seed=3)
    header = read_part10_header(source)
    assert header.transfer_syntax == pydicom.uid.ExplicitVRLittleEndian
    body = source.read_bytes()[header.dataset_offset :]
    other = b"1.2.3.4.5.6\0"
    body += (struct.pack("<HH2sHI", 0x0009, 0x1001, b"OB", 0, 100_000) + bytes(100_000)
             + struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", len(other)) + other)
    meta = pydicom.dcmread(source, stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info
    head = BytesIO()
    write_file_meta_info(head, meta, enforce_standard=True)
    squeeze = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = squeeze.compress(body) + squeeze.flush()
    twice.write_bytes(bytes(128) + b"DICM" + head.getvalue() + deflated
                      + b"\0" * (len(deflated) % 2))
    ae = AE(ae_title="DEFLATER")
    ae.add_requested_context(CTImageStorage, pydicom.uid.DeflatedExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", router.port, ae_title="ROUTER")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(twice).Status) == 0xC000
        assert int(assoc.send_c_store(source).Status) == 0x0000
    finally:
        assoc.release()
    router.wait_for("(0008,0018) occurs twice (PS3.5 7.1: at most once)")
    assert [read_part10_header(p).sop_instance_uid for p in _spooled(router)] == \
        [header.sop_instance_uid]


def test_a_data_set_naming_another_instance_is_refused_like_storescp_does(
        router: Router, procs: Procs, dcmtk: Dcmtk, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom, sending a file chunked from its path (_config.STORE_SEND_CHUNKED_DATASET),
    takes the UIDs of its command from the file meta. A file
    whose data set was given another SOP Instance UID after its meta was written (an
    editing tool's slip) reaches DCMTK's storescp and the router alike: both answer
    A900H (PS3.4 B.2.3), and the router keeps nothing of it. The consistent file sent
    after it on the same association is stored byte for byte."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    good, edited = tmp_path / "good.dcm", tmp_path / "edited.dcm"
    make_ct(good, size_kb=24, seed=1)
    make_ct(edited, size_kb=24, seed=2)
    ds = pydicom.dcmread(edited)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()  # the meta keeps the old one
    ds.save_as(edited)
    assert pydicom.dcmread(edited).file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID
    sink = storescp_server(tmp_path, procs, aet="STORESCP", dcmtk=dcmtk)
    ae = AE(ae_title="EDITOR")
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)  # as stored
    answers = {}
    for name, port, called in (("storescp", sink.port, "STORESCP"),
                               ("router", router.port, "ROUTER")):
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        assert assoc.is_established
        try:
            answers[name] = [int(assoc.send_c_store(path).Status) for path in (edited, good)]
        finally:
            assoc.release()
    assert answers == {"storescp": [0xA900, 0x0000], "router": [0xA900, 0x0000]}
    router.wait_for("refused: the data set's SOP Instance UID is " + ds.SOPInstanceUID)
    spooled = _spooled(router)
    assert [read_part10_header(p).sop_instance_uid for p in spooled] == \
        [read_part10_header(good).sop_instance_uid]
    assert spooled[0].read_bytes().endswith(_dataset(good))


def test_echo_destination_uses_its_settings_and_the_flags_given(tmp_path: Path) -> None:
    """`echo --destination` ignored -aec, -aet, --timeout and --max-pdu: an engineer
    who gave -aec believed that AE title tested (a review). The router answers its
    own AE title only: the destination's wrong one is rejected, -aec fixes it."""
    port = free_port()
    router = Router(tmp_path, port=port, extra=(
        f'[[destination]]\nname = "self"\nhost = "127.0.0.1"\nport = {port}\n'
        'ae_title = "WRONG"\n'))
    try:
        router.wait_for("ready: 2 workers serving")
        wrong = router.command("echo", "--destination", "self")
        assert wrong.returncode == 3 and "rejected the association" in wrong.stderr, wrong
        # In words, not only numbers (an outside operations campaign).
        assert "(permanent: called AE title not recognized; source 1, reason 7)" \
            in wrong.stderr, wrong
        right = router.command("echo", "--destination", "self", "-aec", "ROUTER",
                               "-aet", "ENGINEER", "--timeout", "5", "-r", "2")
        assert right.returncode == 0, right
        assert right.stdout.count("C-ECHO self (ROUTER@127.0.0.1") == 2, right.stdout
        router.wait_for("ENGINEER->ROUTER")
    finally:
        router.stop()


def test_a_spool_folder_it_cannot_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """A [spool] path under a file (or on a disk not mounted yet, or read-only) ended
    `run` with "None:11112: [Errno 20] Not a directory: ..." and exit 3, a network
    error's code and prefix, naming neither the spool nor the key (an outside
    campaign)."""
    (tmp_path / "file").write_bytes(b"")
    config = tmp_path / "router.toml"
    config.write_text(f'[spool]\npath = "{tmp_path / "file" / "spool"}"\n'
                      f'[[router.listen]]\nhost = "127.0.0.1"\nport = {free_port()}\n')
    for more in ([], ["--port", str(free_port())]):
        done = subprocess.run([sys.executable, "-m", "router.cli", "run", "--config",
                               str(config), *more], capture_output=True, text=True,
                              timeout=60)
        said = done.stdout + done.stderr
        assert done.returncode == 1, said
        assert f"spool {tmp_path / 'file' / 'spool'}: cannot use it: Not a directory " \
            "(set [spool] path to a folder this user may write)" in said, said
        assert "None:" not in said and "Traceback" not in said, said


def test_a_spool_whose_parent_is_missing_is_not_made(tmp_path: Path) -> None:
    """[spool] path on a disk not mounted yet: the router made the whole path and
    took instances onto the root file system, hidden once the disk mounted over them
    (an outside campaign). It makes the spool folder only, and says so otherwise:
    exit 1, which the systemd unit retries until the disk is there."""
    spool = tmp_path / "mnt" / "disk" / "spool"
    config = tmp_path / "router.toml"
    config.write_text(f'[spool]\npath = "{spool}"\n'
                      f'[[router.listen]]\nhost = "127.0.0.1"\nport = {free_port()}\n')
    done = subprocess.run([sys.executable, "-m", "router.cli", "run", "--config",
                           str(config)], capture_output=True, text=True, timeout=60)
    said = done.stdout + done.stderr
    assert done.returncode == 1, said
    assert f"spool {spool}: cannot use it: its parent folder {spool.parent} does not " \
        "exist (a disk not mounted yet?)" in said, said
    assert not (tmp_path / "mnt").exists()
    (tmp_path / "mnt" / "disk").mkdir(parents=True)  # mounted: the spool is made
    router = Router(tmp_path / "mnt" / "disk", workers=1)  # its spool: <that>/spool
    try:
        router.wait_for("ready: 1 workers serving")
    finally:
        assert router.stop() == 0
    assert spool.is_dir()


def test_a_rules_path_without_rules_is_said_at_start_and_reload(tmp_path: Path) -> None:
    """A rules folder whose file was misnamed (10.tml) started a router with no rules
    and no word of it; every instance then went to unrouted/ (an outside campaign)."""
    folder = tmp_path / "rules.d"
    folder.mkdir()
    (folder / "10.tml").write_text('[[rule]]\nname = "all"\n[rule.then]\ndrop = true\n')
    router = Router(tmp_path, extra=f'[routing]\nrules = "{folder}"\n')
    try:
        line = router.lines[router.wait_for("holds no rule routing instances")]
        assert "WARNING" in line and "every instance is kept in <spool>/unrouted/" in line, line
        (folder / "10.tml").rename(folder / "10.toml")
        assert router.command("reload").returncode == 0
        router.wait_for(f"rules: 1 routing instances, 0 query/retrieve, from {folder}")
    finally:
        router.stop()
