"""The model card of a trained identity network (card.json): provenance, training recipe, metrics,
calibration and limitations. `models.training.train.finish` writes it; `models.evaluation.evaluate.update_card`
adds held-out metrics later."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import torch

from models.evaluation import metrics as M
from models.inference.networks import card_version, sha256_file, spec_dict
from models.training.augment import describe


def code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


STANDARD_LIMITATIONS = (
    "validation patients come from the training distribution; calibration.fitted_on names the pairs the calibration "
    "was fitted on (at training, the validation pairs that chose the epoch: slightly optimistic; "
    "`evaluate --update-card` refits it on held-out pairs); see docs/accuracy.md")


def with_standard_limitations(given: str | None) -> str:
    """The card's limitations: the trainer's words, then the standard caveats once (a --limitations copied
    from an earlier card already holds them)."""
    given = (given or "").replace(STANDARD_LIMITATIONS, "").strip("; ")
    return "; ".join(p for p in (given, STANDARD_LIMITATIONS) if p)


def optimizer_note(cfg) -> str:
    groups = (f"; backbone lr x {cfg.backbone_lr_scale:g}, head (pooling, embedding layer) lr as given"
              if cfg.backbone_lr_scale != 1.0 else "")
    frozen = f"; stem and first {cfg.freeze_blocks} blocks frozen (weights and batch-norm statistics)" \
        if cfg.freeze_blocks else ""
    return f"AdamW(lr={cfg.lr}, wd=1e-4), cosine schedule{groups}{frozen}"


def training_card(cfg, spec, geometry, model_path: Path, state: dict, val: dict, cal, data: dict,
                  val_patients: list[str], device, stop_reason: str, backbone: dict | None = None) -> dict:
    """card.json of a run: `val` the best epoch's validation metrics, `cal` its calibration; `backbone` the
    ImageNet weights the network started from (models.inference.backbones.provenance), for a backbone network."""
    digest = sha256_file(model_path)
    now = dt.datetime.now(dt.UTC)
    return {
        "name": spec.name(cfg.route),
        "version": card_version(f"{now:%Y%m%d}-{cfg.loss}-{digest[:8]}", cfg.test_time_views),
        "route": cfg.route,
        "arch": spec_dict(spec),
        **({"backbone": backbone} if backbone else {}),
        "input": {**geometry, "transform": f"models.inference.transforms.route_chain({cfg.route!r}, input)"},
        **({"test_time_views": cfg.test_time_views} if cfg.test_time_views != "none" else {}),
        "sha256": digest,
        "size_bytes": model_path.stat().st_size,
        "date": now.isoformat(timespec="seconds"),
        "code_version": code_version(),
        "training_data": data,
        "validation_patients": val_patients,
        "training": {"command": cfg.command, "loss": cfg.loss,
                     "miner": "MultiSimilarityMiner(0.1)" if cfg.loss != "triplet" else "TripletMarginMiner(semihard)",
                     "loss_parameters": {"subcenter-arcface": "margin 28.6 deg, scale 30, 3 sub-centres",
                                         "cosface": "margin 0.2, scale 30",
                                         "multisimilarity": "alpha 2, beta 50, base 0.5",
                                         "triplet": "cosine margin 0.2"}[cfg.loss],
                     "sampler": (f"hard batches: neighbourhoods of {cfg.hard_batches} look-alike persons, m="
                                 f"{cfg.m_per_class}, batch={cfg.batch_size} (models.training.hard_batches"
                                 f"{', labels trusted' if cfg.trust_labels else ''})" if cfg.hard_batches
                                 else f"MPerClassSampler(m={cfg.m_per_class}, batch={cfg.batch_size})"),
                     "optimizer": optimizer_note(cfg),
                     "augment": describe(cfg.route, geometry), "epochs_run": state["epoch"],
                     "best_epoch": state["best_epoch"], "stop": stop_reason, "seconds": round(state["seconds"], 1),
                     "device": str(device), "threads": torch.get_num_threads(), "seed": cfg.seed,
                     "history": state["history"]},
        "metrics": {"validation": M.summary(val)},
        "calibration": cal.to_json(),
        "limitations": with_standard_limitations(cfg.limitations),
    }
