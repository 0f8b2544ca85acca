#!/usr/bin/env python3
"""Linkage accuracy over several cohorts, synthetic or real: what tests/test_linkage_e2e.py measures
on seed 0, repeated on other seeds, so that one lucky cohort is not mistaken for the node's accuracy.

    .venv/bin/python benchmarks/linkage_accuracy.py --seeds 0 11 12 13 --json /tmp/linkage-accuracy.json
    .venv/bin/python benchmarks/linkage_accuracy.py --real ../shared/data/cxr-adult-figures/manifest.csv \
        --second-ids 8 --misfiled 8 --seeds 1 2 3

Synthetic, per seed: `dicom-node synth --seed S` (default cohort: 20 persons, 5 modalities, 3
visits, injected Patient ID errors) -> `dicom-node import` into a fresh SQLite node (the C-STORE
ingest path without the network).

Real (`--real MANIFEST`), per seed: `dicom-node convert --second-ids N --misfiled N --error-seed S`
(names and birth dates blank, sex and age kept, dates from offset_days) -> DCMTK storescu to a
running `dicom-node serve`.

Then `process --until-idle --stable-now` with the shipped models -> `links --format json` (the
flags, at the review band) scored against truth.json by linkage.scoring; and the ranked queue (the
flags, then `links --status worth-a-look`, by probability): the precision of its first k links
(k = 10, 20, 50) and the errors it holds. Prints each seed's report and a summary table.
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


def run_seed(seed: int, weights: Path, work: Path, real: argparse.Namespace | None = None,
             linkage: dict | None = None) -> dict:
    cohort = work / "cohort"
    config = work / "node.toml"
    if real is None:
        cli("synth", "--out", str(cohort), "--seed", str(seed), "--quiet")
        config.write_text(CONFIG.format(work=work, weights=weights)
                          + "[linkage]\n" + "".join(f"{k} = {v!r}\n" for k, v in (linkage or {}).items()))
        cli("--config", str(config), "import", str(cohort), ok=(0, 1))    # 1: truth.json is not DICOM
    else:
        extra = ["--patients-from", str(real.patients_from.resolve())] if real.patients_from else []
        cli("convert", "--manifest", str(real.real.resolve()), "--out", str(cohort), "--second-ids",
            str(real.second_ids), "--misfiled", str(real.misfiled), "--error-seed", str(seed),
            "--skip-duplicates", "--quiet", *extra)
        send_with_storescu(cohort, work, config, weights, linkage)
    cli("--config", str(config), "process", "--until-idle", "--stable-now")
    links = json.loads(cli("--config", str(config), "links", "--format", "json"))
    worth = json.loads(cli("--config", str(config), "links", "--status", "worth-a-look", "--format", "json"))
    truth = json.loads((cohort / "truth.json").read_text())
    result = score(links, truth)
    # the ranked queue: the flags, then the worth-a-look list below them, by probability
    result["precision_at"] = precision_at(links + worth, truth, (10, 20, 50))
    result["queue"] = {"links": len(links) + len(worth), "found": score(links + worth, truth)["found"]}
    modality = {e["error_id"]: "+".join(sorted({k.split("/")[1] for k in e["study_keys"]})) for e in truth["errors"]}
    for missed in result["missed"]:
        missed["modality"] = modality[missed["error_id"]]
    return result


def send_with_storescu(cohort: Path, work: Path, config_path: Path, weights: Path, linkage: dict | None) -> None:
    """The real stream arrives as a department sends it: DCMTK storescu to a running node."""
    from tests.helpers import RunningNode, node_config, write_toml     # one way to run a node

    config = node_config(work, pipeline={"enabled": False, "weights_dir": str(weights)}, linkage=linkage or {})
    node = RunningNode(write_toml(config_path, config), config).start()
    try:
        sent = subprocess.run(["storescu", "+sd", "+r", "+sp", "*.dcm", "-R", "-aec", "LINKNODE", "127.0.0.1",
                               str(node.port), str(cohort)], capture_output=True, text=True,
                              env={"TCP_NODELAY": "1"}, timeout=1800)
        if sent.returncode != 0:
            raise RuntimeError(f"storescu exited {sent.returncode}: {sent.stderr[-2000:]}")
    finally:
        node.stop()


def precision_at(links: list[dict], truth: dict, ks: tuple[int, ...]) -> dict:
    """Share of right links among the first k by probability (fewer when fewer links exist)."""
    ranked = sorted(links, key=lambda link: -(link.get("probability") or 0.0))
    out = {}
    for k in ks:
        top = ranked[:k]
        out[k] = {"n": len(top), "precision": score(top, truth)["precision"] if top else None}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 11, 12, 13])
    p.add_argument("--weights-dir", type=Path, default=REPO / "models" / "weights")
    p.add_argument("--json", type=Path)
    p.add_argument("--real", type=Path, metavar="MANIFEST", help="a real labelled image set instead of synth")
    p.add_argument("--second-ids", type=int, default=8, help="with --real: second IDs injected per seed")
    p.add_argument("--misfiled", type=int, default=8, help="with --real: misfiled studies injected per seed")
    p.add_argument("--patients-from", type=Path, help="with --real: only these patients (a card.json's "
                                                        "validation_patients, or one ID per line)")
    p.add_argument("--linkage", nargs="+", default=[], metavar="KEY=NUMBER",
                   help="[linkage] settings for the node, e.g. study_dependence=0.5 (default: node.toml's defaults)")
    args = p.parse_args(argv)
    linkage = {}
    for item in args.linkage:
        key, _, value = item.partition("=")
        linkage[key] = float(value)
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"linkacc-{seed}-") as tmp:
            result = run_seed(seed, args.weights_dir.resolve(), Path(tmp), args if args.real else None, linkage)
        at = ", ".join(f"P@{k} {_fmt(v['precision'])} (of {v['n']})" for k, v in result["precision_at"].items())
        print(f"--- seed {seed}\n{format_report(result)}\nranked queue: {result['queue']['links']} links holding "
              f"{result['queue']['found']} errors; {at}", flush=True)
        rows.append({"seed": seed, **{k: result[k] for k in ("recall", "precision")},
                     "errors": result["errors"], "found": result["found"], "links": result["links"],
                     "correct": result["correct_links"],
                     "same_recall": result["by_kind"][SAME]["recall"],
                     "misfiled_recall": result["by_kind"][MISFILED]["recall"],
                     "precision_at": result["precision_at"], "queue": result["queue"],
                     "missed": [f"{m['error_id']} {m['variant']} ({m['modality']})" for m in result["missed"]],
                     "false_links": result["false_links"]})
    print("\n| seed | errors | found | recall | links | correct | precision | same-ID recall | misfiled recall "
          "| missed |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['errors']} | {r['found']} | {_fmt(r['recall'])} | {r['links']} | {r['correct']} | "
              f"{_fmt(r['precision'])} | {_fmt(r['same_recall'])} | {_fmt(r['misfiled_recall'])} | "
              f"{', '.join(r['missed'])} |")
    links = sum(r["links"] for r in rows)
    found, errors = sum(r["found"] for r in rows), sum(r["errors"] for r in rows)
    correct = sum(r["correct"] for r in rows)
    print(f"| all | {errors} | {found} | {_fmt(found / errors if errors else None)} | {links} | {correct} | "
          f"{_fmt(correct / links if links else None)} | | | |")
    print(f"ranked queue: {sum(r['queue']['links'] for r in rows)} links holding "
          f"{sum(r['queue']['found'] for r in rows)} of {errors} errors")
    for k in (10, 20, 50):
        n = sum(r["precision_at"][k]["n"] for r in rows)
        right = sum(round((r["precision_at"][k]["precision"] or 0) * r["precision_at"][k]["n"]) for r in rows)
        print(f"precision at {k}: {_fmt(right / n if n else None)} ({right} of {n} links over the seeds)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
