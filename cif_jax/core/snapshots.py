"""Input checks and small passes shared by the baselines (attribution, retraining, LDS).

Everything named ``check_*`` runs in Python on concrete values, before any
tracing, and raises ``ValueError``/``TypeError`` naming the argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ..core import checks as _checks
from ..core.chunks import chunk_map
from ..core.task import Task


def eval_task(task: Task, eval_inputs, eval_targets, params=None) -> Task:
    """The task's model and loss on the evaluation data (at ``params``, default ``task.params``).

    Checks that the evaluation data has the training data's structure and
    per-example shapes, then that the model and loss accept it.
    """
    for name, got, ref in (("eval_inputs", eval_inputs, task.inputs), ("eval_targets", eval_targets, task.targets)):
        if got is None:
            raise ValueError(f"`{name}` is required.")
        got = jax.tree_util.tree_map(jnp.asarray, got)
        if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(ref):
            raise ValueError(
                f"`{name}` must have the structure of the training {name[5:]}: "
                f"{jax.tree_util.tree_structure(ref)}, got {jax.tree_util.tree_structure(got)}."
            )
        for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
            if g.ndim != r.ndim or g.shape[1:] != r.shape[1:]:
                per_example = ", ".join(map(str, r.shape[1:]))
                raise ValueError(
                    f"`{name}` must hold examples shaped like the training ones: (E, {per_example}) per leaf, "
                    f"got shape {g.shape}."
                )
    try:
        out = Task(task.apply_fn, task.loss_fn, task.params if params is None else params, eval_inputs, eval_targets)
    except ValueError as err:
        raise ValueError(f"`eval_inputs`/`eval_targets`: {err}") from err
    _checks.task(out)
    return out


def with_params(task: Task, params) -> Task:
    """``task`` with its parameters replaced (same model, loss and data)."""
    return Task(task.apply_fn, task.loss_fn, params, task.inputs, task.targets)


def check_params_like(params, ref, name: str):
    """Checks that ``params`` has the structure, shapes and dtypes of ``ref``; returns it."""
    if isinstance(params, Task):
        params = params.params
    s_got, s_ref = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(ref)
    if s_got != s_ref:
        raise ValueError(f"`{name}` must have the structure of the task's params: {s_ref}, got {s_got}.")
    for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref)):
        got, want = jnp.asarray(got), jnp.asarray(want)
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(
                f"`{name}` has a leaf of {got.dtype}{got.shape} where the task's params have {want.dtype}{want.shape}."
            )
    flat, _ = ravel_pytree(params)
    if not bool(jnp.isfinite(flat).all()):
        raise ValueError(f"`{name}` holds NaN or Inf parameters.")
    return params


def check_checkpoints(task: Task, checkpoints) -> list:
    """A non-empty list of parameter pytrees (or Tasks, of which only ``params`` is used)."""
    if checkpoints is None:
        return [task.params]
    if isinstance(checkpoints, (Task, dict)) or not isinstance(checkpoints, Sequence):
        raise TypeError(
            "`checkpoints` must be a list of parameter pytrees (or Tasks) shaped like `task.params`; "
            f"got {type(checkpoints).__name__}. For one checkpoint pass [params]."
        )
    if len(checkpoints) == 0:
        raise ValueError("`checkpoints` is empty: give at least one parameter snapshot.")
    return [check_params_like(c, task.params, f"checkpoints[{k}]") for k, c in enumerate(checkpoints)]


def check_positive_floats(values, name: str, length: int) -> np.ndarray:
    """A 1-D array of ``length`` finite, strictly positive numbers."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number or a sequence of {length} numbers, got {values!r}.") from None
    if arr.ndim == 0:
        arr = np.full(length, float(arr))
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ValueError(f"`{name}` must hold {length} value(s) (one per checkpoint), got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"`{name}` must be finite and > 0, got {arr.tolist()}.")
    return arr


def check_keep_masks(masks, num_examples: int, name: str = "keep") -> np.ndarray:
    """A boolean (M, N) array of training subsets to keep, each with at least one member."""
    arr = np.asarray(masks)
    if arr.dtype != bool:
        raise TypeError(f"`{name}` must be a boolean mask (M, N) of examples to train on; got dtype {arr.dtype}.")
    if arr.ndim != 2 or arr.shape[1] != num_examples or arr.shape[0] == 0:
        raise ValueError(f"`{name}` must have shape (M, N) = (M, {num_examples}) with M >= 1; got {arr.shape}.")
    empty = np.flatnonzero(~arr.any(axis=1))
    if empty.size:
        raise ValueError(f"`{name}`: row(s) {empty[:10].tolist()} keep no example; every model needs training data.")
    return arr


def check_finite_data(tree, name: str) -> None:
    """Raises if a floating leaf of a data pytree (leading axis N) holds NaN or Inf, naming the examples."""
    for leaf in jax.tree_util.tree_leaves(tree):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating):
            _checks.finite_rows(leaf.reshape(leaf.shape[0], -1), f"`{name}`")


def check_stacked(params, ref, name: str) -> int:
    """Checks a pytree of M stacked parameter sets shaped like ``ref``; returns M."""
    leaves = jax.tree_util.tree_leaves(params)
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
    if not leaves or len(sizes) != 1 or None in sizes or sizes == {0}:
        raise ValueError(f"`{name}` must stack M >= 1 parameter sets on a leading axis of every leaf; found "
                         f"leading sizes {sorted(map(str, sizes))}.")
    check_params_like(jax.tree_util.tree_map(lambda a: a[0], params), ref, f"{name}[0]")
    return sizes.pop()


@eqx.filter_jit
def per_example_losses(task: Task, batch_size):
    """``loss_fn(apply_fn(params, x), y)`` for every example of ``task``, in chunks: (N,)."""

    def chunk(c):
        x, y = c
        return task.loss_fn(task.apply_fn(task.params, x), y)

    return chunk_map(chunk, (task.inputs, task.targets), batch_size)
