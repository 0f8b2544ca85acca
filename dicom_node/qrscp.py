"""C-FIND SCP: Study Root (STUDY level) and Patient Root (PATIENT, STUDY levels) queries.

What is linkage-aware: a STUDY query with a single-value Patient ID (optionally its Issuer)
is a query for the *person*. It returns the studies of that ID and of every ID joined to it
by CONFIRMED same_patient_different_id links (transitively); each response carries the
study's own Patient ID/issuer, and Other Patient IDs Sequence (0010,1002), when requested,
lists the person's other (ID, issuer) pairs. Studies that a confirmed
different_patient_same_id link says are not this patient's are left out of a person query
(they are someone else's images); found by other keys they carry no other IDs. Open links
change nothing. A wildcard Patient ID matches each study's own ID, without expansion.
PATIENT level answers per ID (no expansion), with the person's other IDs likewise.

Matching (PS3.4 C.2.2.2): universal (empty or "*"), single value, wildcard * ? (PatientName
case-insensitively, as PS3.4 allows for PN), UID lists, DA/TM ranges ("A-B", "-B", "A-").
ModalitiesInStudy matches when any series modality matches any requested value. Sequence
keys are return keys only. Responses hold the requested keys (unknown ones empty) plus
Query/Retrieve Level, the level's unique key, and Specific Character Set when a value is
not ASCII. Statuses: Pending 0xFF00 per match, then Success; Cancel 0xFE00 when the peer
cancels; 0xC000 for an unsupported level or model, 0xC310 for an undecodable identifier,
0xA700 when the database does not answer.

The handler runs in the association thread. All database reads happen before the first
response, on read-only connections (plain BEGIN: on SQLite in WAL mode a reader never waits
for, nor blocks, a C-STORE writer).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT
from sqlalchemy.exc import SQLAlchemyError

from db.links import LinkStore
from db.records_linkage import PatientRecord, StudyRecord
from linkage.priors import other_ids, study_order

log = logging.getLogger("dicom_node.qrscp")

FIND_MODELS = (STUDY_ROOT, PATIENT_ROOT)
LEVELS = {STUDY_ROOT: ("STUDY",), PATIENT_ROOT: ("PATIENT", "STUDY")}
PENDING, SUCCESS, CANCEL = 0xFF00, 0x0000, 0xFE00
UNABLE_TO_PROCESS, CANNOT_DECODE, OUT_OF_RESOURCES = 0xC000, 0xC310, 0xA700
OTHER_ID_KEYS = ("OtherPatientIDsSequence", "OtherPatientIDs")

# keyword -> (matching kind, value of a study record). Anything else requested comes back empty.
STUDY_KEYS: dict[str, tuple[str, Callable[[StudyRecord], object]]] = {
    "PatientID": ("text", lambda s: s.patient_id),
    "IssuerOfPatientID": ("text", lambda s: s.issuer),
    "PatientName": ("pn", lambda s: s.patient_name),
    "PatientBirthDate": ("date", lambda s: s.birth_date),
    "PatientSex": ("text", lambda s: s.sex),
    "StudyInstanceUID": ("uid", lambda s: s.study_uid),
    "StudyDate": ("date", lambda s: s.study_date),
    "StudyTime": ("time", lambda s: s.study_time),
    "AccessionNumber": ("text", lambda s: s.accession_number),
    "StudyDescription": ("text", lambda s: s.description),
    "ModalitiesInStudy": ("multi", lambda s: list(s.modalities)),
    "NumberOfStudyRelatedSeries": ("count", lambda s: s.series_count),
    "NumberOfStudyRelatedInstances": ("count", lambda s: s.instance_count),
}
PATIENT_KEYS: dict[str, tuple[str, Callable[[PatientRecord], object]]] = {
    "PatientID": ("text", lambda p: p.patient_id),
    "IssuerOfPatientID": ("text", lambda p: p.issuer),
    "PatientName": ("pn", lambda p: p.name),
    "PatientBirthDate": ("date", lambda p: p.birth_date),
    "PatientSex": ("text", lambda p: p.sex),
    "NumberOfPatientRelatedStudies": ("count", lambda p: p.study_count),
}


# ----- matching ---------------------------------------------------------------------------

def _values(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def is_universal(value) -> bool:
    values = _values(value)
    return not values or all(v.strip() in ("", "*") for v in values)


def has_wildcard(text: str) -> bool:
    return "*" in text or "?" in text


def _wildcard(pattern: str, ignore_case: bool) -> re.Pattern:
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def date_range(value) -> tuple[str | None, str | None] | None:
    """'A-B', '-B', 'A-' or 'A' -> (low, high); None when universal."""
    if is_universal(value):
        return None
    text = _values(value)[0].strip().replace(".", "")
    if "-" in text:
        low, high = (part.strip() or None for part in text.split("-", 1))
        return low, high
    return text, text


def _in_range(value: str | None, bounds, width: int) -> bool:
    if not value:
        return False
    low, high = bounds
    digits = value.replace(":", "").replace(".", "")[:width]
    # Times: a partial bound such as 10 means 10:00:00 up to 10:59:59 at the top end.
    low = low.replace(":", "")[:width].ljust(width, "0") if low else None
    high = high.replace(":", "")[:width].ljust(width, "9") if high else None
    return (low is None or digits.ljust(width, "0") >= low) and (high is None or digits.ljust(width, "0") <= high)


def matches(kind: str, query, value) -> bool:
    """Does a stored value match one query key (PS3.4 C.2.2.2)?"""
    if kind in ("count", "seq") or is_universal(query):
        return True
    if kind == "uid":
        return value in {v.strip() for v in _values(query)}
    if kind in ("date", "time"):
        width = 8 if kind == "date" else 6
        return _in_range(value, date_range(query), width)
    if kind == "multi":
        stored = _values(value)
        return any(_text_match(q, v, False) for q in _values(query) for v in stored)
    return _text_match(_values(query)[0], value, kind == "pn")


def _text_match(pattern: str, value, ignore_case: bool) -> bool:
    if value is None or value == "":
        return False
    pattern, value = pattern.strip(), str(value).strip()
    if ignore_case:
        # "DOE^JOHN^^^" and "DOE^JOHN" are the same name.
        pattern, value = pattern.rstrip("^"), value.rstrip("^")
    if has_wildcard(pattern):
        return _wildcard(pattern, ignore_case).fullmatch(value) is not None
    return pattern.casefold() == value.casefold() if ignore_case else pattern == value


def _query_keys(identifier: Dataset) -> dict[str, object]:
    return {elem.keyword: elem.value for elem in identifier if elem.keyword and elem.tag.element != 0}


def _single_patient_id(keys: dict) -> str | None:
    pid = keys.get("PatientID")
    if is_universal(pid):
        return None
    text = _values(pid)[0].strip()
    return None if has_wildcard(text) else text


# ----- the queries ----------------------------------------------------------------------------

def find_studies(store: LinkStore, keys: dict) -> list[tuple[StudyRecord, list[tuple[str, str]]]]:
    """Matching studies, oldest first, each with the person's other (ID, issuer) pairs."""
    narrow = {}
    if not is_universal(keys.get("StudyInstanceUID")):
        narrow["study_uids"] = [v.strip() for v in _values(keys["StudyInstanceUID"])]
    bounds = date_range(keys.get("StudyDate"))
    if bounds:
        narrow["date_from"], narrow["date_to"] = bounds
    accession = keys.get("AccessionNumber")
    if not is_universal(accession) and not has_wildcard(_values(accession)[0]):
        narrow["accession"] = _values(accession)[0].strip()

    skip = set()
    pid = _single_patient_id(keys)
    if pid is not None:
        issuer = keys.get("IssuerOfPatientID")
        seeds = [p.patient_pk for p in store.patient_records(patient_id=pid).values()
                 if matches("text", issuer, p.issuer)]
        if not seeds:
            return []
        person = store.linked_patients(seeds)
        studies = [s for s in store.find_studies(patient_pks=person, **narrow) if s.misfiled_link is None]
        skip = {"PatientID", "IssuerOfPatientID"}   # matched by the person, not per study
    else:
        studies = store.find_studies(**narrow)

    found = [s for s in studies
             if all(matches(STUDY_KEYS[k][0], q, STUDY_KEYS[k][1](s)) for k, q in keys.items()
                    if k in STUDY_KEYS and k not in skip)]
    found.sort(key=study_order)
    others = {}
    if any(k in keys for k in OTHER_ID_KEYS):
        others = other_ids(store, {s.patient_pk for s in found if s.misfiled_link is None})
    return [(s, [] if s.misfiled_link is not None else others.get(s.patient_pk, [])) for s in found]


