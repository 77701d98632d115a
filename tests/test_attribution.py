"""Grad-Dot, TracIn and TRAK against numpy references built without the library.

The model is the suite's multinomial logistic regression (``_models.softmax_problem``):
its output Jacobians are closed form and do not depend on the parameters, so
gradients at any checkpoint are ``J_i^T dL/dz`` computed in numpy (``_linear``): the loss
gradient ``softmax(z) - e_y`` and TRAK's margin gradient ``e_y - softmax_{-y}(z)``
(the softmax over the other classes). Kernels are inverted with
``np.linalg.solve``; JL matrices come from ``cj.jl_projection`` and are applied as
explicit matrices.
"""

import importlib

import _linear as L
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import BATCH, IN_DIM, NUM_CLASSES, N, regression_problem, softmax_problem

import cif_jax as cj

NUM_EVAL = 6
TOL = 1e-12  # float64 dot products and d x d solves at this size: measured <= 2e-15


@pytest.fixture(scope="module")
def problem():
    return softmax_problem()


@pytest.fixture(scope="module")
def eval_data():
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(NUM_EVAL, IN_DIM)))
    y = jnp.asarray(rng.integers(0, NUM_CLASSES, NUM_EVAL), jnp.int32)
    return x, y


@pytest.fixture(scope="module")
def checkpoints(problem):
    """Three parameter snapshots around theta_0 (the model is linear, so any will do)."""
    rng = np.random.default_rng(12)
    return [jax.tree_util.tree_map(lambda a: a + s * jnp.asarray(rng.normal(size=a.shape)), problem.task.params)
            for s in (0.0, 0.3, 0.6)]


# -- numpy references ---------------------------------------------------------------------


def _margin_grads(params, x, y):
    z = L.logits(params, x)
    y = np.asarray(y)
    rows = np.arange(len(z))
    others = z.copy()
    others[rows, y] = -np.inf
    u = -L.softmax(others)  # d/dz_j of -logsumexp_{j != y} z_j
    u[rows, y] = 1.0
    return np.einsum("nkp,nk->np", L.jac(x, NUM_CLASSES), u)


def _one_minus_p(params, x, y):
    s = L.softmax(L.logits(params, x))
    return 1.0 - s[np.arange(len(s)), np.asarray(y)]


def _trak_reference(params_list, x, y, xe, ye, *, ridge, projections=None):
    """Algorithm 1 of Park et al.: mean over checkpoints of the kernel terms, times the mean of 1 - p_y."""
    q_bar = np.mean([_one_minus_p(th, x, y) for th in params_list], axis=0)
    total = 0
    for k, th in enumerate(params_list):
        phi, phi_e = _margin_grads(th, x, y), _margin_grads(th, xe, ye)
        if projections is not None:
            phi, phi_e = phi @ projections[k].T, phi_e @ projections[k].T
        kernel = phi.T @ phi + ridge * np.eye(phi.shape[1])
        total = total + phi_e @ np.linalg.solve(kernel, phi.T)
    return total / len(params_list) * q_bar[None, :]


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _groups():
    rng = np.random.default_rng(13)
    return [np.sort(rng.choice(N, size=m, replace=False)) for m in (1, 5, 17, N)]


# -- Grad-Dot and TracIn --------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [None, BATCH])
def test_grad_dot_matches_numpy(problem, eval_data, batch_size):
    xe, ye = eval_data
    task = problem.task
    want = L.loss_grads(task.params, xe, ye) @ L.loss_grads(task.params, task.inputs, task.targets).T
    got = cj.grad_dot(task, xe, ye, batch_size=batch_size)
    assert got.shape == (NUM_EVAL, N) and got.dtype == jnp.float64
    assert _rel(got, want) < TOL


def test_tracin_matches_numpy(problem, eval_data, checkpoints):
    xe, ye = eval_data
    task = problem.task
    lrs = [0.1, 0.05, 0.01]
    want = sum(lr * L.loss_grads(th, xe, ye) @ L.loss_grads(th, task.inputs, task.targets).T
               for th, lr in zip(checkpoints, lrs))
    got = cj.tracin(task, xe, ye, checkpoints=checkpoints, learning_rates=lrs, batch_size=BATCH)
    assert got.shape == (NUM_EVAL, N)
    assert _rel(got, want) < TOL
    # One checkpoint at theta_0 with rate 1 is Grad-Dot; Tasks are accepted as checkpoints.
    one = cj.tracin(task, xe, ye, checkpoints=[task], learning_rates=np.array(1.0))
    np.testing.assert_allclose(np.asarray(one), np.asarray(cj.grad_dot(task, xe, ye)), rtol=1e-13, atol=1e-15)


