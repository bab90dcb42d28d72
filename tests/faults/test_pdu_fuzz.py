"""Fuzz the PDU decoder and the receive buffer (router.dicom.pdu) with hypothesis.

Properties:
- any bytes at all: ``decode_pdu`` and ``PDUReader`` return a valid PDU (or None)
  or raise ``PDUDecodeError``, never anything else, never hang or allocate from a
  length field;
- valid fixtures mutated (bytes flipped, truncated, extended, length fields set to
  huge values) behave the same, and whatever still decodes re-encodes and decodes
  to the same object;
- a header announcing 0xFFFFFFF0 bytes is refused at once when a cap is set;
- decode(encode(x)) == x for generated valid PDUs.

Bounded: a few hundred examples per test, the whole file runs in seconds.
"""

from __future__ import annotations

import struct
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.dicom.errors import PDUDecodeError
from router.dicom.pdu import (
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
    PresentationContextAC,
    PresentationContextResult,
    PresentationContextRQ,
    SCPSCURoleSelection,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UnknownItem,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
    UserInformationSubItem,
    decode_pdu,
    encode_pdu,
)
from tests.dicom.test_pdu import PDU_FIXTURES

FIXTURES = [data for _, data, _, _ in PDU_FIXTURES]
FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _decode_or_error(data: bytes) -> PDU | None:
    """Decode; only PDUDecodeError may escape. Re-encode whatever decodes."""
    try:
        pdu = decode_pdu(data)
    except PDUDecodeError:
        return None
    assert decode_pdu(encode_pdu(pdu)) == pdu
    return pdu


def _read_all(chunks: list[bytes], reader: PDUReader) -> None:
    """Feed chunk by chunk, drain after each; only PDUDecodeError may escape."""
    try:
        for chunk in chunks:
            reader.feed(chunk)
            while (pdu := reader.next_pdu()) is not None:
                assert decode_pdu(encode_pdu(pdu)) == pdu
    except PDUDecodeError:
        pass


# ---------------------------------------------------------------------------
# (a) random bytes
# ---------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_decode(data: bytes) -> None:
    _decode_or_error(data)


@FUZZ
@given(st.integers(1, 7), st.binary(max_size=600))
def test_random_body_with_valid_header(pdu_type: int, body: bytes) -> None:
    # A well-formed header gets the fuzz past the first checks into each body decoder.
    _decode_or_error(struct.pack(">BBI", pdu_type, 0, len(body)) + body)


@FUZZ
@given(
    st.lists(st.binary(min_size=1, max_size=80), max_size=12),
    st.sampled_from([0, 16, 64, 4096]),
)
def test_random_bytes_reader(chunks: list[bytes], cap: int) -> None:
    _read_all(chunks, PDUReader(max_pdu_length=cap, max_associate_pdu_length=4096))


# ---------------------------------------------------------------------------
# (b) mutated fixtures
# ---------------------------------------------------------------------------


@st.composite
def mutated_fixture(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(FIXTURES)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "extend", "length", "length16"]))
        if kind in ("flip", "set") and data:
            i = draw(st.integers(0, len(data) - 1))
            if kind == "flip":
                data[i] ^= 1 << draw(st.integers(0, 7))
            else:
                data[i] = draw(st.integers(0, 255))
        elif kind == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
        elif kind == "length" and len(data) >= 4:
            # A 32-bit length field anywhere (PDU length, PDV item length, ...).
            i = draw(st.integers(0, len(data) - 4))
            value = draw(st.sampled_from([0, 1, 2, 5, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF]))
            data[i : i + 4] = struct.pack(">I", value)
        elif kind == "length16" and len(data) >= 2:
            # A 16-bit item or UID length.
            i = draw(st.integers(0, len(data) - 2))
            value = draw(st.sampled_from([0, 1, 2, 3, 0x7FFF, 0xFFFF]))
            data[i : i + 2] = struct.pack(">H", value)
    return bytes(data)


@FUZZ
@given(mutated_fixture())
def test_mutated_fixture_decode(data: bytes) -> None:
    _decode_or_error(data)


