"""DIMSE messages and their command sets, PS3.7 §9, §10 and Annex E.

Theory of operation
-------------------
A DIMSE message is a command set, optionally followed by a dataset (PS3.7
§6.3). This module owns the command set; the dataset travels separately
(see :mod:`router.dicom.dataset`), and ``has_dataset`` only says whether one
follows -- it is the Command Data Set Type (0000,0800), where 0101H means "no
dataset" and any other value means "a dataset follows" (PS3.7 Table E.1-1).

Each of the 23 messages (one per Command Field value) is a frozen dataclass,
validated when built, with fields named after the standard's keywords in
snake_case. A field is ``| None`` exactly when the standard makes it optional
(U, C or U(=) in the service parameter tables of PS3.7 §9.1 and §10.1);
statuses' related fields (Offending Element, Error Comment, Error ID: PS3.7
Annex C) are optional on every response.

Command sets are always implicit VR little endian (PS3.7 §6.3.1) and only hold
group 0000 elements, so the codec is a small hand-written one rather than
pydicom's: each message class carries a precomputed layout (tag, VR, field,
mandatory) in ascending tag order, from which :func:`encode_command` writes
bytes with :mod:`struct` and :func:`decode_command` builds the message back.

Decoding is liberal in what it accepts, as real peers need: elements in any
order, a missing or wrong Command Group Length, retired (PS3.7 Annex E.2) and
unknown group 0000 elements, elements that do not belong to this message type,
UIDs padded with spaces instead of NULs, odd lengths, trailing NUL padding.
It is strict about what it cannot interpret: a malformed element, a missing
mandatory element or a value of the wrong type raises
:class:`~router.dicom.errors.DIMSEError` carrying the status to answer with;
no other exception leaves :func:`decode_command`.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final, TypeAlias

from router.dicom.errors import DIMSEError, LocalProtocolError
from router.dicom.uids import is_valid_uid

__all__ = [
    "ATTRIBUTE_LIST_ERROR",
    "ATTRIBUTE_VALUE_OUT_OF_RANGE",
    "CANCEL",
    "CANNOT_UNDERSTAND",
    "CLASS_INSTANCE_CONFLICT",
    "COERCION_OF_DATA_ELEMENTS",
    "COMMAND_ELEMENTS",
    "DATASET_DOES_NOT_MATCH_SOP_CLASS",
    "DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING",
    "DUPLICATE_INVOCATION",
    "DUPLICATE_SOP_INSTANCE",
    "ELEMENTS_DISCARDED",
    "INVALID_ARGUMENT_VALUE",
    "INVALID_ATTRIBUTE_VALUE",
    "INVALID_OBJECT_INSTANCE",
    "MESSAGE_TYPES",
    "MISSING_ATTRIBUTE",
    "MISSING_ATTRIBUTE_VALUE",
    "MISTYPED_ARGUMENT",
    "MOVE_DESTINATION_UNKNOWN",
    "NOT_AUTHORIZED",
    "NO_DATASET",
    "NO_SUCH_ACTION_TYPE",
    "NO_SUCH_ARGUMENT",
    "NO_SUCH_ATTRIBUTE",
    "NO_SUCH_EVENT_TYPE",
    "NO_SUCH_SOP_CLASS",
    "NO_SUCH_SOP_INSTANCE",
    "OPTIONAL_ATTRIBUTES_NOT_SUPPORTED",
    "OUT_OF_RESOURCES_UNABLE_TO_CALCULATE_MATCHES",
    "OUT_OF_RESOURCES_UNABLE_TO_PERFORM_SUB_OPERATIONS",
    "PENDING",
    "PENDING_WARNING",
    "PROCESSING_FAILURE",
    "REFUSED_OUT_OF_RESOURCES",
    "RESOURCE_LIMITATION",
    "SOP_CLASS_NOT_SUPPORTED",
    "SUB_OPERATIONS_COMPLETE_WITH_FAILURES",
    "SUCCESS",
    "UNABLE_TO_PROCESS",
    "UNRECOGNIZED_OPERATION",
    "CCancelRQ",
    "CEchoRQ",
    "CEchoRSP",
    "CFindRQ",
    "CFindRSP",
    "CGetRQ",
    "CGetRSP",
    "CMoveRQ",
    "CMoveRSP",
    "CStoreRQ",
    "CStoreRSP",
    "CommandField",
    "DimseCommand",
    "DimseMessage",
    "DimseRequest",
    "DimseResponse",
    "NActionRQ",
    "NActionRSP",
    "NCreateRQ",
    "NCreateRSP",
    "NDeleteRQ",
    "NDeleteRSP",
    "NEventReportRQ",
    "NEventReportRSP",
    "NGetRQ",
    "NGetRSP",
    "NSetRQ",
    "NSetRSP",
    "Priority",
    "StatusCategory",
    "decode_command",
    "encode_command",
    "error_comment",
    "final_store_status",
    "is_request",
    "status_category",
]


class CommandField(enum.IntEnum):
    """Command Field (0000,0100) values, PS3.7 Table E.1-1."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    N_EVENT_REPORT_RQ = 0x0100
    N_EVENT_REPORT_RSP = 0x8100
    N_GET_RQ = 0x0110
    N_GET_RSP = 0x8110
    N_SET_RQ = 0x0120
    N_SET_RSP = 0x8120
    N_ACTION_RQ = 0x0130
    N_ACTION_RSP = 0x8130
    N_CREATE_RQ = 0x0140
    N_CREATE_RSP = 0x8140
    N_DELETE_RQ = 0x0150
    N_DELETE_RSP = 0x8150
    C_CANCEL_RQ = 0x0FFF


