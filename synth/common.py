"""Shared helpers: seeded random streams, smooth fields, coordinate grids, rasterising.

Every random quantity in the generator comes from :func:`rng_for`, keyed by the cohort
seed plus a tuple of names (person, modality, visit, purpose).  The keyed streams make
every image independent of generation order, so parallel and serial runs give the same
bytes.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.special import expit, ndtr


def key_words(*parts) -> list[int]:
    """Stable 32-bit words from arbitrary printable key parts (sha256 of their repr)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]


def rng_for(seed: int, *parts) -> np.random.Generator:
    """A numpy Generator determined only by ``seed`` and ``parts``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key_words(seed, *parts))))


class Draw:
    """Random draws that may blend two streams (for sibling / near-twin persons).

    All draws derive from standard normals; a sibling's normal is
    ``sqrt(1-w^2) * parent + w * own`` so every marginal keeps its distribution while the
    sibling stays a small perturbation of the parent (small ``w``).  Uniforms are the normal
    CDF of such normals; integers and choices derive from uniforms.
    """

    def __init__(self, own: np.random.Generator, parent: np.random.Generator | None = None,
                 weight: float = 1.0, keys: tuple | None = None):
        self.own = own
        self.parent = parent
        self.w = float(weight) if parent is not None else 1.0
        self.keys = keys

    @classmethod
    def keyed(cls, seed: int, own_key: tuple, parent_key: tuple | None = None, weight: float = 1.0):
        """A Draw whose streams are ``rng_for(seed, *key)``; supports :meth:`sub`."""
        parent = rng_for(seed, *parent_key) if parent_key is not None else None
        return cls(rng_for(seed, *own_key), parent, weight, (seed, own_key, parent_key))

    def sub(self, *name) -> "Draw":
        """An independent Draw for one group of features (keeps siblings aligned per group)."""
        if self.keys is None:
            raise ValueError("sub() needs a Draw made with Draw.keyed")
        seed, own, parent = self.keys
        return Draw.keyed(seed, own + name, parent + name if parent is not None else None, self.w)

    def std(self, size=None):
        z = self.own.standard_normal(size)
        if self.parent is not None:
            z = math.sqrt(max(0.0, 1.0 - self.w ** 2)) * self.parent.standard_normal(size) + self.w * z
        return z

    def normal(self, loc=0.0, scale=1.0, size=None):
        return loc + scale * self.std(size)

    def uniform(self, low=0.0, high=1.0, size=None):
        u = ndtr(self.std(size))
        return low + (high - low) * u

    def integers(self, low, high, size=None):
        """Integers in [low, high)."""
        u = self.uniform(size=size)
        v = np.minimum(low + np.floor(u * (high - low)), high - 1)
        return v.astype(int) if size is not None else int(v)

    def chance(self, p) -> bool:
        return bool(self.uniform() < p)

    def choice(self, options, p=None):
        u = self.uniform()
        if p is None:
            return options[min(int(u * len(options)), len(options) - 1)]
        cdf = np.cumsum(np.asarray(p, float) / np.sum(p))
        return options[int(min(np.searchsorted(cdf, u), len(options) - 1))]


def smooth_field(draw, shape, sigma, normalize=True) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation (float32)."""
    f = ndimage.gaussian_filter(draw.std(shape).astype(np.float32), sigma, mode="wrap")
    if normalize:
        f /= f.std() + 1e-8
    return f


def bandpass_field(draw, shape, sigma_lo, sigma_hi) -> np.ndarray:
    """Difference of Gaussians of one white noise, unit standard deviation."""
    z = draw.std(shape).astype(np.float32)
    f = ndimage.gaussian_filter(z, sigma_lo, mode="wrap") - ndimage.gaussian_filter(z, sigma_hi, mode="wrap")
    return f / (f.std() + 1e-8)


def pixel_grid(rows: int, cols: int, spacing: float, cy: float = 0.0, cx: float = 0.0):
    """Physical (y, x) coordinates of pixel centres, origin at the image centre."""
    y = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * spacing + cy
    x = (np.arange(cols, dtype=np.float32) - (cols - 1) / 2) * spacing + cx
    return np.meshgrid(y, x, indexing="ij")


def inverse_affine(y, x, angle_deg=0.0, scale=1.0, ty=0.0, tx=0.0, sy=1.0):
    """Map detector coordinates back to body coordinates.

    The forward model is det = scale * R(angle) * diag(1, sy) * body + t; returns body.
    """
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    yy = (y - ty) / scale
    xx = (x - tx) / scale
    by = c * yy - s * xx
    bx = s * yy + c * xx
    return by / sy, bx


def sample_field(field, y, x, extent_y, extent_x, order=1, cval=0.0):
    """Sample a 2D field covering [-extent, extent] in y and x at physical coordinates."""
    h, w = field.shape
    ry = (y + extent_y) / (2 * extent_y) * (h - 1)
    rx = (x + extent_x) / (2 * extent_x) * (w - 1)
    return ndimage.map_coordinates(field, [ry, rx], order=order, mode="constant", cval=cval,
                                   prefilter=False)


