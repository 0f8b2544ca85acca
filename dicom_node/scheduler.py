"""Timed jobs: series completion (receiving -> stable after `stable_after_s` of quiet)."""

from __future__ import annotations

import logging
from datetime import timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from db.store import IdentityStore, utcnow
from dicom_node.config import SeriesSettings

log = logging.getLogger("dicom_node.scheduler")


def mark_quiet_series_stable(store: IdentityStore, stable_after_s: float) -> int:
    """One sweep; also what a restart does first, so nothing waits on lost timers."""
    count = store.mark_stable(utcnow() - timedelta(seconds=stable_after_s))
    if count:
        log.info("%d series became stable and were queued for processing", count)
    return count


def start_scheduler(store: IdentityStore, series: SeriesSettings) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(
        mark_quiet_series_stable, "interval", args=[store, series.stable_after_s],
        seconds=series.check_interval_s, id="series-completion",
        max_instances=1, coalesce=True, next_run_time=utcnow(),
    )
    scheduler.start()
    return scheduler
