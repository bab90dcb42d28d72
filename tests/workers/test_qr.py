"""The C-GET proxy in one process, its upstream a real pynetdicom Q/R SCP: what it
answers the upstream for a sub-operation it must convert for the requestor."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pydicom
import pytest

from router.config import Destination
from router.dicom import dimse
from router.dicom.dataset import decode_dataset, encode_dataset
from router.dicom.negotiation import NegotiatedContext
from tests.helpers import make_ct, same_content
from tests.helpers.net import free_port
from workers.qr import GetProxy, Request

STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


class _Requestor:
    """The requestor's side of the C-GET (workers.qr.StoreRelay): takes CT in
    Implicit VR only, answers every C-STORE Success, keeps each data set."""

    def __init__(self, status: int = dimse.SUCCESS) -> None:
        self.status = status
        self.context = NegotiatedContext(context_id=3, abstract_syntax=CT,
                                         transfer_syntax=IMPLICIT, requestor_scp=True)
        self.stored: list[bytes] = []
        self._parts: list[bytes] = []
        self._results: dict[int, asyncio.Future[dimse.CStoreRSP]] = {}
        self._rq: dict[int, dimse.CStoreRQ] = {}

    def storage_contexts(self) -> list[NegotiatedContext]:
        return [self.context]

    def begin_store(self, ctx: NegotiatedContext, rq: dimse.CStoreRQ) -> int:
        mid = len(self._rq) + 1
        self._rq[mid] = rq
        self._results[mid] = asyncio.get_running_loop().create_future()
        return mid

    def store_data(self, ctx: NegotiatedContext, data: bytes, last: bool) -> None:
        self._parts.append(bytes(data))
        if last:
            self.stored.append(b"".join(self._parts))
            self._parts.clear()
            mid = len(self._rq)
            self._results[mid].set_result(dimse.CStoreRSP(
                message_id_being_responded_to=mid,
                affected_sop_class_uid=CT,
                affected_sop_instance_uid=self._rq[mid].affected_sop_instance_uid,
                status=self.status))

    async def writable(self) -> None:
        return None

    def store_result(self, message_id: int) -> asyncio.Future[dimse.CStoreRSP]:
        return self._results[message_id]


def _relayed_get(paths: list[Path], requestor: _Requestor,
                 ) -> tuple[list[tuple[int, str]], list[tuple[int, Any]]]:
    """A C-GET of ``paths`` (one study) relayed from a pynetdicom C-GET SCP that sends
    CT in Explicit VR only, to ``requestor``: what the upstream heard for each
    sub-operation (status, Error Comment), and the responses the requestor got."""
    from pynetdicom import AE, evt

    upstream_saw: list[tuple[int, str]] = []

    def on_get(event: Any) -> Any:
        yield len(paths)
        for path in paths:
            yield 0xFF00, pydicom.dcmread(path)

    def on_sub_operation_answer(event: Any) -> None:
        # pynetdicom's C-GET SCP gets each C-STORE-RSP of its sub-operations here.
        rsp = event.message
        if type(rsp).__name__ == "C_STORE_RSP":
            upstream_saw.append((int(rsp.command_set.Status),
                                 str(rsp.command_set.get("ErrorComment", ""))))

    pacs = AE(ae_title="EXPLPACS")
    pacs.add_supported_context(STUDY_GET)
    pacs.add_supported_context(CT, [EXPLICIT], scu_role=True, scp_role=True)
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_C_GET, on_get), (evt.EVT_DIMSE_RECV, on_sub_operation_answer)])
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
    responses: list[tuple[int, Any]] = []
    proxy = GetProxy(
        Request(model=STUDY_GET, identifier=encode_dataset(query, EXPLICIT),
                transfer_syntax=EXPLICIT, label="test"),
        upstreams=[Destination(name="pacs", host="127.0.0.1", port=port,
                               ae_title="EXPLPACS", calling_ae="ROUTER", timeout=10.0)],
        respond=lambda status, counts, data, comment: responses.append((status, counts)),
        relay=requestor)
    try:
        asyncio.run(asyncio.wait_for(proxy.run(), 60))
    finally:
        server.shutdown()
    return upstream_saw, responses


def test_a_sub_operation_too_large_to_convert_is_refused_upstream_not_held(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upstream sends CT in Explicit VR only, the requestor takes Implicit VR only:
    each instance is converted on the way, whole in memory. One past the limit (1 MiB
    here, 256 MiB as shipped) used to be gathered whatever its size; now its fragments
    are dropped as they come and the upstream hears A700H saying why, while the one
    within the limit still reaches the requestor, converted."""
    import workers.qr

    monkeypatch.setattr(workers.qr, "MAX_CONVERTED_BYTES", 1 << 20)
    big, small = tmp_path / "big.dcm", tmp_path / "small.dcm"
    make_ct(big, size_kb=2048, seed=1)
    make_ct(small, size_kb=256, seed=2)
    requestor = _Requestor()
    upstream_saw, responses = _relayed_get([big, small], requestor)
    assert [status for status, _ in upstream_saw] == [0xA700, 0x0000], upstream_saw
    assert upstream_saw[0][1] == "too large to convert (2 MiB, at most 1 MiB)", upstream_saw
    [stored] = requestor.stored
    got = decode_dataset(stored, IMPLICIT)
    same_content(got, small)
    final_status, (_, completed, failed, _) = responses[-1]
    assert (completed, failed) == (1, 1), responses
    assert final_status != dimse.SUCCESS