def find_patients(store: LinkStore, keys: dict) -> list[tuple[PatientRecord, list[tuple[str, str]]]]:
    pid = _single_patient_id(keys)
    records = store.patient_records(patient_id=pid).values()
    found = [p for p in records if all(matches(PATIENT_KEYS[k][0], q, PATIENT_KEYS[k][1](p))
                                       for k, q in keys.items() if k in PATIENT_KEYS)]
    found.sort(key=lambda p: (p.patient_id, p.issuer))
    others = other_ids(store, {p.patient_pk for p in found}) if any(k in keys for k in OTHER_ID_KEYS) else {}
    return [(p, others.get(p.patient_pk, [])) for p in found]


# ----- responses ------------------------------------------------------------------------------

def response(identifier: Dataset, level: str, values: dict[str, object], other: list[tuple[str, str]]) -> Dataset:
    """The requested keys with this match's values; unknown keys come back empty."""
    ds = Dataset()
    for elem in identifier:
        keyword = elem.keyword
        if elem.tag.element == 0 or keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        vr = dictionary_VR(elem.tag) if keyword else elem.VR
        if " or " in vr:    # e.g. "US or SS": keep what the request carried
            vr = elem.VR
        if keyword == "OtherPatientIDsSequence":
            ds.OtherPatientIDsSequence = Sequence([_other_item(pid, issuer) for pid, issuer in other])
        elif keyword == "OtherPatientIDs":
            ds.add_new(elem.tag, vr, [pid for pid, _ in other] or None)
        elif vr == "SQ":
            ds.add_new(elem.tag, vr, Sequence())
        else:
            value = values.get(keyword)
            if isinstance(value, int):
                value = str(value)              # counts are IS
            ds.add_new(elem.tag, vr, value if value not in ("", None, []) else None)
    ds.QueryRetrieveLevel = level
    unique = "StudyInstanceUID" if level == "STUDY" else "PatientID"
    if unique not in ds:
        setattr(ds, unique, values[unique])
    if not _ascii(ds):
        # Stored text is decoded Unicode; UTF-8 carries any of it.
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _other_item(patient_id: str, issuer: str) -> Dataset:
    item = Dataset()
    item.PatientID = patient_id
    if issuer:
        item.IssuerOfPatientID = issuer
    item.TypeOfPatientID = "TEXT"
    return item


