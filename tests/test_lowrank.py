"""The default ("hybrid") estimator: clusters, low-rank deviations and self-term remainders, against dense IF.

References (tests/_models.py): per-example gradients from ``jax.grad`` in a loop, the damped GGN
built from closed-form output Hessians, dense inverses. Per-query IF of removing S, scored on the
mean loss over V (or on a bare evaluation gradient): ``g_V^T H~^{-1} sum_{i in S} g_i / N``.

* With the factors at full rank (r = p) the estimator is IF for every query type; with one
  cluster per example it is IF at any rank (every deviation is zero).
* The stored coordinates are ``U^T g_i`` for the stored basis; a query whose evaluation set does
  not overlap S gets no self term.
* ``rank="auto"`` stops at the first doubling whose factors hold the probe's deviations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import BATCH, LAM, NUM_CLUSTERS, PROBLEMS, RTOL, SKETCH_DIM, N, get_problem

import cif_jax as cj
from cif_jax.cif import lowrank as lr

# float64, dense inverses against CG at RTOL = 1e-12 on condition numbers <= ~500 (the Nystrom
# factors at r = p are exact to their shift nu ~ sqrt(p) eps ||GGN||): agreement 1e-13 or better.
TOL = 1e-10
FOLDS = [np.arange(k, N, 6) for k in range(6)]  # 6 disjoint folds of 8
OTHER = [np.arange(k + 1, N, 6) if k < 5 else np.arange(0, N, 6) for k in range(6)]  # fold k+1 scored on removing k


@pytest.fixture(scope="module", params=PROBLEMS)
def problem(request):
    return get_problem(request.param)


def _build(problem, correction, num_clusters=NUM_CLUSTERS):
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="one cluster holds", category=UserWarning)
        return cj.build_cache(problem.task, num_clusters=num_clusters, sketch_dim=SKETCH_DIM, damping=LAM,
                              key=jax.random.key(0), solver=cj.CG(rtol=RTOL), batch_size=BATCH, correction=correction)


@pytest.fixture(scope="module", params=["products", "columns"])
def full(problem, request):
    """Exact self terms and factors at r = p (``"auto"`` reaches p on these small models), built from
    GGN products or from the exact output-Hessian columns. The column build runs on the MLP only (to
    keep the suite short): its full-rank factors are checked on every problem in test_sampled.py."""
    if request.param == "columns" and problem.name != "mlp":
        pytest.skip("the column build's identities run on the MLP")
    return _build(problem, cj.ExactCorrection(factors=request.param))


def _if(problem, s, g_v):
    return g_v @ np.linalg.solve(problem.ggn, problem.grads[s].sum(axis=0)) / N


def _close(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * np.abs(want).max())


def test_auto_rank_reaches_p_and_records_it(problem, full):
    low = full.lowrank
    assert low.rank == problem.num_params and full.correction.rank == low.rank
    assert low.note.startswith("auto: rank") and float(low.predicted_error) < 1e-12
    route = "columns" if "factors=columns" in full.correction.method else "products"
    assert low.note.endswith(f"; built from factors={route}")
    # The coordinates are U^T g_i and U^T mu_c for the stored orthonormal basis.
    u = np.asarray(low.basis)
    np.testing.assert_allclose(u @ u.T, np.eye(low.rank), atol=1e-12)
    _close(low.coords, problem.grads @ u.T)
    a = np.asarray(full.assignments)
    means = np.stack([problem.grads[a == c].mean(axis=0) for c in range(full.num_clusters)])
    _close(low.mean_coords, means @ u.T)
    assert np.all(np.asarray(low.tail_norms) < 1e-10 * np.linalg.norm(problem.grads, axis=1).max())
    # At full rank the self terms' remainders vanish: the deviations carry them whole.
    assert np.abs(np.asarray(full.correction.remainder)).max() < 1e-10 * np.abs(np.asarray(full.correction.values)).max()


def test_full_rank_equals_if_for_every_query_type(problem, full):
    g = problem.grads
    # Held-out style: bare evaluation gradients (one per query, and one shared by all).
    g_v = np.stack([g[v].mean(axis=0) for v in OTHER])
    _close(cj.loss_delta(full, FOLDS, g_v), [_if(problem, s, gv) for s, gv in zip(FOLDS, g_v)])
    _close(cj.loss_delta(full, FOLDS, g_v[0]), [_if(problem, s, g_v[0]) for s in FOLDS])
    # The same through precomputed alphas, shared and per query.
    _close(cj.loss_delta_from_alphas(full, FOLDS, cj.cluster_alphas(full, g_v)),
           [_if(problem, s, gv) for s, gv in zip(FOLDS, g_v)])
    _close(cj.loss_delta_from_alphas(full, FOLDS, cj.cluster_alphas(full, g_v[0])), [_if(problem, s, g_v[0]) for s in FOLDS])
    # Folds on themselves (V = S), and the fold matrix (cross-fold off the diagonal).
    _close(cj.fold_loss_delta(full, problem.task, FOLDS, batch_size=BATCH),
           [_if(problem, s, g[s].mean(axis=0)) for s in FOLDS])
    want = np.array([[_if(problem, s, g[v].mean(axis=0)) for v in FOLDS] for s in FOLDS])
    _close(cj.fold_matrix(full, problem.task, FOLDS, batch_size=BATCH), want)
    # Partial overlaps between S and V, told through eval_sets.
    subsets = [np.arange(0, 10), np.arange(5, 30), np.array([40, 41])]
    evals = [np.arange(5, 15), np.arange(0, 8), np.array([1, 2, 3])]
    g_e = np.stack([g[v].mean(axis=0) for v in evals])
    _close(cj.loss_delta(full, subsets, g_e, eval_sets=evals), [_if(problem, s, ge) for s, ge in zip(subsets, g_e)])
    # Self-influence and per-example scores.
    h_inv_g = np.linalg.solve(problem.ggn, g.T).T
    _close(cj.self_influence(full, problem.task, batch_size=BATCH), np.einsum("ij,ij->i", g, h_inv_g) / N)
    _close(cj.example_scores(full, g_v), g_v @ h_inv_g.T / N)
    _close(cj.example_scores(full, g_v[2]), g_v[2] @ h_inv_g.T / N)


def test_subset_sums_of_example_scores_are_the_query(problem, full):
    # For an evaluation set that holds no removed example, a subset's score is its members' sum.
    g_v = problem.grads[OTHER[0]].mean(axis=0)
    rows = np.asarray(cj.example_scores(full, g_v))
    got = np.asarray(cj.loss_delta(full, FOLDS[1:], g_v))
    np.testing.assert_allclose(got, [rows[s].sum() for s in FOLDS[1:]], rtol=1e-12)


@pytest.mark.parametrize("name", ["mlp"])
def test_one_cluster_per_example_equals_if_at_any_rank(name):
    problem = get_problem(name)
    cache = _build(problem, cj.CalibratedCorrection(rank=3, num_samples=4), num_clusters=N)
    assert cache.lowrank.rank == 3
    g = problem.grads
    g_v = np.stack([g[v].mean(axis=0) for v in OTHER])
    _close(cj.loss_delta(cache, FOLDS, g_v), [_if(problem, s, gv) for s, gv in zip(FOLDS, g_v)])
    _close(cj.fold_loss_delta(cache, problem.task, FOLDS, batch_size=BATCH),
           [_if(problem, s, g[s].mean(axis=0)) for s in FOLDS])
    _close(cj.example_scores(cache, g_v), g_v @ np.linalg.solve(problem.ggn, g.T) / N)


@pytest.mark.parametrize("name", ["mlp"])
def test_low_rank_beats_the_clusters_on_cross_queries(name):
    problem = get_problem(name)
    # At a rank below p the estimator is not exact, but it carries the deviations' leading part;
    # the clusters alone lose all of it. Exact self terms isolate the cross terms.
    cache = _build(problem, cj.ExactCorrection(rank=problem.num_params // 2))
    g = problem.grads
    want = np.array([[_if(problem, s, g[v].mean(axis=0)) for v in FOLDS] for s in FOLDS])
    off = ~np.eye(len(FOLDS), dtype=bool)
    hybrid = np.asarray(cj.fold_matrix(cache, problem.task, FOLDS))
    paper = np.asarray(cj.fold_matrix(cache, problem.task, FOLDS, estimator="paper"))
    err = lambda m: np.linalg.norm((m - want)[off])
    assert err(hybrid) < 0.8 * err(paper)


def test_no_overlap_means_no_self_term(problem, full):
    s, v = [np.arange(0, 10)], [np.arange(20, 30)]
    g_v = problem.grads[v[0]].mean(axis=0)
    bare = np.asarray(cj.loss_delta(full, s, g_v))
    np.testing.assert_array_equal(bare, np.asarray(cj.loss_delta(full, s, g_v, eval_sets=v)))
    np.testing.assert_array_equal(np.asarray(cj.overlap_correction(full, s, v)), [0.0])


@pytest.mark.parametrize("name", ["softmax"])
def test_estimators_differ_as_documented(name):
    # At a rank below p: "corrected" is eq. 11 plus the whole self terms, "hybrid" adds the
    # deviations' low-rank part and only the remainder of the self terms.
    problem = get_problem(name)
    cache = _build(problem, cj.CalibratedCorrection(rank=4, num_samples=4))
    folds = FOLDS[:3]
    paper = np.asarray(cj.fold_loss_delta(cache, problem.task, folds, estimator="paper"))
    corrected = np.asarray(cj.fold_loss_delta(cache, problem.task, folds, estimator="corrected"))
    hybrid = np.asarray(cj.fold_loss_delta(cache, problem.task, folds))
    t, rem = np.asarray(cache.correction.values), np.asarray(cache.correction.remainder)
    np.testing.assert_allclose(corrected - paper, [t[f].sum() / len(f) for f in folds], rtol=1e-10)
    low = cache.lowrank
    dev = np.asarray(low.coords) - np.asarray(low.mean_coords)[np.asarray(cache.assignments)]
    w = 1 / (np.asarray(low.eigenvalues) + LAM)
    g_f = np.stack([np.asarray(low.coords)[f].mean(axis=0) for f in folds])
    low_part = np.array([g_f[k] * w @ dev[f].sum(axis=0) / N for k, f in enumerate(folds)])
    np.testing.assert_allclose(hybrid - paper, low_part + [rem[f].sum() / len(f) for f in folds], rtol=1e-9)


def test_bare_alphas_are_refused_by_the_default_estimator(full):
    alphas = cj.cluster_alphas(full, np.ones(full.num_params))
    with pytest.raises(ValueError, match="low-rank coordinates"):
        cj.loss_delta_from_alphas(full, FOLDS, alphas.clusters)
    paper = cj.loss_delta_from_alphas(full, FOLDS, alphas.clusters, estimator="paper")
    np.testing.assert_array_equal(np.asarray(paper),
                                  np.asarray(cj.loss_delta_from_alphas(full, FOLDS, alphas, estimator="paper")))
    with pytest.raises(ValueError, match="estimator"):
        cj.loss_delta(full, FOLDS, np.ones(full.num_params), estimator="lowrank")
    with pytest.raises(ValueError, match="rank"):
        cj.CalibratedCorrection(rank="big")
    with pytest.raises(ValueError, match="tolerance"):
        cj.CalibratedCorrection(tolerance=1.5)


# -- the rank rule on an operator with a known spectrum -------------------------------------------


def _squared_error(out, y):
    return 0.5 * jnp.sum(jnp.square(out - y), axis=-1)


def _linear(params, x):
    return x @ params["w"]


def test_auto_rank_stops_where_the_factors_hold_the_deviations():
    # A linear model under squared error: GGN = X^T X / N exactly, here of rank 8 with known
    # eigenvalues. Deviations inside its range are held by any factor that spans it: the rule
    # sees a large share outside at ranks 2 and 4 and none at 8, and stops there (not at 16).
    p, k, n = 24, 8, 40
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(p, k)))
    coef = rng.normal(size=(n, k))
    coef, _ = np.linalg.qr(coef)  # orthonormal columns: X^T X = basis diag(sv^2) basis^T
    sv = np.sqrt(n * np.logspace(0, -2, k))
    x = (coef * sv) @ basis.T
    task = cj.Task(_linear, _squared_error, {"w": jnp.zeros((p, 1))}, jnp.asarray(x), jnp.asarray(rng.normal(size=(n, 1))))
    ggn = x.T @ x / n
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(ggn))[-k:], np.sort(np.logspace(0, -2, k)), rtol=1e-10)
    deviations = rng.normal(size=(6, k)) @ basis.T
    lam = 1e-3
    seen = []

    def accept(u, s):
        done, note = lr.probe_rule(deviations, lam, 0.01)(u, s)
        seen.append((u.shape[0], lr.predicted_error(deviations, u, s, lam)))
        return done, note

    pre = cj.nystrom_preconditioner(cj.DampedGGN(task, damping=lam), key=jax.random.key(1), rank="auto",
                                    initial_rank=2, max_rank=p, error_iters=0, accept=accept)
    assert [r for r, _ in seen] == [2, 4, 8] and pre.rank == 8
    assert seen[0][1] > 0.01 and seen[1][1] > 0.01 and seen[2][1] < 1e-12
    assert pre.note.startswith("auto: rank 8")
    np.testing.assert_allclose(np.asarray(pre.eigenvalues), np.logspace(0, -2, k), rtol=1e-8)


def test_column_factors_keep_the_smallest_doubling_that_meets_the_rule():
    # The column build is made at the cap; rank="auto" then keeps the top eigenpairs of the first
    # doubling the rule accepts. The same operator with a known spectrum as above: 8 directions.
    p, k, n = 24, 8, 40
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(p, k)))
    coef, _ = np.linalg.qr(rng.normal(size=(n, k)))
    x = (coef * np.sqrt(n * np.logspace(0, -2, k))) @ basis.T
    task = cj.Task(_linear, _squared_error, {"w": jnp.zeros((p, 1))}, jnp.asarray(x), jnp.asarray(rng.normal(size=(n, 1))))
    deviations = rng.normal(size=(6, k)) @ basis.T
    lam, seen = 1e-3, []

    def accept(u, s):
        seen.append(u.shape[0])
        return lr.probe_rule(deviations, lam, 0.01)(u, s)

    full = cj.sampled_preconditioner(cj.DampedGGN(task, damping=lam), key=jax.random.key(1), rank=p,
                                     samples="exact", power_iters=0)
    kept = lr.smallest_accepted(full, 2, accept)
    assert seen == [2, 4, 8] and kept.rank == 8 and kept.note.startswith("auto: rank 8")
    np.testing.assert_allclose(np.asarray(kept.eigenvalues), np.logspace(0, -2, k), rtol=1e-8)
    np.testing.assert_array_equal(np.asarray(kept.basis), np.asarray(full.basis[:8]))
    # a rule that never accepts keeps everything
    assert lr.smallest_accepted(full, 5, lambda u, s: (False, "no")).rank == p


def test_factors_auto_times_both_routes_and_records_the_choice(monkeypatch):
    from cif_jax.solvers import sampled

    problem = get_problem("mlp")
    op = cj.DampedGGN(problem.task, damping=LAM, batch_size=BATCH)
    # a small model takes products with no probe at all
    monkeypatch.setattr(sampled, "factor_build_costs", lambda *a, **k: pytest.fail("probed"))
    route, note = sampled.choose_factor_build(op, rank=8, block=4)
    assert route == "products" and "no probe" in note
    monkeypatch.undo()
    monkeypatch.setattr(sampled, "TRIVIAL_PRODUCT_WORK", 0)
    costs = sampled.factor_build_costs(op, rank=8, block=4)
    assert costs["products"] > 0 and costs["columns"] > 0 and costs["probe_seconds"] > 0
    # The cheaper prediction decides, and the cache records it; both routes give the same factors
    # here up to rounding (r = p: both are the GGN), so only the note tells them apart.
    p = problem.num_params
    for cheaper, words in (("columns", "exact columns"), ("products", "GGN products")):
        fake = {"columns": 1.0 if cheaper == "columns" else 2.0, "products": 1.0 if cheaper == "products" else 2.0,
                "probe_seconds": 0.0}
        monkeypatch.setattr(sampled, "factor_build_costs", lambda *a, fake=fake, **k: fake)
        assert sampled.choose_factor_build(op, rank=8, block=4)[0] == cheaper
        cache = _build(problem, cj.CalibratedCorrection(rank=p, num_samples=4))
        assert cache.lowrank.note.startswith(f"rank {p}; built from {words} (predicted ")
        assert f"1 s for {cheaper}" in cache.lowrank.note
        ggn = problem.ggn - LAM * np.eye(p)
        u, s = np.asarray(cache.lowrank.basis), np.asarray(cache.lowrank.eigenvalues)
        np.testing.assert_allclose(u.T @ np.diag(s) @ u, ggn, atol=1e-9 * np.abs(ggn).max())
    # products predicted under the floor: the columns are not timed
    monkeypatch.undo()
    monkeypatch.setattr(sampled, "TRIVIAL_PRODUCT_WORK", 0)
    assert sampled.factor_build_costs(op, rank=8, block=4, floor=float("inf"))["columns"] is None
    monkeypatch.setattr(sampled, "PRODUCTS_FLOOR_SECONDS", float("inf"))
    route, note = sampled.choose_factor_build(op, rank=8, block=4)
    assert route == "products" and "the columns not timed" in note
    # a near tie goes to the columns (better factors at the same rank)
    near = {"columns": sampled.COLUMN_PREFERENCE * 0.99, "products": 1.0, "probe_seconds": 0.0}
    monkeypatch.setattr(sampled, "factor_build_costs", lambda *a, **k: near)
    assert sampled.choose_factor_build(op, rank=8, block=4)[0] == "columns"
    # more outputs than the column route takes: products, with no probe
    monkeypatch.setattr(sampled, "MAX_COLUMN_OUTPUTS", 0)
    monkeypatch.setattr(sampled, "factor_build_costs", lambda *a, **k: pytest.fail("probed"))
    route, note = sampled.choose_factor_build(op, rank=8, block=4)
    assert route == "products" and "outputs per example" in note


def test_column_factors_in_a_cache_keep_the_smallest_accepted_doubling(monkeypatch):
    # Inside a real cache: the column build at the cap (p), then rank="auto" keeps the first
    # doubling of the initial rank (2 here) that the probe rule accepts at a loose tolerance.
    problem = get_problem("mlp")
    monkeypatch.setattr(lr, "DEFAULT_INITIAL_RANK", 2)
    tol = 0.3
    cache = _build(problem, cj.ExactCorrection(factors="columns", tolerance=tol))
    low, p = cache.lowrank, problem.num_params
    assert low.rank < p and low.rank in (2, 4, 8, 16, 32) and low.note.startswith(f"auto: rank {low.rank}")
    assert float(low.predicted_error) <= tol and low.note.endswith("; built from factors=columns")
    full = cj.sampled_preconditioner(cj.DampedGGN(problem.task, damping=LAM, batch_size=BATCH),
                                     key=jax.random.fold_in(jax.random.key(0), 2), rank=p, samples="exact",
                                     power_iters=0)
    if low.rank > 2:  # the rule refused the doubling below
        probe = lr.probe_deviations(problem.task, jax.random.fold_in(jax.random.key(0), 5), cache.assignments,
                                    cache.means, BATCH)  # the build's own probe: same key, same examples
        smaller = lr.predicted_error(probe, full.basis[: low.rank // 2], full.eigenvalues[: low.rank // 2], LAM)
        assert smaller > tol
    np.testing.assert_allclose(np.asarray(low.eigenvalues), np.asarray(full.eigenvalues[: low.rank]), rtol=1e-8)


def test_column_passes_size_their_chunks_for_the_columns(monkeypatch):
    from cif_jax.solvers import sampled

    problem = get_problem("mlp")
    op = cj.DampedGGN(problem.task, damping=LAM)
    q, p, item = sampled.num_outputs(problem.task), problem.num_params, 8
    assert sampled.pass_batch_size(op, "exact") == N  # everything fits
    assert sampled.pass_batch_size(cj.DampedGGN(problem.task, damping=LAM, batch_size=5), "exact") == 5
    monkeypatch.setattr(sampled, "CHUNK_BUDGET", 3 * q * p * item * 5)  # five examples' columns
    assert sampled.pass_batch_size(op, "exact") == 4
    assert sampled.pass_batch_size(op, 1) == min(2 ** int(np.log2(5 * q)), N)  # one draw per example
    monkeypatch.setattr(sampled, "CHUNK_BUDGET", 1)
    assert sampled.pass_batch_size(op, "exact") == 1


@pytest.mark.parametrize("cls", [cj.CalibratedCorrection, cj.NystromCorrection, cj.ExactCorrection])
def test_unknown_factor_build_is_refused(cls):
    with pytest.raises(ValueError, match=f"`{cls.__name__}.factors` must be one of"):
        cls(factors="kfac")
    assert "factors=columns" in cls(factors="columns").describe()
    assert "factors" not in cls().describe()


def test_predicted_error_closed_form():
    # Basis = the first r coordinate axes: the share outside is sum of the other squares / lambda
    # over that plus sum_k d_k^2 / (s_k + lambda) inside.
    p, r, lam = 6, 2, 0.5
    u = np.eye(p)[:r]
    s = np.array([3.0, 1.0])
    d = np.array([[1.0, 2.0, 1.0, 0.0, 0.0, 1.0]])
    inside = 1.0 / 3.5 + 4.0 / 1.5
    outside = 2.0 / lam
    assert lr.predicted_error(d, jnp.asarray(u), jnp.asarray(s), lam) == pytest.approx(outside / (outside + inside))
    assert lr.predicted_error(np.zeros((1, p)), jnp.asarray(u), jnp.asarray(s), lam) == 0.0


# -- the error report -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "regression"])
def test_error_report_bounds_the_true_error(name):
    # Rank p/3 with exact self terms: the estimator misses part of every cross term; the
    # report must bound what it misses, for folds on themselves, partial overlaps and bare
    # evaluation gradients, and vanish at full rank.
    problem = get_problem(name)
    cache = _build(problem, cj.ExactCorrection(rank=problem.num_params // 3))
    g = problem.grads
    # Folds on themselves.
    got = np.asarray(cj.fold_loss_delta(cache, problem.task, FOLDS, batch_size=BATCH))
    want = np.array([_if(problem, s, g[s].mean(axis=0)) for s in FOLDS])
    b = cj.corrected_error_bound(cache, problem.task, FOLDS, batch_size=BATCH)
    assert b.correction_is_bound
    total = np.asarray(b.cross) + np.asarray(b.correction) + np.asarray(b.solver)
    assert np.all(np.abs(got - want) <= total) and np.all(np.abs(got - want) > 0)
    # Partial overlaps.
    subsets = [np.arange(0, 10), np.arange(5, 30), np.array([40, 41])]
    evals = [np.arange(5, 15), np.arange(0, 8), np.array([1, 2, 3])]
    g_e = np.stack([g[v].mean(axis=0) for v in evals])
    got = np.asarray(cj.loss_delta(cache, subsets, g_e, eval_sets=evals))
    want = np.array([_if(problem, s, ge) for s, ge in zip(subsets, g_e)])
    b = cj.corrected_error_bound(cache, problem.task, subsets, evals)
    assert np.all(np.abs(got - want) <= np.asarray(b.cross) + np.asarray(b.correction) + np.asarray(b.solver))
    # Bare evaluation gradients (held-out style), with the exact D_S and with the per-member sum.
    g_v = np.stack([g[v].mean(axis=0) for v in OTHER])
    got = np.asarray(cj.loss_delta(cache, FOLDS, g_v))
    want = np.array([_if(problem, s, gv) for s, gv in zip(FOLDS, g_v)])
    tail, solver = (np.asarray(a) for a in cj.query_error_bound(cache, FOLDS, g_v, task=problem.task))
    loose, _ = (np.asarray(a) for a in cj.query_error_bound(cache, FOLDS, g_v))
    assert np.all(np.abs(got - want) <= tail + solver) and np.all(tail <= loose * (1 + 1e-12))


def test_error_report_vanishes_at_full_rank(problem, full):
    g_v = np.stack([problem.grads[v].mean(axis=0) for v in OTHER])
    tail, _ = cj.query_error_bound(full, FOLDS, g_v, task=problem.task)
    scores = np.asarray(cj.loss_delta(full, FOLDS, g_v))
    assert np.all(np.asarray(tail) < 1e-8 * np.abs(scores).max())
    b = cj.corrected_error_bound(full, problem.task, FOLDS)
    assert np.all(np.asarray(b.cross) < 1e-8 * np.abs(np.asarray(cj.fold_loss_delta(full, problem.task, FOLDS))).max())


def test_member_chunks_sum_like_one_pass(full, monkeypatch):
    # Many members are summed in fixed-size chunks (the last one padded with a dropped query id).
    from cif_jax.cif import queries

    subsets = [np.arange(0, 40), np.arange(10, 48), np.arange(3, 9)]
    g_v = np.stack([np.asarray(full.lowrank.coords)[:3].sum(axis=0) @ np.asarray(full.lowrank.basis)] * 3)
    whole = np.asarray(cj.loss_delta(full, subsets, g_v))
    monkeypatch.setattr(queries, "_MEMBER_CHUNK", 7)
    chunked = np.asarray(cj.loss_delta(full, subsets, g_v))
    np.testing.assert_allclose(chunked, whole, rtol=1e-12)


def test_estimators_are_values_and_names(problem, full):
    """``estimator=`` takes an Estimator or its name alike; an Estimator of other fields needs no caller change."""
    g = problem.grads[:3]
    for name, est in cj.cif.queries.ESTIMATORS.items():
        s = [np.arange(0, N, 2)]
        np.testing.assert_array_equal(np.asarray(cj.loss_delta(full, s, g[0], estimator=name)),
                                      np.asarray(cj.loss_delta(full, s, g[0], estimator=est)))
    # The self terms of "hybrid" without them: the clusters and the deviations only, which on a
    # query whose evaluation set is a bare gradient (no overlap) is "hybrid" itself.
    deviations_only = cj.Estimator("deviations", deviations=True, self_terms=False)
    s = [np.arange(0, N, 3)]
    np.testing.assert_array_equal(np.asarray(cj.loss_delta(full, s, g[1], estimator=deviations_only)),
                                  np.asarray(cj.loss_delta(full, s, g[1])))
    with pytest.raises(ValueError, match="estimator"):
        cj.loss_delta(full, s, g[1], estimator="hybird")
