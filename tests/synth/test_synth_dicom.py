"""DICOM validity of the generated files: pydicom reads every file strictly; dcmdump is clean."""
from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict

import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.uid import ExplicitVRLittleEndian

SOP = {
    "CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1", "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4", "OP": "1.2.840.10008.5.1.4.1.1.77.1.5.1",
    "DMS": "1.2.840.10008.5.1.4.1.1.77.1.7",
}
REQUIRED = ["PatientID", "IssuerOfPatientID", "PatientName", "PatientSex", "StudyInstanceUID", "StudyDate",
            "StudyTime", "AccessionNumber", "StudyDescription", "SeriesInstanceUID", "SeriesNumber", "Modality",
            "BodyPartExamined", "Manufacturer", "ManufacturerModelName", "InstanceNumber", "SOPClassUID",
            "SOPInstanceUID", "Rows", "Columns"]


@pytest.fixture(scope="module")
def datasets(small_cohort):
    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        out = {}
        for p in sorted(small_cohort.rglob("*.dcm")):
            ds = pydicom.dcmread(p)
            out[p] = (ds, ds.pixel_array)
        return out
    finally:
        config.settings.reading_validation_mode = old


def test_pydicom_reads_every_file_strictly(datasets):
    assert len(datasets) > 500
    for path, (ds, px) in datasets.items():
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == SOP[ds.Modality], path
        for kw in REQUIRED:
            assert kw in ds, f"{path}: {kw} missing"
        assert px.shape[:2] == (ds.Rows, ds.Columns)
        assert path.name == f"{int(ds.InstanceNumber):04d}.dcm"
        assert path.parent.name == ds.SeriesInstanceUID and path.parent.parent.name == ds.StudyInstanceUID


def test_chest_radiographs_cover_cr_dx_mono1_mono2_ap_pa(datasets):
    xr = [ds for ds, _ in datasets.values() if ds.Modality in ("CR", "DX")]
    assert {ds.Modality for ds in xr} == {"CR", "DX"}
    assert {ds.PhotometricInterpretation for ds in xr} == {"MONOCHROME1", "MONOCHROME2"}
    assert {ds.ViewPosition for ds in xr} == {"AP", "PA"}
    for ds in xr:
        assert ds.BodyPartExamined == "CHEST" and ds.SamplesPerPixel == 1
        assert float(ds.ImagerPixelSpacing[0]) > 0


def _series(datasets, modality):
    series = defaultdict(list)
    for ds, px in datasets.values():
        if ds.Modality == modality:
            series[ds.SeriesInstanceUID].append((ds, px))
    return series


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_volumes_have_consistent_geometry(datasets, modality):
    series = _series(datasets, modality)
    assert series
    for items in series.values():
        items.sort(key=lambda t: int(t[0].InstanceNumber))
        assert len(items) >= 8
        first = items[0][0]
        assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        z = np.array([float(ds.ImagePositionPatient[2]) for ds, _ in items])
        steps = np.diff(z)
        assert np.all(steps < 0) and np.allclose(steps, steps[0], atol=1e-2)
        assert len({ds.FrameOfReferenceUID for ds, _ in items}) == 1
        assert len({tuple(ds.PixelSpacing) for ds, _ in items}) == 1
        if modality == "CT":
            assert abs(abs(steps[0]) - float(first.SliceThickness)) < 0.01
            hu = np.stack([px * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds, px in items])
            assert first.RescaleType == "HU"
            assert hu.min() <= -900 and hu.max() >= 300         # air and bone


def test_mr_studies_hold_two_sequences(datasets):
    per_study = defaultdict(set)
    for ds, _ in datasets.values():
        if ds.Modality == "MR":
            per_study[ds.StudyInstanceUID].add((ds.SeriesNumber, str(ds.ScanningSequence)))
            assert ds.BodyPartExamined == "HEAD" and float(ds.MagneticFieldStrength) > 0
    assert per_study and all(len(v) == 2 for v in per_study.values())


def test_photographs_are_rgb(datasets):
    lat = defaultdict(set)
    for ds, px in datasets.values():
        if ds.Modality in ("OP", "DMS"):
            assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
            assert ds.PlanarConfiguration == 0 and ds.BitsAllocated == 8
            assert px.shape == (ds.Rows, ds.Columns, 3) and px.dtype == np.uint8
        if ds.Modality == "OP":
            assert ds.BodyPartExamined == "EYE"
            lat[ds.SeriesInstanceUID].add(ds.ImageLaterality)
        if ds.Modality == "DMS":
            assert ds.BodyPartExamined == "SKIN"
    assert lat and all(v == {"R", "L"} for v in lat.values())


def test_dcmdump_reports_no_errors(small_cohort, datasets):
    if shutil.which("dcmdump") is None:
        pytest.skip("dcmdump (DCMTK) is not installed")
    files = [str(p) for p in sorted(small_cohort.rglob("*.dcm"))]
    assert files
    for i in range(0, len(files), 200):
        r = subprocess.run(["dcmdump", "-q", *files[i:i + 200]], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[:2000]
        bad = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.startswith(("E:", "W:", "F:"))]
        assert not bad, bad[:10]
    # DCMTK knows every SOP class we write (it prints a symbolic name, not the raw UID)
    per_modality = {}
    for path, (ds, _) in datasets.items():
        per_modality.setdefault(ds.Modality, str(path))
    for modality, f in per_modality.items():
        r = subprocess.run(["dcmdump", "+P", "0008,0016", f], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "UI =" in r.stdout, (modality, r.stdout)