# -- TRAK -------------------------------------------------------------------------------------


def test_trak_margin_is_log_odds_of_the_label(problem):
    z = np.random.default_rng(14).normal(size=(9, NUM_CLASSES)) * 3
    y = np.arange(9) % NUM_CLASSES
    p = L.softmax(z)[np.arange(9), y]
    got = cj.trak_margin(jnp.asarray(z), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(got), np.log(p) - np.log1p(-p), rtol=1e-12)


def test_trak_identity_projection_matches_unprojected_formula(problem, eval_data, checkpoints):
    """sketch_dim=None: phi = raw margin gradients; the softmax's Phi^T Phi is singular, so ridge > 0."""
    xe, ye = eval_data
    task = problem.task
    ridge = 1e-3
    want = _trak_reference([task.params], task.inputs, task.targets, xe, ye, ridge=ridge)
    got = cj.trak(task, xe, ye, sketch_dim=None, ridge=ridge, batch_size=BATCH)
    assert got.shape == (NUM_EVAL, N)
    assert _rel(got, want) < TOL
    # An ensemble of checkpoints: mean kernel scores times the mean of 1 - p_y (Algorithm 1).
    want = _trak_reference(checkpoints, task.inputs, task.targets, xe, ye, ridge=ridge)
    got = cj.trak(task, xe, ye, sketch_dim=None, ridge=ridge, checkpoints=checkpoints)
    assert _rel(got, want) < TOL


def test_trak_projected_matches_explicit_projection(problem, eval_data, checkpoints, getkey):
    """d = 8 below the rank (12) of the margin gradients: the kernel is invertible without a ridge.

    Checkpoint k is projected by ``jl_projection(fold_in(key, k), ...)``, an explicit matrix here.
    """
    xe, ye = eval_data
    task = problem.task
    key, d, block = getkey(), 8, 5  # 18 parameters in blocks of 5: the last block is short
    projections = [np.asarray(cj.jl_projection(jax.random.fold_in(key, k), d, task.num_params, block_size=block))
                   for k in range(2)]
    assert not np.allclose(projections[0], projections[1])
    want = _trak_reference(checkpoints[:2], task.inputs, task.targets, xe, ye, ridge=0.0, projections=projections)
    got = cj.trak(task, xe, ye, sketch_dim=d, key=key, block_size=block, checkpoints=checkpoints[:2])
    assert _rel(got, want) < TOL


def test_trak_refuses_a_singular_kernel(problem, eval_data):
    xe, ye = eval_data
    with pytest.raises(ValueError, match="singular or too ill-conditioned.*ridge"):
        cj.trak(problem.task, xe, ye, sketch_dim=None)


# -- groups -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["grad_dot", "tracin", "trak"])
def test_group_scores_are_member_sums(problem, eval_data, checkpoints, method):
    xe, ye = eval_data
    task = problem.task
    kwargs = {
        "grad_dot": {},
        "tracin": dict(checkpoints=checkpoints, learning_rates=[0.3, 0.2, 0.1]),
        "trak": dict(sketch_dim=None, ridge=1e-2, checkpoints=checkpoints[1:]),
    }[method]
    fn = getattr(cj, method)
    per_example = np.asarray(fn(task, xe, ye, **kwargs))
    groups = _groups()
    want = np.stack([per_example[:, g].sum(axis=1) for g in groups], axis=1)
    got = fn(task, xe, ye, groups=groups, batch_size=BATCH, **kwargs)
    assert got.shape == (NUM_EVAL, len(groups))
    assert _rel(got, want) < 1e-12
    mask = np.zeros((len(groups), N), bool)
    for k, g in enumerate(groups):
        mask[k, g] = True
    np.testing.assert_allclose(np.asarray(fn(task, xe, ye, groups=mask, **kwargs)), np.asarray(got), rtol=1e-12,
                               atol=1e-14)


