"""Identity networks per route: MONAI ResNet backbones with an L2-normalized embedding head.

2D routes (chest_xr, fundus, dermoscopy) use a 2D ResNet-10 (one basic block per stage,
widths 32-256, 7x7 stride-2 stem); volume routes (chest_ct, brain_mr) a 3D ResNet-10
(widths 16-128, 3x3x3 stride-2 stem) on the whole 128x128x64 / 96x112x64 input. The
backbone's fully connected layer is the embedding head (256 outputs), then L2
normalization. Sizes were picked for the speed targets on 2 CPU cores (docs/benchmarks.md).

A spec with a `backbone` ("imagenet:efficientnet-lite0", models/inference/backbones.py) is instead an
ImageNet-pretrained EfficientNet-Lite with GeM pooling and the same kind of head (`build_net`).

Weights, per route, in ``weights_dir/<route>/`` (see models/weights/README.md):
``model.pt`` (a state_dict) and ``card.json`` (name, version, arch, sha256, ...). Without
them the network is randomly initialized with a fixed seed and its version says
``untrained-seed0``: plumbing only, never an accuracy claim. Only local files are read.

A fused card (`dicom-node fuse`, models/training/fuse.py) puts two or more trained networks of a 2D
route behind one card (`FusedNet`): each member embeds the image at its own input size with its own
test-time views, its L2-normalized embedding is scaled by sqrt(weight) and the members are
concatenated, so the cosine of two fused embeddings is the weighted mean of the members' cosines and
everything downstream (search, calibration, the image check, linkage) works unchanged.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import nn

from models.inference.backbones import BackboneNet, check_definition_version, sha256_file  # noqa: F401 - re-exported
from models.inference.errors import WeightsError

log = logging.getLogger("models.inference.networks")


@dataclass(frozen=True)
class NetSpec:
    spatial_dims: int
    in_channels: int
    widths: tuple[int, ...] = (32, 64, 128, 256)
    layers: tuple[int, ...] = (1, 1, 1, 1)
    stem_kernel: int = 7
    dim: int = 256                    # backbone networks: 0 = no head, the pooled features themselves
    backbone: str = ""                # "": the MONAI ResNet above; "imagenet:efficientnet-lite0" (models.inference.backbones)
    gem_p: float = 3.0                # backbone networks: GeM pooling's starting p

    def name(self, route: str) -> str:
        if self.backbone:
            return f"{route}-{self.backbone.split(':')[-1]}-gem-d{self.dim}"
        depth = 2 + 2 * sum(self.layers)
        return f"{route}-resnet{depth}-{self.spatial_dims}d-w{self.widths[0]}-d{self.dim}"


DEFAULT_SPECS = {
    "chest_xr": NetSpec(2, 1),
    "fundus": NetSpec(2, 3),
    "dermoscopy": NetSpec(2, 3),
    "chest_ct": NetSpec(3, 1, widths=(16, 32, 64, 128), stem_kernel=3),
    "brain_mr": NetSpec(3, 1, widths=(16, 32, 64, 128), stem_kernel=3),
}


class EmbeddingNet(nn.Module):
    """MONAI ResNet whose `fc` maps the pooled features to `dim`; output L2-normalized."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = ResNet(block="basic", layers=list(spec.layers), block_inplanes=list(spec.widths),
                               spatial_dims=spec.spatial_dims, n_input_channels=spec.in_channels,
                               conv1_t_size=spec.stem_kernel, conv1_t_stride=2, num_classes=spec.dim)

    @property
    def out_dim(self) -> int:
        return self.spec.dim

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before L2 normalization."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=1)

    def parts(self) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
        """(stem, residual blocks in input order, head) for freezing and per-part learning rates."""
        r = self.backbone
        return [r.conv1, r.bn1], [b for layer in (r.layer1, r.layer2, r.layer3, r.layer4) for b in layer], [r.fc]


def build_net(spec: NetSpec, pretrained: bool = False) -> nn.Module:
    """The network of a spec: EmbeddingNet, or BackboneNet for a spec with a backbone (with `pretrained`,
    starting from its ImageNet weights). WeightsError when the backbone's package is not installed."""
    if spec.backbone:
        return BackboneNet(spec, pretrained=pretrained)
    if pretrained:
        raise ValueError("only networks with an ImageNet backbone have pretrained weights")
    return EmbeddingNet(spec)


def spec_from_arch(arch: dict | None, default: NetSpec) -> NetSpec:
    """The NetSpec of a card's `arch` (lists as tuples), `default` without one."""
    if not arch:
        return default
    return NetSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})


