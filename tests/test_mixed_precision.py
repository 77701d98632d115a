"""Mixed-precision solves (``product_dtype=``) against dense float64 references.

The float64 problems of tests/_models.py are solved with their GGN products in
float32. Iterative refinement restarts every CG pass from the float64 residual, so
the reported residuals, the stopping rule and the accuracy must be those of a
float64 solve; and with no refinement allowed (``max_restarts=0``) the solve must
stop near float32's reach, which shows that the cheap products were really used.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import (
    LAM,
    NUM_CLUSTERS,
    RHS_BATCH,
    SKETCH_DIM,
    dense_influence,
    dense_solve,
    masks_of,
    mlp_problem,
    random_subsets,
    row_rel_err,
    softmax_problem,
)
from jax.sharding import Mesh

import cif_jax as cj

TIGHT = 1e-10  # far below float32's ~1e-7: only refinement in float64 gets there
#: Solution error <= kappa * residual; kappa(H~) <= ~500 on these problems (LAM = 1e-2).
SOLVE_TOL = 1e-7
RESTARTS = 8  # each refinement gains ~sqrt(eps32) = 3.5e-4: three or four are needed for 1e-10


@pytest.fixture(scope="module")
def mlp():
    return mlp_problem()


def _rhs(problem, num=5, seed=0):  # every solve in blocks of RHS_BATCH: one compiled program
    return np.random.default_rng(seed).normal(size=(num, problem.num_params))


def _dense_residual(problem, rhs, x):
    return np.linalg.norm(rhs - x @ problem.ggn.T, axis=1) / np.linalg.norm(rhs, axis=1)


def test_refinement_reaches_float64_accuracy(mlp):
    rhs = _rhs(mlp)
    out = cj.solve_ggn(mlp.task, rhs, damping=LAM, solver=cj.CG(rtol=TIGHT, max_restarts=RESTARTS, product_dtype=jnp.float32, rhs_batch_size=RHS_BATCH))
    assert out.solutions.dtype == jnp.float64
    assert bool(out.converged.all())
    # The reported residuals are the float64 ones: recomputed here from the dense GGN.
    dense_res = _dense_residual(mlp, rhs, np.asarray(out.solutions))
    assert dense_res.max() <= 1.01 * TIGHT
    np.testing.assert_allclose(np.asarray(out.residuals), dense_res, rtol=1e-3, atol=1e-14)
    assert row_rel_err(out.solutions, dense_solve(mlp.ggn, rhs)) <= SOLVE_TOL


def test_without_refinement_the_cheap_products_stop_near_float32_reach(mlp):
    rhs = _rhs(mlp)
    with pytest.warns(UserWarning, match="did not reach the requested tolerance"):
        out = cj.solve_ggn(mlp.task, rhs, damping=LAM, solver=cj.CG(rtol=TIGHT, max_restarts=0, product_dtype=jnp.float32, rhs_batch_size=RHS_BATCH))
    res = _dense_residual(mlp, rhs, np.asarray(out.solutions))
    # One float32 CG pass asked for sqrt(eps32) = 3.5e-4: far above 1e-10, and reported honestly.
    assert not bool(out.converged.any())
    assert res.min() > 1e-8 and res.max() < 1e-2
    np.testing.assert_allclose(np.asarray(out.residuals), res, rtol=1e-6)


def test_same_dtype_is_plain_cg(mlp):
    rhs = _rhs(mlp)
    plain = cj.solve_ggn(mlp.task, rhs, damping=LAM, solver=cj.CG(rtol=TIGHT, rhs_batch_size=RHS_BATCH))
    same = cj.solve_ggn(mlp.task, rhs, damping=LAM, solver=cj.CG(rtol=TIGHT, product_dtype=jnp.float64, rhs_batch_size=RHS_BATCH))
    np.testing.assert_array_equal(np.asarray(plain.solutions), np.asarray(same.solutions))
    np.testing.assert_array_equal(np.asarray(plain.num_steps), np.asarray(same.num_steps))


def test_with_a_preconditioner(mlp):
    rhs = _rhs(mlp, seed=1)
    out = cj.solve_ggn(mlp.task, rhs, damping=LAM, solver=cj.CG(rtol=TIGHT, max_restarts=RESTARTS, product_dtype="float32", preconditioner="jacobi", rhs_batch_size=RHS_BATCH))
    assert bool(out.converged.all())
    assert row_rel_err(out.solutions, dense_solve(mlp.ggn, rhs)) <= SOLVE_TOL


def test_influence_and_cache(mlp):
    subsets = random_subsets()
    got = cj.influence(mlp.task, subsets, damping=LAM, solver=cj.CG(rtol=TIGHT, max_restarts=RESTARTS, product_dtype=jnp.float32, rhs_batch_size=RHS_BATCH))
    assert row_rel_err(got, dense_influence(mlp, masks_of(subsets))) <= SOLVE_TOL
    kw = dict(num_clusters=NUM_CLUSTERS, sketch_dim=SKETCH_DIM, damping=LAM, key=jax.random.key(3))
    mixed = cj.build_cache(mlp.task, solver=cj.CG(rtol=TIGHT, max_restarts=RESTARTS, rhs_batch_size=RHS_BATCH,
                                                  product_dtype=jnp.float32), **kw)
    assert float(mixed.residuals.max()) <= TIGHT
    want = dense_solve(mlp.ggn, np.asarray(mixed.means))
    assert row_rel_err(mixed.responses, want) <= SOLVE_TOL


def test_on_a_mesh(mlp):
    # The sharded path with a data axis (psum of the products; a "data" axis without an "rhs" axis is
    # used even on one device); more devices: tests/test_distributed.py.
    rhs = _rhs(mlp, seed=2)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    out = cj.solve_ggn(mlp.task, rhs, damping=LAM, solver=cj.CG(rtol=TIGHT, max_restarts=RESTARTS, product_dtype=jnp.float32, rhs_batch_size=RHS_BATCH), mesh=mesh)
    assert bool(out.converged.all())
    assert row_rel_err(out.solutions, dense_solve(mlp.ggn, rhs)) <= SOLVE_TOL


@pytest.mark.parametrize(
    "dtype, error, match",
    [
        (jnp.int32, TypeError, "must be a floating dtype"),
        ("not-a-dtype", TypeError, "must be a floating dtype"),
        (jnp.float64, ValueError, "more precise than the task"),
    ],
)
def test_bad_product_dtype(dtype, error, match):
    task = softmax_problem("float32").task
    rhs = np.ones((1, task.num_params), np.float32)
    for call in (
        lambda: cj.solve_ggn(task, rhs, damping=LAM, solver=cj.CG(product_dtype=dtype)),
        lambda: cj.influence(task, [np.arange(3)], damping=LAM, solver=cj.CG(product_dtype=dtype)),
        lambda: cj.build_cache(task, num_clusters=2, sketch_dim=2, damping=LAM, key=jax.random.key(0),
                               solver=cj.CG(product_dtype=dtype)),
    ):
        with pytest.raises(error, match=match):
            call()


def test_inner_tolerance_is_sqrt_eps():
    from cif_jax.solvers.cg import inner_rtol

    # bfloat16 has 8 significand bits: eps = 2^-7; float32: 2^-23.
    assert inner_rtol(jnp.bfloat16) == pytest.approx(2**-3.5)
    assert inner_rtol(jnp.float32) == pytest.approx(2**-11.5)


def test_too_coarse_products_never_make_the_solution_worse(mlp):
    # bfloat16 products on a stiff system (damping 1e-5: kappa ~ 1e5 against 2^-8 rounding) cannot
    # refine; the solve keeps its best iterate (here x = 0), reports its true residual and warns.
    rhs = _rhs(mlp, seed=3)
    lam = 1e-5
    with pytest.warns(UserWarning, match="did not reach the requested tolerance"):
        out = cj.solve_ggn(mlp.task, rhs, damping=lam, solver=cj.CG(rtol=TIGHT, max_restarts=RESTARTS, product_dtype=jnp.bfloat16, rhs_batch_size=RHS_BATCH))
    h = mlp.ggn + (lam - LAM) * np.eye(mlp.num_params)
    res = np.linalg.norm(rhs - np.asarray(out.solutions) @ h.T, axis=1) / np.linalg.norm(rhs, axis=1)
    assert res.max() <= 1.0 + 1e-12
    np.testing.assert_allclose(np.asarray(out.residuals), res, rtol=1e-6, atol=1e-12)