class Priority(enum.IntEnum):
    """Priority (0000,0700), PS3.7 Table E.1-1."""

    MEDIUM = 0x0000
    HIGH = 0x0001
    LOW = 0x0002


#: Command Data Set Type value meaning "no dataset follows", PS3.7 Table E.1-1.
NO_DATASET: Final = 0x0101
# What we write when a dataset follows: any value but 0101H will do; DCMTK
# 3.6.7 and pynetdicom both write 0001H, and so do we.
_DATASET_PRESENT: Final = 0x0001


# --- Statuses ---------------------------------------------------------------
# General statuses, PS3.7 Annex C.
SUCCESS: Final = 0x0000
OPTIONAL_ATTRIBUTES_NOT_SUPPORTED: Final = 0x0001  # warning, PS3.4 F.7.2.1.2 etc.
NO_SUCH_ATTRIBUTE: Final = 0x0105
INVALID_ATTRIBUTE_VALUE: Final = 0x0106
ATTRIBUTE_LIST_ERROR: Final = 0x0107  # warning
PROCESSING_FAILURE: Final = 0x0110
DUPLICATE_SOP_INSTANCE: Final = 0x0111
NO_SUCH_SOP_INSTANCE: Final = 0x0112
NO_SUCH_EVENT_TYPE: Final = 0x0113
NO_SUCH_ARGUMENT: Final = 0x0114
INVALID_ARGUMENT_VALUE: Final = 0x0115
ATTRIBUTE_VALUE_OUT_OF_RANGE: Final = 0x0116  # warning
INVALID_OBJECT_INSTANCE: Final = 0x0117
NO_SUCH_SOP_CLASS: Final = 0x0118
CLASS_INSTANCE_CONFLICT: Final = 0x0119
MISSING_ATTRIBUTE: Final = 0x0120
MISSING_ATTRIBUTE_VALUE: Final = 0x0121
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
NO_SUCH_ACTION_TYPE: Final = 0x0123
NOT_AUTHORIZED: Final = 0x0124
DUPLICATE_INVOCATION: Final = 0x0210
UNRECOGNIZED_OPERATION: Final = 0x0211
MISTYPED_ARGUMENT: Final = 0x0212
RESOURCE_LIMITATION: Final = 0x0213
CANCEL: Final = 0xFE00
PENDING: Final = 0xFF00
PENDING_WARNING: Final = 0xFF01  # C-FIND: optional keys not supported, PS3.4 C.4.1.1.4
# Service-specific statuses, PS3.4 B.2.3 (C-STORE), C.4.1.1.4 (C-FIND),
# C.4.2.1.5 (C-MOVE), C.4.3.1.4 (C-GET).
REFUSED_OUT_OF_RESOURCES: Final = 0xA700
OUT_OF_RESOURCES_UNABLE_TO_CALCULATE_MATCHES: Final = 0xA701
OUT_OF_RESOURCES_UNABLE_TO_PERFORM_SUB_OPERATIONS: Final = 0xA702
MOVE_DESTINATION_UNKNOWN: Final = 0xA801
DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
CANNOT_UNDERSTAND: Final = 0xC000
UNABLE_TO_PROCESS: Final = 0xC001  # C-FIND, C-MOVE, C-GET failure: "Unable to process", Cxxx
COERCION_OF_DATA_ELEMENTS: Final = 0xB000  # C-STORE warning
SUB_OPERATIONS_COMPLETE_WITH_FAILURES: Final = 0xB000  # C-MOVE/C-GET warning
ELEMENTS_DISCARDED: Final = 0xB006  # C-STORE warning
DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING: Final = 0xB007  # C-STORE warning


_PRIORITY_BY_VALUE: Final[dict[int, Priority]] = {int(p): p for p in Priority}


class StatusCategory(enum.Enum):
    """The category of a DIMSE status, PS3.7 Annex C."""

    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"
    CANCEL = "cancel"
    PENDING = "pending"


_WARNING_CODES: Final = frozenset((0x0001, ATTRIBUTE_LIST_ERROR, ATTRIBUTE_VALUE_OUT_OF_RANGE))


def status_category(status: int) -> StatusCategory:
    """Classify a DIMSE status, PS3.7 Annex C (C.1-C.5) and PS3.4's service statuses.

    0000H success; FF00H/FF01H pending; FE00H cancel; 0001H, 0107H, 0116H and
    Bxxx warning; everything else (01xx, 02xx, A7xx, A9xx, Cxxx, ...) failure.
    """
    if status == SUCCESS:
        return StatusCategory.SUCCESS
    if status in (PENDING, PENDING_WARNING):
        return StatusCategory.PENDING
    if status == CANCEL:
        return StatusCategory.CANCEL
    if status in _WARNING_CODES or 0xB000 <= status <= 0xBFFF:
        return StatusCategory.WARNING
    return StatusCategory.FAILURE


