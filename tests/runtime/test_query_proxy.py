"""C-FIND through the router: DCMTK findscu -> router -> Orthanc, against findscu -> Orthanc.

The router runs as a subprocess with a query rule naming Orthanc (started by the test
on loopback, loaded with generated studies). At every level, what findscu gets through
the router must be what it gets from Orthanc directly.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from router.dicom.dataset import read_part10_header
from tests.helpers import (
    Dcmtk,
    Procs,
    make_study,
    pydicom_test_files,
    received_files,
    same_content,
    start_orthanc,
    storescp_server,
)
from tests.helpers.dcmtk import dcmqrscp_server, dcmtk_env
from tests.helpers.net import free_port
from tests.helpers.orthanc import Orthanc
from tests.helpers.router import Router

pytestmark = pytest.mark.interop


def _uid(path: Path) -> str:
    return read_part10_header(path).sop_instance_uid


def _loaded(orthanc: Orthanc, tmp_path: Path) -> None:
    for n, (patient, modality) in enumerate([("P1", "CT"), ("P1", "MR"), ("P2", "CT")]):
        for path in make_study(tmp_path / f"study{n}", n_series=2, n_instances=2, size_kb=4,
                               patient_id=patient, modality=modality, seed=n):
            orthanc.upload(path)


def _router(tmp_path: Path, orthanc: Orthanc, rules: str) -> Router:
    return _router_to(tmp_path, rules, orthanc.dicom_port, orthanc.aet, more="timeout = 10\n")


def _router_to(tmp_path: Path, rules: str, port: int, aet: str, *, name: str = "pacs",
               more: str = "") -> Router:
    """A router with the rule file ``rules`` and one upstream, ``name`` (``more``:
    further keys of its table)."""
    (tmp_path / "rules.toml").write_text(rules)
    return Router(tmp_path, extra=(
        '[routing]\nrules = "rules.toml"\n'
        f'[[destination]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {port}\n'
        f'ae_title = "{aet}"\n{more}'))


def _get_scp(ae_title: str, study: list[Path], *,
             syntaxes: list[str] | None = None) -> tuple[int, Any]:
    """A pynetdicom Study Root C-GET SCP on a free loopback port that sends
    ``study`` (CT, in ``syntaxes`` or pynetdicom's defaults) and stops when
    cancelled: (port, server)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    def on_get(event: Any) -> Any:
        yield len(study)
        for path in study:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, pydicom.dcmread(path)

    pacs = AE(ae_title=ae_title)
    pacs.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    pacs.add_supported_context(CTImageStorage, syntaxes, scu_role=True, scp_role=True)
    port = free_port()
    return port, pacs.start_server(("127.0.0.1", port), block=False,
                                   evt_handlers=[(evt.EVT_C_GET, on_get)])


def _get_requestor(port: int, on_store: Callable[[Any], int], *,
                   syntaxes: list[str] | None = None) -> Any:
    """A pynetdicom association to the router at ``port`` from VIEWER, for Study Root
    C-GET with CT in the SCP role (in ``syntaxes``), its C-STOREs to ``on_store``."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    viewer = AE(ae_title="VIEWER")
    viewer.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    viewer.add_requested_context(CTImageStorage, syntaxes)
    assoc = viewer.associate("127.0.0.1", port, ae_title="ROUTER",
                             ext_neg=[build_role(CTImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    return assoc


def _study_query(study: list[Path]) -> pydicom.Dataset:
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = str(pydicom.dcmread(study[0]).StudyInstanceUID)
    return query


def _find_scp(ae_title: str, on_find: Callable[[Any], Any]) -> tuple[int, Any]:
    """A pynetdicom Study Root C-FIND SCP on a free loopback port answering with
    ``on_find``: (its port, its server, to shut down)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    pacs = AE(ae_title=ae_title)
    pacs.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    return port, pacs.start_server(("127.0.0.1", port), block=False,
                                   evt_handlers=[(evt.EVT_C_FIND, on_find)])


def _without_move_originator(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's C-STOREs (its move SCP's sub-operations) without Move Originator
    AE Title and Message ID, as dcmjs-dimse sends them (both optional, PS3.7 Table
    9.3-1)."""
    from pynetdicom.association import Association

    plain_store = Association.send_c_store

    def store_without_originator(self: Any, dataset: Any, msg_id: int = 1,
                                 priority: int = 2, originator_aet: Any = None,
                                 originator_id: Any = None) -> Any:
        return plain_store(self, dataset, msg_id, priority)

    monkeypatch.setattr(Association, "send_c_store", store_without_originator)


def _proxy_router(tmp_path: Path, port: int, pacs_port: int, more: str) -> Router:
    """A router on ``port`` retrieving from PYPACS on ``pacs_port`` in proxy mode, and
    the destinations in ``more``."""
    (tmp_path / "rules.toml").write_text(RETRIEVE_ALL)
    return Router(tmp_path, port=port, extra=(
        '[routing]\nrules = "rules.toml"\n'
        f'[[destination]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
        'ae_title = "PYPACS"\nmove_mode = "proxy"\n' + more))


def _move_scp(ae_title: str, on_move: Callable[[Any], Any]) -> tuple[int, Any]:
    """A pynetdicom Study Root C-MOVE SCP on a free loopback port that sends CT in
    explicit little endian, answering with ``on_move``: (its port, its server)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove

    pacs = AE(ae_title=ae_title)
    pacs.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    pacs.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    port = free_port()
    return port, pacs.start_server(("127.0.0.1", port), block=False,
                                   evt_handlers=[(evt.EVT_C_MOVE, on_move)])


STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def _implicit(ds: pydicom.Dataset) -> bytes:
    """``ds`` encoded in Implicit VR Little Endian, as on the wire."""
    from router.dicom.dataset import encode_dataset

    return encode_dataset(ds, "1.2.840.10008.1.2")


QUERY_ALL = '[[rule]]\nname = "all queries"\n[rule.then]\nquery = ["pacs"]\n'
RETRIEVE_ALL = '[[rule]]\nname = "from the PACS"\n[rule.then]\nretrieve = ["pacs"]\n'


def _findscu(dcmtk: Dcmtk, port: int, aec: str, out: Path, *args: str) -> list[dict[str, str]]:
    """Run findscu writing each response to ``out``; the matches as sorted tag dicts."""
    out.mkdir()
    done = subprocess.run([dcmtk.findscu, "-aet", "VIEWER", "-aec", aec, "-X", "-od", str(out),
                           *args, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60, env=dcmtk_env())
    assert done.returncode == 0, done.stdout + done.stderr
    matches = []
    for path in sorted(out.iterdir()):
        ds = pydicom.dcmread(path, force=True)
        matches.append({str(e.tag): str(e.value) for e in ds if e.tag.group != 0x0002})
    return sorted(matches, key=lambda m: sorted(m.items()))


def _findscu_said(dcmtk: Dcmtk, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """findscu -v at study root as VIEWER to the router on ``port``, with ``args`` (keys,
    options); what it said is in stdout and stderr."""
    return subprocess.run([dcmtk.findscu, "-v", "-aet", "VIEWER", "-aec", "ROUTER", "-S", *args,
                           "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60, env=dcmtk_env())


LEVELS = [
    pytest.param(["-P", "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID",
                  "-k", "PatientName"], id="patient"),
    pytest.param(["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
                  "-k", "PatientID", "-k", "ModalitiesInStudy", "-k", "StudyDate"], id="study"),
    pytest.param(["-S", "-k", "QueryRetrieveLevel=SERIES", "-k", "StudyInstanceUID",
                  "-k", "SeriesInstanceUID", "-k", "Modality", "-k", "SeriesNumber"],
                 id="series"),
    pytest.param(["-S", "-k", "QueryRetrieveLevel=IMAGE", "-k", "SOPInstanceUID",
                  "-k", "InstanceNumber", "-k", "SeriesInstanceUID",
                  "-k", "StudyInstanceUID"], id="image"),
]


def test_findscu_through_the_router_equals_orthanc_directly(
        tmp_path: Path, dcmtk: Dcmtk, orthanc_server: Orthanc) -> None:
    _loaded(orthanc_server, tmp_path)
    router = _router(tmp_path, orthanc_server, QUERY_ALL)
    try:
        router.wait_for("ready: 2 workers serving")
        for n, level in enumerate(LEVELS):
            args = level.values[0]
            direct = _findscu(dcmtk, orthanc_server.dicom_port, orthanc_server.aet,
                              tmp_path / f"direct{n}", *args)
            proxied = _findscu(dcmtk, router.port, "ROUTER", tmp_path / f"proxied{n}", *args)
            assert direct, f"{level.id}: Orthanc found nothing: the test data is wrong"
            assert proxied == direct, level.id
    finally:
        router.stop()


def test_query_without_a_matching_rule_is_refused(tmp_path: Path, dcmtk: Dcmtk,
                                                  orthanc_server: Orthanc) -> None:
    router = _router(tmp_path, orthanc_server,
                     '[[rule]]\nname = "CT1 only"\n[rule.when]\ncalling_ae = "CT1"\n'
                     '[rule.then]\nquery = ["pacs"]\n')
    try:
        router.wait_for("ready: 2 workers serving")
        done = _findscu_said(dcmtk, router.port, "-k", "QueryRetrieveLevel=STUDY",
                             "-k", "StudyInstanceUID")
        assert "Failed: UnableToProcess" in done.stdout + done.stderr, done.stdout + done.stderr
        router.wait_for("no query rule matches")
    finally:
        router.stop()


def test_cancel_reaches_the_upstream(tmp_path: Path, dcmtk: Dcmtk) -> None:
    """findscu --cancel 1 through the router: the C-CANCEL reaches the upstream, which
    stops, and findscu gets Cancel. The upstream (pynetdicom) pauses between matches
    so that the cancel arrives mid-stream, whatever the machine's load."""
    import threading
    import time


    cancelled = threading.Event()
    sent = {"n": 0}

    def on_find(event: Any) -> Any:
        for n in range(1000):
            if event.is_cancelled:
                cancelled.set()
                yield 0xFE00, None
                return
            match = pydicom.Dataset()
            match.QueryRetrieveLevel = "IMAGE"
            match.SOPInstanceUID = f"1.2.3.{n}"
            sent["n"] += 1
            yield 0xFF00, match
            time.sleep(0.005)
        yield 0x0000, None

    port, server = _find_scp("PACS", on_find)
    router = _router_to(tmp_path, QUERY_ALL, port, "PACS")
    try:
        router.wait_for("ready: 2 workers serving")
        done = _findscu_said(dcmtk, router.port, "--cancel", "1",
                             "-k", "QueryRetrieveLevel=IMAGE", "-k", "SOPInstanceUID")
        assert done.returncode == 0, done.stdout + done.stderr
        router.wait_for("C-CANCEL of C-FIND")
        router.wait_for("status 0xFE00")
        assert cancelled.wait(10)  # the upstream was told, and stopped
    finally:
        router.stop()
        server.shutdown()
    assert sent["n"] < 1000


def test_an_upstream_ignoring_cancel_is_aborted_and_the_requestor_gets_cancel(
        tmp_path: Path, dcmtk: Dcmtk) -> None:
    """An upstream that goes on streaming matches after C-CANCEL: once its
    ``timeout`` (1 s here) has passed since the cancel, the router aborts it and
    answers Cancel (FE00H). It used to wait for the router-wide operation limit
    (an hour by default), the matches thrown away and findscu waiting."""
    import threading
    import time

    stop = threading.Event()

    def on_find(event: Any) -> Any:
        for n in range(100_000):  # deaf to C-CANCEL: never looks at event.is_cancelled
            if stop.is_set():
                break
            match = pydicom.Dataset()
            match.QueryRetrieveLevel = "IMAGE"
            match.SOPInstanceUID = f"1.2.3.{n}"
            yield 0xFF00, match
            time.sleep(0.01)
        yield 0x0000, None

    port, server = _find_scp("PACS", on_find)
    router = _router_to(tmp_path, QUERY_ALL, port, "PACS", more="timeout = 1\n")
    try:
        router.wait_for("ready: 2 workers serving")
        done = _findscu_said(dcmtk, router.port, "--cancel", "1",
                             "-k", "QueryRetrieveLevel=IMAGE", "-k", "SOPInstanceUID")
        out = done.stdout + done.stderr
        assert done.returncode == 0, out
        assert "Received Final Find Response (Cancel" in out, out
        router.wait_for("no final response within 1 s of C-CANCEL: aborting")
    finally:
        stop.set()
        router.stop()
        server.shutdown()


def test_a_requestor_that_does_not_read_holds_the_upstream_back(tmp_path: Path) -> None:
    """A viewer that sends a C-FIND and stops reading: the router stops reading the
    upstream's matches too (TCP flow control end to end) instead of piling them up
    in the worker -- 10 KB a match, a worker grew to 1.1 GB in a minute. Here the
    upstream offers 2,000 matches of 50 KB (100 MB); the worker must not grow by
    more than what the sockets between hold."""
    import socket
    import threading

    import psutil

    from tests.faults.test_actor_faults import associate_rq, command, p_data

    offered, stop = threading.Event(), threading.Event()

    def on_find(event: Any) -> Any:
        for n in range(2_000):  # pynetdicom queues them all at once, whoever reads
            if stop.is_set():
                break
            match = pydicom.Dataset()
            match.QueryRetrieveLevel = "STUDY"
            match.StudyInstanceUID = f"1.2.3.{n}"
            match.add_new(0x00091010, "OB", bytes(50_000))
            yield 0xFF00, match
        offered.set()
        yield 0x0000, None

    port, server = _find_scp("PACS", on_find)
    router = _router_to(tmp_path, QUERY_ALL, port, "PACS")
    sock = socket.socket()
    try:
        router.wait_for("ready: 2 workers serving")
        workers = psutil.Process(router.proc.pid).children()
        before = sum(w.memory_info().rss for w in workers)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", router.port))
        sock.sendall(associate_rq(abstract=STUDY_FIND))
        assert sock.recv(1)[0] == 0x02  # A-ASSOCIATE-AC; the rest is never read
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        sock.sendall(p_data(command(AffectedSOPClassUID=STUDY_FIND, CommandField=0x0020,
                                    MessageID=1, Priority=0, CommandDataSetType=0))
                     + p_data(_implicit(query), is_command=False))
        assert offered.wait(30)
        grew = 0
        for _ in range(40):  # 8 s: the old worker had taken the 100 MB in 1 or 2
            grew = sum(w.memory_info().rss for w in workers) - before
            if grew > 50 << 20 or stop.wait(0.2):
                break
        assert grew < 50 << 20, f"workers grew by {grew >> 20} MB"
    finally:
        stop.set()
        sock.close()
        router.stop()
        server.shutdown()


def test_a_move_upstream_ignoring_cancel_is_aborted_with_the_counts_so_far(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """A C-MOVE upstream that goes on after C-CANCEL is aborted once its ``timeout``
    has passed, and the requestor gets Cancel (FE00H) with the counts it was last
    told, not a failure and not an hour later."""
    import threading
    import time

    sink = storescp_server(tmp_path, procs, aet="VIEWER_SCP", args=["+B"], dcmtk=dcmtk)
    study = make_study(tmp_path / "study", n_series=1, n_instances=2, size_kb=4, seed=15)
    instance = pydicom.dcmread(study[0])
    stop = threading.Event()

    def on_move(event: Any) -> Any:
        yield "127.0.0.1", sink.port
        yield 10_000
        for _ in range(10_000):  # deaf to C-CANCEL
            if stop.is_set():
                return
            yield 0xFF00, instance
            time.sleep(0.02)

    pacs_port, server = _move_scp("PYPACS", on_move)
    (tmp_path / "rules.toml").write_text(RETRIEVE_ALL)
    router = Router(tmp_path, extra=(
        '[routing]\nrules = "rules.toml"\n'
        f'[[destination]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
        'ae_title = "PYPACS"\ntimeout = 1\n'
        f'[[destination]]\nname = "viewer"\nhost = "127.0.0.1"\nport = {sink.port}\n'
        'ae_title = "VIEWER_SCP"\n'))
    try:
        router.wait_for("ready: 2 workers serving")
        done = subprocess.run([dcmtk.movescu, "-d", "-S", "--cancel", "2", "-aet", "VIEWER",
                               "-aec", "ROUTER", "-aem", "VIEWER_SCP",
                               "-k", "QueryRetrieveLevel=STUDY",
                               "-k", f"StudyInstanceUID={instance.StudyInstanceUID}",
                               "127.0.0.1", str(router.port)],
                              capture_output=True, text=True, timeout=60, env=dcmtk_env())
        out = done.stdout + done.stderr
        assert done.returncode == 0, out
        router.wait_for("no final response within 1 s of C-CANCEL: aborting")
    finally:
        stop.set()
        router.stop()
        server.shutdown()
    final = out[out.index("Received Final Move Response"):]
    assert "DIMSE Status                  : 0xfe00: Cancel" in final, final
    # The counts of the last pending response came along (the cancel went after the
    # second one, so at least one sub-operation was completed).
    completed = int(final.split("Completed Suboperations       :")[1].split()[0])
    assert completed >= 1, final


def _two_upstreams(tmp_path: Path, orthanc: Orthanc, name: str, port: int,
                   aet: str) -> Router:
    """A router querying ``orthanc`` (as "pacs") and a second upstream, ``name``."""
    rules = f'[[rule]]\nname = "both"\n[rule.then]\nquery = ["pacs", "{name}"]\n'
    return _router_to(tmp_path, rules, orthanc.dicom_port, orthanc.aet,
                      more=(f'[[destination]]\nname = "{name}"\nhost = "127.0.0.1"\n'
                            f'port = {port}\nae_title = "{aet}"\n'))


def test_two_upstreams_are_merged_without_duplicates(
        tmp_path: Path, dcmtk: Dcmtk, procs: Procs, orthanc_server: Orthanc) -> None:
    second = start_orthanc(procs, tmp_path / "orthanc2", aet="ORTHANC2")
    shared = make_study(tmp_path / "shared", n_series=1, n_instances=2, size_kb=4,
                        patient_id="P1", seed=1)
    only_second = [*make_study(tmp_path / "second", n_series=1, n_instances=2, size_kb=4,
                               patient_id="P2", seed=2),
                   *make_study(tmp_path / "third", n_series=1, n_instances=1, size_kb=4,
                               patient_id="P1", seed=3),
                   *make_study(tmp_path / "fourth", n_series=1, n_instances=1, size_kb=4,
                               patient_id="P1", seed=4)]
    for path in shared:
        orthanc_server.upload(path)
        second.upload(path)
    for path in only_second:
        second.upload(path)
    router = _two_upstreams(tmp_path, orthanc_server, "pacs2", second.dicom_port, second.aet)
    args = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientID"]
    # Without the unique key: the two studies of P1 return the same values. They were
    # taken for one study (an outside campaign: 11 studies came back as 4, Success).
    keyless = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID"]
    try:
        router.wait_for("ready: 2 workers serving")
        merged = _findscu(dcmtk, router.port, "ROUTER", tmp_path / "merged", *args)
        merged_keyless = _findscu(dcmtk, router.port, "ROUTER", tmp_path / "keyless",
                                  *keyless)
    finally:
        router.stop()
    second_direct = _findscu(dcmtk, second.dicom_port, second.aet, tmp_path / "d2", *args)
    # The second PACS has all four studies; whichever copy of the shared one came
    # second is dropped. (Retrieve AE Title says which PACS answered first, so it is
    # left out.)
    def studies(matches: list[dict[str, str]]) -> list[tuple[str, str]]:
        return sorted((m["(0010,0020)"], m["(0020,000D)"]) for m in matches)

    assert len(merged) == 4 and studies(merged) == studies(second_direct)
    # The key the router asked for to merge them is not passed on: not asked for.
    assert sorted(m["(0010,0020)"] for m in merged_keyless) == ["P1", "P1", "P1", "P2"]
    assert not [m for m in merged_keyless if "(0020,000D)" in m], merged_keyless
    direct_keyless = _findscu(dcmtk, second.dicom_port, second.aet, tmp_path / "d3", *keyless)
    for m in [*merged_keyless, *direct_keyless]:
        m.pop("(0008,0054)", None)
    assert merged_keyless == direct_keyless


def test_matches_name_the_router_as_retrieve_ae_when_it_retrieves_too(
        tmp_path: Path, dcmtk: Dcmtk, orthanc_server: Orthanc) -> None:
    """A viewer that moves from the Retrieve AE Title of a match must come back through
    the router when the router retrieves for it; with a query rule only, the match
    says what Orthanc says."""
    _loaded(orthanc_server, tmp_path)
    args = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
            "-k", "RetrieveAETitle", "-k", "PatientID"]
    direct = _findscu(dcmtk, orthanc_server.dicom_port, orthanc_server.aet,
                      tmp_path / "direct", *args)
    assert direct and all("(0008,0054)" in m for m in direct)
    router = _router(tmp_path, orthanc_server, QUERY_ALL.replace(
        'query = ["pacs"]', 'query = ["pacs"]\nretrieve = ["pacs"]'))
    try:
        router.wait_for("ready: 2 workers serving")
        proxied = _findscu(dcmtk, router.port, "ROUTER", tmp_path / "proxied", *args)
        (tmp_path / "rules.toml").write_text(QUERY_ALL)
        assert router.command("reload").returncode == 0
        for w in (1, 2):
            router.wait_for(f"worker {w}: configuration generation 2 loaded")
        query_only = _findscu(dcmtk, router.port, "ROUTER", tmp_path / "query-only", *args)
    finally:
        router.stop()
    assert {m["(0008,0054)"] for m in proxied} == {"ROUTER"}
    for m in [*proxied, *direct]:
        del m["(0008,0054)"]
    assert proxied == direct
    assert query_only == _findscu(dcmtk, orthanc_server.dicom_port, orthanc_server.aet,
                                  tmp_path / "direct-again", *args)


def test_two_upstreams_one_down_is_a_failure_after_the_others_matches(
        tmp_path: Path, dcmtk: Dcmtk, orthanc_server: Orthanc) -> None:
    """A list missing a PACS must not pass for complete: findscu gets Orthanc's
    matches, then a failure naming the upstream that did not answer."""
    _loaded(orthanc_server, tmp_path)
    router = _two_upstreams(tmp_path, orthanc_server, "down", free_port(), "DOWN")
    try:
        router.wait_for("ready: 2 workers serving")
        done = _findscu_said(dcmtk, router.port, "-d", "-k", "QueryRetrieveLevel=STUDY",
                             "-k", "StudyInstanceUID", "-k", "PatientID")
        router.wait_for("upstream failed with 0xA700")
        # The summary names the PACS that answered as the source, the other as failed.
        router.wait_for("3 match(es) from pacs; failed: down (0xA700), status 0xA700")
        # Our own find tool says what the router said of it (it printed the status only).
        ours = subprocess.run(
            [sys.executable, "-m", "router.cli", "find", "127.0.0.1", str(router.port),
             "-aet", "VIEWER", "-aec", "ROUTER", "-L", "STUDY", "-k", "StudyInstanceUID"],
            capture_output=True, text=True, timeout=60, check=False)
        assert ours.returncode == 1, ours
        assert ours.stdout.splitlines()[-1] == (
            "C-FIND: 3 results, final status 0xA700 (1 of 2 upstreams failed: down "
            "(0xA700))"), ours.stdout
    finally:
        router.stop()
    said = done.stdout + done.stderr
    assert said.count("Received Find Response ") == 3, said
    assert said.count("0xff00: Pending") == 3, said
    assert "0xa700: Refused" in said and "[1 of 2 upstreams failed: down (0xA700)]" in said, said


def _moved(port: int, study_uid: str, destination: str = "VIEWER_SCP") -> list[Any]:
    """The responses to a Study Root C-MOVE of ``study_uid`` to ``destination``, asked
    of the router on ``port`` with our own client."""
    from router.net.client import connect

    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    contexts = [("1.2.840.10008.5.1.4.1.2.2.2", ["1.2.840.10008.1.2.1"])]
    with connect("127.0.0.1", port, calling_ae="VIEWER", called_ae="ROUTER",
                 contexts=contexts, dimse_timeout=60) as assoc:
        responses = list(assoc.move(query, destination))
        assoc.release()
    return responses


def _move_setup(tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> tuple[Any, Orthanc, Router]:
    sink = storescp_server(tmp_path, procs, aet="VIEWER_SCP", args=["+B"], dcmtk=dcmtk)
    pacs = start_orthanc(procs, tmp_path / "pacs",
                         modalities={"viewer": ("VIEWER_SCP", "127.0.0.1", sink.port)})
    (tmp_path / "rules.toml").write_text(RETRIEVE_ALL)
    router = Router(tmp_path, extra=(
        '[routing]\nrules = "rules.toml"\n'
        f'[[destination]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
        f'ae_title = "{pacs.aet}"\n'
        f'[[destination]]\nname = "viewer"\nhost = "127.0.0.1"\nport = {sink.port}\n'
        'ae_title = "VIEWER_SCP"\n'))
    return sink, pacs, router


def test_movescu_through_the_router_delivers_the_study_with_counts(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    from router.net.client import connect

    sink, pacs, router = _move_setup(tmp_path, procs, dcmtk)
    study = make_study(tmp_path / "study", n_series=2, n_instances=3, size_kb=8, seed=7)
    for path in study:
        pacs.upload(path)
    uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
    try:
        router.wait_for("ready: 2 workers serving")
        done = subprocess.run([dcmtk.movescu, "-v", "-S", "-aet", "VIEWER", "-aec", "ROUTER",
                               "-aem", "VIEWER_SCP", "-k", "QueryRetrieveLevel=STUDY",
                               "-k", f"StudyInstanceUID={uid}", "127.0.0.1", str(router.port)],
                              capture_output=True, text=True, timeout=60, env=dcmtk_env())
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Received Final Move Response (Success)" in done.stdout + done.stderr
        got = sorted(_uid(p) for p in received_files(sink.outdir))
        assert got == sorted(_uid(p) for p in study)
        # The counts, through our own client: pending ones count down, the final adds up.
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = uid
        contexts = [("1.2.840.10008.5.1.4.1.2.2.2", ["1.2.840.10008.1.2.1"])]
        with connect("127.0.0.1", router.port, calling_ae="VIEWER", called_ae="ROUTER",
                     contexts=contexts) as assoc:
            responses = list(assoc.move(query, "VIEWER_SCP"))
            assoc.release()
        final = responses[-1]
        assert final.status == 0x0000 and final.number_of_completed_sub_operations == 6
        assert final.number_of_failed_sub_operations in (0, None)
        pending = [r for r in responses[:-1] if r.status == 0xFF00]
        assert pending and all(
            r.number_of_remaining_sub_operations + r.number_of_completed_sub_operations == 6
            for r in pending)
    finally:
        router.stop()


def test_retrieve_asks_each_upstream_in_turn_until_one_has_the_study(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """``retrieve = ["down", "pacs", "archive"]``: a study only the archive holds is
    moved (C-MOVE) and got (C-GET) from it, past an upstream that cannot be reached
    and one that does not have it. Only the first named used to be asked: C-FIND
    listed the archive's study, and retrieving it failed. A study nobody holds gets
    the failure of the unreachable one, not an empty success."""
    sink = storescp_server(tmp_path, procs, aet="VIEWER_SCP", args=["+B"], dcmtk=dcmtk)
    viewer = {"viewer": ("VIEWER_SCP", "127.0.0.1", sink.port)}
    pacs = start_orthanc(procs, tmp_path / "pacs", aet="PACS", modalities=viewer)
    archive = start_orthanc(procs, tmp_path / "archive", aet="ARCHIVE", modalities=viewer)
    pacs.upload(make_study(tmp_path / "recent", n_series=1, n_instances=2, size_kb=4,
                           seed=21)[0])
    study = make_study(tmp_path / "old", n_series=2, n_instances=2, size_kb=4, seed=22)
    for path in study:
        archive.upload(path)
    uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "anywhere"\n[rule.then]\nretrieve = ["down", "pacs", "archive"]\n')
    router = Router(tmp_path, extra=(
        '[routing]\nrules = "rules.toml"\n'
        f'[[destination]]\nname = "down"\nhost = "127.0.0.1"\nport = {free_port()}\n'
        'ae_title = "DOWN"\n'
        f'[[destination]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
        'ae_title = "PACS"\n'
        f'[[destination]]\nname = "archive"\nhost = "127.0.0.1"\nport = {archive.dicom_port}\n'
        'ae_title = "ARCHIVE"\n'
        f'[[destination]]\nname = "viewer"\nhost = "127.0.0.1"\nport = {sink.port}\n'
        'ae_title = "VIEWER_SCP"\n'))
    got = tmp_path / "got"
    got.mkdir()

    def retrieve(tool: str, study_uid: str, *args: str) -> str:
        done = subprocess.run([tool, "-v", "-S", "-aet", "VIEWER", "-aec", "ROUTER", *args,
                               "-k", "QueryRetrieveLevel=STUDY",
                               "-k", f"StudyInstanceUID={study_uid}",
                               "127.0.0.1", str(router.port)],
                              capture_output=True, text=True, timeout=120, env=dcmtk_env())
        return done.stdout + done.stderr

    try:
        router.wait_for("ready: 2 workers serving")
        moved = retrieve(dcmtk.movescu, uid, "-aem", "VIEWER_SCP")
        fetched = retrieve(dcmtk.getscu, uid, "-od", str(got))
        nowhere = retrieve(dcmtk.movescu, "1.2.3.999", "-aem", "VIEWER_SCP")
        told = _moved(router.port, "1.2.3.999")[-1]
        router.wait_for("retrieved nothing: asking archive")
    finally:
        router.stop()
    assert "Received Final Move Response (Success)" in moved, moved
    assert sorted(_uid(p) for p in received_files(sink.outdir)) == \
        sorted(_uid(p) for p in study)
    assert "Received C-GET Response (Success)" in fetched, fetched
    assert "Number of Completed Suboperations : 4" in fetched, fetched
    assert sorted(_uid(p) for p in got.iterdir()) == sorted(_uid(p) for p in study)
    # Nowhere to be found, and one upstream could not be asked: that failure, named.
    assert "Received Final Move Response (Refused: OutOfResourcesSubOperations)" in nowhere, \
        nowhere
    assert told.status == 0xA702 and told.error_comment.startswith("down: "), told


def test_move_to_an_unknown_destination_is_refused_a801(tmp_path: Path, procs: Procs,
                                                        dcmtk: Dcmtk) -> None:
    _, _, router = _move_setup(tmp_path, procs, dcmtk)
    try:
        router.wait_for("ready: 2 workers serving")
        done = subprocess.run([dcmtk.movescu, "-v", "-S", "-aet", "VIEWER", "-aec", "ROUTER",
                               "-aem", "NOBODY", "-k", "QueryRetrieveLevel=STUDY",
                               "-k", "StudyInstanceUID=1.2.3", "127.0.0.1", str(router.port)],
                              capture_output=True, text=True, timeout=60, env=dcmtk_env())
        out = done.stdout + done.stderr
        assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in out, out
        router.wait_for("unknown destination 'NOBODY' refused")
    finally:
        router.stop()


def test_cancel_mid_move_stops_it(tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    sink, pacs, router = _move_setup(tmp_path, procs, dcmtk)
    # Enough sub-operations that the cancel, sent after the first response, lands
    # before the end even on a loaded machine.
    study = make_study(tmp_path / "study", n_series=1, n_instances=400, size_kb=4, seed=8)
    for path in study:
        pacs.upload(path)
    uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
    try:
        router.wait_for("ready: 2 workers serving")
        done = subprocess.run([dcmtk.movescu, "-v", "-S", "--cancel", "1", "-aet", "VIEWER",
                               "-aec", "ROUTER", "-aem", "VIEWER_SCP",
                               "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}",
                               "127.0.0.1", str(router.port)],
                              capture_output=True, text=True, timeout=120, env=dcmtk_env())
        out = done.stdout + done.stderr
        assert done.returncode == 0, out
        router.wait_for("C-CANCEL of C-MOVE")
        assert "Received Final Move Response (Cancel: SubOperationsTerminated" in out, out
    finally:
        router.stop()
    # Stopped before the end: not every instance was moved.
    assert len(received_files(sink.outdir)) < 400


def test_an_upstream_that_dies_mid_move_is_answered_with_the_counts_so_far(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """Orthanc killed after its first pending response: the requestor's final answer
    is a failure that keeps what it was told was done, counts the rest as failed,
    and says how far it got (it was A702H "refused" with no counts at all)."""
    from router.net.client import connect

    sink, pacs, router = _move_setup(tmp_path, procs, dcmtk)
    study = make_study(tmp_path / "study", n_series=1, n_instances=200, size_kb=4, seed=13)
    for path in study:
        pacs.upload(path)
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = str(pydicom.dcmread(study[0]).StudyInstanceUID)
    try:
        router.wait_for("ready: 2 workers serving")
        contexts = [("1.2.840.10008.5.1.4.1.2.2.2", ["1.2.840.10008.1.2.1"])]
        responses = []
        with connect("127.0.0.1", router.port, calling_ae="VIEWER", called_ae="ROUTER",
                     contexts=contexts, dimse_timeout=60) as assoc:
            for rsp in assoc.move(query, "VIEWER_SCP"):
                if not responses:
                    pacs.kill()
                responses.append(rsp)
            assoc.release()
        router.wait_for("broke off after")
    finally:
        router.stop()
    *pending, final = responses
    assert pending and all(r.status == 0xFF00 for r in pending)
    last_pending = pending[-1]
    assert final.status == 0xC001, final
    told = (last_pending.number_of_completed_sub_operations,
            last_pending.number_of_failed_sub_operations or 0,
            last_pending.number_of_warning_sub_operations or 0)
    assert (final.number_of_completed_sub_operations,
            final.number_of_warning_sub_operations) == (told[0], told[2])
    assert final.number_of_failed_sub_operations == 200 - told[0] - told[2]
    assert final.number_of_remaining_sub_operations is None
    assert "pacs broke off after" in (final.error_comment or "")
    # What was reported completed did arrive.
    assert len(received_files(sink.outdir)) >= told[0]


@pytest.mark.parametrize("proposal", [
    pytest.param([], id="default"),
    # JPEG Lossless first, then the native ones: the router takes a native one for
    # what it relays, which any upstream can send (it took JPEG and got nothing).
    pytest.param(["+xs"], id="jpeg-lossless-first"),
    pytest.param(["+xb"], id="big-endian-first"),
    pytest.param(["+xi"], id="implicit-only"),
])
def test_getscu_through_the_router_receives_the_study_on_its_own_association(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk, proposal: list[str]) -> None:
    _, pacs, router = _move_setup(tmp_path, procs, dcmtk)
    study = make_study(tmp_path / "study", n_series=2, n_instances=3, size_kb=8, seed=9)
    for path in study:
        pacs.upload(path)
    uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
    out = tmp_path / "got"
    out.mkdir()
    try:
        router.wait_for("ready: 2 workers serving")
        done = subprocess.run([dcmtk.getscu, "-v", "-S", *proposal,
                               "-aet", "VIEWER", "-aec", "ROUTER",
                               "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                               "-k", f"StudyInstanceUID={uid}", "127.0.0.1", str(router.port)],
                              capture_output=True, text=True, timeout=60, env=dcmtk_env())
        log = done.stdout + done.stderr
        assert done.returncode == 0, log
        # The final counts are the requestor's own answers, relayed through the upstream.
        assert "Received C-GET Response (Success)" in log, log
        assert "Number of Completed Suboperations : 6" in log, log
        assert "Number of Failed Suboperations    : 0" in log, log
        router.wait_for("instance(s) relayed, status 0x0000")
    finally:
        router.stop()
    got = {_uid(p): p for p in out.iterdir()}
    assert sorted(got) == sorted(_uid(p) for p in study)
    for src in study:  # the same elements and pixel values, in whatever native syntax
        same_content(pydicom.dcmread(got[_uid(src)]), src)


def test_getscu_refusing_one_instance_gets_orthancs_final_counts_through_the_router(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """getscu proposes uncompressed syntaxes only and Orthanc 1.10 cannot decode JPEG
    2000, so the JPEG 2000 instance of the study is a failed sub-operation. Orthanc's
    final C-GET-RSP then carries Failed SOP Instance UID List (0008,0058) in its
    command set, outside group 0000 (PS3.7 6.3.1). The
    router read that as an undecodable command, aborted Orthanc and answered A702
    with no counts although the instances had arrived; now getscu gets the same final
    status and counts through the router as from Orthanc directly."""
    _, pacs, router = _move_setup(tmp_path, procs, dcmtk)
    study = make_study(tmp_path / "study", n_series=1, n_instances=2, size_kb=8, seed=4)
    j2k = pydicom.dcmread(next(p for p in pydicom_test_files()
                                if p.name == "MR_small_jp2klossless.dcm"))
    uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
    j2k.StudyInstanceUID = uid
    j2k.PatientID = pydicom.dcmread(study[0]).PatientID
    j2k.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    for path in [*study, tmp_path / "j2k.dcm"]:
        pacs.upload(path)

    seen: list[bool] = []  # whether the final response had (0008,0058)

    def get(port: int, called: str, out: Path) -> str:
        out.mkdir()
        done = subprocess.run([dcmtk.getscu, "-d", "-S", "-aet", "VIEWER", "-aec", called,
                               "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                               "-k", f"StudyInstanceUID={uid}", "127.0.0.1", str(port)],
                              capture_output=True, text=True, timeout=60, env=dcmtk_env())
        log = done.stdout + done.stderr
        final = log[log.rindex("Received C-GET Response"):]
        seen.append("(0008,0058)" in final)
        return "\n".join(line for line in final.splitlines()
                         if "C-GET Response" in line or "Suboperations" in line)

    try:
        router.wait_for("ready: 2 workers serving")
        direct = get(pacs.dicom_port, pacs.aet, tmp_path / "direct")
        via = get(router.port, "ROUTER", tmp_path / "via")
    finally:
        router.stop()
    # Orthanc stops at its first failure: how many were done first depends on its order.
    assert "Number of Failed Suboperations    : 1" in direct, direct
    assert via == direct
    assert seen[0], "Orthanc's final response has no (0008,0058) any more: test it otherwise"
    assert "undecodable" not in router.log(), router.log()
    assert sorted(p.name for p in (tmp_path / "via").iterdir()) == \
        sorted(p.name for p in (tmp_path / "direct").iterdir())


def test_c_get_converts_what_the_upstream_sends_to_the_requestors_syntax(
        tmp_path: Path) -> None:
    """The upstream (pynetdicom) sends CT only in Explicit VR LE; the requestor (also
    pynetdicom) takes CT only in Implicit VR LE. The router proposes both upstream and
    converts each instance on the way: the same elements and pixel values arrive.
    Each sub-operation carries the C-GET's priority, HIGH (PS3.4 C.4.3.1.2), not the
    upstream's LOW (pynetdicom's own for its sub-operations): an outside conformance
    campaign found the upstream's relayed."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    study = make_study(tmp_path / "study", n_series=1, n_instances=3, size_kb=8, seed=5)

    port, server = _get_scp("EXPLPACS", study, syntaxes=[pydicom.uid.ExplicitVRLittleEndian])
    router = _router_to(tmp_path, RETRIEVE_ALL, port, "EXPLPACS")
    received: list[pydicom.Dataset] = []
    priorities: list[int] = []

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        priorities.append(int(event.request.Priority))
        return 0x0000

    try:
        router.wait_for("ready: 2 workers serving")
        assoc = _get_requestor(router.port, on_store,
                               syntaxes=[pydicom.uid.ImplicitVRLittleEndian])
        statuses = [int(status.Status) for status, _ in
                    assoc.send_c_get(_study_query(study),
                                     StudyRootQueryRetrieveInformationModelGet, priority=1)]
        assoc.release()
        assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    finally:
        router.stop()
        server.shutdown()
    assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(_uid(p) for p in study)
    assert priorities == [1] * len(study)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in received}
    for src in study:
        got = by_uid[_uid(src)]
        assert got.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
        assert got.original_encoding == (True, True)
        del got.file_meta
        same_content(got, src)


def test_each_c_get_sub_operation_that_fails_says_why_in_the_log(tmp_path: Path) -> None:
    """The requestor refuses one instance (A700H) and takes one with a warning
    (B000H). The final response counts them and lists the failed UID, but the log
    said nothing of which failed or why; and a C-STORE-RSP nobody waits for (here: one
    the requestor sends twice) was dropped without a word."""
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    study = make_study(tmp_path / "study", n_series=1, n_instances=3, size_kb=8, seed=7)
    refused, warned = _uid(study[1]), _uid(study[2])

    port, server = _get_scp("GETPACS", study)
    router = _router_to(tmp_path, RETRIEVE_ALL, port, "GETPACS")

    def on_store(event: Any) -> int:
        uid = event.request.AffectedSOPInstanceUID
        return 0xA700 if uid == refused else 0xB000 if uid == warned else 0x0000

    try:
        router.wait_for("ready: 2 workers serving")
        assoc = _get_requestor(router.port, on_store)
        final = [status for status, _ in assoc.send_c_get(
            _study_query(study), StudyRootQueryRetrieveInformationModelGet)][-1]
        assert final.Status == 0xB000 and final.NumberOfFailedSuboperations == 1, final
        # A C-STORE-RSP to a message of ours that is over (PS3.7 9.3.1.2).
        from pynetdicom.dimse_primitives import C_STORE
        primitive = C_STORE()
        primitive.MessageIDBeingRespondedTo = 4242
        primitive.AffectedSOPClassUID = CTImageStorage
        primitive.AffectedSOPInstanceUID = refused
        primitive.Status = 0x0000
        context = next(c for c in assoc.accepted_contexts
                       if c.abstract_syntax == CTImageStorage)
        assoc.dimse.send_msg(primitive, context.context_id)
        router.wait_for("C-STORE-RSP to message 4242 (status 0x0000), which no C-STORE of "
                        "ours waits for: ignored")
        assoc.release()
    finally:
        router.stop()
        server.shutdown()
    line = router.lines[router.wait_for(f"sub-operation {refused} status 0xA700")]
    assert "the requestor's answer" in line, line
    router.wait_for(f"sub-operation {warned} status 0xB000")
    assert router.count("sub-operation ") == 2, router.log()


def test_a_release_sent_behind_a_c_get_ends_it_then_releases(tmp_path: Path) -> None:
    """A C-GET and an A-RELEASE-RQ in one write (a review of the held release): the
    requestor, in Sta7, may send no C-STORE-RSP, so holding the release while the
    router sent sub-operations ended in an abort or a timeout. The C-GET now stops
    its sub-operations and ends (Cancel, with its counts), then the A-RELEASE-RP."""
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    from router.dicom.negotiation import build_request
    from router.dicom.pdu import encode_pdu

    study = make_study(tmp_path / "study", n_series=1, n_instances=20, size_kb=64, seed=6)

    port, server = _get_scp("GETPACS", study)
    router = _router_to(tmp_path, RETRIEVE_ALL, port, "GETPACS")
    get = StudyRootQueryRetrieveInformationModelGet
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = str(pydicom.dcmread(study[0]).StudyInstanceUID)
    rq = encode_pdu(build_request(
        calling_ae_title="VIEWER", called_ae_title="ROUTER",
        contexts=[(get, [pydicom.uid.ImplicitVRLittleEndian]),
                  (CTImageStorage, [pydicom.uid.ImplicitVRLittleEndian])],
        roles={CTImageStorage: (False, True)}))
    pdus = _request_then_release(router, server, rq, get, 0x0010, query)
    assert pdus[-1][0] == 0x06, [kind for kind, _ in pdus]  # A-RELEASE-RP, not an abort
    commands = [_command_of(body) for kind, body in pdus if kind == 0x04 and body[5] & 1]
    finals = [c for c in commands if int(c.CommandField) == 0x8010
              and int(c.Status) not in (0xFF00, 0xFF01)]
    assert len(finals) == 1 and int(finals[0].Status) == 0xFE00, finals
    assert "NumberOfCompletedSuboperations" in finals[0]


def test_a_requestor_aborting_during_a_c_get_frees_the_upstream_at_once(
        tmp_path: Path) -> None:
    """The requestor aborts while a C-STORE sub-operation waits for its answer: nobody
    can answer it now. The sub-operation waited for the upstream's timeout (60 s
    here) before failing, while the PACS, blocked on it, could not act on the
    C-CANCEL: one of its associations held for that long per aborting viewer (an
    outside Q/R campaign). It fails at once, and the C-GET ends, letting the
    upstream go."""
    import socket

    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    from router.dicom.negotiation import build_request
    from router.dicom.pdu import encode_pdu
    from tests.faults.test_actor_faults import ABORT, command, p_data, read_pdu

    study = make_study(tmp_path / "study", n_series=1, n_instances=20, size_kb=16, seed=8)
    port, server = _get_scp("GETPACS", study)
    router = _router_to(tmp_path, RETRIEVE_ALL, port, "GETPACS", more="timeout = 60\n")
    get = StudyRootQueryRetrieveInformationModelGet
    rq = encode_pdu(build_request(
        calling_ae_title="VIEWER", called_ae_title="ROUTER",
        contexts=[(get, [pydicom.uid.ImplicitVRLittleEndian]),
                  (CTImageStorage, [pydicom.uid.ImplicitVRLittleEndian])],
        roles={CTImageStorage: (False, True)}))
    try:
        router.wait_for("ready: 2 workers serving")
        with socket.create_connection(("127.0.0.1", router.port), timeout=30) as sock:
            sock.sendall(rq)
            assert read_pdu(sock)[0] == 0x02
            sock.sendall(p_data(command(AffectedSOPClassUID=get, CommandField=0x0010,
                                        MessageID=1, Priority=0, CommandDataSetType=0x0000))
                         + p_data(_implicit(_study_query(study)), is_command=False))
            while True:  # up to the first C-STORE-RQ's command, left unanswered
                kind, body = read_pdu(sock)
                assert kind == 0x04, kind
                if body[5] & 1 and int(_command_of(body).CommandField) == 0x0001:
                    break
            sock.sendall(ABORT)
        # Well inside the upstream's 60 s: the sub-operation failed at once.
        line = router.lines[router.wait_for("C-GET w", timeout=20)]
        assert "the requestor's association ended" in line, line
    finally:
        router.stop()
        server.shutdown()


def test_an_upstream_that_never_answers_is_failed_after_the_operation_timeout(
        tmp_path: Path) -> None:
    import threading

    from router.net.client import connect

    release = threading.Event()

    def on_find(event: Any) -> Any:
        release.wait(30)  # a PACS that hangs
        yield 0x0000, None

    port, server = _find_scp("SLOWPACS", on_find)
    (tmp_path / "rules.toml").write_text(QUERY_ALL)
    # Appended to the router's [timeouts] table by the Router helper.
    router = Router(tmp_path, extra=(
        'operation = 2\n[routing]\nrules = "rules.toml"\n'
        f'[[destination]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {port}\n'
        'ae_title = "SLOWPACS"\ntimeout = 60\n'))
    try:
        router.wait_for("ready: 2 workers serving")
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        contexts = [("1.2.840.10008.5.1.4.1.2.2.1", ["1.2.840.10008.1.2.1"])]
        with connect("127.0.0.1", router.port, calling_ae="VIEWER", called_ae="ROUTER",
                     contexts=contexts, dimse_timeout=30) as assoc:
            responses = list(assoc.find(query))
            assoc.release()
        status, _ = responses[-1]
        assert status == 0xA700 and len(responses) == 1
        router.wait_for("no final answer from upstream in 2 s")
    finally:
        release.set()
        router.stop()
        server.shutdown()


def _proxied_move_setup(tmp_path: Path, procs: Procs, on_store: Callable[[Any], int], *,
                        seed: int, viewer: str = "") -> tuple[list[Path], Any, Router]:
    """Orthanc holding a study of 6 CTs, as the proxy-mode upstream "pacs" of a router
    whose "viewer" (more keys: ``viewer``) is a pynetdicom SCP answering ``on_store``:
    the study, the viewer's server and the router (starting)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    router_port = free_port()
    scp = AE(ae_title="VIEWER_SCP")
    scp.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    viewer_port = free_port()
    viewer_server = scp.start_server(("127.0.0.1", viewer_port), block=False,
                                     evt_handlers=[(evt.EVT_C_STORE, on_store)])
    pacs = start_orthanc(procs, tmp_path / "pacs",
                         modalities={"router": ("ROUTER", "127.0.0.1", router_port)})
    study = make_study(tmp_path / "study", n_series=2, n_instances=3, size_kb=8, seed=seed)
    for path in study:
        pacs.upload(path)
    (tmp_path / "rules.toml").write_text(RETRIEVE_ALL)
    router = Router(tmp_path, port=router_port, extra=(
        '[routing]\nrules = "rules.toml"\n'
        f'[[destination]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
        f'ae_title = "{pacs.aet}"\nmove_mode = "proxy"\n'
        f'[[destination]]\nname = "viewer"\nhost = "127.0.0.1"\nport = {viewer_port}\n'
        'ae_title = "VIEWER_SCP"\n' + viewer))
    return study, viewer_server, router


def test_proxied_move_the_upstream_does_not_know_the_destination(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """move_mode = "proxy": Orthanc knows only the router; the router receives the
    sub-operations (in either worker) and relays each to the requestor's destination,
    so the counts Orthanc reports -- and the router relays -- are end to end."""
    received: list[str] = []
    refuse = {"uid": ""}

    def on_store(event: Any) -> int:
        uid = event.request.AffectedSOPInstanceUID
        if uid == refuse["uid"]:
            return 0xA700  # the viewer is out of resources for this one
        received.append(uid)
        return 0x0000

    study, viewer_server, router = _proxied_move_setup(tmp_path, procs, on_store, seed=11)
    uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
    try:
        router.wait_for("ready: 2 workers serving")
        responses = []
        for refused in ("", _uid(study[4])):
            refuse["uid"] = refused
            responses.append(_moved(router.port, uid))
            if not refused:
                received.sort()
    finally:
        router.stop()
        viewer_server.shutdown()
    first, second = responses
    # All six relayed to the viewer, counted by the upstream as they were delivered.
    assert sorted(received[:6]) == sorted(_uid(p) for p in study)
    assert first[-1].status == 0x0000
    assert first[-1].number_of_completed_sub_operations == 6
    pending = [r for r in first[:-1] if r.status == 0xFF00]
    assert pending and all(r.number_of_remaining_sub_operations
                           + r.number_of_completed_sub_operations == 6 for r in pending)
    # The viewer refuses one instance: the refusal reaches Orthanc as the sub-operation's
    # status (Orthanc then stops the move), and its failure comes back to the requestor.
    assert second[-1].status != 0x0000 and second[-1].status != 0xFF00, hex(second[-1].status)
    assert _uid(study[4]) not in received[6:]
    # Orthanc then ends with C000H and 0/0/0, which was passed on as it said (an outside
    # campaign): the router relayed every sub-operation, so it counts them itself.
    final = second[-1]
    assert final.number_of_failed_sub_operations == 1, final
    assert final.number_of_completed_sub_operations == len(received) - 6, final
    router.wait_for("but the router relayed")
    assert not list((router.spool / "moves").glob("*.json"))  # the moves are over: forgotten


def test_relayed_sub_operations_name_the_requestor_and_carry_its_priority(
        tmp_path: Path, procs: Procs) -> None:
    """Proxy mode: a C-STORE the router relays for a requestor's C-MOVE is a
    sub-operation of the requestor's move, so it names the requestor as Move
    Originator, with its C-MOVE's message ID (PS3.7 §9.3.1.1), and has the C-MOVE's
    priority (PS3.4 C.4.2.1.2). They went out with none and MEDIUM: a viewer that
    ties what arrives to the move it asked for could not. The viewer has one
    association in all, so the worker without it relays through the other one."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    seen: list[tuple[str, int, int]] = []

    def on_store(event: Any) -> int:
        rq = event.request
        seen.append((str(rq.MoveOriginatorApplicationEntityTitle or "").strip(),
                     rq.MoveOriginatorMessageID, rq.Priority))
        return 0x0000

    study, viewer_server, router = _proxied_move_setup(tmp_path, procs, on_store, seed=12,
                                                       viewer="concurrency = 1\n")
    try:
        router.wait_for("ready: 2 workers serving")
        requestor = AE(ae_title="WORKSTATION7")
        requestor.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = str(pydicom.dcmread(study[0]).StudyInstanceUID)
        assoc = requestor.associate("127.0.0.1", router.port, ae_title="ROUTER")
        assert assoc.is_established
        try:
            statuses = [int(status.Status) for status, _ in assoc.send_c_move(
                query, "VIEWER_SCP", StudyRootQueryRetrieveInformationModelMove,
                msg_id=4242, priority=1)]
        finally:
            assoc.release()
    finally:
        router.stop()
        viewer_server.shutdown()
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    assert seen == [("WORKSTATION7", 4242, 1)] * 6


@pytest.mark.parametrize("originator", ["upstreams-own-ae", "none"])
def test_proxied_move_from_an_upstream_without_a_usable_move_originator(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk, originator: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's move SCP names itself as Move Originator AE Title, and a
    sub-operation may carry no Move Originator at all (both fields are optional,
    PS3.7 Table 9.3-1; dcmjs-dimse sends none): the sub-operations still reach the
    requestor's destination. They went to unrouted/ while the requestor was told
    all of them were completed.

    Whatever else the upstream's host sends meanwhile, outside the move's study, is
    routed by the rules (here: kept in unrouted/). It used to go to the move's
    destination too, past the rules."""
    if originator == "none":
        _without_move_originator(monkeypatch)
    sink = storescp_server(tmp_path, procs, aet="VIEWER_SCP", args=["+B"], dcmtk=dcmtk)
    study = make_study(tmp_path / "study", n_series=1, n_instances=5, size_kb=4, seed=14)
    other = make_study(tmp_path / "other", n_series=1, n_instances=1, size_kb=4, seed=15)
    router_port = free_port()
    pushed: list[subprocess.CompletedProcess[str]] = []

    def on_move(event: Any) -> Any:
        destination = event.move_destination
        if (destination.decode() if isinstance(destination, bytes) else destination
                ).strip() != "ROUTER":
            yield None, None
            return
        # While the move runs: another study, from the upstream's host and AE title.
        pushed.append(subprocess.run(
            [dcmtk.storescu, "-aet", "PYPACS", "-aec", "ROUTER", "127.0.0.1",
             str(router_port), str(other[0])],
            capture_output=True, text=True, timeout=60, env=dcmtk_env()))
        yield "127.0.0.1", router_port
        yield len(study)
        for path in study:
            yield 0xFF00, pydicom.dcmread(path)

    pacs_port, server = _move_scp("PYPACS", on_move)
    router = _proxy_router(tmp_path, router_port, pacs_port, (
        f'[[destination]]\nname = "viewer"\nhost = "127.0.0.1"\nport = {sink.port}\n'
        'ae_title = "VIEWER_SCP"\n'))
    try:
        router.wait_for("ready: 2 workers serving")
        responses = _moved(router.port, str(pydicom.dcmread(study[0]).StudyInstanceUID))
    finally:
        router.stop()
        server.shutdown()
    assert responses[-1].status == 0x0000
    assert responses[-1].number_of_completed_sub_operations == 5
    assert sorted(_uid(p) for p in received_files(sink.outdir)) == \
        sorted(_uid(p) for p in study)
    assert pushed and pushed[0].returncode == 0, pushed
    assert [_uid(p) for p in (router.spool / "unrouted").glob("*")] == [_uid(other[0])]


def test_two_proxied_moves_of_one_study_without_move_originator_both_complete(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two viewers move the same study at once through an upstream whose
    sub-operations name no Move Originator (pynetdicom's, patched as dcmjs-dimse
    sends them): it sends each instance once per move, and nothing tells the copies
    apart. They were routed by the rules, into unrouted/, while the upstream was told
    Success and both requestors that their move had completed. Each copy now goes
    to a move that has not had it: both storescp sinks get the whole study, once."""
    import threading

    _without_move_originator(monkeypatch)
    aets = ("VIEWER_A", "VIEWER_B")
    sinks = dict(zip(aets, (storescp_server(tmp_path, procs, aet=aet, args=["+B"],
                                            dcmtk=dcmtk) for aet in aets), strict=True))
    study = make_study(tmp_path / "study", n_series=2, n_instances=6, size_kb=4, seed=31)
    router_port = free_port()
    both_asked = threading.Barrier(2, timeout=30)

    def on_move(event: Any) -> Any:
        yield "127.0.0.1", router_port
        yield len(study)
        both_asked.wait()  # the two moves run at once, their sub-operations interleaved
        for path in study:
            yield 0xFF00, pydicom.dcmread(path)

    pacs_port, server = _move_scp("PYPACS", on_move)
    router = _proxy_router(tmp_path, router_port, pacs_port, "".join(
        f'[[destination]]\nname = "{aet.lower()}"\nhost = "127.0.0.1"\n'
        f'port = {sink.port}\nae_title = "{aet}"\nconcurrency = 1\n'  # one at a time
        for aet, sink in sinks.items()))
    uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
    finals: dict[str, Any] = {}

    def move(destination: str) -> None:
        finals[destination] = _moved(router.port, uid, destination)[-1]

    try:
        router.wait_for("ready: 2 workers serving")
        movers = [threading.Thread(target=move, args=(aet,)) for aet in aets]
        for mover in movers:
            mover.start()
        for mover in movers:
            mover.join(90)
    finally:
        router.stop()
        server.shutdown()
    for aet, sink in sinks.items():
        final = finals[aet]
        assert final.status == 0x0000 and final.number_of_completed_sub_operations == 12, final
        assert sorted(_uid(p) for p in received_files(sink.outdir)) == \
            sorted(_uid(p) for p in study), aet
        assert router.count(f"forward {aet.lower()}: ") == 12  # each once
    assert not (router.spool / "unrouted").exists() or \
        not list((router.spool / "unrouted").iterdir())
    import json

    for record in (router.spool / "moves").glob("*.json"):  # over: none runs still
        assert "ended" in json.loads(record.read_text()), record.read_text()


def test_rules_change_the_query_and_its_results(tmp_path: Path, dcmtk: Dcmtk,
                                                orthanc_server: Orthanc) -> None:
    """External viewers use prefixed patient IDs; the PACS does not: the prefix comes
    off the query and goes back on every match, and the matches name the router as
    where to retrieve from."""
    _loaded(orthanc_server, tmp_path)
    router = _router(tmp_path, orthanc_server, (
        '[[rule]]\nname = "prefixed IDs"\n[rule.then]\nquery = ["pacs"]\n'
        '[[rule.then.change]]\napplies_to = "query"\n'
        "replace = { PatientID = { pattern = '^HOSP-', with = '' } }\n"
        '[[rule.then.change]]\napplies_to = "result"\n'
        "replace = { PatientID = { pattern = '^(.+)$', with = 'HOSP-\\1' } }\n"
        'set = { RetrieveAETitle = "ROUTER" }\n'))
    keys = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
            "-k", "RetrieveAETitle"]
    try:
        router.wait_for("ready: 2 workers serving")
        proxied = _findscu(dcmtk, router.port, "ROUTER", tmp_path / "proxied", *keys,
                           "-k", "PatientID=HOSP-P1")
    finally:
        router.stop()
    direct = _findscu(dcmtk, orthanc_server.dicom_port, orthanc_server.aet, tmp_path / "direct",
                      *keys, "-k", "PatientID=P1")
    assert len(direct) == 2  # P1 has two studies in _loaded
    assert sorted(m["(0020,000D)"] for m in proxied) == sorted(m["(0020,000D)"] for m in direct)
    assert {m["(0010,0020)"] for m in proxied} == {"HOSP-P1"}
    assert {m["(0008,0054)"] for m in proxied} == {"ROUTER"}


def test_worklist_query_through_the_router(tmp_path: Path, dcmtk: Dcmtk) -> None:
    """Modality Worklist (PS3.4 K): findscu -W through the router to a pynetdicom RIS."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import ModalityWorklistInformationFind

    def on_find(event: Any) -> Any:
        for n in range(3):
            item = pydicom.Dataset()
            item.PatientID = f"W{n}"
            item.PatientName = f"Worklist^{n}"
            step = pydicom.Dataset()
            step.Modality = "CT"
            step.ScheduledStationAETitle = "CT1"
            item.ScheduledProcedureStepSequence = [step]
            yield 0xFF00, item

    ris = AE(ae_title="RIS")
    ris.add_supported_context(ModalityWorklistInformationFind)
    port = free_port()
    server = ris.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_FIND, on_find)])
    router = _router_to(tmp_path, '[[rule]]\nname = "worklist"\n[rule.then]\nquery = ["ris"]\n',
                        port, "RIS", name="ris")
    try:
        router.wait_for("ready: 2 workers serving")
        keys = ["-W", "-k", "PatientID", "-k", "PatientName",
                "-k", "ScheduledProcedureStepSequence[0].Modality=CT"]
        proxied = _findscu(dcmtk, router.port, "ROUTER", tmp_path / "proxied", *keys)
        direct = _findscu(dcmtk, port, "RIS", tmp_path / "direct", *keys)
    finally:
        router.stop()
        server.shutdown()
    assert len(proxied) == 3 and proxied == direct


def test_pynetdicom_find_and_move_through_the_router(tmp_path: Path, procs: Procs,
                                                     dcmtk: Dcmtk) -> None:
    """Another real client: pynetdicom's C-FIND and C-MOVE SCU, Patient Root."""
    from pynetdicom import AE
    from pynetdicom.sop_class import (
        PatientRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelMove,
    )

    sink, pacs, router = _move_setup(tmp_path, procs, dcmtk)
    study = make_study(tmp_path / "study", n_series=1, n_instances=4, size_kb=4,
                       patient_id="PYN", seed=12)
    for path in study:
        pacs.upload(path)
    try:
        router.wait_for("ready: 2 workers serving")
        # Query rules added by a reload: the workers start accepting the FIND models.
        (tmp_path / "rules.toml").write_text(
            '[[rule]]\nname = "all"\n[rule.then]\nquery = ["pacs"]\nretrieve = ["pacs"]\n')
        reload = router.command("reload")
        assert reload.returncode == 0, reload.stderr
        for w in (1, 2):
            router.wait_for(f"worker {w}: configuration generation 2 loaded")
        ae = AE(ae_title="PYNSCU")
        ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(PatientRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", router.port, ae_title="ROUTER")
        assert assoc.is_established
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = "PYN"
        query.PatientName = ""
        found = [(status.Status, ds) for status, ds in
                 assoc.send_c_find(query, PatientRootQueryRetrieveInformationModelFind)]
        assert [s for s, _ in found] == [0xFF00, 0x0000]
        assert found[0][1].PatientID == "PYN"
        moved = [status for status, _ in
                 assoc.send_c_move(query, "VIEWER_SCP",
                                   PatientRootQueryRetrieveInformationModelMove)]
        assoc.release()
        assert moved[-1].Status == 0x0000 and moved[-1].NumberOfCompletedSuboperations == 4
    finally:
        router.stop()
    assert sorted(_uid(p) for p in received_files(sink.outdir)) == sorted(_uid(p) for p in study)


def test_an_upstream_that_cancels_unasked_is_a_failure(tmp_path: Path, dcmtk: Dcmtk) -> None:
    """An upstream ending a query with Cancel (FE00H) that nobody cancelled stopped
    short: findscu gets its match and then a failure saying so, not Success (which is
    what the router used to answer, as if the list were complete)."""

    def on_find(event: Any) -> Any:
        match = pydicom.Dataset()
        match.QueryRetrieveLevel = "STUDY"
        match.StudyInstanceUID = "1.2.3.1"
        yield 0xFF00, match
        yield 0xFE00, None

    port, server = _find_scp("PACS", on_find)
    router = _router_to(tmp_path, QUERY_ALL, port, "PACS")
    try:
        router.wait_for("ready: 2 workers serving")
        done = _findscu_said(dcmtk, router.port, "-k", "QueryRetrieveLevel=STUDY",
                             "-k", "StudyInstanceUID")
        said = done.stdout + done.stderr
        assert "1.2.3.1" in said and "Failed: UnableToProcess" in said, said
        router.wait_for("pacs answered Cancel to a query not cancelled")
    finally:
        router.stop()
        server.shutdown()


def _pipelined_finds(tmp_path: Path, *, cancel: tuple[int, ...],
                     echoes: int = 0) -> tuple[list[tuple[int, int]], list[str], str]:
    """A peer that negotiated no asynchronous operations sends, in one write, C-FIND 1
    (5,000 matches upstream), C-FIND 2 (3 matches), a C-CANCEL of each of ``cancel``
    and ``echoes`` C-ECHOs: the (message ID, status) of each response it gets until
    both finds have ended or the association does, the PatientIDs the upstream was
    asked for, and the router's log."""
    import socket

    from tests.faults.test_actor_faults import ECHO_RQ, associate_rq, command, p_data, read_pdu

    asked: list[str] = []

    def on_find(event: Any) -> Any:
        patient = str(event.identifier.PatientID)
        asked.append(patient)
        for n in range(5000 if patient == "LONG" else 3):
            if event.is_cancelled:
                yield 0xFE00, None
                return
            match = pydicom.Dataset()
            match.QueryRetrieveLevel = "STUDY"
            match.PatientID = patient
            match.StudyInstanceUID = f"1.2.3.{n}"
            yield 0xFF00, match

    port, server = _find_scp("PACS", on_find)
    router = _router_to(tmp_path, QUERY_ALL, port, "PACS")

    def find(message_id: int, patient: str) -> bytes:
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = patient
        query.StudyInstanceUID = ""
        return (p_data(command(AffectedSOPClassUID=STUDY_FIND, CommandField=0x0020,
                               MessageID=message_id, Priority=0, CommandDataSetType=0x0000))
                + p_data(_implicit(query), is_command=False))

    cancels = b"".join(p_data(command(CommandField=0x0FFF, MessageIDBeingRespondedTo=mid,
                                      CommandDataSetType=0x0101)) for mid in cancel)
    answers: list[tuple[int, int]] = []
    try:
        router.wait_for("ready: 2 workers serving")
        with socket.create_connection(("127.0.0.1", router.port), timeout=30) as sock:
            sock.sendall(associate_rq(abstract=STUDY_FIND))
            assert read_pdu(sock)[0] == 0x02
            sock.sendall(find(1, "LONG") + find(2, "SHORT") + cancels
                         + p_data(ECHO_RQ) * echoes)
            finals = 0
            while finals < 2:
                kind, body = read_pdu(sock)
                if kind != 0x04:
                    answers.append((0, kind))  # the association ended
                    break
                if not body[5] & 1:  # a PDV of the identifier, not of a command
                    continue
                rsp = _command_of(body)
                answers.append((int(rsp.MessageIDBeingRespondedTo), int(rsp.Status)))
                finals += int(rsp.Status) not in (0xFF00, 0xFF01)
        router.wait_for("held until it ends")
    finally:
        router.stop()
        server.shutdown()
    return answers, asked, router.log()


def _request_then_release(router: Router, server: Any, rq: bytes, abstract: str,
                          field: int, identifier: pydicom.Dataset) -> list[tuple[int, bytes]]:
    """Associate with ``rq``, then send a request (``field``) with ``identifier`` and an
    A-RELEASE-RQ in one write: every PDU answered up to the first that is not data.
    Stops the router and the upstream ``server``."""
    from tests.faults.test_actor_faults import RELEASE_RQ, answers_from, command, p_data

    try:
        router.wait_for("ready: 2 workers serving")
        pdus = answers_from(router.port, rq, p_data(command(
            AffectedSOPClassUID=abstract, CommandField=field, MessageID=1, Priority=0,
            CommandDataSetType=0x0000)) + p_data(_implicit(identifier), is_command=False)
            + RELEASE_RQ)
        router.wait_for("closed: released")
    finally:
        router.stop()
        server.shutdown()
    return pdus


def test_a_release_sent_behind_a_query_waits_for_its_answers(tmp_path: Path) -> None:
    """A C-FIND and an A-RELEASE-RQ in one write (an outside conformance campaign): the
    A-RELEASE-RP came at once, and the requestor never got its matches. Now every
    match and the final response come first, then the A-RELEASE-RP, as DCMTK's
    dcmqrscp and pynetdicom answer (PS3.8 Sta8: P-DATA may still be sent)."""
    from tests.faults.test_actor_faults import associate_rq

    def on_find(event: Any) -> Any:
        for n in range(3):
            match = pydicom.Dataset()
            match.QueryRetrieveLevel = "STUDY"
            match.StudyInstanceUID = f"1.2.3.{n}"
            yield 0xFF00, match

    port, server = _find_scp("PACS", on_find)
    router = _router_to(tmp_path, QUERY_ALL, port, "PACS")
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    pdus = _request_then_release(router, server, associate_rq(abstract=STUDY_FIND),
                                 STUDY_FIND, 0x0020, query)
    # Each response's status (commands only, not the matches' identifiers), then the RP.
    seen = [int(_command_of(body).Status) if kind == 0x04 else kind
            for kind, body in pdus if kind != 0x04 or body[5] & 1]
    assert seen == [0xFF00, 0xFF00, 0xFF00, 0x0000, 0x06], seen


def _final_of(answers: list[tuple[int, int]], message_id: int) -> int:
    return next(i for i, (mid, status) in enumerate(answers)
                if mid == message_id and status not in (0xFF00, 0xFF01))


def test_a_second_query_while_one_runs_waits_its_turn(tmp_path: Path) -> None:
    """No asynchronous operations are negotiated (PS3.7 D.3.3.3: a window of one), yet
    a peer sends a second C-FIND, then a C-CANCEL of the first, in one write. Both ran
    at once and the actor kept track of the second only: the cancel was ignored (the
    first got all its matches and 0000H), and when the peer went away the first went
    on pulling matches for nobody. Now the second waits for the first to end; the
    cancel reaches the first (FE00H); then the second is answered whole."""
    answers, _, _ = _pipelined_finds(tmp_path, cancel=(1,))
    first = _final_of(answers, 1)
    assert answers[first] == (1, 0xFE00), answers
    assert all(mid == 1 for mid, _ in answers[:first + 1]), answers
    assert answers[first + 1:] == [(2, 0xFF00)] * 3 + [(2, 0x0000)], answers
    assert first < 5000


def test_a_cancel_of_a_held_query_keeps_it_from_starting(tmp_path: Path) -> None:
    """The C-CANCEL names the query that waits, then the running one: the waiting one
    was not cancelled (it was not the running one) and later ran in full. Now it is
    answered Cancel in its turn, and the upstream is never asked for it. A C-CANCEL of
    a message that is no operation (99) has no answer, but the log says it (it said
    nothing: an outside campaign)."""
    answers, asked, log = _pipelined_finds(tmp_path, cancel=(2, 99, 1))
    first = _final_of(answers, 1)
    assert answers[first] == (1, 0xFE00), answers
    assert answers[first + 1:] == [(2, 0xFE00)], answers
    assert "SHORT" not in asked, asked
    assert "C-CANCEL of message 99, which no running or held C-FIND, C-MOVE or C-GET " \
        "has: nothing to cancel" in log, log


def test_a_peer_flooding_requests_while_one_runs_is_aborted(tmp_path: Path) -> None:
    """Held requests are bounded: 100 C-ECHOs sent behind a running C-FIND are not a
    peer waiting its turn, and the association is aborted, saying why."""
    answers, _, log = _pipelined_finds(tmp_path, cancel=(), echoes=100)
    assert answers[-1] == (0, 0x07), answers[-5:]
    assert "sent while an operation runs" in log


def _command_of(body: bytes) -> pydicom.Dataset:
    from io import BytesIO

    from pydicom.filereader import read_dataset

    return read_dataset(BytesIO(body[6:]), is_implicit_VR=True, is_little_endian=True)


def _truncating_get_upstream() -> tuple[int, Any]:
    """An upstream C-GET SCP, by hand, that breaks off in the middle of its first
    C-STORE sub-operation: it accepts every context the router proposes (and the SCP
    role), and on the C-GET-RQ sends a C-STORE-RQ and 12 bytes of its data set, not
    the last fragment, then closes the connection. (port, thread)."""
    import socket
    import struct
    import threading

    from pydicom.uid import ImplicitVRLittleEndian

    from tests.faults.test_actor_faults import command, read_pdu

    def item(kind: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(payload)) + payload

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        with server, server.accept()[0] as conn:
            _, rq = read_pdu(conn)
            ac = struct.pack(">HH", 1, 0) + rq[4:68] + item(0x10, b"1.2.840.10008.3.1.1.1")
            pos, user, ct_context = 68, b"", 0
            while pos < len(rq):
                kind, _, length = struct.unpack(">BBH", rq[pos:pos + 4])
                body = rq[pos + 4:pos + 4 + length]
                if kind == 0x20:  # a presentation context: accepted in Implicit VR
                    size = struct.unpack(">H", body[6:8])[0]  # its abstract syntax
                    if body[8:8 + size].rstrip(b"\x00") == b"1.2.840.10008.5.1.4.1.1.2":
                        ct_context = ct_context or body[0]
                    ac += item(0x21, bytes([body[0], 0, 0, 0])
                               + item(0x40, ImplicitVRLittleEndian.encode()))
                elif kind == 0x50:  # echo the role selections, accepted
                    at = 0
                    while at < len(body):
                        sub, _, size = struct.unpack(">BBH", body[at:at + 4])
                        if sub == 0x54:
                            user += item(0x54, body[at + 4:at + 4 + size])
                        at += 4 + size
                pos += 4 + length
            ac += item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4")
                       + user)
            conn.sendall(struct.pack(">BBI", 2, 0, len(ac)) + ac)
            while read_pdu(conn)[0] == 4 and not conn.recv(0):  # the C-GET-RQ's PDVs
                break
            rq_cmd = command(AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.2", CommandField=0x0001,
                             MessageID=101, Priority=0, CommandDataSetType=0,
                             AffectedSOPInstanceUID="1.2.3.999.5.1")
            for ctl, payload in ((3, rq_cmd), (0, b"\x08\x00\x16\x00\x1a\x00\x00\x001.2.")):
                pdv = struct.pack(">IBB", len(payload) + 2, ct_context, ctl) + payload
                conn.sendall(struct.pack(">BBI", 4, 0, len(pdv)) + pdv)
            read_pdu(conn)  # whatever comes: the router may abort; then the close

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


def test_a_c_get_upstream_breaking_off_mid_instance_aborts_the_requestor(
        tmp_path: Path) -> None:
    """The upstream broke off in the middle of a C-STORE sub-operation's data set: the
    requestor had the C-STORE-RQ and part of the data, then the C-GET-RSP (C001H) on
    the same association, so the message was never finished (PS3.8 9.3.5, Annex E)
    and pynetdicom decoded the truncated data set as an instance; the log had
    asyncio's "Future exception was never retrieved" (an outside Q/R campaign, with
    Orthanc killed mid-get). Nothing can finish it: the requestor's association is
    aborted, and the log says why in one line."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    port, upstream = _truncating_get_upstream()
    router = _router_to(tmp_path, RETRIEVE_ALL, port, "HOSTILE")
    stored: list[Any] = []
    try:
        router.wait_for("ready: 2 workers serving")
        assoc = _get_requestor(router.port, lambda event: stored.append(event) or 0)
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = "1.2.3.999.1"
        responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
        # No C-GET-RSP after the half C-STORE: the association ended, aborted.
        assert not any(status and "Status" in status for status, _ in responses), responses
        line = router.lines[router.wait_for("closed: aborted: the C-STORE sub-operation "
                                            "could not be finished")]
        assert "VIEWER->ROUTER" in line and "inside a data set" in line, line
        assoc.join(30)  # its reactor thread ends with the A-ABORT
        assert assoc.is_aborted
    finally:
        router.stop()
        upstream.join(10)
    assert not stored
    assert "never retrieved" not in router.log() and "Traceback" not in router.log()


def test_a_c_get_with_no_storage_context_in_the_scp_role_is_refused_saying_why(
        tmp_path: Path) -> None:
    """A requestor that proposed CT without the SCP role (no role selection): nothing
    could reach it, yet the PACS was asked, failed each instance, and the requestor
    got C000H or A702H with no word why (an outside Q/R campaign, Orthanc and
    dcmqrscp). Now the router answers A702H itself, saying why, and asks nobody."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    study = make_study(tmp_path / "study", n_series=1, n_instances=2, size_kb=8, seed=9)
    port, server = _get_scp("GETPACS", study)
    router = _router_to(tmp_path, RETRIEVE_ALL, port, "GETPACS")
    try:
        router.wait_for("ready: 2 workers serving")
        viewer = AE(ae_title="VIEWER")
        viewer.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        viewer.add_requested_context(CTImageStorage)  # no SCP role asked for
        assoc = viewer.associate("127.0.0.1", router.port, ae_title="ROUTER")
        assert assoc.is_established
        try:
            [(final, _)] = list(assoc.send_c_get(_study_query(study),
                                                 StudyRootQueryRetrieveInformationModelGet))
        finally:
            assoc.release()
        assert final.Status == 0xA702, final
        assert "SCP role" in final.ErrorComment, final
        line = router.lines[router.wait_for("refused: the requestor accepted no Storage SOP "
                                            "Class in the SCP role")]
        assert "VIEWER->ROUTER" in line, line
    finally:
        router.stop()
        server.shutdown()
    assert "via pacs" not in router.log()  # the upstream was not asked


def test_a_proxy_upstream_that_does_not_know_the_router_is_said_so_not_a801(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """move_mode = "proxy" to a dcmqrscp whose HostTable has no entry for the router: it
    answers A801H, move destination unknown, for ROUTER. Passed on, that told the
    requestor its own destination was unknown, which the router had checked (an
    outside campaign). It is now C001H, the Error Comment and a log line saying what
    to fix."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    sink = storescp_server(tmp_path, procs, aet="VIEWER_SCP", args=["+B"], dcmtk=dcmtk)
    study = make_study(tmp_path / "study", n_series=1, n_instances=2, size_kb=8, seed=13)
    qrscp = dcmqrscp_server(tmp_path, procs, files=study, aet="QRSCP",
                            move_destinations={"OTHER": ("127.0.0.1", free_port())},
                            dcmtk=dcmtk)
    router = _router_to(tmp_path, RETRIEVE_ALL, qrscp, "QRSCP",
                        more='move_mode = "proxy"\n[[destination]]\nname = "viewer"\n'
                             f'host = "127.0.0.1"\nport = {sink.port}\n'
                             'ae_title = "VIEWER_SCP"\n')
    try:
        router.wait_for("ready: 2 workers serving")
        requestor = AE(ae_title="VIEWER")
        requestor.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = requestor.associate("127.0.0.1", router.port, ae_title="ROUTER")
        assert assoc.is_established
        try:
            responses = [status for status, _ in assoc.send_c_move(
                _study_query(study), "VIEWER_SCP", StudyRootQueryRetrieveInformationModelMove)]
        finally:
            assoc.release()
        final = responses[-1]
        assert final.Status == 0xC001, final
        assert "does not know this router (ROUTER)" in final.ErrorComment, final
        router.wait_for("as a move destination: add it there as a DICOM node")
    finally:
        router.stop()
    assert not received_files(sink.outdir)
