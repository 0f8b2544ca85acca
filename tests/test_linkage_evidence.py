"""Field comparisons, Fellegi-Sunter weights, decisions and m/u re-estimation (no database)."""

from __future__ import annotations

import math

import pytest

from db.records_linkage import StudyFacts
from linkage import decide as D
from linkage.evidence import (
    DEFAULT_MU,
    Demographics,
    MatchWeights,
    compare,
    compare_age,
    compare_birth_date,
    compare_name,
    compare_sex,
    normalize_name,
    reestimate,
)


def facts(pk, patient_pk=1, name="DOE^JANE", birth="19800315", sex="F", age="040Y", date="20200401", issuer="SITE-A"):
    return StudyFacts(pk, f"1.2.{pk}", patient_pk, f"P{patient_pk}", issuer, date, name, birth, sex, age)


@pytest.mark.parametrize("a,b,level", [
    ("DOE^JANE", "Doe^Jane", "exact"),
    ("DOE^JANE", "JANE^DOE", "exact"),                 # order swapped
    ("MÜLLER^JÜRGEN", "MULLER^JURGEN", "exact"),       # diacritics
    ("DOE^JANE", "DOE^JAEN", "close"),                 # transposition typo
    ("DOE^JANE^MARIE", "DOE^JANE", "exact"),           # middle name missing on one side
    ("DOE^JANE^MARIE", "DOE^JANE^MARY", "close"),
    ("DOE^JANE", "DOE^PETER", "partial"),              # family only (twins, spouses)
    ("DOE^JANE", "SMITH^PETER", "different"),
    ("JANE^DOE", "DOE^PETER", "partial"),              # family only, one name order swapped
    ("DOE^JANE", "SMITH^JANE", "different"),           # given name alone
    ("DOE^JANE", "", "missing"),
    (None, "DOE^JANE", "missing"),
])
def test_compare_name(a, b, level):
    assert compare_name(a, b) == level


def test_normalize_name_drops_ideographic_groups_and_punctuation():
    assert normalize_name("O'NEIL^MARY-ANN=オニール") == "O NEIL MARY ANN"


@pytest.mark.parametrize("a,b,level", [
    ("19800315", "19800315", "exact"),
    ("19800503", "19800305", "swapped"),
    ("19800315", "19800316", "near"),
    ("19800315", "19810315", "near"),
    ("19800315", "19761122", "different"),
    ("19800315", "19651122", "far"),                   # 15 years: two persons
    ("19800315", "", "missing"),
    ("19800315", "1980", "missing"),
    ("19801399", "19800315", "missing"),              # not a date
])
def test_compare_birth_date(a, b, level):
    assert compare_birth_date(a, b) == level


def test_compare_sex_and_age():
    assert compare_sex("M", "m") == "same"
    assert compare_sex("M", "F") == "different"
    assert compare_sex("O", "F") == "missing"
    born = Demographics("X", "19800315", "F", None, "20000101")
    assert compare_age(born, Demographics("X", None, "F", "040Y", "20200401")) == "consistent"
    assert compare_age(born, Demographics("X", None, "F", "039Y", "20200301")) == "consistent"
    assert compare_age(born, Demographics("X", None, "F", "034Y", "20200401")) == "inconsistent"
    assert compare_age(born, Demographics("X", None, "F", "025Y", "20200401")) == "impossible"
    assert compare_age(born, Demographics("X", None, "F", None, "20200401")) == "missing"


def test_age_is_not_counted_twice_when_birth_dates_agree():
    a = Demographics("DOE^JANE", "19800315", "F", "040Y", "20200401", "A")
    assert compare(a, a, "same")["age"] == "missing"
    b = Demographics("DOE^JANE", "", "F", "040Y", "20200401", "B")
    levels = compare(a, b, "same")
    assert levels["age"] == "consistent" and levels["issuer"] == "different"


def test_default_tables_are_distributions():
    for hypothesis, fields in DEFAULT_MU.items():
        for name, levels in fields.items():
            assert math.isclose(sum(m for m, _ in levels.values()), 1.0, abs_tol=1e-6), (hypothesis, name)
            assert math.isclose(sum(u for _, u in levels.values()), 1.0, abs_tol=1e-6), (hypothesis, name)


def test_weights_sign_and_missing():
    w = MatchWeights()
    assert w.weight("same", "name", "exact") > 5
    assert w.weight("same", "name", "different") < -2
    assert w.weight("same", "birth_date", "missing") == 0.0
    # under "belongs", agreement is weak (wrong worklist picks copy demographics), disagreement strong
    assert 0 < w.weight("belongs", "name", "exact") < 0.5
    assert w.weight("belongs", "name", "different") < -2


