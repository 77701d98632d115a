"""The damped Generalised Gauss-Newton operator, matrix-free (paper eqs. 1-2).

``H~ v = (1/N) sum_i J_i^T W_i J_i v + lambda v``: ``J_i v`` by a forward-mode
linearisation of the model, ``W_i`` (the Hessian of the loss in the model
outputs) applied by forward-over-reverse autodiff of ``loss_fn`` (any twice
differentiable loss), then ``J_i^T`` by transposing the linearisation. Products
are summed over chunks of examples and divided by N. With a
:class:`cif_jax.CurvatureSample` the sum runs over the sample only, weighted, and
is divided by the sum of the weights.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

from . import checks as _checks
from . import curvature as _curvature
from .chunks import chunk_sum
from .task import Task


def as_batch_of_one(a):
    return jax.tree_util.tree_map(lambda leaf: leaf[None], a)


def output_hvp(loss_fn, output, target, tangent):
    """``W t`` for one example: the loss Hessian in the outputs times a tangent."""

    def loss_one(o):
        return loss_fn(o[None], as_batch_of_one(target))[0]

    return jax.jvp(jax.grad(loss_one), (output,), (tangent,))[1]


def ggn_matvec_fn(task: Task, *, batch_size: int | None = None, curvature=None):
    """Returns ``mv(v) -> (1/N) sum_i J_i^T W_i J_i v`` (undamped), traceable.

    ``v`` is a flat (p,) vector; vmapping ``mv`` over a block of vectors shares the
    forward pass (it does not depend on ``v``). With ``curvature`` (a validated
    :class:`cif_jax.CurvatureSample`) the weighted mean runs over its examples.
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

    def chunk_product(v, chunk):
        x, y, w = chunk
        outputs, jvp_fn = jax.linearize(lambda fp: task.apply_fn(unravel(fp), x), flat)
        jv = jvp_fn(v)
        wjv = jax.vmap(lambda o, t, tv: output_hvp(task.loss_fn, o, t, tv))(outputs, y, jv)
        if w is not None:
            wjv = wjv * w.reshape(w.shape + (1,) * (wjv.ndim - 1)).astype(wjv.dtype)
        (jt,) = jax.linear_transpose(jvp_fn, flat)(wjv)
        return jt

    def mv(v):
        total = chunk_sum(lambda c: chunk_product(v, c), data, batch_size)
        return total / jnp.asarray(total_weight, total.dtype)

    return mv


def ggn_operator(
    task: Task, *, damping: float, batch_size: int | None = None, curvature=None
) -> lx.FunctionLinearOperator:
    """The damped GGN ``H~ = (1/N) sum_i J_i^T W_i J_i + damping * I`` as a lineax operator.

    Paper eqs. (1)-(2). The operator acts on flat (p,) vectors in
    ``ravel_pytree(params)`` order and is tagged symmetric and positive
    semidefinite, so ``lineax.CG`` accepts it. ``W_i`` is the Hessian of
    ``loss_fn`` in the model outputs, computed by autodiff; for it to be PSD the
    loss must be convex in the outputs (cross-entropy, squared error, ...).

    Args:
        task: the model snapshot and training data.
        damping: lambda > 0.
        batch_size: examples per chunk of each product (None: all at once). Only
            memory and speed depend on it.
        curvature: a :class:`cif_jax.CurvatureSample` to build the GGN from a weighted
            subset of the examples (None: all N, equal weights).

    Returns:
        A ``lineax.FunctionLinearOperator``; ``op.mv(v)`` applies ``H~``. Wrap calls
        in ``jax.jit`` (or use it inside ``lineax.linear_solve``) for speed.
    """
    _checks.task(task)
    lam = _checks.damping(damping)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    curvature = _curvature.check(curvature, task.num_examples, task.dtype)
    return _damped_operator(task, lam, batch_size, curvature)


def _damped_operator(task: Task, lam: float, batch_size, curvature=None):
    mv = ggn_matvec_fn(task, batch_size=batch_size, curvature=curvature)
    flat, _ = ravel_pytree(task.params)
    structure = jax.ShapeDtypeStruct(flat.shape, flat.dtype)

    def damped(v):
        return mv(v) + jnp.asarray(lam, v.dtype) * v

    return lx.FunctionLinearOperator(
        damped, structure, tags=(lx.symmetric_tag, lx.positive_semidefinite_tag)
    )


@eqx.filter_jit
def _apply_damped(task: Task, lam, batch_size, vectors, curvature=None):
    mv = ggn_matvec_fn(task, batch_size=batch_size, curvature=curvature)
    return jax.vmap(mv)(vectors) + jnp.asarray(lam, vectors.dtype) * vectors


@eqx.filter_jit
def apply_undamped(task: Task, batch_size, vectors, curvature=None):
    return jax.vmap(ggn_matvec_fn(task, batch_size=batch_size, curvature=curvature))(vectors)


def apply_ggn(
    task: Task, vectors: Float[Array, "k p"], *, damping: float, batch_size: int | None = None, curvature=None
):
    """``H~ v`` for each row v of ``vectors`` (k, p), jitted; one data pass serves all k.

    ``curvature``: as :func:`ggn_operator`.
    """
    _checks.task(task)
    lam = _checks.damping(damping)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    curvature = _curvature.check(curvature, task.num_examples, task.dtype)
    vectors = jnp.asarray(vectors)
    p = task.num_params
    if vectors.ndim != 2 or vectors.shape[1] != p:
        raise ValueError(f"`vectors` must have shape (k, p) = (k, {p}); got {vectors.shape}.")
    return _apply_damped(task, lam, batch_size, vectors.astype(task.dtype), curvature)
