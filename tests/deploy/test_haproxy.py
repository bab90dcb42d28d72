"""deploy/haproxy: the configuration, its DICOM health check, and two real routers behind it.

1. ``haproxy -c`` accepts the shipped file as it is, without a warning.
2. The health check's bytes: the block in haproxy.cfg is exactly what
   deploy/haproxy/health_check.py prints (the project's own encoder); the bytes equal a
   fixture written out by hand from the tables of PS3.8 §9.3.2 and §9.3.6; and the
   router's own negotiation, with the sample configurations, answers them with an
   A-ASSOCIATE-AC.
3. End to end: two real routers (``dicom-router run``, tests/helpers/router.py) behind
   a haproxy started here with a copy of the file. What the copy changes, and nothing
   else: addresses and ports (free loopback ones), the stats socket path, no
   chroot/user/group/daemon (haproxy runs in the foreground as the test's user), logs
   to stderr, the check interval (300 ms instead of 5 s, so the test takes seconds),
   and one more server: a peer that answers every A-ASSOCIATE-RQ with an
   A-ASSOCIATE-RJ, which the DICOM check must mark DOWN although its port accepts TCP.
   Then DCMTK's storescu sends studies through haproxy on concurrent associations:
   every instance lands, byte for byte, in one of the two spools, and both routers got
   associations (leastconn). One router is stopped: the check marks it DOWN and new
   associations all reach the other.

Waiting: on log lines where there is one (router ready, health-check association
served); haproxy's view of its servers has no event to wait on, so its stats socket is
polled with a deadline.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import pytest

from router.config import load_config
from router.dicom import uids
from router.dicom.dataset import read_part10_header
from router.dicom.negotiation import negotiate
from router.dicom.pdu import (
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRQ,
    PDUReader,
    RejectReason,
    RejectResult,
    RejectSource,
    decode_pdu,
    encode_pdu,
)
from tests.deploy.conftest import DEPLOY
from tests.helpers.data import make_study
from tests.helpers.dcmtk import Dcmtk, dcmtk_env, start_server
from tests.helpers.net import free_port
from tests.helpers.procs import Procs
from tests.helpers.router import Router

CFG = DEPLOY / "haproxy" / "haproxy.cfg"
GENERATOR = DEPLOY / "haproxy" / "health_check.py"
BACKEND = "dicom_routers"
#: How long haproxy may take to see a change through its checks (every 300 ms here).
CHECK_DEADLINE = 15.0

# The health check's A-ASSOCIATE-RQ, written out by hand from PS3.8 rather than by the
# encoder; each line is one field of the table cited.
HAND_CHECKED_RQ = b"".join([
    # §9.3.2 Table 9-11: PDU-type 01H, reserved 00H, PDU-length 190 = 68 (fixed fields)
    # + 25 (application context) + 50 (presentation context) + 47 (user information)
    bytes([0x01, 0x00]) + (190).to_bytes(4, "big"),
    bytes([0x00, 0x01, 0x00, 0x00]),           # protocol-version 0001H, reserved
    b"DICOM-ROUTER    ",                       # called-AE-title, 16 bytes, space padded
    b"HAPROXY-CHECK   ",                       # calling-AE-title
    bytes(32),                                 # reserved, 32 bytes of 00H
    # Table 9-12: item-type 10H, reserved, item-length 21, application-context-name
    bytes([0x10, 0x00, 0x00, 21]) + b"1.2.840.10008.3.1.1.1",
    # Table 9-13: item-type 20H, reserved, item-length 46 = 4 + 21 + 21,
    # presentation-context-ID 1, three reserved bytes
    bytes([0x20, 0x00, 0x00, 46, 0x01, 0x00, 0x00, 0x00]),
    bytes([0x30, 0x00, 0x00, 17]) + b"1.2.840.10008.1.1",  # Table 9-14: Verification
    bytes([0x40, 0x00, 0x00, 17]) + b"1.2.840.10008.1.2",  # Table 9-15: implicit VR LE
    # Table 9-16: item-type 50H, reserved, item-length 43 = 8 + 35
    bytes([0x50, 0x00, 0x00, 43]),
    # PS3.8 D.1 Table D.1-1: item-type 51H, reserved, length 4, maximum-length 16384
    bytes([0x51, 0x00, 0x00, 0x04]) + (16384).to_bytes(4, "big"),
    # PS3.7 D.3.3.2 Table D.3-1: item-type 52H, reserved, length 31, implementation UID
    bytes([0x52, 0x00, 0x00, 31]) + b"1.2.826.0.1.3680043.10.1442.1.0",
])
# §9.3.6 Table 9-24: PDU-type 05H, reserved, PDU-length 4, four reserved bytes.
HAND_CHECKED_RELEASE_RQ = bytes([0x05, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00])


def generator() -> ModuleType:
    """deploy/haproxy/health_check.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("deploy_haproxy_health_check", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generated_block(text: str) -> list[str]:
    """The lines from "# BEGIN generated" to "# END generated", both included."""
    lines = text.splitlines()
    (begin,) = [i for i, line in enumerate(lines) if "# BEGIN generated" in line]
    (end,) = [i for i, line in enumerate(lines) if "# END generated" in line]
    return lines[begin:end + 1]


def check_rules(block: list[str]) -> list[tuple[str, str]]:
    """The block's tcp-check rules in order: (rule, argument)."""
    out = []
    for line in block:
        found = re.match(r"\s*tcp-check (\S+)\s*(.*)$", line)
        if found:
            out.append((found[1], found[2]))
    return out


def sent_bytes(block: list[str]) -> tuple[bytes, bytes]:
    """What the check sends before its first expect (A-ASSOCIATE-RQ) and after it."""
    rules = check_rules(block)
    first_expect = [r for r, _ in rules].index("expect")
    parts = ([bytes.fromhex(a) for r, a in rules[:first_expect] if r == "send-binary"],
             [bytes.fromhex(a) for r, a in rules[first_expect:] if r == "send-binary"])
    return b"".join(parts[0]), b"".join(parts[1])


# ------------------------------------------------------------------ the file


def test_haproxy_accepts_the_file(haproxy: str) -> None:
    done = subprocess.run([haproxy, "-c", "-f", str(CFG)], capture_output=True, text=True,
                          timeout=60, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "[WARNING]" not in output and "[ALERT]" not in output, output


def haproxy_seconds(value: str) -> float:
    """An haproxy time ("61m", "5s", "500ms"; a bare number is milliseconds)."""
    found = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert found, value
    scale = {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
             "d": 86400.0}[found[2]]
    return int(found[1]) * scale


def test_tcp_leastconn_and_timeouts_that_outlast_the_router() -> None:
    """haproxy must not cut an association the router still keeps: the router ends a
    silent one itself ([timeouts] idle), or gives up on a relayed operation
    ([timeouts] operation), with something the modality understands."""
    text = CFG.read_text()
    assert re.search(r"^    mode tcp$", text, re.MULTILINE)
    assert re.search(r"^    balance leastconn$", text, re.MULTILINE)
    timeouts = {name: haproxy_seconds(value) for name, value in
                re.findall(r"^    timeout (\S+) (\S+)$", text, re.MULTILINE)}
    for config in (load_config(DEPLOY / "systemd" / "router.toml"), load_config(None)):
        assert config.idle_timeout is not None and config.operation_timeout is not None
        longest = max(config.idle_timeout, config.operation_timeout)
        for name in ("tunnel", "client", "server"):
            assert timeouts[name] > longest, f"timeout {name} {timeouts[name]:g} s"


def test_the_check_block_is_what_the_generator_prints() -> None:
    block = generated_block(CFG.read_text())
    found = re.search(r"--called-ae (\S+) --calling-ae (\S+)", block[0])
    assert found, block[0]
    module = generator()
    expected = module.rules(found[1], found[2])
    assert block == expected, (
        "haproxy.cfg's health check differs from the generator's; paste this over it:\n"
        + "\n".join(expected))


@pytest.mark.parametrize("title", ["THIS-IS-WAY-TOO-LONG-AE", "BAD\\AE"])
def test_the_generator_refuses_a_bad_ae_title_in_one_line(
        title: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A traceback of 15 lines before (an outside campaign): a usage error, exit 2."""
    with pytest.raises(SystemExit) as ended:
        generator().main(["--called-ae", title])
    assert ended.value.code == 2
    said = capsys.readouterr()
    assert said.out == "" and "Traceback" not in said.err
    assert ": error: A-ASSOCIATE-RQ." in said.err.splitlines()[-1], \
        said.err


def test_the_check_bytes_match_ps3_8_by_hand() -> None:
    rq, release = sent_bytes(generated_block(CFG.read_text()))
    assert rq == HAND_CHECKED_RQ
    assert release == HAND_CHECKED_RELEASE_RQ
    # And the encoder agrees with the hand (the generator uses it).
    assert encode_pdu(generator().associate_rq("DICOM-ROUTER", "HAPROXY-CHECK")) == rq
    assert encode_pdu(AReleaseRQ()) == release


def test_the_sample_routers_accept_the_check() -> None:
    rq_bytes, _ = sent_bytes(generated_block(CFG.read_text()))
    rq = decode_pdu(rq_bytes)
    assert isinstance(rq, AAssociateRQ)
    for config in (load_config(DEPLOY / "systemd" / "router.toml"), load_config(None)):
        answer = negotiate(rq, config.to_acceptor_policy())
        assert isinstance(answer, AAssociateAC), f"{config.source}: {answer}"
        (context,) = answer.presentation_contexts
        assert context.transfer_syntax == uids.IMPLICIT_VR_LITTLE_ENDIAN


def test_the_check_expects_an_ac_then_a_release_rp() -> None:
    rules = check_rules(generated_block(CFG.read_text()))
    kinds = [r for r, _ in rules]
    assert kinds[0] == "connect"
    expects = [(i, a) for i, (r, a) in enumerate(rules) if r == "expect"]
    # min-recv 1: the first byte decides. Without it haproxy waits for more data after
    # an A-ASSOCIATE-RJ, and the router waits for haproxy to close (ARTIM): the check
    # ends only at `timeout check`, as a timeout rather than a rejection.
    assert [a.split()[:4] for _, a in expects] == [["min-recv", "1", "rbinary", "^02"],
                                                   ["min-recv", "1", "rbinary", "^06"]]
    # The release goes out only once the A-ASSOCIATE-AC came back, and last.
    assert kinds[expects[0][0] + 1:] == ["send-binary", "expect"]


# ------------------------------------------------------------- end to end


class RejectingPeer:
    """A TCP server that reads an A-ASSOCIATE-RQ and answers A-ASSOCIATE-RJ (called AE
    title not recognized), as a router set up with another AE title would: it then
    leaves the connection open for the requestor to close (PS3.8 §9.2, Sta13), which
    is what made a check without ``min-recv`` wait for its timeout."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        reject = encode_pdu(AAssociateRJ(
            result=RejectResult.REJECTED_PERMANENT, source=RejectSource.SERVICE_USER,
            reason=RejectReason.USER_CALLED_AE_NOT_RECOGNIZED))
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed by close()
                return
            with conn:
                conn.settimeout(10)
                reader, received = PDUReader(), bytearray()
                try:
                    while (pdu := reader.next_pdu()) is None:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        reader.feed(chunk)
                        received += chunk
                    if not isinstance(pdu, AAssociateRQ):
                        continue  # not a health check (wait_for_port's probe)
                    conn.sendall(reject)
                except OSError:
                    continue
                with self.changed:
                    self.requests.append(bytes(received))
                    self.changed.notify_all()
                # Until haproxy closes (it resets the connection) or 10 s.
                with contextlib.suppress(OSError):
                    while conn.recv(65536):
                        pass

    def wait_requests(self, count: int, timeout: float = CHECK_DEADLINE) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(f"{len(self.requests)} health checks reached the "
                                     f"rejecting peer in {timeout:.0f} s, wanted {count}")

    def close(self) -> None:
        # shutdown() wakes the accept() blocked in the thread (Linux); then it returns.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(10)


def config_for_test(port: int, routers: list[int], rejecting: int, stats: Path) -> str:
    """haproxy.cfg with what the module docstring lists changed, each change checked to
    apply exactly once so that an edit to the file cannot silently bypass it."""
    text = CFG.read_text()
    changes = [
        (r"^    (chroot|user|group|daemon)\b.*\n", "", 4),
        (r"^    log /dev/log local0$", "    log stderr format raw local0", 1),
        (r"^    stats socket /run/haproxy/admin\.sock ", f"    stats socket {stats} ", 1),
        (r"^    bind :11112$", f"    bind 127.0.0.1:{port}", 1),
        (r"\binter 5s fastinter 1s downinter 5s\b",
         "inter 300ms fastinter 100ms downinter 300ms", 1),
        (r"\b192\.0\.2\.11:11112$", f"127.0.0.1:{routers[0]}", 1),
        (r"\b192\.0\.2\.12:11112$", f"127.0.0.1:{routers[1]}", 1),
    ]
    for pattern, replacement, count in changes:
        text, made = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert made == count, f"{pattern!r}: {made} changes, expected {count}"
    sections = re.findall(r"^(\w+)\s+(\S+)", text, flags=re.MULTILINE)
    assert sections[-1] == ("backend", BACKEND), "the backend is no longer the last section"
    return text + f"    server not-dicom 127.0.0.1:{rejecting}\n"


def server_states(stats: Path) -> dict[str, tuple[str, str]]:
    """haproxy's ``show stat``: server name -> (status, last check status)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    rows = csv.DictReader(io.StringIO(data.decode().removeprefix("# ")))
    return {row["svname"]: (row["status"], row["check_status"]) for row in rows
            if row["pxname"] == BACKEND and row["svname"] != "BACKEND"}


def wait_states(stats: Path, want: dict[str, tuple[str, str]]) -> None:
    """Poll the stats socket until the servers in ``want`` are in those states.

    haproxy signals nothing we could block on when a check changes a server's state,
    so this asks, with a back-off from 10 to 100 ms, for at most CHECK_DEADLINE.
    """
    deadline = time.monotonic() + CHECK_DEADLINE
    delay = 0.01
    while True:
        try:
            got = server_states(stats)
        except (FileNotFoundError, ConnectionRefusedError):
            # Its frontend listens (what start_server waited for) before its stats
            # socket is there: a CI run asked in between.
            got = {}
        if all(got.get(name) == state for name, state in want.items()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"haproxy's servers: {got}; waited for {want}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _dataset(path: Path) -> bytes:
    return path.read_bytes()[read_part10_header(path).dataset_offset:]


def _spooled(router: Router) -> list[Path]:
    return sorted((router.spool / "unrouted").glob("*.dcm"))


@pytest.fixture
def routers(tmp_path: Path) -> Iterator[list[Router]]:
    """Two routers, one worker each, answering to the AE title the health check calls."""
    started: list[Router] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            started.append(Router(tmp_path / name, workers=1,
                                  extra='[acceptance]\ncalled_ae = ["DICOM-ROUTER"]\n'))
        for router in started:
            router.wait_for("ready: 1 workers serving")
        yield started
    finally:
        for router in started:
            router.stop()


@pytest.fixture
def rejecting_peer() -> Iterator[RejectingPeer]:
    peer = RejectingPeer()
    try:
        yield peer
    finally:
        peer.close()


@pytest.mark.interop
def test_two_routers_behind_haproxy(haproxy: str, dcmtk: Dcmtk, procs: Procs, tmp_path: Path,
                                    routers: list[Router], rejecting_peer: RejectingPeer
                                    ) -> None:
    stats = tmp_path / "haproxy.sock"
    config = tmp_path / "haproxy.cfg"

    def command(port: int) -> list[str]:
        config.write_text(config_for_test(port, [r.port for r in routers], rejecting_peer.port,
                                          stats))
        return [haproxy, "-db", "-f", str(config)]

    port, _ = start_server(procs, command, None, name="haproxy")
    # Each router has served a health-check association, released cleanly; the rejecting
    # peer has answered two (fall 2). Then haproxy's view, which lags by a moment.
    for router in routers:
        line = router.wait_for("HAPROXY-CHECK->DICOM-ROUTER", timeout=CHECK_DEADLINE)
        router.wait_for("closed: released", timeout=CHECK_DEADLINE, start=line)
    rejecting_peer.wait_requests(2)
    wait_states(stats, {"router1": ("UP", "L7OK"), "router2": ("UP", "L7OK"),
                        "not-dicom": ("DOWN", "L7RSP")})
    # What reached the wire is the generator's A-ASSOCIATE-RQ, whole and in one piece.
    assert rejecting_peer.requests[0] == encode_pdu(
        generator().associate_rq("DICOM-ROUTER", "HAPROXY-CHECK"))

    def send(folder: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [dcmtk.storescu, "-aet", "MODALITY", "-aec", "DICOM-ROUTER", "127.0.0.1", str(port),
             *map(str, sorted(folder.glob("*.dcm")))],
            capture_output=True, text=True, timeout=60, env=dcmtk_env(), check=False)

    def send_all(prefix: str, n: int) -> set[bytes]:
        folders = [tmp_path / f"{prefix}{i}" for i in range(n)]
        for i, folder in enumerate(folders):
            make_study(folder, n_instances=2, size_kb=8, patient_id=f"{prefix.upper()}{i}")
        with ThreadPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(send, folders))
        assert all(r.returncode == 0 for r in results), [r.stdout + r.stderr for r in results]
        return {_dataset(f) for folder in folders for f in folder.glob("*.dcm")}

    # Six concurrent associations through haproxy.
    sent = send_all("s", 6)
    a, b = ([_dataset(p) for p in _spooled(r)] for r in routers)
    assert len(a) + len(b) == len(sent) == 12, "an instance is missing or stored twice"
    assert set(a) | set(b) == sent  # byte for byte
    for router, spooled in zip(routers, (a, b), strict=True):
        associations = router.count("MODALITY->DICOM-ROUTER")
        assert spooled and associations, f"{router.config}: leastconn sent it nothing"

    # Router A stops (drains: its listener closes at once). The check sees it, and new
    # associations all go to B.
    assert routers[0].stop() == 0
    wait_states(stats, {"router1": ("DOWN", "L4CON"), "router2": ("UP", "L7OK")})
    more = send_all("t", 3)
    assert len(_spooled(routers[0])) == len(a)
    b_after = {_dataset(p) for p in _spooled(routers[1])}
    assert b_after == set(b) | more and len(_spooled(routers[1])) == len(b) + 6


PROXY_CFG = """\
global
    log stderr format raw local0
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend v1
    bind 127.0.0.1:{v1}
    default_backend v1
backend v1
    server router 127.0.0.1:{router} send-proxy source 127.0.0.2
frontend v2
    bind 127.0.0.1:{v2}
    default_backend v2
backend v2
    server router 127.0.0.1:{router} send-proxy-v2 source 127.0.0.2
"""


@pytest.mark.interop
def test_proxy_protocol_from_haproxy_gives_rules_the_modality_address(
        haproxy: str, dcmtk: Dcmtk, procs: Procs, tmp_path: Path) -> None:
    """haproxy connects to the router from 127.0.0.2 (``source``) and sends a PROXY
    header first, version 1 (``send-proxy``) on one frontend and version 2
    (``send-proxy-v2``) on the other. The router's listener has ``proxy_protocol =
    true``: each association is logged as from storescu's own address (127.0.0.1), and a
    rule that rejects what comes from 127.0.0.2 (the balancer) does not match, so every
    instance is stored byte for byte. Before, the router took the header for a
    malformed PDU and aborted every association."""
    router_port = free_port()
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "not from the balancer itself"\n[rule.when]\npeer = "127.0.0.2"\n'
        '[rule.then]\nreject = 0xA700\n')
    router = Router(tmp_path, workers=2, extra='[routing]\nrules = "rules.toml"\n',
                    router_extra=f'[[router.listen]]\nhost = "127.0.0.1"\nport = {router_port}\n'
                                 'proxy_protocol = true\n')
    try:
        router.wait_for("ready: 2 workers serving")
        ports: dict[str, int] = {}

        def command(port: int) -> list[str]:
            ports["v1"], ports["v2"] = port, free_port()
            config = tmp_path / "haproxy.cfg"
            config.write_text(PROXY_CFG.format(v1=ports["v1"], v2=ports["v2"],
                                               router=router_port))
            return [haproxy, "-db", "-f", str(config)]

        start_server(procs, command, None, name="haproxy")
        sent: set[bytes] = set()
        for version in ("v1", "v2"):
            folder = tmp_path / version
            make_study(folder, n_instances=3, size_kb=64, patient_id=version.upper())
            done = subprocess.run(
                [dcmtk.storescu, "-aet", f"MOD-{version.upper()}", "-aec", "ROUTER",
                 "127.0.0.1", str(ports[version]), *map(str, sorted(folder.glob("*.dcm")))],
                capture_output=True, text=True, timeout=60, env=dcmtk_env(), check=False)
            assert done.returncode == 0, done.stdout + done.stderr
            sent |= {_dataset(f) for f in folder.glob("*.dcm")}
        router.wait_count("closed: released", 2)
    finally:
        router.stop()
    opened = [line for line in router.log().splitlines() if "->ROUTER " in line
              and "accepted" in line]
    assert len(opened) == 2, router.log()
    for line in opened:
        assert re.search(r"MOD-V[12]->ROUTER 127\.0\.0\.1:\d+ accepted", line), line
    assert {_dataset(p) for p in _spooled(router)} == sent


@pytest.mark.interop
def test_the_health_check_with_send_proxy_v2_as_deploy_readme_says(
        haproxy: str, procs: Procs, tmp_path: Path, rejecting_peer: RejectingPeer) -> None:
    """The shipped file with `send-proxy-v2 check-send-proxy` added to its server lines,
    in front of two routers whose listener has ``proxy_protocol = true``: the DICOM
    health check reaches them through the PROXY header and marks both UP. (With the
    check's `tcp-check connect` as it was, without `default`, haproxy ignored
    check-send-proxy: the routers closed every check, "no PROXY header", and both
    were DOWN.)"""
    stats = tmp_path / "haproxy.sock"
    config = tmp_path / "haproxy.cfg"
    started: list[Router] = []
    ports: list[int] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            ports.append(port := free_port())
            started.append(Router(
                tmp_path / name, workers=1, extra='[acceptance]\ncalled_ae = ["DICOM-ROUTER"]\n',
                router_extra=f'[[router.listen]]\nhost = "127.0.0.1"\nport = {port}\n'
                             'proxy_protocol = true\nproxy_from = ["127.0.0.1"]\n'))
        for router in started:
            router.wait_for("ready: 1 workers serving")

        def command(port: int) -> list[str]:
            text = config_for_test(port, ports, rejecting_peer.port, stats)
            text, made = re.subn(r"^(    server router\d 127\.0\.0\.1:\d+)$",
                                 r"\1 send-proxy-v2 check-send-proxy", text, flags=re.MULTILINE)
            assert made == 2
            config.write_text(text)
            return [haproxy, "-db", "-f", str(config)]

        start_server(procs, command, None, name="haproxy")
        wait_states(stats, {"router1": ("UP", "L7OK"), "router2": ("UP", "L7OK")})
        for router in started:
            router.wait_for("HAPROXY-CHECK->DICOM-ROUTER 127.0.0.1:")
    finally:
        for router in started:
            router.stop()
    for router in started:
        assert "PROXY header" not in router.log(), router.log()
