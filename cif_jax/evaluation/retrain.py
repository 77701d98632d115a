"""Ground truth for influence estimates: leave-subset-out retraining and the PBRF.

Three ways to answer "what changes when the training examples S are removed?"
without a first-order approximation in the data:

* :func:`retrain`: cold-start retraining without S, with the same protocol
  (:func:`cif_jax.evaluation.training.train`: optimiser, epochs, schedule, shuffling seed)
  and the same initialisation as the base model. The measured change of the
  evaluation losses is the ground truth for fidelity.
* :func:`train_many`: the same for many small models at once, in pure JAX:
  full-batch gradient descent (``train``'s optimiser with one batch) vmapped over
  training subsets and initialisations (logistic regression, small MLPs).
* :func:`pbrf`: the proximal Bregman response function of Bae et al. (2022), the
  quantity influence functions approximate for networks that are not trained
  to convergence.

Sign and scale follow the README: ``param_delta = theta_{-S} - theta_0`` is the
parameter change when S is removed (compare :func:`cif_jax.estimators.influence`,
``Delta theta_S = (1/N) H~^{-1} sum_{i in S} g_i``, eq. 3), and
``loss_delta = loss(theta_{-S}) - loss(theta_0)`` on each evaluation example:
**positive means removing S raised the loss, S was helpful** (compare
:func:`cif_jax.loss_delta`, eq. 11). Average ``loss_delta`` over its last axis for
the mean loss of an evaluation set.

Normalisation matters at first order. Retraining on the kept examples minimises
their *mean* loss, ``1/(N - m)``-normalised for ``|S| = m``; eq. (3) and the PBRF
remove S from the ``1/N``-normalised objective. With an L2 penalty (weight decay)
the two differ by a term of the same order as the influence itself: to first
order ``theta_kept - theta_0 = N/(N-m) (Delta theta_S - (m/N) H~^{-1} g_bar)`` with
``g_bar = (1/N) sum_i g_i``. :func:`train_many` offers both
(``normalization="kept"`` or ``"all"``); the tests check both relations.

References:
    Koh and Liang, "Understanding black-box predictions via influence functions",
    ICML 2017. https://arxiv.org/abs/1703.04730

    Bae, Ng, Lo, Ghassemi and Grosse, "If influence functions are the answer,
    then what is the question?", NeurIPS 2022 (eq. 9, the PBRF).
    https://arxiv.org/abs/2209.05364
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, PyTree

from ..core import checks as _checks
from ..core import snapshots as _snapshots
from ..core.chunks import chunk_map, chunk_sum
from ..core.task import Task

__all__ = ["PBRFResult", "RetrainResult", "TrainedModels", "evaluate_many", "pbrf", "retrain", "train_many"]

_NORMALIZATIONS = ("kept", "all")


# -- cold-start retraining with cif_jax.evaluation.training.train ---------------------------------------


class RetrainResult(NamedTuple):
    """Leave-subset-out retraining, one row per subset S (Q subsets, E evaluation examples).

    Attributes:
        param_delta: ``(Q, p)`` ``theta_{-S} - theta_0``, flat in ``ravel_pytree`` order
            of the model's ``nnx.Param`` leaves (that of ``Task.from_nnx``).
        loss_delta: ``(Q, E)`` ``loss_e(theta_{-S}) - loss_e(theta_0)``; positive: S was helpful to e.
        eval_losses: ``(Q, E)`` per-example evaluation losses of the retrained models.
        base_eval_losses: ``(E,)`` those of the base model.
    """

    param_delta: Float[Array, "q p"]
    loss_delta: Float[Array, "q e"]
    eval_losses: Float[Array, "q e"]
    base_eval_losses: Float[Array, " e"]


def _nnx_flat(model):
    from flax import nnx

    _, params, _ = nnx.split(model, nnx.Param, ...)
    return ravel_pytree(params)[0]


def _nnx_eval_losses(model, x, y, batch_size):
    task = Task.from_nnx(model, optax.softmax_cross_entropy_with_integer_labels, x, y)
    return _snapshots.per_example_losses(task, batch_size)


def _model_factory(build_model):
    """``(first model, its flat initial parameters, fresh())``: ``fresh()`` returns a new model per call and
    refuses one handed out before or one whose initialisation differs (cold-start retraining needs both)."""
    from flax import nnx

    first = build_model()
    if not isinstance(first, nnx.Module):
        raise TypeError(f"`build_model()` must return a flax.nnx.Module, got {type(first).__name__}.")
    init = _nnx_flat(first)

    def fresh():
        model = build_model()
        if model is first:
            raise ValueError("`build_model()` returned a model it had returned before; cold-start retraining needs "
                             "a new model per call (build it inside the function).")
        flat = _nnx_flat(model)
        # Also catches a function that hands out one model again after it was trained in place.
        if flat.shape != init.shape or not bool(jnp.array_equal(flat, init)):
            raise ValueError("`build_model()` returned different initial parameters on two calls; fix its seed so "
                             "that every retraining starts from the base model's initialisation.")
        return model

    return first, init, fresh


def retrain(
    build_model: Callable[[], Any],
    inputs,
    targets,
    subsets,
    *,
    eval_inputs,
    eval_targets,
    epochs: int,
    learning_rate: float,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "constant",
    seed: int = 0,
    base_model=None,
    eval_batch_size: int | None = 1024,
    progress: bool = False,
) -> RetrainResult:
    """Exact leave-subset-out retraining: one cold-start :func:`cif_jax.evaluation.training.train` run per subset.

    For each subset S the model is rebuilt by ``build_model()`` (the base model's
    initialisation) and trained on the examples not in S with the base model's
    protocol: the same optimiser settings, epochs, learning-rate schedule and
    shuffling seed (the permutations differ because N differs). The training
    loss is ``train``'s mean cross-entropy over each mini-batch, so the objective
    is normalised by ``N - |S|`` (see the module docstring). Evaluation losses are
    per-example softmax cross-entropies.

    Args:
        build_model: a function of no arguments returning a fresh ``flax.nnx``
            model with the base model's initialisation, e.g.
            ``lambda: build_model("mlp", ..., seed=0)``. It must return a new
            object with identical parameters on every call.
        inputs: ``(N, ...)`` training inputs.
        targets: ``(N,)`` integer labels.
        subsets: the examples to remove: a boolean mask (Q, N), a 2-D integer
            array (Q, m), or a list of index arrays (non-empty, in range, no
            duplicates, never all N examples).
        eval_inputs: ``(E, ...)`` evaluation inputs.
        eval_targets: ``(E,)`` evaluation labels.
        epochs, learning_rate, batch_size, momentum, weight_decay, schedule, seed:
            the training protocol, as :func:`cif_jax.evaluation.training.train`.
        base_model: the trained base model, if already at hand; otherwise it is
            trained here from ``build_model()`` on all N examples with the same
            protocol.
        eval_batch_size: evaluation examples per chunk.
        progress: show ``train``'s progress bars.

    Returns:
        :class:`RetrainResult`.

    Raises:
        ValueError: on bad subsets (including one that removes every example),
            shapes, or training settings, or when ``build_model`` returns the same
            object twice or different initial parameters; all before any training.

    References:
        Koh and Liang, ICML 2017 (leave-one-out retraining as ground truth).
    """
    from flax import nnx

    from .training import check_xy, learning_rates, make_optimizer, train

    if not callable(build_model) or isinstance(build_model, nnx.Module):
        raise TypeError("`build_model` must be a function of no arguments returning a fresh flax.nnx model "
                        "(e.g. `lambda: build_model('mlp', ..., seed=0)`), not a model.")
    x, y = check_xy(inputs, targets)
    xe, ye = check_xy(eval_inputs, eval_targets)
    if xe.shape[1:] != x.shape[1:]:
        raise ValueError(f"`eval_inputs` must hold examples shaped like the training inputs {x.shape[1:]}, got "
                         f"{xe.shape[1:]}.")
    for arr, name in ((x, "inputs"), (xe, "eval_inputs")):
        _snapshots.check_finite_data(arr, name)
    n = x.shape[0]
    subs = _checks.subsets(subsets, n)
    full = np.flatnonzero(subs.sizes == n)
    if full.size:
        raise ValueError(f"`subsets` {full[:10].tolist()} remove all {n} examples: nothing would be left to train on.")
    epochs = _checks.positive_int(epochs, "epochs")
    batch_size = _checks.positive_int(batch_size, "batch_size")
    eval_batch_size = _checks.positive_int(eval_batch_size, "eval_batch_size", allow_none=True)
    learning_rate = _checks.positive_float(learning_rate, "learning_rate")
    learning_rates(learning_rate, total_steps=1, schedule=schedule)  # validates the schedule name
    make_optimizer(momentum=momentum, weight_decay=weight_decay)  # validates the optimiser settings

    first, init, fresh = _model_factory(build_model)
    kwargs = dict(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, momentum=momentum,
                  weight_decay=weight_decay, schedule=schedule, seed=seed, progress=progress)
    if base_model is None:
        base_model, _ = train(first, x, y, **kwargs)
    elif not isinstance(base_model, nnx.Module):
        raise TypeError(f"`base_model` must be a flax.nnx.Module, got {type(base_model).__name__}.")
    base_flat = _nnx_flat(base_model)
    if base_flat.shape != init.shape:
        raise ValueError(f"`base_model` has {base_flat.size} parameters, `build_model()` {init.size}.")
    base_losses = _nnx_eval_losses(base_model, xe, ye, eval_batch_size)

    deltas, losses = [], []
    for mask in subs.mask:
        model, _ = train(fresh(), x[~mask], y[~mask], **kwargs)
        deltas.append(_nnx_flat(model) - base_flat)
        losses.append(_nnx_eval_losses(model, xe, ye, eval_batch_size))
    losses = jnp.stack(losses)
    return RetrainResult(jnp.stack(deltas), losses - base_losses[None, :], losses, base_losses)


# -- many small models in pure JAX ------------------------------------------------------------


class TrainedModels(NamedTuple):
    """M models trained by :func:`train_many`.

    Attributes:
        params: the parameters, a pytree shaped like ``task.params`` with a leading axis M.
        objective: ``(M,)`` final training objective (data term plus ``weight_decay/2 ||theta||^2``).
        grad_norm: ``(M,)`` norm of its gradient at the end: a convergence check.
    """

    params: PyTree
    objective: Float[Array, " m"]
    grad_norm: Float[Array, " m"]


@eqx.filter_jit
def _train_many(task, weights, denominators, inits, learning_rate, num_steps, momentum, weight_decay,
                model_batch_size):
    from .training import make_optimizer

    _, unravel = ravel_pytree(task.params)
    tx = make_optimizer(momentum=momentum, weight_decay=weight_decay)

    def data_loss(flat, w, denom):
        losses = task.loss_fn(task.apply_fn(unravel(flat), task.inputs), task.targets)
        return jnp.sum(w * losses) / denom

    def fit(args):
        w, denom, init = args

        def step(carry, _):
            flat, state = carry
            direction, state = tx.update(jax.grad(data_loss)(flat, w, denom), state, flat)
            return (flat - (learning_rate * direction).astype(flat.dtype), state), None

        (flat, _), _ = jax.lax.scan(step, (init, tx.init(init)), None, length=num_steps)
        loss, grad = jax.value_and_grad(data_loss)(flat, w, denom)
        wd = jnp.asarray(weight_decay, flat.dtype)
        objective = loss + 0.5 * wd * jnp.sum(flat * flat)
        return flat, objective, jnp.linalg.norm(grad + wd * flat)

    if model_batch_size is None:
        flats, objective, grad_norm = jax.vmap(fit)((weights, denominators, inits))
    else:
        flats, objective, grad_norm = jax.lax.map(fit, (weights, denominators, inits), batch_size=model_batch_size)
    return jax.vmap(unravel)(flats), objective, grad_norm


def train_many(
    task: Task,
    keep,
    *,
    num_steps: int,
    learning_rate: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    normalization: str = "kept",
    init_params: PyTree | None = None,
    stacked_init: bool = False,
    model_batch_size: int | None = None,
) -> TrainedModels:
    """Trains M small models at once, each on its own subset of the training data.

    Model m minimises, by ``num_steps`` full-batch steps of ``train``'s optimiser
    (:func:`cif_jax.evaluation.training.make_optimizer`: coupled weight decay, heavy-ball
    momentum, then ``-learning_rate``),

    $$
    F_m(\\theta) = \\frac{1}{D_m} \\sum_{i:\\, \\mathrm{keep}_{mi}} \\ell_i(\\theta)
    + \\frac{wd}{2} \\|\\theta\\|^2,
    \\qquad D_m = \\sum_i \\mathrm{keep}_{mi} \\ (\\text{"kept"}) \\ \\text{or} \\ N \\ (\\text{"all"}),
    $$

    from ``init_params`` (default: ``task.params``; build the task with the
    initial parameters for cold-start training). With one batch this is exactly
    ``cif_jax.evaluation.training.train(..., batch_size=N)`` on the kept examples
    (``"kept"``). The M problems are vmapped (or mapped in batches of
    ``model_batch_size``) in one compiled program; each evaluates the model on
    all N examples at once, so this is meant for small models (logistic
    regression, small MLPs). ``task.loss_fn`` is the training loss.

    Args:
        task: model, per-example loss and training data.
        keep: ``(M, N)`` boolean mask of the examples each model trains on
            (note: kept, not removed; every row non-empty).
        num_steps: full-batch steps per model.
        learning_rate: step size > 0.
        momentum: heavy-ball momentum in [0, 1).
        weight_decay: ``wd >= 0``; with damping ``lambda = wd`` the damped GGN of
            the base model is the Hessian of ``F`` for GLMs (paper eq. 2).
        normalization: ``"kept"`` (mean over the kept examples, as ``train``) or
            ``"all"`` (divide by N: removal from the objective of eq. 3 and the PBRF).
        init_params: starting parameters shaped like ``task.params``; with
            ``stacked_init=True`` a leading axis M gives every model its own
            (e.g. ``jax.vmap(init_fn)(keys)`` for several seeds).
        stacked_init: whether ``init_params`` has the leading axis M.
        model_batch_size: models trained together per vmapped batch (None: all M).

    Returns:
        :class:`TrainedModels`; check ``grad_norm`` for convergence.

    Raises:
        ValueError: on a bad mask, settings, or initial parameters, before training.
    """
    _checks.task(task)
    n = task.num_examples
    keep = _snapshots.check_keep_masks(keep, n)
    num_steps = _checks.positive_int(num_steps, "num_steps")
    learning_rate = _checks.positive_float(learning_rate, "learning_rate")
    momentum = float(momentum)
    weight_decay = _checks.nonnegative_float(weight_decay, "weight_decay")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"`momentum` must lie in [0, 1), got {momentum}.")
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"`normalization` must be one of {_NORMALIZATIONS}, got {normalization!r}.")
    model_batch_size = _checks.positive_int(model_batch_size, "model_batch_size", allow_none=True)
    _snapshots.check_finite_data(task.inputs, "task.inputs")
    _snapshots.check_finite_data(task.targets, "task.targets")
    flat0, _ = ravel_pytree(task.params)
    m = keep.shape[0]
    if init_params is None:
        if stacked_init:
            raise ValueError("`stacked_init=True` needs `init_params` with a leading axis M.")
        init_params = task.params
    if stacked_init:
        if _snapshots.check_stacked(init_params, task.params, "init_params") != m:
            raise ValueError(f"`init_params` with `stacked_init=True` needs a leading axis of size M = {m} (one "
                             "initialisation per row of `keep`).")
        inits = jax.vmap(lambda p: ravel_pytree(p)[0])(init_params)
        if not bool(jnp.isfinite(inits).all()):
            raise ValueError("`init_params` holds NaN or Inf parameters.")
    else:
        _snapshots.check_params_like(init_params, task.params, "init_params")
        inits = jnp.broadcast_to(ravel_pytree(init_params)[0], (m, flat0.shape[0]))
    weights = jnp.asarray(keep, flat0.dtype)
    denominators = keep.sum(axis=1) if normalization == "kept" else np.full(m, n)
    params, objective, grad_norm = _train_many(
        task, weights, jnp.asarray(denominators, flat0.dtype), inits, jnp.asarray(learning_rate, flat0.dtype),
        num_steps, momentum, weight_decay, model_batch_size,
    )
    diverged = np.flatnonzero(~np.isfinite(np.asarray(objective)))
    if diverged.size:
        raise ValueError(f"training diverged (NaN or Inf objective) for model(s) {diverged[:10].tolist()}; lower "
                         "`learning_rate`.")
    return TrainedModels(params, objective, grad_norm)


@eqx.filter_jit
def _evaluate_many(task, params, eval_inputs, eval_targets, batch_size):
    def chunk(c):
        x, y = c
        losses = jax.vmap(lambda p: task.loss_fn(task.apply_fn(p, x), y))(params)  # (M, B)
        return losses.T

    return chunk_map(chunk, (eval_inputs, eval_targets), batch_size).T


def evaluate_many(task: Task, params: PyTree, eval_inputs, eval_targets, *,
                  batch_size: int | None = None) -> Float[Array, "m e"]:
    """Per-example losses ``loss_fn(apply_fn(theta_m, x_e), y_e)`` of M stacked models.

    Args:
        task: supplies the model and the loss (and the reference structure).
        params: parameters with a leading axis M, e.g. ``train_many(...).params``.
        eval_inputs: ``(E, ...)`` evaluation inputs.
        eval_targets: ``(E, ...)`` evaluation targets.
        batch_size: evaluation examples per chunk (None: chosen for a memory budget, see :func:`cif_jax.core.chunks.budget_batch_size`).

    Returns:
        ``(M, E)`` losses.
    """
    ev = _snapshots.eval_task(task, eval_inputs, eval_targets)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    _snapshots.check_stacked(params, task.params, "params")
    return _evaluate_many(task, params, ev.inputs, ev.targets, batch_size)


# -- the proximal Bregman response function ---------------------------------------------------


class PBRFResult(NamedTuple):
    """PBRF responses, one row per subset S.

    Attributes:
        param_delta: ``(Q, p)`` ``theta_S - theta_0`` after the optimiser steps.
        loss_delta: ``(Q, E)`` ``loss_e(theta_S) - loss_e(theta_0)`` on the evaluation
            examples (None when no evaluation data was given); positive: S was helpful to e.
        objective: ``(Q,)`` the PBRF objective at ``theta_S`` (0 at ``theta_0``).
    """

    param_delta: Float[Array, "q p"]
    loss_delta: Float[Array, "q e"] | None
    objective: Float[Array, " q"]


@eqx.filter_jit
def _pbrf(task, weights, optimizer, damping, num_steps, batch_size, subset_batch_size):
    flat0, unravel = ravel_pytree(task.params)
    n = task.num_examples

    def base(c):
        x, y = c
        z0 = task.apply_fn(task.params, x)
        out_grad = jax.grad(lambda z: jnp.sum(task.loss_fn(z, y)))(z0)  # per example: losses are separable
        return z0, task.loss_fn(z0, y), out_grad

    z0, loss0, out_grad0 = chunk_map(base, (task.inputs, task.targets), batch_size)

    def value_and_grad(flat, w):
        def chunk(c):
            x, y, z0c, l0c, gz0c, wc = c

            def objective(fl):
                z = task.apply_fn(unravel(fl), x)
                loss = task.loss_fn(z, y)
                # Bregman divergence of the loss in the outputs, around f(theta_0, x_i).
                linear = jnp.sum((gz0c * (z - z0c)).reshape(loss.shape[0], -1), axis=1)
                return jnp.sum(loss - l0c - linear - wc * loss)

            return jax.value_and_grad(objective)(flat)

        value, grad = chunk_sum(chunk, (task.inputs, task.targets, z0, loss0, out_grad0, w), batch_size)
        diff = flat - flat0
        lam = jnp.asarray(damping, flat.dtype)
        nn = jnp.asarray(n, flat.dtype)
        return value / nn + 0.5 * lam * jnp.sum(diff * diff), grad / nn + lam * diff

    def solve(w):
        def step(carry, _):
            flat, state = carry
            _, grad = value_and_grad(flat, w)
            updates, state = optimizer.update(grad, state, flat)
            return (optax.apply_updates(flat, updates), state), None

        (flat, _), _ = jax.lax.scan(step, (flat0, optimizer.init(flat0)), None, length=num_steps)
        return flat - flat0, value_and_grad(flat, w)[0]

    if subset_batch_size is None:
        return jax.lax.map(solve, weights)
    return jax.lax.map(solve, weights, batch_size=subset_batch_size)


def pbrf(
    task: Task,
    subsets,
    *,
    damping: float,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    eval_inputs=None,
    eval_targets=None,
    batch_size: int | None = None,
    subset_batch_size: int | None = None,
) -> PBRFResult:
    """The proximal Bregman response function (Bae et al. 2022, eq. 9) of removing each subset S.

    From ``theta_0 = task.params``, runs ``num_steps`` full-batch steps of
    ``optimizer`` on

    $$
    \\frac{1}{N} \\sum_{i=1}^N D_\\ell\\big(f(\\theta, x_i), f(\\theta_0, x_i)\\big)
    - \\frac{1}{N} \\sum_{i \\in S} \\ell\\big(f(\\theta, x_i), y_i\\big)
    + \\frac{\\lambda}{2} \\|\\theta - \\theta_0\\|^2,
    $$

    with ``D_l(z, z0) = l(z) - l(z0) - dl/dz(z0)^T (z - z0)`` the Bregman
    divergence of the loss in the outputs. Its Hessian at ``theta_0`` is the damped
    GGN ``H~`` (eq. 2) and its gradient there ``-(1/N) sum_{i in S} g_i``, so its
    minimiser is, to first order, the IF response ``Delta theta_S`` of eq. (3):
    same sign (removal), same ``1/N`` scale. The gradient is accumulated over
    chunks of ``batch_size`` examples (memory O(p + B q) per subset, beyond the
    model's activations); subsets are mapped sequentially, or vmapped in batches
    of ``subset_batch_size``.

    Args:
        task: the model snapshot ``theta_0`` and its training data.
        subsets: the examples to remove: a boolean mask (Q, N), a 2-D integer
            array (Q, m), or a list of index arrays (non-empty, in range, no duplicates).
        damping: ``lambda > 0``.
        optimizer: an optax transformation whose ``update(grads, state, params)``
            needs no extra arguments (e.g. ``optax.sgd(1e-2, momentum=0.9)``,
            ``optax.adam(1e-3)``).
        num_steps: optimiser steps (>= 1).
        eval_inputs: optional ``(E, ...)`` evaluation inputs for ``loss_delta``.
        eval_targets: optional ``(E, ...)`` evaluation targets.
        batch_size: training examples per chunk of each gradient evaluation.
        subset_batch_size: subsets optimised together (vmapped); None: one at a time.

    Returns:
        :class:`PBRFResult`.

    Raises:
        ValueError: on bad subsets, non-positive damping or step count, a bad
            optimizer, or evaluation data that does not match the model, before any work.

    References:
        Bae, Ng, Lo, Ghassemi and Grosse, "If influence functions are the answer,
        then what is the question?", NeurIPS 2022, eq. (9). https://arxiv.org/abs/2209.05364
    """
    _checks.task(task)
    subs = _checks.subsets(subsets, task.num_examples)
    damping = _checks.damping(damping)
    num_steps = _checks.positive_int(num_steps, "num_steps")
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    subset_batch_size = _checks.positive_int(subset_batch_size, "subset_batch_size", allow_none=True)
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"`optimizer` must be an optax.GradientTransformation, got {type(optimizer).__name__}.")
    if (eval_inputs is None) != (eval_targets is None):
        raise ValueError("Give both `eval_inputs` and `eval_targets`, or neither.")
    ev = None if eval_inputs is None else _snapshots.eval_task(task, eval_inputs, eval_targets)
    flat0, unravel = ravel_pytree(task.params)
    if not bool(jnp.isfinite(flat0).all()):
        raise ValueError("`task.params` holds NaN or Inf parameters.")
    weights = jnp.asarray(subs.mask, flat0.dtype)
    deltas, objective = _pbrf(task, weights, optimizer, damping, num_steps, batch_size, subset_batch_size)
    if not bool(jnp.isfinite(deltas).all()):
        bad = np.flatnonzero(~np.asarray(jnp.isfinite(deltas).all(axis=1)))
        raise ValueError(f"PBRF diverged (NaN or Inf parameters) for subset(s) {bad[:10].tolist()}; lower the "
                         "optimizer's learning rate or raise `damping`.")
    loss_delta = None
    if ev is not None:
        params = jax.vmap(unravel)(flat0[None, :] + deltas)
        losses = _evaluate_many(task, params, ev.inputs, ev.targets, batch_size)
        base = _snapshots.per_example_losses(ev, batch_size)
        loss_delta = losses - base[None, :]
    return PBRFResult(deltas, loss_delta, objective)
