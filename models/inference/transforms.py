"""Per-route normalization, declared in one place as MONAI transform chains.

`build_route_transforms(enhance, geometry)` returns {route: Compose}; `ROUTE_TRANSFORMS` is the
default (no enhancement, default geometry). Each chain takes what `models.inference.loading` produced for one image
(a volume (1, X, Y, Z) in modality units with an RAS affine, or a 2D image (C, H, W) in
[0, 1]) and returns the network input of `ROUTE_INPUTS[route]`:

=============  =========================================================================
chest_xr       gray 1 channel; aspect-preserving resize (area) to 224 on the long side,
               0.5-99.5 percentile scaling to [0, 1], zero pad to 224 x 224
chest_ct       OrientRAS, resample to 3 x 3 x 5 mm (trilinear), HU window -1000..400 to
               [0, 1], crop/pad (air) to 128 x 128 x 64 (384 x 384 x 320 mm)
brain_mr       OrientRAS, resample to 2 x 2 x 2.5 mm, 1-99 percentile scaling (MR has no
               absolute units), crop/pad to 96 x 112 x 64 (192 x 224 x 160 mm)
fundus         RGB 3 channels; resize to 224 on the long side, pad to 224 x 224
dermoscopy     as fundus
other          percentile scaling only; "other" is routed but never embedded
=============  =========================================================================

These sizes are the defaults. A trained model's card may declare its own input geometry
(``"input": {"size": 128}`` for a 2D route, ``{"shape": [64, 64, 32], "spacing": [6, 6, 10]}``
for a volume route: voxels and mm per voxel); the pipeline then builds that route's chain
with it (`route_geometry`, `route_chain`), so small CPU-trained models run at their own size.

The enhancement steps of the modular paper are transforms that settings switch on per
route (`pipeline.enhance = {chest_xr = ["clahe"]}`), appended after the intensity
scaling in the order given, so their effect can be measured instead of assumed:
``clahe`` (contrast-limited adaptive histogram equalization, `CLAHE` below; per axial
slice for volumes, on luminance for colour), ``denoise`` (MONAI `GaussianSmooth`, sigma 1
voxel) and ``edges`` (Sobel magnitude from MONAI `SobelGradients` blended into the image,
channel count unchanged so the networks do not change).

`router_thumbnail(series)` is the route-agnostic input of the router (same code in
training and at run time): 3 x 64 x 64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (Compose, GaussianSmooth, Resize, ResizeWithPadOrCrop, ScaleIntensityRange, SobelGradients,
                              Transform, Zoom)
from monai.utils import convert_to_dst_type

ROUTES = ("chest_xr", "chest_ct", "brain_mr", "fundus", "dermoscopy", "other")
ENHANCEMENTS = ("clahe", "denoise", "edges")

# Network input per route: channels, spatial shape, and which loaded kinds can take the route.
ROUTE_INPUTS = {
    "chest_xr": {"channels": 1, "shape": (224, 224), "kinds": ("gray", "rgb")},
    "chest_ct": {"channels": 1, "shape": (128, 128, 64), "spacing": (3.0, 3.0, 5.0), "kinds": ("volume",)},
    "brain_mr": {"channels": 1, "shape": (96, 112, 64), "spacing": (2.0, 2.0, 2.5), "kinds": ("volume",)},
    "fundus": {"channels": 3, "shape": (224, 224), "kinds": ("rgb", "gray")},
    "dermoscopy": {"channels": 3, "shape": (224, 224), "kinds": ("rgb", "gray")},
    "other": {"channels": None, "shape": None, "kinds": ("volume", "gray", "rgb")},
}
THUMBNAIL = 64


class OrientRAS(Transform):
    """Permute and flip voxel axes so that they run along +R, +A, +S, updating the affine.

    What MONAI's ``Orientation(axcodes="RAS")`` does; that transform needs nibabel, which
    the project does not ship, so the few lines are here. Oblique volumes get the
    nearest axis-aligned orientation (no resampling).
    """

    def __call__(self, img):
        affine = np.asarray(img.affine, dtype=np.float64)
        weights = np.abs(affine[:3, :3]).copy()
        world_of = [0, 0, 0]                        # array axis -> world axis, greedy on |cosine|
        for _ in range(3):
            w, j = np.unravel_index(np.argmax(weights), weights.shape)
            world_of[j] = int(w)
            weights[w, :], weights[:, j] = -1, -1
        perm = [world_of.index(w) for w in range(3)]
        data = img.as_tensor().permute(0, *(p + 1 for p in perm))
        new = affine.copy()
        new[:, :3] = affine[:, perm]
        flips = [k for k in range(3) if new[k, k] < 0]
        for k in flips:
            new[:3, 3] += new[:3, k] * (data.shape[k + 1] - 1)
            new[:3, k] *= -1
        if flips:
            data = data.flip([k + 1 for k in flips])
        meta = {key: value for key, value in img.meta.items() if key != "affine"}
        return MetaTensor(data.contiguous(), affine=torch.as_tensor(new), meta=meta)


class ResampleToSpacing(Transform):
    """Resample an axis-aligned (after OrientRAS) volume to `pixdim` mm with MONAI's Zoom.

    Same result as MONAI's ``Spacing`` up to rounding of the output size (spacing within
    0.5 voxel of `pixdim`), at an eighth of the cost on CPU: Zoom is one separable
    interpolation, Spacing builds and samples a dense 3D grid (50 vs 6 ms for 64x256x256).
    """

    def __init__(self, pixdim: Sequence[float], mode: str = "trilinear") -> None:
        # mode "auto": area averaging when every axis shrinks (no aliasing), else trilinear.
        self.pixdim = np.asarray(pixdim, dtype=np.float64)
        self.mode = mode

    def __call__(self, img):
        current = np.asarray(img.pixdim, dtype=np.float64)[: len(self.pixdim)]
        factors = tuple(float(f) for f in current / self.pixdim)
        if np.allclose(factors, 1.0, atol=1e-3):
            return img
        mode = self.mode
        if mode == "auto":
            mode = "area" if max(factors) <= 1.0 else "trilinear"
        align = None if mode in ("area", "nearest", "nearest-exact") else False
        return Zoom(zoom=factors, keep_size=False, mode=mode, align_corners=align)(img)


class PercentileScale(Transform):
    """Map the [lower, upper] percentiles to [0, 1] and clip (like MONAI's
    ScaleIntensityRangePercentiles); percentiles from numpy's partition on at most ~256k
    evenly strided voxels, 20x cheaper than torch.quantile on a whole volume."""

    def __init__(self, lower: float, upper: float, max_samples: int = 262_144) -> None:
        self.lower, self.upper, self.max_samples = lower, upper, max_samples

    def __call__(self, img):
        flat = img.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // self.max_samples)].cpu().numpy()
        lo, hi = np.percentile(sample, [self.lower, self.upper])
        if hi - lo < 1e-6:
            return img * 0.0
        return ((img - float(lo)) / float(hi - lo)).clamp(0.0, 1.0)


class ToChannels(Transform):
    """Gray <-> RGB: average the channels to 1, or repeat a single channel to 3."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, img):
        if img.shape[0] == self.channels:
            return img
        if self.channels == 1:
            return img.mean(dim=0, keepdim=True)
        if img.shape[0] == 1:
            return img.repeat(self.channels, *([1] * (img.ndim - 1)))
        raise ValueError(f"cannot make {self.channels} channels from {img.shape[0]}")


