"""The self-influence correction (cif_jax.cif.correction) against dense float64 references.

References (tests/_models.py): per-example gradients from ``jax.grad`` in a loop, the
damped GGN built from closed-form output Hessians, dense solves. The partition is
taken from the cache (k-means is tested elsewhere); everything else is recomputed:

* ``t_i = g_i^T H~^{-1} (g_i - mu_c(i)) / N`` (exact estimator);
* the corrected score of (S, V): ``g_V . (1/N) sum_c m_c(S) v_c + (1/|V|) sum_{i in S cap V} t_i``
  with ``g_V`` the mean gradient over V and ``v_c = H~^{-1} mu_c``;
* per-query IF: ``g_V . (1/N) H~^{-1} sum_{i in S} g_i``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import BATCH, LAM, NUM_CLUSTERS, PROBLEMS, RTOL, SKETCH_DIM, N, dense_means, dense_solve, get_problem

import cif_jax as cj

# Dense solves vs CG at RTOL = 1e-12 on condition numbers <= ~500: agreement 1e-15 .. 1e-11.
TOL = 1e-9
FOLDS = [np.arange(k, N, 6) for k in range(6)]  # 6 folds of 8: a partition


def _build(problem, correction, *, num_clusters=NUM_CLUSTERS, preconditioner="auto"):
    return cj.build_cache(problem.task, num_clusters=num_clusters, sketch_dim=SKETCH_DIM, damping=LAM,
                          key=jax.random.key(0), solver=cj.CG(rtol=RTOL, preconditioner=preconditioner), batch_size=BATCH, correction=correction)


@pytest.fixture(scope="module", params=PROBLEMS)
def problem(request):
    return get_problem(request.param)


@pytest.fixture(scope="module")
def exact(problem):
    with _quiet():
        return _build(problem, cj.ExactCorrection(rank=0))  # rank 0: the clusters and whole self terms


class _quiet:
    """Ignores the dominant-cluster advice of these random problems."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message="one cluster holds", category=UserWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _reference(problem, cache):
    """Dense ``t`` (N,), responses ``v_c`` (C, p) and the exact self-influences ``g_i^T H~^{-1} g_i / N``."""
    a = np.asarray(cache.assignments)
    g = problem.grads
    mu = dense_means(g, a, cache.num_clusters)
    x = dense_solve(problem.ggn, g)
    t = (np.einsum("ij,ij->i", g, x) - np.einsum("ij,ij->i", g, dense_solve(problem.ggn, mu)[a])) / N
    return t, dense_solve(problem.ggn, mu), np.einsum("ij,ij->i", g, x) / N


def _dense_score(problem, cache, t, s, v):
    """The corrected score of removing S, evaluated on V (mean loss over V), densely."""
    a = np.asarray(cache.assignments)
    _, resp, _ = _reference(problem, cache)
    g_v = problem.grads[v].mean(axis=0)
    paper = g_v @ resp[a[s]].sum(axis=0) / N
    both = np.intersect1d(s, v)
    return paper + t[both].sum() / len(v), paper


def _dense_if(problem, s, v):
    return problem.grads[v].mean(axis=0) @ dense_solve(problem.ggn, problem.grads[s].sum(axis=0)[None])[0] / N


# -- the exact estimator ---------------------------------------------------------------------


def test_exact_terms_match_dense(problem, exact):
    t, _, self_inf = _reference(problem, exact)
    terms = exact.correction
    assert terms.method == "exact" and terms.values.shape == (N,)
    np.testing.assert_allclose(np.asarray(terms.values), t, rtol=0, atol=TOL * np.abs(t).max())
    assert float(np.nanmax(np.asarray(terms.residuals))) <= RTOL
    np.testing.assert_allclose(np.asarray(terms.grad_norms), np.linalg.norm(problem.grads, axis=1), rtol=1e-12)
    # Self-influence: the corrected score of S = V = {i}; the paper's lacks t_i.
    got = np.asarray(cj.self_influence(exact, problem.task, batch_size=BATCH))
    np.testing.assert_allclose(got, self_inf, rtol=0, atol=TOL * np.abs(self_inf).max())
    some = np.array([3, 0, 17])
    paper = np.asarray(cj.self_influence(exact, problem.task, some, estimator="paper"))
    np.testing.assert_allclose(paper + t[some], self_inf[some], rtol=0, atol=TOL * np.abs(self_inf).max())


