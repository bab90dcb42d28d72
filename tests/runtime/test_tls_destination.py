"""DICOM over TLS out of the router (PS3.15 Annex B): destinations with ``tls = true``
that require a client certificate (mutual TLS), that the router reaches by an
address their certificate does not name, or whose certificate is pinned; against
DCMTK's storescp with its TLS options and Orthanc with DICOM TLS enabled."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.dicom.dataset import read_part10_header
from tests.helpers import Procs, make_ct
from tests.helpers.dcmtk import Dcmtk, received_files, storescp_server
from tests.helpers.orthanc import Orthanc, start_orthanc
from tests.helpers.router import Router
from tests.helpers.tls import certificate, issued

pytestmark = pytest.mark.interop


def _destination(name: str, port: int, aet: str, **tls: str | bool) -> str:
    settings = "".join(f'{key} = {str(v).lower() if isinstance(v, bool) else f"{v!r}"}\n'
                       .replace("'", '"') for key, v in tls.items())
    return (f'[[destination]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {port}\n'
            f'ae_title = "{aet}"\nidle = 1\ntimeout = 10\nconcurrency = 1\ntls = true\n'
            + settings)


def _router(tmp_path: Path, destinations: list[str], names: list[str]) -> Router:
    forward = ", ".join(f'"{n}"' for n in names)
    (tmp_path / "rules.toml").write_text(
        f'[[rule]]\nname = "all"\n[rule.then]\nforward = [{forward}]\n')
    router = Router(tmp_path, extra='[routing]\nrules = "rules.toml"\n' + "".join(destinations))
    router.wait_for("ready: 2 workers serving")
    return router


def _study(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    files = [folder / f"{i}.dcm" for i in range(count)]
    for i, path in enumerate(files):
        make_ct(path, size_kb=300, seed=40 + i)
    return files


def _send(dcmtk: Dcmtk, router: Router, files: list[Path]) -> None:
    done = dcmtk.run("storescu", "-aet", "MOD1", "-aec", "ROUTER", "127.0.0.1",
                     str(router.port), *map(str, files))
    assert done.returncode == 0, done.stdout + done.stderr


def _datasets(paths: list[Path]) -> list[bytes]:
    return sorted(p.read_bytes()[read_part10_header(p).dataset_offset:] for p in paths)


def _queued(router: Router, name: str) -> int:
    return len(list((router.spool / "queue" / name).glob("*.dcm")))


def test_a_destination_that_requires_a_client_certificate_gets_ours(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """storescp +tls with +cf and its default --require-peer-cert: the destination
    with tls_cert and tls_key is served; without them the handshake fails, the log
    says so, and the instances stay queued."""
    router_key, router_cert = certificate(tmp_path, "router")
    pacs_key, pacs_cert = certificate(tmp_path, "pacs")
    sink = storescp_server(tmp_path, procs, aet="SECURE", dcmtk=dcmtk, args=[
        "+B", "+tls", str(pacs_key), str(pacs_cert), "+cf", str(router_cert)])
    router = _router(tmp_path, [
        _destination("mutual", sink.port, "SECURE", tls_ca=str(pacs_cert),
                     tls_cert=str(router_cert), tls_key=str(router_key)),
        _destination("anonymous", sink.port, "SECURE", tls_ca=str(pacs_cert)),
    ], ["mutual", "anonymous"])
    files = _study(tmp_path / "study", 3)
    try:
        _send(dcmtk, router, files)
        router.wait_count("forward mutual:", 3)
        router.wait_for("anonymous (SECURE@127.0.0.1")
        assert router.count("requires a client certificate: set tls_cert and tls_key") >= 1
    finally:
        router.stop()
    assert _datasets(received_files(sink.outdir)) == _datasets(files)  # once each
    assert _queued(router, "anonymous") == 3 and _queued(router, "mutual") == 0
    # `dicom-router echo --destination` tests a destination as the router reaches it.
    good = router.command("echo", "--destination", "mutual")
    assert good.returncode == 0 and "C-ECHO mutual (SECURE@127.0.0.1" in good.stdout, good
    assert "status 0x0000" in good.stdout
    bad = router.command("echo", "--destination", "anonymous")
    assert bad.returncode == 3, bad
    assert "requires a client certificate: set tls_cert and tls_key" in bad.stderr, bad
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    unknown = router.command("echo", "--destination", "nosuch")
    assert unknown.returncode == 2 and "known: mutual, anonymous" in unknown.stderr, unknown


def test_server_name_and_pinned_certificates(tmp_path: Path, procs: Procs,
                                             dcmtk: Dcmtk) -> None:
    """A PACS reached by IP address whose certificate names it by DNS name
    (tls_server_name), a PACS whose own certificate is pinned although its CA is not
    given (a partial chain), and one whose certificate names no host at all
    (tls_check_hostname = false): each served; the same certificates checked
    against the address alone are refused."""
    authority = certificate(tmp_path, "hospital-ca", san=None, ca=True)
    named_key, named = issued(tmp_path, "pacs", authority, san="DNS:pacs.example.org")
    bare_key, bare = certificate(tmp_path, "OLD-PACS", san=None)  # CN only, no SAN
    by_name = storescp_server(tmp_path, procs, aet="NAMED", dcmtk=dcmtk, args=[
        "+B", "+tls", str(named_key), str(named), "-ic"])
    by_pin = storescp_server(tmp_path, procs, aet="BARE", dcmtk=dcmtk, args=[
        "+B", "+tls", str(bare_key), str(bare), "-ic"])
    ca = str(authority[1])
    router = _router(tmp_path, [
        _destination("by-name", by_name.port, "NAMED", tls_ca=ca,
                     tls_server_name="pacs.example.org"),
        _destination("leaf-pinned", by_name.port, "NAMED", tls_ca=str(named),
                     tls_server_name="pacs.example.org"),
        _destination("by-address", by_name.port, "NAMED", tls_ca=ca),
        _destination("pinned", by_pin.port, "BARE", tls_ca=str(bare),
                     tls_check_hostname=False),
        _destination("pinned-checked", by_pin.port, "BARE", tls_ca=str(bare)),
    ], ["by-name", "leaf-pinned", "by-address", "pinned", "pinned-checked"])
    files = _study(tmp_path / "study", 2)
    try:
        _send(dcmtk, router, files)
        for name in ("by-name", "leaf-pinned", "pinned"):
            router.wait_count(f"forward {name}:", 2)
        router.wait_for("by-address (NAMED@127.0.0.1")
        router.wait_for("pinned-checked (BARE@127.0.0.1")
        log = router.log()
    finally:
        router.stop()
    assert "IP address mismatch" in log
    # storescp -uf names files by SOP Instance UID: the second copy overwrote the first.
    assert _datasets(received_files(by_name.outdir)) == _datasets(files)
    assert _datasets(received_files(by_pin.outdir)) == _datasets(files)
    assert _queued(router, "by-address") == 2 and _queued(router, "pinned-checked") == 2
    for name in ("by-name", "leaf-pinned", "pinned"):
        assert _queued(router, name) == 0


def test_orthanc_with_dicom_tls_requiring_our_certificate(tmp_path: Path, procs: Procs,
                                                          orthanc: str, dcmtk: Dcmtk) -> None:
    """Orthanc as a PACS that takes DICOM over TLS only from certificates it trusts
    (DicomTlsRemoteCertificateRequired): the router's stored instances reach it."""
    router_key, router_cert = certificate(tmp_path, "router")
    pacs_key, pacs_cert = certificate(tmp_path, "orthanc")
    server: Orthanc = start_orthanc(procs, tmp_path / "orthanc", aet="SECUREPACS",
                                    binary=orthanc, config={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pacs_cert),
        "DicomTlsPrivateKey": str(pacs_key),
        "DicomTlsTrustedCertificates": str(router_cert),
        "DicomTlsRemoteCertificateRequired": True,
    })
    try:
        router = _router(tmp_path, [
            _destination("pacs", server.dicom_port, "SECUREPACS", tls_ca=str(pacs_cert),
                         tls_cert=str(router_cert), tls_key=str(router_key))], ["pacs"])
        files = _study(tmp_path / "study", 3)
        try:
            _send(dcmtk, router, files)
            router.wait_count("forward pacs:", 3)
        finally:
            router.stop()
        uids = {read_part10_header(p).sop_instance_uid for p in files}
        assert server.sop_instance_uids() == uids
    finally:
        server.kill()


