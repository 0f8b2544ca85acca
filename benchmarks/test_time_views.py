#!/usr/bin/env python3
"""Which test-time views help a route's identity model? (an experiment for docs/accuracy.md)

    .venv/bin/python benchmarks/test_time_views.py --route brain_mr \
        --manifest /tmp/train/man/mr-select302-first-series.csv none shifts shifts:1 shifts:3 grid:2

Scores one manifest with `dicom-node evaluate` once per view set, each time with the registry
model (`--weights-dir`, default models/weights) whose card names that view set, and prints
Rank-1, mAP, ROC AUC, EER and TAR at FAR 1e-3 per set. View sets: the names of
`models.networks.TEST_TIME_VIEWS` (`none`, `dihedral`, `shifts`) and these variants, which
only this experiment knows:

* `shifts:K` - the input and its moves by K voxels up and down each axis (`shifts` is K = 2;
  `shifts:4` has since become a card value of its own, the same views);
* `shifts:K+L` - the moves of K and of L together (one set);
* `grid:K` - every combination of -K, 0, +K along each axis (27 views of a volume);
* `dihedral+shifts:K` - each of the 8 dihedral views with its moves by K (2D only);
* `shifts+rot:D` - `shifts` plus turns by +-D degrees in the first two spatial axes (the axial
  plane of a volume);
* `shifts+zoom:P` - `shifts` plus zooms in and out by P percent about the centre;
* `shifts+rotzoom:D,P` - both;
* `scales:F1,F2,...[@VIEWS]` - the input resampled to F times its size for each F (1: as it is;
  2D bilinear with antialiasing as the card value `scales`, whose factors are 6/7 and 8/7;
  volumes trilinear), each size seen through the card view set VIEWS (default none).

The volume routes train with turns up to 0.08 rad (4.6 degrees) and zooms up to 6 % (RandAffine
in models/augment.py); views of 2-3 degrees or percent stay inside that range.

The card is copied to a scratch folder for each run; the weights folder is not changed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _grid(x, step: int) -> list:
    from models.networks import _translated
    views = []
    for moves in itertools.product((-step, 0, step), repeat=x.ndim - 2):
        v = x
        for dim, move in enumerate(moves, start=2):
            v = _translated(v, dim, move) if move else v
        views.append(v)
    return views


def _affine(x, degrees: float = 0.0, zoom: float = 1.0):
    """x turned by `degrees` in its first two spatial axes and zoomed by `zoom` (trilinear, zero outside)."""
    import math

    import torch
    import torch.nn.functional as F
    n = x.ndim - 2
    a = math.radians(degrees)
    theta = torch.eye(n, n + 1, dtype=x.dtype) / zoom
    # affine_grid orders coordinates from the last tensor axis to the first; the first two spatial
    # axes are the last two coordinates (equal sizes and spacing in-plane, so this is a true turn)
    i, j = n - 1, n - 2
    theta[i, i], theta[i, j], theta[j, i], theta[j, j] = (math.cos(a) / zoom, -math.sin(a) / zoom,
                                                          math.sin(a) / zoom, math.cos(a) / zoom)
    grid = F.affine_grid(theta.expand(x.shape[0], n, n + 1), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _rot_zoom_views(x, degrees: float, percent: float) -> list:
    from models.networks import _shifts
    views = _shifts(x, 2)
    if degrees:
        views += [_affine(x, degrees=d) for d in (degrees, -degrees)]
    if percent:
        views += [_affine(x, zoom=1 + p / 100) for p in (percent, -percent)]
    return views


def _sized(x, factor: float):
    from models.networks import _rescaled
    return x if factor == 1 else _rescaled(x, factor)


def register_variant(name: str) -> None:
    """Adds a variant view set named as in the module docstring to TEST_TIME_VIEWS."""
    from models.networks import TEST_TIME_VIEWS, _shifts
    if name in TEST_TIME_VIEWS:
        return
    kind, _, arg = name.partition(":")
    try:
        if kind == "scales":                                             # arguments F1,F2,...[@VIEWS]
            factors, _, inner = arg.partition("@")
            sizes, inner = [float(f) for f in factors.split(",")], inner or "none"
            register_variant(inner)
            TEST_TIME_VIEWS[name] = lambda x: [v for f in sizes for v in TEST_TIME_VIEWS[inner](_sized(x, f))]
            return
        if kind in ("shifts+rot", "shifts+zoom", "shifts+rotzoom"):      # arguments D, P or D,P
            vals = [float(v) for v in arg.split(",")]
            degrees = vals[0] if kind != "shifts+zoom" else 0.0
            percent = vals[-1] if kind != "shifts+rot" else 0.0
            TEST_TIME_VIEWS[name] = lambda x: _rot_zoom_views(x, degrees, percent)
            return
        steps = [int(k) for k in arg.split("+")]                         # arguments K or K+L...
    except ValueError:
        raise SystemExit(f"unknown view set {name!r}") from None
    if kind == "shifts":
        TEST_TIME_VIEWS[name] = lambda x: [x] + [v for k in steps for v in _shifts(x, k)[1:]]
    elif kind == "grid" and len(steps) == 1:
        TEST_TIME_VIEWS[name] = lambda x: _grid(x, steps[0])
    elif kind == "dihedral+shifts" and len(steps) == 1:
        TEST_TIME_VIEWS[name] = lambda x: [w for v in TEST_TIME_VIEWS["dihedral"](x) for w in _shifts(v, steps[0])]
    else:
        raise SystemExit(f"unknown view set {name!r}")


def score(route: str, manifest: str, weights: Path, views: str) -> dict:
    from dicom_node.cli import main
    register_variant(views)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        shutil.copytree(weights / route, folder / route, ignore=shutil.ignore_patterns("checkpoint.pt"))
        card_path = folder / route / "card.json"
        card = json.loads(card_path.read_text())
        card.pop("test_time_views", None)
        if views != "none":
            card["test_time_views"] = views
        card_path.write_text(json.dumps(card))
        with contextlib.redirect_stdout(io.StringIO()):
            if main(["evaluate", "--route", route, "--manifest", manifest, "--weights-dir", str(folder),
                     "--json", str(folder / "report.json")]) != 0:
                raise SystemExit(f"evaluate failed for {views}")
        return json.loads((folder / "report.json").read_text())["results"]["model"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--route", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--weights-dir", type=Path, default=Path("models/weights"))
    p.add_argument("views", nargs="+", help="view sets to compare (see the module docstring)")
    args = p.parse_args(argv)
    print(f"{args.route} on {args.manifest}: Rank-1 / mAP / AUC / EER / TAR@FAR1e-3")
    for views in args.views:
        r = score(args.route, args.manifest, args.weights_dir, views)
        print(f"{views:28s} {r['rank1']:.3f} / {r['mAP']:.3f} / {r['roc_auc']:.4f} / {r['eer']:.3f} / "
              f"{r['tar_at_far_1e-3']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
