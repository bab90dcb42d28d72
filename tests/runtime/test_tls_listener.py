"""DICOM over TLS into the router (PS3.15 Annex B): DCMTK's echoscu and storescu with
their TLS options, against a listener with ``tls = true``; certificates made by the
openssl tool for each test."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from router.dicom.dataset import read_part10_header
from tests.helpers.data import make_ct
from tests.helpers.dcmtk import Dcmtk
from tests.helpers.net import free_port
from tests.helpers.router import Router

pytestmark = pytest.mark.interop


def _openssl() -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl missing under CI (scripts/setup --system installs it)")
        pytest.skip("openssl not installed")
    return openssl


def _certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key: (key, certificate)."""
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run([_openssl(), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return key, cert


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
