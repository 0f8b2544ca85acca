"""Split a real image manifest by identity into train / select / test manifests.

    python -m models.datasets.manifest_split ../shared/data/derm-ham/manifest.csv --out-dir /tmp/train/man \\
        --prefix derm-ham --seed 0

Identities with two or more images are shuffled with `--seed` and cut by `--fractions` (default
train 0.6, select 0.2, test 0.2): settings are chosen on `select`, `test` is reported only. Identities
with one image (distractors: impostors in the gallery, never queries) are dealt out by the same
fractions. Image paths are written absolute, so the manifests can live anywhere and the data stays
where it is (never copied). Rows marked `duplicate_of` are left out, as models.datasets.examples.read_manifest does.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

PARTS = ("train", "select", "test")


def split_ids(ids: list[str], fractions: tuple[float, ...], rng: np.random.Generator) -> list[list[str]]:
    """`ids` shuffled and cut into len(fractions) parts (the last takes the rounding remainder)."""
    ids = list(ids)
    rng.shuffle(ids)
    cuts = np.floor(np.cumsum(fractions)[:-1] / sum(fractions) * len(ids)).astype(int)
    return [list(part) for part in np.split(np.array(ids, dtype=object), cuts)]


def split_manifest(manifest: Path, out_dir: Path, prefix: str, fractions: tuple[float, ...] = (0.6, 0.2, 0.2),
                   seed: int = 0) -> dict[str, dict]:
    """Write <prefix>-<part>.csv for each part; returns {part: {"path", "rows", "identities", "multi"}}."""
    manifest = Path(manifest).resolve()
    with open(manifest, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("image") and r.get("patient_id") and not (r.get("duplicate_of") or "").strip()]
    if "image" not in fields or "patient_id" not in fields:
        raise ValueError(f"{manifest}: needs the columns image and patient_id")
    by_id: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_id[r["patient_id"].strip()].append(r)
    rng = np.random.default_rng(seed)
    multi = sorted(i for i, rs in by_id.items() if len(rs) >= 2)
    single = sorted(i for i, rs in by_id.items() if len(rs) == 1)
    parts = [m + s for m, s in zip(split_ids(multi, fractions, rng), split_ids(single, fractions, rng))]
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, ids in zip(PARTS, parts):
        path = out_dir / f"{prefix}-{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            for i in sorted(ids):
                for r in by_id[i]:
                    writer.writerow({**r, "image": str(manifest.parent / r["image"])})
        summary[name] = {"path": str(path), "rows": sum(len(by_id[i]) for i in ids), "identities": len(ids),
                         "multi": sum(len(by_id[i]) >= 2 for i in ids)}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--prefix", required=True, help="file names: PREFIX-train.csv, PREFIX-select.csv, PREFIX-test.csv")
    parser.add_argument("--fractions", type=float, nargs=3, default=(0.6, 0.2, 0.2), metavar=PARTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, s in split_manifest(args.manifest, args.out_dir, args.prefix, tuple(args.fractions), args.seed).items():
        print(f"{s['path']}: {s['rows']} images, {s['identities']} identities ({s['multi']} with two or more images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
