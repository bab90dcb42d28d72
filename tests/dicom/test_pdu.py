"""Tests for router.dicom.pdu: the upper-layer PDU codec (PS3.8 §9.3, PS3.7 Annex D).

Byte fixtures are written by hand from the tables of PS3.8 §9.3 and PS3.7 Annex D
(never produced by our encoder), each commented with what it decodes to and the
offset of each field from the start of the PDU. Two were captured from DCMTK 3.6.7
on 127.0.0.1: the A-ASSOCIATE-RQ that ``echoscu`` sends and the A-ASSOCIATE-AC that
``storescp`` answers it with. pynetdicom serves as an independent encoder/decoder.
"""

from __future__ import annotations

import dataclasses
import struct
import tracemalloc

import pytest

from router.dicom.errors import (
    AbortReason,
    AbortSource,
    LocalProtocolError,
    PDUDecodeError,
    RemoteProtocolError,
)
from router.dicom.pdu import (
    DICOM_APPLICATION_CONTEXT,
    PDU,
    PDV,
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRP,
    AReleaseRQ,
    AsynchronousOperationsWindow,
    ImplementationClassUID,
    ImplementationVersionName,
    MaximumLength,
    PDataTF,
    PDUReader,
    PDUValueError,
    PresentationContextAC,
    PresentationContextResult,
    PresentationContextRQ,
    RejectResult,
    RejectSource,
    SCPSCURoleSelection,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UnknownItem,
    UserIdentityAC,
    UserIdentityRQ,
    UserIdentityType,
    UserInformation,
    decode_pdu,
    encode_pdata_chunks,
    encode_pdu,
)

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
STORAGE_SERVICE_CLASS = "1.2.840.10008.4.2"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"

# ---------------------------------------------------------------------------
# Hand-written fixtures
# ---------------------------------------------------------------------------

# Fixed fields of an A-ASSOCIATE-RQ/AC after the 6-byte PDU header (Table 9-11/9-17).
ASSOCIATE_FIXED = (
    b"\x00\x01"  # 6: protocol version 1
    b"\x00\x00"  # 8: reserved
    b"ANY-SCP         "  # 10: called AE title "ANY-SCP", space padded to 16
    b"ECHOSCU         "  # 26: calling AE title "ECHOSCU"
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # 42: reserved
    b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # 58: reserved (32)
)
# Application context item, §9.3.2.1: 1.2.840.10008.3.1.1.1 (21 bytes).
APPLICATION_CONTEXT_ITEM = b"\x10\x00\x00\x151.2.840.10008.3.1.1.1"
# Presentation context item (RQ), §9.3.2.2: ID 1, Verification, Implicit VR LE.
CONTEXT_RQ_VERIFICATION = (
    b"\x20\x00\x00\x2e"  # item type 20H, reserved, item length 46
    b"\x01\x00\x00\x00"  # context ID 1, three reserved bytes
    b"\x30\x00\x00\x11"
    b"1.2.840.10008.1.1"  # abstract syntax sub-item (17)
    b"\x40\x00\x00\x11"
    b"1.2.840.10008.1.2"  # transfer syntax sub-item (17)
)

# A-ASSOCIATE-RQ, §9.3.2 (offsets from the start of the PDU on the left).
A_ASSOCIATE_RQ = (
    b"\x01\x00\x00\x00\x00\xb0"  # 0: type 01H, reserved, PDU length 176
    + ASSOCIATE_FIXED  # 6..73
    + APPLICATION_CONTEXT_ITEM  # 74: application context
    + CONTEXT_RQ_VERIFICATION  # 99: context 1; 103: ID; 107: abstract; 128: transfer
    + b"\x50\x00\x00\x1d"  # 149: user information item, length 29
    b"\x51\x00\x00\x04\x00\x00\x40\x00"  # 153: maximum length 16384
    b"\x52\x00\x00\x07"
    b"1.2.3.4"  # 161: implementation class UID "1.2.3.4"
    b"\x55\x00\x00\x06"
    b"TEST_1"  # 172: implementation version name "TEST_1"
)  # 182 bytes
A_ASSOCIATE_RQ_OBJ = AAssociateRQ(
    called_ae_title="ANY-SCP",
    calling_ae_title="ECHOSCU",
    presentation_contexts=(
        PresentationContextRQ(
            context_id=1, abstract_syntax=VERIFICATION, transfer_syntaxes=(IMPLICIT_VR_LE,)
        ),
    ),
    user_information=UserInformation(
        items=(
            MaximumLength(maximum_length=16384),
            ImplementationClassUID(uid="1.2.3.4"),
            ImplementationVersionName(name="TEST_1"),
        )
    ),
)

# A-ASSOCIATE-RQ with every RQ item and sub-item, plus unknown ones.
A_ASSOCIATE_RQ_FULL = (
    b"\x01\x00\x00\x00\x01\xc1"  # 0: type 01H, PDU length 449
    + ASSOCIATE_FIXED
    + APPLICATION_CONTEXT_ITEM  # 74
    + CONTEXT_RQ_VERIFICATION  # 99: context 1
    + b"\x20\x00\x00\x4d"  # 149: presentation context item, length 77
    b"\x03\x00\x00\x00"  # context ID 3
    b"\x30\x00\x00\x19"
    b"1.2.840.10008.5.1.4.1.1.2"  # abstract syntax: CT Image Storage
    b"\x40\x00\x00\x13"
    b"1.2.840.10008.1.2.1"  # transfer syntax: Explicit VR LE
    b"\x40\x00\x00\x11"
    b"1.2.840.10008.1.2"  # transfer syntax: Implicit VR LE
    b"\x50\x00\x00\xd6"  # 230: user information item, length 214
    b"\x51\x00\x00\x04\x00\x01\x00\x00"  # maximum length 65536
    b"\x52\x00\x00\x07"
    b"1.2.3.4"  # implementation class UID
    b"\x53\x00\x00\x04\x00\x05\x00\x01"  # async ops window: invoked 5, performed 1
    b"\x54\x00\x00\x1d"  # SCP/SCU role selection, length 29
    b"\x00\x19"
    b"1.2.840.10008.5.1.4.1.1.2"  # UID length 25, CT Image Storage
    b"\x00\x01"  # SCU role 0, SCP role 1
    b"\x55\x00\x00\x06"
    b"TEST_1"  # implementation version name
    b"\x56\x00\x00\x21"  # SOP class extended negotiation, length 33
    b"\x00\x19"
    b"1.2.840.10008.5.1.4.1.1.2"  # UID length 25, CT Image Storage
    b"\x02\x00\x03\x00\x01\x00"  # service class application information (6 bytes)
    b"\x57\x00\x00\x4f"  # SOP class common extended negotiation, version 0, length 79
    b"\x00\x19"
    b"1.2.840.10008.5.1.4.1.1.2"  # SOP class UID: CT Image Storage
    b"\x00\x11"
    b"1.2.840.10008.4.2"  # service class UID: Storage
    b"\x00\x1f"  # related general SOP class identification length 31
    b"\x00\x1d"
    b"1.2.840.10008.5.1.4.1.1.88.22"  # related: Enhanced SR (29)
    b"\x58\x00\x00\x0e"  # user identity (RQ), length 14
    b"\x02\x01"  # type 2 (username and passcode), positive response requested
    b"\x00\x04"
    b"user"  # primary field
    b"\x00\x04"
    b"pass"  # secondary field
    b"\x5f\x00\x00\x02\xab\xcd"  # unknown sub-item 5FH, kept
    b"\x60\x00\x00\x03\x01\x02\x03"  # 448: unknown item 60H in the variable field, kept
)  # 455 bytes
A_ASSOCIATE_RQ_FULL_OBJ = AAssociateRQ(
    called_ae_title="ANY-SCP",
    calling_ae_title="ECHOSCU",
    presentation_contexts=(
        PresentationContextRQ(
            context_id=1, abstract_syntax=VERIFICATION, transfer_syntaxes=(IMPLICIT_VR_LE,)
        ),
        PresentationContextRQ(
            context_id=3,
            abstract_syntax=CT_IMAGE_STORAGE,
            transfer_syntaxes=(EXPLICIT_VR_LE, IMPLICIT_VR_LE),
        ),
    ),
    user_information=UserInformation(
        items=(
            MaximumLength(maximum_length=65536),
            ImplementationClassUID(uid="1.2.3.4"),
            AsynchronousOperationsWindow(max_operations_invoked=5, max_operations_performed=1),
            SCPSCURoleSelection(sop_class_uid=CT_IMAGE_STORAGE, scu_role=False, scp_role=True),
            ImplementationVersionName(name="TEST_1"),
            SOPClassExtendedNegotiation(
                sop_class_uid=CT_IMAGE_STORAGE,
                service_class_application_information=b"\x02\x00\x03\x00\x01\x00",
            ),
            SOPClassCommonExtendedNegotiation(
                sop_class_uid=CT_IMAGE_STORAGE,
                service_class_uid=STORAGE_SERVICE_CLASS,
                related_general_sop_class_uids=(ENHANCED_SR,),
            ),
            UserIdentityRQ(
                identity_type=UserIdentityType.USERNAME_AND_PASSCODE,
                positive_response_requested=True,
                primary_field=b"user",
                secondary_field=b"pass",
            ),
            UnknownItem(item_type=0x5F, data=b"\xab\xcd"),
        )
    ),
    unknown_items=(UnknownItem(item_type=0x60, data=b"\x01\x02\x03"),),
)

# A-ASSOCIATE-AC, §9.3.3, with accepted and rejected contexts and every AC sub-item.
A_ASSOCIATE_AC = (
    b"\x02\x00\x00\x00\x01\x1a"  # 0: type 02H, PDU length 282
    + ASSOCIATE_FIXED  # AE fields echo the RQ (not tested on receipt)
    + APPLICATION_CONTEXT_ITEM  # 74
    + b"\x21\x00\x00\x19"  # 99: presentation context (AC), length 25
    b"\x01\x00\x00\x00"  # 103: context ID 1, reserved, 105: result 0 (acceptance), reserved
    b"\x40\x00\x00\x11"
    b"1.2.840.10008.1.2"  # 107: transfer syntax Implicit VR LE
    b"\x21\x00\x00\x08"  # 128: presentation context (AC), length 8
    b"\x03\x00\x03\x00"  # context ID 3, result 3 (abstract syntax not supported)
    b"\x40\x00\x00\x00"  # empty transfer syntax sub-item (not significant)
    b"\x21\x00\x00\x1b"  # 140: presentation context (AC), length 27
    b"\x05\x00\x01\x00"  # context ID 5, result 1 (user rejection)
    b"\x40\x00\x00\x13"
    b"1.2.840.10008.1.2.1"  # transfer syntax echoed: Explicit VR LE
    b"\x50\x00\x00\x71"  # 171: user information item, length 113
    b"\x51\x00\x00\x04\x00\x00\x40\x00"  # maximum length 16384
    b"\x52\x00\x00\x07"
    b"1.2.3.4"  # implementation class UID
    b"\x53\x00\x00\x04\x00\x01\x00\x01"  # async ops window 1/1
    b"\x54\x00\x00\x1d"  # SCP/SCU role selection, length 29
    b"\x00\x19"
    b"1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    b"\x00\x01"  # SCU role 0, SCP role 1
    b"\x55\x00\x00\x06"
    b"TEST_1"  # implementation version name
    b"\x56\x00\x00\x1c"  # SOP class extended negotiation, length 28
    b"\x00\x19"
    b"1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    b"\x01"  # service class application information (1 byte)
    b"\x59\x00\x00\x07"  # user identity (AC), length 7
    b"\x00\x05"
    b"token"  # server response
)  # 288 bytes
A_ASSOCIATE_AC_OBJ = AAssociateAC(
    called_ae_title="ANY-SCP",
    calling_ae_title="ECHOSCU",
    presentation_contexts=(
        PresentationContextAC(
            context_id=1,
            result=PresentationContextResult.ACCEPTANCE,
            transfer_syntax=IMPLICIT_VR_LE,
        ),
        PresentationContextAC(
            context_id=3,
            result=PresentationContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED,
            transfer_syntax=None,
        ),
        PresentationContextAC(
            context_id=5,
            result=PresentationContextResult.USER_REJECTION,
            transfer_syntax=EXPLICIT_VR_LE,
        ),
    ),
    user_information=UserInformation(
        items=(
            MaximumLength(maximum_length=16384),
            ImplementationClassUID(uid="1.2.3.4"),
            AsynchronousOperationsWindow(max_operations_invoked=1, max_operations_performed=1),
            SCPSCURoleSelection(sop_class_uid=CT_IMAGE_STORAGE, scu_role=False, scp_role=True),
            ImplementationVersionName(name="TEST_1"),
            SOPClassExtendedNegotiation(
                sop_class_uid=CT_IMAGE_STORAGE, service_class_application_information=b"\x01"
            ),
            UserIdentityAC(server_response=b"token"),
        )
    ),
)