def test_corrected_fold_scores_match_dense(problem, exact):
    t, _, _ = _reference(problem, exact)
    got = np.asarray(cj.fold_loss_delta(exact, problem.task, FOLDS, batch_size=BATCH))
    paper = np.asarray(cj.fold_loss_delta(exact, problem.task, FOLDS, batch_size=BATCH, estimator="paper"))
    want = np.array([_dense_score(problem, exact, t, f, f) for f in FOLDS])
    np.testing.assert_allclose(got, want[:, 0], rtol=TOL)
    np.testing.assert_allclose(paper, want[:, 1], rtol=TOL)
    # The same through the alphas path, told that the evaluation sets are the folds.
    alphas = cj.fold_alphas(exact, problem.task, FOLDS, batch_size=BATCH)
    via = np.asarray(cj.loss_delta_from_alphas(exact, FOLDS, alphas, eval_sets=FOLDS))
    np.testing.assert_allclose(via, got, rtol=1e-12)


def test_partial_and_shared_overlap(problem, exact):
    t, _, _ = _reference(problem, exact)
    subsets = [np.arange(0, 10), np.arange(5, 30), np.array([40, 41])]
    evals = [np.arange(5, 15), np.arange(0, 8), np.array([1, 2, 3])]  # overlaps of 5, 3 and 0 members
    g_v = np.stack([problem.grads[v].mean(axis=0) for v in evals])
    got = np.asarray(cj.loss_delta(exact, subsets, g_v, eval_sets=evals))
    want = np.array([_dense_score(problem, exact, t, s, v)[0] for s, v in zip(subsets, evals)])
    np.testing.assert_allclose(got, want, rtol=TOL)
    corr = np.asarray(cj.overlap_correction(exact, subsets, evals))
    assert corr[2] == 0
    np.testing.assert_allclose(corr[:2], [t[np.arange(5, 10)].sum() / 10, t[np.arange(5, 8)].sum() / 8], rtol=1e-12)
    # One evaluation set shared by every query.
    shared = np.arange(0, 12)
    got = np.asarray(cj.loss_delta(exact, subsets, problem.grads[shared].mean(axis=0), eval_sets=[shared]))
    want = np.array([_dense_score(problem, exact, t, s, shared)[0] for s in subsets])
    np.testing.assert_allclose(got, want, rtol=TOL)


def test_no_overlap_means_no_correction(problem, exact):
    s, v = [np.arange(0, 10)], [np.arange(20, 30)]
    g_v = problem.grads[v[0]].mean(axis=0)
    bare = np.asarray(cj.loss_delta(exact, s, g_v))
    told = np.asarray(cj.loss_delta(exact, s, g_v, eval_sets=v))
    paper = np.asarray(cj.loss_delta(exact, s, g_v, eval_sets=v, estimator="paper"))
    np.testing.assert_array_equal(bare, told)
    np.testing.assert_array_equal(bare, paper)
    # A bare evaluation gradient of an overlapping set: no overlap is known, nothing added.
    same = np.asarray(cj.loss_delta(exact, s, problem.grads[s[0]].mean(axis=0)))
    paper_same = np.asarray(cj.loss_delta(exact, s, problem.grads[s[0]].mean(axis=0), eval_sets=s, estimator="paper"))
    np.testing.assert_array_equal(same, paper_same)


def test_fold_matrix(problem, exact):
    t, _, _ = _reference(problem, exact)
    m = np.asarray(cj.fold_matrix(exact, problem.task, FOLDS, batch_size=BATCH))
    assert m.shape == (6, 6)
    for i, f in enumerate(FOLDS):
        for j, v in enumerate(FOLDS):
            want = _dense_score(problem, exact, t, f, v)[0]
            np.testing.assert_allclose(m[i, j], want, rtol=TOL, atol=1e-14)
    np.testing.assert_allclose(np.diag(m), np.asarray(cj.fold_loss_delta(exact, problem.task, FOLDS)), rtol=1e-12)


def _dense_cross(problem, cache, s, v):
    """The cross terms ``(1/(N|V|)) sum_{i in S} (G_V - 1[i in V] g_i)^T H~^{-1} d_i``, densely."""
    a = np.asarray(cache.assignments)
    g = problem.grads
    d = g - dense_means(g, a, cache.num_clusters)[a]
    x = dense_solve(problem.ggn, d[s])
    g_v = g[v].sum(axis=0)
    left = g_v[None, :] - np.isin(s, v)[:, None] * g[s]
    return np.einsum("ij,ij->", left, x) / (N * len(v))


