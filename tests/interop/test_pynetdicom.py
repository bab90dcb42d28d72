"""Interoperability with pynetdicom 3, an independent DICOM implementation.

Theory of operation
-------------------
Every DIMSE-C message (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET, C-CANCEL) and every
DIMSE-N service (N-EVENT-REPORT, N-GET, N-SET, N-ACTION, N-CREATE, N-DELETE) is
exercised in both directions:

- direction A (``test_a_*``): a pynetdicom AE is the SCP and our client
  (:func:`router.net.client.connect`) the SCU. One pynetdicom server serves the whole
  module (:class:`PeerSCP`); each test installs its own handlers in ``peer.on`` (its
  server takes 0.5 s to shut down, see below, so one per test would cost seconds);
- direction B (``test_b_*``): our :class:`router.net.server.Server` is the SCP and a
  pynetdicom AE the SCU.

The receiving side's handler records what it got, and the test compares it byte for
byte with what the sending side sent: a file's data set bytes (everything after the
file meta information), or the encoding of a Dataset in the negotiated transfer
syntax. The sender must see the handler's answer unchanged: statuses, pending results
in order, sub-operation counts, type IDs, reply data sets. Then association-level
behaviour: rejection, user identity, release and abort, each way.

Everything runs on 127.0.0.1 (servers bind port 0 and report the port they got) and
is synchronised by ``threading.Event`` with timeouts, never by sleeping.

pynetdicom quirks that shape these tests
----------------------------------------
- Its association server's accept loop is ``socketserver.serve_forever`` with the
  default 0.5 s poll interval, so every ``shutdown()`` takes up to 0.5 s: hence one
  SCP server for the module.
- It runs two threads per association that poll queues with short sleeps; every
  timeout (ACSE, DIMSE, network) is set to a few seconds so a failure cannot hang.
- Sending a file *as is* needs ``_config.STORE_SEND_CHUNKED_DATASET = True`` (a global
  flag; otherwise it decodes the file and re-encodes the Dataset). The C-MOVE/C-GET SCP
  handlers must yield Datasets, which it always re-encodes.
- Only user identity types 3, 4 and 5 (Kerberos, SAML, JWT) ever get a positive
  response from its acceptor.
- A C-CANCEL lands in ``assoc.dimse.cancel_req`` on its reader thread, which notifies
  nothing; ``EVT_DIMSE_RECV`` fires *before* the entry is stored. To wait for it without
  polling, :func:`_notify_cancel` swaps that dict for one that sets an Event.
- Its SCP sends a data set with an N-service response only for success and warning
  statuses, and only when the status is known to the service class.
- As C-MOVE SCP it sends its *own* AE title as Move Originator AE Title (PS3.7
  §9.1.1.1 wants the C-MOVE requestor's); the Move Originator Message ID is right.
- ``ae.associate()`` proposes its own ``max_pdu`` argument (default 16382), not
  ``ae.maximum_pdu_size``, which only applies to associations it accepts.
- pydicom's writer (so pynetdicom's ``encode``) does not byte-swap OW values when a
  Dataset built as little endian is written big endian; we do (PS3.5 §7.3).
- Two races in its requestor, which a fast peer on a loaded machine hits now and then:
  its reactor thread can take the response a ``send_*()`` waits for and drop it ("Received
  unexpected C-... service message"; worked around by
  :func:`_pynetdicom_keeps_its_responses`), and after an A-ASSOCIATE-RJ it may abort
  instead of reporting the rejection (the test reads the RJ PDU itself).
- Its ``event.dataset`` etc. decode lazily; ``event.request.DataSet`` (C-STORE) and the
  other ``BytesIO`` parameters are the raw bytes as received, which is what we compare.
"""

from __future__ import annotations

import array
import copy
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, build_context, build_role, evt
from pynetdicom.association import Association as PynetdicomAssociation
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)

from router.dicom import dimse, pdu, uids
from router.dicom.dataset import encode_dataset, read_part10_header
from router.dicom.errors import LocalProtocolError
from router.dicom.events import AssociationAborted
from router.dicom.negotiation import AcceptorPolicy
from router.dicom.pdu import UserIdentityAC, UserIdentityRQ
from router.net.client import (
    AssociationAbortedError,
    AssociationRejectedError,
    ClientAssociation,
    connect,
)
from router.net.server import (
    AssociationInfo,
    CancelToken,
    Handlers,
    MoveDestination,
    Request,
    Server,
)
from tests.helpers import make_ct, make_tiny, pydicom_test_files, same_content

pytestmark = pytest.mark.interop

TIMEOUT = 5.0
PEER_AE = "PEERSCP"  # the module's pynetdicom SCP
OUR_AE = "OURSCU"  # our client's calling AE title
SCU_AE = "PNDSCU"  # pynetdicom's calling AE title in direction B
ROUTER_AE = "ROUTER"  # our server's AE title

FIND = uids.STUDY_ROOT_QR_FIND
MOVE = uids.STUDY_ROOT_QR_MOVE
GET = uids.STUDY_ROOT_QR_GET
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
STORAGE_CLASSES = (
    CTImageStorage,
    MR_IMAGE_STORAGE,
    SC_IMAGE_STORAGE,
    US_IMAGE_STORAGE,
    US_MULTIFRAME_IMAGE_STORAGE,
)
BASIC_FILM_SESSION = "1.2.840.10008.5.1.1.1"  # Print Management: has N-DELETE
NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
UNCOMPRESSED = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                DeflatedExplicitVRLittleEndian)

#: Real-world files from pydicom's test data, one per interesting encoding.
REAL_FILES = (
    "MR_small_bigendian.dcm",  # Explicit VR Big Endian
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline
    "JPEG2000.dcm",  # JPEG 2000
    "examples_ybr_color.dcm",  # JPEG Baseline, multi-frame, 220 KB: many PDUs
)


# ---------------------------------------------------------------------------
# Data helpers
# ---------------------------------------------------------------------------


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's data set as it goes on the wire: the bytes after the meta."""
    return path.read_bytes()[read_part10_header(path).dataset_offset :]


def wire_bytes(path: Path) -> bytes:
    """What our client sends for a file: its data set, plus one NUL if the length is odd.

    Only a deflated data set can be odd; PS3.5 A.5 pads it to even length but not every
    writer does (pydicom's ``image_dfl.dcm`` is odd), and DCMTK aborts on an odd P-DATA
    fragment, so our sender adds the pad; inflate ignores what follows the stream."""
    data = dataset_bytes(path)
    return data + b"\x00" if len(data) % 2 else data


def file_syntax(path: Path) -> tuple[str, str]:
    """(SOP class, transfer syntax) of a Part 10 file."""
    header = read_part10_header(path)
    return header.sop_class_uid, header.transfer_syntax


def storage_contexts(paths: list[Path]) -> list[tuple[str, list[str]]]:
    """One presentation context per (SOP class, transfer syntax) of the files."""
    return [(sop, [ts]) for sop, ts in dict.fromkeys(file_syntax(p) for p in paths)]


