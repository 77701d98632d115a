"""Preconditioners shared by every damped-GGN solve: randomized Nystrom and Jacobi.

All C cluster systems of a cache and all Q per-query IF systems use one operator,
``H~ = GGN + lambda I``; what is learnt about it once serves every solve. Both
preconditioners here describe the *undamped* GGN, so one build serves any
damping; :class:`cif_jax.CG` takes them as ``preconditioner=``. They change the
number of CG iterations, never the answer: every solve still stops on the true
residual of the unpreconditioned system. Every preconditioner implements the
small interface :class:`Preconditioner` (``size``, ``inverse``), so CG never
asks which kind it holds. :func:`auto_nystrom` is the cost model behind
``CG(preconditioner="auto")``, the default.

**Nystrom** (Frangella, Tropp and Udell, "Randomized Nystrom preconditioning",
SIAM J. Matrix Anal. Appl. 2023, algorithms 2.1 and 5.1). With an orthonormal
random test matrix Q (p x r) and Y = GGN Q (r products, run as block products
sharing one data pass per block), the stable Nystrom approximation
``GGN ~ U diag(s) U^T`` is formed with a small shift nu:
``B = Q^T (Y + nu Q)``, ``C = chol(B)``, ``F = (Y + nu Q) C^{-T} = U Sigma V^T``,
``s = max(Sigma^2 - nu, 0)``. The preconditioner is

$$
P^{-1} = (s_r + \\lambda)\\, U (\\mathrm{diag}(s) + \\lambda I)^{-1} U^\\top + (I - U U^\\top),
$$

and the preconditioned condition number is at most
``(s_r + lambda + ||E||) / lambda`` with ``E = GGN - U diag(s) U^T`` (their
proposition 5.3); ``||E||`` is estimated by power iteration (E is PSD). With
``rank="auto"`` the rank doubles, reusing every product already made, until that
estimate is at most ``condition_target`` or ``max_rank`` is reached.

**Jacobi**: ``P = diag(GGN) + lambda I``, the exact diagonal
``(1/N) sum_i sum_a (J_i^T e_a) * (J_i^T W_i e_a)`` (elementwise), one
vector-Jacobian product per example and output.

**K-FAC / EK-FAC** (a Kronecker-factored block per layer, the exact diagonal
elsewhere) live in :mod:`cif_jax.solvers.kfac`; ``"kfac"`` and ``"ekfac"`` are built on
request like ``"jacobi"``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..core import checks as _checks
from ..core.checks import as_key
from ..core.chunks import row_blocks
from ..core.ggn import apply_undamped
from .operator import DampedGGN, GGNKernel, check_operator

#: Default cap on the Nystrom rank for ``rank="auto"``.
DEFAULT_MAX_RANK = 512
#: Default estimated condition number at which ``rank="auto"`` stops growing the rank.
DEFAULT_CONDITION_TARGET = 10.0


class Preconditioner(eqx.Module):
    """What CG needs of a preconditioner: an approximation P of the undamped GGN of one task.

    Subclasses (:class:`NystromPreconditioner`, :class:`JacobiPreconditioner`,
    :class:`cif_jax.KFACPreconditioner`) store undamped quantities, so one build
    serves any damping, and implement :meth:`inverse`. The rest is shared: the
    check that a preconditioner belongs to a task (:meth:`check`), and the copy
    without bookkeeping that jitted solves take (:meth:`for_jit`).

    Subclasses have these static fields (declare them with ``eqx.field(static=True)``):

    Attributes:
        fingerprint: of the task it was built from (:func:`cif_jax.fingerprint`).
        curvature: ``"full"`` or the identifier of the curvature sample it describes.
        seconds: wall-clock build time.
    """

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """p, the number of parameters it acts on."""

    @abc.abstractmethod
    def inverse(self, damping) -> Callable:
        """``R -> lambda (P + lambda I)^{-1} R`` on the rows of R; traceable.

        The preconditioner of the scaled system ``I + GGN / lambda`` that the CG
        kernel solves. Scalar multiples give the same CG iterates; the scaling
        leaves a direction of zero curvature unchanged.
        """

    @property
    def dtype(self):
        """The floating dtype of its arrays."""
        leaves = [x for x in jax.tree_util.tree_leaves(self) if hasattr(x, "dtype")]
        return jnp.result_type(*leaves) if leaves else jnp.dtype(float)

    def approximate_inverse(self, damping) -> Callable:
        """``R -> (P + lambda I)^{-1} R`` on the rows of R: the preconditioner as an approximate solver."""
        scaled = self.inverse(damping)
        return lambda r: scaled(r) / jnp.asarray(damping, r.dtype)

    def check_damping(self, damping: float) -> float:
        """Raises when ``P + lambda I`` cannot be inverted to working precision; returns lambda."""
        return _checks.damping(damping)

    def describe(self) -> str:
        """A short stable description (recorded with a cache's solver settings)."""
        return type(self).__name__.removesuffix("Preconditioner").lower()

    def for_jit(self):
        """This preconditioner with its bookkeeping (fingerprint, build time, ...) blanked.

        Those fields are static, so a jitted solve would compile anew for every
        build (a new ``seconds``); only the arrays and the layout matter to it.
        """
        names = {f.name for f in dataclasses.fields(self)}
        blank = {k: v for k, v in _BLANK.items() if k in names}
        return dataclasses.replace(self, **blank)

    def low_rank(self) -> NystromPreconditioner | None:
        """Its low-rank factors ``U diag(s) U^T`` of the GGN, if it has them (None by default).

        A cache reuses them for its correction and per-example coordinates instead of
        building its own (:func:`cif_jax.build_cache`).
        """
        return None

    def check(self, operator: DampedGGN):
        """This preconditioner in the operator's dtype, after checking it was built for ``operator``.

        The task (by fingerprint) and the curvature sample must be the operator's, and
        ``P + lambda I`` invertible at its damping.
        """
        if self.size != operator.num_params:
            raise ValueError(f"the preconditioner acts on {self.size} parameters; the task has p = "
                             f"{operator.num_params}.")
        if self.fingerprint != operator.fingerprint:
            raise ValueError(
                "the preconditioner was built from another model snapshot or data set (fingerprint mismatch); "
                "rebuild it for this task."
            )
        want = operator.describe_curvature()
        if self.curvature != want:
            raise ValueError(
                f"the preconditioner was built for curvature {self.curvature!r}, the solve uses {want!r}; "
                "build it with the same `curvature=`."
            )
        self.check_damping(operator.damping)
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a, operator.dtype), self)


