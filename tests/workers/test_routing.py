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
from rules import ChangeNotMade, Changes
from rules.changes import CopyOp, RemoveOp, SetOp
from tests.helpers import pydicom_test_files
from workers.routing import _pydicom_refusal, read_header

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


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small.dcm",
                                  "examples_rgb_color.dcm"])
def test_pixel_data_asked_for_is_there_compressed_or_not(name: str) -> None:
    """A rule `"(7FE0,0010)" = { present = true }` (an outside campaign): encapsulated
    Pixel Data has an undefined length, so the fast read gave up and pydicom, which
    stops before pixel data, said it was missing: every compressed image went the
    other way. It is now there, with an empty value when it is encapsulated or over
    MAX_WANTED_BULK (never copied), and the element after it is still found."""
    from rules import RuleSet
    from tests.rules.support import ASSOC, NOW

    [path] = [p for p in pydicom_test_files() if p.name == name]
    part10 = read_part10_header(path)
    header = read_header(path, part10.transfer_syntax, part10.dataset_offset,
                         frozenset({0x7FE00010, 0xFFFAFFFA}))
    assert header is not None and 0x7FE00010 in header
    if name != "MR_small.dcm":  # encapsulated, or 230 KB native: not copied
        assert not header[0x7FE00010].value
    rules = RuleSet.from_text('[[rule]]\nname = "images"\n[rule.when]\n'
                              '"(7FE0,0010)" = { present = true }\n[rule.then]\n'
                              'forward = "a"\n', destinations=None)
    assert [f.destination for f in rules.evaluate(ASSOC, header, NOW).forwards] == ["a"]


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


def _anonymise() -> Changes:
    """A typical rule's changes: set (with a value that forces UTF-8), remove, copy."""
    return Changes(operations=(
        SetOp(tag=0x00100010, label="PatientName", vr="PN", value="Müller^Jürgen"),
        RemoveOp(tag=0x00100030, label="PatientBirthDate"),
        CopyOp(target=0x00081030, target_label="StudyDescription", target_vr=None,
               source=0x00100020, source_label="PatientID"),
    ))


def _changed_whole(path: Path, changes: Changes) -> bytes:
    """What pydicom makes of the whole file with ``changes``: the reference."""
    ds = dcmread(path)
    changes.apply(ds)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("path", pydicom_test_files(), ids=lambda p: p.name)
