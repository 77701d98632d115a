"""Chunk sizes from a memory budget: the plan fits, grows with the budget, and is refused when nothing fits."""

import equinox as eqx
import jax.numpy as jnp
import pytest
from _models import N, mlp_problem

import cif_jax as cj
from cif_jax.core.ggn import apply_undamped
from cif_jax.core.plan import parse_bytes


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
