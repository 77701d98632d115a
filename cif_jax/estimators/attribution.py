"""Gradient-based attribution baselines: Grad-Dot, TracIn and TRAK.

All three score a training example i (or a group S of them) for each evaluation
example z, on the same :class:`cif_jax.Task` as the influence functions.

Sign convention (the library's, see the README): **a positive score means the
training example helped the evaluation example**, i.e. removing it is predicted
to *raise* the evaluation loss, as for :func:`cif_jax.loss_delta`. For
reference, the per-example IF score is ``(1/N) g_z^T H~^{-1} g_i`` (paper
eqs. 3 and 11), the first-order loss change on removing i. Grad-Dot replaces
``H~`` by the identity and drops the ``1/N``; TracIn sums Grad-Dot over training
checkpoints weighted by the learning rate (the loss decrease on z caused by the
SGD steps taken on i); TRAK predicts the change of the model's output margin
rather than of the loss. The scales therefore differ between methods; signs and
rankings are comparable.

Group scores (``groups=``) are the sums of the members' scores, the convention
of the CiF paper for per-example methods. They are computed in the same
streamed pass: the (N, p) training gradients are never held, only chunks of
``batch_size`` rows (memory O(E p + B p) for E evaluation examples, plus
O(N d) features for TRAK).

References:
    Charpiat, Girard, Felardos and Tarabalka, "Input similarity from the neural
    network perspective", NeurIPS 2019 (gradient similarity, Grad-Dot).

    Pruthi, Liu, Kale and Sundararajan, "Estimating training data influence by
    tracing gradient descent", NeurIPS 2020 (TracIn). https://arxiv.org/abs/2002.08484

    Park, Georgiev, Ilyas, Leclerc and Madry, "TRAK: attributing model behavior
    at scale", ICML 2023. https://arxiv.org/abs/2303.14186
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ..cif.sketch import DEFAULT_BLOCK_SIZE
from ..cif.sketch import sketch as _sketch_rows
from ..core import checks as _checks
from ..core import snapshots as _snapshots
from ..core.checks import as_int, as_key
from ..core.chunks import chunk_map
from ..core.gradients import per_example_grads_pass, raise_on_bad, streamed_map, streamed_sum
from ..core.task import Task

__all__ = ["grad_dot", "tracin", "trak", "trak_margin"]

HIGHEST = jax.lax.Precision.HIGHEST


# -- streamed passes -------------------------------------------------------------------------


@eqx.filter_jit
def _dot_pass(task: Task, eval_feats, mask_t, batch_size):
    """``eval_feats @ g_i`` for every training example, or its group sums: (E, N) or (E, G)."""
    n = task.num_examples

    if mask_t is None:

        def rows(g, _):
            return jnp.matmul(g, eval_feats.T, precision=HIGHEST)

        out, bad = streamed_map(task, rows, jnp.zeros(n, jnp.int8), batch_size)
        return out.T, bad

    def sums(g, m):
        return jnp.matmul(m.T.astype(g.dtype), jnp.matmul(g, eval_feats.T, precision=HIGHEST), precision=HIGHEST)

    out, bad = streamed_sum(task, sums, mask_t, batch_size)
    return out.T, bad


@eqx.filter_jit
def _feature_pass(task: Task, key, sketch_dim, block_size, batch_size):
    """Per-example gradients of ``task``'s "loss", JL-projected (or raw when ``sketch_dim`` is None): (N, d)."""

    def project(g, _):
        if sketch_dim is None:
            return g
        return _sketch_rows(g, key, sketch_dim, block_size=block_size)

    return streamed_map(task, project, jnp.zeros(task.num_examples, jnp.int8), batch_size)


@eqx.filter_jit
def _margin_pass(task: Task, batch_size):
    """The TRAK margin ``f_i`` of every example at ``task.params``: (N,)."""

    def chunk(c):
        x, y = c
        return trak_margin(task.apply_fn(task.params, x), y)

    return chunk_map(chunk, (task.inputs, task.targets), batch_size)


@jax.jit
def _kernel_scores(feats, eval_feats, q_bar, mask_t, ridge):
    """``phi(z)^T (Phi^T Phi + ridge I)^{-1} Phi^T Q_bar`` (summed over groups), and the kernel's eigenvalues."""
    kernel = jnp.matmul(feats.T, feats, precision=HIGHEST)
    kernel = kernel + jnp.asarray(ridge, kernel.dtype) * jnp.eye(kernel.shape[0], dtype=kernel.dtype)
    evals, evecs = jnp.linalg.eigh(kernel)
    # phi(z)^T K^{-1} from the eigendecomposition, (E, d); the caller checks `evals` before using it.
    left = jnp.matmul(jnp.matmul(eval_feats, evecs, precision=HIGHEST) / evals[None, :], evecs.T, precision=HIGHEST)
    weighted = feats * q_bar[:, None]  # Q_bar Phi_k: (N, d)
    if mask_t is not None:
        weighted = jnp.matmul(mask_t.T.astype(feats.dtype), weighted, precision=HIGHEST)  # (G, d)
    return jnp.matmul(left, weighted.T, precision=HIGHEST), evals


