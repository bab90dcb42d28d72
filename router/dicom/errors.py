"""The one error hierarchy of the DICOM engine.

Everything the engine raises on purpose is a :class:`ProtocolError`; any other
exception escaping ``router.dicom`` is a bug. The split follows h11:

- :class:`LocalProtocolError`: *we* asked for something the protocol does not
  allow in the current state (a local primitive that is invalid in this state,
  a message too large to encode, ...). The association may still be usable.
- :class:`RemoteProtocolError`: the *peer* sent something invalid. It carries
  the A-ABORT source and reason (PS3.8 §9.3.8, Table 9-26) that the engine
  sends when it aborts because of it.
- :class:`PDUDecodeError`: a malformed PDU; names the field and the byte offset
  (from the start of the PDU) where decoding failed.
- :class:`DIMSEError`: a malformed or unusable DIMSE message; carries the DIMSE
  status (PS3.7 Annex C) the service should answer with.
"""

from __future__ import annotations

import enum

__all__ = [
    "AbortReason",
    "AbortSource",
    "DIMSEError",
    "LocalProtocolError",
    "PDUDecodeError",
    "ProtocolError",
    "RemoteProtocolError",
]


class AbortSource(enum.IntEnum):
    """A-ABORT PDU source field, PS3.8 §9.3.8 Table 9-26."""

    SERVICE_USER = 0
    RESERVED = 1
    SERVICE_PROVIDER = 2


class AbortReason(enum.IntEnum):
    """A-ABORT PDU reason/diag field when the source is the service provider.

    PS3.8 §9.3.8 Table 9-26. (When the source is the service user the field is
    not significant and is sent as 0.)
    """

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    RESERVED = 3
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


class ProtocolError(Exception):
    """Root of every error the DICOM engine raises on purpose."""


class LocalProtocolError(ProtocolError):
    """The local user asked for something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol; the association is to be aborted.

    ``source`` and ``reason`` are what goes into the A-ABORT PDU we send.
    """

    def __init__(
        self,
        message: str,
        *,
        source: AbortSource = AbortSource.SERVICE_PROVIDER,
        reason: AbortReason = AbortReason.INVALID_PDU_PARAMETER_VALUE,
    ) -> None:
        super().__init__(message)
        self.source = source
        self.reason = reason


class PDUDecodeError(RemoteProtocolError):
    """A PDU (or one of its items) could not be decoded.

    ``field`` names what was being decoded (e.g. ``"A-ASSOCIATE-RQ.called_ae_title"``)
    and ``offset`` is the byte offset from the start of the PDU.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str,
        offset: int,
        reason: AbortReason = AbortReason.INVALID_PDU_PARAMETER_VALUE,
    ) -> None:
        super().__init__(
            f"{field} at offset {offset}: {message}",
            source=AbortSource.SERVICE_PROVIDER,
            reason=reason,
        )
        self.field = field
        self.offset = offset


class DIMSEError(ProtocolError):
    """A DIMSE message could not be decoded or handled.

    ``status`` is the DIMSE status to answer with (PS3.7 Annex C), e.g. 0xC000
    (cannot understand) or 0x0122 (SOP class not supported).
    """

    def __init__(self, message: str, *, status: int = 0xC000) -> None:
        super().__init__(message)
        self.status = status
