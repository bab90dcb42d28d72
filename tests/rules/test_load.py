"""Loading: one case per validation error, with the file:line it names; files
and folders; collecting every problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import rules
from rules import Problem, RuleError, RuleSet
from tests.rules.support import NOW, dataset, one_rule, problems, ruleset

R = '[[rule]]\nname = "r"\n'
# How a refused reject status ends (rules.load.failure_status_problem).
_HINT = ("; failures are Axxx, Cxxx and the 01xx and 02xx codes of Annex C, e.g. 0xA700 "
         "(out of resources), 0xA900 (data set does not match SOP class), 0xC000 (cannot "
         "understand) or 0x0124 (not authorized)")


def _change(body: str) -> str:
    """A rule forwarding to "p" with one change table (its body on line 5)."""
    return R + 'then.forward = "p"\n[[rule.then.change]]\n' + body + "\n"


# (rule file text, the one problem it must give). Line numbers count from 1;
# one_rule() puts the conditions on line 4 and the actions from line 6.
CASES = [
    pytest.param('x = \n', "rules.toml:1: not valid TOML: Invalid value (at line 1, column 5)",
                 id="toml-syntax"),
    pytest.param(R + 'name = "s"\n',
                 "rules.toml:3: not valid TOML: Cannot overwrite a value (at line 3, column 11)",
                 id="toml-duplicate-key"),
    pytest.param('rules = 1\n' + R + 'then.drop = true\n',
                 "rules.toml:1: unknown top-level key 'rules' (did you mean 'rule'?): "
                 "a rule file holds [[rule]] tables only", id="unknown-top-level-key"),
    pytest.param('# rules\n\n[[rules]]\nname = "x"\n',
                 "rules.toml:3: unknown top-level key 'rules' (did you mean 'rule'?): "
                 "a rule file holds [[rule]] tables only", id="unknown-top-level-table"),
    pytest.param('[rule]\nname = "x"\n',
                 "rules.toml:1: 'rule' must be an array of tables: write [[rule]], not [rule]",
                 id="rule-not-an-array"),
    pytest.param('[[rule]]\nthen.drop = true\n',
                 'rules.toml:1: the rule has no name: add name = "..." (names must be unique)',
                 id="missing-name"),
    pytest.param('[[rule]]\nname = 3\nthen.drop = true\n',
                 "rules.toml:2: name: expected a non-empty string, got 3", id="name-type"),
    pytest.param(R + 'then.drop = true\n\n' + R + 'then.drop = true\n',
                 'rules.toml:6: rule "r": duplicate rule name: it is already used at '
                 "rules.toml:1", id="duplicate-name"),
    pytest.param(R + 'whne.Modality = "CT"\nthen.drop = true\n',
                 "rules.toml:3: rule \"r\": unknown key 'whne' in a rule (did you mean "
                 "'when'?): a rule has name, description, when and then", id="unknown-rule-key"),
    pytest.param(R + '[rule.then]\nforwrd = "pacs"\n',
                 "rules.toml:4: rule \"r\": unknown key 'forwrd' in then (did you mean "
                 "'forward'?): expected forward, transparent, reject, drop, continue, change, "
                 "query or retrieve",
                 id="unknown-then-key"),
    pytest.param(_change('sett = { PatientName = "x" }'),
                 "rules.toml:5: rule \"r\": unknown key 'sett' in change (did you mean 'set'?): "
                 "expected applies_to, destination, set, remove, copy or replace",
                 id="unknown-change-key"),
    pytest.param(one_rule('Modallity = "CT"'),
                 "rules.toml:4: rule \"r\": unknown attribute keyword 'Modallity' "
                 "(did you mean 'Modality'?)", id="unknown-keyword"),
    pytest.param(one_rule('calling_aet = "CT"'),
                 "rules.toml:4: rule \"r\": unknown attribute keyword 'calling_aet' "
                 "(did you mean 'calling_ae'?)", id="unknown-when-key"),
    pytest.param(one_rule('"(0010,001)" = "x"'),
                 "rules.toml:4: rule \"r\": malformed tag '(0010,001)': expected (gggg,eeee), "
                 "gggg,eeee or ggggeeee in hexadecimal", id="malformed-tag"),
    # Values the attribute's VR cannot have loaded and never matched (an outside
    # campaign); the regex the message gives matches such a value all the same.
    pytest.param(one_rule('Modality = "ct"'),
                 'rules.toml:4: rule "r": Modality: "ct" matches no value DICOM allows: '
                 "Modality is CS: a code string holds upper-case letters, digits, space and "
                 'underscore only; did you mean "CT"? (a value sent so against the standard '
                 "is matched by { regex = '^ct$' })", id="cs-lower-case"),
    pytest.param(one_rule('StudyDate = "2004-01-19"'),
                 'rules.toml:4: rule "r": StudyDate: "2004-01-19" matches no value DICOM '
                 'allows: StudyDate is DA: expected a date as YYYYMMDD; did you mean '
                 '"20040119" (or a TOML date, 2004-01-19 unquoted)? (a value sent so against '
                 "the standard is matched by { regex = '^2004\\-01\\-19$' })",
                 id="da-with-dashes"),
    pytest.param(one_rule('SOPClassUID = ["1.2.3", "CTImageStorage"]'),
                 'rules.toml:4: rule "r": SOPClassUID: "CTImageStorage" matches no value '
                 'DICOM allows: SOPClassUID is UI: expected digits and dots; did you mean '
                 '"1.2.840.10008.5.1.4.1.1.2" (its UID)? (a value sent so against the '
                 "standard is matched by { regex = '^CTImageStorage$' })", id="ui-keyword"),
    pytest.param(one_rule("PatientAge = { max = 18 }"),
                 'rules.toml:4: rule "r": PatientAge is an age string as 018Y (days D, weeks '
                 'W, months M, years Y): compare text of one unit, as { min = "000Y", max = '
                 '"018Y" }', id="as-number"),
    # Was "unknown attribute keyword '0x00100030'" (an outside campaign).
    pytest.param(one_rule('"0x00100030" = "x"'),
                 "rules.toml:4: rule \"r\": malformed tag '0x00100030': no 0x in rule files; "
                 'did you mean "(0010,0030)"?', id="tag-with-0x"),
    pytest.param(one_rule('TransferSyntaxUID = "1.2"'),
                 "rules.toml:4: rule \"r\": 'TransferSyntaxUID' is in the file meta information "
                 "(group 0002), which a C-STORE data set does not carry", id="file-meta-tag"),
    pytest.param(one_rule('Modality = { regexp = "C" }'),
                 "rules.toml:4: rule \"r\": Modality: unknown operator 'regexp' (did you mean "
                 "'regex'?); the operators are equals, wildcard, regex, in, min, max or present",
                 id="unknown-operator"),
    pytest.param(one_rule('Modality = { equals = "CT", regex = "C" }'),
                 'rules.toml:4: rule "r": Modality: more than one operator in one table '
                 "(equals, regex): write one condition per operator and combine them with "
                 "all = [...] or any = [...]", id="two-operators"),
    pytest.param(one_rule('Modality = {}'),
                 'rules.toml:4: rule "r": Modality: empty table: expected one operator '
                 "(equals, wildcard, regex, in, min, max or present)", id="no-operator"),
    pytest.param(one_rule('calling_ae = 3'),
                 'rules.toml:4: rule "r": calling_ae: expected an AE title or a non-empty list '
                 "of AE titles (strings), got 3", id="calling-ae-type"),
    pytest.param(one_rule('called_ae = []'),
                 'rules.toml:4: rule "r": called_ae: expected an AE title or a non-empty list '
                 "of AE titles (strings), got []", id="called-ae-empty"),
    pytest.param(one_rule('calling_ae = "ABCDEFGHIJKLMNOPQ"'),
                 "rules.toml:4: rule \"r\": calling_ae: 'ABCDEFGHIJKLMNOPQ' is longer than 16 "
                 "characters, the most an AE title has (PS3.5 6.2)", id="calling-ae-too-long"),
    pytest.param(one_rule('', 'forward = 7'),
                 'rules.toml:6: rule "r": forward: expected a destination name or a non-empty '
                 "list of them (strings), got 7", id="forward-type"),
    pytest.param(one_rule('', 'forward = ["pacs", "pacs"]'),
                 "rules.toml:6: rule \"r\": forward: destination 'pacs' is listed twice",
                 id="forward-twice"),
    pytest.param(one_rule('time = { days = ["mon", "funday"] }'),
                 "rules.toml:4: rule \"r\": time: unknown day 'funday' (expected mon, tue, wed, "
                 "thu, fri, sat or sun)", id="bad-day"),
    pytest.param(one_rule('time = { days = "weekdays" }'),
                 "rules.toml:4: rule \"r\": time: unknown day 'weekdays' (expected mon, tue, "
                 "wed, thu, fri, sat or sun)", id="bad-day-string"),
    pytest.param(one_rule('time = { from = "25:00", to = "06:00" }'),
                 'rules.toml:4: rule "r": time: from = "25:00": expected a time of day as '
                 '"07:00", "07:00:30" or 07:00:00 (24:00 allowed for to)', id="bad-time"),
    pytest.param(one_rule('time = { from = "07:00", to = 7 }'),
                 'rules.toml:4: rule "r": time: to = 7: expected a time of day as '
                 '"07:00", "07:00:30" or 07:00:00 (24:00 allowed for to)', id="time-type"),
    pytest.param(one_rule('time = { from = "07:00" }'),
                 'rules.toml:4: rule "r": time: from and to go together: give both, or neither '
                 "for whole days", id="from-without-to"),
    pytest.param(one_rule('time = { from = "07:00", to = "07:00" }'),
                 'rules.toml:4: rule "r": time: from and to are the same time: the window '
                 "would be empty", id="empty-window"),
    pytest.param(one_rule('time = { day = ["mon"] }'),
                 "rules.toml:4: rule \"r\": time: unknown key 'day' (did you mean 'days'?): "
                 "expected days, from and to", id="time-unknown-key"),
    pytest.param(one_rule('time = "07:00-19:00"'),
                 'rules.toml:4: rule "r": time: expected a table such as { days = ["mon", '
                 '"fri"], from = "07:00", to = "19:00" }, got "07:00-19:00"', id="time-not-table"),
    pytest.param(one_rule('peer = 5'),
                 'rules.toml:4: rule "r": peer: expected an IP address or network (CIDR) or a '
                 "non-empty list of them (strings), got 5", id="peer-type"),
    pytest.param(one_rule('peer = "10.0.0.1/8"'),
                 'rules.toml:4: rule "r": peer: 10.0.0.1/8 has host bits set '
                 "(the network is 10.0.0.0/8)", id="bad-cidr"),
    pytest.param(one_rule('peer = ["10.0.0.0/8", "300.1.1.1"]'),
                 "rules.toml:4: rule \"r\": peer: '300.1.1.1' does not appear to be an IPv4 or "
                 "IPv6 network", id="bad-ip"),
    pytest.param(one_rule('peer = "fd00::/300"'),
                 "rules.toml:4: rule \"r\": peer: 'fd00::/300' does not appear to be an IPv4 or "
                 "IPv6 network", id="bad-ipv6-prefix"),
    pytest.param(one_rule('any = { Modality = "CT" }'),
                 'rules.toml:4: rule "r": any: expected a non-empty list of condition tables, '
                 'got { Modality = "CT" }', id="any-type"),
    pytest.param(one_rule('all = []'),
                 'rules.toml:4: rule "r": all: expected a non-empty list of condition tables, '
                 "got []", id="all-empty"),
    pytest.param(one_rule('not = "CT"'),
                 'rules.toml:4: rule "r": not: expected a table of conditions, got "CT"',
                 id="not-type"),
    pytest.param(one_rule('any = [ { Modality = "CT" }, "MR" ]'),
                 'rules.toml:4: rule "r": any[1]: expected a table of conditions, got "MR"',
                 id="any-item-type"),
    pytest.param(one_rule('Modality = { present = "yes" }'),
                 'rules.toml:4: rule "r": Modality: present: expected true or false, got "yes"',
                 id="present-type"),
    pytest.param(one_rule('Modality = { wildcard = 3 }'),
                 'rules.toml:4: rule "r": Modality: wildcard: expected a string, got 3',
                 id="wildcard-type"),
    pytest.param(one_rule('Modality = { in = "CT" }'),
                 'rules.toml:4: rule "r": Modality: in: expected a list, got "CT"', id="in-type"),
    pytest.param(one_rule('Modality = []'),
                 'rules.toml:4: rule "r": Modality: empty list: expected at least one value',
                 id="empty-list"),
    pytest.param(one_rule('Modality = true'),
                 'rules.toml:4: rule "r": Modality: expected a string, a number, a date, a list '
                 "of them or a table with one operator, got true (to test presence write "
                 "{ present = true })", id="bool-value"),
    pytest.param(one_rule('SliceThickness = { min = "1.5" }'),
                 'rules.toml:4: rule "r": SliceThickness: min: expected a number for '
                 'SliceThickness (DS), got "1.5"', id="min-type"),
    pytest.param(one_rule('StudyDate = { min = "2024-13" }'),
                 'rules.toml:4: rule "r": StudyDate: min: expected a date as 2024-01-31 or '
                 '"20240131" for StudyDate (DA), got "2024-13"', id="min-date"),
    pytest.param(one_rule('StudyTime = { max = 2024-01-01 }'),
                 'rules.toml:4: rule "r": StudyTime: max: expected a time as 07:30:00, "0730" '
                 'or "07:30" for StudyTime (TM), got 2024-01-01', id="max-time"),
    pytest.param(one_rule('SeriesNumber = { min = 5, max = 1 }'),
                 'rules.toml:4: rule "r": SeriesNumber: min 5 is greater than max 1: nothing '
                 "can match", id="min-above-max"),
    pytest.param(one_rule('ReferencedSeriesSequence = "x"'),
                 'rules.toml:4: rule "r": ReferencedSeriesSequence is a sequence (SQ): only '
                 "present = true or false can be tested", id="sequence-value"),
    pytest.param(one_rule('StudyDescription = { regex = "(" }'),
                 "rules.toml:4: rule \"r\": StudyDescription: bad regular expression '(': "
                 "missing ), unterminated subpattern at position 0", id="bad-regex"),
    pytest.param(one_rule('PatientName = { regex = "^(a+)+$" }'),
                 "rules.toml:4: rule \"r\": PatientName: regular expression '^(a+)+$': it "
                 "repeats a repeat, which can take exponential time on some values; write it "
                 "without, or make the inner repeat possessive (a++) or atomic ((?>a+))",
                 id="exponential-regex"),
    pytest.param(one_rule('', 'forward = ["pacs", "pacss"]'),
                 "rules.toml:6: rule \"r\": forward: unknown destination 'pacss' (did you mean "
                 "'pacs'?); the configuration has: ai, p, pacs", id="unknown-destination"),
    pytest.param(one_rule('', 'forward = "pacs"\nreject = 0xA700'),
                 'rules.toml:7: rule "r": forward and reject contradict each other: a rejected '
                 "instance is sent nowhere", id="forward-and-reject"),
    pytest.param(one_rule('', 'forward = "pacs"\ndrop = true'),
                 'rules.toml:7: rule "r": forward and drop contradict each other: a dropped '
                 "instance is sent nowhere", id="forward-and-drop"),
    pytest.param(one_rule('', 'reject = 0xA700\ndrop = true'),
                 'rules.toml:7: rule "r": reject and drop contradict each other: reject answers '
                 "with a failure, drop with success", id="reject-and-drop"),
    pytest.param(one_rule('', 'forward = ["pacs", "ai"]\ntransparent = true'),
                 'rules.toml:7: rule "r": transparent = true needs exactly one destination in '
                 "forward, got 2", id="transparent-two-destinations"),
    pytest.param(one_rule('', 'reject = 0xA700\ntransparent = true'),
                 'rules.toml:7: rule "r": transparent = true needs exactly one destination in '
                 "forward, got none", id="transparent-no-destination"),
    pytest.param(one_rule('', 'reject = 0xA700\ncontinue = true'),
                 'rules.toml:7: rule "r": continue = true with reject: a rule that rejects ends '
                 "evaluation", id="continue-with-reject"),
    pytest.param(one_rule('', 'drop = true\ncontinue = true'),
                 'rules.toml:7: rule "r": continue = true with drop: a rule that drops ends '
                 "evaluation", id="continue-with-drop"),
    pytest.param(one_rule('', 'forward = "pacs"\ntransparent = true\ncontinue = true'),
                 'rules.toml:8: rule "r": continue = true with transparent = true: a transparent '
                 "forward relays its destination's status, so it must be the deciding rule",
                 id="continue-with-transparent"),
    pytest.param(R + 'then.forward = "pacs"\nthen.transparent = true\n[[rule.then.change]]\n'
                 'remove = "PatientID"\n',
                 'rules.toml:5: rule "r": change with transparent = true: a transparent forward '
                 "relays the instance exactly as received", id="transparent-with-change"),
    pytest.param(R + 'then.forward = "ai"\nthen.continue = true\n\n[[rule]]\nname = "t"\n'
                 'then.forward = "pacs"\nthen.transparent = true\n',
                 'rules.toml:9: rule "t": transparent = true after a rule with continue = true '
                 '(rule "r" at rules.toml:1): a transparent forward relays its one '
                 "destination's status, so it cannot be combined with the forwards of earlier "
                 "rules", id="transparent-after-continue"),
    pytest.param(one_rule('', 'forward = "pacs"\ncontinue = "yes"'),
                 'rules.toml:7: rule "r": continue: expected true or false, got "yes"',
                 id="flag-type"),
    pytest.param(R + 'then.drop = true\n[[rule.then.change]]\nremove = "PatientID"\n',
                 'rules.toml:4: rule "r": change without forward: changes apply to the copies '
                 "sent to destinations", id="change-without-forward"),
    pytest.param(R + 'then.forward = "pacs"\n[[rule.then.change]]\ndestination = "ai"\n'
                 'remove = "PatientID"\n',
                 "rules.toml:5: rule \"r\": change: destination 'ai' is not one this rule "
                 "forwards to (pacs)", id="change-destination-not-forwarded"),
    pytest.param(R + '[rule.when]\nModality = "CT"\n',
                 'rules.toml:1: rule "r": the rule has no action: add a [rule.then] table with '
                 "forward, reject, drop, query or retrieve", id="no-then"),
    pytest.param(R + '[rule.then]\ndrop = false\n',
                 'rules.toml:3: rule "r": the rule has no action: give it forward, reject, '
                 "drop = true, query or retrieve", id="no-action"),
    pytest.param(one_rule('', 'reject = 0x0000'),
                 'rules.toml:6: rule "r": reject: 0x0000 is the success status, not a failure '
                 "status" + _HINT, id="reject-success"),
    pytest.param(one_rule('', 'reject = 0xB000'),
                 'rules.toml:6: rule "r": reject: 0xB000 is a warning status, not a failure '
                 "status (PS3.7 Annex C)" + _HINT, id="reject-warning"),
    pytest.param(one_rule('', 'reject = 0x0107'),
                 'rules.toml:6: rule "r": reject: 0x0107 is a warning status, not a failure '
                 "status (PS3.7 Annex C)" + _HINT, id="reject-warning-0107"),
    pytest.param(one_rule('', 'reject = 0xFF00'),
                 'rules.toml:6: rule "r": reject: 0xFF00 is a pending status, not a failure '
                 "status" + _HINT, id="reject-pending"),
    pytest.param(one_rule('', 'reject = 0x1234'),
                 'rules.toml:6: rule "r": reject: 0x1234 is not a failure status of PS3.7 Annex '
                 "C" + _HINT, id="reject-not-a-status"),
    # An outside campaign: 0x01FF reached storescu as "Unknown Status: 0x1ff".
    pytest.param(one_rule('', 'reject = 0x01FF'),
                 'rules.toml:6: rule "r": reject: 0x01FF is not a failure status of PS3.7 Annex '
                 "C" + _HINT, id="reject-undefined-01xx"),
    pytest.param(one_rule('', 'reject = "A700"'),
                 'rules.toml:6: rule "r": reject: expected a status number such as 0xA700, '
                 'got "A700"', id="reject-type"),
    # An outside campaign: each copy was refused by its destination and ended in dead/.
    pytest.param(_change('remove = ["SOPInstanceUID"]'),
                 'rules.toml:5: rule "r": remove: SOPInstanceUID is the instance\'s identity '
                 "(PS3.4 B.2.3): a forwarded copy cannot change it", id="remove-identity"),
    pytest.param(_change('set = { SOPClassUID = "1.2.3.4" }'),
                 'rules.toml:5: rule "r": set: SOPClassUID is the instance\'s identity '
                 "(PS3.4 B.2.3): a forwarded copy cannot change it", id="set-identity"),
    pytest.param(_change('copy = { SOPInstanceUID = "StudyInstanceUID" }'),
                 'rules.toml:5: rule "r": copy: SOPInstanceUID is the instance\'s identity '
                 "(PS3.4 B.2.3): a forwarded copy cannot change it", id="copy-identity"),
    pytest.param(_change('set = { SeriesNumber = "abc" }'),
                 'rules.toml:5: rule "r": set: SeriesNumber (IS) needs an integer, got "abc"',
                 id="set-integer-string"),
    pytest.param(_change('set = { Rows = -1 }'),
                 'rules.toml:5: rule "r": set: Rows (US) needs an integer from 0 to 65535, '
                 "got -1", id="set-out-of-range"),
    pytest.param(_change('set = { Rows = 1.5 }'),
                 'rules.toml:5: rule "r": set: Rows (US) needs an integer, got 1.5',
                 id="set-float-for-integer"),
    pytest.param(_change('set = { PatientName = 3 }'),
                 'rules.toml:5: rule "r": set: PatientName (PN) needs a string (write "3"), '
                 "got 3", id="set-number-for-text"),
    pytest.param(_change('set = { StudyDate = "2024" }'),
                 'rules.toml:5: rule "r": set: StudyDate (DA) needs a date as "20240131" or '
                 '2024-01-31, got "2024"', id="set-bad-date"),
    pytest.param(_change('set = { StudyDate = 07:00:00 }'),
                 'rules.toml:5: rule "r": set: StudyDate (DA) needs a date, got 07:00:00',
                 id="set-time-for-date"),
    pytest.param(_change('set = { Modality = "ct" }'),
                 'rules.toml:5: rule "r": set: Modality (CS): a code string holds upper-case '
                 'letters, digits, space and underscore only, got "ct"',
                 id="set-invalid-for-vr"),
    pytest.param(_change('set = { PatientID = "' + "x" * 65 + '" }'),
                 'rules.toml:5: rule "r": set: PatientID (LO): at most 64 characters, got "'
                 + "x" * 65 + '"', id="set-too-long"),
    # Past pydicom's own check (an outside campaign): each reached the destination.
    pytest.param(_change('set = { StudyDate = "20241399" }'),
                 'rules.toml:5: rule "r": set: StudyDate (DA) needs a date as "20240131" or '
                 '2024-01-31, got "20241399"', id="set-impossible-date"),
    pytest.param(_change('set = { SliceThickness = "1_000" }'),
                 'rules.toml:5: rule "r": set: SliceThickness (DS): not a decimal number as '
                 'DICOM writes one (digits, sign, point, exponent), got "1_000"',
                 id="set-ds-underscore"),
    pytest.param(_change('set = { SliceLocation = "1.000000000000000000000001" }'),
                 'rules.toml:5: rule "r": set: SliceLocation (DS): at most 16 characters, got '
                 '"1.000000000000000000000001"', id="set-ds-too-long"),
    pytest.param(_change('set = { SliceThickness = nan }'),
                 'rules.toml:5: rule "r": set: SliceThickness (DS) needs a finite number, got '
                 "nan", id="set-ds-nan"),
    pytest.param(_change('set = { PatientID = "A\\\\B" }'),
                 'rules.toml:5: rule "r": set: PatientID (LO): a backslash separates values '
                 '(give a list for several), got "A\\B"', id="set-backslash"),
    pytest.param(_change('set = { PatientID = "a\\nb" }'),
                 'rules.toml:5: rule "r": set: PatientID (LO): control characters are not '
                 'allowed in it, got "a\nb"', id="set-newline"),
    pytest.param(_change('set = { SliceThickness = "\u0661\u0662" }'),
                 'rules.toml:5: rule "r": set: SliceThickness (DS): not a decimal number as '
                 'DICOM writes one (digits, sign, point, exponent), got "\u0661\u0662"',
                 id="set-ds-arabic-indic-digits"),
    pytest.param(_change('set = { InstanceNumber = 3000000000 }'),
                 'rules.toml:5: rule "r": set: InstanceNumber (IS) needs an integer from '
                 "-2147483648 to 2147483647, got 3000000000", id="set-is-range"),
    pytest.param(_change('set = { PatientName = "a^b^c^d^e^f" }'),
                 'rules.toml:5: rule "r": set: PatientName (PN): a Person Name has at most 3 '
                 'groups of at most 5 components, got "a^b^c^d^e^f"', id="set-pn-components"),
    pytest.param(_change('set = { ReferencedSeriesSequence = "x" }'),
                 'rules.toml:5: rule "r": set: cannot set ReferencedSeriesSequence: its VR SQ '
                 "holds a sequence", id="set-sequence"),
    pytest.param(_change('set = { PixelData = "x" }'),
                 'rules.toml:5: rule "r": set: cannot set PixelData: its VR OB holds binary '
                 "data", id="set-binary"),
    pytest.param(_change('set = { PatientName = { vr = "LO", value = "x" } }'),
                 'rules.toml:5: rule "r": set: PatientName: the data dictionary gives '
                 "PatientName the VR PN, not LO", id="set-vr-mismatch"),
    pytest.param(_change('set = { "(0009,1001)" = { vr = "XX", value = "x" } }'),
                 'rules.toml:5: rule "r": set: (0009,1001): vr = "XX" is not a DICOM VR',
                 id="set-unknown-vr"),
    pytest.param(_change('set = { "(0009,1001)" = { value = "x" } }'),
                 'rules.toml:5: rule "r": set: (0009,1001): expected a value, or { vr = "LO", '
                 'value = ... } with exactly those two keys, got { value = "x" }',
                 id="set-vr-table-keys"),
    pytest.param(_change('set = { Modallity = "CT" }'),
                 "rules.toml:5: rule \"r\": set: unknown attribute keyword 'Modallity' "
                 "(did you mean 'Modality'?)", id="set-unknown-keyword"),
    pytest.param(_change('set = "PatientName"'),
                 'rules.toml:5: rule "r": set: expected a table of attribute = value, e.g. '
                 'set = { PatientName = "ANON" }, got "PatientName"', id="set-type"),
    pytest.param(_change('copy = { PatientID = "ReferencedSeriesSequence" }'),
                 'rules.toml:5: rule "r": copy: cannot copy ReferencedSeriesSequence (SQ) into '
                 "PatientID (LO)", id="copy-incompatible"),
    pytest.param(_change('copy = { PatientID = 3 }'),
                 'rules.toml:5: rule "r": copy: PatientID: expected the source attribute as a '
                 "string, got 3", id="copy-source-type"),
    pytest.param(_change('replace = { PatientID = { pattern = "[", with = "x" } }'),
                 "rules.toml:5: rule \"r\": replace: PatientID: bad regular expression '[': "
                 "unterminated character set at position 0", id="replace-bad-regex"),
    pytest.param(_change('replace = { PatientID = { pattern = "(x*)*y", with = "z" } }'),
                 "rules.toml:5: rule \"r\": replace: PatientID: regular expression '(x*)*y': "
                 "it repeats a repeat, which can take exponential time on some values; write "
                 "it without, or make the inner repeat possessive (a++) or atomic ((?>a+))",
                 id="replace-exponential-regex"),
    pytest.param(_change('replace = { PatientID = { pattern = "(a)", with = "\\\\2" } }'),
                 "rules.toml:5: rule \"r\": replace: PatientID: bad replacement '\\2': invalid "
                 "group reference 2 at position 1", id="replace-bad-template"),
    pytest.param(_change('replace = { PatientID = { pattern = "(a)" } }'),
                 'rules.toml:5: rule "r": replace: PatientID: expected { pattern = "...", with '
                 '= "..." } (two strings), got { pattern = "(a)" }', id="replace-keys"),
    pytest.param(_change('remove = [1]'),
                 'rules.toml:5: rule "r": remove: expected an attribute or a non-empty list of '
                 "them (keywords or tags as strings), got [1]", id="remove-type"),
    pytest.param(_change('destination = "p"'),
                 'rules.toml:4: rule "r": change: expected set, remove, copy or replace',
                 id="change-without-operation"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_validation_error(text: str, expected: str) -> None:
    assert problems(text, destinations={"pacs", "ai", "p"}) == [expected]


def _nested(levels: int) -> str:
    condition = 'PatientID = "x"'
    for _ in range(levels):
        condition = f"not = {{ {condition} }}"
    return one_rule(condition)


def test_deeply_nested_rules_are_one_problem_not_a_crash() -> None:
    """An outside campaign: 400 levels of `not = { not = ...` ran tomllib out of stack,
    a RecursionError that `rules check` printed as a traceback and a reload turned into
    the end of the supervisor, workers and all. Now each is one problem."""
    ruleset(_nested(32))
    assert problems(_nested(33)) == [
        'rules.toml:4: rule "r": not: conditions nested more than 32 levels deep']
    assert problems(_nested(400)) == [
        "rules.toml: not valid TOML: tables or arrays nested too deeply"]
    assert problems(one_rule("PatientID = " + "[" * 2000 + "]" * 2000)) == [
        "rules.toml: not valid TOML: tables or arrays nested too deeply"]


def test_rule_error_str_and_problem_fields() -> None:
    with pytest.raises(RuleError) as caught:
        RuleSet.from_text(one_rule('Modallity = "CT"'), source=Path("rules.toml"),
                          destinations=None)
    (problem,) = caught.value.problems
    assert problem == Problem(file="rules.toml", line=4, rule="r",
                              message="unknown attribute keyword 'Modallity' "
                                      "(did you mean 'Modality'?)")
    assert str(caught.value) == str(problem)


def test_every_problem_is_reported_one_per_line() -> None:
    text = """\
