"""Metric learning of an identity network with patient identity as the label.

    dicom-node train --route chest_xr --manifest ../shared/data/cxr-pediatric/manifest.csv --out DIR
    dicom-node train --route chest_xr --synthetic 40 --out DIR          # procedural patients (tests)

* data: a manifest (models.evaluate.read_manifest; images normalized by the route's chain at
  `--size`) or `--synthetic N` procedural chest-like patients; patient-disjoint split: a
  fraction of the patients with >= 2 images is validation, everything else trains (patients
  with a single image still train: the M-per-class sampler repeats the image, so its
  augmented copies are the positives);
* pytorch-metric-learning: MPerClassSampler (m images per patient per batch), loss
  `subcenter-arcface` (default; 3 sub-centres per patient, so a few wrong Patient IDs fall in a
  non-dominant sub-centre instead of pulling the patient's centre) or `triplet` (cosine margin,
  semi-hard triplets from TripletMarginMiner: hardest triplets are mostly label noise);
  MultiSimilarityMiner weights the examples of the ArcFace loss;
* MONAI random augmentations for radiographs: affine (rotation, shift, scale, shear), contrast
  gamma, noise, blur, coarse dropout (arrows and labels on figures); no flips;
* validation mAP after each epoch, early stopping (`--patience`), `checkpoint.pt` each epoch
  (`--resume` continues it), tqdm progress when stderr is a terminal;
* output: model.pt (best epoch) + card.json (arch, input size, metrics, calibration fitted on the
  validation pairs, sha256, code version, data, command), loadable by load_identity_model.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models import metrics as M
from models.calibration import fit_calibration
from models.evaluate import as_float, embed_images, load_images, read_manifest
from models.networks import DEFAULT_SPECS, EmbeddingNet, NetSpec, seeded, sha256_file, spec_dict

log = logging.getLogger("models.training")


@dataclass
class TrainConfig:
    route: str
    out: Path
    manifest: Path | None = None
    synthetic: int = 0
    epochs: int = 10
    size: int = 160
    batch_size: int = 32
    m_per_class: int = 2
    steps_per_epoch: int = 0          # 0: one pass over the training images
    lr: float = 1e-3
    loss: str = "subcenter-arcface"
    val_fraction: float = 0.15
    patience: int = 3
    seed: int = 0
    threads: int = 0                  # 0: torch default
    device: str = "auto"
    max_minutes: float = 0.0          # 0: no time limit
    resume: bool = False
    widths: tuple[int, ...] = ()
    command: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- data

def synthetic_patients(patients: int, per_patient: int, size: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Procedural chest-like radiographs: per patient fixed lung/heart shapes and texture,
    per image small pose and exposure changes. (N, 1, size, size) uint8 and labels."""
    from scipy.ndimage import gaussian_filter, shift
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images, labels = [], []
    for p in range(patients):
        lungs = rng.uniform([0.28, 0.45, 0.12, 0.22], [0.36, 0.55, 0.18, 0.32], size=(2, 4))
        heart = rng.uniform([0.5, 0.55, 0.08, 0.1], [0.6, 0.7, 0.14, 0.16])
        texture = gaussian_filter(rng.normal(size=(size, size)), size / 24)
        texture /= texture.std() + 1e-6
        base = np.full((size, size), 0.75)
        for k, (cx, cy, rx, ry) in enumerate(lungs):
            cx = cx if k == 0 else 1 - cx
            base -= 0.45 * (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1)
        base += 0.3 * (((xx - heart[0]) / heart[2]) ** 2 + ((yy - heart[1]) / heart[3]) ** 2 < 1)
        base += 0.08 * texture
        for _ in range(per_patient):
            img = shift(base, rng.normal(0, size * 0.02, 2), order=1, mode="nearest")
            img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.15) + rng.normal(0, 0.02, img.shape)
            images.append(np.clip(np.rint(np.clip(img, 0, 1) * 255), 0, 255).astype(np.uint8)[None])
            labels.append(f"synth-{seed}-{p}")
    return np.stack(images), labels


