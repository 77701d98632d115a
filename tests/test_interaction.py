"""Interaction-aware group influence (seed 003) against exact expansions, retraining-free references.

* A linear model with a squared-error target is exactly quadratic in the
  parameters: F + I must equal f(theta_0 + delta_S) - f(theta_0) (removal) and
  f(theta_0 - delta_S) - f(theta_0) (addition) to rounding, with delta_S from a
  dense float64 solve.
* Cross-entropy: the remainder f(theta_0 + t delta) - f(theta_0) - t F - t^2 I
  shrinks like t^3; I matches a central difference of grad f.
* The cache builder with one cluster per example equals the exact builder.
* Greedy selection equals brute-force re-evaluation of F + I at every step.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import LAM, N, cross_entropy, dense_solve, linear_apply, softmax_problem, weighted_squared_error
from jax.flatten_util import ravel_pytree

import cif_jax as cj

RTOL = 1e-12


def _linear_regression():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(N, 5)))
    y = jnp.asarray(rng.normal(size=(N, 2)))
    params = {"w": jnp.asarray(rng.normal(size=(5, 2))), "b": jnp.asarray(rng.normal(size=2))}
    task = cj.Task(linear_apply, weighted_squared_error, params, x, y)
    target = cj.Task(linear_apply, weighted_squared_error, params, jnp.asarray(rng.normal(size=(17, 5))),
                     jnp.asarray(rng.normal(size=(17, 2))))
    return task, target


def _mean_loss(target, flat):
    _, unravel = ravel_pytree(target.params)
    return float(jnp.mean(target.loss_fn(target.apply_fn(unravel(flat), target.inputs), target.targets)))


def _dense_ggn(task):
    flat, _ = ravel_pytree(task.params)
    eye = jnp.eye(flat.shape[0], dtype=flat.dtype)
    return np.asarray(cj.DampedGGN(task, damping=LAM).apply(eye))


def _ce_target(seed):
    """The softmax problem and a cross-entropy target task on 9 random evaluation points."""
    problem = softmax_problem()
    rng = np.random.default_rng(seed)
    target = cj.Task(linear_apply, cross_entropy, problem.task.params, jnp.asarray(rng.normal(size=(9, 5))),
                     jnp.asarray(rng.integers(0, 3, 9), jnp.int32))
    return problem, problem.task, target


SUBSETS = [np.array([0, 3, 7]), np.array([5]), np.array([1, 2, 4, 8, 9, 11])]


def test_quadratic_target_is_exact():
    task, target = _linear_regression()
    pool = np.arange(12)
    terms = cj.interaction_terms(task, target, pool, damping=LAM, solver=cj.CG(rtol=RTOL))
    flat, _ = ravel_pytree(task.params)
    grads = np.asarray(cj.per_example_grads(task))
    h = _dense_ggn(task)
    f0 = _mean_loss(target, flat)
    for setting, sign in (("remove", 1.0), ("add", -1.0)):
        first, inter, total = cj.group_influence(terms, SUBSETS, setting=setting)
        for q, s in enumerate(SUBSETS):
            delta = dense_solve(h, grads[pool[s]].sum(axis=0)[None, :])[0] / N
            want = _mean_loss(target, flat + sign * jnp.asarray(delta)) - f0
            np.testing.assert_allclose(float(total[q]), want, rtol=1e-9, atol=1e-13)
        assert np.all(np.asarray(inter) >= 0)  # PSD H_f


def test_pairwise_terms_sum_to_the_group_term():
    task, target = _linear_regression()
    terms = cj.interaction_terms(task, target, np.arange(12), damping=LAM, solver=cj.CG(rtol=RTOL))
    pair = np.asarray(terms.coords) @ np.asarray(terms.curved).T  # I_ij
    np.testing.assert_allclose(pair, pair.T, rtol=1e-9, atol=1e-15)
    _, inter, _ = cj.group_influence(terms, SUBSETS)
    for q, s in enumerate(SUBSETS):
        np.testing.assert_allclose(float(inter[q]), 0.5 * pair[np.ix_(s, s)].sum(), rtol=1e-10, atol=1e-16)


def test_cross_entropy_remainder_is_third_order_and_hessian_matches_finite_differences():
    problem, task, target = _ce_target(6)
    terms = cj.interaction_terms(task, target, np.arange(10), damping=LAM, solver=cj.CG(rtol=RTOL), kind="hessian")
    s = np.array([0, 2, 5, 9])
    f, i, _ = cj.group_influence(terms, [s])
    delta = np.asarray(terms.coords)[s].sum(axis=0)
    flat, _ = ravel_pytree(task.params)
    f0 = _mean_loss(target, flat)
    rem = []
    for t in (1.0, 0.5, 0.25):
        rem.append(_mean_loss(target, flat + t * jnp.asarray(delta)) - f0 - t * float(f[0]) - t * t * float(i[0]))
    # Remainders shrink like t^3: ratios ~ 8.
    assert 6.0 < rem[0] / rem[1] < 10.0 and 6.0 < rem[1] / rem[2] < 10.0
    # I = 1/2 delta^T H_f delta, H_f delta by a central difference of grad f.
    grad = lambda th: cj.target_gradient(cj.Task(target.apply_fn, target.loss_fn,
                                                 ravel_pytree(target.params)[1](th), target.inputs, target.targets))
    eps = 1e-5
    hd = (np.asarray(grad(flat + eps * delta)) - np.asarray(grad(flat - eps * delta))) / (2 * eps)
    np.testing.assert_allclose(float(i[0]), 0.5 * delta @ hd, rtol=1e-7)


def test_cache_with_one_cluster_per_example_equals_exact():
    problem, task, target = _ce_target(7)
    cache = cj.build_cache(task, num_clusters=N, sketch_dim=4, damping=LAM, key=jax.random.key(0), solver=cj.CG(rtol=RTOL))
    exact = cj.interaction_terms(task, target, np.arange(N), damping=LAM, solver=cj.CG(rtol=RTOL))
    groups = [np.array([0, 1, 2]), np.array([10, 20, 30, 40]), np.arange(N)]
    want = cj.group_influence(exact, groups)
    for first_order in ("cache", "exact"):
        terms = cj.cache_interaction_terms(cache, target, first_order=first_order, task=task, solver=cj.CG(rtol=RTOL))
        got = cj.group_influence(terms, groups)
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-8, atol=1e-14)


def test_cache_terms_are_cif_at_its_delta():
    # With C < N, F + I is exactly the expansion at CiF's hat delta_S (eq. 10).
    problem, task, target = _ce_target(8)
    cache = cj.build_cache(task, num_clusters=6, sketch_dim=4, damping=LAM, key=jax.random.key(1), solver=cj.CG(rtol=RTOL))
    terms = cj.cache_interaction_terms(cache, target, task=task)
    hat = np.asarray(cj.param_delta(cache, SUBSETS))
    hf = np.asarray(_dense_ggn(target)) - LAM * np.eye(hat.shape[1])
    g = np.asarray(cj.target_gradient(target))
    f, i, _ = cj.group_influence(terms, SUBSETS)
    np.testing.assert_allclose(np.asarray(f), hat @ g, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(np.asarray(i), 0.5 * np.einsum("qi,ij,qj->q", hat, hf, hat), rtol=1e-8, atol=1e-15)


def _toy_terms(seed, zero_curvature=False, p=8, k=5):
    rng = np.random.default_rng(seed)
    coords = rng.normal(size=(p, k))
    a = rng.normal(size=(k, k))
    hf = np.zeros((k, k)) if zero_curvature else a @ a.T  # symmetric PSD: I_ij = coords_i H coords_j
    return cj.InteractionTerms(jnp.asarray(rng.normal(size=p)), jnp.asarray(coords), jnp.asarray(coords @ hf))


@pytest.mark.parametrize("setting", ["add", "remove"])
def test_greedy_equals_brute_force_steps(setting):
    terms = _toy_terms(0)
    idx, scores, objective = cj.greedy_select(terms, budget=5, setting=setting, exclude=np.array([3]))
    chosen = []
    prev = 0.0
    for step in range(5):
        best, best_val = None, np.inf
        for z in range(8):
            if z in chosen or z == 3:
                continue
            val = float(cj.group_influence(terms, [np.array(chosen + [z])], setting=setting)[2][0])
            if val < best_val - 1e-12:
                best, best_val = z, val
        chosen.append(best)
        assert int(idx[step]) == best
        np.testing.assert_allclose(float(objective[step]), best_val, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(float(scores[step]), best_val - prev, rtol=1e-9, atol=1e-12)
        prev = best_val


def test_greedy_without_curvature_is_the_enumerated_optimum():
    terms = _toy_terms(1, zero_curvature=True)
    idx, _, objective = cj.greedy_select(terms, budget=3, setting="add")
    best = min(float(cj.group_influence(terms, [np.array(c)], setting="add")[2][0])
               for c in itertools.combinations(range(8), 3))
    np.testing.assert_allclose(float(objective[-1]), best, rtol=1e-12)


def test_bad_input():
    task, target = _linear_regression()
    other = cj.Task(linear_apply, weighted_squared_error, jax.tree_util.tree_map(lambda a: a + 1, task.params),
                    target.inputs, target.targets)
    with pytest.raises(ValueError, match="same model snapshot"):
        cj.interaction_terms(task, other, np.arange(3), damping=LAM)
    with pytest.raises(ValueError, match="repeats"):
        cj.interaction_terms(task, target, np.array([1, 1]), damping=LAM)
    with pytest.raises(ValueError, match=r"in \[0, N\)"):
        cj.interaction_terms(task, target, np.array([N]), damping=LAM)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        cj.target_curvature(target, kind="fisher")
    terms = _toy_terms(2)
    with pytest.raises(ValueError, match="`setting` must be one of"):
        cj.group_influence(terms, [np.array([0])], setting="swap")
    with pytest.raises(ValueError, match="shapes must be"):
        cj.group_influence(cj.InteractionTerms(terms.first_order, terms.coords, terms.curved[:, :2]), [np.array([0])])
    with pytest.raises(ValueError, match="`budget` must be at least 1"):
        cj.greedy_select(terms, budget=0)
    with pytest.raises(ValueError, match="exceeds the 2 candidates"):
        cj.greedy_select(terms, budget=3, exclude=np.arange(6))
    with pytest.raises(ValueError, match="out of range"):
        cj.group_influence(terms, [np.array([8])])


def test_target_curvature_operator():
    task, target = _linear_regression()
    op = cj.target_curvature(target)
    flat, _ = ravel_pytree(target.params)
    v = jnp.asarray(np.random.default_rng(3).normal(size=flat.shape[0]))
    want = np.asarray(cj.DampedGGN(target, damping=LAM).apply(v[None, :]))[0] - LAM * np.asarray(v)
    np.testing.assert_allclose(np.asarray(op.mv(v)), want, rtol=1e-12)
    # For a linear model with squared error the Hessian is the GGN.
    np.testing.assert_allclose(np.asarray(cj.target_curvature(target, kind="hessian").mv(v)), want, rtol=1e-10)


def test_interaction_error_bound_holds_on_sampled_subsets():
    problem, task, target = _ce_target(9)
    rng = np.random.default_rng(9)
    cache = cj.build_cache(task, num_clusters=5, sketch_dim=4, damping=LAM, key=jax.random.key(2), solver=cj.CG(rtol=1e-6))
    exact = cj.interaction_terms(task, target, np.arange(N), damping=LAM, solver=cj.CG(rtol=RTOL))
    approx = cj.cache_interaction_terms(cache, target, task=task)
    groups = [rng.choice(N, size=m, replace=False) for m in (1, 2, 5, 10, 20, 40) for _ in range(4)]
    true_i = np.asarray(cj.group_influence(exact, groups)[1])
    cache_i = np.asarray(cj.group_influence(approx, groups)[1])
    for with_task in (task, None):
        out = cj.interaction_error_bound(cache, target, groups, task=with_task)
        assert np.all(np.abs(true_i - cache_i) <= np.asarray(out.bound))
    hf = _dense_ggn(target) - LAM * np.eye(problem.num_params)
    np.testing.assert_allclose(float(out.target_norm), np.linalg.eigvalsh(hf).max(), rtol=1e-6)


def test_second_order_baseline_matches_dense_formula():
    problem, task, target = _ce_target(10)
    out = cj.second_order_group_influence(task, target, SUBSETS, damping=LAM, solver=cj.CG(rtol=RTOL))
    g = np.asarray(cj.target_gradient(target))
    u = dense_solve(problem.ggn, g[None, :])[0]
    for q, s in enumerate(SUBSETS):
        delta = dense_solve(problem.ggn, problem.grads[s].sum(axis=0)[None, :])[0] / N
        h_s = np.einsum("nqi,nqr,nrj->ij", problem.jac[s], problem.out_hess[s], problem.jac[s])
        np.testing.assert_allclose(float(out.first_order[q]), g @ delta, rtol=1e-9)
        np.testing.assert_allclose(float(out.correction[q]), u @ h_s @ delta / N, rtol=1e-8, atol=1e-16)
        want = delta + dense_solve(problem.ggn, (h_s @ delta)[None, :])[0] / N
        np.testing.assert_allclose(np.asarray(out.param_change[q]), want, rtol=1e-8, atol=1e-14)


def test_target_factors_builder_equals_exact():
    problem, task, target = _ce_target(11)
    pool = np.arange(0, N, 3)
    exact = cj.interaction_terms(task, target, pool, damping=LAM, solver=cj.CG(rtol=RTOL))
    factored = cj.interaction_terms(task, target, pool, damping=LAM, solver=cj.CG(rtol=RTOL), method="target_factors")
    assert factored.coords.shape == (pool.size, 9 * 3)  # |V| q
    groups = [np.array([0, 1, 2]), np.array([3]), np.arange(pool.size)]
    for a, b in zip(cj.group_influence(factored, groups), cj.group_influence(exact, groups)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-8, atol=1e-14)
    pair_f = np.asarray(factored.coords) @ np.asarray(factored.curved).T
    pair_e = np.asarray(exact.coords) @ np.asarray(exact.curved).T
    np.testing.assert_allclose(pair_f, pair_e, rtol=1e-7, atol=1e-14)
    with pytest.raises(ValueError, match="use kind='ggn'"):
        cj.interaction_terms(task, target, pool, damping=LAM, method="target_factors", kind="hessian")
    with pytest.raises(ValueError, match="`method` must be"):
        cj.interaction_terms(task, target, pool, damping=LAM, method="fast")


@pytest.mark.parametrize("interaction", [False, True])
def test_second_order_terms_evaluate_basu_on_any_group(interaction):
    """B(S) from the pair terms equals the F + B baseline's correction (and I + B with the interaction)."""
    problem, task, target = _ce_target(12)
    pool = np.arange(N)
    terms = cj.second_order_terms(task, target, pool, damping=LAM, solver=cj.CG(rtol=RTOL), interaction=interaction)
    assert terms.coords.shape == (N, (3 if interaction else 2) * problem.num_params)
    base = cj.second_order_group_influence(task, target, SUBSETS, damping=LAM, solver=cj.CG(rtol=RTOL))
    exact = cj.interaction_terms(task, target, pool, damping=LAM, solver=cj.CG(rtol=RTOL))
    want = np.asarray(base.correction) + (np.asarray(cj.group_influence(exact, SUBSETS)[1]) if interaction else 0.0)
    for setting in ("remove", "add"):
        f, second, total = (np.asarray(a) for a in cj.group_influence(terms, SUBSETS, setting=setting))
        sign = 1.0 if setting == "remove" else -1.0
        np.testing.assert_allclose(f, sign * np.asarray(base.first_order), rtol=1e-9)
        np.testing.assert_allclose(second, want, rtol=1e-8, atol=1e-16)
        np.testing.assert_allclose(total, f + second, rtol=1e-12)
    # Pairs are symmetric, so greedy's marginal gains are exact for F + B too.
    pair = np.asarray(terms.coords) @ np.asarray(terms.curved).T
    np.testing.assert_allclose(pair, pair.T, rtol=1e-9, atol=1e-18)
