"""DICOMweb (QIDO-RS, WADO-RS, WADO-URI) against `dicom-node serve` as a subprocess, with studies
sent by storescu under two Patient IDs that a confirmed link joins; web accounts, HTTP Basic and
the session cookie; audit rows."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx2 as httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import select

from db.accounts import AccountStore
from db.engine import make_engine
from db.links import LinkStore
from db.models import AuditEvent
from dicom_node.part10 import split_part10
from tests.helpers import RunningNode, corpus_path, dataset_bytes, free_port, need, node_config, write_toml
from tests.test_priors import SAME, add_link
from web.passwords import hash_password

pytestmark = pytest.mark.dcmtk

USERS = {"cleo": ("clinician", "cleo-clinician-1"), "dora": ("clinician", "dora-clinician-1"),
         "eve": ("archivist", "eve-archivist-01")}
MULTIPART_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
PHI = ["P1", "P2", "P9", "DOE^JANE", "SMITH^JOHN", "19700101", "HOSP-A", "HOSP-B"]


def _header(ds: Dataset, patient: tuple, study_uid: str, series_uid: str, modality: str, number: int) -> None:
    pid, issuer, name, birth, date = patient
    ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = pid, issuer, name
    ds.PatientBirthDate, ds.PatientSex = birth, "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyDescription = date, "101500", f"ACC{pid}", "TEST"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, number


def grey_instance(folder, patient, study_uid, series_uid, modality, number, rows=48, cols=64):
    """A 16-bit greyscale image with rescale and window, Explicit VR Little Endian."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    _header(ds, patient, study_uid, series_uid, modality, number)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.WindowCenter, ds.WindowWidth = -1024, 1, 40, 400
    ds.PixelData = (np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols) % 4096).tobytes()
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def rle_instance(folder, patient, study_uid, series_uid, modality, number):
    """pydicom's 2-frame RGB RLE Lossless image, under this patient and study."""
    ds = pydicom.dcmread(corpus_path("rle_multiframe"))
    _header(ds, patient, study_uid, series_uid, modality, number)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """`serve` with web pages on, holding P1's study (two CT images), P2's (an MR image and a 2-frame
    RLE series) and P9's; P1 and P2 joined by a confirmed link. Accounts cleo and dora (clinicians), eve (archivist)."""
    storescu = need("storescu")
    tmp = tmp_path_factory.mktemp("dicomweb")
    web_port = free_port()
    config = node_config(tmp, web={"enabled": True, "port": web_port})
    running = RunningNode(write_toml(tmp / "node.toml", config), config)
    try:
        running.start()
        folder = tmp / "in"
        folder.mkdir()
        p1, p2, p9 = (("P1", "HOSP-A", "DOE^JANE", "19700101", "20190310"),
                      ("P2", "HOSP-B", "DOE^JANE", "19700101", "20200505"),
                      ("P9", "HOSP-C", "SMITH^JOHN", "19800101", "20210101"))
        study = {key: generate_uid() for key in ("p1", "p2", "p9")}
        series = {key: generate_uid() for key in ("p1", "p2_mr", "p2_rle", "p9")}
        (folder / "rle").mkdir()
        sent = {"p1": [grey_instance(folder, p1, study["p1"], series["p1"], "CT", n) for n in (1, 2)],
                "p2_mr": [grey_instance(folder, p2, study["p2"], series["p2_mr"], "MR", 1, rows=32, cols=40)],
                "p2_rle": [rle_instance(folder / "rle", p2, study["p2"], series["p2_rle"], "OT", 1)],
                "p9": [grey_instance(folder, p9, study["p9"], series["p9"], "CR", 1)]}
        for source, propose in ((folder, "-x="), (folder / "rle", "-xr")):     # -xr: propose RLE Lossless
            result = subprocess.run([storescu, "-aec", "LINKNODE", "+sd", "-R", propose, "127.0.0.1", str(running.port),
                                     str(source)], capture_output=True, text=True, timeout=60,
                                    env={**os.environ, "TCP_NODELAY": "1"})
            assert result.returncode == 0, result.stderr + running.log()
        engine = make_engine(config["database"]["url"])
        links = LinkStore(engine)
        add_link(links, SAME, study["p1"], study["p2"])
        accounts = AccountStore(engine)
        for name, (role, password) in USERS.items():
            accounts.add_user(name, hash_password(password), role)
        yield SimpleNamespace(node=running, base=f"http://127.0.0.1:{web_port}/dicomweb", study=study, series=series,
                              sent=sent, links=links, accounts=accounts, engine=engine)
        engine.dispose()
    finally:
        running.stop()


