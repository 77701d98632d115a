"""Building K-FAC and EK-FAC: factor passes over the data, eigendecompositions, the public builders."""

from __future__ import annotations

import time
import warnings

import jax
import jax.numpy as jnp

from ...core.chunks import chunk_sum
from ...core.curvature import weighted_examples
from ...core.task import Task
from ..jacobi import build_jacobi
from ..operator import DampedGGN, check_operator
from .blocks import _HIGHEST, DEFAULT_BATCH_SIZE, KFACPreconditioner, check_damping
from .tagging import _Model, _Untaggable


def _factor_pass(model: _Model, task: Task, batch_size, curvature):
    """Weighted means of A, G per layer and of the diagonal of the other leaves."""
    dtype = task.dtype
    data = weighted_examples(task, curvature, dtype)

    def run(leaf_values, data):
        def example(x, y, w):
            inputs, grads, diag = model.example_factors(task, leaf_values, x, y)
            a_f = [w * jnp.matmul(a.T, a, precision=_HIGHEST) for a in inputs]
            g_f = [w * jnp.einsum("kto,ktj->oj", g, g, precision=_HIGHEST) / g.shape[1] for g in grads]
            return a_f, g_f, w * diag

        total = chunk_sum(lambda c: jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), jax.vmap(example)(*c)),
                          data, batch_size)
        return jax.tree_util.tree_map(lambda s: s / jnp.sum(data[2]), total)

    return jax.jit(run)(model.leaves, data)


def _scaling_pass(model: _Model, task: Task, batch_size, curvature, input_bases, output_bases):
    """EK-FAC's second moments of the per-example, per-output block gradients in the Kronecker eigenbasis."""
    data = weighted_examples(task, curvature, task.dtype)

    def run(leaf_values, data, qa, qg):
        def example(x, y, w):
            inputs, grads, _ = model.example_factors(task, leaf_values, x, y)
            out = []
            for a, g, q_a, q_g in zip(inputs, grads, qa, qg):
                ar = jnp.matmul(a, q_a, precision=_HIGHEST)  # (T, in)
                gr = jnp.einsum("kto,oj->ktj", g, q_g, precision=_HIGHEST)  # (m, T, out)
                d = jnp.einsum("kto,ti->koi", gr, ar, precision=_HIGHEST)  # (m, out, in): Q_G^T D Q_A
                out.append(w * jnp.sum(jnp.square(d), axis=0))
            return out

        total = chunk_sum(lambda c: jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), jax.vmap(example)(*c)),
                          data, batch_size)
        return jax.tree_util.tree_map(lambda s: s / jnp.sum(data[2]), total)

    return jax.jit(run)(model.leaves, data, list(input_bases), list(output_bases))


@jax.jit
def _eigh(m):
    evals, evecs = jnp.linalg.eigh((m + m.T) / 2)
    return jnp.maximum(evals, 0), evecs


def build_kfac(operator: DampedGGN, eigen_corrected: bool):
    """(E)K-FAC of a checked operator's GGN (chunks: its ``batch_size``, else ``DEFAULT_BATCH_SIZE``), damping checked."""
    start = time.perf_counter()
    task, curvature = operator.task, operator.curvature
    batch_size = DEFAULT_BATCH_SIZE if operator.batch_size is None else operator.batch_size
    try:
        model = _Model(task)
        model.check_forward(task)
        layout = model.layout()
    except _Untaggable as err:
        name = "EK-FAC" if eigen_corrected else "K-FAC"
        warnings.warn(
            f"{name} cannot factor this model: {err}. Falling back to the Jacobi preconditioner (the exact GGN "
            f"diagonal). {name} needs dense or convolution layers (a matrix product of the layer input with a "
            "parameter matrix, or a convolution with a parameter kernel: e.g. `nnx.Linear`, `nnx.Conv`, "
            "`cif_jax.workloads.models.Conv2d`).",
            UserWarning,
            stacklevel=3,
        )
        return build_jacobi(operator)
    if model.unfactored:
        warnings.warn(
            f"K-FAC factors {len(model.layers)} layer(s); {len(model.unfactored)} parameter array(s) of two or more "
            f"dimensions ({', '.join(model.unfactored[:5])}{', ...' if len(model.unfactored) > 5 else ''}) are not "
            "used as a plain matrix product in apply_fn (e.g. `lax.conv_general_dilated`, an embedding lookup, a "
            "shared weight) and get a diagonal block.",
            UserWarning,
            stacklevel=3,
        )
    a_f, g_f, diag = jax.block_until_ready(_factor_pass(model, task, batch_size, curvature))
    for name, arrays in (("A", a_f), ("G", g_f), ("diagonal", [diag])):
        if not all(bool(jnp.all(jnp.isfinite(a))) for a in arrays):
            raise ValueError(f"the K-FAC factors ({name}) hold NaN or Inf; check the model snapshot and the data.")
    eig_a = [_eigh(a) for a in a_f]
    eig_g = [_eigh(g) for g in g_f]
    scalings = None
    if eigen_corrected:
        scalings = tuple(_scaling_pass(model, task, batch_size, curvature, [q for _, q in eig_a],
                                       [q for _, q in eig_g]))
    jax.block_until_ready((eig_a, eig_g, scalings))
    pre = KFACPreconditioner(
        input_factors=tuple(a_f),
        output_factors=tuple(g_f),
        input_bases=tuple(q for _, q in eig_a),
        input_eigenvalues=tuple(e for e, _ in eig_a),
        output_bases=tuple(q for _, q in eig_g),
        output_eigenvalues=tuple(e for e, _ in eig_g),
        scalings=scalings,
        diagonal=diag,
        layout=layout,
        layers=tuple(layer["name"] for layer in model.layers),
        num_params=task.num_params,
        fingerprint=operator.fingerprint,
        curvature=operator.describe_curvature(),
        seconds=time.perf_counter() - start,
    )
    check_damping(pre, operator.damping)
    return pre



