"""Tests for router.dicom.dimse: the DIMSE command set codec, PS3.7 §9, §10, Annex E.

Byte fixtures
-------------
``*_BYTES`` below are command sets laid out from the PS3.7 message tables
(§9.3 and §10.3) element by element, each commented with what it decodes to.
They were produced with pydicom's implicit VR little endian writer -- not with
the codec under test -- and checked by eye against PS3.7 Table E.1-1.
``DCMTK_*`` are command sets captured on the wire from DCMTK 3.6.7 tools
(echoscu, storescu, findscu, movescu, getscu, storescp, dcmqrscp).
"""

from __future__ import annotations

import dataclasses
import struct
import time
from io import BytesIO
from typing import Any

import pydicom.datadict
import pytest
from pynetdicom import dimse_messages, dimse_primitives
from pynetdicom.dsutils import decode as pynetdicom_decode
from pynetdicom.dsutils import encode as pynetdicom_encode

from router.dicom import dimse
from router.dicom.dimse import (
    CANCEL,
    CANNOT_UNDERSTAND,
    COMMAND_ELEMENTS,
    MESSAGE_TYPES,
    MISTYPED_ARGUMENT,
    PENDING,
    PENDING_WARNING,
    SUCCESS,
    UNRECOGNIZED_OPERATION,
    CCancelRQ,
    CEchoRQ,
    CEchoRSP,
    CFindRQ,
    CFindRSP,
    CGetRQ,
    CGetRSP,
    CMoveRQ,
    CMoveRSP,
    CommandField,
    CStoreRQ,
    CStoreRSP,
    DimseMessage,
    DimseResponse,
    NActionRQ,
    NActionRSP,
    NCreateRQ,
    NCreateRSP,
    NDeleteRQ,
    NDeleteRSP,
    NEventReportRQ,
    NEventReportRSP,
    NGetRQ,
    NGetRSP,
    NSetRQ,
    NSetRSP,
    Priority,
    StatusCategory,
    decode_command,
    encode_command,
    is_request,
    status_category,
)
from router.dicom.errors import DIMSEError, LocalProtocolError

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
PATIENT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
COMMITMENT = "1.2.840.10008.1.20.1"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
MPPS = "1.2.840.10008.3.1.2.3.3"
PRINTER = "1.2.840.10008.5.1.1.16"
PRINTER_INSTANCE = "1.2.840.10008.5.1.1.17"
FILM_SESSION = "1.2.840.10008.5.1.1.1"

# ---------------------------------------------------------------------------
# One fixture per message type, PS3.7 §9.3 and §10.3
# ---------------------------------------------------------------------------

C_ECHO_RQ_BYTES = (
    # (0000,0000) UL CommandGroupLength = 56
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x38\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.1.1'
    b"\x00\x00\x02\x00\x12\x00\x00\x00"
    b"1.2.840.10008.1.1\x00"
    # (0000,0100) US CommandField = 0x0030
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x30\x00"
    # (0000,0110) US MessageID = 1
    b"\x00\x00\x10\x01\x02\x00\x00\x00"
    b"\x01\x00"
    # (0000,0800) US CommandDataSetType = 0x0101
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x01"
)

C_ECHO_RSP_BYTES = (
    # (0000,0000) UL CommandGroupLength = 66
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x42\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.1.1'
    b"\x00\x00\x02\x00\x12\x00\x00\x00"
    b"1.2.840.10008.1.1\x00"
    # (0000,0100) US CommandField = 0x8030
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x30\x80"
    # (0000,0120) US MessageIDBeingRespondedTo = 1
    b"\x00\x00\x20\x01\x02\x00\x00\x00"
    b"\x01\x00"
    # (0000,0800) US CommandDataSetType = 0x0101
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x01"
    # (0000,0900) US Status = 0x0000
    b"\x00\x00\x00\x09\x02\x00\x00\x00"
    b"\x00\x00"
)

C_STORE_RQ_BYTES = (
    # (0000,0000) UL CommandGroupLength = 118
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x76\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.5.1.4.1.1.2'
    b"\x00\x00\x02\x00\x1a\x00\x00\x00"
    b"1.2.840.10008.5.1.4.1.1.2\x00"
    # (0000,0100) US CommandField = 0x0001
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x01\x00"
    # (0000,0110) US MessageID = 7
    b"\x00\x00\x10\x01\x02\x00\x00\x00"
    b"\x07\x00"
    # (0000,0700) US Priority = 1
    b"\x00\x00\x00\x07\x02\x00\x00\x00"
    b"\x01\x00"
    # (0000,0800) US CommandDataSetType = 0x0001
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x00"
    # (0000,1000) UI AffectedSOPInstanceUID = '1.2.3.4.5'
    b"\x00\x00\x00\x10\x0a\x00\x00\x00"
    b"1.2.3.4.5\x00"
    # (0000,1030) AE MoveOriginatorApplicationEntityTitle = 'MOVESCU'
    b"\x00\x00\x30\x10\x08\x00\x00\x00"
    b"MOVESCU "
    # (0000,1031) US MoveOriginatorMessageID = 3
    b"\x00\x00\x31\x10\x02\x00\x00\x00"
    b"\x03\x00"
)

C_STORE_RSP_BYTES = (
    # (0000,0000) UL CommandGroupLength = 134
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x86\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.5.1.4.1.1.2'
    b"\x00\x00\x02\x00\x1a\x00\x00\x00"
    b"1.2.840.10008.5.1.4.1.1.2\x00"
    # (0000,0100) US CommandField = 0x8001
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x01\x80"
    # (0000,0120) US MessageIDBeingRespondedTo = 7
    b"\x00\x00\x20\x01\x02\x00\x00\x00"
    b"\x07\x00"
    # (0000,0800) US CommandDataSetType = 0x0101
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x01"
    # (0000,0900) US Status = 0xb000
    b"\x00\x00\x00\x09\x02\x00\x00\x00"
    b"\x00\xb0"
    # (0000,0901) AT OffendingElement = (0010,0010), (0010,0020)
    b"\x00\x00\x01\x09\x08\x00\x00\x00"
    b"\x10\x00\x10\x00\x10\x00\x20\x00"
    # (0000,0902) LO ErrorComment = 'Coerced'
    b"\x00\x00\x02\x09\x08\x00\x00\x00"
    b"Coerced "
    # (0000,0903) US ErrorID = 42
    b"\x00\x00\x03\x09\x02\x00\x00\x00"
    b"\x2a\x00"
    # (0000,1000) UI AffectedSOPInstanceUID = '1.2.3.4.5'
    b"\x00\x00\x00\x10\x0a\x00\x00\x00"
    b"1.2.3.4.5\x00"
)

C_FIND_RQ_BYTES = (
    # (0000,0000) UL CommandGroupLength = 76
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x4c\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.5.1.4.1.2.2.1'
    b"\x00\x00\x02\x00\x1c\x00\x00\x00"
    b"1.2.840.10008.5.1.4.1.2.2.1\x00"
    # (0000,0100) US CommandField = 0x0020
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x20\x00"
    # (0000,0110) US MessageID = 2
    b"\x00\x00\x10\x01\x02\x00\x00\x00"
    b"\x02\x00"
    # (0000,0700) US Priority = 2
    b"\x00\x00\x00\x07\x02\x00\x00\x00"
    b"\x02\x00"
    # (0000,0800) US CommandDataSetType = 0x0001
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x00"
)

C_FIND_RSP_BYTES = (
    # (0000,0000) UL CommandGroupLength = 76
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x4c\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.5.1.4.1.2.2.1'
    b"\x00\x00\x02\x00\x1c\x00\x00\x00"
    b"1.2.840.10008.5.1.4.1.2.2.1\x00"
    # (0000,0100) US CommandField = 0x8020
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x20\x80"
    # (0000,0120) US MessageIDBeingRespondedTo = 2
    b"\x00\x00\x20\x01\x02\x00\x00\x00"
    b"\x02\x00"
    # (0000,0800) US CommandDataSetType = 0x0001
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x00"
    # (0000,0900) US Status = 0xff00
    b"\x00\x00\x00\x09\x02\x00\x00\x00"
    b"\x00\xff"
)

C_GET_RQ_BYTES = (
    # (0000,0000) UL CommandGroupLength = 76
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x4c\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.5.1.4.1.2.2.3'
    b"\x00\x00\x02\x00\x1c\x00\x00\x00"
    b"1.2.840.10008.5.1.4.1.2.2.3\x00"
    # (0000,0100) US CommandField = 0x0010
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x10\x00"
    # (0000,0110) US MessageID = 3
    b"\x00\x00\x10\x01\x02\x00\x00\x00"
    b"\x03\x00"
    # (0000,0700) US Priority = 0
    b"\x00\x00\x00\x07\x02\x00\x00\x00"
    b"\x00\x00"
    # (0000,0800) US CommandDataSetType = 0x0001
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x00"
)