def get(node, path: str, user: str | None = "cleo", **kwargs) -> httpx.Response:
    auth = (user, USERS[user][1]) if user else None
    return httpx.get(node.base + path, auth=auth, timeout=30, **kwargs)


def uid(item: dict, tag: str) -> str:
    return item[tag]["Value"][0]


def sop_uid(path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def parts(answer: httpx.Response) -> list[tuple[str, bytes]]:
    """(part Content-Type, body) of a multipart/related answer."""
    ctype = answer.headers["content-type"]
    assert ctype.startswith("multipart/related") and 'type="application/dicom"' in ctype, ctype
    boundary = re.search(r"boundary=([^;\s]+)", ctype).group(1).strip('"').encode()
    chunks = answer.content.split(b"--" + boundary)
    assert chunks[0] == b"" and chunks[-1] == b"--\r\n"
    found = []
    for chunk in chunks[1:-1]:
        head, _, body = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        assert body.endswith(b"\r\n")
        found.append((head.decode().removeprefix("Content-Type: "), body[:-2]))
    return found


def dataset_bytes_of(part: bytes) -> bytes:
    return split_part10(part)[1]


def stored_file(node, sop: str) -> bytes:
    (record,) = node.links.find_instances(sop_uids=[sop])
    return (node.node.storage / record.path).read_bytes()


# ----- QIDO-RS -----------------------------------------------------------------------------

def test_qido_study_search_by_one_id_returns_the_linked_ids_study(node):
    answer = get(node, "/studies", params={"PatientID": "P1", "includefield": "OtherPatientIDsSequence"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom+json"
    studies = answer.json()
    assert [uid(s, "0020000D") for s in studies] == [node.study["p1"], node.study["p2"]]     # oldest first
    assert [(uid(s, "00100020"), uid(s, "00100021")) for s in studies] == [("P1", "HOSP-A"), ("P2", "HOSP-B")]
    assert studies[0]["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]}
    others = [[(i["00100020"]["Value"][0], i["00100021"]["Value"][0]) for i in s["00101002"]["Value"]]
              for s in studies]
    assert others == [[("P2", "HOSP-B")], [("P1", "HOSP-A")]]
    assert uid(studies[1], "00080061") == "MR" and studies[1]["00201208"]["Value"] == [2]   # instances in study
    # By the other ID, as a tag, and narrowed by a date range.
    by_tag = get(node, "/studies", params={"00100020": "P2"}).json()
    assert [uid(s, "0020000D") for s in by_tag] == [node.study["p1"], node.study["p2"]]
    assert "00101002" not in by_tag[0]
    recent = get(node, "/studies", params={"PatientID": "P1", "StudyDate": "20200101-"}).json()
    assert [uid(s, "0020000D") for s in recent] == [node.study["p2"]]
    everyone = get(node, "/studies", params={"PatientName": "doe*"}).json()
    assert {uid(s, "0020000D") for s in everyone} == {node.study["p1"], node.study["p2"]}


def test_qido_series_and_instance_searches_follow_the_person(node):
    in_study = get(node, f"/studies/{node.study['p2']}/series").json()
    assert {uid(s, "0020000E") for s in in_study} == {node.series["p2_mr"], node.series["p2_rle"]}
    assert all("00100020" not in s for s in in_study)           # scoped to a study: no study attributes
    person = get(node, "/series", params={"PatientID": "P2", "Modality": "CT"}).json()
    assert [uid(s, "0020000E") for s in person] == [node.series["p1"]]
    assert uid(person[0], "00100020") == "P1" and uid(person[0], "0020000D") == node.study["p1"]

    instances = get(node, f"/studies/{node.study['p1']}/series/{node.series['p1']}/instances").json()
    assert [uid(i, "00080018") for i in instances] == [sop_uid(p) for p in node.sent["p1"]]
    assert [i["00200013"]["Value"] for i in instances] == [[1], [2]]
    assert uid(instances[0], "00083002") == ExplicitVRLittleEndian
    everything = get(node, "/instances", params={"PatientID": "P1"}).json()
    sent = [p for key in ("p1", "p2_mr", "p2_rle") for p in node.sent[key]]
    assert {uid(i, "00080018") for i in everything} == {sop_uid(p) for p in sent}
    in_study = get(node, f"/studies/{node.study['p2']}/instances", params={"SOPClassUID": SecondaryCaptureImageStorage})
    assert len(in_study.json()) == 2


def test_qido_limit_offset_no_match_and_bad_requests(node):
    first = get(node, "/studies", params={"PatientID": "P1", "limit": "1"})
    assert [uid(s, "0020000D") for s in first.json()] == [node.study["p1"]]
    assert first.headers["warning"].startswith("299 ") and "offset=1" in first.headers["warning"]
    second = get(node, "/studies", params={"PatientID": "P1", "limit": "1", "offset": "1"})
    assert [uid(s, "0020000D") for s in second.json()] == [node.study["p2"]] and "warning" not in second.headers
    assert get(node, "/studies", params={"PatientID": "NOBODY"}).status_code == 204
    assert get(node, "/studies", params={"PatientID": "P1", "offset": "5"}).status_code == 204
    for params, words in (({"NoSuchKeyword": "x"}, "not a DICOM attribute"),
                          ({"StudyDate": "2019-01-01"}, "YYYYMMDD"),
                          ({"StudyInstanceUID": "1.2.abc"}, "not a UID"),
                          ({"Modality": "CT"}, "cannot be matched at STUDY level"),
                          ({"NumberOfStudyRelatedSeries": "2"}, "returned, not matched"),
                          ({"limit": "many"}, "limit"),
                          ({"PatientID": "x" * 500}, "characters")):
        answer = get(node, "/studies", params=params)
        assert answer.status_code == 400 and words in answer.json()["detail"], (params, answer.text)
    assert get(node, "/studies", headers={"Accept": "application/dicom+xml"}).status_code == 406
    assert get(node, "/studies", params={"fuzzymatching": "true", "PatientID": "P9"}).status_code == 200


# ----- WADO-RS -----------------------------------------------------------------------------

def test_wado_rs_retrieves_the_linked_study_byte_for_byte(node):
    answer = get(node, f"/studies/{node.study['p2']}", headers={"Accept": MULTIPART_ANY})
    assert answer.status_code == 200, answer.text
    received = parts(answer)
    sent = {sop_uid(p): p for key in ("p2_mr", "p2_rle") for p in node.sent[key]}
    assert len(received) == len(sent) == 2
    for ctype, body in received:
        sop = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True).SOPInstanceUID
        assert body == stored_file(node, sop)                         # the stored file, byte for byte
        assert dataset_bytes_of(body) == dataset_bytes(sent[sop])    # what storescu sent
        syntax = RLELossless if sop == sop_uid(node.sent["p2_rle"][0]) else ExplicitVRLittleEndian
        assert ctype == f"application/dicom; transfer-syntax={syntax}"
    # No Accept header: as stored. A series and one instance.
    series = parts(get(node, f"/studies/{node.study['p1']}/series/{node.series['p1']}"))
    assert [pydicom.dcmread(io.BytesIO(b)).InstanceNumber for _, b in series] == [1, 2]
    one = node.sent["p1"][1]
    (single,) = parts(get(node, f"/studies/{node.study['p1']}/series/{node.series['p1']}/instances/{sop_uid(one)}"))
    assert dataset_bytes_of(single[1]) == dataset_bytes(one)
    assert get(node, f"/studies/{generate_uid()}").status_code == 404
    assert get(node, f"/studies/{node.study['p1']}/series/{node.series['p2_mr']}").status_code == 404   # not its study


def test_wado_rs_transfer_syntax_negotiation(node):
    rle = node.sent["p2_rle"][0]
    path = f"/studies/{node.study['p2']}/series/{node.series['p2_rle']}/instances/{sop_uid(rle)}"
    asked = 'multipart/related; type="application/dicom"; transfer-syntax=' + ExplicitVRLittleEndian
    ((ctype, body),) = parts(get(node, path, headers={"Accept": asked}))
    converted = pydicom.dcmread(io.BytesIO(body))
    assert ctype.endswith(ExplicitVRLittleEndian) and converted.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(converted.pixel_array, pydicom.dcmread(rle).pixel_array)
    stored = 'multipart/related; type="application/dicom"; transfer-syntax=' + RLELossless
    assert parts(get(node, path, headers={"Accept": stored}))[0][0].endswith(RLELossless)
    jpeg_only = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    assert get(node, path, headers={"Accept": jpeg_only}).status_code == 406
    assert get(node, path, headers={"Accept": "multipart/related; type=application/octet-stream"}).status_code == 406


def test_wado_rs_metadata(node):
    answer = get(node, f"/studies/{node.study['p2']}/metadata")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom+json"
    items = answer.json()
    assert {uid(i, "00080018") for i in items} == {sop_uid(node.sent["p2_mr"][0]), sop_uid(node.sent["p2_rle"][0])}
    for item in items:
        assert "7FE00010" not in item and item["00100010"]["Value"] == [{"Alphabetic": "DOE^JANE"}]
        assert uid(item, "00100020") == "P2" and item["00280010"]["vr"] == "US"
    one = node.sent["p1"][0]
    (item,) = get(node, f"/studies/{node.study['p1']}/series/{node.series['p1']}/instances/{sop_uid(one)}"
                        "/metadata").json()
    assert item["00281050"]["Value"] == [40] and uid(item, "00083002") == ExplicitVRLittleEndian
    assert len(get(node, f"/studies/{node.study['p1']}/series/{node.series['p1']}/metadata").json()) == 2


def test_rendered_frames_and_wado_uri(node):
    grey = node.sent["p1"][0]
    base = f"/studies/{node.study['p1']}/series/{node.series['p1']}/instances/{sop_uid(grey)}"
    png = get(node, base + "/rendered", headers={"Accept": "image/png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (64, 48) and image.mode == "L"
    jpeg = get(node, base + "/frames/1/rendered")                 # no Accept: JPEG
    assert jpeg.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(jpeg.content)).size == (64, 48)
    assert get(node, base + "/rendered", params={"accept": "image/png"},
               headers={"Accept": "image/jpeg"}).headers["content-type"] == "image/png"

    rle = node.sent["p2_rle"][0]
    frames = f"/studies/{node.study['p2']}/series/{node.series['p2_rle']}/instances/{sop_uid(rle)}/frames"
    second = Image.open(io.BytesIO(get(node, frames + "/2/rendered", headers={"Accept": "image/png"}).content))
    assert second.size == (100, 100) and second.mode == "RGB"
    assert np.array_equal(np.asarray(second), pydicom.dcmread(rle).pixel_array[1])      # RGB: no windowing
    assert get(node, frames + "/3/rendered").status_code == 404
    assert get(node, frames + "/0/rendered").status_code == 400
    assert get(node, base + "/rendered", headers={"Accept": "image/gif"}).status_code == 406

    wado = {"requestType": "WADO", "studyUID": node.study["p1"], "seriesUID": node.series["p1"],
            "objectUID": sop_uid(grey)}
    whole = get(node, "/wado", params={**wado, "contentType": "application/dicom"})
    assert whole.headers["content-type"] == "application/dicom" and whole.content == stored_file(node, sop_uid(grey))
    assert Image.open(io.BytesIO(get(node, "/wado", params=wado).content)).format == "JPEG"
    assert get(node, "/wado", params={**wado, "requestType": "OTHER"}).status_code == 400


# ----- accounts and audit ------------------------------------------------------------------

def test_dicomweb_needs_an_account_basic_or_session(node):
    anonymous = get(node, "/studies", user=None)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Basic realm=")
    assert anonymous.headers["content-type"] == "application/json"           # never the login page
    wrong = httpx.get(node.base + "/studies", auth=("cleo", "not-her-password"), timeout=30)
    assert wrong.status_code == 401 and "Basic" in wrong.headers["www-authenticate"]
    bearer = httpx.get(node.base + "/studies", headers={"Authorization": "Bearer abc"}, timeout=30)
    assert bearer.status_code == 401
    assert get(node, "/studies").status_code == 200

    # The web session works too: log in through the JSON API, then no Authorization header.
    with httpx.Client(base_url=node.base.removesuffix("/dicomweb"), timeout=30) as client:
        token = client.get("/api/session").json()["csrf_token"]
        login = client.post("/api/login", json={"name": "dora", "password": USERS["dora"][1]},
                            headers={"X-CSRF-Token": token})
        assert login.status_code == 200
        assert client.get("/dicomweb/studies", params={"PatientID": "P9"}).status_code == 200

    # A disabled account is refused at once, though its password was verified a moment ago.
    assert get(node, "/studies", user="dora").status_code == 200
    node.accounts.set_disabled("dora")
    try:
        assert get(node, "/studies", user="dora").status_code == 401
    finally:
        node.accounts.set_disabled("dora", False)


def test_a_viewers_parallel_first_requests_check_the_password_once(node):
    """Viewers open with several requests at once; argon2 checks run two at a time (the rest would
    wait a second, then get 503): requests with the same credentials wait for the first check."""
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: get(node, "/studies", user="eve").status_code, range(8)))
    assert statuses == [200] * 8
    with node.engine.connect() as conn:
        logins = conn.execute(select(AuditEvent).where(AuditEvent.user == "eve", AuditEvent.action == "login")).all()
    assert [r.detail for r in logins] == [{"via": "http-basic"}]


def test_searches_and_retrievals_are_audited_without_phi(node):
    grey = node.sent["p1"][0]
    instance = f"/studies/{node.study['p1']}/series/{node.series['p1']}/instances/{sop_uid(grey)}"
    assert httpx.get(node.base + "/studies", auth=("cleo", "wrong-password"), timeout=30).status_code == 401
    assert get(node, instance + "/metadata").status_code == 200
    assert get(node, instance + "/rendered").status_code == 200
    assert get(node, "/studies", params={"PatientID": "P1"}).status_code == 200
    assert get(node, f"/studies/{node.study['p2']}").status_code == 200
    with node.engine.connect() as conn:
        rows = list(conn.execute(select(AuditEvent).where(AuditEvent.user == "cleo").order_by(AuditEvent.id)))
    search = [r for r in rows if r.action == "dicomweb_search"][-1]
    retrieve = [r for r in rows if r.action == "dicomweb_retrieve"][-1]
    assert search.target == "dicomweb:study"
    assert search.detail == {"matches": 2, "studies": sorted([node.study["p1"], node.study["p2"]])}
    assert retrieve.target == "dicomweb:study" and retrieve.detail == {"instances": 2, "studies": [node.study["p2"]]}
    assert {"dicomweb_metadata", "dicomweb_rendered", "login", "login_failed"} <= {r.action for r in rows}
    assert [r.detail for r in rows if r.action == "login_failed"][-1] == {"via": "http-basic"}
    text = json.dumps([[r.target, r.detail] for r in rows])
    assert not any(re.search(rf"\b{re.escape(phi)}\b", text) for phi in PHI), text
