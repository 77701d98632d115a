"""The self-influence correction: CiF scores for queries whose evaluation set overlaps the removed set.

When the evaluation set V shares examples with the removed set S (a cross-validation
fold scored on itself, V = S), per-query IF's score

$$
\\Delta\\ell(S; V) = \\frac{1}{N |V|} \\sum_{j \\in V} \\sum_{i \\in S} g_j^\\top \\tilde H^{-1} g_i
$$

contains the self terms ``g_i^T H~^{-1} g_i`` of the members of ``S cap V``. They are
positive and, on a well-fit model, most of the score. CiF replaces each ``g_i`` on
the right by its cluster mean, so its self term becomes ``g_i^T v_c(i)``, which is
near zero for a cluster of near-zero gradients. The correction adds back, per
member of ``S cap V``,

$$
t_i = \\frac{1}{N}\\, g_i^\\top \\tilde H^{-1} (g_i - \\mu_{c(i)}),
$$

weighted as the evaluation gradient weights example i (``1/|V|`` for a mean loss).
Written on the deviation ``g_i - mu_c(i)``, the term is exactly zero when every
example is its own cluster, so CiF with C = N equals IF with every estimator below.
The cross terms ``g_j^T H~^{-1} (g_i - mu_c(i))``, j != i, stay CiF's error (bounded
by :func:`cif_jax.corrected_error_bound`). This is the infinitesimal-jackknife /
hat-matrix-diagonal idea of approximate cross-validation (Giordano et al. 2019)
applied to the cache; a query still costs O(|S| + C).

Estimators of ``t_i`` (each an immutable settings object for ``build_cache(correction=...)``):

* :class:`ExactCorrection`: one damped-GGN solve per example (N solves; small N and tests).
* :class:`NystromCorrection`: ``M = U diag(1/(s + lambda)) U^T + (I - U U^T) / lambda``
  from a rank-r Nystrom approximation ``U diag(s) U^T`` of the GGN, the factors the
  Nystrom preconditioner uses (no solve). It is biased upwards: the Nystrom
  approximation never exceeds the GGN (``A - A_nys`` is PSD), so ``M >= H~^{-1}``;
  its eigenvalues underestimate the GGN's in the sketched subspace, and on the
  complement it uses ``1/lambda`` where the GGN's unsketched spectrum is not
  negligible against lambda.
* :class:`CalibratedCorrection` (the default): the Nystrom estimates times one scale
  ``b``, fixed by exact solves for a small sample of examples drawn with probability
  proportional to ``|t^nys_i|``; ``b`` is the Hansen-Hurwitz estimate of
  ``sum_i t_i / sum_i t^nys_i`` (the mean of ``t_i / t^nys_i`` over the draws when
  every estimate is positive). Its standard error is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ..core import checks as _checks
from ..core.gradients import HIGHEST, per_example_grads, raise_on_bad, streamed_map
from ..core.task import Task, take_examples
from . import lowrank as _lowrank

#: Default number of calibration draws (exact per-example solves).
DEFAULT_NUM_SAMPLES = 16
#: The Nystrom factors a cache builds for its correction hold about four r x p arrays; the
#: rank is lowered (with a warning) so that they stay below this many bytes.
MAX_FACTOR_BYTES = 4 * 2**30


def factor_rank(rank: int, num_params: int, itemsize: int) -> int:
    """The rank to build: ``rank``, capped at p and at :data:`MAX_FACTOR_BYTES` of factors."""
    fits = max(1, MAX_FACTOR_BYTES // (4 * num_params * itemsize))
    return int(min(rank, num_params, fits))


#: How a correction's low-rank factors are built (``factors=``): see :class:`CalibratedCorrection`.
FACTOR_BUILDS = ("auto", "products", "columns")


def _check_rank(owner: str, rank, max_rank, tolerance, allow_zero: bool, factors="auto"):
    if not isinstance(factors, str) or factors not in FACTOR_BUILDS:
        raise ValueError(f"`{owner}.factors` must be one of {FACTOR_BUILDS}; got {factors!r}.")
    if isinstance(rank, str):
        if rank != "auto":
            raise ValueError(f"`{owner}.rank` must be a positive integer or 'auto'; got {rank!r}.")
    elif allow_zero and isinstance(rank, (int, np.integer)) and not isinstance(rank, bool) and rank == 0:
        pass
    else:
        _checks.positive_int(rank, f"{owner}.rank")
    _checks.positive_int(max_rank, f"{owner}.max_rank")
    tol = float(tolerance) if isinstance(tolerance, (int, float, np.floating)) and not isinstance(tolerance, bool) \
        else float("nan")
    if not 0 < tol < 1:
        raise ValueError(f"`{owner}.tolerance` must be a number in (0, 1); got {tolerance!r}.")


def _describe_rank(c) -> str:
    built = "" if c.factors == "auto" else f", factors={c.factors}"
    if c.rank == "auto":
        return f"rank=auto(max {c.max_rank}, tolerance {c.tolerance:g}){built}"
    return f"rank={c.rank}{built}"


class BuildContext(NamedTuple):
    """What a correction reads from the cache build it joins (:func:`cif_jax.build_cache`).

    ``raw``, ``low_self`` and ``grad_norms`` come from the scatter pass (not divided by N);
    ``solve(rhs)`` is the cache's own solver (same operator, tolerance and
    preconditioner, checkpointed with the build); ``run(name, compute)`` times ``compute()`` as a
    phase of the build.
    """

    task: Task
    assignments: Int[Array, " n"]
    means: Float[Array, "c p"]
    batch_size: int | None
    key: jax.Array  #: the build's key for the correction's own draws
    raw: Float[Array, " n"]  #: N times the Nystrom estimates of t_i
    low_self: Float[Array, " n"]  #: their low-rank part (times N)
    grad_norms: Float[Array, " n"]
    rank: int  #: the rank of the factors (0: none)
    solve: Callable
    run: Callable


class AbstractCorrection(eqx.Module):
    """An estimator of the per-example self terms ``t_i``: its settings, and how it computes them.

    A correction says what it needs from the build and computes its terms; ``build_cache``
    calls these methods and nothing else, so a new estimator is a new subclass. Every
    correction keeps low-rank factors of rank ``rank`` (chosen by ``max_rank`` and
    ``tolerance`` for ``"auto"``) for the default estimator (:mod:`cif_jax.cif.lowrank`).
    """

    rank: eqx.AbstractVar[int | str]
    max_rank: eqx.AbstractVar[int]
    tolerance: eqx.AbstractVar[float]
    factors: eqx.AbstractVar[str]

    def describe(self) -> str:
        """A short description, recorded in the cache (``CorrectionTerms.method``) and in checkpoints."""
        raise NotImplementedError

    @property
    def num_systems(self) -> int:
        """Systems this correction adds to the cache's C cluster solves (solved in the same blocks)."""
        return 0

    @property
    def num_phases(self) -> int:
        """Build phases of its own that the progress bar counts."""
        return 0

    @property
    def probe_chunk(self) -> int:
        """Rows per chunk of the rank probe's gradient pass (sharing a compiled pass with this correction's)."""
        return _lowrank.PROBE_CHUNK

    def systems(self, ctx: BuildContext):
        """``(rhs, state)``: the (``num_systems``, p) right-hand sides to solve with the clusters', or
        ``(None, None)``; ``state`` is handed back to :meth:`terms`."""
        return None, None

    def terms(self, ctx: BuildContext, solved, state) -> CorrectionTerms:
        """The :class:`CorrectionTerms`, given the solves of :meth:`systems` (``solved``: a
        ``SolveResult`` of its rows, or None)."""
        raise NotImplementedError


