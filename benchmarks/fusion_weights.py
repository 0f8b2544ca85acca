#!/usr/bin/env python3
"""Choose the weight of a fused model (models.fusion) on labelled selection manifests.

    .venv/bin/python benchmarks/fusion_weights.py --route dermoscopy \\
        --member models/weights/dermoscopy --member /tmp/train/runs/derm-w2 \\
        --manifest /tmp/train/man/derm-ham-select.csv --manifest /tmp/train/man/derm-select302.csv \\
        --manifest /tmp/train/man/derm-select303-twins.csv --weights 0 0.3 0.4 0.5 0.6 0.7 1

Embeds every manifest once with each of the two members (each at its own card's input size and
test-time views, as `evaluate` does, the embedding alone, no image check), then scores all-vs-all
retrieval for every weight w of the second member: cosine = (1 - w) x first + w x second, which is what
`dicom-node fuse --weight 1-w --weight w` computes. Prints Rank-1 / mAP / AUC per manifest and the mean
mAP over the manifests; the rule used in docs/accuracy.md is the best mean mAP. Only patients the member
cards did not train on are scored (models.evaluate.scored_rows), the same for both members.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def member_embeddings(route: str, folder: Path, manifest: Path) -> tuple[np.ndarray, list[str]]:
    """(embeddings, labels) of `manifest` by the model in `folder` (any folder name: a registry of one is made)."""
    import torch

    from models.evaluate import manifest_embeddings
    with tempfile.TemporaryDirectory() as registry:
        (Path(registry) / route).symlink_to(Path(folder).resolve(), target_is_directory=True)
        _, ex, emb, _, _ = manifest_embeddings(route, manifest, Path(registry), torch.device("cpu"))
    return np.asarray(emb, dtype=np.float64), list(ex.labels)


def main(argv: list[str] | None = None) -> int:
    from models import metrics as M
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--route", required=True)
    parser.add_argument("--member", type=Path, action="append", required=True, help="two weights folders")
    parser.add_argument("--manifest", type=Path, action="append", required=True)
    parser.add_argument("--weights", type=float, nargs="+", default=[0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if len(args.member) != 2:
        parser.error("give exactly two --member folders")
    import torch
    torch.set_num_threads(args.threads)
    sims = {}
    for manifest in args.manifest:
        (a, labels), (b, labels_b) = (member_embeddings(args.route, m, manifest) for m in args.member)
        if labels != labels_b:
            parser.error(f"{manifest}: the members score different patients (their cards' validation patients "
                         "differ); use a manifest neither trained on")
        a, b = M.normalize(a), M.normalize(b)
        sims[manifest.name] = (a @ a.T, b @ b.T, labels)
    print(f"{args.route}: w = weight of {args.member[1]} (0: {args.member[0]} alone)")
    for w in args.weights:
        cells, maps = [], []
        for name, (sa, sb, labels) in sims.items():
            m = M.identity_metrics(None, labels, with_pml=False, sim=(1 - w) * sa + w * sb)
            maps.append(m["mAP"])
            cells.append(f"{name} {m['rank1']:.3f}/{m['mAP']:.3f}/{m['roc_auc']:.3f}")
        print(f"w {w:.2f}  mean mAP {np.mean(maps):.4f}  " + "  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
