#!/usr/bin/env python3
"""Does a learned whitening of the embeddings help retrieval? (an experiment for docs/accuracy.md)

    .venv/bin/python benchmarks/whitening.py --route chest_ct --fit /tmp/train/man/ct-fit110.csv \
        --manifest /tmp/train/man/ct-select302.csv --manifest /tmp/train/man/ct-select303-twins.csv

Embeds a fitting manifest (persons neither the model nor the scoring used) and one or more
scoring manifests with the registry model, then scores all-vs-all retrieval (the same functions
as `evaluate`) for plain cosine and for cosine after a linear map fitted on the fitting
embeddings:

* "within" (learned whitening, Radenovic et al., TPAMI 2018): centre on the fitting mean and
  whiten by the within-person covariance (shrunk towards its mean variance by `shrink`), so the
  directions in which a person's own studies wobble (pose, noise, intensity) count less and the
  stable ones more; optionally keep only the `dims` directions of largest between-person spread;
* "lda": scikit-learn's LinearDiscriminantAnalysis (eigen solver, Ledoit-Wolf shrinkage), the
  same idea with the shrinkage chosen by the library.

Embeddings are cached (`--cache`) so variants can be compared without re-embedding.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reranking import embed, scores  # noqa: E402  (benchmarks is a folder of scripts, not a package)
from models.whitening import apply_whitening, within_person_whitening  # noqa: E402


def cached_embeddings(route: str, manifest: Path, weights_dir: Path, cache: Path | None):
    if cache is None:
        return embed(route, manifest, weights_dir)[:2]
    key = hashlib.sha256(f"{route}|{manifest.resolve()}|{weights_dir.resolve()}".encode()).hexdigest()[:16]
    path = cache / f"{route}-{manifest.stem}-{key}.npz"
    if not path.exists():
        emb, codes, _ = embed(route, manifest, weights_dir)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, emb=emb, codes=codes)
    data = np.load(path)
    return data["emb"], data["codes"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--route", required=True)
    ap.add_argument("--fit", type=Path, required=True, help="manifest of the persons to fit on")
    ap.add_argument("--manifest", type=Path, action="append", required=True, help="manifest(s) to score")
    ap.add_argument("--weights-dir", type=Path, default=Path("models/weights"))
    ap.add_argument("--cache", type=Path, default=Path("/tmp/whitening-cache"))
    ap.add_argument("--shrink", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.6])
    ap.add_argument("--dims", type=int, nargs="+", default=[0])
    args = ap.parse_args(argv)
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    fit_emb, fit_codes = cached_embeddings(args.route, args.fit, args.weights_dir, args.cache)
    print(f"fit: {len(fit_codes)} examples of {len(np.unique(fit_codes))} persons ({args.fit})")
    maps = {}
    for shrink in args.shrink:
        for dims in args.dims:
            maps[f"within shrink={shrink:g}" + (f" dims={dims}" if dims else "")] = \
                within_person_whitening(fit_emb, fit_codes, shrink, dims or None)
    lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(fit_emb, fit_codes)
    for manifest in args.manifest:
        emb, codes = cached_embeddings(args.route, manifest, args.weights_dir, args.cache)
        rows = {"plain cosine": scores(emb @ emb.T, codes)}
        for name, (mean, proj) in maps.items():
            e = apply_whitening(emb, mean, proj)
            rows[name] = scores(e @ e.T, codes)
        e = lda.transform(emb)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        rows["lda (ledoit-wolf)"] = scores(e @ e.T, codes)
        print(f"\n{manifest}: {len(codes)} examples, {len(np.unique(codes))} persons")
        print(f"{'method':32s} {'Rank-1':>7s} {'Rank-5':>7s} {'mAP':>7s} {'AUC':>7s}")
        for name, r in rows.items():
            print(f"{name:32s} {r['rank1']:7.3f} {r['rank5']:7.3f} {r['mAP']:7.3f} {r['roc_auc']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
