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

from .layers import (
    _CONV_IMPLS,
    Conv2d,
    _he_normal,
    _lecun_normal,
    _ones,
    _zeros,
    max_pool_2x2,
)


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
