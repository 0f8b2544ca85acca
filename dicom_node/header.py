"""Read the few header tags the node needs from a received instance, and judge it.

No pixel decoding here: this runs inside the C-STORE handler. The result is
plain data (`db.records.InstanceHeader`) for the storage layer.
"""

from __future__ import annotations

from io import BytesIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from db.records import InstanceHeader, PatientKey
from dicom_node.framing import FramingError, LimitExceeded, Limits, check_framing
from dicom_node.statuses import IngestFailure, Status

_TAGS = [
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID",
    "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDs", "OtherPatientIDsSequence", "PatientName", "PatientBirthDate",
    "PatientSex", "PatientAge",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
    "SeriesInstanceUID", "Modality", "BodyPartExamined", "SeriesNumber", "SeriesDescription",
    "InstanceNumber", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames",
]
_TAG_NUMBERS = [Tag(keyword) for keyword in _TAGS]


def _text(ds: Dataset, keyword: str, limit: int | None = None) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    text = str(value).strip()
    return (text[:limit] if limit else text) or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _issuer(ds: Dataset) -> tuple[str, dict | None]:
    """Issuer of Patient ID (0010,0021), else the universal ID of (0010,0024)."""
    qualifiers = None
    seq = ds.get("IssuerOfPatientIDQualifiersSequence")
    if seq:
        item = seq[0]
        qualifiers = {
            key: str(item.get(key))
            for key in ("UniversalEntityID", "UniversalEntityIDType", "IdentifierTypeCode")
            if item.get(key) not in (None, "")
        } or None
    issuer = _text(ds, "IssuerOfPatientID", 128)
    if issuer is None and qualifiers:
        issuer = qualifiers.get("UniversalEntityID")
    return issuer or "", qualifiers


def _other_ids(ds: Dataset) -> list[dict]:
    others = []
    for item in ds.get("OtherPatientIDsSequence") or []:
        pid = _text(item, "PatientID", 64)
        if pid:
            others.append({"patient_id": pid, "issuer": _text(item, "IssuerOfPatientID", 128) or ""})
    legacy = ds.get("OtherPatientIDs")
    if legacy:
        values = legacy if isinstance(legacy, (list, pydicom.multival.MultiValue)) else [legacy]
        known = {o["patient_id"] for o in others}
        others += [{"patient_id": str(v), "issuer": ""} for v in values if str(v) and str(v) not in known]
    return others


def _expected_native_pixel_bytes(ds: Dataset) -> int | None:
    rows, cols, bits = _int(ds, "Rows"), _int(ds, "Columns"), _int(ds, "BitsAllocated")
    if not (rows and cols and bits):
        return None
    samples = _int(ds, "SamplesPerPixel") or 1
    frames = _int(ds, "NumberOfFrames") or 1
    return (rows * cols * samples * frames * bits + 7) // 8


def _past_header_tags(tag, vr, length) -> bool:
    # Every tag in _TAGS is in a group up to 0x0028: stop parsing there instead of
    # decoding the rest of a (possibly huge) data set.
    return tag.group > 0x0028


def _pixel_problem(framing, transfer_syntax: UID, ds: Dataset) -> tuple[Status, str] | None:
    """Why the image in this data set cannot be whole, or None. Decided here, at the door, for what
    the framing shows; a damaged compressed stream is found by the pipeline when it decodes."""
    if framing.pixel_length is None:
        if _int(ds, "Rows") and _int(ds, "Columns") and not framing.bulk_data:
            return Status.SOP_CLASS_MISMATCH, "image has Rows and Columns but no Pixel Data (7FE0,0010)"
        return None
    if transfer_syntax.is_encapsulated and framing.pixel_length >= 0:
        return Status.CANNOT_PARSE, (f"Pixel Data is not encapsulated, but transfer syntax "
                                     f"{transfer_syntax.name} requires compressed fragments")
    if not transfer_syntax.is_encapsulated and framing.pixel_length < 0:
        return Status.CANNOT_PARSE, f"Pixel Data is encapsulated, but transfer syntax {transfer_syntax.name} is native"
    if framing.pixel_length < 0 and framing.pixel_fragments == 0:
        return Status.CANNOT_PARSE, "encapsulated Pixel Data has no fragments"
    expected = _expected_native_pixel_bytes(ds)
    if framing.pixel_length >= 0 and expected and framing.pixel_length < expected:
        return Status.CANNOT_PARSE, f"pixel data is truncated: {framing.pixel_length} bytes for {expected} expected"
    return None


