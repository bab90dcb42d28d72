"""Evaluation: order, continue and merging, reject/drop/unmatched, explain,
the tags a rule set needs."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset

from rules import AssociationInfo, Changes, Decision, Forward
from tests.rules.support import ASSOC, CT_SMALL, NOW, dataset, decide, ruleset

CT = dataset(Modality="CT", BodyPartExamined="CHEST", PatientName="Doe^John")
MR = dataset(Modality="MR", BodyPartExamined="HEAD")

RULES = """
[[rule]]
name = "archive everything"
[rule.then]
forward = "archive"
continue = true
[[rule.then.change]]
set = { InstitutionName = "ARCHIVED" }

[[rule]]
name = "CT to pacs and ai"
when.Modality = "CT"
[rule.then]
forward = ["pacs", "ai"]
continue = true
[[rule.then.change]]
destination = "ai"
remove = "PatientName"

[[rule]]
name = "chest CT also to ai, anonymised"
when.BodyPartExamined = "CHEST"
[rule.then]
forward = ["ai", "archive"]
[[rule.then.change]]
destination = "ai"
set = { PatientName = "ANON" }

[[rule]]
name = "never reached for chest CT"
then.forward = "other"

"""


def test_continue_accumulates_and_merges_per_destination() -> None:
    decision = decide(RULES, CT)
    assert decision.outcome == "forward"
    assert decision.rules == ("archive everything", "CT to pacs and ai",
                              "chest CT also to ai, anonymised")
    assert [f.destination for f in decision.forwards] == ["archive", "pacs", "ai"]
    archive, pacs, ai = decision.forwards
    assert archive.rules == ("archive everything", "chest CT also to ai, anonymised")
    assert archive.changes.describe() == ["set InstitutionName = 'ARCHIVED'"]
    assert pacs.rules == ("CT to pacs and ai",)
    assert not pacs.changes
    assert ai.rules == ("CT to pacs and ai", "chest CT also to ai, anonymised")
    assert ai.changes.describe() == ["remove PatientName", "set PatientName = 'ANON'"]
    assert decision.status is None


def test_first_non_continue_rule_decides() -> None:
    decision = decide(RULES, MR)  # not CT, not chest: archive, then the catch-all
    assert decision.rules == ("archive everything", "never reached for chest CT")
    assert [f.destination for f in decision.forwards] == ["archive", "other"]


def test_only_continue_rules_matching_is_a_forward() -> None:
    text = '[[rule]]\nname = "c"\nthen.forward = "a"\nthen.continue = true\n'
    decision = decide(text, CT)
    assert (decision.outcome, decision.rules) == ("forward", ("c",))


def test_reject_after_continue_keeps_nothing() -> None:
    text = """
[[rule]]
name = "archive"
then.forward = "archive"
then.continue = true

[[rule]]
name = "no MR from here"
when.Modality = "MR"
then.reject = 0xA801
"""
    decision = decide(text, MR)
    assert decision == Decision(outcome="reject", status=0xA801,
                                rules=("archive", "no MR from here"))
    assert decision.forwards == ()


def test_drop() -> None:
    text = '[[rule]]\nname = "d"\nwhen.Modality = "MR"\nthen.drop = true\n'
    assert decide(text, MR) == Decision(outcome="drop", rules=("d",))
    assert decide(text, CT).outcome == "unmatched"


def test_unmatched_when_no_rule_acts() -> None:
    text = '[[rule]]\nname = "x"\nwhen.Modality = "PT"\nthen.forward = "pacs"\n'
    decision = decide(text, CT)
    assert decision == Decision(outcome="unmatched")
    assert decision.describe() == "unmatched: no rule matched"


def test_rules_are_evaluated_in_order() -> None:
    text = """
