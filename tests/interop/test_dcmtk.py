"""Interoperability with DCMTK 3.6.7's real tools, both ways, and the operator CLI.

1. DCMTK SCUs (echoscu, storescu, findscu, movescu, getscu) against our
   :class:`router.net.server.Server`, started in-process on 127.0.0.1.
2. Our client (:func:`router.net.client.connect`) against storescp and dcmqrscp.
3. ``dicom-router echo|send|find|move|get`` against storescp and dcmqrscp.

What "byte for byte" means here. DCMTK's SCUs do not send a file's bytes: they
parse the file and write the data set again (dropping group lengths, fixing
padding and odd lengths...). For the pydicom-generated CT files that rewrite is
the identity (checked below), so what we receive must equal the file's data set
bytes. For pydicom's real-world test files it is not, so the reference is what
DCMTK's own storescp receives from the same storescu command line in
bit-preserving mode (``+B``): both receivers must end up with the same bytes.
When storescu converts the transfer syntax, the received data set is decoded
(with pydicom, not with the code under test) and compared to the file's.

DCMTK peers run with ``TCP_NODELAY=1`` (``dcmtk_env()``, via ``run_tool`` and the
server helpers); tests synchronise on process exit and ``wait_for_port`` only.
"""

from __future__ import annotations

import array
import copy
import fnmatch
import io
import re
import select
import shutil
import socket
import sys
import threading
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from router.dicom import dimse, uids
from router.dicom.dataset import read_part10_header
from router.dicom.negotiation import AcceptorPolicy
from router.dicom.pdu import AAssociateRJ
from router.net.client import ClientAssociation, connect
from router.net.server import (
    AssociationInfo,
    CancelToken,
    Handlers,
    MoveDestination,
    Request,
    Server,
)
from tests.helpers import (
    Dcmtk,
    Procs,
    dcmqrscp_server,
    make_study,
    make_tiny,
    pydicom_test_files,
    run_tool,
    storescp_server,
)

pytestmark = pytest.mark.interop

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = uids.EXPLICIT_VR_LITTLE_ENDIAN
IMPLICIT_LE = uids.IMPLICIT_VR_LITTLE_ENDIAN
EXPLICIT_BE = uids.EXPLICIT_VR_BIG_ENDIAN
DEFLATED = uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
LOCALHOST = "127.0.0.1"
OUR_AE = "ROUTER"

#: storescu's proposal option that makes it offer each compressed transfer syntax.
STORESCU_PROPOSAL = {
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended (12 bit)
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE
}


# ----------------------------------------------------------------- helpers


def dataset_bytes(path: Path) -> bytes:
    """The data set bytes of a Part 10 file (after preamble and meta group)."""
    return path.read_bytes()[read_part10_header(path).dataset_offset:]


def instances_in(folder: Path) -> Counter[tuple[str, str, bytes]]:
    """(SOP instance UID, transfer syntax, data set bytes) of every file in ``folder``."""
    return Counter((read_part10_header(p).sop_instance_uid,
                    read_part10_header(p).transfer_syntax, dataset_bytes(p))
                   for p in folder.iterdir() if p.is_file())


def expected_instances(paths: Iterable[Path]) -> Counter[tuple[str, str, bytes]]:
    """What ``instances_in`` gives for a receiver that got ``paths`` as we send them.

    That is unchanged, but for one NUL byte padding an odd-length (deflated)
    data set: DCMTK aborts on odd P-DATA fragments (see ``file_chunks``).
    """
    found: Counter[tuple[str, str, bytes]] = Counter()
    for path in paths:
        header, data = read_part10_header(path), dataset_bytes(path)
        found[(header.sop_instance_uid, header.transfer_syntax,
               data + b"\x00" * (len(data) % 2))] += 1
    return found


def pydicom_decode(data: bytes, transfer_syntax: str) -> Dataset:
    """Decode a data set with pydicom alone (not with the code under test)."""
    ts = UID(transfer_syntax)
    if ts == DEFLATED:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_dataset(io.BytesIO(data), ts.is_implicit_VR, ts.is_little_endian)


def canonical(ds: Dataset, transfer_syntax: str) -> dict[int, Any]:
    """Element values by tag, OW pixel data in little-endian byte order.

    pydicom keeps OW bytes as encoded, so the same image read from a big-endian
    data set has its pixel words swapped.
    """
    out: dict[int, Any] = {}
    for elem in ds:
        value = elem.value
        if elem.tag == 0x7FE00010 and transfer_syntax == EXPLICIT_BE and elem.VR == "OW":
            words = array.array("H", value)
            words.byteswap()
            value = words.tobytes()
        out[int(elem.tag)] = value
    return out


def same_dataset(received: bytes, transfer_syntax: str, path: Path) -> bool:
    """The received data set decodes to the same elements as the file's."""
    header = read_part10_header(path)
    theirs = pydicom_decode(received, transfer_syntax)
    ours = pydicom_decode(dataset_bytes(path), header.transfer_syntax)
    return canonical(theirs, transfer_syntax) == canonical(ours, header.transfer_syntax)


def check(done: Any, expect: int = 0) -> str:
    """Assert a tool's exit code; return its stdout + stderr for further checks."""
    output = f"{done.stdout}{done.stderr}"
    assert done.returncode == expect, (
        f"{done.args[0]} exited {done.returncode}, expected {expect}:\n{output[-8000:]}")
    return output


def uncompressed(paths: Iterable[Path]) -> list[Path]:
    return [p for p in paths
            if uids.is_uncompressed(read_part10_header(p).transfer_syntax)]


def storage_contexts(paths: Iterable[Path]) -> list[tuple[str, list[str]]]:
    """One presentation context per (SOP class, transfer syntax) of ``paths``."""
    pairs = {(h.sop_class_uid, h.transfer_syntax)
             for h in (read_part10_header(p) for p in paths)}
    return [(sop, [ts]) for sop, ts in sorted(pairs)]


@dataclass
class Stored:
    """One C-STORE our SCP received."""

    calling_ae: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    data: bytes
    fragments: list[int]


