"""Images that are not anatomy give no identity evidence: blank frames, noise, test patterns.

An identity network maps any input to some point of its sphere, and inputs with no anatomy
land close together: every pair of random-noise QA series would look like one person. So a
series is checked before it is embedded, on the pixels the loader gives (`models.inference.loading`),
and one that fails is stored, routed and listed, but not embedded or linked (its route
decision says why). Three measures of each plane (a 2D image; a few central slices of a volume):

* blank: 98 % of the pixels or more share one value (p1 == p99).
* noise: neighbouring pixels hardly correlate (lag-1 correlation along rows and columns below
  MIN_NEIGHBOUR_CORRELATION; radiographs, CT slices and photographs are above 0.8, white noise
  near 0).
* pattern: a handful of grey levels cover nearly the whole plane (bars, grids, step wedges).

Written here because no imaging library offers such a check; it is three numpy statistics.
A series fails when most of its checked planes do. Phantoms and other anatomy-like objects
pass this gate; see docs/accuracy.md, known limits.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

MIN_NEIGHBOUR_CORRELATION = 0.5
PATTERN_LEVELS = 8             # this many most frequent values ...
PATTERN_SHARE = 0.95           # ... covering this share of the plane: a test pattern
MAX_SIDE = 512                 # planes are measured on a central crop at most this big
VOLUME_SLICES = 5


def planes(kind: str, images: list) -> list[np.ndarray]:
    """2D float arrays to measure: each 2D image (channels averaged), or central slices of a volume."""
    out = []
    for image in images:
        if kind == "volume":           # only the picked slices are copied out of the volume
            depth = image.shape[-1]
            picks = sorted({int(round(k)) for k in np.linspace(depth * 0.3, depth * 0.7 - 1, VOLUME_SLICES)})
            out += [np.asarray(image[0, ..., k], dtype=np.float32) for k in picks if 0 <= k < depth]
        else:
            array = np.asarray(image, dtype=np.float32)
            out.append(array.mean(axis=0) if array.ndim == 3 else array)
    return [_central_crop(p) for p in out if p.ndim == 2 and min(p.shape) >= 4]


def plane_problem(plane: np.ndarray) -> str | None:
    """'blank', 'noise', 'pattern' or None (looks like an image of something)."""
    values = plane[np.isfinite(plane)]
    if values.size < 16:
        return "blank"
    low, high = np.percentile(values, [1, 99])
    if high <= low:
        return "blank"
    # 4,096 grey levels between p1 and p99, the tails (2 % at most) in one bin each: a histogram,
    # linear in the pixels (a sort of them, np.unique, was most of the check's time)
    levels = np.clip(np.rint((values - low) / (high - low) * 4095), -1, 4096).astype(np.int32) + 1
    counts = np.bincount(levels, minlength=4098)
    if np.partition(counts, -PATTERN_LEVELS)[-PATTERN_LEVELS:].sum() >= PATTERN_SHARE * values.size:
        return "pattern"
    if neighbour_correlation(np.nan_to_num(plane, nan=float(low))) < MIN_NEIGHBOUR_CORRELATION:
        return "noise"
    return None


def neighbour_correlation(plane: np.ndarray) -> float:
    """Mean of the lag-1 correlations along rows and along columns."""
    out = []
    for a, b in ((plane[:, :-1], plane[:, 1:]), (plane[:-1, :], plane[1:, :])):
        a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
        denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
        out.append(float((a * b).sum()) / denominator if denominator > 0 else 0.0)
    return float(np.mean(out))


def series_problem(kind: str, images: list) -> str | None:
    """Why this series is not anatomy (the commonest problem of most of its planes), or None."""
    found = [plane_problem(p) for p in planes(kind, images)]
    bad = [f for f in found if f]
    if not found or len(bad) * 2 <= len(found):
        return None
    reason, n = Counter(bad).most_common(1)[0]
    return f"{reason} ({n} of {len(found)} planes)"


def _central_crop(plane: np.ndarray) -> np.ndarray:
    h, w = plane.shape
    top, left = max((h - MAX_SIDE) // 2, 0), max((w - MAX_SIDE) // 2, 0)
    return plane[top:top + MAX_SIDE, left:left + MAX_SIDE]