def test_a_changed_copy_around_bulk_data_is_what_pydicom_makes_of_the_whole(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bulk data is copied as it is and the rest decoded, changed and merged back in
    tag order; on every real file (bulk made anything over 256 bytes here, so every
    one takes that path where it can) the copy must read as pydicom's whole-file
    change does."""
    from workers import routing

    monkeypatch.setattr(routing, "_BULK", 256)
    part10 = read_part10_header(path)
    try:
        expected = dcmread(BytesIO(_changed_whole(path, _anonymise())))
    except ChangeNotMade as exc:
        # Private bytes of unknown VR in a set UTF-8 would replace (J2K_pixelrep_
        # mismatch.dcm, a Hitachi file in ISO 2022 IR 13\87): not made either way.
        assert "of unknown VR" in str(exc)
        with pytest.raises(DIMSEError, match=r"private element\(s\) .* of unknown VR"):
            routing._changed_copy(path, _anonymise(), part10.transfer_syntax,
                                  part10.dataset_offset)(BytesIO())
        return
    out = BytesIO()
    routing._changed_copy(path, _anonymise(), part10.transfer_syntax,
                          part10.dataset_offset)(out)
    got = dcmread(BytesIO(out.getvalue()))
    # The file meta: as received byte for byte, or, where there is no bulk data to
    # leave out, as pydicom's whole-file change writes it (it may fill in some).
    if out.getvalue()[:part10.dataset_offset] != path.read_bytes()[:part10.dataset_offset]:
        assert got.file_meta == expected.file_meta
    assert got == expected
    assert [e.tag for e in got] == [e.tag for e in expected]


def test_a_changed_copy_of_a_big_instance_never_holds_its_pixel_data(tmp_path: Path) -> None:
    """64 MiB of pixel data, changed for a destination: Python never allocates more
    than a few MiB at once (it decoded the whole instance: over 128 MiB)."""
    import tracemalloc

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from workers.routing import _changed_copy

    ds = dcmread(pydicom_test_files()[0].parent / "CT_small.dcm")
    ds.Rows, ds.Columns, ds.NumberOfFrames = 4096, 4096, 2
    ds.PixelData = bytes(range(256)) * (4096 * 4096 * 2 * 2 // 256)
    ds.file_meta = FileMetaDataset(ds.file_meta)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    pixels = len(ds.PixelData)
    del ds
    part10 = read_part10_header(path)
    out_path = tmp_path / "changed.dcm"
    tracemalloc.start()
    try:
        with out_path.open("wb") as out:
            _changed_copy(path, _anonymise(), part10.transfer_syntax,
                          part10.dataset_offset)(out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak >> 20} MiB"
    got = dcmread(out_path, stop_before_pixels=True)
    assert str(got.PatientName) == "Müller^Jürgen" and "PatientBirthDate" not in got
    with out_path.open("rb") as changed, path.open("rb") as original:
        assert changed.read()[-pixels:] == original.read()[-pixels:]


def test_a_change_to_the_bulk_data_itself_still_applies(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import routing

    monkeypatch.setattr(routing, "_BULK", 256)
    path = next(p for p in pydicom_test_files() if p.name == "CT_small.dcm")
    part10 = read_part10_header(path)
    changes = Changes(operations=(RemoveOp(tag=0x7FE00010, label="PixelData"),))
    out = BytesIO()
    routing._changed_copy(path, changes, part10.transfer_syntax, part10.dataset_offset)(out)
    got = dcmread(BytesIO(out.getvalue()))
    assert "PixelData" not in got and got.PatientName == dcmread(path).PatientName


def test_a_private_transfer_syntax_is_routed_not_refused(tmp_path: Path) -> None:
    """A transfer syntax pydicom does not know (a private one, accepted under
    transfer_syntaxes = "any") made every rule that reads attributes fail with
    0110H ("UID is not a transfer syntax"); now the header is read as the
    explicit VR little endian data set it is taken for, and changes apply."""
    from router.dicom.dataset import part10_meta_bytes

    private = "1.2.826.0.1.3680043.9.99.1"
    source = dcmread(next(p for p in pydicom_test_files() if p.name == "CT_small.dcm"))
    path = tmp_path / "private.dcm"
    raw = BytesIO()
    source.save_as(raw, enforce_file_format=True)
    part10 = read_part10_header(raw.getvalue())
    path.write_bytes(part10_meta_bytes(sop_class_uid=part10.sop_class_uid,
                                       sop_instance_uid=part10.sop_instance_uid,
                                       transfer_syntax=private)
                     + raw.getvalue()[part10.dataset_offset:])
    written = read_part10_header(path)
    # Not walked here (None): pydicom reads it, as InstanceRouter._header does.
    assert read_header(path, private, written.dataset_offset, TAGS) is None
    fallback = dcmread(path, stop_before_pixels=True, specific_tags=[0x00080060])
    assert fallback.Modality == "CT"
    from workers import routing

    out = BytesIO()
    routing._changed_copy(path, _anonymise(), private, written.dataset_offset)(out)
    assert str(dcmread(BytesIO(out.getvalue())).PatientName) == "Müller^Jürgen"


def test_a_data_set_pydicom_cannot_change_is_refused_c000_in_one_line(tmp_path: Path) -> None:
    """Implicit VR data in an Explicit VR LE file: pydicom fails with a message that
    carries a whole traceback, which was logged as is, and the sender got 0110H."""
    import warnings

    from router.dicom.dataset import encode_dataset, part10_meta_bytes
    from workers import routing

    source = dcmread(next(p for p in pydicom_test_files() if p.name == "CT_small.dcm"))
    path = tmp_path / "implicit-in-explicit.dcm"
    path.write_bytes(part10_meta_bytes(sop_class_uid=source.SOPClassUID,
                                       sop_instance_uid=source.SOPInstanceUID,
                                       transfer_syntax="1.2.840.10008.1.2.1")
                     + encode_dataset(source, "1.2.840.10008.1.2"))
    part10 = read_part10_header(path)
    with warnings.catch_warnings(), pytest.raises(DIMSEError) as info:
        warnings.simplefilter("ignore")
        routing._changed_copy(path, _anonymise(), part10.transfer_syntax,
                              part10.dataset_offset)(BytesIO())
    assert info.value.status == 0xC000
    assert str(info.value).startswith("cannot apply the rule's changes: ")
    assert "\n" not in str(info.value)


def test_pydicom_failing_on_the_data_set_is_c000_and_the_disk_failing_is_not() -> None:
    """pydicom raises a bare OSError ("No tag to read at file position 274") for a
    data set that ends early: that is the data set's trouble, C000H. It was taken
    for the disk's and answered 0110H, which invites the sender to retry the same
    bad instance for ever. An OSError with an errno is still the disk's."""
    import errno

    with pytest.raises(DIMSEError) as refused, _pydicom_refusal("cannot apply the changes"):
        raise OSError("No tag to read at file position 274")
    assert refused.value.status == 0xC000
    assert str(refused.value) == "cannot apply the changes: No tag to read at file position 274"
    with pytest.raises(OSError) as disk, _pydicom_refusal("cannot apply the changes"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert disk.value.errno == errno.ENOSPC and not isinstance(disk.value, DIMSEError)


def test_us_or_ss_attributes_in_implicit_vr_are_read_as_their_pixel_representation_says(
        tmp_path: Path) -> None:
    """Pixel Padding Value is US or SS as Pixel Representation says (PS3.3 C.7.5.1.1.2);
    in Implicit VR nothing else does. A rule that read it alone had pydicom take US:
    -2000 was 63536, and the instance routed otherwise than the same one sent in
    Explicit VR, and than `rules test` said (an outside campaign)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid

    from router.config import Config
    from rules import RuleSet
    from workers.routing import InstanceRouter

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    ds.Modality = "CT"
    ds.BitsAllocated, ds.PixelRepresentation = 16, 1
    ds.add_new(0x00280120, "SS", -2000)  # Pixel Padding Value
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "signed.dcm"
    ds.save_as(path, enforce_file_format=True)
    rules = RuleSet.from_text(
        '[[rule]]\nname = "padded"\n[rule.when]\nPixelPaddingValue = -2000\n'
        '[rule.then]\nforward = ["a"]\n', source=Path("rules.toml"), destinations={"a"})
    router = InstanceRouter(Config(spool=Path("/s"), admin_socket=Path("/s/a.sock")), rules)
    part10 = read_part10_header(path)
    header = router._header(path, part10.transfer_syntax, part10.dataset_offset)
    assert header.PixelPaddingValue == -2000
