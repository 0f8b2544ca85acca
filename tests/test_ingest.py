"""The ingest path without sockets: what is stored, what is refused, and with which status."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from db.models import Instance, Patient, Series, Study
from dicom_node.config import settings_from_dict
from dicom_node.node import build
from dicom_node.statuses import Status
from tests.helpers import CORPUS, corpus_path, dataset_bytes


@pytest.fixture
def parts(tmp_path, db_url):
    settings = settings_from_dict({"database": {"url": db_url}, "storage": {"dir": str(tmp_path / "storage")}})
    built = build(settings)
    yield built
    built.engine.dispose()


def rows(parts, model):
    from sqlalchemy.orm import Session

    with Session(parts.engine) as session:
        return session.scalars(select(model)).all()




def raw(ds: pydicom.Dataset) -> bytes:
    """The data set alone, explicit VR little endian, as a C-STORE carries it."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def ct(**overrides) -> pydicom.Dataset:
    ds = pydicom.dcmread(corpus_path("explicit_le"))
    ds.SOPInstanceUID = generate_uid()
    for key, value in overrides.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize("kind", sorted(CORPUS))
def test_every_transfer_syntax_is_stored_exactly_as_received(parts, kind):
    path = corpus_path(kind)
    result = parts.ingestor.ingest_file(path, calling_ae="TESTSCU")
    assert result.ok, result.reason
    (instance,) = rows(parts, Instance)
    stored = parts.files.absolute(instance.path)
    assert dataset_bytes(stored) == dataset_bytes(path)
    assert instance.sha256 == hashlib.sha256(dataset_bytes(path)).hexdigest()
    assert instance.size == stored.stat().st_size
    assert instance.transfer_syntax_uid == str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    assert instance.calling_ae == "TESTSCU"
    # The stored file is a valid Part 10 file that pydicom reads back whole.
    assert pydicom.dcmread(stored).SOPInstanceUID == instance.sop_instance_uid


def test_identity_fields_are_kept_as_dicom_has_them(parts):
    ds = ct(PatientID="P-77", IssuerOfPatientID="HOSP_A", PatientName="Doe^Jane", PatientBirthDate="19800102",
            PatientSex="F", AccessionNumber="ACC1", StudyDescription="CT CHEST", BodyPartExamined="CHEST")
    other = pydicom.Dataset()
    other.PatientID, other.IssuerOfPatientID = "X-1", "HOSP_B"
    ds.OtherPatientIDsSequence = [other]
    assert parts.ingestor.ingest(raw(ds), ExplicitVRLittleEndian).ok
    (patient,) = rows(parts, Patient)
    assert (patient.patient_id, patient.issuer, patient.name, patient.birth_date, patient.sex) == (
        "P-77", "HOSP_A", "Doe^Jane", "19800102", "F")
    assert patient.other_patient_ids == [{"patient_id": "X-1", "issuer": "HOSP_B"}]
    (study,) = rows(parts, Study)
    assert (study.study_uid, study.accession_number, study.description) == (ds.StudyInstanceUID, "ACC1", "CT CHEST")
    (series,) = rows(parts, Series)
    assert (series.modality, series.body_part, series.instance_count, series.state.value) == (
        "CT", "CHEST", 1, "receiving")


def test_same_patient_id_under_two_issuers_is_two_patients(parts):
    for issuer in ("HOSP_A", "HOSP_B"):
        assert parts.ingestor.ingest(raw(ct(PatientID="123", IssuerOfPatientID=issuer,
                                                         StudyInstanceUID=generate_uid())),
                                     ExplicitVRLittleEndian).ok
    assert sorted((p.patient_id, p.issuer) for p in rows(parts, Patient)) == [("123", "HOSP_A"), ("123", "HOSP_B")]






def test_identical_resend_is_acknowledged_without_a_second_copy(parts):
    path = corpus_path("explicit_le")
    assert parts.ingestor.ingest_file(path).ok
    again = parts.ingestor.ingest_file(path)
    assert again.ok and again.duplicate
    assert len(rows(parts, Instance)) == 1
    assert rows(parts, Series)[0].instance_count == 1
    files = [p for p in parts.files.root.rglob("*.dcm")]
    assert len(files) == 1


def test_resend_reencoded_without_padding_counts_as_identical(parts):
    ds = pydicom.dcmread(corpus_path("explicit_le"))  # carries (FFFC,FFFC) trailing padding
    assert parts.ingestor.ingest_file(corpus_path("explicit_le")).ok
    del ds[0xFFFCFFFC]
    result = parts.ingestor.ingest(raw(ds), ExplicitVRLittleEndian)
    assert result.ok and result.duplicate


