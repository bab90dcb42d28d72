"""From a complete inbound instance to a spool placement: the rules at commit time.

Theory of operation
-------------------
DESIGN.md D4 to D6. When the last fragment of a C-STORE data set is in the spool's
temporary file, the actor hands the writer to the group committer together with
:meth:`InstanceRouter.route`, bound to the association. On the commit thread,
``route``:

1. reads only the header attributes the rules need (``RuleSet.needed_tags``), never
   the pixel data, and nothing at all when no rule looks at the data set;
2. evaluates the rules (``rules.RuleSet.evaluate``) against the association and
   those attributes;
3. turns the decision into a :class:`workers.spool.Placement`: the file as received
   is hard-linked into ``queue/<destination>/`` for each destination whose rules
   change nothing (D5: the bytes go out as they came in); a destination whose rules
   change attributes gets its own copy, decoded, changed and written in the same
   transfer syntax; a transparent forward holds the file in ``tmp/`` for an
   immediate send; reject and drop keep nothing; an unmatched instance goes to
   ``unrouted/`` or is refused, as ``[routing] unmatched`` says.

The decision rides back in ``Placement.note`` so the actor can answer the C-STORE
(Success, the rule's reject status, or the destination's own status when
transparent) and log which rules sent it where. Reload swaps the whole
:class:`InstanceRouter` (rules and config together): an instance is routed by the
rules that were current when its data set was complete.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import mmap
import os
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from router.config import Config
from router.dicom import dimse
from router.dicom.dataset import (
    HeaderIncomplete,
    decode_dataset,
    encode_dataset,
    read_top_level,
    readable_by_pydicom,
    top_level_spans,
    walkable_encoding,
)
from router.dicom.errors import DIMSEError, ProtocolError
from router.dicom.uids import is_deflated
from router.logline import first_line
from rules import AssociationInfo, ChangeNotMade, Changes, Decision, Forward, RuleSet
from rules.tags import BINARY_VRS
from workers.forward import DestinationActor
from workers.moves import Originator, key_text, move_of, note_sub_operation, originator_of
from workers.queue import dead_folder, queue_folder, write_dead_reason
from workers.spool import QUEUE_DIR, UNROUTED_DIR, Placed, Placement, SpoolWriter

__all__ = ["UNMATCHED_STATUS", "Dispatcher", "InstanceRouter", "Routed", "queue_folder",
           "read_header"]

log = logging.getLogger("workers.routing")

#: C-STORE status for an instance no rule routes when ``unmatched = "reject"``:
#: PS3.7 C.5.x "Refused: Not Authorized" -- this node is not set up to take it.
UNMATCHED_STATUS: Final = dimse.NOT_AUTHORIZED


_SPECIFIC_CHARACTER_SET: Final = 0x00080005
_BITS_ALLOCATED: Final = 0x00280100
_PIXEL_REPRESENTATION: Final = 0x00280103
_HEAD: Final = 16 * 1024  # most headers end well within this
_MAX_HEAD: Final = 8 * 1024 * 1024
# A deflated instance that a rule changes is decoded whole by pydicom.
_MAX_CHANGED_INFLATED: Final = 256 * 1024 * 1024
#: A changed copy leaves binary elements at least this big out of what it decodes,
#: and copies them as they are (``_changed_around_bulk``), a step at a time.
_BULK: Final = 64 * 1024
_COPY_STEP: Final = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Routed:
    """What ``route`` decided, for the actor's answer and log line."""

    decision: Decision
    status: int  # the C-STORE status to answer with (transparent: replaced later)
    comment: str | None = None  # Error Comment (0000,0902) for a refusal
    transparent: str | None = None  # destination of a transparent forward
    move: int | None = None  # the proxied C-MOVE (message ID) this is a sub-operation of
    originator: Originator | None = None  # its requestor, whom the relayed copy names

    def describe(self) -> str:
        return self.decision.describe()


