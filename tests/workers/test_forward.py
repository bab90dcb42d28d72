"""DestinationActor against real peers: DCMTK storescp and pynetdicom SCPs with chosen statuses.

What must hold (DESIGN.md D4, D5): a queued instance reaches the destination byte for
byte and leaves the queue only on success or warning; a destination that is down keeps
the queue intact and gets everything when it comes back; permanent failures and
exhausted retries end in dead/ with the reason; two workers sharing a queue deliver
each instance once.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from router.config import Destination, RetryPolicy
from router.dicom.dataset import read_part10_header
from tests.helpers import (
    Dcmtk,
    Procs,
    make_ct,
    pydicom_test_files,
    received_files,
    storescp_server,
)
from tests.helpers.net import free_port
from workers.forward import DestinationActor, is_permanent_failure
from workers.queue import queued, retry_dead
from workers.spool import Spool

pytestmark = pytest.mark.interop

CT = "1.2.840.10008.5.1.4.1.1.2"


def _dataset(path: Path) -> bytes:
    return path.read_bytes()[read_part10_header(path).dataset_offset:]


def _queue(spool: Spool, dest: str, tmp: Path, count: int, **kw: Any) -> list[Path]:
    """Write ``count`` Part 10 CTs into queue/<dest>/ as the commit would."""
    folder = spool.root / "queue" / dest
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        src = tmp / f"src{i}.dcm"
        make_ct(src, size_kb=kw.get("size_kb", 8), instance_number=i + 1, seed=i)
        target = folder / f"{i:020d}-1-{i}.dcm"
        shutil.copyfile(src, target)
        out.append(target)
    return out


def _big_endian_queue(tmp_path: Path, port: int,
                      sizes_kb: list[int]) -> tuple[Spool, DestinationActor]:
    """A spool whose "pacs" queue holds big endian CTs of ``sizes_kb``, and the
    destination's actor: the SCPs here take little endian only, so each is converted."""
    spool = Spool(tmp_path / "spool", fsync=False)
    folder = spool.root / "queue" / "pacs"
    folder.mkdir(parents=True)
    for n, size_kb in enumerate(sizes_kb, 1):
        make_ct(folder / f"{n:020d}-1-{n}.dcm", size_kb=size_kb, seed=n,
                transfer_syntax="1.2.840.10008.1.2.2")
    return spool, DestinationActor(_destination(port), spool, share=1)


def _run_until_set(actor: DestinationActor, event: threading.Event,
                   timeout: float = 60.0) -> None:
    """Run ``actor`` until ``event`` is set from another thread (an SCP's handler)."""
    async def run() -> None:
        actor.start()
        actor.scan()
        try:
            await asyncio.get_running_loop().run_in_executor(None, event.wait, timeout)
        finally:
            await actor.stop()

    asyncio.run(run())
    assert event.is_set(), f"not set within {timeout} s"


def _destination(port: int, **kw: Any) -> Destination:
    fields: dict[str, Any] = dict(name="pacs", host="127.0.0.1", port=port,
                                  ae_title="STORESCP", calling_ae="ROUTER", timeout=5.0,
                                  idle=0.5, retry=RetryPolicy(initial=0.1, max=0.5, attempts=3))
    fields.update(kw)
    return Destination(**fields)


def _queued_actor(tmp_path: Path, count: int, port: int,
                  **destination: Any) -> tuple[Spool, DestinationActor]:
    """A spool with ``count`` CTs queued for "pacs" (on ``port``, with ``destination``'s
    fields), and the destination's actor, the only sender."""
    spool = Spool(tmp_path / "spool", fsync=False)
    _queue(spool, "pacs", tmp_path, count)
    return spool, DestinationActor(_destination(port, **destination), spool, share=1)


async def _run_until(actor: DestinationActor | list[DestinationActor], done: Callable[[], bool],
                     timeout: float = 30.0) -> None:
    """Run the actors until ``done()`` holds, checked on each of their events."""
    actors = actor if isinstance(actor, list) else [actor]
    changed = asyncio.Event()
    for one in actors:
        previous = one.on_event

        def on_event(kind: str, fields: dict[str, Any],
                     previous: Any = previous) -> None:
            if previous is not None:
                previous(kind, fields)
            changed.set()

        one.on_event = on_event
        one.start()
        one.scan()
    try:
        async with asyncio.timeout(timeout):
            while not done():
                changed.clear()
                await changed.wait()
    finally:
        for one in actors:
            await one.stop()


def test_queue_delivered_byte_for_byte_to_storescp(tmp_path: Path, procs: Procs,
                                                   dcmtk: Dcmtk) -> None:
    scp = storescp_server(tmp_path, procs, args=["+B"], dcmtk=dcmtk)
    spool = Spool(tmp_path / "spool", fsync=False)
    queued = _queue(spool, "pacs", tmp_path, 6)
    expected = {read_part10_header(p).sop_instance_uid: _dataset(p) for p in queued}
    actor = DestinationActor(_destination(scp.port), spool, share=2)

    asyncio.run(_run_until(actor, lambda: actor.stats.delivered == 6))

    got = {read_part10_header(p).sop_instance_uid: _dataset(p)
           for p in received_files(scp.outdir)}
    assert got == expected
    assert not list((spool.root / "queue" / "pacs").glob("*.dcm"))  # delivered = deleted
    assert actor.stats.dead == 0


