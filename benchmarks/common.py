"""Shared pieces of the benchmark scripts: the work folder and the library's run helpers."""

from __future__ import annotations

import os

from cif_jax.workloads import runs
from cif_jax.workloads.runs import machine, timed  # noqa: F401  (re-exported for the scripts)

WORKDIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_work")


def trained_task(dataset: str, model: str, *, seed: int = 0, subsample_n: int | None = None):
    """:func:`cif_jax.workloads.runs.trained_task` with checkpoints under ``benchmarks/_work``."""
    return runs.trained_task(dataset, model, workdir=WORKDIR, seed=seed, subsample_n=subsample_n)
