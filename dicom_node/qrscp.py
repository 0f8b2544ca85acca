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

Matching (PS3.4 C.2.2.2) is `dicom_node.matching`. Sequence keys are return keys only.
Responses hold the requested keys (unknown ones empty) plus Query/Retrieve Level, the level's
unique key, and Specific Character Set when a value is not ASCII. Statuses: Pending 0xFF00 per
match, then Success; Cancel 0xFE00 when the peer cancels; 0xC000 for an unsupported level or
model or a key beyond [query] max_key_length/max_values, 0xC310 for an undecodable identifier;
0xA700 when the database does not answer, when the query runs past [query] timeout_s or finds
no free turn (max_concurrent) within it, and after the first max_matches matches of a broader
query (with a warning in the log: Success would say that every match was sent, PS3.4 C.4.1.3).

The handler runs in the association thread. All database reads happen before the first
response, on read-only connections (plain BEGIN: on SQLite in WAL mode a reader never waits
for, nor blocks, a C-STORE writer). Matching is plain Python (no C call that keeps the
interpreter lock for long), so other associations go on while a query is matched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT
from sqlalchemy.exc import SQLAlchemyError

from db.links import LinkStore
from db.records_linkage import PatientRecord, StudyRecord
from dicom_node.config import QuerySettings
from dicom_node.matching import Matcher, date_range, has_wildcard, is_universal, key_matcher, matches, value_list
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


# ----- limits -------------------------------------------------------------------------------