@FUZZ
@given(mutated_fixture(), st.integers(1, 64), st.sampled_from([0, 100, 1 << 16]))
def test_mutated_fixture_reader(data: bytes, step: int, cap: int) -> None:
    stream = FIXTURES[0] + data + FIXTURES[-1]
    chunks = [stream[i : i + step] for i in range(0, len(stream), step)]
    _read_all(chunks, PDUReader(max_pdu_length=cap))


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(FIXTURES))
def test_every_fixture_prefix(data: bytes) -> None:
    # Truncation at every length: decode refuses, the reader waits.
    for end in range(len(data)):
        _decode_or_error(data[:end])
        reader = PDUReader()
        reader.feed(data[:end])
        assert reader.next_pdu() is None
        reader.feed(data[end:])
        assert reader.next_pdu() == decode_pdu(data)


# ---------------------------------------------------------------------------
# (c) no allocation driven by an unchecked length
# ---------------------------------------------------------------------------


def test_huge_length_with_cap_is_refused_at_once() -> None:
    for pdu_type in range(1, 8):
        reader = PDUReader(max_pdu_length=1 << 16)
        tracemalloc.start()
        try:
            reader.feed(struct.pack(">BBI", pdu_type, 0, 0xFFFFFFF0))
            try:
                reader.next_pdu()
            except PDUDecodeError as exc:
                assert exc.field.endswith(".pdu_length")
            else:
                raise AssertionError(f"PDU type {pdu_type}: header not refused")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024
        assert reader.buffered == 6


def test_huge_length_in_decode_pdu() -> None:
    # decode_pdu wants the whole PDU; a length it does not have is refused, not trusted.
    for pdu_type in range(1, 8):
        data = struct.pack(">BBI", pdu_type, 0, 0xFFFFFFF0) + bytes(100)
        try:
            decode_pdu(data)
        except PDUDecodeError as exc:
            assert exc.field.endswith(".pdu_length")
        else:
            raise AssertionError(f"PDU type {pdu_type}: accepted")


# ---------------------------------------------------------------------------
# (d) round trip of generated valid PDUs
# ---------------------------------------------------------------------------

uids = (
    st.lists(st.integers(0, 10**12).map(str), min_size=1, max_size=12)
    .map(".".join)
    .filter(lambda uid: len(uid) <= 64)
)
ae_titles = (
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"),
        min_size=1,
        max_size=16,
    )
    .map(lambda s: s.strip(" "))
    .filter(bool)
)
ac_ae_titles = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16
).map(lambda s: s.strip(" "))
context_ids = st.integers(0, 127).map(lambda n: 2 * n + 1)
small_bytes = st.binary(max_size=40)
u16 = st.integers(0, 0xFFFF)

sub_items: st.SearchStrategy[UserInformationSubItem] = st.one_of(
    st.builds(MaximumLength, maximum_length=st.integers(0, 0xFFFFFFFF)),
    st.builds(ImplementationClassUID, uid=uids),
    st.builds(
        ImplementationVersionName,
        name=st.text(
            alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E),
            min_size=1,
            max_size=16,
        ),
    ),
    st.builds(
        AsynchronousOperationsWindow, max_operations_invoked=u16, max_operations_performed=u16
    ),
    st.builds(
        SCPSCURoleSelection, sop_class_uid=uids, scu_role=st.booleans(), scp_role=st.booleans()
    ),
    st.builds(
        SOPClassExtendedNegotiation,
        sop_class_uid=uids,
        service_class_application_information=small_bytes,
    ),
    st.builds(
        SOPClassCommonExtendedNegotiation,
        sop_class_uid=uids,
        service_class_uid=uids,
        related_general_sop_class_uids=st.lists(uids, max_size=3).map(tuple),
    ),
    st.builds(
        UserIdentityRQ,
        identity_type=st.integers(0, 255),
        positive_response_requested=st.booleans(),
        primary_field=small_bytes,
        secondary_field=small_bytes,
    ),
    st.builds(UserIdentityAC, server_response=small_bytes),
    st.builds(
        UnknownItem,
        item_type=st.integers(0, 255).filter(lambda t: not 0x51 <= t <= 0x59),
        data=small_bytes,
    ),
)
user_information = st.builds(UserInformation, items=st.lists(sub_items, max_size=6).map(tuple))


