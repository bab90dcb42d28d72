"""Attribute changes: each operation, VRs, per-destination selection."""

from __future__ import annotations

import copy
import io

import pydicom
import pytest
from pydicom.dataset import Dataset

from rules import ChangeNotMade, Changes, Decision, RemoveOp, SetOp
from tests.rules.support import ASSOC, CT_SMALL, NOW, TEST_FILES, dataset, ruleset


def _changes(change: str, *, forward: str = '"pacs"') -> Changes:
    """The changes for the first destination of a rule with this change table."""
    text = (f'[[rule]]\nname = "r"\n[rule.then]\nforward = {forward}\n'
            f"[[rule.then.change]]\n{change}\n")
    decision = ruleset(text).evaluate(ASSOC, Dataset(), NOW)
    return decision.forwards[0].changes


def _applied(change: str, ds: Dataset) -> Dataset:
    out = copy.deepcopy(ds)
    _changes(change).apply(out)
    return out


BASE = dataset(PatientName="Doe^John", PatientID="123", PatientBirthDate="19700101",
               AccessionNumber="A42", Modality="CT", SeriesNumber=3,
               ImageType=["ORIGINAL", "PRIMARY"], OtherPatientIDs="old")


@pytest.mark.parametrize(("change", "keyword", "value", "vr"), [
    ('set = { PatientName = "ANON" }', "PatientName", "ANON", "PN"),
    ('set = { PatientID = "" }', "PatientID", "", "LO"),
    ('set = { StudyDescription = "new" }', "StudyDescription", "new", "LO"),   # created
    ('set = { SeriesNumber = 7 }', "SeriesNumber", 7, "IS"),
    ('set = { SeriesNumber = "8" }', "SeriesNumber", 8, "IS"),
    ('set = { SliceThickness = 2.5 }', "SliceThickness", 2.5, "DS"),
    ('set = { Rows = 256 }', "Rows", 256, "US"),
    ('set = { ImageType = ["DERIVED", "SECONDARY"] }', "ImageType", ["DERIVED", "SECONDARY"],
     "CS"),
    ('set = { StudyDate = 2024-01-31 }', "StudyDate", "20240131", "DA"),
    ('set = { StudyTime = "073000" }', "StudyTime", "073000", "TM"),
    ('set = { "(0010,0020)" = "by-tag" }', "PatientID", "by-tag", "LO"),
])
def test_set(change: str, keyword: str, value: object, vr: str) -> None:
    ds = _applied(change, BASE)
    element = ds[keyword]
    assert (element.VR, element.value) == (vr, value)


def test_set_private_tags() -> None:
    ds = Dataset()
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x02, "US", 7)
    changes = _changes('set = { "(0009,1001)" = "x", "(0009,1002)" = 9, '
                       '"(0009,1003)" = { vr = "SH", value = "short" }, "(0009,1004)" = 5 }')
    changes.apply(ds)
    assert (ds[0x00091001].VR, ds[0x00091001].value) == ("LO", "x")      # new: LO
    assert (ds[0x00091002].VR, ds[0x00091002].value) == ("US", 9)        # existing VR kept
    assert (ds[0x00091003].VR, ds[0x00091003].value) == ("SH", "short")  # VR given
    assert (ds[0x00091004].VR, ds[0x00091004].value) == ("LO", "5")      # number as text


def test_set_private_keeps_existing_vr_only_if_the_value_fits() -> None:
    ds = Dataset()
    ds.add_new(0x00091002, "US", 7)
    _changes('set = { "(0009,1002)" = "not a number" }').apply(ds)
    assert (ds[0x00091002].VR, ds[0x00091002].value) == ("LO", "not a number")


def test_remove() -> None:
    ds = _applied('remove = ["PatientBirthDate", "(0010,1000)", "StudyDescription"]', BASE)
    assert "PatientBirthDate" not in ds
    assert "OtherPatientIDs" not in ds          # (0010,1000)
    assert "PatientName" in ds                  # untouched; absent StudyDescription is fine
    assert "PatientBirthDate" in BASE           # only the copy changed


