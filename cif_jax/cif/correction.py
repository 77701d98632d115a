"""The self-influence correction: CiF scores for queries whose evaluation set overlaps the removed set.

When the evaluation set V shares examples with the removed set S (a cross-validation
fold scored on itself, V = S), per-query IF's score

.. math::

    \\Delta\\ell(S; V) = \\frac{1}{N |V|} \\sum_{j \\in V} \\sum_{i \\in S} g_j^\\top \\tilde H^{-1} g_i

contains the self terms ``g_i^T H~^{-1} g_i`` of the members of ``S cap V``. They are
positive and, on a well-fit model, most of the score. CiF replaces each ``g_i`` on
the right by its cluster mean, so its self term becomes ``g_i^T v_c(i)``, which is
near zero for a cluster of near-zero gradients. The correction adds back, per
member of ``S cap V``,

.. math::

    t_i = \\frac{1}{N}\\, g_i^\\top \\tilde H^{-1} (g_i - \\mu_{c(i)}),

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

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ..core import checks as _checks
from ..core.gradients import HIGHEST, per_example_grads, raise_on_bad, streamed_map
from ..core.task import Task, take_examples

#: Default Nystrom rank of the correction (measured: ``experiments/correction.py``).
DEFAULT_RANK = 256
#: Default number of calibration draws (exact per-example solves).
DEFAULT_NUM_SAMPLES = 16
#: The Nystrom factors a cache builds for its correction hold about four r x p arrays; the
#: rank is lowered (with a warning) so that they stay below this many bytes.
MAX_FACTOR_BYTES = 4 * 2**30


def factor_rank(rank: int, num_params: int, itemsize: int) -> int:
    """The rank to build: ``rank``, capped at p and at :data:`MAX_FACTOR_BYTES` of factors."""
    fits = max(1, MAX_FACTOR_BYTES // (4 * num_params * itemsize))
    return int(min(rank, num_params, fits))


class ExactCorrection(eqx.Module):
    """``t_i`` from one damped-GGN solve ``H~ x_i = g_i - mu_c(i)`` per example (N solves).

    Exact to the solver tolerance; each solve's true residual is stored and enters the
    bound. Meant for small N and for checking the cheaper estimators.
    """

    def describe(self) -> str:
        return "exact"


class NystromCorrection(eqx.Module):
    """``t_i`` from the rank-r Nystrom factors of the GGN, with no solve (biased upwards).

    Attributes:
        rank: r (capped at p). When the cache is built with a
            :class:`cif_jax.NystromPreconditioner`, its factors are reused instead of building
            new ones: its top ``rank`` eigenpairs if it has more, all of them if it has fewer
            (the rank used is recorded in :attr:`CorrectionTerms.rank`).
    """

    rank: int = DEFAULT_RANK

    def __check_init__(self):
        _checks.positive_int(self.rank, "NystromCorrection.rank")

    def describe(self) -> str:
        return f"nystrom(rank={self.rank})"


class CalibratedCorrection(eqx.Module):
    """Nystrom estimates of ``t_i`` rescaled by exact solves for a small sample (the default).

    Attributes:
        rank: Nystrom rank r, as :class:`NystromCorrection`.
        num_samples: m, calibration draws (with replacement, probability proportional to
            ``|t^nys_i|``); the distinct drawn examples get one exact solve each.

    Cost: r GGN-vector products (in blocks) and the Nystrom factors' memory, about four
    r x p arrays (``build_cache`` lowers r, with a warning, when they would exceed
    :data:`MAX_FACTOR_BYTES`), plus about m more systems in the cache's block CG. The
    factors also precondition the cache's C solves when no preconditioner is given.
    """

    rank: int = DEFAULT_RANK
    num_samples: int = DEFAULT_NUM_SAMPLES

    def __check_init__(self):
        _checks.positive_int(self.rank, "CalibratedCorrection.rank")
        _checks.positive_int(self.num_samples, "CalibratedCorrection.num_samples")

    def describe(self) -> str:
        return f"calibrated(rank={self.rank}, num_samples={self.num_samples})"


class CorrectionTerms(eqx.Module):
    """The per-example self-influence scalars a cache stores (O(N) floats).

    Attributes:
        values: (N,) ``t_i``, already divided by N: what a query adds per member of
            ``S cap V`` (times that member's evaluation weight, ``1/|V|`` for a mean loss).
        raw: (N,) the estimate before calibration (equal to ``values`` unless calibrated).
        grad_norms: (N,) ``||g_i||``.
        residuals: (N,) the true relative residual of each exact per-example solve
            (:class:`ExactCorrection`); NaN for the other estimators.
        sample: (m,) the calibration draws (example indices, with repetition); empty unless calibrated.
        sample_values: (m,) the exact ``t_i`` of the draws.
        sample_residuals: (m,) the true relative residuals of their solves.
        scale: () the calibration scale b (1 unless calibrated).
        scale_stderr: () its standard error (0 unless calibrated).
        ratio_std: () the standard deviation of the per-draw ratios ``t_i / raw_i`` (0 unless
            calibrated): the spread of the per-example error after calibration.
        method: the estimator's description (``"exact"``, ``"nystrom(rank=256)"``, ...).
        rank: the Nystrom rank used (0 for exact).
    """

    values: Float[Array, " n"]
    raw: Float[Array, " n"]
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


def check(correction):
    """Validates ``correction=``: None, ``"exact"``, ``"nystrom"``, ``"calibrated"`` or a settings object."""
    if correction is None or isinstance(correction, (ExactCorrection, NystromCorrection, CalibratedCorrection)):
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
    """One streamed pass: per example ``||d_i||^2``, ``||g_i||``, and the Nystrom parts
    ``g^T U diag(1/(s + lam)) U^T d`` and ``g^T (I - U U^T) d / lam`` (zeros without a basis)."""
    def fn(g, a):
        d = g - means[a]
        cols = [jnp.sum(jnp.square(d), axis=1), jnp.linalg.norm(g, axis=1)]
        if basis is None:
            zero = jnp.zeros(g.shape[0], g.dtype)
            cols += [zero, zero]
        else:
            ug = jnp.matmul(g, basis.T, precision=HIGHEST)
            ud = jnp.matmul(d, basis.T, precision=HIGHEST)
            cols.append(jnp.sum(ug * ud / (eigenvalues + lam)[None, :], axis=1))
            # The complement part from the projected gradient, not as g.d - (Ug).(Ud): that
            # difference of two nearly equal numbers, divided by lambda, loses float32 digits.
            g_perp = g - jnp.matmul(ug, basis, precision=HIGHEST)
            cols.append(jnp.sum(g_perp * d, axis=1) / lam)
        return jnp.stack(cols, axis=1)

    return streamed_map(task, fn, assignments, batch_size)


def streamed_terms(task, assignments, means, nystrom, lam, batch_size):
    """``(dev_sq, grad_norms, nystrom_estimate)`` for all N, from one gradient pass (the cache's scatter pass).

    ``nystrom_estimate`` is ``g_i^T M (g_i - mu_c(i))`` (not yet divided by N), zeros without factors.
    """
    basis = eig = None
    if nystrom is not None:
        basis, eig = nystrom
    lam_ = jnp.asarray(lam, means.dtype)
    cols, bad = _terms_pass(task, assignments, means, basis, eig, lam_, batch_size)
    raise_on_bad(bad)
    return cols[:, 0], cols[:, 1], cols[:, 2] + cols[:, 3]


def nystrom_factors(preconditioner, rank: int):
    """``(U^T, s)``: the top ``rank`` eigenpairs of a :class:`cif_jax.NystromPreconditioner`."""
    r = min(rank, preconditioner.rank)
    return preconditioner.basis[:r], preconditioner.eigenvalues[:r]


def draw_sample(key, raw, num_samples: int) -> np.ndarray:
    """``num_samples`` draws with replacement, probability proportional to ``|raw_i|``.

    Falls back to uniform draws when every estimate is zero.
    """
    w = np.abs(np.asarray(raw, np.float64))
    n = w.shape[0]
    prob = w / w.sum() if w.sum() > 0 else np.full(n, 1.0 / n)
    return np.asarray(jax.random.choice(key, n, (num_samples,), replace=True, p=jnp.asarray(prob)))


def deviations(task: Task, indices, assignments, means, batch_size=None) -> tuple[Array, Array]:
    """``(g_i, g_i - mu_c(i))`` for the examples ``indices`` (a few: the (N, p) matrix is never formed)."""
    g = per_example_grads(take_examples(task, indices), batch_size=batch_size)
    return g, g - means[jnp.asarray(assignments)[jnp.asarray(indices)]]


def calibrate(raw, sample, sample_values):
    """``(scale, stderr, ratio_std)`` from draws made with probability ``|raw_i| / sum |raw|``.

    The Hansen-Hurwitz estimate of the exact total is ``T = (sum |raw| / m) sum_k t_k / |raw_k|``,
    so the scale is ``b = T / sum raw`` (the mean of ``t_k / raw_k`` when every estimate is
    positive); ``stderr`` is its standard error and ``ratio_std`` the spread of the per-draw
    ratios ``t_k / raw_k``. With fewer than two informative draws the uncertainty is unknown: inf.
    """
    raw = np.asarray(raw, np.float64)
    drawn = raw[np.asarray(sample)]
    exact = np.asarray(sample_values, np.float64)
    ok = drawn != 0
    total_abs, total = np.abs(raw).sum(), raw.sum()
    if not ok.any() or total == 0:
        return 1.0, np.inf, np.inf
    weighted = exact[ok] / np.abs(drawn[ok])  # t_k / pi_k, up to the factor sum |raw|
    scale = total_abs * weighted.mean() / total
    if weighted.size < 2:
        return float(scale), np.inf, np.inf
    stderr = total_abs * weighted.std(ddof=1) / np.sqrt(weighted.size) / abs(total)
    return float(scale), float(stderr), float((exact[ok] / drawn[ok]).std(ddof=1))

def _none(dtype):
    return dict(sample=jnp.zeros(0, jnp.int32), sample_values=jnp.zeros(0, dtype), sample_residuals=jnp.zeros(0, dtype),
                scale=jnp.ones((), dtype), scale_stderr=jnp.zeros((), dtype), ratio_std=jnp.zeros((), dtype))


def nystrom_terms(correction, raw, grad_norms, rank) -> CorrectionTerms:
    """:class:`NystromCorrection`: the estimates as they are (``raw`` already divided by N)."""
    nan = jnp.full(raw.shape, jnp.nan, raw.dtype)
    return CorrectionTerms(values=raw, raw=raw, grad_norms=grad_norms, residuals=nan, **_none(raw.dtype),
                           method=correction.describe(), rank=rank)


def calibrated_terms(correction, raw, grad_norms, sample, sample_values, sample_residuals, rank) -> CorrectionTerms:
    """:class:`CalibratedCorrection`: ``raw`` (divided by N) times the scale fitted on the draws."""
    dtype = raw.dtype
    scale, stderr, spread = calibrate(raw, sample, sample_values)
    return CorrectionTerms(
        values=raw * jnp.asarray(scale, dtype), raw=raw, grad_norms=grad_norms,
        residuals=jnp.full(raw.shape, jnp.nan, dtype), sample=jnp.asarray(sample, jnp.int32),
        sample_values=sample_values, sample_residuals=sample_residuals, scale=jnp.asarray(scale, dtype),
        scale_stderr=jnp.asarray(stderr, dtype), ratio_std=jnp.asarray(spread, dtype),
        method=correction.describe(), rank=rank,
    )


def exact_terms(correction, task, assignments, means, grad_norms, solve, batch_size) -> CorrectionTerms:
    """:class:`ExactCorrection`: one solve ``H~ x_i = g_i - mu_c(i)`` per example, in chunks of examples.

    ``solve(rhs)`` is the cache's own solver (same operator, tolerance and preconditioner); it
    warns when a solve misses the tolerance. Singleton clusters have a zero deviation and cost nothing.
    """
    n = task.num_examples
    chunk = min(batch_size or 512, 512)
    values, residuals = [], []
    for start in range(0, n, chunk):
        g, d = deviations(task, np.arange(start, min(start + chunk, n)), assignments, means, batch_size)
        out = solve(d)
        values.append(jnp.sum(g * out.solutions, axis=1) / n)
        residuals.append(out.residuals)
    values = jnp.concatenate(values)
    return CorrectionTerms(values=values, raw=values, grad_norms=grad_norms, residuals=jnp.concatenate(residuals),
                           **_none(values.dtype), method=correction.describe(), rank=0)
