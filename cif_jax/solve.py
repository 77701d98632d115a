"""Damped-GGN solves ``H~ x = b`` for many right-hand sides, with true residuals.

Every solve in cif_jax (the C cluster systems of the cache, paper eq. 8, and the
Q per-query systems of IF, eq. 3) goes through :func:`solve_ggn`, so that both
use the same operator, solver and tolerance.

Solver: conjugate gradients on a block of systems at once (:func:`_block_cg`),
on the equivalent scaled system ``(I + GGN / lambda) y = b / ||b||``,
``x = ||b|| y / lambda``. Scaling by lambda keeps float32 CG stable; normalising
b lets one tolerance serve every system. Each system has its own step sizes and
stops on the paper's relative 2-norm rule (eq. 9), ``||r||_2 <= rtol ||b||_2 +
atol``; the block shares one pass over the data per iteration. We do not trust
the recursive residual: after the solve the true residual
``rho = ||b - H~ x||_2 / ||b||_2`` is recomputed on the unscaled system with one
extra product, and CG is restarted from the current iterate (at most
``max_restarts`` times, within the ``max_steps`` budget) while ``rho`` is above
the tolerance.

Why not ``lineax.CG``: in lineax 0.1.1 its stopping test is elementwise
(``max_i |r_i| / (atol + rtol |b_i|)``, 0/0 on exact zeros of b), and with the
task's arrays traced (as under our jit) it returned NaN after one step on
LeNet-5 where this CG, on the identical operator, converges. The operator
itself is still offered as a lineax operator (:func:`cif_jax.ggn_operator`).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from . import _checks
from . import curvature as _curvature
from . import distributed as _distributed
from .ggn import ggn_matvec_fn
from .precondition import check as _check_preconditioner
from .precondition import for_jit, inverse_fn
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


def _block_cg(apply_a, b, x0, target, limit, apply_minv=None, any_=jnp.any, r0=None):
    """(Preconditioned) conjugate gradients on a block of k systems ``A x_j = b_j`` sharing the operator.

    Each system has its own step sizes and its own stopping rule
    ``||b_j - A x_j||_2 <= target_j`` (the plain residual, also when
    preconditioned); a finished system is frozen while the others go on; system j
    takes at most ``limit[j]`` steps. The residual is updated by the recursion
    only: replacing it periodically by ``b - A x`` while keeping the search
    direction made float32 CG diverge on ill-conditioned GGNs (digits LeNet-5
    with the GGN of 179 examples, damping 1e-3: true residual 1e7 after 1,000
    steps, against convergence in 72 steps without replacement). Drift is caught
    instead by the caller, which recomputes the true residual after the loop and
    restarts CG (fresh direction) from the iterate while it misses the target.
    ``apply_minv`` applies the inverse preconditioner to the rows of a block.
    ``any_`` decides whether any system is still active: ``jnp.any`` here, an
    agreement across devices when the operator is sharded over examples
    (:mod:`cif_jax.distributed`), so that devices that share a product loop
    together. ``r0`` replaces the initial residual ``b - A x0`` (mixed precision: the
    caller computes it with the accurate operator, ``apply_a`` is the cheap one).
    """
    dot = lambda u, v: jnp.sum(u * v, axis=1)
    minv = (lambda r: r) if apply_minv is None else apply_minv
    r = b - apply_a(x0) if r0 is None else r0
    z = minv(r)
    rz = dot(r, z)
    active = (jnp.linalg.norm(r, axis=1) > target) & (limit > 0)
    steps = jnp.zeros(b.shape[0], jnp.int32)

    def cond(state):
        return any_(state[4])

    def body(state):
        x, r, p, rz, active, steps, it = state
        ap = apply_a(p)
        pap = dot(p, ap)
        ok = active & (pap > 0)
        alpha = jnp.where(ok, rz / jnp.where(pap > 0, pap, 1), 0)
        x = x + alpha[:, None] * p
        it = it + 1
        r = r - alpha[:, None] * ap
        z = minv(r)
        rz_new = dot(r, z)
        beta = jnp.where(ok, rz_new / jnp.where(rz > 0, rz, 1), 0)
        p = jnp.where(ok[:, None], z + beta[:, None] * p, p)
        steps = steps + ok.astype(jnp.int32)
        active = ok & (jnp.linalg.norm(r, axis=1) > target) & (steps < limit) & (rz_new > 0)
        return x, r, p, jnp.where(ok, rz_new, rz), active, steps, it

    init = (x0, r, z, rz, active, steps, jnp.asarray(0, jnp.int32))
    x, *_, steps, _ = lax.while_loop(cond, body, init)
    return x, steps


def cast_floats(tree, dtype):
    """``tree`` with every floating-point leaf cast to ``dtype`` (integer labels untouched)."""
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, tree)


def low_precision(mv_of_task, task: Task, product_dtype):
    """``mv`` in ``product_dtype``: params and inputs cast once, vectors cast in and back out.

    ``mv_of_task(task) -> mv`` builds the undamped product for a task; the returned
    function takes and returns rows in the task's dtype.
    """
    low = Task(task.apply_fn, task.loss_fn, cast_floats(task.params, product_dtype),
               cast_floats(task.inputs, product_dtype), task.targets)
    mv = mv_of_task(low)
    return lambda v: mv(v.astype(product_dtype)).astype(v.dtype)


def inner_rtol(product_dtype) -> float:
    """Relative tolerance of each refinement's CG in ``product_dtype``: sqrt(machine epsilon).

    Low-precision CG can cut a residual by about ``eps * kappa`` before rounding in its
    products dominates; asking each inner solve for ``sqrt(eps)`` (3.5e-4 in float32,
    0.088 in bfloat16) stays above that for the condition numbers met here, and each
    refinement then gains about that factor on the true residual.
    """
    return float(np.sqrt(float(jnp.finfo(product_dtype).eps)))


@eqx.filter_jit
def _solve_block(task: Task, rhs, lam, rtol, atol, max_steps, max_restarts, batch_size, curvature=None,
                 preconditioner=None, product_dtype=None):
    build = lambda t: jax.vmap(ggn_matvec_fn(t, batch_size=batch_size, curvature=curvature))
    mv = build(task)
    mv_low = None if product_dtype is None else low_precision(build, task, product_dtype)
    return _solve_system(mv, inverse_fn(preconditioner, lam), rhs, lam, rtol, atol, max_steps, max_restarts,
                         mv_low=mv_low, inner=0.0 if product_dtype is None else inner_rtol(product_dtype))


def _solve_system(mv, minv, rhs, lam, rtol, atol, max_steps, max_restarts, any_=jnp.any, mv_low=None, inner=0.0):
    """The solve of one block, traceable: ``mv`` the undamped GGN on rows, ``minv`` the preconditioner.

    With ``mv_low`` (the same product in a lower precision) the solve is mixed-precision
    iterative refinement: CG iterates with ``mv_low`` to relative tolerance ``inner``;
    every restart starts from the residual of the accurate ``mv``, and the reported
    residuals and the stopping rule are those of ``mv``.
    """
    dtype = rhs.dtype
    lam_ = jnp.asarray(lam, dtype)

    def scaled(y):  # (I + GGN / lambda) y, row by row
        return y + mv(y) / lam_

    if mv_low is None:
        cheap = scaled
    else:
        def cheap(y):
            return y + mv_low(y) / lam_

    bnorm = jnp.linalg.norm(rhs, axis=1)
    scale = jnp.where(bnorm > 0, bnorm, jnp.ones((), dtype))
    bhat = rhs / scale[:, None]
    target = jnp.asarray(rtol, dtype) + jnp.asarray(atol, dtype) / scale

    def true_residual(y):  # ||b - H~ x|| / ||b|| with x = ||b|| y / lambda, on the unscaled system
        x = y * (scale / lam_)[:, None]
        return jnp.linalg.norm(rhs - (mv(x) + lam_ * x), axis=1) / scale

    limit = jnp.full(rhs.shape[0], max_steps, jnp.int32)
    inner_ = jnp.asarray(inner, dtype)
    y, steps = _block_cg(cheap, bhat, jnp.zeros_like(bhat), jnp.maximum(target, inner_), limit, minv, any_)
    res = true_residual(y)
    # Mixed precision keeps the best iterate: a refinement that does not lower the true
    # residual (products too coarse for this operator, e.g. bfloat16 on a stiff GGN) is
    # undone and ends that system's refinement, so the solve never returns worse than x = 0.
    stalled = jnp.zeros(rhs.shape[0], bool)
    if mv_low is not None:
        worse = ~(res < 1)
        y = jnp.where(worse[:, None], jnp.zeros_like(y), y)
        res = jnp.where(worse, jnp.ones_like(res), res)
        stalled = worse & (jnp.linalg.norm(bhat, axis=1) > 0)

    def cond(state):
        _, steps, res, stalled, k = state
        return any_((res > target) & (steps < max_steps) & ~stalled) & (k < max_restarts)

    def body(state):
        y, steps, res, stalled, k = state
        # Restart from the current iterate; systems already within tolerance stay frozen
        # (their explicit initial residual is below target), the budget is what is left.
        # Aim below the target for systems that missed it: their scaled-system residual can
        # already sit at the target while the unscaled one, rounded differently, is just above.
        aim = jnp.where(res > target, 0.5 * target, target)
        if mv_low is None:
            y, more = _block_cg(scaled, bhat, y, aim, limit - steps, minv, any_)
            return y, steps + more, true_residual(y), stalled, k + 1
        # A refinement step: the accurate residual, then cheap CG on the correction,
        # asked for a factor `inner` (never below the final aim); stalled systems sit out.
        r0 = bhat - scaled(y)
        aim = jnp.where(stalled, jnp.inf, jnp.maximum(aim, inner_ * jnp.linalg.norm(r0, axis=1)))
        y_new, more = _block_cg(cheap, bhat, y, aim, limit - steps, minv, any_, r0=r0)
        res_new = true_residual(y_new)
        better = res_new < res
        y = jnp.where(better[:, None], y_new, y)
        return y, steps + more, jnp.where(better, res_new, res), stalled | ~better, k + 1

    y, steps, res, _, _ = lax.while_loop(cond, body, (y, steps, res, stalled, jnp.asarray(0, jnp.int32)))
    x = y * (scale / lam_)[:, None]
    return x, res, steps, res <= target


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
    curvature=None,
    preconditioner=None,
    product_dtype=None,
    progress: bool = False,
    warn: bool = True,
    mesh=None,
    rhs_axis: str | None = "rhs",
    data_axis: str | None = None,
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
        rhs_batch_size: at most this many systems solved together per call (None: all).
            Memory grows with it. The systems are split into equal blocks (50 with
            at most 16 per block: 4 blocks of 13), the last zero-padded, so one
            compiled program serves all and little work is spent on padding.
        curvature: a :class:`cif_jax.CurvatureSample`: the GGN of a weighted subset of
            the examples (None: all N).
        preconditioner: None or ``"none"`` (plain CG), ``"jacobi"`` (built here), or a
            built :class:`cif_jax.NystromPreconditioner` / :class:`cif_jax.JacobiPreconditioner`
            for this task and curvature. It changes the iteration count, not the
            tolerance: the stopping rule and the residuals are those of ``H~``.
        product_dtype: a floating dtype of lower precision than the task's (e.g.
            ``jnp.float32`` for a float64 task, ``jnp.bfloat16`` for a float32 one) to
            run the GGN products of the CG iterations in (None: the task's dtype). The
            solve becomes mixed-precision iterative refinement: each CG pass runs on
            the cheap products to relative tolerance sqrt(eps) of ``product_dtype``,
            and every restart starts from the true residual in the task's dtype, so
            the tolerance, the stopping rule and the reported residuals are exactly
            those of full precision. Each refinement counts as a restart: raise
            ``max_restarts`` for tolerances far below sqrt(eps). A refinement that
            does not lower the true residual is undone and ends that system's
            refinement (products too coarse for the operator), so the result is
            never worse than x = 0 and is reported honestly. Measured on LeNet-5
            (digits, float64 copy of the task, 2 CPU cores, ``benchmarks/``): a
            float32 product costs a third of a float64 one, but float32 CG needs
            more iterations (193 against 115 to rtol 1e-8; 97 against 60 to 1e-4),
            so a solve takes 0.9-0.97x the time; bfloat16 products on the float32
            task could not refine at damping 1e-3 (the solve returns x = 0 with
            residual 1 and warns).
        progress: show a progress bar over blocks of systems.
        warn: warn when some system did not meet the tolerance.
        mesh: a ``jax.sharding.Mesh`` to spread the solves over (None: one device).
            The rows of ``rhs`` are split over ``rhs_axis``, each device running its
            own CG on its share (``rhs_batch_size`` then counts systems per device);
            with ``data_axis`` the examples are split over that axis too and the GGN
            products summed across it. ``rhs`` may be a global array whose rows the
            processes of a multi-process run hold in parts. The results are the
            single-device ones (to the tolerance and float rounding), whole, in every
            process. See :mod:`cif_jax.distributed`.
        rhs_axis: the mesh axis for the right-hand sides (None: not split).
        data_axis: the mesh axis for the examples (None: every device holds them all).

    Returns:
        A :class:`SolveResult`.
    """
    _checks.task(task)
    lam = _checks.damping(damping)
    rtol, atol, max_steps, max_restarts = _checks.solver_settings(rtol, atol, max_steps, max_restarts)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    rhs_batch_size = _checks.positive_int(rhs_batch_size, "rhs_batch_size", allow_none=True)
    plan = _distributed.check_mesh(mesh, rhs_axis, data_axis)
    rhs = _distributed.as_rows(rhs)
    p = task.num_params
    if rhs.ndim != 2 or rhs.shape[1] != p:
        raise ValueError(f"`rhs` must have shape (R, p) = (R, {p}); got {rhs.shape}.")
    if rhs.shape[0] == 0:
        raise ValueError("`rhs` has no rows: nothing to solve.")
    curvature = _curvature.check(curvature, task.num_examples, task.dtype)
    if plan is not None:
        _distributed.check_task(plan, task, curvature)
    _distributed.finite_rows(rhs, "right-hand sides", what="row")
    rhs = rhs.astype(task.dtype)
    preconditioner = _check_preconditioner(preconditioner, task, curvature, batch_size=batch_size)
    product_dtype = check_product_dtype(product_dtype, task.dtype)
    return _solve_rows(task, rhs, lam, rtol, atol, max_steps, int(max_restarts), batch_size, rhs_batch_size,
                       progress, warn, curvature, preconditioner, plan, product_dtype)


