"""MPPS and Storage Commitment through the router, with pynetdicom peers on both sides.

A pynetdicom modality talks to the router; a pynetdicom RIS / PACS stands behind it.
The router runs as a subprocess (`dicom-router run`) with `[routing] mpps` and
`storage_commitment` naming the destinations.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.helpers.net import free_port
from tests.helpers.router import Router

pytestmark = pytest.mark.interop

MPPS = "1.2.840.10008.3.1.2.3.3"
COMMITMENT = "1.2.840.10008.1.20.1"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


def _destination(name: str, port: int, aet: str) -> str:
    return (f'[[destination]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {port}\n'
            f'ae_title = "{aet}"\ntimeout = 10\n')


def _associated(ae_title: str, sop_class: str, port: int) -> Any:
    """A pynetdicom association from ``ae_title`` to the router on ``port``."""
    from pynetdicom import AE

    requester = AE(ae_title=ae_title)
    requester.add_requested_context(sop_class)
    assoc = requester.associate("127.0.0.1", port, ae_title="ROUTER")
    assert assoc.is_established
    return assoc


def _serving(ae_title: str, sop_class: str, *handlers: tuple[Any, Any]) -> tuple[int, Any]:
    """A pynetdicom SCP of ``sop_class`` on a free loopback port with ``handlers``,
    (event, handler) pairs: (its port, its server, to shut down)."""
    from pynetdicom import AE

    scp = AE(ae_title=ae_title)
    scp.add_supported_context(sop_class)
    port = free_port()
    return port, scp.start_server(("127.0.0.1", port), block=False,
                                  evt_handlers=list(handlers))


def _commitment_router(tmp_path: Path, pacs_port: int, modality_port: int,
                       port: int | None = None) -> Router:
    """The router relaying Storage Commitment to the PACS, and its results to the
    modality, a [[destination]]."""
    return Router(tmp_path, port=port, extra=(
        '[routing]\nstorage_commitment = "pacs"\n'
        + _destination("pacs", pacs_port, "PACS")
        + _destination("modality", modality_port, "MODALITY")))


def _modality(on_report: Callable[[Dataset], object],
              report_seen: threading.Event) -> tuple[int, Any]:
    """A pynetdicom modality's Storage Commitment SCU, serving the N-EVENT-REPORT on a
    free loopback port: ``on_report`` gets each report's data set, then
    ``report_seen`` is set. (Its port, its server, to shut down.)"""
    from pynetdicom import AE, evt

    def on_event_report(event: Any) -> tuple[int, None]:
        on_report(event.event_information)
        report_seen.set()
        return 0x0000, None

    modality = AE(ae_title="MODALITY")
    modality.add_supported_context(COMMITMENT, scu_role=True, scp_role=True)
    port = free_port()
    return port, modality.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_N_EVENT_REPORT, on_event_report)])


def _commitment_request(transaction: str) -> Dataset:
    """An N-ACTION's data set asking commitment for one CT instance (PS3.4 J.3.2)."""
    action = Dataset()
    action.TransactionUID = transaction
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = generate_uid()
    action.ReferencedSOPSequence = [item]
    return action


