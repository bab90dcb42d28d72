"""Upper-layer PDUs and their items, PS3.8 §9.3 — data model and codec.

Theory of operation
-------------------
Every PDU and item is a frozen dataclass, validated when built, so an invalid
value never reaches the wire. ``encode_pdu(pdu) -> bytes`` writes one PDU;
:class:`PDUReader` is the receive buffer: ``feed(data)`` appends bytes and
``next_pdu()`` returns the next complete PDU or ``None`` when more bytes are
needed. The reader caps every PDU's length *before* buffering its body, so a
peer cannot make us allocate from an unchecked length field.

P-DATA-TF is on the hot path: ``PDataTF.pdvs`` hold ``memoryview``s into the
received PDU (no copy), and ``encode_pdata_chunks`` returns the header bytes and
the caller's payload buffers as a list for scatter-gather sending (no copy).

Unknown item types in variable fields are skipped, as PS3.8 §9.3 asks
("Items of unrecognized types shall be ignored and skipped"); those met in an
A-ASSOCIATE's variable field or in a user information item are kept as
:class:`UnknownItem` so a proxy can see them (unknown sub-items of a
presentation context item are dropped). Malformed input raises
:class:`~router.dicom.errors.PDUDecodeError` naming the field and offset
(``"A-ASSOCIATE-RQ.presentation_context[2].transfer_syntax"``, bytes from the
start of the PDU); nothing else escapes ``decode_pdu`` or ``PDUReader``.

Decoding is strict where the standard is clear and tolerant where it says so:

- reserved fields are never tested ("sent with a value 00H but not tested to
  this value when received", every table of PS3.8 §9.3);
- the AE title fields of an A-ASSOCIATE-AC are not tested (§9.3.3, Table 9-17);
- the transfer syntax sub-item of a presentation context that was not accepted
  is not tested (§9.3.3.2, Table 9-18) and may be missing or empty;
- UIDs are sent unpadded (PS3.8 Annex F); trailing NULs or spaces from lax peers
  are stripped on receipt;
- a user information item without a maximum length sub-item is accepted
  (``UserInformation.maximum_length`` is then ``None``: treat as no limit).

Construction of an item with a value the standard forbids raises
:class:`PDUValueError` (a :class:`~router.dicom.errors.LocalProtocolError` and a
``ValueError``); so does encoding a PDU whose items overflow their length fields.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, NoReturn, TypeAlias, TypeVar

from router.dicom.errors import AbortReason, AbortSource, LocalProtocolError, PDUDecodeError

__all__ = [
    "ACSE_NO_REASON",
    "ACSE_PROTOCOL_VERSION_NOT_SUPPORTED",
    "DICOM_APPLICATION_CONTEXT",
    "PDU",
    "PDV",
    "PRESENTATION_LOCAL_LIMIT_EXCEEDED",
    "PRESENTATION_TEMPORARY_CONGESTION",
    "AAbort",
    "AAssociateAC",
    "AAssociateRJ",
    "AAssociateRQ",
    "AReleaseRP",
    "AReleaseRQ",
    "AsynchronousOperationsWindow",
    "ImplementationClassUID",
    "ImplementationVersionName",
    "ItemType",
    "MaximumLength",
    "PDUReader",
    "PDUType",
    "PDUValueError",
    "PDataTF",
    "PresentationContextAC",
    "PresentationContextRQ",
    "PresentationContextResult",
    "RejectReason",
    "RejectResult",
    "RejectSource",
    "SCPSCURoleSelection",
    "SOPClassCommonExtendedNegotiation",
    "SOPClassExtendedNegotiation",
    "UnknownItem",
    "UserIdentityAC",
    "UserIdentityRQ",
    "UserIdentityType",
    "UserInformation",
    "UserInformationSubItem",
    "decode_pdu",
    "encode_pdata_chunks",
    "encode_pdu",
    "reject_meaning",
    "single_pdv_header",
]


# PDU types, PS3.8 §9.3.1 Table 9-1 (and §9.3.2-§9.3.8).
class PDUType(enum.IntEnum):
    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


# Item types, PS3.8 §9.3.2.x / Annex D (user information sub-items).
class ItemType(enum.IntEnum):
    APPLICATION_CONTEXT = 0x10
    PRESENTATION_CONTEXT_RQ = 0x20
    PRESENTATION_CONTEXT_AC = 0x21
    ABSTRACT_SYNTAX = 0x30
    TRANSFER_SYNTAX = 0x40
    USER_INFORMATION = 0x50
    MAXIMUM_LENGTH = 0x51
    IMPLEMENTATION_CLASS_UID = 0x52
    ASYNCHRONOUS_OPERATIONS_WINDOW = 0x53
    SCP_SCU_ROLE_SELECTION = 0x54
    IMPLEMENTATION_VERSION_NAME = 0x55
    SOP_CLASS_EXTENDED_NEGOTIATION = 0x56
    SOP_CLASS_COMMON_EXTENDED_NEGOTIATION = 0x57
    USER_IDENTITY_RQ = 0x58
    USER_IDENTITY_AC = 0x59


DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


class PresentationContextResult(enum.IntEnum):
    """Presentation context AC item result/reason, PS3.8 §9.3.3.2 Table 9-18."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2  # provider rejection
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3  # provider rejection
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4  # provider rejection


class RejectResult(enum.IntEnum):
    """A-ASSOCIATE-RJ result, PS3.8 §9.3.4 Table 9-21."""

    REJECTED_PERMANENT = 1
    REJECTED_TRANSIENT = 2


class RejectSource(enum.IntEnum):
    """A-ASSOCIATE-RJ source, PS3.8 §9.3.4 Table 9-21."""

    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


class RejectReason(enum.IntEnum):
    """A-ASSOCIATE-RJ reason/diag, PS3.8 §9.3.4 Table 9-21.

    The meaning depends on the source; the values overlap, so these names carry
    the source they belong to.
    """

    # source 1: service user
    USER_NO_REASON = 1
    USER_APPLICATION_CONTEXT_NOT_SUPPORTED = 2
    USER_CALLING_AE_NOT_RECOGNIZED = 3
    USER_CALLED_AE_NOT_RECOGNIZED = 7
    # source 2: service provider (ACSE)
    # ACSE_NO_REASON = 1, ACSE_PROTOCOL_VERSION_NOT_SUPPORTED = 2 (same values)
    # source 3: service provider (presentation)
    # PRESENTATION_TEMPORARY_CONGESTION = 1, PRESENTATION_LOCAL_LIMIT_EXCEEDED = 2


ACSE_NO_REASON = 1
ACSE_PROTOCOL_VERSION_NOT_SUPPORTED = 2
PRESENTATION_TEMPORARY_CONGESTION = 1
PRESENTATION_LOCAL_LIMIT_EXCEEDED = 2

# Reason/diag values Table 9-21 allows for each source, reserved ones included
# (the standard lists them, so a peer may send them).
_REJECT_REASONS: dict[int, range] = {
    RejectSource.SERVICE_USER: range(1, 11),
    RejectSource.SERVICE_PROVIDER_ACSE: range(1, 3),
    RejectSource.SERVICE_PROVIDER_PRESENTATION: range(0, 8),
}


# The meaning of each reason/diag value, by source (PS3.8 §9.3.4 Table 9-21).
_REJECT_MEANINGS: Final[dict[int, dict[int, str]]] = {
    RejectSource.SERVICE_USER: {1: "no reason given",
                                2: "application context name not supported",
                                3: "calling AE title not recognized",
                                7: "called AE title not recognized"},
    RejectSource.SERVICE_PROVIDER_ACSE: {1: "no reason given",
                                         2: "protocol version not supported"},
    RejectSource.SERVICE_PROVIDER_PRESENTATION: {1: "temporary congestion",
                                                 2: "local limit exceeded"},
}


def reject_meaning(source: int, reason: int) -> str:
    """What an A-ASSOCIATE-RJ's source and reason/diag say, in words (Table 9-21):
    an operator reads "called AE title not recognized", not "source 1, reason 7"."""
    return _REJECT_MEANINGS.get(source, {}).get(reason, "a reserved reason")


class UserIdentityType(enum.IntEnum):
    """User identity RQ sub-item type, PS3.7 Annex D.3.3.7.1 Table D.3-14."""

    USERNAME = 1
    USERNAME_AND_PASSCODE = 2
    KERBEROS = 3
    SAML = 4
    JWT = 5


class PDUValueError(LocalProtocolError, ValueError):
    """A PDU or item was given a value PS3.8 / PS3.7 Annex D does not allow.

    Raised when an item is built (``__post_init__``) or when a PDU is encoded
    and an item overflows its length field. Both a ``LocalProtocolError`` and a
    ``ValueError``. ``decode_pdu`` never lets it escape: it becomes a
    :class:`~router.dicom.errors.PDUDecodeError`.
    """


# ---------------------------------------------------------------------------
# Validation helpers (construction side)
# ---------------------------------------------------------------------------

