"""The query proxy: an inbound C-FIND answered by upstream PACS (DESIGN.md D7).

Theory of operation
-------------------
The association actor collects a C-FIND-RQ's identifier, asks the rules which
upstreams answer it (``RuleSet.evaluate_query``) and hands it to a
:class:`FindProxy`, which runs as a task in the worker's loop:

- one outbound association per upstream (:class:`workers.outbound.OutboundAssociation`),
  proposing the query model in the requestor's transfer syntax first, then the two
  little endian ones, all upstreams queried at once;
- every pending response is passed back the moment it arrives (PS3.4 C.4.1.3:
  the SCU sees matches as they are found, never a collected list), its identifier
  forwarded as it came when the transfer syntaxes agree, re-encoded otherwise;
- the upstreams are not read while the requestor has not taken what was sent
  (TCP flow control end to end): a requestor that does not read cannot make
  matches pile up in the worker's memory;
- a rule's changes apply to the identifier before it goes upstream and to each
  match before it goes back (``applies_to = "query"`` / ``"result"``); without
  any, nothing is decoded;
- with several upstreams, a match already passed on is dropped by its unique key
  at the query level (PS3.4 C.6.1.1.2-C.6.1.1.5, C.6.2.1: Patient ID, Study /
  Series / SOP Instance UID; for a worklist, the whole identifier);
- a C-CANCEL from the requestor is sent on to every upstream still running, and
  the final answer is then Cancel (FE00H, PS3.4 C.4.1.1.4);
- when the router also serves retrieves for the requestor (a ``retrieve`` rule
  matches the query), a match's Retrieve AE Title (0008,0054) names the router, as
  the requestor called it, not the PACS behind it: a viewer that follows it comes
  back through the router, which the PACS may be the only one to know
  (PS3.4 C.4.1.1.3.2);
- the final status is Success when every upstream completed. When one did not,
  it is that upstream's failure (A700H when it could not be reached or its
  association failed), after whatever matches the others gave, with an Error
  Comment naming it: a list missing a PACS must not pass for complete, or a prior
  study there goes unseen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol

from pydicom.dataset import Dataset

from router.config import Destination
from router.dicom import dimse, uids
from router.dicom.dataset import (
    HeaderIncomplete,
    decode_dataset,
    encode_dataset,
    read_top_level,
    transcode,
    walkable_encoding,
)
from router.dicom.errors import DIMSEError, ProtocolError
from router.dicom.negotiation import NegotiatedContext, context_for_instance
from rules import Changes
from workers.moves import (
    MoveScope,
    Originator,
    SubOperations,
    end_move,
    move_scope,
    register_move,
    sub_operations_of,
)
from workers.outbound import (
    MAX_CONVERTED_BYTES,
    OutboundAssociation,
    OutboundError,
    instance_syntaxes,
    open_association,
    proposal_syntaxes,
)

__all__ = ["FIND_MODELS", "GET_MODELS", "MOVE_MODELS", "FindProxy", "GetProxy", "MoveProxy",
           "Request", "StoreRelay", "unique_key"]

# Presentation contexts one association may carry (PS3.8 §9.3.2.2).
_MAX_CONTEXTS: Final = 128

log = logging.getLogger("workers.qr")

#: Query models the proxy serves (PS3.4 C.6, K.6 for the worklist).
FIND_MODELS: Final = (
    uids.PATIENT_ROOT_QR_FIND,
    uids.STUDY_ROOT_QR_FIND,
    uids.MODALITY_WORKLIST_INFORMATION_FIND,
)

_LEVEL_KEYS: Final = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}

#: Retrieve AE Title (0008,0054).
_RETRIEVE_AE_TAGS: Final = frozenset({0x00080054})

# respond(status, identifier in the requestor's transfer syntax or None, error comment)
Respond = Callable[[int, bytes | None, str | None], None]


def changed(raw: bytes, transfer_syntax: str, changes: Changes | None) -> bytes:
    """``raw`` with a rule's changes applied (query identifiers, C-FIND results), in the
    same transfer syntax; as it was when there are none (no decoding at all)."""
    if not changes:
        return raw
    ds = decode_dataset(raw, transfer_syntax)
    changes.apply(ds, strict=False)
    return encode_dataset(ds, transfer_syntax)


def unique_key(identifier: Dataset, raw: bytes) -> object:
    """What makes a match the same match from two upstreams (PS3.4 C.6 unique keys)."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    keyword = _LEVEL_KEYS.get(level)
    if keyword is not None:
        value = identifier.get(keyword)
        if value:
            return (level, str(value).strip())
    return raw  # a worklist item, or a match without its key: the whole identifier


def _retrieve_through(raw: bytes, transfer_syntax: str, ae_title: str) -> bytes:
    """A C-FIND match whose Retrieve AE Title, if it has one, is ``ae_title``; only a
    match that has it is decoded and re-encoded."""
    encoding = walkable_encoding(transfer_syntax)
    if encoding is not None:
        try:
            found = read_top_level(raw, implicit=encoding[0], little=encoding[1],
                                   tags=_RETRIEVE_AE_TAGS)
        except (HeaderIncomplete, DIMSEError):
            return raw  # passed on as it came, as before: the requestor may read it
        if not found:
            return raw
    ds = decode_dataset(raw, transfer_syntax)
    if "RetrieveAETitle" not in ds:
        return raw
    ds.RetrieveAETitle = ae_title
    return encode_dataset(ds, transfer_syntax)