def make_ds(**attrs: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def pynetdicom_encoding(ds: Dataset, transfer_syntax: str) -> bytes:
    """How pynetdicom encodes ``ds`` for a context with ``transfer_syntax``."""
    ts = pydicom.uid.UID(transfer_syntax)
    data = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    assert data is not None
    return data


def study_query(level: str = "STUDY") -> Dataset:
    return make_ds(QueryRetrieveLevel=level, PatientID="TEST*", StudyInstanceUID="",
                   PatientName="")


def find_match(n: int) -> Dataset:
    """A C-FIND match; the second one is in UTF-8 with non-ASCII names."""
    ds = make_ds(QueryRetrieveLevel="STUDY", PatientID=f"TEST{n:04d}",
                 PatientName=f"Match^{n}", StudyInstanceUID=generate_uid(),
                 RetrieveAETitle=PEER_AE)
    if n == 2:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Müller^Jürgen=山田^太郎"
        ds.StudyDescription = "Thorax ± contrast"
    return ds


@pytest.fixture(scope="module")
def real_files() -> list[Path]:
    by_name = {p.name: p for p in pydicom_test_files()}
    missing = [name for name in REAL_FILES if name not in by_name]
    assert not missing, f"pydicom's test files lack {missing}"
    return [by_name[name] for name in REAL_FILES]


@pytest.fixture
def ct_files(tmp_path: Path) -> list[Path]:
    """Three generated CT instances in explicit VR little endian, one per size class."""
    folder = tmp_path / "ct"
    folder.mkdir()
    paths = [folder / f"ct{i}.dcm" for i in range(3)]
    make_tiny(paths[0], seed=1)
    make_ct(paths[1], size_kb=40, seed=2)
    make_ct(paths[2], size_kb=300, seed=3)  # several PDUs at pynetdicom's 16 KB maximum
    return paths


# ---------------------------------------------------------------------------
# pynetdicom as the peer
# ---------------------------------------------------------------------------


def short_timeouts(ae: AE) -> AE:
    ae.acse_timeout = TIMEOUT
    ae.dimse_timeout = TIMEOUT
    ae.network_timeout = TIMEOUT
    return ae


@dataclass(frozen=True, slots=True)
class Stored:
    """One C-STORE as a receiver saw it."""

    sop_class: str
    sop_instance: str
    transfer_syntax: str
    data: bytes
    originator_ae: str | None = None
    originator_id: int | None = None
    called_ae: str | None = None


def stored_by_pynetdicom(event: Any) -> Stored:
    req = event.request
    return Stored(
        sop_class=str(req.AffectedSOPClassUID),
        sop_instance=str(req.AffectedSOPInstanceUID),
        transfer_syntax=str(event.context.transfer_syntax),
        data=req.DataSet.getvalue(),
        originator_ae=req.MoveOriginatorApplicationEntityTitle,
        originator_id=req.MoveOriginatorMessageID,
        called_ae=event.assoc.acceptor.ae_title,
    )


def stored_by_us(request: Request) -> Stored:
    msg = request.message
    assert request.dataset_bytes is not None
    return Stored(
        sop_class=msg.affected_sop_class_uid,
        sop_instance=msg.affected_sop_instance_uid,
        transfer_syntax=request.context.transfer_syntax,
        data=request.dataset_bytes,
        originator_ae=msg.move_originator_application_entity_title,
        originator_id=msg.move_originator_message_id,
        called_ae=request.assoc.called_ae,
    )


_INTERVENTIONS = (
    evt.EVT_C_ECHO, evt.EVT_C_STORE, evt.EVT_C_FIND, evt.EVT_C_MOVE, evt.EVT_C_GET,
    evt.EVT_N_EVENT_REPORT, evt.EVT_N_GET, evt.EVT_N_SET, evt.EVT_N_ACTION,
    evt.EVT_N_CREATE, evt.EVT_N_DELETE, evt.EVT_USER_ID,
)


class PeerSCP:
    """A pynetdicom AE serving every service used here on 127.0.0.1.

    Tests put handlers in ``on`` (pynetdicom event -> handler); without one, C-ECHO
    succeeds, C-STORE is recorded in ``stores`` and answered with ``store_status``, and
    user identity is not checked. ``released``/``aborted`` are keyed by the calling AE
    title, so that a late event from another test's association cannot be mistaken.
    """

    def __init__(self) -> None:
        ae = short_timeouts(AE(ae_title=PEER_AE))
        ae.add_supported_context(uids.VERIFICATION_SOP_CLASS)
        for sop in STORAGE_CLASSES:
            # Accept a C-GET requestor's proposal to be SCP for these (role selection).
            ae.add_supported_context(sop, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        for sop in (FIND, MOVE, GET, uids.STORAGE_COMMITMENT_PUSH_MODEL,
                    uids.MODALITY_PERFORMED_PROCEDURE_STEP, BASIC_FILM_SESSION):
            ae.add_supported_context(sop, UNCOMPRESSED)
        self.ae = ae
        self.on: dict[Any, Callable[[Any], Any]] = {}
        self.stores: list[Stored] = []
        self.store_status: int = 0
        self._lock = threading.Lock()
        self._released: dict[str, threading.Event] = {}
        self._aborted: dict[str, threading.Event] = {}
        #: calling AE title -> PDU Length of each P-DATA-TF received from it
        self.pdata_lengths: dict[str, list[int]] = {}
        handlers = [(event, self._dispatch) for event in _INTERVENTIONS]
        handlers += [(evt.EVT_RELEASED, self._released_event),
                     (evt.EVT_ABORTED, self._aborted_event),
                     (evt.EVT_PDU_RECV, self._pdu_received)]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port: int = self.server.server_address[1]

    def reset(self) -> None:
        self.on.clear()
        self.stores.clear()
        self.store_status = 0
        self.ae.require_called_aet = False
        self.ae.require_calling_aet = []
        self.ae.maximum_pdu_size = 16382  # pynetdicom's default

    def shutdown(self) -> None:
        self.ae.shutdown()

    def released(self, calling_ae: str) -> threading.Event:
        with self._lock:
            return self._released.setdefault(calling_ae, threading.Event())

    def aborted(self, calling_ae: str) -> threading.Event:
        with self._lock:
            return self._aborted.setdefault(calling_ae, threading.Event())

    def _dispatch(self, event: Any) -> Any:
        handler = self.on.get(event.event)
        if handler is not None:
            return handler(event)
        if event.event is evt.EVT_C_ECHO:
            return 0x0000
        if event.event is evt.EVT_C_STORE:
            self.stores.append(stored_by_pynetdicom(event))
            return self.store_status
        # pynetdicom's own default: user identity unchecked, other services failing.
        raise NotImplementedError(event.event.name)

    def _released_event(self, event: Any) -> None:
        self.released(event.assoc.requestor.ae_title).set()

    def _aborted_event(self, event: Any) -> None:
        self.aborted(event.assoc.requestor.ae_title).set()

    def _pdu_received(self, event: Any) -> None:
        if type(event.pdu).__name__ == "P_DATA_TF":
            with self._lock:
                lengths = self.pdata_lengths.setdefault(event.assoc.requestor.ae_title, [])
            lengths.append(event.pdu.pdu_length)


@pytest.fixture(scope="module", autouse=True)
def _pynetdicom_keeps_its_responses() -> Iterator[None]:
    """Work around a race in pynetdicom's requestor (see the module docstring).

    ``send_*()`` pauses the association's reactor thread (``_reactor_checkpoint.clear()``
    then waits for ``_is_paused``), but ``_is_paused`` is still True from the reactor's
    previous pause when it was released a moment earlier, so the reactor can wake up
    after the request went out and take the *response* off the queue; its
    ``_serve_request`` logs "Received unexpected C-... service message" and drops it, and
    ``send_*()`` times out. A fast peer on a loaded machine hits this now and then. Here a
    response taken while a ``send_*()`` is waiting (checkpoint cleared) is put back for it;
    anything else is left to pynetdicom as before.
    """
    original = PynetdicomAssociation._serve_request

    def serve_request(self: Any, msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and not self._reactor_checkpoint.is_set():
            self.dimse.msg_queue.put((context_id, msg))
            return
        original(self, msg, context_id)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PynetdicomAssociation, "_serve_request", serve_request)
        yield


@pytest.fixture(scope="module")
def _peer_scp_server() -> Iterator[PeerSCP]:
    peer = PeerSCP()
    try:
        yield peer
    finally:
        peer.shutdown()


@pytest.fixture
def peer(_peer_scp_server: PeerSCP) -> Iterator[PeerSCP]:
    """The module's pynetdicom SCP, with this test's handlers only."""
    _peer_scp_server.reset()
    yield _peer_scp_server
    _peer_scp_server.reset()


@pytest.fixture
def scu_ae() -> Iterator[Callable[..., AE]]:
    """Factory of pynetdicom AEs for direction B; all shut down (associations aborted)."""
    made: list[AE] = []

    def make(ae_title: str = SCU_AE) -> AE:
        ae = short_timeouts(AE(ae_title=ae_title))
        made.append(ae)
        return ae

    yield make
    for ae in made:
        ae.shutdown()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """Factory of our servers on 127.0.0.1, port chosen by the kernel; all shut down."""
    started: list[Server] = []

    def start(handlers: Handlers | None = None, *, ae_title: str = ROUTER_AE,
              policy: AcceptorPolicy | None = None) -> Server:
        server = Server(handlers or Handlers(), ae_title=ae_title, host="127.0.0.1", port=0,
                        policy=policy, artim_timeout=TIMEOUT)
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.shutdown()


@pytest.fixture
def send_files_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pynetdicom's send_c_store(path) send the file's bytes instead of re-encoding."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def our_client(port: int, contexts: list[tuple[str, list[str]]] | None = None, *,
               calling_ae: str = OUR_AE, called_ae: str = PEER_AE,
               **kwargs: Any) -> ClientAssociation:
    return connect("127.0.0.1", port, calling_ae=calling_ae, called_ae=called_ae,
                   contexts=contexts, acse_timeout=TIMEOUT, dimse_timeout=TIMEOUT, **kwargs)


def associate(ae: AE, port: int, *, ae_title: str = ROUTER_AE, **kwargs: Any) -> Any:
    """pynetdicom association to our server; fails the test unless established."""
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title, **kwargs)
    assert assoc.is_established, "pynetdicom could not associate with our server"
    return assoc


def context_id(assoc: Any, abstract_syntax: str) -> int:
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == abstract_syntax:
            return int(cx.context_id)
    raise AssertionError(f"no accepted context for {abstract_syntax}")


class ResponseLog:
    """Command sets of the DIMSE messages a pynetdicom association received."""

    def __init__(self) -> None:
        self.commands: list[Dataset] = []

    def handler(self, event: Any) -> None:
        self.commands.append(event.message.command_set)

    @property
    def evt_handlers(self) -> list[tuple[Any, Callable[[Any], None]]]:
        return [(evt.EVT_DIMSE_RECV, self.handler)]


# ===========================================================================
# Direction A: pynetdicom is the SCP, our client the SCU
# ===========================================================================


@pytest.mark.parametrize("status", [0x0000, 0x0211])
def test_a_c_echo(peer: PeerSCP, status: int) -> None:
    seen: list[tuple[int, str]] = []

    def on_echo(event: Any) -> int:
        seen.append((event.request.MessageID, event.request.AffectedSOPClassUID))
        return status

    peer.on[evt.EVT_C_ECHO] = on_echo
    with our_client(peer.port) as client:
        assert client.echo() == status
        assert seen == [(client.current_message_id, uids.VERIFICATION_SOP_CLASS)]


def test_a_c_store_files_byte_for_byte(peer: PeerSCP, ct_files: list[Path],
                                       real_files: list[Path], tmp_path: Path) -> None:
    """Each file goes in its own transfer syntax and arrives exactly as it is on disk."""
    generated = {"implicit.dcm": ImplicitVRLittleEndian, "big.dcm": ExplicitVRBigEndian,
                 "deflated.dcm": DeflatedExplicitVRLittleEndian}
    for name, ts in generated.items():
        make_ct(tmp_path / name, size_kb=20, transfer_syntax=ts)
    files = [*ct_files, *(tmp_path / name for name in generated), *real_files]
    with our_client(peer.port, storage_contexts(files)) as client:
        for path in files:
            sop_class, ts = file_syntax(path)
            assert client.context_for(sop_class, ts).transfer_syntax == ts
            rsp = client.store(path)
            assert rsp.status == 0x0000, path.name
            assert rsp.affected_sop_instance_uid == read_part10_header(path).sop_instance_uid
    assert len(peer.stores) == len(files)
    for path, got in zip(files, peer.stores, strict=True):
        header = read_part10_header(path)
        assert (got.sop_class, got.sop_instance, got.transfer_syntax) == (
            header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax), path.name
        assert got.data == wire_bytes(path), f"{path.name}: bytes differ"
        assert got.originator_ae is None and got.originator_id is None


@pytest.mark.parametrize("transfer_syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian,
                                             ExplicitVRBigEndian])
def test_a_c_store_dataset_encoded_like_pynetdicom(peer: PeerSCP, transfer_syntax: str) -> None:
    """A Dataset is encoded in the context's syntax exactly as pynetdicom itself would,
    except that we byte-swap OW pixel data for big endian (PS3.5 §7.3) and pydicom's
    writer does not: so pynetdicom's bytes are compared after swapping the words."""
    ds = make_tiny()
    with our_client(peer.port, [(CTImageStorage, [transfer_syntax])]) as client:
        assert client.store(ds).status == 0x0000
    [got] = peer.stores
    assert got.transfer_syntax == transfer_syntax
    expected = ds
    if transfer_syntax == ExplicitVRBigEndian:
        expected = copy.deepcopy(ds)
        words = array.array("H", ds.PixelData)
        words.byteswap()
        expected.PixelData = words.tobytes()
    assert got.data == pynetdicom_encoding(expected, transfer_syntax)


CONVERSIONS = [(ExplicitVRLittleEndian, ImplicitVRLittleEndian),
               (ExplicitVRBigEndian, ExplicitVRLittleEndian),
               (ImplicitVRLittleEndian, ExplicitVRBigEndian)]
CONVERSION_IDS = ["explicit-to-implicit", "big-to-little", "implicit-to-big"]


@pytest.mark.parametrize(("file_ts", "context_ts"), CONVERSIONS, ids=CONVERSION_IDS)
def test_a_c_store_converts_between_uncompressed(peer: PeerSCP, tmp_path: Path, file_ts: str,
                                                 context_ts: str) -> None:
    """Only another uncompressed syntax accepted: we re-encode, and pynetdicom decodes
    the same elements and pixel values (OW words swapped when the byte order changes)."""
    path = tmp_path / "ct.dcm"
    make_ct(path, size_kb=20, transfer_syntax=file_ts)
    decoded: list[Dataset] = []

    def on_store(event: Any) -> int:
        decoded.append(event.dataset)
        return 0x0000

    peer.on[evt.EVT_C_STORE] = on_store
    with our_client(peer.port, [(CTImageStorage, [context_ts])]) as client:
        assert client.store(path).status == 0x0000
    [got] = decoded
    assert got.original_encoding == (pydicom.uid.UID(context_ts).is_implicit_VR,
                                     pydicom.uid.UID(context_ts).is_little_endian)
    same_content(got, path)


