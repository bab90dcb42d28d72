"""The control plane between the router's processes (DESIGN.md D2, D3).

Theory of operation
-------------------
Everything between processes except the hand-off of connections
(:mod:`router.fdpass`) is a ZeroMQ message made of two frames::

    kind     ASCII name, e.g. b"heartbeat"; on PUB/SUB it is also the topic
    body     msgpack map: {"v": PROTOCOL_VERSION, <field>: <value>, ...}

A ROUTER socket sees one more frame in front, the sender's identity. Each kind
is a frozen dataclass below, validated when built (so a message that exists is
well-formed) and again, identically, when decoded: :func:`from_wire` rejects
a wrong frame count, an oversized body, bad msgpack, a wrong version, an unknown
kind, missing or unknown fields and wrong field types with a one-line
:class:`ControlError`. The body must carry exactly the fields of its kind; a
change of fields is a change of :data:`PROTOCOL_VERSION` (all processes of a
router run the same code, so there is no mixed-version peer to stay compatible
with). Unpacking is bounded (:data:`MAX_MESSAGE_BYTES` per body, limits on
string, array and map sizes, no extension types) and receiving sockets set
``ZMQ_MAXMSGSIZE``, so a hostile local client cannot make a process allocate
more than that.

Sockets, all ``ipc://`` under one run directory (:class:`Endpoints`)::

    supervisor                                     worker N
    ROUTER  ctl.sock    <- hello, heartbeat, events, replies --  DEALER (identity b"wN")
                        -> direct messages (reply to hello, commands)
    XPUB    bcast.sock  -> reload, drain, stop                -> SUB (all topics)
    ROUTER  admin.sock  <- Command / -> Reply  (dicom-router status|reload: a DEALER)
                                                   PULL  wN.sock  <- ActorMessage from
                                                                     peers' PUSH sockets

- Circus shape for commands: :class:`Command` ``(name, args)`` in,
  :class:`Reply` ``(ok, result | error)`` out, whatever the command;
  :func:`answer_admin` turns any failure (a bad request, a handler exception)
  into an error reply, so a client always gets an answer.
- Broadcasts are PUB/SUB, which drops what a subscriber is not yet subscribed
  for. The broadcast socket is an XPUB in verbose mode: each worker's
  subscription shows up on it as a frame ``b"\\x01"`` (see
  :func:`subscription_notice`), so the supervisor can know that N workers hear
  broadcasts. State a new worker needs (the current configuration generation)
  goes in the supervisor's direct answer to its :class:`Hello`, never only in a
  broadcast; the supervisor may also send any message to one worker directly
  (``send_message(ctl, msg, identity=worker_identity(n))``).
- Actors (D3): an actor's address is :class:`ActorAddress` ``(worker, actor)``.
  :func:`route` says whether an :class:`ActorMessage` is for this worker (a
  queue append in its event loop) or another one (:meth:`WorkerSockets.send_actor`,
  a PUSH to that worker's PULL socket, created on first use). A reply is just
  another ActorMessage addressed to the sender (:meth:`ActorMessage.reply`).
- No module-level ZeroMQ context: every helper takes the ``zmq.Context`` the
  calling process made after it started (STYLE.md §7). Nothing here sleeps;
  waiting is a ``zmq.Poller`` with a timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, Self, TypeVar, get_type_hints

import msgpack
import zmq

__all__ = [
    "BROADCAST_SOCKET",
    "CONTROL_SOCKET",
    "MAX_MESSAGE_BYTES",
    "MAX_WORKER_ID",
    "PROTOCOL_VERSION",
    "ActorAddress",
    "ActorMessage",
    "ActorUnreachable",
    "AssociationClosed",
    "AssociationOpened",
    "Command",
    "ControlError",
    "Drain",
    "EndpointError",
    "Endpoints",
    "Heartbeat",
    "Hello",
    "InstanceFailed",
    "InstanceStored",
    "Message",
    "Reload",
    "Reply",
    "Rescan",
    "Stop",
    "SupervisorSockets",
    "SupervisorUnavailable",
    "WorkerSockets",
    "admin_request",
    "answer_admin",
    "bind_supervisor",
    "connect_worker",
    "from_wire",
    "recv_message",
    "recv_routed",
    "route",
    "send_message",
    "subscription_notice",
    "worker_identity",
]

log = logging.getLogger("router.control")

PROTOCOL_VERSION: Final = 1
#: Largest message body accepted, and ``ZMQ_MAXMSGSIZE`` on receiving sockets.
MAX_MESSAGE_BYTES: Final = 1 << 20
#: Worker ids are 0..MAX_WORKER_ID (their inbox socket names must fit an ipc path).
MAX_WORKER_ID: Final = 9999
# Bounds for msgpack: strings/bins up to the body size, containers up to this many items.
_MAX_ITEMS: Final = 65_536
_MAX_DEPTH: Final = 32
_MAX_KIND_LEN: Final = 64
# sockaddr_un.sun_path: 108 bytes with the NUL on Linux.
_IPC_PATH_MAX: Final = 107
_INT64_MIN: Final = -(1 << 63)
_UINT64_MAX: Final = (1 << 64) - 1
# Let a stopping process flush its last messages (events, a Stop broadcast), not forever.
_FLUSH_LINGER_MS: Final = 1000


# ---------------------------------------------------------------- errors


class ControlError(Exception):
    """A control-plane failure; ``str()`` is one line, whatever it quotes."""

    def __init__(self, reason: str) -> None:
        super().__init__(" ".join(reason.split()))


class EndpointError(ControlError):
    """An endpoint cannot be used (e.g. its ipc path is longer than the kernel allows)."""


class SupervisorUnavailable(ControlError):
    """Nothing answered on the admin socket: no supervisor running, or it is stuck."""


class ActorUnreachable(ControlError):
    """A remote actor's worker is not taking messages (its queue is full)."""