def _translated(x: torch.Tensor, dim: int, step: int) -> torch.Tensor:
    """x moved by `step` voxels along `dim`, the uncovered slab zero (the background of a normalized input)."""
    out = torch.roll(x, step, dims=dim)
    out.narrow(dim, 0 if step > 0 else x.shape[dim] + step, abs(step)).zero_()
    return out


def _shifts(x: torch.Tensor, step: int = 2) -> list[torch.Tensor]:
    # Networks trained with random translations (every route's RandAffine) are only nearly invariant to
    # them; averaging over the input and its +-step moves along each spatial axis smooths that wobble.
    return [x] + [_translated(x, d, s) for d in range(2, x.ndim) for s in (step, -step)]


def _rescaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    """A batch of 2D images (bilinear, antialiased when shrinking) or volumes (trilinear: torch has no
    antialiased 3D mode) resampled to `factor` times their size."""
    size = [max(1, round(n * factor)) for n in x.shape[2:]]
    if x.ndim == 4:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


def _scales(x: torch.Tensor) -> list[torch.Tensor]:
    # The networks pool globally, so they take any input size; the same image at 6/7 and 8/7 of its size
    # (192 and 256 px for a 224 px radiograph) shows them the anatomy at the neighbouring scales they met
    # while trained with random zooms, and averaging the three evens out their scale preferences.
    if x.ndim != 4:
        raise WeightsError("test_time_views with 'scales' resample 2D images; this input is not a batch of 2D images")
    return [x, _rescaled(x, 6 / 7), _rescaled(x, 8 / 7)]


def _dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    if x.ndim != 4:
        raise WeightsError("test_time_views with 'dihedral' turn 2D images; this input is not a batch of 2D images")
    return [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]


# Test-time views (card "test_time_views"): a network trained to be invariant to a symmetry (dermoscopy
# is augmented with any rotation and flip: a dermoscope has no orientation) is made exactly invariant by
# averaging its embeddings over the symmetry group. Hand-written: MONAI's TestTimeAugmentation draws random
# transforms for uncertainty estimates, not a fixed group, and returns no embedding average.
# Shifts: see _shifts; "shifts:4" moves by 4 voxels or pixels instead of 2.
TEST_TIME_VIEWS = {
    "none": lambda x: [x],
    "dihedral": _dihedral,
    "shifts": _shifts,
    # fundus (and chest X-ray in the sixth session) gained more from moves of 4 pixels than of 2 on the
    # selection cohorts
    "shifts:4": lambda x: _shifts(x, 4),
    # 2D only; see _scales. "dihedral+scales": the 8 rotations and flips of each of the three sizes
    "scales": _scales,
    "dihedral+scales": lambda x: [v for scaled in _scales(x) for v in _dihedral(scaled)],
}


def check_views(views: str | None, where: str = "") -> str:
    """The views' name ("none" for None); WeightsError naming `where` if unknown."""
    views = views or "none"
    if views not in TEST_TIME_VIEWS:
        raise WeightsError(f"{where + ': ' if where else ''}unknown test_time_views {views!r} "
                           f"(known: {', '.join(TEST_TIME_VIEWS)})")
    return views


def card_version(stem: str, views: str | None) -> str:
    """A card's version: `stem` plus "+<views>" when the card has test-time views. The views change every
    embedding, and stored embeddings are compared only within one model version (tests/test_registry.py)."""
    return stem + (f"+{views}" if views and views != "none" else "")


def embed_views(net: nn.Module, x: torch.Tensor, views: str | None = None) -> torch.Tensor:
    """net(x), or the L2-normalized mean of net over the named test-time views of x (TEST_TIME_VIEWS)."""
    views = check_views(views)
    if views == "none":
        return net(x)
    return F.normalize(torch.stack([net(v) for v in TEST_TIME_VIEWS[views](x)]).mean(0), dim=1)


def read_card(folder: Path) -> tuple[dict, Path] | None:
    """(card, model path) for a weights folder, None if it holds neither file."""
    model, card = folder / "model.pt", folder / "card.json"
    if not model.exists() and not card.exists():
        return None
    if not (model.exists() and card.exists()):
        missing = card if model.exists() else model
        raise WeightsError(f"{folder}: {missing.name} is missing (a weights folder needs model.pt and card.json)")
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise WeightsError(f"{card}: not readable JSON ({error})") from None
    expected = data.get("sha256")
    if expected and sha256_file(model) != expected:
        raise WeightsError(f"{model}: sha256 differs from card.json (corrupt or replaced file)")
    return data, model


