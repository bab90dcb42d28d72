"""Print the haproxy ``tcp-check`` rules of a DICOM health check for dicom-router.

The check is one real, minimal association, so a router is UP only when it negotiates
DICOM, not merely when its port accepts TCP (the kernel completes a handshake even for a
router whose supervisor is stuck):

1. A-ASSOCIATE-RQ (PS3.8 §9.3.2) proposing Verification in implicit VR little endian,
   which the router accepts whatever its ``[acceptance]`` says (router/config.py);
2. expect an A-ASSOCIATE-AC: PDU type 02H as the first byte (§9.3.3). An A-ASSOCIATE-RJ
   (03H: wrong called AE title, calling AE title not allowed), an A-ABORT (07H), a
   closed connection or silence all fail the check;
3. A-RELEASE-RQ (§9.3.6), expect A-RELEASE-RP (06H, §9.3.7): the association ends in
   an orderly release, so the router logs "closed: released" rather than an abort.

The bytes come from the project's own encoder (``router.dicom.pdu.encode_pdu``) and are
written one field per ``send-binary`` rule, each under a comment citing the table of
PS3.8 that lays the field out, so they can be checked by hand. Splitting a PDU over
several sends is harmless: DICOM runs over a byte stream and the router reassembles PDUs.

The called AE title must be one the router answers to (``[acceptance] called_ae``,
default ``[router] ae_title``), and with a ``calling_ae`` allow list the calling AE title
must be in it. After changing either, run this again and paste its output over the block
between the BEGIN and END lines of haproxy.cfg::

    .venv/bin/python deploy/haproxy/health_check.py --called-ae PACS-ROUTER

tests/deploy/test_haproxy.py runs it with the titles named on the BEGIN line and fails
if the block in haproxy.cfg differs.
"""

from __future__ import annotations

import argparse
import struct
import sys
from collections.abc import Iterator, Sequence

from router.dicom import uids
from router.dicom.pdu import (
    AAssociateRQ,
    AReleaseRQ,
    ImplementationClassUID,
    MaximumLength,
    PDUValueError,
    PresentationContextRQ,
    UserInformation,
    encode_pdu,
)

DEFAULT_CALLED_AE = "DICOM-ROUTER"
DEFAULT_CALLING_AE = "HAPROXY-CHECK"
#: What we can receive (PS3.8 D.1): haproxy reads a check's reply into one buffer of
#: tune.bufsize, 16384 bytes by default; the router's A-ASSOCIATE-AC is ~200.
MAX_PDU = 16384
INDENT = "    "

_ITEM = struct.Struct(">BBH")  # item type, reserved, item length (PS3.8 §9.3.1)

# Item and sub-item types of an A-ASSOCIATE-RQ, with where the standard lays each out.
_ITEMS = {
    0x10: "application context item (PS3.8 9.3.2.1, Table 9-12)",
    0x20: "presentation context item (PS3.8 9.3.2.2, Table 9-13)",
    0x30: "abstract syntax sub-item (PS3.8 9.3.2.2.1, Table 9-14)",
    0x40: "transfer syntax sub-item (PS3.8 9.3.2.2.2, Table 9-15)",
    0x50: "user information item (PS3.8 9.3.2.3, Table 9-16)",
    0x51: "maximum length sub-item (PS3.8 D.1, Table D.1-1)",
    0x52: "implementation class UID sub-item (PS3.7 D.3.3.2, Table D.3-1)",
}
_VALUES = {0x30: "Verification ", 0x40: "implicit VR little endian ", 0x52: ""}


def associate_rq(called_ae: str, calling_ae: str) -> AAssociateRQ:
    """The health check's A-ASSOCIATE-RQ: Verification only, the two mandatory user
    information sub-items (maximum length, implementation class UID), nothing else."""
    return AAssociateRQ(
        called_ae_title=called_ae,
        calling_ae_title=calling_ae,
        presentation_contexts=(PresentationContextRQ(
            context_id=1,
            abstract_syntax=uids.VERIFICATION_SOP_CLASS,
            transfer_syntaxes=(uids.IMPLICIT_VR_LITTLE_ENDIAN,),
        ),),
        user_information=UserInformation(items=(
            MaximumLength(maximum_length=MAX_PDU),
            ImplementationClassUID(uid=uids.IMPLEMENTATION_CLASS_UID),
        )),
    )


