"""Tests for workers.spool: streamed, fsync'd, atomically renamed Part 10 files (D4).

What must hold: every file in incoming/ is a complete Part 10 file that pydicom and
DCMTK read, holding the data set bytes exactly as written; names never come from the
data set or the peer; nothing acknowledged is lost and nothing partial survives (abort,
recover, a SIGKILLed writer, a full disk); group commit never resolves a future before
its file's fsync, its rename and a directory fsync after that rename.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from router.dicom.dataset import part10_from_meta, read_part10_header
from router.dicom.errors import DIMSEError, LocalProtocolError
from tests.helpers import make_ct, missing, pydicom_test_files, run_tool, to_bytes
from tests.helpers.dcmtk import which_binary
from workers import order
from workers.spool import GroupCommitter, Placement, Spool, SpoolWriter, status_for_error

ROOT = Path(__file__).resolve().parents[2]
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
NAME = re.compile(r"\d{20}-\d+-\d+\.dcm")
TMP_NAME = re.compile(r"\d{20}-\d+-\d+\.part")
WAIT = 5.0  # seconds; a bound on waits for other threads, never a sleep


@functools.cache
def ct_instance(transfer_syntax: str, seed: int = 0) -> tuple[str, str, bytes]:
    """(SOP class, SOP instance, data set bytes as they come over the network)."""
    part10 = to_bytes(make_ct(size_kb=64, transfer_syntax=transfer_syntax, seed=seed))
    header = read_part10_header(part10)
    return header.sop_class_uid, header.sop_instance_uid, part10[header.dataset_offset:]


@functools.cache
def jpeg_instance() -> tuple[str, str, str, bytes]:
    """A real JPEG baseline file from pydicom's test data: (class, instance, TS, bytes)."""
    path = next(p for p in pydicom_test_files() if p.name == "SC_rgb_dcmtk_+eb+cr.dcm")
    data = path.read_bytes()
    header = read_part10_header(data)
    return (header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax,
            data[header.dataset_offset:])


def begin(spool: Spool, transfer_syntax: str = ExplicitVRLittleEndian, *,
          sop_instance_uid: str = "1.2.3.4.5", calling_ae: str = "MODALITY",
          called_ae: str = "ROUTER") -> SpoolWriter:
    return spool.begin(sop_class_uid=CT_STORAGE, sop_instance_uid=sop_instance_uid,
                       transfer_syntax=transfer_syntax, calling_ae=calling_ae,
                       called_ae=called_ae, association_id="A1")


def feed(writer: SpoolWriter, data: bytes, chunk: int = 16 * 1024) -> None:
    """Write ``data`` as P-DATA fragments would come: memoryviews into a bytearray."""
    buf = memoryview(bytearray(data))
    for start in range(0, len(buf), chunk):
        writer.write(buf[start:start + chunk])


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    with Spool(tmp_path / "spool") as s:
        yield s


@pytest.fixture
def committer(spool: Spool) -> Iterator[GroupCommitter]:
    with GroupCommitter(spool) as c:
        yield c


# --- Part 10 output -------------------------------------------------------------

SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
            DeflatedExplicitVRLittleEndian]


def spooled(spool: Spool, transfer_syntax: str) -> tuple[Path, SpoolWriter, bytes]:
    if transfer_syntax == "jpeg":
        sop_class, sop_instance, transfer_syntax, data = jpeg_instance()
    else:
        sop_class, sop_instance, data = ct_instance(transfer_syntax)
    writer = spool.begin(sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                         transfer_syntax=transfer_syntax, calling_ae="CT_SCANNER_7",
                         called_ae="ROUTER", association_id="A1")
    # Uneven fragments, one of them a view of 2-byte items (bytes are counted, not items).
    view = memoryview(bytearray(data))
    cut1, cut2 = 1001, 1001 + 2048
    writer.write(view[:cut1])
    writer.write(view[cut1:cut2].cast("H"))
    feed(writer, data[cut2:], chunk=7919)
    return writer.finish(), writer, data


@pytest.mark.parametrize("transfer_syntax", [*SYNTAXES, "jpeg"])
def test_spooled_file_is_part10_with_the_bytes_as_written(
    spool: Spool, transfer_syntax: str
) -> None:
    path, writer, data = spooled(spool, transfer_syntax)
    assert path.parent == spool.incoming and NAME.fullmatch(path.name)
    assert writer.path == path and files(spool.tmp) == []
    assert writer.bytes_written == len(data)

    raw = path.read_bytes()
    header = read_part10_header(path)
    assert header.dataset_offset == writer.dataset_offset
    assert raw[writer.dataset_offset:] == data  # byte for byte
    assert len(raw) == writer.dataset_offset + writer.bytes_written

    ds = pydicom.dcmread(path)
    meta = ds.file_meta
    assert meta.TransferSyntaxUID == writer.transfer_syntax
    assert meta.MediaStorageSOPInstanceUID == writer.sop_instance_uid == ds.SOPInstanceUID
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert meta.SourceApplicationEntityTitle == "CT_SCANNER_7"
    assert meta.SendingApplicationEntityTitle == "CT_SCANNER_7"
    assert meta.ReceivingApplicationEntityTitle == "ROUTER"
    assert ds.PixelData  # read to the end


