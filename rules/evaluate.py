"""The rule set: loaded once, evaluated per received instance and per
query/retrieve request.

Theory of operation: :meth:`RuleSet.evaluate` walks the compiled store rules
(those without ``query`` or ``retrieve``) in order with one
:class:`~rules.conditions.Context`. A matching rule without ``continue``
decides; ``continue`` rules are collected and the walk goes on. The decision
for a single deciding rule is built at load time, and the decision for a
combination of ``continue`` rules is built once and memoised, so the usual
evaluation allocates nothing but the context. :meth:`explain` is the same
walk with reasons, for the dry run. :meth:`evaluate_query` and
:meth:`evaluate_retrieve` are the same walk over the rules with ``query``,
and those with ``retrieve``, against the request's identifier.
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
from rules.model import (
    NO_QUERY,
    NO_RETRIEVE,
    UNMATCHED,
    AssociationInfo,
    Decision,
    Forward,
    QueryDecision,
    QueryKind,
    Rule,
    RuleTrace,
)
from rules.tags import private_creator

_MEMO_LIMIT: Final = 4096


class RuleSet:
    """Validated, compiled routing rules (DESIGN.md D6, D7), immutable.

    ``rules``: every rule, in order, store and query/retrieve rules alike.
    ``needed_tags``: every data set tag a store rule's condition, ``copy``
    source or ``replace`` target reads, with the Private Creator of each
    private one, for ``dcmread(specific_tags=...)``. ``needs_dataset``: some
    store rule's condition reads the data set (if not, the caller may skip
    parsing it). ``query_tags``: the same for the conditions and the
    changes (``applies_to`` query or result: ``copy`` sources, ``replace``
    targets) of the query/retrieve rules (informational: the caller has the
    identifier and the results).
    """

    __slots__ = ("_memo", "_query", "_query_memo", "_retrieve", "_retrieve_memo", "_single",
                 "_store", "needed_tags", "needs_dataset", "query_tags", "rules", "sources")

    def __init__(self, rules: Sequence[Rule], sources: Sequence[Path] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.sources: tuple[Path, ...] = tuple(sources)
        self._store = tuple(r for r in self.rules if not r.routes_queries)
        self._query = tuple(r for r in self.rules if r.query)
        self._retrieve = tuple(r for r in self.rules if r.retrieve)
        self.needs_dataset: bool = any(r.when.reads_dataset for r in self._store)
        self.needed_tags: frozenset[int] = _needed_tags(self._store)
        self.query_tags: frozenset[int] = _needed_tags(
            tuple(r for r in self.rules if r.routes_queries))
        self._single = tuple(_decide((r,)) for r in self._store)
        self._memo: dict[tuple[int, ...], Decision] = {}
        self._query_memo: dict[tuple[int, ...], QueryDecision] = {}
        self._retrieve_memo: dict[tuple[int, ...], QueryDecision] = {}

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
        qr = len(self.rules) - len(self._store)
        return (f"<RuleSet {len(self.rules)} rules ({qr} query/retrieve) "
                f"from {len(self.sources)} files>")

    @property
    def has_query_rules(self) -> bool:
        """Some rule has ``query``: C-FIND requests can be routed upstream."""
        return bool(self._query)

    @property
    def has_retrieve_rules(self) -> bool:
        """Some rule has ``retrieve``: C-MOVE/C-GET can be routed upstream."""
        return bool(self._retrieve)

    def evaluate(self, association: AssociationInfo, dataset: Dataset,
                 now: dt.datetime) -> Decision:
        """The decision for one instance. ``now``: naive local time (for
        ``time`` windows; an aware datetime is read as its own wall clock).
        Query/retrieve rules take no part."""
        ctx = Context(association, dataset, now)
        acted: list[int] | None = None
        for i, rule in enumerate(self._store):
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
        """The decision, as :meth:`evaluate` gives it, and for every store
        rule whether it matched and why (rules after the deciding one are
        evaluated too, marked ``reached = False``). Query/retrieve rules are
        left out, as :meth:`evaluate` leaves them out."""
        ctx = Context(association, dataset, now)
        acted: list[int] = []
        traces: list[RuleTrace] = []
        decided = False
        for i, rule in enumerate(self._store):
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

    def evaluate_query(self, association: AssociationInfo, identifier: Dataset,
                       now: dt.datetime) -> QueryDecision:
        """The upstreams that answer one C-FIND: the rules with ``query`` in
        order, the first that matches deciding unless it has ``continue``.
        Conditions read the request's ``identifier`` (e.g. QueryRetrieveLevel,
        ModalitiesInStudy), as received, and the requesting ``association``.
        The decision's ``query_changes`` are for the caller to apply to (a
        copy of) the identifier before sending it upstream, its
        ``result_changes`` to each match before returning it."""
        return self._route(self._query, "query", self._query_memo,
                           Context(association, identifier, now))

    def evaluate_retrieve(self, association: AssociationInfo, identifier: Dataset,
                          now: dt.datetime) -> QueryDecision:
        """The upstreams that serve one C-MOVE or C-GET: as
        :meth:`evaluate_query`, over the rules with ``retrieve``. The
        decision's ``query_changes`` are for the identifier; it has no
        ``result_changes``."""
        return self._route(self._retrieve, "retrieve", self._retrieve_memo,
                           Context(association, identifier, now))

    def _route(self, rules: tuple[Rule, ...], kind: QueryKind,
               memo: dict[tuple[int, ...], QueryDecision], ctx: Context) -> QueryDecision:
        acted: list[int] = []
        for i, rule in enumerate(rules):
            if rule.when.test(ctx):
                acted.append(i)
                if not rule.continues:
                    break
        if not acted:
            return NO_QUERY if kind == "query" else NO_RETRIEVE
        key = tuple(acted)
        decision = memo.get(key)
        if decision is None:
            upstreams: dict[str, None] = {}
            for i in key:
                upstreams.update(dict.fromkeys(rules[i].query if kind == "query"
                                               else rules[i].retrieve))
            acting = [rules[i] for i in key]
            decision = QueryDecision(
                upstreams=tuple(upstreams), rules=tuple(r.name for r in acting), kind=kind,
                query_changes=Changes.join([r.query_changes for r in acting]),
                result_changes=(Changes.join([r.result_changes for r in acting])
                                if kind == "query" else Changes()))
            if len(memo) >= _MEMO_LIMIT:
                memo.clear()
            memo[key] = decision
        return decision

    def _combined(self, acted: tuple[int, ...]) -> Decision:
        if len(acted) == 1:
            return self._single[acted[0]]
        decision = self._memo.get(acted)
        if decision is None:
            decision = _decide(tuple(self._store[i] for i in acted))
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
        for changes in (*rule.changes, rule.query_changes, rule.result_changes):
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
