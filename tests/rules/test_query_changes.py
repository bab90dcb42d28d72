"""Attribute changes in query/retrieve rules (DESIGN.md D7): ``applies_to =
"query"`` (the request's identifier) and ``"result"`` (each C-FIND match):
loading and its problems, merging in evaluate_query and evaluate_retrieve,
needed tags, and applying them to identifiers and results."""

from __future__ import annotations

import copy
import itertools
import textwrap

import pytest
from pydicom.dataset import Dataset

import rules
from rules import AssociationInfo, Changes, QueryDecision, RemoveOp, RuleSet, SetOp
from tests.rules.support import ASSOC, NOW, dataset, decide, problems, ruleset

UPSTREAMS = {"pacs", "pacs1", "pacs2", "vna"}
R = '[[rule]]\nname = "q"\n'
EXT = AssociationInfo(calling_ae="EXT1", called_ae="DICOM-ROUTER", peer="10.1.2.3")


def _identifier(**attributes: object) -> Dataset:
    return dataset(QueryRetrieveLevel="PATIENT", **attributes)


# ---------------------------------------------------------------- loading


def test_query_and_result_changes_load_in_file_order() -> None:
    text = R + """[rule.then]
query = "pacs"
retrieve = "pacs"
[[rule.then.change]]
applies_to = "result"
remove = "PatientBirthDate"
[[rule.then.change]]
applies_to = "query"
set = { IssuerOfPatientID = "HOSP" }
[[rule.then.change]]
applies_to = "result"
copy = { OtherPatientIDs = "PatientID" }
replace = { PatientID = { pattern = '^', with = 'HOSP-' } }
"""
    rule = ruleset(text, destinations=UPSTREAMS).rules[0]
    assert rule.query_changes.describe() == ["set IssuerOfPatientID = 'HOSP'"]
    assert rule.result_changes.describe() == [
        "remove PatientBirthDate", "copy PatientID to OtherPatientIDs",
        "replace in PatientID '^' with 'HOSP-'"]
    assert rule.changes == () and rule.forward == ()
    assert rule.action == "query/retrieve"


def test_inline_change_table_and_retrieve_only_query_changes() -> None:
    text = (R + 'then.query = "pacs"\n'
            'then.change = { applies_to = "query", remove = ["PatientBirthDate"] }\n'
            '[[rule]]\nname = "r"\nthen.retrieve = "vna"\n'
            '[[rule.then.change]]\napplies_to = "query"\n'
            'set = { "(0009,1001)" = { vr = "LO", value = "x" } }\n')
    q, r = ruleset(text).rules
    assert q.query_changes == Changes(operations=(
        RemoveOp(tag=0x00100030, label="PatientBirthDate"),))
    assert not q.result_changes
    assert r.query_changes == Changes(operations=(
        SetOp(tag=0x00091001, label="(0009,1001)", vr="LO", value="x"),))
    assert not r.result_changes


def test_store_rules_have_no_query_or_result_changes() -> None:
    rule = ruleset('[[rule]]\nname = "s"\nthen.forward = "pacs"\n'
                   '[[rule.then.change]]\nremove = "PatientID"\n').rules[0]
    assert rule.changes[0].describe() == ["remove PatientID"]
    assert not rule.query_changes and not rule.result_changes


QUERY_RULE = R + '[rule.then]\nquery = "pacs"\n'          # the change starts at line 5
RETRIEVE_RULE = R + '[rule.then]\nretrieve = "pacs"\n'

