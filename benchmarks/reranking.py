#!/usr/bin/env python3
"""Does re-ranking help an identity model's retrieval? (an experiment for docs/accuracy.md)

    .venv/bin/python benchmarks/reranking.py --route chest_xr --manifest ../shared/data/cxr-adult-figures/manifest.csv
    .venv/bin/python benchmarks/reranking.py --route chest_xr --manifest /tmp/train/man/cxr-pediatric-multi.csv

Embeds a manifest with the registry model (`--weights-dir`, default models/weights; only the
card's validation patients when the model was trained on the manifest, as `dicom-node
evaluate` does), then scores all-vs-all retrieval (Rank-1, Rank-5, mAP, ROC AUC; the same
functions as `evaluate`) for:

* plain cosine (what the node does);
* database-side augmentation (DBA, Arandjelovic & Zisserman 2012): each embedding replaced by
  the normalized sum of itself and its k nearest neighbours weighted by cosine^alpha;
* k-reciprocal re-ranking (Zhong et al., CVPR 2017): Jaccard distance of k-reciprocal
  neighbour sets, blended with the original distance.

Hand-written: neither pytorch-metric-learning nor faiss ships a re-ranking step; both methods
are a few lines of numpy over the N x N similarity matrix (fine for the few hundred images of
a validation set, not for an archive).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def database_side_augmentation(emb: np.ndarray, k: int, alpha: float) -> np.ndarray:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, axis=1)[:, :k]
    w = np.clip(np.take_along_axis(sim, nn, 1), 0, None) ** alpha
    out = emb + (w[:, :, None] * emb[nn]).sum(1)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def k_reciprocal_similarity(emb: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Negated final distance of Zhong et al. (higher = more similar), without their query/gallery split."""
    dist = 2 - 2 * (emb @ emb.T)
    n = len(dist)
    rank = np.argsort(dist, axis=1)

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank[i, :k + 1]
        return forward[np.any(rank[forward, :k + 1] == i, axis=1)]

    v = np.zeros((n, n))
    for i in range(n):
        own = reciprocal(i, k1)
        expanded = own
        for c in own:                                     # add a neighbour's set when it mostly agrees
            theirs = reciprocal(c, int(round(k1 / 2)))
            if len(np.intersect1d(theirs, own)) > 2 / 3 * len(theirs):
                expanded = np.append(expanded, theirs)
        expanded = np.unique(expanded)
        w = np.exp(-dist[i, expanded])
        v[i, expanded] = w / w.sum()
    if k2 > 1:                                            # local query expansion
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    jaccard = np.stack([1 - np.minimum(v[i], v).sum(1) / np.maximum(v[i], v).sum(1) for i in range(n)])
    return -(jaccard * (1 - lam) + dist * lam)


def scores(sim: np.ndarray, codes: np.ndarray) -> dict:
    from models import metrics as M
    r = M.retrieval(sim, codes)
    genuine, impostor = M.pair_scores(sim, codes)
    return {"rank1": r["rank1"], "rank5": r["rank5"], "mAP": r["mAP"], "roc_auc": M.roc_auc(genuine, impostor)}


def scored_cosines(route: str, manifest: Path, weights_dir: Path, card: dict) -> tuple[np.ndarray, np.ndarray, list]:
    """Cosine of every pair of the manifest rows `evaluate` scores, their person codes and the rows;
    prints which model and how many examples (the verification experiments start here)."""
    from models.evaluate import scored_rows
    emb, codes, model = embed(route, manifest, weights_dir)
    rows, _ = scored_rows(card, manifest)
    print(f"{model}: {manifest} ({len(codes)} examples, {len(np.unique(codes))} persons)")
    return emb @ emb.T, codes, rows


def embed(route: str, manifest: Path, weights_dir: Path) -> tuple[np.ndarray, np.ndarray, str]:
    import torch
    from models import metrics as M
    from models.db_data import embed_examples, load_manifest_examples
    from models.evaluate import scored_rows
    from models.networks import load_identity_model
    from models.transforms import route_geometry
    model = load_identity_model(route, weights_dir, torch.device("cpu"))
    rows, _ = scored_rows(model.card, manifest)
    ex = load_manifest_examples(rows, route, route_geometry(route, model.card.get("input")), False)
    with torch.no_grad():
        emb = M.normalize(embed_examples(model.net, ex, torch.device("cpu"), views=model.views))
    return emb, M.encode_labels(ex.labels), f"{model.name} {model.version}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--route", required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--weights-dir", type=Path, default=Path("models/weights"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    emb, codes, model = embed(args.route, args.manifest, args.weights_dir)
    rows = {"plain cosine": scores(emb @ emb.T, codes)}
    for k in (1, 2, 3):
        for alpha in (1.0, 3.0):
            e = database_side_augmentation(emb, k, alpha)
            rows[f"DBA k={k} alpha={alpha:g}"] = scores(e @ e.T, codes)
    for k1, k2, lam in ((20, 6, 0.3), (10, 3, 0.3), (6, 2, 0.3), (5, 1, 0.3), (10, 3, 0.5)):
        rows[f"k-reciprocal k1={k1} k2={k2} lambda={lam:g}"] = scores(k_reciprocal_similarity(emb, k1, k2, lam), codes)
    print(f"{model}: {len(codes)} images, {len(np.unique(codes))} patients ({args.manifest})")
    print(f"{'method':40s} {'Rank-1':>7s} {'Rank-5':>7s} {'mAP':>7s} {'AUC':>7s}")
    for name, r in rows.items():
        print(f"{name:40s} {r['rank1']:7.3f} {r['rank5']:7.3f} {r['mAP']:7.3f} {r['roc_auc']:7.3f}")
    if args.json:
        args.json.write_text(json.dumps({"model": model, "manifest": str(args.manifest), "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