@pytest.mark.parametrize(
    ("answer", "status", "comment"),
    [
        (0xB000, 0xB000, None),  # warning: coercion of data elements
        (0xA700, 0xA700, None),  # refused: out of resources
        (make_ds(Status=0xC000, ErrorComment="cannot parse"), 0xC000, "cannot parse"),
    ],
    ids=["warning", "out-of-resources", "error-comment"],
)
def test_a_c_store_statuses(peer: PeerSCP, answer: Any, status: int,
                            comment: str | None) -> None:
    peer.on[evt.EVT_C_STORE] = lambda event: answer
    ds = make_tiny()
    contexts = [(CTImageStorage, [ExplicitVRLittleEndian]),
                (uids.VERIFICATION_SOP_CLASS, [ExplicitVRLittleEndian])]
    with our_client(peer.port, contexts) as client:
        rsp = client.store(ds)
        assert client.echo() == 0x0000  # the association carries on
    assert rsp.status == status
    assert rsp.error_comment == comment
    assert rsp.affected_sop_instance_uid == ds.SOPInstanceUID


@pytest.mark.parametrize("final", [None, 0xA700, 0xC001], ids=["success", "refused", "failed"])
def test_a_c_find(peer: PeerSCP, final: int | None) -> None:
    """Pending results arrive in order with their identifiers; the final status too."""
    matches = [(0xFF00, find_match(1)), (0xFF01, find_match(2)), (0xFF00, find_match(3))]
    seen: list[tuple[int, bytes, str]] = []

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        seen.append((event.request.MessageID, event.request.Identifier.getvalue(),
                     str(event.context.transfer_syntax)))
        yield from matches
        if final is not None:
            yield final, None

    peer.on[evt.EVT_C_FIND] = on_find
    query = study_query()
    with our_client(peer.port, [(FIND, [ExplicitVRLittleEndian])]) as client:
        results = list(client.find(query))
        mid = client.current_message_id
    assert [status for status, _ in results] == [s for s, _ in matches] + [final or 0x0000]
    assert [ds for _, ds in results] == [ds for _, ds in matches] + [None]
    assert seen == [(mid, encode_dataset(query, ExplicitVRLittleEndian), ExplicitVRLittleEndian)]


@pytest.mark.parametrize("transfer_syntax", UNCOMPRESSED)
def test_a_c_find_identifier_encodings(peer: PeerSCP, transfer_syntax: str) -> None:
    """Query and matches in each uncompressed syntax, with a sequence and a multi-valued
    element: both sides encode and decode them alike."""
    match = find_match(9)
    match.ModalitiesInStudy = ["CT", "MR"]
    match.ReferencedStudySequence = [make_ds(ReferencedSOPClassUID=CTImageStorage,
                                             ReferencedSOPInstanceUID=generate_uid())]
    got: list[bytes] = []

    def on_find(event: Any) -> Iterator[tuple[int, Dataset]]:
        got.append(event.request.Identifier.getvalue())
        yield 0xFF00, match

    peer.on[evt.EVT_C_FIND] = on_find
    query = study_query()
    query.ModalitiesInStudy = ["CT", "MR"]
    with our_client(peer.port, [(FIND, [transfer_syntax])]) as client:
        results = list(client.find(query))
    assert results == [(0xFF00, match), (0x0000, None)]
    assert got == [encode_dataset(query, transfer_syntax)]
    assert got == [pynetdicom_encoding(query, transfer_syntax)]


def test_a_deflated_identifier_has_even_length(peer: PeerSCP) -> None:
    """PS3.5 A.5 pads an odd deflated stream with one NUL (PS3.8 Annex E: fragments are
    even), as pydicom's writer and pynetdicom do; DCMTK aborts on an odd fragment."""
    got: list[bytes] = []

    def on_find(event: Any) -> Iterator[tuple[int, Dataset]]:
        got.append(event.request.Identifier.getvalue())
        yield from ()

    peer.on[evt.EVT_C_FIND] = on_find
    query = study_query()
    query.ModalitiesInStudy = ["CT", "MR"]  # fixed content that deflates to 55 bytes
    with our_client(peer.port, [(FIND, [DeflatedExplicitVRLittleEndian])]) as client:
        assert list(client.find(query)) == [(0x0000, None)]
    [identifier] = got
    assert len(identifier) % 2 == 0
    assert identifier == pynetdicom_encoding(query, DeflatedExplicitVRLittleEndian)


def _notify_cancel(assoc: Any) -> threading.Event:
    """An Event set when pynetdicom's reader thread files a C-CANCEL for ``assoc``.

    pynetdicom keeps received C-CANCELs in ``assoc.dimse.cancel_req`` and tells nobody;
    this swaps that dict for one that signals on insertion (see the module docstring).
    """
    arrived = threading.Event()

    class _Signalling(dict):  # type: ignore[type-arg]
        def __setitem__(self, key: Any, value: Any) -> None:
            super().__setitem__(key, value)
            arrived.set()

    assoc.dimse.cancel_req = _Signalling(assoc.dimse.cancel_req)
    return arrived


def test_a_c_cancel_find(peer: PeerSCP) -> None:
    """We cancel a running C-FIND after its first result; pynetdicom ends it with FE00."""
    observed: dict[str, bool] = {}

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        arrived = _notify_cancel(event.assoc)
        yield 0xFF00, find_match(1)
        observed["arrived"] = arrived.wait(TIMEOUT)
        observed["cancelled"] = event.is_cancelled
        if observed["cancelled"]:
            yield 0xFE00, None
            return
        yield 0xFF00, find_match(2)  # not cancelled: the test fails on the statuses

    peer.on[evt.EVT_C_FIND] = on_find
    contexts = [(FIND, [ExplicitVRLittleEndian]),
                (uids.VERIFICATION_SOP_CLASS, [ExplicitVRLittleEndian])]
    with our_client(peer.port, contexts) as client:
        results = client.find(study_query())
        first_status, first = next(results)
        assert first_status == 0xFF00 and first is not None
        client.cancel(client.current_message_id, FIND)  # type: ignore[arg-type]
        rest = list(results)
        assert client.echo() == 0x0000  # the association carries on
    assert observed == {"arrived": True, "cancelled": True}
    assert rest == [(0xFE00, None)]


class Destination:
    """Our server as a storage SCP that records each C-STORE; fails the instances in
    ``fail`` with A700."""

    def __init__(self, serve: Callable[..., Server], ae_title: str = "OURSTORE") -> None:
        self.stores: list[Stored] = []
        self.fail: set[str] = set()
        self.server = serve(Handlers(on_c_store=self._store), ae_title=ae_title)
        self.ae_title = ae_title

    def _store(self, request: Request) -> int:
        got = stored_by_us(request)
        self.stores.append(got)
        return 0xA700 if got.sop_instance in self.fail else 0x0000


@pytest.mark.parametrize("fail_second", [False, True], ids=["all-stored", "one-failed"])
def test_a_c_move(peer: PeerSCP, serve: Callable[..., Server], ct_files: list[Path],
                  fail_second: bool) -> None:
    """pynetdicom moves three instances to our server; we see every pending count."""
    dest = Destination(serve)
    if fail_second:
        dest.fail.add(read_part10_header(ct_files[1]).sop_instance_uid)
    seen: list[tuple[bytes, str]] = []

    def on_move(event: Any) -> Iterator[Any]:
        seen.append((event.request.Identifier.getvalue(), event.move_destination))
        yield "127.0.0.1", dest.server.port, {
            "contexts": [build_context(CTImageStorage, ExplicitVRLittleEndian)]}
        yield len(ct_files)
        for path in ct_files:
            yield 0xFF00, pydicom.dcmread(path)

    peer.on[evt.EVT_C_MOVE] = on_move
    query = study_query()
    with our_client(peer.port, [(MOVE, [ExplicitVRLittleEndian])]) as client:
        responses = list(client.move(query, dest.ae_title))
        mid = client.current_message_id
    assert seen == [(encode_dataset(query, ExplicitVRLittleEndian), dest.ae_title)]
    failed = 1 if fail_second else 0
    pending = responses[:-1]
    assert [r.status for r in pending] == [0xFF00] * 3
    assert [r.number_of_remaining_sub_operations for r in pending] == [2, 1, 0]
    assert [(r.number_of_completed_sub_operations or 0) + (r.number_of_failed_sub_operations
            or 0) for r in pending] == [1, 2, 3]
    final = responses[-1]
    assert final.status == (0xB000 if fail_second else 0x0000)
    assert final.number_of_completed_sub_operations == 3 - failed
    assert final.number_of_failed_sub_operations == failed
    assert final.number_of_warning_sub_operations == 0
    # The destination got each data set exactly as it is in the file.
    assert [s.data for s in dest.stores] == [dataset_bytes(p) for p in ct_files]
    # pynetdicom quirk: it sends its *own* AE title as Move Originator AE Title, where
    # PS3.7 §9.1.1.1 wants the C-MOVE requestor's (ours); the message ID is right.
    assert {(s.originator_ae, s.originator_id, s.called_ae) for s in dest.stores} == {
        (PEER_AE, mid, dest.ae_title)}


def test_a_c_move_unknown_destination(peer: PeerSCP) -> None:
    def on_move(event: Any) -> Iterator[Any]:
        yield None, None

    peer.on[evt.EVT_C_MOVE] = on_move
    with our_client(peer.port, [(MOVE, [ExplicitVRLittleEndian])]) as client:
        [final] = list(client.move(study_query(), "NOWHERE"))
    assert final.status == 0xA801


@pytest.mark.parametrize("fail_second", [False, True], ids=["all-stored", "one-failed"])
def test_a_c_get(peer: PeerSCP, ct_files: list[Path], fail_second: bool) -> None:
    """pynetdicom sends the C-STOREs back on our association (we are SCP by role
    selection); our on_store gets each data set byte for byte."""
    received: list[tuple[dimse.CStoreRQ, bytes, str]] = []
    fail = read_part10_header(ct_files[1]).sop_instance_uid if fail_second else None

    def on_store(rq: dimse.CStoreRQ, data: bytes, ts: str) -> int:
        received.append((rq, data, ts))
        return 0xA700 if rq.affected_sop_instance_uid == fail else 0x0000

    seen: list[bytes] = []

    def on_get(event: Any) -> Iterator[Any]:
        seen.append(event.request.Identifier.getvalue())
        yield len(ct_files)
        for path in ct_files:
            yield 0xFF00, pydicom.dcmread(path)

    peer.on[evt.EVT_C_GET] = on_get
    query = study_query()
    contexts = [(GET, [ExplicitVRLittleEndian]), (CTImageStorage, [ExplicitVRLittleEndian])]
    with our_client(peer.port, contexts, roles={CTImageStorage: (False, True)},
                    on_store=on_store) as client:
        ctx = client.context_for(CTImageStorage, scp=True)
        assert (ctx.requestor_scu, ctx.requestor_scp) == (False, True)
        responses = list(client.get(query))
    assert seen == [encode_dataset(query, ExplicitVRLittleEndian)]
    assert [data for _, data, _ in received] == [dataset_bytes(p) for p in ct_files]
    assert {ts for _, _, ts in received} == {ExplicitVRLittleEndian}
    assert [rq.affected_sop_instance_uid for rq, _, _ in received] == [
        read_part10_header(p).sop_instance_uid for p in ct_files]
    pending = responses[:-1]
    assert [r.status for r in pending] == [0xFF00] * 3
    assert [r.number_of_remaining_sub_operations for r in pending] == [2, 1, 0]
    failed = 1 if fail_second else 0
    assert [r.number_of_failed_sub_operations for r in pending] == (
        [0, 1, 1] if fail_second else [0, 0, 0])
    final = responses[-1]
    assert final.status == (0xB000 if fail_second else 0x0000)
    assert final.number_of_completed_sub_operations == 3 - failed
    assert final.number_of_failed_sub_operations == failed