def test_a_requestor_answering_pending_is_a_failure_upstream(tmp_path: Path) -> None:
    """C-STORE has no Pending status (PS3.4 B.2.3): a requestor answering FF00H to a
    relayed sub-operation had it passed upstream as is (pynetdicom logged 65280).
    The upstream now hears 0110H, processing failure, saying why."""
    path = tmp_path / "ct.dcm"
    make_ct(path, size_kb=8, seed=3)
    upstream_saw, responses = _relayed_get([path], _Requestor(status=0xFF00))
    assert upstream_saw == [(0x0110, "the requestor answered 0xFF00, not a final status")]
    assert responses[-1][1][2] == 1, responses  # one failed


def _broken_off(proxy: Any, pending: tuple[int, int, int, int]) -> tuple[Any, str]:
    proxy._pending = pending
    _, counts, _, comment = proxy._cut_short("the connection closed")
    return counts, comment


@pytest.mark.parametrize(("kind", "counts", "said"), [
    # dcmqrscp killed during a move (direct): its last pending response says it all.
    ("C-MOVE direct", (None, 7, 293, 0), "after 7 of 300 sub-operations"),
    # Proxy mode: the 8th was relayed (in flight) when it broke off; it fails.
    ("C-MOVE proxy", (None, 7, 293, 0), "after 8 of 300 sub-operations"),
    # C-GET: the requestor answered the 44th Success after the upstream's last
    # pending response (43 completed): it is completed.
    ("C-GET", (None, 44, 256, 0), "after 44 of 300 sub-operations"),
])
def test_a_broken_off_retrieve_counts_each_sub_operation_once(
        tmp_path: Path, kind: str, counts: tuple[Any, ...], said: str) -> None:
    """The sub-operation in flight was counted in the router's own tally and in the
    upstream's remaining: "8 of 301" and "44 of 301" for 300, and the C-GET's 44th,
    which the requestor holds, counted failed (an outside Q/R campaign). PS3.4
    C.4.2.1.4: completed, failed, warning and remaining add up to the whole."""
    from workers.moves import note_sub_operation, note_sub_operation_status, register_move
    from workers.qr import MoveProxy

    request = Request(model=STUDY_GET, identifier=b"", transfer_syntax=EXPLICIT, label="t")
    upstream = [Destination(name="qrp", host="127.0.0.1", port=104, ae_title="QR")]
    if kind == "C-GET":
        proxy: Any = GetProxy(request, upstreams=upstream, respond=lambda *_: None,
                              relay=_Requestor())
        proxy._seen, proxy._tally = 44, [44, 0, 0]
        pending = (257, 43, 0, 0)
    else:
        proxy = MoveProxy(request, upstreams=upstream, respond=lambda *_: None,
                          move_destination="VIEWER", spool=tmp_path)
        pending = (293, 7, 0, 0)
        if kind == "C-MOVE proxy":
            proxy._message_id = mid = register_move(tmp_path, "viewer", "qrp")
            for n in range(8):
                note_sub_operation(tmp_path, mid)
                if n < 7:
                    note_sub_operation_status(tmp_path, mid, 0x0000)
    got, comment = _broken_off(proxy, pending)
    assert got == counts and said in comment, (got, comment)
