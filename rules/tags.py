"""Attribute names in rule files: keywords and tags, their VRs and labels.

A rule names an attribute by its DICOM keyword (``Modality``) or by its tag in
one of three spellings (``"(0008,0060)"``, ``"0008,0060"``, ``"00080060"``);
private tags are allowed. :func:`resolve` turns either into an
:class:`Attribute` or raises :class:`NameProblem` with a sentence for the user.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_dict, keyword_for_tag

#: VRs whose values are text (PS3.5 6.2), compared as strings.
TEXT_VRS: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
#: VRs holding integers: binary ones and IS (integer string).
INTEGER_VRS: Final = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "IS"})
#: VRs holding real numbers: binary ones and DS (decimal string).
REAL_VRS: Final = frozenset({"FL", "FD", "DS"})
#: VRs compared numerically by ``min``/``max``.
NUMERIC_VRS: Final = INTEGER_VRS | REAL_VRS
#: VRs holding bytes (and AT, a tag list): never set from a rule file.
BINARY_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "AT"})
#: Every VR of PS3.5 Table 6.2-1.
ALL_VRS: Final = TEXT_VRS | NUMERIC_VRS | BINARY_VRS | {"SQ"}
#: Inclusive value ranges of the binary integer VRs (PS3.5 Table 6.2-1).
INTEGER_RANGES: Final = {
    "US": (0, 0xFFFF), "SS": (-0x8000, 0x7FFF),
    "UL": (0, 0xFFFF_FFFF), "SL": (-0x8000_0000, 0x7FFF_FFFF),
    "UV": (0, 2**64 - 1), "SV": (-(2**63), 2**63 - 1),
    "IS": (-(2**31), 2**31 - 1),
}

_TAG_FORMS: Final = (
    re.compile(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)"),
    re.compile(r"([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})"),
    re.compile(r"([0-9A-Fa-f]{4})([0-9A-Fa-f]{4})"),
)
# Something meant as a tag rather than a keyword: parentheses, a comma or only hex digits.
_LOOKS_LIKE_TAG: Final = re.compile(r"^\s*\(|,|^[0-9A-Fa-f]+$")


class NameProblem(ValueError):
    """A key that is neither a known keyword nor a well-formed tag; the text is
    a sentence for the user."""


@dataclass(frozen=True, slots=True)
class Attribute:
    """A data element a rule reads or changes.

    ``vr`` is the data dictionary's VR (the first one where the dictionary
    allows several, as ``US or SS``), None for private and unknown tags;
    ``vrs`` lists every VR the dictionary allows.
    """

    tag: int
    label: str
    vr: str | None
    vrs: tuple[str, ...]

    @property
    def is_private(self) -> bool:
        return bool((self.tag >> 16) & 1)

    @property
    def private_creator(self) -> int | None:
        return private_creator(self.tag)


def private_creator(tag: int) -> int | None:
    """The tag of the Private Creator element reserving the block of private
    element ``tag`` (PS3.5 7.8.1), or None for public and creator elements."""
    group, element = tag >> 16, tag & 0xFFFF
    if not group & 1 or element < 0x1000:
        return None
    return (group << 16) | (element >> 8)


def tag_text(tag: int) -> str:
    """``(gggg,eeee)`` in upper-case hexadecimal, as PS3.5 writes tags."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def resolve(key: str, *, others: Iterable[str] = ()) -> Attribute:
    """The attribute a rule-file key names: a keyword, or a tag as
    ``(gggg,eeee)``, ``gggg,eeee`` or ``ggggeeee``. ``others``: further
    words the key might have been meant as, for the did-you-mean hint."""
    tag = keyword_dict.get(key)
    if tag is None:
        tag = _parse_tag(key, others)
    group = tag >> 16
    if group in (0x0000, 0x0002) or group == 0xFFFE:
        what = {0x0000: "the command group (0000)",
                0x0002: "the file meta information (group 0002)",
                0xFFFE: "an item delimiter (group FFFE)"}[group]
        raise NameProblem(f"{key!r} is in {what}, which a C-STORE data set does not carry")
    return _attribute(tag)


def _parse_tag(key: str, others: Iterable[str]) -> int:
    text = key.strip()
    for form in _TAG_FORMS:
        m = form.fullmatch(text)
        if m:
            return (int(m.group(1), 16) << 16) | int(m.group(2), 16)
    hexed = re.fullmatch(r"0[xX]([0-9A-Fa-f]{8})", text)
    if hexed:  # as C and Python write it: said to be a keyword nobody knew
        digits = hexed.group(1).upper()
        raise NameProblem(f"malformed tag {key!r}: no 0x in rule files; did you mean "
                          f'"({digits[:4]},{digits[4:]})"?')
    if _LOOKS_LIKE_TAG.search(text):
        raise NameProblem(f"malformed tag {key!r}: expected (gggg,eeee), gggg,eeee or "
                          "ggggeeee in hexadecimal")
    raise NameProblem(f"unknown attribute keyword {key!r}{suggestion(key, others)}")