_BLANK = {"fingerprint": "", "curvature": "", "seconds": 0.0, "num_products": 0, "note": ""}


class NystromPreconditioner(Preconditioner):
    """A rank-r Nystrom approximation ``U diag(s) U^T`` of the undamped GGN.

    Attributes:
        basis: (r, p) U^T, orthonormal rows in ``ravel_pytree`` order.
        eigenvalues: (r,) s, descending, >= 0.
        error_estimate: () a power-iteration estimate of ``||GGN - U diag(s) U^T||_2``
            (a lower estimate of it; NaN when not estimated).
        fingerprint: of the task it was built from.
        curvature: ``"full"`` or the curvature sample's identifier.
        num_products: GGN-vector products spent building it (sketch and error estimate);
            for :func:`cif_jax.sampled_preconditioner`, its passes over the data.
        seconds: wall-clock build time.
        note: how the rank was chosen (``preconditioner="auto"``) and, for a cache's own
            factors, how they were built; or empty.
    """

    basis: Float[Array, "r p"]
    eigenvalues: Float[Array, " r"]
    error_estimate: Float[Array, ""]
    fingerprint: str = eqx.field(static=True)
    curvature: str = eqx.field(static=True)
    num_products: int = eqx.field(static=True)
    seconds: float = eqx.field(static=True)
    note: str = eqx.field(static=True, default="")

    @property
    def rank(self) -> int:
        """r."""
        return self.basis.shape[0]

    @property
    def size(self) -> int:
        return self.basis.shape[1]

    def low_rank(self) -> NystromPreconditioner:
        return self

    def describe(self) -> str:
        return f"nystrom(rank={self.rank})"

    def inverse(self, damping):
        u, s = self.basis, self.eigenvalues
        lam_ = jnp.asarray(damping, s.dtype)
        factor = (s[-1] + lam_) / (s + lam_) - 1

        def apply(r):
            return r + ((r @ u.T) * factor[None, :]) @ u

        return apply

    def approximate_inverse(self, damping):
        u, s = self.basis, self.eigenvalues
        lam_ = jnp.asarray(damping, s.dtype)

        def apply(r):  # U diag(1/(s+lam)) U^T r + (I - U U^T) r / lam
            c = r @ u.T
            return (r - c @ u) / lam_ + (c / (s + lam_)[None, :]) @ u

        return apply

    def condition_estimate(self, damping: float) -> float:
        """Estimated bound ``(s_r + lambda + ||E||) / lambda`` on the preconditioned condition number."""
        lam = _checks.damping(damping)
        err = float(self.error_estimate)
        err = 0.0 if math.isnan(err) else err
        return (float(self.eigenvalues[-1]) + lam + err) / lam


