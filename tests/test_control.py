"""router.control: the control-plane messages, and the sockets between real processes.

Message tests are pure: every kind round-trips, and the decoder turns away wrong
versions, unknown kinds, wrong field types and oversized or malformed bodies with a
one-line ControlError. Process tests run the supervisor's side here (this process makes
its own zmq.Context) and workers as subprocesses that make theirs: a hello/heartbeat
exchange plus broadcasts, an actor round trip from worker 1 to worker 2 and back, and
``admin_request`` from a separate process. Every wait is a zmq poll with a timeout;
subprocesses are the ``procs`` fixture's, stopped at teardown, and give up on their own
after a deadline.

This module is also the subprocess: ``python -m tests.test_control worker|admin ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from router.control import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    ActorAddress,
    ActorMessage,
    AssociationClosed,
    AssociationOpened,
    Command,
    ControlError,
    Drain,
    EndpointError,
    Endpoints,
    Heartbeat,
    Hello,
    InstanceFailed,
    InstanceStored,
    Message,
    Reload,
    Reply,
    Rescan,
    Stop,
    SupervisorSockets,
    SupervisorUnavailable,
    WorkerGone,
    WorkerReady,
    WorkerSockets,
    admin_request,
    answer_admin,
    bind_supervisor,
    connect_worker,
    from_wire,
    recv_message,
    recv_routed,
    route,
    send_message,
    subscription_notice,
    worker_identity,
)
from tests.helpers import Proc, Procs

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 5.0
# A subprocess that sees nothing for this long exits by itself (code 3).
CHILD_DEADLINE = 8.0

SAMPLES: list[Message] = [
    Hello(worker_id=0, pid=1234, generation=3),
    Heartbeat(worker_id=2, open_associations=5, spool_bytes=1 << 40, rss=50_000_000,
              cpu_percent=12.5, served_total=99),
    AssociationOpened(worker_id=1, association_id="w1-a7", peer=("10.0.0.8", 40112),
                      calling_ae="CT1", called_ae="DICOM-ROUTER"),
    AssociationClosed(worker_id=1, association_id="w1-a7", peer=("::1", 1), calling_ae="CT1",
                      called_ae="DICOM-ROUTER", outcome="aborted: A-ABORT from peer",
                      seconds=1.25, instances=10, failed=1, bytes=5_000_000),
    InstanceStored(worker_id=1, association_id="w1-a7", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                   sop_instance_uid="1.2.3.4", bytes=524_288, status=0),
    InstanceFailed(worker_id=1, association_id="w1-a7", sop_class_uid="1.2",
                   sop_instance_uid="1.2.3.5", bytes=0, status=0xA700),
    Reload(generation=8, snapshot="/var/lib/dicom-router/spool/run/config-8.msgpack"),
    Rescan(),
    WorkerGone(worker_id=2),
    WorkerReady(worker_id=2),
    Drain(grace=30.0),
    Stop(),
    ActorMessage(to_worker=2, to_actor="move:17", from_worker=1, from_actor="assoc:w1-a7",
                 kind="sub-operation", body={"uid": "1.2.3", "n": [1, 2.5, None, True],
                                             "raw": b"\x00\xff", "nested": {"a": {"b": []}}}),
    Command(name="status"),
    Command(name="reload", args={"config": "/etc/x.toml"}),
    Reply.success({"workers": [{"id": 0, "rss": 1}], "generation": 8}),
    Reply.failure("unknown command 'bogus'"),
]


# ---------------------------------------------------------------- messages


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    frames = message.to_wire()
    assert frames[0] == message.KIND.encode()
    assert msgpack.unpackb(frames[1])["v"] == PROTOCOL_VERSION
    decoded = from_wire(frames)
    assert decoded == message
    assert type(decoded).from_wire(frames) == message


def test_every_kind_has_a_sample() -> None:
    # (slots=True replaces each class: skip the unregistered originals)
    kinds = {cls.KIND for cls in Message.__subclasses__() if "KIND" in vars(cls)}
    assert kinds == {m.KIND for m in SAMPLES}


def test_floats_and_addresses_normalised() -> None:
    beat = Heartbeat(worker_id=0, open_associations=0, spool_bytes=0, rss=0, cpu_percent=3,
                     served_total=0)
    assert type(beat.cpu_percent) is float
    opened = AssociationOpened(worker_id=0, association_id="a", peer=["h", 1],  # type: ignore[arg-type]
                               calling_ae="", called_ae="")
    assert opened.peer == ("h", 1)


def _body(fields: object) -> bytes:
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


_HELLO = {"v": PROTOCOL_VERSION, "worker_id": 1, "pid": 2, "generation": 3}


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"hello", _body({**_HELLO, "v": 2})], "protocol version 2"),
        ([b"hello", _body({**_HELLO, "v": True})], "protocol version True"),
        ([b"hello", _body({k: v for k, v in _HELLO.items() if k != "v"})], "version None"),
        ([b"bogus", _body(_HELLO)], "unknown message kind"),
        ([b"x" * 100, _body(_HELLO)], "kind is 100 bytes"),
        ([b"hello"], "expected 2 frames"),
        ([b"hello", _body(_HELLO), b""], "expected 2 frames"),
        ([b"hello", _body({**_HELLO, "worker_id": "1"})], "hello.worker_id: expected an int"),
        ([b"hello", _body({**_HELLO, "worker_id": True})], "hello.worker_id"),
        ([b"hello", _body({**_HELLO, "pid": -1})], "hello.pid"),
        ([b"hello", _body({**_HELLO, "generation": 1.0})], "hello.generation"),
        ([b"hello", _body({**_HELLO, "generation": -(1 << 63)})], "hello.generation"),
        ([b"hello", _body({k: v for k, v in _HELLO.items() if k != "pid"})], "missing pid"),
        ([b"hello", _body({**_HELLO, "extra": 0})], "unknown extra"),
        ([b"drain", _body({"v": 1, "grace": "30"})], "drain.grace"),
        ([b"drain", _body({"v": 1, "grace": float("inf")})], "drain.grace"),
        ([b"drain", _body({"v": 1, "grace": -1.0})], "drain.grace"),
        ([b"reply", _body({"v": 1, "ok": 1, "result": {}, "error": None})], "reply.ok"),
        ([b"reply", _body({"v": 1, "ok": False, "result": {}, "error": None})], "reason"),
        ([b"reply", _body({"v": 1, "ok": True, "result": [], "error": None})], "reply.result"),
        ([b"command", _body({"v": 1, "name": "", "args": {}})], "command.name"),
        ([b"command", _body({"v": 1, "name": "x", "args": {"a": {1: 2}}})], "not valid msgpack"),
        ([b"association.opened", _body({"v": 1, "worker_id": 0, "association_id": "a",
                                        "peer": ["h"], "calling_ae": "", "called_ae": ""})],
         "peer: expected \\(host, port\\)"),
        ([b"hello", b"\xc1"], "not valid msgpack"),
        ([b"hello", _body(_HELLO) + b"\x00"], "not valid msgpack"),
        ([b"hello", b""], "not valid msgpack"),
        ([b"hello", _body([1, 2])], "body is a list"),
        ([b"hello", msgpack.packb(msgpack.ExtType(1, b"x"))], "not valid msgpack"),
        ([b"hello", b"\x91" * 2000 + b"\xc0"], "not valid msgpack"),  # nested 2000 deep
        ([b"hello", b"\xdd\xff\xff\xff\xff"], "not valid msgpack"),  # claims 4G items
        ([b"hello", b"\x00" * (MAX_MESSAGE_BYTES + 1)], "more than"),
    ],
)
def test_rejected(frames: list[bytes], reason: str) -> None:
    with pytest.raises(ControlError, match=reason) as info:
        from_wire(frames)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: ActorMessage(to_worker=1, to_actor="a", from_worker=0, from_actor="b",
                              kind="k", body={"s": {1, 2}}), "set cannot travel"),
        (lambda: ActorMessage(to_worker=1, to_actor="a", from_worker=0, from_actor="b",
                              kind="k", body={"b": bytearray(b"x")}), "bytearray"),
        (lambda: ActorMessage(to_worker=1, to_actor="a", from_worker=0, from_actor="b",
                              kind="k", body={1: 1}), "map key 1"),  # type: ignore[dict-item]
        (lambda: Command(name="x", args={"deep": _nested(40)}), "nested more than"),
        (lambda: Reply(ok=True, error="x"), "ok but with an error"),
        (lambda: Reload(generation=1, snapshot=None),  # type: ignore[arg-type]
         "reload.snapshot"),
        (lambda: ActorAddress(worker_id=-1, actor_id="a"), "worker_id"),
    ],
)
def test_invalid_messages_cannot_be_built(build: Callable[[], object], reason: str) -> None:
    with pytest.raises(ControlError, match=reason):
        build()


def _nested(depth: int) -> object:
    value: object = []
    for _ in range(depth):
        value = [value]
    return value


def test_oversized_message_cannot_be_sent() -> None:
    big = Command(name="x", args={"blob": b"\x00" * MAX_MESSAGE_BYTES})
    with pytest.raises(ControlError, match="more than"):
        big.to_wire()


def test_from_wire_on_a_kind_checks_the_kind() -> None:
    with pytest.raises(ControlError, match="expected Reply, got Hello"):
        Reply.from_wire(SAMPLES[0].to_wire())


def test_error_text_is_one_line() -> None:
    assert str(ControlError("a\nb\r\n c")) == "a b c"
    assert Reply.failure("line 1\nline 2").error == "line 1 line 2"


# ---------------------------------------------------------------- actors, endpoints


def test_route_and_reply() -> None:
    mover = ActorAddress(worker_id=1, actor_id="move:3")
    store = ActorAddress(worker_id=2, actor_id="assoc:w2-a9")
    message = ActorMessage.between(mover, store, "expect", {"uid": "1.2"})
    assert message.sender == mover and message.recipient == store
    assert route(message, local_worker_id=1) == "remote"
    assert route(message, local_worker_id=2) == "local"
    answer = message.reply("arrived", {"n": 1})
    assert (answer.sender, answer.recipient, answer.kind) == (store, mover, "arrived")
    assert route(answer, local_worker_id=1) == "local"


def test_endpoints_layout(tmp_path: Path) -> None:
    endpoints = Endpoints.for_run_dir(tmp_path)
    assert endpoints.control == f"ipc://{tmp_path}/ctl.sock"
    assert endpoints.broadcast == f"ipc://{tmp_path}/bcast.sock"
    assert endpoints.admin == f"ipc://{tmp_path}/admin.sock"
    assert endpoints.actor(3) == f"ipc://{tmp_path}/w3.sock"
    elsewhere = Endpoints.for_run_dir(tmp_path, admin_path=tmp_path / "a" / "adm.sock")
    assert elsewhere.admin == f"ipc://{tmp_path}/a/adm.sock"
    with pytest.raises(EndpointError, match="worker id"):
        endpoints.actor(10_000)
    assert worker_identity(3) == b"w3"


def test_ipc_path_too_long(tmp_path: Path) -> None:
    run_dir = tmp_path / ("x" * 120)
    with pytest.raises(EndpointError, match="more than the 107") as info:
        Endpoints.for_run_dir(run_dir)
    assert "\n" not in str(info.value)
    with zmq.Context() as ctx, pytest.raises(EndpointError):
        bind_supervisor(ctx, run_dir)
    assert not run_dir.exists(), "checked before anything is created"


def test_subscription_notice() -> None:
    assert subscription_notice(b"\x01") is True
    assert subscription_notice(b"\x00topic") is False
    with pytest.raises(ControlError):
        subscription_notice(b"hello")


# ---------------------------------------------------------------- processes


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    """This process's own context (the supervisor's side of each test)."""
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def supervisor(ctx: zmq.Context[Any], tmp_path: Path) -> Iterator[SupervisorSockets]:
    sockets = bind_supervisor(ctx, tmp_path / "run")
    yield sockets
    sockets.close()


def _start(procs: Procs, *args: object) -> Proc:
    return procs.start([sys.executable, "-m", "tests.test_control", *map(str, args)], cwd=ROOT)


def _wait(sock: zmq.Socket[Any], timeout: float = TIMEOUT) -> None:
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    assert poller.poll(round(timeout * 1000)), f"nothing on {sock} within {timeout} s"


def _next_routed(sup: SupervisorSockets) -> tuple[bytes, Message]:
    _wait(sup.control)
    return recv_routed(sup.control, flags=zmq.NOBLOCK)


def _await_subscribers(sup: SupervisorSockets, n: int) -> None:
    for _ in range(n):
        _wait(sup.broadcast)
        assert subscription_notice(sup.broadcast.recv(zmq.NOBLOCK)) is True


def _exit_code(proc: Proc) -> int:
    code = proc.wait(TIMEOUT)
    assert code == 0, proc.log()
    return code


def test_hello_heartbeat_and_broadcasts(supervisor: SupervisorSockets, procs: Procs) -> None:
    proc = _start(procs, "worker", supervisor.endpoints.run_dir, 1)

    identity, hello = _next_routed(supervisor)
    assert identity == worker_identity(1)
    assert hello == Hello(worker_id=1, pid=proc.pid, generation=0)
    # The welcome goes directly to the worker: it does not depend on PUB/SUB timing.
    send_message(supervisor.control, Reply.success({"generation": 7}), identity=identity)

    identity, beat = _next_routed(supervisor)
    assert isinstance(beat, Heartbeat) and beat.worker_id == 1
    assert beat.rss > 0 and beat.served_total == 7

    _await_subscribers(supervisor, 1)  # from here on, the worker hears every broadcast
    send_message(supervisor.broadcast, Reload(generation=8, snapshot="/run/config-8.msgpack"))
    identity, ack = _next_routed(supervisor)
    assert ack == Reply.success({"generation": 8, "snapshot": "/run/config-8.msgpack"})

    send_message(supervisor.broadcast, Stop())
    _exit_code(proc)


def test_actor_round_trip_between_workers(supervisor: SupervisorSockets, procs: Procs) -> None:
    workers = {1: _start(procs, "worker", supervisor.endpoints.run_dir, 1),
               2: _start(procs, "worker", supervisor.endpoints.run_dir, 2)}
    # Both say hello (in any order) and get their welcome; both heartbeat.
    seen: dict[type[Message], set[int]] = {Hello: set(), Heartbeat: set()}
    while seen[Heartbeat] != {1, 2}:
        identity, message = _next_routed(supervisor)
        assert isinstance(message, Hello | Heartbeat), message
        seen[type(message)].add(message.worker_id)
        if isinstance(message, Hello):
            assert message.pid == workers[message.worker_id].pid
            send_message(supervisor.control, Reply.success({"generation": 1}),
                         identity=identity)
    _await_subscribers(supervisor, 2)

    # Worker 1's actor "pinger" sends to worker 2's actor "echo", which answers.
    send_message(supervisor.control, Command(name="ping", args={"worker": 2, "text": "hi"}),
                 identity=worker_identity(1))
    identity, result = _next_routed(supervisor)
    assert identity == worker_identity(1)
    assert result == Reply.success({
        "route": "remote",
        "pong": {"text": "hi", "pid": workers[2].pid, "route": "local"},
        "from": [2, "echo"],
    })

    send_message(supervisor.broadcast, Stop())
    for proc in workers.values():
        _exit_code(proc)


def test_admin_request_from_another_process(
    supervisor: SupervisorSockets, procs: Procs
) -> None:
    proc = _start(procs, "admin", supervisor.endpoints.admin, "status", "bogus", "crash")

    def handler(command: Command) -> Reply:
        if command.name == "status":
            return Reply.success({"workers": 2, "args": command.args})
        if command.name == "crash":
            raise RuntimeError("handler bug")
        return Reply.failure(f"unknown command {command.name!r}")

    for _ in range(3):
        _wait(supervisor.admin)
        answer_admin(supervisor.admin, handler)
    _exit_code(proc)
    lines = [json.loads(line) for line in proc.stdout_path.read_text().splitlines()]
    assert lines == [
        {"ok": True, "result": {"workers": 2, "args": {"from": "test"}}, "error": None},
        {"ok": False, "result": {}, "error": "unknown command 'bogus'"},
        {"ok": False, "result": {}, "error": "crash: internal error: RuntimeError"},
    ]


def test_admin_bad_request_gets_an_error_reply(
    ctx: zmq.Context[Any], supervisor: SupervisorSockets
) -> None:
    client = ctx.socket(zmq.DEALER)
    client.connect(supervisor.endpoints.admin)
    for frames in ([b"status", b"\xc1"], Hello(worker_id=0, pid=1, generation=0).to_wire()):
        client.send_multipart(frames)
        _wait(supervisor.admin)
        answer_admin(supervisor.admin, lambda command: Reply.success())
        _wait(client)
        reply = recv_message(client, flags=zmq.NOBLOCK)
        assert isinstance(reply, Reply) and not reply.ok
        assert reply.error is not None and reply.error.startswith("bad request: ")
    client.close()


def test_admin_request_no_socket_file(ctx: zmq.Context[Any], tmp_path: Path) -> None:
    endpoint = Endpoints.for_run_dir(tmp_path).admin
    started = time.monotonic()
    with pytest.raises(SupervisorUnavailable, match="does not exist"):
        admin_request(ctx, endpoint, Command(name="status"), timeout=TIMEOUT)
    assert time.monotonic() - started < 1.0, "no waiting when there is no socket at all"


def test_admin_request_stale_socket_is_said_at_once(ctx: zmq.Context[Any],
                                                    tmp_path: Path) -> None:
    """The socket file a killed router left: status and reload waited out their whole
    timeout (5 s) for a listener that is not there (an outside campaign). The refused
    connection says it at once: a timeout of 60 s here would be waited out else."""
    endpoint = Endpoints.for_run_dir(tmp_path).admin
    with socket.socket(socket.AF_UNIX) as dead:  # a socket file nobody listens on
        dead.bind(str(tmp_path / "admin.sock"))
    with pytest.raises(SupervisorUnavailable, match="nothing listens on the socket"):
        admin_request(ctx, endpoint, Command(name="status"), timeout=60)


def test_admin_request_a_listener_that_never_accepts_times_out(
        ctx: zmq.Context[Any], tmp_path: Path) -> None:
    """Listening but never taking the connection (a full backlog): the timeout."""
    endpoint = Endpoints.for_run_dir(tmp_path).admin
    with socket.socket(socket.AF_UNIX) as stuck:
        stuck.bind(str(tmp_path / "admin.sock"))
        stuck.listen(0)
        started = time.monotonic()
        with pytest.raises(SupervisorUnavailable, match=r"accepted a connection|did not answer"):
            admin_request(ctx, endpoint, Command(name="status"), timeout=0.3)
        assert 0.25 < time.monotonic() - started < 2.0


def test_admin_request_unanswered_times_out(
    ctx: zmq.Context[Any], supervisor: SupervisorSockets
) -> None:
    started = time.monotonic()
    with pytest.raises(SupervisorUnavailable, match="did not answer 'status'"):
        admin_request(ctx, supervisor.endpoints.admin, Command(name="status"), timeout=0.3)
    assert 0.25 < time.monotonic() - started < 2.0


# ---------------------------------------------------------------- the subprocesses


def _worker(run_dir: str, worker_id: int) -> int:
    """A stand-in worker: hello, heartbeat on welcome, answers broadcasts, and runs
    two actors: "pinger" (started by a ``ping`` command) and "echo"."""
    import psutil

    ctx: zmq.Context[Any] = zmq.Context()
    sockets = connect_worker(ctx, Endpoints.for_run_dir(run_dir), worker_id)
    try:
        return _worker_loop(sockets, psutil.Process())
    finally:
        sockets.close()
        ctx.term()


def _worker_loop(ws: WorkerSockets, me: Any) -> int:
    ws.send(Hello(worker_id=ws.worker_id, pid=os.getpid(), generation=0))
    poller = zmq.Poller()
    for sock in (ws.control, ws.broadcast, ws.inbox):
        poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + CHILD_DEADLINE
    pinger = ActorAddress(worker_id=ws.worker_id, actor_id="pinger")
    sent_route = ""
    while (remaining := deadline - time.monotonic()) > 0:
        ready = dict(poller.poll(round(remaining * 1000)))
        if ws.control in ready:
            message = recv_message(ws.control)
            if isinstance(message, Reply):  # the welcome
                ws.send(Heartbeat(worker_id=ws.worker_id, open_associations=0, spool_bytes=0,
                                  rss=me.memory_info().rss, cpu_percent=me.cpu_percent(),
                                  served_total=int(message.result["generation"])))  # type: ignore[call-overload]
            elif isinstance(message, Command) and message.name == "ping":
                echo = ActorAddress(worker_id=int(message.args["worker"]), actor_id="echo")  # type: ignore[call-overload]
                ping = ActorMessage.between(pinger, echo, "ping", {"text": message.args["text"]})
                sent_route = route(ping, ws.worker_id)
                ws.send_actor(ping)
        if ws.inbox in ready:
            actor_message = recv_message(ws.inbox)
            assert isinstance(actor_message, ActorMessage)
            where = route(actor_message, ws.worker_id)
            if actor_message.kind == "ping" and actor_message.to_actor == "echo":
                ws.send_actor(actor_message.reply(
                    "pong", {**actor_message.body, "pid": os.getpid(), "route": where}))
            elif actor_message.kind == "pong" and actor_message.to_actor == "pinger":
                ws.send(Reply.success({"route": sent_route, "pong": actor_message.body,
                                       "from": [actor_message.from_worker,
                                                actor_message.from_actor]}))
        if ws.broadcast in ready:
            broadcast = recv_message(ws.broadcast)
            if isinstance(broadcast, Reload):
                ws.send(Reply.success({"generation": broadcast.generation,
                                       "snapshot": broadcast.snapshot}))
            elif isinstance(broadcast, Stop):
                return 0
    return 3


def _admin(endpoint: str, names: list[str]) -> int:
    """Run admin commands as ``dicom-router status`` will; print each reply as JSON."""
    with zmq.Context() as ctx:
        for name in names:
            reply = admin_request(ctx, endpoint, Command(name=name, args={"from": "test"}),
                                  timeout=TIMEOUT)
            print(json.dumps({"ok": reply.ok, "result": reply.result, "error": reply.error}),
                  flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.test_control")
    modes = parser.add_subparsers(dest="mode", required=True)
    worker_args = modes.add_parser("worker")
    worker_args.add_argument("run_dir")
    worker_args.add_argument("worker_id", type=int)
    admin_args = modes.add_parser("admin")
    admin_args.add_argument("endpoint")
    admin_args.add_argument("names", nargs="+")
    args = parser.parse_args()
    if args.mode == "worker":
        sys.exit(_worker(args.run_dir, args.worker_id))
    sys.exit(_admin(args.endpoint, args.names))