C_GET_RSP_BYTES = (
    # (0000,0000) UL CommandGroupLength = 116
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x74\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.5.1.4.1.2.2.3'
    b"\x00\x00\x02\x00\x1c\x00\x00\x00"
    b"1.2.840.10008.5.1.4.1.2.2.3\x00"
    # (0000,0100) US CommandField = 0x8010
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x10\x80"
    # (0000,0120) US MessageIDBeingRespondedTo = 3
    b"\x00\x00\x20\x01\x02\x00\x00\x00"
    b"\x03\x00"
    # (0000,0800) US CommandDataSetType = 0x0101
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x01"
    # (0000,0900) US Status = 0xff00
    b"\x00\x00\x00\x09\x02\x00\x00\x00"
    b"\x00\xff"
    # (0000,1020) US NumberOfRemainingSuboperations = 5
    b"\x00\x00\x20\x10\x02\x00\x00\x00"
    b"\x05\x00"
    # (0000,1021) US NumberOfCompletedSuboperations = 2
    b"\x00\x00\x21\x10\x02\x00\x00\x00"
    b"\x02\x00"
    # (0000,1022) US NumberOfFailedSuboperations = 1
    b"\x00\x00\x22\x10\x02\x00\x00\x00"
    b"\x01\x00"
    # (0000,1023) US NumberOfWarningSuboperations = 0
    b"\x00\x00\x23\x10\x02\x00\x00\x00"
    b"\x00\x00"
)

C_MOVE_RQ_BYTES = (
    # (0000,0000) UL CommandGroupLength = 92
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x5c\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.5.1.4.1.2.2.2'
    b"\x00\x00\x02\x00\x1c\x00\x00\x00"
    b"1.2.840.10008.5.1.4.1.2.2.2\x00"
    # (0000,0100) US CommandField = 0x0021
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x21\x00"
    # (0000,0110) US MessageID = 4
    b"\x00\x00\x10\x01\x02\x00\x00\x00"
    b"\x04\x00"
    # (0000,0600) AE MoveDestination = 'STORESCP'
    b"\x00\x00\x00\x06\x08\x00\x00\x00"
    b"STORESCP"
    # (0000,0700) US Priority = 0
    b"\x00\x00\x00\x07\x02\x00\x00\x00"
    b"\x00\x00"
    # (0000,0800) US CommandDataSetType = 0x0001
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x00"
)

C_MOVE_RSP_BYTES = (
    # (0000,0000) UL CommandGroupLength = 134
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x86\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.5.1.4.1.2.2.2'
    b"\x00\x00\x02\x00\x1c\x00\x00\x00"
    b"1.2.840.10008.5.1.4.1.2.2.2\x00"
    # (0000,0100) US CommandField = 0x8021
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x21\x80"
    # (0000,0120) US MessageIDBeingRespondedTo = 4
    b"\x00\x00\x20\x01\x02\x00\x00\x00"
    b"\x04\x00"
    # (0000,0800) US CommandDataSetType = 0x0101
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x01"
    # (0000,0900) US Status = 0xa801
    b"\x00\x00\x00\x09\x02\x00\x00\x00"
    b"\x01\xa8"
    # (0000,0902) LO ErrorComment = 'Unknown destination'
    b"\x00\x00\x02\x09\x14\x00\x00\x00"
    b"Unknown destination "
    # (0000,1021) US NumberOfCompletedSuboperations = 0
    b"\x00\x00\x21\x10\x02\x00\x00\x00"
    b"\x00\x00"
    # (0000,1022) US NumberOfFailedSuboperations = 0
    b"\x00\x00\x22\x10\x02\x00\x00\x00"
    b"\x00\x00"
    # (0000,1023) US NumberOfWarningSuboperations = 0
    b"\x00\x00\x23\x10\x02\x00\x00\x00"
    b"\x00\x00"
)

C_CANCEL_RQ_BYTES = (
    # (0000,0000) UL CommandGroupLength = 30
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x1e\x00\x00\x00"
    # (0000,0100) US CommandField = 0x0fff
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\xff\x0f"
    # (0000,0120) US MessageIDBeingRespondedTo = 2
    b"\x00\x00\x20\x01\x02\x00\x00\x00"
    b"\x02\x00"
    # (0000,0800) US CommandDataSetType = 0x0101
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x01"
)

N_EVENT_REPORT_RQ_BYTES = (
    # (0000,0000) UL CommandGroupLength = 98
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x62\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.1.20.1'
    b"\x00\x00\x02\x00\x14\x00\x00\x00"
    b"1.2.840.10008.1.20.1"
    # (0000,0100) US CommandField = 0x0100
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x00\x01"
    # (0000,0110) US MessageID = 5
    b"\x00\x00\x10\x01\x02\x00\x00\x00"
    b"\x05\x00"
    # (0000,0800) US CommandDataSetType = 0x0001
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x00"
    # (0000,1000) UI AffectedSOPInstanceUID = '1.2.840.10008.1.20.1.1'
    b"\x00\x00\x00\x10\x16\x00\x00\x00"
    b"1.2.840.10008.1.20.1.1"
    # (0000,1002) US EventTypeID = 1
    b"\x00\x00\x02\x10\x02\x00\x00\x00"
    b"\x01\x00"
)

N_EVENT_REPORT_RSP_BYTES = (
    # (0000,0000) UL CommandGroupLength = 108
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x6c\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.1.20.1'
    b"\x00\x00\x02\x00\x14\x00\x00\x00"
    b"1.2.840.10008.1.20.1"
    # (0000,0100) US CommandField = 0x8100
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x00\x81"
    # (0000,0120) US MessageIDBeingRespondedTo = 5
    b"\x00\x00\x20\x01\x02\x00\x00\x00"
    b"\x05\x00"
    # (0000,0800) US CommandDataSetType = 0x0101
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x01"
    # (0000,0900) US Status = 0x0000
    b"\x00\x00\x00\x09\x02\x00\x00\x00"
    b"\x00\x00"
    # (0000,1000) UI AffectedSOPInstanceUID = '1.2.840.10008.1.20.1.1'
    b"\x00\x00\x00\x10\x16\x00\x00\x00"
    b"1.2.840.10008.1.20.1.1"
    # (0000,1002) US EventTypeID = 1
    b"\x00\x00\x02\x10\x02\x00\x00\x00"
    b"\x01\x00"
)

N_GET_RQ_BYTES = (
    # (0000,0000) UL CommandGroupLength = 106
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x6a\x00\x00\x00"
    # (0000,0003) UI RequestedSOPClassUID = '1.2.840.10008.5.1.1.16'
    b"\x00\x00\x03\x00\x16\x00\x00\x00"
    b"1.2.840.10008.5.1.1.16"
    # (0000,0100) US CommandField = 0x0110
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x10\x01"
    # (0000,0110) US MessageID = 6
    b"\x00\x00\x10\x01\x02\x00\x00\x00"
    b"\x06\x00"
    # (0000,0800) US CommandDataSetType = 0x0101
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x01"
    # (0000,1001) UI RequestedSOPInstanceUID = '1.2.840.10008.5.1.1.17'
    b"\x00\x00\x01\x10\x16\x00\x00\x00"
    b"1.2.840.10008.5.1.1.17"
    # (0000,1005) AT AttributeIdentifierList = (2110,0010), (2110,0030)
    b"\x00\x00\x05\x10\x08\x00\x00\x00"
    b"\x10\x21\x10\x00\x10\x21\x30\x00"
)

N_GET_RSP_BYTES = (
    # (0000,0000) UL CommandGroupLength = 112
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x70\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.5.1.1.16'
    b"\x00\x00\x02\x00\x16\x00\x00\x00"
    b"1.2.840.10008.5.1.1.16"
    # (0000,0100) US CommandField = 0x8110
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x10\x81"
    # (0000,0120) US MessageIDBeingRespondedTo = 6
    b"\x00\x00\x20\x01\x02\x00\x00\x00"
    b"\x06\x00"
    # (0000,0800) US CommandDataSetType = 0x0001
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x00"
    # (0000,0900) US Status = 0x0107
    b"\x00\x00\x00\x09\x02\x00\x00\x00"
    b"\x07\x01"
    # (0000,1000) UI AffectedSOPInstanceUID = '1.2.840.10008.5.1.1.17'
    b"\x00\x00\x00\x10\x16\x00\x00\x00"
    b"1.2.840.10008.5.1.1.17"
    # (0000,1005) AT AttributeIdentifierList = (2110,0030)
    b"\x00\x00\x05\x10\x04\x00\x00\x00"
    b"\x10\x21\x30\x00"
)

N_SET_RQ_BYTES = (
    # (0000,0000) UL CommandGroupLength = 80
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x50\x00\x00\x00"
    # (0000,0003) UI RequestedSOPClassUID = '1.2.840.10008.3.1.2.3.3'
    b"\x00\x00\x03\x00\x18\x00\x00\x00"
    b"1.2.840.10008.3.1.2.3.3\x00"
    # (0000,0100) US CommandField = 0x0120
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x20\x01"
    # (0000,0110) US MessageID = 8
    b"\x00\x00\x10\x01\x02\x00\x00\x00"
    b"\x08\x00"
    # (0000,0800) US CommandDataSetType = 0x0001
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x00"
    # (0000,1001) UI RequestedSOPInstanceUID = '1.2.3.4.8'
    b"\x00\x00\x01\x10\x0a\x00\x00\x00"
    b"1.2.3.4.8\x00"
)

