"""Storage Commitment records (workers/nservices.py) on disk."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from workers.nservices import (
    COMMITMENT_KEEP,
    COMMITMENTS_DIR,
    remember_commitment,
    requestor_of,
    sweep_commitments,
)

IMPLICIT = pydicom.uid.ImplicitVRLittleEndian


def _action(uid: str) -> bytes:
    """An N-ACTION data set (PS3.4 J.3.2.1) with Transaction UID ``uid``."""
    ds = Dataset()
    ds.TransactionUID = uid
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, True
    write_dataset(out, ds)
    return out.getvalue()


def test_requests_never_answered_are_forgotten_after_the_keep_time(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A PACS that never sends the result left one record per N-ACTION for good."""
    old, young = "1.2.3.1", "1.2.3.2"
    for uid in (old, young):
        assert remember_commitment(tmp_path, _action(uid), IMPLICIT, "MOD1") == uid
    folder = tmp_path / COMMITMENTS_DIR
    cut_short = folder / ".1.2.3.3.tmp"  # a write the process died in
    cut_short.write_text("{")
    now = time.time()
    for path in (folder / f"{old}.json", cut_short):
        os.utime(path, (now - COMMITMENT_KEEP - 60, now - COMMITMENT_KEEP - 60))
    with caplog.at_level(logging.WARNING, logger="workers.nservices"):
        assert sweep_commitments(tmp_path, now) == 1
    assert sorted(p.name for p in folder.iterdir()) == [f"{young}.json"]
    assert requestor_of(tmp_path, _action(old), IMPLICIT) == (old, None)
    assert requestor_of(tmp_path, _action(young), IMPLICIT) == (young, "MOD1")
    assert [r.getMessage() for r in caplog.records] == [
        "storage commitment: 1 request(s) without a result after 30 days forgotten (their "
        "requestors never heard; a later result is refused)"]
    assert sweep_commitments(tmp_path, now) == 0  # nothing more to do
    assert sweep_commitments(tmp_path / "none", now) == 0  # no folder yet: nothing either