@pytest.mark.parametrize("max_pdu", [0, 4096, 16382, 1 << 20],
                         ids=["unlimited", "4K", "default", "1M"])
def test_a_c_store_respects_peer_max_pdu(peer: PeerSCP, ct_files: list[Path],
                                         real_files: list[Path], max_pdu: int) -> None:
    """Our P-DATA-TF PDUs never exceed the Maximum Length pynetdicom advertised (PS3.8
    D.1), and use it when it is large; the data sets still arrive byte for byte."""
    peer.ae.maximum_pdu_size = max_pdu
    calling = f"MAXPDU{max_pdu}"
    files = [ct_files[2], real_files[4]]  # 300 KB CT, 220 KB multi-frame JPEG
    with our_client(peer.port, storage_contexts(files), calling_ae=calling) as client:
        assert client.peer_max_pdu == max_pdu
        for path in files:
            assert client.store(path).status == 0x0000
    assert [s.data for s in peer.stores] == [dataset_bytes(p) for p in files]
    lengths = peer.pdata_lengths.pop(calling)
    if max_pdu:
        assert max(lengths) <= max_pdu
    if 0 < max_pdu < 100_000:
        assert max(lengths) > max_pdu - 64  # big data sets fill the PDUs
    else:  # no small limit: we send big PDUs (DESIGN.md §4), not pynetdicom's default size
        assert max(lengths) > 100_000


def test_a_c_cancel_get(peer: PeerSCP, ct_files: list[Path]) -> None:
    """We send C-CANCEL while handling the first C-STORE sub-operation of a C-GET;
    pynetdicom stops and answers FE00 with the counts so far."""
    observed: dict[str, bool] = {}

    def on_get(event: Any) -> Iterator[Any]:
        yield len(ct_files)
        yield 0xFF00, pydicom.dcmread(ct_files[0])
        # Our C-CANCEL went out before our C-STORE-RSP, so it is filed by now.
        observed["cancelled"] = event.is_cancelled
        if observed["cancelled"]:
            yield 0xFE00, None
            return
        for path in ct_files[1:]:
            yield 0xFF00, pydicom.dcmread(path)

    clients: list[ClientAssociation] = []
    received: list[bytes] = []

    def on_store(rq: dimse.CStoreRQ, data: bytes, ts: str) -> int:
        received.append(data)
        client = clients[0]
        client.cancel(client.current_message_id, GET)  # type: ignore[arg-type]
        return 0x0000

    peer.on[evt.EVT_C_GET] = on_get
    contexts = [(GET, [ExplicitVRLittleEndian]), (CTImageStorage, [ExplicitVRLittleEndian])]
    with our_client(peer.port, contexts, roles={CTImageStorage: (False, True)},
                    on_store=on_store) as client:
        clients.append(client)
        responses = list(client.get(study_query()))
    assert observed == {"cancelled": True}
    assert received == [dataset_bytes(ct_files[0])]
    assert [(r.status, r.number_of_remaining_sub_operations,
             r.number_of_completed_sub_operations) for r in responses] == [
        (0xFF00, 2, 1), (0xFE00, 2, 1)]


# --- DIMSE-N, direction A ---------------------------------------------------

#: (status the handler answers, whether it answers with a data set)
N_OUTCOMES = [(0x0000, True), (0x0107, True), (0x0110, False)]
N_IDS = ["success", "warning", "failure"]


def commitment_info() -> Dataset:
    return make_ds(TransactionUID=generate_uid(), ReferencedSOPSequence=[
        make_ds(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=generate_uid())
    ])


def mpps_attributes() -> Dataset:
    return make_ds(PerformedProcedureStepStatus="IN PROGRESS", PatientName="Doe^Jane",
                   PatientID="TEST0001", PerformedStationAETitle=OUR_AE,
                   PerformedProcedureStepStartDate="20240102")


N_CONTEXTS = [(uids.STORAGE_COMMITMENT_PUSH_MODEL, list(NATIVE)),
              (uids.MODALITY_PERFORMED_PROCEDURE_STEP, [ImplicitVRLittleEndian]),
              (BASIC_FILM_SESSION, [ExplicitVRLittleEndian])]


@pytest.mark.parametrize(("status", "with_reply"), N_OUTCOMES, ids=N_IDS)
def test_a_n_event_report(peer: PeerSCP, status: int, with_reply: bool) -> None:
    info = commitment_info()
    reply = make_ds(TransactionUID=info.TransactionUID) if with_reply else None
    seen: list[tuple[Any, ...]] = []

    def handler(event: Any) -> tuple[int, Dataset | None]:
        req = event.request
        seen.append((req.AffectedSOPClassUID, req.AffectedSOPInstanceUID, event.event_type,
                     req.EventInformation.getvalue(), str(event.context.transfer_syntax)))
        return status, reply

    peer.on[evt.EVT_N_EVENT_REPORT] = handler
    sop, inst = uids.STORAGE_COMMITMENT_PUSH_MODEL, uids.STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE
    with our_client(peer.port, N_CONTEXTS) as client:
        ts = client.context_for(sop).transfer_syntax
        rsp, got = client.n_event_report(sop, inst, 1, info)
    assert seen == [(sop, inst, 1, encode_dataset(info, ts), ts)]
    assert isinstance(rsp, dimse.NEventReportRSP)
    assert (rsp.status, rsp.event_type_id, rsp.affected_sop_instance_uid) == (status, 1, inst)
    assert got == reply


N_GET_TAGS = [Tag("PatientName"), Tag("PerformedProcedureStepStatus"), Tag(0x0040, 0x0244)]


@pytest.mark.parametrize(("status", "with_reply", "tags"), [
    *[(status, with_reply, N_GET_TAGS) for status, with_reply in N_OUTCOMES],
    (0x0000, True, []),
], ids=[*N_IDS, "all-attributes"])
def test_a_n_get(peer: PeerSCP, status: int, with_reply: bool, tags: list[int]) -> None:
    attributes = mpps_attributes()
    seen: list[tuple[Any, ...]] = []

    def handler(event: Any) -> tuple[int, Dataset | None]:
        req = event.request
        seen.append((req.RequestedSOPClassUID, req.RequestedSOPInstanceUID,
                     list(event.attribute_identifiers)))
        return status, attributes if with_reply else None

    peer.on[evt.EVT_N_GET] = handler
    sop, inst = uids.MODALITY_PERFORMED_PROCEDURE_STEP, generate_uid()
    with our_client(peer.port, N_CONTEXTS) as client:
        rsp, got = client.n_get(sop, inst, tags)
    assert seen == [(sop, inst, tags)]
    assert isinstance(rsp, dimse.NGetRSP)
    assert (rsp.status, rsp.affected_sop_instance_uid) == (status, inst)
    assert got == (attributes if with_reply else None)


@pytest.mark.parametrize(("status", "with_reply"), N_OUTCOMES, ids=N_IDS)
def test_a_n_set(peer: PeerSCP, status: int, with_reply: bool) -> None:
    modification = make_ds(PerformedProcedureStepStatus="COMPLETED",
                           PerformedProcedureStepEndDate="20240102")
    seen: list[tuple[Any, ...]] = []

    def handler(event: Any) -> tuple[int, Dataset | None]:
        req = event.request
        seen.append((req.RequestedSOPClassUID, req.RequestedSOPInstanceUID,
                     req.ModificationList.getvalue(), str(event.context.transfer_syntax)))
        return status, modification if with_reply else None

    peer.on[evt.EVT_N_SET] = handler
    sop, inst = uids.MODALITY_PERFORMED_PROCEDURE_STEP, generate_uid()
    with our_client(peer.port, N_CONTEXTS) as client:
        rsp, got = client.n_set(sop, inst, modification)
    assert seen == [(sop, inst, encode_dataset(modification, ImplicitVRLittleEndian),
                     ImplicitVRLittleEndian)]
    assert isinstance(rsp, dimse.NSetRSP)
    assert (rsp.status, rsp.affected_sop_instance_uid) == (status, inst)
    assert got == (modification if with_reply else None)


@pytest.mark.parametrize(("status", "with_reply"), N_OUTCOMES, ids=N_IDS)
def test_a_n_action(peer: PeerSCP, status: int, with_reply: bool) -> None:
    info = commitment_info()
    reply = make_ds(TransactionUID=info.TransactionUID) if with_reply else None
    seen: list[tuple[Any, ...]] = []

    def handler(event: Any) -> tuple[int, Dataset | None]:
        req = event.request
        seen.append((req.RequestedSOPClassUID, req.RequestedSOPInstanceUID, event.action_type,
                     req.ActionInformation.getvalue(), str(event.context.transfer_syntax)))
        return status, reply

    peer.on[evt.EVT_N_ACTION] = handler
    sop, inst = uids.STORAGE_COMMITMENT_PUSH_MODEL, uids.STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE
    with our_client(peer.port, N_CONTEXTS) as client:
        ts = client.context_for(sop).transfer_syntax
        rsp, got = client.n_action(sop, inst, 1, info)
    assert seen == [(sop, inst, 1, encode_dataset(info, ts), ts)]
    assert isinstance(rsp, dimse.NActionRSP)
    assert (rsp.status, rsp.action_type_id, rsp.affected_sop_instance_uid) == (status, 1, inst)
    assert got == reply


@pytest.mark.parametrize(("status", "with_reply"), N_OUTCOMES, ids=N_IDS)
def test_a_n_create(peer: PeerSCP, status: int, with_reply: bool) -> None:
    attributes = mpps_attributes()
    seen: list[tuple[Any, ...]] = []

    def handler(event: Any) -> tuple[int, Dataset | None]:
        req = event.request
        seen.append((req.AffectedSOPClassUID, req.AffectedSOPInstanceUID,
                     req.AttributeList.getvalue()))
        return status, attributes if with_reply else None

    peer.on[evt.EVT_N_CREATE] = handler
    sop, inst = uids.MODALITY_PERFORMED_PROCEDURE_STEP, generate_uid()
    with our_client(peer.port, N_CONTEXTS) as client:
        rsp, got = client.n_create(sop, inst, attributes)
    assert seen == [(sop, inst, encode_dataset(attributes, ImplicitVRLittleEndian))]
    assert isinstance(rsp, dimse.NCreateRSP)
    assert (rsp.status, rsp.affected_sop_instance_uid) == (status, inst)
    assert got == (attributes if with_reply else None)


