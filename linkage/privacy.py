"""How re-identifiable is a de-identified export? The decisions of `dicom-node privacy-audit`, over
plain data (`linkage.privacy_input.ExportSeries`, arrays), as the node itself would decide.

Linkability within the export (`linkability`): two pseudonyms are one person, for the node, when
the image evidence between their series (the model card's calibration of the cosine, each pair
clipped, the median over the pairs: `linkage.decide.image_evidence`) gives a posterior, at the
node's prior of a candidate pair (`[linkage] prior_same_person`), in the review or the confident
band (`review_probability`, `confident_probability`). Only the route's own evidence counts, so the
figures are per route; the demographics an export may still carry are the header check's part.
The cosine is the score: for a card whose calibration is of cosine + geometric verification bonus
(chest_xr, dermoscopy), the card's cosine calibration is used, as linkage does for a pair it does
not check; checking the pairs' images would make the attack stronger, not weaker.

Every pair of pseudonyms is decided exactly, but only those that can reach the review band are
looked at: the median of a pair's clipped llrs is at most their maximum, so a pair whose best
series pair is below the band's weight is below the band.

Re-identification against the archive (`reidentification`): each exported series against the
stored embeddings of the same model, patients ranked by their nearest stored series (what
`evaluate` ranks); a stored series with cosine >= SAME_IMAGE is the exported image itself (the
same pixels are in the archive): counted apart, since anyone holding the archive re-identifies
it by a lookup, and left out of the ranking, which measures linking the person's other images.
With the key: Rank-1 and CMC over the exported series whose person has other stored series, and
the TAR at FAR 1e-3 of the attack (genuine = the person's best score, impostor = every other
stored patient's), as models.evaluation.metrics computes them. The rank and the impostor scores
need every archive patient's score, so all stored series of the model are scored exactly (a matrix
product per block of exported series), not the candidate index's top k (linkage.search).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from linkage import decide as D
from models.evaluation import metrics as M
from models.inference.calibration import Calibration

SAME_IMAGE = 0.9999
BLOCK_SCORES = 50_000_000      # scores held at once (float32: 200 MB): rows of a block = this / columns
LISTED = 200


def _block(columns: int) -> int:
    return int(min(1024, max(1, BLOCK_SCORES // max(columns, 1))))


def band_weight(probability: float, prior: float) -> float:
    """The image weight (nats) from which a pair's posterior reaches `probability`."""
    return math.log(probability / (1 - probability)) - math.log(prior / (1 - prior))


def pair_decision(route: str, cosines, calibration: Calibration, t: D.Thresholds) -> tuple[float, str, float]:
    """(probability, band, weight) of 'one person' from the cosines of two sides' series pairs."""
    pairs = [D.ImagePair(route, 0, 0, float(c), calibration.llr(float(c))) for c in np.ravel(cosines)]
    weight, _ = D.image_evidence(pairs, t)
    probability = D.posterior(weight, t.prior_same)
    return probability, D.band_of(probability, t), weight


