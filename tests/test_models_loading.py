"""Series loading: every synthetic modality, pydicom's compressed/multi-frame/colour files,
and inconsistent series refused with a reason."""

from __future__ import annotations

import copy
import json
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from models.inference.errors import SeriesError
from models.inference.loading import load_series
from tests.helpers import TEST_FILES

SYNTH_ROUTES = {"cxr": "chest_xr", "ct": "chest_ct", "mr": "brain_mr", "fundus": "fundus", "derm": "dermoscopy"}


def make_cohort(out: Path, patients: int = 2, seed: int = 1) -> list[dict]:
    """A small synthetic cohort (the synth CLI); one dict per series with its expected route."""
    subprocess.run([sys.executable, "-m", "synth.cli", "synth", "--out", str(out), "--patients",
                    str(patients), "--visits", "1", "--preset", "small", "--seed", str(seed), "--quiet"],
                   check=True)
    truth = json.loads((out / "truth.json").read_text())
    series = []
    for study in truth["studies"]:
        for se in study["series"]:
            files = sorted((out / se["path"]).glob("*.dcm"))
            head = pydicom.dcmread(files[0], stop_before_pixels=True)
            series.append({"route": SYNTH_ROUTES[study["modality"]], "synth": study["modality"],
                           "uid": se["series_uid"], "files": files, "root": out,
                           "paths": [str(f.relative_to(out)) for f in files],
                           "modality": head.Modality, "body_part": head.get("BodyPartExamined")})
    return series


def first(cohort: list[dict], synth: str) -> dict:
    return next(s for s in cohort if s["synth"] == synth)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[dict]:
    return make_cohort(tmp_path_factory.mktemp("cohort"))


def copy_series(series: dict, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, dest / f.name)) for f in series["files"]]


# ---------------------------------------------------------------- synthetic modalities

def test_chest_radiograph_is_gray_2d_in_unit_range(cohort):
    s = first(cohort, "cxr")
    loaded = load_series(s["files"])
    ds = pydicom.dcmread(s["files"][0])
    assert loaded.kind == "gray" and len(loaded.images) == 1
    assert tuple(loaded.image.shape) == (1, ds.Rows, ds.Columns)
    assert float(loaded.image.min()) >= 0.0 and float(loaded.image.max()) <= 1.0
    assert loaded.modality in ("CR", "DX") and loaded.body_part == "CHEST"