def test_a_n_create_instance_assigned_by_scp(peer: PeerSCP) -> None:
    """N-CREATE without an Affected SOP Instance UID: the SCP assigns one and returns it
    in the response (PS3.7 §10.1.5.1.4); pynetdicom's handler puts it in the reply."""
    assigned = generate_uid()
    seen: list[str | None] = []

    def handler(event: Any) -> tuple[int, Dataset]:
        seen.append(event.request.AffectedSOPInstanceUID)
        reply = mpps_attributes()
        reply.AffectedSOPInstanceUID = assigned
        return 0x0000, reply

    peer.on[evt.EVT_N_CREATE] = handler
    with our_client(peer.port, N_CONTEXTS) as client:
        rsp, got = client.n_create(uids.MODALITY_PERFORMED_PROCEDURE_STEP, None,
                                   mpps_attributes())
    assert seen == [None]
    assert (rsp.status, rsp.affected_sop_instance_uid) == (0x0000, assigned)
    assert got == mpps_attributes()


@pytest.mark.parametrize("status", [0x0000, 0x0112], ids=["success", "no-such-instance"])
def test_a_n_delete(peer: PeerSCP, status: int) -> None:
    seen: list[tuple[str, str]] = []

    def handler(event: Any) -> int:
        seen.append((event.request.RequestedSOPClassUID, event.request.RequestedSOPInstanceUID))
        return status

    peer.on[evt.EVT_N_DELETE] = handler
    inst = generate_uid()
    with our_client(peer.port, N_CONTEXTS) as client:
        rsp, got = client.n_delete(BASIC_FILM_SESSION, inst)
    assert seen == [(BASIC_FILM_SESSION, inst)]
    assert isinstance(rsp, dimse.NDeleteRSP)
    assert (rsp.status, rsp.affected_sop_instance_uid, got) == (status, inst, None)


# --- Association, direction A -----------------------------------------------


@pytest.mark.parametrize(
    ("called", "calling", "require_calling", "reason"),
    [("WRONG-AE", OUR_AE, [], 7), (PEER_AE, "STRANGER", [OUR_AE], 3)],
    ids=["called-ae", "calling-ae"],
)
def test_a_rejected_by_pynetdicom(peer: PeerSCP, called: str, calling: str,
                                  require_calling: list[str], reason: int) -> None:
    peer.ae.require_called_aet = True
    peer.ae.require_calling_aet = require_calling
    with pytest.raises(AssociationRejectedError) as info:
        our_client(peer.port, called_ae=called, calling_ae=calling)
    rj = info.value.reject
    assert (int(rj.result), int(rj.source), int(rj.reason)) == (1, 1, reason)


def test_a_presentation_context_results(peer: PeerSCP) -> None:
    """pynetdicom refuses what it does not support; we see only what it accepted, with
    the roles it agreed to, and refuse to use the rest."""
    contexts = [(uids.VERIFICATION_SOP_CLASS, [ExplicitVRLittleEndian]),
                ("1.2.840.10008.5.1.4.1.1.481.1", [ExplicitVRLittleEndian]),  # RT Image
                (FIND, [pydicom.uid.JPEG2000]),
                (CTImageStorage, [ImplicitVRLittleEndian])]
    with our_client(peer.port, contexts, roles={CTImageStorage: (True, True)}) as client:
        accepted = {(c.abstract_syntax, c.transfer_syntax, c.requestor_scu, c.requestor_scp)
                    for c in client.contexts.values()}
        assert accepted == {
            (uids.VERIFICATION_SOP_CLASS, ExplicitVRLittleEndian, True, False),
            (CTImageStorage, ImplicitVRLittleEndian, True, True)}
        with pytest.raises(LocalProtocolError):
            client.find(study_query()).__next__()
        assert client.echo() == 0x0000


def test_a_user_identity_positive_response(peer: PeerSCP) -> None:
    """A JWT identity with a positive response requested: pynetdicom answers it."""
    seen: list[tuple[int, bytes, bytes]] = []

    def on_user_id(event: Any) -> tuple[bool, bytes]:
        seen.append((event.user_id_type, event.primary_field, event.secondary_field))
        return True, b"welcome"

    peer.on[evt.EVT_USER_ID] = on_user_id
    identity = UserIdentityRQ(identity_type=5, positive_response_requested=True,
                              primary_field=b"header.payload.signature")
    with our_client(peer.port, user_identity=identity) as client:
        assert client.echo() == 0x0000
        ac = client._conn.assoc.accept_pdu  # no public accessor for the AC (yet)
    assert seen == [(5, b"header.payload.signature", b"")]
    assert UserIdentityAC(server_response=b"welcome") in ac.user_information.items


def test_a_release_by_us(peer: PeerSCP) -> None:
    released = peer.released("RELEASER")
    client = our_client(peer.port, calling_ae="RELEASER")
    assert client.echo() == 0x0000
    client.release()
    assert not client.is_associated
    assert released.wait(TIMEOUT), "pynetdicom did not report the release"


def test_a_aborted_by_pynetdicom_mid_operation(peer: PeerSCP) -> None:
    """pynetdicom's handler aborts instead of answering: our client raises, not hangs."""
    peer.on[evt.EVT_C_ECHO] = lambda event: event.assoc.abort()
    client = our_client(peer.port, calling_ae="ABORTED")
    try:
        with pytest.raises(AssociationAbortedError) as info:
            client.echo()
        event = info.value.event
        assert event is not None, "connection dropped without the A-ABORT being read"
        assert (event.provider, event.local, int(event.source)) == (False, False, 0)
        assert not client.is_associated
    finally:
        client.abort()


def test_a_abort_by_us(peer: PeerSCP) -> None:
    aborted = peer.aborted("ABORTER")
    client = our_client(peer.port, calling_ae="ABORTER")
    assert client.echo() == 0x0000
    client.abort()
    assert aborted.wait(TIMEOUT), "pynetdicom did not report the abort"


# ===========================================================================
# Direction B: our server is the SCP, pynetdicom the SCU
# ===========================================================================


@pytest.mark.parametrize("status", [0x0000, 0x0211])
def test_b_c_echo(serve: Callable[..., Server], scu_ae: Callable[..., AE], status: int) -> None:
    seen: list[Request] = []

    def on_echo(request: Request) -> int:
        seen.append(request)
        return status

    server = serve(Handlers(on_c_echo=on_echo))
    ae = scu_ae()
    ae.add_requested_context(uids.VERIFICATION_SOP_CLASS)
    assoc = associate(ae, server.port)
    assert assoc.send_c_echo(msg_id=42).Status == status
    assoc.release()
    [request] = seen
    assert request.message.message_id == 42
    assert (request.assoc.calling_ae, request.assoc.called_ae) == (SCU_AE, ROUTER_AE)


def test_b_any_transfer_syntax_means_any_of_the_standard(
        serve: Callable[..., Server], scu_ae: Callable[..., AE]) -> None:
    """transfer_syntaxes = "any" took a private or unknown UID when it came first, and
    stored whatever bytes came on it, unchecked and unroutable: now the first of the
    standard's is chosen, and a context proposing none of them is refused (PS3.8
    9.3.3.2, result 4: transfer syntaxes not supported)."""
    ct = "1.2.840.10008.5.1.4.1.1.2"
    policy = AcceptorPolicy(abstract_syntaxes={ct: None}, transfer_syntaxes=None)
    server = serve(policy=policy)
    ae = scu_ae()
    ae.add_requested_context(ct, ["1.2.3.4.5"])
    ae.add_requested_context(ct, ["1.2.3.4.5", str(pydicom.uid.JPEG2000Lossless),
                                  str(pydicom.uid.ExplicitVRLittleEndian)])
    assoc = associate(ae, server.port)
    try:
        results = {cx.context_id: (cx.result, cx.transfer_syntax[0] if cx.result == 0 else None)
                   for cx in assoc.accepted_contexts + assoc.rejected_contexts}
    finally:
        assoc.release()
    assert results == {1: (0x04, None), 3: (0x00, str(pydicom.uid.JPEG2000Lossless))}


def test_b_message_ids_at_the_ends_of_their_range(serve: Callable[..., Server],
                                                  scu_ae: Callable[..., AE]) -> None:
    """Message ID is a US: 0 and 65535 are as good as any (PS3.7 E.1)."""
    seen: list[int] = []
    server = serve(Handlers(on_c_echo=lambda request: seen.append(
        request.message.message_id) or 0))
    ae = scu_ae()
    ae.add_requested_context(uids.VERIFICATION_SOP_CLASS)
    log = ResponseLog()
    assoc = associate(ae, server.port, evt_handlers=log.evt_handlers)
    for mid in (0, 65535):
        assert assoc.send_c_echo(msg_id=mid).Status == 0x0000
    assoc.release()
    assert seen == [0, 65535]
    assert [c.MessageIDBeingRespondedTo for c in log.commands] == [0, 65535]


@pytest.mark.usefixtures("send_files_as_is")
def test_b_c_store_files_byte_for_byte(serve: Callable[..., Server], scu_ae: Callable[..., AE],
                                       ct_files: list[Path], real_files: list[Path],
                                       tmp_path: Path) -> None:
    make_ct(tmp_path / "implicit.dcm", size_kb=20, transfer_syntax=ImplicitVRLittleEndian)
    make_ct(tmp_path / "deflated.dcm", size_kb=20, transfer_syntax=DeflatedExplicitVRLittleEndian)
    files = [*ct_files, tmp_path / "implicit.dcm", tmp_path / "deflated.dcm", *real_files]
    stores: list[Stored] = []
    server = serve(Handlers(on_c_store=lambda r: stores.append(stored_by_us(r)) or 0))
    ae = scu_ae()
    for sop, syntaxes in storage_contexts(files):
        ae.add_requested_context(sop, syntaxes)
    assoc = associate(ae, server.port)
    for i, path in enumerate(files, start=1):
        assert assoc.send_c_store(path, msg_id=i).Status == 0x0000, path.name
    assoc.release()
    assert len(stores) == len(files)
    for path, got in zip(files, stores, strict=True):
        header = read_part10_header(path)
        assert (got.sop_class, got.sop_instance, got.transfer_syntax) == (
            header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax), path.name
        assert got.data == dataset_bytes(path), f"{path.name}: bytes differ"


def test_b_c_store_dataset(serve: Callable[..., Server], scu_ae: Callable[..., AE]) -> None:
    """pynetdicom encodes a Dataset (converting explicit to implicit VR); we get its bytes."""
    stores: list[Stored] = []
    server = serve(Handlers(on_c_store=lambda r: stores.append(stored_by_us(r)) or 0))
    ae = scu_ae()
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = associate(ae, server.port)
    ds = make_tiny()
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    [got] = stores
    assert got.transfer_syntax == ImplicitVRLittleEndian
    assert got.data == pynetdicom_encoding(ds, ImplicitVRLittleEndian)
    assert got.data == encode_dataset(ds, ImplicitVRLittleEndian)