LOAD_CASES = [
    pytest.param(QUERY_RULE + '[[rule.then.change]]\nremove = "PatientID"\n',
                 'rules.toml:5: rule "q": a change in a query rule needs applies_to = "query" '
                 'or "result"', id="query-without-applies-to"),
    pytest.param(QUERY_RULE + '[[rule.then.change]]\napplies_to = "query"\nremove = "PatientID"'
                 '\n[[rule.then.change]]\nset = { PatientName = "x" }\n',
                 'rules.toml:8: rule "q": a change in a query rule needs applies_to = "query" '
                 'or "result"', id="second-change-without-applies-to"),
    pytest.param(RETRIEVE_RULE + '[[rule.then.change]]\nremove = "PatientID"\n',
                 'rules.toml:5: rule "q": a change in a retrieve rule needs applies_to = '
                 '"query" (the C-MOVE/C-GET identifier)', id="retrieve-without-applies-to"),
    pytest.param(QUERY_RULE + '[[rule.then.change]]\napplies_to = "query"\ndestination = "pacs"'
                 '\nremove = "PatientID"\n',
                 'rules.toml:7: rule "q": change.destination applies to forward rules only',
                 id="destination-in-query-rule"),
    pytest.param(RETRIEVE_RULE + '[[rule.then.change]]\napplies_to = "query"\n'
                 'destination = "pacs"\nremove = "PatientID"\n',
                 'rules.toml:7: rule "q": change.destination applies to forward rules only',
                 id="destination-in-retrieve-rule"),
    pytest.param(R + '[rule.then]\nforward = "pacs"\n[[rule.then.change]]\n'
                 'applies_to = "query"\nremove = "PatientID"\n',
                 'rules.toml:6: rule "q": change.applies_to applies to query and retrieve rules '
                 "only: a forward rule's changes apply to the copies sent to destinations",
                 id="applies-to-in-store-rule"),
    pytest.param(RETRIEVE_RULE + '[[rule.then.change]]\napplies_to = "result"\n'
                 'remove = "PatientBirthDate"\n',
                 'rules.toml:6: rule "q": change: applies_to = "result" in a rule without '
                 "query: retrieves have no result identifiers to change",
                 id="result-in-retrieve-only-rule"),
    pytest.param(QUERY_RULE + '[[rule.then.change]]\napplies_to = "results"\n'
                 'remove = "PatientID"\n',
                 'rules.toml:6: rule "q": change: applies_to: expected "query" (the request\'s '
                 'identifier) or "result" (each C-FIND match), got "results"',
                 id="applies-to-unknown"),
    pytest.param(QUERY_RULE + '[[rule.then.change]]\napplies_to = ["query"]\n'
                 'remove = "PatientID"\n',
                 'rules.toml:6: rule "q": change: applies_to: expected "query" (the request\'s '
                 'identifier) or "result" (each C-FIND match), got ["query"]',
                 id="applies-to-list"),
    pytest.param(QUERY_RULE + '[[rule.then.change]]\napplies_to = "query"\n',
                 'rules.toml:5: rule "q": change: expected set, remove, copy or replace',
                 id="no-operation"),
    pytest.param(QUERY_RULE + '[[rule.then.change]]\napplies_to = "result"\n'
                 'remove = "PatientBirthDat"\n',
                 "rules.toml:7: rule \"q\": remove: unknown attribute keyword "
                 "'PatientBirthDat' (did you mean 'PatientBirthDate'?)",
                 id="bad-operation"),
    pytest.param(QUERY_RULE + '[[rule.then.change]]\napplies_to = "query"\n'
                 'aplies_to = "result"\n',
                 "rules.toml:7: rule \"q\": unknown key 'aplies_to' in change (did you mean "
                 "'applies_to'?): expected applies_to, destination, set, remove, copy or "
                 "replace", id="unknown-key"),
]


@pytest.mark.parametrize(("text", "expected"), LOAD_CASES)
def test_query_change_problem(text: str, expected: str) -> None:
    assert problems(text, destinations=UPSTREAMS) == [expected]


def test_every_query_change_problem_is_reported() -> None:
    text = (QUERY_RULE + '[[rule.then.change]]\ndestination = "pacs"\nremove = "PatientID"\n'
            '[[rule.then.change]]\napplies_to = "result"\nset = { Rows = "x" }\n')
    assert problems(text) == [
        'rules.toml:6: rule "q": change.destination applies to forward rules only',
        'rules.toml:5: rule "q": a change in a query rule needs applies_to = "query" or '
        '"result"',
        "rules.toml:10: rule \"q\": set: Rows (US) needs an integer, got \"x\"",
    ]


def test_store_action_with_query_changes_reports_the_store_action() -> None:
    text = (QUERY_RULE + 'transparent = true\n[[rule.then.change]]\napplies_to = "query"\n'
            'remove = "PatientID"\n')
    assert problems(text) == [
        'rules.toml:5: rule "q": query cannot be combined with transparent: a rule routes '
        "either stored instances or queries"]


