"""Tests for workers.uring: fsync through io_uring, against the running kernel.

What must hold: every request completes exactly once with the system call's result
(0, or -errno for a descriptor fsync refuses); the eventfd wakes a poller; the ring never
takes more than it has room for.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers import uring

WAIT_MS = 5000  # a bound on waiting for the kernel, never a sleep


def open_ring(entries: int = 8) -> uring.Ring:
    try:
        return uring.Ring(entries)
    except OSError as exc:  # a kernel or seccomp profile without io_uring
        pytest.skip(f"io_uring unavailable here: {exc}")


@pytest.fixture
def ring() -> Iterator[uring.Ring]:
    r = open_ring()
    yield r
    r.close()


def wait_for(ring: uring.Ring, count: int) -> dict[int, int]:
    poller = select.poll()
    poller.register(ring.eventfd, select.POLLIN)
    done: dict[int, int] = {}
    while len(done) < count:
        assert poller.poll(WAIT_MS), f"io_uring: {len(done)} of {count} completed"
        for key, result in ring.completions():
            assert key not in done, f"request {key} completed twice"
            done[key] = result
    return done


def test_fsync_of_files_and_folders_completes_with_zero(ring: uring.Ring,
                                                        tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 5000)
    file_fd = os.open(tmp_path / "a", os.O_RDWR)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ring.fsync([(file_fd, 1), (dir_fd, 2)])
        assert ring.in_flight == 2
        assert wait_for(ring, 2) == {1: 0, 2: 0}
        assert ring.in_flight == 0
        assert ring.completions() == []  # nothing more, and the eventfd was reset
    finally:
        os.close(file_fd)
        os.close(dir_fd)


def test_a_refused_fsync_completes_with_its_errno(ring: uring.Ring, tmp_path: Path) -> None:
    path_only = os.open(tmp_path, os.O_PATH)  # a descriptor no fsync accepts
    try:
        ring.fsync([(path_only, 7), (-1, 8)])
        done = wait_for(ring, 2)
    finally:
        os.close(path_only)
    assert done == {7: -errno.EBADF, 8: -errno.EBADF}


def test_the_ring_takes_no_more_than_its_room(tmp_path: Path) -> None:
    """Room is bounded by the submission queue per call and by the completion queue
    for everything in flight: a completion must never have nowhere to go."""
    ring = open_ring(4)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert ring.room == 4  # the submission queue's size
        keys = iter(range(1000))
        submitted = 0
        while ring.room:
            batch = [(fd, next(keys)) for _ in range(ring.room)]
            ring.fsync(batch)
            submitted += len(batch)
        assert submitted == ring.in_flight >= 8  # the completion queue is twice as big
        with pytest.raises(OSError) as raised:
            ring.fsync([(fd, 999)])
        assert raised.value.errno == errno.EBUSY
        assert set(wait_for(ring, submitted)) == set(range(submitted))
        assert ring.room == 4 and ring.in_flight == 0
    finally:
        os.close(fd)
        ring.close()
        ring.close()  # idempotent
