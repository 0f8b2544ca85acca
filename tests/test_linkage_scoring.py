"""linkage.scoring on a hand-made truth: which links count as right, which errors as found, and
what a wrong link reports (the benchmarks print it so that false links can be examined)."""

from __future__ import annotations

from linkage.scoring import MISFILED, SAME, format_report, score


def _study(uid, person, pid):
    return {"study_uid": uid, "person_id": person, "patient_id": pid, "issuer": "H"}


TRUTH = {
    "studies": [_study("1", "anna", "A1"), _study("2", "anna", "A1"), _study("3", "anna", "A2"),
                _study("4", "ben", "B1"), _study("5", "ben", "B1"), _study("6", "carl", "B1"),
                _study("7", "dora", "D1"), _study("8", "dora", "D1")],
    "errors": [{"error_id": "e1", "kind": SAME, "variant": "new-id", "patient_id": "A2", "issuer": "H",
                "person_id": "anna"},
               {"error_id": "e2", "kind": MISFILED, "variant": "wrong-patient", "study_uids": ["6"]}],
}


def _side(uid, pid):
    return {"study_uid": uid, "patient_id": pid, "issuer": "H"}


def test_right_and_wrong_links_are_told_apart():
    links = [
        {"kind": SAME, "a": _side("3", "A2"), "b": _side("1", "A1"), "probability": 0.97},
        {"kind": SAME, "a": _side("7", "D1"), "b": _side("4", "B1"), "probability": 0.91},    # two people
        {"kind": MISFILED, "a": _side("5", "B1"), "b": _side("4", "B1"), "probability": 0.88},  # ben's own
    ]
    result = score(links, TRUTH)
    assert (result["errors"], result["found"], result["links"], result["correct_links"]) == (2, 1, 3, 1)
    assert result["missed"] == [{"error_id": "e2", "kind": MISFILED, "variant": "wrong-patient"}]
    wrong = result["false_links"]
    assert [(f["kind"], f["truth"], f["persons"], f["probability"]) for f in wrong] == [
        (SAME, "none", ["dora", "ben"], 0.91), (MISFILED, "none", ["ben", "ben"], 0.88)]
    report = format_report(result)
    assert "false same_patient_different_id link (none): D1 ~ B1, persons dora / ben" in report

    links.append({"kind": MISFILED, "a": _side("6", "B1"), "b": _side("4", "B1"), "probability": 0.9})
    result = score(links, TRUTH)
    assert (result["found"], result["correct_links"], len(result["false_links"])) == (2, 2, 2)
    assert result["recall"] == 1.0 and result["by_kind"][MISFILED]["precision"] == 0.5
