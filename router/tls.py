"""TLS contexts for DICOM listeners (PS3.15 Annex B, Secure Transport Connection
Profiles; the BCP 195 profile that DCMTK proposes by default).

A listener with ``tls = true`` presents ``tls_cert`` (a PEM chain, ours first) with
``tls_key``; with ``tls_ca`` set it also asks every peer for a certificate and
accepts only one that chains to those CAs (mutual authentication, as PS3.15's
profiles foresee for node authentication). TLS 1.2 is the floor (BCP 195).

The configuration check builds the context once, so that a missing file, a key
that does not match its certificate or a CA file without certificates stops
start-up (or a reload) with one line, not the first TLS association.
"""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["require_peer_certificates", "server_context"]


def server_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """A server-side context for one listener; ``OSError``/``ssl.SSLError`` on a
    file that cannot be read or used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=cert, keyfile=key)
    if ca is not None:
        require_peer_certificates(context, ca)
    return context


def require_peer_certificates(context: ssl.SSLContext, ca: Path) -> None:
    """Make ``context`` admit only peers with a certificate from the CAs in ``ca``."""
    context.load_verify_locations(cafile=ca)
    if not context.get_ca_certs():
        raise ssl.SSLError(f"{ca}: no CA certificate in it")
    context.verify_mode = ssl.CERT_REQUIRED
