"""`dicom-node serve`: the DICOM listener (in this process, or as receiver processes), the series
scheduler, the pipeline workers and the web server, until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from db.accounts import AccountStore
from dicom_node.config import Settings
from dicom_node.node import build, start_workers
from dicom_node.reload import AllowListReloader

log = logging.getLogger("dicom_node")


def serve(settings: Settings, ready: threading.Event | None = None, config_path: Path | None = None) -> int:
    """Migrate, start the listener and the scheduler, run until SIGINT/SIGTERM.

    `config_path`: the file `settings` came from; its allow-list is reloaded on SIGHUP and when
    the file changes (`AllowListReloader`)."""
    from dicom_node.receivers import ReceiverPool, receiver_count
    from dicom_node.scheduler import mark_quiet_series_stable, start_scheduler
    from dicom_node.scp import StorageSCP

    parts = build(settings)
    stray = parts.files.clear_partial_writes()
    if stray:
        log.info("removed %d partial writes left by an earlier stop (none was acknowledged)", stray)
    mark_quiet_series_stable(parts.store, settings.series.stable_after_s)
    receivers = receiver_count(settings)
    scp = ReceiverPool(settings, receivers, config_path) if receivers > 1 else StorageSCP(settings, parts.ingestor)
    scp.start()
    scheduler = start_scheduler(parts.store, settings.series)
    stop = threading.Event()
    workers = start_workers(settings, parts.engine, stop)
    web = None
    if settings.web.enabled:
        from web.server import start_web

        try:
            web = start_web(settings, parts.engine)
        except Exception:
            scp.stop()
            scheduler.shutdown(wait=False)
            stop.set()
            raise
        print(f"web pages on {web.scheme}://{settings.web.host}:{web.port}/", flush=True)
        if not AccountStore(parts.engine).users():
            print("no web accounts yet: create the first one with "
                  "`dicom-node user add NAME --role admin` (archivist and clinician accounts the same way)",
                  flush=True)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    reloader = AllowListReloader(scp, settings, config_path)
    signal.signal(signal.SIGHUP, lambda *_: reloader.request())
    reloader.watch(stop)
    print(f"dicom-node {settings.node.ae_title} listening on {settings.node.host}:{scp.port}"
          + (f" ({receivers} receiver processes)" if receivers > 1 else ""), flush=True)
    if ready is not None:
        ready.set()
    stop.wait()
    log.info("stopping: finishing open associations")
    if web is not None:
        web.stop()
    scp.stop()
    scheduler.shutdown(wait=True)
    for worker in workers:
        worker.join(timeout=60)
    parts.engine.dispose()
    return 0
