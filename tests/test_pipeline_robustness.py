"""Malformed instances found by fuzzing: they fail their series at once, with a reason, and never
stop the pipeline worker (a Rust panic in a decoder plugin included)."""

from __future__ import annotations

import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.uid import RLELossless, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.engine import make_engine
from db.migrate import upgrade
from db.models import Series, SeriesState
from db.queue import WorkQueue
from db.records import RouteDecision
from db.store import IdentityStore, utcnow
from dicom_node.config import PipelineSettings, settings_from_dict
from dicom_node.worker import RetryPolicy, Worker
from models.inference.errors import SeriesError
from models.inference.loading import load_series
from tests.helpers import TEST_FILES, node_config
from tests.test_store import received

WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights"
DECISION = RouteDecision("chest_ct", 0.99, "header")

# Where one flipped bit makes pylibjpeg-rle 2.2 panic, found by flipping every bit of the frame
# below in turn: byte 64 of the frame is the first control byte of segment 1 (the high bytes of
# the 16-bit pixels), 0xF1 = "repeat the next byte 16 times"; bit 4 makes it 0xE1 = "32 times",
# and the decoder writes past its 512-byte frame buffer: "index out of bounds: the len is 512 but
# the index is 512", raised as pyo3_runtime.PanicException (a BaseException, not an Exception).
PANIC_BYTE, PANIC_BIT, PANIC_BYTE_BEFORE = 64, 4, 0xF1


def rle_dataset(corrupt: bool = False) -> Dataset:
    """A 16x16 12-bit MONOCHROME2 Secondary Capture, RLE Lossless (pydicom's own encoder, so
    the bytes are fixed); with `corrupt`, the one bit flipped that makes the decoder panic."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "OT", "FUZZ1"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 13) % 4096
    ds.compress(RLELossless, pixels, encoding_plugin="pydicom")
    if corrupt:
        data = bytearray(ds.PixelData)
        at = bytes(data).index(next(generate_frames(ds.PixelData))) + PANIC_BYTE
        assert data[at] == PANIC_BYTE_BEFORE, "the encoder's output changed: find the panicking bit again"
        data[at] ^= 1 << PANIC_BIT
        ds.PixelData = bytes(data)
    return ds


def write_panicking_rle(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rle_dataset(corrupt=True).save_as(path, enforce_file_format=True)
    return path


def write_flipped_vr(path: Path) -> Path:
    """CT_small.dcm with one bit flipped in the VR of Photometric Interpretation ("CS" -> "CQ"):
    pydicom reads the file but raises NotImplementedError ("Unknown Value Representation")
    when the element is used."""
    data = bytearray((TEST_FILES / "CT_small.dcm").read_bytes())
    at = bytes(data).index(b"\x28\x00\x04\x00CS") + 5
    data[at] ^= 0x02
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def panic_type() -> type[BaseException]:
    """pyo3_runtime.PanicException, as the real decoder raises it."""
    from rle.utils import decode_pixel_data

    ds = rle_dataset(corrupt=True)
    try:
        decode_pixel_data(next(generate_frames(ds.PixelData)), ds)
    except Exception as error:  # noqa: BLE001 - the precondition test says what went wrong
        pytest.fail(f"pylibjpeg-rle raised an Exception, not a panic: {error!r}")
    except BaseException as error:  # noqa: BLE001 - the panic is what we want
        return type(error)
    pytest.fail("pylibjpeg-rle decoded the corrupted frame: find the panicking bit again")


# ---------------------------------------------------------------- the decoder panic, for real

def test_the_flipped_rle_frame_makes_pylibjpeg_rle_panic(tmp_path):
    panic = panic_type()
    assert panic.__name__ == "PanicException" and not issubclass(panic, Exception)
    assert pydicom.dcmread(write_panicking_rle(tmp_path / "a.dcm")).file_meta.TransferSyntaxUID == RLELossless
    good = rle_dataset()
    assert good.pixel_array.shape == (16, 16)       # the same file without the flipped bit decodes


def test_a_decoder_panic_is_a_permanent_series_error_with_a_reason(tmp_path):
    path = write_panicking_rle(tmp_path / "poisoned.dcm")
    with pytest.raises(SeriesError) as info:
        load_series([path])
    assert info.value.permanent
    assert "poisoned.dcm: cannot decode pixel data (RLE Lossless)" in info.value.reason
    assert "decoder panicked" in info.value.reason and "index out of bounds" in info.value.reason


def test_malformed_headers_are_permanent_series_errors(tmp_path):
    with pytest.raises(SeriesError, match="Unknown Value Representation 'CQ'") as info:
        load_series([write_flipped_vr(tmp_path / "flipped.dcm")])
    assert info.value.permanent


def test_out_of_memory_while_decoding_is_retried(tmp_path, monkeypatch):
    path = write_panicking_rle(tmp_path / "big.dcm")

    def no_memory(self):
        raise MemoryError()
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(no_memory))
    with pytest.raises(SeriesError, match="out of memory") as info:
        load_series([path])
    assert not info.value.permanent


# ---------------------------------------------------------------- the worker

def series_row(engine, uid: str) -> Series:
    with Session(engine) as session:
        return session.scalars(select(Series).where(Series.series_uid == uid)).one()


def queue_series(store: IdentityStore, storage: Path, series: dict[str, callable]) -> None:
    """One instance per series, written by `series[uid](path)` where the store expects it; all stable."""
    old = utcnow() - timedelta(minutes=5)
    for n, (uid, write) in enumerate(series.items()):
        r = received(f"{uid}.1", series=uid, study=f"8.{n}", at=old + timedelta(seconds=n))
        write(storage / r.stored.path)
        store.record_instance(r)
    store.mark_stable(utcnow())


def copy_of(name: str):
    def write(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(TEST_FILES / name, path))
    return write


def nothing(path: Path) -> None:
    pass


class PanickingPipeline:
    """SeriesPipeline's interface; raises the real pyo3 PanicException on the `poisoned` series."""

    def __init__(self, poisoned: set[str]) -> None:
        self.poisoned, self.panic = poisoned, panic_type()

    def process_batch(self, works, storage_dir):
        return [self.process(work, storage_dir) for work in works]

    def process(self, work, storage_dir):
        if work.series_uid in self.poisoned:
            raise self.panic("index out of bounds: the len is 512 but the index is 512")
        return DECISION, None


