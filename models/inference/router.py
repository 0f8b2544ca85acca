"""The router (COMPA): which route a series takes, from its image and its header.

Two sources of evidence, combined as independent ones (naive Bayes, uniform prior):

* the header-rule table `HEADER_RULES`: (Modality, Body Part Examined) -> (route, confidence);
  the rule's route gets the rule's confidence, the other routes share the rest;
* the image: a small MONAI ResNet on `router_thumbnail(series)` (3 x 64 x 64) giving a
  probability per route (weights in ``weights_dir/router/``, trained by
  `models.training.router`).

Routes a series cannot take are masked out (a 2D image cannot go to chest_ct). The result,
`RouteDecision`, says where the evidence came from ("image+header", "image", "header"),
records disagreements as findings ("header says CR/HAND (other) but the image looks like
chest_xr (0.97)") and is linkable only for a route other than "other" with confidence at
least `min_confidence`. Without router weights the header decides alone (source "header").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import ResNet

from db.records import RouteDecision
from models.inference.networks import load_state, read_card, seeded
from models.inference.transforms import ROUTE_INPUTS, ROUTES

log = logging.getLogger("models.inference.router")

# Body Part Examined spellings seen in the wild -> the term the rules use.
BODY_PART_ALIASES = {"THORAX": "CHEST", "LUNG": "CHEST", "LUNGS": "CHEST", "CHEST_ABDOMEN": "CHEST",
                     "BRAIN": "HEAD", "SKULL": "HEAD", "CRANIUM": "HEAD", "RETINA": "EYE", "FUNDUS": "EYE",
                     "EYES": "EYE"}

# (Modality, body part) -> (route, confidence). Body part "" = absent from the header,
# "*" = any other value; Modality "*" = any other modality. Looked up most specific first.
HEADER_RULES: dict[tuple[str, str], tuple[str, float]] = {
    ("CR", "CHEST"): ("chest_xr", 0.9), ("DX", "CHEST"): ("chest_xr", 0.9),
    ("CR", ""): ("chest_xr", 0.6), ("DX", ""): ("chest_xr", 0.6),        # most radiographs are chests
    ("CR", "*"): ("other", 0.9), ("DX", "*"): ("other", 0.9),            # hand, knee, spine, ...
    ("CT", "CHEST"): ("chest_ct", 0.9), ("CT", ""): ("chest_ct", 0.4), ("CT", "*"): ("other", 0.9),
    ("MR", "HEAD"): ("brain_mr", 0.9), ("MR", ""): ("brain_mr", 0.4), ("MR", "*"): ("other", 0.9),
    ("OP", "EYE"): ("fundus", 0.95), ("OP", ""): ("fundus", 0.85), ("OP", "*"): ("other", 0.6),
    ("XC", "EYE"): ("fundus", 0.8), ("SC", "EYE"): ("fundus", 0.7), ("OT", "EYE"): ("fundus", 0.7),
    ("DMS", "SKIN"): ("dermoscopy", 0.95), ("DMS", ""): ("dermoscopy", 0.9), ("DMS", "*"): ("dermoscopy", 0.8),
    ("XC", "SKIN"): ("dermoscopy", 0.8), ("SC", "SKIN"): ("dermoscopy", 0.7), ("OT", "SKIN"): ("dermoscopy", 0.7),
    ("*", "*"): ("other", 0.8), ("*", ""): ("other", 0.6),
}

KIND_WORDS = {"volume": "3D volume", "gray": "2D grayscale image", "rgb": "2D colour image"}
THUMBNAIL_SHAPE = (3, 64, 64)


@dataclass(frozen=True)
class HeaderRule:
    route: str
    confidence: float
    said: str          # e.g. "CR/HAND", for findings


def header_rule(modality: str | None, body_part: str | None) -> HeaderRule | None:
    """The rule for a header, or None when the header has no Modality."""
    modality = (modality or "").strip().upper()
    if not modality:
        return None
    part = (body_part or "").strip().upper().replace(" ", "_")
    part = BODY_PART_ALIASES.get(part, part)
    if "CHEST" in part or "THORAX" in part:
        part = "CHEST"
    wildcard = "*" if part else ""
    for key in ((modality, part), (modality, wildcard), ("*", wildcard)):
        if key in HEADER_RULES:
            route, confidence = HEADER_RULES[key]
            return HeaderRule(route, confidence, f"{modality}/{part or '-'}")
    raise AssertionError("HEADER_RULES lacks its catch-all entries")


def build_router_net(n_classes: int, widths=(16, 32, 64, 128)) -> torch.nn.Module:
    """ResNet-10 (2D, 3x3 stem, stride 1 + max pool) for 3 x 64 x 64 thumbnails; ~0.3 M parameters."""
    return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=list(widths), spatial_dims=2,
                  n_input_channels=THUMBNAIL_SHAPE[0], conv1_t_size=3, conv1_t_stride=1,
                  num_classes=n_classes)


class Router:
    def __init__(self, classes=ROUTES, net: torch.nn.Module | None = None, card: dict | None = None,
                 min_confidence: float = 0.5, device: torch.device | str = "cpu") -> None:
        self.classes = tuple(classes)
        if "other" not in self.classes:
            raise ValueError("the route set must contain 'other'")
        self.net = net.eval().to(device) if net is not None else None
        self.card = card or {}
        self.min_confidence = min_confidence
        self.device = torch.device(device)

    @classmethod
    def load(cls, folder: Path | None, min_confidence: float = 0.5, device="cpu") -> Router:
        """Router with the weights in `folder` (model.pt + card.json), else header-only."""
        found = read_card(Path(folder)) if folder else None
        if found is None:
            log.info("no router weights in %s: routing by header rules only", folder)
            return cls(min_confidence=min_confidence, device=device)
        card, model_path = found
        classes = tuple(card.get("classes") or ROUTES)
        net = build_router_net(len(classes), tuple(card.get("arch", {}).get("widths", (16, 32, 64, 128))))
        load_state(net, model_path)
        return cls(classes, net, card, min_confidence, device)

    @property
    def version(self) -> str:
        return str(self.card.get("version", "header-rules"))

    @torch.inference_mode()
    def image_probabilities(self, thumbnails: torch.Tensor) -> np.ndarray | None:
        """(N, 3, 64, 64) -> (N, classes) softmax probabilities; None without weights."""
        if self.net is None:
            return None
        logits = self.net(thumbnails.to(self.device, torch.float32))
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def decide(self, kind: str, modality: str | None, body_part: str | None,
               probabilities: np.ndarray | None = None) -> RouteDecision:
        """Combine header rule and image probabilities (one series) into a RouteDecision."""
        classes = self.classes
        allowed = np.array([kind in ROUTE_INPUTS.get(r, {}).get("kinds", (kind,)) for r in classes])
        findings: list[str] = []
        rule = header_rule(modality, body_part)
        if rule is not None and rule.route not in classes:
            findings.append(f"header rule route {rule.route} is not in this router's routes: other")
            rule = HeaderRule("other", rule.confidence, rule.said)
        if rule is not None and not allowed[classes.index(rule.route)]:
            findings.append(f"header says {rule.said} ({rule.route}) but the series is a {KIND_WORDS.get(kind, kind)}")
            rule = HeaderRule("other", 0.5, rule.said)

        if probabilities is None:        # header only
            if rule is None:
                findings.append("no Modality in the header and no router weights: cannot route")
                return self._final("other", 0.0, "header", findings)
            return self._final(rule.route, rule.confidence, "header", findings)

        image = np.where(allowed, np.asarray(probabilities, dtype=np.float64), 0.0)
        image = image / image.sum() if image.sum() > 0 else allowed / allowed.sum()
        top = int(np.argmax(image))
        if rule is None:
            findings.append("no Modality in the header: routed by the image alone")
            return self._final(classes[top], float(image[top]), "image", findings)
        k = classes.index(rule.route)
        prior = np.full(len(classes), (1.0 - rule.confidence) / max(len(classes) - 1, 1))
        prior[k] = rule.confidence
        posterior = image * prior
        posterior = posterior / posterior.sum() if posterior.sum() > 0 else prior
        if top != k and image[top] >= 0.5:
            findings.append(f"header says {rule.said} ({rule.route}) but the image looks like "
                            f"{classes[top]} ({image[top]:.2f})")
        best = int(np.argmax(posterior))
        return self._final(classes[best], float(posterior[best]), "image+header", findings)

    def _final(self, route: str, confidence: float, source: str, findings: list[str]) -> RouteDecision:
        linkable = True
        if route == "other":
            linkable = False
            findings.append("route other: stored, not linked")
        elif confidence < self.min_confidence:
            linkable = False
            findings.append(f"route confidence {confidence:.2f} below {self.min_confidence:.2f}: stored, not linked")
        return RouteDecision(route=route, confidence=round(float(confidence), 4), source=source,
                             findings=findings, linkable=linkable)


def untrained_router_net(n_classes: int, seed: int = 0) -> torch.nn.Module:
    """A fixed-seed, untrained router net (the starting point of training)."""
    return seeded(lambda: build_router_net(n_classes), seed)
