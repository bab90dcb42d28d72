"""Tests for workers.spool.RingCommitter: commits on the event loop, fsyncs by io_uring.

What must hold, as for the thread's GroupCommitter: no future resolves before its
file's fsync has completed, then its links and rename, then a directory fsync of each of
its folders that was submitted after that rename; a failed fsync (of the file or of a
folder) fails the future and leaves nothing behind; instances submitted together share
one folder fsync; what needs the thread (rules that read the data set, changed copies)
still gets it; close() finishes the commits in flight; a kernel without io_uring keeps
the thread.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from tests.workers.test_spool import all_files, begin, ct_instance, feed, files
from workers import uring
from workers.spool import (
    GroupCommitter,
    Placed,
    Placement,
    RingCommitter,
    Spool,
    SpoolWriter,
)

WAIT = 5.0  # seconds; a bound on waiting for the kernel, never a sleep
T = TypeVar("T")


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    with Spool(tmp_path / "spool") as s:
        yield s


def run(body: Callable[[asyncio.AbstractEventLoop], Awaitable[T]]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(body(asyncio.get_running_loop()), WAIT)
    return asyncio.run(main())


def ring_committer(spool: Spool, loop: asyncio.AbstractEventLoop) -> RingCommitter:
    committer = RingCommitter.open(GroupCommitter(spool), loop)
    if not isinstance(committer, RingCommitter):
        committer.close()
        pytest.skip("io_uring unavailable here (see the worker's log line)")
    return committer


def written(spool: Spool, seed: int = 0) -> tuple[SpoolWriter, bytes]:
    _, _, data = ct_instance(ExplicitVRLittleEndian, seed)
    writer = begin(spool)
    feed(writer, data)
    return writer, data


async def settled(future: Future[Placed]) -> Placed:
    return await asyncio.wrap_future(future)


class Journal:
    """Records, in order, what the RingCommitter asks of the kernel and of the file
    system: each fsync submitted (file or folder, by inode), each completion, each
    link and rename (by inode), each future resolved (by the inodes it placed).
    ``refuse`` swaps the descriptor of chosen fsyncs for an O_PATH one, which the
    kernel refuses with EBADF: a real failed fsync, not a stand-in."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, int]] = []
        self.keys: dict[int, tuple[str, int]] = {}  # request -> (kind, inode)
        self.submitted: dict[int, int] = {}  # request -> index of its event
        self.completed: dict[int, int] = {}
        self.refuse: Callable[[str], bool] = lambda kind: False
        self._opened: list[int] = []
        real_fsync, real_completions = uring.Ring.fsync, uring.Ring.completions
        real_link, real_rename = os.link, os.rename

        def fsync(ring: uring.Ring, requests: list[tuple[int, int]]) -> None:
            swapped = []
            for fd, key in requests:
                st = os.fstat(fd)
                kind = "dir-fsync" if stat.S_ISDIR(st.st_mode) else "fsync"
                self.keys[key] = (kind, st.st_ino)
                self.submitted[key] = len(self.events)
                self.events.append((kind, st.st_ino))
                if self.refuse(kind):
                    fd = os.open(f"/proc/self/fd/{fd}", os.O_PATH)
                    self._opened.append(fd)
                swapped.append((fd, key))
            real_fsync(ring, swapped)

        def completions(ring: uring.Ring) -> list[tuple[int, int]]:
            done = real_completions(ring)
            for key, result in done:
                kind, inode = self.keys[key]
                self.completed[key] = len(self.events)
                self.events.append((f"{kind} done" if result == 0 else f"{kind} failed",
                                    inode))
            return done

        def link(src: Any, dst: Any, **kwargs: Any) -> None:
            real_link(src, dst, **kwargs)
            # An order marker is linked by path (workers/order.py).
            self.events.append(("link", os.stat(dst, dir_fd=kwargs.get("dst_dir_fd")).st_ino))

        def rename(src: Any, dst: Any, **kwargs: Any) -> None:
            real_rename(src, dst, **kwargs)
            self.events.append(("rename", os.stat(dst, dir_fd=kwargs["dst_dir_fd"]).st_ino))

        monkeypatch.setattr(uring.Ring, "fsync", fsync)
        monkeypatch.setattr(uring.Ring, "completions", completions)
        monkeypatch.setattr(os, "link", link)
        monkeypatch.setattr(os, "rename", rename)

    def resolved(self, future: Future[Placed]) -> None:
        if future.exception() is None:
            for path in future.result().paths:
                self.events.append(("resolved", path.stat().st_ino))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]

    def close(self) -> None:
        for fd in self._opened:
            os.close(fd)


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch) -> Iterator[Journal]:
    j = Journal(monkeypatch)
    yield j
    j.close()


