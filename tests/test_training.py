"""Metric-learning training (tiny synthetic set), resume, the model card, and the evaluate CLI."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from dicom_node.cli import main
from models.inference.networks import load_identity_model, sha256_file
from tests.helpers import write_image_manifest

TRAIN = ["train", "--route", "chest_xr", "--synthetic", "12", "--size", "64", "--batch-size", "12",
         "--threads", "1", "--patience", "5", "--val-fraction", "0.3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "chest_xr"
    assert main(TRAIN + ["--epochs", "2", "--out", str(out)]) == 0
    return out


def test_training_writes_loadable_card(trained, tmp_path):
    out = trained
    card = json.loads((out / "card.json").read_text())
    assert card["sha256"] == sha256_file(out / "model.pt")
    assert card["input"]["size"] == 64 and card["route"] == "chest_xr"
    assert card["training"]["epochs_run"] == 2 and len(card["training"]["history"]) == 2
    assert card["training_data"]["synthetic_patients"] == 12
    for key in ("rank1", "rank5", "mAP", "roc_auc", "eer", "tar_at_far_1e-3", "gallery_size"):
        assert key in card["metrics"]["validation"]
    cal = card["calibration"]
    assert cal["method"] == "logistic-llr" and cal["a"] >= 0
    assert card["code_version"] and card["date"] and card["validation_patients"]
    assert (out / "model.pt").stat().st_size < 30e6

    weights = tmp_path / "weights"
    shutil.copytree(out, weights / "chest_xr", ignore=shutil.ignore_patterns("checkpoint.pt"))
    model = load_identity_model("chest_xr", weights, torch.device("cpu"))
    assert model.version == card["version"] and model.version != "untrained-seed0"
    emb = model.embed(torch.rand(2, 1, 64, 64))
    assert emb.shape == (2, 256) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_resume_continues_from_checkpoint(trained, tmp_path):
    out = trained
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    before = json.loads((copy / "card.json").read_text())["training"]["history"]
    assert main(TRAIN + ["--epochs", "3", "--out", str(copy), "--resume"]) == 0
    history = json.loads((copy / "card.json").read_text())["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[:2] == before                      # epochs 1-2 not re-run


def _learned(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_init_fine_tunes_from_a_weights_folder(trained, tmp_path, capsys):
    out = trained
    tuned = tmp_path / "tuned"
    # lr 0: the fine-tuned model's weights must be exactly those it started from (batch-norm
    # running statistics still move in training mode, so only learnable tensors are compared)
    # the earlier card's limitations passed on as they are (the documented way) keep its caveats once
    earlier = json.loads((out / "card.json").read_text())["limitations"]
    assert main(TRAIN + ["--epochs", "1", "--lr", "0", "--init", str(out), "--out", str(tuned),
                         "--limitations", f"fine-tuned; {earlier}"]) == 0
    start = _learned(torch.load(out / "model.pt", weights_only=True))
    end = _learned(torch.load(tuned / "model.pt", weights_only=True))
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)
    card = json.loads((tuned / "card.json").read_text())
    assert card["training_data"]["initialized_from"]["sha256"] == sha256_file(out / "model.pt")
    assert card["training_data"]["proxies"].startswith("initialized at the --init model's class centroids")
    assert card["limitations"].startswith("fine-tuned; validation patients come from")
    assert card["limitations"].count("validation patients come from") == 1

    fresh = tmp_path / "fresh"
    assert main(TRAIN + ["--epochs", "1", "--lr", "0", "--out", str(fresh)]) == 0
    other = _learned(torch.load(fresh / "model.pt", weights_only=True))
    assert not all(torch.equal(start[k], other[k]) for k in start)

    capsys.readouterr()
    assert main(["train", "--route", "fundus", "--synthetic", "12", "--init", str(out),
                 "--out", str(tmp_path / "wrong")]) != 0
    assert "a chest_xr model, not fundus" in capsys.readouterr().err


def test_fine_tuning_keeps_the_starting_models_validation_patients(trained, tmp_path):
    """A fresh random split would score the fine-tuned model on persons its starting model trained on."""
    from models.datasets.patients import split_patients
    first = json.loads((trained / "card.json").read_text())
    labels = [f"synth-0-{p}" for p in range(12) for _ in range(3)]
    _, _, fresh_split = split_patients(labels, 0.5, 0)
    assert set(fresh_split) - set(first["validation_patients"])          # what the fix is for
    tuned = tmp_path / "tuned"
    assert main(TRAIN[:-2] + ["--val-fraction", "0.5", "--epochs", "1", "--init", str(trained), "--out", str(tuned)]) == 0
    card = json.loads((tuned / "card.json").read_text())
    assert card["validation_patients"] == first["validation_patients"]
    assert card["training_data"]["validation_split"].startswith("the --init model's validation patients")

    fresh = tmp_path / "fresh"          # without --init: the random split of --val-fraction
    assert main(TRAIN[:-2] + ["--val-fraction", "0.5", "--epochs", "1", "--out", str(fresh)]) == 0
    assert json.loads((fresh / "card.json").read_text())["validation_patients"] == fresh_split


def test_evaluate_cli_writes_json_and_plots(trained, tmp_path, capsys):
    out = trained
    manifest = write_image_manifest(tmp_path / "set")
    weights = tmp_path / "weights"
    shutil.copytree(out, weights / "chest_xr", ignore=shutil.ignore_patterns("checkpoint.pt"))
    report_dir, json_path = tmp_path / "report", tmp_path / "m.json"
    assert main(["evaluate", "--route", "chest_xr", "--manifest", str(manifest), "--weights-dir", str(weights),
                 "--out", str(report_dir), "--json", str(json_path)]) == 0
    report = json.loads(json_path.read_text())
    assert set(report["results"]) == {"model", "pixel-cosine", "frozen-lite0"}      # models/evaluation/frozen_baseline.py
    m = report["results"]["model"]
    assert m["images"] == 18 and m["patients"] == 6 and m["gallery_size"] == 17
    for key in ("rank1", "rank5", "mAP", "roc_auc", "eer", "tar_at_far_1e-3"):
        assert 0.0 <= m[key] <= 1.0
    assert report["results"]["pixel-cosine"]["rank1"] > 0.5      # same synthetic anatomy, small jitter
    assert report["model"]["version"] != "untrained-seed0" and report["calibration"]
    for png in ("roc.png", "cmc.png", "scores.png"):
        assert (report_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((report_dir / "metrics.json").read_text())["results"]["model"]["rank1"] == m["rank1"]
    assert "Rank-1" in capsys.readouterr().out


def test_evaluate_scores_cosine_plus_the_verification_bonus_when_the_card_asks(trained, tmp_path):
    """With a "verification" entry the card's score is cosine + geometric bonus: `model` is that score
    (and --update-card calibrates it), `embedding only` is the cosine beside it."""
    manifest = write_image_manifest(tmp_path / "set")
    weights = tmp_path / "weights"
    shutil.copytree(trained, weights / "chest_xr", ignore=shutil.ignore_patterns("checkpoint.pt"))
    args = ["evaluate", "--route", "chest_xr", "--manifest", str(manifest), "--weights-dir", str(weights)]
    assert main(args + ["--json", str(tmp_path / "plain.json")]) == 0
    card_path = weights / "chest_xr" / "card.json"
    card = json.loads(card_path.read_text())
    card["verification"] = {"size": 256, "weight_inliers": 0.1, "weight_ncc": 0.3}
    card_path.write_text(json.dumps(card))
    assert main(args + ["--json", str(tmp_path / "v.json"), "--update-card", "set"]) == 0
    plain, verified = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "v.json"))
    assert set(verified["results"]) == {"model", "embedding only", "pixel-cosine", "frozen-lite0"}
    assert verified["results"]["embedding only"]["mAP"] == pytest.approx(plain["results"]["model"]["mAP"])
    assert verified["source"]["verification"]["size"] == 256
    # same synthetic anatomy with a small jitter: the bonus separates the persons further
    assert verified["results"]["model"]["eer"] < plain["results"]["model"]["eer"]
    assert verified["results"]["model"]["mAP"] > plain["results"]["model"]["mAP"]
    refit = json.loads(card_path.read_text())
    assert refit["calibration"] != card["calibration"]
    assert refit["calibration"]["score"].startswith("cosine + verification")
    assert refit["metrics"]["heldout"]["set"]["mAP"] == pytest.approx(verified["results"]["model"]["mAP"])
    # the cosine alone keeps a calibration of its own, fitted on the same pairs (linkage's unchecked pairs)
    alone = refit["metrics"]["heldout"]["set"]["embedding only"]
    assert alone["mAP"] == pytest.approx(plain["results"]["model"]["mAP"])
    assert refit["calibration_cosine"]["score"] == "cosine"
    assert refit["calibration_cosine"]["pairs"] == refit["calibration"]["pairs"]
    assert refit["calibration_cosine"]["a"] != pytest.approx(refit["calibration"]["a"])


def test_evaluate_chooses_the_check_weights_on_the_pairs_and_the_card_says_so(trained, tmp_path, capsys):
    """--choose-check-weights: the grid's best mAP on these pairs is scored, and with --update-card written
    into the card's verification block, with where it was chosen and the metrics flagged as optimistic."""
    from models.evaluation.evaluate import CHECK_WEIGHT_GRID
    manifest = write_image_manifest(tmp_path / "set")
    weights = tmp_path / "weights"
    shutil.copytree(trained, weights / "chest_xr", ignore=shutil.ignore_patterns("checkpoint.pt"))
    args = ["evaluate", "--route", "chest_xr", "--manifest", str(manifest), "--weights-dir", str(weights)]
    assert main(args + ["--choose-check-weights"]) == 2                  # the card checks no image pairs
    assert "no `verification` block" in capsys.readouterr().err
    card_path = weights / "chest_xr" / "card.json"
    card = json.loads(card_path.read_text())
    card["verification"] = {"size": 256, "weight_inliers": 0.0, "weight_ncc": 0.0}      # the check counts for nothing
    card_path.write_text(json.dumps(card))
    assert main(args + ["--json", str(tmp_path / "off.json")]) == 0
    assert main(args + ["--json", str(tmp_path / "c.json"), "--choose-check-weights", "--update-card", "site"]) == 0
    off, chosen = (json.loads((tmp_path / f).read_text()) for f in ("off.json", "c.json"))
    grid = chosen["check_weights"]["grid"]
    assert len(grid) == len(CHECK_WEIGHT_GRID["weight_inliers"]) * len(CHECK_WEIGHT_GRID["weight_ncc"])
    best = max(r["mAP"] for r in grid)
    assert chosen["results"]["model"]["mAP"] == pytest.approx(best)
    assert best > off["results"]["model"]["mAP"]                          # the check does help on this anatomy
    assert chosen["check_weights"]["chosen"] != {"weight_inliers": 0.0, "weight_ncc": 0.0}
    refit = json.loads(card_path.read_text())
    assert {k: refit["verification"][k] for k in ("weight_inliers", "weight_ncc")} == chosen["check_weights"]["chosen"]
    assert refit["verification"]["selected_on"].startswith("site: best mAP")
    assert refit["metrics"]["heldout"]["site"]["check_weights_chosen_on_these_pairs"] is True
    assert "check weights chosen on these pairs" in capsys.readouterr().out


