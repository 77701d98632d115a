"""Large query batches: vectorised validation, no (Q, N) masks, O(sum |S|) recombination.

References are numpy loops over the cache's own assignments and responses.
"""

import numpy as np
import pytest
from _models import N, cache_for

import cif_jax as cj
from cif_jax.core import checks as _checks

Q, M = 20_000, 6


@pytest.fixture(scope="module")
def cache():
    return cache_for("softmax")


@pytest.fixture(scope="module")
def index_matrix():
    rng = np.random.default_rng(0)
    return np.argsort(rng.random((Q, N)), axis=1)[:, :M].astype(np.int64)  # distinct per row


def test_index_matrix_is_validated_without_a_mask(index_matrix):
    subs = _checks.subsets(index_matrix, N)
    assert subs._mask is None  # the counting path never needs the (Q, N) mask
    np.testing.assert_array_equal(subs.sizes, M)
    np.testing.assert_array_equal(subs.indices.reshape(Q, M), index_matrix)
    np.testing.assert_array_equal(subs.query_ids, np.repeat(np.arange(Q), M))
    # The mask, when asked for, is the right one.
    assert subs.mask.sum() == Q * M and subs.mask[np.arange(Q)[:, None], index_matrix].all()


@pytest.mark.parametrize("bad, match", [("dup", "repeats indices"), ("range", "out of range"), ("neg", "out of range")])
def test_index_matrix_errors_name_the_row(index_matrix, bad, match):
    arr = index_matrix.copy()
    row = 12_345
    if bad == "dup":
        arr[row, 1] = arr[row, 0]
    elif bad == "range":
        arr[row, 2] = N
    else:
        arr[row, 3] = -1
    with pytest.raises(ValueError, match=rf"subsets\[{row}\].*{match}|{match}"):
        _checks.subsets(arr, N)
    with pytest.raises(ValueError, match=str(row)):
        _checks.subsets(arr, N)


def test_many_queries_from_alphas_match_numpy(cache, index_matrix):
    rng = np.random.default_rng(1)
    a = np.asarray(cache.assignments)
    c = cache.num_clusters
    shared = rng.normal(size=c)
    per_query = rng.normal(size=(Q, c))
    got_shared = np.asarray(cj.loss_delta_from_alphas(cache, index_matrix, shared))
    got_per_query = np.asarray(cj.loss_delta_from_alphas(cache, index_matrix, per_query))
    want_shared = shared[a[index_matrix]].sum(axis=1) / N
    want_per_query = per_query[np.arange(Q)[:, None], a[index_matrix]].sum(axis=1) / N
    # Sums of M = 6 float64 terms: rounding ~1e-16 relative.
    np.testing.assert_allclose(got_shared, want_shared, rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(got_per_query, want_per_query, rtol=1e-13, atol=1e-16)
    # The same as through the counts (eq. 11 as written).
    counts = np.asarray(cj.cluster_counts(cache, index_matrix))
    np.testing.assert_allclose(got_shared, counts @ shared / N, rtol=1e-12, atol=1e-16)
