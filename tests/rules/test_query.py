"""Query/retrieve rules (DESIGN.md D7): loading and its problems, evaluate_query
and evaluate_retrieve, and that store evaluation ignores them."""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import textwrap
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

import rules
from rules import AssociationInfo, QueryDecision, RuleSet
from rules.cli import add_rules_parser
from tests.rules.support import ASSOC, CT_SMALL, NOW, dataset, decide, problems, ruleset

UPSTREAMS = {"pacs", "pacs1", "pacs2", "vna", "ai"}
R = '[[rule]]\nname = "q"\n'

STUDY_CT = dataset(QueryRetrieveLevel="STUDY", ModalitiesInStudy=["CT", "MR"],
                   PatientID="", StudyInstanceUID="")
STUDY_MR = dataset(QueryRetrieveLevel="STUDY", ModalitiesInStudy="MR")
SERIES = dataset(QueryRetrieveLevel="SERIES", Modality="CT", StudyInstanceUID="1.2.3")
CT = dataset(Modality="CT")


def _query(text: str, identifier: Dataset, *, assoc: AssociationInfo = ASSOC,
           now: dt.datetime = NOW) -> QueryDecision:
    return ruleset(text, destinations=UPSTREAMS).evaluate_query(assoc, identifier, now)


def _retrieve(text: str, identifier: Dataset, *, assoc: AssociationInfo = ASSOC,
              now: dt.datetime = NOW) -> QueryDecision:
    return ruleset(text, destinations=UPSTREAMS).evaluate_retrieve(assoc, identifier, now)


# ---------------------------------------------------------------- loading


def test_query_and_retrieve_load_as_str_or_list() -> None:
    text = R + 'then.query = ["pacs1", "pacs2"]\nthen.retrieve = "pacs1"\n' \
        '[[rule]]\nname = "r"\nthen.retrieve = ["vna"]\nthen.continue = true\n'
    rs = ruleset(text, destinations=UPSTREAMS)
    q, r = rs.rules
    assert (q.query, q.retrieve, q.continues) == (("pacs1", "pacs2"), ("pacs1",), False)
    assert (r.query, r.retrieve, r.continues) == ((), ("vna",), True)
    assert q.routes_queries and r.routes_queries
    assert q.action == r.action == "query/retrieve"
    assert (q.forward, q.changes, q.reject, q.drop, q.transparent) == ((), (), None, False,
                                                                      False)
    assert rs.has_query_rules and rs.has_retrieve_rules


def test_store_rules_are_not_query_rules() -> None:
    rs = ruleset('[[rule]]\nname = "s"\nthen.forward = "pacs"\n')
    assert not rs.rules[0].routes_queries and rs.rules[0].action == "forward"
    assert not rs.has_query_rules and not rs.has_retrieve_rules
    only_retrieve = ruleset(R + 'then.retrieve = "pacs"\n')
    assert not only_retrieve.has_query_rules and only_retrieve.has_retrieve_rules
    assert not RuleSet.empty().has_query_rules


def test_false_store_flags_are_no_contradiction() -> None:
    rs = ruleset(R + 'then.query = "pacs"\nthen.drop = false\nthen.transparent = false\n')
    assert rs.rules[0].query == ("pacs",)


