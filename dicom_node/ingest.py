"""Where a received instance lands: one code path for C-STORE and `dicom-node import`.

    bytes as received -> header check -> durable file (fsync) -> committed row -> status

A success status is returned only after both the file and the row are durable.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import UID
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

import dicom_node
from db.records import Received, StoredFile
from db.store import IdentityStore, utcnow
from dicom_node.filestore import FileStore, OutOfSpace
from dicom_node.framing import Limits
from dicom_node.header import read_header
from dicom_node.part10 import same_content, split_part10
from dicom_node.phi import redact
from dicom_node.statuses import IngestFailure, Status

log = logging.getLogger("dicom_node.ingest")

IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.8.498.1.1.1")  # pydicom's root + node suffix
IMPLEMENTATION_VERSION = f"DICOMNODE_{dicom_node.__version__}"[:16]
_PREAMBLE = b"\x00" * 128 + b"DICM"


@dataclass(frozen=True)
class IngestResult:
    status: Status
    reason: str = ""
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESS


def encode_file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str | None) -> bytes:
    """The File Meta Information group (PS3.10 7.1), Explicit VR Little Endian, as pydicom's
    `write_file_meta_info` writes it byte for byte (tests/test_file_meta.py compares the two).

    Written here because pydicom's writer, with its validation and per-element dispatch, costs
    0.25 ms per instance (about 5 % of the node's CPU per C-STORE); this takes 0.002 ms."""
    body = b"".join([
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(sop_class, b"\x00")),
        _meta_element(0x0003, b"UI", _padded(sop_instance, b"\x00")),
        _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _IMPLEMENTATION,
        *([_meta_element(0x0016, b"AE", _padded(source_ae, b" "))] if source_ae else []),
    ])
    return _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _padded(text: str, pad: bytes) -> bytes:
    # Latin-1 as pydicom's default character repertoire: a UID with other characters raises, as there.
    value = text.encode("latin-1")
    return value + pad if len(value) % 2 else value


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":         # OB: two reserved bytes, then a 32-bit length
        return struct.pack("<HH", 0x0002, element) + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


_IMPLEMENTATION = (_meta_element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00"))
                   + _meta_element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION, b" ")))


class Ingestor:
    """Stores instances durably; safe to call from many association threads."""

    def __init__(self, files: FileStore, store: IdentityStore, duplicate_policy: str = "reject",
                 log_phi: bool = False, limits: Limits = Limits()) -> None:
        self.files = files
        self.store = store
        self.duplicate_policy = duplicate_policy
        self.log_phi = log_phi
        self.limits = limits
        # Striped locks: two associations sending the same SOP Instance UID at
        # once must not interleave check, write and commit.
        self._locks = [threading.Lock() for _ in range(64)]

    def ingest(self, dataset: bytes, transfer_syntax: str, *, sop_class: str | None = None,
               sop_instance: str | None = None, calling_ae: str | None = None) -> IngestResult:
        try:
            return self._ingest(dataset, UID(transfer_syntax), sop_class, sop_instance, calling_ae)
        except IngestFailure as failure:
            log.warning("rejected instance from %s: %s (0x%04X)", calling_ae, failure.reason, failure.status)
            return IngestResult(failure.status, failure.reason)
        except OutOfSpace as error:
            log.error("out of disk space: %s", error)
            return IngestResult(Status.OUT_OF_RESOURCES, f"out of disk space: {error.strerror}")
        except (DBAPIError, SQLAlchemyError) as error:
            log.error("database unavailable: %s", type(error).__name__)
            return IngestResult(Status.OUT_OF_RESOURCES, "database unavailable")
        except OSError as error:
            log.error("storage error: %s", error)
            return IngestResult(Status.OUT_OF_RESOURCES, f"storage error: {error.strerror or error}")
        except Exception:  # one bad instance must never end the association
            log.exception("unexpected failure while storing an instance")
            return IngestResult(Status.PROCESSING_FAILURE, "internal error while storing")

    def _ingest(self, dataset: bytes, transfer_syntax: UID, sop_class: str | None,
                sop_instance: str | None, calling_ae: str | None) -> IngestResult:
        if not dataset:
            raise IngestFailure(Status.CANNOT_PARSE, "empty data set")
        header = read_header(dataset, sop_class, sop_instance, transfer_syntax, self.limits)
        meta = encode_file_meta(header.sop_class_uid, header.sop_instance_uid, transfer_syntax, calling_ae)
        digest = hashlib.sha256(dataset).hexdigest()
        relative = self.files.relative_path(header.study_uid, header.series_uid, header.sop_instance_uid)

        with self._locks[hash(header.sop_instance_uid) % len(self._locks)]:
            existing = self.store.find_instance(header.sop_instance_uid)
            if existing and self.files.exists(existing.path) and (
                existing.sha256 == digest
                or same_content(self.files.read(existing.path), transfer_syntax, dataset, meta)
            ):
                log.info("identical instance re-sent by %s; already stored", calling_ae)
                return IngestResult(Status.SUCCESS, "already stored", duplicate=True)
            if existing and existing.sha256 != digest:
                if self.duplicate_policy == "reject":
                    raise IngestFailure(
                        Status.DUPLICATE_SOP_INSTANCE,
                        "another object with this SOP Instance UID is already stored (policy: reject)")
                # policy "replace": the new object goes to a path of its own, so a
                # failed commit leaves the old file and row exactly as they were.
                self.files.supersede(existing.path, existing.sha256)
                relative = relative[: -len(".dcm")] + f".{digest[:12]}.dcm"

            self.files.check_space(len(meta) + len(dataset) + len(_PREAMBLE))
            self.files.write(relative, [_PREAMBLE, meta, dataset])
            stored = StoredFile(path=relative, size=len(_PREAMBLE) + len(meta) + len(dataset),
                                sha256=digest, transfer_syntax_uid=str(transfer_syntax))
            try:
                self.store.record_instance(Received(header, stored, calling_ae, utcnow(), absent=existing is None))
            except Exception:
                if existing is None or existing.path != relative:
                    # Not acknowledged and not indexed: the file must not linger as if stored.
                    self.files.remove(relative)
                raise
            if existing and existing.path != relative:
                self.files.remove(existing.path)  # a hard link under superseded/ keeps it
        log.info("stored %s from %s (patient %s)", header.sop_instance_uid, calling_ae,
                 redact(header.patient.patient_id, self.log_phi))
        return IngestResult(Status.SUCCESS)

    def ingest_file(self, path: Path, calling_ae: str | None = None) -> IngestResult:
        """Ingest a DICOM Part 10 file from disk exactly as a C-STORE would be."""
        try:
            transfer_syntax, dataset = split_part10(path.read_bytes())
        except IngestFailure as failure:
            return IngestResult(failure.status, failure.reason)
        except OSError as error:
            return IngestResult(Status.OUT_OF_RESOURCES, f"cannot read {path}: {error.strerror}")
        return self.ingest(dataset, transfer_syntax, calling_ae=calling_ae)
