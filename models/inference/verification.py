"""Geometric verification for the 2D routes: do two images show the same anatomy point for point?

An identity network compares global embeddings, and its misses are look-alikes: siblings in
the synthetic cohorts, radiographs of other adults of the same build. A second opinion that
looks at the images themselves separates many of them. For a pair of images:

1. SIFT keypoints of both (gray, long side `size` pixels, CLAHE-equalized), matched with
   Lowe's ratio test;
2. a transform fitted to the matches with RANSAC (the card's `transform`: a similarity, i.e.
   rotation, scale and shift, or an affine one, which also undoes an uneven stretch, or a
   homography); its inlier count is the first measure;
3. one image warped onto the other with that transform, and the normalized cross-correlation
   of the two high-passed images over their overlap is the second.

The pair's score is `cosine + weight_inliers * log(1 + inliers) + weight_ncc * ncc` (the
"bonus" is the part after the cosine); the weights are the model card's "verification" entry,
chosen on selection cohorts (docs/accuracy.md). The card's calibration is fitted on these
scores, so linkage reads the same likelihood ratio off them as `evaluate` measured.

OpenCV does the detection, matching, RANSAC and warping. Written here is only the score:
no library combines an embedding with a geometric check of the images.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from functools import partial

import numpy as np

log = logging.getLogger("models.inference.verification")


TRANSFORMS = ("similarity", "affine", "homography")


@dataclass(frozen=True)
class VerificationSettings:
    size: int = 512                  # long side of the compared images, pixels
    features: int = 1000             # SIFT keypoints per image at most
    highpass_sigma: float = 6.0      # Gaussian sigma (pixels at `size`) removed before the correlation
    ratio: float = 0.8               # Lowe's ratio test
    ransac_fraction: float = 0.02    # RANSAC reprojection threshold as a fraction of `size`
    min_overlap: float = 0.3         # less overlap after warping: no correlation (0)
    weight_inliers: float = 0.1
    weight_ncc: float = 0.3
    max_images: int = 2              # images of a series compared (the best pair counts)
    root_sift: bool = False          # match RootSIFT (Arandjelovic & Zisserman 2012): L1-normalized, square-rooted
    transform: str = "similarity"    # what RANSAC fits: "similarity" (turn, scale, shift), "affine" or "homography"
    refine_iterations: int = 0       # >0: the fitted transform refined by ECC (maximizes the correlation itself)

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown verification transform {self.transform!r}: one of {', '.join(TRANSFORMS)}")

    @classmethod
    def from_card(cls, card: dict | None) -> VerificationSettings | None:
        """The card's "verification" entry; None when the card has none. Unknown keys are an error."""
        entry = (card or {}).get("verification")
        if not entry:
            return None
        known = {f.name for f in fields(cls)}
        unknown = set(entry) - known - {"selected_on"}
        if unknown:
            raise ValueError(f"unknown verification settings {sorted(unknown)}")
        return cls(**{k: v for k, v in entry.items() if k in known})

    def to_json(self) -> dict:
        return asdict(self)

    def bonus(self, inliers: int, ncc: float) -> float:
        return float(weighted_bonus(inliers, ncc, self.weight_inliers, self.weight_ncc))


def weighted_bonus(inliers, ncc, weight_inliers: float, weight_ncc: float):
    """The bonus formula, for one pair or arrays of them."""
    return weight_inliers * np.log1p(inliers) + weight_ncc * ncc


@dataclass
class ImageFeatures:
    points: np.ndarray               # (K, 2) keypoint positions, float32
    descriptors: np.ndarray | None   # (K, 128) SIFT descriptors, uint8 (None: no keypoints)
    highpass: np.ndarray             # (H, W) float32, the equalized image minus its Gaussian blur


def _cv2():
    import cv2
    cv2.setNumThreads(1)             # pairs run in worker processes; nested threads only contend
    return cv2


def gray_uint8(image) -> np.ndarray:
    """A (C, H, W) or (H, W) image (tensor or array) as (H, W) uint8: channels averaged, stretched to 0-255
    (SIFT's contrast threshold is absolute, so a dim image would give few keypoints)."""
    a = image.as_tensor() if hasattr(image, "as_tensor") else image
    a = np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, dtype=np.float32)
    if a.ndim == 3:
        a = a.mean(axis=0)
    if a.ndim != 2:
        raise ValueError(f"verification compares 2D images, got shape {a.shape}")
    low, high = float(a.min()), float(a.max())
    return np.rint(255 * (a - low) / max(high - low, 1e-6)).astype(np.uint8)