# A-ASSOCIATE-RJ, §9.3.4 Table 9-21.
A_ASSOCIATE_RJ_CALLED_AE = (
    b"\x03\x00\x00\x00\x00\x04"  # type 03H, PDU length 4
    b"\x00"  # 6: reserved
    b"\x01"  # 7: result 1, rejected-permanent
    b"\x01"  # 8: source 1, service user
    b"\x07"  # 9: reason 7, called-AE-title-not-recognized
)
A_ASSOCIATE_RJ_CALLED_AE_OBJ = AAssociateRJ(
    result=RejectResult.REJECTED_PERMANENT, source=RejectSource.SERVICE_USER, reason=7
)
A_ASSOCIATE_RJ_CONGESTION = (
    b"\x03\x00\x00\x00\x00\x04"
    b"\x00\x02\x03\x01"  # rejected-transient, provider (presentation), temporary congestion
)
A_ASSOCIATE_RJ_CONGESTION_OBJ = AAssociateRJ(
    result=RejectResult.REJECTED_TRANSIENT,
    source=RejectSource.SERVICE_PROVIDER_PRESENTATION,
    reason=1,
)

# P-DATA-TF, §9.3.5, with two PDV items (§9.3.5.1, message control header Annex E.2).
P_DATA_TF = (
    b"\x04\x00\x00\x00\x00\x16"  # 0: type 04H, PDU length 22
    b"\x00\x00\x00\x06"  # 6: PDV item length 6
    b"\x01"  # 10: presentation context ID 1
    b"\x03"  # 11: message control header: command, last fragment
    b"\x01\x02\x03\x04"  # 12: 4 bytes of command set
    b"\x00\x00\x00\x08"  # 16: PDV item length 8
    b"\x03"  # 20: presentation context ID 3
    b"\x00"  # 21: data set, not the last fragment
    b"\xaa\xbb\xcc\xdd\xee\xff"  # 22: 6 bytes of data set
)  # 28 bytes
P_DATA_TF_OBJ = PDataTF(
    pdvs=(
        PDV(context_id=1, is_command=True, is_last=True, data=b"\x01\x02\x03\x04"),
        PDV(context_id=3, is_command=False, is_last=False, data=b"\xaa\xbb\xcc\xdd\xee\xff"),
    )
)

# A-RELEASE-RQ §9.3.6 and A-RELEASE-RP §9.3.7: PDU length 4, four reserved bytes.
A_RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
A_RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"

# A-ABORT, §9.3.8 Table 9-26: reserved, reserved, source, reason/diag.
A_ABORT_USER = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"  # source 0 (user), reason 0
A_ABORT_PROVIDER = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"  # provider, invalid param value

# ---------------------------------------------------------------------------
# Captured from DCMTK 3.6.7 on 127.0.0.1
# ---------------------------------------------------------------------------

# `TCP_NODELAY=1 echoscu -aet ECHOSCU -aec ANY 127.0.0.1 PORT`, bytes as received.
# Called "ANY", calling "ECHOSCU"; context 1: Verification / Implicit VR LE (the
# context's third reserved byte, offset 105, is FFH: DCMTK's, not tested on receipt);
# max length 16384, implementation class 1.2.276.0.7230010.3.0.3.6.7, OFFIS_DCMTK_367.
DCMTK_ECHOSCU_RQ = bytes.fromhex(
    "0100000000cd00010000414e59202020202020202020202020204543484f5343"
    "5520202020202020202000000000000000000000000000000000000000000000"
    "0000000000000000000010000015312e322e3834302e31303030382e332e312e"
    "312e312000002e0100ff0030000011312e322e3834302e31303030382e312e31"
    "40000011312e322e3834302e31303030382e312e325000003a51000004000040"
    "005200001b312e322e3237362e302e373233303031302e332e302e332e362e37"
    "5500000f4f464649535f44434d544b5f333637"
)
DCMTK_IMPLEMENTATION = UserInformation(
    items=(
        MaximumLength(maximum_length=16384),
        ImplementationClassUID(uid="1.2.276.0.7230010.3.0.3.6.7"),
        ImplementationVersionName(name="OFFIS_DCMTK_367"),
    )
)
DCMTK_ECHOSCU_RQ_OBJ = AAssociateRQ(
    called_ae_title="ANY",
    calling_ae_title="ECHOSCU",
    presentation_contexts=(
        PresentationContextRQ(
            context_id=1, abstract_syntax=VERIFICATION, transfer_syntaxes=(IMPLICIT_VR_LE,)
        ),
    ),
    user_information=DCMTK_IMPLEMENTATION,
)
# `storescp PORT` answering DCMTK_ECHOSCU_RQ: context 1 accepted with Implicit VR LE.
DCMTK_STORESCP_AC = bytes.fromhex(
    "0200000000b800010000414e59202020202020202020202020204543484f5343"
    "5520202020202020202000000000000000000000000000000000000000000000"
    "0000000000000000000010000015312e322e3834302e31303030382e332e312e"
    "312e31210000190100000040000011312e322e3834302e31303030382e312e32"
    "5000003a51000004000040005200001b312e322e3237362e302e373233303031"
    "302e332e302e332e362e375500000f4f464649535f44434d544b5f333637"
)
DCMTK_STORESCP_AC_OBJ = AAssociateAC(
    called_ae_title="ANY",
    calling_ae_title="ECHOSCU",
    presentation_contexts=(
        PresentationContextAC(
            context_id=1,
            result=PresentationContextResult.ACCEPTANCE,
            transfer_syntax=IMPLICIT_VR_LE,
        ),
    ),
    user_information=DCMTK_IMPLEMENTATION,
)

# (name, bytes, expected object, encode(object) == bytes)
PDU_FIXTURES: list[tuple[str, bytes, PDU, bool]] = [
    ("A-ASSOCIATE-RQ", A_ASSOCIATE_RQ, A_ASSOCIATE_RQ_OBJ, True),
    ("A-ASSOCIATE-RQ full", A_ASSOCIATE_RQ_FULL, A_ASSOCIATE_RQ_FULL_OBJ, True),
    ("A-ASSOCIATE-RQ DCMTK echoscu", DCMTK_ECHOSCU_RQ, DCMTK_ECHOSCU_RQ_OBJ, False),
    ("A-ASSOCIATE-AC", A_ASSOCIATE_AC, A_ASSOCIATE_AC_OBJ, True),
    ("A-ASSOCIATE-AC DCMTK storescp", DCMTK_STORESCP_AC, DCMTK_STORESCP_AC_OBJ, True),
    ("A-ASSOCIATE-RJ called AE", A_ASSOCIATE_RJ_CALLED_AE, A_ASSOCIATE_RJ_CALLED_AE_OBJ, True),
    ("A-ASSOCIATE-RJ congestion", A_ASSOCIATE_RJ_CONGESTION, A_ASSOCIATE_RJ_CONGESTION_OBJ, True),
    ("P-DATA-TF", P_DATA_TF, P_DATA_TF_OBJ, True),
    ("A-RELEASE-RQ", A_RELEASE_RQ, AReleaseRQ(), True),
    ("A-RELEASE-RP", A_RELEASE_RP, AReleaseRP(), True),
    ("A-ABORT user", A_ABORT_USER, AAbort(source=AbortSource.SERVICE_USER), True),
    (
        "A-ABORT provider",
        A_ABORT_PROVIDER,
        AAbort(
            source=AbortSource.SERVICE_PROVIDER,
            reason=AbortReason.INVALID_PDU_PARAMETER_VALUE,
        ),
        True,
    ),
]
FIXTURE_IDS = [name for name, *_ in PDU_FIXTURES]


# ---------------------------------------------------------------------------
# Helpers: wrap a hand-written item in a hand-built PDU (lengths via struct only)
# ---------------------------------------------------------------------------


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _user_info(*sub_items: bytes) -> bytes:
    value = b"".join(sub_items)
    return struct.pack(">BBH", 0x50, 0, len(value)) + value


def rq_with(*, contexts: bytes = CONTEXT_RQ_VERIFICATION, sub_items: tuple[bytes, ...]) -> bytes:
    """An A-ASSOCIATE-RQ as A_ASSOCIATE_RQ up to offset 149, then the given user info."""
    return _pdu(
        0x01, ASSOCIATE_FIXED + APPLICATION_CONTEXT_ITEM + contexts + _user_info(*sub_items)
    )


def ac_with(*, contexts: bytes, sub_items: tuple[bytes, ...] = ()) -> bytes:
    return _pdu(
        0x02, ASSOCIATE_FIXED + APPLICATION_CONTEXT_ITEM + contexts + _user_info(*sub_items)
    )


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def insert(data: bytes, offset: int, new: bytes) -> bytes:
    """Insert bytes into a PDU's variable field and fix the PDU length (not item lengths)."""
    out = data[:offset] + new + data[offset:]
    return patch(out, 2, struct.pack(">I", len(out) - 6))


