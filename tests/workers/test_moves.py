"""Whose sub-operation a C-STORE is: the proxied moves' records in the spool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from router.dicom import dimse
from workers.moves import (
    MOVES_DIR,
    Originator,
    end_move,
    move_of,
    move_scope,
    originator_of,
    register_move,
)

STUDY = 0x0020000D
SERIES = 0x0020000E


def move_destination_of(spool: Path, message_id: int | None, upstreams: set[str],
                        instance: dict[int, str] | None = None) -> str | None:
    """The move's destination, the association coming from one of ``upstreams``
    with an instance whose unique keys are ``instance``."""
    return move_of(spool, message_id, upstreams.__contains__,
                   None if instance is None else instance.get)[0]


def moves_from(spool: Path, upstreams: set[str], instance: dict[int, str]) -> int:
    """How many running moves one of ``upstreams`` could be delivering ``instance`` for."""
    return move_of(spool, None, upstreams.__contains__, instance.get)[1]


def test_a_sub_operation_is_found_by_its_message_id_from_its_upstream_only(
        tmp_path: Path) -> None:
    mid = register_move(tmp_path, "viewer", "pacs")
    assert move_destination_of(tmp_path, mid, {"pacs"}) == "viewer"
    # Anyone else with the message ID delivers nothing into the move.
    assert move_destination_of(tmp_path, mid, set()) is None
    assert move_destination_of(tmp_path, mid, {"other"}) is None
    assert move_destination_of(tmp_path, mid % 65535 + 1, {"pacs"}) is None
    end_move(tmp_path, mid)
    assert move_destination_of(tmp_path, mid, {"pacs"}) is None


def test_with_its_message_id_an_instance_outside_the_moves_scope_is_still_its(
        tmp_path: Path) -> None:
    """The message ID is the standard's link (PS3.7 §9.3.1.1); the scope only
    stands in for it when it is missing."""
    mid = register_move(tmp_path, "viewer", "pacs", (STUDY, frozenset({"1.2.3"})))
    assert move_destination_of(tmp_path, mid, {"pacs"}, {STUDY: "9.9.9"}) == "viewer"


def test_without_a_message_id_only_a_running_move_whose_scope_has_it_claims_it(
        tmp_path: Path) -> None:
    """An upstream (or anyone calling from its host or with its AE title) sending
    something else while a proxied move runs: that used to go to the move's
    destination, past the rules."""
    study = {STUDY: "1.2.3", SERIES: "1.2.3.4"}
    assert move_destination_of(tmp_path, None, {"pacs"}, study) is None  # none runs
    first = register_move(tmp_path, "viewer", "pacs", (STUDY, frozenset({"1.2.3", "5.6"})))
    register_move(tmp_path, "ai", "otherpacs", (STUDY, frozenset({"1.2.3"})))
    assert move_destination_of(tmp_path, None, {"pacs"}, study) == "viewer"
    assert move_destination_of(tmp_path, None, {"pacs"}, {STUDY: "5.6"}) == "viewer"
    assert move_destination_of(tmp_path, None, set(), study) is None
    # Not what the move asked for; or no key to tell.
    assert move_destination_of(tmp_path, None, {"pacs"}, {STUDY: "1.2.33"}) is None
    assert move_destination_of(tmp_path, None, {"pacs"}, {SERIES: "1.2.3.4"}) is None
    assert move_destination_of(tmp_path, None, {"pacs"}) is None
    # A series-level move of another study from the same upstream runs beside it.
    register_move(tmp_path, "ai", "pacs", (SERIES, frozenset({"7.7"})))
    assert move_destination_of(tmp_path, None, {"pacs"}, study) == "viewer"
    assert move_destination_of(tmp_path, None, {"pacs"}, {STUDY: "8", SERIES: "7.7"}) == "ai"
    # Two moves of the same study to different places: whose is unknown.
    second = register_move(tmp_path, "workstation", "pacs", (STUDY, frozenset({"1.2.3"})))
    assert moves_from(tmp_path, {"pacs"}, study) == 2
    assert move_destination_of(tmp_path, None, {"pacs"}, study) is None
    end_move(tmp_path, first)
    assert move_destination_of(tmp_path, None, {"pacs"}, study) == "workstation"
    end_move(tmp_path, second)


def test_two_moves_of_one_study_each_get_every_instance_once(tmp_path: Path) -> None:
    """Two viewers retrieve the same study through an upstream that names no Move
    Originator: it sends each instance once per move. Each copy goes to the oldest
    move that has not had it; they went to the rules (unrouted/), while both
    requestors were told the move completed (an outside Q/R campaign)."""
    x = {STUDY: "1.2.3", 0x00080018: "1.2.3.1"}
    y = {STUDY: "1.2.3", 0x00080018: "1.2.3.2"}
    first = register_move(tmp_path, "viewer", "pacs", (STUDY, frozenset({"1.2.3"})))
    assert move_destination_of(tmp_path, None, {"pacs"}, x) == "viewer"  # alone
    second = register_move(tmp_path, "workstation", "pacs", (STUDY, frozenset({"1.2.3"})))
    assert [move_destination_of(tmp_path, None, {"pacs"}, i) for i in (y, x, y)] == \
        ["viewer", "workstation", "workstation"]
    assert move_destination_of(tmp_path, None, {"pacs"}, x) is None  # a third copy
    assert moves_from(tmp_path, {"pacs"}, x) == 2
    end_move(tmp_path, first)
    assert not (tmp_path / MOVES_DIR / f"{first}.got").exists()
    # Ended between reading its record and taking a copy (a race a CI run hit): it
    # takes none, so the other move gets it.
    from workers.moves import _claim
    assert not _claim(tmp_path, first, "1.2.3.9")
    assert not (tmp_path / MOVES_DIR / f"{first}.got").exists()
    # Alone again, a move takes a copy it had (the upstream sending it again).
    assert move_destination_of(tmp_path, None, {"pacs"}, x) == "workstation"
    end_move(tmp_path, second)
    assert sorted(p.name for p in (tmp_path / MOVES_DIR).iterdir()) == []


def test_each_association_of_sub_operations_serves_one_move(tmp_path: Path) -> None:
    """The upstream sends each move's copies on an association of its own, in any
    order. Taken copy by copy, the move whose association finished first ended
    while copies it needed came on the other: they went to the other move twice
    (a CI run of the runtime test). Each association is bound to one move."""
    def on(stream: str, uid: str) -> str | None:
        instance = {STUDY: "1.2.3", 0x00080018: uid}
        return move_of(tmp_path, None, {"pacs"}.__contains__, instance.get, stream)[0]

    first = register_move(tmp_path, "viewer", "pacs", (STUDY, frozenset({"1.2.3"})))
    second = register_move(tmp_path, "workstation", "pacs", (STUDY, frozenset({"1.2.3"})))
    # The second move's association sends first, in another order than the first's.
    assert on("s2", "1.2.3.2") == "viewer"  # unbound: the oldest move takes it ...
    assert on("s1", "1.2.3.1") == "workstation"  # ... and the other association the other
    assert [on("s2", u) for u in ("1.2.3.1", "1.2.3.3")] == ["viewer", "viewer"]
    assert [on("s1", u) for u in ("1.2.3.2", "1.2.3.3")] == ["workstation", "workstation"]
    end_move(tmp_path, first)  # its association is done
    assert on("s1", "1.2.3.4") == "workstation"
    end_move(tmp_path, second)


def test_a_move_ended_before_its_association_still_takes_what_it_lacks(
        tmp_path: Path) -> None:
    """Which association the upstream uses for which move, nothing says: bound the
    other way round, the first move's final response comes when the upstream's
    association for it (bound to the second) is done, while the one bound to it still
    brings a copy it lacks (a CI run of the runtime test: it went to unrouted/, and
    the first requestor, told "completed", missed it)."""
    from workers.moves import ENDED_GRACE, sweep_ended

    def on(stream: str, uid: str) -> str | None:
        instance = {STUDY: "1.2.3", 0x00080018: uid}
        return move_of(tmp_path, None, {"pacs"}.__contains__, instance.get, stream)[0]

    first = register_move(tmp_path, "viewer", "pacs", (STUDY, frozenset({"1.2.3"})))
    second = register_move(tmp_path, "workstation", "pacs", (STUDY, frozenset({"1.2.3"})))
    assert on("b", "1.2.3.1") == "viewer"  # the upstream's association for the second
    assert [on("a", u) for u in ("1.2.3.1", "1.2.3.2")] == ["workstation"] * 2
    end_move(tmp_path, first)  # the upstream is done with the first move
    assert on("b", "1.2.3.2") == "viewer"  # ended, it takes what it lacks
    assert on("b", "1.2.3.2") == "workstation"  # again: as a resend, the running move's
    end_move(tmp_path, second)
    import time
    sweep_ended(tmp_path, time.time() + ENDED_GRACE + 1)
    assert list((tmp_path / MOVES_DIR).iterdir()) == []


def test_a_message_id_used_again_starts_with_nothing_had(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a killed worker's move left under its message ID (its tally, the
    instances it had) is not the next move's of that ID."""
    import random

    from workers.moves import sub_operations_of

    monkeypatch.setattr(random, "randrange", lambda *_: 4242)
    x = {STUDY: "1.2.3", 0x00080018: "1.2.3.1"}
    assert register_move(tmp_path, "viewer", "pacs", (STUDY, frozenset({"1.2.3"}))) == 4242
    assert move_destination_of(tmp_path, None, {"pacs"}, x) == "viewer"
    folder = tmp_path / MOVES_DIR
    (folder / "4242.relayed").write_bytes(b"..c")
    (folder / "4242.json").unlink()  # its worker died (_live_record removes it)
    assert register_move(tmp_path, "ai", "pacs", (STUDY, frozenset({"1.2.3"}))) == 4242
    assert sub_operations_of(tmp_path, 4242).started == 0
    assert move_destination_of(tmp_path, None, {"pacs"}, x) == "ai"
    end_move(tmp_path, 4242)


