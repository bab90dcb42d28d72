"""Independent check of router.dicom.fsm against PS3.8 §9.2.

``EXPECTED`` below is PS3.8 Table 9-10 ("DICOM Upper Layer Protocol State
Transition Table") typed in row by row from the standard, not copied from
fsm.py; ``NEXT_STATES`` is the "Next state is ..." line of every action in
Tables 9-6 to 9-9. One parametrized case per cell of Table 9-10 (13 states x
19 events = 247), then the actions one by one, then the standard sequences of
PS3.8 §7.1-7.2 (association, release, release collision) and ARTIM expiry
(§9.1.5) driven end to end through :func:`fsm.step`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pytest

from router.dicom import fsm
from router.dicom.errors import AbortReason, AbortSource, LocalProtocolError
from router.dicom.fsm import (
    Action,
    ActionInput,
    ArtimStart,
    ArtimStop,
    CloseTransport,
    ConnectTransport,
    Event,
    Indication,
    IndicationKind,
    Output,
    SendPDU,
    State,
)
from router.dicom.pdu import (
    PDU,
    PDV,
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRP,
    AReleaseRQ,
    PDataTF,
    PresentationContextAC,
    PresentationContextResult,
    PresentationContextRQ,
    RejectReason,
    RejectResult,
    RejectSource,
    UserInformation,
)

# ---------------------------------------------------------------------------
# PS3.8 Table 9-10, typed in from the standard.
# Columns: Sta1 .. Sta13. "." is a blank cell.
# ---------------------------------------------------------------------------

_ROWS: dict[Event, str] = {
    #             Sta1  Sta2  Sta3  Sta4  Sta5  Sta6  Sta7  Sta8  Sta9  Sta10 Sta11 Sta12 Sta13
    # Evt1  A-ASSOCIATE Request (local user)
    Event.EVT1:  "AE-1  .     .     .     .     .     .     .     .     .     .     .     .",
    # Evt2  Transport Conn. Confirm (local transport service)
    Event.EVT2:  ".     .     .     AE-2  .     .     .     .     .     .     .     .     .",
    # Evt3  A-ASSOCIATE-AC PDU (received on transport connection)
    Event.EVT3:  ".     AA-1  AA-8  .     AE-3  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6",
    # Evt4  A-ASSOCIATE-RJ PDU (received on transport connection)
    Event.EVT4:  ".     AA-1  AA-8  .     AE-4  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6",
    # Evt5  Transport Connect Indication (local transport service)
    Event.EVT5:  "AE-5  .     .     .     .     .     .     .     .     .     .     .     .",
    # Evt6  A-ASSOCIATE-RQ PDU (received on transport connection)
    Event.EVT6:  ".     AE-6  AA-8  .     AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-7",
    # Evt7  A-ASSOCIATE response primitive (accept)
    Event.EVT7:  ".     .     AE-7  .     .     .     .     .     .     .     .     .     .",
    # Evt8  A-ASSOCIATE response primitive (reject)
    Event.EVT8:  ".     .     AE-8  .     .     .     .     .     .     .     .     .     .",
    # Evt9  P-DATA request primitive
    Event.EVT9:  ".     .     .     .     .     DT-1  .     AR-7  .     .     .     .     .",
    # Evt10 P-DATA-TF PDU
    Event.EVT10: ".     AA-1  AA-8  .     AA-8  DT-2  AR-6  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6",
    # Evt11 A-RELEASE Request primitive
    Event.EVT11: ".     .     .     .     .     AR-1  .     .     .     .     .     .     .",
    # Evt12 A-RELEASE-RQ PDU (received on open transport connection)
    Event.EVT12: ".     AA-1  AA-8  .     AA-8  AR-2  AR-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6",
    # Evt13 A-RELEASE-RP PDU (received on transport connection)
    Event.EVT13: ".     AA-1  AA-8  .     AA-8  AA-8  AR-3  AA-8  AA-8  AR-10 AR-3  AA-8  AA-6",
    # Evt14 A-RELEASE Response primitive
    Event.EVT14: ".     .     .     .     .     .     .     AR-4  AR-9  .     .     AR-4  .",
    # Evt15 A-ABORT Request primitive
    Event.EVT15: ".     .     AA-1  AA-2  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  .",
    # Evt16 A-ABORT PDU (received on open transport connection)
    Event.EVT16: ".     AA-2  AA-3  .     AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-2",
    # Evt17 Transport connection closed indication (local transport service)
    Event.EVT17: ".     AA-5  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AR-5",
    # Evt18 ARTIM timer expired (Association reject/release timer)
    Event.EVT18: ".     AA-2  .     .     .     .     .     .     .     .     .     .     AA-2",
    # Evt19 Unrecognized or invalid PDU received
    Event.EVT19: ".     AA-1  AA-8  .     AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-7",
}

_STATES = list(State)  # Sta1 .. Sta13, in the order of the table's columns
_EVENTS = list(Event)  # Evt1 .. Evt19, in the order of its rows


def _parse(rows: dict[Event, str]) -> dict[tuple[State, Event], Action]:
    table: dict[tuple[State, Event], Action] = {}
    for event, row in rows.items():
        cells = row.split()
        assert len(cells) == 13, f"{event.name}: {len(cells)} cells typed"
        for state, cell in zip(_STATES, cells, strict=True):
            if cell != ".":
                table[(state, event)] = Action[cell.replace("-", "_")]
    return table


EXPECTED = _parse(_ROWS)

# Events raised by the local user or the local transport service (PS3.8 Table
# 9-10 row labels say "local user", "local transport service" or "primitive").
LOCAL = frozenset({Event.EVT1, Event.EVT2, Event.EVT5, Event.EVT7, Event.EVT8, Event.EVT9,
                   Event.EVT11, Event.EVT14, Event.EVT15})

# "Next state is ..." of Tables 9-6 (AE), 9-7 (DT), 9-8 (AR), 9-9 (AA).
NEXT_STATES: dict[Action, frozenset[State]] = {
    Action.AE_1: frozenset({State.STA4}),
    Action.AE_2: frozenset({State.STA5}),
    Action.AE_3: frozenset({State.STA6}),
    Action.AE_4: frozenset({State.STA1}),
    Action.AE_5: frozenset({State.STA2}),
    Action.AE_6: frozenset({State.STA3, State.STA13}),
    Action.AE_7: frozenset({State.STA6}),
    Action.AE_8: frozenset({State.STA13}),
    Action.DT_1: frozenset({State.STA6}),
    Action.DT_2: frozenset({State.STA6}),
    Action.AR_1: frozenset({State.STA7}),
    Action.AR_2: frozenset({State.STA8}),
    Action.AR_3: frozenset({State.STA1}),
    Action.AR_4: frozenset({State.STA13}),
    Action.AR_5: frozenset({State.STA1}),
    Action.AR_6: frozenset({State.STA7}),
    Action.AR_7: frozenset({State.STA8}),
    Action.AR_8: frozenset({State.STA9, State.STA10}),
    Action.AR_9: frozenset({State.STA11}),
    Action.AR_10: frozenset({State.STA12}),
    Action.AA_1: frozenset({State.STA13}),
    Action.AA_2: frozenset({State.STA1}),
    Action.AA_3: frozenset({State.STA1}),
    Action.AA_4: frozenset({State.STA1}),
    Action.AA_5: frozenset({State.STA1}),
    Action.AA_6: frozenset({State.STA13}),
    Action.AA_7: frozenset({State.STA13}),
    Action.AA_8: frozenset({State.STA13}),
}


# ---------------------------------------------------------------------------
# PDUs used as event payloads
# ---------------------------------------------------------------------------

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"

RQ = AAssociateRQ(
    called_ae_title="ROUTER",
    calling_ae_title="MODALITY",
    presentation_contexts=(
        PresentationContextRQ(context_id=1, abstract_syntax=VERIFICATION,
                              transfer_syntaxes=(IMPLICIT_LE,)),
    ),
    user_information=UserInformation(),
)
AC = AAssociateAC(
    called_ae_title="ROUTER",
    calling_ae_title="MODALITY",
    presentation_contexts=(
        PresentationContextAC(context_id=1, result=PresentationContextResult.ACCEPTANCE,
                              transfer_syntax=IMPLICIT_LE),
    ),
    user_information=UserInformation(),
)
RJ_USER = AAssociateRJ(result=RejectResult.REJECTED_PERMANENT, source=RejectSource.SERVICE_USER,
                       reason=int(RejectReason.USER_CALLED_AE_NOT_RECOGNIZED))
RJ_PROVIDER = AAssociateRJ(result=RejectResult.REJECTED_PERMANENT,
                           source=RejectSource.SERVICE_PROVIDER_ACSE, reason=2)
PDATA = PDataTF(pdvs=(PDV(context_id=1, is_command=True, is_last=True, data=b"\x00" * 4),))
REL_RQ = AReleaseRQ()
REL_RP = AReleaseRP()
ABORT_USER = AAbort(source=int(AbortSource.SERVICE_USER), reason=0)
ABORT_PROVIDER = AAbort(source=int(AbortSource.SERVICE_PROVIDER),
                        reason=int(AbortReason.INVALID_PDU_PARAMETER_VALUE))

# The PDU each event carries (received, or handed over by the local user).
EVENT_PDU: dict[Event, PDU | None] = {
    Event.EVT1: RQ,
    Event.EVT2: RQ,  # AE-2 sends the A-ASSOCIATE-RQ kept from Evt1
    Event.EVT3: AC,
    Event.EVT4: RJ_USER,
    Event.EVT5: None,
    Event.EVT6: RQ,
    Event.EVT7: AC,
    Event.EVT8: RJ_USER,
    Event.EVT9: PDATA,
    Event.EVT10: PDATA,
    Event.EVT11: REL_RQ,
    Event.EVT12: REL_RQ,
    Event.EVT13: REL_RP,
    Event.EVT14: REL_RP,
    Event.EVT15: ABORT_USER,
    Event.EVT16: ABORT_USER,
    Event.EVT17: None,
    Event.EVT18: None,
    Event.EVT19: None,
}


def _input(event: Event, *, is_requestor: bool = True) -> ActionInput:
    return ActionInput(is_requestor=is_requestor, pdu=EVENT_PDU[event])


def _label(state: State, event: Event) -> str:
    return f"{state.name.title()}-{event.name.title()}"


# ---------------------------------------------------------------------------
# One case per cell of Table 9-10
# ---------------------------------------------------------------------------


def test_expected_table_is_complete() -> None:
    # Sanity of the typed-in table itself: 19 rows, 13 columns, 123 defined cells.
    assert set(_ROWS) == set(Event)
    assert len(EXPECTED) == 123
    assert set(EXPECTED.values()) == set(Action)  # every action is used somewhere


CELLS = list(itertools.product(_STATES, _EVENTS))
assert len(CELLS) == 247


@pytest.mark.parametrize(("state", "event"), CELLS, ids=[_label(s, e) for s, e in CELLS])
def test_table_9_10_cell(state: State, event: Event) -> None:
    expected = EXPECTED.get((state, event))
    if expected is None:
        if event in LOCAL:
            # A blank cell for a local primitive is the local user's mistake.
            with pytest.raises(LocalProtocolError):
                fsm.step(state, event, _input(event))
        else:
            # Received PDUs / transport / timer: the cell is simply not in the map.
            assert (state, event) not in fsm.TRANSITIONS
            with pytest.raises(LocalProtocolError):
                fsm.step(state, event, _input(event))
        return

    assert fsm.TRANSITIONS.get((state, event)) is expected
    for is_requestor in (True, False):
        action, next_state, _ = fsm.step(state, event, _input(event, is_requestor=is_requestor))
        assert action is expected
        assert next_state in NEXT_STATES[expected]


def test_no_cells_beyond_the_standard() -> None:
    assert set(fsm.TRANSITIONS) == set(EXPECTED)


def test_every_action_has_a_function() -> None:
    assert set(fsm.ACTIONS) == set(Action)


# ---------------------------------------------------------------------------
# Actions, Tables 9-6 to 9-9: next state and outputs
# ---------------------------------------------------------------------------


def _run(action: Action, inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return fsm.ACTIONS[action](inp)


@dataclass(frozen=True)
class ActionCase:
    action: Action
    inp: ActionInput
    next_state: State
    outputs: tuple[Output, ...]
    rule: str  # the standard's wording, Tables 9-6..9-9

    @property
    def id(self) -> str:
        return f"{self.action.name}-{self.next_state.name}"


REQ = True
ACC = False

ACTION_CASES = [
    # --- Table 9-6, association establishment ------------------------------
    ActionCase(Action.AE_1, ActionInput(is_requestor=REQ, pdu=RQ), State.STA4,
               (ConnectTransport(),),
               "Issue TRANSPORT CONNECT request primitive to local transport service"),
    ActionCase(Action.AE_2, ActionInput(is_requestor=REQ, pdu=RQ), State.STA5,
               (SendPDU(pdu=RQ),), "Send A-ASSOCIATE-RQ-PDU"),
    ActionCase(Action.AE_3, ActionInput(is_requestor=REQ, pdu=AC), State.STA6,
               (Indication(kind=IndicationKind.ASSOCIATE_ACCEPT_CONFIRMATION, pdu=AC),),
               "Issue A-ASSOCIATE confirmation (accept) primitive"),
    ActionCase(Action.AE_4, ActionInput(is_requestor=REQ, pdu=RJ_USER), State.STA1,
               (Indication(kind=IndicationKind.ASSOCIATE_REJECT_CONFIRMATION, pdu=RJ_USER),
                CloseTransport()),
               "Issue A-ASSOCIATE confirmation (reject) primitive and close transport "
               "connection"),
    ActionCase(Action.AE_5, ActionInput(is_requestor=ACC), State.STA2,
               (Indication(kind=IndicationKind.TRANSPORT_CONNECTED), ArtimStart()),
               "Issue Transport connection response primitive; start ARTIM timer"),
    ActionCase(Action.AE_6, ActionInput(is_requestor=ACC, pdu=RQ), State.STA3,
               (ArtimStop(), Indication(kind=IndicationKind.ASSOCIATE_INDICATION, pdu=RQ)),
               "Stop ARTIM timer and if A-ASSOCIATE-RQ acceptable by service-provider: "
               "issue A-ASSOCIATE indication primitive; next state is Sta3"),
    ActionCase(Action.AE_6, ActionInput(is_requestor=ACC, pdu=RQ, provider_reject=RJ_PROVIDER),
               State.STA13,
               (ArtimStop(), SendPDU(pdu=RJ_PROVIDER), ArtimStart()),
               "otherwise: issue A-ASSOCIATE-RJ-PDU and start ARTIM timer; next state is "
               "Sta13"),
    ActionCase(Action.AE_7, ActionInput(is_requestor=ACC, pdu=AC), State.STA6,
               (SendPDU(pdu=AC),), "Send A-ASSOCIATE-AC PDU"),
    ActionCase(Action.AE_8, ActionInput(is_requestor=ACC, pdu=RJ_USER), State.STA13,
               (SendPDU(pdu=RJ_USER), ArtimStart()),
               "Send A-ASSOCIATE-RJ PDU and start ARTIM timer"),
    # --- Table 9-7, data transfer -----------------------------------------
    ActionCase(Action.DT_1, ActionInput(is_requestor=REQ, pdu=PDATA), State.STA6,
               (SendPDU(pdu=PDATA),), "Send P-DATA-TF PDU"),
    ActionCase(Action.DT_2, ActionInput(is_requestor=REQ, pdu=PDATA), State.STA6,
               (Indication(kind=IndicationKind.P_DATA_INDICATION, pdu=PDATA),),
               "Send P-DATA indication primitive"),
    # --- Table 9-8, association release -----------------------------------
    ActionCase(Action.AR_1, ActionInput(is_requestor=REQ, pdu=REL_RQ), State.STA7,
               (SendPDU(pdu=REL_RQ),), "Send A-RELEASE-RQ PDU"),
    ActionCase(Action.AR_2, ActionInput(is_requestor=ACC, pdu=REL_RQ), State.STA8,
               (Indication(kind=IndicationKind.RELEASE_INDICATION, pdu=REL_RQ),),
               "Issue A-RELEASE indication primitive"),
    ActionCase(Action.AR_3, ActionInput(is_requestor=REQ, pdu=REL_RP), State.STA1,
               (Indication(kind=IndicationKind.RELEASE_CONFIRMATION, pdu=REL_RP),
                CloseTransport()),
               "Issue A-RELEASE confirmation primitive, and close transport connection"),
    ActionCase(Action.AR_4, ActionInput(is_requestor=ACC, pdu=REL_RP), State.STA13,
               (SendPDU(pdu=REL_RP), ArtimStart()),
               "Issue A-RELEASE-RP PDU and start ARTIM timer"),
    ActionCase(Action.AR_5, ActionInput(is_requestor=ACC), State.STA1,
               (ArtimStop(),), "Stop ARTIM timer"),
    ActionCase(Action.AR_6, ActionInput(is_requestor=REQ, pdu=PDATA), State.STA7,
               (Indication(kind=IndicationKind.P_DATA_INDICATION, pdu=PDATA),),
               "Issue P-DATA indication"),
    ActionCase(Action.AR_7, ActionInput(is_requestor=ACC, pdu=PDATA), State.STA8,
               (SendPDU(pdu=PDATA),), "Issue P-DATA-TF PDU"),
    ActionCase(Action.AR_8, ActionInput(is_requestor=REQ, pdu=REL_RQ), State.STA9,
               (Indication(kind=IndicationKind.RELEASE_COLLISION_INDICATION, pdu=REL_RQ),),
               "Issue A-RELEASE indication (release collision): if association-requestor, "
               "next state is Sta9"),
    ActionCase(Action.AR_8, ActionInput(is_requestor=ACC, pdu=REL_RQ), State.STA10,
               (Indication(kind=IndicationKind.RELEASE_COLLISION_INDICATION, pdu=REL_RQ),),
               "... if not, next state is Sta10"),
    ActionCase(Action.AR_9, ActionInput(is_requestor=REQ, pdu=REL_RP), State.STA11,
               (SendPDU(pdu=REL_RP),), "Send A-RELEASE-RP PDU"),
    ActionCase(Action.AR_10, ActionInput(is_requestor=ACC, pdu=REL_RP), State.STA12,
               (Indication(kind=IndicationKind.RELEASE_CONFIRMATION, pdu=REL_RP),),
               "Issue A-RELEASE confirmation primitive"),
    # --- Table 9-9, association abort -------------------------------------
    ActionCase(Action.AA_1, ActionInput(is_requestor=REQ, abort=ABORT_USER), State.STA13,
               (SendPDU(pdu=ABORT_USER), ArtimStart()),
               "Send A-ABORT PDU (service-user source) and start (or restart if already "
               "started) ARTIM timer"),
    ActionCase(Action.AA_2, ActionInput(is_requestor=ACC), State.STA1,
               (ArtimStop(), CloseTransport()),
               "Stop ARTIM timer if running. Close transport connection"),
    ActionCase(Action.AA_3, ActionInput(is_requestor=REQ, pdu=ABORT_USER), State.STA1,
               (Indication(kind=IndicationKind.ABORT_INDICATION, pdu=ABORT_USER),
                CloseTransport()),
               "If (service-user initiated abort): issue A-ABORT indication and close "
               "transport connection"),
    ActionCase(Action.AA_3, ActionInput(is_requestor=REQ, pdu=ABORT_PROVIDER), State.STA1,
               (Indication(kind=IndicationKind.P_ABORT_INDICATION, pdu=ABORT_PROVIDER),
                CloseTransport()),
               "otherwise (service-provider initiated abort): issue A-P-ABORT indication "
               "and close transport connection"),
    ActionCase(Action.AA_4, ActionInput(is_requestor=REQ), State.STA1,
               (Indication(kind=IndicationKind.P_ABORT_INDICATION),),
               "Issue A-P-ABORT indication primitive"),
    ActionCase(Action.AA_5, ActionInput(is_requestor=ACC), State.STA1,
               (ArtimStop(),), "Stop ARTIM timer"),
    ActionCase(Action.AA_6, ActionInput(is_requestor=ACC, pdu=PDATA), State.STA13,
               (), "Ignore PDU"),
    ActionCase(Action.AA_7, ActionInput(is_requestor=ACC, pdu=RQ, abort=ABORT_PROVIDER),
               State.STA13, (SendPDU(pdu=ABORT_PROVIDER),), "Send A-ABORT PDU"),
    ActionCase(Action.AA_8, ActionInput(is_requestor=REQ, pdu=PDATA, abort=ABORT_PROVIDER),
               State.STA13,
               (SendPDU(pdu=ABORT_PROVIDER),
                Indication(kind=IndicationKind.P_ABORT_INDICATION, pdu=ABORT_PROVIDER),
                ArtimStart()),
               "Send A-ABORT PDU (service-provider source), issue an A-P-ABORT "
               "indication, and start ARTIM timer"),
]


@pytest.mark.parametrize("case", ACTION_CASES, ids=[c.id for c in ACTION_CASES])
def test_action(case: ActionCase) -> None:
    next_state, outputs = _run(case.action, case.inp)
    assert next_state is case.next_state, case.rule
    assert next_state in NEXT_STATES[case.action]
    assert outputs == case.outputs, case.rule


def test_every_action_has_a_case() -> None:
    assert {c.action for c in ACTION_CASES} == set(Action)


def test_aa1_defaults_to_a_service_user_abort() -> None:
    # Table 9-9 AA-1: "Send A-ABORT PDU (service-user source)".
    _, outputs = _run(Action.AA_1, ActionInput(is_requestor=True))
    sent = [o.pdu for o in outputs if isinstance(o, SendPDU)]
    assert len(sent) == 1 and isinstance(sent[0], AAbort)
    assert sent[0].source == AbortSource.SERVICE_USER
    assert ArtimStart() in outputs


def test_aa8_defaults_to_a_provider_abort_and_a_p_abort() -> None:
    # Table 9-9 AA-8: "Send A-ABORT PDU (service-provider source), issue an
    # A-P-ABORT indication, and start ARTIM timer".
    next_state, outputs = _run(Action.AA_8, ActionInput(is_requestor=False, pdu=PDATA))
    assert next_state is State.STA13
    sent = [o.pdu for o in outputs if isinstance(o, SendPDU)]
    assert len(sent) == 1 and isinstance(sent[0], AAbort)
    assert sent[0].source == AbortSource.SERVICE_PROVIDER
    kinds = [o.kind for o in outputs if isinstance(o, Indication)]
    assert kinds == [IndicationKind.P_ABORT_INDICATION]
    assert outputs[-1] == ArtimStart()
    assert CloseTransport() not in outputs  # the peer closes; ARTIM guards it


def test_aa7_sends_an_abort_and_nothing_else() -> None:
    # Table 9-9 AA-7: "Send A-ABORT PDU", next state Sta13 (ARTIM already runs).
    next_state, outputs = _run(Action.AA_7, ActionInput(is_requestor=False, pdu=RQ))
    assert next_state is State.STA13
    assert len(outputs) == 1 and isinstance(outputs[0], SendPDU)
    assert isinstance(outputs[0].pdu, AAbort)


@pytest.mark.parametrize(
    ("abort", "kind"),
    [
        (AAbort(source=0, reason=0), IndicationKind.ABORT_INDICATION),  # service-user
        (AAbort(source=2, reason=0), IndicationKind.P_ABORT_INDICATION),  # service-provider
        (AAbort(source=2, reason=1), IndicationKind.P_ABORT_INDICATION),
        (AAbort(source=2, reason=6), IndicationKind.P_ABORT_INDICATION),
    ],
)
def test_aa3_tells_user_from_provider_abort_by_source(abort: AAbort, kind: IndicationKind) -> None:
    # Table 9-9 AA-3, source field of Table 9-26.
    next_state, outputs = _run(Action.AA_3, ActionInput(is_requestor=True, pdu=abort))
    assert next_state is State.STA1
    assert outputs == (Indication(kind=kind, pdu=abort), CloseTransport())


@pytest.mark.parametrize("action", [Action.AE_2, Action.AE_7, Action.AE_8, Action.DT_1,
                                    Action.AR_1, Action.AR_4, Action.AR_7, Action.AR_9])
def test_sending_actions_need_the_pdu(action: Action) -> None:
    with pytest.raises(LocalProtocolError):
        _run(action, ActionInput(is_requestor=True))


# ---------------------------------------------------------------------------
# Standard sequences end to end (PS3.8 §7.1.2, §7.2.2 / Figure 7-1, §9.1.5)
# ---------------------------------------------------------------------------


@dataclass
class Machine:
    """One side's state machine plus what its outputs did to the world."""

    is_requestor: bool
    state: State = State.STA1
    artim: bool = False
    transport_open: bool = False
    trace: list[tuple[State, Event, Action, State]] = field(default_factory=list)
    sent: list[PDU] = field(default_factory=list)
    indications: list[IndicationKind] = field(default_factory=list)

    def feed(self, event: Event, pdu: PDU | None = None,
             provider_reject: AAssociateRJ | None = None) -> Action:
        inp = ActionInput(is_requestor=self.is_requestor, pdu=pdu,
                          provider_reject=provider_reject)
        before = self.state
        action, self.state, outputs = fsm.step(before, event, inp)
        self.trace.append((before, event, action, self.state))
        self._apply(outputs)
        if event in (Event.EVT2, Event.EVT5):
            self.transport_open = True
        if event is Event.EVT17:
            self.transport_open = False
        return action

    def _apply(self, outputs: Iterable[Output]) -> None:
        for out in outputs:
            if isinstance(out, SendPDU):
                self.sent.append(out.pdu)
            elif isinstance(out, Indication):
                self.indications.append(out.kind)
            elif isinstance(out, ArtimStart):
                self.artim = True
            elif isinstance(out, ArtimStop):
                self.artim = False
            elif isinstance(out, CloseTransport):
                self.transport_open = False

    def path(self) -> list[tuple[str, str, str]]:
        return [(s.name, e.name, a.name) for s, e, a, _ in self.trace]

    def states(self) -> list[State]:
        return [self.trace[0][0], *(t[3] for t in self.trace)]


