#!/usr/bin/env python3
"""Does batch-norm adaptation (`dicom-node adapt`, models/adaptation.py) help on a manifest?

    .venv/bin/python benchmarks/adaptation.py --route chest_xr --manifest ../shared/data/cxr-adult-figures/manifest.csv

Scores all-vs-all retrieval (Rank-1, mAP, verification ROC AUC; the functions of `evaluate`)
of the registry model (`--weights-dir`) before and after adapting its batch-norm statistics,
under two protocols:

* **transductive**: adapted on every image of the manifest, scored on all of them. This is
  what a site gets when it adapts on its own archive and links the same studies; no label
  is read by the adaptation;
* **disjoint halves**: the patients are split in two at random (`--splits` times); the model
  adapted on one half's images is scored on the other half, and compared with the unadapted
  model on that same half (a smaller gallery, so both columns are higher than on the whole
  set: compare across a row, not with the transductive row). Also scored there, both models'
  embeddings "centred": minus the mean embedding of the other half (label-free, like the
  adaptation; not something the node does).

When the model was trained on the manifest only the card's validation patients are used
(as `evaluate` does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--route", required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--weights-dir", type=Path, default=Path("models/weights"))
    ap.add_argument("--splits", type=int, default=5, help="random halvings of the patients (default 5)")
    ap.add_argument("--keep-base", type=float, default=0.0,
                    help="weight of the base model's statistics in the adapted ones (default 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    from models import metrics as M
    from models.adaptation import adapt_batchnorm
    from models.db_data import embed_examples, load_manifest_examples
    from models.evaluate import scored_rows
    from models.networks import load_identity_model
    from models.transforms import route_geometry
    torch.set_num_threads(args.threads)
    model = load_identity_model(args.route, args.weights_dir, torch.device("cpu"))
    rows, note = scored_rows(model.card, args.manifest)
    ex = load_manifest_examples(rows, args.route, route_geometry(args.route, model.card.get("input")))

    def embedded(net) -> np.ndarray:
        return embed_examples(net, ex, torch.device("cpu"), views=model.views)

    def score(vectors: np.ndarray, keep: np.ndarray, centre_on: np.ndarray | None = None) -> dict:
        v = vectors[keep] - (vectors[centre_on].mean(0) if centre_on is not None else 0)
        r = M.identity_metrics(v / np.linalg.norm(v, axis=1, keepdims=True), [ex.labels[i] for i in keep],
                               with_pml=False)
        return {k: r[k] for k in ("rank1", "mAP", "roc_auc", "gallery_size")}

    def fmt(r: dict) -> str:
        return f"{r['rank1']:.3f} / {r['mAP']:.3f} / {r['roc_auc']:.3f}"

    def adapted(images) -> torch.nn.Module:
        return adapt_batchnorm(model.net, images, model.views, keep_base=args.keep_base)

    patients = sorted(set(ex.labels))
    print(f"{model.name} {model.version} on {args.manifest}: {len(ex.labels)} examples, {len(patients)} patients "
          f"({note}); cells Rank-1 / mAP / AUC")
    everything, plain = np.arange(len(ex.labels)), embedded(model.net)
    out = {"model": f"{model.name} {model.version}", "manifest": str(args.manifest), "selection": note,
           "keep_base": args.keep_base,
           "transductive": {"plain": score(plain, everything),
                            "adapted": score(embedded(adapted(ex.images)), everything)},
           "halves": []}
    t = out["transductive"]
    print(f"transductive (gallery {t['plain']['gallery_size']}): plain {fmt(t['plain'])}  adapted {fmt(t['adapted'])}")
    kinds = ("plain", "adapted", "plain, centred", "adapted, centred")
    for split in range(args.splits):
        order = list(np.random.default_rng(split).permutation(patients))
        for half in (set(order[::2]), set(order[1::2])):
            scored = np.array([i for i, p in enumerate(ex.labels) if p in half])
            other = np.array([i for i, p in enumerate(ex.labels) if p not in half])
            tuned = embedded(adapted(ex.images[np.isin(ex.owner, other)]))
            row = {"split": split, "plain": score(plain, scored), "adapted": score(tuned, scored),
                   "plain, centred": score(plain, scored, other), "adapted, centred": score(tuned, scored, other)}
            out["halves"].append(row)
            print(f"split {split}, {len(half)} patients (gallery {row['plain']['gallery_size']}): "
                  f"plain {fmt(row['plain'])}  adapted on the other half {fmt(row['adapted'])}", flush=True)
    for kind in kinds:
        out[f"halves_mean_{kind}"] = {k: float(np.mean([h[kind][k] for h in out["halves"]]))
                                      for k in ("rank1", "mAP", "roc_auc")}
    print(f"disjoint halves, mean of {len(out['halves'])}: " +
          "  ".join(f"{kind} {fmt(out[f'halves_mean_{kind}'])}" for kind in kinds))
    print("(centred: the embeddings minus the mean embedding of the other half's images, no label read)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
