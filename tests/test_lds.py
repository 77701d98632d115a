"""The linear datamodeling score, its random subsets and its vectorised retrainer.

References: ``scipy.stats.spearmanr`` per test example for the score; the LDS
of a method that returns the retrained models' own losses is exactly 1, that
of independent random scores is near 0; a seed-by-seed ``train_many`` loop for
the retrainer; and, end to end on a convex model (L2 logistic regression), exact
IF scores (numpy) predict 50%-subset retraining well and with the right sign.
"""

import functools

import _linear as L
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import spearmanr

import cif_jax as cj

WD = 0.05
GD = dict(num_steps=150, learning_rate=3.0, momentum=0.5, weight_decay=WD)  # converges here to ||grad|| ~ 1e-16


# -- random subsets -------------------------------------------------------------------------


@pytest.mark.parametrize("n, fraction, size", [(10, 0.5, 5), (11, 0.5, 6), (20, 0.25, 5)])
def test_random_subsets(n, fraction, size, getkey):
    key = getkey()
    keep = cj.random_subsets(key, 200, n, fraction=fraction)
    assert keep.shape == (200, n) and keep.dtype == bool
    assert np.all(keep.sum(axis=1) == size)
    np.testing.assert_array_equal(cj.random_subsets(key, 200, n, fraction=fraction), keep)
    assert not np.array_equal(cj.random_subsets(getkey(), 200, n, fraction=fraction), keep)
    # Uniform over examples: each is kept in about `fraction` of the subsets (binomial sd <= 0.035 here).
    assert np.all(np.abs(keep.mean(axis=0) - size / n) < 0.15)


@pytest.mark.parametrize("kwargs, match", [
    (dict(fraction=0.0), "fraction"), (dict(fraction=1.0), "fraction"), (dict(fraction=0.01), "fraction"),
    (dict(fraction=float("nan")), "fraction"), (dict(num_subsets=0), "num_subsets"),
])
def test_random_subsets_bad_input(kwargs, match):
    full = dict(key=jax.random.key(0), num_subsets=4, num_examples=10)
    full.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cj.random_subsets(**full)


# -- the score ------------------------------------------------------------------------------


def _synthetic(m=30, n=12, t=8, seed=0):
    rng = np.random.default_rng(seed)
    keep = rng.random((m, n)) < 0.5
    return keep, rng.normal(size=(t, n)), rng.normal(size=(m, t))


def test_lds_matches_scipy_spearman():
    keep, scores, losses = _synthetic()
    losses[:4, 0] = losses[4, 0]  # ties in the losses of one test example
    got = cj.lds(scores, keep, losses)
    predictions = -(keep.astype(float) @ scores.T)
    want = np.array([spearmanr(predictions[:, z], losses[:, z]).statistic for z in range(losses.shape[1])])
    np.testing.assert_allclose(got.per_example, want, rtol=1e-12, atol=1e-14)
    assert got.score == pytest.approx(want.mean(), rel=1e-12)


def test_lds_of_the_models_own_losses_is_one():
    keep, _, losses = _synthetic()
    outcome = {row.tobytes(): losses[m] for m, row in enumerate(keep)}  # the oracle: train on S, report its loss
    assert len(outcome) == keep.shape[0]

    def oracle(k):
        return np.stack([outcome[row.tobytes()] for row in k])

    got = cj.lds(oracle, keep, losses)
    assert got.score == 1.0 and np.all(got.per_example == 1.0)
    assert cj.lds(lambda k: -oracle(k), keep, losses).score == -1.0


def test_lds_of_random_scores_is_near_zero():
    keep, scores, _ = _synthetic(m=60, n=40, t=200, seed=1)
    losses = np.random.default_rng(2).normal(size=(60, 200))
    got = cj.lds(scores, keep, losses)
    assert abs(got.score) < 0.05  # independent: sd of the mean ~ 1/sqrt(59 * 200) = 0.009; measured 0.012


def test_lds_warns_on_constant_losses():
    keep, scores, losses = _synthetic()
    losses[:, 2] = 1.0
    with pytest.warns(UserWarning, match="undefined for 1 of 8"):
        got = cj.lds(scores, keep, losses)
    assert np.isnan(got.per_example[2]) and got.score == pytest.approx(np.delete(got.per_example, 2).mean())


def test_lds_bad_input():
    keep, scores, losses = _synthetic()
    with pytest.raises(ValueError, match="boolean"):
        cj.lds(scores, keep.astype(int), losses)
    with pytest.raises(ValueError, match="at least 3"):
        cj.lds(scores, keep[:2], losses[:2])
    with pytest.raises(ValueError, match="losses"):
        cj.lds(scores, keep, losses[:-1])
    with pytest.raises(ValueError, match="num_test, N"):
        cj.lds(scores[:, :-1], keep, losses)
    with pytest.raises(ValueError, match="num_test, N"):
        cj.lds(scores[:-1], keep, losses)
    with pytest.raises(ValueError, match=r"`losses` contain NaN or Inf for 1 test example\(s\), e.g. \[3\]"):
        cj.lds(scores, keep, np.where(np.arange(8) == 3, np.nan, losses))
    with pytest.raises(ValueError, match="`attributions` contain NaN"):
        cj.lds(np.where(np.arange(12) == 0, np.inf, scores), keep, losses)
    with pytest.raises(ValueError, match=r"must return predictions of shape \(M, num_test\) = \(30, 8\)"):
        cj.lds(lambda k: losses.T, keep, losses)


