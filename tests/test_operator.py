"""The damped GGN as a value (cj.DampedGGN): checked once, taken whole by solvers and preconditioners."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import BATCH, LAM, get_problem

import cif_jax as cj


@pytest.fixture(scope="module")
def problem():
    return get_problem("softmax")


def test_it_holds_the_checked_settings_and_the_fingerprint(problem):
    sample = cj.CurvatureSample(jnp.arange(10), jnp.ones(10))
    op = cj.DampedGGN(problem.task, damping=np.float32(LAM), batch_size=np.int64(BATCH), curvature=sample)
    assert type(op.damping) is float and op.damping == pytest.approx(LAM)
    assert type(op.batch_size) is int and op.batch_size == BATCH
    assert op.fingerprint == cj.fingerprint(problem.task)
    assert op.curvature_size == 10 and op.num_params == problem.num_params
    assert op.describe_curvature() != "full"
    assert cj.DampedGGN(problem.task, damping=LAM).describe_curvature() == "full"


@pytest.mark.parametrize("kwargs, match", [
    (dict(damping=0.0), "`damping` must be finite and > 0"),
    (dict(damping=LAM, batch_size=0), "`batch_size` must be at least 1"),
    (dict(damping=LAM, curvature=np.arange(3)), "`curvature` must be None or a `cif_jax.CurvatureSample"),
    (dict(damping=LAM, mesh="gpu"), "`mesh` must be a `jax.sharding.Mesh`"),
])
def test_bad_settings_are_refused_when_it_is_made(problem, kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        cj.DampedGGN(problem.task, **kwargs)


def test_apply_and_lineax_agree_with_the_dense_matrix(problem):
    # The closed-form damped GGN of the problem (float64), against both views of the operator.
    op = cj.DampedGGN(problem.task, damping=LAM, batch_size=BATCH)
    eye = jnp.eye(problem.num_params)
    np.testing.assert_allclose(np.asarray(op.apply(eye)), problem.ggn, rtol=1e-10, atol=1e-12)
    lin = op.as_lineax()
    mv = jax.jit(lambda v: lin.mv(v))
    np.testing.assert_allclose(np.asarray(mv(eye[3])), problem.ggn[:, 3], rtol=1e-10, atol=1e-12)


def test_a_solve_on_the_operator_is_the_convenient_form(problem):
    rhs = problem.grads[:5]
    solver = cj.CG(rtol=1e-8)
    op = cj.DampedGGN(problem.task, damping=LAM, batch_size=BATCH)
    got = solver.solve(op, rhs)
    want = cj.solve_ggn(problem.task, rhs, damping=LAM, batch_size=BATCH, solver=solver)
    np.testing.assert_array_equal(np.asarray(got.solutions), np.asarray(want.solutions))
    np.testing.assert_allclose(np.asarray(got.solutions), np.linalg.solve(problem.ggn, np.asarray(rhs).T).T,
                               rtol=1e-6)


def test_a_preconditioner_belongs_to_its_operator(problem):
    op = cj.DampedGGN(problem.task, damping=LAM)
    pre = cj.nystrom_preconditioner(op, key=jax.random.key(0), rank=4, error_iters=0)
    assert pre.fingerprint == op.fingerprint and pre.low_rank() is pre
    assert cj.jacobi_preconditioner(op).low_rank() is None
    # Another snapshot of the same shapes: refused by fingerprint before any solve.
    other = cj.Task(problem.task.apply_fn, problem.task.loss_fn,
                    jax.tree_util.tree_map(lambda a: a + 1e-3, problem.task.params), problem.task.inputs,
                    problem.task.targets)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        cj.CG(preconditioner=pre).solve(cj.DampedGGN(other, damping=LAM), problem.grads[:2])
    # The solver says which preconditioner it holds; the preconditioner whether it has factors.
    assert cj.CG(preconditioner=pre).built_preconditioner() is pre
    assert cj.CG().built_preconditioner() is None
    assert cj.CG().adopt(pre).preconditioner is pre
    assert cj.CG(preconditioner="jacobi").adopt(pre).preconditioner == "jacobi"


def test_only_cg_takes_a_mesh(problem):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("rhs",))
    op = cj.DampedGGN(problem.task, damping=LAM, mesh=mesh)
    for solver in (cj.LineaxSolver.cg(rtol=1e-6), cj.LiSSA(depth=5, key=jax.random.key(0))):
        with pytest.raises(ValueError, match="`mesh` applies to cif_jax.CG"):
            solver.solve(op, problem.grads[:2])


def test_a_new_damping_reuses_the_compiled_solve(problem):
    # lambda travels as a traced scalar in the kernel: a second damping compiles nothing new.
    from cif_jax.solvers import solve as solve_mod

    solver = cj.CG(rtol=1e-6, preconditioner=None)
    rhs = problem.grads[:3]
    solver.solve(cj.DampedGGN(problem.task, damping=LAM), rhs)
    before = solve_mod._solve_block._cached._cache_size()
    solver.solve(cj.DampedGGN(problem.task, damping=3 * LAM), rhs)
    assert solve_mod._solve_block._cached._cache_size() == before