def test_destination_down_then_up_receives_everything(tmp_path: Path, procs: Procs,
                                                      dcmtk: Dcmtk) -> None:
    port = free_port()
    spool, actor = _queued_actor(tmp_path, 4, port)
    holder: dict[str, Any] = {}

    async def scenario() -> None:
        attempts = asyncio.Event()
        original = actor._unreachable

        def unreachable(exc: Any) -> None:
            original(exc)
            attempts.set()

        actor._unreachable = unreachable  # type: ignore[method-assign]
        actor.start()
        actor.scan()
        await asyncio.wait_for(attempts.wait(), 10)
        # Down: nothing moved, nothing counted as a failure of the instances; the
        # destination's own trouble is kept for status and `queue ls`.
        assert len(list((spool.root / "queue" / "pacs").glob("*.dcm"))) == 4
        assert actor.stats.dead == 0
        assert "refused" in actor.stats.last_error and actor.stats.failing_since > 0
        holder["scp"] = storescp_server(tmp_path, procs, port=port, dcmtk=dcmtk)
        await _run_until(actor, lambda: actor.stats.delivered == 4)

    asyncio.run(scenario())
    assert len(received_files(holder["scp"].outdir)) == 4
    assert actor.stats.dead == 0
    assert (actor.stats.last_error, actor.stats.failing_since) == ("", 0.0)  # delivered


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _status_scp(status: int, port: int, sop_classes: tuple[str, ...] | list[str] = (
        "1.2.840.10008.5.1.4.1.1.2",)) -> Any:
    """A pynetdicom SCP answering ``status``, for ``sop_classes`` (CT) in little
    endian only; ``.seen``: the SOP Instance UIDs it was sent."""
    return _scp(port, lambda event: status, sop_classes)


def _scp(port: int, answer: Callable[[Any], int],
         sop_classes: tuple[str, ...] | list[str] = ("1.2.840.10008.5.1.4.1.1.2",)) -> Any:
    """A pynetdicom SCP for ``sop_classes`` (CT) in little endian only, whose C-STORE
    handler is ``answer`` (after noting the instance in ``.seen``)."""
    from pynetdicom import AE, evt

    ae = AE(ae_title="STORESCP")
    for sop_class in sop_classes:
        ae.add_supported_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    seen: list[str] = []

    def on_store(event: Any) -> int:
        seen.append(event.request.AffectedSOPInstanceUID)
        return answer(event)

    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    server.seen = seen  # type: ignore[attr-defined]
    return server


@pytest.mark.parametrize(("status", "permanent"), [(0xA900, True), (0xC123, True),
                                                   (0x0122, True), (0x0110, False)])
def test_failures_end_in_dead_letters_with_the_reason(tmp_path: Path, status: int,
                                                      permanent: bool) -> None:
    assert is_permanent_failure(status) is permanent
    port = free_port()
    server = _status_scp(status, port)
    try:
        spool, actor = _queued_actor(tmp_path, 2, port)
        asyncio.run(_run_until(actor, lambda: actor.stats.dead == 2))
    finally:
        server.shutdown()
    dead = spool.root / "dead" / "pacs"
    letters = sorted(dead.glob("*.dcm"))
    assert len(letters) == 2
    for letter in letters:
        reason = json.loads(letter.with_suffix(".json").read_text())
        # The file name is the router's: the record names the instance.
        assert reason["sop_instance_uid"] == read_part10_header(letter).sop_instance_uid
        assert reason["status"] == status
        assert f"0x{status:04X}" in reason["reason"]
        assert reason["attempts"] == (1 if permanent else 3)
    # Each instance was tried once if permanent, `attempts` times if not.
    assert len(server.seen) == (2 if permanent else 6)
    assert not list((spool.root / "queue" / "pacs").glob("*.dcm"))


def test_out_of_resources_everywhere_never_empties_the_queue(tmp_path: Path) -> None:
    """A7xx from a destination that takes nothing (a full disk over a weekend): the
    queue waits with the destination's back-off and no instance uses up its attempts
    (3 here), however many times it is refused; A7xx used to count like 0110H, and
    the default 20 attempts emptied the queue into dead letters in about an hour."""
    port = free_port()
    refused = threading.Event()

    def refuse(event: Any) -> int:
        if len(server.seen) >= 10:
            refused.set()
        return 0xA700

    server = _scp(port, refuse)
    try:
        spool, actor = _queued_actor(tmp_path, 2, port)
        _run_until_set(actor, refused)
    finally:
        server.shutdown()
    assert len(server.seen) >= 10  # each of the two refused five times and more
    assert actor.stats.dead == 0 and not (spool.root / "dead").exists()
    assert len(list((spool.root / "queue" / "pacs").glob("*.dcm"))) == 2


def test_an_instance_refused_a7xx_alone_ends_in_dead_letters_after_give_up_after(
        tmp_path: Path) -> None:
    """Orthanc answers A700H for an instance it cannot index (no PatientID). Alone
    in its queue, nothing says whether the destination is full or refuses that
    instance, so no refusal counts: it was retried for ever. Now it goes to dead
    letters once it has been failing for retry.give_up_after seconds."""
    port = free_port()
    server = _status_scp(0xA700, port)
    try:
        spool, actor = _queued_actor(tmp_path, 1, port, retry=RetryPolicy(
            initial=0.05, max=0.1, attempts=3, give_up_after=0.5))
        asyncio.run(_run_until(actor, lambda: actor.stats.dead == 1))
    finally:
        server.shutdown()
    (letter,) = (spool.root / "dead" / "pacs").glob("*.dcm")
    reason = json.loads(letter.with_suffix(".json").read_text())
    assert reason["status"] == 0xA700
    assert "gave up: failing for 0 s (retry.give_up_after)" in reason["reason"], reason
    assert reason["attempts"] == 0  # none counted: the instance was alone
    assert len(server.seen) >= 2
    assert not list((spool.root / "queue" / "pacs").iterdir())  # no record left behind


def test_an_instances_failures_survive_a_restart(tmp_path: Path) -> None:
    """Attempts were counted in memory only: a router restarted daily would retry an
    instance its destination refuses (0110H) for ever, 19 of 20 attempts at a time."""
    port = free_port()
    third = threading.Event()

    def refuse(event: Any) -> int:
        if len(server.seen) >= 3:  # the first two refusals are recorded by now
            third.set()
        return 0x0110

    server = _scp(port, refuse)
    try:
        spool, first = _queued_actor(tmp_path, 1, port, retry=RetryPolicy(
            initial=0.05, max=0.1, attempts=10))
        _run_until_set(first, third)
        assert first.stats.dead == 0
        (record,) = (spool.root / "queue" / "pacs").glob("*.json")
        failures = json.loads(record.read_text())["failures"]
        assert failures >= 2
        # A new process, whose limit is one more: the next refusal is the last.
        seen = len(server.seen)
        again = DestinationActor(_destination(port, retry=RetryPolicy(
            initial=0.05, max=0.1, attempts=failures + 1)), spool, share=1)
        asyncio.run(_run_until(again, lambda: again.stats.dead == 1))
    finally:
        server.shutdown()
    assert len(server.seen) == seen + 1
    (letter,) = (spool.root / "dead" / "pacs").glob("*.dcm")
    assert json.loads(letter.with_suffix(".json").read_text())["attempts"] == failures + 1


