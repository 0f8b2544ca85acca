#!/usr/bin/env python3
"""Linkage accuracy over several synthetic cohorts: what tests/test_linkage_e2e.py measures on
seed 0, repeated on other seeds, so that one lucky cohort is not mistaken for the node's accuracy.

    .venv/bin/python benchmarks/linkage_accuracy.py --seeds 0 11 12 13 --json /tmp/linkage-accuracy.json

Per seed: `dicom-node synth --seed S` (default cohort: 20 persons, 5 modalities, 3 visits,
injected Patient ID errors) -> `dicom-node import` into a fresh SQLite node (the C-STORE
ingest path without the network; the end-to-end test uses DCMTK storescu) -> `process
--until-idle --stable-now` with the shipped models -> `links --format json` -> scored against
truth.json by linkage.scoring. Prints each seed's report and a summary table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from linkage.scoring import MISFILED, SAME, format_report, score  # noqa: E402

CONFIG = """[database]
url = "sqlite:///{work}/node.db"
sqlite_synchronous = "NORMAL"
[storage]
dir = "{work}/storage"
fsync = false
[pipeline]
enabled = true
weights_dir = "{weights}"
[web]
enabled = false
"""


def cli(*args: str, ok: tuple[int, ...] = (0,)) -> str:
    done = subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True,
                          timeout=1800, cwd=REPO)
    if done.returncode not in ok:
        raise RuntimeError(f"dicom-node {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def run_seed(seed: int, weights: Path, work: Path) -> dict:
    cohort = work / "cohort"
    cli("synth", "--out", str(cohort), "--seed", str(seed), "--quiet")
    config = work / "node.toml"
    config.write_text(CONFIG.format(work=work, weights=weights))
    cli("--config", str(config), "import", str(cohort), ok=(0, 1))    # 1: truth.json is not DICOM
    cli("--config", str(config), "process", "--until-idle", "--stable-now")
    links = json.loads(cli("--config", str(config), "links", "--format", "json"))
    truth = json.loads((cohort / "truth.json").read_text())
    result = score(links, truth)
    modality = {e["error_id"]: "+".join(sorted({k.split("/")[1] for k in e["study_keys"]})) for e in truth["errors"]}
    for missed in result["missed"]:
        missed["modality"] = modality[missed["error_id"]]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 11, 12, 13])
    p.add_argument("--weights-dir", type=Path, default=REPO / "models" / "weights")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"linkacc-{seed}-") as tmp:
            result = run_seed(seed, args.weights_dir.resolve(), Path(tmp))
        print(f"--- seed {seed}\n{format_report(result)}", flush=True)
        rows.append({"seed": seed, **{k: result[k] for k in ("recall", "precision")},
                     "errors": result["errors"], "found": result["found"], "links": result["links"],
                     "correct": result["correct_links"],
                     "same_recall": result["by_kind"][SAME]["recall"],
                     "misfiled_recall": result["by_kind"][MISFILED]["recall"],
                     "missed": [f"{m['error_id']} {m['variant']} ({m['modality']})" for m in result["missed"]],
                     "false_links": result["false_links"]})
    print("\n| seed | errors | found | recall | links | correct | precision | same-ID recall | misfiled recall | missed |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['errors']} | {r['found']} | {r['recall']:.2f} | {r['links']} | {r['correct']} | "
              f"{r['precision']:.2f} | {r['same_recall']:.2f} | {r['misfiled_recall']:.2f} | {', '.join(r['missed'])} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