@pytest.mark.parametrize(("file_ts", "context_ts"), CONVERSIONS, ids=CONVERSION_IDS)
def test_b_c_get_converts_between_uncompressed(serve: Callable[..., Server],
                                               scu_ae: Callable[..., AE], tmp_path: Path,
                                               file_ts: str, context_ts: str) -> None:
    """pynetdicom accepts the C-GET's C-STOREs in another uncompressed syntax only: we
    convert, and it decodes the same elements and pixel values."""
    path = tmp_path / "ct.dcm"
    make_ct(path, size_kb=20, transfer_syntax=file_ts)
    decoded: list[Dataset] = []

    def on_store(event: Any) -> int:
        decoded.append(event.dataset)
        return 0x0000

    source = MoveSource(serve, [path], None)
    ae = scu_ae()
    ae.add_requested_context(GET, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, context_ts)
    assoc = associate(ae, source.server.port, ext_neg=[build_role(CTImageStorage, scp_role=True)],
                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
    responses = list(assoc.send_c_get(study_query(), GET))
    assoc.release()
    assert [status.Status for status, _ in responses] == [0x0000]
    [got] = decoded
    assert got.original_encoding == (pydicom.uid.UID(context_ts).is_implicit_VR,
                                     pydicom.uid.UID(context_ts).is_little_endian)
    same_content(got, path)


@pytest.mark.parametrize("status", [0xB000, 0xA700, 0xC000, 0x0110])
def test_b_c_store_statuses(serve: Callable[..., Server], scu_ae: Callable[..., AE],
                            status: int) -> None:
    server = serve(Handlers(on_c_store=lambda request: status))
    ae = scu_ae()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    log = ResponseLog()
    assoc = associate(ae, server.port, evt_handlers=log.evt_handlers)
    ds = make_tiny()
    assert assoc.send_c_store(ds).Status == status
    assert assoc.send_c_store(make_tiny(), msg_id=2).Status == status  # still usable
    assoc.release()
    assert log.commands[0].AffectedSOPInstanceUID == ds.SOPInstanceUID
    assert log.commands[0].MessageIDBeingRespondedTo == 1


@pytest.mark.parametrize(("final", "transfer_syntax"), [
    (None, ImplicitVRLittleEndian), (0xA700, ImplicitVRLittleEndian),
    (None, ExplicitVRBigEndian), (None, DeflatedExplicitVRLittleEndian),
], ids=["success", "refused", "big-endian", "deflated"])
def test_b_c_find(serve: Callable[..., Server], scu_ae: Callable[..., AE],
                  final: int | None, transfer_syntax: str) -> None:
    matches = [(0xFF00, find_match(1)), (0xFF01, find_match(2)), (0xFF00, find_match(3))]
    seen: list[Request] = []

    def on_find(request: Request, token: CancelToken) -> Iterator[tuple[int, Dataset | None]]:
        seen.append(request)
        yield from matches
        if final is not None:
            yield final, None

    server = serve(Handlers(on_c_find=on_find))
    ae = scu_ae()
    ae.add_requested_context(FIND, transfer_syntax)
    assoc = associate(ae, server.port)
    query = study_query()
    query.ModalitiesInStudy = ["CT", "MR"]
    results = list(assoc.send_c_find(query, FIND, msg_id=5))
    assoc.release()
    assert [status.Status for status, _ in results] == [s for s, _ in matches] + [final or 0]
    assert [ds for _, ds in results] == [ds for _, ds in matches] + [None]
    [request] = seen
    assert request.message.message_id == 5
    assert request.context.transfer_syntax == transfer_syntax
    assert request.message.priority == dimse.Priority.LOW  # pynetdicom's default
    assert request.dataset_bytes == pynetdicom_encoding(query, transfer_syntax)
    assert request.dataset() == query


def test_b_c_cancel_find(serve: Callable[..., Server], scu_ae: Callable[..., AE]) -> None:
    """pynetdicom sends C-CANCEL after the first result; we end with FE00."""
    cancel_sent = threading.Event()
    armed = threading.Event()
    tokens: list[CancelToken] = []

    def on_data_sent(event: Any) -> None:
        if armed.is_set() and event.data[:1] == b"\x04":  # the P-DATA-TF carrying C-CANCEL
            cancel_sent.set()

    def on_find(request: Request, token: CancelToken) -> Iterator[tuple[int, Dataset]]:
        tokens.append(token)
        yield 0xFF00, find_match(1)
        # Loopback: once pynetdicom's send() returned, the bytes are in our socket.
        cancel_sent.wait(TIMEOUT)
        yield 0xFF00, find_match(2)
        yield 0xFF00, find_match(3)

    server = serve(Handlers(on_c_find=on_find))
    ae = scu_ae()
    ae.add_requested_context(FIND, ExplicitVRLittleEndian)
    ae.add_requested_context(uids.VERIFICATION_SOP_CLASS)
    assoc = associate(ae, server.port, evt_handlers=[(evt.EVT_DATA_SENT, on_data_sent)])
    responses = assoc.send_c_find(study_query(), FIND, msg_id=9)
    status, first = next(responses)
    assert status.Status == 0xFF00 and first is not None
    armed.set()
    assoc.send_c_cancel(9, context_id(assoc, FIND))
    rest = [(status.Status, ds) for status, ds in responses]
    assert cancel_sent.is_set()
    assert rest == [(0xFE00, None)]
    assert assoc.send_c_echo().Status == 0x0000  # the association carries on
    assoc.release()
    assert [bool(t) for t in tokens] == [True]


class MoveSource:
    """Our server answering C-MOVE with ``files`` sent to ``destination``."""

    def __init__(self, serve: Callable[..., Server], files: list[Path],
                 destination: MoveDestination | None) -> None:
        self.requests: list[Request] = []
        self.files = files
        self.destination = destination
        self.server = serve(Handlers(on_c_move=self._move, on_c_get=self._get))

    def _move(self, request: Request,
              token: CancelToken) -> tuple[MoveDestination | None, list[Path]]:
        self.requests.append(request)
        return self.destination, self.files

    def _get(self, request: Request, token: CancelToken) -> list[Path]:
        self.requests.append(request)
        return self.files


@pytest.mark.parametrize("fail_second", [False, True], ids=["all-stored", "one-failed"])
def test_b_c_move(serve: Callable[..., Server], scu_ae: Callable[..., AE], peer: PeerSCP,
                  ct_files: list[Path], real_files: list[Path], fail_second: bool) -> None:
    """pynetdicom asks us to move files to its storage SCP; each arrives byte for byte in
    its own transfer syntax and pynetdicom sees the counts go down."""
    files = [ct_files[0], ct_files[1], real_files[0], real_files[2]]  # + big endian, JPEG
    failing = read_part10_header(files[1]).sop_instance_uid

    def on_store(event: Any) -> int:
        peer.stores.append(stored_by_pynetdicom(event))
        return 0xA700 if fail_second and event.request.AffectedSOPInstanceUID == failing else 0

    peer.on[evt.EVT_C_STORE] = on_store
    source = MoveSource(serve, files, MoveDestination(host="127.0.0.1", port=peer.port,
                                                      ae_title=PEER_AE))
    ae = scu_ae()
    ae.add_requested_context(MOVE, ExplicitVRLittleEndian)
    assoc = associate(ae, source.server.port)
    query = study_query()
    responses = list(assoc.send_c_move(query, PEER_AE, MOVE, msg_id=17))
    assoc.release()

    [request] = source.requests
    assert request.message.move_destination == PEER_AE
    assert request.dataset_bytes == pynetdicom_encoding(query, ExplicitVRLittleEndian)
    assert [s.data for s in peer.stores] == [dataset_bytes(p) for p in files]
    assert [s.transfer_syntax for s in peer.stores] == [file_syntax(p)[1] for p in files]
    assert {(s.originator_ae, s.originator_id) for s in peer.stores} == {(SCU_AE, 17)}

    statuses = [status for status, _ in responses]
    pending = statuses[:-1]
    assert [s.Status for s in pending] == [0xFF00] * 3
    assert [s.NumberOfRemainingSuboperations for s in pending] == [3, 2, 1]
    assert [s.NumberOfFailedSuboperations for s in pending] == (
        [0, 1, 1] if fail_second else [0, 0, 0])
    final, identifier = responses[-1]
    failed = 1 if fail_second else 0
    assert final.Status == (0xB000 if fail_second else 0x0000)
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations,
            final.NumberOfWarningSuboperations) == (4 - failed, failed, 0)
    if fail_second:
        assert identifier.FailedSOPInstanceUIDList == failing
    else:
        assert identifier is None


def test_b_c_move_unknown_destination(serve: Callable[..., Server],
                                      scu_ae: Callable[..., AE], ct_files: list[Path]) -> None:
    source = MoveSource(serve, ct_files, None)
    ae = scu_ae()
    ae.add_requested_context(MOVE, ExplicitVRLittleEndian)
    assoc = associate(ae, source.server.port)
    responses = list(assoc.send_c_move(study_query(), "NOWHERE", MOVE))
    assoc.release()
    assert [status.Status for status, _ in responses] == [0xA801]