LOAD_CASES = [
    pytest.param(R + '[rule.then]\nquery = "pacs"\nforward = "ai"\n',
                 'rules.toml:5: rule "q": query cannot be combined with forward: a rule routes '
                 "either stored instances or queries", id="query-and-forward"),
    pytest.param(R + '[rule.then]\nquery = "pacs"\ntransparent = true\n',
                 'rules.toml:5: rule "q": query cannot be combined with transparent: a rule '
                 "routes either stored instances or queries", id="query-and-transparent"),
    pytest.param(R + '[rule.then]\nquery = "pacs"\nreject = 0xA700\n',
                 'rules.toml:5: rule "q": query cannot be combined with reject: a rule routes '
                 "either stored instances or queries", id="query-and-reject"),
    pytest.param(R + '[rule.then]\nquery = "pacs"\ndrop = true\n',
                 'rules.toml:5: rule "q": query cannot be combined with drop: a rule routes '
                 "either stored instances or queries", id="query-and-drop"),
    pytest.param(R + '[rule.then]\nquery = "pacs"\n[[rule.then.change]]\nremove = "PatientID"\n',
                 'rules.toml:5: rule "q": a change in a query rule needs applies_to = "query" '
                 'or "result"', id="query-change-without-applies-to"),
    pytest.param(R + '[rule.then]\nretrieve = "pacs"\nforward = "ai"\n',
                 'rules.toml:5: rule "q": retrieve cannot be combined with forward: a rule '
                 "routes either stored instances or retrievals", id="retrieve-and-forward"),
    pytest.param(R + 'then.retrieve = "pacs"\nthen.query = "pacs"\nthen.drop = true\n',
                 'rules.toml:5: rule "q": query cannot be combined with drop: a rule routes '
                 "either stored instances or queries", id="query-retrieve-and-drop"),
    pytest.param(R + '[rule.then]\nquery = ["pacs", "pacss"]\n',
                 "rules.toml:4: rule \"q\": query: unknown destination 'pacss' (did you mean "
                 "'pacs'?); the configuration has: ai, pacs, pacs1, pacs2, vna",
                 id="query-unknown-upstream"),
    pytest.param(R + 'description = "x"\n[rule.when]\nQueryRetrieveLevel = "STUDY"\n'
                 '[rule.then]\nquery = "pacs"\nretrieve = "archive"\n',
                 "rules.toml:8: rule \"q\": retrieve: unknown destination 'archive'; the "
                 "configuration has: ai, pacs, pacs1, pacs2, vna",
                 id="retrieve-unknown-upstream"),
    pytest.param(R + 'then.query = ["pacs", "pacs"]\n',
                 "rules.toml:3: rule \"q\": query: destination 'pacs' is listed twice",
                 id="query-twice"),
    pytest.param(R + 'then.retrieve = []\n',
                 'rules.toml:3: rule "q": retrieve: expected a destination name or a non-empty '
                 "list of them (strings), got []", id="retrieve-empty"),
    pytest.param(R + 'then.query = 104\n',
                 'rules.toml:3: rule "q": query: expected a destination name or a non-empty '
                 "list of them (strings), got 104", id="query-type"),
    pytest.param(R + 'then.query = " "\n',
                 'rules.toml:3: rule "q": query: a destination name cannot be empty',
                 id="query-blank"),
    pytest.param(R + '[rule.then]\ncontinue = true\n',
                 'rules.toml:3: rule "q": the rule has no action: give it forward, reject, '
                 "drop = true, query or retrieve", id="continue-alone"),
    pytest.param(R + '[rule.then]\nquerry = "pacs"\n',
                 "rules.toml:4: rule \"q\": unknown key 'querry' in then (did you mean "
                 "'query'?): expected forward, transparent, reject, drop, continue, change, "
                 "query or retrieve", id="unknown-then-key"),
]


@pytest.mark.parametrize(("text", "expected"), LOAD_CASES)
def test_query_rule_problem(text: str, expected: str) -> None:
    assert problems(text, destinations=UPSTREAMS) == [expected]


def test_every_store_action_is_reported() -> None:
    text = R + '[rule.then]\nquery = "pacs"\nforward = "ai"\nreject = 0xA700\n'
    assert problems(text) == [
        'rules.toml:5: rule "q": query cannot be combined with forward: a rule routes either '
        "stored instances or queries",
        'rules.toml:6: rule "q": query cannot be combined with reject: a rule routes either '
        "stored instances or queries",
    ]


def test_unknown_upstreams_unchecked_without_destinations() -> None:
    rs = RuleSet.from_text(R + 'then.query = "anywhere"\n', destinations=None)
    assert rs.rules[0].query == ("anywhere",)


