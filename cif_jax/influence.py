"""Per-query influence functions: one damped-GGN solve per subset (paper eq. 3).

This is the baseline every CiF number is compared with; it uses the same
operator, solver and tolerance as the cache (:func:`cif_jax.solve_ggn`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from . import _checks
from . import curvature as _curvature
from . import distributed as _distributed
from .gradients import _subset_gradient_sums, raise_on_bad
from .lissa import check_solver, solve_with
from .solve import SolveResult, check_product_dtype, solve_ggn
from .task import Task


def influence_solve(
    task: Task,
    subsets,
    *,
    damping: float,
    rtol: float = 1e-4,
    atol: float = 0.0,
    max_steps: int = 1000,
    max_restarts: int = 3,
    batch_size: int | None = None,
    rhs_batch_size: int | None = None,
    curvature=None,
    preconditioner=None,
    product_dtype=None,
    solver=None,
    progress: bool = False,
    mesh=None,
    rhs_axis: str | None = "rhs",
    data_axis: str | None = None,
) -> SolveResult:
    """Per-query IF with solver diagnostics: ``solutions[q] = (1/N) H~^{-1} sum_{i in S_q} g_i``.

    Same as :func:`influence` but returns the :class:`SolveResult` (solutions
    already divided by N; residuals relative to the gradient sums).
    """
    _checks.task(task)
    _checks.damping(damping)
    _checks.solver_settings(rtol, atol, max_steps, max_restarts)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    _checks.positive_int(rhs_batch_size, "rhs_batch_size", allow_none=True)
    check_product_dtype(product_dtype, task.dtype)
    solver = check_solver(solver, preconditioner=preconditioner, product_dtype=product_dtype, mesh=mesh)
    plan = _distributed.check_mesh(mesh, rhs_axis, data_axis)
    if plan is not None:
        _distributed.check_task(plan, task, _curvature.check(curvature, task.num_examples, task.dtype))
    subs = _checks.subsets(subsets, task.num_examples)
    sums, bad = _subset_gradient_sums(task, jnp.asarray(subs.mask.T), batch_size)
    raise_on_bad(bad)
    if solver is not None:
        result = solve_with(solver, task, sums, damping=damping, rtol=rtol, atol=atol,
                            curvature=_curvature.check(curvature, task.num_examples, task.dtype), chunk_size=batch_size)
        n = jnp.asarray(task.num_examples, result.solutions.dtype)
        return result._replace(solutions=result.solutions / n)
    result = solve_ggn(
        task, sums, damping=damping, rtol=rtol, atol=atol, max_steps=max_steps, max_restarts=max_restarts,
        batch_size=batch_size, rhs_batch_size=rhs_batch_size, curvature=curvature, preconditioner=preconditioner,
        product_dtype=product_dtype, progress=progress, mesh=mesh, rhs_axis=rhs_axis, data_axis=data_axis,
    )
    n = jnp.asarray(task.num_examples, result.solutions.dtype)
    return result._replace(solutions=result.solutions / n)


def influence(
    task: Task,
    subsets,
    *,
    damping: float,
    rtol: float = 1e-4,
    atol: float = 0.0,
    max_steps: int = 1000,
    max_restarts: int = 3,
    batch_size: int | None = None,
    rhs_batch_size: int | None = None,
    curvature=None,
    preconditioner=None,
    product_dtype=None,
    solver=None,
    progress: bool = False,
    mesh=None,
    rhs_axis: str | None = "rhs",
    data_axis: str | None = None,
) -> Float[Array, "q p"]:
    """Per-query influence: the parameter change when each subset S is removed (paper eq. 3).

    .. math::

        \\Delta\\theta_S = \\frac{1}{N} \\tilde H^{-1} \\sum_{i \\in S} g_i,
        \\qquad \\tilde H = \\frac{1}{N} \\sum_i J_i^\\top W_i J_i + \\lambda I.

    The gradient sums are streamed (the (N, p) gradients are never held) and all
    Q systems go to one :func:`cif_jax.solve_ggn` call. A warning is raised when
    some solve misses the tolerance; use :func:`influence_solve` for residuals.

    Args:
        task: the model snapshot and training data.
        subsets: a boolean mask (Q, N), a 2-D integer array (Q, m), or a list of
            integer index arrays (no duplicates, in range, non-empty).
        damping: lambda > 0.
        rtol, atol, max_steps, max_restarts: CG settings, as :func:`cif_jax.solve_ggn`.
        batch_size: examples per chunk of each data pass.
        rhs_batch_size: systems solved together per call.
        curvature: a :class:`cif_jax.CurvatureSample` for the GGN (None: all N examples).
        preconditioner: None, ``"jacobi"``, or a built preconditioner, shared by all Q
            solves (see :func:`cif_jax.nystrom_preconditioner`).
        product_dtype: run the CG products in this lower precision (mixed-precision
            iterative refinement, as :func:`cif_jax.solve_ggn`); residuals stay exact.
        solver: None (block CG) or a :class:`cif_jax.LiSSA` (stochastic Neumann
            recursion; ``rtol``/``atol`` then only judge its result).
        progress: show a progress bar over blocks of systems.
        mesh, rhs_axis, data_axis: spread the Q solves (and optionally the examples of
            the GGN products) over the devices of a ``jax.sharding.Mesh``, as
            :func:`cif_jax.solve_ggn`; the gradient sums are computed in every process.

    Returns:
        (Q, p) parameter changes, flat in ``ravel_pytree(params)`` order.
    """
    return influence_solve(
        task, subsets, damping=damping, rtol=rtol, atol=atol, max_steps=max_steps, max_restarts=max_restarts,
        batch_size=batch_size, rhs_batch_size=rhs_batch_size, curvature=curvature, preconditioner=preconditioner,
        product_dtype=product_dtype, solver=solver, progress=progress, mesh=mesh, rhs_axis=rhs_axis,
        data_axis=data_axis,
    ).solutions