class ExactCorrection(AbstractCorrection):
    """``t_i`` from one damped-GGN solve ``H~ x_i = g_i - mu_c(i)`` per example (N solves).

    Exact to the solver tolerance; each solve's true residual is stored and enters the
    bound. Meant for small N and for checking the cheaper estimators.

    Attributes:
        rank: the rank of the low-rank factors kept for queries whose evaluation set is not
            the removed set (:mod:`cif_jax.cif.lowrank`): ``"auto"`` (default), a positive
            integer, or 0 (no factors: such queries are answered by the clusters alone).
        max_rank, tolerance: the rule of ``rank="auto"`` (as :class:`CalibratedCorrection`).
        factors: how the factors are built (as :class:`CalibratedCorrection`).
    """

    rank: int | str = "auto"
    max_rank: int = _lowrank.DEFAULT_MAX_RANK
    tolerance: float = _lowrank.DEFAULT_TOLERANCE
    factors: str = "auto"

    def __check_init__(self):
        _check_rank("ExactCorrection", self.rank, self.max_rank, self.tolerance, allow_zero=True, factors=self.factors)

    def describe(self) -> str:
        return "exact" if self.rank == 0 else f"exact({_describe_rank(self)})"

    @property
    def num_phases(self) -> int:
        return 1

    def terms(self, ctx: BuildContext, solved, state) -> CorrectionTerms:
        return ctx.run("correction", lambda: exact_terms(self, ctx))


