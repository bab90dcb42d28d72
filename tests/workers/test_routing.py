"""Routing at commit: the fast header reader agrees with pydicom on real files.

The rules read a handful of top-level attributes; ``read_header`` finds them by
walking element headers instead of pydicom's generator. Whatever it returns must be
what ``dcmread(stop_before_pixels=True, specific_tags=...)`` gives for the same tags,
on every real-world file pydicom ships (big endian, implicit, odd lengths, private
tags, undefined-length sequences, compressed).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread

from router.dicom.dataset import HeaderIncomplete, read_part10_header, read_top_level
from router.dicom.errors import DIMSEError
from tests.helpers import pydicom_test_files
from workers.routing import read_header

TAGS = frozenset({
    0x00080005,  # SpecificCharacterSet
    0x00080008,  # ImageType (multi-valued)
    0x00080020,  # StudyDate
    0x00080060,  # Modality
    0x00081030,  # StudyDescription
    0x00090010,  # a private creator
    0x00100010,  # PatientName
    0x00100020,  # PatientID
    0x00200011,  # SeriesNumber (IS)
    0x00200013,  # InstanceNumber
    0x00280010,  # Rows (US)
})


@pytest.mark.parametrize("path", pydicom_test_files(), ids=lambda p: p.name)
def test_read_header_agrees_with_pydicom(path: Path) -> None:
    try:
        part10 = read_part10_header(path)
    except Exception:
        pytest.skip("not a readable Part 10 file")
    fast = read_header(path, part10.transfer_syntax, part10.dataset_offset, TAGS)
    if fast is None:
        return  # the fast path declined (deflated, undefined-length wanted tag...): pydicom
    reference = dcmread(path, stop_before_pixels=True, specific_tags=sorted(TAGS))
    for tag in TAGS:
        assert (tag in fast) == (tag in reference), hex(tag)
        if tag in fast:
            assert fast[tag].value == reference[tag].value, hex(tag)


def test_read_top_level_stops_before_pixel_data_and_asks_for_more() -> None:
    # (0008,0060) CS "CT" then (7FE0,0010) OB of 1000 bytes, explicit VR LE.
    data = (b"\x08\x00\x60\x00CS\x02\x00CT"
            + b"\xe0\x7f\x10\x00OB\x00\x00" + (1000).to_bytes(4, "little") + b"\x00" * 1000)
    assert read_top_level(data[:10], implicit=False, little=True,
                          tags=frozenset({0x00080060})) == {0x00080060: ("CS", b"CT")}
    with pytest.raises(HeaderIncomplete):
        read_top_level(data[:9], implicit=False, little=True, tags=frozenset({0x00080060}))
    # Asking for a later tag walks past (not into) the pixel data's value.
    with pytest.raises(HeaderIncomplete):
        read_top_level(data[:30], implicit=False, little=True, tags=frozenset({0x7FE10010}))
    assert read_top_level(data, implicit=False, little=True, tags=frozenset({0x7FE10010})) == {}


def _part10(path: Path, transfer_syntax: str, big: int) -> None:
    """A CT whose header has a private OB of ``big`` zero bytes before PatientName."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    ds.Modality = "CT"
    ds.add_new(0x00090010, "LO", "ROUTER TEST")
    ds.add_new(0x00091010, "OB", bytes(big))
    ds.PatientName = "Last^First"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)


WANTED = frozenset({0x00080060, 0x00100010})


def test_a_deflated_header_is_read_without_pydicom(tmp_path: Path) -> None:
    path = tmp_path / "deflated.dcm"
    _part10(path, "1.2.840.10008.1.2.1.99", 100_000)
    part10 = read_part10_header(path)
    header = read_header(path, part10.transfer_syntax, part10.dataset_offset, WANTED)
    assert header is not None
    assert (header.Modality, str(header.PatientName)) == ("CT", "Last^First")


def test_a_deflate_bomb_before_the_wanted_attributes_is_refused_c000(tmp_path: Path) -> None:
    """64 MiB of zeros deflate to 64 KiB. pydicom inflated all of it to read a header
    (3 MB sent this way took 4 GB and the worker); the walk inflates 8 MiB at most and
    refuses the instance with C000H."""
    path = tmp_path / "bomb.dcm"
    _part10(path, "1.2.840.10008.1.2.1.99", 64 << 20)
    assert path.stat().st_size < 1 << 20
    part10 = read_part10_header(path)
    with pytest.raises(DIMSEError, match="not within its first 8 MiB inflated") as info:
        read_header(path, part10.transfer_syntax, part10.dataset_offset, WANTED)
    assert info.value.status == 0xC000


def test_a_big_element_before_the_wanted_ones_is_skipped_in_a_map(tmp_path: Path) -> None:
    """20 MB before PatientName: walked in a read-only map of the file, not handed to
    pydicom (which reads the 20 MB into memory, or all of a 1 GB element)."""
    path = tmp_path / "big.dcm"
    _part10(path, "1.2.840.10008.1.2.1", 20 << 20)
    part10 = read_part10_header(path)
    header = read_header(path, part10.transfer_syntax, part10.dataset_offset, WANTED)
    assert header is not None
    assert (header.Modality, str(header.PatientName)) == ("CT", "Last^First")


def test_a_deflate_bomb_a_rule_would_change_is_refused_before_pydicom(tmp_path: Path) -> None:
    """A rule's changes need the whole data set, which pydicom inflates whole: a
    deflated one is first inflated in steps, nothing kept, and refused past 256 MiB.
    The file is written as a stream (300 MiB of zeros in 1 MiB steps, ~300 KB sent)."""
    import zlib

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    from rules import Changes
    from workers.routing import _changed_copy

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    path = tmp_path / "bomb.dcm"
    with path.open("wb") as fh:
        fh.write(bytes(128) + b"DICM")
        write_file_meta_info(fh, meta)  # type: ignore[arg-type]
        deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        # (0009,1010) OB, 300 MiB of zeros, explicit VR little endian (PS3.5 7.1.2).
        fh.write(deflate.compress(b"\x09\x00\x10\x10OB\x00\x00" + (300 << 20).to_bytes(4,
                                                                                 "little")))
        for _ in range(300):
            fh.write(deflate.compress(bytes(1 << 20)))
        fh.write(deflate.flush())
    assert path.stat().st_size < 1 << 20
    changes = Changes()  # what the rule changes does not matter: the bound comes first
    with pytest.raises(DIMSEError, match="inflates past 256 MiB") as info:
        part10 = read_part10_header(path)
        _changed_copy(path, changes, part10.transfer_syntax, part10.dataset_offset)(BytesIO())
    assert info.value.status == 0xC000
