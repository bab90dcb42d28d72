"""Orthanc 1.10 as a PACS peer: the ``orthanc_server`` fixture and what Orthanc stores.

The facts asserted here are written up in ``tests/helpers/orthanc.py``: an instance
received by C-STORE comes back from ``GET /instances/{id}/file`` with a new file meta
group (DCMTK's implementation UID, no Source AE title) and the data set as DCMTK
encodes it. That is the wire bytes for what DCMTK's storescu sends (deflate aside)
and for make_ct's files, but not for data sets with undefined-length sequences, OW
encapsulated pixel data or deflate, which Orthanc re-encodes. A REST upload is kept
byte for byte.

Every test runs its own Orthanc on free ports with its storage in ``tmp_path``;
synchronisation is on process exit (storescu) and C-STORE responses only.
"""

from __future__ import annotations

import io
import json
import os
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from router.dicom import dimse, uids
from router.dicom.dataset import read_part10_header
from router.net.client import connect
from tests.helpers import (
    Dcmtk,
    Orthanc,
    Procs,
    make_ct,
    make_study,
    make_tiny,
    pydicom_test_files,
    received_files,
    run_tool,
    start_orthanc,
    storescp_server,
)

pytestmark = pytest.mark.interop

LOCALHOST = "127.0.0.1"
SCU_AE = "TEST-SCU"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Implementation Class UIDs of DCMTK (OFFIS's root), which Orthanc writes in the meta.
DCMTK_UID_ROOT = "1.2.276.0.7230010.3."

#: storescu option proposing (among others) a file's transfer syntax; with -R, only it.
STORESCU_PROPOSAL = {
    uids.IMPLICIT_VR_LITTLE_ENDIAN: "-xi",
    uids.EXPLICIT_VR_LITTLE_ENDIAN: "-xe",
    uids.EXPLICIT_VR_BIG_ENDIAN: "-xb",
    uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.5": "-xr",  # RLE lossless
}


def split_part10(data: bytes) -> tuple[FileMetaDataset, bytes]:
    """(file meta, data set bytes) of a Part 10 file."""
    meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    return meta, data[read_part10_header(data).dataset_offset:]


def storescu(dcmtk: Dcmtk, port: int, files: list[Path], *options: str) -> None:
    """Send ``files`` with DCMTK's storescu (``dcmtk_env``: TCP_NODELAY=1)."""
    done = run_tool([dcmtk.storescu, "-nh", "-aet", SCU_AE, "-aec", "ORTHANC", *options,
                     LOCALHOST, str(port), *map(str, files)])
    # storescu exits 0 even when a C-STORE fails: its log says so.
    assert done.returncode == 0 and "Store Failed" not in done.stderr, \
        done.stdout + done.stderr


def pydicom_file(name: str) -> Path:
    [path] = [p for p in pydicom_test_files() if p.name == name]
    return path


# ---------------------------------------------------------------- the fixture


@pytest.fixture(scope="module")
def orthanc_pids() -> Iterator[list[int]]:
    """Pids of the module's Orthancs: none may be left once their tests are torn down."""
    pids: list[int] = []
    yield pids
    left = []
    for pid in pids:
        try:
            os.killpg(pid, 0)  # Orthanc leads its own process group (see Procs)
        except ProcessLookupError:
            continue
        left.append(pid)
    assert not left, f"Orthanc processes left behind: {left}"


def test_orthanc_server_runs_with_its_own_config(
    orthanc_server: Orthanc, orthanc_pids: list[int], tmp_path: Path
) -> None:
    orthanc_pids.append(orthanc_server.proc.pid)
    assert orthanc_server.proc.running
    assert orthanc_server.host == LOCALHOST
    system = orthanc_server.system()
    assert (system["DicomAet"], system["DicomPort"], system["HttpPort"]) == (
        "ORTHANC", orthanc_server.dicom_port, orthanc_server.http_port)
    assert system["Version"].startswith("1.")
    config = json.loads(orthanc_server.config_path.read_text())
    assert orthanc_server.config_path.is_relative_to(tmp_path)
    assert Path(config["StorageDirectory"]).is_relative_to(tmp_path)
    assert Path(config["IndexDirectory"]).is_dir()
    assert config["RemoteAccessAllowed"] is False
    # "Plugins": [] loads none; "explorer.js" is Orthanc's built-in pseudo-entry.
    assert set(orthanc_server.get_json("/plugins")) <= {"explorer.js"}
    assert orthanc_server.statistics()["CountInstances"] == 0
    assert orthanc_server.instances() == []
    assert orthanc_server.find_instance("1.2.3.4") is None


def test_kill_leaves_nothing_behind(orthanc: str, procs: Procs, tmp_path: Path) -> None:
    server = start_orthanc(procs, tmp_path / "orthanc", binary=orthanc, aet="KILLED")
    assert server.system()["DicomAet"] == "KILLED"
    assert server.kill() == -9
    with pytest.raises(ProcessLookupError):
        os.killpg(server.proc.pid, 0)
    for port in (server.dicom_port, server.http_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOCALHOST, port), timeout=5).close()