class JacobiPreconditioner(Preconditioner):
    """The diagonal of the undamped GGN.

    Attributes:
        diagonal: (p,) ``diag(GGN)`` in ``ravel_pytree`` order.
        fingerprint, curvature, seconds: as :class:`NystromPreconditioner`.
    """

    diagonal: Float[Array, " p"]
    fingerprint: str = eqx.field(static=True)
    curvature: str = eqx.field(static=True)
    seconds: float = eqx.field(static=True)

    @property
    def size(self) -> int:
        return self.diagonal.shape[0]

    def inverse(self, damping):
        d = self.diagonal

        def apply(r):
            return r / (1 + d / jnp.asarray(damping, d.dtype))[None, :]

        return apply

    def check_damping(self, damping: float) -> float:
        lam = _checks.damping(damping)
        d = np.asarray(self.diagonal) + lam
        if not d.max() / d.min() * float(jnp.finfo(self.diagonal.dtype).eps) < 1:
            raise ValueError(f"`damping` = {lam:g} makes the damped diagonal singular to working precision; raise it.")
        return lam


def inverse_fn(preconditioner, lam):
    """``R -> P^{-1} R`` (rows of R) for the scaled system ``(I + GGN / lambda)``; None without a preconditioner."""
    return None if preconditioner is None else preconditioner.inverse(lam)


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
def _rows_basis(y):
    """An orthonormal basis of the row space of ``y`` (r, p), as rows."""
    return jnp.linalg.qr(y.T)[0].T


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
    # The SVD of the wide (r, p) factor through a QR of its transpose and the SVD of the small
    # (r, r) triangle: f_rows = R^T Q^T, R^T = W S V^T, so f_rows = W S (V^T Q^T). Backward
    # stable like the direct SVD, and 2-4x faster on XLA:CPU at r = 1,024 (the direct SVD of a
    # (1,024, 20,000) matrix took longer than the products of a digits LeNet-5 build).
    qf, rf = jnp.linalg.qr(f_rows.T)
    _, sigma, vt = jnp.linalg.svd(rf.T)
    ut = jnp.matmul(vt, qf.T, precision=jax.lax.Precision.HIGHEST)
    s = jnp.maximum(sigma**2 - nu, 0)
    return ut, s, jnp.all(jnp.isfinite(c))