N_SET_RSP_BYTES = (
    # (0000,0000) UL CommandGroupLength = 130
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x82\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.3.1.2.3.3'
    b"\x00\x00\x02\x00\x18\x00\x00\x00"
    b"1.2.840.10008.3.1.2.3.3\x00"
    # (0000,0100) US CommandField = 0x8120
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x20\x81"
    # (0000,0120) US MessageIDBeingRespondedTo = 8
    b"\x00\x00\x20\x01\x02\x00\x00\x00"
    b"\x08\x00"
    # (0000,0800) US CommandDataSetType = 0x0101
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x01"
    # (0000,0900) US Status = 0x0106
    b"\x00\x00\x00\x09\x02\x00\x00\x00"
    b"\x06\x01"
    # (0000,0901) AT OffendingElement = (0040,0252)
    b"\x00\x00\x01\x09\x04\x00\x00\x00"
    b"\x40\x00\x52\x02"
    # (0000,0902) LO ErrorComment = 'Bad status'
    b"\x00\x00\x02\x09\x0a\x00\x00\x00"
    b"Bad status"
    # (0000,0903) US ErrorID = 1
    b"\x00\x00\x03\x09\x02\x00\x00\x00"
    b"\x01\x00"
    # (0000,1000) UI AffectedSOPInstanceUID = '1.2.3.4.8'
    b"\x00\x00\x00\x10\x0a\x00\x00\x00"
    b"1.2.3.4.8\x00"
)

N_ACTION_RQ_BYTES = (
    # (0000,0000) UL CommandGroupLength = 98
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x62\x00\x00\x00"
    # (0000,0003) UI RequestedSOPClassUID = '1.2.840.10008.1.20.1'
    b"\x00\x00\x03\x00\x14\x00\x00\x00"
    b"1.2.840.10008.1.20.1"
    # (0000,0100) US CommandField = 0x0130
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x30\x01"
    # (0000,0110) US MessageID = 9
    b"\x00\x00\x10\x01\x02\x00\x00\x00"
    b"\x09\x00"
    # (0000,0800) US CommandDataSetType = 0x0001
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x00"
    # (0000,1001) UI RequestedSOPInstanceUID = '1.2.840.10008.1.20.1.1'
    b"\x00\x00\x01\x10\x16\x00\x00\x00"
    b"1.2.840.10008.1.20.1.1"
    # (0000,1008) US ActionTypeID = 1
    b"\x00\x00\x08\x10\x02\x00\x00\x00"
    b"\x01\x00"
)

N_ACTION_RSP_BYTES = (
    # (0000,0000) UL CommandGroupLength = 108
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x6c\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.1.20.1'
    b"\x00\x00\x02\x00\x14\x00\x00\x00"
    b"1.2.840.10008.1.20.1"
    # (0000,0100) US CommandField = 0x8130
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x30\x81"
    # (0000,0120) US MessageIDBeingRespondedTo = 9
    b"\x00\x00\x20\x01\x02\x00\x00\x00"
    b"\x09\x00"
    # (0000,0800) US CommandDataSetType = 0x0101
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x01"
    # (0000,0900) US Status = 0x0000
    b"\x00\x00\x00\x09\x02\x00\x00\x00"
    b"\x00\x00"
    # (0000,1000) UI AffectedSOPInstanceUID = '1.2.840.10008.1.20.1.1'
    b"\x00\x00\x00\x10\x16\x00\x00\x00"
    b"1.2.840.10008.1.20.1.1"
    # (0000,1008) US ActionTypeID = 1
    b"\x00\x00\x08\x10\x02\x00\x00\x00"
    b"\x01\x00"
)

N_CREATE_RQ_BYTES = (
    # (0000,0000) UL CommandGroupLength = 80
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x50\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.3.1.2.3.3'
    b"\x00\x00\x02\x00\x18\x00\x00\x00"
    b"1.2.840.10008.3.1.2.3.3\x00"
    # (0000,0100) US CommandField = 0x0140
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x40\x01"
    # (0000,0110) US MessageID = 10
    b"\x00\x00\x10\x01\x02\x00\x00\x00"
    b"\x0a\x00"
    # (0000,0800) US CommandDataSetType = 0x0001
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x00"
    # (0000,1000) UI AffectedSOPInstanceUID = '1.2.3.4.10'
    b"\x00\x00\x00\x10\x0a\x00\x00\x00"
    b"1.2.3.4.10"
)

N_CREATE_RSP_BYTES = (
    # (0000,0000) UL CommandGroupLength = 90
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x5a\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.3.1.2.3.3'
    b"\x00\x00\x02\x00\x18\x00\x00\x00"
    b"1.2.840.10008.3.1.2.3.3\x00"
    # (0000,0100) US CommandField = 0x8140
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x40\x81"
    # (0000,0120) US MessageIDBeingRespondedTo = 10
    b"\x00\x00\x20\x01\x02\x00\x00\x00"
    b"\x0a\x00"
    # (0000,0800) US CommandDataSetType = 0x0101
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x01"
    # (0000,0900) US Status = 0x0000
    b"\x00\x00\x00\x09\x02\x00\x00\x00"
    b"\x00\x00"
    # (0000,1000) UI AffectedSOPInstanceUID = '1.2.3.4.10'
    b"\x00\x00\x00\x10\x0a\x00\x00\x00"
    b"1.2.3.4.10"
)

N_DELETE_RQ_BYTES = (
    # (0000,0000) UL CommandGroupLength = 78
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x4e\x00\x00\x00"
    # (0000,0003) UI RequestedSOPClassUID = '1.2.840.10008.5.1.1.1'
    b"\x00\x00\x03\x00\x16\x00\x00\x00"
    b"1.2.840.10008.5.1.1.1\x00"
    # (0000,0100) US CommandField = 0x0150
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x50\x01"
    # (0000,0110) US MessageID = 11
    b"\x00\x00\x10\x01\x02\x00\x00\x00"
    b"\x0b\x00"
    # (0000,0800) US CommandDataSetType = 0x0101
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x01"
    # (0000,1001) UI RequestedSOPInstanceUID = '1.2.3.4.11'
    b"\x00\x00\x01\x10\x0a\x00\x00\x00"
    b"1.2.3.4.11"
)

N_DELETE_RSP_BYTES = (
    # (0000,0000) UL CommandGroupLength = 88
    b"\x00\x00\x00\x00\x04\x00\x00\x00"
    b"\x58\x00\x00\x00"
    # (0000,0002) UI AffectedSOPClassUID = '1.2.840.10008.5.1.1.1'
    b"\x00\x00\x02\x00\x16\x00\x00\x00"
    b"1.2.840.10008.5.1.1.1\x00"
    # (0000,0100) US CommandField = 0x8150
    b"\x00\x00\x00\x01\x02\x00\x00\x00"
    b"\x50\x81"
    # (0000,0120) US MessageIDBeingRespondedTo = 11
    b"\x00\x00\x20\x01\x02\x00\x00\x00"
    b"\x0b\x00"
    # (0000,0800) US CommandDataSetType = 0x0101
    b"\x00\x00\x00\x08\x02\x00\x00\x00"
    b"\x01\x01"
    # (0000,0900) US Status = 0x0112
    b"\x00\x00\x00\x09\x02\x00\x00\x00"
    b"\x12\x01"
    # (0000,1000) UI AffectedSOPInstanceUID = '1.2.3.4.11'
    b"\x00\x00\x00\x10\x0a\x00\x00\x00"
    b"1.2.3.4.11"
)


