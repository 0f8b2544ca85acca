"""Where a link is decided: evidence in, a probability and a band out (Fellegi-Sunter).

Pure functions over plain data; the engine (`linkage.engine`) gathers the inputs.

    total weight W = image evidence + demographic evidence        (natural logs)
    P(hypothesis)  = sigmoid(W + ln(prior / (1 - prior)))

Image evidence per route is the identity model's calibrated log-likelihood ratio of the
cosine similarity (`models.inference.calibration`; plus the geometric verification bonus of
`models.inference.verification` for the models whose card asks for it), each pair of series clipped to +-max_image_llr,
then the median over the pairs (robust to one odd series). Routes are different images of the
person but not independent evidence (a family shares its anatomy on every route), so they add
with falling weights: the strongest route in full, the next times further_route_factor, the next
times its square, and the sum is bounded to +-max_image_total. A birth date or an age decades
away outweighs that bound (linkage.evidence). A route whose model has no calibration (an
untrained network) contributes nothing, and the evidence says so.

Same person under two IDs: `decide_same`. A study filed under the wrong ID: `decide_misfiled`
for one study, `decide_studies_of_patient` for all of an ID's studies at once; there the other
studies' evidence may add up (`study_set_evidence`, `study_dependence` below 1): a misfiled study
is compared with a random other person, for whom the pair calibration (fitted on random
impostors) holds, whereas two IDs are compared because the index found them alike, so their
pairs keep the median.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from db.records_linkage import LinkDraft, StudyFacts
from linkage.evidence import Demographics, MatchWeights, compare, valid_date

SAME = "same_patient_different_id"
MISFILED = "different_patient_same_id"
WORTH_A_LOOK = "worth-a-look"


@dataclass(frozen=True)
class Thresholds:
    review: float = 0.5
    confident: float = 0.95
    prior_same: float = 1e-3
    prior_misfiled: float = 1e-3
    max_image_llr: float = 12.0
    further_route_factor: float = 0.5
    max_image_total: float = 16.0
    worth_a_look: float = 0.05
    study_dependence: float = 0.1


@dataclass(frozen=True)
class ImagePair:
    """One compared pair of series: a's study, b's study, cosine, calibrated llr (None: uncalibrated),
    and the geometric verification bonus when the model has one (the llr is then of cosine + bonus)."""

    route: str
    a_study_pk: int
    b_study_pk: int
    cosine: float
    llr: float | None
    model: str = ""
    verification: float | None = None


@dataclass
class Decision:
    probability: float
    weight: float
    band: str
    a_study_pk: int
    b_study_pk: int
    evidence: dict = field(default_factory=dict)


def demographics(facts: StudyFacts) -> Demographics:
    return Demographics(facts.name, facts.birth_date, facts.sex, facts.age, facts.study_date, facts.issuer)


def stored_band(decision: Decision, t: Thresholds) -> str:
    """The band a link is stored in: below the review band, "worth-a-look" from t.worth_a_look
    (0: off), a ranked list for weak evidence that is never counted as a flag."""
    if decision.band == "withdrawn" and t.worth_a_look > 0 and decision.probability >= t.worth_a_look:
        return WORTH_A_LOOK
    return decision.band


def band_of(probability: float, t: Thresholds) -> str:
    if probability >= t.confident:
        return "confident"
    return "review" if probability >= t.review else "withdrawn"


def image_evidence(pairs: list[ImagePair], t: Thresholds) -> tuple[float, dict]:
    """The routes' medians of the clipped llrs, combined (`combine_routes`); per-route details.

    Each pair is clipped before the median: with two pairs the median is their mean, and one
    far-off pair (a stray study) must not outweigh the other by more than the clip.
    `unclipped_llr` (the median of the raw llrs) tells apart two studies that both hit the clip."""
    clip = t.max_image_llr
    route_weights, per_route = [], {}
    for route in sorted({p.route for p in pairs}):
        mine = [p for p in pairs if p.route == route]
        llrs = [p.llr for p in mine if p.llr is not None]
        entry = {"pairs": len(mine), "median_cosine": round(statistics.median(p.cosine for p in mine), 4),
                 "model": mine[0].model}
        verified = [p.verification for p in mine if p.verification is not None]
        if verified:
            entry["median_verification"] = round(statistics.median(verified), 4)
            entry["verified_pairs"] = len(verified)
        if llrs:
            llr = statistics.median(max(-clip, min(clip, v)) for v in llrs)
            entry["weight"] = round(llr, 3)
            entry["unclipped_llr"] = round(statistics.median(llrs), 3)
            route_weights.append(llr)
        else:
            entry["weight"] = 0.0
            entry["note"] = "model has no calibration: image similarity not used"
        per_route[route] = entry
    return combine_routes(route_weights, t), per_route


def effective_studies(count: int, dependence: float) -> float:
    """How many independent comparisons `count` comparisons with one person's studies are worth when
    any two of them correlate by `dependence` (the design effect of equicorrelated evidence):
    count / (1 + (count - 1) * dependence). 1 at dependence 1, count at 0."""
    return count / (1 + (count - 1) * dependence) if count else 0.0


def study_set_evidence(pairs: list[ImagePair], t: Thresholds) -> tuple[float, dict]:
    """A study against all of an ID's other studies: per route, each other study's median clipped
    llr (over its series), their mean times `effective_studies` (Thresholds.study_dependence), so
    that several studies that all say "someone else" weigh more than one; combined as
    `image_evidence` combines routes. At dependence 1 this is `image_evidence` (node.toml ships 0.1)."""
    weight, per_route = image_evidence(pairs, t)
    if t.study_dependence >= 1:
        return weight, per_route
    clip = t.max_image_llr
    route_weights = []
    for route, entry in per_route.items():
        by_study: dict[int, list[float]] = {}
        for p in pairs:
            if p.route == route and p.llr is not None:
                by_study.setdefault(p.b_study_pk, []).append(max(-clip, min(clip, p.llr)))
        if not by_study:
            continue
        per_study = [statistics.median(v) for v in by_study.values()]
        factor = effective_studies(len(per_study), t.study_dependence)
        weight = statistics.fmean(per_study) * factor
        entry.update(weight=round(weight, 3), studies=len(per_study), effective_studies=round(factor, 3))
        route_weights.append(weight)
    return combine_routes(route_weights, t), per_route


def combine_routes(weights: list[float], t: Thresholds) -> float:
    """Routes by falling |weight|, the k-th (from 0) times further_route_factor ** k; the sum
    bounded to +-max_image_total."""
    ordered = sorted(weights, key=abs, reverse=True)
    total = sum(w * t.further_route_factor ** k for k, w in enumerate(ordered))
    return max(-t.max_image_total, min(t.max_image_total, total))


def decide_same(a_studies: list[StudyFacts], b_studies: list[StudyFacts], pairs: list[ImagePair],
                weights: MatchWeights, t: Thresholds) -> Decision:
    """Are Patient IDs a and b one person? `pairs`: image comparisons across the two IDs."""
    image_weight, image = image_evidence(pairs, t)
    best_llr: dict[tuple[int, int], float] = {}
    for p in pairs:
        key = (p.a_study_pk, p.b_study_pk)
        best_llr[key] = max(best_llr.get(key, -math.inf), p.llr or 0.0)
    scored: dict[tuple, tuple[float, dict]] = {}      # studies of one ID mostly repeat their demographics
    best = None
    for a in a_studies:
        for b in b_studies:
            da, db = demographics(a), demographics(b)
            key = (da, db)
            if valid_date(da.birth_date) and valid_date(db.birth_date):     # then age plays no part
                key = (da.name, da.birth_date, da.sex, da.issuer, db.name, db.sex, db.issuer)
            if key not in scored:
                scored[key] = weights.score(compare(da, db, "same"), "same")
            demo_weight, fields = scored[key]
            rank = demo_weight + best_llr.get((a.study_pk, b.study_pk), 0.0)
            if best is None or rank > best[0]:
                best = (rank, demo_weight, fields, a.study_pk, b.study_pk)
    _, demo_weight, fields, a_pk, b_pk = best
    total = image_weight + demo_weight
    probability = posterior(total, t.prior_same)
    evidence = {"hypothesis": "same person", "fields": fields, "image": image,
                "image_weight": round(image_weight, 3), "demographic_weight": round(demo_weight, 3),
                "prior": t.prior_same, "studies_compared": [len(a_studies), len(b_studies)]}
    return Decision(probability, total, band_of(probability, t), a_pk, b_pk, evidence)


def decide_misfiled(suspect: StudyFacts, others: list[StudyFacts], pairs: list[ImagePair],
                    weights: MatchWeights, t: Thresholds) -> Decision | None:
    """Is `suspect` another person's study filed under its Patient ID? `others`: that ID's other
    studies; `pairs`: the suspect's series against theirs (a = suspect). None without others."""
    if not others:
        return None
    image_weight, image = study_set_evidence(pairs, t)
    scored = []
    for other in others:
        w, fields = weights.score(compare(demographics(other), demographics(suspect), "belongs"), "belongs")
        scored.append((w, fields, other.study_pk))
    scored.sort(key=lambda item: item[0])
    demo_weight, fields, _ = scored[len(scored) // 2]           # the median comparison
    belongs = image_weight + demo_weight
    probability = posterior(-belongs, t.prior_misfiled)
    reference = max(pairs, key=lambda p: p.cosine).b_study_pk if pairs else scored[-1][2]
    evidence = {"hypothesis": "study belongs to its patient", "fields": fields, "image": image,
                "image_weight": round(image_weight, 3), "demographic_weight": round(demo_weight, 3),
                "prior": t.prior_misfiled, "studies_compared": len(others),
                "image_studies_compared": len({p.b_study_pk for p in pairs})}
    return Decision(probability, -belongs, band_of(probability, t), suspect.study_pk, reference, evidence)


def decide_studies_of_patient(facts: dict[int, StudyFacts], pairs: list[ImagePair], weights: MatchWeights,
                              t: Thresholds) -> dict[int, Decision]:
    """different_patient_same_id for every study of one Patient ID. `pairs`: image comparisons
    between its studies' series (both orders).

    Each study is judged against the ID's other studies. A stray must not make its owner's own
    studies look foreign (with two owner studies and one stray, each owner study's median is
    half the stray's), so the likeliest stray is left out and the rest judged again, while the
    studies left out stay a minority of the ID (on a tie, the later study is the stray, as in
    `_one_of_two`). Then, of two studies that only disagree with each other, one is flagged."""
    by_suspect: dict[int, list[ImagePair]] = {}
    for p in pairs:
        by_suspect.setdefault(p.a_study_pk, []).append(p)
    max_left_out = (len(facts) - 1) // 2
    left_out: list[int] = []
    final: dict[int, Decision] = {}
    while True:
        kept = [pk for pk in facts if pk not in left_out]
        decisions = {}
        for pk in kept:
            others = [facts[o] for o in kept if o != pk]
            mine = [p for p in by_suspect.get(pk, []) if p.b_study_pk not in left_out]
            decision = decide_misfiled(facts[pk], others, mine, weights, t)
            if decision is not None:
                if left_out:       # study UIDs: what an archivist can look up
                    decision.evidence["left_out_studies"] = [facts[o].study_uid for o in left_out]
                decisions[pk] = decision
        # Only a study that disagrees with two or more others can be left out: of two that
        # only disagree with each other, neither is likelier than the other.
        strays = [pk for pk, d in decisions.items()
                  if d.band != "withdrawn" and d.evidence.get("image_studies_compared", 0) >= 2]
        if not strays or len(left_out) == max_left_out:
            break
        stray = max(strays, key=lambda pk: (_unclipped_weight(decisions[pk]), *_recency(facts[pk])))
        final[stray] = decisions.pop(stray)
        left_out.append(stray)
    final.update(decisions)
    beside_a_stray = {p.b_study_pk for stray in left_out for p in by_suspect.get(stray, [])}
    _one_of_two(final, facts, beside_a_stray)
    return final


def _unclipped_weight(decision: Decision) -> float:
    """A misfiled decision's weight against the study with its image llrs unclipped: which of
    two studies that both hit the clip is further from the rest."""
    image = decision.evidence["image"]
    unclipped = sum(entry.get("unclipped_llr", entry["weight"]) for entry in image.values())
    return -(unclipped + decision.evidence["demographic_weight"])


def _recency(study: StudyFacts) -> tuple[str, int]:
    """Later studies sort last: of two equally likely strays, the later one is taken."""
    return study.study_date or "", study.study_pk


def _one_of_two(decisions: dict[int, Decision], facts: dict[int, StudyFacts], beside_a_stray: set[int]) -> None:
    """Two studies whose images only disagree with each other: flag one, not both.

    With two images of a Patient ID that do not match, either could be the stray. The one
    with more evidence against it (its demographics disagree too) is flagged; on a tie the
    later one, the usual stray (the earlier was filed before the mistake). Not where a stray
    left out had been compared with them (`beside_a_stray`): three images of three persons,
    so at most one of the two is the owner's, and both are flagged."""
    flagged = {pk: d for pk, d in decisions.items() if d.band != "withdrawn"}
    for pk, d in list(flagged.items()):
        other = d.b_study_pk
        mutual = flagged.get(other)
        if (mutual is None or mutual.b_study_pk != pk or d.evidence.get("image_studies_compared") != 1
                or mutual.evidence.get("image_studies_compared") != 1 or pk in beside_a_stray):
            continue
        if abs(d.weight - mutual.weight) >= 0.5:
            keep = pk if d.weight > mutual.weight else other
        else:
            keep = max((pk, other), key=lambda s: _recency(facts[s]))
        drop = other if keep == pk else pk
        e = decisions[drop]
        decisions[drop] = Decision(e.probability, e.weight, "withdrawn", e.a_study_pk, e.b_study_pk,
                                   dict(e.evidence, note="two disagreeing studies: the other one is flagged"))
        flagged.pop(drop, None)


def same_key(a_patient_pk: int, b_patient_pk: int) -> str:
    lo, hi = sorted((a_patient_pk, b_patient_pk))
    return f"same:{lo}:{hi}"


def misfiled_key(study_pk: int) -> str:
    return f"misfiled:{study_pk}"


def to_draft(kind: str, key: str, decision: Decision, a_patient_pk: int, b_patient_pk: int) -> LinkDraft:
    evidence = dict(decision.evidence, total_weight=round(decision.weight, 3),
                    probability=round(decision.probability, 6))
    return LinkDraft(key, kind, decision.a_study_pk, decision.b_study_pk, a_patient_pk, b_patient_pk,
                     decision.probability, decision.weight, decision.band, evidence)


def posterior(weight: float, prior: float) -> float:
    """P(hypothesis) from the total weight (natural log) and the prior: sigmoid(W + logit(prior))."""
    logit = weight + math.log(prior / (1 - prior))
    return 0.5 * (1.0 + math.tanh(0.5 * logit))
