#!/usr/bin/env python3
"""How many real images the router sends to their route (and may link), per real set.

    .venv/bin/python benchmarks/router_real.py [--weights-dir models/weights]

Each image is thumbnailed as at run time (`models.inference.transforms.router_thumbnail`) and decided with
the header a department would send (DX/CR CHEST for radiographs, DMS for dermoscopy), as
`models.inference.router.Router.decide` does in the pipeline. A series the router sends elsewhere, to
"other" or with too little confidence is stored but never linked, so this share caps linkage
recall on real streams. Sets: the chest_xr card's pediatric validation patients; cxr-nih-64
patients the router holds out; cxr-adult-figures (a test set: reported, never chosen on);
derm-ham select and test lesions (`models.datasets.manifest_split`, seed 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"

from models.datasets.examples import read_manifest  # noqa: E402
from models.datasets.manifest_split import split_manifest  # noqa: E402
from models.inference.router import Router  # noqa: E402
from models.training.router_data import picture_thumbnail, real_holdout  # noqa: E402


def sets(weights: Path, tmp: Path) -> list[tuple[str, Path, str, str, object]]:
    """(name, manifest, Modality, Body Part, patient filter)."""
    validation = set(json.loads((weights / "chest_xr" / "card.json").read_text())["validation_patients"])
    derm = split_manifest(DATA / "derm-ham" / "manifest.csv", tmp, "derm-ham", seed=0)
    return [("cxr-pediatric, chest_xr validation patients", DATA / "cxr-pediatric" / "manifest.csv", "DX", "CHEST",
             lambda pid: pid in validation),
            ("cxr-nih-64, router's held-out patients", DATA / "cxr-nih-64" / "manifest.csv", "DX", "CHEST",
             real_holdout),
            ("cxr-adult-figures (test)", DATA / "cxr-adult-figures" / "manifest.csv", "CR", "CHEST", lambda pid: True),
            ("derm-ham select", Path(derm["select"]["path"]), "DMS", "", lambda pid: True),
            ("derm-ham test", Path(derm["test"]["path"]), "DMS", "", lambda pid: True)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights-dir", type=Path, default=REPO / "models" / "weights")
    args = p.parse_args(argv)
    router = Router.load(args.weights_dir / "router", 0.5, torch.device("cpu"))
    print(f"router {router.card.get('version') if router.card else '(none)'}\n")
    print("| set | images | routed and linkable | share |\n|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, manifest, modality, body_part, keep in sets(args.weights_dir, Path(tmp)):
            rows = [path for path, pid in read_manifest(manifest) if keep(pid)]
            rgb = modality == "DMS"
            thumbs = [picture_thumbnail(path, rgb) for path in rows]
            target = "dermoscopy" if rgb else "chest_xr"
            decided = [router.decide("rgb" if rgb else "gray", modality, body_part, pr)
                       for pr in router.image_probabilities(torch.stack(thumbs))]
            ok = sum(d.route == target and d.linkable for d in decided)
            print(f"| {name} | {len(rows)} | {ok} | {ok / len(rows):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