# PS3.8 Annex F / PS3.5 §9.1: digits and '.', at most 64 characters.
_UID_RE = re.compile(r"[0-9.]{1,64}")
# PS3.8 Table 9-11 / PS3.5 AE: ISO 646 G0 without '\', 16 bytes, space padded.
_AE_RE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
# A-ASSOCIATE-AC AE fields are not tested (Table 9-17): printable, may be empty.
_AE_AC_RE = re.compile(r"[\x20-\x7e]{0,16}")
# PS3.7 D.3.3.2: 1 to 16 ISO 646 (basic G0 set) characters.
_VERSION_NAME_RE = re.compile(r"[\x20-\x7e]{1,16}")

_MAX_U8 = 0xFF
_MAX_U16 = 0xFFFF
_MAX_U32 = 0xFFFFFFFF
# Item counts in an A-ASSOCIATE-RQ/AC beyond which it is refused as invalid: far above
# what any real node sends, low enough that decoding one costs milliseconds.
#: Presentation contexts: IDs are odd integers 1-255 (PS3.8 9.3.2.2), so 128 at most.
MAX_PRESENTATION_CONTEXT_ITEMS: Final = 128
#: Items of the variable field: the contexts, application context, user information
#: and items of unknown types, which are skipped (PS3.8 9.3.1).
MAX_ASSOCIATE_ITEMS: Final = 256
#: Sub-items of one presentation context: its abstract syntax and transfer syntaxes
#: (PS3.5 Annex A defines some 70; storescu proposes at most a few dozen).
MAX_CONTEXT_SUB_ITEMS: Final = 256
#: User information sub-items (PS3.7 Annex D.3.3): role selection and extended
#: negotiation are one per SOP class.
MAX_USER_SUB_ITEMS: Final = 1024

_T = TypeVar("_T")


def _fail_value(message: str) -> NoReturn:
    raise PDUValueError(message)


def _check_uint(value: object, maximum: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        _fail_value(f"{what} must be an integer in 0..{maximum}, got {value!r}")


def _check_bool(value: object, what: str) -> None:
    if not isinstance(value, bool):
        _fail_value(f"{what} must be a bool, got {value!r}")


def _check_uid(value: object, what: str) -> None:
    if not isinstance(value, str) or _UID_RE.fullmatch(value) is None:
        _fail_value(f"{what} must be a UID of 1-64 digits and '.' (PS3.8 Annex F), got {value!r}")


def _check_bytes(value: object, maximum: int, what: str) -> None:
    if not isinstance(value, bytes):
        _fail_value(f"{what} must be bytes, got {type(value).__name__}")
    if len(value) > maximum:
        _fail_value(f"{what} is {len(value)} bytes, at most {maximum} fit its length field")


def _check_context_id(value: object, what: str) -> None:
    # PS3.8 §9.3.2.2 / §9.3.5.1: odd integers between 1 and 255.
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not (1 <= value <= 255)
        or not (value & 1)
    ):
        _fail_value(f"{what} must be an odd integer in 1..255, got {value!r}")


def _check_ae_title(value: object, what: str) -> None:
    if not isinstance(value, str) or _AE_RE.fullmatch(value) is None or value.strip(" ") != value:
        _fail_value(
            f"{what} must be 1-16 ISO 646 characters without '\\' or control characters, "
            f"not all spaces, without leading/trailing spaces (PS3.8 Table 9-11), got {value!r}"
        )


def _as_tuple(obj: object, attr: str, kind: type | tuple[type, ...], what: str) -> None:
    """Coerce a sequence field to a tuple and type-check its members (frozen-safe)."""
    value = getattr(obj, attr)
    if type(value) is tuple:
        # Fast path (every decoded PDU): no ABC look-up, same member check.
        for member in value:
            if not isinstance(member, kind):
                _fail_value(f"{what} may not contain {type(member).__name__}")
        return
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        _fail_value(f"{what} must be a tuple, got {type(value).__name__}")
    if not isinstance(value, tuple):
        value = tuple(value)
        object.__setattr__(obj, attr, value)
    for member in value:
        if not isinstance(member, kind):
            _fail_value(f"{what} may not contain {type(member).__name__}")


def _coerce_enum(obj: object, attr: str, enum_type: type[enum.IntEnum], what: str) -> None:
    value = getattr(obj, attr)
    if isinstance(value, enum_type):
        return
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            object.__setattr__(obj, attr, enum_type(value))
            return
        except ValueError:
            pass
    allowed = ", ".join(f"{m.value} ({m.name})" for m in enum_type)
    _fail_value(f"{what} must be one of {allowed}; got {value!r}")


# ---------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class UnknownItem:
    """An item or sub-item of a type we do not recognise; kept, never acted on.

    PS3.8 §9.3: "Items of unrecognized types shall be ignored and skipped."
    """

    item_type: int
    data: bytes

    def __post_init__(self) -> None:
        _check_uint(self.item_type, _MAX_U8, "UnknownItem.item_type")
        _check_bytes(self.data, _MAX_U16, "UnknownItem.data")


@dataclass(frozen=True, slots=True, kw_only=True)
class PresentationContextRQ:
    """Presentation context item in an A-ASSOCIATE-RQ, PS3.8 §9.3.2.2.

    ``malformed`` is empty for a well-formed item. The decoder sets it (to the
    reason) when a sub-item's value is not a UID: the context is kept, with
    the text as received, so that negotiation refuses that context alone
    (Table 9-18) instead of the whole association being aborted for it.
    """

    context_id: int  # odd, 1..255
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    malformed: str = ""

    def __post_init__(self) -> None:
        _check_context_id(self.context_id, "PresentationContextRQ.context_id")
        _as_tuple(self, "transfer_syntaxes", str, "PresentationContextRQ.transfer_syntaxes")
        if not self.transfer_syntaxes:
            _fail_value("PresentationContextRQ.transfer_syntaxes: one or more required (§9.3.2.2)")
        if self.malformed:
            return  # kept as received, for negotiation to refuse
        _check_uid(self.abstract_syntax, "PresentationContextRQ.abstract_syntax")
        for uid in self.transfer_syntaxes:
            _check_uid(uid, "PresentationContextRQ.transfer_syntaxes")


@dataclass(frozen=True, slots=True, kw_only=True)
class PresentationContextAC:
    """Presentation context item in an A-ASSOCIATE-AC, PS3.8 §9.3.3.2.

    ``transfer_syntax`` is ``None`` only when the context is not accepted (the
    standard says the sub-item is not significant then; we still encode it as
    an empty or echoed UID as peers expect).
    """

    context_id: int
    result: PresentationContextResult
    transfer_syntax: str | None

    def __post_init__(self) -> None:
        _check_context_id(self.context_id, "PresentationContextAC.context_id")
        _coerce_enum(self, "result", PresentationContextResult, "PresentationContextAC.result")
        if self.transfer_syntax is None:
            if self.result == PresentationContextResult.ACCEPTANCE:
                _fail_value("PresentationContextAC: an accepted context needs a transfer_syntax")
        else:
            _check_uid(self.transfer_syntax, "PresentationContextAC.transfer_syntax")


@dataclass(frozen=True, slots=True, kw_only=True)
class MaximumLength:
    """Maximum length sub-item, PS3.8 Annex D.1. 0 means no limit."""

    maximum_length: int

    def __post_init__(self) -> None:
        _check_uint(self.maximum_length, _MAX_U32, "MaximumLength.maximum_length")


@dataclass(frozen=True, slots=True, kw_only=True)
class ImplementationClassUID:
    """Implementation class UID sub-item, PS3.7 Annex D.3.3.2."""

    uid: str

    def __post_init__(self) -> None:
        _check_uid(self.uid, "ImplementationClassUID.uid")


