"""The identity store, as DICOM has it: patient (ID + issuer) > study > series > instance.

Patient ID is unique only together with its issuer (PS3.3 C.7.1.1), so a patient
row is keyed by both; an absent issuer is stored as '' so the unique constraint
works the same on SQLite and PostgreSQL (NULLs never collide in SQL).
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)


class Base(DeclarativeBase):
    pass


class SeriesState(str, enum.Enum):
    """Where a series is in its life; the pipeline's work queue is `stable`."""

    receiving = "receiving"    # instances still arriving
    stable = "stable"          # quiet for stable_after_s: queued for the pipeline
    processing = "processing"  # claimed by a worker
    done = "done"              # embedded (and linked)
    failed = "failed"          # the pipeline gave up; reason recorded


class Patient(Base):
    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patient_id_issuer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    # (0010,0021) Issuer of Patient ID, or else the Universal Entity ID of (0010,0024).
    issuer: Mapped[str] = mapped_column(String(128), default="")
    issuer_qualifiers: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    other_patient_ids: Mapped[list | None] = mapped_column(JSON, nullable=True)
    name: Mapped[str | None] = mapped_column(String(324), nullable=True)
    birth_date: Mapped[str | None] = mapped_column(String(8), nullable=True)
    sex: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8), nullable=True)
    study_time: Mapped[str | None] = mapped_column(String(16), nullable=True)
    accession_number: Mapped[str | None] = mapped_column(String(16), nullable=True)
    description: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Demographics as this study carried them: registration differs between
    # sites and years, and linkage compares them per study.
    patient_name: Mapped[str | None] = mapped_column(String(324), nullable=True)
    patient_birth_date: Mapped[str | None] = mapped_column(String(8), nullable=True, index=True)
    patient_sex: Mapped[str | None] = mapped_column(String(16), nullable=True)
    patient_age: Mapped[str | None] = mapped_column(String(4), nullable=True)
    # Instances of this study that arrived under another Patient ID/issuer.
    conflicting_instances: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    body_part: Mapped[str | None] = mapped_column(String(64), nullable=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    description: Mapped[str | None] = mapped_column(String(64), nullable=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    state: Mapped[SeriesState] = mapped_column(
        Enum(SeriesState, name="series_state", native_enum=False, length=16),
        default=SeriesState.receiving,
        index=True,
    )
    state_changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Work queue bookkeeping (pipeline). A claim is a lease: a worker that dies
    # leaves a stale claim that another worker may take over after it expires.
    claim_token: Mapped[str | None] = mapped_column(String(36), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The router's decision for this series: which identity network (if any) embeds it.
    route: Mapped[str | None] = mapped_column(String(32), nullable=True)
    route_confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    route_source: Mapped[str | None] = mapped_column(String(16), nullable=True)
    route_findings: Mapped[list | None] = mapped_column(JSON, nullable=True)
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Set when the linkage engine has compared this series' embedding with the store;
    # NULL on a done series with an embedding means "still to link" (survives restarts).
    linked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    embedding: Mapped[Embedding | None] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    # Relative to the storage directory, so the store can be moved.
    path: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16), nullable=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    series: Mapped[Series] = relationship(back_populates="instances")


class Embedding(Base):
    """One identity embedding per series; re-processing replaces it."""

    __tablename__ = "embedding"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), unique=True)
    route: Mapped[str] = mapped_column(String(32), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little endian, L2-normalized
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    series: Mapped[Series] = relationship(back_populates="embedding")


class LinkKind(str, enum.Enum):
    same_patient_different_id = "same_patient_different_id"   # one person under two IDs
    different_patient_same_id = "different_patient_same_id"   # a study filed under the wrong patient


class LinkStatus(str, enum.Enum):
    open = "open"
    confirmed = "confirmed"
    rejected = "rejected"


class Link(Base):
    """A flagged probable identity mistake, for an archivist to confirm or reject.

    `key` deduplicates: new evidence about the same two patients (or the same suspect
    study) updates the row instead of adding one. `a`/`b` are studies: for
    same_patient_different_id the best-matching pair across the two Patient IDs, for
    different_patient_same_id `a` is the suspect study and `b` the study of the same
    Patient ID it was compared with most closely.
    """

    __tablename__ = "link"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[LinkKind] = mapped_column(Enum(LinkKind, name="link_kind", native_enum=False, length=32), index=True)
    status: Mapped[LinkStatus] = mapped_column(
        Enum(LinkStatus, name="link_status", native_enum=False, length=16), default=LinkStatus.open, index=True)
    # review | confident while the evidence is above the review threshold; withdrawn when
    # newer evidence took an open link below it (kept, with its history, never deleted).
    band: Mapped[str] = mapped_column(String(16))
    a_study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    b_study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    a_patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    b_patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    probability: Mapped[float] = mapped_column(Float)
    weight: Mapped[float] = mapped_column(Float)       # Fellegi-Sunter total, natural log
    evidence: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    decided_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)

    events: Mapped[list[LinkEvent]] = relationship(back_populates="link", order_by="LinkEvent.id")


class LinkEvent(Base):
    """Audit trail of a link: created, updated by new evidence, confirmed, rejected, reopened."""

    __tablename__ = "link_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    link_pk: Mapped[int] = mapped_column(ForeignKey("link.id"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(16))
    from_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_status: Mapped[str] = mapped_column(String(16))
    probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)

    link: Mapped[Link] = relationship(back_populates="events")


class MatchWeight(Base):
    """m/u probabilities of a comparison outcome re-estimated from reviewed links
    (defaults live in linkage.evidence; a row here overrides one level)."""

    __tablename__ = "match_weight"

    field: Mapped[str] = mapped_column(String(32), primary_key=True)
    level: Mapped[str] = mapped_column(String(32), primary_key=True)
    m: Mapped[float] = mapped_column(Float)
    u: Mapped[float] = mapped_column(Float)
    confirmed: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# ----- web pages: accounts and their audit trail (web/, db.accounts) ---------------------

class UserRole(str, enum.Enum):
    archivist = "archivist"    # reviews links
    clinician = "clinician"    # reads timelines and the dashboard
    admin = "admin"            # everything, plus the audit log and accounts


class WebUser(Base):
    """An account of the web pages; the password is kept only as an argon2 hash."""

    __tablename__ = "web_user"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[UserRole] = mapped_column(Enum(UserRole, name="web_user_role", native_enum=False, length=16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class RevokedSession(Base):
    """A logged-out web session id, refused until its login would have expired anyway. Kept in the
    database, not in memory, so that restarting the node does not bring a logged-out cookie back."""

    __tablename__ = "web_revoked_session"

    sid: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class AuditEvent(Base):
    """Who did or saw what in the web pages (and the account commands). `target` names
    internal ids only ("link:12", "patient:7"), never Patient IDs or names."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    user: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32), index=True)
    target: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[dict | None] = mapped_column(JSON, nullable=True)
