"""Fused identity models: two or more trained networks of one 2D route behind one card.

    dicom-node fuse --route dermoscopy --member models/weights/dermoscopy --member /tmp/train/runs/derm-w2 \\
        --weight 0.5 --weight 0.5 --out /tmp/fused/dermoscopy
    dicom-node fuse --route dermoscopy --member A --member B --choose-on SELECT1.csv --choose-on SELECT2.csv \\
        --out /tmp/fused/dermoscopy      # the second member's weight: best mean mAP over the selection sets

Each member embeds the image at its own input size (the fused card's input is the largest member size;
smaller members get the image resized with antialiasing) with its own test-time views; its L2-normalized
embedding is scaled by sqrt(weight) and the members are concatenated. With weights summing to 1 the
fused embedding has unit length and the cosine of two fused embeddings is the weighted mean of the
members' cosines, so everything downstream (faiss search, calibration, the image check, linkage) works
unchanged. Why: a network trained on the project's synthetic persons and an ImageNet backbone whitened on
real images are each strong where the other is weak (docs/accuracy.md, "Dermoscopy on real lesions").

The fused model.pt holds every member's weights (keys `members.<k>.`); the card records each member's
architecture, input size, views, weight and provenance (name, version, sha256), and is loaded by
models.inference.networks.load_identity_model like any other card (FusedNet). A fused model is not trained further: `train
--init` on it is refused with a message.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from models.evaluation import metrics as M
from models.evaluation.evaluate import manifest_embeddings
from models.inference.networks import (DEFAULT_SPECS, FUSION_KEY, FusedNet, WeightsError, build_net, card_version,
                                       is_fused, load_state, read_card, sha256_file, spec_from_arch)
from models.inference.transforms import ROUTE_INPUTS


def fuse(route: str, folders: list[Path], weights: list[float], out: Path, command: str = "",
         chosen: dict | None = None) -> dict:
    """Write out/model.pt and out/card.json of the fused model of the members' weights folders."""
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
        "input": {"size": max(sizes), "transform": f"models.inference.transforms.route_chain({route!r}, input)"},
        "sha256": digest, "size_bytes": model_path.stat().st_size, "date": now.isoformat(timespec="seconds"),
        "training": {"command": command, "fused": "cosine = weighted mean of the members' cosines "
                                                  "(models.inference.networks.FusedNet)",
                     **({"weights_chosen": chosen} if chosen else {})},
        # the card's own calibration and image check are those of the first member until `evaluate
        # --update-card` refits them on held-out pairs of the fused embedding
        "calibration": cards[0].get("calibration"),
        **{k: cards[0][k] for k in ("verification", "calibration_cosine") if cards[0].get(k)},
        "validation_patients": sorted({p for c in cards for p in c.get("validation_patients") or []}),
        "limitations": ["a fusion of the members below; each member's limitations apply"]
                       + [f"{c.get('name')}: {_text(c.get('limitations'))}" for c in cards],
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


def _text(limitations) -> str:
    """A card's limitations as one line: training cards write a string, fused cards a list."""
    return limitations if isinstance(limitations, str) else "; ".join(limitations or [])


def member_similarities(route: str, folder: Path, manifest: Path) -> tuple[np.ndarray, list[str]]:
    """All-vs-all cosines of `manifest` by the model in `folder` (the embedding alone, at its card's input size
    and views, as `evaluate` scores it), and the labels; only patients the member's card did not train on."""
    with tempfile.TemporaryDirectory() as registry:     # any folder name: a registry of one
        (Path(registry) / route).symlink_to(Path(folder).resolve(), target_is_directory=True)
        _, ex, emb, _, _ = manifest_embeddings(route, manifest, Path(registry), torch.device("cpu"))
    emb = M.normalize(np.asarray(emb, dtype=np.float64))
    return emb @ emb.T, list(ex.labels)


def choose_weight(route: str, folders: list[Path], manifests: list[Path], grid: list[float]) -> dict:
    """The second member's weight w (cosine = (1 - w) x first + w x second) with the best mean mAP over the
    selection manifests; a table of every w is printed. Selection sets only: never a test set."""
    if len(folders) != 2:
        raise WeightsError("fuse --choose-on: give exactly two --member folders")
    sims = {}
    for manifest in manifests:
        (a, labels), (b, labels_b) = (member_similarities(route, f, manifest) for f in folders)
        if labels != labels_b:
            raise WeightsError(f"fuse --choose-on {manifest}: the members score different patients (their cards' "
                               "validation patients differ); use a manifest neither member trained on")
        sims[str(manifest)] = (a, b, labels)
    rows = []
    for w in grid:
        per = {name: M.identity_metrics(None, labels, with_pml=False, sim=(1 - w) * a + w * b)
               for name, (a, b, labels) in sims.items()}
        rows.append({"w": w, "mean_mAP": float(np.mean([m["mAP"] for m in per.values()])),
                     **{name: {k: round(float(m[k]), 4) for k in ("rank1", "mAP", "roc_auc")} for name, m in per.items()}})
        print(f"w {w:.2f}  mean mAP {rows[-1]['mean_mAP']:.4f}  " + "  ".join(
            f"{Path(n).name} {m['rank1']:.3f}/{m['mAP']:.3f}/{m['roc_auc']:.3f}" for n, m in per.items()), flush=True)
    best = max(rows, key=lambda r: r["mean_mAP"])
    return {"rule": "best mean mAP over the selection manifests", "manifests": [str(m) for m in manifests],
            "grid": list(grid), "weight_of_second_member": best["w"], "mean_mAP": round(best["mean_mAP"], 4)}


def cmd_fuse(args: argparse.Namespace) -> int:
    command = "dicom-node " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        chosen = None
        if args.choose_on:
            if args.weight:
                raise WeightsError("fuse: give --weight or --choose-on, not both")
            torch.set_num_threads(args.threads)
            chosen = choose_weight(args.route, args.member, args.choose_on, args.grid)
            w = chosen["weight_of_second_member"]
            if w in (0.0, 1.0):
                print(f"dicom-node fuse: the best weight is {w}: one member alone is best on these manifests; "
                      "nothing written", file=sys.stderr)
                return 1
            weights = [1 - w, w]
        else:
            weights = args.weight or [1.0] * len(args.member)
        card = fuse(args.route, args.member, weights, args.out, command, chosen)
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
    fu.add_argument("--choose-on", type=Path, action="append", metavar="MANIFEST",
                    help="choose the second member's weight on these labelled selection manifests (best mean mAP "
                         "over --grid; two members); the card records the choice. Never a test set")
    fu.add_argument("--grid", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                    metavar="W", help="weights of the second member tried by --choose-on")
    fu.add_argument("--threads", type=int, default=2, help="torch threads for --choose-on")
    fu.add_argument("--out", type=Path, required=True, help="output folder (model.pt, card.json)")
    fu.set_defaults(handler=cmd_fuse)
