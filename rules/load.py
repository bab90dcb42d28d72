"""Loading rule files: TOML to validated, compiled :class:`~rules.model.Rule`.

Theory of operation: :func:`load_rules` reads each file with :mod:`tomllib`
and hands the data to a :class:`_FileCompiler`, which walks it once, checking
every key and value and building the condition objects
(:mod:`rules.conditions`) and change operations (:mod:`rules.changes`). A
problem does not stop the walk: every problem in every file is collected and
raised together as one :class:`~rules.model.RuleError`.

tomllib keeps no positions, so :class:`_Lines` finds them again in the text:
the k-th ``[[rule]]`` header starts the k-th rule, and within it a path of
keys (``then``, ``change``, 2, ``set``, ``PatientName``) is followed through
table headers and ``key =`` lines. Where the exact line cannot be found, the
closest enclosing one found is used, down to the rule's header.
"""

from __future__ import annotations

import datetime as dt
import difflib
import math
import os
import re
import tomllib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple, TypeAlias

from pydicom import config
from pydicom.valuerep import validate_value

from router.dicom.uids import uid_keywords
from rules.changes import (
    Changes,
    CopyOp,
    Operation,
    RemoveOp,
    ReplaceOp,
    SetOp,
    SetValue,
    target_tag,
)
from rules.conditions import (
    DAY_NAMES,
    AETitle,
    AllOf,
    Always,
    AnyOf,
    AttributeTest,
    Condition,
    Not,
    NumberEquals,
    NumberRange,
    OneOf,
    Peer,
    Predicate,
    Present,
    Regex,
    TextEquals,
    TextRange,
    TimeWindow,
    Wildcard,
    canonical_da,
    canonical_dt,
    canonical_tm,
    exponential_risk,
    has_wildcard,
    parse_networks,
)
from rules.model import Problem, Rule, RuleError
from rules.tags import (
    ALL_VRS,
    BINARY_VRS,
    INTEGER_RANGES,
    INTEGER_VRS,
    NUMERIC_VRS,
    REAL_VRS,
    TEXT_VRS,
    Attribute,
    NameProblem,
    resolve,
    value_problem,
)

RULE_KEYS: Final = ("name", "description", "when", "then")
THEN_KEYS: Final = ("forward", "transparent", "reject", "drop", "continue", "change", "query",
                     "retrieve")
#: The actions of a store rule, which a query/retrieve rule cannot have.
STORE_ACTIONS: Final = ("forward", "transparent", "reject", "drop")
CHANGE_KEYS: Final = ("applies_to", "destination", "set", "remove", "copy", "replace")
#: What a change in a query/retrieve rule may apply to (``applies_to``).
APPLIES_TO: Final = ("query", "result")
CHANGE_OPS: Final = ("set", "remove", "copy", "replace")
ASSOCIATION_KEYS: Final = ("calling_ae", "called_ae", "peer", "time")
COMBINATORS: Final = ("all", "any", "not")
# What a forwarded copy's changes may not touch.
_IDENTITY: Final = {0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID"}
#: How deep all/any/not may nest in a rule's conditions.
MAX_NESTING: Final = 32
OPERATORS: Final = ("equals", "wildcard", "regex", "in", "min", "max", "present")
TIME_KEYS: Final = ("days", "from", "to")
_OPERATOR_LIST: Final = "equals, wildcard, regex, in, min, max or present"

Where: TypeAlias = tuple[str | int, ...]


class _Bad:
    """Marks a value that failed validation (its problem is recorded)."""


class _Actions(NamedTuple):
    forward: tuple[str, ...]
    transparent: bool
    reject: int | None
    drop: bool
    continues: bool
    changes: tuple[Changes, ...]
    query: tuple[str, ...] = ()
    retrieve: tuple[str, ...] = ()
    query_changes: Changes = Changes()
    result_changes: Changes = Changes()


BAD: Final = _Bad()


# ----------------------------------------------------------------- entry


def expand(paths: Sequence[Path]) -> tuple[list[Path], list[Problem]]:
    """The rule files named by ``paths``: files as given, folders as every
    ``*.toml`` file inside (not recursive) in sorted name order, but hidden ones
    (``.name.toml``: an editor's or a copy's leftover, which sorted first). A link
    in a folder to a file that is gone is a problem: skipped, its rules would just
    vanish from the rules in force, without a word (an outside campaign)."""
    files: list[Path] = []
    problems: list[Problem] = []
    for path in paths:
        if path.is_dir():
            for f in sorted(path.glob("*.toml")):
                if f.name.startswith("."):
                    continue
                if f.is_file():
                    files.append(f)
                elif f.is_symlink() and not f.exists():
                    problems.append(Problem(file=str(f), line=0, message=(
                        f"a symbolic link to {os.readlink(f)}, which does not exist")))
        elif path.exists():
            files.append(path)
        else:
            problems.append(Problem(file=str(path), line=0, message="no such file or folder"))
    return files, problems


def load_rules(paths: Sequence[Path], *, destinations: Collection[str] | None,
               ) -> tuple[tuple[Rule, ...], tuple[Path, ...]]:
    """Every rule of the files ``paths`` name, in order, and those files.

    ``destinations``: the names forwards may use; None to skip that check.
    Raises :class:`RuleError` listing every problem found."""
    texts, problems = read_texts(paths)
    rules = compile_texts(texts, destinations=destinations, problems=problems)
    return rules, tuple(f for f, _ in texts)


def read_texts(paths: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[Problem]]:
    """The text of every rule file ``paths`` name (see :func:`expand`), and the
    problems reading them (a missing file, not UTF-8)."""
    files, problems = expand(paths)
    texts: list[tuple[Path, str]] = []
    for f in files:
        try:
            # utf-8-sig: editors on Windows write a BOM, a TOML syntax error to tomllib
            # (the configuration file was read so; its rule files were not).
            texts.append((f, f.read_bytes().decode("utf-8-sig")))
        except OSError as exc:
            problems.append(Problem(file=str(f), line=0,
                                    message=f"cannot read it: {exc.strerror or exc}"))
        except UnicodeDecodeError as exc:
            problems.append(Problem(file=str(f), line=0,
                                    message=f"not UTF-8 text (byte {exc.start})"))
    return texts, problems


def compile_texts(texts: Iterable[tuple[Path, str]], *, destinations: Collection[str] | None,
                  problems: list[Problem] | None = None) -> tuple[Rule, ...]:
    """The rules of rule-file texts (each with the path shown in problems);
    raises :class:`RuleError` with ``problems`` and any found here."""
    problems = [] if problems is None else problems
    shared = _Shared()
    known = None if destinations is None else frozenset(destinations)
    rules: list[Rule] = []
    for path, text in texts:
        compiler = _FileCompiler(path, text, known, shared)
        rules.extend(compiler.compile())
        problems.extend(compiler.problems)
    if problems:
        raise RuleError(problems)
    return tuple(rules)


# ------------------------------------------------------------ positions

_RULE_HEADER: Final = re.compile(r"\s*\[\[\s*rule\s*\]\]\s*$")
_TABLE_HEADER: Final = re.compile(r"\s*\[\[?\s*[\w\-\"'. ()]+\s*\]\]?\s*$")
_TOML_LINE: Final = re.compile(r"at line (\d+)")


def _strip_comment(line: str) -> str:
    quote = ""
    escaped = False
    for i, ch in enumerate(line):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i].rstrip()
    return line.rstrip()


