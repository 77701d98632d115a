"""Curvature on a subsample: the GGN built from a fixed, weighted subset of examples.

At scale the damped GGN may be estimated from M << N examples while gradients,
clustering and queries still use all N (paper section 5.6):

$$
\\tilde H_M = \\frac{\\sum_{i \\in M} w_i J_i^\\top W_i J_i}{\\sum_{i \\in M} w_i} + \\lambda I.
$$

A :class:`CurvatureSample` names the subset and its weights; the operator
:class:`cif_jax.DampedGGN` takes it as ``curvature=`` (and so do the functions
that make one: ``solve_ggn``, ``influence``, ``build_cache``); preconditioners
built on that operator describe the sample's GGN. ``curvature=None`` means all N
examples with equal weights.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from . import checks as _checks


class CurvatureSample(NamedTuple):
    """A weighted subset of the training examples that defines the GGN.

    Attributes:
        indices: (M,) distinct example indices in [0, N).
        weights: (M,) positive weights; the GGN is their weighted mean of
            ``J_i^T W_i J_i`` (so scaling all weights changes nothing).
    """

    indices: Int[Array, " m"]
    weights: Float[Array, " m"]


def uniform_sample(num_examples: int, *, size: int, key) -> CurvatureSample:
    """``size`` distinct examples drawn uniformly without replacement, equal weights.

    Args:
        num_examples: N.
        size: M, 1 <= M <= N.
        key: PRNG key.

    Returns:
        A `CurvatureSample` with sorted indices and unit weights.
    """
    n = _checks.positive_int(num_examples, "num_examples")
    size = _checks.positive_int(size, "size")
    if size > n:
        raise ValueError(f"`size` = {size} exceeds the number of examples N = {n}.")
    idx = jnp.sort(jax.random.choice(key, n, (size,), replace=False)).astype(jnp.int32)
    return CurvatureSample(idx, jnp.ones(size, jnp.float32))


def check(curvature, num_examples: int, dtype) -> CurvatureSample | None:
    """Validates a curvature sample on the host; returns it with int32 indices and weights in ``dtype``."""
    if curvature is None:
        return None
    if not isinstance(curvature, CurvatureSample):
        raise TypeError(
            f"`curvature` must be None or a `cif_jax.CurvatureSample(indices, weights)`, got {type(curvature).__name__}."
        )
    idx = np.asarray(curvature.indices)
    w = np.asarray(curvature.weights)
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError(f"`curvature.indices` must be a non-empty 1-D array; got shape {idx.shape}.")
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"`curvature.indices` must hold integers; got dtype {idx.dtype}.")
    if w.shape != idx.shape:
        raise ValueError(f"`curvature.weights` must have the shape of the indices {idx.shape}; got {w.shape}.")
    if idx.min() < 0 or idx.max() >= num_examples:
        raise ValueError(f"`curvature.indices` must lie in [0, N) = [0, {num_examples}); got [{idx.min()}, {idx.max()}].")
    if np.unique(idx).size != idx.size:
        raise ValueError("`curvature.indices` repeats examples; give distinct indices and put multiplicity in weights.")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("`curvature.weights` must be finite and > 0.")
    return CurvatureSample(jnp.asarray(idx, jnp.int32), jnp.asarray(w, dtype))


def describe(curvature: CurvatureSample | None) -> str:
    """A short, stable identifier: ``"full"`` or ``"sample:M:<sha256 of indices and weights>"``."""
    if curvature is None:
        return "full"
    idx = np.ascontiguousarray(np.asarray(curvature.indices, np.int64))
    w = np.ascontiguousarray(np.asarray(curvature.weights, np.float64))
    w = w / w.sum()
    digest = hashlib.sha256(idx.tobytes() + np.round(w, 12).tobytes()).hexdigest()[:16]
    return f"sample:{idx.size}:{digest}"


def weighted_examples(task, curvature: CurvatureSample | None, dtype):
    """``(inputs, targets, weights)`` of the examples that define the GGN: all N with unit weights, or the
    sample's examples with its weights, in ``dtype`` (traceable)."""
    if curvature is None:
        return task.inputs, task.targets, jnp.ones(task.num_examples, dtype)
    take = lambda tree: jax.tree_util.tree_map(lambda a: jnp.take(a, curvature.indices, axis=0), tree)
    return take(task.inputs), take(task.targets), curvature.weights.astype(dtype)
