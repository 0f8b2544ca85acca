"""The archive as a person-aware query: what C-FIND, C-MOVE/C-GET and DICOMweb (QIDO-RS, WADO-RS)
answer, as plain records. The network edge (`dicom_node.qrscp`, `dicom_node.retrieve`,
`web.dicomweb`) only translates requests and responses.

A query with a single-value Patient ID (optionally its issuer) is a query for the *person*: the
studies of that ID and of every ID joined to it by CONFIRMED same_patient_different_id links
(transitively), each with its own Patient ID and issuer and the person's other (ID, issuer) pairs.
Studies that a confirmed different_patient_same_id link says are not this patient's are left out
of a person query (someone else's images); found by other keys they carry no other IDs. Open links
change nothing. A wildcard Patient ID matches each study's own ID, without expansion. PATIENT
level answers per ID (no expansion), with the person's other IDs likewise.

SERIES and IMAGE level queries (and QIDO-RS /series, /instances) take the study-level keys as a
filter on the parent studies (person expansion included), then match the series and instance keys.
Matching (PS3.4 C.2.2.2) is `linkage.matching`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from db.links import LinkStore
from db.records_linkage import InstanceRecord, PatientRecord, SeriesRecord, StudyRecord
from linkage.matching import Matcher, date_range, has_wildcard, is_universal, key_matcher, matches, value_list
from linkage.priors import other_ids, study_order

UNABLE_TO_PROCESS, OUT_OF_RESOURCES = 0xC000, 0xA700
OTHER_ID_KEYS = ("OtherPatientIDsSequence", "OtherPatientIDs")

# keyword -> (matching kind, value of a record). Anything else requested comes back empty.
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
SERIES_KEYS: dict[str, tuple[str, Callable[[SeriesRecord], object]]] = {
    "StudyInstanceUID": ("uid", lambda s: s.study_uid),
    "SeriesInstanceUID": ("uid", lambda s: s.series_uid),
    "Modality": ("text", lambda s: s.modality),
    "SeriesNumber": ("text", lambda s: None if s.series_number is None else str(s.series_number)),
    "SeriesDescription": ("text", lambda s: s.description),
    "BodyPartExamined": ("text", lambda s: s.body_part),
    "NumberOfSeriesRelatedInstances": ("count", lambda s: s.instance_count),
}
IMAGE_KEYS: dict[str, tuple[str, Callable[[InstanceRecord], object]]] = {
    "StudyInstanceUID": ("uid", lambda i: i.study_uid),
    "SeriesInstanceUID": ("uid", lambda i: i.series_uid),
    "SOPInstanceUID": ("uid", lambda i: i.sop_instance_uid),
    "SOPClassUID": ("uid", lambda i: i.sop_class_uid),
    "InstanceNumber": ("text", lambda i: None if i.instance_number is None else str(i.instance_number)),
    "AvailableTransferSyntaxUID": ("uid", lambda i: i.transfer_syntax_uid),
}
LEVEL_KEYS = {"PATIENT": PATIENT_KEYS, "STUDY": STUDY_KEYS, "SERIES": SERIES_KEYS, "IMAGE": IMAGE_KEYS}
UNIQUE_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}


class Refused(Exception):
    """The query ends with this failure status and ErrorComment instead of (further) matches."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status, self.comment = status, comment


class Cancelled(Exception):
    """The peer cancelled while the query was being matched."""


def check_keys(keys: dict, table: dict, max_values: int, max_key_length: int) -> None:
    """Refuse matched keys with more values or longer values than the limits allow."""
    for keyword, query in keys.items():
        if keyword not in table or table[keyword][0] == "count":
            continue
        values = value_list(query)
        if len(values) > max_values:
            raise Refused(UNABLE_TO_PROCESS, f"{keyword}: {len(values)} values, more than {max_values} allowed")
        longest = max((len(v) for v in values), default=0)
        if longest > max_key_length:
            raise Refused(UNABLE_TO_PROCESS, f"{keyword}: {longest} characters, more than {max_key_length} allowed")