class Recorder:
    """Handlers that record what arrives (thread-safe: one thread per association)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.echoes: list[str] = []
        self.stored: list[Stored] = []
        self.rejected: list[tuple[AssociationInfo, AAssociateRJ]] = []
        # on_rejected runs after the A-ASSOCIATE-RJ is sent: wait for it, do not race.
        self.rejected_event = threading.Event()

    def on_c_echo(self, req: Request) -> int:
        with self.lock:
            self.echoes.append(req.assoc.calling_ae)
        return dimse.SUCCESS

    def on_c_store_stream(self, req: Request) -> _Sink:
        return _Sink(self, req)

    def on_rejected(self, info: AssociationInfo, rj: AAssociateRJ) -> None:
        with self.lock:
            self.rejected.append((info, rj))
        self.rejected_event.set()

    def handlers(self, **more: Any) -> Handlers:
        return Handlers(on_c_echo=self.on_c_echo, on_c_store_stream=self.on_c_store_stream,
                        on_rejected=self.on_rejected, **more)

    def instances(self) -> Counter[tuple[str, str, bytes]]:
        return Counter((s.sop_instance, s.transfer_syntax, s.data) for s in self.stored)


class _Sink:
    """A StoreSink that keeps the fragments (copied: they are views into the PDU)."""

    def __init__(self, recorder: Recorder, req: Request) -> None:
        self.recorder = recorder
        self.req = req
        self.parts: list[bytes] = []

    def write(self, data: memoryview) -> None:
        self.parts.append(bytes(data))

    def close(self) -> int:
        msg = self.req.message
        stored = Stored(calling_ae=self.req.assoc.calling_ae,
                        sop_class=msg.affected_sop_class_uid,
                        sop_instance=msg.affected_sop_instance_uid,
                        transfer_syntax=self.req.context.transfer_syntax,
                        data=b"".join(self.parts), fragments=[len(p) for p in self.parts])
        with self.recorder.lock:
            self.recorder.stored.append(stored)
        return dimse.SUCCESS

    def abort(self) -> None:
        self.parts.clear()


@pytest.fixture
def start_scp() -> Iterator[Callable[..., Server]]:
    """Start our SCP on 127.0.0.1 (a port the kernel picks); all shut down at teardown."""
    servers: list[Server] = []

    def start(handlers: Handlers, *, policy: AcceptorPolicy | None = None) -> Server:
        server = Server(handlers, ae_title=OUR_AE, host=LOCALHOST, port=0, policy=policy)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.shutdown()


def wait_for_next_pdu(server: Server, assoc_id: str, timeout: float = 20.0) -> bool:
    """Block until the peer's next PDU is wholly readable on one live association.

    Test-only peeking at the server's internals: it lets an on_c_find handler hold
    its next result until findscu's C-CANCEL is there. The whole PDU, not its
    first bytes: DCMTK writes a P-DATA PDU's header and body in two writes, and the
    server's non-blocking cancel check only sees a C-CANCEL that has fully arrived.
    """
    [sock] = [h.conn.sock for h in list(server._handlers_live)
              if h.info is not None and h.info.id == assoc_id]
    if not select.select([sock], [], [], timeout)[0]:
        return False
    saved = sock.gettimeout()
    sock.settimeout(None)  # MSG_WAITALL needs a blocking socket
    try:
        header = sock.recv(6, socket.MSG_PEEK | socket.MSG_WAITALL)
        length = int.from_bytes(header[2:6], "big")
        return len(sock.recv(6 + length, socket.MSG_PEEK | socket.MSG_WAITALL)) == 6 + length
    finally:
        sock.settimeout(saved)


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """50 generated CT instances of ~64 KiB: 5 series of 10, explicit VR little endian."""
    return make_study(tmp_path_factory.mktemp("ct"), n_series=5, n_instances=10, size_kb=64,
                      patient_id="STORE-1")


@pytest.fixture(scope="module")
def pydicom_uncompressed() -> list[Path]:
    return uncompressed(pydicom_test_files())


# ========================================================== 1. DCMTK -> our SCP


def test_echoscu(dcmtk: Dcmtk, start_scp: Callable[..., Server]) -> None:
    rec = Recorder()
    server = start_scp(rec.handlers())
    check(run_tool([dcmtk.echoscu, "-aet", "ECHOSCU", "-aec", OUR_AE,
                    LOCALHOST, str(server.port)]))
    assert rec.echoes == ["ECHOSCU"]


def test_echoscu_wrong_called_ae_is_rejected(dcmtk: Dcmtk,
                                             start_scp: Callable[..., Server]) -> None:
    rec = Recorder()
    server = start_scp(rec.handlers(), policy=AcceptorPolicy(ae_titles=frozenset({OUR_AE})))
    output = check(run_tool([dcmtk.echoscu, "-aec", "SOMEONE-ELSE", LOCALHOST,
                             str(server.port)]), expect=1)
    assert "Association Rejected" in output
    assert "Result: Rejected Permanent, Source: Service User" in output
    assert "Reason: Called AE Title Not Recognized" in output
    assert rec.echoes == []
    assert rec.rejected_event.wait(10)
    assert [(int(rj.result), int(rj.source), int(rj.reason)) for _, rj in rec.rejected] \
        == [(1, 1, 7)]
    # The right title still gets in.
    check(run_tool([dcmtk.echoscu, "-aec", OUR_AE, LOCALHOST, str(server.port)]))
    assert len(rec.echoes) == 1


def run_storescu(dcmtk: Dcmtk, port: int, options: Sequence[str],
                 files: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Run storescu (-v -nh): returns (files sent in order, files it did not send).

    storescu skips, without failing, files it cannot parse ("ignoring file" with
    -R, "Bad DICOM file" without) and, without -R, files whose SOP class is not
    in its default proposal list ("No presentation context for"). Anything else
    left unsent, and any "Store Failed", fails the test.
    """
    done = run_tool([dcmtk.storescu, "-v", "-nh", *options, LOCALHOST, str(port),
                     *map(str, files)])
    output = check(done)
    assert "Store Failed" not in output, output[-8000:]
    by_name = {str(p): p for p in files}
    sent: list[Path] = []
    explained = {by_name[m] for m in
                 re.findall(r"^W: .* in file: (.+), ignoring file$", done.stderr, re.M)}
    for block in re.split(r"^I: Sending file: ", done.stderr, flags=re.M)[1:]:
        name, _, rest = block.partition("\n")
        if "Sending Store Request" in rest:
            sent.append(by_name[name])
        elif "Bad DICOM file" in rest or "No presentation context for" in rest:
            explained.add(by_name[name])
    unsent = [p for p in files if p not in set(sent)]
    assert set(unsent) == explained, output[-8000:]
    return sent, unsent