@dataclass(frozen=True, slots=True, kw_only=True)
class ImplementationVersionName:
    """Implementation version name sub-item, PS3.7 Annex D.3.3.2 (1-16 chars)."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or _VERSION_NAME_RE.fullmatch(self.name) is None:
            _fail_value(
                "ImplementationVersionName.name must be 1-16 ISO 646 characters "
                f"(PS3.7 D.3.3.2), got {self.name!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class AsynchronousOperationsWindow:
    """Asynchronous operations window sub-item, PS3.7 Annex D.3.3.3. 0 = unlimited."""

    max_operations_invoked: int
    max_operations_performed: int

    def __post_init__(self) -> None:
        _check_uint(self.max_operations_invoked, _MAX_U16, "max_operations_invoked")
        _check_uint(self.max_operations_performed, _MAX_U16, "max_operations_performed")


@dataclass(frozen=True, slots=True, kw_only=True)
class SCPSCURoleSelection:
    """SCP/SCU role selection sub-item, PS3.7 Annex D.3.3.4."""

    sop_class_uid: str
    scu_role: bool
    scp_role: bool

    def __post_init__(self) -> None:
        _check_uid(self.sop_class_uid, "SCPSCURoleSelection.sop_class_uid")
        _check_bool(self.scu_role, "SCPSCURoleSelection.scu_role")
        _check_bool(self.scp_role, "SCPSCURoleSelection.scp_role")


@dataclass(frozen=True, slots=True, kw_only=True)
class SOPClassExtendedNegotiation:
    """SOP class extended negotiation sub-item, PS3.7 Annex D.3.3.5."""

    sop_class_uid: str
    service_class_application_information: bytes

    def __post_init__(self) -> None:
        _check_uid(self.sop_class_uid, "SOPClassExtendedNegotiation.sop_class_uid")
        _check_bytes(
            self.service_class_application_information,
            _MAX_U16 - 2 - len(self.sop_class_uid),
            "SOPClassExtendedNegotiation.service_class_application_information",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SOPClassCommonExtendedNegotiation:
    """SOP class common extended negotiation sub-item, PS3.7 Annex D.3.3.6."""

    sop_class_uid: str
    service_class_uid: str
    related_general_sop_class_uids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        what = "SOPClassCommonExtendedNegotiation"
        _check_uid(self.sop_class_uid, f"{what}.sop_class_uid")
        _check_uid(self.service_class_uid, f"{what}.service_class_uid")
        _as_tuple(
            self, "related_general_sop_class_uids", str, f"{what}.related_general_sop_class_uids"
        )
        for uid in self.related_general_sop_class_uids:
            _check_uid(uid, f"{what}.related_general_sop_class_uids")
        size = 6 + len(self.sop_class_uid) + len(self.service_class_uid)
        size += sum(2 + len(uid) for uid in self.related_general_sop_class_uids)
        if size > _MAX_U16:
            _fail_value(f"{what}: {size} bytes do not fit the 16-bit item length")


@dataclass(frozen=True, slots=True, kw_only=True)
class UserIdentityRQ:
    """User identity negotiation sub-item (RQ), PS3.7 Annex D.3.3.7.1."""

    identity_type: UserIdentityType | int
    positive_response_requested: bool
    primary_field: bytes
    secondary_field: bytes = b""

    def __post_init__(self) -> None:
        _check_uint(self.identity_type, _MAX_U8, "UserIdentityRQ.identity_type")
        if self.identity_type in UserIdentityType.__members__.values():
            object.__setattr__(self, "identity_type", UserIdentityType(self.identity_type))
        _check_bool(self.positive_response_requested, "UserIdentityRQ.positive_response_requested")
        _check_bytes(self.primary_field, _MAX_U16, "UserIdentityRQ.primary_field")
        _check_bytes(self.secondary_field, _MAX_U16, "UserIdentityRQ.secondary_field")
        size = 6 + len(self.primary_field) + len(self.secondary_field)
        if size > _MAX_U16:
            _fail_value(f"UserIdentityRQ: {size} bytes do not fit the 16-bit item length")


@dataclass(frozen=True, slots=True, kw_only=True)
class UserIdentityAC:
    """User identity negotiation sub-item (AC), PS3.7 Annex D.3.3.7.2."""

    server_response: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.server_response, _MAX_U16 - 2, "UserIdentityAC.server_response")


UserInformationSubItem: TypeAlias = (
    MaximumLength
    | ImplementationClassUID
    | ImplementationVersionName
    | AsynchronousOperationsWindow
    | SCPSCURoleSelection
    | SOPClassExtendedNegotiation
    | SOPClassCommonExtendedNegotiation
    | UserIdentityRQ
    | UserIdentityAC
    | UnknownItem
)

_SUB_ITEM_CLASSES: tuple[type, ...] = (
    MaximumLength,
    ImplementationClassUID,
    ImplementationVersionName,
    AsynchronousOperationsWindow,
    SCPSCURoleSelection,
    SOPClassExtendedNegotiation,
    SOPClassCommonExtendedNegotiation,
    UserIdentityRQ,
    UserIdentityAC,
    UnknownItem,
)

# Sub-item types the decoder interprets; an UnknownItem may not claim one.
_KNOWN_SUB_ITEM_TYPES = frozenset(range(0x51, 0x5A))
# Top-level item types each A-ASSOCIATE PDU interprets (§9.3.2, §9.3.3).
_RQ_ITEM_TYPES = frozenset((0x10, 0x20, 0x50))
_AC_ITEM_TYPES = frozenset((0x10, 0x21, 0x50))


# Informational sub-items (PS3.7 D.3.3.2) that are kept raw, as UnknownItem,
# when a peer sends a malformed value.
_RAW_WHEN_MALFORMED = frozenset({0x52, 0x55})


@dataclass(frozen=True, slots=True, kw_only=True)
class UserInformation:
    """User information item, PS3.8 §9.3.2.3 / §9.3.3.3: an ordered list of sub-items.

    Convenience properties find the first sub-item of each kind (or all of them,
    for the kinds that may repeat). Sub-items are kept in the order received;
    PS3.8 §9.3.2.3 says no significance should be placed on that order.
    """

    items: tuple[UserInformationSubItem, ...] = ()

    def __post_init__(self) -> None:
        _as_tuple(self, "items", _SUB_ITEM_CLASSES, "UserInformation.items")
        for item in self.items:
            if isinstance(item, UnknownItem) and item.item_type in _KNOWN_SUB_ITEM_TYPES \
                    and item.item_type not in _RAW_WHEN_MALFORMED:
                _fail_value(
                    f"UserInformation.items: UnknownItem may not use known type "
                    f"0x{item.item_type:02X}"
                )

    def _first(self, kind: type[_T]) -> _T | None:
        for item in self.items:
            if isinstance(item, kind):
                return item
        return None

    def _all(self, kind: type[_T]) -> tuple[_T, ...]:
        return tuple(item for item in self.items if isinstance(item, kind))

    @property
    def maximum_length(self) -> MaximumLength | None:
        """The maximum length sub-item (PS3.8 D.1); ``None`` means no limit was stated."""
        return self._first(MaximumLength)

    @property
    def implementation_class_uid(self) -> ImplementationClassUID | None:
        """The implementation class UID sub-item, PS3.7 D.3.3.2."""
        return self._first(ImplementationClassUID)

    @property
    def implementation_version_name(self) -> ImplementationVersionName | None:
        """The implementation version name sub-item, PS3.7 D.3.3.2."""
        return self._first(ImplementationVersionName)

    @property
    def async_ops_window(self) -> AsynchronousOperationsWindow | None:
        """The asynchronous operations window sub-item, PS3.7 D.3.3.3."""
        return self._first(AsynchronousOperationsWindow)

    @property
    def role_selections(self) -> tuple[SCPSCURoleSelection, ...]:
        """All SCP/SCU role selection sub-items, PS3.7 D.3.3.4."""
        return self._all(SCPSCURoleSelection)

    @property
    def sop_class_extended(self) -> tuple[SOPClassExtendedNegotiation, ...]:
        """All SOP class extended negotiation sub-items, PS3.7 D.3.3.5."""
        return self._all(SOPClassExtendedNegotiation)

    @property
    def sop_class_common_extended(self) -> tuple[SOPClassCommonExtendedNegotiation, ...]:
        """All SOP class common extended negotiation sub-items, PS3.7 D.3.3.6."""
        return self._all(SOPClassCommonExtendedNegotiation)

    @property
    def user_identity_rq(self) -> UserIdentityRQ | None:
        """The user identity (RQ) sub-item, PS3.7 D.3.3.7.1."""
        return self._first(UserIdentityRQ)

    @property
    def user_identity_ac(self) -> UserIdentityAC | None:
        """The user identity (AC) sub-item, PS3.7 D.3.3.7.2."""
        return self._first(UserIdentityAC)


# ---------------------------------------------------------------------------
# PDUs
# ---------------------------------------------------------------------------


def _check_associate(
    pdu: AAssociateRQ | AAssociateAC,
    name: str,
    context_type: type,
    interpreted: frozenset[int],
) -> None:
    _check_uint(pdu.protocol_version, _MAX_U16, f"{name}.protocol_version")
    _check_uid(pdu.application_context_name, f"{name}.application_context_name")
    _as_tuple(pdu, "presentation_contexts", context_type, f"{name}.presentation_contexts")
    if not isinstance(pdu.user_information, UserInformation):
        _fail_value(f"{name}.user_information must be a UserInformation")
    _as_tuple(pdu, "unknown_items", UnknownItem, f"{name}.unknown_items")
    for item in pdu.unknown_items:
        if item.item_type in interpreted:
            _fail_value(f"{name}.unknown_items: type 0x{item.item_type:02X} is not unknown")


@dataclass(frozen=True, slots=True, kw_only=True)
class AAssociateRQ:
    """A-ASSOCIATE-RQ PDU, PS3.8 §9.3.2. AE titles are stripped of padding."""

    protocol_version: int = 1
    called_ae_title: str
    calling_ae_title: str
    application_context_name: str = DICOM_APPLICATION_CONTEXT
    presentation_contexts: tuple[PresentationContextRQ, ...]
    user_information: UserInformation
    # Items of unknown type met in the variable field (kept, ignored).
    unknown_items: tuple[UnknownItem, ...] = field(default=())
    # Bytes 11-74 as received (the AE title fields, padding included, and 32 reserved
    # bytes), which the A-ASSOCIATE-AC sends back unchanged (Table 9-17); None when
    # not decoded from the wire.
    fixed_fields: bytes | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_ae_title(self.called_ae_title, "A-ASSOCIATE-RQ.called_ae_title")
        _check_ae_title(self.calling_ae_title, "A-ASSOCIATE-RQ.calling_ae_title")
        _check_associate(self, "A-ASSOCIATE-RQ", PresentationContextRQ, _RQ_ITEM_TYPES)


@dataclass(frozen=True, slots=True, kw_only=True)
class AAssociateAC:
    """A-ASSOCIATE-AC PDU, PS3.8 §9.3.3. AE title fields echo the RQ's.

    Table 9-17 says those fields are not tested on receipt, so they are only
    required to be printable (0-16 characters, no leading/trailing spaces).
    ``echoed``, if given, is what bytes 11-74 are sent as instead: the RQ's
    (:attr:`AAssociateRQ.fixed_fields`), which Table 9-17 has the AC send with
    values identical to those received.
    """

    protocol_version: int = 1
    called_ae_title: str
    calling_ae_title: str
    application_context_name: str = DICOM_APPLICATION_CONTEXT
    presentation_contexts: tuple[PresentationContextAC, ...]
    user_information: UserInformation
    unknown_items: tuple[UnknownItem, ...] = field(default=())
    echoed: bytes | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for attr in ("called_ae_title", "calling_ae_title"):
            value = getattr(self, attr)
            if (
                not isinstance(value, str)
                or _AE_AC_RE.fullmatch(value) is None
                or value.strip(" ") != value
            ):
                _fail_value(
                    f"A-ASSOCIATE-AC.{attr} must be 0-16 printable ISO 646 characters "
                    f"without leading/trailing spaces, got {value!r}"
                )
        if self.echoed is not None and len(self.echoed) != _ECHOED_BYTES:
            _fail_value(f"A-ASSOCIATE-AC.echoed must be {_ECHOED_BYTES} bytes, "
                        f"got {len(self.echoed)}")
        _check_associate(self, "A-ASSOCIATE-AC", PresentationContextAC, _AC_ITEM_TYPES)


@dataclass(frozen=True, slots=True, kw_only=True)
class AAssociateRJ:
    """A-ASSOCIATE-RJ PDU, PS3.8 §9.3.4.

    ``reason`` must be one of the values Table 9-21 lists for ``source``
    (reserved values included).
    """

    result: RejectResult
    source: RejectSource
    reason: int

    def __post_init__(self) -> None:
        _coerce_enum(self, "result", RejectResult, "A-ASSOCIATE-RJ.result")
        _coerce_enum(self, "source", RejectSource, "A-ASSOCIATE-RJ.source")
        allowed = _REJECT_REASONS[self.source]
        if (
            not isinstance(self.reason, int)
            or isinstance(self.reason, bool)
            or (self.reason not in allowed)
        ):
            _fail_value(
                f"A-ASSOCIATE-RJ.reason {self.reason!r} is not defined for source "
                f"{self.source.name} (Table 9-21 allows {allowed.start}..{allowed.stop - 1})"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class PDV:
    """One presentation data value item, PS3.8 §9.3.5.1 and Annex E.2.

    ``is_command``: bit 0 of the message control header; ``is_last``: bit 1.
    ``data`` is a fragment of a command set or data set. Decoded PDVs hold a
    read-only ``memoryview`` into the received PDU; the repr shows only its size.
    """

    context_id: int
    is_command: bool
    is_last: bool
    data: bytes | memoryview

    def __post_init__(self) -> None:
        _check_context_id(self.context_id, "PDV.context_id")
        _check_bool(self.is_command, "PDV.is_command")
        _check_bool(self.is_last, "PDV.is_last")
        data = self.data
        if isinstance(data, memoryview):
            if not data.c_contiguous:
                _fail_value("PDV.data: memoryview must be contiguous")
        elif not isinstance(data, bytes):
            _fail_value(f"PDV.data must be bytes or memoryview, got {type(data).__name__}")

    @property
    def nbytes(self) -> int:
        """Length of ``data`` in bytes."""
        data = self.data
        return data.nbytes if isinstance(data, memoryview) else len(data)

    def __repr__(self) -> str:
        return (
            f"PDV(context_id={self.context_id}, is_command={self.is_command}, "
            f"is_last={self.is_last}, data=<{self.nbytes} bytes>)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PDataTF:
    """P-DATA-TF PDU, PS3.8 §9.3.5: one or more PDVs."""

    pdvs: tuple[PDV, ...]

    def __post_init__(self) -> None:
        _as_tuple(self, "pdvs", PDV, "P-DATA-TF.pdvs")
        if not self.pdvs:
            _fail_value("P-DATA-TF.pdvs: one or more PDV items required (§9.3.5)")


@dataclass(frozen=True, slots=True, kw_only=True)
class AReleaseRQ:
    """A-RELEASE-RQ PDU, PS3.8 §9.3.6."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AReleaseRP:
    """A-RELEASE-RP PDU, PS3.8 §9.3.7."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AAbort:
    """A-ABORT PDU, PS3.8 §9.3.8. ``source``/``reason`` as in errors.AbortSource/Reason.

    ``source`` must be in Table 9-26 (0, 1 or 2). When the source is the service
    provider (2) ``reason`` must be in Table 9-26 too; otherwise it is not
    significant (any byte, normally 0).
    """

    source: int
    reason: int = 0

    def __post_init__(self) -> None:
        _coerce_enum(self, "source", AbortSource, "A-ABORT.source")
        if self.source == AbortSource.SERVICE_PROVIDER:
            _coerce_enum(self, "reason", AbortReason, "A-ABORT.reason")
        else:
            _check_uint(self.reason, _MAX_U8, "A-ABORT.reason")


PDU: TypeAlias = (
    AAssociateRQ | AAssociateAC | AAssociateRJ | PDataTF | AReleaseRQ | AReleaseRP | AAbort
)


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------

_PDU_HEADER = struct.Struct(">BBI")  # type, reserved, length (§9.3.1)
_ITEM_HEADER = struct.Struct(">BBH")  # type, reserved, length
_PDV_HEADER = struct.Struct(">IBB")  # item length, context id, message control header
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_TWO_U16 = struct.Struct(">HH")
_FOUR_U8 = struct.Struct(">BBBB")
_ASSOCIATE_FIXED = struct.Struct(">HH16s16s32x")  # version, reserved, called, calling
# Bytes 11-74 of an A-ASSOCIATE-RQ/AC: called and calling AE title fields, 32 reserved.
_ECHOED_BYTES = 64

_ASSOCIATE_FIXED_LENGTH = 68  # PDU-length of an A-ASSOCIATE with an empty variable field
_ASSOCIATE_VARIABLE_OFFSET = 6 + _ASSOCIATE_FIXED_LENGTH

_FIXED_LENGTH_PDUS = frozenset((0x03, 0x05, 0x06, 0x07))  # PDU-length is always 4
_RELEASE_RQ_BYTES = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_RELEASE_RP_BYTES = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def _item(item_type: int, payload: bytes, what: str) -> bytes:
    """One item or sub-item: type, reserved 00H, 16-bit length, value (§9.3.1)."""
    if len(payload) > _MAX_U16:
        _fail_value(f"{what}: {len(payload)} bytes do not fit the 16-bit item length")
    return b"".join((_ITEM_HEADER.pack(item_type, 0, len(payload)), payload))


def _lv(value: bytes, what: str) -> bytes:
    """A 16-bit length followed by the value (the UID/field encoding of PS3.7 Annex D)."""
    if len(value) > _MAX_U16:
        _fail_value(f"{what}: {len(value)} bytes do not fit the 16-bit length")
    return b"".join((_U16.pack(len(value)), value))


def _ascii(value: str) -> bytes:
    return value.encode("ascii")


def _encode_sub_item(item: UserInformationSubItem) -> bytes:
    """One user information sub-item, PS3.8 Annex D.1 / PS3.7 Annex D.3.3."""
    if isinstance(item, MaximumLength):
        return _item(0x51, _U32.pack(item.maximum_length), "MaximumLength")
    if isinstance(item, ImplementationClassUID):
        return _item(0x52, _ascii(item.uid), "ImplementationClassUID")
    if isinstance(item, AsynchronousOperationsWindow):
        payload = _TWO_U16.pack(item.max_operations_invoked, item.max_operations_performed)
        return _item(0x53, payload, "AsynchronousOperationsWindow")
    if isinstance(item, SCPSCURoleSelection):
        payload = b"".join(
            (
                _lv(_ascii(item.sop_class_uid), "SCPSCURoleSelection.sop_class_uid"),
                bytes((int(item.scu_role), int(item.scp_role))),
            )
        )
        return _item(0x54, payload, "SCPSCURoleSelection")
    if isinstance(item, ImplementationVersionName):
        return _item(0x55, _ascii(item.name), "ImplementationVersionName")
    if isinstance(item, SOPClassExtendedNegotiation):
        payload = b"".join(
            (
                _lv(_ascii(item.sop_class_uid), "SOPClassExtendedNegotiation.sop_class_uid"),
                item.service_class_application_information,
            )
        )
        return _item(0x56, payload, "SOPClassExtendedNegotiation")
    if isinstance(item, SOPClassCommonExtendedNegotiation):
        what = "SOPClassCommonExtendedNegotiation"
        related = b"".join(
            _lv(_ascii(uid), f"{what}.related_general_sop_class_uids")
            for uid in item.related_general_sop_class_uids
        )
        payload = b"".join(
            (
                _lv(_ascii(item.sop_class_uid), f"{what}.sop_class_uid"),
                _lv(_ascii(item.service_class_uid), f"{what}.service_class_uid"),
                _lv(related, f"{what}.related_general_sop_class_uids"),
            )
        )
        # The second header byte is the sub-item version, 0 (Table D.3-12).
        return _item(0x57, payload, what)
    if isinstance(item, UserIdentityRQ):
        payload = b"".join(
            (
                bytes((int(item.identity_type), int(item.positive_response_requested))),
                _lv(item.primary_field, "UserIdentityRQ.primary_field"),
                _lv(item.secondary_field, "UserIdentityRQ.secondary_field"),
            )
        )
        return _item(0x58, payload, "UserIdentityRQ")
    if isinstance(item, UserIdentityAC):
        return _item(0x59, _lv(item.server_response, "UserIdentityAC"), "UserIdentityAC")
    return _item(item.item_type, item.data, "UnknownItem")


def _encode_user_information(info: UserInformation) -> bytes:
    payload = b"".join([_encode_sub_item(item) for item in info.items])
    return _item(0x50, payload, "UserInformation")


def _encode_context_rq(ctx: PresentationContextRQ) -> bytes:
    parts = [
        bytes((ctx.context_id, 0, 0, 0)),
        _item(0x30, _ascii(ctx.abstract_syntax), "abstract syntax"),
    ]
    parts.extend(_item(0x40, _ascii(uid), "transfer syntax") for uid in ctx.transfer_syntaxes)
    return _item(0x20, b"".join(parts), f"presentation context {ctx.context_id}")


def _encode_context_ac(ctx: PresentationContextAC) -> bytes:
    # One transfer syntax sub-item, always written: empty when not accepted and
    # no value was given (Table 9-18: then "not significant").
    uid = b"" if ctx.transfer_syntax is None else _ascii(ctx.transfer_syntax)
    payload = b"".join(
        (bytes((ctx.context_id, 0, int(ctx.result), 0)), _item(0x40, uid, "transfer syntax"))
    )
    return _item(0x21, payload, f"presentation context {ctx.context_id}")


def _encode_associate(pdu: AAssociateRQ | AAssociateAC) -> bytes:
    """A-ASSOCIATE-RQ/AC, PS3.8 §9.3.2 Table 9-11 / §9.3.3 Table 9-17."""
    if isinstance(pdu, AAssociateRQ):
        pdu_type = 0x01
        contexts = [_encode_context_rq(ctx) for ctx in pdu.presentation_contexts]
    else:
        pdu_type = 0x02
        contexts = [_encode_context_ac(ctx) for ctx in pdu.presentation_contexts]
    if isinstance(pdu, AAssociateAC) and pdu.echoed is not None:
        fixed = _U16.pack(pdu.protocol_version) + b"\0\0" + pdu.echoed
    else:
        fixed = _ASSOCIATE_FIXED.pack(
            pdu.protocol_version,
            0,
            _ascii(pdu.called_ae_title).ljust(16, b" "),
            _ascii(pdu.calling_ae_title).ljust(16, b" "),
        )
    body = b"".join(
        (
            fixed,
            _item(0x10, _ascii(pdu.application_context_name), "application context"),
            *contexts,
            _encode_user_information(pdu.user_information),
            *(_item(item.item_type, item.data, "UnknownItem") for item in pdu.unknown_items),
        )
    )
    if len(body) > _MAX_U32:
        _fail_value(f"A-ASSOCIATE PDU of {len(body)} bytes does not fit the 32-bit PDU length")
    return b"".join((_PDU_HEADER.pack(pdu_type, 0, len(body)), body))


_SINGLE_PDV_HEADER = struct.Struct(">BBIIBB")  # P-DATA-TF header + one PDV item header


def single_pdv_header(context_id: int, is_command: bool, is_last: bool, size: int) -> bytes:
    """The 12 bytes before the data of a P-DATA-TF holding one PDV of ``size``
    bytes (PS3.8 §9.3.5, Annex E.2): the sender's hot path, one struct call.

    The caller has checked ``context_id`` (an accepted context) and keeps
    ``size`` within the peer's maximum length (PS3.8 D.1)."""
    return _SINGLE_PDV_HEADER.pack(
        0x04, 0, size + 6, size + 2, context_id, (is_last << 1) | is_command
    )