def rq_obj(
    *items: object, contexts: tuple[PresentationContextRQ, ...] | None = None
) -> AAssociateRQ:
    return AAssociateRQ(
        called_ae_title="ANY-SCP",
        calling_ae_title="ECHOSCU",
        presentation_contexts=A_ASSOCIATE_RQ_OBJ.presentation_contexts
        if contexts is None
        else contexts,
        user_information=UserInformation(items=items),  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------
# Whole PDUs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "data", "expected", "exact"), PDU_FIXTURES, ids=FIXTURE_IDS)
def test_fixture_lengths_are_consistent(name: str, data: bytes, expected: PDU, exact: bool) -> None:
    # A check on the hand-written fixtures themselves.
    assert struct.unpack(">I", data[2:6])[0] == len(data) - 6


@pytest.mark.parametrize(("name", "data", "expected", "exact"), PDU_FIXTURES, ids=FIXTURE_IDS)
def test_decode_fixture(name: str, data: bytes, expected: PDU, exact: bool) -> None:
    assert decode_pdu(data) == expected


@pytest.mark.parametrize(("name", "data", "expected", "exact"), PDU_FIXTURES, ids=FIXTURE_IDS)
def test_encode_fixture(name: str, data: bytes, expected: PDU, exact: bool) -> None:
    encoded = encode_pdu(expected)
    if exact:
        assert encoded == data
    else:
        # DCMTK's echoscu sets a reserved byte we write as 00H; nothing else differs.
        assert encoded == patch(data, 105, b"\x00")


@pytest.mark.parametrize(("name", "data", "expected", "exact"), PDU_FIXTURES, ids=FIXTURE_IDS)
def test_round_trip(name: str, data: bytes, expected: PDU, exact: bool) -> None:
    assert decode_pdu(encode_pdu(expected)) == expected
    assert decode_pdu(memoryview(encode_pdu(expected))) == expected
    assert decode_pdu(bytearray(encode_pdu(expected))) == expected


def test_dcmtk_echoscu_rq_fields() -> None:
    rq = decode_pdu(DCMTK_ECHOSCU_RQ)
    assert isinstance(rq, AAssociateRQ)
    assert rq.protocol_version == 1
    assert rq.application_context_name == DICOM_APPLICATION_CONTEXT
    info = rq.user_information
    assert info.maximum_length == MaximumLength(maximum_length=16384)
    assert info.implementation_version_name == ImplementationVersionName(name="OFFIS_DCMTK_367")


def test_user_information_properties() -> None:
    info = A_ASSOCIATE_RQ_FULL_OBJ.user_information
    assert info.maximum_length == MaximumLength(maximum_length=65536)
    assert info.implementation_class_uid == ImplementationClassUID(uid="1.2.3.4")
    assert info.implementation_version_name == ImplementationVersionName(name="TEST_1")
    assert info.async_ops_window == AsynchronousOperationsWindow(
        max_operations_invoked=5, max_operations_performed=1
    )
    assert info.role_selections == (
        SCPSCURoleSelection(sop_class_uid=CT_IMAGE_STORAGE, scu_role=False, scp_role=True),
    )
    assert len(info.sop_class_extended) == 1
    assert info.sop_class_common_extended[0].related_general_sop_class_uids == (ENHANCED_SR,)
    assert info.user_identity_rq is not None
    assert info.user_identity_rq.secondary_field == b"pass"
    assert info.user_identity_ac is None
    empty = UserInformation()
    assert empty.maximum_length is None
    assert empty.implementation_class_uid is None
    assert empty.role_selections == ()
    assert empty.sop_class_extended == ()
    assert empty.sop_class_common_extended == ()
    assert A_ASSOCIATE_AC_OBJ.user_information.user_identity_ac == UserIdentityAC(
        server_response=b"token"
    )


# ---------------------------------------------------------------------------
# Items and sub-items, one fixture each
# ---------------------------------------------------------------------------

# (name, sub-item bytes, decoded sub-item); wrapped in a user information item.
SUB_ITEM_FIXTURES: list[tuple[str, bytes, object]] = [
    (
        "maximum length 16384",
        b"\x51\x00\x00\x04\x00\x00\x40\x00",
        MaximumLength(maximum_length=16384),
    ),
    (
        "maximum length 0 (unlimited)",
        b"\x51\x00\x00\x04\x00\x00\x00\x00",
        MaximumLength(maximum_length=0),
    ),
    (
        "maximum length 0xFFFFFFFF",
        b"\x51\x00\x00\x04\xff\xff\xff\xff",
        MaximumLength(maximum_length=0xFFFFFFFF),
    ),
    (
        "implementation class UID",
        b"\x52\x00\x00\x1b1.2.276.0.7230010.3.0.3.6.7",
        ImplementationClassUID(uid="1.2.276.0.7230010.3.0.3.6.7"),
    ),
    (
        "asynchronous operations window 0/0 (unlimited)",
        b"\x53\x00\x00\x04\x00\x00\x00\x00",
        AsynchronousOperationsWindow(max_operations_invoked=0, max_operations_performed=0),
    ),
    (
        "asynchronous operations window 65535/2",
        b"\x53\x00\x00\x04\xff\xff\x00\x02",
        AsynchronousOperationsWindow(max_operations_invoked=65535, max_operations_performed=2),
    ),
    (
        "role selection SCU only",
        b"\x54\x00\x00\x1d\x00\x191.2.840.10008.5.1.4.1.1.2\x01\x00",
        SCPSCURoleSelection(sop_class_uid=CT_IMAGE_STORAGE, scu_role=True, scp_role=False),
    ),
    (
        "role selection both",
        b"\x54\x00\x00\x15\x00\x111.2.840.10008.1.1\x01\x01",
        SCPSCURoleSelection(sop_class_uid=VERIFICATION, scu_role=True, scp_role=True),
    ),
    (
        "implementation version name (16 chars)",
        b"\x55\x00\x00\x10ABCDEFGHIJKLMNOP",
        ImplementationVersionName(name="ABCDEFGHIJKLMNOP"),
    ),
    (
        "SOP class extended negotiation, empty information",
        b"\x56\x00\x00\x13\x00\x111.2.840.10008.1.1",
        SOPClassExtendedNegotiation(
            sop_class_uid=VERIFICATION, service_class_application_information=b""
        ),
    ),
    (
        "SOP class common extended negotiation, no related classes",
        b"\x57\x00\x00\x30"  # version 0, length 48
        b"\x00\x19"
        b"1.2.840.10008.5.1.4.1.1.2"
        b"\x00\x11"
        b"1.2.840.10008.4.2"
        b"\x00\x00",  # related general SOP class identification length 0
        SOPClassCommonExtendedNegotiation(
            sop_class_uid=CT_IMAGE_STORAGE, service_class_uid=STORAGE_SERVICE_CLASS
        ),
    ),
    (
        "SOP class common extended negotiation, two related classes",
        b"\x57\x00\x00\x47"  # length 71
        b"\x00\x1d"
        b"1.2.840.10008.5.1.4.1.1.88.40"  # Procedure Log (29)
        b"\x00\x11"
        b"1.2.840.10008.4.2"  # Storage service class
        b"\x00\x13"  # 19 bytes of related classes:
        b"\x00\x07"
        b"1.2.3.4"
        b"\x00\x08"
        b"1.2.3.45",
        SOPClassCommonExtendedNegotiation(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.40",
            service_class_uid=STORAGE_SERVICE_CLASS,
            related_general_sop_class_uids=("1.2.3.4", "1.2.3.45"),
        ),
    ),
    (
        "user identity RQ: username, no response requested",
        b"\x58\x00\x00\x0b\x01\x00\x00\x05alice\x00\x00",
        UserIdentityRQ(
            identity_type=UserIdentityType.USERNAME,
            positive_response_requested=False,
            primary_field=b"alice",
        ),
    ),
    (
        "user identity RQ: JWT",
        b"\x58\x00\x00\x0b\x05\x01\x00\x05a.b.c\x00\x00",
        UserIdentityRQ(
            identity_type=UserIdentityType.JWT,
            positive_response_requested=True,
            primary_field=b"a.b.c",
        ),
    ),
    (
        "user identity RQ: type not in Table D.3-14 kept as int",
        b"\x58\x00\x00\x07\x09\x00\x00\x01x\x00\x00",
        UserIdentityRQ(identity_type=9, positive_response_requested=False, primary_field=b"x"),
    ),
    (
        "user identity AC, empty response",
        b"\x59\x00\x00\x02\x00\x00",
        UserIdentityAC(server_response=b""),
    ),
    (
        "unknown sub-item 5AH",
        b"\x5a\x00\x00\x01\x7f",
        UnknownItem(item_type=0x5A, data=b"\x7f"),
    ),
    (
        "unknown sub-item, empty",
        b"\xff\x00\x00\x00",
        UnknownItem(item_type=0xFF, data=b""),
    ),
]


@pytest.mark.parametrize(
    ("name", "sub_item", "expected"), SUB_ITEM_FIXTURES, ids=[n for n, *_ in SUB_ITEM_FIXTURES]
)
def test_sub_item_fixture(name: str, sub_item: bytes, expected: object) -> None:
    data = rq_with(sub_items=(sub_item,))
    obj = rq_obj(expected)
    assert decode_pdu(data) == obj
    assert encode_pdu(obj) == data


# (name, presentation context item bytes, decoded context) for A-ASSOCIATE-RQ.
CONTEXT_RQ_FIXTURES: list[tuple[str, bytes, PresentationContextRQ]] = [
    (
        "verification",
        CONTEXT_RQ_VERIFICATION,
        PresentationContextRQ(
            context_id=1, abstract_syntax=VERIFICATION, transfer_syntaxes=(IMPLICIT_VR_LE,)
        ),
    ),
    (
        "context 255, three transfer syntaxes",
        b"\x20\x00\x00\x67"  # length 103
        b"\xff\x00\x00\x00"  # context ID 255
        b"\x30\x00\x00\x19"
        b"1.2.840.10008.5.1.4.1.1.2"
        b"\x40\x00\x00\x13"
        b"1.2.840.10008.1.2.1"
        b"\x40\x00\x00\x11"
        b"1.2.840.10008.1.2"
        b"\x40\x00\x00\x16"
        b"1.2.840.10008.1.2.4.50",  # JPEG baseline (22)
        PresentationContextRQ(
            context_id=255,
            abstract_syntax=CT_IMAGE_STORAGE,
            transfer_syntaxes=(EXPLICIT_VR_LE, IMPLICIT_VR_LE, "1.2.840.10008.1.2.4.50"),
        ),
    ),
]


@pytest.mark.parametrize(
    ("name", "item", "expected"), CONTEXT_RQ_FIXTURES, ids=[n for n, *_ in CONTEXT_RQ_FIXTURES]
)
def test_presentation_context_rq_fixture(
    name: str, item: bytes, expected: PresentationContextRQ
) -> None:
    data = rq_with(contexts=item, sub_items=())
    obj = rq_obj(contexts=(expected,))
    assert decode_pdu(data) == obj
    assert encode_pdu(obj) == data


# (name, presentation context item bytes, decoded context, encodes back exactly)
CONTEXT_AC_FIXTURES: list[tuple[str, bytes, PresentationContextAC, bool]] = [
    (
        "accepted",
        b"\x21\x00\x00\x19\x01\x00\x00\x00\x40\x00\x00\x111.2.840.10008.1.2",
        PresentationContextAC(
            context_id=1,
            result=PresentationContextResult.ACCEPTANCE,
            transfer_syntax=IMPLICIT_VR_LE,
        ),
        True,
    ),
    (
        "transfer syntaxes not supported, empty sub-item",
        b"\x21\x00\x00\x08\x07\x00\x04\x00\x40\x00\x00\x00",
        PresentationContextAC(
            context_id=7,
            result=PresentationContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED,
            transfer_syntax=None,
        ),
        True,
    ),
    (
        "no reason, no transfer syntax sub-item at all (pynetdicom issue 361)",
        b"\x21\x00\x00\x04\x09\x00\x02\x00",
        PresentationContextAC(
            context_id=9, result=PresentationContextResult.NO_REASON, transfer_syntax=None
        ),
        False,  # we always write the sub-item
    ),
    (
        "rejected, garbage transfer syntax is not tested",
        b"\x21\x00\x00\x0a\x0b\x00\x01\x00\x40\x00\x00\x02\xff\xfe",
        PresentationContextAC(
            context_id=11, result=PresentationContextResult.USER_REJECTION, transfer_syntax=None
        ),
        False,
    ),
]


@pytest.mark.parametrize(
    ("name", "item", "expected", "exact"),
    CONTEXT_AC_FIXTURES,
    ids=[n for n, *_ in CONTEXT_AC_FIXTURES],
)
def test_presentation_context_ac_fixture(
    name: str, item: bytes, expected: PresentationContextAC, exact: bool
) -> None:
    data = ac_with(contexts=item)
    obj = AAssociateAC(
        called_ae_title="ANY-SCP",
        calling_ae_title="ECHOSCU",
        presentation_contexts=(expected,),
        user_information=UserInformation(),
    )
    assert decode_pdu(data) == obj
    if exact:
        assert encode_pdu(obj) == data
    assert decode_pdu(encode_pdu(obj)) == obj


def test_application_context_item_other_name() -> None:
    # The codec keeps any application context name; negotiation judges it.
    data = _pdu(
        0x01,
        ASSOCIATE_FIXED + b"\x10\x00\x00\x051.2.3" + CONTEXT_RQ_VERIFICATION + _user_info(),
    )
    rq = decode_pdu(data)
    assert isinstance(rq, AAssociateRQ)
    assert rq.application_context_name == "1.2.3"
    assert encode_pdu(rq) == data


# ---------------------------------------------------------------------------
# Tolerance: what the standard says is not tested, or should be ignored
# ---------------------------------------------------------------------------


def test_reserved_fields_are_not_tested() -> None:
    data = A_ASSOCIATE_RQ
    data = patch(data, 1, b"\xff")  # PDU header reserved byte
    data = patch(data, 8, b"\xff\xff")  # reserved after protocol version
    data = patch(data, 42, b"\xff" * 32)  # 32 reserved bytes
    data = patch(data, 75, b"\xff")  # application context item reserved byte
    data = patch(data, 104, b"\xff\xff\xff")  # presentation context reserved bytes
    data = patch(data, 108, b"\xff")  # abstract syntax sub-item reserved byte
    data = patch(data, 150, b"\xff")  # user information item reserved byte
    data = patch(data, 154, b"\xff")  # maximum length sub-item reserved byte
    assert decode_pdu(data) == A_ASSOCIATE_RQ_OBJ
    assert decode_pdu(patch(A_RELEASE_RQ, 6, b"\xff\xff\xff\xff")) == AReleaseRQ()
    assert decode_pdu(patch(A_RELEASE_RP, 1, b"\xff")) == AReleaseRP()
    assert decode_pdu(patch(A_ASSOCIATE_RJ_CALLED_AE, 6, b"\xff")) == A_ASSOCIATE_RJ_CALLED_AE_OBJ
    assert decode_pdu(patch(A_ABORT_PROVIDER, 6, b"\xff\xff")) == decode_pdu(A_ABORT_PROVIDER)


def test_message_control_header_high_bits_are_ignored() -> None:
    data = patch(P_DATA_TF, 11, b"\xff")  # bits 2-7 set; bit 0 and 1 still command/last
    assert decode_pdu(data) == P_DATA_TF_OBJ


def test_uid_trailing_nul_or_space_is_stripped() -> None:
    # Annex F says UIDs are not padded; lax peers pad to even length anyway.
    context = (
        b"\x20\x00\x00\x30\x01\x00\x00\x00"
        b"\x30\x00\x00\x12"
        b"1.2.840.10008.1.1\x00"
        b"\x40\x00\x00\x12"
        b"1.2.840.10008.1.2 "
    )
    assert decode_pdu(rq_with(contexts=context, sub_items=())) == rq_obj()


def test_unknown_sub_item_in_presentation_context_is_skipped() -> None:
    context = (
        CONTEXT_RQ_VERIFICATION[:3]
        + b"\x33"
        + CONTEXT_RQ_VERIFICATION[4:]
        + (b"\x7e\x00\x00\x01\x00")
    )
    assert decode_pdu(rq_with(contexts=context, sub_items=())) == rq_obj()


def test_missing_maximum_length_is_accepted() -> None:
    rq = decode_pdu(rq_with(sub_items=()))
    assert isinstance(rq, AAssociateRQ)
    assert rq.user_information.maximum_length is None


def test_items_out_of_order_and_no_presentation_context() -> None:
    # §9.3 wants increasing item types; we do not insist. No context: negotiation's call.
    data = _pdu(0x01, ASSOCIATE_FIXED + _user_info() + APPLICATION_CONTEXT_ITEM)
    assert decode_pdu(data) == rq_obj(contexts=())


def test_other_protocol_version_decodes() -> None:
    # The acceptor answers with A-ASSOCIATE-RJ (ACSE, protocol version not supported).
    rq = decode_pdu(patch(A_ASSOCIATE_RQ, 6, b"\x00\x02"))
    assert isinstance(rq, AAssociateRQ)
    assert rq.protocol_version == 2


def test_ac_ae_fields_are_not_tested() -> None:
    data = patch(A_ASSOCIATE_AC, 10, b" " * 16)  # all spaces
    data = patch(data, 26, b"\x00\xc3\x07X\\" + b"\x00" * 11)  # junk
    ac = decode_pdu(data)
    assert isinstance(ac, AAssociateAC)
    assert ac.called_ae_title == ""
    assert ac.calling_ae_title == "???X\\"
    assert decode_pdu(encode_pdu(ac)) == ac


def test_ae_titles_keep_inner_spaces_and_drop_leading_ones() -> None:
    rq = decode_pdu(patch(A_ASSOCIATE_RQ, 10, b"  MY AE         "))
    assert isinstance(rq, AAssociateRQ)
    assert rq.called_ae_title == "MY AE"


def test_reserved_reject_reasons_and_abort_diagnostics_decode() -> None:
    rj = decode_pdu(patch(A_ASSOCIATE_RJ_CALLED_AE, 9, b"\x05"))  # 4-6: reserved
    assert isinstance(rj, AAssociateRJ)
    assert rj.reason == 5
    abort = decode_pdu(patch(A_ABORT_USER, 9, b"\x55"))  # not significant for the user
    assert abort == AAbort(source=0, reason=0x55)


# ---------------------------------------------------------------------------
# Malformed input: field and offset of every error
# ---------------------------------------------------------------------------

RQ = A_ASSOCIATE_RQ
ERROR_CASES: list[tuple[str, bytes, str, int]] = [
    ("empty input", b"", "PDU.pdu_type", 0),
    ("short header", b"\x05\x00\x00", "A-RELEASE-RQ.pdu_length", 2),
    ("unknown PDU type", b"\x08\x00\x00\x00\x00\x04\x00\x00\x00\x00", "PDU.pdu_type", 0),
    ("PDU type 0", b"\x00" * 10, "PDU.pdu_type", 0),
    ("length beyond the data", patch(RQ, 2, b"\x00\x00\x00\xb1"), "A-ASSOCIATE-RQ.pdu_length", 2),
    ("truncated", RQ[:-1], "A-ASSOCIATE-RQ.pdu_length", 2),
    ("trailing byte", RQ + b"\x00", "A-ASSOCIATE-RQ.pdu_length", 2),
    ("RQ shorter than fixed fields", _pdu(1, bytes(67)), "A-ASSOCIATE-RQ.pdu_length", 2),
    ("called AE non-ASCII", patch(RQ, 10, b"\xc3"), "A-ASSOCIATE-RQ.called_ae_title", 10),
    ("called AE backslash", patch(RQ, 12, b"\\"), "A-ASSOCIATE-RQ.called_ae_title", 10),
    ("calling AE all spaces", patch(RQ, 26, b" " * 16), "A-ASSOCIATE-RQ.calling_ae_title", 26),
    ("calling AE control char", patch(RQ, 27, b"\x07"), "A-ASSOCIATE-RQ.calling_ae_title", 26),
    ("calling AE NUL inside", patch(RQ, 27, b"\x00"), "A-ASSOCIATE-RQ.calling_ae_title", 26),
    ("no application context", patch(RQ, 74, b"\x11"), "A-ASSOCIATE-RQ.application_context", 74),
    (
        "application context not a UID",
        patch(RQ, 80, b"X"),
        "A-ASSOCIATE-RQ.application_context",
        78,
    ),
    (
        "two application contexts",
        insert(RQ, 99, APPLICATION_CONTEXT_ITEM),
        "A-ASSOCIATE-RQ.application_context",
        99,
    ),
    (
        "item header truncated",
        insert(RQ, 182, b"\x60\x00\x00"),
        "A-ASSOCIATE-RQ.item",
        182,
    ),
    (
        "unknown item overruns the PDU",
        insert(RQ, 182, b"\x60\x00\x00\x02\x00"),
        "A-ASSOCIATE-RQ.item",
        182,
    ),
    (
        "presentation context overruns the PDU",
        patch(RQ, 101, b"\x00\xff"),
        "A-ASSOCIATE-RQ.presentation_context[0]",
        99,
    ),
    (
        "presentation context shorter than its fixed fields",
        insert(RQ, 149, b"\x20\x00\x00\x03\x01\x00\x00"),
        "A-ASSOCIATE-RQ.presentation_context[1]",
        149,
    ),
    (
        "context ID even",
        patch(RQ, 103, b"\x02"),
        "A-ASSOCIATE-RQ.presentation_context[0].context_id",
        103,
    ),
    (
        "context ID zero",
        patch(RQ, 103, b"\x00"),
        "A-ASSOCIATE-RQ.presentation_context[0].context_id",
        103,
    ),
    (
        "no abstract syntax",
        patch(RQ, 107, b"\x31"),
        "A-ASSOCIATE-RQ.presentation_context[0].abstract_syntax",
        99,
    ),
    (
        "transfer syntax overruns the context",
        patch(RQ, 130, b"\x00\x12"),
        "A-ASSOCIATE-RQ.presentation_context[0].transfer_syntax",
        128,
    ),
    (
        "no transfer syntax",
        patch(RQ, 128, b"\x41"),
        "A-ASSOCIATE-RQ.presentation_context[0].transfer_syntax",
        99,
    ),
    ("no user information", patch(RQ, 149, b"\x5f"), "A-ASSOCIATE-RQ.user_information", 74),
    (
        "two user information items",
        insert(RQ, 182, b"\x50\x00\x00\x00"),
        "A-ASSOCIATE-RQ.user_information",
        182,
    ),
    (
        "user information overruns the PDU",
        patch(RQ, 152, b"\x1e"),
        "A-ASSOCIATE-RQ.user_information",
        149,
    ),
    (
        "maximum length sub-item of length 3",
        patch(RQ, 156, b"\x03"),
        "A-ASSOCIATE-RQ.user_information.maximum_length",
        153,
    ),
    (
        "sub-item header truncated",
        rq_with(sub_items=(b"\x51\x00",)),
        "A-ASSOCIATE-RQ.user_information.sub_item",
        153,
    ),
    (
        "async ops window of length 2",
        rq_with(sub_items=(b"\x53\x00\x00\x02\x00\x01",)),
        "A-ASSOCIATE-RQ.user_information.asynchronous_operations_window",
        153,
    ),
    (
        "role selection UID length overruns",
        rq_with(sub_items=(b"\x54\x00\x00\x05\x00\x041.2\x01",)),
        "A-ASSOCIATE-RQ.user_information.scp_scu_role_selection.sop_class_uid",
        157,
    ),
    (
        "role selection role value 2",
        rq_with(sub_items=(b"\x54\x00\x00\x07\x00\x031.2\x02\x00",)),
        "A-ASSOCIATE-RQ.user_information.scp_scu_role_selection",
        162,
    ),
    (
        "role selection without role bytes",
        rq_with(sub_items=(b"\x54\x00\x00\x05\x00\x031.2",)),
        "A-ASSOCIATE-RQ.user_information.scp_scu_role_selection",
        162,
    ),
    (
        "extended negotiation UID not a UID",
        rq_with(sub_items=(b"\x56\x00\x00\x05\x00\x03a.b",)),
        "A-ASSOCIATE-RQ.user_information.sop_class_extended_negotiation.sop_class_uid",
        159,
    ),
    (
        "common extended negotiation related length short of the item end",
        rq_with(sub_items=(b"\x57\x00\x00\x0d\x00\x031.2\x00\x031.2\x00\x00\x00",)),
        "A-ASSOCIATE-RQ.user_information.sop_class_common_extended_negotiation.related",
        167,
    ),
    (
        "common extended negotiation related UID overruns",
        rq_with(sub_items=(b"\x57\x00\x00\x0f\x00\x031.2\x00\x031.2\x00\x03\x00\x051",)),
        "A-ASSOCIATE-RQ.user_information.sop_class_common_extended_negotiation"
        ".related_general_sop_class_uid",
        169,
    ),
    (
        "user identity RQ truncated secondary length",
        rq_with(sub_items=(b"\x58\x00\x00\x05\x01\x00\x00\x01u",)),
        "A-ASSOCIATE-RQ.user_information.user_identity.secondary_field",
        162,
    ),
    (
        "user identity RQ trailing bytes",
        rq_with(sub_items=(b"\x58\x00\x00\x08\x01\x00\x00\x01u\x00\x00!",)),
        "A-ASSOCIATE-RQ.user_information.user_identity",
        164,
    ),
    (
        "user identity RQ response flag 2",
        rq_with(sub_items=(b"\x58\x00\x00\x06\x01\x02\x00\x00\x00\x00",)),
        "A-ASSOCIATE-RQ.user_information.user_identity",
        158,
    ),
    (
        "user identity AC response overruns",
        rq_with(sub_items=(b"\x59\x00\x00\x03\x00\x02x",)),
        "A-ASSOCIATE-RQ.user_information.user_identity.server_response",
        157,
    ),
    (
        "AC result 5",
        patch(A_ASSOCIATE_AC, 105, b"\x05"),
        "A-ASSOCIATE-AC.presentation_context[0].result",
        105,
    ),
    (
        "AC accepted without transfer syntax",
        ac_with(contexts=b"\x21\x00\x00\x04\x01\x00\x00\x00"),
        "A-ASSOCIATE-AC.presentation_context[0].transfer_syntax",
        99,
    ),
    (
        "AC accepted with an empty transfer syntax",
        ac_with(contexts=b"\x21\x00\x00\x08\x01\x00\x00\x00\x40\x00\x00\x00"),
        "A-ASSOCIATE-AC.presentation_context[0].transfer_syntax",
        111,
    ),
    (
        "AC two transfer syntaxes",
        ac_with(
            contexts=b"\x21\x00\x00\x0f\x01\x00\x00\x00"  # 99: length 15
            b"\x40\x00\x00\x03"
            b"1.2"  # 107
            b"\x40\x00\x00\x00"  # 114
        ),
        "A-ASSOCIATE-AC.presentation_context[0].transfer_syntax",
        114,
    ),
    (
        "AC context ID even",
        patch(A_ASSOCIATE_AC, 140 + 4, b"\x04"),
        "A-ASSOCIATE-AC.presentation_context[2].context_id",
        144,
    ),
    ("RJ result 0", patch(A_ASSOCIATE_RJ_CALLED_AE, 7, b"\x00"), "A-ASSOCIATE-RJ.result", 7),
    ("RJ result 3", patch(A_ASSOCIATE_RJ_CALLED_AE, 7, b"\x03"), "A-ASSOCIATE-RJ.result", 7),
    ("RJ source 4", patch(A_ASSOCIATE_RJ_CALLED_AE, 8, b"\x04"), "A-ASSOCIATE-RJ.source", 8),
    ("RJ user reason 0", patch(A_ASSOCIATE_RJ_CALLED_AE, 9, b"\x00"), "A-ASSOCIATE-RJ.reason", 9),
    ("RJ user reason 11", patch(A_ASSOCIATE_RJ_CALLED_AE, 9, b"\x0b"), "A-ASSOCIATE-RJ.reason", 9),
    (
        "RJ ACSE reason 3",
        patch(A_ASSOCIATE_RJ_CONGESTION, 8, b"\x02\x03"),
        "A-ASSOCIATE-RJ.reason",
        9,
    ),
    ("RJ length 5", _pdu(3, b"\x00\x01\x01\x01\x00"), "A-ASSOCIATE-RJ.pdu_length", 2),
    ("release length 0", b"\x05\x00\x00\x00\x00\x00", "A-RELEASE-RQ.pdu_length", 2),
    ("release length 5", _pdu(6, bytes(5)), "A-RELEASE-RP.pdu_length", 2),
    ("abort source 3", patch(A_ABORT_USER, 8, b"\x03"), "A-ABORT.source", 8),
    ("abort provider reason 7", patch(A_ABORT_PROVIDER, 9, b"\x07"), "A-ABORT.reason", 9),
    ("P-DATA without PDVs", _pdu(4, b""), "P-DATA-TF.pdu_length", 2),
    (
        "PDV item length 1",
        patch(P_DATA_TF, 6, b"\x00\x00\x00\x01"),
        "P-DATA-TF.pdv[0].item_length",
        6,
    ),
    (
        "PDV item length 0",
        patch(P_DATA_TF, 6, b"\x00\x00\x00\x00"),
        "P-DATA-TF.pdv[0].item_length",
        6,
    ),
    (
        "PDV overruns the PDU",
        patch(P_DATA_TF, 16, b"\x00\x00\x00\x09"),
        "P-DATA-TF.pdv[1].item_length",
        16,
    ),
    (
        "PDV item length 0xFFFFFFFF",
        patch(P_DATA_TF, 6, b"\xff\xff\xff\xff"),
        "P-DATA-TF.pdv[0].item_length",
        6,
    ),
    ("PDV context ID even", patch(P_DATA_TF, 20, b"\x02"), "P-DATA-TF.pdv[1].context_id", 20),
    ("PDV context ID 0", patch(P_DATA_TF, 10, b"\x00"), "P-DATA-TF.pdv[0].context_id", 10),
    (
        "partial PDV header at the end",
        insert(P_DATA_TF, 28, b"\x00\x00\x00"),
        "P-DATA-TF.pdv[2].item_length",
        28,
    ),
]


@pytest.mark.parametrize(
    ("name", "data", "fld", "offset"), ERROR_CASES, ids=[n for n, *_ in ERROR_CASES]
)
def test_decode_error(name: str, data: bytes, fld: str, offset: int) -> None:
    with pytest.raises(PDUDecodeError) as info:
        decode_pdu(data)
    assert (info.value.field, info.value.offset) == (fld, offset), str(info.value)
    assert info.value.source == AbortSource.SERVICE_PROVIDER
    assert str(info.value).startswith(f"{fld} at offset {offset}: ")


def test_decode_error_reasons() -> None:
    with pytest.raises(PDUDecodeError) as info:
        decode_pdu(b"\x08\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    assert info.value.reason == AbortReason.UNRECOGNIZED_PDU
    with pytest.raises(PDUDecodeError) as info:
        decode_pdu(insert(RQ, 182, b"\x50\x00\x00\x00"))
    assert info.value.reason == AbortReason.UNEXPECTED_PDU_PARAMETER
    with pytest.raises(PDUDecodeError) as info:
        decode_pdu(patch(RQ, 103, b"\x02"))
    assert info.value.reason == AbortReason.INVALID_PDU_PARAMETER_VALUE
    assert isinstance(info.value, RemoteProtocolError)


# ---------------------------------------------------------------------------
# P-DATA-TF: zero copy in and out
# ---------------------------------------------------------------------------


def test_pdv_data_are_views_into_the_input() -> None:
    pdata = decode_pdu(P_DATA_TF)
    assert isinstance(pdata, PDataTF)
    first, second = pdata.pdvs
    assert isinstance(first.data, memoryview)
    assert first.data.obj is P_DATA_TF
    assert first.data.readonly
    assert bytes(first.data) == b"\x01\x02\x03\x04"
    assert bytes(second.data) == b"\xaa\xbb\xcc\xdd\xee\xff"


def test_pdv_views_of_a_bytearray_are_read_only() -> None:
    buffer = bytearray(P_DATA_TF)
    pdata = decode_pdu(buffer)
    assert isinstance(pdata, PDataTF)
    data = pdata.pdvs[0].data
    assert isinstance(data, memoryview)
    assert data.readonly
    assert data.obj is buffer


def test_decode_strided_or_typed_views() -> None:
    doubled = bytes(b for byte in P_DATA_TF for b in (byte, 0))
    assert decode_pdu(memoryview(doubled)[::2]) == P_DATA_TF_OBJ
    assert decode_pdu(memoryview(A_RELEASE_RQ).cast("c")) == AReleaseRQ()


def test_encode_pdata_chunks_do_not_copy() -> None:
    payload = bytes(range(256)) * 4
    view = memoryview(bytearray(b"xyz"))
    chunks = encode_pdata_chunks(
        [
            PDV(context_id=5, is_command=False, is_last=True, data=payload),
            PDV(context_id=7, is_command=True, is_last=False, data=view),
        ]
    )
    assert len(chunks) == 5
    assert chunks[0] == b"\x04\x00\x00\x00\x04\x0f"  # 6 + 1024 + 6 + 3 = 1039
    assert chunks[1] == b"\x00\x00\x04\x02\x05\x02"  # length 1026, ID 5, data set + last
    assert chunks[2] is payload
    assert chunks[3] == b"\x00\x00\x00\x05\x07\x01"  # length 5, ID 7, command, not last
    assert chunks[4] is view
    assert b"".join(chunks) == encode_pdu(
        PDataTF(
            pdvs=(
                PDV(context_id=5, is_command=False, is_last=True, data=payload),
                PDV(context_id=7, is_command=True, is_last=False, data=b"xyz"),
            )
        )
    )


def test_encode_pdata_empty_pdv() -> None:
    pdv = PDV(context_id=1, is_command=True, is_last=True, data=b"")
    assert encode_pdu(PDataTF(pdvs=(pdv,))) == b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x02\x01\x03"


def test_pdv_repr_shows_length_not_data() -> None:
    big = PDV(context_id=1, is_command=False, is_last=True, data=b"\x00" * 1_000_000)
    assert repr(big) == "PDV(context_id=1, is_command=False, is_last=True, data=<1000000 bytes>)"
    assert len(repr(PDataTF(pdvs=(big, big)))) < 200
    view = PDV(context_id=1, is_command=False, is_last=True, data=memoryview(b"\x00" * 10))
    assert "data=<10 bytes>" in repr(view)


# ---------------------------------------------------------------------------
# Validation on construction
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "title", ["", " ", " " * 16, " AE", "AE ", "A" * 17, "A\\B", "A\x07", "A\x00", "ÄE", "A\tB"]
)
def test_invalid_ae_titles_are_refused(title: str) -> None:
    with pytest.raises(PDUValueError):
        AAssociateRQ(
            called_ae_title=title,
            calling_ae_title="OK",
            presentation_contexts=(),
            user_information=UserInformation(),
        )


def test_ae_title_of_16_characters_with_inner_space() -> None:
    rq = rq_obj()
    title = "ABCDEFG HIJKLMNO"
    obj = AAssociateRQ(
        called_ae_title=title,
        calling_ae_title=rq.calling_ae_title,
        presentation_contexts=rq.presentation_contexts,
        user_information=rq.user_information,
    )
    assert encode_pdu(obj)[10:26] == b"ABCDEFG HIJKLMNO"
    assert decode_pdu(encode_pdu(obj)) == obj


@pytest.mark.parametrize(
    "factory",
    [
        lambda: PresentationContextRQ(
            context_id=2, abstract_syntax="1.2", transfer_syntaxes=("1",)
        ),
        lambda: PresentationContextRQ(
            context_id=0, abstract_syntax="1.2", transfer_syntaxes=("1",)
        ),
        lambda: PresentationContextRQ(
            context_id=257, abstract_syntax="1.2", transfer_syntaxes=("1",)
        ),
        lambda: PresentationContextRQ(context_id=1, abstract_syntax="1.2", transfer_syntaxes=()),
        lambda: PresentationContextRQ(context_id=1, abstract_syntax="", transfer_syntaxes=("1",)),
        lambda: PresentationContextRQ(
            context_id=1, abstract_syntax="1.2 ", transfer_syntaxes=("1",)
        ),
        lambda: PresentationContextRQ(
            context_id=1, abstract_syntax="1" * 65, transfer_syntaxes=("1",)
        ),
        lambda: PresentationContextRQ(
            context_id=True, abstract_syntax="1.2", transfer_syntaxes=("1",)
        ),
        lambda: PresentationContextAC(context_id=1, result=0, transfer_syntax=None),
        lambda: PresentationContextAC(context_id=1, result=5, transfer_syntax="1.2"),
        lambda: PresentationContextAC(context_id=1, result=1, transfer_syntax=""),
        lambda: MaximumLength(maximum_length=-1),
        lambda: MaximumLength(maximum_length=1 << 32),
        lambda: ImplementationVersionName(name=""),
        lambda: ImplementationVersionName(name="X" * 17),
        lambda: AsynchronousOperationsWindow(
            max_operations_invoked=65536, max_operations_performed=0
        ),
        lambda: SCPSCURoleSelection(sop_class_uid="1.2", scu_role=1, scp_role=False),
        lambda: SOPClassExtendedNegotiation(
            sop_class_uid="1.2", service_class_application_information=b"x" * 65534
        ),
        lambda: SOPClassCommonExtendedNegotiation(
            sop_class_uid="1.2", service_class_uid="1.2", related_general_sop_class_uids=("x",)
        ),
        lambda: UserIdentityRQ(
            identity_type=256, positive_response_requested=False, primary_field=b""
        ),
        lambda: UserIdentityRQ(
            identity_type=1, positive_response_requested=False, primary_field="str"
        ),
        lambda: UserIdentityRQ(
            identity_type=2,
            positive_response_requested=False,
            primary_field=b"u" * 40000,
            secondary_field=b"p" * 40000,
        ),
        lambda: UserIdentityAC(server_response=b"x" * 65534),
        lambda: UnknownItem(item_type=256, data=b""),
        lambda: UnknownItem(item_type=0x60, data=b"x" * 65536),
        lambda: UserInformation(items=(UnknownItem(item_type=0x51, data=b""),)),
        lambda: UserInformation(items=("not an item",)),
        lambda: AAssociateRJ(result=3, source=1, reason=1),
        lambda: AAssociateRJ(result=1, source=0, reason=1),
        lambda: AAssociateRJ(result=1, source=2, reason=3),
        lambda: AAssociateRJ(result=1, source=3, reason=8),
        lambda: AAbort(source=3),
        lambda: AAbort(source=2, reason=7),
        lambda: AAbort(source=0, reason=256),
        lambda: PDV(context_id=2, is_command=True, is_last=True, data=b""),
        lambda: PDV(context_id=1, is_command=1, is_last=True, data=b""),
        lambda: PDV(context_id=1, is_command=True, is_last=True, data=bytearray(b"x")),
        lambda: PDV(context_id=1, is_command=True, is_last=True, data=memoryview(b"abcd")[::2]),
        lambda: PDataTF(pdvs=()),
        lambda: AAssociateRQ(
            called_ae_title="A",
            calling_ae_title="B",
            presentation_contexts=(),
            user_information=UserInformation(),
            unknown_items=(UnknownItem(item_type=0x20, data=b""),),
        ),
        lambda: AAssociateAC(
            called_ae_title="A",
            calling_ae_title="B",
            presentation_contexts=(
                PresentationContextRQ(context_id=1, abstract_syntax="1", transfer_syntaxes=("1",)),
            ),
            user_information=UserInformation(),
        ),
    ],
)
def test_invalid_values_are_refused(factory: object) -> None:
    with pytest.raises(PDUValueError) as info:
        factory()  # type: ignore[operator]
    assert isinstance(info.value, LocalProtocolError)
    assert isinstance(info.value, ValueError)


def test_values_are_coerced_to_enums_and_tuples() -> None:
    ctx = PresentationContextAC(context_id=1, result=3, transfer_syntax=None)
    assert ctx.result is PresentationContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED
    rj = AAssociateRJ(result=1, source=2, reason=2)
    assert rj.result is RejectResult.REJECTED_PERMANENT
    assert rj.source is RejectSource.SERVICE_PROVIDER_ACSE
    abort = AAbort(source=2, reason=4)
    assert abort.reason is AbortReason.UNRECOGNIZED_PDU_PARAMETER
    rq_ctx = PresentationContextRQ(
        context_id=1,
        abstract_syntax="1.2",
        transfer_syntaxes=["1.2.3"],  # type: ignore[arg-type]
    )
    assert rq_ctx.transfer_syntaxes == ("1.2.3",)
    identity = UserIdentityRQ(identity_type=4, positive_response_requested=False, primary_field=b"")
    assert identity.identity_type is UserIdentityType.SAML


def test_encoding_an_item_too_long_for_its_length_field() -> None:
    many = tuple("1.2.840.10008.1.2.4." + str(n).zfill(40) for n in range(1100))
    ctx = PresentationContextRQ(context_id=1, abstract_syntax="1.2", transfer_syntaxes=many)
    with pytest.raises(PDUValueError, match="16-bit item length"):
        encode_pdu(rq_obj(contexts=(ctx,)))


# ---------------------------------------------------------------------------
# PDUReader
# ---------------------------------------------------------------------------

ALL_FIXTURES = b"".join(data for _, data, _, _ in PDU_FIXTURES)
ALL_EXPECTED = [expected for _, _, expected, _ in PDU_FIXTURES]


def drain(reader: PDUReader) -> list[PDU]:
    out = []
    while (pdu := reader.next_pdu()) is not None:
        out.append(pdu)
    return out


def test_reader_byte_at_a_time() -> None:
    reader = PDUReader(max_pdu_length=16384)
    got: list[PDU] = []
    for i in range(len(ALL_FIXTURES)):
        reader.feed(ALL_FIXTURES[i : i + 1])
        got.extend(drain(reader))
    assert got == ALL_EXPECTED
    assert reader.buffered == 0


def test_reader_everything_in_one_feed() -> None:
    reader = PDUReader()
    reader.feed(ALL_FIXTURES)
    assert reader.buffered == len(ALL_FIXTURES)
    assert drain(reader) == ALL_EXPECTED
    assert reader.buffered == 0
    assert reader.next_pdu() is None


def test_reader_accepts_memoryview_and_bytearray() -> None:
    reader = PDUReader()
    reader.feed(memoryview(A_RELEASE_RQ)[:3])
    reader.feed(bytearray(A_RELEASE_RQ[3:]))
    assert reader.next_pdu() == AReleaseRQ()


def test_reader_partial_pdu_waits() -> None:
    reader = PDUReader()
    reader.feed(P_DATA_TF[:-1])
    assert reader.next_pdu() is None
    assert reader.buffered == len(P_DATA_TF) - 1
    reader.feed(P_DATA_TF[-1:] + A_RELEASE_RQ[:4])
    assert reader.next_pdu() == P_DATA_TF_OBJ
    assert reader.next_pdu() is None
    assert reader.buffered == 4


def test_reader_pdvs_survive_more_feeding() -> None:
    # Views handed out must not pin the receive buffer (no BufferError on feed).
    reader = PDUReader()
    reader.feed(P_DATA_TF)
    exact = reader.next_pdu()  # the buffer held exactly one PDU
    reader.feed(P_DATA_TF + P_DATA_TF[:10])
    sliced = reader.next_pdu()  # the buffer held more than one PDU
    reader.feed(P_DATA_TF[10:])
    last = reader.next_pdu()
    assert exact == sliced == last == P_DATA_TF_OBJ
    assert isinstance(exact, PDataTF)
    assert bytes(exact.pdvs[1].data) == b"\xaa\xbb\xcc\xdd\xee\xff"


def test_reader_hands_out_views_not_copies_and_never_changes_them() -> None:
    # PDUs that arrive together are views of one receive buffer (no copy of a data
    # set); later feeds, whether or not those views still live, leave them intact.
    reader = PDUReader()
    reader.feed(P_DATA_TF * 3 + P_DATA_TF[:7])
    first, second = reader.next_pdu(), reader.next_pdu()
    assert isinstance(first, PDataTF) and isinstance(second, PDataTF)
    assert first.pdvs[0].data.obj is second.pdvs[0].data.obj  # type: ignore[union-attr]
    reader.feed(P_DATA_TF[7:] + P_DATA_TF[:3])  # views live: the tail moves out
    third, fourth = reader.next_pdu(), reader.next_pdu()
    del third, fourth
    reader.feed(P_DATA_TF[3:] + A_RELEASE_RQ)  # no views of the tail: compacted
    assert drain(reader) == [P_DATA_TF_OBJ, AReleaseRQ()]
    assert first == second == P_DATA_TF_OBJ
    assert reader.buffered == 0


def test_reader_rejects_oversized_pdata_on_the_header() -> None:
    reader = PDUReader(max_pdu_length=16384)
    reader.feed(b"\x04\x00\x00\x00\x40\x01")  # PDU length 16385, nothing of the body yet
    with pytest.raises(PDUDecodeError) as info:
        reader.next_pdu()
    assert info.value.field == "P-DATA-TF.pdu_length"
    assert info.value.offset == 2
    assert info.value.reason == AbortReason.INVALID_PDU_PARAMETER_VALUE
    assert "16385" in str(info.value) and "16384" in str(info.value)
    assert reader.buffered == 6


def test_reader_cap_is_on_the_length_field() -> None:
    # PS3.8 D.1: the maximum length bounds the PDU length field (not counting the header).
    reader = PDUReader(max_pdu_length=len(P_DATA_TF) - 6)
    reader.feed(P_DATA_TF)
    assert reader.next_pdu() == P_DATA_TF_OBJ
    reader.max_pdu_length = len(P_DATA_TF) - 7
    assert reader.max_pdu_length == 22 - 1
    reader.feed(P_DATA_TF)
    with pytest.raises(PDUDecodeError):
        reader.next_pdu()


def test_reader_unlimited_pdata() -> None:
    reader = PDUReader(max_pdu_length=0)
    reader.feed(b"\x04\x00\xff\xff\xff\xff")
    assert reader.next_pdu() is None  # waits; nothing was allocated for the body


def test_reader_cap_does_not_apply_to_associate() -> None:
    # The P-DATA limit is ours to advertise; A-ASSOCIATE has its own cap.
    reader = PDUReader(max_pdu_length=100)
    reader.feed(A_ASSOCIATE_RQ_FULL)
    assert reader.next_pdu() == A_ASSOCIATE_RQ_FULL_OBJ


def test_reader_rejects_oversized_associate_on_the_header() -> None:
    reader = PDUReader(max_associate_pdu_length=1000)
    reader.feed(b"\x01\x00\x00\x00\x03\xe9")  # 1001
    with pytest.raises(PDUDecodeError) as info:
        reader.next_pdu()
    assert info.value.field == "A-ASSOCIATE-RQ.pdu_length"
    assert "1001" in str(info.value) and "1000" in str(info.value)


@pytest.mark.parametrize("first", [b"\x00", b"\x08", b"\x10", b"\xff"])
def test_reader_rejects_unknown_type_on_the_first_byte(first: bytes) -> None:
    reader = PDUReader()
    reader.feed(first)
    with pytest.raises(PDUDecodeError) as info:
        reader.next_pdu()
    assert info.value.reason == AbortReason.UNRECOGNIZED_PDU
    assert (info.value.field, info.value.offset) == ("PDU.pdu_type", 0)


def test_reader_rejects_unknown_type_after_a_good_pdu() -> None:
    reader = PDUReader()
    reader.feed(A_RELEASE_RQ + b"\x09\x00")
    assert reader.next_pdu() == AReleaseRQ()
    with pytest.raises(PDUDecodeError):
        reader.next_pdu()


@pytest.mark.parametrize("header", [b"\x05\x00\xff\xff\xff\xff", b"\x07\x00\x00\x00\x00\x05"])
def test_reader_rejects_bad_fixed_length_on_the_header(header: bytes) -> None:
    reader = PDUReader()
    reader.feed(header)
    with pytest.raises(PDUDecodeError):
        reader.next_pdu()


def test_reader_huge_length_allocates_nothing() -> None:
    reader = PDUReader(max_pdu_length=1 << 20)
    tracemalloc.start()
    try:
        reader.feed(b"\x04\x00\xff\xff\xff\xf0")
        with pytest.raises(PDUDecodeError):
            reader.next_pdu()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_reader_invalid_settings() -> None:
    with pytest.raises(PDUValueError):
        PDUReader(max_pdu_length=-1)
    reader = PDUReader()
    with pytest.raises(PDUValueError):
        reader.max_pdu_length = 1 << 32


def test_reader_propagates_body_errors() -> None:
    reader = PDUReader()
    reader.feed(patch(P_DATA_TF, 20, b"\x02"))
    with pytest.raises(PDUDecodeError) as info:
        reader.next_pdu()
    assert (info.value.field, info.value.offset) == ("P-DATA-TF.pdv[1].context_id", 20)


# ---------------------------------------------------------------------------
# pynetdicom as an independent encoder and decoder
# ---------------------------------------------------------------------------

pynetdicom_items = pytest.importorskip("pynetdicom.tests.encoded_pdu_items")


def test_decode_pynetdicom_fixtures() -> None:
    e = pynetdicom_items
    rq = decode_pdu(e.a_associate_rq)
    assert isinstance(rq, AAssociateRQ)
    assert (rq.called_ae_title, rq.calling_ae_title) == ("ANY-SCP", "ECHOSCU")
    assert rq.presentation_contexts == (
        PresentationContextRQ(
            context_id=1, abstract_syntax=VERIFICATION, transfer_syntaxes=(IMPLICIT_VR_LE,)
        ),
    )
    assert rq.user_information.maximum_length == MaximumLength(maximum_length=16382)
    assert rq.user_information.implementation_version_name == ImplementationVersionName(
        name="PYNETDICOM_090"
    )

    rq = decode_pdu(e.a_associate_rq_user_async)
    assert isinstance(rq, AAssociateRQ)
    assert rq.user_information.async_ops_window == AsynchronousOperationsWindow(
        max_operations_invoked=5, max_operations_performed=5
    )
    assert rq.user_information.user_identity_rq == UserIdentityRQ(
        identity_type=UserIdentityType.USERNAME,
        positive_response_requested=True,
        primary_field=b"pynetdicom",
    )

    rq = decode_pdu(e.a_associate_rq_role)
    assert isinstance(rq, AAssociateRQ)
    assert rq.user_information.role_selections == (
        SCPSCURoleSelection(sop_class_uid=CT_IMAGE_STORAGE, scu_role=False, scp_role=True),
    )

    rq = decode_pdu(e.a_associate_rq_user_id_user_pass)  # reserved byte FFH in the context
    assert isinstance(rq, AAssociateRQ)
    assert rq.presentation_contexts[0].transfer_syntaxes == (
        EXPLICIT_VR_LE,
        "1.2.840.10008.1.2.2",
        IMPLICIT_VR_LE,
    )
    assert rq.user_information.user_identity_rq == UserIdentityRQ(
        identity_type=UserIdentityType.USERNAME_AND_PASSCODE,
        positive_response_requested=False,
        primary_field=b"pynetdicom",
        secondary_field=b"p4ssw0rd",
    )

    rq = decode_pdu(e.a_associate_rq_user_id_ext_neg)
    assert isinstance(rq, AAssociateRQ)
    assert [c.context_id for c in rq.presentation_contexts] == [1, 3, 5]
    assert rq.user_information.sop_class_extended == (
        SOPClassExtendedNegotiation(
            sop_class_uid=CT_IMAGE_STORAGE,
            service_class_application_information=b"\x02\x00\x03\x00\x01\x00",
        ),
        SOPClassExtendedNegotiation(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            service_class_application_information=b"\x02\x00\x03\x00\x01\x00",
        ),
    )

    ac = decode_pdu(e.a_associate_rq_com_ext_neg)  # despite its name, an AC
    assert isinstance(ac, AAssociateAC)
    assert ac.user_information.sop_class_common_extended == (
        SOPClassCommonExtendedNegotiation(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            service_class_uid=STORAGE_SERVICE_CLASS,
            related_general_sop_class_uids=("1.2.840.10008.5.1.4.1.1.88.22",),
        ),
    )

    ac = decode_pdu(e.a_associate_ac)
    assert isinstance(ac, AAssociateAC)
    assert ac.presentation_contexts == (
        PresentationContextAC(
            context_id=1,
            result=PresentationContextResult.ACCEPTANCE,
            transfer_syntax=IMPLICIT_VR_LE,
        ),
    )

    ac = decode_pdu(e.a_associate_ac_zero_ts)
    assert isinstance(ac, AAssociateAC)
    assert ac.presentation_contexts[1] == PresentationContextAC(
        context_id=3,
        result=PresentationContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED,
        transfer_syntax=None,
    )
    assert ac.user_information.implementation_version_name == ImplementationVersionName(
        name="MergeCOM3_390IB2"
    )

    ac = decode_pdu(e.a_associate_ac_no_ts)
    assert isinstance(ac, AAssociateAC)
    assert ac.presentation_contexts[0].transfer_syntax is None

    assert decode_pdu(e.a_associate_rj) == AAssociateRJ(
        result=RejectResult.REJECTED_PERMANENT, source=RejectSource.SERVICE_USER, reason=1
    )
    assert decode_pdu(e.a_release_rq) == AReleaseRQ()
    assert decode_pdu(e.a_release_rp) == AReleaseRP()
    assert decode_pdu(e.a_abort) == AAbort(source=AbortSource.SERVICE_USER, reason=0)
    assert decode_pdu(e.a_p_abort) == AAbort(
        source=AbortSource.SERVICE_PROVIDER, reason=AbortReason.UNRECOGNIZED_PDU_PARAMETER
    )

    pdata = decode_pdu(e.p_data_tf)
    assert isinstance(pdata, PDataTF)
    (pdv,) = pdata.pdvs
    assert (pdv.context_id, pdv.is_command, pdv.is_last) == (1, True, True)
    assert bytes(pdv.data) == e.presentation_data[1:]


def test_pynetdicom_fixtures_we_refuse() -> None:
    e = pynetdicom_items
    # Called / calling AE title of 16 spaces: Table 9-11 says "shall not be used".
    with pytest.raises(PDUDecodeError, match="called_ae_title"):
        decode_pdu(e.a_associate_rq_called)
    with pytest.raises(PDUDecodeError, match="calling_ae_title"):
        decode_pdu(e.a_associate_rq_calling)
    # Its PDU length (184) was not updated when a user identity AC was appended.
    with pytest.raises(PDUDecodeError, match="pdu_length"):
        decode_pdu(e.a_associate_ac_user)


def _pynetdicom_rq_bytes() -> bytes:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        AsynchronousOperationsWindowNegotiation,
        ImplementationClassUIDNotification,
        ImplementationVersionNameNotification,
        MaximumLengthNotification,
        SCP_SCU_RoleSelectionNegotiation,
    )
    from pynetdicom.pdu_primitives import (
        SOPClassCommonExtendedNegotiation as PynCommonExt,
    )
    from pynetdicom.pdu_primitives import (
        SOPClassExtendedNegotiation as PynExt,
    )
    from pynetdicom.pdu_primitives import (
        UserIdentityNegotiation as PynUserIdentity,
    )
    from pynetdicom.presentation import PresentationContext

    primitive = A_ASSOCIATE()
    primitive.application_context_name = DICOM_APPLICATION_CONTEXT
    primitive.calling_ae_title = "PYNETDICOM"
    primitive.called_ae_title = "ROUTER"
    context = PresentationContext()
    context.context_id = 1
    context.abstract_syntax = CT_IMAGE_STORAGE
    context.transfer_syntax = [EXPLICIT_VR_LE, IMPLICIT_VR_LE]
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 32768
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.4"
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "PYNETDICOM_304"
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 3
    window.maximum_number_operations_performed = 2
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CT_IMAGE_STORAGE
    role.scu_role = False
    role.scp_role = True
    ext = PynExt()
    ext.sop_class_uid = CT_IMAGE_STORAGE
    ext.service_class_application_information = b"\x01\x00"
    common = PynCommonExt()
    common.sop_class_uid = "1.2.840.10008.5.1.4.1.1.88.40"
    common.service_class_uid = STORAGE_SERVICE_CLASS
    common.related_general_sop_class_identification = [ENHANCED_SR]
    identity = PynUserIdentity()
    identity.user_identity_type = 2
    identity.positive_response_requested = True
    identity.primary_field = b"user"
    identity.secondary_field = b"pass"
    primitive.user_information = [
        max_length,
        class_uid,
        version,
        window,
        role,
        ext,
        common,
        identity,
    ]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def test_decode_pynetdicom_encoded_rq() -> None:
    rq = decode_pdu(_pynetdicom_rq_bytes())
    assert rq == AAssociateRQ(
        called_ae_title="ROUTER",
        calling_ae_title="PYNETDICOM",
        presentation_contexts=(
            PresentationContextRQ(
                context_id=1,
                abstract_syntax=CT_IMAGE_STORAGE,
                transfer_syntaxes=(EXPLICIT_VR_LE, IMPLICIT_VR_LE),
            ),
        ),
        user_information=UserInformation(
            items=(
                MaximumLength(maximum_length=32768),
                ImplementationClassUID(uid="1.2.826.0.1.3680043.9.3811.3.0.4"),
                ImplementationVersionName(name="PYNETDICOM_304"),
                AsynchronousOperationsWindow(max_operations_invoked=3, max_operations_performed=2),
                SCPSCURoleSelection(sop_class_uid=CT_IMAGE_STORAGE, scu_role=False, scp_role=True),
                SOPClassExtendedNegotiation(
                    sop_class_uid=CT_IMAGE_STORAGE,
                    service_class_application_information=b"\x01\x00",
                ),
                SOPClassCommonExtendedNegotiation(
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.40",
                    service_class_uid=STORAGE_SERVICE_CLASS,
                    related_general_sop_class_uids=(ENHANCED_SR,),
                ),
                UserIdentityRQ(
                    identity_type=UserIdentityType.USERNAME_AND_PASSCODE,
                    positive_response_requested=True,
                    primary_field=b"user",
                    secondary_field=b"pass",
                ),
            )
        ),
    )