def _products(kernel: GGNKernel, vectors, block, bar):
    """GGN products of the rows of ``vectors``, ``block`` rows per data pass (last block padded)."""
    out = []
    for chunk, real in row_blocks(vectors, block):
        out.append(apply_undamped(kernel.task, kernel.batch_size, chunk, kernel.curvature)[:real])
        if bar is not None:
            bar.update(real)
    return jnp.concatenate(out)


def _error_estimate(kernel: GGNKernel, ut, s, key, iters, bar):
    """Power iteration on the PSD residual ``GGN - U diag(s) U^T`` (a lower estimate of its norm)."""
    p = ut.shape[1]
    v = jax.random.normal(key, (1, p), ut.dtype)
    v = v / jnp.linalg.norm(v)
    est = jnp.asarray(0.0, ut.dtype)
    for _ in range(iters):
        w = _products(kernel, v, 1, bar) - ((v @ ut.T) * s[None, :]) @ ut
        est = jnp.linalg.norm(w)
        if not bool(est > 0):
            break
        v = w / est
    return est


def block_error_estimate(operator: DampedGGN, basis, eigenvalues, *, key, iters: int, block: int):
    """A block power-iteration estimate of ``||GGN - U diag(s) U^T||`` (a lower estimate of the norm).

    ``block`` orthonormal vectors, ``iters`` rounds of ``W = E V`` and re-orthonormalisation; the
    estimate is the largest singular value of the last ``W``. The products run in blocks of the
    sketch's shape, so they reuse its compiled program: ``iters * block`` GGN-vector products.
    """
    p = basis.shape[1]
    kernel = check_operator(operator).kernel()
    v = _orthonormal_block_jit(as_key(key), None, block, p, basis.dtype)
    est = jnp.asarray(0.0, basis.dtype)
    for _ in range(iters):
        w = _products(kernel, v, block, None) - ((v @ basis.T) * eigenvalues[None, :]) @ basis
        # ||W||_2 from the (block, block) triangle of W^T = Q R: an SVD of the wide (block, p) W itself
        # materialises a (p, p) factor on XLA:CPU (1.1 TB at p = 535,818).
        q, r = jnp.linalg.qr(w.T)
        est = jnp.linalg.svd(r, compute_uv=False)[0]
        if not bool(est > 0):
            break
        v = q.T
    return est


