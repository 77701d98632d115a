"""Curvature samplers (logit_sample, feature_sample) against exact probabilities and geometry.

Frequency tests draw many samples with fixed keys and compare empirical inclusion
frequencies with their exact values, to 5 binomial standard errors (a false
failure has probability below 1e-5 per entry; with fixed keys the outcome is
deterministic anyway).
"""

import jax
import numpy as np
import pytest

import cif_jax as cj

DRAWS = 4000


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _within_binomial(freq, p, draws=DRAWS):
    se = np.sqrt(p * (1 - p) / draws)
    np.testing.assert_array_less(np.abs(freq - p), 5 * se + 1e-12)


def test_logit_sample_inclusion_frequencies():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12, 2)) * 1.5
    sm = _softmax(logits)
    pi = sm / sm.sum(axis=0, keepdims=True)  # pi_y(i)
    # per_class = 1: the class draws are independent single draws; i is in the union with
    # probability pi_0(i) + pi_1(i) - pi_0(i) pi_1(i).
    want = pi[:, 0] + pi[:, 1] - pi[:, 0] * pi[:, 1]
    counts = np.zeros(12)
    for k in range(DRAWS):
        s = cj.logit_sample(logits, per_class=1, key=jax.random.key(k))
        counts[np.asarray(s.indices)] += 1
        assert np.all(np.asarray(s.weights) == 1)
    _within_binomial(counts / DRAWS, want)


def test_logit_sample_structure():
    logits = np.random.default_rng(1).normal(size=(50, 4))
    s = cj.logit_sample(logits, per_class=5, key=jax.random.key(0), num_examples=50)
    idx = np.asarray(s.indices)
    assert 5 <= idx.size <= 20 and np.all(np.diff(idx) > 0)
    again = cj.logit_sample(logits, per_class=5, key=jax.random.key(0))
    np.testing.assert_array_equal(idx, np.asarray(again.indices))
    # Usable as curvature.
    assert cj.CurvatureSample(s.indices, s.weights) == s


def _blobs(seed=0, per=30, centres=((0, 0), (10, 0), (0, 10))):
    rng = np.random.default_rng(seed)
    pts = np.concatenate([np.asarray(c)[None, :] + rng.normal(size=(per, 2)) for c in centres])
    return pts


def test_feature_sample_topk_on_blobs():
    pts = _blobs()
    s = cj.feature_sample(pts, num_clusters=3, per_cluster=4, mode="topk", key=jax.random.key(0))
    idx = np.asarray(s.indices)
    assert idx.size == 12
    # Exact reference: the blobs are the clusters; per blob, the 4 members nearest its mean.
    want = []
    for b in range(3):
        members = np.arange(30 * b, 30 * (b + 1))
        d = np.linalg.norm(pts[members] - pts[members].mean(axis=0), axis=1)
        want += members[np.argsort(d)[:4]].tolist()
    np.testing.assert_array_equal(idx, np.sort(want))
    np.testing.assert_array_equal(np.asarray(s.weights), np.ones(12))


def test_feature_sample_stratified_weights():
    pts = np.concatenate([_blobs(per=30)[:30], _blobs(per=10)[10:30]])  # blobs of 30, 10, 10
    s = cj.feature_sample(pts, num_clusters=3, per_cluster=5, mode="topk", weighting="stratified",
                          key=jax.random.key(1))
    w = np.asarray(s.weights)
    idx = np.asarray(s.indices)
    np.testing.assert_allclose(w[idx < 30], 30 / 5)
    np.testing.assert_allclose(w[idx >= 30], 10 / 5)


