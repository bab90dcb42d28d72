"""Which text a Specific Character Set (0008,0005) can hold, and the text of a
private element received in Implicit VR.

A rule that writes a value decides, from this, whether the data set keeps its
character set or is turned into UTF-8 (rules/changes.py). Python's codecs are
no guide: the one pydicom picks for a DICOM term is wider than the term's
repertoire (``shift_jis`` for ISO_IR 13 takes Kanji, which JIS X 0201 has not,
and pydicom writes them as "?"), and pydicom's encoder tries the default
repertoire as Latin-1 (with ``["", "ISO 2022 IR 159"]`` it writes "ü" as byte
FCH, for which that data set declares no G1 set; with ``["", "ISO 2022 IR
58"]`` it writes GB 2312 without its escape sequence). So the question asked here is
whether the bytes pydicom would write are text in the declared set, by the
rules of PS3.5 §6.1.2.5 and PS3.3 C.12.1.1.2, and read back as the value.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pydicom.charset import convert_encodings, decode_bytes, encode_string
from pydicom.dataset import Dataset

SPECIFIC_CHARACTER_SET: Final = 0x00080005
#: The VRs whose values (0008,0005) applies to (PS3.5 §6.1.2.3).
CHARSET_VRS: Final = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
#: VRs of one value, whose text may hold a backslash (PS3.5 Table 6.2-1).
SINGLE_VALUED: Final = frozenset({"LT", "ST", "UT", "UR"})
_STRIP: Final = " \x00"
_ESC: Final = 0x1B


@dataclass(frozen=True, slots=True)
class _Set:
    """A graphic character set as (0008,0005) designates it."""

    escape: bytes  # its ISO 2022 escape sequence (PS3.3 Tables C.12-3, C.12-4)
    g1: bool  # invoked in G1 (bytes A0H-FFH), else in G0 (21H-7EH)
    double: bool  # two bytes a character
    codec: str  # Python codec that reads one character of it (single-byte sets)
    first: int = 0xA0  # single-byte G1 sets: the byte range they define
    last: int = 0xFF


def _latin(escape: bytes, codec: str) -> _Set:
    return _Set(escape, g1=True, double=False, codec=codec)


# PS3.3 Table C.12-2 and C.12-3: the single-byte sets; the ISO_IR term designates the
# set with no code extensions, the ISO 2022 IR one with them. G0 is ASCII in each
# (ISO_IR 13's is JIS X 0201 Romaji, which Python and pydicom read as ASCII too).
_SINGLE: Final = {
    "100": _latin(b"\x1b-A", "latin_1"),
    "101": _latin(b"\x1b-B", "iso8859_2"),
    "109": _latin(b"\x1b-C", "iso8859_3"),
    "110": _latin(b"\x1b-D", "iso8859_4"),
    "144": _latin(b"\x1b-L", "iso8859_5"),
    "127": _latin(b"\x1b-G", "iso8859_6"),
    "126": _latin(b"\x1b-F", "iso8859_7"),
    "138": _latin(b"\x1b-H", "iso8859_8"),
    "148": _latin(b"\x1b-M", "iso8859_9"),
    "203": _latin(b"\x1b-b", "iso8859_15"),
    "166": _latin(b"\x1b-T", "iso8859_11"),
    # JIS X 0201 Katakana: A1H-DFH only (half-width Katakana).
    "13": _Set(b"\x1b)I", g1=True, double=False, codec="shift_jis", first=0xA1, last=0xDF),
}
# PS3.3 Table C.12-4: the multi-byte sets, with code extensions only.
_MULTI: Final = {
    "87": _Set(b"\x1b$B", g1=False, double=True, codec=""),  # JIS X 0208
    "159": _Set(b"\x1b$(D", g1=False, double=True, codec=""),  # JIS X 0212
    "149": _Set(b"\x1b$)C", g1=True, double=True, codec=""),  # KS X 1001
    "58": _Set(b"\x1b$)A", g1=True, double=True, codec=""),  # GB 2312
}
#: ISO 2022 IR 6 (ASCII into G0): the way back from a multi-byte G0 set.
_ASCII_ESCAPE: Final = b"\x1b(B"
#: JIS X 0201 Romaji into G0 (ISO 2022 IR 13), read as ASCII like ISO_IR 13's G0.
_ROMAJI_ESCAPE: Final = b"\x1b(J"
#: PS3.3 Table C.12-5: sets without code extensions whose codec is exactly the set.
_WHOLE: Final = {"ISO_IR 192": "utf_8", "GB18030": "gb18030", "GBK": "gbk"}
#: Terms for the default repertoire, ASCII (PS3.5 §6.1.2.2).
DEFAULT_TERMS: Final = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})


def _parse(term: str) -> tuple[_Set | None, bool] | None:
    """``term``'s set (None: the default repertoire) and whether it is an ISO 2022
    term (with code extensions); None for a term DICOM does not define."""
    if term in DEFAULT_TERMS:
        return None, term.startswith("ISO 2022")
    for prefix, extended in (("ISO_IR ", False), ("ISO 2022 IR ", True)):
        if term.startswith(prefix):
            number = term[len(prefix):]
            found = _SINGLE.get(number) or (_MULTI.get(number) if extended else None)
            return (found, extended) if found is not None else None
    return None


def holds(text: str, terms: Sequence[str]) -> bool:
    """Whether a value ``text`` can be written in a data set whose (0008,0005) is
    ``terms``: the bytes pydicom writes for it are text in that character set and
    read back as ``text``. ASCII always can (every set's G0 is ASCII)."""
    if text.isascii():
        return True
    terms = [t.strip() for t in terms] or [""]
    whole = _WHOLE.get(terms[0])
    if whole is not None:
        return len(terms) == 1 and _encodes(text, whole)
    parsed = [_parse(t) for t in terms]
    if any(p is None for p in parsed):
        return False  # a term DICOM does not define: nothing is known of it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom's "using replacement characters"
        try:
            encodings = convert_encodings(list(terms))
            data = encode_string(text, encodings)
            back = decode_bytes(data, encodings, set())
        except (UnicodeError, ValueError, LookupError, UserWarning):
            return False
    return back == text and _is_text(data, parsed)  # type: ignore[arg-type]


def value_held(vr: str, text: str, terms: Sequence[str]) -> bool:
    """Whether ``holds`` for one value of ``vr``. A Person Name's components are
    written one by one (PS3.5 §6.1.2.5.3: each starts from the initial sets again),
    so are tried so."""
    parts = re.split(r"[=^]", text) if vr == "PN" else [text]
    return all(holds(part, terms) for part in parts)


def _encodes(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except UnicodeError:
        return False
    return True


def _is_text(data: bytes, parsed: Sequence[tuple[_Set | None, bool]]) -> bool:
    """Whether ``data`` is text in the sets ``parsed``: its escape sequences are
    those of the declared ISO 2022 terms, and each byte is a character of the set
    it is in (PS3.5 §6.1.2.5.3: G0 starts as ASCII, G1 as value 1's set)."""
    extended = len(parsed) > 1 or parsed[0][1]
    escapes: dict[bytes, _Set | None] = {}
    if extended:
        escapes[_ASCII_ESCAPE] = None
        for found, is_2022 in parsed:
            if found is not None and is_2022:
                escapes[found.escape] = found
                if found is _SINGLE["13"]:
                    escapes[_ROMAJI_ESCAPE] = None
    first = parsed[0][0]
    g0: _Set | None = None
    g1: _Set | None = first if first is not None and first.g1 and not first.double else None
    i, end = 0, len(data)
    while i < end:
        byte = data[i]
        if byte == _ESC:
            escape = next((e for e in escapes if data.startswith(e, i)), None)
            if escape is None:
                return False  # an escape to a set the data set does not declare
            designated = escapes[escape]
            if designated is None or not designated.g1:
                g0 = designated
            else:
                g1 = designated
            i += len(escape)
        elif byte < 0x80:
            if g0 is not None and byte > 0x20:  # a two-byte G0 set: 21H-7EH twice
                if not (i + 1 < end and byte < 0x7F and 0x21 <= data[i + 1] < 0x7F):
                    return False
                i += 2
            else:
                i += 1  # ASCII (G0), or a control or space
        elif g1 is None or byte < 0xA0:
            return False  # no G1 set declared, or a C1 control (80H-9FH)
        elif g1.double:
            if not (i + 1 < end and 0xA1 <= byte < 0xFF and 0xA1 <= data[i + 1] < 0xFF):
                return False
            i += 2
        else:
            if not g1.first <= byte <= g1.last:
                return False
            try:
                bytes([byte]).decode(g1.codec)
            except UnicodeError:
                return False  # unassigned in that set (e.g. A1H in ISO-IR 138)
            i += 1
    return True


def terms_of(ds: Dataset) -> list[str]:
    """The values of ``ds``'s (0008,0005) ([] when absent or empty)."""
    declared = ds.get(SPECIFIC_CHARACTER_SET)
    if declared is None or not declared.value:
        return []
    value = declared.value
    items = [value] if isinstance(value, str) else list(value)
    return [str(t).strip() for t in items if t is not None]


def un_text(raw: bytes, vr: str, ds: Dataset) -> str | list[str]:
    """A UN value's bytes as the text of a ``vr`` value. A private element in an
    instance sent in Implicit VR is UN (its VR is not in the data set): the same
    instance in Explicit VR has it as text, and a rule must not depend on how the
    modality sent it. Its bytes are the data set's own text, in its Specific
    Character Set where ``vr`` is one that set applies to."""
    text = raw.decode("latin-1")
    if vr in CHARSET_VRS:
        encodings = convert_encodings(terms_of(ds) or None)
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("error")  # not text in that set: as Latin-1
            text = decode_bytes(raw, encodings, {0x5C})  # 5CH: the value delimiter
    text = text.rstrip(_STRIP)
    parts = [text] if vr in SINGLE_VALUED else text.split("\\")
    return parts[0] if len(parts) == 1 else parts
