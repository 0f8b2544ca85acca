"""What the fuzzing run found: 500s (huge ids, odd images, an empty Patient ID, unhandled errors
without the security headers), error bodies missing from the OpenAPI schema, LIKE wildcards in the
name search."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.test_priors import add_study
from tests.web.site import logged_in, patient_pk
from web.thumbnails import ThumbnailError, render

TOO_BIG = ("9223372036854775808", "99999999999999999999999", "-9223372036854775809")
SECURITY_HEADERS = {"content-security-policy", "x-frame-options", "x-content-type-options", "referrer-policy",
                    "cache-control"}


# ----- ids that do not fit the database's integers -----------------------------------------------

def test_ids_past_64_bits_are_refused_clearly_not_500(site):
    c, token = logged_in(site, "ada")
    for big in TOO_BIG:
        for method, path in (("GET", f"/api/links/{big}"), ("POST", f"/api/links/{big}/review"),
                             ("GET", f"/api/patients/{big}/priors"), ("GET", f"/links/{big}"),
                             ("POST", f"/links/{big}/review"), ("GET", f"/patients/{big}"),
                             ("GET", f"/thumbnails/series/{big}.png"), ("POST", f"/users/{big}/disabled")):
            api = path.startswith("/api/")
            body = ({"json": {"decision": "confirm"}} if api else
                    {"data": {"decision": "confirm", "disabled": "1"}} if method == "POST" else {})
            answer = c.request(method, path, headers={"X-CSRF-Token": token}, **body)
            assert answer.status_code in (404, 422), (method, path, answer.status_code)
            message = answer.json()["detail"] if api else answer.text        # names the id that is wrong
            assert any(f"path.{name}" in message for name in ("link_id", "patient_pk", "series_pk", "user_id"))


# ----- thumbnails of odd images ------------------------------------------------------------------

def _image(rows=4, cols=4, bits=16, samples=1, photometric="MONOCHROME2", frames=None, data=None, tags=None):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "ODD1", "ODD^IMAGE", "OT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = generate_uid(), generate_uid(), 1
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, cols, bits, bits, bits - 1
    ds.PixelRepresentation, ds.SamplesPerPixel, ds.PhotometricInterpretation = 0, samples, photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames:
        ds.NumberOfFrames = frames
    if data is None:
        count = rows * cols * samples * (frames or 1)
        data = (np.arange(count) % 200).astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    ds.PixelData = data
    for tag, (vr, value) in (tags or {}).items():   # raw VRs, so malformed values are stored as they come
        ds.add_new(tag, vr, value)
    return ds


ODD = {
    "zero rows": dict(rows=0, data=b""),
    "1 pixel": dict(rows=1, cols=1),
    "1 pixel rgb": dict(rows=1, cols=1, bits=8, samples=3, photometric="RGB"),
    "truncated pixel data": dict(data=b"\0\1\2"),
    "12-bit allocation": dict(bits=12),
    "32-bit": dict(bits=32, data=np.arange(16, dtype=np.uint32).tobytes()),
    "rgb multi-frame": dict(bits=8, samples=3, photometric="RGB", frames=3),
    "multi-frame": dict(frames=3),
    "palette without its LUT": dict(bits=8, photometric="PALETTE COLOR"),
    "window width 0": dict(tags={0x00281050: ("DS", "10"), 0x00281051: ("DS", "0")}),
    "window not a number": dict(tags={0x00281050: ("LO", "x"), 0x00281051: ("LO", "y")}),
    "rescale slope not a number": dict(tags={0x00281053: ("LO", "abc"), 0x00281052: ("LO", "0")}),
    "rescale NaN": dict(tags={0x00281053: ("LO", "NaN"), 0x00281052: ("LO", "inf")}),
    "no pixel data": dict(data=b""),
}


@pytest.mark.parametrize("case", sorted(ODD))
def test_render_gives_a_png_or_a_thumbnail_error_for_odd_images(case, tmp_path):
    path = tmp_path / "odd.dcm"
    _image(**ODD[case]).save_as(path, enforce_file_format=True)
    try:
        png = render(path)
    except ThumbnailError:
        return
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def _store_series(site, path, n: int) -> int:
    """Record a stored file as a one-instance series, as ingest would after its checks (which
    may refuse some of these; files stored before such a check still reach the thumbnails)."""
    from db.records import InstanceHeader, PatientKey, Received, StoredFile

    relative = f"odd/{n}.dcm"
    (site["settings"].storage_dir / "odd").mkdir(parents=True, exist_ok=True)
    (site["settings"].storage_dir / relative).write_bytes(path.read_bytes())
    header = InstanceHeader(
        patient=PatientKey("ODD1", ""), study_uid=generate_uid(), series_uid=generate_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.7", sop_instance_uid=generate_uid(), patient_name="ODD^IMAGE",
        birth_date=None, sex=None, study_date=None, study_time=None, accession_number=None,
        study_description=None, modality="OT", series_number=1, instance_number=1)
    site["store"].record_instance(Received(header, StoredFile(relative, 100, "0" * 64, ExplicitVRLittleEndian),
                                           "TESTSCU", datetime.now(timezone.utc)))
    study = site["links"].find_studies(study_uids=[header.study_uid])[0]
    return site["store"].study_series([study.study_pk])[study.study_pk][0].series_pk


def test_thumbnail_route_answers_a_png_or_404_for_every_odd_image(site, tmp_path):
    series = []
    for n, case in enumerate(sorted(ODD)):
        path = tmp_path / f"odd{n}.dcm"
        _image(**ODD[case]).save_as(path, enforce_file_format=True)
        series.append(_store_series(site, path, n))
    c, _ = logged_in(site, "cleo")
    answers = [c.get(f"/thumbnails/series/{pk}.png") for pk in series]
    for case, answer in zip(sorted(ODD), answers):
        assert answer.status_code in (200, 404), (case, answer.status_code)
        if answer.status_code == 404:
            assert "no image to show" in answer.text and answer.headers["x-frame-options"] == "DENY"
    assert sum(a.status_code == 200 for a in answers) >= 5       # the sound ones still render


# ----- an empty Patient ID -----------------------------------------------------------------------

def test_timeline_of_a_patient_with_an_empty_patient_id_renders(site):
    add_study(site["store"], "", "", name="NOBODY^KNOWN", date="20220202")
    add_study(site["store"], "", "", name="NOBODY^KNOWN", date="20230303")
    c, _ = logged_in(site, "cleo")
    pk = patient_pk(site, "")
    page = c.get(f"/patients/{pk}")
    assert page.status_code == 200 and "20220202" in page.text and "20230303" in page.text
    api = c.get(f"/api/patients/{pk}/priors")
    assert api.status_code == 200 and len(api.json()["studies"]) == 2
    assert api.json()["patient"]["patient_pk"] == pk


# ----- unhandled errors --------------------------------------------------------------------------

def test_an_unhandled_error_answers_500_with_the_security_headers_and_logs_once(site, monkeypatch, caplog):
    from web import services

    def broken(ctx):
        raise RuntimeError("database fell over near P100")

    monkeypatch.setattr(services, "dashboard", broken)
    c, _ = logged_in(site, "cleo")
    c = TestClient(site["app"], base_url="http://testserver", cookies=dict(c.cookies),
                   raise_server_exceptions=False)
    caplog.set_level(logging.ERROR)
    for path in ("/api/dashboard", "/"):
        caplog.clear()
        answer = c.get(path)
        assert answer.status_code == 500, path
        assert SECURITY_HEADERS <= set(answer.headers), path
        assert answer.headers["cache-control"] == "no-store"
        assert "P100" not in answer.text and "Traceback" not in answer.text
        assert len([r for r in caplog.records if r.exc_info]) == 1, path
    assert c.get("/api/dashboard").json() == {"detail": "internal server error"}
    assert "internal server error" in c.get("/").text.lower()


# ----- the OpenAPI schema documents error bodies -------------------------------------------------

def test_openapi_documents_the_error_bodies_each_route_answers(site):
    c, _ = logged_in(site, "cleo")
    schema = c.get("/api/openapi.json").json()
    ops = {(m.upper(), p): op for p, methods in schema["paths"].items() for m, op in methods.items()}
    expected = {("POST", "/api/login"): {"401", "403", "422", "503"},
                ("GET", "/api/links/{link_id}"): {"401", "404", "422"},
                ("POST", "/api/links/{link_id}/review"): {"401", "403", "404", "409", "422"},
                ("GET", "/api/patients/{patient_pk}/priors"): {"401", "404", "422"},
                ("POST", "/api/patients/search"): {"401", "403", "422"},
                ("GET", "/api/audit"): {"401", "403", "422"},
                ("GET", "/api/links"): {"401", "422"},
                ("GET", "/api/dashboard"): {"401"}}
    components = schema["components"]["schemas"]
    for key, codes in expected.items():
        responses = ops[key]["responses"]
        assert codes <= set(responses), (key, set(responses))
        for code in codes:
            ref = responses[code]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
            assert "detail" in components[ref]["properties"], (key, code)
            if code == "422":
                assert "fields" in components[ref]["properties"], key
    assert "HTTPValidationError" not in components          # FastAPI's default shape is not what we answer
    retry = ops[("POST", "/api/login")]["responses"]["503"]["headers"]
    assert "Retry-After" in retry
    assert ops[("GET", "/api/links/{link_id}")]["parameters"][0]["schema"]["maximum"] == 2 ** 63 - 1


# ----- name search -------------------------------------------------------------------------------

def test_name_search_takes_like_wildcards_literally(store):
    """On SQLite and PostgreSQL (the store fixture runs on both)."""
    add_study(store, "W1", "X", name="SMITH^ANNA")
    add_study(store, "W2", "X", name="O_NEIL^SEAN")
    add_study(store, "W3", "X", name="PERCENT^100%")
    add_study(store, "W4", "X", name="BACK\\SLASH")
    names = {store.find_patient_pks(patient_id=p)[0]: p for p in ("W1", "W2", "W3", "W4")}
    found = {term: [names[pk] for pk in store.find_patient_pks(name=term)]
             for term in ("%", "_", "100%", "o_n", "%^%", "\\", "/", "smith", "a")}
    assert found == {"%": ["W3"], "_": ["W2"], "100%": ["W3"], "o_n": ["W2"], "%^%": [], "\\": ["W4"],
                     "/": [], "smith": ["W1"], "a": ["W1", "W2", "W4"]}


def test_name_search_of_a_wildcard_through_the_api_finds_nobody(site):
    c, token = logged_in(site, "cleo")
    for term in ("%", "_", "%%", "_%_"):
        answer = c.post("/api/patients/search", json={"name": term}, headers={"X-CSRF-Token": token})
        assert answer.status_code == 200 and answer.json() == [], term


def test_a_thumbnail_of_a_stream_that_panics_the_rle_decoder_is_a_thumbnail_error(tmp_path):
    """pylibjpeg-rle raises pyo3's PanicException (a BaseException) on this corrupted frame."""
    from tests.test_pipeline_robustness import rle_dataset

    path = tmp_path / "poisoned.dcm"
    rle_dataset(corrupt=True).save_as(path, enforce_file_format=True)
    with pytest.raises(ThumbnailError, match="PanicException"):
        render(path)