def test_overrides_replace_one_level():
    w = MatchWeights({("same.name", "exact"): (0.5, 0.5), ("bogus.name", "exact"): (0.1, 0.9)})
    assert w.weight("same", "name", "exact") == 0.0
    assert w.weight("same", "name", "close") == MatchWeights().weight("same", "name", "close")


T = D.Thresholds(review=0.5, confident=0.95, prior_same=1e-3, prior_misfiled=1e-3, max_image_llr=12)


def test_same_person_by_demographics_alone():
    a = [facts(1, 1, issuer="SITE-A")]
    b = [facts(2, 2, name="DOE^JAEN", issuer="SITE-B")]
    d = D.decide_same(a, b, [], MatchWeights(), T)
    assert d.band in ("review", "confident") and d.probability > 0.9
    assert d.evidence["fields"]["name"]["level"] == "close"


def test_strangers_sharing_a_birth_date_are_not_flagged():
    d = D.decide_same([facts(1, 1)], [facts(2, 2, name="SMITH^PETER", sex="M")], [], MatchWeights(), T)
    assert d.band == "withdrawn" and d.probability < 0.01


def test_twins_shared_birth_date_weighs_less_when_only_the_family_name_agrees():
    w = MatchWeights()
    _, twins = w.score(compare(Demographics("DOE^ANNA", "19800315", "F", None, None),
                               Demographics("DOE^HANNAH", "19800315", "F", None, None), "same"), "same")
    _, typo = w.score(compare(Demographics("DOE^ANNA", "19800315", "F", None, None),
                              Demographics("DOE^ANAN", "19800315", "F", None, None), "same"), "same")
    assert twins["name"]["level"] == "partial" and twins["birth_date"]["level"] == "exact"
    assert twins["birth_date"]["weight"] > 0                       # still some evidence, just less
    assert typo["birth_date"]["weight"] - twins["birth_date"]["weight"] > 2.5
    assert "twins" in twins["birth_date"]["note"] and "note" not in typo["birth_date"]


def test_image_evidence_decides_twins():
    twin_a, twin_b = [facts(1, 1, name="DOE^ANNA")], [facts(2, 2, name="DOE^HANNAH")]
    plain = D.decide_same(twin_a, twin_b, [], MatchWeights(), T)
    unlike = D.decide_same(twin_a, twin_b, [D.ImagePair("chest_xr", 1, 2, 0.1, -8.0)], MatchWeights(), T)
    alike = D.decide_same(twin_a, twin_b, [D.ImagePair("chest_xr", 1, 2, 0.9, 8.0)], MatchWeights(), T)
    assert unlike.probability < plain.probability < alike.probability
    assert unlike.band == "withdrawn" and alike.band == "confident"


def test_image_llr_is_clipped_and_uncalibrated_routes_say_so():
    pairs = [D.ImagePair("chest_xr", 1, 2, 0.99, 50.0), D.ImagePair("fundus", 1, 2, 0.5, None)]
    total, per_route = D.image_evidence(pairs, T)
    assert total == 12
    assert per_route["fundus"]["weight"] == 0.0 and "calibration" in per_route["fundus"]["note"]


def test_median_resists_one_odd_series():
    pairs = [D.ImagePair("chest_ct", 1, 2, 0.9, 9.0), D.ImagePair("chest_ct", 1, 3, 0.9, 8.0),
             D.ImagePair("chest_ct", 1, 4, 0.1, -12.0)]
    assert D.image_evidence(pairs, T)[0] == 8.0


def test_misfiled_by_image_with_copied_demographics():
    suspect = facts(9)
    others = [facts(1), facts(2, date="20210101")]
    pairs = [D.ImagePair("chest_xr", 9, 1, 0.05, -11.0), D.ImagePair("chest_xr", 9, 2, 0.1, -10.0)]
    d = D.decide_misfiled(suspect, others, pairs, MatchWeights(), T)
    assert d.probability > 0.95 and d.a_study_pk == 9 and d.b_study_pk == 2
    fitting = D.decide_misfiled(suspect, others, [D.ImagePair("chest_xr", 9, 1, 0.9, 9.0)], MatchWeights(), T)
    assert fitting.band == "withdrawn"


def test_misfiled_by_demographics_when_the_wrong_id_was_typed():
    suspect = facts(9, name="SMITH^PETER", birth="19551201", sex="M", age="064Y")
    d = D.decide_misfiled(suspect, [facts(1), facts(2)], [], MatchWeights(), T)
    assert d.band in ("review", "confident")
    assert D.decide_misfiled(suspect, [], [], MatchWeights(), T) is None


