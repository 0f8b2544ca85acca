"""Query/Retrieve against the node as a subprocess: C-FIND at SERIES and IMAGE level, C-MOVE and
C-GET with DCMTK movescu/getscu and a pynetdicom SCU, a linked prior retrieved under either ID,
instances byte-identical, conversion for a receiver that takes no compressed syntax, cancel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelMove as PATIENT_ROOT_MOVE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as STUDY_ROOT_GET

from db.engine import make_engine
from db.links import LinkStore
from dicom_node.part10 import split_part10
from tests.helpers import RunningNode, dataset_bytes, free_port, need, node_config, write_toml
from tests.test_priors import MISFILED, SAME, add_link

pytestmark = pytest.mark.dcmtk

# key -> (patient_id, issuer, date, modality, series count, instances per series)
STUDIES = {
    "p1": ("P1", "HOSP-A", "20190310", "CR", 1, 2),
    "p2": ("P2", "HOSP-B", "20200505", "CT", 2, 3),
    "p1_wrong": ("P1", "HOSP-A", "20200101", "CR", 1, 1),
    "p7": ("P7", "HOSP-A", "20200606", "CR", 1, 1),
}


def write_series(folder: Path, study_uid: str, key: str, number: int, count: int, values: tuple,
                 compress_first: bool = False) -> list[Path]:
    patient_id, issuer, date, modality, _, _ = values
    series_uid, paths = generate_uid(), []
    for n in range(1, count + 1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = patient_id, issuer, "DOE^JANE"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, series_uid, date, "101500"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = modality, number, n, f"{key} {number}"
        ds.Rows, ds.Columns = 16, 24
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (np.arange(16 * 24, dtype=np.uint16).reshape(16, 24) * (n + number)).tobytes()
        if compress_first and n == 1:
            ds.compress(RLELossless)
        path = folder / f"{key}_{number}_{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A running node holding STUDIES (sent by storescu); P1-P2 confirmed as one person, p1_wrong
    confirmed misfiled. MOVESCU, PYDEST and ORTHANC are C-MOVE destinations."""
    storescu = need("storescu")
    tmp = tmp_path_factory.mktemp("qr")
    ports = {"MOVESCU": free_port(), "PYDEST": free_port(), "ORTHANC": free_port()}
    config = node_config(tmp, retrieve={"destinations": [{"ae_title": ae, "host": "127.0.0.1", "port": port}
                                                         for ae, port in ports.items()]})
    config["security"]["peers"] += [{"ae_title": ae, "hosts": ["127.0.0.1"]} for ae in ("MOVESCU", "GETSCU", "ORTHANC")]
    node = RunningNode(write_toml(tmp / "node.toml", config), config)
    try:
        node.start()
        folder = tmp / "in"
        folder.mkdir()
        uids, files = {key: generate_uid() for key in STUDIES}, {}
        for key, values in STUDIES.items():
            files[key] = [p for number in range(1, values[4] + 1)
                          for p in write_series(folder, uids[key], key, number, values[5], values,
                                                compress_first=(key == "p2" and number == 2))]
        rle = folder / "rle"
        rle.mkdir()
        files["p2"][3] = files["p2"][3].rename(rle / files["p2"][3].name)
        for source, propose in ((folder, "-x="), (rle, "-xr")):    # -xr: propose RLE Lossless
            sent = subprocess.run([storescu, "-aec", "LINKNODE", "+sd", "-R", propose, "127.0.0.1", str(node.port),
                                   str(source)], capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "TCP_NODELAY": "1"})
            assert sent.returncode == 0, sent.stderr + node.log()
        engine = make_engine(config["database"]["url"])
        links = LinkStore(engine)
        add_link(links, SAME, uids["p1"], uids["p2"])
        add_link(links, MISFILED, uids["p1_wrong"], uids["p1"])
        engine.dispose()
        yield SimpleNamespace(node=node, uids=uids, files=files, tmp=tmp, ports=ports)
    finally:
        node.stop()


def by_sop(paths) -> dict[str, Path]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: Path(p) for p in paths}


def fresh(archive, name: str) -> Path:
    folder = archive.tmp / name
    folder.mkdir()
    return folder