@pytest.mark.parametrize("transfer_syntax", [*SYNTAXES, "jpeg"])
def test_dcmdump_reads_spooled_file(spool: Spool, transfer_syntax: str) -> None:
    dcmdump = which_binary("dcmdump")
    if dcmdump is None:
        missing("DCMTK (dcmdump)")
    path, writer, _ = spooled(spool, transfer_syntax)
    done = run_tool([dcmdump, "-Un", path])  # -Un: UIDs as numbers, not names
    report = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, report
    assert "E:" not in done.stderr and "W:" not in done.stderr, report
    assert f"[{writer.transfer_syntax}]" in done.stdout, report
    assert f"[{writer.sop_instance_uid}]" in done.stdout, report
    assert re.search(r"\(0002,0016\) AE \[CT_SCANNER_7\]", done.stdout), report
    assert re.search(r"\(0002,0018\) AE \[ROUTER\]", done.stdout), report
    assert "(7fe0,0010)" in done.stdout, report


def test_close_is_the_store_sink_shape(spool: Spool) -> None:
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    writer = begin(spool)
    feed(writer, data)
    assert writer.close() == 0x0000
    assert files(spool.incoming) == [writer.name] and files(spool.tmp) == []
    with pytest.raises(ValueError):
        writer.write(memoryview(b"more"))


# --- Names ----------------------------------------------------------------------


def test_file_names_never_come_from_the_data_or_the_peer(spool: Spool) -> None:
    # Garbage that is not a UID never reaches a file name or the disk: refused up front.
    for uid in ("../../etc/passwd", "1.2.3/../../x", "1.2.3\x00", ""):
        with pytest.raises(LocalProtocolError):
            begin(spool, sop_instance_uid=uid)
    with pytest.raises(LocalProtocolError):
        begin(spool, called_ae="BAD\\AE")
    assert all_files(spool.root) == []

    # AE titles with every odd character the PDU decoder lets through; a data set whose
    # content has paths in it; the same SOP instance twice.
    odd_calling, odd_called = "../*?:<>|%$~'\"", "C:/x y.z;&"
    _, uid, data = ct_instance(ExplicitVRLittleEndian)
    content = make_ct(size_kb=4, sop_instance_uid=uid,
                      attrs={"PatientID": "../../etc/passwd", "StudyDescription": "a/b\\c"})
    hostile = to_bytes(content)[read_part10_header(to_bytes(content)).dataset_offset:]
    writers = []
    for payload in (data, hostile, hostile):
        writer = begin(spool, sop_instance_uid=uid, calling_ae=odd_calling,
                       called_ae=odd_called)
        (in_progress,) = files(spool.tmp)
        assert TMP_NAME.fullmatch(in_progress)
        feed(writer, payload)
        writers.append(writer.finish())

    names = [p.name for p in writers]
    assert len(set(names)) == 3
    assert all(NAME.fullmatch(n) for n in names)
    assert sorted(names) == names  # they sort by arrival
    assert all_files(spool.root) == sorted(writers)
    meta = pydicom.dcmread(writers[0]).file_meta
    assert meta.SourceApplicationEntityTitle == odd_calling
    assert meta.ReceivingApplicationEntityTitle == odd_called


# --- Abort, recovery, crash -------------------------------------------------------


def test_abort_leaves_nothing(spool: Spool) -> None:
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    writer = begin(spool)
    feed(writer, data[: len(data) // 2])
    assert len(files(spool.tmp)) == 1
    writer.abort()
    writer.abort()  # idempotent
    assert all_files(spool.root) == []
    with pytest.raises(ValueError):
        writer.write(memoryview(b"late"))
    with pytest.raises(ValueError):
        writer.finish()


def test_recover_removes_temporary_files_and_keeps_finished_ones(spool: Spool) -> None:
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    done = begin(spool)
    feed(done, data)
    kept = done.finish()
    # Left by a dead writer: no lock held.
    (spool.tmp / "00000000000000000001-1-1.part").write_bytes(b"half an instance")
    (spool.tmp / "stray").write_bytes(b"")
    # A live writer of this very process: its lock protects it.
    live = begin(spool)
    feed(live, data[:1000])

    report = spool.recover()
    assert (report.removed_temporary, report.completed) == (2, 1)
    assert files(spool.tmp) == [live.name.replace(".dcm", ".part")]
    assert kept.read_bytes()[done.dataset_offset:] == data

    feed(live, data[1000:])
    second = live.finish()
    assert second.read_bytes()[live.dataset_offset:] == data
    report = Spool(spool.root).recover()
    assert (report.removed_temporary, report.completed) == (0, 2)


_CHILD = """
import sys
from pathlib import Path
from workers.spool import Spool

spool = Spool(Path(sys.argv[1]))
data = memoryview(Path(sys.argv[2]).read_bytes())
def begin(uid):
    return spool.begin(sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=uid,
                       transfer_syntax="1.2.840.10008.1.2.1", calling_ae="CHILD",
                       called_ae="ROUTER", association_id="A1")
finished = begin("1.2.3.1")
finished.write(data)
finished.finish()
half = begin("1.2.3.2")
half.write(data[: len(data) // 2])
print(half.name, flush=True)
sys.stdin.read()  # wait to be killed
"""


def test_sigkilled_writer_leaves_no_partial_instance(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    (tmp_path / "dataset").write_bytes(data)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root), str(tmp_path / "dataset")],
                             cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().decode().strip()
        assert line, child.communicate(timeout=WAIT)[1].decode()
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=WAIT) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()

    with Spool(root) as spool:
        assert len(files(spool.tmp)) == 1 and len(files(spool.incoming)) == 1
        report = spool.recover()
        assert (report.removed_temporary, report.completed) == (1, 1)
        assert files(spool.tmp) == [] and line not in files(spool.incoming)
        (survivor,) = spool.incoming.iterdir()
        assert pydicom.dcmread(survivor).file_meta.MediaStorageSOPInstanceUID == "1.2.3.1"
        assert survivor.read_bytes()[read_part10_header(survivor).dataset_offset:] == data