[[rule]]
name = "first"
when.Modality = "CT"
then.forward = "one"
[[rule]]
name = "second"
when.Modality = "CT"
then.forward = "two"
"""
    assert decide(text, CT).rules == ("first",)


def test_transparent_forward() -> None:
    text = '[[rule]]\nname = "t"\nthen.forward = "pacs"\nthen.transparent = true\n'
    (forward,) = decide(text, CT).forwards
    assert forward.transparent
    assert forward == Forward(destination="pacs", changes=Changes(), transparent=True,
                              rules=("t",))


def test_describe() -> None:
    assert decide(RULES, CT).describe() == (
        'forward to archive (1 change), pacs, ai (2 changes) by rules "archive everything", '
        '"CT to pacs and ai", "chest CT also to ai, anonymised"')
    reject = Decision(outcome="reject", status=0xA801, rules=("r",))
    assert reject.describe() == 'reject with status 0xA801 by rule "r"'
    assert Decision(outcome="drop", rules=("d",)).describe() == 'drop by rule "d"'
    transparent = '[[rule]]\nname = "t"\nthen.forward = "pacs"\nthen.transparent = true\n'
    assert decide(transparent).describe() == 'forward to pacs (transparent) by rule "t"'


def test_decisions_are_validated() -> None:
    with pytest.raises(ValueError, match="forwards"):
        Decision(outcome="forward", rules=("r",))
    with pytest.raises(ValueError, match="status"):
        Decision(outcome="reject", rules=("r",))
    with pytest.raises(ValueError, match="rules"):
        Decision(outcome="drop")
    with pytest.raises(TypeError, match="peer"):
        AssociationInfo(calling_ae="A", called_ae="B", peer=None)  # type: ignore[arg-type]


def test_evaluate_repeats_give_the_same_decision() -> None:
    rs = ruleset(RULES)
    first = rs.evaluate(ASSOC, CT, NOW)
    assert rs.evaluate(ASSOC, CT, NOW) is first  # built once, memoised
    assert rs.evaluate(ASSOC, MR, NOW) != first


# --------------------------------------------------------------- explain


def test_explain_traces_every_rule() -> None:
    decision, traces = ruleset(RULES).explain(ASSOC, CT, NOW)
    assert decision == decide(RULES, CT)
    assert [(t.rule, t.line, t.matched, t.reached) for t in traces] == [
        ("archive everything", 2, True, True),
        ("CT to pacs and ai", 10, True, True),
        ("chest CT also to ai, anonymised", 20, True, True),
        ("never reached for chest CT", 29, True, False),
    ]
    assert traces[0].reasons == ("no conditions: always matches",)
    assert traces[1].reasons == ("Modality 'CT' equals 'CT'",)
    assert traces[2].file == "rules.toml"


def test_explain_on_a_real_file() -> None:
    ds = pydicom.dcmread(CT_SMALL)
    text = """
[[rule]]
name = "MR"
when.Modality = "MR"
then.forward = "mr"
[[rule]]
name = "GE CT"
when.Manufacturer = "GE*"
when.calling_ae = "CT*"
then.forward = "pacs"
"""
    decision, traces = ruleset(text).explain(ASSOC, ds, NOW)
    assert decision.rules == ("GE CT",)
    assert traces[0].reasons == ("Modality 'CT' does not equal 'MR'",)
    assert traces[1].reasons == ("Manufacturer 'GE MEDICAL SYSTEMS' matches 'GE*'",
                                 "calling AE 'CT1' matches 'CT*'")


# ------------------------------------------------------------ needed tags


def test_needed_tags_and_needs_dataset() -> None:
    text = """
[[rule]]
name = "a"
when.calling_ae = "CT*"
when.any = [ { Modality = "CT" }, { not = { "(0009,1001)" = { present = true } } } ]
then.forward = "pacs"
[[rule.then.change]]
copy = { OtherPatientIDs = "PatientID" }
replace = { AccessionNumber = { pattern = "^A", with = "B" } }
set = { PatientName = "ANON" }
remove = "PatientBirthDate"
"""
    rs = ruleset(text)
    assert rs.needs_dataset
    assert rs.needed_tags == {
        0x00080060,   # Modality
        0x00091001,   # the private element ...
        0x00090010,   # ... and its Private Creator
        0x00100020,   # PatientID, a copy source
        0x00080050,   # AccessionNumber, a replace target
    }


def test_association_only_rules_need_no_dataset() -> None:
    text = ('[[rule]]\nname = "a"\nwhen.calling_ae = "CT*"\nwhen.peer = "10.0.0.0/8"\n'
            'then.forward = "pacs"\n')
    rs = ruleset(text)
    assert not rs.needs_dataset
    assert rs.needed_tags == frozenset()
    assert rs.evaluate(ASSOC, Dataset(), NOW).rules == ("a",)


def test_different_association_different_decision() -> None:
    text = '[[rule]]\nname = "a"\nwhen.calling_ae = "CT*"\nthen.forward = "pacs"\n'
    rs = ruleset(text)
    other = AssociationInfo(calling_ae="MR1", called_ae="X", peer="127.0.0.1")
    assert rs.evaluate(ASSOC, Dataset(), NOW).outcome == "forward"
    assert rs.evaluate(other, Dataset(), NOW).outcome == "unmatched"
