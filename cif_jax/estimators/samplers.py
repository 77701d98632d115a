"""Curvature samplers: which examples define the GGN when it is built from a subset.

Following "Faithful and Fast Influence Function via Advanced Sampling"
(sections 2-4), LiSSA's (or CG's) curvature may come from a small subset chosen to
represent the data: by the model's class probabilities (:func:`logit_sample`) or
by k-means on features (:func:`feature_sample`); :func:`cif_jax.uniform_sample`
is the baseline. Each returns a :class:`cif_jax.CurvatureSample` (distinct,
sorted indices with positive weights) for ``curvature=``.

Draws without replacement with probabilities proportional to ``p_i`` use the
Gumbel top-k trick: the k largest ``log p_i + G_i`` (``G_i`` i.i.d. standard
Gumbel) are a sample of k draws without replacement, each draw proportional to
``p_i`` among the examples not yet drawn (Kool, van Hoof and Welling 2019). Working
in log space keeps tiny probabilities exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..cif.kmeans import kmeans_fit
from ..core import checks as _checks
from ..core.checks import as_key
from ..core.curvature import CurvatureSample

MODES = ("topk", "weighted")
WEIGHTINGS = ("uniform", "stratified")


def _finite_matrix(values, name: str, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"`{name}` must be a non-empty 2-D array (N, {what}); got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"`{name}` must hold floating-point values; got dtype {arr.dtype}.")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ValueError(f"`{name}` holds NaN or Inf in {int(bad.sum())} row(s), e.g. {np.flatnonzero(bad)[:5].tolist()}.")
    return arr


def _check_rows(arr: np.ndarray, num_examples, name: str) -> None:
    if num_examples is not None and arr.shape[0] != num_examples:
        raise ValueError(f"`{name}` has {arr.shape[0]} rows but the task has N = {num_examples} examples.")


def _gumbel_top_k(key, log_p: Float[Array, " n"], k: int):
    """k draws without replacement, each proportional to ``exp(log_p)`` among those left."""
    g = jax.random.gumbel(key, log_p.shape, log_p.dtype)
    return jax.lax.top_k(log_p + g, k)


@functools.partial(jax.jit, static_argnames=("per_class",))
def _logit_draws(logits, key, per_class):
    log_probs = jax.nn.log_softmax(logits, axis=1)  # log softmax(logits_i)_y, (N, Y)
    # pi_y(i) = softmax_y(i) / sum_j softmax_y(j): normalise each column in log space.
    log_pi = log_probs - jax.scipy.special.logsumexp(log_probs, axis=0, keepdims=True)

    def one(y):
        _, idx = _gumbel_top_k(jax.random.fold_in(key, y), log_pi[:, y], per_class)
        return idx

    return jax.vmap(one)(jnp.arange(logits.shape[1]))


def logit_sample(logits: Float[Array, "n y"], *, per_class: int, key, num_examples: int | None = None
                 ) -> CurvatureSample:
    """Per class y, ``per_class`` examples drawn by the model's belief in y; their union.

    Logit-based sampling (the sampling paper): for each class y, draws without replacement with
    probability ``pi_y(i) = softmax(logits_i)_y / sum_j softmax(logits_j)_y``
    (examples the model deems most typical of y are the likeliest), keys
    ``fold_in(key, y)``. The union of the Y draws (at most ``per_class * Y``
    examples; fewer where draws coincide) gets unit weights.

    Args:
        logits: (N, Y) model outputs on the training examples.
        per_class: draws per class, ``per_class * Y <= N``.
        key: PRNG key.
        num_examples: N of the task, checked against the rows of ``logits`` if given.

    Returns:
        A `cif_jax.CurvatureSample` with sorted distinct indices, unit weights.

    References:
        "Faithful and Fast Influence Function via Advanced Sampling", sec. 3.
    """
    arr = _finite_matrix(logits, "logits", "Y")
    _check_rows(arr, num_examples, "logits")
    per_class = _checks.positive_int(per_class, "per_class")
    n, num_classes = arr.shape
    if per_class * num_classes > n:
        raise ValueError(f"`per_class` * Y = {per_class} * {num_classes} exceeds N = {n}; lower `per_class`.")
    key = as_key(key)
    draws = np.asarray(_logit_draws(jnp.asarray(arr), key, per_class))
    idx = np.unique(draws)
    return CurvatureSample(jnp.asarray(idx, jnp.int32), jnp.ones(idx.size, jnp.float32))


@functools.partial(jax.jit, static_argnames=("per_cluster", "weighted", "num_clusters"))
def _cluster_picks(features, centroids, assignments, key, temperature, per_cluster, weighted, num_clusters):
    dist = jnp.linalg.norm(features - centroids[assignments], axis=1)
    sizes = jnp.zeros(num_clusters, jnp.int32).at[assignments].add(1)

    def one(c):
        member = assignments == c
        if weighted:
            # tau: the given temperature, else the median distance of the cluster's members.
            med = jnp.nanmedian(jnp.where(member, dist, jnp.nan))
            tau = jnp.where(temperature > 0, temperature, jnp.where(med > 0, med, 1.0))
            score = -dist / tau + jax.random.gumbel(jax.random.fold_in(key, c), dist.shape, dist.dtype)
        else:
            score = -dist
        score = jnp.where(member, score, -jnp.inf)
        _, idx = jax.lax.top_k(score, per_cluster)
        return idx, jnp.arange(per_cluster) < sizes[c]

    idx, valid = jax.vmap(one)(jnp.arange(num_clusters))
    return idx, valid, sizes


def feature_sample(
    features,
    *,
    num_clusters: int,
    per_cluster: int,
    mode: str = "topk",
    key,
    temperature: float | None = None,
    weighting: str = "uniform",
    kmeans_max_iters: int = 100,
    num_examples: int | None = None,
) -> CurvatureSample:
    """k-means on features, then ``per_cluster`` representatives of every cluster.

    Feature-based sampling (the sampling paper): ``cj.kmeans`` of the (N, D) features into
    ``num_clusters`` clusters with centroids m_c, then per cluster c

    * ``mode="topk"``: its ``per_cluster`` members nearest m_c;
    * ``mode="weighted"``: ``per_cluster`` members drawn without replacement with
      probability proportional to ``exp(-||phi_i - m_c|| / tau)``, tau =
      ``temperature`` or, by default, the median distance of c's members to m_c
      (the paper leaves tau's form open; this makes the rule scale-free).

    A cluster with fewer members gives all of them. Weights: ``"uniform"`` (1 each)
    or ``"stratified"`` (``n_c / taken_c``, so the sample's GGN weighs each cluster
    by its size, as the full GGN does).

    Args:
        features: (N, D) features of the training examples: a model's penultimate
            activations (``cj.stride_features``, the models' ``features()``), raw
            inputs flattened, or an :class:`cif_jax.InfluenceCache`, whose gradient
            sketches (N, d) are used (unit-normalised if the cache clustered them so).
        num_clusters: C, ``per_cluster * C <= N``.
        per_cluster: examples taken per cluster.
        mode: ``"topk"`` or ``"weighted"``.
        key: PRNG key: ``split(key)`` seeds k-means and the weighted draws.
        temperature: tau > 0 for ``mode="weighted"`` (None: per-cluster median distance).
        weighting: ``"uniform"`` or ``"stratified"``.
        kmeans_max_iters: Lloyd iteration cap.
        num_examples: N of the task, checked against the rows of ``features`` if given.

    Returns:
        A `cif_jax.CurvatureSample` with sorted distinct indices.

    References:
        "Faithful and Fast Influence Function via Advanced Sampling", sec. 3.
    """
    from ..cif.cache import InfluenceCache

    if isinstance(features, InfluenceCache):
        sk = np.asarray(features.sketches)
        if features.normalize_sketches:  # the points the cache clustered
            norms = np.linalg.norm(sk, axis=1, keepdims=True)
            sk = sk / np.where(norms > 0, norms, 1)
        features = sk
    arr = _finite_matrix(features, "features", "D")
    _check_rows(arr, num_examples, "features")
    n = arr.shape[0]
    num_clusters = _checks.positive_int(num_clusters, "num_clusters")
    per_cluster = _checks.positive_int(per_cluster, "per_cluster")
    if per_cluster * num_clusters > n:
        raise ValueError(f"`per_cluster` * `num_clusters` = {per_cluster} * {num_clusters} exceeds N = {n}.")
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"`weighting` must be one of {WEIGHTINGS}, got {weighting!r}.")
    if temperature is not None:
        t = _checks.nonnegative_float(temperature, "temperature")
        if t <= 0:
            raise ValueError(f"`temperature` must be > 0 (or None for the median distance), got {temperature}.")
        if mode != "weighted":
            raise ValueError("`temperature` applies to mode='weighted' only; drop it or set mode='weighted'.")
    kmeans_max_iters = _checks.positive_int(kmeans_max_iters, "kmeans_max_iters")
    key = as_key(key)
    k_means, k_draw = jax.random.split(key)
    points = jnp.asarray(arr)
    fit = kmeans_fit(points, num_clusters, key=k_means, max_iters=kmeans_max_iters)
    temp = jnp.asarray(0.0 if temperature is None else float(temperature), points.dtype)
    idx, valid, sizes = _cluster_picks(points, fit.centroids, fit.assignments, k_draw, temp, per_cluster,
                                       mode == "weighted", num_clusters)
    idx, valid, sizes = np.asarray(idx), np.asarray(valid), np.asarray(sizes)
    taken = valid.sum(axis=1)
    rows, cols = np.nonzero(valid)
    picked = idx[rows, cols]
    if weighting == "stratified":
        w = sizes[rows] / taken[rows]
    else:
        w = np.ones(picked.size)
    order = np.argsort(picked)
    return CurvatureSample(jnp.asarray(picked[order], jnp.int32), jnp.asarray(w[order], jnp.float32))
