"""`dicom-node fuse` (models/training/fuse.py, models.inference.networks.FusedNet): two trained networks of a 2D route behind one card, loaded by the
registry like any model; the fused cosine is the weighted mean of the members' cosines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dicom_node.cli import main
from models.inference.networks import embed_views, load_identity_model
from tests.helpers import write_image_manifest


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """A small ResNet at 48 px with test-time views and a whitened Lite0 at 64 px, on one synthetic manifest."""
    root = tmp_path_factory.mktemp("fuse")
    manifest = write_image_manifest(root / "set", patients=6, per=3)
    a, b = root / "a" / "chest_xr", root / "b" / "chest_xr"
    assert main(["train", "--route", "chest_xr", "--manifest", str(manifest), "--size", "48", "--epochs", "1",
                 "--threads", "1", "--batch-size", "8", "--widths", "8", "16", "16", "32",
                 "--test-time-views", "scales", "--out", str(a)]) == 0
    assert main(["train", "--route", "chest_xr", "--manifest", str(manifest), "--size", "64", "--threads", "1",
                 "--init", "imagenet:efficientnet-lite0", "--head", "whitening", "--dim", "16", "--epochs", "0",
                 "--out", str(b)]) == 0
    return root, a, b


def test_fused_cosine_is_the_weighted_mean_of_the_members(members, tmp_path):
    root, a, b = members
    out = tmp_path / "w" / "chest_xr"
    assert main(["fuse", "--route", "chest_xr", "--member", str(a), "--member", str(b),
                 "--weight", "3", "--weight", "1", "--out", str(out)]) == 0
    card = json.loads((out / "card.json").read_text())
    fused = load_identity_model("chest_xr", out.parent, torch.device("cpu"))
    assert card["input"]["size"] == 64 and fused.dim == 256 + 16
    assert [m["weight"] for m in card["arch"]["fusion"]] == [0.75, 0.25]
    assert card["arch"]["fusion"][0]["test_time_views"] == "scales"
    # each member's limitations in one readable line (a training card writes them as one string)
    member_a = json.loads((a / "card.json").read_text())
    assert card["limitations"][1] == f"{member_a['name']}: {member_a['limitations']}"
    x = torch.rand(5, 1, 64, 64)
    ma = load_identity_model("chest_xr", a.parent, torch.device("cpu"))
    mb = load_identity_model("chest_xr", b.parent, torch.device("cpu"))
    with torch.inference_mode():
        ea = embed_views(ma.net, F.interpolate(x, size=(48, 48), mode="bilinear", antialias=True), ma.views).numpy()
        eb = mb.net(x).numpy()
    e = fused.embed(x)
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert np.allclose(e @ e.T, 0.75 * ea @ ea.T + 0.25 * eb @ eb.T, atol=1e-5)


def test_fuse_refuses_what_it_cannot_fuse(members, tmp_path, capsys):
    root, a, b = members
    assert main(["fuse", "--route", "chest_xr", "--member", str(a), "--out", str(tmp_path / "one")]) == 2
    assert "two or more" in capsys.readouterr().err
    assert main(["fuse", "--route", "fundus", "--member", str(a), "--member", str(b),
                 "--out", str(tmp_path / "x")]) == 2
    assert "not a single fundus model" in capsys.readouterr().err
    assert main(["fuse", "--route", "chest_xr", "--member", str(a), "--member", str(tmp_path),
                 "--out", str(tmp_path / "y")]) == 2
    out = tmp_path / "f" / "chest_xr"
    assert main(["fuse", "--route", "chest_xr", "--member", str(a), "--member", str(b), "--out", str(out)]) == 0
    manifest = root / "set" / "manifest.csv"
    assert main(["train", "--route", "chest_xr", "--manifest", str(manifest), "--init", str(out),
                 "--epochs", "1", "--out", str(tmp_path / "t")]) == 2
    assert "fused model" in capsys.readouterr().err


def test_fuse_chooses_the_weight_on_selection_manifests(members, tmp_path, capsys):
    """--choose-on scores every grid weight on sets neither member trained on, keeps the best mean mAP,
    and records the choice in the card."""
    root, a, b = members
    selection = write_image_manifest(tmp_path / "sel", patients=5, per=2, offset=12)
    out = tmp_path / "c" / "chest_xr"
    assert main(["fuse", "--route", "chest_xr", "--member", str(a), "--member", str(b),
                 "--choose-on", str(selection), "--grid", "0.25", "0.5", "0.75", "--threads", "1",
                 "--out", str(out)]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("w ")]
    scores = {float(row[1]): float(row[4]) for row in table}
    assert sorted(scores) == [0.25, 0.5, 0.75]
    best = max(scores, key=scores.get)
    card = json.loads((out / "card.json").read_text())
    chosen = card["training"]["weights_chosen"]
    assert chosen["weight_of_second_member"] == best and chosen["manifests"] == [str(selection)]
    assert [m["weight"] for m in card["arch"]["fusion"]] == pytest.approx([1 - best, best])
    assert main(["fuse", "--route", "chest_xr", "--member", str(a), "--member", str(b), "--weight", "1",
                 "--choose-on", str(selection), "--out", str(tmp_path / "both")]) == 2
