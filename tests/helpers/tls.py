"""Certificates for TLS tests, made by the openssl tool (scripts/setup --system
installs it; under CI its absence fails the test, elsewhere it skips)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["certificate", "issued", "openssl", "revocation_list"]


def openssl() -> str:
    """The openssl tool's path."""
    found = shutil.which("openssl")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl missing under CI (scripts/setup --system installs it)")
        pytest.skip("openssl not installed")
    return found


def certificate(folder: Path, name: str, *, san: str | None = "IP:127.0.0.1",
                ca: bool = False, days: int = 2) -> tuple[Path, Path]:
    """A self-signed certificate with subject CN=``name`` and its key: (key,
    certificate), valid from now for ``days``. ``san`` is its subjectAltName (None:
    none, the CN alone names it); ``ca`` makes it a CA that :func:`issued` can sign
    with."""
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    extensions = ["-addext", f"subjectAltName={san}"] if san else []
    extensions += ["-addext", f"basicConstraints=critical,CA:{'TRUE' if ca else 'FALSE'}"]
    if ca:
        extensions += ["-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    subprocess.run([openssl(), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", str(days), "-subj", f"/CN={name}",
                    *extensions], check=True, capture_output=True, timeout=60)
    return key, cert


def issued(folder: Path, name: str, authority: tuple[Path, Path], *,
           san: str = "IP:127.0.0.1") -> tuple[Path, Path]:
    """A certificate for CN=``name`` signed by ``authority`` (key, certificate as
    :func:`certificate` returns them with ``ca=True``), and its key."""
    key, cert, request = folder / f"{name}.key", folder / f"{name}.pem", folder / f"{name}.csr"
    subprocess.run([openssl(), "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(request), "-subj", f"/CN={name}"],
                   check=True, capture_output=True, timeout=60)
    extensions = folder / f"{name}.ext"
    extensions.write_text(f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n")
    subprocess.run([openssl(), "x509", "-req", "-in", str(request), "-CA", str(authority[1]),
                    "-CAkey", str(authority[0]), "-CAcreateserial", "-out", str(cert),
                    "-days", "2", "-extfile", str(extensions)],
                   check=True, capture_output=True, timeout=60)
    return key, cert


def revocation_list(folder: Path, authority: tuple[Path, Path]) -> Path:
    """An empty CRL that ``authority`` (a CA from :func:`certificate`) signed: a PEM
    file with no certificate in it."""
    work = folder / "crl-ca"
    work.mkdir(exist_ok=True)
    (work / "index.txt").write_text("")
    (work / "crlnumber").write_text("01\n")
    config = work / "ca.cnf"
    config.write_text(f"[ca]\ndefault_ca = here\n[here]\ndatabase = {work / 'index.txt'}\n"
                      f"crlnumber = {work / 'crlnumber'}\ndefault_md = sha256\n"
                      "default_crl_days = 2\n")
    crl = folder / "crl.pem"
    subprocess.run([openssl(), "ca", "-gencrl", "-keyfile", str(authority[0]), "-cert",
                    str(authority[1]), "-out", str(crl), "-config", str(config)],
                   check=True, capture_output=True, timeout=60)
    return crl
