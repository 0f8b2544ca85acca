"""The router's training examples: series of synthetic cohorts, "other" content (pydicom's test
images, synthetic non-matching images and volumes) and real labelled pictures, each thumbnailed
exactly as at run time (models.inference.transforms.router_thumbnail). Used by models.training.router
and by benchmarks/router_real.py (`picture_thumbnail`, `real_holdout`)."""

from __future__ import annotations

import json
import logging
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from PIL import Image
from scipy import ndimage

from models.inference.errors import SeriesError
from models.inference.loading import LoadedSeries, load_series
from models.inference.transforms import ROUTE_INPUTS, router_thumbnail

SYNTH_ROUTES = {"cxr": "chest_xr", "ct": "chest_ct", "mr": "brain_mr", "fundus": "fundus", "derm": "dermoscopy"}
log = logging.getLogger("models.training.router_data")


def _series_images(series: LoadedSeries) -> list[LoadedSeries]:
    return [LoadedSeries(series.kind, [img], series.modality, series.body_part) for img in series.images]


def cohort_examples(seed: int, patients: int, preset: str, workdir: Path) -> tuple[list, list, list]:
    """Thumbnails, labels and, for the 'slice as 2D image' others, mid-slices of the volumes."""
    from synth.cohort import generate
    from synth.plan import PRESETS, SynthConfig

    out = workdir / f"cohort-{preset}-{seed}"
    generate(SynthConfig(seed=seed, patients=patients, visits=2, error_rate=0.0, **PRESETS[preset]), out, jobs=2)
    truth = json.loads((out / "truth.json").read_text())
    thumbs, labels, slices = [], [], []
    for study in truth["studies"]:
        for se in study["series"]:
            series = load_series(sorted((out / se["path"]).glob("*.dcm")))
            for one in _series_images(series):
                thumbs.append(router_thumbnail(one))
                labels.append(SYNTH_ROUTES[study["modality"]])
            if series.kind == "volume":
                vol = series.image[0]
                plane = vol[:, :, vol.shape[2] // 2].T.numpy()
                slices.append(_gray_series(_scale(plane)))
    return thumbs, labels, slices


def _scale(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, [1, 99])
    return np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def _gray_series(img: np.ndarray) -> LoadedSeries:
    return LoadedSeries("gray", [MetaTensor(torch.from_numpy(np.ascontiguousarray(img, np.float32))[None])])


def _rgb_series(img: np.ndarray) -> LoadedSeries:
    arr = np.ascontiguousarray(np.clip(img, 0, 1).transpose(2, 0, 1), np.float32)
    return LoadedSeries("rgb", [MetaTensor(torch.from_numpy(arr))])


def _volume_series(vol: np.ndarray, spacing) -> LoadedSeries:
    affine = torch.as_tensor(np.diag([*spacing, 1.0]))
    return LoadedSeries("volume", [MetaTensor(torch.from_numpy(vol.astype(np.float32))[None], affine=affine)])


def _segments(shape, segs, width) -> np.ndarray:
    """Soft mask of thick line segments [(y0, x0, y1, x1)] in relative coordinates."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    yy, xx = yy / shape[0], xx / shape[1]
    out = np.zeros(shape)
    for y0, x0, y1, x1 in segs:
        d = np.array([y1 - y0, x1 - x0])
        t = np.clip(((yy - y0) * d[0] + (xx - x0) * d[1]) / max(d @ d, 1e-9), 0, 1)
        dist = np.hypot(yy - (y0 + t * d[0]), xx - (x0 + t * d[1]))
        out = np.maximum(out, np.clip(1.5 - dist / width, 0, 1))
    return out


def other_gray(rng: np.random.Generator, kind: int) -> np.ndarray:
    h, w = int(rng.integers(96, 320)), int(rng.integers(96, 320))
    noise = ndimage.gaussian_filter(rng.standard_normal((h, w)), rng.uniform(1, 8))
    if kind == 0:       # extremity radiograph: bones in soft tissue
        segs = []
        for _ in range(int(rng.integers(1, 6))):
            y0, x0 = rng.uniform(0.05, 0.5), rng.uniform(0.2, 0.8)
            segs.append((y0, x0, y0 + rng.uniform(0.2, 0.5), x0 + rng.uniform(-0.2, 0.2)))
        img = 0.1 + 0.3 * _segments((h, w), segs, rng.uniform(0.05, 0.09)) + 0.5 * _segments((h, w), segs, 0.02)
    elif kind == 1:     # spine / abdomen AP: broad body, vertebral column, no lungs
        yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
        body = np.clip(1.2 - np.abs(xx - 0.5) / rng.uniform(0.3, 0.45), 0, 1)
        spine = (np.abs(xx - 0.5) < 0.06) * (0.6 + 0.4 * (np.sin(yy * rng.uniform(30, 60)) > -0.3))
        img = 0.1 + 0.4 * body + 0.4 * spine
    elif kind == 2:     # smooth noise / gradients
        img = noise + rng.uniform(-2, 2) * np.linspace(0, 1, w)[None]
    elif kind == 3:     # scanned document
        img = np.full((h, w), 0.95)
        for y in range(int(rng.integers(5, 15))):
            top = int(h * rng.uniform(0.05, 0.95))
            img[top:top + max(1, h // 80), int(w * 0.1):int(w * rng.uniform(0.3, 0.9))] = 0.1
    elif kind == 4:     # ultrasound fan with speckle
        yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
        r, a = np.hypot(yy, xx - 0.5), np.arctan2(xx - 0.5, yy + 1e-6)
        fan = (r < rng.uniform(0.7, 1.0)) & (np.abs(a) < rng.uniform(0.4, 0.8))
        img = fan * np.abs(rng.standard_normal((h, w))) * (0.3 + 0.3 * (noise > 0))
    else:               # mammography-like: one breast against black
        yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
        breast = ((yy - 0.5) / 0.45) ** 2 + (xx / rng.uniform(0.5, 0.8)) ** 2 < 1
        img = breast * (0.4 + 0.1 * noise)
    return _scale(img + 0.02 * rng.standard_normal((h, w)))


def other_rgb(rng: np.random.Generator, kind: int) -> np.ndarray:
    h, w = int(rng.integers(96, 320)), int(rng.integers(96, 320))
    if kind == 0:       # scene of coloured shapes
        img = np.ones((h, w, 3)) * rng.uniform(0, 1, 3)
        yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
        for _ in range(int(rng.integers(3, 12))):
            cy, cx, ry, rx = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.4)
            img[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = rng.uniform(0, 1, 3)
    elif kind == 1:     # smooth colour noise
        img = np.stack([ndimage.gaussian_filter(rng.standard_normal((h, w)), rng.uniform(2, 20)) for _ in range(3)], -1)
        img = (img - img.min()) / max(np.ptp(img), 1e-6)
    elif kind == 2:     # photographed document
        img = np.ones((h, w, 3)) * rng.uniform(0.8, 1.0, 3)
        for _ in range(int(rng.integers(5, 15))):
            top = int(h * rng.uniform(0.05, 0.95))
            img[top:top + max(1, h // 80), int(w * 0.1):int(w * rng.uniform(0.3, 0.9))] = rng.uniform(0, 0.3, 3)
    else:               # gray radiograph-like content shown as colour screenshot
        img = np.repeat(other_gray(rng, int(rng.integers(0, 6)))[:, :, None], 3, -1)
        img = np.pad(img, ((h // 10, h // 10), (w // 10, w // 10), (0, 0)))
    return img + 0.02 * rng.standard_normal(img.shape)


def other_volume(rng: np.random.Generator, kind: int) -> LoadedSeries:
    shape = (int(rng.integers(48, 128)), int(rng.integers(48, 128)), int(rng.integers(12, 64)))
    spacing = (rng.uniform(0.6, 4), rng.uniform(0.6, 4), rng.uniform(1, 8))
    zz = np.linspace(-1, 1, shape[2])[None, None, :]
    xx, yy = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    xx, yy = xx[:, :, None], yy[:, :, None]
    if kind == 0:       # abdomen: soft tissue, organs, spine, no lungs
        vol = np.where((xx / 0.9) ** 2 + (yy / 0.7) ** 2 < 1, 40.0, -1000.0) + 0 * zz
        for _ in range(4):
            cx, cy, r = rng.uniform(-0.5, 0.5), rng.uniform(-0.4, 0.3), rng.uniform(0.1, 0.3)
            vol = np.where((xx - cx) ** 2 + (yy - cy) ** 2 + (zz * 0.5) ** 2 < r ** 2, rng.uniform(20, 200), vol)
        vol = np.where(xx ** 2 + (yy - 0.5) ** 2 < 0.01, 700.0, vol)
    elif kind == 1:     # legs: two cylinders with bone
        vol = np.full(shape, -1000.0)
        for cx in (-0.45, 0.45):
            vol = np.where((xx - cx) ** 2 + yy ** 2 < 0.12, 40.0, vol)
            vol = np.where((xx - cx) ** 2 + yy ** 2 < 0.01, 900.0, vol)
    elif kind == 2:     # noise
        vol = ndimage.gaussian_filter(rng.standard_normal(shape), rng.uniform(1, 4)) * 300
    else:               # QA phantom: cylinder with inserts
        vol = np.where(xx ** 2 + yy ** 2 < 0.8, 0.0, -1000.0) + 0 * zz
        for k in range(6):
            a = 2 * np.pi * k / 6
            vol = np.where((xx - 0.5 * np.cos(a)) ** 2 + (yy - 0.5 * np.sin(a)) ** 2 < 0.01, (k - 3) * 300.0, vol)
    vol = vol + rng.normal(0, 10, shape)
    return _volume_series(vol, spacing)


def synthetic_others(seed: int, n: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        choice = k % 3
        if choice == 0:
            out.append(router_thumbnail(_gray_series(other_gray(rng, int(rng.integers(0, 6))))))
        elif choice == 1:
            out.append(router_thumbnail(_rgb_series(other_rgb(rng, int(rng.integers(0, 4))))))
        else:
            out.append(router_thumbnail(other_volume(rng, int(rng.integers(0, 4)))))
    return out


def pydicom_others() -> tuple[list, list]:
    """Thumbnails of pydicom's bundled images, split by (modality, size) group: (train, held out)."""
    folder = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
    train, held = [], []
    for path in sorted(folder.glob("*.dcm")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                series = load_series([path])
        except SeriesError:
            continue
        img = series.image
        if min(img.shape[1:]) < 8:
            continue
        group = f"{series.modality}:{tuple(img.shape[1:])}"
        target = held if zlib.crc32(group.encode()) % 3 == 0 else train
        target.extend(router_thumbnail(one) for one in _series_images(series)[:4])
    return train, held


def real_holdout(patient_id: str) -> bool:
    """One real patient in five is held out of router training (stable: a hash of the ID)."""
    return zlib.crc32(patient_id.encode() + b"router") % 5 == 0


def picture_thumbnail(path: Path, rgb: bool) -> torch.Tensor:
    """The router thumbnail of a PNG/JPEG file, read as the pipeline reads its DICOM (values in [0, 1])."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB" if rgb else "L"), dtype=np.float32) / 255.0
    return router_thumbnail(_rgb_series(a) if rgb else _gray_series(a))


def real_examples(specs: list[str], classes, limit: int, exclude: frozenset = frozenset()) -> tuple:
    """Thumbnails of real labelled images: (train x, train labels, held-out x, held-out labels, info).

    Each spec is ROUTE=MANIFEST (columns image, relative to the manifest's folder or absolute, and
    patient_id). Patients are split by a hash of their ID (one in five held out), and at most
    `limit` images per manifest are used, patients taken in hash order so the choice is stable.
    Patients in `exclude` (an identity model's validation patients) are left out."""
    from models.datasets.examples import read_manifest

    train_x, train_y, held_x, held_y, info = [], [], [], [], []
    for spec in specs:
        route, _, manifest = spec.partition("=")
        if route not in classes or not manifest:
            raise ValueError(f"--real {spec!r}: expected ROUTE=MANIFEST with ROUTE one of {', '.join(classes)}")
        rows = [(path, pid) for path, pid in read_manifest(Path(manifest)) if pid not in exclude]
        rows.sort(key=lambda r: (zlib.crc32(r[1].encode()), str(r[0])))
        used = {"route": route, "manifest": manifest, "train": 0, "held_out": 0}
        rgb = ROUTE_INPUTS[route]["channels"] == 3
        for path, pid in rows[:limit]:
            thumb = picture_thumbnail(path, rgb)
            held = real_holdout(pid)
            (held_x if held else train_x).append(thumb)
            (held_y if held else train_y).append(route)
            used["held_out" if held else "train"] += 1
        info.append(used)
    return train_x, train_y, held_x, held_y, info
