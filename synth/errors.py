"""Injected Patient ID errors and the ground truth (``truth.json``).

Two kinds, named as the linkage engine names its flags:

* ``same_patient_different_id`` — one person under a second Patient ID: either a
  duplicate registration at the same site (one study, same issuer, new ID) or a visit at a
  second site (all studies of that episode there, that site's issuer and a new ID).
* ``different_patient_same_id`` — a study of person X filed under person Y's Patient ID,
  usually with Y's registered demographics (wrong patient picked from the worklist), else
  with X's own name (Y's ID typed for X).
"""
from __future__ import annotations

from .common import rng_for
from .persons import SITE_ISSUERS, IdAllocator, Person, registered_demographics
from .plan import SynthConfig, set_site

KIND_SAME = "same_patient_different_id"
KIND_DIFF = "different_patient_same_id"


def inject_errors(cfg: SynthConfig, persons: list[Person], studies: list[dict]) -> list[dict]:
    """Modify the planned studies in place; return the error records."""
    ids = IdAllocator(cfg.seed + 7919)
    ids.used = {}
    for p in persons:            # never hand out an ID that a person already holds
        for issuer, pid in p.patient_ids.items():
            site = SITE_ISSUERS.index(issuer)
            ids.used.setdefault(site, set()).add(_number(pid))
    errors: list[dict] = []
    second_site: dict[tuple, dict] = {}       # (person, site) -> error record
    by_episode: dict[tuple, list[dict]] = {}
    for s in studies:
        by_episode.setdefault((s["person_index"], s["visit"]), []).append(s)
    home_of: dict[int, list[Person]] = {}
    for p in persons:
        home_of.setdefault(p.home_site, []).append(p)

    for s in studies:
        if s["error_ids"]:
            continue
        r = rng_for(cfg.seed, "error", s["key"])
        if r.random() >= cfg.error_rate:
            continue
        x = persons[s["person_index"]]
        if r.random() < 0.5 or len(persons) < 2:
            if cfg.sites > 1 and r.random() < 0.5:
                site = (x.home_site + 1 + int(r.integers(0, cfg.sites - 1))) % cfg.sites
                rec = second_site.get((x.index, site))
                issuer = SITE_ISSUERS[site]
                if rec is None:
                    new_id = x.patient_ids.get(issuer) or ids.new(site)
                    x.patient_ids.setdefault(issuer, new_id)
                    rec = _record(errors, KIND_SAME, "second_site", x, issuer=issuer,
                                  patient_id=new_id,
                                  original_patient_id=x.patient_ids[SITE_ISSUERS[x.home_site]],
                                  original_issuer=SITE_ISSUERS[x.home_site])
                    second_site[(x.index, site)] = rec
                for t in by_episode[(x.index, s["visit"])]:
                    if t["error_ids"]:
                        continue
                    set_site(t, persons, site, cfg.seed, boost=2.0)
                    t["patient_id"] = rec["patient_id"]
                    _attach(rec, t)
            else:
                new_id = ids.new(s["site"])
                rec = _record(errors, KIND_SAME, "duplicate_registration", x, issuer=s["issuer"],
                              patient_id=new_id, original_patient_id=s["patient_id"],
                              original_issuer=s["issuer"])
                s["registered"] = registered_demographics(x, s["site"], r, boost=4.0)
                s["patient_id"] = new_id
                _attach(rec, s)
        else:
            pool = [p for p in home_of.get(s["site"], []) if p.index != x.index]
            if not pool:
                pool = [p for p in persons if p.index != x.index]
            y = pool[int(r.integers(0, len(pool)))]
            y_home = SITE_ISSUERS[y.home_site]
            if y.home_site != s["site"]:
                set_site(s, persons, y.home_site, cfg.seed)
            wrong_patient = r.random() < 0.8
            rec = _record(errors, KIND_DIFF,
                          "wrong_patient_selected" if wrong_patient else "wrong_id_typed", x,
                          issuer=y_home, patient_id=y.patient_ids[y_home],
                          filed_under_person_id=y.person_id,
                          original_patient_id=x.patient_ids[SITE_ISSUERS[x.home_site]],
                          original_issuer=SITE_ISSUERS[x.home_site])
            rec["person_ids"] = [x.person_id, y.person_id]
            s["patient_id"] = y.patient_ids[y_home]
            if wrong_patient:
                s["registered"] = registered_demographics(y, y.home_site, r)
            _attach(rec, s)
    return errors


def _number(pid: str) -> int:
    return int("".join(c for c in pid if c.isdigit()) or 0)


def _record(errors, kind, variant, person, **extra) -> dict:
    rec = {"error_id": f"E{len(errors) + 1:04d}", "kind": kind, "variant": variant,
           "person_id": person.person_id, "person_ids": [person.person_id]}
    rec.update(extra)
    rec["study_uids"] = []
    rec["series_uids"] = []
    rec["study_keys"] = []
    errors.append(rec)
    return rec


def _attach(rec: dict, study: dict):
    study["error_ids"].append(rec["error_id"])
    rec["study_uids"].append(study["study_uid"])
    rec["study_keys"].append(study["key"])
    rec["series_uids"].extend(se["series_uid"] for se in study["series"])


def build_truth(cfg: SynthConfig, persons, studies, errors, series_files: dict) -> dict:
    """The truth document. ``series_files``: series_uid -> {path, n_instances, bytes}."""
    study_rows = []
    series_map = {}
    for s in studies:
        reg = s["registered"]
        rows = []
        for se in s["series"]:
            info = series_files.get(se["series_uid"], {})
            series_map[se["series_uid"]] = s["person_id"]
            rows.append({"series_uid": se["series_uid"], "number": se["number"],
                         "description": se["description"], "path": info.get("path"),
                         "n_instances": info.get("n_instances", 0)})
        study_rows.append({
            "study_uid": s["study_uid"], "key": s["key"], "person_id": s["person_id"],
            "patient_id": s["patient_id"], "issuer": s["issuer"], "modality": s["modality"],
            "dicom_modality": s.get("dicom_modality"), "visit": s["visit"], "date": s["date"],
            "accession": s["accession"], "site": SITE_ISSUERS[s["site"]],
            "registered": {"name": reg["name"], "birth_date": reg["birth_date"], "sex": reg["sex"],
                           "noise": reg["noise"]},
            "protocol": s["protocol"], "series_uids": [se["series_uid"] for se in s["series"]],
            "series": rows, "error_ids": s["error_ids"],
        })
    return {
        "format": "dicom-node-synth-truth/1",
        "seed": cfg.seed,
        "config": cfg.to_json(),
        "persons": [p.to_json() for p in persons],
        "studies": study_rows,
        "series": series_map,
        "errors": errors,
    }
