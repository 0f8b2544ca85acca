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


# Hand-written: scikit-learn's LinearDiscriminantAnalysis (also scored below) does the same fit, but its
# transform keeps at most n_classes - 1 directions and picks its own shrinkage; this is a few lines of numpy.
def within_person_whitening(emb: np.ndarray, codes: np.ndarray, shrink: float = 0.1,
                            dims: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, projection) fitted on embeddings `emb` of persons `codes`; apply with :func:`apply_whitening`.

    `shrink` in [0, 1] pulls the within-person covariance towards its mean variance (1: plain
    centring); `dims` keeps only the whitened directions of largest between-person spread.
    """
    emb = np.asarray(emb, dtype=np.float64)
    codes = np.asarray(codes)
    if not 0.0 <= shrink <= 1.0:
        raise ValueError("shrink must lie in [0, 1]")
    persons, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    repeated = counts[inverse] >= 2
    if repeated.sum() - (counts >= 2).sum() < 2:
        raise ValueError("whitening needs persons with at least two examples each")
    sums = np.zeros((len(persons), emb.shape[1]))
    np.add.at(sums, inverse, emb)
    deviations = (emb - sums[inverse] / counts[inverse, None])[repeated]
    within = deviations.T @ deviations / (repeated.sum() - (counts >= 2).sum())
    d = emb.shape[1]
    within = (1 - shrink) * within + shrink * np.trace(within) / d * np.eye(d)
    values, vectors = np.linalg.eigh(within)
    values = np.maximum(values, values.max() * 1e-9)
    whiten = vectors @ np.diag(values ** -0.5) @ vectors.T
    mean = emb.mean(0)
    if dims:
        spread = np.cov(((emb - mean) @ whiten).T)
        _, directions = np.linalg.eigh(spread)
        whiten = whiten @ directions[:, ::-1][:, :dims]
    return mean.astype(np.float32), whiten.astype(np.float32)


def apply_whitening(emb: np.ndarray, mean: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """L2-normalized (emb - mean) @ projection, row by row."""
    out = (np.asarray(emb, dtype=np.float32) - mean) @ projection
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)



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