#: name -> (fixture bytes, the message they decode to)
FIXTURES: dict[str, tuple[bytes, DimseMessage]] = {
    "C-ECHO-RQ": (
        C_ECHO_RQ_BYTES,
        CEchoRQ(message_id=1, affected_sop_class_uid="1.2.840.10008.1.1"),
    ),
    "C-ECHO-RSP": (
        C_ECHO_RSP_BYTES,
        CEchoRSP(
            message_id_being_responded_to=1,
            status=SUCCESS,
            affected_sop_class_uid="1.2.840.10008.1.1",
        ),
    ),
    "C-STORE-RQ": (
        C_STORE_RQ_BYTES,
        CStoreRQ(
            message_id=7,
            affected_sop_class_uid=CT,
            affected_sop_instance_uid="1.2.3.4.5",
            priority=Priority.HIGH,
            move_originator_application_entity_title="MOVESCU",
            move_originator_message_id=3,
        ),
    ),
    "C-STORE-RSP": (
        C_STORE_RSP_BYTES,
        CStoreRSP(
            message_id_being_responded_to=7,
            status=0xB000,
            affected_sop_class_uid=CT,
            affected_sop_instance_uid="1.2.3.4.5",
            offending_element=(0x00100010, 0x00100020),
            error_comment="Coerced",
            error_id=42,
        ),
    ),
    "C-FIND-RQ": (
        C_FIND_RQ_BYTES,
        CFindRQ(message_id=2, affected_sop_class_uid=STUDY_FIND, priority=Priority.LOW),
    ),
    "C-FIND-RSP": (
        C_FIND_RSP_BYTES,
        CFindRSP(
            message_id_being_responded_to=2,
            status=PENDING,
            affected_sop_class_uid=STUDY_FIND,
            has_dataset=True,
        ),
    ),
    "C-GET-RQ": (C_GET_RQ_BYTES, CGetRQ(message_id=3, affected_sop_class_uid=STUDY_GET)),
    "C-GET-RSP": (
        C_GET_RSP_BYTES,
        CGetRSP(
            message_id_being_responded_to=3,
            status=PENDING,
            affected_sop_class_uid=STUDY_GET,
            number_of_remaining_sub_operations=5,
            number_of_completed_sub_operations=2,
            number_of_failed_sub_operations=1,
            number_of_warning_sub_operations=0,
        ),
    ),
    "C-MOVE-RQ": (
        C_MOVE_RQ_BYTES,
        CMoveRQ(message_id=4, affected_sop_class_uid=STUDY_MOVE, move_destination="STORESCP"),
    ),
    "C-MOVE-RSP": (
        C_MOVE_RSP_BYTES,
        CMoveRSP(
            message_id_being_responded_to=4,
            status=0xA801,
            affected_sop_class_uid=STUDY_MOVE,
            error_comment="Unknown destination",
            number_of_completed_sub_operations=0,
            number_of_failed_sub_operations=0,
            number_of_warning_sub_operations=0,
        ),
    ),
    "C-CANCEL-RQ": (C_CANCEL_RQ_BYTES, CCancelRQ(message_id_being_responded_to=2)),
    "N-EVENT-REPORT-RQ": (
        N_EVENT_REPORT_RQ_BYTES,
        NEventReportRQ(
            message_id=5,
            affected_sop_class_uid=COMMITMENT,
            affected_sop_instance_uid=COMMITMENT_INSTANCE,
            event_type_id=1,
            has_dataset=True,
        ),
    ),
    "N-EVENT-REPORT-RSP": (
        N_EVENT_REPORT_RSP_BYTES,
        NEventReportRSP(
            message_id_being_responded_to=5,
            status=SUCCESS,
            affected_sop_class_uid=COMMITMENT,
            affected_sop_instance_uid=COMMITMENT_INSTANCE,
            event_type_id=1,
        ),
    ),
    "N-GET-RQ": (
        N_GET_RQ_BYTES,
        NGetRQ(
            message_id=6,
            requested_sop_class_uid=PRINTER,
            requested_sop_instance_uid=PRINTER_INSTANCE,
            attribute_identifier_list=(0x21100010, 0x21100030),
        ),
    ),
    "N-GET-RSP": (
        N_GET_RSP_BYTES,
        NGetRSP(
            message_id_being_responded_to=6,
            status=0x0107,
            affected_sop_class_uid=PRINTER,
            affected_sop_instance_uid=PRINTER_INSTANCE,
            attribute_identifier_list=(0x21100030,),
            has_dataset=True,
        ),
    ),
    "N-SET-RQ": (
        N_SET_RQ_BYTES,
        NSetRQ(message_id=8, requested_sop_class_uid=MPPS, requested_sop_instance_uid="1.2.3.4.8"),
    ),
    "N-SET-RSP": (
        N_SET_RSP_BYTES,
        NSetRSP(
            message_id_being_responded_to=8,
            status=0x0106,
            affected_sop_class_uid=MPPS,
            affected_sop_instance_uid="1.2.3.4.8",
            offending_element=(0x00400252,),
            error_comment="Bad status",
            error_id=1,
        ),
    ),
    "N-ACTION-RQ": (
        N_ACTION_RQ_BYTES,
        NActionRQ(
            message_id=9,
            requested_sop_class_uid=COMMITMENT,
            requested_sop_instance_uid=COMMITMENT_INSTANCE,
            action_type_id=1,
            has_dataset=True,
        ),
    ),
    "N-ACTION-RSP": (
        N_ACTION_RSP_BYTES,
        NActionRSP(
            message_id_being_responded_to=9,
            status=SUCCESS,
            affected_sop_class_uid=COMMITMENT,
            affected_sop_instance_uid=COMMITMENT_INSTANCE,
            action_type_id=1,
        ),
    ),
    "N-CREATE-RQ": (
        N_CREATE_RQ_BYTES,
        NCreateRQ(
            message_id=10, affected_sop_class_uid=MPPS, affected_sop_instance_uid="1.2.3.4.10"
        ),
    ),
    "N-CREATE-RSP": (
        N_CREATE_RSP_BYTES,
        NCreateRSP(
            message_id_being_responded_to=10,
            status=SUCCESS,
            affected_sop_class_uid=MPPS,
            affected_sop_instance_uid="1.2.3.4.10",
        ),
    ),
    "N-DELETE-RQ": (
        N_DELETE_RQ_BYTES,
        NDeleteRQ(
            message_id=11,
            requested_sop_class_uid=FILM_SESSION,
            requested_sop_instance_uid="1.2.3.4.11",
        ),
    ),
    "N-DELETE-RSP": (
        N_DELETE_RSP_BYTES,
        NDeleteRSP(
            message_id_being_responded_to=11,
            status=0x0112,
            affected_sop_class_uid=FILM_SESSION,
            affected_sop_instance_uid="1.2.3.4.11",
        ),
    ),
}

MESSAGES = [message for _, message in FIXTURES.values()]


def _ids(value: object) -> str:
    return type(value).__name__