def test_decode_pynetdicom_encoded_ac_and_pdata() -> None:
    from pynetdicom.pdu import A_ASSOCIATE_AC, P_DATA_TF
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        P_DATA,
        MaximumLengthNotification,
    )
    from pynetdicom.presentation import PresentationContext

    primitive = A_ASSOCIATE()
    primitive.application_context_name = DICOM_APPLICATION_CONTEXT
    primitive.calling_ae_title = "PYNETDICOM"
    primitive.called_ae_title = "ROUTER"
    primitive.result = 0
    accepted = PresentationContext()
    accepted.context_id = 1
    accepted.abstract_syntax = CT_IMAGE_STORAGE
    accepted.transfer_syntax = [EXPLICIT_VR_LE]
    accepted.result = 0
    rejected = PresentationContext()
    rejected.context_id = 3
    rejected.abstract_syntax = VERIFICATION
    rejected.transfer_syntax = [IMPLICIT_VR_LE]
    rejected.result = 3
    primitive.presentation_context_definition_results_list = [accepted, rejected]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 0
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    ac = decode_pdu(bytes(pdu.encode()))
    assert isinstance(ac, AAssociateAC)
    assert ac.presentation_contexts[0] == PresentationContextAC(
        context_id=1,
        result=PresentationContextResult.ACCEPTANCE,
        transfer_syntax=EXPLICIT_VR_LE,
    )
    assert ac.presentation_contexts[1].context_id == 3
    assert ac.presentation_contexts[1].result == 3
    assert ac.user_information.maximum_length == MaximumLength(maximum_length=0)

    data = P_DATA()
    data.presentation_data_value_list = [[1, b"\x03" + b"CMD"], [3, b"\x02" + b"DATA"]]
    pdata_pdu = P_DATA_TF()
    pdata_pdu.from_primitive(data)
    pdata = decode_pdu(bytes(pdata_pdu.encode()))
    assert pdata == PDataTF(
        pdvs=(
            PDV(context_id=1, is_command=True, is_last=True, data=b"CMD"),
            PDV(context_id=3, is_command=False, is_last=True, data=b"DATA"),
        )
    )


