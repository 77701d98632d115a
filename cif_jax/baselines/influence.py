"""Per-query influence functions: one damped-GGN solve per subset (paper eq. 3).

This is the baseline every CiF number is compared with; it uses the same
operator, solver and tolerance as the cache (:func:`cif_jax.solve_ggn`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from ..core import checks as _checks
from ..core import curvature as _curvature
from ..core.gradients import gradient_sums_pass, raise_on_bad
from ..core.task import Task
from ..solvers import distributed as _distributed
from ..solvers.solve import AbstractSolver, SolveResult, check_solver


def influence_solve(
    task: Task,
    subsets,
    *,
    damping: float,
    solver: AbstractSolver | None = None,
    batch_size: int | None = None,
    curvature=None,
    mesh=None,
    key=None,
    progress: bool = False,
) -> SolveResult:
    """Per-query IF with solver diagnostics: ``solutions[q] = (1/N) H~^{-1} sum_{i in S_q} g_i``.

    Same as :func:`influence` but returns the :class:`SolveResult` (solutions
    already divided by N; residuals relative to the gradient sums).
    """
    _checks.task(task)
    lam = _checks.damping(damping)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    solver = check_solver(solver)
    plan = _distributed.check_mesh(mesh)  # every check before the gradient pass
    curvature = _curvature.check(curvature, task.num_examples, task.dtype)
    if plan is not None:
        _distributed.check_task(plan, task, curvature)
    subs = _checks.subsets(subsets, task.num_examples)
    sums, bad = gradient_sums_pass(task, jnp.asarray(subs.mask.T), batch_size)
    raise_on_bad(bad)
    result = solver.solve(task, sums, damping=lam, batch_size=batch_size, curvature=curvature, mesh=mesh, key=key,
                          progress=progress)
    n = jnp.asarray(task.num_examples, result.solutions.dtype)
    return result._replace(solutions=result.solutions / n)


def influence(
    task: Task,
    subsets,
    *,
    damping: float,
    solver: AbstractSolver | None = None,
    batch_size: int | None = None,
    curvature=None,
    mesh=None,
    key=None,
    progress: bool = False,
) -> Float[Array, "q p"]:
    """Per-query influence: the parameter change when each subset S is removed (paper eq. 3).

    .. math::

        \\Delta\\theta_S = \\frac{1}{N} \\tilde H^{-1} \\sum_{i \\in S} g_i,
        \\qquad \\tilde H = \\frac{1}{N} \\sum_i J_i^\\top W_i J_i + \\lambda I.

    The gradient sums are streamed (the (N, p) gradients are never held) and all
    Q systems go to one solve. A warning is raised when some solve misses the
    tolerance; use :func:`influence_solve` for residuals.

    Args:
        task: the model snapshot and training data.
        subsets: a boolean mask (Q, N), a 2-D integer array (Q, m), or a list of
            integer index arrays (no duplicates, in range, non-empty).
        damping: lambda > 0.
        solver: a solver object (None: ``cif_jax.CG()``, whose ``"auto"``
            preconditioner weighs a Nystrom build against the Q solves). Pass a
            prepared one (:meth:`cif_jax.CG.prepare`) to share its preconditioner
            with other calls.
        batch_size: examples per chunk of each data pass.
        curvature: a :class:`cif_jax.CurvatureSample` for the GGN (None: all N examples).
        mesh: spread the Q solves (and the examples of the GGN products, over an axis
            ``"data"``) over the devices of a ``jax.sharding.Mesh``, as
            :func:`cif_jax.solve_ggn`; the gradient sums are computed in every process.
        key: PRNG key of a randomized preconditioner build (None: a fixed key).
        progress: show progress bars.

    Returns:
        (Q, p) parameter changes, flat in ``ravel_pytree(params)`` order.
    """
    return influence_solve(task, subsets, damping=damping, solver=solver, batch_size=batch_size,
                           curvature=curvature, mesh=mesh, key=key, progress=progress).solutions