def test_mpps_n_create_and_n_set_reach_the_ris(tmp_path: Path) -> None:
    from pynetdicom import AE, evt

    created: dict[str, Dataset] = {}
    updates: list[tuple[str, Dataset]] = []

    def on_create(event: Any) -> tuple[int, Dataset]:
        ds = event.attribute_list
        created[event.request.AffectedSOPInstanceUID] = ds
        return 0x0000, ds

    def on_set(event: Any) -> tuple[int, Dataset]:
        updates.append((event.request.RequestedSOPInstanceUID, event.attribute_list))
        return 0x0000, event.attribute_list

    ris = AE(ae_title="RIS")
    ris.add_supported_context(MPPS)
    ris_port = free_port()
    server = ris.start_server(("127.0.0.1", ris_port), block=False,
                              evt_handlers=[(evt.EVT_N_CREATE, on_create),
                                            (evt.EVT_N_SET, on_set)])
    router = Router(tmp_path, extra='[routing]\nmpps = "ris"\n'
                    + _destination("ris", ris_port, "RIS"))
    try:
        router.wait_for("ready: 2 workers serving")
        assoc = _associated("CT1", MPPS, router.port)
        uid = generate_uid()
        attrs = Dataset()
        attrs.PatientID = "P1"
        attrs.PerformedProcedureStepStatus = "IN PROGRESS"
        attrs.PerformedProcedureStepID = "PPS1"
        status, reply = assoc.send_n_create(attrs, MPPS, uid)
        assert status.Status == 0x0000 and reply.PatientID == "P1"
        change = Dataset()
        change.PerformedProcedureStepStatus = "COMPLETED"
        status, _ = assoc.send_n_set(change, MPPS, uid)
        assert status.Status == 0x0000
        assoc.release()
        router.wait_for("NSet relayed to ris: status 0x0000")
    finally:
        router.stop()
        server.shutdown()
    # The RIS saw the step under the modality's own instance UID, with its attributes.
    assert list(created) == [uid] and created[uid].PerformedProcedureStepID == "PPS1"
    assert [(u, ds.PerformedProcedureStepStatus) for u, ds in updates] == [(uid, "COMPLETED")]


def test_a_release_sent_behind_an_n_create_waits_for_its_answer(tmp_path: Path) -> None:
    """An MPPS N-CREATE and an A-RELEASE-RQ in one write, the RIS answering after a
    while: the A-RELEASE-RP came at once and the N-CREATE-RSP never reached the
    modality. Now the response comes first, then the A-RELEASE-RP."""
    import time

    from pynetdicom import evt

    from tests.faults.test_actor_faults import (
        RELEASE_RQ,
        _data_set,
        answers_until_not_data,
        command,
        p_data,
    )

    def on_create(event: Any) -> tuple[int, Dataset]:
        time.sleep(0.5)  # a slow RIS (the peer's own pace, not a wait for the test)
        return 0x0000, event.attribute_list

    ris_port, server = _serving("RIS", MPPS, (evt.EVT_N_CREATE, on_create))
    router = Router(tmp_path, extra='[routing]\nmpps = "ris"\n'
                    + _destination("ris", ris_port, "RIS"))
    try:
        router.wait_for("ready: 2 workers serving")
        pdus = answers_until_not_data(router.port, MPPS, p_data(command(
            AffectedSOPClassUID=MPPS, CommandField=0x0140, MessageID=3,
            CommandDataSetType=0x0000, AffectedSOPInstanceUID=generate_uid()))
            + p_data(_data_set(PatientID="P1"), is_command=False) + RELEASE_RQ)
        router.wait_for("closed: released")
    finally:
        router.stop()
        server.shutdown()
    seen = [kind for kind, _ in pdus]
    assert seen[0] == 0x04 and seen[-1] == 0x06, seen


