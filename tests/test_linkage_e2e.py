"""The mission in one test: injected ID errors found from C-STORE to `links`, with the shipped models.

dicom-node synth (default cohort, injected errors) -> DCMTK storescu -> running node ->
dicom-node process --until-idle -> dicom-node links --format json, scored against
truth.json: recall >= 0.9 of the injected errors at precision >= 0.8.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from linkage.scoring import format_report, score
from tests.helpers import need

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.dcmtk
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_injected_errors_are_flagged_from_storescu_to_links(start_node, tmp_path, capsys):
    storescu = need("storescu")
    cohort = tmp_path / "cohort"
    made = subprocess.run([sys.executable, "-m", "dicom_node", "synth", "--out", str(cohort), "--seed", "0",
                           "--quiet"], capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr
    truth = json.loads((cohort / "truth.json").read_text())
    assert truth["errors"], "the default cohort injects errors"

    node = start_node(pipeline={"enabled": False, "weights_dir": str(REPO / "models" / "weights")})
    sent = subprocess.run([storescu, "+sd", "+r", "+sp", "*.dcm", "-R", "-aec", "LINKNODE", "127.0.0.1",
                           str(node.port), str(cohort)], capture_output=True, text=True,
                          env={"TCP_NODELAY": "1"}, timeout=900)
    assert sent.returncode == 0, sent.stderr

    cli = [sys.executable, "-m", "dicom_node", "--config", str(node.config_path)]
    processed = subprocess.run([*cli, "process", "--until-idle", "--stable-now"], capture_output=True,
                               text=True, timeout=1200)
    assert processed.returncode == 0, processed.stdout + processed.stderr[-3000:]
    assert f"linked {sum(len(s['series_uids']) for s in truth['studies'])} series" in processed.stdout

    listed = subprocess.run([*cli, "links", "--format", "json"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    result = score(json.loads(listed.stdout), truth)
    with capsys.disabled():
        print("\n" + format_report(result))
    assert result["recall"] >= 0.9, format_report(result)
    assert result["precision"] >= 0.8, format_report(result)
