"""Iteration over the examples in fixed-size chunks, inside jit.

A pass over N examples in chunks of B runs ``N // B`` full chunks under
``lax.scan`` / ``lax.map`` and, when ``N % B != 0``, one short final chunk with
its own static shape. Sums add chunk results (never average chunk means), so a
short last chunk is weighted by its true size.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax


def num_leading(tree) -> int:
    return jax.tree_util.tree_leaves(tree)[0].shape[0]


def _split(tree, batch_size: int):
    n = num_leading(tree)
    num_full = n // batch_size
    cut = num_full * batch_size
    full = jax.tree_util.tree_map(lambda a: a[:cut].reshape(num_full, batch_size, *a.shape[1:]), tree)
    rest = jax.tree_util.tree_map(lambda a: a[cut:], tree)
    return num_full, full, n - cut, rest


def chunk_map(fn: Callable, tree, batch_size: int | None):
    """``fn`` applied to chunks of ``tree`` (split on axis 0), outputs concatenated on axis 0."""
    n = num_leading(tree)
    if batch_size is None or batch_size >= n:
        return fn(tree)
    num_full, full, rem, rest = _split(tree, batch_size)
    out = lax.map(fn, full)
    out = jax.tree_util.tree_map(lambda a: a.reshape(num_full * batch_size, *a.shape[2:]), out)
    if rem:
        last = fn(rest)
        out = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b], axis=0), out, last)
    return out


def chunk_sum(fn: Callable, tree, batch_size: int | None):
    """Sum over chunks of ``fn(chunk)``; ``fn`` returns a pytree of fixed shape."""
    n = num_leading(tree)
    if batch_size is None or batch_size >= n:
        return fn(tree)
    num_full, full, rem, rest = _split(tree, batch_size)
    shapes = jax.eval_shape(fn, jax.tree_util.tree_map(lambda a: a[0], full))
    init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, chunk):
        return jax.tree_util.tree_map(jnp.add, carry, fn(chunk)), None

    total, _ = lax.scan(body, init, full)
    if rem:
        total = jax.tree_util.tree_map(jnp.add, total, fn(rest))
    return total


def row_blocks(rows, block: int):
    """``(padded, real)`` for each block of ``block`` rows of ``rows`` (2-D), in order.

    The last block is zero-padded to ``block`` rows, so that every block has one
    shape and a jitted function of it compiles once; ``real`` is how many of its
    rows are ``rows``' own (slice the block's results to it).
    """
    for start in range(0, rows.shape[0], block):
        chunk = rows[start : start + block]
        real = chunk.shape[0]
        if real < block:
            chunk = jnp.concatenate([chunk, jnp.zeros((block - real, chunk.shape[1]), chunk.dtype)])
        yield chunk, real
