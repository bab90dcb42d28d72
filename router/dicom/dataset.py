"""Datasets on the wire and in Part 10 files, PS3.5 and PS3.10, through pydicom.

Theory of operation
-------------------
A DIMSE message's dataset travels in the presentation context's transfer
syntax (PS3.5 §10, Annex A) without the file meta information; a Part 10 file
is a 128-byte preamble, ``DICM``, the group 0002 file meta information in
explicit VR little endian (PS3.10 §7.1), then the same dataset bytes. So a
received dataset becomes a file by writing :func:`part10_meta_bytes` in front
of it, and a file is sent by reading :func:`read_part10_header` and sending
the bytes from ``dataset_offset`` on -- neither decodes the dataset (D5:
forward bytes, not objects).

When a dataset must be looked at or changed, :func:`decode_dataset` and
:func:`encode_dataset` go through pydicom. Encapsulated pixel data is passed
through as it is, never decompressed or recompressed. Deflated transfer
syntaxes (PS3.5 §A.5) are inflated before decoding and deflated after
encoding (raw deflate, no zlib header).

pydicom reads leniently: a truncated dataset gives a warning and a partial
dataset. A router must not acknowledge half an instance, so
:func:`decode_dataset` first walks the element framing (tags and lengths,
sequences, items and delimiters; values are skipped) and refuses data whose
lengths overrun or whose undefined-length sequences or items are not closed.
Everything malformed raises :class:`~router.dicom.errors.DIMSEError`.
"""

from __future__ import annotations

import array
import functools
import io
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import correct_ambiguous_vr_element, write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from router.dicom.errors import DIMSEError, LocalProtocolError
from router.dicom.uids import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    IMPLICIT_VR_LITTLE_ENDIAN,
    is_deflated,
    is_encapsulated,
    is_implicit_vr,
    is_little_endian,
    is_standard_transfer_syntax,
    is_valid_uid,
)

__all__ = [
    "DataSetFraming",
    "HeaderIncomplete",
    "InstanceIdentity",
    "Part10",
    "PathOrBytes",
    "decode_dataset",
    "encode_dataset",
    "part10_from_meta",
    "part10_meta_bytes",
    "read_part10_header",
    "read_top_level",
    "readable_by_pydicom",
    "top_level_spans",
    "transcode",
    "walkable_encoding",
    "with_defined_length_un",
]

# DIMSE statuses used here (PS3.7 Annex C, PS3.4 B.2.3); kept local so this
# module does not depend on the command set codec.
_CANNOT_UNDERSTAND: Final = 0xC000
_DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
_PROCESSING_FAILURE: Final = 0x0110