# ---------------------------------------------------------------- field checks


class _Invalid(Exception):
    """A field value that does not validate: the message says what was expected."""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_int(value: object) -> object:
    if type(value) is not int or not 0 <= value <= _UINT64_MAX:
        raise _Invalid(f"expected an int >= 0, got {_short(value)}")
    return value


def _check_float(value: object) -> object:
    if (type(value) is int or type(value) is float) and math.isfinite(value) and value >= 0:
        return float(value)
    raise _Invalid(f"expected a finite number >= 0, got {_short(value)}")


def _check_str(value: object) -> object:
    if type(value) is not str:
        raise _Invalid(f"expected a str, got {_short(value)}")
    return value


def _check_name(value: object) -> object:
    if type(value) is not str or not value:
        raise _Invalid(f"expected a non-empty str, got {_short(value)}")
    return value


def _check_bool(value: object) -> object:
    if type(value) is not bool:
        raise _Invalid(f"expected a bool, got {_short(value)}")
    return value


def _check_optional_str(value: object) -> object:
    return value if value is None else _check_str(value)


def _check_address(value: object) -> object:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or type(value[0]) is not str
        or type(value[1]) is not int
        or not 0 <= value[1] <= 0xFFFF
    ):
        raise _Invalid(f"expected (host, port), got {_short(value)}")
    return (value[0], value[1])


def _check_map(value: object) -> object:
    if type(value) is not dict:
        raise _Invalid(f"expected a map, got {_short(value)}")
    _check_plain(value, 0)
    return value


def _check_plain(value: object, depth: int) -> None:
    """Only what msgpack round-trips unchanged: maps with str keys, lists, scalars."""
    if depth > _MAX_DEPTH:
        raise _Invalid(f"nested more than {_MAX_DEPTH} levels")
    if value is None or type(value) in (bool, str, bytes, float):
        return
    if type(value) is int:
        if not _INT64_MIN <= value <= _UINT64_MAX:
            raise _Invalid(f"int out of the 64-bit range: {_short(value)}")
        return
    if type(value) is list or type(value) is tuple:
        for item in value:
            _check_plain(item, depth + 1)
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise _Invalid(f"map key {_short(key)} is not a str")
            _check_plain(item, depth + 1)
        return
    raise _Invalid(f"{type(value).__name__} cannot travel in a message")


# Field annotation (as written in the dataclasses below) -> check. A name field
# (actor id, command name, kind) is the one str that may not be empty.
_CHECKS: Final[dict[object, Callable[[object], object]]] = {
    int: _check_int,
    float: _check_float,
    str: _check_str,
    bool: _check_bool,
    str | None: _check_optional_str,
    tuple[str, int]: _check_address,
    dict[str, object]: _check_map,
}
_NAME_FIELDS: Final = frozenset({"to_actor", "from_actor", "kind", "name", "actor_id"})


# ---------------------------------------------------------------- messages


_KINDS: dict[bytes, type[Message]] = {}


