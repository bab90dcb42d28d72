"""DICOM over TLS into the router (PS3.15 Annex B): DCMTK's echoscu and storescu with
their TLS options, against a listener with ``tls = true``; certificates made by the
openssl tool for each test."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from router.dicom.dataset import read_part10_header
from tests.helpers.data import make_ct
from tests.helpers.dcmtk import Dcmtk
from tests.helpers.net import free_port
from tests.helpers.router import Router
from tests.helpers.tls import certificate, openssl, revocation_list

pytestmark = pytest.mark.interop


def _certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key: (key, certificate)."""
    return certificate(folder, name)


def _tls_router(tmp_path: Path, key: Path, cert: Path, ca: Path | None = None
                ) -> tuple[Router, int]:
    """A router with its usual plain listener and a TLS one (its port returned)."""
    port = free_port()
    router = Router(tmp_path, extra=(
        f'[[router.listen]]\nhost = "127.0.0.1"\nport = {port}\ntls = true\n'
        f'tls_cert = "{cert}"\ntls_key = "{key}"\n' + (f'tls_ca = "{ca}"\n' if ca else "")))
    router.wait_for("ready: 2 workers serving")
    return router, port


def _echo(dcmtk: Dcmtk, port: int, *tls: str | Path) -> subprocess.CompletedProcess[str]:
    return dcmtk.run("echoscu", *tls, "-to", "10", "-aec", "ROUTER", "127.0.0.1", str(port))


def _dataset(path: Path) -> bytes:
    return path.read_bytes()[read_part10_header(path).dataset_offset:]