def _established(is_requestor: bool) -> Machine:
    m = Machine(is_requestor=is_requestor)
    if is_requestor:
        m.feed(Event.EVT1, RQ)
        m.feed(Event.EVT2, RQ)
        m.feed(Event.EVT3, AC)
    else:
        m.feed(Event.EVT5)
        m.feed(Event.EVT6, RQ)
        m.feed(Event.EVT7, AC)
    assert m.state is State.STA6
    return m


def test_requestor_association_and_release() -> None:
    m = Machine(is_requestor=True)
    assert m.feed(Event.EVT1, RQ) is Action.AE_1
    assert m.feed(Event.EVT2, RQ) is Action.AE_2
    assert m.feed(Event.EVT3, AC) is Action.AE_3
    assert m.feed(Event.EVT9, PDATA) is Action.DT_1
    assert m.feed(Event.EVT10, PDATA) is Action.DT_2
    assert m.feed(Event.EVT11, REL_RQ) is Action.AR_1
    assert m.feed(Event.EVT10, PDATA) is Action.AR_6  # data may still arrive in Sta7
    assert m.feed(Event.EVT13, REL_RP) is Action.AR_3
    assert m.states() == [State.STA1, State.STA4, State.STA5, State.STA6, State.STA6,
                          State.STA6, State.STA7, State.STA7, State.STA1]
    assert m.sent == [RQ, PDATA, REL_RQ]
    assert m.indications == [IndicationKind.ASSOCIATE_ACCEPT_CONFIRMATION,
                             IndicationKind.P_DATA_INDICATION,
                             IndicationKind.P_DATA_INDICATION,
                             IndicationKind.RELEASE_CONFIRMATION]
    assert not m.transport_open and not m.artim


