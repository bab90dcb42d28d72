"""Whose sub-operation a C-STORE is: the proxied moves' records in the spool."""

from __future__ import annotations

from pathlib import Path

from workers.moves import end_move, move_destination_of, moves_from, register_move


def test_a_sub_operation_is_found_by_its_move_originator(tmp_path: Path) -> None:
    mid = register_move(tmp_path, "ROUTER", "viewer", "PACS")
    assert move_destination_of(tmp_path, "ROUTER", mid) == "viewer"
    # Another originator AE title: only from the move's own upstream.
    assert move_destination_of(tmp_path, "PACS", mid, calling_ae="PACS") == "viewer"
    assert move_destination_of(tmp_path, "PACS", mid, calling_ae="OTHER") is None
    assert move_destination_of(tmp_path, "ROUTER", mid % 65535 + 1) is None
    end_move(tmp_path, mid)
    assert move_destination_of(tmp_path, "ROUTER", mid) is None


def test_without_a_message_id_only_a_single_running_move_can_claim_it(tmp_path: Path) -> None:
    assert move_destination_of(tmp_path, None, None, calling_ae="PACS") is None  # none runs
    first = register_move(tmp_path, "ROUTER", "viewer", "PACS")
    register_move(tmp_path, "ROUTER", "ai", "OTHERPACS")
    assert move_destination_of(tmp_path, None, None, calling_ae="PACS") == "viewer"
    assert move_destination_of(tmp_path, None, None, calling_ae="") is None
    second = register_move(tmp_path, "ROUTER", "workstation", "PACS")
    assert len(moves_from(tmp_path, "PACS")) == 2
    assert move_destination_of(tmp_path, None, None, calling_ae="PACS") is None  # whose?
    end_move(tmp_path, first)
    assert move_destination_of(tmp_path, None, None, calling_ae="PACS") == "workstation"
    end_move(tmp_path, second)
