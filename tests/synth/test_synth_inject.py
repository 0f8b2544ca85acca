"""Injected ID errors for a real labelled set: dicom-node convert --second-ids / --misfiled."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from PIL import Image

from synth.cli import main
from synth.inject import MISFILED, SAME, InjectError, inject_errors


def rows_of(patients: int, images: int) -> list[dict]:
    return [{"image": f"img/{p}-{k}.png", "patient_id": f"p{p}", "offset_days": str(10 * k),
             "sex": "MF"[p % 2], "age": str(30 + p), "patient_name": "KEPT^NAME", "birth_date": "19800101"}
            for p in range(patients) for k in range(images)]


def test_errors_fall_on_disjoint_persons_and_keep_the_truth():
    rows = inject_errors(rows_of(12, 3), second_ids=3, misfiled=2, seed=4)
    assert all(r["patient_name"] == "" and r["birth_date"] == "" for r in rows)
    errors = {}
    for r in rows:
        if r["error_id"]:
            errors.setdefault(r["error_id"], []).append(r)
    assert sorted(e[0]["error_kind"] for e in errors.values()) == [MISFILED] * 2 + [SAME] * 3
    persons = [r["person_id"] for e in errors.values() for r in e]
    targets = [e[0]["patient_id"] for e in errors.values() if e[0]["error_kind"] == MISFILED]
    assert len(set(persons) | set(targets)) == 3 + 2 + 2          # every error its own persons
    for e in errors.values():
        person = e[0]["person_id"]
        own = sorted(float(r["offset_days"]) for r in rows if r["person_id"] == person and not r["error_id"])
        if e[0]["error_kind"] == SAME:      # the later studies under one new ID; the earlier keep the old
            assert len({r["patient_id"] for r in e}) == 1 and e[0]["patient_id"] not in {f"p{p}" for p in range(12)}
            assert own and max(own) < min(float(r["offset_days"]) for r in e)
        else:                               # under the target's ID with the target's sex and age
            (r,) = e
            target = next(t for t in rows if t["person_id"] == r["patient_id"])
            assert r["person_id"] != r["patient_id"] and (r["sex"], r["age"]) == (target["sex"], target["age"])
    assert inject_errors(rows_of(12, 3), 3, 2, seed=4) == rows            # same seed, same errors
    assert inject_errors(rows_of(12, 3), 3, 2, seed=5) != rows
    with pytest.raises(InjectError, match="need 7 patients"):
        inject_errors(rows_of(6, 3), 3, 2, seed=0)


def test_convert_writes_the_stream_and_its_truth(tmp_path):
    d = tmp_path / "set"
    (d / "img").mkdir(parents=True)
    rows = rows_of(8, 2)
    for r in rows:
        Image.fromarray(np.full((32, 32), 40 + len(r["image"]), np.uint8)).save(d / r["image"])
    header = list(rows[0])
    (d / "manifest.csv").write_text(",".join(header) + "\n" + "".join(",".join(r[h] for h in header) + "\n"
                                                                       for r in rows))
    (d / "only.txt").write_text("\n".join(f"p{p}" for p in range(6)) + "\n")
    out = tmp_path / "out"
    assert main(["convert", "--manifest", str(d / "manifest.csv"), "--out", str(out), "--second-ids", "1",
                 "--misfiled", "1", "--error-seed", "2", "--patients-from", str(d / "only.txt"), "--quiet"]) == 0
    truth = json.loads((out / "truth.json").read_text())
    assert {s["person_id"] for s in truth["studies"]} == {f"p{p}" for p in range(6)}
    assert [e["kind"] for e in truth["errors"]] == [SAME, MISFILED]
    misfiled = truth["errors"][1]
    (study,) = [s for s in truth["studies"] if s["study_uid"] == misfiled["study_uids"][0]]
    assert study["patient_id"] == misfiled["patient_id"] != study["person_id"] == misfiled["person_id"]
    for path in out.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert ds.PatientName == "" and ds.PatientBirthDate == ""
    # too many errors for the set: a clear message, exit 2
    assert main(["convert", "--manifest", str(d / "manifest.csv"), "--out", str(tmp_path / "o2"),
                 "--second-ids", "5", "--misfiled", "5", "--quiet"]) == 2
