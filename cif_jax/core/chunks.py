"""Iteration over the examples in fixed-size chunks, inside jit.

A pass over N examples in chunks of B runs ``N // B`` full chunks under
``lax.scan`` / ``lax.map`` and, when ``N % B != 0``, one short final chunk with
its own static shape. Sums add chunk results (never average chunk means), so a
short last chunk is weighted by its true size.

``batch_size=None`` never means "all N at once" unless all N fit: B is then chosen
so that one chunk's intermediate arrays stay under :data:`DEFAULT_MEMORY_BUDGET`
(:func:`budget_batch_size`). The chunk's cost is read off the traced program, not
guessed: the per-chunk function is traced (not compiled, not run) at one and at two
examples, and the bytes of every intermediate array it creates are summed. That sum
counts arrays XLA may fuse away or free early, so it over-states the peak, and B errs
small. Pass an integer ``batch_size`` to choose B yourself (e.g. from
:func:`cif_jax.plan_batches` for another budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from jax import lax

#: Bytes of intermediates one chunk may create when ``batch_size=None`` (1 GiB: a laptop's share).
DEFAULT_MEMORY_BUDGET = 2**30


def num_leading(tree) -> int:
    return jax.tree_util.tree_leaves(tree)[0].shape[0]


def _split(tree, batch_size: int):
    n = num_leading(tree)
    num_full = n // batch_size
    cut = num_full * batch_size
    full = jax.tree_util.tree_map(lambda a: a[:cut].reshape(num_full, batch_size, *a.shape[1:]), tree)
    rest = jax.tree_util.tree_map(lambda a: a[cut:], tree)
    return num_full, full, n - cut, rest


def _jaxpr_bytes(jaxpr) -> int:
    """Bytes of every array a jaxpr's equations create, nested programs included (each counted once)."""
    total = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = getattr(var, "aval", None)
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                # Extended dtypes (PRNG keys) may not say their size: count 8 bytes per element.
                total += math.prod(aval.shape) * getattr(aval.dtype, "itemsize", 8)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jex.ClosedJaxpr):
                    total += _jaxpr_bytes(sub.jaxpr)
                elif isinstance(sub, jex.Jaxpr):
                    total += _jaxpr_bytes(sub)
    return total


def chunk_bytes(fn: Callable, tree, size: int) -> int:
    """The bytes of the intermediates ``fn`` creates on a chunk of ``size`` examples (traced only)."""
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((size, *a.shape[1:]), a.dtype), tree)
    return _jaxpr_bytes(jax.make_jaxpr(fn)(shapes).jaxpr)


def budget_batch_size(fn: Callable, tree, budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """The chunk size for ``batch_size=None``: N if every example fits ``budget``, else the largest
    power of two B whose chunk's intermediates (``fixed + B * per_example``, traced at one and at two
    examples) fit, and at least 1."""
    n = num_leading(tree)
    one, two = chunk_bytes(fn, tree, 1), chunk_bytes(fn, tree, min(2, n))
    per = max(two - one, 1) if n > 1 else max(one, 1)
    fixed = max(one - per, 0)
    if fixed + n * per <= budget:
        return n
    fits = max((budget - fixed) // per, 1)
    return int(min(2 ** int(math.log2(fits)), n))


def chunk_map(fn: Callable, tree, batch_size: int | None):
    """``fn`` applied to chunks of ``tree`` (split on axis 0), outputs concatenated on axis 0.

    ``batch_size=None``: chosen for :data:`DEFAULT_MEMORY_BUDGET` (:func:`budget_batch_size`).
    """
    n = num_leading(tree)
    if batch_size is None:
        batch_size = budget_batch_size(fn, tree)
    if batch_size >= n:
        return fn(tree)
    num_full, full, rem, rest = _split(tree, batch_size)
    out = lax.map(fn, full)
    out = jax.tree_util.tree_map(lambda a: a.reshape(num_full * batch_size, *a.shape[2:]), out)
    if rem:
        last = fn(rest)
        out = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b], axis=0), out, last)
    return out


def chunk_sum(fn: Callable, tree, batch_size: int | None):
    """Sum over chunks of ``fn(chunk)``; ``fn`` returns a pytree of fixed shape.

    ``batch_size=None``: chosen for :data:`DEFAULT_MEMORY_BUDGET` (:func:`budget_batch_size`).
    """
    n = num_leading(tree)
    if batch_size is None:
        batch_size = budget_batch_size(fn, tree)
    if batch_size >= n:
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
