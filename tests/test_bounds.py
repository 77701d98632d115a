"""The error bounds of section 3.5 / appendix A.5 against dense exact influence.

The exact linearised response ``Delta theta_S = (1/N) H~^{-1} sum_{i in S} g_i``
(eq. 17) comes from the dense GGN and reference gradients; the CiF estimate from
``cj.param_delta``. Bounds are checked for a tightly solved cache and for one
whose solves stop after two CG steps, where the solver term matters.
"""

import jax
import numpy as np
import pytest
from _models import (
    LAM,
    NUM_CLUSTERS,
    RTOL,
    SKETCH_DIM,
    N,
    cache_for,
    dense_influence,
    dense_means,
    random_masks,
    softmax_problem,
)

import cif_jax as cj

NUM_SUBSETS = 500
SUBSET_SIZES = (1, 8, 24, 47)
SLACK = 1 + 1e-9  # rounding in the bound and in the error


@pytest.fixture(scope="module")
def problem():
    return softmax_problem()


@pytest.fixture(scope="module")
def tight():
    return cache_for("softmax")


@pytest.fixture(scope="module")
def loose(problem):
    with pytest.warns(UserWarning, match="did not reach"):
        return cj.build_cache(problem.task, num_clusters=NUM_CLUSTERS, sketch_dim=SKETCH_DIM, damping=LAM,
                              key=jax.random.key(0), solver=cj.CG(rtol=RTOL, max_steps=2, preconditioner=None), correction=None)


def _reference(problem, cache):
    """Dense cluster means, deviations g_i - mu_c(i), and true residual norms ||mu_c - H~ v_c||."""
    a = np.asarray(cache.assignments)
    mu = dense_means(problem.grads, a, NUM_CLUSTERS)
    residual_norms = np.linalg.norm(mu - np.asarray(cache.responses) @ problem.ggn.T, axis=1)
    return a, mu, problem.grads - mu[a], residual_norms


def _errors(problem, cache, masks):
    """``||Delta theta_S - hat Delta theta_S||`` for every row of ``masks``."""
    return np.linalg.norm(dense_influence(problem, masks) - np.asarray(cj.param_delta(cache, masks)), axis=1)


def _mixed_masks(num, seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((num, N), bool)
    for q, size in enumerate(rng.integers(1, N, num)):
        masks[q, rng.choice(N, size=size, replace=False)] = True
    return masks


@pytest.mark.parametrize("which", ["tight", "loose"])
def test_expected_bound_holds_over_random_subsets(problem, tight, loose, which):
    cache = {"tight": tight, "loose": loose}[which]
    a, _, dev, residual_norms = _reference(problem, cache)
    trace = np.sum(dev**2) / N  # eq. 15
    sizes = np.bincount(a, minlength=NUM_CLUSTERS)
    scatter, solver = cj.error_bound(cache, np.array(SUBSET_SIZES))
    assert scatter.shape == solver.shape == (len(SUBSET_SIZES),)
    for k, m in enumerate(SUBSET_SIZES):
        # eq. (37), from the dense gradients and the dense residuals.
        want_scatter = np.sqrt(m * (N - m) / (N - 1) * trace) / (LAM * N)
        want_solver = m / (LAM * N) * np.sum(sizes / N * residual_norms)
        np.testing.assert_allclose(float(scatter[k]), want_scatter, rtol=1e-10)
        # A converged solve leaves rounding-level residuals: compare on the scale of the bound.
        np.testing.assert_allclose(float(solver[k]), want_solver, rtol=1e-8, atol=1e-12 * want_scatter)
        one = cj.error_bound(cache, m)
        np.testing.assert_allclose([float(one[0]), float(one[1])], [float(scatter[k]), float(solver[k])],
                                   rtol=1e-14)

        masks = random_masks(NUM_SUBSETS, m, seed=100 + m)
        assert np.all(masks.sum(axis=1) == m)
        mean_error = _errors(problem, cache, masks).mean()
        assert mean_error <= (scatter[k] + solver[k]) * SLACK, (m, mean_error, scatter[k], solver[k])


@pytest.mark.parametrize("which", ["tight", "loose"])
def test_subset_bound_holds_on_every_subset(problem, tight, loose, which):
    cache = {"tight": tight, "loose": loose}[which]
    a, _, dev, residual_norms = _reference(problem, cache)
    masks = _mixed_masks(NUM_SUBSETS, seed=7)
    errors = _errors(problem, cache, masks)
    counts = np.stack([np.bincount(a[row], minlength=NUM_CLUSTERS) for row in masks])

    scatter, solver = cj.subset_error_bound(cache, masks, task=problem.task)
    want_scatter = np.linalg.norm(masks.astype(np.float64) @ dev, axis=1) / (LAM * N)  # eq. 13, first term
    want_solver = counts @ residual_norms / (LAM * N)
    np.testing.assert_allclose(np.asarray(scatter), want_scatter, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(np.asarray(solver), want_solver, rtol=1e-8, atol=1e-12 * want_scatter.max())
    assert np.all(errors <= (np.asarray(scatter) + np.asarray(solver)) * SLACK)

    # Without the task: the triangle-inequality scatter sum_{i in S} ||g_i - mu_c(i)||.
    tri, tri_solver = cj.subset_error_bound(cache, masks)
    want_tri = masks.astype(np.float64) @ np.linalg.norm(dev, axis=1) / (LAM * N)
    np.testing.assert_allclose(np.asarray(tri), want_tri, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(tri_solver), np.asarray(solver), rtol=1e-14)
    assert np.all(np.asarray(tri) >= np.asarray(scatter) * (1 - 1e-12))
    assert np.all(errors <= (np.asarray(tri) + np.asarray(tri_solver)) * SLACK)


def test_loose_solve_raises_the_solver_term(tight, loose):
    t_scatter, t_solver = cj.error_bound(tight, np.array(SUBSET_SIZES))
    l_scatter, l_solver = cj.error_bound(loose, np.array(SUBSET_SIZES))
    # Same partition, so the same scatter term; the solver term goes from rounding
    # level to a visible share of the bound.
    np.testing.assert_array_equal(np.asarray(loose.assignments), np.asarray(tight.assignments))
    np.testing.assert_allclose(np.asarray(l_scatter), np.asarray(t_scatter), rtol=1e-12)
    assert np.all(np.asarray(t_solver) < 1e-9 * np.asarray(t_scatter))
    assert np.all(np.asarray(l_solver) > 1e-2 * np.asarray(l_scatter))
    assert np.all(np.asarray(l_solver) > 1e6 * np.asarray(t_solver))