class InstanceRouter:
    """Routes instances by one rule set and one configuration (immutable)."""

    def __init__(self, config: Config, rules: RuleSet, *,
                 clock: Callable[[], datetime.datetime] = datetime.datetime.now) -> None:
        self.config = config
        self.rules = rules
        self.clock = clock
        # Upstreams that move to the router (proxy mode), by name; and their AE
        # titles: a C-STORE from one may be a move's sub-operation even without a
        # Move Originator.
        self._proxies = {d.name: d for d in config.destinations if d.move_mode == "proxy"}
        self.proxy_upstreams = frozenset(d.ae_title for d in self._proxies.values())
        # Specific Character Set too: text values decode by it (PS3.5 §6.1.2.5); and
        # Pixel Representation and Bits Allocated, which decide the VR of the "US or SS"
        # (and "OB or OW") attributes in Implicit VR (PS3.5 Annex A.1, PS3.3
        # C.7.6.3.1): without them pydicom takes US, and -2000 read as 63536, so
        # routing depended on the syntax a modality chose.
        self._tags = sorted({*rules.needed_tags, _PIXEL_REPRESENTATION, _BITS_ALLOCATED})
        self._wanted = frozenset((*self._tags, _SPECIFIC_CHARACTER_SET))
        # For rules that read no attribute: one empty data set, not one per instance
        # (a pydicom Dataset costs ~30 us to make; evaluation only reads it).
        self._nothing = Dataset()

    def route(self, writer: SpoolWriter, path: Path, association: AssociationInfo,
              sub_operation: bool = False, move_message_id: int | None = None,
              stream: str | None = None) -> Placement:
        """The placement of the complete instance in ``path`` (on the worker's loop, or
        on the commit thread for big data sets and C-MOVE sub-operations: see the actor).

        ``sub_operation``: the C-STORE has a Move Originator Message ID
        (``move_message_id``, PS3.7 §9.3.1.1) or comes from a proxy-mode upstream's
        AE title. If it is a sub-operation of a C-MOVE this router issued for a
        requestor (workers/qr.py, proxy mode; workers/moves.py says whose), it goes
        to that requestor's destination at once, whatever the rules say, and its
        status is the destination's.
        """
        if sub_operation:
            # Only a move's own upstream may deliver into it (else anyone knowing a
            # 16-bit message ID could send past the rules).
            @functools.cache
            def from_upstream(name: str) -> bool:
                upstream = self._proxies.get(name)
                return upstream is not None and upstream.is_peer(association.calling_ae,
                                                                 association.peer)

            @functools.cache  # asked once per running move in scope: read once
            def instance_value(tag: int) -> str | None:
                return self._key_value(path, writer, tag)

            destination, running, move = move_of(self.config.spool, move_message_id,
                                                 from_upstream, instance_value, stream)
            if destination is None and move_message_id is None and running > 1:
                log.warning("C-STORE from %s names no Move Originator, and each of the %d "
                            "moves it may be for has had the instance (or it has no SOP "
                            "Instance UID): routed by the rules", association.calling_ae,
                            running)
            if destination is not None:
                originator = None
                if move is not None:
                    note_sub_operation(self.config.spool, move)
                    originator = originator_of(self.config.spool, move)
                forward = Forward(destination=destination, changes=Changes(), transparent=True,
                                  rules=(f"C-MOVE {move_message_id or '(no message ID)'}",))
                decision = Decision(outcome="forward", forwards=(forward,),
                                    rules=forward.rules)
                return Placement(hold=True, note=Routed(decision=decision,
                                                        status=dimse.SUCCESS,
                                                        transparent=destination, move=move,
                                                        originator=originator))
        header = self._header(path, writer.transfer_syntax, writer.dataset_offset)
        decision = self.rules.evaluate(association, header, self.clock())
        if decision.outcome == "reject":
            status = decision.status if decision.status is not None else dimse.NOT_AUTHORIZED
            return Placement(note=Routed(decision=decision, status=status,
                                         comment=f"refused by rule {_names(decision)}"))
        if decision.outcome == "drop":
            return Placement(note=Routed(decision=decision, status=dimse.SUCCESS))
        if decision.outcome == "unmatched":
            if self.config.unmatched == "reject":
                return Placement(note=Routed(decision=decision, status=UNMATCHED_STATUS,
                                             comment="no routing rule matched this instance"))
            return Placement(links=(UNROUTED_DIR,),
                             note=Routed(decision=decision, status=dimse.SUCCESS))
        transparent = [f for f in decision.forwards if f.transparent]
        if transparent:
            # Validation allows a transparent forward only as the one destination.
            return Placement(hold=True, note=Routed(decision=decision, status=dimse.SUCCESS,
                                                    transparent=transparent[0].destination))
        links: list[str] = []
        copies: list[tuple[str, Callable[[BinaryIO], None]]] = []
        whole_header: Callable[[], Dataset] | None = None
        for forward in decision.forwards:
            folder = queue_folder(forward.destination)
            if not forward.changes:
                links.append(folder)
                continue
            if whole_header is None:
                # Every element before the pixel data, read once for all destinations
                # if a change of the character set needs it: that converts each text
                # value, and any of them may be one it cannot.
                whole_header = functools.cache(lambda: _pydicom_header(
                    path, writer.transfer_syntax, writer.dataset_offset))
            if header is self._nothing:  # no condition read it; the changes do
                header = self._header(path, writer.transfer_syntax, writer.dataset_offset,
                                      for_changes=True)
            problem = forward.changes.problem(header, whole=whole_header)
            if problem is None:
                copies.append((folder, _changed_copy(path, forward.changes,
                                                     writer.transfer_syntax,
                                                     writer.dataset_offset)))
                continue
            # Fail closed: sent without the change (a pseudonym that does not fit, say),
            # the copy would carry what the rule takes out. The instance as received is
            # kept as the destination's dead letter, its reason written first, and
            # `queue retry` keeps it unless told --unchanged.
            reason = (f"rule {_names(decision)}: change not made, so not sent: {problem}")
            write_dead_reason(writer.spool.root, forward.destination, writer.name,
                              reason=reason, status=None, attempts=0,
                              fsync=writer.spool.fsync,
                              sop_instance_uid=writer.sop_instance_uid, unchanged=True)
            dead = dead_folder(forward.destination)
            log.warning("%s from %s: kept in %s, not sent to it: %s",
                        writer.sop_instance_uid, association.calling_ae, dead, reason)
            links.append(dead)
        return Placement(links=tuple(links), copies=tuple(copies),
                         note=Routed(decision=decision, status=dimse.SUCCESS))

    @staticmethod
    def _key_value(path: Path, writer: SpoolWriter, tag: int) -> str | None:
        """The instance's value of the unique key ``tag`` (workers/moves.py: is it
        within a move's scope?), None if it has none or it does not read."""
        try:
            header = read_header(path, writer.transfer_syntax, writer.dataset_offset,
                                 frozenset((tag,)))
            if header is None:
                header = _pydicom_header(path, writer.transfer_syntax,
                                         writer.dataset_offset, [tag])
            value = header[tag].value if tag in header else None
        except Exception:  # pydicom's errors are many. The rules' own read of the
            return None     # header, next, answers a broken one.
        if value is None or isinstance(value, (list, tuple, MultiValue)):
            return None  # a key of an instance has one value
        return key_text(value) or None

    def _header(self, path: Path, transfer_syntax: str, offset: int, *,
                for_changes: bool = False) -> Dataset:
        if not self.rules.needs_dataset and not for_changes:
            return self._nothing
        # Only the attributes rules read; pixel data is never touched (D5).
        header = read_header(path, transfer_syntax, offset, self._wanted)
        if header is not None:
            return header
        return _pydicom_header(path, transfer_syntax, offset, self._tags)


