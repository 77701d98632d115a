"""Per-example low-rank coordinates: what lets one cache answer queries whose evaluation set is not the removed set.

CiF replaces each removed gradient by its cluster mean, ``g_i = mu_c(i) + d_i``, and
solves only for the means. The deviations ``d_i`` carry everything that tells the
members of a cluster apart, so a query that scores S on some other set V (held-out
points, another fold) loses ``(1/N) g_V^T H~^{-1} sum_{i in S} d_i``. The cache keeps,
beside the exact cluster solves, a rank-r Nystrom factorisation ``GGN ~ U diag(s) U^T``
and each example's coordinates ``U^T g_i`` (an (N, r) matrix, built in the scatter
pass that streams the gradients anyway), and carries the deviations through the
low-rank inverse:

$$
\\Delta\\hat\\ell(S; V) = \\frac{1}{N} \\sum_c m_c(S)\\, g_V^\\top v_c
+ \\frac{1}{N} (U^\\top g_V)^\\top (\\mathrm{diag}(s) + \\lambda I)^{-1}
  \\sum_{i \\in S} U^\\top d_i .
$$

With ``r = p`` this is per-query IF exactly, and with one cluster per example it is
IF at any rank (every ``d_i`` is zero). What it misses is the deviations' part in
the directions the factors do not hold, ``(I - U U^T) d_i``; the rank is chosen so
that this part is small (:func:`probe_rule`), and the cache records how small.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..core.gradients import HIGHEST

#: Largest rank ``rank="auto"`` grows to (before the memory cap of the factors).
DEFAULT_MAX_RANK = 1024
#: First rank ``rank="auto"`` tries; it doubles from there.
DEFAULT_INITIAL_RANK = 256
#: ``rank="auto"`` stops once the probe's predicted share of the deviations' response that
#: lies outside the factors is at most this. Measured (``experiments/every_query.py``, digits LeNet-5):
#: shares 0.11 / 0.007 / 0.0016 at ranks 256 / 512 / 1024 gave cross-fold Spearman 0.62 / 0.92 / 0.99.
DEFAULT_TOLERANCE = 0.002
#: Examples whose deviations the rank rule probes.
PROBE_SIZE = 64
#: Block power iterations (each one block of GGN products, in the sketch's block shape) estimating
#: ``||GGN - U diag(s) U^T||`` once the rank is chosen.
ERROR_ITERS = 2


class LowRankTerms(eqx.Module):
    """The rank-r factors of the GGN and every example's coordinates in them (the cache's low-rank part).

    Attributes:
        basis: (r, p) ``U^T``, orthonormal rows in ``ravel_pytree`` order.
        eigenvalues: (r,) ``s``, descending, of the undamped GGN's Nystrom approximation.
        coords: (N, r) ``U^T g_i`` for every training example.
        mean_coords: (C, r) ``U^T mu_c`` for every cluster mean.
        tail_norms: (N,) ``||(I - U U^T)(g_i - mu_c(i))||``: the part of each deviation the
            factors do not hold (enters :func:`cif_jax.corrected_error_bound`).
        error_estimate: () a power-iteration estimate of ``||GGN - U diag(s) U^T||`` (NaN if not made).
        predicted_error: () the probe's share of the deviations' response outside the factors
            (:func:`probe_rule`; NaN when the rank was fixed and no probe ran).
        note: how the rank was chosen.
    """

    basis: Float[Array, "r p"]
    eigenvalues: Float[Array, " r"]
    coords: Float[Array, "n r"]
    mean_coords: Float[Array, "c r"]
    tail_norms: Float[Array, " n"]
    error_estimate: Float[Array, ""]
    predicted_error: Float[Array, ""]
    note: str = eqx.field(static=True, default="")

    @property
    def rank(self) -> int:
        """r."""
        return self.basis.shape[0]

    def weights(self, damping: float) -> Float[Array, " r"]:
        """``1 / (s + lambda)``: the low-rank inverse in the factors' coordinates."""
        return 1 / (self.eigenvalues + jnp.asarray(damping, self.eigenvalues.dtype))

    def deviation_coords(self, assignments) -> Float[Array, "n r"]:
        """``U^T (g_i - mu_c(i))`` for every example."""
        return self.coords - self.mean_coords[assignments]

    def eval_coords(self, eval_grads, damping: float) -> Float[Array, "... r"]:
        """``(diag(s) + lambda)^{-1} U^T g_V`` for evaluation gradients (p,) or (Q, p)."""
        g = jnp.asarray(eval_grads, self.basis.dtype)
        coords = jnp.matmul(g, self.basis.T, precision=HIGHEST)
        return coords * self.weights(damping).reshape((1,) * (coords.ndim - 1) + (-1,))

    def tail_eigenvalue_ratio(self, damping: float) -> float:
        """``s_r / lambda``: the last eigenvalue the factors hold, against the damping (0 at rank 0)."""
        return float(self.eigenvalues[-1]) / damping if self.rank else 0.0