def final_store_status(status: int, comment: str | None,
                       answered_by: str) -> tuple[int, str | None]:
    """A C-STORE status relayed to the one that sent the instance: Pending and Cancel
    are no final C-STORE status (PS3.4 B.2.3), and a sender would take them for
    anything; they become 0110H (processing failure), saying who answered what."""
    if status_category(status) in (StatusCategory.PENDING, StatusCategory.CANCEL):
        return PROCESSING_FAILURE, f"{answered_by} answered 0x{status:04X}, not a final status"
    return status, comment


# --- Command elements, PS3.7 Table E.1-1 and (retired) Table E.2-1 ----------
#: Every group 0000 element: element number -> (VR, keyword).
COMMAND_ELEMENTS: Final[dict[int, tuple[str, str]]] = {
    0x0000: ("UL", "CommandGroupLength"),
    0x0001: ("UL", "CommandLengthToEnd"),  # retired
    0x0002: ("UI", "AffectedSOPClassUID"),
    0x0003: ("UI", "RequestedSOPClassUID"),
    0x0010: ("SH", "CommandRecognitionCode"),  # retired
    0x0100: ("US", "CommandField"),
    0x0110: ("US", "MessageID"),
    0x0120: ("US", "MessageIDBeingRespondedTo"),
    0x0200: ("AE", "Initiator"),  # retired
    0x0300: ("AE", "Receiver"),  # retired
    0x0400: ("AE", "FindLocation"),  # retired
    0x0600: ("AE", "MoveDestination"),
    0x0700: ("US", "Priority"),
    0x0800: ("US", "CommandDataSetType"),
    0x0850: ("US", "NumberOfMatches"),  # retired
    0x0860: ("US", "ResponseSequenceNumber"),  # retired
    0x0900: ("US", "Status"),
    0x0901: ("AT", "OffendingElement"),
    0x0902: ("LO", "ErrorComment"),
    0x0903: ("US", "ErrorID"),
    0x1000: ("UI", "AffectedSOPInstanceUID"),
    0x1001: ("UI", "RequestedSOPInstanceUID"),
    0x1002: ("US", "EventTypeID"),
    0x1005: ("AT", "AttributeIdentifierList"),
    0x1008: ("US", "ActionTypeID"),
    0x1020: ("US", "NumberOfRemainingSuboperations"),
    0x1021: ("US", "NumberOfCompletedSuboperations"),
    0x1022: ("US", "NumberOfFailedSuboperations"),
    0x1023: ("US", "NumberOfWarningSuboperations"),
    0x1030: ("AE", "MoveOriginatorApplicationEntityTitle"),
    0x1031: ("US", "MoveOriginatorMessageID"),
    0x4000: ("LT", "DialogReceiver"),  # retired
    0x4010: ("LT", "TerminalType"),  # retired
    0x5010: ("SH", "MessageSetID"),  # retired
    0x5020: ("SH", "EndMessageID"),  # retired
    0x5110: ("LT", "DisplayFormat"),  # retired
    0x5120: ("LT", "PagePositionID"),  # retired
    0x5130: ("CS", "TextFormatID"),  # retired
    0x5140: ("CS", "NormalReverse"),  # retired
    0x5150: ("CS", "AddGrayScale"),  # retired
    0x5160: ("CS", "Borders"),  # retired
    0x5170: ("IS", "Copies"),  # retired
    0x5180: ("CS", "CommandMagnificationType"),  # retired
    0x5190: ("CS", "Erase"),  # retired
    0x51A0: ("CS", "Print"),  # retired
    0x51B0: ("US", "Overlays"),  # retired
}

# Dataclass field name -> element number, for the fields messages carry.
_FIELD_TAGS: Final[dict[str, int]] = {
    "affected_sop_class_uid": 0x0002,
    "requested_sop_class_uid": 0x0003,
    "message_id": 0x0110,
    "message_id_being_responded_to": 0x0120,
    "move_destination": 0x0600,
    "priority": 0x0700,
    "has_dataset": 0x0800,
    "status": 0x0900,
    "offending_element": 0x0901,
    "error_comment": 0x0902,
    "error_id": 0x0903,
    "affected_sop_instance_uid": 0x1000,
    "requested_sop_instance_uid": 0x1001,
    "event_type_id": 0x1002,
    "attribute_identifier_list": 0x1005,
    "action_type_id": 0x1008,
    "number_of_remaining_sub_operations": 0x1020,
    "number_of_completed_sub_operations": 0x1021,
    "number_of_failed_sub_operations": 0x1022,
    "number_of_warning_sub_operations": 0x1023,
    "move_originator_application_entity_title": 0x1030,
    "move_originator_message_id": 0x1031,
}
_COMMAND_FIELD_TAG: Final = 0x0100
_DATASET_TYPE_TAG: Final = 0x0800

