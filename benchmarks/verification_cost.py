#!/usr/bin/env python3
"""What the geometric check of image pairs costs (models/verification.py), per series and per pair.

    dicom-node synth --out /tmp/vc/derm --patients 6 --visits 3 --seed 0 --error-rate 0 --modalities derm --quiet
    dicom-node synth --out /tmp/vc/cxr --patients 6 --visits 3 --seed 0 --error-rate 0 --modalities cxr --quiet
    .venv/bin/python benchmarks/verification_cost.py --route dermoscopy /tmp/vc/derm --route chest_xr /tmp/vc/cxr

For each folder: every series is read with the pipeline's loader, its features made with the
settings of the route's card (`--weights-dir`), and every pair of series checked, on one core:
what linkage pays for a new series (its features, then one check per compared series). Then
the features are kept on disk as linkage keeps them (models/verification_files.py) and read
back: what a compared series costs once it has left the memory cache or after a restart.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def series_folders(root: Path) -> list[Path]:
    """Folders that hold instance files only (the synth layout: patient/study/series/files)."""
    return sorted(p for p in root.rglob("*") if p.is_dir() and any(p.iterdir())
                  and all(f.is_file() for f in p.iterdir()))


def measure(route: str, root: Path, weights_dir: Path) -> dict:
    from models.loading import load_series
    import tempfile

    from models.verification import VerificationSettings, complete, describe, series_bonus
    from models.verification_files import FeatureFolder
    card = json.loads((weights_dir / route / "card.json").read_text())
    s = VerificationSettings.from_card(card)
    if s is None:
        raise SystemExit(f"{route}: the card in {weights_dir} has no verification")
    folders = series_folders(root)
    t = time.perf_counter()
    loaded = [load_series(sorted(p.iterdir())).images for p in folders]
    t_load = time.perf_counter() - t
    t = time.perf_counter()
    kept = [[describe(image, s) for image in images[:s.max_images]] for images in loaded]
    features = [[complete(k, s) for k in series] for series in kept]
    t_features = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as scratch:
        folder = FeatureFolder(Path(scratch))
        t = time.perf_counter()
        for pk, series in enumerate(kept):
            folder.save(pk, s, "bench", series)
        t_save = time.perf_counter() - t
        size = sum(f.stat().st_size for f in Path(scratch).rglob("*.npz"))
        t = time.perf_counter()
        for pk in range(len(kept)):
            [complete(k, s) for k in folder.load(pk, s, "bench")]
        t_read = time.perf_counter() - t
    pairs = list(itertools.combinations(features, 2))
    t = time.perf_counter()
    for a, b in pairs:
        series_bonus(a, b, s)
    t_pairs = time.perf_counter() - t
    return {"route": route, "series": len(folders), "images": sum(len(f) for f in features), "pairs": len(pairs),
            "load_ms_per_series": 1000 * t_load / len(folders),
            "features_ms_per_series": 1000 * t_features / len(folders),
            "kept_write_ms_per_series": 1000 * t_save / len(folders),
            "kept_read_ms_per_series": 1000 * t_read / len(folders),
            "kept_kb_per_series": size / 1024 / len(folders),
            "check_ms_per_pair": 1000 * t_pairs / len(pairs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--route", nargs=2, action="append", required=True, metavar=("ROUTE", "FOLDER"))
    ap.add_argument("--weights-dir", type=Path, default=REPO / "models" / "weights")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import cv2
    cv2.setNumThreads(1)                # one core, as a pipeline worker
    results = [measure(route, Path(folder), args.weights_dir) for route, folder in args.route]
    for r in results:
        print(f"{r['route']}: {r['series']} series ({r['images']} images checked): read {r['load_ms_per_series']:.0f} ms, "
              f"features {r['features_ms_per_series']:.0f} ms per series; check {r['check_ms_per_pair']:.1f} ms "
              f"per pair of series ({r['pairs']} pairs); kept on disk: {r['kept_kb_per_series']:.0f} kB, written in "
              f"{r['kept_write_ms_per_series']:.1f} ms, read back in {r['kept_read_ms_per_series']:.1f} ms per series")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
