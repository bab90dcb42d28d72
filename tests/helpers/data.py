"""Test data: synthetic CT instances of a chosen size, and pydicom's real-world files.

Usable outside pytest (bench/ puts the repo root on sys.path and imports
``tests.helpers.data``): nothing here imports pytest.

The synthetic instances are valid CT Image Storage objects (PS3.3 A.3): every type 1 and
type 2 attribute of the mandatory modules is present, the pixel data is 16-bit unsigned
MONOCHROME2 with Bits Stored 16 (so any byte pattern is a valid pixel value, in either
byte order), and every call mints fresh UIDs unless given some.
"""

from __future__ import annotations

import array
import functools
import io
import math
import os
import random
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

#: Transfer syntaxes make_ct can write (pixel data is never compressed).
UNCOMPRESSED_SYNTAXES = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)

_DATE = "20240102"
_TIME = "030405"


def make_ct(
    path: str | os.PathLike[str] | None = None,
    *,
    size_kb: float = 500,
    transfer_syntax: str = ExplicitVRLittleEndian,
    patient_id: str = "TEST0001",
    patient_name: str = "Test^Patient",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    modality: str = "CT",
    series_number: int = 1,
    instance_number: int = 1,
    seed: int = 0,
    attrs: Mapping[str, Any] | None = None,
) -> Dataset:
    """Build a CT Image Storage instance whose Part 10 file is about ``size_kb`` KiB.

    Rows and Columns are chosen so that header plus 16-bit pixel data come within a few
    hundred bytes of the target (Columns is 512 for big images, square for small ones;
    the smallest image is 8 x 8). ``seed`` fixes the pixel bytes; UIDs not given are
    fresh (``generate_uid``). ``modality`` only sets (0008,0060): the SOP class stays CT.
    ``attrs`` sets or overrides attributes by keyword, e.g. ``{"StudyDescription": "x"}``.

    Writes the file to ``path`` if given; returns the dataset (``file_meta`` set) either
    way. ``to_bytes(ds)`` gives the Part 10 bytes.
    """
    ts = UID(transfer_syntax)
    if ts not in UNCOMPRESSED_SYNTAXES:
        raise ValueError(f"make_ct writes uncompressed syntaxes only, not {ts.name}")
    sop_uid = UID(sop_instance_uid) if sop_instance_uid else generate_uid()

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = _DATE
    ds.InstanceCreationTime = _TIME
    # General Image, CT Image (ImageType, acquisition)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate = _DATE
    ds.SeriesDate = _DATE
    ds.ContentDate = _DATE
    ds.StudyTime = _TIME
    ds.SeriesTime = _TIME
    ds.ContentTime = _TIME
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "dicom-router tests"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "synthetic CT"
    ds.SeriesDescription = f"series {series_number}"
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    # CT acquisition, image plane
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0, 0, float(instance_number)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame_of_reference_uid or generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = float(instance_number)
    # Image Pixel, CT Image
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 0
    ds.Columns = 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    for keyword, value in (attrs or {}).items():
        setattr(ds, keyword, value)

    header = len(to_bytes(ds))
    element_header = 8 if ts == ImplicitVRLittleEndian else 12
    pixels = max(64, (int(size_kb * 1024) - header - element_header) // 2)
    columns = 512 if pixels >= 512 * 64 else max(8, math.isqrt(pixels))
    rows = max(8, round(pixels / columns))
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelData = random.Random(seed).randbytes(rows * columns * 2)
    ds["PixelData"].VR = "OW"

    if path is not None:
        Path(path).write_bytes(to_bytes(ds))
    return ds


def make_tiny(path: str | os.PathLike[str] | None = None, **kwargs: Any) -> Dataset:
    """A ~2 KiB CT instance (a few hundred pixels); keywords as for ``make_ct``."""
    kwargs.setdefault("size_kb", 2)
    return make_ct(path, **kwargs)


def make_study(
    directory: str | os.PathLike[str],
    n_series: int = 1,
    n_instances: int = 10,
    size_kb: float = 500,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    patient_id: str = "TEST0001",
    patient_name: str = "Test^Patient",
    study_uid: str | None = None,
    modality: str = "CT",
    seed: int = 0,
) -> list[Path]:
    """Write one study: ``n_series`` series of ``n_instances`` instances each.

    Files are ``directory/s<series>_i<instance>.dcm`` (created as needed), returned in that
    order. Series share the study UID; instances of a series share its series and frame of
    reference UIDs and get InstanceNumber 1..n.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    study = study_uid or generate_uid()
    paths: list[Path] = []
    for s in range(1, n_series + 1):
        series, frame = generate_uid(), generate_uid()
        for i in range(1, n_instances + 1):
            path = out / f"s{s:03d}_i{i:05d}.dcm"
            make_ct(
                path,
                size_kb=size_kb,
                transfer_syntax=transfer_syntax,
                patient_id=patient_id,
                patient_name=patient_name,
                study_uid=study,
                series_uid=series,
                frame_of_reference_uid=frame,
                modality=modality,
                series_number=s,
                instance_number=i,
                seed=seed + s * 100_000 + i,
            )
            paths.append(path)
    return paths


def to_bytes(ds: Dataset) -> bytes:
    """The Part 10 file bytes of ``ds`` (preamble, meta group, its transfer syntax)."""
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def pydicom_test_files() -> list[Path]:
    """Real-world DICOM files shipped in pydicom's ``pydicom/data/test_files/``, sorted.

    Only files pydicom reads (without ``force``) that carry SOP Class and SOP Instance
    UIDs; the folder is listed directly, since ``get_testdata_files()`` tries to download
    and hangs offline. Mind that SOP Instance UIDs repeat across files (``MR_small_*`` is
    one instance in many encodings), that many are compressed (JPEG, JPEG 2000, JPEG-LS,
    RLE, deflate), and that ``MR_truncated.dcm`` and ``rtplan_truncated.dcm`` are cut short.
    """
    return list(_pydicom_test_files())


@functools.cache
def _pydicom_test_files() -> tuple[Path, ...]:
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    found = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not DICOM, or not readable: not what the caller wants
            continue
        if "SOPClassUID" in ds and "SOPInstanceUID" in ds:
            found.append(path)
    return tuple(found)


def same_content(got: Dataset, source: Path) -> None:
    """``got`` (decoded in another uncompressed syntax) holds what the file holds: the
    same elements, and the same 16-bit pixel *values* whatever the byte order."""
    original = pydicom.dcmread(source)
    words = {}
    for ds in (got, original):
        values = array.array("H", ds.PixelData)
        if not ds.original_encoding[1]:  # read as big endian: bytes are big-endian words
            values.byteswap()
        words[id(ds)] = values
        del ds.PixelData
    assert words[id(got)] == words[id(original)]
    assert got == original