@pytest.mark.parametrize("synth", ["ct", "mr"])
def test_slice_stack_is_a_volume_with_spacing_and_ras_affine(cohort, synth):
    s = first(cohort, synth)
    loaded = load_series(s["files"])
    heads = [pydicom.dcmread(f) for f in s["files"]]
    assert loaded.kind == "volume"
    image = loaded.image
    assert tuple(image.shape) == (1, heads[0].Columns, heads[0].Rows, len(heads))
    z = sorted(float(h.ImagePositionPatient[2]) for h in heads)
    spacing = [float(heads[0].PixelSpacing[1]), float(heads[0].PixelSpacing[0]), z[1] - z[0]]
    assert np.allclose(image.pixdim.tolist(), spacing, atol=1e-3)
    lowest = min(heads, key=lambda h: float(h.ImagePositionPatient[2]))
    x, y, z0 = (float(v) for v in lowest.ImagePositionPatient)
    assert np.allclose(image.affine[:3, 3].tolist(), [-x, -y, z0], atol=1e-3)   # LPS -> RAS
    # Slice k of the volume is the instance at the k-th position, in modality units (HU for CT).
    ordered = sorted(heads, key=lambda h: float(h.ImagePositionPatient[2]))
    for k in (0, len(heads) // 2, len(heads) - 1):
        h = ordered[k]
        slope, intercept = float(h.get("RescaleSlope", 1)), float(h.get("RescaleIntercept", 0))
        expected = h.pixel_array.astype(np.float32) * slope + intercept
        assert np.allclose(image[0, :, :, k].numpy(), expected.T)


def test_shuffled_file_order_gives_the_same_volume(cohort):
    s = first(cohort, "ct")
    reference = load_series(s["files"])
    shuffled = list(s["files"])
    random.Random(3).shuffle(shuffled)
    for order in (shuffled, list(reversed(s["files"]))):
        again = load_series(order)
        assert torch.equal(again.image.as_tensor(), reference.image.as_tensor())
        assert torch.allclose(again.image.affine, reference.image.affine)


def test_colour_photographs_keep_rgb(cohort):
    fundus = load_series(first(cohort, "fundus")["files"])
    assert fundus.kind == "rgb" and len(fundus.images) == len(first(cohort, "fundus")["files"])
    derm_file = first(cohort, "derm")["files"][0]
    derm = load_series([derm_file])
    raw = pydicom.dcmread(derm_file).pixel_array
    assert tuple(derm.image.shape) == (3, raw.shape[0], raw.shape[1])
    assert np.allclose(derm.image.numpy(), raw.transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_monochrome1_is_inverted(cohort, tmp_path):
    source = next(s for s in cohort if s["synth"] == "cxr"
                  and pydicom.dcmread(s["files"][0]).PhotometricInterpretation == "MONOCHROME1")["files"][0]
    ds = pydicom.dcmread(source)
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PresentationLUTShape = "IDENTITY"
    mono2 = tmp_path / "mono2.dcm"
    ds.save_as(mono2)
    a, b = load_series([source]).image, load_series([mono2]).image
    assert torch.allclose(a, 1.0 - b, atol=1e-6)


def test_window_from_the_header_is_applied(tmp_path):
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = 40, 400
    path = tmp_path / "w.dcm"
    ds.save_as(path)
    image = load_series([path]).image[0].numpy()
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip((hu - 39.5) / 399 + 0.5, 0, 1)
    assert np.allclose(image, expected, atol=1e-5)


# ---------------------------------------------------------------- pydicom's files

MR_VARIANTS = ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
               "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]


@pytest.mark.parametrize("name", MR_VARIANTS)
def test_compressed_and_other_syntaxes_decode_to_the_same_pixels(name):
    reference = load_series([TEST_FILES / "MR_small.dcm"]).image
    assert torch.allclose(load_series([TEST_FILES / name]).image, reference)


@pytest.mark.parametrize("name,kind", [("SC_rgb_jpeg_dcmtk.dcm", "rgb"), ("SC_rgb_jpeg_gdcm.dcm", "rgb"),
                                       ("JPGExtended.dcm", "gray"), ("JPEG2000.dcm", "gray"),
                                       ("693_J2KI.dcm", "gray"), ("image_dfl.dcm", "gray"),
                                       ("SC_rgb_rle.dcm", "rgb"), ("examples_jpeg2k.dcm", "rgb")])
def test_compressed_files_decode(name, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_series([TEST_FILES / name])
    assert loaded.kind == kind
    assert torch.isfinite(loaded.image).all() and float(loaded.image.max()) > float(loaded.image.min())


def test_ybr_is_converted_to_rgb():
    rgb = load_series([TEST_FILES / "SC_rgb_dcmtk_+eb+cr.dcm"]).image
    for name in ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        assert float((load_series([TEST_FILES / name]).image - rgb).abs().mean()) < 0.03


def test_palette_colour_becomes_rgb():
    loaded = load_series([TEST_FILES / "examples_palette.dcm"])
    assert loaded.kind == "rgb" and loaded.image.shape[0] == 3 and float(loaded.image.max()) <= 1.0


def test_multiframe_files():
    grid = load_series([TEST_FILES / "rtdose.dcm"])        # 15 frames with GridFrameOffsetVector
    assert grid.kind == "volume" and tuple(grid.image.shape) == (1, 10, 10, 15)
    assert np.isclose(float(grid.image.pixdim[2]), 5.0)
    frames = load_series([TEST_FILES / "SC_rgb_rle_2frame.dcm"])
    assert frames.kind == "rgb" and len(frames.images) == 2


def test_enhanced_multiframe_is_ordered_by_per_frame_position(cohort, tmp_path):
    s = first(cohort, "ct")
    heads = [pydicom.dcmread(f) for f in s["files"]]
    random.Random(5).shuffle(heads)
    ds = copy.deepcopy(heads[0])
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
               "RescaleIntercept", "SliceThickness"):
        if kw in ds:
            delattr(ds, kw)
    ds.NumberOfFrames = len(heads)
    ds.PixelData = b"".join(h.PixelData for h in heads)
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = heads[0].ImageOrientationPatient
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = heads[0].PixelSpacing
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleSlope = heads[0].get("RescaleSlope", 1)
    shared.PixelValueTransformationSequence[0].RescaleIntercept = heads[0].get("RescaleIntercept", 0)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for h in heads:
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = h.ImagePositionPatient
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    enhanced, stack = load_series([path]), load_series(s["files"])
    assert enhanced.kind == "volume"
    assert torch.equal(enhanced.image.as_tensor(), stack.image.as_tensor())
    assert torch.allclose(enhanced.image.affine, stack.image.affine)


# ---------------------------------------------------------------- refused series

def test_missing_slice_is_refused(cohort, tmp_path):
    files = copy_series(first(cohort, "ct"), tmp_path)
    del files[len(files) // 2]
    with pytest.raises(SeriesError, match="irregular slice spacing") as info:
        load_series(files)
    assert info.value.permanent and "missing slices" in info.value.reason


def test_mixed_sizes_are_refused(cohort, tmp_path):
    files = copy_series(first(cohort, "ct"), tmp_path)
    ds = pydicom.dcmread(files[3])
    small = np.ascontiguousarray(ds.pixel_array[::2, ::2])
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = small.tobytes()
    ds.save_as(files[3])
    with pytest.raises(SeriesError, match="mixed image sizes"):
        load_series(files)


def test_duplicate_positions_and_mixed_orientations_are_refused(cohort, tmp_path):
    files = copy_series(first(cohort, "ct"), tmp_path / "dup")
    ds = pydicom.dcmread(files[4])
    ds.ImagePositionPatient = pydicom.dcmread(files[5]).ImagePositionPatient
    ds.save_as(files[4])
    with pytest.raises(SeriesError, match="share a position"):
        load_series(files)
    files = copy_series(first(cohort, "ct"), tmp_path / "ori")
    ds = pydicom.dcmread(files[2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(files[2])
    with pytest.raises(SeriesError, match="mixed slice orientations"):
        load_series(files)


def test_unsupported_photometric_is_refused(cohort, tmp_path):
    path = copy_series(first(cohort, "cxr"), tmp_path)[0]
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "CMYK"
    ds.save_as(path)
    with pytest.raises(SeriesError, match="unsupported Photometric Interpretation CMYK"):
        load_series([path])


def test_unreadable_and_imageless_series_are_refused(tmp_path):
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 10 + b"not dicom")
    with pytest.raises(SeriesError, match="not a readable DICOM file") as info:
        load_series([garbage])
    assert info.value.permanent
    with pytest.raises(SeriesError, match="cannot read the file") as info:
        load_series([tmp_path / "gone.dcm"])
    assert not info.value.permanent                  # a missing file may come back: retried
    with pytest.raises(SeriesError, match="no image in the series"):
        load_series([TEST_FILES / "test-SR.dcm"])
    with pytest.raises(SeriesError, match="cannot decode pixel data"):
        load_series([TEST_FILES / "MR_truncated.dcm"])
    with pytest.raises(SeriesError, match="no instances"):
        load_series([])
