"""Order markers (workers/order.py): which queued file holds an older or newer version
of an instance, stale markers, the sweeps, and dead letters in and out."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from workers import order
from workers.queue import move_to_dead, retry_dead

UID = "1.2.826.0.1.3680043.8.498.77"
OTHER = "1.2.826.0.1.3680043.8.498.78"


def _queued(root: Path, name: str, uid: str, dest: str = "pacs", *,
            key: int | None = None) -> Path:
    """A queued file of ``uid`` named ``name``, marked as a commit marks it (at the
    nanosecond ``key``, else now)."""
    path = root / "queue" / dest / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"instance " + name.encode())
    assert order.mark(root, dest, name, uid,
                      None if key is None else f"{key:020d}") is not None
    return path


def _markers(root: Path) -> list[str]:
    return sorted(p.name.split(".", 2)[2] for p in (root / "order").rglob("*")
                  if p.is_file())


def test_the_oldest_older_and_a_newer_version_still_queued_are_found(tmp_path: Path) -> None:
    for name in ("01-1-1.dcm", "02-1-2.dcm", "03-1-3.dcm"):
        _queued(tmp_path, name, UID)
    _queued(tmp_path, "00-1-0.dcm", OTHER)  # another instance: never in the way
    _queued(tmp_path, "00-1-9.dcm", UID, dest="other")  # another destination's queue
    found = order.versions(tmp_path, "pacs", "03-1-3.dcm", UID)
    assert (found.older, found.newer) == ("01-1-1.dcm", None)
    assert found.own is not None and found.own.name.endswith(".03-1-3.dcm")
    assert order.versions(tmp_path, "pacs", "02-1-2.dcm", UID).older == "01-1-1.dcm"
    assert order.versions(tmp_path, "pacs", "01-1-1.dcm", UID).older is None
    assert order.versions(tmp_path, "pacs", "01-1-1.dcm", UID).newer is not None
    assert order.versions(tmp_path, "pacs", "00-1-0.dcm", OTHER).older is None
    assert order.versions(tmp_path, "other", "00-1-9.dcm", UID).older is None
    # Not queued (a transparent send): every queued version is older.
    assert order.versions(tmp_path, "pacs", "04-1-4.part", UID).older == "01-1-1.dcm"


def test_versions_go_by_when_they_were_acknowledged_not_begun(tmp_path: Path) -> None:
    """A big instance begun first (a smaller stem) but acknowledged after a small
    one begun later is the newer version (a review: the stems were compared)."""
    _queued(tmp_path, "01-1-1.dcm", UID, key=2000)  # begun first, acknowledged last
    _queued(tmp_path, "02-1-2.dcm", UID, key=1000)
    assert order.versions(tmp_path, "pacs", "01-1-1.dcm", UID).older == "02-1-2.dcm"
    assert order.versions(tmp_path, "pacs", "02-1-2.dcm", UID).older is None


def test_a_marker_is_a_link_of_its_queued_file_not_a_new_inode(tmp_path: Path) -> None:
    path = _queued(tmp_path, "01-1-1.dcm", UID)
    marker = order.versions(tmp_path, "pacs", path.name, UID).own
    assert marker is not None and marker.stat().st_ino == path.stat().st_ino
    assert path.stat().st_nlink == 2 and order.is_link_of(marker, path.stat())


def test_a_stale_marker_is_no_obstacle_and_is_removed_when_seen(tmp_path: Path) -> None:
    """The older file left the queue without its marker (a crash between the two, or
    removed by hand): the newer version must not wait for ever."""
    old = _queued(tmp_path, "01-1-1.dcm", UID)
    _queued(tmp_path, "02-1-2.dcm", UID)
    old.unlink()
    assert order.versions(tmp_path, "pacs", "02-1-2.dcm", UID).older is None
    assert _markers(tmp_path) == ["02-1-2.dcm"]


def test_the_sweeps_remove_stale_markers_only(tmp_path: Path) -> None:
    gone = _queued(tmp_path, "01-1-1.dcm", UID)
    _queued(tmp_path, "02-1-2.dcm", UID)
    elsewhere = _queued(tmp_path, "03-1-3.dcm", OTHER, dest="elsewhere")
    gone.unlink()
    (tmp_path / "order" / "pacs" / "zz").mkdir()
    (tmp_path / "order" / "pacs" / "zz" / "not-a-marker").write_bytes(b"")
    assert order.sweep_destination(tmp_path, "pacs") == 2
    assert _markers(tmp_path) == ["02-1-2.dcm", "03-1-3.dcm"]
    elsewhere.unlink()
    assert order.sweep(tmp_path) == 1 and order.sweep(tmp_path) == 0
    assert _markers(tmp_path) == ["02-1-2.dcm"]
    assert order.sweep(tmp_path / "no-spool") == 0


def test_a_dead_letter_leaves_the_order_and_a_retried_one_keeps_its_place(
        tmp_path: Path) -> None:
    old, new = (f"{time.time_ns() - 10**9 * age:020d}-1-{age}.dcm" for age in (2, 1))
    _queued(tmp_path, old, UID)
    _queued(tmp_path, new, UID)
    move_to_dead(tmp_path, "pacs", old, reason="refused", status=0xA900,
                 attempts=1, fsync=False, sop_instance_uid=UID)
    assert order.versions(tmp_path, "pacs", new, UID).older is None
    assert _markers(tmp_path) == [new]
    # `queue retry`: the older version is queued again where it was received (its
    # stem), not now: still ahead of the newer one.
    assert retry_dead(tmp_path, "pacs").moved == 1
    assert order.versions(tmp_path, "pacs", new, UID).older == old


def test_a_marker_that_cannot_be_made_costs_the_order_not_the_instance(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "queue" / "pacs" / "01-1-1.dcm"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    (tmp_path / "order").write_bytes(b"not a folder")
    assert order.mark(tmp_path, "pacs", path.name, UID) is None
    assert order.versions(tmp_path, "pacs", path.name, UID) == order.Versions()
    assert path.exists() and os.stat(path).st_nlink == 1
    assert "order marker of pacs/01-1-1.dcm" in caplog.text and "queue order alone" in caplog.text


def test_markers_of_the_earlier_layout_are_moved_at_start_up(tmp_path: Path) -> None:
    """256 buckets made a claim list ~4,000 markers at a million-instance backlog (2 ms
    each); there are 4,096 now. A spool from the earlier version has its markers in
    two-digit buckets: sweep moves them, and the versions they order keep their
    order; a stale one among them goes."""
    old = _queued(tmp_path, "01-1-1.dcm", UID, key=1000)
    new = _queued(tmp_path, "02-1-2.dcm", UID, key=2000)
    gone = _queued(tmp_path, "00-1-0.dcm", OTHER)
    top = tmp_path / "order" / "pacs"
    markers = list(top.rglob("*.dcm"))
    assert len(markers) == 3 and all(len(m.parent.name) == 3 for m in markers)
    for marker in markers:  # as the earlier version laid them out
        legacy = top / marker.name[:2]
        legacy.mkdir(exist_ok=True)
        marker.rename(legacy / marker.name)
        with contextlib.suppress(OSError):
            marker.parent.rmdir()
    gone.unlink()
    assert order.versions(tmp_path, "pacs", new.name, UID).older is None  # not seen there
    assert order.sweep(tmp_path) == 1  # the stale one
    assert all(len(p.name) == 3 for p in top.iterdir())  # the two-digit buckets are gone
    assert order.versions(tmp_path, "pacs", new.name, UID).older == old.name
    assert order.versions(tmp_path, "pacs", old.name, UID).newer == new.name
    assert _markers(tmp_path) == ["01-1-1.dcm", "02-1-2.dcm"]