_PREAMBLE_LENGTH: Final = 128
_MAGIC: Final = b"DICM"
# Explicit VRs with a 2-byte reserved field and a 4-byte length, PS3.5 §7.1.2.
_LONG_VRS: Final = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
# Every VR pydicom knows, to tell explicit from implicit VR (PS3.5 Table 6.2-1).
_KNOWN_VRS: Final = frozenset(
    (
        *(b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO"),
        *(b"LT", b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ"),
        *(b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV"),
    )
)
# Bytes per word of the "other" VRs whose values are byte-swapped between
# little and big endian (PS3.5 §7.3); pydicom leaves them alone.
_WORD_SIZES: Final = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
_ARRAY_CODES: Final = {2: "H", 4: "I", 8: "Q"}
_PIXEL_TAGS: Final = frozenset((0x7FE00008, 0x7FE00009, 0x7FE00010))
_ITEM: Final = 0xFFFEE000
_ITEM_DELIMITER: Final = 0xFFFEE00D
_SEQUENCE_DELIMITER: Final = 0xFFFEE0DD
_UNDEFINED: Final = 0xFFFFFFFF
_PIXEL_DATA: Final = 0x7FE00010
# Standard elements a data set holds at its top level, at most (DataSetFraming): the
# whole data dictionary has some 5,000; a CT has about 150.
_MAX_OWN_ELEMENTS: Final = 16384
_MAX_DEPTH: Final = 64  # nesting of sequences we accept; real data stays far below
# Bulk data VRs (PS3.5 Table 6.2-1) whose value read_top_level gives only up to
# MAX_WANTED_BULK bytes: past that, the element is there with an empty value.
_BULK_VRS: Final = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"UN"))
MAX_WANTED_BULK: Final = 64 * 1024

PathOrBytes: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview


# --- Encoding ---------------------------------------------------------------


def encode_dataset(ds: Dataset, transfer_syntax: str) -> bytes:
    """Encode ``ds`` in ``transfer_syntax`` for a P-DATA message, PS3.5 §10, Annex A.

    Implicit VR LE, explicit VR LE and BE, and deflated explicit VR LE; any
    encapsulated transfer syntax is written as explicit VR LE with the pixel
    data fragments as they are. File meta (group 0002) elements found in the
    dataset are left out: they never go over the network (PS3.10 §7.1).
    Values of OW/OL/OF/OD/OV are byte-swapped when the endianness changes.

    pydicom may convert ``ds``'s raw elements in place while writing.
    Raises :class:`~router.dicom.errors.DIMSEError` (0110H, processing failure)
    when pydicom cannot encode the dataset.
    """
    implicit = is_implicit_vr(transfer_syntax)
    little = is_little_endian(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    try:
        # Preparing converts raw elements too: a value pydicom cannot read (Rows
        # three bytes long) fails there, as in write_dataset, and means the same.
        to_write = _prepared(
            ds, implicit=implicit, little=little, encapsulated=is_encapsulated(transfer_syntax)
        )
        write_dataset(fp, to_write)
    except Exception as exc:  # pydicom raises many types; all mean "cannot encode"
        raise DIMSEError(
            f"cannot encode dataset in {transfer_syntax}: {_one_line(exc)}",
            status=_PROCESSING_FAILURE
        ) from exc
    encoded = fp.getvalue()
    if is_deflated(transfer_syntax):
        deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        encoded = deflater.compress(encoded) + deflater.flush()
        if len(encoded) & 1:
            # PS3.5 A.5: the deflated stream is padded to even length with one
            # NUL (inflate stops at the end of the stream and ignores it).
            encoded += b"\x00"
    return encoded


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line, for logs and dead-letter reasons: pydicom
    puts a whole traceback in some ("With tag (0009,1001) got exception: \nTraceback
    ...\nMemoryError"); its first line, and the last when the first says nothing."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0] if len(lines) == 1 or not lines[0].endswith(":") \
        else f"{lines[0]} {lines[-1].strip()}"


def _prepared(ds: Dataset, *, implicit: bool, little: bool, encapsulated: bool) -> Dataset:
    """``ds``, or a shallow copy fixed up for writing.

    ``ds``'s content is left as it is (though pydicom converts raw elements in
    place when they are looked at).

    Drops group 0002; byte-swaps words when the endianness changes; gives raw
    implicit VR elements their VR when writing explicit VR (pydicom only does
    so when it knows the dataset was read as implicit VR, and ``dcmread``
    labels a dataset with its file's transfer syntax even when the writer
    used implicit VR regardless -- as pydicom's SC_rgb_jpeg.dcm does).
    """
    source_little = ds.original_encoding[1]
    if source_little is None:
        source_little = True  # built in memory: values are taken as little endian
    swap = source_little != little
    changed = False
    fixed: dict[BaseTag, DataElement | RawDataElement] = {}
    for elem in list(ds.elements()):
        if elem.tag >> 16 == 0x0002:
            changed = True
            continue
        new = _swapped(elem, ds, source_little) if swap else elem
        if not implicit and (new.VR is None or " or " in new.VR):
            new = _with_vr(ds, elem.tag, little)
        if encapsulated and elem.tag == 0x7FE00010:
            new = _encapsulated_pixel_data(new)
        changed = changed or new is not elem
        fixed[elem.tag] = new
    if not changed:
        return ds
    return _dataset_like(ds, fixed)


def _with_vr(ds: Dataset, tag: BaseTag, little: bool) -> DataElement | RawDataElement:
    """``ds[tag]`` converted, its VR from the data dictionary (UN when unknown) and
    an ambiguous one ("OB or OW", "US or SS") resolved as pydicom resolves it."""
    elem: DataElement | RawDataElement = ds[tag]
    if elem.VR and " or " in elem.VR:
        elem = correct_ambiguous_vr_element(elem, ds, little)
    return elem


def _dataset_like(
    original: Dataset, elements: dict[BaseTag, DataElement | RawDataElement]
) -> Dataset:
    copy = Dataset(elements)
    implicit, little = original.original_encoding
    copy.set_original_encoding(implicit, little, original.original_character_set)
    return copy


def _swapped(
    elem: DataElement | RawDataElement, parent: Dataset, source_little: bool
) -> DataElement | RawDataElement:
    """``elem`` with OW/OL/OF/OD/OV values byte-swapped, recursing into sequences.

    Raw elements are converted first (implicit VR ones have no VR yet), and
    ambiguous VRs such as "OB or OW" resolved as pydicom does on writing.

    A UN's value is implicit VR little endian whatever the transfer syntax (PS3.5
    §6.2.2). pydicom gives a standard attribute written as UN its dictionary VR but
    decodes the value in the data set's byte order: from big endian, Rows 512 written
    as UN came out as 2. Such a UN is decoded as the standard says, and its value is
    then in the target's byte order already (the swap is only ever to little endian).
    """
    if isinstance(elem, RawDataElement) and elem.VR == "UN" and not source_little:
        return convert_raw_data_element(
            elem._replace(is_implicit_VR=True, is_little_endian=True), ds=parent)
    converted: DataElement | RawDataElement = parent[elem.tag]
    if " or " in (converted.VR or ""):
        converted = correct_ambiguous_vr_element(converted, parent, source_little)
    if not isinstance(converted, DataElement):
        return elem
    vr = converted.VR
    if vr == "SQ" and isinstance(converted.value, Sequence):
        items = []
        for item in converted.value:
            swapped = {e.tag: _swapped(e, item, source_little) for e in item.elements()}
            item_copy = _dataset_like(item, swapped)
            item_copy.is_undefined_length_sequence_item = item.is_undefined_length_sequence_item
            items.append(item_copy)
        new = DataElement(converted.tag, "SQ", Sequence(items))
        new.is_undefined_length = converted.is_undefined_length
        return new
    # OW is "a stream of 16-bit words" swapped within each word (PS3.5 Table 6.2-1),
    # whatever Bits Allocated says: so DCMTK converts 32-bit pixel data. (pydicom's
    # rtdose_expb.dcm swaps the 32-bit values whole: DCMTK reads it otherwise.)
    size = _WORD_SIZES.get(vr)
    value = converted.value
    if size is None or not isinstance(value, bytes) or converted.is_undefined_length:
        return elem
    return DataElement(converted.tag, vr, _byteswap(value, size))


def _byteswap(value: bytes, size: int) -> bytes:
    if len(value) % size:
        return value  # not whole words: leave it to pydicom to complain or not
    words = array.array(_ARRAY_CODES[size])
    words.frombytes(value)
    words.byteswap()
    return words.tobytes()


def _encapsulated_pixel_data(
    elem: DataElement | RawDataElement,
) -> DataElement | RawDataElement:
    """Pixel data built in memory as encapsulated fragments but not flagged so."""
    if isinstance(elem, RawDataElement) or elem.is_undefined_length:
        return elem
    value = elem.value
    if isinstance(value, bytes) and value.startswith(b"\xfe\xff\x00\xe0"):
        new = DataElement(elem.tag, "OB", value)
        new.is_undefined_length = True
        return new
    return elem


# --- Decoding ---------------------------------------------------------------


def decode_dataset(
    data: bytes | bytearray | memoryview,
    transfer_syntax: str,
    *,
    stop_before_pixels: bool = False,
    max_inflated_size: int | None = None,
) -> Dataset:
    """Decode a dataset received in ``transfer_syntax``, PS3.5 §10, Annex A.

    Deflated data is inflated first (refused beyond ``max_inflated_size``
    bytes, if given). With ``stop_before_pixels`` decoding stops at the pixel
    data (D5: rules need the header only). Malformed data raises
    :class:`~router.dicom.errors.DIMSEError` with status C000H (cannot
    understand).
    """
    buf: bytes | bytearray | memoryview = data
    if is_deflated(transfer_syntax):
        buf = _inflate(data, max_inflated_size)
    implicit = is_implicit_vr(transfer_syntax)
    little = is_little_endian(transfer_syntax)
    if not little:
        buf = with_defined_length_un(buf)
    if not len(buf):
        ds = Dataset()
        ds.set_original_encoding(implicit, little, "iso8859")
        return ds
    try:
        end = _check_framing(
            buf,
            implicit=implicit,
            little=little,
            stop_at=_PIXEL_TAGS.__contains__ if stop_before_pixels else None,
        )
    except (struct.error, IndexError, RecursionError) as exc:
        raise DIMSEError(f"malformed dataset: {_one_line(exc)}",
                         status=_CANNOT_UNDERSTAND) from exc
    # Only the bytes before the pixel data are copied for pydicom when it is
    # to stop there: a header costs the same whatever the image size.
    body = bytes(memoryview(buf)[:end])
    stop_when = _at_pixel_data if stop_before_pixels else None
    try:
        return read_dataset(io.BytesIO(body), implicit, little, stop_when=stop_when)
    except Exception as exc:  # pydicom's reader raises many types; all mean "malformed"
        raise DIMSEError(f"malformed dataset: {_one_line(exc)}",
                         status=_CANNOT_UNDERSTAND) from exc


_UNDEFINED_UN_BE: Final = b"UN\x00\x00\xff\xff\xff\xff"


def with_defined_length_un(data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    """A big-endian data set with each undefined-length UN given a defined length, for
    pydicom; ``data`` itself when it has none.

    The items of an undefined-length UN are implicit VR little endian whatever the
    transfer syntax (PS3.5 §6.2.2, CP-246), and pydicom reads them in the data set's
    byte order: a big-endian one fails ("No tag to read") after the reception
    acknowledged it. A UN of defined length is opaque to pydicom and holds the same
    implicit VR little endian items (6.2.2 again: a reader that knows the attribute's
    VR decodes them so), so the items are kept byte for byte, without their sequence
    delimiter; the lengths of the defined-length sequences and items around them are
    set again. Malformed framing is left as it is, for the reader to refuse.
    """
    # (A memoryview has no substring search: it is copied. Big endian is rare.)
    haystack = data if isinstance(data, bytes | bytearray) else bytes(data)
    if _UNDEFINED_UN_BE not in haystack:
        return data  # the usual case: a substring search, no walk
    view = memoryview(haystack)
    try:
        rewritten, _ = _defined_un_elements(view, 0, len(view), depth=0)
    except (HeaderIncomplete, DIMSEError, struct.error):
        return data
    return rewritten


def readable_by_pydicom(path: str | os.PathLike[str], *, transfer_syntax: str | None = None,
                        offset: int = 0) -> str | os.PathLike[str] | io.BytesIO:
    """What to give ``pydicom.dcmread`` for the Part 10 file ``path``: the path, or,
    for a big-endian data set with an undefined-length UN, its bytes in memory as
    with_defined_length_un makes them readable. (Such a file is rare: big endian was
    retired in 2004. A file that does not read is left for pydicom to refuse.)

    A caller that knows the file's transfer syntax and where its data set starts
    (``offset``) says so: its header is then not read again."""
    if transfer_syntax is None:
        try:
            part10 = read_part10_header(path)
        except (DIMSEError, OSError):
            return path
        transfer_syntax, offset = part10.transfer_syntax, part10.dataset_offset
    if transfer_syntax != EXPLICIT_VR_BIG_ENDIAN:
        return path
    with open(path, "rb") as fh:
        data = fh.read()
    body = data[offset:]
    rewritten = with_defined_length_un(body)
    if rewritten is body:
        return path  # nothing to rewrite
    return io.BytesIO(data[:offset] + rewritten)


def _defined_un_elements(view: memoryview, pos: int, limit: int, *,
                         depth: int) -> tuple[bytearray, int]:
    """Explicit VR big-endian elements from ``pos`` to ``limit`` (or, inside an
    undefined-length item, to its delimiter, kept) rewritten by with_defined_length_un;
    and where they ended."""
    if depth >= _MAX_DEPTH:
        raise DIMSEError(f"sequences nested deeper than {_MAX_DEPTH}",
                         status=_CANNOT_UNDERSTAND)
    structs = _structs(False)
    out = bytearray()
    while pos < limit:
        tag, vr, start, length = _element_header(view, pos, False, structs)
        if tag == _ITEM_DELIMITER:
            out += view[pos:start]
            return out, start
        if length == _UNDEFINED and vr == b"UN":
            end = _past_undefined(view, start, vr, implicit=False, little=False, depth=depth)
            items = view[start : end - 8]  # without the sequence delimitation item
            out += struct.pack(">HH2sHI", tag >> 16, tag & 0xFFFF, b"UN", 0, len(items))
            out += items
        elif vr == b"SQ":
            body, end = _defined_un_items(view, start, length, depth=depth + 1)
            out += view[pos : start - 4]
            out += struct.pack(">I", _UNDEFINED if length == _UNDEFINED else len(body))
            out += body
        elif length == _UNDEFINED:  # encapsulated pixel data: fragments as they are
            end = _past_undefined(view, start, vr, implicit=False, little=False, depth=depth)
            out += view[pos:end]
        else:
            end = start + length
            if end > limit:
                raise HeaderIncomplete
            out += view[pos:end]
        pos = end
    return out, pos


def _defined_un_items(view: memoryview, pos: int, length: int, *,
                      depth: int) -> tuple[bytearray, int]:
    """A big-endian sequence's items (``length`` bytes, or up to and with its
    delimiter when undefined), each rewritten by _defined_un_elements."""
    structs = _structs(False)
    limit = len(view) if length == _UNDEFINED else pos + length
    out = bytearray()
    while pos < limit:
        tag, _, start, item_length = _element_header(view, pos, False, structs)
        if tag == _SEQUENCE_DELIMITER and length == _UNDEFINED:
            out += view[pos:start]
            return out, start
        if tag != _ITEM:
            raise HeaderIncomplete  # malformed: left to the reader to refuse
        if item_length == _UNDEFINED:
            body, end = _defined_un_elements(view, start, limit, depth=depth)
            out += view[pos:start]
        else:
            end = start + item_length
            body, _ = _defined_un_elements(view, start, end, depth=depth)
            out += struct.pack(">HHI", 0xFFFE, 0xE000, len(body))
        out += body
        pos = end
    if length == _UNDEFINED:
        raise HeaderIncomplete  # no sequence delimiter
    return out, pos


# The most a deflated data set may inflate to for transcode: as much as the largest
# data set a destination gets converted (workers.outbound.MAX_CONVERTED_BYTES).
MAX_TRANSCODED_INFLATED: Final = 256 << 20


def transcode(data: bytes, source: str, target: str) -> bytes:
    """A data set received in ``source`` re-encoded in ``target`` (PS3.5 §10); the
    bytes as they came when the two are the same (D5: nothing is decoded then).

    A deflated one is inflated up to :data:`MAX_TRANSCODED_INFLATED` bytes, else
    refused (DIMSEError C000H): a few hundred KB of deflated zeros, checked against
    their size on disk, inflated to 700 MB and took a worker to 2.8 GB."""
    if source == target:
        return data
    return encode_dataset(decode_dataset(data, source,
                                         max_inflated_size=MAX_TRANSCODED_INFLATED), target)


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAGS


def _inflate(data: bytes | bytearray | memoryview, max_size: int | None) -> bytes:
    """Raw inflate, PS3.5 §A.5 (RFC 1951, no zlib header)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        if max_size is None:
            out = inflater.decompress(data) + inflater.flush()
        else:
            out = inflater.decompress(data, max_size + 1)
            if len(out) > max_size or inflater.unconsumed_tail:
                raise DIMSEError(
                    f"deflated dataset inflates to more than {max_size} bytes",
                    status=_CANNOT_UNDERSTAND,
                )
            out += inflater.flush()
    except zlib.error as exc:
        raise DIMSEError(
            f"cannot inflate deflated dataset: {exc}", status=_CANNOT_UNDERSTAND
        ) from exc
    if not inflater.eof:
        raise DIMSEError("deflated dataset is truncated", status=_CANNOT_UNDERSTAND)
    return out


def _check_framing(
    buf: bytes | bytearray | memoryview,
    *,
    implicit: bool,
    little: bool,
    stop_at: Callable[[int], bool] | None = None,
) -> int:
    """Walk the element structure of a dataset; raise DIMSEError if it is broken.

    PS3.5 §7.1 (element headers), §7.5 (sequences, items, delimiters). Values
    are skipped, not read. As pydicom does, an element whose VR bytes are not
    letters is taken as implicit VR (some writers switch inside sequences),
    and the items of an undefined-length UN element as implicit VR LE
    (PS3.5 §6.2.2). The walk ends at the first top-level tag for which
    ``stop_at`` is true (as pydicom's ``stop_when``); the offset where it
    ended is returned.
    """
    view = memoryview(buf).cast("B")

    def fail(message: str, offset: int) -> DIMSEError:
        return DIMSEError(
            f"malformed dataset at offset {offset}: {message}", status=_CANNOT_UNDERSTAND
        )

    def header(pos: int, limit: int, implicit: bool,
               structs: _Structs) -> tuple[int, bytes | None, int, int]:
        # -> (tag, VR or None, value length, header length)
        tag_length, short_length, long_length = structs
        if limit - pos < 8:
            raise fail(f"{limit - pos} bytes left, too few for an element header", pos)
        group, element, length = tag_length.unpack_from(view, pos)
        tag = group << 16 | element
        if implicit or group == 0xFFFE:
            return tag, None, length, 8
        vr = bytes(view[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if limit - pos < 12:
                raise fail("truncated element header", pos)
            return tag, vr, long_length.unpack_from(view, pos + 8)[0], 12
        if b"AA" <= vr <= b"ZZ":
            return tag, vr, short_length.unpack_from(view, pos + 6)[0], 8
        return tag, None, length, 8  # implicit VR inside explicit VR data

    def elements(pos: int, limit: int, depth: int, implicit: bool, structs: _Structs, *,
                 in_item: bool) -> int:
        # Elements from pos to limit; in an undefined-length item, up to and
        # including its item delimiter. Returns the offset after them.
        while pos < limit:
            tag, vr, length, size = header(pos, limit, implicit, structs)
            if tag == _ITEM_DELIMITER:
                if in_item:
                    return pos + 8
                raise fail("item delimitation item outside an item", pos)
            if tag in (_ITEM, _SEQUENCE_DELIMITER):
                raise fail(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) where an element belongs", pos)
            if depth == 0 and stop_at is not None and stop_at(tag):
                return pos
            start = pos + size
            if length == _UNDEFINED:
                pos = items(start, limit, depth + 1, *_inside_undefined(vr, implicit, structs),
                            undefined=True)
                continue
            if length > limit - start:
                raise fail(
                    f"({tag >> 16:04X},{tag & 0xFFFF:04X}) value length {length} "
                    f"overruns the {limit - start} bytes left",
                    pos,
                )
            if vr == b"SQ":
                items(start, start + length, depth + 1, implicit, structs, undefined=False)
            pos = start + length
        if in_item:
            raise fail("undefined-length item without an item delimitation item", limit)
        return pos

    def items(pos: int, limit: int, depth: int, implicit: bool, structs: _Structs, *,
              undefined: bool) -> int:
        # Items of a sequence, or fragments of encapsulated pixel data.
        if depth > _MAX_DEPTH:
            raise fail(f"sequences nested deeper than {_MAX_DEPTH}", pos)
        while pos < limit:
            tag, _, length, _ = header(pos, limit, True, structs)
            if tag == _SEQUENCE_DELIMITER:
                return pos + 8
            if tag != _ITEM:
                raise fail(f"expected an item, found ({tag >> 16:04X},{tag & 0xFFFF:04X})", pos)
            if length == _UNDEFINED:
                pos = elements(pos + 8, limit, depth, implicit, structs, in_item=True)
                continue
            if length > limit - pos - 8:
                raise fail(f"item length {length} overruns the {limit - pos - 8} bytes left", pos)
            pos += 8 + length
        if undefined:
            raise fail("undefined-length sequence without a sequence delimitation item", limit)
        return pos

    return elements(0, len(view), 0, implicit, _structs(little), in_item=False)


# --- Part 10 files ----------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Part10:
    """Where a Part 10 file's dataset starts and what it holds (PS3.10 §7).

    ``dataset_offset`` is the offset of the first dataset byte (after the
    preamble, ``DICM`` and the group 0002 elements; 0 when the file has no
    file meta). For deflated transfer syntaxes the bytes from there on are the
    deflated stream, as they are sent. ``meta`` is ``None`` without file meta.
    """

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset_offset: int
    meta: Dataset | None


_HEAD_CHUNK: Final = 64 * 1024
# How far into a dataset we look for its SOP UIDs; they come within the first
# few hundred bytes of any real instance, so this only bounds hostile input.
_MAX_HEADER: Final = 64 * 1024 * 1024


def read_part10_header(path_or_bytes: PathOrBytes) -> Part10:
    """Find a Part 10 file's dataset and its identity without decoding it all.

    The file meta (PS3.10 §7.1) gives the transfer syntax; without one, it is
    guessed from the first element as PS3.5 §7.1 allows (implicit or explicit
    VR, little or big endian). The SOP class and instance UIDs come from the
    dataset's (0008,0016) and (0008,0018) -- only the elements up to them are
    read -- or from the file meta when the dataset lacks them.

    Raises :class:`~router.dicom.errors.DIMSEError` if the file is malformed
    (C000H) or has no SOP class or instance UID (A900H); ``OSError`` if a path
    cannot be read.
    """
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        data = bytes(path_or_bytes)
        return _part10_header(data, lambda _: data)
    with open(path_or_bytes, "rb") as fh:
        cache: dict[str, bytes] = {"head": fh.read(_HEAD_CHUNK)}

        def at_least(size: int) -> bytes:
            # The first ``size`` bytes (or all of a shorter file).
            head = cache["head"]
            if len(head) < size:
                head += fh.read(size - len(head))
                cache["head"] = head
            return head

        return _part10_header(cache["head"], at_least)


def _part10_header(head: bytes, at_least: Callable[[int], bytes]) -> Part10:
    start = 0
    if head[_PREAMBLE_LENGTH : _PREAMBLE_LENGTH + 4] == _MAGIC:
        start = _PREAMBLE_LENGTH + 4
    try:
        meta_end = _skip_file_meta(start, at_least)
    except struct.error as exc:
        raise DIMSEError(f"malformed file meta: {exc}", status=_CANNOT_UNDERSTAND) from exc
    meta: Dataset | None = None
    transfer_syntax: str | None = None
    if meta_end > start:
        meta = _read_meta(at_least(meta_end)[start:meta_end])
        transfer_syntax = _uid_value(meta, "TransferSyntaxUID")
    if not transfer_syntax:
        transfer_syntax = _guess_transfer_syntax(at_least(meta_end + 6)[meta_end:])
    sop_class, sop_instance = _dataset_sop_uids(meta_end, transfer_syntax, at_least)
    sop_class = sop_class or _uid_value(meta, "MediaStorageSOPClassUID")
    sop_instance = sop_instance or _uid_value(meta, "MediaStorageSOPInstanceUID")
    if not sop_class or not sop_instance:
        raise DIMSEError(
            "file has no SOP Class UID or SOP Instance UID",
            status=_DATASET_DOES_NOT_MATCH_SOP_CLASS,
        )
    return Part10(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        transfer_syntax=transfer_syntax,
        dataset_offset=meta_end,
        meta=meta,
    )


def _skip_file_meta(pos: int, at_least: Callable[[int], bytes]) -> int:
    """Offset after the group 0002 elements starting at ``pos`` (PS3.10 §7.1).

    Walks the elements rather than trusting (0002,0000), as pydicom does; the
    meta is explicit VR LE, but implicit VR is tolerated element by element.
    """
    while True:
        data = at_least(pos + 12)
        if len(data) < pos + 8 or struct.unpack_from("<H", data, pos)[0] != 0x0002:
            return pos
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if len(data) < pos + 12:
                raise DIMSEError("truncated file meta element", status=_CANNOT_UNDERSTAND)
            length, size = struct.unpack_from("<I", data, pos + 8)[0], 12
        elif vr in _KNOWN_VRS:
            length, size = struct.unpack_from("<H", data, pos + 6)[0], 8
        else:
            length, size = struct.unpack_from("<I", data, pos + 4)[0], 8
        if length == _UNDEFINED:
            raise DIMSEError("undefined length in the file meta", status=_CANNOT_UNDERSTAND)
        pos += size + length
        if len(at_least(pos)) < pos:
            raise DIMSEError("file meta runs past the end of the file", status=_CANNOT_UNDERSTAND)


def _read_meta(raw: bytes) -> FileMetaDataset:
    try:
        meta = FileMetaDataset(read_dataset(io.BytesIO(raw), False, True))
        for elem in meta:  # force conversion now, so errors surface here
            _ = elem.value
    except Exception as exc:  # pydicom's reader raises many types; all mean "malformed"
        raise DIMSEError(f"malformed file meta: {exc}", status=_CANNOT_UNDERSTAND) from exc
    return meta


def _uid_value(ds: Dataset | None, keyword: str) -> str | None:
    if ds is None:
        return None
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip(" \x00")
    return text if is_valid_uid(text) else None


def _guess_transfer_syntax(first: bytes) -> str:
    """Transfer syntax of a dataset without file meta, from its first element.

    A known VR in bytes 4-5 means explicit VR; a group number that only makes
    sense byte-swapped (the first group is normally 0008) means big endian.
    """
    if len(first) < 6:
        return IMPLICIT_VR_LITTLE_ENDIAN
    group = first[0] | first[1] << 8
    if first[4:6] in _KNOWN_VRS:
        return EXPLICIT_VR_BIG_ENDIAN if group >= 0x0400 else EXPLICIT_VR_LITTLE_ENDIAN
    return IMPLICIT_VR_LITTLE_ENDIAN


def _dataset_sop_uids(
    offset: int, transfer_syntax: str, at_least: Callable[[int], bytes]
) -> tuple[str | None, str | None]:
    """(0008,0016) and (0008,0018) from the dataset, reading as little as we can."""
    implicit = is_implicit_vr(transfer_syntax)
    little = is_little_endian(transfer_syntax)
    size = _HEAD_CHUNK
    while True:
        data = at_least(offset + size)
        complete = len(data) < offset + size
        body = data[offset:]
        if is_deflated(transfer_syntax):
            body, complete = _inflate_prefix(body, size, complete)
        stopped = False

        def past_uids(tag: BaseTag, vr: str | None, length: int) -> bool:
            nonlocal stopped
            stopped = tag > 0x00080018
            return stopped

        try:
            ds = read_dataset(
                io.BytesIO(body),
                implicit,
                little,
                stop_when=past_uids,
                specific_tags=[BaseTag(0x00080016), BaseTag(0x00080018)],
            )
            if stopped or complete:
                # pydicom reads a value cut short without a word: check the framing
                # of what it read.
                _check_framing(body, implicit=implicit, little=little, stop_at=_past_uids)
                return _uid_value(ds, "SOPClassUID"), _uid_value(ds, "SOPInstanceUID")
        except DIMSEError:
            raise
        except Exception as exc:  # pydicom's reader raises many types; all mean "malformed"
            if complete:
                raise DIMSEError(f"malformed dataset: {_one_line(exc)}",
                         status=_CANNOT_UNDERSTAND) from exc
        if size >= _MAX_HEADER:
            raise DIMSEError(
                f"no end of (0008,0018) SOP Instance UID in the first {_MAX_HEADER} bytes",
                status=_CANNOT_UNDERSTAND,
            )
        size *= 4  # the UIDs lie beyond what we read: read more


def _past_uids(tag: int) -> bool:
    return tag > 0x00080018


def _inflate_prefix(deflated: bytes, size: int, complete: bool) -> tuple[bytes, bool]:
    """Inflate up to ``size`` bytes of a deflated dataset -> (bytes, is that all?)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(deflated, size)
    except zlib.error as exc:
        raise DIMSEError(
            f"cannot inflate deflated dataset: {exc}", status=_CANNOT_UNDERSTAND
        ) from exc
    return out, inflater.eof or (complete and len(out) < size)


def part10_from_meta(head: bytes | bytearray | memoryview) -> Part10 | None:
    """A Part 10 file's identity from its file meta alone, or None.

    The fast path for files whose meta we wrote ourselves (the spool): the
    preamble, ``DICM`` and the group 0002 elements (explicit VR little endian,
    PS3.10 §7.1) are parsed with ``struct``, and the SOP class, instance and
    transfer syntax are the meta's Media Storage SOP Class/Instance UID and
    Transfer Syntax UID. ``head`` must hold the whole meta (a few hundred bytes;
    1 KiB is plenty for ours). Returns None when the head has no meta, the meta
    lacks one of the three, or it does not parse: the caller then falls back to
    :func:`read_part10_header`, which reads the data set as well. ``meta`` of
    the result is None.
    """
    view = memoryview(head).cast("B")
    if len(view) < _PREAMBLE_LENGTH + 4 or bytes(view[128:132]) != _MAGIC:
        return None
    pos = _PREAMBLE_LENGTH + 4
    values: dict[int, str] = {}
    while pos + 8 <= len(view):
        group, element = struct.unpack_from("<HH", view, pos)
        if group != 0x0002:
            break
        vr = bytes(view[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > len(view):
                return None
            (length,) = struct.unpack_from("<I", view, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", view, pos + 6)
            start = pos + 8
        if length == _UNDEFINED or start + length > len(view):
            return None
        if element in (0x0002, 0x0003, 0x0010):
            values[element] = bytes(view[start : start + length]).rstrip(b"\0 ").decode(
                "ascii", "replace")
        pos = start + length
    else:
        return None  # the head ended inside the meta
    if len(values) != 3 or not all(values.values()):
        return None
    return Part10(sop_class_uid=values[0x0002], sop_instance_uid=values[0x0003],
                  transfer_syntax=values[0x0010], dataset_offset=pos, meta=None)


class HeaderIncomplete(Exception):
    """:func:`read_top_level` needs more of the data set than it was given."""


def read_top_level(
    buf: bytes | bytearray | memoryview,
    *,
    implicit: bool,
    little: bool,
    tags: frozenset[int],
) -> dict[int, tuple[str | None, bytes]]:
    """The raw values of the top-level elements in ``tags``: tag -> (VR or None, value).

    Reads element headers only (PS3.5 §7.1) and stops after the largest tag
    asked for, so a rule that looks at Modality never touches pixel data (D5).
    Sequences are skipped by their lengths or, when undefined, by walking their
    items to the delimiter (PS3.5 §7.5); a wanted tag that is a sequence is
    returned with its raw bytes only when its length is defined. Wanted bulk data
    (encapsulated Pixel Data, or an OB/OW/... value over :data:`MAX_WANTED_BULK`)
    is returned with an empty value: it is there, which is what a rule can ask. Raises
    :class:`HeaderIncomplete` when ``buf`` ends first (read more and call again)
    and :class:`~router.dicom.errors.DIMSEError` (C000H) when it does not parse.
    Tags absent from the data set are absent from the result.
    """
    view = memoryview(buf).cast("B")
    last = max(tags, default=-1)
    found: dict[int, tuple[str | None, bytes]] = {}
    _skip_elements(view, 0, implicit=implicit, little=little, depth=0,
                   top=(tags, last, found))
    return found


_SOP_CLASS_UID: Final = 0x00080016
_SOP_INSTANCE_UID: Final = 0x00080018
_IDENTITY_TAGS: Final = frozenset((_SOP_CLASS_UID, _SOP_INSTANCE_UID))
#: How much of a deflated data set :class:`InstanceIdentity` inflates and walks, on
#: the worker's event loop: 8 MiB of the smallest elements (8 bytes each) take some
#: 0.3 s to walk; 256 MiB, which a 400 KB deflated PDV can carry, took 8.5 s and
#: the worker's heartbeats with it (a review).
DEFLATED_WALK_BYTES: Final = 8 * 1024 * 1024
_INFLATE_CHUNK: Final = 1024 * 1024
#: How much of a data set's start :class:`InstanceIdentity` keeps looking for its UIDs.
#: They are in group 0008, before anything big but a rare Language Code Sequence.
IDENTITY_SEARCH_BYTES: Final = 64 * 1024


@functools.cache
def walkable_encoding(transfer_syntax: str) -> tuple[bool, bool] | None:
    """(implicit, little) for a transfer syntax whose data set :func:`read_top_level`
    can walk as it is; None for deflated ones and those pydicom does not know."""
    from pydicom.uid import UID

    uid = UID(transfer_syntax)
    if not uid.is_transfer_syntax or uid.is_deflated:
        return None
    return uid.is_implicit_VR, uid.is_little_endian


class InstanceIdentity:
    """Whether a C-STORE's data set is the instance its command names, decided from the
    data set's first bytes while the rest still arrives.

    PS3.4 B.2.3: a data set whose SOP Class UID (0008,0016) or SOP Instance UID
    (0008,0018) differs from the command's Affected SOP Class / Instance UID is
    answered A900H (Data Set does not match SOP Class); one that does not parse, or
    lacks them (both are Type 1 in the SOP Common Module, PS3.3 C.12.1), is answered
    C000H (Cannot understand). DCMTK's storescp answers the same. Acknowledging such
    a data set would have the router keep, and forward, what the sender did not mean.

    A deflated data set (PS3.5 A.5) is inflated as it comes, a chunk at a time, and
    told and walked like any other; one that does not inflate, or whose deflate
    stream stops short, is C000H (a sender once sent plain bytes under the deflated
    syntax: they were acknowledged, and no destination could read them). Past
    :data:`DEFLATED_WALK_BYTES` inflated, it is no longer walked (a small deflate
    stream can inflate to gigabytes: the walk would cost the worker seconds);
    PS3.5 A.5 data sets are mostly small, non-image objects.

    A data set that is not whole (:class:`DataSetFraming`: cut off inside an element,
    a sequence never closed, an item tag where none belongs, a standard element twice)
    is C000H too, found wherever it is.

    ``status`` is None until decided, then 0 or the failure, with ``reason``; a
    framing failure may turn a 0 into C000H up to the last fragment. A data set in
    a transfer syntax this walk does not know, or whose UIDs are not within its
    first :data:`IDENTITY_SEARCH_BYTES`, is let through (0): it cannot be told here.
    """

    __slots__ = ("_framing", "_head", "_implicit", "_inflated", "_inflater", "_little",
                 "_unordered", "reason", "sop_class_uid", "sop_instance_uid", "status")

    def __init__(self, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str) -> None:
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.reason = ""
        self._head: bytearray | None = None
        self._unordered = False  # see _identify
        self._inflater = None
        self._inflated = 0
        encoding = walkable_encoding(transfer_syntax)
        encapsulated = (is_encapsulated(transfer_syntax)
                        if is_standard_transfer_syntax(transfer_syntax) else None)
        if encoding is None and is_deflated(transfer_syntax):
            self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            encoding = (False, True)  # deflated data sets are explicit VR LE inside
            # Deflated explicit VR LE carries native pixel data; the JPIP ones none.
            encapsulated = (False if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
                            else None)
        self.status: int | None = None if encoding is not None else 0
        self._implicit, self._little = encoding or (False, True)
        self._framing = (DataSetFraming(implicit=self._implicit, little=self._little,
                                        encapsulated=encapsulated)
                         if encoding is not None else None)

    def feed(self, data: bytes | bytearray | memoryview, *, last: bool) -> None:
        """The next fragment of the data set (``last``: the data set ends with it)."""
        if self._inflater is None:
            self._walk(data, last=last)
            return
        inflater = self._inflater
        while self._framing is not None and not self.status:
            if self._inflated >= DEFLATED_WALK_BYTES:
                self._framing = None  # no longer walked (see the class's text)
                if self.status is None:
                    self.status = 0
                return
            if inflater.eof:
                # What follows the end of the deflate stream is padding (PS3.5 A.5);
                # zlib, asked again, would take it a byte per call.
                if last:
                    self._walk(b"", last=True)
                return
            try:
                out = inflater.decompress(data, _INFLATE_CHUNK)
            except zlib.error as exc:
                self._fail(_CANNOT_UNDERSTAND, f"the deflated data set does not inflate: {exc}")
                return
            data = inflater.unconsumed_tail
            self._inflated += len(out)
            # Every byte given is inflated before the next fragment is (a full chunk
            # may leave output inside zlib with no input left: ask again).
            more = not inflater.eof and (bool(data) or len(out) == _INFLATE_CHUNK)
            if last and not more and not inflater.eof:
                self._framing = None
                self._fail(_CANNOT_UNDERSTAND, "the deflated data set is cut off "
                                               "(its deflate stream does not end)")
                return
            self._walk(out, last=last and not more)
            if not more:
                return

    def _walk(self, data: bytes | bytearray | memoryview, *, last: bool) -> None:
        framing = self._framing
        if framing is not None and not self.status:
            framing.feed(data, last=last)
            if framing.error is not None:
                self._framing = None
                self._fail(_CANNOT_UNDERSTAND, framing.error)
                return
        if self.status is not None:
            return
        if self._head is None:
            buf: bytes | bytearray | memoryview = data  # the usual case: no copy
        else:
            self._head += data
            buf = self._head
        self._identify(buf, last=last)

    def _identify(self, buf: bytes | bytearray | memoryview, *, last: bool) -> None:
        """Look for the UIDs in ``buf``, the data set's start so far. Elements come in
        ascending order (PS3.5 7.1), so the walk stops past (0008,0018); once it finds
        them missing so, it looks at every element instead (``_unordered``): some
        writers put a module first, and DCMTK reads such data sets (storescp stores
        them). They were refused "no SOP Class UID", which was not so."""
        found: dict[int, tuple[str | None, bytes]] = {}
        last_wanted = 0xFFFFFFFF if self._unordered else _SOP_INSTANCE_UID
        try:
            end = _skip_elements(memoryview(buf).cast("B"), 0, implicit=self._implicit,
                                 little=self._little, depth=0,
                                 top=(_IDENTITY_TAGS, last_wanted, found))
            if end == len(buf) and not last and len(found) < 2:
                raise HeaderIncomplete  # the fragment ended before the walk got past them
        except HeaderIncomplete:
            if last:
                self._fail(_CANNOT_UNDERSTAND, "the data set ends inside an element")
            elif len(buf) >= IDENTITY_SEARCH_BYTES:
                self.status = 0
                self._head = None
            elif self._head is None:
                self._head = bytearray(buf)
            return
        except (DIMSEError, ValueError) as exc:
            self._fail(_CANNOT_UNDERSTAND, f"the data set does not parse: {exc}")
            return
        sop_class, sop_instance = (
            found[tag][1].rstrip(b"\0 ").decode("ascii", "replace") if tag in found else None
            for tag in (_SOP_CLASS_UID, _SOP_INSTANCE_UID))
        if (sop_class is None or sop_instance is None) and not self._unordered:
            self._unordered = True
            self._identify(buf, last=last)
            return
        self._head = None
        if sop_class is None or sop_instance is None:
            missing = "SOP Class UID" if sop_class is None else "SOP Instance UID"
            self._fail(_CANNOT_UNDERSTAND, f"the data set has no {missing}")
        elif sop_class != self.sop_class_uid:
            self._fail(_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                       f"the data set's SOP Class UID is {sop_class}")
        elif sop_instance != self.sop_instance_uid:
            self._fail(_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                       f"the data set's SOP Instance UID is {sop_instance}")
        else:
            self.status = 0

    def _fail(self, status: int, reason: str) -> None:
        self.status, self.reason, self._head = status, reason, None


# What DataSetFraming expects next where it stands: elements (the data set, or an
# item of a sequence), items (a sequence), or fragments (encapsulated pixel data:
# items whose values are not elements, PS3.5 A.4).
_ELEMENTS: Final = 0
_ITEMS: Final = 1
_FRAGMENTS: Final = 2
_NO_LIMIT: Final = 1 << 62


@functools.cache
def _sequence_tags() -> frozenset[int]:
    """The standard's sequence attributes: in implicit VR only the dictionary tells
    a defined-length sequence from any other value."""
    from pydicom.datadict import DicomDictionary

    return frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")


class DataSetFraming:
    """Whether a data set arriving in fragments is whole: every element's header and
    length (PS3.5 §7.1), every sequence and item closed by its delimiter or filled
    to its defined length exactly, nothing inside one running past its end (§7.5),
    with nothing cut off at the end; no item tag among elements, no VR the standard
    does not define (whose length field nobody agrees on), no standard element twice
    in the data set (§7.1: "at most once"; readers disagree on which one counts, the
    SOP Instance UID say), and Pixel Data encapsulated exactly when the transfer
    syntax says so (PS3.5 §A.4; ``encapsulated``: None, not checked).

    A C-STORE data set that stops inside an element, or whose sequence is never
    closed, cannot be read by anyone (PS3.4 B.2.3: C000H, cannot understand), and
    acknowledging it would have the sender delete what no destination can take.
    The walk reads headers only: values are stepped over unread, so an image costs a
    few dozen headers whatever its size. Sequences are entered, defined length or
    not (in implicit VR, those the data dictionary names: a private one is a value
    like any other), and so are their items; encapsulated fragments are not.
    ``feed`` each fragment in order; ``error`` is None or why it is not whole.
    """

    __slots__ = ("_carry", "_encapsulated", "_head", "_implicit", "_offset", "_seen",
                 "_sequences", "_skip", "_stack", "_structs", "error")

    def __init__(self, *, implicit: bool, little: bool,
                 encapsulated: bool | None = None) -> None:
        self._implicit = implicit
        self._encapsulated = encapsulated
        self._seen: set[int] = set()  # the data set's own tags so far
        self._structs = _structs(little)
        self._sequences = _sequence_tags() if implicit else frozenset()
        # A whole element header in one unpack, for the data set's own elements (the
        # walk's hot loop): tag and 4-byte length, or tag, VR, 2-byte length and the
        # 4-byte length that follows a long VR's reserved bytes.
        order = "<" if little else ">"
        self._head = struct.Struct(order + ("HHI" if implicit else "HH2sHI")).unpack_from
        self._carry = b""  # a header cut by the end of a fragment
        self._skip = 0  # bytes of a value still to step over
        self._offset = 0  # where in the data set the next fragment starts
        # Open sequences and items, innermost last: (_ELEMENTS, _ITEMS or _FRAGMENTS,
        # implicit VR inside, its byte order's structs, the offset nothing inside may
        # pass, whether that offset is its own defined end). Empty: the data set's own
        # elements.
        self._stack: list[tuple[int, bool, _Structs, int, bool]] = []
        self.error: str | None = None

    def feed(self, data: bytes | bytearray | memoryview, *, last: bool) -> None:
        if self.error is not None:
            return
        try:
            self._walk(memoryview(data).cast("B"))
        except (DIMSEError, ValueError) as exc:
            self.error = f"the data set does not parse: {exc}"
            return
        if last:
            if self._skip or self._carry:
                self.error = "the data set ends inside an element"
            elif self._stack:
                self.error = ("the data set ends inside a sequence that is never closed"
                              if not self._stack[0][4] else
                              "the data set ends inside a sequence or item whose length "
                              "runs past its end")

    def _walk(self, view: memoryview) -> None:
        pos, end = 0, len(view)
        base = self._offset  # where view[0] is in the data set
        self._offset += end
        stack = self._stack
        while True:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
            while stack and stack[-1][3] == base + pos and not self._carry:
                # The defined end of the innermost structure with one.
                if not stack[-1][4]:
                    raise ValueError("a sequence or item without its delimiter at the "
                                     "defined end of the item around it")
                stack.pop()
            if pos == end:
                return
            if not stack and not self._carry:
                pos = self._top_level(view, pos, end)
                if pos > end:  # the last value runs on into the next fragment
                    self._skip, pos = pos - end, end
                if pos == end:
                    return
            if self._carry:
                # Complete the cut header from this fragment (headers are 8 or 12 bytes).
                head = self._carry + bytes(view[pos : pos + 12 - len(self._carry)])
                used = self._header(memoryview(head), 0, base + pos - len(self._carry))
                if used < 0:
                    if len(head) >= 12:
                        raise ValueError("an element header that cannot be read")
                    self._carry = head
                    return
                pos += used - len(self._carry)
                self._carry = b""
                continue
            used = self._header(view, pos, base + pos)
            if used < 0:
                self._carry = bytes(view[pos:])
                return
            pos += used

    def _top_level(self, view: memoryview, pos: int, end: int) -> int:
        """Step over the data set's own elements from ``pos`` that are plain values
        with a defined length: where the first one that needs :meth:`_header` starts
        (a delimiter, a sequence, an undefined length, a header cut by ``end``), or
        where a value cut by ``end`` would end."""
        head = self._head
        if self._implicit:
            sequences = self._sequences
            while pos + 8 <= end:
                group, element, length = head(view, pos)
                tag = group << 16 | element
                if group == 0xFFFE or length == _UNDEFINED or tag in sequences:
                    break
                self._own_element(tag, length)
                pos += 8 + length
            return pos
        while pos + 12 <= end:
            group, element, vr, short, long = head(view, pos)
            if group == 0xFFFE:
                break
            if vr in _LONG_VRS:
                if long == _UNDEFINED or vr == b"SQ":
                    break
                self._own_element(group << 16 | element, long)
                pos += 12 + long
            elif vr in _KNOWN_VRS:
                self._own_element(group << 16 | element, short)
                pos += 8 + short
            else:
                break  # no VR, or an unknown one: see _header
        return pos

    def _own_element(self, tag: int, length: int) -> None:
        """An element of the data set itself (not of an item): a standard one seen
        once, and Pixel Data with the length its transfer syntax calls for."""
        seen = self._seen
        if tag >> 16 in (0x0000, 0x0002):
            # A Data Set holds no group below 0008 (PS3.5 7.1; the note of PS3.4
            # C.4.1.1.3): command elements belong to the command set, group 0002 to
            # a file's meta (PS3.10 7.1). Acknowledged, the spooled file's meta
            # reader took them for its own and the instance went out cut, or in the
            # transfer syntax they named: refused now, the sender keeps it.
            raise ValueError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is a "
                             + ("command" if tag >> 16 == 0 else "file meta")
                             + " element, which a data set may not hold (PS3.5 7.1)")
        if not tag & 0x10000:  # an even group: the standard's (PS3.5 7.1)
            # A repeated private element is left alone: DCMTK warns and reads on.
            if tag in seen:
                raise ValueError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) occurs twice "
                                 "(PS3.5 7.1: at most once)")
            if len(seen) >= _MAX_OWN_ELEMENTS:
                # The set costs memory per element: bounded, far past real data sets.
                raise ValueError(f"more than {_MAX_OWN_ELEMENTS} standard elements in the "
                                 "data set itself")
            seen.add(tag)
        if tag == _PIXEL_DATA and self._encapsulated is not None \
                and self._encapsulated != (length == _UNDEFINED):
            raise ValueError("Pixel Data is " + (
                "not encapsulated, as its compressed transfer syntax requires"
                if self._encapsulated else
                "encapsulated, which its native transfer syntax does not allow")
                + " (PS3.5 A.4)")

    def _header(self, view: memoryview, pos: int, at: int) -> int:
        """Take the header at ``pos`` (``at`` in the data set): how many bytes it was,
        or -1 if ``view`` ends inside it. Sets what to skip and opens or closes
        structures."""
        stack = self._stack
        kind, implicit, structs, limit, defined = (
            stack[-1] if stack else (_ELEMENTS, self._implicit, self._structs, _NO_LIMIT, False))
        if kind != _ELEMENTS:
            if pos + 8 > len(view):
                return -1
            group, element, length = structs[0].unpack_from(view, pos)
            tag = group << 16 | element
            if at + 8 > limit:
                raise ValueError(f"({group:04X},{element:04X}) runs past the end of its "
                                 "sequence")
            if tag == _SEQUENCE_DELIMITER:
                if not defined:
                    stack.pop()
                elif at + 8 != limit:
                    # At its very end, DCMTK reads it as the end (and so do we);
                    # before, readers disagree on where the sequence ends.
                    raise ValueError("a sequence delimiter before the end of its "
                                     "defined length")
            elif tag != _ITEM:
                raise ValueError(f"expected an item, found ({group:04X},{element:04X})")
            elif length == _UNDEFINED:
                if kind == _FRAGMENTS:
                    raise ValueError("an encapsulated fragment of undefined length "
                                     "(PS3.5 A.4)")
                self._open(_ELEMENTS, implicit, structs, limit, False)
            elif at + 8 + length > limit:
                raise ValueError("an item runs past the end of its sequence")
            elif kind == _ITEMS and length:
                self._open(_ELEMENTS, implicit, structs, at + 8 + length, True)
            else:
                self._skip = length
            return 8
        try:
            tag, vr, start, length = _element_header(view, pos, implicit, structs)
        except HeaderIncomplete:
            return -1
        if vr is not None and vr not in _KNOWN_VRS:
            # Its length field is 2 bytes to some readers, 4 to others (DCMTK).
            raise ValueError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) has VR {vr!r}, which "
                             "DICOM does not define (PS3.5 Table 6.2-1)")
        if vr is None and not implicit and tag >> 16 != 0xFFFE:
            # pydicom reads on in implicit VR; DCMTK cannot, and the file we would
            # spool is labelled with the explicit syntax it is not in (PS3.5 7.1.2).
            raise ValueError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) has no VR (bytes "
                             f"{bytes(view[pos + 4 : pos + 6])!r}): the data set is not "
                             "in the explicit VR its transfer syntax says")
        value_at = at + start - pos
        if tag >> 16 == 0xFFFE:
            if tag != _ITEM_DELIMITER:  # an item, a sequence delimiter: unreadable here
                raise ValueError(f"an item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) "
                                 "where an element belongs")
            if not stack:
                # pydicom stops reading the data set there, other readers go on.
                raise ValueError("an item delimiter (FFFE,E00D) among the data set's "
                                 "own elements")
            if not defined:
                stack.pop()  # the end of an undefined-length item
            elif at + 8 != limit:
                raise ValueError("an item delimiter before the end of its item's "
                                 "defined length")
            return start - pos
        if value_at + (0 if length == _UNDEFINED else length) > limit:
            raise ValueError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end of "
                             "its item")
        if not stack:
            self._own_element(tag, length)
        sequence = vr == b"SQ" or (vr is None and tag in self._sequences)
        if length == _UNDEFINED:
            # A sequence, or encapsulated pixel data (PS3.5 A.4); an undefined-length
            # UN's items have their own encoding (_inside_undefined).
            fragments = _encapsulated(tag, vr)
            self._open(_FRAGMENTS if fragments else _ITEMS,
                       *_inside_undefined(vr, implicit, structs), limit, False)
        elif sequence and length:
            self._open(_ITEMS, implicit, structs, value_at + length, True)
        else:
            self._skip = length
        return start - pos

    def _open(self, kind: int, implicit: bool, structs: _Structs, limit: int,
              defined: bool) -> None:
        if len(self._stack) >= 2 * _MAX_DEPTH:  # a sequence and its item per level
            raise DIMSEError(f"sequences nested deeper than {_MAX_DEPTH}",
                             status=_CANNOT_UNDERSTAND)
        self._stack.append((kind, implicit, structs, limit, defined))