def test_evaluate_untrained_route_and_bad_arguments(tmp_path):
    manifest = write_image_manifest(tmp_path / "set", patients=3, per=2)
    assert main(["evaluate", "--route", "chest_xr", "--manifest", str(manifest),
                 "--weights-dir", str(tmp_path / "empty"), "--json", str(tmp_path / "u.json")]) == 0
    assert json.loads((tmp_path / "u.json").read_text())["model"]["version"] == "untrained-seed0"
    assert main(["evaluate", "--route", "chest_xr", "--weights-dir", str(tmp_path)]) == 2
    assert main(["train", "--route", "chest_xr", "--out", str(tmp_path / "x")]) == 2


def test_evaluate_from_db_stored_embeddings(tmp_path):
    from db.engine import make_engine, make_sessionmaker
    from db.migrate import upgrade
    from db.models import Embedding, Patient, Series, Study
    from db.store import utcnow
    from models.evaluation import evaluate as E, report as R

    url = f"sqlite:///{tmp_path / 'node.db'}"
    engine = make_engine(url)
    upgrade(engine)
    rng = np.random.default_rng(0)
    now = utcnow()
    with make_sessionmaker(engine)() as session:
        for p in range(4):
            centre = rng.normal(size=8)
            patient = Patient(patient_id=f"P{p}", issuer="SITE", created_at=now)
            session.add(patient)
            session.flush()
            for k in range(2):
                study = Study(study_uid=f"1.2.{p}.{k}", patient_pk=patient.id, created_at=now)
                session.add(study)
                session.flush()
                series = Series(series_uid=f"1.3.{p}.{k}", study_pk=study.id, first_received_at=now,
                                last_received_at=now, state_changed_at=now)
                session.add(series)
                session.flush()
                v = centre + 0.01 * rng.normal(size=8)
                session.add(Embedding(series_pk=series.id, route="chest_xr", model_name="m", model_version="v1",
                                      dim=8, vector=(v / np.linalg.norm(v)).astype("<f4").tobytes(), created_at=now))
        session.commit()
    engine.dispose()
    report = E.evaluate_db("chest_xr", url, tmp_path / "no-weights")
    assert report["model"] == {"name": "m", "version": "v1"} and "most common" in report["source"]["selection"]
    clean = R.write_report(report, tmp_path / "db-report")
    assert clean["results"]["model"]["rank1"] == 1.0 and clean["results"]["model"]["patients"] == 4
    assert (tmp_path / "db-report" / "roc.png").exists()


