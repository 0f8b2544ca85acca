"""The real-image stream, small: real adult radiographs with injected ID errors, no names or birth
dates, sent with DCMTK storescu to a running node, processed and scored (the suite's version of
`benchmarks/linkage_accuracy.py --real`). It checks the path, not the models' accuracy: the
benchmark's numbers are in docs/accuracy.md."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import create_engine, select

from db.models import Series
from tests.helpers import load_benchmark, need

REPO = Path(__file__).resolve().parents[1]
ADULTS = REPO.parent / "shared" / "data" / "cxr-adult-figures" / "manifest.csv"

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow,
              pytest.mark.skipif(not ADULTS.is_file(), reason=f"real data not present at {ADULTS}")]


def test_a_real_stream_with_injected_errors_is_received_linked_and_scored(tmp_path):
    bench = load_benchmark("linkage_accuracy")
    need("storescu")
    with open(ADULTS, newline="") as fh:
        rows = list(csv.DictReader(fh))
    patients = sorted({r["patient_id"] for r in rows if sum(x["patient_id"] == r["patient_id"] for x in rows) >= 2})
    keep = set(patients[:14])
    small = tmp_path / "manifest.csv"
    with open(small, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "image": str(ADULTS.parent / r["image"])} for r in rows if r["patient_id"] in keep)
    real = argparse.Namespace(real=small, second_ids=2, misfiled=2, patients_from=None)
    result = bench.run_seed(3, REPO / "models" / "weights", tmp_path / "run", real)

    truth = json.loads((tmp_path / "run" / "cohort" / "truth.json").read_text())
    assert result["errors"] == 4 and result["by_kind"][bench.SAME]["errors"] == 2
    engine = create_engine(f"sqlite:///{tmp_path / 'run' / 'node.db'}")
    with engine.connect() as connection:      # every image arrived over C-STORE, was processed, and linked if routed
        states = connection.execute(select(Series.state, Series.route, Series.linked_at.is_not(None))).all()
    engine.dispose()
    assert len(states) == len(truth["studies"]) and all(state.value == "done" for state, _, _ in states)
    assert all(linked == (route != "other") for _, route, linked in states)
    stored = [pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "run" / "storage").rglob("*.dcm")]
    assert len(stored) == len(truth["studies"]) and all(ds.PatientName == "" and ds.PatientBirthDate == ""
                                                        for ds in stored)
    misfiled = next(e for e in truth["errors"] if e["kind"] == bench.MISFILED)
    moved = next(ds for ds in stored if ds.StudyInstanceUID == misfiled["study_uids"][0])
    assert moved.PatientID == misfiled["patient_id"] != misfiled["person_id"]
    at, queue = result["precision_at"], result["queue"]
    assert queue["links"] >= result["links"] and queue["found"] >= result["found"]      # flags come first
    assert at[10]["n"] == min(10, queue["links"]) and (at[10]["precision"] is None) == (queue["links"] == 0)