class Message:
    """Base of every control-plane message (the dataclasses below).

    ``KIND`` names the message on the wire; fields are checked when a message is
    built (:class:`ControlError` naming the field) and a message encodes to the
    two frames described in the module docstring.
    """

    __slots__ = ()
    KIND: ClassVar[str]
    _FIELDS: ClassVar[tuple[tuple[str, Callable[[object], object]], ...]]

    def __post_init__(self) -> None:
        for name, check in self._FIELDS:
            value = getattr(self, name)
            try:
                fixed = check(value)
            except _Invalid as exc:
                raise ControlError(f"{self.KIND}.{name}: {exc}") from None
            if fixed is not value:
                object.__setattr__(self, name, fixed)
        self._check()

    def _check(self) -> None:
        """Rules across fields, for the kinds that have them."""

    def to_wire(self) -> list[bytes]:
        """The message as ZeroMQ frames: ``[kind, msgpack body]``."""
        body: dict[str, Any] = {"v": PROTOCOL_VERSION}
        for name, _ in self._FIELDS:
            body[name] = getattr(self, name)
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        if len(packed) > MAX_MESSAGE_BYTES:
            raise ControlError(
                f"{self.KIND}: body is {len(packed)} bytes, more than {MAX_MESSAGE_BYTES}"
            )
        return [self.KIND.encode("ascii"), packed]

    @classmethod
    def from_wire(cls, frames: Sequence[bytes]) -> Self:
        """Decode ``frames`` (see :func:`from_wire`) and check that the message is a
        ``cls``: ``Reply.from_wire(frames)`` raises unless the frames are a Reply."""
        message = from_wire(frames)
        if not isinstance(message, cls):
            raise ControlError(f"expected {cls.__name__}, got {type(message).__name__}")
        return message


_M = TypeVar("_M", bound=Message)


def _message(kind: str) -> Callable[[type[_M]], type[_M]]:
    """Register a message dataclass under ``kind`` and derive its field checks."""

    def register(cls: type[_M]) -> type[_M]:
        hints = get_type_hints(cls)
        checks = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            check = _check_name if f.name in _NAME_FIELDS else _CHECKS[hints[f.name]]
            checks.append((f.name, check))
        cls._FIELDS = tuple(checks)
        cls.KIND = kind
        _KINDS[kind.encode("ascii")] = cls
        return cls

    return register


@_message("hello")
@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Message):
    """Worker -> supervisor, once connected: who it is and which configuration
    generation it runs. The supervisor answers with a :class:`Reply`."""

    worker_id: int
    pid: int
    generation: int


@_message("heartbeat")
@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Message):
    """Worker -> supervisor, every heartbeat interval: liveness and load."""

    worker_id: int
    open_associations: int
    spool_bytes: int
    rss: int  # bytes (psutil memory_info().rss)
    cpu_percent: float  # psutil cpu_percent(): may exceed 100 with several threads
    served_total: int  # associations served since the worker started
    # Connections read from the hand-off channel since the worker started: the
    # supervisor counts those it handed off and not yet taken as load (its view of
    # open_associations lags by up to a heartbeat).
    handoffs_taken: int = 0
    # Instances since the worker started: counted here rather than sent one event
    # each, which cost the supervisor ~200 us of CPU per instance at full rate.
    instances_stored: int = 0
    instances_failed: int = 0
    instances_forwarded: int = 0
    queued: int = 0  # instances its destination actors hold for delivery
    # Destinations failing since their last delivery here: name -> [last error, since,
    # last failure] (wall-clock seconds; workers/forward.py ForwardStats).
    failing: dict[str, object] = field(default_factory=dict)
    # Whose: a heartbeat a dead worker left unread must not count for its successor.
    pid: int = 0


@_message("association.opened")
@dataclass(frozen=True, slots=True, kw_only=True)
class AssociationOpened(Message):
    """Worker -> supervisor: an inbound association was accepted."""

    worker_id: int
    association_id: str
    peer: tuple[str, int]
    calling_ae: str
    called_ae: str


@_message("association.closed")
@dataclass(frozen=True, slots=True, kw_only=True)
class AssociationClosed(Message):
    """Worker -> supervisor: an association ended (released, aborted, rejected, lost)."""

    worker_id: int
    association_id: str
    peer: tuple[str, int]
    calling_ae: str
    called_ae: str
    outcome: str  # "released", "aborted: <detail>", "rejected (...)", "connection closed"
    seconds: float
    instances: int
    failed: int
    bytes: int  # bytes stored


