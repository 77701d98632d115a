"""Solver objects (CG, LineaxSolver, LiSSA), the preconditioner interface and the "auto" cost model.

References are dense float64 solves of the damped GGN built from explicit Jacobians
(tests/_models.py). Every solver must return the same solutions to its tolerance,
with residuals that are the true ones.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import BATCH, LAM, NUM_CLUSTERS, RTOL, SKETCH_DIM, dense_residuals, dense_solve, mlp_problem, row_rel_err

import cif_jax as cj
from cif_jax.solvers import precondition

SOLVE_TOL = 1e-9  # as tests/test_precondition.py: RTOL = 1e-12 on condition numbers <= ~500


@pytest.fixture(scope="module")
def mlp():
    return mlp_problem()


def _op(task, damping=LAM, **kwargs):
    return cj.DampedGGN(task, damping=damping, **kwargs)


# -- settings objects ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rtol=0.0, atol=0.0), ValueError, "both 0"),
    (dict(max_steps=0), ValueError, "max_steps"),
    (dict(rhs_batch_size=0), ValueError, "rhs_batch_size"),
    (dict(preconditioner="cholesky"), ValueError, "CG.preconditioner"),
    (dict(preconditioner=np.eye(3)), TypeError, "CG.preconditioner"),
    (dict(product_dtype=jnp.int32), TypeError, "product_dtype"),
])
def test_bad_cg_settings_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        cj.CG(**kwargs)


def test_solver_must_be_a_solver_object(mlp):
    with pytest.raises(TypeError, match="solver object"):
        cj.solve_ggn(mlp.task, jnp.asarray(mlp.grads[:2]), damping=LAM, solver="cg")
    with pytest.raises(TypeError, match="solver object"):
        cj.influence(mlp.task, [np.array([0])], damping=LAM, solver=dict(rtol=1e-3))


def test_describe_is_stable_and_names_the_preconditioner():
    assert cj.CG().describe() == "cg(rtol=0.0001,atol=0,max_steps=1000,max_restarts=3,preconditioner=auto)"
    assert "preconditioner=none" in cj.CG(preconditioner=None).describe()
    assert cj.LiSSA(depth=5, key=jax.random.key(0)).describe().startswith("lissa(")


# -- CG and its preconditioners -----------------------------------------------------------------


@pytest.mark.parametrize("preconditioner", [None, "auto", "nystrom", "jacobi", "kfac", "ekfac"])
def test_every_preconditioner_gives_the_dense_solution(mlp, preconditioner):
    rhs = mlp.grads[:6]
    with warnings_as_errors():
        got = cj.solve_ggn(mlp.task, jnp.asarray(rhs), damping=LAM, batch_size=BATCH,
                           solver=cj.CG(rtol=RTOL, preconditioner=preconditioner))
    assert row_rel_err(got.solutions, dense_solve(mlp.ggn, rhs)) < SOLVE_TOL
    np.testing.assert_allclose(np.asarray(got.residuals), dense_residuals(mlp, rhs, got.solutions), rtol=1e-6,
                               atol=1e-15)
    assert bool(got.converged.all())


class warnings_as_errors:
    """K-FAC's warning that it factors some layers only is expected on this MLP; anything else is an error."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*K-FAC factors.*")

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def test_prepare_builds_once_and_solutions_do_not_depend_on_it(mlp):
    solver = cj.CG(rtol=RTOL, preconditioner="nystrom")
    assert not solver.prepared
    assert solver.built_preconditioner() is None
    prepared = solver.prepare(_op(mlp.task, batch_size=BATCH), 10, key=jax.random.key(3))
    assert prepared.prepared and isinstance(prepared.preconditioner, cj.NystromPreconditioner)
    assert prepared.built_preconditioner() is prepared.preconditioner
    assert prepared.built_preconditioner().low_rank() is prepared.preconditioner  # Nystrom factors are low-rank
    assert "rank" in prepared.choice and prepared.preconditioner.note == prepared.choice
    # A prepared solver is returned as it is: no second build.
    assert prepared.prepare(_op(mlp.task), 10) is prepared
    rhs = jnp.asarray(mlp.grads[:4])
    a = cj.solve_ggn(mlp.task, rhs, damping=LAM, batch_size=BATCH, solver=prepared)
    b = cj.solve_ggn(mlp.task, rhs, damping=LAM, batch_size=BATCH, solver=cj.CG(rtol=RTOL, preconditioner=None))
    assert row_rel_err(a.solutions, b.solutions) < SOLVE_TOL
    assert int(a.num_steps.max()) < int(b.num_steps.max())