def test_exact_error_is_the_cross_terms_and_the_bound_holds(problem, exact):
    subsets = FOLDS + [np.arange(0, 20)]
    evals = FOLDS + [np.arange(10, 25)]
    g_v = np.stack([problem.grads[v].mean(axis=0) for v in evals])
    est = np.asarray(cj.loss_delta(exact, subsets, g_v, eval_sets=evals))
    ifs = np.array([_dense_if(problem, s, v) for s, v in zip(subsets, evals)])
    cross = np.array([_dense_cross(problem, exact, s, v) for s, v in zip(subsets, evals)])
    # With exact t_i (and converged solves) the corrected score misses exactly the cross terms.
    np.testing.assert_allclose(ifs - est, cross, rtol=0, atol=TOL * np.abs(ifs).max())
    b = cj.corrected_error_bound(exact, problem.task, subsets, evals, batch_size=BATCH)
    assert b.correction_is_bound
    assert np.all(np.abs(cross) <= np.asarray(b.cross) * (1 + 1e-9))
    assert np.all(np.abs(ifs - est) <= np.asarray(b.cross + b.correction + b.solver) * (1 + 1e-9) + 1e-15)
    # V = S when no evaluation sets are given.
    folds_only = cj.corrected_error_bound(exact, problem.task, FOLDS, batch_size=BATCH)
    np.testing.assert_allclose(np.asarray(folds_only.cross), np.asarray(b.cross)[:6], rtol=1e-9)
    # One evaluation set shared by every query.
    shared = np.arange(0, 12)
    est = np.asarray(cj.loss_delta(exact, FOLDS, problem.grads[shared].mean(axis=0), eval_sets=[shared]))
    ifs = np.array([_dense_if(problem, s, shared) for s in FOLDS])
    cross = np.array([_dense_cross(problem, exact, s, shared) for s in FOLDS])
    np.testing.assert_allclose(ifs - est, cross, rtol=0, atol=TOL * np.abs(ifs).max())
    b = cj.corrected_error_bound(exact, problem.task, FOLDS, [shared], batch_size=BATCH)
    assert np.all(np.abs(cross) <= np.asarray(b.cross) * (1 + 1e-9))


# -- C = N: every estimator reproduces IF --------------------------------------------------


@pytest.mark.parametrize("correction", ["exact", cj.NystromCorrection(rank=4), cj.CalibratedCorrection(rank=4)])
def test_one_cluster_per_example_equals_if(correction):
    # The requirement of the design: written on the deviation, t_i vanishes for C = N with every
    # estimator (even a rank-4 one), so the corrected score is per-query IF.
    problem = get_problem("softmax")
    cache = _build(problem, correction, num_clusters=N)
    assert int(cache.cluster_sizes.max()) == 1
    np.testing.assert_allclose(np.asarray(cache.correction.values), 0.0, atol=1e-15)
    got = np.asarray(cj.fold_loss_delta(cache, problem.task, FOLDS, batch_size=BATCH))
    want = np.array([_dense_if(problem, f, f) for f in FOLDS])
    np.testing.assert_allclose(got, want, rtol=TOL)


# -- the approximate estimators -------------------------------------------------------------


@pytest.fixture(scope="module")
def low_rank():
    """A rank-8 Nystrom preconditioner of the MLP problem (p = 57), shared by the cache and the correction."""
    problem = get_problem("mlp")
    return problem, cj.nystrom_preconditioner(cj.DampedGGN(problem.task, damping=LAM), key=jax.random.key(5), rank=8,
                                                error_iters=0)


def _nystrom_inverse(pre, p):
    u = np.asarray(pre.basis, np.float64).T
    s = np.asarray(pre.eigenvalues, np.float64)
    return u @ np.diag(1 / (s + LAM)) @ u.T + (np.eye(p) - u @ u.T) / LAM