def dcmtk(archive, tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([need(tool), *args, "127.0.0.1", str(archive.node.port)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "TCP_NODELAY": "1"})


def test_findscu_series_and_image_levels_drill_down_into_a_linked_prior(archive):
    uids = archive.uids
    out = fresh(archive, "find_series")
    # Patient Root, SERIES level, under P1: the linked P2 study's series are the person's.
    result = dcmtk(archive, "findscu", "-P", "-aet", "FINDSCU", "-aec", "LINKNODE", "-X", "-od", str(out),
                   "-k", "QueryRetrieveLevel=SERIES", "-k", "PatientID=P1", "-k", f"StudyInstanceUID={uids['p2']}",
                   "-k", "SeriesInstanceUID", "-k", "Modality", "-k", "SeriesNumber",
                   "-k", "NumberOfSeriesRelatedInstances")
    assert result.returncode == 0, result.stderr
    found = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*"))]
    assert sorted((int(r.SeriesNumber), r.Modality, int(r.NumberOfSeriesRelatedInstances)) for r in found) == [
        (1, "CT", 3), (2, "CT", 3)]
    assert {r.StudyInstanceUID for r in found} == {uids["p2"]}
    # Study Root, IMAGE level of one of those series.
    series_uid = found[0].SeriesInstanceUID
    out = fresh(archive, "find_image")
    result = dcmtk(archive, "findscu", "-S", "-aet", "FINDSCU", "-aec", "LINKNODE", "-X", "-od", str(out),
                   "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={uids['p2']}",
                   "-k", f"SeriesInstanceUID={series_uid}", "-k", "SOPInstanceUID", "-k", "SOPClassUID",
                   "-k", "InstanceNumber")
    assert result.returncode == 0, result.stderr
    images = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*"))]
    assert sorted(int(r.InstanceNumber) for r in images) == [1, 2, 3]
    assert {r.SOPClassUID for r in images} == {SecondaryCaptureImageStorage}
    assert {r.SOPInstanceUID for r in images} <= set(by_sop(archive.files["p2"]))


def test_movescu_patient_level_brings_the_persons_studies_byte_identical(archive):
    out = fresh(archive, "move_patient")
    result = dcmtk(archive, "movescu", "-P", "-aet", "MOVESCU", "-aem", "MOVESCU", "-aec", "LINKNODE",
                   "--port", str(archive.ports["MOVESCU"]), "-od", str(out), "+xa",
                   "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=P1")
    assert result.returncode == 0, result.stderr + archive.node.log()[-3000:]
    received = by_sop(out.iterdir())
    sent = by_sop(archive.files["p1"] + archive.files["p2"])        # not the misfiled study, not P7
    assert set(received) == set(sent)
    for sop, path in sent.items():
        assert dataset_bytes(received[sop]) == dataset_bytes(path), sop


def test_movescu_and_getscu_at_study_and_series_level(archive):
    uids = archive.uids
    out = fresh(archive, "move_study")
    result = dcmtk(archive, "movescu", "-S", "-aet", "MOVESCU", "-aem", "MOVESCU", "-aec", "LINKNODE",
                   "--port", str(archive.ports["MOVESCU"]), "-od", str(out), "+xa",
                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uids['p2']}")
    assert result.returncode == 0, result.stderr
    assert set(by_sop(out.iterdir())) == set(by_sop(archive.files["p2"]))

    series = pydicom.dcmread(archive.files["p2"][0]).SeriesInstanceUID
    out = fresh(archive, "get_series")
    result = dcmtk(archive, "getscu", "-S", "-aet", "GETSCU", "-aec", "LINKNODE", "-od", str(out),
                   "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={uids['p2']}",
                   "-k", f"SeriesInstanceUID={series}")
    assert result.returncode == 0, result.stderr + archive.node.log()[-3000:]
    received, sent = by_sop(out.iterdir()), by_sop(archive.files["p2"][:3])
    assert set(received) == set(sent)
    for sop, path in sent.items():
        assert dataset_bytes(received[sop]) == dataset_bytes(path), sop


def test_getscu_that_takes_no_compressed_syntax_gets_the_rle_instance_decompressed(archive):
    """getscu proposes uncompressed syntaxes only, by default: the RLE-stored instance is converted."""
    compressed = archive.files["p2"][3]
    stored = pydicom.dcmread(compressed)
    assert stored.file_meta.TransferSyntaxUID == RLELossless
    out = fresh(archive, "get_convert")
    result = dcmtk(archive, "getscu", "-S", "-aet", "GETSCU", "-aec", "LINKNODE", "-od", str(out),
                   "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={archive.uids['p2']}",
                   "-k", f"SeriesInstanceUID={stored.SeriesInstanceUID}", "-k", f"SOPInstanceUID={stored.SOPInstanceUID}")
    assert result.returncode == 0, result.stderr
    [got] = [pydicom.dcmread(p) for p in out.iterdir()]
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(got.pixel_array, stored.pixel_array)


def _scu(*contexts) -> AE:
    ae = AE(ae_title="PYNETDICOM")
    for context in contexts:
        ae.add_requested_context(context)
    return ae


def test_pynetdicom_move_statuses_and_counts(archive):
    """Unknown destination 0xA801; a move to a pynetdicom SCP counts its sub-operations; a store
    the destination refuses is a failed sub-operation, reported as Warning 0xB000 with its UID."""
    received, refuse = [], set()

    def on_store(event):
        ds = event.dataset
        if ds.SOPInstanceUID in refuse:
            return 0xA700
        received.append(ds.SOPInstanceUID)
        return 0x0000

    dest = AE(ae_title="PYDEST")
    dest.supported_contexts = StoragePresentationContexts
    server = dest.start_server(("127.0.0.1", archive.ports["PYDEST"]), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        assoc = _scu(PATIENT_ROOT_MOVE).associate("127.0.0.1", archive.node.port, ae_title="LINKNODE")
        assert assoc.is_established
        identifier = Dataset()
        identifier.QueryRetrieveLevel, identifier.PatientID = "PATIENT", "P2"
        statuses = [s.Status for s, _ in assoc.send_c_move(identifier, "NOWHERE", PATIENT_ROOT_MOVE)]
        assert statuses == [0xA801]

        refuse.add(pydicom.dcmread(archive.files["p1"][0]).SOPInstanceUID)
        responses = list(assoc.send_c_move(identifier, "PYDEST", PATIENT_ROOT_MOVE))
        final, final_identifier = responses[-1]
        assert final.Status == 0xB000
        assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (7, 1)
        failed = final_identifier.FailedSOPInstanceUIDList
        assert ([failed] if isinstance(failed, str) else list(failed)) == list(refuse)
        assert all(s.Status == 0xFF00 for s, _ in responses[:-1]) and len(responses) == 9
        assert set(received) == set(by_sop(archive.files["p1"] + archive.files["p2"])) - refuse

        # A level the model lacks is refused with a comment, nothing sent.
        identifier = Dataset()
        identifier.QueryRetrieveLevel, identifier.PatientID = "FRAME", "P2"
        [(status, _)] = list(assoc.send_c_move(identifier, "PYDEST", PATIENT_ROOT_MOVE))
        assert 0xC000 <= status.Status <= 0xCFFF and "FRAME" in status.ErrorComment
        assoc.release()
    finally:
        server.shutdown()


def test_pynetdicom_get_is_cancelled_after_the_first_instance(archive):
    received = []
    sent_cancel = threading.Event()
    scu = _scu(STUDY_ROOT_GET)
    scu.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian, RLELossless])
    state = {}

    def on_store(event):
        received.append(event.dataset.SOPInstanceUID)
        if not sent_cancel.is_set():
            sent_cancel.set()
            state["assoc"].send_c_cancel(1, state["context_id"])
        return 0x0000

    assoc = scu.associate("127.0.0.1", archive.node.port, ae_title="LINKNODE",
                          ext_neg=[build_role(SecondaryCaptureImageStorage, scp_role=True)],
                          evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    state["assoc"] = assoc
    state["context_id"] = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == STUDY_ROOT_GET)
    identifier = Dataset()
    identifier.QueryRetrieveLevel, identifier.StudyInstanceUID = "STUDY", archive.uids["p2"]
    responses = list(assoc.send_c_get(identifier, STUDY_ROOT_GET, msg_id=1))
    assoc.release()
    final = responses[-1][0]
    assert final.Status == 0xFE00
    assert 1 <= len(received) < 6 and final.NumberOfRemainingSuboperations == 6 - len(received)