def _skip_elements(view: memoryview, pos: int, *, implicit: bool, little: bool, depth: int,
                   top: tuple[frozenset[int], int, dict[int, tuple[str | None, bytes]]] | None,
                   ) -> int:
    """Walk elements from ``pos``; at top level collect wanted values and stop past the
    last wanted tag; inside an undefined-length item stop after its delimiter."""
    structs = _structs(little)
    limit = len(view)
    while True:
        if pos == limit and top is not None:
            return pos  # the data set ended: what was not found is absent
        tag, vr, start, length = _element_header(view, pos, implicit, structs)
        if tag == _ITEM_DELIMITER and top is None:
            return start
        if top is not None and tag > top[1]:
            return pos
        # Where this element goes if it is wanted at top level, else None.
        found = top[2] if top is not None and tag in top[0] else None
        vr_name = None if found is None or vr is None else vr.decode("ascii")
        if length == _UNDEFINED:
            if found is not None and not _encapsulated(tag, vr):
                raise ValueError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) has an undefined length")
            pos = _past_undefined(view, start, vr, implicit=implicit, little=little,
                                  depth=depth)
            if found is not None:  # encapsulated pixel data: there, its fragments never read
                found[tag] = (vr_name, b"")
            continue
        if found is not None:
            bulk = vr in _BULK_VRS if vr is not None else tag == _PIXEL_DATA
            if bulk and length > MAX_WANTED_BULK:
                # A rule asks whether it is there: the value is not copied (a native
                # image of hundreds of MB into the commit thread's memory).
                found[tag] = (vr_name, b"")
            else:
                if start + length > limit:
                    raise HeaderIncomplete
                found[tag] = (vr_name, bytes(view[start : start + length]))
        pos = start + length


