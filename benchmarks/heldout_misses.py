#!/usr/bin/env python3
"""Rank-1 misses of an identity model on a held-out synthetic cohort, and whether the wrong
nearest neighbour is a sibling of the query (the generator's hard negatives, truth.json).

    .venv/bin/python benchmarks/heldout_misses.py --route dermoscopy \
        --manifest /tmp/train/man/derm-heldout300.csv --cohort /tmp/train/derm300

Manifest labels are `seed<S>-<person_id>` (models.synth_manifest).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.evaluate import manifest_embeddings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--route", required=True)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--cohort", type=Path, required=True, help="the cohort folder holding truth.json")
    p.add_argument("--weights-dir", type=Path, default=REPO / "models" / "weights")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, ex, emb, _, _ = manifest_embeddings(args.route, args.manifest, args.weights_dir, torch.device("cpu"),
                                               all_patients=True)
    labels = np.array(ex.labels)
    persons = {p["person_id"]: p for p in json.loads((args.cohort / "truth.json").read_text())["persons"]}

    def person(label: str) -> dict:
        return persons[label.split("-", 1)[1]]

    def siblings(a: dict, b: dict) -> bool:
        return bool(a["sibling_of"] == b["person_id"] or b["sibling_of"] == a["person_id"]
                    or (a["sibling_of"] and a["sibling_of"] == b["sibling_of"]))

    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    queries = misses = to_sibling = 0
    for i, label in enumerate(labels):
        if (labels == label).sum() < 2:
            continue
        queries += 1
        j = int(np.argmax(sims[i]))
        if labels[j] != label:
            misses += 1
            a, b = person(label), person(labels[j])
            sib = siblings(a, b)
            to_sibling += sib
            print(f"miss {label} -> {labels[j]}  sibling {sib}  twins {a['twin'] or b['twin']}  cosine {sims[i, j]:.3f}")
    with_sibling = sum(1 for p in persons.values() if p["sibling_of"])
    print(f"{args.route} ({model.version}): {queries} queries, {misses} Rank-1 misses, {to_sibling} of them to a sibling; "
          f"{with_sibling} of {len(persons)} persons are a sibling of another")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
