"""Damped-GGN solves ``H~ x = b`` for many right-hand sides, with true residuals.

Every solve in cif_jax (the C cluster systems of the cache, paper eq. 8, and the
Q per-query systems of IF, eq. 3) goes through :func:`solve_ggn`, so that both
use the same operator, solver and tolerance.

Solver: ``lineax.CG`` on the equivalent scaled system
``(I + GGN / lambda) y = b / ||b||``, ``x = ||b|| y / lambda``. Scaling by lambda
keeps float32 CG stable; normalising b lets one tolerance serve every system.
lineax's CG stops when ``norm(r / (atol + rtol |b|)) <= 1`` elementwise (and a
like test on the step); we pass ``rtol = 0``, an RMS norm and
``atol = target / sqrt(p)``, which makes its residual test exactly
``||r||_2 <= target``, the paper's relative 2-norm rule (eq. 9). We do not
trust the solver's own flag: after each solve the true residual
``rho = ||b - H~ x||_2 / ||b||_2`` is recomputed with one extra product, and CG
is restarted from the current iterate (at most ``max_restarts`` times, within the
``max_steps`` budget) while ``rho`` is above the tolerance.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from . import _checks
from .ggn import ggn_matvec_fn
from .task import Task


class SolveResult(NamedTuple):
    """Solutions of ``H~ x = b`` with their true residuals.

    Attributes:
        solutions: (R, p) the solutions x.
        residuals: (R,) true relative residuals ``||b - H~ x||_2 / ||b||_2`` (0 for b = 0),
            recomputed after the solve (paper eq. 9).
        num_steps: (R,) CG iterations spent, restarts included.
        converged: (R,) whether ``||b - H~ x||_2 <= rtol ||b||_2 + atol``.
    """

    solutions: Float[Array, "r p"]
    residuals: Float[Array, " r"]
    num_steps: Int[Array, " r"]
    converged: Bool[Array, " r"]


def _rms(x):
    leaves = jax.tree_util.tree_leaves(x)
    total = sum(jnp.sum(jnp.square(leaf)) for leaf in leaves)
    size = sum(leaf.size for leaf in leaves)
    return jnp.sqrt(total / size)


@eqx.filter_jit
def _solve_block(task: Task, rhs, lam, rtol, atol, max_steps, max_restarts, batch_size):
    mv = ggn_matvec_fn(task, batch_size=batch_size)
    dtype = rhs.dtype
    p = rhs.shape[1]
    lam_ = jnp.asarray(lam, dtype)
    structure = jax.ShapeDtypeStruct((p,), dtype)
    scaled = lx.FunctionLinearOperator(
        lambda y: y + mv(y) / lam_, structure, tags=(lx.symmetric_tag, lx.positive_semidefinite_tag)
    )

    def relative_residual(b, x, scale):
        return jnp.linalg.norm(b - (mv(x) + lam_ * x)) / scale

    def one(b):
        bnorm = jnp.linalg.norm(b)
        scale = jnp.where(bnorm > 0, bnorm, jnp.ones((), dtype))
        bhat = b / scale
        target = jnp.asarray(rtol, dtype) + jnp.asarray(atol, dtype) / scale

        def run(y0, budget):
            solver = lx.CG(rtol=0.0, atol=target / math.sqrt(p), norm=_rms, max_steps=budget)
            sol = lx.linear_solve(scaled, bhat, solver, options={"y0": y0}, throw=False)
            return sol.value, sol.stats["num_steps"].astype(jnp.int32)

        y, steps = run(jnp.zeros_like(b), jnp.asarray(max_steps, jnp.int32))
        res = relative_residual(b, y * scale / lam_, scale)

        def cond(state):
            _, steps, res, k = state
            return (res > target) & (k < max_restarts) & (steps < max_steps)

        def body(state):
            y, steps, _, k = state
            y, more = run(y, max_steps - steps)
            return y, steps + more, relative_residual(b, y * scale / lam_, scale), k + 1

        y, steps, res, _ = lax.while_loop(cond, body, (y, steps, res, jnp.asarray(0, jnp.int32)))
        return y * scale / lam_, res, steps, res <= target

    return jax.vmap(one)(rhs)


def solve_ggn(
    task: Task,
    rhs: Float[Array, "r p"],
    *,
    damping: float,
    rtol: float = 1e-4,
    atol: float = 0.0,
    max_steps: int = 1000,
    max_restarts: int = 3,
    batch_size: int | None = None,
    rhs_batch_size: int | None = None,
    progress: bool = False,
    warn: bool = True,
) -> SolveResult:
    """Solves ``H~ x_r = b_r`` for every row of ``rhs`` by CG, reporting true residuals.

    The results do not depend on ``batch_size`` or ``rhs_batch_size`` beyond float
    rounding: each system runs its own CG iteration; blocks only share the data
    passes.

    Args:
        task: the model snapshot and training data.
        rhs: (R, p) right-hand sides (for the cache: cluster means, eq. 8; for IF:
            gradient sums, eq. 3).
        damping: lambda > 0 of eq. (2).
        rtol: stop when ``||b - H~ x||_2 <= rtol ||b||_2 + atol`` (eq. 9). In float32
            CG stalls near 1e-6; ask for less.
        atol: absolute part of the tolerance (default 0).
        max_steps: CG iterations per system, restarts included.
        max_restarts: restarts from the current iterate when the recomputed true
            residual is above tolerance.
        batch_size: examples per chunk of each GGN product (None: all at once).
        rhs_batch_size: systems solved together per call (None: all). Memory grows
            with it; the last block is zero-padded so one compiled program serves all.
        progress: show a progress bar over blocks of systems.
        warn: warn when some system did not meet the tolerance.

    Returns:
        A :class:`SolveResult`.
    """
    _checks.task(task)
    lam = _checks.damping(damping)
    rtol = _checks.nonnegative_float(rtol, "rtol")
    atol = _checks.nonnegative_float(atol, "atol")
    if rtol == 0 and atol == 0:
        raise ValueError("`rtol` and `atol` are both 0: CG would never meet the tolerance; set rtol > 0.")
    max_steps = _checks.positive_int(max_steps, "max_steps")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, (int, np.integer)) or max_restarts < 0:
        raise ValueError(f"`max_restarts` must be an integer >= 0, got {max_restarts!r}.")
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    rhs_batch_size = _checks.positive_int(rhs_batch_size, "rhs_batch_size", allow_none=True)
    rhs = jnp.asarray(rhs)
    p = task.num_params
    if rhs.ndim != 2 or rhs.shape[1] != p:
        raise ValueError(f"`rhs` must have shape (R, p) = (R, {p}); got {rhs.shape}.")
    if rhs.shape[0] == 0:
        raise ValueError("`rhs` has no rows: nothing to solve.")
    _checks.finite_rows(rhs, "right-hand sides", what="row")
    rhs = rhs.astype(task.dtype)
    return _solve_rows(task, rhs, lam, rtol, atol, max_steps, int(max_restarts), batch_size, rhs_batch_size,
                       progress, warn)


def _solve_rows(task, rhs, lam, rtol, atol, max_steps, max_restarts, batch_size, rhs_batch_size, progress, warn):
    num = rhs.shape[0]
    block = num if rhs_batch_size is None else min(rhs_batch_size, num)
    parts = []
    starts = range(0, num, block)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="CG solves", unit="block", total=math.ceil(num / block))
    for start in starts:
        chunk = rhs[start : start + block]
        short = block - chunk.shape[0]
        if short:
            chunk = jnp.concatenate([chunk, jnp.zeros((short, chunk.shape[1]), chunk.dtype)])
        out = _solve_block(task, chunk, lam, rtol, atol, max_steps, max_restarts, batch_size)
        parts.append(jax.tree_util.tree_map(lambda a: a[: block - short], out))
    x, res, steps, ok = (jnp.concatenate(col) for col in zip(*parts))
    result = SolveResult(x, res, steps, ok)
    if warn and not bool(ok.all()):
        bad = np.flatnonzero(~np.asarray(ok))
        warnings.warn(
            f"{bad.size} of {num} CG solves did not reach the requested tolerance (rtol={rtol:g}, atol={atol:g}): "
            f"largest true relative residual {float(res.max()):.3g} (systems {bad[:10].tolist()}). Raise "
            f"`max_steps` (now {max_steps}), increase `damping`, or loosen `rtol`"
            + (" (float32 CG stalls near 1e-6)" if rhs.dtype == jnp.float32 else "")
            + ". The residuals are stored and enter the error bound.",
            stacklevel=3,
        )
    return result