def test_triplet_loss_and_noisy_labels(tmp_path, monkeypatch):
    from models.training import train as training

    real = training.synthetic_patients

    def noisy(patients, per, size, seed):                 # two images carry another patient's ID
        images, labels = real(patients, per, size, seed)
        labels[0], labels[-1] = labels[-1], labels[0]
        return images, labels

    monkeypatch.setattr(training, "synthetic_patients", noisy)
    cfg = training.TrainConfig(route="chest_xr", out=tmp_path / "t", synthetic=10, epochs=1, size=48,
                               batch_size=10, loss="triplet", threads=1, val_fraction=0.3)
    card = training.train(cfg, progress=False)
    assert np.isfinite(card["training"]["history"][0]["loss"])
    assert card["training"]["miner"].startswith("TripletMarginMiner")


def test_synth_manifest_first_series_keeps_one_series_per_study(tmp_path):
    from models.datasets.synth_manifest import main as synth_manifest
    studies = [{"modality": "mr", "person_id": f"P{p}", "visit": v,
                "series": [{"number": 2, "path": f"P{p}/v{v}/flair"}, {"number": 1, "path": f"P{p}/v{v}/t1"}]}
               for p in range(2) for v in range(2)]
    (tmp_path / "truth.json").write_text(json.dumps({"seed": 9, "studies": studies}))
    for flag, expected in (([], 8), (["--first-series"], 4)):
        out = tmp_path / f"m{len(flag)}.csv"
        assert synth_manifest([str(tmp_path), "--modality", "mr", "--out", str(out)] + flag) == 0
        rows = list(csv.DictReader(open(out)))
        assert len(rows) == expected
    assert all(r["image"].endswith("/t1") for r in rows) and {r["patient_id"] for r in rows} == {"seed9-P0", "seed9-P1"}