def nystrom_preconditioner(
    operator: DampedGGN,
    *,
    key,
    rank: int | str = "auto",
    max_rank: int = DEFAULT_MAX_RANK,
    initial_rank: int = 64,
    condition_target: float = DEFAULT_CONDITION_TARGET,
    error_iters: int = 10,
    rhs_batch_size: int | None = 16,
    progress: bool = False,
    accept: Callable | None = None,
    power_iters: int = 0,
) -> NystromPreconditioner:
    """Builds a randomized Nystrom preconditioner of the undamped GGN from block products.

    The factors describe the undamped GGN of ``operator`` (its task, curvature sample
    and chunks); its damping enters only the adaptive rule, so the result serves
    solves at any damping.

    Args:
        operator: a :class:`cif_jax.DampedGGN`.
        key: PRNG key for the random test matrix and the error estimate.
        rank: r, an integer (fixed rank), or ``"auto"``: start at ``initial_rank`` and
            double (reusing the products made) until the estimated preconditioned
            condition number ``(s_r + damping + ||E||) / damping`` is at most
            ``condition_target``, or the rank reaches ``max_rank``.
        max_rank, initial_rank, condition_target: the adaptive rule's settings.
        error_iters: power iterations (one GGN product each) estimating ``||E||`` per
            round; 0 skips the estimate (then only ``s_r`` enters the rule).
        rhs_batch_size: test vectors per data pass (block products).
        progress: show a progress bar over products.
        accept: with ``rank="auto"``, a rule ``accept(basis, eigenvalues) -> (done, note)``
            that replaces the condition-number rule: the rank doubles until it says
            done (or reaches ``max_rank``); ``error_iters`` then run once, at the end,
            and the last note is kept in :attr:`NystromPreconditioner.note`.
        power_iters: with a fixed ``rank``, subspace iterations before the factorisation
            (each ``r`` more products: the test block becomes an orthonormal basis of
            its products), which sharpen the captured subspace where the spectrum
            decays slowly (Halko, Martinsson and Tropp 2011, alg. 4.3).

    Returns:
        A `NystromPreconditioner`; pass it as ``cif_jax.CG(preconditioner=...)`` to
        :func:`cif_jax.solve_ggn`, :func:`cif_jax.estimators.influence` or :func:`cif_jax.build_cache`.
    """
    operator = check_operator(operator)
    p = operator.num_params
    if isinstance(rank, str):
        if rank != "auto":
            raise ValueError(f"`rank` must be a positive integer or 'auto', got {rank!r}.")
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
    lam = operator.damping
    if isinstance(error_iters, bool) or not isinstance(error_iters, (int, np.integer)) or error_iters < 0:
        raise ValueError(f"`error_iters` must be an integer >= 0, got {error_iters!r}.")
    rhs_batch_size = _checks.positive_int(rhs_batch_size, "rhs_batch_size", allow_none=True)
    if isinstance(power_iters, bool) or not isinstance(power_iters, (int, np.integer)) or power_iters < 0:
        raise ValueError(f"`power_iters` must be an integer >= 0, got {power_iters!r}.")
    if power_iters and adaptive:
        raise ValueError("`power_iters` applies to a fixed `rank`; the adaptive rule grows the rank instead.")
    key = as_key(key)

    start_time = time.perf_counter()
    bar = _bar(progress)
    sketch = _Sketch(operator, key, rhs_batch_size, bar)
    target_rank = first
    note = ""
    while True:
        sketch.grow(target_rank)
        if adaptive and accept is not None:
            done, note = accept(sketch.ut, sketch.s)
            if done or target_rank >= min(max_rank, p):
                err = sketch.error_estimate(error_iters)
                break
            target_rank = min(2 * target_rank, max_rank, p)
            continue
        if not adaptive:
            for _ in range(power_iters):
                sketch.power()
            err = sketch.error_estimate(error_iters)
            break
        err = sketch.error_estimate(error_iters)
        kappa = (float(sketch.s[-1]) + lam + (0.0 if error_iters == 0 else float(err))) / lam
        if bar is not None:
            bar.set_postfix_str(f"rank {target_rank}, kappa~{kappa:.3g}")
        if kappa <= condition_target or target_rank >= min(max_rank, p):
            break
        target_rank = min(2 * target_rank, max_rank, p)
    if bar is not None:
        bar.close()
    return sketch.preconditioner(err, time.perf_counter() - start_time, note)


def _bar(progress):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="Nystrom products", unit="product")