def load_state(model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as error:  # noqa: BLE001 - wrong architecture, truncated file, pickle refused
        raise WeightsError(f"{path}: cannot load weights ({error})") from None


def seeded(build, seed: int):
    """Build a module with a fixed seed without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@dataclass
class IdentityModel:
    route: str
    net: nn.Module                    # EmbeddingNet or BackboneNet
    name: str
    version: str
    device: torch.device
    card: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.net.out_dim

    @property
    def views(self) -> str | None:
        """The card's test-time views (TEST_TIME_VIEWS), None for a single pass."""
        return self.card.get("test_time_views")

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """(N, C, *spatial) -> (N, dim) float32, each row L2-normalized."""
        x = batch.as_tensor() if hasattr(batch, "as_tensor") else batch
        out = embed_views(self.net, x.to(self.device, torch.float32, non_blocking=True), self.views)
        return out.float().cpu().numpy()


def load_identity_model(route: str, weights_dir: Path | None, device: torch.device, seed: int = 0) -> IdentityModel:
    found = read_card(Path(weights_dir) / route) if weights_dir else None
    if found is None:
        spec = DEFAULT_SPECS[route]
        net = seeded(lambda: EmbeddingNet(spec), seed)
        name, version, card = spec.name(route), f"untrained-seed{seed}", {}
    else:
        card, model_path = found
        where = str(model_path.parent / "card.json")
        try:
            if is_fused(card):          # several trained networks behind one card (FusedNet below)
                net = build_fused(card, route)
                spec = None
            else:                       # a trained backbone's weights are all in model.pt: no ImageNet file read
                spec = spec_from_arch(card.get("arch"), DEFAULT_SPECS[route])
                net = build_net(spec)
        except WeightsError as error:
            raise WeightsError(f"{where}: {error}") from None
        check_definition_version(card, where)
        load_state(net, model_path)
        name, version = card.get("name") or (spec or DEFAULT_SPECS[route]).name(route), \
            str(card.get("version") or "unversioned")
        check_views(card.get("test_time_views"), where)
        log.info("route %s: loaded %s %s from %s", route, name, version, model_path)
    net.eval().to(device)
    return IdentityModel(route, net, name, version, device, card)


def spec_dict(spec: NetSpec) -> dict:
    """The `arch` entry of a card for this spec: a ResNet's fields as before backbones existed (the shipped
    cards' arch unchanged), a backbone network's without the ResNet's widths, layers and stem."""
    arch = asdict(spec)
    drop = ("widths", "layers", "stem_kernel") if spec.backbone else ("backbone", "gem_p")
    return {k: v for k, v in arch.items() if k not in drop}


# ---------------------------------------------------------------- fused models

FUSION_KEY = "fusion"


class FusedNet(nn.Module):
    """Members' weighted, concatenated embeddings (see the module docstring)."""

    def __init__(self, members: list[nn.Module], sizes: list[int], views: list[str | None],
                 weights: list[float]) -> None:
        super().__init__()
        if not (len(members) == len(sizes) == len(views) == len(weights) >= 2):
            raise ValueError("a fused model needs two or more members, each with a size, views and a weight")
        if min(weights) <= 0:
            raise ValueError("member weights must be positive")
        total = sum(weights)
        self.members = nn.ModuleList(members)
        self.sizes, self.views = list(sizes), list(views)
        self.scales = [math.sqrt(w / total) for w in weights]
        self.out_dim = sum(m.out_dim for m in members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError("fused models take 2D images (N, C, H, W)")
        out = []
        for net, size, views, scale in zip(self.members, self.sizes, self.views, self.scales):
            xi = x if tuple(x.shape[-2:]) == (size, size) else \
                F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out.append(scale * embed_views(net, xi, views))
        return torch.cat(out, dim=1)


def is_fused(card: dict | None) -> bool:
    return bool(card) and FUSION_KEY in (card.get("arch") or {})


def build_fused(card: dict, route: str) -> FusedNet:
    """The (untrained) FusedNet of a fused card; load_state fills in the weights."""
    members = card["arch"][FUSION_KEY]
    nets = [build_net(spec_from_arch(m["arch"], DEFAULT_SPECS[route])) for m in members]
    return FusedNet(nets, [int(m["size"]) for m in members],
                    [check_views(m.get("test_time_views"), "fused member") for m in members],
                    [float(m["weight"]) for m in members])
