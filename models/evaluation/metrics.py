"""Retrieval and verification metrics of identity embeddings (open set, all-vs-all).

`identity_metrics(embeddings, labels)` with rows L2-normalized (normalized here if not):

retrieval     every image with at least one other image of its patient is a query; the
              gallery is every other image (leave-one-out, so the gallery has N - 1 images of
              `patients` patients). Rank-k: a same-patient image among the k most similar
              (the CMC at k). mAP: mean over queries of the average precision of the ranked
              gallery (all same-patient images relevant).
verification  all unordered pairs i < j; score = cosine similarity; ROC AUC (Mann-Whitney,
              ties counted half), EER (where FAR = FRR), TAR at FAR 1e-3 (threshold = the
              score that at most 0.1 % of different-patient pairs exceed).

pytorch-metric-learning's AccuracyCalculator gives an independent check of P@1 and mAP@R
(`pml_metrics`). Everything else is numpy, no scikit-learn. Scores are float64.
"""

from __future__ import annotations

import numpy as np

FAR_TARGET = 1e-3


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def encode_labels(labels) -> np.ndarray:
    """Any hashable labels -> int64 codes (same label, same code)."""
    _, codes = np.unique(np.asarray([str(v) for v in labels]), return_inverse=True)
    return codes.astype(np.int64)


def similarity(embeddings: np.ndarray) -> np.ndarray:
    e = normalize(embeddings)
    return e @ e.T


def retrieval(sim: np.ndarray, codes: np.ndarray, max_rank: int = 20) -> dict:
    """Rank-1, Rank-5, CMC[1..max_rank], mAP over leave-one-out queries."""
    n = len(codes)
    same = codes[:, None] == codes[None, :]
    np.fill_diagonal(same, False)
    queries = np.flatnonzero(same.any(axis=1))
    cmc_hits = np.zeros(max_rank)
    ap = []
    first_ranks = []
    for q in queries:
        scores = sim[q].copy()
        scores[q] = -np.inf
        order = np.argsort(-scores, kind="stable")[: n - 1]
        rel = same[q, order]
        hits = np.flatnonzero(rel)
        first = hits[0]                                   # 0-based rank of the first match
        first_ranks.append(first)
        if first < max_rank:
            cmc_hits[first:] += 1
        precision_at_hits = np.arange(1, len(hits) + 1) / (hits + 1)
        ap.append(precision_at_hits.mean())
    nq = max(len(queries), 1)
    cmc = (cmc_hits / nq).tolist()
    return {
        "queries": int(len(queries)),
        "gallery_size": int(n - 1),
        "patients": int(len(np.unique(codes))),
        "rank1": float(cmc[0]) if len(queries) else float("nan"),
        "rank5": float(cmc[min(4, max_rank - 1)]) if len(queries) else float("nan"),
        "mAP": float(np.mean(ap)) if ap else float("nan"),
        "cmc": cmc,
    }