def encode_pdata_chunks(pdvs: Sequence[PDV]) -> list[bytes | memoryview]:
    """Encode a P-DATA-TF PDU (PS3.8 §9.3.5) as buffers for scatter-gather sending.

    Returns ``[pdu_header, pdv_header_0, data_0, pdv_header_1, data_1, ...]``:
    each PDV header is 6 bytes (4-byte item length, presentation context ID and
    message control header, §9.3.5.1 and Annex E.2); each ``data_i`` is the
    PDV's own buffer, not a copy. ``b"".join(chunks)`` is the whole PDU.
    The caller keeps the PDU within the peer's maximum length (PS3.8 D.1).
    """
    if not pdvs:
        _fail_value("P-DATA-TF needs one or more PDV items (§9.3.5)")
    chunks: list[bytes | memoryview] = [b""]
    append = chunks.append
    pack = _PDV_HEADER.pack
    total = 0
    for pdv in pdvs:
        data = pdv.data
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        append(pack(size + 2, pdv.context_id, (pdv.is_last << 1) | pdv.is_command))
        append(data)
        total += size + 6
    if total > _MAX_U32:
        _fail_value(f"P-DATA-TF of {total} bytes does not fit the 32-bit PDU length")
    chunks[0] = _PDU_HEADER.pack(0x04, 0, total)
    return chunks