def test_remove_single_string() -> None:
    assert "PatientID" not in _applied('remove = "PatientID"', BASE)


def test_copy() -> None:
    ds = _applied('copy = { OtherPatientIDs = "PatientID", StudyID = "SeriesNumber" }', BASE)
    assert (ds.OtherPatientIDs, ds["OtherPatientIDs"].VR) == ("123", "LO")
    assert (ds.StudyID, ds["StudyID"].VR) == ("3", "SH")  # number into a text VR


def test_copy_from_missing_source_does_nothing() -> None:
    ds = _applied('copy = { OtherPatientIDs = "IssuerOfPatientID" }', BASE)
    assert ds.OtherPatientIDs == "old"


def test_copy_text_into_number_when_it_reads_as_one() -> None:
    ds = dataset(PatientID="42", PatientName="x")
    _changes('copy = { SeriesNumber = "PatientID" }').apply(ds)
    assert ds.SeriesNumber == 42
    with pytest.raises(ChangeNotMade, match="copy of PatientName to InstanceNumber"):
        _changes('copy = { InstanceNumber = "PatientName" }').apply(ds)  # "x": no number
    _changes('copy = { InstanceNumber = "PatientName" }').apply(ds, strict=False)
    assert "InstanceNumber" not in ds  # not strict (query identifiers): nothing happens


def test_a_private_element_is_not_made_where_no_creator_reserves_its_block() -> None:
    """A rule setting (0029,1002) wrote it into every instance, also those of other
    vendors, with no (0029,0010) Private Creator: a data element nobody owns (PS3.5
    7.8.1; an outside campaign, MR_small and others). Made only where the block is
    reserved; one already there is changed all the same (a pseudonymisation)."""
    change = _changes('set = { "(0029,1002)" = "newtext" }\n'
                      'copy = { "(0029,1003)" = "PatientID" }')
    bare = dataset(PatientID="123")
    change.apply(bare)
    assert 0x00291002 not in bare and 0x00291003 not in bare
    reserved = dataset(PatientID="123")
    reserved.private_block(0x0029, "SITE 1.0", create=True)
    change.apply(reserved)
    assert (reserved[0x00291002].value, reserved[0x00291003].value) == ("newtext", "123")
    orphan = dataset(PatientID="123")
    orphan.add_new(0x00291002, "LO", "Doe^John")  # malformed as received: still changed
    change.apply(orphan)
    assert orphan[0x00291002].value == "newtext" and 0x00291003 not in orphan


@pytest.mark.parametrize(("target", "raw", "charset", "expected"), [
    ("PatientComments", b"1.5\\-2", None, "1.5\\-2"),       # LT: one value, backslash kept
    ("OtherPatientIDs", b"AB\\CD ", None, ["AB", "CD"]),     # LO: values split
    ("SeriesNumber", b"42", None, 42),                       # IS: the number read
    ("PatientName", "Müller^Jo".encode(), "ISO_IR 192", "Müller^Jo"),
    ("PatientName", "Müller^Jo".encode("latin-1"), "ISO_IR 100", "Müller^Jo"),
])
def test_copy_from_a_private_element_received_in_implicit_vr(
        target: str, raw: bytes, charset: str | None, expected: object) -> None:
    """In Implicit VR a private element's VR is not in the data set: it is UN, bytes.
    The copy gave nothing from it ("not a LT value") where the same instance sent in
    Explicit VR gave the text (an outside campaign)."""
    results = []
    for vr, value in (("UN", raw), ("LO" if target != "PatientComments" else "LT",
                                    raw.decode("utf-8" if charset == "ISO_IR 192" else
                                               "latin-1").rstrip(" "))):
        ds = dataset()
        if charset:
            ds.SpecificCharacterSet = charset
        ds.add_new(0x00090010, "LO", "SITE")
        ds.add_new(0x00091003, vr, value)
        _changes(f'copy = {{ {target} = "(0009,1003)" }}').apply(ds)
        got = ds[target].value
        results.append(list(got) if isinstance(got, pydicom.multival.MultiValue)
                       else str(got) if isinstance(got, pydicom.valuerep.PersonName) else got)
    assert results == [expected, expected]  # as received in Implicit VR, and in Explicit