[[rule]]
name = "chest CT"
[rule.when]
Modallity = "CT"
peer = "10.0.0.300"
[rule.then]
forward = "pacs"
reject = 0xA700

[[rule]]
name = "second"
when.StudyDescription = { regex = "(" }
then.forward = "nowhere"

[[rule]]
name = "fine"
then.forward = "pacs"
"""
    with pytest.raises(RuleError) as caught:
        RuleSet.from_text(text, source=Path("rules.toml"), destinations={"pacs"})
    assert str(caught.value).splitlines() == [
        "rules.toml:4: rule \"chest CT\": unknown attribute keyword 'Modallity' "
        "(did you mean 'Modality'?)",
        "rules.toml:5: rule \"chest CT\": peer: '10.0.0.300' does not appear to be an IPv4 or "
        "IPv6 network",
        'rules.toml:8: rule "chest CT": forward and reject contradict each other: a rejected '
        "instance is sent nowhere",
        "rules.toml:12: rule \"second\": StudyDescription: bad regular expression '(': missing "
        "), unterminated subpattern at position 0",
        "rules.toml:13: rule \"second\": forward: unknown destination 'nowhere'; the "
        "configuration has: pacs",
    ]


def test_lines_inside_nested_and_inline_tables() -> None:
    text = """\
