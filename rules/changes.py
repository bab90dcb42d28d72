"""Attribute changes (``[[rule.then.change]]``), applied to the copy of an
instance bound for one destination.

Each operation is validated when the rules load; applying one never raises
for a data set it does not fit (a ``copy`` from a missing source, a
``replace`` on a missing or binary attribute, a value that cannot take the
target's VR): it leaves the data set as it was.
"""

from __future__ import annotations

import copy as _copy
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import DSfloat, PersonName

from rules.charsets import (
    CHARSET_VRS,
    DEFAULT_TERMS,
    SPECIFIC_CHARACTER_SET,
    terms_of,
    un_text,
    value_held,
)
from rules.tags import (
    BINARY_VRS,
    INTEGER_RANGES,
    INTEGER_VRS,
    REAL_VRS,
    TEXT_VRS,
    private_creator,
    value_problem,
)

Scalar: TypeAlias = str | int | float
#: A value as given in the rule file: one value, several (a tuple), or empty (None).
SetValue: TypeAlias = Scalar | tuple[Scalar, ...] | None

log = logging.getLogger("rules.changes")

_FAIL: Final = object()
_STRIP: Final = " \x00"
#: VR for a private (or unknown) attribute set without one, when it is not there yet.
DEFAULT_VR: Final = "LO"
#: PS3.3 C.12.1.1.2: ISO_IR 192 is UTF-8, which holds any value a rule can give.
UTF8_CHARACTER_SET: Final = "ISO_IR 192"


def _items(value: object) -> tuple[list[object], bool]:
    if isinstance(value, list | tuple | MultiValue):
        return list(value), True
    return [value], False


def coerce(value: object, vr: str) -> object:
    """``value`` (from another element, or text) as a value for ``vr``, or
    :data:`_FAIL` when it cannot be one."""
    if value is None:
        return None
    if vr == "SQ":
        return _copy.deepcopy(value) if isinstance(value, DicomSequence) else _FAIL
    if vr in BINARY_VRS:
        return bytes(value) if isinstance(value, bytes | bytearray) else _FAIL
    if isinstance(value, DicomSequence | bytes | bytearray):
        return _FAIL
    items, multi = _items(value)
    out: list[object] = []
    for item in items:
        converted = _coerce_one(item, vr)
        if converted is _FAIL:
            return _FAIL
        out.append(converted)
    return out if multi else out[0]


def _coerce_one(item: object, vr: str) -> object:
    # A value the target's VR cannot hold (PS3.5 Table 6.2-1: a name copied into a
    # date, 200 characters into an LO) fails: the target stays as it was.
    if vr in TEXT_VRS or vr not in INTEGER_VRS | REAL_VRS:
        text = item.rstrip(_STRIP) if isinstance(item, str) else str(item)
        return _FAIL if text and value_problem(vr, text) else text
    try:
        if vr in INTEGER_VRS:
            number = float(str(item).strip()) if isinstance(item, str) else float(item)  # type: ignore[arg-type]
            if not number.is_integer():
                return _FAIL
            low, high = INTEGER_RANGES[vr]
            return int(number) if low <= number <= high else _FAIL
        if isinstance(item, str):
            text = item.strip()
            if vr == "DS":  # a decimal string stays as written, if DICOM can write it so
                return _FAIL if value_problem("DS", text) else text
            number = float(text)
        else:
            number = float(item)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return _FAIL
    if not math.isfinite(number):
        return _FAIL
    return DSfloat(number, auto_format=True) if vr == "DS" else number


class ChangeNotMade(ValueError):
    """A rule's change cannot be made: the value it would write is one its VR cannot
    hold (a prefixed accession number past SH's 16 characters, a pseudonym past LO's
    64). The message says which and why."""


def _not_made(what: str, label: str, value: object, vr: str) -> None:
    """Raise :class:`ChangeNotMade` for an operation on ``label``. Logged and skipped,
    the copy went out with the attribute unchanged -- a pseudonymisation that did not
    fit sent the identifier itself (an outside campaign): a store copy is not made
    at all (workers/routing.py)."""
    items, _ = _items(value)
    why = next((p for p in (value_problem(vr, str(i).rstrip(_STRIP)) for i in items
                            if isinstance(i, str | PersonName)) if p),
               f"not a {vr} value")
    shown = repr(value if not isinstance(value, list) else "\\".join(map(str, value)))
    raise ChangeNotMade(f"{what} {label} would be "
                        f"{shown[:80] + ('...' if len(shown) > 80 else '')}: {why} "
                        "(PS3.5 Table 6.2-1)")