def test_acceptor_association_and_release() -> None:
    m = Machine(is_requestor=False)
    assert m.feed(Event.EVT5) is Action.AE_5
    assert m.artim  # §9.1.2: ARTIM runs until the A-ASSOCIATE-RQ arrives
    assert m.feed(Event.EVT6, RQ) is Action.AE_6
    assert not m.artim
    assert m.feed(Event.EVT7, AC) is Action.AE_7
    assert m.feed(Event.EVT10, PDATA) is Action.DT_2
    assert m.feed(Event.EVT9, PDATA) is Action.DT_1
    assert m.feed(Event.EVT12, REL_RQ) is Action.AR_2
    assert m.feed(Event.EVT9, PDATA) is Action.AR_7  # data may still be sent in Sta8
    assert m.feed(Event.EVT14, REL_RP) is Action.AR_4
    assert m.artim  # waits for the requestor to close
    assert m.feed(Event.EVT17) is Action.AR_5
    assert m.states() == [State.STA1, State.STA2, State.STA3, State.STA6, State.STA6,
                          State.STA6, State.STA8, State.STA8, State.STA13, State.STA1]
    assert m.sent == [AC, PDATA, PDATA, REL_RP]
    assert m.indications == [IndicationKind.TRANSPORT_CONNECTED,
                             IndicationKind.ASSOCIATE_INDICATION,
                             IndicationKind.P_DATA_INDICATION,
                             IndicationKind.RELEASE_INDICATION]
    assert not m.artim and not m.transport_open


