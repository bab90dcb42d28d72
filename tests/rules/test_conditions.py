"""Conditions: every operator, combinator and association test, one row each."""

from __future__ import annotations

import datetime as dt
import re

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from rules import AssociationInfo
from rules.conditions import (
    Values,
    canonical_da,
    canonical_dt,
    canonical_tm,
    exponential_risk,
    wildcard_matcher,
)
from tests.rules.support import ASSOC, CT_SMALL, NOW, dataset, matches, one_rule, ruleset

CT = dataset(Modality="CT", StudyDescription="Chest PA", SeriesNumber=3, PatientName="Doe^John",
             StudyDate="20240115", StudyTime="073000", SliceThickness="1.50",
             ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], AccessionNumber="",
             PatientAge="045Y", Rows=512)

# (condition lines, expected) against CT above.
ATTRIBUTE_CASES = [
    # bare values
    ('Modality = "CT"', True),
    ('Modality = "MR"', False),
    ('Modality = "C*"', True),                      # wildcard when * or ? is in it
    ('Modality = "?T"', True),
    ('Modality = "c*"', False),                     # wildcards are case-sensitive
    ('Modality = "C"', False),                      # equality is whole-value
    ('SeriesNumber = 3', True),                     # integer: numeric equality
    ('SeriesNumber = 3.0', True),
    ('SeriesNumber = 4', False),
    ('SeriesNumber = "3"', True),                   # string equality with the text
    ('SliceThickness = 1.5', True),                 # DS "1.50" is 1.5
    ('SliceThickness = "1.5"', False),              # ... but its text is "1.50"
    ('Rows = 512', True),                           # US
    ('Modality = 3', False),                        # a number never equals text
    ('Modality = ["MR", "CT"]', True),              # list: any of
    ('Modality = ["MR", "P*"]', False),
    ('Modality = ["MR", "C?"]', True),
    ('SeriesNumber = [1, 2, 3]', True),
    ('StudyDate = 2024-01-15', True),               # TOML date: DA text
    ('PatientName = "Doe^John"', True),             # PN compared as its text
    ('PatientName = "Doe^*"', True),
    ('AccessionNumber = ""', True),                 # empty: present, value ""
    ('PatientID = ""', False),                      # missing: not equal to anything
    # equals
    ('Modality = { equals = "CT" }', True),
    ('StudyDescription = { equals = "Chest*" }', False),  # literal: no wildcard in equals
    ('SeriesNumber = { equals = 3 }', True),
    # wildcard
    ('StudyDescription = { wildcard = "Chest*" }', True),
    ('StudyDescription = { wildcard = "*PA" }', True),
    ('StudyDescription = { wildcard = "Chest" }', False),
    ('StudyDescription = { wildcard = "Chest?PA" }', True),
    ('StudyDescription = { wildcard = "Chest.PA" }', False),  # "." is literal
    # regex (re.search)
    ('StudyDescription = { regex = "(?i)^chest" }', True),
    ('StudyDescription = { regex = "^chest" }', False),
    ('StudyDescription = { regex = "PA$" }', True),
    ('StudyDescription = { regex = "est" }', True),  # search, not match
    # in
    ('Modality = { in = ["MR", "CT"] }', True),
    ('Modality = { in = ["MR", "PT"] }', False),
    ('Modality = { in = ["M*", "C?"] }', True),
    ('SeriesNumber = { in = [1, 3] }', True),
    # min / max: numbers
    ('SeriesNumber = { min = 3 }', True),
    ('SeriesNumber = { min = 4 }', False),
    ('SeriesNumber = { max = 3 }', True),
    ('SeriesNumber = { max = 2.5 }', False),
    ('SeriesNumber = { min = 1, max = 5 }', True),
    ('SliceThickness = { min = 1.0, max = 2.0 }', True),
    ('SliceThickness = { min = 1.51 }', False),
    ('Rows = { min = 256, max = 1024 }', True),
    # min / max: dates (TOML dates or DICOM strings), times
    ('StudyDate = { min = 2024-01-01, max = 2024-12-31 }', True),
    ('StudyDate = { min = "20240116" }', False),
    ('StudyDate = { max = "20240115" }', True),     # inclusive
    ('StudyDate = { min = "2024.01.15" }', True),   # ACR-NEMA form
    ('StudyTime = { min = "07:00", max = "08:00" }', True),
    ('StudyTime = { min = 07:30:00 }', True),
    ('StudyTime = { max = "0729" }', False),
    ('StudyTime = { min = "0730" }', True),          # 0730 is 07:30:00.000000
    # min / max: strings on text attributes
    ('PatientAge = { min = "040Y", max = "050Y" }', True),
    # present
    ('Modality = { present = true }', True),
    ('Modality = { present = false }', False),
    ('PatientID = { present = true }', False),
    ('PatientID = { present = false }', True),
    ('AccessionNumber = { present = true }', True),  # empty counts as present
    # a missing attribute fails every other operator
    ('PatientID = { regex = ".*" }', False),
    ('PatientID = { wildcard = "*" }', False),
    ('PatientID = { min = 0 }', False),
    ('PatientID = { in = ["", "x"] }', False),
    # by tag, in every spelling
    ('"(0008,0060)" = "CT"', True),
    ('"0008,0060" = "CT"', True),
    ('"00080060" = "CT"', True),
    ('"(0008,0060)" = { wildcard = "M*" }', False),
]