def _fields(pdu: bytes) -> Iterator[tuple[str, bytes]]:
    """Split an encoded A-ASSOCIATE-RQ into (comment, bytes) per field of Table 9-11.

    Walks the bytes the encoder produced rather than re-encoding pieces, so what
    haproxy sends is exactly ``encode_pdu``'s output; raises ValueError on anything
    this check does not expect (the walk must cover every byte).
    """
    length = struct.unpack_from(">I", pdu, 2)[0]
    if pdu[0] != 0x01 or length != len(pdu) - 6:
        raise ValueError("not one A-ASSOCIATE-RQ PDU")
    yield (f"A-ASSOCIATE-RQ (PS3.8 9.3.2, Table 9-11): PDU type 01H, reserved, "
           f"PDU length {length}", pdu[:6])
    yield "protocol version 0001H, reserved", pdu[6:10]
    yield f"called AE title {pdu[10:26].decode().rstrip()!r}, space padded to 16", pdu[10:26]
    yield f"calling AE title {pdu[26:42].decode().rstrip()!r}, space padded to 16", pdu[26:42]
    yield "reserved, 32 x 00H", pdu[42:74]
    pos = 74
    while pos < len(pdu):
        item_type, _, item_length = _ITEM.unpack_from(pdu, pos)
        end = pos + 4 + item_length
        if item_type not in (0x10, 0x20, 0x50) or end > len(pdu):
            raise ValueError(f"unexpected item {item_type:02X}H at offset {pos}")
        if item_type == 0x10:
            value = pdu[pos + 4:end].decode()
            yield f"{_ITEMS[item_type]}: {value}", pdu[pos:end]
        elif item_type == 0x20:
            yield (f"{_ITEMS[item_type]}: length {item_length}, context ID {pdu[pos + 4]}, "
                   "3 reserved", pdu[pos:pos + 8])
            yield from _sub_items(pdu, pos + 8, end)
        else:  # 0x50
            yield f"{_ITEMS[item_type]}: length {item_length}", pdu[pos:pos + 4]
            yield from _sub_items(pdu, pos + 4, end)
        pos = end


def _sub_items(pdu: bytes, pos: int, end: int) -> Iterator[tuple[str, bytes]]:
    while pos < end:
        item_type, _, item_length = _ITEM.unpack_from(pdu, pos)
        stop = pos + 4 + item_length
        if item_type not in _ITEMS or stop > end:
            raise ValueError(f"unexpected sub-item {item_type:02X}H at offset {pos}")
        body = pdu[pos + 4:stop]
        if item_type == 0x51:
            value = f"{struct.unpack('>I', body)[0]} bytes"
        else:
            value = f"{_VALUES[item_type]}{body.decode()}"
        yield f"{_ITEMS[item_type]}: {value}", pdu[pos:stop]
        pos = stop


def rules(called_ae: str = DEFAULT_CALLED_AE, calling_ae: str = DEFAULT_CALLING_AE,
          indent: str = INDENT) -> list[str]:
    """The lines to paste into the backend, BEGIN and END markers included."""
    rq = encode_pdu(associate_rq(called_ae, calling_ae))
    release = encode_pdu(AReleaseRQ())
    out = [f"# BEGIN generated by deploy/haproxy/health_check.py --called-ae {called_ae} "
           f"--calling-ae {calling_ae}",
           # "default": the server line's check options, check-send-proxy among
           # them (a bare connect ignores it; deploy/README.md, PROXY protocol).
           "tcp-check connect default"]
    for comment, data in _fields(rq):
        out += [f"# {comment}", f"tcp-check send-binary {data.hex()}"]
    out += [
        "# A-ASSOCIATE-AC is PDU type 02H (PS3.8 9.3.3, Table 9-17). rbinary matches the",
        "# reply as hex, so ^02 tests its first byte (unanchored, 02 could be any byte of",
        "# an A-ASSOCIATE-RJ, 03H). min-recv 1: that byte decides; without it haproxy",
        "# waits for more after an A-ASSOCIATE-RJ, until `timeout check`.",
        "tcp-check expect min-recv 1 rbinary ^02 comment "
        '"no A-ASSOCIATE-AC (rejected, aborted or not DICOM)"',
        "# A-RELEASE-RQ (PS3.8 9.3.6, Table 9-24): PDU type 05H, reserved, PDU length 4, "
        "4 reserved",
        f"tcp-check send-binary {release.hex()}",
        "# A-RELEASE-RP is PDU type 06H (PS3.8 9.3.7, Table 9-25)",
        'tcp-check expect min-recv 1 rbinary ^06 comment "no A-RELEASE-RP"',
        "# END generated",
    ]
    return [indent + line for line in out]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--called-ae", default=DEFAULT_CALLED_AE,
                        help="the router's AE title (default: %(default)s)")
    parser.add_argument("--calling-ae", default=DEFAULT_CALLING_AE,
                        help="the health check's AE title (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        block = rules(args.called_ae, args.calling_ae)
    except PDUValueError as exc:  # an AE title PS3.5 does not allow: one line, exit 2
        parser.error(str(exc))
    print("\n".join(block))
    return 0


if __name__ == "__main__":
    sys.exit(main())
