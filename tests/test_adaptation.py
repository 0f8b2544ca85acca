"""Batch-norm adaptation to a site's images (`dicom-node adapt`, models/training/adaptation.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dicom_node.cli import main
from models.inference.networks import EmbeddingNet, NetSpec, WeightsError, load_identity_model, seeded, sha256_file
from models.training.adaptation import adapt_batchnorm, batchnorm_layers
from tests.helpers import write_image_manifest

SPEC = NetSpec(2, 1, widths=(8, 8, 16, 16), dim=16)


def _site_images(n=7, seed=0):
    """uint8 images of a "site" whose pixels are darker and flatter than the network has seen."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 1, (n, 1, 32, 32)) * 80 + 20).astype(np.uint8)


def test_adapted_statistics_are_the_site_images_and_no_weight_changes():
    net = seeded(lambda: EmbeddingNet(SPEC), 3).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = _site_images()
    adapted = adapt_batchnorm(net, images, batch=len(images))

    x = torch.from_numpy(images).float() / 255
    with torch.no_grad():
        stem = net.backbone.conv1(x)                       # what the first batch-norm layer normalizes
    first = batchnorm_layers(adapted)[0]
    assert torch.allclose(first.running_mean, stem.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(first.running_var, stem.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(batchnorm_layers(net)[0].running_mean, first.running_mean)

    for name, value in adapted.state_dict().items():   # the source network is untouched; only BN buffers moved
        assert torch.equal(net.state_dict()[name], before[name])
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, before[name]), name
    assert not adapted.training and first.momentum == 0.1

    # in eval mode the adapted network now normalizes the site's stem features to zero mean, unit variance
    seen = {}
    first.register_forward_hook(lambda m, i, o: seen.update(out=(i[0] - m.running_mean[:, None, None])
                                                           / (m.running_var[:, None, None] + m.eps).sqrt()))
    with torch.no_grad():
        adapted(x)
    assert seen["out"].mean((0, 2, 3)).abs().max() < 1e-4


def test_small_batches_and_views_and_refusals():
    net = seeded(lambda: EmbeddingNet(SPEC), 3).eval()
    images = _site_images(7)
    whole = adapt_batchnorm(net, images, batch=7)
    chunked = adapt_batchnorm(net, images, batch=3)        # 3 + 3 + a last single image folded into a pair
    assert torch.allclose(batchnorm_layers(whole)[0].running_mean, batchnorm_layers(chunked)[0].running_mean,
                          atol=0.05)
    turned = adapt_batchnorm(net, images, views="dihedral", batch=7)
    assert not torch.allclose(batchnorm_layers(whole)[-1].running_mean, batchnorm_layers(turned)[-1].running_mean)
    half = adapt_batchnorm(net, images, batch=7, keep_base=0.5)    # halfway between base and site statistics
    base_mean, site_mean = batchnorm_layers(net)[0].running_mean, batchnorm_layers(whole)[0].running_mean
    assert torch.allclose(batchnorm_layers(half)[0].running_mean, (base_mean + site_mean) / 2, atol=1e-6)
    with pytest.raises(WeightsError):
        adapt_batchnorm(net, images, views="nonsense")
    with pytest.raises(ValueError, match="at least 2"):
        adapt_batchnorm(net, images[:1])


@pytest.fixture(scope="module")
def trained_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    out = root / "run"
    assert main(["train", "--route", "chest_xr", "--synthetic", "12", "--size", "48", "--batch-size", "12",
                 "--threads", "1", "--val-fraction", "0.3", "--epochs", "1", "--out", str(out)]) == 0
    weights = root / "weights"
    shutil.copytree(out, weights / "chest_xr", ignore=shutil.ignore_patterns("checkpoint.pt"))
    return weights


def test_adapt_cli_writes_a_loadable_model_that_evaluate_recognises(trained_weights, tmp_path, capsys):
    site = write_image_manifest(tmp_path / "site", contrast=0.4, offset=90)
    out = tmp_path / "adapted" / "chest_xr"
    assert main(["adapt", "--route", "chest_xr", "--manifest", str(site), "--weights-dir", str(trained_weights),
                 "--out", str(out)]) == 0
    assert "batch-norm statistics of 18 images" in capsys.readouterr().out
    base = json.loads((trained_weights / "chest_xr" / "card.json").read_text())
    card = json.loads((out / "card.json").read_text())
    assert card["sha256"] == sha256_file(out / "model.pt") != base["sha256"]
    assert card["version"] != base["version"] and "adabn" in card["version"] and "+" not in card["version"]
    a = card["adaptation"]
    assert a["images"] == 18 and a["source"] == f"manifest {site.resolve()}" and a["keep_base"] == 0.0
    assert a["available_series"] == 18
    assert a["base"]["version"] == base["version"] and a["base"]["metrics"] == base["metrics"]
    assert "metrics" not in card and card["calibration"]["fitted_on"].startswith("before adaptation")
    assert card["validation_patients"] == base["validation_patients"] and card["input"] == base["input"]

    cpu = torch.device("cpu")
    plain = load_identity_model("chest_xr", trained_weights, cpu)
    adapted = load_identity_model("chest_xr", out.parent, cpu)
    assert adapted.version == card["version"]
    x = torch.rand(2, 1, 48, 48) * 0.4 + 0.35
    assert not np.allclose(plain.embed(x), adapted.embed(x), atol=1e-3)

    report = tmp_path / "r.json"
    assert main(["evaluate", "--route", "chest_xr", "--manifest", str(site), "--weights-dir", str(out.parent),
                 "--json", str(report), "--update-card", "site-pairs"]) == 0
    assert "batch-norm statistics were adapted on these images" in json.loads(report.read_text())["source"]["selection"]
    refit = json.loads((out / "card.json").read_text())
    assert refit["calibration"]["fitted_on"].startswith("held-out pairs: site-pairs")
    assert refit["metrics"]["heldout"]["site-pairs"]["images"] == 18

    other = write_image_manifest(tmp_path / "other")       # scored on other images: no adaptation note
    assert main(["evaluate", "--route", "chest_xr", "--manifest", str(other), "--weights-dir", str(out.parent),
                 "--json", str(report)]) == 0
    assert json.loads(report.read_text())["source"]["selection"] == "all patients of the manifest"


def test_adapt_cli_refuses_untrained_routes_and_missing_sources(tmp_path, capsys):
    site = write_image_manifest(tmp_path / "site", patients=2, per=2)
    assert main(["adapt", "--route", "chest_xr", "--manifest", str(site), "--weights-dir", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "o")]) == 1
    assert "no trained model to adapt" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["adapt", "--route", "chest_xr", "--weights-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert main(["adapt", "--route", "chest_xr", "--manifest", str(site), "--keep-base", "1.5",
                 "--out", str(tmp_path / "o")]) == 2
    registry = tmp_path / "registry"
    (registry / "chest_xr").mkdir(parents=True)
    assert main(["adapt", "--route", "chest_xr", "--manifest", str(site), "--weights-dir", str(registry),
                 "--out", str(registry / "chest_xr")]) == 2
    assert "the folder of the model being adapted" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["adapt", "--route", "chest_xr", "--manifest", str(site), "--from-db", "--out", str(tmp_path / "o")])


