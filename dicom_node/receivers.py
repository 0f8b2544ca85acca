"""Receiver processes: `node.receivers` interpreters accept DICOM associations on one port.

pynetdicom handles PDUs, and the node parses and indexes instances, in Python: one process uses
one core however many associations it serves. With SO_REUSEPORT each receiver process binds the
node's port and the kernel spreads new connections over them, so ingest scales with cores while
`serve` keeps one scheduler, one pipeline and one web server.

`ReceiverPool` (in `serve`) starts the receivers (multiprocessing "spawn": no threads or model
state are copied), waits until each one listens, restarts one that dies (logged) and, on
shutdown, stops them all; each stops accepting at once and lets its open associations finish.
A receiver dies with `serve` (PR_SET_PDEATHSIG, and a check of its parent), so a killed node
leaves no listener behind on its port. `node.max_associations` stays a node-wide limit (`SharedSlots`).
The durability promise is the single-process one: each receiver acknowledges an instance only
after its file and directory are fsynced and its row is committed (SQLite queues writers on
its lock with BEGIN IMMEDIATE and busy_timeout; PostgreSQL takes them concurrently).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

from dicom_node.config import SecuritySettings, Settings, settings_from_dict
from dicom_node.filestore import FileStore
from dicom_node.security import AccessPolicy

log = logging.getLogger("dicom_node.receivers")
_PR_SET_PDEATHSIG = 1


def receiver_count(settings: Settings) -> int:
    """`node.receivers`, 0 meaning one per core; one where the port is chosen by the system (0)."""
    if settings.node.port == 0:
        return 1
    return settings.node.receivers or os.cpu_count() or 1


class SharedSlots:
    """Associations held per receiver, in shared memory, so `max_associations` holds node-wide.

    A per-receiver count (not one total) lets the pool zero what a dead receiver held."""

    def __init__(self, context, receivers: int, limit: int) -> None:
        self.limit = limit
        self.lock = context.Lock()
        self.held = context.Array("i", receivers, lock=False)
        self.index = 0              # set in each receiver process

    def take(self) -> bool:
        with self.lock:
            if sum(self.held) >= self.limit:
                return False
            self.held[self.index] += 1
            return True

    def give(self) -> None:
        with self.lock:
            self.held[self.index] = max(0, self.held[self.index] - 1)

    def reset(self, index: int) -> None:
        with self.lock:
            self.held[index] = 0


def partial_dir(settings: Settings, index: int) -> str:
    """A receiver's own folder for writes in progress, so that a restart can clear what it left."""
    return f"{settings.partial_dir}/receiver-{index}"


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when `serve` dies. `serve` stops its receivers in order itself
    (SIGTERM); if it is killed, the node has crashed and its receivers go with it, as one process
    would: what they acknowledged is durable, what they had not, their senders still own."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass        # elsewhere the parent check in `receiver_main` does it, within a second


def receiver_main(data: dict, base_dir: str, config_path: str | None, index: int, slots: SharedSlots,
                  ready) -> None:
    """One receiver process: the node's listener with SO_REUSEPORT, until SIGTERM or its parent dies."""
    _die_with_parent()
    parent = os.getppid()
    settings = settings_from_dict(data, Path(base_dir))
    from dicom_node.node import build, configure_logging
    from dicom_node.reload import AllowListReloader
    from dicom_node.scp import StorageSCP

    configure_logging(settings)
    for handler in logging.getLogger().handlers:    # which receiver said it
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [receiver {index}] %(name)s: %(message)s"))
    slots.index = index
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # Ctrl-C reaches the pool, which stops us in order
    parts = build(settings, migrate=False, partial_dir=partial_dir(settings, index))
    scp = StorageSCP(settings, parts.ingestor, slots=slots, reuse_port=True)
    scp.start()
    # The pool validates a changed allow-list and sends SIGHUP; the file is not watched here too.
    reloader = AllowListReloader(scp, settings, Path(config_path) if config_path else None, poll_s=None)
    signal.signal(signal.SIGHUP, lambda *_: reloader.request())
    reloader.watch(stop)
    ready.put(index)
    while not stop.wait(1.0):
        if os.getppid() != parent:
            log.warning("receiver %d: serve is gone; stopping", index)
            break
    scp.stop()
    parts.engine.dispose()


