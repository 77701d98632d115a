"""Preconditioners shared by every damped-GGN solve: randomized Nystrom and Jacobi.

All C cluster systems of a cache and all Q per-query IF systems use one operator,
``H~ = GGN + lambda I``; what is learnt about it once serves every solve. Both
preconditioners here describe the *undamped* GGN, so one build serves any
damping, and :func:`cif_jax.solve_ggn`, :func:`cif_jax.influence` and
:func:`cif_jax.build_cache` take them as ``preconditioner=``. They change the
number of CG iterations, never the answer: every solve still stops on the true
residual of the unpreconditioned system.

**Nystrom** (Frangella, Tropp and Udell, "Randomized Nystrom preconditioning",
SIAM J. Matrix Anal. Appl. 2023, algorithms 2.1 and 5.1). With an orthonormal
random test matrix Q (p x r) and Y = GGN Q (r products, run as block products
sharing one data pass per block), the stable Nystrom approximation
``GGN ~ U diag(s) U^T`` is formed with a small shift nu:
``B = Q^T (Y + nu Q)``, ``C = chol(B)``, ``F = (Y + nu Q) C^{-T} = U Sigma V^T``,
``s = max(Sigma^2 - nu, 0)``. The preconditioner is

.. math::

    P^{-1} = (s_r + \\lambda)\\, U (\\mathrm{diag}(s) + \\lambda I)^{-1} U^\\top + (I - U U^\\top),

and the preconditioned condition number is at most
``(s_r + lambda + ||E||) / lambda`` with ``E = GGN - U diag(s) U^T`` (their
proposition 5.3); ``||E||`` is estimated by power iteration (E is PSD). With
``rank="auto"`` the rank doubles, reusing every product already made, until that
estimate is at most ``condition_target`` or ``max_rank`` is reached.

**Jacobi**: ``P = diag(GGN) + lambda I``, the exact diagonal
``(1/N) sum_i sum_a (J_i^T e_a) * (J_i^T W_i e_a)`` (elementwise), one
vector-Jacobian product per example and output.

**K-FAC / EK-FAC** (a Kronecker-factored block per layer, the exact diagonal
elsewhere) live in :mod:`cif_jax.kfac`; ``"kfac"`` and ``"ekfac"`` are built on
request like ``"jacobi"``.
"""

from __future__ import annotations

import dataclasses
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

from . import _checks
from . import curvature as _curvature
from ._chunks import chunk_sum
from .ggn import _apply_undamped
from .sketch import _as_key
from .task import Task, fingerprint

#: Default cap on the Nystrom rank for ``rank="auto"``.
DEFAULT_MAX_RANK = 512
#: Default estimated condition number at which ``rank="auto"`` stops growing the rank.
DEFAULT_CONDITION_TARGET = 10.0


class NystromPreconditioner(eqx.Module):
    """A rank-r Nystrom approximation ``U diag(s) U^T`` of the undamped GGN.

    Attributes:
        basis: (r, p) U^T, orthonormal rows in ``ravel_pytree`` order.
        eigenvalues: (r,) s, descending, >= 0.
        error_estimate: () a power-iteration estimate of ``||GGN - U diag(s) U^T||_2``
            (a lower estimate of it; NaN when not estimated).
        fingerprint: of the task it was built from.
        curvature: ``"full"`` or the curvature sample's identifier.
        num_products: GGN-vector products spent building it (sketch and error estimate).
        seconds: wall-clock build time.
    """

    basis: Float[Array, "r p"]
    eigenvalues: Float[Array, " r"]
    error_estimate: Float[Array, ""]
    fingerprint: str = eqx.field(static=True)
    curvature: str = eqx.field(static=True)
    num_products: int = eqx.field(static=True)
    seconds: float = eqx.field(static=True)

    @property
    def rank(self) -> int:
        """r."""
        return self.basis.shape[0]

    def condition_estimate(self, damping: float) -> float:
        """Estimated bound ``(s_r + lambda + ||E||) / lambda`` on the preconditioned condition number."""
        lam = _checks.damping(damping)
        err = float(self.error_estimate)
        err = 0.0 if math.isnan(err) else err
        return (float(self.eigenvalues[-1]) + lam + err) / lam


