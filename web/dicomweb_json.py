"""The DICOM JSON model (PS3.18 F.2) for DICOMweb: QIDO-RS matches and WADO-RS metadata.

Both go through pydicom's `Dataset.to_json_dict`, so PN comes out as `{"Alphabetic": ...}`, IS
and DS as numbers, empty attributes as `{"vr": ...}` alone. A match of `linkage.query` becomes a
data set of the requested attributes first; a stored file is read up to its pixel data.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pydicom
from pydicom import config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from linkage.query import IMAGE_KEYS, OTHER_ID_KEYS, SERIES_KEYS, STUDY_KEYS, other_ids_sequence

log = logging.getLogger("dicom_node.web")

# Binary attributes up to this size are sent inline (base64): LUTs, small overlays, icons. Larger
# ones (and the pixel data, never read) are left out: this node serves no bulk data URIs.
INLINE_BINARY_MAX = 64 * 1024
BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}

# What a search returns without includefield (PS3.18 Table 10.6.3-3 to -5, as far as the store
# holds them), per level; the levels above are added when the path does not fix their UIDs.
DEFAULT_FIELDS = {
    "STUDY": ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "PatientName", "PatientID",
              "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDescription",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("StudyInstanceUID", "Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
               "BodyPartExamined", "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "InstanceNumber",
              "AvailableTransferSyntaxUID"),
}
LEVEL_TABLES = {"STUDY": (STUDY_KEYS,), "SERIES": (STUDY_KEYS, SERIES_KEYS),
                "IMAGE": (STUDY_KEYS, SERIES_KEYS, IMAGE_KEYS)}
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


def attribute_keyword(name: str) -> str:
    """The keyword for a query parameter given as a keyword or as 8 hex digits; ValueError when
    it names no attribute of the data dictionary."""
    name = name.strip()
    if "." in name:
        raise ValueError(f"{name[:80]}: attributes inside sequences cannot be matched here")
    if _TAG.match(name):
        keyword = keyword_for_tag(int(name, 16))
        if keyword:
            return keyword
    elif tag_for_keyword(name) is not None:
        return name
    raise ValueError(f"{name[:80]} is not a DICOM attribute keyword or tag")


def returnable(level: str) -> set[str]:
    """Every attribute a match at `level` can carry (`includefield=all`)."""
    fields = {keyword for table in LEVEL_TABLES[level] for keyword in table}
    return fields | set(OTHER_ID_KEYS) if level == "STUDY" else fields


def _element(keyword: str, value) -> DataElement:
    tag = tag_for_keyword(keyword)
    vr = dictionary_VR(tag)
    if value in ("", None, []):
        value = None
    elif isinstance(value, (list, tuple)):
        value = [str(v) for v in value]
    else:
        value = str(value)              # counts and numbers are IS: text, as in a data set
    # Stored values were read from data sets already; a legacy value longer than its VR allows is
    # sent as stored, without pydicom warning on every match.
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


def match_json(values: dict[str, object], other: list[tuple[str, str]], fields: set[str]) -> dict:
    """One QIDO-RS match: the requested attributes that `values` (`linkage.query.match_values`)
    holds, each study with its own Patient ID and issuer and, when asked for, the person's other
    IDs."""
    ds = Dataset()
    for keyword in sorted(fields, key=tag_for_keyword):     # in tag order, as a data set is
        if keyword == "OtherPatientIDsSequence":
            ds.OtherPatientIDsSequence = other_ids_sequence(other)
        elif keyword == "OtherPatientIDs":
            ds[tag_for_keyword(keyword)] = _element(keyword, [pid for pid, _ in other])
        elif keyword in values:
            ds[tag_for_keyword(keyword)] = _element(keyword, values[keyword])
    return ds.to_json_dict(suppress_invalid_tags=True)


def metadata_json(path: Path) -> dict | None:
    """The stored instance's attributes up to its pixel data, binary ones over INLINE_BINARY_MAX left
    out; None when the file cannot be read (logged)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        _drop_bulk(ds)
        answer = ds.to_json_dict(suppress_invalid_tags=True)
    except Exception as error:  # noqa: BLE001 - one unreadable file must not end the whole answer
        log.warning("DICOMweb metadata: %s cannot be read: %s", path.name, type(error).__name__)
        return None
    # The file meta is not part of the data set; the syntax it is stored in is (0008,3002).
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax:
        answer["00083002"] = {"vr": "UI", "Value": [str(syntax)]}
    return answer


def _drop_bulk(ds: Dataset) -> None:
    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value:
                _drop_bulk(item)
        elif elem.VR in BINARY_VRS and elem.value is not None and len(elem.value) > INLINE_BINARY_MAX:
            del ds[elem.tag]
