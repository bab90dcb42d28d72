"""DIMSE-N relays: MPPS and Storage Commitment through the router (DESIGN.md D7).

Theory of operation
-------------------
``[routing] mpps`` and ``[routing] storage_commitment`` name the destination each
service is relayed to. A relayed request keeps everything but its message ID
(PS3.7 §10.1: the SOP instance, action or event type and data set go through as
they came, re-encoded only when the two associations' transfer syntaxes differ),
and the destination's response goes back to the requestor likewise, status,
affected instance and data set included.

- Modality Performed Procedure Step (PS3.4 F.7): N-CREATE and N-SET, relayed
  synchronously, each on an association of its own.
- Storage Commitment Push Model (PS3.4 J.3): the N-ACTION is relayed; before it
  goes, the Transaction UID and the requestor's AE title are written to
  ``<spool>/commitments/<Transaction UID>.json``, because the PACS answers later
  with an N-EVENT-REPORT on an association of its own, which may reach any
  worker (or a restarted router). The worker that gets the report finds the
  requestor there, opens an association to the ``[[destination]]`` with that AE
  title (proposing the SCP role, PS3.4 J.3.3 / PS3.7 D.3.3.4), relays the report
  and answers the PACS with the requestor's status. The record is deleted once
  the report has been delivered, or when the N-ACTION itself failed (the
  requestor was told so, and will ask again: a late report of it is not relayed).
  A record whose report never comes (a PACS that answers elsewhere, or not at
  all) is forgotten after :data:`COMMITMENT_KEEP` (``sweep_commitments``, from
  the first worker's heartbeat): a router up for years must not keep one file per
  N-ACTION for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final, TypeAlias

from router.config import Destination
from router.dicom import dimse, uids
from router.dicom.dataset import decode_dataset, transcode
from router.net.client import response_for
from workers.outbound import (
    OutboundAssociation,
    OutboundError,
    open_association,
    proposal_syntaxes,
)

__all__ = ["COMMITMENTS_DIR", "COMMITMENT_KEEP", "forget_commitment", "relay_n_request",
           "remember_commitment", "requestor_of", "sweep_commitments"]

log = logging.getLogger("workers.nservices")

COMMITMENTS_DIR: Final = "commitments"
#: Seconds a Storage Commitment request waits for its result. PS3.4 J.3.3 sets no
#: limit; PACS answer in minutes, those that commit on archiving in hours or days.
COMMITMENT_KEEP: Final = 30 * 86400.0

# Releases under way of relays already answered (a task needs a strong reference).
_releasing: set[asyncio.Task[None]] = set()


# serve(request, its data set, its transfer syntax) -> (response, its data set)
Serve: TypeAlias = Callable[[Any, bytes | None, str], Awaitable[tuple[Any, bytes | None]]]


async def relay_n_request(destination: Destination, rq: Any, dataset: bytes | None,
                          transfer_syntax: str, *, label: str, sop_class: str,
                          as_scp: bool = False, serve: Serve | None = None,
                          linger: float = 0.0) -> tuple[Any, bytes | None]:
    """Send ``rq`` (with ``dataset`` in ``transfer_syntax``) to ``destination``; the
    response (its message ID still the relayed one) and its data set, converted
    back to ``transfer_syntax``. ``as_scp`` proposes the SCP role for ``sop_class``
    (an N-EVENT-REPORT sent by the performer). Raises :class:`OutboundError`.

    With ``serve``, the association stays open up to ``linger`` seconds after the
    answer, for one request the destination may send on it (a PACS's Storage
    Commitment N-EVENT-REPORT, PS3.4 J.3.3), which ``serve`` answers; then it is
    released, in the background either way."""
    assoc = await open_association(
        destination, [(sop_class, proposal_syntaxes(transfer_syntax))], label=label,
        roles={sop_class: (False, True)} if as_scp else None)
    try:
        ctx = assoc.context_for_model(sop_class)
        if ctx is None and as_scp:
            ctx = next((c for c in assoc.engine.contexts.values()
                        if c.abstract_syntax == sop_class), None)
        if ctx is None:
            raise OutboundError(f"{destination} accepts no context for {sop_class}",
                                transient=False)
        data = _convert(dataset, transfer_syntax, ctx.transfer_syntax)
        relayed = dataclasses.replace(rq, message_id=assoc.next_message_id())
        rsp, rsp_data = await assoc.n_request(ctx, relayed, data)
        answer = rsp, _convert(rsp_data, ctx.transfer_syntax, transfer_syntax)
    except BaseException:  # a failure, a timeout's cancellation: nothing more to say
        if assoc.is_associated:
            assoc.abort("N-service relay ended")
        raise
    # The answer goes to the requestor now, the release after it. A performer may
    # send its N-EVENT-REPORT as soon as it has answered the N-ACTION (PS3.4 J.3.3),
    # some before they answer the A-RELEASE: waiting for the release here sent the
    # modality the report of a commitment before the N-ACTION-RSP that accepted it.
    task = asyncio.get_running_loop().create_task(_serve_then_release(assoc, serve, linger))
    _releasing.add(task)
    task.add_done_callback(_releasing.discard)
    return answer


async def _serve_then_release(assoc: OutboundAssociation, serve: Serve | None,
                              linger: float) -> None:
    """Released at once, the association could not answer a report sent on it: the
    PACS sends it after its N-ACTION-RSP, our A-RELEASE-RQ crosses it, and PS3.8
    Table 9-10 lets the side awaiting the release response (Sta7) take P-DATA but
    not send any. The PACS then waited for its N-EVENT-REPORT-RSP until its own
    timeout, and the modality never heard the result."""
    if serve is not None and linger > 0:
        try:
            async with asyncio.timeout(linger):
                context_id, request, data = await assoc.next_request()
        except TimeoutError:
            pass  # nothing sent on it: the report comes on an association of its own
        except OutboundError as exc:
            log.info("%s: %s", assoc.label, exc)  # ended by the destination: fine
        else:
            context = assoc.engine.contexts.get(context_id)
            if context is None:  # (the engine takes commands on accepted contexts only)
                assoc.abort("a request on a context it does not have")
                return
            try:
                rsp, rsp_data = await serve(request, data, context.transfer_syntax)
            except BaseException:
                assoc.abort("the request sent on it could not be answered")
                raise
            assoc.respond(context_id, rsp, rsp_data)
    for context_id, request, _ in assoc.held_requests():
        # Sent before the answer to ours, and nobody here to take it: answered.
        log.warning("%s: %s sent on it refused: not taken on this association",
                    assoc.label, type(request).__name__[:-2])
        assoc.respond(context_id, response_for(
            request, dimse.UNRECOGNIZED_OPERATION,
            error_comment="not taken on this association"), None)
    await _release(assoc)


async def _release(assoc: OutboundAssociation) -> None:
    try:
        await assoc.release()
    except Exception as exc:  # answered already: only the log can hear of it
        log.warning("%s: release after the answer failed: %s", assoc.label, exc)
        assoc.abort("release failed")


def remember_commitment(spool: Path, dataset: bytes | None, transfer_syntax: str,
                        requestor: str) -> str | None:
    """Record who asked for the commitment in ``dataset`` (PS3.4 J.3.2.1: its
    Transaction UID); the UID, or None if the request has none."""
    uid = _transaction_uid(dataset, transfer_syntax)
    if uid is None:
        return None
    folder = spool / COMMITMENTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{uid}.tmp"
    tmp.write_text(json.dumps({"requestor": requestor}), encoding="utf-8")
    os.replace(tmp, folder / f"{uid}.json")
    return uid


def requestor_of(spool: Path, dataset: bytes | None, transfer_syntax: str,
                 ) -> tuple[str | None, str | None]:
    """(Transaction UID, AE title of who asked) for an N-EVENT-REPORT's data set."""
    uid = _transaction_uid(dataset, transfer_syntax)
    if uid is None:
        return None, None
    try:
        record = json.loads((spool / COMMITMENTS_DIR / f"{uid}.json").read_text("utf-8"))
    except (OSError, ValueError):
        return uid, None
    requestor = record.get("requestor")
    return uid, requestor if isinstance(requestor, str) else None


