"""LiSSA: inverse-Hessian-vector products by a stochastic Neumann recursion.

Agarwal, Bullins and Hazan (2017), as used for influence functions by Koh and
Liang (2017) and by "Faithful and Fast Influence Function via Advanced
Sampling", sec. 2): with an explicit scale ``s`` and the damping ``lambda``,

$$
h_0 = b, \\qquad h_j = b + h_{j-1} - A_j h_{j-1} / s, \\qquad x = h_J / s,

A_j u = \\frac{1}{B} \\sum_{i \\in B_j} \\hat w_i J_i^\\top W_i J_i u + \\lambda u,
$$

``B_j`` drawn uniformly with replacement from the pool (all N, or a
:class:`cif_jax.CurvatureSample`), ``hat w = w / mean(w)`` so that every
``A_j`` is an unbiased estimate of the pool's damped GGN. The pool, lambda and
the chunks of each product are the operator's (:class:`cif_jax.DampedGGN`: its
``curvature``, ``damping`` and ``batch_size``); ``B`` is LiSSA's own
``batch_size``, and ``batch_size=None`` uses the whole pool every step
(deterministic). With ``s >= lambda_max(A_j)``
the recursion is a truncated Neumann series of ``s A^{-1}``: its error is at most
``(1 - lambda / s)^{J+1} ||x*||``, so the depth needed grows like
``(s / lambda) ln(1 / tol)``: LiSSA is slow at small damping, where CG
(:func:`cif_jax.solve_ggn`) needs far fewer products. The stopping rule on
``||h_j - h_{j-1}||`` (that paper's) is not trusted: the result carries the
true residuals of the full and pool operators.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ..core import checks as _checks
from ..core import curvature as _curvature
from ..core.checks import as_key
from ..core.ggn import ggn_matvec_fn
from ..core.task import Task
from .operator import DampedGGN, check_operator
from .solve import AbstractSolver, SolveResult

#: Power iterations per sampled operator when ``scale="auto"``.
POWER_ITERS = 30
#: Sampled operators whose largest eigenvalue sets ``scale="auto"`` (the sampling paper does not say; 5).
AUTO_SAMPLES = 5
#: ``scale="auto"``: this multiple of the largest estimated eigenvalue.
AUTO_FACTOR = 1.5


class LissaResult(NamedTuple):
    """Output of :func:`lissa`.

    Attributes:
        solutions: (Q, p) x, averaged over repeats.
        num_steps: (Q,) recursion steps taken (largest over repeats).
        last_increment: (Q,) ``||h_J - h_{J-1}|| / ||h_J||`` at the last step (largest over repeats).
        spread: (Q,) ``||std over repeats of x|| / ||x||`` (0 with one repeat).
        residuals: (Q,) ``||b - H~ x|| / ||b||`` with H~ the damped GGN of all N examples.
        pool_residuals: (Q,) the same with the pool's damped GGN (equal to ``residuals``
            without ``curvature``).
        scale: () the scale s used.
    """

    solutions: Float[Array, "q p"]
    num_steps: Int[Array, " q"]
    last_increment: Float[Array, " q"]
    spread: Float[Array, " q"]
    residuals: Float[Array, " q"]
    pool_residuals: Float[Array, " q"]
    scale: Float[Array, ""]


class LissaDivergenceError(ValueError):
    """LiSSA's iterate left the bound ``||h_j|| <= (s / lambda) ||b||``: the scale is too small."""


def _check_scale(scale, name: str):
    """``"auto"`` or a finite number > 0 (returned as a float; None for "auto")."""
    if isinstance(scale, str):
        if scale != "auto":
            raise ValueError(f"`{name}` must be a number > 0 or 'auto', got {scale!r}.")
        return None
    return _checks.positive_float(scale, name)


def _pool(task: Task, curvature):
    """``(indices, hat w)`` of the pool; ``(None, None)`` for all N with equal weights."""
    if curvature is None:
        return None, None
    return curvature.indices, curvature.weights / jnp.mean(curvature.weights)


