"""The identity store's writes and reads used by ingest, the scheduler and `status`.

Everything here takes and returns plain data (`db.records`); sessions are
opened and committed inside each call, so a returning `record_instance` means
the row is committed.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Connection, Engine, bindparam, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from db.engine import make_sessionmaker
from db.group_commit import GroupCommit
from db.models import Embedding, Instance, Patient, Series, SeriesState, Study
from db.records import ExistingInstance, InstanceHeader, Received


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class IdentityStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read_engine = engine.execution_options(read_only=True)
        self._sessions = make_sessionmaker(engine)
        self._group = GroupCommit(self._record_batch)

    # ----- ingest -------------------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> ExistingInstance | None:
        # Core on a read-only connection: no ORM session and, on SQLite, no write lock.
        with self._read_engine.connect() as connection:
            row = connection.execute(_FIND_INSTANCE, {"uid": sop_instance_uid}).first()
        return ExistingInstance(sha256=row.sha256, path=row.path) if row else None

    def record_instance(self, received: Received) -> None:
        """Insert (or replace) the instance row and its patient/study/series; return once committed.

        Rows from concurrent associations are committed together (`GroupCommit`): one
        transaction and one WAL sync for all the rows waiting, each caller released only
        when the transaction holding its own row has committed.
        """
        self._group.submit(received)

    def _record_alone(self, received: Received) -> None:
        """One row in its own transaction. Concurrent associations (or receiver processes) may
        create the same patient, study, series or instance at once; the loser of such a race
        retries against the winner's rows. Rows that are updated are read FOR UPDATE
        (PostgreSQL; SQLite has one writer) so counters are never lost."""
        for attempt in range(3):
            try:
                with self.engine.begin() as connection:
                    _record(connection, received, trust_absent=attempt == 0)
                return
            except IntegrityError:
                if attempt == 2:
                    raise

    def _record_batch(self, batch: list[Received]) -> list[BaseException | None]:
        """Commit rows together; if the shared transaction fails, each row gets its own (so one
        bad row fails alone). Returns each row's error or None."""
        if len(batch) > 1:
            try:
                with self.engine.begin() as connection:
                    # One lock order for every batch (patient, then series: the order `_record`
                    # locks in), so that two receiver processes' batches cannot deadlock.
                    for received in sorted(batch, key=_lock_order):
                        _record(connection, received, trust_absent=True)
                return [None] * len(batch)
            except (SQLAlchemyError, DBAPIError):
                pass        # rolled back as a whole: nothing of it is committed
        errors: list[BaseException | None] = []
        for received in batch:
            try:
                self._record_alone(received)
                errors.append(None)
            except Exception as error:  # noqa: BLE001 - handed to that row's caller, raised there
                errors.append(error)
        return errors

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

    # ----- web pages (dashboard, thumbnails) ------------------------------------------

    def embedding_counts(self) -> dict[tuple[str, str, str], int]:
        """Stored embeddings per (route, model name, model version)."""
        with self._sessions() as session:
            rows = session.execute(select(Embedding.route, Embedding.model_name, Embedding.model_version,
                                          func.count()).group_by(Embedding.route, Embedding.model_name,
                                                                 Embedding.model_version)).all()
        return {(r[0], r[1], r[2]): r[3] for r in rows}

    def instances_per_hour(self, since: datetime) -> dict[str, int]:
        """Instances received since `since`, per UTC hour ("YYYY-MM-DDTHH" -> count)."""
        if self.engine.dialect.name == "sqlite":
            # SQLite keeps naive UTC text ("YYYY-MM-DD HH:MM:SS.ffffff"); compare and cut as text.
            hour = func.strftime("%Y-%m-%dT%H", Instance.received_at)
            since = since.astimezone(timezone.utc).replace(tzinfo=None)
        else:
            hour = func.to_char(func.date_trunc("hour", func.timezone("UTC", Instance.received_at)),
                                'YYYY-MM-DD"T"HH24')
        with self._read_engine.connect() as connection:
            rows = connection.execute(select(hour, func.count()).where(Instance.received_at >= since)
                                      .group_by(hour)).all()
        return {str(h): int(n) for h, n in rows if h}

    def study_series(self, study_pks) -> dict[int, list]:
        """Study pk -> its series (plain `SeriesBrief`), by series number."""
        from db.records_web import SeriesBrief

        pks = list(study_pks)
        out: dict[int, list] = {pk: [] for pk in pks}
        if not pks:
            return out
        with self._read_engine.connect() as connection:
            rows = connection.execute(
                select(Series.id, Series.study_pk, Series.modality, Series.body_part, Series.description,
                       Series.instance_count, Series.state, Series.route)
                .where(Series.study_pk.in_(pks)).order_by(Series.series_number, Series.id)).all()
        for r in rows:
            state = r.state.value if isinstance(r.state, SeriesState) else str(r.state)
            out[r.study_pk].append(SeriesBrief(r.id, r.study_pk, r.modality, r.body_part, r.description,
                                               int(r.instance_count or 0), state, r.route))
        return out

    def series_files(self, series_pk: int) -> tuple[int, list[str]] | None:
        """(instance count, stored paths relative to the storage dir ordered by instance
        number) of one series, or None when there is no such series."""
        with self._read_engine.connect() as connection:
            count = connection.execute(select(Series.instance_count).where(Series.id == series_pk)).scalar()
            if count is None:
                return None
            paths = connection.execute(select(Instance.path).where(Instance.series_pk == series_pk)
                                       .order_by(Instance.instance_number, Instance.id)).scalars().all()
        return int(count), list(paths)

    def find_patient_pks(self, patient_id: str | None = None, issuer: str | None = None,
                         name: str | None = None, limit: int = 50) -> list[int]:
        """Patients by exact Patient ID (and issuer when given), or whose name contains `name`
        (case-insensitive, on the patient row or any of its studies); by pk."""
        patient_id, name = (patient_id or "").strip(), (name or "").strip()
        if not patient_id and not name:
            return []
        query = select(Patient.id)
        if patient_id:
            query = query.where(Patient.patient_id == patient_id)
            if issuer and issuer.strip():
                query = query.where(Patient.issuer == issuer.strip())
        if name:
            # autoescape: a typed % or _ is a character to find, not a LIKE wildcard.
            term = name.lower()
            in_studies = select(Study.patient_pk).where(func.lower(Study.patient_name).contains(term, autoescape=True))
            query = query.where(func.lower(Patient.name).contains(term, autoescape=True) | Patient.id.in_(in_studies))
        with self._read_engine.connect() as connection:
            return list(connection.execute(query.order_by(Patient.id).limit(limit)).scalars())


