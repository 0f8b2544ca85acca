"""Pipeline workers: claim stable series, run load -> normalize -> route -> embed, store the result.

The imaging itself is `models.inference.pipeline`; this module only moves plain data
between the work queue (`db.queue`) and the pipeline, and decides retries.

A worker thread must outlive any series: besides Exception, every BaseException but
the interrupts in `models.inference.errors.FATAL` is caught, because pyo3 (Rust) extensions such
as the pylibjpeg-rle decoder raise `pyo3_runtime.PanicException`, a BaseException.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from db.queue import WorkQueue
from db.records import SeriesWork
from models.inference.errors import FATAL, SeriesError, describe

log = logging.getLogger("dicom_node.worker")


@dataclass
class RetryPolicy:
    max_attempts: int = 3
    base_delay_s: float = 30.0

    def delay(self, attempts: int) -> float | None:
        """Seconds until the next try, or None to give up (exponential backoff)."""
        if attempts >= self.max_attempts:
            return None
        return self.base_delay_s * 2 ** (attempts - 1)


@dataclass
class RunStats:
    done: int = 0
    failed: int = 0
    retried: int = 0
    seconds: float = 0.0
    by_route: dict[str, int] = field(default_factory=dict)


class Worker:
    def __init__(self, queue: WorkQueue, pipeline, storage_dir: Path, retry: RetryPolicy | None = None,
                 batch_size: int = 8, linker=None) -> None:
        self.queue = queue
        # linkage.engine.LinkageEngine (or None): links what was embedded after each batch
        self.linker = linker
        self.linked = 0
        self.pipeline = pipeline
        self.storage_dir = storage_dir
        self.retry = retry or RetryPolicy()
        self.batch_size = batch_size

    def run_once(self, stats: RunStats | None = None) -> int:
        """Claim one batch and process it (networks batched per route); return how many were claimed."""
        stats = stats or RunStats()
        batch = self.queue.claim(self.batch_size)
        if not batch:
            return 0
        started = time.perf_counter()
        try:
            results = self.pipeline.process_batch(batch, self.storage_dir)
        except FATAL:
            raise
        except BaseException:  # noqa: BLE001 - a bug or a panic on the batch path: isolate the poison series
            log.exception("batch of %d series failed; processing them one at a time", len(batch))
            results = [self._process_one(work) for work in batch]
        seconds = (time.perf_counter() - started) / len(batch)
        for work, result in zip(batch, results):
            self._record(work, result, seconds, stats)
        self.link()
        return len(batch)

    def link(self) -> None:
        """Link embedded series not linked yet. Failures are logged: the embeddings are
        stored and stay on the work list (`series.linked_at`) for the next pass."""
        if self.linker is None:
            return
        try:
            self.linked += self.linker.link_pending().series
        except FATAL:
            raise
        except BaseException:  # noqa: BLE001 - the database may be briefly unavailable; the next pass retries
            log.exception("linking pass failed")

    def _process_one(self, work: SeriesWork):
        try:
            return self.pipeline.process(work, self.storage_dir)
        except SeriesError as error:
            return error
        except FATAL:
            raise
        except Exception as error:  # noqa: BLE001 - one poison series must never stop the worker
            # The pipeline classes what the files cause itself (SeriesError), so this is the
            # environment (a GPU error, say) or a bug: retried, a bounded number of times.
            log.exception("series %s: unexpected pipeline error", work.series_uid)
            return SeriesError(describe(error), permanent=False)
        except BaseException as error:  # noqa: BLE001 - a native panic: it would panic again, so no retry
            log.exception("series %s: pipeline panicked", work.series_uid)
            return SeriesError(describe(error), permanent=True)

    def _record(self, work: SeriesWork, result, seconds: float, stats: RunStats) -> None:
        if isinstance(result, SeriesError):
            self._failed(work, result.reason, result.permanent, stats)
            return
        decision, embedding = result
        self.queue.complete(work, decision, embedding)
        stats.done += 1
        stats.by_route[decision.route] = stats.by_route.get(decision.route, 0) + 1
        stats.seconds += seconds
        log.info("series %s: route %s (%.2f, %s)%s, %.0f ms", work.series_uid, decision.route,
                 decision.confidence, decision.source, "" if embedding else ", not embedded", 1000 * seconds)

    def _failed(self, work: SeriesWork, reason: str, permanent: bool, stats: RunStats) -> None:
        delay = None if permanent else self.retry.delay(work.attempts)
        self.queue.fail(work, reason, delay)
        if delay is None:
            stats.failed += 1
            log.warning("series %s failed: %s", work.series_uid, reason)
        else:
            stats.retried += 1
            log.warning("series %s failed (attempt %d), retry in %.0f s: %s",
                        work.series_uid, work.attempts, delay, reason)

    def run_until_idle(self) -> RunStats:
        """Process until nothing is claimable now (series waiting for a retry are left)."""
        stats = RunStats()
        while self.run_once(stats):
            pass
        self.link()                     # left over from an earlier run that stopped before linking
        return stats

    def run_forever(self, stop: threading.Event, poll_s: float = 1.0) -> None:
        while not stop.is_set():
            try:
                claimed = self.run_once()
            except FATAL:
                raise
            except BaseException:  # noqa: BLE001 - the database may be briefly unavailable; keep the worker alive
                log.exception("worker loop error")
                claimed = 0
            if not claimed:
                self.link()
                stop.wait(poll_s)