def _sampled_matvec(task, pool_idx, pool_w, batch_size, batch_key, chunk):
    """``u -> (1/B) sum_{i in B_j} hat w_i J_i^T W_i J_i u`` (undamped), B_j drawn from ``batch_key``."""
    if batch_size is None:
        sample = None if pool_idx is None else _curvature.CurvatureSample(pool_idx, pool_w)
        return ggn_matvec_fn(task, batch_size=chunk, curvature=sample)
    size = task.num_examples if pool_idx is None else pool_idx.shape[0]
    pick = jax.random.randint(batch_key, (batch_size,), 0, size)
    if pool_idx is None:
        idx, w = pick.astype(jnp.int32), jnp.ones(batch_size, task.dtype)
    else:
        idx, w = pool_idx[pick], pool_w[pick]
    mv = ggn_matvec_fn(task, batch_size=chunk, curvature=_curvature.CurvatureSample(idx, w))
    # ggn_matvec_fn divides by sum(w); LiSSA's estimate divides by B.
    return lambda u: mv(u) * (jnp.sum(w) / batch_size).astype(u.dtype)


@eqx.filter_jit
def _largest_eigenvalue(task, pool_idx, pool_w, lam, batch_size, key, chunk):
    def one(k):
        mv = _sampled_matvec(task, pool_idx, pool_w, batch_size, k, chunk)
        v = jax.random.normal(jax.random.fold_in(k, 1), (task.num_params,), task.dtype)
        v = v / jnp.linalg.norm(v)

        def step(_, v):
            w = mv(v)
            return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(w.dtype).tiny)

        v = jax.lax.fori_loop(0, POWER_ITERS, step, v)
        return jnp.vdot(v, mv(v)) + lam

    keys = jax.random.split(key, AUTO_SAMPLES if batch_size is not None else 1)
    return jnp.max(jax.lax.map(one, keys))


@eqx.filter_jit
def _one_repeat(task, rhs, pool_idx, pool_w, lam, scale, depth, tol, batch_size, key, chunk):
    bnorm = jnp.linalg.norm(rhs, axis=1)
    bound = (scale / lam) * bnorm * (1 + 1e-6) + jnp.finfo(rhs.dtype).tiny

    def cond(state):
        j, _, active, _, _, diverged = state
        return (j < depth) & jnp.any(active) & ~jnp.any(diverged)

    def body(state):
        j, h, active, steps, inc, diverged = state
        mv = _sampled_matvec(task, pool_idx, pool_w, batch_size, jax.random.fold_in(key, j), chunk)
        ah = jax.vmap(mv)(h) + lam * h
        h_new = rhs + h - ah / scale
        h = jnp.where(active[:, None], h_new, h)
        new_inc = jnp.linalg.norm(h_new - state[1], axis=1) / jnp.maximum(jnp.linalg.norm(h_new, axis=1),
                                                                           jnp.finfo(h.dtype).tiny)
        inc = jnp.where(active, new_inc, inc)
        steps = steps + active.astype(jnp.int32)
        diverged = diverged | (active & (jnp.linalg.norm(h, axis=1) > bound))
        active = active & ~(new_inc <= tol)
        return j + 1, h, active, steps, inc, diverged

    q = rhs.shape[0]
    init = (jnp.asarray(0, jnp.int32), rhs, bnorm > 0, jnp.zeros(q, jnp.int32), jnp.zeros(q, rhs.dtype),
            jnp.zeros(q, bool))
    _, h, _, steps, inc, diverged = jax.lax.while_loop(cond, body, init)
    return h / scale, steps, inc, diverged


@eqx.filter_jit
def _residuals(task, rhs, x, pool_idx, pool_w, lam, chunk):
    """True relative residuals on the full and the pool's damped GGN, one system at a time.

    ``lax.map`` over the systems, not ``vmap``: a vmapped product holds Q tangents of
    a chunk's activations at once (987 MiB of XLA scratch for 10 systems of LeNet-5
    on 4,000 MNIST images in chunks of 512, where the minibatch recursion needs 58
    MiB; ``benchmarks/lissa_pool_memory.py``). One system at a time, the scratch is
    one product's whatever Q (147 MiB there), at the price of one forward pass per
    system instead of one shared by all.
    """
    full = ggn_matvec_fn(task, batch_size=chunk)
    pool = None if pool_idx is None else ggn_matvec_fn(
        task, batch_size=chunk, curvature=_curvature.CurvatureSample(pool_idx, pool_w))

    def one(system):
        b, xi = system
        bnorm = jnp.maximum(jnp.linalg.norm(b), jnp.finfo(b.dtype).tiny)
        res_full = jnp.linalg.norm(b - full(xi) - lam * xi) / bnorm
        if pool is None:
            return res_full, res_full
        return res_full, jnp.linalg.norm(b - pool(xi) - lam * xi) / bnorm

    return jax.lax.map(one, (rhs, x))


