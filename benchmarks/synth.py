"""Time synthetic cohort generation (and optionally the naive pixel baseline).

    .venv/bin/python benchmarks/synth.py                      # 100 persons x 3 visits x all modalities
    .venv/bin/python benchmarks/synth.py --patients 30 --baseline
    .venv/bin/python benchmarks/synth.py --preset large --modalities ct --patients 5

Prints persons, studies, files, seconds and MB; the output goes to a temporary directory that
is removed afterwards unless --out is given.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synth.cli import build_config  # noqa: E402
from synth.cohort import generate  # noqa: E402
from synth.plan import PRESETS  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--visits", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modalities", nargs="+", default=["all"])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--out", default=None, help="keep the cohort here (default: temporary, removed)")
    ap.add_argument("--baseline", action="store_true", help="also report the naive pixel-cosine Rank-1")
    args = ap.parse_args(argv)
    ns = argparse.Namespace(patients=args.patients, visits=args.visits, seed=args.seed, modalities=args.modalities,
                            error_rate=0.05, sites=3, twin_rate=0.1, nuisance=1.0, derm_sop="dms",
                            preset=args.preset, **{k: None for k in ("cxr_size", "ct_size", "ct_slices", "mr_size",
                                                                     "mr_slices", "fundus_size", "derm_size")})
    cfg = build_config(ns)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="synth-bench-"))
    jobs = args.jobs or os.cpu_count() or 1
    try:
        t0 = time.perf_counter()
        s = generate(cfg, out, jobs=jobs)
        secs = time.perf_counter() - t0
        print(f"persons={s['persons']} visits={cfg.visits} modalities={','.join(cfg.modalities)} preset={args.preset} "
              f"jobs={jobs} cpus={os.cpu_count()}")
        print(f"studies={s['studies']} series={s['series']} files={s['files']} seconds={secs:.1f} "
              f"MB={s['bytes'] / 1e6:.1f} files_per_s={s['files'] / secs:.0f}")
        if args.baseline:
            from synth.baseline import evaluate
            for mod, r in evaluate(out).items():
                print(f"baseline {mod}: rank1={r['rank1']:.3f} chance={r['chance']:.3f} units={r['units']}")
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