@pytest.mark.parametrize(("when", "expected"), ATTRIBUTE_CASES)
def test_attribute_operators(when: str, expected: bool) -> None:
    assert matches(when, CT) is expected


# ImageType is ORIGINAL\PRIMARY\AXIAL.
MULTI_VALUED_CASES = [
    ('ImageType = "ORIGINAL"', True),                      # any single value
    ('ImageType = "AXIAL"', True),
    ('ImageType = "ORIGINAL\\\\PRIMARY\\\\AXIAL"', True),  # the whole value
    ('ImageType = "ORIGINAL\\\\PRIMARY"', False),          # neither whole nor one value
    ('ImageType = "*PRIMARY*"', True),                     # wildcard on the whole
    ('ImageType = "DERIVED"', False),
    ('ImageType = { regex = "^AX" }', True),               # regex on a single value
    ('ImageType = { regex = "PRIMARY\\\\\\\\AXIAL$" }', True),  # ... or on the whole
    ('ImageType = { in = ["DERIVED", "AXIAL"] }', True),
]


@pytest.mark.parametrize(("when", "expected"), MULTI_VALUED_CASES)
def test_multi_valued(when: str, expected: bool) -> None:
    assert matches(when, CT) is expected


def test_multi_valued_numbers_and_ranges() -> None:
    ds = dataset(WindowCenter=["40", "400"], ReferencedFrameNumber=[1, 5, 9])
    assert matches("WindowCenter = 400", ds)
    assert matches("WindowCenter = { min = 100 }", ds)
    assert not matches("WindowCenter = { min = 500 }", ds)
    assert matches("ReferencedFrameNumber = { min = 4, max = 6 }", ds)
    assert not matches("ReferencedFrameNumber = { min = 6, max = 8 }", ds)


def test_trailing_spaces_and_nuls_are_not_significant() -> None:
    ds = Dataset()
    ds.add_new(0x00080060, "CS", "CT ")
    ds.add_new(0x00081030, "LO", "Head\x00")
    assert matches('Modality = "CT"', ds)
    assert matches('StudyDescription = "Head"', ds)


def test_empty_value_is_present_and_equals_empty_string() -> None:
    ds = Dataset()
    ds.add_new(0x00100020, "LO", None)
    assert matches('PatientID = { present = true }', ds)
    assert matches('PatientID = ""', ds)
    assert not matches('PatientID = "x"', ds)
    assert not matches('PatientID = { min = 0 }', ds)


def test_sequences_can_be_tested_for_presence() -> None:
    ds = Dataset()
    ds.ReferencedSeriesSequence = [Dataset()]
    assert matches("ReferencedSeriesSequence = { present = true }", ds)
    assert not matches("ReferencedSeriesSequence = { present = false }", ds)


def test_private_tags() -> None:
    ds = Dataset()
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "secret")
    block.add_new(0x02, "US", 7)
    assert matches('"(0009,1001)" = "secret"', ds)
    assert matches('"(0009,0010)" = "ACME*"', ds)             # the private creator
    assert matches('"00091002" = 7', ds)
    assert matches('"(0009,1003)" = { present = false }', ds)
    assert not matches('"(0009,1001)" = "other"', ds)


