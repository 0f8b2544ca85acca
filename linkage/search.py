"""Candidate search: the nearest stored embeddings of a series, per (route, model_name, model_version).

    CandidateIndex   {key: VectorIndex}, key = (route, model_name, model_version); vectors of
                     different keys are never compared. Ids are series_pk (int64); a series has at
                     most one vector in the whole index (the embedding table's series_pk is unique).
    VectorIndex      one faiss index; similarity = inner product of L2-normalized float32 vectors
                     (= cosine).

Exact search (IndexIDMap2 over IndexFlatIP) up to `exact_limit` vectors per key, then HNSW
(IndexIDMap over IndexHNSWFlat, M 48, efConstruction 40, efSearch 512) built from the stored
vectors. Measured with 256-d person-clustered synthetic vectors on 2 shared cores
(benchmarks/search.py, docs/benchmarks.md "Candidate search"): IVF-Flat needed 1/8 of its lists
probed for recall@20 0.96 at 200k (~125k vectors scanned per query at 10^6: > 10 ms), SQ8
codes were no faster; HNSW M 48 reached 0.984 at efSearch 256 (200k) and 0.961 at 512 (10^6,
5.4 ms p50 and 6.9 ms p99 on the quiet machine, 11.8 ms p99 on a shared one; M 32: 0.940;
a person's own series are missed more often than that, see the docs). Costs: a 10^6 build takes 6-13 min (when the limit is
crossed or on a rebuild; a saved index loads in ~5 s), and faiss HNSW cannot delete: a removed
or replaced vector is a tombstone (id -1 in the id map, skipped by an IDSelector) until they
exceed a quarter of the live vectors and the graph is rebuilt. Below exact_limit // 2 live
vectors the index returns to exact search. Builds hold the index's lock (searches wait).

Threads: each operation holds its VectorIndex's lock; CandidateIndex's lock guards the dict,
the watermark and multi-key changes. OpenMP thread counts are per calling thread, so they are
set around each faiss call and restored (VectorIndex._omp).

Persistence: save(dir) writes per key `<name>.faiss` + `<name>.faiss.json` (key, dim, count,
watermark, kind), then `candidates.json` (watermark, files), each via a temporary name and a
rename. load(dir) gives None when nothing was saved and raises IndexFileError when a file is
corrupt or inconsistent: the caller rebuilds with catch_up over all embedding rows. The
watermark (highest embedding.id seen) covers new and replaced embeddings; a series whose row
is deleted without a replacement must be passed to remove_series (ids() lists what is held).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger("linkage.search")

FORMAT = 1
MANIFEST = "candidates.json"
LIVE = faiss.IDSelectorRange(0, 2**62)      # tombstones have id -1


def _numpy_search(index, queries, k: int, **options):
    """faiss's numpy search, also after `faiss.contrib.torch_utils` was imported in this process
    (pytorch-metric-learning does): that swaps Index.search for a torch-aware one that takes no
    `params`, and keeps the numpy one as `search_numpy`."""
    return getattr(index, "search_numpy", index.search)(queries, k, **options)


class IndexFileError(ValueError):
    """A saved index is corrupt or does not match: rebuild it from the embedding table."""


def _unit_rows(vectors, dim: int | None = None) -> np.ndarray:
    x = np.array(vectors, dtype=np.float32, ndmin=2, order="C")
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"expected vectors of shape (n, {dim}), got {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError("vectors must be finite and non-zero")
    return x / norms


def _check(condition, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


class VectorIndex:
    def __init__(self, dim: int, key=None, *, exact_limit: int = 100_000, ef_search: int = 512,
                 hnsw_m: int = 48, ef_construction: int = 40, threads: int | None = None):
        self.dim, self.key, self.exact_limit, self.threads = int(dim), key, int(exact_limit), threads
        self.ef_search, self.hnsw_m, self.ef_construction = int(ef_search), int(hnsw_m), int(ef_construction)
        self.watermark, self._dead, self._live, self._lock = 0, 0, set(), threading.RLock()
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    @property
    def kind(self) -> str:
        return "exact" if isinstance(self._index, faiss.IndexIDMap2) else "hnsw"

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, series_pk) -> bool:
        return int(series_pk) in self._live

    def ids(self) -> np.ndarray:
        with self._lock:
            return np.fromiter(self._live, dtype=np.int64, count=len(self._live))

    @contextmanager
    def _omp(self, nq: int | None = None):
        """OpenMP threads for one faiss call: `threads` (default: faiss's) for builds and batch
        searches, 1 for a search of < 20 vectors. faiss splits a search by query only, and with 2
        threads one query waited for a descheduled thread on the busy 2-core machine
        (10k exact: 48 ms p50 against 0.5 ms with 1 thread)."""
        before = faiss.omp_get_max_threads()
        want = 1 if nq is not None and nq < 20 else (self.threads or before)
        faiss.omp_set_num_threads(int(want))
        try:
            yield
        finally:
            faiss.omp_set_num_threads(before)

    def _stored(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the live entries, copied out of the faiss index."""
        inner = faiss.downcast_index(self._index.index)
        flat = inner if self.kind == "exact" else faiss.downcast_index(inner.storage)
        n = flat.ntotal
        vecs = faiss.rev_swig_ptr(flat.codes.data(), n * self.dim * 4).view(np.float32).reshape(n, self.dim)
        ids = faiss.vector_to_array(self._index.id_map)
        return ids[ids >= 0], vecs[ids >= 0]        # boolean indexing copies

    def _rebuild(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        if len(ids) > self.exact_limit:
            hnsw = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = self.ef_construction
            index = faiss.IndexIDMap(hnsw)
            log.info("candidate index %s: building HNSW over %d vectors", self.key, len(ids))
        else:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if len(ids):
            index.add_with_ids(vecs, ids)
        self._index, self._dead = index, 0

    def add(self, ids, vectors) -> None:
        """Add vectors (rows are L2-normalized here); an id already present is replaced."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        x = _unit_rows(vectors, self.dim)
        _check(len(ids) == len(x), f"{len(ids)} ids for {len(x)} vectors")
        if len(np.unique(ids)) != len(ids):         # the last occurrence of an id wins
            keep = np.sort(len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1])
            ids, x = ids[keep], x[keep]
        with self._lock, self._omp():
            self._remove_locked(ids)
            if self.kind == "exact" and len(self._live) + len(ids) > self.exact_limit:
                old_ids, old = self._stored()
                self._rebuild(np.concatenate([old_ids, ids]), np.concatenate([old, x]))
            else:
                self._index.add_with_ids(x, ids)
            self._live.update(ids.tolist())
            self._maybe_rebuild()

    def remove(self, ids) -> int:
        """Remove ids (absent ones are ignored); returns how many were present."""
        with self._lock, self._omp():
            n = self._remove_locked(np.asarray(ids, dtype=np.int64).reshape(-1))
            self._maybe_rebuild()
            return n

    def _maybe_rebuild(self) -> None:
        if self.kind == "hnsw" and (len(self._live) < self.exact_limit // 2
                                    or self._dead > max(1000, len(self._live) // 4)):
            self._rebuild(*self._stored())

    def _remove_locked(self, ids: np.ndarray) -> int:
        present = np.array([i for i in ids.tolist() if i in self._live], dtype=np.int64)
        if len(present) == 0:
            return 0
        elif self.kind == "exact":
            self._index.remove_ids(faiss.IDSelectorBatch(len(present), faiss.swig_ptr(present)))
        else:                                       # tombstones: faiss HNSW cannot delete
            id_map = self._index.id_map
            view = faiss.rev_swig_ptr(id_map.data(), id_map.size())
            view[np.isin(view, present)] = -1
            self._dead += len(present)
        self._live.difference_update(present.tolist())
        return len(present)

    def search(self, vectors, k: int, exclude=None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k (ids, scores) per query row, best first, never returning an id in `exclude`."""
        q = _unit_rows(vectors, self.dim)
        skip = {int(i) for i in exclude} if exclude is not None else set()
        with self._lock, self._omp(len(q)):
            want = min(int(k) + len(skip), len(self._live))   # each excluded id takes at most one slot
            if k <= 0 or want <= 0:
                return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in q]
            if self.kind == "exact":
                scores, found = _numpy_search(self._index, q, want)
            else:
                params = faiss.SearchParametersHNSW(sel=LIVE, efSearch=max(self.ef_search, want))
                scores, found = _numpy_search(self._index, q, want, params=params)
        keep = (found >= 0) & ~np.isin(found, list(skip))
        return [(f[ok][:k], s[ok][:k]) for f, s, ok in zip(found, scores, keep)]

    def save(self, path) -> None:
        """`path` (faiss.write_index) and `path`.json (key, dim, count, watermark, kind)."""
        path = Path(path)
        with self._lock:
            _replace(path, lambda p: faiss.write_index(self._index, p))
            meta = json.dumps({"format": FORMAT, "key": list(self.key) if self.key else None,
                               "dim": self.dim, "count": len(self._live), "watermark": int(self.watermark),
                               "kind": self.kind, "total": int(self._index.ntotal), "faiss": faiss.__version__})
            _replace(Path(str(path) + ".json"), lambda p: Path(p).write_text(meta))

    @classmethod
    def load(cls, path, **options) -> "VectorIndex":
        """Read save()'s file pair; raises IndexFileError when it is missing, corrupt or inconsistent."""
        path = Path(path)
        try:
            meta = json.loads(Path(str(path) + ".json").read_text())
            index = faiss.read_index(str(path))
            _check(meta["format"] == FORMAT, f"format {meta['format']}, expected {FORMAT}")
            obj = cls(int(meta["dim"]), tuple(meta["key"]) if meta["key"] else None, **options)
            inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else None
            expected = {"exact": (faiss.IndexIDMap2, faiss.IndexFlatIP),
                        "hnsw": (faiss.IndexIDMap, faiss.IndexHNSWFlat)}[meta["kind"]]
            _check(type(index) is expected[0] and type(inner) is expected[1],
                   f"index is {type(index).__name__}/{type(inner).__name__}, sidecar says {meta['kind']}")
            _check(index.metric_type == faiss.METRIC_INNER_PRODUCT and index.d == obj.dim,
                   f"metric {index.metric_type} / dim {index.d}, sidecar dim {obj.dim}")
            ids = faiss.vector_to_array(index.id_map)
            live = ids[ids >= 0]
            _check(len(live) == meta["count"] == len(np.unique(live)),
                   f"{len(live)} live ids, sidecar count {meta['count']}")
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
            raise IndexFileError(f"candidate index {path}: unreadable or inconsistent ({e}); "
                                 "rebuild it from the embedding table") from e
        obj._index, obj._live, obj._dead = index, set(live.tolist()), int(len(ids) - len(live))
        obj.watermark = int(meta["watermark"])
        return obj


class CandidateIndex:
    """VectorIndex per (route, model_name, model_version); options go to every VectorIndex."""

    def __init__(self, **options):
        self.options, self._watermark, self._lock = options, 0, threading.RLock()
        self._indexes: dict[tuple[str, str, str], VectorIndex] = {}

    @property
    def watermark(self) -> int:
        return self._watermark

    def keys(self) -> list[tuple[str, str, str]]:
        return list(self._indexes)

    def get(self, key) -> VectorIndex | None:
        return self._indexes.get(tuple(key))

    def __len__(self) -> int:
        return sum(len(v) for v in list(self._indexes.values()))

    def add(self, key, ids, vectors, embedding_ids=None) -> None:
        """Add or replace series vectors under `key`; a series moves out of any other key."""
        key = tuple(str(part) for part in key)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        x = np.array(vectors, dtype=np.float32, ndmin=2)
        with self._lock:
            index = self._indexes.get(key)
            if index is None:
                index = self._indexes[key] = VectorIndex(x.shape[1], key, **self.options)
            index.add(ids, x)
            for other_key, other in self._indexes.items():
                if other_key != key:
                    other.remove(ids)
            if embedding_ids is not None and len(embedding_ids):
                top = int(np.max(embedding_ids))
                index.watermark = max(index.watermark, top)
                self._watermark = max(self._watermark, top)

    def search(self, key, vector, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (series_pk, cosine) of one vector among the series of `key`."""
        index = self._indexes.get(tuple(key))
        if index is None:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        return index.search(vector, k, exclude)[0]

    def remove_series(self, ids) -> int:
        with self._lock:
            return sum(index.remove(ids) for index in self._indexes.values())

    def catch_up(self, rows, batch: int = 10_000) -> int:
        """Apply embedding rows (id, series_pk, route, model_name, model_version, dim, vector bytes),
        in id order; returns how many were indexed. Bad rows are logged and skipped."""
        done, pending = 0, {}
        for row in rows:
            pending[int(row[1])] = row               # a later row of the same series wins
            if len(pending) >= batch:
                done, pending = done + self._apply(list(pending.values())), {}
        return done + self._apply(list(pending.values()))

    def _apply(self, rows) -> int:
        groups: dict[tuple, tuple[list, list, list]] = {}
        for emb_id, series_pk, route, model_name, model_version, dim, blob in rows:
            key = (str(route), str(model_name), str(model_version))
            existing = self._indexes.get(key)
            expect = existing.dim if existing is not None else len(groups[key][2][0]) if key in groups else dim
            if len(blob) != 4 * dim or dim != expect or dim <= 0:
                log.warning("embedding %s (series %s, %s): %d bytes, dim %s, index dim %s; skipped",
                            emb_id, series_pk, "/".join(key), len(blob), dim, expect)
                continue
            vec = np.frombuffer(blob, dtype="<f4").astype(np.float32)
            norm = float(np.linalg.norm(vec))
            if not np.isfinite(norm) or norm == 0:
                log.warning("embedding %s (series %s): zero or non-finite vector; skipped", emb_id, series_pk)
                continue
            g = groups.setdefault(key, ([], [], []))
            g[0].append(int(emb_id)), g[1].append(int(series_pk)), g[2].append(vec / norm)
        with self._lock:
            for key, (emb_ids, ids, vecs) in groups.items():
                self.add(key, ids, np.stack(vecs), embedding_ids=emb_ids)
            self._watermark = max([self._watermark] + [int(r[0]) for r in rows])
        return sum(len(g[1]) for g in groups.values())

    def save(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            files = []
            for key, index in self._indexes.items():
                slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", "__".join(key))[:80]
                name = f"{slug}-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:10]}.faiss"
                index.save(directory / name)
                files.append({"key": list(key), "file": name})
            manifest = json.dumps({"format": FORMAT, "watermark": self._watermark, "indexes": files}, indent=1)
            _replace(directory / MANIFEST, lambda p: Path(p).write_text(manifest))

    @classmethod
    def load(cls, directory, **options) -> "CandidateIndex | None":
        """None when `directory` holds no saved index; IndexFileError when one is unusable."""
        path = Path(directory) / MANIFEST
        if not path.exists():
            return None
        obj = cls(**options)
        try:
            manifest = json.loads(path.read_text())
            _check(manifest.get("format") == FORMAT, f"format {manifest.get('format')}, expected {FORMAT}")
            obj._watermark = int(manifest["watermark"])
            entries = [(tuple(e["key"]), e["file"]) for e in manifest["indexes"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise IndexFileError(f"candidate index {path}: unreadable ({e}); rebuild it") from e
        for key, name in entries:
            index = VectorIndex.load(Path(directory) / name, **options)
            if index.key != key:
                raise IndexFileError(f"candidate index {name}: holds key {index.key}, manifest says {key}")
            obj._indexes[key] = index
        return obj
