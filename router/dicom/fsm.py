"""The DICOM upper-layer state machine, PS3.8 §9.2, as data.

Theory of operation
-------------------
PS3.8 Table 9-10 maps (state, event) to an action; Tables 9-6 to 9-9 say what
each action does and which state follows. Both are reproduced here literally
so they can be checked line by line against the standard:

- :class:`State` is Sta1..Sta13 (Table 9-1), :class:`Event` is Evt1..Evt19
  (Table 9-2) and :class:`Action` is AE-1..8, DT-1..2, AR-1..10, AA-1..8.
- ``TRANSITIONS[(state, event)] -> Action`` is Table 9-10. A pair that is not
  in the map is a blank cell: for a local primitive (Evt1, 2, 5, 7, 8, 9, 11,
  14, 15) that is the local user's mistake (``LocalProtocolError``); received
  PDUs, transport indications and the ARTIM timer are defined in every state
  where they can occur.
- each action is a pure function ``(ActionInput) -> (next State, outputs)``.
  The outputs (send this PDU, issue that indication, start/stop ARTIM, open or
  close the transport) are plain values; :mod:`router.dicom.association`
  carries them out. No I/O, no clocks, nothing shared.

The PDUs an action sends are supplied by whoever raised the event (the local
user's primitive, or the engine for provider-generated aborts/rejects), so the
table itself never builds protocol content.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from router.dicom.errors import AbortReason, AbortSource, LocalProtocolError
from router.dicom.pdu import PDU, AAbort, AAssociateRJ

__all__ = [
    "ACTIONS",
    "TRANSITIONS",
    "Action",
    "ActionInput",
    "ArtimStart",
    "ArtimStop",
    "CloseTransport",
    "ConnectTransport",
    "Event",
    "Indication",
    "IndicationKind",
    "Output",
    "SendPDU",
    "State",
    "step",
]


class State(enum.Enum):
    """PS3.8 Table 9-1."""

    # Members are singletons: identity hashing is exact and, unlike Enum's
    # Python-level __hash__, costs nothing on the per-PDU table look-up.
    __hash__ = object.__hash__

    STA1 = "Idle"
    STA2 = "Transport connection open (awaiting A-ASSOCIATE-RQ PDU)"
    STA3 = "Awaiting local A-ASSOCIATE response primitive"
    STA4 = "Awaiting transport connection opening to complete"
    STA5 = "Awaiting A-ASSOCIATE-AC or A-ASSOCIATE-RJ PDU"
    STA6 = "Association established and ready for data transfer"
    STA7 = "Awaiting A-RELEASE-RP PDU"
    STA8 = "Awaiting local A-RELEASE response primitive"
    STA9 = "Release collision requestor side; awaiting A-RELEASE response primitive"
    STA10 = "Release collision acceptor side; awaiting A-RELEASE-RP PDU"
    STA11 = "Release collision requestor side; awaiting A-RELEASE-RP PDU"
    STA12 = "Release collision acceptor side; awaiting A-RELEASE response primitive"
    STA13 = "Awaiting Transport Connection Close Indication"


class Event(enum.Enum):
    """PS3.8 Table 9-2."""

    # Members are singletons: identity hashing is exact and, unlike Enum's
    # Python-level __hash__, costs nothing on the per-PDU table look-up.
    __hash__ = object.__hash__

    EVT1 = "A-ASSOCIATE request (local user)"
    EVT2 = "Transport connect confirmation (local transport service)"
    EVT3 = "A-ASSOCIATE-AC PDU (received on transport connection)"
    EVT4 = "A-ASSOCIATE-RJ PDU (received on transport connection)"
    EVT5 = "Transport connection indication (local transport service)"
    EVT6 = "A-ASSOCIATE-RQ PDU (received on transport connection)"
    EVT7 = "A-ASSOCIATE response primitive (accept)"
    EVT8 = "A-ASSOCIATE response primitive (reject)"
    EVT9 = "P-DATA request primitive"
    EVT10 = "P-DATA-TF PDU"
    EVT11 = "A-RELEASE request primitive"
    EVT12 = "A-RELEASE-RQ PDU (received on open transport connection)"
    EVT13 = "A-RELEASE-RP PDU (received on transport connection)"
    EVT14 = "A-RELEASE response primitive"
    EVT15 = "A-ABORT request primitive"
    EVT16 = "A-ABORT PDU (received on open transport connection)"
    EVT17 = "Transport connection closed indication (local transport service)"
    EVT18 = "ARTIM timer expired (Association reject/release timer)"
    EVT19 = "Unrecognized or invalid PDU received"


# Events raised by the local user or local transport service: a blank cell for
# one of these is a local error, never a reason to abort the peer.
LOCAL_EVENTS = frozenset(
    {
        Event.EVT1,
        Event.EVT2,
        Event.EVT5,
        Event.EVT7,
        Event.EVT8,
        Event.EVT9,
        Event.EVT11,
        Event.EVT14,
        Event.EVT15,
    }
)


class Action(enum.Enum):
    """PS3.8 Tables 9-6 (AE), 9-7 (DT), 9-8 (AR) and 9-9 (AA)."""

    # Members are singletons: identity hashing is exact and, unlike Enum's
    # Python-level __hash__, costs nothing on the per-PDU table look-up.
    __hash__ = object.__hash__

    AE_1 = "Issue TRANSPORT CONNECT request primitive to local transport service"
    AE_2 = "Send A-ASSOCIATE-RQ-PDU"
    AE_3 = "Issue A-ASSOCIATE confirmation (accept) primitive"
    AE_4 = "Issue A-ASSOCIATE confirmation (reject) primitive and close transport connection"
    AE_5 = "Issue Transport connection response primitive; start ARTIM timer"
    AE_6 = (
        "Stop ARTIM timer and if A-ASSOCIATE-RQ acceptable by service-provider: issue "
        "A-ASSOCIATE indication primitive; otherwise issue A-ASSOCIATE-RJ-PDU and start "
        "ARTIM timer"
    )
    AE_7 = "Send A-ASSOCIATE-AC PDU"
    AE_8 = "Send A-ASSOCIATE-RJ PDU and start ARTIM timer"
    DT_1 = "Send P-DATA-TF PDU"
    DT_2 = "Send P-DATA indication primitive"
    AR_1 = "Send A-RELEASE-RQ PDU"
    AR_2 = "Issue A-RELEASE indication primitive"
    AR_3 = "Issue A-RELEASE confirmation primitive, and close transport connection"
    AR_4 = "Issue A-RELEASE-RP PDU and start ARTIM timer"
    AR_5 = "Stop ARTIM timer"
    AR_6 = "Issue P-DATA indication"
    AR_7 = "Issue P-DATA-TF PDU"
    AR_8 = "Issue A-RELEASE indication (release collision)"
    AR_9 = "Send A-RELEASE-RP PDU"
    AR_10 = "Issue A-RELEASE confirmation primitive"
    AA_1 = (
        "Send A-ABORT PDU (service-user source) and start (or restart if already "
        "started) ARTIM timer"
    )
    AA_2 = "Stop ARTIM timer if running. Close transport connection"
    AA_3 = (
        "If (service-user initiated abort): issue A-ABORT indication and close transport "
        "connection; otherwise (service-provider initiated abort): issue A-P-ABORT "
        "indication and close transport connection"
    )
    AA_4 = "Issue A-P-ABORT indication primitive"
    AA_5 = "Stop ARTIM timer"
    AA_6 = "Ignore PDU"
    AA_7 = "Send A-ABORT PDU"
    AA_8 = (
        "Send A-ABORT PDU (service-provider source), issue an A-P-ABORT indication, and "
        "start ARTIM timer"
    )


# ---------------------------------------------------------------------------
# Table 9-10: (state, event) -> action
# ---------------------------------------------------------------------------

S, E, A = State, Event, Action
_ASSOCIATED = (S.STA6, S.STA7, S.STA8, S.STA9, S.STA10, S.STA11, S.STA12)


def _row(event: Event, cells: dict[State, Action]) -> dict[tuple[State, Event], Action]:
    return {(state, event): action for state, action in cells.items()}


def _many(states: tuple[State, ...], action: Action) -> dict[State, Action]:
    return dict.fromkeys(states, action)


TRANSITIONS: dict[tuple[State, Event], Action] = {
    **_row(E.EVT1, {S.STA1: A.AE_1}),
    **_row(E.EVT2, {S.STA4: A.AE_2}),
    **_row(
        E.EVT3,
        {S.STA2: A.AA_1, S.STA3: A.AA_8, S.STA5: A.AE_3, **_many(_ASSOCIATED, A.AA_8),
         S.STA13: A.AA_6},
    ),
    **_row(
        E.EVT4,
        {S.STA2: A.AA_1, S.STA3: A.AA_8, S.STA5: A.AE_4, **_many(_ASSOCIATED, A.AA_8),
         S.STA13: A.AA_6},
    ),
    **_row(E.EVT5, {S.STA1: A.AE_5}),
    **_row(
        E.EVT6,
        {S.STA2: A.AE_6, S.STA3: A.AA_8, S.STA5: A.AA_8, **_many(_ASSOCIATED, A.AA_8),
         S.STA13: A.AA_7},
    ),
    **_row(E.EVT7, {S.STA3: A.AE_7}),
    **_row(E.EVT8, {S.STA3: A.AE_8}),
    **_row(E.EVT9, {S.STA6: A.DT_1, S.STA8: A.AR_7}),
    **_row(
        E.EVT10,
        {S.STA2: A.AA_1, S.STA3: A.AA_8, S.STA5: A.AA_8, S.STA6: A.DT_2, S.STA7: A.AR_6,
         **_many((S.STA8, S.STA9, S.STA10, S.STA11, S.STA12), A.AA_8), S.STA13: A.AA_6},
    ),
    **_row(E.EVT11, {S.STA6: A.AR_1}),
    **_row(
        E.EVT12,
        {S.STA2: A.AA_1, S.STA3: A.AA_8, S.STA5: A.AA_8, S.STA6: A.AR_2, S.STA7: A.AR_8,
         **_many((S.STA8, S.STA9, S.STA10, S.STA11, S.STA12), A.AA_8), S.STA13: A.AA_6},
    ),
    **_row(
        E.EVT13,
        {S.STA2: A.AA_1, S.STA3: A.AA_8, S.STA5: A.AA_8, S.STA6: A.AA_8, S.STA7: A.AR_3,
         S.STA8: A.AA_8, S.STA9: A.AA_8, S.STA10: A.AR_10, S.STA11: A.AR_3,
         S.STA12: A.AA_8, S.STA13: A.AA_6},
    ),
    **_row(E.EVT14, {S.STA8: A.AR_4, S.STA9: A.AR_9, S.STA12: A.AR_4}),
    **_row(E.EVT15, {S.STA3: A.AA_1, S.STA4: A.AA_2, S.STA5: A.AA_1,
                     **_many(_ASSOCIATED, A.AA_1)}),
    **_row(
        E.EVT16,
        {S.STA2: A.AA_2, S.STA3: A.AA_3, S.STA5: A.AA_3, **_many(_ASSOCIATED, A.AA_3),
         S.STA13: A.AA_2},
    ),
    **_row(
        E.EVT17,
        {S.STA2: A.AA_5, S.STA3: A.AA_4, S.STA4: A.AA_4, S.STA5: A.AA_4,
         **_many(_ASSOCIATED, A.AA_4), S.STA13: A.AR_5},
    ),
    **_row(E.EVT18, {S.STA2: A.AA_2, S.STA13: A.AA_2}),
    **_row(
        E.EVT19,
        {S.STA2: A.AA_1, S.STA3: A.AA_8, S.STA5: A.AA_8, **_many(_ASSOCIATED, A.AA_8),
         S.STA13: A.AA_7},
    ),
}

del S, E, A


# ---------------------------------------------------------------------------
# Outputs of actions
# ---------------------------------------------------------------------------


class IndicationKind(enum.Enum):
    """The service primitives an action issues to the local user (PS3.8 §7)."""

    ASSOCIATE_INDICATION = "A-ASSOCIATE indication"
    ASSOCIATE_ACCEPT_CONFIRMATION = "A-ASSOCIATE confirmation (accept)"
    ASSOCIATE_REJECT_CONFIRMATION = "A-ASSOCIATE confirmation (reject)"
    P_DATA_INDICATION = "P-DATA indication"
    RELEASE_INDICATION = "A-RELEASE indication"
    RELEASE_COLLISION_INDICATION = "A-RELEASE indication (release collision)"
    RELEASE_CONFIRMATION = "A-RELEASE confirmation"
    ABORT_INDICATION = "A-ABORT indication"
    P_ABORT_INDICATION = "A-P-ABORT indication"
    TRANSPORT_CONNECTED = "Transport connection indication/response"


@dataclass(frozen=True, slots=True, kw_only=True)
class SendPDU:
    pdu: PDU


@dataclass(frozen=True, slots=True, kw_only=True)
class Indication:
    kind: IndicationKind
    pdu: PDU | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ArtimStart:
    """Start, or restart if already started, the ARTIM timer."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ArtimStop:
    """Stop the ARTIM timer if it is running."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectTransport:
    """Ask the local transport service to open the TCP connection."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseTransport:
    """Ask the local transport service to close the TCP connection."""


