"""Tests for cif_jax.workloads.folds."""

import numpy as np
import pytest

from cif_jax.workloads.folds import folds_to_mask, kfold_indices


def _check_partition(folds, n, k):
    assert len(folds) == k
    for f in folds:
        assert f.dtype == np.int32 and f.ndim == 1
        assert np.all(np.diff(f) > 0)  # sorted, no repeats
    everything = np.concatenate(folds)
    assert len(everything) == n  # disjoint ...
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))  # ... and covering
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n, k", [(10, 2), (10, 3), (10, 10), (1003, 7), (600, 500)])
def test_random_partition(n, k):
    _check_partition(kfold_indices(n, k, seed=0), n, k)


@pytest.mark.parametrize("n, k", [(100, 5), (103, 7), (60, 50), (30, 30)])
def test_stratified_partition(n, k):
    rng = np.random.default_rng(n + k)
    labels = rng.integers(0, 4, n)
    folds = kfold_indices(n, k, seed=3, labels=labels)
    _check_partition(folds, n, k)
    counts = np.stack([np.bincount(labels[f], minlength=4) for f in folds])  # (K, classes)
    assert np.all(counts.max(axis=0) - counts.min(axis=0) <= 1)


def test_stratified_balanced_classes_give_equal_class_counts():
    labels = np.repeat(np.arange(10), 50)  # MNIST-like balance
    folds = kfold_indices(500, 5, seed=0, labels=labels)
    for f in folds:
        np.testing.assert_array_equal(np.bincount(labels[f], minlength=10), [10] * 10)


def test_seed_determinism_and_randomness():
    a = kfold_indices(50, 5, seed=1)
    b = kfold_indices(50, 5, seed=1)
    c = kfold_indices(50, 5, seed=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))
    # Not simply contiguous blocks.
    assert not np.array_equal(a[0], np.arange(10))


def test_extra_examples_go_to_random_folds():
    first_fold_sizes = {len(kfold_indices(11, 5, seed=s)[0]) for s in range(20)}
    assert first_fold_sizes == {2, 3}


def test_errors():
    with pytest.raises(ValueError, match="at least 2"):
        kfold_indices(10, 1)
    with pytest.raises(ValueError, match="exceeds"):
        kfold_indices(10, 11)
    with pytest.raises(ValueError, match="shape"):
        kfold_indices(10, 2, labels=np.zeros(9, int))
    with pytest.raises(TypeError, match="integer"):
        kfold_indices(10, 2, labels=np.zeros(10))
    with pytest.raises(TypeError, match="int"):
        kfold_indices(10.0, 2)


def test_folds_to_mask():
    folds = kfold_indices(20, 4, seed=0)
    mask = folds_to_mask(folds, 20)
    assert mask.shape == (4, 20) and mask.dtype == bool
    np.testing.assert_array_equal(mask.sum(axis=0), 1)
    for k, f in enumerate(folds):
        np.testing.assert_array_equal(np.flatnonzero(mask[k]), f)
    np.testing.assert_array_equal(folds_to_mask([np.array([0, 2]), np.array([], dtype=int)], 3), [[1, 0, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match="outside"):
        folds_to_mask([np.array([0, 3])], 3)
    with pytest.raises(ValueError, match="outside"):
        folds_to_mask([np.array([-1])], 3)