def test_each_file_is_fsynced_renamed_then_its_folder_fsynced_before_it_resolves(
        spool: Spool, journal: Journal) -> None:
    n = 6

    async def body(loop: asyncio.AbstractEventLoop) -> list[Placed]:
        committer = ring_committer(spool, loop)
        futures = []
        for seed in range(n):
            writer, _ = written(spool, seed)
            future = committer.submit(writer)
            future.add_done_callback(journal.resolved)
            futures.append(future)
        assert not any(f.done() for f in futures)  # nothing resolves inside submit()
        placed = [await settled(f) for f in futures]
        # One folder fsync per turn of the loop that saw file fsyncs complete: the
        # kernel finishes them at its own pace, so rarely all in one turn.
        assert 1 <= committer.batches <= n
        assert journal.kinds().count("dir-fsync") == committer.batches
        committer.close()
        return placed

    placed = run(body)
    assert len({p.path for p in placed}) == n
    assert files(spool.incoming) == sorted(p.path.name for p in placed if p.path)
    assert files(spool.tmp) == []
    events = journal.events
    for p in placed:
        assert p.path is not None
        inode = p.path.stat().st_ino
        own = [kind for kind, ino in events if ino == inode]
        assert own == ["fsync", "fsync done", "rename", "resolved"]
        renamed = events.index(("rename", inode))
        resolved = events.index(("resolved", inode))
        # Its folder's fsync: submitted after its rename, completed before it resolved.
        covering = [key for key, at in journal.submitted.items()
                    if journal.keys[key][0] == "dir-fsync" and renamed < at
                    and journal.completed.get(key, len(events)) < resolved]
        assert covering, f"no folder fsync between the rename and the answer of {p.path}"


def test_links_into_every_folder_and_waits_for_each_folders_fsync(
        spool: Spool, journal: Journal) -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> Placed:
        committer = ring_committer(spool, loop)
        writer, _ = written(spool)
        future = committer.submit(writer, Placement(links=("queue/a", "queue/b", "queue/c")))
        future.add_done_callback(journal.resolved)
        placed = await settled(future)
        committer.close()
        return placed

    placed = run(body)
    assert [p.parent.name for p in placed.paths] == ["a", "b", "c"]
    assert len({p.stat().st_ino for p in placed.paths}) == 1  # one file, three names
    kinds = journal.kinds()
    assert kinds.count("dir-fsync done") == 3
    assert kinds.index("resolved") > max(i for i, k in enumerate(kinds) if k == "dir-fsync done")
    assert kinds.index("rename") < kinds.index("dir-fsync")
    assert files(spool.tmp) == []


def test_a_failed_file_fsync_fails_the_future_and_leaves_nothing(
        spool: Spool, journal: Journal) -> None:
    journal.refuse = lambda kind: kind == "fsync"

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        committer = ring_committer(spool, loop)
        writer, _ = written(spool)
        with pytest.raises(OSError) as raised:
            await settled(committer.submit(writer, Placement(links=("queue/a",))))
        assert raised.value.errno == errno.EBADF
        committer.close()

    run(body)
    assert "rename" not in journal.kinds()  # never renamed after a failed fsync
    assert all_files(spool.root) == []


def test_a_failed_folder_fsync_takes_the_renamed_files_back(
        spool: Spool, journal: Journal) -> None:
    journal.refuse = lambda kind: kind == "dir-fsync"

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        committer = ring_committer(spool, loop)
        futures = [committer.submit(written(spool, seed)[0], Placement(links=("queue/a",)))
                   for seed in range(3)]
        for future in futures:
            with pytest.raises(OSError) as raised:
                await settled(future)
            assert raised.value.errno == errno.EBADF
        committer.close()

    run(body)
    assert journal.kinds().count("rename") == 3
    assert all_files(spool.root) == []  # not acknowledged, so not kept


def copy_changed(stream: BinaryIO) -> None:
    stream.write(b"a changed copy")


def test_routers_and_copies_go_to_the_thread_drops_and_holds_settle_at_once(
        spool: Spool, journal: Journal) -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        committer = ring_committer(spool, loop)
        # Rules that read the data set: a callable, run on the commit thread.
        routed = committer.submit(written(spool)[0],
                                  lambda w, path: Placement(links=("queue/r",)))
        # A changed copy is written and fsync'd on the thread too.
        copied = committer.submit(written(spool)[0], Placement(
            links=("queue/a",), copies=(("queue/b", copy_changed),)))
        (r,), c = (await settled(routed)).paths, await settled(copied)
        assert r.parent.name == "r"
        assert [p.parent.name for p in c.paths] == ["a", "b"]
        assert c.paths[1].read_bytes() == b"a changed copy"
        # Both on the thread (one batch or two, as it took them), none on the ring.
        assert committer.fallback.batches >= 1 and committer.batches == 0
        # Dropped: nothing to wait for, settled inside submit().
        dropped = committer.submit(written(spool)[0], Placement())
        assert dropped.done() and dropped.result().paths == ()
        # Held for a transparent send: settled at once, the file stays in tmp/.
        writer, data = written(spool)
        held = committer.submit(writer, Placement(hold=True))
        assert held.done()
        held_path = held.result().held
        assert held_path is not None and held_path.read_bytes().endswith(data)
        writer.release()
        committer.close()

    run(body)
    assert "fsync" not in journal.kinds()  # the ring was never asked: all went elsewhere
    made = all_files(spool.root)
    queued = [p for p in made if p.relative_to(spool.root).parts[0] == "queue"]
    assert sorted(p.parent.name for p in queued) == ["a", "b", "r"]
    # Each queued file has its order marker (workers/order.py), and nothing else is left.
    assert sorted(p.relative_to(spool.root).parts[:2] for p in made if p not in queued) == [
        ("order", "a"), ("order", "b"), ("order", "r")]