@_message("instance.stored")
@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceStored(Message):
    """Worker -> supervisor: an instance is durable in the spool and acknowledged."""

    worker_id: int
    association_id: str
    sop_class_uid: str
    sop_instance_uid: str
    bytes: int
    status: int  # the DIMSE status sent (0x0000, or a warning)


@_message("instance.failed")
@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceFailed(Message):
    """Worker -> supervisor: a C-STORE was answered with a failure status."""

    worker_id: int
    association_id: str
    sop_class_uid: str
    sop_instance_uid: str
    bytes: int
    status: int


@_message("reload")
@dataclass(frozen=True, slots=True, kw_only=True)
class Reload(Message):
    """Supervisor -> workers: load configuration ``generation`` from the snapshot
    file ``snapshot`` (router/snapshot.py), which the supervisor checked."""

    generation: int
    snapshot: str


@_message("rescan")
@dataclass(frozen=True, slots=True, kw_only=True)
class Rescan(Message):
    """Supervisor -> workers: look for queued instances on disk (after a worker
    died holding some, or ``dicom-router queue retry`` moved dead letters back)."""


@_message("worker.gone")
@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerGone(Message):
    """Supervisor -> workers: worker ``worker_id`` died (its replacement, if any,
    comes later): what the others asked of it will not be answered."""

    worker_id: int


@_message("worker.ready")
@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerReady(Message):
    """Supervisor -> workers: worker ``worker_id`` said hello (started, or a
    replacement after :class:`WorkerGone`): its actor inbox takes messages."""

    worker_id: int


# Seconds after a drain's grace period that the supervisor waits for a worker to
# exit before SIGKILL: the workers finish their forwards in part of it.
DRAIN_KILL_AFTER = 5.0


@_message("drain")
@dataclass(frozen=True, slots=True, kw_only=True)
class Drain(Message):
    """Supervisor -> workers: take no new connections, finish open associations,
    abort what remains after ``grace`` seconds, then exit."""

    grace: float


@_message("stop")
@dataclass(frozen=True, slots=True, kw_only=True)
class Stop(Message):
    """Supervisor -> workers: exit now (open associations are aborted)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ActorAddress:
    """Where an actor lives: its worker and its id in that worker (D3)."""

    worker_id: int
    actor_id: str

    def __post_init__(self) -> None:
        for name, check, value in (
            ("worker_id", _check_int, self.worker_id),
            ("actor_id", _check_name, self.actor_id),
        ):
            try:
                check(value)
            except _Invalid as exc:
                raise ControlError(f"actor address {name}: {exc}") from None


@_message("actor")
@dataclass(frozen=True, slots=True, kw_only=True)
class ActorMessage(Message):
    """Actor -> actor, possibly across workers: ``kind`` and ``body`` are the actors'
    business; the envelope says who to deliver it to and who to answer."""

    to_worker: int
    to_actor: str
    from_worker: int
    from_actor: str
    kind: str
    body: dict[str, object] = field(default_factory=dict)

    @property
    def recipient(self) -> ActorAddress:
        return ActorAddress(worker_id=self.to_worker, actor_id=self.to_actor)

    @property
    def sender(self) -> ActorAddress:
        return ActorAddress(worker_id=self.from_worker, actor_id=self.from_actor)

    @classmethod
    def between(
        cls, sender: ActorAddress, recipient: ActorAddress, kind: str,
        body: dict[str, object] | None = None,
    ) -> ActorMessage:
        """A message from ``sender`` to ``recipient``."""
        return cls(to_worker=recipient.worker_id, to_actor=recipient.actor_id,
                   from_worker=sender.worker_id, from_actor=sender.actor_id,
                   kind=kind, body={} if body is None else body)

    def reply(self, kind: str, body: dict[str, object] | None = None) -> ActorMessage:
        """A message back to this one's sender, from its recipient."""
        return ActorMessage.between(self.recipient, self.sender, kind, body)


@_message("command")
@dataclass(frozen=True, slots=True, kw_only=True)
class Command(Message):
    """Admin client (or supervisor) -> supervisor (or worker): run command ``name``."""

    name: str
    args: dict[str, object] = field(default_factory=dict)


