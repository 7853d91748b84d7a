"""Feature-gate alignment (FGC_SPEC §5): do gate space and feature space agree on neighbours?

  knn_overlap(a, b, k)        mean over examples of |kNN_a(i) ∩ kNN_b(i)| / k
  class_consistency(x, y, k)  mean fraction of an example's kNN in x that share its label

Neighbours are by cosine similarity, the example itself excluded. Two unrelated spaces
give an overlap of about k / (N - 1) (chance); identical spaces give 1. Everything is
NumPy and processed in row chunks, so 10k-50k examples fit in memory (a chunk holds a
[chunk, N] float32 similarity block). Ties in similarity are broken arbitrarily
(but deterministically).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

DEFAULT_CHUNK = 1024


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a [examples, dims] array, got shape {x.shape}")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)  # a zero row has similarity 0 to everything


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n - 1:
        raise ValueError(f"k={k} must be in [1, {n - 1}] for {n} examples")


def knn_chunks(x: np.ndarray, k: int, chunk: int = DEFAULT_CHUNK) -> Iterator[tuple[slice, np.ndarray]]:
    """Yields `(rows, neighbours)`: the indices [len(rows), k] of each row's k most cosine-similar
    other rows (unordered within the k)."""
    xn = _normalise(x)
    n = len(xn)
    _check_k(k, n)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        sims = xn[rows] @ xn.T
        sims[np.arange(rows.stop - start), np.arange(start, rows.stop)] = -np.inf  # not itself
        yield rows, np.argpartition(-sims, k - 1, axis=1)[:, :k]


def knn_indices(x: np.ndarray, k: int, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """[N, k] indices of each example's k nearest neighbours (cosine, self excluded)."""
    return np.concatenate([nn for _, nn in knn_chunks(x, k, chunk)], axis=0)


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int, chunk: int = DEFAULT_CHUNK) -> float:
    """Mean over examples of |kNN_a(i) ∩ kNN_b(i)| / k; `a`, `b` are [N, *] views of the same N examples."""
    if len(a) != len(b):
        raise ValueError(f"the two spaces hold {len(a)} and {len(b)} examples; they must match")
    hits = 0
    for (rows, nn_a), (_, nn_b) in zip(knn_chunks(a, k, chunk), knn_chunks(b, k, chunk)):
        hits += int(np.sum(nn_a[:, :, None] == nn_b[:, None, :]))  # neighbour sets have no repeats
    return hits / (len(a) * k)


def class_consistency(x: np.ndarray, labels: np.ndarray, k: int, chunk: int = DEFAULT_CHUNK) -> float:
    """Mean over examples of the fraction of its k nearest neighbours in `x` with its label."""
    labels = np.asarray(labels)
    if len(labels) != len(x):
        raise ValueError(f"{len(labels)} labels for {len(x)} examples")
    same = 0
    for rows, nn in knn_chunks(x, k, chunk):
        same += int(np.sum(labels[nn] == labels[rows, None]))
    return same / (len(x) * k)


def chance_overlap(n: int, k: int) -> float:
    """Expected overlap of two independent random k-subsets of the other n - 1 examples."""
    return k / (n - 1)


def alignment_report(features: Sequence[np.ndarray], gate_probs: Sequence[np.ndarray],
                     labels: np.ndarray, ks: Sequence[int] = (5, 10, 50),
                     fgc_blocks: Sequence[int] = (), consistency_k: int = 10) -> dict:
    """Per gated block: feature/gate kNN overlap at each k, and class consistency of both spaces.

    `features[b]`, `gate_probs[b]`: [N, C_b] pooled pre-gate features and gate
    probabilities `sigmoid(log_alpha)` of block b. ks larger than N - 1 are skipped.
    """
    n = len(labels)
    ks = [k for k in ks if 1 <= k <= n - 1]
    ck = min(consistency_k, n - 1)
    blocks = []
    for b, (f, g) in enumerate(zip(features, gate_probs)):
        blocks.append({
            "block": b,
            "fgc": b in set(fgc_blocks),
            "overlap": {str(k): knn_overlap(f, g, k) for k in ks},
            "class_consistency_gate": class_consistency(g, labels, ck),
            "class_consistency_feature": class_consistency(f, labels, ck),
        })
    return {"num_examples": n, "ks": ks, "consistency_k": ck, "gate_space": "gate probabilities",
            "feature_space": "pooled pre-gate features",
            "chance_overlap": {str(k): chance_overlap(n, k) for k in ks},
            "fgc_blocks": sorted(set(fgc_blocks)), "blocks": blocks}
