"""Linear datamodeling score (LDS): how well summed attributions predict retrained models.

Following TRAK (Park et al. 2023, section 2.2), M random training subsets
``S_1 .. S_M`` (typically half the data each) are drawn, a model is trained on
each (averaged over several seeds), and its loss on every test example z is
recorded. An attribution method predicts the outcome of training on S by the
sum of its scores over S. The LDS of z is the Spearman rank correlation, across
the M subsets, between prediction and outcome; the LDS of the method is its
mean over test examples.

Sign: scores follow the library's convention (positive = helpful, see the
README), so a subset holding more helpful examples should give a *lower* test
loss. The prediction compared with the loss is therefore
``-sum_{i in S} score(z, i)``: with it, a perfect method scores +1 and a
method with the opposite sign -1. (TRAK correlates ``+sum`` with the model
output, which rises as the loss falls; the two agree.)

References:
    Park, Georgiev, Ilyas, Leclerc and Madry, "TRAK: attributing model behavior
    at scale", ICML 2023, section 2.2 (eq. 4). https://arxiv.org/abs/2303.14186

    Ilyas, Park, Engstrom, Leclerc and Madry, "Datamodels: predicting
    predictions from training data", ICML 2022.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree
from scipy.stats import rankdata

from ..core import checks as _checks
from ..core import snapshots as _snapshots
from ..core.checks import as_key
from ..core.task import Task
from .retrain import evaluate_many, train_many

__all__ = ["DatamodelLDSResult", "LDSResult", "datamodel_lds", "lds", "random_subsets", "subset_losses"]


class LDSResult(NamedTuple):
    """The linear datamodeling score.

    Attributes:
        score: mean over test examples of the per-example Spearman correlations
            (examples where it is undefined are left out, with a warning).
        per_example: ``(num_test,)`` Spearman correlation of each test example
            across the M subsets (NaN where the losses or the predictions are constant).
    """

    score: float
    per_example: np.ndarray


class DatamodelLDSResult(NamedTuple):
    """The per-example LDS against a linear datamodel (STRIDE's appendix C.1).

    Attributes:
        score: mean over test examples of the Spearman correlation, across the N
            training examples, between the attributions and ``datamodel``.
        per_example: ``(num_test,)`` those correlations (NaN where undefined).
        datamodel: ``(num_test, N)`` the linearised influence estimated from the
            retrained subsets, in the library's sign (positive = training on the
            example lowers the test loss).
        split_half: mean over test examples of the Spearman correlation between
            the datamodels estimated from two disjoint halves of the M subsets:
            how reproducible the reference itself is.
        ceiling: ``sqrt(2 r / (1 + r))`` with ``r = split_half`` (Spearman-Brown;
            0 when ``r <= 0``): about the expected ``score`` of a perfect
            attribution (the noise-free datamodel) against this M-subset
            estimate. Not a strict bound: a method can exceed it by chance, and
            as it is taken at the mean reliability it is slightly optimistic
            when reliability varies across test examples.
    """

    score: float
    per_example: np.ndarray
    datamodel: np.ndarray
    split_half: float
    ceiling: float


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis, row by row (NaN where a row is constant)."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=-1) / np.where(den > 0, den, 1), np.nan)


def random_subsets(key: PRNGKeyArray, num_subsets: int, num_examples: int, *,
                   fraction: float = 0.5) -> np.ndarray:
    """M random training subsets of exactly ``round(fraction * N)`` examples each.

    Subset m keeps the ``round(fraction * N)`` examples with the smallest of N
    uniform draws (a uniformly random subset of that size). The draws come from
    ``numpy.random.default_rng`` seeded with the key's data (host-side: nothing to
    compile), so the result is a pure function of ``(key, M, N, fraction)``.

    Args:
        key: a PRNG key.
        num_subsets: M >= 1.
        num_examples: N >= 2.
        fraction: share of the examples kept, in (0, 1); TRAK's LDS uses 0.5.

    Returns:
        ``(M, N)`` boolean mask of the examples in each subset (kept, i.e. trained on).
    """
    key = as_key(key)
    num_subsets = _checks.positive_int(num_subsets, "num_subsets")
    num_examples = _checks.positive_int(num_examples, "num_examples")
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise TypeError(f"`fraction` must be a number in (0, 1), got {fraction!r}.") from None
    size = int(round(fraction * num_examples)) if np.isfinite(fraction) else 0
    if not 0.0 < fraction < 1.0 or not 1 <= size <= num_examples - 1:
        raise ValueError(
            f"`fraction` must lie in (0, 1) and keep between 1 and N - 1 = {num_examples - 1} examples; got "
            f"fraction={fraction} (round(fraction * N) = {size})."
        )
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    draws = rng.random((num_subsets, num_examples))
    mask = np.zeros((num_subsets, num_examples), bool)
    np.put_along_axis(mask, np.argsort(draws, axis=1, kind="stable")[:, :size], True, axis=1)
    return mask


def subset_losses(
    task: Task,
    keep,
    eval_inputs,
    eval_targets,
    *,
    num_steps: int,
    learning_rate: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    normalization: str = "kept",
    init_params: PyTree | None = None,
    stacked_init: bool = False,
    model_batch_size: int | None = None,
    eval_batch_size: int | None = None,
) -> Float[Array, "m e"]:
    """Test losses of models retrained on each subset, averaged over seeds: the LDS targets.

    Trains ``M x S`` small models in one vmapped program (:func:`cif_jax.train_many`:
    full-batch gradient descent with ``train``'s optimiser), model ``(m, s)`` on
    subset m from initialisation s, and returns the per-example evaluation losses
    (:func:`cif_jax.evaluate_many`) averaged over the S seeds.

    Args:
        task: model, per-example loss and the full training set.
        keep: ``(M, N)`` boolean masks of the training subsets (e.g. :func:`random_subsets`).
        eval_inputs: ``(E, ...)`` test inputs.
        eval_targets: ``(E, ...)`` test targets.
        num_steps, learning_rate, momentum, weight_decay, normalization: as
            :func:`cif_jax.train_many`.
        init_params: the initialisation (default ``task.params``); with
            ``stacked_init=True``, S initialisations stacked on a leading axis
            (e.g. ``jax.vmap(init_fn)(jax.random.split(key, S))``), one per seed.
        stacked_init: whether ``init_params`` holds S seeds on a leading axis.
        model_batch_size: models trained together per vmapped batch (None: all ``M x S``).
        eval_batch_size: test examples per chunk of the evaluation.

    Returns:
        ``(M, E)`` losses, averaged over seeds.

    Raises:
        ValueError: on bad masks, settings or initialisations, before training.
    """
    _checks.task(task)
    keep = _snapshots.check_keep_masks(keep, task.num_examples)
    _snapshots.eval_task(task, eval_inputs, eval_targets)
    m = keep.shape[0]
    if init_params is None:
        init_params = task.params
    if stacked_init:
        num_seeds = _snapshots.check_stacked(init_params, task.params, "init_params")
        # Model (m, s) is row m * S + s: subset masks repeated, initialisations tiled.
        inits = jax.tree_util.tree_map(lambda a: jnp.tile(jnp.asarray(a), (m,) + (1,) * (np.ndim(a) - 1)),
                                       init_params)
    else:
        num_seeds, inits = 1, init_params
    models = train_many(
        task, np.repeat(keep, num_seeds, axis=0), num_steps=num_steps, learning_rate=learning_rate,
        momentum=momentum, weight_decay=weight_decay, normalization=normalization, init_params=inits,
        stacked_init=stacked_init, model_batch_size=model_batch_size,
    )
    losses = evaluate_many(task, models.params, eval_inputs, eval_targets, batch_size=eval_batch_size)
    return losses.reshape(m, num_seeds, losses.shape[1]).mean(axis=1)


def _check_keep_losses(keep, losses, fewest: int, why: str):
    """``keep`` as a boolean (M, N) mask of at least ``fewest`` subsets and ``losses`` as finite (M, num_test)
    float64, with clear errors."""
    keep = np.asarray(keep)
    if keep.dtype != bool or keep.ndim != 2:
        raise ValueError(f"`keep` must be a boolean (M, N) mask of training subsets, got {keep.dtype} {keep.shape}.")
    m = keep.shape[0]
    if m < fewest:
        raise ValueError(f"`keep` holds {m} subset(s); {why}.")
    losses = np.asarray(losses, np.float64)
    if losses.ndim != 2 or losses.shape[0] != m:
        raise ValueError(f"`losses` must have shape (M, num_test) = ({m}, num_test), got {losses.shape}.")
    _checks.finite_rows(losses.T, "`losses`", what="test example")
    return keep, losses


def lds(attributions: Float[Array, "t n"] | Callable[[np.ndarray], np.ndarray], keep, losses) -> LDSResult:
    """Linear datamodeling score of attribution scores (Park et al. 2023, eq. 4).

    For test example z and subset ``S_m``, the prediction is
    ``-sum_{i in S_m} score(z, i)`` (scores are positive when helpful, so more
    helpful members predict a lower loss), and

    $$
    \\mathrm{LDS}(z) = \\rho_{\\mathrm{Spearman}}\\Big(
    \\big\\{-\\textstyle\\sum_{i \\in S_m} \\tau(z)_i\\big\\}_{m=1}^M,\\;
    \\big\\{\\ell(z; \\theta_{S_m})\\big\\}_{m=1}^M\\Big),
    $$

    averaged over z. Group methods whose subset prediction is not a sum of
    per-example scores (e.g. CiF's ``loss_delta`` on the complements) pass a
    function instead.

    Args:
        attributions: ``(num_test, N)`` per-example scores in the library's sign
            convention, or a function ``predict(keep) -> (M, num_test)`` returning
            predicted test losses (any quantity that rises with the loss, e.g.
            the predicted loss change of removing the complement of each subset).
        keep: ``(M, N)`` boolean masks of the training subsets, ``M >= 3``.
        losses: ``(M, num_test)`` test losses of the models trained on each
            subset (e.g. :func:`subset_losses`).

    Returns:
        :class:`LDSResult`.

    Raises:
        ValueError: on mismatched shapes, fewer than 3 subsets, or NaN/Inf scores,
            predictions or losses.
    """
    keep, losses = _check_keep_losses(keep, losses, 3, "a rank correlation needs at least 3")
    (m, n), num_test = keep.shape, losses.shape[1]
    if callable(attributions):
        predictions = np.asarray(attributions(keep), np.float64)
        if predictions.shape != (m, num_test):
            raise ValueError(f"`attributions(keep)` must return predictions of shape (M, num_test) = "
                             f"({m}, {num_test}), got {predictions.shape}.")
        _checks.finite_rows(predictions.T, "`attributions(keep)` predictions", what="test example")
    else:
        scores = np.asarray(attributions, np.float64)
        if scores.shape != (num_test, n):
            raise ValueError(f"`attributions` must have shape (num_test, N) = ({num_test}, {n}) to match `losses` "
                             f"and `keep`, got {scores.shape}.")
        _checks.finite_rows(scores, "`attributions`", what="test example")
        predictions = -(keep.astype(np.float64) @ scores.T)
    per_example = pearson_rows(rankdata(predictions, axis=0).T, rankdata(losses, axis=0).T)
    undefined = int(np.isnan(per_example).sum())
    if undefined == num_test:
        warnings.warn("LDS is undefined for every test example (constant losses or predictions).", stacklevel=2)
        return LDSResult(float("nan"), per_example)
    if undefined:
        warnings.warn(f"LDS is undefined for {undefined} of {num_test} test examples (constant losses or "
                      "predictions across subsets); they are left out of the mean.", stacklevel=2)
    return LDSResult(float(np.nanmean(per_example)), per_example)


def _datamodel(keep: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """(T, N) difference of mean losses without and with each example (library sign)."""
    inside = keep.astype(np.float64)
    counts_in = inside.sum(axis=0)
    counts_out = keep.shape[0] - counts_in
    mean_in = (inside.T @ losses) / counts_in[:, None]
    mean_out = ((1.0 - inside).T @ losses) / counts_out[:, None]
    return (mean_out - mean_in).T


def _row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return pearson_rows(rankdata(a, axis=1), rankdata(b, axis=1))


def datamodel_lds(attributions: Float[Array, "t n"], keep, losses, *,
                  key: PRNGKeyArray | None = None) -> DatamodelLDSResult:
    """Per-example LDS: rank agreement of attributions with a linear datamodel (STRIDE, app. C.1).

    :func:`lds` asks how well summed scores predict the losses of the M retrained
    subsets. STRIDE's metric instead compares the N per-example scores of a test
    example z with a per-example "linearised influence" ``LDS(z) in R^N`` by
    Spearman correlation across the training examples. This function estimates
    that reference from the same retrained subsets as :func:`lds`, by the
    difference-in-means datamodel (Ilyas et al. 2022)

    $$
    w_i(z) = \\overline{\\ell(z;\\theta_S)}_{\\,i \\notin S}
    - \\overline{\\ell(z;\\theta_S)}_{\\,i \\in S},
    $$

    which is unbiased for the coefficients of a linear datamodel
    ``l(z; theta_S) = b + sum_{i in S} beta_i`` when membership is random with
    probability 1/2 (``w_i = -beta_i``, up to O(1/N) from the fixed subset size
    of :func:`random_subsets`). Its noise shrinks as ``1/sqrt(M)`` and the
    per-example signal as ``1/sqrt(N)``, so with ``M << N`` the reference is
    noisy: ``split_half`` and ``ceiling`` report how noisy, so that a low score
    can be read against what any method could reach.

    Args:
        attributions: ``(num_test, N)`` per-example scores in the library's sign
            convention (positive = helpful).
        keep: ``(M, N)`` boolean masks of the training subsets (e.g.
            :func:`random_subsets`), ``M >= 4`` (even M splits into equal halves);
            every example must be in at least one subset and out of at least one
            in each half of the M rows.
        losses: ``(M, num_test)`` test losses of the models trained on each subset
            (e.g. :func:`subset_losses`, or any quantity that falls as the model
            gets better at the test example).
        key: PRNG key of the random split into halves for ``split_half`` (None:
            ``jax.random.key(0)``, so that the result is reproducible).

    Returns:
        :class:`DatamodelLDSResult`.

    Raises:
        ValueError: on mismatched shapes, fewer than 4 subsets, an example inside
            or outside every subset of a half, or NaN/Inf scores or losses.
    """
    keep, losses = _check_keep_losses(keep, losses, 4, "the datamodel and its split-half check need at least 4")
    (m, n), num_test = keep.shape, losses.shape[1]
    scores = np.asarray(attributions, np.float64)
    if scores.shape != (num_test, n):
        raise ValueError(f"`attributions` must have shape (num_test, N) = ({num_test}, {n}) to match `losses` "
                         f"and `keep`, got {scores.shape}.")
    _checks.finite_rows(scores, "`attributions`", what="test example")
    order = np.asarray(jax.random.permutation(jax.random.key(0) if key is None else as_key(key), m))
    halves = [np.sort(order[: m // 2]), np.sort(order[m // 2:])]
    for rows, what in [(np.arange(m), "the M subsets"), *[(h, f"half {j} of the subsets") for j, h in enumerate(halves)]]:
        counts = keep[rows].sum(axis=0)
        bad = np.flatnonzero((counts == 0) | (counts == rows.size))
        if bad.size:
            raise ValueError(f"training example(s) {bad[:5].tolist()} are inside every or no subset of {what}; "
                             "the datamodel needs each example both in and out. Draw more subsets "
                             "(e.g. `random_subsets` with M >= 40).")
    datamodel = _datamodel(keep, losses)
    per_example = _row_spearman(scores, datamodel)  # NaN for constant rows, counted below
    split = _row_spearman(_datamodel(keep[halves[0]], losses[halves[0]]),
                          _datamodel(keep[halves[1]], losses[halves[1]]))
    split_half = float(np.nanmean(split)) if np.isfinite(split).any() else float("nan")
    if not np.isfinite(split_half):
        ceiling = float("nan")
    else:
        ceiling = float(np.sqrt(2 * split_half / (1 + split_half))) if split_half > 0 else 0.0
    undefined = int(np.isnan(per_example).sum())
    if undefined == num_test:
        warnings.warn("The datamodel LDS is undefined for every test example (constant scores or losses).",
                      stacklevel=2)
        return DatamodelLDSResult(float("nan"), per_example, datamodel, split_half, ceiling)
    if undefined:
        warnings.warn(f"The datamodel LDS is undefined for {undefined} of {num_test} test examples (constant "
                      "scores or datamodel); they are left out of the mean.", stacklevel=2)
    return DatamodelLDSResult(float(np.nanmean(per_example)), per_example, datamodel, split_half, ceiling)
