"""Read side of the linkage store for priors, export, C-FIND/C-MOVE/C-GET, DICOMweb and the web
pages: a person's patients across confirmed links, their studies, series and instances, and the
confirmed merges (plain records out).

Mixed into `db.links.LinkStore`, which provides `_read` (a read-only session factory).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import func, or_, select

from db.models import Instance, Link, LinkKind, LinkStatus, Patient, Series, Study
from db.records_linkage import InstanceRecord, MergeEdge, PatientRecord, SeriesRecord, StudyRecord


class LinkRecords:
    _read = None           # set by LinkStore.__init__

    # ----- priors ----------------------------------------------------------------------

    def patient_pks(self, patient_id: str, issuer: str | None = None) -> list[int]:
        query = select(Patient.id).where(Patient.patient_id == patient_id)
        if issuer is not None:
            query = query.where(Patient.issuer == issuer)
        with self._read() as session:
            return list(session.scalars(query))

    def patient_of_study(self, study_uid: str) -> int | None:
        with self._read() as session:
            return session.scalar(select(Study.patient_pk).where(Study.study_uid == study_uid))

    def linked_patients(self, patient_pks: Iterable[int]) -> set[int]:
        """The patients joined to these by confirmed same_patient_different_id links (transitively)."""
        group, frontier = set(patient_pks), set(patient_pks)
        with self._read() as session:
            while frontier:
                rows = session.execute(
                    select(Link.a_patient_pk, Link.b_patient_pk).where(
                        Link.kind == LinkKind.same_patient_different_id, Link.status == LinkStatus.confirmed,
                        or_(Link.a_patient_pk.in_(frontier), Link.b_patient_pk.in_(frontier)))).all()
                found = {pk for row in rows for pk in row} - group
                group |= found
                frontier = found
        return group

    def misfiled_studies(self, study_pks: Iterable[int]) -> set[int]:
        """Of these studies, those a confirmed different_patient_same_id link says are not the patient's."""
        pks = list(study_pks)
        with self._read() as session:
            return set(session.scalars(select(Link.a_study_pk).where(
                Link.kind == LinkKind.different_patient_same_id, Link.status == LinkStatus.confirmed,
                Link.a_study_pk.in_(pks))))


    # ----- priors, export and C-FIND (read side) ----------------------------------------

    def find_studies(self, patient_pks: Iterable[int] | None = None, study_uids: Iterable[str] | None = None,
                     date_from: str | None = None, date_to: str | None = None,
                     accession: str | None = None) -> list[StudyRecord]:
        """Studies with their counts, modalities and misfiled flag, narrowed by indexed columns
        only; callers apply any finer matching. Dates are YYYYMMDD strings (compare as text)."""
        confirmed_misfiled = (select(func.min(Link.id)).where(
            Link.kind == LinkKind.different_patient_same_id, Link.status == LinkStatus.confirmed,
            Link.a_study_pk == Study.id).correlate(Study).scalar_subquery())
        counts = (select(Series.study_pk, func.count(Series.id).label("n_series"),
                         func.coalesce(func.sum(Series.instance_count), 0).label("n_instances"))
                  .group_by(Series.study_pk).subquery())
        filters = []
        if patient_pks is not None:
            filters.append(Study.patient_pk.in_(list(patient_pks)))
        if study_uids is not None:
            filters.append(Study.study_uid.in_(list(study_uids)))
        if date_from:
            filters.append(Study.study_date >= date_from)
        if date_to:
            filters.append(Study.study_date <= date_to)
        if accession is not None:
            filters.append(Study.accession_number == accession)
        query = (select(Study.id, Study.study_uid, Study.patient_pk, Patient.patient_id, Patient.issuer,
                        Study.study_date, Study.study_time, Study.accession_number, Study.description,
                        func.coalesce(Study.patient_name, Patient.name),
                        func.coalesce(Study.patient_birth_date, Patient.birth_date),
                        func.coalesce(Study.patient_sex, Patient.sex),
                        counts.c.n_series, counts.c.n_instances, confirmed_misfiled)
                 .join(Patient, Patient.id == Study.patient_pk)
                 .outerjoin(counts, counts.c.study_pk == Study.id).where(*filters))
        # One read transaction (plain BEGIN on SQLite): a consistent snapshot, never a writer's lock.
        with self._read() as session:
            rows = session.execute(query).all()
            modalities = defaultdict(set)
            if rows:
                for study_pk, modality in session.execute(
                        select(Series.study_pk, Series.modality).distinct()
                        .where(Series.study_pk.in_(select(Study.id).where(*filters)), Series.modality.is_not(None))):
                    modalities[study_pk].add(modality)
        return [StudyRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11],
                            tuple(sorted(modalities[r[0]])), int(r[12] or 0), int(r[13] or 0), r[14])
                for r in rows]

    def find_series(self, study_pks: Iterable[int] | None = None, series_uids: Iterable[str] | None = None
                    ) -> list[SeriesRecord]:
        """Series of these studies and/or with these UIDs, by study, series number."""
        query = (select(Series.id, Series.series_uid, Series.study_pk, Study.study_uid, Series.modality,
                        Series.series_number, Series.description, Series.body_part, Series.instance_count)
                 .join(Study, Study.id == Series.study_pk))
        if study_pks is not None:
            query = query.where(Series.study_pk.in_(list(study_pks)))
        if series_uids is not None:
            query = query.where(Series.series_uid.in_(list(series_uids)))
        with self._read() as session:
            rows = session.execute(query.order_by(Series.study_pk, Series.series_number, Series.id)).all()
        return [SeriesRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], int(r[8] or 0)) for r in rows]

    def find_instances(self, series_pks: Iterable[int] | None = None, sop_uids: Iterable[str] | None = None
                       ) -> list[InstanceRecord]:
        """Instances of these series and/or with these SOP Instance UIDs, by series, instance number."""
        query = (select(Instance.id, Instance.sop_instance_uid, Instance.sop_class_uid, Instance.series_pk,
                        Series.series_uid, Study.study_uid, Instance.instance_number, Instance.transfer_syntax_uid,
                        Instance.path, Instance.size)
                 .join(Series, Series.id == Instance.series_pk).join(Study, Study.id == Series.study_pk))
        if series_pks is not None:
            query = query.where(Instance.series_pk.in_(list(series_pks)))
        if sop_uids is not None:
            query = query.where(Instance.sop_instance_uid.in_(list(sop_uids)))
        with self._read() as session:
            rows = session.execute(query.order_by(Instance.series_pk, Instance.instance_number, Instance.id)).all()
        return [InstanceRecord(*r[:9], int(r[9])) for r in rows]

    def patient_records(self, patient_pks: Iterable[int] | None = None, patient_id: str | None = None,
                        issuer: str | None = None) -> dict[int, PatientRecord]:
        """Patient rows with their study count and earliest study date, by pk."""
        stats = (select(Study.patient_pk, func.count(Study.id).label("n"),
                        func.min(Study.study_date).label("first")).group_by(Study.patient_pk).subquery())
        query = (select(Patient.id, Patient.patient_id, Patient.issuer, Patient.name, Patient.birth_date,
                        Patient.sex, stats.c.n, stats.c.first).outerjoin(stats, stats.c.patient_pk == Patient.id))
        if patient_pks is not None:
            query = query.where(Patient.id.in_(list(patient_pks)))
        if patient_id is not None:
            query = query.where(Patient.patient_id == patient_id)
        if issuer is not None:
            query = query.where(Patient.issuer == issuer)
        with self._read() as session:
            return {r[0]: PatientRecord(r[0], r[1], r[2], r[3], r[4], r[5], int(r[6] or 0), r[7])
                    for r in session.execute(query.order_by(Patient.id))}

    def merge_edges(self, patient_pks: Iterable[int] | None = None) -> list[MergeEdge]:
        """Confirmed same_patient_different_id links (touching these patients), oldest first."""
        query = select(Link).where(Link.kind == LinkKind.same_patient_different_id,
                                   Link.status == LinkStatus.confirmed)
        if patient_pks is not None:
            pks = list(patient_pks)
            query = query.where(or_(Link.a_patient_pk.in_(pks), Link.b_patient_pk.in_(pks)))
        with self._read() as session:
            return [MergeEdge(link.id, link.a_patient_pk, link.b_patient_pk, link.probability, link.decided_by,
                              _iso(link.decided_at), link.note)
                    for link in session.scalars(query.order_by(Link.id))]


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    from db.store import _aware
    return _aware(moment).isoformat(timespec="seconds")
