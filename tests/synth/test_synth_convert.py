"""dicom-node convert: PNG/JPEG + CSV manifest -> DICOM."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from synth.cli import main

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture()
def image_set(tmp_path):
    d = tmp_path / "set"
    (d / "img").mkdir(parents=True)
    g = np.tile(np.arange(64, dtype=np.uint8)[None, :] * 4, (48, 1))
    Image.fromarray(g).save(d / "img" / "a.png")
    Image.fromarray((g.astype(np.uint16) * 200)).save(d / "img" / "b16.png")
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 200, 30
    Image.fromarray(rgb).save(d / "img" / "c.jpg", quality=95)
    (d / "manifest.csv").write_text(
        "image,patient_id,offset_days,sex,age,view,study\n"
        "img/a.png,pat-1,0,M,71,PA,\n"
        "img/b16.png,pat-1,12,M,71,AP Supine,s2\n"
        "img/c.jpg,pat-1,12,M,71,AP Supine,s2\n", encoding="utf-8")
    return d


def _read_all(out):
    return {p: pydicom.dcmread(p) for p in sorted(Path(out).rglob("*.dcm"))}


def test_convert_wraps_images_as_cr(image_set, tmp_path):
    out = tmp_path / "out"
    assert main(["convert", "--manifest", str(image_set / "manifest.csv"), "--out", str(out),
                 "--base-date", "20210301", "--quiet"]) == 0
    dss = _read_all(out)
    assert len(dss) == 3
    by_name = {ds.ImageComments.split()[-1]: ds for ds in dss.values()}
    a, b, c = by_name["a.png"], by_name["b16.png"], by_name["c.jpg"]
    for ds in dss.values():
        assert ds.Modality == "CR" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
        assert ds.PatientID == "pat-1" and ds.PatientSex == "M" and ds.PatientAge == "071Y"
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
    assert a.StudyDate == "20210301" and b.StudyDate == "20210313" and a.ViewPosition == "PA" and b.ViewPosition == "AP"
    # one study per image unless a study key groups rows
    assert a.StudyInstanceUID != b.StudyInstanceUID
    assert b.StudyInstanceUID == c.StudyInstanceUID and b.SeriesInstanceUID == c.SeriesInstanceUID
    assert sorted([int(b.InstanceNumber), int(c.InstanceNumber)]) == [1, 2]
    assert a.pixel_array.shape == (48, 64) and int(a.pixel_array[0, 63]) == 252
    assert b.BitsStored == 16 and int(b.pixel_array.max()) == 63 * 4 * 200
    truth = json.loads((out / "truth.json").read_text())
    assert len(truth["studies"]) == 2 and truth["series"][b.SeriesInstanceUID] == "pat-1"
    assert [r["row"] for r in truth["rows"]] == [2, 3, 4]


def test_convert_secondary_capture_keeps_colour_and_is_deterministic(image_set, tmp_path):
    outs = []
    for name in ("o1", "o2"):
        out = tmp_path / name
        assert main(["convert", "--manifest", str(image_set / "manifest.csv"), "--out", str(out),
                     "--sop", "sc", "--quiet"]) == 0
        outs.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()})
    assert outs[0] == outs[1]
    dss = _read_all(tmp_path / "o1")
    colour = [ds for ds in dss.values() if ds.PhotometricInterpretation == "RGB"]
    assert len(colour) == 1 and colour[0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert colour[0].pixel_array.shape == (40, 50, 3) and colour[0].ConversionType == "WSD"


def _run(args):
    return subprocess.run([sys.executable, "-m", "synth.cli", "convert", *args],
                          capture_output=True, text=True, timeout=120)


def test_missing_column_is_a_clear_error(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("image,pid\nx.png,1\n")
    r = _run(["--manifest", str(m), "--out", str(tmp_path / "o")])
    assert r.returncode == 2
    assert "patient_id" in r.stderr and "Traceback" not in r.stderr


def test_unreadable_or_missing_image_is_a_clear_error(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    m = tmp_path / "m.csv"
    m.write_text("image,patient_id\nbad.png,p1\n")
    r = _run(["--manifest", str(m), "--out", str(tmp_path / "o")])
    assert r.returncode == 1
    assert "bad.png" in r.stderr and ":2:" in r.stderr and "Traceback" not in r.stderr
    m.write_text("image,patient_id\nmissing.png,p1\n")
    r = _run(["--manifest", str(m), "--out", str(tmp_path / "o2")])
    assert r.returncode == 1 and "missing.png" in r.stderr and "Traceback" not in r.stderr
    r = _run(["--manifest", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o3")])
    assert r.returncode == 2 and "not found" in r.stderr


@pytest.mark.skipif(not (REAL / "cxr-adult-figures" / "manifest.csv").is_file(), reason="shared data not present")
def test_convert_real_manifest_subset(tmp_path):
    out = tmp_path / "real"
    assert main(["convert", "--manifest", str(REAL / "cxr-adult-figures" / "manifest.csv"), "--out", str(out),
                 "--limit", "6", "--quiet"]) == 0
    dss = _read_all(out)
    assert len(dss) == 6
    assert all(ds.Modality == "CR" and ds.PatientID for ds in dss.values())
    assert len({ds.PatientID for ds in dss.values()}) < 6          # several images per patient