def _dermoscopy_weights(folder, card_extra: dict):
    """A dermoscopy weights folder (seeded random network) whose card adds `card_extra`."""
    from models.inference.networks import DEFAULT_SPECS, EmbeddingNet, seeded, spec_dict
    route_dir = folder / "dermoscopy"
    route_dir.mkdir(parents=True)
    spec = DEFAULT_SPECS["dermoscopy"]
    torch.save(seeded(lambda: EmbeddingNet(spec), 3).state_dict(), route_dir / "model.pt")
    card = {"name": "derm-test", "version": "t1", "arch": spec_dict(spec), **card_extra}
    (route_dir / "card.json").write_text(json.dumps(card))
    return folder


def test_dihedral_test_time_views_make_embeddings_orientation_free(tmp_path):
    x = torch.rand(3, 3, 48, 48)
    turned = [torch.rot90(x, 1, dims=(-2, -1)), x.flip(-1), torch.rot90(x.flip(-2), 3, dims=(-2, -1))]
    plain = load_identity_model("dermoscopy", _dermoscopy_weights(tmp_path / "a", {}), torch.device("cpu"))
    views = load_identity_model("dermoscopy", _dermoscopy_weights(tmp_path / "b", {"test_time_views": "dihedral"}),
                                torch.device("cpu"))
    # a single pass of a random network sees a turned lesion as another image ...
    assert not np.allclose(plain.embed(x), plain.embed(turned[0]), atol=1e-3)
    # ... averaged over the 8 rotations and flips it is the same lesion, and still a unit vector
    reference = views.embed(x)
    assert np.allclose(np.linalg.norm(reference, axis=1), 1, atol=1e-5)
    for t in turned:
        assert np.allclose(views.embed(t), reference, atol=1e-5)