# ------------------------------------------------------------------------------------------- public API


def kfac_preconditioner(operator: DampedGGN):
    """Builds the K-FAC preconditioner of the undamped GGN (one pass over the data).

    Per layer found in the model (see :mod:`cif_jax.solvers.kfac`), ``A`` from the layer
    inputs and ``G`` from the exact output-Hessian factors propagated to the
    pre-activations; the exact GGN diagonal for the other parameters. In the
    solves, each block is damped by the factored Tikhonov rule with ``pi`` from
    the factors' traces (Martens and Grosse 2015, section 6.3).

    Args:
        operator: a :class:`cif_jax.DampedGGN`: the factors are of its GGN (task and
            curvature sample), in chunks of its ``batch_size`` (64 when it has none:
            memory about ``batch_size * outputs * sum of layer output sizes``); the
            damped blocks are checked to be invertible at its damping in the task's
            dtype (a clear error if not).

    Returns:
        A `KFACPreconditioner`, or, with a warning, a
        :class:`cif_jax.JacobiPreconditioner` when no layer can be factored.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> import cif_jax as cj
        >>> params = {"w": jnp.ones((3, 2)) / 3, "b": jnp.zeros(2)}
        >>> task = cj.Task(lambda p, x: x @ p["w"] + p["b"], optax.softmax_cross_entropy_with_integer_labels,
        ...                params, jnp.arange(12.0).reshape(4, 3) / 10, jnp.array([0, 1, 0, 1]))
        >>> pre = cj.kfac_preconditioner(cj.DampedGGN(task, damping=1e-3))
        >>> pre.layout.shapes  # one block [W^T, b]: 2 outputs x (3 inputs + bias)
        ((2, 4),)
        >>> x = cj.solve_ggn(task, jnp.ones((1, 8)), damping=1e-3, solver=cj.CG(rtol=1e-5, preconditioner=pre))
        >>> bool(x.converged[0])
        True

    References:
        Martens and Grosse, ICML 2015; Grosse and Martens, ICML 2016; Botev, Ritter
        and Barber, ICML 2017 (see :mod:`cif_jax.solvers.kfac`).
    """
    return build_kfac(check_operator(operator), eigen_corrected=False)


def ekfac_preconditioner(operator: DampedGGN):
    """Builds the EK-FAC preconditioner (K-FAC's eigenbasis, eigenvalues re-estimated; two data passes).

    As :func:`kfac_preconditioner`, plus a second pass that measures the GGN's
    diagonal in each block's Kronecker eigenbasis (George et al. 2018, eq. (11));
    the damped block is ``Q (diag(s) + lambda) Q^T``. It also serves as an
    approximate inverse: :func:`ekfac_solve`, :func:`ekfac_influence`.

    Args:
        operator: as :func:`kfac_preconditioner`.

    Returns:
        A `KFACPreconditioner` with ``scalings`` (``kind == "ekfac"``), or a
        :class:`cif_jax.JacobiPreconditioner` with a warning when no layer can be factored.
    """
    return build_kfac(check_operator(operator), eigen_corrected=True)