def test_dcmtk_over_tls_is_stored_byte_for_byte(tmp_path: Path, dcmtk: Dcmtk) -> None:
    key, cert = _certificate(tmp_path, "router")
    files = []
    for i, size_kb in enumerate((4, 600, 3000)):  # several TLS records, many PDUs
        files.append(tmp_path / f"ct{i}.dcm")
        make_ct(files[-1], size_kb=size_kb, seed=i)
    router, port = _tls_router(tmp_path, key, cert)
    try:
        assert router.count(f"listening on 127.0.0.1:{port} (TLS)") == 1
        # The storescu checks the router's certificate (+cf) and presents none (+tla).
        sent = dcmtk.run("storescu", "+tla", "+cf", cert, "-aet", "MOD1", "-aec", "ROUTER",
                         "127.0.0.1", str(port), *files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        router.wait_count("closed: released", 1)
        # Plain DICOM at the TLS port: no association, one line saying why, nothing kept.
        assert _echo(dcmtk, port).returncode != 0
        router.wait_for("TLS handshake with 127.0.0.1:")
        # The router is none the worse: plain and TLS associations go on.
        assert _echo(dcmtk, router.port).returncode == 0
        assert _echo(dcmtk, port, "+tla", "+cf", cert).returncode == 0
        router.wait_count("closed: released", 3)
        # The failed handshake left no association counted open in any worker.
        workers = router.status()["workers"]
        assert isinstance(workers, list)
        assert [w["open_associations"] for w in workers] == [0, 0]
    finally:
        router.stop()
    spooled = sorted((router.spool / "unrouted").glob("*.dcm"))
    assert sorted(_dataset(p) for p in spooled) == sorted(_dataset(f) for f in files)


def test_tls_ca_admits_only_peers_with_a_certificate_from_it(tmp_path: Path,
                                                             dcmtk: Dcmtk) -> None:
    key, cert = _certificate(tmp_path, "router")
    modality_key, modality = _certificate(tmp_path, "modality")
    other_key, other = _certificate(tmp_path, "other")
    router, port = _tls_router(tmp_path, key, cert, ca=modality)
    try:
        assert _echo(dcmtk, port, "+tls", modality_key, modality, "+cf", cert).returncode == 0
        router.wait_count("closed: released", 1)
        handshakes = router.count("TLS handshake with")
        # No certificate, or one the CA file does not vouch for: no association.
        assert _echo(dcmtk, port, "+tla", "+cf", cert).returncode != 0
        assert _echo(dcmtk, port, "+tls", other_key, other, "+cf", cert).returncode != 0
        router.wait_count("TLS handshake with", handshakes + 2)
        assert router.count("closed: released") == 1
    finally:
        router.stop()


def test_the_log_says_how_a_peer_came_and_why_a_handshake_failed(tmp_path: Path,
                                                                 dcmtk: Dcmtk) -> None:
    """A shared TLS port: which modality came in (its certificate's subject) and over
    what; a failed handshake names the port; our certificate about to expire is said
    at start. None of that was logged."""
    key, cert = _certificate(tmp_path, "router")
    modality_key, modality = _certificate(tmp_path, "modality")
    router, port = _tls_router(tmp_path, key, cert, ca=modality)
    try:
        router.wait_for(f"TLS certificate of port {port}: {cert} expires on")
        assert _echo(dcmtk, port, "+tls", modality_key, modality, "+cf", cert).returncode == 0
        router.wait_for("over TLSv1.3 (certificate CN=modality) accepted")
        assert _echo(dcmtk, port, "+tla", "+cf", cert).returncode != 0
        router.wait_for("TLS handshake with 127.0.0.1:")
        line = next(li for li in router.lines if "TLS handshake with" in li)
        assert f"on port {port} failed" in line, line
    finally:
        router.stop()


def test_stalled_handshakes_do_not_fill_max_associations(tmp_path: Path,
                                                         dcmtk: Dcmtk) -> None:
    """Connections that never finish their TLS handshake counted as associations
    until ARTIM: a few of them and a modality was answered "try later"."""
    import socket

    key, cert = _certificate(tmp_path, "router")
    port = free_port()
    router = Router(tmp_path, router_extra="max_associations = 2\n", extra=(
        f'[[router.listen]]\nhost = "127.0.0.1"\nport = {port}\ntls = true\n'
        f'tls_cert = "{cert}"\ntls_key = "{key}"\n'))
    stalled = []
    try:
        router.wait_for("ready: 2 workers serving")
        # Two in each worker, whose share of the limit is one; accepted and handed
        # off in order, they are adopted before the echo is.
        for _ in range(4):
            stalled.append(socket.create_connection(("127.0.0.1", port)))
        assert _echo(dcmtk, port, "+tla", "+cf", cert).returncode == 0
        assert router.count("max_associations") == 0
        # One closed before its handshake; the others end at ARTIM, said so.
        stalled.pop().close()
        router.wait_count("no handshake within ARTIM (2 s)", 3)
        failed = [line for line in router.lines if "TLS handshake with" in line]
        assert len(failed) == 4 and not any(line.endswith("failed: ") for line in failed)
    finally:
        for sock in stalled:
            sock.close()
        router.stop()


def test_failed_handshakes_from_one_address_are_said_a_few_times_then_counted(
        tmp_path: Path) -> None:
    """Plain DICOM at a TLS port in a loop (a modality set up wrong, a scan) was one
    WARNING per connection: 900 of them, and the line a site looks for scrolled away.
    A few per address, then one line with how many more, here said as the router
    stops; another address's first failures are still logged."""
    import socket

    key, cert = _certificate(tmp_path, "router")
    port = free_port()
    router = Router(tmp_path, workers=1, extra=(
        f'[[router.listen]]\nhost = "127.0.0.1"\nport = {port}\ntls = true\n'
        f'tls_cert = "{cert}"\ntls_key = "{key}"\n'))

    def plain(source: str) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10,
                                      source_address=(source, 0)) as sock:
            sock.sendall(b"\x01\x00\x00\x00\x00\x44" + bytes(68))  # a plain RQ's start
            while sock.recv(4096):  # until the router closes it: the failure is handled
                pass

    try:
        router.wait_for("ready: 1 workers serving")
        for _ in range(12):
            plain("127.0.0.1")
        plain("127.0.0.2")
        router.wait_for("TLS handshake with 127.0.0.2:")
    finally:
        assert router.stop() == 0
    failed = [line for line in router.lines if "TLS handshake with 127.0.0.1:" in line]
    assert len(failed) == 5, "\n".join(failed)
    assert router.count(f"7 more failed TLS handshakes on port {port} from 127.0.0.1 "
                        "in the last") == 1, router.log()
    assert router.count("from 127.0.0.2 in the last") == 0


