#!/usr/bin/env python3
"""Accuracy per route: each shipped identity model on each of its data sets, next to the baselines.

    .venv/bin/python benchmarks/route_accuracy.py --json /tmp/route-accuracy.json        # all routes, ~1 h on 2 cores
    .venv/bin/python benchmarks/route_accuracy.py --routes chest_xr --no-synthetic        # the real chest sets only

Data sets (none is used to choose anything here; the models' cards say what each model trained on):
* synthetic: a held-out cohort (`dicom-node synth --seed 300`, persons never trained on), one
  manifest per modality (`python -m models.datasets.synth_manifest`; brain MR: T1 only, so every
  match is across visits);
* chest_xr: ../shared/data/cxr-adult-figures (the real adult test set) and the pediatric patients
  the card lists as validation patients (never trained on);
* dermoscopy: the test part of ../shared/data/derm-ham split by lesion
  (`python -m models.datasets.manifest_split --seed 0`, the split the shipped model's member trained on).

Each set is scored by `dicom-node evaluate`'s code (models.evaluation.evaluate.evaluate_manifest):
all-vs-all retrieval and verification with the model (cosine + the geometric check where the card has
one), the embedding alone, pixel cosine and the frozen ImageNet EfficientNet-Lite0 (2D routes). The
table printed at the end is the one in docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.datasets.examples import read_manifest  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SYNTH = {"chest_xr": ("cxr", []), "dermoscopy": ("derm", []), "fundus": ("fundus", []),
         "chest_ct": ("ct", []), "brain_mr": ("mr", ["--first-series"])}
SHOWN = ("model", "embedding only", "pixel-cosine", "frozen-lite0")


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def write_rows(path: Path, rows: list[tuple[Path, str]]) -> Path:
    """A manifest of (image, patient_id) rows, image paths absolute."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "patient_id"])
        writer.writerows((str(Path(image).resolve()), pid) for image, pid in rows)
    return path


def synthetic_sets(routes: list[str], work: Path, seed: int, patients: int) -> dict[str, Path]:
    cohort = work / f"cohort-{seed}"
    if not (cohort / "truth.json").exists():
        modalities = ",".join(SYNTH[r][0] for r in routes)
        run([sys.executable, "-m", "dicom_node", "synth", "--out", str(cohort), "--seed", str(seed),
             "--patients", str(patients), "--visits", "3", "--error-rate", "0", "--modalities", modalities, "--quiet"])
    out = {}
    for route in routes:
        modality, extra = SYNTH[route]
        manifest = work / f"{modality}-{seed}.csv"
        run([sys.executable, "-m", "models.datasets.synth_manifest", str(cohort), "--modality", modality,
             *extra, "--out", str(manifest)])
        out[route] = manifest
    return out


def real_sets(route: str, work: Path, weights_dir: Path) -> dict[str, Path]:
    if route == "chest_xr":
        card = json.loads((weights_dir / "chest_xr" / "card.json").read_text(encoding="utf-8"))
        validation = set(card.get("validation_patients") or [])
        pediatric = [row for row in read_manifest(DATA / "cxr-pediatric" / "manifest.csv") if row[1] in validation]
        return {"cxr-adult-figures (test)": DATA / "cxr-adult-figures" / "manifest.csv",
                f"cxr-pediatric validation ({len({pid for _, pid in pediatric})} patients)":
                    write_rows(work / "cxr-pediatric-validation.csv", pediatric)}
    if route == "dermoscopy":
        run([sys.executable, "-m", "models.datasets.manifest_split", str(DATA / "derm-ham" / "manifest.csv"),
             "--out-dir", str(work), "--prefix", "derm-ham", "--seed", "0"])
        return {"derm-ham test lesions": work / "derm-ham-test.csv"}
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", nargs="+", default=list(SYNTH), choices=list(SYNTH))
    parser.add_argument("--weights-dir", type=Path, default=ROOT / "models" / "weights")
    parser.add_argument("--work", type=Path, default=Path("/tmp/route-accuracy"), help="cohort and manifests (reused)")
    parser.add_argument("--seed", type=int, default=300, help="the held-out synthetic cohort's seed")
    parser.add_argument("--patients", type=int, default=60, help="persons in the synthetic cohort")
    parser.add_argument("--no-synthetic", action="store_true", help="real sets only")
    parser.add_argument("--no-real", action="store_true", help="the synthetic cohort only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    from models.evaluation.evaluate import evaluate_manifest
    from models.evaluation.metrics import summary
    torch.set_num_threads(args.threads)
    sets: list[tuple[str, str, Path]] = []
    if not args.no_synthetic:
        for route, manifest in synthetic_sets(args.routes, args.work, args.seed, args.patients).items():
            sets.append((route, f"synthetic seed {args.seed}", manifest))
    if not args.no_real:
        for route in args.routes:
            if not DATA.exists():
                print(f"{DATA} not found: real sets skipped", file=sys.stderr)
                break
            sets += [(route, name, manifest) for name, manifest in real_sets(route, args.work, args.weights_dir).items()]

    results = []
    for route, name, manifest in sets:
        started = time.monotonic()
        report = evaluate_manifest(route, manifest, args.weights_dir, torch.device("cpu"))
        row = {"route": route, "set": name, "manifest": str(manifest), "model": report["model"],
               "selection": report["source"]["selection"], "seconds": round(time.monotonic() - started, 1),
               "results": {k: summary(v) for k, v in report["results"].items() if k in SHOWN}}
        results.append(row)
        print(f"{route:10s} {name}: " + "  ".join(
            f"{k} {v['rank1']:.3f}/{v['mAP']:.3f}/{v['roc_auc']:.3f}" for k, v in row["results"].items()), flush=True)

    print("\n| route | data set | images / patients | model | embedding only | pixel cosine | frozen Lite0 |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        r = row["results"]
        cell = lambda k: f"{r[k]['rank1']:.3f} / {r[k]['mAP']:.3f} / {r[k]['roc_auc']:.3f}" if k in r else "-"  # noqa: E731
        first = next(iter(r.values()))
        print(f"| {row['route']} | {row['set']} | {first['images']} / {first['patients']} | {cell('model')} | "
              f"{cell('embedding only')} | {cell('pixel-cosine')} | {cell('frozen-lite0')} |")
    print("\ncells: Rank-1 / mAP / verification ROC AUC")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