def test_copy_multi_valued() -> None:
    ds = _applied('copy = { OtherPatientIDs = "ImageType" }', BASE)
    assert list(ds.OtherPatientIDs) == ["ORIGINAL", "PRIMARY"]


def test_replace() -> None:
    ds = _applied('replace = { AccessionNumber = { pattern = "^A(\\\\d+)", with = "B\\\\1" } }',
                  BASE)
    assert ds.AccessionNumber == "B42"


def test_replace_each_value_and_named_groups() -> None:
    ds = _applied("replace = { ImageType = { pattern = '^(?P<first>.)', with = 'X\\g<first>' } }",
                  BASE)
    assert list(ds.ImageType) == ["XORIGINAL", "XPRIMARY"]


def test_replace_skips_missing_and_keeps_numbers_numbers() -> None:
    ds = _applied('replace = { StudyDescription = { pattern = ".*", with = "x" }, '
                  'SeriesNumber = { pattern = "3", with = "30" } }', BASE)
    assert "StudyDescription" not in ds
    assert ds.SeriesNumber == 30


def test_replace_leaves_an_empty_attribute_empty() -> None:
    """An empty attribute has no value (VM 0, PS3.5 6.4) to replace in: '^(.*)$' made
    'R:' of an empty StudyDescription (an outside interop campaign)."""
    base = dataset()
    base.StudyDescription = ""
    base.OtherPatientIDs = ["A1", ""]
    ds = _applied("replace = { StudyDescription = { pattern = '^(.*)$', with = 'R:\\1' }, "
                  "OtherPatientIDs = { pattern = '^(.*)$', with = 'R:\\1' } }", base)
    assert ds.StudyDescription == ""
    assert list(ds.OtherPatientIDs) == ["R:A1", "R:"]  # a value that is there, empty


def test_a_date_given_with_dashes_is_written_as_dicom_writes_it() -> None:
    ds = _applied('set = { StudyDate = "2024-01-31" }', dataset())
    assert ds.StudyDate == "20240131"


@pytest.mark.parametrize(("change", "source", "said"), [
    ('copy = { ContentDate = "PatientName" }', {"PatientName": "CompressedSamples^CT1"},
     "change not made: copy of PatientName to ContentDate would be "
     "'CompressedSamples^CT1': at most 8 characters"),
    ('copy = { PatientID = "ImageComments" }', {"ImageComments": "x" * 200},
     "change not made: copy of ImageComments to PatientID would be 'xxx"),
    ('replace = { AccessionNumber = { pattern = "^", with = "SITEA-" } }',
     {"AccessionNumber": "RIS2024000123"},
     "change not made: replace in AccessionNumber would be 'SITEA-RIS2024000123': at "
     "most 16 characters"),
])
def test_a_value_that_cannot_take_the_targets_vr_is_a_change_not_made(
        caplog: pytest.LogCaptureFixture, change: str, source: dict[str, str],
        said: str) -> None:
    """An outside campaign: copy and replace wrote "CompressedSamples^CT1" as a date and
    200 characters into a 64-character LO. Then the target was left as it was, with a
    line, and the copy went out: a pseudonym too long for LO sent the identifier itself
    (another campaign). Now the change is not made: ChangeNotMade says why (the store
    path keeps that copy as a dead letter, workers/routing.py), and ``problem`` says it
    before anything is changed. Not strict (query identifiers), it is logged."""
    before = dataset(**{"ContentDate": "20240101", "PatientID": "P1", **source})
    changes = _changes(change)
    problem = changes.problem(before)
    assert problem is not None and problem.startswith(said.removeprefix("change not made: "))
    trial = copy.deepcopy(before)
    with pytest.raises(ChangeNotMade) as raised:
        changes.apply(trial)
    assert str(raised.value).startswith(said.removeprefix("change not made: "))
    with caplog.at_level("WARNING", logger="rules.changes"):
        after = copy.deepcopy(before)
        changes.apply(after, strict=False)
    target = next(t for t in ("ContentDate", "PatientID", "AccessionNumber")
                  if f"{t} =" in change)
    assert after.get(target) == before.get(target)
    [line] = [r.getMessage() for r in caplog.records if r.name == "rules.changes"]
    assert line.startswith(said), line


