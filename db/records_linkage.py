"""Plain data between the linkage engine (`linkage/`) and its store (`db.links`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class StudyFacts:
    """One study as linkage sees it: its Patient ID and the demographics it carried."""

    study_pk: int
    study_uid: str
    patient_pk: int
    patient_id: str
    issuer: str
    study_date: str | None
    name: str | None
    birth_date: str | None
    sex: str | None
    age: str | None
    description: str | None = None
    modalities: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoredEmbedding:
    series_pk: int
    study_pk: int
    patient_pk: int
    route: str
    model_key: tuple[str, str, str]     # (route, model_name, model_version): comparable vectors only
    vector: bytes                       # float32 little endian, L2-normalized


@dataclass(frozen=True)
class LinkDraft:
    """What the engine decided about one candidate; the store creates or updates by `key`."""

    key: str
    kind: str
    a_study_pk: int
    b_study_pk: int
    a_patient_pk: int
    b_patient_pk: int
    probability: float
    weight: float
    band: str                  # review | confident | withdrawn
    evidence: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LinkSide:
    patient_id: str
    issuer: str
    study_uid: str
    series_uids: list[str]
    name: str | None = None
    birth_date: str | None = None
    sex: str | None = None
    study_date: str | None = None
    description: str | None = None
    modalities: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LinkView:
    id: int
    kind: str
    status: str
    band: str
    probability: float
    weight: float
    a: LinkSide
    b: LinkSide
    evidence: dict
    created_at: str
    updated_at: str
    decided_at: str | None = None
    decided_by: str | None = None
    note: str | None = None

    def to_json(self) -> dict:
        """The shape `dicom-node links --format json` and the web API both return."""
        return asdict(self)


@dataclass(frozen=True)
class LinkEventView:
    link_id: int
    at: str
    actor: str
    action: str
    from_status: str | None
    to_status: str
    probability: float | None
    note: str | None


# ----- priors, export and C-FIND (read side; `LinkStore.find_studies` and friends) -----

@dataclass(frozen=True)
class StudyRecord:
    """A study as priors, export and C-FIND show it."""

    study_pk: int
    study_uid: str
    patient_pk: int
    patient_id: str
    issuer: str
    study_date: str | None
    study_time: str | None
    accession_number: str | None
    description: str | None
    patient_name: str | None        # as the study carried it, else the patient row's
    birth_date: str | None
    sex: str | None
    modalities: tuple[str, ...]
    series_count: int
    instance_count: int
    misfiled_link: int | None       # a confirmed different_patient_same_id link says it is not this patient's


@dataclass(frozen=True)
class SeriesRecord:
    """A series as C-FIND, QIDO-RS and retrieval show it."""

    series_pk: int
    series_uid: str
    study_pk: int
    study_uid: str
    modality: str | None
    series_number: int | None
    description: str | None
    body_part: str | None
    instance_count: int


@dataclass(frozen=True)
class InstanceRecord:
    """A stored instance: what C-FIND answers at IMAGE level and what a retrieval sends."""

    instance_pk: int
    sop_instance_uid: str
    sop_class_uid: str
    series_pk: int
    series_uid: str
    study_uid: str
    instance_number: int | None
    transfer_syntax_uid: str
    path: str                       # relative to the storage directory
    size: int


@dataclass(frozen=True)
class PatientRecord:
    patient_pk: int
    patient_id: str
    issuer: str
    name: str | None
    birth_date: str | None
    sex: str | None
    study_count: int
    first_study_date: str | None    # earliest dated study filed under this ID


@dataclass(frozen=True)
class MergeEdge:
    """A confirmed same_patient_different_id link, as the two patients it joins."""

    link_id: int
    a_patient_pk: int
    b_patient_pk: int
    probability: float
    decided_by: str | None
    decided_at: str | None
    note: str | None