def test_at_most_max_series_are_read_drawn_the_same_way_each_time(trained_weights, tmp_path, capsys):
    from models.datasets.examples import random_subset
    assert random_subset(list(range(10)), None) == list(range(10)) == random_subset(list(range(10)), 10)
    drawn = random_subset(list(range(100)), 7)
    assert len(set(drawn)) == 7 and drawn == sorted(drawn) == random_subset(list(range(100)), 7)

    site = write_image_manifest(tmp_path / "site", contrast=0.4, offset=90)
    outs = [tmp_path / name / "chest_xr" for name in ("a", "b")]
    for out in outs:
        assert main(["adapt", "--route", "chest_xr", "--manifest", str(site), "--weights-dir", str(trained_weights),
                     "--max-series", "5", "--out", str(out)]) == 0
    assert "5 images (5 of 18 series)" in capsys.readouterr().out
    cards = [json.loads((out / "card.json").read_text()) for out in outs]
    assert cards[0]["adaptation"]["images"] == 5 and cards[0]["adaptation"]["available_series"] == 18
    assert cards[0]["sha256"] == cards[1]["sha256"]              # the same 5 series both times
    assert main(["adapt", "--route", "chest_xr", "--manifest", str(site), "--max-series", "1",
                 "--out", str(tmp_path / "c")]) == 2


def test_adapted_card_keeps_the_views_in_its_version_and_moves_the_base_metrics(tmp_path):
    from models.training.adaptation import adapted_card
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"adapted weights")
    base = {"name": "n", "version": "20261130-x+scales", "sha256": "0" * 64, "test_time_views": "scales",
            "metrics": {"heldout": {"a": {"rank1": 0.5}}}, "limitations": "base caveats",
            "calibration": {"a": 20.0, "b": -9.0, "fitted_on": "held-out pairs: a"}}
    card = adapted_card(base, weights, images=40, examples=20, data_source="manifest /x.csv", command="cmd",
                        keep_base=0.5, available=100)
    assert card["version"].endswith("-adabn-" + card["sha256"][:8] + "+scales")
    assert card["adaptation"]["base"] == {"version": "20261130-x+scales", "sha256": "0" * 64,
                                          "metrics": base["metrics"]}
    assert card["adaptation"]["keep_base"] == 0.5 and card["adaptation"]["available_series"] == 100
    assert card["calibration"]["fitted_on"] == "before adaptation, of 20261130-x+scales: held-out pairs: a"
    assert card["limitations"].endswith("base caveats") and base["calibration"]["fitted_on"] == "held-out pairs: a"