# Value kinds the codec knows: the VRs of the elements messages carry, plus
# _PR (US holding a Priority) and _DS (US holding the Command Data Set Type,
# a bool in the dataclass).
_US, _UI, _AE, _LO, _AT, _PR, _DS = range(7)
_KIND_OF_VR: Final = {"US": _US, "UI": _UI, "AE": _AE, "LO": _LO, "AT": _AT}


@dataclass(frozen=True, slots=True, kw_only=True)
class _Slot:
    """One command element of one message type (precomputed once per class)."""

    tag: int  # element number; the group is always 0000
    name: str  # dataclass field; "" for Command Field
    kind: int
    mandatory: bool
    keyword: str


# --- Message classes --------------------------------------------------------


class DimseCommand:
    """Base of every DIMSE message class: the command field, the dataset flag.

    Subclasses are frozen dataclasses; see :data:`DimseMessage` for the union.
    """

    __slots__ = ()
    command_field: ClassVar[CommandField]
    _layout: ClassVar[tuple[_Slot, ...]]
    _checks: ClassVar[tuple[tuple[str, bool, Callable[[object, str, object], str | None]], ...]]
    _decoders: ClassVar[tuple[tuple[int, str, Callable[[_Slot, bytes], object], _Slot], ...]]
    if TYPE_CHECKING:
        has_dataset: bool

    def __post_init__(self) -> None:
        # Validate every field against its VR (PS3.5 Table 6.2-1) and PS3.7's
        # value ranges; coerce ints to Priority and sequences to tuples.
        # (_checks is the precomputed (name, mandatory, validator) per field.)
        if type(self.has_dataset) is not bool:
            raise LocalProtocolError(f"{self._name()}.has_dataset must be a bool")
        for name, mandatory, validator in self._checks:
            value = getattr(self, name)
            if value is None:
                if mandatory:
                    raise LocalProtocolError(f"{self._name()}.{name} is mandatory")
                continue
            problem = validator(self, name, value)
            if problem:
                raise LocalProtocolError(f"{self._name()}.{name} {problem}: {value!r}")

    @classmethod
    def _name(cls) -> str:
        return cls.command_field.name.replace("_", "-")


class DimseRequest(DimseCommand):
    """Base of the request messages that open an operation (all but C-CANCEL-RQ)."""

    __slots__ = ()
    if TYPE_CHECKING:
        message_id: int


class DimseResponse(DimseCommand):
    """Base of the response messages: they all carry a status (PS3.7 Annex C)."""

    __slots__ = ()
    if TYPE_CHECKING:
        message_id_being_responded_to: int
        status: int
        error_comment: str | None
        error_id: int | None
        offending_element: tuple[int, ...] | None

    @property
    def category(self) -> StatusCategory:
        """The category of ``status``, PS3.7 Annex C."""
        return status_category(self.status)


