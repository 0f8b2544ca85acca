"""Identity metrics and calibration on hand-made embeddings with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.evaluation import metrics as M
from models.inference.calibration import Calibration, fit_calibration, reliability


def clustered(patients: int, per: int, dim: int = 16, spread: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(patients, dim))
    emb = np.repeat(centres, per, axis=0) + spread * rng.normal(size=(patients * per, dim))
    labels = [f"p{k}" for k in range(patients) for _ in range(per)]
    return emb, labels


def test_perfect_separation():
    emb, labels = clustered(10, 3)
    m = M.identity_metrics(emb, labels)
    assert m["rank1"] == 1.0 and m["rank5"] == 1.0 and m["mAP"] == pytest.approx(1.0)
    assert m["roc_auc"] == 1.0 and m["eer"] == pytest.approx(0.0) and m["tar_at_far_1e-3"] == 1.0
    assert m["images"] == 30 and m["gallery_size"] == 29 and m["patients"] == 10 and m["queries"] == 30
    assert m["genuine_pairs"] == 10 * 3 and m["impostor_pairs"] == 30 * 29 // 2 - 30
    assert m["pml"]["precision_at_1"] == pytest.approx(1.0)
    assert m["pml"]["mean_average_precision_at_r"] == pytest.approx(1.0)


def test_random_embeddings_near_chance():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(400, 32))
    labels = [f"p{k // 2}" for k in range(400)]          # 200 patients, 2 images each
    m = M.identity_metrics(emb, labels)
    assert abs(m["roc_auc"] - 0.5) < 0.08
    assert m["rank1"] < 0.03                              # chance 1/399
    assert m["mAP"] < 0.05
    assert 0.35 < m["eer"] < 0.65


def test_hand_computed_ranks_and_ap():
    # query 0 (patient a): neighbours by similarity 2 (b), 1 (a), 3 (b) -> first match at rank 2, AP = 1/2
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.9, 0.435889894], [0.0, 1.0]])
    labels = ["a", "a", "b", "b"]
    sim = M.similarity(emb)
    r = M.retrieval(sim, M.encode_labels(labels), max_rank=3)
    q0_rank_first = np.argsort(-np.where(np.arange(4) == 0, -np.inf, sim[0]))
    assert list(q0_rank_first[:3]) == [2, 1, 3]
    assert r["queries"] == 4 and r["gallery_size"] == 3
    assert 0.0 <= r["rank1"] <= 1.0 and r["cmc"][-1] == 1.0
    # every query has exactly one match; AP = 1 / rank of that match
    ranks = []
    for q in range(4):
        s = np.where(np.arange(4) == q, -np.inf, sim[q])
        order = [k for k in np.argsort(-s) if k != q]
        ranks.append(1 + next(i for i, k in enumerate(order) if labels[k] == labels[q]))
    assert r["mAP"] == pytest.approx(np.mean([1 / k for k in ranks]))
    assert r["rank1"] == pytest.approx(np.mean([k == 1 for k in ranks]))


def test_verification_known_values():
    genuine = np.array([0.9, 0.8, 0.7, 0.4])
    impostor = np.array([0.1, 0.2, 0.3, 0.75, 0.5])
    v = M.verification(genuine, impostor)
    # pairs genuine > impostor: 0.9:5, 0.8:5, 0.7:4, 0.4:3 -> 17 of 20
    assert v["roc_auc"] == pytest.approx(17 / 20)
    tar, thr = M.tar_at_far(genuine, impostor, 1e-3)
    assert thr == 0.75 and tar == pytest.approx(0.5)      # no impostor may pass: only 0.9 and 0.8
    assert 0.0 < v["eer"] < 0.5


def test_calibration_monotone_and_sane():
    rng = np.random.default_rng(2)
    genuine = np.clip(rng.normal(0.8, 0.08, 500), -1, 1)
    impostor = np.clip(rng.normal(0.3, 0.12, 5000), -1, 1)
    cal = fit_calibration(genuine, impostor, fitted_on="test")
    s = np.linspace(-1, 1, 201)
    llr = cal.llr(s)
    assert cal.a > 0 and np.all(np.diff(llr) >= 0)
    assert cal.llr(0.9) > 2 and cal.llr(0.2) < -2             # confident at the ends
    mid = cal.threshold_for_llr(0.0)
    assert 0.45 < mid < 0.7                                   # between the two modes
    assert cal.probability(0.9) > 0.9 and cal.probability(0.2) < 0.1
    # a rare prior lowers the posterior
    assert cal.probability(0.6, prior=1e-4) < cal.probability(0.6, prior=0.5)
    rows = reliability(cal, genuine, impostor, bins=5)
    assert all(abs(r["predicted"] - r["observed"]) < 0.25 for r in rows if r["pairs"] > 50)
    # JSON round trip, as stored in card.json
    back = Calibration.from_json(json.loads(json.dumps(cal.to_json())))
    assert back.llr(0.5) == pytest.approx(cal.llr(0.5))


def test_calibration_separable_stays_finite():
    cal = fit_calibration([0.9, 0.95, 0.99], [0.1, 0.2, 0.3, 0.4])
    assert np.isfinite(cal.a) and np.isfinite(cal.b) and cal.a > 0
    assert cal.probability(0.95) > 0.5 > cal.probability(0.1)
    with pytest.raises(ValueError):
        fit_calibration([], [0.1])
