"""Similarity -> log-likelihood ratio of 'same patient', fitted on validation pairs.

Prior-free logistic calibration (as in speaker verification, Brümmer's "linear calibration"):
minimize the class-balanced logistic loss, genuine and impostor pairs each weighted to half
of the total, of  llr(s) = a * s + b.  With balanced weights the fitted logit is the
log-likelihood ratio  log p(s | same) / p(s | different), independent of how many pairs of
each kind the validation set had. The posterior for a prior probability `prior` of a pair
being the same patient is  sigmoid(llr(s) + log(prior / (1 - prior))).

`a` is kept >= 0 so the mapping is monotone non-decreasing in the similarity. A mild L2
penalty keeps the fit finite when the validation pairs are perfectly separated.

Parameters are plain JSON (stored in the model card under "calibration"):
    {"method": "logistic-llr", "a": ..., "b": ..., "pairs": {"genuine": n, "impostor": m},
     "fitted_on": "...", "score": "cosine"}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize


@dataclass(frozen=True)
class Calibration:
    a: float
    b: float
    genuine_pairs: int = 0
    impostor_pairs: int = 0
    fitted_on: str = ""
    method: str = "logistic-llr"
    score: str = "cosine"

    def llr(self, similarity):
        """Natural-log likelihood ratio same/different for a similarity (scalar or array)."""
        s = np.asarray(similarity, dtype=np.float64)
        out = self.a * s + self.b
        return float(out) if out.ndim == 0 else out

    def probability(self, similarity, prior: float = 0.5):
        """P(same patient | similarity) for the given prior probability of 'same'."""
        prior = min(max(prior, 1e-12), 1 - 1e-12)
        logit = np.asarray(self.llr(similarity)) + math.log(prior / (1 - prior))
        out = 0.5 * (1.0 + np.tanh(0.5 * logit))          # sigmoid without overflow
        return float(out) if out.ndim == 0 else out

    def threshold_for_llr(self, llr: float) -> float:
        """The similarity at which llr(s) == llr (inf when a == 0)."""
        return (llr - self.b) / self.a if self.a > 0 else math.inf

    def to_json(self) -> dict:
        d = asdict(self)
        return {"method": d["method"], "score": d["score"], "a": d["a"], "b": d["b"],
                "pairs": {"genuine": d["genuine_pairs"], "impostor": d["impostor_pairs"]},
                "fitted_on": d["fitted_on"]}

    @classmethod
    def from_json(cls, data: dict) -> Calibration:
        if data.get("method", "logistic-llr") != "logistic-llr":
            raise ValueError(f"unknown calibration method {data.get('method')!r}")
        pairs = data.get("pairs") or {}
        return cls(float(data["a"]), float(data["b"]), int(pairs.get("genuine", 0)),
                   int(pairs.get("impostor", 0)), str(data.get("fitted_on", "")),
                   score=str(data.get("score", "cosine")))


def fit_calibration(genuine, impostor, fitted_on: str = "", l2: float = 1e-6) -> Calibration:
    """Fit llr(s) = a s + b on genuine (same-patient) and impostor pair similarities."""
    g = np.asarray(genuine, dtype=np.float64).ravel()
    i = np.asarray(impostor, dtype=np.float64).ravel()
    if len(g) == 0 or len(i) == 0:
        raise ValueError("calibration needs both same-patient and different-patient pairs")
    s = np.concatenate([g, i])
    y = np.concatenate([np.ones(len(g)), np.zeros(len(i))])
    w = np.concatenate([np.full(len(g), 0.5 / len(g)), np.full(len(i), 0.5 / len(i))])

    def loss(p):
        a, b = p
        z = a * s + b
        # log(1 + exp(-z)) for genuine, log(1 + exp(z)) for impostors, stable
        nll = np.where(y == 1, np.logaddexp(0, -z), np.logaddexp(0, z))
        dz = np.where(y == 1, -1.0 / (1.0 + np.exp(np.clip(z, -500, 500))),
                      1.0 / (1.0 + np.exp(-np.clip(z, -500, 500))))
        value = float(np.sum(w * nll) + l2 * a * a)
        grad = np.array([np.sum(w * dz * s) + 2 * l2 * a, np.sum(w * dz)])
        return value, grad

    start = np.array([1.0, -float(np.mean(s))])
    result = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=[(0.0, None), (None, None)])
    a, b = (float(v) for v in result.x)
    return Calibration(a, b, int(len(g)), int(len(i)), fitted_on)


def reliability(cal: Calibration, genuine, impostor, bins: int = 10) -> list[dict]:
    """Balanced-prior reliability table: mean predicted P(same) vs observed rate per score bin."""
    g = np.asarray(genuine, dtype=np.float64)
    i = np.asarray(impostor, dtype=np.float64)
    s = np.concatenate([g, i])
    y = np.concatenate([np.ones(len(g)), np.zeros(len(i))])
    w = np.concatenate([np.full(len(g), 0.5 / len(g)), np.full(len(i), 0.5 / len(i))])
    p = cal.probability(s)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    rows = []
    for k in range(bins):
        m = idx == k
        if w[m].sum() > 0:
            rows.append({"bin": [float(edges[k]), float(edges[k + 1])], "predicted": float(np.average(p[m], weights=w[m])),
                         "observed": float(np.average(y[m], weights=w[m])), "pairs": int(m.sum())})
    return rows
