"""Streamed Gaussian Johnson-Lindenstrauss sketch of per-example gradients.

CiF clusters gradients in a low-dimensional space: each gradient
$g_i \\in \\mathbb{R}^p$ is mapped to $h_i = \\Pi g_i$ with a
Gaussian projection $\\Pi \\in \\mathbb{R}^{d \\times p}$,
$\\Pi_{ab} \\sim \\mathcal{N}(0, 1/d)$ (eq. (5)). For large networks
$\\Pi$ cannot be stored, so, as in appendix C, it is split into contiguous
column blocks that are regenerated from the key when needed and the projection
is accumulated block by block:

$$
y^{(0)} = 0, \\qquad y^{(b)} = y^{(b-1)} + \\Pi_{:, \\mathcal{I}_b} x_{\\mathcal{I}_b},
\\qquad y^{(B)} = \\Pi x.
$$

Column block ``b`` (columns ``[b * block_size, (b + 1) * block_size)``) is
``jax.random.normal(jax.random.fold_in(key, b), (sketch_dim, block_size), dtype)
/ sqrt(sketch_dim)``; the last block is generated in full and truncated at
``num_params``. So $\\Pi$ is a pure function of
``(key, sketch_dim, num_params, block_size, dtype)``: any column range equals
the same slice of the full matrix, and a gradient sketched in row chunks gives
the same features as one sketched all at once.

References:
    Clustered Influence Functions, section 3 (eq. (5)) and appendix C.

    Johnson, W. B. and Lindenstrauss, J. Extensions of Lipschitz mappings into
    a Hilbert space. Contemporary Mathematics 26, 1984.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..core.checks import as_int, as_key

__all__ = ["DEFAULT_BLOCK_SIZE", "jl_projection", "sketch"]

DEFAULT_BLOCK_SIZE: int = 4096
"""Number of columns of $\\Pi$ generated per block.