@_message("reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class Reply(Message):
    """The answer to a :class:`Command` or :class:`Hello`: ``ok`` with a ``result``
    map, or not ``ok`` with an ``error`` reason (Circus's uniform reply)."""

    ok: bool
    result: dict[str, object] = field(default_factory=dict)
    error: str | None = None

    def _check(self) -> None:
        if self.ok and self.error is not None:
            raise ControlError("reply: ok but with an error reason")
        if not self.ok and not self.error:
            raise ControlError("reply: an error reply needs a reason")

    @classmethod
    def success(cls, result: dict[str, object] | None = None) -> Reply:
        return cls(ok=True, result={} if result is None else result)

    @classmethod
    def failure(cls, reason: str) -> Reply:
        return cls(ok=False, error=" ".join(reason.split()) or "unknown error")


def from_wire(frames: Sequence[bytes]) -> Message:
    """Decode the frames of one message (without any ROUTER identity frame).

    Raises :class:`ControlError` (one line) for anything but a well-formed
    message of a known kind in :data:`PROTOCOL_VERSION`.
    """
    if len(frames) != 2:
        raise ControlError(f"expected 2 frames (kind, body), got {len(frames)}")
    kind, body = frames
    # unpackb has no max_buffer_size (that is Unpacker's): this check is it.
    if len(body) > MAX_MESSAGE_BYTES:
        raise ControlError(f"body is {len(body)} bytes, more than {MAX_MESSAGE_BYTES}")
    if len(kind) > _MAX_KIND_LEN:
        raise ControlError(f"kind is {len(kind)} bytes, more than {_MAX_KIND_LEN}")
    try:
        fields = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_MESSAGE_BYTES,
            max_bin_len=MAX_MESSAGE_BYTES,
            max_array_len=_MAX_ITEMS,
            max_map_len=_MAX_ITEMS,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ControlError(f"body is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if type(fields) is not dict:
        raise ControlError(f"body is a {type(fields).__name__}, expected a map")
    version = fields.pop("v", None)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ControlError(
            f"protocol version {_short(version)}, this side speaks {PROTOCOL_VERSION}"
        )
    cls = _KINDS.get(bytes(kind))
    if cls is None:
        raise ControlError(f"unknown message kind {_short(bytes(kind))}")
    names = [name for name, _ in cls._FIELDS]
    missing = [n for n in names if n not in fields]
    unknown = sorted(str(k) for k in fields if k not in names)
    if missing or unknown:
        parts = [f"missing {', '.join(missing)}" if missing else "",
                 f"unknown {', '.join(unknown)}" if unknown else ""]
        raise ControlError(f"{cls.KIND}: fields {'; '.join(p for p in parts if p)}")
    return cls(**fields)


# ---------------------------------------------------------------- actors


def route(message: ActorMessage, local_worker_id: int) -> Literal["local", "remote"]:
    """``"local"``: append to the recipient's mailbox in this worker's event loop;
    ``"remote"``: send over ZeroMQ to the recipient's worker."""
    return "local" if message.to_worker == local_worker_id else "remote"


# ---------------------------------------------------------------- endpoints

# The run directory's own sockets (Endpoints); the admin socket may be elsewhere.
CONTROL_SOCKET: Final = "ctl.sock"
BROADCAST_SOCKET: Final = "bcast.sock"


def _ipc(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    if len(os.fsencode(path)) > _IPC_PATH_MAX:
        raise EndpointError(
            f"ipc path {path!r} is {len(os.fsencode(path))} bytes, more than the "
            f"{_IPC_PATH_MAX} a Unix socket path allows: choose a shorter run directory"
        )
    return f"ipc://{path}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoints:
    """The ipc endpoints of one router, all derived from its run directory.

    - ``control`` (``ctl.sock``): supervisor ROUTER <- worker DEALERs.
    - ``broadcast`` (``bcast.sock``): supervisor XPUB -> worker SUBs.
    - ``admin`` (``admin.sock``, or a path of its own): supervisor ROUTER <- CLI.
    - :meth:`actor` (``w<N>.sock``): worker N's PULL inbox <- peers' PUSH.

    Names are short so that the run directory can be long: every path is
    checked against the 107-byte limit of a Unix socket path here, before
    anything binds, with :class:`EndpointError` naming the path.
    """

    run_dir: str
    control: str
    broadcast: str
    admin: str

    @classmethod
    def for_run_dir(
        cls, run_dir: str | os.PathLike[str], *, admin_path: str | os.PathLike[str] | None = None
    ) -> Endpoints:
        """The endpoints under ``run_dir`` (made absolute: workers may change
        directory). ``admin_path`` puts the admin socket elsewhere (config
        ``[admin] socket``); by default it is ``<run_dir>/admin.sock``."""
        directory = os.path.abspath(os.fspath(run_dir))
        if admin_path is None:
            admin = _ipc(directory, "admin.sock")
        else:
            full = os.path.abspath(os.fspath(admin_path))
            admin = _ipc(os.path.dirname(full), os.path.basename(full))
        endpoints = cls(
            run_dir=directory,
            control=_ipc(directory, CONTROL_SOCKET),
            broadcast=_ipc(directory, BROADCAST_SOCKET),
            admin=admin,
        )
        endpoints.actor(MAX_WORKER_ID)  # the longest inbox path fits, so they all do
        return endpoints

    def actor(self, worker_id: int) -> str:
        """Worker ``worker_id``'s actor inbox (it binds, its peers connect)."""
        if type(worker_id) is not int or not 0 <= worker_id <= MAX_WORKER_ID:
            raise EndpointError(f"worker id {_short(worker_id)} not in 0..{MAX_WORKER_ID}")
        return _ipc(self.run_dir, f"w{worker_id}.sock")


def worker_identity(worker_id: int) -> bytes:
    """The ZeroMQ identity of worker ``worker_id``'s DEALER, as the supervisor's
    ROUTER sees it (``b"w3"``): the address to send it a direct message."""
    return f"w{worker_id}".encode("ascii")


def _ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


def _socket(ctx: zmq.Context[Any], kind: int, *, linger_ms: int = 0,
            limit: bool = True) -> zmq.Socket[Any]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger_ms)
    if limit:
        # Frames are two of ours plus an identity; a bigger message drops the connection.
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 4096)
    return sock


@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisorSockets:
    """The supervisor's bound sockets (see :class:`Endpoints`).

    ``broadcast`` is an XPUB: poll it for reading too, and feed each frame to
    :func:`subscription_notice`; a worker's subscription (``True``) means it now
    hears every broadcast.
    """

    endpoints: Endpoints
    control: zmq.Socket[Any]
    broadcast: zmq.Socket[Any]
    admin: zmq.Socket[Any]

    def _bound(self) -> tuple[tuple[zmq.Socket[Any], str], ...]:
        """Each socket with the endpoint it is bound to."""
        return ((self.control, self.endpoints.control),
                (self.broadcast, self.endpoints.broadcast),
                (self.admin, self.endpoints.admin))

    def close(self) -> None:
        """Close the sockets and remove their files: a CLI that finds the admin
        socket file takes the router for running, and waited out its timeout to
        say "stale socket?" after every clean stop."""
        for sock, endpoint in self._bound():
            sock.close()
            path = _ipc_path(endpoint)
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def rebind(self) -> None:
        """Bind again where the socket files were removed (``run_dir`` deleted under
        the running router): connected workers are cut off and reconnect on their
        own (ZeroMQ), new ones and the CLI can connect again."""
        Path(self.endpoints.run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        for sock, endpoint in self._bound():
            path = _ipc_path(endpoint)
            if path is None or Path(path).exists():
                continue
            Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(zmq.ZMQError):
                sock.unbind(endpoint)
            sock.bind(endpoint)


def bind_supervisor(
    ctx: zmq.Context[Any],
    run_dir: str | os.PathLike[str],
    *,
    admin_path: str | os.PathLike[str] | None = None,
) -> SupervisorSockets:
    """Create ``run_dir`` (mode 0700: it is the access control of the sockets in
    it) and bind the supervisor's three sockets there.

    ``ctx`` is the supervisor process's own context. The control ROUTER hands a
    restarted worker's identity over to its new connection (``ROUTER_HANDOVER``),
    so a respawned worker N is reachable as ``b"wN"`` at once.
    """
    endpoints = Endpoints.for_run_dir(run_dir, admin_path=admin_path)
    Path(endpoints.run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    admin_dir = _ipc_path(endpoints.admin)
    if admin_dir is not None:
        Path(admin_dir).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    made: list[zmq.Socket[Any]] = []
    try:
        control = _socket(ctx, zmq.ROUTER)
        made.append(control)
        control.setsockopt(zmq.ROUTER_HANDOVER, 1)
        control.bind(endpoints.control)
        broadcast = _socket(ctx, zmq.XPUB, linger_ms=_FLUSH_LINGER_MS)
        made.append(broadcast)
        broadcast.setsockopt(zmq.XPUB_VERBOSE, 1)
        broadcast.bind(endpoints.broadcast)
        admin = _socket(ctx, zmq.ROUTER)
        made.append(admin)
        admin.bind(endpoints.admin)
    except zmq.ZMQError as exc:
        for sock in made:
            sock.close()
        raise EndpointError(f"cannot bind the supervisor's sockets in {endpoints.run_dir}: "
                            f"{exc}") from None
    return SupervisorSockets(endpoints=endpoints, control=control, broadcast=broadcast,
                             admin=admin)


class WorkerSockets:
    """A worker's sockets: ``control`` (DEALER to the supervisor), ``broadcast``
    (SUB, every topic) and ``inbox`` (PULL, bound at its actor endpoint), plus the
    PUSH sockets to peer workers that :meth:`send_actor` opens on first use."""

    __slots__ = ("_ctx", "_peers", "broadcast", "control", "endpoints", "inbox", "worker_id")

    def __init__(self, ctx: zmq.Context[Any], endpoints: Endpoints, worker_id: int) -> None:
        self._ctx = ctx
        self.endpoints = endpoints
        self.worker_id = worker_id
        self._peers: dict[int, zmq.Socket[Any]] = {}
        inbox_endpoint = endpoints.actor(worker_id)
        made: list[zmq.Socket[Any]] = []
        try:
            self.control = _socket(ctx, zmq.DEALER, linger_ms=_FLUSH_LINGER_MS)
            made.append(self.control)
            self.control.setsockopt(zmq.IDENTITY, worker_identity(worker_id))
            self.control.connect(endpoints.control)
            self.broadcast = _socket(ctx, zmq.SUB)
            made.append(self.broadcast)
            self.broadcast.setsockopt(zmq.SUBSCRIBE, b"")
            self.broadcast.connect(endpoints.broadcast)
            self.inbox = _socket(ctx, zmq.PULL)
            made.append(self.inbox)
            self.inbox.bind(inbox_endpoint)
        except zmq.ZMQError as exc:
            for sock in made:
                sock.close()
            raise EndpointError(f"worker {worker_id}: cannot set up its sockets: {exc}") from None

    def send(self, message: Message) -> None:
        """Send ``message`` to the supervisor (queued if it is not connected yet)."""
        send_message(self.control, message)

    def send_actor(self, message: ActorMessage) -> None:
        """Deliver ``message`` to its remote worker's inbox, without waiting.

        Raises :class:`ActorUnreachable` when that worker's queue is full (it is
        gone or not keeping up): the sending actor fails the request rather than
        blocking the event loop. Use :func:`route` first: local messages do not
        go through ZeroMQ.
        """
        peer = self._peers.get(message.to_worker)
        if peer is None:
            peer = _socket(self._ctx, zmq.PUSH, limit=False)
            peer.connect(self.endpoints.actor(message.to_worker))
            self._peers[message.to_worker] = peer
        try:
            send_message(peer, message, flags=zmq.NOBLOCK)
        except zmq.Again:
            raise ActorUnreachable(
                f"worker {message.to_worker} is not taking messages "
                f"(for actor {message.to_actor!r})"
            ) from None

    def close(self) -> None:
        """Close every socket (the control socket lingers briefly to flush events)."""
        for sock in (*self._peers.values(), self.control, self.broadcast, self.inbox):
            sock.close()
        self._peers.clear()
        path = _ipc_path(self.endpoints.actor(self.worker_id))
        if path is not None:  # its inbox's file (see SupervisorSockets.close)
            with contextlib.suppress(OSError):
                os.unlink(path)


def connect_worker(ctx: zmq.Context[Any], endpoints: Endpoints, worker_id: int) -> WorkerSockets:
    """Connect worker ``worker_id`` to its supervisor and bind its actor inbox.

    ``ctx`` is the worker process's own context. Connecting does not wait for the
    supervisor; the worker then sends :class:`Hello` and takes the supervisor's
    :class:`Reply` as its welcome.
    """
    return WorkerSockets(ctx, endpoints, worker_id)


# ---------------------------------------------------------------- send / receive


def send_message(
    sock: zmq.Socket[Any], message: Message, *, identity: bytes | None = None, flags: int = 0
) -> None:
    """Send ``message``; ``identity`` first on a ROUTER (whom to send it to)."""
    frames = message.to_wire()
    sock.send_multipart(frames if identity is None else [identity, *frames], flags=flags)


def recv_message(sock: zmq.Socket[Any], *, flags: int = 0) -> Message:
    """Receive one message on a DEALER, SUB or PULL socket (:class:`ControlError`
    if it does not decode: the message is consumed either way)."""
    return from_wire(sock.recv_multipart(flags=flags))


def recv_routed(sock: zmq.Socket[Any], *, flags: int = 0) -> tuple[bytes, Message]:
    """Receive one message on a ROUTER socket: ``(sender identity, message)``."""
    frames = sock.recv_multipart(flags=flags)
    if len(frames) < 2:
        raise ControlError(f"expected an identity and a message, got {len(frames)} frame(s)")
    return frames[0], from_wire(frames[1:])


def subscription_notice(frame: bytes) -> bool:
    """Read a frame received on the supervisor's XPUB: True when a subscriber
    joined, False when one left (ZeroMQ's ``\\x01``/``\\x00`` + topic)."""
    if frame[:1] == b"\x01":
        return True
    if frame[:1] == b"\x00":
        return False
    raise ControlError(f"not a subscription notice: {_short(bytes(frame[:16]))}")


# ---------------------------------------------------------------- admin


def answer_admin(sock: zmq.Socket[Any], handler: Callable[[Command], Reply]) -> None:
    """Answer one request waiting on the admin ROUTER (call when it is readable).

    Whatever happens the client gets a :class:`Reply`: a request that does not
    decode or is not a :class:`Command` gets an error reply saying why, and an
    exception in ``handler`` is logged and answered ``"<name>: internal error"``.
    """
    frames = sock.recv_multipart(flags=zmq.NOBLOCK)
    if len(frames) < 2:
        return  # no identity to answer to: not a DEALER client
    identity = frames[0]
    try:
        request = from_wire(frames[1:])
        if not isinstance(request, Command):
            raise ControlError(f"expected a command, got {request.KIND}")
    except ControlError as exc:
        reply = Reply.failure(f"bad request: {exc}")
    else:
        try:
            reply = handler(request)
            if not isinstance(reply, Reply):
                raise TypeError(f"the handler returned {type(reply).__name__}, not a Reply")
        except Exception as exc:
            log.exception("admin command %r failed", request.name)
            reply = Reply.failure(f"{request.name}: internal error: {type(exc).__name__}")
    send_message(sock, reply, identity=identity, flags=zmq.NOBLOCK)


def _refused(path: str) -> bool:
    """Whether a connection to the Unix socket ``path`` is refused: nothing listens.
    (A supervisor that listens takes the probe and sees it close at once.)"""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False  # not ours to judge (EACCES...): ZeroMQ says what it finds
    finally:
        probe.close()
    return False


def admin_request(
    ctx: zmq.Context[Any], admin_endpoint: str, command: Command, timeout: float
) -> Reply:
    """Send ``command`` to the supervisor's admin socket and return its :class:`Reply`.

    Waits at most ``timeout`` seconds in all, in a poller (no sleeps). Raises
    :class:`SupervisorUnavailable` at once when the ipc socket file does not
    exist, and after ``timeout`` when nothing accepts the connection (a stale
    socket file) or nothing answers; :class:`ControlError` when the answer is
    not a Reply. Uses a fresh DEALER per request, so a late answer to an earlier
    request can never be taken for this one's.
    """
    path = _ipc_path(admin_endpoint)
    if path is not None and not os.path.exists(path):
        raise SupervisorUnavailable(
            f"no supervisor at {admin_endpoint}: the socket does not exist "
            f"(is `dicom-router run` running?)"
        )
    if path is not None and _refused(path):
        # The file a killed router left: ZeroMQ would wait out the whole timeout for
        # a listener that is not there (status and reload took 5 s to say so).
        raise SupervisorUnavailable(
            f"no supervisor at {admin_endpoint}: nothing listens on the socket (left by "
            f"a router that was killed? is `dicom-router run` running?)"
        )
    deadline = time.monotonic() + timeout
    sock = _socket(ctx, zmq.DEALER)
    try:
        # Queue only on a completed connection, so "writable" means "someone is there".
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(admin_endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLOUT)
        if not poller.poll(_remaining_ms(deadline)):
            raise SupervisorUnavailable(
                f"no supervisor accepted a connection at {admin_endpoint} within {timeout:g} s "
                f"(stale socket? is `dicom-router run` running?)"
            )
        send_message(sock, command, flags=zmq.NOBLOCK)
        poller.modify(sock, zmq.POLLIN)
        if not poller.poll(_remaining_ms(deadline)):
            raise SupervisorUnavailable(
                f"the supervisor at {admin_endpoint} did not answer {command.name!r} "
                f"within {timeout:g} s"
            )
        return Reply.from_wire(sock.recv_multipart(flags=zmq.NOBLOCK))
    finally:
        sock.close(linger=0)


def _remaining_ms(deadline: float) -> int:
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))