def encode_pdu(pdu: PDU) -> bytes:
    """Encode one PDU, PS3.8 §9.3.2-§9.3.8. Reserved fields are written as 00H.

    Raises :class:`PDUValueError` if an item overflows its length field.
    """
    if isinstance(pdu, PDataTF):
        return b"".join(encode_pdata_chunks(pdu.pdvs))
    if isinstance(pdu, AAssociateRQ | AAssociateAC):
        return _encode_associate(pdu)
    if isinstance(pdu, AAssociateRJ):
        # §9.3.4 Table 9-21: reserved, result, source, reason/diag.
        return b"".join(
            (_PDU_HEADER.pack(0x03, 0, 4), _FOUR_U8.pack(0, pdu.result, pdu.source, pdu.reason))
        )
    if isinstance(pdu, AReleaseRQ):
        return _RELEASE_RQ_BYTES
    if isinstance(pdu, AReleaseRP):
        return _RELEASE_RP_BYTES
    if isinstance(pdu, AAbort):
        # §9.3.8 Table 9-26: reserved, reserved, source, reason/diag.
        return b"".join((_PDU_HEADER.pack(0x07, 0, 4), _FOUR_U8.pack(0, 0, pdu.source, pdu.reason)))
    raise TypeError(f"not a PDU: {type(pdu).__name__}")


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------

_PDU_NAMES: dict[int, str] = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}

_INVALID = AbortReason.INVALID_PDU_PARAMETER_VALUE
_UNEXPECTED = AbortReason.UNEXPECTED_PDU_PARAMETER

_UID_BYTES_RE = re.compile(rb"[0-9.]{1,64}")
_AE_BYTES_RE = re.compile(rb"[\x20-\x5b\x5d-\x7e]{1,16}")
_VERSION_NAME_BYTES_RE = re.compile(rb"[\x20-\x7e]{1,16}")


def _fail(message: str, fld: str, offset: int, reason: AbortReason = _INVALID) -> NoReturn:
    raise PDUDecodeError(message, field=fld, offset=offset, reason=reason)


class _Validating:
    """Turns a validation error raised while building a decoded item into a decode error."""

    __slots__ = ("_fld", "_offset")

    def __init__(self, fld: str, offset: int) -> None:
        self._fld = fld
        self._offset = offset

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, ValueError | TypeError):
            _fail(str(exc), self._fld, self._offset)


def _unrecognized(pdu_type: int) -> NoReturn:
    _fail(
        f"unrecognized PDU type 0x{pdu_type:02X}", "PDU.pdu_type", 0, AbortReason.UNRECOGNIZED_PDU
    )


def _check_header(pdu_type: int, length: int, max_pdata: int, max_other: int) -> str:
    """Check a PDU header (§9.3.1) before its body is buffered; return the PDU's name.

    ``max_pdata`` caps the PDU-length of a P-DATA-TF (0 = no cap, PS3.8 D.1),
    ``max_other`` that of every other PDU.
    """
    name = _PDU_NAMES.get(pdu_type) or _unrecognized(pdu_type)
    if pdu_type == 0x04:
        if max_pdata and length > max_pdata:
            _fail(
                f"PDU length {length} exceeds the maximum length {max_pdata} we offered",
                f"{name}.pdu_length",
                2,
            )
        if length < 6:
            _fail(f"PDU length {length} cannot hold a PDV item", f"{name}.pdu_length", 2)
    elif pdu_type in _FIXED_LENGTH_PDUS:
        if length != 4:
            _fail(f"PDU length {length}, the standard fixes it at 4", f"{name}.pdu_length", 2)
    else:
        if max_other and length > max_other:
            _fail(
                f"PDU length {length} exceeds the limit {max_other} for this PDU type",
                f"{name}.pdu_length",
                2,
            )
        if length < _ASSOCIATE_FIXED_LENGTH:
            _fail(
                f"PDU length {length} is shorter than the fixed fields ({_ASSOCIATE_FIXED_LENGTH})",
                f"{name}.pdu_length",
                2,
            )
    return name


