"""Well-known UIDs and transfer syntax properties (PS3.5 Annex A, PS3.6 Annex A).

Theory of operation
-------------------
The engine never decodes pixel data, so all it needs to know about a transfer
syntax is how the *dataset* around the pixel data is encoded (PS3.5 §10):

- the four native syntaxes (plus the retired Papyrus 3 one) say it outright;
- every other transfer syntax -- JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE, MPEG,
  HEVC, encapsulated uncompressed, deflated image frames, SMPTE 2110, private
  and unknown UIDs -- uses explicit VR little endian with the pixel data
  encapsulated (PS3.5 §A.4): we treat it as such and pass the fragments on as
  they are;
- "deflated" syntaxes (PS3.5 §A.5, and the JPIP referenced deflate ones of
  §A.7) deflate the whole explicit VR little endian dataset.

Storage SOP classes come from pydicom's UID dictionary, so a newer pydicom
brings newer SOP classes with it.
"""

from __future__ import annotations

import functools
import re
from typing import Final

__all__ = [
    "DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN",
    "ENCAPSULATED_UNCOMPRESSED_EXPLICIT_VR_LITTLE_ENDIAN",
    "EXPLICIT_VR_BIG_ENDIAN",
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "IMPLICIT_VR_LITTLE_ENDIAN",
    "JPIP_HTJ2K_REFERENCED_DEFLATE",
    "JPIP_REFERENCED_DEFLATE",
    "MODALITY_PERFORMED_PROCEDURE_STEP",
    "MODALITY_PERFORMED_PROCEDURE_STEP_NOTIFICATION",
    "MODALITY_PERFORMED_PROCEDURE_STEP_RETRIEVE",
    "MODALITY_WORKLIST_INFORMATION_FIND",
    "PAPYRUS_3_IMPLICIT_VR_LITTLE_ENDIAN",
    "PATIENT_ROOT_QR_FIND",
    "PATIENT_ROOT_QR_GET",
    "PATIENT_ROOT_QR_MOVE",
    "STORAGE_COMMITMENT_PUSH_MODEL",
    "STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE",
    "STUDY_ROOT_QR_FIND",
    "STUDY_ROOT_QR_GET",
    "STUDY_ROOT_QR_MOVE",
    "UNCOMPRESSED_TRANSFER_SYNTAXES",
    "VERIFICATION_SOP_CLASS",
    "is_deflated",
    "is_encapsulated",
    "is_implicit_vr",
    "is_little_endian",
    "is_uncompressed",
    "is_valid_uid",
    "storage_sop_classes",
    "uid_keywords",
]

# --- This implementation (PS3.7 Annex D.3.3.2) ------------------------------
# NOTE: 1.2.826.0.1.3680043.10 is a shared "free" root; replace it with a root
# registered to the organisation that ships the router before production use.
IMPLEMENTATION_CLASS_UID: Final = "1.2.826.0.1.3680043.10.1442.1.0"
IMPLEMENTATION_VERSION_NAME: Final = "DICOMROUTER_010"  # 1-16 chars, PS3.7 D.3.3.2

# --- SOP classes (PS3.4; UIDs from PS3.6 Annex A) ---------------------------
VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"  # PS3.4 Annex A

# Query/Retrieve, PS3.4 Annex C.6 (Patient Root, Study Root information models)
PATIENT_ROOT_QR_FIND: Final = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_QR_MOVE: Final = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_QR_GET: Final = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_QR_FIND: Final = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_QR_MOVE: Final = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_QR_GET: Final = "1.2.840.10008.5.1.4.1.2.2.3"
# Basic Worklist Management, PS3.4 Annex K.6.1
MODALITY_WORKLIST_INFORMATION_FIND: Final = "1.2.840.10008.5.1.4.31"
# Modality Performed Procedure Step, PS3.4 Annex F.7 / F.8 / F.9
MODALITY_PERFORMED_PROCEDURE_STEP: Final = "1.2.840.10008.3.1.2.3.3"
MODALITY_PERFORMED_PROCEDURE_STEP_RETRIEVE: Final = "1.2.840.10008.3.1.2.3.4"
MODALITY_PERFORMED_PROCEDURE_STEP_NOTIFICATION: Final = "1.2.840.10008.3.1.2.3.5"
# Storage Commitment Push Model, PS3.4 Annex J.3; the SOP instance is well known.
STORAGE_COMMITMENT_PUSH_MODEL: Final = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE: Final = "1.2.840.10008.1.20.1.1"

# --- Transfer syntaxes (PS3.5 §10 and Annex A) ------------------------------
IMPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2"  # PS3.5 §A.1
EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1"  # PS3.5 §A.2
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1.99"  # PS3.5 §A.5
EXPLICIT_VR_BIG_ENDIAN: Final = "1.2.840.10008.1.2.2"  # PS3.5 §A.3 (retired)
ENCAPSULATED_UNCOMPRESSED_EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1.98"
# Retired, but implicit VR LE like §A.1 -- it is not encapsulated.
PAPYRUS_3_IMPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.20"
# PS3.5 §A.7: the dataset is deflated as in §A.5, the pixel data is referenced.
JPIP_REFERENCED_DEFLATE: Final = "1.2.840.10008.1.2.4.95"
JPIP_HTJ2K_REFERENCED_DEFLATE: Final = "1.2.840.10008.1.2.4.205"

#: The native (non-encapsulated) transfer syntaxes we propose and accept,
#: preferred first.
UNCOMPRESSED_TRANSFER_SYNTAXES: Final[tuple[str, ...]] = (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
)

