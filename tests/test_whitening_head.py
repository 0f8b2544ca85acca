"""`train --head whitening` (models/training/whitening.py): the frozen ImageNet backbone's pooled features whitened
by the within-person covariance of the training persons, stored as the network's linear head; and
models/datasets/manifest_split.py, which makes the identity-disjoint train / select / test manifests it is chosen on."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from dicom_node.cli import main
from models.datasets.examples import as_float
from models.datasets.manifest_split import split_manifest
from models.inference.networks import load_identity_model
from models.training.whitening import apply_whitening, within_person_whitening
from tests.helpers import write_image_manifest

LITE0 = "imagenet:efficientnet-lite0"


@pytest.fixture(scope="module")
def whitened(tmp_path_factory):
    root = tmp_path_factory.mktemp("whiten")
    manifest = write_image_manifest(root / "set", patients=8, per=3)
    out = root / "weights" / "chest_xr"
    assert main(["train", "--route", "chest_xr", "--manifest", str(manifest), "--size", "64", "--threads", "1",
                 "--init", LITE0, "--head", "whitening", "--whitening-shrink", "0.5", "--dim", "16",
                 "--epochs", "0", "--val-fraction", "0.25", "--out", str(out)]) == 0
    return manifest, out


def test_the_head_is_the_whitening_of_the_training_persons_features(whitened):
    _, out = whitened
    card = json.loads((out / "card.json").read_text())
    head = card["training_data"]["head"]
    assert head["shrink"] == 0.5 and head["dims"] == 16 and card["arch"]["dim"] == 16
    assert card["training"]["epochs_run"] == 0 and card["name"] == "chest_xr-efficientnet-lite0-gem-d16"
    model = load_identity_model("chest_xr", out.parent, torch.device("cpu"))
    # refit by hand on the persons the card says trained (all but its validation persons), at its input size
    from models.datasets.examples import load_manifest_examples, read_manifest
    from models.inference.transforms import route_geometry
    rows = [r for r in read_manifest(whitened[0]) if r[1] not in set(card["validation_patients"])]
    ex = load_manifest_examples(rows, "chest_xr", route_geometry("chest_xr", {"size": 64}))
    assert head["images"] == len(ex.images) and head["persons"] == len(set(ex.labels))
    with torch.inference_mode():
        pooled = model.net.pooled(as_float(ex.images)).double().numpy()
        embedded = model.net(as_float(ex.images)).numpy()
    mean, projection = within_person_whitening(pooled, np.asarray(ex.labels)[ex.owner], 0.5, 16)
    # cosines do not depend on the sign eigh gives each direction
    expected = apply_whitening(pooled, mean, projection)
    assert np.allclose(expected @ expected.T, embedded @ embedded.T, atol=1e-4)


def test_whitening_draws_a_persons_images_together():
    rng = np.random.default_rng(0)
    persons = rng.normal(size=(30, 8)) * np.array([5, 5, 1, 1, 1, 1, 1, 1])     # identity in the last 6 dims
    labels = np.repeat(np.arange(30), 3)
    noise = rng.normal(size=(90, 8)) * np.array([6, 6, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3])   # nuisance in the first 2
    x = persons[labels] + noise
    mean, projection = within_person_whitening(x, labels, 0.1, 6)
    def rank1(e):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return np.mean(labels[s.argmax(1)] == labels)
    assert rank1(apply_whitening(x, mean, projection)) > rank1(x - x.mean(0)) + 0.2


def test_whitening_head_needs_an_imagenet_backbone(tmp_path, capsys):
    manifest = write_image_manifest(tmp_path / "set")
    assert main(["train", "--route", "chest_xr", "--manifest", str(manifest), "--head", "whitening",
                 "--epochs", "0", "--out", str(tmp_path / "out")]) == 2
    assert "--head whitening needs --init imagenet:MODEL" in capsys.readouterr().err
    assert main(["train", "--route", "chest_xr", "--manifest", str(manifest), "--init", LITE0, "--head",
                 "whitening", "--whitening-shrink", "1.5", "--out", str(tmp_path / "out")]) == 2


def test_manifest_split_is_identity_disjoint_and_keeps_every_row(tmp_path):
    src = tmp_path / "data"
    (src / "images").mkdir(parents=True)
    rows = [{"image": f"images/{p}-{k}.png", "patient_id": f"L{p}", "dx": "nv"}
            for p in range(40) for k in range(1 + p % 3)]                    # 1, 2 or 3 images per lesion
    with open(src / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "patient_id", "dx"])
        writer.writeheader()
        writer.writerows(rows)
    summary = split_manifest(src / "manifest.csv", tmp_path / "out", "derm", seed=3)
    parts = {name: list(csv.DictReader(open(s["path"]))) for name, s in summary.items()}
    ids = {name: {r["patient_id"] for r in part} for name, part in parts.items()}
    assert not (ids["train"] & ids["select"]) and not (ids["train"] & ids["test"]) and not (ids["select"] & ids["test"])
    assert sum(len(p) for p in parts.values()) == len(rows)
    assert all(r["image"].startswith(str(src)) and r["dx"] == "nv" for p in parts.values() for r in p)
    multi = {name: s["multi"] for name, s in summary.items()}
    assert multi["train"] > multi["select"] > 0 and multi["test"] > 0
    again = split_manifest(src / "manifest.csv", tmp_path / "again", "derm", seed=3)
    assert all(open(again[n]["path"]).read() == open(summary[n]["path"]).read() for n in summary)
