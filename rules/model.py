"""The values the rules library takes and gives: association facts, decisions,
dry-run traces, load problems. All immutable and validated when built."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rules.changes import NO_CHANGES, Changes

if TYPE_CHECKING:
    from rules.conditions import Condition

Outcome = Literal["forward", "reject", "drop", "unmatched"]
#: What a rule does: one of a store rule's outcomes, or route queries/retrievals.
Action = Literal["forward", "reject", "drop", "query/retrieve"]
#: The request a query/retrieve rule routes: C-FIND, or C-MOVE and C-GET.
QueryKind = Literal["query", "retrieve"]
#: What a change in a query/retrieve rule applies to: the request's identifier
#: (``"query"``), or each C-FIND match (``"result"``).
AppliesTo = Literal["query", "result"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AssociationInfo:
    """What a rule may test about the association (PS3.8 A-ASSOCIATE):
    the calling and called AE titles and the peer's IP address as text."""

    calling_ae: str
    called_ae: str
    peer: str

    def __post_init__(self) -> None:
        for name in ("calling_ae", "called_ae", "peer"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"AssociationInfo.{name}: expected str, "
                                f"got {type(getattr(self, name)).__name__}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One thing wrong with a rule file. ``line`` is 1-based; 0 when the
    problem is with the file as a whole (unreadable, missing)."""

    file: str
    line: int
    message: str
    rule: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: " if self.line > 0 else f"{self.file}: "
        who = f'rule "{self.rule}": ' if self.rule is not None else ""
        return f"{where}{who}{self.message}"


class RuleError(Exception):
    """The rule files cannot be used; ``problems`` lists every problem found,
    in file order, and ``str()`` gives one per line."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True, slots=True, kw_only=True)
class Forward:
    """Send the instance to ``destination`` after ``changes``. ``transparent``:
    without the spool, relaying the destination's C-STORE status."""

    destination: str
    changes: Changes
    transparent: bool
    rules: tuple[str, ...]

    def describe(self) -> str:
        n = len(self.changes.operations)
        extras = ["transparent"] if self.transparent else []
        if n:
            extras.append(f"{n} change{'s' if n > 1 else ''}")
        return self.destination + (f" ({', '.join(extras)})" if extras else "")


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What to do with one instance.

    - ``forward``: send to each of ``forwards`` (one per destination, in the
      order first named, merged over the ``continue`` rules that matched);
    - ``reject``: answer the C-STORE with failure ``status`` (PS3.7 Annex C),
      keep nothing;
    - ``drop``: answer Success, keep nothing;
    - ``unmatched``: no rule matched with an action (the configuration says
      whether to keep or refuse such instances).

    ``rules`` names the rules that matched and acted, in order.
    """

    outcome: Outcome
    forwards: tuple[Forward, ...] = ()
    status: int | None = None
    rules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.outcome == "forward") != bool(self.forwards):
            raise ValueError("Decision: forwards go with outcome 'forward' and only with it")
        if (self.outcome == "reject") != (self.status is not None):
            raise ValueError("Decision: a status goes with outcome 'reject' and only with it")
        if (self.outcome == "unmatched") != (not self.rules):
            raise ValueError("Decision: rules go with every outcome but 'unmatched'")

    def describe(self) -> str:
        """One line for the log, e.g. ``forward to pacs, ai (2 changes) by
        rule "chest CT"``."""
        by = (f" by rule{'s' if len(self.rules) > 1 else ''} "
              + ", ".join(f'"{r}"' for r in self.rules))
        if self.outcome == "forward":
            return "forward to " + ", ".join(f.describe() for f in self.forwards) + by
        if self.outcome == "reject":
            return f"reject with status 0x{self.status:04X}{by}"
        if self.outcome == "drop":
            return f"drop{by}"
        return "unmatched: no rule matched"


UNMATCHED = Decision(outcome="unmatched")


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryDecision:
    """Which upstreams answer one C-FIND (``kind = "query"``) or serve one
    C-MOVE/C-GET (``kind = "retrieve"``).

    ``upstreams``: destination names, merged over the ``continue`` rules that
    matched in the order first named, without repeats; empty when no rule
    matched (the caller decides what that means, e.g. no matches or refused).
    ``rules`` names the rules that matched and acted, in order.

    ``query_changes``: to apply to the request's identifier (C-FIND, or
    C-MOVE/C-GET) before it goes to the upstreams; ``result_changes``: to
    apply to each C-FIND match before it goes back to the requestor (always
    empty for ``kind = "retrieve"``). Each is the ``applies_to`` changes of
    the acting rules, in rule order; both empty when no rule matched.
    """

    upstreams: tuple[str, ...]
    rules: tuple[str, ...]
    kind: QueryKind = "query"
    query_changes: Changes = NO_CHANGES
    result_changes: Changes = NO_CHANGES

    def __post_init__(self) -> None:
        if bool(self.upstreams) != bool(self.rules):
            raise ValueError("QueryDecision: upstreams and rules are both empty or both not")
        if len(set(self.upstreams)) != len(self.upstreams):
            raise ValueError("QueryDecision: an upstream is listed twice")
        if self.kind not in ("query", "retrieve"):
            raise ValueError(f"QueryDecision: kind {self.kind!r} is not query or retrieve")
        for name in ("query_changes", "result_changes"):
            if not isinstance(getattr(self, name), Changes):
                raise TypeError(f"QueryDecision.{name}: expected Changes, "
                                f"got {type(getattr(self, name)).__name__}")
        if not self.rules and (self.query_changes or self.result_changes):
            raise ValueError("QueryDecision: changes go with rules that matched")
        if self.kind == "retrieve" and self.result_changes:
            raise ValueError("QueryDecision: a retrieve has no results to change")

    def describe(self) -> str:
        """One line for the log, e.g. ``query pacs1, pacs2 by rule "x"``,
        ``query pacs by rule "x" (1 query change, 2 result changes)``,
        ``retrieve from pacs by rule "y"`` or ``no query rule matched``."""
        if not self.rules:
            return f"no {self.kind} rule matched"
        by = (f" by rule{'s' if len(self.rules) > 1 else ''} "
              + ", ".join(f'"{r}"' for r in self.rules))
        verb = "query" if self.kind == "query" else "retrieve from"
        counts = [f"{n} {what} change{'s' if n > 1 else ''}"
                  for what, n in (("query", len(self.query_changes.operations)),
                                  ("result", len(self.result_changes.operations))) if n]
        extras = f" ({', '.join(counts)})" if counts else ""
        return f"{verb} {', '.join(self.upstreams)}{by}{extras}"


NO_QUERY = QueryDecision(upstreams=(), rules=(), kind="query")
NO_RETRIEVE = QueryDecision(upstreams=(), rules=(), kind="retrieve")


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleTrace:
    """How one rule fared in a dry run. ``matched``: its conditions held.
    ``reached``: evaluation got to it (false after the deciding rule; its
    conditions are still evaluated, to show what it would have done)."""

    rule: str
    file: str
    line: int
    matched: bool
    reasons: tuple[str, ...]
    reached: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One ``[[rule]]`` after loading.

    ``changes[i]`` are the changes for ``forward[i]`` (rule-wide ones and
    those naming that destination, in file order). ``continues`` is the
    file's ``continue``. A rule with ``query`` and/or ``retrieve`` (the
    upstreams for C-FIND, and for C-MOVE/C-GET) is a query/retrieve rule and
    has none of the store actions (forward, transparent, reject, drop,
    ``changes``); its changes are ``query_changes`` (``applies_to =
    "query"``: the request's identifier, for C-FIND and C-MOVE/C-GET alike)
    and ``result_changes`` (``applies_to = "result"``: each C-FIND match;
    empty without ``query``), each in file order. A store rule has neither.
    """

    name: str
    file: Path
    line: int
    when: Condition
    forward: tuple[str, ...] = ()
    transparent: bool = False
    reject: int | None = None
    drop: bool = False
    continues: bool = False
    changes: tuple[Changes, ...] = field(default=())
    query: tuple[str, ...] = ()
    retrieve: tuple[str, ...] = ()
    query_changes: Changes = NO_CHANGES
    result_changes: Changes = NO_CHANGES
    description: str = ""

    @property
    def routes_queries(self) -> bool:
        """A query/retrieve rule: store evaluation ignores it."""
        return bool(self.query or self.retrieve)

    @property
    def action(self) -> Action:
        if self.routes_queries:
            return "query/retrieve"
        if self.reject is not None:
            return "reject"
        return "drop" if self.drop else "forward"