def _attribute(tag: int) -> Attribute:
    group, element = tag >> 16, tag & 0xFFFF
    if group & 1:
        if 0x0010 <= element <= 0x00FF:  # a Private Creator: LO by definition, PS3.5 7.8.1
            return Attribute(tag, tag_text(tag), "LO", ("LO",))
        if element == 0:
            return Attribute(tag, tag_text(tag), "UL", ("UL",))
        return Attribute(tag, tag_text(tag), None, ())
    if not dictionary_has_tag(tag):
        return Attribute(tag, tag_text(tag), None, ())
    vrs = tuple(v.strip() for v in dictionary_VR(tag).split(" or "))
    return Attribute(tag, keyword_for_tag(tag) or tag_text(tag), vrs[0], vrs)


def suggestion(word: str, extra: Iterable[str] = ()) -> str:
    """`` (did you mean 'X'?)`` for the keyword (or extra word) closest to
    ``word``, or an empty string."""
    candidates = [*extra, *keyword_dict]
    folded = {c.lower(): c for c in candidates}
    if word.lower() in folded:
        return f" (did you mean {folded[word.lower()]!r}?)"
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ------------------------------------------------------------------ values

# PS3.5 Table 6.2-1: most string VRs' maximum length in characters (PN: per group).
_MAX_LENGTHS: Final = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12,
                       "LO": 64, "LT": 10240, "PN": 64, "SH": 16, "ST": 1024, "TM": 14,
                       "UI": 64}
# Text VRs whose value may hold a backslash and the format controls (PS3.5 6.1.3).
_FREE_TEXT: Final = frozenset({"LT", "ST", "UT"})
# (re.ASCII: \d is 0-9 only, not the Arabic-Indic and other Unicode digits.)
_DS: Final = re.compile(r" *[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)? *", re.ASCII)
_IS: Final = re.compile(r" *[+-]?\d+ *", re.ASCII)
_DA: Final = re.compile(r"\d{8}", re.ASCII)
_TM: Final = re.compile(r"([01]\d|2[0-3])(?:[0-5]\d(?:(?:[0-5]\d|60)(?:\.\d{1,6})?)?)?",
                        re.ASCII)
_CS: Final = re.compile(r"[A-Z0-9 _]*")


def is_da(text: str) -> bool:
    """Whether ``text`` is a DA value, ``YYYYMMDD``: eight digits naming a day of the
    calendar (PS3.5 Table 6.2-1). 20231301 or 20230231 are none: a value a rule
    writes, or one a date range compares (rules/conditions.py)."""
    if not _DA.fullmatch(text):
        return False
    try:
        dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return False
    return True


def value_problem(vr: str, text: str) -> str | None:
    """Why ``text`` cannot be one value of ``vr`` as PS3.5 Table 6.2-1 defines it
    (length, characters, form), or None. What pydicom's own check lets through: a
    backslash (it makes two values), control characters, a DA of 20241399, a DS of
    1_000 or nan, a Person Name of six components."""
    if "\\" in text and vr not in _FREE_TEXT:
        return "a backslash separates values (give a list for several)"
    allowed = "\t\n\r\f\x1b" if vr in _FREE_TEXT else "\x1b"
    if any(ord(c) < 0x20 and c not in allowed for c in text) or "\x7f" in text:
        return "control characters are not allowed in it"
    limit = _MAX_LENGTHS.get(vr)
    if vr == "PN":
        groups = text.split("=")
        if len(groups) > 3 or any(len(g.split("^")) > 5 for g in groups):
            return "a Person Name has at most 3 groups of at most 5 components"
        if any(len(g) > 64 for g in groups):
            return "a Person Name group is at most 64 characters"
    elif limit is not None and len(text) > limit:
        return f"at most {limit} characters"
    if vr == "DS" and not _DS.fullmatch(text):
        return "not a decimal number as DICOM writes one (digits, sign, point, exponent)"
    if vr == "IS":
        if not _IS.fullmatch(text):
            return "not an integer"
        low, high = INTEGER_RANGES["IS"]
        if not low <= int(text) <= high:
            return f"not an integer from {low} to {high}"
    if vr == "DA" and not is_da(text):
        return "not a date as YYYYMMDD"
    if vr == "TM" and text.strip() and not _TM.fullmatch(text.strip()):
        return "not a time as HHMMSS.FFFFFF"
    if vr == "CS" and not _CS.fullmatch(text):
        return "a code string holds upper-case letters, digits, space and underscore only"
    return None