# --- Group commit -------------------------------------------------------------------


def test_group_commit_from_many_threads(spool: Spool, committer: GroupCommitter) -> None:
    per_thread, threads = 6, 4
    results: dict[str, tuple[Future[Path], bytes]] = {}
    lock = threading.Lock()

    def sender(t: int) -> None:
        for i in range(per_thread):
            _, _, data = ct_instance(ExplicitVRLittleEndian, seed=(t * per_thread + i) % 3)
            uid = f"1.2.3.{t}.{i}"
            writer = begin(spool, sop_instance_uid=uid)
            feed(writer, data, chunk=4096 + 1000 * t)
            future = committer.submit(writer)
            with lock:
                results[uid] = (future, data)

    workers = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(WAIT)
    assert len(results) == per_thread * threads
    for uid, (future, data) in results.items():
        path = future.result(timeout=WAIT).path
        assert path is not None
        header = read_part10_header(path)
        assert header.meta is not None and header.meta.MediaStorageSOPInstanceUID == uid
        assert path.read_bytes()[header.dataset_offset:] == data
    assert files(spool.tmp) == []
    assert len(files(spool.incoming)) == per_thread * threads
    assert 1 <= committer.batches <= per_thread * threads


class Recorder:
    """Stands in for os.fsync and os.rename; logs every call, can hold the first fsync."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, hold_first: bool = False) -> None:
        self.events: list[tuple[str, int]] = []  # (what, inode)
        self.lock = threading.Lock()
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail: Callable[[str], OSError | None] = lambda kind: None
        self._fsync = os.fsync
        self._link = os.link
        self._rename = os.rename
        monkeypatch.setattr(os, "fsync", self.fsync)
        monkeypatch.setattr(os, "link", self.link)
        monkeypatch.setattr(os, "rename", self.rename)

    def log(self, what: str, inode: int) -> None:
        with self.lock:
            self.events.append((what, inode))

    def fsync(self, fd: Any) -> None:
        st = os.fstat(fd)
        kind = "dir-fsync" if stat.S_ISDIR(st.st_mode) else "fsync"
        self.entered.set()
        assert self.release.wait(WAIT)
        error = self.fail(kind)
        if error is not None:
            raise error
        self._fsync(fd)
        self.log(kind, st.st_ino)

    def link(self, src: Any, dst: Any, **kwargs: Any) -> None:
        # The group commit links the file into all its folders but the last...
        inode = os.stat(src, dir_fd=kwargs.get("src_dir_fd")).st_ino
        self._link(src, dst, **kwargs)
        self.log("link", inode)

    def rename(self, src: Any, dst: Any, **kwargs: Any) -> None:
        # ... and renames it into the last.
        inode = os.stat(src, dir_fd=kwargs.get("src_dir_fd")).st_ino
        self._rename(src, dst, **kwargs)
        self.log("rename", inode)

    def resolved(self, future: Future[Path]) -> None:
        if future.exception() is None:
            self.log("resolved", future.result().path.stat().st_ino)


def test_group_commit_fsyncs_the_directory_once_per_batch_after_each_file(
    spool: Spool, committer: GroupCommitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 9
    rec = Recorder(monkeypatch, hold_first=True)
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    futures: list[Future[Path]] = []
    flock = threading.Lock()

    def submit(count: int) -> None:
        for _ in range(count):
            writer = begin(spool)
            feed(writer, data)
            future = committer.submit(writer)
            future.add_done_callback(rec.resolved)
            with flock:
                futures.append(future)

    submit(1)
    assert rec.entered.wait(WAIT)  # the committer is inside the first file's fsync
    senders = [threading.Thread(target=submit, args=(k,)) for k in (3, 3, 2)]
    for s in senders:
        s.start()
    for s in senders:
        s.join(WAIT)
    assert not any(f.done() for f in futures)
    rec.release.set()
    paths = [f.result(timeout=WAIT).path for f in futures]
    assert len(set(paths)) == n
    committer.close()  # done callbacks run after result() returns: let them finish

    # Exactly two batches, the held one and the rest: [1 file], [8 files].
    kinds = [what for what, _ in rec.events]
    assert kinds.count("dir-fsync") == committer.batches == 2
    first_dir = kinds.index("dir-fsync")
    second_dir = kinds.index("dir-fsync", first_dir + 1)
    assert kinds[:first_dir] == ["fsync", "rename"]
    assert kinds[first_dir + 1] == "resolved"
    assert kinds[first_dir + 2:second_dir] == ["fsync", "rename"] * (n - 1)
    assert kinds[second_dir + 1:] == ["resolved"] * (n - 1)
    # Each file: its fsync, then its rename, then a directory fsync, then its future.
    for path in paths:
        inode = path.stat().st_ino
        own = [i for i, (_, ino) in enumerate(rec.events) if ino == inode]
        synced, renamed, resolved = own
        assert rec.events[synced][0] == "fsync" and rec.events[renamed][0] == "rename"
        assert rec.events[resolved][0] == "resolved"
        assert any(kinds[i] == "dir-fsync" for i in range(renamed, resolved))


def test_cancelled_future_discards_its_writer(
    spool: Spool, committer: GroupCommitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(monkeypatch, hold_first=True)
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    first, second = begin(spool), begin(spool)
    feed(first, data)
    feed(second, data)
    kept = committer.submit(first)
    assert rec.entered.wait(WAIT)
    dropped = committer.submit(second)
    assert dropped.cancel()
    rec.release.set()
    assert kept.result(timeout=WAIT).path.name == first.name
    committer.close()
    assert files(spool.incoming) == [first.name] and files(spool.tmp) == []


def test_close_drains_then_refuses(spool: Spool) -> None:
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    committer = GroupCommitter(spool)
    futures = []
    for _ in range(5):
        writer = begin(spool)
        feed(writer, data)
        futures.append(committer.submit(writer))
    committer.close()
    assert all(f.done() and f.exception() is None for f in futures)
    late = begin(spool)
    with pytest.raises(RuntimeError):
        committer.submit(late)
    assert files(spool.tmp) == [] and len(files(spool.incoming)) == 5
    committer.close()  # idempotent


def test_submit_to_the_wrong_spool_is_refused(tmp_path: Path, committer: GroupCommitter) -> None:
    with Spool(tmp_path / "other") as other:
        writer = begin(other)
        with pytest.raises(ValueError):
            committer.submit(writer)
        writer.abort()


# --- Failures: full disk, I/O errors -------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), 0xA700),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), 0xA700),
        (OSError(errno.EMFILE, "Too many open files"), 0xA700),
        (OSError(errno.EIO, "Input/output error"), 0x0110),
        (OSError(errno.EROFS, "Read-only file system"), 0x0110),
        (DIMSEError("bad", status=0xC000), 0xC000),
        (ValueError("bug"), 0x0110),
    ],
)
def test_status_for_error(exc: BaseException, status: int) -> None:
    assert status_for_error(exc) == status


def disk_full_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> list[int]:
    """Make os.write fail with ENOSPC from its ``calls + 1``-th call on."""
    real = os.write
    count = [0]

    def write(fd: int, data: Any) -> int:
        count[0] += 1
        if count[0] > calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return count


def test_disk_full_while_writing(spool: Spool, committer: GroupCommitter,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    writer = begin(spool)
    disk_full_after(monkeypatch, 3)
    with pytest.raises(OSError) as info:
        feed(writer, data)
    assert status_for_error(info.value) == 0xA700
    assert writer.status == 0xA700
    assert all_files(spool.root) == []  # nothing partial, at once
    # The caller reads the rest of the message and answers: fragments are dropped.
    writer.write(memoryview(b"rest of the data set"))
    assert writer.close() == 0xA700
    failed = committer.submit(writer).exception(timeout=WAIT)
    assert isinstance(failed, OSError) and status_for_error(failed) == 0xA700

    # Disk full at the very start: no writer, no file.
    with pytest.raises(OSError) as info:
        begin(spool)
    assert info.value.errno == errno.ENOSPC and all_files(spool.root) == []

    # Room again: the spool works.
    monkeypatch.undo()
    writer = begin(spool)
    feed(writer, data)
    path = committer.submit(writer).result(timeout=WAIT).path
    assert path is not None
    assert path.read_bytes()[writer.dataset_offset:] == data
    assert files(spool.tmp) == []


def test_short_writes_are_completed(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, memoryview(data)[:999]))
    _, _, data = ct_instance(ImplicitVRLittleEndian)
    writer = begin(spool, ImplicitVRLittleEndian)
    feed(writer, data, chunk=65536)
    path = writer.finish()
    assert path.read_bytes()[writer.dataset_offset:] == data
    assert pydicom.dcmread(path).PixelData


@pytest.mark.parametrize("failing", ["fsync", "dir-fsync"])
@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC])
def test_commit_errors_fail_the_futures_and_leave_nothing(
    spool: Spool, committer: GroupCommitter, monkeypatch: pytest.MonkeyPatch,
    failing: str, error: int,
) -> None:
    rec = Recorder(monkeypatch, hold_first=True)
    calls = {"fsync": 0, "dir-fsync": 0}

    def fail(kind: str) -> OSError | None:
        # The first batch is the blocker's; the failure hits the second one.
        calls[kind] += 1
        return OSError(error, os.strerror(error)) if (kind, calls[kind]) == (failing, 2) else None

    rec.fail = fail
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    blocker = begin(spool)
    feed(blocker, data)
    held = committer.submit(blocker)
    assert rec.entered.wait(WAIT)
    writers = [begin(spool) for _ in range(3)]
    for w in writers:
        feed(w, data)
    futures = [committer.submit(w) for w in writers]
    rec.release.set()
    assert held.result(timeout=WAIT).path.name == blocker.name
    excs = [f.exception(timeout=WAIT) for f in futures]
    expected = 0xA700 if error == errno.ENOSPC else 0x0110
    if failing == "fsync":
        # Only the first writer's fsync failed; the others are committed.
        assert isinstance(excs[0], OSError) and status_for_error(excs[0]) == expected
        assert excs[1:] == [None, None]
        assert files(spool.incoming) == sorted(w.name for w in [blocker, *writers[1:]])
    else:
        # The batch's directory fsync failed: none of them may be acknowledged.
        assert all(isinstance(e, OSError) and status_for_error(e) == expected for e in excs)
        assert files(spool.incoming) == [blocker.name]
    assert files(spool.tmp) == []

    # The spool and the committer go on.
    writer = begin(spool)
    feed(writer, data)
    assert committer.submit(writer).result(timeout=WAIT).path.exists()


def test_finish_reports_errors_and_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(monkeypatch)
    rec.fail = lambda kind: OSError(errno.EIO, "Input/output error") if kind == "fsync" else None
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    writer = begin(spool)
    feed(writer, data)
    assert writer.close() == 0x0110
    assert all_files(spool.root) == []


# --- Directories ------------------------------------------------------------------


def test_spool_directories_are_made_durable(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        assert stat.S_ISDIR(st.st_mode)
        synced.append(st.st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "a" / "spool"
    with Spool(root) as spool:
        assert spool.tmp.is_dir() and spool.incoming.is_dir()
    # The parent of each directory made: tmp_path (for a), a (for spool), spool (twice).
    inode = lambda p: p.stat().st_ino  # noqa: E731
    assert sorted(synced) == sorted(
        [inode(tmp_path), inode(tmp_path / "a"), inode(root), inode(root)])
    synced.clear()
    Spool(root).close()  # nothing new to make
    assert synced == []


# --- placements: where the router's rules put an instance -----------------------------


def test_placement_links_share_one_inode_and_copies_are_their_own(
        spool: Spool, committer: GroupCommitter) -> None:
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    writer = begin(spool)
    feed(writer, data)

    def changed(out: Any) -> None:
        out.write(b"a changed copy")

    placement = Placement(links=("queue/a", "queue/b"), copies=(("queue/c", changed),))
    placed = committer.submit(writer, lambda w, path: placement).result(timeout=WAIT)
    a, b, c = (spool.root / "queue" / d / writer.name for d in "abc")
    assert placed.paths == (a, b, c) and placed.placement is placement
    # One inode for a and b: their two links, and each queue's order marker.
    assert a.stat().st_ino == b.stat().st_ino and a.stat().st_nlink == 4
    assert a.read_bytes()[writer.dataset_offset:] == data
    assert c.read_bytes() == b"a changed copy" and c.stat().st_ino != a.stat().st_ino
    assert len(placed.markers) == 3
    for queued in (a, b, c):
        marker = order.versions(spool.root, queued.parent.name, writer.name,
                                writer.sop_instance_uid).own
        assert marker in placed.markers and marker.stat().st_ino == queued.stat().st_ino
    assert files(spool.tmp) == []


def test_placement_of_nothing_keeps_nothing_and_route_errors_fail_the_future(
        spool: Spool, committer: GroupCommitter) -> None:
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    dropped, broken = begin(spool), begin(spool)
    feed(dropped, data)
    feed(broken, data)
    placed = committer.submit(dropped, lambda w, p: Placement(note="drop")).result(timeout=WAIT)
    assert placed.paths == () and placed.placement.note == "drop"

    def route(writer: SpoolWriter, path: Path) -> Placement:
        raise ValueError("no header")

    assert isinstance(committer.submit(broken, route).exception(timeout=WAIT), ValueError)
    assert files(spool.tmp) == [] and files(spool.incoming) == []


def test_held_instance_stays_in_tmp_until_released(spool: Spool,
                                                   committer: GroupCommitter) -> None:
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    writer = begin(spool)
    feed(writer, data)
    placed = committer.submit(writer, lambda w, p: Placement(hold=True)).result(timeout=WAIT)
    assert placed.held == writer.tmp_path and placed.held.exists()
    assert spool.recover().removed_temporary == 0  # still locked: never recovered away
    writer.release()
    assert files(spool.tmp) == []


def test_placement_refuses_folders_outside_the_spool() -> None:
    for folder in ("/etc", "../x", "tmp", ""):
        with pytest.raises(ValueError):
            Placement(links=(folder,))
    with pytest.raises(ValueError):
        Placement(links=("queue/a",), hold=True)


def test_write_many_equals_write_one_by_one_even_after_a_short_writev(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    buf = memoryview(bytearray(data))
    pieces = [buf[i:i + 5000] for i in range(0, len(buf), 5000)]
    real_writev = os.writev

    def short_writev(fd: int, views: Any) -> int:
        # Write only part of the first buffers, as a signal or a full disk may.
        return real_writev(fd, [bytes(views[0])[:1234]])

    writer = begin(spool)
    monkeypatch.setattr(os, "writev", short_writev)
    writer.write_many(pieces[:7])
    monkeypatch.undo()
    writer.write_many(pieces[7:])
    path = writer.finish()
    assert path.read_bytes()[writer.dataset_offset:] == data
    assert writer.bytes_written == len(data)


# --- spare files (Spool.retire) ----------------------------------------------------


def committed_to(spool: Spool, committer: GroupCommitter, data: bytes, folder: str,
                 *, route: Callable[[SpoolWriter, Path], Placement] | None = None,
                 ) -> tuple[SpoolWriter, Path]:
    writer = begin(spool)
    feed(writer, data)
    chosen = route or (lambda w, p: Placement(links=(folder,)))
    placed = committer.submit(writer, chosen).result(timeout=WAIT)
    assert placed.path is not None
    return writer, placed.path


def retire(spool: Spool, path: Path) -> None:
    """Retire a delivered queued file as workers/forward.py does: with its order marker."""
    identity = part10_from_meta(path.read_bytes()[:2048])
    assert identity is not None
    marker = order.versions(spool.root, path.parent.name, path.name,
                            identity.sop_instance_uid).own
    assert marker is not None
    fd = os.open(path, os.O_RDONLY)
    try:
        spool.retire(str(path.parent.relative_to(spool.root)), path.name, fd, marker=marker)
    finally:
        os.close(fd)
    assert not marker.exists()


@pytest.mark.parametrize("second_size_kb", [64, 8, 200])
def test_a_retired_file_is_written_over_and_holds_exactly_the_new_instance(
        spool: Spool, committer: GroupCommitter, second_size_kb: int) -> None:
    _, _, first = ct_instance(ExplicitVRLittleEndian)
    _, path = committed_to(spool, committer, first, "queue/a")
    inode = path.stat().st_ino
    retire(spool, path)
    assert not path.exists()
    (spare,) = spool.tmp.iterdir()
    assert spare.suffix == ".spare" and spare.stat().st_ino == inode
    spool.sync_dir("queue/a")  # its leaving queue/a is durable: it may be written over

    # Shorter, same size and longer than the file it reuses.
    second = to_bytes(make_ct(size_kb=second_size_kb, seed=7))
    data = second[read_part10_header(second).dataset_offset:]
    seen: list[bytes] = []

    def route(writer: SpoolWriter, tmp: Path) -> Placement:
        seen.append(tmp.read_bytes())  # what the rules get to read
        return Placement(links=("queue/b",))

    writer, again = committed_to(spool, committer, data, "queue/b", route=route)
    assert again.stat().st_ino == inode  # the same inode, no new one
    content = again.read_bytes()
    assert seen == [content]
    assert content[writer.dataset_offset:] == data
    assert len(content) == writer.dataset_offset + len(data)
    read = pydicom.dcmread(again)
    assert read.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert read.SOPInstanceUID == read_part10_header(second).sop_instance_uid
    assert files(spool.tmp) == []


def test_a_file_another_queue_still_links_is_deleted_not_kept(
        spool: Spool, committer: GroupCommitter) -> None:
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    _, path = committed_to(spool, committer, data, "",
                           route=lambda w, p: Placement(links=("queue/a", "queue/b")))
    other = spool.root / "queue" / "b" / path.name
    retire(spool, path)
    assert files(spool.tmp) == [] and other.read_bytes()[:132].endswith(b"DICM")
    retire(spool, other)  # the last link may be kept
    assert [p.suffix for p in spool.tmp.iterdir()] == [".spare"]


def test_spares_are_bounded_in_number_and_size(spool: Spool, committer: GroupCommitter,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.spool as spool_module

    monkeypatch.setattr(spool_module, "SPARES", 2)
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    paths = [committed_to(spool, committer, data, "queue/a")[1] for _ in range(3)]
    for path in paths:
        retire(spool, path)
    assert len(files(spool.tmp)) == 2 and files(spool.root / "queue" / "a") == []
    spool.sync_dir("queue/a")
    monkeypatch.setattr(spool_module, "SPARE_MAX_BYTES", 1000)
    monkeypatch.setattr(spool_module, "SPARES", 3)
    _, big = committed_to(spool, committer, data, "queue/a")  # takes one spare
    assert len(files(spool.tmp)) == 1
    retire(spool, big)
    assert len(files(spool.tmp)) == 1  # too big to keep: deleted
    assert files(spool.root / "queue" / "a") == []


def test_recover_deletes_spares_and_begin_then_makes_a_new_file(
        spool: Spool, committer: GroupCommitter) -> None:
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    _, path = committed_to(spool, committer, data, "queue/a")
    retire(spool, path)
    # Another process restarting recovers the spool: the spare is anybody's leftover.
    report = Spool(spool.root).recover()
    assert (report.removed_temporary, report.removed_spares) == (0, 1)  # no instance lost
    assert files(spool.tmp) == []
    writer, again = committed_to(spool, committer, data, "queue/a")
    assert again.read_bytes()[writer.dataset_offset:] == data


def test_a_clean_stop_deletes_the_spares_with_the_bytes_of_delivered_instances(
        spool: Spool, committer: GroupCommitter) -> None:
    """A spare keeps the bytes of the instance delivered from it (patient data) until
    it is written over; they stayed in tmp/ after a clean stop, until the next start
    or for good. discard_spares (a worker stopping) deletes them, and the empty
    files made ahead with them; other processes' files stay."""
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    _, path = committed_to(spool, committer, data, "queue/a")
    retire(spool, path)
    assert spool.stock(3) == 3
    others = Spool(spool.root)
    assert others.stock(2) == 2
    assert len(files(spool.tmp)) == 6
    assert spool.discard_spares() == 4
    assert len(files(spool.tmp)) == 2  # the other process's
    assert not any(data[-64:] in f.read_bytes() for f in spool.tmp.iterdir())
    others.close()


