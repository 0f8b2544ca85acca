"""The metric-learning losses of `dicom-node train` (pytorch-metric-learning) and their setup.

* `subcenter-arcface` (default): 3 sub-centres per patient, so a few wrong Patient IDs fall in a
  non-dominant sub-centre instead of pulling the patient's centre;
* `cosface`: additive cosine margin; starts learning sooner from scratch;
* `multisimilarity`: pair-based, with its miner (what the shipped synthetic models use);
* `triplet`: cosine margin, semi-hard triplets (the hardest triplets are mostly label noise).

A MultiSimilarityMiner picks (and weights) the examples each proxy loss learns from.
"""

from __future__ import annotations

import numpy as np
import torch


def loss_and_miner(loss: str, num_classes: int, dim: int):
    """The pytorch-metric-learning loss named `loss` and the miner that selects its examples."""
    from pytorch_metric_learning import distances, losses, miners
    if loss == "subcenter-arcface":
        return (losses.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=dim, margin=28.6, scale=30,
                                            sub_centers=3), miners.MultiSimilarityMiner(epsilon=0.1))
    if loss == "cosface":
        return (losses.CosFaceLoss(num_classes=num_classes, embedding_size=dim, margin=0.2, scale=30),
                miners.MultiSimilarityMiner(epsilon=0.1))
    if loss == "multisimilarity":
        return (losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1))
    if loss == "triplet":
        dist = distances.CosineSimilarity()
        return (losses.TripletMarginLoss(margin=0.2, distance=dist),
                miners.TripletMarginMiner(margin=0.2, distance=dist, type_of_triplets="semihard"))
    raise ValueError(f"unknown loss {loss!r} (subcenter-arcface, cosface, multisimilarity or triplet)")


def init_proxies(loss_fn, emb: np.ndarray, labels: np.ndarray, n_classes: int) -> str:
    """Start a proxy loss (ArcFace, CosFace) at each person's mean embedding under the --init network.

    Random proxies would pull a trained embedding toward random directions for the first epochs
    (the pretrained geometry is lost before the proxies catch up); class centroids make the
    margin act on the look-alikes from the first step. Sub-centres start at the centroid plus a
    little noise so they can still split. Not in pytorch-metric-learning, hence here.
    """
    dim = emb.shape[1]
    sums = np.zeros((n_classes, dim))
    np.add.at(sums, labels, emb)
    cent = sums / np.linalg.norm(sums, axis=1, keepdims=True).clip(1e-12)
    w = loss_fn.W
    per = w.shape[1] // n_classes              # sub-centres per class (columns class*per .. class*per+per-1)
    init = np.repeat(cent, per, axis=0)
    if per > 1:
        init = init + 0.01 * np.random.default_rng(0).standard_normal(init.shape)
    with torch.no_grad():
        w.copy_(torch.as_tensor(init.T, dtype=w.dtype, device=w.device))
    return f"initialized at the --init model's class centroids ({n_classes} classes x {per})"
