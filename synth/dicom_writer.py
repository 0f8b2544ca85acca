"""Building and writing DICOM Part 10 files deterministically and fast.

UIDs are ``2.25.<uuid>`` values with a name-based (version 5) UUID of the cohort seed and a
key, so they are fixed for a seed (note: ``pydicom.uid.generate_uid(prefix=None, ...)``
ignores ``entropy_srcs`` and returns a random UUID, so it is not used); dates and times come
from the plan, never from the wall clock.  Files are Explicit VR Little Endian.

Speed: the attributes shared by a series are encoded once (with pydicom's own element
encoder) and reused for every instance; only the instance-specific elements and the pixel
data are encoded per file.  ``Instance.to_dataset()`` gives the same content as a pydicom
Dataset for callers that want one.
"""
from __future__ import annotations

import os
import struct
import uuid as _uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",              # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",            # Digital X-Ray Image Storage - For Presentation
    "CT": "1.2.840.10008.5.1.4.1.1.2",              # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",              # MR Image Storage
    "OP": "1.2.840.10008.5.1.4.1.1.77.1.5.1",       # Ophthalmic Photography 8 Bit Image Storage
    "DMS": "1.2.840.10008.5.1.4.1.1.77.1.7",        # Dermoscopic Photography Image Storage
    "XC": "1.2.840.10008.5.1.4.1.1.77.1.4",         # VL Photographic Image Storage
    "SC": "1.2.840.10008.5.1.4.1.1.7",              # Secondary Capture Image Storage
}
IMPLEMENTATION_VERSION = "DICOMNODE_SYN1"


UID_NAMESPACE = _uuid.UUID("6f1c7a52-3d0e-5b8a-9c41-d1c0a0de5e11")


def uid(seed, *parts) -> str:
    """A deterministic ``2.25.`` UID (UUID version 5) for ``parts`` under ``seed``."""
    name = "\x1f".join([str(seed)] + [str(p) for p in parts])
    return f"2.25.{_uuid.uuid5(UID_NAMESPACE, name).int}"