def test_a_writer_over_a_spare_is_locked_like_a_new_one(spool: Spool,
                                                        committer: GroupCommitter) -> None:
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    _, path = committed_to(spool, committer, data, "queue/a")
    retire(spool, path)
    spool.sync_dir("queue/a")
    writer = begin(spool)
    feed(writer, data[:1000])
    assert writer.tmp_path.suffix == ".spare"
    assert Spool(spool.root).recover().removed_temporary == 0  # ours, in progress
    writer.abort()
    assert files(spool.tmp) == []


def test_a_spare_is_written_over_only_once_its_leaving_is_durable(
        spool: Spool, committer: GroupCommitter) -> None:
    """Until a directory fsync of the folder it left has completed (one that started
    after it left), a crash could bring the delivered file's old name back: writing
    another instance into it then would send that instance to the wrong destination."""
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    _, path = committed_to(spool, committer, data, "queue/a")
    retire(spool, path)
    (spare,) = spool.tmp.iterdir()
    # A commit into another folder does not make queue/a durable: a new file is made.
    _, elsewhere = committed_to(spool, committer, data, "queue/b")
    assert elsewhere.stat().st_ino != spare.stat().st_ino and spare.exists()
    # A commit into queue/a fsyncs it (group commit), so the next one reuses the spare.
    committed_to(spool, committer, data, "queue/a")
    inode = spare.stat().st_ino
    _, again = committed_to(spool, committer, data, "queue/b")
    assert again.stat().st_ino == inode and not spare.exists()