@dataclass
class KeptFeatures:
    """What is worth keeping of one image (models/inference/verification_files.py writes it to disk): the rest of
    ImageFeatures follows from it in a few milliseconds, while reading the series and SIFT take ~0.1 s."""
    equalized: np.ndarray            # (H, W) uint8, long side `size`, CLAHE-equalized
    points: np.ndarray               # (K, 2) float32
    descriptors: np.ndarray | None   # (K, 128) uint8 (None: no keypoints)


def describe(image, s: VerificationSettings) -> KeptFeatures:
    """Equalized image, keypoints and descriptors of one 2D image in [0, 1]."""
    cv2 = _cv2()
    gray = gray_uint8(image)
    h, w = gray.shape
    scale = s.size / max(h, w)
    resized = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    equalized = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(resized)
    keypoints, descriptors = cv2.SIFT_create(nfeatures=s.features).detectAndCompute(equalized, None)
    points = np.float32([k.pt for k in keypoints]).reshape(-1, 2)
    # OpenCV's SIFT descriptors are whole numbers 0-255 stored as float32: uint8 keeps them exactly in a
    # quarter of the memory (linkage caches the features of hundreds of series)
    compact = descriptors.astype(np.uint8) if descriptors is not None else None
    return KeptFeatures(equalized, points, compact)


def complete(kept: KeptFeatures, s: VerificationSettings) -> ImageFeatures:
    """The features `match` compares: the kept ones plus the high-passed image."""
    cv2 = _cv2()
    f = kept.equalized.astype(np.float32)
    return ImageFeatures(kept.points, kept.descriptors, f - cv2.GaussianBlur(f, (0, 0), s.highpass_sigma))


def prepare(image, s: VerificationSettings) -> ImageFeatures:
    """Keypoints, descriptors and the high-passed image of one 2D image in [0, 1]."""
    return complete(describe(image, s), s)


def match(a: ImageFeatures, b: ImageFeatures, s: VerificationSettings) -> tuple[int, float]:
    """(RANSAC inliers, correlation of the aligned high-passed images); (0, 0.0) when no transform is found."""
    cv2 = _cv2()
    if a.descriptors is None or b.descriptors is None or len(a.points) < 3 or len(b.points) < 3:
        return 0, 0.0
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(_matched(a.descriptors, s), _matched(b.descriptors, s), k=2)
    good = [m for m, n in (p for p in pairs if len(p) == 2) if m.distance < s.ratio * n.distance]
    if len(good) < 4:
        return 0, 0.0
    src = a.points[[m.queryIdx for m in good]]
    dst = b.points[[m.trainIdx for m in good]]
    transform, inliers = _fit(cv2, src, dst, s)
    if transform is None or inliers is None:
        return 0, 0.0
    count = int(inliers.sum())
    if s.refine_iterations:
        transform = _refined(cv2, a.highpass, b.highpass, transform, s.refine_iterations)
    h, w = b.highpass.shape
    warp = cv2.warpPerspective if transform.shape == (3, 3) else cv2.warpAffine
    warped = warp(a.highpass, transform, (w, h))
    overlap = warp(np.ones_like(a.highpass), transform, (w, h)) > 0.99
    if overlap.mean() < s.min_overlap:
        return count, 0.0
    x, y = warped[overlap], b.highpass[overlap]
    x, y = x - x.mean(), y - y.mean()
    return count, float((x * y).sum() / (math.sqrt(float((x * x).sum()) * float((y * y).sum())) + 1e-6))


def _fit(cv2, src: np.ndarray, dst: np.ndarray, s: VerificationSettings):
    """(transform, inlier mask) fitted with RANSAC: 2 x 3 for similarity and affine, 3 x 3 for a homography."""
    threshold = s.size * s.ransac_fraction
    if s.transform == "similarity":
        return cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=threshold)
    if s.transform == "affine":
        return cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=threshold)
    return cv2.findHomography(src, dst, cv2.RANSAC, threshold)