def _pairs_between(llrs: dict[tuple[int, int], float]) -> list[D.ImagePair]:
    """Both orders of each compared pair of studies, as the engine passes them."""
    return [D.ImagePair("fundus", a, b, llr / 30, llr) for (x, y), llr in llrs.items() for a, b in ((x, y), (y, x))]


def test_a_stray_does_not_get_its_owners_studies_flagged():
    # two studies of the owner that agree only weakly, and a stray far from both
    studies = {1: facts(1, date="20190101"), 2: facts(2, date="20200101"), 9: facts(9, date="20210101")}
    pairs = _pairs_between({(1, 2): -4.0, (1, 9): -30.0, (2, 9): -25.0})
    # judged each against both others, the owner's studies sink below the line with the stray
    alone = D.decide_misfiled(studies[1], [studies[2], studies[9]], [p for p in pairs if p.a_study_pk == 1],
                              MatchWeights(), T)
    assert alone.band != "withdrawn"
    decisions = D.decide_studies_of_patient(studies, pairs, MatchWeights(), T)
    assert {pk for pk, d in decisions.items() if d.band != "withdrawn"} == {9}
    assert decisions[1].evidence["left_out_studies"] == ["1.2.9"] == decisions[2].evidence["left_out_studies"]
    assert decisions[9].evidence["image"]["fundus"]["unclipped_llr"] == -27.5


def test_the_likeliest_stray_is_chosen_beyond_the_clip():
    # 1 and 9 both hit the bound; 9 is further from the others, so 9 is left out, and 1 then fits
    studies = {pk: facts(pk, date=f"20{10 + pk}0101") for pk in (1, 2, 3, 9)}
    pairs = _pairs_between({(1, 2): -13.0, (1, 3): -13.0, (2, 3): 9.0, (1, 9): -40.0, (2, 9): -40.0,
                            (3, 9): -40.0})
    first = {pk: D.decide_misfiled(studies[pk], [f for o, f in studies.items() if o != pk],
                                   [p for p in pairs if p.a_study_pk == pk], MatchWeights(), T) for pk in studies}
    # both at the bound of one comparison's image evidence (clipped pairs, added over the studies)
    assert first[1].evidence["image_weight"] == first[9].evidence["image_weight"] == -T.max_image_total
    decisions = D.decide_studies_of_patient(studies, pairs, MatchWeights(), T)
    assert decisions[9].band != "withdrawn" and "left_out_studies" not in decisions[9].evidence
    assert decisions[1].evidence["left_out_studies"] == ["1.2.9"]


def test_strays_stay_a_minority_and_two_disagreeing_studies_give_one_flag():
    two = {1: facts(1, date="20190101"), 2: facts(2, date="20200101")}
    decisions = D.decide_studies_of_patient(two, _pairs_between({(1, 2): -20.0}), MatchWeights(), T)
    assert [pk for pk, d in decisions.items() if d.band != "withdrawn"] == [2]     # the later one
    assert "the other one is flagged" in decisions[1].evidence["note"]
    assert all("left_out_studies" not in d.evidence for d in decisions.values())
    # four studies of two persons, two each: one study at most is left out (strays are a
    # minority), the later pair is taken for the strays
    four = {1: facts(1, date="20130101"), 2: facts(2, date="20140101"), 3: facts(3, date="20110101"),
            4: facts(4, date="20120101")}
    llrs = {(1, 2): 9.0, (3, 4): 9.0, (1, 3): -20.0, (1, 4): -20.0, (2, 3): -20.0, (2, 4): -20.0}
    decisions = D.decide_studies_of_patient(four, _pairs_between(llrs), MatchWeights(), T)
    assert {pk for pk, d in decisions.items() if d.band != "withdrawn"} == {1, 2}
    assert decisions[1].evidence["left_out_studies"] == ["1.2.2"] == decisions[3].evidence["left_out_studies"]


def test_three_persons_in_one_id_are_all_flagged():
    # the owner's fundus photograph and two strays, all unlike each other, in an ID with four
    # chest CTs of its owner: after the likeliest stray is left out, the two left still
    # disagree, and one of them must be a stray too
    studies = {1: facts(1, date="20150101"), 2: facts(2, date="20130101"), 9: facts(9, date="20140101")}
    studies |= {pk: facts(pk, date=f"20{pk}0101") for pk in (13, 14, 15, 16)}
    ct = [D.ImagePair("chest_ct", a, b, 0.9, 9.0) for a in (13, 14, 15, 16) for b in (13, 14, 15, 16) if a != b]
    pairs = _pairs_between({(1, 2): -20.0, (1, 9): -20.0, (2, 9): -30.0}) + ct
    decisions = D.decide_studies_of_patient(studies, pairs, MatchWeights(), T)
    assert {pk for pk, d in decisions.items() if d.band != "withdrawn"} == {1, 2, 9}
    assert "left_out_studies" not in decisions[9].evidence and "note" not in decisions[1].evidence
    # the two left are judged on their images, each against the other (neither is left out)
    assert decisions[1].evidence["image_studies_compared"] == decisions[2].evidence["image_studies_compared"] == 1