@pytest.mark.parametrize("views_name, move", [("shifts", 2), ("shifts:4", 4)])
@pytest.mark.parametrize("shape", [(2, 1, 12, 10), (2, 1, 8, 9, 10)])
def test_shift_views_are_the_input_and_its_moves_along_each_axis(shape, views_name, move):
    from models.inference.networks import TEST_TIME_VIEWS
    x = torch.rand(shape) + 0.5                       # no zeros of its own: every zero below was uncovered
    views = TEST_TIME_VIEWS[views_name](x)
    spatial = len(shape) - 2
    assert len(views) == 1 + 2 * spatial and torch.equal(views[0], x)
    for k, view in enumerate(views[1:]):
        dim, step = 2 + k // 2, (move, -move)[k % 2]
        n = shape[dim]
        kept = view.narrow(dim, move, n - move) if step > 0 else view.narrow(dim, 0, n - move)
        source = x.narrow(dim, 0, n - move) if step > 0 else x.narrow(dim, move, n - move)
        uncovered = view.narrow(dim, 0, move) if step > 0 else view.narrow(dim, n - move, move)
        assert torch.equal(kept, source) and not uncovered.any()


def test_shift_views_average_a_volume_models_embedding(tmp_path):
    from models.inference.networks import DEFAULT_SPECS, TEST_TIME_VIEWS, EmbeddingNet, seeded, spec_dict
    spec = DEFAULT_SPECS["chest_ct"]
    for name, extra in (("plain", {}), ("shifts", {"test_time_views": "shifts"})):
        (tmp_path / name / "chest_ct").mkdir(parents=True)
        torch.save(seeded(lambda: EmbeddingNet(spec), 5).state_dict(), tmp_path / name / "chest_ct" / "model.pt")
        (tmp_path / name / "chest_ct" / "card.json").write_text(json.dumps({"arch": spec_dict(spec), **extra}))
    plain = load_identity_model("chest_ct", tmp_path / "plain", torch.device("cpu"))
    shifted = load_identity_model("chest_ct", tmp_path / "shifts", torch.device("cpu"))
    x = torch.rand(2, 1, 24, 24, 16)
    averaged = shifted.embed(x)
    assert shifted.views == "shifts" and averaged.shape == (2, spec.dim)
    assert np.allclose(np.linalg.norm(averaged, axis=1), 1, atol=1e-5)
    by_hand = np.mean([plain.embed(v) for v in TEST_TIME_VIEWS["shifts"](x)], axis=0)
    by_hand /= np.linalg.norm(by_hand, axis=1, keepdims=True)
    assert np.allclose(averaged, by_hand, atol=1e-5) and not np.allclose(averaged, plain.embed(x), atol=1e-3)


def test_unknown_test_time_views_refused_at_load(tmp_path):
    from models.inference.networks import WeightsError
    folder = _dermoscopy_weights(tmp_path, {"test_time_views": "kaleidoscope"})
    with pytest.raises(WeightsError, match="kaleidoscope"):
        load_identity_model("dermoscopy", folder, torch.device("cpu"))


def test_training_refuses_unknown_test_time_views_before_loading(tmp_path, capsys):
    assert main(TRAIN + ["--test-time-views", "kaleidoscope", "--out", str(tmp_path / "t")]) == 2
    assert "kaleidoscope" in capsys.readouterr().err and not (tmp_path / "t").exists()


