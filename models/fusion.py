"""Fused identity models: two or more trained networks of one 2D route behind one card.

    dicom-node fuse --route dermoscopy --member models/weights/dermoscopy --member /tmp/train/runs/derm-w2 \\
        --weight 0.5 --weight 0.5 --out /tmp/fused/dermoscopy

Each member embeds the image at its own input size (the fused card's input is the largest member size;
smaller members get the image resized with antialiasing) with its own test-time views; its L2-normalized
embedding is scaled by sqrt(weight) and the members are concatenated. With weights summing to 1 the
fused embedding has unit length and the cosine of two fused embeddings is the weighted mean of the
members' cosines, so everything downstream (faiss search, calibration, the image check, linkage) works
unchanged. Why: a network trained on the project's synthetic persons and an ImageNet backbone whitened on
real images are each strong where the other is weak (docs/accuracy.md, "Dermoscopy on real lesions").

The fused model.pt holds every member's weights (keys `members.<k>.`); the card records each member's
architecture, input size, views, weight and provenance (name, version, sha256), and is loaded by
models.networks.load_identity_model like any other card. A fused model is not trained further: `train
--init` on it is refused with a message.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FUSION_KEY = "fusion"


class FusedNet(nn.Module):
    """Members' weighted, concatenated embeddings (see the module docstring)."""

    def __init__(self, members: list[nn.Module], sizes: list[int], views: list[str | None],
                 weights: list[float]) -> None:
        super().__init__()
        if not (len(members) == len(sizes) == len(views) == len(weights) >= 2):
            raise ValueError("a fused model needs two or more members, each with a size, views and a weight")
        if min(weights) <= 0:
            raise ValueError("member weights must be positive")
        total = sum(weights)
        self.members = nn.ModuleList(members)
        self.sizes, self.views = list(sizes), list(views)
        self.scales = [math.sqrt(w / total) for w in weights]
        self.out_dim = sum(m.out_dim for m in members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from models.networks import embed_views
        if x.ndim != 4:
            raise ValueError("fused models take 2D images (N, C, H, W)")
        out = []
        for net, size, views, scale in zip(self.members, self.sizes, self.views, self.scales):
            xi = x if tuple(x.shape[-2:]) == (size, size) else \
                F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out.append(scale * embed_views(net, xi, views))
        return torch.cat(out, dim=1)


def is_fused(card: dict | None) -> bool:
    return bool(card) and FUSION_KEY in (card.get("arch") or {})


def build_fused(card: dict, route: str) -> FusedNet:
    """The (untrained) FusedNet of a fused card; load_state fills in the weights."""
    from models.networks import DEFAULT_SPECS, build_net, check_views, spec_from_arch
    members = card["arch"][FUSION_KEY]
    nets = [build_net(spec_from_arch(m["arch"], DEFAULT_SPECS[route])) for m in members]
    return FusedNet(nets, [int(m["size"]) for m in members],
                    [check_views(m.get("test_time_views"), "fused member") for m in members],
                    [float(m["weight"]) for m in members])


def fuse(route: str, folders: list[Path], weights: list[float], out: Path, command: str = "") -> dict:
    """Write out/model.pt and out/card.json of the fused model of the members' weights folders."""
    from models.networks import DEFAULT_SPECS, WeightsError, build_net, card_version, load_state, read_card, \
        sha256_file, spec_from_arch
    from models.transforms import ROUTE_INPUTS
    if len(ROUTE_INPUTS[route].get("shape") or ()) != 2:
        raise WeightsError(f"fuse: {route} is a volume route; fused models are 2D")
    if len(folders) != len(weights) or len(folders) < 2:
        raise WeightsError("fuse: give two or more --member folders and one --weight for each")
    cards, nets = [], []
    for folder in folders:
        found = read_card(Path(folder))
        if found is None:
            raise WeightsError(f"fuse: {folder} holds no model.pt and card.json")
        card, model_path = found
        if card.get("route") != route or is_fused(card):
            raise WeightsError(f"fuse: {folder} is not a single {route} model")
        if "size" not in (card.get("input") or {}):
            raise WeightsError(f"fuse: {folder}'s card has no 2D input size")
        net = build_net(spec_from_arch(card.get("arch"), DEFAULT_SPECS[route]))
        load_state(net, model_path)
        cards.append(card)
        nets.append(net)
    sizes = [int(c["input"]["size"]) for c in cards]
    fused = FusedNet(nets, sizes, [c.get("test_time_views") for c in cards], weights)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.pt"
    torch.save(fused.state_dict(), model_path)
    digest = sha256_file(model_path)
    total = sum(weights)
    members = [{"arch": c.get("arch"), "size": s, "test_time_views": c.get("test_time_views") or "none",
                "weight": w / total, "name": c.get("name"), "version": c.get("version"), "sha256": c.get("sha256"),
                **({"backbone": c["backbone"]} if c.get("backbone") else {}),
                "training_data": {k: c.get("training_data", {}).get(k) for k in ("manifests", "manifest_rows", "head")
                                  if c.get("training_data", {}).get(k) is not None},
                "validation": (c.get("metrics") or {}).get("validation")}
               for c, s, w in zip(cards, sizes, weights)]
    now = datetime.now(timezone.utc)
    card = {
        "name": f"{route}-fused-" + "+".join(str(c.get("name", "?")).removeprefix(route + "-") for c in cards),
        "version": card_version(now.strftime("%Y%m%d") + "-fused-" + digest[:8], None),
        "route": route,
        "arch": {FUSION_KEY: members},
        "input": {"size": max(sizes), "transform": f"models.transforms.route_chain({route!r}, input)"},
        "sha256": digest, "size_bytes": model_path.stat().st_size, "date": now.isoformat(timespec="seconds"),
        "training": {"command": command, "fused": "cosine = weighted mean of the members' cosines "
                                                  "(models.fusion)"},
        # the card's own calibration and image check are those of the first member until `evaluate
        # --update-card` refits them on held-out pairs of the fused embedding
        "calibration": cards[0].get("calibration"),
        **{k: cards[0][k] for k in ("verification", "calibration_cosine") if cards[0].get(k)},
        "validation_patients": sorted({p for c in cards for p in c.get("validation_patients") or []}),
        "limitations": ["a fusion of the members below; each member's limitations apply"]
                       + [f"{c.get('name')}: {'; '.join(c.get('limitations') or [])}" for c in cards],
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


def cmd_fuse(args: argparse.Namespace) -> int:
    from models.networks import WeightsError
    weights = args.weight or [1.0] * len(args.member)
    try:
        card = fuse(args.route, args.member, weights, args.out,
                    "dicom-node " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    except (WeightsError, ValueError) as error:
        print(f"dicom-node fuse: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/model.pt and card.json ({card['name']} {card['version']}; "
          f"{sum(1 for _ in card['arch'][FUSION_KEY])} members, input {card['input']['size']} px)")
    return 0


def add_subcommand(subparsers) -> None:
    fu = subparsers.add_parser("fuse", help="one identity model from two or more trained models of a 2D route")
    fu.add_argument("--route", required=True)
    fu.add_argument("--member", type=Path, action="append", required=True, metavar="FOLDER",
                    help="a weights folder (model.pt + card.json) of the route; give two or more")
    fu.add_argument("--weight", type=float, action="append", metavar="W",
                    help="each member's weight in the fused cosine, in --member order (default equal)")
    fu.add_argument("--out", type=Path, required=True, help="output folder (model.pt, card.json)")
    fu.set_defaults(handler=cmd_fuse)
