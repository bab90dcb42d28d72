"""Events the engine hands to its user (PS3.8 §7 service primitives, DIMSE-level).

``Association.next_event()`` returns one of these, or :data:`NEED_DATA` when it
needs more bytes from the transport. They are frozen values: the engine keeps
no reference it could change later, except that ``DataReceived.data`` is a
``memoryview`` into the received PDU (copy it if you keep it past the next call).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from router.dicom.dimse import DimseMessage
from router.dicom.negotiation import NegotiatedContext
from router.dicom.pdu import AAssociateAC, AAssociateRJ, AAssociateRQ


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _Sentinel.NEED_DATA
"""More bytes are needed before the next event (h11's sentinel, same meaning)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AssociationRequested:
    """A-ASSOCIATE indication (acceptor): answer with ``accept()`` or ``reject()``."""

    request: AAssociateRQ


@dataclass(frozen=True, slots=True, kw_only=True)
class AssociationEstablished:
    """A-ASSOCIATE confirmation (accept) for the requestor, PS3.8 AE-3."""

    request: AAssociateRQ
    accept: AAssociateAC
    contexts: Mapping[int, NegotiatedContext]


@dataclass(frozen=True, slots=True, kw_only=True)
class AssociationRejected:
    """A-ASSOCIATE confirmation (reject) for the requestor, PS3.8 AE-4."""

    reject: AAssociateRJ


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseRequested:
    """A-RELEASE indication (PS3.8 AR-2): finish what is in flight, then call
    ``release_response()``. (Release collisions are resolved by the engine.)"""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseCompleted:
    """The association was released in an orderly way (A-RELEASE confirmation)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AssociationAborted:
    """A-ABORT (``provider=False``) or A-P-ABORT (``provider=True``) indication.

    ``local`` is True when this side detected the problem and sent the A-ABORT
    (PS3.8 AA-8), with ``detail`` saying why in one line.
    """

    source: int
    reason: int
    provider: bool
    local: bool
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed:
    """The transport connection is closed; the engine is back in Sta1 for good."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandReceived:
    """A complete DIMSE command set arrived (PS3.7 §6.3.1).

    If ``message.has_dataset`` the data set follows as :class:`DataReceived`
    fragments on the same presentation context.
    """

    context_id: int
    message: DimseMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandRejected:
    """A command set arrived whole but cannot be used (PS3.7 Annex C).

    Its framing was sound, so the association goes on: the engine read the
    Command Field and Message ID and reports why the rest failed (``status``:
    0211H unrecognized operation, 0212H mistyped argument, C000H cannot
    understand). If ``has_dataset`` the data set follows as ``DataReceived``
    fragments to be drained. A request deserves a response of
    ``command_field | 0x8000`` with ``status``; a bad response is dropped.
    """

    context_id: int
    command_field: int
    message_id: int
    has_dataset: bool
    status: int
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DataReceived:
    """One fragment of a data set (PS3.8 Annex E), in arrival order; ``last``
    marks the final fragment. ``data`` is a memoryview into the received PDU."""

    context_id: int
    data: memoryview
    last: bool


Event = (
    AssociationRequested
    | AssociationEstablished
    | AssociationRejected
    | ReleaseRequested
    | ReleaseCompleted
    | AssociationAborted
    | ConnectionClosed
    | CommandReceived
    | CommandRejected
    | DataReceived
)
