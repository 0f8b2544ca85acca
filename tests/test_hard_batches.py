"""Hard-negative batches (models.training.hard_batches): look-alike persons share a batch, every person is
used each pass, probable duplicates are not made negatives, and training runs with them."""

from __future__ import annotations

import numpy as np

from models.training import hard_batches as H, train as training


def _look_alike_pairs(n_pairs: int, per_class: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings where class 2k and 2k+1 are close (siblings) and pairs are far apart."""
    dim = 64
    pair_centre = rng.normal(size=(n_pairs, dim))
    emb, labels = [], []
    for c in range(2 * n_pairs):
        centre = pair_centre[c // 2] + 0.25 * rng.normal(size=dim)
        for _ in range(per_class):
            emb.append(centre + 0.05 * rng.normal(size=dim))
            labels.append(c)
    emb = np.asarray(emb, np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), np.asarray(labels)


def test_look_alike_persons_share_a_batch_and_every_person_is_used():
    rng = np.random.default_rng(0)
    emb, labels = _look_alike_pairs(n_pairs=32, per_class=3, rng=rng)
    n_classes, m, batch = 64, 3, 24                      # 8 persons a batch, 8 batches
    length = n_classes * m                               # one pass over the persons
    order, stats = H.epoch_order(emb, labels, n_classes, m, batch, length, group=2, rng=rng)
    assert len(order) == length
    per_class = np.bincount(labels[order], minlength=n_classes)
    assert (per_class == m).all()                        # each person once, m examples
    for start in range(0, length, batch):
        present = set(labels[order[start:start + batch]].tolist())
        assert len(present) == batch // m
        assert all((c ^ 1) in present for c in present), present      # siblings together
    assert stats["nearest_class_cosine"] > 0.8 and stats["probable_duplicates_left_out"] == 0


def test_random_batches_rarely_hold_siblings():
    """The baseline the sampler is for: MPerClassSampler puts a sibling pair together by chance only."""
    from pytorch_metric_learning.samplers import MPerClassSampler
    rng = np.random.default_rng(1)
    _, labels = _look_alike_pairs(n_pairs=30, per_class=3, rng=rng)
    np.random.seed(0)
    order = np.fromiter(iter(MPerClassSampler(labels, 3, 24, length_before_new_iter=180)), dtype=np.int64)
    together = sum(sum((c ^ 1) in present for c in present)
                   for present in (set(labels[order[s:s + 24]].tolist()) for s in range(0, 180, 24)))
    assert together < 0.5 * 60


def test_probable_duplicate_is_not_a_hard_negative():
    rng = np.random.default_rng(2)
    emb, labels = _look_alike_pairs(n_pairs=5, per_class=3, rng=rng)
    # class 10: the same person as class 0 under another ID (its images are class 0's, re-noised)
    # (other images of that person: class 0's centre, new per-image noise as in _look_alike_pairs)
    centre0 = emb[labels == 0].mean(axis=0)
    dup = centre0 + 0.05 / 8 * rng.normal(size=(3, emb.shape[1])).astype(np.float32)
    emb = np.concatenate([emb, dup / np.linalg.norm(dup, axis=1, keepdims=True)])
    labels = np.concatenate([labels, np.full(3, 10)])
    centres, tightness = H.class_centres(emb, labels, 11)
    assert float(centres[0] @ centres[10]) >= tightness[0]
    neighbours, left_out = H.neighbour_lists(centres, tightness, k=5)
    assert left_out == 2
    assert 10 not in neighbours[0].tolist() and 0 not in neighbours[10].tolist()
    assert neighbours[0][0] == 1                          # the sibling is still the nearest negative
    order, stats = H.epoch_order(emb, labels, 11, m=3, batch=6, length=33, group=2, rng=rng, trust_labels=True)
    assert stats["probable_duplicates_left_out"] == 0                                  # --trust-labels
    batches = [set(labels[order[s:s + 6]].tolist()) for s in range(0, 33, 6)]
    assert any({0, 10} <= b for b in batches)


def test_too_few_persons_for_a_batch_is_a_clear_error():
    labels = np.repeat(np.arange(3), 2)
    try:
        H.hard_batch_order(labels, [np.array([1]), np.array([0]), np.array([0])], m=2, batch=8, length=8, group=2,
                           rng=np.random.default_rng(0))
    except ValueError as err:
        assert "needs at least" in str(err)
    else:
        raise AssertionError("no error for 4 classes a batch out of 3")


def test_training_with_hard_batches(tmp_path):
    cfg = training.TrainConfig(route="chest_xr", out=tmp_path / "t", synthetic=12, epochs=2, size=48, batch_size=12,
                               m_per_class=2, loss="multisimilarity", threads=1, val_fraction=0.3, hard_batches=3)
    card = training.train(cfg, progress=False)
    history = card["training"]["history"]
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert all(h["mining_seconds"] >= 0 and h["nearest_class_cosine"] is not None for h in history)
    assert card["training"]["sampler"].startswith("hard batches: neighbourhoods of 3")
