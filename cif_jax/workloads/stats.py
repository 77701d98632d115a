"""Agreement statistics for comparing estimators: Pearson, Spearman, bootstrap intervals.

Host-side numpy/scipy (these run once per report, on K numbers).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.stats import rankdata

from cif_jax.evaluation.lds import pearson_rows


class Correlation(NamedTuple):
    """A correlation with its bootstrap percentile interval."""

    value: float
    low: float
    high: float


def pearson(a, b) -> float:
    """Pearson correlation of two 1-D samples (NaN if either is constant)."""
    a, b = _pair(a, b)
    return float(pearson_rows(a, b))


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson of average ranks, ties handled)."""
    a, b = _pair(a, b)
    return float(pearson_rows(rankdata(a), rankdata(b)))


def _pair(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"samples differ in length: {a.size} vs {b.size}.")
    if a.size < 3:
        raise ValueError(f"a correlation needs at least 3 pairs, got {a.size}.")
    return a, b


def bootstrap_correlations(
    a, b, *, num_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0, chunk: int = 2_000
) -> dict[str, Correlation]:
    """Pearson and Spearman with bootstrap percentile intervals over resampled pairs.

    Pairs (a_k, b_k) are resampled with replacement ``num_resamples`` times (the
    paper uses B = 10,000); resamples where a correlation is undefined (a
    constant resample) are dropped from its interval.

    Returns:
        ``{"pearson": Correlation, "spearman": Correlation}``.
    """
    a, b = _pair(a, b)
    if num_resamples < 1:
        raise ValueError(f"`num_resamples` must be >= 1, got {num_resamples}.")
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must lie in (0, 1), got {confidence}.")
    rng = np.random.default_rng(seed)
    k = a.size
    pears, spears = [], []
    for start in range(0, num_resamples, chunk):
        idx = rng.integers(0, k, size=(min(chunk, num_resamples - start), k))
        ra, rb = a[idx], b[idx]
        pears.append(pearson_rows(ra, rb))
        spears.append(pearson_rows(rankdata(ra, axis=1), rankdata(rb, axis=1)))
    lo_q, hi_q = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    out = {}
    for name, point, samples in (
        ("pearson", pearson(a, b), np.concatenate(pears)),
        ("spearman", spearman(a, b), np.concatenate(spears)),
    ):
        samples = samples[np.isfinite(samples)]
        if samples.size:
            low, high = np.percentile(samples, [lo_q, hi_q])
        else:
            low = high = float("nan")
        out[name] = Correlation(point, float(low), float(high))
    return out