@dataclass(frozen=True, slots=True, kw_only=True)
class CEchoRQ(DimseRequest):
    """C-ECHO-RQ, PS3.7 §9.3.5.1 (Table 9.3-12)."""

    command_field: ClassVar[CommandField] = CommandField.C_ECHO_RQ
    message_id: int
    affected_sop_class_uid: str
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CEchoRSP(DimseResponse):
    """C-ECHO-RSP, PS3.7 §9.3.5.2 (Table 9.3-13)."""

    command_field: ClassVar[CommandField] = CommandField.C_ECHO_RSP
    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    offending_element: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CStoreRQ(DimseRequest):
    """C-STORE-RQ, PS3.7 §9.3.1.1 (Table 9.3-1)."""

    command_field: ClassVar[CommandField] = CommandField.C_STORE_RQ
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    priority: Priority = Priority.MEDIUM
    move_originator_application_entity_title: str | None = None
    move_originator_message_id: int | None = None
    has_dataset: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class CStoreRSP(DimseResponse):
    """C-STORE-RSP, PS3.7 §9.3.1.2 (Table 9.3-2)."""

    command_field: ClassVar[CommandField] = CommandField.C_STORE_RSP
    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    offending_element: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CFindRQ(DimseRequest):
    """C-FIND-RQ, PS3.7 §9.3.2.1 (Table 9.3-3); the identifier follows."""

    command_field: ClassVar[CommandField] = CommandField.C_FIND_RQ
    message_id: int
    affected_sop_class_uid: str
    priority: Priority = Priority.MEDIUM
    has_dataset: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class CFindRSP(DimseResponse):
    """C-FIND-RSP, PS3.7 §9.3.2.2 (Table 9.3-4); pending ones carry an identifier."""

    command_field: ClassVar[CommandField] = CommandField.C_FIND_RSP
    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    offending_element: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CGetRQ(DimseRequest):
    """C-GET-RQ, PS3.7 §9.3.3.1 (Table 9.3-5); the identifier follows."""

    command_field: ClassVar[CommandField] = CommandField.C_GET_RQ
    message_id: int
    affected_sop_class_uid: str
    priority: Priority = Priority.MEDIUM
    has_dataset: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class CGetRSP(DimseResponse):
    """C-GET-RSP, PS3.7 §9.3.3.2 (Table 9.3-6)."""

    command_field: ClassVar[CommandField] = CommandField.C_GET_RSP
    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    number_of_remaining_sub_operations: int | None = None
    number_of_completed_sub_operations: int | None = None
    number_of_failed_sub_operations: int | None = None
    number_of_warning_sub_operations: int | None = None
    offending_element: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CMoveRQ(DimseRequest):
    """C-MOVE-RQ, PS3.7 §9.3.4.1 (Table 9.3-7); the identifier follows."""

    command_field: ClassVar[CommandField] = CommandField.C_MOVE_RQ
    message_id: int
    affected_sop_class_uid: str
    move_destination: str
    priority: Priority = Priority.MEDIUM
    has_dataset: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class CMoveRSP(DimseResponse):
    """C-MOVE-RSP, PS3.7 §9.3.4.2 (Table 9.3-8)."""

    command_field: ClassVar[CommandField] = CommandField.C_MOVE_RSP
    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    number_of_remaining_sub_operations: int | None = None
    number_of_completed_sub_operations: int | None = None
    number_of_failed_sub_operations: int | None = None
    number_of_warning_sub_operations: int | None = None
    offending_element: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CCancelRQ(DimseCommand):
    """C-CANCEL-RQ, PS3.7 §9.3.2.3 (Table 9.3-9), also for C-GET and C-MOVE."""

    command_field: ClassVar[CommandField] = CommandField.C_CANCEL_RQ
    message_id_being_responded_to: int
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class NEventReportRQ(DimseRequest):
    """N-EVENT-REPORT-RQ, PS3.7 §10.3.1.1 (Table 10.3-1); event information may follow."""

    command_field: ClassVar[CommandField] = CommandField.N_EVENT_REPORT_RQ
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    event_type_id: int
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class NEventReportRSP(DimseResponse):
    """N-EVENT-REPORT-RSP, PS3.7 §10.3.1.2 (Table 10.3-2)."""

    command_field: ClassVar[CommandField] = CommandField.N_EVENT_REPORT_RSP
    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    event_type_id: int | None = None
    offending_element: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class NGetRQ(DimseRequest):
    """N-GET-RQ, PS3.7 §10.3.2.1 (Table 10.3-3)."""

    command_field: ClassVar[CommandField] = CommandField.N_GET_RQ
    message_id: int
    requested_sop_class_uid: str
    requested_sop_instance_uid: str
    attribute_identifier_list: tuple[int, ...] | None = None
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class NGetRSP(DimseResponse):
    """N-GET-RSP, PS3.7 §10.3.2.2 (Table 10.3-4); the attribute list may follow."""

    command_field: ClassVar[CommandField] = CommandField.N_GET_RSP
    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    attribute_identifier_list: tuple[int, ...] | None = None
    offending_element: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class NSetRQ(DimseRequest):
    """N-SET-RQ, PS3.7 §10.3.3.1 (Table 10.3-5); the modification list follows."""

    command_field: ClassVar[CommandField] = CommandField.N_SET_RQ
    message_id: int
    requested_sop_class_uid: str
    requested_sop_instance_uid: str
    has_dataset: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class NSetRSP(DimseResponse):
    """N-SET-RSP, PS3.7 §10.3.3.2 (Table 10.3-6)."""

    command_field: ClassVar[CommandField] = CommandField.N_SET_RSP
    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    attribute_identifier_list: tuple[int, ...] | None = None
    offending_element: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class NActionRQ(DimseRequest):
    """N-ACTION-RQ, PS3.7 §10.3.4.1 (Table 10.3-7); action information may follow."""

    command_field: ClassVar[CommandField] = CommandField.N_ACTION_RQ
    message_id: int
    requested_sop_class_uid: str
    requested_sop_instance_uid: str
    action_type_id: int
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class NActionRSP(DimseResponse):
    """N-ACTION-RSP, PS3.7 §10.3.4.2 (Table 10.3-8)."""

    command_field: ClassVar[CommandField] = CommandField.N_ACTION_RSP
    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    action_type_id: int | None = None
    offending_element: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class NCreateRQ(DimseRequest):
    """N-CREATE-RQ, PS3.7 §10.3.5.1 (Table 10.3-9); the attribute list follows."""

    command_field: ClassVar[CommandField] = CommandField.N_CREATE_RQ
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str | None = None
    has_dataset: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class NCreateRSP(DimseResponse):
    """N-CREATE-RSP, PS3.7 §10.3.5.2 (Table 10.3-10)."""

    command_field: ClassVar[CommandField] = CommandField.N_CREATE_RSP
    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    attribute_identifier_list: tuple[int, ...] | None = None
    offending_element: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class NDeleteRQ(DimseRequest):
    """N-DELETE-RQ, PS3.7 §10.3.6.1 (Table 10.3-11)."""

    command_field: ClassVar[CommandField] = CommandField.N_DELETE_RQ
    message_id: int
    requested_sop_class_uid: str
    requested_sop_instance_uid: str
    has_dataset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class NDeleteRSP(DimseResponse):
    """N-DELETE-RSP, PS3.7 §10.3.6.2 (Table 10.3-12)."""

    command_field: ClassVar[CommandField] = CommandField.N_DELETE_RSP
    message_id_being_responded_to: int
    status: int
    affected_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    offending_element: tuple[int, ...] | None = None
    error_comment: str | None = None
    error_id: int | None = None
    has_dataset: bool = False