def safe_component(s: str) -> str:
    """A Patient ID made safe as one path component."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
    return out.strip(".") or "_"


def patient_study_attrs(h: dict) -> list[tuple[str, object]]:
    """Patient, study and equipment attributes shared by every instance of a study."""
    attrs = []
    if h.get("charset"):
        attrs.append(("SpecificCharacterSet", h["charset"]))
    attrs += [
        ("PatientName", h.get("name", "")), ("PatientID", h.get("patient_id", "")),
        ("IssuerOfPatientID", h.get("issuer", "")), ("PatientBirthDate", h.get("birth_date", "")),
        ("PatientSex", h.get("sex", "")), ("PatientAge", h.get("age", "")),
        ("StudyInstanceUID", h["study_uid"]), ("StudyDate", h["study_date"]),
        ("StudyTime", h["study_time"]), ("AccessionNumber", h.get("accession", "")),
        ("StudyID", h.get("study_id", "")), ("StudyDescription", h.get("study_description", "")),
        ("ReferringPhysicianName", h.get("referring", "")),
        ("InstitutionName", h.get("institution", "")), ("StationName", h.get("station", "")),
        ("Manufacturer", h.get("manufacturer", "")), ("ManufacturerModelName", h.get("model", "")),
        ("DeviceSerialNumber", h.get("serial", "")), ("SoftwareVersions", h.get("software", "")),
    ]
    return attrs


def set_pixels(ds: Dataset, arr: np.ndarray, photometric: str, bits_stored: int | None = None):
    """Image Pixel module for a 2D grayscale (uint16/int16/uint8) or RGB uint8 array."""
    arr = np.ascontiguousarray(arr)
    ds.SamplesPerPixel = 3 if arr.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    if arr.ndim == 3:
        if arr.dtype != np.uint8 or arr.shape[2] != 3:
            raise ValueError("colour images must be uint8 with 3 samples")
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    bits_alloc = arr.dtype.itemsize * 8
    ds.BitsAllocated = bits_alloc
    ds.BitsStored = int(bits_stored or bits_alloc)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    if len(data) % 2:
        data += b"\x00"
    ds.add_new(0x7FE00010, "OB" if bits_alloc == 8 else "OW", data)


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def dicom_window(lo: float, hi: float) -> tuple[str, str]:
    """Window Center/Width (as DS strings) covering [lo, hi]."""
    return f"{(lo + hi) / 2:.1f}", f"{max(hi - lo, 1):.1f}"


@dataclass
class Instance:
    """One SOP instance to write: shared series attributes plus its own."""
    common: list
    sop_class: str
    sop_uid: str
    specific: list
    pixels: np.ndarray
    photometric: str
    bits: int | None = None

    def to_dataset(self) -> Dataset:
        ds = Dataset()
        ds.file_meta = file_meta(self.sop_class, self.sop_uid)
        for kw, value in self.common:
            setattr(ds, kw, value)
        ds.SOPClassUID = self.sop_class
        ds.SOPInstanceUID = self.sop_uid
        for kw, value in self.specific:
            setattr(ds, kw, value)
        set_pixels(ds, self.pixels, self.photometric, self.bits)
        correct_ambiguous_vr(ds, True)
        return ds


def file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def _elem(tag: int, vr: str, value: bytes) -> bytes:
    if vr in ("OB", "OW", "SQ", "UN", "UT", "UC", "UR"):
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value)) + value


def _ui(s: str) -> bytes:
    b = s.encode()
    return b + b"\x00" if len(b) % 2 else b


def encode_meta(sop_class: str, sop_uid: str) -> bytes:
    """File Meta Information group (0002) for Explicit VR Little Endian."""
    ver = IMPLEMENTATION_VERSION.encode()
    body = (_elem(0x00020001, "OB", b"\x00\x01") + _elem(0x00020002, "UI", _ui(sop_class))
            + _elem(0x00020003, "UI", _ui(sop_uid)) + _elem(0x00020010, "UI", _ui(ExplicitVRLittleEndian))
            + _elem(0x00020012, "UI", _ui(PYDICOM_IMPLEMENTATION_UID))
            + _elem(0x00020013, "SH", ver + (b" " if len(ver) % 2 else b"")))
    return _elem(0x00020000, "UL", struct.pack("<I", len(body))) + body


def _encode_dataset(ds: Dataset, encodings) -> dict[int, bytes]:
    out = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        write_data_element(fp, elem, encodings)
        out[int(elem.tag)] = fp.getvalue()
    return out


class SeriesEncoder:
    """Encodes a series' shared attributes once; writes each instance as a Part 10 file."""

    def __init__(self, common: list):
        ds = Dataset()
        for kw, value in common:
            setattr(ds, kw, value)
        correct_ambiguous_vr(ds, True)
        self.encodings = convert_encodings(ds.get("SpecificCharacterSet"))
        self.common = _encode_dataset(ds, self.encodings)

    def encode(self, inst: Instance) -> bytes:
        arr = np.ascontiguousarray(inst.pixels)
        key = (arr.shape, arr.dtype.str, inst.photometric, inst.bits)
        if getattr(self, "_pix_key", None) != key:     # Image Pixel module, once per series
            pds = Dataset()
            set_pixels(pds, arr, inst.photometric, inst.bits)
            del pds.PixelData
            correct_ambiguous_vr(pds, True)
            self._pix = _encode_dataset(pds, self.encodings)
            self._pix_key = key
        ds = Dataset()
        ds.SOPClassUID = inst.sop_class
        ds.SOPInstanceUID = inst.sop_uid
        for kw, value in inst.specific:
            setattr(ds, kw, value)
        if "PixelRepresentation" not in ds and any(kw == "PixelPaddingValue" for kw, _ in inst.specific):
            ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
        correct_ambiguous_vr(ds, True)
        elems = dict(self.common)
        elems.update(self._pix)
        elems.update(_encode_dataset(ds, self.encodings))
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        if len(data) % 2:
            data += b"\x00"
        elems[0x7FE00010] = _elem(0x7FE00010, "OB" if arr.dtype.itemsize == 1 else "OW", data)
        return (b"\x00" * 128 + b"DICM" + encode_meta(inst.sop_class, inst.sop_uid)
                + b"".join(elems[t] for t in sorted(elems)))

    def write(self, path: Path, inst: Instance) -> int:
        data = self.encode(inst)
        os.makedirs(path.parent, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
        return len(data)
