"""Error bounds of CiF against per-query IF (paper section 3.5, appendix A.5).

Both bounds are stated for the cache as built: its partition, its scatter and its
real solver residuals rho_c.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..core import checks as _checks
from ..core.gradients import gradient_sums_pass, raise_on_bad, streamed_map
from ..core.task import Task
from .cache import InfluenceCache
from .queries import _check_task, cluster_counts


def error_bound(cache: InfluenceCache, subset_size) -> tuple[Float[Array, ...], Float[Array, ...]]:
    """Theorem 3.1: the expected parameter error for a uniformly random subset of size m.

    $$
    \\mathbb{E}\\|\\Delta\\theta_S - \\hat\\Delta\\theta_S\\|_2 \\le
    \\underbrace{\\frac{1}{\\lambda N}\\sqrt{\\frac{m(N-m)}{N-1}\\,\\mathrm{tr}(\\bar\\Sigma)}}_{\\text{scatter}}
    + \\underbrace{\\frac{m}{\\lambda N}\\sum_c \\frac{n_c}{N}\\rho_c\\|\\mu_c\\|_2}_{\\text{solver}}
    $$

    This is eq. (37) of appendix A (eq. 16 of the main text, whose typesetting
    leaves tr(Sigma_bar) outside the square root; the proof puts it inside). For
    N = 1 the finite-population factor is taken as 0.

    Args:
        cache: an :class:`InfluenceCache`.
        subset_size: m, an integer or array of integers in [1, N].

    Returns:
        ``(scatter_term, solver_term)``, arrays shaped like ``subset_size``. Their
        sum bounds the expected parameter error; multiply by ``||g_V||`` for the
        loss error (eq. 38).
    """
    m = np.asarray(subset_size)
    n = cache.num_examples
    if not np.issubdtype(m.dtype, np.integer):
        raise TypeError(f"`subset_size` must be an integer or integer array, got dtype {m.dtype}.")
    if m.size == 0 or m.min() < 1 or m.max() > n:
        raise ValueError(f"`subset_size` must lie in [1, N] = [1, {n}]; got {m.tolist()}.")
    dtype = cache.responses.dtype
    mf = jnp.asarray(m, dtype)
    lam_n = jnp.asarray(cache.damping * n, dtype)
    fpc = mf * (n - mf) / (n - 1) if n > 1 else jnp.zeros_like(mf)
    scatter = jnp.sqrt(fpc * cache.scatter_trace) / lam_n
    weights = cache.cluster_sizes.astype(dtype) / n
    solver = mf * jnp.sum(weights * cache.residuals * cache.mean_norms) / lam_n
    return scatter, solver


def subset_error_bound(
    cache: InfluenceCache, subsets, *, task: Task | None = None, batch_size: int | None = None
) -> tuple[Float[Array, " q"], Float[Array, " q"]]:
    """The deterministic per-subset bound of eq. (13) / Theorem A.6.

    $$
    \\|\\Delta\\theta_S - \\hat\\Delta\\theta_S\\|_2 \\le \\frac{1}{\\lambda N}
    \\Big\\|\\sum_{i \\in S} (g_i - \\mu_{c(i)})\\Big\\|_2
    + \\frac{1}{\\lambda N}\\sum_c m_c(S)\\,\\rho_c\\|\\mu_c\\|_2
    $$

    With ``task`` (the task the cache was built from) the scatter term is exact,
    from one streamed gradient pass. Without it the cache's per-example deviation
    norms give the looser, still valid, triangle bound
    ``sum_{i in S} ||g_i - mu_c(i)||``.

    Returns:
        ``(scatter_term, solver_term)``, each (Q,).
    """
    subs = _checks.subsets(subsets, cache.num_examples)
    counts = cluster_counts(cache, subsets)
    dtype = cache.responses.dtype
    lam_n = jnp.asarray(cache.damping * cache.num_examples, dtype)
    solver = counts.astype(dtype) @ (cache.residuals * cache.mean_norms) / lam_n
    if task is None:
        mask = jnp.asarray(subs.mask, dtype)
        deviation = mask @ cache.deviation_norms
    else:
        _check_task(cache, task)
        batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
        sums, bad = gradient_sums_pass(task, jnp.asarray(subs.mask.T), batch_size)
        raise_on_bad(bad)
        deviation = jnp.linalg.norm(sums - counts.astype(dtype) @ cache.means, axis=1)
    return deviation / lam_n, solver


#: ``||GGN - U diag(s) U^T||`` enters the low-rank bounds as this multiple of its block power-iteration
#: estimate (a lower estimate of the norm: the margin covers what a few rounds miss).
ERROR_MARGIN = 2.0


def _tail_forms(cache: InfluenceCache):
    """``(weights, delta, e)`` of the low-rank bound: ``1/(s + lambda)``, ``Delta_k`` and the ``||E||`` used.

    With ``0 <= E = GGN - U diag(s) U^T <= e I``, the error operator ``B = H~^{-1} - U diag(1/(s+lambda)) U^T``
    of the low-rank inverse satisfies ``-U diag(Delta) U^T <= B <= (I - U U^T) / lambda`` with
    ``Delta_k = e / ((s_k + lambda)(s_k + lambda + e))``, so for any a, b
    ``|a^T B b| <= sqrt(q1(a) q1(b)) + sqrt(q2(a) q2(b))``, ``q2(x) = sum_k Delta_k (U^T x)_k^2`` and
    ``q1(x) = ||(I - U U^T) x||^2 / lambda + q2(x)``.
    """
    low = cache.lowrank
    lam = cache.damping
    s = np.asarray(low.eigenvalues, np.float64)
    e = float(low.error_estimate)
    e = ERROR_MARGIN * (e if np.isfinite(e) else (s[-1] if s.size else 0.0))
    return 1 / (s + lam), e / ((s + lam) * (s + lam + e)), e


def _pair_bound(perp_sq_a, coords_a, perp_sq_b, coords_b, delta, lam):
    """``sqrt(q1(a) q1(b)) + sqrt(q2(a) q2(b))`` row by row (see :func:`_tail_forms`)."""
    q2a = np.sum(delta * coords_a**2, axis=-1)
    q2b = np.sum(delta * coords_b**2, axis=-1)
    q1a, q1b = np.maximum(perp_sq_a, 0) / lam + q2a, np.maximum(perp_sq_b, 0) / lam + q2b
    return np.sqrt(q1a * q1b) + np.sqrt(q2a * q2b)


def query_error_bound(cache: InfluenceCache, subsets, eval_grads, *, task: Task | None = None,
                      batch_size: int | None = None) -> tuple[Float[Array, " q"], Float[Array, " q"]]:
    """What bounds the default (hybrid) estimator's error against per-query IF, for evaluation gradients.

    For an evaluation set that holds no removed example (held-out points, another fold), with
    ``D_S = sum_{i in S} (g_i - mu_c(i))``:

    $$
    |\\Delta\\ell_{IF} - \\Delta\\hat\\ell| \\le \\frac{1}{N}\\Big(\\sqrt{q_1(g_V)\\, q_1(D_S)}
    + \\sqrt{q_2(g_V)\\, q_2(D_S)}\\Big) + \\frac{\\|g_V\\|}{\\lambda N} \\sum_c m_c(S) \\rho_c \\|\\mu_c\\|
    $$

    ``q1(x) = ||(I - U U^T) x||^2 / lambda + q2(x)`` and ``q2`` weighs the factors' coordinates by
    ``e / ((s + lambda)(s + lambda + e))``, ``e`` bounding ``||GGN - U diag(s) U^T||`` (taken as
    :data:`ERROR_MARGIN` times the cache's power-iteration estimate, so the first term is a bound
    up to that estimate). It is zero at full rank and for one cluster per example. With ``task``
    (the task the cache was built from), ``D_S`` is formed exactly from one streamed gradient pass;
    without it, ``sqrt(q(D_S))`` is bounded by the sum over members from the cache's per-example
    tail norms and coordinates (looser, still valid).

    Args:
        subsets: Q removed sets S.
        eval_grads: (p,) one evaluation gradient or (Q, p) one per query.

    Returns:
        ``(tail, solver)``, each (Q,), in loss units.
    """
    from .queries import _eval_matrix

    if cache.lowrank is None:
        raise ValueError("this cache holds no low-rank factors (built with `correction=None` or `rank=0`, or read from "
                         "a file of an older format); its error is eq. (13)'s: use `cj.subset_error_bound`.")
    subs = _checks.subsets(subsets, cache.num_examples)
    q = int(subs.sizes.size)
    g = np.asarray(_eval_matrix(cache, eval_grads, q), np.float64)
    g = np.broadcast_to(g, (q, g.shape[-1])) if g.ndim == 1 else g
    low, lam, n = cache.lowrank, cache.damping, cache.num_examples
    u = np.asarray(low.basis, np.float64)
    _, delta, _ = _tail_forms(cache)
    g_coords = g @ u.T
    g_perp_sq = np.sum((g - g_coords @ u) ** 2, axis=1)
    counts = np.asarray(cluster_counts(cache, subsets), np.float64)
    if task is None:
        dev = np.asarray(low.coords, np.float64) - np.asarray(low.mean_coords, np.float64)[np.asarray(cache.assignments)]
        tail_sq = np.asarray(low.tail_norms, np.float64) ** 2
        q2d = np.sum(delta * dev**2, axis=1)
        root_q1 = np.sqrt(tail_sq / lam + q2d)
        q2g = np.sum(delta * g_coords**2, axis=1)
        sum_q1 = np.bincount(subs.query_ids, weights=root_q1[subs.indices], minlength=q)
        sum_q2 = np.bincount(subs.query_ids, weights=np.sqrt(q2d)[subs.indices], minlength=q)
        tail = np.sqrt(g_perp_sq / lam + q2g) * sum_q1 + np.sqrt(q2g) * sum_q2
    else:
        _check_task(cache, task)
        batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
        sums, bad = gradient_sums_pass(task, jnp.asarray(subs.mask.T), batch_size)
        raise_on_bad(bad)
        d = np.asarray(sums, np.float64) - counts @ np.asarray(cache.means, np.float64)
        d_coords = d @ u.T
        tail = _pair_bound(g_perp_sq, g_coords, np.sum((d - d_coords @ u) ** 2, axis=1), d_coords, delta, lam)
    per_cluster = np.asarray(cache.residuals, np.float64) * np.asarray(cache.mean_norms, np.float64)
    solver = np.linalg.norm(g, axis=1) * (counts @ per_cluster) / (lam * n)
    dtype = cache.responses.dtype
    return jnp.asarray(tail / n, dtype), jnp.asarray(solver, dtype)


class CorrectedErrorBound(NamedTuple):
    """What bounds the corrected CiF score's error against per-query IF, per query, in loss units.

    With ``V`` the evaluation set (training examples, mean loss) and ``d_i = g_i - mu_c(i)``:

    $$
    \\Delta\\ell_{IF} - \\Delta\\hat\\ell_{corr} =
    \\underbrace{\\frac{1}{N|V|}\\sum_{i \\in S} (G_V - 1[i \\in V]\\, g_i)^\\top \\tilde H^{-1} d_i}_{\\text{cross}}
    + \\underbrace{\\frac{1}{|V|}\\sum_{i \\in S \\cap V} (t_i - \\hat t_i)}_{\\text{correction}}
    + \\text{solver},
    $$

    ``G_V = sum_{j in V} g_j``. Attributes:

        cross: ``(1/(lambda N |V|)) sum_{i in S} ||G_V - 1[i in V] g_i|| ||d_i||`` (from
            ``||H~^{-1}|| <= 1/lambda``; ``G_V . g_i`` from one streamed pass): the cross
            terms of the deviations, which no per-example scalar can remove. Like every
            ``1/lambda`` bound it is loose, and it is not always below eq. (13)'s bound on
            the paper's estimator, ``||G_V|| ||sum_S d_i|| / (lambda N |V|)``: that one
            gains from deviations cancelling within S, this one from leaving out the self terms.
        correction: the error of the ``t_i`` estimate over ``S cap V``. A bound for
            ``"exact"`` (``||g_i|| rho_i ||d_i|| / (lambda N)`` from each solve's true
            residual) and ``"nystrom"`` (``||g_i|| ||d_i|| / (lambda N)``, as ``0 <= M -
            H~^{-1} <= I / lambda``); for ``"calibrated"`` an approximate 95% error
            estimate from the calibration draws, ``1.96 sqrt((se_b sum raw_i)^2 + sd^2
            sum raw_i^2) / |V|`` (``se_b`` the scale's standard error, ``sd`` the spread of
            the per-draw ratios), not a bound.
        solver: ``||g_V|| (1/(lambda N)) sum_c m_c(S) rho_c ||mu_c||``, the cluster solves' residuals.
        correction_is_bound: False when ``correction`` is an estimate (calibrated).
    """

    cross: Float[Array, " q"]
    correction: Float[Array, " q"]
    solver: Float[Array, " q"]
    correction_is_bound: bool


def corrected_error_bound(cache: InfluenceCache, task: Task, subsets, eval_sets=None, *,
                          batch_size: int | None = None, estimator="hybrid") -> CorrectedErrorBound:
    """The error terms of a CiF score with self terms (:mod:`cif_jax.cif.correction`) against per-query IF.

    For the default estimator (``"hybrid"``), the deviations go through the low-rank inverse and
    the cross terms' error is what its error operator ``B = H~^{-1} - U diag(1/(s + lambda)) U^T``
    makes of them: ``cross = (1/(N |V|)) sum_{i in S} (sqrt(q1(w_i) q1(d_i)) + sqrt(q2(w_i) q2(d_i)))``
    with ``w_i = G_V - 1[i in V] g_i`` (see :func:`query_error_bound` for ``q1``, ``q2``); it
    vanishes at full rank. The ``correction`` term is the error of the self terms' estimate, as for
    ``"corrected"`` (the remainders are the estimated self terms less their exact low-rank part).
    ``estimator="corrected"`` gives the terms of :class:`CorrectedErrorBound` as documented there.

    Args:
        cache: a cache with a correction.
        task: the task it was built from (one streamed pass for the evaluation gradient sums).
        subsets: Q removed sets S.
        eval_sets: the evaluation sets V (training examples, mean loss), one shared or one per
            query; None: V = S (fold workloads).
        batch_size: examples per chunk of the gradient pass.
        estimator: ``"hybrid"`` (default) or ``"corrected"``.

    Returns:
        A `CorrectedErrorBound`; ``cross + correction + solver`` bounds ``|IF - corrected|``
        when ``correction_is_bound``.
    """
    from .queries import _eval_subsets, _terms, check_estimator, in_eval_sets

    estimator = check_estimator(estimator)
    if not estimator.self_terms:
        raise ValueError(f"`estimator={estimator.name!r}` has no self terms: its per-subset bound is "
                         "`cj.subset_error_bound`.")
    _check_task(cache, task)
    terms = _terms(cache)
    hybrid = estimator.uses_deviations(cache)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    subs = _checks.subsets(subsets, cache.num_examples)
    q = int(subs.sizes.size)
    ev = _eval_subsets(cache, eval_sets, q) if eval_sets is not None else subs
    n = cache.num_examples
    dtype = cache.responses.dtype
    sums, bad = gradient_sums_pass(task, jnp.asarray(ev.mask.T), batch_size)
    raise_on_bad(bad)
    gv_norm = np.asarray(jnp.linalg.norm(sums, axis=1), np.float64)
    size_v = np.asarray(ev.sizes, np.float64)
    if ev.sizes.size == 1 and q > 1:
        gv_norm, size_v = np.full(q, gv_norm[0]), np.full(q, size_v[0])
    lam_n = cache.damping * n
    dev = np.asarray(cache.deviation_norms, np.float64)
    gnorm = np.asarray(terms.grad_norms, np.float64)
    in_v = in_eval_sets(subs, None if eval_sets is None else ev)
    ids, idx = subs.query_ids, subs.indices
    col = ids if ev.sizes.size > 1 else np.zeros_like(ids)
    if hybrid:
        low, lam = cache.lowrank, cache.damping
        u = np.asarray(low.basis, np.float64)
        _, delta, _ = _tail_forms(cache)
        g_sums = np.asarray(sums, np.float64)
        gv_coords = g_sums @ u.T
        gv_perp = g_sums - gv_coords @ u
        # G_V_perp . g_i (= G_V_perp . g_i_perp) for the members of S cap V, from one streamed pass.
        dots, bad = _dots_pass(task, jnp.asarray(gv_perp, sums.dtype), batch_size)
        raise_on_bad(bad)
        dots = np.asarray(dots, np.float64)
        coords = np.asarray(low.coords, np.float64)
        dev_coords = coords - np.asarray(low.mean_coords, np.float64)[np.asarray(cache.assignments)]
        g_perp_sq = np.maximum(gnorm**2 - np.sum(coords**2, axis=1), 0)
        gv_perp_sq = np.sum(gv_perp**2, axis=1)
        w_perp_sq = gv_perp_sq[col] - np.where(in_v, 2 * dots[idx, col] - g_perp_sq[idx], 0)
        w_coords = gv_coords[col] - np.where(in_v[:, None], coords[idx], 0)
        tail_sq = np.asarray(low.tail_norms, np.float64)[idx] ** 2
        weight = _pair_bound(w_perp_sq, w_coords, tail_sq, dev_coords[idx], delta, lam)
        cross = np.bincount(ids, weights=weight, minlength=q) / (n * size_v)
    else:
        # ||G_V - g_i|| exactly for the members of S cap V (G_V . g_i from one more streamed pass),
        # ||G_V|| for the others.
        dots, bad = _dots_pass(task, sums, batch_size)
        raise_on_bad(bad)
        dots = np.asarray(dots, np.float64)
        own = np.sqrt(np.maximum(gv_norm[ids] ** 2 - 2 * dots[idx, col] + gnorm[idx] ** 2, 0.0))
        weight = np.where(in_v, own, gv_norm[ids])
        cross = np.bincount(ids, weights=weight * dev[idx], minlength=q) / (lam_n * size_v)
    both_ids, both = ids[in_v], idx[in_v]
    if terms.exact:
        rho = np.asarray(terms.residuals, np.float64)
        corr = np.bincount(both_ids, weights=gnorm[both] * rho[both] * dev[both], minlength=q) / (lam_n * size_v)
        is_bound = True
    elif terms.calibrated:
        raw = np.asarray(terms.raw, np.float64)
        total = np.bincount(both_ids, weights=raw[both], minlength=q)
        squares = np.bincount(both_ids, weights=raw[both] ** 2, minlength=q)
        se, sd = float(terms.scale_stderr), float(terms.ratio_std)
        corr = 1.96 * np.sqrt((se * total) ** 2 + sd**2 * squares) / size_v
        is_bound = False
    else:
        corr = np.bincount(both_ids, weights=gnorm[both] * dev[both], minlength=q) / (lam_n * size_v)
        is_bound = True
    counts = np.asarray(cluster_counts(cache, subsets), np.float64)
    per_cluster = np.asarray(cache.residuals, np.float64) * np.asarray(cache.mean_norms, np.float64)
    solver = (gv_norm / size_v) * (counts @ per_cluster) / lam_n
    as_arr = lambda a: jnp.asarray(a, dtype)
    return CorrectedErrorBound(as_arr(cross), as_arr(corr), as_arr(solver), is_bound)


@eqx.filter_jit
def _dots_pass(task, sums, batch_size):
    """(N, Q_V) ``g_i . G_V`` for every example and evaluation-set sum, streamed."""
    return streamed_map(task, lambda g, _: jnp.matmul(g, sums.T, precision=jax.lax.Precision.HIGHEST),
                        jnp.zeros(task.num_examples, jnp.int8), batch_size)