DimseMessage: TypeAlias = (
    CEchoRQ
    | CEchoRSP
    | CStoreRQ
    | CStoreRSP
    | CFindRQ
    | CFindRSP
    | CGetRQ
    | CGetRSP
    | CMoveRQ
    | CMoveRSP
    | CCancelRQ
    | NEventReportRQ
    | NEventReportRSP
    | NGetRQ
    | NGetRSP
    | NSetRQ
    | NSetRSP
    | NActionRQ
    | NActionRSP
    | NCreateRQ
    | NCreateRSP
    | NDeleteRQ
    | NDeleteRSP
)

#: Command Field -> message class.
MESSAGE_TYPES: Final[dict[CommandField, type[DimseMessage]]] = {
    cls.command_field: cls
    for cls in (
        CEchoRQ,
        CEchoRSP,
        CStoreRQ,
        CStoreRSP,
        CFindRQ,
        CFindRSP,
        CGetRQ,
        CGetRSP,
        CMoveRQ,
        CMoveRSP,
        CCancelRQ,
        NEventReportRQ,
        NEventReportRSP,
        NGetRQ,
        NGetRSP,
        NSetRQ,
        NSetRSP,
        NActionRQ,
        NActionRSP,
        NCreateRQ,
        NCreateRSP,
        NDeleteRQ,
        NDeleteRSP,
    )
}

# Keyed by the plain int so decoding needs no enum construction per message.
_MESSAGE_BY_VALUE: Final[dict[int, type[DimseMessage]]] = {
    int(field): cls for field, cls in MESSAGE_TYPES.items()
}


def is_request(msg: DimseMessage) -> bool:
    """True for requests (bit 15 of the Command Field clear), PS3.7 Table E.1-1."""
    return not msg.command_field & 0x8000


# --- Validation -------------------------------------------------------------


def _check_us(_msg: object, _name: str, value: object) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return "must be an int"
    if not 0 <= value <= 0xFFFF:
        return "must be in 0..65535 (US)"
    return None


def _check_priority(msg: object, name: str, value: object) -> str | None:
    if isinstance(value, Priority):
        return None
    member = _PRIORITY_BY_VALUE.get(value) if type(value) is int else None
    if member is not None:
        object.__setattr__(msg, name, member)
        return None
    return "must be a Priority (0, 1 or 2)"


def _check_uid(_msg: object, _name: str, value: object) -> str | None:
    if not isinstance(value, str) or not is_valid_uid(value):
        return "must be a UID of 1-64 digits and dots (PS3.5 §9.1)"
    return None


def error_comment(text: str) -> str | None:
    """``text`` made a valid Error Comment (0000,0902): LO, 1-64 characters of the
    default repertoire, no backslash, no padding (PS3.7 C.4, PS3.5 6.2). Anything
    else becomes "?", runs of blanks one space; None if nothing is left. A reason
    worded for the log (a host name, a rule's name in any language) may then go to
    a peer without making the response itself invalid."""
    clean = "".join(c if c.isascii() and c.isprintable() and c != "\\" else
                    (" " if c.isspace() else "?") for c in text)
    clean = " ".join(clean.split())[:64].rstrip()
    return clean or None


def _printable(value: str) -> bool:
    # Default character repertoire without control characters or backslash
    # (the value delimiter), PS3.5 §6.1.2 / Table 6.2-1.
    return value.isascii() and value.isprintable() and "\\" not in value


def _check_ae(_msg: object, _name: str, value: object) -> str | None:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= 16
        or not _printable(value)
        or value.strip(" ") != value
    ):
        return "must be an AE title of 1-16 printable ASCII characters, unpadded (PS3.5 AE)"
    return None


def _check_lo(_msg: object, _name: str, value: object) -> str | None:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= 64
        or not _printable(value)
        or value.strip(" ") != value
    ):
        return "must be 1-64 printable ASCII characters, unpadded (PS3.5 LO)"
    return None


def _check_at(msg: object, name: str, value: object) -> str | None:
    if isinstance(value, list):
        value = tuple(value)
        object.__setattr__(msg, name, value)
    if (
        not isinstance(value, tuple)
        or not value
        or not all(type(t) is int and 0 <= t <= 0xFFFFFFFF for t in value)
    ):
        return "must be a non-empty tuple of tags (ints 0..0xFFFFFFFF)"
    return None


_VALIDATORS: Final[dict[int, Callable[[object, str, object], str | None]]] = {
    _US: _check_us,
    _PR: _check_priority,
    _UI: _check_uid,
    _AE: _check_ae,
    _LO: _check_lo,
    _AT: _check_at,
}