def _ascii(ds: Dataset) -> bool:
    for elem in ds.iterall():
        if elem.VR in ("PN", "LO", "SH", "LT", "ST", "UT", "UC") and elem.value is not None:
            if any(not str(v).isascii() for v in _values(elem.value)):
                return False
    return True


def _failure(status: int, comment: str) -> tuple[Dataset, None]:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds, None


def make_find_handler(store: LinkStore):
    def handle_find(event) -> Iterator[tuple]:
        model = event.request.AffectedSOPClassUID
        try:
            identifier = event.identifier
        except Exception as error:  # pydicom raises several kinds on a broken identifier
            yield _failure(CANNOT_DECODE, f"identifier cannot be decoded: {error}")
            return
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        if model not in LEVELS:
            yield _failure(UNABLE_TO_PROCESS, f"query model {model} is not supported")
            return
        if level not in LEVELS[model]:
            yield _failure(UNABLE_TO_PROCESS, f"query level '{level}' is not supported here")
            return
        keys = _query_keys(identifier)
        try:
            if level == "STUDY":
                found = [({k: get(s) for k, (_, get) in STUDY_KEYS.items()}, other)
                         for s, other in find_studies(store, keys)]
            else:
                found = [({k: get(p) for k, (_, get) in PATIENT_KEYS.items()}, other)
                         for p, other in find_patients(store, keys)]
        except SQLAlchemyError as error:
            log.error("C-FIND: database unavailable: %s", type(error).__name__)
            yield _failure(OUT_OF_RESOURCES, "database unavailable")
            return
        log.info("C-FIND %s level from %s: %d matches", level, event.assoc.requestor.ae_title.strip(), len(found))
        for values, other in found:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, response(identifier, level, values, other)

    return handle_find


FIND_CONTEXTS = [(model, DEFAULT_TRANSFER_SYNTAXES) for model in FIND_MODELS]
