"""What router/dicom/uids.py calls a standard transfer syntax."""

from __future__ import annotations

import pytest

from router.dicom.uids import is_standard_transfer_syntax


@pytest.mark.parametrize(("uid", "standard"), [
    ("1.2.840.10008.1.2", True),               # Implicit VR Little Endian
    ("1.2.840.10008.1.2.4.50", True),          # JPEG Baseline
    ("1.2.840.10008.1.2.4.201", True),         # HTJ2K
    # Newer than pydicom 3.0's dictionary: JPEG XL, Deflated Image Frame Compression.
    ("1.2.840.10008.1.2.4.110", True),
    ("1.2.840.10008.1.2.8.1", True),
    ("1.2.840.10008.1.20.1", False),           # Storage Commitment, not a syntax
    ("1.2.840.10008.1.2..1", False),
    ("1.2.840.113619.5.2", False),             # GE's private implicit big endian
    ("1.2.3.4.5", False),
])
def test_standard_transfer_syntaxes(uid: str, standard: bool) -> None:
    assert is_standard_transfer_syntax(uid) is standard
