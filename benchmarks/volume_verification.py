#!/usr/bin/env python3
"""Would a geometric check of volume pairs help the 3D routes? (an experiment for docs/accuracy.md)

    .venv/bin/python benchmarks/volume_verification.py --route chest_ct \\
        --manifest /tmp/train/man/ct-select303-twins.csv --sigma 1.5 3

The 2D routes add a check of each image pair to the cosine (models/verification.py: SIFT and
RANSAC). This is its volume analogue, scored over all pairs of a manifest: each series is
resampled finer than the network's input (`--spacing`, `--shape`), high-passed (volume minus its
Gaussian blur of `--sigma` voxels), aligned to the other by a few turns in the axial plane
(`--angles`) and the translation of the phase-correlation peak (within `--max-shift` voxels),
and the normalized correlation of the two high-passed volumes where both hold tissue is the
pair's check. Prints Rank-1 / mAP / AUC of cosine + w * check for a grid of w; `--json` keeps
them and the check matrix. Use selection cohorts to choose; held-out cohorts only to report.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reranking import scored_cosines, scores  # noqa: E402  (benchmarks is a folder of scripts, not a package)

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)
TISSUE = 0.02          # normalized intensity above which a voxel counts as inside the body


@dataclass
class VolumeFeatures:
    highpass: np.ndarray           # (X, Y, Z) float32, the reference orientation
    tissue: np.ndarray             # (X, Y, Z) bool
    turned: list                   # per angle: (conj rfftn of the turned high-pass, turned high-pass, turned tissue)


def volume_features(path: str, chain, sigma: float, angles: tuple[float, ...]) -> VolumeFeatures:
    from scipy import ndimage

    from models.loading import load_series
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    v = np.asarray(chain(load_series(files).image))[0].astype(np.float32)
    hp = lambda x: (x - ndimage.gaussian_filter(x, sigma)).astype(np.float32)  # noqa: E731
    turned = []
    for angle in angles:
        t = ndimage.rotate(v, angle, axes=(0, 1), reshape=False, order=1) if angle else v
        h = hp(t)
        turned.append((np.conj(np.fft.rfftn(h)).astype(np.complex64), h, t > TISSUE))
    return VolumeFeatures(hp(v), v > TISSUE, turned)


def check(a: VolumeFeatures, b: VolumeFeatures, max_shift: int) -> float:
    """Best correlation of a's high-pass with b's, over b's turns and small translations."""
    fa = np.fft.rfftn(a.highpass)
    shape = np.array(a.highpass.shape)
    best = -1.0
    for conj_fb, hb, tb in b.turned:
        cross = fa * conj_fb
        corr = np.fft.irfftn(cross / (np.abs(cross) + 1e-6), s=a.highpass.shape, axes=(0, 1, 2))
        # only small moves: a far peak is a chance alignment of unrelated anatomy
        for axis, n in enumerate(shape):
            idx = np.arange(n)
            far = np.minimum(idx, n - idx) > max_shift
            sl = [slice(None)] * 3
            sl[axis] = far
            corr[tuple(sl)] = -np.inf
        shift = np.array(np.unravel_index(np.argmax(corr), corr.shape))
        shift = np.where(shift > shape // 2, shift - shape, shift)
        hs = np.roll(hb, tuple(shift), axis=(0, 1, 2))
        both = a.tissue & np.roll(tb, tuple(shift), axis=(0, 1, 2))
        if both.sum() < 1000:
            continue
        x, y = a.highpass[both], hs[both]
        x, y = x - x.mean(), y - y.mean()
        best = max(best, float((x * y).sum() / (np.sqrt((x * x).sum() * (y * y).sum()) + 1e-9)))
    return best


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from models.networks import load_identity_model
    from models.transforms import route_chain
    from models.verification import pairwise
    import torch
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--route", required=True, choices=("chest_ct", "brain_mr"))
    ap.add_argument("--manifest", type=Path, action="append", required=True)
    ap.add_argument("--weights-dir", type=Path, default=Path("models/weights"))
    ap.add_argument("--spacing", type=float, nargs=3, default=[4.0, 4.0, 5.0])
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64])
    ap.add_argument("--sigma", type=float, nargs="+", default=[1.5])
    ap.add_argument("--angles", type=float, nargs="+", default=[-4.0, 0.0, 4.0])
    ap.add_argument("--max-shift", type=int, default=8)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    card = load_identity_model(args.route, args.weights_dir, torch.device("cpu")).card
    chain = route_chain(args.route, {"shape": args.shape, "spacing": args.spacing})
    out = {}
    for manifest in args.manifest:
        cosine, codes, rows = scored_cosines(args.route, manifest, args.weights_dir, card)
        print(f"{'sigma':>6s} {'w':>6s} {'Rank-1':>7s} {'mAP':>7s} {'AUC':>7s}")
        for sigma in args.sigma:
            feats = [volume_features(str(path), chain, sigma, tuple(args.angles))
                     for path, _ in tqdm(rows, desc="volumes", leave=False)]
            m = pairwise(feats, partial(check, max_shift=args.max_shift), args.workers, progress=True)
            out.setdefault(str(manifest), {})[str(sigma)] = {"check": m.round(4).tolist(), "grid": []}
            for w in WEIGHTS:
                r = scores(cosine + w * m, codes)
                out[str(manifest)][str(sigma)]["grid"].append({"weight": w, **r})
                print(f"{sigma:6g} {w:6g} {r['rank1']:7.3f} {r['mAP']:7.3f} {r['roc_auc']:7.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
