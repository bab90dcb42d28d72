"""A listener with ``proxy_protocol = true``: the modality's address comes from the PROXY
header a load balancer sends first (router/proxy_protocol.py). A real HAProxy with
``send-proxy`` and ``send-proxy-v2`` is in tests/deploy/test_haproxy.py; here the header
is written by hand, so that what is refused can be tested: no header (DCMTK's echoscu
straight at the port) and a header from an address outside ``proxy_from``."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from pathlib import Path

import pytest

from tests.faults.test_actor_faults import associate_rq, read_pdu
from tests.helpers.dcmtk import Dcmtk, dcmtk_env
from tests.helpers.net import free_port
from tests.helpers.router import Router

pytestmark = pytest.mark.interop

V1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 50123 104\r\n"


def _router(tmp_path: Path, proxy_port: int, proxy_from: str = "") -> Router:
    listen = (f'[[router.listen]]\nhost = "127.0.0.1"\nport = {proxy_port}\n'
              f'proxy_protocol = true\n{proxy_from}')
    router = Router(tmp_path, workers=1, router_extra=listen)
    router.wait_for("ready: 1 workers serving")
    return router


def _echo(dcmtk: Dcmtk, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk.echoscu, "-aet", "MOD", "-aec", "ROUTER", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30, env=dcmtk_env(), check=False)


def _open_associations(router: Router) -> list[int]:
    workers = router.status()["workers"]
    assert isinstance(workers, list)
    return [int(w["open_associations"]) for w in workers]


def test_a_connection_without_the_header_is_closed_and_logged(tmp_path: Path,
                                                              dcmtk: Dcmtk) -> None:
    """echoscu straight at the PROXY port: its A-ASSOCIATE-RQ is not taken for a header
    (nor served as if it were from wherever it claims); the connection is closed with
    one line saying why. The plain port beside it serves the same echoscu."""
    proxy_port = free_port()
    router = _router(tmp_path, proxy_port)
    try:
        done = _echo(dcmtk, proxy_port)
        assert done.returncode != 0, done.stdout + done.stderr
        at = router.wait_for("closed: no PROXY header")
        line = router.log().splitlines()[at]
        assert "the connection starts with b'\\x01\\x00" in line, line
        assert _echo(dcmtk, router.port).returncode == 0
        assert _open_associations(router) == [0]
    finally:
        assert router.stop() == 0
    assert "Traceback" not in router.log()


def test_the_header_gives_the_association_its_peer(tmp_path: Path) -> None:
    """A v1 header naming 192.0.2.7:50123, then an A-ASSOCIATE-RQ in the same segment:
    accepted, and the association is logged as from 192.0.2.7:50123."""
    proxy_port = free_port()
    router = _router(tmp_path, proxy_port)
    try:
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
            sock.sendall(V1 + associate_rq())
            assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
            sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
            assert read_pdu(sock)[0] == 0x06
        at = router.wait_for("closed: released")
        line = router.log().splitlines()[at]
        assert "HOSTILE->ROUTER 192.0.2.7:50123" in line, line
    finally:
        assert router.stop() == 0


def test_a_header_from_outside_proxy_from_is_refused(tmp_path: Path) -> None:
    """proxy_from = ["127.0.0.2"]: the same header and request from 127.0.0.1 (anyone
    who can reach the port could claim any address) is closed unread; from 127.0.0.2
    it is served as from the address in the header."""
    proxy_port = free_port()
    router = _router(tmp_path, proxy_port, 'proxy_from = ["127.0.0.2"]\n')
    try:
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
            sock.sendall(V1 + associate_rq())
            # Closed without an answer (or reset: the request was left unread).
            with contextlib.suppress(ConnectionResetError):
                assert read_pdu(sock) == (0, b"")
        router.wait_for(f"port {proxy_port} takes connections from its proxy_from balancers")
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=10,
                                      source_address=("127.0.0.2", 0)) as sock:
            sock.sendall(V1 + associate_rq())
            assert read_pdu(sock)[0] == 0x02
        router.wait_for("HOSTILE->ROUTER 192.0.2.7:50123")
    finally:
        assert router.stop() == 0


def test_refused_connections_are_said_a_few_times_per_address_then_counted(
        tmp_path: Path) -> None:
    """A health check or a scanner aimed at the PROXY port, in a loop: one WARNING per
    connection buried the log. Five per address and kind, then one line with how many
    more (said here as the router stops)."""
    proxy_port = free_port()
    router = _router(tmp_path, proxy_port, 'proxy_from = ["127.0.0.2"]\n')

    def refused(source: str, first: bytes) -> None:
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=10,
                                      source_address=(source, 0)) as sock:
            sock.sendall(first)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(4096):  # until the router closes it
                    pass

    try:
        for _ in range(8):
            refused("127.0.0.1", V1 + associate_rq())  # not a proxy_from balancer
            refused("127.0.0.2", associate_rq())  # a balancer, but no PROXY header
    finally:
        assert router.stop() == 0
    assert router.count("takes connections from its proxy_from balancers only") == 5
    assert router.count("closed: no PROXY header") == 5
    assert router.count(f"3 more connections refused on port {proxy_port} (not a proxy_from "
                        "balancer) from 127.0.0.1 in the last") == 1, router.log()
    assert router.count(f"3 more connections without a good PROXY header on port "
                        f"{proxy_port} from 127.0.0.2 in the last") == 1, router.log()


def test_a_reload_that_moves_the_proxy_port_leaves_its_socket_a_proxy_port(
        tmp_path: Path, dcmtk: Dcmtk) -> None:
    """The port of a PROXY listener changed in the file and reloaded ("takes effect at
    the next restart"): the old socket, still open, served echoscu without a header
    from anywhere, and refused the balancer's headers (an outside campaign). It keeps
    its settings until the restart."""
    proxy_port = free_port()
    router = _router(tmp_path, proxy_port, 'proxy_from = ["127.0.0.1"]\n')
    try:
        router.config.write_text(router.config.read_text().replace(
            f"port = {proxy_port}", f"port = {free_port()}"))
        done = router.command("reload")
        assert done.returncode == 0 and "listen addresses changed" in done.stdout, done
        router.wait_for("worker 1: configuration generation 2 loaded")
        assert _echo(dcmtk, proxy_port).returncode != 0  # no header: still refused
        router.wait_for("closed: no PROXY header")
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
            sock.sendall(V1 + associate_rq())
            assert read_pdu(sock)[0] == 0x02  # the balancer's header is still taken
    finally:
        assert router.stop() == 0
