"""Whose sub-operation a C-STORE is: the proxied moves' records in the spool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from workers.moves import MOVES_DIR, end_move, move_of, register_move


def move_destination_of(spool: Path, message_id: int | None, upstreams: set[str]) -> str | None:
    """The move's destination, the association coming from one of ``upstreams``."""
    return move_of(spool, message_id, upstreams.__contains__)[0]


def moves_from(spool: Path, upstreams: set[str]) -> int:
    """How many running moves one of ``upstreams`` could be delivering for."""
    return move_of(spool, None, upstreams.__contains__)[1]


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


def test_without_a_message_id_only_a_single_running_move_can_claim_it(tmp_path: Path) -> None:
    assert move_destination_of(tmp_path, None, {"pacs"}) is None  # none runs
    first = register_move(tmp_path, "viewer", "pacs")
    register_move(tmp_path, "ai", "otherpacs")
    assert move_destination_of(tmp_path, None, {"pacs"}) == "viewer"
    assert move_destination_of(tmp_path, None, set()) is None
    second = register_move(tmp_path, "workstation", "pacs")
    assert moves_from(tmp_path, {"pacs"}) == 2
    assert move_destination_of(tmp_path, None, {"pacs"}) is None  # whose?
    end_move(tmp_path, first)
    assert move_destination_of(tmp_path, None, {"pacs"}) == "workstation"
    end_move(tmp_path, second)


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