def test_one_fixture_per_command_field() -> None:
    # PS3.7 Table E.1-1 defines 23 Command Field values, one per message.
    assert len(FIXTURES) == len(CommandField) == len(MESSAGE_TYPES) == 23
    assert {type(m) for m in MESSAGES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize(("raw", "expected"), FIXTURES.values(), ids=FIXTURES.keys())
def test_fixture_decodes(raw: bytes, expected: DimseMessage) -> None:
    assert decode_command(raw) == expected


@pytest.mark.parametrize(("raw", "message"), FIXTURES.values(), ids=FIXTURES.keys())
def test_fixture_encodes(raw: bytes, message: DimseMessage) -> None:
    assert encode_command(message) == raw


# ---------------------------------------------------------------------------
# Round trips, all 23 messages, with every field and with the mandatory ones only
# ---------------------------------------------------------------------------


def _minimal(message: DimseMessage) -> DimseMessage:
    """The same message with only its mandatory fields (no default) given."""
    kwargs = {
        f.name: getattr(message, f.name)
        for f in dataclasses.fields(message)
        if f.default is dataclasses.MISSING
    }
    return type(message)(**kwargs)


@pytest.mark.parametrize("message", MESSAGES, ids=_ids)
def test_round_trip_full(message: DimseMessage) -> None:
    assert decode_command(encode_command(message)) == message


@pytest.mark.parametrize("message", MESSAGES, ids=_ids)
def test_round_trip_mandatory_only(message: DimseMessage) -> None:
    minimal = _minimal(message)
    assert decode_command(encode_command(minimal)) == minimal


@pytest.mark.parametrize("message", MESSAGES, ids=_ids)
@pytest.mark.parametrize("has_dataset", [True, False])
def test_round_trip_dataset_flag(message: DimseMessage, has_dataset: bool) -> None:
    flagged = dataclasses.replace(message, has_dataset=has_dataset)
    raw = encode_command(flagged)
    # (0000,0800): 0101H = no dataset; we write 0001H otherwise (PS3.7 E.1).
    expected = b"\x00\x00\x00\x08\x02\x00\x00\x00" + (b"\x01\x00" if has_dataset else b"\x01\x01")
    assert expected in raw
    assert decode_command(raw).has_dataset is has_dataset


@pytest.mark.parametrize("message", MESSAGES, ids=_ids)
def test_encoding_layout(message: DimseMessage) -> None:
    raw = encode_command(message)
    tags = []
    offset = 0
    while offset < len(raw):
        group, element, length = struct.unpack_from("<HHI", raw, offset)
        assert group == 0
        assert length % 2 == 0, "every value has even length (PS3.5 §7.1)"
        tags.append(element)
        offset += 8 + length
    assert offset == len(raw)
    assert tags == sorted(tags) and tags[0] == 0x0000
    assert struct.unpack_from("<I", raw, 8)[0] == len(raw) - 12  # group length


@pytest.mark.parametrize("message", MESSAGES, ids=_ids)
def test_decode_accepts_bytearray_and_memoryview(message: DimseMessage) -> None:
    raw = encode_command(message)
    assert decode_command(bytearray(raw)) == message
    assert decode_command(memoryview(b"xx" + raw)[2:]) == message


# ---------------------------------------------------------------------------
# pynetdicom as an independent encoder and decoder
# ---------------------------------------------------------------------------

KEYWORDS = {
    "message_id": "MessageID",
    "message_id_being_responded_to": "MessageIDBeingRespondedTo",
    "affected_sop_class_uid": "AffectedSOPClassUID",
    "requested_sop_class_uid": "RequestedSOPClassUID",
    "affected_sop_instance_uid": "AffectedSOPInstanceUID",
    "requested_sop_instance_uid": "RequestedSOPInstanceUID",
    "priority": "Priority",
    "move_destination": "MoveDestination",
    "move_originator_application_entity_title": "MoveOriginatorApplicationEntityTitle",
    "move_originator_message_id": "MoveOriginatorMessageID",
    "status": "Status",
    "error_comment": "ErrorComment",
    "error_id": "ErrorID",
    "offending_element": "OffendingElement",
    "event_type_id": "EventTypeID",
    "action_type_id": "ActionTypeID",
    "attribute_identifier_list": "AttributeIdentifierList",
    "number_of_remaining_sub_operations": "NumberOfRemainingSuboperations",
    "number_of_completed_sub_operations": "NumberOfCompletedSuboperations",
    "number_of_failed_sub_operations": "NumberOfFailedSuboperations",
    "number_of_warning_sub_operations": "NumberOfWarningSuboperations",
}


def _pynetdicom_name(message: DimseMessage) -> str:
    return message.command_field.name  # e.g. "C_STORE_RQ", as pynetdicom names its classes


def _pynetdicom_subset(message: DimseMessage) -> DimseMessage:
    """``message`` without the optional fields pynetdicom's message tables lack."""
    allowed = dimse_messages._COMMAND_SET_KEYWORDS[_pynetdicom_name(message).replace("_", "-")]
    drop: dict[str, Any] = {
        f.name: None
        for f in dataclasses.fields(message)
        if f.name in KEYWORDS and KEYWORDS[f.name] not in allowed
    }
    return dataclasses.replace(message, **drop)


def _pynetdicom_command_set(message: DimseMessage) -> bytes:
    """Encode ``message`` with pynetdicom: primitive -> DIMSE message -> dsutils.encode."""
    name = _pynetdicom_name(message)
    primitive_name = name.rsplit("_", 1)[0]
    primitive = getattr(dimse_primitives, primitive_name)()
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if f.name == "has_dataset" or value is None:
            continue
        setattr(primitive, KEYWORDS[f.name], list(value) if isinstance(value, tuple) else value)
    if message.has_dataset:
        setattr(primitive, dimse_messages._DATASET_KEYWORDS[name], BytesIO(b"\x08\x00"))
    pyn_message = getattr(dimse_messages, name)()
    pyn_message.primitive_to_message(primitive)
    raw = pynetdicom_encode(pyn_message.command_set, True, True)
    assert raw is not None
    return bytes(raw)


@pytest.mark.parametrize("message", MESSAGES, ids=_ids)
def test_same_bytes_as_pynetdicom(message: DimseMessage) -> None:
    subset = _pynetdicom_subset(message)
    assert encode_command(subset) == _pynetdicom_command_set(subset)


@pytest.mark.parametrize("message", MESSAGES, ids=_ids)
def test_decode_pynetdicom_encoding(message: DimseMessage) -> None:
    subset = _pynetdicom_subset(message)
    assert decode_command(_pynetdicom_command_set(subset)) == subset


@pytest.mark.parametrize("message", MESSAGES, ids=_ids)
def test_pynetdicom_decodes_ours(message: DimseMessage) -> None:
    from pynetdicom.pdu_primitives import P_DATA

    pdata = P_DATA()
    # Message control header 03H: command, last fragment (PS3.8 Annex E.2).
    pdv: Any = [1, b"\x03" + encode_command(message)]  # pynetdicom wants a list, not a tuple
    pdata.presentation_data_value_list = [pdv]
    pyn_message = dimse_messages.DIMSEMessage()
    complete = pyn_message.decode_msg(pdata)
    assert complete is not message.has_dataset  # pynetdicom waits for the dataset
    assert type(pyn_message).__name__ == _pynetdicom_name(message)
    assert (pyn_message.command_set.CommandDataSetType != 0x0101) is message.has_dataset
    command_set = pynetdicom_decode(BytesIO(encode_command(message)), True, True)
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if f.name == "has_dataset":
            continue
        keyword = KEYWORDS[f.name]
        if value is None:
            assert keyword not in command_set
        elif isinstance(value, tuple):
            element = command_set[keyword]
            got = [element.value] if element.VM == 1 else list(element.value)
            assert tuple(int(t) for t in got) == value
        else:
            assert command_set[keyword].value == value


# ---------------------------------------------------------------------------
# What real peers send: command sets captured from DCMTK 3.6.7
# ---------------------------------------------------------------------------

DCMTK_HEX = [
    # echoscu
    (
        "0000000004000000380000000000020012000000312e322e3834302e31303030382e312e310000000001"
        "0200000030000000100102000000010000000008020000000101"
    ),
    # storescu CT_small.dcm
    (
        "000000000400000082000000000002001a000000312e322e3834302e31303030382e352e312e342e312e"
        "312e32000000000102000000010000001001020000000100000000070200000000000000000802000000"
        "01000000001030000000312e332e362e312e342e312e353936322e312e312e312e312e312e3230303430"
        "3131393037323733302e313233323200"
    ),
    # findscu -P
    (
        "00000000040000004c000000000002001c000000312e322e3834302e31303030382e352e312e342e312e"
        "322e312e3100000000010200000020000000100102000000010000000007020000000000000000080200"
        "00000100"
    ),
    # findscu -S
    (
        "00000000040000004c000000000002001c000000312e322e3834302e31303030382e352e312e342e312e"
        "322e322e3100000000010200000020000000100102000000010000000007020000000000000000080200"
        "00000100"
    ),
    # movescu -S -aem DEST
    (
        "000000000400000058000000000002001c000000312e322e3834302e31303030382e352e312e342e312e"
        "322e322e3200000000010200000021000000100102000000010000000006040000004445535400000007"
        "02000000000000000008020000000100"
    ),
    # getscu -S
    (
        "00000000040000004c000000000002001c000000312e322e3834302e31303030382e352e312e342e312e"
        "322e322e3300000000010200000010000000100102000000010000000007020000000000000000080200"
        "00000100"
    ),
    # storescp answering C-ECHO
    (
        "0000000004000000420000000000020012000000312e322e3834302e31303030382e312e310000000001"
        "020000003080000020010200000001000000000802000000010100000009020000000000"
    ),
    # storescp answering C-STORE
    (
        "000000000400000082000000000002001a000000312e322e3834302e31303030382e352e312e342e312e"
        "312e32000000000102000000018000002001020000000100000000080200000001010000000902000000"
        "00000000001030000000312e332e362e312e342e312e353936322e312e312e312e312e312e3230303430"
        "3131393037323733302e313233323200"
    ),
    # dcmqrscp C-FIND pending, an identifier follows
    (
        "00000000040000004c000000000002001c000000312e322e3834302e31303030382e352e312e342e312e"
        "322e322e3100000000010200000020800000200102000000010000000008020000000100000000090200"
        "000000ff"
    ),
    # dcmqrscp C-FIND final
    (
        "00000000040000004c000000000002001c000000312e322e3834302e31303030382e352e312e342e312e"
        "322e322e3100000000010200000020800000200102000000010000000008020000000101000000090200"
        "00000000"
    ),
    # dcmqrscp C-FIND refused: C000H, no Error Comment
    (
        "00000000040000004c000000000002001c000000312e322e3834302e31303030382e352e312e342e312e"
        "322e322e3100000000010200000020800000200102000000010000000008020000000101000000090200"
        "000000c0"
    ),
    # dcmqrscp C-MOVE sub-operation: priority LOW, originator "PYSCU" padded to "PYSCU "
    (
        "00000000040000009a000000000002001a000000312e322e3834302e31303030382e352e312e342e312e"
        "312e32000000000102000000010000001001020000000100000000070200000002000000000802000000"
        "01000000001030000000312e332e362e312e342e312e353936322e312e312e312e312e312e3230303430"
        "3131393037323733302e313233323200000030100600000050595343552000003110020000000100"
    ),
    # dcmqrscp C-MOVE pending: counts, Remaining included
    (
        "000000000400000074000000000002001c000000312e322e3834302e31303030382e352e312e342e312e"
        "322e322e3200000000010200000021800000200102000000010000000008020000000101000000090200"
        "000000ff0000201002000000000000002110020000000100000022100200000000000000231002000000"
        "0000"
    ),
    # dcmqrscp C-MOVE final: no Remaining (PS3.4 C.4.2.1.6)
    (
        "00000000040000006a000000000002001c000000312e322e3834302e31303030382e352e312e342e312e"
        "322e322e3200000000010200000021800000200102000000010000000008020000000101000000090200"
        "00000000000021100200000001000000221002000000000000002310020000000000"
    ),
    # dcmqrscp C-MOVE to an unknown AE: A801H
    (
        "00000000040000006a000000000002001c000000312e322e3834302e31303030382e352e312e342e312e"
        "322e322e3200000000010200000021800000200102000000010000000008020000000101000000090200"
        "000001a8000021100200000000000000221002000000000000002310020000000000"
    ),
    # dcmqrscp C-GET sub-operation: priority LOW, no originator
    (
        "000000000400000082000000000002001a000000312e322e3834302e31303030382e352e312e342e312e"
        "312e32000000000102000000010000001001020000000100000000070200000002000000000802000000"
        "01000000001030000000312e332e362e312e342e312e353936322e312e312e312e312e312e3230303430"
        "3131393037323733302e313233323200"
    ),
    # dcmqrscp C-GET pending
    (
        "000000000400000074000000000002001c000000312e322e3834302e31303030382e352e312e342e312e"
        "322e322e3300000000010200000010800000200102000000010000000008020000000101000000090200"
        "000000ff0000201002000000000000002110020000000100000022100200000000000000231002000000"
        "0000"
    ),
    # dcmqrscp C-GET final
    (
        "00000000040000006a000000000002001c000000312e322e3834302e31303030382e352e312e342e312e"
        "322e322e3300000000010200000010800000200102000000010000000008020000000101000000090200"
        "00000000000021100200000001000000221002000000000000002310020000000000"
    ),
]

_CT_SMALL = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
# What each of DCMTK_HEX decodes to, in the same order.
DCMTK_EXPECTED: list[DimseMessage] = [
    CEchoRQ(message_id=1, affected_sop_class_uid="1.2.840.10008.1.1"),
    CStoreRQ(message_id=1, affected_sop_class_uid=CT, affected_sop_instance_uid=_CT_SMALL),
    CFindRQ(message_id=1, affected_sop_class_uid=PATIENT_FIND),
    CFindRQ(message_id=1, affected_sop_class_uid=STUDY_FIND),
    CMoveRQ(message_id=1, affected_sop_class_uid=STUDY_MOVE, move_destination="DEST"),
    CGetRQ(message_id=1, affected_sop_class_uid=STUDY_GET),
    CEchoRSP(
        message_id_being_responded_to=1, status=SUCCESS, affected_sop_class_uid="1.2.840.10008.1.1"
    ),
    CStoreRSP(
        message_id_being_responded_to=1,
        status=SUCCESS,
        affected_sop_class_uid=CT,
        affected_sop_instance_uid=_CT_SMALL,
    ),
    CFindRSP(
        message_id_being_responded_to=1,
        status=PENDING,
        affected_sop_class_uid=STUDY_FIND,
        has_dataset=True,
    ),
    CFindRSP(message_id_being_responded_to=1, status=SUCCESS, affected_sop_class_uid=STUDY_FIND),
    CFindRSP(message_id_being_responded_to=1, status=0xC000, affected_sop_class_uid=STUDY_FIND),
    CStoreRQ(
        message_id=1,
        affected_sop_class_uid=CT,
        affected_sop_instance_uid=_CT_SMALL,
        priority=Priority.LOW,
        move_originator_application_entity_title="PYSCU",
        move_originator_message_id=1,
    ),
    CMoveRSP(
        message_id_being_responded_to=1,
        status=PENDING,
        affected_sop_class_uid=STUDY_MOVE,
        number_of_remaining_sub_operations=0,
        number_of_completed_sub_operations=1,
        number_of_failed_sub_operations=0,
        number_of_warning_sub_operations=0,
    ),
    CMoveRSP(
        message_id_being_responded_to=1,
        status=SUCCESS,
        affected_sop_class_uid=STUDY_MOVE,
        number_of_completed_sub_operations=1,
        number_of_failed_sub_operations=0,
        number_of_warning_sub_operations=0,
    ),
    CMoveRSP(
        message_id_being_responded_to=1,
        status=0xA801,
        affected_sop_class_uid=STUDY_MOVE,
        number_of_completed_sub_operations=0,
        number_of_failed_sub_operations=0,
        number_of_warning_sub_operations=0,
    ),
    CStoreRQ(
        message_id=1,
        affected_sop_class_uid=CT,
        affected_sop_instance_uid=_CT_SMALL,
        priority=Priority.LOW,
    ),
    CGetRSP(
        message_id_being_responded_to=1,
        status=PENDING,
        affected_sop_class_uid=STUDY_GET,
        number_of_remaining_sub_operations=0,
        number_of_completed_sub_operations=1,
        number_of_failed_sub_operations=0,
        number_of_warning_sub_operations=0,
    ),
    CGetRSP(
        message_id_being_responded_to=1,
        status=SUCCESS,
        affected_sop_class_uid=STUDY_GET,
        number_of_completed_sub_operations=1,
        number_of_failed_sub_operations=0,
        number_of_warning_sub_operations=0,
    ),
]
DCMTK = list(zip(DCMTK_HEX, DCMTK_EXPECTED, strict=True))


@pytest.mark.parametrize(("hex_bytes", "expected"), DCMTK, ids=lambda v: type(v).__name__)
def test_dcmtk_command_sets(hex_bytes: str, expected: DimseMessage) -> None:
    raw = bytes.fromhex(hex_bytes)
    assert decode_command(raw) == expected
    # DCMTK and we agree to the byte: same order, padding and dataset flag values.
    assert encode_command(expected) == raw


# ---------------------------------------------------------------------------
# Tolerance: what decoding accepts
# ---------------------------------------------------------------------------


def _el(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _us(element: int, value: int) -> bytes:
    return _el(element, struct.pack("<H", value))


ECHO_ELEMENTS = [
    _el(0x0002, b"1.2.840.10008.1.1\x00"),
    _us(0x0100, 0x0030),
    _us(0x0110, 9),
    _us(0x0800, 0x0101),
]
ECHO = CEchoRQ(message_id=9, affected_sop_class_uid="1.2.840.10008.1.1")


def test_tolerates_missing_group_length() -> None:
    assert decode_command(b"".join(ECHO_ELEMENTS)) == ECHO


def test_tolerates_wrong_group_length() -> None:
    assert decode_command(_el(0x0000, struct.pack("<I", 3)) + b"".join(ECHO_ELEMENTS)) == ECHO


def test_tolerates_elements_out_of_order() -> None:
    assert decode_command(b"".join(reversed(ECHO_ELEMENTS))) == ECHO


@pytest.mark.parametrize(
    "extra",
    [
        _el(0x0001, struct.pack("<I", 60)),  # retired CommandLengthToEnd
        _el(0x0010, b"RECOGNITION "),  # retired CommandRecognitionCode
        _el(0x0200, b"INITIATOR "),  # retired Initiator
        _us(0x0850, 3),  # retired NumberOfMatches
        _el(0x4000, b"dialog"),  # retired DialogReceiver
        _us(0x51B0, 1),  # retired Overlays
        _el(0x0777, b"\x01\x02\x03"),  # unknown, odd length
        _el(0x0600, b"NOT_FOR_ECHO"),  # known, but not part of C-ECHO-RQ
        _el(0x0900, b"\x00\x01\x02"),  # ...even when its value would be malformed
    ],
)
def test_ignores_retired_unknown_and_foreign_elements(extra: bytes) -> None:
    assert decode_command(b"".join([*ECHO_ELEMENTS[:2], extra, *ECHO_ELEMENTS[2:]])) == ECHO


@pytest.mark.parametrize(
    "uid_value",
    [
        b"1.2.840.10008.1.1 ",  # space padding instead of NUL
        b"1.2.840.10008.1.1",  # odd length, no padding
        b"1.2.840.10008.1.1\x00\x00\x00",  # more NULs
        b" 1.2.840.10008.1.1\x00",  # leading space
    ],
)
def test_tolerates_uid_padding(uid_value: bytes) -> None:
    assert decode_command(b"".join([_el(0x0002, uid_value), *ECHO_ELEMENTS[1:]])) == ECHO


@pytest.mark.parametrize("padding", [b"\x00", b"\x00\x00", b"\x00" * 7])
def test_tolerates_trailing_nul_padding(padding: bytes) -> None:
    assert decode_command(b"".join(ECHO_ELEMENTS) + padding) == ECHO


@pytest.mark.parametrize("ae", [b"DEST  ", b"DEST\x00\x00", b" DEST ", b"DEST"])
def test_tolerates_ae_padding(ae: bytes) -> None:
    raw = b"".join(
        [
            _el(0x0002, STUDY_MOVE.encode() + b"\x00"),
            _us(0x0100, 0x0021),
            _us(0x0110, 1),
            _el(0x0600, ae),
            _us(0x0700, 0),
            _us(0x0800, 0x0001),
        ]
    )
    assert decode_command(raw).move_destination == "DEST"  # type: ignore[union-attr]


@pytest.mark.parametrize("flag", [0x0000, 0x0001, 0x0102, 0xFEFE])
def test_any_dataset_type_but_0101_means_a_dataset(flag: int) -> None:
    raw = b"".join([*ECHO_ELEMENTS[:3], _us(0x0800, flag)])
    assert decode_command(raw).has_dataset is True


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"Refused: " + b"x" * 80, "Refused: " + "x" * 55),  # cut to LO's 64 characters
        (b"caf\xe9 \\ bad\n", "caf? ? bad?"),  # non-ASCII, backslash, control characters
        (b"   ", None),  # only padding: absent
    ],
)
def test_error_comment_is_sanitised_not_refused(raw: bytes, expected: str | None) -> None:
    command = b"".join(
        [_us(0x0100, 0x8030), _us(0x0120, 1), _us(0x0800, 0x0101), _us(0x0900, 0x0122)]
    )
    message = decode_command(command + _el(0x0902, raw))
    assert isinstance(message, CEchoRSP)
    assert message.error_comment == expected