def ticker(timeout_s: float, is_cancelled: Callable[[], bool]) -> Callable[[], None]:
    """Called between steps of a query: raises once it is past timeout_s or cancelled."""
    deadline = time.monotonic() + timeout_s

    def tick() -> None:
        if time.monotonic() > deadline:
            raise Refused(OUT_OF_RESOURCES, f"query ran past {timeout_s:g} s: narrow the query")
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


def _single_patient_id(keys: dict) -> str | None:
    pid = keys.get("PatientID")
    if is_universal(pid):
        return None
    text = value_list(pid)[0].strip()
    return None if has_wildcard(text) else text


def _uids(keys: dict, keyword: str) -> list[str] | None:
    value = keys.get(keyword)
    return None if is_universal(value) else [v.strip() for v in value_list(value)]


# ----- the levels -----------------------------------------------------------------------------

def _matching_studies(store: LinkStore, keys: dict, tick: Callable[[], None]) -> list[StudyRecord]:
    """Studies the study-level keys select, the person's studies for a single Patient ID."""
    narrow = {}
    if (uids := _uids(keys, "StudyInstanceUID")) is not None:
        narrow["study_uids"] = uids
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
            return []
        person = store.linked_patients(seeds)
        studies = [s for s in store.find_studies(patient_pks=person, **narrow) if s.misfiled_link is None]
        skip = {"PatientID", "IssuerOfPatientID"}   # matched by the person, not per study
    else:
        studies = store.find_studies(**narrow)
    found = _select(studies, _tests(keys, STUDY_KEYS, skip), tick)
    found.sort(key=study_order)
    return found


def find_studies(store: LinkStore, keys: dict, limit: int | None = None, tick: Callable[[], None] = lambda: None
                 ) -> tuple[list[tuple[StudyRecord, list[tuple[str, str]]]], int]:
    """The first `limit` matching studies, oldest first, each with the person's other (ID, issuer)
    pairs; and how many matched in all."""
    found = _matching_studies(store, keys, tick)
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


def _series_order(study_rank: dict[int, int]):
    """Series by their study's rank, then series number (unnumbered last), then arrival."""
    return lambda s: (study_rank[s.study_pk], s.series_number is None, s.series_number or 0, s.series_pk)


def _with_parents(store: LinkStore, keys: dict) -> dict:
    """Keys with the parent UIDs filled in from listed child UIDs, so that a series or instance
    found by its own UID does not make the study level scan every study."""
    keys = dict(keys)
    if _uids(keys, "SeriesInstanceUID") is None and (sops := _uids(keys, "SOPInstanceUID")) is not None:
        keys["SeriesInstanceUID"] = sorted({i.series_uid for i in store.find_instances(sop_uids=sops)}) or ["-"]
    if _uids(keys, "StudyInstanceUID") is None and (series := _uids(keys, "SeriesInstanceUID")) is not None:
        keys["StudyInstanceUID"] = sorted({s.study_uid for s in store.find_series(series_uids=series)}) or ["-"]
    return keys


def _matching_series(store: LinkStore, keys: dict, tick: Callable[[], None]
                     ) -> tuple[list[SeriesRecord], dict[int, StudyRecord]]:
    keys = _with_parents(store, keys)
    studies = {s.study_pk: s for s in _matching_studies(store, keys, tick)}
    if not studies:
        return [], {}
    records = store.find_series(study_pks=studies, series_uids=_uids(keys, "SeriesInstanceUID"))
    order = {pk: n for n, pk in enumerate(studies)}
    found = _select(records, _tests(keys, SERIES_KEYS, {"StudyInstanceUID"}), tick)
    found.sort(key=_series_order(order))
    return found, studies


def find_series(store: LinkStore, keys: dict, limit: int | None = None, tick: Callable[[], None] = lambda: None
                ) -> tuple[list[tuple[SeriesRecord, StudyRecord]], int]:
    """The first `limit` matching series (study by study, oldest first) with their study; how many in all."""
    found, studies = _matching_series(store, keys, tick)
    return [(s, studies[s.study_pk]) for s in found[:limit]], len(found)