# a comment mentioning Modality = "CT"
[[rule]]
name = "a"
then.forward = "pacs"

[[rule]]
name = "b"
[rule.when]
calling_ae = "CT1"
any = [
  { Modality = "MR" },
  { not = { BodyPartExamined = { regexp = "HEAD" } } },
]
[rule.then]
forward = ["pacs", "ai"]
[[rule.then.change]]
set = { PatientName = "ANON" }
[[rule.then.change]]
destination = "ai"
set = { Rows = "many" }
"""
    assert problems(text) == [
        "rules.toml:12: rule \"b\": BodyPartExamined: unknown operator 'regexp' (did you mean "
        "'regex'?); the operators are equals, wildcard, regex, in, min, max or present",
        'rules.toml:20: rule "b": set: Rows (US) needs an integer, got "many"',
    ]


def test_destinations_not_checked_without_a_list() -> None:
    assert len(RuleSet.from_text(one_rule("", 'forward = "anything"'), destinations=None)) == 1
    assert problems(one_rule("", 'forward = "pacs"'), destinations=()) == [
        "rules.toml:6: rule \"r\": forward: unknown destination 'pacs'; the configuration "
        "has: none"]


# ------------------------------------------------------------- files


def test_folder_loads_toml_files_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "20-second.toml").write_text('[[rule]]\nname = "b"\nthen.drop = true\n')
    (tmp_path / "10-first.toml").write_text('[[rule]]\nname = "a"\nthen.drop = true\n'
                                            '[[rule]]\nname = "a2"\nthen.drop = true\n')
    (tmp_path / "notes.txt").write_text("not rules")
    rs = RuleSet.load([tmp_path], destinations=None)
    assert [r.name for r in rs.rules] == ["a", "a2", "b"]
    assert rs.sources == (tmp_path / "10-first.toml", tmp_path / "20-second.toml")
    assert [(r.file.name, r.line) for r in rs.rules] == [
        ("10-first.toml", 1), ("10-first.toml", 4), ("20-second.toml", 1)]


def test_a_folders_hidden_files_are_left_and_a_dangling_link_is_a_problem(
        tmp_path: Path) -> None:
    """An outside campaign: a leftover .10-ct.toml (drop = true) was loaded, ahead of
    every other file; and a rule file that is a link to a file since removed was
    skipped without a word, its rules gone from the rules in force."""
    (tmp_path / "10-ct.toml").write_text('[[rule]]\nname = "ct"\nthen.drop = true\n')
    (tmp_path / ".10-ct.toml").write_text('[[rule]]\nname = "old"\nthen.drop = true\n')
    assert [r.name for r in RuleSet.load([tmp_path], destinations=None).rules] == ["ct"]
    (tmp_path / "20-mr.toml").symlink_to(tmp_path / "gone.toml")
    with pytest.raises(RuleError) as refused:
        RuleSet.load([tmp_path], destinations=None)
    assert [str(p) for p in refused.value.problems] == [
        f"{tmp_path / '20-mr.toml'}: a symbolic link to {tmp_path / 'gone.toml'}, which "
        "does not exist"]


def test_files_and_folders_together(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "x.toml").write_text('[[rule]]\nname = "x"\nthen.drop = true\n')
    single = tmp_path / "single.toml"
    single.write_text('[[rule]]\nname = "s"\nthen.drop = true\n')
    rs = RuleSet.load([single, folder], destinations=None)
    assert [r.name for r in rs.rules] == ["s", "x"]


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('\n[[rule]]\nname = "same"\nthen.drop = true\n')
    (tmp_path / "b.toml").write_text('[[rule]]\nname = "same"\nthen.drop = true\n')
    with pytest.raises(RuleError) as caught:
        RuleSet.load([tmp_path], destinations=None)
    assert str(caught.value) == (f'{tmp_path / "b.toml"}:2: rule "same": duplicate rule name: '
                                 f"it is already used at {tmp_path / 'a.toml'}:2")


def test_problems_in_several_files(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("x = [\n")
    (tmp_path / "b.toml").write_text('[[rule]]\nname = "b"\n')
    with pytest.raises(RuleError) as caught:
        RuleSet.load([tmp_path, tmp_path / "missing.toml"], destinations=None)
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path / 'missing.toml'}: no such file or folder",
        f"{tmp_path / 'a.toml'}:1: not valid TOML: Invalid value (at end of document)",
        f'{tmp_path / "b.toml"}:1: rule "b": the rule has no action: add a [rule.then] table '
        "with forward, reject, drop, query or retrieve",
    ]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[rule]]\nname = "caf\xe9"\n')
    with pytest.raises(RuleError) as caught:
        RuleSet.load([path], destinations=None)
    assert str(caught.value) == f"{path}: not UTF-8 text (byte 20)"


def test_a_byte_order_mark_is_not_a_syntax_error(tmp_path: Path) -> None:
    """Notepad writes one; the rule file was "not valid TOML" while the configuration
    file beside it, read as utf-8-sig, loaded (an outside campaign)."""
    path = tmp_path / "notepad.toml"
    path.write_bytes(b'\xef\xbb\xbf[[rule]]\nname = "all"\n[rule.then]\ndrop = true\n')
    assert [r.name for r in RuleSet.load([path], destinations=None).rules] == ["all"]


def test_empty_rule_set() -> None:
    rs = RuleSet.empty()
    assert rs.rules == () and rs.sources == () and not rs.needs_dataset
    assert rs.needed_tags == frozenset()


def test_the_documented_example_loads_and_routes() -> None:
    assert rules.__doc__ is not None
    block = rules.__doc__.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    rs = RuleSet.from_text(textwrap.dedent(block), destinations={"pacs", "ai"})
    ds = dataset(Modality="CT", StudyDescription="Chest", StudyDate="20240101",
                 BodyPartExamined="CHEST", PatientName="Doe", PatientID="7",
                 AccessionNumber="A12")
    ds.add_new(0x00091001, "LO", "private")
    assoc = rules.AssociationInfo(calling_ae="CT1", called_ae="ROUTER", peer="10.0.0.9")
    decision = rs.evaluate(assoc, ds, NOW)
    assert [f.destination for f in decision.forwards] == ["pacs", "ai"]
    decision.forwards[1].changes.apply(ds)
    assert (ds.PatientName, ds.OtherPatientIDs, ds.AccessionNumber) == ("ANON", "7", "B12")
    assert "PatientBirthDate" not in ds and ds[0x00091001].value == "x"
