"""Image classifiers for the CiF experiments, written with `flax.nnx`.

Every model takes a batch of NHWC images (``(B, H, W, C)``; the MLP takes any
shape and flattens it) and returns logits of shape ``(B, num_classes)``.

Influence functions need the network to be a *pure* function of its parameters
at a fixed snapshot: ``nnx.merge(graphdef, params)(x)`` must depend on nothing
else. So these models hold only `nnx.Param` variables: no BatchNorm running
statistics (ResNet-18 uses GroupNorm), no dropout, no RNG state.

Convolutions default to `Conv2d` with ``impl="im2col"``: the padded input is
unfolded into patches by strided slices (``kh`` over rows, then ``kw`` over
columns) and multiplied by the reshaped kernel. On XLA:CPU the gradients of `jax.lax.conv_general_dilated`
(what `nnx.Conv` calls) are very slow in float64, above all under
``jax.vmap(jax.grad(...))`` (per-example gradients); the matmul form avoids
that and is as fast in float32 (numbers in `Conv2d`'s docstring).

Parameter counts (``num_classes=10``)::

    lenet5    28x28x1 (MNIST)            61,706
    lenet5    32x32x3 (CIFAR-10)         62,006
    lenet5    8x8x1 (digits)             19,754
    mlp       28x28x1, hidden=(128,)    101,770
    alexnet   32x32x3                 2,472,266
    resnet18  32x32x3                11,173,962

References:
  LeCun et al., "Gradient-based learning applied to document recognition",
  Proc. IEEE 1998.
  Krizhevsky, Sutskever and Hinton, "ImageNet classification with deep
  convolutional neural networks", NeurIPS 2012.
  He et al., "Deep residual learning for image recognition", CVPR 2016.
  Wu and He, "Group normalization", ECCV 2018. https://arxiv.org/abs/1803.08494
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

__all__ = [
    "MLP",
    "MODEL_NAMES",
    "AlexNet",
    "Conv2d",
    "LeNet5",
    "ResNet18",
    "build_from_config",
    "build_model",
    "count_params",
    "max_pool_2x2",
    "model_config",
]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
_CONV_IMPLS = ("im2col", "lax")

# Standard deviation of a unit normal truncated to [-2, 2]; dividing by it gives
# the truncated draw the intended variance (the constant of
# `jax.nn.initializers.variance_scaling`).
_TRUNCATED_NORMAL_STD = 0.87962566103423978


def _host_draw(key_data: Any, shape: tuple[int, ...], std: float, dtype: Any) -> np.ndarray:
    """Normal(0, std^2) truncated at two standard deviations, drawn by NumPy."""
    rng = np.random.default_rng([int(v) for v in np.asarray(key_data).ravel()])
    z = rng.standard_normal(shape)
    bad = np.abs(z) > 2.0
    while bad.any():
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > 2.0
    return (z * (std / _TRUNCATED_NORMAL_STD)).astype(np.dtype(dtype))


def _variance_scaling(scale: float):
    """Truncated-normal fan-in initialiser, variance ``scale / fan_in``.

    Same distribution as ``jax.nn.initializers.variance_scaling(scale,
    "fan_in", "truncated_normal")``, but drawn on the host by NumPy from a
    seed made of the key's data: XLA:CPU takes about a second to compile
    `jax.random.truncated_normal` for every new shape, which made building
    ResNet-18 take ~10 s. Under a trace (`nnx.eval_shape`, `jax.jit`) the
    same NumPy draw runs through `jax.pure_callback`, so values do not depend
    on how the model is built.
    """

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        shape = tuple(int(s) for s in shape)
        fan_in = math.prod(shape[:-1])
        std = math.sqrt(scale / max(1, fan_in))
        key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        try:
            concrete = np.asarray(key_data)
        except jax.errors.TracerArrayConversionError:
            return jax.pure_callback(
                lambda kd: _host_draw(kd, shape, std, dtype),
                jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)),
                key_data,
            )
        return jnp.asarray(_host_draw(concrete, shape, std, dtype))

    return init


def _zeros(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    del key
    return jnp.asarray(np.zeros(tuple(shape), np.dtype(dtype)))


def _ones(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    del key
    return jnp.asarray(np.ones(tuple(shape), np.dtype(dtype)))


# He et al. (2015) initialisation for layers followed by a ReLU; LeCun normal
# (flax's default) for the logits layer.
_he_normal = _variance_scaling(2.0)
_lecun_normal = _variance_scaling(1.0)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"`{name}` must be an int or a pair of ints, got {value!r}.")
    return value  # type: ignore[return-value]


def _padding_pairs(padding: Any) -> str | tuple[tuple[int, int], tuple[int, int]]:
    """Normalises `padding` to "SAME"/"VALID" or ((top, bottom), (left, right))."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"`padding` string must be 'SAME' or 'VALID', got {padding!r}.")
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    pads = tuple(padding)
    if len(pads) != 2:
        raise ValueError(f"`padding` must be an int, a pair, or a pair of pairs; got {padding!r}.")
    out = []
    for p in pads:
        if isinstance(p, int):
            out.append((p, p))
        else:
            lo, hi = p
            out.append((int(lo), int(hi)))
    return (out[0], out[1])


