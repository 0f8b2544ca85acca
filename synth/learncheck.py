"""Learnability check: a small CNN trained on some synthetic persons, tested on held-out ones.

Not the project's identity network — a quick CPU sanity check that identity in a cohort is
learnable from anatomy although raw pixels do not reveal it.  Units are loaded as in
:mod:`synth.baseline` (middle slice of 3D series, each fundus eye, luminance),
resized to ``--size``², z-scored.  The first ``--train-fraction`` of persons train a
cosine-margin classifier with light augmentation; Rank-1 (nearest unit from another study)
is reported on the held-out persons for the network and for raw-pixel cosine.

    python -m synth.learncheck DIR --modality cxr [--size 64] [--epochs 30]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .baseline import unit_pixels


def load(out: Path, truth: dict, modality: str, size: int):
    x, persons, studies = [], [], []
    for st in truth["studies"]:
        if st["modality"] != modality:
            continue
        for se in st["series"]:
            files = sorted((out / se["path"]).glob("*.dcm"))
            for fp in files if modality == "fundus" else files[len(files) // 2:len(files) // 2 + 1]:
                a = unit_pixels(fp)[0]
                a = np.asarray(Image.fromarray(a.astype(np.float32)).resize((size, size), Image.BILINEAR))
                x.append((a - a.mean()) / (a.std() + 1e-6))
                persons.append(st["person_id"])
                studies.append(st["study_uid"])
    return np.stack(x).astype(np.float32), np.array(persons), np.array(studies)


def rank1(emb: np.ndarray, persons: np.ndarray, studies: np.ndarray) -> float:
    sim = emb @ emb.T
    sim[studies[:, None] == studies[None, :]] = -np.inf
    return float(np.mean(persons[np.argmax(sim, 1)] == persons))


def run(out, modality="cxr", size=64, epochs=30, train_fraction=0.8, seed=0, log=print) -> dict:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    torch.manual_seed(seed)
    out = Path(out)
    truth = json.loads((out / "truth.json").read_text(encoding="utf-8"))
    x, persons, studies = load(out, truth, modality, size)
    ids = sorted(set(persons))
    n_train = int(len(ids) * train_fraction)
    label = np.array([ids.index(p) for p in persons])
    tr, te = label < n_train, label >= n_train
    raw = x.reshape(len(x), -1)
    raw = raw / np.linalg.norm(raw, axis=1, keepdims=True)

    layers, ch = [], [1, 32, 64, 96, 128]
    for a, b in zip(ch[:-1], ch[1:]):
        layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(),
                   nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
    body, head = nn.Sequential(*layers), nn.Linear(128, 128)
    net = nn.ModuleDict({"body": body, "head": head})
    weights = nn.Parameter(torch.randn(n_train, 128) * 0.01)
    opt = torch.optim.AdamW(list(net.parameters()) + [weights], lr=2e-3, weight_decay=1e-4)

    def embed(t):
        return F.normalize(head(body(t).mean((2, 3))), dim=1)

    def augment(t):
        n = t.shape[0]
        ang, sc = (torch.rand(n) - 0.5) * 0.2, 1 + (torch.rand(n) - 0.5) * 0.15
        sh = (torch.rand(n, 2) - 0.5) * 0.15
        theta = torch.stack([torch.stack([sc * torch.cos(ang), -sc * torch.sin(ang), sh[:, 0]], 1),
                             torch.stack([sc * torch.sin(ang), sc * torch.cos(ang), sh[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, t.shape, align_corners=False)
        t = F.grid_sample(t, grid, align_corners=False, padding_mode="border")
        return t * (1 + (torch.rand(n, 1, 1, 1) - 0.5) * 0.4) + (torch.rand(n, 1, 1, 1) - 0.5) * 0.4

    xt = torch.from_numpy(x)[:, None]
    xtr, ytr = xt[torch.from_numpy(tr)], torch.from_numpy(label[tr])
    t0 = time.perf_counter()
    for ep in range(epochs):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64]
            logits = embed(augment(xtr[b])) @ F.normalize(weights, dim=1).T
            loss = F.cross_entropy(20 * (logits - 0.25 * F.one_hot(ytr[b], n_train)), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if log and (ep % 5 == 4 or ep == epochs - 1):
            log(f"epoch {ep + 1}/{epochs} loss {loss.item():.3f} {time.perf_counter() - t0:.0f}s")
    net.eval()
    with torch.no_grad():
        emb = torch.cat([embed(xt[i:i + 128]) for i in range(0, len(xt), 128)]).numpy()
    return {"modality": modality, "train_persons": n_train, "test_persons": len(ids) - n_train,
            "test_units": int(te.sum()), "size": size, "epochs": epochs,
            "rank1_network": round(rank1(emb[te], persons[te], studies[te]), 4),
            "rank1_raw_pixels": round(rank1(raw[te], persons[te], studies[te]), 4),
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m synth.learncheck", description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--modality", default="cxr", choices=["cxr", "ct", "mr", "fundus", "derm"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--train-fraction", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (Path(args.dir) / "truth.json").is_file():
        print(f"error: {args.dir}/truth.json not found", file=sys.stderr)
        return 2
    res = run(args.dir, args.modality, args.size, args.epochs, args.train_fraction, args.seed,
              log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