class NystromCorrection(AbstractCorrection):
    """``t_i`` from the rank-r Nystrom factors of the GGN, with no solve (biased upwards).

    Attributes:
        rank: r (capped at p), or ``"auto"`` (as :class:`CalibratedCorrection`). When the
            cache is built with a :class:`cif_jax.NystromPreconditioner`, its factors are
            reused instead of building new ones: its top ``rank`` eigenpairs if it has more,
            all of them if it has fewer (the rank used is recorded in :attr:`CorrectionTerms.rank`).
        max_rank, tolerance: the rule of ``rank="auto"``.
        factors: how the factors are built (as :class:`CalibratedCorrection`).
    """

    rank: int | str = "auto"
    max_rank: int = _lowrank.DEFAULT_MAX_RANK
    tolerance: float = _lowrank.DEFAULT_TOLERANCE
    factors: str = "auto"

    def __check_init__(self):
        _check_rank("NystromCorrection", self.rank, self.max_rank, self.tolerance, allow_zero=False,
                    factors=self.factors)

    def describe(self) -> str:
        return f"nystrom({_describe_rank(self)})"

    def terms(self, ctx: BuildContext, solved, state) -> CorrectionTerms:
        n = ctx.task.num_examples
        return nystrom_terms(self, ctx.raw / n, ctx.low_self / n, ctx.grad_norms, ctx.rank)


