"""The workloads' training: the main job's settings per dataset and model checkpoints.

The training loop itself (the paper's SGD protocol) is :mod:`cif_jax.evaluation.training`;
its names are importable from here too.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization

from cif_jax.evaluation.training import History, check_xy, evaluate, learning_rates, make_optimizer, train
from cif_jax.workloads.models import build_from_config, model_config

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "TRAINING",
    "History",
    "check_xy",
    "evaluate",
    "learning_rates",
    "load_checkpoint",
    "make_optimizer",
    "read_checkpoint",
    "save_checkpoint",
    "train",
]

#: The main job's training protocol per dataset: (epochs, learning rate, schedule), measured to
#: reach > 95% test accuracy on 2 CPU cores in seconds (digits) to a minute (mnist5k).
TRAINING = {"digits": (30, 0.05, "constant"), "mnist5k": (15, 0.05, "constant"),
            "mnist": (10, 0.05, "constant"), "cifar10": (60, 0.05, "step")}


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
        raise TypeError(f"`config` must be a dict made by `cif_jax.workloads.models.model_config`, got {config!r}.")
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
      config: the `cif_jax.workloads.models.model_config` dict the model was built from.
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
      config: the `cif_jax.workloads.models.model_config` dict the caller expects.

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
