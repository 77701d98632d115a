"""`cj.lasso`: FISTA for many queries against scikit-learn's coordinate descent."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import Lasso

import cif_jax as cj


def _sklearn(X, Y, alpha, *, fit_intercept=False):
    """scikit-learn's objective is 1/(2K)||y - Xw||^2 + a||w||_1: a = alpha / K gives ours."""
    k = X.shape[0]
    models = [Lasso(alpha=a / k, fit_intercept=fit_intercept, tol=1e-12, max_iter=10**6).fit(X, y)
              for a, y in zip(np.broadcast_to(alpha, len(Y)), Y)]
    return np.stack([m.coef_ for m in models]), np.array([m.intercept_ for m in models], np.float64)


def _objective(X, Y, W, alpha, b=0.0):
    R = Y - W @ X.T - np.asarray(b)[..., None]
    return 0.5 * np.sum(R * R, axis=1) + alpha * np.abs(W).sum(axis=1)


def _problem(seed=0, k=30, n=45, q=4):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(k, n)), rng.normal(size=(q, k))


def test_gaussian_design_matches_sklearn():
    X, Y = _problem()
    alpha = np.array([0.5, 1.0, 2.0, 4.0])
    sol = cj.lasso(X, Y, alpha=alpha, tol=1e-13, max_steps=50_000)
    ref, _ = _sklearn(X, Y, alpha)
    assert bool(np.all(sol.converged))
    np.testing.assert_allclose(sol.coef, ref, atol=1e-6)  # measured 3e-12
    np.testing.assert_array_equal(sol.intercept, 0.0)
    np.testing.assert_allclose(sol.alpha, alpha)


def test_membership_design_objective_matches_sklearn():
    X = np.asarray(cj.stride_subsets(__import__("jax").random.key(3), 40, num_subsets=24, subset_size=10))
    mask = np.zeros((24, 40))
    mask[np.arange(24)[:, None], X] = 1.0
    rng = np.random.default_rng(1)
    Y = rng.normal(size=(3, 24))
    sol = cj.lasso(mask, Y, alpha_ratio=0.05, tol=1e-12, max_steps=50_000)
    alpha = np.asarray(sol.alpha)
    ref, _ = _sklearn(mask, Y, alpha)
    got, want = _objective(mask, Y, np.asarray(sol.coef), alpha), _objective(mask, Y, ref, alpha)
    np.testing.assert_allclose(got, want, rtol=1e-8)
    # The certificate: our gap bounds our distance from sklearn's (near-optimal) objective.
    assert np.all(got - want <= np.asarray(sol.dual_gap) + 1e-12)


def test_planted_sparse_recovery_on_stride_subsets():
    """Noise-free responses of 5 planted examples on K=150 subsets of N=300: exact support."""
    import jax

    S = np.asarray(cj.stride_subsets(jax.random.key(0), 300, num_subsets=150, subset_size=30))
    X = np.zeros((150, 300))
    X[np.arange(150)[:, None], S] = 1.0
    rng = np.random.default_rng(0)
    w = np.zeros((2, 300))
    for q in range(2):
        idx = rng.choice(300, 5, replace=False)
        w[q, idx] = rng.uniform(1, 2, 5) * rng.choice([-1.0, 1.0], 5)
    sol = cj.lasso(X, w @ X.T, alpha_ratio=1e-3, tol=1e-10, max_steps=20_000)
    np.testing.assert_array_equal(np.abs(np.asarray(sol.coef)) > 1e-3, w != 0)
    assert np.abs(np.asarray(sol.coef) - w).max() <= 0.02  # measured: see the report


def test_default_alpha_and_ratio():
    X, Y = _problem(1)
    alpha_max = np.abs(Y @ X).max(axis=1)
    np.testing.assert_allclose(cj.lasso(X, Y).alpha, 1e-2 * alpha_max, rtol=1e-12)
    np.testing.assert_allclose(cj.lasso(X, Y, alpha_ratio=0.3).alpha, 0.3 * alpha_max, rtol=1e-12)
    # At alpha >= alpha_max the solution is exactly zero.
    np.testing.assert_array_equal(cj.lasso(X, Y, alpha_ratio=1.0).coef, 0.0)


