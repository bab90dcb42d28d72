"""Which values a Specific Character Set holds, and private text received in
Implicit VR: in changes (``replace``) and in conditions.

What a change writes is read back by DCMTK (``dcmconv +U8``, which converts by
the declared set with its own tables), not only by pydicom, whose encoder is the
one under suspicion here."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pydicom
import pytest
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset

from router.dicom.dataset import decode_dataset, encode_dataset, read_part10_header
from rules import ChangeNotMade
from rules.charsets import holds
from tests.helpers.dcmtk import Dcmtk
from tests.rules.support import ASSOC, NOW, TEST_FILES, dataset, one_rule, ruleset
from tests.rules.test_changes import _changes

CHARSETS = TEST_FILES.parent / "charset_files"


@pytest.mark.parametrize(("terms", "text", "held"), [
    (["ISO_IR 100"], "Müller", True),
    (["ISO_IR 100"], "Ёлкин", False),
    (["ISO_IR 100"], "\x85", False),  # a C1 control, in no DICOM set
    (["ISO_IR 144"], "Ёлкин", True),
    (["ISO_IR 138"], "\u05d0", True),
    ([], "ü", False),
    (["ISO_IR 192"], "漢ü", True),
    (["GBK"], "漢", True),
    (["ISO_IR 999"], "ü", False),  # not a DICOM term: nothing known of it
    # JIS X 0201 is Katakana only; Python's shift_jis takes Kanji too.
    (["ISO_IR 13"], "ｱｲ", True),
    (["ISO_IR 13"], "ｱｲ漢字", False),
    (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ山田", True),
    # JIS X 0212 has "ü"; pydicom writes it as Latin-1 when value 1 is the default.
    (["ISO 2022 IR 159"], "ü", True),
    (["", "ISO 2022 IR 159"], "ü", False),
    (["", "ISO 2022 IR 87"], "漢字", True),
    (["", "ISO 2022 IR 87"], "ü", False),
    (["", "ISO 2022 IR 149"], "한글", True),
    # pydicom writes GB 2312 without its escape sequence, and Latin-1 for "ü".
    (["", "ISO 2022 IR 58"], "中文", False),
    (["", "ISO 2022 IR 58"], "ü", False),
    (["ISO 2022 IR 100", "ISO 2022 IR 87"], "ü漢", True),
    (["ISO_IR 100", "ISO 2022 IR 87"], "ü漢", False),  # ISO_IR: no code extensions
])
def test_holds(terms: list[str], text: str, held: bool) -> None:
    assert holds(text, terms) is held


def _written(ds: Dataset, path: Path) -> None:
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(("charset", "values", "result"), [
    # Before: pydicom's shift_jis wrote the Kanji as "??".
    ("ISO_IR 13", {"PatientName": "ﾔﾏﾀﾞ^ﾀﾛｳ", "StudyDescription": "ｱｲ 頭部"}, "ISO_IR 192"),
    # Before: "ü" went out as byte FCH, in a set with no G1 declared.
    (["", "ISO 2022 IR 159"], {"InstitutionName": "Zürich"}, "ISO_IR 192"),
    (["", "ISO 2022 IR 87"], {"InstitutionName": "Zürich"}, "ISO_IR 192"),
    # Before: GB 2312 bytes without their escape sequence.
    (["", "ISO 2022 IR 58"], {"InstitutionName": "北京"}, "ISO_IR 192"),
    # Held: the data set keeps its set, and DCMTK reads the values in it. (Debian's
    # DCMTK converts no ISO 2022 multi-byte set: glibc's iconv has no table for it.)
    ("ISO_IR 144", {"InstitutionName": "Москва"}, "ISO_IR 144"),
    ("ISO_IR 13", {"InstitutionName": "ｱｲ"}, "ISO_IR 13"),
])
def test_what_a_change_writes_reads_back_in_dcmtk(
        dcmtk: Dcmtk, tmp_path: Path, charset: str | list[str],
        values: dict[str, str], result: str) -> None:
    """A rule sets a value the declared set cannot hold: the data set becomes UTF-8
    and every reader gets the value (an outside campaign found "?" and undeclared
    bytes). DCMTK converts the written file to UTF-8 by the set it declares."""
    ds = dataset(SpecificCharacterSet=charset, PatientID="123")
    body = ", ".join(f'{k} = "{v}"' for k, v in values.items())
    _changes(f"set = {{ {body} }}").apply(ds)
    assert ds.SpecificCharacterSet == result
    _written(ds, tmp_path / "changed.dcm")
    done = dcmtk.run("dcmconv", "+U8", tmp_path / "changed.dcm", tmp_path / "utf8.dcm")
    assert done.returncode == 0, done.stderr
    back = pydicom.dcmread(tmp_path / "utf8.dcm")
    assert {k: str(back[k].value) for k in values} == values


def _private_implicit(charset: str | None, raw: bytes) -> Dataset:
    """A data set as received in Implicit VR: its private element is UN, bytes."""
    ds = dataset(PatientID="123")
    if charset:
        ds.SpecificCharacterSet = charset
    ds.add_new(0x00090010, "LO", "SITE")
    ds.add_new(0x00091003, "UN", raw)
    return ds


@pytest.mark.parametrize(("charset", "raw", "expected"), [
    (None, b"OLD-7\\OLD-8", "NEW-7\\NEW-8"),  # each value, as for an LO
    ("ISO_IR 100", "Grüße OLD ".encode("latin-1"), "Grüße NEW"),
    ("ISO_IR 192", "Grüße OLD ".encode(), "Grüße NEW"),
])
def test_replace_in_a_private_element_received_in_implicit_vr(
        charset: str | None, raw: bytes, expected: str) -> None:
    """The same instance sent in Explicit VR has the element as text; in Implicit VR
    the replace did nothing, without a word (an outside campaign)."""
    ds = _private_implicit(charset, raw)
    _changes('replace = { "(0009,1003)" = { pattern = "OLD", with = "NEW" } }').apply(ds)
    assert ds[0x00091003].value == expected
    assert ds.get("SpecificCharacterSet") == charset  # the set holds it: unchanged


def test_replace_in_a_private_element_that_needs_utf8(tmp_path: Path, dcmtk: Dcmtk) -> None:
    ds = _private_implicit("ISO_IR 100", "Grüße OLD".encode("latin-1"))
    _changes('replace = { "(0009,1003)" = { pattern = "OLD", with = "Москва" } }').apply(ds)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    _written(ds, tmp_path / "changed.dcm")
    done = dcmtk.run("dcmconv", "+U8", tmp_path / "changed.dcm", tmp_path / "utf8.dcm")
    assert done.returncode == 0, done.stderr
    assert pydicom.dcmread(tmp_path / "utf8.dcm")[0x00091003].value == "Grüße Москва"


def test_an_empty_private_element_received_in_implicit_vr_is_not_filled() -> None:
    ds = _private_implicit(None, b"")
    _changes('replace = { "(0009,1003)" = { pattern = "^(.*)$", with = "R:\\\\1" } }').apply(ds)
    assert ds[0x00091003].value == b""


@pytest.mark.parametrize("change", [
    'set = { InstitutionName = "Москва" }',  # needs UTF-8
    'set = { SpecificCharacterSet = "ISO_IR 192" }',
])
def test_private_bytes_of_unknown_vr_stop_a_change_of_the_character_set(change: str) -> None:
    """Bytes of a private element received in Implicit VR may be text in the old set
    or binary: with no VR to tell, the data set cannot be converted safely. It went
    out declared UTF-8 with Latin-1 private text (an outside campaign, 15 of 15 of
    pydicom's charset files sent in Implicit VR): now the change is not made, and
    routing keeps that copy as a dead letter. ASCII bytes read the same in any set."""
    ds = _private_implicit("ISO_IR 100", "Ä\x01neas".encode("latin-1"))
    with pytest.raises(ChangeNotMade, match=r"private element\(s\) \(0009,1003\) of unknown VR"):
        _changes(change).apply(copy.deepcopy(ds))
    assert _changes(change).problem(ds) is not None
    ascii_bytes = _private_implicit("ISO_IR 100", b"\x01\x02 plain")
    _changes(change).apply(ascii_bytes)
    assert ascii_bytes.SpecificCharacterSet == "ISO_IR 192"
    assert ascii_bytes[0x00091003].value == b"\x01\x02 plain"


@pytest.mark.parametrize(("charset", "raw"), [
    ("ISO_IR 100", "Zürich".encode("latin-1")),
    ("ISO_IR 192", "Zürich".encode()),
    (["", "ISO 2022 IR 87"], "東京".encode("iso2022_jp")),
])
def test_conditions_read_a_private_element_received_in_implicit_vr_in_its_set(
        charset: str | list[str], raw: bytes) -> None:
    """Conditions read UN bytes as Latin-1 whatever the set: a UTF-8 instance's
    "Zürich" did not match, in Implicit VR only (an outside campaign)."""
    text = decode_bytes(raw, convert_encodings(charset), set())
    rules = ruleset(one_rule(f'"(0009,1003)" = "{text}"'))
    implicit = _private_implicit(charset, raw)
    explicit = _private_implicit(charset, raw)
    explicit.add_new(0x00091003, "LO", text)  # the same instance, received in Explicit VR
    for ds in (implicit, explicit):
        assert [f.destination for f in rules.evaluate(ASSOC, ds, NOW).forwards] == ["pacs"]


def test_setting_the_character_set_converts_the_text_to_it(tmp_path: Path, dcmtk: Dcmtk) -> None:
    """A rule that sets (0008,0005) relabelled the data set: chrFren.dcm's Latin-1
    names went out as bytes that read as other characters in UTF-8 (an outside
    campaign). Now its text is converted; DCMTK reads the names as they were. The
    data set is read and written as the router does (pydicom's own dcmwrite converts
    what dcmread read, so would hide it)."""
    source = CHARSETS / "chrFren.dcm"
    name = str(pydicom.dcmread(source).PatientName)
    part10 = read_part10_header(source)
    syntax = part10.transfer_syntax
    french = decode_dataset(source.read_bytes()[part10.dataset_offset:], syntax)
    _changes('set = { SpecificCharacterSet = "ISO_IR 192" }').apply(french)
    encoded = encode_dataset(french, syntax)
    assert name.encode() in encoded and name.encode("latin-1") not in encoded
    french.file_meta = pydicom.dcmread(source).file_meta
    french.save_as(tmp_path / "utf8.dcm", enforce_file_format=True)
    dump = dcmtk.run("dcmdump", "+U8", tmp_path / "utf8.dcm")
    assert dump.returncode == 0 and f"[{name}]" in dump.stdout, dump.stdout + dump.stderr
    ascii_only = dataset(SpecificCharacterSet="ISO_IR 100", PatientName="Doe^John")
    _changes('set = { SpecificCharacterSet = "ISO_IR 144", '
             'StudyDescription = "Москва" }').apply(ascii_only)
    assert "Москва".encode("iso8859_5") in encode_dataset(ascii_only, syntax)


@pytest.mark.parametrize(("file", "change", "why"), [
    ("chrFren.dcm", 'remove = ["SpecificCharacterSet"]', "'(removed)': PatientName"),
    ("chrRuss.dcm", 'set = { SpecificCharacterSet = "ISO_IR 100" }',
     "'ISO_IR 100': PatientName"),
])
def test_a_character_set_that_cannot_hold_the_text_is_a_change_not_made(
        file: str, change: str, why: str) -> None:
    ds = pydicom.dcmread(CHARSETS / file)
    with pytest.raises(ChangeNotMade, match=re.escape(why)):
        _changes(change).apply(ds)
    assert _changes(change).problem(pydicom.dcmread(CHARSETS / file)) is not None
