"""kill -9 in the middle of a transfer: nothing acknowledged is lost, nothing indexed is half-written.

A real `dicom-node serve` subprocess receives distinct copies of CT_small.dcm
from a pynetdicom SCU (one association, in a background thread); the node is
SIGKILLed after some acknowledgements, restarted on the same config, and the
database and storage tree are checked against what the sender was told.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import func, select

from db.engine import make_engine
from db.models import Instance, Series
from tests.helpers import RunningNode, corpus_path, dataset_bytes

pytestmark = pytest.mark.timeout(180)

TOTAL = 200
KILL_AFTER = (40, 110)  # cumulative acknowledgements at each kill -9


@dataclass
class Sent:
    path: Path
    data: bytes  # the encoded data set exactly as sent (file meta excluded)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def make_instances(directory: Path, count: int) -> dict[str, Sent]:
    """`count` distinct instances: CT_small.dcm with new UIDs, in three series of one study."""
    directory.mkdir()
    template = pydicom.dcmread(corpus_path("explicit_le"))
    study, series = generate_uid(), [generate_uid() for _ in range(3)]
    out = {}
    for number in range(count):
        uid = generate_uid()
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = uid
        template.StudyInstanceUID = study
        template.SeriesInstanceUID = series[number % 3]
        template.InstanceNumber = number + 1
        path = directory / f"{number:04d}.dcm"
        template.save_as(path, enforce_file_format=True)
        out[uid] = Sent(path, dataset_bytes(path))
    return out


@dataclass
class Transfer:
    """One association sending instances in order; records what the node acknowledged."""

    port: int
    items: list[tuple[str, Sent]]
    acked: list[str] = field(default_factory=list)
    attempted: list[str] = field(default_factory=list)
    other: dict[str, int] = field(default_factory=dict)  # uid -> non-success status
    error: BaseException | None = None
    established: bool = False

    def run(self) -> None:
        try:
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)  # bytes go out unchanged
            ae.add_requested_context(Verification)
            ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 20
            assoc = ae.associate("127.0.0.1", self.port, ae_title="LINKNODE")
            self.established = assoc.is_established
            if not assoc.is_established:
                return
            for uid, sent in self.items:
                if not assoc.is_established:
                    break
                self.attempted.append(uid)
                status = assoc.send_c_store(sent.path)
                if not (status and "Status" in status):
                    break  # no response: the association died with this request in flight
                if status.Status == 0x0000:
                    self.acked.append(uid)
                else:
                    self.other[uid] = status.Status
            if assoc.is_established:
                assoc.release()
        except BaseException as error:  # noqa: BLE001 - re-raised in the test thread
            self.error = error

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread


def wait_for(predicate, timeout: float, what: str, node: RunningNode) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n--- node log ---\n{node.log()}")
        time.sleep(0.005)


def db_rows(url: str) -> dict[str, Instance]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Instance.sop_instance_uid, Instance.path, Instance.size,
                                       Instance.sha256)).all()
            counted = conn.execute(select(func.coalesce(func.sum(Series.instance_count), 0))).scalar()
    finally:
        engine.dispose()
    assert counted == len(rows), f"series.instance_count sums to {counted}, instance table has {len(rows)}"
    return {row.sop_instance_uid: row for row in rows}


def status_json(node: RunningNode) -> dict:
    run = subprocess.run([sys.executable, "-m", "dicom_node", "--config", str(node.config_path), "status",
                          "--json"], capture_output=True, text=True, cwd=node.config_path.parent, timeout=60, check=False)
    assert run.returncode == 0, f"`dicom-node status --json` failed (rc {run.returncode}): {run.stderr}"
    return json.loads(run.stdout)


def check_consistent(node: RunningNode, sent: dict[str, Sent], acked: set[str],
                     unacked_attempts: set[str]) -> dict[str, Instance]:
    """The invariants after a crash and restart; returns the DB rows."""
    settings = node.settings
    storage = settings.storage_dir
    context = f"\n--- node log ---\n{node.log()[-6000:]}"

    leftovers = sorted(p.name for p in (storage / "tmp").rglob("*") if p.is_file())
    assert not leftovers, f"partial writes survived restart under tmp/: {leftovers}{context}"

    rows = db_rows(settings.database_url)

    lost = acked - rows.keys()
    assert not lost, f"{len(lost)} acknowledged instances missing from the database: {sorted(lost)[:5]}{context}"
    unknown = rows.keys() - sent.keys()
    assert not unknown, f"rows for instances never sent: {sorted(unknown)[:5]}"
    extra = rows.keys() - acked
    # Stored and committed but the response was lost with the process: only an in-flight request.
    assert extra <= unacked_attempts, f"rows for instances never attempted: {sorted(extra - unacked_attempts)}"

    for uid, row in rows.items():
        path = storage / row.path
        assert path.is_file(), f"row {uid} points to missing file {row.path}{context}"
        raw = path.read_bytes()
        assert len(raw) == row.size, f"{row.path}: {len(raw)} bytes on disk, row says {row.size}{context}"
        data = dataset_bytes(path)
        assert hashlib.sha256(data).hexdigest() == row.sha256 == sent[uid].sha256, f"{row.path}: sha256 mismatch"
        assert data == sent[uid].data, f"{row.path}: stored data set differs from the one sent"
        meta = pydicom.dcmread(path, stop_before_pixels=True)
        assert meta.file_meta.MediaStorageSOPInstanceUID == uid

    indexed = {(storage / row.path).resolve() for row in rows.values()}
    for path in storage.rglob("*.dcm"):
        if path.parent.name in ("tmp", "superseded") or path.resolve() in indexed:
            continue
        # A file renamed into place whose row was never committed: allowed only if never acknowledged.
        uid = path.stem
        assert uid in sent, f"unexpected file in storage: {path}"
        assert uid not in acked, f"acknowledged {uid} has a file but no row{context}"
        assert uid in unacked_attempts, f"file for {uid}, which was never sent: {path}"
    return rows


def restart(node: RunningNode, round_number: int) -> None:
    """Start again on the same config path (same database, same storage).

    The killed run's log is moved aside first: RunningNode.start appends to the
    same log file and wait_ready looks for "listening on" anywhere in it, so the
    old run's line would make the new process look ready before it has even
    cleaned up tmp/.
    """
    node.log_path.rename(node.log_path.with_name(f"{node.log_path.stem}.killed-{round_number}.log"))
    node.start()


def crash_during_transfer(node: RunningNode, items: list[tuple[str, Sent]], kill_after: int) -> Transfer:
    transfer = Transfer(node.port, items)
    thread = transfer.start()
    wait_for(lambda: len(transfer.acked) >= kill_after or not thread.is_alive(), 60,
             f"{kill_after} acknowledgements", node)
    # Land the kill at a varying point inside the next instance's header check / write / commit.
    time.sleep(random.uniform(0, 0.04))
    node.kill()
    thread.join(30)
    assert not thread.is_alive(), "sender still running 30 s after the node was killed"
    if transfer.error:
        raise transfer.error
    assert transfer.established, f"association refused\n{node.log()}"
    assert not transfer.other, f"non-success statuses before the kill: {transfer.other}\n{node.log()}"
    assert len(transfer.acked) < len(items), (
        f"all {len(items)} instances were acknowledged before the kill landed; the crash hit nothing")
    return transfer


def test_kill_9_mid_transfer_loses_nothing_acknowledged(start_node, db_url, tmp_path):
    kill_9_rounds(start_node, db_url, tmp_path, receivers=1)


def test_kill_9_with_receiver_processes_loses_nothing_acknowledged(start_node, tmp_path):
    """The same with two receiver processes, which die with `serve` (SQLite: writers from two processes)."""
    kill_9_rounds(start_node, f"sqlite:///{tmp_path / 'node.db'}", tmp_path, receivers=2, kill_after=KILL_AFTER[:1],
                  total=80)


def kill_9_rounds(start_node, db_url: str, tmp_path, receivers: int, kill_after=KILL_AFTER, total=TOTAL) -> None:
    """kill -9 of `serve` mid-transfer at each of `kill_after` acknowledgements; restart each time;
    re-send what was not acknowledged."""
    sent = make_instances(tmp_path / "outbox", total)
    items = list(sent.items())
    node = start_node(db_url=db_url, storage={"min_free_bytes": 0}, node={"receivers": receivers})

    acked: set[str] = set()
    unacked_attempts: set[str] = set()
    remaining = items
    for round_number, acks in enumerate(kill_after, 1):
        transfer = crash_during_transfer(node, remaining, acks - len(acked))
        acked |= set(transfer.acked)
        unacked_attempts |= set(transfer.attempted) - set(transfer.acked)
        # With one association and synchronous C-STORE, at most one request is in flight.
        assert len(set(transfer.attempted) - set(transfer.acked)) <= 1, transfer.attempted[-3:]

        real_leftovers = sorted(p.name for p in (node.storage / "tmp").rglob("*") if p.is_file())
        print(f"round {round_number}: killed after {len(transfer.acked)} acks of this association, "
              f"in flight {transfer.attempted[len(transfer.acked):]}, tmp/ before restart {real_leftovers}")
        # A stray partial write as a crash in os.write would leave it: start-up must remove it.
        (node.storage / node.settings.partial_dir / f"crash-round-{round_number}.part").write_bytes(b"\0" * 1000)
        restart(node, round_number)
        check_consistent(node, sent, acked, unacked_attempts)
        remaining = [(uid, s) for uid, s in items if uid not in acked]

    # The sender re-sends everything it was not told was stored; the node takes it all.
    transfer = Transfer(node.port, remaining)
    transfer.run()
    if transfer.error:
        raise transfer.error
    assert not transfer.other, f"re-send refused: {transfer.other}\n{node.log()}"
    assert len(transfer.acked) == len(remaining)
    acked |= set(transfer.acked)
    assert acked == sent.keys()
    rows = check_consistent(node, sent, acked, set())
    assert rows.keys() == sent.keys()

    # The operator's view agrees with the instance table.
    status = status_json(node)
    assert status["instances"] == len(sent), status
    assert status["bytes"] == sum(row.size for row in rows.values()), status
