"""The persisted work queue on SQLite and PostgreSQL: claims, leases, retries, replacement."""

from __future__ import annotations

import threading
from datetime import timedelta

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Embedding, Series, SeriesState
from db.queue import WorkQueue
from db.records import EmbeddingResult, RouteDecision
from db.store import utcnow
from tests.test_store import received

DECISION = RouteDecision("chest_ct", 0.99, "header")


def embedding(seed: int) -> EmbeddingResult:
    vector = np.random.default_rng(seed).normal(size=8).astype("<f4")
    vector /= np.linalg.norm(vector)
    return EmbeddingResult("chest_ct", "test-net", "1", vector.tobytes(), 8)


def stable_series(store, count: int) -> None:
    old = utcnow() - timedelta(minutes=5)
    for n in range(count):
        store.record_instance(received(f"1.{n}.1", series=f"9.{n}", study=f"8.{n}", at=old))
        store.record_instance(received(f"1.{n}.2", series=f"9.{n}", study=f"8.{n}", at=old))
    store.mark_stable(utcnow())


def state_of(store, uid: str) -> Series:
    with Session(store.engine) as session:
        return session.scalars(select(Series).where(Series.series_uid == uid)).one()


def test_claim_complete_and_reprocess_replaces_the_embedding(store):
    stable_series(store, 1)
    queue = WorkQueue(store.engine)
    (work,) = queue.claim(5)
    assert work.paths == ["8.0/9.0/1.0.1.dcm", "8.0/9.0/1.0.2.dcm"] and work.attempts == 1
    assert queue.claim(5) == []  # claimed series are not handed out twice
    assert queue.complete(work, DECISION, embedding(1))
    row = state_of(store, "9.0")
    assert (row.state, row.route, row.route_source, row.claim_token) == (SeriesState.done, "chest_ct", "header", None)

    # A late instance re-opens it; processing again replaces, never duplicates.
    store.record_instance(received("1.0.3", series="9.0", study="8.0", at=utcnow() - timedelta(minutes=1)))
    store.mark_stable(utcnow())
    (again,) = queue.claim(5)
    assert queue.complete(again, DECISION, embedding(2))
    with Session(store.engine) as session:
        (stored,) = session.scalars(select(Embedding)).all()
        assert np.frombuffer(stored.vector, "<f4").tolist() == np.frombuffer(embedding(2).vector, "<f4").tolist()


def test_a_series_reopened_while_processing_is_not_marked_done(store):
    stable_series(store, 1)
    queue = WorkQueue(store.engine)
    (work,) = queue.claim()
    store.record_instance(received("1.0.9", series="9.0", study="8.0"))
    assert not queue.complete(work, DECISION, embedding(1))
    assert state_of(store, "9.0").state == SeriesState.receiving


def test_failures_back_off_then_give_up(store):
    stable_series(store, 1)
    queue = WorkQueue(store.engine)
    (work,) = queue.claim()
    queue.fail(work, "disk hiccup", retry_after_s=60)
    row = state_of(store, "9.0")
    assert row.state == SeriesState.stable and row.last_error == "disk hiccup"
    assert queue.claim() == []  # not before the back-off delay
    (retry,) = queue.claim(now=utcnow() + timedelta(seconds=61))
    assert retry.attempts == 2
    queue.fail(retry, "mixed image sizes", retry_after_s=None)
    assert state_of(store, "9.0").state == SeriesState.failed
    assert queue.claim(now=utcnow() + timedelta(days=1)) == []
    assert queue.retry_failed() == 1 and len(queue.claim()) == 1


def test_after_a_model_change_only_series_embedded_by_another_model_are_requeued(store):
    stable_series(store, 4)
    queue = WorkQueue(store.engine)
    work = sorted(queue.claim(5), key=lambda w: w.series_uid)
    old, new = embedding(1), embedding(2)
    new = EmbeddingResult(new.route, new.model_name, "2", new.vector, new.dim)
    other_route = EmbeddingResult("fundus", "eye-net", "1", old.vector, old.dim)
    assert queue.complete(work[0], DECISION, old) and queue.complete(work[1], DECISION, new)
    assert queue.complete(work[2], RouteDecision("fundus", 0.9, "header"), other_route)
    queue.fail(work[3], "unreadable", retry_after_s=None)

    counts = queue.requeue_other_models({"chest_ct": ("test-net", "2"), "fundus": ("eye-net", "1")})
    assert counts == {"chest_ct": 1, "fundus": 0}
    states = {uid: state_of(store, uid).state for uid in ("9.0", "9.1", "9.2", "9.3")}
    assert states == {"9.0": SeriesState.stable, "9.1": SeriesState.done, "9.2": SeriesState.done,
                      "9.3": SeriesState.failed}
    (again,) = queue.claim(5)                           # re-processed with the new model: one embedding, replaced
    assert again.series_uid == "9.0" and queue.complete(again, DECISION, new)
    assert queue.requeue_other_models({"chest_ct": ("test-net", "2")}) == {"chest_ct": 0}


def test_an_expired_claim_can_be_taken_over(store):
    stable_series(store, 1)
    queue = WorkQueue(store.engine, lease_s=60)
    (dead_worker,) = queue.claim()
    assert queue.claim() == []
    (takeover,) = queue.claim(now=utcnow() + timedelta(seconds=61))
    assert takeover.claim_token != dead_worker.claim_token
    assert not queue.complete(dead_worker, DECISION, embedding(1))  # the old claim no longer counts
    assert queue.complete(takeover, DECISION, embedding(2))


def test_concurrent_workers_never_claim_the_same_series(store):
    stable_series(store, 40)
    queue = WorkQueue(store.engine)
    claimed: list[list[int]] = [[] for _ in range(4)]

    def work(slot: int) -> None:
        while batch := queue.claim(3):
            claimed[slot] += [w.series_pk for w in batch]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [pk for slot in claimed for pk in slot]
    assert len(everything) == 40 and len(set(everything)) == 40


def test_at_start_up_a_claim_left_by_a_crash_on_its_last_attempt_fails_the_series(store):
    # A native decoder that aborts the process cannot be caught: without this the series
    # would be claimed again after every restart and bring the node down each time.
    stable_series(store, 2)
    queue = WorkQueue(store.engine)
    for _ in range(2):
        queue.claim(5)
        assert queue.release_claims(max_attempts=3) == 2
    crashing, other = sorted(queue.claim(5), key=lambda w: w.series_uid)
    queue.fail(other, "disk hiccup", retry_after_s=0)      # not processing at the crash: left alone
    assert crashing.attempts == 3 and queue.release_claims(max_attempts=3) == 0
    row = state_of(store, "9.0")
    assert row.state == SeriesState.failed and row.claim_token is None
    assert "3 attempts" in row.last_error and "stopped" in row.last_error
    assert state_of(store, "9.1").state == SeriesState.stable
    assert queue.release_claims() == 0                     # without a limit: as before
