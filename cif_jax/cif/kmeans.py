"""Jitted k-means (k-means++ seeding, then Lloyd iterations).

CiF partitions the sketched gradients $h_i = \\Pi g_i$ into ``C`` clusters
(eq. (6)) by minimising the k-means objective

$$
\\sum_{i=1}^N \\lVert h_i - \\mu_{c(i)} \\rVert_2^2 .
$$

Seeding is greedy k-means++ ($D^2$ sampling) from a required ``key``; Lloyd
iterations then run in a ``lax.while_loop``. Everything is deterministic for a
given key. With ``num_clusters == N`` every example is its own cluster, which is
how CiF reproduces per-query influence exactly.

References:
    Clustered Influence Functions, section 3, eq. (6).

    Arthur, D. and Vassilvitskii, S. k-means++: the advantages of careful
    seeding. SODA 2007.

    Lloyd, S. Least squares quantization in PCM. IEEE Transactions on
    Information Theory 28(2), 1982.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..core.checks import as_int, as_key

__all__ = ["KMeansResult", "kmeans", "kmeans_fit"]

_HIGHEST = jax.lax.Precision.HIGHEST


class KMeansResult(NamedTuple):
    """Output of :func:`kmeans_fit`.

    Attributes:
        centroids: cluster centres, shape ``(C, d)``, dtype of the points.
        assignments: cluster index of each point, shape ``(N,)``, int32. Every
            cluster has at least one member.
        inertia: sum over points of the squared distance to their centroid.
        num_iters: Lloyd iterations run (int32 scalar; 0 when ``C == N``).
        converged: whether the stopping rule was met before ``max_iters``.
    """

    centroids: Float[Array, "c d"]
    assignments: Int[Array, " n"]
    inertia: Float[Array, ""]
    num_iters: Int[Array, ""]
    converged: Bool[Array, ""]


# --------------------------------------------------------------------------- #
# Argument checks (Python, before tracing).
# --------------------------------------------------------------------------- #


def _check_points(points: Any) -> Array:
    if not hasattr(points, "shape") or not hasattr(points, "dtype"):
        points = np.asarray(points)
    if points.ndim != 2:
        raise ValueError(
            f"`points` must be 2-D with shape (num_points, dim), got shape {points.shape}."
        )
    if points.shape[0] < 1 or points.shape[1] < 1:
        raise ValueError(
            f"`points` must be non-empty (at least one point of dimension >= 1), "
            f"got shape {points.shape}."
        )
    if not jnp.issubdtype(points.dtype, jnp.floating):
        raise TypeError(
            f"`points` must be a floating array, got dtype {points.dtype}; cast it, "
            "e.g. `points.astype(jnp.float32)`."
        )
    message = "`points` contains NaN or Inf; remove or replace non-finite values."
    if isinstance(points, jax.core.Tracer):
        # Called under an outer jit: check the values at run time instead.
        return eqx.error_if(points, ~jnp.isfinite(points).all(), message)
    if not bool(jnp.isfinite(points).all()):
        raise ValueError(message)
    return jnp.asarray(points)


def _check_tol(tol: Any) -> Any:
    if isinstance(tol, jax.core.Tracer):
        return tol
    if isinstance(tol, (bool, np.bool_)) or not np.ndim(tol) == 0:
        raise TypeError(f"`tol` must be a non-negative float, got {tol!r}.")
    value = float(tol)
    if not (value >= 0.0 and np.isfinite(value)):
        raise ValueError(f"`tol` must be a finite float >= 0, got {tol!r}.")
    return value


# --------------------------------------------------------------------------- #
# Numerical pieces (traced).
# --------------------------------------------------------------------------- #


def _sq_distances(points: Array, points_sq: Array, centroids: Array) -> Array:
    """``||x||^2 - 2 x.c + ||c||^2``, clamped at 0: shape ``(N, C)``."""
    cross = jnp.matmul(points, centroids.T, precision=_HIGHEST)
    centroids_sq = jnp.sum(centroids * centroids, axis=1)
    return jnp.maximum(points_sq[:, None] - 2 * cross + centroids_sq[None, :], 0)


def _kmeanspp_indices(points: Array, key: PRNGKeyArray, num_clusters: int) -> Int[Array, " c"]:
    """Greedy k-means++ seeding: indices of ``num_clusters`` distinct points.

    The first index is uniform. At each next step, ``2 + floor(ln C)``
    candidates are drawn with probability proportional to $D(x)^2$, the
    squared distance to the nearest chosen centre, and the candidate that most
    reduces the total $\\sum_x D(x)^2$ is kept (the greedy variant of
    Arthur and Vassilvitskii; the trial count is the usual heuristic). Greedy
    seeding lands in the global optimum more often than one draw per step.
    When every $D(x)^2$ is zero (all points coincide with chosen centres)
    candidates are uniform among points not yet chosen, so indices are always
    distinct. Distances are computed as ``sum((x - c)**2)``, exactly zero for
    duplicates.

    Candidates are drawn by inverting the cumulative weights with uniforms
    from a single ``jax.random.uniform`` call (zero-weight points are never
    drawn).
    """
    num_points = points.shape[0]
    num_trials = 2 + int(np.log(num_clusters))
    uniforms = jax.random.uniform(key, (num_clusters, num_trials), points.dtype)
    positions = jnp.arange(num_points, dtype=jnp.int32)

    def dist_to(index: Array) -> Array:
        diff = points - points[index][None, :]
        return jnp.sum(diff * diff, axis=1)

    def body(i, carry):
        indices, chosen, min_d2 = carry
        d2_weights = jnp.where(chosen, 0, min_d2)
        total = jnp.sum(d2_weights)
        use_uniform = (i == 0) | ~(total > 0)
        weights = jnp.where(use_uniform, jnp.where(chosen, 0, 1).astype(points.dtype), d2_weights)
        cdf = jnp.cumsum(weights)
        candidates = jnp.searchsorted(cdf, uniforms[i] * cdf[-1], side="right")
        # Guard against u * total rounding up to the total: last drawable point.
        last = jnp.max(jnp.where(weights > 0, positions, 0))
        candidates = jnp.minimum(candidates, last).astype(jnp.int32)
        candidate_d2 = jnp.minimum(min_d2[None, :], jax.vmap(dist_to)(candidates))
        # Greedy choice; the first seed is simply the first (uniform) candidate.
        best = jnp.where(i == 0, 0, jnp.argmin(jnp.sum(candidate_d2, axis=1)))
        index = candidates[best]
        return indices.at[i].set(index), chosen.at[index].set(True), candidate_d2[best]

    init = (
        jnp.zeros((num_clusters,), jnp.int32),
        jnp.zeros((num_points,), bool),
        jnp.full((num_points,), jnp.inf, points.dtype),
    )
    indices, _, _ = jax.lax.fori_loop(0, num_clusters, body, init)
    return indices


def _fill_empty(assignments: Array, min_d2: Array, num_clusters: int) -> Array:
    """Gives every empty cluster one point, keeping other clusters non-empty.

    Empty cluster ``j`` (in increasing index order) takes the ``j``-th point
    farthest from its current centroid, among points that are not the *anchor*
    (member closest to the centroid, lowest index on ties) of their cluster.
    Anchors are never moved, so no cluster is emptied; there are
    ``N - (C - k) >= k`` candidates for ``k`` empty clusters since ``C <= N``.
    Deterministic: stable sort, lowest index first on ties.
    """
    num_points = assignments.shape[0]
    cluster_ids = jnp.arange(num_clusters, dtype=jnp.int32)
    members = assignments[:, None] == cluster_ids[None, :]  # (N, C)
    nonempty = members.any(axis=0)
    anchors = jnp.argmin(jnp.where(members, min_d2[:, None], jnp.inf), axis=0)
    is_anchor = (
        jnp.zeros((num_points,), bool)
        .at[jnp.where(nonempty, anchors, num_points)]
        .set(True, mode="drop")
    )
    order = jnp.argsort(jnp.where(is_anchor, -jnp.inf, min_d2), descending=True, stable=True)
    empty = ~nonempty
    rank = jnp.cumsum(empty.astype(jnp.int32)) - 1
    donors = jnp.where(empty, order[jnp.clip(rank, 0, num_points - 1)], num_points)
    return assignments.at[donors].set(cluster_ids, mode="drop")


def _assign(points: Array, points_sq: Array, centroids: Array) -> tuple[Array, Array]:
    """Nearest-centroid assignments, with empty clusters refilled."""
    num_clusters = centroids.shape[0]
    d2 = _sq_distances(points, points_sq, centroids)
    assignments = jnp.argmin(d2, axis=1).astype(jnp.int32)
    min_d2 = jnp.take_along_axis(d2, assignments[:, None], axis=1)[:, 0]
    counts = jnp.zeros((num_clusters,), jnp.int32).at[assignments].add(1)
    assignments = jax.lax.cond(
        (counts == 0).any(),
        lambda a: _fill_empty(a, min_d2, num_clusters),
        lambda a: a,
        assignments,
    )
    return assignments, d2


def _means(points: Array, assignments: Array, num_clusters: int) -> Array:
    """Cluster means; every cluster is non-empty after :func:`_assign`."""
    one_hot = (assignments[:, None] == jnp.arange(num_clusters)[None, :]).astype(points.dtype)
    sums = jnp.matmul(one_hot.T, points, precision=_HIGHEST)  # deterministic, unlike scatter-add
    counts = jnp.sum(one_hot, axis=0)
    return sums / jnp.maximum(counts, 1)[:, None]


def _lloyd(
    points: Array, centroids: Array, *, max_iters: int, tol: Any
) -> KMeansResult:
    """Lloyd iterations from ``centroids``.

    Each iteration assigns points to their nearest centroid (refilling empty
    clusters with far points, see :func:`_fill_empty`) and moves each centroid
    to its cluster mean. Stops after ``max_iters`` iterations, or once the
    assignments are the same as in the previous iteration (a fixed point), or
    once ``sum_c ||mu_c^new - mu_c^old||^2 <= tol * mean_j Var(points[:, j])``,
    i.e. the total squared centroid shift is small relative to the data's
    per-coordinate variance. The assignment test matters for ``tol=0``: XLA
    may round the same mean differently by an ulp from one iteration to the
    next, so an exactly zero shift is not guaranteed at a fixed point. The
    returned assignments are recomputed from the returned centroids.
    """
    num_clusters = centroids.shape[0]
    num_points = points.shape[0]
    points_sq = jnp.sum(points * points, axis=1)
    scale = jnp.mean(jnp.var(points, axis=0))
    threshold = jnp.asarray(tol, points.dtype) * scale

    def cond(state):
        it, _, _, done = state
        return (it < max_iters) & ~done

    def body(state):
        it, old, old_assignments, _ = state
        assignments, _ = _assign(points, points_sq, old)
        new = _means(points, assignments, num_clusters)
        shift = jnp.sum((new - old) ** 2)
        done = (shift <= threshold) | (assignments == old_assignments).all()
        return it + 1, new, assignments, done

    no_assignments = jnp.full((num_points,), -1, jnp.int32)
    init = (jnp.int32(0), centroids, no_assignments, jnp.asarray(False))
    num_iters, centroids, _, converged = jax.lax.while_loop(cond, body, init)

    assignments, d2 = _assign(points, points_sq, centroids)
    # A cluster refilled here (rare, degenerate data) is centred on its donor.
    nearest = jnp.argmin(d2, axis=1).astype(jnp.int32)
    moved = assignments != nearest
    centroids = centroids.at[jnp.where(moved, assignments, num_clusters)].set(
        points, mode="drop"
    )
    diff = points - centroids[assignments]
    inertia = jnp.sum(diff * diff)
    return KMeansResult(centroids, assignments, inertia, num_iters, converged)


@functools.partial(jax.jit, static_argnames=("num_clusters", "max_iters"))
def _kmeans_fit(
    points: Array, key: PRNGKeyArray, tol: Any, *, num_clusters: int, max_iters: int
) -> KMeansResult:
    num_points = points.shape[0]
    if num_clusters == num_points:
        # One cluster per point, even with duplicate points (exact per-query IF).
        return KMeansResult(
            centroids=points,
            assignments=jnp.arange(num_points, dtype=jnp.int32),
            inertia=jnp.zeros((), points.dtype),
            num_iters=jnp.int32(0),
            converged=jnp.asarray(True),
        )
    seeds = _kmeanspp_indices(points, key, num_clusters)
    return _lloyd(points, points[seeds], max_iters=max_iters, tol=tol)


def kmeans_fit(
    points: Float[Array, "n d"],
    num_clusters: int,
    *,
    key: PRNGKeyArray,
    max_iters: int = 100,
    tol: float = 1e-4,
) -> KMeansResult:
    """k-means of ``points`` into ``num_clusters`` clusters (eq. (6)).

    Seeds with greedy k-means++ ($D^2$ sampling from ``key``, keeping the
    best of ``2 + floor(ln C)`` candidates per step; uniform among unchosen
    points when all $D^2$ vanish, so seeds are distinct points), then
    runs Lloyd iterations in a ``lax.while_loop``.

    Stopping rule: at most ``max_iters`` iterations; stop early once an
    iteration leaves the assignments unchanged, or once its total squared
    centroid shift $\\sum_c \\lVert \\mu_c^{new} - \\mu_c^{old} \\rVert^2$
    is at most ``tol`` times the mean per-coordinate variance of ``points``.

    Empty clusters are re-seeded deterministically with the points farthest
    from their centroid (never a cluster's last member), so every returned
    cluster is non-empty. Squared distances use
    ``||x||^2 - 2 x.c + ||c||^2`` clamped at 0 with ``HIGHEST`` precision
    matmuls; memory is ``O(N C)``.

    ``num_clusters == N`` returns each point as its own cluster
    (``assignments == arange(N)``, ``centroids == points``), even when points
    repeat. Jitted with ``num_clusters`` and ``max_iters`` static; the dtype of
    ``points`` is kept.

    Args:
        points: data, shape ``(N, d)``, floating and finite (for CiF, the
            sketched gradients of eq. (5)).
        num_clusters: ``C``, with ``1 <= C <= N``.
        key: PRNG key for the k-means++ seeding.
        max_iters: maximum number of Lloyd iterations (``>= 1``).
        tol: relative tolerance of the stopping rule (``>= 0``).

    Returns:
        A `KMeansResult`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
        >>> res = kmeans_fit(x, 2, key=jax.random.key(0))
        >>> sorted(res.centroids[:, 0].tolist())
        [0.0, 10.0]

    References:
        Clustered Influence Functions, eq. (6).

        Arthur, D. and Vassilvitskii, S. k-means++: the advantages of careful
        seeding. SODA 2007.
    """
    points = _check_points(points)
    num_clusters = as_int(num_clusters, "num_clusters", minimum=1)
    num_points = points.shape[0]
    if num_clusters > num_points:
        raise ValueError(
            f"`num_clusters` must be <= the number of points ({num_points}), got "
            f"{num_clusters}; use `num_clusters={num_points}` for one cluster per point."
        )
    max_iters = as_int(max_iters, "max_iters", minimum=1)
    tol = _check_tol(tol)
    key = as_key(key)
    return _kmeans_fit(points, key, tol, num_clusters=num_clusters, max_iters=max_iters)


def kmeans(
    points: Float[Array, "n d"],
    num_clusters: int,
    *,
    key: PRNGKeyArray,
    max_iters: int = 100,
    tol: float = 1e-4,
) -> tuple[Float[Array, "c d"], Int[Array, " n"]]:
    """k-means returning only ``(centroids, assignments)`` (eq. (6)).

    Same algorithm and arguments as :func:`kmeans_fit`, which also reports the
    inertia and convergence.

    Returns:
        ``(centroids, assignments)``: shapes ``(C, d)`` (dtype of ``points``) and
        ``(N,)`` int32.

    References:
        Clustered Influence Functions, eq. (6).
    """
    result = kmeans_fit(points, num_clusters, key=key, max_iters=max_iters, tol=tol)
    return result.centroids, result.assignments