def _key_pattern(key: str) -> str:
    k = re.escape(key)
    return rf"(?:{k}|\"{k}\"|'{k}')"


class _Lines:
    """Line numbers for keys of a TOML text tomllib has parsed (see the
    module docstring)."""

    def __init__(self, text: str) -> None:
        self.lines = [_strip_comment(line) for line in text.splitlines()]
        self.rule_starts = [i for i, line in enumerate(self.lines) if _RULE_HEADER.match(line)]

    def last(self) -> int:
        return max(len(self.lines), 1)

    def rule_line(self, k: int) -> int:
        return self.rule_starts[k] + 1 if k < len(self.rule_starts) else 1

    def find(self, k: int, where: Where) -> int:
        """The line of the value at ``where`` inside the k-th rule."""
        if k >= len(self.rule_starts):
            return 1
        start = lo = best = self.rule_starts[k]
        hi = self.rule_starts[k + 1] if k + 1 < len(self.rule_starts) else len(self.lines)
        prefix = ["rule"]
        inline = False
        for part in where:
            if isinstance(part, int):
                if inline:
                    continue
                headers = [j for j in range(lo, hi)
                           if self._is_header(j, prefix, array=True, exact=True)]
                if part < len(headers):
                    lo = best = headers[part]
                    hi = headers[part + 1] if part + 1 < len(headers) else hi
                continue
            prefix.append(part)
            if not inline:
                header = next((j for exact in (True, False) for j in range(lo, hi)
                               if self._is_header(j, prefix, array=None, exact=exact)), None)
                if header is not None:
                    lo = best = header
                    continue
            key = re.compile(rf"(?:^|[\s{{,.]){_key_pattern(part)}\s*[=.]")
            found = next((j for first in (lo, start) for j in range(first, hi)
                          if key.search(self.lines[j])), None)
            if found is None:
                break
            lo = best = found
            inline = True
        return best + 1

    def _is_header(self, j: int, prefix: Sequence[str], *, array: bool | None,
                   exact: bool) -> bool:
        line = self.lines[j]
        if not _TABLE_HEADER.match(line):
            return False
        dots = r"\s*\.\s*".join(_key_pattern(p) for p in prefix)
        opening = {True: r"\[\[", False: r"\[(?!\[)", None: r"\[\[?"}[array]
        closing = r"\s*\]" if exact else r"\s*\."
        return re.match(rf"\s*{opening}\s*{dots}{closing}", line) is not None

    def top_key(self, key: str) -> int:
        pattern = re.compile(rf"\s*(?:\[\[?\s*{_key_pattern(key)}|{_key_pattern(key)}\s*=)")
        return next((j + 1 for j, line in enumerate(self.lines) if pattern.match(line)), 1)


# ------------------------------------------------------------ helpers


def show(value: object) -> str:
    """A TOML value as the user wrote it, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {show(v)}" for k, v in value.items()) + " }"
    return repr(value)


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


#: VRs whose values have a form a rule's text can be checked against on load.
_FORMED_VRS: Final = frozenset({"CS", "DA", "TM", "AS", "UI"})
#: Of those, the ones checked by a pattern here (the others by value_problem), and
#: what the pattern says. A DA by its form only: a date not in the calendar
#: ("00000000") is sent, and a rule may route it by its text.
_FORMS: Final = {"AS": (re.compile(r"\d{3}[DWMY]"), "an age as 018Y"),
                 "UI": (re.compile(r"[0-9.]{1,64}"), "digits and dots"),
                 "DA": (re.compile(r"\d{8}"), "a date as YYYYMMDD")}


def _never_equal(attribute: Attribute, text: str) -> str | None:
    """Why an equality test of ``attribute`` with ``text`` can never hold: a value its
    VR cannot have ("ct" for Modality, "2004-01-19" for a DA), which loaded without a
    word and never matched (an outside campaign); None if it may."""
    vr = attribute.vr
    if vr not in _FORMED_VRS:
        return None
    for part in text.split("\\"):  # "ORIGINAL\\PRIMARY": the values joined
        if vr in _FORMS:
            form, said = _FORMS[vr]
            problem = None if form.fullmatch(part) else f"expected {said}"
        else:
            problem = value_problem(vr, part)
        if problem is None:
            continue
        hint = ""
        if vr == "CS" and value_problem("CS", part.upper()) is None:
            hint = f"; did you mean {show(text.upper())}?"
        elif vr == "UI" and part in uid_keywords():
            hint = f'; did you mean "{uid_keywords()[part][0]}" (its UID)?'
        elif vr == "DA" and canonical_da(part.replace("-", "")) is not None:
            hint = (f'; did you mean "{part.replace("-", "")}" (or a TOML date, '
                    f"{part} unquoted)?")
        # A modality that sends such a value against the standard is matched so:
        # (a TOML literal string: a basic one would take re.escape's backslashes)
        return (f"{attribute.label} is {vr}: {problem}{hint} (a value sent so against "
                f"the standard is matched by {{ regex = '^{re.escape(text)}$' }})")
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _strings(value: object) -> list[str] | None:
    """A string or a non-empty list of strings, as a list; else None."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _temporal_text(value: dt.date | dt.time) -> str:
    """A TOML date, time or date-time in DICOM's DA, TM or DT form."""
    if isinstance(value, dt.datetime):
        text = value.strftime("%Y%m%d%H%M%S")
        if value.microsecond:
            text += f".{value.microsecond:06d}"
        offset = value.utcoffset()
        if offset is not None:
            minutes = int(offset.total_seconds()) // 60
            text += f"{'+' if minutes >= 0 else '-'}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
        return text
    if isinstance(value, dt.date):
        return value.strftime("%Y%m%d")
    text = value.strftime("%H%M%S")
    return text + (f".{value.microsecond:06d}" if value.microsecond else "")