def test_training_records_test_time_views_in_the_card(tmp_path):
    out = tmp_path / "views"
    assert main(TRAIN + ["--epochs", "1", "--test-time-views", "dihedral", "--out", str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["test_time_views"] == "dihedral"
    weights = tmp_path / "weights"
    shutil.copytree(out, weights / "chest_xr", ignore=shutil.ignore_patterns("checkpoint.pt"))
    model = load_identity_model("chest_xr", weights, torch.device("cpu"))
    x = torch.rand(1, 1, 64, 64)
    assert model.views == "dihedral" and np.allclose(model.embed(x), model.embed(x.flip(-2)), atol=1e-5)


def test_time_budget_stops_before_an_epoch_that_would_overrun(tmp_path):
    out = tmp_path / "budget"
    # 0.001 min: the first epoch already took longer, so a second one would end past the budget
    assert main(TRAIN + ["--epochs", "4", "--max-minutes", "0.001", "--out", str(out)]) == 0
    training = json.loads((out / "card.json").read_text())["training"]
    assert training["epochs_run"] == 1 and training["stop"] == "time limit 0.001 min"


def test_a_run_that_finishes_its_epochs_says_so_even_past_its_budget(tmp_path):
    out = tmp_path / "done"
    # the only epoch outlasts the budget, but no further epoch was cut: the stop is "epochs"
    assert main(TRAIN + ["--epochs", "1", "--max-minutes", "0.001", "--out", str(out)]) == 0
    training = json.loads((out / "card.json").read_text())["training"]
    assert training["epochs_run"] == 1 and training["stop"] == "epochs"


@pytest.mark.parametrize("views", ["dihedral", "scales", "dihedral+scales"])
def test_2d_views_refuse_volumes(views):
    from models.inference.networks import DEFAULT_SPECS, EmbeddingNet, WeightsError, embed_views, seeded
    net = seeded(lambda: EmbeddingNet(DEFAULT_SPECS["chest_ct"]), 0).eval()
    with pytest.raises(WeightsError, match="2D"):
        embed_views(net, torch.rand(1, 1, 16, 16, 8), views)


def test_scale_views_are_the_image_at_three_sizes_and_average_the_embedding(tmp_path):
    from models.inference.networks import TEST_TIME_VIEWS
    x = torch.zeros(2, 3, 28, 28)
    x[:, :, 7:21, 7:21] = 1.0                            # a centred square, half the image wide
    same, smaller, larger = TEST_TIME_VIEWS["scales"](x)
    assert torch.equal(same, x) and smaller.shape[-2:] == (24, 24) and larger.shape[-2:] == (32, 32)
    for view in (smaller, larger):                       # the whole field of view, resampled: still half as wide
        side = view.shape[-1]
        assert (view[0, 0, side // 2] > 0.5).sum().item() == side // 2
    both = TEST_TIME_VIEWS["dihedral+scales"](x)
    assert len(both) == 24 and {tuple(v.shape[-2:]) for v in both} == {(28, 28), (24, 24), (32, 32)}

    image = torch.rand(2, 3, 48, 48)
    plain = load_identity_model("dermoscopy", _dermoscopy_weights(tmp_path / "a", {}), torch.device("cpu"))
    scaled = load_identity_model("dermoscopy", _dermoscopy_weights(tmp_path / "b", {"test_time_views": "scales"}),
                                 torch.device("cpu"))
    by_hand = np.mean([plain.embed(v) for v in TEST_TIME_VIEWS["scales"](image)], axis=0)
    by_hand /= np.linalg.norm(by_hand, axis=1, keepdims=True)
    assert np.allclose(scaled.embed(image), by_hand, atol=1e-5)
    assert not np.allclose(scaled.embed(image), plain.embed(image), atol=1e-3)
    turning = load_identity_model("dermoscopy", _dermoscopy_weights(tmp_path / "c", {"test_time_views":
                                                                                      "dihedral+scales"}),
                                  torch.device("cpu"))
    assert np.allclose(turning.embed(image), turning.embed(torch.rot90(image, 1, dims=(-2, -1))), atol=1e-5)


def test_fine_tuning_a_proxy_loss_starts_each_persons_proxies_at_their_mean_embedding():
    """With --init, ArcFace / CosFace proxies start where the trained network puts each person."""
    from pytorch_metric_learning import losses

    from models.training.losses import init_proxies
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((10, 16))
    labels = np.repeat(np.arange(10), 3)
    emb = centres[labels] + 0.3 * rng.standard_normal((30, 16))
    for loss in (losses.CosFaceLoss(num_classes=10, embedding_size=16),
                 losses.SubCenterArcFaceLoss(num_classes=10, embedding_size=16, sub_centers=3)):
        before = loss.get_logits(torch.as_tensor(emb, dtype=torch.float32)).argmax(1).numpy()
        note = init_proxies(loss, emb, labels, 10)
        logits = loss.get_logits(torch.as_tensor(emb, dtype=torch.float32))
        assert (logits.argmax(1).numpy() == labels).all() and not (before == labels).all()
        proxies = loss.W.detach().numpy().T.reshape(10, -1, 16)
        mean = np.stack([emb[labels == c].mean(0) for c in range(10)])
        mean /= np.linalg.norm(mean, axis=1, keepdims=True)
        cos = (proxies * mean[:, None]).sum(-1) / np.linalg.norm(proxies, axis=-1)
        assert cos.min() > 0.99 and "10 classes" in note