def test_a_move_without_a_scope_takes_only_what_carries_its_message_id(
        tmp_path: Path) -> None:
    mid = register_move(tmp_path, "viewer", "pacs")
    assert move_destination_of(tmp_path, None, {"pacs"}, {STUDY: "1.2.3"}) is None
    assert move_destination_of(tmp_path, mid, {"pacs"}, {STUDY: "1.2.3"}) == "viewer"


@pytest.mark.parametrize(("level", "keys", "scope"), [
    ("STUDY", {"StudyInstanceUID": "1.2.3"}, (STUDY, {"1.2.3"})),
    ("STUDY", {"StudyInstanceUID": ["1.2.3", "4.5"]}, (STUDY, {"1.2.3", "4.5"})),
    ("SERIES", {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3"}, (SERIES, {"1.2.3"})),
    ("IMAGE", {"SOPInstanceUID": "1.2.3.4"}, (0x00080018, {"1.2.3.4"})),
    ("PATIENT", {"PatientID": "P1 "}, (0x00100020, {"P1"})),
    ("STUDY", {"PatientID": "P1"}, None),  # the level's key is missing
    ("STUDY", {"StudyInstanceUID": ""}, None),
    ("FRAME", {"StudyInstanceUID": "1.2.3"}, None),
    ("", {"StudyInstanceUID": "1.2.3"}, None),
])
def test_a_moves_scope_is_its_levels_unique_key(level: str, keys: dict[str, Any],
                                                scope: tuple[int, set[str]] | None) -> None:
    identifier = Dataset()
    if level:
        identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    found = move_scope(identifier)
    assert (None if found is None else (found[0], set(found[1]))) == scope


def test_the_move_of_a_dead_worker_takes_nothing_more_and_is_removed(tmp_path: Path) -> None:
    """A worker killed mid-move leaves its record; it used to accept sub-operations
    for 24 hours."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    mid = register_move(tmp_path, "viewer", "pacs")
    path = tmp_path / MOVES_DIR / f"{mid}.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "pid": int(dead.stdout)}))
    assert move_destination_of(tmp_path, mid, {"pacs"}) is None
    assert not path.exists()


def test_a_move_keeps_its_requestor_for_the_relayed_sub_operations(tmp_path: Path) -> None:
    requestor = Originator("WORKSTATION7", 4242, dimse.Priority.HIGH)
    mid = register_move(tmp_path, "viewer", "pacs", None, requestor)
    assert originator_of(tmp_path, mid) == requestor
    assert originator_of(tmp_path, register_move(tmp_path, "viewer", "pacs")) is None
    end_move(tmp_path, mid)
    assert originator_of(tmp_path, mid) is None


@pytest.mark.parametrize("value", [None, "AE", [], ["AE", 1], ["AE", 70000, 0], ["AE", 1, 3],
                                   [1, 1, 0], ["AE", True, 0], ["AE", "1", 0]])
def test_an_originator_the_router_did_not_write_is_none(value: Any) -> None:
    assert Originator.from_record(value) is None