def _orphan(ds: Dataset, tag: int) -> bool:
    """Whether writing private element ``tag`` would create it in a block no Private
    Creator of ``ds`` reserves: a data element nobody owns (PS3.5 §7.8.1), which the
    router wrote into instances of other vendors (an outside campaign). One already
    there is changed all the same (a pseudonymisation must reach it)."""
    creator = private_creator(tag)
    return creator is not None and tag not in ds and creator not in ds


def _show(value: SetValue) -> str:
    if value is None:
        return "<empty>"
    if isinstance(value, tuple):
        return "[" + ", ".join(repr(v) for v in value) + "]"
    return repr(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class SetOp:
    """``set``: create the attribute or replace its value. ``vr`` None: a
    private or unknown tag: the VR of the element already there if the value
    fits it, else :data:`DEFAULT_VR`."""

    tag: int
    label: str
    vr: str | None
    value: SetValue

    def apply(self, ds: Dataset) -> None:
        if _orphan(ds, self.tag):
            return
        vr = self.vr
        value: object = list(self.value) if isinstance(self.value, tuple) else self.value
        if vr is None:
            existing = ds.get(self.tag)
            vr = DEFAULT_VR
            if existing is not None and existing.VR not in BINARY_VRS | {"SQ"}:
                converted = coerce(value, existing.VR)
                if converted is not _FAIL:
                    ds.add_new(self.tag, existing.VR, converted)
                    return
        converted = coerce(value, vr)
        if converted is _FAIL:
            _not_made("set", self.label, value, vr)
        else:
            ds.add_new(self.tag, vr, converted)

    def describe(self) -> str:
        vr = f" ({self.vr})" if self.vr and self.label.startswith("(") else ""
        return f"set {self.label}{vr} = {_show(self.value)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoveOp:
    """``remove``: delete the attribute if present."""

    tag: int
    label: str

    def apply(self, ds: Dataset) -> None:
        if self.tag in ds:
            del ds[self.tag]

    def describe(self) -> str:
        return f"remove {self.label}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CopyOp:
    """``copy``: the source's value into the target, with the target's VR
    (``target_vr`` None: the target element's if there is one, else the
    source's). Nothing happens when the source is missing."""

    target: int
    target_label: str
    target_vr: str | None
    source: int
    source_label: str

    def apply(self, ds: Dataset) -> None:
        source = ds.get(self.source)
        if source is None or _orphan(ds, self.target):
            return
        vr = self.target_vr
        if vr is None:
            existing = ds.get(self.target)
            vr = existing.VR if existing is not None else source.VR
        raw = source.value
        if source.VR == "UN" and isinstance(raw, bytes | bytearray) \
                and vr != "SQ" and vr not in BINARY_VRS:
            raw = un_text(bytes(raw), vr, ds)
        value = coerce(raw, vr)
        if value is _FAIL:
            _not_made(f"copy of {self.source_label} to", self.target_label, source.value, vr)
        else:
            ds.add_new(self.target, vr, value)

    def describe(self) -> str:
        return f"copy {self.source_label} to {self.target_label}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplaceOp:
    """``replace``: :func:`re.sub` on each value of the attribute (``with``
    may use ``\\1``, ``\\g<name>``). Nothing happens when it is missing,
    a sequence or binary (a private element received in Implicit VR, UN, is
    read as the text it is: :meth:`_apply_un`)."""

    tag: int
    label: str
    pattern: re.Pattern[str]
    template: str

    def apply(self, ds: Dataset) -> None:
        elem = ds.get(self.tag)
        if elem is not None and elem.VR == "UN" and isinstance(elem.value, bytes | bytearray):
            self._apply_un(ds, bytes(elem.value))
            return
        if elem is None or elem.VR == "SQ" or elem.VR in BINARY_VRS or elem.VM == 0:
            # An empty attribute has no value to replace in (VM 0, PS3.5 6.4): '^(.*)$'
            # made 'R:' of it, so an empty return key or type 2 element was filled.
            return
        items, multi = _items(elem.value)
        texts = ["" if v is None else str(v).rstrip(_STRIP) for v in items]
        changed = [self.pattern.sub(self.template, t) for t in texts]
        if changed == texts:
            return
        value = coerce(changed if multi else changed[0], elem.VR)
        if value is _FAIL:
            _not_made("replace in", self.label, changed if multi else changed[0], elem.VR)
        else:
            elem.value = value

    def _apply_un(self, ds: Dataset, raw: bytes) -> None:
        """A private element received in Implicit VR, whose VR the data set does not
        say: the same instance in Explicit VR has it as text (a rule that replaces in
        it says it is text), and the change must not depend on how it was sent. Its
        values are read in the data set's character set; the result is written as
        UT, one text of the same values (the same bytes in Implicit VR), which the
        character set check after the changes covers like any text."""
        if not raw.rstrip(b" \x00"):
            return  # empty, as above
        texts = un_text(raw, "LO", ds)
        items = [t.rstrip(_STRIP) for t in (texts if isinstance(texts, list) else [texts])]
        changed = [self.pattern.sub(self.template, t) for t in items]
        if changed != items:
            ds.add_new(self.tag, "UT", "\\".join(changed))

    def describe(self) -> str:
        return f"replace in {self.label} '{self.pattern.pattern}' with '{self.template}'"


Operation: TypeAlias = SetOp | RemoveOp | CopyOp | ReplaceOp


def target_tag(op: Operation) -> int:
    """The attribute ``op`` writes (or removes)."""
    return op.target if isinstance(op, CopyOp) else op.tag


def _holds(ds: Dataset, tags: set[int]) -> bool:
    """Whether the Specific Character Set of ``ds`` can hold the text values of
    ``tags`` (rules/charsets.py)."""
    terms = terms_of(ds)
    for tag in tags:
        elem = ds.get(tag)
        if elem is None or elem.VR not in CHARSET_VRS or elem.value is None:
            continue
        if not all(value_held(elem.VR, str(value), terms)
                   for value in _items(elem.value)[0] if value is not None):
            return False
    return True


def _check_converted(ds: Dataset, declared: list[str], *, strict: bool) -> None:
    """After a rule set or removed (0008,0005): every text value of ``ds`` (decoded
    before, in the set ``declared`` then) must be one the new set holds. Not
    ``strict`` (a query), the data set is written in UTF-8 instead, which holds all."""
    terms = terms_of(ds)
    if terms == declared:
        return
    for elem in ds.iterall():
        if elem.VR not in CHARSET_VRS or elem.value is None:
            continue
        for value in _items(elem.value)[0]:
            text = "" if value is None else str(value)
            if value_held(elem.VR, text, terms):
                continue
            label = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
            shown = repr(text if len(text) <= 40 else text[:37] + "...")
            new, old = ("\\".join(t) for t in (terms, declared))
            message = (f"SpecificCharacterSet {new or '(removed)'!r}: {label} {shown} "
                       f"cannot be written in it (was {old or 'the default, ASCII'})")
            if strict:
                raise ChangeNotMade(message)
            log.warning("change not made: %s; written in %s", message, UTF8_CHARACTER_SET)
            ds.SpecificCharacterSet = UTF8_CHARACTER_SET
            return


def _unknown_text(ds: Dataset, declared: list[str]) -> str | None:
    """Why ``ds`` cannot change its character set: private elements of unknown VR
    (UN, received in Implicit VR) whose bytes are not ASCII, in a data set that
    declared a set. They may be text in that set, which would then read wrongly
    (PS3.5 §6.1.2.3: every text value is in the declared set), or binary, which
    rewriting as text would corrupt: with no VR to tell, neither is safe. None when
    there are none (ASCII reads the same in every set DICOM has)."""
    if all(t in DEFAULT_TERMS for t in declared):
        return None
    kept = [elem.tag for elem in ds.iterall()
            if elem.VR == "UN" and isinstance(elem.value, bytes | bytearray)
            and not bytes(elem.value).isascii()]
    if not kept:
        return None
    shown = ", ".join(f"({t.group:04X},{t.element:04X})" for t in kept[:3])
    return (f"the character set would change from {chr(92).join(declared)}, but private "
            f"element(s) {shown}{', ...' if len(kept) > 3 else ''} of unknown VR (UN) "
            "hold bytes that may be text in it: they could not be converted safely")


def _as_text(value: object) -> object:
    """A text value as plain ``str`` (a Person Name without the encodings it was
    made with), one or several; anything else as it is."""
    if isinstance(value, (list, tuple, MultiValue)):
        return [_as_text(v) for v in value]
    return str(value) if isinstance(value, (str, PersonName)) else value


@dataclass(frozen=True, slots=True, kw_only=True)
class Changes:
    """The attribute operations for one destination, applied in order."""

    operations: tuple[Operation, ...] = ()

    def problem(self, ds: Dataset, whole: Callable[[], Dataset] | None = None) -> str | None:
        """Why these changes cannot all be made to ``ds`` (an instance, or the header
        the rules read, which holds every attribute a copy or a replace reads), tried on
        a copy of it; None if they can, or if only pydicom can tell (the real change
        says it). Where they change the character set, every text value decides:
        then they are tried again on ``whole()``, all of the data set's header."""
        trial = _copy.deepcopy(ds)
        try:
            self._apply(trial, strict=True)
        except ChangeNotMade as exc:
            return str(exc)
        except Exception:  # pydicom's many errors: the copy's own writing reports them
            return None
        if whole is not None and terms_of(trial) != terms_of(ds):
            return self.problem(whole())
        return None

    def apply(self, ds: Dataset, *, strict: bool = True) -> None:
        """Apply every operation to ``ds`` (mutated in place). An operation that cannot
        be made raises :class:`ChangeNotMade`; unless not ``strict``, where it is
        logged and skipped (query identifiers and results).

        A value the data set's Specific Character Set cannot hold ("Müller" in a
        data set in the default repertoire, Cyrillic in one in ISO_IR 100) would be
        written in another encoding than the one declared, and every reader after us
        would show other characters. The data set is then turned into UTF-8 (ISO_IR
        192) as a whole: its text decoded in the set it declares, (0008,0005)
        replaced, and all of it written in UTF-8.

        A rule that sets or removes (0008,0005) itself asks for the data set in that
        set: its text is converted to it (relabelled only, every non-ASCII value would
        read as other characters). A value the new set cannot hold is a change not
        made.
        """
        self._apply(ds, strict=strict)

    def _apply(self, ds: Dataset, *, strict: bool) -> None:
        touched = {target_tag(op) for op in self.operations}
        declared = terms_of(ds)
        converting = SPECIFIC_CHARACTER_SET in touched
        if converting:
            ds.decode()  # every text value to str in the set declared until now
        for op in self.operations:
            try:
                op.apply(ds)
            except ChangeNotMade as exc:
                if strict:
                    raise
                log.warning("change not made: %s", exc)
        if converting:
            if terms_of(ds) != declared:
                self._may_convert(ds, declared, strict=strict)
            _check_converted(ds, declared, strict=strict)
        elif not _holds(ds, touched):
            # The values the operations wrote are text already. decode() would first
            # encode a Person Name among them in the old set ("Ёлкин" in ISO_IR 100:
            # "?????"), then decode that: they are taken out and put back as text.
            written = {tag: (ds[tag].VR, _as_text(ds[tag].value)) for tag in touched
                       if tag in ds and ds[tag].VR in CHARSET_VRS}
            self._may_convert(ds, declared, strict=strict)
            for tag in written:
                del ds[tag]
            ds.decode()  # every text value to str, read in the set declared until now
            ds.SpecificCharacterSet = UTF8_CHARACTER_SET
            for tag, (vr, value) in written.items():
                ds.add_new(tag, vr, value)

    @staticmethod
    def _may_convert(ds: Dataset, declared: list[str], *, strict: bool) -> None:
        problem = _unknown_text(ds, declared)
        if problem is None:
            return
        if strict:
            raise ChangeNotMade(problem)
        log.warning("%s; converted all the same", problem)  # a query: nothing is kept

    @property
    def tags(self) -> frozenset[int]:
        """Every attribute the operations read or write (top level), and (0008,0005),
        which :meth:`apply` may rewrite."""
        return frozenset({SPECIFIC_CHARACTER_SET,
                          *(target_tag(op) for op in self.operations),
                          *(op.source for op in self.operations if isinstance(op, CopyOp))})

    def describe(self) -> list[str]:
        """One human line per operation, e.g. ``set PatientName = 'ANON'``."""
        return [op.describe() for op in self.operations]

    def __bool__(self) -> bool:
        return bool(self.operations)

    @classmethod
    def join(cls, parts: Sequence[Changes]) -> Changes:
        """The operations of ``parts`` one after the other."""
        return cls(operations=tuple(op for p in parts for op in p.operations))


NO_CHANGES: Final = Changes()
