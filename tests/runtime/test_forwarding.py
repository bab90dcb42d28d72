"""Store-and-forward end to end: DCMTK storescu -> the real router -> real sinks.

The router runs as a subprocess with rule files; the sinks are DCMTK storescp
(bit-preserving, so what they write is what they received) and, where the
test says so, Orthanc. Synchronised on the router's log lines, never on sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.sequence import Sequence
from pydicom.values import convert_SQ

from router.dicom.dataset import read_part10_header, top_level_spans
from tests.helpers import (
    Dcmtk,
    Procs,
    make_ct,
    pydicom_test_files,
    received_files,
    same_content,
    storescp_server,
)
from tests.helpers.dcmtk import dcmtk_env
from tests.helpers.net import free_port
from tests.helpers.orthanc import Orthanc
from tests.helpers.router import Router, leftovers
from tests.helpers.tls import certificate
from workers.queue import queued

pytestmark = pytest.mark.interop

RULES = """\
[[rule]]
name = "CT to A"
[rule.when]
Modality = "CT"
[rule.then]
forward = ["sink_a"]
continue = true

[[rule]]
name = "MOD2 to B, tagged"
[rule.when]
calling_ae = "MOD2"
[rule.then]
forward = ["sink_b"]
continue = true
[[rule.then.change]]
set = { InstitutionName = "ROUTED BY RULE" }
remove = ["PatientBirthDate"]

[[rule]]
name = "chest to Orthanc"
[rule.when]
StudyDescription = { regex = "(?i)^chest" }
[rule.then]
forward = ["orthanc"]
"""


def _destination(name: str, port: int, aet: str, *, idle: float = 1) -> str:
    return (f'[[destination]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {port}\n'
            f'ae_title = "{aet}"\nidle = {idle}\ntimeout = 10\n')


def _forward_all(tmp_path: Path, name: str, port: int, aet: str, *, workers: int = 2,
                 idle: float = 1, more: str = "", drain_grace: float = 5) -> Router:
    """A router whose one rule, "all", forwards every instance to destination ``name``
    (``more``: further keys of its table)."""
    (tmp_path / "rules.toml").write_text(
        f'[[rule]]\nname = "all"\n[rule.then]\nforward = ["{name}"]\n')
    return Router(tmp_path, workers=workers, extra='[routing]\nrules = "rules.toml"\n'
                  + _destination(name, port, aet, idle=idle) + more, drain_grace=drain_grace)


def _dataset(path: Path) -> bytes:
    return path.read_bytes()[read_part10_header(path).dataset_offset:]


def _dataset_bytes(data: bytes) -> bytes:
    return data[read_part10_header(data).dataset_offset:]


def _uid(path: Path) -> str:
    return read_part10_header(path).sop_instance_uid


def _send(dcmtk: Dcmtk, router: Router, calling: str, files: list[Path], *,
          proposal: str | None = None) -> None:
    """storescu from ``calling`` to the router; ``proposal``: its transfer syntax
    option (``-xb`` proposes Big Endian, say)."""
    done = dcmtk.run("storescu", *([proposal] if proposal else []), "-aet", calling,
                     "-aec", "ROUTER", "127.0.0.1", str(router.port), *map(str, files))
    assert done.returncode == 0, done.stdout + done.stderr


def _add_private_lo(path: Path, value: str) -> None:
    """Give the instance in ``path`` a private LO element, (0029,xx01) = ``value``, in
    its own transfer syntax: what implicit VR cannot say the VR of."""
    ds = pydicom.dcmread(path)
    ds.private_block(0x0029, "ROUTER TEST", create=True).add_new(0x01, "LO", value)
    ds.save_as(path, enforce_file_format=True)


def _study(folder: Path, count: int, *, modality: str, description: str,
           seed: int) -> list[Path]:
    folder.mkdir(parents=True)
    study = pydicom.uid.generate_uid()
    out = []
    for i in range(count):
        path = folder / f"{i}.dcm"
        make_ct(path, size_kb=24, modality=modality, study_uid=study, instance_number=i + 1,
                seed=seed * 100 + i,
                attrs={"StudyDescription": description, "PatientBirthDate": "19700101",
                       "InstitutionName": "GENERAL"})
        out.append(path)
    return out


class _OneAssociationPacs:
    """A pynetdicom PACS that takes one association at a time (it rejects the next)
    and counts the most it had open at once, and the instances stored."""

    def __init__(self) -> None:
        import threading

        from pynetdicom import AE, evt
        from pynetdicom.sop_class import CTImageStorage

        self.lock = threading.Lock()
        self.open_now = self.most = 0
        self.stored: list[str] = []
        ae = AE(ae_title="PACS")
        ae.maximum_associations = 1
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_ACCEPTED, self._opened), (evt.EVT_RELEASED, self._closed),
            (evt.EVT_ABORTED, self._closed), (evt.EVT_C_STORE, self._store)])

    def _opened(self, event: Any) -> None:
        with self.lock:
            self.open_now += 1
            self.most = max(self.most, self.open_now)

    def _closed(self, event: Any) -> None:
        with self.lock:
            self.open_now -= 1

    def _store(self, event: Any) -> int:
        with self.lock:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def shutdown(self) -> None:
        self.server.shutdown()


def test_rules_route_by_modality_calling_ae_and_regex(tmp_path: Path, procs: Procs,
                                                      dcmtk: Dcmtk,
                                                      orthanc_server: Orthanc) -> None:
    sink_a = storescp_server(tmp_path, procs, aet="SINK_A", args=["+B"], dcmtk=dcmtk)
    sink_b = storescp_server(tmp_path, procs, aet="SINK_B", args=["+B"], dcmtk=dcmtk)
    (tmp_path / "rules.toml").write_text(RULES)
    extra = ('[routing]\nrules = "rules.toml"\n'
             + _destination("sink_a", sink_a.port, "SINK_A")
             + _destination("sink_b", sink_b.port, "SINK_B")
             + _destination("orthanc", orthanc_server.dicom_port, orthanc_server.aet))
    router = Router(tmp_path, extra=extra)
    try:
        router.wait_for("ready: 2 workers serving")
        chest_ct = _study(tmp_path / "s1", 3, modality="CT", description="CHEST CT", seed=1)
        brain_mr = _study(tmp_path / "s2", 2, modality="MR", description="Brain MR", seed=2)
        chest_ct2 = _study(tmp_path / "s3", 2, modality="CT", description="chest low dose",
                           seed=3)
        knee_mr = _study(tmp_path / "s4", 2, modality="MR", description="Knee", seed=4)
        _send(dcmtk, router, "MOD1", chest_ct)
        _send(dcmtk, router, "MOD2", brain_mr)
        _send(dcmtk, router, "MOD2", chest_ct2)
        _send(dcmtk, router, "MOD1", knee_mr)
        router.wait_count("forward sink_a:", 5)
        router.wait_count("forward sink_b:", 4)
        router.wait_count("forward orthanc:", 5)
    finally:
        assert router.stop() == 0

    def received(outdir: Path) -> dict[str, Path]:
        return {_uid(p): p for p in received_files(outdir)}

    # A: every CT, byte for byte as sent.
    got_a = received(sink_a.outdir)
    assert sorted(got_a) == sorted(_uid(p) for p in chest_ct + chest_ct2)
    for src in chest_ct + chest_ct2:
        assert _dataset(got_a[_uid(src)]) == _dataset(src)
    # Orthanc: the chest studies (regex, case-insensitive), unchanged. Orthanc rewrites
    # the file meta as DCMTK does and re-encodes, which leaves these data sets as sent.
    assert orthanc_server.sop_instance_uids() == {_uid(p) for p in chest_ct + chest_ct2}
    for src in chest_ct + chest_ct2:
        instance = orthanc_server.find_instance(_uid(src))
        assert instance is not None
        assert _dataset_bytes(orthanc_server.instance_file(instance)) == _dataset(src)
    # B: what MOD2 sent, with the rule's changes and nothing else changed.
    got_b = received(sink_b.outdir)
    assert sorted(got_b) == sorted(_uid(p) for p in brain_mr + chest_ct2)
    for src in brain_mr + chest_ct2:
        sent, arrived = pydicom.dcmread(src), pydicom.dcmread(got_b[_uid(src)])
        assert arrived.InstitutionName == "ROUTED BY RULE"
        assert "PatientBirthDate" not in arrived
        del sent.PatientBirthDate
        sent.InstitutionName = "ROUTED BY RULE"
        assert {e.tag: e.value for e in arrived} == {e.tag: e.value for e in sent}
    # The knee MR matched nothing: kept in unrouted/ (the default), not forwarded.
    unrouted = sorted((router.spool / "unrouted").glob("*.dcm"))
    assert sorted(_uid(p) for p in unrouted) == sorted(_uid(p) for p in knee_mr)
    # Delivered instances leave their queues.
    for name in ("sink_a", "sink_b", "orthanc"):
        assert not list((router.spool / "queue" / name).glob("*.dcm"))


def test_destination_down_30_s_then_back_gets_everything(tmp_path: Path, procs: Procs,
                                                         dcmtk: Dcmtk) -> None:
    port = free_port()
    router = _forward_all(tmp_path, "pacs", port, "PACS",
                          more="retry = { initial = 1, max = 4, attempts = 3 }\n")
    try:
        router.wait_for("ready: 2 workers serving")
        files = _study(tmp_path / "s", 20, modality="CT", description="x", seed=5)
        down_since = time.monotonic()
        _send(dcmtk, router, "MOD1", files)  # acknowledged: spooled, destination down
        router.wait_for("cannot connect to 127.0.0.1")
        ls = router.command("queue", "ls", "--json")
        assert ls.returncode == 0, ls.stderr
        (pacs,) = json.loads(ls.stdout)["destinations"]
        assert pacs["queued"] == 20 and pacs["dead"] == 0
        # The scenario is a destination down for 30 s: that wait is the test.
        # Far more than 3 attempts' worth of back-off: nothing may go dead meanwhile.
        time.sleep(max(0.0, 30 - (time.monotonic() - down_since)))
        assert router.count("moved to dead/") == 0
        scp = storescp_server(tmp_path, procs, port=port, aet="PACS", args=["+B"],
                              dcmtk=dcmtk)
        router.wait_count("forward pacs:", 20, timeout=60)
    finally:
        assert router.stop() == 0
    got = {_uid(p): _dataset(p) for p in received_files(scp.outdir)}
    assert got == {_uid(p): _dataset(p) for p in files}
    assert not (router.spool / "dead").exists() or not list(
        (router.spool / "dead").rglob("*.dcm"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "reload"])
def test_stop_or_removal_waits_for_the_answer_to_the_instance_in_flight(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk, signum: int) -> None:
    """SIGTERM (and a reload removing the destination) while a C-STORE is out: the
    destination's answer to it is awaited, so the instance is not sent twice. They
    used to abort the association at once: the PACS had it, the router did not
    know, and sent it again after the restart."""
    pacs = _CountingPacs("PACS", hold=True)  # answers once the router is stopping
    entered, answer, seen, port = pacs.entered, pacs.answer, pacs.seen, pacs.port
    router: Router | None = None
    try:
        router = _forward_all(tmp_path, "pacs", port, "PACS", workers=1,
                              more="concurrency = 1\n")
        router.wait_for("ready: 1 workers serving")
        files = _study(tmp_path / "s", 3, modality="CT", description="x", seed=16)
        _send(dcmtk, router, "MOD1", files)
        assert entered.wait(30)
        if signum == signal.SIGTERM:
            router.proc.send_signal(signal.SIGTERM)
            router.wait_for("worker 1: draining")  # the worker's: the supervisor's is first
        else:
            router.write_config(workers=1, extra='[routing]\nrules = "rules.toml"\n'
                                + _destination("other", free_port(), "OTHER"))
            (tmp_path / "rules.toml").write_text(
                '[[rule]]\nname = "all"\n[rule.then]\nforward = ["other"]\n')
            router.proc.send_signal(signal.SIGHUP)
            router.wait_for("destination pacs removed")
        answer.set()
        router.wait_for(f"forward pacs: {seen[0]}")
        if signum == signal.SIGTERM:
            assert router.proc.wait(30) == 0
        else:
            assert router.stop() == 0
        assert "may get it twice" not in router.log()
        queue = router.spool / "queue" / "pacs"
        assert len(list(queue.glob("*.dcm"))) == 2  # the two not sent yet stay queued
        if signum == signal.SIGTERM:
            restarted = _forward_all(tmp_path, "pacs", port, "PACS", workers=1)
            try:
                restarted.wait_count("forward pacs:", 2)
            finally:
                assert restarted.stop() == 0
            assert sorted(seen) == sorted(_uid(p) for p in files)  # each once
    finally:
        answer.set()
        if router is not None:
            router.stop()
        pacs.shutdown()


def test_a_reload_that_fixes_the_address_is_tried_at_once(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """The destination configured on a wrong port, its back-off grown to a minute: the
    operator fixes the port and reloads. The queue waited out the back-off earned
    against the old address (up to retry.max, 300 s by default; an outside
    operations campaign). New connection settings are tried now."""
    sink = storescp_server(tmp_path, procs, aet="PACS", dcmtk=dcmtk)
    wrong = free_port()
    router = _forward_all(tmp_path, "pacs", wrong, "PACS", workers=1,
                          more="retry = { initial = 60, max = 120 }\n")
    try:
        router.wait_for("ready: 1 workers serving")
        files = _study(tmp_path / "s", 2, modality="CT", description="x", seed=23)
        _send(dcmtk, router, "MOD1", files)
        router.wait_for("next try in")
        router.config.write_text(router.config.read_text().replace(
            f"port = {wrong}\n", f"port = {sink.port}\n"))
        assert router.command("reload").returncode == 0
        router.wait_for("destination pacs: its connection settings changed: trying it now")
        router.wait_count("forward pacs:", 2, timeout=20)  # not after the 60 s back-off
    finally:
        assert router.stop() == 0
    assert sorted(map(_uid, received_files(sink.outdir))) == sorted(map(_uid, files))


def test_a_warning_status_is_delivered_and_said_at_warning_level(
        tmp_path: Path, dcmtk: Dcmtk) -> None:
    """0107H (attributes coerced or dropped, PS3.4 B.2.3): delivered, the queue entry
    gone, but it was an INFO line like a success, which an operator watching
    warnings never saw (an outside operations campaign)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0107)])
    router = _forward_all(tmp_path, "pacs", port, "PACS", workers=1)
    try:
        router.wait_for("ready: 1 workers serving")
        files = _study(tmp_path / "s", 1, modality="CT", description="x", seed=24)
        _send(dcmtk, router, "MOD1", files)
        line = router.lines[router.wait_for("forward pacs:")]
        assert " WARNING " in line and "status 0x0107" in line, line
    finally:
        assert router.stop() == 0
        server.shutdown()
    assert queued(router.spool, "pacs") == []