# -- the retrainer --------------------------------------------------------------------------


def test_subset_losses_average_seeds_of_the_right_subsets():
    """M x S vmapped models == the same models trained seed-major by train_many, averaged per subset.

    Same shapes as the convex problem below (compiled once); a small learning rate
    stops short of the optimum, so the seeds matter.
    """
    task, xe, ye, keep, seeds = _convex_setup()
    settings = {**GD, "learning_rate": 0.02}
    got = np.asarray(cj.subset_losses(task, keep, xe, ye, init_params=seeds, stacked_init=True, **settings))
    m = keep.shape[0]
    assert got.shape == (m, xe.shape[0])
    # Reference ordering: seed s, subset k is row s * M + k.
    inits = jax.tree_util.tree_map(lambda a: jnp.repeat(a, m, axis=0), seeds)
    models = cj.train_many(task, np.tile(keep, (2, 1)), init_params=inits, stacked_init=True, **settings)
    per_seed = np.asarray(cj.evaluate_many(task, models.params, xe, ye)).reshape(2, m, -1)
    assert not np.allclose(per_seed[0], per_seed[1], rtol=1e-3)  # the seeds matter here
    np.testing.assert_allclose(got, per_seed.mean(axis=0), rtol=1e-12)


def _convex_setup(n=60):
    task, xe, ye = L.blobs(n)
    keep = cj.random_subsets(jax.random.key(0), 40, n)
    seeds = {"w": 0.3 * jax.random.normal(jax.random.key(1), (2, 3, 3)), "b": jnp.zeros((2, 3))}
    return task, xe, ye, keep, seeds


@functools.cache
def _convex_lds_problem():
    """L2 logistic regression: 40 random halves of N = 60, two seeds each; exact IF and Grad-Dot scores.

    The scores are computed in numpy from closed forms (``_linear``): IF is
    ``(1/N) g_z^T (H + WD I)^{-1} g_i`` with H the Hessian of the mean loss at the optimum.
    """
    task, xe, ye, keep, seeds = _convex_setup()
    n = task.num_examples
    base = cj.train_many(task, np.ones((1, n), bool), **GD)
    assert float(base.grad_norm[0]) < 1e-12
    theta0 = jax.tree_util.tree_map(lambda a: a[0], base.params)
    losses = np.asarray(cj.subset_losses(task, keep, xe, ye, init_params=seeds, stacked_init=True, **GD))
    g_train, g_eval = L.loss_grads(theta0, task.inputs, task.targets), L.loss_grads(theta0, xe, ye)
    h = L.ggn(theta0, task.inputs) + WD * np.eye(g_train.shape[1])
    return keep, losses, g_eval @ np.linalg.solve(h, g_train.T) / n, g_eval @ g_train.T


def test_lds_of_influence_on_a_convex_model():
    keep, losses, s_if, s_dot = _convex_lds_problem()
    lds_if, lds_dot = cj.lds(s_if, keep, losses).score, cj.lds(s_dot, keep, losses).score
    # Measured: IF 0.972, Grad-Dot 0.928; the sign convention matters: -IF gives -0.972.
    assert lds_if > 0.9 and lds_dot > 0.8 and lds_if > lds_dot
    assert cj.lds(-s_if, keep, losses).score == pytest.approx(-lds_if, rel=1e-12)
    random = np.random.default_rng(3).normal(size=s_if.shape)
    assert abs(cj.lds(random, keep, losses).score) < 0.15  # measured -0.018 (sd ~ 0.04 over 20 test examples)


# -- the per-example (datamodel) LDS of STRIDE's appendix C.1 --------------------------------


def test_datamodel_lds_matches_a_loop_and_scipy():
    """The datamodel is the per-example difference of mean losses out/in; the score scipy's Spearman."""
    rng = np.random.default_rng(0)
    keep = cj.random_subsets(jax.random.key(4), 30, 12)
    losses = rng.normal(size=(30, 3))
    scores = rng.normal(size=(3, 12))
    res = cj.datamodel_lds(scores, keep, losses, key=jax.random.key(1))
    want = np.array([[losses[~keep[:, i], t].mean() - losses[keep[:, i], t].mean() for i in range(12)]
                     for t in range(3)])
    np.testing.assert_allclose(res.datamodel, want, rtol=1e-12, atol=1e-15)
    rho = [spearmanr(scores[t], want[t]).statistic for t in range(3)]
    np.testing.assert_allclose(res.per_example, rho, rtol=1e-12)
    assert res.score == pytest.approx(np.mean(rho), rel=1e-12)
    # The split is into two disjoint halves of the 30 rows: reproduce it from the same key.
    order = np.asarray(jax.random.permutation(jax.random.key(1), 30))
    h0, h1 = np.sort(order[:15]), np.sort(order[15:])
    d0, d1 = (cj.datamodel_lds(scores, keep[h], losses[h]).datamodel for h in (h0, h1))
    split = np.mean([spearmanr(d0[t], d1[t]).statistic for t in range(3)])
    assert res.split_half == pytest.approx(split, rel=1e-12)
    assert res.ceiling == pytest.approx(np.sqrt(max(2 * split / (1 + split), 0)), rel=1e-12)