def test_max_associations_holds_for_handshakes_that_end_together(tmp_path: Path) -> None:
    """Counted when the handshake ends, the limit let through every connection that
    finished its handshake while others were still in theirs: four associations at
    once with max_associations = 1 (a review). And stalled handshakes must not fill
    it either."""
    import socket
    import ssl

    from router.dicom.negotiation import build_request
    from router.dicom.pdu import encode_pdu

    key, cert = _certificate(tmp_path, "router")
    port = free_port()
    router = Router(tmp_path, workers=1, router_extra="max_associations = 1\n", extra=(
        f'[[router.listen]]\nhost = "127.0.0.1"\nport = {port}\ntls = true\n'
        f'tls_cert = "{cert}"\ntls_key = "{key}"\n'))
    context = ssl.create_default_context(cafile=str(cert))
    request = encode_pdu(build_request(
        calling_ae_title="MOD1", called_ae_title="ROUTER",
        contexts=[("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])]))

    def associate(sock: socket.socket) -> int:
        """Handshake on ``sock``, send an A-ASSOCIATE-RQ: the answer's PDU type."""
        tls = context.wrap_socket(sock, server_hostname="127.0.0.1")
        opened.append(tls)
        tls.sendall(request)
        return tls.recv(1)[0]

    opened: list[socket.socket] = []
    try:
        router.wait_for("ready: 1 workers serving")
        waiting = [socket.create_connection(("127.0.0.1", port), timeout=10)
                   for _ in range(3)]
        opened += waiting
        assert associate(socket.create_connection(("127.0.0.1", port), timeout=10)) == 0x02
        # The first association stays open: the others, handshaking meanwhile, are
        # over the limit once connected.
        assert [associate(sock) for sock in waiting] == [0x03, 0x03, 0x03]
    finally:
        for sock in opened:
            sock.close()
        router.stop()


def test_a_renewed_certificate_takes_effect_on_reload(tmp_path: Path, dcmtk: Dcmtk) -> None:
    key, cert = _certificate(tmp_path, "router")
    new_key, renewed = _certificate(tmp_path, "renewed")
    router, port = _tls_router(tmp_path, key, cert)
    try:
        assert _echo(dcmtk, port, "+tla", "+cf", cert).returncode == 0
        text = router.config.read_text()
        router.config.write_text(text.replace(str(cert), str(renewed))
                                 .replace(str(key), str(new_key)))
        reload = router.command("reload")
        assert reload.returncode == 0, reload.stderr
        for worker in (1, 2):
            router.wait_for(f"worker {worker}: configuration generation 2 loaded")
        # Peers that trust only the renewed certificate get through; the old one is gone.
        assert _echo(dcmtk, port, "+tla", "+cf", renewed).returncode == 0
        assert _echo(dcmtk, port, "+tla", "+cf", cert).returncode != 0
        assert router.count("change on restart only") == 0
    finally:
        router.stop()


def test_tls_files_are_those_of_the_last_reload_not_of_the_disk(tmp_path: Path,
                                                               dcmtk: Dcmtk) -> None:
    """After a reload the workers read the TLS files at the first TLS connection:
    a certificate copied over the configured one without a reload (or with one
    refused for something else) ended TLS on the port, "no TLS for it:
    KEY_VALUES_MISMATCH"; and a reload that moved the TLS port in the file left its
    socket open with no TLS for it (an outside campaign). The workers now load the
    files with the reload the supervisor checked, and a moved port keeps its socket's
    settings until the restart."""
    key, cert = _certificate(tmp_path, "router")
    _, other = _certificate(tmp_path, "other")
    router, port = _tls_router(tmp_path, key, cert)
    original = cert.read_bytes()
    try:
        assert router.command("reload").returncode == 0  # nothing changed
        for worker in (1, 2):
            router.wait_for(f"worker {worker}: configuration generation 2 loaded")
        cert.write_bytes(other.read_bytes())  # not the key's certificate; no reload
        trusting = tmp_path / "trusted.pem"
        trusting.write_bytes(original)
        for _ in range(4):  # each worker, whichever gets the connection
            done = _echo(dcmtk, port, "+tla", "+cf", trusting)
            assert done.returncode == 0, done.stdout + done.stderr
        cert.write_bytes(original)
        router.config.write_text(router.config.read_text().replace(
            f"port = {port}", f"port = {free_port()}"))
        moved = router.command("reload")
        assert moved.returncode == 0, moved.stderr
        assert "listen addresses changed" in moved.stdout, moved.stdout
        for worker in (1, 2):
            router.wait_for(f"worker {worker}: configuration generation 3 loaded")
        for _ in range(4):
            done = _echo(dcmtk, port, "+tla", "+cf", trusting)
            assert done.returncode == 0, done.stdout + done.stderr
        assert router.count("no TLS for it") == 0
    finally:
        router.stop()


def test_a_key_broken_on_disk_does_not_stop_the_router_when_a_worker_restarts(
        tmp_path: Path, dcmtk: Dcmtk) -> None:
    """A restarted worker read the TLS files again and, on a key no longer matching
    its certificate (a renewal half done), could not start: that stopped the whole
    router, plain port included, with exit 2, which the systemd unit does not restart
    (an outside campaign). The worker now runs what the supervisor checked."""
    import signal

    key, cert = _certificate(tmp_path, "router")
    other_key, _ = _certificate(tmp_path, "other")
    router, _ = _tls_router(tmp_path, key, cert)
    try:
        key.write_bytes(other_key.read_bytes())
        workers = router.status()["workers"]
        assert isinstance(workers, list)
        pid = next(int(w["pid"]) for w in workers if w["worker_id"] == 1)
        os.kill(pid, signal.SIGKILL)
        router.wait_count("worker 1 ready", 2)
        assert _echo(dcmtk, router.port).returncode == 0  # the plain listener serves
        assert router.proc.poll() is None and router.count("stopping the router") == 0
    finally:
        assert router.stop() == 0


def test_a_pinned_self_signed_modality_certificate_admits_it(tmp_path: Path,
                                                             dcmtk: Dcmtk) -> None:
    """tls_ca holding the modality's own self-signed certificate (CA:FALSE), the
    usual way to admit one node, was refused as "no PEM CA certificate", after a
    traceback (an outside campaign)."""
    key, cert = _certificate(tmp_path, "router")
    modality_key, modality = certificate(tmp_path, "modality", san=None)
    router, port = _tls_router(tmp_path, key, cert, ca=modality)
    try:
        assert _echo(dcmtk, port, "+tls", modality_key, modality, "+cf", cert).returncode == 0
    finally:
        router.stop()


def test_tls_files_that_cannot_be_used_stop_start_up_with_one_line(tmp_path: Path) -> None:
    """An encrypted key made start-up ask for its pass phrase on the terminal (and
    hang), a garbage CA file gave a traceback, and a destination's tls_ca was never
    checked: each delivery then failed unseen (an outside campaign)."""
    from router.config import ConfigError, load_config

    key, cert = _certificate(tmp_path, "router")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run([openssl(), "rsa", "-in", str(key), "-aes128", "-passout", "pass:x",
                    "-out", str(encrypted)], check=True, capture_output=True, timeout=60)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    other_key, _ = _certificate(tmp_path, "other")
    crl = revocation_list(tmp_path, certificate(tmp_path, "ca", san=None, ca=True))
    listen = '[[router.listen]]\nport = 11112\ntls = true\ntls_cert = "{}"\ntls_key = "{}"\n'
    destination = ('[[destination]]\nname = "pacs"\nhost = "127.0.0.1"\nport = 104\n'
                   'ae_title = "PACS"\ntls = true\ntls_ca = "{}"\n')
    for text, expected in [
        (listen.format(cert, encrypted), f"tls_key: {encrypted} is encrypted"),
        (listen.format(cert, key) + f'tls_ca = "{garbage}"\n',
         f"tls_ca: {garbage} holds no PEM certificate"),
        (destination.format(garbage), f"tls_ca: {garbage} holds no PEM certificate"),
        (destination.format(tmp_path / "missing.pem"), "tls_ca: cannot read"),
        # No certificate in it (a CRL): it was blamed on tls_key, "None and None".
        (destination.format(crl), f"tls_ca: {crl} holds no PEM certificate"),
        # The router's client certificate, for a destination that requires one.
        (destination.format(cert) + f'tls_cert = "{cert}"\ntls_key = "{encrypted}"\n',
         f"tls_key: {encrypted} is encrypted"),
        (destination.format(cert) + f'tls_cert = "{cert}"\ntls_key = "{other_key}"\n',
         f"tls_key: {cert} and {other_key} are not a PEM certificate and its private key"),
        (destination.format(cert) + f'tls_cert = "{garbage}"\ntls_key = "{key}"\n',
         f"tls_key: {garbage} and {key} are not a PEM certificate and its private key"),
        (destination.format(cert) + f'tls_cert = "{cert}"\ntls_key = "{tmp_path / "k"}"\n',
         "tls_key: cannot read"),
    ]:
        config = tmp_path / "router.toml"
        config.write_text(text)
        with pytest.raises(ConfigError) as raised:
            load_config(config)
        assert expected in str(raised.value) and "\n" not in str(raised.value)
        load_config(config, check_files=False)  # status and queue do not read them