class CalibratedCorrection(AbstractCorrection):
    """Nystrom estimates of ``t_i`` rescaled by exact solves for a small sample (the default).

    Attributes:
        rank: Nystrom rank r, or ``"auto"`` (default): the smallest of
            :data:`cif_jax.cif.lowrank.DEFAULT_INITIAL_RANK` and its doublings (up to
            ``max_rank``) at which the share of a probe of deviations ``g_i - mu_c(i)`` that
            lies outside the factors (:func:`cif_jax.cif.lowrank.predicted_error`) is at
            most ``tolerance``. The product build grows to it, reusing every product made;
            the column build is made at ``max_rank`` and keeps that many of its top eigenpairs.
        num_samples: m, calibration draws (with replacement); the distinct drawn examples
            get one exact solve each.
        max_rank: the largest rank ``"auto"`` builds.
        tolerance: the predicted share outside the factors at which ``"auto"`` stops.
        factors: how the rank-r Nystrom factors are built.

            * ``"products"``: r GGN-vector products (in blocks, one data pass per block), the
              rank doubling from :data:`cif_jax.cif.lowrank.DEFAULT_INITIAL_RANK` for ``"auto"``
              (:func:`cif_jax.nystrom_preconditioner`).
            * ``"columns"``: two passes over the data that form each example's q exact
              output-Hessian columns ``J_i^T L_i e_a`` (q vector-Jacobian products) and multiply
              them into the sketch (:func:`cif_jax.sampled_preconditioner` with
              ``samples="exact"``), at ``max_rank``; ``"auto"`` then keeps the smallest doubling
              of the initial rank that meets ``tolerance``. Its basis is better than the
              products' at the same rank (the range pass is half a subspace iteration); its
              cost is about ``6 N q p r`` flops of dense matrix products, against r products.
            * ``"auto"`` (default): the one predicted faster on this machine (a near tie going
              to the columns: :data:`cif_jax.solvers.sampled.COLUMN_PREFERENCE`), from timed
              chunks of each (compiled and run once before timing). Products are taken with
              no probe for builds with ``r m p`` under
              :data:`cif_jax.solvers.sampled.TRIVIAL_PRODUCT_WORK` and for models with more
              than :data:`cif_jax.solvers.sampled.MAX_COLUMN_OUTPUTS` outputs, and without
              timing the columns when the products are predicted under
              :data:`cif_jax.solvers.sampled.PRODUCTS_FLOOR_SECONDS`. The choice and the
              predictions are recorded in the cache's ``lowrank.note``; pass ``"products"``
              or ``"columns"`` for factors that do not depend on the machine's timings.

    Cost: r GGN-vector products (in blocks) or two column passes, and the Nystrom factors'
    memory, about four r x p arrays (``build_cache`` lowers r, with a warning, when they would
    exceed :data:`MAX_FACTOR_BYTES`), plus about m more systems in the cache's block CG. The
    factors also precondition the cache's C solves when no preconditioner is given.
    """

    rank: int | str = "auto"
    num_samples: int = DEFAULT_NUM_SAMPLES
    max_rank: int = _lowrank.DEFAULT_MAX_RANK
    tolerance: float = _lowrank.DEFAULT_TOLERANCE
    factors: str = "auto"

    def __check_init__(self):
        _check_rank("CalibratedCorrection", self.rank, self.max_rank, self.tolerance, allow_zero=False,
                    factors=self.factors)
        _checks.positive_int(self.num_samples, "CalibratedCorrection.num_samples")

    def describe(self) -> str:
        return f"calibrated({_describe_rank(self)}, num_samples={self.num_samples})"

    @property
    def num_systems(self) -> int:
        return self.num_samples

    @property
    def num_phases(self) -> int:
        return 1

    @property
    def probe_chunk(self) -> int:
        return self.num_samples

    def systems(self, ctx: BuildContext):
        """The deviations of ``num_samples`` draws, probability proportional to ``|raw_i|``."""
        sample = draw_sample(ctx.key, ctx.raw, self.num_samples)
        extra, inverse = np.unique(sample, return_inverse=True)
        # Padded (repeating one draw) to a fixed count: every build with these settings reuses one
        # compiled gradient pass and one compiled solve, whatever the number of distinct draws.
        extra = np.concatenate([extra, np.full(self.num_samples - extra.size, extra[0], extra.dtype)])
        g_extra, d_extra = ctx.run("calibration gradients", lambda: deviations(
            ctx.task, extra, ctx.assignments, ctx.means, ctx.batch_size))
        return d_extra, (sample, inverse, g_extra)

    def terms(self, ctx: BuildContext, solved, state) -> CorrectionTerms:
        sample, inverse, g_extra = state
        n = ctx.task.num_examples
        t_extra = (jnp.sum(g_extra * solved.solutions, axis=1) / n)[inverse]
        return calibrated_terms(self, ctx.raw / n, ctx.low_self / n, ctx.grad_norms, sample, t_extra,
                                solved.residuals[inverse], ctx.rank)


