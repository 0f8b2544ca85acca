"""Inside `serve`, linking follows embedding by itself: no command needed after the C-STORE."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from db.models import Link, Series
from linkage.scoring import score
from tests.helpers import need

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.dcmtk
@pytest.mark.slow
def test_serve_links_each_series_after_embedding_it(start_node, tmp_path):
    storescu = need("storescu")
    cohort = tmp_path / "cohort"
    made = subprocess.run([sys.executable, "-m", "dicom_node", "synth", "--out", str(cohort), "--patients", "8",
                           "--visits", "2", "--preset", "small", "--modalities", "cxr", "--error-rate", "0.4",
                           "--seed", "11", "--quiet"], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    truth = json.loads((cohort / "truth.json").read_text())
    node = start_node(series={"stable_after_s": 1.0, "check_interval_s": 0.3},
                      pipeline={"enabled": True, "device": "cpu", "weights_dir": str(REPO / "models" / "weights")})
    sent = subprocess.run([storescu, "+sd", "+r", "+sp", "*.dcm", "-aec", "LINKNODE", "127.0.0.1", str(node.port),
                           str(cohort)], capture_output=True, text=True, env={"TCP_NODELAY": "1"}, timeout=300)
    assert sent.returncode == 0, sent.stderr

    engine = create_engine(node.settings.database_url)
    expected = len(truth["series"])
    deadline = time.monotonic() + 240
    with engine.connect() as connection:
        while time.monotonic() < deadline:
            linked = connection.scalar(select(func.count()).select_from(Series).where(Series.linked_at.is_not(None)))
            if linked == expected:
                break
            time.sleep(0.5)
        assert linked == expected, node.log()[-3000:]
        assert connection.scalar(select(func.count()).select_from(Link)) >= 1
    engine.dispose()
    assert "linking pass failed" not in node.log() and "Traceback" not in node.log()

    listed = subprocess.run([sys.executable, "-m", "dicom_node", "--config", str(node.config_path), "links",
                             "--format", "json"], capture_output=True, text=True, timeout=120)
    result = score(json.loads(listed.stdout), truth)
    # the duplicate registrations carry (noisy) copies of the person's demographics
    assert result["by_kind"]["same_patient_different_id"]["found"] >= 1, result
    assert result["by_kind"]["same_patient_different_id"]["correct_links"] == \
        result["by_kind"]["same_patient_different_id"]["links"], result
