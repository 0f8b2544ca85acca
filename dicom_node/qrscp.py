"""C-FIND SCP: Study Root (STUDY, SERIES, IMAGE levels) and Patient Root (PATIENT, STUDY, SERIES,
IMAGE levels) queries.

What is linkage-aware (`linkage.query`): a query with a single-value Patient ID (optionally its
Issuer) is a query for the *person*: the studies of that ID and of every ID joined to it by
CONFIRMED same_patient_different_id links; each response carries the study's own Patient
ID/issuer, and Other Patient IDs Sequence (0010,1002) / Other Patient IDs (0010,1000), when
requested, list the person's other IDs. Studies a confirmed different_patient_same_id link says
are not this patient's are left out of a person query.

Matching (PS3.4 C.2.2.2) is `linkage.matching`. Sequence keys are return keys only.
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
from collections.abc import Iterator

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT
from sqlalchemy.exc import SQLAlchemyError

from db.links import LinkStore
from dicom_node.config import QuerySettings
from linkage.matching import value_list
from linkage.query import (LEVEL_KEYS, OUT_OF_RESOURCES, PARENT_KEYS, SEARCH, UNABLE_TO_PROCESS, Cancelled,
                           Refused, check_keys, match_values, other_ids_sequence, ticker)

log = logging.getLogger("dicom_node.qrscp")

FIND_MODELS = (STUDY_ROOT, PATIENT_ROOT)
LEVELS = {STUDY_ROOT: ("STUDY", "SERIES", "IMAGE"), PATIENT_ROOT: ("PATIENT", "STUDY", "SERIES", "IMAGE")}
PENDING, SUCCESS, CANCEL = 0xFF00, 0x0000, 0xFE00
CANNOT_DECODE = 0xC310


def query_keys(identifier: Dataset) -> dict[str, object]:
    return {elem.keyword: elem.value for elem in identifier if elem.keyword and elem.tag.element != 0}

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
            ds.OtherPatientIDsSequence = other_ids_sequence(other)
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
    for unique in PARENT_KEYS[level]:      # this level's unique key and its parents' (PS3.4 C.4.1.2.1)
        if unique not in ds:
            setattr(ds, unique, values[unique])
    if not _ascii(ds):
        # Stored text is decoded Unicode; UTF-8 carries any of it.
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


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
        keys = query_keys(identifier)
        calling = event.assoc.requestor.ae_title.strip()
        try:
            check_keys(keys, {k: v for table in LEVEL_KEYS.values() for k, v in table.items()},
                       limits.max_values, limits.max_key_length)
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
            tick = ticker(limits.timeout_s, lambda: event.is_cancelled)
            matched, total = SEARCH[level](store, keys, limits.max_matches, tick)
            found = [match_values(level, match) for match in matched]
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