def test_operations_apply_in_order() -> None:
    change = ('set = { PatientID = "new" }\ncopy = { OtherPatientIDs = "PatientID" }\n'
              'remove = "PatientID"')
    ds = _applied(change, BASE)
    assert ds.OtherPatientIDs == "new"
    assert "PatientID" not in ds


def test_describe_and_bool() -> None:
    changes = _changes('set = { PatientName = "ANON", '
                       '"(0009,1001)" = { vr = "LO", value = "x" } }\n'
                       'remove = ["PatientBirthDate"]\ncopy = { OtherPatientIDs = "PatientID" }\n'
                       "replace = { AccessionNumber = { pattern = '^A', with = 'B' } }")
    assert changes
    assert not Changes()
    assert changes.describe() == [
        "set PatientName = 'ANON'",
        "set (0009,1001) (LO) = 'x'",
        "remove PatientBirthDate",
        "copy PatientID to OtherPatientIDs",
        "replace in AccessionNumber '^A' with 'B'",
    ]
    assert isinstance(changes.operations[0], SetOp)
    assert isinstance(changes.operations[2], RemoveOp)


def _decision(text: str) -> Decision:
    return ruleset(text).evaluate(ASSOC, Dataset(), NOW)


def test_changes_per_destination() -> None:
    text = """
[[rule]]
name = "r"
then.forward = ["pacs", "ai"]
[[rule.then.change]]
set = { PatientName = "ALL" }
[[rule.then.change]]
destination = "ai"
remove = "PatientBirthDate"
[[rule.then.change]]
destination = "pacs"
set = { PatientID = "P" }
[[rule.then.change]]
set = { StudyID = "LAST" }
"""
    decision = _decision(text)
    by = {f.destination: f.changes.describe() for f in decision.forwards}
    assert by == {
        "pacs": ["set PatientName = 'ALL'", "set PatientID = 'P'", "set StudyID = 'LAST'"],
        "ai": ["set PatientName = 'ALL'", "remove PatientBirthDate", "set StudyID = 'LAST'"],
    }


def test_no_changes_is_an_empty_changes() -> None:
    decision = _decision('[[rule]]\nname = "r"\nthen.forward = ["a", "b"]\n')
    assert [bool(f.changes) for f in decision.forwards] == [False, False]


def test_changes_on_a_real_file() -> None:
    ds = pydicom.dcmread(CT_SMALL)
    _changes('set = { PatientName = "ANON" }\nremove = ["PatientID"]\n'
             'replace = { "(0009,0010)" = { pattern = "GEMS", with = "ACME" } }').apply(ds)
    assert ds.PatientName == "ANON"
    assert "PatientID" not in ds
    assert ds[0x00090010].value == "ACME_IDEN_01"


# --- Specific Character Set (PS3.5 §6.1) ------------------------------------------------


def _written(ds: Dataset) -> tuple[bytes, Dataset]:
    """``ds`` as pydicom writes it (how a changed copy leaves the router), and read back."""
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), pydicom.dcmread(io.BytesIO(out.getvalue()))


def test_a_value_outside_the_default_repertoire_turns_the_data_set_into_utf8() -> None:
    # No (0008,0005): ASCII only. pydicom alone would write Latin-1 bytes that every
    # reader decodes as something else.
    raw, back = _written(_applied('set = { PatientName = "Müller^Jürgen" }', BASE))
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert "Müller^Jürgen".encode() in raw and "Müller".encode("latin-1") not in raw
    assert back.PatientName == "Müller^Jürgen" and back.PatientID == "123"


