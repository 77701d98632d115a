"""LineaxSolver against block CG and dense references; run in its own process by tests/test_solvers.py."""

import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from _models import LAM, RTOL, dense_residuals, dense_solve, mlp_problem, row_rel_err

import cif_jax as cj

SOLVE_TOL = 1e-9


@pytest.fixture(scope="module")
def mlp():
    return mlp_problem()


def test_lineax_cg_matches_block_cg_with_true_residuals(mlp):
    rhs = mlp.grads[:5]
    ours = cj.solve_ggn(mlp.task, jnp.asarray(rhs), damping=LAM, solver=cj.CG(rtol=RTOL, preconditioner=None))
    for solver in (cj.LineaxSolver.cg(rtol=RTOL, rhs_batch_size=2),
                   cj.LineaxSolver.cg(rtol=RTOL, preconditioner=cj.jacobi_preconditioner(cj.DampedGGN(mlp.task, damping=1e-3)))):
        got = cj.solve_ggn(mlp.task, jnp.asarray(rhs), damping=LAM, solver=solver)
        assert row_rel_err(got.solutions, dense_solve(mlp.ggn, rhs)) < SOLVE_TOL
        assert row_rel_err(got.solutions, ours.solutions) < SOLVE_TOL
        np.testing.assert_allclose(np.asarray(got.residuals), dense_residuals(mlp, rhs, got.solutions), rtol=1e-6,
                                   atol=1e-15)
        assert bool(got.converged.all())


def test_lineax_solver_restarts_and_reports_what_it_reached(mlp):
    rhs = jnp.asarray(mlp.grads[:3])
    # Three steps per lineax solve, three restarts: not enough, and said so.
    short = cj.LineaxSolver.cg(rtol=RTOL, max_steps=3, max_restarts=3)
    with pytest.warns(UserWarning, match="did not reach"):
        got = cj.solve_ggn(mlp.task, rhs, damping=LAM, solver=short)
    assert not bool(got.converged.any())
    np.testing.assert_allclose(np.asarray(got.residuals), dense_residuals(mlp, rhs, got.solutions), rtol=1e-6)
    assert np.all(np.asarray(got.num_steps) <= 12)
    # Any lineax solver: BiCGStab on the same scaled system. (GMRES works too, but its vmapped
    # least-squares step once crashed XLA:CPU's compiler in CI, so the suite does not compile it.)
    bicgstab = cj.LineaxSolver(lx.BiCGStab(rtol=0.0, atol=1e-13, max_steps=400), rtol=1e-10)
    got = cj.solve_ggn(mlp.task, rhs, damping=LAM, solver=bicgstab)
    assert row_rel_err(got.solutions, dense_solve(mlp.ggn, np.asarray(rhs))) < 1e-8
