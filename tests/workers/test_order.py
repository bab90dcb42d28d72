"""Order markers (workers/order.py): which queued file holds an older version of an
instance, stale markers, the start-up sweep, and dead letters in and out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers import order
from workers.queue import move_to_dead, retry_dead

UID = "1.2.826.0.1.3680043.8.498.77"
OTHER = "1.2.826.0.1.3680043.8.498.78"


def _queued(root: Path, name: str, uid: str, dest: str = "pacs") -> Path:
    """A queued file of ``uid`` named ``name``, marked as a commit marks it."""
    path = root / "queue" / dest / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"instance " + name.encode())
    assert order.mark(root, dest, name, uid) is not None
    return path


def _markers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "order").rglob("*") if p.is_file())


def test_the_oldest_older_version_still_queued_is_found(tmp_path: Path) -> None:
    for name in ("01-1-1.dcm", "02-1-2.dcm", "03-1-3.dcm"):
        _queued(tmp_path, name, UID)
    _queued(tmp_path, "00-1-0.dcm", OTHER)  # another instance: never in the way
    _queued(tmp_path, "00-1-9.dcm", UID, dest="other")  # another destination's queue
    assert order.older_version(tmp_path, "pacs", "03-1-3.dcm", UID) == "01-1-1.dcm"
    assert order.older_version(tmp_path, "pacs", "02-1-2.dcm", UID) == "01-1-1.dcm"
    assert order.older_version(tmp_path, "pacs", "01-1-1.dcm", UID) is None
    assert order.older_version(tmp_path, "pacs", "00-1-0.dcm", OTHER) is None
    assert order.older_version(tmp_path, "other", "00-1-9.dcm", UID) is None


def test_a_marker_is_a_link_of_its_queued_file_not_a_new_inode(tmp_path: Path) -> None:
    path = _queued(tmp_path, "01-1-1.dcm", UID)
    marker = order.marker_path(tmp_path, "pacs", path.name, UID)
    assert marker.stat().st_ino == path.stat().st_ino and path.stat().st_nlink == 2
    assert order.is_link_of(marker, path.stat())


def test_a_stale_marker_is_no_obstacle_and_is_removed_when_seen(tmp_path: Path) -> None:
    """The older file left the queue without its marker (a crash between the two, or
    removed by hand): the newer version must not wait for ever."""
    old = _queued(tmp_path, "01-1-1.dcm", UID)
    _queued(tmp_path, "02-1-2.dcm", UID)
    old.unlink()
    assert order.older_version(tmp_path, "pacs", "02-1-2.dcm", UID) is None
    assert _markers(tmp_path) == [f"{order.uid_hash(UID)}.02-1-2.dcm"]


def test_the_sweep_removes_stale_markers_only(tmp_path: Path) -> None:
    gone = _queued(tmp_path, "01-1-1.dcm", UID)
    _queued(tmp_path, "02-1-2.dcm", UID)
    _queued(tmp_path, "03-1-3.dcm", OTHER, dest="elsewhere")
    gone.unlink()
    assert order.sweep(tmp_path) == 1
    assert _markers(tmp_path) == sorted([f"{order.uid_hash(UID)}.02-1-2.dcm",
                                         f"{order.uid_hash(OTHER)}.03-1-3.dcm"])
    assert order.sweep(tmp_path) == 0
    assert order.sweep(tmp_path / "no-spool") == 0


def test_a_dead_letter_leaves_the_order_and_a_retried_one_comes_back(tmp_path: Path) -> None:
    _queued(tmp_path, "01-1-1.dcm", UID)
    _queued(tmp_path, "02-1-2.dcm", UID)
    move_to_dead(tmp_path, "pacs", "01-1-1.dcm", reason="refused", status=0xA900,
                 attempts=1, fsync=False, sop_instance_uid=UID)
    assert order.older_version(tmp_path, "pacs", "02-1-2.dcm", UID) is None
    assert _markers(tmp_path) == [f"{order.uid_hash(UID)}.02-1-2.dcm"]
    # `queue retry`: the older version is queued again, and again goes first.
    assert retry_dead(tmp_path, "pacs") == 1
    assert order.older_version(tmp_path, "pacs", "02-1-2.dcm", UID) == "01-1-1.dcm"


def test_a_marker_that_cannot_be_made_costs_the_order_not_the_instance(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "queue" / "pacs" / "01-1-1.dcm"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    (tmp_path / "order").write_bytes(b"not a folder")
    assert order.mark(tmp_path, "pacs", path.name, UID) is None
    assert order.older_version(tmp_path, "pacs", path.name, UID) is None
    assert path.exists() and os.stat(path).st_nlink == 1
    assert "order marker of pacs/01-1-1.dcm" in caplog.text and "queue order alone" in caplog.text