def sample_field3(field, z, y, x, extent, order=1, cval=0.0):
    """Sample a 3D field covering the cube [-extent, extent]^3 (extent per axis) at coordinates."""
    coords = []
    for c, e, n in zip((z, y, x), extent, field.shape):
        coords.append((c + e) / (2 * e) * (n - 1))
    return ndimage.map_coordinates(field, coords, order=order, mode="nearest", cval=cval,
                                   prefilter=False)


def sigmoid(v):
    return expit(v)


def soft_inside(d, edge):
    """Soft indicator for a signed distance ``d`` (negative inside)."""
    return sigmoid(-d / max(edge, 1e-6))


def polar_radius(theta, coeffs):
    """Radius factor 1 + sum_k a_k cos(k t) + b_k sin(k t), coeffs rows (k, a_k, b_k)."""
    r = np.ones_like(theta)
    for k, a, b in coeffs:
        r = r + a * np.cos(k * theta) + b * np.sin(k * theta)
    return r


def blob(y, x, cy, cx, ry, rx, coeffs=(), edge=0.05, angle=0.0):
    """Soft-edged perturbed ellipse (values 0..1) at physical coordinates."""
    dy, dx = y - cy, x - cx
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dy, dx = c * dy - s * dx, s * dy + c * dx
    theta = np.arctan2(dy / ry, dx / rx)
    rho = np.sqrt((dy / ry) ** 2 + (dx / rx) ** 2)
    rad = polar_radius(theta, coeffs) if len(coeffs) else 1.0
    return soft_inside(rho - rad, edge)


def fourier_coeffs(draw, kmax, amp, decay=1.0):
    """Random shape coefficients (k, a_k, b_k) with amplitude ``amp / k**decay``."""
    out = []
    for k in range(2, kmax + 1):
        a, b = draw.normal(0.0, amp / k ** decay, size=2)
        out.append((k, float(a), float(b)))
    return out


def raster_polylines(lines, shape, extent_y, extent_x, supersample=2, blur=0.6):
    """Rasterise polylines [(points[N,2] as (y,x) physical, width, value)] into a float image.

    Later lines overwrite earlier ones where they overlap; the result is antialiased by
    drawing at ``supersample`` times the resolution and area-averaging.
    """
    h, w = shape
    H, W = h * supersample, w * supersample
    img = Image.new("F", (W, H), 0.0)
    drw = ImageDraw.Draw(img)
    sy = (H - 1) / (2 * extent_y)
    sx = (W - 1) / (2 * extent_x)
    for pts, width, value in lines:
        pts = np.asarray(pts, float)
        xy = [(float((p[1] + extent_x) * sx), float((p[0] + extent_y) * sy)) for p in pts]
        px = max(1, int(round(width * sx)))
        if len(xy) >= 2:
            drw.line(xy, fill=float(value), width=px, joint="curve")
        r = px / 2.0
        for cx, cy in (xy[0], xy[-1]):
            if r >= 1.5:
                drw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=float(value))
    arr = np.asarray(img, dtype=np.float32).reshape(h, supersample, w, supersample).mean(axis=(1, 3))
    if blur:
        arr = ndimage.gaussian_filter(arr, blur)
    return arr


def resize2d(img, rows, cols):
    """Area/bilinear resize of a float image with PIL (deterministic)."""
    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32))
    return np.asarray(im.resize((cols, rows), Image.BILINEAR if rows >= img.shape[0] else Image.BOX),
                      dtype=np.float32)


def quantize(img, lo, hi, dtype=np.uint16):
    return np.clip(np.rint(img), lo, hi).astype(dtype)


def even(n: int) -> int:
    return int(n) + (int(n) & 1)


def affine_window(by, bx, cy, cx, rad):
    """Index window (slices) of an affine coordinate grid that holds the disc (cy, cx, rad).

    ``by``/``bx`` are body coordinates of each pixel, an affine function of the pixel
    indices; returns None when the disc lies outside the image.
    """
    a = np.array([[by[1, 0] - by[0, 0], by[0, 1] - by[0, 0]],
                  [bx[1, 0] - bx[0, 0], bx[0, 1] - bx[0, 0]]], dtype=float)
    try:
        i, j = np.linalg.solve(a, [cy - by[0, 0], cx - bx[0, 0]])
    except np.linalg.LinAlgError:
        return None
    px = min(math.hypot(a[0, 0], a[1, 0]), math.hypot(a[0, 1], a[1, 1]))
    h = int(rad / max(px, 1e-9)) + 2
    i0, i1 = max(0, int(i) - h), min(by.shape[0], int(i) + h + 1)
    j0, j1 = max(0, int(j) - h), min(by.shape[1], int(j) + h + 1)
    if i0 >= i1 or j0 >= j1:
        return None
    return slice(i0, i1), slice(j0, j1)


def polar_radius_lut(theta, coeffs, n=1024):
    """:func:`polar_radius` via a lookup table (fast on large 3D arrays)."""
    t = np.linspace(-math.pi, math.pi, n + 1, dtype=np.float64)
    table = polar_radius(t, coeffs)
    return np.interp(theta, t, table).astype(np.float32)
