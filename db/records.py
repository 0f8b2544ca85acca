"""Plain data passed into and out of the store; no ORM objects leave `db`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class PatientKey:
    patient_id: str
    issuer: str = ""


@dataclass(frozen=True)
class InstanceHeader:
    """What the node keeps of one instance's header."""

    patient: PatientKey
    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    issuer_qualifiers: dict | None = None
    other_patient_ids: list[dict] = field(default_factory=list)
    patient_name: str | None = None
    birth_date: str | None = None
    sex: str | None = None
    age: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    study_description: str | None = None
    modality: str | None = None
    body_part: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    instance_number: int | None = None


@dataclass(frozen=True)
class StoredFile:
    """Where and what the bytes are, once durably on disk."""

    path: str            # relative to the storage directory
    size: int
    sha256: str          # of the encoded data set as received (file meta excluded)
    transfer_syntax_uid: str


@dataclass(frozen=True)
class ExistingInstance:
    sha256: str
    path: str


@dataclass(frozen=True)
class Received:
    header: InstanceHeader
    stored: StoredFile
    calling_ae: str | None
    received_at: datetime
    absent: bool = False     # the ingest found no row for this SOP Instance UID (a hint, checked by the insert)


@dataclass(frozen=True)
class SeriesWork:
    """A claimed series, as the imaging pipeline needs it."""

    series_pk: int
    series_uid: str
    claim_token: str
    attempts: int
    modality: str | None
    body_part: str | None
    paths: list[str]  # relative to the storage directory, in instance-number order


@dataclass(frozen=True)
class RouteDecision:
    route: str                 # e.g. "chest_xr", or "other"
    confidence: float
    source: str                # "image+header", "header", "image"
    findings: list[str] = field(default_factory=list)
    linkable: bool = True      # False: stored but not linked (other / low confidence)


@dataclass(frozen=True)
class EmbeddingResult:
    route: str
    model_name: str
    model_version: str
    vector: bytes              # float32 little endian, L2-normalized
    dim: int