# ------------------------------------------------------------- evaluation

MERGED = """
[[rule]]
name = "a"
then.query = "pacs1"
then.retrieve = "pacs1"
then.continue = true
[[rule.then.change]]
applies_to = "query"
set = { IssuerOfPatientID = "HOSP" }
[[rule.then.change]]
applies_to = "result"
remove = "PatientBirthDate"

[[rule]]
name = "b: no changes"
then.query = "pacs2"
then.continue = true

[[rule]]
name = "c: MR only"
when.ModalitiesInStudy = "MR"
then.query = "vna"
then.continue = true
[[rule.then.change]]
applies_to = "result"
set = { InstitutionName = "VNA" }

[[rule]]
name = "d"
then.query = "pacs1"
then.retrieve = "vna"
[[rule.then.change]]
applies_to = "result"
replace = { PatientID = { pattern = '^', with = 'H-' } }
[[rule.then.change]]
applies_to = "query"
replace = { PatientID = { pattern = '^H-', with = '' } }
remove = "IssuerOfPatientID"

[[rule]]
name = "never reached"
then.query = "pacs"
[[rule.then.change]]
applies_to = "query"
remove = "PatientID"
"""


def test_query_changes_merge_in_rule_order() -> None:
    rs = ruleset(MERGED, destinations=UPSTREAMS)
    decision = rs.evaluate_query(ASSOC, dataset(ModalitiesInStudy="MR"), NOW)
    assert decision.rules == ("a", "b: no changes", "c: MR only", "d")
    assert decision.upstreams == ("pacs1", "pacs2", "vna")
    assert decision.query_changes.describe() == [
        "set IssuerOfPatientID = 'HOSP'", "replace in PatientID '^H-' with ''",
        "remove IssuerOfPatientID"]
    assert decision.result_changes.describe() == [
        "remove PatientBirthDate", "set InstitutionName = 'VNA'",
        "replace in PatientID '^' with 'H-'"]
    assert decision.describe() == ('query pacs1, pacs2, vna by rules "a", "b: no changes", '
                                   '"c: MR only", "d" (3 query changes, 3 result changes)')
    ct = rs.evaluate_query(ASSOC, dataset(ModalitiesInStudy="CT"), NOW)
    assert ct.rules == ("a", "b: no changes", "d")
    assert [op.describe() for op in ct.result_changes.operations] == [
        "remove PatientBirthDate", "replace in PatientID '^' with 'H-'"]


def test_retrieve_decisions_take_query_changes_only() -> None:
    decision = ruleset(MERGED).evaluate_retrieve(ASSOC, _identifier(PatientID="H-1"), NOW)
    assert decision.kind == "retrieve" and decision.rules == ("a", "d")
    assert decision.upstreams == ("pacs1", "vna")
    assert len(decision.query_changes.operations) == 3
    assert decision.result_changes == Changes()
    assert decision.describe() == 'retrieve from pacs1, vna by rules "a", "d" (3 query changes)'


def test_describe_counts_singular_and_plural() -> None:
    one = Changes(operations=(RemoveOp(tag=0x00100030, label="PatientBirthDate"),))
    two = Changes.join([one, one])
    assert QueryDecision(upstreams=("pacs",), rules=("x",), query_changes=one,
                         result_changes=two).describe() == (
        'query pacs by rule "x" (1 query change, 2 result changes)')
    assert QueryDecision(upstreams=("pacs",), rules=("x",),
                         result_changes=one).describe() == (
        'query pacs by rule "x" (1 result change)')
    assert QueryDecision(upstreams=("pacs",), rules=("x",)).describe() == 'query pacs by rule "x"'


def test_no_changes_without_a_match_or_without_change_tables() -> None:
    text = (R + 'when.QueryRetrieveLevel = "IMAGE"\nthen.query = "pacs"\n'
            '[[rule.then.change]]\napplies_to = "query"\nremove = "PatientID"\n'
            '[[rule]]\nname = "plain"\nwhen.QueryRetrieveLevel = "SERIES"\n'
            'then.query = "pacs"\n')
    rs = ruleset(text)
    unmatched = rs.evaluate_query(ASSOC, _identifier(), NOW)
    assert unmatched == QueryDecision(upstreams=(), rules=())
    assert unmatched.query_changes == unmatched.result_changes == Changes()
    plain = rs.evaluate_query(ASSOC, dataset(QueryRetrieveLevel="SERIES"), NOW)
    assert plain.rules == ("plain",) and not plain.query_changes and not plain.result_changes
    assert plain == QueryDecision(upstreams=("pacs",), rules=("plain",))


