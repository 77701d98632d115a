"""LiSSA (cj.lissa) against dense float64 solves on convex multinomial logistic regression.

References: the dense damped GGN of tests/_models.py (closed-form Jacobians and
output Hessians) and ``np.linalg.solve``; for a curvature sample, the dense
weighted subset GGN built from the same explicit factors.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import LAM, N, dense_solve, row_rel_err, softmax_problem

import cif_jax as cj


@pytest.fixture(scope="module")
def lr():
    return softmax_problem()


def _rhs(problem, num=3, seed=0):
    return np.random.default_rng(seed).normal(size=(num, problem.num_params))


def _lambda_max(h):
    return float(np.linalg.eigvalsh(h).max())


def _op(problem, **kwargs):
    """The damped GGN at LAM: LiSSA's damping, pool (curvature) and chunks (batch_size)."""
    return cj.DampedGGN(problem.task, damping=LAM, **kwargs)


def _subset_ggn(problem, idx, w):
    sub = np.einsum("n,nqi,nqr,nrj->ij", w, problem.jac[idx], problem.out_hess[idx], problem.jac[idx]) / w.sum()
    return sub + LAM * np.eye(problem.num_params)


def test_whole_pool_converges_to_the_dense_solve(lr):
    rhs = _rhs(lr)
    s = 1.05 * _lambda_max(lr.ggn)
    # Error <= (1 - lambda/s)^(J+1) ||x*||: J = (s/lambda) ln(1e10) steps reach 1e-10.
    depth = int(np.ceil(s / LAM * np.log(1e10)))
    out = cj.lissa(_op(lr), rhs, scale=s, depth=depth, key=jax.random.key(0))
    assert row_rel_err(out.solutions, dense_solve(lr.ggn, rhs)) <= 1e-8
    dense_res = np.linalg.norm(rhs - np.asarray(out.solutions) @ lr.ggn.T, axis=1) / np.linalg.norm(rhs, axis=1)
    np.testing.assert_allclose(np.asarray(out.residuals), dense_res, rtol=1e-6, atol=1e-14)
    np.testing.assert_allclose(np.asarray(out.pool_residuals), np.asarray(out.residuals))
    assert np.all(np.asarray(out.num_steps) == depth)
    assert float(out.spread.max()) == 0.0


def test_tolerance_stops_early_and_auto_scale(lr):
    rhs = _rhs(lr, seed=1)
    out = cj.lissa(_op(lr), rhs, scale="auto", depth=100_000, tol=1e-13, key=jax.random.key(1))
    lmax = _lambda_max(lr.ggn)
    # Power iteration converges from below: s within [1.5 * 0.99 lambda_max, 1.5 lambda_max].
    assert 1.5 * 0.99 * lmax <= float(out.scale) <= 1.5 * lmax * (1 + 1e-9)
    assert int(out.num_steps.max()) < 100_000
    assert float(out.last_increment.max()) <= 1e-13
    assert row_rel_err(out.solutions, dense_solve(lr.ggn, rhs)) <= 1e-8


def test_minibatch_error_falls_with_repeats(lr):
    rhs = _rhs(lr, num=2, seed=2)
    want = dense_solve(lr.ggn, rhs)
    s = 3.0 * _lambda_max(lr.ggn)  # margin: minibatch operators have larger top eigenvalues
    kw = dict(scale=s, depth=600, batch_size=8, key=jax.random.key(2))
    one = cj.lissa(_op(lr), rhs, repeats=1, **kw)
    many = cj.lissa(_op(lr), rhs, repeats=16, **kw)
    err_one, err_many = row_rel_err(one.solutions, want), row_rel_err(many.solutions, want)
    # Independent unbiased estimates: averaging 16 cuts the error about 4x; ask for 2x.
    assert err_many < 0.5 * err_one
    assert float(many.spread.min()) > 0


