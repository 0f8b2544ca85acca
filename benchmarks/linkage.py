"""Time from a series' last instance to its link decision, inside a running node.

    .venv/bin/python benchmarks/linkage.py [--cohort DIR] [--stable-after 2] [--weights-dir DIR] [--workers N] [--json OUT]

Makes (or reuses) the default synthetic cohort (seed 0), starts `dicom-node serve` with the
pipeline and linkage on and the shipped models, sends the cohort with DCMTK storescu, and
waits until every series is linked. Per series it reports

    embed  = processed_at - last_received_at - stable_after_s
    linked = linked_at    - last_received_at - stable_after_s

(the stable delay excluded, as the issue asks; the scheduler's check interval is not), and
per flag the time from the last instance of the later of its two studies (that had arrived
when the flag was created) to the link's creation. The
cohort arrives as fast as storescu sends, so these times include waiting in the queue
behind the rest of the cohort: an upper bound for a single study arriving on a quiet node.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, func, select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from db.models import Link, Series, Study  # noqa: E402
from db.store import _aware  # noqa: E402
from tests.helpers import RunningNode, node_config, write_toml  # noqa: E402  (one way to run a node)


def percentiles(values: list[float]) -> dict:
    values = sorted(values)
    if not values:
        return {}
    pick = lambda q: values[min(len(values) - 1, int(round(q * (len(values) - 1))))]  # noqa: E731
    return {"n": len(values), "p50": pick(0.5), "p95": pick(0.95), "max": values[-1], "mean": statistics.fmean(values)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, default=None, help="existing synth output (default: make seed 0)")
    parser.add_argument("--stable-after", type=float, default=2.0)
    parser.add_argument("--weights-dir", type=Path, default=REPO / "models" / "weights",
                        help="the models (default the shipped ones; another folder for an A/B run)")
    parser.add_argument("--workers", type=int, default=1,
                        help="pipeline workers inside the node (pipeline.workers; default 1, as node.toml)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-linkage-"))
    cohort = args.cohort
    if cohort is None:
        cohort = work / "cohort"
        subprocess.run([sys.executable, "-m", "dicom_node", "synth", "--out", str(cohort), "--seed", "0", "--quiet"],
                       check=True)
    truth = json.loads((cohort / "truth.json").read_text())
    config = node_config(work, series={"stable_after_s": args.stable_after, "check_interval_s": 0.2},
                         pipeline={"enabled": True, "device": "cpu", "workers": args.workers,
                                   "weights_dir": str(args.weights_dir.resolve())})
    node = RunningNode(write_toml(work / "node.toml", config), config).start()
    try:
        started = time.monotonic()
        subprocess.run(["storescu", "+sd", "+r", "+sp", "*.dcm", "-R", "-aec", "LINKNODE", "127.0.0.1",
                        str(node.port), str(cohort)], check=True, capture_output=True,
                       env=dict(os.environ, TCP_NODELAY="1"))
        sent = time.monotonic() - started
        engine = create_engine(node.settings.database_url)
        expected = len(truth["series"])
        with engine.connect() as connection:
            while connection.scalar(select(func.count()).select_from(Series).where(Series.linked_at.is_not(None))) < expected:
                time.sleep(0.5)
            total = time.monotonic() - started
            rows = connection.execute(select(Series.study_pk, Series.last_received_at, Series.processed_at,
                                             Series.linked_at)).all()
            links = connection.execute(select(Link.a_study_pk, Link.b_study_pk, Link.created_at, Link.kind)).all()
            study_uids = dict(connection.execute(select(Study.id, Study.study_uid)).all())
        engine.dispose()
    finally:
        node.stop()

    stable = args.stable_after
    embed = [(_aware(p) - _aware(r)).total_seconds() - stable for _, r, p, _ in rows]
    linked = [(_aware(lk) - _aware(r)).total_seconds() - stable for _, r, _, lk in rows]
    last_of_study: dict[int, object] = {}
    for study, received, _, _ in rows:
        last_of_study[study] = max(_aware(received), last_of_study.get(study, _aware(received)))
    # A flag is caused by the later of its two studies that had arrived when it was created
    # (its a/b studies may be replaced later by better-matching ones).
    to_flag = []
    for a, b, created, _ in links:
        arrived = [t for t in (last_of_study[a], last_of_study[b]) if t <= _aware(created)]
        if arrived:
            to_flag.append((_aware(created) - max(arrived)).total_seconds() - stable)
    report = {"series": len(rows), "studies": len(study_uids), "links": len(links), "send_s": round(sent, 1),
              "all_linked_s": round(total, 1), "stable_after_s": stable,
              "embed_s": percentiles(embed), "linked_s": percentiles(linked), "flag_s": percentiles(to_flag)}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
