"""linkage.search: results checked against a numpy brute force, never against the index itself."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest

from linkage.search import CandidateIndex, IndexFileError, VectorIndex

DIM = 32
KEY = ("chest_xr", "resnet10", "1")


def unit(n, dim=DIM, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(ids, vecs, q, k, exclude=()):
    """Top-k (ids, scores) by cosine, computed with numpy in float64."""
    s = vecs.astype(np.float64) @ q.astype(np.float64)
    order = [i for i in np.argsort(-s, kind="stable") if ids[i] not in set(exclude)][:k]
    return ids[order], s[order]


def row(emb_id, series_pk, vec, key=KEY, dim=None):
    vec = np.asarray(vec, dtype="<f4")
    return (emb_id, series_pk, *key, len(vec) if dim is None else dim, vec.tobytes())


def test_exact_search_matches_brute_force():
    x, ids = unit(600), np.arange(1000, 1600, dtype=np.int64)
    index = VectorIndex(DIM)
    index.add(ids[:300], x[:300])
    index.add(ids[300:], x[300:])                   # several adds
    q = unit(15, seed=1)
    results = index.search(q, 10)
    assert index.kind == "exact" and len(index) == 600 and len(results) == 15
    for (got_ids, got_scores), query in zip(results, q):
        want_ids, want_scores = brute(ids, x, query, 10)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    assert index.search(q[0], 0)[0][0].size == 0
    assert VectorIndex(DIM).search(q[0], 5)[0][0].size == 0      # empty index


def test_add_normalizes_and_rejects_bad_input():
    index = VectorIndex(DIM)
    index.add([1], 3.0 * unit(1))
    ids, scores = index.search(unit(1), 1)[0]
    assert ids.tolist() == [1] and scores[0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError):
        index.add([2], np.zeros((1, DIM)))
    with pytest.raises(ValueError):
        index.add([2], unit(1, dim=DIM + 1))
    with pytest.raises(ValueError):
        index.add([2, 3], unit(1))


def test_add_replaces_existing_id():
    x = unit(50)
    index = VectorIndex(DIM)
    index.add(np.arange(50), x)
    new = unit(1, seed=7)[0]
    index.add([7], new)
    assert len(index) == 50
    vecs = x.copy()
    vecs[7] = new
    for q in (x[7], new, x[3]):
        got_ids, got_scores = index.search(q, 50)[0]
        want_ids, want_scores = brute(np.arange(50), vecs, q, 50)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
        assert got_ids.tolist().count(7) == 1
    index.add([9, 9], np.stack([x[1], x[2]]))      # within one call the last vector wins
    got = dict(zip(*index.search(x[2], 50)[0]))
    assert len(index) == 50 and got[9] == pytest.approx(1.0, abs=1e-5)


def test_remove():
    x, ids = unit(100), np.arange(100, dtype=np.int64)
    index = VectorIndex(DIM)
    index.add(ids, x)
    assert index.remove([5, 6, 999]) == 2 and index.remove([5]) == 0
    assert len(index) == 98 and 5 not in index and 7 in index
    keep = ~np.isin(ids, [5, 6])
    got_ids, _ = index.search(x[5], 98)[0]
    want_ids, _ = brute(ids[keep], x[keep], x[5], 98)
    np.testing.assert_array_equal(got_ids, want_ids)
    assert sorted(index.ids().tolist()) == sorted(ids[keep].tolist())


def test_exclude_returns_k_others():
    x, ids = unit(200), np.arange(200, dtype=np.int64) + 10
    index = VectorIndex(DIM)
    index.add(ids, x)
    skip = [ids[3], ids[4], 123456]
    got_ids, got_scores = index.search(x[3], 10, exclude=skip)[0]
    want_ids, want_scores = brute(ids, x, x[3], 10, exclude=skip)
    assert len(got_ids) == 10 and ids[3] not in got_ids and ids[4] not in got_ids
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)


def test_keys_isolate_routes_and_model_versions():
    x = unit(40)
    cand = CandidateIndex()
    other_version = ("chest_xr", "resnet10", "2")
    other_route = ("brain_mr", "resnet10", "1")
    cand.add(KEY, np.arange(0, 10), x[:10])
    cand.add(other_version, np.arange(10, 20), x[10:20])
    cand.add(other_route, np.arange(20, 30), x[20:30])
    for key, lo in ((KEY, 0), (other_version, 10), (other_route, 20)):
        ids, _ = cand.search(key, x[0], 50)
        assert sorted(ids.tolist()) == list(range(lo, lo + 10))
    assert cand.search(("fundus", "resnet10", "1"), x[0], 5)[0].size == 0
    cand.add(other_route, [3], x[3])                # series 3 re-processed under another route
    assert 3 not in cand.get(KEY) and 3 in cand.get(other_route) and len(cand) == 30
    assert cand.remove_series([3, 15]) == 2 and len(cand) == 28


def test_catch_up_decodes_bytes_and_skips_bad_rows(caplog):
    x = unit(6)
    rows = [row(1, 101, 2.0 * x[0]), row(2, 102, x[1]), row(3, 103, x[2]),
            row(4, 104, unit(1, dim=16)[0]),                    # dim 16 in a dim-32 key
            row(5, 105, x[3], dim=64),                          # dim column disagrees with the bytes
            row(6, 106, np.zeros(DIM)),                         # not a direction
            row(7, 102, x[4]),                                  # series 102 re-processed
            row(8, 107, x[5], key=("fundus", "resnet10", "1")),
            (9, 109, *KEY, DIM, x[0].astype("<f4").tobytes()[:-1])]     # truncated bytes
    cand = CandidateIndex()
    with caplog.at_level(logging.WARNING, logger="linkage.search"):
        assert cand.catch_up(rows[:3]) == 3
        assert cand.catch_up(rows[3:]) == 2
    assert len(caplog.records) == 4 and "embedding 4" in caplog.text and "embedding 5" in caplog.text
    assert cand.watermark == 9 and cand.get(KEY).watermark == 7
    assert cand.catch_up([row(10, 108, x[0], dim=33)]) == 0 and cand.watermark == 10   # skipped, still seen
    assert sorted(cand.get(KEY).ids().tolist()) == [101, 102, 103]
    cand.remove_series([101, 102, 103])             # an emptied index keeps its dim
    assert cand.catch_up([row(11, 110, unit(1, dim=16)[0])]) == 0 and len(cand.get(KEY)) == 0
    cand.catch_up([row(12, 101, 2.0 * x[0]), row(13, 102, x[4]), row(14, 103, x[2])])
    ids, scores = cand.search(KEY, x[0], 3)
    want_ids, want_scores = brute(np.array([101, 102, 103]), np.stack([x[0], x[4], x[2]]), x[0], 3)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert scores[0] == pytest.approx(1.0, abs=1e-5)             # re-normalized
    assert cand.search(("fundus", "resnet10", "1"), x[5], 1)[0].tolist() == [107]


def test_catch_up_later_row_wins_across_keys():
    x = unit(2)
    cand = CandidateIndex()
    other = ("brain_mr", "resnet10", "1")
    rows = [row(1, 5, x[0], key=other), row(2, 5, x[1], key=KEY)]
    cand.catch_up(rows)                             # one batch: only the last row is applied
    assert 5 in cand.get(KEY) and cand.get(other) is None
    cand = CandidateIndex()
    cand.catch_up(rows, batch=1)                    # row by row: the series moves
    assert 5 in cand.get(KEY) and 5 not in cand.get(other) and len(cand) == 1
    assert cand.search(KEY, x[1], 1)[1][0] == pytest.approx(1.0, abs=1e-5)


def recall(index, ids, x, q, k):
    hits = 0
    for (got, _), query in zip(index.search(q, k), q):
        hits += len(set(got.tolist()) & set(brute(ids, x, query, k)[0].tolist()))
    return hits / (k * len(q))


def test_approximate_mode_recall_removal_and_fallback():
    x, ids = unit(5000, seed=3), np.arange(5000, dtype=np.int64) + 1
    index = VectorIndex(DIM, exact_limit=2000, threads=2)
    index.add(ids[:1500], x[:1500])
    assert index.kind == "exact"
    index.add(ids[1500:], x[1500:])
    assert index.kind == "hnsw" and len(index) == 5000
    q = unit(100, seed=4)
    assert recall(index, ids, x, q, 10) >= 0.9
    # removal and replacement leave tombstones that are never returned
    gone = ids[:500]
    index.remove(gone)
    index.add([ids[600]], x[0])
    y = x.copy()
    y[600] = x[0]
    keep = ~np.isin(ids, gone)
    assert index.kind == "hnsw" and len(index) == 4500
    got, _ = index.search(x[0], 10)[0]
    assert got[0] == ids[600] and not set(got.tolist()) & set(gone.tolist())
    assert recall(index, ids[keep], y[keep], q, 10) >= 0.9
    index.remove(ids[1000:2000])                    # 1501 tombstones > a quarter: rebuilt
    keep &= ~np.isin(ids, ids[1000:2000])
    assert index.kind == "hnsw" and index._dead == 0 and index._index.ntotal == 3500
    assert recall(index, ids[keep], y[keep], q, 10) >= 0.9
    index.remove(ids[2000:4600])                    # 900 left < exact_limit // 2: exact again
    keep &= ~np.isin(ids, ids[2000:4600])
    assert index.kind == "exact" and len(index) == 900
    assert recall(index, ids[keep], y[keep], q, 10) == 1.0


def test_save_load_round_trip(tmp_path):
    x = unit(3000, seed=5)
    cand = CandidateIndex(exact_limit=2000)
    other = ("brain_mr", "resnet10", "1/b")          # a '/' must not escape the directory
    cand.catch_up(row(i + 1, 100 + i, x[i], key=KEY if i < 2500 else other) for i in range(3000))
    cand.remove_series([100, 101])
    assert cand.get(KEY).kind == "hnsw" and cand.get(other).kind == "exact"
    q = unit(20, seed=6)
    before = [cand.search(k, v, 10, exclude=[102]) for k in (KEY, other) for v in q]
    cand.save(tmp_path / "idx")
    cand.save(tmp_path / "idx")                     # saving again replaces the files
    loaded = CandidateIndex.load(tmp_path / "idx", exact_limit=2000)
    assert loaded.watermark == cand.watermark == 3000
    assert set(loaded.keys()) == {KEY, other} and len(loaded) == 2998
    assert loaded.get(KEY).kind == "hnsw" and 100 not in loaded.get(KEY) and 102 in loaded.get(KEY)
    after = [loaded.search(k, v, 10, exclude=[102]) for k in (KEY, other) for v in q]
    for (a_ids, a_s), (b_ids, b_s) in zip(before, after):
        np.testing.assert_array_equal(a_ids, b_ids)
        np.testing.assert_allclose(a_s, b_s)
    loaded.catch_up([row(3001, 100, x[0])])         # continues from the watermark
    assert loaded.watermark == 3001 and 100 in loaded.get(KEY)
    assert CandidateIndex.load(tmp_path / "nothing") is None


def test_corrupt_or_mismatched_files_raise(tmp_path):
    cand = CandidateIndex()
    cand.add(KEY, np.arange(10), unit(10), embedding_ids=np.arange(10) + 1)
    directory = tmp_path / "idx"
    cand.save(directory)
    (faiss_file,) = directory.glob("*.faiss")
    sidecar = faiss_file.with_name(faiss_file.name + ".json")
    good_index, good_meta = faiss_file.read_bytes(), sidecar.read_text()

    faiss_file.write_bytes(good_index[: len(good_index) // 2])          # truncated
    with pytest.raises(IndexFileError, match=faiss_file.name):
        CandidateIndex.load(directory)
    faiss_file.write_bytes(b"not an index" * 10)
    with pytest.raises(IndexFileError, match="rebuild"):
        CandidateIndex.load(directory)
    faiss_file.write_bytes(good_index)
    meta = json.loads(good_meta)
    for change in ({"count": 11}, {"dim": 64}, {"kind": "hnsw"}, {"format": 99}):
        sidecar.write_text(json.dumps({**meta, **change}))
        with pytest.raises(IndexFileError):
            CandidateIndex.load(directory)
    sidecar.write_text(json.dumps({**meta, "key": ["fundus", "resnet10", "1"]}))
    with pytest.raises(IndexFileError, match="manifest"):
        CandidateIndex.load(directory)
    sidecar.write_text(good_meta)
    assert len(CandidateIndex.load(directory)) == 10
    (directory / "candidates.json").write_text("{")
    with pytest.raises(IndexFileError):
        CandidateIndex.load(directory)


def test_concurrent_add_and_search():
    x = unit(3000, seed=8)
    index = VectorIndex(DIM, exact_limit=1500)
    index.add(np.arange(100), x[:100])
    errors = []

    def searcher():
        try:
            for i in range(300):
                ids, scores = index.search(x[i], 5)[0]
                assert len(ids) == 5 and np.all(np.diff(scores) <= 1e-6)
        except Exception as e:                      # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for t in threads:
        t.start()
    for s in range(100, 3000, 100):                 # crosses exact_limit while searching
        index.add(np.arange(s, s + 100), x[s:s + 100])
        index.remove([s - 50])
    for t in threads:
        t.join()
    assert not errors and index.kind == "hnsw" and len(index) == 3000 - 29


def test_search_survives_faiss_torch_utils_being_imported():
    # pytorch-metric-learning (training) imports it, and it replaces faiss's Index.search
    import faiss.contrib.torch_utils  # noqa: F401

    x = unit(3000, seed=5)
    index = VectorIndex(DIM, exact_limit=1000)
    index.add(np.arange(3000), x)
    assert index.kind == "hnsw"
    ids, _ = index.search(x[7], 3)[0]
    assert ids[0] == 7