def test_permanent_failure_goes_to_dead_letters_and_retry_brings_it_back(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    answers = [0xA900]  # first "data set does not match SOP class", then success
    seen: list[str] = []

    def on_store(event: Any) -> int:
        seen.append(event.request.AffectedSOPInstanceUID)
        return answers[0]

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    router = _forward_all(tmp_path, "pacs", port, "PACS")
    try:
        router.wait_for("ready: 2 workers serving")
        files = _study(tmp_path / "s", 3, modality="CT", description="x", seed=6)
        _send(dcmtk, router, "MOD1", files)
        router.wait_count("moved to dead/pacs", 3)
        ls = router.command("queue", "ls")
        assert ls.returncode == 0 and "status 0xA900" in ls.stdout, ls.stdout + ls.stderr
        assert ls.stdout.count("dead pacs/") == 3
        for path in files:  # each names its instance, not only the router's file name
            assert f" ({_uid(path)}): status 0xA900" in ls.stdout, ls.stdout
            router.wait_for(f" ({_uid(path)}) moved to dead/pacs")
        answers[0] = 0x0000
        retry = router.command("queue", "retry", "pacs")
        assert retry.returncode == 0 and "3 instance(s)" in retry.stdout, retry.stderr
        router.wait_count("forward pacs:", 6)  # 3 refused, then 3 delivered
        assert len(seen) == 6 and set(seen) == {_uid(p) for p in files}
        ls = json.loads(router.command("queue", "ls", "--json").stdout)
        assert ls["destinations"][0]["dead"] == 0 and ls["destinations"][0]["queued"] == 0
        # Again, with nothing dead (a nightly job): not an error. A name that matches
        # nothing is.
        again = router.command("queue", "retry", "pacs")
        assert again.returncode == 0 and "0 instance(s)" in again.stdout, again.stderr
        nothing = router.command("queue", "retry", "no-such-instance.dcm")
        assert nothing.returncode == 2 and "no dead letter matches" in nothing.stderr
    finally:
        router.stop()
        server.shutdown()


def test_kill_9_of_the_whole_router_during_1000_instances_delivers_every_acknowledged(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    sink = storescp_server(tmp_path, procs, aet="PACS", args=["+B"], dcmtk=dcmtk)
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "all"\n[rule.then]\nforward = ["pacs"]\n')
    extra = '[routing]\nrules = "rules.toml"\n' + _destination("pacs", sink.port, "PACS")
    router = Router(tmp_path, extra=extra)
    router.wait_for("ready: 2 workers serving")
    folder = tmp_path / "data"
    folder.mkdir()
    files = []
    for i in range(1000):
        path = folder / f"{i:04d}.dcm"
        make_ct(path, size_kb=4, instance_number=i + 1, seed=i)
        files.append(path)
    worker_pids = [int(line.rsplit("pid ", 1)[1].rstrip(")"))
                   for line in router.lines if "started (pid " in line]
    sender = subprocess.Popen([dcmtk.storescu, "-aet", "MOD1", "-aec", "ROUTER", "127.0.0.1",
                               str(router.port), "--scan-directories", str(folder)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dcmtk_env())
    router.wait_count("bytes status 0x0000", 300, timeout=120)
    # The whole router at once: supervisor and workers, no goodbye.
    for pid in [router.proc.pid, *worker_pids]:
        os.kill(pid, signal.SIGKILL)
    router.proc.wait(10)
    sender.communicate(timeout=60)
    router.reader.join(10)
    acknowledged = {line.split(" C-STORE ", 1)[1].split()[1]
                    for line in router.lines if " C-STORE " in line and "status 0x0000" in line}
    assert len(acknowledged) >= 300
    # Everything is dead now: the queue on disk is what the restart must deliver.
    pending = len(list((router.spool / "queue" / "pacs").glob("*.dcm")))
    restarted = Router(tmp_path, port=router.port, extra=extra)
    try:
        restarted.wait_for("ready: 2 workers serving")
        # The first lines say what waits (they used to count incoming/ only: "0 waiting").
        restarted.wait_for(f"{pending} instance(s) queued for delivery"
                           + (f" (pacs: {pending})," if pending else ","))
        if pending:
            restarted.wait_count("forward pacs:", pending, timeout=120)
    finally:
        restarted.stop()
    delivered = {_uid(p) for p in received_files(sink.outdir)}
    missing = acknowledged - delivered
    assert not missing, f"{len(missing)} acknowledged instances never delivered"
    by_uid = {_uid(p): p for p in files}
    for path in received_files(sink.outdir):
        assert _dataset(path) == _dataset(by_uid[_uid(path)])


def test_rules_reloaded_during_traffic_lose_no_association(tmp_path: Path, procs: Procs,
                                                           dcmtk: Dcmtk) -> None:
    sink_a = storescp_server(tmp_path, procs, aet="SINK_A", dcmtk=dcmtk)
    sink_b = storescp_server(tmp_path, procs, aet="SINK_B", dcmtk=dcmtk)
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "all to A"\n[rule.then]\nforward = ["sink_a"]\n')
    extra = ('[routing]\nrules = "rules.toml"\n' + _destination("sink_a", sink_a.port, "SINK_A")
             + _destination("sink_b", sink_b.port, "SINK_B"))
    router = Router(tmp_path, extra=extra)
    try:
        router.wait_for("ready: 2 workers serving")
        folders = []
        for stream in range(4):
            folder = tmp_path / f"data{stream}"
            folder.mkdir()
            for i in range(150):
                make_ct(folder / f"{i:03d}.dcm", size_kb=4, instance_number=i + 1,
                        seed=stream * 1000 + i)
            folders.append(folder)
        senders = [subprocess.Popen(
            [dcmtk.storescu, "-aet", f"MOD{n}", "-aec", "ROUTER", "127.0.0.1", str(router.port),
             "--scan-directories", str(folder)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
            for n, folder in enumerate(folders)]
        router.wait_count("bytes status 0x0000", 100, timeout=60)
        rules.write_text('[[rule]]\nname = "all to B"\n[rule.then]\nforward = ["sink_b"]\n')
        reload = router.command("reload")
        assert reload.returncode == 0, reload.stderr
        outputs = [sender.communicate(timeout=120)[0] for sender in senders]
        assert [sender.returncode for sender in senders] == [0, 0, 0, 0], outputs
        for w in (1, 2):
            router.wait_for(f"worker {w}: configuration generation 2 loaded")
        # Every association ran to its release; every instance was acknowledged...
        router.wait_count("closed: released", 4)  # logged just after storescu exits
        assert router.count("closed: released") == 4 and router.count("aborted") == 0
        assert router.count("bytes status 0x0000") == 600
        # ... and went to A before the swap and to B after it: all 600, none lost.
        router.wait_count("forward sink_", 600, timeout=60)
        # After the swap, what arrives follows the new rules.
        late = _study(tmp_path / "late", 1, modality="CT", description="x", seed=99)
        _send(dcmtk, router, "MOD9", late)
        router.wait_count("forward sink_", 601, timeout=60)
        assert router.count('by rule "all to B"') > 0
    finally:
        router.stop()
    got = {_uid(p) for p in received_files(sink_a.outdir) + received_files(sink_b.outdir)}
    assert got == {_uid(p) for folder in folders for p in folder.iterdir()} | {_uid(late[0])}
    assert _uid(late[0]) in {_uid(p) for p in received_files(sink_b.outdir)}


def test_transparent_rule_answers_with_the_destination_status(tmp_path: Path) -> None:
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage

    from router.net.client import connect

    answers = [0xA900]
    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    ae.add_supported_context(MRImageStorage, ["1.2.840.10008.1.2.1"])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: answers[0])])
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "live"\n[rule.when]\ncalling_ae = "MOD1"\n[rule.then]\n'
        'forward = ["pacs"]\ntransparent = true\n'
        '[[rule]]\nname = "dead end"\n[rule.when]\ncalling_ae = "MOD2"\n[rule.then]\n'
        'forward = ["nowhere"]\ntransparent = true\n')
    router = Router(tmp_path, extra='[routing]\nrules = "rules.toml"\n'
                    + _destination("pacs", port, "PACS")
                    + _destination("nowhere", free_port(), "NOWHERE"))
    try:
        router.wait_for("ready: 2 workers serving")
        path = tmp_path / "ct.dcm"
        make_ct(path, size_kb=8)
        contexts = [("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])]
        with connect("127.0.0.1", router.port, calling_ae="MOD1", called_ae="ROUTER",
                     contexts=contexts) as assoc:
            assert assoc.store(path).status == 0xA900  # the destination's own answer
            answers[0] = 0x0000
            assert assoc.store(path).status == 0x0000
            assoc.release()
        # A destination that cannot be reached: the sender is told to try later.
        with connect("127.0.0.1", router.port, calling_ae="MOD2", called_ae="ROUTER",
                     contexts=contexts) as assoc:
            rsp = assoc.store(path)
            assert rsp.status == 0xA700 and "cannot connect" in (rsp.error_comment or "")
            assoc.release()
        # What the destination will never take is not "try later" (A700H, as it was):
        # an SOP class it does not support is 0122H; one it takes, but not in the
        # instance's syntax (JPEG 2000; the router does not decompress), is C000H.
        files = {p.name: p for p in pydicom_test_files()}
        sc, j2k = files["SC_rgb_small_odd.dcm"], files["MR_small_jp2klossless.dcm"]
        with connect("127.0.0.1", router.port, calling_ae="MOD1", called_ae="ROUTER",
                     contexts=[(read_part10_header(p).sop_class_uid,
                                [read_part10_header(p).transfer_syntax]) for p in (sc, j2k)],
                     ) as assoc:
            rsp = assoc.store(sc)
            assert (rsp.status, rsp.error_comment) == (
                0x0122, "pacs does not support this SOP class"), rsp
            rsp = assoc.store(j2k)
            assert (rsp.status, rsp.error_comment) == (
                0xC000, "pacs takes it in no syntax the router can send"), rsp
            assoc.release()
        at = router.wait_for("not sent: ", start=router.wait_for("not sent: ") + 1)
        line = router.log().splitlines()[at]
        assert "forward pacs:" in line and "(the router does not decompress)" in line, line
    finally:
        router.stop()
        server.shutdown()
    # Transparent means no spool: nothing kept anywhere, no temporary file left.
    spool = router.spool
    assert not list(spool.rglob("*.dcm")) and not leftovers(spool / "tmp")


def test_transparent_sends_keep_to_the_destination_concurrency(tmp_path: Path,
                                                                dcmtk: Dcmtk) -> None:
    """concurrency = 1 holds for transparent sends from every worker: a PACS that takes
    one association at a time (pynetdicom, maximum_associations = 1, rejects the
    next) gets every instance over one association, whichever worker received it."""
    pacs = _OneAssociationPacs()
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "live"\n[rule.then]\nforward = ["pacs"]\ntransparent = true\n')
    router = Router(tmp_path, extra='[routing]\nrules = "rules.toml"\n'
                    + _destination("pacs", pacs.port, "PACS") + "concurrency = 1\n")
    folders = []
    for stream in range(4):
        folders.append(tmp_path / f"data{stream}")
        _study(folders[-1], 6, modality="CT", description="x", seed=stream + 1)
    try:
        router.wait_for("ready: 2 workers serving")
        senders = [subprocess.Popen(
            [dcmtk.storescu, "-aet", f"MOD{n}", "-aec", "ROUTER", "127.0.0.1", str(router.port),
             "--scan-directories", str(folder)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
            for n, folder in enumerate(folders)]
        outputs = [sender.communicate(timeout=120)[0] for sender in senders]
        router.wait_count("closed: released", 4)
    finally:
        router.stop()
        pacs.shutdown()
    assert [sender.returncode for sender in senders] == [0, 0, 0, 0], outputs
    # Both workers served senders, and every instance got the destination's Success.
    assert router.count("worker-1 workers.actor") and router.count("worker-2 workers.actor")
    assert router.count("bytes status 0x0000") == 24, router.log()
    assert sorted(pacs.stored) == sorted(_uid(p) for folder in folders for p in folder.iterdir())
    assert pacs.most == 1


def test_transparent_send_through_a_worker_killed_meanwhile_is_answered(
        tmp_path: Path) -> None:
    """The worker that sends a transparent C-STORE for another (concurrency = 1) is
    killed while the destination holds the instance: the receiving worker answers the
    sender A700H (try again later) at once, it does not wait for a reply that is gone."""
    import threading

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    from router.net.client import connect

    arrived, go_on = threading.Event(), threading.Event()

    def store(event: Any) -> int:
        arrived.set()
        go_on.wait(60)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, store)])
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "live"\n[rule.then]\nforward = ["pacs"]\ntransparent = true\n')
    router = Router(tmp_path, extra='[routing]\nrules = "rules.toml"\n'
                    + _destination("pacs", port, "PACS") + "concurrency = 1\n")
    path = tmp_path / "ct.dcm"
    make_ct(path, size_kb=8)
    contexts = [("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])]
    try:
        router.wait_for("ready: 2 workers serving")
        # The association on worker 2 (no association of its own for "pacs") sends the
        # instance. The listener gives the least loaded worker each new one, from the
        # load the heartbeats report: open them until one is on worker 2.
        others: list[Any] = []
        for n in range(1, 9):
            assoc = connect("127.0.0.1", router.port, calling_ae=f"MOD{n}",
                            called_ae="ROUTER", contexts=contexts)
            router.wait_for(f"MOD{n}->ROUTER")
            if any("worker-2 " in line and f"MOD{n}->ROUTER" in line
                   for line in router.log().splitlines()):
                sender = assoc
                break
            others.append(assoc)
        else:
            raise AssertionError("worker 2 was given none of 8 associations")
        answers: list[Any] = []
        store_thread = threading.Thread(target=lambda: answers.append(sender.store(path)))
        store_thread.start()
        assert arrived.wait(30)  # worker 1 is sending it to the PACS
        workers = router.status()["workers"]
        assert isinstance(workers, list)
        os.kill(int(next(w["pid"] for w in workers if w["worker_id"] == 1)), signal.SIGKILL)
        store_thread.join(30)
        assert answers, "no answer to the C-STORE"
        assert answers[0].status == 0xA700
        assert "worker 1, which was sending it, died" in (answers[0].error_comment or "")
        sender.release()
        for other in others:
            with contextlib.suppress(OSError):  # they were on worker 1
                other.abort()
    finally:
        go_on.set()
        router.stop()
        server.shutdown()


def test_transparent_send_while_its_sender_worker_is_down_goes_at_once(
        tmp_path: Path) -> None:
    """Worker 1 alone has associations for the PACS (concurrency = 1) and keeps dying,
    so the supervisor waits seconds before each restart. A transparent C-STORE that
    worker 2 receives meanwhile is sent by worker 2 itself (worker 1's association died
    with it) and answered with the PACS's status, before worker 1 is back. Before, it
    was queued for worker 1's replacement and waited for it: up to the back-off
    ceiling (30 s), or the sender's own timeout while the worker keeps dying."""
    from router.net.client import connect

    ready = re.compile(r"worker 1 ready \(pid (\d+)\)")
    path = tmp_path / "ct.dcm"
    make_ct(path, size_kb=8)
    contexts = [("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])]
    pacs = _OneAssociationPacs()
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "live"\n[rule.then]\nforward = ["pacs"]\ntransparent = true\n')
    router = Router(tmp_path, extra='[routing]\nrules = "rules.toml"\n'
                    + _destination("pacs", pacs.port, "PACS") + "concurrency = 1\n")
    try:
        router.wait_for("ready: 2 workers serving")
        # Each death within 10 s of its start doubles the wait before the next
        # start: 0.2, 0.4, 0.8, 1.6 s, then 3.2 s after the fifth.
        for deaths in range(1, 6):
            pid = int(ready.findall(router.log())[-1])
            os.kill(pid, signal.SIGKILL)
            router.wait_count("worker 1 (pid", deaths)  # "... died (...); restarting in"
            # Worker 2 knows it too (else it hands the send to the dead one: A700H).
            router.wait_count("worker 2: worker 1 is gone", deaths)
            if deaths < 5:
                router.wait_count("worker 1 ready", deaths + 1)
        assert "restarting in 3.2 s" in router.log()
        with connect("127.0.0.1", router.port, calling_ae="MOD", called_ae="ROUTER",
                     contexts=contexts) as assoc:
            rsp = assoc.store(path)
            assert router.count("worker 1 ready") == 5, "worker 1 came back first"
            assoc.release()
        assert rsp.status == 0x0000, rsp
        assert pacs.stored == [_uid(path)]
        assert router.count(f"worker-2 workers.forward: forward pacs: {_uid(path)}") == 1
        # Worker 1 back: worker 2 relays to it again (the supervisor said it is ready).
        router.wait_count("worker 1 ready", 6)
        again = tmp_path / "again.dcm"
        make_ct(again, size_kb=8)
        for n in range(1, 9):
            with connect("127.0.0.1", router.port, calling_ae=f"MOD{n}", called_ae="ROUTER",
                         contexts=contexts) as assoc:
                if not any(f"MOD{n}->ROUTER" in line and "worker-2 " in line
                           for line in router.log().splitlines()[-20:]):
                    assoc.release()
                    continue
                assert assoc.store(again).status == 0x0000
                assoc.release()
                break
        else:
            raise AssertionError("worker 2 was given none of 8 associations")
        assert router.count(f"worker-1 workers.forward: forward pacs: {_uid(again)}") == 1
    finally:
        router.stop()
        pacs.shutdown()
    assert pacs.stored == [_uid(path), _uid(again)]
    assert pacs.most == 1


def test_a_deflate_bomb_is_refused_c000_and_the_worker_lives_on(tmp_path: Path) -> None:
    """A rule reads PatientName; a C-STORE in Deflated Explicit VR LE whose data set
    inflates to 64 MiB of zeros before it (64 KiB sent; 3 MB so made inflated to 3 GB
    in pydicom and killed the worker on its heartbeat). It is answered C000H within the
    worker's memory, the worker is the same process afterwards, and the next instance
    is stored."""
    from router.net.client import connect
    from tests.workers.test_routing import _part10

    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "vip"\n[rule.when]\nPatientName = "VIP*"\n[rule.then]\n'
        'drop = true\n')
    router = Router(tmp_path, workers=1, extra='[routing]\nrules = "rules.toml"\n')
    bomb, plain = tmp_path / "bomb.dcm", tmp_path / "plain.dcm"
    _part10(bomb, "1.2.840.10008.1.2.1.99", 64 << 20)
    make_ct(plain, size_kb=8)
    contexts = [("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1.99",
                                               "1.2.840.10008.1.2.1"])]
    try:
        router.wait_for("ready: 1 workers serving")
        pids = [w["pid"] for w in router.status()["workers"]]  # type: ignore[union-attr]
        with connect("127.0.0.1", router.port, calling_ae="MOD", called_ae="ROUTER",
                     contexts=contexts) as assoc:
            rsp = assoc.store(bomb)
            assert rsp.status == 0xC000, rsp
            assert assoc.store(plain).status == 0x0000
            assoc.release()
        assert [w["pid"] for w in router.status()["workers"]] == pids  # type: ignore[union-attr]
    finally:
        assert router.stop() == 0
    assert "not within its first 8 MiB inflated" in router.log()
    assert [_uid(p) for p in (router.spool / "unrouted").glob("*.dcm")] == [_uid(plain)]


def test_a_value_with_a_newline_cannot_forge_a_log_line(tmp_path: Path) -> None:
    """A rule reads PatientName, so the value is decoded by the instance's Specific
    Character Set, here an unknown one with a newline and a whole forged log line in
    it. pydicom warns, quoting it; the router's log keeps that on the warning's line
    (escaped), and no line of its own starts with the forged text."""
    from router.net.client import connect

    forged = "2026-11-26 07:00:00,000 INFO worker-1 workers.actor: FORGED status 0x0000"
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "vip"\n[rule.when]\nPatientName = "VIP*"\n[rule.then]\n'
        'drop = true\n')
    router = Router(tmp_path, workers=1, extra='[routing]\nrules = "rules.toml"\n')
    path = tmp_path / "ct.dcm"
    make_ct(path, size_kb=8, attrs={"SpecificCharacterSet": f"ISO_IR 999\n{forged}",
                                    "PatientName": "VIP^Somebody"})
    try:
        router.wait_for("ready: 1 workers serving")
        with connect("127.0.0.1", router.port, calling_ae="MOD", called_ae="ROUTER",
                     contexts=[("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])],
                     ) as assoc:
            assert assoc.store(path).status == 0x0000
            assoc.release()
        router.wait_for("closed: released")
    finally:
        assert router.stop() == 0
    lines = [line for line in router.log().splitlines() if "FORGED" in line]
    assert lines, router.log()  # pydicom did warn, quoting the value
    assert not any(line.startswith(forged[:19]) for line in lines), lines
    assert all("\\n2026-11-26 07:00:00,000" in line for line in lines), lines


def test_pydicom_lines_name_the_association_or_the_destination(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """pydicom warns about an unknown Specific Character Set while the rules read
    PatientName, and again while the instance is converted for a destination that
    takes Implicit VR only. Every such line names whom it concerns: the association
    for the rules, also for a data set over 4 MiB, whose rules run on the commit
    thread (its lines were bare); the destination and the queued file for the
    conversion (bare too)."""
    from router.net.client import connect

    sink = storescp_server(tmp_path, procs, aet="OLDPACS", args=["+xi", "+B"], dcmtk=dcmtk)
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "vip"\n[rule.when]\nPatientName = "VIP*"\n[rule.then]\n'
        'forward = ["old"]\n')
    router = Router(tmp_path, workers=1, extra='[routing]\nrules = "rules.toml"\n'
                    + _destination("old", sink.port, "OLDPACS"))
    small, big = tmp_path / "small.dcm", tmp_path / "big.dcm"
    make_ct(small, size_kb=8, seed=1,
            attrs={"SpecificCharacterSet": "ISO_IR 998", "PatientName": "VIP^A"})
    make_ct(big, size_kb=6000, seed=2,
            attrs={"SpecificCharacterSet": "ISO_IR 999", "PatientName": "VIP^B"})
    try:
        router.wait_for("ready: 1 workers serving")
        with connect("127.0.0.1", router.port, calling_ae="MOD", called_ae="ROUTER",
                     contexts=[("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])],
                     ) as assoc:
            assert assoc.store(small).status == 0x0000
            assert assoc.store(big).status == 0x0000
            assoc.release()
        router.wait_count("forward old:", 2)
    finally:
        assert router.stop() == 0
    lines = [line for line in router.log().splitlines() if "Unknown encoding" in line]
    by_association = [line for line in lines if ": association w1-a1 MOD->ROUTER " in line]
    by_destination = [line for line in lines if ": destination old, " in line]
    assert sorted(lines) == sorted(by_association + by_destination), lines
    for charset in ("ISO_IR 998", "ISO_IR 999"):
        assert any(charset in line for line in by_association), lines
        assert any(charset in line for line in by_destination), lines


def test_rules_check_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "x"\n[rule.when]\nModallity = "CT"\n[rule.then]\nforward = ["pacs"]\n')
    config = tmp_path / "router.toml"
    config.write_text('[[destination]]\nname = "pacs"\nhost = "h"\nport = 104\n'
                      'ae_title = "PACS"\n')
    done = subprocess.run([sys.executable, "-m", "router.cli", "rules", "check",
                           str(tmp_path / "rules.toml"), "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "rules.toml:4:" in done.stdout + done.stderr and "Modality" in done.stdout + done.stderr
    # And the router refuses to start on it, with the same one line per problem.
    config.write_text(config.read_text() + '[routing]\nrules = "rules.toml"\n')
    run = subprocess.run([sys.executable, "-m", "router.cli", "run", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "rules.toml:4:" in run.stderr, run.stderr


def test_destination_over_tls(tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """tls = true: the router verifies the destination's certificate against tls_ca
    (PS3.15 B.1, the BCP 195 profile DCMTK uses by default) and forwards over TLS."""
    key, cert = certificate(tmp_path, "127.0.0.1")
    sink = storescp_server(tmp_path, procs, aet="SECURE", args=["+B", "+tls", str(key),
                                                                str(cert), "-ic"], dcmtk=dcmtk)
    # Another CA: the same server must not be trusted through it.
    _, other = certificate(tmp_path, "other")
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "all"\n[rule.then]\nforward = ["secure", "impostor"]\n')
    extra = ('[routing]\nrules = "rules.toml"\n' + _destination("secure", sink.port, "SECURE")
             + f'tls = true\ntls_ca = "{cert}"\n'
             + _destination("impostor", sink.port, "SECURE")
             + f'tls = true\ntls_ca = "{other}"\n')
    router = Router(tmp_path, extra=extra)
    try:
        router.wait_for("ready: 2 workers serving")
        files = _study(tmp_path / "s", 3, modality="CT", description="x", seed=9)
        _send(dcmtk, router, "MOD1", files)
        router.wait_count("forward secure:", 3)
        router.wait_for("certificate verify failed")
    finally:
        router.stop()
    got = {_uid(p): _dataset(p) for p in received_files(sink.outdir)}
    assert got == {_uid(p): _dataset(p) for p in files}  # once each: never via the impostor
    assert len(list((router.spool / "queue" / "impostor").glob("*.dcm"))) == 3


def test_reject_drop_and_unmatched_reject_answer_the_sender(tmp_path: Path) -> None:
    from router.net.client import connect

    (tmp_path / "rules.toml").write_text(
        # A name in German, longer than an Error Comment (64 characters): the comment
        # sent must still be valid LO, or the response would not be sent at all.
        '[[rule]]\nname = "no MR \u2013 keine Röntgenbilder hier, bitte an das Archiv senden"\n'
        '[rule.when]\nModality = "MR"\n[rule.then]\nreject = 0xA900\n'
        '[[rule]]\nname = "ignore scouts"\n[rule.when]\nImageType = { wildcard = "*LOCALIZER*" }\n'
        '[rule.then]\ndrop = true\n'
        '[[rule]]\nname = "CT"\n[rule.when]\nModality = "CT"\n[rule.then]\nforward = ["pacs"]\n')
    router = Router(tmp_path, extra='[routing]\nrules = "rules.toml"\nunmatched = "reject"\n'
                    + _destination("pacs", free_port(), "PACS"))
    try:
        router.wait_for("ready: 2 workers serving")
        mr, scout, us = tmp_path / "mr.dcm", tmp_path / "scout.dcm", tmp_path / "us.dcm"
        make_ct(mr, size_kb=4, modality="MR")
        make_ct(scout, size_kb=4, attrs={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
        make_ct(us, size_kb=4, modality="US")
        contexts = [("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])]
        with connect("127.0.0.1", router.port, calling_ae="MOD1", called_ae="ROUTER",
                     contexts=contexts) as assoc:
            rejected = assoc.store(mr)
            assert rejected.status == 0xA900 and "no MR" in (rejected.error_comment or "")
            assert rejected.error_comment.isascii() and len(rejected.error_comment) <= 64
            assert assoc.store(scout).status == 0x0000  # dropped: acknowledged, not kept
            unmatched = assoc.store(us)
            assert unmatched.status == 0x0124 and "no routing rule" in unmatched.error_comment
            assoc.release()
        router.wait_for('drop by rule "ignore scouts"')
    finally:
        router.stop()
    assert not list(router.spool.rglob("*.dcm"))  # none of the three is kept anywhere


def test_attribute_rules_route_small_and_big_instances_alike(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """Rules that read attributes are evaluated on the worker's loop for instances up
    to LOOP_ROUTING_MAX_BYTES and on the commit thread beyond: the same decisions
    either way, and the bytes forwarded unchanged."""
    from workers.actor import LOOP_ROUTING_MAX_BYTES

    sink = storescp_server(tmp_path, procs, aet="SINK", args=["+B"], dcmtk=dcmtk)
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "CT"\n[rule.when]\nModality = "CT"\n[rule.then]\n'
        'forward = ["sink"]\n')
    big_kb = LOOP_ROUTING_MAX_BYTES // 1024 + 512
    files = {}
    for modality in ("CT", "MR"):
        for size_kb in (16, big_kb):
            path = tmp_path / f"{modality}-{size_kb}.dcm"
            make_ct(path, size_kb=size_kb, modality=modality, seed=size_kb)
            files[modality, size_kb] = path
    router = Router(tmp_path, extra='[routing]\nrules = "rules.toml"\n'
                    + _destination("sink", sink.port, "SINK"))
    try:
        router.wait_for("ready: 2 workers serving")
        _send(dcmtk, router, "MOD1", list(files.values()))
        router.wait_count("forward sink:", 2)
    finally:
        assert router.stop() == 0
    got = {_uid(p): p for p in received_files(sink.outdir)}
    assert sorted(got) == sorted(_uid(files["CT", k]) for k in (16, big_kb))
    for k in (16, big_kb):
        assert _dataset(got[_uid(files["CT", k])]) == _dataset(files["CT", k])
    unrouted = sorted((router.spool / "unrouted").glob("*.dcm"))
    assert sorted(_uid(p) for p in unrouted) == sorted(_uid(files["MR", k])
                                                       for k in (16, big_kb))


def test_a_destination_that_takes_only_implicit_vr_gets_converted_instances(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """PS3.5 10.1: Implicit VR Little Endian is what every node must take; storescp +xi
    takes nothing else. Instances stored in Explicit VR LE or Big Endian are converted
    for it (the same elements and pixel values), and one stored compressed, which the
    router cannot decompress, goes to dead letters saying so. The router used to
    propose the stored syntax alone, and dead-lettered all three."""
    sink = storescp_server(tmp_path, procs, aet="OLDPACS", args=["+xi", "+B"], dcmtk=dcmtk)
    little, big = tmp_path / "le.dcm", tmp_path / "be.dcm"
    make_ct(little, size_kb=24, seed=1)
    make_ct(big, size_kb=24, seed=2, transfer_syntax=pydicom.uid.ExplicitVRBigEndian)
    jpeg = next(p for p in pydicom_test_files() if p.name == "SC_rgb_jpeg_dcmtk.dcm")
    router = _forward_all(tmp_path, "old", sink.port, "OLDPACS")
    try:
        router.wait_for("ready: 2 workers serving")
        _send(dcmtk, router, "MOD1", [little])
        for path, proposal in ((big, "-xb"), (jpeg, "-xy")):
            _send(dcmtk, router, "MOD1", [path], proposal=proposal)
        router.wait_count("forward old:", 2)
        router.wait_for("does not decompress")
    finally:
        assert router.stop() == 0
    assert queued(router.spool, "old") == []  # nothing left to send
    got = {_uid(p): p for p in received_files(sink.outdir)}
    assert sorted(got) == sorted(_uid(p) for p in (little, big))
    for source in (little, big):
        received = pydicom.dcmread(got[_uid(source)])
        assert received.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
        same_content(received, source)
    [dead] = (router.spool / "dead" / "old").glob("*.dcm")
    assert _uid(dead) == _uid(jpeg) and _dataset(dead) == _dataset(jpeg)


def test_big_endian_undefined_length_un_is_converted_and_changed_as_dcmtk_reads_it(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """PS3.5 6.2.2 (CP-246): a UN's value is implicit VR little endian whatever the
    transfer syntax. A Big Endian instance with an undefined-length private UN and a
    standard attribute written as UN was acknowledged, then dead-lettered where it had
    to be converted (pydicom read the UN's items big endian: "No tag to read"), and
    refused C000H where a rule changed it; converted without the UN, NumberOfSlices
    300 would have become 11265. DCMTK's own conversion (dcmconv +ti) is the yardstick."""
    old = storescp_server(tmp_path, procs, aet="OLDPACS", args=["+xi", "+B"], dcmtk=dcmtk)
    ai = storescp_server(tmp_path / "ai", procs, aet="AI", args=["+B"], dcmtk=dcmtk)
    source = tmp_path / "be.dcm"
    _big_endian_ct_with_un(source)
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "all"\n[rule.then]\nforward = ["old", "ai"]\n'
        '[[rule.then.change]]\ndestination = "ai"\nset = { PatientName = "ANON" }\n')
    router = Router(tmp_path, workers=1, extra='[routing]\nrules = "rules.toml"\n'
                    + _destination("old", old.port, "OLDPACS")
                    + _destination("ai", ai.port, "AI"))
    try:
        router.wait_for("ready: 1 workers serving")
        _send(dcmtk, router, "MOD1", [source], proposal="-xb")
        router.wait_count("forward old:", 1)
        router.wait_count("forward ai:", 1)
    finally:
        assert router.stop() == 0
    assert not list((router.spool / "dead").rglob("*.dcm"))
    [converted] = received_files(old.outdir)
    assert (pydicom.dcmread(converted).file_meta.TransferSyntaxUID
            == pydicom.uid.ImplicitVRLittleEndian)
    [changed] = received_files(ai.outdir)
    assert (pydicom.dcmread(changed).file_meta.TransferSyntaxUID
            == pydicom.uid.ExplicitVRBigEndian)
    pixels = None
    for path in (source, converted, changed):
        # As DCMTK reads each (converting to implicit VR little endian itself).
        ds = _as_dcmtk_reads(dcmtk, path, tmp_path / f"dcmtk-{path.name}")
        assert ds.NumberOfSlices == 300, path
        value = ds[0x00091010].value
        [item] = value if isinstance(value, Sequence) else convert_SQ(value, True, True)
        assert item[0x00091011].value == b"ABCD", path
        pixels = pixels or ds.PixelData  # the source's first
        assert ds.PixelData == pixels, path
        assert (ds.PatientName == "ANON") == (path == changed), path
    # And rules test reads it (it said "cannot read it as DICOM").
    done = subprocess.run([sys.executable, "-m", "router.cli", "rules", "test",
                           str(tmp_path / "rules.toml"), "--calling-ae", "MOD1", str(source)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and 'rule "all"' in done.stdout, done.stdout + done.stderr


def _big_endian_ct_with_un(path: Path) -> None:
    """A Big Endian CT with a private UN of undefined length, its one item holding
    (0009,1011) "ABCD" in implicit VR little endian (PS3.5 6.2.2), and NumberOfSlices
    300 written as UN (little endian)."""
    make_ct(path, size_kb=24, seed=5, transfer_syntax=pydicom.uid.ExplicitVRBigEndian)
    data = path.read_bytes()
    offset = read_part10_header(path).dataset_offset
    items = (struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
             + struct.pack("<HHI", 0x0009, 0x1011, 4) + b"ABCD"
             + struct.pack("<HHI", 0xFFFE, 0xE00D, 0))
    extra = {
        0x00090010: struct.pack(">HH2sH", 0x0009, 0x0010, b"LO", 4) + b"ACME"
        + struct.pack(">HH2sHI", 0x0009, 0x1010, b"UN", 0, 0xFFFFFFFF) + items
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0),
        0x00540081: struct.pack(">HH2sHI", 0x0054, 0x0081, b"UN", 0, 2)
        + struct.pack("<H", 300)}
    body = bytearray()
    for tag, _, start, end in top_level_spans(memoryview(data)[offset:], implicit=False,
                                             little=False):
        for at in [at for at in extra if at < tag]:
            body += extra.pop(at)
        body += data[offset + start:offset + end]
    path.write_bytes(data[:offset] + bytes(body))


def _as_dcmtk_reads(dcmtk: Dcmtk, path: Path, out: Path) -> pydicom.Dataset:
    done = dcmtk.run("dcmconv", "+ti", str(path), str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return pydicom.dcmread(out)


def test_native_instances_go_in_their_own_syntax_where_the_destination_takes_it(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """An instance held in Big Endian or Implicit VR reaches a storescp that takes every
    syntax (+xa) as it was sent: same transfer syntax, same data set bytes (the private
    element of the implicit one keeps its VR: its bytes do not change). The router used
    to propose [held, Explicit LE, Implicit LE] in one context; storescp picks Explicit
    LE from such a list whatever the order, so both were converted, and the private
    element of the implicit VR one arrived as UN."""
    sink = storescp_server(tmp_path, procs, aet="PACS", dcmtk=dcmtk)
    implicit = tmp_path / "implicit.dcm"
    make_ct(implicit, size_kb=24, seed=3, transfer_syntax=pydicom.uid.ImplicitVRLittleEndian)
    _add_private_lo(implicit, "kept as is")
    big = next(p for p in pydicom_test_files() if p.name == "MR_small_bigendian.dcm")
    router = _forward_all(tmp_path, "pacs", sink.port, "PACS")
    try:
        router.wait_for("ready: 2 workers serving")
        for path, proposal in ((big, "-xb"), (implicit, "-xi")):
            _send(dcmtk, router, "MOD1", [path], proposal=proposal)
        router.wait_count("forward pacs:", 2)
    finally:
        assert router.stop() == 0
    got = {_uid(p): p for p in received_files(sink.outdir)}
    for source in (big, implicit):
        received = got[_uid(source)]
        assert read_part10_header(received).transfer_syntax == \
            read_part10_header(source).transfer_syntax, source.name
        assert _dataset(received) == _dataset(source), source.name


def test_an_instance_goes_in_its_own_syntax_on_an_association_opened_for_another(
        tmp_path: Path, dcmtk: Dcmtk) -> None:
    """A Big Endian instance, then an Explicit VR LE one of the same SOP class, to a
    pynetdicom node (which picks Implicit VR from [Explicit, Implicit]: its own order).
    The association opened for the first one had Explicit LE only in that fallback
    context, accepted as Implicit VR; the second instance was sent on it, converted,
    although the node takes Explicit LE. A syntax counts as offered on an association
    only where it was proposed on its own."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    got: dict[str, tuple[str, bytes]] = {}

    def on_store(event: Any) -> int:
        got[event.request.AffectedSOPInstanceUID] = (str(event.context.transfer_syntax),
                                                     event.request.DataSet.getvalue())
        return 0x0000

    ae = AE(ae_title="AINODE")
    ae.add_supported_context(CTImageStorage)  # pynetdicom's default: Implicit VR first
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    big, explicit = tmp_path / "be.dcm", tmp_path / "le.dcm"
    make_ct(big, size_kb=8, seed=21, transfer_syntax=pydicom.uid.ExplicitVRBigEndian)
    make_ct(explicit, size_kb=8, seed=22)
    _add_private_lo(explicit, "its VR")
    router = _forward_all(tmp_path, "ai", port, "AINODE", workers=1, idle=30,
                          more="concurrency = 1\n")
    try:
        router.wait_for("ready: 1 workers serving")
        for path, proposal in ((big, "-xb"), (explicit, "-xe")):
            _send(dcmtk, router, "MOD1", [path], proposal=proposal)
            router.wait_for(f"forward ai: {_uid(path)}")
    finally:
        assert router.stop() == 0
        server.shutdown()
    for source in (big, explicit):
        syntax, data = got[_uid(source)]
        assert syntax == read_part10_header(source).transfer_syntax, source.name
        assert data == _dataset(source), source.name


def test_a_destination_serving_one_association_at_a_time_is_not_kept_waiting(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """storescp without --fork serves one association at a time. With the default
    concurrency (2), the second instance went to a sender without an association,
    whose A-ASSOCIATE-RQ then sat in storescp's backlog until the first sender's idle
    association was released: `idle` seconds late (5 by default; 30 here). Work now
    goes to the sender that holds an association, and one idle while another sender
    opens is let go at once."""
    sink = storescp_server(tmp_path, procs, aet="SINGLE", dcmtk=dcmtk)
    router = _forward_all(tmp_path, "single", sink.port, "SINGLE", workers=1, idle=30)
    files = [tmp_path / "mr.dcm", tmp_path / "ct.dcm"]
    make_ct(files[0], size_kb=8, modality="MR", seed=1)
    make_ct(files[1], size_kb=8, seed=2)
    try:
        router.wait_for("ready: 1 workers serving")
        for path in files:  # two associations, one instance each, one after the other
            _send(dcmtk, router, "MOD1", [path])
            router.wait_for(f"forward single: {_uid(path)}", timeout=10)
    finally:
        assert router.stop() == 0
    assert sorted(_uid(p) for p in received_files(sink.outdir)) == sorted(map(_uid, files))


class _CountingPacs:
    """A pynetdicom CT storage SCP on a free port that counts its associations open
    at once (``peak``) and keeps the SOP Instance UIDs it stored (``seen``). With
    ``hold_until_open``, each C-STORE is answered only once that many associations
    have been open together (or after 10 s); with ``hold``, only once ``answer`` is
    set (or after 60 s), and ``entered`` is set when the first one arrives."""

    def __init__(self, ae_title: str, hold_until_open: int = 0, hold: bool = False,
                 syntaxes: tuple[str, ...] = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"),
                 ) -> None:
        import threading

        from pynetdicom import AE, evt
        from pynetdicom.sop_class import CTImageStorage

        self.lock = threading.Lock()
        self.open = self.peak = 0
        self.hold_until_open = hold_until_open
        self.enough_open = threading.Event()
        self.hold = hold
        self.entered, self.answer = threading.Event(), threading.Event()
        self.seen: list[str] = []
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(CTImageStorage, list(syntaxes))
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_ESTABLISHED, self._opened),
            (evt.EVT_RELEASED, self._closed), (evt.EVT_ABORTED, self._closed)])

    def _opened(self, event: Any) -> None:
        with self.lock:
            self.open += 1
            self.peak = max(self.peak, self.open)
            if self.open >= self.hold_until_open:
                self.enough_open.set()

    def _closed(self, event: Any) -> None:
        with self.lock:
            self.open -= 1

    def _store(self, event: Any) -> int:
        self.enough_open.wait(10)
        with self.lock:
            self.seen.append(event.request.AffectedSOPInstanceUID)
        self.entered.set()
        if self.hold:
            self.answer.wait(60)
        return 0x0000

    def shutdown(self) -> None:
        self.answer.set()
        self.server.shutdown()


def test_concurrency_1_means_one_association_in_all_whatever_the_workers(
        tmp_path: Path, dcmtk: Dcmtk) -> None:
    """Some nodes take one association at a time: concurrency = 1 over 2 workers. The
    worker without an association of its own hands its queue files to the other
    (an actor message between workers, D2)."""
    pacs = _CountingPacs("SINGLE")
    seen, port, server = pacs.seen, pacs.port, pacs.server
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "all"\n[rule.then]\nforward = ["single"]\n')
    router = Router(tmp_path, extra='[routing]\nrules = "rules.toml"\n'
                    + _destination("single", port, "SINGLE") + "concurrency = 1\n")
    try:
        router.wait_for("ready: 2 workers serving")
        studies = [_study(tmp_path / f"s{n}", 10, modality="CT", description="x", seed=20 + n)
                   for n in range(4)]
        senders = [subprocess.Popen(
            [dcmtk.storescu, "-aet", f"MOD{n}", "-aec", "ROUTER", "127.0.0.1", str(router.port),
             *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dcmtk_env()) for n, files in enumerate(studies)]
        for sender in senders:
            sender.communicate(timeout=60)
        router.wait_count("forward single:", 40)
        # Both workers took instances; only one of them talks to the destination.
        assert {line.split(" worker-")[1][0] for line in router.lines
                if "bytes status 0x0000" in line} == {"1", "2"}
        assert {line.split(" worker-")[1][0] for line in router.lines
                if "forward single:" in line} == {"1"}
    finally:
        router.stop()
        server.shutdown()
    assert pacs.peak == 1
    assert sorted(seen) == sorted(_uid(p) for files in studies for p in files)


def test_a_change_that_cannot_be_made_keeps_that_copy_as_a_dead_letter(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """A site prefix that makes one study's accession number too long for SH (PS3.5
    Table 6.2-1): the copy for that destination went out unchanged, with a warning
    line (an outside campaign; for a pseudonym too long for LO that sends the patient
    ID itself). Now it is kept as that destination's dead letter, saying why, which
    `queue retry` keeps unless told --unchanged; the other destination gets its copy,
    and the sender its Success."""
    research = storescp_server(tmp_path, procs, aet="RESEARCH", args=["+B"], dcmtk=dcmtk)
    pacs = storescp_server(tmp_path, procs, aet="PACS", args=["+B"], dcmtk=dcmtk)
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "prefixed"\n[rule.then]\nforward = ["research", "pacs"]\n'
        '[[rule.then.change]]\ndestination = "research"\n'
        'replace = { AccessionNumber = { pattern = "^", with = "SITEA-" } }\n')
    router = Router(tmp_path, workers=1, extra='[routing]\nrules = "rules.toml"\n'
                    + _destination("research", research.port, "RESEARCH")
                    + _destination("pacs", pacs.port, "PACS"))
    short, long = tmp_path / "short.dcm", tmp_path / "long.dcm"
    make_ct(short, size_kb=8, seed=31)
    make_ct(long, size_kb=8, seed=32)
    for path, accession in ((short, "A1"), (long, "RIS2024000123")):
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = accession
        ds.save_as(path, enforce_file_format=True)
    try:
        router.wait_for("ready: 1 workers serving")
        _send(dcmtk, router, "MOD1", [short, long])  # both acknowledged (asserted there)
        router.wait_count("forward pacs:", 2)
        router.wait_count("forward research:", 1)
        line = router.lines[router.wait_for("not sent to it")]
        assert f"{_uid(long)} from MOD1: kept in dead/research" in line, line
        assert "change not made, so not sent: replace in AccessionNumber would be " \
            "'SITEA-RIS2024000123': at most 16 characters" in line, line
        listed = router.command("queue", "ls", "research")
        assert "change not made" in listed.stdout, listed.stdout
        kept = router.command("queue", "retry", "research")
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert "0 instance(s) moved back" in kept.stdout, kept.stdout
        assert "--unchanged sends it all the same" in kept.stdout, kept.stdout
    finally:
        assert router.stop() == 0
    got = {_uid(p): p for p in received_files(research.outdir)}
    assert list(got) == [_uid(short)]
    assert pydicom.dcmread(got[_uid(short)]).AccessionNumber == "SITEA-A1"
    assert sorted(_uid(p) for p in received_files(pacs.outdir)) == sorted(
        [_uid(short), _uid(long)])
    (letter,) = (router.spool / "dead" / "research").glob("*.dcm")
    assert pydicom.dcmread(letter).AccessionNumber == "RIS2024000123"  # as received
    record = json.loads(letter.with_suffix(".json").read_text())
    assert record["unchanged"] is True and record["sop_instance_uid"] == _uid(long)


def test_private_text_of_unknown_vr_keeps_a_copy_that_needs_utf8_as_a_dead_letter(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """pydicom's chrGerm.dcm (ISO_IR 100) with a private element of a creator no
    dictionary knows, sent in Implicit VR, and a rule that gives one destination a
    Cyrillic institution name: the data set went out declared UTF-8 with its private
    text still Latin-1 (an outside campaign). With no VR, those bytes cannot be
    converted safely: that copy is now a dead letter, found from the whole header
    (the rules read no private element); the other destination gets the instance."""
    pacs = storescp_server(tmp_path, procs, aet="PACS", args=["+B"], dcmtk=dcmtk)
    cyrillic = storescp_server(tmp_path / "c", procs, aet="CYR", args=["+B"], dcmtk=dcmtk)
    source = tmp_path / "german.dcm"
    ds = pydicom.dcmread(Path(pydicom.__file__).parent / "data" / "charset_files"
                         / "chrGerm.dcm")
    ds.private_block(0x0011, "SITE Y 2.0", create=True).add_new(0x01, "LO", "Äneas^Rüdiger")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(source, enforce_file_format=True, implicit_vr=True, little_endian=True)
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "both"\n[rule.then]\nforward = ["pacs", "cyr"]\n'
        '[[rule.then.change]]\ndestination = "cyr"\n'
        'set = { InstitutionName = "Москва" }\n')
    router = Router(tmp_path, workers=1, extra='[routing]\nrules = "rules.toml"\n'
                    + _destination("pacs", pacs.port, "PACS")
                    + _destination("cyr", cyrillic.port, "CYR"))
    try:
        router.wait_for("ready: 1 workers serving")
        _send(dcmtk, router, "MOD1", [source], proposal="-xi")  # acknowledged
        router.wait_count("forward pacs:", 1)
        line = router.lines[router.wait_for("not sent to it")]
        assert f"{_uid(source)} from MOD1: kept in dead/cyr" in line, line
        assert "private element(s) (0011,1001) of unknown VR" in line, line
    finally:
        assert router.stop() == 0
    assert not received_files(cyrillic.outdir)
    [got] = received_files(pacs.outdir)
    assert pydicom.dcmread(got)[0x00111001].value.rstrip(b" ") == "Äneas^Rüdiger".encode(
        "latin-1")  # unchanged, in the set the data set still declares


def test_a_character_set_a_rule_sets_converts_the_text_or_keeps_a_dead_letter(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """A rule sets (0008,0005) for one destination, which wants UTF-8, and removes it
    for another, which takes ASCII only. It relabelled the data set: pydicom's
    chrFren.dcm (Latin-1 names) went out as bytes that read as other characters. Now
    its text is converted to UTF-8 (DCMTK's dcmdump reads the names); for ASCII,
    which cannot hold them, it is that destination's dead letter, the whole data set
    read to tell (the rules read no names), and an ASCII instance goes to both."""
    utf8 = storescp_server(tmp_path, procs, aet="UTF8", args=["+B"], dcmtk=dcmtk)
    ascii_only = storescp_server(tmp_path / "a", procs, aet="ASCII", args=["+B"],
                                 dcmtk=dcmtk)
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "sets"\n[rule.then]\nforward = ["utf8", "ascii"]\n'
        '[[rule.then.change]]\ndestination = "utf8"\n'
        'set = { SpecificCharacterSet = "ISO_IR 192" }\n'
        '[[rule.then.change]]\ndestination = "ascii"\n'
        'remove = ["SpecificCharacterSet"]\n')
    router = Router(tmp_path, workers=1, extra='[routing]\nrules = "rules.toml"\n'
                    + _destination("utf8", utf8.port, "UTF8")
                    + _destination("ascii", ascii_only.port, "ASCII"))
    french = Path(pydicom.__file__).parent / "data" / "charset_files" / "chrFren.dcm"
    name = str(pydicom.dcmread(french).PatientName)
    plain = tmp_path / "plain.dcm"
    make_ct(plain, size_kb=8, seed=41)
    try:
        router.wait_for("ready: 1 workers serving")
        _send(dcmtk, router, "MOD1", [french, plain])  # both acknowledged
        router.wait_count("forward utf8:", 2)
        router.wait_count("forward ascii:", 1)
        line = router.lines[router.wait_for("not sent to it")]
        assert f"{_uid(french)} from MOD1: kept in dead/ascii" in line, line
        assert "SpecificCharacterSet '(removed)': PatientName" in line, line
    finally:
        assert router.stop() == 0
    got = {_uid(p): p for p in received_files(utf8.outdir)}
    assert sorted(got) == sorted([_uid(french), _uid(plain)])
    dump = dcmtk.run("dcmdump", "+U8", str(got[_uid(french)]))
    assert dump.returncode == 0 and f"[{name}]" in dump.stdout, dump.stdout + dump.stderr
    assert "ISO_IR 192" in dump.stdout
    assert [_uid(p) for p in received_files(ascii_only.outdir)] == [_uid(plain)]
    (letter,) = (router.spool / "dead" / "ascii").glob("*.dcm")
    assert str(pydicom.dcmread(letter).PatientName) == name  # as received


def test_an_instance_pydicom_cannot_convert_is_a_dead_letter_not_a_wedged_sender(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Implicit VR, Rows three bytes long, for a PACS that takes Explicit VR only:
    pydicom failed while the router prepared the conversion, outside its guard; the
    sender restarted once a second for ever, leaving an association open each time
    until the PACS refused more (an outside campaign). Now the instance is kept in
    dead/ with the reason, and the next one is delivered."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # bytes as they are
    pacs = _CountingPacs("PACS", syntaxes=("1.2.840.10008.1.2.1",))
    bad, good = tmp_path / "bad.dcm", tmp_path / "good.dcm"
    make_ct(bad, size_kb=8, seed=51, transfer_syntax=pydicom.uid.ImplicitVRLittleEndian)
    make_ct(good, size_kb=8, seed=52, transfer_syntax=pydicom.uid.ImplicitVRLittleEndian)
    data = bad.read_bytes()
    rows = data.index(struct.pack("<HHI", 0x0028, 0x0010, 2))
    bad.write_bytes(data[:rows] + struct.pack("<HHI", 0x0028, 0x0010, 3)
                    + data[rows + 8:rows + 10] + b"\x00" + data[rows + 10:])
    # One association at a time: each one a crashed sender left open showed as more.
    router = _forward_all(tmp_path, "pacs", pacs.port, "PACS", workers=1,
                          more="concurrency = 1\n")
    try:
        router.wait_for("ready: 1 workers serving")
        ae = AE(ae_title="MOD1")
        ae.add_requested_context(CTImageStorage, pydicom.uid.ImplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", router.port, ae_title="ROUTER")
        assert assoc.is_established
        try:
            for path in (bad, good):
                assert assoc.send_c_store(path).Status == 0x0000
        finally:
            assoc.release()
        router.wait_count("forward pacs:", 1)
        line = router.lines[router.wait_for("moved to dead/pacs")]
        assert "cannot encode dataset" in line, line
    finally:
        assert router.stop() == 0
        pacs.server.shutdown()
    assert pacs.seen == [_uid(good)] and pacs.peak == 1
    assert "sender 0 failed" not in router.log()
    assert [p.name for p in (router.spool / "dead" / "pacs").glob("*.dcm")]


def test_a_second_sigterm_while_draining_stops_now(tmp_path: Path, dcmtk: Dcmtk) -> None:
    """An operator who sends SIGTERM again (or presses Ctrl-C twice) will not wait out
    the grace period (60 s here): a second one was ignored without a word. Now it
    stops at once: the association still open is aborted, the forward the PACS has not
    answered is cut off and stays queued, and the router exits 0."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    pacs = _CountingPacs("PACS", hold=True)
    router: Router | None = None
    try:
        router = _forward_all(tmp_path, "pacs", pacs.port, "PACS", workers=1,
                              more="concurrency = 1\n", drain_grace=60)
        router.wait_for("ready: 1 workers serving")
        files = _study(tmp_path / "s", 2, modality="CT", description="x", seed=18)
        _send(dcmtk, router, "MOD1", files)
        assert pacs.entered.wait(30)
        modality = AE(ae_title="MOD2")
        modality.add_requested_context(Verification)
        held = modality.associate("127.0.0.1", router.port, ae_title="ROUTER")
        assert held.is_established
        router.proc.send_signal(signal.SIGTERM)
        router.wait_for("worker 1: draining")
        router.proc.send_signal(signal.SIGTERM)
        assert router.proc.wait(30) == 0  # not the 60 s of grace
        log = router.log()
        assert "SIGTERM while draining: stopping now" in log
        assert "worker 1: stopping now" in log
        assert "router stopping at once" in log  # the open association's abort
        assert "the send of" in log and "was cut off" in log
        assert held.is_aborted or not held.is_established
        queue = router.spool / "queue" / "pacs"
        assert len(list(queue.glob("*.dcm"))) == 2  # nothing acknowledged is lost
    finally:
        pacs.answer.set()
        if router is not None:
            router.stop()
        pacs.shutdown()


def test_a_destination_that_rejects_every_association_shows_in_status_and_queue_ls(
        tmp_path: Path, dcmtk: Dcmtk) -> None:
    """A wrong AE title: the PACS rejects every association (permanent, PS3.8 7.1.1.9),
    and the queue keeps its instances, counting no failure, for good. Only the log
    said why; status, `queue ls` and the Prometheus text now say it too."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    pacs = AE(ae_title="PACS")
    pacs.require_called_aet = True
    pacs.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False)
    router = _forward_all(tmp_path, "pacs", port, "NOT-PACS", workers=1)
    try:
        router.wait_for("ready: 1 workers serving")
        files = _study(tmp_path / "s", 1, modality="CT", description="x", seed=19)
        _send(dcmtk, router, "MOD1", files)
        router.wait_for("rejected the association (permanent")
        deadline = time.monotonic() + 10  # the error rides in a heartbeat (every 0.2 s):
        while not router.status().get("failing"):  # each status call waits for an answer
            assert time.monotonic() < deadline, "no destination failing in status"
        status = router.command("status")
        assert "destination pacs: failing since" in status.stdout, status.stdout
        assert "rejected the association (permanent" in status.stdout, status.stdout
        listed = router.command("queue", "ls")
        assert "destination pacs: failing since" in listed.stdout, listed.stdout
        as_json = json.loads(router.command("queue", "ls", "--json").stdout)
        (pacs_queue,) = as_json["destinations"]
        assert pacs_queue["queued"] == 1 and "rejected" in pacs_queue["failing"]["error"]
        metrics = router.command("status", "--prometheus", "-").stdout
        (line,) = [m for m in metrics.splitlines()
                   if m.startswith('dicom_router_destination_failing_seconds{destination="pacs"}')]
        assert float(line.split()[-1]) > 0, line
    finally:
        router.stop()
        server.shutdown()


def test_one_modalitys_burst_goes_out_over_the_whole_concurrency(
        tmp_path: Path, dcmtk: Dcmtk) -> None:
    """concurrency = 2 over 2 workers is one association per worker, and one storescu
    association lands on one worker: its burst went out over one association while
    the other worker's stayed idle. The backlog is now shared: the PACS holds the
    first instance until a second association is open (or 10 s have passed)."""
    pacs = _CountingPacs("PACS", hold_until_open=2)
    port, server = pacs.port, pacs.server
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "all"\n[rule.then]\nforward = ["pacs"]\n')
    router = Router(tmp_path, extra='[routing]\nrules = "rules.toml"\n'
                    + _destination("pacs", port, "PACS", idle=30) + "concurrency = 2\n")
    try:
        router.wait_for("ready: 2 workers serving")
        files = _study(tmp_path / "study", 20, modality="CT", description="x", seed=7)
        _send(dcmtk, router, "MOD1", files)
        router.wait_count("forward pacs:", 20)
        # One worker received them all; both sent.
        assert len({line.split(" worker-")[1][0] for line in router.lines
                    if "bytes status 0x0000" in line}) == 1
        assert {line.split(" worker-")[1][0] for line in router.lines
                if "forward pacs:" in line} == {"1", "2"}
    finally:
        router.stop()
        server.shutdown()
    assert pacs.peak == 2
    assert sorted(pacs.seen) == sorted(_uid(p) for p in files)
    # A clean stop leaves no file of a delivered instance behind in tmp/ (spares).
    assert not list((router.spool / "tmp").glob("*.spare"))


def _worker_totals(router: Router, wanted: dict[str, int],
                   within: float = 10) -> dict[str, int]:
    """The workers' counts ``wanted`` names, summed, from status: asked until they are
    ``wanted`` or ``within`` seconds have passed (they ride in heartbeats, every
    0.2 s here)."""
    deadline = time.monotonic() + within
    while True:
        workers = router.status()["workers"]
        assert isinstance(workers, list)
        totals = {key: sum(int(w[key]) for w in workers) for key in wanted}
        if totals == wanted or time.monotonic() >= deadline:
            return totals


def test_status_counts_stored_and_forwarded_instances(tmp_path: Path, procs: Procs,
                                                      dcmtk: Dcmtk) -> None:
    sink = storescp_server(tmp_path, procs, aet="PACS", dcmtk=dcmtk)
    router = _forward_all(tmp_path, "pacs", sink.port, "PACS")
    try:
        router.wait_for("ready: 2 workers serving")
        _send(dcmtk, router, "MOD1", _study(tmp_path / "s", 5, modality="CT",
                                             description="x", seed=30))
        router.wait_count("forward pacs:", 5)
        wanted = {"instances_stored": 5, "instances_forwarded": 5}
        assert _worker_totals(router, wanted) == wanted
        table = router.command("status")
        assert table.returncode == 0 and "fwd" in table.stdout, table.stderr
        total = next(line for line in table.stdout.splitlines() if line.startswith(" total"))
        assert total.split()[3:7] == ["5", "0", "5", "0"], total
    finally:
        router.stop()


def test_status_counts_the_queue_once_and_keeps_a_dead_workers_counts(
        tmp_path: Path, dcmtk: Dcmtk) -> None:
    """Both workers held parts of the shared queue, some files twice after a restart:
    the total said 9 queued for 6 files; and a restarted worker's stored instances
    dropped out of the counts. The queue now comes from the spool, and the counts of
    a slot's earlier processes stay."""
    router = _forward_all(tmp_path, "pacs", free_port(), "PACS")  # nothing listens
    try:
        router.wait_for("ready: 2 workers serving")
        for i in range(2):
            _send(dcmtk, router, f"MOD{i}", _study(tmp_path / f"s{i}", 3, modality="CT",
                                                    description="x", seed=50 + i))
        _worker_totals(router, {"instances_stored": 6})
        workers = router.status()["workers"]
        assert isinstance(workers, list)
        busiest = max(workers, key=lambda w: w["instances_stored"])
        os.kill(busiest["pid"], signal.SIGKILL)
        router.wait_count(f"worker {busiest['worker_id']} ready", 2)
        router.wait_for("queued instance(s) taken up from disk")
        status = router.status()
        workers = status["workers"]
        assert isinstance(workers, list)
        assert sum(w["instances_stored"] for w in workers) == 6
        assert status["queues"] == {"pacs": {"queued": 6, "dead": 0}}
        table = router.command("status").stdout
        total = next(line for line in table.splitlines() if line.startswith(" total"))
        assert total.split()[3:7] == ["6", "0", "0", "6"], table
        assert "queues: pacs 6 queued; unrouted: 0" in table
        # The same figures for Prometheus (node_exporter's textfile collector), read
        # by prometheus-client's parser.
        prom = tmp_path / "dicom_router.prom"
        assert router.command("status", "--prometheus", str(prom)).returncode == 0
        got = _prometheus(prom)
        assert got["dicom_router_up"] == 1
        assert got['dicom_router_queued_instances{destination="pacs"}'] == 6
        assert sum(v for k, v in got.items()
                   if k.startswith("dicom_router_instances_stored_total{")) == 6
        assert got[f'dicom_router_worker_restarts_total{{worker="{busiest["worker_id"]}"}}'] == 1
    finally:
        router.stop()
    down = router.command("status", "--prometheus", str(prom))
    assert down.returncode == 3 and _prometheus(prom) == {
        "dicom_router_up": 0, 'dicom_router_queued_instances{destination="pacs"}': 6,
        'dicom_router_dead_letters{destination="pacs"}': 0,
        "dicom_router_unrouted_instances": 0, "dicom_router_spool_readable": 1}
    # A file it cannot write is said, but the router being down stays the exit code.
    unwritable = router.command("status", "--prometheus", str(tmp_path))
    assert unwritable.returncode == 3 and "cannot write" in unwritable.stderr, unwritable
    # Stopped (or crashed): status says so, exit 3, and still what waits in the spool,
    # which is what an operator asks first then.
    down = router.command("status")
    assert down.returncode == 3 and "no router answering" in down.stderr, down
    assert down.stdout == "queues: pacs 6 queued; unrouted: 0\n", down
    down = router.command("status", "--json")
    assert down.returncode == 3, down
    assert json.loads(down.stdout) | {"error": ""} == {
        "running": False, "error": "", "queues": {"pacs": {"queued": 6, "dead": 0}},
        "unrouted": 0}


def _prometheus(path: Path) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                      + "}" if s.labels else ""): s.value
            for family in text_string_to_metric_families(path.read_text())
            for s in family.samples}


def test_a_queue_of_a_destination_no_longer_configured_is_said_at_start(
        tmp_path: Path) -> None:
    """A destination renamed in the file left its queue behind, and nothing said so."""
    queue = tmp_path / "spool" / "queue" / "old-pacs"
    queue.mkdir(parents=True)
    make_ct(queue / "01795708644429803112-1-0.dcm", size_kb=4, seed=3)
    router = Router(tmp_path)
    try:
        router.wait_for("1 instance(s) queued for destination old-pacs, which is not "
                        "configured: they wait there until it is again")
        router.wait_for("ready: 2 workers serving")
        assert "queues: old-pacs 1 queued" in router.command("status").stdout
    finally:
        router.stop()


def test_a_changed_value_outside_the_character_set_arrives_readable(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """A rule that sets a name with umlauts and a description in Cyrillic: one instance
    declares no Specific Character Set (ASCII), the other is pydicom's real-world
    chrFren.dcm in ISO_IR 100 with accented names. What storescp writes is read by
    DCMTK's dcmdump, converting to UTF-8 by the set each file declares: every value as
    the rule and the modality wrote it. The router used to write Latin-1 bytes under no
    declared set, and question marks for the Cyrillic."""
    sink = storescp_server(tmp_path, procs, aet="PACS", args=["+B"], dcmtk=dcmtk)
    plain = tmp_path / "plain.dcm"
    make_ct(plain, size_kb=24, seed=1)
    french = Path(pydicom.__file__).parent / "data" / "charset_files" / "chrFren.dcm"
    name = str(pydicom.dcmread(french).PatientName)
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "all"\n[rule.then]\nforward = ["pacs"]\n'
        '[[rule.then.change]]\nset = { ReferringPhysicianName = "Müller^Jürgen", '
        'StudyDescription = "Москва" }\n')
    router = Router(tmp_path, extra='[routing]\nrules = "rules.toml"\n'
                    + _destination("pacs", sink.port, "PACS"))
    try:
        router.wait_for("ready: 2 workers serving")
        _send(dcmtk, router, "MOD1", [plain, french])
        router.wait_count("forward pacs:", 2)
    finally:
        assert router.stop() == 0
    got = {_uid(p): p for p in received_files(sink.outdir)}
    assert sorted(got) == sorted(_uid(p) for p in (plain, french))
    for source in (plain, french):
        dump = dcmtk.run("dcmdump", "+U8", str(got[_uid(source)]))
        assert dump.returncode == 0 and "W:" not in dump.stderr, dump.stderr
        assert "[Müller^Jürgen]" in dump.stdout and "[Москва]" in dump.stdout, dump.stdout
    assert f"[{name}]" in dcmtk.run("dcmdump", "+U8", str(got[_uid(french)])).stdout


def test_private_text_received_in_implicit_vr_is_matched_and_changed_in_its_set(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """An instance in Implicit VR, ISO_IR 100, whose private element of a creator no
    dictionary knows holds "Zürich OLD": for the router it is UN, bytes. The rule's
    condition on it matched only if the text was read as Latin-1 by luck, and its
    replace did nothing, where the same instance in Explicit VR was changed. Now the
    condition reads it in its set, the replace makes "Zürich Москва", and the data
    set, which Latin-1 cannot hold then, arrives in UTF-8 (storescu -> storescp)."""
    sink = storescp_server(tmp_path, procs, aet="PACS", args=["+B"], dcmtk=dcmtk)
    source = tmp_path / "implicit.dcm"
    make_ct(source, size_kb=24, seed=3, transfer_syntax=pydicom.uid.ImplicitVRLittleEndian)
    ds = pydicom.dcmread(source)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Grün^Jörg"
    ds.private_block(0x0029, "SITE X 1.0", create=True).add_new(0x01, "LO", "Zürich OLD")
    ds.save_as(source, enforce_file_format=True)
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "zurich"\n[rule.when]\n"(0029,1001)" = "Zürich OLD"\n'
        '[rule.then]\nforward = ["pacs"]\n[[rule.then.change]]\n'
        'replace = { "(0029,1001)" = { pattern = "OLD", with = "Москва" } }\n')
    router = Router(tmp_path, workers=1, extra='[routing]\nrules = "rules.toml"\n'
                    + _destination("pacs", sink.port, "PACS"))
    try:
        router.wait_for("ready: 1 workers serving")
        _send(dcmtk, router, "MOD1", [source], proposal="-xi")  # Implicit VR only
        router.wait_count("forward pacs:", 1)
    finally:
        assert router.stop() == 0
    [got] = received_files(sink.outdir)
    back = pydicom.dcmread(got)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert bytes(back[0x00291001].value).rstrip(b" ") == "Zürich Москва".encode()
    dump = dcmtk.run("dcmdump", "+U8", str(got))
    assert dump.returncode == 0 and "[Grün^Jörg]" in dump.stdout, dump.stdout + dump.stderr


def test_versions_of_an_instance_received_while_the_destination_is_down_arrive_in_order(
        tmp_path: Path, dcmtk: Dcmtk) -> None:
    """A workstation sends an instance, then corrects it twice (same SOP Instance UID),
    each over its own association, while the PACS is down: the workers hold the
    versions between them. When the PACS (pynetdicom) comes back, the version it keeps
    last must be the last one acknowledged."""
    import threading

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    port = free_port()
    router = _forward_all(tmp_path, "pacs", port, "PACS",
                          more="retry = { initial = 0.5, max = 1, attempts = 20 }\n"
                               "concurrency = 4\n")
    uid = pydicom.uid.generate_uid()
    taken: list[str] = []
    lock = threading.Lock()

    def store(event: Any) -> int:
        with lock:
            taken.append(str(event.dataset.SeriesDescription))
        return 0x0000

    server = None
    try:
        router.wait_for("ready: 2 workers serving")
        for label in ("v1", "v2", "v3"):
            path = tmp_path / f"{label}.dcm"
            make_ct(path, size_kb=16, sop_instance_uid=uid, attrs={"SeriesDescription": label})
            _send(dcmtk, router, "WORKSTATION", [path])
        router.wait_for("cannot connect to 127.0.0.1")
        ae = AE(ae_title="PACS")
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        server = ae.start_server(("127.0.0.1", port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, store)])
        router.wait_count(f"forward pacs: {uid} ", 3, timeout=60)  # each delivery
    finally:
        assert router.stop() == 0
        if server is not None:
            server.shutdown()
    assert taken == ["v1", "v2", "v3"], router.log()
    assert not queued(router.spool, "pacs")


def test_a_destination_removed_while_negotiating_lets_its_socket_go(
        tmp_path: Path, dcmtk: Dcmtk) -> None:
    """A PACS that accepts TCP and never answers: removed by a reload while the router
    waited for its A-ASSOCIATE-AC, the connection stayed open for good, one more per
    reload (an outside soak campaign). And the send given up is said in the log."""
    import socket

    hole = socket.create_server(("127.0.0.1", 0))
    hole.settimeout(30)
    router = _forward_all(tmp_path, "pacs", hole.getsockname()[1], "PACS", workers=1)
    try:
        router.wait_for("ready: 1 workers serving")
        _send(dcmtk, router, "MOD1", _study(tmp_path / "s", 1, modality="CT",
                                             description="x", seed=61))
        conn, _ = hole.accept()  # the router's association, waiting for our answer
        with conn:
            router.config.write_text(router.config.read_text().replace(
                '[routing]\nrules = "rules.toml"\n', "").split("[[destination]]")[0])
            assert router.command("reload").returncode == 0
            conn.settimeout(10)
            while conn.recv(4096):  # its A-ASSOCIATE-RQ, then the end of it
                pass
        line = router.lines[router.wait_for("destination pacs: the send of ")]
        # Nothing was out yet: no talk of the destination getting it twice.
        assert "is given up while connecting (destination removed by a reload); it stays " \
            "queued" in line, line
    finally:
        hole.close()
        router.stop()


def test_the_delivered_count_survives_a_reload_that_renames_the_destination(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """status's fwd total, "since the router started", went back to 0 when a reload
    removed or renamed a destination (an outside soak campaign). The old name's empty
    queue folder, deleted, came back, and, left, was listed for good."""
    sink = storescp_server(tmp_path, procs, aet="PACS", dcmtk=dcmtk)
    router = _forward_all(tmp_path, "pacs", sink.port, "PACS", workers=1)
    forwarded = {"instances_forwarded": 3}
    try:
        router.wait_for("ready: 1 workers serving")
        _send(dcmtk, router, "MOD1", _study(tmp_path / "s", 3, modality="CT",
                                             description="x", seed=62))
        router.wait_count("forward pacs:", 3)
        assert _worker_totals(router, forwarded) == forwarded
        (tmp_path / "rules.toml").write_text(
            '[[rule]]\nname = "all"\n[rule.then]\nforward = ["pacs2"]\n')
        router.config.write_text(router.config.read_text().replace(
            'name = "pacs"', 'name = "pacs2"'))
        assert router.command("reload").returncode == 0
        router.wait_for("destination pacs removed")
        # Its queue folder, empty now, deleted by the operator, stays deleted: the
        # worker made it again at its next heartbeat. Nor is it listed any more.
        (router.spool / "queue" / "pacs").rmdir()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # several heartbeats (0.2 s) after it
            assert _worker_totals(router, forwarded, within=0) == forwarded
        assert not (router.spool / "queue" / "pacs").exists()
        (router.spool / "queue" / "pacs").mkdir()  # or left there: not listed either
        assert list(router.status()["queues"]) == ["pacs2"]
    finally:
        router.stop()
    assert "made it again" not in router.log()


def test_queue_reroute_sends_the_unrouted_instances_through_the_rules_of_now(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """Instances no rule matched wait in unrouted/; after the rules are fixed there was
    no way out but by hand. `queue reroute` sends each to the running router again
    from the AE title that first sent it, and deletes it once acknowledged: those the
    rules now route arrive unchanged, one that still matches nothing is kept."""
    sink = storescp_server(tmp_path, procs, aet="PACS", dcmtk=dcmtk)
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "ct"\n[rule.when]\ncalling_ae = "NOBODY"\n'
                     '[rule.then]\nforward = ["pacs"]\n')
    router = Router(tmp_path, workers=2, extra='[routing]\nrules = "rules.toml"\n'
                    + _destination("pacs", sink.port, "PACS"))
    mod1 = _study(tmp_path / "a", 3, modality="CT", description="x", seed=71)
    mod2 = _study(tmp_path / "b", 1, modality="CT", description="x", seed=72)
    try:
        router.wait_for("ready: 2 workers serving")
        _send(dcmtk, router, "MOD1", mod1)
        _send(dcmtk, router, "MOD2", mod2)
        assert router.status()["unrouted"] == 4
        rules.write_text(rules.read_text().replace('"NOBODY"', '"MOD1"'))
        assert router.command("reload").returncode == 0
        done = router.command("queue", "reroute")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "4 instance(s) sent through the rules again, 0 refused" in done.stdout, done.stdout
        assert "1 in unrouted/ now" in done.stdout, done.stdout
        router.wait_count("forward pacs:", 3)
        [left] = (router.spool / "unrouted").glob("*.dcm")
        assert _uid(left) == _uid(mod2[0]) and _dataset(left) == _dataset(mod2[0])
        # The router's own line names the sender the instance first came from.
        assert any("MOD2->ROUTER" in line for line in router.lines[-20:]), router.log()
    finally:
        assert router.stop() == 0
    got = {_uid(p): p for p in received_files(sink.outdir)}
    assert sorted(got) == sorted(_uid(p) for p in mod1)
    for path in mod1:
        assert _dataset(got[_uid(path)]) == _dataset(path)
    stopped = router.command("queue", "reroute")
    assert stopped.returncode == 3 and "no router answering" in stopped.stderr, stopped
    assert len(list((router.spool / "unrouted").glob("*.dcm"))) == 1