class ReceiverPool:
    """The DICOM listener of `serve` as `node.receivers` processes (same interface as StorageSCP:
    start, stop, port, reload_policy)."""

    def __init__(self, settings: Settings, count: int, config_path: Path | None = None) -> None:
        self.settings, self.count = settings, count
        self.config_path = str(config_path.resolve()) if config_path else None
        self.context = multiprocessing.get_context("spawn")
        self.slots = SharedSlots(self.context, count, settings.node.max_associations)
        self.ready = self.context.Queue()
        self.processes: list = [None] * count
        self.stopping = threading.Event()

    @property
    def port(self) -> int:
        return self.settings.node.port

    def _spawn(self, index: int):
        data = self.settings.model_dump(mode="json")
        process = self.context.Process(
            target=receiver_main, name=f"dicom-receiver-{index}", daemon=False,
            args=(data, str(self.settings.base_dir), self.config_path, index, self.slots, self.ready))
        process.start()
        self.processes[index] = process
        log.info("receiver %d started as pid %d", index, process.pid)
        return process

    def _await_ready(self, indices: set[int], timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = set(indices)
        while waiting:
            dead = [i for i in waiting if not self.processes[i].is_alive()]
            if dead:
                raise RuntimeError(f"receiver {dead[0]} exited with {self.processes[dead[0]].exitcode} while starting "
                                   f"(is port {self.port} free? see the lines above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"receivers {sorted(waiting)} did not start within {timeout_s:.0f} s")
            try:
                waiting.discard(self.ready.get(timeout=0.2))
            except Exception:       # queue.Empty: look at the processes again
                pass

    def start(self) -> None:
        for index in range(self.count):
            self._spawn(index)
        try:
            self._await_ready(set(range(self.count)))
        except RuntimeError:
            self.stop(grace_s=5)
            raise
        threading.Thread(target=self._supervise, name="receiver-supervisor", daemon=True).start()
        log.info("%d receiver processes listening on %s:%s", self.count, self.settings.node.host, self.port)

    def _supervise(self) -> None:
        while not self.stopping.wait(1.0):
            for index, process in enumerate(self.processes):
                if process.is_alive() or self.stopping.is_set():
                    continue
                # What it had acknowledged is durable; what it had not, its senders still own.
                log.error("receiver %d (pid %d) exited with %s; starting a new one", index, process.pid,
                          process.exitcode)
                self.slots.reset(index)
                own = FileStore(self.settings.storage_dir, partial_dir=partial_dir(self.settings, index))
                stray = own.clear_partial_writes()
                if stray:
                    log.info("removed %d partial writes of receiver %d (none was acknowledged)", stray, index)
                try:
                    self._spawn(index)
                    self._await_ready({index})
                except RuntimeError as error:
                    log.error("receiver %d could not be restarted: %s", index, error)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p is not None and p.is_alive()]

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM every receiver (each stops accepting, then finishes its open associations within
        its own grace), then wait; a receiver still there after that is killed."""
        self.stopping.set()
        running = [p for p in self.processes if p is not None and p.is_alive()]
        for process in running:
            os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s + 10
        for process in running:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("receiver pid %d did not stop in time; killing it", process.pid)
                process.kill()
                process.join(5)

    def reload_policy(self, security: SecuritySettings) -> AccessPolicy:
        """Validate the new allow-list here (a host that does not resolve raises ValueError and
        nothing changes), then have every receiver re-read it (SIGHUP)."""
        node = self.settings.node
        policy = AccessPolicy(security, node.ae_title if node.check_called_ae_title else None)
        for pid in self.pids():
            os.kill(pid, signal.SIGHUP)
        return policy
