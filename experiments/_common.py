"""Shared pieces of the paper-experiment scripts (never imported by the library).

Every script follows the protocol of ``cif-jax cv`` (``cif_jax/workloads/cli.py``): the
training settings of ``cif_jax.workloads.cli.TRAINING``, a trained checkpoint cached under
``benchmarks/_work`` (``benchmarks/common.trained_task``), the damped GGN with
damping 1e-3, CG with a *true* relative residual tolerance used identically by
IF and CiF, fold workloads from ``cif_jax.workloads.folds.kfold_indices(N, K, seed=seed + K)``
and fold scores ``Delta l(S_k; S_k)`` (removing a fold, the change of that fold's
mean loss).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings
from typing import NamedTuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402

import cif_jax as cj  # noqa: E402
from cif_jax.core.checkpoint import atomic_write  # noqa: E402
from cif_jax.workloads import folds as cfolds  # noqa: E402
from cif_jax.workloads import runs, stats  # noqa: E402
from cif_jax.workloads.runs import machine, timed  # noqa: E402,F401  (shared with the benchmarks)

#: Trained checkpoints, shared with the benchmarks (the same protocol, so the same models).
WORKDIR = os.path.join(ROOT, "benchmarks", "_work")


def trained_task(dataset: str, model: str, *, seed: int = 0, subsample_n: int | None = None):
    """:func:`cif_jax.workloads.runs.trained_task` with checkpoints under ``benchmarks/_work``."""
    return runs.trained_task(dataset, model, workdir=WORKDIR, seed=seed, subsample_n=subsample_n)

def checkpoint_path(dataset: str, model: str, seed: int = 0) -> str:
    """Where :func:`trained_task` keeps the trained model of ``(dataset, model, seed)``."""
    from cif_jax.workloads.training import TRAINING

    return os.path.join(WORKDIR, f"{dataset}-{model}-seed{seed}-e{TRAINING[dataset][0]}.ckpt")


RESULTS = os.path.join(ROOT, "experiments", "results")


def parser(description: str, *, dataset: str = "digits") -> argparse.ArgumentParser:
    """Arguments common to every experiment; scripts add their own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="reduced CPU setting (minutes on 2 cores)")
    p.add_argument("--dataset", default=None, help=f"digits, mnist5k, mnist, cifar10 (quick default: {dataset})")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--rtol", type=float, default=None,
                   help="CG true relative residual, IF and CiF alike (quick: 1e-3; full: 1e-4)")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--rhs-batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=RESULTS)
    return p


def finish_args(args, *, quick_dataset: str = "digits", full_dataset: str = "mnist5k"):
    args.dataset = args.dataset or (quick_dataset if args.quick else full_dataset)
    if args.rtol is None:
        # The paper's IF uses 1e-7; a float32 true residual stalls well above that, so the
        # full setting uses the library default 1e-4 and the quick one 1e-3 (both recorded).
        args.rtol = 1e-3 if args.quick else 1e-4
    return args


def solver_kwargs(args, preconditioner="auto") -> dict:
    """``damping``, ``batch_size`` and a ``cj.CG`` solver from the command line (``preconditioner`` as
    ``cj.CG``: the library's default "auto", None for plain CG, or a built one)."""
    return dict(damping=args.damping, batch_size=args.batch_size,
                solver=cj.CG(rtol=args.rtol, max_steps=args.max_steps, rhs_batch_size=args.rhs_batch_size,
                             preconditioner=preconditioner))


def nystrom(task, args):
    """The shared Nystrom preconditioner (adaptive rank) and its build seconds."""
    t0 = time.perf_counter()
    pre = cj.nystrom_preconditioner(cj.DampedGGN(task, damping=args.damping, batch_size=args.batch_size),
                                    key=jax.random.fold_in(jax.random.key(args.seed), 1), rank="auto",
                                    rhs_batch_size=args.rhs_batch_size)
    jax.block_until_ready(pre)
    seconds = time.perf_counter() - t0
    return pre, {"kind": "nystrom", "rank": int(pre.rank), "seconds": seconds,
                 "condition_estimate": float(pre.condition_estimate(args.damping))}


def shared_nystrom(cells, task, args, key: str, needed):
    """The shared Nystrom preconditioner and its info, built only if a cell in ``needed`` is missing.

    Its build seconds are those of the run that first built it (stored under ``key``);
    a rebuild on resume draws from the same key, so it is the same preconditioner.
    """
    if all(k in cells for k in needed):
        return None, cells.values[key]
    pre, built = nystrom(task, args)
    return pre, cells(key, lambda: built)


def folds_for(n: int, k: int, seed: int):
    return cfolds.kfold_indices(n, k, seed=seed + k)


