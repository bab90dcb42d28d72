"""TLS contexts for DICOM listeners and destinations (PS3.15 Annex B, Secure Transport
Connection Profiles; the BCP 195 profile that DCMTK proposes by default).

A listener with ``tls = true`` presents ``tls_cert`` (a PEM chain, ours first) with
``tls_key``; with ``tls_ca`` set it also asks every peer for a certificate and
accepts only one that chains to those CAs (mutual authentication, as PS3.15's
profiles foresee for node authentication). TLS 1.2 is the floor (BCP 195).

A destination with ``tls = true`` checks the node's certificate against ``tls_ca``
(else the system's trust store) and its host name, or ``tls_server_name`` when the
router reaches it by an address its certificate does not name; with ``tls_cert``
and ``tls_key`` it presents a certificate of its own, for a node that requires one.

The configuration check builds the context once, so that a missing file, a key
that does not match its certificate or a CA file without certificates stops
start-up (or a reload) with one line, not the first TLS association.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path

__all__ = ["EXPIRY_WARNING_DAYS", "EncryptedKeyError", "client_context", "expiry_problem",
           "require_peer_certificates", "server_context"]

# A certificate that expires sooner than this is said at start and on each reload.
EXPIRY_WARNING_DAYS = 30


class EncryptedKeyError(ValueError):
    """The private key is encrypted: nobody is there to give its pass phrase."""


def _no_pass_phrase() -> bytes:
    # Without a callback OpenSSL asks for it on the terminal: start-up hung there.
    raise EncryptedKeyError("the private key is encrypted")


def server_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """A server-side context for one listener; ``OSError``/``ssl.SSLError`` on a
    file that cannot be read or used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=cert, keyfile=key, password=_no_pass_phrase)
    if ca is not None:
        require_peer_certificates(context, ca)
    return context


def require_peer_certificates(context: ssl.SSLContext, ca: Path) -> None:
    """Make ``context`` admit only peers with a certificate from the CAs in ``ca``."""
    context.load_verify_locations(cafile=ca)
    _require_loaded(context, ca)
    context.verify_mode = ssl.CERT_REQUIRED


def _require_loaded(context: ssl.SSLContext, ca: Path) -> None:
    """SSLError unless loading ``ca`` into ``context`` gave it a certificate."""
    # Any certificate, not only CA ones: a node's self-signed certificate, pinned,
    # is a common way to trust it (OpenSSL accepts it as a trust anchor).
    if not context.cert_store_stats()["x509"]:
        raise ssl.SSLError(f"{ca}: no certificate in it")


def client_context(*, ca: Path | None = None, cert: Path | None = None,
                   key: Path | None = None, check_hostname: bool = True) -> ssl.SSLContext:
    """A client-side context for one destination; ``OSError``/``ssl.SSLError`` (or
    :class:`EncryptedKeyError`) on a file that cannot be read or used.

    ``ca`` replaces the system's trust store. Any certificate in it is a trust
    anchor, a server's own one too: pinning the PACS's certificate is how many
    sites trust a node whose CA they do not run (OpenSSL's partial chains)."""
    context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        _require_loaded(context, ca)
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    # Verification stays on without a host name to check: tls_ca then decides alone.
    context.check_hostname = check_hostname
    if cert is not None and key is not None:
        context.load_cert_chain(certfile=cert, keyfile=key, password=_no_pass_phrase)
    return context


def expiry_problem(cert: Path, now: float | None = None) -> str | None:
    """What is wrong with the validity of the first certificate in ``cert`` (expired,
    not valid yet, expiring within :data:`EXPIRY_WARNING_DAYS`), or None.

    OpenSSL loads an expired certificate of our own without a word, and the peers
    then refuse every handshake: the router says it at start instead. The standard
    library reads a certificate file only through this private helper of CPython's
    (stable since Python 3.3); without it nothing is said."""
    try:
        decoded = ssl._ssl._test_decode_cert(str(cert))  # type: ignore[attr-defined]
        not_before = ssl.cert_time_to_seconds(decoded["notBefore"])
        not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
    except (AttributeError, OSError, ValueError, KeyError, TypeError):
        return None
    now = time.time() if now is None else now
    when = time.strftime("%Y-%m-%d", time.gmtime(not_after))
    if now >= not_after:
        return f"{cert} expired on {when}: peers will refuse it"
    if now < not_before:
        return (f"{cert} is not valid before "
                f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(not_before))} UTC: peers will "
                "refuse it until then")
    days = (not_after - now) / 86400
    if days < EXPIRY_WARNING_DAYS:
        left = f"in {days:.0f} day(s)" if days >= 1 else "within a day"
        return f"{cert} expires on {when}, {left}: renew it"
    return None
