"""benchmarks/heldout_misses.py: how close the generator drew two relatives, checked against the generator."""

from __future__ import annotations

import math

import numpy as np

from dicom_node.synth.persons import make_persons, person_draw
from tests.helpers import load_benchmark


def test_anatomy_distance_is_the_rms_difference_of_the_generators_draws_for_two_relatives():
    misses = load_benchmark("heldout_misses")
    persons = make_persons(5, 400, 1, 0.5)
    by_id = {p.person_id: vars(p) for p in persons}
    checked = {"parent": 0, "co-siblings": 0, "unrelated": 0}
    for p in persons[1:]:
        a = persons[0] if not p.sibling_of else next(q for q in persons if q.person_id == p.sibling_of)
        kind = "unrelated" if not p.sibling_of else ("parent" if a.sibling_of is None else "co-siblings")
        if kind == "co-siblings":     # a sibling of a sibling: compared with its direct relative, not the root
            assert misses.family(by_id, vars(p)) == misses.family(by_id, vars(a)) != a.person_id
        if checked[kind] >= 3:
            continue
        checked[kind] += 1
        draws = [person_draw(5, persons, q, "ct").std(20000) for q in (p, a)]
        rms = float(np.sqrt(np.mean((draws[0] - draws[1]) ** 2)))
        expected = misses.anatomy_distance(vars(p), vars(a)) if kind != "unrelated" else math.sqrt(2)
        assert abs(rms - expected) < 0.03, (kind, rms, expected)
    assert checked["parent"] == 3 and checked["co-siblings"] >= 1 and checked["unrelated"] == 3
