"""Compiled conditions: the ``[rule.when]`` tables after loading.

Theory of operation: the loader turns each condition table into a tree of the
small objects below (no closures over TOML data, no regex compiled after
load). :meth:`Condition.test` is the fast path ``RuleSet.evaluate`` calls once
per received instance; :meth:`Condition.explain` gives the same answer and
also appends a human sentence per leaf for the dry run. Both read the data set
through one :class:`Context` per evaluation, which converts each element it is
asked for once (:class:`Values`) however many rules look at it.

Matching follows the rule-file format of :mod:`rules`: a test on a missing
attribute fails except ``present = false``; on a multi-valued one it holds
when the whole value (values joined with a backslash) or any single value
passes; text is compared with trailing spaces and NULs removed; DICOM
wildcards per PS3.4 C.2.2.2.4 (``*`` any sequence, ``?`` one character,
case-sensitive).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import importlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from rules.charsets import un_text
from rules.model import AssociationInfo
from rules.tags import is_da

# The regular expression parser, to see a pattern's structure (exponential_risk);
# its module is private, hence no stubs.
re_parser: Any = importlib.import_module("re._parser")

_MISSING: Final = object()
_STRIP: Final = " \x00"
DAY_NAMES: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


# ------------------------------------------------------------------ values


class Values:
    """One data element as the matchers see it.

    ``texts`` is what text tests try: the single value, or for several values
    the whole value joined with a backslash followed by each value. ``items``
    is each value alone (for ranges). ``numbers`` are the values that read as
    numbers. A sequence (SQ) has no texts and no numbers: only ``present``
    can hold for it.
    """

    __slots__ = ("_numbers", "_raw", "items", "note", "texts")

    def __init__(self, raw: Sequence[object], items: tuple[str, ...], note: str = "") -> None:
        self.note = note  # shown instead of the value when there is no text
        self._raw = raw
        self.items = items
        self.texts = items if len(items) < 2 else ("\\".join(items), *items)
        self._numbers: tuple[float, ...] | None = None

    @classmethod
    def of(cls, value: object, vr: str) -> Values:
        """The values of an element whose value is ``value`` and VR ``vr``."""
        if vr == "SQ":
            return cls((), (), "(a sequence)")
        if value is None:
            return cls((), ("",))
        if isinstance(value, str):
            return cls((value,), (value.rstrip(_STRIP),))
        if isinstance(value, bytes | bytearray):
            parts = value.decode("latin-1").rstrip(_STRIP).split("\\")
            return cls(parts, tuple(p.rstrip(_STRIP) for p in parts))
        if isinstance(value, list | tuple | MultiValue):
            raw = list(value)
            return cls(raw, tuple(str(v).rstrip(_STRIP) for v in raw) if raw else ("",))
        return cls((value,), (str(value).rstrip(_STRIP),))

    @property
    def numbers(self) -> tuple[float, ...]:
        if self._numbers is None:
            found = []
            for v in self._raw:
                with contextlib.suppress(TypeError, ValueError):
                    found.append(float(v))  # type: ignore[arg-type]
            self._numbers = tuple(found)
        return self._numbers

    def shown(self) -> str:
        if not self.texts:
            return self.note
        text = self.texts[0]
        return "'" + (text if len(text) <= 64 else text[:61] + "...") + "'"


#: An element that is there but cannot be decoded: only ``present = true`` holds.
UNREADABLE: Final = Values((), (), "(cannot be decoded)")


class Context:
    """One evaluation: the association, the data set, the clock, and the
    values converted so far (each element once per evaluation)."""

    __slots__ = ("_cache", "association", "dataset", "now")

    def __init__(self, association: AssociationInfo, dataset: Dataset,
                 now: dt.datetime) -> None:
        self.association = association
        self.dataset = dataset
        self.now = now
        self._cache: dict[int, Values | None] = {}

    def values(self, tag: int) -> Values | None:
        found = self._cache.get(tag, _MISSING)
        if found is _MISSING:
            try:
                elem = self.dataset.get(tag)
                if elem is None:
                    found = None
                elif elem.VR == "UN" and isinstance(elem.value, bytes | bytearray):
                    # A private element received in Implicit VR: read as the text it
                    # is in Explicit VR, in the data set's character set (not Latin-1).
                    found = Values.of(un_text(bytes(elem.value), "LO", self.dataset), "LO")
                else:
                    found = Values.of(elem.value, elem.VR)
            except Exception:  # pydicom cannot decode the element: present, matching nothing
                found = UNREADABLE
            self._cache[tag] = found
        return found  # type: ignore[return-value]


# -------------------------------------------------------- temporal values


def canonical_da(text: str) -> str | None:
    """``YYYYMMDD`` (also from the ACR-NEMA ``YYYY.MM.DD``), or None (also for a
    date that is not in the calendar)."""
    s = text.strip()
    if len(s) == 10 and s[4] in ".-" and s[7] == s[4]:
        s = s[:4] + s[5:7] + s[8:]
    return s if is_da(s) else None


_TM: Final = re.compile(r"(\d\d(?:\d\d(?:\d\d)?)?)(?:\.(\d{1,6}))?")
_DT: Final = re.compile(r"(\d{4}(?:\d\d){0,5})(?:\.(\d{1,6}))?(?:[+-]\d{4})?")


def canonical_tm(text: str) -> str | None:
    """``HHMMSS.FFFFFF``, missing parts as zeros (also from ``HH:MM[:SS]``), or None."""
    m = _TM.fullmatch(text.strip().replace(":", ""))
    if m is None:
        return None
    hms = m.group(1).ljust(6, "0")
    if int(hms[:2]) > 23 or int(hms[2:4]) > 59 or int(hms[4:]) > 60:
        return None
    return f"{hms}.{(m.group(2) or '').ljust(6, '0')}"


def canonical_dt(text: str) -> str | None:
    """``YYYYMMDDHHMMSS.FFFFFF`` with missing parts filled with the earliest
    instant (month and day 01, time zeros), the UTC offset ignored; or None."""
    m = _DT.fullmatch(text.strip())
    if m is None:
        return None
    digits = m.group(1)
    full = f"{digits}{'00000101000000'[len(digits):]}"
    if not is_da(full[:8]) or int(full[8:10]) > 23 or int(full[10:12]) > 59 \
            or int(full[12:14]) > 60:  # 60: a leap second
        return None
    return f"{full}.{(m.group(2) or '').ljust(6, '0')}"


def canonical_text(text: str) -> str | None:
    """Plain strings compare as they are."""
    return text


CANONICAL: Final[dict[str, Callable[[str], str | None]]] = {
    "DA": canonical_da, "TM": canonical_tm, "DT": canonical_dt, "text": canonical_text}


# ------------------------------------------------------------- predicates


class Predicate:
    """A test of one attribute's :class:`Values`; ``missing`` is the answer
    when the attribute is absent."""

    __slots__ = ()
    missing: bool = False

    def match(self, v: Values) -> bool:
        raise NotImplementedError

    def phrase(self, held: bool) -> str:
        """The verb phrase after the value, e.g. ``does not equal 'CT'``."""
        raise NotImplementedError

    def describe(self) -> str:
        """The test itself, e.g. ``equals 'CT'``."""
        return self.phrase(True)


def _q(text: str) -> str:
    return f"'{text}'"


class TextEquals(Predicate):
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def match(self, v: Values) -> bool:
        return self.text in v.texts

    def phrase(self, held: bool) -> str:
        return f"{'equals' if held else 'does not equal'} {_q(self.text)}"


def wildcard_matcher(pattern: str) -> Callable[[str], bool]:
    """Whether a whole value matches a DICOM wildcard (PS3.4 C.2.2.2.4): ``*`` any
    sequence of characters including none, ``?`` exactly one, everything else
    literal and case-sensitive. In time proportional to pattern times value at
    worst: the regex it used to be backtracked polynomially in the number of
    ``*`` (``*a*a*a*a*a*a*a*a*b`` on a 64-character value took over a minute,
    and blocked the worker)."""
    parts = re.split(r"\*+", pattern)
    if len(parts) == 1:
        return lambda text: _glob_piece(pattern, text, 0) and len(text) == len(pattern)
    head, *middle, tail = parts

    def match(text: str) -> bool:
        # Each * piece is matched at its first place (leftmost is always right for
        # a glob), so no position is ever tried twice.
        if len(text) < len(head) + len(tail) or not _glob_piece(head, text, 0) or \
                not _glob_piece(tail, text, len(text) - len(tail)):
            return False
        at, end = len(head), len(text) - len(tail)
        for piece in middle:
            found = _glob_find(piece, text, at, end)
            if found < 0:
                return False
            at = found + len(piece)
        return True

    return match


def _glob_piece(piece: str, text: str, at: int) -> bool:
    """Whether ``piece`` (no ``*``) matches ``text`` at ``at``."""
    if at < 0 or at + len(piece) > len(text):
        return False
    return all(p == "?" or p == text[at + i] for i, p in enumerate(piece))


def _glob_find(piece: str, text: str, start: int, end: int) -> int:
    """Where ``piece`` (no ``*``) first matches within ``text[start:end]``, or -1."""
    if "?" not in piece:
        return text.find(piece, start, end)
    for at in range(start, end - len(piece) + 1):
        if _glob_piece(piece, text, at):
            return at
    return -1


def exponential_risk(pattern: str) -> str | None:
    """Why a regular expression may take exponential time on some values, or None.
    Python's ``re`` backtracks, cannot be interrupted, and a rule runs on the worker's
    event loop: one hostile value would stall every association on it until the
    supervisor killed the worker, and the sender, answered nothing, would send it
    again. Inside a repeat, anything that gives the engine two ways to match the same
    text is refused: another repeat (``(a+)+``, ``(\\w+\\s?)*``, ``(\\d{2,3})*``), an
    optional part (``(a?){25}``), alternatives that may match nothing or start alike
    (``(a|a)*``, ``(a|ab)*``). Alternatives that each start with their
    own literal character (``(CT|MR)+``) are allowed, and so are a repeat of one
    character set followed by a character outside it (``^(\\d+\\.)*\\d+$``, a UID), a
    fixed count (``(\\d{2}){3}``), possessive repeats and
    atomic groups (``a++``, ``(?>a|a)*``), which nothing backtracks into; what is
    inside them is checked on its own (``(?>(a|a)*$)`` is refused)."""
    try:
        parsed = re_parser.parse(pattern)
    except re.error:
        return None  # compiling says what is wrong
    ignore_case = bool(parsed.state.flags & re.IGNORECASE)
    return _ambiguous_repeat(list(parsed), inside_repeat=False, ignore_case=ignore_case)


def _ambiguous_repeat(items: list[Any], *, inside_repeat: bool,
                      ignore_case: bool) -> str | None:
    for index, (op, arg) in enumerate(items):
        name, inside, children = str(op), inside_repeat, []
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            low, high, sub = arg
            repeats = high == re_parser.MAXREPEAT or high > 1
            # Two ways to split the text are impossible when the count is fixed
            # (``(\d{2}){3}``: what is inside is checked below), or when it repeats one
            # character of a set and the next character must be one outside it
            # (``(\d+\.)*``, ``(\w+\s)*``: a UID's parts, words).
            plain = low == high or _delimited(list(sub), items[index + 1:], ignore_case)
            if inside_repeat and repeats and not plain:
                return "it repeats a repeat, which can take exponential time on some values"
            if inside_repeat and low == 0 and not plain:
                return ("it has an optional part inside a repeat, which can take "
                        "exponential time on some values")
            children, inside = [sub], inside_repeat or repeats
        elif name == "SUBPATTERN":
            children = [arg[-1]]
        elif name == "BRANCH":
            children = arg[1]
            if inside_repeat and not _distinct_starts(children, ignore_case):
                return ("it repeats alternatives that may match nothing or start with the "
                        "same character, which can take exponential time on some values")
        elif name in ("ASSERT", "ASSERT_NOT"):
            children = [arg[1]]
        elif name == "GROUPREF_EXISTS":  # (?(1)yes|no)
            children = [arg[1]] + ([arg[2]] if arg[2] is not None else [])
        elif name in ("ATOMIC_GROUP", "POSSESSIVE_REPEAT"):
            # Nothing outside backtracks into them, but what is inside backtracks
            # while it matches: walked as if at top level (a review: (?>(a|a)*$)).
            children = [arg if name == "ATOMIC_GROUP" else arg[2]]
            inside = False
        for child in children:
            found = _ambiguous_repeat(list(child), inside_repeat=inside,
                                      ignore_case=ignore_case)
            if found:
                return found
    return None


def _delimited(repeated: list[Any], after: list[Any], ignore_case: bool) -> bool:
    """``repeated`` is one character of a set, and the first of ``after`` is a
    character that must be there and cannot be one of that set: where the repeat
    ends is never in doubt."""
    if len(repeated) != 1 or not after or str(after[0][0]) not in ("LITERAL", "IN"):
        return False
    delimiter = _characters(after[0])
    item = repeated[0]
    return delimiter is not None and str(item[0]) in ("LITERAL", "NOT_LITERAL", "IN") and \
        not any(_may_match(item, char, ignore_case) for char in delimiter)


def _characters(item: tuple[Any, Any]) -> list[str] | None:
    """The characters a LITERAL or IN item matches, if they are few enough to list;
    None otherwise (a negated set, a wide range, a category other than spaces)."""
    op, arg = str(item[0]), item[1]
    if op == "LITERAL":
        return [chr(arg)]
    chars: list[str] = []
    for kind, value in arg:
        kind = str(kind)
        if kind == "LITERAL":
            chars.append(chr(value))
        elif kind == "RANGE" and value[1] - value[0] < 1024:
            chars.extend(map(chr, range(value[0], value[1] + 1)))
        elif kind == "CATEGORY" and str(value) == "CATEGORY_SPACE":
            chars.extend(_whitespace())
        else:
            return None
    return chars


@functools.cache
def _whitespace() -> tuple[str, ...]:
    """What ``\\s`` matches in a str pattern: str.isspace(), all below U+3001."""
    return tuple(c for c in map(chr, range(0x3001)) if c.isspace())


# What re's categories match in a str pattern (Unicode), for _may_match.
_CATEGORIES: Final[dict[str, Callable[[str], bool]]] = {
    "CATEGORY_DIGIT": str.isdecimal,
    "CATEGORY_WORD": lambda c: c.isalnum() or c == "_",
    "CATEGORY_SPACE": str.isspace,
}


def _may_match(item: tuple[Any, Any], char: str, ignore_case: bool) -> bool:
    """Whether the one-character item (LITERAL, NOT_LITERAL or IN) may match ``char``;
    True when in doubt."""
    forms = {char, char.lower(), char.upper()} if ignore_case else {char}
    op, arg = str(item[0]), item[1]
    if op == "LITERAL":
        return chr(arg) in forms
    if op == "NOT_LITERAL":
        return any(form != chr(arg) for form in forms)
    negated = bool(arg) and str(arg[0][0]) == "NEGATE"
    matched = False
    for kind, value in arg[1:] if negated else arg:
        kind = str(kind)
        if kind == "LITERAL":
            matched = chr(value) in forms
        elif kind == "RANGE":
            matched = any(value[0] <= ord(form) <= value[1] for form in forms)
        elif kind == "CATEGORY":
            name = str(value)
            test = _CATEGORIES.get(name.replace("CATEGORY_NOT_", "CATEGORY_"))
            if test is None:
                return True
            matched = any(test(form) != name.startswith("CATEGORY_NOT_") for form in forms)
        else:
            return True
        if matched:
            break
    return matched != negated


def _distinct_starts(alternatives: list[Any], ignore_case: bool) -> bool:
    """Each alternative starts with a literal character of its own: at any point of
    the text at most one of them can go on."""
    seen: set[int] = set()
    for alternative in alternatives:
        items = list(alternative)
        if not items or str(items[0][0]) != "LITERAL":
            return False
        char = items[0][1]
        if ignore_case:
            char = ord(chr(char).lower())
        if char in seen:
            return False
        seen.add(char)
    return True


def has_wildcard(text: str) -> bool:
    return "*" in text or "?" in text


class Wildcard(Predicate):
    __slots__ = ("_match", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self._match = wildcard_matcher(pattern)

    def match(self, v: Values) -> bool:
        m = self._match
        return any(m(t) for t in v.texts)

    def phrase(self, held: bool) -> str:
        return f"{'matches' if held else 'does not match'} {_q(self.pattern)}"


class Regex(Predicate):
    __slots__ = ("_search", "pattern")

    def __init__(self, compiled: re.Pattern[str]) -> None:
        self.pattern = compiled.pattern
        self._search = compiled.search

    def match(self, v: Values) -> bool:
        s = self._search
        return any(s(t) is not None for t in v.texts)

    def phrase(self, held: bool) -> str:
        return f"{'matches' if held else 'does not match'} regex {_q(self.pattern)}"


class NumberEquals(Predicate):
    __slots__ = ("number",)

    def __init__(self, number: float) -> None:
        self.number = number

    def match(self, v: Values) -> bool:
        return self.number in v.numbers

    def phrase(self, held: bool) -> str:
        return f"{'equals' if held else 'does not equal'} {_number(self.number)}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


class NumberRange(Predicate):
    __slots__ = ("high", "low")

    def __init__(self, low: float | None, high: float | None) -> None:
        self.low = low
        self.high = high

    def match(self, v: Values) -> bool:
        lo, hi = self.low, self.high
        return any((lo is None or n >= lo) and (hi is None or n <= hi) for n in v.numbers)

    def phrase(self, held: bool) -> str:
        return _range_phrase(held, None if self.low is None else _number(self.low),
                             None if self.high is None else _number(self.high))


def _range_phrase(held: bool, low: str | None, high: str | None) -> str:
    if low is not None and high is not None:
        return f"is {'within' if held else 'outside'} {low} to {high}"
    if low is not None:
        return f"is {'at least' if held else 'less than'} {low}"
    return f"is {'at most' if held else 'more than'} {high}"


class TextRange(Predicate):
    """``min``/``max`` on dates, times, date-times (compared in their
    canonical form, i.e. in DICOM order) or plain text."""

    __slots__ = ("_canon", "high", "low")

    def __init__(self, kind: str, low: str | None, high: str | None) -> None:
        self._canon = CANONICAL[kind]
        self.low = low
        self.high = high

    def match(self, v: Values) -> bool:
        lo, hi, canon = self.low, self.high, self._canon
        for item in v.items:
            c = canon(item)
            if c is not None and (lo is None or c >= lo) and (hi is None or c <= hi):
                return True
        return False

    def phrase(self, held: bool) -> str:
        return _range_phrase(held, self.low, self.high)


class Present(Predicate):
    __slots__ = ("expected", "missing")

    def __init__(self, expected: bool) -> None:
        self.expected = expected
        self.missing = not expected

    def match(self, v: Values) -> bool:
        return self.expected

    def phrase(self, held: bool) -> str:
        return "is present" + ("" if held else " (the test was: present = false)")

    def describe(self) -> str:
        return f"present = {'true' if self.expected else 'false'}"


class OneOf(Predicate):
    """``in = [...]`` and bare lists: any of several equalities/wildcards."""

    __slots__ = ("choices",)

    def __init__(self, choices: Sequence[Predicate]) -> None:
        self.choices = tuple(choices)

    def match(self, v: Values) -> bool:
        return any(c.match(v) for c in self.choices)

    def phrase(self, held: bool) -> str:
        shown = ", ".join(c.describe().split(" ", 1)[1] for c in self.choices)
        return f"is {'one of' if held else 'none of'} {shown}"


# ------------------------------------------------------------- conditions


class Condition:
    """A compiled condition; ``test`` and ``explain`` always agree."""

    __slots__ = ()
    reads_dataset: bool = False

    def test(self, ctx: Context) -> bool:
        raise NotImplementedError

    def explain(self, ctx: Context, out: list[str], indent: str) -> bool:
        """Like :meth:`test`, appending one sentence per leaf to ``out``
        (every leaf, no short cut, so the dry run shows all reasons)."""
        raise NotImplementedError

    def tags(self) -> Iterator[int]:
        """The data set tags this condition reads."""
        return iter(())


class Always(Condition):
    __slots__ = ()

    def test(self, ctx: Context) -> bool:
        return True

    def explain(self, ctx: Context, out: list[str], indent: str) -> bool:
        out.append(f"{indent}no conditions: always matches")
        return True


class AllOf(Condition):
    """``all = [...]``, and the implicit all of a table's keys (``top``:
    the reasons are listed without a heading)."""

    __slots__ = ("children", "reads_dataset", "top")

    def __init__(self, children: Sequence[Condition], *, top: bool = False) -> None:
        self.children = tuple(children)
        self.top = top
        self.reads_dataset = any(c.reads_dataset for c in self.children)

    def test(self, ctx: Context) -> bool:
        return all(c.test(ctx) for c in self.children)

    def explain(self, ctx: Context, out: list[str], indent: str) -> bool:
        if self.top:
            results = [c.explain(ctx, out, indent) for c in self.children]
            return all(results)
        at = len(out)
        results = [c.explain(ctx, out, indent + "  ") for c in self.children]
        held = all(results)
        failed = results.count(False)
        out.insert(at, f"{indent}all of {len(results)}: "
                       + ("held" if held else f"{failed} did not hold"))
        return held

    def tags(self) -> Iterator[int]:
        for c in self.children:
            yield from c.tags()


class AnyOf(Condition):
    __slots__ = ("children", "reads_dataset")

    def __init__(self, children: Sequence[Condition]) -> None:
        self.children = tuple(children)
        self.reads_dataset = any(c.reads_dataset for c in self.children)

    def test(self, ctx: Context) -> bool:
        return any(c.test(ctx) for c in self.children)

    def explain(self, ctx: Context, out: list[str], indent: str) -> bool:
        at = len(out)
        results = [c.explain(ctx, out, indent + "  ") for c in self.children]
        held = any(results)
        out.insert(at, f"{indent}any of {len(results)}: "
                       + (f"{results.count(True)} held" if held else "none held"))
        return held

    def tags(self) -> Iterator[int]:
        for c in self.children:
            yield from c.tags()


class Not(Condition):
    __slots__ = ("child", "reads_dataset")

    def __init__(self, child: Condition) -> None:
        self.child = child
        self.reads_dataset = child.reads_dataset

    def test(self, ctx: Context) -> bool:
        return not self.child.test(ctx)

    def explain(self, ctx: Context, out: list[str], indent: str) -> bool:
        at = len(out)
        held = not self.child.explain(ctx, out, indent + "  ")
        out.insert(at, f"{indent}not: " + ("holds (the condition below did not)" if held
                                           else "fails (the condition below held)"))
        return held

    def tags(self) -> Iterator[int]:
        return self.child.tags()


class AETitle(Condition):
    """``calling_ae``/``called_ae``: the association's AE title (leading and
    trailing spaces are not significant, PS3.5 6.2) equals one of the titles
    or matches one of the DICOM wildcards (PS3.4 C.2.2.2.4)."""

    __slots__ = ("_exact", "_wild", "calling", "patterns")

    def __init__(self, *, calling: bool, patterns: Sequence[str]) -> None:
        self.calling = calling
        self.patterns = tuple(patterns)
        self._exact = frozenset(p for p in patterns if not has_wildcard(p))
        self._wild = tuple(wildcard_matcher(p) for p in patterns if has_wildcard(p))

    def _title(self, ctx: Context) -> str:
        a = ctx.association
        return (a.calling_ae if self.calling else a.called_ae).strip()

    def test(self, ctx: Context) -> bool:
        title = self._title(ctx)
        return title in self._exact or any(m(title) for m in self._wild)

    def explain(self, ctx: Context, out: list[str], indent: str) -> bool:
        held = self.test(ctx)
        what = "calling AE" if self.calling else "called AE"
        shown = ", ".join(_q(p) for p in self.patterns)
        verb = "matches" if held else "does not match"
        if len(self.patterns) > 1:
            verb += " one of" if held else " any of"
        out.append(f"{indent}{what} {_q(self._title(ctx))} {verb} {shown}")
        return held


def parse_networks(texts: Iterable[str],
                   ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """IP addresses or networks (CIDR) as a rule's ``peer`` or a listener's
    ``proxy_from`` gives them; ValueError says what is wrong with the first bad one,
    with the network meant when host bits are set."""
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for text in texts:
        try:
            network = ipaddress.ip_network(text.strip(), strict=True)
            mapped = getattr(network.network_address, "ipv4_mapped", None)
            if mapped is not None and network.prefixlen >= 96:
                # Peers are compared as IPv4 (peer_address): "::ffff:10.1.2.3" written
                # for one never matched it (an outside campaign).
                network = ipaddress.ip_network((mapped, network.prefixlen - 96))
            networks.append(network)
        except ValueError as exc:
            hint = ""
            if "host bits set" in str(exc):
                hint = f" (the network is {ipaddress.ip_network(text.strip(), strict=False)})"
            raise ValueError(f"{exc}{hint}") from None
    return tuple(networks)


@functools.lru_cache(maxsize=1024)
def peer_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an IP address (an IPv4-mapped IPv6 one as IPv4), or None."""
    # Cached: an association sends many instances from one peer.
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Peer(Condition):
    """``peer``: the peer's IP address is one of the addresses or inside one
    of the networks (IPv4-mapped IPv6 addresses count as IPv4)."""

    __slots__ = ("networks",)

    def __init__(self, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.networks = tuple(networks)

    def test(self, ctx: Context) -> bool:
        address = peer_address(ctx.association.peer)
        return address is not None and any(address in n for n in self.networks)

    def explain(self, ctx: Context, out: list[str], indent: str) -> bool:
        held = self.test(ctx)
        shown = ", ".join(str(n) for n in self.networks)
        out.append(f"{indent}peer {ctx.association.peer} is {'' if held else 'not '}in {shown}")
        return held


class TimeWindow(Condition):
    """``time``: the local time is on one of ``days`` and within
    ``[start, end)`` (seconds since midnight). When ``start > end`` the window
    spans midnight and belongs to the day it starts on."""

    __slots__ = ("days", "end", "start")

    def __init__(self, *, days: frozenset[int] | None, start: int | None,
                 end: int | None) -> None:
        self.days = days
        self.start = start
        self.end = end

    def test(self, ctx: Context) -> bool:
        now = ctx.now
        day = now.weekday()
        start, end = self.start, self.end
        if start is not None and end is not None:
            t = now.hour * 3600 + now.minute * 60 + now.second
            if start < end:
                if not start <= t < end:
                    return False
            elif t < end:
                day = (day - 1) % 7  # the early part of a window that began yesterday
            elif t < start:
                return False
        return self.days is None or day in self.days

    def explain(self, ctx: Context, out: list[str], indent: str) -> bool:
        held = self.test(ctx)
        now = ctx.now
        shown = f"{DAY_NAMES[now.weekday()]} {now:%H:%M:%S}"
        out.append(f"{indent}time {shown} is {'within' if held else 'outside'} "
                   f"{self.describe()}")
        return held

    def describe(self) -> str:
        parts = []
        if self.days is not None:
            parts.append(",".join(DAY_NAMES[d] for d in sorted(self.days)))
        if self.start is not None and self.end is not None:
            parts.append(f"{_hms(self.start)}-{_hms(self.end)}")
        return " ".join(parts)


def _hms(seconds: int) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:02d}:{m:02d}" + (f":{s:02d}" if s else "")


class AttributeTest(Condition):
    """A test of one data set attribute (by tag)."""

    __slots__ = ("label", "predicate", "tag")
    reads_dataset = True

    def __init__(self, tag: int, label: str, predicate: Predicate) -> None:
        self.tag = tag
        self.label = label
        self.predicate = predicate

    def test(self, ctx: Context) -> bool:
        v = ctx.values(self.tag)
        if v is None:
            return self.predicate.missing
        return self.predicate.match(v)

    def explain(self, ctx: Context, out: list[str], indent: str) -> bool:
        v = ctx.values(self.tag)
        p = self.predicate
        if v is None:
            held = p.missing
            out.append(f"{indent}{self.label} is missing"
                       + (f" (the test was: {p.describe()})" if not held else ""))
            return held
        held = p.match(v)
        out.append(f"{indent}{self.label} {v.shown()} {p.phrase(held)}")
        return held

    def tags(self) -> Iterator[int]:
        yield self.tag
