"""The shared helpers themselves, and a smoke test of the DCMTK/Orthanc installation."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from tests.helpers import (
    Dcmtk,
    PortTimeout,
    Procs,
    dcmqrscp_server,
    dcmtk_env,
    free_port,
    make_ct,
    make_study,
    make_tiny,
    pydicom_test_files,
    received_files,
    run_tool,
    storescp_server,
    to_bytes,
    wait_for_port,
)

# --------------------------------------------------------------------------- ports


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_free_port_fixture(free_port: int) -> None:
    assert 0 < free_port < 65536


def test_wait_for_port_times_out_when_nothing_listens() -> None:
    with pytest.raises(PortTimeout):
        wait_for_port("127.0.0.1", free_port(), timeout=0.2)


def test_wait_for_port_returns_once_listening() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        wait_for_port("127.0.0.1", s.getsockname()[1], timeout=2)


def test_wait_for_port_gives_up_when_process_exits(procs: Procs) -> None:
    proc = procs.start([sys.executable, "-c", "raise SystemExit(3)"], name="quitter")
    with pytest.raises(RuntimeError, match="code 3"):
        wait_for_port("127.0.0.1", free_port(), timeout=30, proc=proc)


# --------------------------------------------------------------------------- processes


def test_procs_stop_terminates_and_keeps_logs(procs: Procs, free_port: int) -> None:
    script = (
        "import socket, time\n"
        "print('hello', flush=True)\n"
        f"s = socket.create_server(('127.0.0.1', {free_port}))\n"
        "time.sleep(600)\n"
    )
    proc = procs.start([sys.executable, "-c", script], name="sleeper")
    wait_for_port("127.0.0.1", free_port, timeout=30, proc=proc)
    assert proc.running
    procs.stop_all(timeout=5)
    assert proc.poll() == -15  # SIGTERM was enough
    assert "hello" in proc.log()


def test_procs_kill_forked_children(procs: Procs) -> None:
    # The grandchild holds a connection to us: EOF on it tells us it died, no polling.
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(30)
        port = server.getsockname()[1]
        grandchild = (
            f"import socket, time; s = socket.create_connection(('127.0.0.1', {port})); "
            "time.sleep(600)"
        )
        script = (
            "import os, subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
            "os._exit(0)\n"  # the leader goes, the grandchild stays in its group
        )
        proc = procs.start([sys.executable, "-c", script])
        conn, _ = server.accept()
    with conn:
        assert proc.wait(timeout=30) == 0
        procs.stop_all()
        conn.settimeout(30)
        assert conn.recv(1) == b""


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize(
    "ts",
    [
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
    ids=lambda ts: ts.name,
)
@pytest.mark.parametrize("size_kb", [2, 500])
def test_make_ct_size_and_syntax(tmp_path: Path, ts: str, size_kb: int) -> None:
    path = tmp_path / "ct.dcm"
    ds = make_ct(path, size_kb=size_kb, transfer_syntax=ts)
    size = path.stat().st_size
    assert abs(size - size_kb * 1024) <= max(0.06 * size_kb * 1024, 200), size
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ts
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert len(back.PixelData) == back.Rows * back.Columns * 2
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
                    "ImageType", "PixelSpacing", "RescaleIntercept", "PatientID"):
        assert keyword in back, keyword


def test_make_ct_uids_are_fresh_and_attrs_apply() -> None:
    a = make_ct(size_kb=2)
    b = make_ct(size_kb=2, attrs={"StudyDescription": "HEAD", "AccessionNumber": "A1"})
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.StudyInstanceUID != b.StudyInstanceUID
    assert (b.StudyDescription, b.AccessionNumber) == ("HEAD", "A1")
    assert to_bytes(a)[128:132] == b"DICM"


def test_make_ct_refuses_compressed_syntax() -> None:
    with pytest.raises(ValueError):
        make_ct(transfer_syntax=JPEGBaseline8Bit)


def test_make_tiny_is_about_2_kb(tmp_path: Path) -> None:
    make_tiny(tmp_path / "t.dcm")
    assert 1500 <= (tmp_path / "t.dcm").stat().st_size <= 2600


def test_make_study_layout(tmp_path: Path) -> None:
    paths = make_study(tmp_path / "study", n_series=2, n_instances=3, size_kb=4)
    assert len(paths) == 6
    dss = [pydicom.dcmread(p) for p in paths]
    assert len({ds.StudyInstanceUID for ds in dss}) == 1
    assert len({ds.SeriesInstanceUID for ds in dss}) == 2
    assert len({ds.SOPInstanceUID for ds in dss}) == 6
    assert [ds.InstanceNumber for ds in dss] == [1, 2, 3, 1, 2, 3]


def test_pydicom_test_files_are_readable_instances() -> None:
    files = pydicom_test_files()
    assert len(files) >= 30
    assert files == sorted(files)
    names = {p.name for p in files}
    assert {"CT_small.dcm", "MR_small.dcm"} <= names
    assert "no_meta.dcm" not in names
    for path in files[:5]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPClassUID and ds.SOPInstanceUID


# --------------------------------------------------------------------------- DCMTK


def test_dcmtk_env_disables_nagle() -> None:
    assert dcmtk_env()["TCP_NODELAY"] == "1"


@pytest.mark.interop
def test_dcmdump_reads_make_ct(dcmtk: Dcmtk, tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    ds = make_ct(path, size_kb=50, transfer_syntax=ExplicitVRBigEndian)
    done = run_tool([dcmtk.dcmdump, "-q", path])
    assert done.returncode == 0, done.stderr
    assert ds.SOPInstanceUID in done.stdout
    assert "Big Endian" in done.stdout


@pytest.mark.interop
def test_storescp_receives_from_storescu(dcmtk: Dcmtk, tmp_path: Path, procs: Procs) -> None:
    port, outdir, _ = storescp_server(tmp_path, procs, aet="SINK")
    sent = [make_ct(tmp_path / "a.dcm", size_kb=500), make_tiny(tmp_path / "b.dcm")]
    done = run_tool([dcmtk.storescu, "-aec", "SINK", "127.0.0.1", str(port),
                     tmp_path / "a.dcm", tmp_path / "b.dcm"])
    assert done.returncode == 0, done.stdout + done.stderr
    got = received_files(outdir)
    assert [p.name for p in got] == sorted(f"CT.{ds.SOPInstanceUID}.dcm" for ds in sent)
    for ds in sent:
        back = pydicom.dcmread(outdir / f"CT.{ds.SOPInstanceUID}.dcm")
        assert back.PixelData == ds.PixelData


@pytest.mark.interop
def test_dcmqrscp_answers_find_and_moves_to_storescp(
    dcmtk: Dcmtk, tmp_path: Path, procs: Procs
) -> None:
    files = make_study(tmp_path / "study", n_series=1, n_instances=3, size_kb=8)
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    sink_port, sink_dir, _ = storescp_server(tmp_path, procs, aet="SINK")
    port = dcmqrscp_server(
        tmp_path, procs, files=files, move_destinations={"SINK": ("127.0.0.1", sink_port)}
    )

    find = run_tool([dcmtk.findscu, "-S", "-aec", "QRSCP", "-k", "QueryRetrieveLevel=STUDY",
                     "-k", "StudyInstanceUID", "-k", "NumberOfStudyRelatedInstances",
                     "127.0.0.1", str(port)])
    assert find.returncode == 0, find.stdout + find.stderr
    assert study_uid in find.stdout + find.stderr  # findscu logs responses on stderr

    move = run_tool([dcmtk.movescu, "-S", "-aec", "QRSCP", "-aem", "SINK",
                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                     "127.0.0.1", str(port)])
    assert move.returncode == 0, move.stdout + move.stderr
    assert len(received_files(sink_dir)) == 3


@pytest.mark.interop
def test_orthanc_binary_runs(orthanc: str) -> None:
    done = run_tool([orthanc, "--version"], timeout=30)
    assert done.returncode == 0, done.stderr
    assert "Orthanc" in done.stdout
