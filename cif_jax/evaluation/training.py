"""The SGD training protocol of the CiF paper: a training loop and evaluation for flax.nnx classifiers.

Used by exact retraining (:func:`cif_jax.retrain`) and by the workloads behind the CLI
(:mod:`cif_jax.workloads.training` adds the per-dataset settings and checkpoints).

The protocol follows section 4.1 of the CiF paper, which follows Bae et al.
(2022): SGD with momentum 0.9, weight decay 5e-4, batch size 128; a constant
learning rate for MNIST-like data and, for CIFAR-10, a step decay by a factor
5 at 30%, 60% and 80% of training (epochs 60/120/160 of 200 in the paper).

Weight decay is coupled, as in PyTorch's ``SGD(weight_decay=...)`` which Bae
et al. used: ``optax.add_decayed_weights(wd)`` adds ``wd * theta`` to the
gradient before the momentum, which is plain SGD on

$$
\\frac{1}{|B|} \\sum_{i \\in B} \\ell_i(\\theta) + \\frac{wd}{2} \\|\\theta\\|^2 .
$$

(The paper writes the penalty as $\\lambda_{wd} \\|\\theta\\|^2$; with
that convention $\\lambda_{wd} = wd / 2$.) It applies to every
parameter, biases and GroupNorm scales included, as PyTorch does by default.

References:
  Bae, Ng, Lo, Ghassemi and Grosse, "If influence functions are the answer,
  then what is the question?", NeurIPS 2022. https://arxiv.org/abs/2209.05364
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = ["History", "check_xy", "evaluate", "learning_rates", "make_optimizer", "train"]

_SCHEDULES = ("constant", "step")
# Step decay of the CIFAR-10 protocol: divide the learning rate by 5 at these
# fractions of the total number of steps (epochs 60/120/160 of 200).
_STEP_BOUNDARIES = (0.3, 0.6, 0.8)
_STEP_FACTOR = 0.2


class History(NamedTuple):
    """Per-epoch training curves.

    Attributes:
      loss: ``(epochs,)`` mean cross-entropy over the epoch's examples (each
        mini-batch weighted by its size; the weight-decay term is excluded).
      accuracy: ``(epochs,)`` training accuracy over the same mini-batches,
        measured on the fly (each batch before its update).
    """

    loss: np.ndarray
    accuracy: np.ndarray


def learning_rates(learning_rate: float, *, total_steps: int, schedule: str = "constant") -> np.ndarray:
    """The learning rate of each of `total_steps` updates, as a float64 array.

    ``"constant"``: `learning_rate` throughout. ``"step"``: divided by 5 from
    step ``round(f * total_steps)`` on, for ``f`` in 0.3, 0.6 and 0.8 (epochs
    60/120/160 of 200 in the paper's CIFAR-10 protocol).

    Examples:
      >>> learning_rates(1.0, total_steps=10, schedule="step").round(6).tolist()
      [1.0, 1.0, 1.0, 0.2, 0.2, 0.2, 0.04, 0.04, 0.008, 0.008]
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"`schedule` must be one of {_SCHEDULES}, got {schedule!r}.")
    if not learning_rate > 0:
        raise ValueError(f"`learning_rate` must be positive, got {learning_rate}.")
    steps = np.arange(int(total_steps))
    lrs = np.full(steps.shape, float(learning_rate))
    if schedule == "step":
        for fraction in _STEP_BOUNDARIES:
            lrs[steps >= int(round(fraction * total_steps))] *= _STEP_FACTOR
    return lrs


def make_optimizer(*, momentum: float = 0.9, weight_decay: float = 5e-4) -> optax.GradientTransformation:
    """SGD's direction with momentum and coupled weight decay, before the learning rate.

    ``optax.chain(add_decayed_weights(wd), trace(momentum))``: the update
    direction of PyTorch's ``SGD(momentum=..., weight_decay=...)`` (no
    dampening, no Nesterov). `train` multiplies it by ``-learning_rate`` of
    the step, passed to the compiled step as a number so that changing the
    learning rate or the schedule does not recompile.
    """
    if weight_decay < 0 or not 0 <= momentum < 1:
        raise ValueError(f"Need weight_decay >= 0 and 0 <= momentum < 1, got {weight_decay} and {momentum}.")
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    if momentum:
        parts.append(optax.trace(decay=momentum))
    return optax.chain(*parts) if parts else optax.identity()


def check_xy(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    if y.ndim != 1 or x.ndim < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"Need x of shape (N, ...) and y of shape (N,), got {x.shape} and {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"`y` must hold integer class labels, got dtype {y.dtype}.")
    if y.shape[0] == 0:
        raise ValueError("Empty dataset: x and y have no examples.")
    return x, y


def _masked_sums(logits: jax.Array, y: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sums of cross-entropy and of correct predictions, each example weighted by w."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, axis=-1) == y).astype(losses.dtype)
    w = w.astype(losses.dtype)
    return jnp.sum(w * losses), jnp.sum(w * correct)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 4))
