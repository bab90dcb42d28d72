"""router/tls.py: what the router says of its own certificates."""

from __future__ import annotations

import time
from pathlib import Path

from router.tls import expiry_problem
from tests.helpers.tls import certificate


def test_expiry_is_said_before_and_after_it_comes(tmp_path: Path) -> None:
    """OpenSSL loads an expired certificate of our own without a word; the peers then
    refuse every handshake, and the log said nothing of why."""
    _, cert = certificate(tmp_path, "router")  # valid for 2 days from now
    soon = expiry_problem(cert)
    assert soon is not None and "expires on" in soon and "renew it" in soon
    expired = expiry_problem(cert, now=time.time() + 3 * 86400)
    assert expired is not None and "expired on" in expired and "peers will refuse" in expired
    early = expiry_problem(cert, now=time.time() - 86400)
    assert early is not None and "is not valid before" in early
    _, lasting = certificate(tmp_path, "lasting", days=365)
    assert expiry_problem(lasting) is None
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert expiry_problem(garbage) is None  # the configuration check says that one
    assert expiry_problem(tmp_path / "missing.pem") is None