def test_conflicting_object_is_rejected_by_default_and_original_kept(parts):
    ds = ct()
    first = raw(ds)
    assert parts.ingestor.ingest(first, ExplicitVRLittleEndian).ok
    ds.PatientName = "Other^Name"
    result = parts.ingestor.ingest(raw(ds), ExplicitVRLittleEndian)
    assert result.status == Status.DUPLICATE_SOP_INSTANCE
    (instance,) = rows(parts, Instance)
    assert dataset_bytes(parts.files.absolute(instance.path)) == first


def test_replace_policy_stores_new_object_and_keeps_old_one(tmp_path):
    settings = settings_from_dict({"database": {"url": f"sqlite:///{tmp_path / 'n.db'}"},
                                   "storage": {"dir": str(tmp_path / "s"), "duplicate_policy": "replace"}})
    parts = build(settings)
    ds = ct()
    old = raw(ds)
    assert parts.ingestor.ingest(old, ExplicitVRLittleEndian).ok
    ds.PatientName = "Corrected^Name"
    new = raw(ds)
    assert parts.ingestor.ingest(new, ExplicitVRLittleEndian).ok
    (instance,) = rows(parts, Instance)
    assert dataset_bytes(parts.files.absolute(instance.path)) == new
    (kept,) = list((tmp_path / "s" / "superseded").iterdir())
    assert dataset_bytes(kept) == old
    assert rows(parts, Series)[0].instance_count == 1


@pytest.mark.parametrize("missing, status", [
    ("StudyInstanceUID", Status.MISSING_UID),
    ("SeriesInstanceUID", Status.MISSING_UID),
    ("SOPInstanceUID", Status.MISSING_UID),
    ("SOPClassUID", Status.SOP_CLASS_MISMATCH),
])
def test_missing_identifiers_are_refused(parts, missing, status):
    ds = ct()
    delattr(ds, missing)
    result = parts.ingestor.ingest(raw(ds), ExplicitVRLittleEndian)
    assert result.status == status
    assert result.reason
    assert rows(parts, Instance) == []




@pytest.mark.parametrize("kind", ["explicit_le", "implicit_le", "jpeg2000", "deflate", "rle"])
@pytest.mark.parametrize("cut", [9, 100, 1000])  # image_dfl.dcm has 8 bytes after its deflate stream
def test_truncated_data_sets_are_refused_and_leave_nothing(parts, kind, cut):
    path = corpus_path(kind)
    raw = Path(path).read_bytes()
    transfer_syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    result = parts.ingestor.ingest(dataset_bytes(path)[:-cut], transfer_syntax)
    assert result.status == Status.CANNOT_PARSE, result.reason
    assert rows(parts, Instance) == []
    assert not list(parts.files.root.rglob("*.dcm"))
    assert raw  # the corpus file itself is untouched


def test_sop_class_that_does_not_match_the_request_is_refused(parts):
    path = corpus_path("explicit_le")  # a CT image
    mr_image_storage = "1.2.840.10008.5.1.4.1.1.4"
    result = parts.ingestor.ingest(dataset_bytes(path), ExplicitVRLittleEndian, sop_class=mr_image_storage,
                                   sop_instance=pydicom.dcmread(path).SOPInstanceUID)
    assert result.status == Status.SOP_CLASS_MISMATCH
    assert rows(parts, Instance) == []


def test_garbage_is_refused(parts):
    assert parts.ingestor.ingest(b"\x01\x02garbage" * 10, ExplicitVRLittleEndian).status == Status.CANNOT_PARSE
    assert parts.ingestor.ingest(b"", ExplicitVRLittleEndian).status == Status.CANNOT_PARSE


def test_uid_that_could_escape_the_store_is_not_used_as_a_path(parts):
    ds = ct(StudyInstanceUID="../../etc", SeriesInstanceUID="1.2.3")
    assert parts.ingestor.ingest(raw(ds), ExplicitVRLittleEndian).ok
    (instance,) = rows(parts, Instance)
    stored = parts.files.absolute(instance.path).resolve()
    assert stored.is_relative_to(parts.files.root.resolve())
    assert ".." not in instance.path


def test_database_unavailable_answers_out_of_resources_and_leaves_no_file(parts, monkeypatch):
    from sqlalchemy.exc import OperationalError

    def down(*_args, **_kwargs):
        raise OperationalError("INSERT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(parts.store, "record_instance", down)
    result = parts.ingestor.ingest_file(corpus_path("explicit_le"))
    assert result.status == Status.OUT_OF_RESOURCES
    assert "database" in result.reason
    assert not list(parts.files.root.rglob("*.dcm"))
    monkeypatch.undo()
    assert parts.ingestor.ingest_file(corpus_path("explicit_le")).ok
