"""Per-example gradients and the matrix-free damped GGN against dense references.

The references (tests/_models.py) never go through cif_jax: gradients come from
``jax.grad`` of a one-example loss in a Python loop, and the dense GGN
``(1/N) sum_i J_i^T W_i J_i + lambda I`` from closed-form or ``jax.jacfwd``
Jacobians and closed-form output Hessians.
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from _models import (
    BATCH,
    LAM,
    PROBLEMS,
    N,
    get_problem,
    masks_of,
    output_grads,
    random_subsets,
    rel_err,
    row_rel_err,
    softmax_problem,
)

import cif_jax as cj

TIGHT = 1e-12  # float64, no iteration involved: rounding only (measured ~1e-16)


@pytest.fixture(scope="module", params=PROBLEMS)
def problem(request):
    return get_problem(request.param)


def test_references_agree_by_chain_rule(problem):
    # g_i = J_i^T dloss/doutput: checks the reference Jacobians (closed form or
    # jacfwd) and the reference gradients (Python loop) against each other, so
    # that neither reference is itself wrong.
    chained = np.einsum("nqp,nq->np", problem.jac, output_grads(problem))
    assert rel_err(chained, problem.grads) < TIGHT
    # The dense GGN is symmetric positive definite with smallest eigenvalue >= lambda.
    assert np.allclose(problem.ggn, problem.ggn.T, rtol=0, atol=1e-15)
    assert np.linalg.eigvalsh(problem.ggn).min() >= LAM * (1 - 1e-12)


def test_per_example_grads_match_python_loop(problem):
    got = cj.per_example_grads(problem.task)
    assert got.shape == (N, problem.num_params)
    assert got.dtype == jnp.float64
    assert row_rel_err(got, problem.grads) < TIGHT


def test_per_example_grads_do_not_depend_on_batch_size(problem):
    full = cj.per_example_grads(problem.task)
    chunked = cj.per_example_grads(problem.task, batch_size=BATCH)  # 48 = 6 * 7 + 6: a short last chunk
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), rtol=1e-13, atol=1e-15)


def test_lineax_operator_matches_dense(problem, getkey):
    op = cj.DampedGGN(problem.task, damping=LAM).as_lineax()
    assert lx.is_symmetric(op) and lx.is_positive_semidefinite(op)
    assert op.in_structure().shape == (problem.num_params,)
    # Column by column over the basis vectors, as kfac-jax's estimator test does,
    # and on a few random vectors.
    basis = jnp.eye(problem.num_params)
    vectors = jnp.concatenate([basis, jax.random.normal(getkey(), (3, problem.num_params))])
    got = jax.jit(jax.vmap(lambda v: op.mv(v)))(vectors)
    assert got.dtype == jnp.float64
    assert rel_err(got[: problem.num_params], problem.ggn) < TIGHT
    assert row_rel_err(got[problem.num_params :], np.asarray(vectors[problem.num_params :]) @ problem.ggn) < TIGHT


def test_apply_builds_dense_matrix(problem):
    eye = jnp.eye(problem.num_params)
    got = cj.DampedGGN(problem.task, damping=LAM).apply(eye)
    assert rel_err(got, problem.ggn) < TIGHT
    chunked = cj.DampedGGN(problem.task, damping=LAM, batch_size=BATCH).apply(eye)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(got), rtol=1e-12, atol=1e-14)


def test_subset_gradient_sums_and_means(problem):
    subsets = random_subsets()
    mask = masks_of(subsets).astype(np.float64)
    want = mask @ problem.grads
    assert row_rel_err(cj.subset_gradient_sums(problem.task, subsets), want) < TIGHT
    mean = cj.mean_subset_gradients(problem.task, subsets)
    assert row_rel_err(mean, want / mask.sum(axis=1, keepdims=True)) < TIGHT


def test_float32_task_stays_float32():
    p32, p64 = softmax_problem("float32"), softmax_problem("float64")
    # The float32 problem's references are float64 computations on its rounded values.
    assert rel_err(p32.ggn, p64.ggn) < 1e-6
    task = p32.task
    grads = cj.per_example_grads(task)
    assert grads.dtype == jnp.float32
    assert row_rel_err(grads, p32.grads) < 1e-5

    v = jnp.asarray(np.random.default_rng(0).normal(size=p32.num_params), jnp.float32)
    op = cj.DampedGGN(task, damping=LAM).as_lineax()
    out = jax.jit(lambda u: op.mv(u))(v)
    assert out.dtype == jnp.float32
    assert rel_err(out, p32.ggn @ np.asarray(v, np.float64)) < 1e-5

    h = cj.DampedGGN(task, damping=LAM).apply(jnp.eye(p32.num_params, dtype=jnp.float32))
    assert h.dtype == jnp.float32
    assert rel_err(h, p32.ggn) < 1e-5
    # float64 vectors are cast to the task's dtype.
    assert cj.DampedGGN(task, damping=LAM).apply(jnp.eye(p32.num_params)).dtype == jnp.float32
