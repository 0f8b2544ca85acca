"""benchmarks/last_epoch.py: a run's last epoch as a weights folder whose card describes that epoch."""

import json

import torch

from dicom_node.cli import main
from models.networks import load_identity_model, sha256_file
from tests.helpers import load_benchmark, write_image_manifest


def test_last_epoch_export_carries_that_epochs_weights_hash_and_validation(tmp_path):
    manifest = write_image_manifest(tmp_path / "set", patients=8, per=3)
    run = tmp_path / "run"
    assert main(["train", "--route", "chest_xr", "--manifest", str(manifest), "--size", "48", "--batch-size", "12",
                 "--threads", "1", "--epochs", "3", "--patience", "3", "--val-fraction", "0.4", "--out", str(run)]) == 0
    run_card = json.loads((run / "card.json").read_text())
    out = tmp_path / "weights"
    assert load_benchmark("last_epoch").main([str(run), str(out), "--note", "chosen on a selection cohort"]) == 0

    card = json.loads((out / "chest_xr" / "card.json").read_text())
    last = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    saved = torch.load(out / "chest_xr" / "model.pt", map_location="cpu")
    assert all(torch.equal(saved[k], v) for k, v in last["net"].items())
    assert card["sha256"] == sha256_file(out / "chest_xr" / "model.pt")
    assert card["training"]["model_epoch"] == 3 and "chosen on a selection cohort" in card["training"]["model_epoch_note"]
    # validation re-scored on the run's own validation patients: the last epoch's logged mAP, same counts
    assert abs(card["metrics"]["validation"]["mAP"] - run_card["training"]["history"][-1]["val_mAP"]) < 1e-6
    assert card["metrics"]["validation"]["patients"] == run_card["metrics"]["validation"]["patients"]
    load_identity_model("chest_xr", out, torch.device("cpu"))       # the registry accepts it


def test_a_run_without_manifests_is_refused_and_nothing_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--route", "chest_xr", "--synthetic", "8", "--size", "48", "--batch-size", "12",
                 "--threads", "1", "--epochs", "1", "--val-fraction", "0.4", "--out", str(run)]) == 0
    out = tmp_path / "weights"
    assert load_benchmark("last_epoch").main([str(run), str(out)]) == 2
    assert "not trained from manifests" in capsys.readouterr().err and not out.exists()