def test_kkt_and_duality_gap():
    X, Y = _problem(2)
    sol = cj.lasso(X, Y, alpha=1.5, tol=1e-12, max_steps=50_000)
    W = np.asarray(sol.coef)
    corr = (Y - W @ X.T) @ X  # X^T r, per query
    on = W != 0
    assert on.any() and (~on).any()
    np.testing.assert_allclose(corr[on], 1.5 * np.sign(W[on]), atol=1e-6)
    assert np.abs(corr[~on]).max() <= 1.5 + 1e-6
    # The gap recomputed in numpy from its definition.
    R = Y - W @ X.T
    scale = np.minimum(1.0, 1.5 / np.abs(R @ X).max(axis=1))
    theta = R * scale[:, None]
    dual = 0.5 * (Y * Y).sum(1) - 0.5 * ((Y - theta) ** 2).sum(1)
    gap = _objective(X, Y, W, 1.5) - dual
    np.testing.assert_allclose(sol.dual_gap, gap, atol=1e-10)
    assert np.all(gap <= 1e-12 * (Y * Y).sum(1) + 1e-13)


def test_intercept_matches_sklearn():
    X, Y = _problem(3)
    Y = Y + 5.0
    sol = cj.lasso(X, Y, alpha=1.0, fit_intercept=True, tol=1e-13, max_steps=50_000)
    coef, intercept = _sklearn(X, Y, 1.0, fit_intercept=True)
    np.testing.assert_allclose(sol.coef, coef, atol=1e-6)
    np.testing.assert_allclose(sol.intercept, intercept, atol=1e-6)
    # Without the intercept the shift must be absorbed by w: a different answer.
    assert np.abs(np.asarray(cj.lasso(X, Y, alpha=1.0).coef) - coef).max() > 1e-2


def test_batched_equals_loop_and_single_row():
    X, Y = _problem(4)
    sol = cj.lasso(X, Y, alpha=0.7, tol=1e-13, max_steps=50_000)
    for q in range(len(Y)):
        one = cj.lasso(X, Y[q], alpha=0.7, tol=1e-13, max_steps=50_000)
        assert one.coef.shape == (X.shape[1],) and one.dual_gap.shape == ()
        np.testing.assert_allclose(one.coef, sol.coef[q], atol=1e-8)


def test_dtype_kept():
    X, Y = _problem(5)
    assert cj.lasso(X, Y).coef.dtype == jnp.float64
    sol = cj.lasso(X.astype(np.float32), Y.astype(np.float32), alpha=1.0, tol=1e-5)
    assert sol.coef.dtype == jnp.float32 and sol.dual_gap.dtype == jnp.float32
    ref, _ = _sklearn(X, Y, 1.0)
    np.testing.assert_allclose(sol.coef, ref, atol=2e-3)


def test_unconverged_warns():
    X, Y = _problem(6)
    with pytest.warns(RuntimeWarning, match="did not reach a duality gap"):
        sol = cj.lasso(X, Y, alpha=0.1, tol=1e-14, max_steps=3)
    assert not bool(np.any(sol.converged)) and int(sol.num_steps) == 3


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(targets=np.ones((2, 5))), ValueError, "targets"),
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(alpha=-1.0), ValueError, "alpha"),
        (dict(alpha=np.ones(3)), ValueError, "alpha"),
        (dict(alpha_ratio=0.0), ValueError, "alpha_ratio"),
        (dict(alpha=1.0, alpha_ratio=0.1), ValueError, "not both"),
        (dict(tol=0.0), ValueError, "tol"),
        (dict(max_steps=0), ValueError, "max_steps"),
        (dict(targets=np.full((2, 4), np.nan)), ValueError, "targets"),
        (dict(design=np.full((4, 6), np.inf)), ValueError, "design"),
        (dict(design=np.ones(4)), ValueError, "design"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(design=np.ones((4, 6)), targets=np.ones((2, 4)))
    args.update(kwargs)
    design, targets = args.pop("design"), args.pop("targets")
    with pytest.raises(exc, match=match):
        cj.lasso(design, targets, **args)