def build_cache(task, args, *, num_clusters: int, sketch_dim: int = 32, normalize: bool = False,
                preconditioner="auto", seed: int | None = None, correction="calibrated"):
    """A CiF cache (with the library's default correction unless told otherwise); warnings
    (dominant cluster) are returned, not printed. ``preconditioner`` as ``cj.CG`` (None: plain CG)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = cj.build_cache(task, num_clusters=num_clusters, sketch_dim=sketch_dim,
                               key=jax.random.key(args.seed if seed is None else seed),
                               normalize_sketches=normalize, correction=correction,
                               **solver_kwargs(args, preconditioner))
    return cache, [str(w.message) for w in caught]


def cif_fold_scores(cache, task, folds, args):
    """The corrected CiF fold scores (the library default) and their seconds."""
    t0 = time.perf_counter()
    scores = np.asarray(jax.block_until_ready(cj.fold_loss_delta(cache, task, folds, batch_size=args.batch_size)))
    return scores, time.perf_counter() - t0


class FoldEstimates(NamedTuple):
    """One cache's answers on one fold workload (K folds)."""

    corrected: np.ndarray | None  #: (K,) the paper's score plus the cached self terms (None without a correction)
    paper: np.ndarray  #: (K,) eq. 11
    paper_matrix: np.ndarray  #: (K, K) eq. 11's fold matrix (cross-fold off the diagonal)
    default_matrix: np.ndarray | None  #: (K, K) the library default's (``estimator="hybrid"``), None without factors
    seconds: float  #: the queries' wall time (both matrices)

    @property
    def default(self) -> np.ndarray | None:
        """(K,) the default estimator's fold scores (the diagonal of its matrix)."""
        return None if self.default_matrix is None else np.diag(self.default_matrix).copy()


def cif_fold_estimators(cache, task, folds, args) -> FoldEstimates:
    """Every estimator's fold scores and fold matrix from one cache: one gradient pass for the
    K x C alphas gives the paper's fold matrix (cross-fold off the diagonal, eq. 11 on it); the
    correction adds the cached self terms to the diagonal; a cache with low-rank factors also
    answers with the library default (``estimator="hybrid"``: the deviations through the factors)."""
    t0 = time.perf_counter()
    matrix = np.asarray(jax.block_until_ready(cj.fold_matrix(cache, task, folds, batch_size=args.batch_size,
                                                             estimator="paper")))
    paper = np.diag(matrix).copy()
    corrected = default = None
    if cache.correction is not None:
        corrected = paper + np.asarray(cj.overlap_correction(cache, folds, folds, estimator="corrected"))
    if cache.lowrank is not None and cache.lowrank.rank > 0:
        default = np.asarray(jax.block_until_ready(cj.fold_matrix(cache, task, folds, batch_size=args.batch_size)))
    return FoldEstimates(corrected, paper, matrix, default, time.perf_counter() - t0)


def off_diagonal_agreement(cif_matrix, if_matrix) -> dict:
    """Pearson and Spearman over the K(K-1) cross-fold pairs (remove fold t, evaluate fold v != t)."""
    off = ~np.eye(cif_matrix.shape[0], dtype=bool)
    a, b = cif_matrix[off], if_matrix[off]
    return {"pairs": int(off.sum()), "pearson": stats.pearson(a, b), "spearman": stats.spearman(a, b),
            "median_ratio": float(np.median(a / b))}


def if_fold_scores(task, folds, args, preconditioner="auto", *, return_solutions: bool = False,
                   return_matrix: bool = False):
    """Per-query IF on every fold: one damped-GGN solve per fold, then g_V . Delta theta.

    ``return_matrix`` adds IF's fold matrix ``M[t, v] = g_{S_v} . Delta theta_{S_t}`` (cross-fold
    off the diagonal), free from the same solves.
    """
    t0 = time.perf_counter()
    res = cj.influence_solve(task, folds, **solver_kwargs(args, preconditioner))
    g_eval = cj.mean_subset_gradients(task, folds, batch_size=args.batch_size)
    matrix = np.asarray(jax.block_until_ready(jax.numpy.matmul(res.solutions, g_eval.T)))
    scores = np.diag(matrix).copy()
    seconds = time.perf_counter() - t0
    info = {"seconds": seconds, "max_residual": float(np.max(res.residuals)),
            "mean_steps": float(np.mean(res.num_steps)), "all_converged": bool(np.all(res.converged))}
    out = (scores, info)
    if return_solutions:
        out = out + (res.solutions,)
    if return_matrix:
        out = out + (matrix,)
    return out


def correlation_matrix(scores: dict, methods) -> np.ndarray:
    """Methods x methods: Spearman above the diagonal, Pearson below, ones on it (the paper's Fig. 2 layout)."""
    from scipy.stats import pearsonr, spearmanr

    mat = np.eye(len(methods))
    for a in range(len(methods)):
        for b in range(a + 1, len(methods)):
            u, v = scores[methods[a]], scores[methods[b]]
            mat[a, b] = spearmanr(u, v).statistic
            mat[b, a] = pearsonr(u, v).statistic
    return mat