def test_a_panic_in_the_pipeline_fails_the_series_at_once_and_the_worker_goes_on(store, tmp_path):
    queue_series(store, tmp_path, {"9.0": nothing, "9.1": nothing, "9.2": nothing})
    worker = Worker(WorkQueue(store.engine), PanickingPipeline({"9.1"}), tmp_path, batch_size=2)
    stats = worker.run_until_idle()
    assert (stats.done, stats.failed, stats.retried) == (2, 1, 0)
    poisoned = series_row(store.engine, "9.1")
    assert poisoned.state == SeriesState.failed and poisoned.attempts == 1
    assert "panicked" in poisoned.last_error and "index out of bounds" in poisoned.last_error
    assert {series_row(store.engine, uid).state for uid in ("9.0", "9.2")} == {SeriesState.done}


def test_a_worker_thread_survives_a_panic(store, tmp_path):
    queue_series(store, tmp_path, {"9.0": nothing, "9.1": nothing})
    worker = Worker(WorkQueue(store.engine), PanickingPipeline({"9.0"}), tmp_path, batch_size=1)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop, 0.05), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and thread.is_alive() \
                and series_row(store.engine, "9.1").state != SeriesState.done:
            time.sleep(0.05)
        assert thread.is_alive()
        assert series_row(store.engine, "9.0").state == SeriesState.failed
        assert series_row(store.engine, "9.1").state == SeriesState.done
    finally:
        stop.set()
        thread.join(10)


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_interrupts_still_stop_the_worker(store, tmp_path, error):
    queue_series(store, tmp_path, {"9.0": nothing})

    class Interrupted(PanickingPipeline):
        def process(self, work, storage_dir):
            raise error()
    with pytest.raises(error):
        Worker(WorkQueue(store.engine), Interrupted(set()), tmp_path).run_until_idle()