def test_empty_optional_values_are_absent() -> None:
    raw = b"".join([_us(0x0100, 0x8001), _us(0x0120, 1), _us(0x0800, 0x0101)])
    raw += _us(0x0900, 0) + _el(0x1000, b"") + _el(0x0002, b"\x00\x00")
    message = decode_command(raw)
    assert isinstance(message, CStoreRSP)
    assert message.affected_sop_instance_uid is None
    assert message.affected_sop_class_uid is None


# ---------------------------------------------------------------------------
# Strictness: malformed input raises DIMSEError and nothing else
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status", "words"),
    [
        (b"", CANNOT_UNDERSTAND, "CommandField"),
        (b"\x01\x00\x00", CANNOT_UNDERSTAND, "trailing"),
        (b"\x00\x00\x00", CANNOT_UNDERSTAND, "CommandField"),  # NUL padding only
        (b"".join(ECHO_ELEMENTS) + b"\x01", CANNOT_UNDERSTAND, "trailing"),
        (b"".join(ECHO_ELEMENTS[:1] + ECHO_ELEMENTS[2:]), CANNOT_UNDERSTAND, "CommandField"),
        (
            b"".join([*ECHO_ELEMENTS[:1], _us(0x0100, 0x0031), *ECHO_ELEMENTS[2:]]),
            UNRECOGNIZED_OPERATION,
            "0x0031",
        ),
        (
            b"".join([*ECHO_ELEMENTS[:1], _el(0x0100, b"\x30\x00\x00\x00"), *ECHO_ELEMENTS[2:]]),
            MISTYPED_ARGUMENT,
            "CommandField",
        ),
        (
            b"".join([*ECHO_ELEMENTS[:2], _el(0x0110, b"\x01"), ECHO_ELEMENTS[3]]),
            MISTYPED_ARGUMENT,
            "MessageID",
        ),
        (
            b"".join([_el(0x0002, b"1.2.abc\x00"), *ECHO_ELEMENTS[1:]]),
            MISTYPED_ARGUMENT,
            "affected_sop_class_uid",
        ),
        (
            b"".join([_el(0x0002, b"1." * 33), *ECHO_ELEMENTS[1:]]),
            MISTYPED_ARGUMENT,
            "affected_sop_class_uid",
        ),
        (
            b"".join([_el(0x0002, b"1.2\xff\x00"), *ECHO_ELEMENTS[1:]]),
            CANNOT_UNDERSTAND,
            "malformed",
        ),
        (
            b"".join([*ECHO_ELEMENTS, ECHO_ELEMENTS[2]]),
            CANNOT_UNDERSTAND,
            "twice",
        ),
        (
            # A data set where the command set belongs: it starts outside group 0000.
            struct.pack("<HHI", 0x0008, 0x0016, 0) + b"".join(ECHO_ELEMENTS),
            CANNOT_UNDERSTAND,
            "group 0000",
        ),
        (
            b"".join(ECHO_ELEMENTS) + struct.pack("<HHI", 0, 0x0902, 0xFFFFFFFF),
            CANNOT_UNDERSTAND,
            "exceeds",
        ),
        (
            b"".join(ECHO_ELEMENTS) + struct.pack("<HHI", 0, 0x0902, 10) + b"short",
            CANNOT_UNDERSTAND,
            "exceeds",
        ),
    ],
)
def test_malformed(raw: bytes, status: int, words: str) -> None:
    with pytest.raises(DIMSEError) as info:
        decode_command(raw)
    assert info.value.status == status
    assert words in str(info.value)