def dcmtk_reference(dcmtk: Dcmtk, tmp_path: Path, procs: Procs, options: Sequence[str],
                    files: Sequence[Path]) -> Counter[tuple[str, str, bytes]]:
    """What storescp (+B: bytes as received) gets from the same storescu command."""
    scp = storescp_server(tmp_path, procs, args=["+B", "+uf"], dcmtk=dcmtk)
    run_storescu(dcmtk, scp.port, options, files)
    return instances_in(scp.outdir)


@dataclass(frozen=True)
class StoreCase:
    options: tuple[str, ...] = ()
    pdu: int | None = None  # storescu's -pdu and --max-send-pdu
    accept: tuple[str, ...] | None = None  # the only transfer syntaxes our SCP accepts
    our_max_pdu: int = 1 << 20
    pydicom_files: bool = True
    ct_syntax: str = EXPLICIT_LE  # what the CT files (explicit LE) arrive in
    ids: str = field(default="", compare=False)


STORE_CASES = [
    StoreCase(ids="default"),
    StoreCase(("-R", "-xe"), pdu=4096, ids="xe-pdu4096"),
    StoreCase(("-R", "-xe"), pdu=131072, ids="xe-pdu131072"),
    StoreCase(("-R", "-xb"), pdu=4096, ids="xb-pdu4096"),
    # -xi proposes implicit VR only; with -xd storescu deflates whatever it can.
    StoreCase(("-R", "-xi"), pdu=4096, ct_syntax=IMPLICIT_LE, ids="xi-pdu4096"),
    StoreCase(("-R", "-xi"), pdu=131072, ct_syntax=IMPLICIT_LE, ids="xi-pdu131072"),
    StoreCase(("-R", "-xd"), pdu=131072, ct_syntax=DEFLATED, ids="xd-pdu131072"),
    StoreCase(("-R",), our_max_pdu=4096, ids="our-max-pdu4096"),
    # Our SCP accepts a single syntax: storescu converts every file. Only the
    # generated CT files here: DCMTK's conversion of the real-world files
    # changes them in ways no decoded comparison can tell from damage.
    StoreCase(("-R", "-xb"), pdu=4096, accept=(EXPLICIT_BE,), pydicom_files=False,
              ct_syntax=EXPLICIT_BE, ids="to-big-endian-pdu4096"),
    StoreCase(("-R", "-xd"), pdu=4096, accept=(DEFLATED,), pydicom_files=False,
              ct_syntax=DEFLATED, ids="to-deflated-pdu4096"),
]


@pytest.mark.parametrize("case", STORE_CASES, ids=[c.ids for c in STORE_CASES])
def test_storescu(case: StoreCase, dcmtk: Dcmtk, start_scp: Callable[..., Server],
                  ct_study: list[Path], pydicom_uncompressed: list[Path], tmp_path: Path,
                  procs: Procs) -> None:
    files = ct_study + (pydicom_uncompressed if case.pydicom_files else [])
    rec = Recorder()
    server = start_scp(rec.handlers(), policy=AcceptorPolicy(
        transfer_syntaxes=case.accept, maximum_length=case.our_max_pdu))
    options = list(case.options)
    if case.pdu:
        options += ["-pdu", str(case.pdu), "--max-send-pdu", str(case.pdu)]
    sent, ignored = run_storescu(dcmtk, server.port, options, files)

    assert not set(ignored) & set(ct_study)
    assert len(rec.stored) == len(sent)
    for path, got in zip(sent, rec.stored, strict=True):
        header = read_part10_header(path)
        assert (got.sop_class, got.sop_instance) == (header.sop_class_uid,
                                                     header.sop_instance_uid)
        assert got.calling_ae == "STORESCU"
        if path not in ct_study:
            continue
        assert got.transfer_syntax == case.ct_syntax
        if got.transfer_syntax == header.transfer_syntax:
            assert got.data == dataset_bytes(path), f"{path.name} differs"
        else:
            assert same_dataset(got.data, got.transfer_syntax, path), f"{path.name} differs"

    # P-DATA fragments never exceed what either side allows (PS3.8 §9.3.5:
    # the PDV value is the maximum length less the 6 bytes of PDV header).
    limit = min(case.pdu or case.our_max_pdu, case.our_max_pdu) - 6
    assert max(max(s.fragments) for s in rec.stored) <= limit
    if limit < 8192:
        assert all(len(s.fragments) > 1 for s in rec.stored if len(s.data) > limit)

    if case.accept is None:
        # Same storescu command to storescp: both receivers got the same bytes.
        assert rec.instances() == dcmtk_reference(dcmtk, tmp_path, procs, options, files)


def compressed_groups() -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in pydicom_test_files():
        ts = read_part10_header(path).transfer_syntax
        if ts in STORESCU_PROPOSAL:
            groups.setdefault(ts, []).append(path)
    return groups


@pytest.mark.parametrize("transfer_syntax", sorted(STORESCU_PROPOSAL))
def test_storescu_compressed(transfer_syntax: str, dcmtk: Dcmtk,
                             start_scp: Callable[..., Server], tmp_path: Path,
                             procs: Procs) -> None:
    """Encapsulated pixel data arrives untouched, in the file's own transfer syntax."""
    files = compressed_groups().get(transfer_syntax)
    if not files:
        pytest.skip(f"no pydicom test file in {UID(transfer_syntax).name}")
    rec = Recorder()
    server = start_scp(rec.handlers())
    options = ["-R", STORESCU_PROPOSAL[transfer_syntax], "-pdu", "8192",
               "--max-send-pdu", "8192"]
    sent, _ = run_storescu(dcmtk, server.port, options, files)
    assert sent
    assert [s.sop_instance for s in rec.stored] == \
        [read_part10_header(p).sop_instance_uid for p in sent]
    assert {s.transfer_syntax for s in rec.stored} == {transfer_syntax}
    assert rec.instances() == dcmtk_reference(dcmtk, tmp_path, procs, options, files)


