"""Properties over generated data sets and associations: evaluate never
raises, and explain always reaches the decision evaluate does."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from rules import AssociationInfo
from tests.rules.support import ruleset

RULES = ruleset("""
[[rule]]
name = "copy all CT"
when.Modality = ["CT", "C?"]
then.forward = "archive"
then.continue = true

[[rule]]
name = "numbers"
when.any = [ { SeriesNumber = { min = 2, max = 5 } }, { SliceThickness = 1.5 } ]
when.not = { ImageType = { regex = "^DERIVED" } }
then.forward = ["pacs", "ai"]
then.continue = true
[[rule.then.change]]
destination = "ai"
set = { PatientName = "ANON" }

[[rule]]
name = "dates"
when.StudyDate = { min = 2020-01-01, max = "20251231" }
when."(0009,1001)" = { present = false }
when.time = { days = ["mon", "tue", "wed", "thu", "fri"], from = "22:00", to = "06:00" }
then.reject = 0xA700

[[rule]]
name = "from the lab"
when.calling_ae = "LAB*"
when.peer = ["10.0.0.0/8", "fd00::/8"]
then.drop = true

[[rule]]
name = "rest"
when.StudyDescription = { wildcard = "*head*" }
then.forward = "other"
""")

_text = st.text(alphabet=st.characters(codec="latin-1"), max_size=12)
_numbers = st.one_of(st.integers(-10, 10), st.floats(allow_nan=True, width=32))


@st.composite
def _datasets(draw: st.DrawFn) -> Dataset:
    ds = Dataset()
    if draw(st.booleans()):
        ds.add_new(0x00080060, "CS", draw(st.sampled_from(["CT", "CR", "MR", "", None])))
    if draw(st.booleans()):
        ds.add_new(0x00200011, "IS", draw(st.one_of(st.integers(-5, 10), st.just(""))))
    if draw(st.booleans()):
        ds.add_new(0x00180050, "DS", draw(st.sampled_from(["1.5", "1.50", "2", "", "-0"])))
    if draw(st.booleans()):
        ds.add_new(0x00080008, "CS", draw(st.lists(st.sampled_from(
            ["ORIGINAL", "DERIVED", "PRIMARY", ""]), max_size=3)))
    if draw(st.booleans()):
        ds.add_new(0x00080020, "DA", draw(st.one_of(
            st.dates().map(lambda d: d.strftime("%Y%m%d")), _text)))
    if draw(st.booleans()):
        ds.add_new(0x00081030, "LO", draw(_text))
    if draw(st.booleans()):
        ds.add_new(0x00091001, "UN", draw(st.binary(max_size=8)))
    return ds


_associations = st.builds(
    lambda calling, peer: AssociationInfo(calling_ae=calling, called_ae="R", peer=peer),
    st.one_of(st.sampled_from(["LAB1", "LAB", "CT1", " LAB2 "]), _text),
    st.one_of(st.sampled_from(["10.1.1.1", "fd00::1", "::ffff:10.0.0.1", "192.168.0.1"]),
              _text))


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on invalid generated values
@settings(max_examples=300, deadline=None)
@given(_associations, _datasets(), st.datetimes(min_value=dt.datetime(2000, 1, 1)))
def test_evaluate_and_explain_agree(assoc: AssociationInfo, ds: Dataset,
                                    now: dt.datetime) -> None:
    decision = RULES.evaluate(assoc, ds, now)
    explained, traces = RULES.explain(assoc, ds, now)
    assert explained == decision
    acted = tuple(t.rule for t in traces if t.reached and t.matched)
    assert acted == decision.rules
    if decision.outcome == "forward":
        destinations = [f.destination for f in decision.forwards]
        assert len(destinations) == len(set(destinations))
