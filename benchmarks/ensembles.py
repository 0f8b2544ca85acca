#!/usr/bin/env python3
"""Would an ensemble of training snapshots retrieve better? (an experiment for docs/accuracy.md)

    git show 114f517:models/weights/chest_ct/model.pt > /tmp/train/hist/ct7/chest_ct/model.pt   # and card.json
    .venv/bin/python benchmarks/ensembles.py --route chest_ct --manifest /tmp/train/man/ct-select303-twins.csv \
        --weights-dir models/weights --weights-dir /tmp/train/hist/ct7

Embeds the manifest with each weights folder's model of the route (its card's input geometry
and test-time views, as `evaluate` does), then scores all-vs-all retrieval for each model
alone and for every combination of two or more, whose similarity is the mean of the members'
cosines (the same as the cosine of their concatenated embeddings divided by sqrt(k)).
Embeddings are cached as in benchmarks/whitening.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reranking import scores  # noqa: E402  (benchmarks is a folder of scripts, not a package)
from whitening import cached_embeddings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--route", required=True)
    ap.add_argument("--manifest", type=Path, action="append", required=True)
    ap.add_argument("--weights-dir", type=Path, action="append", required=True, help="two or more registry folders")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/whitening-cache"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if len(args.weights_dir) < 2:
        ap.error("give --weights-dir at least twice")
    out = {}
    for manifest in args.manifest:
        embedded = [cached_embeddings(args.route, manifest, w, args.cache) for w in args.weights_dir]
        codes = embedded[0][1]
        rows = {}
        for k in range(1, len(embedded) + 1):
            for combo in itertools.combinations(range(len(embedded)), k):
                sim = sum(embedded[i][0] @ embedded[i][0].T for i in combo) / k
                rows[" + ".join(str(args.weights_dir[i]) for i in combo)] = scores(sim, codes)
        print(f"\n{manifest}: {len(codes)} examples")
        print(f"{'models':60s} {'Rank-1':>7s} {'Rank-5':>7s} {'mAP':>7s} {'AUC':>7s}")
        for name, r in rows.items():
            print(f"{name:60s} {r['rank1']:7.3f} {r['rank5']:7.3f} {r['mAP']:7.3f} {r['roc_auc']:7.3f}")
        out[str(manifest)] = rows
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
