"""The sans-I/O DICOM association engine (PS3.8 upper layer + PS3.7 message exchange).

Theory of operation
-------------------
One :class:`Association` object is one side of one TCP connection, requestor
or acceptor. It owns no socket, thread or clock:

- bytes in:  ``receive_data(data)`` (``b""`` = the peer closed the connection);
- events out: ``next_event()`` returns an :mod:`router.dicom.events` value or
  ``NEED_DATA``; call it until it returns ``NEED_DATA``;
- local primitives: ``request``/``connection_made``/``accept``/``reject``/
  ``send_message``/``send_data``/``release``/``release_response``/``abort``;
- bytes out: ``data_to_send()`` returns the buffers to write, in order, as a
  list suitable for ``socket.sendmsg`` or ``transport.writelines``;
- time: the engine says whether the ARTIM timer should run (``artim``: a
  generation number, or ``None`` when stopped); the caller arms a timer and
  calls ``timer_expired()`` when it fires;
- transport: ``wants_connect`` (requestor: open the TCP connection, then call
  ``connection_made()``), ``wants_close`` (close after flushing).

Every event goes through :func:`router.dicom.fsm.step`, the literal PS3.8
Table 9-10; this module only turns bytes into events and outputs into bytes.

P-DATA
~~~~~~
Incoming PDVs are checked against the message sequence rules of PS3.8 Annex E
and PS3.7 §6.3.1 (a command set, then its data set if the command says there is
one, both on the same accepted presentation context) and surfaced as
``CommandReceived`` and as a stream of ``DataReceived`` fragments: the data set
is never assembled here, so a consumer can write it to disk as it arrives.
Outgoing command and data sets are fragmented to the peer's maximum PDU length
(PS3.8 Annex D.1), one PDV per PDU, without copying the payload.

A violation by the peer becomes Evt19 (PS3.8: "unrecognized or invalid PDU"),
which in Sta6 is AA-8: A-ABORT with source service-provider, an A-P-ABORT
indication carrying the reason in one line, and ARTIM until the peer closes.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Final

from router.dicom import fsm
from router.dicom.dimse import DimseMessage, decode_command, encode_command, peek_command
from router.dicom.errors import (
    AbortReason,
    AbortSource,
    DIMSEError,
    LocalProtocolError,
    PDUDecodeError,
    RemoteProtocolError,
)
from router.dicom.events import (
    NEED_DATA,
    AssociationAborted,
    AssociationEstablished,
    AssociationRejected,
    AssociationRequested,
    CommandReceived,
    CommandRejected,
    ConnectionClosed,
    DataReceived,
    Event,
    ReleaseCompleted,
    ReleaseRequested,
    _Sentinel,
)
from router.dicom.fsm import Event as Evt
from router.dicom.fsm import State
from router.dicom.negotiation import NegotiatedContext, accepted_contexts, provider_check
from router.dicom.pdu import (
    PDU,
    PDV,
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRP,
    AReleaseRQ,
    PDataTF,
    PDUReader,
    encode_pdata_chunks,
    encode_pdu,
    single_pdv_header,
)

__all__ = ["MAX_ASSOCIATE_PDU_LENGTH", "Association", "Role"]

Buffer = bytes | bytearray | memoryview

# When the peer advertises 0 ("no limit", PS3.8 Annex D.1) we still fragment,
# so that a 2 GB data set never becomes one PDU the peer must buffer whole.
UNLIMITED_FRAGMENT = 1 << 20

# A command set is a handful of group-0000 elements; anything this large is an
# attack or a bug, not a command (PS3.7 §6.3.1).
MAX_COMMAND_SET = 1 << 20

_PDU_EVENTS: dict[type, Evt] = {
    AAssociateAC: Evt.EVT3,
    AAssociateRJ: Evt.EVT4,
    AAssociateRQ: Evt.EVT6,
    PDataTF: Evt.EVT10,
    AReleaseRQ: Evt.EVT12,
    AReleaseRP: Evt.EVT13,
    AAbort: Evt.EVT16,
}

# The two cells of Table 9-10 that carry data, thousands of times a second:
# P-DATA-TF received in Sta6 is DT-2 and P-DATA request in Sta6 is DT-1, both
# staying in Sta6 with no output other than the indication or the PDU. The
# engine performs them inline; this check keeps the table the authority.
assert fsm.TRANSITIONS[(State.STA6, Evt.EVT10)] is fsm.Action.DT_2
assert fsm.TRANSITIONS[(State.STA6, Evt.EVT9)] is fsm.Action.DT_1
assert fsm.ACTIONS[fsm.Action.DT_2](fsm.ActionInput(is_requestor=False))[0] is State.STA6
assert fsm.ACTIONS[fsm.Action.DT_1](
    fsm.ActionInput(is_requestor=False, pdu=AReleaseRQ()))[0] is State.STA6

_ASSOCIATED_STATES = frozenset(
    {State.STA6, State.STA7, State.STA8, State.STA9, State.STA10, State.STA11, State.STA12}
)


class Role(enum.Enum):
    REQUESTOR = "requestor"
    ACCEPTOR = "acceptor"


class _Incoming:
    """Where we are in the inbound message sequence (PS3.7 §6.3.1)."""

    __slots__ = ("command_chunks", "command_context", "command_size", "data_context")

    def __init__(self) -> None:
        # One buffer, not a list of fragments: its memory is the bytes it holds.
        self.command_chunks = bytearray()
        self.command_context: int | None = None
        self.command_size = 0
        # Context of the data set we expect next (after a command that has one).
        self.data_context: int | None = None


#: Largest A-ASSOCIATE (and other non-P-DATA) PDU taken. A real one is a few KB: 128
#: presentation contexts of a dozen transfer syntaxes each, role selection for each,
#: a user identity token of tens of KB still fit many times over. The peer is not
#: associated yet, and anyone may connect: with 4 MiB, 300 connections that never
#: finished their request held 1.2 GB. A larger length is refused at its header
#: (A-ABORT, PS3.8 §9.3.8, before the body is waited for).
MAX_ASSOCIATE_PDU_LENGTH: Final = 256 << 10


class Association:
    """One side of one DICOM association, as a sans-I/O state machine."""

    def __init__(self, role: Role, *,
                 max_associate_pdu_length: int = MAX_ASSOCIATE_PDU_LENGTH) -> None:
        self.role = role
        self.state = State.STA1
        self.request_pdu: AAssociateRQ | None = None
        self.accept_pdu: AAssociateAC | None = None
        self.contexts: Mapping[int, NegotiatedContext] = {}
        # Largest PDU we may send (peer's maximum length, 0 = no limit).
        self.peer_max_pdu = 0
        # Until a maximum length is negotiated, a P-DATA-TF may be no larger than
        # an A-ASSOCIATE PDU: an unassociated peer cannot make us buffer more.
        self._reader = PDUReader(max_pdu_length=max_associate_pdu_length,
                                 max_associate_pdu_length=max_associate_pdu_length)
        self._outbox: list[Buffer] = []
        self._events: deque[Event] = deque()
        self._incoming = _Incoming()
        self._eof = False
        self._artim_generation = 0
        self.artim: int | None = None
        self.wants_connect = False
        self.wants_close = False
        self.bytes_received = 0
        #: Whole PDUs from the peer: what an idle timer counts as activity (a peer
        #: that trickles bytes of a PDU is not active).
        self.pdus_received = 0
        self.bytes_sent = 0
        # Why the engine aborted or refused the association, in one line.
        self.abort_detail = ""
        self._action: fsm.Action | None = None
        # After a framing error nothing more from the peer can be parsed.
        self._discard_input = False

    # ------------------------------------------------------------------ status

    @property
    def is_requestor(self) -> bool:
        return self.role is Role.REQUESTOR

    @property
    def is_established(self) -> bool:
        """True in Sta6 (ready for data transfer)."""
        return self.state is State.STA6

    @property
    def is_associated(self) -> bool:
        """True from acceptance until release or abort (Sta6-Sta12)."""
        return self.state in _ASSOCIATED_STATES

    # What the local user may do now (Table 9-10 has a cell for the primitive in this
    # state). The engine reads every byte it is given before the user answers, so a
    # peer's A-ABORT (or any PDU that ends the association) behind a request can leave
    # the user holding events it may no longer answer: it asks these first.

    @property
    def may_answer_association(self) -> bool:
        """An A-ASSOCIATE response (Evt7/Evt8) is valid: Sta3."""
        return (self.state, Evt.EVT7) in fsm.TRANSITIONS

    @property
    def may_send_data(self) -> bool:
        """A P-DATA request (Evt9) is valid: Sta6, or Sta8 (answering before the
        A-RELEASE response)."""
        return (self.state, Evt.EVT9) in fsm.TRANSITIONS

    @property
    def may_answer_release(self) -> bool:
        """An A-RELEASE response (Evt14) is valid: Sta8, Sta9, Sta12."""
        return (self.state, Evt.EVT14) in fsm.TRANSITIONS

    @property
    def max_send_fragment(self) -> int:
        """Largest PDV payload we may put in one P-DATA-TF (PDU length - 6)."""
        limit = self.peer_max_pdu or UNLIMITED_FRAGMENT
        return max(limit - 6, 1)

    @property
    def mid_message(self) -> bool:
        """True while the peer has started a DIMSE message (or a PDU) and not
        finished it: what we have is waiting for the rest."""
        inc = self._incoming
        return (inc.command_context is not None or inc.data_context is not None
                or self.pdu_in_progress)

    @property
    def pdu_in_progress(self) -> bool:
        """True while part of a PDU has arrived and the rest has not."""
        return self._reader.buffered > 0 and not self._discard_input

    @property
    def bytes_to_send(self) -> int:
        return sum(len(b) for b in self._outbox)

    # ------------------------------------------------------------- transport

    def connection_made(self) -> None:
        """Transport connected: Evt2 for the requestor, Evt5 for the acceptor."""
        if self.is_requestor:
            self.wants_connect = False
            self._step(Evt.EVT2, fsm.ActionInput(is_requestor=True, pdu=self.request_pdu))
        else:
            self._step(Evt.EVT5, fsm.ActionInput(is_requestor=False))

    def receive_data(self, data: Buffer) -> None:
        """Give the engine bytes from the peer; ``b""`` means the peer closed (Evt17)."""
        if not data:
            self._eof = True
            return
        if self.state is State.STA1 or self._discard_input:
            return  # closed, or unframeable: nothing more is read
        self.bytes_received += len(data)
        self._reader.feed(data)

    def timer_expired(self) -> None:
        """The ARTIM timer the caller armed for generation ``artim`` fired (Evt18)."""
        if self.artim is None:
            return
        self._step(Evt.EVT18, fsm.ActionInput(is_requestor=self.is_requestor))

    def data_to_send(self) -> list[Buffer]:
        """Take the buffers to write, in order (may be empty)."""
        out, self._outbox = self._outbox, []
        return out

    # ------------------------------------------------------------ events out

    def next_event(self) -> Event | _Sentinel:
        """Return the next event, or ``NEED_DATA``."""
        while not self._events:
            if self.state is State.STA1:
                self._eof = False
                return NEED_DATA
            try:
                pdu = None if self._discard_input else self._reader.next_pdu()
            except PDUDecodeError as exc:
                self._discard_input = True
                self._reader = PDUReader()
                self._invalid_pdu(str(exc), exc.reason)
                continue
            if pdu is None:
                if self._eof:
                    self._eof = False
                    self._step(Evt.EVT17, fsm.ActionInput(is_requestor=self.is_requestor))
                    continue
                return NEED_DATA
            self.pdus_received += 1
            if self.state is State.STA6 and type(pdu) is PDataTF:
                self._pdata_received(pdu)  # DT-2, inline (see the check at the top)
                continue
            self._pdu_received(pdu)
        return self._events.popleft()

    # ------------------------------------------------- local primitives (user)

    def request(self, rq: AAssociateRQ) -> None:
        """A-ASSOCIATE request (Evt1): the caller then opens the transport."""
        if not self.is_requestor:
            raise LocalProtocolError("only the requestor sends an A-ASSOCIATE-RQ")
        self.request_pdu = rq
        self._step(Evt.EVT1, fsm.ActionInput(is_requestor=True, pdu=rq))

    def accept(self, ac: AAssociateAC) -> Mapping[int, NegotiatedContext]:
        """A-ASSOCIATE response (accept), Evt7; returns the negotiated contexts."""
        if self.request_pdu is None or self.is_requestor:
            raise LocalProtocolError("accept() answers an A-ASSOCIATE-RQ we received")
        self._step(Evt.EVT7, fsm.ActionInput(is_requestor=False, pdu=ac))
        self.accept_pdu = ac
        self.contexts = accepted_contexts(self.request_pdu, ac)
        self.peer_max_pdu = _maximum_length(self.request_pdu)
        self._reader.max_pdu_length = _maximum_length(ac)
        return self.contexts

    def reject(self, rj: AAssociateRJ) -> None:
        """A-ASSOCIATE response (reject), Evt8 (AE-8: send RJ, start ARTIM)."""
        self._step(Evt.EVT8, fsm.ActionInput(is_requestor=self.is_requestor, pdu=rj))

    def release(self) -> None:
        """A-RELEASE request (Evt11)."""
        self._step(Evt.EVT11, fsm.ActionInput(is_requestor=self.is_requestor, pdu=AReleaseRQ()))

    def release_response(self) -> None:
        """A-RELEASE response (Evt14), after a ``ReleaseRequested`` event."""
        self._step(Evt.EVT14, fsm.ActionInput(is_requestor=self.is_requestor, pdu=AReleaseRP()))

    def abort(self, detail: str = "aborted by the local user") -> None:
        """A-ABORT request (Evt15); harmless once the association is gone."""
        if self.state in (State.STA1, State.STA2, State.STA13):
            # Nothing to abort (Table 9-10 has no Evt15 here): just drop the line.
            if self.state is not State.STA1:
                self.wants_close = True
            return
        self.abort_detail = detail
        abort = AAbort(source=int(AbortSource.SERVICE_USER), reason=0)
        self._step(Evt.EVT15, fsm.ActionInput(is_requestor=self.is_requestor, abort=abort))

    def send_message(
        self, context_id: int, message: DimseMessage, dataset: Buffer | None = None
    ) -> None:
        """Send a DIMSE message (P-DATA request, Evt9) and, if given, its data set.

        ``message.has_dataset`` must agree with ``dataset``; to stream a large
        data set, pass ``None`` here and then call :meth:`send_data` per chunk.
        """
        self._check_context(context_id)
        command = encode_command(message)
        self._send_fragments(context_id, True, memoryview(command), True)
        if dataset is not None:
            if not message.has_dataset:
                raise LocalProtocolError("a data set was given for a message without one")
            self._send_fragments(context_id, False, memoryview(dataset), True)

    def send_data(self, context_id: int, data: Buffer, last: bool) -> None:
        """Send a chunk of a data set; ``last`` on the final chunk."""
        self._check_context(context_id)
        self._send_fragments(context_id, False, memoryview(data), last)

    # ---------------------------------------------------------------- inside

    def _check_context(self, context_id: int) -> None:
        if context_id not in self.contexts:
            raise LocalProtocolError(f"presentation context {context_id} was not accepted")

    def _send_fragments(self, context_id: int, is_command: bool, data: memoryview,
                        last: bool) -> None:
        size = self.max_send_fragment
        total = len(data)
        starts = range(0, total, size) if total else range(1)
        for start in starts:
            chunk = data[start:start + size]
            final = last and start + size >= total
            if self.state is State.STA6:
                # DT-1, inline (see the check at the top): header and payload
                # go out as two buffers, the payload uncopied.
                header = single_pdv_header(context_id, is_command, final, len(chunk))
                self._outbox.append(header)
                self._outbox.append(chunk)
                self.bytes_sent += len(header) + len(chunk)
                continue
            pdu = PDataTF(pdvs=(PDV(context_id=context_id, is_command=is_command,
                                    is_last=final, data=chunk),))
            self._step(Evt.EVT9, fsm.ActionInput(is_requestor=self.is_requestor, pdu=pdu))

    def _step(self, event: Evt, inp: fsm.ActionInput) -> None:
        previous = self.state
        action, next_state, outputs = fsm.step(previous, event, inp)
        self.state = next_state
        self._action = action
        for out in outputs:
            self._perform(out)
        if next_state is State.STA1 and previous is not State.STA1:
            # Whatever the path (AE-4, AR-3, AR-5, AA-2..5), the connection is over.
            self.wants_close = True
            self.artim = None
            self._events.append(ConnectionClosed())

    def _perform(self, out: fsm.Output) -> None:
        if isinstance(out, fsm.SendPDU):
            self._emit_pdu(out.pdu)
        elif isinstance(out, fsm.Indication):
            self._indicate(out)
        elif isinstance(out, fsm.ArtimStart):
            self._artim_generation += 1
            self.artim = self._artim_generation
        elif isinstance(out, fsm.ArtimStop):
            self.artim = None
        elif isinstance(out, fsm.ConnectTransport):
            self.wants_connect = True
        elif isinstance(out, fsm.CloseTransport):
            self.wants_close = True

    def _emit_pdu(self, pdu: PDU) -> None:
        if isinstance(pdu, PDataTF):
            chunks = encode_pdata_chunks(pdu.pdvs)
            self._outbox.extend(chunks)
            self.bytes_sent += sum(len(c) for c in chunks)
        else:
            raw = encode_pdu(pdu)
            self._outbox.append(raw)
            self.bytes_sent += len(raw)
            if isinstance(pdu, AAssociateRQ):
                self._reader.max_pdu_length = _maximum_length(pdu)

    def _indicate(self, ind: fsm.Indication) -> None:
        kind = ind.kind
        K = fsm.IndicationKind
        if kind is K.P_DATA_INDICATION:
            assert isinstance(ind.pdu, PDataTF)
            self._pdata_received(ind.pdu)
        elif kind is K.ASSOCIATE_INDICATION:
            assert isinstance(ind.pdu, AAssociateRQ)
            self.request_pdu = ind.pdu
            self._events.append(AssociationRequested(request=ind.pdu))
        elif kind is K.ASSOCIATE_ACCEPT_CONFIRMATION:
            assert isinstance(ind.pdu, AAssociateAC) and self.request_pdu is not None
            self.accept_pdu = ind.pdu
            self.contexts = accepted_contexts(self.request_pdu, ind.pdu)
            self.peer_max_pdu = _maximum_length(ind.pdu)
            self._events.append(AssociationEstablished(
                request=self.request_pdu, accept=ind.pdu, contexts=self.contexts))
        elif kind is K.ASSOCIATE_REJECT_CONFIRMATION:
            assert isinstance(ind.pdu, AAssociateRJ)
            self._events.append(AssociationRejected(reject=ind.pdu))
        elif kind is K.RELEASE_INDICATION:
            self._events.append(ReleaseRequested())
        elif kind is K.RELEASE_COLLISION_INDICATION:
            # PS3.8 §7.2.2: the requestor answers at once (Sta9 -> AR-9 -> Sta11);
            # the acceptor waits for the requestor's RP (Sta10), then answers.
            if self.is_requestor:
                self.release_response()
        elif kind is K.RELEASE_CONFIRMATION:
            if self.state is State.STA12:
                self.release_response()  # collision, acceptor side: AR-4
            self._events.append(ReleaseCompleted())
        elif kind in (K.ABORT_INDICATION, K.P_ABORT_INDICATION):
            pdu = ind.pdu
            local = self._action is fsm.Action.AA_8
            if isinstance(pdu, AAbort):
                source, reason = pdu.source, pdu.reason
            else:  # Evt17 without an A-ABORT: the transport went away
                source, reason = int(AbortSource.SERVICE_PROVIDER), 0
            if local:
                detail = self.abort_detail
            elif pdu is None:
                detail = "connection closed by peer without release or abort"
            else:
                detail = f"A-ABORT received from peer (source {source}, reason {reason})"
            self._events.append(AssociationAborted(
                source=source, reason=reason, provider=kind is K.P_ABORT_INDICATION,
                local=local, detail=detail))
        # TRANSPORT_CONNECTED needs no user event.

    def _pdu_received(self, pdu: PDU) -> None:
        event = _PDU_EVENTS[type(pdu)]
        action = fsm.TRANSITIONS.get((self.state, event))
        if action in (fsm.Action.AA_1, fsm.Action.AA_7, fsm.Action.AA_8):
            # A well-formed PDU that is not expected in this state.
            self.abort_detail = f"unexpected {type(pdu).__name__} PDU in {self.state.name}"
            inp = fsm.ActionInput(is_requestor=self.is_requestor, pdu=pdu,
                                  abort=self._abort_pdu(event, AbortReason.UNEXPECTED_PDU))
        elif event is Evt.EVT6:
            assert isinstance(pdu, AAssociateRQ)
            reject = provider_check(pdu)
            if reject is not None:
                # AE-6 issues no indication: keep the reason for the caller's log.
                self.abort_detail = (
                    f"rejected by the service provider (result {int(reject.result)} source "
                    f"{int(reject.source)} reason {reject.reason}): protocol version "
                    f"{pdu.protocol_version:#06x} does not include version 1")
            inp = fsm.ActionInput(is_requestor=False, pdu=pdu, provider_reject=reject)
        else:
            inp = fsm.ActionInput(is_requestor=self.is_requestor, pdu=pdu)
        self._step(event, inp)

    def _invalid_pdu(self, detail: str, reason: AbortReason) -> None:
        """Evt19: unrecognized or invalid PDU (decode error or sequence violation)."""
        if self.state is State.STA1:
            return
        self.abort_detail = detail
        self._step(Evt.EVT19, fsm.ActionInput(is_requestor=self.is_requestor,
                                              abort=self._abort_pdu(Evt.EVT19, reason)))

    def _abort_pdu(self, event: Evt, reason: AbortReason) -> AAbort:
        """The A-ABORT the table's action sends: AA-1 says service-user source
        (Table 9-9; its reason is then not significant and sent as 0), AA-7 and
        AA-8 service-provider source with the reason."""
        if fsm.TRANSITIONS.get((self.state, event)) is fsm.Action.AA_1:
            return AAbort(source=int(AbortSource.SERVICE_USER), reason=0)
        return AAbort(source=int(AbortSource.SERVICE_PROVIDER), reason=int(reason))

    def _pdata_received(self, pdu: PDataTF) -> None:
        try:
            for pdv in pdu.pdvs:
                self._pdv_received(pdv)
        except RemoteProtocolError as exc:
            self._invalid_pdu(str(exc), exc.reason)

    def _pdv_received(self, pdv: PDV) -> None:
        inc = self._incoming
        ctx = pdv.context_id
        if ctx not in self.contexts:
            raise RemoteProtocolError(
                f"PDV on presentation context {ctx}, which was not accepted",
                reason=AbortReason.INVALID_PDU_PARAMETER_VALUE)
        data = pdv.data if isinstance(pdv.data, memoryview) else memoryview(pdv.data)
        if not pdv.is_last and not data:
            # A fragment that is not a message's last carries data (PS3.8 §9.3.5.1,
            # Annex E). Empty ones cost an object and an event each: a peer sending
            # 174,000 to a 1 MiB PDU kept a worker's loop 0.3 s per PDU and, in a
            # command, its memory growing without bound (an outside campaign). Tiny
            # ones are allowed: CTN's send_image sends about one per element.
            raise RemoteProtocolError(
                f"empty {'command' if pdv.is_command else 'data set'} fragment on "
                f"context {ctx}: a fragment that is not the last carries data "
                "(PS3.8 9.3.5.1)", reason=AbortReason.INVALID_PDU_PARAMETER_VALUE)
        if pdv.is_command:
            if inc.data_context is not None:
                raise RemoteProtocolError(
                    "command fragment while a data set was still expected "
                    f"on context {inc.data_context}",
                    reason=AbortReason.UNEXPECTED_PDU_PARAMETER)
            if inc.command_context is not None and inc.command_context != ctx:
                raise RemoteProtocolError(
                    f"command fragment on context {ctx} interleaved with one on "
                    f"context {inc.command_context}",
                    reason=AbortReason.UNEXPECTED_PDU_PARAMETER)
            inc.command_size += len(data)
            if inc.command_size > MAX_COMMAND_SET:
                raise RemoteProtocolError(
                    f"command set larger than {MAX_COMMAND_SET} bytes",
                    reason=AbortReason.INVALID_PDU_PARAMETER_VALUE)
            if not pdv.is_last:
                inc.command_context = ctx
                inc.command_chunks += data
                return
            if inc.command_chunks:
                inc.command_chunks += data
                raw: Buffer = bytes(inc.command_chunks)
            else:
                raw = data  # the usual case: the whole command set in one PDV
            inc.command_chunks, inc.command_context, inc.command_size = bytearray(), None, 0
            try:
                message = decode_command(raw)
            except DIMSEError as exc:
                peeked = peek_command(raw)
                if peeked is None:  # not even a command: nothing to answer
                    raise RemoteProtocolError(
                        f"undecodable DIMSE command set: {exc}",
                        reason=AbortReason.INVALID_PDU_PARAMETER_VALUE) from None
                # Framed, but unusable: the service user answers it with a
                # failure status (PS3.7 Annex C); the association goes on.
                field, message_id, has_dataset = peeked
                if has_dataset:
                    inc.data_context = ctx
                self._events.append(CommandRejected(
                    context_id=ctx, command_field=field, message_id=message_id,
                    has_dataset=has_dataset, status=exc.status, detail=str(exc)))
                return
            if message.has_dataset:
                inc.data_context = ctx
            self._events.append(CommandReceived(context_id=ctx, message=message))
            return
        if inc.data_context is None:
            raise RemoteProtocolError(
                "data set fragment without a command announcing one",
                reason=AbortReason.UNEXPECTED_PDU_PARAMETER)
        if inc.data_context != ctx:
            raise RemoteProtocolError(
                f"data set fragment on context {ctx}, expected {inc.data_context}",
                reason=AbortReason.UNEXPECTED_PDU_PARAMETER)
        if pdv.is_last:
            inc.data_context = None
        self._events.append(DataReceived(context_id=ctx, data=data, last=pdv.is_last))


def _maximum_length(pdu: AAssociateRQ | AAssociateAC) -> int:
    item = pdu.user_information.maximum_length
    return 0 if item is None else item.maximum_length


def iter_events(assoc: Association) -> Iterable[Event]:
    """Drain ``assoc.next_event()`` until ``NEED_DATA``."""
    while True:
        event = assoc.next_event()
        if event is NEED_DATA:
            return
        assert not isinstance(event, _Sentinel)
        yield event
