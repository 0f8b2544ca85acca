"""Group commit: rows of concurrent associations share a transaction; each caller returns only once
its own row is committed, and a bad row fails alone."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.group_commit import GroupCommit
from db.models import Instance, Series
from tests.test_store import received, series_row


def run_threads(target, count: int) -> list:
    errors: list = []

    def guarded(n: int) -> None:
        try:
            target(n)
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            errors.append((n, error))

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return errors


def test_callers_return_only_after_their_row_is_committed_and_rows_share_commits():
    committed: set[int] = set()
    sizes: list[int] = []

    def commit_batch(rows: list[int]) -> list:
        time.sleep(0.02)                  # the sync that rows queue behind
        committed.update(rows)
        sizes.append(len(rows))
        return [None] * len(rows)

    group = GroupCommit(commit_batch)
    early: list[int] = []

    def submit(n: int) -> None:
        for k in range(5):
            row = n * 100 + k
            group.submit(row)
            if row not in committed:
                early.append(row)

    assert run_threads(submit, 8) == []
    assert early == []
    assert len(committed) == 40 and sum(sizes) == 40 == group.rows
    assert group.batches == len(sizes) < 40 and max(sizes) > 1


def test_an_error_reaches_only_the_caller_whose_row_failed():
    def commit_batch(rows: list[int]) -> list:
        time.sleep(0.01)
        return [ValueError(f"row {r}") if r == 3 else None for r in rows]

    group = GroupCommit(commit_batch)
    errors = run_threads(group.submit, 8)
    assert [(n, str(e)) for n, e in errors] == [(3, "row 3")]
    assert group.rows == 8


def test_a_failing_commit_fails_its_batch_and_the_next_leader_goes_on():
    calls = []

    def commit_batch(rows: list[int]) -> list:
        calls.append(list(rows))
        if len(calls) == 1:
            time.sleep(0.05)              # the others queue meanwhile
            raise OSError("disk gone")
        return [None] * len(rows)

    group = GroupCommit(commit_batch)
    errors = run_threads(group.submit, 6)
    failed = {n for n, _ in errors}
    assert failed == set(calls[0]) and all(isinstance(e, OSError) for _, e in errors)
    assert sorted(r for batch in calls[1:] for r in batch) == sorted(set(range(6)) - failed)


def test_concurrent_rows_on_the_database_are_all_committed_with_their_counts(store):
    def send(n: int) -> None:
        for k in range(6):
            store.record_instance(received(f"8.{n}.{k}", series=f"8.{n % 3}", study="8", patient=f"G{n % 2}"))

    assert run_threads(send, 8) == []
    with Session(store.engine) as session:
        assert len(session.scalars(select(Instance)).all()) == 48
    assert sum(series_row(store, f"8.{s}").instance_count for s in range(3)) == 48
    assert store._group.rows == 48


def test_a_stale_absent_hint_is_corrected_by_the_insert(store):
    """Ingest says "no row yet" but another receiver stored the instance meanwhile: the insert
    fails, the retry finds the row and replaces it, and the series is not counted twice."""
    store.record_instance(received("9.1", series="9.0", study="9", size=100))
    store.record_instance(replace(received("9.1", series="9.0", study="9", size=300), absent=True))
    row = series_row(store, "9.0")
    assert (row.instance_count, row.total_bytes) == (1, 300)


def test_a_row_that_cannot_be_stored_fails_alone_in_a_shared_transaction(store):
    bad = received("10.bad", series="10.0", study="10")
    bad = replace(bad, header=replace(bad.header, sop_class_uid=None))     # NOT NULL column
    barrier = threading.Barrier(6)

    def send(n: int) -> None:
        barrier.wait()
        store.record_instance(bad if n == 0 else received(f"10.{n}", series="10.0", study="10"))

    errors = run_threads(send, 6)
    assert [n for n, _ in errors] == [0]
    with Session(store.engine) as session:
        uids = set(session.scalars(select(Instance.sop_instance_uid)))
        assert uids == {f"10.{n}" for n in range(1, 6)}
        assert session.scalar(select(Series.instance_count)) == 5
