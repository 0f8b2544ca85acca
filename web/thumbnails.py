"""Server-side thumbnails of stored series: PNG bytes from the DICOM files, nothing else.

The middle instance of a series (by instance number; the middle frame of a multi-frame
object) is decoded by pydicom, then, as the pipeline's loader does for display: rescale
or Modality LUT, the VOI LUT or first window (else min-max), MONOCHROME1 inverted so bright
means dense; colour images through pydicom's YBR and palette handling. Pillow scales it to
fit `size` and writes a PNG. Rendered thumbnails are kept in a small in-memory LRU cache
keyed by series pk and instance count (a late instance makes a new thumbnail); nothing
derived from the images is written to disk.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from models.inference.errors import FATAL

SIZE = 256


class ThumbnailError(Exception):
    """The series has no image that can be shown."""


def render(path: Path, size: int = SIZE) -> bytes:
    """PNG bytes of the middle frame; ThumbnailError for anything that cannot be shown."""
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except FATAL:
        raise
    except BaseException as error:  # noqa: BLE001 - anything undecodable is "no thumbnail"; Rust decoders
        # (pylibjpeg-rle) raise pyo3's PanicException, a BaseException, on a corrupted stream
        raise ThumbnailError(f"cannot decode pixels: {type(error).__name__}") from None
    try:
        image = display_image(ds, pixels)
    except ThumbnailError:
        raise
    except Exception as error:  # noqa: BLE001 - odd headers (bad LUTs, depths, shapes) must not be a 500
        raise ThumbnailError(f"cannot render pixels: {type(error).__name__}") from None
    picture = Image.fromarray(image)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    picture.save(out, format="PNG", optimize=False)
    return out.getvalue()


def display_image(ds, pixels: np.ndarray) -> np.ndarray:
    """The frame to show as 8-bit grey (rows, cols) or RGB (rows, cols, 3)."""
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    if pixels.size == 0:
        raise ThumbnailError("empty image")
    if photometric == "PALETTE COLOR":
        image = _to_uint8(apply_color_lut(pixels, ds), stretch=False)
    elif samples == 3:
        image = _to_uint8(pixels, stretch=pixels.dtype != np.uint8)
    else:
        image = _to_uint8(_grey_values(ds, pixels), stretch=True)
        if photometric == "MONOCHROME1":
            image = 255 - image
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ThumbnailError("not a 2D image")
    return image


def _grey_values(ds, pixels: np.ndarray) -> np.ndarray:
    """Rescale and window as the header says; a malformed rescale or window (a non-number, a
    zero width) is ignored, as a viewer would, and the min-max stretch shows the raw values."""
    try:
        values = apply_modality_lut(pixels, ds)
    except Exception:  # noqa: BLE001
        values = pixels
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        try:
            values = apply_voi_lut(values, ds, index=0)
        except Exception:  # noqa: BLE001
            pass
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ThumbnailError("pixel values are not finite numbers")
    return values


def _to_uint8(values: np.ndarray, stretch: bool) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if not stretch:
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        return np.clip(values / top * 255.0, 0, 255).astype(np.uint8)
    lo, hi = np.percentile(values, 0.5), np.percentile(values, 99.5)
    if hi <= lo:
        lo, hi = float(values.min(initial=0)), float(values.max(initial=0))
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip((values - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)


class ThumbnailCache:
    """series pk -> PNG bytes, least recently used out, thread-safe."""

    def __init__(self, identity, storage_dir: Path, entries: int = 256, size: int = SIZE) -> None:
        self.identity = identity
        self.storage_dir = storage_dir
        self.entries = entries
        self.size = size
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def png(self, series_pk: int) -> bytes | None:
        """The thumbnail, or None when there is no such series. ThumbnailError when no image."""
        found = self.identity.series_files(series_pk)
        if found is None:
            return None
        count, paths = found
        if not paths:
            raise ThumbnailError("no instances stored")
        key = (series_pk, count)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = render(self.storage_dir / paths[len(paths) // 2], self.size)
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.entries:
                self._cache.popitem(last=False)
        return data