def _refined(cv2, moving: np.ndarray, fixed: np.ndarray, transform: np.ndarray, iterations: int) -> np.ndarray:
    """The transform after Evangelidis & Psarakis' ECC (OpenCV): RANSAC's fit is only as good as the matched
    keypoints, ECC moves it to a maximum of the correlation itself. Unchanged where ECC does not converge."""
    homography = transform.shape == (3, 3)
    try:
        inverse = np.linalg.inv(_homogeneous(transform))   # ECC's warp maps the fixed image's pixels into the moving one
    except np.linalg.LinAlgError:
        return transform
    warp = np.float32(inverse if homography else inverse[:2])
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, iterations, 1e-4)
    try:
        _, warp = cv2.findTransformECC(fixed, moving, warp, cv2.MOTION_HOMOGRAPHY if homography else cv2.MOTION_AFFINE,
                                       criteria, None, 1)
    except cv2.error:
        return transform
    refined = np.linalg.inv(_homogeneous(warp))
    return refined if homography else refined[:2]


def _homogeneous(transform: np.ndarray) -> np.ndarray:
    """A 2 x 3 affine transform as its 3 x 3 matrix (a homography is one already)."""
    return transform if transform.shape == (3, 3) else np.vstack([transform, [0.0, 0.0, 1.0]])


def _matched(descriptors: np.ndarray, s: VerificationSettings) -> np.ndarray:
    d = descriptors.astype(np.float32)
    if s.root_sift:             # Euclidean distance of RootSIFT = Hellinger distance of the SIFT histograms
        d = np.sqrt(d / (d.sum(axis=1, keepdims=True) + 1e-7))
    return d


def series_bonus(a: list[ImageFeatures], b: list[ImageFeatures], s: VerificationSettings) -> float:
    """The best bonus over the first `max_images` images of each series (0 when one has none)."""
    return float(bonus_from_matches(series_matches(a, b, s), s.weight_inliers, s.weight_ncc))


# ---------------------------------------------------------------- every pair of a scored set (evaluate)

_SHARED: tuple | None = None


def _row(i: int) -> list:
    features, score = _SHARED
    return [score(features[i], features[j]) for j in range(i + 1, len(features))]


def pairwise(features: list, score, workers: int | None = None, progress: bool = False) -> np.ndarray:
    """(N, N, ...) array of score(features[i], features[j]), mirrored, zero diagonal; rows in `workers`
    processes (default: the CPUs)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm import tqdm
    global _SHARED
    n = len(features)
    rows: list = []
    workers = max(1, workers or os.cpu_count() or 1)
    _SHARED = (features, score)      # inherited by forked workers; pickling 1 MB per image per task would dominate
    try:
        if workers > 1 and n > 2 and "fork" in _start_methods():
            with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
                rows = list(tqdm(pool.map(_row, range(n - 1), chunksize=4), total=n - 1, desc="verify",
                                 disable=not progress, leave=False))
        else:
            rows = [_row(i) for i in tqdm(range(n - 1), desc="verify", disable=not progress, leave=False)]
    finally:
        _SHARED = None
    first = next((np.asarray(r[0], dtype=float) for r in rows if r), np.zeros(()))
    out = np.zeros((n, n) + first.shape)
    for i, row in enumerate(rows):
        if row:
            out[i, i + 1:] = np.asarray(row, dtype=float)
            out[i + 1:, i] = out[i, i + 1:]
    return out


def pairwise_bonus(features: list[list[ImageFeatures]], s: VerificationSettings, workers: int | None = None,
                   progress: bool = False) -> np.ndarray:
    """(N, N) symmetric bonus matrix of the series' features, zero diagonal."""
    return bonus_from_matches(pairwise_matches(features, s, workers, progress), s.weight_inliers, s.weight_ncc)


def series_matches(a: list[ImageFeatures], b: list[ImageFeatures], s: VerificationSettings) -> np.ndarray:
    """(max_images^2, 2): (inliers, correlation) of each pair of the two series' first images, NaN where a
    series has fewer images; what series_bonus maximizes over, kept so that other weights can be tried."""
    out = np.full((s.max_images * s.max_images, 2), np.nan)
    for k, (x, y) in enumerate((x, y) for x in a[:s.max_images] for y in b[:s.max_images]):
        out[k] = match(x, y, s)
    return out


def pairwise_matches(features: list[list[ImageFeatures]], s: VerificationSettings, workers: int | None = None,
                     progress: bool = False) -> np.ndarray:
    """(N, N, max_images^2, 2) series_matches of every pair (mirrored; the diagonal NaN)."""
    n = len(features)
    if n < 2:
        return np.full((n, n, s.max_images * s.max_images, 2), np.nan)
    out = pairwise(features, partial(series_matches, s=s), workers, progress)
    out[np.arange(n), np.arange(n)] = np.nan
    return out