The projection depends on it (each block is drawn from its own folded key), so
a cache of sketches must record it alongside the key and ``sketch_dim``. 4096
columns keep one block small (``sketch_dim * 4096`` floats: 4 MiB at
``sketch_dim=256`` in float32) while making each block's matmul large enough to
amortise the per-block loop overhead.
"""


def _block(key: PRNGKeyArray, block: Any, sketch_dim: int, block_size: int, dtype: Any) -> Array:
    """Column block ``block`` of the projection: ``(sketch_dim, block_size)``."""
    block_key = jax.random.fold_in(key, block)
    draws = jax.random.normal(block_key, (sketch_dim, block_size), dtype)
    return draws / math.sqrt(sketch_dim)


@functools.partial(jax.jit, static_argnames=("sketch_dim", "length", "block_size", "dtype"))
def _projection_columns(
    key: PRNGKeyArray, start: Array, *, sketch_dim: int, length: int, block_size: int, dtype: Any
) -> Array:
    # `start` is traced so that ranges of equal length share one compilation;
    # enough blocks are generated to cover `length` columns at any offset.
    num_blocks = (length + 2 * (block_size - 1)) // block_size
    first = start // block_size
    blocks = (first + jnp.arange(num_blocks, dtype=first.dtype)).astype(jnp.uint32)
    columns = jax.vmap(lambda b: _block(key, b, sketch_dim, block_size, dtype))(blocks)
    columns = jnp.moveaxis(columns, 0, 1).reshape(sketch_dim, num_blocks * block_size)
    return jax.lax.dynamic_slice_in_dim(columns, start - first * block_size, length, axis=1)


def jl_projection(
    key: PRNGKeyArray,
    sketch_dim: int,
    num_params: int,
    start: int = 0,
    stop: int | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dtype: Any = None,
) -> Float[Array, "d cols"]:
    """Columns ``[start, stop)`` of the Gaussian JL matrix $\\Pi$ (eq. (5)).

    $\\Pi \\in \\mathbb{R}^{d \\times p}$ has entries
    $\\mathcal{N}(0, 1/d)$ (appendix C). It is never stored: the column
    blocks covering ``[start, stop)`` are regenerated from ``key`` (block ``b``
    from ``jax.random.fold_in(key, b)``) and sliced, so every column range is the
    same slice of the full matrix. The matrix depends on ``key``, ``sketch_dim``,
    ``block_size`` and ``dtype`` (float32 and float64 draws are different
    random numbers, not roundings of each other).

    Args:
        key: a PRNG key, ``jax.random.key(seed)`` or legacy ``jax.random.PRNGKey``.
        sketch_dim: ``d``, the number of rows (sketch dimension).
        num_params: ``p``, the number of columns of the full matrix.
        start: first column returned.
        stop: one past the last column returned; ``None`` means ``num_params``.
        block_size: columns per generated block; see ``DEFAULT_BLOCK_SIZE``.
        dtype: floating dtype of the entries; ``None`` uses JAX's default float.

    Returns:
        Array of shape ``(sketch_dim, stop - start)``.

    Examples:
        >>> import jax
        >>> full = jl_projection(jax.random.key(0), 8, 10, block_size=4)
        >>> part = jl_projection(jax.random.key(0), 8, 10, 3, 7, block_size=4)
        >>> bool((full[:, 3:7] == part).all())
        True

    References:
        Clustered Influence Functions, eq. (5) and appendix C.
    """
    key = as_key(key)
    sketch_dim = as_int(sketch_dim, "sketch_dim", minimum=1)
    num_params = as_int(num_params, "num_params", minimum=1)
    block_size = as_int(block_size, "block_size", minimum=1)
    start = as_int(start, "start", minimum=0)
    stop = num_params if stop is None else as_int(stop, "stop", minimum=0)
    if stop > num_params:
        raise ValueError(
            f"`stop` must be <= num_params={num_params}, got stop={stop}; "
            "use `stop=None` for the last column."
        )
    if start >= stop:
        raise ValueError(
            f"Need start < stop to select at least one column, got start={start}, stop={stop}."
        )
    if dtype is None:
        dtype = jnp.zeros((), float).dtype  # JAX's default float (float64 under x64)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`dtype` must be a floating dtype, got {dtype}.")
    return _projection_columns(
        key,
        jnp.asarray(start),
        sketch_dim=sketch_dim,
        length=stop - start,
        block_size=block_size,
        dtype=dtype,
    )


@functools.partial(jax.jit, static_argnames=("sketch_dim", "block_size"))
def _sketch(grads: Array, key: PRNGKeyArray, *, sketch_dim: int, block_size: int) -> Array:
    num_rows, num_params = grads.shape
    dtype = grads.dtype
    # Accumulate at least in float32 so half-precision gradients do not lose
    # the sum over thousands of blocks; the result is cast back at the end.
    acc_dtype = jnp.promote_types(dtype, jnp.float32)

    def project(grad_block: Array, proj_block: Array) -> Array:
        # (N, k) @ (k, d): one term of the accumulation rule of appendix C.
        return jnp.matmul(
            grad_block,
            proj_block.T,
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=acc_dtype,
        )

    num_full, remainder = divmod(num_params, block_size)

    def body(b: Array, acc: Array) -> Array:
        grad_block = jax.lax.dynamic_slice_in_dim(grads, b * block_size, block_size, axis=1)
        proj_block = _block(key, b.astype(jnp.uint32), sketch_dim, block_size, dtype)
        return acc + project(grad_block, proj_block)

    acc = jnp.zeros((num_rows, sketch_dim), acc_dtype)
    if num_full > 0:
        acc = jax.lax.fori_loop(0, num_full, body, acc)
    if remainder > 0:
        # Last, short block: generate it in full and keep its first `remainder`
        # columns, which equals zero-padding the gradients to a whole block.
        proj_block = _block(key, jnp.uint32(num_full), sketch_dim, block_size, dtype)
        acc = acc + project(grads[:, num_full * block_size :], proj_block[:, :remainder])
    return acc.astype(dtype)


def sketch(
    grads: Float[Array, "n p"],
    key: PRNGKeyArray,
    sketch_dim: int,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Float[Array, "n d"]:
    """Streamed JL sketch $h_i = \\Pi g_i$ of each row of ``grads`` (eq. (5)).

    Equals ``grads @ jl_projection(key, sketch_dim, p, block_size=block_size,
    dtype=grads.dtype).T`` but never materialises $\\Pi$: a ``lax.fori_loop``
    over column blocks regenerates one ``(sketch_dim, block_size)`` block at a time
    and adds its contribution (the streamed accumulation of appendix C). Each row
    is projected independently, so sketching gradients in row chunks gives the
    same features as sketching them all at once (up to float rounding).

    Matmuls use ``precision=HIGHEST``; the result has the dtype of ``grads`` (half
    precision inputs are accumulated in float32). Jitted, with ``sketch_dim`` and
    ``block_size`` static. The whole projection is regenerated on every call
    (``O(sketch_dim * p)`` random draws), so pass reasonably large row chunks.

    Args:
        grads: per-example gradients, shape ``(N, p)``, floating.
        key: PRNG key defining $\\Pi$; use the same key for every chunk.
        sketch_dim: ``d``, the sketch dimension.
        block_size: columns of $\\Pi$ per block; part of the projection's
            definition (see ``DEFAULT_BLOCK_SIZE``).

    Returns:
        Sketched gradients of shape ``(N, sketch_dim)``, dtype of ``grads``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> g = jnp.ones((3, 10))
        >>> sketch(g, jax.random.key(0), 4, block_size=4).shape
        (3, 4)

    References:
        Clustered Influence Functions, eq. (5) and appendix C.
    """
    key = as_key(key)
    sketch_dim = as_int(sketch_dim, "sketch_dim", minimum=1)
    block_size = as_int(block_size, "block_size", minimum=1)
    if not hasattr(grads, "shape") or not hasattr(grads, "dtype"):
        grads = jnp.asarray(grads)
    if grads.ndim != 2:
        raise ValueError(
            f"`grads` must be 2-D with shape (num_examples, num_params), got shape "
            f"{grads.shape}; flatten each example's gradient (e.g. with "
            "`jax.flatten_util.ravel_pytree`) and stack them."
        )
    if not jnp.issubdtype(grads.dtype, jnp.floating):
        raise TypeError(
            f"`grads` must be a floating array, got dtype {grads.dtype}; cast it, "
            "e.g. `grads.astype(jnp.float32)`."
        )
    if grads.shape[1] < 1:
        raise ValueError("`grads` must have at least one column (num_params >= 1).")
    return _sketch(jnp.asarray(grads), key, sketch_dim=sketch_dim, block_size=block_size)