def _encapsulated(tag: int, vr: bytes | None) -> bool:
    """An undefined-length value that holds fragments, not a sequence's items: OB or
    OW (PS3.5 A.4), or Pixel Data where no VR is written."""
    return vr in (b"OB", b"OW") or (vr is None and tag == _PIXEL_DATA)


def top_level_spans(view: memoryview, *, implicit: bool,
                    little: bool) -> list[tuple[int, str | None, int, int]]:
    """Every top-level element of the data set in ``view``: (tag, explicit VR or None,
    where it starts, where it ends), element headers included, in order. Reads
    element and item headers only (PS3.5 §7.1, §7.5), so values are never touched;
    HeaderIncomplete when ``view`` ends within an element."""
    structs = _structs(little)
    spans: list[tuple[int, str | None, int, int]] = []
    pos = 0
    while pos < len(view):
        tag, vr, start, length = _element_header(view, pos, implicit, structs)
        if length == _UNDEFINED:
            end = _past_undefined(view, start, vr, implicit=implicit, little=little, depth=0)
        else:
            end = start + length
            if end > len(view):
                raise HeaderIncomplete
        spans.append((tag, None if vr is None else vr.decode("ascii"), pos, end))
        pos = end
    return spans


_Structs: TypeAlias = tuple[struct.Struct, struct.Struct, struct.Struct]