# --------------------------------------------------------- storescu, then REST


def test_storescu_then_rest_gives_the_data_set_back(
    orthanc_server: Orthanc, orthanc_pids: list[int], dcmtk: Dcmtk, tmp_path: Path
) -> None:
    orthanc_pids.append(orthanc_server.proc.pid)
    by_syntax = {
        uids.EXPLICIT_VR_LITTLE_ENDIAN: make_study(tmp_path / "study", 1, 3, size_kb=8),
        uids.IMPLICIT_VR_LITTLE_ENDIAN: [tmp_path / "implicit.dcm"],
        uids.EXPLICIT_VR_BIG_ENDIAN: [tmp_path / "big.dcm"],
    }
    make_ct(tmp_path / "implicit.dcm", size_kb=8, transfer_syntax=uids.IMPLICIT_VR_LITTLE_ENDIAN)
    make_ct(tmp_path / "big.dcm", size_kb=8, transfer_syntax=uids.EXPLICIT_VR_BIG_ENDIAN)
    for syntax, files in by_syntax.items():
        storescu(dcmtk, orthanc_server.dicom_port, files, "-R", STORESCU_PROPOSAL[syntax])

    sent = {path: split_part10(path.read_bytes()) for files in by_syntax.values()
            for path in files}
    uids_sent = {meta.MediaStorageSOPInstanceUID for meta, _ in sent.values()}
    assert orthanc_server.sop_instance_uids() == uids_sent
    assert len(orthanc_server.instances()) == orthanc_server.statistics()["CountInstances"] == 5

    for path, (meta, dataset) in sent.items():
        oid = orthanc_server.find_instance(meta.MediaStorageSOPInstanceUID)
        assert oid is not None, path.name
        stored = orthanc_server.instance_file(oid)
        stored_meta, stored_dataset = split_part10(stored)
        # The data set: byte for byte, in the transfer syntax it was sent in.
        assert stored_dataset == dataset, path.name
        assert stored_meta.TransferSyntaxUID == meta.TransferSyntaxUID
        # The meta group: Orthanc's (DCMTK's) own, so the file is not the one sent.
        assert stored != path.read_bytes()
        assert stored[:132] == b"\x00" * 128 + b"DICM"
        assert stored_meta.MediaStorageSOPClassUID == meta.MediaStorageSOPClassUID
        assert stored_meta.MediaStorageSOPInstanceUID == meta.MediaStorageSOPInstanceUID
        assert stored_meta.ImplementationClassUID.startswith(DCMTK_UID_ROOT)
        assert stored_meta.ImplementationClassUID != meta.ImplementationClassUID
        assert "SourceApplicationEntityTitle" not in stored_meta
        # ... the calling AE title is instance metadata instead.
        remote_aet = orthanc_server.request("GET", f"/instances/{oid}/metadata/RemoteAET")
        assert remote_aet.decode() == SCU_AE
        tags = orthanc_server.instance_tags(oid)
        assert (tags["PatientID"], tags["SOPInstanceUID"]) == (
            "TEST0001", meta.MediaStorageSOPInstanceUID)

    # A REST upload is kept as it is, file meta and all.
    path = by_syntax[uids.EXPLICIT_VR_BIG_ENDIAN][0]
    uploaded = orthanc_server.upload(path)
    assert uploaded["Status"] == "Success"  # OverwriteInstances: replaces the C-STOREd copy
    assert orthanc_server.instance_file(uploaded["ID"]) == path.read_bytes()

    orthanc_server.delete_all()
    assert orthanc_server.instances() == []
    assert orthanc_server.sop_instance_uids() == set()


# ---------------------------------------------- files as they are: DCMTK re-encodes

#: pydicom test files whose data sets Orthanc stores unchanged. CT_small.dcm ends in
#: Data Set Trailing Padding (FFFC,FFFC), which Orthanc keeps (storescu drops it).
KEPT = ["CT_small.dcm", "ExplVR_BigEnd.dcm", "SC_rgb_jpeg_dcmtk.dcm"]
#: ... and some it re-encodes as DCMTK's storescu does: undefined-length sequences and
#: items get explicit lengths (reportsi.dcm: 2624 -> 2296 bytes); encapsulated Pixel
#: Data OW -> OB (SC_rgb_rle_16bit.dcm: same length).
REENCODED = ["reportsi.dcm", "SC_rgb_rle_16bit.dcm"]


