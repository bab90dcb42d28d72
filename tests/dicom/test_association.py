"""The sans-I/O engine: two engines joined in memory (no sockets, no clocks)."""

from __future__ import annotations

import pytest

from router.dicom import dimse, uids
from router.dicom.association import Association, Role, iter_events
from router.dicom.errors import AbortReason, AbortSource, LocalProtocolError
from router.dicom.events import (
    NEED_DATA,
    AssociationAborted,
    AssociationEstablished,
    AssociationRejected,
    AssociationRequested,
    CommandReceived,
    ConnectionClosed,
    DataReceived,
    Event,
    ReleaseCompleted,
    ReleaseRequested,
)
from router.dicom.fsm import State
from router.dicom.negotiation import AcceptorPolicy, build_request, negotiate
from router.dicom.pdu import (
    PDV,
    AAbort,
    AReleaseRQ,
    PDataTF,
    RejectReason,
    encode_pdata_chunks,
    encode_pdu,
)

CT = "1.2.840.10008.5.1.4.1.1.2"


def _echo_rq(message_id: int) -> dimse.CEchoRQ:
    return dimse.CEchoRQ(message_id=message_id, affected_sop_class_uid=uids.VERIFICATION_SOP_CLASS)


def _flush(src: Association, dst: Association) -> None:
    data = b"".join(bytes(c) for c in src.data_to_send())
    if data:
        dst.receive_data(data)


class Pair:
    """A requestor and an acceptor joined back to back in memory."""

    def __init__(self, *, requestor_max: int = 16384, acceptor_max: int = 16384,
                 policy: AcceptorPolicy | None = None, contexts=None) -> None:
        self.req = Association(Role.REQUESTOR)
        self.acc = Association(Role.ACCEPTOR)
        self.policy = policy or AcceptorPolicy(maximum_length=acceptor_max)
        self.rq = build_request(
            calling_ae_title="SCU", called_ae_title="SCP",
            contexts=contexts or [(uids.VERIFICATION_SOP_CLASS,
                                   [uids.IMPLICIT_VR_LITTLE_ENDIAN]),
                                  (CT, [uids.EXPLICIT_VR_LITTLE_ENDIAN])],
            maximum_length=requestor_max)

    def pump(self) -> tuple[list[Event], list[Event]]:
        """Move bytes both ways until quiet; return events seen on each side."""
        req_events: list[Event] = []
        acc_events: list[Event] = []
        for _ in range(100):
            _flush(self.req, self.acc)
            _flush(self.acc, self.req)
            new_acc = list(iter_events(self.acc))
            new_req = list(iter_events(self.req))
            acc_events += new_acc
            req_events += new_req
            for ev in new_acc:
                if isinstance(ev, AssociationRequested):
                    answer = negotiate(ev.request, self.policy)
                    if hasattr(answer, "presentation_contexts"):
                        self.acc.accept(answer)  # type: ignore[arg-type]
                    else:
                        self.acc.reject(answer)  # type: ignore[arg-type]
            if not (new_acc or new_req or self.req._outbox or self.acc._outbox):
                break
        return req_events, acc_events

    def associate(self) -> None:
        self.req.request(self.rq)
        assert self.req.wants_connect
        self.acc.connection_made()
        self.req.connection_made()
        req_events, _ = self.pump()
        assert any(isinstance(e, AssociationEstablished) for e in req_events)
        assert self.req.state is State.STA6 and self.acc.state is State.STA6


def test_associate_echo_release() -> None:
    p = Pair()
    p.associate()
    ctx_id = next(c.context_id for c in p.req.contexts.values()
                  if c.abstract_syntax == uids.VERIFICATION_SOP_CLASS)
    p.req.send_message(ctx_id, _echo_rq(7))
    _, acc_events = p.pump()
    cmd = [e for e in acc_events if isinstance(e, CommandReceived)]
    assert len(cmd) == 1 and isinstance(cmd[0].message, dimse.CEchoRQ)
    assert cmd[0].message.message_id == 7
    p.acc.send_message(ctx_id, dimse.CEchoRSP(message_id_being_responded_to=7,
                                              affected_sop_class_uid=uids.VERIFICATION_SOP_CLASS,
                                              status=0))
    req_events, _ = p.pump()
    assert isinstance(req_events[0], CommandReceived)
    assert req_events[0].message.status == 0
    p.req.release()
    req_events, acc_events = p.pump()
    assert any(isinstance(e, ReleaseRequested) for e in acc_events)
    p.acc.release_response()
    req_events, acc_events = p.pump()
    assert [type(e) for e in req_events] == [ReleaseCompleted, ConnectionClosed]
    assert p.req.state is State.STA1 and p.req.wants_close
    # Acceptor waits in Sta13 for the requestor to close (AR-4 starts ARTIM).
    assert p.acc.state is State.STA13 and p.acc.artim is not None
    p.acc.receive_data(b"")
    assert [type(e) for e in iter_events(p.acc)] == [ConnectionClosed]
    assert p.acc.state is State.STA1 and p.acc.artim is None