def check_product_dtype(product_dtype, task_dtype):
    """Validates ``product_dtype``: None, or a floating dtype less precise than the task's.

    Returns None when it equals the task's dtype (plain full-precision CG).
    """
    if product_dtype is None:
        return None
    try:
        dt = jnp.dtype(product_dtype)
    except TypeError:
        raise TypeError(f"`product_dtype` must be a floating dtype such as jnp.float32, got {product_dtype!r}.") \
            from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"`product_dtype` must be a floating dtype such as jnp.float32, got {dt}.")
    task_dtype = jnp.dtype(task_dtype)
    if dt == task_dtype:
        return None
    if jnp.finfo(dt).eps < jnp.finfo(task_dtype).eps:
        raise ValueError(
            f"`product_dtype={dt}` is more precise than the task ({task_dtype}): mixed precision runs the "
            "products in a *lower* precision. Cast the task's params and data instead, or pass None."
        )
    return dt


def _solve_rows(task, rhs, lam, rtol, atol, max_steps, max_restarts, batch_size, rhs_batch_size, progress, warn,
                curvature=None, preconditioner=None, plan=None, product_dtype=None):
    num = rhs.shape[0]
    preconditioner = for_jit(preconditioner)
    if plan is None:
        x, res, steps, ok = _solve_local(task, rhs, lam, rtol, atol, max_steps, max_restarts, batch_size,
                                         rhs_batch_size, progress, curvature, preconditioner, product_dtype)
    else:
        x, res, steps, ok = _distributed.solve_rows(plan, task, rhs, lam, rtol, atol, max_steps, max_restarts,
                                                    batch_size, rhs_batch_size, progress, curvature, preconditioner,
                                                    product_dtype)
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


