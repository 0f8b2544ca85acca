#!/usr/bin/env python3
"""Pipeline speed: stored DICOM files -> route + embedding, per route, on this machine.

    .venv/bin/python benchmarks/pipeline.py                       # preset large, 2 threads
    .venv/bin/python benchmarks/pipeline.py --threads 1 --rounds 3 --json out.json

1. Generates a synthetic cohort with the synth CLI (`--preset large`: chest radiographs
   512 px, CT 64 x 256 x 256, MR 48 x 256 x 256, fundus and dermoscopy 512 px colour)
   into a temporary directory, removed on exit.
2. Builds one `SeriesWork` per series (paths in instance-number order, as the queue gives
   them) and a `SeriesPipeline` with the default settings and model sizes (shipped router
   weights, untrained identity networks: same cost as trained ones).
3. Warms up (one series per route, not counted; the first-call times are printed), then
   runs `SeriesPipeline.process` over every series `--rounds` times and, unless `--no-store`,
   stores each embedding in SQLite (WAL, synchronous=FULL, one commit per series, as the
   node's store does) so the time is from stored files to stored embedding.
4. Prints per route: series, ms/series (median, min, p90), series/s, and where the time goes
   (load / route / normalize / embed / store, ms per series and share); `--cprofile N`
   adds the N functions with the most own time; `--batch` also times `process_batch`.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom
import torch

from db.records import SeriesWork
from dicom_node.config import PipelineSettings
from models.inference.pipeline import STAGES, SeriesPipeline

ORDER = ("chest_xr", "chest_ct", "brain_mr", "fundus", "dermoscopy", "other")
SYNTH_ROUTES = {"cxr": "chest_xr", "ct": "chest_ct", "mr": "brain_mr", "fundus": "fundus", "derm": "dermoscopy"}


def expected_routes(root: Path) -> dict[str, str]:
    truth = json.loads((root / "truth.json").read_text())
    return {se["series_uid"]: SYNTH_ROUTES.get(st["modality"], "other")
            for st in truth["studies"] for se in st["series"]}


def make_works(root: Path) -> list[tuple[SeriesWork, str]]:
    works = []
    for folder in sorted({p.parent for p in root.rglob("*.dcm")}):
        heads = sorted(((pydicom.dcmread(f, stop_before_pixels=True), f) for f in folder.glob("*.dcm")),
                       key=lambda h: int(h[0].get("InstanceNumber", 0) or 0))
        first = heads[0][0]
        size = f"{first.Rows}x{first.Columns}" + (f"x{len(heads)}" if len(heads) > 2 else "")
        works.append((SeriesWork(len(works) + 1, first.SeriesInstanceUID, "bench", 1, first.Modality,
                                 first.get("BodyPartExamined"), [str(f.relative_to(root)) for _, f in heads]), size))
    return works


class Store:
    """Embeddings into SQLite as durably as the node stores rows (WAL, synchronous=FULL)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE embedding (series_pk INTEGER, route TEXT, model TEXT, version TEXT, "
                        "dim INTEGER, vector BLOB, findings TEXT)")

    def put(self, work, decision, embedding) -> None:
        self.db.execute("BEGIN")
        self.db.execute("DELETE FROM embedding WHERE series_pk = ?", (work.series_pk,))
        self.db.execute("INSERT INTO embedding VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (work.series_pk, decision.route, embedding and embedding.model_name,
                         embedding and embedding.model_version, embedding and embedding.dim,
                         embedding and embedding.vector, json.dumps(decision.findings)))
        self.db.execute("COMMIT")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="large", choices=["small", "default", "large"])
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--visits", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the machine: 2)")
    parser.add_argument("--weights", type=Path, default=ROOT / "models" / "weights")
    parser.add_argument("--enhance", default="", help='JSON, e.g. \'{"chest_xr": ["clahe"]}\'')
    parser.add_argument("--no-store", action="store_true", help="do not time the SQLite write")
    parser.add_argument("--batch", action="store_true", help="also time process_batch (batch_size 8)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp) / "cohort"
        subprocess.run([sys.executable, "-m", "synth.cli", "synth", "--out", str(root), "--patients",
                        str(args.patients), "--visits", str(args.visits), "--preset", args.preset, "--seed", "7",
                        "--quiet"], check=True, cwd=ROOT)
        works = make_works(root)
        expected = expected_routes(root)
        started = time.perf_counter()
        settings = PipelineSettings(device="cpu", enhance=json.loads(args.enhance or "{}"))
        pipe = SeriesPipeline(settings, args.weights)
        build_s = time.perf_counter() - started
        store = None if args.no_store else Store(Path(tmp) / "bench.db")

        first_call, seen = {}, set()
        for work, _ in works:                                   # warm-up: first series of each route
            t = time.perf_counter()
            decision, _ = pipe.process(work, root)
            if decision.route not in seen:
                seen.add(decision.route)
                first_call[decision.route] = 1000 * (time.perf_counter() - t)
        pipe.reset_profile()

        times, store_s, sizes, wrong = defaultdict(list), defaultdict(float), {}, 0
        profiler = cProfile.Profile() if args.cprofile else None
        if profiler:
            profiler.enable()
        wall = time.perf_counter()
        for _ in range(args.rounds):
            for work, size in works:
                t = time.perf_counter()
                decision, embedding = pipe.process(work, root)
                t_store = time.perf_counter()
                if store:
                    store.put(work, decision, embedding)
                done = time.perf_counter()
                times[decision.route].append(done - t)
                wrong += decision.route != expected.get(work.series_uid, decision.route)
                store_s[decision.route] += done - t_store
                sizes.setdefault(decision.route, size)
        wall = time.perf_counter() - wall
        if profiler:
            profiler.disable()

        profile = {route: dict(stages) for route, stages in pipe.profile.items()}
        batch = {}
        if args.batch:
            by_route = defaultdict(list)
            for work, _ in works:
                by_route[pipe.process(work, root)[0].route].append(work)
            for route, group in by_route.items():
                t = time.perf_counter()
                for k in range(0, len(group), 8):
                    pipe.process_batch(group[k:k + 8], root)
                batch[route] = len(group) / (time.perf_counter() - t)

    report = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                          "torch": torch.__version__, "load_avg_1m": os.getloadavg()[0]},
              "preset": args.preset, "series": len(works) * args.rounds, "wall_s": round(wall, 2),
              "pipeline_build_s": round(build_s, 2), "routes": {}}
    print(f"{len(works)} series x {args.rounds} rounds, preset {args.preset}, torch threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.1f}; pipeline built in {build_s:.1f} s")
    print(f"{'route':<11} {'size':<13} {'n':>3} {'median ms':>9} {'min ms':>6} {'p90 ms':>7} {'series/s':>8} "
          f"{'first ms':>8}   "
          + "  ".join(f"{s:>9}" for s in STAGES + ("store",)) + "   (ms per series)")
    for route in [r for r in ORDER if r in times]:
        ts, n = times[route], len(times[route])
        prof = profile[route]
        stages = {s: 1000 * prof[s] / n for s in STAGES}
        stages["store"] = 1000 * store_s[route] / n
        mean = sum(ts) / n
        row = {"size": sizes[route], "n": n, "median_ms": round(1000 * statistics.median(ts), 1),
               "min_ms": round(1000 * min(ts), 1),
               "p90_ms": round(1000 * pct(ts, 0.9), 1), "series_per_s": round(1 / mean, 2),
               "first_call_ms": round(first_call.get(route, 0), 1),
               "stages_ms": {k: round(v, 1) for k, v in stages.items()}}
        if route in batch:
            row["batch_series_per_s"] = round(batch[route], 2)
        report["routes"][route] = row
        print(f"{route:<11} {sizes[route]:<13} {n:>3} {row['median_ms']:>9.1f} {row['min_ms']:>6.1f} {row['p90_ms']:>7.1f} "
              f"{row['series_per_s']:>8.1f} {row['first_call_ms']:>8.0f}   "
              + "  ".join(f"{stages[s]:6.1f} {100 * stages[s] / (1000 * mean):2.0f}%" for s in STAGES + ("store",))
              + (f"   batch {batch[route]:.1f} series/s" if route in batch else ""))
    print(f"overall: {len(works) * args.rounds / wall:.1f} series/s ({wrong} misrouted)")
    if profiler:
        print(f"\ntop {args.cprofile} functions by own time:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