def test_fixed_subset_equals_its_dense_solve_and_cg(lr):
    idx = np.arange(0, N, 2)
    w = np.linspace(0.5, 1.5, idx.size)
    sample = cj.CurvatureSample(jnp.asarray(idx), jnp.asarray(w))
    h_sub = _subset_ggn(lr, idx, w)
    rhs = _rhs(lr, seed=3)
    s = 1.05 * _lambda_max(h_sub)
    depth = int(np.ceil(s / LAM * np.log(1e10)))
    out = cj.lissa(_op(lr, curvature=sample), rhs, scale=s, depth=depth, key=jax.random.key(3))
    want = dense_solve(h_sub, rhs)
    assert row_rel_err(out.solutions, want) <= 1e-8
    cg = cj.solve_ggn(lr.task, rhs, damping=LAM, solver=cj.CG(rtol=1e-12), curvature=sample)
    assert row_rel_err(out.solutions, cg.solutions) <= 1e-8
    # Pool residual is of the subset operator; the full operator's is not small.
    assert float(out.pool_residuals.max()) <= 1e-8
    full_res = np.linalg.norm(rhs - np.asarray(out.solutions) @ lr.ggn.T, axis=1) / np.linalg.norm(rhs, axis=1)
    np.testing.assert_allclose(np.asarray(out.residuals), full_res, rtol=1e-6)


def test_small_scale_raises(lr):
    rhs = _rhs(lr, num=1)
    with pytest.raises(cj.LissaDivergenceError, match="Raise `scale`"):
        cj.lissa(_op(lr), rhs, scale=0.45 * _lambda_max(lr.ggn), depth=500, key=jax.random.key(4))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(scale=0.0), ValueError, "`scale` must be finite and > 0"),
        (dict(scale="big"), ValueError, "'auto'"),
        (dict(depth=0), ValueError, "`depth` must be at least 1"),
        (dict(repeats=0), ValueError, "`repeats` must be at least 1"),
        (dict(batch_size=N + 1), ValueError, "exceeds the pool"),
        (dict(repeats=2), ValueError, "needs minibatches"),
        (dict(damping=0.0), ValueError, "`damping` must be finite and > 0"),
        (dict(tol=-1.0), ValueError, "`tol` must be finite and >= 0"),
        (dict(rhs=np.ones((2, 3))), ValueError, "must have shape"),
        (dict(rhs=np.full((1, 18), np.nan)), ValueError, "NaN or Inf"),
        (dict(key=3), TypeError, "PRNG key"),
    ],
)
def test_bad_input(lr, kwargs, error, match):
    base = dict(rhs=np.ones((1, lr.num_params)), damping=LAM, scale=1.0, depth=5, key=jax.random.key(0))
    base.update(kwargs)
    rhs, damping = base.pop("rhs"), base.pop("damping")
    with pytest.raises(error, match=match):  # a bad damping is refused by the operator, before lissa
        cj.lissa(cj.DampedGGN(lr.task, damping=damping), rhs, **base)


def test_lissa_takes_an_operator(lr):
    with pytest.raises(TypeError, match="DampedGGN"):
        cj.lissa(lr.task, np.ones((1, lr.num_params)), scale=1.0, depth=5, key=jax.random.key(0))


# -- as the solver of influence and build_cache ------------------------------------------------


def _deep_solver(problem, key=5):
    s = 1.05 * _lambda_max(problem.ggn)
    return cj.LiSSA(depth=int(np.ceil(s / LAM * np.log(1e10))), scale=s, key=jax.random.key(key))