def test_self_scores_are_positive(problem):
    """Scoring training examples against themselves: Grad-Dot and TRAK are positive (self-help)."""
    task = problem.task
    xs, ys = task.inputs[:NUM_EVAL], task.targets[:NUM_EVAL]
    assert np.all(np.diag(np.asarray(cj.grad_dot(task, xs, ys))[:, :NUM_EVAL]) > 0)
    assert np.all(np.diag(np.asarray(cj.trak(task, xs, ys, sketch_dim=None, ridge=1e-3))[:, :NUM_EVAL]) > 0)


# -- bad input --------------------------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("expensive work started before the input was validated")

    mod = importlib.import_module("cif_jax.estimators.attribution")
    for name in ("_dot_pass", "_feature_pass", "_margin_pass", "per_example_grads_pass"):
        monkeypatch.setattr(mod, name, forbidden)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(eval_inputs=np.zeros((3, IN_DIM + 1))), "eval_inputs"),
        (dict(eval_targets=np.zeros(4, np.int32)), "eval_inputs`/`eval_targets"),
        (dict(groups=[np.array([], np.int64)]), "empty"),
        (dict(groups=[np.array([0, N])]), "out of range"),
        (dict(groups=[np.array([1, 1])]), "repeats"),
        (dict(groups=np.ones((2, N + 1), bool)), "shape"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_input_is_refused_before_work(problem, eval_data, no_work, change, match):
    xe, ye = eval_data
    kwargs = dict(eval_inputs=xe[:3], eval_targets=ye[:3])
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        cj.grad_dot(problem.task, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(checkpoints=[], learning_rates=[]), "empty"),
        (dict(checkpoints=None, learning_rates=1.0), "checkpoints"),
        (dict(learning_rates=[0.1, -0.1]), "> 0"),
        (dict(learning_rates=[0.1, float("nan")]), "> 0"),
        (dict(learning_rates=[0.1]), "2 value"),
        (dict(learning_rates=[0.0, 0.1]), "> 0"),
    ],
)
def test_tracin_bad_settings(problem, eval_data, checkpoints, no_work, kwargs, match):
    xe, ye = eval_data
    full = dict(checkpoints=checkpoints[:2], learning_rates=[0.1, 0.1])
    full.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cj.tracin(problem.task, xe, ye, **full)


def test_checkpoint_of_another_shape_or_nan(problem, eval_data, no_work):
    xe, ye = eval_data
    params = problem.task.params
    wrong = {"w": jnp.zeros((IN_DIM + 1, NUM_CLASSES)), "b": params["b"]}
    with pytest.raises(ValueError, match=r"checkpoints\[1\]"):
        cj.tracin(problem.task, xe, ye, checkpoints=[params, wrong], learning_rates=1.0)
    nan = {"w": params["w"].at[0, 0].set(jnp.nan), "b": params["b"]}
    with pytest.raises(ValueError, match="NaN"):
        cj.trak(problem.task, xe, ye, sketch_dim=None, ridge=1.0, checkpoints=[nan])


def test_trak_bad_settings(problem, eval_data, no_work):
    xe, ye = eval_data
    task = problem.task
    with pytest.raises(ValueError, match="ridge"):
        cj.trak(task, xe, ye, sketch_dim=None, ridge=-1.0)
    with pytest.raises(ValueError, match="key"):
        cj.trak(task, xe, ye, sketch_dim=4)
    with pytest.raises(ValueError, match="sketch_dim"):
        cj.trak(task, xe, ye, sketch_dim=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"(labels must lie in|class indices outside) \[0, 3\)"):
        cj.trak(task, xe, ye.at[0].set(NUM_CLASSES), sketch_dim=None, ridge=1.0)
    reg = regression_problem()
    with pytest.raises(ValueError, match="integer class labels"):
        cj.trak(reg.task, reg.task.inputs[:2], reg.task.targets[:2], sketch_dim=None, ridge=1.0)


def test_nan_in_evaluation_data_names_the_example(problem, eval_data):
    xe, ye = eval_data
    xe = xe.at[2, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"evaluation gradients contain NaN or Inf for 1 example\(s\), e.g. \[2\]"):
        cj.grad_dot(problem.task, xe, ye)
    with pytest.raises(ValueError, match=r"evaluation margin gradients .* e.g. \[2\]"):
        cj.trak(problem.task, xe, ye, sketch_dim=None, ridge=1e-3)


def test_float32_stays_float32(eval_data):
    p32 = softmax_problem("float32")
    xe, ye = eval_data
    xe = xe.astype(jnp.float32)
    assert cj.grad_dot(p32.task, xe, ye).dtype == jnp.float32
