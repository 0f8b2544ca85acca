"""Training from the archive (`train --from-db`), the card's input geometry in the pipeline,
and `evaluate --from-db` on the card's validation patients."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch

from db.records import SeriesWork
from dicom_node.cli import main
from dicom_node.config import PipelineSettings
from models.inference.networks import DEFAULT_SPECS, EmbeddingNet, seeded, sha256_file, spec_dict
from models.inference.pipeline import SeriesPipeline
from models.inference.transforms import ROUTE_INPUTS, ROUTE_TRANSFORMS, route_chain, route_geometry
from tests.helpers import node_config, write_toml

ROUTER = Path(__file__).resolve().parents[1] / "models" / "weights" / "router"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A scratch node holding a processed 4-person synthetic cohort (CT and fundus, 2 visits each)."""
    root = tmp_path_factory.mktemp("archive")
    cohort = root / "cohort"
    run = subprocess.run([sys.executable, "-m", "dicom_node", "synth", "--out", str(cohort), "--patients", "4",
                          "--visits", "2", "--preset", "small", "--seed", "31", "--modalities", "ct", "fundus",
                          "--error-rate", "0", "--twin-rate", "0", "--jobs", "1", "--quiet"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    weights = root / "weights"                    # router only: identity networks untrained
    shutil.copytree(ROUTER, weights / "router")
    config = write_toml(root / "node.toml", node_config(root, pipeline={"enabled": True, "weights_dir": str(weights),
                                                                        "torch_threads": 1},
                                                        storage={"dir": str(root / "storage"), "fsync": False},
                                                        linkage={"enabled": False}))
    main(["--config", str(config), "import", str(cohort)])           # truth.json is refused, the rest stored
    assert main(["--config", str(config), "process", "--until-idle", "--stable-now"]) == 0
    return config, root


def _train(config, out, route, *extra):
    return main(["--config", str(config), "train", "--route", route, "--from-db", "--epochs", "1", "--threads", "1",
                 "--batch-size", "8", "--val-fraction", "0.5", "--widths", "8", "16", "16", "32", "--out", str(out),
                 *extra])


def test_route_geometry_defaults_and_overrides():
    assert route_geometry("chest_xr") == {"size": 224}
    assert route_geometry("fundus", {"size": 96, "transform": "x"}) == {"size": 96}
    assert route_geometry("chest_ct") == {"shape": [128, 128, 64], "spacing": [3.0, 3.0, 5.0]}
    assert route_geometry("brain_mr", {"shape": [48, 56, 32]})["spacing"] == [2.0, 2.0, 2.5]
    with pytest.raises(ValueError):
        route_geometry("chest_ct", {"shape": [8, 8]})
    img = torch.rand(1, 300, 200)
    assert tuple(route_chain("chest_xr", {"size": 64})(img).shape) == (1, 64, 64)
    assert tuple(ROUTE_TRANSFORMS["chest_xr"](img).shape) == (1, *ROUTE_INPUTS["chest_xr"]["shape"])


def test_from_db_trains_3d_and_2d_and_the_pipeline_uses_the_card_geometry(archive, tmp_path):
    config, root = archive
    ct_out, fundus_out = tmp_path / "chest_ct", tmp_path / "fundus"
    assert _train(config, ct_out, "chest_ct", "--shape", "16", "16", "8", "--spacing", "24", "24", "40") == 0
    assert _train(config, fundus_out, "fundus", "--size", "32") == 0
    ct = json.loads((ct_out / "card.json").read_text())
    fundus = json.loads((fundus_out / "card.json").read_text())
    assert ct["input"]["shape"] == [16, 16, 8] and ct["input"]["spacing"] == [24.0, 24.0, 40.0]
    assert ct["arch"]["spatial_dims"] == 3 and fundus["input"]["size"] == 32
    assert ct["training_data"]["database_series"] == 8 and fundus["training_data"]["database_series"] == 8
    assert fundus["training_data"]["database_images"] == 16          # both eyes per fundus series
    assert all(p.count("|") == 1 for p in ct["validation_patients"]) and len(ct["validation_patients"]) == 2
    assert ct["sha256"] == sha256_file(ct_out / "model.pt")

    weights = tmp_path / "weights"
    shutil.copytree(ROUTER, weights / "router")
    for route, out in (("chest_ct", ct_out), ("fundus", fundus_out)):
        (weights / route).mkdir()
        for name in ("model.pt", "card.json"):
            shutil.copy(out / name, weights / route / name)
    pipeline = SeriesPipeline(PipelineSettings(), weights)
    assert pipeline.models["chest_ct"].version == ct["version"]
    assert pipeline.models["chest_xr"].version == "untrained-seed0"
    assert tuple(pipeline.transforms["chest_xr"](torch.rand(1, 50, 40)).shape) == (1, 224, 224)   # no card: default
    cohort = root / "cohort"
    truth = json.loads((cohort / "truth.json").read_text())
    for study in truth["studies"][:4]:
        se = study["series"][0]
        paths = [str(p.relative_to(cohort)) for p in sorted((cohort / se["path"]).glob("*.dcm"))]
        modality = "CT" if study["modality"] == "ct" else "OP"
        body = "CHEST" if modality == "CT" else "EYE"
        decision, emb = pipeline.process(SeriesWork(1, se["series_uid"], "t", 1, modality, body, paths), cohort)
        model = pipeline.models[decision.route]
        assert emb.model_version == model.version and emb.dim == 256
        assert abs(float(np.linalg.norm(np.frombuffer(emb.vector, "<f4"))) - 1) < 1e-5
    loaded = pipeline.transforms["chest_ct"]
    vol = torch.zeros(1, 40, 40, 20)
    from monai.data import MetaTensor
    out = loaded(MetaTensor(vol, affine=torch.diag(torch.tensor([10.0, 10.0, 10.0, 1.0]))))
    assert tuple(out.shape) == (1, 16, 16, 8)

    # evaluate --from-db on the training archive: only the card's validation patients, embedded now
    weights_only_ct = tmp_path / "w2"
    shutil.copytree(weights / "chest_ct", weights_only_ct / "chest_ct")
    report = tmp_path / "report.json"
    assert main(["--config", str(config), "evaluate", "--route", "chest_ct", "--from-db", "--weights-dir",
                 str(weights_only_ct), "--json", str(report), "--update-card", "test-archive"]) == 0
    r = json.loads(report.read_text())
    assert "validation patients" in r["source"]["selection"] and r["results"]["model"]["patients"] == 2
    assert set(r["results"]) == {"model", "pixel-cosine"}
    card = json.loads((weights_only_ct / "chest_ct" / "card.json").read_text())
    assert card["metrics"]["heldout"]["test-archive"]["patients"] == 2
    assert "held-out pairs" in card["calibration"]["fitted_on"]
    assert card["sha256"] == sha256_file(weights_only_ct / "chest_ct" / "model.pt")


def test_manifest_of_dicom_series_trains_and_evaluates_a_volume_route(archive, tmp_path):
    from models.datasets.synth_manifest import main as synth_manifest
    _, root = archive
    manifest = tmp_path / "ct.csv"
    assert synth_manifest([str(root / "cohort"), "--modality", "ct", "--out", str(manifest)]) == 0
    out = tmp_path / "weights" / "chest_ct"
    assert main(["train", "--route", "chest_ct", "--manifest", str(manifest), "--epochs", "1", "--threads", "1",
                 "--batch-size", "4", "--val-fraction", "0.5", "--widths", "8", "16", "16", "32",
                 "--shape", "16", "16", "8", "--spacing", "24", "24", "40", "--out", str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["training_data"]["manifest_rows"] == [8] and card["validation_patients"][0].startswith("seed31-")
    (out / "checkpoint.pt").unlink()
    report = tmp_path / "r.json"
    assert main(["evaluate", "--route", "chest_ct", "--manifest", str(manifest), "--weights-dir",
                 str(tmp_path / "weights"), "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["results"]["model"]["patients"] == 2 and r["source"]["input"]["shape"] == [16, 16, 8]


def test_manifest_and_synthetic_do_not_combine(tmp_path):
    assert main(["train", "--route", "chest_xr", "--synthetic", "4", "--from-db", "--out", str(tmp_path)]) == 2


def test_card_geometry_in_the_pipeline_for_2d(tmp_path):
    folder = tmp_path / "weights" / "dermoscopy"
    folder.mkdir(parents=True)
    spec = DEFAULT_SPECS["dermoscopy"]
    torch.save(seeded(lambda: EmbeddingNet(spec), 1).state_dict(), folder / "model.pt")
    (folder / "card.json").write_text(json.dumps({"name": "d", "version": "1", "arch": spec_dict(spec),
                                                  "input": {"size": 48}}))
    pipeline = SeriesPipeline(PipelineSettings(), tmp_path / "weights")
    assert tuple(pipeline.transforms["dermoscopy"](torch.rand(3, 100, 80)).shape) == (3, 48, 48)
    assert tuple(pipeline.transforms["fundus"](torch.rand(3, 100, 80)).shape) == (3, 224, 224)


def test_worker_processes_load_the_same_examples_as_one(archive, tmp_path):
    from dicom_node.config import load_settings
    from models.datasets.examples import load_examples, load_manifest_examples, read_manifest
    from models.datasets.synth_manifest import main as synth_manifest
    from models.inference.errors import SeriesError
    config, root = archive
    settings = load_settings(config)
    geometry = {"shape": [16, 16, 8], "spacing": [24.0, 24.0, 40.0]}
    alone, info = load_examples("chest_ct", settings.database_url, settings.storage_dir, geometry)
    shared, shared_info = load_examples("chest_ct", settings.database_url, settings.storage_dir, geometry, workers=2)
    assert len(alone) == 8 and info == shared_info
    assert alone.labels == shared.labels and np.array_equal(alone.owner, shared.owner)
    assert np.array_equal(alone.images, shared.images)

    manifest = tmp_path / "fundus.csv"
    assert synth_manifest([str(root / "cohort"), "--modality", "fundus", "--out", str(manifest)]) == 0
    rows = read_manifest(manifest)
    alone = load_manifest_examples(rows, "fundus", {"size": 32})
    shared = load_manifest_examples(rows, "fundus", {"size": 32}, workers=2)
    assert len(alone.images) == 16 and np.array_equal(alone.images, shared.images)     # both eyes per row
    assert alone.labels == shared.labels and np.array_equal(alone.owner, shared.owner)
    (tmp_path / "empty").mkdir()                   # a row without images fails the same in a worker
    with pytest.raises(SeriesError):
        load_manifest_examples(rows[:3] + [(tmp_path / "empty", "x")], "fundus", {"size": 32}, workers=2)


def test_adapt_from_db_uses_the_archive_series_and_the_pipeline_loads_it(archive, tmp_path, capsys):
    config, _ = archive
    run = tmp_path / "run"
    assert _train(config, run, "chest_ct", "--shape", "16", "16", "8", "--spacing", "24", "24", "40") == 0
    weights = tmp_path / "weights"
    shutil.copytree(ROUTER, weights / "router")
    shutil.copytree(run, weights / "chest_ct", ignore=shutil.ignore_patterns("checkpoint.pt"))
    out = tmp_path / "adapted" / "chest_ct"
    assert main(["--config", str(config), "adapt", "--route", "chest_ct", "--from-db", "--weights-dir", str(weights),
                 "--out", str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["adaptation"]["examples"] == 8 and card["adaptation"]["images"] == 8     # 4 persons x 2 visits
    assert card["adaptation"]["available_series"] == 8
    assert card["adaptation"]["source"].startswith("archive sqlite:///")
    assert card["input"]["shape"] == [16, 16, 8] and "+" not in card["version"]      # a card without views
    report = tmp_path / "adapted.json"
    assert main(["--config", str(config), "evaluate", "--route", "chest_ct", "--from-db", "--weights-dir",
                 str(out.parent), "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["model"]["version"] == card["version"] and r["source"]["database"].startswith("series embedded now")
    assert "batch-norm statistics were adapted on these images" in r["source"]["selection"]
    shutil.copytree(out, weights / "chest_ct", dirs_exist_ok=True)
    pipeline = SeriesPipeline(PipelineSettings(), weights)
    assert pipeline.models["chest_ct"].version == card["version"]

    # a copy of the archive, served with the adapted model: --reembed re-processes the CT series it embedded before
    _, root = archive
    copy = tmp_path / "copy"
    shutil.copytree(root / "storage", copy / "storage")
    with closing(sqlite3.connect(root / "node.db")) as source, closing(sqlite3.connect(copy / "node.db")) as target:
        source.backup(target)                           # the backup API: commits still in the WAL come too
    moved = write_toml(copy / "node.toml", node_config(copy, pipeline={"enabled": True, "weights_dir": str(weights),
                                                                       "torch_threads": 1},
                                                       linkage={"enabled": False}))
    capsys.readouterr()
    assert main(["--config", str(moved), "process", "--until-idle", "--reembed"]) == 0
    printed = capsys.readouterr().out
    assert "re-queued 8 series embedded by another model than the current one (chest_ct 8)" in printed
    assert "processed 8 series (chest_ct 8)" in printed
    assert main(["--config", str(moved), "process", "--until-idle", "--reembed"]) == 0
    assert "re-queued 0 series" in capsys.readouterr().out
    from sqlalchemy import func, select

    from db.engine import make_engine
    from db.models import Embedding
    engine = make_engine(f"sqlite:///{copy / 'node.db'}")
    with engine.connect() as conn:
        versions = conn.execute(select(Embedding.route, Embedding.model_version, func.count())
                                .group_by(Embedding.route, Embedding.model_version)).all()
    engine.dispose()
    assert ("chest_ct", card["version"], 8) in versions and not [v for v in versions if v[0] == "chest_ct"
                                                                 and v[1] != card["version"]]


def test_evaluate_from_db_checks_image_pairs_when_the_card_asks_and_refits_both_calibrations(archive, tmp_path):
    """A card with a `verification` block is calibrated on cosine + check: `evaluate --from-db` reads the
    stored series' images to check every pair, so a site can refit that calibration on its own archive."""
    from models.evaluation.evaluate import VERIFIED_SCORE
    config, _ = archive
    run = tmp_path / "fundus"
    assert _train(config, run, "fundus", "--size", "32") == 0
    weights = tmp_path / "weights"
    shutil.copytree(run, weights / "fundus", ignore=shutil.ignore_patterns("checkpoint.pt"))
    card_path = weights / "fundus" / "card.json"
    card = json.loads(card_path.read_text())
    card["verification"] = {"size": 160, "features": 400, "weight_inliers": 0.1, "weight_ncc": 0.3}
    card_path.write_text(json.dumps(card))
    report = tmp_path / "report.json"
    args = ["--config", str(config), "evaluate", "--route", "fundus", "--from-db", "--weights-dir", str(weights),
            "--json", str(report)]
    assert main([*args, "--update-card", "site-archive"]) == 0
    r = json.loads(report.read_text())
    assert r["source"]["verification"]["size"] == 160
    assert set(r["results"]) == {"model", "embedding only", "pixel-cosine", "frozen-lite0"}
    model, alone = r["results"]["model"], r["results"]["embedding only"]
    assert model["images"] == alone["images"] == 4                     # the card's 2 validation patients x 2 visits
    assert model["roc_auc"] >= alone["roc_auc"] and model["mAP"] >= alone["mAP"]   # each retina matches its own
    card = json.loads(card_path.read_text())
    assert card["calibration"]["score"] == VERIFIED_SCORE and "site-archive" in card["calibration"]["fitted_on"]
    assert "calibration_cosine" in card

    assert main([*args, "--max-checked-series", "2"]) == 0             # whole patients, within the limit
    r = json.loads(report.read_text())
    assert r["results"]["model"]["images"] == 2 and "2 of 4 series checked" in r["source"]["selection"]
    assert r["results"]["pixel-cosine"]["images"] == 2
