"""K-fold partitions of the training set: the subset queries of the CiF experiments.

Fold ``k`` is the set of training examples removed in the k-th leave-fold-out
query. The paper's fold workloads use K in {5, 50, 100, 250, 500} on
MNIST-10% and CIFAR-10 (sections 5.1 and 5.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["folds_to_mask", "kfold_indices"]


def kfold_indices(
    num_examples: int,
    num_folds: int,
    *,
    seed: Any = 0,
    labels: Any = None,
) -> list[np.ndarray]:
    """A random partition of ``range(num_examples)`` into `num_folds` folds.

    The folds are disjoint, cover every index, and their sizes differ by at
    most one. With `labels`, the partition is stratified: the members of
    each class are shuffled and dealt round-robin to the folds, continuing
    from class to class, so that every class is spread over the folds as
    evenly as possible (counts per fold differ by at most one) while the fold
    sizes still differ by at most one. Which folds receive the extra examples
    is random.

    Args:
      num_examples: ``N``.
      num_folds: ``K``, with ``2 <= K <= N``.
      seed: anything `numpy.random.default_rng` accepts.
      labels: optional ``(N,)`` integer class labels.

    Returns:
      ``K`` sorted int32 index arrays.

    Examples:
      >>> folds = kfold_indices(10, 3, seed=0)
      >>> sorted(len(f) for f in folds)
      [3, 3, 4]
      >>> np.array_equal(np.sort(np.concatenate(folds)), np.arange(10))
      True
    """
    n = _as_count(num_examples, "num_examples")
    k = _as_count(num_folds, "num_folds")
    if k < 2:
        raise ValueError(f"`num_folds` must be at least 2, got {k}.")
    if k > n:
        raise ValueError(f"`num_folds`={k} exceeds `num_examples`={n}: some folds would be empty.")
    if n > np.iinfo(np.int32).max:
        raise ValueError(f"`num_examples`={n} does not fit int32 indices.")
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(n)
    else:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"`labels` must have shape ({n},), got {labels.shape}.")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"`labels` must hold integer class labels, got dtype {labels.dtype}.")
        classes = np.unique(labels)
        blocks = [rng.permutation(np.flatnonzero(labels == c)) for c in rng.permutation(classes)]
        order = np.concatenate(blocks)
    # Position j goes to fold (j mod K): consecutive positions of one class
    # land in consecutive folds. A random relabelling of the folds decides
    # which of them get the ceil(N / K)-sized share.
    fold_of_position = rng.permutation(k)[np.arange(n) % k]
    return [np.sort(order[fold_of_position == f]).astype(np.int32) for f in range(k)]


def folds_to_mask(folds: Sequence[Any], num_examples: int) -> np.ndarray:
    """Boolean membership matrix of shape ``(K, N)``: ``mask[k, i]`` iff ``i`` is in fold ``k``.

    Args:
      folds: ``K`` integer index arrays (need not be disjoint or covering).
      num_examples: ``N``.

    Returns:
      A ``(K, N)`` bool array.
    """
    n = _as_count(num_examples, "num_examples")
    mask = np.zeros((len(folds), n), dtype=bool)
    for f, idx in enumerate(folds):
        idx = np.asarray(idx)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"Fold {f} must hold integer indices, got dtype {idx.dtype}.")
        if idx.ndim != 1:
            raise ValueError(f"Fold {f} must be one-dimensional, got shape {idx.shape}.")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"Fold {f} has indices outside [0, {n}): min {idx.min()}, max {idx.max()}.")
        mask[f, idx] = True
    return mask


def _as_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if value < 0:
        raise ValueError(f"`{name}` must be non-negative, got {value}.")
    return int(value)