class JacobiPreconditioner(eqx.Module):
    """The diagonal of the undamped GGN.

    Attributes:
        diagonal: (p,) ``diag(GGN)`` in ``ravel_pytree`` order.
        fingerprint, curvature, seconds: as :class:`NystromPreconditioner`.
    """

    diagonal: Float[Array, " p"]
    fingerprint: str = eqx.field(static=True)
    curvature: str = eqx.field(static=True)
    seconds: float = eqx.field(static=True)


def for_jit(preconditioner):
    """The preconditioner with its bookkeeping (build time, fingerprint, ...) blanked.

    Those fields are static, so a jitted solve would compile anew for every build
    (a new ``seconds``); only the arrays and the layout matter to the solve.
    """
    if isinstance(preconditioner, NystromPreconditioner):
        return NystromPreconditioner(preconditioner.basis, preconditioner.eigenvalues, preconditioner.error_estimate,
                                     fingerprint="", curvature="", num_products=0, seconds=0.0)
    if isinstance(preconditioner, JacobiPreconditioner):
        return JacobiPreconditioner(preconditioner.diagonal, fingerprint="", curvature="", seconds=0.0)
    from .kfac import KFACPreconditioner

    if isinstance(preconditioner, KFACPreconditioner):
        fields = {f.name: getattr(preconditioner, f.name) for f in dataclasses.fields(preconditioner)}
        fields.update(fingerprint="", curvature="", seconds=0.0)
        return KFACPreconditioner(**fields)
    return preconditioner


def inverse_fn(preconditioner, lam):
    """``R -> P^{-1} R`` (rows of R) for the scaled system ``(I + GGN / lambda)``, traceable.

    Scalar multiples of P give identical CG iterates; these are normalised so that
    directions the preconditioner knows nothing about are left unchanged.
    """
    if preconditioner is None:
        return None
    if isinstance(preconditioner, JacobiPreconditioner):
        d = preconditioner.diagonal

        def apply(r):
            return r / (1 + d / jnp.asarray(lam, d.dtype))[None, :]

        return apply
    if isinstance(preconditioner, NystromPreconditioner):
        u = preconditioner.basis
        s = preconditioner.eigenvalues
        lam_ = jnp.asarray(lam, s.dtype)
        factor = (s[-1] + lam_) / (s + lam_) - 1

        def apply(r):
            return r + ((r @ u.T) * factor[None, :]) @ u

        return apply
    from .kfac import KFACPreconditioner, inverse

    if isinstance(preconditioner, KFACPreconditioner):
        return inverse(preconditioner, lam)
    raise TypeError(f"unknown preconditioner {type(preconditioner).__name__}.")


def check(preconditioner, task: Task, curvature, *, batch_size=None):
    """Normalises ``preconditioner=`` (None, ``"none"``, ``"jacobi"``, ``"kfac"``, ``"ekfac"``, or a built one).

    A built preconditioner must come from the same task (fingerprint) and
    curvature sample; ``"jacobi"``, ``"kfac"`` and ``"ekfac"`` are built here.
    """
    from .kfac import KFACPreconditioner, _build as _build_kfac

    if preconditioner is None or (isinstance(preconditioner, str) and preconditioner == "none"):
        return None
    if isinstance(preconditioner, str):
        if preconditioner == "jacobi":
            return _jacobi(task, _jacobi_batch(batch_size), curvature)
        if preconditioner in ("kfac", "ekfac"):
            return _build_kfac(task, _jacobi_batch(batch_size), curvature, preconditioner == "ekfac", None)
        if preconditioner == "nystrom":
            raise ValueError(
                "`preconditioner='nystrom'` needs a PRNG key and a rank: build it once with "
                "`cif_jax.nystrom_preconditioner(task, key=..., rank=..., damping=...)` and pass the result, "
                "so every solve shares it."
            )
        raise ValueError(
            "`preconditioner` must be None, 'none', 'jacobi', 'kfac', 'ekfac' or a built preconditioner; got "
            f"{preconditioner!r}."
        )
    if not isinstance(preconditioner, (NystromPreconditioner, JacobiPreconditioner, KFACPreconditioner)):
        raise TypeError(
            "`preconditioner` must be None, 'none', 'jacobi', 'kfac', 'ekfac', a `NystromPreconditioner`, a "
            f"`JacobiPreconditioner` or a `KFACPreconditioner`; got {type(preconditioner).__name__}."
        )
    if isinstance(preconditioner, KFACPreconditioner):
        size = preconditioner.num_params
    elif isinstance(preconditioner, NystromPreconditioner):
        size = preconditioner.basis.shape[1]
    else:
        size = preconditioner.diagonal.shape[0]
    if size != task.num_params:
        raise ValueError(f"the preconditioner acts on {size} parameters; the task has p = {task.num_params}.")
    if preconditioner.fingerprint != fingerprint(task):
        raise ValueError(
            "the preconditioner was built from another model snapshot or data set (fingerprint mismatch); rebuild "
            "it for this task."
        )
    want = _curvature.describe(curvature)
    if preconditioner.curvature != want:
        raise ValueError(
            f"the preconditioner was built for curvature {preconditioner.curvature!r}, the solve uses {want!r}; "
            "build it with the same `curvature=`."
        )
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, task.dtype), preconditioner)


