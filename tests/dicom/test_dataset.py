"""Tests for router.dicom.dataset: datasets on the wire and Part 10 files (PS3.5, PS3.10).

Test data are the real-world files pydicom ships, listed straight from its
folder (never pydicom's get_testdata_files(), which tries to download).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import warnings
import zlib
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from router.dicom.dataset import (
    DataSetFraming,
    InstanceIdentity,
    Part10,
    decode_dataset,
    encode_dataset,
    part10_from_meta,
    part10_meta_bytes,
    read_part10_header,
    read_top_level,
    top_level_spans,
    transcode,
    with_defined_length_un,
)
from router.dicom.errors import DIMSEError, LocalProtocolError
from router.dicom.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    IMPLICIT_VR_LITTLE_ENDIAN,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    is_encapsulated,
)
from tests.helpers import missing, pydicom_test_files

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
ALL_FILES = sorted(TEST_FILES.glob("*.dcm"))
TRUNCATED = {"MR_truncated.dcm", "rtplan_truncated.dcm"}
# Files that cannot be read in the transfer syntax their meta names: SC_rgb_jpeg.dcm is
# implicit VR under JPEG Baseline (explicit VR); pydicom guesses, dcmdump fails on it.
NOT_IN_THEIR_SYNTAX = {"SC_rgb_jpeg.dcm"}
# Files whose dataset has no SOP Class/Instance UID (nor does their file meta).
NO_SOP_UIDS = {
    "empty_charset_LEI.dcm",
    "meta_missing_tsyntax.dcm",
    "nested_priv_SQ.dcm",
    "no_meta.dcm",
}
DCMDUMP = shutil.which("dcmdump")

# pydicom's own complaints about the odd values in its test files.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR"),
    pytest.mark.filterwarnings("ignore:Expected explicit VR, but found implicit VR"),
    pytest.mark.filterwarnings("ignore:The value for the data element"),
]


def _read(path: Path, *, group_lengths: bool = False) -> Dataset:
    """pydicom's own reading, the reference; its warnings about odd values muted.

    Retired group length elements (gggg,0000) are dropped: PS3.5 §7.2 retires
    them and pydicom does not write them.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
    if not group_lengths:
        for tag in [t for t in list(ds.keys()) if t.element == 0 and t.group > 6]:
            del ds[tag]
    return ds


def _reference_transfer_syntax(ds: Dataset) -> str:
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts:
        return str(ts)
    implicit, little = ds.original_encoding
    if implicit:
        return IMPLICIT_VR_LITTLE_ENDIAN
    return EXPLICIT_VR_LITTLE_ENDIAN if little else EXPLICIT_VR_BIG_ENDIAN


def _quiet_equal(a: Dataset, b: Dataset) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(a == b)


def test_there_are_test_files() -> None:
    assert len(ALL_FILES) > 60


# ---------------------------------------------------------------------------
# read_part10_header against pydicom.dcmread, every test file
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_read_part10_header_matches_pydicom(path: Path) -> None:
    reference = _read(path)
    if path.name in NO_SOP_UIDS:
        assert "SOPClassUID" not in reference
        assert not reference.file_meta.get("MediaStorageSOPClassUID")
        with pytest.raises(DIMSEError) as info:
            read_part10_header(path)
        assert info.value.status == 0xA900
        return
    header = read_part10_header(path)
    assert header.transfer_syntax == _reference_transfer_syntax(reference)
    assert header.sop_class_uid == reference.get(
        "SOPClassUID", reference.file_meta.get("MediaStorageSOPClassUID")
    )
    assert header.sop_instance_uid == reference.get(
        "SOPInstanceUID", reference.file_meta.get("MediaStorageSOPInstanceUID")
    )
    if reference.file_meta:
        assert header.meta is not None
        assert _quiet_equal(header.meta, reference.file_meta)
    else:
        assert header.meta is None
        assert header.dataset_offset == 0
    # Same answer from the bytes as from the path.
    assert read_part10_header(path.read_bytes()) == header


@pytest.mark.parametrize(
    "path", [p for p in ALL_FILES if p.name not in NO_SOP_UIDS], ids=lambda p: p.name
)
def test_dataset_bytes_after_offset_are_pydicoms_dataset(path: Path) -> None:
    header = read_part10_header(path)
    raw = path.read_bytes()[header.dataset_offset :]
    if path.name in TRUNCATED:
        # pydicom warns and hands back part of the dataset; we refuse it.
        with pytest.raises(DIMSEError) as info:
            decode_dataset(raw, header.transfer_syntax)
        assert info.value.status == 0xC000
        assert "overruns" in str(info.value)
        return
    ds = decode_dataset(raw, header.transfer_syntax)
    assert _quiet_equal(ds, _read(path, group_lengths=True))


def test_dataset_offset_is_where_pydicom_starts_the_dataset() -> None:
    # CT_small: 128 + 4 + group 0002 (with its 12-byte group length element).
    path = TEST_FILES / "CT_small.dcm"
    header = read_part10_header(path)
    meta = _read(path).file_meta
    assert header.dataset_offset == 132 + 12 + meta.FileMetaInformationGroupLength
    assert path.read_bytes()[header.dataset_offset : header.dataset_offset + 2] == b"\x08\x00"


@pytest.mark.parametrize(
    ("name", "transfer_syntax"),
    [
        ("ExplVR_LitEndNoMeta.dcm", EXPLICIT_VR_LITTLE_ENDIAN),
        ("ExplVR_BigEndNoMeta.dcm", EXPLICIT_VR_BIG_ENDIAN),
        ("rtstruct.dcm", IMPLICIT_VR_LITTLE_ENDIAN),
    ],
)
def test_files_without_meta(name: str, transfer_syntax: str) -> None:
    header = read_part10_header(TEST_FILES / name)
    assert header.transfer_syntax == transfer_syntax
    assert header.dataset_offset == 0
    assert header.meta is None


@pytest.mark.parametrize(
    "name", ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm"]
)
def test_meta_stripped_from_real_files(name: str) -> None:
    # A bare dataset (as received over the network) is recognised from its
    # first element: implicit/explicit VR, little/big endian. Deflated data
    # cannot be recognised so, and is read as implicit VR LE -- and then has
    # no UIDs to find.
    path = TEST_FILES / name
    header = read_part10_header(path)
    bare = path.read_bytes()[header.dataset_offset :]
    if header.transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        bare = zlib.decompress(bare, -zlib.MAX_WBITS)
        expected_ts = EXPLICIT_VR_LITTLE_ENDIAN
    else:
        expected_ts = header.transfer_syntax
    guessed = read_part10_header(bare)
    assert guessed.transfer_syntax == expected_ts
    assert (guessed.sop_class_uid, guessed.sop_instance_uid) == (
        header.sop_class_uid,
        header.sop_instance_uid,
    )
    assert guessed.dataset_offset == 0 and guessed.meta is None


def test_meta_without_preamble() -> None:
    path = TEST_FILES / "CT_small.dcm"
    data = path.read_bytes()
    header = read_part10_header(data[132:])  # group 0002 at offset 0, no preamble
    assert header.dataset_offset == read_part10_header(data).dataset_offset - 132
    assert header.transfer_syntax == EXPLICIT_VR_LITTLE_ENDIAN


def test_uids_come_from_the_dataset_when_meta_disagrees() -> None:
    # The dataset is authoritative (PS3.4 B.4.1.3: the C-STORE's Affected SOP
    # Instance UID is the dataset's SOP Instance UID).
    ds = _read(TEST_FILES / "CT_small.dcm")
    raw = encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
    meta = part10_meta_bytes(
        sop_class_uid="1.2.3",
        sop_instance_uid="4.5.6",
        transfer_syntax=EXPLICIT_VR_LITTLE_ENDIAN,
    )
    header = read_part10_header(meta + raw)
    assert (header.sop_class_uid, header.sop_instance_uid) == (ds.SOPClassUID, ds.SOPInstanceUID)


def test_uids_deep_in_a_large_group_0008() -> None:
    # (0008,0016) beyond the first 64 KiB read: the reader fetches more.
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.add_new(0x00080012, "DA", "20240101")
    ds.add_new(0x00080014, "UI", "1.2.3")
    ds.add_new(0x00080015, "DT", "20240101")
    ds.add_new(0x00080013, "TM", "1" * 2)
    ds.add_new(0x00080008, "CS", ["X" * 16] * 6000)  # ~100 KB before the UIDs
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    raw = encode_dataset(ds, IMPLICIT_VR_LITTLE_ENDIAN)  # no 64 KiB limit on CS
    assert len(raw) > 64 * 1024
    header = read_part10_header(raw)
    assert header.sop_instance_uid == ds.SOPInstanceUID


