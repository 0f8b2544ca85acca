"""Contact sheets (PNG) of a generated cohort: rows are persons, columns their visits.

    python -m synth.examples COHORT_DIR OUT_DIR [--tile 160] [--persons P00001 P00002 ...]

Reads the DICOM files back (so the sheets show what a viewer would show): CT at a lung
window, MR and radiographs at their Window Center/Width, 3D series by their middle slice,
fundus photographs by the right eye.  When no persons are given, the first person that has
a near-twin sibling, that sibling and one unrelated person are shown.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw


def display(path: Path, lung: bool = False) -> np.ndarray:
    ds = pydicom.dcmread(path)
    a = ds.pixel_array
    if a.ndim == 3 and ds.SamplesPerPixel == 3:
        return a.astype(np.uint8)
    a = a.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    if lung:
        c, w = -500.0, 1500.0
    elif "WindowCenter" in ds:
        c = float(np.atleast_1d(ds.WindowCenter)[0])
        w = float(np.atleast_1d(ds.WindowWidth)[0])
    else:
        c, w = float(a.mean()), float(a.std() * 4 + 1)
    g = np.clip((a - (c - w / 2)) / w, 0, 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        g = 1 - g
    return np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=2)


def pick_persons(truth: dict) -> list[str]:
    persons = truth["persons"]
    sib = next((p for p in persons if p["sibling_of"]), None)
    chosen = [sib["sibling_of"], sib["person_id"]] if sib else []
    for p in persons:
        if len(chosen) >= 3:
            break
        if p["person_id"] not in chosen and not p["sibling_of"]:
            chosen.append(p["person_id"])
    return chosen


def sheet(cohort: Path, truth: dict, modality: str, persons: list[str], tile: int) -> Image.Image:
    rows = []
    for pid in persons:
        sts = sorted((s for s in truth["studies"] if s["person_id"] == pid and s["modality"] == modality),
                     key=lambda s: s["visit"])
        tiles = []
        for st in sts:
            se = st["series"][0]
            files = sorted((cohort / se["path"]).glob("*.dcm"))
            img = display(files[0] if modality == "fundus" else files[len(files) // 2], lung=modality == "ct")
            im = Image.fromarray(img).resize((tile, int(round(tile * img.shape[0] / img.shape[1]))), Image.BILINEAR)
            canvas = Image.new("RGB", (tile, tile), (0, 0, 0))
            canvas.paste(im, (0, (tile - im.height) // 2))
            ImageDraw.Draw(canvas).text((3, tile - 12), f"{pid} v{st['visit']} {st['dicom_modality']}",
                                        fill=(255, 255, 0))
            tiles.append(np.asarray(canvas))
        if tiles:
            rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return Image.fromarray(np.concatenate(rows, axis=0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m synth.examples", description=__doc__.split("\n")[0])
    ap.add_argument("cohort")
    ap.add_argument("out")
    ap.add_argument("--tile", type=int, default=160)
    ap.add_argument("--persons", nargs="*")
    args = ap.parse_args(argv)
    cohort, out = Path(args.cohort), Path(args.out)
    truth = json.loads((cohort / "truth.json").read_text(encoding="utf-8"))
    persons = args.persons or pick_persons(truth)
    out.mkdir(parents=True, exist_ok=True)
    for mod in truth["config"]["modalities"]:
        im = sheet(cohort, truth, mod, persons, args.tile)
        im.save(out / f"{mod}.png", optimize=True)
        print(out / f"{mod}.png", im.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