def test_conditions_read_the_identifier_as_received() -> None:
    # "a" would change PatientID; "b" still sees the original.
    text = (R + 'then.query = "pacs1"\nthen.continue = true\n'
            '[[rule.then.change]]\napplies_to = "query"\nset = { PatientID = "changed" }\n'
            '[[rule]]\nname = "b"\nwhen.PatientID = "orig"\nthen.query = "pacs2"\n')
    identifier = _identifier(PatientID="orig")
    decision = ruleset(text).evaluate_query(ASSOC, identifier, NOW)
    assert decision.rules == ("q", "b")
    assert identifier.PatientID == "orig"  # evaluation changes nothing


def test_query_decisions_with_changes_are_memoised() -> None:
    rs = ruleset(MERGED)
    first = rs.evaluate_query(ASSOC, dataset(ModalitiesInStudy="MR"), NOW)
    assert rs.evaluate_query(ASSOC, dataset(ModalitiesInStudy="MR"), NOW) is first


def test_query_decision_changes_are_validated() -> None:
    one = Changes(operations=(RemoveOp(tag=0x00100030, label="PatientBirthDate"),))
    with pytest.raises(ValueError, match="retrieve has no results"):
        QueryDecision(upstreams=("pacs",), rules=("r",), kind="retrieve", result_changes=one)
    with pytest.raises(ValueError, match="rules that matched"):
        QueryDecision(upstreams=(), rules=(), query_changes=one)
    with pytest.raises(TypeError, match="expected Changes"):
        QueryDecision(upstreams=("pacs",), rules=("r",),
                      query_changes=[one])  # type: ignore[arg-type]
    assert QueryDecision(upstreams=("pacs",), rules=("r",), kind="retrieve",
                         query_changes=one).query_changes is one


def test_stores_ignore_query_changes() -> None:
    text = (R + 'then.query = "pacs"\nthen.continue = true\n'
            '[[rule.then.change]]\napplies_to = "query"\nremove = "PatientID"\n'
            '[[rule]]\nname = "s"\nthen.forward = "pacs"\n')
    decision = decide(text, dataset(PatientID="1"))
    assert decision.rules == ("s",) and not decision.forwards[0].changes


# ----------------------------------------------------------- needed tags


def test_query_tags_include_the_sources_changes_read() -> None:
    text = (R + 'when.QueryRetrieveLevel = "STUDY"\nthen.query = "pacs"\n'
            '[[rule.then.change]]\napplies_to = "query"\n'
            'copy = { OtherPatientIDs = "PatientID" }\nset = { PatientName = "x" }\n'
            'remove = "PatientSex"\n'
            '[[rule.then.change]]\napplies_to = "result"\n'
            'replace = { AccessionNumber = { pattern = "^A", with = "B" } }\n'
            'copy = { "(0011,1001)" = "(0009,1002)" }\n'
            '[[rule]]\nname = "r"\nthen.retrieve = "pacs"\n'
            '[[rule.then.change]]\napplies_to = "query"\n'
            'replace = { StudyID = { pattern = "x", with = "y" } }\n'
            '[[rule]]\nname = "s"\nwhen.Modality = "CT"\nthen.forward = "pacs"\n')
    rs = ruleset(text)
    assert rs.query_tags == {
        0x00080052,  # QueryRetrieveLevel: a condition
        0x00100020,  # PatientID: a copy source (query)
        0x00080050,  # AccessionNumber: a replace target (result)
        0x00091002, 0x00090010,  # a private copy source (result), and its creator
        0x00200010,  # StudyID: a replace target (retrieve's query)
    }
    assert rs.needed_tags == {0x00080060}  # Modality only: stores read no query changes


# ---------------------------------------------------------------- applying