@pytest.mark.parametrize(
    "data",
    [
        b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f" + b"1.2",  # meta overruns
        b"\x00" * 128 + b"DICM" + b"\x02\x00\x01\x00OB\x00\x00\xff\xff\xff\xff",  # undefined
        b"\x00" * 128 + b"DICM" + b"\x02\x00\x01\x00OB\x00\x00",  # truncated header
        b"\x08\x00\x16\x00UI\x04\x00" + b"1.2\x00" + b"\x08\x00\x18\x00UI\x90\x00" + b"1",
    ],
)
def test_malformed_files(data: bytes) -> None:
    with pytest.raises(DIMSEError):
        read_part10_header(data)


def test_part10_is_frozen() -> None:
    header = read_part10_header(TEST_FILES / "CT_small.dcm")
    assert isinstance(header, Part10)
    with pytest.raises(AttributeError):
        header.dataset_offset = 0  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Deflate, big endian, round trips
# ---------------------------------------------------------------------------


def test_deflated_file() -> None:
    path = TEST_FILES / "image_dfl.dcm"
    header = read_part10_header(path)
    assert header.transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
    deflated = path.read_bytes()[header.dataset_offset :]
    ds = decode_dataset(deflated, header.transfer_syntax)
    assert _quiet_equal(ds, _read(path))
    # Our deflate is raw deflate (PS3.5 A.5): inflating it gives the explicit VR LE encoding.
    ours = encode_dataset(ds, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN)
    assert zlib.decompress(ours, -zlib.MAX_WBITS) == encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
    assert _quiet_equal(decode_dataset(ours, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN), ds)


def test_inflate_limit() -> None:
    ds = _read(TEST_FILES / "CT_small.dcm")
    deflated = encode_dataset(ds, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN)
    size = len(zlib.decompress(deflated, -zlib.MAX_WBITS))
    decode_dataset(deflated, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, max_inflated_size=size)
    with pytest.raises(DIMSEError, match="more than"):
        decode_dataset(deflated, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, max_inflated_size=size - 1)


@pytest.mark.parametrize(
    "data", [b"not deflate at all \xff\xff", zlib.compress(b"zlib header")[:-3]]
)
def test_bad_deflate(data: bytes) -> None:
    with pytest.raises(DIMSEError) as info:
        decode_dataset(data, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN)
    assert info.value.status == 0xC000


@pytest.mark.parametrize(
    ("big", "little"),
    [
        ("MR_small_bigendian.dcm", "MR_small.dcm"),
        ("MR_small_expb.dcm", "MR_small.dcm"),
        ("liver_expb_1frame.dcm", "liver_1frame.dcm"),
        ("SC_rgb_small_odd_big_endian.dcm", "SC_rgb_small_odd.dcm"),
    ],
)
def test_big_endian_to_little_endian_swaps_words(big: str, little: str) -> None:
    # PS3.5 §7.3: OW values are byte-swapped with the rest; pydicom alone
    # would copy them unchanged.
    be = decode_dataset(
        (TEST_FILES / big).read_bytes()[read_part10_header(TEST_FILES / big).dataset_offset :],
        EXPLICIT_VR_BIG_ENDIAN,
    )
    le = _read(TEST_FILES / little)
    for ts in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
        converted = decode_dataset(encode_dataset(be, ts), ts)
        assert converted.PixelData == le.PixelData
        assert converted.Rows == le.Rows and converted.Columns == le.Columns
    back = decode_dataset(encode_dataset(le, EXPLICIT_VR_BIG_ENDIAN), EXPLICIT_VR_BIG_ENDIAN)
    assert back.PixelData == be.PixelData


def test_32_bit_ow_pixel_data_is_swapped_in_16_bit_words_as_dcmtk_does(
        tmp_path: Path) -> None:
    """RT Dose, Bits Allocated 32, OW: DCMTK's dcmconv +tb writes it big endian with
    each 16-bit word swapped (PS3.5 Table 6.2-1: OW is a stream of 16-bit words).
    The router swapped the 32-bit values whole, and every dose value it converted
    either way came out wrong for DCMTK and PixelMed (1,249,000 read as 250,085,395)."""
    dcmconv = shutil.which("dcmconv")
    if dcmconv is None:
        missing("DCMTK's dcmconv")  # skips, or fails under CI
    big = tmp_path / "rtdose_be.dcm"
    subprocess.run([dcmconv, "+tb", str(TEST_FILES / "rtdose.dcm"), str(big)], check=True)
    le = _read(TEST_FILES / "rtdose.dcm")
    assert le.BitsAllocated == 32 and le["PixelData"].VR == "OW"
    be = decode_dataset(big.read_bytes()[read_part10_header(big).dataset_offset :],
                        EXPLICIT_VR_BIG_ENDIAN)
    for ts in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
        assert decode_dataset(encode_dataset(be, ts), ts).PixelData == le.PixelData
    back = decode_dataset(encode_dataset(le, EXPLICIT_VR_BIG_ENDIAN), EXPLICIT_VR_BIG_ENDIAN)
    assert back.PixelData == be.PixelData


def _native_files() -> list[Path]:
    with warnings.catch_warnings():  # runs at collection, outside the marks
        warnings.simplefilter("ignore")
        return [
            p
            for p in ALL_FILES
            if p.name not in TRUNCATED | NO_SOP_UIDS
            and not is_encapsulated(read_part10_header(p).transfer_syntax)
        ]


NATIVE_FILES = _native_files()


def _family(transfer_syntax: str) -> tuple[bool, bool]:
    # (implicit VR?, little endian?): what a decoded dataset's elements carry.
    if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN:
        return True, True
    return False, transfer_syntax != EXPLICIT_VR_BIG_ENDIAN


@pytest.mark.parametrize("path", NATIVE_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("transfer_syntax", UNCOMPRESSED_TRANSFER_SYNTAXES)
def test_round_trip_uncompressed(path: Path, transfer_syntax: str) -> None:
    original = _read(path)
    decoded = decode_dataset(encode_dataset(original, transfer_syntax), transfer_syntax)
    if _family(transfer_syntax) == _family(_reference_transfer_syntax(original)):
        assert _quiet_equal(decoded, original)
    # Across encodings, implicit VR loses the VRs (e.g. of private elements)
    # and big endian swaps words; the content is still the same, which the
    # implicit VR LE encoding of both shows byte for byte.
    assert encode_dataset(decoded, IMPLICIT_VR_LITTLE_ENDIAN) == encode_dataset(
        original, IMPLICIT_VR_LITTLE_ENDIAN
    )


@pytest.mark.parametrize(
    "path",
    [p for p in ALL_FILES if p not in NATIVE_FILES and p.name not in TRUNCATED | NO_SOP_UIDS],
    ids=lambda p: p.name,
)
def test_encapsulated_pixel_data_passes_through(path: Path) -> None:
    header = read_part10_header(path)
    original = _read(path)
    encoded = encode_dataset(original, header.transfer_syntax)
    decoded = decode_dataset(encoded, header.transfer_syntax)
    if "PixelData" in original:
        assert decoded["PixelData"].is_undefined_length
        assert decoded.PixelData == original.PixelData  # fragments byte for byte
    if _family(header.transfer_syntax) == original.original_encoding:
        assert _quiet_equal(decoded, original)
    else:  # pydicom's SC_rgb_jpeg.dcm: written in implicit VR whatever its meta says
        assert encode_dataset(decoded, IMPLICIT_VR_LITTLE_ENDIAN) == encode_dataset(
            original, IMPLICIT_VR_LITTLE_ENDIAN
        )


def test_encapsulated_pixel_data_built_in_memory() -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3"
    ds.add_new(0x7FE00010, "OB", encapsulate([b"\xff\xd8frame\xff\xd9"]))  # not flagged
    jpeg = "1.2.840.10008.1.2.4.50"
    decoded = decode_dataset(encode_dataset(ds, jpeg), jpeg)
    assert decoded["PixelData"].is_undefined_length
    assert decoded.PixelData == ds.PixelData
    assert not ds["PixelData"].is_undefined_length  # the caller's dataset is untouched


def test_file_meta_elements_are_not_sent() -> None:
    ds = Dataset()
    ds.add_new(0x00020010, "UI", EXPLICIT_VR_LITTLE_ENDIAN)
    ds.PatientName = "Doe^John"
    decoded = decode_dataset(
        encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), EXPLICIT_VR_LITTLE_ENDIAN
    )
    assert 0x00020010 not in decoded
    assert decoded.PatientName == "Doe^John"
    assert 0x00020010 in ds


