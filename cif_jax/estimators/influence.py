"""Per-query influence functions: one damped-GGN solve per subset (paper eq. 3).

This is the baseline every CiF number is compared with; it uses the same
operator, solver and tolerance as the cache (:func:`cif_jax.solve_ggn`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..core import checkpoint as _checkpoint
from ..core import checks as _checks
from ..core.gradients import gradient_sums_pass, raise_on_bad
from ..core.phases import PhaseRunner
from ..core.task import Task
from ..solvers import distributed as _distributed
from ..solvers.operator import DampedGGN
from ..solvers.solve import AbstractSolver, SolveResult, check_solver, prepare_checkpointed, solve_checkpointed


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
    checkpoint_dir=None,
) -> SolveResult:
    """Per-query IF with solver diagnostics: ``solutions[q] = (1/N) H~^{-1} sum_{i in S_q} g_i``.

    Same as :func:`influence` but returns the :class:`SolveResult` (solutions
    already divided by N; residuals relative to the gradient sums).
    """
    solver = check_solver(solver)  # every check before the gradient pass
    operator = DampedGGN(task, damping=damping, curvature=curvature, batch_size=batch_size, mesh=mesh)
    subs = _checks.subsets(subsets, task.num_examples)
    if checkpoint_dir is None:
        sums, bad = gradient_sums_pass(task, jnp.asarray(subs.mask.T), operator.batch_size)
        raise_on_bad(bad)
        result = solver.solve(operator, sums, key=key, progress=progress)
    else:
        result = _checkpointed(operator, subs.mask, solver, key, progress, checkpoint_dir)
    n = jnp.asarray(task.num_examples, result.solutions.dtype)
    return result._replace(solutions=result.solutions / n)


def _checkpointed(operator: DampedGGN, mask, solver, key, progress, directory):
    """The gradient sums, the preconditioner and each block of solves saved in ``directory`` as they finish."""
    mask = np.asarray(mask, bool)
    _distributed.check_single_process(operator.mesh)
    ckpt = _checkpoint.Checkpoint(directory, kind="influence", settings={
        "fingerprint": operator.fingerprint, "subsets": _checkpoint.digest(mask),
        "num_subsets": int(mask.shape[0]), "damping": operator.damping, "solver": solver.describe(),
        "solver_arrays": _checkpoint.leaves_digest(solver),
        "curvature": operator.describe_curvature(),
        "key": None if key is None else np.asarray(jax.random.key_data(_checks.as_key(key))).tolist()})
    sums, bad = PhaseRunner(ckpt).stored("sums", lambda: gradient_sums_pass(operator.task, jnp.asarray(mask.T),
                                                                              operator.batch_size))
    raise_on_bad(bad)
    solver = prepare_checkpointed(solver, ckpt, lambda: solver.prepare(operator, mask.shape[0], key=key,
                                                                       progress=progress))
    return solve_checkpointed(solver, operator, sums, checkpoint=ckpt, name="solves", key=key, progress=progress)


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
    checkpoint_dir=None,
) -> Float[Array, "q p"]:
    """Per-query influence: the parameter change when each subset S is removed (paper eq. 3).

    $$
    \\Delta\\theta_S = \\frac{1}{N} \\tilde H^{-1} \\sum_{i \\in S} g_i,
    \\qquad \\tilde H = \\frac{1}{N} \\sum_i J_i^\\top W_i J_i + \\lambda I.
    $$

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
        checkpoint_dir: a directory to make a long run resumable (None: keep
            nothing). The gradient sums, the prepared preconditioner and every block
            of solves are written there atomically as they finish; a second call with
            the same task, subsets and settings reads them and solves the rest (the
            result equals an uninterrupted run to the solver's tolerance). A
            directory written for other subsets, another task or other settings is
            refused (:class:`cif_jax.CheckpointError`).

    Returns:
        (Q, p) parameter changes, flat in ``ravel_pytree(params)`` order.
    """
    return influence_solve(task, subsets, damping=damping, solver=solver, batch_size=batch_size,
                           curvature=curvature, mesh=mesh, key=key, progress=progress,
                           checkpoint_dir=checkpoint_dir).solutions
