"""Export a training run's last epoch (checkpoint.pt) as a weights folder, with an honest card.

`dicom-node train` writes the best-validation epoch as model.pt. When the validation persons
are saturated, the selection cohorts may prefer the last epoch instead; this writes it as
OUT/<route>/model.pt next to the run's card, with sha256 / size_bytes of the new file and
metrics.validation re-scored by `dicom-node evaluate` on the run's own validation patients
(so the card never shows another epoch's numbers). The calibration stays the run's until
`evaluate --update-card` refits it.

    .venv/bin/python benchmarks/last_epoch.py /tmp/train/runs/brain_mr8 /tmp/wmr8last --note "chosen on seed 302"
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from models.networks import sha256_file


def validation_manifest(card: dict, path: Path) -> int:
    """The run's validation patients' rows of its training manifests, as one manifest (absolute paths)."""
    from models.evaluate import read_manifest            # resolves paths, skips duplicate rows
    keep = set(card["validation_patients"])
    rows = [(image, patient) for manifest in card["training_data"]["manifests"]
            for image, patient in read_manifest(Path(manifest)) if patient in keep]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "patient_id"])
        writer.writerows((str(image.resolve()), patient) for image, patient in rows)
    return len(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="training output folder (checkpoint.pt, card.json)")
    p.add_argument("out", type=Path, help="weights folder to write (OUT/<route>/model.pt, card.json)")
    p.add_argument("--note", default="", help="why the last epoch was chosen (recorded in the card)")
    args = p.parse_args(argv)

    card = json.loads((args.run / "card.json").read_text(encoding="utf-8"))
    if not card["training_data"].get("manifests"):
        # the validation patients are re-scored from the run's manifests; a --from-db or
        # --synthetic run has none, so its last epoch cannot get an honest card here
        print(f"last_epoch: {args.run} was not trained from manifests; nothing written", file=sys.stderr)
        return 2
    ckpt = torch.load(args.run / "checkpoint.pt", map_location="cpu", weights_only=False)
    folder = args.out / card["route"]
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt["net"], folder / "model.pt")
    card["sha256"], card["size_bytes"] = sha256_file(folder / "model.pt"), (folder / "model.pt").stat().st_size
    epoch = ckpt["state"]["epoch"]
    card["training"]["model_epoch"] = epoch
    card["training"]["model_epoch_note"] = (f"the last epoch ({epoch}) instead of the best validation epoch "
                                            f"({card['training']['best_epoch']}); {args.note}".rstrip("; "))
    # written now, because evaluate checks the card's sha256 against model.pt; rewritten below
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")

    with tempfile.TemporaryDirectory() as tmp:
        manifest, report = Path(tmp) / "validation.csv", Path(tmp) / "validation.json"
        n = validation_manifest(card, manifest)
        subprocess.run([sys.executable, "-m", "dicom_node", "evaluate", "--route", card["route"], "--manifest",
                        str(manifest), "--weights-dir", str(args.out), "--json", str(report)], check=True)
        scored = json.loads(report.read_text(encoding="utf-8"))["results"]["model"]
    validation = card["metrics"]["validation"]
    card["metrics"]["validation"] = {k: scored[k] for k in validation}
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print(f"{folder}: epoch {epoch}, validation ({n} examples) mAP {scored['mAP']:.4f}, Rank-1 {scored['rank1']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