def _canonical_dtype(dtype: Any) -> Any:
    return None if dtype is None else jnp.dtype(dtype)


def _compute_dtype(dtype: Any, *arrays: jax.Array | None) -> Any:
    """`dtype` if given, else the promoted dtype of the (non-None) arrays."""
    if dtype is not None:
        return dtype
    return jnp.result_type(*[a for a in arrays if a is not None])


def _add_channel_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    if bias is None:
        return y
    return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 on NHWC input ("VALID": odd edges dropped).

    Written as the maximum of four strided slices rather than `lax.reduce_window`,
    whose gradient (select-and-scatter) is slow on XLA:CPU under `vmap`. (A
    6-D reshape followed by a max was tried too: on jaxlib 0.10.2 XLA:CPU it gave
    wrong GGN products inside a `while_loop` with a batch of one vector, which
    made CG return NaN; `tests/test_solve_models.py` guards against that.)
    """
    b, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    x = x[:, : 2 * h2, : 2 * w2, :]
    top = jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2])
    bottom = jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2])
    return jnp.maximum(top, bottom)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + kernel - size)
    return (total // 2, total - total // 2)


def _im2col(
    x: jax.Array,
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
    padding: str | tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """Unfolds NHWC `x` into patches ``(B, Ho, Wo, kh*kw*C)``, order (kh, kw, C).

    Built from strided slices of the padded input, whose gradients are pads
    and adds; no convolution is involved.
    """
    kh, kw = kernel_size
    sh, sw = strides
    _, h, w, _ = x.shape
    if padding == "VALID":
        padding = ((0, 0), (0, 0))
    elif padding == "SAME":
        padding = (_same_padding(h, kh, sh), _same_padding(w, kw, sw))
    (pt, pb), (pl, pr) = padding
    if pt or pb or pl or pr:
        x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (h + pt + pb - kh) // sh + 1
    wo = (w + pl + pr - kw) // sw + 1
    # Rows first, then columns: kh + kw slices instead of kh * kw, which keeps
    # compile times low for large kernels (11x11 in AlexNet).
    rows = jnp.stack([x[:, i : i + (ho - 1) * sh + 1 : sh] for i in range(kh)], axis=3)  # (B, Ho, W, kh, C)
    cols = jnp.stack([rows[:, :, j : j + (wo - 1) * sw + 1 : sw] for j in range(kw)], axis=4)  # (B, Ho, Wo, kh, kw, C)
    return jnp.reshape(cols, cols.shape[:3] + (-1,))


class Conv2d(nnx.Module):
    """2-D convolution on NHWC input, computed as im2col + matmul by default.

    Parameters are laid out as in `nnx.Conv`: ``kernel`` of shape
    ``(kh, kw, in_features, out_features)`` and ``bias`` of shape
    ``(out_features,)``. With ``impl="im2col"`` the padded input is unfolded
    into ``(B, Ho, Wo, kh*kw*cin)`` patches by ``kh + kw`` strided slices, and
    multiplied by the kernel reshaped to ``(kh*kw*cin, cout)``; the backward
    pass is then matmuls, pads and adds. ``impl="lax"`` calls
    `jax.lax.conv_general_dilated`, as `nnx.Conv` does. Both agree to float
    rounding.

    Measured on the 2-core XLA:CPU of this project (LeNet-5 on 28x28x1, batch
    of 256, jitted; best of several runs on a shared, loaded machine, so
    ranges over two sessions):

    ==========================  ============  ============  ============
    float64 (x64)               im2col        nnx.Conv      lax.conv
    ==========================  ============  ============  ============
    per-example gradients       0.20-0.34 s   6.4-10.3 s    5.7-10.0 s
    GGN-vector product          0.13-0.25 s   0.50-0.52 s   0.36-0.50 s
    ==========================  ============  ============  ============

    In float32 all three are within noise of each other (0.18-0.23 s for
    per-example gradients, 0.12-0.18 s for a GGN-vector product). A plain
    training step (batch 128, float32) took 16 ms with im2col against 27 ms
    with `jax.lax.conv_general_dilated`. Unfolding with
    `jax.lax.conv_general_dilated_patches` instead of slices was about 2.5x
    slower in float32, so it is not used.

    Args:
      in_features: input channels.
      out_features: output channels.
      kernel_size: ``k`` or ``(kh, kw)``.
      strides: ``s`` or ``(sh, sw)``.
      padding: ``p``, ``(ph, pw)``, ``((top, bottom), (left, right))``,
        ``"SAME"`` or ``"VALID"``.
      use_bias: whether to add a bias.
      impl: ``"im2col"`` or ``"lax"``.
      dtype: computation dtype; ``None`` promotes input and parameters.
      param_dtype: parameter dtype.
      precision: precision of the matmul (or convolution).
      kernel_init: initialiser of the kernel.
      bias_init: initialiser of the bias.
      rngs: `nnx.Rngs` for initialisation.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        strides: int | Sequence[int] = 1,
        padding: Any = 0,
        use_bias: bool = True,
        impl: str = "im2col",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = _he_normal,
        bias_init: Any = _zeros,
        rngs: nnx.Rngs,
    ):
        if impl not in _CONV_IMPLS:
            raise ValueError(f"`impl` must be one of {_CONV_IMPLS}, got {impl!r}.")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        self.padding = _padding_pairs(padding)
        self.impl = impl
        self.dtype = _canonical_dtype(dtype)
        self.precision = precision
        kh, kw = self.kernel_size
        shape = (kh, kw, self.in_features, self.out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), (self.out_features,), param_dtype))
        else:
            self.bias = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Conv2d expects NHWC input with {self.in_features} channels, got shape {x.shape}."
            )
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        dtype = _compute_dtype(self.dtype, x, kernel, bias)
        x = x.astype(dtype)
        kernel = kernel.astype(dtype)
        bias = None if bias is None else bias.astype(dtype)
        kh, kw = self.kernel_size
        if self.impl == "lax":
            y = lax.conv_general_dilated(
                x,
                kernel,
                self.strides,
                self.padding,
                dimension_numbers=_DIMENSION_NUMBERS,
                precision=self.precision,
            )
        else:
            y = jnp.matmul(
                _im2col(x, self.kernel_size, self.strides, self.padding),
                jnp.reshape(kernel, (kh * kw * self.in_features, self.out_features)),
                precision=self.precision,
            )
        return _add_channel_bias(y, bias)