def test_private_tag_read_as_unknown_vr() -> None:
    ds = Dataset()
    ds.add_new(0x00111001, "UN", b"AB\\CD ")
    assert matches('"(0011,1001)" = "CD"', ds)
    assert matches('"(0011,1001)" = "AB\\\\CD"', ds)


@pytest.mark.parametrize("value", ["20231301", "20230231", "00000000"])
def test_a_date_not_in_the_calendar_is_in_no_range(value: str) -> None:
    """PS3.5 Table 6.2-1: its digits fell between the bounds (an outside campaign)."""
    ds = dataset(StudyDate=value)
    assert not matches('StudyDate = { min = 2023-01-01, max = 2024-03-01 }', ds)
    assert not matches('StudyDate = { max = 2099-12-31 }', ds)
    assert matches(f'StudyDate = "{value}"', ds)  # its text is still its text


def test_a_real_file() -> None:
    ds = pydicom.dcmread(CT_SMALL)
    assert matches('Modality = "CT"\nPatientName = "CompressedSamples^CT1"', ds)
    assert matches('"(0009,0010)" = "GEMS_IDEN_01"', ds)
    assert matches('ImageType = "AXIAL"\nRows = { min = 128, max = 128 }', ds)
    assert matches('StudyDate = { min = 2004-01-01, max = 2004-12-31 }', ds)
    assert not matches('Modality = "MR"', ds)


# ----------------------------------------------------------- combinators

COMBINATOR_CASES = [
    ('all = [ { Modality = "CT" }, { SeriesNumber = 3 } ]', True),
    ('all = [ { Modality = "CT" }, { SeriesNumber = 4 } ]', False),
    ('any = [ { Modality = "MR" }, { SeriesNumber = 3 } ]', True),
    ('any = [ { Modality = "MR" }, { SeriesNumber = 4 } ]', False),
    ('not = { Modality = "MR" }', True),
    ('not = { Modality = "CT" }', False),
    ('not = { Modality = "CT", SeriesNumber = 4 }', True),   # a table is an implicit all
    ('any = [ { Modality = "MR" }, { not = { BodyPartExamined = "HEAD" } } ]', True),
    ('any = [ { all = [ { Modality = "CT" }, { not = { SeriesNumber = 3 } } ] }, '
     '{ calling_ae = "MR*" } ]', False),
    ('any = [ { calling_ae = "XX" }, { peer = "10.0.0.0/8" } ]', True),  # association inside
    ('Modality = "CT"\nnot = { any = [ { SeriesNumber = 1 }, { SeriesNumber = 2 } ] }', True),
]


@pytest.mark.parametrize(("when", "expected"), COMBINATOR_CASES)
def test_combinators(when: str, expected: bool) -> None:
    assert matches(when, CT) is expected


def test_no_conditions_always_match() -> None:
    assert matches("", Dataset())
    rs = ruleset('[[rule]]\nname = "all"\nthen.drop = true\n')
    assert rs.evaluate(ASSOC, Dataset(), NOW).outcome == "drop"
    assert not rs.needs_dataset


# ----------------------------------------------------------- association


def _assoc(calling: str = "CT1", called: str = "DICOM-ROUTER",
           peer: str = "10.1.2.3") -> AssociationInfo:
    return AssociationInfo(calling_ae=calling, called_ae=called, peer=peer)


