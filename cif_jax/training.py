"""Training, evaluation and checkpoints for the CiF experiments.

The protocol follows section 4.1 of the CiF paper, which follows Bae et al.
(2022): SGD with momentum 0.9, weight decay 5e-4, batch size 128; a constant
learning rate for MNIST-like data and, for CIFAR-10, a step decay by a factor
5 at 30%, 60% and 80% of training (epochs 60/120/160 of 200 in the paper).

Weight decay is coupled, as in PyTorch's ``SGD(weight_decay=...)`` which Bae
et al. used: ``optax.add_decayed_weights(wd)`` adds ``wd * theta`` to the
gradient before the momentum, which is plain SGD on

.. math::

   \\frac{1}{|B|} \\sum_{i \\in B} \\ell_i(\\theta) + \\frac{wd}{2} \\|\\theta\\|^2 .

(The paper writes the penalty as :math:`\\lambda_{wd} \\|\\theta\\|^2`; with
that convention :math:`\\lambda_{wd} = wd / 2`.) It applies to every
parameter, biases and GroupNorm scales included, as PyTorch does by default.

References:
  Bae, Ng, Lo, Ghassemi and Grosse, "If influence functions are the answer,
  then what is the question?", NeurIPS 2022. https://arxiv.org/abs/2209.05364
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, serialization

from cif_jax.models import build_from_config, model_config

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "History",
    "evaluate",
    "load_checkpoint",
    "make_optimizer",
    "read_checkpoint",
    "save_checkpoint",
    "train",
]

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


def make_optimizer(
    *,
    learning_rate: float,
    total_steps: int,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "constant",
) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay, constant or step schedule.

    Args:
      learning_rate: base learning rate.
      total_steps: number of updates, for the ``"step"`` boundaries.
      momentum: heavy-ball momentum (PyTorch convention, no dampening).
      weight_decay: coefficient ``wd`` of ``wd * theta`` added to the gradient.
      schedule: ``"constant"`` or ``"step"`` (divide by 5 at 30/60/80% of
        `total_steps`).

    Returns:
      ``optax.chain(add_decayed_weights(wd), sgd(schedule, momentum))``.
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"`schedule` must be one of {_SCHEDULES}, got {schedule!r}.")
    if learning_rate <= 0:
        raise ValueError(f"`learning_rate` must be positive, got {learning_rate}.")
    if weight_decay < 0 or not 0 <= momentum < 1:
        raise ValueError(f"Need weight_decay >= 0 and 0 <= momentum < 1, got {weight_decay}, {momentum}.")
    if schedule == "step":
        boundaries = {max(1, int(round(f * total_steps))): _STEP_FACTOR for f in _STEP_BOUNDARIES}
        lr: Any = optax.piecewise_constant_schedule(learning_rate, boundaries)
    else:
        lr = learning_rate
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(lr, momentum=momentum or None))
    return optax.chain(*parts)


def _check_xy(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
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
    x, y = _check_xy(x, y)
    epochs, batch_size = int(epochs), int(batch_size)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"`epochs` and `batch_size` must be positive, got {epochs} and {batch_size}.")
    n = x.shape[0]
    steps_per_epoch = -(-n // batch_size)
    total_steps = epochs * steps_per_epoch
    tx = make_optimizer(
        learning_rate=learning_rate,
        total_steps=total_steps,
        momentum=momentum,
        weight_decay=weight_decay,
        schedule=schedule,
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    x_dev, y_dev = jnp.asarray(x), jnp.asarray(y)

    def loss_fn(p, xb, yb, wb):
        loss_sum, correct = _masked_sums(nnx.merge(graphdef, p, rest)(xb), yb, wb)
        return loss_sum / jnp.sum(wb).astype(loss_sum.dtype), (loss_sum, correct)

    @jax.jit
    def step(p, o, xs, ys, idx, wb):
        # The data are arguments, not closed-over constants baked into the program.
        xb, yb = xs[idx], ys[idx]
        grads, (loss_sum, correct) = jax.grad(loss_fn, has_aux=True)(p, xb, yb, wb)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss_sum, correct

    rng = np.random.default_rng(seed)
    weights = np.ones(steps_per_epoch * batch_size, dtype=np.float32)
    weights[n:] = 0.0
    weights = weights.reshape(steps_per_epoch, batch_size)
    hist_loss, hist_acc = [], []
    bar = _progress_bar(total_steps, progress)
    try:
        for epoch in range(epochs):
            order = np.empty(steps_per_epoch * batch_size, dtype=np.int32)
            order[:n] = rng.permutation(n)
            order[n:] = order[: order.size - n]  # padding, weight 0
            order = order.reshape(steps_per_epoch, batch_size)
            loss_total = jnp.zeros(())
            correct_total = jnp.zeros(())
            for s in range(steps_per_epoch):
                params, opt_state, loss_sum, correct = step(params, opt_state, x_dev, y_dev, order[s], weights[s])
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
    x, y = _check_xy(x, y)
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    n = x.shape[0]
    batch_size = min(batch_size, n)
    graphdef, state = nnx.split(model)

    @jax.jit
    def chunk(st, xb, yb, wb):
        return _masked_sums(nnx.merge(graphdef, st)(xb), yb, wb)

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
        loss_sum, correct = chunk(state, xb, yb, wb)
        loss_total += float(loss_sum)
        correct_total += float(correct)
    return loss_total / n, correct_total / n


# --------------------------------------------------------------------------
# Checkpoints.
# --------------------------------------------------------------------------

CHECKPOINT_FORMAT = "cif_jax.checkpoint"
CHECKPOINT_VERSION = 1


def _key(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _flat_state(model: nnx.Module) -> dict[str, Any]:
    """The model's whole state as ``{"conv1/kernel": array, ...}`` (NumPy).

    For an abstract model (`nnx.eval_shape`) the values are
    `jax.ShapeDtypeStruct`s.
    """
    pure = nnx.to_pure_dict(nnx.state(model))
    leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
    return {
        _key(path): leaf if isinstance(leaf, jax.ShapeDtypeStruct) else np.asarray(leaf)
        for path, leaf in leaves
    }


def _normalise_config(config: Any) -> dict[str, Any]:
    if not isinstance(config, dict) or "name" not in config:
        raise TypeError(f"`config` must be a dict made by `cif_jax.models.model_config`, got {config!r}.")
    opts = {k: v for k, v in config.items() if k not in ("name", "in_shape", "num_classes")}
    return model_config(config["name"], in_shape=config["in_shape"], num_classes=config["num_classes"], **opts)


def save_checkpoint(
    path: str | os.PathLike,
    model: nnx.Module,
    *,
    config: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> None:
    """Writes the model's state, its config and metadata to `path`, atomically.

    The file is a msgpack map (`flax.serialization.msgpack_serialize`)::

        {"format": "cif_jax.checkpoint", "version": 1, "config": {...},
         "metadata": {...}, "state": {"conv1/kernel": array, ...}}

    It is written to a temporary file in the same directory and moved into
    place with `os.replace`, so `path` holds either the old file or the whole
    new one, never a partial write.

    Args:
      path: destination file.
      model: the model; its state must match `config`.
      config: the `cif_jax.models.model_config` dict the model was built from.
      metadata: optional msgpack-serialisable dict (numbers, strings, lists,
        dicts, NumPy arrays), e.g. training settings and accuracy.
    """
    cfg = _normalise_config(config)
    expected = nnx.eval_shape(lambda: build_from_config(cfg, seed=0))
    _check_state_matches(_flat_state(model), _flat_state(expected), where="the model passed to save_checkpoint")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": cfg,
        "metadata": {} if metadata is None else dict(metadata),
        "state": _flat_state(model),
    }
    data = serialization.msgpack_serialize(payload)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_state_matches(state: dict[str, Any], expected: dict[str, Any], *, where: str) -> None:
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"The state of {where} does not match the config: missing {missing}, unexpected {extra}.")
    for key, ref in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(ref.shape) or np.dtype(got.dtype) != np.dtype(ref.dtype):
            raise ValueError(
                f"The state of {where} does not match the config at {key!r}: "
                f"{got.dtype}{tuple(got.shape)} instead of {np.dtype(ref.dtype)}{tuple(ref.shape)}."
            )


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint file: a dict with format, version, config, metadata, state."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        payload = serialization.msgpack_restore(data)
    except Exception as err:
        raise ValueError(f"{os.fspath(path)!r} is not a cif_jax checkpoint (msgpack decoding failed: {err}).") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a cif_jax checkpoint (no {CHECKPOINT_FORMAT!r} header).")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} is a version {payload.get('version')} checkpoint; this cif_jax reads "
            f"version {CHECKPOINT_VERSION}."
        )
    return payload


def load_checkpoint(path: str | os.PathLike, *, config: dict[str, Any]) -> nnx.Module:
    """Rebuilds the model saved at `path`, refusing a different config.

    Args:
      path: a file written by `save_checkpoint`.
      config: the `cif_jax.models.model_config` dict the caller expects.

    Returns:
      The model, with the saved parameters.

    Raises:
      ValueError: the file is not a checkpoint of this version, or its config
        differs from `config` (the message lists the differing keys).
    """
    cfg = _normalise_config(config)
    payload = read_checkpoint(path)
    saved = payload["config"]
    if saved != cfg:
        keys = sorted(set(saved) | set(cfg))
        diffs = [f"{k}: saved {saved.get(k)!r}, requested {cfg.get(k)!r}" for k in keys if saved.get(k) != cfg.get(k)]
        raise ValueError(f"Checkpoint {os.fspath(path)!r} was saved with a different model config; " + "; ".join(diffs))
    model = build_from_config(cfg, seed=0)
    saved_state = {k: np.asarray(v) for k, v in payload["state"].items()}
    _check_state_matches(saved_state, _flat_state(model), where=f"checkpoint {os.fspath(path)!r}")
    state = nnx.state(model)
    restored = jax.tree_util.tree_map_with_path(
        lambda p, _: jnp.asarray(saved_state[_key(p)]), nnx.to_pure_dict(state)
    )
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model
