"""Tests for the training protocol (cif_jax.evaluation.training) and the workloads' checkpoints (cif_jax.workloads.training)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cif_jax.workloads.models import build_from_config, model_config
from cif_jax.workloads.training import (
    History,
    evaluate,
    learning_rates,
    load_checkpoint,
    make_optimizer,
    read_checkpoint,
    save_checkpoint,
    train,
)


@pytest.fixture(scope="module")
def tiny():
    """300 digits-like examples: 8x8 blobs whose position encodes the class."""
    rng = np.random.default_rng(0)
    n, num_classes = 300, 4
    y = (np.arange(n) % num_classes).astype(np.int32)
    x = rng.random((n, 8, 8, 1), dtype=np.float32) * 0.3
    for c in range(num_classes):
        r, k = divmod(c, 2)
        x[y == c, 4 * r : 4 * r + 4, 4 * k : 4 * k + 4, 0] += 0.7
    return x, y, num_classes


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def _lenet_cfg(num_classes=4):
    return model_config("lenet5", in_shape=(8, 8, 1), num_classes=num_classes)


def test_loss_decreases_and_model_learns(tiny):
    x, y, k = tiny
    model = build_from_config(_lenet_cfg(k), seed=0)
    model, history = train(model, x, y, epochs=4, learning_rate=0.05, batch_size=32, progress=False)
    assert isinstance(history, History)
    assert history.loss.shape == (4,) and history.accuracy.shape == (4,)
    assert history.loss[-1] < 0.5 * history.loss[0]
    loss, acc = evaluate(model, x, y)
    assert acc > 0.9 and loss < history.loss[0]


def test_training_is_deterministic_given_seeds(tiny):
    x, y, k = tiny
    runs = []
    for shuffle_seed in (0, 0, 1):
        model = build_from_config(_lenet_cfg(k), seed=0)
        model, history = train(model, x, y, epochs=1, learning_rate=0.05, seed=shuffle_seed, progress=False)
        runs.append((_params(model), history))
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(runs[0][1].loss, runs[1][1].loss)
    assert any(not np.array_equal(a, c) for a, c in zip(runs[0][0], runs[2][0]))


def test_one_epoch_equals_hand_written_sgd_with_short_last_batch():
    """Logistic regression, float64: N=11 with batch 4 gives batches 4, 4, 3."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(11, 2, 2, 1))
    y = rng.integers(0, 3, 11).astype(np.int32)
    cfg = model_config("mlp", in_shape=(2, 2, 1), num_classes=3, hidden=[], param_dtype="float64")
    model = build_from_config(cfg, seed=0)
    w0 = np.asarray(model.out.kernel[...])
    b0 = np.asarray(model.out.bias[...])
    lr, momentum, wd, seed = 0.3, 0.9, 0.01, 5
    model, history = train(
        model, x, y, epochs=1, learning_rate=lr, batch_size=4, momentum=momentum, weight_decay=wd,
        seed=seed, progress=False,
    )

    def mean_loss(w, b, xb, yb):
        logits = xb.reshape(len(xb), -1) @ w + b[None, :]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

    grad_fn = jax.jit(jax.grad(mean_loss, argnums=(0, 1)))
    order = np.random.default_rng(seed).permutation(11)
    w, b = w0, b0
    tw, tb = np.zeros_like(w), np.zeros_like(b)
    losses = []
    for batch in (order[:4], order[4:8], order[8:]):
        losses.append(float(mean_loss(w, b, x[batch], y[batch])) * len(batch))
        gw, gb = grad_fn(w, b, x[batch], y[batch])
        tw = momentum * tw + np.asarray(gw) + wd * w  # PyTorch SGD: decay added before momentum
        tb = momentum * tb + np.asarray(gb) + wd * b
        w, b = w - lr * tw, b - lr * tb
    np.testing.assert_allclose(model.out.kernel[...], w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.out.bias[...], b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(history.loss[0], sum(losses) / 11, rtol=1e-12)


def test_fewer_examples_than_half_a_batch_is_one_full_batch_step(monkeypatch):
    """N = 3 with batch 16: one step on the mean over the 3 examples (the padding, 13 rows, has weight 0 and
    indexes real examples; it used to read uninitialised indices when the padding outgrew N). Uninitialised
    memory is made out of range here, so that the old padding fails every time."""
    from cif_jax.evaluation import training as tr

    real_empty = np.empty
    monkeypatch.setattr(tr.np, "empty", lambda shape, dtype=float, **kw: np.full(shape, -10**9, dtype=dtype)
                        if np.dtype(dtype) == np.int64 else real_empty(shape, dtype=dtype, **kw))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 2, 2, 1))
    y = np.array([0, 2, 1], np.int32)
    cfg = model_config("mlp", in_shape=(2, 2, 1), num_classes=3, hidden=[], param_dtype="float64")
    model = build_from_config(cfg, seed=0)
    w0, b0 = np.asarray(model.out.kernel[...]), np.asarray(model.out.bias[...])
    model, history = train(model, x, y, epochs=2, learning_rate=0.5, batch_size=16, momentum=0.0,
                           weight_decay=0.0, seed=3, progress=False)

    def mean_loss(w, b):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x.reshape(3, -1) @ w + b[None, :], y))

    w, b = w0, b0
    for _ in range(2):
        gw, gb = jax.grad(mean_loss, argnums=(0, 1))(w, b)
        w, b = w - 0.5 * np.asarray(gw), b - 0.5 * np.asarray(gb)
    np.testing.assert_allclose(model.out.kernel[...], w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.out.bias[...], b, rtol=1e-12, atol=1e-12)
    assert history.loss.shape == (2,)


