"""Association negotiation (router.dicom.negotiation) against PS3.8 §7.1 / PS3.7 D.3.3.

Two reference tables drive most of it, each row commented with the rule it
checks: presentation context results (PS3.8 §7.1.1.13-14, §9.3.3.2 Table 9-18)
and SCP/SCU role selection (PS3.7 D.3.3.4). Then every A-ASSOCIATE-RJ reason
(PS3.8 §9.3.4 Table 9-21), duplicate context IDs, the 128-context limit, AE
title matching, the AC's user information, and a full round trip through the
PDU codec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from router.dicom.errors import LocalProtocolError
from router.dicom.negotiation import (
    DEFAULT_MAXIMUM_LENGTH,
    MAX_PRESENTATION_CONTEXTS,
    MINIMUM_PEER_MAXIMUM_LENGTH,
    AcceptorPolicy,
    NegotiatedContext,
    accepted_contexts,
    build_request,
    context_for_instance,
    negotiate,
    negotiate_explained,
    provider_check,
)
from router.dicom.pdu import (
    ACSE_PROTOCOL_VERSION_NOT_SUPPORTED,
    DICOM_APPLICATION_CONTEXT,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AsynchronousOperationsWindow,
    ImplementationClassUID,
    ImplementationVersionName,
    MaximumLength,
    PresentationContextAC,
    PresentationContextResult,
    PresentationContextRQ,
    RejectReason,
    RejectResult,
    RejectSource,
    SCPSCURoleSelection,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityAC,
    UserIdentityRQ,
    UserIdentityType,
    UserInformation,
    UserInformationSubItem,
    decode_pdu,
    encode_pdu,
)
from router.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

# SOP classes (PS3.6 Annex A) and transfer syntaxes (PS3.5 Annex A).
VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
JPEG = "1.2.840.10008.1.2.4.50"
DEFLATE = "1.2.840.10008.1.2.1.99"

R = PresentationContextResult


def make_rq(
    contexts: Sequence[tuple[int, str, tuple[str, ...]]] = ((1, VERIFICATION, (IMPLICIT,)),),
    *,
    items: Sequence[UserInformationSubItem] = (),
    called: str = "ROUTER",
    calling: str = "MODALITY",
    application_context: str = DICOM_APPLICATION_CONTEXT,
    protocol_version: int = 1,
) -> AAssociateRQ:
    """An A-ASSOCIATE-RQ as a peer might send it (IDs chosen by the test)."""
    return AAssociateRQ(
        protocol_version=protocol_version,
        called_ae_title=called,
        calling_ae_title=calling,
        application_context_name=application_context,
        presentation_contexts=tuple(
            PresentationContextRQ(context_id=cid, abstract_syntax=a, transfer_syntaxes=ts)
            for cid, a, ts in contexts
        ),
        user_information=UserInformation(items=(MaximumLength(maximum_length=16384), *items)),
    )


def make_ac(
    rq: AAssociateRQ,
    results: Sequence[tuple[int, PresentationContextResult, str | None]],
    items: Sequence[UserInformationSubItem] = (),
) -> AAssociateAC:
    """An A-ASSOCIATE-AC as a peer acceptor might answer ``rq``."""
    return AAssociateAC(
        called_ae_title=rq.called_ae_title,
        calling_ae_title=rq.calling_ae_title,
        presentation_contexts=tuple(
            PresentationContextAC(context_id=cid, result=res, transfer_syntax=ts)
            for cid, res, ts in results
        ),
        user_information=UserInformation(items=(MaximumLength(maximum_length=0), *items)),
    )


def accepted(pdu: AAssociateAC | AAssociateRJ) -> AAssociateAC:
    assert isinstance(pdu, AAssociateAC), pdu
    return pdu


def rejected(pdu: AAssociateAC | AAssociateRJ) -> AAssociateRJ:
    assert isinstance(pdu, AAssociateRJ), pdu
    return pdu


def items_of(pdu: AAssociateAC | AAssociateRQ, kind: type) -> list[Any]:
    return [i for i in pdu.user_information.items if isinstance(i, kind)]


# ---------------------------------------------------------------------------
# Presentation context negotiation: reference table
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PCRow:
    id: str
    policy: dict[str, Any]
    abstract: str
    proposed: tuple[str, ...]
    result: PresentationContextResult
    chosen: str | None


PC_TABLE = [
    # PS3.8 §7.1.1.14: exactly one of the offered transfer syntaxes is agreed;
    # an open policy takes the requestor's first.
    PCRow("open-policy-first-proposed", {}, CT, (EXPLICIT, IMPLICIT), R.ACCEPTANCE, EXPLICIT),
    # Table 9-18 reason 3: abstract syntax not among ours.
    PCRow("abstract-not-supported", {"abstract_syntaxes": {CT: None}}, MR, (IMPLICIT,),
          R.ABSTRACT_SYNTAX_NOT_SUPPORTED, None),
    # Table 9-18 reason 4: abstract syntax known, no offered TS acceptable.
    PCRow("ts-not-supported", {"abstract_syntaxes": {CT: (EXPLICIT,)}}, CT, (IMPLICIT, JPEG),
          R.TRANSFER_SYNTAXES_NOT_SUPPORTED, None),
    # §7.1.1.14 leaves the choice to the acceptor; prefer_requestor_order=True
    # takes the first *proposed* TS we accept...
    PCRow("requestor-order", {"abstract_syntaxes": {CT: (IMPLICIT, EXPLICIT)}}, CT,
          (JPEG, EXPLICIT, IMPLICIT), R.ACCEPTANCE, EXPLICIT),
    # ... prefer_requestor_order=False takes the first of *ours* that was proposed.
    PCRow("acceptor-order",
          {"abstract_syntaxes": {CT: (IMPLICIT, EXPLICIT)}, "prefer_requestor_order": False},
          CT, (JPEG, EXPLICIT, IMPLICIT), R.ACCEPTANCE, IMPLICIT),
    # A None value in abstract_syntaxes falls back to the default TS list.
    PCRow("default-ts-list", {"abstract_syntaxes": {CT: None}, "transfer_syntaxes": (EXPLICIT,)},
          CT, (IMPLICIT, EXPLICIT), R.ACCEPTANCE, EXPLICIT),
    PCRow("default-ts-list-refuses",
          {"abstract_syntaxes": {CT: None}, "transfer_syntaxes": (EXPLICIT,)},
          CT, (IMPLICIT, JPEG), R.TRANSFER_SYNTAXES_NOT_SUPPORTED, None),
    # A SOP class's own list overrides the default list.
    PCRow("own-list-overrides-default",
          {"abstract_syntaxes": {CT: (JPEG,)}, "transfer_syntaxes": (IMPLICIT,)},
          CT, (IMPLICIT, JPEG), R.ACCEPTANCE, JPEG),
    # abstract_syntaxes=None accepts any SOP class, with the default TS list.
    PCRow("any-abstract-default-ts", {"transfer_syntaxes": (IMPLICIT,)}, MR, (EXPLICIT,),
          R.TRANSFER_SYNTAXES_NOT_SUPPORTED, None),
    PCRow("any-abstract-acceptor-order",
          {"transfer_syntaxes": (IMPLICIT, EXPLICIT), "prefer_requestor_order": False},
          MR, (EXPLICIT, IMPLICIT), R.ACCEPTANCE, IMPLICIT),
    # No TS list anywhere: any offered TS (a router forwards what it gets).
    PCRow("any-ts", {"abstract_syntaxes": {CT: None}}, CT, (JPEG, DEFLATE), R.ACCEPTANCE, JPEG),
    # With no list of ours there is no "our order": the requestor's order stands.
    PCRow("any-ts-acceptor-order", {"prefer_requestor_order": False}, CT, (DEFLATE, IMPLICIT),
          R.ACCEPTANCE, DEFLATE),
    # PS3.7 D.3.2: the same SOP class in a later context is negotiated on its own.
    PCRow("verification-any", {"abstract_syntaxes": {VERIFICATION: (IMPLICIT,)}}, VERIFICATION,
          (IMPLICIT,), R.ACCEPTANCE, IMPLICIT),
]


@pytest.mark.parametrize("row", PC_TABLE, ids=[r.id for r in PC_TABLE])
def test_presentation_context_table(row: PCRow) -> None:
    # reject_if_no_context=False: a refused context still yields an AC to inspect.
    policy = AcceptorPolicy(reject_if_no_context=False, **row.policy)
    rq = make_rq([(1, row.abstract, row.proposed)])
    ac = accepted(negotiate(rq, policy))
    assert ac.presentation_contexts == (
        PresentationContextAC(context_id=1, result=row.result, transfer_syntax=row.chosen),
    )
    got = accepted_contexts(rq, ac)
    if row.result is R.ACCEPTANCE:
        assert got == {1: NegotiatedContext(context_id=1, abstract_syntax=row.abstract,
                                            transfer_syntax=str(row.chosen))}
    else:
        assert got == {}


def test_one_result_per_proposed_context_in_order() -> None:
    # PS3.8 §7.1.1.14: "a one to one correspondence" between proposals and results.
    policy = AcceptorPolicy(abstract_syntaxes={CT: (IMPLICIT,), VERIFICATION: None})
    rq = make_rq([(1, CT, (EXPLICIT,)), (3, CT, (IMPLICIT,)), (5, MR, (IMPLICIT,)),
                  (7, VERIFICATION, (IMPLICIT,))])
    ac = accepted(negotiate(rq, policy))
    assert [(c.context_id, c.result) for c in ac.presentation_contexts] == [
        (1, R.TRANSFER_SYNTAXES_NOT_SUPPORTED),
        (3, R.ACCEPTANCE),
        (5, R.ABSTRACT_SYNTAX_NOT_SUPPORTED),
        (7, R.ACCEPTANCE),
    ]
    assert sorted(accepted_contexts(rq, ac)) == [3, 7]


def test_duplicate_context_ids() -> None:
    # PS3.8 §7.1.1.13: the requestor must use an unused ID for each context;
    # §7.1.1.14 still wants one result per item: the repeat gets "no-reason
    # (provider rejection)" and the first item with that ID stands.
    rq = make_rq([(1, CT, (IMPLICIT,)), (1, MR, (IMPLICIT,)), (3, VERIFICATION, (IMPLICIT,))])
    ac = accepted(negotiate(rq, AcceptorPolicy()))
    assert ac.presentation_contexts == (
        PresentationContextAC(context_id=1, result=R.ACCEPTANCE, transfer_syntax=IMPLICIT),
        PresentationContextAC(context_id=1, result=R.NO_REASON, transfer_syntax=None),
        PresentationContextAC(context_id=3, result=R.ACCEPTANCE, transfer_syntax=IMPLICIT),
    )
    got = accepted_contexts(rq, ac)
    assert {cid: c.abstract_syntax for cid, c in got.items()} == {1: CT, 3: VERIFICATION}


def test_accepted_contexts_ignores_what_was_not_proposed() -> None:
    # Only AC items with result acceptance, for an ID of the RQ, with one of the
    # transfer syntaxes offered for it (§7.1.1.14), make a usable context.
    rq = make_rq([(1, CT, (IMPLICIT,)), (3, MR, (EXPLICIT,)), (5, VERIFICATION, (IMPLICIT,))])
    ac = make_ac(rq, [
        (1, R.ACCEPTANCE, IMPLICIT),
        (3, R.ACCEPTANCE, JPEG),  # a TS we never offered for this context
        (5, R.USER_REJECTION, None),
        (7, R.ACCEPTANCE, IMPLICIT),  # an ID we never proposed
    ])
    assert accepted_contexts(rq, ac) == {
        1: NegotiatedContext(context_id=1, abstract_syntax=CT, transfer_syntax=IMPLICIT)
    }


def test_accepted_contexts_results_in_any_order() -> None:
    # PS3.8 §7.1.1.14 note: results may come in any order.
    rq = make_rq([(1, CT, (IMPLICIT,)), (3, MR, (EXPLICIT,))])
    ac = make_ac(rq, [(3, R.ACCEPTANCE, EXPLICIT), (1, R.ACCEPTANCE, IMPLICIT)])
    got = accepted_contexts(rq, ac)
    assert (got[1].abstract_syntax, got[3].abstract_syntax) == (CT, MR)


# ---------------------------------------------------------------------------
# SCP/SCU role selection: reference table (PS3.7 D.3.3.4)
# ---------------------------------------------------------------------------

Roles = tuple[bool, bool] | None  # (SCU, SCP) of a role item, None = no item


@dataclass(frozen=True)
class RoleRow:
    id: str
    rq: Roles  # what the requestor proposes for the SOP class
    accept_scp_role: bool  # our policy when we are the acceptor
    ac: Roles  # what we answer (negotiate) / what the peer answered
    outcome: tuple[bool, bool]  # (requestor SCU, requestor SCP) afterwards


ROLE_TABLE = [
    # No item proposed: defaults, requestor SCU / acceptor SCP; no item is
    # returned ("If the SCP/SCU Role Selection items do not exist in the
    # A-ASSOCIATE indication they shall be omitted in the A-ASSOCIATE response").
    RoleRow("absent", None, True, None, (True, False)),
    RoleRow("absent-strict", None, False, None, (True, False)),
    # Proposals are kept by returning the same 1 ...
    RoleRow("scu-only", (True, False), True, (True, False), (True, False)),
    RoleRow("scp-only", (False, True), True, (False, True), (False, True)),
    RoleRow("both", (True, True), True, (True, True), (True, True)),
    # ... or turned down by returning 0 (C-GET needs the SCP role, PS3.4 C.4.3).
    RoleRow("both-scp-refused", (True, True), False, (True, False), (True, False)),
    # Only the SCP role proposed and refused: no role left for the requestor,
    # the context is accepted but carries no DIMSE service.
    RoleRow("scp-only-refused", (False, True), False, (False, False), (False, False)),
    # The acceptor never returns 1 for a role that was not proposed.
    RoleRow("scu-only-strict", (True, False), False, (True, False), (True, False)),
]


@pytest.mark.parametrize("row", ROLE_TABLE, ids=[r.id for r in ROLE_TABLE])
def test_role_selection_as_acceptor(row: RoleRow) -> None:
    items = [] if row.rq is None else [SCPSCURoleSelection(sop_class_uid=STUDY_GET,
                                                           scu_role=row.rq[0],
                                                           scp_role=row.rq[1])]
    rq = make_rq([(1, STUDY_GET, (IMPLICIT,)), (3, CT, (IMPLICIT,))], items=items)
    ac = accepted(negotiate(rq, AcceptorPolicy(accept_scp_role=row.accept_scp_role)))
    answers = items_of(ac, SCPSCURoleSelection)
    if row.ac is None:
        assert answers == []
    else:
        assert answers == [SCPSCURoleSelection(sop_class_uid=STUDY_GET, scu_role=row.ac[0],
                                               scp_role=row.ac[1])]
    got = accepted_contexts(rq, ac)
    assert (got[1].requestor_scu, got[1].requestor_scp) == row.outcome
    # The acceptor plays the complementary roles.
    assert (got[1].acceptor_scp, got[1].acceptor_scu) == row.outcome
    # Role items only concern their own SOP class.
    assert (got[3].requestor_scu, got[3].requestor_scp) == (True, False)


PEER_ROLE_TABLE = [
    # "If the SCP/SCU Role Selection item is not returned by the
    # Association-acceptor then the role of the Association-requestor shall be
    # SCU and the role of the Association-acceptor shall be SCP."
    RoleRow("not-returned", (True, True), True, None, (True, False)),
    RoleRow("not-returned-scp-only", (False, True), True, None, (True, False)),
    # "The Association-requestor shall ignore the response if it has not
    # proposed the role": a 1 for an unproposed role does not count ...
    RoleRow("unproposed-scp-ignored", (True, False), True, (True, True), (True, False)),
    RoleRow("unproposed-scu-ignored", (False, True), True, (True, True), (False, True)),
    # ... and an answer to an item never proposed is ignored altogether.
    RoleRow("answer-without-proposal", None, True, (False, True), (True, False)),
    # Kept (1) or turned down (0), role by role.
    RoleRow("both-kept", (True, True), True, (True, True), (True, True)),
    RoleRow("scu-turned-down", (True, True), True, (False, True), (False, True)),
    RoleRow("scp-turned-down", (True, True), True, (True, False), (True, False)),
    RoleRow("both-turned-down", (True, True), True, (False, False), (False, False)),
]


@pytest.mark.parametrize("row", PEER_ROLE_TABLE, ids=[r.id for r in PEER_ROLE_TABLE])
def test_role_selection_as_requestor(row: RoleRow) -> None:
    rq_items = [] if row.rq is None else [SCPSCURoleSelection(sop_class_uid=STUDY_GET,
                                                              scu_role=row.rq[0],
                                                              scp_role=row.rq[1])]
    ac_items = [] if row.ac is None else [SCPSCURoleSelection(sop_class_uid=STUDY_GET,
                                                              scu_role=row.ac[0],
                                                              scp_role=row.ac[1])]
    rq = make_rq([(1, STUDY_GET, (IMPLICIT,))], items=rq_items)
    ac = make_ac(rq, [(1, R.ACCEPTANCE, IMPLICIT)], items=ac_items)
    got = accepted_contexts(rq, ac)[1]
    assert (got.requestor_scu, got.requestor_scp) == row.outcome


def test_role_items_answered_only_for_accepted_sop_classes() -> None:
    # PS3.7 D.3.3.4: roles are negotiated for SOP classes "supported on the
    # Association"; a refused one gets no answer.
    rq = make_rq(
        [(1, CT, (IMPLICIT,)), (3, MR, (IMPLICIT,))],
        items=[SCPSCURoleSelection(sop_class_uid=CT, scu_role=False, scp_role=True),
               SCPSCURoleSelection(sop_class_uid=MR, scu_role=False, scp_role=True)],
    )
    ac = accepted(negotiate(rq, AcceptorPolicy(abstract_syntaxes={CT: None})))
    assert items_of(ac, SCPSCURoleSelection) == [
        SCPSCURoleSelection(sop_class_uid=CT, scu_role=False, scp_role=True)
    ]


def test_one_role_item_per_sop_class_first_wins() -> None:
    # PS3.7 D.3.3.4: "for each SOP Class UID ... may use one" item.
    rq = make_rq(
        [(1, CT, (IMPLICIT,))],
        items=[SCPSCURoleSelection(sop_class_uid=CT, scu_role=True, scp_role=True),
               SCPSCURoleSelection(sop_class_uid=CT, scu_role=True, scp_role=False)],
    )
    ac = accepted(negotiate(rq, AcceptorPolicy()))
    assert items_of(ac, SCPSCURoleSelection) == [
        SCPSCURoleSelection(sop_class_uid=CT, scu_role=True, scp_role=True)
    ]
    assert accepted_contexts(rq, ac)[1].requestor_scp is True


# ---------------------------------------------------------------------------
# Rejections, PS3.8 §9.3.4 Table 9-21
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rq_kwargs", "policy_kwargs", "reason"),
    [
        # Table 9-21 source 1 reason 2 / PS3.7 A.2.1: only the DICOM
        # application context name is known.
        ({"application_context": "1.2.840.10008.3.1.1.2"}, {},
         RejectReason.USER_APPLICATION_CONTEXT_NOT_SUPPORTED),
        # Source 1 reason 7: called AE title not recognized.
        ({"called": "OTHER"}, {"ae_titles": frozenset({"ROUTER"})},
         RejectReason.USER_CALLED_AE_NOT_RECOGNIZED),
        # Source 1 reason 3: calling AE title not recognized.
        ({"calling": "INTRUDER"}, {"calling_ae_titles": frozenset({"MODALITY", "CT1"})},
         RejectReason.USER_CALLING_AE_NOT_RECOGNIZED),
        # Source 1 reason 1: nothing acceptable was proposed.
        ({"contexts": [(1, MR, (IMPLICIT,))]}, {"abstract_syntaxes": {CT: None}},
         RejectReason.USER_NO_REASON),
        ({"contexts": [(1, CT, (JPEG,))]}, {"transfer_syntaxes": (IMPLICIT,)},
         RejectReason.USER_NO_REASON),
    ],
    ids=["application-context", "called-ae", "calling-ae", "no-context-abstract",
         "no-context-ts"],
)
def test_user_rejections(rq_kwargs: dict[str, Any], policy_kwargs: dict[str, Any],
                         reason: RejectReason) -> None:
    rj = rejected(negotiate(make_rq(**rq_kwargs), AcceptorPolicy(**policy_kwargs)))
    assert rj == AAssociateRJ(result=RejectResult.REJECTED_PERMANENT,
                              source=RejectSource.SERVICE_USER, reason=int(reason))


def test_rejection_checks_come_in_order() -> None:
    # Application context first, then called, then calling AE title.
    policy = AcceptorPolicy(ae_titles=frozenset({"ROUTER"}),
                            calling_ae_titles=frozenset({"MODALITY"}))
    bad_all = make_rq(application_context="1.2.3", called="X", calling="Y")
    assert rejected(negotiate(bad_all, policy)).reason == (
        RejectReason.USER_APPLICATION_CONTEXT_NOT_SUPPORTED)
    assert rejected(negotiate(make_rq(called="X", calling="Y"), policy)).reason == (
        RejectReason.USER_CALLED_AE_NOT_RECOGNIZED)


@pytest.mark.parametrize(("maximum", "ok"), [
    (0, True),  # PS3.8 D.1: 0 is "no maximum"
    (1, False),
    (6, False),  # a PDV item's own header fills it: no data would ever fit
    (7, False),
    (MINIMUM_PEER_MAXIMUM_LENGTH - 1, False),
    (MINIMUM_PEER_MAXIMUM_LENGTH, True),
    (4096, True),
    (0xFFFF_FFFF, True),
])
def test_tiny_peer_maximum_length_rejected(maximum: int, ok: bool) -> None:
    rq = dataclasses.replace(make_rq(), user_information=UserInformation(
        items=(MaximumLength(maximum_length=maximum),)))
    answer, why = negotiate_explained(rq, AcceptorPolicy())
    if ok:
        assert isinstance(answer, AAssociateAC) and why == ""
    else:
        assert answer == AAssociateRJ(result=RejectResult.REJECTED_PERMANENT,
                                      source=RejectSource.SERVICE_USER,
                                      reason=int(RejectReason.USER_NO_REASON))
        assert why == (f"maximum PDU length {maximum} is under "
                       f"{MINIMUM_PEER_MAXIMUM_LENGTH} bytes")


def test_no_maximum_length_item_is_no_limit() -> None:
    rq = dataclasses.replace(make_rq(), user_information=UserInformation(items=()))
    assert isinstance(negotiate(rq, AcceptorPolicy()), AAssociateAC)


@pytest.mark.parametrize(("rq_kwargs", "policy_kwargs", "why"), [
    ({"application_context": "1.2.3"}, {}, "application context '1.2.3' is not DICOM's"),
    ({"called": "OTHER"}, {"ae_titles": frozenset({"ROUTER"})},
     "called AE title 'OTHER' is not ours"),
    ({"calling": "INTRUDER"}, {"calling_ae_titles": frozenset({"CT1"})},
     "calling AE title 'INTRUDER' is not allowed"),
    ({"contexts": [(1, MR, (IMPLICIT,)), (3, CT, (IMPLICIT,))]},
     {"abstract_syntaxes": {VERIFICATION: None}},
     f"none of 2 presentation contexts accepted (first: {MR}, SOP class not accepted)"),
    ({"contexts": [(1, CT, (JPEG,))]}, {"transfer_syntaxes": (IMPLICIT,)},
     f"none of 1 presentation contexts accepted (first: {CT}, "
     "none of its transfer syntaxes accepted)"),
    ({"contexts": []}, {}, "no presentation context proposed"),
])
def test_rejections_say_why(rq_kwargs: dict[str, Any], policy_kwargs: dict[str, Any],
                            why: str) -> None:
    answer, said = negotiate_explained(make_rq(**rq_kwargs), AcceptorPolicy(**policy_kwargs))
    assert isinstance(answer, AAssociateRJ)
    assert said == why


def test_no_context_accepted_but_not_rejecting() -> None:
    policy = AcceptorPolicy(abstract_syntaxes={CT: None}, reject_if_no_context=False)
    ac = accepted(negotiate(make_rq([(1, MR, (IMPLICIT,))]), policy))
    assert [c.result for c in ac.presentation_contexts] == [R.ABSTRACT_SYNTAX_NOT_SUPPORTED]


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        (0x0001, True),  # version 1: bit 0 set
        (0x0003, True),  # "shall only test that bit 0 is set" (PS3.8 §9.3.2)
        (0xFFFF, True),
        (0x0000, False),
        (0x0002, False),  # some future version only
    ],
)
def test_provider_check_protocol_version(version: int, ok: bool) -> None:
    result = provider_check(make_rq(protocol_version=version))
    if ok:
        assert result is None
    else:
        # PS3.8 Table 9-21: source 2 (service-provider, ACSE related), reason 2.
        assert result == AAssociateRJ(result=RejectResult.REJECTED_PERMANENT,
                                      source=RejectSource.SERVICE_PROVIDER_ACSE,
                                      reason=ACSE_PROTOCOL_VERSION_NOT_SUPPORTED)


def test_provider_check_leaves_user_matters_to_the_user() -> None:
    # Application context and AE titles are the user's call (negotiate), not AE-6's.
    assert provider_check(make_rq(application_context="1.2.3", called="NOBODY")) is None


# ---------------------------------------------------------------------------
# AE titles
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "called", "ok"),
    [
        ("ROUTER", "ROUTER", True),
        # Leading/trailing spaces are not significant (PS3.8 §9.3.2, Table 9-11) ...
        ("  ROUTER   ", "ROUTER", True),
        # ... but AE titles are case-sensitive in DICOM: no case folding.
        ("ROUTER", "router", False),
        ("router", "ROUTER", False),
        # Embedded spaces are significant.
        ("MY ROUTER", "MY ROUTER", True),
        ("MY ROUTER", "MYROUTER", False),
        # Exact match, not prefix match.
        ("ROUTER", "ROUTER2", False),
    ],
)
def test_called_ae_title_matching(configured: str, called: str, ok: bool) -> None:
    policy = AcceptorPolicy(ae_titles=frozenset({configured}))
    result = negotiate(make_rq(called=called), policy)
    assert isinstance(result, AAssociateAC) is ok


@pytest.mark.parametrize(
    ("configured", "calling", "ok"),
    [
        ("MODALITY", "MODALITY", True),
        (" MODALITY", "MODALITY", True),
        ("MODALITY", "Modality", False),  # case-sensitive
    ],
)
def test_calling_ae_title_matching(configured: str, calling: str, ok: bool) -> None:
    policy = AcceptorPolicy(calling_ae_titles=frozenset({configured}))
    assert isinstance(negotiate(make_rq(calling=calling), policy), AAssociateAC) is ok


def test_policy_normalises_ae_titles() -> None:
    policy = AcceptorPolicy(ae_titles=frozenset({" A ", "B"}), calling_ae_titles={"C  "})  # type: ignore[arg-type]
    assert policy.ae_titles == frozenset({"A", "B"})
    assert policy.calling_ae_titles == frozenset({"C"})


# ---------------------------------------------------------------------------
# The A-ASSOCIATE-AC: AE titles, application context, user information
# ---------------------------------------------------------------------------


def test_ac_echoes_request_and_carries_our_user_information() -> None:
    rq = make_rq(called="ROUTER", calling="CT1")
    policy = AcceptorPolicy(maximum_length=65536)
    ac = accepted(negotiate(rq, policy))
    # PS3.8 §9.3.3: reserved fields sent with the values received in the RQ.
    assert (ac.called_ae_title, ac.calling_ae_title) == ("ROUTER", "CT1")
    assert ac.application_context_name == DICOM_APPLICATION_CONTEXT
    # PS3.8 D.1, PS3.7 D.3.3.2.
    assert ac.user_information.items == (
        MaximumLength(maximum_length=65536),
        ImplementationClassUID(uid=IMPLEMENTATION_CLASS_UID),
        ImplementationVersionName(name=IMPLEMENTATION_VERSION_NAME),
    )


def test_ac_defaults() -> None:
    ac = accepted(negotiate(make_rq(), AcceptorPolicy()))
    assert items_of(ac, MaximumLength) == [MaximumLength(maximum_length=DEFAULT_MAXIMUM_LENGTH)]
    assert DEFAULT_MAXIMUM_LENGTH == 1_048_576


def test_ac_without_version_name() -> None:
    policy = AcceptorPolicy(implementation_version_name=None,
                            implementation_class_uid="1.2.3.4")
    ac = accepted(negotiate(make_rq(), policy))
    assert items_of(ac, ImplementationVersionName) == []
    assert items_of(ac, ImplementationClassUID) == [ImplementationClassUID(uid="1.2.3.4")]


@pytest.mark.parametrize("window", [(0, 0), (1, 1), (16, 4)])
def test_async_window_answered_one_one(window: tuple[int, int]) -> None:
    # PS3.7 D.3.3.3: we invoke and perform one operation at a time.
    rq = make_rq(items=[AsynchronousOperationsWindow(max_operations_invoked=window[0],
                                                     max_operations_performed=window[1])])
    ac = accepted(negotiate(rq, AcceptorPolicy()))
    assert items_of(ac, AsynchronousOperationsWindow) == [
        AsynchronousOperationsWindow(max_operations_invoked=1, max_operations_performed=1)
    ]


def test_no_async_window_unless_proposed() -> None:
    ac = accepted(negotiate(make_rq(), AcceptorPolicy()))
    assert items_of(ac, AsynchronousOperationsWindow) == []


def test_extended_negotiation_and_user_identity_not_answered() -> None:
    # PS3.7 D.3.3.5/D.3.3.6: no answer = not supported; D.3.3.7: no AC
    # sub-item when we give no positive response.
    rq = make_rq(
        [(1, CT, (IMPLICIT,))],
        items=[
            SOPClassExtendedNegotiation(sop_class_uid=CT,
                                        service_class_application_information=b"\x01"),
            SOPClassCommonExtendedNegotiation(sop_class_uid=CT,
                                              service_class_uid="1.2.840.10008.4.2"),
            UserIdentityRQ(identity_type=UserIdentityType.USERNAME_AND_PASSCODE,
                           positive_response_requested=True, primary_field=b"user",
                           secondary_field=b"secret"),
        ],
    )
    ac = accepted(negotiate(rq, AcceptorPolicy()))
    for kind in (SOPClassExtendedNegotiation, SOPClassCommonExtendedNegotiation,
                 UserIdentityRQ, UserIdentityAC):
        assert items_of(ac, kind) == []


# ---------------------------------------------------------------------------
# build_request
# ---------------------------------------------------------------------------


def test_build_request_assigns_odd_ids_in_order() -> None:
    # storescu style: one context per transfer syntax for the same SOP class
    # (PS3.8 §7.1.1.13 note: each occurrence is its own context).
    rq = build_request(
        calling_ae_title="ROUTER",
        called_ae_title="PACS",
        contexts=[(CT, [JPEG]), (CT, [EXPLICIT, IMPLICIT]), (VERIFICATION, (IMPLICIT,))],
    )
    assert rq.presentation_contexts == (
        PresentationContextRQ(context_id=1, abstract_syntax=CT, transfer_syntaxes=(JPEG,)),
        PresentationContextRQ(context_id=3, abstract_syntax=CT,
                              transfer_syntaxes=(EXPLICIT, IMPLICIT)),
        PresentationContextRQ(context_id=5, abstract_syntax=VERIFICATION,
                              transfer_syntaxes=(IMPLICIT,)),
    )
    assert (rq.calling_ae_title, rq.called_ae_title) == ("ROUTER", "PACS")
    assert rq.application_context_name == DICOM_APPLICATION_CONTEXT
    assert rq.protocol_version == 1
    assert rq.user_information.items == (
        MaximumLength(maximum_length=DEFAULT_MAXIMUM_LENGTH),
        ImplementationClassUID(uid=IMPLEMENTATION_CLASS_UID),
        ImplementationVersionName(name=IMPLEMENTATION_VERSION_NAME),
    )


def test_build_request_128_contexts_fit() -> None:
    # PS3.8 §9.3.2.2: IDs are odd integers 1-255, so 128 contexts at most.
    rq = build_request(calling_ae_title="A", called_ae_title="B",
                       contexts=[(CT, (IMPLICIT,))] * MAX_PRESENTATION_CONTEXTS)
    ids = [pc.context_id for pc in rq.presentation_contexts]
    assert ids == list(range(1, 256, 2))
    assert MAX_PRESENTATION_CONTEXTS == 128


def test_build_request_129_contexts_do_not() -> None:
    with pytest.raises(LocalProtocolError, match="128"):
        build_request(calling_ae_title="A", called_ae_title="B",
                      contexts=[(CT, (IMPLICIT,))] * 129)


def test_build_request_all_user_information() -> None:
    identity = UserIdentityRQ(identity_type=UserIdentityType.USERNAME,
                              positive_response_requested=False, primary_field=b"me")
    ext = SOPClassExtendedNegotiation(sop_class_uid=STUDY_GET,
                                      service_class_application_information=b"\x01\x01")
    common = SOPClassCommonExtendedNegotiation(sop_class_uid=CT,
                                               service_class_uid="1.2.840.10008.4.2")
    rq = build_request(
        calling_ae_title="  ROUTER ",
        called_ae_title="PACS",
        contexts=[(STUDY_GET, (IMPLICIT,)), (CT, (IMPLICIT,))],
        maximum_length=0,
        roles={CT: (False, True), STUDY_GET: (True, False)},
        user_identity=identity,
        async_ops=(0, 1),
        extended=[ext],
        common_extended=[common],
        implementation_class_uid="1.2.3",
        implementation_version_name="TEST_1",
    )
    assert rq.calling_ae_title == "ROUTER"  # padding is not significant (§9.3.2)
    # Sub-items in item-type order 0x51 .. 0x58 (PS3.7 D.3.3).
    assert rq.user_information.items == (
        MaximumLength(maximum_length=0),
        ImplementationClassUID(uid="1.2.3"),
        AsynchronousOperationsWindow(max_operations_invoked=0, max_operations_performed=1),
        SCPSCURoleSelection(sop_class_uid=CT, scu_role=False, scp_role=True),
        SCPSCURoleSelection(sop_class_uid=STUDY_GET, scu_role=True, scp_role=False),
        ImplementationVersionName(name="TEST_1"),
        ext,
        common,
        identity,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"contexts": []}, "at least one"),
        ({"contexts": [(CT, IMPLICIT)]}, "not a str"),  # a str is not a list of UIDs
        ({"contexts": [(CT, ())]}, "at least one"),
        ({"contexts": [("1.2.x", (IMPLICIT,))]}, "UID"),
        ({"contexts": [(CT, ("not-a-uid",))]}, "UID"),
        ({"roles": {MR: (True, True)}}, "no presentation context"),
        ({"roles": {CT: (False, False)}}, "neither"),  # PS3.7 D.3.3.4: three values only
        ({"calling_ae_title": "A" * 17}, "1-16"),
        ({"called_ae_title": "    "}, "1-16"),
        ({"called_ae_title": "BACK\\SLASH"}, "backslash"),
        ({"maximum_length": -1}, "32 bits"),
        ({"maximum_length": 1 << 32}, "32 bits"),
        ({"async_ops": (0, 65536)}, "0-65535"),
        ({"implementation_version_name": "X" * 17}, "1-16"),
        ({"implementation_class_uid": ""}, "UID"),
    ],
)
def test_build_request_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"calling_ae_title": "A", "called_ae_title": "B",
                            "contexts": [(CT, (IMPLICIT,))]}
    args.update(kwargs)
    with pytest.raises(LocalProtocolError, match=match):
        build_request(**args)


# ---------------------------------------------------------------------------
# AcceptorPolicy and NegotiatedContext values
# ---------------------------------------------------------------------------


def test_policy_is_immutable_and_owns_its_mapping() -> None:
    mapping: dict[str, tuple[str, ...] | None] = {CT: (IMPLICIT,)}
    policy = AcceptorPolicy(abstract_syntaxes=mapping)
    mapping[MR] = None  # the caller's dict changing later does not leak in
    assert policy.abstract_syntaxes is not None
    assert dict(policy.abstract_syntaxes) == {CT: (IMPLICIT,)}
    with pytest.raises(TypeError):
        policy.abstract_syntaxes[MR] = None  # type: ignore[index]
    with pytest.raises(AttributeError):
        policy.maximum_length = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"transfer_syntaxes": ()},
        {"transfer_syntaxes": IMPLICIT},
        {"abstract_syntaxes": {CT: ()}},
        {"abstract_syntaxes": {"CT": None}},
        {"maximum_length": -1},
        {"implementation_version_name": ""},
        {"implementation_class_uid": "1.2.abc"},
        {"ae_titles": frozenset({"A" * 17})},
        {"calling_ae_titles": frozenset({""})},
    ],
)
def test_policy_validated_on_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        AcceptorPolicy(**kwargs)


def test_negotiated_context_defaults_and_validation() -> None:
    ctx = NegotiatedContext(context_id=1, abstract_syntax=CT, transfer_syntax=IMPLICIT)
    # PS3.7 D.3.3.4 default roles: requestor SCU, acceptor SCP.
    assert (ctx.requestor_scu, ctx.requestor_scp) == (True, False)
    assert (ctx.acceptor_scu, ctx.acceptor_scp) == (False, True)
    for bad_id in (0, 2, 256):
        with pytest.raises(LocalProtocolError):
            NegotiatedContext(context_id=bad_id, abstract_syntax=CT, transfer_syntax=IMPLICIT)


# ---------------------------------------------------------------------------
# Both sides, end to end
# ---------------------------------------------------------------------------


@dataclass
class Scenario:
    contexts: list[tuple[str, list[str]]]
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    policy: AcceptorPolicy = field(default_factory=AcceptorPolicy)


def test_both_sides_agree_through_the_codec() -> None:
    # Requestor builds, the RQ crosses the wire, the acceptor answers, the AC
    # crosses back: both ends derive the same contexts from the same PDUs.
    s = Scenario(
        contexts=[(STUDY_GET, [IMPLICIT]), (CT, [JPEG]), (CT, [EXPLICIT, IMPLICIT]),
                  (MR, [IMPLICIT]), (VERIFICATION, [IMPLICIT])],
        roles={CT: (False, True), STUDY_GET: (True, False)},
        policy=AcceptorPolicy(abstract_syntaxes={STUDY_GET: None, CT: (EXPLICIT, IMPLICIT),
                                                 VERIFICATION: None},
                              prefer_requestor_order=False),
    )
    rq = build_request(calling_ae_title="SCU", called_ae_title="ROUTER", contexts=s.contexts,
                       roles=s.roles, async_ops=(2, 2))
    rq_seen = decode_pdu(encode_pdu(rq))
    assert rq_seen == rq
    assert isinstance(rq_seen, AAssociateRQ)
    assert provider_check(rq_seen) is None
    ac = accepted(negotiate(rq_seen, s.policy))
    ac_seen = decode_pdu(encode_pdu(ac))
    assert isinstance(ac_seen, AAssociateAC)
    acceptor_view = accepted_contexts(rq_seen, ac)
    requestor_view = accepted_contexts(rq, ac_seen)
    assert acceptor_view == requestor_view == {
        1: NegotiatedContext(context_id=1, abstract_syntax=STUDY_GET, transfer_syntax=IMPLICIT),
        5: NegotiatedContext(context_id=5, abstract_syntax=CT, transfer_syntax=EXPLICIT,
                             requestor_scu=False, requestor_scp=True),
        9: NegotiatedContext(context_id=9, abstract_syntax=VERIFICATION,
                             transfer_syntax=IMPLICIT),
    }
    assert [(c.context_id, c.result) for c in ac_seen.presentation_contexts] == [
        (1, R.ACCEPTANCE), (3, R.TRANSFER_SYNTAXES_NOT_SUPPORTED), (5, R.ACCEPTANCE),
        (7, R.ABSTRACT_SYNTAX_NOT_SUPPORTED), (9, R.ACCEPTANCE),
    ]


def test_rejection_round_trips_through_the_codec() -> None:
    rj = rejected(negotiate(make_rq(called="NOBODY"),
                            AcceptorPolicy(ae_titles=frozenset({"ROUTER"}))))
    assert decode_pdu(encode_pdu(rj)) == rj
    provider_rj = provider_check(make_rq(protocol_version=2))
    assert provider_rj is not None
    assert decode_pdu(encode_pdu(provider_rj)) == provider_rj


def test_malformed_context_is_refused_alone() -> None:
    """A context the decoder kept as malformed (a sub-item that is not a UID) is
    refused by itself, PS3.8 Table 9-18: abstract syntax not supported when the
    abstract syntax is bad, transfer syntaxes not supported when none is usable;
    a bad transfer syntax beside good ones is ignored. The others are accepted."""
    from router.dicom.pdu import PresentationContextRQ

    good = build_request(calling_ae_title="SCU", called_ae_title="SCP",
                         contexts=[("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])])
    contexts = (
        *good.presentation_contexts,
        PresentationContextRQ(context_id=3, abstract_syntax="1.2.X", malformed=(
            "abstract syntax '1.2.X' is not a UID"), transfer_syntaxes=("1.2.840.10008.1.2",)),
        PresentationContextRQ(context_id=5, abstract_syntax="1.2.840.10008.1.1", malformed=(
            "transfer syntax 'JUNK' is not a UID"), transfer_syntaxes=("JUNK",)),
        PresentationContextRQ(context_id=7, abstract_syntax="1.2.840.10008.1.1", malformed=(
            "transfer syntax 'JUNK' is not a UID"),
            transfer_syntaxes=("JUNK", "1.2.840.10008.1.2")),
    )
    rq = dataclasses.replace(good, presentation_contexts=contexts)
    ac = negotiate(rq, AcceptorPolicy())
    assert isinstance(ac, AAssociateAC)
    results = {c.context_id: (c.result, c.transfer_syntax) for c in ac.presentation_contexts}
    assert results == {
        1: (PresentationContextResult.ACCEPTANCE, "1.2.840.10008.1.2"),
        3: (PresentationContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, None),
        5: (PresentationContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, None),
        7: (PresentationContextResult.ACCEPTANCE, "1.2.840.10008.1.2"),
    }


def test_an_instance_is_converted_to_explicit_le_first_and_big_endian_last() -> None:
    """PixelMed accepts Explicit VR Big Endian and Explicit VR Little Endian for a SOP
    class (and refuses Implicit): an implicit instance went out in big endian, the
    first native context accepted, a retired syntax (PS3.5 A.3) that peers read
    worst. Explicit LE comes first, then Implicit LE, big endian only if alone."""
    big = "1.2.840.10008.1.2.2"

    def contexts(*syntaxes: str) -> list[NegotiatedContext]:
        return [NegotiatedContext(context_id=2 * n + 1, abstract_syntax=CT, transfer_syntax=ts)
                for n, ts in enumerate(syntaxes)]

    assert context_for_instance(contexts(big, EXPLICIT), CT, IMPLICIT).transfer_syntax == EXPLICIT
    assert context_for_instance(contexts(big, IMPLICIT), CT, EXPLICIT).transfer_syntax == IMPLICIT
    assert context_for_instance(contexts(big), CT, IMPLICIT).transfer_syntax == big
    assert context_for_instance(contexts(big, EXPLICIT), CT, big).transfer_syntax == big  # as held
    assert context_for_instance(contexts(EXPLICIT), CT, "1.2.840.10008.1.2.4.50") is None