def read_header(dataset: bytes, declared_sop_class: str | None, declared_sop_instance: str | None,
                transfer_syntax: UID, limits: Limits = Limits()) -> InstanceHeader:
    """Parse and validate an encoded data set (no file meta); raise IngestFailure with the DICOM
    status to answer."""
    try:
        framing = check_framing(dataset, transfer_syntax, limits)
    except LimitExceeded as error:
        raise IngestFailure(Status.OUT_OF_RESOURCES, f"refused: {error}") from None
    except FramingError as error:
        raise IngestFailure(Status.CANNOT_PARSE, f"data set is truncated or malformed: {error}") from None
    # The walk inflated a deflated data set once; parse that as Explicit VR Little Endian.
    implicit = transfer_syntax.is_implicit_VR and transfer_syntax != DeflatedExplicitVRLittleEndian
    try:
        # Only the header part is handed to pydicom: a copy of it is small, of the whole data set not.
        head = bytes(framing.dataset[:framing.header_end])
        ds = read_dataset(BytesIO(head), implicit, transfer_syntax.is_little_endian,
                          stop_when=_past_header_tags, specific_tags=_TAG_NUMBERS)
        sop_class = _text(ds, "SOPClassUID")
        sop_instance = _text(ds, "SOPInstanceUID")
        study_uid = _text(ds, "StudyInstanceUID")
        series_uid = _text(ds, "SeriesInstanceUID")
    except Exception as error:  # noqa: BLE001 - untrusted bytes: pydicom raises many kinds, all mean "malformed"
        raise IngestFailure(Status.CANNOT_PARSE, f"data set cannot be parsed: {type(error).__name__}: "
                                                 f"{str(error)[:200]}") from None

    missing = [name for name, value in (("Study Instance UID", study_uid), ("Series Instance UID", series_uid),
                                        ("SOP Instance UID", sop_instance)) if not value]
    if missing:
        raise IngestFailure(Status.MISSING_UID, "data set has no " + ", ".join(missing))
    if not sop_class:
        raise IngestFailure(Status.SOP_CLASS_MISMATCH, "data set has no SOP Class UID")
    if declared_sop_class and sop_class != declared_sop_class:
        raise IngestFailure(Status.SOP_CLASS_MISMATCH,
                            f"data set SOP Class {sop_class} does not match the request's {declared_sop_class}")
    if declared_sop_instance and sop_instance != declared_sop_instance:
        raise IngestFailure(Status.INSTANCE_MISMATCH,
                            "data set SOP Instance UID does not match the request's Affected SOP Instance UID")
    for uid in (study_uid, series_uid, sop_instance):
        if len(uid) > 64:
            raise IngestFailure(Status.MISSING_UID, f"UID longer than 64 characters: {uid[:70]}")
    problem = _pixel_problem(framing, transfer_syntax, ds)
    if problem:
        raise IngestFailure(*problem)

    try:
        issuer, qualifiers = _issuer(ds)
        return InstanceHeader(
            patient=PatientKey(patient_id=_text(ds, "PatientID", 64) or "", issuer=issuer),
            issuer_qualifiers=qualifiers,
            other_patient_ids=_other_ids(ds),
            patient_name=_text(ds, "PatientName", 324),
            birth_date=_text(ds, "PatientBirthDate", 8),
            sex=_text(ds, "PatientSex", 16),
            age=_text(ds, "PatientAge", 4),
            study_uid=study_uid,
            study_date=_text(ds, "StudyDate", 8),
            study_time=_text(ds, "StudyTime", 16),
            accession_number=_text(ds, "AccessionNumber", 16),
            study_description=_text(ds, "StudyDescription", 64),
            series_uid=series_uid,
            modality=_text(ds, "Modality", 16),
            body_part=_text(ds, "BodyPartExamined", 64),
            series_number=_int(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription", 64),
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            instance_number=_int(ds, "InstanceNumber"),
        )
    except Exception as error:  # noqa: BLE001 - values are decoded lazily here: any failure is the data's
        raise IngestFailure(Status.CANNOT_PARSE, f"header element cannot be decoded: {type(error).__name__}: "
                                                 f"{str(error)[:200]}") from None
