"""Injected Patient ID errors for a real labelled image set (``dicom-node convert --second-ids/--misfiled``).

A real set (manifest rows: image, patient_id, offset_days, sex, age, ...) has one ID per person.
This turns it into a stream with the two errors the node looks for, on disjoint persons:

* second ID (``same_patient_different_id``): a person's later studies (one study per row) are
  registered under a new, unrelated Patient ID, with the person's own sex and age;
* misfiled study (``different_patient_same_id``): one study of a person is filed under another
  patient's ID with that patient's sex and age, as a wrong worklist pick copies them.

Names and birth dates are blank, as in a de-identified feed; only the images can tell.
``person_id`` keeps the truth for `linkage.scoring`; ``error_id`` / ``error_kind`` mark the rows
of each error. Same seed, same errors.
"""

from __future__ import annotations

import random
from collections import defaultdict

SAME = "same_patient_different_id"
MISFILED = "different_patient_same_id"


class InjectError(ValueError):
    """The set cannot hold the errors asked for."""


def inject_errors(rows: list[dict], second_ids: int, misfiled: int, seed: int,
                  patients: set[str] | None = None) -> list[dict]:
    """Rows (copies) with new patient_id where an error moved them, and person_id, error_id, error_kind."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        if row.get("duplicate_of") or (patients is not None and row["patient_id"] not in patients):
            continue
        out.append({**row, "person_id": row["patient_id"], "patient_name": "", "birth_date": "",
                    "error_id": "", "error_kind": ""})
    by_patient: dict[str, list[dict]] = defaultdict(list)
    for row in out:
        by_patient[row["patient_id"]].append(row)
    for studies in by_patient.values():
        studies.sort(key=lambda r: (_offset(r), r["image"]))
    eligible = sorted(p for p, studies in by_patient.items() if len(studies) >= 2)
    needed = second_ids + 2 * misfiled
    if len(eligible) < needed:
        raise InjectError(f"{second_ids} second IDs and {misfiled} misfiled studies need {needed} patients with two "
                          f"or more images; the set has {len(eligible)}")
    rng.shuffle(eligible)
    used_ids = set(by_patient)
    n = 0
    for person in eligible[:second_ids]:
        n += 1
        studies = by_patient[person]
        new_id = _new_id(rng, used_ids)
        for row in studies[rng.randint(1, len(studies) - 1):]:
            row.update(patient_id=new_id, error_id=f"E{n:04d}", error_kind=SAME)
    sources = eligible[second_ids:second_ids + misfiled]
    targets = eligible[second_ids + misfiled:needed]
    for source, target in zip(sources, targets):
        n += 1
        row = rng.choice(by_patient[source])
        owner = by_patient[target][0]
        row.update(patient_id=target, sex=owner.get("sex", ""), age=_age_at(owner, _offset(row)),
                   error_id=f"E{n:04d}", error_kind=MISFILED)
    return out


def _offset(row: dict) -> float:
    try:
        return float(row.get("offset_days") or 0)
    except ValueError:
        return 0.0


def _age_at(owner: dict, offset: float) -> str:
    """The owner's age moved to the misfiled study's date (blank where the owner has none)."""
    try:
        return str(int(float(owner["age"]) + (offset - _offset(owner)) / 365.25))
    except (KeyError, TypeError, ValueError):
        return ""


def _new_id(rng: random.Random, used: set[str]) -> str:
    while True:
        candidate = f"R{rng.randrange(10 ** 7):07d}"
        if candidate not in used:
            used.add(candidate)
            return candidate