# -- helpers ---------------------------------------------------------------------------------


def _group_mask_t(groups, n: int):
    if groups is None:
        return None
    subs = _checks.subsets(groups, n, name="groups")
    return jnp.asarray(subs.mask.T)


def _eval_grads(eval_task: Task, batch_size) -> Array:
    grads = per_example_grads_pass(eval_task, batch_size)
    _checks.finite_rows(grads, "evaluation gradients")
    return grads


def _raise_bad_eval(bad) -> None:
    bad = np.asarray(bad)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise ValueError(
            f"evaluation margin gradients contain NaN or Inf for {idx.size} evaluation example(s), e.g. "
            f"{idx[:10].tolist()}. Check the evaluation data and the model snapshot."
        )


def trak_margin(outputs: Float[Array, "b k"], targets) -> Float[Array, " b"]:
    """TRAK's multiclass model output ``f = log p_y - log(1 - p_y)`` from logits.

    With ``p = softmax(z)``, ``f = z_y - logsumexp_{j != y} z_j`` (Park et al.
    2023, section 3 and appendix: the margin whose derivative gives the
    cross-entropy's out-to-loss weight ``dL/df = -(1 - p_y) = -sigmoid(-f)``).

    Args:
        outputs: ``(B, K)`` logits, ``K >= 2``.
        targets: ``(B,)`` integer labels.

    Returns:
        ``(B,)`` margins.
    """
    hit = jax.nn.one_hot(targets, outputs.shape[-1], dtype=bool)
    others = jnp.where(hit, -jnp.inf, outputs)
    correct = jnp.sum(jnp.where(hit, outputs, 0), axis=-1)
    return correct - jax.nn.logsumexp(others, axis=-1)


def _check_classifier(task: Task) -> None:
    take = min(2, task.num_examples)
    x = jax.tree_util.tree_map(lambda a: a[:take], task.inputs)
    out = jax.eval_shape(task.apply_fn, task.params, x)
    targets = task.targets
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 2 or out.shape[1] < 2:
        raise ValueError(
            "`trak` needs a classifier: `apply_fn` must return logits of shape (B, K) with K >= 2, got "
            f"{jax.tree_util.tree_map(lambda s: s.shape, out)}."
        )
    if not isinstance(targets, jax.Array) or targets.ndim != 1 or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(
            "`trak` needs integer class labels of shape (N,) as targets (the margin log p_y - log(1 - p_y) is "
            f"defined for classification), got {getattr(targets, 'dtype', type(targets))} "
            f"{getattr(targets, 'shape', '')}."
        )
    k = out.shape[1]
    if int(targets.min()) < 0 or int(targets.max()) >= k:
        raise ValueError(f"`trak`: labels must lie in [0, {k}) for {k} logits; got range "
                         f"[{int(targets.min())}, {int(targets.max())}].")


def _common(task, eval_inputs, eval_targets, groups, batch_size):
    _checks.task(task)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    ev = _snapshots.eval_task(task, eval_inputs, eval_targets)
    return ev, _group_mask_t(groups, task.num_examples), batch_size


# -- Grad-Dot and TracIn ---------------------------------------------------------------------


def grad_dot(
    task: Task,
    eval_inputs,
    eval_targets,
    *,
    groups=None,
    batch_size: int | None = None,
) -> Float[Array, "e n"] | Float[Array, "e g"]:
    """Grad-Dot (gradient similarity): ``score(z, i) = g_z^T g_i`` at ``theta_0``.

    ``g_i`` is the gradient of ``loss_i`` and ``g_z`` that of the evaluation
    loss at z, both at ``task.params``. Positive means i helped z: one gradient
    step of size eta on i lowers z's loss by ``eta g_z^T g_i`` to first order,
    and ``(1/N) g_z^T g_i`` is the first-order loss change on removing i under
    identity curvature (paper eqs. 3 and 11 with ``H~ = I``). For a set V of
    evaluation examples with the mean loss, average the rows.

    Args:
        task: the model snapshot and training data.
        eval_inputs: ``(E, ...)`` evaluation inputs, shaped like the training inputs.
        eval_targets: ``(E, ...)`` evaluation targets.
        groups: None for per-example scores, or groups of training examples (a
            boolean mask (G, N) or a list of index arrays; non-empty, in range,
            no duplicates) whose member scores are summed.
        batch_size: training examples per streamed chunk (None: chosen for a memory budget, see :func:`cif_jax.core.chunks.budget_batch_size`).

    Returns:
        ``(E, N)`` scores, or ``(E, G)`` group scores, in the params' dtype.

    Raises:
        ValueError: on mismatched shapes, bad groups, or NaN/Inf gradients.

    References:
        Charpiat et al., NeurIPS 2019; Pruthi et al., NeurIPS 2020 (section 3).
    """
    ev, mask_t, batch_size = _common(task, eval_inputs, eval_targets, groups, batch_size)
    g_eval = _eval_grads(ev, batch_size)
    scores, bad = _dot_pass(task, g_eval, mask_t, batch_size)
    raise_on_bad(bad)
    return scores


