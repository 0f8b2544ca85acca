"""Adapt an identity model to a site's own images without labels: batch-norm statistics (AdaBN).

    dicom-node adapt --route chest_xr --from-db --out DIR          # the archive's stored radiographs
    dicom-node adapt --route chest_xr --manifest site.csv --out DIR

A network's batch-norm layers normalize each feature with the mean and variance of the
training images. On another population (the shipped chest X-ray model learned from children's
radiographs; a site images adults, on its own equipment) those statistics are off, and every
feature after them is shifted. AdaBN (Li et al., "Revisiting batch normalization for practical
domain adaptation", 2016) re-estimates them on the site's images and changes nothing else:
no weight is trained and no label (Patient ID) is read, so a wrong Patient ID in the archive
cannot leak into the model. The images go through the card's input chain and test-time views,
i.e. exactly what the network sees when the node embeds them.

Hand-written: MONAI and pytorch-metric-learning have no AdaBN step; it is a forward pass in
training mode with cumulative batch-norm averages (``momentum=None``, torch's own option).

Output: a weights folder (model.pt + card.json) like `train --out`. The card is the source
card with a new version and sha256 and an `adaptation` entry (method, images, source, base
model). Its calibration is the source model's, marked as fitted before adaptation: refit it on
labelled pairs with `dicom-node evaluate --update-card` before relying on link probabilities.
After copying the folder into the registry, stored series keep their old embeddings until
re-processed (`dicom-node process --until-idle --reembed`); series are compared only with
embeddings of the same model version.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.inference.networks import TEST_TIME_VIEWS, card_version, check_views, sha256_file


def batchnorm_layers(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapt_batchnorm(net: nn.Module, images: np.ndarray, views: str | None = None, batch: int = 32,
                    device: torch.device | None = None, keep_base: float = 0.0) -> nn.Module:
    """A copy of `net` whose batch-norm running statistics are those of `images` (uint8, N x C x spatial,
    normalized by the route's chain), seen through the test-time `views`; every weight unchanged.
    `keep_base` in [0, 1] blends the result with the base statistics (0: the images' alone)."""
    from models.datasets.examples import as_float
    views = check_views(views)
    if len(images) < 2:
        raise ValueError("batch-norm adaptation needs at least 2 images")
    if not 0.0 <= keep_base <= 1.0:
        raise ValueError("keep_base must lie in [0, 1]")
    adapted = copy.deepcopy(net)
    layers = batchnorm_layers(adapted)
    if not layers:
        raise ValueError("this network has no batch-norm layers to adapt")
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None            # cumulative average over every batch, not an exponential one
    adapted.eval()                       # only batch norm in training mode: EfficientNet-Lite's stochastic depth
    for layer in layers:                 # (models/inference/backbones.py) would drop blocks while the statistics are taken
        layer.train()
    device = device or next(adapted.parameters()).device
    for k in range(0, len(images), batch):
        chunk = images[k:k + batch]
        if len(chunk) < 2:               # a batch of one has no variance; fold it into the batch before
            chunk = images[k - 1:k + 1]
        for view in TEST_TIME_VIEWS[views](as_float(chunk).to(device)):
            adapted(view)
    for layer, base in zip(layers, batchnorm_layers(net)):
        layer.running_mean.mul_(1 - keep_base).add_(keep_base * base.running_mean)
        layer.running_var.mul_(1 - keep_base).add_(keep_base * base.running_var)
        layer.momentum = 0.1             # torch's default, should anyone train the adapted model further
    return adapted.eval()


def adapted_card(source: dict, model_path: Path, images: int, examples: int, data_source: str,
                 command: str, keep_base: float = 0.0, available: int | None = None) -> dict:
    """The card of an adapted model: the source card with new version/sha256 and an `adaptation` entry."""
    from models.training.model_card import code_version
    card = copy.deepcopy(source)
    digest = sha256_file(model_path)
    now = dt.datetime.now(dt.UTC)
    base_version = str(source.get("version") or "unversioned")
    card.update({
        "version": card_version(f"{now:%Y%m%d}-adabn-{digest[:8]}", source.get("test_time_views")),
        "sha256": digest,
        "size_bytes": model_path.stat().st_size,
        "date": now.isoformat(timespec="seconds"),
        "code_version": code_version(),
        "adaptation": {
            "method": "batch-norm statistics re-estimated on the site's images (AdaBN); no weight trained, "
                      "no label read",
            "images": images, "examples": examples,
            "available_series": available if available is not None else examples,
            "source": data_source, "keep_base": keep_base,
            "test_time_views": source.get("test_time_views") or "none",
            "base": {"version": base_version, "sha256": source.get("sha256")},
            "command": command, "date": now.isoformat(timespec="seconds")},
    })
    metrics = card.pop("metrics", None)
    if metrics:                        # they describe the base model, not this one
        card["adaptation"]["base"]["metrics"] = metrics
    cal = card.get("calibration")
    if cal and not str(cal.get("fitted_on", "")).startswith("before adaptation"):
        cal["fitted_on"] = f"before adaptation, of {base_version}: {cal.get('fitted_on', '')}".rstrip(": ")
    card["limitations"] = "; ".join(p for p in (
        "batch-norm statistics adapted to the images in adaptation.source; the calibration is the base model's "
        "until `dicom-node evaluate --update-card` refits it on labelled pairs", source.get("limitations")) if p)
    return card


def require_trained(model) -> None:
    """WeightsError unless `model` was loaded from a registry folder (an untrained network has nothing to adapt)."""
    from models.inference.networks import WeightsError
    if not model.card:
        raise WeightsError(f"route {model.route}: no trained model to adapt (the registry has no model.pt and "
                           f"card.json for it)")


def adapt_to_folder(model, examples, out: Path, data_source: str, command: str, keep_base: float = 0.0,
                    available: int | None = None) -> dict:
    """Adapt `model` (models.inference.networks.IdentityModel, loaded from the registry) to `examples`
    (models.datasets.examples.Examples) and write out/model.pt, out/card.json; returns the card."""
    require_trained(model)
    adapted = adapt_batchnorm(model.net, examples.images, model.views, device=model.device, keep_base=keep_base)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.pt"
    torch.save({k: v.cpu() for k, v in adapted.state_dict().items()}, model_path)
    card = adapted_card(model.card, model_path, len(examples.images), len(examples.labels), data_source, command,
                        keep_base, available)
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card