def test_requestor_rejected() -> None:
    m = Machine(is_requestor=True)
    m.feed(Event.EVT1, RQ)
    m.feed(Event.EVT2, RQ)
    assert m.feed(Event.EVT4, RJ_USER) is Action.AE_4
    assert m.state is State.STA1 and not m.transport_open
    assert m.indications == [IndicationKind.ASSOCIATE_REJECT_CONFIRMATION]


def test_release_collision_requestor() -> None:
    # §7.2.2 / Figure 7-1: both users request release at once. Requestor side:
    # Sta6 -> Sta7 -> Sta9 -> Sta11 -> Sta1.
    m = _established(is_requestor=True)
    assert m.feed(Event.EVT11, REL_RQ) is Action.AR_1
    assert m.feed(Event.EVT12, REL_RQ) is Action.AR_8
    assert m.indications[-1] is IndicationKind.RELEASE_COLLISION_INDICATION
    assert m.feed(Event.EVT14, REL_RP) is Action.AR_9
    assert m.feed(Event.EVT13, REL_RP) is Action.AR_3
    assert m.states()[3:] == [State.STA6, State.STA7, State.STA9, State.STA11, State.STA1]
    assert m.sent[-2:] == [REL_RQ, REL_RP]
    assert m.indications[-1] is IndicationKind.RELEASE_CONFIRMATION
    assert not m.transport_open


