"""Online CiF queries: count members per cluster, recombine cached responses (paper eqs. 10-11).

A query S enters only through its cluster counts ``m_c(S)``. Parameter changes
cost O(|S| + C p); loss changes with precomputed ``alpha_c(V) = g_V . v_c`` cost
O(|S| + C).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from . import _checks
from .cache import InfluenceCache
from .gradients import _subset_gradient_sums, raise_on_bad
from .task import Task

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
        (Q, p) flat parameter changes; compare with :func:`cif_jax.influence`.
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


def loss_delta_from_alphas(cache: InfluenceCache, subsets, alphas) -> Float[Array, " q"]:
    """CiF loss change from precomputed alphas: ``(1/N) sum_c m_c(S) alpha_c`` (eq. 11), O(|S| + C).

    Args:
        subsets: Q subsets.
        alphas: (C,) shared by all queries, or (Q, C) one row per query (e.g. the
            K x C fold matrix of :func:`fold_alphas`).
    """
    subs = _checks.subsets(subsets, cache.num_examples)
    q = int(subs.sizes.size)
    a = _alpha_matrix(cache, alphas, q)
    return _from_alphas(cache.assignments, jnp.asarray(subs.query_ids), jnp.asarray(subs.indices), q, a,
                        jnp.asarray(cache.num_examples, a.dtype))


def loss_delta(cache: InfluenceCache, subsets, eval_grads) -> Float[Array, " q"]:
    """CiF first-order change of the evaluation loss on removing each subset (paper eq. 11).

    .. math:: \\Delta\\hat\\ell(S; V) = g_V^\\top \\hat\\Delta\\theta_S = \\frac{1}{N} \\sum_c m_c(S) \\alpha_c(V)

    Positive: removing S raises the loss on V (S was helpful to V).

    Args:
        subsets: Q subsets.
        eval_grads: (p,) gradient of the evaluation loss shared by all queries, or
            (Q, p) one per query.

    Returns:
        (Q,) loss changes.
    """
    subs = _checks.subsets(subsets, cache.num_examples)
    q = int(subs.sizes.size)
    g = _eval_matrix(cache, eval_grads, q)
    a = _alpha_matrix(cache, _alphas(cache.responses, g), q)
    return _from_alphas(cache.assignments, jnp.asarray(subs.query_ids), jnp.asarray(subs.indices), q, a,
                        jnp.asarray(cache.num_examples, a.dtype))


def _check_task(cache: InfluenceCache, task: Task) -> None:
    from .task import fingerprint

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
    sums, bad = _subset_gradient_sums(task, jnp.asarray(subs.mask.T), batch_size)
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


def fold_loss_delta(cache: InfluenceCache, task: Task, folds, *, batch_size: int | None = None) -> Float[Array, " k"]:
    """CiF change of each fold's mean loss when that fold is removed from training: ``Delta l(S_k; S_k)``."""
    return loss_delta_from_alphas(cache, folds, fold_alphas(cache, task, folds, batch_size=batch_size))