# --------------------------------------------------------------------------------------------- Nystrom


def _orthonormal_block(key, existing, k, p, dtype):
    """k new orthonormal rows, orthogonal to the rows of ``existing`` (m, p)."""
    x = jax.random.normal(key, (k, p), dtype)
    if existing is not None:
        for _ in range(2):  # twice is enough (Kahan / Parlett)
            x = x - (x @ existing.T) @ existing
    q, _ = jnp.linalg.qr(x.T)
    return q.T


_orthonormal_block_jit = jax.jit(_orthonormal_block, static_argnums=(2, 3, 4))


@jax.jit
def _nystrom_factor(q, y):
    """Stable Nystrom factorisation from orthonormal rows q (r, p) and y = GGN q (rows)."""
    p = q.shape[1]
    eps = jnp.finfo(y.dtype).eps
    gram = y @ y.T
    norm_y = jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh((gram + gram.T) / 2)[-1], 0))
    nu = jnp.sqrt(jnp.asarray(p, y.dtype)) * eps * norm_y
    nu = jnp.maximum(nu, jnp.finfo(y.dtype).tiny)
    y_nu = y + nu * q
    b = q @ y_nu.T
    b = (b + b.T) / 2
    c = jnp.linalg.cholesky(b)
    f_rows = jax.scipy.linalg.solve_triangular(c, y_nu, lower=True)  # (r, p) = (Y_nu C^{-T})^T
    _, sigma, ut = jnp.linalg.svd(f_rows, full_matrices=False)
    s = jnp.maximum(sigma**2 - nu, 0)
    return ut, s, jnp.all(jnp.isfinite(c))


def _products(task, vectors, batch_size, curvature, block, bar):
    """GGN products of the rows of ``vectors``, ``block`` rows per data pass (last block padded)."""
    out = []
    num = vectors.shape[0]
    for start in range(0, num, block):
        chunk = vectors[start : start + block]
        short = block - chunk.shape[0]
        if short:
            chunk = jnp.concatenate([chunk, jnp.zeros((short, chunk.shape[1]), chunk.dtype)])
        res = _apply_undamped(task, batch_size, chunk, curvature)
        out.append(res[: block - short])
        if bar is not None:
            bar.update(block - short)
    return jnp.concatenate(out)


def _error_estimate(task, ut, s, key, iters, batch_size, curvature, bar):
    """Power iteration on the PSD residual ``GGN - U diag(s) U^T`` (a lower estimate of its norm)."""
    p = ut.shape[1]
    v = jax.random.normal(key, (1, p), ut.dtype)
    v = v / jnp.linalg.norm(v)
    est = jnp.asarray(0.0, ut.dtype)
    for _ in range(iters):
        w = _products(task, v, batch_size, curvature, 1, bar) - ((v @ ut.T) * s[None, :]) @ ut
        est = jnp.linalg.norm(w)
        if not bool(est > 0):
            break
        v = w / est
    return est


