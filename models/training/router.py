"""Train the router on synthetic cohorts generated on the fly; save weights and a model card.

    .venv/bin/python -m models.training.router --out models/weights/router --patients 24

Data (all generated here, nothing downloaded):
* train: `synth` cohorts (preset small, and default with half the persons), every
  series loaded with `models.inference.loading` and thumbnailed with `models.inference.transforms.router_thumbnail`,
  exactly as at run time; each image of a multi-image series is one example;
* "other": pydicom's bundled test images (grouped by size and modality so near-copies stay on
  one side of the split), synthetic non-matching content (extremity and spine radiographs,
  documents, ultrasound fans, noise, coloured scenes, abdomen/leg/phantom volumes) and single
  CT or MR slices presented as 2D images;
* real images (``--real ROUTE=MANIFEST``, repeatable): a labelled image set's rows (image,
  patient_id) as examples of ROUTE, e.g. real chest radiographs and dermoscopies, which the
  synthetic ones alone do not teach the router to recognise; one patient in five is held out;
* held out: cohorts with other seeds (other persons), other "other" seeds, the other half of
  the pydicom groups, the held-out real patients.
Training: Adam, batched random affine / flip / gamma / noise on the thumbnails, fixed seeds.
Reports held-out accuracy and the confusion matrix (rows true, columns predicted).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import monai
import numpy as np
import torch
import torch.nn.functional as F

from models.inference.networks import read_card, sha256_file
from models.inference.router import untrained_router_net
from models.inference.transforms import ROUTES, router_thumbnail
from models.training.router_data import cohort_examples, pydicom_others, real_examples, synthetic_others

log = logging.getLogger("models.training.router")


# ---------------------------------------------------------------- training

def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)
    angle, scale = u(-0.2, 0.2), u(0.85, 1.15)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale * flip, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale * flip, torch.cos(angle) / scale
    theta[:, :, 2] = torch.stack([u(-0.1, 0.1), u(-0.1, 0.1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    x = x.clamp(0, 1) ** u(0.7, 1.4)[:, None, None, None]
    return (x + u(0, 0.03)[:, None, None, None] * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def train(x: torch.Tensor, y: torch.Tensor, classes, epochs: int, seed: int = 0) -> torch.nn.Module:
    net = untrained_router_net(len(classes), seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    weights = 1.0 / torch.bincount(y, minlength=len(classes)).clamp_min(1).float()   # balance classes
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for k in range(0, len(x), 64):
            idx = order[k:k + 64]
            loss = F.cross_entropy(net(augment(x[idx], gen)), y[idx], weight=weights / weights.mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log.info("epoch %d/%d loss %.4f", epoch + 1, epochs, total / len(x))
    return net.eval()


@torch.inference_mode()
def evaluate(net, x: torch.Tensor, y: torch.Tensor, classes) -> dict:
    pred = torch.cat([net(x[k:k + 256]).argmax(1) for k in range(0, len(x), 256)])
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(y.tolist(), pred.tolist()):
        confusion[t, p] += 1
    per_class = {c: round(float(confusion[i, i] / max(confusion[i].sum(), 1)), 4) for i, c in enumerate(classes)}
    return {"accuracy": round(float((pred == y).float().mean()), 4), "n": len(y),
            "per_class_accuracy": per_class, "confusion": {"rows_true_cols_predicted": list(classes),
                                                           "matrix": confusion.tolist()}}


def build_dataset(patients: int, seeds: tuple[int, int], other_seed: int, workdir: Path, classes, pyd) -> tuple:
    thumbs, labels = [], []
    for seed, preset, n in ((seeds[0], "small", patients), (seeds[1], "default", max(1, patients // 2))):
        t, lab, slices = cohort_examples(seed, n, preset, workdir)
        thumbs += t
        labels += [c if c in classes else "other" for c in lab]
        thumbs += [router_thumbnail(s) for s in slices]
        labels += ["other"] * len(slices)
    per_class = max(labels.count(c) for c in set(labels))
    others = synthetic_others(other_seed, per_class) + list(pyd)
    thumbs += others
    labels += ["other"] * len(others)
    x = torch.stack(thumbs).float()
    y = torch.tensor([classes.index(c) for c in labels])
    return x, y, {"synth_cohorts": [{"seed": seeds[0], "preset": "small", "patients": patients, "visits": 2},
                                    {"seed": seeds[1], "preset": "default", "patients": max(1, patients // 2),
                                     "visits": 2}],
                  "synthetic_other_seed": other_seed, "pydicom_other_images": len(pyd),
                  "examples_per_class": {c: labels.count(c) for c in classes}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.training.router", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/weights/router"))
    parser.add_argument("--patients", type=int, default=24, help="persons in the main training cohort")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), help="route set (must include other)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--real", action="append", default=[], metavar="ROUTE=MANIFEST",
                        help="real labelled images as examples of ROUTE (repeatable)")
    parser.add_argument("--real-limit", type=int, default=600, metavar="N", help="images per --real manifest")
    parser.add_argument("--exclude-patients-from", type=Path, action="append", default=[], metavar="DIR",
                        help="a weights folder whose card's validation patients --real leaves out (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)   # broken test files log on purpose
    torch.set_num_threads(args.threads)
    classes = list(dict.fromkeys(args.routes))
    if "other" not in classes:
        parser.error("--routes must include other")
    started = time.time()
    pyd_train, pyd_held = pydicom_others()
    with tempfile.TemporaryDirectory(prefix="router-train-") as tmp:
        x, y, data = build_dataset(args.patients, (1000 + args.seed, 2000 + args.seed), 3000 + args.seed,
                                   Path(tmp), classes, pyd_train)
        hx, hy, held = build_dataset(max(4, args.patients // 3), (5000 + args.seed, 6000 + args.seed),
                                     7000 + args.seed, Path(tmp), classes, pyd_held)
    real_held = None
    if args.real:
        try:
            exclude = frozenset(p for folder in args.exclude_patients_from
                                for p in (read_card(folder) or ({}, None))[0].get("validation_patients", []))
            rx, ry, rhx, rhy, data["real"] = real_examples(args.real, classes, args.real_limit, exclude)
        except (OSError, ValueError, KeyError) as exc:
            parser.error(f"--real: {exc}")
        x = torch.cat([x, torch.stack(rx).float()])
        y = torch.cat([y, torch.tensor([classes.index(c) for c in ry])])
        data["examples_per_class"] = {c: int((y == i).sum()) for i, c in enumerate(classes)}
        if rhx:
            real_held = (torch.stack(rhx).float(), torch.tensor([classes.index(c) for c in rhy]))
            hx, hy = torch.cat([hx, real_held[0]]), torch.cat([hy, real_held[1]])
    log.info("examples: train %d, held out %d (%.0f s)", len(x), len(hx), time.time() - started)
    net = train(x, y, classes, args.epochs, args.seed)
    result = evaluate(net, hx, hy, classes)
    if real_held is not None:
        result["real_held_out"] = evaluate(net, *real_held, classes)
    train_acc = evaluate(net, x, y, classes)["accuracy"]
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / "model.pt"
    torch.save(net.state_dict(), model_path)
    today = dt.datetime.now(dt.UTC)
    card = {
        "name": "router-resnet10-2d-w16",
        "version": f"{'synth+real' if args.real else 'synth'}-{today:%Y%m%d}-seed{args.seed}",
        "task": "route a series (thumbnail 3x64x64 from models.inference.transforms.router_thumbnail) to a route",
        "classes": classes, "arch": {"widths": [16, 32, 64, 128]},
        "date": today.isoformat(timespec="seconds"),
        "training_data": data, "heldout_data": held,
        "training": {"epochs": args.epochs, "seed": args.seed, "optimizer": "AdamW lr 3e-3 one-cycle, batch 64",
                     "augmentation": "affine (rot +-0.2 rad, scale 0.85-1.15, shift 10%), h-flip, gamma, noise",
                     "train_accuracy": train_acc, "seconds": round(time.time() - started, 1),
                     "command": " ".join(["python -m models.training.router"] + (argv or sys.argv[1:]))},
        "heldout": result,
        "limitations": ("trained on synthetic images, pydicom test files and the real sets in training_data.real; "
                        if args.real else "trained on synthetic images and pydicom test files only: accuracy on "
                        "real department data is unmeasured; ") + "the header rules remain part of every decision",
        "torch": torch.__version__, "monai": monai.__version__,
        "size_bytes": model_path.stat().st_size, "sha256": sha256_file(model_path),
    }
    (args.out / "card.json").write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    print(f"held-out accuracy {result['accuracy']:.4f} on {result['n']} examples (train {train_acc:.4f})")
    if real_held is not None:
        real = result["real_held_out"]
        print(f"held-out real patients: accuracy {real['accuracy']:.4f} on {real['n']} images")
    print("confusion (rows true, columns predicted):", " ".join(f"{c[:8]:>9s}" for c in classes))
    for c, row in zip(classes, result["confusion"]["matrix"]):
        print(f"  {c:>10s}", " ".join(f"{v:9d}" for v in row))
    print(f"saved {model_path} ({card['size_bytes'] / 1e6:.2f} MB) and card.json in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