def test_changes_apply_to_an_identifier_and_a_result() -> None:
    text = R + """when.QueryRetrieveLevel = ["PATIENT", "STUDY"]
then.query = "pacs"
[[rule.then.change]]
applies_to = "query"
set = { IssuerOfPatientID = "HOSP" }
replace = { PatientID = { pattern = '^HOSP-', with = '' } }
[[rule.then.change]]
applies_to = "result"
remove = ["PatientBirthDate", "IssuerOfPatientID"]
copy = { OtherPatientIDs = "PatientID" }
replace = { PatientID = { pattern = '^(.+)$', with = 'HOSP-\\1' } }
"""
    received = dataset(QueryRetrieveLevel="STUDY", PatientID="HOSP-12*", PatientName="",
                       PatientBirthDate="", StudyInstanceUID="")
    decision = ruleset(text).evaluate_query(ASSOC, received, NOW)
    upstream = copy.deepcopy(received)
    decision.query_changes.apply(upstream)
    assert upstream.PatientID == "12*"
    assert upstream.IssuerOfPatientID == "HOSP"
    assert upstream["IssuerOfPatientID"].VR == "LO"
    assert upstream.PatientBirthDate == "" and upstream.PatientName == ""  # return keys kept
    assert received.PatientID == "HOSP-12*" and "IssuerOfPatientID" not in received

    match = dataset(QueryRetrieveLevel="STUDY", PatientID="12345", PatientName="Doe^J",
                    PatientBirthDate="19700101", IssuerOfPatientID="HOSP",
                    StudyInstanceUID="1.2.3")
    decision.result_changes.apply(match)
    assert match.PatientID == "HOSP-12345"
    assert match.OtherPatientIDs == "12345"
    assert "PatientBirthDate" not in match and "IssuerOfPatientID" not in match
    assert (match.PatientName, match.StudyInstanceUID) == ("Doe^J", "1.2.3")

    empty = dataset(QueryRetrieveLevel="STUDY", PatientID="", StudyInstanceUID="1.2.4")
    decision.result_changes.apply(empty)
    assert empty.PatientID == ""  # an empty value is left empty
    assert empty.OtherPatientIDs == ""


def test_query_changes_apply_to_a_move_identifier() -> None:
    text = (R + 'then.query = "pacs"\nthen.retrieve = "pacs"\n'
            '[[rule.then.change]]\napplies_to = "query"\n'
            "replace = { PatientID = { pattern = '^HOSP-', with = '' } }\n"
            '[[rule.then.change]]\napplies_to = "result"\nremove = "PatientBirthDate"\n')
    move = dataset(QueryRetrieveLevel="PATIENT", PatientID="HOSP-12345")
    decision = ruleset(text).evaluate_retrieve(ASSOC, move, NOW)
    decision.query_changes.apply(move)
    assert move.PatientID == "12345"
    assert not decision.result_changes


# ------------------------------------------------------------------ docs


def test_the_documented_query_change_example() -> None:
    assert rules.__doc__ is not None
    after = rules.__doc__.split("as ``HOSP-<id>``::\n\n", 1)[1].splitlines()
    block = itertools.takewhile(lambda line: not line or line.startswith("    "), after)
    rs = RuleSet.from_text(textwrap.dedent("\n".join(block)), destinations={"pacs"})
    decision = rs.evaluate_query(EXT, _identifier(PatientID="HOSP-12*"), NOW)
    assert decision.describe() == ('query pacs by rule "external viewers see prefixed '
                                   'patient IDs" (2 query changes, 2 result changes)')
    identifier = _identifier(PatientID="HOSP-12*", PatientBirthDate="")
    decision.query_changes.apply(identifier)
    assert (identifier.PatientID, identifier.IssuerOfPatientID) == ("12*", "HOSP")
    match = _identifier(PatientID="12345", PatientBirthDate="19700101")
    decision.result_changes.apply(match)
    assert match.PatientID == "HOSP-12345" and "PatientBirthDate" not in match
    blank = _identifier(PatientID="")
    decision.result_changes.apply(blank)
    assert blank.PatientID == ""
    retrieve = rs.evaluate_retrieve(EXT, _identifier(PatientID="HOSP-1"), NOW)
    assert retrieve.upstreams == ("pacs",) and len(retrieve.query_changes.operations) == 2
    assert rs.evaluate_query(ASSOC, _identifier(), NOW).upstreams == ()