def _train_step(graphdef, settings, params, rest, opt_state, xb, yb, wb, lr):
    """One SGD step; compiled once per (model structure, settings, batch shape)."""
    momentum, weight_decay = settings
    tx = make_optimizer(momentum=momentum, weight_decay=weight_decay)

    def loss_fn(p):
        loss_sum, correct = _masked_sums(nnx.merge(graphdef, p, rest)(xb), yb, wb)
        return loss_sum / jnp.sum(wb).astype(loss_sum.dtype), (loss_sum, correct)

    grads, (loss_sum, correct) = jax.grad(loss_fn, has_aux=True)(params)
    direction, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, d: p - (lr * d).astype(p.dtype), params, direction)
    return params, opt_state, loss_sum, correct


@functools.partial(jax.jit, static_argnums=0)
def _eval_chunk(graphdef, state, xb, yb, wb):
    return _masked_sums(nnx.merge(graphdef, state)(xb), yb, wb)


def train(
    model: nnx.Module,
    x: Any,
    y: Any,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "constant",
    seed: int = 0,
    progress: bool = True,
) -> tuple[nnx.Module, History]:
    """Trains `model` with mini-batch SGD on cross-entropy (paper section 4.1).

    Each epoch visits every example once, in an order drawn from
    ``numpy.random.default_rng(seed)``. When ``N`` is not a multiple of
    `batch_size` the last batch of each epoch is short; it is padded to
    `batch_size` with zero-weight examples, so that no example is dropped,
    its gradient is the mean over its real examples, and the step is compiled
    once. One jitted step does the forward pass, backward pass and update.

    Args:
      model: the network (only `nnx.Param` state is trained); it is updated
        in place and returned.
      x: ``(N, ...)`` inputs.
      y: ``(N,)`` integer labels.
      epochs: number of passes over the data.
      learning_rate: base learning rate.
      batch_size: mini-batch size.
      momentum: SGD momentum.
      weight_decay: coupled weight decay (see the module docstring).
      schedule: ``"constant"`` (MNIST) or ``"step"`` (CIFAR-10).
      seed: seed of the shuffling (the initialisation is the model's own).
      progress: show a tqdm progress bar.

    Returns:
      ``(model, history)`` with `History` per epoch.
    """
    x, y = check_xy(x, y)
    epochs, batch_size = int(epochs), int(batch_size)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"`epochs` and `batch_size` must be positive, got {epochs} and {batch_size}.")
    n = x.shape[0]
    steps_per_epoch = -(-n // batch_size)
    lrs = learning_rates(learning_rate, total_steps=epochs * steps_per_epoch, schedule=schedule)
    settings = (float(momentum), float(weight_decay))
    tx = make_optimizer(momentum=settings[0], weight_decay=settings[1])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Copies, so that donating them to the step never invalidates the model's arrays.
    params = jax.tree.map(jnp.array, params)
    opt_state = tx.init(params)

    rng = np.random.default_rng(seed)
    weights = np.ones(steps_per_epoch * batch_size, dtype=np.float32)
    weights[n:] = 0.0
    weights = weights.reshape(steps_per_epoch, batch_size)
    hist_loss, hist_acc = [], []
    bar = _progress_bar(len(lrs), progress)
    try:
        for epoch in range(epochs):
            order = np.empty(steps_per_epoch * batch_size, dtype=np.int64)
            order[:n] = rng.permutation(n)
            # Padding (weight 0): the epoch's own indices repeated, which stay in range even when the
            # padding is longer than N (N < batch_size / 2).
            order[n:] = np.resize(order[:n], order.size - n)
            order = order.reshape(steps_per_epoch, batch_size)
            loss_total = jnp.zeros(())
            correct_total = jnp.zeros(())
            for s in range(steps_per_epoch):
                batch = order[s]
                params, opt_state, loss_sum, correct = _train_step(
                    graphdef, settings, params, rest, opt_state, x[batch], y[batch], weights[s],
                    lrs[epoch * steps_per_epoch + s],
                )
                loss_total = loss_total + loss_sum
                correct_total = correct_total + correct
                bar.update(1)
            hist_loss.append(float(loss_total) / n)
            hist_acc.append(float(correct_total) / n)
            bar.set_postfix(epoch=epoch + 1, loss=f"{hist_loss[-1]:.4f}", acc=f"{hist_acc[-1]:.3f}")
    finally:
        bar.close()
    nnx.update(model, params)
    return model, History(np.asarray(hist_loss), np.asarray(hist_acc))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step")


def evaluate(model: nnx.Module, x: Any, y: Any, *, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on ``(x, y)``.

    The data is processed in chunks of `batch_size`; the last, usually short,
    chunk is padded with zero-weight examples, so the result is the exact mean
    over all ``N`` examples (chunk means weighted by chunk size).

    Returns:
      ``(mean loss, accuracy)`` as Python floats.
    """
    x, y = check_xy(x, y)
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    n = x.shape[0]
    batch_size = min(batch_size, n)
    graphdef, state = nnx.split(model)
    loss_total, correct_total = 0.0, 0.0
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        m = xb.shape[0]
        wb = np.zeros(batch_size, dtype=np.float32)
        wb[:m] = 1.0
        if m < batch_size:
            pad = batch_size - m
            xb = np.concatenate([xb, np.repeat(xb[:1], pad, axis=0)])
            yb = np.concatenate([yb, np.repeat(yb[:1], pad, axis=0)])
        loss_sum, correct = _eval_chunk(graphdef, state, xb, yb, wb)
        loss_total += float(loss_sum)
        correct_total += float(correct)
    return loss_total / n, correct_total / n


