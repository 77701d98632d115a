"""Per-example gradients ``g_i = grad_theta loss(f_theta(x_i), y_i)`` at theta_0, by vmap.

The gradient of one example is written once (:func:`example_grads_fn`) and
batched with ``jax.vmap(jax.grad(...))``, in chunks of ``batch_size`` so memory
stays O(B p). The same chunked pass serves reductions that never hold the
(N, p) matrix: subset gradient sums, sketches, cluster sums (:func:`streamed_sum`,
:func:`streamed_map`).
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

from . import checks as _checks
from .chunks import chunk_map, chunk_sum
from .task import Task

HIGHEST = jax.lax.Precision.HIGHEST


def _one(a):
    return jax.tree_util.tree_map(lambda leaf: leaf[None], a)


def example_grads_fn(task: Task) -> Callable:
    """Returns ``grads(flat_params, xs, ys) -> (B, p)``, the vmapped per-example gradient.

    The loss of one example is the model applied to a batch of one, so any
    batched ``apply_fn`` works; ``jax.vmap`` then batches over the chunk.
    """
    _, unravel = ravel_pytree(task.params)

    def loss_one(flat, x, y):
        out = task.apply_fn(unravel(flat), _one(x))
        return task.loss_fn(out, _one(y))[0]

    return jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))


def streamed_sum(task: Task, fn: Callable, extra, batch_size: int | None):
    """One pass over the examples: sum over chunks of ``fn(g_chunk, extra_chunk)``.

    ``extra`` is a pytree of per-example arrays (leading dimension N) handed to
    ``fn`` chunk by chunk. Non-finite gradient rows are zeroed before ``fn`` sees
    them and flagged in the returned (N,) boolean ``bad``; callers raise on it.
    Traceable: call inside jit.
    """
    flat, _ = ravel_pytree(task.params)
    grads = example_grads_fn(task)
    n = task.num_examples

    def chunk(c):
        x, y, idx, e = c
        g = grads(flat, x, y)
        bad = ~jnp.isfinite(g).all(axis=1)
        g = jnp.where(bad[:, None], jnp.zeros((), g.dtype), g)
        return fn(g, e), jnp.zeros(n, jnp.int32).at[idx].add(bad.astype(jnp.int32))

    total, bad = chunk_sum(chunk, (task.inputs, task.targets, jnp.arange(n), extra), batch_size)
    return total, bad > 0


def streamed_map(task: Task, fn: Callable, extra, batch_size: int | None):
    """One pass over the examples: ``fn(g_chunk, extra_chunk)`` per chunk, rows concatenated.

    Returns ``(rows, bad)`` as :func:`streamed_sum`. Traceable: call inside jit.
    """
    flat, _ = ravel_pytree(task.params)
    grads = example_grads_fn(task)

    def chunk(c):
        x, y, e = c
        g = grads(flat, x, y)
        bad = ~jnp.isfinite(g).all(axis=1)
        g = jnp.where(bad[:, None], jnp.zeros((), g.dtype), g)
        return fn(g, e), bad

    return chunk_map(chunk, (task.inputs, task.targets, extra), batch_size)


@eqx.filter_jit
def per_example_grads_pass(task: Task, batch_size):
    flat, _ = ravel_pytree(task.params)
    grads = example_grads_fn(task)
    return chunk_map(lambda c: grads(flat, c[0], c[1]), (task.inputs, task.targets), batch_size)


def per_example_grads(task: Task, *, batch_size: int | None = None) -> Float[Array, "n p"]:
    """Per-example training gradients ``g_i`` (paper section 3.2), as an (N, p) matrix.

    This holds all N gradients; the cache build and :func:`influence` never do.

    Args:
        task: the model snapshot and training data.
        batch_size: examples per vmapped chunk (None: chosen for a memory budget, see :func:`cif_jax.core.chunks.budget_batch_size`). The result does
            not depend on it.

    Returns:
        ``(N, p)`` array; row i is ``g_i`` flattened in ``ravel_pytree(params)`` order,
        in the params' dtype.

    Raises:
        ValueError: if a gradient holds NaN or Inf.
    """
    _checks.task(task)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    grads = per_example_grads_pass(task, batch_size)
    _checks.finite_rows(grads, "per-example gradients")
    return grads


@eqx.filter_jit
def gradient_sums_pass(task: Task, mask_t, batch_size):
    def fn(g, m):
        return jnp.matmul(m.T.astype(g.dtype), g, precision=HIGHEST)

    return streamed_sum(task, fn, mask_t, batch_size)


def raise_on_bad(bad) -> None:
    bad = jnp.asarray(bad)
    if bool(bad.any()):
        idx = [int(i) for i in jnp.flatnonzero(bad)[:10]]
        raise ValueError(
            f"per-example gradients contain NaN or Inf for {int(bad.sum())} example(s), e.g. {idx}. Check the "
            "model snapshot and the data (a diverged training run, unnormalised inputs, log of zero in the loss)."
        )


def subset_gradient_sums(task: Task, subsets, *, batch_size: int | None = None) -> Float[Array, "q p"]:
    """``sum_{i in S} g_i`` for each subset S, streamed: the (N, p) gradients are never held.

    Args:
        task: the model snapshot and training data.
        subsets: a boolean mask (Q, N), a 2-D integer array (Q, m), or a list of
            integer index arrays.
        batch_size: examples per chunk (None: chosen for a memory budget, see :func:`cif_jax.core.chunks.budget_batch_size`).

    Returns:
        ``(Q, p)`` gradient sums, the right-hand sides of paper eq. (3).
    """
    _checks.task(task)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    subs = _checks.subsets(subsets, task.num_examples)
    sums, bad = gradient_sums_pass(task, jnp.asarray(subs.mask.T), batch_size)
    raise_on_bad(bad)
    return sums