class CorrectionTerms(eqx.Module):
    """The per-example self-influence scalars a cache stores (O(N) floats).

    Two forms of each example's self term are kept, one per estimator that adds it back:

    * ``values``, the whole ``t_i = (1/N) g_i^T H~^{-1} d_i`` (``d_i = g_i - mu_c(i)``), for
      the clusters-only estimator (``estimator="corrected"``);
    * ``remainder``, the part the low-rank deviations miss,
      ``t_i - (1/N) (U^T g_i)^T (diag(s) + lambda)^{-1} U^T d_i`` (``t_i`` as estimated in
      ``values``), for the default estimator (``estimator="hybrid"``), which carries the
      rest through the factors (:mod:`cif_jax.cif.lowrank`). The two estimators' self
      terms are therefore the same; the default adds the deviations' cross terms.

    Attributes:
        values: (N,) ``t_i``, already divided by N: what a query adds per member of
            ``S cap V`` (times that member's evaluation weight, ``1/|V|`` for a mean loss).
        raw: (N,) the estimate of ``values`` before calibration (equal to it unless calibrated).
        remainder: (N,) the remainder above, divided by N.
        grad_norms: (N,) ``||g_i||``.
        residuals: (N,) the true relative residual of each exact per-example solve
            (:class:`ExactCorrection`); NaN for the other estimators.
        sample: (m,) the calibration draws (example indices, with repetition); empty unless calibrated.
        sample_values: (m,) the exact ``t_i`` of the draws.
        sample_residuals: (m,) the true relative residuals of their solves.
        scale: () the calibration scale b of ``values`` (1 unless calibrated).
        scale_stderr: () its standard error (0 unless calibrated).
        ratio_std: () the standard deviation of the per-draw ratios ``t_i / raw_i`` (0 unless
            calibrated): the spread of the per-example error after calibration.
        method: the estimator's description (``"exact"``, ``"nystrom(rank=256)"``, ...).
        rank: the Nystrom rank used (0 for none).
    """

    values: Float[Array, " n"]
    raw: Float[Array, " n"]
    remainder: Float[Array, " n"]
    grad_norms: Float[Array, " n"]
    residuals: Float[Array, " n"]
    sample: Int[Array, " m"]
    sample_values: Float[Array, " m"]
    sample_residuals: Float[Array, " m"]
    scale: Float[Array, ""]
    scale_stderr: Float[Array, ""]
    ratio_std: Float[Array, ""]
    method: str = eqx.field(static=True)
    rank: int = eqx.field(static=True)

    @property
    def calibrated(self) -> bool:
        return self.method.startswith("calibrated")

    @property
    def exact(self) -> bool:
        return self.method.startswith("exact")


def check(correction):
    """Validates ``correction=``: None, ``"exact"``, ``"nystrom"``, ``"calibrated"`` or a settings object."""
    if correction is None or isinstance(correction, AbstractCorrection):
        return correction
    if isinstance(correction, str):
        named = {"exact": ExactCorrection, "nystrom": NystromCorrection, "calibrated": CalibratedCorrection}
        if correction in named:
            return named[correction]()
        if correction == "none":
            return None
    raise TypeError(
        "`correction` must be None, 'exact', 'nystrom', 'calibrated', or a `cif_jax.ExactCorrection()`, "
        f"`cif_jax.NystromCorrection(rank=...)` or `cif_jax.CalibratedCorrection(rank=..., num_samples=...)`; got "
        f"{correction!r}."
    )


@eqx.filter_jit
def _terms_pass(task, assignments, means, basis, eigenvalues, lam, batch_size):
    """One streamed pass, per example: ``||d_i||^2``, ``||g_i||``, the low-rank self part
    ``g^T U diag(1/(s + lam)) U^T d``, the complement part ``g^T (I - U U^T) d / lam``,
    ``||(I - U U^T) d||^2``, and the coordinates ``U^T g`` (zeros and an (N, 0) matrix without a basis)."""
    if basis is not None:
        mean_coords = jnp.matmul(means, basis.T, precision=HIGHEST)
        means_perp = means - jnp.matmul(mean_coords, basis, precision=HIGHEST)

    def fn(g, a):
        d = g - means[a]
        cols = [jnp.sum(jnp.square(d), axis=1), jnp.linalg.norm(g, axis=1)]
        if basis is None:
            zero = jnp.zeros(g.shape[0], g.dtype)
            return jnp.stack(cols + [zero, zero, jnp.sum(jnp.square(d), axis=1)], axis=1), jnp.zeros((g.shape[0], 0),
                                                                                                       g.dtype)
        ug = jnp.matmul(g, basis.T, precision=HIGHEST)
        ud = ug - mean_coords[a]
        cols.append(jnp.sum(ug * ud / (eigenvalues + lam)[None, :], axis=1))
        # The complement parts from the projected vectors, not as g.d - (Ug).(Ud): that
        # difference of two nearly equal numbers, divided by lambda, loses float32 digits.
        g_perp = g - jnp.matmul(ug, basis, precision=HIGHEST)
        d_perp = g_perp - means_perp[a]
        cols.append(jnp.sum(g_perp * d_perp, axis=1) / lam)
        cols.append(jnp.sum(jnp.square(d_perp), axis=1))
        return jnp.stack(cols, axis=1), ug

    return streamed_map(task, fn, assignments, batch_size)


