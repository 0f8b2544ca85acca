"""MONAI random augmentations per route, applied to normalized network inputs in [0, 1].

* chest_xr: affine (rotation, shift, scale, shear), contrast gamma, blur, noise, coarse
  dropout (arrows and labels on figures); no flips (the heart is on the left);
* fundus: small rotation/shift/zoom (fixation and field), colour jitter per channel (camera
  colour balance), gamma, blur (focus), noise; no flips (they would turn a right eye into a left);
* dermoscopy: any rotation and flips (the dermoscope has no orientation), zoom, colour jitter,
  gamma, blur, noise;
* chest_ct, brain_mr: small 3D affine (patient position), intensity shift and scale, noise.
"""

from __future__ import annotations

import math


def augmentations(route: str, geometry: dict, seed: int):
    """A MONAI Compose of random transforms for one (C, *spatial) input; seeded."""
    from monai.transforms import (Compose, RandAdjustContrast, RandAffine, RandCoarseDropout, RandFlip,
                                  RandGaussianNoise, RandGaussianSmooth, RandRotate90, RandScaleIntensity,
                                  RandShiftIntensity)
    if "shape" in geometry:                                   # volumes
        shape = geometry["shape"]
        steps = [
            RandAffine(prob=0.8, rotate_range=(0.08, 0.08, 0.08), translate_range=[0.04 * s for s in shape],
                       scale_range=(0.06, 0.06, 0.06), padding_mode="zeros"),
            RandShiftIntensity(offsets=0.05, prob=0.5),
            RandScaleIntensity(factors=0.1, prob=0.5),
            RandGaussianNoise(prob=0.3, std=0.02),
        ]
    else:
        size = geometry["size"]
        if route == "chest_xr":
            steps = [
                RandAffine(prob=0.9, rotate_range=(0.15,), translate_range=(0.08 * size, 0.08 * size),
                           scale_range=(0.12, 0.12), shear_range=(0.05, 0.05), padding_mode="zeros"),
                RandAdjustContrast(prob=0.5, gamma=(0.7, 1.4)),
                RandGaussianSmooth(prob=0.2, sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0)),
                RandGaussianNoise(prob=0.3, std=0.03),
                RandCoarseDropout(holes=2, spatial_size=max(2, size // 12), fill_value=1.0, prob=0.2),
            ]
        else:
            derm = route == "dermoscopy"
            steps = [
                RandAffine(prob=0.9, rotate_range=(math.pi if derm else 0.2,),
                           translate_range=(0.06 * size, 0.06 * size), scale_range=(0.15, 0.15),
                           padding_mode="zeros"),
                RandScaleIntensity(factors=0.15, prob=0.7, channel_wise=True),
                RandShiftIntensity(offsets=0.05, prob=0.5, channel_wise=True),
                RandAdjustContrast(prob=0.4, gamma=(0.75, 1.35)),
                RandGaussianSmooth(prob=0.2, sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0)),
                RandGaussianNoise(prob=0.3, std=0.02),
            ]
            if derm:
                steps += [RandFlip(prob=0.5, spatial_axis=0), RandRotate90(prob=0.5)]
    chain = Compose(steps)
    chain.set_random_state(seed)
    return chain


def describe(route: str, geometry: dict) -> str:
    names = [type(t).__name__ for t in augmentations(route, geometry, 0).transforms]
    return "MONAI " + ", ".join(names)