def test_pynetdicom_decodes_our_rq() -> None:
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    # pynetdicom cannot skip unknown items (KeyError), contrary to §9.3: leave them out.
    ours = dataclasses.replace(
        A_ASSOCIATE_RQ_FULL_OBJ,
        user_information=UserInformation(items=A_ASSOCIATE_RQ_FULL_OBJ.user_information.items[:-1]),
        unknown_items=(),
    )
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(encode_pdu(ours))
    assert pdu.called_ae_title == "ANY-SCP"
    assert pdu.calling_ae_title == "ECHOSCU"
    assert pdu.application_context_name == DICOM_APPLICATION_CONTEXT
    contexts = pdu.presentation_context
    assert [c.context_id for c in contexts] == [1, 3]
    assert contexts[1].abstract_syntax == CT_IMAGE_STORAGE
    assert contexts[1].transfer_syntax == [EXPLICIT_VR_LE, IMPLICIT_VR_LE]
    info = pdu.user_information
    assert info is not None
    assert info.maximum_length == 65536
    assert info.implementation_class_uid == "1.2.3.4"
    assert info.implementation_version_name == "TEST_1"
    assert info.async_ops_window is not None
    assert info.async_ops_window.max_operations_invoked == 5
    role = info.role_selection[CT_IMAGE_STORAGE]
    assert (role.scu_role, role.scp_role) == (False, True)
    assert info.ext_neg[0].app_info == b"\x02\x00\x03\x00\x01\x00"
    assert info.common_ext_neg[0].related_general_sop_class_identification == [ENHANCED_SR]
    identity = info.user_identity
    assert identity.user_identity_type == 2
    assert identity.primary_field == b"user"
    assert identity.secondary_field == b"pass"
    # Through pynetdicom's encoder and back.
    assert decode_pdu(bytes(pdu.encode())) == ours