def test_storage_commitment_round_trip_with_the_report_on_a_new_association(
        tmp_path: Path) -> None:
    from pynetdicom import AE, build_role, evt

    router_port = free_port()
    transaction = generate_uid()
    reported: list[Dataset] = []
    report_seen = threading.Event()
    # The modality: asks for commitment through the router and serves the report.
    modality_port, modality_server = _modality(lambda info: reported.append(info),
                                               report_seen)

    # The PACS: answers the N-ACTION, then reports on an association of its own.
    def report_later(info: Dataset) -> None:
        pacs_scu = AE(ae_title="PACS")
        pacs_scu.add_requested_context(COMMITMENT)
        role = build_role(COMMITMENT, scp_role=True)
        assoc = pacs_scu.associate("127.0.0.1", router_port, ae_title="ROUTER",
                                   ext_neg=[role])
        assert assoc.is_established
        event = Dataset()
        event.TransactionUID = info.TransactionUID
        event.ReferencedSOPSequence = info.ReferencedSOPSequence
        status, _ = assoc.send_n_event_report(event, 1, COMMITMENT, COMMITMENT_INSTANCE)
        outcome.append(status.Status)
        assoc.release()

    outcome: list[int] = []

    def on_action(event: Any) -> tuple[int, None]:
        threading.Thread(target=report_later, args=(event.action_information,)).start()
        return 0x0000, None

    pacs_port, pacs_server = _serving("PACS", COMMITMENT, (evt.EVT_N_ACTION, on_action))
    router = _commitment_router(tmp_path, pacs_port, modality_port, port=router_port)
    try:
        router.wait_for("ready: 2 workers serving")
        assoc = _associated("MODALITY", COMMITMENT, router.port)
        action = _commitment_request(transaction)
        item = action.ReferencedSOPSequence[0]
        status, _ = assoc.send_n_action(action, 1, COMMITMENT, COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
        assoc.release()
        assert report_seen.wait(30), router.log()
        router.wait_for("NEventReport relayed to modality: status 0x0000")
    finally:
        router.stop()
        pacs_server.shutdown()
        modality_server.shutdown()
    assert outcome == [0x0000]  # the PACS got the modality's answer
    (report,) = reported
    assert report.TransactionUID == transaction
    assert report.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        item.ReferencedSOPInstanceUID
    assert not list((router.spool / "commitments").glob("*.json"))  # delivered: forgotten


@pytest.mark.parametrize("when", ["with-the-answer", "after-the-answer"])
def test_a_report_sent_on_the_n_actions_association_reaches_the_modality(
        tmp_path: Path, when: str) -> None:
    """PS3.4 J.3.3 lets the PACS send its result on the association of the N-ACTION.
    The router released that association right after the N-ACTION-RSP; the report,
    crossing the A-RELEASE-RQ, could not be answered (PS3.8 Table 9-10: no P-DATA
    from Sta7), the PACS waited for its N-EVENT-REPORT-RSP until its own timeout and
    the modality never heard the result (an outside interop campaign). Now the
    association stays open a while for it: relayed, and the modality's answer is
    the PACS's. A report sent as the PACS answers may come before its N-ACTION-RSP:
    it was dropped ("ignoring NEventReportRQ"), now taken up after it."""
    from pynetdicom import evt
    from pynetdicom.dimse_messages import N_ACTION_RSP

    transaction = generate_uid()
    reported: list[Dataset] = []
    report_seen = threading.Event()
    modality_port, modality_server = _modality(lambda info: reported.append(info),
                                               report_seen)
    outcome: list[int | None] = []

    def on_action(event: Any) -> tuple[int, None]:
        info = event.action_information

        def report_here() -> None:  # once the N-ACTION-RSP is out, on its association
            report = Dataset()
            report.TransactionUID = info.TransactionUID
            report.ReferencedSOPSequence = info.ReferencedSOPSequence
            status, _ = event.assoc.send_n_event_report(report, 1, COMMITMENT,
                                                        COMMITMENT_INSTANCE)
            outcome.append(status.Status if status else None)

        if when == "with-the-answer":
            threading.Thread(target=report_here).start()
        else:
            answered.append(report_here)
        return 0x0000, None

    answered: list[Callable[[], None]] = []

    def on_sent(event: Any) -> None:
        if isinstance(event.message, N_ACTION_RSP) and answered:  # it is out
            threading.Thread(target=answered.pop()).start()

    pacs_port, pacs_server = _serving("PACS", COMMITMENT, (evt.EVT_N_ACTION, on_action),
                                      (evt.EVT_DIMSE_SENT, on_sent))
    pacs_server.ae.dimse_timeout = 20
    router = _commitment_router(tmp_path, pacs_port, modality_port)
    try:
        router.wait_for("ready: 2 workers serving")
        assoc = _associated("MODALITY", COMMITMENT, router.port)
        status, _ = assoc.send_n_action(_commitment_request(transaction), 1, COMMITMENT,
                                        COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
        assoc.release()
        assert report_seen.wait(15), router.log()
        router.wait_for("NEventReport on the N-ACTION's association relayed to modality: "
                        "status 0x0000")
    finally:
        router.stop()
        pacs_server.shutdown()
        modality_server.shutdown()
    assert outcome == [0x0000], router.log()  # the PACS got the modality's answer
    assert [r.TransactionUID for r in reported] == [transaction]
    assert not list((router.spool / "commitments").glob("*.json"))  # delivered: forgotten


def test_the_modality_hears_the_n_action_response_before_the_report(
        tmp_path: Path) -> None:
    """A PACS that sends its report (on an association of its own, PS3.4 J.3.3)
    before it answers the router's A-RELEASE: the router waited for that release
    before answering the N-ACTION, so the modality got the report of a commitment
    before the response accepting it."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.pdu_primitives import A_RELEASE

    router_port = free_port()
    heard: list[str] = []
    report_seen = threading.Event()
    modality_port, modality_server = _modality(lambda _: heard.append("report"), report_seen)
    actions: list[Dataset] = []

    def on_action(event: Any) -> tuple[int, None]:
        actions.append(event.action_information)
        return 0x0000, None

    def report_before_release(event: Any) -> None:
        # Runs as the A-RELEASE-RQ arrives, before pynetdicom answers it.
        if not isinstance(event.primitive, A_RELEASE) or event.primitive.result is not None \
                or not actions:
            return
        info = actions.pop()
        pacs_scu = AE(ae_title="PACS")
        pacs_scu.add_requested_context(COMMITMENT)
        assoc = pacs_scu.associate("127.0.0.1", router_port, ae_title="ROUTER",
                                   ext_neg=[build_role(COMMITMENT, scp_role=True)])
        assert assoc.is_established
        report = Dataset()
        report.TransactionUID = info.TransactionUID
        report.ReferencedSOPSequence = info.ReferencedSOPSequence
        assoc.send_n_event_report(report, 1, COMMITMENT, COMMITMENT_INSTANCE)
        assoc.release()

    pacs_port, pacs_server = _serving("PACS", COMMITMENT, (evt.EVT_N_ACTION, on_action),
                                      (evt.EVT_ACSE_RECV, report_before_release))
    router = _commitment_router(tmp_path, pacs_port, modality_port, port=router_port)
    try:
        router.wait_for("ready: 2 workers serving")
        assoc = _associated("MODALITY", COMMITMENT, router.port)
        status, _ = assoc.send_n_action(_commitment_request(generate_uid()), 1, COMMITMENT,
                                        COMMITMENT_INSTANCE)
        heard.append(f"response 0x{status.Status:04X}")
        assoc.release()
        assert report_seen.wait(30), router.log()
    finally:
        router.stop()
        pacs_server.shutdown()
        modality_server.shutdown()
    assert heard == ["response 0x0000", "report"]


def test_an_n_create_whose_data_set_cannot_be_converted_is_answered(tmp_path: Path) -> None:
    """The RIS takes MPPS in Implicit VR LE only, so the router converts the modality's
    Explicit VR data set; this one's first element claims 255 bytes where 12 follow.
    The modality gets C000H at once and the log one line. It used to get no answer at
    all (until its own timeout), and the worker logged a traceback."""
    from pynetdicom import AE

    from router.dicom import dimse
    from router.net.client import connect

    ris = AE(ae_title="RIS")
    ris.add_supported_context(MPPS, ["1.2.840.10008.1.2"])
    ris_port = free_port()
    server = ris.start_server(("127.0.0.1", ris_port), block=False)
    router = Router(tmp_path, extra='[routing]\nmpps = "ris"\n'
                    + _destination("ris", ris_port, "RIS"))
    try:
        router.wait_for("ready: 2 workers serving")
        with connect("127.0.0.1", router.port, calling_ae="CT1", called_ae="ROUTER",
                     contexts=[(MPPS, ["1.2.840.10008.1.2.1"])]) as assoc:
            msg = dimse.NCreateRQ(message_id=5, affected_sop_class_uid=MPPS,
                                  affected_sop_instance_uid=generate_uid(), has_dataset=True)
            assoc._send(assoc.context_for(MPPS), msg, b"\x08\x00\x16\x00UI\xff\x00" + b"1.2" * 4)
            rsp = assoc._receive(5, timeout=20).message
            assert rsp.status == 0xC000, rsp
            assoc.release()
        router.wait_for("NCreate not relayed: ")
    finally:
        router.stop()
        server.shutdown()
    assert "Traceback" not in router.log(), router.log()


def test_commitment_from_a_requestor_the_result_cannot_reach_is_refused_up_front(
        tmp_path: Path) -> None:
    """The PACS reports later on an association of its own, which the router can
    relay only to a [[destination]]: a requestor that is none gets 0110H for its
    N-ACTION now, saying why, and the PACS is never asked. It used to get Success,
    and the result was refused when it came ("unknown transaction") and lost."""
    from pynetdicom import evt

    asked: list[str] = []

    def on_action(event: Any) -> tuple[int, None]:
        asked.append(event.action_information.TransactionUID)
        return 0x0000, None

    pacs_port, server = _serving("PACS", COMMITMENT, (evt.EVT_N_ACTION, on_action))
    router = Router(tmp_path, extra='[routing]\nstorage_commitment = "pacs"\n'
                    + _destination("pacs", pacs_port, "PACS"))
    try:
        router.wait_for("ready: 2 workers serving")
        assoc = _associated("STRANGER", COMMITMENT, router.port)
        action = _commitment_request(generate_uid())
        status, _ = assoc.send_n_action(action, 1, COMMITMENT, COMMITMENT_INSTANCE)
        assoc.release()
        router.wait_for("NAction refused: no [[destination]] has AE title STRANGER")
    finally:
        router.stop()
        server.shutdown()
    assert status.Status == 0x0110 and "STRANGER" in status.ErrorComment
    assert asked == []
    assert not list((router.spool / "commitments").glob("*.json"))


@pytest.mark.parametrize("pacs_answers", [0x0110, None], ids=["refused", "down"])
def test_a_commitment_request_that_fails_leaves_no_record(
        tmp_path: Path, pacs_answers: int | None) -> None:
    """The PACS refuses the N-ACTION, or cannot be reached: the modality hears so and
    will ask again. The transaction's record went on waiting, for ever, for a report
    that was not coming (and would have relayed one for a request the modality was
    told had failed)."""
    from pynetdicom import evt

    def on_action(event: Any) -> tuple[int, None]:
        return pacs_answers or 0, None

    pacs_port, server = _serving("PACS", COMMITMENT, (evt.EVT_N_ACTION, on_action))
    if pacs_answers is None:
        server.shutdown()  # nobody listens on its port now
    router = Router(tmp_path, extra='[routing]\nstorage_commitment = "pacs"\n'
                    + _destination("pacs", pacs_port, "PACS")
                    + _destination("ct", free_port(), "CT1"))
    try:
        router.wait_for("ready: 2 workers serving")
        assoc = _associated("CT1", COMMITMENT, router.port)
        status, _ = assoc.send_n_action(_commitment_request(generate_uid()), 1, COMMITMENT,
                                        COMMITMENT_INSTANCE)
        assoc.release()
        router.wait_for("NAction relay" if pacs_answers is None
                        else "NAction relayed to pacs: status 0x0110")
    finally:
        router.stop()
        if pacs_answers is not None:
            server.shutdown()
    assert status.Status == 0x0110
    assert not list((router.spool / "commitments").glob("*.json"))


def test_an_mpps_relay_that_fails_names_the_ris(tmp_path: Path) -> None:
    """The RIS is down: the modality gets 0110H, and the log and the Error Comment
    name the RIS (they named only the modality's own association, which read as if
    the modality had dropped)."""

    router = Router(tmp_path, extra='[routing]\nmpps = "ris"\n'
                    + _destination("ris", free_port(), "RIS"))
    try:
        router.wait_for("ready: 2 workers serving")
        assoc = _associated("CT1", MPPS, router.port)
        attrs = Dataset()
        attrs.PatientID = "P1"
        status, _ = assoc.send_n_create(attrs, MPPS, generate_uid())
        assoc.release()
        router.wait_for("NCreate relay to ris: cannot connect")
    finally:
        router.stop()
    assert status.Status == 0x0110 and status.ErrorComment.startswith("ris: ")


def test_a_commitment_result_from_anyone_but_the_pacs_is_refused(tmp_path: Path) -> None:
    """A forged N-EVENT-REPORT naming a real transaction, from another AE title and
    address (127.0.0.2), is refused and the transaction kept: relayed, it told the
    modality that instances were safe which no PACS had committed (a modality may
    then delete them), and the PACS's real report was refused after it."""
    from pynetdicom import AE, build_role, evt

    def on_action(event: Any) -> tuple[int, None]:
        return 0x0000, None  # the PACS will report later (not in this test)

    pacs_port, server = _serving("PACS", COMMITMENT, (evt.EVT_N_ACTION, on_action))
    router = _commitment_router(tmp_path, pacs_port, free_port())
    try:
        router.wait_for("ready: 2 workers serving")
        action = _commitment_request(generate_uid())
        assoc = _associated("MODALITY", COMMITMENT, router.port)
        status, _ = assoc.send_n_action(action, 1, COMMITMENT, COMMITMENT_INSTANCE)
        assoc.release()
        assert status.Status == 0x0000
        forger = AE(ae_title="ATTACKER")
        forger.add_requested_context(COMMITMENT)
        forged = forger.associate("127.0.0.1", router.port, ae_title="ROUTER",
                                  bind_address=("127.0.0.2", 0),
                                  ext_neg=[build_role(COMMITMENT, scp_role=True)])
        assert forged.is_established
        event = Dataset()
        event.TransactionUID = action.TransactionUID
        event.ReferencedSOPSequence = action.ReferencedSOPSequence
        status, _ = forged.send_n_event_report(event, 1, COMMITMENT, COMMITMENT_INSTANCE)
        forged.release()
        router.wait_for("NEventReport refused: a commitment result is only taken from pacs")
    finally:
        router.stop()
        server.shutdown()
    assert status.Status == 0x0110
    assert (router.spool / "commitments" / f"{action.TransactionUID}.json").exists()


def test_a_running_router_forgets_commitments_never_answered(tmp_path: Path) -> None:
    """The first worker sweeps the records at start (then hourly): a result that never
    came must not keep its record for the router's whole life."""
    import os
    import time

    from workers.nservices import COMMITMENT_KEEP, COMMITMENTS_DIR

    folder = tmp_path / "spool" / COMMITMENTS_DIR
    folder.mkdir(parents=True)
    stale, fresh = folder / "1.2.3.7.json", folder / "1.2.3.8.json"
    for path in (stale, fresh):
        path.write_text('{"requestor": "MOD1"}')
    then = time.time() - COMMITMENT_KEEP - 3600
    os.utime(stale, (then, then))
    router = Router(tmp_path, workers=2)
    try:
        router.wait_for("storage commitment: 1 request(s) without a result after 30 days "
                        "forgotten")
    finally:
        assert router.stop() == 0
    assert not stale.exists() and fresh.exists()
    assert router.count("storage commitment:") == 1  # one worker sweeps, not each