def bonus_from_matches(matches: np.ndarray, weight_inliers: float, weight_ncc: float) -> np.ndarray:
    """(N, N) bonus of pairwise_matches under these weights: the best image pair of each pair of series,
    0 where there is none (the diagonal, a series without images); equal to series_bonus pair by pair."""
    inliers, ncc = matches[..., 0], matches[..., 1]
    bonus = weighted_bonus(np.nan_to_num(inliers), np.nan_to_num(ncc), weight_inliers, weight_ncc)
    bonus = np.where(np.isnan(inliers), -np.inf, bonus).max(axis=-1)
    return np.where(np.isfinite(bonus), bonus, 0.0)


def _start_methods() -> list[str]:
    from multiprocessing import get_all_start_methods
    return get_all_start_methods()


# ---------------------------------------------------------------- stored series (linkage)

class SeriesVerifier:
    """The bonus of two stored series, for the models whose card asks for verification.

    `load_images(series_pk)` returns a series' 2D images (the I/O, supplied by the node's wiring:
    stored files through the pipeline's loader). Features and pair bonuses are cached in memory,
    because the engine compares a patient's series again whenever a new study arrives. With a
    `folder` (models.inference.verification_files.FeatureFolder) and `fingerprint(series_pk)` (a string that
    changes when the series' files change), features are also kept on disk, so a series that left
    the memory cache, or a restart, costs a file read instead of reading and describing its images.
    """

    def __init__(self, settings: dict[tuple[str, str, str], VerificationSettings], load_images,
                 cache_series: int = 256, cache_pairs: int = 65536, folder=None, fingerprint=None) -> None:
        from collections import OrderedDict
        self.settings = settings
        self.load_images = load_images
        self.folder = folder if fingerprint is not None else None
        self.fingerprint = fingerprint
        self._features: OrderedDict = OrderedDict()
        self._pairs: OrderedDict = OrderedDict()
        self._limits = (cache_series, cache_pairs)

    def bonus(self, model_key: tuple[str, str, str], a_series_pk: int, b_series_pk: int) -> float | None:
        """None when the model has no verification or a series' images cannot be read."""
        s = self.settings.get(model_key)
        if s is None:
            return None
        first, second = sorted((a_series_pk, b_series_pk))
        key = (first, second, s)
        if key in self._pairs:
            self._pairs.move_to_end(key)
            return self._pairs[key]
        # match() is not quite symmetric (ratio test and RANSAC run one way), so one order for every caller
        a, b = self._series_features(first, s), self._series_features(second, s)
        value = series_bonus(a, b, s) if a and b else None
        _remember(self._pairs, key, value, self._limits[1])
        return value

    def _series_features(self, series_pk: int, s: VerificationSettings) -> list[ImageFeatures]:
        key = (series_pk, s)
        if key in self._features:
            self._features.move_to_end(key)
            return self._features[key]
        features = [complete(k, s) for k in self._kept_features(series_pk, s)]
        _remember(self._features, key, features, self._limits[0])
        return features

    def _kept_features(self, series_pk: int, s: VerificationSettings) -> list[KeptFeatures]:
        """From the folder when it holds them for the series' present files, else made (and kept)."""
        token = None
        if self.folder is not None:
            try:
                token = self.fingerprint(series_pk)
            except Exception as error:  # noqa: BLE001 - no fingerprint: made in memory only, as without a folder
                log.warning("series pk %d: no fingerprint for kept features (%s: %s)", series_pk,
                            type(error).__name__, error)
        if token:
            kept = self.folder.load(series_pk, s, token)
            if kept is not None:
                return kept
        try:
            kept = [describe(image, s) for image in self.load_images(series_pk)[:s.max_images]]
        except Exception as error:  # noqa: BLE001 - an unreadable series gives no bonus; linking goes on
            log.warning("series pk %d: images not readable for verification (%s: %s)", series_pk,
                        type(error).__name__, error)
            return []
        if token and kept:
            self.folder.save(series_pk, s, token, kept)
        return kept


def _remember(cache, key, value, limit: int) -> None:
    cache[key] = value
    if len(cache) > limit:
        cache.popitem(last=False)
