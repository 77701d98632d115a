"""(E)K-FAC as an approximate inverse, without CG (kronfluence's estimator)."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ...core import checks as _checks
from ...core.task import Task
from ..operator import DampedGGN
from ..precondition import Preconditioner
from .build import build_kfac


def _as_approximation(preconditioner, lam):
    """Checks that ``preconditioner`` can serve as an approximate inverse at damping ``lam``."""
    if not isinstance(preconditioner, Preconditioner):
        raise TypeError(
            "the approximate inverse needs a built preconditioner (from `cif_jax.ekfac_preconditioner`, "
            f"`cif_jax.kfac_preconditioner`, ...); got {type(preconditioner).__name__}."
        )
    preconditioner.check_damping(lam)
    return preconditioner


@eqx.filter_jit
def _apply_approximate(preconditioner, rhs, lam):
    return preconditioner.approximate_inverse(lam)(rhs)


def ekfac_solve(preconditioner, rhs: Float[Array, "r p"], *, damping: float) -> Float[Array, "r p"]:
    """APPROXIMATE solves ``x_r ~ H~^{-1} b_r`` with the damped (E)K-FAC approximation of the GGN.

    No CG and no residual control: the answer is the (E)K-FAC (or Jacobi)
    approximation's, not the damped GGN's. For exact solves pass the same object
    as ``cif_jax.CG(preconditioner=...)``.

    Args:
        preconditioner: from :func:`ekfac_preconditioner` (EK-FAC: eigenvalues
            ``s + lambda``) or :func:`kfac_preconditioner` (factored Tikhonov damping),
            or a :class:`cif_jax.JacobiPreconditioner`.
        rhs: (R, p) right-hand sides.
        damping: lambda > 0.

    Returns:
        (R, p) approximate solutions.
    """
    lam = _checks.damping(damping)
    _as_approximation(preconditioner, lam)
    rhs = jnp.asarray(rhs)
    p = preconditioner.size
    if rhs.ndim != 2 or rhs.shape[1] != p:
        raise ValueError(f"`rhs` must have shape (R, p) = (R, {p}); got {rhs.shape}.")
    dtype = preconditioner.dtype
    return _apply_approximate(preconditioner, rhs.astype(dtype), jnp.asarray(lam, dtype))


def ekfac_influence(
    task: Task,
    subsets,
    *,
    damping: float,
    preconditioner=None,
    batch_size: int | None = None,
    curvature=None,
) -> Float[Array, "q p"]:
    """APPROXIMATE per-query influence with the EK-FAC inverse in place of the exact damped-GGN solve.

    $$
    \\Delta\\theta_S \\approx \\frac1N P^{-1} \\sum_{i \\in S} g_i,
    \\qquad P = (Q_G \\otimes Q_A)(\\mathrm{diag}(s) + \\lambda)(Q_G \\otimes Q_A)^\\top
    \\text{ per block}
    $$

    (kronfluence's estimator; Grosse et al. 2023, eq. (19)). It is fast (no CG) but
    not :func:`cif_jax.estimators.influence`: it equals it only where the Kronecker
    factorisation is exact (one linear layer, squared loss). Use it when speed
    matters more than exactness, and measure the gap on your model.

    Args:
        task: the model snapshot and training data.
        subsets: as :func:`cif_jax.estimators.influence`.
        damping: lambda > 0.
        preconditioner: a built :class:`KFACPreconditioner` (EK-FAC or K-FAC) for this
            task and curvature; None builds EK-FAC here.
        batch_size: examples per chunk of the gradient pass (and of the build).
        curvature: a :class:`cif_jax.CurvatureSample` for the GGN.

    Returns:
        (Q, p) approximate parameter changes, flat in ``ravel_pytree(params)`` order.
    """
    from ...core.gradients import gradient_sums_pass, raise_on_bad

    operator = DampedGGN(task, damping=damping, curvature=curvature, batch_size=batch_size)
    subs = _checks.subsets(subsets, task.num_examples)
    if preconditioner is None:
        preconditioner = build_kfac(operator, True)
    else:
        preconditioner = _as_approximation(preconditioner, operator.damping).check(operator)
    lam, batch_size = operator.damping, operator.batch_size
    sums, bad = gradient_sums_pass(task, jnp.asarray(subs.mask.T), batch_size)
    raise_on_bad(bad)
    dtype = task.dtype
    out = _apply_approximate(preconditioner, sums.astype(dtype), jnp.asarray(lam, dtype))
    return out / jnp.asarray(task.num_examples, dtype)