# ---------------------------------------------------------------- C-FIND

_ROOT = "1.2.826.0.1.3680043.10.1442.999"
STUDY_1, STUDY_2, STUDY_3 = f"{_ROOT}.1", f"{_ROOT}.2", f"{_ROOT}.3"
#: (patient ID, name, study number, description, [(modality, instances) per series])
_LAYOUT = [
    ("PAT-A", "Alpha^Anne", 1, "HEAD", [("CT", 2), ("MR", 2)]),
    ("PAT-A", "Alpha^Anne", 2, "CHEST", [("CT", 3)]),
    ("PAT-B", "Beta^Bob", 3, "ABDOMEN", [("CT", 2)]),
]


def qr_records() -> list[Dataset]:
    """An in-memory archive: one Dataset per instance."""
    records = []
    for pid, name, study, description, series in _LAYOUT:
        for number, (modality, count) in enumerate(series, 1):
            for instance in range(1, count + 1):
                ds = Dataset()
                ds.PatientID = pid
                ds.PatientName = name
                ds.PatientBirthDate = "19700101"
                ds.StudyInstanceUID = f"{_ROOT}.{study}"
                ds.StudyDate = f"2024010{study}"
                ds.StudyDescription = description
                ds.AccessionNumber = f"ACC{study}"
                ds.SeriesInstanceUID = f"{_ROOT}.{study}.{number}"
                ds.Modality = modality
                ds.SeriesNumber = number
                ds.SOPClassUID = CT
                ds.SOPInstanceUID = f"{_ROOT}.{study}.{number}.{instance}"
                ds.InstanceNumber = instance
                records.append(ds)
    return records


_LEVEL_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
              "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
_NOT_MATCHED = {"QueryRetrieveLevel", "SpecificCharacterSet"}


def _matches(record: Dataset, query: Dataset) -> bool:
    """PS3.4 C.2.2.2 in small: universal (empty), wildcard (* and ?), single value."""
    for elem in query:
        if elem.keyword in _NOT_MATCHED or elem.value in (None, ""):
            continue
        wanted, have = str(elem.value), str(record.get(elem.keyword, ""))
        if "*" in wanted or "?" in wanted:
            if not fnmatch.fnmatchcase(have, wanted.replace("[", "[[]")):
                return False
        elif have != wanted:
            return False
    return True


def find_matches(records: list[Dataset], query: Dataset) -> list[Dataset]:
    """One identifier per matching entity at the query's level, the query's keys filled."""
    key = _LEVEL_KEY[str(query.QueryRetrieveLevel)]
    seen: set[str] = set()
    found = []
    for record in records:
        if not _matches(record, query) or record[key].value in seen:
            continue
        seen.add(record[key].value)
        identifier = Dataset()
        for elem in query:
            if elem.keyword in record:
                identifier.add(copy.deepcopy(record[elem.tag]))
            else:
                identifier.add(copy.deepcopy(elem))
        found.append(identifier)
    return found


@dataclass
class FindCase:
    model: str  # findscu's -P / -S
    keys: tuple[str, ...]
    expect: list[str]  # the level's unique key of each result, in order