def balanced_block(num: int, rhs_batch_size: int | None) -> int:
    """Systems per block: at most ``rhs_batch_size``, as few blocks, the padding spread thin.

    ``ceil(num / ceil(num / rhs_batch_size))``: 50 systems with at most 16 per block
    run as 4 blocks of 13 (2 padding systems), not 16 + 16 + 16 + 2 padded to 16 (14).
    A padding system costs a full product every CG step of its block.
    """
    if rhs_batch_size is None or rhs_batch_size >= num:
        return num
    return -(-num // -(-num // rhs_batch_size))


def _solve_local(task, rhs, lam, rtol, atol, max_steps, max_restarts, batch_size, rhs_batch_size, progress,
                 curvature, preconditioner, product_dtype=None):
    """The systems in blocks of ``rhs_batch_size`` on one device."""
    num = rhs.shape[0]
    block = balanced_block(num, rhs_batch_size)
    parts = []
    # Settings as arrays: a new damping, tolerance or step budget reuses the compiled program.
    settings = (jnp.asarray(lam, rhs.dtype), jnp.asarray(rtol, rhs.dtype), jnp.asarray(atol, rhs.dtype),
                jnp.asarray(max_steps, jnp.int32), jnp.asarray(max_restarts, jnp.int32))
    starts = range(0, num, block)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="CG solves", unit="block", total=math.ceil(num / block))
    for start in starts:
        chunk = rhs[start : start + block]
        short = block - chunk.shape[0]
        if short:
            chunk = jnp.concatenate([chunk, jnp.zeros((short, chunk.shape[1]), chunk.dtype)])
        out = _solve_block(task, chunk, *settings, batch_size, curvature, preconditioner, product_dtype)
        parts.append(jax.tree_util.tree_map(lambda a: a[: block - short], out))
    return tuple(jnp.concatenate(col) for col in zip(*parts))