def _pydicom_header(path: Path, transfer_syntax: str, offset: int,
                    tags: list[int] | None = None) -> Dataset:
    """The data set at ``offset`` in ``path`` up to its pixel data, read by pydicom
    (only ``tags``, if given); C000H when it does not read."""
    with _pydicom_refusal("its header does not read"):
        return dcmread(readable_by_pydicom(path, transfer_syntax=transfer_syntax,
                                           offset=offset),
                       stop_before_pixels=True, specific_tags=tags)


def read_header(path: Path, transfer_syntax: str, offset: int,
                tags: frozenset[int]) -> Dataset | None:
    """The top-level elements ``tags`` of the data set at ``offset`` in ``path``, as a
    pydicom Dataset of raw elements (decoded when a rule reads them), or None when
    this fast path does not apply (unknown transfer syntax, a wanted sequence of
    undefined length, a malformed data set): then pydicom reads it.

    The first 16 KiB are read; a header that goes on past them (a big element
    before a wanted one) is walked in a read-only map of the file, so what is
    skipped is never in memory. A deflated data set (PS3.5 A.5) is inflated up to
    8 MiB for it, never further: a few MB of deflated zeros may inflate to
    gigabytes, and pydicom inflates all of it (that killed a worker). Past that
    bound, or where this walk cannot read it, a deflated data set is refused with
    C000H rather than handed to pydicom.

    Measured on a CT header with four attributes read: ~70 us, against 220-470 us
    for ``dcmread(stop_before_pixels=True, specific_tags=...)``, which still runs
    every element before them through pydicom's generator.
    """
    if is_deflated(transfer_syntax):
        found = _deflated_header(path, offset, tags)
        implicit, little = False, True  # deflated data sets are explicit VR LE
    else:
        encoding = walkable_encoding(transfer_syntax)
        if encoding is None:
            return None
        implicit, little = encoding
        try:
            found = _walk_file(path, offset, tags, implicit=implicit, little=little)
        except (HeaderIncomplete, ValueError, ProtocolError):
            return None  # truncated or malformed: pydicom decides
    ds = Dataset()
    for tag, (vr, value) in found.items():
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, implicit, little)
    return ds