def _decode_uid(mv: memoryview, start: int, end: int, fld: str) -> str:
    """A UID item value (PS3.8 Annex F): unpadded; trailing NULs/spaces tolerated."""
    raw = bytes(mv[start:end]).rstrip(b"\x00 ")
    if _UID_BYTES_RE.fullmatch(raw) is None:
        if not raw:
            problem = "empty UID"
        elif not raw.isascii():
            problem = f"UID is not ASCII: {raw[:80]!r}"
        else:
            problem = f"not a UID of 1-64 digits and '.': {raw[:80]!r}"
        _fail(problem, fld, start)
    return raw.decode("ascii")


def _lenient_uid(mv: memoryview, start: int, end: int) -> tuple[str, str]:
    """A UID sub-item value inside a presentation context: (text, problem).

    A bad one only costs its context (see PresentationContextRQ.malformed);
    the text is kept printable and at most 64 characters for the logs."""
    raw = bytes(mv[start:end]).rstrip(b"\x00 ")
    if _UID_BYTES_RE.fullmatch(raw) is not None:
        return raw.decode("ascii"), ""
    text = "".join(chr(c) if 0x20 <= c <= 0x7E else "?" for c in raw[:64]) or "?"
    return text, f"{text!r} is not a UID"


def _decode_ae_rq(mv: memoryview, start: int, fld: str) -> str:
    """An AE title field, §9.3.2 Table 9-11: 16 bytes, padding not significant.

    Trailing NULs are stripped like spaces: some modalities pad with NUL, and an
    abort over padding would lose their studies for nothing.
    """
    raw = bytes(mv[start : start + 16]).rstrip(b"\x00 ").strip(b" ")
    if _AE_BYTES_RE.fullmatch(raw) is None:
        if not raw:
            _fail("AE title is all spaces (Table 9-11: shall not be used)", fld, start)
        if not raw.isascii():
            _fail(f"AE title is not ASCII: {raw!r}", fld, start)
        _fail(f"AE title contains control characters or '\\': {raw!r}", fld, start)
    return raw.decode("ascii")


def _decode_ae_ac(mv: memoryview, start: int) -> str:
    """An AE field of an A-ASSOCIATE-AC: not tested (Table 9-17); made printable."""
    raw = bytes(mv[start : start + 16]).rstrip(b"\x00").strip(b" ")
    return "".join(chr(c) if 0x20 <= c <= 0x7E else "?" for c in raw).strip(" ")


class _Items:
    """Walks the items of a variable field, checking each header against the bounds.

    ``name_for(item_type)`` names the field an error is reported against
    (``item_type`` is ``None`` when even the header is truncated).
    """

    __slots__ = ("_count", "_end", "_limit", "_mv", "_name_for", "_offset")

    def __init__(
        self, mv: memoryview, start: int, end: int, name_for: Callable[[int | None], str],
        limit: int,
    ) -> None:
        self._mv = mv
        self._offset = start
        self._end = end
        self._name_for = name_for
        self._limit = limit
        self._count = 0

    def __iter__(self) -> _Items:
        return self

    def __next__(self) -> tuple[int, int, int, int]:
        """Return (item type, item offset, value start, value end)."""
        offset = self._offset
        end = self._end
        if offset >= end:
            raise StopIteration
        if end - offset < 4:
            _fail(
                f"{end - offset} bytes left, an item header needs 4", self._name_for(None), offset
            )
        item_type, _, length = _ITEM_HEADER.unpack_from(self._mv, offset)
        self._count += 1
        if self._count > self._limit:
            # A peer's cheapest way to make us work: a PDU of tiny items (4 MiB of
            # them is a million objects, seconds of a worker's loop).
            _fail(f"more than {self._limit} items", self._name_for(item_type), offset)
        value_end = offset + 4 + length
        if value_end > end:
            _fail(
                f"item type 0x{item_type:02X} length {length} overruns its container "
                f"by {value_end - end} bytes",
                self._name_for(item_type),
                offset,
            )
        self._offset = value_end
        return item_type, offset, offset + 4, value_end


def _names(prefix: str, names: dict[int, str]) -> Callable[[int | None], str]:
    """A ``name_for`` for :class:`_Items`: known sub-item types by name, others generic."""

    def name_for(item_type: int | None) -> str:
        return (
            f"{prefix}.{names.get(item_type, 'sub_item') if item_type is not None else 'sub_item'}"
        )

    return name_for


_CONTEXT_SUB_ITEM_NAMES = {0x30: "abstract_syntax", 0x40: "transfer_syntax"}
_USER_SUB_ITEM_NAMES = {
    0x51: "maximum_length",
    0x52: "implementation_class_uid",
    0x53: "asynchronous_operations_window",
    0x54: "scp_scu_role_selection",
    0x55: "implementation_version_name",
    0x56: "sop_class_extended_negotiation",
    0x57: "sop_class_common_extended_negotiation",
    0x58: "user_identity",
    0x59: "user_identity",
}


def _decode_context_rq(
    mv: memoryview, offset: int, start: int, end: int, fld: str
) -> PresentationContextRQ:
    """Presentation context item (RQ), §9.3.2.2 Table 9-13."""
    if end - start < 4:
        _fail(f"item length {end - start} is shorter than its fixed fields (4)", fld, offset)
    context_id = mv[start]
    if not context_id & 1:
        _fail(
            f"presentation context ID {context_id} is not odd in 1..255", f"{fld}.context_id", start
        )
    abstract_syntax: str | None = None
    transfer_syntaxes: list[str] = []
    malformed: list[str] = []
    for sub_type, sub_offset, sub_start, sub_end in _Items(
        mv, start + 4, end, _names(fld, _CONTEXT_SUB_ITEM_NAMES), MAX_CONTEXT_SUB_ITEMS
    ):
        if sub_type == 0x30:
            if abstract_syntax is not None:
                _fail(
                    "second abstract syntax sub-item",
                    f"{fld}.abstract_syntax",
                    sub_offset,
                    _UNEXPECTED,
                )
            abstract_syntax, problem = _lenient_uid(mv, sub_start, sub_end)
            if problem:
                malformed.append(f"abstract syntax {problem}")
        elif sub_type == 0x40:
            uid, problem = _lenient_uid(mv, sub_start, sub_end)
            transfer_syntaxes.append(uid)
            if problem:
                malformed.append(f"transfer syntax {problem}")
        # Sub-items of other types are ignored and skipped (§9.3).
    if abstract_syntax is None:
        _fail("no abstract syntax sub-item", f"{fld}.abstract_syntax", offset)
    if not transfer_syntaxes:
        _fail("no transfer syntax sub-item", f"{fld}.transfer_syntax", offset)
    with _Validating(fld, offset):
        return PresentationContextRQ(
            context_id=context_id,
            abstract_syntax=abstract_syntax,
            transfer_syntaxes=tuple(transfer_syntaxes),
            malformed="; ".join(malformed),
        )


def _decode_context_ac(
    mv: memoryview, offset: int, start: int, end: int, fld: str
) -> PresentationContextAC:
    """Presentation context item (AC), §9.3.3.2 Table 9-18."""
    if end - start < 4:
        _fail(f"item length {end - start} is shorter than its fixed fields (4)", fld, offset)
    context_id = mv[start]
    if not context_id & 1:
        _fail(
            f"presentation context ID {context_id} is not odd in 1..255", f"{fld}.context_id", start
        )
    result_value = mv[start + 2]
    try:
        result = PresentationContextResult(result_value)
    except ValueError:
        _fail(f"result/reason {result_value} is not in Table 9-18", f"{fld}.result", start + 2)
    accepted = result == PresentationContextResult.ACCEPTANCE
    seen = False
    transfer_syntax: str | None = None
    for sub_type, sub_offset, sub_start, sub_end in _Items(
        mv, start + 4, end, _names(fld, _CONTEXT_SUB_ITEM_NAMES), MAX_CONTEXT_SUB_ITEMS
    ):
        if sub_type != 0x40:
            continue  # ignored and skipped (§9.3)
        if seen:
            _fail(
                "second transfer syntax sub-item", f"{fld}.transfer_syntax", sub_offset, _UNEXPECTED
            )
        seen = True
        if accepted:
            transfer_syntax = _decode_uid(mv, sub_start, sub_end, f"{fld}.transfer_syntax")
        else:
            # Not significant and not tested when not accepted (Table 9-18):
            # keep a valid value, drop anything else.
            raw = bytes(mv[sub_start:sub_end]).rstrip(b"\x00 ")
            if _UID_BYTES_RE.fullmatch(raw) is not None:
                transfer_syntax = raw.decode("ascii")
    if accepted and transfer_syntax is None:
        _fail(
            "accepted context without a transfer syntax sub-item", f"{fld}.transfer_syntax", offset
        )
    with _Validating(fld, offset):
        return PresentationContextAC(
            context_id=context_id, result=result, transfer_syntax=transfer_syntax
        )


