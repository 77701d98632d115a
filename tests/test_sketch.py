"""Tests for the streamed Gaussian JL sketch (eq. (5), appendix C)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cif_jax.cif.sketch import DEFAULT_BLOCK_SIZE, jl_projection, sketch


def _reference_projection(key, sketch_dim, num_params, block_size, dtype):
    """The full matrix straight from its definition: one draw per block, in numpy."""
    num_blocks = math.ceil(num_params / block_size)
    blocks = [
        np.asarray(
            jax.random.normal(jax.random.fold_in(key, b), (sketch_dim, block_size), dtype)
            / math.sqrt(sketch_dim)
        )
        for b in range(num_blocks)
    ]
    return np.concatenate(blocks, axis=1)[:, :num_params]


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_full_projection_matches_definition(getkey, dtype):
    key = getkey()
    got = jl_projection(key, 6, 30, block_size=7, dtype=dtype)  # 30 = 4 * 7 + 2
    assert got.shape == (6, 30)
    assert got.dtype == dtype
    # Up to an ulp or two: XLA may turn the division by sqrt(d) under jit into a
    # multiplication by its reciprocal.
    rtol = 4 * np.finfo(dtype).eps
    np.testing.assert_allclose(np.asarray(got), _reference_projection(key, 6, 30, 7, dtype), rtol=rtol)


def test_column_ranges_are_slices_of_full_matrix(getkey):
    key = getkey()
    full = np.asarray(jl_projection(key, 6, 30, block_size=7))  # blocks of 7, last one short (2)
    ranges = [
        (3, 6),  # inside one block
        (5, 8),  # across a block boundary
        (27, 30),  # into the short last block
        (28, 30),  # exactly the short last block
        (0, 16),  # whole blocks and a partial one
        (2, 18),  # across several blocks
        (14, 30),  # from a block edge to the end
    ]
    for start, stop in ranges:
        part = jl_projection(key, 6, 30, start, stop, block_size=7)
        assert part.shape == (6, stop - start)
        np.testing.assert_array_equal(np.asarray(part), full[:, start:stop])
    np.testing.assert_array_equal(np.asarray(jl_projection(key, 6, 30, 14, block_size=7)), full[:, 14:])


def test_projection_statistics(getkey):
    d, p = 64, 20_000
    entries = np.asarray(jl_projection(getkey(), d, p, block_size=1000)).ravel()
    n = entries.size  # 1.28e6 draws
    # Standard error of the mean is sqrt(1/d / n) ~ 1.1e-4 and of the variance
    # (1/d) * sqrt(2 / n) ~ 1.9e-5 (1.25% relative); allow about 5 standard errors.
    assert abs(entries.mean()) < 5 * math.sqrt(1 / d / n)
    assert abs(entries.var() * d - 1) < 5 * math.sqrt(2 / n)


def test_default_dtype_and_keys(getkey):
    key = getkey()
    assert jl_projection(key, 6, 30, block_size=7).dtype == jnp.float64  # x64 on in tests
    assert jl_projection(key, 6, 30, block_size=7, dtype=jnp.float32).dtype == jnp.float32
    other = jl_projection(getkey(), 6, 30, block_size=7)
    assert not np.allclose(jl_projection(key, 6, 30, block_size=7), other)
    # Legacy uint32 keys give the same matrix as typed keys with the same data.
    np.testing.assert_array_equal(
        np.asarray(jl_projection(jax.random.key(7), 6, 30, block_size=7)),
        np.asarray(jl_projection(jax.random.PRNGKey(7), 6, 30, block_size=7)),
    )


@pytest.mark.parametrize(
    "num_params, block_size",
    [(30, 7), (28, 7), (100, DEFAULT_BLOCK_SIZE)],
    ids=["remainder", "multiple", "p<default-block"],
)
def test_sketch_matches_explicit_projection_x64(getkey, num_params, block_size):
    key = getkey()
    grads = np.random.default_rng(num_params).normal(size=(9, num_params))
    proj = _reference_projection(key, 4, num_params, block_size, np.float64)
    got = sketch(grads, key, 4, block_size=block_size)
    assert got.shape == (9, 4) and got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), grads @ proj.T, rtol=1e-12, atol=1e-12)


def test_sketch_float32(getkey):
    key = getkey()
    grads = np.random.default_rng(0).normal(size=(12, 1000)).astype(np.float32)
    got = sketch(jnp.asarray(grads), key, 16, block_size=64)
    assert got.dtype == jnp.float32
    proj = _reference_projection(key, 16, 1000, 64, np.float32).astype(np.float64)
    expected = grads.astype(np.float64) @ proj.T
    # Relative to the size of the features (entries ~ sqrt(p/d) ~ 8).
    err = np.abs(np.asarray(got, np.float64) - expected).max() / np.abs(expected).max()
    assert err < 1e-5


def test_sketch_row_chunks_equal_full_call(getkey):
    key = getkey()
    grads = jnp.asarray(np.random.default_rng(1).normal(size=(20, 50)))
    full = np.asarray(sketch(grads, key, 8, block_size=16))
    chunks = [sketch(grads[i : i + 5], key, 8, block_size=16) for i in range(0, 20, 5)]
    np.testing.assert_allclose(np.concatenate(chunks), full, rtol=1e-12, atol=1e-12)
    single = np.stack([np.asarray(sketch(grads[i : i + 1], key, 8, block_size=16))[0] for i in range(3)])
    np.testing.assert_allclose(single, full[:3], rtol=1e-12, atol=1e-12)


def test_sketch_preserves_pairwise_distances():
    # 30 vectors in p=3000, d=256, fixed key. For a fixed difference x,
    # ||Pi x||^2 / ||x||^2 ~ chi^2_d / d. By the Laurent-Massart bounds,
    # P(ratio^2 < 0.49) <= exp(-16.6) and P(ratio^2 > 1.69) <= exp(-18.8), so a
    # distance ratio outside [0.7, 1.3] has probability below ~7e-8 per pair, and
    # below 3e-5 over the 435 pairs: the bound is loose yet not vacuous (the
    # typical spread of the ratio is sqrt(1/(2d)) ~ 0.044).
    vectors = np.random.default_rng(123).normal(size=(30, 3000))
    sketched = np.asarray(sketch(vectors, jax.random.key(0), 256))
    ratios = [
        np.linalg.norm(sketched[i] - sketched[j]) / np.linalg.norm(vectors[i] - vectors[j])
        for i, j in itertools.combinations(range(30), 2)
    ]
    assert 0.7 <= min(ratios) and max(ratios) <= 1.3
    assert abs(np.mean(ratios) - 1) < 0.05


def test_sketch_under_outer_jit(getkey):
    key = getkey()
    grads = jnp.asarray(np.random.default_rng(1).normal(size=(20, 50)))
    jitted = jax.jit(lambda g, k: sketch(g, k, 8, block_size=16))
    np.testing.assert_allclose(
        np.asarray(jitted(grads, key)), np.asarray(sketch(grads, key, 8, block_size=16)), rtol=1e-12
    )


def test_projection_errors(getkey):
    key = getkey()
    with pytest.raises(ValueError, match="sketch_dim"):
        jl_projection(key, 0, 10)
    with pytest.raises(TypeError, match="sketch_dim"):
        jl_projection(key, 2.0, 10)
    with pytest.raises(ValueError, match="num_params"):
        jl_projection(key, 2, 0)
    with pytest.raises(ValueError, match="start"):
        jl_projection(key, 2, 10, -1)
    with pytest.raises(ValueError, match="stop"):
        jl_projection(key, 2, 10, 0, 11)
    with pytest.raises(ValueError, match="start < stop"):
        jl_projection(key, 2, 10, 5, 5)
    with pytest.raises(ValueError, match="block_size"):
        jl_projection(key, 2, 10, block_size=0)
    with pytest.raises(TypeError, match="dtype"):
        jl_projection(key, 2, 10, dtype=jnp.int32)
    with pytest.raises(TypeError, match="key"):
        jl_projection(0, 2, 10)


def test_sketch_errors(getkey):
    key = getkey()
    grads = jnp.ones((3, 10))
    with pytest.raises(ValueError, match="grads.*2-D"):
        sketch(jnp.ones(10), key, 2)
    with pytest.raises(ValueError, match="grads.*2-D"):
        sketch(jnp.ones((2, 3, 4)), key, 2)
    with pytest.raises(TypeError, match="grads.*floating"):
        sketch(jnp.ones((3, 10), jnp.int32), key, 2)
    with pytest.raises(ValueError, match="num_params"):
        sketch(jnp.ones((3, 0)), key, 2)
    with pytest.raises(ValueError, match="sketch_dim"):
        sketch(grads, key, 0)
    with pytest.raises(TypeError, match="sketch_dim"):
        sketch(grads, key, True)
    with pytest.raises(ValueError, match="block_size"):
        sketch(grads, key, 2, block_size=0)
    with pytest.raises(TypeError, match="key"):
        sketch(grads, "not a key", 2)