def _walk_file(path: Path, offset: int, tags: frozenset[int], *, implicit: bool,
               little: bool) -> dict[int, tuple[str | None, bytes]]:
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(_HEAD)
        try:
            return read_top_level(data, implicit=implicit, little=little, tags=tags)
        except HeaderIncomplete:
            if len(data) < _HEAD:
                raise  # the file ends first
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return read_top_level(view[offset:], implicit=implicit, little=little,
                                      tags=tags)
            finally:
                view.release()  # before the map closes (read_top_level copies values)


def _deflated_header(path: Path, offset: int,
                     tags: frozenset[int]) -> dict[int, tuple[str | None, bytes]]:
    """The wanted top-level elements of a deflated data set, inflating no more than
    _MAX_HEAD bytes; DIMSEError (C000H) when they are not within that."""
    size = _HEAD
    while True:
        data, complete = _inflate_file(path, offset, size)
        try:
            return read_top_level(data, implicit=False, little=True, tags=tags)
        except HeaderIncomplete:
            if complete:
                raise DIMSEError("deflated data set ends within an element",
                                 status=dimse.CANNOT_UNDERSTAND) from None
            if size >= _MAX_HEAD:
                raise DIMSEError(
                    f"deflated data set: the attributes the rules read are not within its "
                    f"first {_MAX_HEAD >> 20} MiB inflated", status=dimse.CANNOT_UNDERSTAND,
                ) from None
            size *= 8
        except ValueError as exc:
            raise DIMSEError(f"deflated data set: {exc}", status=dimse.CANNOT_UNDERSTAND,
                             ) from None