def pair_scores(sim: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(genuine scores, impostor scores) over all pairs i < j."""
    iu = np.triu_indices(len(codes), k=1)
    scores = sim[iu]
    same = codes[iu[0]] == codes[iu[1]]
    return scores[same], scores[~same]


def roc_curve(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FAR, TAR, thresholds), thresholds descending; a pair is accepted when score >= threshold."""
    thresholds = np.unique(np.concatenate([genuine, impostor]))[::-1]
    g = np.sort(genuine)
    i = np.sort(impostor)
    tar = (len(g) - np.searchsorted(g, thresholds, side="left")) / max(len(g), 1)
    far = (len(i) - np.searchsorted(i, thresholds, side="left")) / max(len(i), 1)
    return np.concatenate([[0.0], far]), np.concatenate([[0.0], tar]), np.concatenate([[np.inf], thresholds])


def roc_auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """P(genuine score > impostor score) + 0.5 P(equal), by ranks (Mann-Whitney U)."""
    if len(genuine) == 0 or len(impostor) == 0:
        return float("nan")
    from scipy.stats import rankdata
    ranks = rankdata(np.concatenate([genuine, impostor]))
    u = ranks[: len(genuine)].sum() - len(genuine) * (len(genuine) + 1) / 2
    return float(u / (len(genuine) * len(impostor)))


def eer(far: np.ndarray, tar: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    """(equal error rate, its threshold), linear interpolation between ROC points."""
    frr = 1.0 - tar
    diff = far - frr                                  # increasing along the curve (-1 .. +1)
    k = int(np.searchsorted(diff, 0.0))
    if k == 0:
        return float(far[0]), float(thresholds[0])
    if k >= len(diff):
        return float(frr[-1]), float(thresholds[-1])
    d0, d1 = diff[k - 1], diff[k]
    w = 0.0 if d1 == d0 else -d0 / (d1 - d0)
    rate = far[k - 1] + w * (far[k] - far[k - 1])
    t0 = thresholds[k - 1] if np.isfinite(thresholds[k - 1]) else thresholds[k]
    return float(rate), float(t0 + w * (thresholds[k] - t0))


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far_target: float = FAR_TARGET) -> tuple[float, float]:
    """(TAR, threshold): the threshold is the smallest score with FAR <= far_target (strict >)."""
    if len(genuine) == 0 or len(impostor) == 0:
        return float("nan"), float("nan")
    i = np.sort(impostor)[::-1]
    allowed = int(np.floor(far_target * len(i)))       # impostors that may pass
    threshold = float(i[allowed]) if allowed < len(i) else float(i[-1]) - 1e-12
    return float(np.mean(genuine > threshold)), threshold


def verification(genuine: np.ndarray, impostor: np.ndarray) -> dict:
    far, tar, thr = roc_curve(genuine, impostor)
    rate, eer_threshold = eer(far, tar, thr)
    tar3, thr3 = tar_at_far(genuine, impostor)
    return {"genuine_pairs": int(len(genuine)), "impostor_pairs": int(len(impostor)),
            "roc_auc": roc_auc(genuine, impostor), "eer": rate, "eer_threshold": eer_threshold,
            "tar_at_far_1e-3": tar3, "threshold_at_far_1e-3": thr3,
            "far_resolution": 1.0 / max(len(impostor), 1)}


def pml_metrics(embeddings: np.ndarray, codes: np.ndarray) -> dict:
    """precision_at_1 and mean_average_precision_at_r from pytorch-metric-learning (query = reference)."""
    try:
        import torch
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        from pytorch_metric_learning.utils.inference import CustomKNN
    except ImportError:                                   # optional cross-check
        return {}
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                              device=torch.device("cpu"), knn_func=CustomKNN(CosineSimilarity()))
    emb = torch.as_tensor(normalize(embeddings), dtype=torch.float32)
    lab = torch.as_tensor(codes)
    out = calc.get_accuracy(emb, lab, emb, lab, ref_includes_query=True)
    return {k: float(v) for k, v in out.items()}


def identity_metrics(embeddings: np.ndarray, labels, with_pml: bool = True, curves: bool = False,
                     sim: np.ndarray | None = None) -> dict:
    """All metrics of the module docstring; `curves` adds ROC points and pair scores for plots.

    `sim`: the (N, N) scores to rank and verify with instead of the embeddings' cosines (e.g. cosine
    plus models.inference.verification's bonus); pytorch-metric-learning's cross-check is then left out."""
    codes = encode_labels(labels)
    if sim is None:
        sim = similarity(embeddings)
    else:
        with_pml = False
    out = {"images": int(len(codes)), **retrieval(sim, codes)}
    genuine, impostor = pair_scores(sim, codes)
    out.update(verification(genuine, impostor))
    if with_pml and out["queries"]:
        out["pml"] = pml_metrics(embeddings, codes)
    if curves:
        far, tar, _ = roc_curve(genuine, impostor)
        out["_curves"] = {"far": far, "tar": tar, "genuine": genuine, "impostor": impostor}
    return out


def summary(metrics: dict) -> dict:
    """The headline numbers (JSON-friendly, no curves)."""
    keys = ("images", "patients", "queries", "gallery_size", "rank1", "rank5", "mAP", "roc_auc", "eer",
            "tar_at_far_1e-3", "genuine_pairs", "impostor_pairs")
    return {k: metrics[k] for k in keys if k in metrics}
