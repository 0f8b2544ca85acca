"""Wiring: settings -> database, file store, ingestor, listener, scheduler."""

from __future__ import annotations

import logging
import signal
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from db.accounts import AccountStore
from db.engine import make_engine
from db.migrate import upgrade
from db.store import IdentityStore
from dicom_node.config import ConfigError, Settings, load_settings
from dicom_node.filestore import FileStore
from dicom_node.framing import Limits
from dicom_node.ingest import Ingestor

log = logging.getLogger("dicom_node")


@dataclass
class Components:
    engine: Engine
    store: IdentityStore
    files: FileStore
    ingestor: Ingestor


def build(settings: Settings, migrate: bool = True) -> Components:
    engine = make_engine(settings.database_url, settings.database.sqlite_synchronous)
    if migrate:
        upgrade(engine)
    store = IdentityStore(engine)
    files = FileStore(settings.storage_dir, fsync=settings.storage.fsync,
                      min_free_bytes=settings.storage.min_free_bytes)
    node = settings.node
    limits = Limits(node.max_dataset_bytes, node.max_dataset_elements, node.max_sequence_depth)
    ingestor = Ingestor(files, store, settings.storage.duplicate_policy, node.log_phi, limits)
    return Components(engine, store, files, ingestor)


def make_linker(settings: Settings, engine: Engine):
    """The linkage engine, or None when linkage is off."""
    if not settings.linkage.enabled:
        return None
    from db.links import LinkStore
    from linkage.engine import LinkageEngine
    series = StoredSeriesFiles(IdentityStore(engine), settings.storage_dir)
    return LinkageEngine.from_settings(LinkStore(engine), settings, series.images, series.fingerprint)


class StoredSeriesFiles:
    """A stored series' files as geometric verification reads them (linkage's I/O edge)."""

    def __init__(self, store: IdentityStore, storage_dir) -> None:
        self.store, self.storage_dir = store, storage_dir

    def images(self, series_pk: int) -> list:
        """The series' 2D images through the pipeline's loader."""
        from models.inference.loading import load_series
        found = self.store.series_files(series_pk)
        return load_series([self.storage_dir / p for p in found[1]]).images if found and found[1] else []

    def fingerprint(self, series_pk: int) -> str | None:
        """Changes when an instance is added to the series or a file is replaced (path, size, mtime), so
        kept verification features of the old files are not used; None for a series without files."""
        import hashlib
        found = self.store.series_files(series_pk)
        if not found or not found[1]:
            return None
        digest = hashlib.sha256()
        for relative in found[1]:
            stat = (self.storage_dir / relative).stat()
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def make_worker(settings: Settings, engine: Engine, linker=None):
    """A pipeline worker; loads the models (torch is imported only here)."""
    import torch

    from db.queue import WorkQueue
    from dicom_node.worker import RetryPolicy, Worker
    from models.inference.pipeline import SeriesPipeline

    pipeline_settings = settings.pipeline
    torch.set_num_threads(pipeline_settings.torch_threads)
    pipeline = SeriesPipeline(pipeline_settings, settings.resolve(pipeline_settings.weights_dir))
    retry = RetryPolicy(pipeline_settings.max_attempts, pipeline_settings.retry_base_delay_s)
    return Worker(WorkQueue(engine, pipeline_settings.lease_s), pipeline, settings.storage_dir, retry,
                  pipeline_settings.batch_size, linker)


def start_workers(settings: Settings, engine: Engine, stop: threading.Event) -> list[threading.Thread]:
    """Pipeline workers inside `serve`. Models load in the worker thread, so the
    DICOM listener answers at once."""

    if engine.dialect.name == "sqlite":
        from db.queue import WorkQueue

        # A series claimed on its last attempt fails instead of coming back: the stop may have been
        # a crash on it. (Errors raised in Python, Rust panics included, never stop a worker.)
        released = WorkQueue(engine).release_claims(settings.pipeline.max_attempts)
        if released:
            log.info("%d series claimed before the last stop were put back in the queue", released)

    linker_ready = threading.Lock()
    shared: dict = {}

    def run() -> None:
        try:
            with linker_ready:      # one linkage engine (and candidate index) for all worker threads
                if "linker" not in shared:
                    shared["linker"] = make_linker(settings, engine)
            worker = make_worker(settings, engine, shared["linker"])
        except Exception:
            log.exception("pipeline could not start; series stay queued")
            return
        worker.run_forever(stop)

    threads = [threading.Thread(target=run, name=f"pipeline-{n}", daemon=True)
               for n in range(settings.pipeline.workers if settings.pipeline.enabled else 0)]
    for thread in threads:
        thread.start()
    return threads


def _one_line_for_pynetdicom_threads(args) -> None:
    """threading.excepthook: a peer's malformed PDU can make one of pynetdicom's reader threads
    raise (e.g. a command set without Command Field). pynetdicom then ends that association by
    itself; logging one line instead of a traceback per fuzzed PDU keeps the log readable."""
    frames = traceback.extract_tb(args.exc_traceback)
    if any("/pynetdicom/" in frame.filename for frame in frames[-3:]):
        log.warning("association dropped: what the peer sent made pynetdicom fail (%s: %s)",
                    args.exc_type.__name__, " ".join(str(args.exc_value).split())[:200])
        return
    threading.__excepthook__(args)