def test_unknown_transfer_syntax_is_explicit_little_endian() -> None:
    ds = _read(TEST_FILES / "CT_small.dcm")
    private_ts = "1.2.826.0.1.3680043.10.1442.99"
    assert encode_dataset(ds, private_ts) == encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
    assert _quiet_equal(decode_dataset(encode_dataset(ds, private_ts), private_ts), ds)


def test_stop_before_pixels() -> None:
    path = TEST_FILES / "CT_small.dcm"
    header = read_part10_header(path)
    raw = path.read_bytes()[header.dataset_offset :]
    # Cut inside the pixel data: the header still decodes.
    cut = raw[: raw.index(b"\xe0\x7f\x10\x00") + 100]
    ds = decode_dataset(cut, header.transfer_syntax, stop_before_pixels=True)
    assert "PixelData" not in ds
    assert ds.PatientName == _read(path).PatientName
    with pytest.raises(DIMSEError):
        decode_dataset(cut, header.transfer_syntax)


def test_empty_dataset() -> None:
    ds = decode_dataset(b"", IMPLICIT_VR_LITTLE_ENDIAN)
    assert len(ds) == 0
    assert encode_dataset(Dataset(), EXPLICIT_VR_LITTLE_ENDIAN) == b""


@pytest.mark.parametrize(
    ("data", "transfer_syntax"),
    [
        (b"\x08\x00", EXPLICIT_VR_LITTLE_ENDIAN),  # too short for a header
        (b"\x08\x00\x16\x00UI\x10\x00" + b"1.2", EXPLICIT_VR_LITTLE_ENDIAN),  # value overruns
        (b"\x08\x00\x16\x00\xff\xff\xff\x7f", IMPLICIT_VR_LITTLE_ENDIAN),  # huge length
        # Undefined-length sequence never closed:
        (b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff", EXPLICIT_VR_LITTLE_ENDIAN),
        # Undefined-length item never closed:
        (
            b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff",
            EXPLICIT_VR_LITTLE_ENDIAN,
        ),
        # Something other than an item inside a sequence:
        (
            b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\x10\x00\x10\x00PN\x00\x00",
            EXPLICIT_VR_LITTLE_ENDIAN,
        ),
        # Item delimiter at the top level:
        (b"\xfe\xff\x0d\xe0\x00\x00\x00\x00", IMPLICIT_VR_LITTLE_ENDIAN),
        # Defined-length item longer than its sequence:
        (
            b"\x08\x00\x15\x11SQ\x00\x00\x08\x00\x00\x00\xfe\xff\x00\xe0\x10\x00\x00\x00",
            EXPLICIT_VR_LITTLE_ENDIAN,
        ),
        (b"\x00\x08\x00\x16UI\x00\x10" + b"1.2", EXPLICIT_VR_BIG_ENDIAN),
    ],
)
def test_malformed_datasets(data: bytes, transfer_syntax: str) -> None:
    with pytest.raises(DIMSEError) as info:
        decode_dataset(data, transfer_syntax)
    assert info.value.status == 0xC000


def test_deep_nesting_is_refused() -> None:
    open_sq = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    data = open_sq * 200 + close * 200
    with pytest.raises(DIMSEError, match="nested"):
        decode_dataset(data, EXPLICIT_VR_LITTLE_ENDIAN)


# ---------------------------------------------------------------------------
# Part 10: file meta + received bytes = a file pydicom and DCMTK read
# ---------------------------------------------------------------------------

PART10_CASES = [
    "CT_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle.dcm",
    "rtplan.dcm",
]


@pytest.mark.parametrize("name", PART10_CASES)
def test_meta_plus_received_bytes_is_a_file(name: str, tmp_path: Path) -> None:
    path = TEST_FILES / name
    header = read_part10_header(path)
    received = path.read_bytes()[header.dataset_offset :]  # as the network would deliver
    meta = part10_meta_bytes(
        sop_class_uid=header.sop_class_uid,
        sop_instance_uid=header.sop_instance_uid,
        transfer_syntax=header.transfer_syntax,
        source_ae_title="MODALITY",
    )
    out = tmp_path / "out.dcm"
    out.write_bytes(meta + received)
    reread = pydicom.dcmread(out)
    assert _quiet_equal(reread, _read(path))
    fm = reread.file_meta
    assert fm.FileMetaInformationVersion == b"\x00\x01"
    assert fm.MediaStorageSOPClassUID == header.sop_class_uid
    assert fm.MediaStorageSOPInstanceUID == header.sop_instance_uid
    assert fm.TransferSyntaxUID == header.transfer_syntax
    assert fm.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert fm.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert fm.SourceApplicationEntityTitle == "MODALITY"
    # (0002,0000) counts exactly the bytes of the rest of group 0002.
    assert fm.FileMetaInformationGroupLength == len(meta) - 132 - 12
    again = read_part10_header(out)
    assert again.dataset_offset == len(meta)
    assert again.transfer_syntax == header.transfer_syntax
    if DCMDUMP:
        result = subprocess.run(
            [DCMDUMP, "-M", "+L", str(out)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
        assert "E:" not in result.stderr, result.stderr
        assert header.sop_instance_uid in result.stdout
        assert "MODALITY" in result.stdout


def test_dcmdump_is_available_for_the_file_test() -> None:
    if not DCMDUMP:
        pytest.skip("DCMTK dcmdump is not installed")
    assert Path(DCMDUMP).exists()


def test_meta_bytes_layout() -> None:
    meta = part10_meta_bytes(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",  # 25 chars: NUL padded
        sop_instance_uid="1.2.3.4",
        transfer_syntax=EXPLICIT_VR_LITTLE_ENDIAN,  # 19 chars: NUL padded
        implementation_version_name="ODD",  # space padded
    )
    assert meta[:128] == b"\x00" * 128 and meta[128:132] == b"DICM"
    assert meta[132:144] == b"\x02\x00\x00\x00UL\x04\x00" + (len(meta) - 144).to_bytes(4, "little")
    assert b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01" in meta
    assert b"\x02\x00\x02\x00UI\x1a\x001.2.840.10008.5.1.4.1.1.2\x00" in meta
    assert b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\x00" in meta
    assert b"\x02\x00\x13\x00SH\x04\x00ODD " in meta
    assert b"\x02\x00\x16\x00" not in meta  # no source AE title unless given
    assert len(meta) % 2 == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sop_class_uid": "1.2.x"},
        {"sop_instance_uid": ""},
        {"transfer_syntax": "1" * 65},
        {"implementation_class_uid": "abc"},
        {"source_ae_title": "A" * 17},
        {"source_ae_title": "   "},
        {"implementation_version_name": "V\\1"},
    ],
)
def test_meta_bytes_validation(kwargs: dict[str, str]) -> None:
    args = {
        "sop_class_uid": "1.2.3",
        "sop_instance_uid": "1.2.3.4",
        "transfer_syntax": EXPLICIT_VR_LITTLE_ENDIAN,
        **kwargs,
    }
    with pytest.raises(LocalProtocolError):
        part10_meta_bytes(**args)


# ---------------------------------------------------------------------------
# Damaged files: DIMSEError and nothing else
# ---------------------------------------------------------------------------

FUZZ_SOURCES = [
    (TEST_FILES / name).read_bytes()
    for name in (
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "rtplan.dcm",
        "image_dfl.dcm",
        "JPEG2000.dcm",
        "UN_sequence.dcm",
        "ExplVR_LitEndNoMeta.dcm",
    )
]


@st.composite
def _damaged(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(FUZZ_SOURCES)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "cut", "length"]))
        if op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:]
        elif at + 4 <= len(data):
            value = draw(st.sampled_from([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            struct.pack_into("<I", data, at, value)
        if not data:
            break
    return bytes(data)


@settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(_damaged(), st.booleans())
@pytest.mark.filterwarnings("ignore")
def test_damaged_files_raise_only_dimse_errors(data: bytes, stop_before_pixels: bool) -> None:
    try:
        header = read_part10_header(data)
        decode_dataset(
            data[header.dataset_offset :],
            header.transfer_syntax,
            stop_before_pixels=stop_before_pixels,
        )
    except DIMSEError:
        pass


# ---------------------------------------------------------------------------
# router.dicom.uids: the transfer syntax properties the codec relies on
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transfer_syntax", "encapsulated", "implicit", "little", "deflated"),
    [
        (IMPLICIT_VR_LITTLE_ENDIAN, False, True, True, False),
        (EXPLICIT_VR_LITTLE_ENDIAN, False, False, True, False),
        (DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, False, False, True, True),
        (EXPLICIT_VR_BIG_ENDIAN, False, False, False, False),
        ("1.2.840.10008.1.20", False, True, True, False),  # Papyrus 3 implicit (retired)
        ("1.2.840.10008.1.2.1.98", True, False, True, False),  # encapsulated uncompressed
        ("1.2.840.10008.1.2.4.50", True, False, True, False),  # JPEG baseline
        ("1.2.840.10008.1.2.4.80", True, False, True, False),  # JPEG-LS
        ("1.2.840.10008.1.2.4.90", True, False, True, False),  # JPEG 2000
        ("1.2.840.10008.1.2.4.201", True, False, True, False),  # HTJ2K
        ("1.2.840.10008.1.2.4.95", True, False, True, True),  # JPIP referenced deflate
        ("1.2.840.10008.1.2.5", True, False, True, False),  # RLE
        ("1.2.840.10008.1.2.4.102", True, False, True, False),  # MPEG-4
        ("1.2.840.10008.1.2.8.1", True, False, True, False),  # deflated image frames
        ("1.2.3.4.5.6", True, False, True, False),  # unknown/private
    ],
)
def test_transfer_syntax_properties(
    transfer_syntax: str, encapsulated: bool, implicit: bool, little: bool, deflated: bool
) -> None:
    from router.dicom import uids

    assert uids.is_encapsulated(transfer_syntax) is encapsulated
    assert uids.is_uncompressed(transfer_syntax) is not encapsulated
    assert uids.is_implicit_vr(transfer_syntax) is implicit
    assert uids.is_little_endian(transfer_syntax) is little
    assert uids.is_deflated(transfer_syntax) is deflated


def test_every_compressed_syntax_pydicom_knows_is_encapsulated() -> None:
    from pydicom._uid_dict import UID_dictionary

    from router.dicom import uids

    for uid, entry in UID_dictionary.items():
        if entry[1] == "Transfer Syntax" and pydicom.uid.UID(uid).is_compressed:
            papyrus = uid == uids.PAPYRUS_3_IMPLICIT_VR_LITTLE_ENDIAN  # pydicom mislabels it
            assert uids.is_encapsulated(uid) is not papyrus, uid


def test_well_known_uids_match_pydicom() -> None:
    from router.dicom import uids

    assert pydicom.uid.UID(uids.VERIFICATION_SOP_CLASS).keyword == "Verification"
    for ours, keyword in [
        (uids.PATIENT_ROOT_QR_FIND, "PatientRootQueryRetrieveInformationModelFind"),
        (uids.PATIENT_ROOT_QR_MOVE, "PatientRootQueryRetrieveInformationModelMove"),
        (uids.PATIENT_ROOT_QR_GET, "PatientRootQueryRetrieveInformationModelGet"),
        (uids.STUDY_ROOT_QR_FIND, "StudyRootQueryRetrieveInformationModelFind"),
        (uids.STUDY_ROOT_QR_MOVE, "StudyRootQueryRetrieveInformationModelMove"),
        (uids.STUDY_ROOT_QR_GET, "StudyRootQueryRetrieveInformationModelGet"),
        (uids.MODALITY_WORKLIST_INFORMATION_FIND, "ModalityWorklistInformationModelFind"),
        (uids.MODALITY_PERFORMED_PROCEDURE_STEP, "ModalityPerformedProcedureStep"),
        (uids.STORAGE_COMMITMENT_PUSH_MODEL, "StorageCommitmentPushModel"),
        (uids.STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE, "StorageCommitmentPushModelInstance"),
        (uids.IMPLICIT_VR_LITTLE_ENDIAN, "ImplicitVRLittleEndian"),
        (uids.EXPLICIT_VR_LITTLE_ENDIAN, "ExplicitVRLittleEndian"),
        (uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, "DeflatedExplicitVRLittleEndian"),
        (uids.EXPLICIT_VR_BIG_ENDIAN, "ExplicitVRBigEndian"),
    ]:
        assert pydicom.uid.UID(ours).keyword == keyword
    assert uids.is_valid_uid(uids.IMPLEMENTATION_CLASS_UID)
    assert 1 <= len(uids.IMPLEMENTATION_VERSION_NAME) <= 16


def test_storage_sop_classes() -> None:
    from router.dicom import uids

    classes = uids.storage_sop_classes()
    assert len(classes) == len(set(classes)) > 150
    names = {pydicom.uid.UID(uid).keyword for uid in classes}
    assert {
        "CTImageStorage",
        "MRImageStorage",
        "SecondaryCaptureImageStorage",
        "DigitalXRayImageStorageForPresentation",  # "... Storage - For Presentation"
        "DigitalMammographyXRayImageStorageForProcessing",
        "UltrasoundImageStorageRetired",  # retired, still sent by old modalities
        "EnhancedSRStorage",
        "EncapsulatedPDFStorage",
    } <= names
    assert uids.STORAGE_COMMITMENT_PUSH_MODEL not in classes
    assert "1.2.840.10008.1.3.10" not in classes  # Media Storage Directory (DICOMDIR)
    assert uids.VERIFICATION_SOP_CLASS not in classes
    every_file = {read_part10_header(p).sop_class_uid for p in NATIVE_FILES}
    assert every_file <= set(classes)


@pytest.mark.parametrize("path", pydicom_test_files(), ids=lambda p: p.name)
def test_part10_from_meta_agrees_with_the_full_reader(path: Path) -> None:
    """The spool's fast path: the meta alone gives the offset and, when the meta and
    the data set agree, the same identity as read_part10_header."""
    head = path.read_bytes()[:4096]
    fast = part10_from_meta(head)
    try:
        full = read_part10_header(path)
    except DIMSEError:
        return
    if fast is None:
        return  # no meta, or one without the three UIDs: the full reader is used
    assert fast.dataset_offset == full.dataset_offset
    assert fast.transfer_syntax == full.transfer_syntax
    assert full.meta is not None
    assert fast.sop_instance_uid == str(full.meta.MediaStorageSOPInstanceUID).rstrip("\0 ")


def test_part10_from_meta_declines_what_it_cannot_read() -> None:
    assert part10_from_meta(b"") is None
    assert part10_from_meta(b"\0" * 128 + b"DICM") is None  # the head ends in the meta
    assert part10_from_meta(b"\0" * 132) is None  # no DICM


# ---------------------------------------------------------------------------
# InstanceIdentity: the data set is the instance the C-STORE-RQ names (PS3.4 B.2.3)
# ---------------------------------------------------------------------------


def _identity(raw: bytes, transfer_syntax: str, sop_class: str, sop_instance: str,
              size: int) -> InstanceIdentity:
    check = InstanceIdentity(transfer_syntax, sop_class, sop_instance)
    chunks = [raw[i : i + size] for i in range(0, len(raw), size)] or [b""]
    for i, chunk in enumerate(chunks):
        check.feed(memoryview(chunk), last=i == len(chunks) - 1)
    assert check.status is not None
    return check


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_every_real_file_is_its_own_instance(path: Path) -> None:
    """Each of pydicom's files, in fragments of 16 bytes, 1,000 bytes and whole, passes
    with the UIDs storescu would send for it; those without UIDs are C000H."""
    if path.name in NO_SOP_UIDS:
        raw = path.read_bytes()
        header = None
    else:
        header = read_part10_header(path)
        raw = path.read_bytes()[header.dataset_offset :]
    for size in (16, 1000, max(len(raw), 1)):
        if header is None:
            if path.name == "no_meta.dcm":
                continue  # not a data set in a transfer syntax we could name
            check = _identity(raw[132:], EXPLICIT_VR_LITTLE_ENDIAN, "1.2.3", "1.2.3.4", size)
            assert check.status in (0, 0xC000), path.name
            continue
        check = _identity(raw, header.transfer_syntax, header.sop_class_uid,
                          header.sop_instance_uid, size)
        reference = _read(path)
        if "SOPClassUID" not in reference or "SOPInstanceUID" not in reference:
            # UN_sequence.dcm: the UIDs are in the file meta only. DCMTK's storescu
            # would not send it; a sender that takes them from the meta gets C000H.
            assert check.status == 0xC000, path.name
            continue
        # A truncated file is C000H wherever it was cut (DataSetFraming), and so is one
        # not in its transfer syntax.
        expected = 0xC000 if path.name in TRUNCATED | NOT_IN_THEIR_SYNTAX else 0
        assert check.status == expected, (path.name, size, check.reason)


def _framing(raw: bytes, transfer_syntax: str, size: int) -> str | None:
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    framing = DataSetFraming(implicit=implicit, little=transfer_syntax != EXPLICIT_VR_BIG_ENDIAN)
    chunks = [raw[i : i + size] for i in range(0, len(raw), size)] or [b""]
    for i, chunk in enumerate(chunks):
        framing.feed(memoryview(chunk), last=i == len(chunks) - 1)
    return framing.error


def _nested(transfer_syntax: str) -> bytes:
    """A data set with undefined-length sequences two deep, an undefined-length item,
    a defined-length one, and encapsulated pixel data at the end."""
    inner = Dataset()
    inner.CodeValue = "T-D4000"
    inner.CodeMeaning = "Abdomen"
    outer = Dataset()
    outer.ScheduledProcedureStepID = "SPS1"
    outer.ScheduledProtocolCodeSequence = [inner]
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientName = "NESTED^TEST"
    ds.ScheduledProcedureStepSequence = [outer, inner]
    ds["ScheduledProcedureStepSequence"].is_undefined_length = True
    outer["ScheduledProtocolCodeSequence"].is_undefined_length = True
    outer.is_undefined_length_sequence_item = True  # the other items have a length
    raw = encode_dataset(ds, transfer_syntax)
    # Encapsulated pixel data (PS3.5 A.4), written by hand: pydicom will not put it
    # in a native syntax, and the walk must not care.
    order = ">" if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN else "<"
    pixels = (struct.pack(order + "HHI", 0x7FE0, 0x0010, 0xFFFFFFFF)
              if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN else
              struct.pack(order + "HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
    for item in (b"", b"\xff\xd8frame one\xff\xd9", b"\xff\xd8two\xff\xd9"):
        pixels += struct.pack(order + "HHI", 0xFFFE, 0xE000, len(item)) + item
    raw += pixels + struct.pack(order + "HHI", 0xFFFE, 0xE0DD, 0)
    assert raw.count(struct.pack(order + "I", 0xFFFFFFFF)) == 4
    return raw


@pytest.mark.parametrize("transfer_syntax", [IMPLICIT_VR_LITTLE_ENDIAN,
                                             EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN])
def test_a_data_set_cut_anywhere_but_between_its_elements_is_not_whole(
        transfer_syntax: str) -> None:
    """Cut at every byte: whole exactly where a top-level element ends (a shorter
    data set, but a readable one), else not -- inside a header, a value, an item,
    a sequence or the encapsulated pixel data -- in fragments of any size."""
    raw = _nested(transfer_syntax)
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    boundaries = {0} | {end for *_, end in top_level_spans(memoryview(raw), implicit=implicit,
                                                            little=little)}
    assert len(raw) in boundaries
    for cut in range(len(raw) + 1):
        for size in (1, 5, 64, max(cut, 1)):
            error = _framing(raw[:cut], transfer_syntax, size)
            assert (error is None) == (cut in boundaries), (cut, size, error)


def test_what_is_wrong_is_said() -> None:
    ts = EXPLICIT_VR_LITTLE_ENDIAN
    raw = _nested(ts)
    sq = struct.pack("<HH2sHI", 0x0041, 0x0100, b"SQ", 0, 0xFFFFFFFF)
    assert _framing(raw + sq, ts, 7) == "the data set ends inside a sequence that is never closed"
    assert _framing(raw + sq + struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", 2) + b"AB", ts,
                    100) == "the data set does not parse: expected an item, found (0010,0010)"
    assert _framing(raw[:-3], ts, 1000) == "the data set ends inside an element"
    # A stray item delimiter at top level: pydicom stops reading there, others go on.
    assert "an item delimiter (FFFE,E00D) among" in (
        _framing(raw + struct.pack("<HHI", 0xFFFE, 0xE00D, 0), ts, 3) or "")
    # Nesting past the limit (a sequence bomb) is refused, not walked for ever.
    bomb = (sq + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)) * 200
    assert "nested deeper than" in (_framing(raw + bomb, ts, 4096) or "")


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_every_real_file_is_whole_but_the_truncated_ones(path: Path) -> None:
    if path.name in NO_SOP_UIDS:
        return
    header = read_part10_header(path)
    if header.transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN or \
            path.name == "image_dfl.dcm":  # deflated (image_dfl under a private UID)
        return
    raw = path.read_bytes()[header.dataset_offset :]
    # Every other syntax of these files is explicit VR little endian inside.
    ts = (header.transfer_syntax if header.transfer_syntax in (IMPLICIT_VR_LITTLE_ENDIAN,
                                                               EXPLICIT_VR_BIG_ENDIAN)
          else EXPLICIT_VR_LITTLE_ENDIAN)
    for size in (3, 1000, max(len(raw), 1)):
        error = _framing(raw, ts, size)
        assert (error is not None) == (path.name in TRUNCATED | NOT_IN_THEIR_SYNTAX), \
            (path.name, size, error)


@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_garbage_gets_an_answer_not_an_exception(data: bytes, size: int) -> None:
    for ts in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN):
        error = _framing(data, ts, size)
        assert error is None or error.startswith("the data set ")
        assert _framing(data, ts, max(len(data), 1)) == error  # fragments change nothing


def test_another_instance_or_class_is_a900_and_no_uids_c000() -> None:
    ct = read_part10_header(TEST_FILES / "CT_small.dcm")
    raw = (TEST_FILES / "CT_small.dcm").read_bytes()[ct.dataset_offset :]
    ts, cls, inst = ct.transfer_syntax, ct.sop_class_uid, ct.sop_instance_uid
    for size in (10, 4096, len(raw)):
        assert _identity(raw, ts, cls, inst, size).status == 0
        other = _identity(raw, ts, cls, inst + ".1", size)
        assert (other.status, other.reason) == (
            0xA900, f"the data set's SOP Instance UID is {inst}")
        mr = _identity(raw, ts, "1.2.840.10008.5.1.4.1.1.4", inst, size)
        assert (mr.status, mr.reason) == (0xA900, f"the data set's SOP Class UID is {cls}")
    ds = Dataset()
    ds.PatientName = "NO^UIDS"
    bare = encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
    assert _identity(bare, EXPLICIT_VR_LITTLE_ENDIAN, cls, inst, 8).reason == \
        "the data set has no SOP Class UID"
    assert _identity(b"", EXPLICIT_VR_LITTLE_ENDIAN, cls, inst, 8).status == 0xC000


@given(st.binary(min_size=1, max_size=300))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_garbage_is_never_the_instance(data: bytes) -> None:
    cls, inst = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5"
    for ts in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN):
        for size in (7, len(data)):
            assert _identity(data, ts, cls, inst, size).status in (0xA900, 0xC000)


def test_padded_uids_match_and_a_late_uid_is_let_through() -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3"  # odd length: padded with a NUL on the wire
    raw = encode_dataset(ds, IMPLICIT_VR_LITTLE_ENDIAN)
    assert raw.count(b"1.2.3\0") == 1
    assert _identity(raw, IMPLICIT_VR_LITTLE_ENDIAN, ds.SOPClassUID, "1.2.3", 3).status == 0
    # Something huge before the UIDs: past the search window, it cannot be told here.
    big = Dataset()
    big.add_new(0x00080014, "UI", "1.2")
    big.add_new(0x00080010, "LO", "x" * 60_000)  # Recognition Code, retired, any length
    big.add_new(0x00080012, "DA", "20260101")
    big.add_new(0x00080013, "UT", "y" * 10_000)
    late = encode_dataset(big, IMPLICIT_VR_LITTLE_ENDIAN) + raw
    assert _identity(late, IMPLICIT_VR_LITTLE_ENDIAN, "1.9", "1.9", 4096).status == 0
    # A transfer syntax it does not know: it cannot be told here either.
    assert _identity(b"x" * 10, "1.2.826.0.1.3680043.9.99", "1", "2", 5).status == 0


def test_a_deflated_data_set_is_told_as_it_inflates() -> None:
    """Deflated (PS3.5 A.5): inflated as it comes and checked like any other; plain
    bytes under the deflated syntax (dcmjs-dimse sends them so) are C000H, not
    acknowledged for no destination to read."""
    deflated = DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
    ct = read_part10_header(TEST_FILES / "CT_small.dcm")
    plain = (TEST_FILES / "CT_small.dcm").read_bytes()[ct.dataset_offset :]
    squeeze = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    raw = squeeze.compress(plain) + squeeze.flush()
    cls, inst = ct.sop_class_uid, ct.sop_instance_uid
    for size in (3, 100, len(raw)):
        assert _identity(raw, deflated, cls, inst, size).status == 0
        assert _identity(raw, deflated, cls, inst + ".1", size).status == 0xA900
        refused = _identity(plain, deflated, cls, inst, size)
        assert refused.status == 0xC000, refused.reason
        assert refused.reason.startswith("the deflated data set does not inflate")


def _deflate(plain: bytes) -> bytes:
    squeeze = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return squeeze.compress(plain) + squeeze.flush()


def test_a_deflated_data_set_is_walked_whole() -> None:
    """The framing walk runs on the inflated data set, to its end: a second SOP
    Instance UID, an item tag among elements, or a data set cut off inside an
    element, all far past the identity, are C000H as they are in explicit VR LE.
    Before, a deflated data set was inflated only up to its UIDs."""
    deflated = DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
    ct = read_part10_header(TEST_FILES / "CT_small.dcm")
    plain = (TEST_FILES / "CT_small.dcm").read_bytes()[ct.dataset_offset :]
    cls, inst = ct.sop_class_uid, ct.sop_instance_uid
    # 200 KB of a private element first, so the faults lie far past the identity.
    filler = _explicit(0x7FE10010, b"OB", os.urandom(200_000))
    for tail, said in [
        (_explicit(0x00080018, b"UI", b"1.2.3.4\x00"), "(0008,0018)"),
        (struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"abcd", "an item tag (FFFE,E000)"),
        (_explicit(0x7FE20010, b"OB", b"abcdef")[:-2], "ends inside"),
    ]:
        raw = _deflate(plain + filler + tail)
        assert _identity(_deflate(plain + filler), deflated, cls, inst, 1000).status == 0
        for size in (7, 4096, len(raw)):
            refused = _identity(raw, deflated, cls, inst, size)
            assert refused.status == 0xC000, (said, size)
            assert said in refused.reason, refused.reason


def test_a_deflate_stream_cut_off_is_refused() -> None:
    """The deflate stream itself stops short (the data set inflated so far is whole
    at an element boundary): C000H, the rest of the data set was never sent."""
    ct = read_part10_header(TEST_FILES / "CT_small.dcm")
    plain = (TEST_FILES / "CT_small.dcm").read_bytes()[ct.dataset_offset :]
    squeeze = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    cut = squeeze.compress(plain) + squeeze.flush(zlib.Z_SYNC_FLUSH)  # no final block
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(cut) == plain
    refused = _identity(cut, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
                        ct.sop_class_uid, ct.sop_instance_uid, 500)
    assert refused.status == 0xC000
    assert refused.reason == "the deflated data set is cut off (its deflate stream does not end)"
    # A pad byte after the stream's end is allowed (PS3.5 A.5), more is stepped over,
    # whatever the inflated size. Past one chunk inflated, zlib (asked with a length
    # limit) keeps the pad as unconsumed input for ever after the end: the walk spun
    # on it, and the supervisor killed the worker for missed heartbeats.
    import threading

    big = plain + _explicit(0x00091001, b"OB", bytes(3 << 20))
    answers: list[int | None] = []

    def walk() -> None:
        for body in (plain, big):
            for pad in (b"\0", bytes(5000)):
                for size in (7000, 1 << 20):
                    answers.append(_identity(_deflate(body) + pad,
                                             DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
                                             ct.sop_class_uid, ct.sop_instance_uid,
                                             size).status)

    walker = threading.Thread(target=walk, daemon=True)
    walker.start()
    walker.join(60)
    assert not walker.is_alive(), "the walk spins after the end of the deflate stream"
    assert answers == [0] * 8


def test_a_deflate_bomb_is_walked_no_further_than_its_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past DEFLATED_WALK_BYTES inflated the walk stops (0: not told): a few MB of
    deflate can inflate to gigabytes, which the worker would inflate on its loop."""
    import router.dicom.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "DEFLATED_WALK_BYTES", 4 << 20)
    ct = read_part10_header(TEST_FILES / "CT_small.dcm")
    plain = (TEST_FILES / "CT_small.dcm").read_bytes()[ct.dataset_offset :]
    # Cut off after 16 MiB of zeros: past the bound, so never found.
    raw = _deflate(plain + _explicit(0x7FE10010, b"OB", bytes(16 << 20))[:-1])
    check = _identity(raw, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
                      ct.sop_class_uid, ct.sop_instance_uid, 1 << 16)
    assert check.status == 0


def test_the_deflated_walk_is_bounded_in_headers_not_only_bytes() -> None:
    """A review: 256 MiB of 8-byte elements deflate to 391 KB, one PDV, and the walk of
    them took 8.5 s on the worker's loop (its heartbeats with it). The bound is now
    8 MiB inflated, some 1 M headers: counted here, not timed."""
    from router.dicom.dataset import DEFLATED_WALK_BYTES

    assert DEFLATED_WALK_BYTES <= 8 << 20
    ct = read_part10_header(TEST_FILES / "CT_small.dcm")
    plain = (TEST_FILES / "CT_small.dcm").read_bytes()[ct.dataset_offset :]
    tiny = struct.pack("<HH2sH", 0x0009, 0x1010, b"LO", 0)  # 8 bytes, no value
    raw = _deflate(plain + tiny * (32 << 20 >> 3))  # 32 MiB of them
    check = InstanceIdentity(DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, ct.sop_class_uid,
                             ct.sop_instance_uid)
    check.feed(raw, last=True)  # one PDV
    assert check.status == 0
    assert check._inflated <= DEFLATED_WALK_BYTES + (1 << 20)


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


_CT = b"1.2.840.10008.5.1.4.1.1.2\x00"
_BASE = (_explicit(0x00080016, b"UI", _CT) + _explicit(0x00080018, b"UI", b"1.2.3.4\x00")
         + _explicit(0x00100020, b"LO", b"P1"))
_ENCAPSULATED = (struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
                 + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
                 + struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"\xff\xd8\xff\xd9"
                 + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
_NATIVE = _explicit(0x7FE00010, b"OW", bytes(8))


@pytest.mark.parametrize(("tail", "transfer_syntax", "said"), [
    # What dcmdump cannot read, or reads otherwise than the router's check did; all
    # were acknowledged 0000H (an outside hostile campaign).
    (struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"abcd", EXPLICIT_VR_LITTLE_ENDIAN,
     "an item tag (FFFE,E000) where an element belongs"),
    (struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), EXPLICIT_VR_LITTLE_ENDIAN,
     "an item tag (FFFE,E0DD) where an element belongs"),
    (_explicit(0x00091001, b"ZZ", b"abcd"), EXPLICIT_VR_LITTLE_ENDIAN,
     "(0009,1001) has VR b'ZZ', which DICOM does not define"),
    (_explicit(0x00091001, b"B\x05", b"abcd"), EXPLICIT_VR_LITTLE_ENDIAN,
     "(0009,1001) has VR b'B\\x05', which DICOM does not define"),
    # Which SOP Instance UID is it? pydicom takes the last, the router's check the first.
    (_explicit(0x00080018, b"UI", b"9.9.9.9\x00"), EXPLICIT_VR_LITTLE_ENDIAN,
     "(0008,0018) occurs twice"),
    # pydicom stops at it: PatientID and the rest would be invisible to it.
    (struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + _explicit(0x00100010, b"PN", b"AB"),
     EXPLICIT_VR_LITTLE_ENDIAN, "an item delimiter (FFFE,E00D) among"),
    # Zero-length elements of distinct tags, 8 bytes each: the set of tags seen is
    # bounded, not 10 times the data.
    (b"".join(_explicit(0x00120000 | n, b"LO", b"") for n in range(20000)),
     EXPLICIT_VR_LITTLE_ENDIAN, "more than 16384 standard elements"),
    (_ENCAPSULATED, EXPLICIT_VR_LITTLE_ENDIAN,
     "Pixel Data is encapsulated, which its native transfer syntax does not allow"),
    (_NATIVE, "1.2.840.10008.1.2.4.50",
     "Pixel Data is not encapsulated, as its compressed transfer syntax requires"),
])
def test_a_data_set_readers_would_disagree_on_is_refused(tail: bytes, transfer_syntax: str,
                                                         said: str) -> None:
    for size in (3, 1000):
        check = _identity(_BASE + tail, transfer_syntax, _CT.rstrip(b"\x00").decode(),
                          "1.2.3.4", size)
        assert check.status == 0xC000 and said in check.reason, (size, check.reason)


@pytest.mark.parametrize("order", ["patient-first", "date-first", "uid-last"])
def test_elements_out_of_order_before_the_uids_are_not_taken_for_missing_uids(
        order: str) -> None:
    """An outside false-positive hunt: a data set with the Patient module written before
    group 0008 (some writers go module by module), or its SOP Instance UID appended
    last, was refused C000H "no SOP Class UID": the walk stopped at the first tag past
    (0008,0018). DCMTK reads them (warning "not in ascending tag order") and storescp
    stores them. The UIDs are now looked for everywhere once the ordered walk misses
    them; a data set that truly lacks them is still C000H."""
    cls, inst = _explicit(0x00080016, b"UI", _CT), _explicit(0x00080018, b"UI", b"1.2.3.4\x00")
    date = _explicit(0x00080020, b"DA", b"20240131")
    body = {"patient-first": _PATIENT + cls + inst + date,
            "date-first": date + cls + inst + _PATIENT,
            "uid-last": cls + date + _PATIENT + inst}[order]
    for size in (3, 1000):
        check = _identity(body, EXPLICIT_VR_LITTLE_ENDIAN, _CT.rstrip(b"\x00").decode(),
                          "1.2.3.4", size)
        assert check.status == 0, (size, check.reason)
        other = _identity(body, EXPLICIT_VR_LITTLE_ENDIAN, _CT.rstrip(b"\x00").decode(),
                          "9.9.9", size)
        assert other.status == 0xA900, other.reason
    missing = _identity(_PATIENT + cls + date, EXPLICIT_VR_LITTLE_ENDIAN,
                        _CT.rstrip(b"\x00").decode(), "1.2.3.4", 1000)
    assert (missing.status, missing.reason) == (0xC000, "the data set has no SOP Instance UID")


def test_an_undefined_length_un_in_big_endian_is_read_as_implicit_little_endian() -> None:
    """PS3.5 6.2.2 (CP-246): the value of an undefined-length UN is implicit VR little
    endian whatever the transfer syntax. In Explicit VR Big Endian the walk kept the
    big-endian byte order inside and refused it ("expected an item, found
    (FEFF,00E0)"); dcmdump reads it (an outside false-positive hunt)."""
    body = _big_endian_with_un()
    for size in (3, 1000):
        check = _identity(body, EXPLICIT_VR_BIG_ENDIAN, _CT.rstrip(b"\x00").decode(),
                          "1.2.3.4", size)
        assert check.status == 0, (size, check.reason)


def test_the_walkers_past_the_reception_read_an_undefined_length_un_as_it_does() -> None:
    """The reception's framing check read a big-endian undefined-length UN as PS3.5
    6.2.2 says; the walks after it kept big endian inside and refused the data set the
    reception had acknowledged: the rules' header read (read_top_level, then pydicom,
    which fails on it too), the spans a change rewrites (top_level_spans) and the
    framing check before decoding. One walk, one reading."""
    body = _big_endian_with_un()
    found = read_top_level(body, implicit=False, little=False, tags=frozenset({0x00100020}))
    assert found == {0x00100020: ("LO", b"P1")}
    spans = top_level_spans(memoryview(body), implicit=False, little=False)
    assert [(tag, vr) for tag, vr, _, _ in spans] == [
        (0x00080016, "UI"), (0x00080018, "UI"), (0x00090010, "LO"), (0x00091010, "UN"),
        (0x00100020, "LO")]
    assert spans[-1][3] == len(body) and spans[3][3] == spans[4][2]
    ds = decode_dataset(body, EXPLICIT_VR_BIG_ENDIAN)
    assert ds.PatientID == "P1"


def _big(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    size = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack(">HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, size) + value
    return struct.pack(">HH2sH", tag >> 16, tag & 0xFFFF, vr, size) + value


def test_big_endian_undefined_length_un_converts_with_its_items_as_they_are() -> None:
    """pydicom read the items of a big-endian undefined-length UN big endian and failed
    ("No tag to read"), so such an instance, acknowledged, could not be converted for a
    destination. It is handed to pydicom as a defined-length UN whose value is the
    same implicit VR little endian items (PS3.5 6.2.2); inside a defined-length
    sequence item too, whose lengths are set again."""
    un_items = _item(_implicit(0x00091011, b"ABCD"), 0xFFFFFFFF) + struct.pack(
        "<HHI", 0xFFFE, 0xE00D, 0)
    un = _big(0x00091010, b"UN", un_items, 0xFFFFFFFF) + _SEQUENCE_DELIMITATION
    item = _big(0x00090010, b"LO", b"ACME") + un
    nested = _big(0x00081140, b"SQ", struct.pack(">HHI", 0xFFFE, 0xE000, len(item)) + item)
    body = (_big(0x00080016, b"UI", _CT) + _big(0x00080018, b"UI", b"1.2.3.4\x00")
            + nested + _big(0x00090010, b"LO", b"ACME") + un + _big(0x00100020, b"LO", b"P1"))
    for target in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
        ds = decode_dataset(transcode(body, EXPLICIT_VR_BIG_ENDIAN, target), target)
        assert ds.PatientID == "P1"
        for parent in (ds, ds.ReferencedImageSequence[0]):
            value = parent[0x00091010].value
            assert value == un_items, target  # as it came, opaque
    # With none, the data set is handed on as it is (not copied or walked).
    plain = _big(0x00080016, b"UI", _CT) + _big(0x00100020, b"LO", b"P1")
    assert with_defined_length_un(plain) is plain


def test_a_standard_attribute_written_as_un_keeps_its_value_from_big_endian() -> None:
    """A UN's value is little endian whatever the transfer syntax (PS3.5 6.2.2): DCMTK
    reads NumberOfSlices 300 written as UN in a Big Endian data set as 300. pydicom
    gave it its dictionary VR and decoded it big endian, so the converted instance
    said 11265."""
    body = (_big(0x00080016, b"UI", _CT) + _big(0x00080018, b"UI", b"1.2.3.4\x00")
            + _big(0x00540081, b"UN", struct.pack("<H", 300)))
    for target in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
        ds = decode_dataset(transcode(body, EXPLICIT_VR_BIG_ENDIAN, target), target)
        assert ds.NumberOfSlices == 300, target


def _big_endian_with_un() -> bytes:
    """A data set in Explicit VR Big Endian with an undefined-length UN whose items are
    implicit VR little endian (PS3.5 6.2.2), as DCMTK reads it (CP-246)."""
    def big(tag: int, vr: bytes, value: bytes) -> bytes:
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
            return struct.pack(">HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
        return struct.pack(">HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value

    inner = _item(_implicit(0x00091011, b"ABCD"), 0xFFFFFFFF) + struct.pack(
        "<HHI", 0xFFFE, 0xE00D, 0)  # implicit VR little endian inside, undefined length
    un = (struct.pack(">HH2sHI", 0x0009, 0x1010, b"UN", 0, 0xFFFFFFFF) + inner
          + _SEQUENCE_DELIMITATION)
    return (big(0x00080016, b"UI", _CT) + big(0x00080018, b"UI", b"1.2.3.4\x00")
            + big(0x00090010, b"LO", b"ACME") + un + big(0x00100020, b"LO", b"P1"))


def _item(body: bytes, length: int | None = None) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body) if length is None else length) + body


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


_REF = _explicit(0x00081150, b"UI", _CT) + _explicit(0x00081155, b"UI", b"1.2.3.5\x00")
_REF_IMPLICIT = _implicit(0x00081150, _CT) + _implicit(0x00081155, b"1.2.3.5\x00")
_PATIENT = _explicit(0x00100020, b"LO", b"P1")
_SEQUENCE_DELIMITATION = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


@pytest.mark.parametrize(("tail", "implicit", "said"), [
    # Inside defined-length sequences and items (PS3.5 7.5.1), stepped over unread
    # before: each was acknowledged, and dcmdump cannot read one of them.
    (_explicit(0x00081140, b"SQ", _item(_REF, len(_REF) - 10) + _REF[-10:]) + _PATIENT,
     False, "(0008,1155) runs past the end of its item"),
    (_explicit(0x00081140, b"SQ", _REF) + _PATIENT, False,
     "expected an item, found (0008,1150)"),
    (_explicit(0x00081140, b"SQ", _item(_REF + _item(b"abcd"))) + _PATIENT, False,
     "an item tag (FFFE,E000) where an element belongs"),
    (_explicit(0x00081140, b"SQ", _item(_REF, len(_REF) + 8)) + _PATIENT, False,
     "an item runs past the end of its sequence"),
    # An undefined-length sequence inside a defined-length item, its delimiter missing.
    (_explicit(0x00081140, b"SQ", _item(
        struct.pack("<HH2sHI", 0x0008, 0x1199, b"SQ", 0, 0xFFFFFFFF) + _item(_REF))),
     False, "without its delimiter at the defined end"),
    # Implicit VR: the data dictionary says (0008,1140) is a sequence.
    (_implicit(0x00081140, _REF_IMPLICIT) + _implicit(0x00100020, b"P1"), True,
     "expected an item, found (0008,1150)"),
    (_implicit(0x00081140, _item(_REF_IMPLICIT, 20) + _REF_IMPLICIT[20:])
     + _implicit(0x00100020, b"P1"), True, "(0008,1150) runs past the end of its item"),
])
def test_what_is_inside_a_defined_length_sequence_is_walked(
        tmp_path: Path, tail: bytes, implicit: bool, said: str) -> None:
    """The walk enters defined-length sequences and their items: what dcmdump (DCMTK)
    cannot read there is C000H, in fragments of every size."""
    syntax = IMPLICIT_VR_LITTLE_ENDIAN if implicit else EXPLICIT_VR_LITTLE_ENDIAN
    base = (_implicit(0x00080016, _CT) + _implicit(0x00080018, b"1.2.3.4\x00")
            if implicit else _BASE[: -len(_PATIENT)])
    for size in (3, 7, 1000):
        check = _identity(base + tail, syntax, _CT.rstrip(b"\x00").decode(), "1.2.3.4", size)
        assert check.status == 0xC000 and said in check.reason, (size, check.reason)
    if DCMDUMP:
        assert _dcmdump(tmp_path, base + tail, syntax).returncode != 0


@pytest.mark.parametrize(("tail", "implicit"), [
    (_explicit(0x00081140, b"SQ", _item(_REF) + _item(_REF)) + _PATIENT, False),
    (_explicit(0x00081140, b"SQ", b"") + _PATIENT, False),
    (_explicit(0x00081140, b"SQ", _item(b"") + _item(_REF)) + _PATIENT, False),
    # Nested: a defined-length sequence in a defined-length item, ending together.
    (_explicit(0x00081140, b"SQ", _item(_explicit(0x00081199, b"SQ", _item(_REF)))), False),
    # An undefined-length sequence closed inside a defined-length item.
    (_explicit(0x00081140, b"SQ", _item(
        struct.pack("<HH2sHI", 0x0008, 0x1199, b"SQ", 0, 0xFFFFFFFF) + _item(_REF)
        + _SEQUENCE_DELIMITATION)) + _PATIENT, False),
    # A sequence delimiter at the very end of a defined-length sequence: DCMTK reads
    # it as the end ("for re-encoding"), and so do we.
    (_explicit(0x00081140, b"SQ", _item(_REF) + _SEQUENCE_DELIMITATION) + _PATIENT, False),
    (_implicit(0x00081140, _item(_REF_IMPLICIT)) + _implicit(0x00100020, b"P1"), True),
    # A private tag in implicit VR is a value like any other: not walked.
    (_implicit(0x00091010, _REF_IMPLICIT) + _implicit(0x00100020, b"P1"), True),
])
def test_well_formed_defined_length_sequences_pass(tmp_path: Path, tail: bytes,
                                                   implicit: bool) -> None:
    syntax = IMPLICIT_VR_LITTLE_ENDIAN if implicit else EXPLICIT_VR_LITTLE_ENDIAN
    base = (_implicit(0x00080016, _CT) + _implicit(0x00080018, b"1.2.3.4\x00")
            if implicit else _BASE[: -len(_PATIENT)])
    for size in (3, 7, 1000):
        check = _identity(base + tail, syntax, _CT.rstrip(b"\x00").decode(), "1.2.3.4", size)
        assert check.status == 0, (size, check.reason)
    if DCMDUMP:
        result = _dcmdump(tmp_path, base + tail, syntax)
        assert result.returncode == 0 and "E:" not in result.stderr, result.stderr


def _dcmdump(tmp_path: Path, data_set: bytes, transfer_syntax: str,
             ) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "walked.dcm"
    path.write_bytes(part10_meta_bytes(sop_class_uid=_CT.rstrip(b"\x00").decode(),
                                       sop_instance_uid="1.2.3.4",
                                       transfer_syntax=transfer_syntax) + data_set)
    assert DCMDUMP is not None
    return subprocess.run([DCMDUMP, str(path)], capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize(("tail", "transfer_syntax"), [
    (_ENCAPSULATED, "1.2.840.10008.1.2.4.50"),
    (_NATIVE, EXPLICIT_VR_LITTLE_ENDIAN),
    (_NATIVE, "1.2.840.10008.1.2.1.99.1"),  # a private syntax: not checked
    # A private element twice: DCMTK warns and reads on, so do we.
    (_explicit(0x00091001, b"LO", b"AB") + _explicit(0x00091001, b"LO", b"CD"),
     EXPLICIT_VR_LITTLE_ENDIAN),
])
def test_pixel_data_as_its_transfer_syntax_says_passes(tail: bytes,
                                                       transfer_syntax: str) -> None:
    check = _identity(_BASE + tail, transfer_syntax, _CT.rstrip(b"\x00").decode(), "1.2.3.4",
                      1000)
    assert check.status == 0, check.reason


@pytest.mark.parametrize("transfer_syntax", [IMPLICIT_VR_LITTLE_ENDIAN,
                                             EXPLICIT_VR_LITTLE_ENDIAN])
@pytest.mark.parametrize("group", [0x0000, 0x0002])
def test_a_data_set_with_file_meta_or_command_elements_is_refused(
        transfer_syntax: str, group: int) -> None:
    """A Data Set holds no group below 0008 (PS3.5 7.1). A C-STORE data set that began
    with group 0002 elements was acknowledged; the spooled file's meta reader then took
    them for the file's own, and the instance went out 8 bytes short, or in the
    transfer syntax they named (an outside hostile-input campaign). Refused C000H."""
    explicit = transfer_syntax == EXPLICIT_VR_LITTLE_ENDIAN

    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        return _explicit(tag, vr, value) if explicit else _implicit(tag, value)

    body = (element(group << 16 | 0x0010, b"UI", b"1.2.840.10008.1.2\x00")
            + element(0x00080016, b"UI", _CT) + element(0x00080018, b"UI", b"1.2.3.4\x00")
            + element(0x00100020, b"LO", b"P1"))
    for size in (3, 1000):
        check = _identity(body, transfer_syntax, _CT.rstrip(b"\x00").decode(), "1.2.3.4",
                          size)
        assert check.status == 0xC000, check.reason
        assert f"({group:04X},0010) is a" in (check.reason or ""), check.reason


def test_transcode_inflates_a_deflated_data_set_within_a_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Converting a deflated instance for a destination inflated all of it: a few
    hundred KB of deflated zeros, under the 256 MiB bound on their size on disk, grew
    a worker to 2.8 GB (an outside hostile-input campaign). Refused past the bound,
    with a one-line reason for the dead letter."""
    import router.dicom.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "MAX_TRANSCODED_INFLATED", 1 << 20)
    zeros = _explicit(0x00091001, b"OB", b"\x00" * (2 << 20))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = (_explicit(0x00080016, b"UI", _CT) + _explicit(0x00080018, b"UI", b"1.2.3.4\x00")
            + _explicit(0x00090010, b"LO", b"ACME") + zeros)
    deflated = deflater.compress(body) + deflater.flush()
    assert len(deflated) < 4096
    with pytest.raises(DIMSEError, match="inflates to more than 1048576 bytes") as caught:
        transcode(deflated, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN)
    assert caught.value.status == 0xC000
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    small = deflater.compress(body[: -len(zeros)]) + deflater.flush()
    assert transcode(small, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
                     EXPLICIT_VR_LITTLE_ENDIAN) == body[: -len(zeros)]