def streamed_terms(task, assignments, means, nystrom, lam, batch_size):
    """The cache's scatter pass: ``(dev_sq, grad_norms, low_self, complement, tail_sq, coords)`` for all N.

    ``low_self + complement`` is the Nystrom estimate ``g_i^T M (g_i - mu_c(i))`` (not yet divided
    by N); ``coords`` is (N, r) ``U^T g_i``. Without factors the three low-rank columns are zero
    (``tail_sq`` is then ``dev_sq``) and ``coords`` is (N, 0).
    """
    basis = eig = None
    if nystrom is not None:
        basis, eig = nystrom
    lam_ = jnp.asarray(lam, means.dtype)
    (cols, coords), bad = _terms_pass(task, assignments, means, basis, eig, lam_, batch_size)
    raise_on_bad(bad)
    return cols[:, 0], cols[:, 1], cols[:, 2], cols[:, 3], cols[:, 4], coords


def nystrom_factors(preconditioner, rank):
    """``(U^T, s)``: the top ``rank`` eigenpairs of a :class:`cif_jax.NystromPreconditioner` (all for ``"auto"``)."""
    r = preconditioner.rank if rank == "auto" else min(rank, preconditioner.rank)
    return preconditioner.basis[:r], preconditioner.eigenvalues[:r]


def draw_sample(key, raw, num_samples: int, probabilities=None) -> np.ndarray:
    """``num_samples`` draws with replacement, probability ``probabilities`` (default: proportional to ``|raw_i|``).

    Falls back to uniform draws when every estimate is zero.
    """
    if probabilities is None:
        w = np.abs(np.asarray(raw, np.float64))
        n = w.shape[0]
        probabilities = w / w.sum() if w.sum() > 0 else np.full(n, 1.0 / n)
    n = probabilities.shape[0]
    return np.asarray(jax.random.choice(key, n, (num_samples,), replace=True, p=jnp.asarray(probabilities)))


def deviations(task: Task, indices, assignments, means, batch_size=None) -> tuple[Array, Array]:
    """``(g_i, g_i - mu_c(i))`` for the examples ``indices`` (a few: the (N, p) matrix is never formed)."""
    g = per_example_grads(take_examples(task, indices), batch_size=batch_size)
    return g, g - means[jnp.asarray(assignments)[jnp.asarray(indices)]]