def _build_layout(cls: type[DimseCommand]) -> tuple[_Slot, ...]:
    """The command elements of one message class, in ascending tag order."""
    slots = [
        _Slot(tag=_COMMAND_FIELD_TAG, name="", kind=_US, mandatory=True, keyword="CommandField")
    ]
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tag = _FIELD_TAGS[f.name]
        vr, keyword = COMMAND_ELEMENTS[tag]
        kind = {"priority": _PR, "has_dataset": _DS}.get(f.name, _KIND_OF_VR[vr])
        # Mandatory: no default (message ids, status, ...), or a default that
        # is not None (priority, has_dataset): always written, must be read.
        mandatory = f.default is not None
        slots.append(_Slot(tag=tag, name=f.name, kind=kind, mandatory=mandatory, keyword=keyword))
    return tuple(sorted(slots, key=lambda s: s.tag))


for _cls in MESSAGE_TYPES.values():
    _cls._layout = _build_layout(_cls)
    _cls._checks = tuple(
        (slot.name, slot.mandatory, _VALIDATORS[slot.kind])
        for slot in _cls._layout
        if slot.name and slot.kind != _DS
    )


# --- Encoding ---------------------------------------------------------------

_HEADER = struct.Struct("<HHI")  # implicit VR LE: group, element, length
_US_ELEMENT = struct.Struct("<HHIH")
_UL_ELEMENT = struct.Struct("<HHII")
_TAG = struct.Struct("<HH")


def _encode_string(tag: int, raw: bytes, pad: bytes) -> bytes:
    if len(raw) & 1:
        raw += pad
    return _HEADER.pack(0, tag, len(raw)) + raw


def encode_command(msg: DimseMessage) -> bytes:
    """Encode ``msg``'s command set, PS3.7 §6.3.1 and Annex E.

    Implicit VR little endian, ascending tag order, Command Group Length
    (0000,0000) first; UIDs padded to even length with NUL, other strings with
    space (PS3.5 §6.2); absent optional elements are not written.
    """
    parts: list[bytes] = []
    append = parts.append
    for slot in msg._layout:
        kind = slot.kind
        if not slot.name:
            append(_US_ELEMENT.pack(0, slot.tag, 2, msg.command_field))
            continue
        value = getattr(msg, slot.name)
        if value is None:
            continue
        if kind in (_US, _PR):
            append(_US_ELEMENT.pack(0, slot.tag, 2, value))
        elif kind == _DS:
            append(_US_ELEMENT.pack(0, slot.tag, 2, _DATASET_PRESENT if value else NO_DATASET))
        elif kind == _UI:
            append(_encode_string(slot.tag, value.encode("ascii"), b"\x00"))
        elif kind == _AT:
            raw = b"".join([_TAG.pack(t >> 16, t & 0xFFFF) for t in value])
            append(_HEADER.pack(0, slot.tag, len(raw)) + raw)
        else:  # AE, LO
            append(_encode_string(slot.tag, value.encode("ascii"), b" "))
    body = b"".join(parts)
    return _UL_ELEMENT.pack(0, 0x0000, 4, len(body)) + body


# --- Decoding ---------------------------------------------------------------


def _text(raw: bytes) -> str:
    # Strip the padding (PS3.5 §6.2: space; NUL too, which some peers use).
    return raw.strip(b" \x00").decode("ascii")


def _lenient_text(raw: bytes) -> str:
    # Error Comment is informational: never refuse a response because of it.
    # Non-printable characters become "?" and it is cut to LO's 64 characters.
    text = raw.strip(b" \x00").decode("ascii", errors="replace")
    text = "".join(c if c.isascii() and c.isprintable() and c != "\\" else "?" for c in text)
    return text[:64].strip(" ")


def _convert_us(slot: _Slot, raw: bytes) -> object:
    if len(raw) != 2:
        raise DIMSEError(
            f"(0000,{slot.tag:04X}) {slot.keyword}: US value of {len(raw)} bytes, expected 2",
            status=MISTYPED_ARGUMENT,
        )
    return raw[0] | raw[1] << 8


def _convert_ds(slot: _Slot, raw: bytes) -> object:
    return _convert_us(slot, raw) != NO_DATASET


def _convert_at(slot: _Slot, raw: bytes) -> object:
    if len(raw) % 4:
        raise DIMSEError(
            f"(0000,{slot.tag:04X}) {slot.keyword}: AT value of {len(raw)} bytes, "
            "not a multiple of 4",
            status=MISTYPED_ARGUMENT,
        )
    return tuple(g << 16 | e for g, e in _TAG.iter_unpack(raw))


def _convert_lo(slot: _Slot, raw: bytes) -> object:
    return _lenient_text(raw) or None


def _convert_text(slot: _Slot, raw: bytes) -> object:  # UI, AE
    return _text(raw) or None


# How each kind of element's value bytes become the dataclass field's value.
_CONVERTERS: Final[dict[int, Callable[[_Slot, bytes], object]]] = {
    _US: _convert_us,
    _PR: _convert_us,
    _DS: _convert_ds,
    _AT: _convert_at,
    _LO: _convert_lo,
    _UI: _convert_text,
    _AE: _convert_text,
}