ASSOCIATION_CASES = [
    ('calling_ae = "CT1"', _assoc(), True),
    ('calling_ae = "CT1"', _assoc(calling="CT1   "), True),   # padding is not significant
    ('calling_ae = "CT1"', _assoc(calling="CT2"), False),
    ('calling_ae = "CT*"', _assoc(calling="CT2"), True),
    ('calling_ae = "CT?"', _assoc(calling="CT12"), False),
    ('calling_ae = "ct*"', _assoc(), False),                  # case-sensitive
    ('calling_ae = ["MR1", "CT*"]', _assoc(), True),
    ('calling_ae = ["MR1", "PT*"]', _assoc(), False),
    ('called_ae = "DICOM-ROUTER"', _assoc(), True),
    ('called_ae = ["ROUTER", "ARCHIVE"]', _assoc(called="ARCHIVE"), True),
    ('called_ae = ["ROUTER", "ARCHIVE"]', _assoc(), False),
    ('peer = "10.1.2.3"', _assoc(), True),
    ('peer = "10.0.0.0/8"', _assoc(), True),
    ('peer = "10.0.0.0/8"', _assoc(peer="11.0.0.1"), False),
    ('peer = ["192.168.1.7", "10.1.0.0/16"]', _assoc(), True),
    ('peer = ["192.168.1.7", "10.2.0.0/16"]', _assoc(), False),
    ('peer = "10.0.0.0/8"', _assoc(peer="::ffff:10.9.9.9"), True),  # IPv4-mapped
    # Written IPv4-mapped in the rule: it never matched (an outside campaign).
    ('peer = "::ffff:10.1.2.3"', _assoc(), True),
    ('peer = "::ffff:10.1.2.3"', _assoc(peer="::ffff:10.1.2.3"), True),
    ('peer = "::ffff:10.0.0.0/104"', _assoc(), True),
    ('peer = "::ffff:10.0.0.0/104"', _assoc(peer="11.0.0.1"), False),
    ('peer = "fd00::/8"', _assoc(peer="fd00::17"), True),
    ('peer = "fd00::/8"', _assoc(peer="10.1.2.3"), False),
    ('peer = "::1"', _assoc(peer="::1"), True),
    ('peer = "10.0.0.0/8"', _assoc(peer="not an address"), False),
    ('calling_ae = "CT*"\ncalled_ae = "DICOM-*"\npeer = "10.0.0.0/8"', _assoc(), True),
]


@pytest.mark.parametrize(("when", "assoc", "expected"), ASSOCIATION_CASES)
def test_association(when: str, assoc: AssociationInfo, expected: bool) -> None:
    assert matches(when, assoc=assoc) is expected


# ---------------------------------------------------------- time windows

WED = dt.date(2026, 11, 25)


def _at(day_offset: int, hh: int, mm: int = 0, ss: int = 0) -> dt.datetime:
    """Wednesday 2026-11-25 plus ``day_offset`` days, at hh:mm:ss."""
    return dt.datetime.combine(WED + dt.timedelta(days=day_offset), dt.time(hh, mm, ss))


TIME_CASES = [
    # day-time window, weekdays
    ('time = { days = ["mon", "tue", "wed", "thu", "fri"], from = "07:00", to = "19:00" }',
     _at(0, 14), True),
    ('time = { days = ["mon", "tue", "wed", "thu", "fri"], from = "07:00", to = "19:00" }',
     _at(3, 14), False),                               # Saturday
    ('time = { from = "07:00", to = "19:00" }', _at(0, 7), True),       # from is inclusive
    ('time = { from = "07:00", to = "19:00" }', _at(0, 6, 59, 59), False),
    ('time = { from = "07:00", to = "19:00" }', _at(0, 19), False),     # to is exclusive
    ('time = { from = "07:00", to = "19:00" }', _at(0, 18, 59, 59), True),
    ('time = { from = 07:00:00, to = 19:00:00 }', _at(0, 12), True),   # TOML times
    ('time = { from = "07:00:30", to = "07:00:40" }', _at(0, 7, 0, 35), True),
    ('time = { from = "20:00", to = "24:00" }', _at(0, 23, 59, 59), True),
    # spanning midnight
    ('time = { from = "22:00", to = "06:00" }', _at(0, 23), True),
    ('time = { from = "22:00", to = "06:00" }', _at(0, 3), True),
    ('time = { from = "22:00", to = "06:00" }', _at(0, 6), False),
    ('time = { from = "22:00", to = "06:00" }', _at(0, 12), False),
    # ... with days: the window belongs to the day it starts on
    ('time = { days = ["fri"], from = "22:00", to = "06:00" }', _at(2, 23), True),   # Fri 23:00
    ('time = { days = ["fri"], from = "22:00", to = "06:00" }', _at(3, 5), True),    # Sat 05:00
    ('time = { days = ["fri"], from = "22:00", to = "06:00" }', _at(2, 5), False),   # Fri 05:00
    ('time = { days = ["fri"], from = "22:00", to = "06:00" }', _at(3, 23), False),  # Sat 23:00
    # days alone
    ('time = { days = ["sat", "sun"] }', _at(4, 12), True),                           # Sunday
    ('time = { days = ["Saturday", "SUN"] }', _at(3, 0), True),
    ('time = { days = ["sat", "sun"] }', _at(5, 0), False),                           # Monday
]