def test_elements_of_other_groups_after_the_command_elements_are_ignored() -> None:
    """Orthanc 1.10 puts Failed SOP Instance UID List (0008,0058) into the command set of
    its final C-GET-RSP. PS3.7 §6.3.1 allows only group 0000 there, but DCMTK and
    pynetdicom read such a response, and aborting the association (as the decoder did)
    lost the response and its sub-operation counts. The elements are ignored, whatever
    follows them; CommandGroupLength is not checked against them either."""
    failed = b"1.2.3.4\1.2.3.5\x00"
    trailing = struct.pack("<HHI", 0x0008, 0x0058, len(failed)) + failed
    message = decode_command(C_GET_RSP_BYTES + trailing)
    assert message == decode_command(C_GET_RSP_BYTES)
    # Even when what follows is not well framed: it is not read at all.
    assert decode_command(C_GET_RSP_BYTES + struct.pack("<HHI", 0x0008, 0x0058, 999)) == message


def test_bad_priority_is_mistyped() -> None:
    raw = encode_command(CFindRQ(message_id=1, affected_sop_class_uid=STUDY_FIND))
    raw = raw.replace(b"\x00\x00\x00\x07\x02\x00\x00\x00\x00\x00", _us(0x0700, 3))
    with pytest.raises(DIMSEError) as info:
        decode_command(raw)
    assert info.value.status == MISTYPED_ARGUMENT
    assert "priority" in str(info.value)


def test_bad_offending_element_length_is_mistyped() -> None:
    raw = encode_command(CEchoRSP(message_id_being_responded_to=1, status=0x0122))
    with pytest.raises(DIMSEError) as info:
        decode_command(raw + _el(0x0901, b"\x10\x00\x10\x00\x20\x00"))
    assert info.value.status == MISTYPED_ARGUMENT


def _mandatory_cases() -> list[tuple[DimseMessage, int, str]]:
    cases = []
    for message in MESSAGES:
        for slot in type(message)._layout:
            if slot.mandatory:
                cases.append((message, slot.tag, slot.keyword))
    return cases


@pytest.mark.parametrize(
    ("message", "element", "keyword"),
    _mandatory_cases(),
    ids=lambda v: v if isinstance(v, str) else type(v).__name__ if not isinstance(v, int) else "",
)
def test_missing_mandatory_element_is_named(
    message: DimseMessage, element: int, keyword: str
) -> None:
    raw = encode_command(message)
    kept = []
    offset = 0
    while offset < len(raw):
        _, tag, length = struct.unpack_from("<HHI", raw, offset)
        if tag != element:
            kept.append(raw[offset : offset + 8 + length])
        offset += 8 + length
    with pytest.raises(DIMSEError) as info:
        decode_command(b"".join(kept))
    assert keyword in str(info.value)
    assert info.value.status == (CANNOT_UNDERSTAND)


# ---------------------------------------------------------------------------
# Construction-time validation (local misuse)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: CEchoRQ(message_id=-1, affected_sop_class_uid="1.2"),
        lambda: CEchoRQ(message_id=65536, affected_sop_class_uid="1.2"),
        lambda: CEchoRQ(message_id=True, affected_sop_class_uid="1.2"),
        lambda: CEchoRQ(message_id="1", affected_sop_class_uid="1.2"),  # type: ignore[arg-type]
        lambda: CEchoRQ(message_id=1, affected_sop_class_uid=""),
        lambda: CEchoRQ(message_id=1, affected_sop_class_uid="1.2.a"),
        lambda: CEchoRQ(message_id=1, affected_sop_class_uid="1" * 65),
        lambda: CEchoRQ(message_id=1, affected_sop_class_uid=None),  # type: ignore[arg-type]
        lambda: CEchoRQ(message_id=1, affected_sop_class_uid="1.2", has_dataset=1),  # type: ignore[arg-type]
        lambda: CMoveRQ(message_id=1, affected_sop_class_uid="1.2", move_destination="A" * 17),
        lambda: CMoveRQ(message_id=1, affected_sop_class_uid="1.2", move_destination=""),
        lambda: CMoveRQ(message_id=1, affected_sop_class_uid="1.2", move_destination="A\\B"),
        lambda: CMoveRQ(message_id=1, affected_sop_class_uid="1.2", move_destination=" AE"),
        lambda: CMoveRQ(message_id=1, affected_sop_class_uid="1.2", move_destination="ÄE"),
        lambda: CFindRQ(message_id=1, affected_sop_class_uid="1.2", priority=3),  # type: ignore[arg-type]
        lambda: CEchoRSP(message_id_being_responded_to=1, status=0x10000),
        lambda: CEchoRSP(message_id_being_responded_to=1, status=0, error_comment="x" * 65),
        lambda: CEchoRSP(message_id_being_responded_to=1, status=0, error_comment="a\nb"),
        lambda: CEchoRSP(message_id_being_responded_to=1, status=0, offending_element=()),
        lambda: CEchoRSP(message_id_being_responded_to=1, status=0, offending_element=(1 << 32,)),
        lambda: CEchoRSP(
            message_id_being_responded_to=1,
            status=0,
            offending_element=("x",),  # type: ignore[arg-type]
        ),
    ],
)
def test_invalid_construction(make: object) -> None:
    with pytest.raises(LocalProtocolError):
        make()  # type: ignore[operator]