def _convert(slot: _Slot, raw: bytes) -> object:
    """Turn one element's value bytes into the dataclass field's value."""
    return _CONVERTERS[slot.kind](slot, raw)


for _cls in MESSAGE_TYPES.values():
    _cls._decoders = tuple(
        (slot.tag, slot.name, _CONVERTERS[slot.kind], slot) for slot in _cls._layout if slot.name
    )


def peek_command(data: bytes | bytearray | memoryview) -> tuple[int, int, bool] | None:
    """Command Field, Message ID (or Message ID Being Responded To) and whether a
    data set follows, read leniently from a command set ``decode_command``
    refused; ``None`` when even these cannot be found.

    With them an invalid request can still be answered with a failure status
    (PS3.7 Annex C: 0211H, 0212H, C000H) instead of aborting the association.
    """
    buf = bytes(data)
    found: dict[int, int] = {}
    offset, end = 0, len(buf)
    while end - offset >= 8:
        group, element, length = _HEADER.unpack_from(buf, offset)
        offset += 8
        if group != 0x0000 or length > end - offset:
            return None
        if element in (0x0100, 0x0110, 0x0120, 0x0800) and length == 2:
            found[element] = buf[offset] | buf[offset + 1] << 8
        offset += length
    field = found.get(0x0100)
    message_id = found.get(0x0120 if field is not None and field & 0x8000 else 0x0110)
    if field is None or message_id is None:
        return None
    return field, message_id, found.get(0x0800, NO_DATASET) != NO_DATASET


def decode_command(data: bytes | bytearray | memoryview) -> DimseMessage:
    """Decode a command set (implicit VR little endian, PS3.7 §6.3.1, Annex E).

    Raises :class:`~router.dicom.errors.DIMSEError` for anything it cannot
    turn into a valid message -- and nothing else, whatever the input.
    """
    try:
        return _decode(bytes(data))
    except DIMSEError:
        raise
    except LocalProtocolError as exc:  # a value the message class rejects
        raise DIMSEError(f"invalid command set: {exc}", status=MISTYPED_ARGUMENT) from exc
    except (struct.error, IndexError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise DIMSEError(f"malformed command set: {exc}", status=CANNOT_UNDERSTAND) from exc


def _decode(buf: bytes) -> DimseMessage:
    values: dict[int, bytes] = {}
    end = len(buf)
    offset = 0
    unpack_header = _HEADER.unpack_from
    while end - offset >= 8:
        group, element, length = unpack_header(buf, offset)
        if group != 0x0000 and values:
            # Elements of other groups after the command elements: not a command set's
            # (PS3.7 §6.3.1), but Orthanc puts Failed SOP Instance UID List (0008,0058)
            # in its C-GET-RSP command set, and DCMTK and pynetdicom ignore such
            # elements. Ignored here too: aborting lost the response and its counts.
            break
        if group != 0x0000:
            raise DIMSEError(
                f"element ({group:04X},{element:04X}) at offset {offset} is not in "
                "group 0000: not a command set (PS3.7 §6.3.1)",
                status=CANNOT_UNDERSTAND,
            )
        offset += 8
        if length > end - offset:  # also catches undefined length (FFFFFFFFH)
            raise DIMSEError(
                f"(0000,{element:04X}) at offset {offset - 8}: value length {length} "
                f"exceeds the {end - offset} bytes left",
                status=CANNOT_UNDERSTAND,
            )
        if element in values:
            raise DIMSEError(
                f"(0000,{element:04X}) appears twice in the command set", status=CANNOT_UNDERSTAND
            )
        values[element] = buf[offset : offset + length]
        offset += length
    if offset != end and end - offset < 8 and buf[offset:].strip(b"\x00"):
        raise DIMSEError(
            f"{end - offset} trailing bytes after the last element of the command set",
            status=CANNOT_UNDERSTAND,
        )

    raw_field = values.get(_COMMAND_FIELD_TAG)
    if raw_field is None:
        raise DIMSEError("command set has no (0000,0100) CommandField", status=CANNOT_UNDERSTAND)
    if len(raw_field) != 2:
        raise DIMSEError(
            f"(0000,0100) CommandField: US value of {len(raw_field)} bytes, expected 2",
            status=MISTYPED_ARGUMENT,
        )
    field_value = raw_field[0] | raw_field[1] << 8
    cls = _MESSAGE_BY_VALUE.get(field_value)
    if cls is None:
        raise DIMSEError(
            f"unknown (0000,0100) CommandField {field_value:#06x}", status=UNRECOGNIZED_OPERATION
        )

    kwargs: dict[str, object] = {}
    for tag, name, convert, slot in cls._decoders:
        raw = values.get(tag)
        value = convert(slot, raw) if raw else None
        if value is None:
            if slot.mandatory:
                raise DIMSEError(
                    f"{cls._name()} without its mandatory (0000,{slot.tag:04X}) {slot.keyword}",
                    status=CANNOT_UNDERSTAND,
                )
            continue
        kwargs[name] = value
    return cls(**kwargs)  # type: ignore[arg-type]