def _dense(in_f: int, out_f: int, *, dtype, param_dtype, rngs, last: bool = False) -> nnx.Linear:
    return nnx.Linear(
        in_f,
        out_f,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_lecun_normal if last else _he_normal,
        bias_init=_zeros,
        rngs=rngs,
    )


def _flatten(x: jax.Array) -> jax.Array:
    return jnp.reshape(x, (x.shape[0], -1))


def _conv_out(size: int, kernel: int, stride: int, pad_lo: int, pad_hi: int) -> int:
    return (size + pad_lo + pad_hi - kernel) // stride + 1


def _lenet_defaults(in_shape: Sequence[int]) -> tuple[int, tuple[int, int]]:
    """Kernel size and (conv1, conv2) paddings of LeNet-5 for an input shape.

    28x28 (MNIST): 5x5 kernels, conv1 padded by 2 so that it sees 32x32 as in
    LeCun et al. (1998); 32x32 (CIFAR): 5x5, no padding; small images such as
    scikit-learn's 8x8 digits: 3x3 kernels padded by 1 ("same"), so that both
    conv-pool stages still fit (8 -> 4 -> 2).
    """
    h, w = int(in_shape[0]), int(in_shape[1])
    if min(h, w) >= 20:
        return 5, (min(2, max(0, (32 - min(h, w)) // 2)), 0)
    return 3, (1, 1)


class LeNet5(nnx.Module):
    """LeNet-5 (LeCun et al., 1998) with ReLU and 2x2 max-pooling.

    Layers: conv 6@k x k (padding p1) - ReLU - maxpool 2 - conv 16@k x k
    (padding p2) - ReLU - maxpool 2 - flatten - fc 120 - ReLU - fc 84 - ReLU -
    fc ``num_classes``. Defaults (from ``in_shape``): on 28x28x1, k=5, p1=2,
    p2=0, giving 16x5x5=400 features and exactly 61,706 parameters; on
    32x32x3, k=5, p1=p2=0 (62,006); on 8x8x1 (digits), k=3, p1=p2=1, so
    8 -> 4 -> 2 and 16x2x2=64 features: 60 + 880 + 7,800 + 10,164 + 850 =
    19,754 parameters.

    Args:
      rngs: `nnx.Rngs` for initialisation.
      in_shape: ``(H, W, C)`` of one input image.
      num_classes: number of logits.
      kernel_size: overrides the default kernel size.
      padding: overrides the default ``(p1, p2)`` paddings.
      conv_impl: ``"im2col"`` (default) or ``"lax"``; see `Conv2d`.
      dtype: computation dtype (``None``: promote input and parameters).
      param_dtype: parameter dtype (float32 by default).
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        in_shape: Sequence[int] = (28, 28, 1),
        num_classes: int = 10,
        kernel_size: int | None = None,
        padding: Sequence[int] | None = None,
        conv_impl: str = "im2col",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        h, w, c = _check_image_shape(in_shape, "LeNet5")
        k_default, pad_default = _lenet_defaults(in_shape)
        k = k_default if kernel_size is None else int(kernel_size)
        p1, p2 = pad_default if padding is None else (int(padding[0]), int(padding[1]))
        self.in_shape = (h, w, c)
        self.num_classes = int(num_classes)
        kw = dict(impl=conv_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = Conv2d(c, 6, k, padding=p1, **kw)
        self.conv2 = Conv2d(6, 16, k, padding=p2, **kw)
        h1, w1 = _conv_out(h, k, 1, p1, p1) // 2, _conv_out(w, k, 1, p1, p1) // 2
        h2, w2 = _conv_out(h1, k, 1, p2, p2) // 2, _conv_out(w1, k, 1, p2, p2) // 2
        if min(h2, w2) < 1:
            raise ValueError(
                f"LeNet5 with kernel {k} and padding {(p1, p2)} reduces an input of shape "
                f"{tuple(in_shape)} to nothing; pass a smaller `kernel_size` or more `padding`."
            )
        dkw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = _dense(16 * h2 * w2, 120, **dkw)
        self.fc2 = _dense(120, 84, **dkw)
        self.fc3 = _dense(84, self.num_classes, last=True, **dkw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc3(self.features(x, layer=-1))

    def features(self, x: jax.Array, *, layer: int = -1) -> jax.Array:
        """Post-ReLU output of a hidden layer, ``(B, width)`` (STRIDE's frozen features).

        Layers: 0 = conv1 (after ReLU and pooling, flattened), 1 = conv2 (likewise),
        2 = fc1 (120), 3 = fc2 (84); ``-1`` is the penultimate layer fc2 (STRIDE,
        app. B.1), negative values count from the end.
        """
        layer = _layer_index(layer, 4, "LeNet5")
        x = max_pool_2x2(jax.nn.relu(self.conv1(x)))
        if layer == 0:
            return _flatten(x)
        x = max_pool_2x2(jax.nn.relu(self.conv2(x)))
        x = _flatten(x)
        if layer == 1:
            return x
        x = jax.nn.relu(self.fc1(x))
        if layer == 2:
            return x
        return jax.nn.relu(self.fc2(x))


class MLP(nnx.Module):
    """Multi-layer perceptron with ReLU on the flattened input.

    Layers: flatten - (fc h - ReLU) for h in ``hidden`` - fc ``num_classes``.
    With ``in_features=784`` and ``hidden=(128,)``: 101,770 parameters.

    Args:
      rngs: `nnx.Rngs` for initialisation.
      in_features: size of one flattened input.
      hidden: widths of the hidden layers (may be empty: logistic regression).
      num_classes: number of logits.
      dtype: computation dtype (``None``: promote input and parameters).
      param_dtype: parameter dtype (float32 by default).
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        in_features: int,
        hidden: Sequence[int] = (128,),
        num_classes: int = 10,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        widths = [int(in_features), *[int(h) for h in hidden]]
        if min(widths) < 1:
            raise ValueError(f"MLP widths must be positive, got in_features={in_features}, hidden={hidden}.")
        dkw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.hidden_layers = nnx.List([_dense(a, b, **dkw) for a, b in itertools.pairwise(widths)])
        self.out = _dense(widths[-1], self.num_classes, last=True, **dkw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _flatten(x)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} features per example, got {x.shape[1]}.")
        for layer in self.hidden_layers:
            x = jax.nn.relu(layer(x))
        return self.out(x)

    def features(self, x: jax.Array, *, layer: int = -1) -> jax.Array:
        """Post-ReLU output of hidden layer ``layer``, ``(B, hidden[layer])`` (STRIDE's frozen features).

        ``-1`` is the last hidden layer, the penultimate layer of the network
        (STRIDE, app. B.1). An MLP without hidden layers is logistic regression:
        use the flattened inputs as features.
        """
        n = len(self.hidden_layers)
        if n == 0:
            raise ValueError("This MLP has no hidden layer (logistic regression): use the flattened inputs as "
                             "features, e.g. `feature_fn=lambda params, x: x.reshape(len(x), -1)`.")
        layer = _layer_index(layer, n, "MLP")
        x = _flatten(x)
        for i in range(layer + 1):
            x = jax.nn.relu(self.hidden_layers[i](x))
        return x


class AlexNet(nnx.Module):
    """AlexNet adapted to 32x32 images (the small CIFAR-10 variant).

    The five convolutions keep AlexNet's widths; the 4096-wide classifier is
    replaced by one linear layer, as in the common CIFAR-10 adaptation found in
    public PyTorch CIFAR model collections::

        conv 64@11x11 stride 4 pad 5 - ReLU - maxpool 2     32 -> 8 -> 4
        conv 192@5x5 pad 2 - ReLU - maxpool 2                4 -> 2
        conv 384@3x3 pad 1 - ReLU
        conv 256@3x3 pad 1 - ReLU
        conv 256@3x3 pad 1 - ReLU - maxpool 2                2 -> 1
        flatten (256) - fc num_classes

    On 32x32x3 with 10 classes: 2,472,266 parameters. (The paper's
    "AlexNet (p ~ 61M)" is the ImageNet network with 4096-wide dense layers,
    far beyond what this variant or a CPU needs.)

    Args:
      rngs: `nnx.Rngs` for initialisation.
      in_shape: ``(H, W, C)`` of one input image.
      num_classes: number of logits.
      conv_impl: ``"im2col"`` (default) or ``"lax"``; see `Conv2d`.
      dtype: computation dtype (``None``: promote input and parameters).
      param_dtype: parameter dtype (float32 by default).
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        in_shape: Sequence[int] = (32, 32, 3),
        num_classes: int = 10,
        conv_impl: str = "im2col",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        h, w, c = _check_image_shape(in_shape, "AlexNet")
        self.in_shape = (h, w, c)
        self.num_classes = int(num_classes)
        kw = dict(impl=conv_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = Conv2d(c, 64, 11, strides=4, padding=5, **kw)
        self.conv2 = Conv2d(64, 192, 5, padding=2, **kw)
        self.conv3 = Conv2d(192, 384, 3, padding=1, **kw)
        self.conv4 = Conv2d(384, 256, 3, padding=1, **kw)
        self.conv5 = Conv2d(256, 256, 3, padding=1, **kw)
        sizes = []
        for s in (h, w):
            s = _conv_out(s, 11, 4, 5, 5) // 2 // 2 // 2
            sizes.append(s)
        if min(sizes) < 1:
            raise ValueError(f"AlexNet needs inputs of at least 29x29, got {tuple(in_shape)}.")
        self.fc = _dense(256 * sizes[0] * sizes[1], self.num_classes, last=True,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = max_pool_2x2(jax.nn.relu(self.conv1(x)))
        x = max_pool_2x2(jax.nn.relu(self.conv2(x)))
        x = jax.nn.relu(self.conv3(x))
        x = jax.nn.relu(self.conv4(x))
        x = max_pool_2x2(jax.nn.relu(self.conv5(x)))
        return self.fc(_flatten(x))


class _BasicBlock(nnx.Module):
    """ResNet basic block: two 3x3 convolutions with GroupNorm and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, *, num_groups: int, conv_kw: dict, norm_kw: dict, rngs):
        self.conv1 = Conv2d(cin, cout, 3, strides=stride, padding=1, use_bias=False, rngs=rngs, **conv_kw)
        self.norm1 = nnx.GroupNorm(cout, num_groups=num_groups, rngs=rngs, **norm_kw)
        self.conv2 = Conv2d(cout, cout, 3, padding=1, use_bias=False, rngs=rngs, **conv_kw)
        self.norm2 = nnx.GroupNorm(cout, num_groups=num_groups, rngs=rngs, **norm_kw)
        if stride != 1 or cin != cout:
            self.proj = Conv2d(cin, cout, 1, strides=stride, padding=0, use_bias=False, rngs=rngs, **conv_kw)
            self.proj_norm = nnx.GroupNorm(cout, num_groups=num_groups, rngs=rngs, **norm_kw)
        else:
            self.proj = nnx.data(None)
            self.proj_norm = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = x if self.proj is None else self.proj_norm(self.proj(x))
        return jax.nn.relu(y + shortcut)


class ResNet18(nnx.Module):
    """ResNet-18 for 32x32 images, with GroupNorm instead of BatchNorm.

    CIFAR stem (He et al., 2016, as commonly adapted): conv 64@3x3 stride 1,
    no max-pool; then four stages of two basic blocks with 64, 128, 256 and
    512 channels (strides 1, 2, 2, 2; 1x1 projection shortcuts where the shape
    changes); global average pooling; fc ``num_classes``. Convolutions have no
    bias. Every BatchNorm of the usual network is a GroupNorm (Wu and He,
    2018) with ``num_groups`` groups (32 by default) and a per-channel scale
    and bias: it normalises each example on its own and keeps no running
    statistics, so the network is a pure function of its parameters. The
    count matches the BatchNorm network: 11,173,962 parameters for 10 classes.

    Args:
      rngs: `nnx.Rngs` for initialisation.
      in_shape: ``(H, W, C)`` of one input image.
      num_classes: number of logits.
      num_groups: GroupNorm groups (must divide 64).
      conv_impl: ``"im2col"`` (default) or ``"lax"``; see `Conv2d`.
      dtype: computation dtype (``None``: promote input and parameters).
      param_dtype: parameter dtype (float32 by default).
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        in_shape: Sequence[int] = (32, 32, 3),
        num_classes: int = 10,
        num_groups: int = 32,
        conv_impl: str = "im2col",
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        h, w, c = _check_image_shape(in_shape, "ResNet18")
        if num_groups < 1 or 64 % num_groups:
            raise ValueError(f"`num_groups` must divide 64, got {num_groups}.")
        self.in_shape = (h, w, c)
        self.num_classes = int(num_classes)
        conv_kw = dict(impl=conv_impl, dtype=dtype, param_dtype=param_dtype)
        norm_kw = dict(dtype=dtype, param_dtype=param_dtype, scale_init=_ones, bias_init=_zeros)
        self.stem = Conv2d(c, 64, 3, padding=1, use_bias=False, rngs=rngs, **conv_kw)
        self.stem_norm = nnx.GroupNorm(64, num_groups=num_groups, rngs=rngs, **norm_kw)
        blocks = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for s in (stride, 1):
                blocks.append(
                    _BasicBlock(cin, cout, s, num_groups=num_groups, conv_kw=conv_kw, norm_kw=norm_kw, rngs=rngs)
                )
                cin = cout
        self.blocks = nnx.List(blocks)
        self.fc = _dense(512, self.num_classes, last=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.stem_norm(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x)


def _layer_index(layer: int, num_layers: int, who: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -num_layers <= layer < num_layers:
        raise ValueError(f"{who}.features: `layer` must be an int in [-{num_layers}, {num_layers}), got {layer!r}.")
    return int(layer) % num_layers


def _check_image_shape(in_shape: Sequence[int], who: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in in_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{who} needs `in_shape=(H, W, C)` with positive sizes, got {tuple(in_shape)}.")
    return shape  # type: ignore[return-value]


def count_params(model: nnx.Module) -> int:
    """Number of scalar parameters (`nnx.Param` entries) of `model`."""
    return int(sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param))))


# --------------------------------------------------------------------------
# Registry and configs.
# --------------------------------------------------------------------------

MODEL_NAMES = ("lenet5", "mlp", "alexnet", "resnet18")

# Options accepted per model, with their defaults (None: resolved later).
_OPTIONS: dict[str, dict[str, Any]] = {
    "lenet5": {"kernel_size": None, "padding": None, "conv_impl": "im2col", "dtype": None, "param_dtype": "float32"},
    "mlp": {"hidden": [128], "dtype": None, "param_dtype": "float32"},
    "alexnet": {"conv_impl": "im2col", "dtype": None, "param_dtype": "float32"},
    "resnet18": {"num_groups": 32, "conv_impl": "im2col", "dtype": None, "param_dtype": "float32"},
}


def _check_name(name: str) -> str:
    if name not in MODEL_NAMES:
        raise ValueError(f"Unknown model {name!r}; valid names are {', '.join(MODEL_NAMES)}.")
    return name


def model_config(name: str, *, in_shape: Sequence[int], num_classes: int, **options: Any) -> dict[str, Any]:
    """A complete, JSON-serialisable description of a model.

    Defaults are filled in and resolved (LeNet-5's kernel size and paddings
    from ``in_shape``), dtypes are stored as names and tuples as lists, so two
    configs describe the same network exactly when they compare equal. This is
    what checkpoints store and check.

    Args:
      name: one of `MODEL_NAMES`.
      in_shape: ``(H, W, C)`` of one input.
      num_classes: number of logits.
      **options: model-specific options (see `_OPTIONS` / the model classes):
        lenet5: kernel_size, padding, conv_impl, dtype, param_dtype;
        mlp: hidden, dtype, param_dtype; alexnet: conv_impl, dtype,
        param_dtype; resnet18: num_groups, conv_impl, dtype, param_dtype.

    Returns:
      A dict with keys ``name``, ``in_shape``, ``num_classes`` and the options.
    """
    _check_name(name)
    allowed = _OPTIONS[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for model {name!r}; valid options are {sorted(allowed)}.")
    shape = [int(s) for s in in_shape]
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"`in_shape` must be (H, W, C) with positive sizes, got {tuple(in_shape)}.")
    if int(num_classes) < 1:
        raise ValueError(f"`num_classes` must be positive, got {num_classes}.")
    cfg: dict[str, Any] = {"name": name, "in_shape": shape, "num_classes": int(num_classes)}
    for key, default in allowed.items():
        value = options.get(key, default)
        if key in ("dtype", "param_dtype"):
            value = None if value is None else jnp.dtype(value).name
        elif key == "hidden":
            value = [int(h) for h in value]
        elif key == "conv_impl" and value not in _CONV_IMPLS:
            raise ValueError(f"`conv_impl` must be one of {_CONV_IMPLS}, got {value!r}.")
        cfg[key] = value
    if name == "lenet5":
        k, pads = _lenet_defaults(shape)
        cfg["kernel_size"] = k if cfg["kernel_size"] is None else int(cfg["kernel_size"])
        cfg["padding"] = list(pads) if cfg["padding"] is None else [int(p) for p in cfg["padding"]]
    if name == "resnet18":
        cfg["num_groups"] = int(cfg["num_groups"])
    return cfg


def build_from_config(config: dict[str, Any], *, seed: int = 0) -> nnx.Module:
    """Builds the model a `model_config` dict describes, initialised from `seed`."""
    if not isinstance(config, dict) or "name" not in config:
        raise TypeError(f"`config` must be a dict made by `model_config`, got {config!r}.")
    opts = {k: v for k, v in config.items() if k not in ("name", "in_shape", "num_classes")}
    cfg = model_config(config["name"], in_shape=config["in_shape"], num_classes=config["num_classes"], **opts)
    rngs = nnx.Rngs(params=int(seed))
    name, in_shape, num_classes = cfg["name"], tuple(cfg["in_shape"]), cfg["num_classes"]
    common = dict(rngs=rngs, num_classes=num_classes, dtype=cfg["dtype"], param_dtype=jnp.dtype(cfg["param_dtype"]))
    if name == "lenet5":
        return LeNet5(
            in_shape=in_shape,
            kernel_size=cfg["kernel_size"],
            padding=tuple(cfg["padding"]),
            conv_impl=cfg["conv_impl"],
            **common,
        )
    if name == "mlp":
        return MLP(in_features=math.prod(in_shape), hidden=tuple(cfg["hidden"]), **common)
    if name == "alexnet":
        return AlexNet(in_shape=in_shape, conv_impl=cfg["conv_impl"], **common)
    return ResNet18(in_shape=in_shape, num_groups=cfg["num_groups"], conv_impl=cfg["conv_impl"], **common)


def build_model(name: str, *, in_shape: Sequence[int], num_classes: int, seed: int, **options: Any) -> nnx.Module:
    """Builds a model by name.

    Args:
      name: ``"lenet5"``, ``"mlp"``, ``"alexnet"`` or ``"resnet18"``.
      in_shape: ``(H, W, C)`` of one input.
      num_classes: number of logits.
      seed: seed of the parameter initialisation.
      **options: model-specific options, see `model_config`.

    Returns:
      The `nnx.Module`; ``model_config(name, in_shape=..., num_classes=...,
      **options)`` describes it.

    Examples:
      >>> model = build_model("lenet5", in_shape=(28, 28, 1), num_classes=10, seed=0)
      >>> count_params(model)
      61706
    """
    return build_from_config(model_config(name, in_shape=in_shape, num_classes=num_classes, **options), seed=seed)
