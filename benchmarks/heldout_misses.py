#!/usr/bin/env python3
"""Rank-1 misses of an identity model on a held-out synthetic cohort, and whether the wrong
nearest neighbour is a sibling of the query (the generator's hard negatives, truth.json).

    .venv/bin/python benchmarks/heldout_misses.py --route dermoscopy \
        --manifest /tmp/train/man/derm-heldout300.csv --cohort /tmp/train/derm300

Manifest labels are `seed<S>-<person_id>` (models.synth_manifest). Then every pair of relatives
in the cohort, ranked by how close the generator drew their anatomy (`anatomy_distance`), with
the ranks of the missed pairs, and how many missed pairs share their sex.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.evaluate import manifest_embeddings  # noqa: E402


def family(persons: dict[str, dict], p: dict) -> str:
    """The person_id at the root of p's family (siblings of siblings share it, synth.persons.person_draw)."""
    while p["sibling_of"]:
        p = persons[p["sibling_of"]]
    return p["person_id"]


def anatomy_distance(a: dict, b: dict) -> float:
    """How far apart the generator drew two relatives' anatomy: the RMS difference of their standard normals.

    A sibling's normals are sqrt(1 - w^2) * family root + w * own (w, the sibling weight, 0.25-0.45;
    the root has w = 0; synth.common.Draw), so two members differ by sqrt((s_a - s_b)^2 + w_a^2 + w_b^2)
    with s = sqrt(1 - w^2); two unrelated persons by sqrt(2).
    """
    wa, wb = (p["sibling_weight"] if p["sibling_of"] else 0.0 for p in (a, b))
    sa, sb = math.sqrt(1 - wa * wa), math.sqrt(1 - wb * wb)
    return math.sqrt((sa - sb) ** 2 + wa * wa + wb * wb)


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

    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    queries = misses = to_sibling = 0
    missed_pairs: set[frozenset] = set()
    for i, label in enumerate(labels):
        if (labels == label).sum() < 2:
            continue
        queries += 1
        j = int(np.argmax(sims[i]))
        if labels[j] != label:
            misses += 1
            a, b = person(label), person(labels[j])
            sib = family(persons, a) == family(persons, b)
            to_sibling += sib
            distance = f"  anatomy distance {anatomy_distance(a, b):.3f}" if sib else ""
            print(f"miss {label} -> {labels[j]}  sibling {sib}  twins {a['twin'] or b['twin']}  cosine {sims[i, j]:.3f}"
                  f"{distance}")
            missed_pairs.add(frozenset((a["person_id"], b["person_id"])))
    with_sibling = sum(1 for p in persons.values() if p["sibling_of"])
    # are the misses the cohort's closest relatives? every pair within a family, closest first
    members: dict[str, list[dict]] = {}
    for p in persons.values():
        members.setdefault(family(persons, p), []).append(p)
    pairs = sorted((anatomy_distance(a, b), frozenset((a["person_id"], b["person_id"])))
                   for group in members.values() for k, a in enumerate(group) for b in group[k + 1:])
    ranks = [k + 1 for k, (_, pair) in enumerate(pairs) if pair in missed_pairs]
    print(f"{len(pairs)} pairs of relatives; the closest: " + ", ".join(f"{d:.3f}" for d, _ in pairs[:8])
          + f"; the pairs with a Rank-1 miss between them rank {ranks} by closeness")

    def same_sex(pair: frozenset) -> bool:
        # the 3D generators scale body and head with sex: a same-sex pair differs only in finer features
        return len({persons[q]["sex"] for q in pair}) == 1

    missed_relatives = [pair for _, pair in pairs if pair in missed_pairs]
    print(f"same sex: {sum(map(same_sex, missed_relatives))} of the {len(missed_relatives)} missed pairs of "
          f"relatives, {sum(same_sex(pair) for _, pair in pairs)} of all {len(pairs)}")
    print(f"{args.route} ({model.version}): {queries} queries, {misses} Rank-1 misses, {to_sibling} of them to a sibling; "
          f"{with_sibling} of {len(persons)} persons are a sibling of another")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