def correlations(a, b, *, resamples: int, seed: int = 0) -> dict:
    c = stats.bootstrap_correlations(a, b, num_resamples=resamples, seed=seed)
    return {"pearson": c["pearson"]._asdict(), "spearman": c["spearman"]._asdict()}


def cache_timing(cache) -> dict:
    return {name: float(t) for name, t in cache.timings}


def task_info(task, ds, args) -> dict:
    return {"dataset": args.dataset, "model": args.model, "num_train": int(task.num_examples),
            "num_params": int(task.num_params), "dtype": str(task.dtype), "damping": args.damping,
            "rtol": args.rtol, "max_steps": args.max_steps, "seed": args.seed}


def write(name: str, args, result: dict) -> str:
    """Writes ``<output>/<name>[-quick].json`` with the machine and the command."""
    os.makedirs(args.output, exist_ok=True)
    result = {"experiment": name, "quick": bool(args.quick),
              "command": "python " + " ".join(shlex.quote(a) for a in
                                              [os.path.relpath(os.path.abspath(sys.argv[0]), ROOT), *sys.argv[1:]]),
              "machine": machine(), "load_average_1_5_15min_at_end": list(os.getloadavg()), "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **result}
    path = os.path.join(args.output, f"{stem(name, args)}.json")
    # Atomic: a resumable run never reads a half-written file.
    atomic_write(path, lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"wrote {os.path.relpath(path, ROOT)}")
    return path


class Cells:
    """Resumable results: each finished cell is written to disk at once; a restart skips it.

    ``cells(key, compute)`` returns the stored value of ``key`` if an earlier run finished
    it, else calls ``compute()`` and writes the value (atomically, with every other
    finished cell) to ``<output>/<stem>.cells.json`` before returning it. The file
    records ``settings``: a restart with other settings is refused (delete the file
    or pass other ``--output``), so cells from two protocols never mix. Values must be
    JSON (dicts, lists, numbers); the seconds inside a cell are those of the run that
    computed it, with that run's machine and load average beside them.
    """

    def __init__(self, name: str, args, settings: dict):
        os.makedirs(args.output, exist_ok=True)
        self.path = os.path.join(args.output, f"{stem(name, args)}.cells.json")
        self.settings = json.loads(json.dumps(settings))
        self.values, self.runs, self.models = {}, [], {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                saved = json.load(f)
            if saved["settings"] != self.settings:
                changed = sorted(k for k in set(saved["settings"]) | set(self.settings)
                                 if saved["settings"].get(k) != self.settings.get(k))
                raise SystemExit(f"{os.path.relpath(self.path, ROOT)} was written with other settings "
                                 f"(differ: {changed}); delete it or pass another --output")
            self.values, self.runs = saved["cells"], saved["runs"]
            self.models = saved.get("models", {})
            print(f"resuming {os.path.relpath(self.path, ROOT)}: {len(self.values)} cells done")
        self.runs.append({"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
                          "argv": sys.argv[1:]})

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def check_model(self, name: str, task) -> None:
        """Refuses to resume cells computed on another trained model than ``task``'s.

        A checkpoint retrained on another machine (another CPU, another XLA) is another model:
        cells of its IF must never meet a cache of this one. The task's fingerprint (params and
        data) is recorded under ``name`` the first time; a later run with another is refused.
        A file with cells but no record (written before this check) is refused too.
        """
        fp = cj.fingerprint(task)
        saved = self.models.get(name)
        if saved is None and self.values and not self.models:
            raise SystemExit(f"{os.path.relpath(self.path, ROOT)} holds cells but no record of the trained model they "
                             "were computed on (written before this check), so they cannot be matched to this one. "
                             "Delete the file, or pass another --output, to recompute them.")
        if saved is not None and saved != fp:
            raise SystemExit(f"{os.path.relpath(self.path, ROOT)}: its cells for {name!r} were computed on another "
                             "trained model (task fingerprint differs; a checkpoint retrained elsewhere is another "
                             "model). Delete the file, or pass another --output, to recompute them.")
        if saved is None:
            self.models[name] = fp
            self._write()

    def _write(self):
        runs.write_json(self.path, {"settings": self.settings, "runs": self.runs, "cells": self.values,
                                    "models": self.models})

    def __call__(self, key: str, compute):
        if key not in self.values:
            value = json.loads(json.dumps(compute()))
            self.values[key] = value
            self.runs[-1]["load_average_at_last_cell"] = list(os.getloadavg())
            self._write()
        return self.values[key]


def stem(name: str, args) -> str:
    return f"{name}-{args.dataset}" + ("-quick" if args.quick else "")


def figure_path(name: str, args, suffix: str = "") -> str:
    os.makedirs(args.output, exist_ok=True)
    return os.path.join(args.output, f"{stem(name, args)}{suffix}.png")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
