#!/usr/bin/env python3
"""Choose a 2D route's geometric verification settings on selection sets (an experiment for docs/accuracy.md).

    .venv/bin/python benchmarks/verification_weights.py --route dermoscopy \\
        --manifest /tmp/train/man/derm-select302.csv --manifest /tmp/train/man/derm-select303-twins.csv --sigma 6 12

Embeds each manifest with the registry model (`--weights-dir`; the rows `dicom-node evaluate`
scores), matches every pair of images once per size, keypoint count, high-pass sigma, descriptor
(SIFT or RootSIFT), fitted transform (`--transform`), ECC refinement (`--refine`) and ratio test (`--ratio`)
(models.verification.pairwise_matches: RANSAC inliers and the correlation of the aligned images),
then scores
cosine + w_inliers * log(1 + inliers) + w_ncc * ncc over a grid of weights with the metrics of
`evaluate`. Prints Rank-1 / mAP / AUC per manifest and setting; `--json` writes them all.
Use selection cohorts only: settings chosen on the held-out sets would flatter them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reranking import scored_cosines, scores  # noqa: E402  (benchmarks is a folder of scripts, not a package)

def matches(features: list, s) -> np.ndarray:
    """(N, N, max_images^2, 2): inliers and correlation of every pair of images of every pair of series."""
    from models.verification import pairwise_matches
    return pairwise_matches(features, s, progress=True)


# the settings this script varies besides the high-pass sigma (recorded as "sigma") and the weights
VARIED = ("size", "features", "root_sift", "transform", "refine_iterations", "ratio")


def settings_matches(rows: list, args, base, root: list[bool]):
    """(settings, matches) for every combination asked for; images described once per size, count and sigma."""
    from models.verification import manifest_features
    for size, features, sigma in itertools.product(args.size or [base.size], args.features or [base.features],
                                                   args.sigma):
        described = manifest_features(rows, args.route, replace(base, size=size, features=features, highpass_sigma=sigma))
        for root_sift, fit, refine, ratio in itertools.product(root, args.transform or [base.transform],
                                                               args.refine or [base.refine_iterations],
                                                               args.ratio or [base.ratio]):
            s = replace(base, size=size, features=features, highpass_sigma=sigma, root_sift=root_sift, transform=fit,
                        refine_iterations=refine, ratio=ratio)
            yield s, matches(described, s)


def main(argv: list[str] | None = None) -> int:
    from models.evaluate import CHECK_WEIGHT_GRID
    from models.networks import load_identity_model
    from models.verification import TRANSFORMS, VerificationSettings, bonus_from_matches
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--route", required=True, choices=("chest_xr", "dermoscopy", "fundus"))
    ap.add_argument("--manifest", type=Path, action="append", required=True)
    ap.add_argument("--weights-dir", type=Path, default=Path("models/weights"))
    ap.add_argument("--sigma", type=float, nargs="+", default=[6.0])
    ap.add_argument("--size", type=int, nargs="+", help="long sides of the compared images (default the card's)")
    ap.add_argument("--features", type=int, nargs="+", help="SIFT keypoints per image at most (default the card's)")
    ap.add_argument("--root-sift", choices=("card", "both", "on", "off"), default="card",
                    help="match RootSIFT descriptors: as the card says (default), both ways, on or off")
    ap.add_argument("--transform", nargs="+", choices=TRANSFORMS,
                    help="what RANSAC fits (default the card's)")
    ap.add_argument("--refine", type=int, nargs="+", help="ECC refinement iterations, 0 for none (default the card's)")
    ap.add_argument("--ratio", type=float, nargs="+", help="Lowe's ratio test (default the card's)")
    ap.add_argument("--inlier-weights", type=float, nargs="+", default=list(CHECK_WEIGHT_GRID["weight_inliers"]))
    ap.add_argument("--ncc-weights", type=float, nargs="+", default=list(CHECK_WEIGHT_GRID["weight_ncc"]))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import torch
    card = load_identity_model(args.route, args.weights_dir, torch.device("cpu")).card
    base = VerificationSettings.from_card(card) or VerificationSettings()
    out = {}
    for manifest in args.manifest:
        cosine, codes, rows = scored_cosines(args.route, manifest, args.weights_dir, card)
        print(f"{'size':>5s} {'feat':>5s} {'root':>4s} {'fit':>14s} {'sigma':>6s} {'w_inl':>6s} {'w_ncc':>6s} {'Rank-1':>7s} {'mAP':>7s} "
              f"{'AUC':>7s}")
        root = {"card": [base.root_sift], "both": [False, True], "on": [True], "off": [False]}[args.root_sift]
        for s, m in settings_matches(rows, args, base, root):
            for wi in args.inlier_weights:
                for wn in args.ncc_weights:
                    r = scores(cosine + bonus_from_matches(m, wi, wn), codes)
                    out.setdefault(str(manifest), []).append({
                        **{k: getattr(s, k) for k in VARIED}, "sigma": s.highpass_sigma, "weight_inliers": wi,
                        "weight_ncc": wn, **r})
                    fit = s.transform + ("+ecc" if s.refine_iterations else "") + (f"@{s.ratio:g}" if args.ratio else "")
                    print(f"{s.size:5d} {s.features:5d} {'on' if s.root_sift else 'off':>4s} {fit:>14s} "
                          f"{s.highpass_sigma:6g} {wi:6g} {wn:6g} {r['rank1']:7.3f} {r['mAP']:7.3f} {r['roc_auc']:7.3f}",
                          flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