def test_query_continue_does_not_forbid_a_later_transparent_forward() -> None:
    text = (R + 'then.query = "pacs"\nthen.continue = true\n'
            '[[rule]]\nname = "t"\nthen.forward = "ai"\nthen.transparent = true\n')
    rs = ruleset(text)
    assert decide(text, CT).forwards[0].transparent
    assert rs.evaluate_query(ASSOC, STUDY_CT, NOW).upstreams == ("pacs",)


def test_query_conditions_are_checked_like_any_other() -> None:
    text = R + 'when.ModalitiesInStudy = { regexp = "CT" }\nthen.query = "pacs"\n'
    assert problems(text) == [
        "rules.toml:3: rule \"q\": ModalitiesInStudy: unknown operator 'regexp' (did you "
        "mean 'regex'?); the operators are equals, wildcard, regex, in, min, max or present"]


# ------------------------------------------------------------- evaluation

QR_RULES = """
[[rule]]
name = "CT studies from both"
when.QueryRetrieveLevel = "STUDY"
when.ModalitiesInStudy = "*CT*"
then.query = ["pacs1", "pacs2"]

[[rule]]
name = "vna for workstations, and go on"
when.calling_ae = "WS*"
then.query = "vna"
then.retrieve = ["vna", "pacs1"]
then.continue = true

[[rule]]
name = "retrieve only"
when.QueryRetrieveLevel = ["STUDY", "SERIES"]
then.retrieve = ["pacs2", "vna"]

[[rule]]
name = "everything else"
then.query = ["pacs", "pacs1"]
then.retrieve = "pacs"
"""

WS = AssociationInfo(calling_ae="WS7", called_ae="DICOM-ROUTER", peer="10.1.2.3")


def test_first_matching_query_rule_decides() -> None:
    decision = _query(QR_RULES, STUDY_CT)
    assert decision == QueryDecision(upstreams=("pacs1", "pacs2"),
                                     rules=("CT studies from both",))
    assert decision.describe() == 'query pacs1, pacs2 by rule "CT studies from both"'


def test_rules_without_query_are_skipped_by_evaluate_query() -> None:
    # "retrieve only" would match SERIES but has no query: the catch-all decides.
    decision = _query(QR_RULES, SERIES)
    assert decision.rules == ("everything else",)
    assert decision.upstreams == ("pacs", "pacs1")


def test_query_continue_accumulates_first_seen_without_repeats() -> None:
    text = """
[[rule]]
name = "a"
then.query = ["pacs2", "vna"]
then.continue = true
[[rule]]
name = "b"
when.Modality = "MR"
then.query = "ai"
then.continue = true
[[rule]]
name = "c"
then.query = ["vna", "pacs1", "pacs2"]
[[rule]]
name = "never"
then.query = "pacs"
"""
    decision = _query(text, SERIES)
    assert decision == QueryDecision(upstreams=("pacs2", "vna", "pacs1"), rules=("a", "c"))
    assert decision.describe() == 'query pacs2, vna, pacs1 by rules "a", "c"'
    assert _query(text, dataset(Modality="MR")).upstreams == ("pacs2", "vna", "ai", "pacs1")


def test_only_continue_rules_matching_still_route() -> None:
    text = R + 'then.query = "pacs"\nthen.continue = true\n'
    assert _query(text, SERIES) == QueryDecision(upstreams=("pacs",), rules=("q",))


def test_association_conditions_read_the_requesting_association() -> None:
    decision = _query(QR_RULES, STUDY_MR, assoc=WS)
    assert decision.rules == ("vna for workstations, and go on", "everything else")
    assert decision.upstreams == ("vna", "pacs", "pacs1")
    assert _query(QR_RULES, STUDY_MR).upstreams == ("pacs", "pacs1")
    text = (R + 'when.peer = "192.168.0.0/16"\nwhen.time = { from = "07:00", to = "19:00" }\n'
            'then.query = "pacs"\n')
    here = AssociationInfo(calling_ae="X", called_ae="Y", peer="192.168.4.5")
    assert _query(text, SERIES, assoc=here).upstreams == ("pacs",)
    assert _query(text, SERIES).upstreams == ()
    assert _query(text, SERIES, assoc=here, now=NOW.replace(hour=20)).upstreams == ()