def test_datamodel_lds_recovers_a_linear_datamodel():
    """Losses = b + sum_{i in S} beta_i (+ noise): the true -beta scores near 1, +beta near -1.

    The other members' betas are the main noise: a loss varies across subsets by
    sd(sum_{j in S} beta_j) = sqrt(sum beta^2 / 4) = 1.8, so with M = 8000 halves the
    difference-in-means has sd 2 * 1.8 / sqrt(M) = 0.04 per coefficient, against
    betas of sd 0.58: Pearson 0.995 expected (measured Spearman 0.993, split-half 0.979).
    The fixed subset size adds beta_i / (N - 1) and a constant: no change of rank.
    Pure noise losses: split-half and score near 0.
    """
    rng = np.random.default_rng(1)
    n, m = 40, 8000
    beta = rng.uniform(-1, 1, size=(2, n))
    keep = cj.random_subsets(jax.random.key(5), m, n)
    losses = 3.0 + keep @ beta.T + 0.1 * rng.normal(size=(m, 2))
    good = cj.datamodel_lds(-beta, keep, losses)
    assert good.score > 0.98 and good.split_half > 0.97 and good.ceiling > 0.98
    assert cj.datamodel_lds(beta, keep, losses).score < -0.98
    noise = cj.datamodel_lds(-beta, keep, rng.normal(size=(m, 2)))
    assert abs(noise.score) < 0.35 and abs(noise.split_half) < 0.35  # sd of a Spearman over 40 pairs: 0.16


def test_datamodel_lds_bad_input():
    keep = cj.random_subsets(jax.random.key(0), 20, 8)
    losses, scores = np.zeros((20, 2)) + np.arange(20)[:, None], np.ones((2, 8))
    with pytest.raises(ValueError, match="at least 4"):
        cj.datamodel_lds(scores, keep[:3], losses[:3])
    with pytest.raises(ValueError, match="shape"):
        cj.datamodel_lds(scores[:, :7], keep, losses)
    with pytest.raises(ValueError, match="`losses` must have shape"):
        cj.datamodel_lds(scores, keep, losses[:19])
    always = keep.copy()
    always[:, 3] = True
    with pytest.raises(ValueError, match=r"example\(s\) \[3\] are inside every or no subset"):
        cj.datamodel_lds(scores, always, losses)
    bad = scores.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="attributions"):
        cj.datamodel_lds(bad, keep, losses)
    nan_losses = losses.copy()
    nan_losses[4, 1] = np.inf
    with pytest.raises(ValueError, match="losses"):
        cj.datamodel_lds(scores, keep, nan_losses)
    with pytest.raises(ValueError, match="boolean"):
        cj.datamodel_lds(scores, keep.astype(int), losses)


def test_datamodel_lds_ceiling_predicts_a_perfect_method():
    """The Spearman-Brown ceiling is the expected score of the noise-free datamodel.

    Linear losses with N = 200 and M = 100 halves: the datamodel is noisy (split-half
    0.18), and the true -beta's score averages to the ceiling. Measured over 8
    draws: mean score 0.549, mean ceiling 0.553 (the uncorrected 2r/(1+r) would
    say 0.31, the split-half itself 0.18). A constant loss row gives NaN for that test
    example, with a warning; a split-half of -1 gives ceiling 0, not a division error.
    """
    n, m = 200, 100
    got, ceil = [], []
    for seed in range(8):
        rng = np.random.default_rng(10 + seed)
        beta = rng.normal(size=(3, n))
        keep = cj.random_subsets(jax.random.key(seed), m, n)
        res = cj.datamodel_lds(-beta, keep, keep @ beta.T)
        got.append(res.score)
        ceil.append(res.ceiling)
    assert 0.1 < np.mean(ceil) < 0.9
    assert abs(np.mean(got) - np.mean(ceil)) < 0.06
    rng = np.random.default_rng(0)
    keep = cj.random_subsets(jax.random.key(0), 40, 6)
    losses = np.stack([rng.normal(size=40), np.ones(40)], axis=1)
    with pytest.warns(UserWarning, match="undefined for 1 of 2"):
        res = cj.datamodel_lds(rng.normal(size=(2, 6)), keep, losses)
    assert np.isnan(res.per_example[1]) and np.isfinite(res.score)
