"""The damped Generalised Gauss-Newton operator, matrix-free (paper eqs. 1-2).

``H~ v = (1/N) sum_i J_i^T W_i J_i v + lambda v``: ``J_i v`` by a forward-mode
linearisation of the model, ``W_i`` (the Hessian of the loss in the model
outputs) applied by forward-over-reverse autodiff of ``loss_fn`` (any twice
differentiable loss), then ``J_i^T`` by transposing the linearisation. Products
are summed over chunks of examples and divided by N. With a
:class:`cif_jax.CurvatureSample` the sum runs over the sample only, weighted, and
is divided by the sum of the weights.

The operator as a value (damping, sample, chunks, mesh) is
:class:`cif_jax.DampedGGN`, in :mod:`cif_jax.solvers.operator`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .chunks import chunk_sum
from .task import Task


def as_batch_of_one(a):
    return jax.tree_util.tree_map(lambda leaf: leaf[None], a)


def output_hvp(loss_fn, output, target, tangent):
    """``W t`` for one example: the loss Hessian in the outputs times a tangent."""

    def loss_one(o):
        return loss_fn(o[None], as_batch_of_one(target))[0]

    return jax.jvp(jax.grad(loss_one), (output,), (tangent,))[1]


def ggn_block_fn(task: Task, *, batch_size: int | None = None, curvature=None):
    """Returns ``mv(V) -> V (1/N) sum_i J_i^T W_i J_i`` (undamped) for a (k, p) block, traceable.

    One pass over the examples serves the k rows: each chunk is linearised once (the
    forward pass does not depend on the vectors) and its Jacobian products are
    vmapped over the block inside the chunk, so ``batch_size=None`` sizes the chunks
    for the block's memory (:func:`cif_jax.core.chunks.budget_batch_size`). With
    ``curvature`` (a validated :class:`cif_jax.CurvatureSample`) the weighted mean
    runs over its examples.
    """
    flat, unravel = ravel_pytree(task.params)
    if curvature is None:
        data = (task.inputs, task.targets, None)
        total_weight = task.num_examples
    else:
        take = lambda tree: jax.tree_util.tree_map(lambda a: jnp.take(a, curvature.indices, axis=0), tree)
        weights = curvature.weights.astype(flat.dtype)
        data = (take(task.inputs), take(task.targets), weights)
        total_weight = jnp.sum(weights)

    def chunk_product(block, chunk):
        x, y, w = chunk
        outputs, jvp_fn = jax.linearize(lambda fp: task.apply_fn(unravel(fp), x), flat)

        def one(v):
            jv = jvp_fn(v)
            wjv = jax.vmap(lambda o, t, tv: output_hvp(task.loss_fn, o, t, tv))(outputs, y, jv)
            if w is not None:
                wjv = wjv * w.reshape(w.shape + (1,) * (wjv.ndim - 1)).astype(wjv.dtype)
            (jt,) = jax.linear_transpose(jvp_fn, flat)(wjv)
            return jt

        return jax.vmap(one)(block)

    def mv(block):
        total = chunk_sum(lambda c: chunk_product(block, c), data, batch_size)
        return total / jnp.asarray(total_weight, total.dtype)

    return mv


def ggn_matvec_fn(task: Task, *, batch_size: int | None = None, curvature=None):
    """Returns ``mv(v) -> (1/N) sum_i J_i^T W_i J_i v`` (undamped) for one flat (p,) vector, traceable.

    For a block of vectors use :func:`ggn_block_fn` (not ``jax.vmap`` of this: the
    chunk size chosen for ``batch_size=None`` would not see the block).
    """
    block = ggn_block_fn(task, batch_size=batch_size, curvature=curvature)
    return lambda v: block(v[None])[0]


@eqx.filter_jit
def apply_undamped(task: Task, batch_size, vectors, curvature=None):
    return ggn_block_fn(task, batch_size=batch_size, curvature=curvature)(vectors)