Output = SendPDU | Indication | ArtimStart | ArtimStop | ConnectTransport | CloseTransport


@dataclass(frozen=True, slots=True, kw_only=True)
class ActionInput:
    """What an action needs to know; built by the engine for each event.

    ``pdu``: the PDU received (Evt3, 4, 6, 10, 12, 13, 16) or the PDU the local
    user wants sent (Evt1 carries the A-ASSOCIATE-RQ, Evt7 the AC, Evt8 the
    RJ, Evt9 the P-DATA-TF).
    ``provider_reject``: for Evt6, the A-ASSOCIATE-RJ to send when the
    service provider cannot accept the request (AE-6); ``None`` if acceptable.
    ``abort``: the A-ABORT PDU to send for AA-1, AA-7 and AA-8; the engine
    fills in the source and reason (AA-1: service user; AA-7/AA-8: service
    provider with the reason of the error that raised Evt19 or "unexpected PDU").
    """

    is_requestor: bool
    pdu: PDU | None = None
    provider_reject: AAssociateRJ | None = None
    abort: AAbort | None = None


ActionFunction = Callable[[ActionInput], tuple[State, tuple[Output, ...]]]


def _pdu(inp: ActionInput) -> PDU:
    if inp.pdu is None:
        raise LocalProtocolError("this action needs a PDU and none was given")
    return inp.pdu