def _unknown_items(interpreted: set[int]) -> st.SearchStrategy[tuple[UnknownItem, ...]]:
    return st.lists(
        st.builds(
            UnknownItem,
            item_type=st.integers(0, 255).filter(lambda t: t not in interpreted),
            data=small_bytes,
        ),
        max_size=2,
    ).map(tuple)


a_associate_rq = st.builds(
    AAssociateRQ,
    protocol_version=u16,
    called_ae_title=ae_titles,
    calling_ae_title=ae_titles,
    application_context_name=uids,
    presentation_contexts=st.lists(
        st.builds(
            PresentationContextRQ,
            context_id=context_ids,
            abstract_syntax=uids,
            transfer_syntaxes=st.lists(uids, min_size=1, max_size=4).map(tuple),
        ),
        max_size=4,
    ).map(tuple),
    user_information=user_information,
    unknown_items=_unknown_items({0x10, 0x20, 0x50}),
)


@st.composite
def presentation_context_ac(draw: st.DrawFn) -> PresentationContextAC:
    result = draw(st.sampled_from(PresentationContextResult))
    if result == PresentationContextResult.ACCEPTANCE:
        transfer_syntax: str | None = draw(uids)
    else:
        transfer_syntax = draw(st.none() | uids)
    return PresentationContextAC(
        context_id=draw(context_ids), result=result, transfer_syntax=transfer_syntax
    )


a_associate_ac = st.builds(
    AAssociateAC,
    protocol_version=u16,
    called_ae_title=ac_ae_titles,
    calling_ae_title=ac_ae_titles,
    application_context_name=uids,
    presentation_contexts=st.lists(presentation_context_ac(), max_size=4).map(tuple),
    user_information=user_information,
    unknown_items=_unknown_items({0x10, 0x21, 0x50}),
)


@st.composite
def a_associate_rj(draw: st.DrawFn) -> AAssociateRJ:
    source = draw(st.sampled_from([1, 2, 3]))
    reason = draw(st.sampled_from({1: range(1, 11), 2: range(1, 3), 3: range(0, 8)}[source]))
    return AAssociateRJ(result=draw(st.sampled_from([1, 2])), source=source, reason=reason)


@st.composite
def a_abort(draw: st.DrawFn) -> AAbort:
    source = draw(st.sampled_from([0, 1, 2]))
    reason = draw(st.integers(0, 6) if source == 2 else st.integers(0, 255))
    return AAbort(source=source, reason=reason)


p_data_tf = st.builds(
    PDataTF,
    pdvs=st.lists(
        st.builds(
            PDV,
            context_id=context_ids,
            is_command=st.booleans(),
            is_last=st.booleans(),
            data=st.binary(max_size=64) | st.binary(max_size=64).map(memoryview),
        ),
        min_size=1,
        max_size=5,
    ).map(tuple),
)

pdus: st.SearchStrategy[PDU] = st.one_of(
    a_associate_rq,
    a_associate_ac,
    a_associate_rj(),
    p_data_tf,
    st.just(AReleaseRQ()),
    st.just(AReleaseRP()),
    a_abort(),
)


@FUZZ
@given(pdus)
def test_round_trip(pdu: PDU) -> None:
    encoded = encode_pdu(pdu)
    assert decode_pdu(encoded) == pdu
    assert encode_pdu(decode_pdu(encoded)) == encoded


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(pdus, min_size=1, max_size=5), st.integers(1, 97))
def test_round_trip_through_reader(sequence: list[PDU], step: int) -> None:
    stream = b"".join(encode_pdu(pdu) for pdu in sequence)
    reader = PDUReader()
    got: list[PDU] = []
    for i in range(0, len(stream), step):
        reader.feed(stream[i : i + step])
        while (pdu := reader.next_pdu()) is not None:
            got.append(pdu)
    assert got == sequence
    assert reader.buffered == 0
