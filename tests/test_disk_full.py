"""A full disk: the node answers 0xA700, keeps the association, leaves no partial file, recovers.

Real variants mount a small tmpfs as the storage directory (we run as root;
they skip, naming the reason, where mounting is not permitted):

* ``tmpfs-bytes``: 2 MiB, ``min_free_bytes = 0``: the data blocks run out.
  ``FileStore.check_space`` compares free bytes with the file's exact size
  even with no reserve, and tmpfs counts whole pages, so on this path the
  refusal comes from that check; the kernel's ENOSPC is exercised below.
* ``tmpfs-inodes``: ``min_free_bytes = 0`` and few inodes: the kernel's own
  ENOSPC, raised inside ``FileStore.write`` while ``shutil.disk_usage`` still
  shows plenty of bytes free (the proactive check cannot see inodes).
* ``tmpfs-reserve``: ``min_free_bytes = 1 MiB``: the proactive check refuses
  while the disk still has room.

The simulated variant always runs: an in-process Ingestor with ``os.write``
(or ``os.fsync``) failing with ENOSPC.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from db.engine import make_engine
from db.models import Instance
from dicom_node.config import settings_from_dict
from dicom_node.node import build
from dicom_node.statuses import Status
from tests.helpers import corpus_path, dataset_bytes, node_config

pytestmark = pytest.mark.timeout(120)

FILLER = 512 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    mount_options: str
    min_free_bytes: int
    comment: str  # expected in the ErrorComment of the failure


CASES = [
    Case("tmpfs-bytes", "size=2m", 0, "disk space"),
    # root, storage/, storage/tmp/, filler, study dir, series dir + 5 instance files
    Case("tmpfs-inodes", "size=8m,nr_inodes=11", 0, "No space left on device"),
    Case("tmpfs-reserve", "size=2m", 1024 * 1024, "bytes free"),
]


def make_instances(directory: Path, count: int) -> dict[str, Path]:
    directory.mkdir(exist_ok=True)
    template = pydicom.dcmread(corpus_path("explicit_le"))
    template.StudyInstanceUID, template.SeriesInstanceUID = generate_uid(), generate_uid()
    out = {}
    for number in range(count):
        uid = generate_uid()
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = uid
        template.InstanceNumber = number + 1
        path = directory / f"{number:04d}.dcm"
        template.save_as(path, enforce_file_format=True)
        out[uid] = path
    return out


@pytest.fixture
def tmpfs(request, tmp_path):
    """A freshly mounted tmpfs (options from the Case); unmounted at teardown."""
    case: Case = request.param
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", case.mount_options, "tmpfs", str(mountpoint)],
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({run.stderr.strip() or run.returncode}); "
                    "the simulated ENOSPC variant covers the code path")
    yield case, mountpoint
    if subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


def stored_state(settings) -> tuple[dict[str, Instance], set[str], list[str]]:
    """(DB rows by UID, SOP UIDs of .dcm files in the store, names left under tmp/)."""
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            rows = {r.sop_instance_uid: r for r in conn.execute(
                select(Instance.sop_instance_uid, Instance.path, Instance.size, Instance.sha256))}
    finally:
        engine.dispose()
    storage = settings.storage_dir
    files = {p.stem for p in storage.rglob("*.dcm") if p.parent.name not in ("tmp", "superseded")}
    partial = [p.name for p in (storage / "tmp").rglob("*") if p.is_file()]
    return rows, files, partial


def assert_intact(settings, rows, sources: dict[str, Path]) -> None:
    for uid, row in rows.items():
        path = settings.storage_dir / row.path
        assert path.is_file(), f"row {uid} points to missing {row.path}"
        assert path.stat().st_size == row.size, f"{row.path}: short file"
        data = dataset_bytes(path)
        assert data == dataset_bytes(sources[uid]), f"{row.path}: data set differs from the one sent"
        assert hashlib.sha256(data).hexdigest() == row.sha256


@pytest.mark.parametrize("tmpfs, receivers",
                         [(c, 1) for c in CASES] + [(CASES[0], 2)],     # two receiver processes: one case
                         ids=[c.name for c in CASES] + [f"{CASES[0].name}-2-receivers"], indirect=["tmpfs"])
def test_disk_full_on_tmpfs(tmpfs, start_node, tmp_path, receivers):
    case, mount = tmpfs
    filler = mount / "filler.bin"
    filler.write_bytes(b"\0" * FILLER)
    sources = make_instances(tmp_path / "outbox", 60)
    node = start_node(storage={"dir": str(mount / "storage"), "min_free_bytes": case.min_free_bytes},
                      node={"receivers": receivers})
    settings = node.settings

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 20
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LINKNODE")
    assert assoc.is_established, node.log()
    try:
        acked: list[str] = []
        failed_uid, failure = None, None
        for uid, path in sources.items():
            status = assoc.send_c_store(path)
            assert status and "Status" in status, f"no C-STORE response for {uid}\n{node.log()}"
            if status.Status == 0x0000:
                acked.append(uid)
                continue
            failed_uid, failure = uid, status
            break
        context = (f"\ncase {case.name}: {len(acked)} stored, df: {shutil.disk_usage(mount)}"
                   f"\n--- node log ---\n{node.log()[-4000:]}")
        assert failure is not None, f"the disk never filled{context}"
        assert failure.Status == Status.OUT_OF_RESOURCES, f"0x{failure.Status:04X}{context}"
        comment = str(failure.get("ErrorComment", ""))
        print(f"{case.name}: after {len(acked)} stored: 0x{failure.Status:04X} {comment!r}")
        assert case.comment in comment, f"ErrorComment {comment!r}{context}"
        assert acked, f"nothing could be stored before the disk filled{context}"
        if case.min_free_bytes:
            # Refused by the reserve, not because the bytes did not fit.
            assert shutil.disk_usage(mount).free > sources[failed_uid].stat().st_size, context

        # The association goes on.
        echo = assoc.send_c_echo()
        assert echo and echo.Status == 0x0000, f"C-ECHO after 0xA700: {echo}{context}"

        rows, files, partial = stored_state(settings)
        assert not partial, f"partial files left under tmp/: {partial}{context}"
        assert set(rows) == set(acked), f"DB {len(rows)} rows vs {len(acked)} acknowledged{context}"
        assert files == set(acked), f"files of unacknowledged instances: {files - set(acked)}{context}"
        assert failed_uid not in files
        assert_intact(settings, rows, sources)

        # Free space; the very next C-STORE succeeds, no restart.
        filler.unlink()
        status = assoc.send_c_store(sources[failed_uid])
        assert status and status.Status == 0x0000, f"after freeing space: {status}\n{node.log()[-4000:]}"
        acked.append(failed_uid)
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()

    rows, files, partial = stored_state(settings)
    assert not partial and set(rows) == files == set(acked)
    assert_intact(settings, rows, sources)
    assert node.process.poll() is None, node.log()


# ----- simulated: no mount needed -------------------------------------------------------

@pytest.mark.parametrize("call", ["write", "fsync"])
def test_simulated_enospc_in_process(tmp_path, monkeypatch, call):
    settings = settings_from_dict(node_config(tmp_path, storage={"min_free_bytes": 0}), base_dir=tmp_path)
    parts = build(settings)
    source = corpus_path("explicit_le")
    data = dataset_bytes(source)
    header = pydicom.dcmread(source, stop_before_pixels=True)
    uid = str(header.SOPInstanceUID)
    storage = str(settings.storage_dir.resolve())
    real = getattr(os, call)
    calls = []

    def failing(fd, *args):
        # Only the node's storage files fail; anything else (pytest, logging) works.
        if os.readlink(f"/proc/self/fd/{fd}").startswith(storage):
            calls.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, *args)

    def ingest():
        return parts.ingestor.ingest(data, ExplicitVRLittleEndian, sop_class=str(header.SOPClassUID),
                                     sop_instance=uid, calling_ae="TESTSCU")

    try:
        with monkeypatch.context() as patch:
            patch.setattr(os, call, failing)
            result = ingest()
        assert calls, f"os.{call} was never called on a storage file"
        assert result.status == Status.OUT_OF_RESOURCES, result
        assert "disk space" in result.reason, result.reason
        leftovers = [p for p in settings.storage_dir.rglob("*") if p.is_file()]
        assert not leftovers, f"files left after ENOSPC: {leftovers}"
        assert parts.store.find_instance(uid) is None

        result = ingest()
        assert result.ok and not result.duplicate, result
        row = parts.store.find_instance(uid)
        assert row is not None
        stored = settings.storage_dir / row.path
        assert dataset_bytes(stored) == data
        assert row.sha256 == hashlib.sha256(data).hexdigest()
        assert not [p for p in (settings.storage_dir / "tmp").rglob("*") if p.is_file()]
    finally:
        parts.engine.dispose()
