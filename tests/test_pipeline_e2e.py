"""From C-STORE to embedding: a synthetic cohort sent by DCMTK storescu to a running node."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from db.models import Embedding, Series, SeriesState
from tests.helpers import need, node_config, write_toml

ROUTE_OF = {"cxr": "chest_xr", "ct": "chest_ct", "mr": "brain_mr", "fundus": "fundus", "derm": "dermoscopy"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "cohort"
    run = subprocess.run([sys.executable, "-m", "dicom_node", "synth", "--out", str(out), "--patients", "3",
                          "--visits", "1", "--preset", "small", "--seed", "7", "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return out


def truth_routes(cohort: Path) -> dict[str, str]:
    truth = json.loads((cohort / "truth.json").read_text())
    return {uid: ROUTE_OF[study["modality"]] for study in truth["studies"] for uid in study["series_uids"]}


def corrupt_series(cohort: Path, folder: Path) -> str:
    """A copy of one CT series with one slice of another size: inconsistent, must fail."""
    ct_dir = next(p.parent for p in sorted(cohort.rglob("*.dcm"))
                  if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT")
    series_uid = generate_uid()
    folder.mkdir()
    for n, path in enumerate(sorted(ct_dir.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if n == 3:
            ds.Rows, ds.Columns = ds.Rows // 2, ds.Columns // 2
            ds.PixelData = ds.pixel_array[::2, ::2].copy().tobytes()
        ds.save_as(folder / f"{n}.dcm")
    return series_uid


def series_rows(db_url: str) -> dict[str, tuple[Series, Embedding | None]]:
    engine = create_engine(db_url)
    with Session(engine) as session:
        rows = {s.series_uid: (s, s.embedding) for s in session.scalars(select(Series))}
    engine.dispose()
    return rows


@pytest.mark.dcmtk
@pytest.mark.slow
def test_storescu_to_embeddings_with_a_known_route_for_every_series(start_node, cohort, tmp_path):
    storescu = need("storescu")
    broken = corrupt_series(cohort, tmp_path / "broken")
    node = start_node(series={"stable_after_s": 1.0, "check_interval_s": 0.3},
                      pipeline={"enabled": True, "workers": 1, "device": "cpu", "retry_base_delay_s": 0.5,
                                "max_attempts": 2})
    # -R: propose exactly the SOP classes found (DCMTK 3.6.7 does not propose
    # Dermoscopic Photography by default).
    for folder in (cohort, tmp_path / "broken"):
        run = subprocess.run([storescu, "+sd", "+r", "+sp", "*.dcm", "-R", "-aec", "LINKNODE", "127.0.0.1", str(node.port), str(folder)],
                             capture_output=True, text=True, env={"TCP_NODELAY": "1"}, timeout=300)
        assert run.returncode == 0, run.stderr
    expected = truth_routes(cohort)
    db_url = node.settings.database_url
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert "pipeline could not start" not in node.log(), node.log()
        rows = series_rows(db_url)
        if len(rows) == len(expected) + 1 and all(s.state in (SeriesState.done, SeriesState.failed)
                                                  for s, _ in rows.values()):
            break
        time.sleep(1)
    rows = series_rows(db_url)
    states = {uid: s.state.value for uid, (s, _) in rows.items()}
    assert all(states[uid] == "done" for uid in expected), (states, node.log()[-3000:])

    for uid, route in expected.items():
        series, embedding = rows[uid]
        assert series.route == route, (uid, series.route, series.route_findings)
        assert embedding is not None and embedding.route == route and embedding.model_name
        vector = np.frombuffer(embedding.vector, "<f4")
        assert vector.shape == (embedding.dim,) and abs(np.linalg.norm(vector) - 1) < 1e-4

    bad, bad_embedding = rows[broken]
    assert bad.state == SeriesState.failed and bad_embedding is None
    assert "size" in bad.last_error.lower(), bad.last_error


@pytest.mark.postgres
@pytest.mark.slow
def test_two_workers_on_postgresql_never_process_a_series_twice(cohort, tmp_path, request):
    from tests.helpers import _drop_postgres_database, _postgres_database, POSTGRES_ADMIN_URL

    name = _postgres_database()
    request.addfinalizer(lambda: _drop_postgres_database(name))
    db_url = f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    config = write_toml(tmp_path / "node.toml",
                        node_config(tmp_path, db_url, pipeline={"device": "cpu", "batch_size": 2}))
    cli = [sys.executable, "-m", "dicom_node", "--config", str(config)]
    files = [str(path) for path in sorted(cohort.rglob("*.dcm"))]
    assert subprocess.run([*cli, "import", *files], capture_output=True, timeout=300).returncode == 0
    workers = [subprocess.Popen([*cli, "process", "--until-idle", "--stable-now"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), outputs
    counts = [int(out.rsplit("processed ", 1)[1].split()[0]) for out in outputs]
    rows = series_rows(db_url)
    assert sum(counts) == len(rows) == len(truth_routes(cohort))
    assert all(series.state == SeriesState.done and series.attempts == 1 for series, _ in rows.values())
    assert all(embedding is not None for _, embedding in rows.values())
