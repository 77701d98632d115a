"""Preconditioners (Nystrom, Jacobi) and curvature samples against dense references.

References come from tests/_models.py: the dense GGN from explicit Jacobians and
output Hessians, dense solves by ``np.linalg.solve``. A preconditioner may change
the number of CG iterations only: every solution is compared with the dense one
at the same tolerance as the plain path.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import (
    BATCH,
    LAM,
    NUM_CLUSTERS,
    PROBLEMS,
    RHS_BATCH,
    RTOL,
    SKETCH_DIM,
    N,
    cache_for,
    dense_solve,
    get_problem,
    linear_apply,
    masks_of,
    mlp_problem,
    random_subsets,
    row_rel_err,
    softmax_problem,
)

import cif_jax as cj

SOLVE_TOL = 1e-9  # as tests/test_influence_cache.py: RTOL = 1e-12 on condition numbers <= ~500


@pytest.fixture(scope="module", params=PROBLEMS)
def problem(request):
    return get_problem(request.param)


@pytest.fixture(scope="module")
def mlp():
    return mlp_problem()


def _undamped(problem):
    return problem.ggn - LAM * np.eye(problem.num_params)


def _sample_ggn(problem, idx, w):
    """The weighted subset GGN ``sum_i w_i J_i^T W_i J_i / sum w`` from the explicit factors."""
    return np.einsum("n,nqi,nqr,nrj->ij", w, problem.jac[idx], problem.out_hess[idx], problem.jac[idx]) / w.sum()


SAMPLE_IDX = np.arange(1, N, 3)
SAMPLE_W = np.linspace(0.5, 2.0, SAMPLE_IDX.size)


def _sample():
    return cj.CurvatureSample(jnp.asarray(SAMPLE_IDX), jnp.asarray(SAMPLE_W))


def _op(task, **kwargs):
    """The damped GGN at LAM (chunks, curvature as given)."""
    return cj.DampedGGN(task, damping=LAM, **kwargs)


# -- Jacobi -------------------------------------------------------------------------------


def test_jacobi_diagonal_is_the_dense_diagonal(problem):
    pre = cj.jacobi_preconditioner(_op(problem.task, batch_size=BATCH))
    want = np.diag(_undamped(problem))
    # Sums of N products of O(1) terms in float64: rounding ~1e-16 relative.
    np.testing.assert_allclose(np.asarray(pre.diagonal), want, rtol=1e-12, atol=1e-15)
    # The chunking leaves it unchanged.
    whole = cj.jacobi_preconditioner(_op(problem.task, batch_size=N))  # all N examples in one chunk
    np.testing.assert_allclose(np.asarray(whole.diagonal), want, rtol=1e-12, atol=1e-15)


def test_jacobi_on_a_curvature_sample(mlp):
    pre = cj.jacobi_preconditioner(_op(mlp.task, batch_size=BATCH, curvature=_sample()))
    want = np.diag(_sample_ggn(mlp, SAMPLE_IDX, SAMPLE_W))
    np.testing.assert_allclose(np.asarray(pre.diagonal), want, rtol=1e-12, atol=1e-15)
    assert pre.curvature.startswith(f"sample:{SAMPLE_IDX.size}:")


# -- Nystrom ------------------------------------------------------------------------------


def _approx(pre):
    u = np.asarray(pre.basis)
    return u.T @ np.diag(np.asarray(pre.eigenvalues)) @ u


def test_full_rank_nystrom_reproduces_the_ggn(problem):
    p = problem.num_params
    pre = cj.nystrom_preconditioner(_op(problem.task, batch_size=BATCH), key=jax.random.key(0), rank=p,
                                    rhs_batch_size=p)
    g = _undamped(problem)
    # With r = p the sketch spans everything; only the shift nu ~ sqrt(p) eps ||Y|| remains.
    assert np.abs(_approx(pre) - g).max() < 1e-12 * np.abs(g).max()
    np.testing.assert_allclose(np.asarray(pre.eigenvalues), np.linalg.eigvalsh(g)[::-1], atol=1e-12)
    assert pre.rank == p
    assert pre.num_products == p + 10


def test_low_rank_nystrom_is_below_the_ggn_and_its_error_is_estimated(mlp):
    pre = cj.nystrom_preconditioner(_op(mlp.task, batch_size=BATCH), key=jax.random.key(1), rank=10,
                                    rhs_batch_size=RHS_BATCH, error_iters=30)
    u = np.asarray(pre.basis)
    np.testing.assert_allclose(u @ u.T, np.eye(10), atol=1e-12)
    e = _undamped(mlp) - _approx(pre)
    evals = np.linalg.eigvalsh(e)
    assert evals[0] > -1e-12  # GGN - Nystrom is PSD (the Nystrom approximation never overshoots)
    true = evals[-1]
    est = float(pre.error_estimate)
    # Power iteration on a PSD matrix: a Rayleigh-type lower estimate, close after 30 steps.
    assert est <= true * (1 + 1e-10)
    assert est >= 0.5 * true
    want_kappa = (float(pre.eigenvalues[-1]) + LAM + est) / LAM
    assert pre.condition_estimate(LAM) == pytest.approx(want_kappa, rel=1e-12)


def test_adaptive_rank_stops_at_the_target_or_the_cap(mlp):
    op = _op(mlp.task, batch_size=BATCH)  # the rule's damping is the operator's, LAM
    pre = cj.nystrom_preconditioner(
        op, key=jax.random.key(2), rank="auto", initial_rank=4, condition_target=5.0, max_rank=mlp.num_params,
        rhs_batch_size=4,
    )
    assert pre.condition_estimate(LAM) <= 5.0
    assert pre.rank in (4, 8, 16, 32, mlp.num_params)
    # The rule stopped at the first rank that met it: the previous rank (same key, same
    # columns, so the same nested sketch) did not.
    if pre.rank > 4:
        smaller = cj.nystrom_preconditioner(op, key=jax.random.key(2), rank="auto", initial_rank=4,
                                            max_rank=pre.rank // 2, condition_target=5.0, rhs_batch_size=4)
        assert smaller.rank == pre.rank // 2
        assert smaller.condition_estimate(LAM) > 5.0
    capped = cj.nystrom_preconditioner(op, key=jax.random.key(2), rank="auto", initial_rank=4, max_rank=6,
                                       condition_target=1.0001, rhs_batch_size=4)
    assert capped.rank == 6
    assert capped.num_products == 4 + 10 + 2 + 10  # the second round reuses the first round's 4 products


def test_inverse_matches_the_dense_formula(mlp):
    from cif_jax.solvers.precondition import inverse_fn

    pre = cj.nystrom_preconditioner(_op(mlp.task, batch_size=BATCH), key=jax.random.key(3), rank=12,
                                    rhs_batch_size=4)
    u, s = np.asarray(pre.basis), np.asarray(pre.eigenvalues)
    p = mlp.num_params
    # Frangella et al. eq. (5.3), for the matrix GGN + LAM I: P^{-1} = (s_r + lam) U (S + lam)^{-1} U^T + I - U U^T.
    pinv = (s[-1] + LAM) * u.T @ np.diag(1 / (s + LAM)) @ u + np.eye(p) - u.T @ u
    r = np.random.default_rng(0).normal(size=(3, p))
    got = np.asarray(inverse_fn(pre, LAM)(jnp.asarray(r)))
    np.testing.assert_allclose(got, r @ pinv.T, rtol=1e-12, atol=1e-12)


# -- solves with preconditioners ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["jacobi", "nystrom-10", "nystrom-full"])
def test_preconditioned_solves_match_dense(mlp, kind):
    problem = mlp
    task = problem.task
    if kind == "jacobi":
        pre = "jacobi"  # built inside solve_ggn; the built object is checked in test_influence_and_cache_...
    else:
        rank = problem.num_params if kind == "nystrom-full" else 10
        pre = cj.nystrom_preconditioner(_op(task, batch_size=BATCH), key=jax.random.key(0), rank=rank,
                                        rhs_batch_size=RHS_BATCH)
    rhs = problem.grads[:5]
    want = dense_solve(problem.ggn, rhs)
    plain = cj.solve_ggn(task, jnp.asarray(rhs), damping=LAM, solver=cj.CG(rtol=RTOL, rhs_batch_size=RHS_BATCH, preconditioner=None), batch_size=BATCH)
    got = cj.solve_ggn(task, jnp.asarray(rhs), damping=LAM, solver=cj.CG(rtol=RTOL, rhs_batch_size=RHS_BATCH, preconditioner=pre), batch_size=BATCH)
    assert row_rel_err(got.solutions, want) < SOLVE_TOL
    assert bool(got.converged.all())
    assert float(got.residuals.max()) <= RTOL
    if kind == "nystrom-full":
        # The preconditioned matrix is the identity up to the shift: one or two steps.
        assert int(got.num_steps.max()) <= 3
    if kind == "nystrom-10":
        assert int(got.num_steps.max()) < int(plain.num_steps.max())


def test_influence_and_cache_with_a_shared_preconditioner(mlp):
    task = mlp.task
    pre = cj.nystrom_preconditioner(_op(task, batch_size=BATCH), key=jax.random.key(4), rank=20, rhs_batch_size=4)
    subsets = random_subsets()
    want = dense_solve(mlp.ggn, masks_of(subsets).astype(np.float64) @ mlp.grads) / N
    got = cj.influence_solve(task, subsets, damping=LAM, solver=cj.CG(rtol=RTOL, preconditioner=pre), batch_size=BATCH)
    assert row_rel_err(got.solutions, want) < SOLVE_TOL
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="one cluster holds", category=UserWarning)
        kwargs = dict(num_clusters=NUM_CLUSTERS, sketch_dim=SKETCH_DIM, damping=LAM, key=jax.random.key(0))
        plain = cache_for("mlp")  # the suite's shared cache, built with these settings and no preconditioner
        fast = cj.build_cache(task, solver=cj.CG(rtol=RTOL, preconditioner=pre), **kwargs)
        jac = cj.build_cache(task, solver=cj.CG(rtol=RTOL, preconditioner="jacobi"), **kwargs)
    assert row_rel_err(fast.responses, plain.responses) < SOLVE_TOL
    assert row_rel_err(jac.responses, plain.responses) < SOLVE_TOL
    assert int(fast.num_steps.sum()) < int(plain.num_steps.sum())
    assert "preconditioner" in jac.timing and "preconditioner" not in fast.timing
    assert plain.curvature == "full"


# -- curvature samples --------------------------------------------------------------------


def test_operator_on_a_curvature_sample_is_the_weighted_subset_ggn(mlp):
    v = np.random.default_rng(1).normal(size=(3, mlp.num_params))
    want = v @ (_sample_ggn(mlp, SAMPLE_IDX, SAMPLE_W) + LAM * np.eye(mlp.num_params)).T
    got = _op(mlp.task, batch_size=BATCH, curvature=_sample()).apply(jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-14)
    op = _op(mlp.task, curvature=_sample()).as_lineax()
    np.testing.assert_allclose(np.asarray(op.mv(jnp.asarray(v[0]))), want[0], rtol=1e-12, atol=1e-14)
    # All N examples with equal weights is the full operator.
    full = cj.CurvatureSample(jnp.arange(N), jnp.full(N, 3.0))
    got = _op(mlp.task, batch_size=BATCH, curvature=full).apply(jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(got), v @ mlp.ggn.T, rtol=1e-12, atol=1e-14)


def test_influence_and_cache_on_a_curvature_sample(mlp):
    h = _sample_ggn(mlp, SAMPLE_IDX, SAMPLE_W) + LAM * np.eye(mlp.num_params)
    subsets = random_subsets()
    want = dense_solve(h, masks_of(subsets).astype(np.float64) @ mlp.grads) / N
    got = cj.influence(mlp.task, subsets, damping=LAM, solver=cj.CG(rtol=RTOL), batch_size=BATCH, curvature=_sample())
    assert row_rel_err(got, want) < SOLVE_TOL
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="one cluster holds", category=UserWarning)
        cache = cj.build_cache(mlp.task, num_clusters=NUM_CLUSTERS, sketch_dim=SKETCH_DIM, damping=LAM,
                               key=jax.random.key(0), solver=cj.CG(rtol=RTOL, preconditioner="jacobi"), batch_size=BATCH, curvature=_sample())
    assert row_rel_err(cache.responses, dense_solve(h, np.asarray(cache.means))) < SOLVE_TOL
    assert cache.curvature == cj.core.curvature.describe(_sample())
    # The identifier depends on the sample, not on the weights' scale.
    scaled = cj.CurvatureSample(jnp.asarray(SAMPLE_IDX), jnp.asarray(4 * SAMPLE_W))
    assert cj.core.curvature.describe(scaled) == cache.curvature
    other = cj.CurvatureSample(jnp.asarray(SAMPLE_IDX[:-1]), jnp.asarray(SAMPLE_W[:-1]))
    assert cj.core.curvature.describe(other) != cache.curvature


def test_curvature_sample_survives_save_and_load(mlp, tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="one cluster holds", category=UserWarning)
        cache = cj.build_cache(mlp.task, num_clusters=NUM_CLUSTERS, sketch_dim=SKETCH_DIM, damping=LAM,
                               key=jax.random.key(0), solver=cj.CG(rtol=1e-6), batch_size=BATCH, curvature=_sample())
    cj.save_cache(tmp_path / "c.npz", cache)
    assert cj.load_cache(tmp_path / "c.npz", task=mlp.task).curvature == cache.curvature


def test_uniform_sample_draws_distinct_indices():
    s = cj.uniform_sample(100, size=30, key=jax.random.key(0))
    idx = np.asarray(s.indices)
    assert idx.shape == (30,) and np.unique(idx).size == 30 and idx.min() >= 0 and idx.max() < 100
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.asarray(s.weights), 1.0)
    with pytest.raises(ValueError, match="exceeds"):
        cj.uniform_sample(10, size=11, key=jax.random.key(0))


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sample, match",
    [
        (cj.CurvatureSample(jnp.asarray([0, 0, 1]), jnp.ones(3)), "repeats"),
        (cj.CurvatureSample(jnp.asarray([0, N]), jnp.ones(2)), "must lie in"),
        (cj.CurvatureSample(jnp.asarray([0, 1]), jnp.asarray([1.0, 0.0])), "> 0"),
        (cj.CurvatureSample(jnp.asarray([0, 1]), jnp.ones(3)), "shape of the indices"),
        (cj.CurvatureSample(jnp.zeros(0, jnp.int32), jnp.ones(0)), "non-empty"),
        ((jnp.asarray([0, 1]), jnp.ones(2)), "CurvatureSample"),
    ],
)
def test_bad_curvature_samples_are_refused(sample, match):
    task = softmax_problem().task
    with pytest.raises((ValueError, TypeError), match=match):
        cj.influence(task, [np.array([0])], damping=LAM, curvature=sample)


def test_preconditioner_must_match_the_task_and_curvature(mlp):
    soft = softmax_problem()
    pre = cj.jacobi_preconditioner(_op(soft.task, batch_size=BATCH))
    moved = cj.Task(soft.task.apply_fn, soft.task.loss_fn, jax.tree_util.tree_map(lambda a: a + 1e-3, soft.task.params),
                    soft.task.inputs, soft.task.targets)
    rhs = jnp.asarray(soft.grads[:2])
    with pytest.raises(ValueError, match="fingerprint"):
        cj.solve_ggn(moved, rhs, damping=LAM, solver=cj.CG(preconditioner=pre))
    with pytest.raises(ValueError, match="curvature"):
        cj.solve_ggn(soft.task, rhs, damping=LAM, solver=cj.CG(preconditioner=pre), curvature=_sample())
    with pytest.raises(ValueError, match="acts on"):
        cj.solve_ggn(mlp.task, jnp.asarray(mlp.grads[:2]), damping=LAM, solver=cj.CG(preconditioner=pre))
    with pytest.raises(ValueError, match="'jacobi'"):
        cj.build_cache(soft.task, num_clusters=2, sketch_dim=2, damping=LAM, key=jax.random.key(0),
                       solver=cj.CG(preconditioner="diagonal"))
    with pytest.raises(TypeError, match="CG.preconditioner"):
        cj.influence(soft.task, [np.array([0])], damping=LAM, solver=cj.CG(preconditioner=np.eye(3)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "at least 1"),
        (dict(rank="big"), "'auto'"),
        (dict(rank="auto", condition_target=1.0), "condition_target"),
        (dict(rank=10_000), "exceeds the number of parameters"),
        (dict(rank=4, error_iters=-1), "error_iters"),
    ],
)
def test_bad_nystrom_settings(kwargs, match):
    op = _op(softmax_problem().task)
    with pytest.raises((ValueError, TypeError), match=match):
        cj.nystrom_preconditioner(op, key=jax.random.key(0), **kwargs)


def test_nystrom_needs_an_operator_with_a_valid_damping():
    """The damping is the operator's (always known, so rank="auto" needs nothing more); a bad one is refused."""
    task = softmax_problem().task
    with pytest.raises(TypeError, match="DampedGGN"):
        cj.nystrom_preconditioner(task, key=jax.random.key(0), rank=4)
    with pytest.raises(ValueError, match="`damping` must be finite and > 0"):
        cj.nystrom_preconditioner(cj.DampedGGN(task, damping=0.0), key=jax.random.key(0), rank=4)


