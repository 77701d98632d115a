"""The CG kernel of every damped-GGN solve: block conjugate gradients with true-residual restarts.

Used by :class:`cif_jax.CG` on one device and by :mod:`cif_jax.solvers.distributed` inside
``shard_map``. The systems ``H~ x = b`` are solved in the equivalent scaled form
``(I + GGN / lambda) y = b / ||b||``, ``x = ||b|| y / lambda``: scaling by lambda
keeps float32 CG stable, and normalising b lets one tolerance serve every system.
Each system has its own step sizes and stops on the relative 2-norm rule (paper
eq. 9), ``||r||_2 <= rtol ||b||_2 + atol``; the block shares one pass over the
data per iteration. The recursive residual is not trusted: after CG the true
residual is recomputed on the unscaled system, and CG restarts from the iterate
while it is above the tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..core.task import Task


def block_cg(apply_a, b, x0, target, limit, apply_minv=None, any_=jnp.any, r0=None):
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
    (:mod:`cif_jax.solvers.distributed`), so that devices that share a product loop
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


def solve_system(mv, minv, rhs, lam, rtol, atol, max_steps, max_restarts, any_=jnp.any, mv_low=None, inner=0.0):
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

    def true_residual(y):
        """``(||b - H~ x|| / ||b||, (I + GGN / lambda) y)`` with x = ||b|| y / lambda: the residual of
        the unscaled system, and the scaled operator on y from the same product (a restart's
        initial residual, so that the restart makes no product of its own)."""
        x = y * (scale / lam_)[:, None]
        hx = mv(x)
        return jnp.linalg.norm(rhs - (hx + lam_ * x), axis=1) / scale, y + hx / scale[:, None]

    limit = jnp.full(rhs.shape[0], max_steps, jnp.int32)
    inner_ = jnp.asarray(inner, dtype)
    # From x0 = 0 the initial residual is b itself: no product (and one fewer copy of it to compile).
    y, steps = block_cg(cheap, bhat, jnp.zeros_like(bhat), jnp.maximum(target, inner_), limit, minv, any_, r0=bhat)
    res, ay = true_residual(y)
    # Mixed precision keeps the best iterate: a refinement that does not lower the true
    # residual (products too coarse for this operator, e.g. bfloat16 on a stiff GGN) is
    # undone and ends that system's refinement, so the solve never returns worse than x = 0.
    stalled = jnp.zeros(rhs.shape[0], bool)
    if mv_low is not None:
        worse = ~(res < 1)
        y = jnp.where(worse[:, None], jnp.zeros_like(y), y)
        ay = jnp.where(worse[:, None], jnp.zeros_like(ay), ay)
        res = jnp.where(worse, jnp.ones_like(res), res)
        stalled = worse & (jnp.linalg.norm(bhat, axis=1) > 0)

    def cond(state):
        _, _, steps, res, stalled, k = state
        return any_((res > target) & (steps < max_steps) & ~stalled) & (k < max_restarts)

    def body(state):
        y, ay, steps, res, stalled, k = state
        # Restart from the current iterate; systems already within tolerance stay frozen
        # (their explicit initial residual is below target), the budget is what is left.
        # Aim below the target for systems that missed it: their scaled-system residual can
        # already sit at the target while the unscaled one, rounded differently, is just above.
        aim = jnp.where(res > target, 0.5 * target, target)
        # The accurate residual of the iterate, from the product its true residual made.
        r0 = bhat - ay
        if mv_low is None:
            y, more = block_cg(scaled, bhat, y, aim, limit - steps, minv, any_, r0=r0)
            res, ay = true_residual(y)
            return y, ay, steps + more, res, stalled, k + 1
        # A refinement step: cheap CG on the correction, asked for a factor `inner` (never
        # below the final aim); stalled systems sit out.
        aim = jnp.where(stalled, jnp.inf, jnp.maximum(aim, inner_ * jnp.linalg.norm(r0, axis=1)))
        y_new, more = block_cg(cheap, bhat, y, aim, limit - steps, minv, any_, r0=r0)
        res_new, ay_new = true_residual(y_new)
        better = res_new < res
        y = jnp.where(better[:, None], y_new, y)
        ay = jnp.where(better[:, None], ay_new, ay)
        return y, ay, steps + more, jnp.where(better, res_new, res), stalled | ~better, k + 1

    y, _, steps, res, _, _ = lax.while_loop(cond, body, (y, ay, steps, res, stalled, jnp.asarray(0, jnp.int32)))
    x = y * (scale / lam_)[:, None]
    return x, res, steps, res <= target


def balanced_block(num: int, rhs_batch_size: int | None) -> int:
    """Systems per block: at most ``rhs_batch_size``, as few blocks, the padding spread thin.

    ``ceil(num / ceil(num / rhs_batch_size))``: 50 systems with at most 16 per block
    run as 4 blocks of 13 (2 padding systems), not 16 + 16 + 16 + 2 padded to 16 (14).
    A padding system costs a full product every CG step of its block.
    """
    if rhs_batch_size is None or rhs_batch_size >= num:
        return num
    return -(-num // -(-num // rhs_batch_size))


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


