"""Fuzzing decode_command: whatever the bytes, only DIMSEError may come out.

Three sources of input: arbitrary bytes, valid command sets mutated (bytes
flipped, cut, inserted, lengths rewritten), and well-framed group 0000 element
lists with random tags and values. Any message that does decode must survive
an encode/decode round trip unchanged. Bounded: a few hundred examples, well
under ten seconds.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.dicom.dimse import (
    COMMAND_ELEMENTS,
    CCancelRQ,
    CEchoRQ,
    CGetRSP,
    CMoveRQ,
    CStoreRQ,
    CStoreRSP,
    DimseMessage,
    NGetRQ,
    NSetRSP,
    Priority,
    decode_command,
    encode_command,
)
from router.dicom.errors import DIMSEError

SEEDS: list[bytes] = [
    encode_command(message)
    for message in (
        CEchoRQ(message_id=1, affected_sop_class_uid="1.2.840.10008.1.1"),
        CStoreRQ(
            message_id=7,
            affected_sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            affected_sop_instance_uid="1.2.3.4.5.6.7",
            priority=Priority.HIGH,
            move_originator_application_entity_title="MOVESCU",
            move_originator_message_id=3,
        ),
        CStoreRSP(
            message_id_being_responded_to=7,
            status=0xB000,
            offending_element=(0x00100010,),
            error_comment="Coerced",
        ),
        CMoveRQ(
            message_id=4,
            affected_sop_class_uid="1.2.840.10008.5.1.4.1.2.2.2",
            move_destination="DEST",
        ),
        CGetRSP(
            message_id_being_responded_to=3,
            status=0xFF00,
            number_of_remaining_sub_operations=5,
            number_of_completed_sub_operations=2,
        ),
        CCancelRQ(message_id_being_responded_to=2),
        NGetRQ(
            message_id=6,
            requested_sop_class_uid="1.2.840.10008.5.1.1.16",
            requested_sop_instance_uid="1.2.840.10008.5.1.1.17",
            attribute_identifier_list=(0x21100010, 0x21100030),
        ),
        NSetRSP(message_id_being_responded_to=8, status=0x0106, error_id=1),
    )
]
COMMAND_FIELDS = [
    0x0001, 0x8001, 0x0010, 0x8010, 0x0020, 0x8020, 0x0021, 0x8021, 0x0030, 0x8030,
    0x0100, 0x8100, 0x0110, 0x8110, 0x0120, 0x8120, 0x0130, 0x8130, 0x0140, 0x8140,
    0x0150, 0x8150, 0x0FFF,
]  # fmt: skip

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)


def _check(data: bytes) -> None:
    try:
        message: DimseMessage = decode_command(data)
    except DIMSEError as exc:
        assert isinstance(exc.status, int)
        return
    # What decodes is a valid message: it encodes, and reads back the same.
    assert decode_command(encode_command(message)) == message


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    _check(data)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "length", "delete", "duplicate"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=12))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 12))]
        elif op == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 24))]
        elif op == "length" and at + 4 <= len(data):
            # Overwrite four bytes with a length-like value: sometimes it is one.
            value = draw(st.sampled_from([0, 1, 2, 3, 4, 64, 0xFFFF, 0xFFFFFFFF]))
            struct.pack_into("<I", data, at, value)
    return bytes(data)


@FUZZ
@given(_mutated())
def test_mutated_command_sets(data: bytes) -> None:
    _check(data)


_VALUES = st.one_of(
    st.binary(max_size=70),
    st.integers(0, 0xFFFF).map(lambda v: struct.pack("<H", v)),
    st.sampled_from(
        [b"1.2.840.10008.1.1\x00", b"1.2.3 ", b"ANY-SCP ", b"\x00\x00", b"\x01\x01", b""]
    ),
)


@st.composite
def _element_lists(draw: st.DrawFn) -> bytes:
    tags = st.one_of(st.sampled_from(sorted(COMMAND_ELEMENTS)), st.integers(0, 0xFFFF))
    elements = draw(st.lists(st.tuples(tags, _VALUES), max_size=12))
    if draw(st.booleans()):  # usually a real command field, so that decoding goes deep
        elements.append((0x0100, struct.pack("<H", draw(st.sampled_from(COMMAND_FIELDS)))))
    if draw(st.booleans()):
        elements.sort()
    body = b"".join(struct.pack("<HHI", 0, tag, len(value)) + value for tag, value in elements)
    if draw(st.booleans()):
        body = struct.pack("<HHII", 0, 0, 4, len(body)) + body
    return body


@FUZZ
@given(_element_lists())
def test_well_framed_element_lists(data: bytes) -> None:
    _check(data)