def test_a_subspace_iteration_sharpens_the_factors(mlp):
    # One power iteration (r more products) on the dense-referenced MLP GGN, same start: the
    # factors' spectral error falls (0.217 -> 0.097 at r = 10 of p = 57; the optimum, the 11th
    # eigenvalue, is 0.045), the products are counted, and at r = p it is exact.
    ggn = mlp.ggn - LAM * np.eye(mlp.num_params)
    op = _op(mlp.task, batch_size=BATCH)

    def error(pre):
        u, s = np.asarray(pre.basis), np.asarray(pre.eigenvalues)
        return np.linalg.norm(ggn - u.T @ np.diag(s) @ u, 2)

    plain = cj.nystrom_preconditioner(op, key=jax.random.key(1), rank=10, error_iters=0)
    power = cj.nystrom_preconditioner(op, key=jax.random.key(1), rank=10, error_iters=0, power_iters=1)
    assert power.num_products == 2 * plain.num_products == 20
    assert error(power) < 0.5 * error(plain)
    full = cj.nystrom_preconditioner(op, key=jax.random.key(1), rank=mlp.num_params, error_iters=0, power_iters=1)
    assert error(full) <= 1e-8 * np.linalg.norm(ggn, 2)
    with pytest.raises(ValueError, match="`power_iters` applies to a fixed `rank`"):
        cj.nystrom_preconditioner(op, key=jax.random.key(1), rank="auto", power_iters=1)