# ----- Orthanc as the PACS/viewer side ------------------------------------------------------------

def _rest(port: int, method: str, path: str, body=None, raw: bool = False):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    with urllib.request.urlopen(request, timeout=60) as answer:
        content = answer.read()
    return content if raw else json.loads(content or b"null")


@pytest.fixture
def orthanc(archive, tmp_path):
    """Debian's Orthanc with its own config: knows the node as modality `linknode`; the node has
    it as C-MOVE destination ORTHANC and as an allowed peer."""
    binary = shutil.which("Orthanc")
    if binary is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    dicom_port, http_port = archive.ports["ORTHANC"], free_port()
    config = {"Name": "qr-test", "StorageDirectory": str(tmp_path / "db"), "IndexDirectory": str(tmp_path / "db"),
              "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "Plugins": [], "DicomCheckCalledAet": False,
              "DicomModalities": {"linknode": ["LINKNODE", "127.0.0.1", archive.node.port]}}
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = open(tmp_path / "orthanc.log", "wb")
    process = subprocess.Popen([binary, str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "TCP_NODELAY": "1"})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _rest(http_port, "GET", "/system")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("Orthanc did not start:\n" + (tmp_path / "orthanc.log").read_text(errors="replace"))
                time.sleep(0.2)
        yield SimpleNamespace(port=http_port, log=tmp_path / "orthanc.log")
    finally:
        process.terminate()
        process.wait(30)