class Refused(Exception):
    """The query ends with this failure status and ErrorComment instead of (further) matches."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status, self.comment = status, comment


class Cancelled(Exception):
    """The peer sent C-CANCEL while the query was being matched."""


def check_keys(keys: dict, table: dict, limits: QuerySettings) -> None:
    """Refuse matched keys with more values or longer values than the limits allow."""
    for keyword, query in keys.items():
        if keyword not in table or table[keyword][0] == "count":
            continue
        values = value_list(query)
        if len(values) > limits.max_values:
            raise Refused(UNABLE_TO_PROCESS, f"{keyword}: {len(values)} values, more than {limits.max_values} allowed")
        longest = max((len(v) for v in values), default=0)
        if longest > limits.max_key_length:
            raise Refused(UNABLE_TO_PROCESS,
                          f"{keyword}: {longest} characters, more than {limits.max_key_length} allowed")


def _ticker(limits: QuerySettings, is_cancelled: Callable[[], bool]) -> Callable[[], None]:
    """Called between steps of a query: raises once it is past timeout_s or cancelled."""
    deadline = time.monotonic() + limits.timeout_s

    def tick() -> None:
        if time.monotonic() > deadline:
            raise Refused(OUT_OF_RESOURCES, f"query ran past {limits.timeout_s:g} s: narrow the query")
        if is_cancelled():
            raise Cancelled

    return tick


def _select(records, tests: list[tuple[Callable, Matcher]], tick: Callable[[], None]) -> list:
    found = []
    for n, record in enumerate(records):
        if n % 256 == 0:
            tick()
        if all(test(get(record)) for get, test in tests):
            found.append(record)
    tick()
    return found


def _tests(keys: dict, table: dict, skip=frozenset()) -> list[tuple[Callable, Matcher]]:
    """(value getter, compiled matcher) per key that narrows the answer."""
    tests = []
    for keyword, query in keys.items():
        if keyword in table and keyword not in skip:
            kind, get = table[keyword]
            match = key_matcher(kind, query)
            if match is not None:
                tests.append((get, match))
    return tests


def _query_keys(identifier: Dataset) -> dict[str, object]:
    return {elem.keyword: elem.value for elem in identifier if elem.keyword and elem.tag.element != 0}


def _single_patient_id(keys: dict) -> str | None:
    pid = keys.get("PatientID")
    if is_universal(pid):
        return None
    text = value_list(pid)[0].strip()
    return None if has_wildcard(text) else text


# ----- the queries ----------------------------------------------------------------------------

def find_studies(store: LinkStore, keys: dict, limit: int | None = None, tick: Callable[[], None] = lambda: None
                 ) -> tuple[list[tuple[StudyRecord, list[tuple[str, str]]]], int]:
    """The first `limit` matching studies, oldest first, each with the person's other (ID, issuer)
    pairs; and how many matched in all."""
    narrow = {}
    if not is_universal(keys.get("StudyInstanceUID")):
        narrow["study_uids"] = [v.strip() for v in value_list(keys["StudyInstanceUID"])]
    bounds = date_range(keys.get("StudyDate"))
    if bounds:
        narrow["date_from"], narrow["date_to"] = bounds
    accession = keys.get("AccessionNumber")
    if not is_universal(accession) and not has_wildcard(value_list(accession)[0]):
        narrow["accession"] = value_list(accession)[0].strip()

    skip = set()
    pid = _single_patient_id(keys)
    if pid is not None:
        issuer = keys.get("IssuerOfPatientID")
        seeds = [p.patient_pk for p in store.patient_records(patient_id=pid).values()
                 if matches("text", issuer, p.issuer)]
        if not seeds:
            return [], 0
        person = store.linked_patients(seeds)
        studies = [s for s in store.find_studies(patient_pks=person, **narrow) if s.misfiled_link is None]
        skip = {"PatientID", "IssuerOfPatientID"}   # matched by the person, not per study
    else:
        studies = store.find_studies(**narrow)

    found = _select(studies, _tests(keys, STUDY_KEYS, skip), tick)
    found.sort(key=study_order)
    sent = found[:limit]
    others = {}
    if any(k in keys for k in OTHER_ID_KEYS):
        others = other_ids(store, {s.patient_pk for s in sent if s.misfiled_link is None})
    return [(s, [] if s.misfiled_link is not None else others.get(s.patient_pk, [])) for s in sent], len(found)


def find_patients(store: LinkStore, keys: dict, limit: int | None = None, tick: Callable[[], None] = lambda: None
                  ) -> tuple[list[tuple[PatientRecord, list[tuple[str, str]]]], int]:
    pid = _single_patient_id(keys)
    records = store.patient_records(patient_id=pid).values()
    found = _select(records, _tests(keys, PATIENT_KEYS), tick)
    found.sort(key=lambda p: (p.patient_id, p.issuer))
    sent = found[:limit]
    others = other_ids(store, {p.patient_pk for p in sent}) if any(k in keys for k in OTHER_ID_KEYS) else {}
    return [(p, others.get(p.patient_pk, [])) for p in sent], len(found)


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
            if any(not str(v).isascii() for v in value_list(elem.value)):
                return False
    return True


def _failure(status: int, comment: str) -> tuple[Dataset, None]:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds, None


def make_find_handler(store: LinkStore, limits: QuerySettings | None = None):
    limits = limits or QuerySettings()
    turns = threading.BoundedSemaphore(limits.max_concurrent)

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
        table = STUDY_KEYS if level == "STUDY" else PATIENT_KEYS
        calling = event.assoc.requestor.ae_title.strip()
        try:
            check_keys(keys, table, limits)
        except Refused as refused:
            log.warning("C-FIND %s level from %s refused: %s", level, calling, refused.comment)
            yield _failure(refused.status, refused.comment)
            return
        # Matching is CPU work: a few queries at a time keep the rest of the node responsive.
        if not turns.acquire(timeout=limits.timeout_s):
            log.warning("C-FIND %s level from %s refused: all %d query slots busy (query.max_concurrent)",
                        level, calling, limits.max_concurrent)
            yield _failure(OUT_OF_RESOURCES, f"all {limits.max_concurrent} query slots busy: try again later")
            return
        try:
            tick = _ticker(limits, lambda: event.is_cancelled)
            search = find_studies if level == "STUDY" else find_patients
            matched, total = search(store, keys, limits.max_matches, tick)
            found = [({k: get(r) for k, (_, get) in table.items()}, other) for r, other in matched]
            outcome = None
        except Refused as refused:
            log.warning("C-FIND %s level from %s: %s", level, calling, refused.comment)
            outcome = _failure(refused.status, refused.comment)
        except Cancelled:
            outcome = (CANCEL, None)
        except SQLAlchemyError as error:
            log.error("C-FIND: database unavailable: %s", type(error).__name__)
            outcome = _failure(OUT_OF_RESOURCES, "database unavailable")
        finally:
            turns.release()     # before sending: a slow peer does not hold a turn
        if outcome is not None:
            yield outcome
            return
        if total > len(found):
            log.warning("C-FIND %s level from %s: %d matches, only the first %d sent (query.max_matches)",
                        level, calling, total, len(found))
        else:
            log.info("C-FIND %s level from %s: %d matches", level, calling, total)
        for values, other in found:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, response(identifier, level, values, other)
        if total > len(found):
            sent = len(found)
            yield _failure(OUT_OF_RESOURCES, f"more than {sent} matches, first {sent} sent: narrow the query")

    return handle_find


FIND_CONTEXTS = [(model, DEFAULT_TRANSFER_SYNTAXES) for model in FIND_MODELS]
