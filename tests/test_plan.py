"""Chunk sizes from a memory budget: the plan fits, grows with the budget, and is refused when nothing fits."""

import equinox as eqx
import jax.numpy as jnp
import pytest
from _models import N, mlp_problem

import cif_jax as cj
from cif_jax.core.ggn import apply_undamped
from cif_jax.core.plan import parse_bytes

# The plans read compiled programs' memory, which XLA's passes decide: compiled as users compile.
pytestmark = pytest.mark.usefixtures("xla_optimized")


def _temp(task, bs, k):
    v = jnp.zeros((k, task.num_params), task.dtype)
    return eqx.filter_jit(apply_undamped).lower(task, bs, v, None).compile().compiled.memory_analysis() \
        .temp_size_in_bytes


def test_plan_fits_its_budget_and_grows_with_it():
    task = mlp_problem().task
    small_need = _temp(task, 16, 1)
    plans = [cj.plan_batches(task, memory_budget=f * small_need, max_rhs_batch_size=8, min_batch_size=16)
             for f in (1, 3, 40)]
    for plan in plans:
        assert plan.temp_bytes <= plan.budget_bytes
        assert 16 <= plan.batch_size <= N and 1 <= plan.rhs_batch_size <= 8
        # The reported figure is the compiled program's, measured independently here.
        assert plan.temp_bytes == _temp(task, plan.batch_size, plan.rhs_batch_size)
    sizes = [p.batch_size * p.rhs_batch_size for p in plans]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
    assert plans[-1].rhs_batch_size == 8  # a generous budget takes the largest block


def test_plan_refuses_a_budget_below_one_product():
    task = mlp_problem().task
    with pytest.raises(ValueError, match="raise the budget"):
        cj.plan_batches(task, memory_budget=16, min_batch_size=16)


@pytest.mark.parametrize("value, want", [(1024, 1024), ("2GiB", 2 * 2**30), ("1.5 MB", 1_500_000), ("512mib", 2**29)])
def test_parse_bytes(value, want):
    assert parse_bytes(value) == want


@pytest.mark.parametrize("value", [0, -5, "lots", "3 parsecs", True])
def test_parse_bytes_refuses(value):
    with pytest.raises(ValueError, match="memory_budget"):
        parse_bytes(value)


# ---- batch_size=None: chunks sized for a memory budget (never all N unless all N fit) ----

from cif_jax.core import chunks as _chunks  # noqa: E402


def _wide(c):
    # Per example: a (1000,) float32 intermediate (4,000 bytes), then its sum.
    return jnp.sum(c[:, None] * jnp.ones((1, 1000), c.dtype), axis=1)


def test_chunk_bytes_reads_the_traced_program():
    x = jnp.ones((64,), jnp.float32)
    one, two = _chunks.chunk_bytes(_wide, x, 1), _chunks.chunk_bytes(_wide, x, 2)
    # The (B, 1000) product and its broadcast operands are the only arrays that grow with B.
    assert 4_000 <= two - one <= 3 * 4_000


def test_budget_batch_size_is_all_when_all_fit_else_a_power_of_two_that_fits():
    x = jnp.ones((64,), jnp.float32)
    per = _chunks.chunk_bytes(_wide, x, 2) - _chunks.chunk_bytes(_wide, x, 1)
    fixed = _chunks.chunk_bytes(_wide, x, 1) - per
    assert _chunks.budget_batch_size(_wide, x, budget=10**9) == 64
    for budget in (fixed + 5 * per, fixed + 16 * per, fixed + 40 * per):
        b = _chunks.budget_batch_size(_wide, x, budget=budget)
        assert b & (b - 1) == 0 and fixed + b * per <= budget < fixed + 2 * b * per
    assert _chunks.budget_batch_size(_wide, x, budget=1) == 1  # nothing fits: one example at a time


def test_default_chunks_give_the_unchunked_result():
    x = jnp.arange(3000, dtype=jnp.float32) / 3000
    # 3,000 examples x ~12 kB each exceed no budget of the default's size; force chunking with a small one.
    b = _chunks.budget_batch_size(_wide, x, budget=2**20)
    assert 1 < b < 3000
    chunked = _chunks.chunk_sum(lambda c: jnp.sum(_wide(c)), x, b)
    assert jnp.allclose(chunked, jnp.sum(_wide(x)), rtol=1e-5)


def test_block_product_chunks_see_the_block(monkeypatch):
    # The GGN block product's chunk size for batch_size=None falls as the block widens: the
    # vectors are vmapped inside each chunk, where the budget reads them.
    from cif_jax.core.ggn import ggn_block_fn

    task = mlp_problem().task
    seen = {}
    choose = _chunks.budget_batch_size

    def spy(fn, tree, budget=_chunks.DEFAULT_MEMORY_BUDGET):
        seen["per"] = _chunks.chunk_bytes(fn, tree, 2) - _chunks.chunk_bytes(fn, tree, 1)
        return choose(fn, tree, budget)

    monkeypatch.setattr(_chunks, "budget_batch_size", spy)

    def per_example(k):
        ggn_block_fn(task)(jnp.zeros((k, task.num_params), task.dtype))
        return seen["per"]

    assert per_example(16) > 8 * per_example(1)