def test_a_delivered_instance_leaves_no_failure_record(tmp_path: Path) -> None:
    port = free_port()
    answers = iter([0x0110, 0xA700])
    server = _scp(port, lambda event: next(answers, 0x0000))
    try:
        spool, actor = _queued_actor(tmp_path, 1, port)
        asyncio.run(_run_until(actor, lambda: actor.stats.delivered == 1))
    finally:
        server.shutdown()
    assert len(server.seen) == 3
    assert not list((spool.root / "queue" / "pacs").iterdir())


def test_a_hung_destination_never_empties_the_queue(tmp_path: Path) -> None:
    """A destination that accepts associations and never answers a C-STORE (a PACS
    hung until someone restarts it): each store times out and the association is
    aborted, the queue waits with the back-off, and no instance uses up its attempts
    (3 here). The lost association used to count as the instance's failure, and the
    whole queue went to dead letters after ``attempts`` timeouts each."""
    hung, release = threading.Event(), threading.Event()

    def on_store(event: Any) -> int:
        if len(server.seen) >= 7:  # more than the 2 x 3 attempts the old code allowed
            hung.set()
        release.wait(60)
        return 0x0000

    port = free_port()
    server = _scp(port, on_store)
    seen = server.seen
    try:
        spool, actor = _queued_actor(tmp_path, 2, port, timeout=0.3)
        actor.on_event = lambda kind, fields: hung.set() if kind == "instance.dead" else None
        _run_until_set(actor, hung)
    finally:
        release.set()
        server.shutdown()
    assert actor.stats.dead == 0 and not (spool.root / "dead").exists()
    assert len(seen) >= 7
    assert len(list((spool.root / "queue" / "pacs").glob("*.dcm"))) == 2


def test_instances_a_destination_aborts_on_end_in_dead_letters(tmp_path: Path) -> None:
    """A destination that aborts the association on an instance (storescp does on a
    data set it cannot parse) fails that instance: it counts towards its attempts
    (3 here) and ends in dead/. Counted as a stalled destination instead, a queue
    of such instances waited with ever longer back-offs and never emptied, and the
    good instances behind them waited too."""
    def on_store(event: Any) -> int:
        event.assoc.abort()
        return 0x0000

    port = free_port()
    server = _scp(port, on_store)
    seen = server.seen
    try:
        spool, actor = _queued_actor(tmp_path, 3, port)
        asyncio.run(_run_until(actor, lambda: actor.stats.dead == 3, timeout=30))
    finally:
        server.shutdown()
    assert len(seen) == 9  # each of the three, three times
    assert len(list((spool.root / "dead" / "pacs").glob("*.dcm"))) == 3
    assert not list((spool.root / "queue" / "pacs").glob("*.dcm"))


def test_warning_counts_as_delivered(tmp_path: Path) -> None:
    port = free_port()
    server = _status_scp(0xB000, port)
    try:
        spool, actor = _queued_actor(tmp_path, 2, port)
        asyncio.run(_run_until(actor, lambda: actor.stats.delivered == 2))
    finally:
        server.shutdown()
    assert not list((spool.root / "queue" / "pacs").glob("*.dcm"))
    assert not (spool.root / "dead").exists()


def test_an_instance_in_another_native_syntax_is_converted(tmp_path: Path) -> None:
    port = free_port()
    server = _status_scp(0x0000, port)  # accepts CT in little endian only
    try:
        _, actor = _big_endian_queue(tmp_path, port, [4])
        asyncio.run(_run_until(actor, lambda: actor.stats.delivered == 1))
    finally:
        server.shutdown()
    assert len(server.seen) == 1 and actor.stats.dead == 0


def test_an_instance_too_large_to_convert_is_a_dead_letter_saying_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Conversion holds the whole data set in memory, decoded: one past the limit
    (1 MiB here, 256 MiB as shipped) is a dead letter that says why, and the one
    within it still goes. A 1.2 GB instance converted on the event loop took 4.5 GB
    and stalled the worker until the supervisor killed it, again at each restart."""
    import workers.outbound

    monkeypatch.setattr(workers.outbound, "MAX_CONVERTED_BYTES", 1 << 20)
    port = free_port()
    server = _status_scp(0x0000, port)  # accepts CT in little endian only
    try:
        spool, actor = _big_endian_queue(tmp_path, port, [2048, 512])
        asyncio.run(_run_until(actor, lambda: actor.stats.dead + actor.stats.delivered == 2))
    finally:
        server.shutdown()
    assert (actor.stats.delivered, actor.stats.dead) == (1, 1)
    reason = json.loads(next((spool.root / "dead" / "pacs").glob("*.json")).read_text())
    assert "MiB is too large to convert to 1.2.840.10008.1.2.1 (at most 1 MiB)" in \
        reason["reason"], reason


def test_an_unforeseen_error_sending_an_instance_is_a_dead_letter_not_a_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our own failure on one instance (pydicom raising where no guard expected it):
    the sender gave the instance back and restarted, once a second for ever, each
    time leaving the association it had opened (an outside campaign: the PACS then
    refused more). Now that association is aborted and the instance kept in dead/
    with the reason; the next instance goes."""
    import workers.outbound

    real = workers.outbound._converted

    def converted(path: Path, fd: int | None, part10: Any, syntax: str) -> bytes:
        if part10.sop_instance_uid.endswith(".1"):
            raise RuntimeError("unforeseen")
        return real(path, fd, part10, syntax)

    monkeypatch.setattr(workers.outbound, "_converted", converted)
    port = free_port()
    server = _status_scp(0x0000, port)  # accepts CT in little endian only
    try:
        spool, actor = _big_endian_queue(tmp_path, port, [4, 4])
        for path in sorted((spool.root / "queue" / "pacs").glob("*.dcm")):
            ds = pydicom.dcmread(path)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = \
                f"1.2.3.{path.name[-5]}"
            ds.save_as(path, enforce_file_format=True)
        asyncio.run(_run_until(actor, lambda: actor.stats.dead + actor.stats.delivered == 2))
    finally:
        server.shutdown()
    assert (actor.stats.delivered, actor.stats.dead) == (1, 1)
    assert actor.stats.associations == 2  # one aborted with the failure, one for the next
    reason = json.loads(next((spool.root / "dead" / "pacs").glob("*.json")).read_text())
    assert reason["reason"] == "internal error: RuntimeError: unforeseen", reason


