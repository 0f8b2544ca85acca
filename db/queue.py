"""The persisted work queue of stable series, consumed by pipeline workers.

Claims are leases: `claim` marks series `processing` with a token; a worker
that dies leaves its claim to expire after `lease_s`, when another worker may
take the series over. On PostgreSQL, rows are claimed with FOR UPDATE SKIP
LOCKED so concurrent workers never take the same series; SQLite has a single
writer (BEGIN IMMEDIATE), which gives the same guarantee.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, delete, or_, select, update

from db.engine import make_sessionmaker
from db.models import Embedding, Instance, Series, SeriesState
from db.records import EmbeddingResult, RouteDecision, SeriesWork
from db.store import utcnow


class WorkQueue:
    def __init__(self, engine: Engine, lease_s: float = 600.0) -> None:
        self.engine = engine
        self.lease = timedelta(seconds=lease_s)
        self._sessions = make_sessionmaker(engine)

    def claim(self, limit: int = 1, now: datetime | None = None) -> list[SeriesWork]:
        now = now or utcnow()
        token = str(uuid.uuid4())
        ready = or_(
            and_(Series.state == SeriesState.stable,
                 or_(Series.next_attempt_at.is_(None), Series.next_attempt_at <= now)),
            and_(Series.state == SeriesState.processing, Series.claimed_at < now - self.lease),
        )
        with self._sessions.begin() as session:
            query = select(Series).where(ready).order_by(Series.last_received_at).limit(limit)
            if self.engine.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            series = session.scalars(query).all()
            work = []
            for row in series:
                row.state, row.state_changed_at = SeriesState.processing, now
                row.claim_token, row.claimed_at = token, now
                row.attempts += 1
                paths = session.scalars(
                    select(Instance.path).where(Instance.series_pk == row.id)
                    .order_by(Instance.instance_number, Instance.sop_instance_uid)
                ).all()
                work.append(SeriesWork(row.id, row.series_uid, token, row.attempts, row.modality,
                                       row.body_part, list(paths)))
            return work

    def _owned(self, work: SeriesWork):
        # A late instance re-opens a series (state back to receiving) while it is
        # processed; the result then must not mark it done.
        return and_(Series.id == work.series_pk, Series.claim_token == work.claim_token,
                    Series.state == SeriesState.processing)

    def complete(self, work: SeriesWork, decision: RouteDecision, embedding: EmbeddingResult | None) -> bool:
        """Store the decision and embedding (replacing any earlier one); True if marked done."""
        now = utcnow()
        with self._sessions.begin() as session:
            session.execute(delete(Embedding).where(Embedding.series_pk == work.series_pk))
            if embedding is not None:
                session.add(Embedding(series_pk=work.series_pk, route=embedding.route,
                                      model_name=embedding.model_name, model_version=embedding.model_version,
                                      dim=embedding.dim, vector=embedding.vector, created_at=now))
            route_values = dict(route=decision.route, route_confidence=decision.confidence,
                                route_source=decision.source, route_findings=list(decision.findings),
                                processed_at=now, linked_at=None)   # a new embedding is linked anew
            session.execute(update(Series).where(Series.id == work.series_pk).values(**route_values))
            done = session.execute(
                update(Series).where(self._owned(work)).values(
                    state=SeriesState.done, state_changed_at=now, claim_token=None, claimed_at=None,
                    last_error=None, next_attempt_at=None)
            ).rowcount
        return bool(done)

    def fail(self, work: SeriesWork, reason: str, retry_after_s: float | None) -> None:
        """Record a failure; retry later (back to stable with a delay) or give up (failed)."""
        now = utcnow()
        values = dict(last_error=reason[:2000], claim_token=None, claimed_at=None, state_changed_at=now)
        if retry_after_s is None:
            values.update(state=SeriesState.failed, next_attempt_at=None)
        else:
            values.update(state=SeriesState.stable, next_attempt_at=now + timedelta(seconds=retry_after_s))
        with self._sessions.begin() as session:
            session.execute(update(Series).where(self._owned(work)).values(**values))

    def release_claims(self, max_attempts: int | None = None) -> int:
        """Give back every claim at start-up; return how many. Only for a store no other process
        works on (the embedded SQLite default): its claims can only be ours, from before a crash,
        and need not wait for their lease to run out.

        With `max_attempts`, a claim that was the series' last allowed attempt fails the series
        instead: a native crash on its files (an abort no except clause catches) would otherwise
        bring the node down again after every restart."""
        now = utcnow()
        processing = Series.state == SeriesState.processing
        released = dict(claim_token=None, claimed_at=None, state_changed_at=now)
        with self._sessions.begin() as session:
            if max_attempts is not None:
                session.execute(
                    update(Series).where(processing, Series.attempts >= max_attempts)
                    .values(state=SeriesState.failed, next_attempt_at=None, **released,
                            last_error=f"given up after {max_attempts} attempts: the node stopped while the "
                                       "last one was processing it (a crash on these files?)"))
            return session.execute(
                update(Series).where(processing).values(state=SeriesState.stable, **released)
            ).rowcount

    def requeue_other_models(self, current: dict[str, tuple[str, str]]) -> dict[str, int]:
        """Put back in the queue every done series whose embedding was made by another model than the
        route's current one (`current`: route -> (model name, version)). Series are compared only with
        embeddings of the same model, so after a model change the archive's earlier series must be
        embedded again. Counts per route."""
        now, counts = utcnow(), {}
        with self._sessions.begin() as session:
            for route, (name, version) in sorted(current.items()):
                stale = select(Embedding.series_pk).where(
                    Embedding.route == route, or_(Embedding.model_name != name, Embedding.model_version != version))
                counts[route] = session.execute(
                    update(Series).where(Series.state == SeriesState.done, Series.id.in_(stale))
                    .values(state=SeriesState.stable, attempts=0, next_attempt_at=None, state_changed_at=now)
                    .execution_options(synchronize_session=False)).rowcount
        return counts

    def retry_failed(self) -> int:
        """Put every failed series back in the queue (after a fix, say)."""
        with self._sessions.begin() as session:
            return session.execute(
                update(Series).where(Series.state == SeriesState.failed)
                .values(state=SeriesState.stable, attempts=0, next_attempt_at=None, state_changed_at=utcnow())
            ).rowcount