def test_a_prepared_preconditioner_is_checked_against_the_task(mlp):
    other = mlp_problem()
    shifted = cj.Task(other.task.apply_fn, other.task.loss_fn,
                      jax.tree_util.tree_map(lambda a: a + 0.1, other.task.params), other.task.inputs,
                      other.task.targets)
    prepared = cj.CG(preconditioner="jacobi").prepare(_op(mlp.task), 4)
    assert isinstance(prepared.built_preconditioner(), cj.JacobiPreconditioner)
    assert prepared.built_preconditioner().low_rank() is None  # no low-rank factors to share with a cache
    with pytest.raises(ValueError, match="fingerprint"):
        cj.solve_ggn(shifted, jnp.asarray(mlp.grads[:2]), damping=LAM, solver=prepared)
    with pytest.raises(ValueError, match="fingerprint"):
        prepared.solve(_op(shifted), jnp.asarray(mlp.grads[:2]))


def test_solve_takes_an_operator_and_checks_the_preconditioner_against_it(mlp):
    rhs = jnp.asarray(mlp.grads[:2])
    with pytest.raises(TypeError, match="DampedGGN"):
        cj.CG().solve(mlp.task, rhs)
    pre = cj.jacobi_preconditioner(_op(mlp.task))  # built on the full curvature
    sample = cj.CurvatureSample(jnp.arange(0, mlp.task.num_examples, 2), jnp.ones(mlp.task.num_examples // 2))
    with pytest.raises(ValueError, match="built for curvature"):
        cj.CG(preconditioner=pre).solve(_op(mlp.task, curvature=sample), rhs)
    with pytest.raises(ValueError, match="built for curvature"):
        pre.check(_op(mlp.task, curvature=sample))


def test_a_user_preconditioner_needs_only_the_interface(mlp):
    """No isinstance dispatch: any Preconditioner subclass with `size` and `inverse` serves CG."""

    class Scaled(cj.Preconditioner):
        diagonal: jax.Array
        fingerprint: str = eqx.field(static=True)
        curvature: str = eqx.field(static=True, default="full")
        seconds: float = eqx.field(static=True, default=0.0)

        @property
        def size(self):
            return self.diagonal.shape[0]

        def inverse(self, damping):
            return lambda r: r / (1 + self.diagonal / damping)[None, :]

    diag = jnp.asarray(np.diag(mlp.ggn) - LAM)
    pre = Scaled(diag, cj.fingerprint(mlp.task))
    rhs = mlp.grads[:3]
    got = cj.solve_ggn(mlp.task, jnp.asarray(rhs), damping=LAM, solver=cj.CG(rtol=RTOL, preconditioner=pre))
    assert row_rel_err(got.solutions, dense_solve(mlp.ggn, rhs)) < SOLVE_TOL
    assert pre.for_jit().fingerprint == "" and pre.for_jit().seconds == 0.0
    # The approximate inverse of the interface: (P + lambda)^{-1}.
    x = np.asarray(pre.approximate_inverse(LAM)(jnp.asarray(rhs)))
    np.testing.assert_allclose(x, np.asarray(rhs) / (np.asarray(diag) + LAM)[None, :], rtol=1e-12)


def test_nystrom_approximate_inverse_is_the_dense_formula(mlp):
    pre = cj.nystrom_preconditioner(_op(mlp.task, batch_size=BATCH), key=jax.random.key(0), rank=8)
    u, s = np.asarray(pre.basis), np.asarray(pre.eigenvalues)
    dense = u.T @ np.diag(1 / (s + LAM)) @ u + (np.eye(u.shape[1]) - u.T @ u) / LAM
    rhs = np.asarray(mlp.grads[:3])
    np.testing.assert_allclose(np.asarray(cj.ekfac_solve(pre, jnp.asarray(rhs), damping=LAM)), rhs @ dense.T,
                               rtol=1e-10)


# -- the cost model --------------------------------------------------------------------------------


def test_iteration_models_follow_the_cg_bound():
    # Preconditioned: 0.5 sqrt(kappa) ln(2 / rtol), scaled; monotone in kappa and in the tolerance.
    k = precondition.preconditioned_iterations
    np.testing.assert_allclose(k(100.0, 1e-4), precondition.PRECONDITIONED_FACTOR * 5 * np.log(2e4), rtol=1e-12)
    assert k(1.0, 1e-4) < k(10.0, 1e-4) < k(100.0, 1e-4) and k(100.0, 1e-2) < k(100.0, 1e-6)
    # Plain: the best number of large eigenvalues to step past; a spectrum with a few large outliers
    # costs the outliers plus the rate of the rest, not the rate of the whole condition number.
    plain = precondition.plain_iterations
    outliers = np.array([1e3, 1e2, 1e1] + [1e-3] * 5)
    bound = precondition.PLAIN_FACTOR * 0.5 * np.sqrt((1e3 + 1e-4) / 1e-4) * np.log(2e4)
    assert plain(outliers, 1e-3, 1e-4, 1e-4) < 0.2 * bound
    assert plain(outliers, 1e-3, 1e-1, 1e-4) < plain(outliers, 1e-3, 1e-4, 1e-4)
    # What the sketch misses counts: a large remainder cannot be stepped past.
    assert plain(outliers, 1.0, 1e-4, 1e-4) > plain(outliers, 1e-3, 1e-4, 1e-4)


def test_auto_skips_the_probe_for_few_systems(mlp):
    solver = cj.CG(rtol=RTOL).prepare(_op(mlp.task), precondition.MIN_SYSTEMS - 1)
    assert solver.preconditioner is None and "no probe" in solver.choice


def test_auto_weighs_the_build_against_the_solves(mlp):
    """Many systems on a stiff operator: Nystrom; heavy damping (kappa ~ 1): plain CG."""
    many = cj.CG(rtol=RTOL).prepare(_op(mlp.task, damping=1e-4, batch_size=BATCH), 500)
    assert isinstance(many.preconditioner, cj.NystromPreconditioner), many.choice
    assert many.preconditioner.rank >= precondition.PROBE_RANK or many.preconditioner.rank == mlp.num_params
    easy = cj.CG(rtol=1e-3).prepare(_op(mlp.task, damping=100.0, batch_size=BATCH), 4)
    assert easy.preconditioner is None and easy.choice.startswith("none"), easy.choice


# -- caches record their solver ------------------------------------------------------------------


def test_cache_records_the_solver_and_reuses_a_prepared_one(mlp):
    solver = cj.CG(rtol=RTOL, preconditioner="jacobi").prepare(_op(mlp.task), NUM_CLUSTERS)
    cache = cj.build_cache(mlp.task, num_clusters=NUM_CLUSTERS, sketch_dim=SKETCH_DIM, damping=LAM,
                           key=jax.random.key(0), solver=solver, batch_size=BATCH, correction=None)
    assert cache.solver == solver.describe() and "preconditioner=jacobi" in cache.solver
    assert cache.rtol == RTOL and cache.max_steps == solver.max_steps
    plain = cj.build_cache(mlp.task, num_clusters=NUM_CLUSTERS, sketch_dim=SKETCH_DIM, damping=LAM,
                           key=jax.random.key(0), solver=cj.CG(rtol=RTOL, preconditioner=None), batch_size=BATCH,
                           correction=None)
    assert row_rel_err(cache.responses, plain.responses) < SOLVE_TOL


def test_cache_shares_the_correction_factors_with_auto(mlp):
    cache = cj.build_cache(mlp.task, num_clusters=NUM_CLUSTERS, sketch_dim=SKETCH_DIM, damping=LAM,
                           key=jax.random.key(0), solver=cj.CG(rtol=RTOL), batch_size=BATCH,
                           correction=cj.NystromCorrection(rank=8))
    assert "preconditioner=nystrom(rank=8)" in cache.solver
    plain = cj.build_cache(mlp.task, num_clusters=NUM_CLUSTERS, sketch_dim=SKETCH_DIM, damping=LAM,
                           key=jax.random.key(0), solver=cj.CG(rtol=RTOL, preconditioner="none"), batch_size=BATCH,
                           correction=cj.NystromCorrection(rank=8))
    assert "preconditioner=none" in plain.solver
    assert row_rel_err(cache.responses, plain.responses) < SOLVE_TOL


# -- lineax ----------------------------------------------------------------------------------------


def test_lineax_solvers_in_their_own_process():
    """The lineax checks below run in a fresh process (tests/_lineax_isolated.py).

    Twice in CI, XLA:CPU's compiler (jaxlib 0.10.2) segfaulted on a compilation that followed the
    vmapped lineax solves in the same process (never in the lineax compilations themselves); in their
    own process a crash cannot take the rest of the suite down, and a failure still fails this test.
    """
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.join(here, "_lineax_isolated.py")], capture_output=True, text=True, cwd=here,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "2 passed" in run.stdout


def test_lineax_solver_refuses_what_it_cannot_do(mlp):
    with pytest.raises(TypeError, match="lineax solver"):
        cj.LineaxSolver("cg")
    with pytest.raises(ValueError, match="one device"):
        cj.solve_ggn(mlp.task, jnp.asarray(mlp.grads[:1]), damping=LAM, solver=cj.LineaxSolver.cg(),
                     mesh=cj.solver_mesh())


# -- LiSSA as a solver -----------------------------------------------------------------------------


def test_lissa_is_a_solver_with_true_residuals(mlp):
    rhs = jnp.asarray(mlp.grads[:2])
    lissa = cj.LiSSA(depth=3000, key=jax.random.key(0), rtol=1e-6)
    got = cj.solve_ggn(mlp.task, rhs, damping=0.1, solver=lissa)
    want = dense_solve(mlp.ggn + (0.1 - LAM) * np.eye(mlp.num_params), np.asarray(rhs))
    assert row_rel_err(got.solutions, want) < 1e-5
    dense = mlp.ggn + (0.1 - LAM) * np.eye(mlp.num_params)
    res = np.linalg.norm(np.asarray(rhs) - np.asarray(got.solutions) @ dense.T, axis=1) / np.linalg.norm(
        np.asarray(rhs), axis=1)
    np.testing.assert_allclose(np.asarray(got.residuals), res, rtol=1e-6, atol=1e-13)  # rounding once converged
    assert dataclasses.replace(lissa, depth=10).step_budget == 10
    with pytest.raises(ValueError, match="one device"):
        cj.solve_ggn(mlp.task, rhs, damping=0.1, solver=lissa, mesh=cj.solver_mesh())


# -- meshes ----------------------------------------------------------------------------------------


def test_a_mesh_without_the_axis_names_is_refused_with_the_fix(mlp):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
    with pytest.raises(ValueError, match="'rhs'"):
        cj.solve_ggn(mlp.task, jnp.asarray(mlp.grads[:1]), damping=LAM, mesh=mesh)
