"""Score the node's links against a synthetic cohort's truth.json (tests, benchmarks, docs).

A same_patient_different_id link is right when its two Patient IDs hold studies of one
person (by the majority person of each ID); a different_patient_same_id link is right
when its suspect study is not of its ID's majority person. An injected error counts as
found when a link of its kind covers it: for `same`, a link joining its new ID to another
ID of that person; for `misfiled`, a link whose suspect study is one of its studies.

    python -m linkage.scoring links.json truth.json
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict

SAME = "same_patient_different_id"
MISFILED = "different_patient_same_id"


def score(links: list[dict], truth: dict) -> dict:
    person_of_study = {s["study_uid"]: s["person_id"] for s in truth["studies"]}
    studies_of_id = defaultdict(list)
    for s in truth["studies"]:
        studies_of_id[(s["patient_id"], s["issuer"])].append(s["person_id"])
    owner = {key: Counter(people).most_common(1)[0][0] for key, people in studies_of_id.items()}

    def true_kind(link: dict) -> str:
        a, b = link["a"], link["b"]
        if link["kind"] == SAME or (a["patient_id"], a["issuer"]) != (b["patient_id"], b["issuer"]):
            same = owner.get((a["patient_id"], a["issuer"])) == owner.get((b["patient_id"], b["issuer"]))
            return SAME if same else "none"
        suspect = person_of_study.get(a["study_uid"])
        return MISFILED if suspect != owner.get((a["patient_id"], a["issuer"])) else "none"

    truths = [true_kind(link) for link in links]
    confusion = Counter((link["kind"], truth) for link, truth in zip(links, truths))
    correct = sum(n for (predicted, actual), n in confusion.items() if predicted == actual)

    found = []
    for error in truth["errors"]:
        if error["kind"] == SAME:
            new = (error["patient_id"], error["issuer"])
            person = error["person_id"]
            hit = any(link["kind"] == SAME and new in _ids(link) and
                      all(owner.get(key) == person for key in _ids(link)) for link in links)
        else:
            uids = set(error["study_uids"])
            hit = any(link["kind"] == MISFILED and link["a"]["study_uid"] in uids for link in links)
        found.append((error["error_id"], error["kind"], error.get("variant"), hit))

    by_kind = {}
    for kind in (SAME, MISFILED):
        mine = [f for f in found if f[1] == kind]
        predicted = [link for link in links if link["kind"] == kind]
        right = confusion[(kind, kind)]
        by_kind[kind] = {"errors": len(mine), "found": sum(f[3] for f in mine), "links": len(predicted),
                         "correct_links": right,
                         "recall": sum(f[3] for f in mine) / len(mine) if mine else None,
                         "precision": right / len(predicted) if predicted else None}
    errors = len(found)
    return {
        "errors": errors, "found": sum(f[3] for f in found),
        "recall": sum(f[3] for f in found) / errors if errors else None,
        "links": len(links), "correct_links": correct,
        "precision": correct / len(links) if links else None,
        "by_kind": by_kind,
        "missed": [{"error_id": e, "kind": k, "variant": v} for e, k, v, hit in found if not hit],
        "confusion": {f"{p} -> {a}": n for (p, a), n in sorted(confusion.items())},
        # what a reviewer would look at to see why a wrong link was made
        "false_links": [{"kind": link["kind"], "truth": truth, "probability": link.get("probability"),
                         "persons": [person_of_study.get(link[side]["study_uid"]) for side in ("a", "b")],
                         "a": link["a"], "b": link["b"], "evidence": link.get("evidence")}
                        for link, truth in zip(links, truths) if truth != link["kind"]],
    }


def format_report(result: dict) -> str:
    lines = [f"injected errors {result['errors']}, found {result['found']} (recall {_pct(result['recall'])}); "
             f"links {result['links']}, correct {result['correct_links']} (precision {_pct(result['precision'])})"]
    for kind, r in result["by_kind"].items():
        lines.append(f"  {kind:<26} errors {r['errors']:>3} found {r['found']:>3}  links {r['links']:>3} "
                     f"correct {r['correct_links']:>3}")
    lines.append("confusion of link kinds (flagged -> truth):")
    lines += [f"  {pair:<60} {n}" for pair, n in result["confusion"].items()] or ["  (no links)"]
    for f in result.get("false_links", []):
        lines.append(f"false {f['kind']} link ({f['truth']}): {f['a']['patient_id']} ~ {f['b']['patient_id']}, "
                     f"persons {' / '.join(map(str, f['persons']))}, probability {f['probability']}")
    if result["missed"]:
        lines.append("missed: " + ", ".join(f"{m['error_id']} {m['variant']}" for m in result["missed"]))
    return "\n".join(lines)


def _ids(link: dict) -> set[tuple[str, str]]:
    return {(link["a"]["patient_id"], link["a"]["issuer"]), (link["b"]["patient_id"], link["b"]["issuer"])}


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    links_path, truth_path = sys.argv[1:3]
    with open(links_path) as fh:
        found_links = json.load(fh)
    with open(truth_path) as fh:
        print(format_report(score(found_links, json.load(fh))))