def clahe_2d(image: np.ndarray, tiles: int = 8, clip_limit: float = 0.01, bins: int = 256) -> np.ndarray:
    """CLAHE of a 2D array in [0, 1] (Zuiderveld 1994; clip_limit as in scikit-image).

    Histograms per tile clipped at clip_limit x tile pixels (at least 1 count per bin), the
    excess spread evenly, each tile's CDF a lookup table, bilinear interpolation between the
    tables of the four nearest tile centres.
    """
    h, w = image.shape
    th, tw = -(-h // tiles), -(-w // tiles)
    q = np.clip(np.rint(np.clip(image, 0, 1) * (bins - 1)), 0, bins - 1).astype(np.int64)
    padded = np.pad(q, ((0, th * tiles - h), (0, tw * tiles - w)), mode="reflect" if min(h, w) > 1 else "edge")
    blocks = padded.reshape(tiles, th, tiles, tw).transpose(0, 2, 1, 3).reshape(tiles * tiles, th * tw)
    offsets = (np.arange(tiles * tiles) * bins)[:, None]
    hist = np.bincount((blocks + offsets).ravel(), minlength=tiles * tiles * bins).reshape(tiles * tiles, bins)
    limit = max(clip_limit * th * tw, 1.0)
    excess = np.maximum(hist - limit, 0).sum(axis=1, keepdims=True)
    hist = np.minimum(hist, limit) + excess / bins
    lut = (np.cumsum(hist, axis=1) / hist.sum(axis=1, keepdims=True)).reshape(tiles, tiles, bins)

    def axis(n, t, size):
        f = (np.arange(n) + 0.5) / size - 0.5
        lo = np.clip(np.floor(f).astype(int), 0, t - 1)
        return lo, np.minimum(lo + 1, t - 1), np.clip(f - lo, 0, 1)

    y0, y1, wy = axis(h, tiles, th)
    x0, x1, wx = axis(w, tiles, tw)
    wy, wx = wy[:, None], wx[None, :]
    y0, y1, x0, x1 = y0[:, None], y1[:, None], x0[None, :], x1[None, :]
    top = (1 - wx) * lut[y0, x0, q] + wx * lut[y0, x1, q]
    bottom = (1 - wx) * lut[y1, x0, q] + wx * lut[y1, x1, q]
    return ((1 - wy) * top + wy * bottom).astype(np.float32)


class CLAHE(Transform):
    """CLAHE on images in [0, 1]: per channel for gray, on luminance for RGB, per axial slice in 3D."""

    def __init__(self, tiles: int = 8, clip_limit: float = 0.01) -> None:
        self.tiles, self.clip_limit = tiles, clip_limit

    def _plane(self, plane: np.ndarray) -> np.ndarray:
        return clahe_2d(plane, self.tiles, self.clip_limit)

    def __call__(self, img):
        arr = np.asarray(img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else img, dtype=np.float32)
        if arr.shape[0] == 3:   # colour: equalize luminance, keep the hue
            lum = arr.mean(axis=0)
            gain = self._apply(lum[None])[0] / np.maximum(lum, 1e-3)
            out = np.clip(arr * gain[None], 0, 1)
        else:
            out = self._apply(arr)
        return convert_to_dst_type(out, img)[0]

    def _apply(self, arr: np.ndarray) -> np.ndarray:
        out = np.empty_like(arr)
        for c in range(arr.shape[0]):
            if arr.ndim == 3:
                out[c] = self._plane(arr[c])
            else:
                for z in range(arr.shape[-1]):
                    out[c, ..., z] = self._plane(arr[c, ..., z])
        return out


class EdgeOverlay(Transform):
    """Blend the Sobel gradient magnitude (MONAI SobelGradients) into the image."""

    def __init__(self, weight: float = 0.5) -> None:
        self.weight = weight
        self.sobel = SobelGradients(kernel_size=3)

    def __call__(self, img):
        lum = img.mean(dim=0, keepdim=True).as_tensor() if hasattr(img, "as_tensor") else img.mean(0, keepdim=True)
        grads = self.sobel(lum)
        magnitude = torch.sqrt((grads ** 2).sum(dim=0, keepdim=True))
        scale = torch.quantile(magnitude.flatten()[:: max(1, magnitude.numel() // 100_000)], 0.99)
        edges = (magnitude / scale.clamp_min(1e-6)).clamp(0, 1)
        return (1 - self.weight) * img + self.weight * edges


def enhancement(name: str) -> Transform:
    if name == "clahe":
        return CLAHE()
    if name == "denoise":
        return GaussianSmooth(sigma=1.0)
    if name == "edges":
        return EdgeOverlay()
    raise ValueError(f"unknown enhancement {name!r} (choose from {', '.join(ENHANCEMENTS)})")


def _image_2d(channels: int, size: int, percentiles: tuple[float, float] | None) -> list:
    steps = [ToChannels(channels), Resize(spatial_size=size, size_mode="longest", mode="area")]
    if percentiles:
        steps.append(PercentileScale(*percentiles))
    steps.append(ResizeWithPadOrCrop((size, size)))
    return steps


def _volume(pixdim, shape, intensity) -> list:
    return [ToChannels(1), OrientRAS(),
            ResampleToSpacing(pixdim), intensity,
            ResizeWithPadOrCrop(shape)]


def route_geometry(route: str, geometry: Mapping | None = None) -> dict:
    """The input geometry of a route: {"size": S} for 2D routes (S x S pixels), {"shape": [X, Y, Z],
    "spacing": [mm, mm, mm]} for volume routes. `geometry` (a model card's "input") overrides the
    defaults of ROUTE_INPUTS; keys it does not give keep their defaults."""
    info = ROUTE_INPUTS[route]
    geometry = dict(geometry or {})
    shape = info.get("shape")
    if shape is None:
        return {}
    if len(shape) == 2:
        size = int(geometry.get("size") or shape[0])
        if size < 8:
            raise ValueError(f"route {route}: input size {size} is too small")
        return {"size": size}
    out_shape = [int(v) for v in (geometry.get("shape") or shape)]
    spacing = [float(v) for v in (geometry.get("spacing") or info["spacing"])]
    if len(out_shape) != 3 or len(spacing) != 3 or min(out_shape) < 4 or min(spacing) <= 0:
        raise ValueError(f"route {route}: bad volume geometry shape={out_shape} spacing={spacing}")
    return {"shape": out_shape, "spacing": spacing}


def route_chain(route: str, geometry: Mapping | None = None, enhance: Sequence[str] = ()) -> Compose:
    """The normalization chain of one route at `geometry` (route_geometry), enhancement steps appended."""
    g = route_geometry(route, geometry)
    if route == "chest_xr":
        steps = _image_2d(1, g["size"], (0.5, 99.5))
    elif route == "chest_ct":
        steps = _volume(g["spacing"], g["shape"], ScaleIntensityRange(-1000.0, 400.0, 0.0, 1.0, clip=True))
    elif route == "brain_mr":
        steps = _volume(g["spacing"], g["shape"], PercentileScale(1.0, 99.0))
    elif route in ("fundus", "dermoscopy"):
        steps = _image_2d(3, g["size"], None)
    elif route == "other":
        steps = [PercentileScale(1.0, 99.0)]
    else:
        raise ValueError(f"unknown route {route!r}")
    return Compose(steps + [enhancement(n) for n in enhance])


def build_route_transforms(enhance: Mapping[str, Sequence[str]] | None = None,
                           geometry: Mapping[str, Mapping | None] | None = None) -> dict[str, Compose]:
    """{route: Compose}; `enhance` maps a route to enhancement steps appended in order, `geometry`
    a route to its input geometry (the "input" of the route's model card; default ROUTE_INPUTS)."""
    enhance = dict(enhance or {})
    geometry = dict(geometry or {})
    unknown = (set(enhance) | set(geometry)) - set(ROUTES)
    if unknown:
        raise ValueError(f"enhancement or geometry for unknown route(s) {', '.join(sorted(unknown))}")
    return {route: route_chain(route, geometry.get(route), enhance.get(route, ())) for route in ROUTES}


ROUTE_TRANSFORMS = build_route_transforms()

_thumb_scale = PercentileScale(1.0, 99.0)
_thumb_orient = OrientRAS()


def router_thumbnail(series) -> torch.Tensor:
    """Route-agnostic 3 x 64 x 64 input of the router for a `LoadedSeries`.

    Volumes: RAS, isotropic resampling so the longest physical side spans 64 voxels (padded
    with the minimum); channels = central axial slice, coronal MIP, sagittal MIP, each scaled by its
    own 1-99 percentiles.
    Gray 2D: percentile scaling, aspect-preserving resize, replicated to 3 channels.
    RGB 2D: resized as is. Multi-image series use their first image.
    """
    img = series.image
    n = THUMBNAIL
    if series.kind == "volume":
        vol = _thumb_orient(img)
        extent = np.asarray(vol.shape[1:]) * np.asarray(vol.pixdim, dtype=float)
        vol = ResampleToSpacing([float(extent.max()) / n] * 3, mode="auto")(vol)
        vol = ResizeWithPadOrCrop((n, n, n), mode="constant", value=float(vol.min()))(vol).as_tensor()[0]
        channels = [vol[:, :, n // 2], vol.amax(dim=1), vol.amax(dim=0)]
        return torch.stack([_thumb_scale(c) for c in channels]).float().contiguous()
    img = Resize(spatial_size=n, size_mode="longest", mode="area")(img)
    if series.kind == "gray":
        img = _thumb_scale(img)
    img = ResizeWithPadOrCrop((n, n))(img)
    img = img.as_tensor() if hasattr(img, "as_tensor") else img
    return ToChannels(3)(img).float().contiguous()