def test_orthanc_queries_the_node_and_retrieves_a_linked_prior_byte_identical(archive, orthanc):
    query = _rest(orthanc.port, "POST", "/modalities/linknode/query",
                  {"Level": "Study", "Query": {"PatientID": "P1", "StudyInstanceUID": "", "0010,1000": ""}})
    answers = _rest(orthanc.port, "GET", f"/queries/{query['ID']}/answers?expand&simplify")
    by_study = {a["StudyInstanceUID"]: a for a in answers}
    assert set(by_study) == {archive.uids["p1"], archive.uids["p2"]}        # the linked prior, not the misfiled study
    prior = by_study[archive.uids["p2"]]
    assert prior["PatientID"] == "P2" and prior["OtherPatientIDs"] == "P1"
    index = next(n for n, a in enumerate(answers) if a["StudyInstanceUID"] == archive.uids["p2"])
    _rest(orthanc.port, "POST", f"/queries/{query['ID']}/answers/{index}/retrieve",
          {"TargetAet": "ORTHANC", "Synchronous": True})
    stored = {}
    for instance in _rest(orthanc.port, "GET", "/instances"):
        tags = _rest(orthanc.port, "GET", f"/instances/{instance}/simplified-tags")
        stored[tags["SOPInstanceUID"]] = _rest(orthanc.port, "GET", f"/instances/{instance}/file", raw=True)
    sent = by_sop(archive.files["p2"])
    assert set(stored) == set(sent), orthanc.log.read_text(errors="replace")[-3000:]
    for sop, path in sent.items():
        assert split_part10(stored[sop])[1] == dataset_bytes(path), sop


def test_an_unreadable_stored_file_is_a_failed_sub_operation_and_the_rest_go_on(tmp_path):
    """A file gone from the store (disk trouble, a manual delete) fails its own sub-operation only:
    the handler yields a data set pynetdicom cannot send, which it counts and lists by UID."""
    from db.records_linkage import InstanceRecord
    from dicom_node.config import Settings
    from dicom_node.retrieve import PENDING, Retriever

    good = write_series(tmp_path, generate_uid(), "x", 1, 1, STUDIES["p7"])[0]
    ds = pydicom.dcmread(good)
    records = [InstanceRecord(n, uid, SecondaryCaptureImageStorage, 1, "s", "t", n, ExplicitVRLittleEndian,
                              path, 10) for n, (uid, path) in enumerate([("1.2.3.4", "gone.dcm"),
                                                                        (ds.SOPInstanceUID, good.name)])]
    retriever = Retriever(store=None, settings=Settings(storage={"dir": str(tmp_path)}))
    event = SimpleNamespace(is_cancelled=False, assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="X")))
    sent = list(retriever._send(event, records, dict))
    assert [status for status, _ in sent] == [PENDING, PENDING]
    assert "TransferSyntaxUID" not in getattr(sent[0][1], "file_meta", {}) and sent[0][1].SOPInstanceUID == "1.2.3.4"
    assert sent[1][1].SOPInstanceUID == ds.SOPInstanceUID and sent[1][1].file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
