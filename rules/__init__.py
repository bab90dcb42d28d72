"""Declarative routing rules (DESIGN.md D6): TOML files, validated on load,
compiled once, evaluated per received instance, and per query/retrieve
request for the upstreams that answer it (D7). A pure library: no sockets,
threads or clocks (the caller passes the time).

Theory of operation
-------------------
``RuleSet.load(paths, destinations=...)`` reads every rule file (a folder
means every ``*.toml`` in it, in sorted name order), checks it, and compiles
each ``[[rule]]`` into a :class:`Rule`: a tree of condition objects
(:mod:`rules.conditions`) with every regex, wildcard, network and range
prepared, and per destination a :class:`Changes`. Any problem anywhere raises
one :class:`RuleError` whose ``problems`` give file, line and a sentence; a
router that is reloading keeps its old rule set. ``RuleSet.evaluate`` then
tests the rules in file order against an :class:`AssociationInfo`, the data
set and the local time, and returns a :class:`Decision`; ``explain`` does the
same with a :class:`RuleTrace` per rule for ``dicom-router rules test``.
``RuleSet.evaluate_query`` and ``evaluate_retrieve`` choose the upstreams of
a C-FIND, or of a C-MOVE/C-GET, and return a :class:`QueryDecision`.

Evaluation: the first rule whose conditions hold decides. A rule with
``continue = true`` adds its forwards and evaluation goes on; the forwards of
all acting rules are merged, one :class:`Forward` per destination in the order
first named, its changes those of every acting rule that forwards there, in
rule order. A rule that rejects or drops ends evaluation and keeps nothing,
even forwards collected from earlier ``continue`` rules. When no rule acts the
outcome is ``unmatched``. Query/retrieve rules (below) take no part: they
neither match an instance nor end its evaluation.

File format
-----------
::

    [[rule]]
    name = "chest CT to PACS and AI"   # required, unique over all files
    description = "free text"          # optional
    [rule.when]                        # every key must hold; no table: always
    calling_ae = "CT*"                 # str or list; DICOM wildcards * and ?
    called_ae = ["ROUTER", "ARCHIVE"]
    peer = ["10.0.0.0/8", "192.168.1.7", "fd00::/8"]   # addresses or networks
    time = { days = ["mon", "tue", "wed", "thu", "fri"], from = "07:00", to = "19:00" }
    Modality = "CT"                    # attribute by keyword ...
    "(0009,1001)" = { present = true } # ... or by tag: (gggg,eeee), gggg,eeee, ggggeeee
    StudyDescription = { regex = "(?i)^chest" }
    StudyDate = { min = 2020-01-01, max = "20251231" }
    any = [ { Modality = "MR" }, { not = { BodyPartExamined = "HEAD" } } ]
    [rule.then]
    forward = ["pacs", "ai"]           # destination names, str or list
    transparent = false                # no spool, relay the status; one destination
    continue = false                   # true: go on to the next rules after this one
    [[rule.then.change]]               # applied in order, to the forwarded copies
    destination = "ai"                 # optional: only for this destination
    set = { PatientName = "ANON", "(0009,1001)" = { vr = "LO", value = "x" } }
    remove = ["PatientBirthDate", "(0010,1000)"]
    copy = { OtherPatientIDs = "PatientID" }                 # target = source
    replace = { AccessionNumber = { pattern = '^A(\\d+)', with = 'B\\1' } }

Instead of ``forward`` a rule may ``reject = 0xA700`` (answer the C-STORE
with that failure status: 01xx, 02xx, Axxx, Cxxx of PS3.7 Annex C, except the
warnings 0107H and 0116H) or ``drop = true`` (answer Success, keep nothing).

Query/retrieve rules. A rule whose ``then`` has ``query`` (the destinations
that answer C-FIND requests it matches) and/or ``retrieve`` (those that serve
C-MOVE and C-GET), each a destination name or a list of them, routes
requests, not instances: it may have ``continue`` and changes (below) but
none of forward, transparent, reject and drop. Its conditions are the same language:
attribute tests read the request's identifier, association tests the
requesting association. In an identifier an attribute given empty is a
return key (universal matching): present, with the value ``""``.
``RuleSet.evaluate_query`` tests the rules with ``query`` in order, and the
first that matches decides unless it has ``continue = true``; the upstreams
of every acting rule are merged in the order first named. No rule matching
gives no upstreams. ``evaluate_retrieve`` does the same with ``retrieve``;
a C-MOVE or C-GET asks those upstreams in that order until one retrieves
something (workers/qr.py).
For example::

    [[rule]]
    name = "CT studies from both PACS"
    when.QueryRetrieveLevel = "STUDY"
    when.ModalitiesInStudy = "*CT*"
    then.query = ["pacs1", "pacs2"]
    then.retrieve = "pacs1"

    [[rule]]
    name = "everything else from the main PACS"
    when.calling_ae = "WS*"
    then.query = "pacs1"
    then.retrieve = "pacs1"

A query/retrieve rule's ``[[rule.then.change]]`` tables (the operations of
Changes, below) each say what they change with ``applies_to``: ``"query"``
is the request's identifier, changed before it goes to the upstreams (for
C-FIND, and for C-MOVE/C-GET when the rule has ``retrieve``); ``"result"`` is
each C-FIND match, changed before it goes back to the requestor (a rule
needs ``query`` for it: a retrieve has no result identifiers). They have no
``destination``: every upstream gets the same identifier. The
:class:`QueryDecision` carries them as ``query_changes`` and
``result_changes``, each the changes of the acting rules in rule order
(``continue`` accumulates them as it does upstreams); the caller applies
them with :meth:`Changes.apply`, to a copy of the identifier. Conditions
read the identifier as received, before any change. For example, for
requestors that know the hospital's patients as ``HOSP-<id>``::

    [[rule]]
    name = "external viewers see prefixed patient IDs"
    when.calling_ae = "EXT*"
    then.query = "pacs"
    then.retrieve = "pacs"
    [[rule.then.change]]
    applies_to = "query"                  # the C-FIND/C-MOVE/C-GET identifier
    set = { IssuerOfPatientID = "HOSP" }
    replace = { PatientID = { pattern = '^HOSP-', with = '' } }
    [[rule.then.change]]
    applies_to = "result"                 # each C-FIND match
    remove = "PatientBirthDate"
    replace = { PatientID = { pattern = '^(.+)$', with = 'HOSP-\\1' } }

A C-FIND for ``PatientID = "HOSP-12*"`` goes to ``pacs`` as ``12*`` with
``IssuerOfPatientID = "HOSP"``; a match ``12345`` comes back as
``HOSP-12345`` without its birth date (an empty return key stays empty).

Conditions. A condition table's keys all must hold. ``calling_ae``,
``called_ae``: AE titles compared without their padding spaces. ``peer``: an
IPv4 or IPv6 address or CIDR network (IPv4-mapped IPv6 peers count as IPv4).
``time``: ``days`` (mon ... sun, or full names) and/or ``from``/``to``
(``"HH:MM[:SS]"`` or a TOML time; ``to`` may be ``"24:00"``), local time,
``from`` inclusive, ``to`` exclusive; ``from > to`` spans midnight, and the
window then belongs to the day it starts on (fri 22:00-06:00 holds until
Saturday 06:00). ``all = [tables]``, ``any = [tables]``, ``not = table`` nest
freely and may hold any condition, association ones included.

Attribute tests. A bare string is equality, or a DICOM wildcard if it holds
``*`` or ``?`` (PS3.4 C.2.2.2.4: ``*`` any sequence including none, ``?`` one
character, case-sensitive); an integer or float is numeric equality; a TOML
date/time is equality with its DA/TM/DT text; a list is any of those. An
inline table holds exactly one operator (``min`` with ``max`` counts as one):
``equals`` (a string is literal here, no wildcards), ``wildcard``, ``regex``
(:func:`re.search`), ``in = [...]``, ``min``/``max`` (inclusive; numbers for
numeric VRs; dates, times, date-times as TOML values or DICOM strings for DA,
TM, DT, compared in DICOM order with missing parts as the earliest instant
and UTC offsets ignored; otherwise by the bounds' type, strings comparing as
text), ``present = true|false``.

Values. Text is ``str(value)`` less trailing spaces and NULs (so a PN is
``Family^Given``); numbers are compared as floats (IS, DS, US, SS, UL, SL,
FL, FD, ...; a text value that reads as a number counts too). A multi-valued
attribute matches if its whole value (values joined with ``\\``) or any
single value does; ranges look at single values only. A missing attribute
fails every test but ``present = false``; an empty one is present, with the
value ``""``. A sequence (SQ) can only be tested with ``present``. Binary
values (OB, OW, ...) are read as Latin-1 text. Private tags are matched by
their literal tag: the element number depends on the block the Private
Creator reserved. An instance sent in Implicit VR carries no VRs: a private
element pydicom's dictionary does not know is then UN, its bytes read as
text in the data set's Specific Character Set. A private text value (LO, DS,
...) tests the same either way; a private binary one (US, FL, ...) matches
numeric tests only where it came in Explicit VR (its bytes are no text): test
such an element on text, or route on a standard attribute.

Changes. ``set`` creates or replaces, with the dictionary's VR (the first
where it allows several); a private or unknown tag takes the VR of the
element already there if the value fits, else LO, or the one given as
``{ vr = "..", value = .. }``; a private element is made only where the data
set's Private Creator reserves its block (PS3.5 7.8.1), and changed wherever it
is already. Values are checked against the VR on load
(text VRs want strings, integer VRs integers in range, DA/TM/DT valid text or
TOML dates and times; a list sets several values, ``[]`` an empty value).
``remove`` deletes if present. ``copy`` copies the source value, converted to
the target's VR (a UN source, a private element received in Implicit VR, read
as text in the data set's character set), and does nothing if the source is
missing. ``replace``
applies :func:`re.sub` to each value and does nothing if the attribute is
missing (a UN one is read as text, as for ``copy``, and written as UT). Several
operations in one change table apply in the order written. A value the data
set's Specific Character Set cannot hold (by the DICOM set's repertoire, not
Python's codec for it: :mod:`rules.charsets`) turns the whole data set into
UTF-8, ISO_IR 192. A rule that sets or removes (0008,0005) itself has the text
converted to that set (removed: ASCII); a value it cannot hold is a change not
made, so that destination's copy is kept as a dead letter. So is one whose data
set holds private elements of unknown VR (received in Implicit VR) with bytes
that are not ASCII: they may be text in the old set or binary, and neither
converting nor keeping them is safe.

Loading checks, each a :class:`Problem` (``file:line: rule "name": ...``):
TOML syntax; unknown keys at every level (with a did-you-mean); missing or
duplicate names; keywords and tags; operators and their values (a value the
attribute's VR cannot have, as "ct" for Modality (CS), "2004-01-19" for a DA, a
UID's keyword for a UI, a number against an age string (AS), matches nothing:
refused, with the regex that matches a value sent so against the standard); regexes
(and replacement templates; a pattern that may backtrack exponentially, such as
a repeat, an optional part or alternatives starting alike inside a repeat, is
refused: :func:`rules.conditions.exponential_risk`); conditions nested more
than 32 levels deep; changes of a forwarded copy's SOPClassUID or
SOPInstanceUID (its identity: every destination would refuse it); reject
statuses PS3.7 Annex C does not define as failures; addresses and networks; days and times;
destinations of forward, query and retrieve (unless ``destinations`` is
None); contradictory actions (forward with reject or drop, reject with drop,
transparent without exactly one destination, with continue, with change or
after any store rule with continue, continue with reject or drop, change
without forward or for a destination the rule does not forward to, query or
retrieve with any store action, no action); in changes, ``applies_to``
missing or not ``"query"``/``"result"`` in a query/retrieve rule,
``"result"`` without ``query``, ``applies_to`` in a forward rule, and
``destination`` in a query/retrieve rule; reject statuses; ``set`` values
against the VR (type, range, and pydicom's checks of length and characters).
So a decision with a transparent forward has that one forward only, from
one rule, unchanged.
"""

from rules.changes import ChangeNotMade, Changes, CopyOp, Operation, RemoveOp, ReplaceOp, SetOp
from rules.evaluate import RuleSet
from rules.model import (
    AssociationInfo,
    Decision,
    Forward,
    Outcome,
    Problem,
    QueryDecision,
    Rule,
    RuleError,
    RuleTrace,
)

__all__ = [
    "AssociationInfo",
    "ChangeNotMade",
    "Changes",
    "CopyOp",
    "Decision",
    "Forward",
    "Operation",
    "Outcome",
    "Problem",
    "QueryDecision",
    "RemoveOp",
    "ReplaceOp",
    "Rule",
    "RuleError",
    "RuleSet",
    "RuleTrace",
    "SetOp",
]