def test_cstore_stores_the_data_set_as_dcmtk_encodes_it(
    orthanc_server: Orthanc, orthanc_pids: list[int], dcmtk: Dcmtk, procs: Procs,
    tmp_path: Path,
) -> None:
    """Files sent as they are (our client): kept, or re-encoded the way DCMTK does."""
    orthanc_pids.append(orthanc_server.proc.pid)
    deflated = tmp_path / "deflated.dcm"
    make_ct(deflated, size_kb=8, transfer_syntax=uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN)
    files = [pydicom_file(name) for name in KEPT + REENCODED] + [deflated]
    headers = {path: read_part10_header(path) for path in files}
    # (Some of pydicom's files share a SOP Instance UID: Orthanc would keep the last.)
    assert len({h.sop_instance_uid for h in headers.values()}) == len(files)

    contexts = [(h.sop_class_uid, [h.transfer_syntax]) for h in headers.values()]
    with connect(LOCALHOST, orthanc_server.dicom_port, calling_ae=SCU_AE,
                 called_ae=orthanc_server.aet, contexts=contexts, dimse_timeout=10) as assoc:
        assert len(assoc.contexts) == len(contexts)
        statuses = {path.name: assoc.store(path).status for path in files}
    assert statuses == dict.fromkeys(statuses, dimse.SUCCESS)

    stored: dict[str, bytes] = {}
    for path, header in headers.items():
        oid = orthanc_server.find_instance(header.sop_instance_uid)
        assert oid is not None, path.name
        meta, stored[path.name] = split_part10(orthanc_server.instance_file(oid))
        assert meta.TransferSyntaxUID == header.transfer_syntax, path.name
    wire = {path.name: path.read_bytes()[header.dataset_offset:]
            for path, header in headers.items()}

    assert {name: stored[name] == wire[name] for name in KEPT + REENCODED} == {
        **dict.fromkeys(KEPT, True), **dict.fromkeys(REENCODED, False)}
    # Deflated: inflated and deflated again, same content in other bytes.
    assert stored[deflated.name] != wire[deflated.name]
    assert zlib.decompress(stored[deflated.name], -zlib.MAX_WBITS) == \
        zlib.decompress(wire[deflated.name], -zlib.MAX_WBITS)

    # The re-encoded ones are what storescu sends for these files (storescp +B: as
    # received).
    scp = storescp_server(tmp_path, procs, args=["+B"], dcmtk=dcmtk)
    reencoded = [pydicom_file(name) for name in REENCODED]
    for path in reencoded:
        storescu(dcmtk, scp.port, [path], "-R",
                 STORESCU_PROPOSAL[headers[path].transfer_syntax])
    by_dcmtk = {read_part10_header(p).sop_instance_uid: split_part10(p.read_bytes())[1]
                for p in received_files(scp.outdir)}
    for path in reencoded:
        assert stored[path.name] == by_dcmtk[headers[path].sop_instance_uid], path.name


# ------------------------------------------------------------- C-STORE statuses


def test_cstore_statuses(orthanc: str, procs: Procs, tmp_path: Path) -> None:
    """Unknown SOP classes per UnknownSopClassAccepted; A700H for a missing Study UID."""
    private_class = "1.2.826.0.1.3680043.8.498.9999"
    strict = start_orthanc(procs, tmp_path / "strict", binary=orthanc,
                           config={"UnknownSopClassAccepted": False})
    lenient = start_orthanc(procs, tmp_path / "lenient", binary=orthanc)
    contexts = [(private_class, [uids.EXPLICIT_VR_LITTLE_ENDIAN]),
                (CT_IMAGE_STORAGE, [uids.EXPLICIT_VR_LITTLE_ENDIAN])]

    def unknown() -> Dataset:
        ds = make_tiny()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(private_class)
        return ds

    with connect(LOCALHOST, strict.dicom_port, calling_ae=SCU_AE, contexts=contexts,
                 dimse_timeout=10) as assoc:
        # Its context is rejected (abstract syntax not supported); the CT one is not.
        assert [c.abstract_syntax for c in assoc.contexts.values()] == [contexts[1][0]]

    no_study = make_tiny()
    del no_study.StudyInstanceUID
    no_patient_id = make_tiny()
    del no_patient_id.PatientID
    again = make_tiny()
    with connect(LOCALHOST, lenient.dicom_port, calling_ae=SCU_AE, contexts=contexts,
                 dimse_timeout=10) as assoc:
        assert len(assoc.contexts) == 2
        statuses = [assoc.store(ds).status
                    for ds in (unknown(), no_study, no_patient_id, again, again)]
    assert statuses == [dimse.SUCCESS, 0xA700, dimse.SUCCESS, dimse.SUCCESS, dimse.SUCCESS]
    assert lenient.statistics()["CountInstances"] == 3
    strict.kill()
    lenient.kill()
