"""AssociationActor in a real event loop, driven by DCMTK and by our client.

The loop runs in a thread with ``loop.create_server`` making one actor per
connection (what a worker does with passed descriptors); the spool is real.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from router.dicom import dimse, uids
from router.dicom.dataset import read_part10_header
from router.dicom.negotiation import AcceptorPolicy
from router.net.client import connect
from tests.helpers.data import make_ct, make_study
from tests.helpers.dcmtk import Dcmtk
from workers.actor import ActorSettings, AssociationActor
from workers.spool import GroupCommitter, Spool

CT = "1.2.840.10008.5.1.4.1.1.2"


class LoopServer:
    """An event loop in a thread serving AssociationActors on 127.0.0.1."""

    def __init__(self, spool_dir: Path, *, artim: float = 30.0,
                 policy: AcceptorPolicy | None = None, idle: float | None = 600.0) -> None:
        self.spool = Spool(spool_dir)
        self.committer = GroupCommitter(self.spool)
        self.settings = ActorSettings(policy=policy or AcceptorPolicy(), artim_timeout=artim,
                                      idle_timeout=idle)
        self.closed: list[AssociationActor] = []
        self.actors: list[AssociationActor] = []  # every one made, open or closed
        self.all_closed = threading.Condition()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        def factory() -> AssociationActor:
            actor = AssociationActor(self.settings, self.spool, self.committer,
                                     on_closed=self._closed)
            self.actors.append(actor)
            return actor

        self.server = self.loop.run_until_complete(
            self.loop.create_server(factory, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    def _closed(self, actor: AssociationActor) -> None:
        with self.all_closed:
            self.closed.append(actor)
            self.all_closed.notify_all()

    def wait_closed(self, count: int, timeout: float = 10) -> list[AssociationActor]:
        with self.all_closed:
            assert self.all_closed.wait_for(lambda: len(self.closed) >= count, timeout)
            return list(self.closed)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.committer.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LoopServer]:
    srv = LoopServer(tmp_path / "spool")
    yield srv
    srv.stop()


def _dataset_bytes(path: Path) -> bytes:
    return path.read_bytes()[read_part10_header(path).dataset_offset:]


@pytest.mark.interop
def test_storescu_instances_land_in_the_spool_byte_for_byte(
    server: LoopServer, dcmtk: Dcmtk, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "study", n_series=2, n_instances=5, size_kb=64)
    done = dcmtk.run("storescu", "-aet", "MODALITY", "-aec", "ROUTER", "127.0.0.1",
                     str(server.port), *map(str, files), timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    actor = server.wait_closed(1)[0]
    assert actor.stats.instances == len(files) and actor.stats.failed == 0
    assert actor.stats.outcome == "released"
    spooled = sorted(server.spool.incoming.iterdir())
    assert len(spooled) == len(files)
    sent = {_dataset_bytes(f) for f in files}
    for path in spooled:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.SourceApplicationEntityTitle == "MODALITY"
        assert _dataset_bytes(path) in sent
    assert not list(server.spool.tmp.iterdir())


@pytest.mark.interop
def test_echoscu(server: LoopServer, dcmtk: Dcmtk) -> None:
    done = dcmtk.run("echoscu", "127.0.0.1", str(server.port), timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert server.wait_closed(1)[0].stats.outcome == "released"


def test_large_instance_streams_with_bounded_memory(server: LoopServer, tmp_path: Path) -> None:
    """A 40 MB instance goes through in PDU-sized pieces (the actor never holds
    the data set) and is stored intact."""
    path = tmp_path / "big.dcm"
    make_ct(path, size_kb=40_000)
    with connect("127.0.0.1", server.port, called_ae="ROUTER", max_pdu=16384,
                 contexts=[(CT, [uids.EXPLICIT_VR_LITTLE_ENDIAN])]) as assoc:
        assert assoc.store(path).status == 0
    actor = server.wait_closed(1)[0]
    (stored,) = server.spool.incoming.iterdir()
    assert _dataset_bytes(stored) == _dataset_bytes(path)
    assert actor.stats.bytes_stored == len(_dataset_bytes(path))


def test_peer_gone_mid_instance_leaves_nothing(server: LoopServer, tmp_path: Path) -> None:
    """Nothing acknowledged, nothing kept: an instance cut off mid-way is removed."""
    path = tmp_path / "big.dcm"
    make_ct(path, size_kb=4_000)
    assoc = connect("127.0.0.1", server.port, called_ae="ROUTER",
                    contexts=[(CT, [uids.EXPLICIT_VR_LITTLE_ENDIAN])])
    ctx = assoc.context_for(CT)
    header = read_part10_header(path)
    raw = path.read_bytes()[header.dataset_offset:]
    conn = assoc._conn
    conn.assoc.send_message(ctx.context_id, dimse.CStoreRQ(
        message_id=1, affected_sop_class_uid=header.sop_class_uid,
        affected_sop_instance_uid=header.sop_instance_uid))
    conn.assoc.send_data(ctx.context_id, raw[:len(raw) // 2], last=False)
    conn.flush()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    actor = server.wait_closed(1)[0]
    assert actor.stats.instances == 0
    assert not list(server.spool.incoming.iterdir())
    assert not list(server.spool.tmp.iterdir())


@pytest.fixture
def library_filter(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[..., None]]:
    """Install a LibraryLogFilter on caplog's handler, removed after the test: pytest
    keeps one capture handler for the session, and a filter left on it would prefix
    (or drop) the next test's records too."""
    from workers.logcontext import LibraryLogFilter

    added: list[LibraryLogFilter] = []

    def install(**kwargs: Any) -> None:
        added.append(LibraryLogFilter(**kwargs))
        caplog.handler.addFilter(added[-1])

    yield install
    for one in added:
        caplog.handler.removeFilter(one)


