"""Online CiF queries: count members per cluster, recombine cached responses (paper eqs. 10-11).

A query S enters only through its cluster counts ``m_c(S)``. Parameter changes
cost O(|S| + C p); loss changes with precomputed ``alpha_c(V) = g_V . v_c`` cost
O(|S| + C).
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ..core import checks as _checks
from ..core.gradients import gradient_sums_pass, raise_on_bad, streamed_map
from ..core.task import Task, take_examples
from .cache import InfluenceCache

HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def _counts(assignments, query_ids, indices, zeros):
    return zeros.at[query_ids, assignments[indices]].add(1)


def cluster_counts(cache: InfluenceCache, subsets) -> Int[Array, "q c"]:
    """``m_c(S)``, the number of members of each subset in each cluster: (Q, C) int32.

    Computed from the flat (query, index) pairs by one scatter-add, O(sum |S|).
    """
    subs = _checks.subsets(subsets, cache.num_examples)
    zeros = jnp.zeros((subs.sizes.size, cache.num_clusters), jnp.int32)
    return _counts(cache.assignments, jnp.asarray(subs.query_ids), jnp.asarray(subs.indices), zeros)


@jax.jit
def _recombine(counts, responses, n):
    return jnp.matmul(counts.astype(responses.dtype), responses, precision=HIGHEST) / n


def param_delta(cache: InfluenceCache, subsets) -> Float[Array, "q p"]:
    """CiF parameter change on removing each subset (paper eq. 10).

    .. math:: \\hat\\Delta\\theta_S = \\frac{1}{N} \\sum_c m_c(S) v_c

    Returns:
        (Q, p) flat parameter changes; compare with :func:`cif_jax.baselines.influence`.
    """
    counts = cluster_counts(cache, subsets)
    n = jnp.asarray(cache.num_examples, cache.responses.dtype)
    return _recombine(counts, cache.responses, n)


def _eval_matrix(cache: InfluenceCache, eval_grads, num_queries: int | None):
    g = jnp.asarray(eval_grads)
    p = cache.num_params
    if g.ndim == 1:
        if g.shape[0] != p:
            raise ValueError(f"`eval_grads` must have shape (p,) = ({p},) or (Q, p); got {g.shape}.")
    elif g.ndim == 2:
        if g.shape[1] != p or (num_queries is not None and g.shape[0] != num_queries):
            want = f"({num_queries}, {p})" if num_queries is not None else f"(Q, {p})"
            raise ValueError(f"`eval_grads` must have shape (p,) or {want}; got {g.shape}.")
    else:
        raise ValueError(f"`eval_grads` must be 1-D (p,) or 2-D (Q, p); got shape {g.shape}.")
    _checks.finite_rows(g.reshape(-1, p), "eval_grads", what="row")
    return g.astype(cache.responses.dtype)


@jax.jit
def _alphas(responses, g):
    return jnp.matmul(g, responses.T, precision=HIGHEST)


def cluster_alphas(cache: InfluenceCache, eval_grads) -> Float[Array, "... c"]:
    """``alpha_c(V) = g_V . v_c`` (paper eq. 11), once per evaluation gradient.

    Args:
        eval_grads: (p,) one evaluation gradient, or (Q, p) one per query.

    Returns:
        (C,) or (Q, C).
    """
    return _alphas(cache.responses, _eval_matrix(cache, eval_grads, None))


def _alpha_matrix(cache, alphas, num_queries):
    a = jnp.asarray(alphas)
    c = cache.num_clusters
    if a.ndim == 1 and a.shape[0] == c:
        return a[None, :]  # shared by all queries; never broadcast to (Q, C)
    if a.ndim == 2 and a.shape == (num_queries, c):
        return a
    raise ValueError(f"`alphas` must have shape (C,) = ({c},) or (Q, C) = ({num_queries}, {c}); got {a.shape}.")


@functools.partial(jax.jit, static_argnums=3)
def _from_alphas(assignments, query_ids, indices, num_queries, alphas, n):
    # Per member: alpha_{c(i)} (shared) or alpha_{q, c(i)} (per query); summed per query.
    # Equals (1/N) sum_c m_c(S) alpha_c without forming the (Q, C) counts: O(sum |S|).
    clusters = assignments[indices]
    vals = alphas[0, clusters] if alphas.shape[0] == 1 else alphas[query_ids, clusters]
    return jax.ops.segment_sum(vals, query_ids, num_segments=num_queries) / n


def _terms(cache: InfluenceCache):
    if cache.correction is None:
        raise ValueError(
            "this cache holds no self-influence correction (built with `correction=None`, or read from a file of "
            "an older format), so it cannot score queries whose evaluation set overlaps the removed set. Rebuild "
            "it with `build_cache(..., correction='calibrated')`, or pass `corrected=False` for the paper's "
            "estimator (eq. 11), which omits the self terms."
        )
    return cache.correction


def _eval_subsets(cache: InfluenceCache, eval_sets, num_queries: int):
    if eval_sets is None:
        return None
    ev = _checks.subsets(eval_sets, cache.num_examples, name="eval_sets")
    if ev.sizes.size not in (1, num_queries):
        raise ValueError(
            f"`eval_sets` must hold one evaluation set shared by all queries or one per query ({num_queries}); "
            f"got {ev.sizes.size}."
        )
    return ev


def overlap_correction(cache: InfluenceCache, subsets, eval_sets) -> Float[Array, " q"]:
    """The self-influence correction ``(1/|V|) sum_{i in S cap V} t_i`` of each query, O(|S| + |V|).

    ``V`` is the query's evaluation set, given as training-example indices, and its
    evaluation gradient is taken to be the gradient of the mean loss over V (as in
    :func:`mean_subset_gradients`). Add it to the paper's score (eq. 11) to get the
    corrected CiF score; :func:`loss_delta` does so when given ``eval_sets``.

    Args:
        subsets: Q removed sets S.
        eval_sets: one evaluation set shared by all queries, or Q of them (same forms as
            ``subsets``: a list of index arrays, a (Q, m) integer array or a boolean mask).

    Returns:
        (Q,) corrections, 0 for a query whose S and V do not overlap.
    """
    subs = _checks.subsets(subsets, cache.num_examples)
    q = int(subs.sizes.size)
    return _overlap(cache, subs, _eval_subsets(cache, eval_sets, q))


def _overlap(cache: InfluenceCache, subs, ev) -> Float[Array, " q"]:
    """Sum of ``t_i`` over ``S cap V`` divided by ``|V|``; ``ev`` None means V = S."""
    t = _terms(cache).values
    q = int(subs.sizes.size)
    in_v = in_eval_sets(subs, ev)
    ids, idx = subs.query_ids[in_v], subs.indices[in_v]
    size_v = subs.sizes if ev is None else np.broadcast_to(ev.sizes, (q,))
    sums = jax.ops.segment_sum(t[jnp.asarray(idx)], jnp.asarray(ids), num_segments=q)
    return sums / jnp.asarray(size_v, t.dtype)


def in_eval_sets(subs, ev) -> np.ndarray:
    """For each (query, member) pair of ``subs``: is the member in that query's evaluation set?

    O((|S| + |V|) log) over all queries: a shared set is matched by index alone; per-query sets
    by (query, index) keys. ``ev`` None means V = S.
    """
    if ev is None:
        return np.ones(subs.indices.size, bool)
    if ev.sizes.size == 1:
        return np.isin(subs.indices, ev.indices, assume_unique=False)
    n = subs.num_examples
    keys_s = subs.query_ids.astype(np.int64) * n + subs.indices
    keys_v = ev.query_ids.astype(np.int64) * n + ev.indices
    return np.isin(keys_s, keys_v, assume_unique=True)


def loss_delta_from_alphas(cache: InfluenceCache, subsets, alphas, *, eval_sets=None,
                           corrected: bool = True) -> Float[Array, " q"]:
    """CiF loss change from precomputed alphas: ``(1/N) sum_c m_c(S) alpha_c`` (eq. 11), O(|S| + C).

    Args:
        subsets: Q subsets.
        alphas: (C,) shared by all queries, or (Q, C) one row per query (e.g. the
            K x C fold matrix of :func:`fold_alphas`).
        eval_sets: the training examples each evaluation gradient averages over (see
            :func:`overlap_correction`), to add the self-influence correction over
            ``S cap V``. None: no overlap is known, no correction.
        corrected: False gives the paper's estimator (eq. 11) even with ``eval_sets``.
    """
    subs = _checks.subsets(subsets, cache.num_examples)
    q = int(subs.sizes.size)
    a = _alpha_matrix(cache, alphas, q)
    return _scores(cache, subs, a, _eval_subsets(cache, eval_sets, q), corrected)


def _scores(cache: InfluenceCache, subs, alphas, ev, corrected: bool) -> Float[Array, " q"]:
    """Eq. (11) from the (1 or Q, C) alphas, plus the correction over ``S cap V`` when ``ev`` is given."""
    q = int(subs.sizes.size)
    out = _from_alphas(cache.assignments, jnp.asarray(subs.query_ids), jnp.asarray(subs.indices), q, alphas,
                       jnp.asarray(cache.num_examples, alphas.dtype))
    if corrected and ev is not None:
        out = out + _overlap(cache, subs, ev).astype(out.dtype)
    return out


def loss_delta(cache: InfluenceCache, subsets, eval_grads, *, eval_sets=None,
               corrected: bool = True) -> Float[Array, " q"]:
    """CiF first-order change of the evaluation loss on removing each subset (paper eq. 11).

    .. math:: \\Delta\\hat\\ell(S; V) = g_V^\\top \\hat\\Delta\\theta_S = \\frac{1}{N} \\sum_c m_c(S) \\alpha_c(V)

    Positive: removing S raises the loss on V (S was helpful to V). When the
    evaluation set holds training examples and you say which (``eval_sets``), the
    self-influence correction over ``S cap V`` is added (:mod:`cif_jax.cif.correction`);
    a bare evaluation gradient means no overlap is known, and nothing is added.

    Args:
        subsets: Q subsets.
        eval_grads: (p,) gradient of the evaluation loss shared by all queries, or
            (Q, p) one per query.
        eval_sets: the training examples whose mean loss each ``eval_grads`` row is the
            gradient of: one set shared by all queries or one per query (None: unknown).
        corrected: False gives the paper's estimator (eq. 11) even with ``eval_sets``.

    Returns:
        (Q,) loss changes.
    """
    subs = _checks.subsets(subsets, cache.num_examples)
    q = int(subs.sizes.size)
    g = _eval_matrix(cache, eval_grads, q)
    ev = _eval_subsets(cache, eval_sets, q)
    if ev is not None and g.ndim == 1 and ev.sizes.size > 1:
        raise ValueError(
            f"one evaluation gradient (shape ({cache.num_params},)) was given with {ev.sizes.size} evaluation sets: "
            "give one gradient per query, (Q, p), or one evaluation set shared by all queries."
        )
    if corrected and ev is not None:
        _terms(cache)  # refuse before any work
    return _scores(cache, subs, _alpha_matrix(cache, _alphas(cache.responses, g), q), ev, corrected)

def _check_task(cache: InfluenceCache, task: Task) -> None:
    from ..core.task import fingerprint

    if task.num_examples != cache.num_examples or task.num_params != cache.num_params:
        raise ValueError(
            f"this cache was built for N = {cache.num_examples}, p = {cache.num_params}; the task has N = "
            f"{task.num_examples}, p = {task.num_params}. Build a cache for this task."
        )
    if fingerprint(task) != cache.fingerprint:
        raise ValueError(
            "this cache was built from other parameters or data than this task (fingerprint mismatch). "
            "Rebuild the cache for this model snapshot, or pass the task it was built from."
        )


def mean_subset_gradients(task: Task, subsets, *, batch_size: int | None = None) -> Float[Array, "q p"]:
    """The gradient of the mean loss over each subset, ``(1/|S|) sum_{i in S} g_i``, streamed."""
    _checks.task(task)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    subs = _checks.subsets(subsets, task.num_examples)
    sums, bad = gradient_sums_pass(task, jnp.asarray(subs.mask.T), batch_size)
    raise_on_bad(bad)
    return sums / jnp.asarray(subs.sizes, sums.dtype)[:, None]


def fold_alphas(cache: InfluenceCache, task: Task, folds, *, batch_size: int | None = None) -> Float[Array, "k c"]:
    """The K x C matrix ``alpha_c(S_k) = g_{S_k} . v_c`` for leave-fold-out workloads (section 3.3).

    ``g_{S_k}`` is the gradient of the mean loss over fold k (the held-out fold is
    the evaluation set V = S_k). One streamed gradient pass serves all K folds;
    each fold query then costs O(|S_k| + C) in :func:`loss_delta_from_alphas`.
    """
    _check_task(cache, task)
    g = mean_subset_gradients(task, folds, batch_size=batch_size)
    return _alphas(cache.responses, g.astype(cache.responses.dtype))


def fold_loss_delta(cache: InfluenceCache, task: Task, folds, *, batch_size: int | None = None,
                    corrected: bool = True) -> Float[Array, " k"]:
    """CiF change of each fold's mean loss when that fold is removed from training: ``Delta l(S_k; S_k)``.

    The evaluation set is the removed fold itself (V = S), so by default the
    self-influence correction ``(1/|S_k|) sum_{i in S_k} t_i`` is added to the paper's
    score (:mod:`cif_jax.cif.correction`); ``corrected=False`` gives the paper's estimator
    (eq. 11), which omits the members' self terms ``g_i^T H~^{-1} g_i``.
    """
    _check_task(cache, task)
    if corrected:
        _terms(cache)  # refuse before the gradient pass
    subs = _checks.subsets(folds, cache.num_examples)
    alphas = fold_alphas(cache, task, folds, batch_size=batch_size)
    out = _scores(cache, subs, alphas, None, False)
    if corrected:
        out = out + _overlap(cache, subs, None).astype(out.dtype)
    return out


def fold_matrix(cache: InfluenceCache, task: Task, folds, *, batch_size: int | None = None,
                corrected: bool = True) -> Float[Array, "k k"]:
    """``M[t, v]``: the change of fold v's mean loss when fold t is removed, for every pair.

    The off-diagonal entries are the cross-fold protocol of the paper's section 5.4
    (evaluate on fold v after removing fold t != v): the evaluation set does not
    overlap the removed set, so no correction applies and the clusters alone answer.
    The diagonal is :func:`fold_loss_delta` (corrected by default). Cost: one gradient
    pass for the K x C alphas, then a K x C by C x K product. Folds must not overlap.
    """
    subs = _checks.subsets(folds, cache.num_examples)
    if np.unique(subs.indices).size != subs.indices.size:
        raise ValueError("`folds` overlap: the fold matrix needs disjoint folds (a partition or part of one).")
    _check_task(cache, task)
    if corrected:
        _terms(cache)
    alphas = fold_alphas(cache, task, folds, batch_size=batch_size)
    counts = cluster_counts(cache, folds).astype(alphas.dtype)
    out = jnp.matmul(counts, alphas.T, precision=HIGHEST) / jnp.asarray(cache.num_examples, alphas.dtype)
    if corrected:
        out = out + jnp.diag(_overlap(cache, subs, None).astype(out.dtype))
    return out


@eqx.filter_jit
def _cluster_dots(task, assignments, responses, batch_size):
    return streamed_map(task, lambda g, a: jnp.sum(g * responses[a], axis=1), assignments, batch_size)


def self_influence(cache: InfluenceCache, task: Task, indices=None, *, corrected: bool = True,
                   batch_size: int | None = None) -> Float[Array, " m"]:
    """CiF self-influence ``(1/N) g_i^T H~^{-1} g_i`` of training examples: the score of S = V = {i}.

    Positive: removing example i raises its own loss. Large values flag examples the
    model fits only by memorising them (mislabels, outliers). The corrected estimate is
    ``g_i . v_c(i) / N + t_i`` (:mod:`cif_jax.cif.correction`); ``corrected=False`` gives the
    paper's ``g_i . v_c(i) / N``. One streamed gradient pass over the requested examples.

    Args:
        task: the task the cache was built from.
        indices: example indices (None: all N).
        batch_size: examples per chunk of the gradient pass.
    """
    _check_task(cache, task)
    if corrected:
        _terms(cache)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    n = cache.num_examples
    if indices is None:
        idx = np.arange(n)
    else:
        idx = np.asarray(indices)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or idx.size == 0:
            raise ValueError(f"`indices` must be a non-empty 1-D integer array; got shape {idx.shape}, dtype "
                             f"{idx.dtype}.")
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"`indices` out of range [0, {n}): {idx[(idx < 0) | (idx >= n)][:10].tolist()}.")
    sub = task if indices is None else take_examples(task, idx)
    dots, bad = _cluster_dots(sub, cache.assignments[jnp.asarray(idx)], cache.responses, batch_size)
    raise_on_bad(bad)
    out = dots / jnp.asarray(n, dots.dtype)
    return out + cache.correction.values[jnp.asarray(idx)].astype(out.dtype) if corrected else out