def test_step_schedule_divides_by_five_at_30_60_80_percent():
    lrs = learning_rates(1.0, total_steps=100, schedule="step")
    assert lrs.shape == (100,)
    np.testing.assert_allclose(lrs[:30], 1.0)
    np.testing.assert_allclose(lrs[30:60], 0.2)
    np.testing.assert_allclose(lrs[60:80], 0.04)
    np.testing.assert_allclose(lrs[80:], 0.008)
    np.testing.assert_allclose(learning_rates(0.3, total_steps=7), 0.3)
    # Boundaries that round to the same step (0.3 * 2 and 0.6 * 2 -> 1) still compound.
    np.testing.assert_allclose(learning_rates(1.0, total_steps=2, schedule="step"), [1.0, 0.04])


def test_step_schedule_in_training_matches_hand_computation():
    """Momentum 0, no decay: the parameter moves by -lr_t * grad_t, with lr_t from the schedule."""
    x = np.zeros((4, 1, 1, 1))
    y = np.zeros(4, np.int32)
    cfg = model_config("mlp", in_shape=(1, 1, 1), num_classes=2, hidden=[], param_dtype="float64")
    model = build_from_config(cfg, seed=0)
    b0 = np.asarray(model.out.bias[...])
    model, _ = train(model, x, y, epochs=10, learning_rate=1.0, batch_size=4, momentum=0.0, weight_decay=0.0,
                     schedule="step", progress=False)
    b = b0.copy()
    for lr in learning_rates(1.0, total_steps=10, schedule="step"):
        p = np.exp(b - b.max()) / np.exp(b - b.max()).sum()
        b = b - lr * (p - np.array([1.0, 0.0]))  # input is zero: only the bias learns
    np.testing.assert_allclose(model.out.bias[...], b, rtol=1e-12)


def test_optimizer_direction_is_pytorch_sgd():
    tx = make_optimizer(momentum=0.5, weight_decay=0.1)
    params = {"w": jnp.full((), 2.0)}
    state = tx.init(params)
    d1, state = tx.update({"w": jnp.ones(())}, state, params)
    d2, state = tx.update({"w": jnp.ones(())}, state, params)
    np.testing.assert_allclose(d1["w"], 1.0 + 0.1 * 2.0)
    np.testing.assert_allclose(d2["w"], 0.5 * 1.2 + 1.2)
    with pytest.raises(ValueError, match="momentum"):
        make_optimizer(momentum=1.0)


def test_compiled_step_is_reused_across_calls(tiny):
    """Leave-fold-out retraining calls `train` many times: it must not recompile each time."""
    from cif_jax.evaluation import training

    x, y, k = tiny
    cfg = _lenet_cfg(k)
    train(build_from_config(cfg, seed=0), x, y, epochs=1, learning_rate=0.05, progress=False)
    before = training._train_step._cache_size()
    # Another seed, learning rate, schedule and data size (a fold removed).
    train(build_from_config(cfg, seed=1), x[:250], y[:250], epochs=2, learning_rate=0.01, schedule="step",
          seed=3, progress=False)
    assert training._train_step._cache_size() == before


def test_evaluate_exact_mean_with_short_last_chunk(tiny):
    x, y, k = tiny
    x, y = x[:37], y[:37]
    model = build_from_config(_lenet_cfg(k), seed=2)
    logits = nnx.jit(lambda m, xx: m(xx))(model, x)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    expected_loss = float(jnp.mean(losses))
    expected_acc = float(jnp.mean(jnp.argmax(logits, -1) == y))
    for batch_size in (16, 37, 1000):
        loss, acc = evaluate(model, x, y, batch_size=batch_size)
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
        assert acc == pytest.approx(expected_acc)