@pytest.mark.parametrize(("when", "now", "expected"), TIME_CASES)
def test_time_windows(when: str, now: dt.datetime, expected: bool) -> None:
    assert matches(when, now=now) is expected


# ------------------------------------------------------------- explain

def test_explain_gives_a_reason_per_leaf() -> None:
    text = one_rule('calling_ae = "CT*"\nModality = "MR"\n'
                    'StudyDescription = { regex = "(?i)^chest" }\nPatientID = { present = true }\n'
                    'any = [ { SeriesNumber = { min = 5 } }, { not = { Modality = "PT" } } ]\n'
                    'peer = "10.0.0.0/8"\ntime = { days = ["wed"], from = "07:00", to = "19:00" }')
    decision, traces = ruleset(text).explain(ASSOC, CT, NOW)
    assert decision.outcome == "unmatched"
    assert traces[0].matched is False
    assert traces[0].reasons == (
        "calling AE 'CT1' matches 'CT*'",
        "Modality 'CT' does not equal 'MR'",
        "StudyDescription 'Chest PA' matches regex '(?i)^chest'",
        "PatientID is missing (the test was: present = true)",
        "any of 2: 1 held",
        "  SeriesNumber '3' is less than 5",
        "  not: holds (the condition below did not)",
        "    Modality 'CT' does not equal 'PT'",
        "peer 10.1.2.3 is in 10.0.0.0/8",
        "time wed 14:00:00 is within wed 07:00-19:00",
    )


# ------------------------------------------------------ value plumbing

@pytest.mark.parametrize(("pattern", "text", "expected"), [
    ("CT*", "CT", True), ("CT*", "CT1", True), ("*", "", True), ("?", "", False),
    ("a?c", "abc", True), ("a?c", "ac", False), ("a*c", "abbbc", True), ("a.c", "abc", False),
    ("(x)", "(x)", True), ("a**b", "ab", True), ("A", "a", False),
])
def test_wildcards_per_ps3_4_c_2_2_2_4(pattern: str, text: str, expected: bool) -> None:
    assert wildcard_matcher(pattern)(text) is expected


