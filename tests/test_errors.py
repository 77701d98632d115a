"""Invalid input is refused with a message that names the problem, before any expensive work.

The ``no_work`` fixture replaces every jitted data pass, solve and k-means call
with a function that fails the test, so a validation error raised only after
work started shows up as an AssertionError instead of the expected error.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import (
    LAM,
    NUM_CLUSTERS,
    NUM_QUERIES,
    SKETCH_DIM,
    N,
    cache_for,
    cross_entropy,
    linear_apply,
    random_subsets,
    softmax_problem,
)

import cif_jax as cj

_EXPENSIVE = {
    "cif_jax.core.gradients": ("per_example_grads_pass", "gradient_sums_pass"),
    "cif_jax.estimators.influence": ("gradient_sums_pass",),
    "cif_jax.cif.queries": ("gradient_sums_pass",),
    "cif_jax.cif.bounds": ("gradient_sums_pass",),
    "cif_jax.cif.cache": ("_sketch_pass", "_means_pass", "kmeans_fit", "nystrom_preconditioner"),
    "cif_jax.solvers.precondition": ("auto_nystrom", "_products"),
    "cif_jax.solvers.jacobi": ("build_jacobi",),
    "cif_jax.solvers.kfac": ("build_kfac",),
    "cif_jax.cif.correction": ("_terms_pass", "per_example_grads"),
    "cif_jax.solvers.solve": ("_solve_block", "_lineax_block"),
    "cif_jax.solvers.operator": ("_apply_damped",),
}


@pytest.fixture
def no_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("expensive work started before the input was validated")

    for module, names in _EXPENSIVE.items():
        # importlib: `cif_jax.estimators.influence` the attribute is the function, not the module.
        mod = importlib.import_module(module)
        for name in names:
            monkeypatch.setattr(mod, name, forbidden)


@pytest.fixture(scope="module")
def problem():
    return softmax_problem()


@pytest.fixture(scope="module")
def task(problem):
    return problem.task


@pytest.fixture(scope="module")
def cache():
    return cache_for("softmax")


def _build(task, **overrides):
    kwargs = dict(num_clusters=NUM_CLUSTERS, sketch_dim=SKETCH_DIM, damping=LAM, key=jax.random.key(0))
    kwargs.update(overrides)
    return cj.build_cache(task, **kwargs)


# -- the task ------------------------------------------------------------------------------


def test_inputs_and_targets_must_have_same_length(task):
    with pytest.raises(ValueError, match="inputs hold 48 examples but targets hold 47"):
        cj.Task(linear_apply, cross_entropy, task.params, task.inputs, task.targets[:-1])


def _first_row_only(params, x):
    return linear_apply(params, x)[:1]


def _mean_loss(outputs, targets):
    return jnp.mean(cross_entropy(outputs, targets))


def test_transposed_binary_outputs_are_refused(no_work):
    # A binary model returning (2, B) instead of (B, 2): a check on a batch of 2 alone is fooled
    # (the shapes coincide); it must be refused before any work, not fail late inside vmap.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(10, 3)))
    y = jnp.asarray(rng.integers(0, 2, 10))
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)))}
    transposed = cj.Task(lambda p, xb: (xb @ p["w"]).T, cross_entropy, params, x, y)
    with pytest.raises(ValueError, match="leading batch dimension: a batch of 3 inputs gave shape \\(2, 3\\)"):
        cj.per_example_grads(transposed)
    with pytest.raises(ValueError, match="leading batch dimension"):
        _build(transposed)


def test_model_output_must_be_batched(task, no_work):
    bad = cj.Task(_first_row_only, cross_entropy, task.params, task.inputs, task.targets)
    with pytest.raises(ValueError, match="leading batch dimension"):
        cj.per_example_grads(bad)
    with pytest.raises(ValueError, match="leading batch dimension"):
        _build(bad)


def test_loss_must_be_per_example(task, no_work):
    bad = cj.Task(linear_apply, _mean_loss, task.params, task.inputs, task.targets)
    for call in (lambda: cj.per_example_grads(bad), lambda: cj.influence(bad, [np.arange(3)], damping=LAM),
                 lambda: _build(bad), lambda: cj.DampedGGN(bad, damping=LAM)):
        with pytest.raises(ValueError, match="one loss per example"):
            call()


def test_class_targets_must_fit_the_outputs(task, no_work):
    # The softmax problem has 3 outputs; a label 3 (or -1) is read outside the logits by the
    # cross-entropy without complaint, so it is refused before any work, by every entry point.
    for label in (3, -1):
        y = np.asarray(task.targets).copy()
        y[[5, 7]] = label
        bad = cj.Task(linear_apply, cross_entropy, task.params, task.inputs, jnp.asarray(y))
        for call in (lambda: cj.per_example_grads(bad), lambda: cj.influence(bad, [np.arange(3)], damping=LAM),
                     lambda: _build(bad), lambda: cj.DampedGGN(bad, damping=LAM)):
            with pytest.raises(ValueError, match=r"outside \[0, 3\).*examples \[5, 7\]"):
                call()
    # Integer targets that are not class indices of a (B, q) output are left alone: regression
    # targets shaped like the outputs.
    from _models import get_problem

    from cif_jax.core import checks as _checks

    reg = get_problem("regression").task
    y = jnp.asarray(np.round(np.asarray(reg.targets) * 10)).astype(jnp.int32)
    assert y.ndim == 2 and int(y.max()) >= 2  # values a class check would refuse
    _checks.task(cj.Task(reg.apply_fn, reg.loss_fn, reg.params, reg.inputs, y))


# -- subsets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subsets, match",
    [
        ([np.array([], np.int64)], "empty"),
        ([], "empty"),
        (np.zeros((2, N), bool), "empty"),
        ([np.array([0, N])], "out of range"),
        ([np.array([-1, 2])], "out of range"),
        ([np.array([3, 5, 3])], "repeats indices"),
        (np.ones((2, N + 1), bool), r"shape \(Q, N\)"),
        (np.ones((2, 3, N), bool), r"shape \(Q, N\)"),
        (np.arange(5), "wrap it in a list"),
        ([np.array([1.0, 2.0])], "integer indices"),
    ],
)
def test_bad_subsets_are_refused(task, cache, no_work, subsets, match):
    g = np.ones(cache.num_params)
    for call in (
        lambda: cj.influence(task, subsets, damping=LAM),
        lambda: cj.subset_gradient_sums(task, subsets),
        lambda: cj.param_delta(cache, subsets),
        lambda: cj.loss_delta(cache, subsets, g),
        lambda: cj.cluster_counts(cache, subsets),
        lambda: cj.fold_alphas(cache, task, subsets),
        lambda: cj.subset_error_bound(cache, subsets, task=task),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            call()


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_clusters, match", [(0, "at least 1"), (N + 1, "exceeds"), (2.0, "integer")])
def test_num_clusters_out_of_range(task, no_work, num_clusters, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _build(task, num_clusters=num_clusters)


def test_sketch_dim_above_p_is_refused(task, no_work):
    with pytest.raises(ValueError, match="`sketch_dim` = .* exceeds the number of parameters p"):
        _build(task, sketch_dim=task.num_params + 1)


def test_huge_sketches_warn_before_work(task, no_work, monkeypatch):
    from cif_jax.cif import cache as cache_mod

    monkeypatch.setattr(cache_mod, "SKETCH_WARN_BYTES", 16)  # this task's N x d sketches are larger
    with pytest.warns(UserWarning, match="sketches take"), pytest.raises(AssertionError, match="expensive work"):
        _build(task)


def test_sketch_dim_zero(task, no_work):
    with pytest.raises(ValueError, match="`sketch_dim` must be at least 1"):
        _build(task, sketch_dim=0)


@pytest.mark.parametrize("damping", [0.0, -1e-3, float("nan"), float("inf")])
def test_damping_must_be_positive_and_finite(task, problem, no_work, damping):
    rhs = problem.grads[:2]
    for call in (
        lambda: _build(task, damping=damping),
        lambda: cj.influence(task, [np.arange(3)], damping=damping),
        lambda: cj.solve_ggn(task, rhs, damping=damping),
        lambda: cj.DampedGGN(task, damping=damping),
    ):
        with pytest.raises(ValueError, match="`damping` must be finite and > 0"):
            call()


def test_zero_tolerance_is_refused(task, problem, no_work):
    # Solver settings are checked when the solver object is made, before any call.
    with pytest.raises(ValueError, match="`rtol` and `atol` are both 0"):
        cj.CG(rtol=0.0, atol=0.0)


@pytest.mark.parametrize("settings", [dict(rhs_batch_size=0), dict(batch_size=0), dict(solver="cg"),
                                      dict(mesh="gpu")])
def test_influence_checks_its_settings_before_the_gradient_pass(task, no_work, settings):
    with pytest.raises((TypeError, ValueError), match="rhs_batch_size|batch_size|solver|mesh"):
        if "rhs_batch_size" in settings:
            settings = dict(solver=cj.CG(**settings))
        cj.influence(task, [np.arange(3)], damping=LAM, **settings)


@pytest.mark.parametrize("preconditioner", ["auto", "nystrom", "jacobi", "kfac", "ekfac"])
def test_preconditioner_builds_wait_for_valid_input(task, problem, no_work, preconditioner):
    solver = cj.CG(preconditioner=preconditioner)
    with pytest.raises(ValueError, match="`damping`"):
        cj.solve_ggn(task, problem.grads[:8], damping=-1.0, solver=solver)
    with pytest.raises(ValueError, match="right-hand sides contain NaN"):
        cj.solve_ggn(task, np.full((8, problem.num_params), np.nan), damping=LAM, solver=solver)
    with pytest.raises(ValueError, match="`num_clusters`"):
        _build(task, num_clusters=N + 1, solver=solver)


def test_other_bad_settings(task, problem, no_work):
    with pytest.raises(ValueError, match="`rtol` must be finite and >= 0"):
        cj.CG(rtol=-1e-3)
    with pytest.raises(ValueError, match="`max_steps` must be at least 1"):
        cj.CG(max_steps=0)
    with pytest.raises(ValueError, match="`batch_size` must be at least 1"):
        cj.per_example_grads(task, batch_size=0)
    with pytest.raises(ValueError, match="`max_restarts`"):
        cj.CG(max_restarts=-1)
    with pytest.raises(ValueError, match=r"`rhs` must have shape \(R, p\)"):
        cj.solve_ggn(task, problem.grads[:2, :-1], damping=LAM)
    with pytest.raises(ValueError, match=r"`vectors` must have shape \(k, p\)"):
        cj.DampedGGN(task, damping=LAM).apply(problem.grads[0])
    with pytest.raises(ValueError, match="right-hand sides contain NaN"):
        cj.solve_ggn(task, np.full((2, problem.num_params), np.nan), damping=LAM)


@pytest.mark.parametrize(
    "key",
    [
        0,
        np.zeros(2, np.float32),
        np.zeros(3, np.uint32),
        "key",
    ],
)
def test_key_must_be_a_prng_key(task, no_work, key):
    with pytest.raises(TypeError, match="PRNG key"):
        _build(task, key=key)


# -- non-finite values -----------------------------------------------------------------------


def test_nan_params_name_the_examples(task):
    nan_params = jax.tree_util.tree_map(lambda a: a.at[0].set(jnp.nan), task.params)
    bad = cj.Task(task.apply_fn, task.loss_fn, nan_params, task.inputs, task.targets)
    every = r"for 48 example\(s\), e.g. \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]"
    with pytest.raises(ValueError, match="per-example gradients contain NaN or Inf " + every):
        cj.per_example_grads(bad)
    with pytest.raises(ValueError, match=every):
        cj.influence(bad, random_subsets(), damping=LAM)
    with pytest.raises(ValueError, match=every):
        _build(bad)


def test_nan_input_row_names_that_example(task):
    bad = cj.Task(task.apply_fn, task.loss_fn, task.params, task.inputs.at[17, 2].set(jnp.nan), task.targets)
    one = r"NaN or Inf for 1 example\(s\), e.g. \[17\]"
    with pytest.raises(ValueError, match=one):
        cj.per_example_grads(bad)
    with pytest.raises(ValueError, match=one):
        cj.influence(bad, random_subsets(), damping=LAM)
    with pytest.raises(ValueError, match=one):
        _build(bad)


# -- queries -----------------------------------------------------------------------------------


def test_eval_grads_of_wrong_shape(cache, no_work):
    p = cache.num_params
    subsets = random_subsets()
    for g, match in [
        (np.ones(p + 1), r"`eval_grads` must have shape \(p,\)"),
        (np.ones((NUM_QUERIES + 1, p)), r"`eval_grads` must have shape \(p,\) or \(5, 18\)"),
        (np.ones((NUM_QUERIES, p - 1)), "`eval_grads` must have shape"),
        (np.ones((1, NUM_QUERIES, p)), "`eval_grads` must be 1-D"),
    ]:
        with pytest.raises(ValueError, match=match):
            cj.loss_delta(cache, subsets, g)
    with pytest.raises(ValueError, match="eval_grads contain NaN or Inf for 1 row"):
        cj.loss_delta(cache, subsets, np.full(p, np.nan))
    with pytest.raises(ValueError, match="`eval_grads` must have shape"):
        cj.cluster_alphas(cache, np.ones(p + 1))
    with pytest.raises(ValueError, match=r"`alphas` must have shape \(C,\)"):
        cj.loss_delta_from_alphas(cache, subsets, np.ones(NUM_CLUSTERS + 1))


def test_cache_refuses_another_task(task, cache, no_work):
    folds = np.array_split(np.arange(N), NUM_QUERIES)
    nudged = jax.tree_util.tree_map(lambda a: a * (1 + 1e-9), task.params)
    other = cj.Task(task.apply_fn, task.loss_fn, nudged, task.inputs, task.targets)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        cj.fold_alphas(cache, other, folds)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        cj.fold_loss_delta(cache, other, folds)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        cj.subset_error_bound(cache, folds, task=other)
    smaller = cj.Task(task.apply_fn, task.loss_fn, task.params, task.inputs[:-1], task.targets[:-1])
    with pytest.raises(ValueError, match="built for N = 48"):
        cj.fold_alphas(cache, smaller, [np.arange(3)])


def test_error_bound_subset_size(cache):
    with pytest.raises(ValueError, match=r"\[1, N\] = \[1, 48\]"):
        cj.error_bound(cache, 0)
    with pytest.raises(ValueError, match=r"\[1, N\]"):
        cj.error_bound(cache, N + 1)
    with pytest.raises(TypeError, match="integer"):
        cj.error_bound(cache, 2.5)


def test_batch_norm_in_training_mode_is_refused_with_the_fix_and_in_inference_mode_accepted():
    import optax
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(4, 3, rngs=rngs)
            self.norm = nnx.BatchNorm(3, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.dense(x))

    net = Net(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(10, 4)), jnp.float32)
    y = jnp.asarray(np.arange(10) % 3, jnp.int32)
    loss = optax.softmax_cross_entropy_with_integer_labels
    with pytest.raises(ValueError, match="inference mode"):
        cj.per_example_grads(cj.Task.from_nnx(net, loss, x, y))
    net.eval()
    grads = cj.per_example_grads(cj.Task.from_nnx(net, loss, x, y))
    assert grads.shape[0] == 10 and bool(jnp.all(jnp.isfinite(grads)))

    import flax.linen as linen

    class LinenNet(linen.Module):
        train: bool

        @linen.compact
        def __call__(self, x):
            return linen.BatchNorm(use_running_average=not self.train)(linen.Dense(3)(x))

    variables = LinenNet(train=False).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="use_running_average=True"):
        cj.per_example_grads(cj.Task.from_linen(LinenNet(train=True), variables, loss, x, y))
    grads = cj.per_example_grads(cj.Task.from_linen(LinenNet(train=False), variables, loss, x, y))
    assert grads.shape[0] == 10 and bool(jnp.all(jnp.isfinite(grads)))