@functools.cache
def _structs(little: bool) -> _Structs:
    order = "<" if little else ">"
    return struct.Struct(order + "HHI"), struct.Struct(order + "H"), struct.Struct(order + "I")


def _element_header(view: memoryview, pos: int, implicit: bool,
                    structs: tuple[struct.Struct, struct.Struct, struct.Struct],
                    ) -> tuple[int, bytes | None, int, int]:
    """The element header at ``pos`` (PS3.5 §7.1): tag, explicit VR or None, where
    its value starts, its length."""
    tag_length, short_length, long_length = structs
    limit = len(view)
    if pos + 8 > limit:
        raise HeaderIncomplete
    group, element, length = tag_length.unpack_from(view, pos)
    if implicit or group == 0xFFFE:
        return group << 16 | element, None, pos + 8, length
    vr = bytes(view[pos + 4 : pos + 6])
    if vr in _LONG_VRS:
        if pos + 12 > limit:
            raise HeaderIncomplete
        return group << 16 | element, vr, pos + 12, long_length.unpack_from(view, pos + 8)[0]
    if b"AA" <= vr <= b"ZZ":
        return group << 16 | element, vr, pos + 8, short_length.unpack_from(view, pos + 6)[0]
    # Implicit VR inside explicit VR data, as pydicom allows.
    return group << 16 | element, None, pos + 8, length


