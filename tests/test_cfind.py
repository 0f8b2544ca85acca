"""C-FIND against the node as a subprocess: DCMTK findscu and a pynetdicom SCU, on studies sent
with storescu and links confirmed through LinkStore; SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT

from db.engine import make_engine
from db.links import LinkStore
from dicom_node.qrscp import CANCEL, PENDING, make_find_handler
from tests.helpers import (
    RunningNode,
    _drop_postgres_database,
    module_database,
    need,
    node_config,
    write_toml,
)
from tests.test_priors import MISFILED, SAME, add_link, add_study

pytestmark = pytest.mark.dcmtk

# key -> (patient_id, issuer, name, birth, date, modality, accession)
STUDIES = {
    "p1_2019": ("P1", "HOSP-A", "DOE^JANE", "19700101", "20190310", "CR", "ACC1001"),
    "p1_2021": ("P1", "HOSP-A", "DOE^JANE", "19700101", "20210101", "CT", "ACC1002"),
    "p2_2020": ("P2", "HOSP-B", "DOE^JANE", "19700101", "20200505", "MR", "ACC2001"),
    "p3_2018": ("P3", "", "DOE^JANE", "19700101", "20180101", "DX", "ACC3001"),
    "p1_wrong": ("P1", "HOSP-A", "ROE^RICHARD", "19550505", "20200101", "CR", "ACC1003"),
    "p7": ("P7", "HOSP-A", "SMITH^JOHN", "19800101", "20200606", "CT", "ACC7001"),
    "p9": ("P9", "HOSP-C", "DOE^J", "19700101", "20220202", "CR", "ACC9001"),
}


def write_instance(folder: Path, study_uid: str, patient_id, issuer, name, birth, date, modality, accession) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, name, birth, "F"
    if issuer:
        ds.IssuerOfPatientID = issuer
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyDescription = date, "101500", accession, "TEST"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(16)
    ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def seeded(request, tmp_path_factory):
    """A running node holding STUDIES, sent by storescu; P1-P2 and P3-P2 confirmed, p1_wrong
    confirmed misfiled, P9-P1 open."""
    storescu = need("storescu")
    tmp = tmp_path_factory.mktemp(f"cfind_{request.param}")
    url, database = module_database(request.param, tmp)
    config = node_config(tmp, url)
    node = RunningNode(write_toml(tmp / "node.toml", config), config)
    try:
        node.start()
        folder = tmp / "in"
        folder.mkdir()
        uids = {key: generate_uid() for key in STUDIES}
        for key, values in STUDIES.items():
            write_instance(folder, uids[key], *values)
        sent = subprocess.run([storescu, "-aec", "LINKNODE", "+sd", "+r", "127.0.0.1", str(node.port), str(folder)],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"})
        assert sent.returncode == 0, sent.stderr + node.log()
        engine = make_engine(url)
        links = LinkStore(engine)
        ids = {
            "p1_p2": add_link(links, SAME, uids["p1_2019"], uids["p2_2020"]),
            "p3_p2": add_link(links, SAME, uids["p3_2018"], uids["p2_2020"]),
            "wrong": add_link(links, MISFILED, uids["p1_wrong"], uids["p1_2019"]),
            "open": add_link(links, SAME, uids["p9"], uids["p1_2021"], decision=None),
        }
        engine.dispose()
        yield SimpleNamespace(node=node, uids=uids, ids=ids, tmp=tmp)
    finally:
        node.stop()
        if database:
            _drop_postgres_database(database)


def findscu(seeded, *keys: str, model: str = "-S", ae_title: str = "FINDSCU", out: str = "rsp"):
    folder = seeded.tmp / out
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    args = [need("findscu"), model, "-aet", ae_title, "-aec", "LINKNODE", "-X", "-od", str(folder)]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run(args + ["127.0.0.1", str(seeded.node.port)], capture_output=True, text=True, timeout=30)
    return result, [pydicom.dcmread(p) for p in sorted(folder.glob("rsp*.dcm"))]


def others(ds) -> list[tuple[str, str]]:
    return [(item.PatientID, item.get("IssuerOfPatientID", "")) for item in ds.OtherPatientIDsSequence]


def test_findscu_by_patient_id_returns_the_persons_linked_studies_with_other_ids(seeded):
    uids = seeded.uids
    result, responses = findscu(seeded, "QueryRetrieveLevel=STUDY", "PatientID=P1", "IssuerOfPatientID=HOSP-A",
                                "StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "OtherPatientIDsSequence")
    assert result.returncode == 0, result.stderr
    # Oldest first: P3's study (joined through P2), P1, P2, P1. The misfiled and the open-link ones are not there.
    assert [r.StudyInstanceUID for r in responses] == [uids["p3_2018"], uids["p1_2019"], uids["p2_2020"],
                                                       uids["p1_2021"]]
    assert [(r.PatientID, r.IssuerOfPatientID) for r in responses] == [
        ("P3", ""), ("P1", "HOSP-A"), ("P2", "HOSP-B"), ("P1", "HOSP-A")]
    assert others(responses[0]) == [("P1", "HOSP-A"), ("P2", "HOSP-B")]
    assert others(responses[1]) == others(responses[3]) == [("P2", "HOSP-B"), ("P3", "")]
    assert others(responses[2]) == [("P1", "HOSP-A"), ("P3", "")]
    assert responses[2].ModalitiesInStudy == "MR" and responses[2].StudyDate == "20200505"
    # Only what was asked for, plus the level.
    assert all("AccessionNumber" not in r and "PatientName" not in r and r.QueryRetrieveLevel == "STUDY"
               for r in responses)


def test_findscu_patient_root_and_unknown_ae(seeded):
    result, responses = findscu(seeded, "QueryRetrieveLevel=PATIENT", "PatientID=P2", "IssuerOfPatientID",
                                "PatientName", "NumberOfPatientRelatedStudies", "OtherPatientIDsSequence",
                                model="-P", out="patient")
    assert result.returncode == 0, result.stderr
    assert len(responses) == 1
    assert (responses[0].PatientID, responses[0].IssuerOfPatientID, str(responses[0].PatientName)) == (
        "P2", "HOSP-B", "DOE^JANE")
    assert responses[0].NumberOfPatientRelatedStudies == 1
    assert others(responses[0]) == [("P1", "HOSP-A"), ("P3", "")]

    rejected, responses = findscu(seeded, "QueryRetrieveLevel=STUDY", "PatientID=P1", ae_title="INTRUDER",
                                  out="intruder")
    assert rejected.returncode != 0 and responses == []
    assert "Calling AE Title Not Recognized" in rejected.stderr + rejected.stdout


def query(assoc, model, **keys) -> tuple[list[Dataset], int]:
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    found, final = [], None
    for status, ds in assoc.send_c_find(identifier, model):
        assert status, "no response"
        if status.Status == PENDING:
            found.append(ds)
        else:
            final = status.Status
    return found, final


def test_pynetdicom_scu_matching(seeded):
    uids = seeded.uids
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(STUDY_ROOT)
    ae.add_requested_context(PATIENT_ROOT)
    assoc = ae.associate("127.0.0.1", seeded.node.port, ae_title="LINKNODE")
    assert assoc.is_established
    try:
        def study_uids(**keys):
            found, final = query(assoc, STUDY_ROOT, **{"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", **keys})
            assert final == 0x0000
            return [ds.StudyInstanceUID for ds in found]

        assert study_uids(StudyInstanceUID=[uids["p7"], uids["p1_2019"]]) == [uids["p1_2019"], uids["p7"]]
        assert study_uids(StudyDate="20190101-20201231") == [uids["p1_2019"], uids["p1_wrong"], uids["p2_2020"],
                                                            uids["p7"]]
        assert study_uids(StudyDate="-20181231") == [uids["p3_2018"]]
        assert study_uids(StudyDate="20210101") == [uids["p1_2021"]]
        assert study_uids(AccessionNumber="ACC7001") == [uids["p7"]]
        assert study_uids(AccessionNumber="ACC10*") == [uids["p1_2019"], uids["p1_wrong"], uids["p1_2021"]]
        assert study_uids(PatientName="smith^j?hn") == [uids["p7"]]
        assert study_uids(PatientName="DOE^J*", ModalitiesInStudy="CR") == [uids["p1_2019"], uids["p9"]]
        assert study_uids(ModalitiesInStudy=["MR", "DX"]) == [uids["p3_2018"], uids["p2_2020"]]
        # Person query combined with another key: the person's studies that also match it.
        assert study_uids(PatientID="P2", StudyDate="20190101-") == [uids["p1_2019"], uids["p2_2020"],
                                                                    uids["p1_2021"]]
        # A wildcard Patient ID matches each study's own ID: no expansion.
        assert study_uids(PatientID="P3*") == [uids["p3_2018"]]
        assert study_uids(PatientID="NOBODY") == []

        # Found by UID, a misfiled study is someone else's: no other IDs. Unknown keys come back empty.
        found, _ = query(assoc, STUDY_ROOT, QueryRetrieveLevel="STUDY", StudyInstanceUID=uids["p1_wrong"],
                         OtherPatientIDsSequence=Sequence(), ReferringPhysicianName="",
                         NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="")
        assert len(found) == 1 and len(found[0].OtherPatientIDsSequence) == 0
        assert "ReferringPhysicianName" in found[0] and found[0].ReferringPhysicianName == ""
        assert (found[0].NumberOfStudyRelatedSeries, found[0].NumberOfStudyRelatedInstances) == (1, 1)

        # Patient root, study level, behaves like study root.
        found, final = query(assoc, PATIENT_ROOT, QueryRetrieveLevel="STUDY", PatientID="P3", StudyInstanceUID="")
        assert final == 0x0000 and len(found) == 4

        # Study Root has no PATIENT level (PS3.4 C.6.2); an unknown level is refused too.
        for model, level in ((STUDY_ROOT, "PATIENT"), (PATIENT_ROOT, "FRAME")):
            found, final = query(assoc, model, QueryRetrieveLevel=level, PatientID="P1")
            assert found == [] and 0xC000 <= final <= 0xCFFF, (level, hex(final or 0))
    finally:
        assoc.release()


def test_cancel_stops_the_responses(store):
    """The handler, as pynetdicom drives it, with the peer cancelling after the first match."""
    for n in range(5):
        add_study(store, "PC", "HOSP-A", date=f"2020010{n + 1}")
    handler = make_find_handler(LinkStore(store.engine))
    identifier = Dataset()
    identifier.QueryRetrieveLevel, identifier.PatientID, identifier.StudyInstanceUID = "STUDY", "PC", ""
    cancelled = {"now": False}

    class Event:  # the parts of pynetdicom's Event the handler reads
        request = SimpleNamespace(AffectedSOPClassUID=STUDY_ROOT)
        assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="TESTSCU"))

        @property
        def identifier(self):
            return identifier

        @property
        def is_cancelled(self):
            return cancelled["now"]

    event = Event()

    responses = []
    for status, ds in handler(event):
        responses.append(status)
        cancelled["now"] = True
    assert responses == [PENDING, CANCEL]

    cancelled["now"] = False
    assert [status for status, _ in handler(event)] == [PENDING] * 5


def test_queries_do_not_wait_for_a_writer_on_sqlite(tmp_path):
    """A C-STORE holds SQLite's write lock while it commits; a query must read past it (WAL,
    plain BEGIN), not queue behind it as a second writer would."""
    import threading
    import time

    from sqlalchemy import text

    from db.migrate import upgrade
    from db.store import IdentityStore

    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    add_study(IdentityStore(engine), "PW", "HOSP-A", date="20200101")
    handler = make_find_handler(LinkStore(engine))
    identifier = Dataset()
    identifier.QueryRetrieveLevel, identifier.PatientID, identifier.StudyInstanceUID = "STUDY", "PW", ""
    identifier.OtherPatientIDsSequence = Sequence()
    event = SimpleNamespace(request=SimpleNamespace(AffectedSOPClassUID=STUDY_ROOT), identifier=identifier,
                            is_cancelled=False, assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="T")))
    writer = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    with writer.begin() as connection:      # BEGIN IMMEDIATE: the write lock is held from here
        connection.execute(text("UPDATE patient SET sex = 'F'"))
        results = []
        thread = threading.Thread(target=lambda: results.extend(handler(event)), daemon=True)
        started = time.monotonic()
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "the query waited for the writer"
        assert time.monotonic() - started < 5
    assert [status for status, _ in results] == [PENDING]
    writer.dispose()
    engine.dispose()
