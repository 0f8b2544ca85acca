"""Learned whitening (Radenovic et al., TPAMI 2018): a linear map fitted on labelled embeddings.

Centre on the fitting mean and whiten by the within-person covariance (shrunk towards its mean
variance), so the directions in which one person's images wobble (pose, exposure, crop) count less
and the stable ones more; optionally keep only the directions of largest between-person spread.
`train --head whitening` fits it on a frozen ImageNet backbone's pooled features and stores it as the
network's linear head (models.training.train).
"""

from __future__ import annotations

import numpy as np


# Hand-written: scikit-learn's LinearDiscriminantAnalysis does the same fit, but its
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
    """L2-normalized (emb - mean) @ projection, row by row: what the fitted head computes."""
    out = (np.asarray(emb, dtype=np.float32) - mean) @ projection
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def fit_head(net, ex, shrink: float, batch: int = 32) -> dict:
    """Set a backbone network's linear head (models.inference.backbones.BackboneNet) to the learned whitening of its
    pooled features on the examples `ex` (models.datasets.examples.Examples; each image labelled with its example's
    person), keeping the head's `out_dim` directions: head(x) = (x - mean) @ projection. Returns what the
    card records of the fit."""
    import torch

    from models.datasets.examples import as_float
    if not hasattr(net, "pooled") or not isinstance(net.head, torch.nn.Linear):
        raise ValueError("--head whitening needs an ImageNet backbone with a linear head (--init imagenet:MODEL, "
                         "a dimension > 0)")
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        feats = np.concatenate([net.pooled(as_float(ex.images[k:k + batch]).to(device)).double().cpu().numpy()
                                for k in range(0, len(ex.images), batch)])
    net.train(was_training)
    labels = np.asarray(ex.labels)[ex.owner]
    dims = net.head.out_features
    if dims > feats.shape[1]:
        raise ValueError(f"--head whitening keeps at most {feats.shape[1]} directions, not {dims}")
    mean, projection = within_person_whitening(feats, labels, shrink, dims)
    with torch.no_grad():
        net.head.weight.copy_(torch.from_numpy(projection.T.copy()))
        net.head.bias.copy_(torch.from_numpy(-(mean @ projection)))
    return {"kind": "learned whitening of the frozen backbone's GeM-pooled features (models.training.whitening)",
            "shrink": shrink, "dims": dims, "images": int(len(feats)), "persons": int(len(set(labels)))}