def lissa(
    operator: DampedGGN,
    rhs: Float[Array, "q p"],
    *,
    scale,
    depth: int,
    key,
    repeats: int = 1,
    batch_size: int | None = None,
    tol: float = 0.0,
) -> LissaResult:
    """Solves ``H~ x = b`` for each row b of ``rhs`` by LiSSA (see the module docstring).

    Args:
        operator: the damped GGN (:class:`cif_jax.DampedGGN`): its damping, its
            curvature sample as the pool (None: all N examples, equal weights) and its
            ``batch_size`` as the examples per chunk inside each product (memory only).
        rhs: (Q, p) right-hand sides (e.g. gradient sums; divide by N for ``influence``'s scale).
        scale: s > 0, at least the largest eigenvalue of every ``A_j``, or ``"auto"``:
            1.5 x the largest power-iteration eigenvalue of 5 sampled ``A_j``
            (of the one ``A`` with ``batch_size=None``).
        depth: J, recursion steps (at most).
        key: PRNG key; repeat r uses ``fold_in(key, r)``, its step j ``fold_in(., j)``.
        repeats: independent recursions averaged (needs minibatches: with
            ``batch_size=None`` every repeat is the same).
        batch_size: B, examples per step drawn with replacement from the pool
            (None: the whole pool, deterministic). At most the pool size.
        tol: stop a system when ``||h_j - h_{j-1}|| <= tol ||h_j||`` (0: run all J steps).

    Returns:
        A `LissaResult` with true residuals.

    Raises:
        ValueError: on bad settings, before any work.
        LissaDivergenceError: when an iterate leaves ``||h_j|| <= (s / lambda) ||b||``,
            which cannot happen for ``s >= lambda_max(A_j)``.

    References:
        Agarwal, Bullins and Hazan, "Second-order stochastic optimization for machine
        learning in linear time", JMLR 2017; Koh and Liang, ICML 2017; "Faithful and Fast Influence Function via Advanced Sampling".
    """
    operator = check_operator(operator)
    if operator.mesh is not None:
        raise ValueError("`mesh` applies to cif_jax.CG; LiSSA runs on one device. Make the operator without it.")
    task, lam, curvature, chunk_size = operator.task, operator.damping, operator.curvature, operator.batch_size
    depth = _checks.positive_int(depth, "depth")
    repeats = _checks.positive_int(repeats, "repeats")
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    tol = _checks.nonnegative_float(tol, "tol")
    scale_value = _check_scale(scale, "scale")
    pool_size = operator.curvature_size
    if batch_size is not None and batch_size > pool_size:
        raise ValueError(f"`batch_size` = {batch_size} exceeds the pool of {pool_size} examples; lower it or "
                         "pass batch_size=None for the whole pool.")
    if repeats > 1 and batch_size is None:
        raise ValueError("`repeats` > 1 needs minibatches: with batch_size=None every repeat is identical. "
                         "Set `batch_size` or repeats=1.")
    key = as_key(key)
    rhs = operator.rows(jnp.asarray(rhs))  # the shape checks of every other solver
    _checks.finite_rows(rhs, "right-hand sides", what="row")
    rhs = rhs.astype(task.dtype)

    pool_idx, pool_w = _pool(task, curvature)
    lam_ = jnp.asarray(lam, task.dtype)
    if scale == "auto":
        s = AUTO_FACTOR * _largest_eigenvalue(task, pool_idx, pool_w, lam_, batch_size,
                                              jax.random.fold_in(key, 2**31 - 1), chunk_size)
    else:
        s = jnp.asarray(scale_value, task.dtype)
    depth_ = jnp.asarray(depth, jnp.int32)
    tol_ = jnp.asarray(tol, task.dtype)
    xs, steps, incs = [], [], []
    for r in range(repeats):
        x, st, inc, diverged = _one_repeat(task, rhs, pool_idx, pool_w, lam_, s, depth_, tol_, batch_size,
                                           jax.random.fold_in(key, r), chunk_size)
        if bool(jnp.any(diverged)):
            raise LissaDivergenceError(
                f"LiSSA diverged (repeat {r}): ||h_j|| exceeded (s / lambda) ||b|| with s = {float(s):.4g}, so s is "
                "below the largest eigenvalue of some A_j. Raise `scale` (or use scale='auto'); minibatch "
                "operators can have larger eigenvalues than the full one, so leave a margin."
            )
        xs.append(x), steps.append(st), incs.append(inc)
    xs = jnp.stack(xs)
    x = jnp.mean(xs, axis=0)
    xnorm = jnp.maximum(jnp.linalg.norm(x, axis=1), jnp.finfo(x.dtype).tiny)
    spread = jnp.linalg.norm(jnp.std(xs, axis=0), axis=1) / xnorm if repeats > 1 else jnp.zeros(x.shape[0], x.dtype)
    res_full, res_pool = _residuals(task, rhs, x, pool_idx, pool_w, lam_, chunk_size)
    return LissaResult(x, jnp.max(jnp.stack(steps), axis=0), jnp.max(jnp.stack(incs), axis=0), spread, res_full,
                       res_pool, s)