def _lock_order(received: Received) -> tuple[str, str, str, str]:
    header = received.header
    return header.patient.patient_id, header.patient.issuer, header.series_uid, header.sop_instance_uid


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything the node writes is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


# ----- the instance row and its parents, in SQLAlchemy Core ---------------------------
# One instance costs 2-4 indexed look-ups and 1-4 small writes; the ORM's unit of
# work around the same statements cost ~2 ms per instance, more than the SQL.

_P, _ST, _SE, _I = Patient.__table__, Study.__table__, Series.__table__, Instance.__table__
_FIND_INSTANCE = select(_I.c.sha256, _I.c.path).where(_I.c.sop_instance_uid == bindparam("uid"))
_FIND_PATIENT = select(_P.c.id, _P.c.issuer_qualifiers, _P.c.other_patient_ids, _P.c.name, _P.c.birth_date,
                       _P.c.sex).where(_P.c.patient_id == bindparam("pid"), _P.c.issuer == bindparam("issuer")).with_for_update()
_FIND_STUDY = (select(_ST.c.id.label("study_pk"), _ST.c.patient_pk)
               .where(_ST.c.study_uid == bindparam("uid")).with_for_update())
# The series with its study in one look-up: for every instance after a series' first, the study's
# own look-up is not needed.
_FIND_SERIES = (select(_SE.c.id, _SE.c.state, _SE.c.last_received_at, _ST.c.study_uid, _ST.c.id.label("study_pk"),
                       _ST.c.patient_pk).join(_ST, _SE.c.study_pk == _ST.c.id)
                .where(_SE.c.series_uid == bindparam("uid")).with_for_update())
# Built once and executed with parameters: a statement built per call (`insert(...).values(...)`)
# cost more CPU in SQLAlchemy's coercion and cache-key work than the SQL itself.
_INSERT_INSTANCE = insert(_I)
_COUNT_IN = update(_SE).where(_SE.c.id == bindparam("pk")).values(
    instance_count=_SE.c.instance_count + bindparam("added"), total_bytes=_SE.c.total_bytes + bindparam("added_bytes"),
    last_received_at=bindparam("last"))
_COUNT_IN_REOPEN = _COUNT_IN.values(state=SeriesState.receiving, state_changed_at=bindparam("now"))
_FIND_ROW = select(_I.c.id, _I.c.series_pk, _I.c.size).where(_I.c.sop_instance_uid == bindparam("uid")).with_for_update()