@pytest.mark.parametrize("size", [0, 1, 16383 - 6, 16384 - 6, 16384 - 5, 100_000])
def test_dataset_fragmentation_to_peer_max(size: int) -> None:
    """Data sets are cut to the peer's maximum PDU length (PS3.8 Annex D.1) and
    arrive as a stream of fragments that join back to the same bytes."""
    p = Pair(acceptor_max=16384)
    p.associate()
    ct = next(c.context_id for c in p.req.contexts.values() if c.abstract_syntax == CT)
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    p.req.send_message(ct, dimse.CStoreRQ(message_id=1, affected_sop_class_uid=CT,
                                          affected_sop_instance_uid="1.2.3"), payload)
    # Every PDU on the wire respects the acceptor's maximum.
    wire = b"".join(bytes(c) for c in p.req.data_to_send())
    offset = 0
    while offset < len(wire):
        length = int.from_bytes(wire[offset + 2:offset + 6], "big")
        assert length <= 16384
        offset += 6 + length
    p.acc.receive_data(wire)
    events = list(iter_events(p.acc))
    assert isinstance(events[0], CommandReceived)
    frags = [e for e in events if isinstance(e, DataReceived)]
    assert b"".join(bytes(f.data) for f in frags) == payload
    assert frags[-1].last and not any(f.last for f in frags[:-1])
    assert all(len(f.data) <= 16384 - 6 for f in frags)


def test_reject_called_ae() -> None:
    p = Pair(policy=AcceptorPolicy(ae_titles=frozenset({"OTHER"})))
    p.req.request(p.rq)
    p.acc.connection_made()
    p.req.connection_made()
    req_events, _ = p.pump()
    rejected = [e for e in req_events if isinstance(e, AssociationRejected)]
    assert rejected and rejected[0].reject.reason == RejectReason.USER_CALLED_AE_NOT_RECOGNIZED
    assert isinstance(req_events[-1], ConnectionClosed)
    assert p.acc.state is State.STA13 and p.acc.artim is not None  # AE-8


def test_release_collision_both_sides() -> None:
    """PS3.8 §7.2.2: both sides send A-RELEASE-RQ at once; each ends released."""
    p = Pair()
    p.associate()
    p.req.release()
    p.acc.release()
    req_events, acc_events = p.pump()
    assert any(isinstance(e, ReleaseCompleted) for e in req_events)
    assert any(isinstance(e, ReleaseCompleted) for e in acc_events)
    assert p.req.state is State.STA1
    assert p.acc.state is State.STA13  # waits for the requestor to close the transport
    p.acc.receive_data(b"")
    list(iter_events(p.acc))
    assert p.acc.state is State.STA1


def test_artim_expiry_when_peer_sends_nothing() -> None:
    acc = Association(Role.ACCEPTOR)
    acc.connection_made()
    assert acc.state is State.STA2 and acc.artim is not None  # AE-5
    acc.timer_expired()
    assert [type(e) for e in iter_events(acc)] == [ConnectionClosed]  # AA-2
    assert acc.wants_close and acc.state is State.STA1


def test_peer_abort_mid_transfer() -> None:
    p = Pair()
    p.associate()
    ct = next(c.context_id for c in p.req.contexts.values() if c.abstract_syntax == CT)
    p.req.send_message(ct, dimse.CStoreRQ(message_id=1, affected_sop_class_uid=CT,
                                          affected_sop_instance_uid="1.2.3"))
    p.req.send_data(ct, b"\0" * 100, last=False)
    p.req.abort()
    _, acc_events = p.pump()
    aborted = [e for e in acc_events if isinstance(e, AssociationAborted)]
    assert aborted and not aborted[0].provider and aborted[0].source == AbortSource.SERVICE_USER
    assert isinstance(acc_events[-1], ConnectionClosed)  # AA-3 closes


def test_unexpected_pdu_aborts_with_provider_source() -> None:
    """A-RELEASE-RQ before association (Sta2) and garbage in Sta6 (Evt19 -> AA-8)."""
    p = Pair()
    p.associate()
    p.acc.receive_data(b"\x09\x00\x00\x00\x00\x02\x00\x00")  # unknown PDU type 9
    events = list(iter_events(p.acc))
    aborted = [e for e in events if isinstance(e, AssociationAborted)]
    assert aborted and aborted[0].local and aborted[0].provider
    assert aborted[0].reason == AbortReason.UNRECOGNIZED_PDU
    assert p.acc.state is State.STA13
    sent = b"".join(bytes(c) for c in p.acc.data_to_send())
    assert sent == encode_pdu(AAbort(source=2, reason=int(AbortReason.UNRECOGNIZED_PDU)))
    # Whatever follows is not parsed; the peer closing ends it.
    p.acc.receive_data(encode_pdu(AReleaseRQ()))
    p.acc.receive_data(b"")
    assert [type(e) for e in iter_events(p.acc)] == [ConnectionClosed]