def test_a_reload_that_turns_tls_on_sends_nothing_more_in_plain_text(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """A reload that moved a destination to its TLS port left the open association
    in use: under steady traffic every later instance went out in plain text to the
    old port (an outside campaign). An association opened with other connection
    settings is now released, idle or busy."""
    key, cert = certificate(tmp_path, "pacs")
    plain = storescp_server(tmp_path, procs, aet="PACS", dcmtk=dcmtk, args=["+B"])
    secure = storescp_server(tmp_path, procs, aet="PACS", dcmtk=dcmtk, args=[
        "+B", "+tls", str(key), str(cert), "-ic"])
    before = ('[[destination]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {}\n'
              'ae_title = "PACS"\nidle = 60\ntimeout = 10\nconcurrency = 1\n')
    (tmp_path / "rules.toml").write_text(
        '[[rule]]\nname = "all"\n[rule.then]\nforward = ["pacs"]\n')
    router = Router(tmp_path, workers=1, extra='[routing]\nrules = "rules.toml"\n'
                    + before.format(plain.port))
    files = _study(tmp_path / "study", 2)
    try:
        router.wait_for("ready: 1 workers serving")
        _send(dcmtk, router, files[:1])
        router.wait_count("forward pacs:", 1)  # its association stays open (idle = 60)
        router.write_config(workers=1, extra='[routing]\nrules = "rules.toml"\n'
                            + before.format(secure.port) + f'tls = true\ntls_ca = "{cert}"\n')
        assert router.command("reload").returncode == 0
        router.wait_for("configuration generation 2 loaded")
        _send(dcmtk, router, files[1:])
        router.wait_count("forward pacs:", 2)
    finally:
        router.stop()
    assert _datasets(received_files(plain.outdir)) == _datasets(files[:1])
    assert _datasets(received_files(secure.outdir)) == _datasets(files[1:])


def test_a_node_on_a_profile_the_router_does_not_speak_is_said_so(
        tmp_path: Path, procs: Procs, dcmtk: Dcmtk) -> None:
    """storescp on PS3.15's retired AES profile (TLS_RSA_WITH_AES_128_CBC_SHA, which
    BCP 195 excludes): the log said to set a client certificate, which was set."""
    router_key, router_cert = certificate(tmp_path, "router")
    key, cert = certificate(tmp_path, "pacs")
    old = storescp_server(tmp_path, procs, aet="OLD", dcmtk=dcmtk, args=[
        "+tls", str(key), str(cert), "+pa", "-ic"])
    router = _router(tmp_path, [_destination("old", old.port, "OLD", tls_ca=str(cert),
                                             tls_cert=str(router_cert),
                                             tls_key=str(router_key))], ["old"])
    try:
        _send(dcmtk, router, _study(tmp_path / "study", 1))
        router.wait_for("destination old (OLD@127.0.0.1")
        line = next(li for li in router.lines if "destination old (OLD@" in li)
    finally:
        router.stop()
    assert "no TLS version or cipher suite in common" in line, line
    assert "client certificate" not in line, line
    assert _queued(router, "old") == 1