def test_an_unaccepted_compressed_syntax_is_a_permanent_dead_letter(tmp_path: Path) -> None:
    port = free_port()
    jpeg = next(p for p in pydicom_test_files() if p.name == "SC_rgb_jpeg_dcmtk.dcm")
    server = _status_scp(0x0000, port, [SECONDARY_CAPTURE])  # in little endian only
    try:
        spool = Spool(tmp_path / "spool", fsync=False)
        folder = spool.root / "queue" / "pacs"
        folder.mkdir(parents=True)
        shutil.copyfile(jpeg, folder / "00000000000000000001-1-1.dcm")
        actor = DestinationActor(_destination(port), spool, share=1)
        asyncio.run(_run_until(actor, lambda: actor.stats.dead == 1))
    finally:
        server.shutdown()
    (reason_file,) = (spool.root / "dead" / "pacs").glob("*.json")
    reason = json.loads(reason_file.read_text())["reason"]
    assert "accepts no presentation context" in reason and "JPEG Baseline" in reason
    assert "does not decompress" in reason and not server.seen


def test_two_workers_sharing_a_queue_deliver_each_instance_once(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    port = free_port()
    server = _status_scp(0x0000, port)
    try:
        spool = Spool(tmp_path / "spool", fsync=False)
        _queue(spool, "pacs", tmp_path, 40, size_kb=2)
        one = DestinationActor(_destination(port), spool, share=2, worker_id=1)
        two = DestinationActor(_destination(port), spool, share=2, worker_id=2)

        queue = spool.root / "queue" / "pacs"
        asyncio.run(_run_until([one, two], lambda: not list(queue.glob("*.dcm"))))
    finally:
        server.shutdown()
    assert one.stats.delivered + two.stats.delivered == 40
    assert len(server.seen) == 40 and len(set(server.seen)) == 40


def test_a_backlog_is_offered_to_the_other_workers_and_never_passed_on_twice(
        tmp_path: Path) -> None:
    """While every sender here has an instance waiting, new ones are offered to the
    other workers (share_with); one another worker handed over stays here."""
    spool = Spool(tmp_path / "spool", fsync=False)
    offered: list[str] = []
    turn = iter([True, False] * 10)

    def share_with(name: str) -> bool:
        offered.append(name)
        return next(turn)

    actor = DestinationActor(_destination(1), spool, share=2, share_with=share_with)
    for n in range(6):  # no sender runs: all stay waiting
        actor.enqueue(f"q{n}.dcm")
    assert offered == ["q2.dcm", "q3.dcm", "q4.dcm", "q5.dcm"]  # 2 waiting: one each
    assert actor.depth == 4  # q0, q1, then q3 and q5 that no other worker took
    actor.enqueue("q6.dcm", handed=True)
    assert len(offered) == 4 and actor.depth == 5


def test_a_reload_that_gives_a_worker_a_share_starts_its_sender(tmp_path: Path) -> None:
    """Concurrency 1 -> 2 over 2 workers: worker 2 had no part, so no sender, and
    update() started senders only where some ran already: what it queued after the
    reload stayed queued until a restart (an outside campaign)."""
    port = free_port()
    server = _status_scp(0x0000, port)
    try:
        spool = Spool(tmp_path / "spool", fsync=False)
        _queue(spool, "pacs", tmp_path, 3, size_kb=2)
        handed: list[str] = []
        actor = DestinationActor(_destination(port), spool, share=0, hand_off=handed.append)

        async def scenario() -> None:
            delivered = asyncio.Event()
            actor.on_event = lambda kind, fields: (
                delivered.set() if actor.stats.delivered == 3 else None)
            actor.start()
            assert actor.scan() == 0  # no share: the others take up the queue
            actor.update(_destination(port), 1)
            await asyncio.wait_for(delivered.wait(), 20)
            await actor.stop()

        asyncio.run(scenario())
    finally:
        server.shutdown()
    assert actor.stats.delivered == 3 and len(server.seen) == 3 and not handed


def test_a_reload_that_takes_a_workers_share_ends_its_senders_and_passes_its_queue_on(
        tmp_path: Path) -> None:
    """Concurrency 2 -> 1 over 2 workers: the worker left with no part kept its sender,
    so the destination saw two associations, and a node that takes one at a time
    stalled. Now its sender ends, and what it held goes to the worker that sends. And
    its view of the destination goes: "failing since" stayed in status and the
    Prometheus gauge for ever, the others delivering (an outside campaign)."""
    spool = Spool(tmp_path / "spool", fsync=False)
    _queue(spool, "pacs", tmp_path, 3, size_kb=2)
    handed: list[str] = []
    down = free_port()  # nothing listens: the instances stay queued here
    actor = DestinationActor(_destination(down), spool, share=1, hand_off=handed.append)

    async def scenario() -> None:
        actor.start()
        assert actor.scan() == 3
        actor.stats.failed("Connection refused", 1000.0)
        actor.update(_destination(down), 0)
        assert (actor.stats.failing_since, actor.stats.last_error) == (0.0, "")
        await asyncio.wait_for(asyncio.gather(*actor._senders), 20)
        await actor.stop()

    asyncio.run(scenario())
    assert sorted(handed) == sorted(queued(spool.root, "pacs")) and actor.depth == 0


def test_a_queue_larger_than_memory_is_taken_up_from_disk_in_windows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.forward

    monkeypatch.setattr(workers.forward, "MAX_IN_MEMORY", 8)
    port = free_port()
    server = _status_scp(0x0000, port)
    try:
        spool = Spool(tmp_path / "spool", fsync=False)
        _queue(spool, "pacs", tmp_path, 30, size_kb=2)
        actor = DestinationActor(_destination(port), spool, share=2)
        peak: list[int] = []
        actor.on_event = lambda kind, fields: peak.append(actor.depth)
        asyncio.run(_run_until(actor, lambda: actor.stats.delivered == 30))
    finally:
        server.shutdown()
    assert max(peak) <= 8  # never more than the window in memory
    assert len(server.seen) == 30 and len(set(server.seen)) == 30


def test_claims_exclude_senders_of_one_destination_not_of_two(tmp_path: Path) -> None:
    """A claim is a lock on one byte per destination: a file linked into two queues is
    claimed once per destination, in this process or another."""
    import os
    import subprocess
    import sys
    import textwrap

    spool = Spool(tmp_path / "spool", fsync=False)
    (path_a,) = _queue(spool, "a", tmp_path, 1)
    path_b = spool.root / "queue" / "b" / path_a.name
    path_b.parent.mkdir()
    os.link(path_a, path_b)
    a1, a2 = (DestinationActor(_destination(1, name="a"), spool, share=1) for _ in range(2))
    b = DestinationActor(_destination(1, name="b"), spool, share=1)

    fd = a1._claim(path_a)
    assert fd >= 0
    assert a2._claim(path_a) == -1  # the same destination: taken
    fd_b = b._claim(path_b)
    assert fd_b >= 0  # another destination's byte: free
    a1._unclaim(path_a, fd)
    fd = a2._claim(path_a)
    assert fd >= 0  # released, so claimable again

    # Another process (another worker) holding the claim excludes us too.
    b._unclaim(path_b, fd_b)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from router.config import Destination
            from workers.forward import DestinationActor
            from workers.spool import Spool
            spool = Spool(Path({str(spool.root)!r}), fsync=False)
            actor = DestinationActor(Destination(name="b", host="127.0.0.1", port=1,
                                                 ae_title="X"), spool, share=1)
            print(actor._claim(Path({str(path_b)!r})) >= 0, flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        assert b._claim(path_b) == -1
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    fd_b = b._claim(path_b)
    assert fd_b >= 0  # the holder exited: the kernel dropped its claim

    # Delivered meanwhile (the file left the queue while we waited): no claim.
    spool.retire("queue/a", path_a.name, fd)
    a2._unclaim(path_a, fd)
    assert a1._claim(path_a) == -1
    b._unclaim(path_b, fd_b)


def _failing_open(monkeypatch: pytest.MonkeyPatch, error: int, times: int) -> list[int]:
    """Make the claim's open of a queued file fail ``times`` times with ``error`` (the
    tests run as root, which opens read-only files anyway); how many it failed."""
    import os

    import workers.forward

    failed: list[int] = []
    real_open = os.open

    def open_queued(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags == workers.forward._CLAIM_FLAGS and len(failed) < times:
            failed.append(error)
            raise OSError(error, os.strerror(error), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(workers.forward.os, "open", open_queued)
    return failed


@pytest.mark.parametrize("error", ["EMFILE", "EROFS", "EIO"])
def test_a_claim_failing_for_this_machines_trouble_is_retried_not_dead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str) -> None:
    """Out of descriptors, a spool remounted read-only, a disk error: the claim fails
    for a while, the instance is the same. It was failed as permanent and moved to
    dead/ unsent whenever the move itself did not fail the same way (an outside
    campaign). Now it waits its back-off, uncounted, and is delivered."""
    import errno

    failed = _failing_open(monkeypatch, getattr(errno, error), 2)
    port = free_port()
    server = _status_scp(0x0000, port)
    try:
        spool, actor = _queued_actor(tmp_path, 1, port, retry=RetryPolicy(
            initial=0.05, max=0.1, attempts=2))
        asyncio.run(_run_until(actor, lambda: actor.stats.delivered == 1))
    finally:
        server.shutdown()
    assert len(failed) == 2 and actor.stats.dead == 0 and len(server.seen) == 1
    assert not (spool.root / "dead").exists()


@pytest.mark.parametrize("error", ["EACCES", "ELOOP", "EISDIR"])
def test_a_queued_file_that_cannot_be_claimed_goes_to_dead_letters(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str) -> None:
    """A queued file the router may not open to claim it (EACCES: put there by hand,
    read-only to the router's user; ELOOP: a link, opened with O_NOFOLLOW; EISDIR):
    one line of reason in dead/, and the sender goes on. No retry changes them."""
    import errno

    _failing_open(monkeypatch, getattr(errno, error), 1)
    spool = Spool(tmp_path / "spool", fsync=False)
    (path,) = _queue(spool, "pacs", tmp_path, 1)
    actor = DestinationActor(_destination(free_port()), spool, share=1)
    asyncio.run(_run_until(actor, lambda: actor.stats.dead == 1))
    (reason_file,) = (spool.root / "dead" / "pacs").glob("*.json")
    assert "cannot claim the queued file" in json.loads(reason_file.read_text())["reason"]
    assert not path.exists() and (spool.root / "dead" / "pacs" / path.name).exists()


def test_an_odd_length_data_set_goes_out_padded_and_arrives(tmp_path: Path, procs: Procs,
                                                            dcmtk: Dcmtk) -> None:
    """pydicom's image_dfl.dcm (deflated, written by another toolkit) has a 4,303-byte
    data set: DCMTK refuses odd P-DATA fragments, so it goes out with one NUL of
    padding (PS3.5 §7.1: values, and so data sets, are of even length)."""
    from tests.helpers import pydicom_test_files

    source = next(p for p in pydicom_test_files() if p.name == "image_dfl.dcm")
    assert (source.stat().st_size - read_part10_header(source).dataset_offset) % 2
    scp = storescp_server(tmp_path, procs, args=["+B"], dcmtk=dcmtk)
    spool = Spool(tmp_path / "spool", fsync=False)
    folder = spool.root / "queue" / "pacs"
    folder.mkdir(parents=True)
    shutil.copyfile(source, folder / "00000000000000000001-1-1.dcm")
    actor = DestinationActor(_destination(scp.port), spool, share=1)

    asyncio.run(_run_until(actor, lambda: actor.stats.delivered + actor.stats.dead == 1))

    assert actor.stats.delivered == 1
    (got,) = received_files(scp.outdir)
    assert _dataset(got) == _dataset(source) + b"\x00"


def test_time_the_destination_was_down_does_not_count_towards_give_up_after(
        tmp_path: Path) -> None:
    """An instance refused once (0110H), then a destination unreachable for longer than
    give_up_after, then refused A700H once more: it used to go to dead letters at that
    first refusal after the outage ("failing for" counted the outage). Failures
    further apart than the longest back-off say it was not being tried: now it is
    retried, and delivered."""
    wall = [1_000_000.0]
    answers = iter([0x0110, 0xA700])

    def answer(event: Any) -> int:
        status = next(answers, 0x0000)
        if status == 0xA700:
            wall[0] += 100  # the outage: 100 s without a try, give_up_after is 10
        return status

    port = free_port()
    server = _scp(port, answer)
    try:
        spool = Spool(tmp_path / "spool", fsync=False)
        _queue(spool, "pacs", tmp_path, 1)
        actor = DestinationActor(_destination(port, retry=RetryPolicy(
            initial=0.05, max=0.1, attempts=5, give_up_after=10)), spool, share=1,
            wall_clock=lambda: wall[0])
        asyncio.run(_run_until(actor, lambda: actor.stats.delivered + actor.stats.dead == 1))
    finally:
        server.shutdown()
    assert (actor.stats.delivered, actor.stats.dead) == (1, 0)
    assert len(server.seen) == 3


def test_two_workers_keep_one_back_off_and_a_retry_gives_fresh_attempts(
        tmp_path: Path) -> None:
    """Two workers share a queue and both take it up again (a `queue retry` makes them
    rescan): each scheduled the instance with its own back-off, so tries came 0.3 s
    apart with a 6 s back-off, and the one that had not dead-lettered it kept its
    count, so after `queue retry` the instance got 2 tries of 3. Now the record on
    disk holds the back-off and the count for both."""

    tries: list[float] = []
    changed: list[Callable[[], None]] = []  # wakes the test's loop from the SCP's thread

    def refuse(event: Any) -> int:
        tries.append(time.monotonic())
        for wake in changed:
            wake()
        return 0x0110

    port = free_port()
    server = _scp(port, refuse)
    policy = RetryPolicy(initial=0.5, max=0.5, attempts=3)
    spool = Spool(tmp_path / "spool", fsync=False)
    _queue(spool, "pacs", tmp_path, 1)
    actors = [DestinationActor(_destination(port, retry=policy), spool, share=1,
                               worker_id=w) for w in (1, 2)]

    def dead() -> int:
        return sum(a.stats.dead for a in actors)

    async def run() -> None:
        event = asyncio.Event()
        loop = asyncio.get_running_loop()
        changed.append(lambda: loop.call_soon_threadsafe(event.set))

        async def until(done: Callable[[], bool]) -> None:
            while not done():
                event.clear()
                await event.wait()

        for actor in actors:
            actor.on_event = lambda kind, fields: event.set()
            actor.start()
            actor.scan()
        try:
            async with asyncio.timeout(30):
                await until(lambda: sum(a.stats.retried for a in actors) == 1)
                for actor in actors:  # `queue retry pacs` with nothing dead: a rescan
                    actor.scan()
                await until(lambda: dead() == 1)
                assert retry_dead(spool.root, "pacs").moved == 1
                for actor in actors:
                    actor.scan()
                await until(lambda: dead() == 2)
        finally:
            for actor in actors:
                await actor.stop()

    try:
        asyncio.run(run())
    finally:
        server.shutdown()
    assert len(tries) == 6, tries  # 3 attempts, then 3 fresh ones after the retry
    for before, after in (tries[0:2], tries[1:3], tries[3:5], tries[4:6]):
        assert after - before >= 0.5 * 0.75 - 0.05, tries  # the back-off, less its jitter
    (letter,) = (spool.root / "dead" / "pacs").glob("*.json")
    assert json.loads(letter.read_text())["attempts"] == 3


def test_an_instance_that_cannot_go_to_dead_letters_stays_queued_and_is_retried(
        tmp_path: Path) -> None:
    """dead/pacs cannot be made (here: a file is in its way; in real life a full or
    read-only disk): an instance refused A900H used to be forgotten until a restart,
    in its queue but never tried again. Then it was tried again, but sent again too:
    every few seconds while the disk stayed full (438 C-STOREs in 15 s for 47
    instances, an outside campaign). Now the verdict is kept and only the move is
    tried again, until the way is clear."""
    import logging

    spool = Spool(tmp_path / "spool", fsync=False)
    obstacle = spool.root / "dead" / "pacs"

    class ClearTheWay(logging.Handler):
        """Removes the obstacle when the fourth failed move (two per instance) is
        logged."""

        def __init__(self) -> None:
            super().__init__()
            self.failed_moves = 0

        def emit(self, record: logging.LogRecord) -> None:
            if "cannot move it to dead/" in record.getMessage():
                self.failed_moves += 1
                if self.failed_moves == 4:
                    obstacle.unlink()

    port = free_port()
    server = _scp(port, lambda event: 0xA900)
    watch = ClearTheWay()
    logging.getLogger("workers.forward").addHandler(watch)
    try:
        _queue(spool, "pacs", tmp_path, 2)
        obstacle.parent.mkdir()
        obstacle.write_text("in the way")
        actor = DestinationActor(_destination(port), spool, share=1)
        asyncio.run(_run_until(actor, lambda: actor.stats.dead == 2, timeout=15))
    finally:
        logging.getLogger("workers.forward").removeHandler(watch)
        server.shutdown()
    assert len(server.seen) == 2 and actor.stats.delivered == 0  # each sent once
    assert watch.failed_moves >= 4
    letters = sorted((spool.root / "dead" / "pacs").glob("*.json"))
    assert [json.loads(f.read_text())["status"] for f in letters] == [0xA900, 0xA900]
    assert not list((spool.root / "queue" / "pacs").glob("*.dcm"))


def test_failure_records_are_removed_whichever_worker_delivers(tmp_path: Path) -> None:
    """Two workers, each instance refused once (0110H): the worker that delivered an
    instance removed its record only if it had written it itself, and 33 of 40
    records stayed until the next restart."""
    refused: set[str] = set()

    def answer(event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid in refused:
            return 0x0000
        refused.add(uid)
        return 0x0110

    port = free_port()
    server = _scp(port, answer)
    try:
        spool = Spool(tmp_path / "spool", fsync=False)
        _queue(spool, "pacs", tmp_path, 20, size_kb=2)
        actors = [DestinationActor(_destination(port), spool, share=1, worker_id=w)
                  for w in (1, 2)]
        asyncio.run(_run_until(actors, lambda: sum(a.stats.delivered for a in actors) == 20))
    finally:
        server.shutdown()
    assert not list((spool.root / "queue" / "pacs").iterdir())


# --- the versions of one instance (workers/order.py) ----------------------------------


def _commit_versions(spool: Spool, tmp: Path, versions: list[str],
                     uid: str = "1.2.826.0.1.3680043.8.498.4242") -> list[str]:
    """Commit one CT per label in ``versions``, all with SOP Instance UID ``uid`` and
    the label as Series Description, into queue/pacs/ as a worker's commit does (order
    markers included); their queue names, oldest first."""
    from workers.spool import GroupCommitter, Placement

    names = []
    with GroupCommitter(spool) as committer:
        for n, label in enumerate(versions):
            src = tmp / f"version{n}.dcm"
            make_ct(src, size_kb=2, sop_instance_uid=uid, attrs={"SeriesDescription": label})
            header = read_part10_header(src)
            writer = spool.begin(sop_class_uid=CT, sop_instance_uid=uid,
                                 transfer_syntax=header.transfer_syntax, calling_ae="MODALITY",
                                 called_ae="ROUTER", association_id=f"A{n}")
            writer.write(memoryview(_dataset(src)))
            placed = committer.submit(writer, Placement(links=("queue/pacs",))).result(10)
            assert placed.path is not None
            names.append(placed.path.name)
    return names


def _versions_scp(port: int, slow: str = "", refuse: str = "",
                  status: int = 0x0110) -> tuple[Any, list[str]]:
    """An SCP that answers version ``slow`` after 0.5 s (still in flight when the
    others are claimed), refuses every store of version ``refuse`` with ``status``
    and takes the rest; and the versions it took, in the order it took them."""
    taken: list[str] = []

    def answer(event: Any) -> int:
        label = str(event.dataset.SeriesDescription)
        if label == refuse:
            return status
        if label == slow:
            time.sleep(0.5)
        taken.append(label)
        return 0x0000

    return _scp(port, answer), taken


def test_a_newer_version_waits_while_the_older_one_is_in_flight(tmp_path: Path) -> None:
    """A workstation sends an instance, then a corrected version with the same SOP
    Instance UID. Two senders of one worker took one each: the new one was answered
    first, the old one after it, and the PACS kept the old one."""
    port = free_port()
    server, taken = _versions_scp(port, slow="old")
    spool = Spool(tmp_path / "spool", fsync=False)
    _commit_versions(spool, tmp_path, ["old", "new"])
    actor = DestinationActor(_destination(port), spool, share=2)
    try:
        asyncio.run(_run_until(actor, lambda: actor.stats.delivered == 2))
    finally:
        server.shutdown()
    assert taken == ["old", "new"]
    assert not list((spool.root / "queue" / "pacs").iterdir())
    assert not [p for p in (spool.root / "order").rglob("*") if p.is_file()]


@pytest.mark.parametrize("each_knows_its_own", [True, False])
def test_two_workers_deliver_the_versions_of_an_instance_in_order(
        tmp_path: Path, each_knows_its_own: bool) -> None:
    """Three versions received by two workers (each enqueues its own), or taken up
    from disk by both (a restart after an outage): the oldest one is slow to be
    answered, and still the destination gets the newest version last."""
    port = free_port()
    server, taken = _versions_scp(port, slow="v1")
    spool = Spool(tmp_path / "spool", fsync=False)
    names = _commit_versions(spool, tmp_path, ["v1", "v2", "v3"])
    one, two = (DestinationActor(_destination(port), spool, share=1, worker_id=w)
                for w in (1, 2))

    async def run() -> None:
        changed = asyncio.Event()
        for actor in (one, two):
            actor.on_event = lambda kind, fields: changed.set()
            actor.start()
        if each_knows_its_own:
            one.enqueue(names[0])
            two.enqueue(names[1])
            two.enqueue(names[2])
        else:
            one.scan()
            two.scan()
        try:
            async with asyncio.timeout(30):
                while one.stats.delivered + two.stats.delivered < 3:
                    changed.clear()
                    await changed.wait()
        finally:
            await one.stop()
            await two.stop()

    try:
        asyncio.run(run())
    finally:
        server.shutdown()
    assert taken == ["v1", "v2", "v3"]
    assert not list((spool.root / "queue" / "pacs").iterdir())


@pytest.mark.parametrize("status", [0x0110, 0xA700])
def test_a_failed_older_version_gives_way_to_the_newer_one(tmp_path: Path,
                                                          status: int) -> None:
    """The PACS refused the original (the usual reason to send a correction): the
    correction waited for all of the original's retries -- with A700H, which counts
    no attempt while nothing else is delivered, for the whole give_up_after (3 days)
    (a review). The failed original now goes to dead/, superseded, and the
    correction goes at once."""
    port = free_port()
    server, taken = _versions_scp(port, refuse="old", status=status)
    spool = Spool(tmp_path / "spool", fsync=False)
    old, _ = _commit_versions(spool, tmp_path, ["old", "new"])
    actor = DestinationActor(_destination(port, retry=RetryPolicy(
        initial=1, max=2, attempts=20)), spool, share=1)
    try:
        asyncio.run(_run_until(actor, lambda: actor.stats.delivered == 1))
    finally:
        server.shutdown()
    assert taken == ["new"] and actor.stats.dead == 1
    letter = json.loads((spool.root / "dead" / "pacs" / old).with_suffix(".json").read_text())
    assert "superseded by" in letter["reason"] and f"0x{status:04X}" in letter["reason"]
    assert not [p for p in (spool.root / "order").rglob("*") if p.is_file()]
    # The correction is delivered: `queue retry` keeps the original, which would
    # replace it at the destination.
    retried = retry_dead(spool.root, "pacs")
    assert retried.moved == 0 and [k.name for k in retried.kept] == [old]
    assert retried.kept[0].superseded_by is not None


def test_a_newer_version_goes_once_the_older_one_is_a_dead_letter(tmp_path: Path) -> None:
    port = free_port()
    taken: list[str] = []

    def answer(event: Any) -> int:
        label = str(event.dataset.SeriesDescription)
        if label == "old":
            return 0xA900  # does not match the SOP class: for good
        taken.append(label)
        return 0x0000

    server = _scp(port, answer)
    spool = Spool(tmp_path / "spool", fsync=False)
    old, _ = _commit_versions(spool, tmp_path, ["old", "new"])
    actor = DestinationActor(_destination(port), spool, share=1)
    try:
        asyncio.run(_run_until(actor, lambda: actor.stats.delivered == 1))
    finally:
        server.shutdown()
    assert taken == ["new"] and actor.stats.dead == 1
    assert (spool.root / "dead" / "pacs" / old).exists()
    assert not [p for p in (spool.root / "order").rglob("*") if p.is_file()]


def test_a_transparent_send_never_overtakes_an_older_version_still_queued(
        tmp_path: Path) -> None:
    """A correction sent through a transparent rule while the original waits in the
    queue for the same destination went ahead of it (a review): the PACS got the
    original last. Its sender is now told to try again (A700H) meanwhile."""
    port = free_port()
    server, taken = _versions_scp(port)
    spool = Spool(tmp_path / "spool", fsync=False)
    _commit_versions(spool, tmp_path, ["old"])
    make_ct(tmp_path / "held.dcm", size_kb=2, sop_instance_uid="1.2.826.0.1.3680043.8.498.4242",
            attrs={"SeriesDescription": "new"})
    actor = DestinationActor(_destination(port), spool, share=1)

    async def run() -> tuple[int, str | None]:
        delivered = asyncio.Event()
        actor.on_event = lambda kind, fields: delivered.set() if kind == \
            "instance.forwarded" else None
        actor.scan()
        try:
            answer = await actor.send_now(tmp_path / "held.dcm")  # taken before the queue
            async with asyncio.timeout(30):
                await delivered.wait()
            return answer
        finally:
            await actor.stop()

    try:
        status, comment = asyncio.run(run())
    finally:
        server.shutdown()
    assert status == 0xA700 and comment == "an older version is queued for pacs"
    assert taken == ["old"]


def test_stale_markers_go_once_the_queue_has_run_dry(tmp_path: Path) -> None:
    """Queued files removed by hand (the way to drop a backlog) kept their data on
    disk through their order markers until the next start (a review)."""
    port = free_port()
    server, _ = _versions_scp(port)
    spool = Spool(tmp_path / "spool", fsync=False)
    first, _ = _commit_versions(spool, tmp_path, ["a", "b"])
    (spool.root / "queue" / "pacs" / first).unlink()  # by hand
    actor = DestinationActor(_destination(port), spool, share=1)
    try:
        asyncio.run(_run_until(actor, lambda: actor.stats.delivered == 1))
    finally:
        server.shutdown()
    assert not [p for p in (spool.root / "order").rglob("*") if p.is_file()]


def test_a_newer_version_held_for_long_is_still_delivered(tmp_path: Path) -> None:
    """Each check again doubled the wait: after 1024 of them (85 minutes of another
    worker sending a huge older version) 2 ** n overflowed, the sender died and the
    newer version was never delivered (a review)."""
    from workers.forward import _Entry

    spool = Spool(tmp_path / "spool", fsync=False)
    actor = DestinationActor(_destination(free_port()), spool, share=1)
    entry = _Entry("newer.dcm", held=5000)
    actor._behind["older.dcm"] = [entry]
    actor._left("older.dcm", later=True)
    ((due, _, again),) = actor._delayed
    assert again is entry and due - actor.clock() <= 5.0


def test_an_instance_whose_sender_failed_unforeseen_is_still_delivered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sender that raised what nothing foresaw (a destination's tls_ca gone, say)
    was restarted, but the instance it held stayed known and scheduled nowhere:
    never delivered until the router restarted (an outside campaign)."""
    import workers.outbound as outbound

    real, calls = outbound.tls_context, []

    def fails_once(destination: Destination) -> Any:
        calls.append(destination.name)
        if len(calls) == 1:
            raise RuntimeError("something nobody foresaw")
        return real(destination)

    monkeypatch.setattr(outbound, "tls_context", fails_once)
    port = free_port()
    server = _status_scp(0x0000, port)
    try:
        _, actor = _queued_actor(tmp_path, 1, port)
        asyncio.run(_run_until(actor, lambda: actor.stats.delivered == 1))
    finally:
        server.shutdown()
    assert len(calls) == 2 and len(server.seen) == 1