@dataclass(frozen=True, slots=True)
class Request:
    """The requestor's C-FIND, C-MOVE or C-GET as a proxy relays it: the model (SOP
    class), the identifier as received, its transfer syntax, the label the log
    names it by, its priority, and the rules' changes to the identifier."""

    model: str
    identifier: bytes
    transfer_syntax: str
    label: str
    priority: dimse.Priority = dimse.Priority.MEDIUM
    query_changes: Changes | None = None


class _Relayed:
    """What every relayed request keeps: the requestor's model, identifier (already
    changed by the query rules) and transfer syntax, its label and priority, and
    whether it was cancelled or has had its final response."""

    def __init__(self, request: Request) -> None:
        self.model = request.model
        self.identifier = changed(request.identifier, request.transfer_syntax,
                                  request.query_changes)
        self.transfer_syntax = request.transfer_syntax
        self.label = request.label
        self.priority = request.priority
        self.cancelled = False
        self.answered = False  # the final response went to the requestor


class FindProxy(_Relayed):
    """One C-FIND relayed to its upstreams; see the module docstring."""

    def __init__(self, request: Request, *, upstreams: list[Destination], respond: Respond,
                 result_changes: Changes | None = None,
                 retrieve_ae_title: str | None = None,
                 writable: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(request)
        self.upstreams = upstreams
        self.respond = respond
        # Waits while the requestor has not taken the matches sent so far: the
        # upstream's are not read meanwhile (flow control, end to end).
        self.writable = writable
        self.result_changes = result_changes
        self.retrieve_ae_title = retrieve_ae_title
        self.matches = 0
        self._seen: set[object] = set()
        self._open: list[OutboundAssociation] = []
        # What the upstreams are asked, and the unique key added to it for the merge.
        self._asked, self._added_key = self._with_unique_key()

    def _with_unique_key(self) -> tuple[bytes, str | None]:
        """With several upstreams, a study found in both is passed on once, known by
        its unique key (PS3.4 C.6 unique keys). A requestor that did not ask for that
        key (PatientName alone) got no value to know it by, and matches that returned
        the same values were taken for one: 11 studies came back as 4, with Success.
        The upstreams are asked for the key (universal matching, PS3.4 C.2.2.2.3) and
        it is removed from each match before it is passed on."""
        if len(self.upstreams) < 2:
            return self.identifier, None
        try:
            ds = decode_dataset(self.identifier, self.transfer_syntax)
        except DIMSEError:
            return self.identifier, None  # passed on as it came; the upstreams judge it
        level = str(ds.get("QueryRetrieveLevel", "") or "").strip().upper()
        keyword = _LEVEL_KEYS.get(level)
        if keyword is None or keyword in ds:
            return self.identifier, None
        setattr(ds, keyword, "")
        return encode_dataset(ds, self.transfer_syntax), keyword

    async def run(self) -> None:
        outcomes = await asyncio.gather(*(self._query(d) for d in self.upstreams),
                                        return_exceptions=True)
        failures: list[tuple[int, str]] = []
        answered: list[str] = []  # the upstreams whose matches are complete
        failed: list[str] = []
        for destination, outcome in zip(self.upstreams, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                outcome = (dimse.REFUSED_OUT_OF_RESOURCES, f"{destination.name}: {outcome}")
            if outcome[0] in (dimse.SUCCESS, dimse.CANCEL):
                answered.append(destination.name)
            else:
                failures.append(outcome)
                failed.append(f"{destination.name} (0x{outcome[0]:04X})")
        completed = len(answered)
        if self.cancelled:
            status, comment = dimse.CANCEL, None
        elif not failures:
            status, comment = dimse.SUCCESS, None
        elif completed:
            # Names and statuses, which fit an Error Comment (LO, 64 characters): the
            # first failure's reason did not ("... does not support 1.2.840.10008.5.1.",
            # cut inside a UID); the reasons are in the log line below.
            status = failures[0][0]
            comment = f"{len(failures)} of {len(self.upstreams)} upstreams failed: " \
                f"{', '.join(failed)}"
        else:
            status, comment = failures[0]
        for code, reason in failures:
            log.warning("C-FIND %s: upstream failed with 0x%04X: %s", self.label, code, reason)
        # A failed upstream is named as failed, never among the sources: the
        # summary must not suggest its matches are in the list.
        log.info("C-FIND %s: %d match(es) from %s%s, status 0x%04X", self.label,
                 self.matches, ", ".join(answered) or "no upstream",
                 f"; failed: {', '.join(failed)}" if failed else "", status)
        self.answered = True
        self.respond(status, None, comment)

    def cancel(self) -> None:
        """The requestor sent C-CANCEL: pass it on to every upstream still answering."""
        self.cancelled = True
        for assoc in self._open:
            assoc.cancel()

    async def _query(self, destination: Destination) -> tuple[int, str]:
        try:
            assoc = await open_association(
                destination, [(self.model, proposal_syntaxes(self.transfer_syntax))],
                label=f"{destination.name} (C-FIND)")
        except OutboundError as exc:
            return dimse.REFUSED_OUT_OF_RESOURCES, f"{destination.name}: {exc}"
        self._open.append(assoc)
        try:
            ctx = assoc.context_for_model(self.model)
            if ctx is None:
                return (dimse.SOP_CLASS_NOT_SUPPORTED,
                        f"{destination.name} does not support {self.model}")
            identifier = transcode(self._asked, self.transfer_syntax, ctx.transfer_syntax)
            if self.cancelled:
                return dimse.CANCEL, ""
            final = (dimse.UNABLE_TO_PROCESS, f"{destination.name}: no final response")
            async for rsp, data in assoc.find(ctx, identifier, priority=self.priority):
                if dimse.status_category(rsp.status) is dimse.StatusCategory.PENDING:
                    if data is not None:
                        self._match(rsp.status, data, ctx.transfer_syntax)
                        if self.writable is not None:
                            await self.writable()
                    continue
                final = (int(rsp.status), f"{destination.name}: {rsp.error_comment}"
                         if rsp.error_comment else
                         f"{destination.name} answered 0x{int(rsp.status):04X}")
                if final[0] == dimse.CANCEL and not self.cancelled:
                    # Cancel answers a C-CANCEL (PS3.4 C.4.1.1.4); unasked, the
                    # upstream stopped short and its matches may be incomplete.
                    final = (dimse.UNABLE_TO_PROCESS,
                             f"{destination.name} answered Cancel to a query not cancelled")
            await assoc.release()
            return final
        except OutboundError as exc:
            return dimse.REFUSED_OUT_OF_RESOURCES, f"{destination.name}: {exc}"
        finally:
            with contextlib.suppress(ValueError):
                self._open.remove(assoc)
            if assoc.is_associated:
                assoc.abort("C-FIND proxy ended")

    def _match(self, status: int, data: bytes, transfer_syntax: str) -> None:
        if self.cancelled:
            return  # after a cancel, late matches are not passed on
        raw = transcode(data, transfer_syntax, self.transfer_syntax)
        raw = changed(raw, self.transfer_syntax, self.result_changes)
        if self.retrieve_ae_title is not None:
            raw = _retrieve_through(raw, self.transfer_syntax, self.retrieve_ae_title)
        if len(self.upstreams) > 1:
            ds = decode_dataset(raw, self.transfer_syntax)
            key = unique_key(ds, raw)
            if key in self._seen:
                return
            self._seen.add(key)
            if self._added_key is not None and self._added_key in ds:
                delattr(ds, self._added_key)  # not asked for by the requestor
                raw = encode_dataset(ds, self.transfer_syntax)
        self.matches += 1
        self.respond(status, raw, None)


#: Retrieve models the move proxy serves (PS3.4 C.6.1, C.6.2).
MOVE_MODELS: Final = (uids.PATIENT_ROOT_QR_MOVE, uids.STUDY_ROOT_QR_MOVE)
#: Retrieve-by-C-GET models the get proxy serves (PS3.4 C.6.1, C.6.2).
GET_MODELS: Final = (uids.PATIENT_ROOT_QR_GET, uids.STUDY_ROOT_QR_GET)

Counts = tuple[int | None, int | None, int | None, int | None]
# respond(status, (remaining, completed, failed, warning), identifier or None, comment)
MoveRespond = Callable[[int, Counts, bytes | None, str | None], None]
_NO_COUNTS: Final[Counts] = (None, None, None, None)


@dataclass(frozen=True)
class _Final:
    """An upstream's final response to a C-MOVE or C-GET (or the router's in its
    place): the requestor gets it, or the next upstream is asked."""

    status: int
    counts: Counts
    data: bytes | None
    comment: str | None
    upstream: str = ""

    def retrieved(self) -> bool:
        """Some sub-operation was done (completed, failed or warning)."""
        return any(c for c in self.counts[1:])

    def failed(self) -> bool:
        return dimse.status_category(self.status) is dimse.StatusCategory.FAILURE


class _RetrieveProxy(_Relayed):
    """What the C-MOVE and C-GET relays share: one association to the upstream, the
    identifier in the transfer syntax it accepted, every response relayed as it comes
    with its sub-operation counts, exactly one final response, and C-CANCEL passed on.
    Subclasses say what to propose (:meth:`_contexts`) and run the operation
    (:meth:`_retrieve`)."""

    kind: ClassVar[str]

    def __init__(self, request: Request, *, upstreams: Sequence[Destination],
                 respond: MoveRespond) -> None:
        super().__init__(request)
        if not upstreams:
            raise ValueError("a retrieve needs an upstream")
        self.upstreams = list(upstreams)
        self.upstream = self.upstreams[0]  # the one asked now
        self.respond = respond
        self._assoc: OutboundAssociation | None = None
        # The counts of the last pending response relayed: what the requestor was
        # told had been done when the upstream breaks off.
        self._pending: Counts | None = None
        # The final response of the upstream asked now, held until run() knows
        # whether it goes to the requestor or the next upstream is asked.
        self._held: _Final | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self._assoc is not None:
            self._assoc.cancel()

    def _broken(self, exc: OutboundError) -> None:
        """The upstream association failed. Before any sub-operation: refused, A702H.
        After some: failed (C001H, PS3.4 C.4.2.1.4 / C.4.3.1.4), with the counts the
        requestor was last told -- or, when the upstream sent no pending response
        (they are optional), what this router saw relayed -- every sub-operation
        still outstanding counted as failed (nothing will do it now), and a comment
        saying how far it got. After a C-CANCEL (the upstream was aborted for not
        ending the operation, see OutboundAssociation.cancel): Cancel, FE00H, what
        the requestor asked for, with those counts (PS3.4 C.4.2.3.1, C.4.3.3.1:
        completed, failed and warning; remaining, those not started)."""
        if self.cancelled:
            log.warning("%s %s %s", self.kind, self._outcome(), exc)
        self._final(*self._cut_short(str(exc)))

    def _cut_short(self, why: str) -> tuple[int, Counts, bytes | None, str | None]:
        """The final response of an operation the router ended, not the upstream
        (its association broke, or the operation limit ran out): see _broken."""
        done_counts = self._pending
        relayed = self._relayed()
        if done_counts is None and relayed:
            done_counts = self._relayed_counts()
        if self.cancelled:
            return dimse.CANCEL, done_counts or _NO_COUNTS, None, None
        if done_counts is None and not relayed:
            return (dimse.OUT_OF_RESOURCES_UNABLE_TO_PERFORM_SUB_OPERATIONS, _NO_COUNTS,
                    None, why)
        # The upstream's last pending response says how many there are in all; what
        # is done, the router's own counts say best where it relayed them (a C-GET,
        # a proxied C-MOVE): they include the sub-operation answered since. Counting
        # both, the one in flight was counted twice ("8 of 301" for 300).
        pending = [c or 0 for c in self._pending or _NO_COUNTS]
        own = self._relayed_counts() if relayed else None
        _, completed, failed, warning = (c or 0 for c in own or done_counts or _NO_COUNTS)
        done = max(completed + failed + warning, relayed)
        total = max(sum(pending), done) if self._pending is not None else done
        of = f" of {total}" if total > done else ""
        # PS3.4 C.4.2.1.4: what did not complete or warn, in flight or never started,
        # has failed, and the four counts add up to the whole.
        counts: Counts = (_NO_COUNTS if done_counts is None
                          else (None, completed, total - completed - warning, warning))
        return (dimse.UNABLE_TO_PROCESS, counts, None,
                f"{self.upstream.name} broke off after {done}{of} sub-operations: {why}")

    def _relayed(self) -> int:
        """Sub-operations of the upstream asked now that this router relayed."""
        return 0

    def _relayed_counts(self) -> Counts | None:
        """(None, completed, failed, warning) of those, if this router knows them. One
        in flight when the upstream broke off is failed: the upstream will not hear
        whether it arrived, and nothing says the destination kept it."""
        answered = self._answered_counts()
        if answered is None:
            return None
        completed, failed, warning, in_flight = answered
        return None, completed, failed + in_flight, warning

    def _answered_counts(self) -> tuple[int, int, int, int] | None:
        """(completed, failed, warning, in flight) of the sub-operations relayed, as
        answered so far, if this router knows them."""
        return None

    def expire(self, why: str) -> None:
        """The router-wide operation limit ran out (the actor cancelled run() and so
        aborted the upstream): the requestor's final response, as after a broken
        association -- A702H if nothing was done, else C001H with the counts."""
        if self.answered:
            return
        self._held = None
        self._final(*self._cut_short(why))
        if self._held is not None:
            self._answer(self._held)

    async def run(self) -> None:
        """Ask the upstreams in the order the rules name them until one retrieves
        something (PS3.4 C.4.2.3: completed, failed or warning sub-operations, or
        any pending response, which the requestor has seen). One that fails before
        any sub-operation, or ends with none (the study is not there), hands over to
        the next. When none retrieved anything, a failure is the answer -- the
        first, so an unreachable PACS never passes for an empty one -- else the
        last empty success."""
        failure: _Final | None = None
        held: _Final | None = None
        for n, upstream in enumerate(self.upstreams):
            self.upstream, self._held = upstream, None
            await self._run_upstream()
            held = self._held
            if held is None:  # cannot happen: every path ends in _final
                held = _Final(dimse.UNABLE_TO_PROCESS, _NO_COUNTS, None,
                              f"{upstream.name} gave no final response")
            if self.cancelled and held.failed():
                # Ended after the requestor's C-CANCEL (PS3.4 C.4.2.3.1): Cancel,
                # whatever broke meanwhile; the next upstream is not asked.
                held = _Final(dimse.CANCEL, held.counts, None, None, upstream.name)
            if (self.cancelled or self._pending is not None or self._relayed()
                    or held.retrieved()):
                self._answer(held)
                return
            if failure is None and held.failed():
                failure = held
            if n + 1 < len(self.upstreams):
                log.info("%s %s retrieved nothing: asking %s", self.kind, self._outcome(),
                         self.upstreams[n + 1].name)
        assert held is not None
        self._answer(failure or held)

    def _answer(self, final: _Final) -> None:
        """The final response to the requestor (once)."""
        if self.answered:
            return
        self.answered = True
        comment = final.comment
        if len(self.upstreams) > 1 and final.failed() and not (
                comment or "").startswith(final.upstream):
            comment = f"{final.upstream}: {comment or 'failed'}"
        self.respond(final.status, final.counts, final.data, comment)

    async def _run_upstream(self) -> None:
        contexts, roles = self._contexts()
        try:
            assoc = await open_association(self.upstream, contexts, roles=roles,
                                           label=f"{self.upstream.name} ({self.kind})")
        except OutboundError as exc:
            self._final(dimse.OUT_OF_RESOURCES_UNABLE_TO_PERFORM_SUB_OPERATIONS, _NO_COUNTS,
                        None, str(exc))
            return
        self._assoc = assoc
        try:
            if self.cancelled:  # while the association was being opened
                self._final(dimse.CANCEL, _NO_COUNTS, None, None)
                await assoc.release()
                return
            ctx = assoc.context_for_model(self.model)
            if ctx is None:
                self._final(dimse.SOP_CLASS_NOT_SUPPORTED, _NO_COUNTS, None,
                            f"{self.upstream.name} does not support {self.model}")
                return
            identifier = transcode(self.identifier, self.transfer_syntax, ctx.transfer_syntax)
            await self._retrieve(assoc, ctx, identifier)
            await assoc.release()
        except OutboundError as exc:
            self._broken(exc)
        finally:
            self._assoc = None
            if assoc.is_associated:
                assoc.abort(f"{self.kind} proxy ended")

    def _contexts(self) -> tuple[list[tuple[str, list[str]]], dict[str, tuple[bool, bool]]]:
        return [(self.model, proposal_syntaxes(self.transfer_syntax))], {}

    async def _retrieve(self, assoc: OutboundAssociation, ctx: NegotiatedContext,
                        identifier: bytes) -> None:
        raise NotImplementedError

    def _relay_response(self, rsp: dimse.CMoveRSP | dimse.CGetRSP, data: bytes | None,
                        transfer_syntax: str) -> None:
        """Pass an upstream C-MOVE/C-GET response on: pending, or the final one."""
        counts = (rsp.number_of_remaining_sub_operations,
                  rsp.number_of_completed_sub_operations,
                  rsp.number_of_failed_sub_operations,
                  rsp.number_of_warning_sub_operations)
        raw = None if data is None else transcode(data, transfer_syntax, self.transfer_syntax)
        if dimse.status_category(rsp.status) is dimse.StatusCategory.PENDING:
            self._pending = counts
            self.respond(int(rsp.status), counts, raw, None)
        elif rsp.status == dimse.CANCEL and not self.cancelled:
            # Cancel answers a C-CANCEL (PS3.4 C.4.2.3.1, C.4.3.3.1); unasked, the
            # upstream stopped short: a failure, and the next upstream may have it.
            self._final(dimse.UNABLE_TO_PROCESS, counts, raw,
                        f"{self.upstream.name} answered Cancel to a retrieve not cancelled")
        else:
            status, counts, comment = self._checked(int(rsp.status), counts,
                                                    rsp.error_comment)
            self._final(status, counts, raw, comment)

    def _checked(self, status: int, counts: Counts,
                 comment: str | None) -> tuple[int, Counts, str | None]:
        """The upstream's final status and counts, against what this router saw: where
        it relayed every sub-operation (a C-GET, a proxy-mode C-MOVE), the completed,
        failed and warning counts are the requestor's or destination's own answers.
        An upstream that said Success 2/0/0 for one the requestor refused, or 0/0/0
        after relaying a failure, was passed on as it said (an outside campaign):
        PS3.4 C.4.2.1.6 and C.4.3.1.3 count what failed. Sub-operations the upstream
        said failed or warned before reaching the router count too; Success with a
        failure or warning is Warning, B000H; a line says so. (status, counts, Error
        Comment) to answer."""
        own = self._answered_counts() if self._relayed() else None
        if own is None:
            return status, counts, comment
        completed, failed, warning, _ = own
        said = [c or 0 for c in counts[1:]]
        # What failed or warned here stays so whatever the upstream says, and is taken
        # from its completions; the rest of those stand. A proxied move's tally lags:
        # an instance the router took from the upstream may still wait in a queue for
        # the destination, not even started, when the final response comes (two
        # moves of one study to concurrency-1 nodes: 10 counted of 12, in CI).
        failed, warning = max(failed, said[1]), max(warning, said[2])
        completed = max(completed, said[0] - (failed - said[1]) - (warning - said[2]))
        fixed: Counts = (counts[0], completed, failed, warning)
        if tuple(said) == fixed[1:]:
            return status, counts, comment
        new = status
        if dimse.status_category(status) is dimse.StatusCategory.SUCCESS and (failed or warning):
            new = dimse.SUB_OPERATIONS_COMPLETE_WITH_FAILURES
        shown = "/".join(str(c) for c in said)
        log.warning("%s %s %s ended with 0x%04X and counts %s (completed/failed/warning), "
                    "but the router relayed %d/%d/%d: those are answered%s", self.kind,
                    self._outcome(), self.upstream.name, status, shown, completed, failed,
                    warning, f", with 0x{new:04X}" if new != status else "")
        return new, fixed, comment

    def _final(self, status: int, counts: Counts, data: bytes | None,
               comment: str | None) -> None:
        """The upstream asked now has ended the operation: logged, and held for run()."""
        if self._held is not None or self.answered:
            return  # one final response only (a release that fails after it, say)
        self._held = _Final(status, counts, data, comment, self.upstream.name)
        log.info("%s %s status 0x%04X, counts %s%s", self.kind, self._outcome(), status,
                 "/".join("-" if c is None else str(c) for c in counts),
                 f" ({comment})" if comment else "")

    def _outcome(self) -> str:
        """The final log line's middle: which operation, and how it went."""
        return f"{self.label} via {self.upstream.name}:"


class MoveProxy(_RetrieveProxy):
    """One C-MOVE relayed to its upstream (D7).

    In direct mode (the upstream's ``move_mode``, the default) the upstream is asked
    to move to the destination the requestor named, which it must know by that AE
    title. In proxy mode it is asked to move to this router (it must know the
    router's AE title) under a message ID registered in ``<spool>/moves/``
    (workers/moves.py); each sub-operation that arrives, in whichever worker, is
    relayed to the requestor's destination at once and answered with that
    destination's status, so the upstream's counts are true end to end. Either
    way, every response -- pending ones with their
    remaining/completed/failed/warning counts, the final one with the identifier
    listing failed SOP Instance UIDs (PS3.4 C.4.2.1.6) -- is relayed as it arrives.
    C-CANCEL is passed on. The router checks beforehand that the destination is one
    of its own ``[[destination]]`` AE titles (else A801H, move destination unknown),
    so a requestor cannot make it relay moves to arbitrary nodes.
    """

    kind = "C-MOVE"

    def __init__(self, request: Request, *, upstreams: Sequence[Destination],
                 respond: MoveRespond, move_destination: str, spool: Path | None = None,
                 router_ae: str = "", destination_name: str = "",
                 originator: Originator | None = None) -> None:
        super().__init__(request, upstreams=upstreams, respond=respond)
        self.move_destination = move_destination
        # The requestor: what the relayed sub-operations carry (workers/moves.py).
        self.originator = originator
        self.spool = spool
        self.router_ae = router_ae
        self.destination_name = destination_name
        # Proxy mode: the running move's message ID, and what it relayed once ended.
        self._message_id: int | None = None
        self._moved_here = SubOperations()

    async def _retrieve(self, assoc: OutboundAssociation, ctx: NegotiatedContext,
                        identifier: bytes) -> None:
        target, message_id = self.move_destination, None
        if self.upstream.move_mode == "proxy" and self.spool is not None:
            # Proxy mode: the upstream moves to this router, which relays each
            # sub-operation to the destination (workers/moves.py); the message ID
            # tells any worker whose they are.
            message_id = register_move(self.spool, self.destination_name, self.upstream.name,
                                       self._scope(), self.originator)
            target = self.router_ae
        self._message_id, self._moved_here = message_id, SubOperations()
        try:
            async for rsp, data in assoc.move(ctx, identifier, target, priority=self.priority,
                                              message_id=message_id):
                assert isinstance(rsp, dimse.CMoveRSP)
                self._relay_response(rsp, data, ctx.transfer_syntax)
        finally:
            if message_id is not None and self.spool is not None:
                self._moved_here = sub_operations_of(self.spool, message_id)
                self._message_id = None
                end_move(self.spool, message_id)

    def _relayed(self) -> int:
        return self._sub_operations().started

    def _answered_counts(self) -> tuple[int, int, int, int] | None:
        done = self._sub_operations()
        return done.completed, done.failed, done.warning, done.in_flight

    def _checked(self, status: int, counts: Counts,
                 comment: str | None) -> tuple[int, Counts, str | None]:
        if status == dimse.MOVE_DESTINATION_UNKNOWN and self._message_id is not None:
            # Proxy mode: the destination asked upstream is this router, which checked
            # the requestor's itself. Passed on, A801H told the requestor its own
            # destination was unknown (an outside campaign, dcmqrscp without ROUTER in
            # its HostTable): the upstream does not know the router.
            why = (f"{self.upstream.name} does not know this router ({self.router_ae}) "
                   "as a move destination: add it there as a DICOM node")
            log.warning("%s %s %s", self.kind, self._outcome(), why)
            return dimse.UNABLE_TO_PROCESS, counts, why
        return super()._checked(status, counts, comment)

    def _sub_operations(self) -> SubOperations:
        # Proxy mode only: in direct mode the upstream's responses are all there is.
        if self._message_id is not None and self.spool is not None:
            return sub_operations_of(self.spool, self._message_id)
        return self._moved_here

    def _scope(self) -> MoveScope | None:
        """What the upstream is asked to move (workers/moves.py): the identifier as
        sent, after the query rules' changes."""
        try:
            return move_scope(decode_dataset(self.identifier, self.transfer_syntax))
        except (ProtocolError, ValueError, TypeError):
            return None  # the upstream will refuse it; nothing without its ID is taken

    def _outcome(self) -> str:
        return f"{self.label} to {self.move_destination} via {self.upstream.name}:"


class StoreRelay(Protocol):
    """The inbound side of a C-GET: the association the requestor asked on."""

    def storage_contexts(self) -> list[NegotiatedContext]:
        """Contexts on which the requestor accepted to be the storage SCP."""

    def begin_store(self, ctx: NegotiatedContext, rq: dimse.CStoreRQ) -> int:
        """Send a C-STORE-RQ (with a fresh message ID, returned) to the requestor."""

    def store_data(self, ctx: NegotiatedContext, data: bytes, last: bool) -> None:
        """Send a fragment of its data set."""

    async def writable(self) -> None:
        """Wait until the requestor has taken what was sent so far (flow control)."""

    def store_result(self, message_id: int) -> asyncio.Future[dimse.CStoreRSP]:
        """The requestor's C-STORE-RSP to message ``message_id``."""

    def abort(self, detail: str) -> None:
        """A-ABORT the requestor's association (a C-STORE was left half sent)."""


def _quiet(future: asyncio.Future[Any]) -> None:
    """Take a future's outcome, so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


class GetProxy(_RetrieveProxy):
    """One C-GET relayed through an upstream C-GET (D7, PS3.4 C.4.3).

    The upstream association proposes the retrieve model and, with the SCP role
    (PS3.7 D.3.3.4), every storage context the requestor accepted to serve on its
    own association. Each C-STORE sub-operation the upstream sends is passed to the
    requestor on its association as it arrives, fragment by fragment (memory stays
    bounded whatever the instance size, with the requestor's TCP window as the
    brake), and the requestor's status goes back upstream as the sub-operation's
    answer; so the upstream's pending and final counts, relayed as they come, are
    the requestor's own. An instance in a SOP class or transfer syntax the
    requestor did not accept is refused upstream (0122H) and counts as failed.
    """

    kind = "C-GET"

    def __init__(self, request: Request, *, upstreams: Sequence[Destination],
                 respond: MoveRespond, relay: StoreRelay) -> None:
        super().__init__(request, upstreams=upstreams, respond=respond)
        self.relay = relay
        self.relayed = 0
        # The sub-operations of the upstream asked now: how many, and the
        # requestor's answers (completed, failed, warning), in case it breaks off
        # without a pending response (see _cut_short).
        self._seen = 0
        self._tally = [0, 0, 0]
        # (SOP class, transfer syntax) -> the requestor's context that serves it.
        self._offered: dict[tuple[str, str], NegotiatedContext] = {}

    def _contexts(self) -> tuple[list[tuple[str, list[str]]], dict[str, tuple[bool, bool]]]:
        for inbound in self.relay.storage_contexts():
            self._offered.setdefault((inbound.abstract_syntax, inbound.transfer_syntax),
                                     inbound)
        pairs = list(self._offered)[:_MAX_CONTEXTS - 1]
        contexts, _ = super()._contexts()
        # A native syntax the requestor took may come from the upstream in either
        # little endian one too: converted on the way (see _sub_operation).
        return ([*contexts, *((sop, instance_syntaxes(ts)) for sop, ts in pairs)],
                {sop: (False, True) for sop, _ in pairs})

    def _inbound_for(self, sop_class: str, transfer_syntax: str,
                     ) -> NegotiatedContext | None:
        """The requestor's context to send an instance in: the same syntax, or for
        a native one any native one (the instance is then converted)."""
        return context_for_instance(self._offered.values(), sop_class, transfer_syntax)

    def _relayed(self) -> int:
        return self._seen

    def _answered_counts(self) -> tuple[int, int, int, int]:
        completed, failed, warning = self._tally
        return completed, failed, warning, 0  # each answered before the next begins

    async def _retrieve(self, assoc: OutboundAssociation, ctx: NegotiatedContext,
                        identifier: bytes) -> None:
        self._seen, self._tally = 0, [0, 0, 0]
        async for msg, context_id, data in assoc.get(ctx, identifier, priority=self.priority):
            if isinstance(msg, dimse.CStoreRQ):
                up_ctx = assoc.engine.contexts[context_id]
                self._seen += 1
                status = await self._sub_operation(
                    assoc, context_id, msg, up_ctx.transfer_syntax,
                    self._inbound_for(up_ctx.abstract_syntax, up_ctx.transfer_syntax))
                category = dimse.status_category(status)
                self._tally[0 if category is dimse.StatusCategory.SUCCESS else
                            2 if category is dimse.StatusCategory.WARNING else 1] += 1
                continue
            assert isinstance(msg, dimse.CGetRSP)
            self._relay_response(msg, data, ctx.transfer_syntax)

    async def _sub_operation(self, assoc: OutboundAssociation, context_id: int,
                             rq: dimse.CStoreRQ, transfer_syntax: str,
                             inbound: NegotiatedContext | None) -> int:
        """Relay one C-STORE sub-operation; the status it was answered upstream."""
        if inbound is None:
            async for _ in assoc.fragments():
                pass  # nowhere to send it: read and refuse
            why = (f"the requestor accepted no context for {rq.affected_sop_class_uid} "
                   f"in {transfer_syntax}")
            self._sub_failed(rq, dimse.SOP_CLASS_NOT_SUPPORTED, why)
            assoc.reply_store(context_id, rq, dimse.SOP_CLASS_NOT_SUPPORTED,
                              "the requestor accepted no context for it")
            return dimse.SOP_CLASS_NOT_SUPPORTED
        converted: bytes | None = None
        if inbound.transfer_syntax != transfer_syntax:
            # Another native syntax: the whole data set is needed to convert it, so
            # its size is bounded as for a destination (MAX_CONVERTED_BYTES); past
            # that the rest is read and dropped, never held.
            parts: list[bytes] = []
            size = 0
            async for data, _ in assoc.fragments():
                size += len(data)
                if size <= MAX_CONVERTED_BYTES:
                    parts.append(bytes(data))
                else:
                    parts.clear()
            if size > MAX_CONVERTED_BYTES:
                # The Error Comment holds 64 characters (LO): the log says the rest.
                why = (f"too large to convert ({-(-size >> 20)} MiB, "
                       f"at most {MAX_CONVERTED_BYTES >> 20} MiB)")
                log.warning("%s %s sub-operation %s refused: %s to %s", self.kind,
                            self.label, rq.affected_sop_instance_uid, why,
                            inbound.transfer_syntax)
                assoc.reply_store(context_id, rq, dimse.REFUSED_OUT_OF_RESOURCES, why)
                return dimse.REFUSED_OUT_OF_RESOURCES
            try:
                # Off the event loop: a big one would stall every association of
                # the worker meanwhile (to_thread keeps the log's association).
                converted = await asyncio.to_thread(
                    transcode, b"".join(parts), transfer_syntax, inbound.transfer_syntax)
            except ProtocolError as exc:
                self._sub_failed(rq, dimse.PROCESSING_FAILURE, f"cannot convert it to "
                                 f"{inbound.transfer_syntax}: {exc}")
                assoc.reply_store(context_id, rq, dimse.PROCESSING_FAILURE,
                                  f"cannot convert it: {exc}")
                return dimse.PROCESSING_FAILURE
            finally:
                parts.clear()
        # PS3.4 C.4.3.1.2: every C-STORE sub-operation carries the C-GET's priority,
        # whatever the upstream put on its own.
        mid = self.relay.begin_store(inbound, replace(rq, priority=self.priority))
        result = self.relay.store_result(mid)
        try:
            if converted is not None:
                self.relay.store_data(inbound, converted, True)
                await self.relay.writable()
            else:
                async for data, last in assoc.fragments():
                    self.relay.store_data(inbound, data, last)
                    await self.relay.writable()
        except BaseException as exc:
            # The upstream broke off (or the C-GET stopped) in the middle of the data
            # set: the requestor had a C-STORE-RQ and part of its data, and no other
            # message may start on that association before its last fragment (PS3.8
            # 9.3.5, Annex E). The C-GET-RSP that followed made the requestor decode
            # the truncated data set as an instance (an outside campaign, Orthanc
            # killed mid-get). Nothing can finish it: the association is aborted.
            result.add_done_callback(_quiet)  # failed by the abort: nobody waits now
            self.relay.abort(f"the C-STORE sub-operation could not be finished: "
                             f"{exc or type(exc).__name__}")
            raise
        try:
            async with asyncio.timeout(self.upstream.timeout):
                rsp = await result
        except TimeoutError:
            self._sub_failed(rq, dimse.PROCESSING_FAILURE, f"the requestor did not answer "
                             f"the C-STORE in {self.upstream.timeout:g} s")
            assoc.reply_store(context_id, rq, dimse.PROCESSING_FAILURE,
                              "the requestor did not answer the C-STORE")
            return dimse.PROCESSING_FAILURE
        self.relayed += 1
        # The requestor did not say it stored the instance unless its status is final.
        status, comment = dimse.final_store_status(int(rsp.status), rsp.error_comment,
                                                   "the requestor")
        if dimse.status_category(status) is not dimse.StatusCategory.SUCCESS:
            self._sub_failed(rq, status, "the requestor's answer" + (
                f": {comment}" if comment else ""))
        assoc.reply_store(context_id, rq, status, comment)
        return status

    def _sub_failed(self, rq: dimse.CStoreRQ, status: int, why: str) -> None:
        """One line per sub-operation that did not succeed: the final response counts
        them, and lists the failed UIDs (PS3.4 C.4.3.1.3.1), but not why."""
        level = logging.INFO if dimse.status_category(status) is \
            dimse.StatusCategory.WARNING else logging.WARNING
        log.log(level, "%s %s sub-operation %s status 0x%04X: %s", self.kind, self.label,
                rq.affected_sop_instance_uid, status, why)

    def _outcome(self) -> str:
        return f"{self.label} via {self.upstream.name}: {self.relayed} instance(s) relayed,"