def test_error_estimate_of_a_wide_model_is_exact_and_stays_small():
    # The spectral norm of the (block, p) power-iteration block came from an SVD of that wide
    # matrix, which XLA:CPU materialises as a (p, p) factor above ~100k parameters (1.1 TB at
    # p = 535,818): caches of such models failed in their error estimate. A linear least-squares
    # model with p = 2^17 + 1 and N = 4 has GGN = X~^T X~ / N (X~ = [X, 1]), of rank 4, whose top
    # eigenvalue is that of the 4 x 4 X~ X~^T / N; with zero factors the residual is the GGN, and a
    # block of 8 >= 4 vectors spans its range after one product, so the estimate is exact.
    from cif_jax.solvers.precondition import block_error_estimate

    n, d = 4, 2**17
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.normal(size=(n, 1)).astype(np.float32)
    params = {"w": jnp.zeros((d, 1), jnp.float32), "b": jnp.zeros(1, jnp.float32)}
    task = cj.Task(linear_apply, lambda o, t: 0.5 * jnp.sum((o - t) ** 2, axis=-1), params, jnp.asarray(x),
                   jnp.asarray(y))
    basis = jnp.zeros((1, d + 1), jnp.float32).at[0, 0].set(1.0)  # one factor with eigenvalue 0
    est = block_error_estimate(cj.DampedGGN(task, damping=LAM), basis, jnp.zeros(1, jnp.float32),
                               key=jax.random.key(0), iters=2, block=8)
    xt = np.concatenate([x, np.ones((n, 1), np.float32)], axis=1).astype(np.float64)
    want = np.linalg.eigvalsh(xt @ xt.T / n)[-1]
    assert float(est) == pytest.approx(want, rel=1e-5)  # float32 products