def test_data_without_command_is_a_protocol_violation() -> None:
    p = Pair()
    p.associate()
    ct = next(iter(p.acc.contexts))
    pdu = PDataTF(pdvs=(PDV(context_id=ct, is_command=False, is_last=True, data=b"xx"),))
    p.acc.receive_data(b"".join(bytes(c) for c in encode_pdata_chunks(pdu.pdvs)))
    events = list(iter_events(p.acc))
    assert isinstance(events[0], AssociationAborted) and events[0].local
    assert "without a command" in events[0].detail


def test_pdv_on_unaccepted_context_aborts() -> None:
    p = Pair()
    p.associate()
    pdu = PDataTF(pdvs=(PDV(context_id=99, is_command=True, is_last=True, data=b"xx"),))
    p.acc.receive_data(encode_pdu(pdu))
    events = list(iter_events(p.acc))
    assert isinstance(events[0], AssociationAborted)
    assert "context 99" in events[0].detail


def test_local_primitive_in_wrong_state_is_local_error() -> None:
    acc = Association(Role.ACCEPTOR)
    with pytest.raises(LocalProtocolError):
        acc.release()
    p = Pair()
    p.associate()
    with pytest.raises(LocalProtocolError):
        p.req.send_message(99, _echo_rq(1))


def test_oversized_pdata_is_rejected_before_buffering() -> None:
    """A P-DATA-TF longer than the maximum we advertised aborts the association at
    once, from the 6-byte header alone."""
    p = Pair(acceptor_max=16384)
    p.associate()
    p.acc.receive_data(b"\x04\x00" + (16385).to_bytes(4, "big"))
    events = list(iter_events(p.acc))
    assert isinstance(events[0], AssociationAborted) and events[0].local
    assert p.acc.next_event() is NEED_DATA


def test_framed_but_invalid_command_is_rejected_not_aborted() -> None:
    """A command set whose framing is sound but whose values are not (here a UID
    with letters, PS3.5 §9.1) becomes CommandRejected with a DIMSE status
    (PS3.7 Annex C); its data set still streams, to be drained, and the
    association stays up."""
    from router.dicom.events import CommandRejected

    p = Pair()
    p.associate()
    ct = next(c.context_id for c in p.req.contexts.values() if c.abstract_syntax == CT)
    good = dimse.encode_command(dimse.CStoreRQ(
        message_id=5, affected_sop_class_uid=CT, affected_sop_instance_uid="1.2.3"))
    bad = good.replace(b"1.2.3\x00", b"1.A.3\x00")
    assert bad != good
    p.acc.receive_data(b"".join(bytes(c) for c in encode_pdata_chunks(
        [PDV(context_id=ct, is_command=True, is_last=True, data=bad)])))
    p.acc.receive_data(b"".join(bytes(c) for c in encode_pdata_chunks(
        [PDV(context_id=ct, is_command=False, is_last=True, data=b"\0" * 10)])))
    events = list(iter_events(p.acc))
    assert isinstance(events[0], CommandRejected)
    rej = events[0]
    assert (rej.command_field, rej.message_id, rej.has_dataset) == (0x0001, 5, True)
    assert rej.status in (0x0212, 0xC000) and "UID" in rej.detail
    assert isinstance(events[1], DataReceived) and events[1].last
    assert p.acc.state is State.STA6


def test_unframeable_command_still_aborts() -> None:
    """Bytes that are not a command set at all (no Command Field to answer)."""
    p = Pair()
    p.associate()
    ct = next(iter(p.acc.contexts))
    p.acc.receive_data(b"".join(bytes(c) for c in encode_pdata_chunks(
        [PDV(context_id=ct, is_command=True, is_last=True, data=b"\x08\x00" * 8)])))
    events = list(iter_events(p.acc))
    assert isinstance(events[0], AssociationAborted) and events[0].local


def test_pdata_before_association_is_capped() -> None:
    """Before a maximum length is negotiated a P-DATA-TF may not exceed the
    A-ASSOCIATE limit: an unassociated peer cannot make us buffer gigabytes."""
    acc = Association(Role.ACCEPTOR, max_associate_pdu_length=1 << 16)
    acc.connection_made()
    acc.receive_data(b"\x04\x00" + (1 << 30).to_bytes(4, "big"))
    events = list(iter_events(acc))
    assert events == [] and acc.state is State.STA13  # AA-1: aborted at once
    assert b"".join(bytes(c) for c in acc.data_to_send()) == encode_pdu(
        AAbort(source=0, reason=0))
