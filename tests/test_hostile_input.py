"""Data sets built to hurt a receiver: each gets a clear status and one log line, and costs bounded memory."""

from __future__ import annotations

import logging
import struct
import time
import zlib

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_node.config import settings_from_dict
from dicom_node.node import build
from dicom_node.statuses import Status
from tests.helpers import corpus_path, dataset_bytes, load_benchmark

fuzz = load_benchmark("fuzz")


@pytest.fixture
def parts(tmp_path):
    settings = settings_from_dict({"database": {"url": f"sqlite:///{tmp_path / 'node.db'}"},
                                   "storage": {"dir": str(tmp_path / "storage"), "fsync": False}})
    built = build(settings)
    yield built
    built.engine.dispose()


def ct_bytes() -> tuple[str, bytes]:
    """A fresh CT_small (new SOP Instance UID, same length) as Explicit VR Little Endian bytes."""
    import random

    seed = next(s for s in fuzz.load_seeds() if s.name == "ct_explicit")
    return fuzz.fresh_instance(seed, random.Random(generate_uid()))


def ingest(parts, data: bytes, instance: str, ts=ExplicitVRLittleEndian):
    return parts.ingestor.ingest(data, ts, sop_class=CTImageStorage, sop_instance=instance, calling_ae="TESTSCU")


@pytest.mark.parametrize("vr", [b"ZZ", b"\x00\x00", b"ob"])
def test_an_unknown_vr_is_refused_as_unparseable_with_one_log_line(parts, caplog, vr):
    instance, data = ct_bytes()
    offset = fuzz.explicit_offsets(data)[5]
    data = data[:offset + 4] + vr + data[offset + 6:]
    with caplog.at_level(logging.WARNING):
        result = ingest(parts, data, instance)
    assert result.status == Status.CANNOT_PARSE and "unknown VR" in result.reason
    assert not any(record.exc_info for record in caplog.records)


@pytest.mark.parametrize("depth, status", [(20, Status.SUCCESS), (200, Status.OUT_OF_RESOURCES),
                                           (5000, Status.OUT_OF_RESOURCES)])
def test_deeply_nested_sequences_are_refused_past_the_limit(parts, caplog, depth, status):
    instance, data = ct_bytes()
    data = fuzz.insert_top_level(data, fuzz.nested_sequences(depth), 0x0009)
    with caplog.at_level(logging.WARNING):
        result = ingest(parts, data, instance)
    assert result.status == status, result.reason
    if status != Status.SUCCESS:
        assert "nested deeper than 32 levels" in result.reason
    assert not any(record.exc_info for record in caplog.records)


def test_a_data_set_with_too_many_elements_is_refused_quickly(parts):
    instance, data = ct_bytes()
    padding = struct.pack("<HH2sH", 0x7FE1, 0x1010, b"LO", 0) * 1_100_000
    started = time.monotonic()
    result = ingest(parts, data + padding, instance)
    assert result.status == Status.OUT_OF_RESOURCES and "more than 1000000 elements" in result.reason
    assert time.monotonic() - started < 10


def test_a_ct_cut_exactly_before_its_pixel_data_is_refused(parts):
    instance, data = ct_bytes()
    result = ingest(parts, data[:fuzz.pixel_data_offset(data)], instance)
    assert result.status == Status.SOP_CLASS_MISMATCH and "no Pixel Data" in result.reason


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"])
def test_uncompressed_pixels_declared_as_compressed_are_refused(parts, ts):
    instance, data = ct_bytes()
    result = ingest(parts, data, instance, ts)
    assert result.status == Status.CANNOT_PARSE and "not encapsulated" in result.reason


def test_encapsulated_pixels_under_a_native_transfer_syntax_or_without_fragments_are_refused(parts):
    path = corpus_path("rle")
    header = pydicom.dcmread(path, stop_before_pixels=True)
    data = dataset_bytes(path)
    as_native = parts.ingestor.ingest(data, ExplicitVRLittleEndian, sop_class=header.SOPClassUID,
                                      sop_instance=header.SOPInstanceUID)
    assert as_native.status == Status.CANNOT_PARSE and "is native" in as_native.reason
    pixel = data.index(b"\xe0\x7f\x10\x00")
    only_offset_table = data[:pixel + 12] + struct.pack("<HHI", 0xFFFE, 0xE000, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    empty = parts.ingestor.ingest(only_offset_table, header.file_meta.TransferSyntaxUID,
                                  sop_class=header.SOPClassUID, sop_instance=header.SOPInstanceUID)
    assert empty.status == Status.CANNOT_PARSE and "no fragments" in empty.reason


def test_a_deflated_data_set_is_inflated_once_and_stored_as_received(parts):
    path = corpus_path("deflate")
    header = pydicom.dcmread(path, stop_before_pixels=True)
    result = parts.ingestor.ingest_file(path)
    assert result.ok, result.reason
    stored = next(parts.files.root.rglob(f"{header.SOPInstanceUID}.dcm"))
    assert dataset_bytes(stored) == dataset_bytes(path)


def deflate_bomb(instance_data: bytes, inflated_bytes: int) -> bytes:
    """A CT header and a private OB element of `inflated_bytes` zeros, deflated (~1000:1)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = instance_data[:fuzz.pixel_data_offset(instance_data)]
    out = [compressor.compress(head + struct.pack("<HH2s2sI", 0x7FE1, 0x0010, b"OB", b"\0\0", inflated_bytes))]
    chunk = bytes(16 << 20)
    for _ in range(inflated_bytes // len(chunk)):
        out.append(compressor.compress(chunk))
    out.append(compressor.flush())
    return b"".join(out)


def peak_kb(pid: int) -> int:
    return fuzz.memory_kb(pid)["VmHWM"]


def test_a_deflate_bomb_is_refused_within_twice_the_size_limit(start_node, tmp_path):
    """1 MB on the wire that inflates to 1 GiB: refused with 0xA700 once inflation passes the
    64 MiB limit; the node's peak memory grows by less than twice that."""
    limit = 64 << 20
    node = start_node(node={"max_dataset_bytes": limit})
    instance, data = ct_bytes()
    bomb = deflate_bomb(data, 1 << 30)
    assert len(bomb) < 1_200_000
    path = tmp_path / "bomb.dcm"
    from dicom_node.ingest import encode_file_meta
    path.write_bytes(b"\0" * 128 + b"DICM" + encode_file_meta(CTImageStorage, instance, DeflatedExplicitVRLittleEndian,
                                                                None) + bomb)
    import pynetdicom._config as pynetdicom_config
    chunked, pynetdicom_config.STORE_SEND_CHUNKED_DATASET = pynetdicom_config.STORE_SEND_CHUNKED_DATASET, True
    try:
        ae = AE(ae_title="PYNETDICOM")
        ae.dimse_timeout = ae.network_timeout = 60
        ae.add_requested_context(CTImageStorage, DeflatedExplicitVRLittleEndian)
        before = peak_kb(node.process.pid)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="LINKNODE")
        started = time.monotonic()
        status = assoc.send_c_store(path)
        seconds = time.monotonic() - started
        assoc.release()
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked
    assert status.Status == 0xA700 and "inflates to more than" in status.ErrorComment
    grown = (peak_kb(node.process.pid) - before) * 1024
    assert grown < 2 * limit, f"peak memory grew by {grown / 2**20:.0f} MiB"
    assert seconds < 10
