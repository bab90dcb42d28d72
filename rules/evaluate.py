"""The rule set: loaded once, evaluated per received instance.

Theory of operation: :meth:`RuleSet.evaluate` walks the compiled rules in
order with one :class:`~rules.conditions.Context`. A matching rule without
``continue`` decides; ``continue`` rules are collected and the walk goes on.
The decision for a single deciding rule is built at load time, and the
decision for a combination of ``continue`` rules is built once and memoised,
so the usual evaluation allocates nothing but the context. :meth:`explain` is
the same walk with reasons, for the dry run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Final

from pydicom.dataset import Dataset

from rules.changes import Changes, CopyOp, ReplaceOp
from rules.conditions import Context
from rules.load import compile_texts, load_rules
from rules.model import UNMATCHED, AssociationInfo, Decision, Forward, Rule, RuleTrace
from rules.tags import private_creator

_MEMO_LIMIT: Final = 4096


class RuleSet:
    """Validated, compiled routing rules (DESIGN.md D6), immutable.

    ``needed_tags``: every data set tag a condition, a ``copy`` source or a
    ``replace`` target reads, with the Private Creator of each private one,
    for ``dcmread(specific_tags=...)``. ``needs_dataset``: some condition
    reads the data set (if not, the caller may skip parsing it).
    """

    __slots__ = ("_memo", "_single", "needed_tags", "needs_dataset", "rules", "sources")

    def __init__(self, rules: Sequence[Rule], sources: Sequence[Path] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.sources: tuple[Path, ...] = tuple(sources)
        self.needs_dataset: bool = any(r.when.reads_dataset for r in self.rules)
        self.needed_tags: frozenset[int] = _needed_tags(self.rules)
        self._single = tuple(_decide((r,)) for r in self.rules)
        self._memo: dict[tuple[int, ...], Decision] = {}

    @classmethod
    def load(cls, paths: Sequence[Path], *, destinations: Collection[str] | None) -> RuleSet:
        """Load rule files and folders (every ``*.toml`` inside, sorted by
        name). ``destinations``: the names ``forward`` may use, None not to
        check them. Raises :class:`~rules.model.RuleError` with every problem."""
        rules, sources = load_rules(paths, destinations=destinations)
        return cls(rules, sources)

    @classmethod
    def from_text(cls, text: str, *, source: Path = Path("<rules>"),
                  destinations: Collection[str] | None) -> RuleSet:
        """Rules from one rule-file text (``source`` names it in problems)."""
        return cls(compile_texts([(source, text)], destinations=destinations), ())

    @classmethod
    def empty(cls) -> RuleSet:
        """No rules: every instance is unmatched."""
        return cls(())

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"<RuleSet {len(self.rules)} rules from {len(self.sources)} files>"

    def evaluate(self, association: AssociationInfo, dataset: Dataset,
                 now: dt.datetime) -> Decision:
        """The decision for one instance. ``now``: naive local time (for
        ``time`` windows; an aware datetime is read as its own wall clock)."""
        ctx = Context(association, dataset, now)
        acted: list[int] | None = None
        for i, rule in enumerate(self.rules):
            if rule.when.test(ctx):
                if acted is None:
                    if not rule.continues:
                        return self._single[i]
                    acted = [i]
                else:
                    acted.append(i)
                    if not rule.continues:
                        break
        if acted is None:
            return UNMATCHED
        return self._combined(tuple(acted))

    def explain(self, association: AssociationInfo, dataset: Dataset,
                now: dt.datetime) -> tuple[Decision, list[RuleTrace]]:
        """The decision, as :meth:`evaluate` gives it, and for every rule
        whether it matched and why (rules after the deciding one are
        evaluated too, marked ``reached = False``)."""
        ctx = Context(association, dataset, now)
        acted: list[int] = []
        traces: list[RuleTrace] = []
        decided = False
        for i, rule in enumerate(self.rules):
            reasons: list[str] = []
            matched = rule.when.explain(ctx, reasons, "")
            traces.append(RuleTrace(rule=rule.name, file=str(rule.file), line=rule.line,
                                    matched=matched, reasons=tuple(reasons),
                                    reached=not decided))
            if matched and not decided:
                acted.append(i)
                decided = not rule.continues
        if not acted:
            return UNMATCHED, traces
        return self._combined(tuple(acted)), traces

    def _combined(self, acted: tuple[int, ...]) -> Decision:
        if len(acted) == 1:
            return self._single[acted[0]]
        decision = self._memo.get(acted)
        if decision is None:
            decision = _decide(tuple(self.rules[i] for i in acted))
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[acted] = decision
        return decision


def _decide(rules: Sequence[Rule]) -> Decision:
    """The decision of the rules that acted, in order (all but the last
    have ``continue``). A reject or drop keeps nothing, whatever came before."""
    names = tuple(r.name for r in rules)
    last = rules[-1]
    if last.reject is not None:
        return Decision(outcome="reject", status=last.reject, rules=names)
    if last.drop:
        return Decision(outcome="drop", rules=names)
    merged: dict[str, tuple[list[Changes], list[bool], list[str]]] = {}
    for rule in rules:
        for destination, changes in zip(rule.forward, rule.changes, strict=True):
            parts, transparent, by = merged.setdefault(destination, ([], [], []))
            parts.append(changes)
            transparent.append(rule.transparent)
            by.append(rule.name)
    forwards = tuple(
        Forward(destination=d, changes=Changes.join(parts), transparent=any(transparent),
                rules=tuple(by))
        for d, (parts, transparent, by) in merged.items())
    return Decision(outcome="forward", forwards=forwards, rules=names)


def _needed_tags(rules: Sequence[Rule]) -> frozenset[int]:
    tags: set[int] = set()
    for rule in rules:
        tags.update(rule.when.tags())
        for changes in rule.changes:
            for op in changes.operations:
                if isinstance(op, CopyOp):
                    tags.add(op.source)
                elif isinstance(op, ReplaceOp):
                    tags.add(op.tag)
    for tag in list(tags):
        creator = private_creator(tag)
        if creator is not None:
            tags.add(creator)
    return frozenset(tags)