def _unit(series) -> np.ndarray:
    v = np.stack([s.vector for s in series]).astype(np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def linkability(series: list, calibration: Calibration | None, t: D.Thresholds,
                key: dict[str, str] | None = None) -> dict:
    """Pairs of pseudonyms of one route that the node links as one person, per band; with a key,
    how many are right, how many true pairs there are, and the retrieval metrics of the export."""
    route = series[0].model_key[0]
    v = _unit(series)
    names = [s.pseudonym for s in series]
    codes = M.encode_labels(names)
    n = len(series)
    nearest = np.full(n, -np.inf)
    nearest_other = np.full(n, -1)
    candidates: set[tuple[int, int]] = set()
    threshold = None
    if calibration is not None and calibration.a > 0:
        # float32 cosines: a hair below the band's cosine, so that no pair at the band's edge is missed
        threshold = calibration.threshold_for_llr(min(band_weight(t.review, t.prior_same), t.max_image_llr)) - 1e-5
    block = _block(n)
    for start in range(0, n, block):
        s = v[start:start + block] @ v.T
        s[codes[start:start + block, None] == codes[None, :]] = -np.inf       # same pseudonym: not a link
        best = np.argmax(s, axis=1) if n > 1 else np.zeros(len(s), int)
        nearest[start:start + len(s)] = s[np.arange(len(s)), best]
        nearest_other[start:start + len(s)] = best
        if threshold is not None:
            for i, j in zip(*np.nonzero(s >= threshold)):
                a, b = codes[start + i], codes[j]
                candidates.add((min(a, b), max(a, b)))
    by_code = defaultdict(list)
    for i, c in enumerate(codes):
        by_code[c].append(i)
    label_of = {c: names[idx[0]] for c, idx in by_code.items()}
    linked = []
    for a, b in sorted(candidates):
        cos = v[by_code[a]] @ v[by_code[b]].T
        probability, band, weight = pair_decision(route, cos, calibration, t)
        if band == "withdrawn":
            continue
        pa, pb = sorted((label_of[a], label_of[b]))
        entry = {"a": pa, "b": pb, "probability": round(probability, 6), "band": band,
                 "weight": round(weight, 3), "best_cosine": round(float(cos.max()), 4), "series_pairs": int(cos.size)}
        if key is not None:
            entry["right"] = pa in key and pb in key and key[pa] == key[pb]
        linked.append(entry)
    linked.sort(key=lambda e: -e["probability"])
    pseudonyms = len(by_code)
    out = {"route": route, "model": list(series[0].model_key[1:]), "series": n, "pseudonyms": pseudonyms,
           "pseudonym_pairs": pseudonyms * (pseudonyms - 1) // 2, "calibrated": calibration is not None,
           "bands": {band: _count(linked, band, key) for band in ("review", "confident")},
           "linked": linked[:LISTED], "linked_listed": min(len(linked), LISTED), "linked_total": len(linked),
           "nearest_cosine": [round(float(x), 5) for x in nearest if np.isfinite(x)]}
    if calibration is not None:
        top = [i for i in np.argsort(-nearest, kind="stable")[:LISTED] if np.isfinite(nearest[i])]
        out["at_risk"] = [{"label": series[i].label, "pseudonym": names[i], "nearest": names[nearest_other[i]],
                           "cosine": round(float(nearest[i]), 4),
                           "probability": round(pair_decision(route, [nearest[i]], calibration, t)[0], 6)}
                          for i in top]
        out["thresholds"] = {"review_cosine": _cosine_at(t.review, calibration, t),
                             "confident_cosine": _cosine_at(t.confident, calibration, t)}
    if key is not None:
        out["key"] = _key_truth(names, key)
        labels = [key.get(p, f"?{p}") for p in names]
        if n > 1:
            out["metrics"] = M.identity_metrics(v, labels, with_pml=False, curves=True)
    return out


def _count(linked: list[dict], band: str, key) -> dict:
    """Pairs in `band` or above (review counts the confident ones too), and right/wrong with a key."""
    at = [e for e in linked if band == "review" or e["band"] == band]
    out = {"pairs": len(at)}
    if key is not None:
        out["right"] = sum(e["right"] for e in at)
        out["wrong"] = len(at) - out["right"]
    return out


def _cosine_at(probability: float, calibration: Calibration, t: D.Thresholds) -> float | None:
    weight = band_weight(probability, t.prior_same)
    if weight > min(t.max_image_llr, t.max_image_total) or calibration.a <= 0:
        return None                              # the band cannot be reached on this route's images alone
    return round(calibration.threshold_for_llr(weight), 4)


def _key_truth(names: list[str], key: dict[str, str]) -> dict:
    pseudonyms = sorted(set(names))
    per_person = defaultdict(int)
    for p in pseudonyms:
        if p in key:
            per_person[key[p]] += 1
    return {"pseudonyms_in_key": sum(p in key for p in pseudonyms), "persons": len(per_person),
            "true_pairs": sum(k * (k - 1) // 2 for k in per_person.values())}


def reidentification(series: list, gallery: np.ndarray, patients: list[tuple[str, str]],
                     calibration: Calibration | None, t: D.Thresholds, key: dict[str, str] | None = None,
                     top: int = 5) -> dict:
    """Each exported series against the archive's stored series of its model: nearest patients with
    the node's probability, copies of the image in the archive, and with a key the attack's Rank-1,
    CMC and TAR at FAR 1e-3. Archive patients appear only as index numbers (no Patient ID)."""
    route = series[0].model_key[0]
    q = _unit(series)
    codes = M.encode_labels([f"{i}|{p}" for i, p in patients])
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(codes.max() + 1))
    ids_of_code = {int(codes[i]): patients[i] for i in range(len(patients))}
    members = defaultdict(list)
    for i, c in enumerate(codes):
        members[int(c)].append(i)
    per_series, genuine, impostor, ranks, copies = [], [], [], [], 0
    block = _block(len(gallery))
    for start in range(0, len(q), block):
        s = q[start:start + block] @ gallery.T
        same = s >= SAME_IMAGE
        s = np.where(same, -np.inf, s)
        best = np.maximum.reduceat(s[:, order], starts, axis=1)              # (queries, patients)
        for r in range(len(s)):
            item = series[start + r]
            row = best[r]
            copy = bool(same[r].any())
            copies += copy
            entry = {"label": item.label, "pseudonym": item.pseudonym, "copy_in_archive": copy, "candidates": []}
            for c in np.argsort(-row, kind="stable")[:top]:
                if not np.isfinite(row[c]):
                    break
                candidate = {"archive_patient": int(c) + 1, "best_cosine": round(float(row[c]), 4)}
                if calibration is not None:
                    cos = s[r, members[int(c)]]
                    probability, band, _ = pair_decision(route, cos[np.isfinite(cos)], calibration, t)
                    candidate.update(probability=round(probability, 6), band=band)
                entry["candidates"].append(candidate)
            if key is not None and item.pseudonym in key:
                true = [c for c, (_, pid) in ids_of_code.items() if pid == key[item.pseudonym] and np.isfinite(row[c])]
                if true:
                    g = float(max(row[c] for c in true))
                    others = np.delete(row, true)
                    others = others[np.isfinite(others)]
                    genuine.append(g)
                    impostor.append(others)
                    ranks.append(1 + int(np.sum(others > g)))
                    entry["rank_of_person"] = ranks[-1]
            per_series.append(entry)
    out = {"route": route, "model": list(series[0].model_key[1:]), "series": len(series),
           "archive_series": int(len(gallery)), "archive_patients": int(len(starts)), "copies_in_archive": copies,
           "calibrated": calibration is not None, "per_series": per_series,
           "bands": {band: sum(1 for e in per_series if e["candidates"] and e["candidates"][0].get("band") in
                               (("review", "confident") if band == "review" else ("confident",)))
                     for band in ("review", "confident")}}
    if key is not None:
        out["attack"] = attack_metrics(np.asarray(ranks), np.asarray(genuine), impostor, int(len(starts)))
    return out


def attack_metrics(ranks: np.ndarray, genuine: np.ndarray, impostor: list[np.ndarray], patients: int,
                   max_rank: int = 20) -> dict:
    """Rank-1, Rank-5, CMC and the verification figures (metrics.verification) of the key-scored attack."""
    if len(ranks) == 0:
        return {"queries": 0, "note": "no exported series has its person among the archive's other series"}
    cmc = [float(np.mean(ranks <= k)) for k in range(1, max_rank + 1)]
    imp = np.concatenate(impostor) if impostor else np.empty(0)
    out = {"queries": int(len(ranks)), "gallery_size": patients, "patients": patients, "rank1": cmc[0],
           "rank5": cmc[min(4, max_rank - 1)], "cmc": cmc, **M.verification(genuine, imp)}
    far, tar, _ = M.roc_curve(genuine, imp)
    out["_curves"] = {"far": far, "tar": tar, "genuine": genuine, "impostor": imp}
    return out