class _Sketch:
    """A Nystrom sketch of the undamped GGN that grows, reusing every product made so far."""

    def __init__(self, operator: DampedGGN, key, rhs_batch_size, bar):
        self.operator, self.kernel, self.key = operator, operator.kernel(), key
        self.rhs_batch_size, self.bar = rhs_batch_size, bar
        self.q = self.y = self.ut = self.s = None
        self.num_products = 0
        self.round = 0

    @property
    def rank(self) -> int:
        return 0 if self.q is None else int(self.q.shape[0])

    def grow(self, rank: int):
        """Adds test vectors up to ``rank`` and refactors."""
        p, dtype = self.operator.num_params, self.operator.dtype
        new = rank - self.rank
        block = self._block(new)
        q_new = _orthonormal_block_jit(jax.random.fold_in(self.key, 2 * self.round), self.q, new, p, dtype)
        y_new = _products(self.kernel, q_new, block, self.bar)
        self.num_products += new
        self.q = q_new if self.q is None else jnp.concatenate([self.q, q_new])
        self.y = y_new if self.y is None else jnp.concatenate([self.y, y_new])
        self._factor()
        self.round += 1

    def power(self):
        """One subspace iteration: the test vectors become an orthonormal basis of the products, then
        their products are made (``rank`` more); the factors then see ``GGN^2`` through the new block."""
        rank = self.rank
        self.q = _rows_basis(self.y)
        self.y = _products(self.kernel, self.q, self._block(rank), self.bar)
        self.num_products += rank
        self._factor()

    def _block(self, count: int) -> int:
        """Test vectors per data pass for ``count`` new products."""
        return count if self.rhs_batch_size is None else min(self.rhs_batch_size, count)

    def _factor(self):
        self.ut, self.s, ok = _nystrom_factor(self.q, self.y)
        if not bool(ok):
            raise FloatingPointError(
                "the Nystrom factorisation failed (Cholesky of Q^T Y not positive definite); the GGN products are "
                "not symmetric PSD to working precision. Check that the loss is convex in the outputs."
            )

    def error_estimate(self, iters: int):
        if not iters:
            return jnp.asarray(jnp.nan, self.operator.dtype)
        self.num_products += iters
        return _error_estimate(self.kernel, self.ut, self.s, jax.random.fold_in(self.key, 2 * self.round - 1), iters,
                               self.bar)

    def preconditioner(self, err, seconds, note="") -> NystromPreconditioner:
        return NystromPreconditioner(
            basis=self.ut,
            eigenvalues=self.s,
            error_estimate=err,
            fingerprint=self.operator.fingerprint,
            curvature=self.operator.describe_curvature(),
            num_products=self.num_products,
            seconds=seconds,
            note=note,
        )


# ------------------------------------------------------------------------------------------ the cost model

#: Rank of the first sketch ``preconditioner="auto"`` takes to see the spectrum.
PROBE_RANK = 32
#: Fewer systems than this are solved without a preconditioner (the probe would cost more than it saves).
MIN_SYSTEMS = 4
#: Power iterations (GGN products) estimating ``||E||`` after each sketch of the cost model.
ERROR_ITERS = 10
#: Preconditioned CG: measured iterations over ``0.5 sqrt(kappa) ln(2 / rtol)`` (0.43-0.61 on digits
#: LeNet-5 and an MLP at ranks 32-256, ``benchmarks/solvers.py``).
PRECONDITIONED_FACTOR = 0.52
#: Plain CG: measured iterations over the deflation model of :func:`plain_iterations` (digits LeNet-5 and
#: an MLP, ``benchmarks/solvers.py``).
PLAIN_FACTOR = 1.1
#: Plain CG: iterations the deflation model charges per large eigenvalue it steps past.
DEFLATION_COST = 1.5


def preconditioned_iterations(kappa: float, rtol: float) -> float:
    """CG iterations predicted at an (estimated) preconditioned condition number ``kappa``."""
    return PRECONDITIONED_FACTOR * 0.5 * math.sqrt(max(kappa, 1.0)) * math.log(2 / rtol)


def plain_iterations(eigenvalues, error: float, damping: float, rtol: float) -> float:
    """Plain CG iterations predicted from the top eigenvalues and the size of the rest.

    The sketch's eigenvalues are the top of the spectrum; ``error`` (the estimated
    norm of what the sketch misses) is the level of the many directions below, which
    CG cannot step past one by one. CG steps past the ``m`` largest eigenvalues at
    :data:`DEFLATION_COST` iterations each, then converges at the rate of the
    condition number left, ``(max(s_{m+1}, error) + lambda) / lambda``; the model
    takes the best ``m``, times :data:`PLAIN_FACTOR`; never more than the plain CG
    bound at the whole condition number (:func:`preconditioned_iterations` at
    ``(s_1 + lambda) / lambda``), which decides when the spectrum is flat.
    """
    error = max(float(error), 0.0)
    sigma = np.maximum(np.concatenate([np.asarray(eigenvalues, np.float64), [error]]), error)
    steps = DEFLATION_COST * np.arange(sigma.size) + 0.5 * np.sqrt((sigma + damping) / damping) * math.log(2 / rtol)
    whole = preconditioned_iterations((sigma[0] + damping) / damping, rtol)
    return min(PLAIN_FACTOR * float(steps.min()), whole)