def _pynetdicom_without_traceback(record: logging.LogRecord) -> bool:
    if record.name.startswith("pynetdicom"):
        record.exc_info, record.exc_text = None, None
    return True


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.node.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pynetdicom's own INFO/DEBUG output can dump identifiers from requests.
    pynetdicom_log = logging.getLogger("pynetdicom")
    pynetdicom_log.setLevel(
        logging.DEBUG if settings.node.log_phi and settings.node.log_level == "DEBUG" else logging.WARNING)
    # It logs a traceback for every PDU it cannot decode: a port scanner or fuzzer would fill
    # the disk. Its one-line message says what happened. (A handler filter: a logger's own
    # filters do not apply to its children's records.)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_pynetdicom_without_traceback)
    threading.excepthook = _one_line_for_pynetdicom_threads
    # Libraries' start-up chatter (faiss's loader tries each CPU build in turn, Alembic names its
    # SQL dialect) is not news to an operator; their warnings still show.
    for name in ("apscheduler", "faiss.loader", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


# Seconds between two looks at the config file's modification time while `serve` runs.
CONFIG_POLL_S = 2.0


def _needs_restart(running: Settings, new: Settings) -> list[str]:
    """The sections of `new` that differ from those in force and are read only at start-up."""
    changed = [name for name in Settings.model_fields
               if name not in ("security", "base_dir") and getattr(running, name) != getattr(new, name)]
    return changed + (["security.tls"] if running.security.tls != new.security.tls else [])


class AllowListReloader:
    """Puts a new `[[security.peers]]` / `security.require_known_ae` in force while `serve` runs.

    A new sender should not need a restart, which would drop every open association. The
    config file is re-read on SIGHUP and when its modification time or size changes, and is
    validated as at start-up (host names resolved again); a file that fails keeps the allow-list
    in force. Only the allow-list is taken: other settings need a restart, and a change to them
    is logged as not applied.
    """

    def __init__(self, scp, settings: Settings, path: Path | None, poll_s: float = CONFIG_POLL_S) -> None:
        self.scp, self.running, self.poll_s = scp, settings, poll_s
        self.path = path.resolve() if path is not None else None
        self.requested = threading.Event()
        self.seen = self._signature()

    def _signature(self) -> tuple[int, int, int] | None:
        # Size and inode too: an editor that saves by renaming, or a rewrite within the file
        # system's timestamp granularity, still shows up.
        try:
            stat = self.path.stat() if self.path is not None else None
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino) if stat else None

    def request(self) -> None:
        """SIGHUP: only sets an event; the watcher thread reads the file (and may resolve host
        names), not the signal handler."""
        self.requested.set()

    def reload(self, why: str) -> bool:
        if self.path is None:
            log.warning("%s: serve was started without a config file, so there is no allow-list to reload", why)
            return False
        # Taken before reading: a write that lands while the file is read is seen at the next look.
        self.seen = self._signature()
        try:
            new = load_settings(self.path)
            policy = self.scp.reload_policy(new.security)
        except (ConfigError, OSError, ValueError) as error:
            log.error("%s: %s not reloaded; the allow-list in force stays: %s", why, self.path.name, error)
            return False
        security = self.running.security.model_copy(
            update={"peers": new.security.peers, "require_known_ae": new.security.require_known_ae})
        self.running = self.running.model_copy(update={"security": security})
        titles = sorted(policy.rules)
        log.info("%s: allow-list reloaded from %s: %d peers now allowed (%s)%s", why, self.path,
                 len(new.security.peers), ", ".join(titles) or "none",
                 "" if policy.require_known_ae else "; require_known_ae = false: any calling AE title is admitted")
        restart = _needs_restart(self.running, new)
        if restart:
            log.warning("%s: changes to %s are not applied: only [[security.peers]] and security.require_known_ae "
                        "are reloaded, other settings need a restart", why, ", ".join(f"[{name}]" for name in restart))
        return True

    def watch(self, stop: threading.Event) -> threading.Thread:
        def run() -> None:
            while not stop.is_set():
                try:
                    if self.requested.wait(self.poll_s):
                        self.requested.clear()
                        if not stop.is_set():
                            self.reload("SIGHUP")
                    elif self.path is not None and self._signature() != self.seen:
                        self.reload(f"{self.path.name} changed")
                except Exception:       # the watcher must outlive any one bad reload
                    log.exception("reloading the allow-list failed; the allow-list in force stays")

        thread = threading.Thread(target=run, name="config-watch", daemon=True)
        thread.start()
        return thread


def serve(settings: Settings, ready: threading.Event | None = None, config_path: Path | None = None) -> int:
    """Migrate, start the listener and the scheduler, run until SIGINT/SIGTERM.

    `config_path`: the file `settings` came from; its allow-list is reloaded on SIGHUP and when
    the file changes (`AllowListReloader`)."""
    from dicom_node.scheduler import mark_quiet_series_stable, start_scheduler
    from dicom_node.scp import StorageSCP

    parts = build(settings)
    stray = parts.files.clear_partial_writes()
    if stray:
        log.info("removed %d partial writes left by an earlier stop (none was acknowledged)", stray)
    mark_quiet_series_stable(parts.store, settings.series.stable_after_s)
    scp = StorageSCP(settings, parts.ingestor)
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
    print(f"dicom-node {settings.node.ae_title} listening on {settings.node.host}:{scp.port}", flush=True)
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
