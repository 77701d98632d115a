"""The Jacobi preconditioner: the exact diagonal of the GGN, built in one pass.

``diag(GGN) = (1/N) sum_i sum_a (J_i^T e_a) * (J_i^T W_i e_a)`` (elementwise): one
vector-Jacobian product per example and model output. The preconditioner itself
(:class:`cif_jax.JacobiPreconditioner`) lives with the interface in
:mod:`cif_jax.solvers.precondition`.
"""

from __future__ import annotations

import time

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ..core.chunks import chunk_sum
from ..core.curvature import weighted_examples
from ..core.ggn import as_batch_of_one
from ..core.task import Task
from .operator import DampedGGN, check_operator
from .precondition import JacobiPreconditioner


def jacobi_batch(batch_size):
    """Examples per chunk of a diagonal or K-FAC pass: ``batch_size``, or 64 when it is None."""
    return 64 if batch_size is None else batch_size


@eqx.filter_jit
def _ggn_diagonal(task: Task, batch_size, curvature):
    flat, unravel = ravel_pytree(task.params)
    data = weighted_examples(task, curvature, flat.dtype)
    one = as_batch_of_one

    def example(x, y, w):
        out, vjp_fn = jax.vjp(lambda fp: task.apply_fn(unravel(fp), one(x))[0], flat)
        m = out.size

        def loss_one(o):
            return task.loss_fn(o.reshape(out.shape)[None], one(y))[0]

        hess = jax.hessian(loss_one)(out.reshape(-1)).reshape(m, m)
        # diag(J^T W J) = sum_a (J^T e_a) * (J^T W e_a): m vector-Jacobian products and an
        # (m, m) x (m, p) product. (A square root W = L L^T by `eigh` did the same with a
        # LAPACK call per example, which deadlocked XLA:CPU on jaxlib 0.10.2 for one chunk
        # of 512 examples followed by a short chunk of 288.)
        cols = jax.vmap(lambda c: vjp_fn(c.reshape(out.shape))[0])(jnp.eye(m, dtype=out.dtype))  # (m, p): J^T e_a
        weighted = jnp.matmul((hess + hess.T) / 2, cols, precision=jax.lax.Precision.HIGHEST)
        return w * jnp.sum(cols * weighted, axis=0)

    def chunk(c):
        return jnp.sum(jax.vmap(example)(*c), axis=0)

    total = chunk_sum(chunk, data, batch_size)
    return total / jnp.sum(data[2])


def build_jacobi(operator: DampedGGN) -> JacobiPreconditioner:
    """The Jacobi preconditioner of a checked operator (chunks: its ``batch_size``, else :func:`jacobi_batch`)."""
    start = time.perf_counter()
    diag = jax.block_until_ready(_ggn_diagonal(operator.task, jacobi_batch(operator.batch_size),
                                               operator.curvature))
    if not bool(jnp.all(jnp.isfinite(diag))):
        raise ValueError("the GGN diagonal holds NaN or Inf; check the model snapshot and the data.")
    pre = JacobiPreconditioner(
        diagonal=diag,
        fingerprint=operator.fingerprint,
        curvature=operator.describe_curvature(),
        seconds=time.perf_counter() - start,
    )
    pre.check_damping(operator.damping)
    return pre


def jacobi_preconditioner(operator: DampedGGN) -> JacobiPreconditioner:
    """Builds the Jacobi (diagonal GGN) preconditioner, exactly.

    ``diag(GGN) = (1/N) sum_i sum_a (J_i^T e_a) * (J_i^T W_i e_a)``: one
    vector-Jacobian product per example and model output, so it costs about
    (number of outputs) per-example gradient passes.

    Args:
        operator: a :class:`cif_jax.DampedGGN`: the diagonal is its GGN's (task and
            curvature sample), in chunks of its ``batch_size`` (64 when it has none:
            memory is about ``batch_size * outputs * p``).

    Returns:
        A `JacobiPreconditioner`.

    Raises:
        ValueError: when the damped diagonal is singular to working precision at the
            operator's damping.
    """
    return build_jacobi(check_operator(operator))