class LiSSA(AbstractSolver):
    """LiSSA as a solver object: ``solver=cj.LiSSA(depth=..., key=...)`` wherever a solve is made.

    The settings of :func:`lissa`; the pool, damping and chunks come from the
    operator it solves on. ``rtol``/``atol`` only judge the result (``converged`` and the
    warning): LiSSA runs its ``depth`` (or stops on ``tol``), and the true
    residuals it reaches are reported (in a cache, as rho_c of the bound).

    Example:
        >>> cache = cj.build_cache(task, ..., solver=cj.LiSSA(depth=2000, key=jax.random.key(1)))
    """

    depth: int = eqx.field(static=True)
    key: object
    scale: object = eqx.field(static=True, default="auto")
    repeats: int = eqx.field(static=True, default=1)
    batch_size: int | None = eqx.field(static=True, default=None)
    tol: float = eqx.field(static=True, default=0.0)
    rtol: float = eqx.field(static=True, default=1e-4)
    atol: float = eqx.field(static=True, default=0.0)

    def __check_init__(self):
        _checks.positive_int(self.depth, "LiSSA.depth")
        _checks.positive_int(self.repeats, "LiSSA.repeats")
        _checks.positive_int(self.batch_size, "LiSSA.batch_size", allow_none=True)
        _checks.nonnegative_float(self.tol, "LiSSA.tol")
        _checks.solver_settings(self.rtol, self.atol, 1, 0)
        as_key(self.key)
        _check_scale(self.scale, "LiSSA.scale")
        if self.repeats > 1 and self.batch_size is None:
            raise ValueError("`LiSSA.repeats` > 1 needs minibatches: set `batch_size` or repeats=1.")

    @property
    def step_budget(self) -> int:
        return self.depth

    def describe(self) -> str:
        return (f"lissa(scale={self.scale},depth={self.depth},repeats={self.repeats},"
                f"batch_size={self.batch_size},tol={self.tol:g})")

    def solve(self, operator, rhs, *, key=None, progress=False, warn=True):
        """LiSSA on the rows of ``rhs`` (the operator's ``batch_size`` chunks each product; the solver's is B)."""
        out = lissa(operator, rhs, scale=self.scale, depth=self.depth, key=self.key, repeats=self.repeats,
                    batch_size=self.batch_size, tol=self.tol)
        result = SolveResult(out.solutions, out.pool_residuals, out.num_steps, jnp.ones(out.num_steps.shape, bool))
        hint = (f"After depth {self.depth} (scale {float(out.scale):.3g}): LiSSA needs about (scale / damping) "
                "ln(1 / rtol) steps; raise `depth` or use cif_jax.CG().")
        return self._judge(result, rhs, warn, "LiSSA", hint)