def _record(connection: Connection, received: Received, trust_absent: bool = False) -> None:
    """`trust_absent`: take `received.absent` (ingest found no row for this SOP Instance UID) as
    still true and skip the look-up; a row that appeared since fails the insert (IntegrityError),
    and the retry looks."""
    header, stored, now = received.header, received.stored, received.received_at
    patient_pk = _patient(connection, header, now)

    series = connection.execute(_FIND_SERIES, {"uid": header.series_uid}).first()
    if series is not None and series.study_uid == header.study_uid:
        study = series
    else:
        study = connection.execute(_FIND_STUDY, {"uid": header.study_uid}).first()
    if study is None:
        study_pk = connection.execute(insert(_ST).values(
            study_uid=header.study_uid, patient_pk=patient_pk, created_at=now,
            study_date=header.study_date, study_time=header.study_time,
            accession_number=header.accession_number, description=header.study_description,
            patient_name=header.patient_name, patient_birth_date=header.birth_date,
            patient_sex=header.sex, patient_age=header.age, conflicting_instances=0,
        )).inserted_primary_key[0]
    else:
        study_pk = study.study_pk
        if study.patient_pk != patient_pk:
            # The study stays with the patient it arrived under first; linkage reads this.
            connection.execute(update(_ST).where(_ST.c.id == study_pk)
                               .values(conflicting_instances=_ST.c.conflicting_instances + 1))

    if series is None:
        series_pk = connection.execute(insert(_SE).values(
            series_uid=header.series_uid, study_pk=study_pk, modality=header.modality,
            body_part=header.body_part, series_number=header.series_number,
            description=header.series_description, instance_count=0, total_bytes=0,
            first_received_at=now, last_received_at=now,
            state=SeriesState.receiving, state_changed_at=now,
        )).inserted_primary_key[0]
        state, last = SeriesState.receiving, now
    else:
        series_pk, state, last = series.id, series.state, _aware(series.last_received_at)

    values = {"sop_class_uid": header.sop_class_uid, "instance_number": header.instance_number,
              "transfer_syntax_uid": stored.transfer_syntax_uid, "path": stored.path, "size": stored.size,
              "sha256": stored.sha256, "calling_ae": received.calling_ae, "received_at": now}
    row = None if trust_absent and received.absent else connection.execute(
        _FIND_ROW, {"uid": header.sop_instance_uid}).first()
    added_count, added_bytes = 1, stored.size
    if row is None:
        connection.execute(_INSERT_INSTANCE, {"sop_instance_uid": header.sop_instance_uid, "series_pk": series_pk,
                                              **values})
    else:
        if row.series_pk != series_pk:
            connection.execute(update(_SE).where(_SE.c.id == row.series_pk).values(
                instance_count=_SE.c.instance_count - 1, total_bytes=_SE.c.total_bytes - row.size))
        else:
            added_count, added_bytes = 0, stored.size - (row.size or 0)
        connection.execute(update(_I).where(_I.c.id == row.id).values(series_pk=series_pk, **values))

    # A late instance re-opens the series: it will be re-processed once stable.
    connection.execute(_COUNT_IN if state == SeriesState.receiving else _COUNT_IN_REOPEN,
                       {"pk": series_pk, "added": added_count, "added_bytes": added_bytes,
                        "last": max(last, now), "now": now})


def _patient(connection: Connection, header: InstanceHeader, now: datetime) -> int:
    key = header.patient
    row = connection.execute(_FIND_PATIENT, {"pid": key.patient_id, "issuer": key.issuer}).first()
    current = {} if row is None else row._asdict()
    # Latest registration wins for the patient row; each study keeps its own copy.
    values = {
        "issuer_qualifiers": header.issuer_qualifiers or current.get("issuer_qualifiers"),
        "name": header.patient_name or current.get("name"),
        "birth_date": header.birth_date or current.get("birth_date"),
        "sex": header.sex or current.get("sex"),
        "other_patient_ids": current.get("other_patient_ids"),
    }
    if header.other_patient_ids:
        known = list(values["other_patient_ids"] or [])
        values["other_patient_ids"] = known + [o for o in header.other_patient_ids if o not in known]
    if row is None:
        return connection.execute(insert(_P).values(
            patient_id=key.patient_id, issuer=key.issuer, created_at=now, **values)).inserted_primary_key[0]
    changed = {k: v for k, v in values.items() if v != current.get(k)}
    if changed:
        connection.execute(update(_P).where(_P.c.id == row.id).values(**changed))
    return row.id
