"""The linkage store: what the engine reads (studies, embeddings) and the links it writes.

Plain data in and out (`db.records_linkage`). A link is created or updated by its `key`
(new evidence never duplicates a link); status changes only through `review`, and every
change leaves a `link_event` row (who, when, what, note).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import datetime

from sqlalchemy import Engine, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from db.engine import make_sessionmaker
from db.link_records import LinkRecords, _iso
from db.models import (Embedding, Instance, Link, LinkEvent, LinkKind, LinkStatus, MatchWeight, Patient, Series,
                       SeriesState, Study)
from db.records_linkage import LinkDraft, LinkEventView, LinkSide, LinkView, StoredEmbedding, StudyFacts
from db.store import utcnow

SYSTEM_ACTOR = "linkage"
# Open links in these bands are flags: listed for review, counted, and their suspect studies
# left out of comparisons. "worth-a-look" (below the review band) is a ranked list of weak
# evidence; "withdrawn" is kept for its history only.
LISTED_BANDS = ("review", "confident")
WORTH_A_LOOK = "worth-a-look"


class LinkError(Exception):
    """A review that cannot be applied (unknown link, invalid transition)."""


class LinkStore(LinkRecords):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = make_sessionmaker(engine)
        self._read = make_sessionmaker(engine.execution_options(read_only=True))

    # ----- the engine's work list -------------------------------------------------------

    def pending_series(self, limit: int = 256) -> list[int]:
        """Embedded series not yet linked, oldest first."""
        with self._read() as session:
            return list(session.scalars(
                select(Series.id).join(Embedding, Embedding.series_pk == Series.id)
                .where(Series.state == SeriesState.done, Series.linked_at.is_(None))
                .order_by(Series.processed_at, Series.id).limit(limit)))

    def mark_linked(self, series_pks: Iterable[int]) -> None:
        pks = list(series_pks)
        if pks:
            with self._sessions.begin() as session:
                session.execute(update(Series).where(Series.id.in_(pks)).values(linked_at=utcnow()))

    def embedding_rows_after(self, watermark: int, batch: int = 10_000) -> Iterator[tuple]:
        """(embedding_id, series_pk, route, model_name, model_version, dim, vector) by id, for the index."""
        last = watermark
        while True:
            with self._read() as session:
                rows = session.execute(
                    select(Embedding.id, Embedding.series_pk, Embedding.route, Embedding.model_name,
                           Embedding.model_version, Embedding.dim, Embedding.vector)
                    .where(Embedding.id > last).order_by(Embedding.id).limit(batch)).all()
            if not rows:
                return
            yield from (tuple(r) for r in rows)
            last = rows[-1][0]

    # ----- what the engine compares -----------------------------------------------------

    def embeddings(self, series_pks: Iterable[int] | None = None, patient_pks: Iterable[int] | None = None
                   ) -> list[StoredEmbedding]:
        """Current embeddings of the given series, or of every series of the given patients."""
        query = (select(Embedding.series_pk, Series.study_pk, Study.patient_pk, Embedding.route,
                        Embedding.model_name, Embedding.model_version, Embedding.vector)
                 .join(Series, Series.id == Embedding.series_pk).join(Study, Study.id == Series.study_pk))
        if series_pks is not None:
            query = query.where(Embedding.series_pk.in_(list(series_pks)))
        if patient_pks is not None:
            query = query.where(Study.patient_pk.in_(list(patient_pks)))
        with self._read() as session:
            return [StoredEmbedding(r.series_pk, r.study_pk, r.patient_pk, r.route,
                                    (r.route, r.model_name, r.model_version), r.vector)
                    for r in session.execute(query)]

    def known_uids(self, uids: Iterable[str]) -> set[str]:
        """The given UIDs that the store holds as a Study, Series or SOP Instance UID."""
        wanted, found = sorted(set(uids)), set()
        with self._read() as session:
            for k in range(0, len(wanted), 500):
                chunk = wanted[k:k + 500]
                for column in (Study.study_uid, Series.series_uid, Instance.sop_instance_uid):
                    found.update(session.execute(select(column).where(column.in_(chunk))).scalars())
        return found

    def study_facts(self, study_pks: Iterable[int] | None = None, patient_pks: Iterable[int] | None = None
                    ) -> dict[int, StudyFacts]:
        query = (select(Study, Patient.patient_id, Patient.issuer).join(Patient, Patient.id == Study.patient_pk))
        if study_pks is not None:
            query = query.where(Study.id.in_(list(study_pks)))
        if patient_pks is not None:
            query = query.where(Study.patient_pk.in_(list(patient_pks)))
        with self._read() as session:
            rows = session.execute(query).all()
            series = defaultdict(list)
            if rows:
                for study_pk, uid, modality in session.execute(
                        select(Series.study_pk, Series.series_uid, Series.modality)
                        .where(Series.study_pk.in_([r[0].id for r in rows])).order_by(Series.series_number, Series.id)):
                    series[study_pk].append((uid, modality or ""))
        out = {}
        for study, patient_id, issuer in rows:
            own = series[study.id]
            out[study.id] = StudyFacts(
                study.id, study.study_uid, study.patient_pk, patient_id, issuer, study.study_date,
                study.patient_name, study.patient_birth_date, study.patient_sex, study.patient_age,
                study.description, tuple(sorted({m for _, m in own if m})), tuple(uid for uid, _ in own))
        return out

    def patients_born(self, birth_dates: Iterable[str], exclude_patient: int | None = None, limit: int = 200) -> list[int]:
        """Patients with a study that carried one of these birth dates (candidate blocking)."""
        dates = [d for d in set(birth_dates) if d]
        if not dates:
            return []
        with self._read() as session:
            query = select(Study.patient_pk).where(Study.patient_birth_date.in_(dates)).distinct().limit(limit)
            if exclude_patient is not None:
                query = query.where(Study.patient_pk != exclude_patient)
            return list(session.scalars(query))

    # ----- links ---------------------------------------------------------------------

    def upsert(self, draft: LinkDraft) -> tuple[int, str]:
        """Create the link or update it with new evidence: (link id, created|updated|unchanged|decided).

        A decided (confirmed/rejected) link keeps its decision and its evidence; only an
        open link follows the evidence, including into and out of the `withdrawn` band."""
        try:
            return self._upsert(draft)
        except IntegrityError:      # two workers created the same key at once: update the winner's
            return self._upsert(draft)

    def suspect_studies(self, patient_pks: Iterable[int]) -> set[int]:
        """Studies of these patients flagged as filed under the wrong patient (open above the
        review band, or confirmed): left out when the patients' own images are compared."""
        pks = list(patient_pks)
        with self._read() as session:
            return set(session.scalars(select(Link.a_study_pk).where(
                Link.kind == LinkKind.different_patient_same_id, Link.a_patient_pk.in_(pks),
                or_(Link.status == LinkStatus.confirmed,
                    (Link.status == LinkStatus.open) & Link.band.in_(LISTED_BANDS)))))

    def open_same_partners(self, patient_pk: int) -> set[int]:
        """The other patients of open same_patient_different_id links (to re-score with new evidence)."""
        with self._read() as session:
            rows = session.execute(select(Link.a_patient_pk, Link.b_patient_pk).where(
                Link.kind == LinkKind.same_patient_different_id, Link.status == LinkStatus.open,
                or_(Link.a_patient_pk == patient_pk, Link.b_patient_pk == patient_pk))).all()
        return {pk for row in rows for pk in row} - {patient_pk}

    def withdraw(self, key: str, note: str) -> bool:
        """Move an open link out of the review list (band `withdrawn`); True if one was."""
        now = utcnow()
        with self._sessions.begin() as session:
            link = session.scalars(select(Link).where(Link.key == key, Link.status == LinkStatus.open,
                                                      Link.band != "withdrawn")).first()
            if link is None:
                return False
            link.band, link.updated_at = "withdrawn", now
            link.evidence = dict(link.evidence or {}, note=note)
            session.add(_event(link, now, SYSTEM_ACTOR, "updated", "open", "open", link.probability, note))
            return True

    def _upsert(self, draft: LinkDraft) -> tuple[int, str]:
        # Most re-checks change nothing: answer those from a read, without taking the write lock.
        with self._read() as session:
            seen = session.execute(select(Link.id, Link.status, Link.band, Link.probability, Link.a_study_pk,
                                          Link.b_study_pk).where(Link.key == draft.key)).first()
        if seen is None and draft.band == "withdrawn":
            return 0, "unchanged"
        if seen is not None:
            if seen.status != LinkStatus.open:
                return seen.id, "decided"
            if (abs(seen.probability - draft.probability) < 1e-6 and seen.band == draft.band
                    and (seen.a_study_pk, seen.b_study_pk) == (draft.a_study_pk, draft.b_study_pk)):
                return seen.id, "unchanged"
        now = utcnow()
        with self._sessions.begin() as session:
            link = session.scalars(select(Link).where(Link.key == draft.key)).first()
            if link is None:
                if draft.band == "withdrawn":
                    return 0, "unchanged"
                link = Link(key=draft.key, kind=LinkKind(draft.kind), status=LinkStatus.open, created_at=now)
                _apply(link, draft, now)
                session.add(link)
                session.flush()
                session.add(_event(link, now, SYSTEM_ACTOR, "created", None, "open", draft.probability, draft.band))
                return link.id, "created"
            if link.status != LinkStatus.open:
                return link.id, "decided"
            same = (abs(link.probability - draft.probability) < 1e-6 and link.band == draft.band
                    and (link.a_study_pk, link.b_study_pk) == (draft.a_study_pk, draft.b_study_pk))
            if same:
                return link.id, "unchanged"
            _apply(link, draft, now)
            session.add(_event(link, now, SYSTEM_ACTOR, "updated", "open", "open", draft.probability, draft.band))
            return link.id, "updated"

    def review(self, link_id: int, decision: str, actor: str, note: str | None = None) -> LinkView:
        """confirm | reject | reopen. Reversible: a decided link can be changed or reopened."""
        target = {"confirm": LinkStatus.confirmed, "reject": LinkStatus.rejected, "reopen": LinkStatus.open}.get(decision)
        if target is None:
            raise LinkError(f"unknown decision {decision!r} (confirm, reject or reopen)")
        if not actor or not actor.strip():
            raise LinkError("a review needs the name of who decided")
        now = utcnow()
        with self._sessions.begin() as session:
            link = session.get(Link, link_id, with_for_update=True)
            if link is None:
                raise LinkError(f"no link {link_id}")
            if link.status == target:
                raise LinkError(f"link {link_id} is already {target.value}")
            before = link.status.value
            link.status = target
            link.decided_at = None if target == LinkStatus.open else now
            link.decided_by = None if target == LinkStatus.open else actor
            link.note = note
            action = {"confirmed": "confirmed", "rejected": "rejected", "open": "reopened"}[target.value]
            session.add(_event(link, now, actor, action, before, target.value, link.probability, note))
        return self.get(link_id)

    def get(self, link_id: int) -> LinkView:
        views = self.list(ids=[link_id], status=None)
        if not views:
            raise LinkError(f"no link {link_id}")
        return views[0]

    def list(self, status: str | None = "open", kind: str | None = None, ids: list[int] | None = None,
             include_withdrawn: bool = False, patient_pks: Iterable[int] | None = None,
             bands: tuple[str, ...] | None = None) -> list[LinkView]:
        """Links, most probable first. status None: all; open links below the review band
        (withdrawn, worth-a-look) are left out unless asked for (`include_withdrawn`: all bands;
        `bands`: only these) or asked for by id."""
        query = select(Link)
        if bands is not None:
            query = query.where(Link.band.in_(bands))
        if status is not None:
            query = query.where(Link.status == LinkStatus(status))
        if kind is not None:
            query = query.where(Link.kind == LinkKind(kind))
        if ids is not None:
            query = query.where(Link.id.in_(ids))
        elif not include_withdrawn and bands is None:
            query = query.where(or_(Link.status != LinkStatus.open, Link.band.in_(LISTED_BANDS)))
        if patient_pks is not None:
            pks = list(patient_pks)
            query = query.where(or_(Link.a_patient_pk.in_(pks), Link.b_patient_pk.in_(pks)))
        with self._read() as session:
            links = session.scalars(query.order_by(Link.probability.desc(), Link.id)).all()
        facts = self.study_facts({pk for link in links for pk in (link.a_study_pk, link.b_study_pk)})
        return [_view(link, facts) for link in links]

    def events(self, link_id: int | None = None, limit: int | None = None) -> list[LinkEventView]:
        query = select(LinkEvent).order_by(LinkEvent.id.desc())
        if link_id is not None:
            query = query.where(LinkEvent.link_pk == link_id)
        if limit:
            query = query.limit(limit)
        with self._read() as session:
            return [LinkEventView(e.link_pk, _iso(e.at), e.actor, e.action, e.from_status, e.to_status,
                                  e.probability, e.note) for e in session.scalars(query)]

    def decided_pairs(self) -> list[tuple[str, str, dict]]:
        """(kind, status, evidence) of every confirmed or rejected link: m/u re-estimation input."""
        with self._read() as session:
            rows = session.execute(select(Link.kind, Link.status, Link.evidence)
                                   .where(Link.status != LinkStatus.open)).all()
        return [(k.value, s.value, e or {}) for k, s, e in rows]

    # ----- m/u weights ------------------------------------------------------------------

    def match_weights(self) -> dict[tuple[str, str], tuple[float, float]]:
        with self._read() as session:
            return {(w.field, w.level): (w.m, w.u) for w in session.scalars(select(MatchWeight))}

    def save_match_weights(self, rows: dict[tuple[str, str], tuple[float, float, int, int]]) -> None:
        """(field, level) -> (m, u, confirmed, rejected), replacing earlier estimates."""
        now = utcnow()
        with self._sessions.begin() as session:
            session.query(MatchWeight).delete()
            for (field, level), (m, u, confirmed, rejected) in rows.items():
                session.add(MatchWeight(field=field, level=level, m=m, u=u, confirmed=confirmed,
                                        rejected=rejected, updated_at=now))

    # ----- web pages (dashboard) -----------------------------------------

    def link_counts(self) -> dict[str, int]:
        """Links by status; `open` counts only those listed for review (not withdrawn)."""
        with self._read() as session:
            rows = session.execute(select(Link.status, func.count()).where(
                or_(Link.status != LinkStatus.open, Link.band.in_(LISTED_BANDS))).group_by(Link.status)).all()
            worth = session.scalar(select(func.count()).select_from(Link).where(
                Link.status == LinkStatus.open, Link.band == WORTH_A_LOOK))
        counts = {status.value: 0 for status in LinkStatus}
        counts.update({status.value: int(n) for status, n in rows})
        counts[WORTH_A_LOOK] = int(worth or 0)
        return counts

    def open_link_ids(self) -> list[int]:
        """Ids of the links listed for review, in `list`'s order (most probable first)."""
        with self._read() as session:
            return list(session.scalars(select(Link.id).where(Link.status == LinkStatus.open,
                                                              Link.band.in_(LISTED_BANDS))
                                        .order_by(Link.probability.desc(), Link.id)))