def test_release_collision_acceptor() -> None:
    # Acceptor side: Sta6 -> Sta7 -> Sta10 -> Sta12 -> Sta13 -> Sta1.
    m = _established(is_requestor=False)
    assert m.feed(Event.EVT11, REL_RQ) is Action.AR_1
    assert m.feed(Event.EVT12, REL_RQ) is Action.AR_8
    assert m.indications[-1] is IndicationKind.RELEASE_COLLISION_INDICATION
    assert m.feed(Event.EVT13, REL_RP) is Action.AR_10
    assert m.indications[-1] is IndicationKind.RELEASE_CONFIRMATION
    assert m.feed(Event.EVT14, REL_RP) is Action.AR_4
    assert m.artim
    assert m.feed(Event.EVT17) is Action.AR_5
    assert m.states()[3:] == [State.STA6, State.STA7, State.STA10, State.STA12, State.STA13,
                              State.STA1]
    assert m.sent[-2:] == [REL_RQ, REL_RP]
    assert not m.artim


_RECEIVED_AS: dict[type, Event] = {
    AAssociateRQ: Event.EVT6,
    AAssociateAC: Event.EVT3,
    AAssociateRJ: Event.EVT4,
    PDataTF: Event.EVT10,
    AReleaseRQ: Event.EVT12,
    AReleaseRP: Event.EVT13,
    AAbort: Event.EVT16,
}


