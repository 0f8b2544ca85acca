"""A training/evaluation manifest of the series of synthetic cohorts (`dicom-node synth` output).

    .venv/bin/python -m models.datasets.synth_manifest /tmp/train/cohort100 [/tmp/train/cohort101 ...] \
        --modality ct --out /tmp/train/ct-train.csv

One row per series of the modality: `image` = the series folder (absolute path; loaded with the
pipeline's loader by `dicom-node train/evaluate --manifest`), `patient_id` = `seed<S>-<person>`
from the cohort's truth.json: the true person, so labels are clean even where the cohort
injected Patient ID errors (use `--error-rate 0` cohorts to match what the archive would say).
`--first-series` keeps each study's lowest-numbered series only (brain MR: T1, so that every
same-person match is across visits, not the same session's T2 or FLAIR).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

MODALITIES = ("cxr", "ct", "mr", "fundus", "derm")


def rows(cohort: Path, modality: str, first_series: bool = False) -> list[dict]:
    truth = json.loads((cohort / "truth.json").read_text(encoding="utf-8"))
    seed = truth.get("seed", cohort.name)
    out = []
    for study in truth["studies"]:
        if study["modality"] != modality:
            continue
        series_list = sorted(study["series"], key=lambda se: se["number"])
        for series in series_list[:1] if first_series else series_list:
            out.append({"image": str((cohort / series["path"]).resolve()),
                        "patient_id": f"seed{seed}-{study['person_id']}", "visit": study["visit"],
                        "duplicate_of": ""})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cohorts", type=Path, nargs="+")
    p.add_argument("--modality", choices=MODALITIES, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--first-series", action="store_true", help="only each study's lowest-numbered series")
    args = p.parse_args(argv)
    table = [r for c in args.cohorts for r in rows(c, args.modality, args.first_series)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "patient_id", "visit", "duplicate_of"])
        writer.writeheader()
        writer.writerows(table)
    print(f"{args.out}: {len(table)} series of {len({r['patient_id'] for r in table})} persons")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