def find_instances(store: LinkStore, keys: dict, limit: int | None = None, tick: Callable[[], None] = lambda: None
                   ) -> tuple[list[tuple[InstanceRecord, SeriesRecord, StudyRecord]], int]:
    """The first `limit` matching instances with their series and study; how many in all."""
    series, studies = _matching_series(store, keys, tick)
    if not series:
        return [], 0
    by_pk = {s.series_pk: s for s in series}
    records = store.find_instances(series_pks=list(by_pk), sop_uids=_uids(keys, "SOPInstanceUID"))
    found = _select(records, _tests(keys, IMAGE_KEYS, {"StudyInstanceUID", "SeriesInstanceUID"}), tick)
    sent = found[:limit]
    return [(i, by_pk[i.series_pk], studies[by_pk[i.series_pk].study_pk]) for i in sent], len(found)


def match_values(level: str, match: tuple) -> tuple[dict[str, object], list[tuple[str, str]]]:
    """One match of `SEARCH[level]` as keyword -> value over its level's and its parents' keys,
    and the person's other (ID, issuer) pairs (PATIENT and STUDY level)."""
    def values(table, record) -> dict:
        return {keyword: get(record) for keyword, (_, get) in table.items()}

    if level in ("PATIENT", "STUDY"):
        record, other = match
        return values(LEVEL_KEYS[level], record), other
    if level == "SERIES":
        series, study = match
        return {**values(STUDY_KEYS, study), **values(SERIES_KEYS, series)}, []
    instance, series, study = match
    return {**values(STUDY_KEYS, study), **values(SERIES_KEYS, series), **values(IMAGE_KEYS, instance)}, []


def other_ids_sequence(other: list[tuple[str, str]]) -> Sequence:
    """Other Patient IDs Sequence (0010,1002) items for the person's other (ID, issuer) pairs."""
    items = []
    for patient_id, issuer in other:
        item = Dataset()
        item.PatientID = patient_id
        if issuer:
            item.IssuerOfPatientID = issuer
        item.TypeOfPatientID = "TEXT"
        items.append(item)
    return Sequence(items)


SEARCH = {"PATIENT": find_patients, "STUDY": find_studies, "SERIES": find_series, "IMAGE": find_instances}
PARENT_KEYS = {"PATIENT": ("PatientID",), "STUDY": ("StudyInstanceUID",),
               "SERIES": ("StudyInstanceUID", "SeriesInstanceUID"),
               "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}


# ----- retrieval ------------------------------------------------------------------------------

def retrieve_selection(store: LinkStore, level: str, keys: dict, tick: Callable[[], None] = lambda: None
                       ) -> list[InstanceRecord]:
    """The stored instances a C-MOVE/C-GET (or WADO-RS) identifier selects, in study, series and
    instance order. PATIENT level: the person's studies (confirmed links; misfiled studies left
    out). STUDY, SERIES, IMAGE: the listed unique keys; a Patient ID given beside them (Patient
    Root) must be the person's, so a linked prior is retrieved under its own or a linked ID."""
    if level not in UNIQUE_KEY:
        raise Refused(UNABLE_TO_PROCESS, f"query level '{level}' is not supported here")
    unique = UNIQUE_KEY[level]
    if level == "PATIENT":
        if _single_patient_id(keys) is None:
            raise Refused(UNABLE_TO_PROCESS, "PATIENT level retrieval needs one Patient ID without wildcards")
    elif _uids(keys, unique) is None or any(has_wildcard(u) for u in _uids(keys, unique)):
        raise Refused(UNABLE_TO_PROCESS, f"{level} level retrieval needs {unique} (one value or a list, no wildcards)")
    narrowed = {k: keys[k] for k in ("PatientID", "IssuerOfPatientID", "StudyInstanceUID", "SeriesInstanceUID",
                                     "SOPInstanceUID") if k in keys}
    if level in ("PATIENT", "STUDY"):
        studies = _matching_studies(store, narrowed, tick)
        series = store.find_series(study_pks=[s.study_pk for s in studies])
        order = {s.study_pk: n for n, s in enumerate(studies)}
        series.sort(key=_series_order(order))
    else:
        series, _ = _matching_series(store, narrowed, tick)
    rank = {s.series_pk: n for n, s in enumerate(series)}
    instances = store.find_instances(series_pks=list(rank), sop_uids=_uids(narrowed, "SOPInstanceUID"))
    tick()
    instances.sort(key=lambda i: (rank[i.series_pk], i.instance_number is None, i.instance_number or 0,
                                  i.instance_pk))
    return instances