def _deliver(src: Machine, dst: Machine, start: int) -> int:
    """Hand ``src``'s PDUs sent since ``start`` to ``dst``; returns the new mark."""
    for pdu in src.sent[start:]:
        dst.feed(_RECEIVED_AS[type(pdu)], pdu)
    return len(src.sent)


def test_release_collision_between_two_machines() -> None:
    # Both sides joined by an in-memory wire: the PDUs one sends are the events
    # the other receives, so the two halves of Figure 7-1 must fit together.
    req, acc = Machine(is_requestor=True), Machine(is_requestor=False)
    req.feed(Event.EVT1, RQ)
    acc.feed(Event.EVT5)
    req.feed(Event.EVT2, RQ)
    r = _deliver(req, acc, 0)
    assert acc.state is State.STA3
    acc.feed(Event.EVT7, AC)
    a = _deliver(acc, req, 0)
    assert (req.state, acc.state) == (State.STA6, State.STA6)

    req.feed(Event.EVT11, REL_RQ)
    acc.feed(Event.EVT11, REL_RQ)  # the two A-RELEASE-RQs cross on the wire
    r = _deliver(req, acc, r)
    a = _deliver(acc, req, a)
    assert (req.state, acc.state) == (State.STA9, State.STA10)
    req.feed(Event.EVT14, REL_RP)  # the requestor's user answers first (§7.2.2)
    r = _deliver(req, acc, r)
    assert (req.state, acc.state) == (State.STA11, State.STA12)
    acc.feed(Event.EVT14, REL_RP)
    a = _deliver(acc, req, a)
    assert req.state is State.STA1 and not req.transport_open  # AR-3 closes
    acc.feed(Event.EVT17)  # which the acceptor sees as the transport closing
    assert acc.state is State.STA1 and not acc.artim