def test_bad_training_arguments(tiny):
    x, y, k = tiny
    model = build_from_config(_lenet_cfg(k), seed=0)
    with pytest.raises(ValueError, match="schedule"):
        train(model, x, y, epochs=1, learning_rate=0.1, schedule="cosine", progress=False)
    with pytest.raises(ValueError, match="shape"):
        train(model, x, y[:-1], epochs=1, learning_rate=0.1, progress=False)
    with pytest.raises(TypeError, match="integer"):
        train(model, x, y.astype(np.float32), epochs=1, learning_rate=0.1, progress=False)
    with pytest.raises(ValueError, match="positive"):
        train(model, x, y, epochs=0, learning_rate=0.1, progress=False)


# ---------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path, tiny):
    x, _, k = tiny
    cfg = _lenet_cfg(k)
    model = build_from_config(cfg, seed=7)
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, model, config=cfg, metadata={"epochs": 3, "accuracy": 0.93, "curve": np.arange(3.0)})
    loaded = load_checkpoint(path, config=cfg)
    for a, b in zip(_params(model), _params(loaded)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    call = nnx.jit(lambda m, xx: m(xx))
    np.testing.assert_array_equal(call(model, x[:5]), call(loaded, x[:5]))
    payload = read_checkpoint(path)
    assert payload["config"] == cfg and payload["version"] == 1
    assert payload["metadata"]["epochs"] == 3
    np.testing.assert_array_equal(payload["metadata"]["curve"], np.arange(3.0))
    assert os.listdir(tmp_path) == ["model.ckpt"]


def test_checkpoint_resnet_with_group_norm_round_trip(tmp_path):
    cfg = model_config("resnet18", in_shape=(8, 8, 3), num_classes=3)
    model = build_from_config(cfg, seed=1)
    model.blocks[3].norm2.scale[...] = jnp.full((128,), 0.5, jnp.float32)
    save_checkpoint(tmp_path / "r.ckpt", model, config=cfg)
    loaded = load_checkpoint(tmp_path / "r.ckpt", config=cfg)
    np.testing.assert_array_equal(loaded.blocks[3].norm2.scale[...], 0.5)
    for a, b in zip(_params(model), _params(loaded)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "other, key",
    [
        (model_config("mlp", in_shape=(8, 8, 1), num_classes=4), "name"),
        (model_config("lenet5", in_shape=(8, 8, 1), num_classes=10), "num_classes"),
        (model_config("lenet5", in_shape=(10, 10, 1), num_classes=4), "in_shape"),
        (model_config("lenet5", in_shape=(8, 8, 1), num_classes=4, param_dtype="float64"), "param_dtype"),
    ],
)
def test_checkpoint_refuses_other_config(tmp_path, other, key):
    cfg = _lenet_cfg(4)
    save_checkpoint(tmp_path / "m.ckpt", build_from_config(cfg, seed=0), config=cfg)
    with pytest.raises(ValueError, match=f"different model config.*{key}: saved"):
        load_checkpoint(tmp_path / "m.ckpt", config=other)


def test_save_refuses_model_not_matching_config(tmp_path):
    model = build_from_config(_lenet_cfg(4), seed=0)
    with pytest.raises(ValueError, match="does not match the config"):
        save_checkpoint(tmp_path / "m.ckpt", model, config=_lenet_cfg(10))
    assert not (tmp_path / "m.ckpt").exists()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    cfg = _lenet_cfg(4)
    path = tmp_path / "m.ckpt"
    # A failure while serialising leaves no file at all.
    with pytest.raises((TypeError, ValueError)):
        save_checkpoint(path, build_from_config(cfg, seed=0), config=cfg, metadata={"bad": object()})
    assert os.listdir(tmp_path) == []
    # A failure while moving the file into place keeps the old file and no temporary.
    save_checkpoint(path, build_from_config(cfg, seed=0), config=cfg)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, build_from_config(cfg, seed=1), config=cfg)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.ckpt"]


def test_not_a_checkpoint(tmp_path):
    cfg = _lenet_cfg(4)
    (tmp_path / "junk").write_bytes(b"not msgpack \x00\xff")
    with pytest.raises(ValueError, match="not a cif_jax checkpoint"):
        load_checkpoint(tmp_path / "junk", config=cfg)
    from flax import serialization

    (tmp_path / "v9").write_bytes(
        serialization.msgpack_serialize({"format": "cif_jax.checkpoint", "version": 9, "config": cfg})
    )
    with pytest.raises(ValueError, match="version 9"):
        load_checkpoint(tmp_path / "v9", config=cfg)
