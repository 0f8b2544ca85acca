"""The frozen-backbone baseline of `dicom-node evaluate`: what ImageNet features do with no training.

Next to the pixel cosine and the model, every report of a 2D route scores EfficientNet-Lite0's
ImageNet features (models.inference.backbones), GeM-pooled with p = 3, the embeddings mean-centred over the
evaluated set and then L2-normalized (centring takes out what all radiographs share, which otherwise
dominates every cosine), computed on the very examples the model is scored on, at the card's input size.
So a report always shows what training adds over an off-the-shelf network. `--baseline-backbone`
picks Lite0, Lite1, Lite2 or none; volume routes have none (the backbones are 2D) and the report says so.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from models.datasets.examples import Examples, as_float, pool
from models.inference.backbones import BACKBONES, PREFIX, BackboneNet
from models.inference.errors import WeightsError

log = logging.getLogger("models.evaluation.frozen_baseline")

CHOICES = tuple(BACKBONES) + tuple(m.removeprefix("efficientnet-") for m in BACKBONES) + ("none",)


def choose(route: str, requested: str | None) -> tuple[str | None, str]:
    """(backbone model or None, the note for the report) for `--baseline-backbone` (None: the route's default:
    efficientnet-lite0 for 2D routes, none for volume routes). ValueError for a 2D backbone on a volume route."""
    from models.inference.transforms import ROUTE_INPUTS
    two_d = len(ROUTE_INPUTS[route].get("shape") or ()) == 2
    if requested is None:
        requested = "efficientnet-lite0" if two_d else "none"
    if requested == "none":
        return None, ("none: --baseline-backbone none" if two_d else
                      f"none: {route} is a volume route and the ImageNet backbones are 2D")
    model = requested if requested in BACKBONES else f"efficientnet-{requested}"
    if model not in BACKBONES:
        raise ValueError(f"--baseline-backbone {requested}: choose from {', '.join(CHOICES)}")
    if not two_d:
        raise ValueError(f"--baseline-backbone {requested}: {route} is a volume route and the ImageNet backbones "
                         "are 2D")
    return model, ""


def stored_note(route: str, requested: str | None) -> str:
    """The report's note when stored embeddings are scored (no images at hand for a baseline)."""
    model, note = choose(route, requested)
    return note if model is None else \
        "not computed: stored embeddings were scored and the series' images not loaded (--recompute loads them)"


def result_name(model: str) -> str:
    return "frozen-" + model.removeprefix("efficientnet-")


@torch.inference_mode()
def frozen_embeddings(ex: Examples, model: str = "efficientnet-lite0", batch: int = 32) -> np.ndarray:
    """(examples, 1280): ImageNet features GeM-pooled (p = 3), centred over `ex`, L2-normalized, pooled per
    example like the model's embeddings."""
    from models.inference.networks import NetSpec
    spec = NetSpec(2, int(ex.images.shape[1]), backbone=PREFIX + model, dim=0)
    net = BackboneNet(spec, pretrained=True).eval()
    feats = torch.cat([net.pooled(as_float(ex.images[k:k + batch])).double()
                       for k in range(0, len(ex.images), batch)])
    feats = F.normalize(feats - feats.mean(dim=0, keepdim=True), dim=1)
    return pool(feats, torch.as_tensor(ex.owner), len(ex.labels)).numpy()


def frozen_vectors(ex: Examples, route: str, requested: str | None, source: dict) -> tuple[str, np.ndarray] | None:
    """(result name, embeddings) of the chosen frozen backbone on `ex`, or None; what was done (or why not)
    goes into source["frozen_baseline"]. A backbone package that is missing is reported, not raised: the
    model's own scores do not need it."""
    model, note = choose(route, requested)
    if model is None:
        source["frozen_baseline"] = note
        return None
    try:
        vectors = frozen_embeddings(ex, model)
    except WeightsError as error:
        log.warning("frozen baseline not computed: %s", error)
        source["frozen_baseline"] = f"not computed: {error}"
        return None
    source["frozen_baseline"] = (f"{result_name(model)}: {model} ImageNet features, GeM p=3, mean-centred over "
                                 f"the evaluated set, L2-normalized, at {ex.images.shape[-1]} px")
    return result_name(model), vectors


def frozen_metrics(frozen: tuple[str, np.ndarray] | None, labels: list[str]) -> dict:
    """{result name: metrics} of frozen_vectors' output (scored like the pixel cosine), {} for None."""
    from models.evaluation import metrics as M
    return {frozen[0]: M.identity_metrics(frozen[1], labels, with_pml=False, curves=True)} if frozen else {}