def failure_status_problem(status: object) -> str | None:
    """Why ``status`` cannot be a rule's ``reject`` status, or None.

    Failures in PS3.7 Annex C (and PS3.4's service statuses) are the 01xx and
    02xx codes Annex C defines (:data:`_GENERAL_FAILURES`), Axxx and Cxxx."""
    if not _is_number(status) or not isinstance(status, int):
        return f"expected a status number such as 0xA700, got {show(status)}"
    if not 0 <= status <= 0xFFFF:
        return f"{status} is not a 16-bit status"
    s = f"0x{status:04X}"
    hint = ("; failures are Axxx, Cxxx and the 01xx and 02xx codes of Annex C, e.g. "
            "0xA700 (out of resources), 0xA900 (data set does not match SOP class), "
            "0xC000 (cannot understand) or 0x0124 (not authorized)")
    if status == 0:
        return f"{s} is the success status, not a failure status{hint}"
    if status in (0xFF00, 0xFF01, 0xFE00):
        return f"{s} is a {'cancel' if status == 0xFE00 else 'pending'} status, " \
               f"not a failure status{hint}"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return f"{s} is a warning status, not a failure status (PS3.7 Annex C){hint}"
    if status in _GENERAL_FAILURES or 0xA000 <= status <= 0xAFFF or 0xC000 <= status <= 0xCFFF:
        return None
    return f"{s} is not a failure status of PS3.7 Annex C{hint}"


# The failure codes of PS3.7 Annex C.1-C.5 in 01xx and 02xx; the others of those
# ranges are not defined, and a modality makes of them what it will (storescu: "Unknown
# Status: 0x1ff").
_GENERAL_FAILURES: Final = frozenset((
    0x0105, 0x0106, 0x0110, 0x0111, 0x0112, 0x0113, 0x0114, 0x0115, 0x0117, 0x0118,
    0x0119, 0x0120, 0x0121, 0x0122, 0x0123, 0x0124, 0x0210, 0x0211, 0x0212, 0x0213))


def template_problem(pattern: re.Pattern[str], template: str) -> str | None:
    """Why ``template`` is not a valid replacement for ``pattern``, or None.

    Checked by expanding it against a match of a pattern with the same groups
    (numbers and names), which raises what ``re.sub`` would."""
    names = {number: name for name, number in pattern.groupindex.items()}
    twin = re.compile("".join(f"(?P<{names[i]}>)" if i in names else "()"
                              for i in range(1, pattern.groups + 1)))
    match = twin.match("")
    assert match is not None
    try:
        match.expand(template)
    except (re.error, IndexError) as exc:
        return str(exc)
    return None


# ------------------------------------------------------------- compiler


@dataclass
class _Shared:
    """What the checks of one file need to know of the files before it."""

    names: dict[str, str] = field(default_factory=dict)  # name -> "file:line" first defined
    continues: str | None = None  # 'rule "x" at file:line', the first with continue = true


