"""Fixtures for the deployment files' tests: the tools that check them.

``systemd_analyze``, ``kubectl`` and ``haproxy`` are paths of the binaries. Like DCMTK
and Orthanc (tests/helpers/dcmtk.py), a missing one skips the test with the reason, and
fails it under CI (``CI=true``), where ``scripts/setup --system`` installs them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.dcmtk import missing, which_binary

#: The repository's deploy/ folder (DESIGN.md D8).
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _require(name: str, *also: str) -> str:
    """Path of binary ``name`` (PATH, then the given absolute paths), or skip/fail."""
    path = which_binary(name)
    for candidate in also:
        if path is None and os.access(candidate, os.X_OK):
            path = candidate
    if path is None:
        missing(name)
    return path


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    return _require("systemd-analyze")


@pytest.fixture(scope="session")
def kubectl() -> str:
    return _require("kubectl")


@pytest.fixture(scope="session")
def haproxy() -> str:
    # Debian installs it in /usr/sbin, which a non-root PATH may lack.
    return _require("haproxy", "/usr/sbin/haproxy")