def test_nystrom_estimate_is_the_formula_and_within_its_bound(low_rank):
    problem, pre = low_rank
    with _quiet():
        cache = _build(problem, cj.NystromCorrection(rank=8), preconditioner=pre)
        exact_cache = _build(problem, "exact", preconditioner=pre)
    a = np.asarray(cache.assignments)
    np.testing.assert_array_equal(a, np.asarray(exact_cache.assignments))
    g = problem.grads
    d = g - dense_means(g, a, cache.num_clusters)[a]
    m = _nystrom_inverse(pre, problem.num_params)
    want = np.einsum("ij,jk,ik->i", g, m, d) / N
    got = np.asarray(cache.correction.values)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    assert cache.correction.rank == 8 and np.isnan(np.asarray(cache.correction.residuals)).all()
    # M >= H~^{-1} (the Nystrom approximation never exceeds the GGN): per example, the error is
    # at most ||g|| ||d|| ||M - H~^{-1}||_2 / N, and ||M - H~^{-1}||_2 <= 1 / lambda.
    gap = np.linalg.eigvalsh(m - np.linalg.inv(problem.ggn))
    assert gap.min() > -1e-8 * gap.max() and gap.max() <= 1 / LAM
    err = np.abs(got - np.asarray(exact_cache.correction.values))
    assert np.all(err <= np.linalg.norm(g, axis=1) * np.linalg.norm(d, axis=1) * gap.max() / N * (1 + 1e-9))
    # Self-influence g^T M g >= g^T H~^{-1} g for every example.
    si = np.asarray(cj.self_influence(cache, problem.task))
    si_exact = np.asarray(cj.self_influence(exact_cache, problem.task))
    assert np.all(si >= si_exact - 1e-12 * np.abs(si_exact).max())
    b = cj.corrected_error_bound(cache, problem.task, FOLDS)
    assert b.correction_is_bound
    ifs = np.array([_dense_if(problem, f, f) for f in FOLDS])
    est = np.asarray(cj.fold_loss_delta(cache, problem.task, FOLDS))
    assert np.all(np.abs(ifs - est) <= np.asarray(b.cross + b.correction + b.solver))


def test_calibrated_scale_is_the_hansen_hurwitz_ratio(low_rank):
    problem, pre = low_rank
    with _quiet():
        cache = _build(problem, cj.CalibratedCorrection(rank=8, num_samples=24), preconditioner=pre)
        exact_cache = _build(problem, "exact", preconditioner=pre)
    c = cache.correction
    t = np.asarray(exact_cache.correction.values)
    sample = np.asarray(c.sample)
    raw = np.asarray(c.raw)
    assert sample.shape == (24,) and sample.min() >= 0 and sample.max() < N
    assert np.all(raw[sample] != 0)  # drawn with probability proportional to |estimate|
    np.testing.assert_allclose(np.asarray(c.sample_values), t[sample], rtol=1e-9, atol=1e-14)
    # The scale is the ratio of the Hansen-Hurwitz estimates sum_k y_k / pi_k of the exact and the
    # estimated totals, pi = |raw| / sum |raw|; with positive estimates, the mean of t_k / raw_k.
    pi = np.abs(raw) / np.abs(raw).sum()
    scale = (t[sample] / pi[sample]).mean() / (raw[sample] / pi[sample]).mean()
    np.testing.assert_allclose(float(c.scale), scale, rtol=1e-9)
    resid = (t[sample] - scale * raw[sample]) / pi[sample]
    np.testing.assert_allclose(float(c.scale_stderr),
                               resid.std(ddof=1) / np.sqrt(24) / abs((raw[sample] / pi[sample]).mean()), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(c.values), raw * scale, rtol=1e-12)
    # The remainder: the calibrated self term less its low-rank part (U^T g)^T (s + lam)^-1 U^T d / N.
    low = cache.lowrank
    dev = np.asarray(low.coords) - np.asarray(low.mean_coords)[np.asarray(cache.assignments)]
    low_self = np.sum(np.asarray(low.coords) * dev / (np.asarray(low.eigenvalues) + LAM), axis=1) / N
    np.testing.assert_allclose(np.asarray(c.remainder), np.asarray(c.values) - low_self, rtol=1e-8,
                               atol=1e-12 * np.abs(low_self).max())
    # The Nystrom estimate runs high; the calibrated one brings the total to within 4 standard errors.
    assert raw.sum() > t.sum()
    assert abs(np.asarray(c.values).sum() - t.sum()) <= 4 * float(c.scale_stderr) * abs(raw.sum())
    b = cj.corrected_error_bound(cache, problem.task, FOLDS)
    assert not b.correction_is_bound and np.all(np.asarray(b.correction) > 0)


def test_calibration_with_one_draw_reports_unknown_uncertainty():
    from cif_jax.cif.correction import calibrate

    raw = np.array([1.0, 2.0, -0.5, 0.0])
    scale, stderr, spread = calibrate(raw, np.array([1]), np.array([1.5]))
    np.testing.assert_allclose(scale, 0.75)  # the ratio of t / pi and raw / pi over the one draw
    assert stderr == np.inf and spread == np.inf
    assert calibrate(np.zeros(3), np.array([0, 1]), np.zeros(2)) == (1.0, np.inf, np.inf)