def test_identifier_conditions() -> None:
    # ModalitiesInStudy CT\MR: a wildcard on the whole value, or equality on one value.
    assert _query(QR_RULES, STUDY_CT).rules == ("CT studies from both",)
    assert _query(R + 'when.ModalitiesInStudy = "MR"\nthen.query = "pacs"\n',
                  STUDY_CT).rules == ("q",)
    assert _query(QR_RULES, STUDY_MR).rules == ("everything else",)
    # A return key (given empty, universal matching) is present, with the value "".
    text = R + 'when.PatientID = { present = true }\nthen.query = "pacs"\n'
    assert _query(text, STUDY_CT).rules == ("q",)
    assert _query(text, STUDY_MR).rules == ()
    empty = R + 'when.PatientID = ""\nthen.query = "pacs"\n'
    assert _query(empty, STUDY_CT).rules == ("q",)


def test_evaluate_retrieve_uses_the_retrieve_rules() -> None:
    decision = _retrieve(QR_RULES, STUDY_CT)
    assert decision == QueryDecision(upstreams=("pacs2", "vna"), rules=("retrieve only",),
                                     kind="retrieve")
    assert decision.describe() == 'retrieve from pacs2, vna by rule "retrieve only"'
    ws = _retrieve(QR_RULES, STUDY_CT, assoc=WS)
    assert ws.rules == ("vna for workstations, and go on", "retrieve only")
    assert ws.upstreams == ("vna", "pacs1", "pacs2")
    image = dataset(QueryRetrieveLevel="IMAGE")
    assert _retrieve(QR_RULES, image).rules == ("everything else",)


def test_no_rule_matched() -> None:
    text = R + 'when.QueryRetrieveLevel = "PATIENT"\nthen.query = "pacs"\nthen.retrieve = "pacs"\n'
    decision = _query(text, STUDY_CT)
    assert decision == QueryDecision(upstreams=(), rules=())
    assert decision.describe() == "no query rule matched"
    retrieve = _retrieve(text, STUDY_CT)
    assert (retrieve.upstreams, retrieve.kind) == ((), "retrieve")
    assert retrieve.describe() == "no retrieve rule matched"
    store_only = '[[rule]]\nname = "s"\nthen.forward = "pacs"\n'
    assert _query(store_only, STUDY_CT).upstreams == ()
    assert RuleSet.empty().evaluate_retrieve(ASSOC, STUDY_CT, NOW).upstreams == ()


def test_query_decisions_are_memoised() -> None:
    rs = ruleset(QR_RULES)
    first = rs.evaluate_query(WS, STUDY_MR, NOW)
    assert rs.evaluate_query(WS, STUDY_MR, NOW) is first
    assert rs.evaluate_retrieve(WS, STUDY_MR, NOW) is not first


def test_query_decisions_are_validated() -> None:
    with pytest.raises(ValueError, match="both empty"):
        QueryDecision(upstreams=("pacs",), rules=())
    with pytest.raises(ValueError, match="both empty"):
        QueryDecision(upstreams=(), rules=("r",))
    with pytest.raises(ValueError, match="twice"):
        QueryDecision(upstreams=("pacs", "pacs"), rules=("r",))
    with pytest.raises(ValueError, match="kind"):
        QueryDecision(upstreams=(), rules=(), kind="move")  # type: ignore[arg-type]


# ------------------------------------------------- stores ignore query rules