def calibrate(raw, sample, sample_values, probabilities=None):
    """``(scale, stderr, ratio_std)`` from draws made with probabilities ``pi_i``.

    The scale is the ratio of the Hansen-Hurwitz estimates of ``sum_i t_i`` and ``sum_i raw_i``
    from the same draws, ``b = sum_k (t_k / pi_k) / sum_k (raw_k / pi_k)``: exact whenever the
    exact values are one multiple of the estimates, whatever the probabilities (with the
    default ``pi = |raw| / sum |raw|`` and positive estimates it is the mean of ``t_k / raw_k``).
    ``stderr`` is its linearised standard error and ``ratio_std`` the spread of the per-draw
    ratios ``t_k / raw_k``. With fewer than two informative draws the uncertainty is unknown: inf.
    """
    raw = np.asarray(raw, np.float64)
    if probabilities is None:
        total_abs = np.abs(raw).sum()
        probabilities = np.abs(raw) / total_abs if total_abs > 0 else np.zeros_like(raw)
    pi = np.asarray(probabilities, np.float64)[np.asarray(sample)]
    drawn = raw[np.asarray(sample)]
    exact = np.asarray(sample_values, np.float64)
    ok = pi > 0
    est = (drawn[ok] / pi[ok]).mean() if ok.any() else 0.0
    if not ok.any() or est == 0:
        return 1.0, np.inf, np.inf
    scale = (exact[ok] / pi[ok]).mean() / est
    if ok.sum() < 2:
        return float(scale), np.inf, np.inf
    resid = (exact[ok] - scale * drawn[ok]) / pi[ok]
    stderr = resid.std(ddof=1) / np.sqrt(ok.sum()) / abs(est)
    nz = drawn != 0
    spread = float((exact[nz] / drawn[nz]).std(ddof=1)) if nz.sum() >= 2 else np.inf
    return float(scale), float(stderr), spread


def _uncalibrated(dtype):
    one, zero = jnp.ones((), dtype), jnp.zeros((), dtype)
    return dict(sample=jnp.zeros(0, jnp.int32), sample_values=jnp.zeros(0, dtype), sample_residuals=jnp.zeros(0, dtype),
                scale=one, scale_stderr=zero, ratio_std=zero)


def nystrom_terms(correction, raw, low_self, grad_norms, rank) -> CorrectionTerms:
    """:class:`NystromCorrection`: the estimates as they are (already divided by N)."""
    nan = jnp.full(raw.shape, jnp.nan, raw.dtype)
    return CorrectionTerms(values=raw, raw=raw, remainder=raw - low_self, grad_norms=grad_norms, residuals=nan,
                           **_uncalibrated(raw.dtype), method=correction.describe(), rank=rank)


def calibrated_terms(correction, raw, low_self, grad_norms, sample, sample_values, sample_residuals,
                     rank) -> CorrectionTerms:
    """:class:`CalibratedCorrection`: ``raw`` (divided by N) times the scale fitted on the draws."""
    dtype = raw.dtype
    scale, stderr, spread = calibrate(raw, sample, sample_values)
    as_arr = lambda v: jnp.asarray(v, dtype)
    values = raw * as_arr(scale)
    return CorrectionTerms(
        values=values, raw=raw, remainder=values - low_self, grad_norms=grad_norms,
        residuals=jnp.full(raw.shape, jnp.nan, dtype), sample=jnp.asarray(sample, jnp.int32),
        sample_values=sample_values, sample_residuals=sample_residuals, scale=as_arr(scale),
        scale_stderr=as_arr(stderr), ratio_std=as_arr(spread), method=correction.describe(), rank=rank,
    )


def exact_terms(correction, ctx: BuildContext) -> CorrectionTerms:
    """:class:`ExactCorrection`: one solve ``H~ x_i = g_i - mu_c(i)`` per example, in chunks of examples.

    ``ctx.solve`` is the cache's own solver (same operator, tolerance and preconditioner); it
    warns when a solve misses the tolerance. Singleton clusters have a zero deviation and cost
    nothing. ``ctx.low_self / N`` is the low-rank part the remainder leaves out.
    """
    task = ctx.task
    n = task.num_examples
    chunk = min(ctx.batch_size or 512, 512)
    values, residuals = [], []
    for start in range(0, n, chunk):
        g, d = deviations(task, np.arange(start, min(start + chunk, n)), ctx.assignments, ctx.means, ctx.batch_size)
        out = ctx.solve(d)
        values.append(jnp.sum(g * out.solutions, axis=1) / n)
        residuals.append(out.residuals)
    values = jnp.concatenate(values)
    return CorrectionTerms(values=values, raw=values, remainder=values - (ctx.low_self / n).astype(values.dtype),
                           grad_norms=ctx.grad_norms, residuals=jnp.concatenate(residuals),
                           **_uncalibrated(values.dtype), method=correction.describe(), rank=ctx.rank)
