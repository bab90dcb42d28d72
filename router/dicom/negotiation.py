"""Association negotiation as pure functions, PS3.8 §7.1.1 and PS3.7 Annex D.3.3.

Theory of operation
-------------------
Negotiation happens in three places, one function each:

- :func:`provider_check` is what the *upper-layer service provider* may refuse
  before the user ever sees the request (AE-6 in PS3.8 Table 9-6): today, a
  protocol version without bit 0 set (PS3.8 §9.3.2).
- :func:`negotiate` is the acceptor *user's* answer, an A-ASSOCIATE-AC or -RJ,
  driven by an immutable :class:`AcceptorPolicy`: application context, called
  and calling AE titles, then one result per proposed presentation context
  (PS3.8 §7.1.1.13-14), then the user information answers (PS3.7 D.3.3).
- :func:`accepted_contexts` reads an RQ/AC pair into the contexts both sides may
  use, with the roles each side plays (PS3.7 D.3.3.4). Both the requestor and
  the acceptor call it on the same two PDUs, so they agree by construction.

:func:`build_request` is the requestor's side: it numbers presentation contexts
and gathers the user information sub-items into an A-ASSOCIATE-RQ.

Nothing here does I/O or keeps state; every input is a PDU dataclass from
:mod:`router.dicom.pdu` or a frozen policy, and every output is a new PDU.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from router.dicom.errors import LocalProtocolError
from router.dicom.pdu import (
    ACSE_PROTOCOL_VERSION_NOT_SUPPORTED,
    DICOM_APPLICATION_CONTEXT,
    MAX_PRESENTATION_CONTEXT_ITEMS,
    PRESENTATION_LOCAL_LIMIT_EXCEEDED,
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
    UserIdentityRQ,
    UserInformation,
    UserInformationSubItem,
)
from router.dicom.uids import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    is_standard_transfer_syntax,
    is_uncompressed,
)

__all__ = [
    "DEFAULT_MAXIMUM_LENGTH",
    "LOCAL_LIMIT_EXCEEDED",
    "MAX_PRESENTATION_CONTEXTS",
    "MINIMUM_PEER_MAXIMUM_LENGTH",
    "AcceptorPolicy",
    "NegotiatedContext",
    "accepted_contexts",
    "build_request",
    "context_for_instance",
    "negotiate",
    "negotiate_explained",
    "provider_check",
]

# What we advertise by default as our maximum PDU receive length (PS3.8 Annex
# D.1): large, because reading big is what makes the socket fast (DESIGN §4).
DEFAULT_MAXIMUM_LENGTH = 1_048_576

# Presentation context IDs are odd integers 1..255 (PS3.8 §9.3.2.2): 128 of them.
MAX_PRESENTATION_CONTEXTS = MAX_PRESENTATION_CONTEXT_ITEMS

# The answer to a request past our bound on open associations. PS3.8 Table 9-21:
# rejected-transient, service-provider (presentation related function),
# local-limit-exceeded: a "try again later" that requestors retry, not a refusal of
# their configuration.
LOCAL_LIMIT_EXCEEDED = AAssociateRJ(result=RejectResult.REJECTED_TRANSIENT,
                                    source=RejectSource.SERVICE_PROVIDER_PRESENTATION,
                                    reason=PRESENTATION_LOCAL_LIMIT_EXCEEDED)

# The smallest maximum PDU length (PS3.8 Annex D.1) we accept from a requestor.
# PS3.8 sets no floor, but a P-DATA-TF whose PDV item (4-byte length, context ID,
# control header) must fit in fewer than 7 bytes carries no data at all, and one
# of a few dozen bytes turns every answer we send (C-FIND matches, C-GET
# sub-operations) into a flood of PDUs that are mostly headers. 256 keeps the
# headers under 5 %; real implementations offer 4 KiB or more (DCMTK's tools
# cannot be told to offer less: their --max-pdu takes 4096 to 131072).
MINIMUM_PEER_MAXIMUM_LENGTH = 256

_UINT32_MAX = 0xFFFF_FFFF
_UINT16_MAX = 0xFFFF


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NegotiatedContext:
    """One accepted presentation context, PS3.8 §7.1.1.13-14 and PS3.7 D.3.3.4.

    ``requestor_scu``/``requestor_scp`` are the roles the association
    *requestor* plays for this abstract syntax; the acceptor plays the
    complementary ones (acceptor SCP if the requestor is SCU, acceptor SCU if
    the requestor is SCP). Without role selection the requestor is SCU only.
    Both may be false when the requestor proposed only the SCP role and the
    acceptor turned it down: the context is accepted but no DIMSE service may
    use it.
    """

    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    requestor_scu: bool = True
    requestor_scp: bool = False

    def __post_init__(self) -> None:
        if not _valid_context_id(self.context_id):
            raise LocalProtocolError(
                f"presentation context ID must be odd, 1-255 (PS3.8 §9.3.2.2), "
                f"got {self.context_id}"
            )
        # The UIDs may come from the peer: required, but not policed here.
        if not self.abstract_syntax or not self.transfer_syntax:
            raise LocalProtocolError("a negotiated context names its abstract and transfer syntax")

    @property
    def acceptor_scu(self) -> bool:
        """The acceptor is SCU exactly when the requestor is SCP (PS3.7 D.3.3.4)."""
        return self.requestor_scp

    @property
    def acceptor_scp(self) -> bool:
        """The acceptor is SCP exactly when the requestor is SCU (PS3.7 D.3.3.4)."""
        return self.requestor_scu


@dataclass(frozen=True, slots=True, kw_only=True)
class AcceptorPolicy:
    """What the acceptor user accepts; the input of :func:`negotiate`.

    AE titles are compared exactly after stripping the space padding that is
    not significant (PS3.8 §9.3.2): DICOM AE titles are case-sensitive, so
    ``"ROUTER"`` does not match ``"router"``.

    - ``ae_titles``: called AE titles we answer to; ``None`` = any.
    - ``calling_ae_titles``: calling AE titles allowed in; ``None`` = any.
    - ``abstract_syntaxes``: SOP class UID -> transfer syntaxes accepted for it.
      A value of ``None`` means "use ``transfer_syntaxes``". The whole mapping
      ``None`` accepts every abstract syntax, each with ``transfer_syntaxes``.
    - ``transfer_syntaxes``: the default transfer syntax list, used wherever
      the abstract syntax has no list of its own. ``None`` = any transfer
      syntax the requestor proposes (a router forwards bytes it does not
      decode, so "whatever the sender has" is a sensible default).
    - ``prefer_requestor_order``: pick the first *proposed* transfer syntax we
      accept (PS3.8 leaves the choice to the acceptor); else the first of *our*
      list that was proposed. With no list of ours, the requestor's order.
    - ``accept_scp_role``: accept a requestor's proposal to be SCP (C-GET
      needs it, PS3.4 C.4.3); the requestor's SCU role is always accepted.
    - ``maximum_length``: our maximum PDU receive length (PS3.8 Annex D.1).
    - ``reject_if_no_context``: reject the association (user, no reason) when
      no presentation context could be accepted, rather than accept an
      association that cannot carry a single message.
    """

    ae_titles: frozenset[str] | None = None
    calling_ae_titles: frozenset[str] | None = None
    abstract_syntaxes: Mapping[str, tuple[str, ...] | None] | None = None
    transfer_syntaxes: tuple[str, ...] | None = None
    prefer_requestor_order: bool = True
    accept_scp_role: bool = True
    maximum_length: int = DEFAULT_MAXIMUM_LENGTH
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID
    implementation_version_name: str | None = IMPLEMENTATION_VERSION_NAME
    reject_if_no_context: bool = True

    def __post_init__(self) -> None:
        # Normalise to immutable, unpadded values so that a policy, once built,
        # can be shared between associations and never changes under them.
        if self.ae_titles is not None:
            object.__setattr__(self, "ae_titles", _ae_title_set(self.ae_titles, "ae_titles"))
        if self.calling_ae_titles is not None:
            object.__setattr__(
                self,
                "calling_ae_titles",
                _ae_title_set(self.calling_ae_titles, "calling_ae_titles"),
            )
        if self.transfer_syntaxes is not None:
            object.__setattr__(
                self, "transfer_syntaxes", _uid_tuple(self.transfer_syntaxes, "transfer_syntaxes")
            )
        if self.abstract_syntaxes is not None:
            frozen: dict[str, tuple[str, ...] | None] = {}
            for uid, syntaxes in self.abstract_syntaxes.items():
                _check_uid(uid, "abstract syntax")
                frozen[uid] = (
                    None if syntaxes is None else _uid_tuple(syntaxes, f"syntaxes of {uid}")
                )
            object.__setattr__(self, "abstract_syntaxes", types.MappingProxyType(frozen))
        _check_maximum_length(self.maximum_length)
        _check_uid(self.implementation_class_uid, "implementation class UID")
        if self.implementation_version_name is not None:
            _check_version_name(self.implementation_version_name)


# ---------------------------------------------------------------------------
# Acceptor side
# ---------------------------------------------------------------------------


def provider_check(rq: AAssociateRQ) -> AAssociateRJ | None:
    """What the service provider rejects in AE-6 (PS3.8 Table 9-6), or ``None``.

    PS3.8 §9.3.2: the protocol version field has one bit per version and a
    receiver implementing version 1 "shall only test that bit 0 is set". If it
    is not, the request is rejected permanently with source "service-provider
    (ACSE related function)" and reason "protocol-version-not-supported"
    (PS3.8 §9.3.4, Table 9-21; §7.1.2.6: the indication is not issued).
    """
    if not rq.protocol_version & 0x0001:
        return AAssociateRJ(
            result=RejectResult.REJECTED_PERMANENT,
            source=RejectSource.SERVICE_PROVIDER_ACSE,
            reason=ACSE_PROTOCOL_VERSION_NOT_SUPPORTED,
        )
    return None


def negotiate(rq: AAssociateRQ, policy: AcceptorPolicy) -> AAssociateAC | AAssociateRJ:
    """The acceptor user's answer to an A-ASSOCIATE indication; see
    :func:`negotiate_explained`."""
    return negotiate_explained(rq, policy)[0]


def negotiate_explained(rq: AAssociateRQ,
                        policy: AcceptorPolicy) -> tuple[AAssociateAC | AAssociateRJ, str]:
    """The acceptor user's answer to an A-ASSOCIATE indication, with why it is a
    rejection, in words for the log ("" for an acceptance).

    Checked in this order, the first failure giving a permanent rejection with
    source "service-user" (PS3.8 §9.3.4, Table 9-21):

    1. application context name other than the DICOM one (PS3.7 Annex A.2.1)
       -> application-context-name-not-supported;
    2. called AE title not one of ``policy.ae_titles``
       -> called-AE-title-not-recognized;
    3. calling AE title not one of ``policy.calling_ae_titles``
       -> calling-AE-title-not-recognized;
    4. a maximum PDU length (other than 0, no limit) under
       :data:`MINIMUM_PEER_MAXIMUM_LENGTH` -> no-reason-given;
    5. every presentation context gets one result (PS3.8 §7.1.1.14: "a one to
       one correspondence"), see :func:`_negotiate_context`; when none is
       accepted and ``policy.reject_if_no_context`` -> no-reason-given.

    The AC echoes the RQ's AE titles (PS3.8 §9.3.3: reserved, "shall be sent
    with a value identical to" the RQ's) and application context, and carries
    our user information: maximum length, implementation class UID and version
    name (PS3.7 D.3.3.1-2), role selection answers (D.3.3.4), and an
    asynchronous operations window of 1/1 if the RQ proposed one (D.3.3.3: we
    perform operations one at a time). SOP class extended and common extended
    negotiation are not answered (D.3.3.5-6: no answer means not supported),
    nor is user identity (D.3.3.7: no positive response is given).
    """
    if rq.application_context_name != DICOM_APPLICATION_CONTEXT:
        return (_user_reject(RejectReason.USER_APPLICATION_CONTEXT_NOT_SUPPORTED),
                f"application context {rq.application_context_name!r} is not DICOM's")
    if policy.ae_titles is not None and _ae(rq.called_ae_title) not in policy.ae_titles:
        return (_user_reject(RejectReason.USER_CALLED_AE_NOT_RECOGNIZED),
                f"called AE title {_ae(rq.called_ae_title)!r} is not ours")
    if (
        policy.calling_ae_titles is not None
        and _ae(rq.calling_ae_title) not in policy.calling_ae_titles
    ):
        return (_user_reject(RejectReason.USER_CALLING_AE_NOT_RECOGNIZED),
                f"calling AE title {_ae(rq.calling_ae_title)!r} is not allowed")
    maximum = rq.user_information.maximum_length
    if maximum is not None and 0 < maximum.maximum_length < MINIMUM_PEER_MAXIMUM_LENGTH:
        return (_user_reject(RejectReason.USER_NO_REASON),
                f"maximum PDU length {maximum.maximum_length} is under "
                f"{MINIMUM_PEER_MAXIMUM_LENGTH} bytes")

    results: list[PresentationContextAC] = []
    seen_ids: set[int] = set()
    # SOP classes whose instances the requestor takes as SCP (C-GET sub-operations).
    scp_role = {sop for sop, role in _role_items(rq).items()
                if role.scp_role and policy.accept_scp_role}
    for ctx in rq.presentation_contexts:
        if ctx.context_id in seen_ids or not _valid_context_id(ctx.context_id):
            # PS3.8 §7.1.1.13 makes unique IDs the requestor's duty and says
            # nothing of what the acceptor does; every item still needs a
            # result (§7.1.1.14), so the repeat is refused with "no-reason
            # (provider rejection)" and the first item with that ID stands.
            # An ID that is not odd 1-255 (§9.3.2.2) is refused the same way.
            results.append(
                PresentationContextAC(
                    context_id=ctx.context_id,
                    result=PresentationContextResult.NO_REASON,
                    transfer_syntax=None,
                )
            )
            continue
        seen_ids.add(ctx.context_id)
        results.append(_negotiate_context(ctx, policy,
                                          retrieval=ctx.abstract_syntax in scp_role))

    accepted_abstract = {
        ctx.abstract_syntax
        for ctx, result in zip(rq.presentation_contexts, results, strict=True)
        if result.result is PresentationContextResult.ACCEPTANCE
    }
    if not accepted_abstract and policy.reject_if_no_context:
        return _user_reject(RejectReason.USER_NO_REASON), _none_accepted(rq, results)

    items: list[UserInformationSubItem] = [
        MaximumLength(maximum_length=policy.maximum_length),
        ImplementationClassUID(uid=policy.implementation_class_uid),
    ]
    if _first(rq, AsynchronousOperationsWindow) is not None:
        items.append(AsynchronousOperationsWindow(max_operations_invoked=1,
                                                  max_operations_performed=1))
    for role in _role_items(rq).values():
        if role.sop_class_uid in accepted_abstract:
            # PS3.7 D.3.3.4: keep (1) or turn down (0) each proposed role,
            # never return 1 for a role that was not proposed.
            items.append(
                SCPSCURoleSelection(
                    sop_class_uid=role.sop_class_uid,
                    scu_role=role.scu_role,
                    scp_role=role.scp_role and policy.accept_scp_role,
                )
            )
    if policy.implementation_version_name is not None:
        items.append(ImplementationVersionName(name=policy.implementation_version_name))

    return AAssociateAC(
        called_ae_title=rq.called_ae_title,
        calling_ae_title=rq.calling_ae_title,
        application_context_name=rq.application_context_name,
        presentation_contexts=tuple(results),
        user_information=UserInformation(items=tuple(items)),
        # PS3.8 Table 9-17: bytes 11-74 go back as the RQ had them (not tested there).
        echoed=rq.fixed_fields,
    ), ""


def _none_accepted(rq: AAssociateRQ, results: Sequence[PresentationContextAC]) -> str:
    """Why no presentation context was accepted, naming the first refused one."""
    if not rq.presentation_contexts:
        return "no presentation context proposed"
    first, result = rq.presentation_contexts[0], results[0].result
    why = {
        PresentationContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED: "SOP class not accepted",
        PresentationContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED:
            "none of its transfer syntaxes accepted",
    }.get(result, "refused")
    return (f"none of {len(rq.presentation_contexts)} presentation contexts accepted "
            f"(first: {first.abstract_syntax}, {why})")


def context_for_instance(contexts: Iterable[NegotiatedContext], sop_class: str,
                         transfer_syntax: str) -> NegotiatedContext | None:
    """Among accepted ``contexts`` (the caller's role), the one to send an instance
    of ``sop_class`` held in ``transfer_syntax`` in: one in that syntax (sent as it
    is), else, for a native syntax, one in another native syntax, the instance then
    converted (PS3.5 10.1: Implicit VR Little Endian is what every node takes, not
    every node takes what we hold). Among other native syntaxes, Explicit VR Little
    Endian comes first, then Implicit, and the retired Explicit VR Big Endian
    (PS3.5 A.3) only when nothing else is accepted."""
    others: list[NegotiatedContext] = []
    for ctx in contexts:
        if ctx.abstract_syntax != sop_class:
            continue
        if ctx.transfer_syntax == transfer_syntax:
            return ctx
        if is_uncompressed(ctx.transfer_syntax) and is_uncompressed(transfer_syntax):
            others.append(ctx)
    return min(others, key=lambda c: _CONVERSION_PREFERENCE.get(c.transfer_syntax, 3),
               default=None)


# Which native syntax to convert to, best first (see context_for_instance).
_CONVERSION_PREFERENCE: Final = {"1.2.840.10008.1.2.1": 0, "1.2.840.10008.1.2": 1,
                                 "1.2.840.10008.1.2.2": 2}


def _negotiate_context(ctx: PresentationContextRQ, policy: AcceptorPolicy, *,
                       retrieval: bool = False) -> PresentationContextAC:
    """One presentation context result, PS3.8 §9.3.3.2 Table 9-18 / PS3.7 D.3.2.

    ``retrieval``: the requestor takes the SCP role for this SOP class, so we will
    send it instances that come from elsewhere (a C-GET's upstream) in whatever
    syntax is there. A native syntax, if proposed, is then chosen first, whatever
    the order: any native instance can be converted to it, and upstreams can
    produce one; a compressed one is taken only if nothing else is proposed."""
    if ctx.malformed:
        # Sub-items that are not UIDs (kept by the decoder): an abstract syntax
        # we cannot know is "not supported"; bad transfer syntaxes never match.
        if "abstract syntax" in ctx.malformed:
            return PresentationContextAC(
                context_id=ctx.context_id,
                result=PresentationContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED,
                transfer_syntax=None,
            )
        valid = tuple(ts for ts in ctx.transfer_syntaxes if _is_uid(ts))
        if not valid:
            return PresentationContextAC(
                context_id=ctx.context_id,
                result=PresentationContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED,
                transfer_syntax=None,
            )
        ctx = PresentationContextRQ(context_id=ctx.context_id,
                                    abstract_syntax=ctx.abstract_syntax, transfer_syntaxes=valid)
    if policy.abstract_syntaxes is None:
        ours = policy.transfer_syntaxes
    elif ctx.abstract_syntax in policy.abstract_syntaxes:
        listed = policy.abstract_syntaxes[ctx.abstract_syntax]
        ours = policy.transfer_syntaxes if listed is None else listed
    else:
        return PresentationContextAC(
            context_id=ctx.context_id,
            result=PresentationContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED,
            transfer_syntax=None,
        )
    proposed = ctx.transfer_syntaxes
    if retrieval:
        proposed = (*(ts for ts in proposed if is_uncompressed(ts)),
                    *(ts for ts in proposed if not is_uncompressed(ts)))
    chosen = _choose_transfer_syntax(proposed, ours,
                                     policy.prefer_requestor_order or retrieval)
    if chosen is None:
        return PresentationContextAC(
            context_id=ctx.context_id,
            result=PresentationContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED,
            transfer_syntax=None,
        )
    return PresentationContextAC(
        context_id=ctx.context_id,
        result=PresentationContextResult.ACCEPTANCE,
        transfer_syntax=chosen,
    )


def _is_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isdigit() or c == "." for c in value)


def _choose_transfer_syntax(
    proposed: Sequence[str], ours: tuple[str, ...] | None, prefer_requestor: bool
) -> str | None:
    """Exactly one transfer syntax per accepted context (PS3.8 §7.1.1.14). With no
    list of ours, the requestor's first of the standard's: a private or unknown
    transfer syntax names an encoding nobody here can read, so a data set in it
    could be neither checked nor routed by its attributes (PS3.8 §9.3.3.2: the
    acceptor accepts only what it supports)."""
    if ours is None:
        return next((ts for ts in proposed if is_standard_transfer_syntax(ts)), None)
    if prefer_requestor:
        return next((ts for ts in proposed if ts in ours), None)
    return next((ts for ts in ours if ts in proposed), None)


def _user_reject(reason: RejectReason) -> AAssociateRJ:
    return AAssociateRJ(
        result=RejectResult.REJECTED_PERMANENT,
        source=RejectSource.SERVICE_USER,
        reason=int(reason),
    )


# ---------------------------------------------------------------------------
# Both sides
# ---------------------------------------------------------------------------


def accepted_contexts(rq: AAssociateRQ, ac: AAssociateAC) -> dict[int, NegotiatedContext]:
    """The presentation contexts an RQ/AC pair agreed on, keyed by context ID.

    Only AC items with result "acceptance" whose ID was proposed in the RQ
    count, with the abstract syntax of the first RQ item bearing that ID and
    the transfer syntax the acceptor chose. An accepted item naming no
    transfer syntax, or one the requestor never proposed for that context, is
    not usable and is left out (PS3.8 §7.1.1.14: the acceptor picks one of the
    offered transfer syntaxes).

    Roles (PS3.7 D.3.3.4): with no RQ role item for the SOP class, or no AC
    answer to it, the requestor is SCU and the acceptor SCP. Otherwise each
    role the requestor proposed (1) holds if the acceptor returned 1 too; a
    role the requestor did not propose never holds, whatever the AC says
    ("the Association-requestor shall ignore the response if it has not
    proposed the role").
    """
    proposed: dict[int, PresentationContextRQ] = {}
    for item in rq.presentation_contexts:
        proposed.setdefault(item.context_id, item)
    rq_roles = _role_items(rq)
    ac_roles = _role_items(ac)

    out: dict[int, NegotiatedContext] = {}
    for ac_ctx in ac.presentation_contexts:
        if ac_ctx.result != PresentationContextResult.ACCEPTANCE or ac_ctx.context_id in out:
            continue
        rq_ctx = proposed.get(ac_ctx.context_id)
        chosen = ac_ctx.transfer_syntax
        if rq_ctx is None or chosen is None or chosen not in rq_ctx.transfer_syntaxes:
            continue
        asked = rq_roles.get(rq_ctx.abstract_syntax)
        answered = ac_roles.get(rq_ctx.abstract_syntax)
        if asked is None or answered is None:
            scu, scp = True, False
        else:
            scu = asked.scu_role and answered.scu_role
            scp = asked.scp_role and answered.scp_role
        out[ac_ctx.context_id] = NegotiatedContext(
            context_id=ac_ctx.context_id,
            abstract_syntax=rq_ctx.abstract_syntax,
            transfer_syntax=chosen,
            requestor_scu=scu,
            requestor_scp=scp,
        )
    return out


# ---------------------------------------------------------------------------
# Requestor side
# ---------------------------------------------------------------------------


def build_request(
    *,
    calling_ae_title: str,
    called_ae_title: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    maximum_length: int = DEFAULT_MAXIMUM_LENGTH,
    roles: Mapping[str, tuple[bool, bool]] | None = None,
    user_identity: UserIdentityRQ | None = None,
    async_ops: tuple[int, int] | None = None,
    extended: Sequence[SOPClassExtendedNegotiation] = (),
    common_extended: Sequence[SOPClassCommonExtendedNegotiation] = (),
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID,
    implementation_version_name: str | None = IMPLEMENTATION_VERSION_NAME,
) -> AAssociateRQ:
    """An A-ASSOCIATE-RQ proposing ``contexts`` in order, PS3.8 §9.3.2.

    ``contexts`` is a list of (abstract syntax, transfer syntaxes); a SOP class
    may appear more than once, e.g. one context per transfer syntax (PS3.8
    §7.1.1.13, note: "a separate and distinctly identified presentation
    context will be generated for each occurrence"). IDs are assigned 1, 3,
    5, ... in order; at most 128 contexts fit (PS3.8 §9.3.2.2: odd, 1-255).

    ``roles`` maps a SOP class UID to the (SCU, SCP) roles we propose to play
    (PS3.7 D.3.3.4); at least one must be true, and the SOP class must be one
    of the proposed abstract syntaxes. ``async_ops`` is (maximum invoked,
    maximum performed) for the asynchronous operations window (D.3.3.3).

    Sub-items are written in item-type order (0x51 ... 0x58), as PS3.7 D.3.3
    lists them. Invalid arguments raise :class:`LocalProtocolError`.
    """
    calling = _check_ae_title(calling_ae_title, "calling AE title")
    called = _check_ae_title(called_ae_title, "called AE title")
    if not contexts:
        raise LocalProtocolError("an A-ASSOCIATE-RQ proposes at least one presentation context")
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise LocalProtocolError(
            f"{len(contexts)} presentation contexts proposed; at most "
            f"{MAX_PRESENTATION_CONTEXTS} fit (odd IDs 1-255, PS3.8 §9.3.2.2)"
        )
    pcs: list[PresentationContextRQ] = []
    for index, (abstract_syntax, transfer_syntaxes) in enumerate(contexts):
        _check_uid(abstract_syntax, "abstract syntax")
        if isinstance(transfer_syntaxes, str):
            raise LocalProtocolError(
                f"transfer syntaxes for {abstract_syntax} must be a sequence of UIDs, not a str"
            )
        syntaxes = _uid_tuple(transfer_syntaxes, f"transfer syntaxes of {abstract_syntax}")
        pcs.append(
            PresentationContextRQ(
                context_id=2 * index + 1,
                abstract_syntax=abstract_syntax,
                transfer_syntaxes=syntaxes,
            )
        )

    _check_maximum_length(maximum_length)
    _check_uid(implementation_class_uid, "implementation class UID")
    items: list[UserInformationSubItem] = [
        MaximumLength(maximum_length=maximum_length),
        ImplementationClassUID(uid=implementation_class_uid),
    ]
    if async_ops is not None:
        invoked, performed = async_ops
        for value in (invoked, performed):
            if not 0 <= value <= _UINT16_MAX:
                raise LocalProtocolError(
                    f"asynchronous operations window values are 0-65535, got {async_ops}"
                )
        items.append(AsynchronousOperationsWindow(max_operations_invoked=invoked,
                                                  max_operations_performed=performed))
    if roles:
        abstract = {pc.abstract_syntax for pc in pcs}
        for sop_class_uid, (scu, scp) in roles.items():
            if sop_class_uid not in abstract:
                raise LocalProtocolError(
                    f"role selection for {sop_class_uid}, which no presentation context proposes"
                )
            if not (scu or scp):
                raise LocalProtocolError(
                    f"role selection for {sop_class_uid} proposes neither SCU nor SCP "
                    "(PS3.7 D.3.3.4)"
                )
            items.append(SCPSCURoleSelection(sop_class_uid=sop_class_uid,
                                             scu_role=bool(scu), scp_role=bool(scp)))
    if implementation_version_name is not None:
        _check_version_name(implementation_version_name)
        items.append(ImplementationVersionName(name=implementation_version_name))
    items.extend(extended)
    items.extend(common_extended)
    if user_identity is not None:
        items.append(user_identity)

    return AAssociateRQ(
        called_ae_title=called,
        calling_ae_title=calling,
        presentation_contexts=tuple(pcs),
        user_information=UserInformation(items=tuple(items)),
    )


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _ae(title: str) -> str:
    # Leading and trailing spaces (20H) are not significant (PS3.8 §9.3.2).
    return title.strip(" ")


def _check_ae_title(title: str, what: str) -> str:
    """An AE title as PS3.5 Table 6.2-1 (AE) allows it; returns it unpadded."""
    stripped = _ae(title)
    if not 1 <= len(stripped) <= 16:
        raise LocalProtocolError(f"{what} must be 1-16 characters, got {title!r}")
    if not stripped.isascii() or not stripped.isprintable() or "\\" in stripped:
        raise LocalProtocolError(
            f"{what} must be printable ISO 646 characters without backslash, got {title!r}"
        )
    return stripped


def _ae_title_set(titles: frozenset[str] | set[str], what: str) -> frozenset[str]:
    if isinstance(titles, str):
        raise LocalProtocolError(f"{what} must be a set of AE titles, not a str")
    return frozenset(_check_ae_title(title, what) for title in titles)


def _check_uid(uid: str, what: str) -> None:
    # PS3.5 §9.1: digits and dots, at most 64 characters.
    if not isinstance(uid, str) or not uid or len(uid) > 64 or uid.strip("0123456789."):
        raise LocalProtocolError(f"{what} is not a UID: {uid!r}")


def _uid_tuple(uids: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(uids, str):
        raise LocalProtocolError(f"{what} must be a sequence of UIDs, not a str")
    out = tuple(uids)
    if not out:
        raise LocalProtocolError(f"{what} must list at least one transfer syntax")
    for uid in out:
        _check_uid(uid, what)
    return out


def _valid_context_id(context_id: int) -> bool:
    return 1 <= context_id <= 255 and context_id % 2 == 1


def _check_maximum_length(value: int) -> None:
    if not 0 <= value <= _UINT32_MAX:
        raise LocalProtocolError(f"maximum length must fit 32 bits (PS3.8 D.1), got {value}")


def _check_version_name(name: str) -> None:
    if not 1 <= len(name) <= 16 or not name.isascii():
        raise LocalProtocolError(
            f"implementation version name must be 1-16 characters (PS3.7 D.3.3.2), got {name!r}"
        )


_T = TypeVar("_T")


def _first(pdu: AAssociateRQ | AAssociateAC, kind: type[_T]) -> _T | None:
    return next((item for item in pdu.user_information.items if isinstance(item, kind)), None)


def _role_items(pdu: AAssociateRQ | AAssociateAC) -> dict[str, SCPSCURoleSelection]:
    """Role selection items by SOP class; PS3.7 D.3.3.4 allows one each, first wins."""
    out: dict[str, SCPSCURoleSelection] = {}
    for item in pdu.user_information.items:
        if isinstance(item, SCPSCURoleSelection):
            out.setdefault(item.sop_class_uid, item)
    return out