def nystrom_preconditioner(
    task: Task,
    *,
    key,
    rank: int | str = "auto",
    damping: float | None = None,
    max_rank: int = DEFAULT_MAX_RANK,
    initial_rank: int = 64,
    condition_target: float = DEFAULT_CONDITION_TARGET,
    error_iters: int = 10,
    batch_size: int | None = None,
    rhs_batch_size: int | None = 16,
    curvature=None,
    progress: bool = False,
) -> NystromPreconditioner:
    """Builds a randomized Nystrom preconditioner of the undamped GGN from block products.

    Args:
        task: the model snapshot and training data.
        key: PRNG key for the random test matrix and the error estimate.
        rank: r, an integer (fixed rank), or ``"auto"``: start at ``initial_rank`` and
            double (reusing the products made) until the estimated preconditioned
            condition number ``(s_r + damping + ||E||) / damping`` is at most
            ``condition_target``, or the rank reaches ``max_rank``.
        damping: lambda > 0 of the solves it will serve; needed for ``rank="auto"``.
        max_rank, initial_rank, condition_target: the adaptive rule's settings.
        error_iters: power iterations (one GGN product each) estimating ``||E||`` per
            round; 0 skips the estimate (then only ``s_r`` enters the rule).
        batch_size: examples per chunk of each GGN product.
        rhs_batch_size: test vectors per data pass (block products).
        curvature: a :class:`cif_jax.CurvatureSample` (the solves must use the same).
        progress: show a progress bar over products.

    Returns:
        A :class:`NystromPreconditioner`; pass it as ``preconditioner=`` to
        :func:`cif_jax.solve_ggn`, :func:`cif_jax.influence` or :func:`cif_jax.build_cache`.
    """
    _checks.task(task)
    p = task.num_params
    if isinstance(rank, str):
        if rank != "auto":
            raise ValueError(f"`rank` must be a positive integer or 'auto', got {rank!r}.")
        if damping is None:
            raise ValueError("`rank='auto'` needs the `damping` of the solves it will serve.")
        max_rank = _checks.positive_int(max_rank, "max_rank")
        initial_rank = _checks.positive_int(initial_rank, "initial_rank")
        condition_target = float(condition_target)
        if not condition_target > 1:
            raise ValueError(f"`condition_target` must be > 1, got {condition_target}.")
        adaptive = True
        first = min(initial_rank, max_rank, p)
    else:
        rank = _checks.positive_int(rank, "rank")
        adaptive = False
        first = min(rank, p)
        if rank > p:
            raise ValueError(f"`rank` = {rank} exceeds the number of parameters p = {p}.")
    lam = _checks.damping(damping) if damping is not None else None
    if isinstance(error_iters, bool) or not isinstance(error_iters, (int, np.integer)) or error_iters < 0:
        raise ValueError(f"`error_iters` must be an integer >= 0, got {error_iters!r}.")
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    rhs_batch_size = _checks.positive_int(rhs_batch_size, "rhs_batch_size", allow_none=True)
    curvature = _curvature.check(curvature, task.num_examples, task.dtype)
    key = _as_key(key)
    dtype = task.dtype

    start_time = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="Nystrom products", unit="product")
    q = y = None
    num_products = 0
    round_ = 0
    target_rank = first
    while True:
        have = 0 if q is None else q.shape[0]
        new = target_rank - have
        block = new if rhs_batch_size is None else min(rhs_batch_size, new)
        q_new = _orthonormal_block_jit(jax.random.fold_in(key, 2 * round_), q, new, p, dtype)
        y_new = _products(task, q_new, batch_size, curvature, block, bar)
        num_products += new
        q = q_new if q is None else jnp.concatenate([q, q_new])
        y = y_new if y is None else jnp.concatenate([y, y_new])
        ut, s, ok = _nystrom_factor(q, y)
        if not bool(ok):
            raise FloatingPointError(
                "the Nystrom factorisation failed (Cholesky of Q^T Y not positive definite); the GGN products are "
                "not symmetric PSD to working precision. Check that the loss is convex in the outputs."
            )
        err = jnp.asarray(jnp.nan, dtype)
        if error_iters:
            err = _error_estimate(task, ut, s, jax.random.fold_in(key, 2 * round_ + 1), error_iters, batch_size,
                                  curvature, bar)
            num_products += error_iters
        round_ += 1
        if not adaptive:
            break
        kappa = (float(s[-1]) + lam + (0.0 if error_iters == 0 else float(err))) / lam
        if bar is not None:
            bar.set_postfix_str(f"rank {target_rank}, kappa~{kappa:.3g}")
        if kappa <= condition_target or target_rank >= min(max_rank, p):
            break
        target_rank = min(2 * target_rank, max_rank, p)
    if bar is not None:
        bar.close()
    return NystromPreconditioner(
        basis=ut,
        eigenvalues=s,
        error_estimate=err,
        fingerprint=fingerprint(task),
        curvature=_curvature.describe(curvature),
        num_products=num_products,
        seconds=time.perf_counter() - start_time,
    )