def test_unexpected_errors_are_retried_but_panics_are_not(store, tmp_path):
    queue_series(store, tmp_path, {"9.0": nothing})

    class Flaky(PanickingPipeline):
        def process(self, work, storage_dir):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    worker = Worker(WorkQueue(store.engine), Flaky(set()), tmp_path, RetryPolicy(3, 60))
    assert worker.run_until_idle().retried == 1
    row = series_row(store.engine, "9.0")
    assert row.state == SeriesState.stable and row.next_attempt_at is not None and "CUDA error" in row.last_error


# ---------------------------------------------------------------- the real pipeline, end to end

@pytest.fixture(scope="module")
def pipeline():
    from models.inference.pipeline import SeriesPipeline
    return SeriesPipeline(PipelineSettings(device="cpu"), WEIGHTS)


def test_a_malformed_header_fails_after_one_attempt_with_its_reason(store, tmp_path, pipeline):
    queue_series(store, tmp_path, {"9.0": write_flipped_vr, "9.1": copy_of("CT_small.dcm")})
    worker = Worker(WorkQueue(store.engine), pipeline, tmp_path, RetryPolicy(3, 0.0))
    assert worker.run_until_idle().retried == 0
    malformed = series_row(store.engine, "9.0")
    assert (malformed.state, malformed.attempts) == (SeriesState.failed, 1)
    assert "Unknown Value Representation 'CQ'" in malformed.last_error
    assert series_row(store.engine, "9.1").state == SeriesState.done


def test_poisoned_and_malformed_series_fail_once_and_the_good_ones_are_processed(store, tmp_path, pipeline):
    queue_series(store, tmp_path, {"9.0": write_panicking_rle, "9.1": write_flipped_vr,
                                   "9.2": copy_of("CT_small.dcm"), "9.3": copy_of("MR_small_RLE.dcm")})
    worker = Worker(WorkQueue(store.engine), pipeline, tmp_path, RetryPolicy(3, 0.0), batch_size=4)
    stats = worker.run_until_idle()
    assert (stats.done, stats.failed, stats.retried) == (2, 2, 0)
    poisoned, malformed = series_row(store.engine, "9.0"), series_row(store.engine, "9.1")
    assert (poisoned.state, poisoned.attempts) == (SeriesState.failed, 1)
    assert "cannot decode pixel data (RLE Lossless)" in poisoned.last_error
    assert "decoder panicked" in poisoned.last_error
    assert (malformed.state, malformed.attempts) == (SeriesState.failed, 1)
    assert "Unknown Value Representation" in malformed.last_error
    assert {series_row(store.engine, uid).state for uid in ("9.2", "9.3")} == {SeriesState.done}


def test_after_a_restart_the_series_that_killed_the_worker_fails_and_the_others_proceed(tmp_path):
    from dicom_node.node import start_workers

    config = node_config(tmp_path, pipeline={"enabled": True, "workers": 1, "device": "cpu",
                                             "weights_dir": str(WEIGHTS), "retry_base_delay_s": 0.0},
                         linkage={"enabled": False})
    settings = settings_from_dict(config, base_dir=tmp_path)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    queue_series(IdentityStore(engine), settings.storage_dir,
                 {"9.0": write_panicking_rle, "9.1": copy_of("CT_small.dcm"), "9.2": copy_of("MR_small_RLE.dcm")})
    (dead,) = WorkQueue(engine).claim(1)                # the worker that died on it left it processing
    assert dead.series_uid == "9.0" and series_row(engine, "9.0").state == SeriesState.processing

    stop = threading.Event()
    (thread,) = start_workers(settings, engine, stop)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and thread.is_alive():
            states = {series_row(engine, uid).state for uid in ("9.0", "9.1", "9.2")}
            if states <= {SeriesState.done, SeriesState.failed}:
                break
            time.sleep(0.2)
        assert thread.is_alive()
        poisoned = series_row(engine, "9.0")
        assert (poisoned.state, poisoned.attempts) == (SeriesState.failed, 2)
        assert "decoder panicked" in poisoned.last_error
        assert {series_row(engine, uid).state for uid in ("9.1", "9.2")} == {SeriesState.done}
    finally:
        stop.set()
        thread.join(30)
        engine.dispose()