def test_pynetdicom_decodes_our_ac_rj_pdata_release_abort() -> None:
    from pynetdicom.pdu import (
        A_ABORT_RQ,
        A_ASSOCIATE_AC,
        A_ASSOCIATE_RJ,
        A_RELEASE_RP,
        A_RELEASE_RQ,
        P_DATA_TF,
    )

    ac = A_ASSOCIATE_AC()
    ac.decode(encode_pdu(A_ASSOCIATE_AC_OBJ))
    results = [(c.context_id, c.result, c.transfer_syntax) for c in ac.presentation_context]
    assert results == [(1, 0, IMPLICIT_VR_LE), (3, 3, None), (5, 1, EXPLICIT_VR_LE)]
    assert ac.user_information is not None
    assert ac.user_information.maximum_length == 16384
    assert ac.user_information.user_identity.server_response == b"token"

    rj = A_ASSOCIATE_RJ()
    rj.decode(encode_pdu(A_ASSOCIATE_RJ_CONGESTION_OBJ))
    assert (rj.result, rj.source, rj.reason_diagnostic) == (2, 3, 1)

    pdata = P_DATA_TF()
    pdata.decode(encode_pdu(P_DATA_TF_OBJ))
    items = pdata.presentation_data_value_items
    assert [(pdv.presentation_context_id, pdv.presentation_data_value) for pdv in items] == [
        (1, b"\x03\x01\x02\x03\x04"),
        (3, b"\x00\xaa\xbb\xcc\xdd\xee\xff"),
    ]

    release_rq = A_RELEASE_RQ()
    release_rq.decode(encode_pdu(AReleaseRQ()))
    release_rp = A_RELEASE_RP()
    release_rp.decode(encode_pdu(AReleaseRP()))
    abort = A_ABORT_RQ()
    abort.decode(encode_pdu(AAbort(source=2, reason=6)))
    assert (abort.source, abort.reason_diagnostic) == (2, 6)