def _abort(inp: ActionInput, default_source: AbortSource) -> AAbort:
    if inp.abort is not None:
        return inp.abort
    reason = (
        AbortReason.NOT_SPECIFIED
        if default_source is AbortSource.SERVICE_USER
        else AbortReason.UNEXPECTED_PDU
    )
    return AAbort(source=int(default_source), reason=int(reason))


def _ae_1(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA4, (ConnectTransport(),)


def _ae_2(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA5, (SendPDU(pdu=_pdu(inp)),)


def _ae_3(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA6, (
        Indication(kind=IndicationKind.ASSOCIATE_ACCEPT_CONFIRMATION, pdu=inp.pdu),
    )


def _ae_4(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA1, (
        Indication(kind=IndicationKind.ASSOCIATE_REJECT_CONFIRMATION, pdu=inp.pdu),
        CloseTransport(),
    )


def _ae_5(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA2, (Indication(kind=IndicationKind.TRANSPORT_CONNECTED), ArtimStart())


def _ae_6(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    if inp.provider_reject is None:
        return State.STA3, (
            ArtimStop(),
            Indication(kind=IndicationKind.ASSOCIATE_INDICATION, pdu=inp.pdu),
        )
    return State.STA13, (ArtimStop(), SendPDU(pdu=inp.provider_reject), ArtimStart())


def _ae_7(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA6, (SendPDU(pdu=_pdu(inp)),)


def _ae_8(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA13, (SendPDU(pdu=_pdu(inp)), ArtimStart())


def _dt_1(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA6, (SendPDU(pdu=_pdu(inp)),)


def _dt_2(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA6, (Indication(kind=IndicationKind.P_DATA_INDICATION, pdu=inp.pdu),)


def _ar_1(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA7, (SendPDU(pdu=_pdu(inp)),)


def _ar_2(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA8, (Indication(kind=IndicationKind.RELEASE_INDICATION, pdu=inp.pdu),)


def _ar_3(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA1, (
        Indication(kind=IndicationKind.RELEASE_CONFIRMATION, pdu=inp.pdu),
        CloseTransport(),
    )


def _ar_4(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA13, (SendPDU(pdu=_pdu(inp)), ArtimStart())


def _ar_5(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA1, (ArtimStop(),)


def _ar_6(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA7, (Indication(kind=IndicationKind.P_DATA_INDICATION, pdu=inp.pdu),)


def _ar_7(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA8, (SendPDU(pdu=_pdu(inp)),)


def _ar_8(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    nxt = State.STA9 if inp.is_requestor else State.STA10
    return nxt, (Indication(kind=IndicationKind.RELEASE_COLLISION_INDICATION, pdu=inp.pdu),)


def _ar_9(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA11, (SendPDU(pdu=_pdu(inp)),)


def _ar_10(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA12, (Indication(kind=IndicationKind.RELEASE_CONFIRMATION, pdu=inp.pdu),)


def _aa_1(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA13, (SendPDU(pdu=_abort(inp, AbortSource.SERVICE_USER)), ArtimStart())


def _aa_2(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA1, (ArtimStop(), CloseTransport())


def _aa_3(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    # The A-ABORT PDU's source tells a user-initiated abort from a provider one.
    received = inp.pdu
    user = isinstance(received, AAbort) and received.source == AbortSource.SERVICE_USER
    kind = IndicationKind.ABORT_INDICATION if user else IndicationKind.P_ABORT_INDICATION
    return State.STA1, (Indication(kind=kind, pdu=received), CloseTransport())


def _aa_4(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA1, (Indication(kind=IndicationKind.P_ABORT_INDICATION, pdu=inp.pdu),)


def _aa_5(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA1, (ArtimStop(),)


def _aa_6(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA13, ()


def _aa_7(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    return State.STA13, (SendPDU(pdu=_abort(inp, AbortSource.SERVICE_PROVIDER)),)


def _aa_8(inp: ActionInput) -> tuple[State, tuple[Output, ...]]:
    abort = _abort(inp, AbortSource.SERVICE_PROVIDER)
    return State.STA13, (
        SendPDU(pdu=abort),
        Indication(kind=IndicationKind.P_ABORT_INDICATION, pdu=abort),
        ArtimStart(),
    )


ACTIONS: dict[Action, ActionFunction] = {
    Action.AE_1: _ae_1,
    Action.AE_2: _ae_2,
    Action.AE_3: _ae_3,
    Action.AE_4: _ae_4,
    Action.AE_5: _ae_5,
    Action.AE_6: _ae_6,
    Action.AE_7: _ae_7,
    Action.AE_8: _ae_8,
    Action.DT_1: _dt_1,
    Action.DT_2: _dt_2,
    Action.AR_1: _ar_1,
    Action.AR_2: _ar_2,
    Action.AR_3: _ar_3,
    Action.AR_4: _ar_4,
    Action.AR_5: _ar_5,
    Action.AR_6: _ar_6,
    Action.AR_7: _ar_7,
    Action.AR_8: _ar_8,
    Action.AR_9: _ar_9,
    Action.AR_10: _ar_10,
    Action.AA_1: _aa_1,
    Action.AA_2: _aa_2,
    Action.AA_3: _aa_3,
    Action.AA_4: _aa_4,
    Action.AA_5: _aa_5,
    Action.AA_6: _aa_6,
    Action.AA_7: _aa_7,
    Action.AA_8: _aa_8,
}


def step(
    state: State, event: Event, inp: ActionInput
) -> tuple[Action, State, tuple[Output, ...]]:
    """Look up Table 9-10 and run the action: returns (action, next state, outputs).

    A blank cell for a local event raises :class:`LocalProtocolError`. A blank
    cell for a received event cannot happen for a well-behaved engine (the
    engine only raises received-PDU events once a transport exists) and is
    treated the same way, as a bug in the caller.
    """
    action = TRANSITIONS.get((state, event))
    if action is None:
        raise LocalProtocolError(
            f"{event.name} ({event.value}) is not valid in {state.name} ({state.value})"
        )
    next_state, outputs = ACTIONS[action](inp)
    return action, next_state, outputs