def _uid_field(mv: memoryview, pos: int, end: int, fld: str) -> tuple[str, int]:
    """A 16-bit length-prefixed UID inside a sub-item; return it and the next offset."""
    if end - pos < 2:
        _fail("truncated UID length", fld, pos)
    (length,) = _U16.unpack_from(mv, pos)
    if pos + 2 + length > end:
        _fail(f"UID length {length} overruns the sub-item", fld, pos)
    return _decode_uid(mv, pos + 2, pos + 2 + length, fld), pos + 2 + length


def _bytes_field(mv: memoryview, pos: int, end: int, fld: str) -> tuple[bytes, int]:
    """A 16-bit length-prefixed byte field inside a sub-item; return it and the next offset."""
    if end - pos < 2:
        _fail("truncated field length", fld, pos)
    (length,) = _U16.unpack_from(mv, pos)
    if pos + 2 + length > end:
        _fail(f"field length {length} overruns the sub-item", fld, pos)
    return bytes(mv[pos + 2 : pos + 2 + length]), pos + 2 + length


def _expect_end(pos: int, end: int, fld: str) -> None:
    if pos != end:
        _fail(f"{end - pos} unexpected bytes at the end of the sub-item", fld, pos)


def _decode_sub_item(
    mv: memoryview, item_type: int, offset: int, start: int, end: int, fld: str
) -> UserInformationSubItem:
    """One user information sub-item, PS3.8 Annex D.1 and PS3.7 Annex D.3.3."""
    size = end - start
    if item_type in _USER_SUB_ITEM_NAMES:
        fld = f"{fld}.{_USER_SUB_ITEM_NAMES[item_type]}"
    if item_type == 0x51:
        if size != 4:
            _fail(f"item length {size}, expected 4", fld, offset)
        (value,) = _U32.unpack_from(mv, start)
        return MaximumLength(maximum_length=value)
    if item_type == 0x52:
        # Informational only (PS3.7 D.3.3.2): a malformed one is kept raw, never
        # a reason to abort (real devices send letters and over-long values).
        raw = bytes(mv[start:end]).rstrip(b"\x00 ")
        if _UID_BYTES_RE.fullmatch(raw) is None:
            return UnknownItem(item_type=item_type, data=bytes(mv[start:end]))
        return ImplementationClassUID(uid=raw.decode("ascii"))
    if item_type == 0x53:
        if size != 4:
            _fail(f"item length {size}, expected 4", fld, offset)
        invoked, performed = _TWO_U16.unpack_from(mv, start)
        return AsynchronousOperationsWindow(
            max_operations_invoked=invoked, max_operations_performed=performed
        )
    if item_type == 0x54:
        uid, pos = _uid_field(mv, start, end, f"{fld}.sop_class_uid")
        if end - pos != 2:
            _fail(f"{end - pos} bytes after the UID, expected the 2 role bytes", fld, pos)
        scu, scp = mv[pos], mv[pos + 1]
        if scu > 1 or scp > 1:
            _fail(f"role values must be 0 or 1, got SCU {scu} SCP {scp}", fld, pos)
        return SCPSCURoleSelection(sop_class_uid=uid, scu_role=bool(scu), scp_role=bool(scp))
    if item_type == 0x55:
        raw = bytes(mv[start:end]).rstrip(b"\x00")
        if _VERSION_NAME_BYTES_RE.fullmatch(raw) is None:
            # Empty, over 16 characters or not ASCII: seen in the wild, and
            # informational only (PS3.7 D.3.3.2): kept raw, not fatal.
            return UnknownItem(item_type=item_type, data=bytes(mv[start:end]))
        return ImplementationVersionName(name=raw.decode("ascii"))
    if item_type == 0x56:
        uid, pos = _uid_field(mv, start, end, f"{fld}.sop_class_uid")
        return SOPClassExtendedNegotiation(
            sop_class_uid=uid, service_class_application_information=bytes(mv[pos:end])
        )
    if item_type == 0x57:
        sop_uid, pos = _uid_field(mv, start, end, f"{fld}.sop_class_uid")
        service_uid, pos = _uid_field(mv, pos, end, f"{fld}.service_class_uid")
        if end - pos < 2:
            _fail("truncated related general SOP class length", f"{fld}.related", pos)
        (related_length,) = _U16.unpack_from(mv, pos)
        related_end = pos + 2 + related_length
        if related_end != end:
            _fail(
                f"related general SOP class length {related_length} does not end the sub-item",
                f"{fld}.related",
                pos,
            )
        related: list[str] = []
        pos += 2
        while pos < related_end:
            uid, pos = _uid_field(mv, pos, related_end, f"{fld}.related_general_sop_class_uid")
            related.append(uid)
        return SOPClassCommonExtendedNegotiation(
            sop_class_uid=sop_uid,
            service_class_uid=service_uid,
            related_general_sop_class_uids=tuple(related),
        )
    if item_type == 0x58:
        if size < 2:
            _fail(f"item length {size} is too short", fld, offset)
        identity_type, response = mv[start], mv[start + 1]
        if response > 1:
            _fail(f"positive response requested must be 0 or 1, got {response}", fld, start + 1)
        primary, pos = _bytes_field(mv, start + 2, end, f"{fld}.primary_field")
        secondary, pos = _bytes_field(mv, pos, end, f"{fld}.secondary_field")
        _expect_end(pos, end, fld)
        return UserIdentityRQ(
            identity_type=identity_type,
            positive_response_requested=bool(response),
            primary_field=primary,
            secondary_field=secondary,
        )
    if item_type == 0x59:
        response_bytes, pos = _bytes_field(mv, start, end, f"{fld}.server_response")
        _expect_end(pos, end, fld)
        return UserIdentityAC(server_response=response_bytes)
    return UnknownItem(item_type=item_type, data=bytes(mv[start:end]))


def _decode_user_information(
    mv: memoryview, offset: int, start: int, end: int, fld: str
) -> UserInformation:
    """User information item, §9.3.2.3 / §9.3.3.3, with its sub-items."""
    items: list[UserInformationSubItem] = []
    for sub_type, sub_offset, sub_start, sub_end in _Items(
        mv, start, end, _names(fld, _USER_SUB_ITEM_NAMES), MAX_USER_SUB_ITEMS
    ):
        with _Validating(fld, sub_offset):
            items.append(_decode_sub_item(mv, sub_type, sub_offset, sub_start, sub_end, fld))
    with _Validating(fld, offset):
        return UserInformation(items=tuple(items))


def _decode_associate(mv: memoryview, pdu_type: int, name: str) -> AAssociateRQ | AAssociateAC:
    """A-ASSOCIATE-RQ/AC, §9.3.2 Table 9-11 / §9.3.3 Table 9-17."""
    is_rq = pdu_type == 0x01
    (protocol_version,) = _U16.unpack_from(mv, 6)
    if is_rq:
        called = _decode_ae_rq(mv, 10, f"{name}.called_ae_title")
        calling = _decode_ae_rq(mv, 26, f"{name}.calling_ae_title")
    else:
        called = _decode_ae_ac(mv, 10)
        calling = _decode_ae_ac(mv, 26)
    context_type = 0x20 if is_rq else 0x21
    application_context: str | None = None
    rq_contexts: list[PresentationContextRQ] = []
    ac_contexts: list[PresentationContextAC] = []
    user_information: UserInformation | None = None
    unknown: list[UnknownItem] = []

    def name_for(item_type: int | None) -> str:
        if item_type == 0x10:
            return f"{name}.application_context"
        if item_type == context_type:
            return f"{name}.presentation_context[{len(rq_contexts) + len(ac_contexts)}]"
        if item_type == 0x50:
            return f"{name}.user_information"
        return f"{name}.item"

    items = _Items(mv, _ASSOCIATE_VARIABLE_OFFSET, len(mv), name_for, MAX_ASSOCIATE_ITEMS)
    for item_type, offset, start, stop in items:
        if item_type == 0x10:
            fld = f"{name}.application_context"
            if application_context is not None:
                _fail("second application context item", fld, offset, _UNEXPECTED)
            application_context = _decode_uid(mv, start, stop, fld)
        elif item_type == context_type:
            if len(rq_contexts) + len(ac_contexts) == MAX_PRESENTATION_CONTEXT_ITEMS:
                _fail(f"more than {MAX_PRESENTATION_CONTEXT_ITEMS} presentation contexts "
                      "(their IDs are odd, 1-255: PS3.8 9.3.2.2)",
                      name_for(item_type), offset)
            if is_rq:
                fld = f"{name}.presentation_context[{len(rq_contexts)}]"
                rq_contexts.append(_decode_context_rq(mv, offset, start, stop, fld))
            else:
                fld = f"{name}.presentation_context[{len(ac_contexts)}]"
                ac_contexts.append(_decode_context_ac(mv, offset, start, stop, fld))
        elif item_type == 0x50:
            fld = f"{name}.user_information"
            if user_information is not None:
                _fail("second user information item", fld, offset, _UNEXPECTED)
            user_information = _decode_user_information(mv, offset, start, stop, fld)
        else:
            # Ignored and skipped (§9.3), kept for whoever wants to look.
            unknown.append(UnknownItem(item_type=item_type, data=bytes(mv[start:stop])))
    variable = _ASSOCIATE_VARIABLE_OFFSET
    if application_context is None:
        _fail("no application context item", f"{name}.application_context", variable)
    if user_information is None:
        _fail("no user information item", f"{name}.user_information", variable)
    with _Validating(name, 0):
        if is_rq:
            return AAssociateRQ(
                protocol_version=protocol_version,
                called_ae_title=called,
                calling_ae_title=calling,
                application_context_name=application_context,
                presentation_contexts=tuple(rq_contexts),
                user_information=user_information,
                unknown_items=tuple(unknown),
                fixed_fields=bytes(mv[10:10 + _ECHOED_BYTES]),
            )
        return AAssociateAC(
            protocol_version=protocol_version,
            called_ae_title=called,
            calling_ae_title=calling,
            application_context_name=application_context,
            presentation_contexts=tuple(ac_contexts),
            user_information=user_information,
            unknown_items=tuple(unknown),
        )