def test_artim_expiry_in_sta2() -> None:
    # §9.1.2: no A-ASSOCIATE-RQ before ARTIM expires -> close the connection.
    m = Machine(is_requestor=False)
    m.feed(Event.EVT5)
    assert m.state is State.STA2 and m.artim
    assert m.feed(Event.EVT18) is Action.AA_2
    assert m.state is State.STA1 and not m.artim and not m.transport_open


@pytest.mark.parametrize("how", ["user-reject", "provider-reject", "release", "abort"])
def test_artim_expiry_in_sta13(how: str) -> None:
    # §9.1.4 (d): the peer never closes after reject/release/abort; ARTIM does.
    m = Machine(is_requestor=False)
    m.feed(Event.EVT5)
    if how == "provider-reject":
        assert m.feed(Event.EVT6, RQ, provider_reject=RJ_PROVIDER) is Action.AE_6
        assert m.sent == [RJ_PROVIDER]
        assert IndicationKind.ASSOCIATE_INDICATION not in m.indications  # §7.1.2.6
    else:
        m.feed(Event.EVT6, RQ)
        if how == "user-reject":
            assert m.feed(Event.EVT8, RJ_USER) is Action.AE_8
        else:
            m.feed(Event.EVT7, AC)
            if how == "release":
                m.feed(Event.EVT12, REL_RQ)
                assert m.feed(Event.EVT14, REL_RP) is Action.AR_4
            else:
                assert m.feed(Event.EVT15, ABORT_USER) is Action.AA_1
    assert m.state is State.STA13 and m.artim
    # Stray PDUs meanwhile are ignored (AA-6) or answered with an abort (AA-7).
    assert m.feed(Event.EVT10, PDATA) is Action.AA_6
    assert m.state is State.STA13
    assert m.feed(Event.EVT18) is Action.AA_2
    assert m.state is State.STA1 and not m.artim and not m.transport_open


def test_abort_from_peer_in_every_associated_state() -> None:
    established: Sequence[State] = (State.STA3, State.STA5, State.STA6, State.STA7, State.STA8,
                                    State.STA9, State.STA10, State.STA11, State.STA12)
    for state in established:
        action, nxt, outputs = fsm.step(state, Event.EVT16,
                                        ActionInput(is_requestor=True, pdu=ABORT_USER))
        assert (action, nxt) == (Action.AA_3, State.STA1)
        assert CloseTransport() in outputs
