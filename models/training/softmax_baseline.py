"""The papers' closed-set baseline: a softmax classifier over known patients.

    .venv/bin/python -m models.training.softmax_baseline --manifest ../shared/data/cxr-adult-figures/manifest.csv \
        --size 128 --epochs 40 --threads 1 [--init models/weights/chest_xr] --json OUT.json

Each patient's last image (manifest order) is the test image, the others train a
ResNet (the route's identity backbone, optionally initialized from a trained identity model)
with a linear layer over the patients and cross-entropy. Reported: top-1/top-5 accuracy on
the test images, next to nearest-neighbour retrieval of the same test images against the
same training images with the pixel-cosine baseline and with the identity model's embeddings.

Why it is no identity model: its output is a distribution over the patients it was trained
on. A new patient (every patient the node meets for the first time) is forced onto one of the
known classes, and adding a patient means retraining. Re-identification across a growing
archive needs an embedding compared by similarity (what `dicom-node train` learns).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def split(labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    last = {lab: i for i, lab in enumerate(labels)}
    test = np.array(sorted(last.values()))
    train = np.array([i for i in range(len(labels)) if i not in set(test)])
    return train, test


def nn_accuracy(train_emb, train_y, test_emb, test_y) -> dict:
    sims = test_emb @ train_emb.T
    order = np.argsort(-sims, axis=1)
    ranked = [list(dict.fromkeys(train_y[o])) for o in order]
    return {"top1": float(np.mean([r[0] == y for r, y in zip(ranked, test_y)])),
            "top5": float(np.mean([y in r[:5] for r, y in zip(ranked, test_y)]))}


def main(argv: list[str] | None = None) -> int:
    from models.datasets.examples import (Examples, as_float, embed_examples, load_manifest_examples,
                                          pixel_embeddings, read_manifest)
    from models.inference.networks import DEFAULT_SPECS, EmbeddingNet, load_identity_model, seeded
    from models.training.augment import augmentations

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--route", default="chest_xr")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init", type=Path, default=None, help="identity weights folder (model.pt + card.json)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()

    rows = read_manifest(args.manifest)
    labels = [r[1] for r in rows]
    images = load_manifest_examples(rows, args.route, {"size": args.size}).images   # one picture per row
    tr, te = split(labels)
    classes = sorted(set(labels))
    y = np.array([classes.index(lab) for lab in labels])

    if args.init:
        model = load_identity_model(args.route, args.init.parent, torch.device("cpu"))
        if model.card.get("input", {}).get("size") != args.size:
            raise SystemExit(f"--size must be the init model's input size {model.card.get('input')}")
        net = model.net
    else:
        net = seeded(lambda: EmbeddingNet(DEFAULT_SPECS[args.route]), args.seed)
    result = {"manifest": str(args.manifest), "patients": len(classes), "train_images": int(len(tr)),
              "test_images": int(len(te)), "size": args.size, "init": str(args.init or "random")}
    px = pixel_embeddings(Examples.single(images, labels))           # L2-normalized
    result["pixel_cosine_nn"] = nn_accuracy(px[tr], y[tr], px[te], y[te])
    if args.init:
        emb = embed_examples(net, Examples.single(images, labels), torch.device("cpu"))
        result["identity_model_nn"] = nn_accuracy(emb[tr], y[tr], emb[te], y[te])

    head = torch.nn.Linear(net.out_dim, len(classes))
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    for epoch in range(args.epochs):
        aug = augmentations(args.route, {"size": args.size}, args.seed * 1000 + epoch)
        net.train()
        order = rng.permutation(tr)
        for k in range(0, len(order), args.batch_size):
            idx = order[k:k + args.batch_size]
            x = torch.stack([torch.as_tensor(aug(img)).clamp(0, 1) for img in as_float(images[idx])])
            logits = head(net.raw(x))            # the un-normalized embedding layer feeds the classifier
            loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.inference_mode():
        logits = torch.cat([head(net.raw(as_float(images[te[k:k + 64]]))) for k in range(0, len(te), 64)])
    top5 = logits.topk(5, dim=1).indices.numpy()
    result["softmax"] = {"top1": float(np.mean(top5[:, 0] == y[te])),
                         "top5": float(np.mean([y[i] in t for i, t in zip(te, top5)])),
                         "epochs": args.epochs, "final_train_loss": float(loss)}
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
