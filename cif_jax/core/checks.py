"""Input validation shared by the public functions.

Everything here runs in Python on concrete values, before any tracing or
expensive work, and raises ``ValueError``/``TypeError`` naming the argument and
the fix.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def positive_int(value, name: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer, got {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be at least 1, got {value}.")
    return int(value)


def positive_float(value, name: str) -> float:
    """``value`` as a finite float > 0, or a TypeError / ValueError naming ``name``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a positive number, got {value!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be finite and > 0, got {value}.")
    return value


def nonnegative_float(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number, got {value!r}.") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be finite and >= 0, got {value}.")
    return value


def damping(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`damping` must be a positive number, got {value!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"`damping` must be finite and > 0 (the damped GGN needs lambda > 0 to be invertible, "
            f"paper eq. 2), got {value}."
        )
    return value


def _leading_batch(out, take: int) -> None:
    for leaf in jax.tree_util.tree_leaves(out):
        if leaf.ndim < 1 or leaf.shape[0] != take:
            raise ValueError(
                f"`Task.apply_fn` must return outputs with a leading batch dimension: a batch of {take} "
                f"inputs gave shape {leaf.shape}."
            )


def task(task) -> None:
    """Checks that the model and loss produce per-example outputs and losses (shapes only, no compute)."""
    from .task import Task

    if not isinstance(task, Task):
        raise TypeError(f"expected a `cif_jax.Task`, got {type(task).__name__}.")
    take = min(2, task.num_examples)
    x = jax.tree_util.tree_map(lambda a: a[:take], task.inputs)
    y = jax.tree_util.tree_map(lambda a: a[:take], task.targets)
    try:
        out = jax.eval_shape(task.apply_fn, task.params, x)
    except Exception as err:
        hint = ""
        if any(word in str(err) for word in ("BatchStat", "batch_stats", "mutate", "immutable")):
            hint = (" The model updates state in its forward pass (batch normalisation in training mode?): evaluate "
                    "it in inference mode (flax nnx `model.eval()`, linen `use_running_average=True`).")
        raise ValueError(
            f"`Task.apply_fn(params, inputs[:{take}])` failed; check that the inputs match the model: {err}{hint}"
        ) from err
    _leading_batch(out, take)
    if task.num_examples > take:
        # A second batch size: an output laid out (outputs, batch) can match one batch size by chance
        # (a binary model's (2, B) at B = 2) but not two.
        more = jax.tree_util.tree_map(lambda a: a[: take + 1], task.inputs)
        _leading_batch(jax.eval_shape(task.apply_fn, task.params, more), take + 1)
    try:
        loss = jax.eval_shape(task.loss_fn, out, y)
    except Exception as err:
        raise ValueError(
            f"`Task.loss_fn(outputs, targets[:{take}])` failed; check that targets match the model outputs "
            f"(outputs have shape {jax.tree_util.tree_map(lambda s: s.shape, out)}): {err}"
        ) from err
    if not hasattr(loss, "shape") or loss.shape != (take,):
        raise ValueError(
            f"`Task.loss_fn` must return one loss per example, shape ({take},); got "
            f"{getattr(loss, 'shape', type(loss))}. Use a per-example loss such as "
            "`optax.softmax_cross_entropy_with_integer_labels`, not a mean."
        )
    _class_targets(task, out)


def _class_targets(task, out) -> None:
    """Integer class targets (N,) for a model with q >= 2 outputs must lie in [0, q).

    An index outside the logits is read without complaint by a cross-entropy (gathers
    clamp or fill), and every influence number comes back finite and wrong.
    """
    leaves = jax.tree_util.tree_leaves(out)
    targets = task.targets
    if len(leaves) != 1 or leaves[0].ndim != 2 or leaves[0].shape[1] < 2:
        return
    if not isinstance(targets, (np.ndarray, jax.Array)) or isinstance(targets, jax.core.Tracer):
        return
    if targets.ndim != 1 or not jnp.issubdtype(targets.dtype, jnp.integer):
        return
    q = leaves[0].shape[1]
    y = np.asarray(targets)
    bad = np.flatnonzero((y < 0) | (y >= q))
    if bad.size:
        raise ValueError(
            f"`Task.targets` holds class indices outside [0, {q}) for a model with {q} outputs: examples "
            f"{bad[:10].tolist()} have labels {y[bad[:10]].tolist()}. Check the labels (or the model's "
            "number of classes)."
        )


class Subsets:
    """Validated subsets as flat (query, index) pairs, with the dense (Q, N) mask on demand.

    Attributes:
        query_ids: (M,) int32, M = sum of subset sizes.
        indices: (M,) int32 example indices.
        sizes: (Q,) int32.
        num_examples: N.
        mask: (Q, N) bool, built when first asked for (large Q x N masks are never
            needed by the counting queries).
    """

    def __init__(self, query_ids, indices, sizes, num_examples, mask=None):
        self.query_ids = query_ids
        self.indices = indices
        self.sizes = sizes
        self.num_examples = num_examples
        self._mask = mask

    @property
    def mask(self) -> np.ndarray:
        if self._mask is None:
            mask = np.zeros((self.sizes.size, self.num_examples), dtype=bool)
            mask[self.query_ids, self.indices] = True
            self._mask = mask
        return self._mask


def _index_matrix(arr: np.ndarray, n: int, name: str) -> Subsets:
    """Vectorised checks for a (Q, m) integer array of equal-size subsets."""
    q, m = arr.shape
    if q == 0:
        raise ValueError(f"`{name}` is empty: give at least one subset.")
    if m == 0:
        raise ValueError(f"`{name}` has subsets of size 0; every subset needs a member.")
    bad_rows = np.flatnonzero(((arr < 0) | (arr >= n)).any(axis=1))
    if bad_rows.size:
        row = arr[bad_rows[0]]
        raise ValueError(
            f"`{name}[{bad_rows[0]}]` has indices out of range [0, {n}): {row[(row < 0) | (row >= n)][:10].tolist()}."
        )
    ordered = np.sort(arr, axis=1)
    dup_rows = np.flatnonzero((np.diff(ordered, axis=1) == 0).any(axis=1))
    if dup_rows.size:
        values, counts = np.unique(arr[dup_rows[0]], return_counts=True)
        raise ValueError(f"`{name}[{dup_rows[0]}]` repeats indices {values[counts > 1][:10].tolist()}; subsets are sets.")
    query_ids = np.repeat(np.arange(q, dtype=np.int32), m)
    return Subsets(query_ids, arr.reshape(-1).astype(np.int32), np.full(q, m, np.int32), n)


def subsets(subsets, num_examples: int, *, name: str = "subsets") -> Subsets:
    """Normalises a boolean mask (Q, N), a (Q, m) integer array, or a sequence of integer index arrays."""
    n = num_examples
    if isinstance(subsets, (np.ndarray, jax.Array)) and np.asarray(subsets).dtype == bool:
        mask = np.asarray(subsets)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.ndim != 2 or mask.shape[1] != n:
            raise ValueError(
                f"`{name}` as a boolean mask must have shape (Q, N) = (Q, {n}); got {np.asarray(subsets).shape}."
            )
        sizes = mask.sum(axis=1)
        if mask.shape[0] == 0:
            raise ValueError(f"`{name}` is empty: give at least one subset.")
        empty = np.flatnonzero(sizes == 0)
        if empty.size:
            raise ValueError(f"`{name}`: subset(s) {empty[:10].tolist()} are empty; every subset needs a member.")
        query_ids, indices = np.nonzero(mask)
        return Subsets(query_ids.astype(np.int32), indices.astype(np.int32), sizes.astype(np.int32), n, mask)

    if isinstance(subsets, (np.ndarray, jax.Array)):
        arr = np.asarray(subsets)
        if arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
            return _index_matrix(arr, n, name)
        if arr.ndim == 2:
            rows = list(arr)
        else:
            raise ValueError(
                f"`{name}` must be a boolean mask (Q, N), a 2-D integer array (Q, m) of equal-size subsets, or a "
                f"list of 1-D integer index arrays; got an array of shape {arr.shape} and dtype {arr.dtype}. "
                "For a single subset, wrap it in a list: [indices]."
            )
    elif isinstance(subsets, Sequence) and not isinstance(subsets, (str, bytes)):
        rows = list(subsets)
    else:
        raise TypeError(
            f"`{name}` must be a boolean mask (Q, N) or a list of integer index arrays; got {type(subsets).__name__}."
        )
    if not rows:
        raise ValueError(f"`{name}` is empty: give at least one subset.")
    query_ids, indices, sizes = [], [], []
    for q, row in enumerate(rows):
        row = np.asarray(row)
        if row.ndim != 1:
            raise ValueError(f"`{name}[{q}]` must be a 1-D array of indices; got shape {row.shape}.")
        if row.size == 0:
            raise ValueError(f"`{name}[{q}]` is empty; every subset needs at least one member.")
        if not np.issubdtype(row.dtype, np.integer):
            raise TypeError(f"`{name}[{q}]` must hold integer indices; got dtype {row.dtype}.")
        if row.min() < 0 or row.max() >= n:
            bad = row[(row < 0) | (row >= n)]
            raise ValueError(f"`{name}[{q}]` has indices out of range [0, {n}): {bad[:10].tolist()}.")
        if np.unique(row).size != row.size:
            values, counts = np.unique(row, return_counts=True)
            raise ValueError(f"`{name}[{q}]` repeats indices {values[counts > 1][:10].tolist()}; subsets are sets.")
        query_ids.append(np.full(row.size, q, np.int32))
        indices.append(row.astype(np.int32))
        sizes.append(row.size)
    return Subsets(np.concatenate(query_ids), np.concatenate(indices), np.asarray(sizes, np.int32), n)


def finite_rows(values, name: str, what: str = "example") -> None:
    """Raises if any row of a (concrete) array holds NaN or Inf, naming the rows."""
    ok = np.asarray(jnp.isfinite(values).reshape(values.shape[0], -1).all(axis=1))
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raise ValueError(
            f"{name} contain NaN or Inf for {bad.size} {what}(s), e.g. {bad[:10].tolist()}. Check the model "
            "snapshot and the data (a diverged training run, or unnormalised inputs)."
        )


def solver_settings(rtol, atol, max_steps, max_restarts) -> tuple[float, float, int, int]:
    """Checks CG settings; returns them normalised."""
    rtol = nonnegative_float(rtol, "rtol")
    atol = nonnegative_float(atol, "atol")
    if rtol == 0 and atol == 0:
        raise ValueError("`rtol` and `atol` are both 0: CG would never meet the tolerance; set rtol > 0.")
    max_steps = positive_int(max_steps, "max_steps")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, (int, np.integer)) or max_restarts < 0:
        raise ValueError(f"`max_restarts` must be an integer >= 0, got {max_restarts!r}.")
    return rtol, atol, max_steps, int(max_restarts)


def as_int(value: Any, name: str, *, minimum: int) -> int:
    """Checks that ``value`` is a Python/NumPy integer ``>= minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"`{name}` must be an int, got {value!r} of type {type(value).__name__}; "
            f"pass an integer such as `{name}={max(minimum, 1)}`."
        )
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return value


def as_key(key: Any):
    """Returns ``key`` as a typed PRNG key, accepting legacy uint32 keys."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(
                f"`key` must be a single PRNG key (shape ()), got shape {key.shape}; "
                "split it and pass one key."
            )
        return key
    arr = key if isinstance(key, jax.Array) else np.asarray(key)
    if arr.dtype != np.uint32 or arr.ndim != 1:
        raise TypeError(
            "`key` must be a PRNG key from `jax.random.key(seed)` (or a legacy "
            f"`jax.random.PRNGKey(seed)`), got {type(key).__name__} with "
            f"dtype {getattr(arr, 'dtype', None)} and shape {getattr(arr, 'shape', None)}."
        )
    try:
        return jax.random.wrap_key_data(arr)
    except (TypeError, ValueError) as err:
        raise TypeError(
            "`key` looks like a legacy uint32 key but does not match the default "
            f"PRNG implementation ({err}); pass `jax.random.key(seed)` instead."
        ) from err