def _decode_pdata(mv: memoryview) -> PDataTF:
    """P-DATA-TF, §9.3.5: PDV items whose data are views into ``mv`` (no copy)."""
    end = len(mv)
    offset = 6
    pdvs: list[PDV] = []
    append_pdv = pdvs.append
    unpack = _PDV_HEADER.unpack_from
    while offset < end:
        if end - offset < 6:
            _fail(
                f"{end - offset} bytes left, a PDV item needs at least 6",
                f"P-DATA-TF.pdv[{len(pdvs)}].item_length",
                offset,
            )
        length, context_id, control = unpack(mv, offset)
        if length < 2:
            _fail(
                f"PDV item length {length} < 2",
                f"P-DATA-TF.pdv[{len(pdvs)}].item_length",
                offset,
            )
        data_end = offset + 4 + length
        if data_end > end:
            _fail(
                f"PDV item length {length} overruns the PDU by {data_end - end} bytes",
                f"P-DATA-TF.pdv[{len(pdvs)}].item_length",
                offset,
            )
        if not context_id & 1:
            _fail(
                f"presentation context ID {context_id} is not odd in 1..255",
                f"P-DATA-TF.pdv[{len(pdvs)}].context_id",
                offset + 4,
            )
        # Message control header, Annex E.2: bit 0 command, bit 1 last; the
        # other bits are not tested.
        append_pdv(
            PDV(
                context_id=context_id,
                is_command=bool(control & 1),
                is_last=bool(control & 2),
                data=mv[offset + 6 : data_end],
            )
        )
        offset = data_end
    return PDataTF(pdvs=tuple(pdvs))


def _decode_rj(mv: memoryview) -> AAssociateRJ:
    """A-ASSOCIATE-RJ, §9.3.4 Table 9-21."""
    _, result, source, reason = _FOUR_U8.unpack_from(mv, 6)
    if result not in (1, 2):
        _fail(f"result {result} is not in Table 9-21", "A-ASSOCIATE-RJ.result", 7)
    if source not in _REJECT_REASONS:
        _fail(f"source {source} is not in Table 9-21", "A-ASSOCIATE-RJ.source", 8)
    with _Validating("A-ASSOCIATE-RJ.reason", 9):
        return AAssociateRJ(result=RejectResult(result), source=RejectSource(source), reason=reason)


def _decode_abort(mv: memoryview) -> AAbort:
    """A-ABORT, §9.3.8 Table 9-26."""
    _, _, source, reason = _FOUR_U8.unpack_from(mv, 6)
    if source not in (0, 1, 2):
        _fail(f"source {source} is not in Table 9-26", "A-ABORT.source", 8)
    with _Validating("A-ABORT.reason", 9):
        return AAbort(source=source, reason=reason)


def _decode_body(mv: memoryview, pdu_type: int, name: str) -> PDU:
    """Decode a PDU whose header was checked and whose length matches ``mv``."""
    try:
        if pdu_type == 0x04:
            return _decode_pdata(mv)
        if pdu_type in (0x01, 0x02):
            return _decode_associate(mv, pdu_type, name)
        if pdu_type == 0x03:
            return _decode_rj(mv)
        if pdu_type == 0x05:
            return AReleaseRQ()
        if pdu_type == 0x06:
            return AReleaseRP()
        return _decode_abort(mv)
    except PDUDecodeError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, struct.error) as exc:
        # A safety net: every check above should have caught the input first.
        _fail(f"malformed PDU ({type(exc).__name__}: {exc})", name, 0)


def _as_byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A read-only, flat view of unsigned bytes over ``data`` (copied only if strided)."""
    mv = memoryview(data)
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv if mv.readonly else mv.toreadonly()


def decode_pdu(data: bytes | bytearray | memoryview) -> PDU:
    """Decode exactly one complete PDU, header included (PS3.8 §9.3).

    P-DATA-TF PDV data are read-only ``memoryview`` slices of ``data`` (no
    copy): do not mutate a ``bytearray`` passed here while the PDU is in use.
    Raises :class:`~router.dicom.errors.PDUDecodeError`, and nothing else, for
    any malformed input; its ``field`` and ``offset`` say where.
    """
    mv = _as_byte_view(data)
    if len(mv) < 6:
        if not mv:
            _fail("empty input, a PDU header needs 6 bytes", "PDU.pdu_type", 0)
        name = _PDU_NAMES.get(mv[0]) or _unrecognized(mv[0])
        _fail(f"{len(mv)} bytes cannot hold a PDU header (6)", f"{name}.pdu_length", 2)
    pdu_type, _, length = _PDU_HEADER.unpack_from(mv, 0)
    name = _check_header(pdu_type, length, 0, 0)
    if length != len(mv) - 6:
        _fail(
            f"PDU length {length} but {len(mv) - 6} bytes follow the header",
            f"{name}.pdu_length",
            2,
        )
    return _decode_body(mv, pdu_type, name)


class PDUReader:
    """Receive buffer for one association: bytes in, whole PDUs out (PS3.8 §9.3).

    ``feed`` appends received bytes; ``next_pdu`` returns the next complete PDU
    or ``None`` if more bytes are needed. Each PDU header is checked as soon as
    it has arrived (an unknown type as soon as its first byte has), before the
    body is waited for, so an oversized length field is refused at once:

    - ``max_pdu_length`` caps the PDU-length of P-DATA-TF PDUs: the maximum
      length we advertised in our maximum length sub-item (PS3.8 Annex D.1);
      0 means no limit. Settable, e.g. once negotiation is done.
    - ``max_associate_pdu_length`` caps every other PDU (0 = no limit).

    After it has raised :class:`~router.dicom.errors.PDUDecodeError` the reader
    is not usable; the association is to be aborted (PS3.8 §9.2, AA-8).
    """

    __slots__ = ("_buffer", "_max_associate_pdu_length", "_max_pdu_length", "_pos")

    def __init__(self, *, max_pdu_length: int = 0, max_associate_pdu_length: int = 1 << 22) -> None:
        _check_uint(max_pdu_length, _MAX_U32, "max_pdu_length")
        _check_uint(max_associate_pdu_length, _MAX_U32, "max_associate_pdu_length")
        # PDUs are handed out as read-only views of _buffer, not copies (a 500 KB
        # data set crossed the buffer twice otherwise); _pos is where the next one
        # starts. The bytes before _pos are never touched while a view of them lives:
        # Python refuses to resize a bytearray with exports, and feed() then moves
        # the unread tail to a new buffer instead.
        self._buffer = bytearray()
        self._pos = 0
        self._max_pdu_length = max_pdu_length
        self._max_associate_pdu_length = max_associate_pdu_length

    @property
    def max_pdu_length(self) -> int:
        """Cap on a P-DATA-TF's PDU-length field (PS3.8 D.1); 0 = unlimited."""
        return self._max_pdu_length

    @max_pdu_length.setter
    def max_pdu_length(self, value: int) -> None:
        _check_uint(value, _MAX_U32, "max_pdu_length")
        self._max_pdu_length = value

    @property
    def buffered(self) -> int:
        """Number of bytes received and not yet returned as a PDU."""
        return len(self._buffer) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        buffer = self._buffer
        if self._pos:
            try:
                del buffer[:self._pos]  # no PDU handed out still refers to it
            except BufferError:
                buffer = self._buffer = bytearray(memoryview(buffer)[self._pos:])
            self._pos = 0
        buffer += data

    def next_pdu(self) -> PDU | None:
        """Return the next complete PDU, or ``None`` until more bytes arrive.

        Raises :class:`~router.dicom.errors.PDUDecodeError` (and nothing else)
        for a malformed PDU, an unknown PDU type or a length over the cap.
        """
        buffer, pos = self._buffer, self._pos
        size = len(buffer) - pos
        if size < 6:
            if size and buffer[pos] not in _PDU_NAMES:
                _unrecognized(buffer[pos])
            return None
        pdu_type, _, length = _PDU_HEADER.unpack_from(buffer, pos)
        name = _check_header(pdu_type, length, self._max_pdu_length, self._max_associate_pdu_length)
        total = length + 6
        if size < total:
            return None
        chunk = memoryview(buffer)[pos:pos + total].toreadonly()
        if size == total:  # all read: the next bytes start a new buffer
            self._buffer = bytearray()
            self._pos = 0
        else:
            self._pos = pos + total
        return _decode_body(chunk, pdu_type, name)
