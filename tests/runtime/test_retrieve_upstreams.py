"""C-MOVE and C-GET through ``retrieve = [a, b]``: when the next upstream is asked,
and what the requestor is told when an upstream stops short.

Upstreams are pynetdicom Q/R SCPs made to behave as real ones may: no pending
responses (they are optional, PS3.4 C.4.2.1 / C.4.3.1), an abort part-way, an
unasked Cancel, an association accepted late, a hang. Requestors are DCMTK's getscu
and pynetdicom. Found by an outside campaign against the first handover version.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.helpers import Dcmtk, Procs, make_study, received_files, storescp_server
from tests.helpers.dcmtk import dcmtk_env
from tests.helpers.net import free_port
from tests.helpers.router import Router

pytestmark = pytest.mark.interop

STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _upstream(ae_title: str, study: list[Path], *, abort_after: int | None = None,
              answer: int | None = None, stall_after: int | None = None,
              move_to: tuple[str, int] | None = None,
              hold: threading.Event | None = None) -> tuple[int, Any, list[str]]:
    """A pynetdicom Study Root C-MOVE/C-GET SCP holding ``study``: (port, server, the
    requests it got). ``abort_after``: aborts after that many sub-operations;
    ``answer``: ends at once with that status; ``stall_after``: stops answering after
    that many until the server shuts down; ``hold``: accepts no association until set."""
    from pynetdicom import AE, StoragePresentationContexts, evt
    from pynetdicom.pdu_primitives import A_ASSOCIATE

    datasets = [pydicom.dcmread(p) for p in study]
    requests: list[str] = []
    stop = threading.Event()

    def sub_operations(event: Any) -> Iterator[Any]:
        requests.append(type(event).__name__)
        if answer is not None:
            yield 0
            yield answer, None
            return
        yield len(datasets)
        for n, ds in enumerate(datasets):
            if n == abort_after:
                event.assoc.abort()
                return
            if n == stall_after:
                stop.wait(60)
                return
            yield 0xFF00, ds

    def on_get(event: Any) -> Iterator[Any]:
        yield from sub_operations(event)

    def on_move(event: Any) -> Iterator[Any]:
        yield move_to
        yield from sub_operations(event)

    def on_acse(event: Any) -> None:
        if hold is not None and isinstance(event.primitive, A_ASSOCIATE) \
                and event.primitive.result is None:
            hold.wait(30)  # runs before pynetdicom answers the A-ASSOCIATE-RQ

    ae = AE(ae_title=ae_title)
    ae.add_supported_context(STUDY_GET)
    ae.add_supported_context(STUDY_MOVE)
    for context in StoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, scu_role=False, scp_role=True)
    ae.add_requested_context(CT)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_C_GET, on_get), (evt.EVT_C_MOVE, on_move), (evt.EVT_ACSE_RECV, on_acse)])
    original = server.shutdown

    def shutdown() -> None:
        stop.set()
        original()

    server.shutdown = shutdown
    return port, server, requests


@pytest.fixture
def no_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's SCPs in this process send no pending C-GET/C-MOVE responses."""
    from pynetdicom import dimse

    send = dimse.DIMSEServiceProvider.send_msg

    def without_pending(self: Any, primitive: Any, context_id: int) -> None:
        if type(primitive).__name__ in ("C_GET", "C_MOVE") \
                and getattr(primitive, "Status", None) == 0xFF00:
            return
        send(self, primitive, context_id)

    monkeypatch.setattr(dimse.DIMSEServiceProvider, "send_msg", without_pending)