MIXED = """
[[rule]]
name = "all queries to pacs"
then.query = "pacs"
then.retrieve = "pacs"

[[rule]]
name = "archive"
then.forward = "vna"
then.continue = true

[[rule]]
name = "queries also to vna"
when.StudyDescription = "x"
then.query = "vna"
then.continue = true

[[rule]]
name = "CT to ai"
when.Modality = "CT"
then.forward = "ai"

[[rule]]
name = "catch-all"
then.forward = "pacs"
"""


def test_store_evaluation_ignores_query_rules() -> None:
    decision = decide(MIXED, CT)
    assert decision.rules == ("archive", "CT to ai")
    assert [f.destination for f in decision.forwards] == ["vna", "ai"]
    assert decide(MIXED, dataset(Modality="MR")).rules == ("archive", "catch-all")


def test_only_query_rules_leave_stores_unmatched() -> None:
    text = R + 'then.query = "pacs"\nthen.retrieve = "pacs"\n'
    assert decide(text, CT).outcome == "unmatched"


def test_explain_leaves_query_rules_out() -> None:
    decision, traces = ruleset(MIXED).explain(ASSOC, CT, NOW)
    assert decision == decide(MIXED, CT)
    assert [(t.rule, t.matched, t.reached) for t in traces] == [
        ("archive", True, True), ("CT to ai", True, True), ("catch-all", True, False)]


def test_tags_of_store_and_query_rules_are_kept_apart() -> None:
    rs = ruleset(MIXED + '[[rule]]\nname = "p"\nwhen."(0009,1001)" = "y"\n'
                         'when.QueryRetrieveLevel = "STUDY"\nthen.query = "ai"\n')
    assert rs.needed_tags == {0x00080060}  # Modality
    assert rs.needs_dataset
    assert rs.query_tags == {0x00081030, 0x00091001, 0x00090010, 0x00080052}
    queries_only = ruleset(R + 'when.ModalitiesInStudy = "CT"\nthen.query = "pacs"\n')
    assert not queries_only.needs_dataset and queries_only.needed_tags == frozenset()
    assert queries_only.query_tags == {0x00080061}
    assert RuleSet.empty().query_tags == frozenset()


def test_repr_counts_query_rules() -> None:
    assert repr(ruleset(MIXED)) == "<RuleSet 5 rules (2 query/retrieve) from 0 files>"


# ------------------------------------------------------------ docs and CLI


def test_the_documented_query_example_loads_and_routes() -> None:
    assert rules.__doc__ is not None
    after = rules.__doc__.split("For example::\n\n", 1)[1].splitlines()
    block = itertools.takewhile(lambda line: not line or line.startswith("    "), after)
    rs = RuleSet.from_text(textwrap.dedent("\n".join(block)), destinations={"pacs1", "pacs2"})
    assert len(rs) == 2 and rs.has_query_rules and rs.has_retrieve_rules
    assert rs.evaluate_query(ASSOC, STUDY_CT, NOW).upstreams == ("pacs1", "pacs2")
    assert rs.evaluate_retrieve(ASSOC, STUDY_CT, NOW).upstreams == ("pacs1",)
    assert rs.evaluate_query(WS, STUDY_MR, NOW).rules == ("everything else from the main PACS",)
    assert rs.evaluate_query(ASSOC, STUDY_MR, NOW).upstreams == ()


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="dicom-router")
    add_rules_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["rules", *argv])
    code: int = args.handler(args)
    return code


def test_cli_check_counts_query_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      ) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(MIXED)
    assert _run("check", str(path)) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{path}: 5 rules OK (2 query/retrieve)"


def test_cli_test_does_not_show_query_rules(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(MIXED)
    assert _run("test", str(path), str(CT_SMALL), "--calling-ae", "CT1",
                "--at", "2026-11-25T14:00") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"5 rules (2 query/retrieve, not applied to instances) from {path}")
    assert "query" not in "\n".join(out[1:])
    assert '  decision: forward to vna, ai by rules "archive", "CT to ai"' in out
