"""Tests for cif_jax.workloads.models: shapes, parameter counts, the im2col convolution, purity."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from cif_jax.workloads.models import (
    MODEL_NAMES,
    Conv2d,
    build_from_config,
    build_model,
    count_params,
    max_pool_2x2,
    model_config,
)

_DN = ("NHWC", "HWIO", "NHWC")


def _apply(model):
    """A jitted pure function ``apply(params, x)`` for `model`."""
    graphdef, params = nnx.split(model, nnx.Param)
    return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)), params


@pytest.mark.parametrize(
    "name, in_shape, expected",
    [
        ("lenet5", (28, 28, 1), 61_706),
        ("lenet5", (32, 32, 3), 62_006),
        ("lenet5", (8, 8, 1), 19_754),
        ("mlp", (28, 28, 1), 101_770),
        ("alexnet", (32, 32, 3), 2_472_266),
        ("resnet18", (32, 32, 3), 11_173_962),
    ],
)
def test_parameter_counts(name, in_shape, expected):
    cfg = model_config(name, in_shape=in_shape, num_classes=10)
    abstract = nnx.eval_shape(lambda: build_from_config(cfg, seed=0))
    assert count_params(abstract) == expected


def test_lenet5_counts_by_hand():
    # conv 6@5x5 (pad 2), conv 16@5x5, fc 400-120-84-10.
    by_hand = (5 * 5 * 1 * 6 + 6) + (5 * 5 * 6 * 16 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    model = build_model("lenet5", in_shape=(28, 28, 1), num_classes=10, seed=0)
    assert by_hand == 61_706 == count_params(model)
    assert model.fc1.in_features == 400


@pytest.mark.parametrize(
    "name, in_shape",
    [
        ("lenet5", (28, 28, 1)),
        ("lenet5", (8, 8, 1)),
        ("mlp", (8, 8, 1)),
        ("alexnet", (32, 32, 3)),
        ("resnet18", (32, 32, 3)),
    ],
)
def test_output_shape_and_float32_default(name, in_shape):
    model = build_model(name, in_shape=in_shape, num_classes=7, seed=0)
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        assert leaf.dtype == jnp.float32  # even though the tests enable x64
    apply, params = _apply(model)
    x = jnp.asarray(np.random.default_rng(0).random((3, *in_shape)), dtype=jnp.float32)
    out = apply(params, x)
    assert out.shape == (3, 7)
    assert out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


def test_param_dtype_option():
    model = build_model("lenet5", in_shape=(8, 8, 1), num_classes=10, seed=0, param_dtype="float64")
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model))} == {jnp.dtype("float64")}
    assert model(jnp.zeros((2, 8, 8, 1))).dtype == jnp.float64
    half = build_model("mlp", in_shape=(8, 8, 1), num_classes=10, seed=0, dtype="float32", param_dtype="float64")
    assert half(jnp.zeros((2, 8, 8, 1), jnp.float64)).dtype == jnp.float32


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_hold_only_params(name):
    in_shape = (8, 8, 1) if name in ("lenet5", "mlp") else (32, 32, 3)
    cfg = model_config(name, in_shape=in_shape, num_classes=10)
    abstract = nnx.eval_shape(lambda: build_from_config(cfg, seed=0))
    _, params, rest = nnx.split(abstract, nnx.Param, ...)
    assert jax.tree.leaves(rest) == []  # no running statistics, RNG or other state
    assert len(jax.tree.leaves(params)) > 0


def test_models_are_pure_functions_of_their_params():
    model = build_model("lenet5", in_shape=(28, 28, 1), num_classes=10, seed=1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert jax.tree.leaves(rest) == []
    apply = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    x = jnp.asarray(np.random.default_rng(0).random((2, 28, 28, 1)), dtype=jnp.float32)
    out1 = apply(params, x)
    out2 = apply(params, x)
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_allclose(nnx.jit(lambda m, xx: m(xx))(model, x), out1, rtol=1e-6, atol=1e-6)
    # Calling the model changed nothing.
    _, params_after = nnx.split(model, nnx.Param)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_after)):
        np.testing.assert_array_equal(a, b)
    # The output depends on the params passed in, not on anything captured.
    moved = jax.tree.map(lambda p: p + 0.01, params)
    assert not np.allclose(apply(moved, x), out1)


def test_same_seed_same_params_and_traced_init_matches():
    cfg = model_config("lenet5", in_shape=(8, 8, 1), num_classes=10)
    a = nnx.state(build_from_config(cfg, seed=3))
    b = nnx.state(build_from_config(cfg, seed=3))
    c = nnx.state(build_from_config(cfg, seed=4))
    traced = nnx.jit(lambda: nnx.state(build_from_config(cfg, seed=3)))()
    for x, y, z, t in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c), jax.tree.leaves(traced)):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, t)
        if x.ndim > 1:
            assert not np.array_equal(x, z)


def test_initial_kernel_scale():
    model = build_model("mlp", in_shape=(20, 20, 1), num_classes=10, seed=0, hidden=[500])
    kernel = np.asarray(model.hidden_layers[0].kernel[...])
    assert abs(kernel.std() - np.sqrt(2.0 / 400)) < 0.05 * np.sqrt(2.0 / 400)
    assert np.abs(kernel).max() <= 2 * np.sqrt(2.0 / 400) / 0.87962566103423978 + 1e-6
    np.testing.assert_array_equal(model.hidden_layers[0].bias[...], 0.0)


_CONV_CASES = [
    # (H, W, cin, cout, kernel, strides, padding)
    (9, 9, 3, 4, (3, 3), (1, 1), 1),
    (8, 7, 2, 5, (5, 3), (2, 1), ((2, 1), (0, 2))),
    (10, 10, 3, 2, (3, 3), (2, 2), "SAME"),
    (7, 9, 4, 3, (2, 2), (1, 1), "VALID"),
    (6, 6, 5, 6, (1, 1), (2, 2), 0),
    (32, 32, 3, 4, (11, 11), (4, 4), 5),
]


@pytest.mark.parametrize(
    "case, dtype, tol",
    [(case, jnp.float64, 1e-12) for case in _CONV_CASES]
    + [(case, jnp.float32, 2e-5) for case in (_CONV_CASES[1], _CONV_CASES[-1])],
)
def test_im2col_conv_equals_lax_conv(case, dtype, tol, getkey):
    h, w, cin, cout, kernel_size, strides, padding = case
    conv = Conv2d(cin, cout, kernel_size, strides=strides, padding=padding, param_dtype=dtype, rngs=nnx.Rngs(0))
    x = jax.random.normal(getkey(), (2, h, w, cin), dtype)
    bias = jax.random.normal(getkey(), (cout,), dtype)
    conv.bias[...] = bias
    pads = padding if isinstance(padding, str) else conv.padding

    @jax.jit
    def expected_fn(x, kernel, bias):
        y = lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN, precision=lax.Precision.HIGHEST)
        return y + jnp.reshape(bias, (1, 1, 1, cout))

    expected = expected_fn(x, conv.kernel[...], bias)
    got = nnx.jit(lambda c, xx: c(xx))(conv, x)
    assert got.shape == expected.shape and got.dtype == dtype
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", _CONV_CASES[:3])
def test_im2col_conv_gradients_equal_lax_conv(case, getkey):
    h, w, cin, cout, kernel_size, strides, padding = case
    x = jax.random.normal(getkey(), (2, h, w, cin), jnp.float64)
    convs = {
        impl: Conv2d(cin, cout, kernel_size, strides=strides, padding=padding, impl=impl,
                     param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        for impl in ("im2col", "lax")
    }
    grads = {}
    for impl, conv in convs.items():
        graphdef, params = nnx.split(conv)
        f = lambda p, xx: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(xx)))
        grads[impl] = jax.jit(jax.grad(f, argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(grads["im2col"]), jax.tree.leaves(grads["lax"])):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


def test_conv_impl_lax_gives_same_model_output():
    x = jnp.asarray(np.random.default_rng(0).random((4, 28, 28, 1)))
    a = build_model("lenet5", in_shape=(28, 28, 1), num_classes=10, seed=0, param_dtype="float64")
    b = build_model("lenet5", in_shape=(28, 28, 1), num_classes=10, seed=0, param_dtype="float64", conv_impl="lax")
    call = nnx.jit(lambda m, xx: m(xx))
    np.testing.assert_allclose(call(a, x), call(b, x), rtol=1e-12, atol=1e-12)


def test_max_pool_matches_reduce_window(getkey):
    x = jax.random.normal(getkey(), (2, 7, 6, 3))
    expected = lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    np.testing.assert_array_equal(max_pool_2x2(x), expected)


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match="lenet5, mlp, alexnet, resnet18"):
        build_model("vgg16", in_shape=(32, 32, 3), num_classes=10, seed=0)
    assert MODEL_NAMES == ("lenet5", "mlp", "alexnet", "resnet18")


def test_bad_options_rejected():
    with pytest.raises(ValueError, match="Unknown option"):
        model_config("lenet5", in_shape=(28, 28, 1), num_classes=10, hidden=[3])
    with pytest.raises(ValueError, match="conv_impl"):
        model_config("alexnet", in_shape=(32, 32, 3), num_classes=10, conv_impl="fft")
    with pytest.raises(ValueError, match="in_shape"):
        model_config("mlp", in_shape=(28, 28), num_classes=10)
    with pytest.raises(ValueError, match="reduces an input"):
        build_model("lenet5", in_shape=(8, 8, 1), num_classes=10, seed=0, kernel_size=5, padding=[0, 0])
    with pytest.raises(ValueError, match="channels"):
        Conv2d(3, 4, 3, rngs=nnx.Rngs(0))(jnp.zeros((1, 5, 5, 2)))


def test_model_config_is_json_and_complete():
    cfg = model_config("lenet5", in_shape=(8, 8, 1), num_classes=10)
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg == {
        "name": "lenet5",
        "in_shape": [8, 8, 1],
        "num_classes": 10,
        "kernel_size": 3,
        "padding": [1, 1],
        "conv_impl": "im2col",
        "dtype": None,
        "param_dtype": "float32",
    }
    # Defaults made explicit compare equal to defaults left implicit.
    assert model_config("lenet5", in_shape=[8, 8, 1], num_classes=10, kernel_size=3, param_dtype=jnp.float32) == cfg
    assert model_config("resnet18", in_shape=(32, 32, 3), num_classes=10)["num_groups"] == 32