def test_nystrom_factors_built_when_none_given(problem):
    # Without a preconditioner the cache builds its own rank-min(r, p) factors and solves with them;
    # at full rank the Nystrom estimate is exact, and so is the calibration (scale 1).
    with _quiet():
        cache = _build(problem, cj.CalibratedCorrection(rank=1000, num_samples=4))
    t, _, _ = _reference(problem, cache)
    assert cache.correction.rank == problem.num_params and "nystrom" in cache.timing
    np.testing.assert_allclose(np.asarray(cache.correction.raw), t, rtol=0, atol=1e-8 * np.abs(t).max())
    np.testing.assert_allclose(float(cache.correction.scale), 1.0, rtol=1e-6)
    assert int(cache.num_steps.max()) <= 3  # the full-rank factors precondition the C solves exactly
    # Asked for plain CG, the solves stay plain; the correction is the same.
    with _quiet():
        plain = _build(problem, cj.CalibratedCorrection(rank=1000, num_samples=4), preconditioner="none")
    assert int(plain.num_steps.max()) > 3
    np.testing.assert_allclose(np.asarray(plain.correction.raw), np.asarray(cache.correction.raw), rtol=1e-9,
                               atol=1e-12 * np.abs(t).max())


def test_factor_rank_is_capped_by_memory(monkeypatch):
    from cif_jax.cif import correction as cc

    assert cc.factor_rank(256, 57, 8) == 57
    assert cc.factor_rank(256, 10**6, 4) == 256  # 4 x 256 x 10^6 x 4 bytes = 3.8 GiB fits
    assert cc.factor_rank(256, 10**7, 4) == cc.MAX_FACTOR_BYTES // (4 * 10**7 * 4)
    monkeypatch.setattr(cc, "MAX_FACTOR_BYTES", 4 * 57 * 8 * 5)  # room for rank 5
    problem = get_problem("mlp")
    with pytest.warns(UserWarning, match="building at most rank 5 instead"), _quiet():
        cache = _build(problem, cj.NystromCorrection(rank=20))
    assert cache.correction.rank == 5


# -- errors -------------------------------------------------------------------------------------


def test_bad_input_is_refused(problem, exact):
    with pytest.raises(TypeError, match="correction"):
        cj.build_cache(problem.task, num_clusters=2, sketch_dim=2, damping=LAM, key=jax.random.key(0),
                       correction="ekfac")
    with pytest.raises(ValueError, match="rank"):
        cj.NystromCorrection(rank=0)
    with pytest.raises(ValueError, match="num_samples"):
        cj.CalibratedCorrection(num_samples=0)
    with pytest.raises(ValueError, match="eval_sets"):
        cj.loss_delta(exact, [np.arange(3), np.arange(4)], np.ones((2, exact.num_params)),
                      eval_sets=[np.arange(2), np.arange(3), np.arange(4)])
    with pytest.raises(ValueError, match="out of range"):
        cj.loss_delta(exact, [np.arange(3)], np.ones(exact.num_params), eval_sets=[np.array([N])])
    with pytest.raises(ValueError, match="one evaluation gradient"):
        cj.loss_delta(exact, [np.arange(3), np.arange(4)], np.ones(exact.num_params),
                      eval_sets=[np.arange(3), np.arange(4)])
    with pytest.raises(ValueError, match="overlap"):
        cj.fold_matrix(exact, problem.task, [np.arange(5), np.arange(3, 8)])


def test_without_correction_the_paper_estimator_only(problem):
    with _quiet():
        cache = _build(problem, None)
    assert cache.correction is None and "nystrom" not in cache.timing
    with pytest.raises(ValueError, match="no self-influence correction"):
        cj.fold_loss_delta(cache, problem.task, FOLDS)
    with pytest.raises(ValueError, match="self-influence"):
        cj.self_influence(cache, problem.task)
    paper = np.asarray(cj.fold_loss_delta(cache, problem.task, FOLDS, estimator="paper"))
    assert paper.shape == (6,) and np.isfinite(paper).all()
    g = jnp.asarray(problem.grads[:3].mean(axis=0))
    np.testing.assert_array_equal(np.asarray(cj.loss_delta(cache, [np.arange(3)], g)),
                                  np.asarray(cj.loss_delta(cache, [np.arange(3)], g, eval_sets=[np.arange(3)],
                                                           estimator="paper")))