def _inflate_file(path: Path, offset: int, size: int, *,
                  keep: bool = True) -> tuple[bytes, bool]:
    """Up to ``size`` bytes of the raw deflate stream (PS3.5 A.5) at ``offset`` in
    ``path``, read in steps (none of them kept unless ``keep``); and whether that is
    all of it."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    count = 0
    with open(path, "rb") as fh:
        fh.seek(offset)
        pending = b""
        while count < size and not inflater.eof:
            if not pending:
                pending = fh.read(_HEAD)
                if not pending:
                    return bytes(out), True
            try:
                # At most 1 MiB a step: what is not kept never piles up.
                chunk = inflater.decompress(pending, min(size - count, 1 << 20))
            except zlib.error as exc:
                raise DIMSEError(f"deflated data set does not inflate: {exc}",
                                 status=dimse.CANNOT_UNDERSTAND) from None
            count += len(chunk)
            if keep:
                out += chunk
            pending = inflater.unconsumed_tail
    return bytes(out), inflater.eof


def _names(decision: Decision) -> str:
    return ", ".join(f'"{name}"' for name in decision.rules) or "(none)"


def _changed_copy(path: Path, changes: Changes, transfer_syntax: str,
                  offset: int) -> Callable[[BinaryIO], None]:
    """A writer of ``path`` (its data set at ``offset``, in ``transfer_syntax``) with
    ``changes`` applied, in its own transfer syntax."""
    deflated = is_deflated(transfer_syntax)
    encoding = walkable_encoding(transfer_syntax)

    def write(out: BinaryIO) -> None:
        if deflated:
            # pydicom inflates all of it to change it: bounded first, in steps.
            _, complete = _inflate_file(path, offset, _MAX_CHANGED_INFLATED, keep=False)
            if not complete:
                raise DIMSEError(
                    f"deflated data set inflates past {_MAX_CHANGED_INFLATED >> 20} MiB: "
                    "not changed", status=dimse.CANNOT_UNDERSTAND)
        with _pydicom_refusal("cannot apply the rule's changes"):
            if encoding is not None and _changed_around_bulk(  # (None when deflated)
                    path, offset, changes, transfer_syntax, encoding, out):
                return
            ds = dcmread(readable_by_pydicom(path, transfer_syntax=transfer_syntax,
                                             offset=offset))
            changes.apply(ds)
            # The file meta (transfer syntax, Source AE Title...) is kept as received.
            dcmwrite(out, ds, enforce_file_format=True)

    return write


@contextlib.contextmanager
def _pydicom_refusal(what: str) -> Iterator[None]:
    """pydicom failing on a data set it was given to read or change: C000H (Cannot
    understand, PS3.4 B.2.3), with the first line of its message (some of pydicom's
    messages carry a whole traceback)."""
    try:
        yield
    except DIMSEError:
        raise
    except ChangeNotMade as exc:  # ours, and said whole
        raise DIMSEError(f"{what}: {exc}", status=dimse.CANNOT_UNDERSTAND) from None
    except Exception as exc:  # pydicom raises many kinds on malformed data
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the disk's trouble (a full one is A700H), not the data set's
        # pydicom's own OSError too ("No tag to read at file position ...", for a
        # data set that ends early): the data set's trouble.
        raise DIMSEError(f"{what}: {first_line(exc)[:200]}",
                         status=dimse.CANNOT_UNDERSTAND) from None


def _changed_around_bulk(path: Path, offset: int, changes: Changes, transfer_syntax: str,
                         encoding: tuple[bool, bool], out: BinaryIO) -> bool:
    """Write the changed copy with its bulk data (pixel data, big binary values the
    changes do not touch) copied from ``path`` as it is, never held in memory: the
    rest of the data set is decoded, changed and re-encoded on its own, and the two
    merged back in tag order (PS3.5 §7.1: elements ascend by tag). False, writing
    nothing, when there is no bulk data to leave out."""
    implicit, little = encoding
    touched = changes.tags
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            spans = top_level_spans(view[offset:], implicit=implicit, little=little)
        except (HeaderIncomplete, DIMSEError):
            return False  # pydicom's turn: it says what is wrong
        finally:
            view.release()
        bulk = [(tag, start, end) for tag, vr, start, end in spans
                if end - start >= _BULK and tag not in touched and _binary(tag, vr)]
        if not bulk:
            return False
        skip = {tag for tag, _, _ in bulk}
        rest = b"".join(mapped[offset + start:offset + end]
                        for tag, _, start, end in spans if tag not in skip)
        ds = decode_dataset(rest, transfer_syntax)
        changes.apply(ds)
        encoded = encode_dataset(ds, transfer_syntax)
        # (tag, start, end, whether from ``encoded``; else from the file's data set)
        pieces = [(tag, start, end, True) for tag, _, start, end in
                  top_level_spans(memoryview(encoded), implicit=implicit, little=little)]
        pieces += [(tag, start, end, False) for tag, start, end in bulk]
        out.write(mapped[:offset])  # preamble and file meta, as received
        for _, start, end, changed in sorted(pieces):
            if changed:
                out.write(memoryview(encoded)[start:end])
                continue
            for at in range(offset + start, offset + end, _COPY_STEP):
                # Read a step at a time (not through the map, whose pages would stay).
                out.write(os.pread(fh.fileno(), min(_COPY_STEP, offset + end - at), at))
    return True


def _binary(tag: int, vr: str | None) -> bool:
    """Whether an element holds bytes no change or character set conversion reads."""
    if vr is None:  # implicit VR: the dictionary's ("OB or OW" for pixel data)
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return False
    return vr in BINARY_VRS or vr == "OB or OW"


class Dispatcher:
    """A worker's routing state: the router (rules) and its destination actors.

    The worker makes a new one on reload; actors read the current one at each commit.
    """

    def __init__(self, router: InstanceRouter,
                 destinations: Mapping[str, DestinationActor]) -> None:
        self.router = router
        self.destinations = dict(destinations)

    def enqueued(self, placed: Placed) -> None:
        """Tell each destination's actor about the queue files a commit made."""
        for path in placed.paths:
            if path.parent.parent.name != QUEUE_DIR:
                continue
            actor = self.destinations.get(path.parent.name)
            if actor is not None:
                actor.enqueue(path.name)

    async def send_now(self, destination: str, path: Path,
                       originator: Originator | None = None) -> tuple[int, str | None]:
        """Transparent forwarding: the destination's status for ``path`` (a relayed
        C-MOVE sub-operation: sent as one of ``originator``'s move)."""
        actor = self.destinations.get(destination)
        if actor is None:  # removed by a reload since the rule matched
            return dimse.REFUSED_OUT_OF_RESOURCES, f"destination {destination} is gone"
        return await actor.send_now(path, originator)
