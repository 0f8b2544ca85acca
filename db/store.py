"""The identity store's writes and reads used by ingest, the scheduler and `status`.

Everything here takes and returns plain data (`db.records`); sessions are
opened and committed inside each call, so a returning `record_instance` means
the row is committed.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.engine import make_sessionmaker
from db.models import Instance, Patient, Series, SeriesState, Study
from db.records import ExistingInstance, InstanceHeader, Received


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class IdentityStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = make_sessionmaker(engine)

    # ----- ingest -------------------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> ExistingInstance | None:
        with self._sessions() as session:
            row = session.execute(
                select(Instance.sha256, Instance.path).where(Instance.sop_instance_uid == sop_instance_uid)
            ).first()
        return ExistingInstance(sha256=row.sha256, path=row.path) if row else None

    def record_instance(self, received: Received) -> None:
        """Insert (or replace) the instance row and its patient/study/series; commit.

        Concurrent associations may create the same patient, study or series at
        once; the loser of such a race retries against the winner's rows. Rows
        that are updated are read FOR UPDATE (PostgreSQL; SQLite has one writer)
        so counters are never lost.
        """
        for attempt in range(3):
            try:
                with self._sessions.begin() as session:
                    self._record(session, received)
                return
            except IntegrityError:
                if attempt == 2:
                    raise

    def _record(self, session: Session, received: Received) -> None:
        header, stored, now = received.header, received.stored, received.received_at
        patient = self._patient(session, header, now)
        study = session.scalars(select(Study).where(Study.study_uid == header.study_uid).with_for_update()).first()
        if study is None:
            study = Study(
                study_uid=header.study_uid, patient=patient, created_at=now,
                study_date=header.study_date, study_time=header.study_time,
                accession_number=header.accession_number, description=header.study_description,
                patient_name=header.patient_name, patient_birth_date=header.birth_date,
                patient_sex=header.sex, patient_age=header.age, conflicting_instances=0,
            )
            session.add(study)
            session.flush()
        elif study.patient_pk != patient.id:
            # The study stays with the patient it arrived under first; linkage reads this.
            study.conflicting_instances += 1

        series = session.scalars(
            select(Series).where(Series.series_uid == header.series_uid).with_for_update()
        ).first()
        if series is None:
            series = Series(
                series_uid=header.series_uid, study=study, modality=header.modality,
                body_part=header.body_part, series_number=header.series_number,
                description=header.series_description, instance_count=0, total_bytes=0,
                first_received_at=now, last_received_at=now,
                state=SeriesState.receiving, state_changed_at=now,
            )
            session.add(series)
            session.flush()

        instance = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid)
        ).first()
        if instance is None:
            instance = Instance(sop_instance_uid=header.sop_instance_uid, series=series, size=0)
            session.add(instance)
            series.instance_count += 1
        elif instance.series_pk != series.id:
            old = session.get(Series, instance.series_pk, with_for_update=True)
            old.instance_count -= 1
            old.total_bytes -= instance.size
            instance.series = series
            series.instance_count += 1
        series.total_bytes += stored.size - (instance.size or 0)
        instance.sop_class_uid = header.sop_class_uid
        instance.instance_number = header.instance_number
        instance.transfer_syntax_uid = stored.transfer_syntax_uid
        instance.path = stored.path
        instance.size = stored.size
        instance.sha256 = stored.sha256
        instance.calling_ae = received.calling_ae
        instance.received_at = now

        series.last_received_at = max(_aware(series.last_received_at), now)
        if series.state != SeriesState.receiving:
            # A late instance re-opens the series: it will be re-processed once stable.
            series.state = SeriesState.receiving
            series.state_changed_at = now

    def _patient(self, session: Session, header: InstanceHeader, now: datetime) -> Patient:
        key = header.patient
        patient = session.scalars(
            select(Patient).where(Patient.patient_id == key.patient_id, Patient.issuer == key.issuer)
            .with_for_update()
        ).first()
        if patient is None:
            patient = Patient(patient_id=key.patient_id, issuer=key.issuer, created_at=now)
            session.add(patient)
        # Latest registration wins for the patient row; each study keeps its own copy.
        patient.issuer_qualifiers = header.issuer_qualifiers or patient.issuer_qualifiers
        patient.name = header.patient_name or patient.name
        patient.birth_date = header.birth_date or patient.birth_date
        patient.sex = header.sex or patient.sex
        if header.other_patient_ids:
            known = list(patient.other_patient_ids or [])
            patient.other_patient_ids = known + [o for o in header.other_patient_ids if o not in known]
        session.flush()
        return patient

    # ----- series completion ----------------------------------------------------------

    def mark_stable(self, quiet_since: datetime) -> int:
        """Move series that received nothing since `quiet_since` into the work queue."""
        with self._sessions.begin() as session:
            result = session.execute(
                update(Series)
                .where(Series.state == SeriesState.receiving, Series.last_received_at <= quiet_since)
                .values(state=SeriesState.stable, state_changed_at=utcnow())
            )
            return result.rowcount or 0

    # ----- reporting ------------------------------------------------------------------

    def counts(self) -> dict:
        with self._sessions() as session:
            by_state = dict(session.execute(select(Series.state, func.count()).group_by(Series.state)).all())
            return {
                "patients": session.scalar(select(func.count()).select_from(Patient)),
                "studies": session.scalar(select(func.count()).select_from(Study)),
                "series": {state.value: by_state.get(state, 0) for state in SeriesState},
                "instances": session.scalar(select(func.count()).select_from(Instance)),
                # int(): PostgreSQL sums BIGINT to NUMERIC, which arrives as Decimal.
                "bytes": int(session.scalar(select(func.coalesce(func.sum(Instance.size), 0)))),
            }


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything the node writes is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