def forget_commitment(spool: Path, uid: str) -> None:
    with contextlib.suppress(OSError):
        (spool / COMMITMENTS_DIR / f"{uid}.json").unlink()


def sweep_commitments(spool: Path, now: float, keep: float = COMMITMENT_KEEP) -> int:
    """Forget the records written more than ``keep`` seconds before ``now`` (wall
    clock, as file times are), and the leftovers of a write cut short; how many
    records went. A result arriving after that is refused as for an unknown
    transaction, saying so."""
    forgotten = 0
    try:
        entries = list(os.scandir(spool / COMMITMENTS_DIR))
    except FileNotFoundError:
        return 0
    for entry in entries:
        with contextlib.suppress(OSError):  # gone meanwhile: answered, or another worker
            if entry.stat(follow_symlinks=False).st_mtime > now - keep:
                continue
            os.unlink(entry.path)
            forgotten += entry.name.endswith(".json") and not entry.name.startswith(".")
    if forgotten:
        log.warning("storage commitment: %d request(s) without a result after %.0f days "
                    "forgotten (their requestors never heard; a later result is refused)",
                    forgotten, keep / 86400)
    return forgotten


def _transaction_uid(dataset: bytes | None, transfer_syntax: str) -> str | None:
    if not dataset:
        return None
    try:
        value = decode_dataset(dataset, transfer_syntax).get("TransactionUID")
    except Exception:  # an undecodable data set has no usable Transaction UID
        return None
    text = str(value or "").strip()
    # A UID (PS3.5 §9.1): it names a file here, so nothing else gets through.
    return text if uids.is_plain_uid(text) else None


def _convert(data: bytes | None, source: str, target: str) -> bytes | None:
    return None if data is None else transcode(data, source, target)