def test_without_fsync_spares_are_reused_at_once(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool", fsync=False) as spool, GroupCommitter(spool) as committer:
        _, _, data = ct_instance(ExplicitVRLittleEndian)
        _, path = committed_to(spool, committer, data, "queue/a")
        inode = path.stat().st_ino
        retire(spool, path)
        _, again = committed_to(spool, committer, data, "queue/b")
        assert again.stat().st_ino == inode


# --- empty files made ahead (Spool.stock) ----------------------------------------


def test_stocked_files_are_written_into_before_any_new_inode(
        spool: Spool, committer: GroupCommitter) -> None:
    assert spool.stock(3) == 3 and spool.stocked == 3
    made = {p.stat().st_ino: p for p in spool.tmp.iterdir()}
    assert len(made) == 3
    assert all(p.suffix == ".spare" and p.stat().st_size == 0 for p in made.values())
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    committed = [committed_to(spool, committer, data, "queue/a") for _ in range(4)]
    inodes = [path.stat().st_ino for _, path in committed]
    assert set(inodes[:3]) == set(made) and inodes[3] not in made  # the 4th: a new file
    for writer, path in committed:  # each holds exactly its own instance, as always
        content = path.read_bytes()
        assert content[writer.dataset_offset:] == data
        assert pydicom.dcmread(path).SOPInstanceUID == read_part10_header(
            content).sop_instance_uid
    assert files(spool.tmp) == [] and spool.stocked == 0


def test_stock_is_bounded(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.spool as spool_module

    monkeypatch.setattr(spool_module, "FRESH_SPARES", 5)
    assert spool.stock(4) == 4 and spool.stock(4) == 1 and spool.stock(4) == 0
    assert len(files(spool.tmp)) == 5


def test_a_delivered_spare_is_preferred_to_an_empty_one(
        spool: Spool, committer: GroupCommitter) -> None:
    """Its blocks are allocated already: writing over them makes the fsync cheaper."""
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    _, path = committed_to(spool, committer, data, "queue/a")
    retire(spool, path)
    spool.sync_dir("queue/a")
    delivered = next(spool.tmp.iterdir()).stat().st_ino
    spool.stock(1)
    _, again = committed_to(spool, committer, data, "queue/b")
    assert again.stat().st_ino == delivered and spool.stocked == 1


def test_stocked_files_taken_by_recover_or_a_new_tmp_are_skipped(
        spool: Spool, committer: GroupCommitter) -> None:
    spool.stock(2)
    report = Spool(spool.root).recover()  # the router restarting: anybody's leftovers
    assert (report.removed_temporary, report.removed_spares) == (0, 2)
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    writer, path = committed_to(spool, committer, data, "queue/a")
    assert path.read_bytes()[writer.dataset_offset:] == data and spool.stocked == 0
    spool.stock(2)
    for p in spool.tmp.iterdir():
        p.unlink()
    spool.tmp.rmdir()  # an operator removed tmp/: made again, the stock is gone with it
    writer, path = committed_to(spool, committer, data, "queue/a")
    assert path.read_bytes()[writer.dataset_offset:] == data and spool.stocked == 0


def test_stock_stops_at_a_full_disk_and_keeps_what_it_made(
        spool: Spool, committer: GroupCommitter, monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.spool as spool_module

    calls = 0
    real = spool_module._create

    def create(name: str, dir_fd: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(name, dir_fd)

    monkeypatch.setattr(spool_module, "_create", create)
    with pytest.raises(OSError) as raised:
        spool.stock(5)
    assert raised.value.errno == errno.ENOSPC and spool.stocked == 2
    monkeypatch.setattr(spool_module, "_create", real)
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    writer, path = committed_to(spool, committer, data, "queue/a")
    assert path.read_bytes()[writer.dataset_offset:] == data and spool.stocked == 1


def test_recover_dead_only_leaves_live_processes_spares(spool: Spool) -> None:
    """A worker starting beside live ones deletes what dead processes left in tmp/
    (their partial files and spares), never a live process's spares."""
    spool.stock(2)  # ours: this process lives
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    dead = int(child.stdout)  # exited and reaped: gone (unless reused at once)
    (spool.tmp / f"{0:020d}-{dead}-1.spare").write_bytes(b"")
    (spool.tmp / f"{0:020d}-{dead}-2.part").write_bytes(b"half an instance")
    (spool.tmp / "not-ours.part").write_bytes(b"?")
    report = spool.recover(dead_only=True)
    assert (report.removed_temporary, report.removed_spares) == (2, 1)
    assert len(files(spool.tmp)) == 2 and spool.stocked == 2
    report = spool.recover()  # the router starting: everything unlocked goes
    assert (report.removed_temporary, report.removed_spares) == (0, 2)


# --- folders removed or moved aside by an operator while the router runs ----------


def test_removed_folders_are_made_again_and_commits_succeed(
        spool: Spool, committer: GroupCommitter, caplog: pytest.LogCaptureFixture) -> None:
    """rm -rf of unrouted/, of incoming/ and of tmp/ itself under a running spool: the
    next instance still commits, into the folder made again, and the log says so."""
    import shutil

    _, _, data = ct_instance(ExplicitVRLittleEndian)
    unrouted = Placement(links=("unrouted",))
    first = begin(spool)
    feed(first, data)
    committer.submit(first, lambda w, p: unrouted).result(timeout=WAIT)
    shutil.rmtree(spool.root / "unrouted")
    shutil.rmtree(spool.incoming)
    shutil.rmtree(spool.tmp)

    caplog.set_level("WARNING", logger="workers.spool")
    second = begin(spool, sop_instance_uid="1.2.3.4.6")  # creates in tmp/: made again
    feed(second, data)
    placed = committer.submit(second, lambda w, p: unrouted).result(timeout=WAIT)
    assert placed.paths == (spool.root / "unrouted" / second.name,)
    assert placed.paths[0].read_bytes()[second.dataset_offset:] == data
    third = begin(spool, sop_instance_uid="1.2.3.4.7")
    feed(third, data)
    assert third.finish() == spool.incoming / third.name  # the StoreSink path too
    assert files(spool.root / "unrouted") == [second.name]
    assert files(spool.tmp) == []
    said = " ".join(r.getMessage() for r in caplog.records)
    for folder in ("tmp/", "unrouted/", "incoming/"):
        assert f"folder {folder} was removed" in said


def test_a_folder_moved_aside_is_noticed_by_refresh(
        spool: Spool, committer: GroupCommitter) -> None:
    """mv queue/pacs queue/pacs.old; mkdir queue/pacs: nothing fails, but files must go
    where the forwarder looks. refresh() (every heartbeat) switches to the new one."""
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    to_pacs = Placement(links=("queue/pacs",))
    first = begin(spool)
    feed(first, data)
    committer.submit(first, lambda w, p: to_pacs).result(timeout=WAIT)
    pacs = spool.root / "queue" / "pacs"
    pacs.rename(pacs.with_name("pacs.old"))
    pacs.mkdir()
    assert spool.refresh() == ["queue/pacs"]
    assert spool.refresh() == []  # once: the new one is the folder now
    second = begin(spool, sop_instance_uid="1.2.3.4.6")
    feed(second, data)
    committer.submit(second, lambda w, p: to_pacs).result(timeout=WAIT)
    assert files(pacs) == [second.name]
    assert files(pacs.with_name("pacs.old")) == [first.name]


def test_refresh_lets_go_of_a_folder_no_longer_wanted(
        spool: Spool, committer: GroupCommitter, caplog: pytest.LogCaptureFixture) -> None:
    """A reload removed destination pacs; the operator deletes its empty queue folder.
    The spool still held it open, so the next heartbeat's refresh made it again, saying
    it "was removed or replaced while the router ran". A folder the worker no longer
    wants is let go instead; one it wants is still made again."""
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    for name, uid in (("pacs", "1.2.3.4.5"), ("ai", "1.2.3.4.6")):
        writer = begin(spool, sop_instance_uid=uid)
        feed(writer, data)
        placement = Placement(links=(f"queue/{name}",))
        committer.submit(writer, lambda w, p, placement=placement: placement).result(
            timeout=WAIT)
        (spool.root / "queue" / name / writer.name).unlink()  # delivered
        (spool.root / "queue" / name).rmdir()
    caplog.set_level("WARNING", logger="workers.spool")
    assert spool.refresh(lambda folder: folder != "queue/pacs") == ["queue/ai"]
    assert not (spool.root / "queue" / "pacs").exists()
    assert (spool.root / "queue" / "ai").is_dir()
    assert spool.refresh(lambda folder: folder != "queue/pacs") == []
    assert "queue/pacs/" not in caplog.text and "queue/ai/" in caplog.text


def test_retire_from_a_folder_made_again(spool: Spool, committer: GroupCommitter) -> None:
    """A forwarder retires a delivered file it found by path in a folder that replaced
    the one the spool had open: the retire must reach it (else it is sent again)."""
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    to_pacs = Placement(links=("queue/pacs",))
    first = begin(spool)
    feed(first, data)
    committer.submit(first, lambda w, p: to_pacs).result(timeout=WAIT)  # opens queue/pacs
    pacs = spool.root / "queue" / "pacs"
    pacs.rename(pacs.with_name("pacs.old"))
    pacs.mkdir()
    (pacs / "x.dcm").write_bytes(b"delivered")
    fd = os.open(pacs / "x.dcm", os.O_RDONLY)
    try:
        spool.retire("queue/pacs", "x.dcm", fd)
    finally:
        os.close(fd)
    assert files(pacs) == []


def test_write_many_takes_more_fragments_than_one_writev_may(spool: Spool) -> None:
    """Linux's writev refuses more than IOV_MAX (1,024) buffers with EINVAL."""
    _, _, data = ct_instance(ExplicitVRLittleEndian)
    buf = memoryview(bytearray(data))
    pieces = [buf[i:i + 4] for i in range(0, len(buf), 4)]
    assert len(pieces) > 3 * 1024
    writer = begin(spool)
    writer.write_many(pieces)
    path = writer.finish()
    assert path.read_bytes()[writer.dataset_offset:] == data
    assert writer.bytes_written == len(data)