def test_library_log_lines_name_the_association_being_handled(
        caplog: pytest.LogCaptureFixture, library_filter: Callable[..., None]) -> None:
    """pydicom warning about a query's character set, say: the operator must know which
    association sent it (the actor's own lines name it already)."""
    import logging

    from workers.logcontext import serving

    library_filter()
    with caplog.at_level(logging.INFO):
        logging.getLogger("pydicom").warning("Unknown encoding '%s'", "GARBAGE")
        token = serving.set(lambda: "association w1-a7 VIEWER->ROUTER 10.0.0.9:4242")
        try:
            logging.getLogger("pydicom").warning("Unknown encoding '%s'", "GARBAGE")
            logging.getLogger("workers.qr").info("C-FIND %s: 0 match(es)", "x")
            logging.getLogger("py.warnings").warning(
                "%s", "/x/pydicom/charset.py:738: UserWarning: Unknown encoding 'G'\n"
                "  _warn_about_invalid_encoding(encoding)\n")
        finally:
            serving.reset(token)
    assert [r.getMessage() for r in caplog.records] == [
        "Unknown encoding 'GARBAGE'",
        "association w1-a7 VIEWER->ROUTER 10.0.0.9:4242: Unknown encoding 'GARBAGE'",
        "C-FIND x: 0 match(es)",
        "association w1-a7 VIEWER->ROUTER 10.0.0.9:4242: UserWarning: Unknown encoding 'G'"]


def test_a_library_line_repeated_for_one_association_is_said_once_a_minute(
        caplog: pytest.LogCaptureFixture, library_filter: Callable[..., None]) -> None:
    """A bad Specific Character Set under a rule reading eight attributes: pydicom
    warns once per value, twelve lines for one instance. The same line for the same
    association is said once within REPEAT_WINDOW; another association, or a minute
    later, says it again; our own lines are never dropped."""
    import logging

    from workers.logcontext import REPEAT_WINDOW, serving

    now = [100.0]
    library_filter(clock=lambda: now[0])
    pydicom_log, ours = logging.getLogger("pydicom"), logging.getLogger("workers.actor")
    with caplog.at_level(logging.INFO):
        for who in ("association w1-a1", "association w1-a2", "association w1-a1"):
            token = serving.set(lambda who=who: who)
            try:
                for _ in range(8):
                    pydicom_log.warning("Failed to decode byte string with encoding 'x'")
                    ours.info("C-STORE done")
            finally:
                serving.reset(token)
        now[0] += REPEAT_WINDOW
        token = serving.set(lambda: "association w1-a1")
        try:
            pydicom_log.warning("Failed to decode byte string with encoding 'x'")
        finally:
            serving.reset(token)
    said = [r.getMessage() for r in caplog.records]
    warned = [line for line in said if "Failed" in line]
    assert warned == [f"association w1-a{n}: Failed to decode byte string with encoding 'x'"
                      for n in (1, 2, 1)], said
    assert said.count("C-STORE done") == 24


def test_a_warning_with_a_newline_in_its_value_is_one_line_said_once(
        caplog: pytest.LogCaptureFixture, library_filter: Callable[..., None]) -> None:
    """A Specific Character Set of 'ISO_IR 999\\nX': pydicom logged it, then the
    captured warning repeated it cut at the newline ("Unknown encoding 'ISO_IR 999"),
    which the dedupe did not recognise: two lines, one of them wrong."""
    import logging
    import warnings

    library_filter()
    logging.captureWarnings(True)
    try:
        with caplog.at_level(logging.INFO), warnings.catch_warnings():
            warnings.simplefilter("always")
            text = "Unknown encoding 'ISO_IR 999\nX' - using default encoding instead"
            logging.getLogger("pydicom").warning(text)
            warnings.warn(text, UserWarning, stacklevel=1)
            warnings.warn("another\nwarning", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    assert [r.getMessage() for r in caplog.records] == [
        "Unknown encoding 'ISO_IR 999\nX' - using default encoding instead",
        "UserWarning: another\nwarning"]


def test_a_warning_pydicom_has_logged_is_not_logged_twice(
        caplog: pytest.LogCaptureFixture, library_filter: Callable[..., None]) -> None:
    """pydicom's warn_and_log logs a warning and warns it too; with warnings captured
    into the log (as workers do) that was the same line twice."""
    import logging
    import warnings

    from pydicom.valuerep import validate_value

    library_filter()
    logging.captureWarnings(True)
    try:
        with caplog.at_level(logging.INFO), warnings.catch_warnings():
            warnings.simplefilter("always")
            validate_value("UI", "1.2.03", validation_mode=1)  # pydicom's WARN mode
            warnings.warn("a warning nobody logged", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith("Invalid value for VR UI: '1.2.03'")
    assert said[1:] == ["UserWarning: a warning nobody logged"], said
