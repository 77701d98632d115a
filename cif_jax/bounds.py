"""Error bounds of CiF against per-query IF (paper section 3.5, appendix A.5).

Both bounds are stated for the cache as built: its partition, its scatter and its
real solver residuals rho_c.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from . import _checks
from .cache import InfluenceCache
from .gradients import _subset_gradient_sums, raise_on_bad
from .queries import _check_task, cluster_counts
from .task import Task


def error_bound(cache: InfluenceCache, subset_size) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
    """Theorem 3.1: the expected parameter error for a uniformly random subset of size m.

    .. math::

        \\mathbb{E}\\|\\Delta\\theta_S - \\hat\\Delta\\theta_S\\|_2 \\le
        \\underbrace{\\frac{1}{\\lambda N}\\sqrt{\\frac{m(N-m)}{N-1}\\,\\mathrm{tr}(\\bar\\Sigma)}}_{\\text{scatter}}
        + \\underbrace{\\frac{m}{\\lambda N}\\sum_c \\frac{n_c}{N}\\rho_c\\|\\mu_c\\|_2}_{\\text{solver}}

    This is eq. (37) of appendix A (eq. 16 of the main text, whose typesetting
    leaves tr(Sigma_bar) outside the square root; the proof puts it inside). For
    N = 1 the finite-population factor is taken as 0.

    Args:
        cache: an :class:`InfluenceCache`.
        subset_size: m, an integer or array of integers in [1, N].

    Returns:
        ``(scatter_term, solver_term)``, arrays shaped like ``subset_size``. Their
        sum bounds the expected parameter error; multiply by ``||g_V||`` for the
        loss error (eq. 38).
    """
    m = np.asarray(subset_size)
    n = cache.num_examples
    if not np.issubdtype(m.dtype, np.integer):
        raise TypeError(f"`subset_size` must be an integer or integer array, got dtype {m.dtype}.")
    if m.size == 0 or m.min() < 1 or m.max() > n:
        raise ValueError(f"`subset_size` must lie in [1, N] = [1, {n}]; got {m.tolist()}.")
    dtype = cache.responses.dtype
    mf = jnp.asarray(m, dtype)
    lam_n = jnp.asarray(cache.damping * n, dtype)
    fpc = mf * (n - mf) / (n - 1) if n > 1 else jnp.zeros_like(mf)
    scatter = jnp.sqrt(fpc * cache.scatter_trace) / lam_n
    weights = cache.cluster_sizes.astype(dtype) / n
    solver = mf * jnp.sum(weights * cache.residuals * cache.mean_norms) / lam_n
    return scatter, solver


def subset_error_bound(
    cache: InfluenceCache, subsets, *, task: Task | None = None, batch_size: int | None = None
) -> tuple[Float[Array, " q"], Float[Array, " q"]]:
    """The deterministic per-subset bound of eq. (13) / Theorem A.6.

    .. math::

        \\|\\Delta\\theta_S - \\hat\\Delta\\theta_S\\|_2 \\le \\frac{1}{\\lambda N}
        \\Big\\|\\sum_{i \\in S} (g_i - \\mu_{c(i)})\\Big\\|_2
        + \\frac{1}{\\lambda N}\\sum_c m_c(S)\\,\\rho_c\\|\\mu_c\\|_2

    With ``task`` (the task the cache was built from) the scatter term is exact,
    from one streamed gradient pass. Without it the cache's per-example deviation
    norms give the looser, still valid, triangle bound
    ``sum_{i in S} ||g_i - mu_c(i)||``.

    Returns:
        ``(scatter_term, solver_term)``, each (Q,).
    """
    subs = _checks.subsets(subsets, cache.num_examples)
    counts = cluster_counts(cache, subsets)
    dtype = cache.responses.dtype
    lam_n = jnp.asarray(cache.damping * cache.num_examples, dtype)
    solver = counts.astype(dtype) @ (cache.residuals * cache.mean_norms) / lam_n
    if task is None:
        mask = jnp.asarray(subs.mask, dtype)
        deviation = mask @ cache.deviation_norms
    else:
        _check_task(cache, task)
        batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
        sums, bad = _subset_gradient_sums(task, jnp.asarray(subs.mask.T), batch_size)
        raise_on_bad(bad)
        deviation = jnp.linalg.norm(sums - counts.astype(dtype) @ cache.means, axis=1)
    return deviation / lam_n, solver