def test_a_value_the_declared_set_holds_keeps_it() -> None:
    ds = dataset(SpecificCharacterSet="ISO_IR 100", PatientName="Doe^John")
    raw, back = _written(_applied('set = { StudyDescription = "Schädel" }', ds))
    assert back.SpecificCharacterSet == "ISO_IR 100"
    assert "Schädel".encode("latin-1") in raw and back.StudyDescription == "Schädel"


def test_ascii_values_add_no_character_set() -> None:
    ds = _applied('set = { PatientName = "ANON", StudyDescription = "Head" }', BASE)
    assert "SpecificCharacterSet" not in ds


def test_a_real_latin1_file_given_cyrillic_keeps_its_french_names() -> None:
    # chrFren.dcm is ISO_IR 100 with accented names; Cyrillic is not in Latin-1.
    ds = pydicom.dcmread(TEST_FILES.parent / "charset_files" / "chrFren.dcm")
    name = str(ds.PatientName)
    assert ds.SpecificCharacterSet == "ISO_IR 100" and not name.isascii()
    _changes('set = { StudyDescription = "Москва" }').apply(ds)
    raw, back = _written(ds)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == name and back.StudyDescription == "Москва"
    assert name.encode() in raw and name.encode("latin-1") not in raw


@pytest.mark.parametrize(("file", "change", "expected"), [
    ("chrFren.dcm", 'set = { PatientName = "Ёлкин^Иван" }', {"PatientName": "Ёлкин^Иван"}),
    ("chrRuss.dcm", 'set = { PatientName = "Müller^Jörg", OtherPatientNames = "山田^太郎" }',
     {"PatientName": "Müller^Jörg", "OtherPatientNames": "山田^太郎"}),
    ("chrH31.dcm", 'replace = { PatientName = { pattern = "^Y", with = "XY" } }\n'
                   'set = { InstitutionName = "Zürich" }',
     {"PatientName": "XYamada^Tarou=山田^太郎=やまだ^たろう", "InstitutionName": "Zürich"}),
])
@pytest.mark.filterwarnings("error::UserWarning")  # "Failed to encode ... iso8859" too
def test_person_names_written_by_a_change_survive_the_switch_to_utf8(
        file: str, change: str, expected: dict[str, str]) -> None:
    """An outside campaign: a Person Name a change wrote, when the data set had to
    become UTF-8, was first encoded in the old set ("Ёлкин^Иван" in ISO_IR 100 gave
    "?????^????"; the JIS name's ideographic groups "??^??"), silently, on the copy of
    one destination. Real files of pydicom's charset_files, written and read back."""
    ds = pydicom.dcmread(TEST_FILES.parent / "charset_files" / file)
    _changes(change).apply(ds)
    _, back = _written(ds)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert {k: str(back.get(k)) for k in expected} == expected


def test_replace_and_copy_are_fitted_too() -> None:
    ds = dataset(PatientName="Doe^John", StudyDescription="Kopf")
    changed = _applied('replace = { StudyDescription = { pattern = "Kopf", with = "Schädel" } }',
                       ds)
    assert changed.SpecificCharacterSet == "ISO_IR 192"
    nested = dataset(SpecificCharacterSet="ISO_IR 144", StudyDescription="Москва")
    copied = _applied('copy = { StudyDescription = "SeriesDescription" }', nested)
    assert copied.SpecificCharacterSet == "ISO_IR 144"  # the source's set holds it


def test_a_rule_that_sets_the_character_set_is_left_alone() -> None:
    ds = _applied('set = { SpecificCharacterSet = "ISO_IR 100", PatientName = "Müller" }', BASE)
    assert ds.SpecificCharacterSet == "ISO_IR 100"


def test_a_character_set_pydicom_does_not_know_is_converted() -> None:
    ds = dataset(SpecificCharacterSet="ISO_IR 999", PatientName="Doe^John")
    with pytest.warns(UserWarning, match="Unknown encoding 'ISO_IR 999'"):
        changed = _applied('set = { PatientName = "Müller" }', ds)
    assert changed.SpecificCharacterSet == "ISO_IR 192"