# ---------------------------------------------------------------------------------------------- Jacobi


def _jacobi_batch(batch_size):
    return 64 if batch_size is None else batch_size


@eqx.filter_jit
def _ggn_diagonal(task: Task, batch_size, curvature):
    flat, unravel = ravel_pytree(task.params)
    if curvature is None:
        data = (task.inputs, task.targets, jnp.ones(task.num_examples, flat.dtype))
    else:
        take = lambda tree: jax.tree_util.tree_map(lambda a: jnp.take(a, curvature.indices, axis=0), tree)
        data = (take(task.inputs), take(task.targets), curvature.weights.astype(flat.dtype))
    one = lambda tree: jax.tree_util.tree_map(lambda leaf: leaf[None], tree)

    def example(x, y, w):
        out, vjp_fn = jax.vjp(lambda fp: task.apply_fn(unravel(fp), one(x))[0], flat)
        m = out.size

        def loss_one(o):
            return task.loss_fn(o.reshape(out.shape)[None], one(y))[0]

        hess = jax.hessian(loss_one)(out.reshape(-1)).reshape(m, m)
        # diag(J^T W J) = sum_a (J^T e_a) * (J^T W e_a): m vector-Jacobian products and an
        # (m, m) x (m, p) product. (A square root W = L L^T by `eigh` did the same with a
        # LAPACK call per example, which deadlocked XLA:CPU on jaxlib 0.10.2 for one chunk
        # of 512 examples followed by a short chunk of 288.)
        cols = jax.vmap(lambda c: vjp_fn(c.reshape(out.shape))[0])(jnp.eye(m, dtype=out.dtype))  # (m, p): J^T e_a
        weighted = jnp.matmul((hess + hess.T) / 2, cols, precision=jax.lax.Precision.HIGHEST)
        return w * jnp.sum(cols * weighted, axis=0)

    def chunk(c):
        return jnp.sum(jax.vmap(example)(*c), axis=0)

    total = chunk_sum(chunk, data, batch_size)
    return total / jnp.sum(data[2])


def _jacobi(task, batch_size, curvature):
    start = time.perf_counter()
    diag = jax.block_until_ready(_ggn_diagonal(task, batch_size, curvature))
    if not bool(jnp.all(jnp.isfinite(diag))):
        raise ValueError("the GGN diagonal holds NaN or Inf; check the model snapshot and the data.")
    return JacobiPreconditioner(
        diagonal=diag,
        fingerprint=fingerprint(task),
        curvature=_curvature.describe(curvature),
        seconds=time.perf_counter() - start,
    )


def jacobi_preconditioner(task: Task, *, batch_size: int | None = 64, curvature=None) -> JacobiPreconditioner:
    """Builds the Jacobi (diagonal GGN) preconditioner, exactly.

    ``diag(GGN) = (1/N) sum_i sum_a (J_i^T e_a) * (J_i^T W_i e_a)``: one
    vector-Jacobian product per example and model output, so it costs about
    (number of outputs) per-example gradient passes.

    Args:
        task: the model snapshot and training data.
        batch_size: examples per chunk (memory about ``batch_size * outputs * p``).
        curvature: a :class:`cif_jax.CurvatureSample` (the solves must use the same).

    Returns:
        A :class:`JacobiPreconditioner`.
    """
    _checks.task(task)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    curvature = _curvature.check(curvature, task.num_examples, task.dtype)
    return _jacobi(task, batch_size, curvature)