FIND_CASES = {
    "patient-all": FindCase("-P", ("QueryRetrieveLevel=PATIENT", "PatientID=*",
                                   "PatientName", "PatientBirthDate"), ["PAT-A", "PAT-B"]),
    "patient-wildcard-name": FindCase("-P", ("QueryRetrieveLevel=PATIENT", "PatientID",
                                             "PatientName=Bet*"), ["PAT-B"]),
    "patient-root-study": FindCase("-P", ("QueryRetrieveLevel=STUDY", "PatientID=PAT-A",
                                          "StudyInstanceUID", "StudyDate",
                                          "StudyDescription"), [STUDY_1, STUDY_2]),
    "study": FindCase("-S", ("QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                             "AccessionNumber=ACC3", "PatientName"), [STUDY_3]),
    "series": FindCase("-S", ("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={STUDY_1}",
                              "SeriesInstanceUID", "Modality", "SeriesNumber"),
                       [f"{STUDY_1}.1", f"{STUDY_1}.2"]),
    "series-by-modality": FindCase("-S", ("QueryRetrieveLevel=SERIES",
                                          f"StudyInstanceUID={STUDY_1}",
                                          "SeriesInstanceUID", "Modality=MR"),
                                   [f"{STUDY_1}.2"]),
    "image": FindCase("-S", ("QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={STUDY_2}",
                             f"SeriesInstanceUID={STUDY_2}.1", "SOPInstanceUID",
                             "InstanceNumber"),
                      [f"{STUDY_2}.1.1", f"{STUDY_2}.1.2", f"{STUDY_2}.1.3"]),
    "no-match": FindCase("-S", ("QueryRetrieveLevel=STUDY", "PatientID=NOBODY",
                                "StudyInstanceUID"), []),
}


class FindSCP:
    """on_c_find over ``qr_records()``; records queries and what it yielded."""

    def __init__(self) -> None:
        self.records = qr_records()
        self.queries: list[tuple[str, Dataset]] = []
        self.yielded: list[Dataset] = []
        self.server: Server | None = None
        self.wait_for_cancel_after: int | None = None
        self.cancel_seen = threading.Event()

    def on_c_find(self, req: Request, token: CancelToken) -> Iterator[tuple[int, Dataset]]:
        query = req.dataset()
        assert query is not None
        self.queries.append((req.message.affected_sop_class_uid, query))
        for n, identifier in enumerate(find_matches(self.records, query)):
            if n == self.wait_for_cancel_after:
                # Block (no polling) until the C-CANCEL is readable: the server
                # then sees it before sending the next result.
                assert self.server is not None
                if wait_for_next_pdu(self.server, req.assoc.id):
                    self.cancel_seen.set()
            self.yielded.append(identifier)
            yield dimse.PENDING, identifier


def read_responses(folder: Path) -> list[Dataset]:
    """findscu -X output: rsp0001.dcm, rsp0002.dcm... in order, without file meta."""
    found = []
    for path in sorted(folder.glob("rsp*.dcm")):
        ds = pydicom.dcmread(path)
        del ds.file_meta
        found.append(Dataset(ds))
    return found


@pytest.mark.parametrize("name", list(FIND_CASES))
def test_findscu(name: str, dcmtk: Dcmtk, start_scp: Callable[..., Server],
                 tmp_path: Path) -> None:
    case = FIND_CASES[name]
    scp = FindSCP()
    server = start_scp(Handlers(on_c_find=scp.on_c_find))
    out = tmp_path / "responses"
    out.mkdir()
    keys = [arg for key in case.keys for arg in ("-k", key)]
    output = check(run_tool([dcmtk.findscu, "-v", case.model, "-aec", OUR_AE, "-X",
                             "-od", str(out), *keys, LOCALHOST, str(server.port)]))

    model = uids.PATIENT_ROOT_QR_FIND if case.model == "-P" else uids.STUDY_ROOT_QR_FIND
    [(sop_class, query)] = scp.queries
    assert sop_class == model
    for key in case.keys:
        keyword, _, value = key.partition("=")
        assert str(query[keyword].value or "") == value
    level = str(query.QueryRetrieveLevel)
    responses = read_responses(out)
    assert [str(r[_LEVEL_KEY[level]].value) for r in responses] == case.expect
    assert responses == scp.yielded
    assert output.count("Received Find Response") == len(case.expect)
    assert "Received Final Find Response (Success)" in output


def test_findscu_cancel(dcmtk: Dcmtk, start_scp: Callable[..., Server],
                        tmp_path: Path) -> None:
    """findscu --cancel 2: two results, then our SCP ends with Cancel (FE00)."""
    scp = FindSCP()
    scp.wait_for_cancel_after = 2
    server = start_scp(Handlers(on_c_find=scp.on_c_find))
    scp.server = server
    out = tmp_path / "responses"
    out.mkdir()
    output = check(run_tool([dcmtk.findscu, "-v", "-S", "-aec", OUR_AE, "--cancel", "2",
                             "-X", "-od", str(out), "-k", "QueryRetrieveLevel=IMAGE",
                             "-k", f"StudyInstanceUID={STUDY_1}", "-k", "SOPInstanceUID",
                             LOCALHOST, str(server.port)]))
    assert scp.cancel_seen.is_set()
    assert "Sending Cancel Request" in output
    assert "Received Final Find Response (Cancel: MatchingTerminatedDueToCancelRequest)" \
        in output
    responses = read_responses(out)
    assert [r.SOPInstanceUID for r in responses] == [f"{STUDY_1}.1.1", f"{STUDY_1}.1.2"]


# ---------------------------------------------------------- C-MOVE, C-GET


def _suboperation_counts(output: str) -> list[tuple[str, ...]]:
    """(remaining, completed, failed, warning, status) of each C-MOVE response (-d)."""
    pattern = (r"Remaining Suboperations\s*: (\S+)\s+D: Completed Suboperations\s*: (\S+)"
               r"\s+D: Failed Suboperations\s*: (\S+)\s+D: Warning Suboperations\s*: (\S+)"
               r"(?:\s+D: .*?)*?\s+D: DIMSE Status\s*: (0x[0-9a-f]{4})")
    return re.findall(pattern, output)


class RetrieveSCP:
    """on_c_move / on_c_get handing out a fixed list of files."""

    def __init__(self, files: list[Path], destinations: dict[str, MoveDestination]) -> None:
        self.files = files
        self.destinations = destinations
        self.requests: list[tuple[str, Dataset | None]] = []

    def on_c_move(self, req: Request,
                  token: CancelToken) -> tuple[MoveDestination | None, list[Path]]:
        self.requests.append((req.message.move_destination, req.dataset()))
        destination = self.destinations.get(req.message.move_destination)
        return destination, self.files if destination else []

    def on_c_get(self, req: Request, token: CancelToken) -> list[Path]:
        self.requests.append(("", req.dataset()))
        return self.files


def test_movescu(dcmtk: Dcmtk, start_scp: Callable[..., Server], tmp_path: Path,
                 procs: Procs) -> None:
    files = make_study(tmp_path / "study", n_series=2, n_instances=5, size_kb=32)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    store = storescp_server(tmp_path, procs, aet="STORESCP", args=["+B"], dcmtk=dcmtk)
    scp = RetrieveSCP(files, {"STORESCP": MoveDestination(host=LOCALHOST, port=store.port,
                                                          ae_title="STORESCP")})
    server = start_scp(Handlers(on_c_move=scp.on_c_move))
    output = check(run_tool([dcmtk.movescu, "-d", "-S", "-aec", OUR_AE, "-aem", "STORESCP",
                             "-k", "QueryRetrieveLevel=STUDY",
                             "-k", f"StudyInstanceUID={study_uid}",
                             LOCALHOST, str(server.port)]))
    [(destination, identifier)] = scp.requests
    assert destination == "STORESCP"
    assert identifier is not None and identifier.StudyInstanceUID == study_uid
    assert instances_in(store.outdir) == expected_instances(files)
    n = len(files)
    expected = [(str(n - i), str(i), "0", "0", "0xff00") for i in range(1, n)]
    expected.append(("none", str(n), "0", "0", "0x0000"))
    assert _suboperation_counts(output) == expected


def test_movescu_unknown_destination(dcmtk: Dcmtk, start_scp: Callable[..., Server],
                                     tmp_path: Path) -> None:
    scp = RetrieveSCP(make_study(tmp_path / "study", 1, 2, size_kb=4), {})
    server = start_scp(Handlers(on_c_move=scp.on_c_move))
    done = run_tool([dcmtk.movescu, "-d", "-S", "-aec", OUR_AE, "-aem", "NOWHERE",
                     "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3",
                     LOCALHOST, str(server.port)])
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "0xa801: Refused: Move Destination unknown" in output
    assert [d for d, _ in scp.requests] == ["NOWHERE"]


def test_movescu_destination_refuses(dcmtk: Dcmtk, start_scp: Callable[..., Server],
                                     tmp_path: Path, procs: Procs) -> None:
    """Every sub-operation fails at the destination: counts say so, and the final
    status is a failure, A702 (PS3.4 C.4.2.1.4: B000 is for *some* failures)."""
    files = make_study(tmp_path / "study", 1, 3, size_kb=4)
    store = storescp_server(tmp_path, procs, aet="STORESCP", dcmtk=dcmtk)
    store.outdir.rmdir()  # storescp answers A700 when it cannot write
    scp = RetrieveSCP(files, {"STORESCP": MoveDestination(host=LOCALHOST, port=store.port,
                                                          ae_title="STORESCP")})
    server = start_scp(Handlers(on_c_move=scp.on_c_move))
    done = run_tool([dcmtk.movescu, "-d", "-S", "-aec", OUR_AE, "-aem", "STORESCP",
                     "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3",
                     LOCALHOST, str(server.port)])
    output = done.stdout + done.stderr
    counts = _suboperation_counts(output)
    assert counts[-1] == ("none", "0", "3", "0", "0xa702"), output[-4000:]
    assert counts[:-1] == [("2", "0", "1", "0", "0xff00"), ("1", "0", "2", "0", "0xff00")]


def test_getscu(dcmtk: Dcmtk, start_scp: Callable[..., Server], tmp_path: Path) -> None:
    """getscu receives a study on its own association (role selection, PS3.4 C.4.3).

    getscu proposes explicit LE, explicit BE and implicit LE in one context per
    storage class; the acceptor picks explicit LE, so the implicit VR files must
    be converted by our SCP on the way out.
    """
    files = make_study(tmp_path / "study", n_series=2, n_instances=5, size_kb=32)
    by_name = {p.name: p for p in pydicom_test_files()}
    converted = [by_name["MR_small_implicit.dcm"], by_name["rtplan.dcm"]]
    scp = RetrieveSCP(files + converted, {})
    server = start_scp(Handlers(on_c_get=scp.on_c_get))
    out = tmp_path / "got"
    out.mkdir()
    output = check(run_tool([dcmtk.getscu, "-v", "-S", "+B", "-aec", OUR_AE, "-od", str(out),
                             "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3",
                             LOCALHOST, str(server.port)]))
    assert "Number of Completed Suboperations : 12" in output
    assert "Number of Failed Suboperations    : 0" in output
    assert "Received C-GET Response (Success)" in output
    got = instances_in(out)
    for path in converted:
        uid = read_part10_header(path).sop_instance_uid
        [key] = [key for key in got if key[0] == uid]
        _, ts, data = key
        assert ts == EXPLICIT_LE
        assert same_dataset(data, ts, path), path.name
        del got[key]
    assert got == expected_instances(files)  # the rest: byte for byte


# ========================================================== 2. our SCU -> DCMTK


@pytest.mark.parametrize("pdu", [4096, 131072])
def test_store_to_storescp(pdu: int, dcmtk: Dcmtk, ct_study: list[Path], tmp_path: Path,
                           procs: Procs) -> None:
    """Files go out as they are on disk: storescp (+B) writes exactly those bytes."""
    files = ct_study + pydicom_test_files()
    store = storescp_server(tmp_path, procs, args=["+B", "+uf", "-pdu", str(pdu)],
                            dcmtk=dcmtk)
    tiny = make_tiny(transfer_syntax=IMPLICIT_LE)
    contexts = storage_contexts(files)
    with connect(LOCALHOST, store.port, calling_ae="OUR-SCU", called_ae="STORESCP",
                 contexts=contexts, max_pdu=pdu) as assoc:
        assert len(assoc.contexts) == len(contexts)  # storescp +xa takes them all
        statuses = {path.name: int(assoc.store(path).status) for path in files}
        tiny_status = int(assoc.store(tiny).status)
    assert statuses == dict.fromkeys(statuses, dimse.SUCCESS)
    assert tiny_status == dimse.SUCCESS
    got = instances_in(store.outdir)
    [(ts, data)] = [(ts, data) for uid, ts, data in got if uid == tiny.SOPInstanceUID]
    del got[(tiny.SOPInstanceUID, ts, data)]
    assert got == expected_instances(files)
    assert canonical(pydicom_decode(data, ts), ts) == canonical(tiny, EXPLICIT_LE)


@pytest.fixture
def qr_files(tmp_path: Path) -> dict[str, list[Path]]:
    """Two patients: A with a study of 2 series x 3, B with 1 series x 2 (8 KiB each)."""
    return {
        "A": make_study(tmp_path / "a", 2, 3, size_kb=8, patient_id="PAT-A",
                        patient_name="Alpha^Anne"),
        "B": make_study(tmp_path / "b", 1, 2, size_kb=8, patient_id="PAT-B",
                        patient_name="Beta^Bob", seed=7),
    }


def _uid(path: Path, keyword: str) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True)[keyword].value)


