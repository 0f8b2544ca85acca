"""Series loading: stored DICOM files -> MONAI MetaTensors (pixels, spacing, orientation).

Why pydicom and not MONAI's `LoadImage`/`PydicomReader`: the reader sorts slices by
InstanceNumber (not by position along the slice normal), applies no VOI LUT or window,
does not invert MONOCHROME1 and cannot tell a missing slice from a regular stack. Here
pydicom decodes the pixels (all transfer syntaxes its plugins handle: pylibjpeg for
JPEG/JPEG-LS/JPEG 2000/RLE, python-gdcm as a fallback) and the geometry is built from
the header, then wrapped in a `MetaTensor` with an affine so MONAI spatial transforms
(Orientation, Spacing, ...) work on it exactly as on a MONAI-loaded image.

What comes out (`LoadedSeries`):

* ``kind == "volume"``: one MetaTensor (1, X, Y, Z) in modality units (Hounsfield for CT),
  X along the rows' direction, Y along the columns', Z the slice normal; slices ordered
  by ImagePositionPatient projected on the normal of ImageOrientationPatient; the affine
  is RAS (DICOM's LPS with x and y negated), as MONAI's readers give it.
* ``kind == "gray"``: 2D images (1, H, W), display values in [0, 1]: rescale slope and
  intercept (or Modality LUT), then VOI LUT or the first window (else min-max), then
  MONOCHROME1 (or an INVERSE presentation LUT) inverted, so bright means dense everywhere.
* ``kind == "rgb"``: 2D images (3, H, W) in [0, 1]; YBR is converted by pydicom's decoders,
  PALETTE COLOR through its lookup table.

Anything that cannot be made into one of these raises `SeriesError` with a reason: permanent
for what the files contain (they give the same error next time), retryable only for the
environment (a missing or unreadable file, memory). Nothing else escapes, not even a decoder's
Rust panic (a BaseException), except the interrupts in `models.inference.errors.FATAL`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi

from models.inference.errors import FATAL, SeriesError, describe, one_line, out_of_memory

GRAY = {"MONOCHROME1", "MONOCHROME2"}
COLOR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"}
MIN_VOLUME_SLICES = 3          # fewer positioned slices are treated as separate 2D images
MAX_IMAGES = 16                # 2D series/cines: at most this many images, evenly sampled
MAX_VOXELS = 400_000_000       # refuse absurd series instead of exhausting memory
SPACING_TOLERANCE = 0.1        # relative deviation of a slice gap from the median gap


@dataclass
class LoadedSeries:
    kind: str                          # "volume", "gray" or "rgb"
    images: list[MetaTensor]           # one for a volume; one per 2D image (frame) otherwise
    modality: str = ""
    body_part: str = ""
    findings: list[str] = field(default_factory=list)

    @property
    def image(self) -> MetaTensor:
        return self.images[0]


@dataclass
class _Frame:
    """One 2D plane with what the geometry and intensity steps need."""

    name: str
    ds: pydicom.Dataset
    pixels: np.ndarray
    position: np.ndarray | None = None
    orientation: np.ndarray | None = None
    spacing: tuple[float, float] = (1.0, 1.0)    # (between rows, between columns) in mm
    rescale: tuple[float, float] | None = None   # (slope, intercept) from functional groups
    localizer: bool = False


def load_series(paths: list[Path], modality: str | None = None, body_part: str | None = None) -> LoadedSeries:
    """Read the instances of one series; raise SeriesError for anything unusable."""
    try:
        return _load(paths, modality, body_part)
    except (SeriesError, *FATAL):
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as error:  # malformed header values
        raise SeriesError(f"unusable header value: {type(error).__name__}: {one_line(error)}") from None
    except BaseException as error:  # noqa: BLE001 - see below
        # The files were read by _read (its I/O errors are the retryable ones), so anything else is
        # raised by their contents (pydicom raises NotImplementedError for an unknown VR, say) and
        # would be raised again: permanent, unless memory ran out. BaseException: pyo3 panics.
        raise SeriesError(f"malformed or unsupported data: {describe(error)}",
                          permanent=not out_of_memory(error)) from None


def _load(paths: list[Path], modality: str | None, body_part: str | None) -> LoadedSeries:
    if not paths:
        raise SeriesError("series has no instances")
    frames: list[_Frame] = []
    skipped = 0
    for path in paths:
        ds = _read(Path(path))
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            skipped += 1
            continue
        frames.extend(_frames(ds, Path(path).name))
    if not frames:
        raise SeriesError(f"no image in the series ({skipped} instance(s) without Pixel Data, e.g. SR or "
                          "presentation states)")
    first = frames[0].ds
    findings = [f"ignored {skipped} instance(s) without Pixel Data"] if skipped else []
    modality = (modality or str(first.get("Modality", "")) or "").upper()
    body_part = (body_part or str(first.get("BodyPartExamined", "")) or "").upper()

    photometrics = {str(f.ds.get("PhotometricInterpretation", "")).upper() for f in frames}
    unsupported = photometrics - GRAY - COLOR
    if unsupported:
        names = ", ".join(sorted(p or "(missing)" for p in unsupported))
        raise SeriesError(f"unsupported Photometric Interpretation {names} "
                          "(supported: MONOCHROME1/2, RGB, YBR_*, PALETTE COLOR)")
    if photometrics & GRAY and photometrics & COLOR:
        raise SeriesError("mixed grayscale and colour images in one series")
    if photometrics & COLOR:
        images = [_rgb(f) for f in _sample(frames, findings)]
        return LoadedSeries("rgb", images, modality, body_part, findings)

    positioned = [f for f in frames if f.position is not None and f.orientation is not None]
    if len(positioned) == len(frames) and len(frames) >= MIN_VOLUME_SLICES:
        return LoadedSeries("volume", [_volume(frames, findings)], modality, body_part, findings)
    images = [_gray(f, findings) for f in _sample(frames, findings)]
    return LoadedSeries("gray", images, modality, body_part, findings)


# ---------------------------------------------------------------- reading and frames

def _read(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as error:
        raise SeriesError(f"{path.name}: not a readable DICOM file ({one_line(error)})") from None
    except OSError as error:  # missing or unreadable file: may be transient (mount, permissions)
        raise SeriesError(f"{path.name}: cannot read the file ({error.strerror or error})", permanent=False) from None
    except FATAL:
        raise
    except BaseException as error:  # noqa: BLE001 - any other parser failure is the file's content
        raise SeriesError(f"{path.name}: not a readable DICOM file ({describe(error)})",
                          permanent=not out_of_memory(error)) from None


def _decode(ds: pydicom.Dataset, name: str) -> np.ndarray:
    try:
        arr = ds.pixel_array    # YBR_FULL/YBR_FULL_422 come back as RGB (pydicom 3 default)
    except FATAL:
        raise
    except BaseException as error:  # noqa: BLE001 - decoders raise many types (missing plugin, truncated data),
        # and pylibjpeg-rle a Rust panic (PanicException, a BaseException) on corrupt RLE segments.
        # All are the file's content, so permanent; running out of memory is the machine's.
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", str(syntax))
        detail = describe(error, "the decoder", with_type=False)
        raise SeriesError(f"{name}: cannot decode pixel data ({syntax_name}): {detail}",
                          permanent=not out_of_memory(error)) from None
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if arr.shape[-3 if int(ds.get("SamplesPerPixel", 1)) > 1 else -2:][:2] != (rows, cols):
        raise SeriesError(f"{name}: decoded pixels {arr.shape} do not match Rows x Columns {rows}x{cols}")
    return arr


def _item(ds, *keywords):
    """ds.K1[0].K2[0]... or None, for functional group sequences."""
    for kw in keywords:
        seq = ds.get(kw) if ds is not None else None
        if not seq:
            return None
        ds = seq[0]
    return ds


def _floats(value, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.size == n else None


def _frames(ds: pydicom.Dataset, name: str) -> list[_Frame]:
    """Split an instance into planes with their geometry (single-frame, enhanced or grid multi-frame)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in GRAY | COLOR:
        return [_Frame(name, ds, np.zeros((1, 1)))]   # rejected by the caller with the right reason
    arr = _decode(ds, name)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    color = int(ds.get("SamplesPerPixel", 1)) > 1
    if n_frames == 1 and arr.ndim == (3 if color else 2):
        arr = arr[None]
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    localizer = "LOCALIZER" in image_type
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    offsets = ds.get("GridFrameOffsetVector")
    frames = []
    for i in range(arr.shape[0]):
        groups = per_frame[i] if per_frame is not None and i < len(per_frame) else None
        frame = _Frame(f"{name}#{i + 1}" if arr.shape[0] > 1 else name, ds, arr[i], localizer=localizer)
        if groups is not None or shared is not None:      # enhanced multi-frame
            pos = _item(groups, "PlanePositionSequence") or _item(shared, "PlanePositionSequence")
            ori = _item(groups, "PlaneOrientationSequence") or _item(shared, "PlaneOrientationSequence")
            meas = _item(groups, "PixelMeasuresSequence") or _item(shared, "PixelMeasuresSequence")
            pvt = _item(groups, "PixelValueTransformationSequence") or _item(shared, "PixelValueTransformationSequence")
            frame.position = _floats(pos.get("ImagePositionPatient"), 3) if pos is not None else None
            frame.orientation = _floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else None
            spacing = _floats(meas.get("PixelSpacing"), 2) if meas is not None else None
            if pvt is not None and "RescaleSlope" in pvt:
                frame.rescale = (float(pvt.RescaleSlope), float(pvt.get("RescaleIntercept", 0.0)))
        else:
            frame.position = _floats(ds.get("ImagePositionPatient"), 3)
            frame.orientation = _floats(ds.get("ImageOrientationPatient"), 6)
            spacing = _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)
            if arr.shape[0] > 1:     # grid multi-frame (RT Dose, NM): offsets along the normal
                if offsets is not None and frame.position is not None and frame.orientation is not None \
                        and len(offsets) == arr.shape[0]:
                    normal = np.cross(frame.orientation[:3], frame.orientation[3:])
                    frame.position = frame.position + float(offsets[i]) * normal
                else:
                    frame.position = None
        if spacing is not None and np.all(spacing > 0):
            frame.spacing = (float(spacing[0]), float(spacing[1]))
        frames.append(frame)
    return frames


