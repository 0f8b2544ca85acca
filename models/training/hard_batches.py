"""Training batches of look-alike persons: hard negatives chosen by the model being trained.

pytorch-metric-learning's MPerClassSampler draws persons at random. Among thousands of
persons, the few that the network still confuses (siblings in the synthetic cohorts: 7 of the
9 Rank-1 misses of a synthetic-only dermoscopy model; in an archive, whoever looks alike) almost
never meet in one batch, so the miner never sees them as negatives. Here each batch is made of
a few *neighbourhoods*: a random person plus the persons whose embedding centres are nearest
to it under the current network, re-computed before every epoch. No family truth is needed,
so it works the same on a site's archive (`--from-db`) as on synthetic cohorts.

Written here because no library sampler does it: PML's HierarchicalSampler needs fixed
super-labels, and its miners only see the batch they are given. faiss does the search.

Noisy labels: a neighbour that looks as much like the person as each one's own examples look
like each other is probably the same person filed under another ID. Feeding it in as a hard
negative would teach the network to tell a person from themself, so it is left out, unless the
labels are known to be right (`trust_labels`, synthetic truth): there the closest look-alikes
are the siblings the network most needs to see.
"""

from __future__ import annotations

import numpy as np


def class_centres(emb: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalized mean embedding of each class, and each class's tightness: how alike its own
    examples are (mean cosine of each example to the mean of the class's other examples; for a
    class with one example, the median tightness of the others)."""
    emb = emb.astype(np.float32, copy=False)
    sums = np.zeros((n_classes, emb.shape[1]), np.float32)
    np.add.at(sums, labels, emb)
    centres = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    others = sums[labels] - emb
    norms = np.linalg.norm(others, axis=1)
    counts = np.bincount(labels, minlength=n_classes)
    multi = counts[labels] > 1
    loo = np.where(multi, np.einsum("ij,ij->i", emb, others) / np.maximum(norms, 1e-12), 0.0)
    tightness = np.bincount(labels, weights=loo, minlength=n_classes) / np.maximum(counts, 1)
    fallback = float(np.median(tightness[counts > 1])) if (counts > 1).any() else 1.0
    tightness[counts <= 1] = fallback
    return centres, tightness


def neighbour_lists(centres: np.ndarray, tightness: np.ndarray, k: int) -> tuple[list[np.ndarray], int]:
    """For each class, up to k other classes, nearest first, leaving out those that look as much
    like the class as the examples of each of the two look like each other (probably the same
    person under another ID); and how many such pairs were left out."""
    import faiss
    k = min(k + 1, len(centres))
    index = faiss.IndexFlatIP(centres.shape[1])
    index.add(np.ascontiguousarray(centres, dtype=np.float32))
    sims, ids = index.search(np.ascontiguousarray(centres, dtype=np.float32), k)
    out, left_out = [], 0
    for c in range(len(centres)):
        other = (ids[c] >= 0) & (ids[c] != c)
        keep = other & (sims[c] < np.maximum(tightness[c], tightness[np.maximum(ids[c], 0)]))
        left_out += int((other & ~keep).sum())
        out.append(ids[c][keep].astype(np.int64))
    return out, left_out


def hard_batch_order(labels: np.ndarray, neighbours: list[np.ndarray], m: int, batch: int, length: int,
                     group: int, rng: np.random.Generator) -> np.ndarray:
    """Example indices, `batch` at a time: batch // m classes, m examples each (drawn again when a
    class has fewer), the classes in neighbourhoods of up to `group` (a random seed class and its
    nearest unused neighbours). Every class is used once before any class is used again, so an
    epoch still covers all persons."""
    labels = np.asarray(labels)
    n_classes = len(neighbours)
    per_batch = batch // m
    if per_batch > n_classes:
        raise ValueError(f"a batch of {per_batch} classes needs at least that many classes (have {n_classes})")
    by_class = np.argsort(labels, kind="stable")
    members = np.split(by_class, np.searchsorted(labels[by_class], np.arange(1, n_classes)))
    used = np.zeros(n_classes, bool)
    queue: list[int] = []
    order: list[np.ndarray] = []
    total = 0
    while total < length:
        chosen: list[int] = []
        while len(chosen) < per_batch:
            if not queue:
                if used.all():
                    used[:] = False
                    used[chosen] = True
                queue = [int(c) for c in rng.permutation(np.flatnonzero(~used))]
            seed = queue.pop()
            if used[seed]:
                continue
            hood = [seed] + [int(c) for c in neighbours[seed] if not used[c]]
            hood = hood[:min(group, per_batch - len(chosen))]
            used[hood] = True
            chosen.extend(hood)
        for c in chosen:
            pool = members[c]
            order.append(rng.choice(pool, size=m, replace=len(pool) < m))
        total += per_batch * m
    return np.concatenate(order)[:length]


def epoch_order(emb: np.ndarray, labels: np.ndarray, n_classes: int, m: int, batch: int, length: int, group: int,
                rng: np.random.Generator, trust_labels: bool = False) -> tuple[np.ndarray, dict]:
    """One epoch's example order from the training examples' embeddings, and what it looked like
    (mean cosine of a class to its nearest neighbour; neighbour pairs left out as probable
    duplicates). `trust_labels` (labels known to be right, as a synthetic cohort's truth): keep
    even the closest look-alikes, the hardest negatives there are."""
    centres, tightness = class_centres(emb, labels, n_classes)
    if trust_labels:
        tightness = np.full(n_classes, np.inf)
    neighbours, left_out = neighbour_lists(centres, tightness, k=4 * group)
    order = hard_batch_order(labels, neighbours, m, batch, length, group, rng)
    nearest = [float(centres[c] @ centres[nb[0]]) for c, nb in enumerate(neighbours) if len(nb)]
    stats = {"nearest_class_cosine": round(float(np.mean(nearest)), 4) if nearest else None,
             "probable_duplicates_left_out": left_out}
    return order, stats