QR_MODELS = (uids.PATIENT_ROOT_QR_FIND, uids.STUDY_ROOT_QR_FIND, uids.STUDY_ROOT_QR_MOVE,
             uids.STUDY_ROOT_QR_GET)


def _qr_connect(port: int, **kwargs: Any) -> ClientAssociation:
    contexts: list[tuple[str, list[str]]] = [(m, [EXPLICIT_LE]) for m in QR_MODELS]
    contexts.append((CT, [EXPLICIT_LE]))
    return connect(LOCALHOST, port, calling_ae="OUR-SCU", called_ae="QRSCP",
                   contexts=contexts, roles={CT: (False, True)}, **kwargs)


def _query(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def test_find_on_dcmqrscp(dcmtk: Dcmtk, qr_files: dict[str, list[Path]], tmp_path: Path,
                          procs: Procs) -> None:
    a, b = qr_files["A"], qr_files["B"]
    port = dcmqrscp_server(tmp_path, procs, files=a + b, dcmtk=dcmtk)
    study_a = _uid(a[0], "StudyInstanceUID")
    series_a = [_uid(a[0], "SeriesInstanceUID"), _uid(a[3], "SeriesInstanceUID")]
    cases = [
        (uids.PATIENT_ROOT_QR_FIND, _query("PATIENT", PatientID="", PatientName=""),
         "PatientID", {"PAT-A", "PAT-B"}),
        (uids.PATIENT_ROOT_QR_FIND, _query("PATIENT", PatientID="", PatientName="Bet*"),
         "PatientID", {"PAT-B"}),
        (uids.STUDY_ROOT_QR_FIND, _query("STUDY", PatientID="PAT-A", StudyInstanceUID=""),
         "StudyInstanceUID", {study_a}),
        (uids.STUDY_ROOT_QR_FIND, _query("STUDY", PatientID="", StudyInstanceUID=""),
         "StudyInstanceUID", {study_a, _uid(b[0], "StudyInstanceUID")}),
        (uids.STUDY_ROOT_QR_FIND, _query("SERIES", StudyInstanceUID=study_a,
                                         SeriesInstanceUID=""),
         "SeriesInstanceUID", set(series_a)),
        (uids.STUDY_ROOT_QR_FIND, _query("IMAGE", StudyInstanceUID=study_a,
                                         SeriesInstanceUID=series_a[1], SOPInstanceUID=""),
         "SOPInstanceUID", {_uid(p, "SOPInstanceUID") for p in a[3:]}),
        (uids.STUDY_ROOT_QR_FIND, _query("STUDY", PatientID="NOBODY", StudyInstanceUID=""),
         "StudyInstanceUID", set()),
    ]
    with _qr_connect(port) as assoc:
        for model, query, key, expect in cases:
            responses = list(assoc.find(query, model=model))
            *pending, (final, final_identifier) = responses
            assert final == dimse.SUCCESS and final_identifier is None
            assert all(status == dimse.PENDING for status, _ in pending)
            found = [str(ds[key].value) for _, ds in pending if ds is not None]
            assert sorted(found) == sorted(expect), (query, found)


def test_move_from_dcmqrscp(dcmtk: Dcmtk, qr_files: dict[str, list[Path]], tmp_path: Path,
                            procs: Procs) -> None:
    a, b = qr_files["A"], qr_files["B"]
    store = storescp_server(tmp_path, procs, aet="STORESCP", args=["+B"], dcmtk=dcmtk)
    port = dcmqrscp_server(tmp_path, procs, files=a + b, dcmtk=dcmtk,
                           move_destinations={"STORESCP": (LOCALHOST, store.port)})
    with _qr_connect(port) as assoc:
        responses = list(assoc.move(
            _query("STUDY", StudyInstanceUID=_uid(a[0], "StudyInstanceUID")), "STORESCP"))
    *pending, final = responses
    n = len(a)
    assert [(r.status, r.number_of_remaining_sub_operations,
             r.number_of_completed_sub_operations, r.number_of_failed_sub_operations)
            for r in pending] == [(dimse.PENDING, n - i, i, 0) for i in range(1, n + 1)]
    assert final.status == dimse.SUCCESS
    assert (final.number_of_completed_sub_operations,
            final.number_of_failed_sub_operations) == (n, 0)
    assert instances_in(store.outdir) == expected_instances(a)


def test_get_from_dcmqrscp(dcmtk: Dcmtk, qr_files: dict[str, list[Path]], tmp_path: Path,
                           procs: Procs) -> None:
    a, b = qr_files["A"], qr_files["B"]
    port = dcmqrscp_server(tmp_path, procs, files=a + b, dcmtk=dcmtk)
    got: Counter[tuple[str, str, bytes]] = Counter()

    def on_store(rq: dimse.CStoreRQ, data: bytes, transfer_syntax: str) -> int:
        got[(rq.affected_sop_instance_uid, transfer_syntax, data)] += 1
        return dimse.SUCCESS

    with _qr_connect(port, on_store=on_store) as assoc:
        responses = list(assoc.get(
            _query("STUDY", StudyInstanceUID=_uid(a[0], "StudyInstanceUID"))))
    *pending, final = responses
    n = len(a)
    assert [(r.status, r.number_of_remaining_sub_operations,
             r.number_of_completed_sub_operations) for r in pending] \
        == [(dimse.PENDING, n - i, i) for i in range(1, n + 1)]
    assert final.status == dimse.SUCCESS
    assert final.number_of_completed_sub_operations == n
    assert got == expected_instances(a)


def test_get_cancel_on_dcmqrscp(dcmtk: Dcmtk, qr_files: dict[str, list[Path]],
                                tmp_path: Path, procs: Procs) -> None:
    """C-CANCEL sent while the 2nd sub-operation waits for our C-STORE-RSP.

    Deterministic: dcmqrscp cannot start the 3rd sub-operation before it has
    that response, and the C-CANCEL is on the wire before it.
    """
    a = qr_files["A"]
    port = dcmqrscp_server(tmp_path, procs, files=a, dcmtk=dcmtk)
    received: list[str] = []
    assoc = _qr_connect(port)

    def on_store(rq: dimse.CStoreRQ, data: bytes, transfer_syntax: str) -> int:
        received.append(rq.affected_sop_instance_uid)
        if len(received) == 2:
            assert assoc.current_message_id is not None
            assoc.cancel(assoc.current_message_id, uids.STUDY_ROOT_QR_GET)
        return dimse.SUCCESS

    with assoc:
        responses = list(assoc.get(
            _query("STUDY", StudyInstanceUID=_uid(a[0], "StudyInstanceUID")),
            on_store=on_store))
    final = responses[-1]
    assert final.status == dimse.CANCEL
    assert (final.number_of_completed_sub_operations,
            final.number_of_remaining_sub_operations) == (2, len(a) - 2)
    assert len(received) == 2


# ================================================================= 3. the CLI


def cli(*args: str | int | Path, timeout: float = 60.0) -> Any:
    return run_tool([sys.executable, "-m", "router.cli", *map(str, args)], timeout=timeout)


@pytest.mark.parametrize("command", ["echo", "send", "find", "move", "get", "run", "status",
                                     "reload", "scp"])
def test_cli_help(command: str) -> None:
    output = check(cli(command, "--help"))
    assert f"dicom-router {command}" in output
    if command in ("run", "status", "reload"):
        assert "--config" in output and "--spool" in output
    elif command != "scp":
        assert "-aet" in output and "-aec" in output


def test_cli_echo(dcmtk: Dcmtk, tmp_path: Path, procs: Procs, free_port: int) -> None:
    store = storescp_server(tmp_path, procs, aet="STORESCP", dcmtk=dcmtk)
    output = check(cli("echo", LOCALHOST, store.port, "-aec", "STORESCP", "-r", "3"))
    assert output.count("status 0x0000") == 3
    check(cli("echo", LOCALHOST, free_port, "--timeout", "5"), expect=3)


def test_cli_send(dcmtk: Dcmtk, tmp_path: Path, procs: Procs, free_port: int) -> None:
    folder = tmp_path / "to-send"
    files = make_study(folder / "study", 2, 5, size_kb=16)
    by_name = {p.name: p for p in pydicom_test_files()}
    for name in ("MR_small_implicit.dcm", "rtdose_expb.dcm", "JPEG2000.dcm", "image_dfl.dcm"):
        shutil.copy(by_name[name], folder / name)
        files.append(folder / name)
    store = storescp_server(tmp_path, procs, aet="STORESCP", args=["+B"], dcmtk=dcmtk)
    output = check(cli("send", LOCALHOST, store.port, "-aec", "STORESCP", folder))
    assert f"sent {len(files)} ok, 0 warning, 0 failed, 0 skipped" in output
    assert instances_in(store.outdir) == expected_instances(files)
    check(cli("send", LOCALHOST, free_port, "--timeout", "5", *files[:2]), expect=3)


def test_cli_send_failure_status(dcmtk: Dcmtk, tmp_path: Path, procs: Procs) -> None:
    files = make_study(tmp_path / "study", 1, 3, size_kb=4)
    store = storescp_server(tmp_path, procs, aet="STORESCP", dcmtk=dcmtk)
    store.outdir.rmdir()  # storescp answers A700 (out of resources) when it cannot write
    output = check(cli("send", LOCALHOST, store.port, "-aec", "STORESCP", *files), expect=1)
    assert "sent 0 ok, 0 warning, 3 failed" in output
    assert output.count("C-STORE status 0xA700") == 3


def test_cli_find(dcmtk: Dcmtk, qr_files: dict[str, list[Path]], tmp_path: Path,
                  procs: Procs) -> None:
    a, b = qr_files["A"], qr_files["B"]
    port = dcmqrscp_server(tmp_path, procs, files=a + b, dcmtk=dcmtk)
    output = check(cli("find", LOCALHOST, port, "-aec", "QRSCP", "-S", "-L", "STUDY",
                       "-k", "PatientID=PAT-*", "-k", "StudyInstanceUID", "-k", "PatientName"))
    assert "C-FIND: 2 results, final status 0x0000" in output
    for path in (a[0], b[0]):
        assert _uid(path, "StudyInstanceUID") in output
    output = check(cli("find", LOCALHOST, port, "-aec", "QRSCP", "-P", "-L", "IMAGE",
                       "-k", "PatientID=PAT-B", "-k",
                       f"StudyInstanceUID={_uid(b[0], 'StudyInstanceUID')}",
                       "-k", f"SeriesInstanceUID={_uid(b[0], 'SeriesInstanceUID')}",
                       "-k", "0008,0018"))
    assert "C-FIND: 2 results, final status 0x0000" in output
    for path in b:
        assert _uid(path, "SOPInstanceUID") in output


def test_cli_move(dcmtk: Dcmtk, qr_files: dict[str, list[Path]], tmp_path: Path,
                  procs: Procs) -> None:
    a, b = qr_files["A"], qr_files["B"]
    store = storescp_server(tmp_path, procs, aet="STORESCP", args=["+B"], dcmtk=dcmtk)
    port = dcmqrscp_server(tmp_path, procs, files=a + b, dcmtk=dcmtk,
                           move_destinations={"STORESCP": (LOCALHOST, store.port)})
    output = check(cli("move", LOCALHOST, port, "-aec", "QRSCP", "--dest", "STORESCP",
                       "-k", f"StudyInstanceUID={_uid(b[0], 'StudyInstanceUID')}"))
    # The final response carries no Remaining count: left out, not printed as None.
    assert "C-MOVE status 0x0000 completed 2 failed 0 warning 0" in output, output
    assert "None" not in output, output
    assert instances_in(store.outdir) == expected_instances(b)
    # dcmqrscp knows no such destination: A801, exit 1.
    output = check(cli("move", LOCALHOST, port, "-aec", "QRSCP", "--dest", "NOWHERE",
                       "-k", f"StudyInstanceUID={_uid(b[0], 'StudyInstanceUID')}"), expect=1)
    assert "C-MOVE status 0xA801" in output and "None" not in output, output


def test_cli_get(dcmtk: Dcmtk, qr_files: dict[str, list[Path]], tmp_path: Path,
                 procs: Procs) -> None:
    a, b = qr_files["A"], qr_files["B"]
    port = dcmqrscp_server(tmp_path, procs, files=a + b, dcmtk=dcmtk)
    out = tmp_path / "got"
    output = check(cli("get", LOCALHOST, port, "-aec", "QRSCP", "--out", out,
                       "-k", f"StudyInstanceUID={_uid(a[0], 'StudyInstanceUID')}"))
    assert f"C-GET: {len(a)} instances received into {out}, final status 0x0000" in output
    assert instances_in(out) == expected_instances(a)