_NATIVE: Final = frozenset((*UNCOMPRESSED_TRANSFER_SYNTAXES, PAPYRUS_3_IMPLICIT_VR_LITTLE_ENDIAN))
_IMPLICIT: Final = frozenset((IMPLICIT_VR_LITTLE_ENDIAN, PAPYRUS_3_IMPLICIT_VR_LITTLE_ENDIAN))
_DEFLATED: Final = frozenset(
    (DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, JPIP_REFERENCED_DEFLATE, JPIP_HTJ2K_REFERENCED_DEFLATE)
)

# PS3.5 §9.1: digits and dots, at most 64 characters. Deliberately lenient about
# leading zeros in components: real devices send them and we must not refuse.
_UID_RE: Final = re.compile(r"[0-9.]{1,64}")


def _registry_uids() -> frozenset[str]:
    from pydicom._uid_dict import UID_dictionary

    return frozenset(uid for uid in UID_dictionary if _UID_RE.fullmatch(uid))


# Every UID of the DICOM registry (PS3.6 Annex A), all valid by construction.
_KNOWN_VALID: Final = _registry_uids()


def _registry_transfer_syntaxes() -> frozenset[str]:
    from pydicom._uid_dict import UID_dictionary

    return frozenset(uid for uid, (_, kind, *_) in UID_dictionary.items()
                     if kind == "Transfer Syntax")


# The transfer syntaxes of the standard (PS3.6 Annex A, retired ones included).
_TRANSFER_SYNTAXES: Final = _registry_transfer_syntaxes()


@functools.cache
def uid_keywords() -> dict[str, tuple[str, str]]:
    """pydicom keyword -> (UID, UID type), e.g. "CTImageStorage" -> (..., "SOP Class"):
    for messages that say which UID a keyword written in a file meant."""
    from pydicom._uid_dict import UID_dictionary

    return {entry[4]: (uid, entry[1]) for uid, entry in UID_dictionary.items() if entry[4]}


def is_standard_transfer_syntax(uid: str) -> bool:
    """True for a transfer syntax of the DICOM standard (PS3.5 Annex A), as opposed
    to a private or unknown UID. The standard gives every one of them a UID under
    1.2.840.10008.1.2 (PS3.6 Annex A), newer ones than pydicom's dictionary knows
    included (JPEG XL, 1.2.840.10008.1.2.4.110-112, say): all Explicit VR Little
    Endian but the four native ones the router knows by name."""
    return uid in _TRANSFER_SYNTAXES or (
        uid.startswith(_TRANSFER_SYNTAX_ROOT) and is_plain_uid(uid))


_TRANSFER_SYNTAX_ROOT: Final = "1.2.840.10008.1.2."


_PLAIN_UID_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def is_plain_uid(uid: str) -> bool:
    """True if ``uid`` is a UID by the letter of PS3.5 §9.1 (digit components, none
    empty, at most 64 characters): safe to name a file with ("..", "." are not)."""
    return len(uid) <= 64 and _PLAIN_UID_RE.fullmatch(uid) is not None


def is_valid_uid(uid: str) -> bool:
    """True if ``uid`` has the UID character repertoire and length, PS3.5 §9.1."""
    if uid in _KNOWN_VALID:  # SOP class and transfer syntax UIDs recur in every message
        return True
    return _UID_RE.fullmatch(uid) is not None


def is_uncompressed(transfer_syntax: str) -> bool:
    """True for native transfer syntaxes: pixel data, if any, is not encapsulated."""
    return transfer_syntax in _NATIVE


def is_encapsulated(transfer_syntax: str) -> bool:
    """True when pixel data is encapsulated (PS3.5 §A.4).

    That is every transfer syntax but the native ones -- unknown and private
    UIDs included, which we treat as encapsulated explicit VR little endian.
    """
    return transfer_syntax not in _NATIVE


def is_implicit_vr(transfer_syntax: str) -> bool:
    """True if the dataset is encoded with implicit VR (PS3.5 §A.1)."""
    return transfer_syntax in _IMPLICIT


def is_little_endian(transfer_syntax: str) -> bool:
    """True unless the transfer syntax is explicit VR big endian (PS3.5 §A.3)."""
    return transfer_syntax != EXPLICIT_VR_BIG_ENDIAN


def is_deflated(transfer_syntax: str) -> bool:
    """True if the whole dataset is deflated (PS3.5 §A.5, §A.7)."""
    return transfer_syntax in _DEFLATED


# "X Storage", "X Storage - For Presentation", "X Storage - Trial", ... but not
# "Storage Commitment ..." nor print management's "... Storage SOP Class".
_STORAGE_NAME_RE: Final = re.compile(r".+ Storage(?: - .+)?")
# Named like storage but never sent with C-STORE: the DICOMDIR (PS3.10 §7.2).
_NOT_STORAGE: Final = frozenset(("1.2.840.10008.1.3.10",))


@functools.cache
def storage_sop_classes() -> tuple[str, ...]:
    """Every Storage SOP class UID pydicom knows, retired ones included.

    PS3.4 Annex B.5 lists them; old modalities still send the retired ones
    (e.g. Ultrasound Image Storage 1.2.840.10008.5.1.4.1.1.6), so a router
    must accept them too. Sorted by UID for a stable proposal order.
    """
    from pydicom._uid_dict import UID_dictionary

    found = []
    for uid, entry in UID_dictionary.items():
        name, uid_type = entry[0], entry[1]
        if uid_type != "SOP Class" or uid in _NOT_STORAGE:
            continue
        if _STORAGE_NAME_RE.fullmatch(name):
            found.append(uid)
    return tuple(sorted(found, key=lambda u: tuple(int(c) for c in u.split("."))))
