"""Chunk sizes from a memory budget, read off XLA's compiled programs.

The GGN product over a block of k vectors, in chunks of B examples, is the inner
loop of every solve; its working memory grows with B and k. Instead of a
constant, :func:`plan_batches` asks XLA: it compiles the block product for a few
small (B, k), reads each program's temporary-buffer size
(``Compiled.memory_analysis()``), fits ``temp(B, k) ~ a + b B + c B k`` (the
linearisation is per example, the tangents per example and vector), picks the
largest sizes predicted to fit, and compiles that choice once more to check it
(halving B while it does not fit). Nothing is run; only compiled.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from . import checks as _checks
from . import curvature as _curvature
from .ggn import apply_undamped
from .task import Task

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class BatchPlan(NamedTuple):
    """Chunk sizes for the GGN block products.

    Attributes:
        batch_size: examples per chunk (B).
        rhs_batch_size: vectors per block (k).
        temp_bytes: XLA's temporary memory for the chosen (B, k), from the compiled program.
        argument_bytes: the program's inputs (data, parameters, the block of vectors).
        budget_bytes: the budget asked for.
    """

    batch_size: int
    rhs_batch_size: int
    temp_bytes: int
    argument_bytes: int
    budget_bytes: int


def parse_bytes(value) -> int:
    """``2**30``, ``"1GiB"``, ``"512 MB"`` -> bytes."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"`memory_budget` must be positive, got {value}.")
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            out = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
            if out > 0:
                return out
    raise ValueError(f"`memory_budget` must be a positive byte count or a string like '2GiB', got {value!r}.")


def _measure(task, batch_size, k, curvature):
    v = jnp.zeros((k, task.num_params), task.dtype)
    compiled = eqx.filter_jit(apply_undamped).lower(task, batch_size, v, curvature).compile()
    mem = compiled.compiled.memory_analysis()
    return int(mem.temp_size_in_bytes), int(mem.argument_size_in_bytes)


def plan_batches(
    task: Task,
    *,
    memory_budget,
    max_rhs_batch_size: int = 32,
    min_batch_size: int = 16,
    curvature=None,
) -> BatchPlan:
    """The largest ``(batch_size, rhs_batch_size)`` whose block GGN product fits ``memory_budget``.

    The block size k is chosen first (up to ``max_rhs_batch_size``, powers of two):
    one pass over the data then serves k systems. The chunk size B is then the
    largest power of two (or N) that fits beside it. The budget covers XLA's
    temporary buffers of one product; the data and parameters themselves
    (``argument_bytes``) are reported, not counted.

    Args:
        task: the model snapshot and training data.
        memory_budget: bytes, or a string such as ``"2GiB"``.
        max_rhs_batch_size: the largest block of vectors to consider.
        min_batch_size: the smallest chunk considered; if even ``(min_batch_size, 1)``
            does not fit, a ``ValueError`` says so.
        curvature: a :class:`cif_jax.CurvatureSample` (its examples are the ones chunked).

    Returns:
        A `BatchPlan`; pass ``batch_size`` and ``rhs_batch_size`` on to
        :func:`cif_jax.solve_ggn`, :func:`cif_jax.estimators.influence`, :func:`cif_jax.build_cache`.
    """
    _checks.task(task)
    budget = parse_bytes(memory_budget)
    max_k = _checks.positive_int(max_rhs_batch_size, "max_rhs_batch_size")
    min_b = _checks.positive_int(min_batch_size, "min_batch_size")
    curvature = _curvature.check(curvature, task.num_examples, task.dtype)
    n = task.num_examples if curvature is None else int(curvature.indices.shape[0])
    b0 = min(min_b, n)
    b1 = min(2 * b0, n)
    t00, _ = _measure(task, b0, 1, curvature)
    if t00 > budget:
        raise ValueError(
            f"`memory_budget` = {budget:,} bytes is below one product's temporary memory at batch_size={b0}, "
            f"rhs_batch_size=1 ({t00:,} bytes); raise the budget."
        )
    k1 = min(4, max_k)
    t01, _ = _measure(task, b0, k1, curvature) if k1 > 1 else (t00, 0)
    t10, _ = _measure(task, b1, 1, curvature) if b1 > b0 else (t00, 0)
    # temp(B, k) = a + b B + c B k, fitted to the three probes.
    c = (t01 - t00) / (b0 * (k1 - 1)) if k1 > 1 else 0.0
    slope = (t10 - t00) / (b1 - b0) if b1 > b0 else (t00 / b0)
    b = max(slope - c, 0.0)
    a = t00 - (b + c) * b0

    def predict(bs, k):
        return a + b * bs + c * bs * k

    k = 1
    while 2 * k <= max_k and predict(b0, 2 * k) <= budget:
        k *= 2
    candidates = sorted({n} | {2**i for i in range(int(np.log2(max(b0, 1))), int(np.log2(n)) + 1) if 2**i <= n})
    candidates = [s for s in candidates if s >= b0]
    bs = max([s for s in candidates if predict(s, k) <= budget], default=b0)
    while True:
        temp, args = _measure(task, bs, k, curvature)
        if temp <= budget or bs <= b0:
            break
        bs = max(b0, bs // 2)
    while temp > budget and k > 1:
        k //= 2
        temp, args = _measure(task, bs, k, curvature)
    return BatchPlan(bs, k, temp, args, budget)