@given(st.text("ab?*", max_size=8), st.text("ab", max_size=10))
def test_wildcards_agree_with_a_regex_on_any_pattern(pattern: str, text: str) -> None:
    """The linear matcher against the straightforward regex translation."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    assert wildcard_matcher(pattern)(text) is (re.fullmatch(regex, text, re.DOTALL) is not None)


def test_a_hostile_value_against_many_stars_takes_no_time() -> None:
    """*a*a*a*a*a*a*a*a*b on 64 characters took over a minute as a regex; the
    matcher does it in a pass (counted in steps, not timed: a pass over the text
    per piece at most)."""
    pattern = "*a" * 8 + "*b"
    assert wildcard_matcher(pattern)("a" * 64) is False
    assert wildcard_matcher(pattern)("a" * 64 + "b") is True
    assert wildcard_matcher("*a?a*")("x" * 10_000 + "aba") is True


@pytest.mark.parametrize(("pattern", "risky"), [
    ("^(a+)+$", True), ("(a*)*", True), (r"(\w+\s?)*$", True), ("(x|y+)+", True),
    ("(?:ab{2,})+", True), ("^a+$", False), ("(?i)^chest", False), ("(ab)+", False),
    ("(a{1})+", False), ("(a++)+", False), ("(?>a+)+", False), ("^(?=a+)b", False),
    # Past the repeat-in-a-repeat check (an outside campaign): each stalled a worker
    # until the supervisor killed it, with some 40 characters of value.
    ("(a|a)*$", True), ("(?:a|a?)+$", True), ("(a?){25}a{25}", True), ("(a|ab)*c", True),
    ("(?i)(ct|CT)+", True),
    # Alternatives that each start with a character of their own, and character sets.
    ("(CT|MR)+$", False), ("^(CHEST|CHIN)+$", False), (r"(\d|x)+", False),
    ("(?>a|a)*", False), ("(a|a)++", False),
    # What is inside an atomic group, a possessive repeat or a conditional still
    # backtracks while it matches (a review of this check).
    ("(?>(a|a)*$)", True), ("(?:(a|a)*$)++", True), ("(a)?(?(1)(a|a)*$|b)", True),
    # A repeat inside a repeat is safe when the next character must be one it cannot
    # take, or when its count is fixed: UIDs, words, dates were refused.
    (r"^(\d+\.)*\d+$", False), (r"^1\.2\.840\.(\d+\.)+\d+$", False), (r"(\w+\s)*$", False),
    (r"([^.]+\.)+$", False), (r"([A-Z0-9]+-)+$", False), (r"(\d*\.)*$", False),
    (r"(\d{2}){3}", False), (r"(a?b)*$", False), (r"([^\s]+\s)*$", False),
    # ... and not when it could take the next character, or nothing comes next.
    (r"(\d+\d)*$", True), (r"(\w+\.?)*$", True), (r"(\w+[.\d])*$", True),
    (r"(?i)(a+A)*$", True), (r"(\d+\.\d+)*$", True), (r"(.+\.)*$", True),
    (r"([^a]+b)*$", True), (r"(\D+1)*$", False), (r"(\S+\s)*$", False), (r"(\s+\S)*$", True),
    (r"((a+){2})*$", True), (r"(\d{2,3}){3}", True),
])
def test_regexes_that_can_take_exponential_time_are_told(pattern: str, risky: bool) -> None:
    assert (exponential_risk(pattern) is not None) is risky


@pytest.mark.parametrize(("func", "text", "expected"), [
    (canonical_da, "20240115", "20240115"), (canonical_da, "2024.01.15", "20240115"),
    (canonical_da, "2024-01-15", "20240115"), (canonical_da, "202401", None),
    (canonical_tm, "07", "070000.000000"), (canonical_tm, "0730", "073000.000000"),
    (canonical_tm, "07:30:15.5", "073015.500000"), (canonical_tm, "25", None),
    (canonical_dt, "2024", "20240101000000.000000"),
    (canonical_dt, "20240115073000.1+0100", "20240115073000.100000"),
    (canonical_dt, "20240", None),
    # PS3.5 Table 6.2-1: a DA is a valid date; digits alone are not (an outside campaign:
    # 20231301 and 20230231 fell inside date ranges).
    (canonical_da, "20231301", None), (canonical_da, "20230231", None),
    (canonical_da, "20240229", "20240229"), (canonical_da, "20230229", None),
    (canonical_da, "00000000", None), (canonical_dt, "202313", None),
    (canonical_dt, "20230231", None), (canonical_dt, "2023010124", None),
    (canonical_dt, "202301012360", None), (canonical_dt, "20231231235960", "20231231235960.000000"),
])
def test_canonical_temporal_forms(func: object, text: str, expected: str | None) -> None:
    assert func(text) == expected  # type: ignore[operator]


def test_values_of_each_kind() -> None:
    assert Values.of("CT ", "CS").texts == ("CT",)
    assert Values.of(None, "LO").texts == ("",)
    assert Values.of(["A", "B"], "CS").texts == ("A\\B", "A", "B")
    assert Values.of([], "CS").texts == ("",)
    assert Values.of(b"12\\34\x00", "UN").numbers == (12.0, 34.0)
    assert Values.of([Dataset()], "SQ").texts == ()


def test_an_element_that_cannot_be_decoded_is_present_and_matches_nothing() -> None:
    class Broken(Dataset):
        def get(self, key: object, default: object = None) -> object:  # type: ignore[override]
            raise ValueError("corrupt")

    ds = Broken()
    assert matches("Modality = { present = true }", ds)
    assert not matches('Modality = { regex = "" }', ds)
    _, traces = ruleset(one_rule('Modality = "CT"')).explain(ASSOC, ds, NOW)
    assert traces[0].reasons == ("Modality (cannot be decoded) does not equal 'CT'",)