def test_without_fsync_commits_settle_inside_submit(tmp_path: Path) -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        with Spool(tmp_path / "spool", fsync=False) as spool:
            committer = RingCommitter.open(GroupCommitter(spool), loop)
            assert isinstance(committer, RingCommitter)  # no ring needed, none opened
            future = committer.submit(written(spool)[0])
            assert future.done()
            (path,) = future.result().paths
            assert path.parent == spool.incoming
            committer.close()

    run(body)


def test_close_finishes_the_commits_in_flight(spool: Spool) -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> list[Future[Placed]]:
        committer = ring_committer(spool, loop)
        futures = [committer.submit(written(spool, seed)[0]) for seed in range(4)]
        committer.close()  # without a turn of the loop: close() waits for the kernel
        assert all(f.done() for f in futures)
        # Closed: further commits are refused, as the thread's are.
        with pytest.raises(RuntimeError):
            committer.submit(written(spool)[0])
        return futures

    futures = run(body)
    assert sorted(f.result().path.name for f in futures if f.result().path) == \
        files(spool.incoming)
    assert len(files(spool.incoming)) == 4
    assert files(spool.tmp) == []


def test_a_kernel_without_io_uring_keeps_the_commit_thread(
        spool: Spool, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def refused(entries: int) -> uring.Ring:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(uring, "Ring", refused)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        with caplog.at_level(logging.INFO, logger="workers.spool"):
            committer = RingCommitter.open(GroupCommitter(spool), loop)
        assert isinstance(committer, GroupCommitter)
        placed = await settled(committer.submit(written(spool)[0]))
        assert placed.path is not None and placed.path.parent == spool.incoming
        committer.close()

    run(body)
    assert "commits on a thread (io_uring unavailable: Operation not permitted)" in caplog.text


def test_a_spare_is_reused_after_a_ring_commit_made_its_leaving_durable(
        spool: Spool) -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        committer = ring_committer(spool, loop)
        first = await settled(committer.submit(written(spool)[0], Placement(links=("queue/a",))))
        assert first.path is not None
        fd = os.open(first.path, os.O_RDONLY)
        try:
            spool.retire("queue/a", first.path.name, fd, marker=first.markers[0])
        finally:
            os.close(fd)
        (spare,) = spool.tmp.iterdir()
        inode = spare.stat().st_ino
        # Not yet: no fsync of queue/a since it left. A new file is made.
        other = await settled(committer.submit(written(spool, 1)[0],
                                               Placement(links=("queue/b",))))
        assert other.path is not None and other.path.stat().st_ino != inode
        # A ring commit into queue/a fsyncs it; the next instance reuses the spare.
        await settled(committer.submit(written(spool, 2)[0], Placement(links=("queue/a",))))
        again = await settled(committer.submit(written(spool, 3)[0],
                                               Placement(links=("queue/b",))))
        assert again.path is not None and again.path.stat().st_ino == inode
        committer.close()

    run(body)



def test_a_removed_folder_is_made_again_and_its_new_self_fsynced(spool: Spool,
                                                                  journal: Journal) -> None:
    """rm -rf of a queue folder between two ring commits: the second lands in the
    folder made again, and the folder fsync before the answer is of that new folder."""
    import shutil

    async def body(loop: asyncio.AbstractEventLoop) -> Placed:
        committer = ring_committer(spool, loop)
        first, _ = written(spool)
        await settled(committer.submit(first, Placement(links=("queue/a",))))
        shutil.rmtree(spool.root / "queue" / "a")
        journal.events.clear()
        second, _ = written(spool, seed=1)
        future = committer.submit(second, Placement(links=("queue/a",)))
        future.add_done_callback(journal.resolved)
        placed = await settled(future)
        committer.close()
        return placed

    placed = run(body)
    folder = spool.root / "queue" / "a"
    assert placed.paths == (folder / placed.paths[0].name,) and files(folder) == [
        placed.paths[0].name]
    synced = [inode for kind, inode in journal.events if kind == "dir-fsync"]
    assert synced == [folder.stat().st_ino]
