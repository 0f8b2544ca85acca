"""truth.json is consistent with the files, and every injected error is visible in the headers."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pydicom
import pytest

from synth.common import rng_for
from synth.errors import inject_errors
from synth.persons import Person, registered_demographics, strip_diacritics
from synth.plan import SynthConfig, build_plan


@pytest.fixture(scope="module")
def headers(small_cohort, truth):
    """series_uid -> first instance header."""
    out = {}
    for st in truth["studies"]:
        for se in st["series"]:
            files = sorted((small_cohort / se["path"]).glob("*.dcm"))
            assert len(files) == se["n_instances"] > 0
            out[se["series_uid"]] = pydicom.dcmread(files[0], stop_before_pixels=True)
    return out


def test_truth_lists_every_file_and_series(small_cohort, truth):
    listed = {se["series_uid"] for st in truth["studies"] for se in st["series"]}
    assert listed == set(truth["series"])
    on_disk = {p.parent.name for p in small_cohort.rglob("*.dcm")}
    assert on_disk == listed
    n_files = sum(se["n_instances"] for st in truth["studies"] for se in st["series"])
    assert n_files == len(list(small_cohort.rglob("*.dcm")))
    persons = {p["person_id"] for p in truth["persons"]}
    assert set(truth["series"].values()) <= persons
    assert len(truth["studies"]) == 8 * 2 * 5


def test_headers_carry_what_truth_says_was_sent(truth, headers):
    for st in truth["studies"]:
        for se in st["series"]:
            ds = headers[se["series_uid"]]
            assert ds.PatientID == st["patient_id"]
            assert ds.IssuerOfPatientID == st["issuer"]
            assert ds.StudyInstanceUID == st["study_uid"]
            assert ds.StudyDate == st["date"]
            assert ds.AccessionNumber == st["accession"]
            assert ds.Modality == st["dicom_modality"]
            assert str(ds.PatientName) == st["registered"]["name"]
            assert ds.PatientBirthDate == st["registered"]["birth_date"]
            assert ds.PatientSex == st["registered"]["sex"]
            assert se["path"].split("/")[0] == st["patient_id"]


def test_error_free_studies_carry_the_persons_home_id(truth):
    persons = {p["person_id"]: p for p in truth["persons"]}
    from synth.persons import SITE_ISSUERS
    clean = [st for st in truth["studies"] if not st["error_ids"]]
    assert clean
    for st in clean:
        p = persons[st["person_id"]]
        home = SITE_ISSUERS[p["home_site"]]
        assert (st["issuer"], st["patient_id"]) == (home, p["patient_ids"][home])


def test_every_injected_error_is_visible_in_headers(truth, headers):
    persons = {p["person_id"]: p for p in truth["persons"]}
    studies = {st["study_uid"]: st for st in truth["studies"]}
    from synth.persons import SITE_ISSUERS
    kinds = Counter(e["kind"] for e in truth["errors"])
    assert kinds["same_patient_different_id"] >= 1 and kinds["different_patient_same_id"] >= 1
    assert set(kinds) == {"same_patient_different_id", "different_patient_same_id"}
    for err in truth["errors"]:
        x = persons[err["person_id"]]
        x_home = SITE_ISSUERS[x["home_site"]]
        assert err["study_uids"] and err["series_uids"]
        for su in err["series_uids"]:
            ds = headers[su]
            assert truth["series"][su] == x["person_id"]
            st = studies[ds.StudyInstanceUID]
            assert err["error_id"] in st["error_ids"]
            assert (ds.IssuerOfPatientID, ds.PatientID) == (err["issuer"], err["patient_id"])
            if err["kind"] == "same_patient_different_id":
                # the true person, under an ID that is not their home ID
                assert (ds.IssuerOfPatientID, ds.PatientID) != (x_home, x["patient_ids"][x_home])
                assert (x["patient_ids"].get(err["issuer"]) == err["patient_id"]
                        or err["variant"] == "duplicate_registration")
                if err["variant"] == "second_site":
                    assert ds.IssuerOfPatientID != x_home
                else:
                    assert ds.IssuerOfPatientID == x_home
                # no other person is ever sent under this ID
                wrong_id = {e["error_id"] for e in truth["errors"] if e["kind"] == "different_patient_same_id"}
                owners = {s["person_id"] for s in truth["studies"]
                          if (s["issuer"], s["patient_id"]) == (err["issuer"], err["patient_id"])
                          and not wrong_id & set(s["error_ids"])}
                assert owners == {x["person_id"]}
            else:
                y = persons[err["filed_under_person_id"]]
                y_home = SITE_ISSUERS[y["home_site"]]
                assert y["person_id"] != x["person_id"]
                assert (ds.IssuerOfPatientID, ds.PatientID) == (y_home, y["patient_ids"][y_home])
                if err["variant"] == "wrong_patient_selected":
                    b = y["birth_date"]
                    assert ds.PatientBirthDate in ("", b, b[:4] + b[6:8] + b[4:6])


def test_second_site_ids_are_reused_for_the_person(truth):
    seen = {}
    for err in truth["errors"]:
        if err["variant"] == "second_site":
            key = (err["person_id"], err["issuer"])
            assert seen.setdefault(key, err["patient_id"]) == err["patient_id"]


def test_registration_noise_is_reflected_in_headers(truth, headers):
    kinds = Counter(k for st in truth["studies"] for k in st["registered"]["noise"])
    assert kinds, "no registration noise at all"
    persons = {p["person_id"]: p for p in truth["persons"]}
    for st in truth["studies"]:
        ds = headers[st["series_uids"][0]]
        noise = st["registered"]["noise"]
        if "missing_birth_date" in noise:
            assert ds.PatientBirthDate == ""
        if "swapped_name_order" in noise and not st["error_ids"]:
            p = persons[st["person_id"]]
            first = str(ds.PatientName).split("^")[0]
            assert strip_diacritics(first).upper() != strip_diacritics(p["family"]).upper() or p["given"] == p["family"]


def test_registration_noise_kinds_and_their_effect():
    p = Person(0, "P1", "F", "Müller", "Anna", "B", "19600307", 0, "20150101")
    seen = Counter()
    for i in range(3000):
        reg = registered_demographics(p, i % 2, rng_for(1, "t", i), boost=3.0)
        seen.update(reg["noise"])
        fam, giv = reg["name"].split("^")[:2]
        if "swapped_name_order" in reg["noise"]:
            assert fam[0].lower() == "a" and giv[0].lower() == "m"   # typos keep the first letter
        if "missing_birth_date" in reg["noise"]:
            assert reg["birth_date"] == ""
        if "birth_date_day_month_swapped" in reg["noise"]:
            assert reg["birth_date"] == "19600703"
        if "diacritics_stripped" in reg["noise"]:
            assert reg["charset"] is None and "ü" not in reg["name"]
    for k in ("typo_family_name", "typo_given_name", "swapped_name_order", "missing_birth_date",
              "birth_date_day_month_swapped", "missing_middle_name", "diacritics_stripped", "missing_sex"):
        assert seen[k] > 0, k


def test_siblings_are_recorded_and_share_family(truth):
    persons = {p["person_id"]: p for p in truth["persons"]}
    sibs = [p for p in truth["persons"] if p["sibling_of"]]
    assert sibs
    for p in sibs:
        parent = persons[p["sibling_of"]]
        assert p["family"] == parent["family"] and p["home_site"] == parent["home_site"]
        if p["twin"]:
            assert p["birth_date"] == parent["birth_date"]


def test_error_rate_controls_injection():
    counts = []
    for rate in (0.0, 0.1, 0.5):
        cfg = SynthConfig(seed=3, patients=40, visits=3, error_rate=rate)
        persons, studies = build_plan(cfg)
        errs = inject_errors(cfg, persons, studies)
        hit = sum(1 for s in studies if s["error_ids"]) / len(studies)
        counts.append((len(errs), hit))
    assert counts[0] == (0, 0.0)
    assert 0.04 < counts[1][1] < 0.2 and 0.35 < counts[2][1] < 0.75
    assert counts[1][0] < counts[2][0]


def test_ids_are_unique_per_person_and_issuer(truth):
    owner = {}
    for p in truth["persons"]:
        for issuer, pid in p["patient_ids"].items():
            assert owner.setdefault((issuer, pid), p["person_id"]) == p["person_id"]
    assert len({p["person_id"] for p in truth["persons"]}) == len(truth["persons"])
    accs = [st["accession"] for st in truth["studies"]]
    assert len(accs) == len(set(accs))
    assert np.all([st["date"] >= p["birth_date"] for st in truth["studies"]
                   for p in truth["persons"] if p["person_id"] == st["person_id"]])


def test_truth_is_plain_json(small_cohort):
    text = (small_cohort / "truth.json").read_text(encoding="utf-8")
    doc = json.loads(text)
    assert doc["seed"] == 11 and doc["config"]["patients"] == 8
    assert set(doc) >= {"seed", "persons", "studies", "series", "errors"}