def test_nul_padded_ae_title_is_tolerated() -> None:
    """Some modalities pad AE titles with NUL instead of space; that is padding,
    not a reason to abort (the title itself is unchanged)."""
    pdu = decode_pdu(patch(RQ, 33, b"\x00" * 9))
    assert isinstance(pdu, AAssociateRQ)
    assert pdu.calling_ae_title == decode_pdu(RQ).calling_ae_title  # type: ignore[union-attr]


@pytest.mark.parametrize(("context_id", "is_command", "is_last", "size"),
                         [(1, True, True, 0), (3, False, False, 16378), (255, False, True, 7)])
def test_single_pdv_header_matches_the_general_encoder(
    context_id: int, is_command: bool, is_last: bool, size: int
) -> None:
    """The sender's fast path writes the same 12 bytes as encode_pdata_chunks."""
    from router.dicom.pdu import single_pdv_header

    pdv = PDV(context_id=context_id, is_command=is_command, is_last=is_last, data=bytes(size))
    chunks = encode_pdata_chunks([pdv])
    assert single_pdv_header(context_id, is_command, is_last, size) == chunks[0] + chunks[1]


@pytest.mark.parametrize(("item", "item_type"), [
    (b"\x52\x00\x00\x00", 0x52),                         # empty class UID
    (b"\x52\x00\x00\x061.2.AB", 0x52),                   # letters in the UID
    (b"\x55\x00\x00\x11ABCDEFGHIJKLMNOPQ", 0x55),         # 17-character version name
    (b"\x55\x00\x00\x00", 0x55),                         # empty version name
])
def test_unusable_implementation_items_are_kept_raw(item: bytes, item_type: int) -> None:
    """Implementation class UID and version name are informational (PS3.7
    D.3.3.2); devices in the field send malformed ones. They are kept as
    UnknownItem instead of aborting the association."""
    pdu = decode_pdu(rq_with(sub_items=(item,)))
    assert isinstance(pdu, AAssociateRQ)
    kept = [i for i in pdu.user_information.items if isinstance(i, UnknownItem)]
    assert [(k.item_type, k.data) for k in kept] == [(item_type, item[4:])]


