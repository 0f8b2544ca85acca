"""Group commit: rows that arrive while a transaction is committing go into the next one together.

Each association thread calls `submit(row)` and returns only when the transaction holding its own
row has committed (or raises that row's error). The first caller with no transaction in flight
leads: it takes every row waiting (its own first), commits them in one transaction, releases
their callers, and hands the lead to the first row that arrived meanwhile. With one association
nothing waits and it is one row per transaction, as before; with several, the rows that queue
behind a commit's sync share the next one (leader/follower, as databases do for their own logs).

Written here because neither SQLAlchemy nor the drivers batch commits across threads.
"""

from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

Row = TypeVar("Row")


class _Waiter(Generic[Row]):
    __slots__ = ("row", "event", "lead", "error")

    def __init__(self, row: Row) -> None:
        self.row = row
        self.event = threading.Event()
        self.lead = False
        self.error: BaseException | None = None


class GroupCommit(Generic[Row]):
    def __init__(self, commit_batch: Callable[[list[Row]], list[BaseException | None]], max_batch: int = 64) -> None:
        """`commit_batch(rows)` commits the rows and returns each one's error (None when committed)."""
        self._commit_batch = commit_batch
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._waiting: list[_Waiter[Row]] = []
        self._busy = False
        self.batches = 0                # transactions committed and the rows in them (tests read them)
        self.rows = 0

    def submit(self, row: Row) -> None:
        me = _Waiter(row)
        with self._lock:
            self._waiting.append(me)
            me.lead = not self._busy
            self._busy = True
        if not me.lead:
            me.event.wait()             # set when committed by a leader, or when handed the lead
            if not me.lead:
                if me.error is not None:
                    raise me.error
                return
        with self._lock:                # a leader is always first in line
            batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
        try:
            errors = self._commit_batch([w.row for w in batch])
        except BaseException as error:  # noqa: BLE001 - every caller in the batch gets it
            errors = [error] * len(batch)
        for waiter, error in zip(batch, errors):
            waiter.error = error
        with self._lock:
            self.batches += 1
            self.rows += len(batch)
            successor = self._waiting[0] if self._waiting else None
            if successor is None:
                self._busy = False
            else:
                successor.lead = True
        for waiter in batch:
            if waiter is not me:
                waiter.event.set()
        if successor is not None:
            successor.event.set()
        if me.error is not None:
            raise me.error