def _inside_undefined(vr: bytes | None, implicit: bool,
                      structs: _Structs) -> tuple[bool, _Structs]:
    """(implicit, structs) of the items of an undefined-length value of VR ``vr``: an
    undefined-length UN holds implicit VR little endian items whatever the transfer
    syntax (PS3.5 §6.2.2, CP-246), big endian too; any other, as around it."""
    return (True, _structs(True)) if vr == b"UN" else (implicit, structs)


def _past_undefined(view: memoryview, start: int, vr: bytes | None, *, implicit: bool,
                    little: bool, depth: int) -> int:
    """Past the items of an undefined-length value of VR ``vr`` starting at ``start``
    (an undefined-length UN's: implicit VR little endian, see _inside_undefined)."""
    if vr == b"UN":
        implicit = little = True
    if depth >= _MAX_DEPTH:
        raise DIMSEError(f"sequences nested deeper than {_MAX_DEPTH}",
                         status=_CANNOT_UNDERSTAND)
    return _skip_items(view, start, implicit=implicit, little=little, depth=depth + 1)


def _skip_items(view: memoryview, pos: int, *, implicit: bool, little: bool, depth: int) -> int:
    """Skip an undefined-length sequence's items up to and past its delimiter."""
    tag_length = _structs(little)[0]
    while True:
        if pos + 8 > len(view):
            raise HeaderIncomplete
        group, element, length = tag_length.unpack_from(view, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            return pos + 8
        if tag != _ITEM:
            raise DIMSEError(f"malformed dataset at offset {pos}: expected an item, found "
                             f"({group:04X},{element:04X})", status=_CANNOT_UNDERSTAND)
        if length == _UNDEFINED:
            pos = _skip_elements(view, pos + 8, implicit=implicit, little=little, depth=depth,
                                 top=None)
        else:
            pos += 8 + length


def part10_meta_bytes(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    source_ae_title: str | None = None,
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID,
    implementation_version_name: str | None = IMPLEMENTATION_VERSION_NAME,
) -> bytes:
    """Preamble, ``DICM`` and the file meta information group, PS3.10 §7.1.

    Followed by a dataset's bytes exactly as received in ``transfer_syntax``,
    this makes a Part 10 file. Group 0002 is explicit VR little endian with a
    correct (0002,0000) group length; UIDs are NUL-padded, other strings
    space-padded to even length (PS3.5 §6.2). Invalid values raise
    :class:`~router.dicom.errors.LocalProtocolError`.
    """
    for name, uid in (
        ("sop_class_uid", sop_class_uid),
        ("sop_instance_uid", sop_instance_uid),
        ("transfer_syntax", transfer_syntax),
        ("implementation_class_uid", implementation_class_uid),
    ):
        if not isinstance(uid, str) or not is_valid_uid(uid):
            raise LocalProtocolError(f"part10_meta_bytes: {name} is not a valid UID: {uid!r}")
    for name, text in (
        ("source_ae_title", source_ae_title),
        ("implementation_version_name", implementation_version_name),
    ):
        if text is not None and not _short_text(text):
            raise LocalProtocolError(
                f"part10_meta_bytes: {name} must be 1-16 printable ASCII characters: {text!r}"
            )
    elements = [
        _meta_element(0x0001, b"OB", b"\x00\x01"),  # FileMetaInformationVersion
        _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _meta_element(0x0012, b"UI", _padded(implementation_class_uid, b"\x00")),
    ]
    if implementation_version_name is not None:
        elements.append(_meta_element(0x0013, b"SH", _padded(implementation_version_name, b" ")))
    if source_ae_title is not None:
        elements.append(_meta_element(0x0016, b"AE", _padded(source_ae_title, b" ")))
    body = b"".join(elements)
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * _PREAMBLE_LENGTH + _MAGIC + group_length + body


def _short_text(text: object) -> bool:
    return (
        isinstance(text, str)
        and 1 <= len(text.strip(" ")) <= 16
        and len(text) <= 16
        and text.isascii()
        and text.isprintable()
        and "\\" not in text
    )


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) & 1 else raw


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    # Explicit VR little endian element of group 0002, PS3.5 §7.1.2.
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value