def empty(num_examples: int, num_clusters: int, num_params: int, dtype) -> LowRankTerms:
    """Rank-0 terms: the estimator reduces to the clusters and the self terms."""
    nan = jnp.asarray(jnp.nan, dtype)
    return LowRankTerms(basis=jnp.zeros((0, num_params), dtype), eigenvalues=jnp.zeros(0, dtype),
                        coords=jnp.zeros((num_examples, 0), dtype), mean_coords=jnp.zeros((num_clusters, 0), dtype),
                        tail_norms=jnp.full(num_examples, nan, dtype), error_estimate=nan, predicted_error=nan,
                        note="rank 0: no factors")


@jax.jit
def _shares(d, basis, eigenvalues, damping):
    ud = jnp.matmul(d, basis.T, precision=HIGHEST)
    perp = d - jnp.matmul(ud, basis, precision=HIGHEST)
    return jnp.sum(jnp.square(perp)) / damping, jnp.sum(jnp.square(ud) / (eigenvalues + damping)[None, :])


def predicted_error(deviations, basis, eigenvalues, damping) -> float:
    """The share of ``sum_i d_i^T M d_i`` that lies outside the factors, over the given deviations.

    ``M = U diag(1/(s + lambda)) U^T + (I - U U^T) / lambda`` is the low-rank inverse completed on the
    complement at ``1/lambda``, an upper estimate of what the true inverse gives there
    (``H~^{-1} <= M``). The share ``sum ||(I - UU^T) d_i||^2 / lambda / sum d_i^T M d_i`` is what the
    low-rank estimator drops from the deviations' response: 0 when the factors hold the deviations,
    1 when they hold none of them.
    """
    d = jnp.asarray(deviations, basis.dtype)
    tail, held = (float(x) for x in _shares(d, basis, eigenvalues, jnp.asarray(damping, basis.dtype)))
    total = tail + held
    return tail / total if total > 0 else 0.0


def probe_rule(deviations, damping: float, tolerance: float):
    """The stopping rule of ``rank="auto"``: done when :func:`predicted_error` of the probe is at most ``tolerance``.

    Returns ``accept(basis, eigenvalues) -> (done, note)`` for :func:`cif_jax.nystrom_preconditioner`.
    """

    def accept(basis, eigenvalues):
        err = predicted_error(deviations, basis, eigenvalues, damping)
        ratio = float(eigenvalues[-1]) / damping
        note = (f"auto: rank {basis.shape[0]}, predicted share outside the factors {err:.3g} "
                f"(tolerance {tolerance:g}), s_r / lambda = {ratio:.3g}")
        return err <= tolerance, note

    return accept


def smallest_accepted(preconditioner, initial_rank: int, accept):
    """The top eigenpairs of built factors at the smallest of ``initial_rank, 2 initial_rank, ...``
    (and at most their rank) that ``accept(basis, eigenvalues)`` takes (:func:`probe_rule`).

    The rule of ``rank="auto"`` for factors built at once at the cap (the exact-column build),
    as :func:`cif_jax.nystrom_preconditioner` applies it while doubling; the note is the
    rule's at the rank kept.
    """
    r = min(initial_rank, preconditioner.rank)
    while True:
        done, note = accept(preconditioner.basis[:r], preconditioner.eigenvalues[:r])
        if done or r >= preconditioner.rank:
            break
        r = min(2 * r, preconditioner.rank)
    return dataclasses.replace(preconditioner, basis=preconditioner.basis[:r],
                               eigenvalues=preconditioner.eigenvalues[:r], note=note)


#: The probe's gradients are taken this many at a time (the calibration draws' count: one compiled pass).
PROBE_CHUNK = 16


def probe_deviations(task, key, assignments, means, batch_size, chunk: int = PROBE_CHUNK):
    """``g_i - mu_c(i)`` for :func:`probe_indices`, ``chunk`` examples per gradient call (the last one padded)."""
    from ..core.gradients import per_example_grads
    from ..core.task import take_examples

    idx = probe_indices(key, task.num_examples)
    padded = np.concatenate([idx, np.full(-idx.size % chunk, idx[0])])
    parts = [per_example_grads(take_examples(task, padded[a:a + chunk]), batch_size=batch_size)
             for a in range(0, padded.size, chunk)]
    g = jnp.concatenate(parts)[: idx.size]
    return g - means[jnp.asarray(assignments)[jnp.asarray(idx)]]


def probe_indices(key, num_examples: int) -> np.ndarray:
    """:data:`PROBE_SIZE` distinct examples drawn uniformly (all of them when N is smaller), sorted."""
    size = min(PROBE_SIZE, num_examples)
    return np.sort(np.asarray(jax.random.choice(key, num_examples, (size,), replace=False)))