def test_construction_coerces_priority_and_tag_lists() -> None:
    rq = CFindRQ(message_id=1, affected_sop_class_uid="1.2", priority=2)  # type: ignore[arg-type]
    assert rq.priority is Priority.LOW
    rsp = CEchoRSP(message_id_being_responded_to=1, status=0, offending_element=[0x00100010])  # type: ignore[arg-type]
    assert rsp.offending_element == (0x00100010,)
    assert hash(rsp) == hash(dataclasses.replace(rsp))


def test_messages_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ECHO.message_id = 2  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Tables: command fields, command elements, statuses
# ---------------------------------------------------------------------------

# PS3.7 Table E.1-1, Command Field (0000,0100).
PS3_7_COMMAND_FIELDS = {
    "C-STORE-RQ": 0x0001,
    "C-STORE-RSP": 0x8001,
    "C-GET-RQ": 0x0010,
    "C-GET-RSP": 0x8010,
    "C-FIND-RQ": 0x0020,
    "C-FIND-RSP": 0x8020,
    "C-MOVE-RQ": 0x0021,
    "C-MOVE-RSP": 0x8021,
    "C-ECHO-RQ": 0x0030,
    "C-ECHO-RSP": 0x8030,
    "N-EVENT-REPORT-RQ": 0x0100,
    "N-EVENT-REPORT-RSP": 0x8100,
    "N-GET-RQ": 0x0110,
    "N-GET-RSP": 0x8110,
    "N-SET-RQ": 0x0120,
    "N-SET-RSP": 0x8120,
    "N-ACTION-RQ": 0x0130,
    "N-ACTION-RSP": 0x8130,
    "N-CREATE-RQ": 0x0140,
    "N-CREATE-RSP": 0x8140,
    "N-DELETE-RQ": 0x0150,
    "N-DELETE-RSP": 0x8150,
    "C-CANCEL-RQ": 0x0FFF,
}


def test_command_fields_match_ps3_7() -> None:
    assert {f.name.replace("_", "-"): f.value for f in CommandField} == PS3_7_COMMAND_FIELDS
    for name, (raw, message) in FIXTURES.items():
        assert message.command_field == PS3_7_COMMAND_FIELDS[name]
        assert (
            struct.unpack_from("<H", raw, raw.index(b"\x00\x00\x00\x01\x02\x00") + 8)[0]
            == (PS3_7_COMMAND_FIELDS[name])
        )


def test_command_elements_match_pydicom_dictionary() -> None:
    group_0000 = {
        tag & 0xFFFF: (entry[0], entry[4])
        for tag, entry in pydicom.datadict.DicomDictionary.items()
        if tag >> 16 == 0
    }
    assert group_0000 == COMMAND_ELEMENTS


def test_priority_values() -> None:
    assert (Priority.LOW, Priority.MEDIUM, Priority.HIGH) == (2, 0, 1)


@pytest.mark.parametrize("message", MESSAGES, ids=_ids)
def test_is_request(message: DimseMessage) -> None:
    name = message.command_field.name
    assert is_request(message) is (name.endswith("_RQ"))
    assert isinstance(message, DimseResponse) is name.endswith("_RSP")


@pytest.mark.parametrize(
    ("status", "category"),
    [
        (0x0000, StatusCategory.SUCCESS),
        (0xFF00, StatusCategory.PENDING),
        (0xFF01, StatusCategory.PENDING),
        (0xFE00, StatusCategory.CANCEL),
        (0x0001, StatusCategory.WARNING),  # optional attributes not supported
        (0x0107, StatusCategory.WARNING),  # attribute list error
        (0x0116, StatusCategory.WARNING),  # attribute value out of range
        (0xB000, StatusCategory.WARNING),  # coercion / sub-operations with failures
        (0xB006, StatusCategory.WARNING),  # elements discarded
        (0xB007, StatusCategory.WARNING),  # dataset does not match SOP class
        (0xBFFF, StatusCategory.WARNING),
        (0x0105, StatusCategory.FAILURE),  # no such attribute
        (0x0106, StatusCategory.FAILURE),  # invalid attribute value
        (0x0110, StatusCategory.FAILURE),  # processing failure
        (0x0111, StatusCategory.FAILURE),  # duplicate SOP instance
        (0x0112, StatusCategory.FAILURE),  # no such SOP instance
        (0x0117, StatusCategory.FAILURE),  # invalid object instance
        (0x0122, StatusCategory.FAILURE),  # SOP class not supported
        (0x0124, StatusCategory.FAILURE),  # not authorized
        (0x0210, StatusCategory.FAILURE),  # duplicate invocation
        (0x0211, StatusCategory.FAILURE),  # unrecognized operation
        (0x0212, StatusCategory.FAILURE),  # mistyped argument
        (0x0213, StatusCategory.FAILURE),  # resource limitation
        (0xA700, StatusCategory.FAILURE),  # out of resources
        (0xA702, StatusCategory.FAILURE),
        (0xA7FF, StatusCategory.FAILURE),
        (0xA801, StatusCategory.FAILURE),  # move destination unknown
        (0xA900, StatusCategory.FAILURE),  # dataset does not match SOP class
        (0xA9FF, StatusCategory.FAILURE),
        (0xC000, StatusCategory.FAILURE),  # cannot understand
        (0xC123, StatusCategory.FAILURE),
        (0xCFFF, StatusCategory.FAILURE),
        (0x0002, StatusCategory.FAILURE),  # undefined: failure
        (0xFE01, StatusCategory.FAILURE),
        (0xFF02, StatusCategory.FAILURE),
    ],
)
def test_status_category(status: int, category: StatusCategory) -> None:
    assert status_category(status) is category
    assert CEchoRSP(message_id_being_responded_to=1, status=status).category is category


def test_status_constants() -> None:
    assert (SUCCESS, PENDING, PENDING_WARNING, CANCEL) == (0x0000, 0xFF00, 0xFF01, 0xFE00)
    assert dimse.SOP_CLASS_NOT_SUPPORTED == 0x0122
    assert dimse.REFUSED_OUT_OF_RESOURCES == 0xA700
    assert dimse.PROCESSING_FAILURE == 0x0110
    assert dimse.CANNOT_UNDERSTAND == 0xC000
    assert dimse.DATASET_DOES_NOT_MATCH_SOP_CLASS == 0xA900
    assert dimse.MOVE_DESTINATION_UNKNOWN == 0xA801
    assert dimse.SUB_OPERATIONS_COMPLETE_WITH_FAILURES == 0xB000
    assert dimse.DUPLICATE_INVOCATION == 0x0210
    assert dimse.UNRECOGNIZED_OPERATION == 0x0211
    assert dimse.MISTYPED_ARGUMENT == 0x0212
    assert dimse.NO_SUCH_SOP_INSTANCE == 0x0112


def test_codec_is_fast_enough() -> None:
    # The hot path: thousands of C-STORE command sets a second per worker.
    rq = FIXTURES["C-STORE-RQ"][1]
    raw = encode_command(rq)
    start = time.perf_counter()
    for _ in range(5000):
        decode_command(encode_command(rq))
    elapsed = time.perf_counter() - start
    assert decode_command(raw) == rq
    assert elapsed < 2.0, f"5000 encode+decode round trips took {elapsed:.2f} s"


@pytest.mark.parametrize(("text", "expected"), [
    ("disk full", "disk full"),
    ("x" * 63 + " y", "x" * 63),  # cut at 64 would leave a trailing space
    ('rule "keine Röntgenbilder"', 'rule "keine R?ntgenbilder"'),
    ("a\\b\tc\n\nd", "a?b c d"),
    ("   ", None),
    ("", None),
    ("\u00e9\u00e9", "??"),
])
def test_error_comment_is_always_valid_lo(text: str, expected: str | None) -> None:
    comment = dimse.error_comment(text)
    assert comment == expected
    if comment is not None:  # what the encoder checks (PS3.5 LO)
        rsp = dimse.CStoreRSP(message_id_being_responded_to=1, status=0xA700,
                              error_comment=comment)
        assert dimse.decode_command(dimse.encode_command(rsp)) == rsp