def test_feature_sample_weighted_frequencies():
    # One cluster: each draw of one member has probability exp(-d_i / tau) / sum, tau = median d.
    rng = np.random.default_rng(2)
    pts = rng.normal(size=(10, 3))
    d = np.linalg.norm(pts - pts.mean(axis=0), axis=1)
    p = np.exp(-d / np.median(d))
    p /= p.sum()
    counts = np.zeros(10)
    for k in range(DRAWS):
        s = cj.feature_sample(pts, num_clusters=1, per_cluster=1, mode="weighted", key=jax.random.key(k))
        counts[np.asarray(s.indices)] += 1
    _within_binomial(counts / DRAWS, p)
    # An explicit temperature replaces the median.
    t = 0.3
    pt = np.exp(-d / t)
    pt /= pt.sum()
    counts[:] = 0
    for k in range(DRAWS):
        s = cj.feature_sample(pts, num_clusters=1, per_cluster=1, mode="weighted", temperature=t,
                              key=jax.random.key(k))
        counts[np.asarray(s.indices)] += 1
    _within_binomial(counts / DRAWS, pt)


def test_feature_sample_from_a_cache_and_as_curvature():
    from _models import LAM, softmax_problem

    problem = softmax_problem()
    cache = cj.build_cache(problem.task, num_clusters=4, sketch_dim=3, damping=LAM, key=jax.random.key(0),
                           normalize_sketches=True)
    s = cj.feature_sample(cache, num_clusters=4, per_cluster=3, key=jax.random.key(1), weighting="stratified")
    sk = np.asarray(cache.sketches)
    unit = sk / np.linalg.norm(sk, axis=1, keepdims=True)  # the points this cache clustered
    direct = cj.feature_sample(unit, num_clusters=4, per_cluster=3, key=jax.random.key(1), weighting="stratified")
    np.testing.assert_array_equal(np.asarray(s.indices), np.asarray(direct.indices))
    out = cj.solve_ggn(problem.task, np.ones((1, problem.num_params)), damping=LAM, curvature=s)
    assert bool(out.converged.all())


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: cj.logit_sample(np.zeros((4, 3)), per_class=2, key=jax.random.key(0)), ValueError,
         r"`per_class` \* Y"),
        (lambda: cj.logit_sample(np.zeros((4,)), per_class=1, key=jax.random.key(0)), ValueError, "2-D"),
        (lambda: cj.logit_sample(np.full((4, 2), np.nan), per_class=1, key=jax.random.key(0)), ValueError,
         "NaN or Inf"),
        (lambda: cj.logit_sample(np.zeros((4, 2)), per_class=1, key=jax.random.key(0), num_examples=5),
         ValueError, "rows but the task has N = 5"),
        (lambda: cj.logit_sample(np.zeros((4, 2)), per_class=0, key=jax.random.key(0)), ValueError,
         "`per_class` must be at least 1"),
        (lambda: cj.feature_sample(np.zeros((6, 2)), num_clusters=3, per_cluster=3, key=jax.random.key(0)),
         ValueError, r"`per_cluster` \* `num_clusters`"),
        (lambda: cj.feature_sample(np.zeros((6, 2)), num_clusters=2, per_cluster=1, mode="best",
                                   key=jax.random.key(0)), ValueError, "`mode` must be one of"),
        (lambda: cj.feature_sample(np.zeros((6, 2)), num_clusters=2, per_cluster=1, weighting="x",
                                   key=jax.random.key(0)), ValueError, "`weighting` must be one of"),
        (lambda: cj.feature_sample(np.zeros((6, 2)), num_clusters=2, per_cluster=1, mode="weighted",
                                   temperature=0.0, key=jax.random.key(0)), ValueError, "`temperature` must be > 0"),
        (lambda: cj.feature_sample(np.zeros((6, 2)), num_clusters=2, per_cluster=1, temperature=1.0,
                                   key=jax.random.key(0)), ValueError, "mode='weighted' only"),
        (lambda: cj.feature_sample(np.full((6, 2), np.inf), num_clusters=2, per_cluster=1,
                                   key=jax.random.key(0)), ValueError, "NaN or Inf"),
        (lambda: cj.feature_sample(np.zeros((6, 2), np.int32), num_clusters=2, per_cluster=1,
                                   key=jax.random.key(0)), TypeError, "floating-point"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
