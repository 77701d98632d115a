"""Batched Lasso by FISTA with a duality-gap certificate (STRIDE's influence recovery).

For every row ``y`` of ``targets`` (one per query) and a shared design
``X`` (K x N),

$$
\\min_w \\; \\tfrac12 \\lVert y - X w \\rVert_2^2 + \\alpha \\lVert w \\rVert_1 .
$$

STRIDE (sec. 3, app. E.1) recovers per-example scores ``w`` from the K subset
responses ``y`` this way; app. E.1 writes the loss without the 1/2, which only
rescales ``alpha``. All queries share ``X``, so one FISTA step for all of them
is two matrix products, ``W X^T`` and ``R X``, inside one ``lax.while_loop``.

Step size ``1/L`` with ``L = lambda_max(X X^T)``; momentum restarts per query
when the step goes uphill (the gradient restart of O'Donoghue and Candes). The
loop stops when every duality gap is at most ``tol * ||y||^2``; the dual point
is the rescaled residual ``theta = r min(1, alpha / ||X^T r||_inf)``, and

$$
\\mathrm{gap} = \\tfrac12\\lVert r\\rVert^2 + \\alpha\\lVert w\\rVert_1
  - \\big(\\tfrac12\\lVert y\\rVert^2 - \\tfrac12\\lVert y - \\theta\\rVert^2\\big) \\ge 0
$$

bounds the distance of the objective from its minimum.

References:
    Beck and Teboulle, "A fast iterative shrinkage-thresholding algorithm for
    linear inverse problems", SIAM J. Imaging Sciences 2009.
    O'Donoghue and Candes, "Adaptive restart for accelerated gradient schemes",
    Found. Comput. Math. 2015. https://arxiv.org/abs/1204.3982
    "STRIDE: training data attribution in activation space", sec. 3 and app. E.1, F.2.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from ..core import checks as _checks

__all__ = ["LassoSolution", "lasso"]

_HI = lax.Precision.HIGHEST
# Duality gaps are computed every this many FISTA steps (each check costs two
# more matrix products).
_CHECK_EVERY = 10
# Default alpha as a fraction of alpha_max = ||X^T y||_inf (the smallest alpha
# with w = 0 the solution). The STRIDE paper gives no value.
DEFAULT_ALPHA_RATIO = 1e-2


class LassoSolution(NamedTuple):
    """Solutions of a batch of Lasso problems sharing one design.

    Attributes:
        coef: ``(Q, N)`` coefficients ``w``, one row per query.
        intercept: ``(Q,)`` intercepts (zeros unless ``fit_intercept``).
        alpha: ``(Q,)`` the penalty used for each query.
        dual_gap: ``(Q,)`` duality gap at ``coef`` (an upper bound on the
            objective's distance from its minimum).
        num_steps: FISTA steps taken (shared by all queries).
        converged: ``(Q,)`` whether ``dual_gap <= tol * ||y||^2``.
    """

    coef: Float[Array, "q n"]
    intercept: Float[Array, " q"]
    alpha: Float[Array, " q"]
    dual_gap: Float[Array, " q"]
    num_steps: Int[Array, ""]
    converged: Bool[Array, " q"]


def _gap(X, Y, W, alpha):
    """Primal objective minus the dual at the rescaled residual, per row."""
    R = Y - jnp.matmul(W, X.T, precision=_HI)
    corr = jnp.max(jnp.abs(jnp.matmul(R, X, precision=_HI)), axis=1)
    scale = jnp.where(corr > alpha, alpha / jnp.where(corr > 0, corr, 1), 1.0)
    theta = R * scale[:, None]
    primal = 0.5 * jnp.sum(R * R, axis=1) + alpha * jnp.sum(jnp.abs(W), axis=1)
    dual = 0.5 * jnp.sum(Y * Y, axis=1) - 0.5 * jnp.sum((Y - theta) ** 2, axis=1)
    return primal - dual


@functools.partial(jax.jit, static_argnames=("fit_intercept", "max_steps"))
def _fista(X, Y, alpha, alpha_ratio, tol, *, fit_intercept: bool, max_steps: int):
    dtype = X.dtype
    if fit_intercept:
        x_mean = jnp.mean(X, axis=0)
        y_mean = jnp.mean(Y, axis=1)
        X = X - x_mean[None, :]
        Y = Y - y_mean[:, None]
    if alpha is None:
        alpha = alpha_ratio * jnp.max(jnp.abs(jnp.matmul(Y, X, precision=_HI)), axis=1)
    else:
        alpha = jnp.broadcast_to(jnp.asarray(alpha, dtype), (Y.shape[0],))
    lip = jnp.linalg.eigvalsh(jnp.matmul(X, X.T, precision=_HI))[-1]
    lip = jnp.where(lip > 0, lip, 1.0)
    thresh = (alpha / lip)[:, None]
    bound = tol * jnp.sum(Y * Y, axis=1)

    def prox_step(V):
        grad = jnp.matmul(Y - jnp.matmul(V, X.T, precision=_HI), X, precision=_HI)
        U = V + grad / lip
        return jnp.sign(U) * jnp.maximum(jnp.abs(U) - thresh, 0)

    def cond(state):
        k, _, _, _, gap = state
        return (k < max_steps) & jnp.any(gap > bound)

    def body(state):
        k, W, V, t, gap = state
        W_new = prox_step(V)
        # Gradient restart: drop the momentum of queries whose step goes uphill.
        uphill = jnp.sum((V - W_new) * (W_new - W), axis=1) > 0
        t = jnp.where(uphill, 1.0, t)
        t_new = 0.5 * (1 + jnp.sqrt(1 + 4 * t * t))
        V_new = W_new + ((t - 1) / t_new)[:, None] * (W_new - W)
        k = k + 1
        gap = lax.cond(k % _CHECK_EVERY == 0, lambda: _gap(X, Y, W_new, alpha), lambda: gap)
        return k, W_new, V_new, t_new, gap

    W0 = jnp.zeros((Y.shape[0], X.shape[1]), dtype)
    init = (jnp.asarray(0, jnp.int32), W0, W0, jnp.ones(Y.shape[0], dtype), _gap(X, Y, W0, alpha))
    k, W, _, _, _ = lax.while_loop(cond, body, init)
    gap = _gap(X, Y, W, alpha)
    if fit_intercept:
        intercept = y_mean - jnp.matmul(W, x_mean, precision=_HI)
    else:
        intercept = jnp.zeros(Y.shape[0], dtype)
    return LassoSolution(W, intercept, alpha, gap, k, gap <= bound)


def lasso(
    design: Float[Array, "k n"],
    targets: Float[Array, "q k"] | Float[Array, " k"],
    *,
    alpha=None,
    alpha_ratio: float | None = None,
    fit_intercept: bool = False,
    tol: float = 1e-6,
    max_steps: int = 5000,
) -> LassoSolution:
    """Solves ``min_w 1/2 ||y - X w||^2 + alpha ||w||_1`` for every row ``y`` of ``targets``.

    FISTA (Beck and Teboulle, 2009) with step ``1/L``, ``L = lambda_max(X X^T)``,
    and per-query gradient restarts; all queries run in one jitted
    ``lax.while_loop``, two matrix products a step. The loop stops when every
    duality gap (dual point ``r min(1, alpha / ||X^T r||_inf)``, module
    docstring) is at most ``tol * ||y||^2``; a warning names the queries that
    did not get there in ``max_steps``.

    STRIDE recovers per-example scores this way (sec. 3, app. E.1: design = the
    (K, N) membership matrix, ``y`` = the K subset responses). The document
    gives no ``alpha``; the default is ``alpha = 1e-2 ||X^T y||_inf`` per query.

    The objective is scikit-learn's ``Lasso`` times ``K`` (the number of rows
    of ``design``): ``Lasso(alpha=alpha / K)`` solves the same problem.

    Args:
        design: ``(K, N)`` matrix ``X``, shared by all queries.
        targets: ``(Q, K)`` responses, or ``(K,)`` for one query.
        alpha: penalty, a scalar or ``(Q,)``; ``None``: ``alpha_ratio *
            ||X^T y||_inf`` per query.
        alpha_ratio: replaces the default ratio ``1e-2``; not with ``alpha``.
        fit_intercept: centre ``y`` and the columns of ``X`` over the K rows and
            return the intercept ``mean(y) - mean(X, 0) @ w``.
        tol: relative duality-gap tolerance.
        max_steps: most FISTA steps.

    Returns:
        :class:`LassoSolution` (``coef`` is ``(Q, N)``, or ``(N,)`` for 1-D
        ``targets``, and likewise for the per-query fields). The dtype is that of
        ``design`` and ``targets`` promoted.

    Raises:
        ValueError, TypeError: mismatched shapes, non-finite values, ``tol``,
            ``alpha`` or ``alpha_ratio`` <= 0, both ``alpha`` and ``alpha_ratio``,
            ``max_steps < 1``.

    Examples:
        >>> import jax.numpy as jnp
        >>> X = jnp.eye(3)
        >>> sol = lasso(X, jnp.array([2.0, -0.5, 0.0]), alpha=1.0)
        >>> [round(float(v), 6) for v in sol.coef]
        [1.0, 0.0, 0.0]
    """
    X = jnp.asarray(design)
    Y = jnp.asarray(targets)
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"`design` must be a non-empty (K, N) matrix, got shape {X.shape}.")
    single = Y.ndim == 1
    if single:
        Y = Y[None]
    if Y.ndim != 2 or Y.shape[1] != X.shape[0]:
        raise ValueError(
            f"`targets` must have shape (Q, K) = (Q, {X.shape[0]}) or ({X.shape[0]},) to match `design` "
            f"(K, N) = {X.shape}; got {jnp.shape(targets)}."
        )
    if Y.shape[0] < 1:
        raise ValueError("`targets` holds no query (Q = 0); pass at least one row.")
    for arr, name in ((X, "design"), (Y, "targets")):
        if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)
                or arr.dtype == bool):
            raise TypeError(f"`{name}` must hold real numbers, got dtype {arr.dtype}.")
    dtype = jnp.result_type(X.dtype, Y.dtype, float)
    X, Y = X.astype(dtype), Y.astype(dtype)
    _checks.finite_rows(X, "`design`", what="row")
    _checks.finite_rows(Y, "`targets`", what="query")
    if alpha is not None and alpha_ratio is not None:
        raise ValueError("Pass `alpha` or `alpha_ratio`, not both: `alpha_ratio` sets alpha = ratio * ||X^T y||_inf.")
    if alpha is not None:
        a = np.asarray(alpha, np.float64)
        if a.ndim > 1 or (a.ndim == 1 and a.shape[0] != Y.shape[0]):
            raise ValueError(f"`alpha` must be a scalar or hold one value per query ({Y.shape[0]}), got shape {a.shape}.")
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ValueError(f"`alpha` must be finite and > 0 (alpha = 0 is least squares), got {a.tolist()}.")
        alpha = jnp.asarray(a, dtype)
        ratio = jnp.asarray(0, dtype)
    else:
        ratio = jnp.asarray(DEFAULT_ALPHA_RATIO if alpha_ratio is None else _checks.positive_float(alpha_ratio, "alpha_ratio"),
                            dtype)
    tol = _checks.positive_float(tol, "tol")
    max_steps = _checks.positive_int(max_steps, "max_steps")
    if not isinstance(fit_intercept, (bool, np.bool_)):
        raise TypeError(f"`fit_intercept` must be True or False, got {fit_intercept!r}.")
    sol = _fista(X, Y, alpha, ratio, jnp.asarray(tol, dtype), fit_intercept=bool(fit_intercept),
                 max_steps=max_steps)
    converged = np.asarray(sol.converged)
    if not converged.all():
        bad = np.flatnonzero(~converged)
        warnings.warn(
            f"lasso: {bad.size} of {converged.size} queries (e.g. {bad[:10].tolist()}) did not reach a duality gap "
            f"<= tol * ||y||^2 in max_steps={max_steps} FISTA steps (largest gap "
            f"{float(np.max(np.asarray(sol.dual_gap)[bad])):.2e}); "
            "raise `max_steps` or `tol`, or a larger alpha.",
            RuntimeWarning,
            stacklevel=2,
        )
    if single:
        sol = sol._replace(coef=sol.coef[0], intercept=sol.intercept[0], alpha=sol.alpha[0],
                           dual_gap=sol.dual_gap[0], converged=sol.converged[0])
    return sol