def auto_nystrom(
    operator: DampedGGN,
    *,
    num_systems: int,
    rtol: float,
    key,
    rhs_batch_size: int | None = 16,
    max_rank: int = DEFAULT_MAX_RANK,
    progress: bool = False,
    force: bool = False,
):
    """Chooses between plain CG and a Nystrom preconditioner, and its rank, by predicted GGN products.

    A probe sketch of rank :data:`PROBE_RANK`, with a power-iteration estimate of
    the norm ``||E||`` of what it misses, gives the preconditioned condition number
    ``kappa_r = (s_r + lambda + ||E||) / lambda`` (Frangella, Tropp and Udell 2023,
    prop. 5.3) and the top of the spectrum. Costs are counted in GGN-vector
    products, for ``num_systems`` systems over m examples:

    * plain CG: ``num_systems * plain_iterations(...)``;
    * the rank-r preconditioner already built: ``num_systems *
      preconditioned_iterations(kappa_r) * (1 + r / m)`` (applying it takes about
      ``4 r p`` flops, a product over m examples about ``4 m p``);
    * doubling the rank: ``r + ERROR_ITERS`` more products, and the same at
      ``kappa_2r``, predicted as ``1 + (kappa_r - 1) s_r / s_{r/2}`` (the decay
      the sketch shows over its last doubling).

    The sketch doubles while that is predicted cheaper (each doubling measures
    ``kappa`` again), up to ``max_rank``. Below :data:`MIN_SYSTEMS` systems no probe
    is made. With ``force`` a Nystrom preconditioner is always built (the rank
    still chosen by the model).

    Returns:
        ``(preconditioner or None, note)``: the note says what was chosen and why.
    """
    operator = check_operator(operator)
    lam, p = operator.damping, operator.num_params
    top = min(max_rank, p)
    if not force and (num_systems < MIN_SYSTEMS or top < 1):
        return None, f"none ({num_systems} system(s): fewer than {MIN_SYSTEMS}, no probe)"
    start = time.perf_counter()
    bar = _bar(progress)
    sketch = _Sketch(operator, as_key(key), rhs_batch_size, bar)
    examples = operator.curvature_size
    sketch.grow(min(PROBE_RANK, top))
    err = sketch.error_estimate(ERROR_ITERS)
    plain = num_systems * plain_iterations(sketch.s, float(err), lam, rtol)
    while True:
        s = np.asarray(sketch.s, np.float64)
        r = sketch.rank
        kappa = (s[-1] + lam + float(err)) / lam
        here = num_systems * preconditioned_iterations(kappa, rtol) * (1 + r / examples)
        grown = math.inf
        if r < top:
            decay = s[-1] / s[max(r // 2 - 1, 0)] if s[max(r // 2 - 1, 0)] > 0 else 1.0
            kappa_next = 1 + (kappa - 1) * decay
            r_next = min(2 * r, top)
            grown = (r_next - r + ERROR_ITERS
                     + num_systems * preconditioned_iterations(kappa_next, rtol) * (1 + r_next / examples))
        if plain <= min(here, grown) and not force:
            if bar is not None:
                bar.close()
            return None, (f"none (probe rank {r}, kappa~{kappa:.3g}: predicted {plain:.0f} products plain, "
                          f"{min(here, grown):.0f} preconditioned)")
        if grown >= here:
            break
        sketch.grow(r_next)
        err = sketch.error_estimate(ERROR_ITERS)
    if bar is not None:
        bar.close()
    note = (f"auto: rank {sketch.rank}, kappa~{kappa:.3g}, predicted {here:.0f} solve products against {plain:.0f} "
            f"plain ({sketch.num_products} build products)")
    return sketch.preconditioner(err, time.perf_counter() - start, note), note
