"""Patients in a labelled set: a validation split by patient, and small procedural chest-like images
for smoke runs (`train --synthetic N`) and tests."""

from __future__ import annotations

import numpy as np


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


def split_patients(labels: list[str], val_fraction: float, seed: int,
                   keep: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(train indices, validation indices, validation patients): validation from patients with >= 2 images.

    `keep`: the validation patients of the model being fine-tuned (--init). Where some of them are
    in the data they are the validation split again, so the new run is scored only on persons its
    starting model never trained on; a fresh random split would take them from the starting
    model's training persons (39 of 98 chest CT validation persons would have been).
    """
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    multi = sorted(p for p, n in counts.items() if n >= 2)
    kept = sorted(set(keep or ()) & set(multi))
    if kept:
        val = set(kept)
    else:
        rng = np.random.default_rng(seed)
        rng.shuffle(multi)
        n_val = max(2, int(round(val_fraction * len(multi))))
        val = set(multi[:n_val])
    if len(multi) - len(val) < 2:
        raise ValueError(f"too few patients with two or more images ({len(multi)}) for a validation split")
    is_val = np.array([lab in val for lab in labels])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val), sorted(val)