def split_patients(labels: list[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(train indices, validation indices, validation patients): validation from patients with >= 2 images."""
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    multi = sorted(p for p, n in counts.items() if n >= 2)
    rng = np.random.default_rng(seed)
    rng.shuffle(multi)
    n_val = max(2, int(round(val_fraction * len(multi))))
    if len(multi) - n_val < 2:
        raise ValueError(f"too few patients with two or more images ({len(multi)}) for a validation split")
    val = set(multi[:n_val])
    is_val = np.array([lab in val for lab in labels])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val), sorted(val)


def augmentations(size: int, seed: int):
    from monai.transforms import (Compose, RandAdjustContrast, RandAffine, RandCoarseDropout, RandGaussianNoise,
                                  RandGaussianSmooth)
    chain = Compose([
        RandAffine(prob=0.9, rotate_range=(0.15,), translate_range=(0.08 * size, 0.08 * size),
                   scale_range=(0.12, 0.12), shear_range=(0.05, 0.05), padding_mode="zeros"),
        RandAdjustContrast(prob=0.5, gamma=(0.7, 1.4)),
        RandGaussianSmooth(prob=0.2, sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0)),
        RandGaussianNoise(prob=0.3, std=0.03),
        RandCoarseDropout(holes=2, spatial_size=max(2, size // 12), fill_value=1.0, prob=0.2),
    ])
    chain.set_random_state(seed)
    return chain


# ---------------------------------------------------------------- training

def _plain(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device(setting: str) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(setting)


def _loss_and_miner(cfg: TrainConfig, num_classes: int, dim: int):
    from pytorch_metric_learning import distances, losses, miners
    if cfg.loss == "subcenter-arcface":
        return (losses.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=dim, margin=28.6, scale=30,
                                            sub_centers=3), miners.MultiSimilarityMiner(epsilon=0.1))
    if cfg.loss == "triplet":
        dist = distances.CosineSimilarity()
        return (losses.TripletMarginLoss(margin=0.2, distance=dist),
                miners.TripletMarginMiner(margin=0.2, distance=dist, type_of_triplets="semihard"))
    raise ValueError(f"unknown loss {cfg.loss!r} (subcenter-arcface or triplet)")


def validate(net, images, labels, device) -> tuple[dict, np.ndarray]:
    emb = embed_images(net, images, device)
    return M.identity_metrics(emb, labels, with_pml=False, curves=True), emb


def train(cfg: TrainConfig, progress: bool | None = None) -> dict:
    """Train, checkpoint, write model.pt + card.json into cfg.out; returns the card."""
    from pytorch_metric_learning.samplers import MPerClassSampler
    from tqdm import tqdm

    started = time.time()
    progress = sys.stderr.isatty() if progress is None else progress
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    if cfg.manifest:
        rows = read_manifest(cfg.manifest)
        labels = [r[1] for r in rows]
        images = load_images([r[0] for r in rows], cfg.route, cfg.size, progress)
        data = {"manifest": str(Path(cfg.manifest).resolve()), "images": len(rows)}
    elif cfg.synthetic:
        images, labels = synthetic_patients(cfg.synthetic, 3, cfg.size, cfg.seed)
        data = {"synthetic_patients": cfg.synthetic, "images": len(labels)}
    else:
        raise ValueError("training needs --manifest or --synthetic N")
    train_idx, val_idx, val_patients = split_patients(labels, cfg.val_fraction, cfg.seed)
    classes = sorted({labels[i] for i in train_idx})
    code = {c: k for k, c in enumerate(classes)}
    train_labels = np.array([code[labels[i]] for i in train_idx])
    val_images, val_labels = images[val_idx], [labels[i] for i in val_idx]
    data.update(patients=len(set(labels)), train_images=int(len(train_idx)), train_patients=len(classes),
                val_images=int(len(val_idx)), val_patients=len(val_patients))
    log.info("data %s", data)

    base = DEFAULT_SPECS[cfg.route]
    spec = NetSpec(**{**asdict(base), **({"widths": tuple(cfg.widths)} if cfg.widths else {})})
    net = seeded(lambda: EmbeddingNet(spec), cfg.seed).to(device)
    loss_fn, miner = _loss_and_miner(cfg, len(classes), spec.dim)
    loss_fn = loss_fn.to(device)
    params = [{"params": net.parameters(), "lr": cfg.lr}]
    if list(loss_fn.parameters()):
        params.append({"params": loss_fn.parameters(), "lr": cfg.lr * 10})
    opt = torch.optim.AdamW(params, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    state = {"epoch": 0, "best_map": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": [], "best_state": None,
             "seconds": 0.0}
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["split_val_patients"] != val_patients or ckpt["classes"] != len(classes):
            raise ValueError(f"{ckpt_path}: made with other data or split; remove it or train without --resume")
        net.load_state_dict(ckpt["net"]), loss_fn.load_state_dict(ckpt["loss"])
        opt.load_state_dict(ckpt["opt"]), sched.load_state_dict(ckpt["sched"])
        state = ckpt["state"]
        log.info("resumed from %s at epoch %d", ckpt_path, state["epoch"])

    per_epoch = cfg.steps_per_epoch * cfg.batch_size if cfg.steps_per_epoch else len(train_idx)
    per_epoch = max(cfg.batch_size, per_epoch - per_epoch % cfg.batch_size)
    stop_reason = "epochs"
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"] + 1
        t0 = time.time()
        np.random.seed(cfg.seed * 1000 + epoch)           # MPerClassSampler draws from numpy's global RNG
        torch.manual_seed(cfg.seed * 1000 + epoch)
        aug = augmentations(cfg.size, cfg.seed * 1000 + epoch)
        sampler = MPerClassSampler(train_labels, cfg.m_per_class, cfg.batch_size, length_before_new_iter=per_epoch)
        order = np.fromiter(iter(sampler), dtype=np.int64)
        net.train()
        losses = []
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress,
                   leave=False)
        for start in bar:
            idx = order[start:start + cfg.batch_size]
            x = torch.stack([_plain(aug(img)).clamp(0, 1) for img in as_float(images[train_idx[idx]])])
            y = torch.as_tensor(train_labels[idx], device=device)
            emb = net(x.to(device))
            loss = loss_fn(emb, y, miner(emb, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        sched.step()
        val, _ = validate(net, val_images, val_labels, device)
        record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                  "val_mAP": val["mAP"], "val_rank1": val["rank1"], "val_auc": val["roc_auc"],
                  "seconds": round(time.time() - t0, 1)}
        state["history"].append(record)
        state["epoch"] = epoch
        state["seconds"] += time.time() - t0
        if val["mAP"] > state["best_map"]:
            state.update(best_map=val["mAP"], best_epoch=epoch, bad_epochs=0,
                         best_state={k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        log.info("epoch %d: %s", epoch, record)
        if progress:
            print(f"epoch {epoch}: {record}", file=sys.stderr)
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"net": net.state_dict(), "loss": loss_fn.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "state": state, "split_val_patients": val_patients,
                    "classes": len(classes), "config": {k: str(v) for k, v in asdict(cfg).items()}}, tmp)
        tmp.replace(ckpt_path)
        if state["bad_epochs"] >= cfg.patience:
            stop_reason = f"early stop: no better validation mAP for {cfg.patience} epochs"
            break
        if cfg.max_minutes and time.time() - started > cfg.max_minutes * 60:
            stop_reason = f"time limit {cfg.max_minutes} min"
            break
    return finish(cfg, spec, net, state, val_images, val_labels, val_patients, data, device, stop_reason)


def finish(cfg, spec, net, state, val_images, val_labels, val_patients, data, device, stop_reason) -> dict:
    """Best weights -> model.pt; validation metrics and calibration -> card.json."""
    out = Path(cfg.out)
    if state["best_state"] is not None:
        net.load_state_dict(state["best_state"])
    net = net.cpu()
    val, _ = validate(net, val_images, val_labels, torch.device("cpu"))
    cal = fit_calibration(val["_curves"]["genuine"], val["_curves"]["impostor"],
                          fitted_on=f"validation pairs of {data.get('manifest') or 'synthetic data'}")
    model_path = out / "model.pt"
    torch.save(net.state_dict(), model_path)
    digest = sha256_file(model_path)
    now = dt.datetime.now(dt.timezone.utc)
    card = {
        "name": spec.name(cfg.route),
        "version": f"{now:%Y%m%d}-{cfg.loss}-{digest[:8]}",
        "route": cfg.route,
        "arch": spec_dict(spec),
        "input": {"size": cfg.size, "transform": f"models.evaluate.input_transform({cfg.route!r}, {cfg.size})"},
        "sha256": digest,
        "size_bytes": model_path.stat().st_size,
        "date": now.isoformat(timespec="seconds"),
        "code_version": code_version(),
        "training_data": data,
        "validation_patients": val_patients,
        "training": {"command": cfg.command, "loss": cfg.loss,
                     "miner": "MultiSimilarityMiner(0.1)" if cfg.loss != "triplet" else "TripletMarginMiner(semihard)",
                     "sampler": f"MPerClassSampler(m={cfg.m_per_class}, batch={cfg.batch_size})",
                     "optimizer": f"AdamW(lr={cfg.lr}, wd=1e-4), cosine schedule",
                     "augment": "MONAI RandAffine, RandAdjustContrast, RandGaussianSmooth, RandGaussianNoise, "
                                "RandCoarseDropout", "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
                     "stop": stop_reason, "seconds": round(state["seconds"], 1), "device": str(device),
                     "threads": torch.get_num_threads(), "seed": cfg.seed, "history": state["history"]},
        "metrics": {"validation": M.summary(val)},
        "calibration": cal.to_json(),
        "limitations": "validation patients come from the training distribution; the calibration is fitted on "
                       "the same validation pairs that chose the epoch (slightly optimistic); see docs/accuracy.md",
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card
