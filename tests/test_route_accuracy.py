"""benchmarks/route_accuracy.py: a held-out synthetic cohort scored per route, with its baselines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_route_accuracy_scores_a_route_against_its_baselines(tmp_path):
    out = tmp_path / "ra.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "route_accuracy.py"), "--routes", "fundus",
                          "--patients", "3", "--no-real", "--threads", "1", "--work", str(tmp_path / "work"),
                          "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["route"] == "fundus" and row["set"] == "synthetic seed 300"
    assert row["model"]["name"].startswith("fundus")
    # 3 persons x 3 visits, every one scored by the model and the pixel baseline
    assert row["results"]["model"]["images"] == 9 and row["results"]["model"]["patients"] == 3
    assert set(row["results"]) >= {"model", "pixel-cosine", "frozen-lite0"}
    table = [line for line in run.stdout.splitlines() if line.startswith("| fundus | synthetic seed 300 | 9 / 3 |")]
    assert len(table) == 1