def _sample(frames: list[_Frame], findings: list[str]) -> list[_Frame]:
    if len(frames) <= MAX_IMAGES:
        return frames
    keep = np.linspace(0, len(frames) - 1, MAX_IMAGES).round().astype(int)
    findings.append(f"used {MAX_IMAGES} of {len(frames)} images (evenly spaced)")
    return [frames[i] for i in keep]


def _modality_values(frame: _Frame) -> np.ndarray:
    """Stored values -> modality units (rescale slope/intercept or Modality LUT), float32."""
    ds, arr = frame.ds, frame.pixels
    if frame.rescale is not None:
        slope, intercept = frame.rescale
    elif "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds).astype(np.float32)
    else:
        slope, intercept = float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)
    out = arr.astype(np.float32)
    if slope != 1.0 or intercept != 0.0:
        out = out * np.float32(slope) + np.float32(intercept)
    return out


# ---------------------------------------------------------------- volumes

def _volume(frames: list[_Frame], findings: list[str]) -> MetaTensor:
    localizers = [f for f in frames if f.localizer]
    if localizers and len(localizers) < len(frames):
        frames = [f for f in frames if not f.localizer]
        findings.append(f"ignored {len(localizers)} localizer image(s) in the series")
    if len(frames) < MIN_VOLUME_SLICES:
        raise SeriesError(f"only {len(frames)} slice(s) left after removing localizers")
    sizes = {}
    for f in frames:
        sizes.setdefault(f.pixels.shape, []).append(f.name)
    if len(sizes) > 1:
        desc = ", ".join(f"{s[0]}x{s[1]} ({len(n)} slices, e.g. {n[0]})" for s, n in sizes.items())
        raise SeriesError(f"mixed image sizes in one series: {desc}")
    ori = frames[0].orientation
    for f in frames[1:]:
        if np.abs(f.orientation - ori).max() > 1e-3:
            raise SeriesError(f"mixed slice orientations: {f.name} has {np.round(f.orientation, 3).tolist()}, "
                              f"{frames[0].name} has {np.round(ori, 3).tolist()}")
    if any(np.abs(np.array(f.spacing) - frames[0].spacing).max() > 1e-3 for f in frames):
        raise SeriesError("mixed pixel spacings in one series")
    row_dir, col_dir = ori[:3], ori[3:]
    normal = np.cross(row_dir, col_dir)
    if not 0.99 < np.linalg.norm(normal) < 1.01:
        raise SeriesError(f"invalid Image Orientation (Patient) {ori.tolist()}")
    along = np.array([float(f.position @ normal) for f in frames])
    order = np.argsort(along, kind="stable")
    frames, along = [frames[i] for i in order], along[order]
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        k = int(np.argmin(gaps))
        raise SeriesError(f"{int(np.sum(gaps < 1e-3)) + 1} slices share a position ({frames[k].name} and "
                          f"{frames[k + 1].name} at {along[k]:.2f} mm): several acquisitions in one series?")
    step = float(np.median(gaps))
    bad = np.abs(gaps - step) > max(SPACING_TOLERANCE * step, 0.01)
    if np.any(bad):
        k = int(np.argmax(np.abs(gaps - step)))
        raise SeriesError(f"irregular slice spacing: {gaps[k]:.2f} mm between {frames[k].name} and "
                          f"{frames[k + 1].name} where the spacing is {step:.2f} mm (missing slices?)")
    rows, cols = frames[0].pixels.shape
    if rows * cols * len(frames) > MAX_VOXELS:
        raise SeriesError(f"volume too large: {len(frames)} slices of {rows}x{cols}")

    data = np.empty((len(frames), rows, cols), dtype=np.float32)
    for k, f in enumerate(frames):
        data[k] = _modality_values(f)
    if str(frames[0].ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        data = data.max() + data.min() - data
        findings.append("MONOCHROME1 volume inverted")
    # (Z, rows, cols) -> (X=columns, Y=rows, Z): index i moves along the row direction. A strided
    # view, not a copy: the first spatial transform (OrientRAS) copies anyway.
    array = data.transpose(2, 1, 0)
    row_spacing, col_spacing = frames[0].spacing
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = normal * step
    lps[:3, 3] = frames[0].position
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    meta = {"space": "RAS", "original_affine": ras, "spatial_shape": np.array(array.shape),
            "modality_units": True, "slice_spacing": step}
    return MetaTensor(torch.from_numpy(array)[None], affine=torch.as_tensor(ras), meta=meta)


# ---------------------------------------------------------------- 2D images

def _affine_2d(frame: _Frame) -> torch.Tensor:
    return torch.as_tensor(np.diag([frame.spacing[0], frame.spacing[1], 1.0, 1.0]))


def _window(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """VOI LUT or the first window (PS3.3 C.11.2.1.2) mapped to [0, 1]; None if the header has none."""
    if "VOILUTSequence" in ds:
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        out = apply_voi(values, ds, index=0).astype(np.float32)
        return np.clip(out / float(2 ** int(descriptor[2]) - 1), 0, 1)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
    width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if width <= 0 or (function == "LINEAR" and width < 1):
        return None
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0, 1)
    return np.clip((values - (center - 0.5)) / max(width - 1, 1e-6) + 0.5, 0, 1)


def _gray(frame: _Frame, findings: list[str]) -> MetaTensor:
    ds = frame.ds
    values = _modality_values(frame)
    out = _window(values, ds)
    if out is None:
        lo, hi = float(values.min()), float(values.max())
        out = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    inverse = str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    if photometric == "MONOCHROME1" or (inverse and photometric == "MONOCHROME2"):
        out = 1.0 - out
    # Projection images: bring them to the standard display (patient's right on the viewer's
    # left, head at the top) when Patient Orientation says they are mirrored or upside down.
    orientation = [str(v).upper() for v in (ds.get("PatientOrientation") or [])]
    said = "\\".join(orientation)
    if len(orientation) == 2 and orientation[0][:1] == "R" and orientation[1][:1] in ("F", "H"):
        out = out[:, ::-1]
        findings.append(f"{frame.name}: mirrored image (Patient Orientation {said}) flipped")
    if len(orientation) == 2 and orientation[1][:1] == "H":
        out = out[::-1, :]
        findings.append(f"{frame.name}: upside-down image (Patient Orientation {said}) flipped")
    array = np.ascontiguousarray(out, dtype=np.float32)[None]
    return MetaTensor(torch.from_numpy(array), affine=_affine_2d(frame), meta={"spatial_shape": array.shape[1:]})


def _rgb(frame: _Frame) -> MetaTensor:
    ds, arr = frame.ds, frame.pixels
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as error:  # noqa: BLE001 - any failure of the LUT is a property of the file
            raise SeriesError(f"{frame.name}: cannot apply the palette colour lookup table ({error})",
                              permanent=not out_of_memory(error)) from None
        top = float(2 ** (8 * arr.dtype.itemsize) - 1)
    else:
        top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise SeriesError(f"{frame.name}: colour image with shape {arr.shape}, expected rows x columns x 3")
    array = np.ascontiguousarray(np.clip(arr.transpose(2, 0, 1).astype(np.float32) / top, 0, 1))
    return MetaTensor(torch.from_numpy(array), affine=_affine_2d(frame), meta={"spatial_shape": array.shape[1:]})


def read_picture(path: Path, channels: int) -> torch.Tensor:
    """A PNG/JPEG as (C, H, W) float in [0, 1] (gray or RGB)."""
    from PIL import Image  # only the tools that read picture files need it
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))
