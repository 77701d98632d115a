"""Sampled pseudo-gradient factors of the GGN (cj.sampled_preconditioner), against closed-form references.

The pseudo-gradients are random, so two kinds of check: exact identities (the output
Hessian's factor, orthonormality, the pass structure) and Monte Carlo limits with a fixed
key, whose tolerances are a few standard errors of the averages involved.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import BATCH, LAM, PROBLEMS, get_problem

import cif_jax as cj
from cif_jax.solvers import sampled


def test_psd_factor_is_exact_for_full_and_singular_matrices():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    full = a @ a.T
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=7)))
    softmax = np.asarray(jnp.diag(probs) - jnp.outer(probs, probs))  # PSD, null vector 1
    for w in (full, softmax, np.zeros((3, 3))):
        low = np.asarray(sampled.psd_factor(jnp.asarray(w)))
        assert np.allclose(np.triu(low, 1), 0)
        np.testing.assert_allclose(low @ low.T, w, atol=1e-12 * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize("name", PROBLEMS)
def test_pseudo_gradients_are_unbiased_for_each_example(name):
    # E[h h^T] = J^T W J for one example; the mean over S draws has relative error ~ sqrt(2 / S)
    # per entry of a rank-q matrix: 4,000 draws, tolerance 0.1 of the largest entry.
    problem = get_problem(name)
    task = problem.task
    flat = jnp.asarray(problem.flat)
    fn = sampled._pseudo_grads_fn(task, 4000)
    i = 3
    x = jax.tree_util.tree_map(lambda a: a[i], task.inputs)
    h = np.asarray(fn(flat, x, task.targets[i], jax.random.key(1)))
    want = problem.jac[i].T @ problem.out_hess[i] @ problem.jac[i]
    got = h.T @ h  # the draws carry 1 / sqrt(S): their outer products sum to the mean
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()


@pytest.mark.parametrize("name", PROBLEMS)
def test_full_rank_factors_approach_the_ggn(name):
    # r = p with 1,000 draws per example: U diag(s) U^T is the GGN up to Monte Carlo error
    # (measured 0.019-0.024 relative, Frobenius, over these problems; tolerance 0.05).
    problem = get_problem(name)
    p = problem.num_params
    op = cj.DampedGGN(problem.task, damping=LAM, batch_size=BATCH)
    pre = cj.sampled_preconditioner(op, key=jax.random.key(0), rank=p, samples=1000)
    u, s = np.asarray(pre.basis), np.asarray(pre.eigenvalues)
    np.testing.assert_allclose(u @ u.T, np.eye(p), atol=1e-10)
    assert np.all(s >= 0) and np.all(np.diff(s) <= 0)
    ggn = problem.ggn - LAM * np.eye(p)
    assert np.linalg.norm(u.T @ np.diag(s) @ u - ggn) <= 0.05 * np.linalg.norm(ggn)
    assert pre.fingerprint == op.fingerprint and pre.num_products == 4 and pre.note.startswith("sampled")


def test_a_curvature_sample_gives_the_sample_ggn():
    problem = get_problem("softmax")
    p = problem.num_params
    idx = np.arange(0, 40, 3)
    w = np.linspace(0.5, 2.0, idx.size)
    sample = cj.CurvatureSample(jnp.asarray(idx), jnp.asarray(w))
    pre = cj.sampled_preconditioner(cj.DampedGGN(problem.task, damping=LAM, curvature=sample),
                                    key=jax.random.key(2), rank=p, samples=4000)
    want = np.einsum("n,nqi,nqr,nrj->ij", w, problem.jac[idx], problem.out_hess[idx], problem.jac[idx]) / w.sum()
    u, s = np.asarray(pre.basis), np.asarray(pre.eigenvalues)
    assert np.linalg.norm(u.T @ np.diag(s) @ u - want) <= 0.05 * np.linalg.norm(want)


def test_the_result_does_not_depend_on_the_chunks():
    # Every draw is keyed by its example's index, so chunking changes rounding only.
    problem = get_problem("mlp")
    kw = dict(key=jax.random.key(3), rank=8, power_iters=1)
    a = cj.sampled_preconditioner(cj.DampedGGN(problem.task, damping=LAM, batch_size=5), **kw)
    b = cj.sampled_preconditioner(cj.DampedGGN(problem.task, damping=LAM, batch_size=48), **kw)
    np.testing.assert_allclose(np.asarray(a.eigenvalues), np.asarray(b.eigenvalues), rtol=1e-9)
    np.testing.assert_allclose(np.abs(np.asarray(a.basis @ b.basis.T)), np.eye(8), atol=1e-7)


def test_a_cache_takes_the_sampled_factors():
    problem = get_problem("softmax")
    op = cj.DampedGGN(problem.task, damping=LAM, batch_size=BATCH)
    pre = cj.sampled_preconditioner(op, key=jax.random.key(4), rank=12, samples="exact")
    cache = cj.build_cache(problem.task, num_clusters=4, sketch_dim=4, damping=LAM, batch_size=BATCH,
                           key=jax.random.key(0), solver=cj.CG(rtol=1e-8, preconditioner=pre),
                           correction=cj.CalibratedCorrection(rank=12))
    np.testing.assert_array_equal(np.asarray(cache.lowrank.basis), np.asarray(pre.basis))
    # The factors precondition the cluster solves too; the solves still meet their tolerance.
    assert float(cache.residuals.max()) <= 1e-8


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "`rank` must be at least 1"),
    (dict(rank=10_000), "exceeds the number of parameters"),
    (dict(rank=4, power_iters=-1), "`power_iters` must be an integer >= 0"),
    (dict(rank=4, samples=0), "`samples` must be at least 1"),
])
def test_bad_settings_are_refused(kwargs, match):
    problem = get_problem("softmax")
    with pytest.raises(ValueError, match=match):
        cj.sampled_preconditioner(cj.DampedGGN(problem.task, damping=LAM), key=jax.random.key(0), **kwargs)
    with pytest.raises(TypeError, match="DampedGGN"):
        cj.sampled_preconditioner(problem.task, key=jax.random.key(0), rank=4)


@pytest.mark.parametrize("name", PROBLEMS)
def test_exact_columns_at_full_rank_are_the_ggn(name):
    # samples="exact": the q columns J^T L e_a per example sum to J^T W J with no draws, so at
    # r = p the factors are the GGN to rounding (float64).
    problem = get_problem(name)
    p = problem.num_params
    pre = cj.sampled_preconditioner(cj.DampedGGN(problem.task, damping=LAM, batch_size=BATCH), key=jax.random.key(5),
                                    rank=p, samples="exact", power_iters=0)
    u, s = np.asarray(pre.basis), np.asarray(pre.eigenvalues)
    ggn = problem.ggn - LAM * np.eye(p)
    np.testing.assert_allclose(u.T @ np.diag(s) @ u, ggn, atol=1e-9 * np.abs(ggn).max())
    np.testing.assert_allclose(s, np.sort(np.linalg.eigvalsh(ggn))[::-1], atol=1e-9 * s[0])


@pytest.mark.parametrize("name", PROBLEMS)
def test_exact_columns_below_full_rank_are_a_nystrom_approximation(name):
    # With the exact columns the second pass gives the exact GGN Q, so the factors are the stable
    # Nystrom approximation of the GGN itself in the range pass's basis: never above the GGN (the
    # residual is PSD), in two passes (no eigenvalue pass).
    problem = get_problem(name)
    p = problem.num_params
    r = max(2, p // 3)
    pre = cj.sampled_preconditioner(cj.DampedGGN(problem.task, damping=LAM, batch_size=BATCH), key=jax.random.key(6),
                                    rank=r, samples="exact", power_iters=0)
    assert pre.num_products == 2 and pre.rank == r and "2 passes" in pre.note
    u, s = np.asarray(pre.basis), np.asarray(pre.eigenvalues)
    ggn = problem.ggn - LAM * np.eye(p)
    residual = ggn - u.T @ np.diag(s) @ u
    assert np.linalg.eigvalsh((residual + residual.T) / 2).min() >= -1e-9 * s[0]
    # the captured values are the GGN's own Rayleigh quotients or below (Nystrom), and ordered
    assert np.all(s <= np.einsum("rp,pq,rq->r", u, ggn, u) + 1e-9 * s[0]) and np.all(np.diff(s) <= 0)