@pytest.mark.parametrize(("data", "problem"), [
    (patch(RQ, 115, b"\xe2"), "abstract syntax"),
    (insert(patch(RQ, 101, b"\x00\x32"), 149, b"\x40\x00\x00\x00"), "transfer syntax"),
    (rq_with(contexts=b"\x20\x00\x00\x5e\x01\x00\x00\x00"
                      b"\x30\x00\x00\x11" b"1.2.840.10008.1.1"
                      b"\x40\x00\x00\x41" + b"1" * 65, sub_items=()),
     "transfer syntax"),
], ids=["abstract syntax non-ASCII", "transfer syntax empty", "transfer syntax longer than 64"])
def test_a_context_with_a_non_uid_is_kept_as_malformed(data: bytes, problem: str) -> None:
    """A presentation context whose abstract or transfer syntax is not a UID costs
    that context only (negotiation refuses it, PS3.8 Table 9-18), not the whole
    association: the decoder keeps it, marked malformed with the reason."""
    pdu = decode_pdu(data)
    assert isinstance(pdu, AAssociateRQ)
    ctx = pdu.presentation_contexts[0]
    assert problem in ctx.malformed and "is not a UID" in ctx.malformed


def test_each_reject_reason_reads_in_words() -> None:
    """PS3.8 Table 9-21: the same value means other things for each source."""
    from router.dicom.pdu import reject_meaning

    assert reject_meaning(1, 7) == "called AE title not recognized"
    assert reject_meaning(1, 3) == "calling AE title not recognized"
    assert reject_meaning(2, 2) == "protocol version not supported"
    assert reject_meaning(3, 2) == "local limit exceeded"
    assert reject_meaning(1, 5) == reject_meaning(9, 1) == "a reserved reason"