class _FileCompiler:
    """Checks and compiles the rules of one file (see the module docstring)."""

    def __init__(self, path: Path, text: str, destinations: frozenset[str] | None,
                 shared: _Shared) -> None:
        self.path = path
        self.file = str(path)
        self.text = text
        self.lines = _Lines(text)
        self.destinations = destinations
        self.shared = shared
        self.problems: list[Problem] = []
        self.k = 0
        self.rule_name: str | None = None

    def fail(self, where: Where, message: str) -> _Bad:
        self.problems.append(Problem(file=self.file, line=self.lines.find(self.k, where),
                                     message=message, rule=self.rule_name))
        return BAD

    def compile(self) -> list[Rule]:
        try:
            data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            m = _TOML_LINE.search(str(exc))
            line = int(m.group(1)) if m else self.lines.last()
            self.problems.append(Problem(file=self.file, line=line,
                                         message=f"not valid TOML: {exc}"))
            return []
        except RecursionError:
            # tomllib parses nested tables and arrays recursively: a few hundred
            # levels of `not = { not = ...` ran it out of stack, a traceback at start
            # and, on reload, the end of the supervisor.
            self.problems.append(Problem(file=self.file, line=0, message=(
                "not valid TOML: tables or arrays nested too deeply")))
            return []
        for key in data:
            if key != "rule":
                self.problems.append(Problem(
                    file=self.file, line=self.lines.top_key(key),
                    message=f"unknown top-level key {key!r}{_suggest(key, ['rule'])}: "
                            "a rule file holds [[rule]] tables only"))
        raw = data.get("rule", [])
        if not isinstance(raw, list):
            self.problems.append(Problem(
                file=self.file, line=self.lines.top_key("rule"),
                message="'rule' must be an array of tables: write [[rule]], not [rule]"))
            return []
        rules = []
        for k, table in enumerate(raw):
            self.k = k
            self.rule_name = None
            rule = self.rule(table)
            if rule is not None:
                rules.append(rule)
        return rules

    # -------------------------------------------------------------- rule

    def rule(self, table: object) -> Rule | None:
        before = len(self.problems)
        if not isinstance(table, dict):
            self.fail((), f"expected a [[rule]] table, got {show(table)}")
            return None
        name = table.get("name")
        if name is None:
            self.fail((), 'the rule has no name: add name = "..." (names must be unique)')
        elif not isinstance(name, str) or not name.strip():
            self.fail(("name",), f"name: expected a non-empty string, got {show(name)}")
        else:
            self.rule_name = name
            first = self.shared.names.get(name)
            if first is not None:
                self.fail(("name",), f"duplicate rule name: it is already used at {first}")
            else:
                self.shared.names[name] = f"{self.file}:{self.lines.rule_line(self.k)}"
        for key in table:
            if key not in RULE_KEYS:
                self.fail((key,), f"unknown key {key!r} in a rule{_suggest(key, RULE_KEYS)}: "
                                  "a rule has name, description, when and then")
        description = table.get("description", "")
        if not isinstance(description, str):
            self.fail(("description",), f"description: expected a string, got {show(description)}")
        when = self.conditions(table.get("when", {}), ("when",), "when")
        then = self.then(table.get("then"))
        if not isinstance(then, _Bad):
            self.order(then)
        if len(self.problems) > before or isinstance(when, _Bad) or isinstance(then, _Bad):
            return None
        assert isinstance(name, str) and isinstance(description, str)
        return Rule(name=name, file=self.path, line=self.lines.rule_line(self.k), when=when,
                    description=description, forward=then.forward,
                    transparent=then.transparent, reject=then.reject, drop=then.drop,
                    continues=then.continues, changes=then.changes, query=then.query,
                    retrieve=then.retrieve, query_changes=then.query_changes,
                    result_changes=then.result_changes)

    def order(self, then: _Actions) -> None:
        """Checks that depend on the rules before this one."""
        here = f'rule "{self.rule_name}" at {self.file}:{self.lines.rule_line(self.k)}'
        if then.transparent and self.shared.continues is not None:
            self.fail(("then", "transparent"), "transparent = true after a rule with "
                      f"continue = true ({self.shared.continues}): a transparent forward "
                      "relays its one destination's status, so it cannot be combined with "
                      "the forwards of earlier rules")
        if then.continues and self.shared.continues is None and not (then.query
                                                                     or then.retrieve):
            self.shared.continues = here

    # -------------------------------------------------------- conditions

    def conditions(self, table: object, where: Where, label: str) -> Condition | _Bad:
        if not isinstance(table, dict):
            return self.fail(where, f"{label}: expected a table of conditions, got {show(table)}")
        parts: list[Condition] = []
        bad = False
        for key, value in table.items():
            c = self.condition(key, value, (*where, key))
            if isinstance(c, _Bad):
                bad = True
            else:
                parts.append(c)
        if bad:
            return BAD
        if not parts:
            return Always()
        return parts[0] if len(parts) == 1 else AllOf(parts, top=True)

    def condition(self, key: str, value: object, where: Where) -> Condition | _Bad:
        if key in ("calling_ae", "called_ae"):
            return self.ae_title(key, value, where)
        if key == "peer":
            return self.peer(value, where)
        if key == "time":
            return self.time(value, where)
        if key in COMBINATORS and sum(w in COMBINATORS for w in where) > MAX_NESTING:
            # Conditions are compiled and evaluated recursively: bounded well inside
            # Python's stack, far past any rule a person writes.
            return self.fail(where, f"{key}: conditions nested more than {MAX_NESTING} "
                                    "levels deep")
        if key in ("all", "any"):
            if not isinstance(value, list) or not value:
                return self.fail(where, f"{key}: expected a non-empty list of condition tables, "
                                        f"got {show(value)}")
            children = [self.conditions(item, (*where, i), f"{key}[{i}]")
                        for i, item in enumerate(value)]
            good = [c for c in children if not isinstance(c, _Bad)]
            if len(good) < len(children):
                return BAD
            return AllOf(good) if key == "all" else AnyOf(good)
        if key == "not":
            child = self.conditions(value, where, "not")
            return child if isinstance(child, _Bad) else Not(child)
        try:
            attribute = resolve(key, others=ASSOCIATION_KEYS + COMBINATORS)
        except NameProblem as exc:
            return self.fail(where, str(exc))
        predicate = self.predicate(attribute, key, value, where)
        if isinstance(predicate, _Bad):
            return BAD
        return AttributeTest(attribute.tag, attribute.label, predicate)

    def ae_title(self, key: str, value: object, where: Where) -> Condition | _Bad:
        titles = _strings(value)
        if titles is None:
            return self.fail(where, f"{key}: expected an AE title or a non-empty list of AE "
                                    f"titles (strings), got {show(value)}")
        patterns = []
        for title in titles:
            t = title.strip()
            if not t:
                return self.fail(where, f"{key}: an AE title cannot be empty")
            if "\\" in t or any(ord(c) < 0x20 for c in t):
                return self.fail(where, f"{key}: {title!r} is not an AE title: no backslash "
                                        "or control characters (PS3.5 6.2)")
            if len(t) > 16 and not has_wildcard(t):
                return self.fail(where, f"{key}: {title!r} is longer than 16 characters, the "
                                        "most an AE title has (PS3.5 6.2)")
            patterns.append(t)
        return AETitle(calling=key == "calling_ae", patterns=patterns)

    def peer(self, value: object, where: Where) -> Condition | _Bad:
        texts = _strings(value)
        if texts is None:
            return self.fail(where, "peer: expected an IP address or network (CIDR) or a "
                                    f"non-empty list of them (strings), got {show(value)}")
        try:
            return Peer(parse_networks(texts))
        except ValueError as exc:
            return self.fail(where, f"peer: {exc}")

    def time(self, value: object, where: Where) -> Condition | _Bad:
        example = '{ days = ["mon", "fri"], from = "07:00", to = "19:00" }'
        if not isinstance(value, dict):
            return self.fail(where, f"time: expected a table such as {example}, "
                                    f"got {show(value)}")
        for key in value:
            if key not in TIME_KEYS:
                return self.fail((*where, key), f"time: unknown key {key!r}"
                                 f"{_suggest(key, TIME_KEYS)}: expected days, from and to")
        if not value:
            return self.fail(where, f"time: expected days, or from and to, or both, as in "
                                    f"{example}")
        days: frozenset[int] | None = None
        if "days" in value:
            names = _strings(value["days"])
            if names is None:
                return self.fail((*where, "days"), "time: days: expected a non-empty list of "
                                 f"day names (mon ... sun), got {show(value['days'])}")
            found = set()
            for name in names:
                day = _day(name)
                if day is None:
                    return self.fail((*where, "days"), f"time: unknown day {name!r} (expected "
                                     "mon, tue, wed, thu, fri, sat or sun)")
                found.add(day)
            days = frozenset(found)
        if ("from" in value) != ("to" in value):
            return self.fail(where, "time: from and to go together: give both, or neither "
                                    "for whole days")
        if "from" not in value:
            return TimeWindow(days=days, start=None, end=None)
        start = self.time_of_day(value["from"], (*where, "from"), "from")
        end = self.time_of_day(value["to"], (*where, "to"), "to")
        if isinstance(start, _Bad) or isinstance(end, _Bad):
            return BAD
        if start == end:
            return self.fail(where, "time: from and to are the same time: the window "
                                    "would be empty")
        return TimeWindow(days=days, start=start, end=end)

    def time_of_day(self, value: object, where: Where, key: str) -> int | _Bad:
        if isinstance(value, dt.time) and not isinstance(value, dt.datetime):
            return value.hour * 3600 + value.minute * 60 + value.second
        if isinstance(value, str):
            m = re.fullmatch(r"\s*(\d{1,2}):(\d\d)(?::(\d\d))?\s*", value)
            if m:
                h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
                if (h < 24 and mi < 60 and s < 60) or (key == "to" and (h, mi, s) == (24, 0, 0)):
                    return h * 3600 + mi * 60 + s
        return self.fail(where, f"time: {key} = {show(value)}: expected a time of day as "
                                '"07:00", "07:00:30" or 07:00:00 (24:00 allowed for to)')

    # ------------------------------------------------------- predicates

    def predicate(self, attribute: Attribute, key: str, value: object,
                  where: Where) -> Predicate | _Bad:
        if attribute.vr == "SQ" and not (isinstance(value, dict) and list(value) == ["present"]):
            return self.fail(where, f"{key} is a sequence (SQ): only present = true or false "
                                    "can be tested")
        if isinstance(value, dict):
            return self.operator(attribute, key, value, where)
        if isinstance(value, list):
            return self.one_of(attribute, key, value, where)
        return self.simple(attribute, key, value, where, wildcards=True)

    def simple(self, attribute: Attribute, key: str, value: object, where: Where, *,
               wildcards: bool) -> Predicate | _Bad:
        if isinstance(value, str):
            if wildcards and has_wildcard(value):
                return Wildcard(value)
            never = _never_equal(attribute, value)
            if never is not None:
                return self.fail(where, f"{key}: {show(value)} matches no value DICOM "
                                        f"allows: {never}")
            return TextEquals(value)
        if _is_number(value):
            assert isinstance(value, int | float)
            return NumberEquals(float(value))
        if isinstance(value, dt.date | dt.time):
            return TextEquals(_temporal_text(value))
        hint = " (to test presence write { present = true })" if isinstance(value, bool) else ""
        return self.fail(where, f"{key}: expected a string, a number, a date, a list of them or "
                                f"a table with one operator, got {show(value)}{hint}")

    def one_of(self, attribute: Attribute, key: str, value: list[object],
               where: Where) -> Predicate | _Bad:
        if not value:
            return self.fail(where, f"{key}: empty list: expected at least one value")
        choices = [self.simple(attribute, key, v, where, wildcards=True) for v in value]
        good = [c for c in choices if not isinstance(c, _Bad)]
        if len(good) < len(choices):
            return BAD
        return OneOf(good)

    def operator(self, attribute: Attribute, key: str, table: dict[str, object],
                 where: Where) -> Predicate | _Bad:
        for op in table:
            if op not in OPERATORS:
                return self.fail((*where, op), f"{key}: unknown operator {op!r}"
                                 f"{_suggest(op, OPERATORS)}; the operators are {_OPERATOR_LIST}")
        ops = list(table)
        if not ops:
            return self.fail(where, f"{key}: empty table: expected one operator "
                                    f"({_OPERATOR_LIST})")
        if len(ops) > 1 and set(ops) != {"min", "max"}:
            return self.fail(where, f"{key}: more than one operator in one table "
                                    f"({', '.join(ops)}): write one condition per operator "
                                    "and combine them with all = [...] or any = [...]")
        op = ops[0]
        arg = table[op]
        at = (*where, op)
        if op == "equals":
            if isinstance(arg, list | dict):
                return self.fail(at, f"{key}: equals: expected one value, got {show(arg)} "
                                     "(for several use in = [...])")
            return self.simple(attribute, key, arg, at, wildcards=False)
        if op == "wildcard":
            if not isinstance(arg, str):
                return self.fail(at, f"{key}: wildcard: expected a string, got {show(arg)}")
            return Wildcard(arg)
        if op == "regex":
            if not isinstance(arg, str):
                return self.fail(at, f"{key}: regex: expected a string, got {show(arg)}")
            try:
                compiled = re.compile(arg)
            except re.error as exc:
                return self.fail(at, f"{key}: bad regular expression '{arg}': {exc}")
            risk = exponential_risk(arg)
            if risk is not None:
                return self.fail(at, f"{key}: regular expression '{arg}': {risk}; write it "
                                     "without, or make the inner repeat possessive (a++) "
                                     "or atomic ((?>a+))")
            return Regex(compiled)
        if op == "in":
            if not isinstance(arg, list):
                return self.fail(at, f"{key}: in: expected a list, got {show(arg)}")
            return self.one_of(attribute, key, arg, at)
        if op == "present":
            if not isinstance(arg, bool):
                return self.fail(at, f"{key}: present: expected true or false, got {show(arg)}")
            return Present(arg)
        return self.range(attribute, key, table, where)

    def range(self, attribute: Attribute, key: str, table: dict[str, object],
              where: Where) -> Predicate | _Bad:
        vr = attribute.vr
        sample = table.get("min", table.get("max"))
        if vr == "AS" and _is_number(sample):
            # "018Y" reads as no number: the rule loaded and never matched.
            return self.fail(where, f"{key} is an age string as 018Y (days D, weeks W, "
                                    'months M, years Y): compare text of one unit, as '
                                    '{ min = "000Y", max = "018Y" }')
        if vr in NUMERIC_VRS:
            kind = "number"
        elif vr in ("DA", "TM", "DT"):
            kind = vr
        elif _is_number(sample):
            kind = "number"
        elif isinstance(sample, dt.datetime):
            kind = "DT"
        elif isinstance(sample, dt.date):
            kind = "DA"
        elif isinstance(sample, dt.time):
            kind = "TM"
        else:
            kind = "text"
        bounds: dict[str, object] = {}
        for op in ("min", "max"):
            if op in table:
                bound = self.bound(attribute, key, kind, op, table[op], (*where, op))
                if isinstance(bound, _Bad):
                    return BAD
                bounds[op] = bound
        low, high = bounds.get("min"), bounds.get("max")
        if low is not None and high is not None and low > high:  # type: ignore[operator]
            return self.fail(where, f"{key}: min {show(table['min'])} is greater than max "
                                    f"{show(table['max'])}: nothing can match")
        if kind == "number":
            return NumberRange(low, high)  # type: ignore[arg-type]
        return TextRange(kind, low, high)  # type: ignore[arg-type]

    def bound(self, attribute: Attribute, key: str, kind: str, op: str, value: object,
              where: Where) -> float | str | _Bad:
        of = f"{attribute.label} ({attribute.vr})" if attribute.vr else attribute.label
        if kind == "number":
            if _is_number(value):
                return float(value)  # type: ignore[arg-type]
            return self.fail(where, f"{key}: {op}: expected a number for {of}, "
                                    f"got {show(value)}")
        if kind == "text":
            if isinstance(value, str):
                return value
            return self.fail(where, f"{key}: {op}: expected a number, a date or a string, "
                                    f"got {show(value)}")
        canonical = {"DA": canonical_da, "TM": canonical_tm, "DT": canonical_dt}[kind]
        text: str | None = None
        if isinstance(value, str):
            text = canonical(value)
        elif isinstance(value, dt.datetime):
            text = canonical(_temporal_text(value)) if kind == "DT" else None
        elif isinstance(value, dt.date):
            text = canonical(_temporal_text(value)) if kind in ("DA", "DT") else None
        elif isinstance(value, dt.time):
            text = canonical(_temporal_text(value)) if kind == "TM" else None
        if text is None:
            expected = {"DA": 'a date as 2024-01-31 or "20240131"',
                        "TM": 'a time as 07:30:00, "0730" or "07:30"',
                        "DT": 'a date-time as 2024-01-31T07:30:00 or "20240131073000"'}[kind]
            return self.fail(where, f"{key}: {op}: expected {expected} for {of}, "
                                    f"got {show(value)}")
        return text

    # ------------------------------------------------------------- then

    def then(self, table: object) -> _Actions | _Bad:
        where: Where = ("then",)
        if table is None:
            return self.fail((), "the rule has no action: add a [rule.then] table with "
                                 "forward, reject, drop, query or retrieve")
        if not isinstance(table, dict):
            return self.fail(where, f"then: expected a table of actions, got {show(table)}")
        before = len(self.problems)
        for key in table:
            if key not in THEN_KEYS:
                self.fail((*where, key), f"unknown key {key!r} in then"
                          f"{_suggest(key, THEN_KEYS)}: expected forward, transparent, "
                          "reject, drop, continue, change, query or retrieve")
        forward = self.destination_names("forward", table.get("forward"), (*where, "forward"))
        query = self.destination_names("query", table.get("query"), (*where, "query"))
        retrieve = self.destination_names("retrieve", table.get("retrieve"),
                                          (*where, "retrieve"))
        flags = {}
        for key in ("transparent", "drop", "continue"):
            value = table.get(key, False)
            if not isinstance(value, bool):
                self.fail((*where, key), f"{key}: expected true or false, got {show(value)}")
                value = False
            flags[key] = value
        reject = table.get("reject")
        if reject is not None:
            problem = failure_status_problem(reject)
            if problem is not None:
                self.fail((*where, "reject"), f"reject: {problem}")
        if (isinstance(forward, _Bad) or isinstance(query, _Bad) or isinstance(retrieve, _Bad)
                or len(self.problems) > before):
            return BAD
        assert reject is None or isinstance(reject, int)
        # What the actions mean together.
        transparent, drop, cont = flags["transparent"], flags["drop"], flags["continue"]
        if query or retrieve:
            return self.query_actions(table, query, retrieve, cont, before)
        if forward and reject is not None:
            self.fail((*where, "reject"), "forward and reject contradict each other: a "
                                          "rejected instance is sent nowhere")
        if forward and drop:
            self.fail((*where, "drop"), "forward and drop contradict each other: a dropped "
                                        "instance is sent nowhere")
        if reject is not None and drop:
            self.fail((*where, "drop"), "reject and drop contradict each other: reject answers "
                                        "with a failure, drop with success")
        if transparent and len(forward) != 1:
            self.fail((*where, "transparent"), "transparent = true needs exactly one "
                      f"destination in forward, got {len(forward) or 'none'}")
        if cont and (reject is not None or drop):
            self.fail((*where, "continue"), f"continue = true with "
                      f"{'reject' if reject is not None else 'drop'}: a rule that "
                      f"{'rejects' if reject is not None else 'drops'} ends evaluation")
        if cont and transparent:
            self.fail((*where, "continue"), "continue = true with transparent = true: a "
                      "transparent forward relays its destination's status, so it must be "
                      "the deciding rule")
        if transparent and "change" in table:
            self.fail((*where, "change"), "change with transparent = true: a transparent "
                      "forward relays the instance exactly as received")
        if not forward and reject is None and not drop and len(self.problems) == before:
            self.fail(where if table else (), "the rule has no action: give it forward, "
                                              "reject, drop = true, query or retrieve")
        changes: tuple[Changes, ...] = ()
        if "change" in table:
            if not forward:
                self.fail((*where, "change"), "change without forward: changes apply to the "
                                              "copies sent to destinations")
            else:
                result = self.changes(table["change"], forward, (*where, "change"))
                if not isinstance(result, _Bad):
                    changes = result
        if len(self.problems) > before:
            return BAD
        return _Actions(forward=forward, transparent=transparent, reject=reject, drop=drop,
                        continues=cont, changes=changes or tuple(Changes() for _ in forward))

    def query_actions(self, table: dict[str, object], query: tuple[str, ...],
                      retrieve: tuple[str, ...], cont: bool, before: int) -> _Actions | _Bad:
        """The actions of a query/retrieve rule: upstreams, perhaps continue
        and changes with applies_to, and none of the store actions."""
        routed, what = ("query", "queries") if query else ("retrieve", "retrievals")
        for key in STORE_ACTIONS:
            if key in table and table[key] is not False:
                self.fail(("then", key), f"{routed} cannot be combined with {key}: a rule "
                                         f"routes either stored instances or {what}")
        changes = {target: Changes() for target in APPLIES_TO}
        if "change" in table:
            entries = self.change_entries(table["change"], ("then", "change"), forward=None,
                                          has_query=bool(query))
            if not isinstance(entries, _Bad):
                for target in APPLIES_TO:
                    changes[target] = Changes(operations=tuple(
                        op for applies_to, ops in entries if applies_to == target
                        for op in ops))
        if len(self.problems) > before:
            return BAD
        return _Actions(forward=(), transparent=False, reject=None, drop=False, continues=cont,
                        changes=(), query=query, retrieve=retrieve,
                        query_changes=changes["query"], result_changes=changes["result"])

    def destination_names(self, key: str, value: object,
                          where: Where) -> tuple[str, ...] | _Bad:
        """The destination names of ``forward``, ``query`` or ``retrieve``."""
        if value is None:
            return ()
        names = _strings(value)
        if names is None:
            return self.fail(where, f"{key}: expected a destination name or a non-empty list "
                                    f"of them (strings), got {show(value)}")
        seen: list[str] = []
        for name in names:
            if not name.strip():
                return self.fail(where, f"{key}: a destination name cannot be empty")
            if name in seen:
                return self.fail(where, f"{key}: destination {name!r} is listed twice")
            if self.destinations is not None and name not in self.destinations:
                known = ", ".join(sorted(self.destinations)) or "none"
                return self.fail(where, f"{key}: unknown destination {name!r}"
                                 f"{_suggest(name, self.destinations)}; the configuration "
                                 f"has: {known}")
            seen.append(name)
        return tuple(seen)

    # ---------------------------------------------------------- changes

    def changes(self, value: object, forward: tuple[str, ...],
                where: Where) -> tuple[Changes, ...] | _Bad:
        """A store rule's changes: per destination of ``forward``, the
        rule-wide ones and those naming it, in file order."""
        entries = self.change_entries(value, where, forward=forward)
        if isinstance(entries, _Bad):
            return BAD
        return tuple(Changes(operations=tuple(op for target, ops in entries
                                              if target is None or target == destination
                                              for op in ops))
                     for destination in forward)

    def change_entries(self, value: object, where: Where, *, forward: tuple[str, ...] | None,
                       has_query: bool = False,
                       ) -> list[tuple[str | None, list[Operation]]] | _Bad:
        """Each change table's target and operations. ``forward``: the
        destinations of a store rule (targets: a destination or None for
        all), or None for a query/retrieve rule (targets: ``applies_to``);
        ``has_query``: that rule has ``query``."""
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            return self.fail(where, "change: expected [[rule.then.change]] tables, "
                                    f"got {show(value)}")
        entries: list[tuple[str | None, list[Operation]]] = []
        bad = False
        for i, table in enumerate(value):
            entry = self.change(table, (*where, i), forward=forward, has_query=has_query)
            if isinstance(entry, _Bad):
                bad = True
            else:
                entries.append(entry)
        return BAD if bad else entries

    def change(self, table: dict[str, object], where: Where, *,
               forward: tuple[str, ...] | None,
               has_query: bool) -> tuple[str | None, list[Operation]] | _Bad:
        before = len(self.problems)
        for key in table:
            if key not in CHANGE_KEYS:
                self.fail((*where, key), f"unknown key {key!r} in change"
                          f"{_suggest(key, CHANGE_KEYS)}: expected applies_to, destination, "
                          "set, remove, copy or replace")
        target: object
        if forward is None:
            if "destination" in table:
                self.fail((*where, "destination"),
                          "change.destination applies to forward rules only")
            target = self.applies_to(table, where, has_query)
        else:
            if "applies_to" in table:
                self.fail((*where, "applies_to"), "change.applies_to applies to query and "
                          "retrieve rules only: a forward rule's changes apply to the copies "
                          "sent to destinations")
            target = table.get("destination")
            if target is not None:
                if not isinstance(target, str):
                    self.fail((*where, "destination"), "change: destination: expected a "
                              f"destination name, got {show(target)}")
                elif target not in forward:
                    self.fail((*where, "destination"), f"change: destination {target!r} is "
                              f"not one this rule forwards to ({', '.join(forward)})")
        if not any(key in table for key in CHANGE_OPS) and len(self.problems) == before:
            self.fail(where, "change: expected set, remove, copy or replace")
        ops: list[Operation] = []
        for key, value in table.items():
            at = (*where, key)
            made: list[Operation] = []
            if key == "set":
                made = self.set_ops(value, at)
            elif key == "remove":
                made = self.remove_ops(value, at)
            elif key == "copy":
                made = self.copy_ops(value, at)
            elif key == "replace":
                made = self.replace_ops(value, at)
            for op in made if forward is not None else ():
                tag = target_tag(op)
                if tag in _IDENTITY:
                    # The copy is sent as the instance its file meta and C-STORE-RQ
                    # name; changed or gone, every destination refuses it (A900H,
                    # C000H, or no presentation context), and each copy ends in dead/.
                    self.fail(at, f"{key}: {_IDENTITY[tag]} is the instance's identity "
                                  "(PS3.4 B.2.3): a forwarded copy cannot change it")
            ops.extend(made)
        if len(self.problems) > before:
            return BAD
        assert target is None or isinstance(target, str)
        return target, ops

    def applies_to(self, table: dict[str, object], where: Where, has_query: bool) -> object:
        """The ``applies_to`` of a change in a query/retrieve rule (a
        problem is recorded when it is missing or wrong)."""
        if "applies_to" not in table:
            if has_query:
                return self.fail(where, 'a change in a query rule needs applies_to = "query" '
                                        'or "result"')
            return self.fail(where, 'a change in a retrieve rule needs applies_to = "query" '
                                    "(the C-MOVE/C-GET identifier)")
        value = table["applies_to"]
        at = (*where, "applies_to")
        if value not in APPLIES_TO:
            return self.fail(at, 'change: applies_to: expected "query" (the request\'s '
                                 'identifier) or "result" (each C-FIND match), got '
                                 f"{show(value)}")
        if value == "result" and not has_query:
            return self.fail(at, 'change: applies_to = "result" in a rule without query: '
                                 "retrieves have no result identifiers to change")
        return value

    def attribute(self, key: str, where: Where, what: str) -> Attribute | _Bad:
        try:
            return resolve(key)
        except NameProblem as exc:
            return self.fail(where, f"{what}: {exc}")

    def set_ops(self, value: object, where: Where) -> list[Operation]:
        if not isinstance(value, dict) or not value:
            self.fail(where, "set: expected a table of attribute = value, e.g. "
                             f'set = {{ PatientName = "ANON" }}, got {show(value)}')
            return []
        ops: list[Operation] = []
        for key, given in value.items():
            at = (*where, key)
            attribute = self.attribute(key, at, "set")
            if isinstance(attribute, _Bad):
                continue
            vr = attribute.vr
            if isinstance(given, dict):
                if set(given) != {"vr", "value"}:
                    self.fail(at, f"set: {key}: expected a value, or {{ vr = \"LO\", value = "
                                  f"... }} with exactly those two keys, got {show(given)}")
                    continue
                vr = given["vr"]
                if not isinstance(vr, str) or vr not in ALL_VRS:
                    self.fail(at, f"set: {key}: vr = {show(vr)} is not a DICOM VR")
                    continue
                if attribute.vrs and vr not in attribute.vrs:
                    self.fail(at, f"set: {key}: the data dictionary gives {attribute.label} "
                                  f"the VR {' or '.join(attribute.vrs)}, not {vr}")
                    continue
                given = given["value"]
            if vr == "SQ" or vr in BINARY_VRS:
                what = "a sequence" if vr == "SQ" else "binary data"
                self.fail(at, f"set: cannot set {attribute.label}: its VR {vr} holds {what}")
                continue
            checked = self.set_value(attribute, vr, given, at)
            if not isinstance(checked, _Bad):
                ops.append(SetOp(tag=attribute.tag, label=attribute.label, vr=vr,
                                 value=checked))
        return ops

    def set_value(self, attribute: Attribute, vr: str | None, value: object,
                  where: Where) -> SetValue | _Bad:
        if isinstance(value, list):
            if not value:
                return None
            items = [self.set_item(attribute, vr, v, where) for v in value]
            good = [i for i in items if not isinstance(i, _Bad)]
            return tuple(good) if len(good) == len(items) else BAD
        return self.set_item(attribute, vr, value, where)

    def set_item(self, attribute: Attribute, vr: str | None, value: object,
                 where: Where) -> str | int | float | _Bad:
        of = f"{attribute.label} ({vr})" if vr else attribute.label

        def wrong(expected: str) -> _Bad:
            return self.fail(where, f"set: {of} needs {expected}, got {show(value)}")

        if isinstance(value, bool | list | dict):
            return wrong("a string or a number")
        if isinstance(value, dt.date | dt.time):
            kind = ("DT" if isinstance(value, dt.datetime) else
                    "DA" if isinstance(value, dt.date) else "TM")
            if vr is None or vr == kind or (vr == "DT" and kind == "DA"):
                return _temporal_text(value)
            if vr in TEXT_VRS:
                return wrong("a string" if vr not in ("DA", "TM", "DT") else
                             {"DA": "a date", "TM": "a time", "DT": "a date-time"}[vr])
            return wrong("a number")
        if vr is None:
            assert isinstance(value, str | int | float)
            return value
        if isinstance(value, str):
            if vr in ("DA", "TM", "DT") and value:
                canonical = {"DA": canonical_da, "TM": canonical_tm, "DT": canonical_dt}[vr]
                if canonical(value) is None or (vr == "TM" and ":" in value):
                    return wrong({"DA": 'a date as "20240131" or 2024-01-31',
                                  "TM": 'a time as "073000"',
                                  "DT": 'a date-time as "20240131073000"'}[vr])
                if vr == "DA":  # written as DICOM writes it: 2024-01-31 is no DA
                    value = canonical_da(value) or value
            elif (vr in INTEGER_VRS - {"IS"}
                  or (vr == "IS" and not re.fullmatch(r"\s*[+-]?\d+\s*", value))):
                return wrong("an integer")
            elif vr in REAL_VRS - {"DS"}:
                return wrong("a number")
            # What pydicom's check lets through: a backslash, control characters,
            # 20241399, 1_000, nan, a Person Name of six components (a campaign).
            problem = value_problem(vr, value) if value else None
            if problem is not None:
                return self.fail(where, f"set: {of}: {problem}, got {show(value)}")
            if vr in ("IS", "DS", "DA", "TM", "DT"):
                return value
            problem = _vr_problem(vr, value)
            if problem is not None:
                return self.fail(where, f"set: {of}: {problem}")
            return value
        assert isinstance(value, int | float)
        if vr in TEXT_VRS:
            return wrong(f'a string (write "{value}")')
        if isinstance(value, float) and not math.isfinite(value):
            return wrong("a finite number")
        if vr == "DS" and isinstance(value, int) and value_problem(vr, str(value)):
            return wrong("a number of at most 16 characters")  # (floats are fitted)
        if vr in INTEGER_VRS:
            if isinstance(value, float):
                return wrong("an integer")
            low, high = INTEGER_RANGES[vr]
            if not low <= value <= high:
                return wrong(f"an integer from {low} to {high}")
        return value

    def remove_ops(self, value: object, where: Where) -> list[Operation]:
        keys = _strings(value)
        if keys is None:
            self.fail(where, "remove: expected an attribute or a non-empty list of them "
                             f"(keywords or tags as strings), got {show(value)}")
            return []
        ops: list[Operation] = []
        for key in keys:
            attribute = self.attribute(key, where, "remove")
            if not isinstance(attribute, _Bad):
                ops.append(RemoveOp(tag=attribute.tag, label=attribute.label))
        return ops

    def copy_ops(self, value: object, where: Where) -> list[Operation]:
        if not isinstance(value, dict) or not value:
            self.fail(where, "copy: expected a table of target = source, e.g. "
                             f'copy = {{ OtherPatientIDs = "PatientID" }}, got {show(value)}')
            return []
        ops: list[Operation] = []
        for key, source_key in value.items():
            at = (*where, key)
            target = self.attribute(key, at, "copy")
            if not isinstance(source_key, str):
                self.fail(at, f"copy: {key}: expected the source attribute as a string, "
                              f"got {show(source_key)}")
                continue
            source = self.attribute(source_key, at, "copy")
            if isinstance(target, _Bad) or isinstance(source, _Bad):
                continue
            kinds = {_kind(target.vr), _kind(source.vr)} - {None}
            if len(kinds) > 1:
                self.fail(at, f"copy: cannot copy {source.label} ({source.vr}) into "
                              f"{target.label} ({target.vr})")
                continue
            ops.append(CopyOp(target=target.tag, target_label=target.label,
                              target_vr=target.vr, source=source.tag,
                              source_label=source.label))
        return ops

    def replace_ops(self, value: object, where: Where) -> list[Operation]:
        example = 'replace = { AccessionNumber = { pattern = "^A", with = "B" } }'
        if not isinstance(value, dict) or not value:
            self.fail(where, f"replace: expected a table such as {example}, got {show(value)}")
            return []
        ops: list[Operation] = []
        for key, spec in value.items():
            at = (*where, key)
            attribute = self.attribute(key, at, "replace")
            if isinstance(attribute, _Bad):
                continue
            if (not isinstance(spec, dict) or set(spec) != {"pattern", "with"}
                    or not all(isinstance(v, str) for v in spec.values())):
                self.fail(at, f"replace: {key}: expected {{ pattern = \"...\", with = \"...\" "
                              f"}} (two strings), got {show(spec)}")
                continue
            if attribute.vr == "SQ" or attribute.vr in BINARY_VRS:
                self.fail(at, f"replace: cannot replace in {attribute.label}: its VR "
                              f"{attribute.vr} is not text")
                continue
            pattern_text, template = spec["pattern"], spec["with"]
            assert isinstance(pattern_text, str) and isinstance(template, str)
            try:
                pattern = re.compile(pattern_text)
            except re.error as exc:
                self.fail((*at, "pattern"), f"replace: {key}: bad regular expression "
                                            f"'{pattern_text}': {exc}")
                continue
            risk = exponential_risk(pattern_text)
            if risk is not None:
                self.fail((*at, "pattern"), f"replace: {key}: regular expression "
                                            f"'{pattern_text}': {risk}; write it without, or "
                                            "make the inner repeat possessive (a++) or "
                                            "atomic ((?>a+))")
                continue
            problem = template_problem(pattern, template)
            if problem is not None:
                self.fail((*at, "with"), f"replace: {key}: bad replacement '{template}': "
                                         f"{problem}")
                continue
            ops.append(ReplaceOp(tag=attribute.tag, label=attribute.label, pattern=pattern,
                                 template=template))
        return ops


def _vr_problem(vr: str, value: str) -> str | None:
    """pydicom's objection to ``value`` as a ``vr`` value (PS3.5 Table 6.2-1:
    length, character repertoire), without its link to the standard."""
    try:
        validate_value(vr, value, config.RAISE)
    except ValueError as exc:
        return re.sub(r"\.?\s*Please see <[^>]*>.*$", "", str(exc)).rstrip(".") or None
    return None


def _kind(vr: str | None) -> str | None:
    """The family a VR belongs to for ``copy``: values move within a family."""
    if vr is None:
        return None
    if vr == "SQ":
        return "sequence"
    return "binary" if vr in BINARY_VRS else "value"


def _day(name: str) -> int | None:
    n = name.strip().lower()
    for i, short in enumerate(DAY_NAMES):
        full = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday",
                "sunday")[i]
        if n in (short, full):
            return i
    return None