def test_a_stray_of_another_route_does_not_stop_one_of_two():
    # a chest CT stray is left out; the ID's two fundus photographs disagree with each other
    # only, so one of them is flagged (the later), as in an ID without the CT stray
    studies = {pk: facts(pk, date=f"20{pk}0101") for pk in (11, 12, 13, 14, 15, 16, 17)}
    llrs = {(a, b): 9.0 for a in (11, 12, 13, 14) for b in (11, 12, 13, 14) if a < b}
    llrs |= {(a, 15): -30.0 for a in (11, 12, 13, 14)}
    pairs = [D.ImagePair("chest_ct", p.a_study_pk, p.b_study_pk, p.cosine, p.llr) for p in _pairs_between(llrs)]
    pairs += _pairs_between({(16, 17): -20.0})
    decisions = D.decide_studies_of_patient(studies, pairs, MatchWeights(), T)
    assert {pk for pk, d in decisions.items() if d.band != "withdrawn"} == {15, 17}
    assert "the other one is flagged" in decisions[16].evidence["note"]


def test_each_pair_is_clipped_before_the_median():
    pairs = [D.ImagePair("chest_ct", 1, 2, 0.9, 8.0), D.ImagePair("chest_ct", 1, 3, 0.0, -40.0)]
    total, per_route = D.image_evidence(pairs, T)
    assert total == -2.0 and per_route["chest_ct"]["unclipped_llr"] == -16.0


def test_reestimate_moves_towards_reviews():
    confirmed = {"fields": {"name": {"level": "partial"}}}
    decided = [("same_patient_different_id", "confirmed", confirmed)] * 10
    rows = reestimate(decided)
    m, u, n_m, n_u = rows[("same.name", "partial")]
    assert n_m == 10 and n_u == 0
    assert m > DEFAULT_MU["same"]["name"]["partial"][0]
    w = MatchWeights({k: v[:2] for k, v in rows.items()})
    assert w.weight("same", "name", "partial") > MatchWeights().weight("same", "name", "partial")
    # a rejected misfiled flag says the study did belong: the m side of "belongs"
    rows = reestimate([("different_patient_same_id", "rejected", {"fields": {"name": {"level": "different"}}})])
    assert rows[("belongs.name", "different")][2] == 1
    assert reestimate([]) == {}


def test_a_study_unlike_several_of_its_ids_studies_adds_up_their_evidence():
    """Four studies of the owner; the suspect is unlike each at -4 nats. The median says -4, one
    comparison's worth, below the flag; with the comparisons correlated at 0.5 they count as
    4 / 2.5 = 1.6 and at 0.2 as 2.5 of them. The owner's own studies stay put either way."""
    import dataclasses
    studies = {pk: facts(pk, date=f"20{10 + pk}0101") for pk in (1, 2, 3, 4, 9)}
    llrs = {(a, b): 6.0 for a in (1, 2, 3, 4) for b in (1, 2, 3, 4) if a < b}
    llrs |= {(a, 9): -4.0 for a in (1, 2, 3, 4)}
    pairs = _pairs_between(llrs)
    mine = [p for p in pairs if p.a_study_pk == 9]
    others = [studies[pk] for pk in (1, 2, 3, 4)]
    median = D.decide_misfiled(studies[9], others, mine, MatchWeights(), dataclasses.replace(T, study_dependence=1.0))
    assert median.evidence["image_weight"] == -4.0 and median.band == "withdrawn"
    for dependence, factor in ((0.5, 1.6), (0.2, 2.5)):
        t = dataclasses.replace(T, study_dependence=dependence)
        d = D.decide_misfiled(studies[9], others, mine, MatchWeights(), t)
        assert d.evidence["image_weight"] == pytest.approx(-4.0 * factor)
        assert d.evidence["image"]["fundus"]["effective_studies"] == pytest.approx(factor)
        assert d.probability > median.probability
        flagged = {pk for pk, x in D.decide_studies_of_patient(studies, pairs, MatchWeights(), t).items()
                   if x.band != "withdrawn"}
        assert flagged <= {9}
    assert D.effective_studies(1, 0.3) == 1 and D.effective_studies(5, 1.0) == 1 and D.effective_studies(5, 0.0) == 5
    strong = D.decide_misfiled(studies[9], others, mine, MatchWeights(), dataclasses.replace(T, study_dependence=0.2))
    assert strong.band != "withdrawn"
