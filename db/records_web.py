"""Plain data between the web pages (`web/`) and their account store (`db.accounts`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class UserRecord:
    id: int
    name: str
    role: str                   # archivist | clinician | admin
    created_at: str
    disabled: bool
    password_hash: str = field(default="", repr=False)


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: str
    user: str
    action: str
    target: str | None
    detail: dict | None


@dataclass(frozen=True)
class SeriesBrief:
    """A series as the web pages show it next to its study (thumbnail by `series_pk`)."""

    series_pk: int
    study_pk: int
    modality: str | None
    body_part: str | None
    description: str | None
    instance_count: int
    state: str
    route: str | None
