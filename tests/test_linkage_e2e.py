"""The mission in one run: injected ID errors found from C-STORE to `links`, with the shipped models.

dicom-node synth (default cohort, seed 0, injected errors) -> DCMTK storescu -> running node ->
dicom-node process --until-idle -> dicom-node links --format json, scored against truth.json.
The run happens once per module; the tests below read its score.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from linkage.scoring import MISFILED, SAME, format_report, score
from tests.helpers import RunningNode, need, node_config, write_toml

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, Path]:
    """(the links scored against truth.json, the node's storage folder)."""
    storescu = need("storescu")
    work = tmp_path_factory.mktemp("e2e")
    cohort = work / "cohort"
    made = subprocess.run([sys.executable, "-m", "dicom_node", "synth", "--out", str(cohort), "--seed", "0",
                           "--quiet"], capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr
    truth = json.loads((cohort / "truth.json").read_text())
    assert truth["errors"], "the default cohort injects errors"

    config = node_config(work, pipeline={"enabled": False, "weights_dir": str(REPO / "models" / "weights")})
    node = RunningNode(write_toml(work / "node.toml", config), config).start()
    try:
        sent = subprocess.run([storescu, "+sd", "+r", "+sp", "*.dcm", "-R", "-aec", "LINKNODE", "127.0.0.1",
                               str(node.port), str(cohort)], capture_output=True, text=True,
                              env={"TCP_NODELAY": "1"}, timeout=900)
        assert sent.returncode == 0, sent.stderr
    finally:
        node.stop()

    cli = [sys.executable, "-m", "dicom_node", "--config", str(node.config_path)]
    processed = subprocess.run([*cli, "process", "--until-idle", "--stable-now"], capture_output=True,
                               text=True, timeout=1200)
    assert processed.returncode == 0, processed.stdout + processed.stderr[-3000:]
    series = sum(len(s["series_uids"]) for s in truth["studies"])
    assert f"processed {series} series" in processed.stdout and f"linked {series} series" in processed.stdout

    listed = subprocess.run([*cli, "links", "--format", "json"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    result = score(json.loads(listed.stdout), truth)
    print("\n" + format_report(result))          # shown with -rP / on failure: the confusion of link kinds
    return result, Path(config["storage"]["dir"])


@pytest.fixture(scope="module")
def scored(run) -> dict:
    return run[0]


def test_checked_series_keep_their_image_features_on_disk(run):
    """Linkage checked dermoscopy and chest X-ray pairs and kept each compared series' features, so a
    restart does not read and describe those images again (models/inference/verification_files.py)."""
    kept = list((run[1] / "linkage-index" / "check-features").rglob("*.npz"))
    assert len(kept) >= 10, kept


def test_flags_are_precise_and_of_the_right_kind(scored):
    assert scored["precision"] >= 0.8, format_report(scored)
    # no link of one kind stands for an error of the other kind
    assert not any(pair.startswith(SAME) and pair.endswith(MISFILED) or
                   pair.startswith(MISFILED) and pair.endswith(SAME) for pair in scored["confusion"]), scored


def test_one_person_under_two_ids_is_found(scored):
    assert scored["by_kind"][SAME]["recall"] >= 0.9, format_report(scored)


def test_a_study_whose_demographics_disagree_with_its_patient_is_found(scored):
    # wrong_id_typed: someone's ID typed for another person, who keeps their own name
    assert not any(m["variant"] == "wrong_id_typed" for m in scored["missed"]), format_report(scored)


def test_recall_of_all_injected_errors_reaches_the_target(scored):
    assert scored["recall"] >= 0.9, format_report(scored)