@pytest.mark.parametrize("fail_second", [False, True], ids=["all-stored", "one-failed"])
def test_b_c_get(serve: Callable[..., Server], scu_ae: Callable[..., AE],
                 ct_files: list[Path], real_files: list[Path], fail_second: bool) -> None:
    """pynetdicom takes the SCP role for the storage classes and gets the C-STOREs on its
    own association, each in the file's transfer syntax, byte for byte."""
    files = [ct_files[0], ct_files[1], real_files[2]]  # two CT, one JPEG
    failing = read_part10_header(files[1]).sop_instance_uid
    stores: list[Stored] = []

    def on_store(event: Any) -> int:
        stores.append(stored_by_pynetdicom(event))
        return 0xA700 if fail_second and event.request.AffectedSOPInstanceUID == failing else 0

    source = MoveSource(serve, files, None)
    ae = scu_ae()
    ae.add_requested_context(GET, ExplicitVRLittleEndian)
    roles = []
    for sop, syntaxes in storage_contexts(files):
        ae.add_requested_context(sop, syntaxes)
        roles.append(build_role(sop, scp_role=True))
    assoc = associate(ae, source.server.port, ext_neg=roles,
                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
    query = study_query()
    responses = list(assoc.send_c_get(query, GET, msg_id=3))
    assoc.release()

    [request] = source.requests
    assert request.dataset_bytes == pynetdicom_encoding(query, ExplicitVRLittleEndian)
    assert [s.data for s in stores] == [dataset_bytes(p) for p in files]
    assert [s.transfer_syntax for s in stores] == [file_syntax(p)[1] for p in files]
    statuses = [status for status, _ in responses]
    assert [s.Status for s in statuses[:-1]] == [0xFF00] * 2
    assert [s.NumberOfRemainingSuboperations for s in statuses[:-1]] == [2, 1]
    final, identifier = responses[-1]
    failed = 1 if fail_second else 0
    assert final.Status == (0xB000 if fail_second else 0x0000)
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (
        3 - failed, failed)
    if fail_second:
        assert identifier.FailedSOPInstanceUIDList == failing


def test_b_c_cancel_get(serve: Callable[..., Server], scu_ae: Callable[..., AE],
                       ct_files: list[Path]) -> None:
    """pynetdicom sends C-CANCEL while it handles our first C-STORE sub-operation: we
    must stop and answer FE00 with two sub-operations remaining (PS3.4 C.4.3.3.1)."""
    stores: list[Stored] = []

    def on_store(event: Any) -> int:
        stores.append(stored_by_pynetdicom(event))
        if len(stores) == 1:  # the C-CANCEL goes out before this C-STORE-RSP
            event.assoc.send_c_cancel(3, context_id(event.assoc, GET))
        return 0x0000

    source = MoveSource(serve, ct_files, None)
    ae = scu_ae()
    ae.add_requested_context(GET, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = associate(ae, source.server.port, ext_neg=[build_role(CTImageStorage, scp_role=True)],
                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
    responses = [status for status, _ in assoc.send_c_get(study_query(), GET, msg_id=3)]
    assoc.release()
    assert [s.data for s in stores] == [dataset_bytes(ct_files[0])]
    assert [(s.Status, s.NumberOfRemainingSuboperations, s.NumberOfCompletedSuboperations)
            for s in responses] == [(0xFF00, 2, 1), (0xFE00, 2, 1)]


def test_b_c_cancel_move(serve: Callable[..., Server], scu_ae: Callable[..., AE],
                         peer: PeerSCP, ct_files: list[Path]) -> None:
    """pynetdicom cancels a C-MOVE while the first sub-operation is in flight; we stop
    before the second and answer FE00 (PS3.4 C.4.2.3.1)."""
    first_arrived = threading.Event()
    go_on = threading.Event()

    def on_store(event: Any) -> int:
        peer.stores.append(stored_by_pynetdicom(event))
        if len(peer.stores) == 1:
            first_arrived.set()
            go_on.wait(TIMEOUT)
        return 0x0000

    peer.on[evt.EVT_C_STORE] = on_store
    source = MoveSource(serve, ct_files, MoveDestination(host="127.0.0.1", port=peer.port,
                                                         ae_title=PEER_AE))
    cancel_sent = threading.Event()

    def on_data_sent(event: Any) -> None:
        if first_arrived.is_set() and event.data[:1] == b"\x04":
            cancel_sent.set()

    ae = scu_ae()
    ae.add_requested_context(MOVE, ExplicitVRLittleEndian)
    assoc = associate(ae, source.server.port, evt_handlers=[(evt.EVT_DATA_SENT, on_data_sent)])
    responses = assoc.send_c_move(study_query(), PEER_AE, MOVE, msg_id=21)  # sent at once
    try:
        assert first_arrived.wait(TIMEOUT), "the first sub-operation never arrived"
        assoc.send_c_cancel(21, context_id(assoc, MOVE))
        assert cancel_sent.wait(TIMEOUT)
    finally:
        go_on.set()
    statuses = [status for status, _ in responses]
    assoc.release()
    assert len(peer.stores) == 1
    assert [(s.Status, s.NumberOfRemainingSuboperations, s.NumberOfCompletedSuboperations)
            for s in statuses] == [(0xFF00, 2, 1), (0xFE00, 2, 1)]


@pytest.mark.parametrize("max_pdu", [0, 4096, 1 << 20], ids=["unlimited", "4K", "1M"])
def test_b_respects_pynetdicom_max_pdu(serve: Callable[..., Server], scu_ae: Callable[..., AE],
                                       ct_files: list[Path], real_files: list[Path],
                                       max_pdu: int) -> None:
    """The C-STOREs of a C-GET we send back are cut to pynetdicom's Maximum Length."""
    files = [ct_files[2], real_files[4]]
    stores: list[Stored] = []
    lengths: list[int] = []

    def on_pdu(event: Any) -> None:
        if type(event.pdu).__name__ == "P_DATA_TF":
            lengths.append(event.pdu.pdu_length)

    def on_store(event: Any) -> int:
        stores.append(stored_by_pynetdicom(event))
        return 0x0000

    source = MoveSource(serve, files, None)
    ae = scu_ae()
    ae.add_requested_context(GET, ExplicitVRLittleEndian)
    roles = []
    for sop, syntaxes in storage_contexts(files):
        ae.add_requested_context(sop, syntaxes)
        roles.append(build_role(sop, scp_role=True))
    # pynetdicom quirk: associate() takes its own max_pdu (default 16382) and ignores
    # ae.maximum_pdu_size, which only applies to the associations it accepts.
    assoc = associate(ae, source.server.port, ext_neg=roles, max_pdu=max_pdu,
                      evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_PDU_RECV, on_pdu)])
    responses = list(assoc.send_c_get(study_query(), GET))
    assoc.release()
    assert responses[-1][0].Status == 0x0000
    assert [s.data for s in stores] == [dataset_bytes(p) for p in files]
    if max_pdu:
        assert max(lengths) <= max_pdu
    if 0 < max_pdu < 100_000:
        assert max(lengths) > max_pdu - 64
    else:
        assert max(lengths) > 100_000


# --- DIMSE-N, direction B ---------------------------------------------------


class NServer:
    """Our server answering every N-service with ``(status, reply)``; records requests."""

    def __init__(self, serve: Callable[..., Server], status: int,
                 reply: Dataset | None) -> None:
        self.requests: list[Request] = []
        self.status = status
        self.reply = reply
        answer = self._answer
        self.server = serve(Handlers(
            on_n_event_report=answer, on_n_get=answer, on_n_set=answer, on_n_action=answer,
            on_n_create=answer, on_n_delete=answer))

    def _answer(self, request: Request) -> tuple[int, Dataset | None]:
        self.requests.append(request)
        return self.status, self.reply


def n_scu(scu_ae: Callable[..., AE], port: int) -> tuple[Any, ResponseLog]:
    ae = scu_ae()
    ae.add_requested_context(uids.STORAGE_COMMITMENT_PUSH_MODEL, ExplicitVRLittleEndian)
    ae.add_requested_context(uids.MODALITY_PERFORMED_PROCEDURE_STEP, ImplicitVRLittleEndian)
    ae.add_requested_context(BASIC_FILM_SESSION, ExplicitVRLittleEndian)
    log = ResponseLog()
    return associate(ae, port, evt_handlers=log.evt_handlers), log


@pytest.mark.parametrize(("status", "with_reply"), N_OUTCOMES, ids=N_IDS)
def test_b_n_event_report(serve: Callable[..., Server], scu_ae: Callable[..., AE],
                          status: int, with_reply: bool) -> None:
    info = commitment_info()
    reply = make_ds(TransactionUID=info.TransactionUID) if with_reply else None
    ours = NServer(serve, status, reply)
    assoc, log = n_scu(scu_ae, ours.server.port)
    sop, inst = uids.STORAGE_COMMITMENT_PUSH_MODEL, uids.STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE
    rsp, got = assoc.send_n_event_report(info, 2, sop, inst, msg_id=11)
    assoc.release()
    [request] = ours.requests
    msg = request.message
    assert isinstance(msg, dimse.NEventReportRQ)
    assert (msg.message_id, msg.affected_sop_class_uid, msg.affected_sop_instance_uid,
            msg.event_type_id) == (11, sop, inst, 2)
    assert request.dataset_bytes == pynetdicom_encoding(info, ExplicitVRLittleEndian)
    assert rsp.Status == status
    assert got == (reply if with_reply else None)
    [command] = log.commands
    assert (command.EventTypeID, command.AffectedSOPInstanceUID) == (2, inst)


@pytest.mark.parametrize(("status", "with_reply", "tags"), [
    *[(status, with_reply, N_GET_TAGS) for status, with_reply in N_OUTCOMES],
    (0x0000, True, []),
], ids=[*N_IDS, "all-attributes"])
def test_b_n_get(serve: Callable[..., Server], scu_ae: Callable[..., AE], status: int,
                 with_reply: bool, tags: list[int]) -> None:
    attributes = mpps_attributes()
    ours = NServer(serve, status, attributes if with_reply else None)
    assoc, _ = n_scu(scu_ae, ours.server.port)
    sop, inst = uids.MODALITY_PERFORMED_PROCEDURE_STEP, generate_uid()
    rsp, got = assoc.send_n_get(tags, sop, inst, msg_id=12)
    assoc.release()
    [request] = ours.requests
    msg = request.message
    assert isinstance(msg, dimse.NGetRQ)
    assert (msg.message_id, msg.requested_sop_class_uid, msg.requested_sop_instance_uid) == (
        12, sop, inst)
    assert list(msg.attribute_identifier_list or ()) == [int(t) for t in tags]
    assert request.dataset_bytes is None
    assert rsp.Status == status
    assert got == (attributes if with_reply else None)


@pytest.mark.parametrize(("status", "with_reply"), N_OUTCOMES, ids=N_IDS)
def test_b_n_set(serve: Callable[..., Server], scu_ae: Callable[..., AE], status: int,
                 with_reply: bool) -> None:
    modification = make_ds(PerformedProcedureStepStatus="COMPLETED",
                           PerformedProcedureStepEndDate="20240102")
    ours = NServer(serve, status, modification if with_reply else None)
    assoc, log = n_scu(scu_ae, ours.server.port)
    sop, inst = uids.MODALITY_PERFORMED_PROCEDURE_STEP, generate_uid()
    rsp, got = assoc.send_n_set(modification, sop, inst, msg_id=13)
    assoc.release()
    [request] = ours.requests
    assert isinstance(request.message, dimse.NSetRQ)
    assert request.message.requested_sop_instance_uid == inst
    assert request.dataset_bytes == pynetdicom_encoding(modification, ImplicitVRLittleEndian)
    assert rsp.Status == status
    assert got == (modification if with_reply else None)
    assert log.commands[0].AffectedSOPInstanceUID == inst


@pytest.mark.parametrize(("status", "with_reply"), N_OUTCOMES, ids=N_IDS)
def test_b_n_action(serve: Callable[..., Server], scu_ae: Callable[..., AE], status: int,
                    with_reply: bool) -> None:
    info = commitment_info()
    reply = make_ds(TransactionUID=info.TransactionUID) if with_reply else None
    ours = NServer(serve, status, reply)
    assoc, log = n_scu(scu_ae, ours.server.port)
    sop, inst = uids.STORAGE_COMMITMENT_PUSH_MODEL, uids.STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE
    rsp, got = assoc.send_n_action(info, 1, sop, inst, msg_id=14)
    assoc.release()
    [request] = ours.requests
    msg = request.message
    assert isinstance(msg, dimse.NActionRQ)
    assert (msg.requested_sop_class_uid, msg.requested_sop_instance_uid, msg.action_type_id) == (
        sop, inst, 1)
    assert request.dataset_bytes == pynetdicom_encoding(info, ExplicitVRLittleEndian)
    assert rsp.Status == status
    assert got == (reply if with_reply else None)
    [command] = log.commands
    assert (command.ActionTypeID, command.AffectedSOPInstanceUID) == (1, inst)


@pytest.mark.parametrize(("status", "with_reply"), N_OUTCOMES, ids=N_IDS)
def test_b_n_create(serve: Callable[..., Server], scu_ae: Callable[..., AE], status: int,
                    with_reply: bool) -> None:
    attributes = mpps_attributes()
    ours = NServer(serve, status, attributes if with_reply else None)
    assoc, log = n_scu(scu_ae, ours.server.port)
    sop, inst = uids.MODALITY_PERFORMED_PROCEDURE_STEP, generate_uid()
    rsp, got = assoc.send_n_create(attributes, sop, inst, msg_id=15)
    assoc.release()
    [request] = ours.requests
    msg = request.message
    assert isinstance(msg, dimse.NCreateRQ)
    assert (msg.affected_sop_class_uid, msg.affected_sop_instance_uid) == (sop, inst)
    assert request.dataset_bytes == pynetdicom_encoding(attributes, ImplicitVRLittleEndian)
    assert rsp.Status == status
    assert got == (attributes if with_reply else None)
    if dimse.status_category(status) is dimse.StatusCategory.FAILURE:
        # PS3.7 §10.1.5.1.4: the UID "may only be included in the success response".
        assert "AffectedSOPInstanceUID" not in log.commands[0]
    else:
        assert log.commands[0].AffectedSOPInstanceUID == inst


def test_b_n_create_instance_assigned_by_scp(serve: Callable[..., Server],
                                             scu_ae: Callable[..., AE]) -> None:
    """pynetdicom's N-CREATE leaves the instance UID to us; our handler assigns it the
    way pynetdicom's does (AffectedSOPInstanceUID in the reply), and it must go in the
    response's command set, not in the Attribute List data set."""
    assigned = generate_uid()
    reply = mpps_attributes()
    reply.AffectedSOPInstanceUID = assigned
    ours = NServer(serve, 0x0000, reply)
    assoc, log = n_scu(scu_ae, ours.server.port)
    rsp, got = assoc.send_n_create(mpps_attributes(), uids.MODALITY_PERFORMED_PROCEDURE_STEP,
                                   None, msg_id=18)
    assoc.release()
    [request] = ours.requests
    assert request.message.affected_sop_instance_uid is None
    assert rsp.Status == 0x0000
    assert log.commands[0].AffectedSOPInstanceUID == assigned
    assert got == mpps_attributes(), "a command element leaked into the Attribute List"


@pytest.mark.parametrize("status", [0x0000, 0x0112], ids=["success", "no-such-instance"])
def test_b_n_delete(serve: Callable[..., Server], scu_ae: Callable[..., AE],
                    status: int) -> None:
    ours = NServer(serve, status, None)
    assoc, log = n_scu(scu_ae, ours.server.port)
    inst = generate_uid()
    rsp = assoc.send_n_delete(BASIC_FILM_SESSION, inst, msg_id=16)
    assoc.release()
    [request] = ours.requests
    assert isinstance(request.message, dimse.NDeleteRQ)
    assert (request.message.requested_sop_class_uid,
            request.message.requested_sop_instance_uid) == (BASIC_FILM_SESSION, inst)
    assert rsp.Status == status
    assert log.commands[0].AffectedSOPInstanceUID == inst


# --- Association, direction B -----------------------------------------------


@pytest.mark.parametrize(
    ("called", "calling", "reason"),
    [("NOT-ROUTER", SCU_AE, 7), (ROUTER_AE, "STRANGER", 3)],
    ids=["called-ae", "calling-ae"],
)
def test_b_rejected_by_us(serve: Callable[..., Server], scu_ae: Callable[..., AE],
                          called: str, calling: str, reason: int) -> None:
    rejected: list[tuple[AssociationInfo, Any]] = []
    reported = threading.Event()

    def on_rejected(info: AssociationInfo, rj: Any) -> None:  # runs after the RJ is sent
        rejected.append((info, rj))
        reported.set()

    policy = AcceptorPolicy(ae_titles=frozenset({ROUTER_AE}),
                            calling_ae_titles=frozenset({SCU_AE}))
    server = serve(Handlers(on_rejected=on_rejected), policy=policy)
    ae = scu_ae(calling)
    ae.add_requested_context(uids.VERIFICATION_SOP_CLASS)
    received: list[Any] = []
    assoc = ae.associate("127.0.0.1", server.port, ae_title=called,
                         evt_handlers=[(evt.EVT_PDU_RECV, lambda e: received.append(e.pdu))])
    assert not assoc.is_established
    # pynetdicom quirk: its reader thread closes the socket on the RJ (AE-4) and its
    # requestor thread may then see "not connected" and abort instead of setting
    # is_rejected, so the test reads the A-ASSOCIATE-RJ PDU itself.
    [rj] = received
    assert type(rj).__name__ == "A_ASSOCIATE_RJ"
    assert (rj.result, rj.source, rj.reason_diagnostic) == (1, 1, reason)
    assert reported.wait(TIMEOUT)
    [(info, ours)] = rejected
    assert (info.calling_ae, info.called_ae, int(ours.reason)) == (calling, called, reason)


def test_b_user_identity_accepted(serve: Callable[..., Server],
                                  scu_ae: Callable[..., AE]) -> None:
    """pynetdicom asks for user identity (with a positive response); we accept the
    association without answering the item (PS3.7 D.3.3.7 allows it)."""
    accepted: list[AssociationInfo] = []
    server = serve(Handlers(on_accepted=accepted.append))
    ae = scu_ae()
    ae.add_requested_context(uids.VERIFICATION_SOP_CLASS)
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.primary_field = b"alice"
    identity.secondary_field = b"s3cret"
    identity.positive_response_requested = True
    assoc = associate(ae, server.port, ext_neg=[identity])
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    [info] = accepted
    [item] = [i for i in info.request.user_information.items if isinstance(i, UserIdentityRQ)]
    assert (int(item.identity_type), item.positive_response_requested, item.primary_field,
            item.secondary_field) == (2, True, b"alice", b"s3cret")


def test_b_presentation_context_results(serve: Callable[..., Server],
                                        scu_ae: Callable[..., AE]) -> None:
    """Each of pynetdicom's proposals gets its own result (PS3.8 Table 9-18): accepted
    with the transfer syntax we prefer among those proposed, abstract syntax not
    supported (3), transfer syntaxes not supported (4); a refused SCP role shows."""
    policy = AcceptorPolicy(
        abstract_syntaxes={uids.VERIFICATION_SOP_CLASS: None,
                           CTImageStorage: (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
                           MR_IMAGE_STORAGE: (ImplicitVRLittleEndian,)},
        transfer_syntaxes=(ImplicitVRLittleEndian,), accept_scp_role=False)
    server = serve(policy=policy)
    ae = scu_ae()
    ae.add_requested_context(uids.VERIFICATION_SOP_CLASS, [ExplicitVRLittleEndian,
                                                           ImplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [pydicom.uid.JPEG2000, ExplicitVRLittleEndian])
    ae.add_requested_context(MR_IMAGE_STORAGE, [ExplicitVRLittleEndian])
    ae.add_requested_context(SC_IMAGE_STORAGE, [ExplicitVRLittleEndian])
    role = build_role(CTImageStorage, scu_role=True, scp_role=True)
    assoc = associate(ae, server.port, ext_neg=[role])
    try:
        accepted = {cx.abstract_syntax: cx for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
        assert sorted(accepted) == sorted([uids.VERIFICATION_SOP_CLASS, CTImageStorage])
        assert accepted[uids.VERIFICATION_SOP_CLASS].transfer_syntax == [ImplicitVRLittleEndian]
        assert accepted[CTImageStorage].transfer_syntax == [ExplicitVRLittleEndian]
        assert (accepted[CTImageStorage].as_scu, accepted[CTImageStorage].as_scp) == (
            True, False)
        assert rejected == {MR_IMAGE_STORAGE: 0x04, SC_IMAGE_STORAGE: 0x03}
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_b_other_negotiation_items(serve: Callable[..., Server],
                                   scu_ae: Callable[..., AE]) -> None:
    """Asynchronous operations window, SOP class extended and common extended
    negotiation from pynetdicom: we decode each as sent, answer the window with 1/1
    (PS3.7 D.3.3.3), leave the others unanswered (not supported), and the association
    works."""
    accepted: list[AssociationInfo] = []
    server = serve(Handlers(on_accepted=accepted.append))
    ae = scu_ae()
    ae.add_requested_context(uids.VERIFICATION_SOP_CLASS)
    ae.add_requested_context(FIND, ExplicitVRLittleEndian)
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 3
    extended = SOPClassExtendedNegotiation()
    extended.sop_class_uid = FIND
    extended.service_class_application_information = b"\x01\x01\x00\x01"
    common = SOPClassCommonExtendedNegotiation()
    common.sop_class_uid = CTImageStorage
    common.service_class_uid = "1.2.840.10008.4.2"
    common.related_general_sop_class_identification = ["1.2.840.10008.5.1.4.1.1.2.1"]
    assoc = associate(ae, server.port, ext_neg=[window, extended, common])
    assert assoc.send_c_echo().Status == 0x0000
    acceptor = assoc.acceptor
    assert acceptor.asynchronous_operations == (1, 1)
    assert acceptor.implementation_class_uid == uids.IMPLEMENTATION_CLASS_UID
    assert acceptor.implementation_version_name == uids.IMPLEMENTATION_VERSION_NAME
    assert acceptor.maximum_length == AcceptorPolicy().maximum_length
    assoc.release()
    [info] = accepted
    items = info.request.user_information.items
    assert pdu.AsynchronousOperationsWindow(max_operations_invoked=5,
                                            max_operations_performed=3) in items
    assert pdu.SOPClassExtendedNegotiation(
        sop_class_uid=FIND, service_class_application_information=b"\x01\x01\x00\x01") in items
    assert pdu.SOPClassCommonExtendedNegotiation(
        sop_class_uid=CTImageStorage, service_class_uid="1.2.840.10008.4.2",
        related_general_sop_class_uids=("1.2.840.10008.5.1.4.1.1.2.1",)) in items


def test_b_release_by_pynetdicom(serve: Callable[..., Server],
                                 scu_ae: Callable[..., AE]) -> None:
    released = threading.Event()
    closed = threading.Event()
    stats: dict[str, Any] = {}

    def on_closed(info: AssociationInfo | None, outcome: dict[str, Any]) -> None:
        stats.update(outcome)
        closed.set()

    server = serve(Handlers(on_released=lambda info: released.set(), on_closed=on_closed))
    ae = scu_ae()
    ae.add_requested_context(uids.VERIFICATION_SOP_CLASS)
    assoc = associate(ae, server.port)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released
    assert released.wait(TIMEOUT), "our server did not report the release"
    assert closed.wait(TIMEOUT), "our server did not close the connection"
    assert (stats["outcome"], stats["messages"]) == ("released", 1)


def test_b_abort_by_pynetdicom(serve: Callable[..., Server], scu_ae: Callable[..., AE]) -> None:
    aborted: list[AssociationAborted] = []
    done = threading.Event()

    def on_aborted(info: AssociationInfo, event: AssociationAborted) -> None:
        aborted.append(event)
        done.set()

    server = serve(Handlers(on_aborted=on_aborted))
    ae = scu_ae()
    ae.add_requested_context(uids.VERIFICATION_SOP_CLASS)
    assoc = associate(ae, server.port)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.abort()
    assert assoc.is_aborted
    assert done.wait(TIMEOUT), "our server did not report the abort"
    [event] = aborted
    assert (event.provider, event.local, event.source) == (False, False, 0)