def _apply(link: Link, draft: LinkDraft, now: datetime) -> None:
    link.kind = LinkKind(draft.kind)
    link.band = draft.band
    link.a_study_pk, link.b_study_pk = draft.a_study_pk, draft.b_study_pk
    link.a_patient_pk, link.b_patient_pk = draft.a_patient_pk, draft.b_patient_pk
    link.probability, link.weight = float(draft.probability), float(draft.weight)
    link.evidence = draft.evidence
    link.updated_at = now


def _event(link: Link, now, actor, action, before, after, probability, note) -> LinkEvent:
    return LinkEvent(link_pk=link.id, at=now, actor=actor, action=action, from_status=before, to_status=after,
                     probability=probability, note=note)


def _side(facts: StudyFacts | None) -> LinkSide:
    if facts is None:
        return LinkSide("", "", "", [])
    return LinkSide(facts.patient_id, facts.issuer, facts.study_uid, list(facts.series_uids), facts.name,
                    facts.birth_date, facts.sex, facts.study_date, facts.description, list(facts.modalities))


def _view(link: Link, facts: dict[int, StudyFacts]) -> LinkView:
    return LinkView(link.id, link.kind.value, link.status.value, link.band, link.probability, link.weight,
                    _side(facts.get(link.a_study_pk)), _side(facts.get(link.b_study_pk)), link.evidence or {},
                    _iso(link.created_at), _iso(link.updated_at), _iso(link.decided_at), link.decided_by, link.note)


__all__ = ["SYSTEM_ACTOR", "LinkError", "LinkStore"]
