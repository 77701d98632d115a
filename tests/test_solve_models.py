"""Solves on a real CNN snapshot: single and batched right-hand sides converge.

Guards against a failure seen on jaxlib 0.10.2 XLA:CPU, where LeNet-5's max-pool
written as a 6-D reshape gave wrong GGN products inside CG's while-loop for a
block of one vector (CG returned NaN after one step). Reference: the residual is
recomputed here from ``cj.DampedGGN.apply`` outside any loop.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import cif_jax as cj
from cif_jax.workloads.models import build_model


@pytest.fixture(scope="module")
def task():
    digits = load_digits()
    x = (digits.images[:96] / 16.0).astype(np.float32)[..., None]
    y = digits.target[:96].astype(np.int32)
    model = build_model("lenet5", in_shape=(8, 8, 1), num_classes=10, seed=0)
    return cj.Task.from_nnx(model, optax.softmax_cross_entropy_with_integer_labels, x, y)


@pytest.mark.parametrize("num_rhs", [1, 3])
def test_lenet_solves_converge_to_true_residual(task, num_rhs):
    rhs = cj.per_example_grads(task)[:num_rhs]
    result = cj.solve_ggn(task, rhs, damping=1e-2, solver=cj.CG(rtol=1e-4, max_steps=500))
    assert result.solutions.dtype == jnp.float32
    assert bool(jnp.isfinite(result.solutions).all())
    assert bool(result.converged.all())
    # Independent check of the reported residual: H~ x recomputed by a plain product.
    hx = cj.DampedGGN(task, damping=1e-2).apply(result.solutions)
    rho = jnp.linalg.norm(rhs - hx, axis=1) / jnp.linalg.norm(rhs, axis=1)
    # float32 products: allow rounding of order 1e-6 around the 1e-4 target.
    assert float(rho.max()) <= 1e-4 * 1.05
    np.testing.assert_allclose(np.asarray(result.residuals), np.asarray(rho), rtol=0.05, atol=2e-6)