def tracin(
    task: Task,
    eval_inputs,
    eval_targets,
    *,
    checkpoints,
    learning_rates,
    groups=None,
    batch_size: int | None = None,
) -> Float[Array, "e n"] | Float[Array, "e g"]:
    """TracIn-CP: ``score(z, i) = sum_k eta_k g_z(theta_k)^T g_i(theta_k)``.

    The checkpoint approximation of the loss decrease on z caused by the SGD
    steps taken on i (Pruthi et al. 2020, eq. (3)): positive means i helped z
    (removing it is predicted to raise z's loss), as everywhere in the library.

    Args:
        task: the model, loss and training data (its ``params`` are not used
            unless passed as a checkpoint).
        eval_inputs: ``(E, ...)`` evaluation inputs.
        eval_targets: ``(E, ...)`` evaluation targets.
        checkpoints: K >= 1 parameter pytrees shaped like ``task.params`` (or
            Tasks, of which only ``params`` is used).
        learning_rates: K learning rates ``eta_k > 0`` (a single number is used
            for every checkpoint), e.g. the rate in effect over the steps each
            checkpoint stands for.
        groups: None for per-example scores, or groups whose member scores are summed.
        batch_size: training examples per streamed chunk.

    Returns:
        ``(E, N)`` scores, or ``(E, G)`` group scores.

    Raises:
        ValueError: on mismatched shapes, bad groups, an empty checkpoint list,
            non-positive or non-finite learning rates, NaN/Inf gradients.

    References:
        Pruthi, Liu, Kale and Sundararajan, NeurIPS 2020. https://arxiv.org/abs/2002.08484
    """
    ev, mask_t, batch_size = _common(task, eval_inputs, eval_targets, groups, batch_size)
    if checkpoints is None:
        raise ValueError("`tracin` needs `checkpoints` (a list of parameter pytrees); for one, pass [task.params].")
    params = _snapshots.check_checkpoints(task, checkpoints)
    lrs = _snapshots.check_positive_floats(learning_rates, "learning_rates", len(params))
    total = None
    for theta, lr in zip(params, lrs):
        t_k = _snapshots.with_params(task, theta)
        g_eval = _eval_grads(_snapshots.with_params(ev, theta), batch_size)
        scores, bad = _dot_pass(t_k, g_eval, mask_t, batch_size)
        raise_on_bad(bad)
        scores = jnp.asarray(lr, scores.dtype) * scores
        total = scores if total is None else total + scores
    return total


# -- TRAK ------------------------------------------------------------------------------------


def _margin_task(task: Task) -> Task:
    return Task(task.apply_fn, trak_margin, task.params, task.inputs, task.targets)