def test_influence_and_cache_with_lissa(lr, tmp_path):
    from _models import dense_influence, masks_of, random_subsets

    solver = _deep_solver(lr)
    subsets = random_subsets()
    solver = dataclasses.replace(solver, rtol=1e-9)
    got = cj.influence(lr.task, subsets, damping=LAM, solver=solver)
    assert row_rel_err(got, dense_influence(lr, masks_of(subsets))) <= 1e-8
    cache = cj.build_cache(lr.task, num_clusters=4, sketch_dim=3, damping=LAM, key=jax.random.key(0),
                           solver=solver)
    assert row_rel_err(cache.responses, dense_solve(lr.ggn, np.asarray(cache.means))) <= 1e-8
    assert cache.solver.startswith("lissa(") and f"depth={solver.depth}" in cache.solver
    assert float(cache.residuals.max()) <= 1e-9
    path = tmp_path / "lissa.npz"
    cj.save_cache(path, cache)
    assert cj.load_cache(path, task=lr.task).solver == cache.solver


def test_shallow_lissa_warns_and_stores_its_residuals(lr):
    solver = cj.LiSSA(depth=20, scale=1.05 * _lambda_max(lr.ggn), key=jax.random.key(0))
    with pytest.warns(UserWarning, match="LiSSA solves did not reach"):
        cache = cj.build_cache(lr.task, num_clusters=4, sketch_dim=3, damping=LAM, key=jax.random.key(0),
                               solver=solver)
    dense_res = (np.linalg.norm(np.asarray(cache.means) - np.asarray(cache.responses) @ lr.ggn.T, axis=1)
                 / np.linalg.norm(np.asarray(cache.means), axis=1))
    np.testing.assert_allclose(np.asarray(cache.residuals), dense_res, rtol=1e-6)
    assert dense_res.min() > 1e-4  # far from converged: the bound's solver term must see it


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(solver="lissa"), TypeError, "`solver` must be None or a solver object"),
        (dict(mesh="cpu"), TypeError, "`mesh` must be a `jax.sharding.Mesh`"),
    ],
)
def test_bad_solver_settings(lr, kwargs, error, match):
    kw = dict(solver=cj.LiSSA(depth=5, key=jax.random.key(0)), damping=LAM)
    kw.update(kwargs)
    with pytest.raises(error, match=match):
        cj.influence(lr.task, [np.arange(3)], **kw)
    with pytest.raises(error, match=match):
        cj.build_cache(lr.task, num_clusters=2, sketch_dim=2, key=jax.random.key(0), **kw)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(depth=0), "`LiSSA.depth` must be at least 1"), (dict(scale=-1.0), "`LiSSA.scale` must be"),
     (dict(scale="max"), "`LiSSA.scale` must be"), (dict(repeats=2), "needs minibatches")],
)
def test_bad_lissa_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cj.LiSSA(**{"depth": 5, "key": jax.random.key(0), **kwargs})


def _residual_check_scratch(problem, num, chunk):
    from cif_jax.solvers import lissa as lissa_mod

    rhs = jnp.asarray(_rhs(problem, num=num), problem.task.dtype)
    idx, w = jnp.arange(0, N, 2), jnp.ones(N // 2, problem.task.dtype)
    lam = jnp.asarray(LAM, problem.task.dtype)
    fn = jax.jit(lambda b: lissa_mod._residuals(problem.task, b, b, idx, w, lam, chunk))
    try:
        mem = fn.lower(rhs).compile().memory_analysis()
    except Exception as err:  # some jax versions and backends raise instead of returning None
        pytest.skip(f"no memory analysis on this backend: {err}")
    if mem is None or not mem.temp_size_in_bytes:
        pytest.skip("this backend reports no scratch figure")
    return mem.temp_size_in_bytes


def test_residual_check_scratch_does_not_grow_with_the_number_of_systems(lr, xla_optimized):
    # The check runs one system at a time: its scratch is one product's (a chunk's outputs and a few
    # p-vectors) plus the (Q, p) inputs it reads, whatever Q; hence the Q p 8-byte slack. Vmapped over Q
    # it held Q tangents of every chunk: 3.7 kB -> 25.6 kB here (about 7x), where this allows 2.6x.
    one, many = _residual_check_scratch(lr, 1, 16), _residual_check_scratch(lr, 16, 16)
    assert many <= 2 * one + 16 * lr.num_params * 8, (one, many)
