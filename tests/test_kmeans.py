"""Tests for the jitted k-means of eq. (6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from cif_jax.cif.kmeans import KMeansResult, _kmeanspp_indices, _lloyd, kmeans, kmeans_fit

# Most tests use (160, 4) float64 points and 4 clusters so that they share one
# compilation of `kmeans_fit`; `_lloyd` is jitted once for the two tests that
# start Lloyd iterations from a chosen initialisation.
_lloyd_jit = jax.jit(_lloyd, static_argnames="max_iters")


def _blobs(seed=0, per_blob=40, dim=4, num_blobs=4, spread=0.5):
    rng = np.random.default_rng(seed)
    centres = 20.0 * np.eye(num_blobs, dim)  # pairwise 28 apart, blobs of radius ~1
    labels = np.repeat(np.arange(num_blobs), per_blob)
    points = centres[labels] + spread * rng.normal(size=(labels.size, dim))
    perm = rng.permutation(labels.size)
    return points[perm], labels[perm]


def _same_partition(a, b):
    """Labels equal up to a permutation of cluster ids."""
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def _numpy_inertia(points, centroids, assignments):
    return float(np.sum((np.asarray(points) - np.asarray(centroids)[np.asarray(assignments)]) ** 2))


def _numpy_lloyd(points, centroids, max_iters):
    """Plain Lloyd iterations until the labels stop changing (no empty clusters expected)."""
    labels = None
    for _ in range(max_iters):
        d2 = ((points[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
        new_labels = d2.argmin(1)
        if labels is not None and (new_labels == labels).all():
            break
        labels = new_labels
        centroids = np.stack([points[labels == c].mean(0) for c in range(len(centroids))])
    d2 = ((points[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    return centroids, d2.argmin(1)


def test_recovers_separated_blobs(getkey):
    points, labels = _blobs()
    result = kmeans_fit(points, 4, key=getkey())
    assert isinstance(result, KMeansResult)
    assert result.centroids.shape == (4, 4) and result.assignments.shape == (160,)
    assert result.assignments.dtype == jnp.int32
    assert _same_partition(result.assignments, labels)
    assert bool(result.converged) and 1 <= int(result.num_iters) < 100
    # Centroids are the blob means.
    for c in range(4):
        members = np.asarray(result.assignments) == c
        np.testing.assert_allclose(np.asarray(result.centroids[c]), points[members].mean(0), atol=1e-12)


def test_kmeans_returns_plain_pair(getkey):
    points, _ = _blobs()
    key = getkey()
    out = kmeans(points, 4, key=key)
    assert type(out) is tuple and len(out) == 2
    full = kmeans_fit(points, 4, key=key)
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(full.centroids))
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(full.assignments))


def test_inertia_matches_numpy(getkey):
    points = np.random.default_rng(10).normal(size=(160, 4))
    result = kmeans_fit(points, 4, key=getkey())
    np.testing.assert_allclose(
        float(result.inertia), _numpy_inertia(points, result.centroids, result.assignments), rtol=1e-12
    )
    # Lloyd's fixed point: each point is assigned to its nearest centroid.
    d2 = ((points[:, None, :] - np.asarray(result.centroids)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(result.assignments), d2.argmin(1))


def test_lloyd_matches_numpy_reference():
    rng = np.random.default_rng(3)
    points = rng.normal(size=(60, 2))
    init = points[[0, 5, 17, 40]]
    got = _lloyd_jit(jnp.asarray(points), jnp.asarray(init), max_iters=50, tol=0.0)
    want_centroids, want_labels = _numpy_lloyd(points, init, 50)
    assert bool(got.converged) and int(got.num_iters) > 1
    np.testing.assert_allclose(np.asarray(got.centroids), want_centroids, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(got.assignments), want_labels)


def test_deterministic_per_key(getkey):
    points = np.random.default_rng(10).normal(size=(160, 4))
    key = getkey()
    a, b = kmeans_fit(points, 4, key=key), kmeans_fit(points, 4, key=key)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Legacy uint32 keys with the same data give the same result.
    legacy = kmeans_fit(points, 4, key=jax.random.key_data(key))
    np.testing.assert_array_equal(np.asarray(legacy.assignments), np.asarray(a.assignments))
    # Unstructured data: different seeds lead to different local optima.
    others = [np.asarray(kmeans_fit(points, 4, key=getkey()).centroids) for _ in range(5)]
    assert any(not np.allclose(np.sort(o, 0), np.sort(np.asarray(a.centroids), 0)) for o in others)


def test_one_cluster_per_point_is_identity(getkey):
    points = np.random.default_rng(11).normal(size=(12, 3))
    points[5] = points[2]  # duplicates must still get their own clusters
    points[7] = points[2]
    result = kmeans_fit(points, 12, key=getkey())
    np.testing.assert_array_equal(np.asarray(result.assignments), np.arange(12))
    np.testing.assert_array_equal(np.asarray(result.centroids), points)
    assert float(result.inertia) == 0.0
    centroids, assignments = kmeans(np.zeros((4, 2)), 4, key=getkey())
    np.testing.assert_array_equal(np.asarray(assignments), np.arange(4))
    np.testing.assert_array_equal(np.asarray(centroids), np.zeros((4, 2)))


def test_kmeanspp_seeds_distinct_with_duplicates(getkey):
    points = jnp.zeros((6, 2)).at[0].set(1.0)  # two distinct locations, six points
    seeds = np.asarray(_kmeanspp_indices(points, getkey(), 5))
    assert len(set(seeds.tolist())) == 5


def test_empty_cluster_is_reseeded_from_bad_init():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(60, 2))
    # Two initial centroids far from all data: both clusters are empty after
    # the first assignment and must be re-seeded.
    init = np.array([[0.0, 0.0], [1.0, 0.0], [100.0, 100.0], [-100.0, 100.0]])
    result = _lloyd_jit(jnp.asarray(points), jnp.asarray(init), max_iters=50, tol=0.0)
    assert np.bincount(np.asarray(result.assignments), minlength=4).min() >= 1
    assert np.abs(np.asarray(result.centroids)).max() < 10
    np.testing.assert_allclose(
        float(result.inertia), _numpy_inertia(points, result.centroids, result.assignments), rtol=1e-12
    )


def test_duplicate_heavy_data_has_no_empty_cluster(getkey):
    # 4 distinct locations, 160 points, mostly copies of one; all 4 clusters used.
    rng = np.random.default_rng(2)
    locations = rng.normal(size=(4, 4))
    points = locations[rng.choice(4, size=160, p=[0.91, 0.05, 0.03, 0.01])]
    points[:4] = locations  # every location occurs
    result = kmeans_fit(points, 4, key=getkey())
    counts = np.bincount(np.asarray(result.assignments), minlength=4)
    assert counts.min() >= 1
    assert float(result.inertia) < 1e-20
    # Fewer distinct points than clusters: clusters still non-empty (split duplicates).
    result = kmeans_fit(np.ones((160, 4)), 4, key=getkey())
    assert np.bincount(np.asarray(result.assignments), minlength=4).min() >= 1
    np.testing.assert_array_equal(np.asarray(result.centroids), np.ones((4, 4)))
    assert float(result.inertia) == 0.0


def test_close_to_sklearn_inertia(getkey):
    points, _ = make_blobs(n_samples=600, centers=8, n_features=3, cluster_std=1.5, random_state=0)
    # Like sklearn's n_init=10, restart from a few seeds and keep the best: a
    # single seeding can end in a local optimum (roughly a third of seeds do
    # here, for ours and for sklearn's single runs alike).
    reference = KMeans(n_clusters=8, n_init=10, random_state=0).fit(points).inertia_
    ours = [float(kmeans_fit(points, 8, key=getkey()).inertia) for _ in range(5)]
    assert min(ours) <= 1.01 * reference


def test_float32_kept(getkey):
    points, _ = _blobs()
    result = kmeans_fit(points.astype(np.float32), 4, key=getkey())
    assert result.centroids.dtype == jnp.float32
    assert result.inertia.dtype == jnp.float32
    assert _same_partition(result.assignments, _blobs()[1])
    identity = kmeans_fit(points[:5].astype(np.float32), 5, key=getkey())
    assert identity.centroids.dtype == jnp.float32


def test_max_iters_cap(getkey):
    points = np.random.default_rng(10).normal(size=(160, 4))
    result = kmeans_fit(points, 4, key=getkey(), max_iters=1, tol=0.0)
    assert int(result.num_iters) == 1
    assert not bool(result.converged)


def test_under_outer_jit(getkey):
    points, labels = _blobs()
    key = getkey()
    jitted = jax.jit(lambda x, k: kmeans(x, 4, key=k))
    centroids, assignments = jitted(jnp.asarray(points), key)
    assert _same_partition(assignments, labels)
    with pytest.raises(Exception, match="NaN or Inf"):
        jitted(jnp.asarray(points).at[0, 0].set(jnp.nan), key)


def test_input_errors(getkey):
    key = getkey()
    points = np.ones((5, 2))
    with pytest.raises(TypeError, match="num_clusters.*int"):
        kmeans(points, 2.0, key=key)
    with pytest.raises(TypeError, match="num_clusters.*int"):
        kmeans(points, True, key=key)
    with pytest.raises(ValueError, match="num_clusters.*>= 1"):
        kmeans(points, 0, key=key)
    with pytest.raises(ValueError, match="num_clusters.*<= the number of points"):
        kmeans(points, 6, key=key)
    with pytest.raises(ValueError, match="points.*2-D"):
        kmeans(np.ones(5), 2, key=key)
    with pytest.raises(ValueError, match="points.*2-D"):
        kmeans(np.ones((5, 2, 1)), 2, key=key)
    with pytest.raises(ValueError, match="points.*non-empty"):
        kmeans(np.ones((0, 2)), 1, key=key)
    with pytest.raises(ValueError, match="points.*non-empty"):
        kmeans(np.ones((3, 0)), 1, key=key)
    with pytest.raises(TypeError, match="points.*floating"):
        kmeans(np.ones((5, 2), np.int32), 2, key=key)
    for bad in (np.nan, np.inf, -np.inf):
        data = np.ones((5, 2))
        data[3, 1] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            kmeans(data, 2, key=key)
        with pytest.raises(ValueError, match="NaN or Inf"):
            kmeans(jnp.asarray(data), 2, key=key)
    with pytest.raises(ValueError, match="max_iters"):
        kmeans(points, 2, key=key, max_iters=0)
    with pytest.raises(ValueError, match="tol"):
        kmeans(points, 2, key=key, tol=-1e-3)
    with pytest.raises(TypeError, match="key"):
        kmeans(points, 2, key=3)