def trak(
    task: Task,
    eval_inputs,
    eval_targets,
    *,
    sketch_dim: int | None,
    key: PRNGKeyArray | None = None,
    checkpoints=None,
    ridge: float = 0.0,
    groups=None,
    batch_size: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Float[Array, "e n"] | Float[Array, "e g"]:
    """TRAK scores (Park et al. 2023, Algorithm 1, without the final soft-thresholding).

    For each checkpoint k, with the margin ``f(z; theta) = log p_y - log(1 - p_y)``
    (:func:`trak_margin`) and a JL projection ``Pi_k`` (eq. (5),
    :func:`cif_jax.jl_projection`, streamed by :func:`cif_jax.cif.sketch`):

    $$
    \\phi_k(z) = \\Pi_k \\nabla_\\theta f(z; \\theta_k), \\qquad
    \\Phi_k = [\\phi_k(x_1), \\dots, \\phi_k(x_N)]^\\top \\in \\mathbb{R}^{N \\times d},

    Q_k = \\mathrm{diag}(1 - p_{y_i}(\\theta_k)), \\qquad
    \\tau(z)_i = \\bar Q_{ii} \\cdot \\frac{1}{K} \\sum_k
    \\phi_k(z)^\\top (\\Phi_k^\\top \\Phi_k + \\rho I)^{-1} \\phi_k(x_i),
    $$

    with ``Q_bar = (1/K) sum_k Q_k`` (the ensemble averages the out-to-loss
    weights and the kernel terms separately, as Algorithm 1 does) and ridge
    ``rho``. As in Algorithm 1 each checkpoint draws its own projection:
    ``Pi_k = jl_projection(jax.random.fold_in(key, k), d, p)``. ``tau(z)_i``
    estimates the decrease of z's margin when i is removed, i.e. **positive
    means i helped z** (the library's sign); its scale is that of the margin, not
    of the loss. ``task.loss_fn`` is not used: TRAK assumes softmax cross-entropy
    classification (``1 - p_y`` is minus the cross-entropy's derivative in the margin).

    Args:
        task: the model, training data and (unless ``checkpoints`` is given) the snapshot.
        eval_inputs: ``(E, ...)`` evaluation inputs.
        eval_targets: ``(E,)`` integer labels of the evaluation examples.
        sketch_dim: ``d``, the JL dimension; None uses the identity projection
            (raw p-dimensional gradients; small models only).
        key: PRNG key of the projections (required when ``sketch_dim`` is set);
            checkpoint k uses ``jax.random.fold_in(key, k)``.
        checkpoints: None (use ``task.params``) or a list of parameter pytrees
            (or Tasks) for the ensemble.
        ridge: ``rho >= 0`` added to the kernel's diagonal, in projected units
            (our ``Pi`` has entries of variance ``1/d``). Needed when
            ``Phi^T Phi`` is singular, e.g. softmax models with ``d >= N`` or the
            identity projection of an over-parametrised softmax.
        groups: None for per-example scores, or groups whose member scores are summed.
        batch_size: examples per streamed chunk.
        block_size: column block of the JL projection (part of its definition).

    Returns:
        ``(E, N)`` scores, or ``(E, G)`` group scores.

    Raises:
        ValueError: on mismatched shapes, non-classifier tasks or labels out of
            range, bad groups, a negative ridge, a missing key, NaN/Inf
            gradients, or a kernel too ill-conditioned to invert (raise ``ridge``).

    References:
        Park, Georgiev, Ilyas, Leclerc and Madry, "TRAK: attributing model
        behavior at scale", ICML 2023, Algorithm 1. https://arxiv.org/abs/2303.14186
    """
    ev, mask_t, batch_size = _common(task, eval_inputs, eval_targets, groups, batch_size)
    _check_classifier(task)
    _check_classifier(ev)
    ridge = _checks.nonnegative_float(ridge, "ridge")
    block_size = as_int(block_size, "block_size", minimum=1)
    if sketch_dim is not None:
        sketch_dim = as_int(sketch_dim, "sketch_dim", minimum=1)
        if key is None:
            raise ValueError("`trak` needs `key` (jax.random.key(seed)) to draw the JL projection.")
        key = as_key(key)
    params = _snapshots.check_checkpoints(task, checkpoints)

    # Q_bar: the out-to-loss weights 1 - p_y = sigmoid(-f), averaged over checkpoints.
    q_bar = 0
    for theta in params:
        margins = _margin_pass(_snapshots.with_params(task, theta), batch_size)
        q_bar = q_bar + jax.nn.sigmoid(-margins)
    q_bar = q_bar / len(params)
    _checks.finite_rows(q_bar[:, None], "TRAK out-to-loss weights")

    total = None
    for k, theta in enumerate(params):
        key_k = None if key is None else jax.random.fold_in(key, k)
        feats, bad = _feature_pass(_margin_task(_snapshots.with_params(task, theta)), key_k, sketch_dim, block_size,
                                   batch_size)
        raise_on_bad(bad)
        eval_feats, bad_eval = _feature_pass(_margin_task(_snapshots.with_params(ev, theta)), key_k, sketch_dim,
                                             block_size, batch_size)
        _raise_bad_eval(bad_eval)
        scores, evals = _kernel_scores(feats, eval_feats, q_bar.astype(feats.dtype), mask_t, ridge)
        low, top = float(evals[0]), float(evals[-1])
        if not low > feats.shape[1] * float(jnp.finfo(feats.dtype).eps) * max(top, 0.0):
            raise ValueError(
                f"TRAK kernel Phi^T Phi + ridge I of checkpoint {k} is singular or too ill-conditioned to invert "
                f"(eigenvalues {low:.3g} .. {top:.3g}, ridge = {ridge}); set `ridge` > 0 (e.g. 1e-3 * the largest "
                "eigenvalue) or use a smaller `sketch_dim`."
            )
        total = scores if total is None else total + scores
    return total / len(params)
