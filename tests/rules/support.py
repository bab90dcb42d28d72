"""Helpers for the rules tests: rule sets from text, data sets, the default
association and clock."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from rules import AssociationInfo, Decision, RuleError, RuleSet

#: pydicom's own test files, listed directly (get_testdata_files needs the network).
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CT_SMALL = TEST_FILES / "CT_small.dcm"
MR_SMALL = TEST_FILES / "MR_small.dcm"

ASSOC = AssociationInfo(calling_ae="CT1", called_ae="DICOM-ROUTER", peer="10.1.2.3")
#: A Wednesday afternoon.
NOW = dt.datetime(2026, 11, 25, 14, 0)


def ruleset(text: str, *, destinations: Collection[str] | None = None) -> RuleSet:
    return RuleSet.from_text(text, source=Path("rules.toml"), destinations=destinations)


def problems(text: str, *, destinations: Collection[str] | None = None) -> list[str]:
    """The problems loading ``text`` as rules.toml gives, one string each."""
    try:
        ruleset(text, destinations=destinations)
    except RuleError as exc:
        return [str(p) for p in exc.problems]
    raise AssertionError("the rules loaded without a problem")


def one_rule(when: str, then: str = 'forward = "pacs"') -> str:
    """A rule file with one rule "r" whose [rule.when] and [rule.then] bodies
    are the given TOML lines."""
    return f'[[rule]]\nname = "r"\n[rule.when]\n{when}\n[rule.then]\n{then}\n'


def dataset(**attributes: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def decide(text: str, ds: Dataset | None = None, *, assoc: AssociationInfo = ASSOC,
           now: dt.datetime = NOW) -> Decision:
    return ruleset(text).evaluate(assoc, ds if ds is not None else Dataset(), now)


def matches(when: str, ds: Dataset | None = None, *, assoc: AssociationInfo = ASSOC,
            now: dt.datetime = NOW) -> bool:
    """Whether one rule with these conditions matches, by evaluate and by
    explain (which must agree)."""
    rs = ruleset(one_rule(when))
    ds = ds if ds is not None else Dataset()
    fast = rs.evaluate(assoc, ds, now).outcome == "forward"
    decision, traces = rs.explain(assoc, ds, now)
    assert (decision.outcome == "forward") == fast == traces[0].matched
    return fast
