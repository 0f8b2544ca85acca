"""Naive re-identification baseline: cosine similarity of downsampled raw pixels.

Each unit (a 2D image; for 3D series the middle slice; fundus photographs per eye) is read
with pydicom, its Modality LUT applied (Rescale Slope/Intercept) and MONOCHROME1 inverted,
RGB converted to luminance, resized to ``size`` x ``size`` (box filter), mean-centred and
L2-normalised.  Rank-1 is the fraction of units whose most similar unit from *another study*
of the same modality belongs to the same true person (from ``truth.json``).

    python -m synth.baseline DIR [--size 32] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image


def unit_pixels(path: Path) -> list[np.ndarray]:
    """Display-oriented float image(s) of one file (one per frame / per file)."""
    ds = pydicom.dcmread(path)
    a = ds.pixel_array.astype(np.float32)
    if a.ndim == 3 and ds.get("SamplesPerPixel", 1) == 3:
        a = a @ np.array([0.299, 0.587, 0.114], np.float32)
    a = a * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        a = a.max() - a
    return [a]


def embed(img: np.ndarray, size: int) -> np.ndarray:
    small = np.asarray(Image.fromarray(np.ascontiguousarray(img, np.float32)).resize((size, size), Image.BOX),
                       dtype=np.float64).ravel()
    small = small - small.mean()
    return small / (np.linalg.norm(small) + 1e-12)


def collect(out: Path, truth: dict, size: int) -> dict:
    """modality -> (embeddings [N, size*size], person labels, study labels)."""
    units: dict = {}
    for st in truth["studies"]:
        for se in st["series"]:
            if not se.get("path"):
                continue
            files = sorted((out / se["path"]).glob("*.dcm"))
            if not files:
                continue
            picks = files if st["modality"] == "fundus" else [files[len(files) // 2]]
            for fp in picks:
                for img in unit_pixels(fp):
                    u = units.setdefault(st["modality"], ([], [], []))
                    u[0].append(embed(img, size))
                    u[1].append(st["person_id"])
                    u[2].append(st["study_uid"])
    return units


def rank1(emb, persons, studies) -> float:
    e = np.stack(emb)
    sim = e @ e.T
    st = np.asarray(studies)
    sim[st[:, None] == st[None, :]] = -np.inf
    best = np.argmax(sim, axis=1)
    p = np.asarray(persons)
    return float(np.mean(p[best] == p))


def evaluate(out, size: int = 32) -> dict:
    out = Path(out)
    truth = json.loads((out / "truth.json").read_text(encoding="utf-8"))
    result = {}
    for mod, (emb, persons, studies) in sorted(collect(out, truth, size).items()):
        n_per = len(set(persons))
        per_study = len(emb) / max(1, len(set(studies)))
        result[mod] = {"units": len(emb), "persons": n_per, "rank1": round(rank1(emb, persons, studies), 4),
                       "chance": round((len(emb) / n_per - per_study) / max(1, len(emb) - per_study), 4)}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m synth.baseline", description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="cohort directory with truth.json")
    ap.add_argument("--size", type=int, default=32, help="downsampled edge length (default 32)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    if not (Path(args.dir) / "truth.json").is_file():
        print(f"error: {args.dir}/truth.json not found", file=sys.stderr)
        return 2
    res = evaluate(args.dir, args.size)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{'modality':8s} {'units':>6s} {'persons':>7s} {'rank1':>6s} {'chance':>6s}")
        for mod, r in res.items():
            print(f"{mod:8s} {r['units']:6d} {r['persons']:7d} {r['rank1']:6.3f} {r['chance']:6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
