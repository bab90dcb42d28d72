"""router.supervisor's choice of a worker for a connection, without processes.

Two worker slots get real AF_UNIX channels (router.fdpass.channel_pair) and real
loopback connections are handed over them; the heartbeats are the control messages a
worker sends, given to the supervisor as its control loop does. The end-to-end
balance with real workers and DCMTK peers is in tests/runtime/test_router.py.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from router import control
from router.fdpass import channel_pair, recv_connection
from router.snapshot import Snapshot
from router.supervisor import Supervisor


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[Supervisor, list[socket.socket]]]:
    snapshot, config, _ = Snapshot.read(None, overrides={"workers": 2,
                                                         "spool": str(tmp_path)})
    sup = Supervisor(config, config_path=None, overrides={}, snapshot=snapshot)
    worker_ends = []
    for slot in sup.slots:
        slot.channel, worker_end = channel_pair()
        slot.ready = True
        worker_ends.append(worker_end)
    yield sup, worker_ends
    for slot in sup.slots:
        assert slot.channel is not None
        slot.channel.close()
    for end in worker_ends:
        end.close()


def heartbeat(worker_id: int, *, open_associations: int, handoffs_taken: int) -> control.Heartbeat:
    return control.Heartbeat(worker_id=worker_id, open_associations=open_associations,
                             spool_bytes=0, rss=0, cpu_percent=0.0, served_total=handoffs_taken,
                             handoffs_taken=handoffs_taken)


def hand_off(sup: Supervisor, worker_ends: list[socket.socket]) -> int:
    """Hand one fresh loopback connection off; return the worker (1 or 2) that got it."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname()[:2])
        conn, peer = server.accept()
        with client:
            assert sup._try_hand_off(conn, peer, 11112)
    got = []
    for worker_id, end in enumerate(worker_ends, start=1):
        end.setblocking(False)
        try:
            received = recv_connection(end)
        except BlockingIOError:
            continue
        assert received is not None
        received[0].close()
        got.append(worker_id)
    assert len(got) == 1, got
    return got[0]


def test_connections_alternate_between_idle_workers(
        supervisor: tuple[Supervisor, list[socket.socket]]) -> None:
    sup, ends = supervisor
    assert [hand_off(sup, ends) for _ in range(4)] == [1, 2, 1, 2]


def test_a_heartbeat_sent_before_a_hand_off_was_read_keeps_it_counted(
        supervisor: tuple[Supervisor, list[socket.socket]]) -> None:
    """Worker 1 gets a connection; its next heartbeat left before it read the channel
    (open 0, nothing taken). The connection is still worker 1's load, so the next one
    goes to worker 2. Before, a heartbeat reset the count of hand-offs, worker 1
    looked idle, and both connections went to it."""
    sup, ends = supervisor
    assert hand_off(sup, ends) == 1
    sup._heartbeat(sup.slots[0], heartbeat(1, open_associations=0, handoffs_taken=0))
    assert hand_off(sup, ends) == 2


def test_a_connection_read_and_closed_is_no_longer_load(
        supervisor: tuple[Supervisor, list[socket.socket]]) -> None:
    """Worker 1 took its two connections and both closed; worker 2 still holds its one
    open. The next connection goes to worker 1."""
    sup, ends = supervisor
    assert [hand_off(sup, ends) for _ in range(3)] == [1, 2, 1]
    sup._heartbeat(sup.slots[0], heartbeat(1, open_associations=0, handoffs_taken=2))
    sup._heartbeat(sup.slots[1], heartbeat(2, open_associations=1, handoffs_taken=1))
    assert hand_off(sup, ends) == 1


def test_a_replacement_worker_starts_from_nothing(
        supervisor: tuple[Supervisor, list[socket.socket]]) -> None:
    """A heartbeat that a dead worker left in the queue (it had taken more hand-offs
    than the replacement was given) does not make the replacement's load negative."""
    sup, ends = supervisor
    sup._heartbeat(sup.slots[0], heartbeat(1, open_associations=0, handoffs_taken=7))
    assert sup.slots[0].load == 0
    assert [hand_off(sup, ends) for _ in range(2)] == [1, 2]
