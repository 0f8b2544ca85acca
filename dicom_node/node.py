"""Wiring: settings -> database, file store, ingestor, pipeline workers, linkage engine, logging.
`serve` (dicom_node.serve) puts them together with the listener."""

from __future__ import annotations

import logging
import threading
import traceback
from dataclasses import dataclass

from pynetdicom import _config as pynetdicom_config
from sqlalchemy import Engine

from db.engine import make_engine
from db.migrate import upgrade
from db.store import IdentityStore
from dicom_node.config import Settings
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


def build(settings: Settings, migrate: bool = True, partial_dir: str | None = None) -> Components:
    """`partial_dir`: where this process writes files in progress (default: the node's own,
    `Settings.partial_dir`)."""
    engine = make_engine(settings.database_url, settings.database.sqlite_synchronous)
    if migrate:
        upgrade(engine)
    store = IdentityStore(engine)
    files = FileStore(settings.storage_dir, fsync=settings.storage.fsync,
                      min_free_bytes=settings.storage.min_free_bytes,
                      partial_dir=partial_dir or settings.partial_dir)
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
    pynetdicom_verbose = settings.node.log_phi and settings.node.log_level == "DEBUG"
    pynetdicom_log.setLevel(logging.DEBUG if pynetdicom_verbose else logging.WARNING)
    # Its standard handlers of every PDU and DIMSE message format INFO/DEBUG lines (and copy each
    # received data set to see that it is not empty) even when nothing is logged: about 4 % of the
    # interpreter's time per C-STORE (py-spy). Bound per association: applies to those made after.
    pynetdicom_config.LOG_HANDLER_LEVEL = "standard" if pynetdicom_verbose else "none"
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