def _router(tmp_path: Path, upstreams: list[tuple[str, int, str, str]],
            extra: str = "", viewer: int | None = None, port: int | None = None) -> Router:
    names = ", ".join(f'"{name}"' for name, *_ in upstreams)
    (tmp_path / "rules.toml").write_text(
        f'[[rule]]\nname = "anywhere"\n[rule.then]\nretrieve = [{names}]\n')
    config = extra + '[routing]\nrules = "rules.toml"\n'
    for name, upstream_port, aet, more in upstreams:
        config += (f'[[destination]]\nname = "{name}"\nhost = "127.0.0.1"\n'
                   f'port = {upstream_port}\nae_title = "{aet}"\n{more}')
    if viewer is not None:
        config += (f'[[destination]]\nname = "viewer"\nhost = "127.0.0.1"\nport = {viewer}\n'
                   'ae_title = "VIEWER_SCP"\n')
    return Router(tmp_path, port=port, extra=config)


def _getscu(dcmtk: Dcmtk, port: int, study_uid: str, out: Path) -> str:
    out.mkdir()
    done = subprocess.run([dcmtk.getscu, "-v", "-S", "-aet", "VIEWER", "-aec", "ROUTER",
                           "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                           "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=120, env=dcmtk_env())
    return done.stdout + done.stderr


def _pynetdicom_requestor(port: int, *, get: bool) -> Any:
    from pynetdicom import AE, build_role, evt

    ae = AE(ae_title="VIEWER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(STUDY_GET if get else STUDY_MOVE)
    ae.add_requested_context(CT)
    assoc = ae.associate("127.0.0.1", port, ae_title="ROUTER",
                         ext_neg=[build_role(CT, scp_role=True)] if get else [],
                         evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    assert assoc.is_established
    return assoc


def _moved(port: int, study_uid: str) -> Any:
    """The final response to a Study Root C-MOVE of ``study_uid`` to VIEWER_SCP, asked
    of the router on ``port`` by a pynetdicom requestor."""
    assoc = _pynetdicom_requestor(port, get=False)
    responses = list(assoc.send_c_move(_query(study_uid), "VIEWER_SCP", STUDY_MOVE))
    assoc.release()
    return responses[-1][0]


def _counts(final: Any) -> tuple[int, int, int]:
    """Completed, failed and warning sub-operations of a final C-MOVE response."""
    return (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations,
            final.NumberOfWarningSuboperations)


def _query(study_uid: str) -> pydicom.Dataset:
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    return query


@pytest.mark.parametrize("kind", ["C-GET", "C-MOVE proxy"])
def test_an_upstream_that_relayed_sub_operations_is_never_handed_over(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk, no_pending: None, kind: str) -> None:
    """a relays 2 of 4 instances with no pending response, then aborts. b used to be
    asked next and sent all 4 again: 6 C-STOREs for a 4-instance study, and b's
    Success. Now the requestor gets C001H after exactly those 2."""
    study = make_study(tmp_path / "study", n_series=1, n_instances=4, size_kb=4, seed=31)
    study_uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
    router_port = free_port()
    a_port, a, _ = _upstream("UPA", study, abort_after=2, move_to=("127.0.0.1", router_port))
    b_port, b, b_requests = _upstream("UPB", study, move_to=("127.0.0.1", router_port))
    sink = storescp_server(tmp_path, procs, aet="VIEWER_SCP", args=["+B"], dcmtk=dcmtk)
    router = _router(tmp_path, [("a", a_port, "UPA", 'move_mode = "proxy"\n'),
                                ("b", b_port, "UPB", 'move_mode = "proxy"\n')],
                     viewer=sink.port, port=router_port)
    try:
        router.wait_for("ready: 2 workers serving")
        if kind == "C-GET":
            said = _getscu(dcmtk, router.port, study_uid, tmp_path / "got")
            got = [_uid(p) for p in (tmp_path / "got").iterdir()]
            assert "Received C-GET Response (Failed: UnableToProcess" in said, said
            assert "Number of Completed Suboperations : 2" in said, said
        else:
            final = _moved(router.port, study_uid)
            assert final.Status == 0xC001, final
            assert "broke off after 2 sub-operations" in final.ErrorComment, final
            # With no pending response, the counts are those the router relayed.
            assert _counts(final) == (2, 0, 0), final
            router.wait_count("forward viewer:", 2)
            got = [_uid(p) for p in received_files(sink.outdir)]
    finally:
        router.stop()
        a.shutdown()
        b.shutdown()
    assert sorted(got) == sorted(_uid(p) for p in study[:2])
    assert b_requests == []


def test_an_unasked_cancel_hands_the_retrieve_over(
        tmp_path: Path, dcmtk: Dcmtk, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancel (FE00H) answers a C-CANCEL (PS3.4 C.4.3.3.1). An upstream that says it
    unasked has stopped short: the next is asked. The Cancel used to end the
    retrieve, and getscu got nothing of a study b holds."""
    from pynetdicom import dimse

    send = dimse.DIMSEServiceProvider.send_msg

    def cancel_unasked(self: Any, primitive: Any, context_id: int) -> None:
        # pynetdicom's SCP sends Cancel only after a C-CANCEL: a's final says it anyway.
        if type(primitive).__name__ == "C_GET" and self.assoc.ae.ae_title == "UPA" \
                and getattr(primitive, "Status", None) == 0x0000:
            primitive.Status = 0xFE00
        send(self, primitive, context_id)

    monkeypatch.setattr(dimse.DIMSEServiceProvider, "send_msg", cancel_unasked)
    study = make_study(tmp_path / "study", n_series=1, n_instances=3, size_kb=4, seed=32)
    a_port, a, _ = _upstream("UPA", study, answer=0x0000)
    b_port, b, _ = _upstream("UPB", study)
    router = _router(tmp_path, [("a", a_port, "UPA", ""), ("b", b_port, "UPB", "")])
    try:
        router.wait_for("ready: 2 workers serving")
        said = _getscu(dcmtk, router.port, str(pydicom.dcmread(study[0]).StudyInstanceUID),
                       tmp_path / "got")
        router.wait_for("answered Cancel to a retrieve not cancelled")
    finally:
        router.stop()
        a.shutdown()
        b.shutdown()
    assert "Received C-GET Response (Success)" in said, said
    assert sorted(_uid(p) for p in (tmp_path / "got").iterdir()) == \
        sorted(_uid(p) for p in study)


@pytest.mark.parametrize("where", ["C-GET, upstream accepting late",
                                   "C-MOVE, first upstream hung"])
def test_a_cancel_before_the_upstream_answers_is_answered_cancel(
        tmp_path: Path, where: str) -> None:
    """A C-CANCEL while the upstream association is being opened: the C-GET went out
    anyway and everything was delivered. One while the first upstream hangs: the
    requestor got that upstream's failure. Both are Cancel, FE00H (PS3.4 C.4.2.3.1,
    C.4.3.3.1), and no upstream is asked anything more."""
    study = make_study(tmp_path / "study", n_series=1, n_instances=2, size_kb=4, seed=33)
    study_uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
    get = where.startswith("C-GET")
    hold = threading.Event()
    hung = socket.socket()  # listens, never accepts: connects, never associates
    hung.bind(("127.0.0.1", 0))
    hung.listen()
    late_port, late, late_requests = _upstream("LATE", study, hold=hold)
    pacs_port, pacs, pacs_requests = _upstream("PACS", study)
    first = ("late", late_port, "LATE", "") if get else \
        ("hung", hung.getsockname()[1], "HUNG", "timeout = 3\n")
    router = _router(tmp_path, [first, ("pacs", pacs_port, "PACS", "")],
                     viewer=free_port())
    responses: list[Any] = []
    try:
        router.wait_for("ready: 2 workers serving")
        assoc = _pynetdicom_requestor(router.port, get=get)
        retrieve = (assoc.send_c_get(_query(study_uid), STUDY_GET, msg_id=1) if get else
                    assoc.send_c_move(_query(study_uid), "VIEWER_SCP", STUDY_MOVE, msg_id=1))
        requestor = threading.Thread(target=lambda: responses.extend(retrieve))
        requestor.start()
        router.wait_for("C-GET 1 (STUDY)" if get else "C-MOVE 1 (STUDY)")
        context = next(c.context_id for c in assoc.accepted_contexts
                       if c.abstract_syntax == (STUDY_GET if get else STUDY_MOVE))
        assoc.send_c_cancel(1, context)
        router.wait_for("C-CANCEL of C-")
        hold.set()
        requestor.join(60)
        assoc.release()
    finally:
        hold.set()
        router.stop()
        late.shutdown()
        pacs.shutdown()
        hung.close()
    assert responses and responses[-1][0].Status == 0xFE00, responses
    # PS3.4 C.4.2.3.1, C.4.3.3.1: Cancel "shall contain" the completed, failed and
    # warning counts (an outside conformance campaign found them missing).
    final = responses[-1][0]
    counts = [final.get(f"Number{of}Suboperations") for of in ("OfCompleted", "OfFailed",
                                                               "OfWarning")]
    assert None not in counts, final
    assert late_requests == [] and pacs_requests == []


def test_the_operation_limit_after_sub_operations_is_c001_with_the_counts(
        tmp_path: Path) -> None:
    """[timeouts] operation ran out after one sub-operation had been relayed: the
    requestor got A702H (none could be performed) and no counts."""
    study = make_study(tmp_path / "study", n_series=1, n_instances=3, size_kb=4, seed=34)
    port, server, _ = _upstream("SLOW", study, stall_after=1)
    # Appended to the router's [timeouts] table by the Router helper.
    router = _router(tmp_path, [("slow", port, "SLOW", "timeout = 60\n")],
                     extra="operation = 2\n")
    try:
        router.wait_for("ready: 2 workers serving")
        assoc = _pynetdicom_requestor(router.port, get=True)
        responses = list(assoc.send_c_get(
            _query(str(pydicom.dcmread(study[0]).StudyInstanceUID)), STUDY_GET))
        assoc.release()
        router.wait_for("no final answer from upstream in 2 s")
    finally:
        router.stop()
        server.shutdown()
    final = responses[-1][0]
    assert final.Status == 0xC001, final
    assert final.NumberOfCompletedSuboperations == 1, final
    assert "broke off after 1" in final.ErrorComment, final


def test_a_broken_off_proxied_move_counts_what_the_destination_refused(
        tmp_path: Path, no_pending: None) -> None:
    """Proxy mode, no pending responses: the destination refuses the second of three
    sub-operations (A700H), then the upstream aborts. The C001H used to carry no
    counts at all; now it carries the destination's answers: 2 completed, 1 failed."""
    from pynetdicom import AE, StoragePresentationContexts, evt

    stored: list[str] = []

    def on_store(event: Any) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0xA700 if len(stored) == 2 else 0x0000

    viewer = AE(ae_title="VIEWER_SCP")
    viewer.supported_contexts = StoragePresentationContexts
    viewer_port = free_port()
    sink = viewer.start_server(("127.0.0.1", viewer_port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, on_store)])
    study = make_study(tmp_path / "study", n_series=1, n_instances=4, size_kb=4, seed=35)
    router_port = free_port()
    port, server, _ = _upstream("UPA", study, abort_after=3,
                                move_to=("127.0.0.1", router_port))
    router = _router(tmp_path, [("a", port, "UPA", 'move_mode = "proxy"\n')],
                     viewer=viewer_port, port=router_port)
    try:
        router.wait_for("ready: 2 workers serving")
        final = _moved(router.port, str(pydicom.dcmread(study[0]).StudyInstanceUID))
    finally:
        router.stop()
        server.shutdown()
        sink.shutdown()
    assert final.Status == 0xC001, final
    assert "broke off after 3 sub-operations" in final.ErrorComment, final
    assert _counts(final) == (2, 1, 0), final
    assert sorted(stored) == sorted(_uid(p) for p in study[:3])
