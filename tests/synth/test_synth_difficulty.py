"""Identity is not readable from raw pixels at default settings, yet it is stable anatomy."""
from __future__ import annotations

import numpy as np

from synth import ct, cxr, derm, fundus, mr
from synth.baseline import evaluate
from synth.persons import make_persons, person_draw

MODS = {"cxr", "ct", "mr", "fundus", "derm"}


def test_naive_pixel_baseline_is_weak_at_default_settings(default_cohort):
    res = evaluate(default_cohort)
    assert set(res) == MODS
    for mod, r in res.items():
        assert r["persons"] == 16
        assert r["rank1"] < 0.5, (mod, r)


def test_same_person_same_anatomy_without_visit_nuisance(still_cohort):
    res = evaluate(still_cohort)
    assert set(res) == MODS
    for mod, r in res.items():
        assert r["rank1"] >= 0.9, (mod, r)


def _features(module, d, person) -> dict:
    """Numeric anatomy features by path (lists of varying length are compared per path)."""
    out = {}

    def walk(path, v):
        if isinstance(v, (bool, str)) or v is None:
            return
        if isinstance(v, (int, float, np.floating, np.integer)):
            out[path] = np.array([float(v)])
        elif isinstance(v, np.ndarray):
            out[path] = np.asarray(v, float).ravel()[:4000]
        elif isinstance(v, dict):
            for k in sorted(v):
                walk(f"{path}/{k}", v[k])
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{path}/{i}", x)

    walk("", {k: v for k, v in module.person_features(d, person).items() if k != "tree_seed"})
    return out


def _distance(a: dict, b: dict) -> float:
    keys = [k for k in a if k in b and a[k].shape == b[k].shape]
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) / max(1e-9, np.mean(a[k] ** 2) + np.mean(b[k] ** 2))
                             for k in keys) / len(keys)))


def test_siblings_are_hard_negatives():
    persons = make_persons(5, 40, 3, 0.5)
    by_id = {p.person_id: p for p in persons}

    def root(p):
        while p.sibling_of:
            p = by_id[p.sibling_of]
        return p

    sibs = [p for p in persons if p.sibling_of and p.sex == root(p).sex]
    assert len(sibs) >= 5
    for module, name in ((cxr, "cxr"), (ct, "ct"), (mr, "mr"), (fundus, "fundus"), (derm, "derm")):
        closer = 0
        for s in sibs:
            r = root(s)
            others = [p for p in persons if p.sibling_of is None and p is not r and p.sex == s.sex][:3]
            fs, fr = (_features(module, person_draw(5, persons, p, name), p) for p in (s, r))
            d_sib = _distance(fs, fr)
            d_other = min(_distance(fs, _features(module, person_draw(5, persons, o, name), o)) for o in others)
            closer += d_sib < d_other
        assert closer >= 0.9 * len(sibs), (name, closer, len(sibs))


def test_learncheck_runs_and_reports_both_scores(small_cohort):
    from synth.learncheck import run
    res = run(small_cohort, modality="derm", size=32, epochs=1, train_fraction=0.5, log=None)
    assert res["train_persons"] == 4 and res["test_persons"] == 4 and res["test_units"] == 8
    assert 0.0 <= res["rank1_network"] <= 1.0 and 0.0 <= res["rank1_raw_pixels"] <= 1.0
