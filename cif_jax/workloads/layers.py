"""Layers for the workloads' models: a convolution as im2col matmuls, 2x2 max pooling, initialisers.

`Conv2d` with ``impl="im2col"`` unfolds the padded input into patches by strided
slices and multiplies by the reshaped kernel: on XLA:CPU the gradients of
`jax.lax.conv_general_dilated` are very slow in float64, above all under
``jax.vmap(jax.grad(...))``, and the matmul form avoids that (numbers in
`Conv2d`'s docstring). The models themselves are in :mod:`cif_jax.workloads.models`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

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
