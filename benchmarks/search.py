#!/usr/bin/env python3
"""Candidate search (linkage/search.py): build time, query latency, recall and memory per size.

    .venv/bin/python benchmarks/search.py --sizes 10000 100000 1000000 --dim 256 --queries 1000 --k 20
    .venv/bin/python benchmarks/search.py --sizes 200000 --alpha 0.75 --ef-search 128 256 512

Synthetic embeddings with the structure of identity embeddings rather than uniform noise
(fixed seed; no trained identity network exists yet to take real ones from):

* persons: N / --per-person person centres (default 3 series per person), drawn from a Gaussian
  whose per-dimension variance decays as i^-alpha (i = 1..dim), then L2-normalized. With alpha
  1.0 (default) half of the variance lies in the first ~15 of 256 dimensions (trained
  embeddings are reported to have a low intrinsic dimension). Different-person cosines: mean 0, std ~0.18
  (alpha 0.75: ~0.12; alpha 0 = uniform noise: 0.06). Lower alpha is harder for an approximate
  index.
* series: normalize(0.85 * person + 0.53 * noise), the noise drawn like a person: two series of
  one person have cosine ~0.72 on average. The strongest of 10^5-10^6 impostors reach ~0.56-0.6,
  so this is a pessimistic model of a network: same-person series are not always the top hits.
* queries: a new series of a random existing person, searched one at a time (as the node does).

For each size: builds a VectorIndex (the default exact_limit 100,000: exact search up to there,
HNSW above) from vectors added 10,000 at a time (as catch_up does), then times --queries
single-vector top-k searches after 20 warm-up queries (p50/p99), measures recall@k against a
numpy brute force over all vectors on --recall-queries of them, the same-person recall (of
the query person's series in the exact top k, the share the index returns), RSS growth over the
build and the saved index's bytes, and the save and load times. For an HNSW index the searches are
repeated for every --ef-search value. --json writes all rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from linkage.search import VectorIndex  # noqa: E402


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def normalize(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def shaped(rng, n: int, dim: int, alpha: float) -> np.ndarray:
    scale = np.arange(1, dim + 1, dtype=np.float32) ** np.float32(-alpha / 2)
    return normalize(rng.standard_normal((n, dim), dtype=np.float32) * scale)


def cohort(n: int, dim: int, alpha: float, per_person: float, nq: int, seed: int):
    """(vectors n x dim, person of each vector, queries nq x dim, person of each query)."""
    rng = np.random.default_rng(seed)
    persons = shaped(rng, max(1, int(n / per_person)), dim, alpha)
    owner = rng.integers(0, len(persons), n)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        o = owner[s:s + 100_000]
        x[s:s + len(o)] = normalize(0.85 * persons[o] + 0.53 * shaped(rng, len(o), dim, alpha))
    q_owner = owner[rng.integers(0, n, nq)]
    q = normalize(0.85 * persons[q_owner] + 0.53 * shaped(rng, nq, dim, alpha))
    return x, owner, q, q_owner


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the k best inner products per query (numpy, chunked over x)."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.empty((len(q), 0), np.int64)
    for s in range(0, len(x), 200_000):
        sc = q @ x[s:s + 200_000].T
        top = np.argpartition(-sc, min(k, sc.shape[1] - 1), axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(sc, top, 1)], 1)
        best_i = np.concatenate([best_i, top + s], 1)
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def run_size(n: int, args) -> list[dict]:
    x, owner, q, q_owner = cohort(n, args.dim, args.alpha, args.per_person, args.queries, args.seed)
    ids = np.arange(1, n + 1, dtype=np.int64)
    rss0 = rss_bytes()
    index = VectorIndex(args.dim, ("bench", "synthetic", "1"), exact_limit=args.exact_limit,
                        hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, threads=args.threads)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    for s in range(0, n, 10_000):
        index.add(ids[s:s + 10_000], x[s:s + 10_000])
    build_s = time.perf_counter() - t0
    rss_growth = rss_bytes() - rss0
    print(f"n={n}: built {index.kind} in {build_s:.1f} s, RSS +{rss_growth / 2**20:.0f} MiB", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.faiss"
        t0 = time.perf_counter()
        index.save(path)
        save_s = time.perf_counter() - t0
        index_bytes = path.stat().st_size
        t0 = time.perf_counter()
        VectorIndex.load(path, threads=args.threads)          # loaded copy is discarded
        load_s = time.perf_counter() - t0

    nr = min(args.recall_queries, len(q))
    truth = exact_topk(x, q[:nr], args.k) + 1                    # row -> id
    rows = []
    for ef in (args.ef_search if index.kind == "hnsw" else [None]):
        if ef is not None:
            index.ef_search = ef
        for i in range(20):
            index.search(q[i], args.k)
        lat, found = [], []
        for i in range(len(q)):
            t0 = time.perf_counter()
            got, _ = index.search(q[i], args.k)[0]
            lat.append(time.perf_counter() - t0)
            if i < nr:
                found.append(got)
        rec = np.mean([len(set(f.tolist()) & set(t.tolist())) / args.k for f, t in zip(found, truth)])
        # same-person recall: of the query person's series in the exact top k, the share found
        mates = [set(t[owner[t - 1] == p].tolist()) for t, p in zip(truth, q_owner)]
        mate_rec = sum(len(m & set(f.tolist())) for m, f in zip(mates, found)) / max(1, sum(map(len, mates)))
        lat_ms = np.array(lat) * 1e3
        row = {"n": n, "dim": args.dim, "kind": index.kind, "ef_search": ef,
               "build_s": round(build_s, 2), "p50_ms": round(float(np.percentile(lat_ms, 50)), 3),
               "p99_ms": round(float(np.percentile(lat_ms, 99)), 3),
               "max_ms": round(float(lat_ms.max()), 3), f"recall@{args.k}": round(float(rec), 4),
               "same_person_recall": round(float(mate_rec), 4), "hnsw_m": index.hnsw_m,
               "ef_construction": index.ef_construction,
               "recall_queries": nr, "rss_growth_mib": round(rss_growth / 2**20, 1),
               "index_mib": round(index_bytes / 2**20, 1), "save_s": round(save_s, 2),
               "load_s": round(load_s, 2), "load_avg_before": round(load0, 2),
               "load_avg_after": round(os.getloadavg()[0], 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--recall-queries", type=int, default=300, help="queries checked against brute force")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exact-limit", type=int, default=100_000)
    ap.add_argument("--ef-search", type=int, nargs="+", default=[512], help="HNSW efSearch values to time")
    ap.add_argument("--hnsw-m", type=int, default=48)
    ap.add_argument("--ef-construction", type=int, default=40)
    ap.add_argument("--alpha", type=float, default=1.0, help="spectrum decay; 0 = uniform noise")
    ap.add_argument("--per-person", type=float, default=3.0, help="series per person")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}, "
          f"numpy {np.__version__}, alpha {args.alpha}, {args.per_person} series/person", flush=True)
    rows = [r for n in args.sizes for r in run_size(n, args)]
    k = f"recall@{args.k}"
    print(f"\n| vectors | index | efSearch | build s | p50 ms | p99 ms | {k} | same-person recall "
          f"| RSS growth MiB | index MiB | save s | load s |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        kind = r["kind"] if r["kind"] == "exact" else f"hnsw M{r['hnsw_m']} efC{r['ef_construction']}"
        print(f"| {r['n']:,} | {kind} | {r['ef_search'] or '-'} | {r['build_s']} | {r['p50_ms']} "
              f"| {r['p99_ms']} | {r[k]} | {r['same_person_recall']} | {r['rss_growth_mib']:,} "
              f"| {r['index_mib']:,} | {r['save_s']} | {r['load_s']} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k2: str(v) for k2, v in vars(args).items()}, "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
