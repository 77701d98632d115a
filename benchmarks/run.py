"""The cif_jax benchmark suite: real workloads, side by side, reported as ratios.

    python benchmarks/run.py --config quick      # digits + LeNet-5 (8x8), ~15 min on 2 CPU cores
    python benchmarks/run.py --config full       # mnist5k + LeNet-5 (28x28), the issue's setting

Writes ``benchmarks/results/<config>-<platform>.json`` and ``.md`` (and a PNG of the
sweeps), each stating the machine that produced them. Every comparison is made in
the same run, on the same trained model, operator, damping and true CG tolerance.
``--only`` runs some sections (their figures replace those sections in the files).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import machine, timed, trained_task

import cif_jax as cj
from cif_jax.core.chunks import chunk_sum
from cif_jax.core.ggn import apply_undamped
from cif_jax.core.gradients import streamed_sum
from cif_jax.workloads import folds as cfolds
from cif_jax.workloads import stats

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

CONFIGS = {
    "quick": dict(dataset="digits", model="lenet5", damping=1e-3, rtol=1e-4, batch_size=512, rhs_block=16,
                  ranks=(25, 50, 100, 200), cache_rank="auto", block_ks=(1, 2, 4, 8, 16, 32), num_rhs=8,
                  cache_clusters=(10, 50), if_serial_sample=6, ks=(50, 100), sweep_models=("mlp", "lenet5"),
                  sweep_clusters=(5, 10, 20, 50), curvature_fractions=(0.125, 0.25, 0.5, 1.0)),
    "full": dict(dataset="mnist5k", model="lenet5", damping=1e-3, rtol=1e-4, batch_size=500, rhs_block=16,
                 ranks=(50, 100, 200, 400), cache_rank="auto", block_ks=(1, 4, 16, 32), num_rhs=8,
                 cache_clusters=(10, 50), if_serial_sample=3, ks=(50, 100), sweep_models=("mlp", "lenet5"),
                 sweep_clusters=(10, 50), curvature_fractions=(0.25, 0.5, 1.0)),
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -------------------------------------------------------------------------------------- pieces


@eqx.filter_jit
def _full_gradient(task, batch_size):
    """One full-batch gradient of the summed loss, chunked like the GGN products."""
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(task.params)

    def chunk(c):
        x, y = c
        return jax.grad(lambda fp: jnp.sum(task.loss_fn(task.apply_fn(unravel(fp), x), y)))(flat)

    return chunk_sum(chunk, (task.inputs, task.targets), batch_size)


@eqx.filter_jit
def _per_example_pass(task, batch_size):
    """Per-example gradients of all N examples (vmap), summed chunk by chunk so nothing (N, p) is kept."""
    total, _ = streamed_sum(task, lambda g, _: jnp.sum(g * g, axis=0), jnp.zeros(task.num_examples, jnp.int8),
                            batch_size)
    return total


def _fold_rhs(task, num, seed=0):
    n = task.num_examples
    folds = cfolds.kfold_indices(n, 50, seed=seed)[:num]
    return folds, cj.subset_gradient_sums(task, folds)


# -------------------------------------------------------------------------------------- sections


def section_products(task, cfg, state):
    bs = cfg["batch_size"]
    t_grad, _ = timed(lambda: _full_gradient(task, bs), repeats=3)
    t_pex, _ = timed(lambda: _per_example_pass(task, bs), repeats=2)
    rows = []
    t_one = None
    for k in cfg["block_ks"]:
        v = jax.random.normal(jax.random.key(k), (k, task.num_params), task.dtype)
        compiled = eqx.filter_jit(apply_undamped).lower(task, bs, v, None).compile()
        mem = compiled.compiled.memory_analysis()
        t, _ = timed(lambda: apply_undamped(task, bs, v, None), repeats=max(2, 16 // k))
        if k == 1:
            t_one = t
        rows.append({"k": k, "seconds_per_vector": t / k, "per_vector_vs_k1": (t / k) / t_one if t_one else None,
                     "temp_bytes": int(mem.temp_size_in_bytes)})
        log(f"  block k={k}: {t / k * 1e3:.1f} ms/vector, temp {mem.temp_size_in_bytes / 2**20:.0f} MiB")
    return {
        "full_gradient_seconds": t_grad,
        "ggn_product_seconds": t_one,
        "ggn_product_over_gradient": t_one / t_grad,
        "per_example_pass_seconds": t_pex,
        "per_example_throughput_over_full_batch": t_grad / t_pex,
        "block_products": rows,
    }


def _timed_solve(task, rhs, cfg, rows, pre, name, build_seconds, extra):
    """Solves the fold right-hand sides with ``pre`` (compiled first), appends a row of figures to ``rows``."""
    kw = dict(damping=cfg["damping"], batch_size=cfg["batch_size"], warn=False)
    cg = dict(rtol=cfg["rtol"], rhs_batch_size=cfg["num_rhs"], preconditioner=pre)
    cj.solve_ggn(task, rhs, solver=cj.CG(**cg, max_steps=1), **kw)  # compile (settings are traced: same program)
    t, res = timed(lambda: cj.solve_ggn(task, rhs, solver=cj.CG(**cg), **kw), warmup=False)
    _record(rows, name, build_seconds, t / rhs.shape[0], res.num_steps, res.residuals, extra)
    return res


def _record(rows, name, build_seconds, seconds_per_solve, steps, residuals, extra):
    """Appends one row of solve figures to ``rows`` and logs it."""
    row = {"preconditioner": name, "build_seconds": build_seconds, "mean_iterations": float(steps.mean()),
           "max_iterations": int(steps.max()), "max_residual": float(residuals.max()),
           "seconds_per_solve": seconds_per_solve, **extra}
    rows.append(row)
    log(f"  {name}: {row['mean_iterations']:.1f} iterations, {row['seconds_per_solve']:.2f} s/solve, "
        f"build {build_seconds:.1f} s")


def section_preconditioners(task, cfg, state):
    lam, bs = cfg["damping"], cfg["batch_size"]
    _, rhs = _fold_rhs(task, cfg["num_rhs"])
    rows = []

    def solve(pre, name, build_seconds, extra):
        return _timed_solve(task, rhs, cfg, rows, pre, name, build_seconds, extra)

    base = solve(None, "none", 0.0, {})
    t, jac = timed(lambda: cj.jacobi_preconditioner(cj.DampedGGN(task, damping=lam, batch_size=64)))
    solve(jac, "jacobi", t, {})
    # Compile the block products once (a build of rank = one block); builds below are then timed warm.
    op = cj.DampedGGN(task, damping=lam, batch_size=bs)
    cj.nystrom_preconditioner(op, key=jax.random.key(0), rank=cfg["rhs_block"], rhs_batch_size=cfg["rhs_block"],
                              error_iters=1)
    for r in cfg["ranks"]:
        t, ny = timed(lambda: cj.nystrom_preconditioner(op, key=jax.random.key(r), rank=r,
                                                        rhs_batch_size=cfg["rhs_block"]),
                      warmup=False)
        solve(ny, f"nystrom r={r}", t, {"rank": r, "products": ny.num_products,
                                        "condition_estimate": ny.condition_estimate(lam)})
        state.setdefault("nystrom", {})[r] = (ny, t)
    t, ny = timed(lambda: cj.nystrom_preconditioner(op, key=jax.random.key(7), rank="auto",
                                                    rhs_batch_size=cfg["rhs_block"]), warmup=False)
    state.setdefault("nystrom", {})["auto"] = (ny, t)
    solve(ny, f"nystrom auto (r={ny.rank})", t, {"rank": ny.rank, "products": ny.num_products,
                                                 "condition_estimate": ny.condition_estimate(lam)})
    for row in rows:
        row["iterations_vs_plain"] = row["mean_iterations"] / float(base.num_steps.mean())
    return {"rows": rows, "num_rhs": int(rhs.shape[0])}


def _shared_nystrom(task, cfg, state):
    r = cfg["cache_rank"]
    if r in state.get("nystrom", {}):
        return state["nystrom"][r]
    # Timed warm, as every solve and cache build here: a first build compiles the block
    # products and the factorisations of every rank the adaptive rule visits.
    op = cj.DampedGGN(task, damping=cfg["damping"], batch_size=cfg["batch_size"])
    build = lambda key: cj.nystrom_preconditioner(op, key=jax.random.key(key), rank=r, rhs_batch_size=cfg["rhs_block"])
    t_first, _ = timed(lambda: build(0), warmup=False)
    t, ny = timed(lambda: build(7), warmup=False)
    log(f"  shared Nystrom (rank {ny.rank}): {t:.1f} s warm, first build (compiling) {t_first:.1f} s")
    state.setdefault("nystrom", {})[r] = (ny, t)
    state.setdefault("nystrom_first_seconds", {})[r] = t_first
    return ny, t


def _build(task, cfg, c, pre, key=0):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cj.build_cache(task, correction=None, num_clusters=c, sketch_dim=32, damping=cfg["damping"], key=jax.random.key(key),
                              solver=cj.CG(rtol=cfg["rtol"], rhs_batch_size=cfg["rhs_block"], preconditioner=pre), batch_size=cfg["batch_size"])


def section_cache(task, cfg, state):
    lam, rtol, bs = cfg["damping"], cfg["rtol"], cfg["batch_size"]
    _, rhs = _fold_rhs(task, 2, seed=1)
    kw = dict(damping=lam, batch_size=bs, warn=False)
    cj.solve_ggn(task, rhs[:1], solver=cj.CG(rtol=rtol, rhs_batch_size=1, preconditioner=None, max_steps=2), **kw)
    t_plain, res = timed(lambda: cj.solve_ggn(task, rhs[1:2], solver=cj.CG(rtol=rtol, rhs_batch_size=1,
                                                                            preconditioner=None), **kw), warmup=False)
    log(f"  one plain single-RHS solve: {t_plain:.2f} s, {int(res.num_steps[0])} iterations")
    ny, t_ny = _shared_nystrom(task, cfg, state)
    rows = []
    for c in cfg["cache_clusters"]:
        _build(task, cfg, c, ny)  # compile
        t, cache = timed(lambda: _build(task, cfg, c, ny), warmup=False)
        total = t + t_ny
        rows.append({"C": c, "preconditioner": f"nystrom r={ny.rank}", "build_seconds": t,
                     "preconditioner_seconds": t_ny, "solve_phase_seconds": cache.timing["solves"],
                     "mean_iterations": float(cache.num_steps.mean()),
                     "max_residual": float(cache.residuals.max()), "total_over_one_plain_solve": total / t_plain,
                     "cache_over_one_plain_solve_excluding_preconditioner": t / t_plain})
        log(f"  C={c}: cache {t:.1f} s + Nystrom {t_ny:.1f} s = {total / t_plain:.2f} x one plain solve")
        state[f"cache{c}"] = cache
    c = cfg["cache_clusters"][0]
    _build(task, cfg, c, None)
    t, cache = timed(lambda: _build(task, cfg, c, None), warmup=False)
    rows.append({"C": c, "preconditioner": "none", "build_seconds": t, "preconditioner_seconds": 0.0,
                 "solve_phase_seconds": cache.timing["solves"], "mean_iterations": float(cache.num_steps.mean()),
                 "max_residual": float(cache.residuals.max()), "total_over_one_plain_solve": t / t_plain,
                 "cache_over_one_plain_solve_excluding_preconditioner": t / t_plain})
    log(f"  C={c} plain: {t:.1f} s = {t / t_plain:.2f} x one plain solve")
    return {"one_plain_solve_seconds": t_plain, "one_plain_solve_iterations": int(res.num_steps[0]),
            "rank": ny.rank, "nystrom_first_build_seconds": state["nystrom_first_seconds"][cfg["cache_rank"]],
            "rows": rows}


def section_folds(task, cfg, state):
    lam, rtol, bs = cfg["damping"], cfg["rtol"], cfg["batch_size"]
    n = task.num_examples
    folds = {k: cfolds.kfold_indices(n, k, seed=k) for k in cfg["ks"]}
    every = [f for k in cfg["ks"] for f in folds[k]]
    q = len(every)
    ny, t_ny = _shared_nystrom(task, cfg, state)
    c = cfg["cache_clusters"][0]
    # CiF end to end: preconditioner + cache + both K workloads (eval gradients included).
    cj.fold_loss_delta(state[f"cache{c}"], task, folds[cfg["ks"][0]], batch_size=bs)
    start = time.perf_counter()
    cache = _build(task, cfg, c, ny)
    cif = np.concatenate([np.asarray(cj.fold_loss_delta(cache, task, folds[k], batch_size=bs)) for k in cfg["ks"]])
    t_cif = time.perf_counter() - start + t_ny
    # IF, fair: shared preconditioner and blocks of right-hand sides, every fold.
    kw = dict(damping=lam, batch_size=bs)
    cj.influence_solve(task, every[: cfg["rhs_block"]], solver=cj.CG(rtol=rtol, rhs_batch_size=cfg["rhs_block"],
                                                                     preconditioner=ny, max_steps=1), **kw)  # compile
    cj.mean_subset_gradients(task, every, batch_size=bs)
    start = time.perf_counter()
    res = cj.influence_solve(task, every, solver=cj.CG(rtol=rtol, rhs_batch_size=cfg["rhs_block"], preconditioner=ny),
                             **kw)
    g = cj.mean_subset_gradients(task, every, batch_size=bs)
    if_fair = np.asarray(jnp.sum(res.solutions * g, axis=1))
    t_fair = time.perf_counter() - start + t_ny
    # IF, the paper's way: one plain solve per fold, serially (timed on a sample, extrapolated).
    sample = list(range(0, q, max(1, q // cfg["if_serial_sample"])))[: cfg["if_serial_sample"]]
    cj.influence_solve(task, [every[0]], solver=cj.CG(rtol=rtol, rhs_batch_size=1, max_steps=2, preconditioner=None),
                       **kw)
    start = time.perf_counter()
    res_s = cj.influence_solve(task, [every[i] for i in sample],
                               solver=cj.CG(rtol=rtol, rhs_batch_size=1, preconditioner=None), **kw)
    g_s = cj.mean_subset_gradients(task, [every[i] for i in sample], batch_size=bs)
    if_serial_sample = np.asarray(jnp.sum(res_s.solutions * g_s, axis=1))
    t_serial = (time.perf_counter() - start) * q / len(sample)
    agree_serial_fair = float(np.max(np.abs(if_serial_sample - if_fair[sample]) / np.abs(if_fair[sample])))
    corr = {k: stats.bootstrap_correlations(cif[i], if_fair[i], num_resamples=2000, seed=0)
            for k, i in _fold_slices(cfg["ks"], folds).items()}
    log(f"  CiF {t_cif:.1f} s, IF fair {t_fair:.1f} s, IF serial plain ~{t_serial:.1f} s (extrapolated)")
    return {
        "num_folds": q, "C": c, "rank": ny.rank,
        "cif_seconds": t_cif, "if_fair_seconds": t_fair, "if_serial_plain_seconds_extrapolated": t_serial,
        "if_serial_sample_folds": len(sample), "speedup_vs_serial_plain": t_serial / t_cif,
        "speedup_vs_fair": t_fair / t_cif, "fair_vs_serial": t_serial / t_fair,
        "if_fair_mean_iterations": float(res.num_steps.mean()), "if_serial_mean_iterations":
            float(res_s.num_steps.mean()), "if_serial_vs_fair_max_rel_diff": agree_serial_fair,
        "agreement": {str(k): {"pearson": v["pearson"].value, "spearman": v["spearman"].value}
                      for k, v in corr.items()},
    }


def _fold_slices(ks, folds):
    out, start = {}, 0
    for k in ks:
        out[k] = np.arange(start, start + len(folds[k]))
        start += len(folds[k])
    return out


def _ring_queries(n, num, m, seed):
    """``num`` subsets of size m, each m consecutive entries (cyclically) of one random permutation."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    starts = rng.integers(0, n, num)
    return perm[(starts[:, None] + np.arange(m)[None, :]) % n]


def section_queries(task, cfg, state):
    cache = state[f"cache{cfg['cache_clusters'][0]}"]
    n = task.num_examples
    m = max(1, n // 100)
    out = {"subset_size": m}
    g = cj.mean_subset_gradients(task, [np.arange(m)])[0]
    alphas = cj.cluster_alphas(cache, g)
    for num in (10**4, 10**6):
        qs = _ring_queries(n, num, m, seed=num)
        per_query = np.random.default_rng(0).normal(size=(num, cache.num_clusters)).astype(np.float32)
        t_shared, _ = timed(lambda: cj.loss_delta_from_alphas(cache, qs, alphas), repeats=2)
        t_per, _ = timed(lambda: cj.loss_delta_from_alphas(cache, qs, per_query), repeats=2)
        out[f"loss_from_alphas_{num}"] = {"seconds": t_shared, "queries_per_second": num / t_shared,
                                          "per_query_alphas_seconds": t_per}
        log(f"  {num} loss queries from alphas: {num / t_shared:,.0f}/s (per-query alphas {num / t_per:,.0f}/s)")
    num = 10**4
    qs = _ring_queries(n, num, m, seed=1)
    t, _ = timed(lambda: cj.param_delta(cache, qs), repeats=2)
    out["param_delta_10000"] = {"seconds": t, "queries_per_second": num / t,
                                "output_bytes": int(num * task.num_params * 4)}
    log(f"  {num} parameter deltas: {num / t:,.0f}/s")
    return out


def section_sweeps(task, cfg, state):
    bs = cfg["batch_size"]
    n_full = task.num_examples
    out = {"N": [], "p": [], "C": [], "Q": []}
    for frac in (0.25, 0.5, 1.0):
        n = int(n_full * frac)
        sub, _ = trained_task(cfg["dataset"], cfg["model"], subsample_n=n)
        v = jax.random.normal(jax.random.key(0), (1, sub.num_params), sub.dtype)
        t_prod, _ = timed(lambda: apply_undamped(sub, bs, v, None), repeats=3)
        t_pex, _ = timed(lambda: _per_example_pass(sub, bs), repeats=2)
        out["N"].append({"N": n, "ggn_product_seconds": t_prod, "per_example_pass_seconds": t_pex})
        log(f"  N={n}: product {t_prod:.3f} s, per-example pass {t_pex:.3f} s")
    for name in cfg["sweep_models"]:
        sub, _ = trained_task(cfg["dataset"], name)
        v = jax.random.normal(jax.random.key(0), (1, sub.num_params), sub.dtype)
        t_prod, _ = timed(lambda: apply_undamped(sub, bs, v, None), repeats=3)
        t_pex, _ = timed(lambda: _per_example_pass(sub, bs), repeats=2)
        t_grad, _ = timed(lambda: _full_gradient(sub, bs), repeats=3)
        out["p"].append({"model": name, "p": sub.num_params, "ggn_product_seconds": t_prod,
                         "per_example_pass_seconds": t_pex, "full_gradient_seconds": t_grad})
        log(f"  {name} p={sub.num_params}: product {t_prod:.3f} s, per-example pass {t_pex:.3f} s")
    ny, _ = _shared_nystrom(task, cfg, state)
    for c in cfg["sweep_clusters"]:
        _build(task, cfg, c, ny)  # compile this C's shapes
        cache = _build(task, cfg, c, ny)
        out["C"].append({"C": c, "build_seconds": cache.timing["total"], "solve_seconds": cache.timing["solves"],
                         "timings": cache.timing})
        log(f"  C={c}: build {cache.timing['total']:.1f} s (solves {cache.timing['solves']:.1f} s)")
    cache = state[f"cache{cfg['cache_clusters'][0]}"]
    m = max(1, n_full // 100)
    alphas = jnp.ones(cache.num_clusters, cache.responses.dtype)
    for num in (10**2, 10**3, 10**4, 10**5, 10**6):
        qs = _ring_queries(n_full, num, m, seed=num)
        t, _ = timed(lambda: cj.loss_delta_from_alphas(cache, qs, alphas), repeats=2)
        out["Q"].append({"Q": num, "seconds": t})
    return out


def _peak_rss_bytes():
    """This process's peak resident set (VmHWM: per address space, so not inherited from a parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memory_child(dataset, model, n, cfg_name):
    cfg = CONFIGS[cfg_name]
    task, _ = trained_task(dataset, model, subsample_n=n)
    jax.block_until_ready(task.inputs)
    base = _peak_rss_bytes()
    cache = _build(task, {**cfg, "rtol": 1e-3}, 10, None)
    jax.block_until_ready(cache.responses)
    peak = _peak_rss_bytes()
    print(json.dumps({"N": n, "p": task.num_params, "baseline_bytes": base, "peak_bytes": peak,
                      "grads_matrix_bytes": n * task.num_params * 4, "sketch_bytes": n * 32 * 4}))


def section_memory(task, cfg, state, cfg_name):
    rows = []
    for frac in (0.25, 0.5, 1.0):
        n = int(task.num_examples * frac)
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(n), "--config", cfg_name]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["growth_bytes"] = row["peak_bytes"] - row["baseline_bytes"]
        rows.append(row)
        log(f"  N={n}: peak {row['peak_bytes'] / 2**20:.0f} MiB, above baseline {row['growth_bytes'] / 2**20:.0f} "
            f"MiB, (N, p) gradients would be {row['grads_matrix_bytes'] / 2**20:.0f} MiB")
    return {"rows": rows, "note": "peak RSS of a subprocess building a C = 10 cache (rtol 1e-3), minus its RSS "
                                  "after loading the model and data"}


def section_curvature(task, cfg, state):
    n = task.num_examples
    k = cfg["ks"][0]
    folds = cfolds.kfold_indices(n, k, seed=k)
    c = cfg["cache_clusters"][0]
    full = None
    rows = []
    for frac in sorted(cfg["curvature_fractions"], reverse=True):
        m = int(n * frac)
        curv = None if m == n else cj.uniform_sample(n, size=m, key=jax.random.key(m))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cache = cj.build_cache(task, correction=None, num_clusters=c, sketch_dim=32, damping=cfg["damping"],
                                   key=jax.random.key(0), solver=cj.CG(rtol=cfg["rtol"], rhs_batch_size=cfg["rhs_block"]), batch_size=cfg["batch_size"],
                                   curvature=curv)
        scores = np.asarray(cj.fold_loss_delta(cache, task, folds, batch_size=cfg["batch_size"]))
        if full is None:
            full = (scores, cache)
        row = {"M": m, "fraction": frac, "solve_seconds": cache.timing["solves"],
               "max_residual": float(cache.residuals.max()), "max_iterations": int(cache.num_steps.max()),
               "pearson_vs_full": stats.pearson(scores, full[0]), "spearman_vs_full": stats.spearman(scores, full[0]),
               "response_rel_diff_vs_full": float(jnp.linalg.norm(cache.responses - full[1].responses)
                                                  / jnp.linalg.norm(full[1].responses))}
        rows.append(row)
        log(f"  M={m}: Spearman {row['spearman_vs_full']:.3f}, response diff {row['response_rel_diff_vs_full']:.3f}")
    return {"K": k, "C": c, "rows": rows}


def section_sharding(task, cfg, state):
    try:
        import bench_sharding
    except ImportError as err:
        return {"skipped": f"benchmarks/bench_sharding.py not available: {err}"}
    return bench_sharding.main()


# Combinations of (E)K-FAC with a Nystrom sketch (issue 9, item 3), measured here before any is
# offered by the library. "split": Nystrom of the whitened operator B = S (I + GGN/lambda) S,
# S = (P/lambda)^{-1/2}, deflating B's top eigenvalues: M^{-1} = S (I + U (s_r/s - 1) U^T) S.
# "complement": the exact inverse on a Nystrom subspace of the GGN, (E)K-FAC on its orthogonal
# complement: M^{-1} = U (1 + s/lambda)^{-1} U^T + (I - U U^T) lambda P^{-1} (I - U U^T).
# Both are symmetric positive definite; CG stops on the true residual as for every preconditioner.


def _combination_inverse(combo, lam):
    from cif_jax.solvers.kfac import inverse, inverse_sqrt

    kind, pre, ut, s = combo
    if kind == "split":
        root = inverse_sqrt(pre, lam)
        factor = s[-1] / s - 1

        def apply(r):
            z = root(r)
            return root(z + ((z @ ut.T) * factor[None, :]) @ ut)

        return apply
    p_inv = inverse(pre, lam)
    weight = 1 / (1 + s / jnp.asarray(lam, s.dtype))

    def apply(r):
        c = r @ ut.T
        z = p_inv(r - c @ ut)
        return (c * weight[None, :]) @ ut + z - (z @ ut.T) @ ut

    return apply


@eqx.filter_jit
def _combination_solve(task, rhs, lam, rtol, max_steps, batch_size, combo):
    from cif_jax.core.ggn import ggn_matvec_fn
    from cif_jax.solvers.cg import solve_system as _solve_system

    mv = jax.vmap(ggn_matvec_fn(task, batch_size=batch_size))
    return _solve_system(mv, _combination_inverse(combo, lam), rhs, lam, rtol, 0.0, max_steps, 3)


def _split_sketch(task, pre, rank, cfg, key):
    """Nystrom factors (U^T, s) of the whitened operator ``S (I + GGN/lambda) S``."""
    from cif_jax.solvers import precondition as cpre
    from cif_jax.solvers.kfac import inverse_sqrt

    lam = cfg["damping"]
    root = jax.jit(inverse_sqrt(pre, lam))
    q = cpre._orthonormal_block_jit(key, None, rank, task.num_params, task.dtype)
    w = root(q)
    kernel = cj.DampedGGN(task, damping=lam, batch_size=cfg["batch_size"]).kernel()
    y = root(w + cpre._products(kernel, w, cfg["rhs_block"], None) / lam)
    ut, s, ok = cpre._nystrom_factor(q, y)
    if not bool(ok):
        raise FloatingPointError("the Nystrom factorisation of the whitened operator failed")
    return ut, s


def _timed_combination(task, rhs, cfg, rows, combo, name, build_seconds, extra):
    args = (task, rhs, cfg["damping"], cfg["rtol"])
    _combination_solve(*args, 1, cfg["batch_size"], combo)[0].block_until_ready()  # compile
    t, (_, res, steps, _) = timed(lambda: _combination_solve(*args, 1000, cfg["batch_size"], combo), warmup=False)
    _record(rows, name, build_seconds, t / rhs.shape[0], steps, res, extra)


def section_kfac(task, cfg, state):
    """K-FAC and EK-FAC: as preconditioners of the exact solves, with a Nystrom sketch, and as estimators."""
    from cif_jax.solvers import precondition as cpre
    from cif_jax.solvers.kfac.blocks import top_directions

    lam, rtol, bs, block = cfg["damping"], cfg["rtol"], cfg["batch_size"], cfg["rhs_block"]
    n = task.num_examples
    _, rhs = _fold_rhs(task, cfg["num_rhs"])
    rows = []

    def solve(pre, name, build_seconds, extra):
        return _timed_solve(task, rhs, cfg, rows, pre, name, build_seconds, extra)

    base = solve(None, "none", 0.0, {})
    built = {}
    for kind, fn in (("kfac", cj.kfac_preconditioner), ("ekfac", cj.ekfac_preconditioner)):
        start = time.perf_counter()
        fn(cj.DampedGGN(task, damping=lam, batch_size=64))  # the first build compiles its passes
        cold = time.perf_counter() - start
        t, pre = timed(lambda: fn(cj.DampedGGN(task, damping=lam, batch_size=64)), warmup=False)
        built[kind] = (pre, t)
        solve(pre, kind, t, {"build_cold_seconds": cold, "blocks": len(pre.layers)})
    # A Nystrom sketch whose test matrix is K-FAC's top eigenvectors, against a random one of the same rank.
    r = cfg.get("kfac_rank", 100)
    op = cj.DampedGGN(task, damping=lam, batch_size=bs)
    cj.nystrom_preconditioner(op, key=jax.random.key(0), rank=block, rhs_batch_size=block,
                              error_iters=0)  # compile the block products
    random_sketch = {}  # rank -> (build seconds, Nystrom preconditioner with a random test matrix)
    for rank in (r, 2 * r):
        random_sketch[rank] = timed(lambda: cj.nystrom_preconditioner(
            op, key=jax.random.key(rank), rank=rank, rhs_batch_size=block, error_iters=0),
            warmup=False)
        solve(random_sketch[rank][1], f"nystrom r={rank}, random test matrix", random_sketch[rank][0], {"rank": rank})
    for kind in ("kfac", "ekfac"):
        pre, t_pre = built[kind]

        def guided():
            q = jnp.asarray(top_directions(pre, r))
            ut, s, _ = cpre._nystrom_factor(q, cpre._products(op.kernel(), q, block, None))
            return cj.NystromPreconditioner(ut, s, jnp.asarray(jnp.nan, q.dtype), cj.fingerprint(task), "full", r, 0.0)

        t, ny_k = timed(guided, warmup=False)
        solve(ny_k, f"nystrom r={r}, {kind} top eigenvectors as test matrix", t + t_pre,
              {"rank": r, "sketch_seconds": t})
    # Item 3: (E)K-FAC with a low-rank Nystrom correction, both ways round, at ranks r and 2r.
    for rank, (t_ny, ny_r) in random_sketch.items():
        for kind in ("kfac", "ekfac"):
            pre, t_pre = built[kind]
            t_sk, (ut, s_w) = timed(lambda: _split_sketch(task, pre, rank, cfg, jax.random.key(rank)), warmup=False)
            _timed_combination(task, rhs, cfg, rows, ("split", pre, ut, s_w),
                               f"{kind}, Nystrom r={rank} of the {kind}-whitened operator", t_pre + t_sk,
                               {"rank": rank, "whitened_top": float(s_w[0]), "whitened_s_r": float(s_w[-1])})
            _timed_combination(task, rhs, cfg, rows, ("complement", pre, ny_r.basis, ny_r.eigenvalues),
                               f"nystrom r={rank}, {kind} on its complement", t_pre + t_ny, {"rank": rank})
    for row in rows:
        row["iterations_vs_plain"] = row["mean_iterations"] / float(base.num_steps.mean())

    # The approximate estimators against the exact damped-GGN influence, on all folds of K = 50.
    folds = cfolds.kfold_indices(n, 50, seed=0)
    t_sums, sums = timed(lambda: cj.subset_gradient_sums(task, folds, batch_size=bs), warmup=False)
    t_ref, ref = timed(lambda: cj.nystrom_preconditioner(cj.DampedGGN(task, damping=lam, batch_size=bs),
                                                         key=jax.random.key(200), rank=200, rhs_batch_size=block),
                       warmup=False)
    kw = dict(damping=lam, batch_size=bs, warn=False)
    cg = dict(rtol=rtol, rhs_batch_size=block, preconditioner=ref)
    cj.solve_ggn(task, sums, solver=cj.CG(**cg, max_steps=1), **kw)
    t_exact, exact = timed(lambda: cj.solve_ggn(task, sums, solver=cj.CG(**cg), **kw), warmup=False)
    exact_scores = np.asarray(jnp.sum(sums * exact.solutions, axis=1)) / n
    estimators = []
    for kind in ("ekfac", "kfac"):
        pre, t_pre = built[kind]
        t_apply, approx = timed(lambda: cj.ekfac_solve(pre, sums, damping=lam))
        scores = np.asarray(jnp.sum(sums * approx, axis=1)) / n
        est = {"estimator": kind, "build_seconds": t_pre, "apply_seconds": t_apply,
               "total_seconds": t_pre + t_sums + t_apply,
               "spearman": stats.spearman(scores, exact_scores), "pearson": stats.pearson(scores, exact_scores),
               "median_score_ratio": float(np.median(scores / exact_scores)),
               "solution_rel_error": float(jnp.linalg.norm(approx - exact.solutions)
                                           / jnp.linalg.norm(exact.solutions))}
        estimators.append(est)
        log(f"  {kind} estimator: Spearman {est['spearman']:.3f}, score ratio {est['median_score_ratio']:.2f}, "
            f"{est['total_seconds']:.1f} s")
    return {"rows": rows, "num_rhs": int(rhs.shape[0]), "rank": r, "estimators": estimators, "num_folds": 50,
            "exact_seconds": t_ref + t_sums + t_exact, "exact_mean_iterations": float(exact.num_steps.mean()),
            "exact_max_residual": float(exact.residuals.max())}


def section_precision(task, cfg, state):
    """Mixed precision (``product_dtype=``): cheap products in the CG iterations, residuals in full precision.

    Two cases side by side: a float64 copy of the task with float32 products (a
    tolerance float32 alone cannot reach, and one it can), and the float32 task
    with bfloat16 products. Each row: mean iterations (refinement restarts
    included), largest true residual in the task's dtype, seconds per solve.
    """
    from cif_jax.solvers.cg import cast_floats

    bs = cfg["batch_size"]
    _, rhs32 = _fold_rhs(task, cfg["num_rhs"])
    rows = []
    with jax.enable_x64(True):
        t64 = cj.Task(task.apply_fn, task.loss_fn, cast_floats(task.params, jnp.float64),
                      cast_floats(task.inputs, jnp.float64), task.targets)
        rhs64 = rhs32.astype(jnp.float64)
        cases = [(t64, rhs64, jnp.float64, None, 1e-8), (t64, rhs64, jnp.float64, jnp.float32, 1e-8),
                 (t64, rhs64, jnp.float64, None, cfg["rtol"]), (t64, rhs64, jnp.float64, jnp.float32, cfg["rtol"])]
        for t, rhs, dt, low, rtol in cases:
            kw = dict(damping=cfg["damping"], batch_size=bs, warn=False)
            cg = dict(rtol=rtol, rhs_batch_size=cfg["num_rhs"], product_dtype=low, preconditioner=None)
            cj.solve_ggn(t, rhs, solver=cj.CG(**cg, max_steps=1, max_restarts=0), **kw)  # compile
            sec, res = timed(lambda: cj.solve_ggn(t, rhs, solver=cj.CG(**cg, max_restarts=12, max_steps=4000), **kw),
                             warmup=False)
            rows.append({"task_dtype": jnp.dtype(dt).name, "product_dtype": jnp.dtype(low or dt).name, "rtol": rtol,
                         "mean_iterations": float(res.num_steps.mean()), "max_residual": float(res.residuals.max()),
                         "converged": int(res.converged.sum()), "seconds_per_solve": sec / rhs.shape[0]})
            log(f"  {rows[-1]['task_dtype']} task, {rows[-1]['product_dtype']} products, rtol {rtol:g}: "
                f"{rows[-1]['mean_iterations']:.0f} iterations, residual {rows[-1]['max_residual']:.2g}, "
                f"{rows[-1]['seconds_per_solve']:.2f} s/solve")
    for low in (None, jnp.bfloat16):
        kw = dict(damping=cfg["damping"], batch_size=bs, warn=False)
        cg = dict(rtol=cfg["rtol"], rhs_batch_size=cfg["num_rhs"], product_dtype=low, preconditioner=None)
        cj.solve_ggn(task, rhs32, solver=cj.CG(**cg, max_steps=1, max_restarts=0), **kw)
        sec, res = timed(lambda: cj.solve_ggn(task, rhs32, solver=cj.CG(**cg, max_restarts=12, max_steps=4000), **kw),
                         warmup=False)
        rows.append({"task_dtype": "float32", "product_dtype": jnp.dtype(low or jnp.float32).name, "rtol": cfg["rtol"],
                     "mean_iterations": float(res.num_steps.mean()), "max_residual": float(res.residuals.max()),
                     "converged": int(res.converged.sum()), "seconds_per_solve": sec / rhs32.shape[0]})
        log(f"  float32 task, {rows[-1]['product_dtype']} products: {rows[-1]['mean_iterations']:.0f} iterations, "
            f"residual {rows[-1]['max_residual']:.2g}, {rows[-1]['seconds_per_solve']:.2f} s/solve")
    for r in rows:
        base = next(b for b in rows if b["task_dtype"] == r["task_dtype"] and b["rtol"] == r["rtol"]
                    and b["product_dtype"] == r["task_dtype"])
        r["time_vs_full_precision"] = r["seconds_per_solve"] / base["seconds_per_solve"]
    return {"num_rhs": int(rhs32.shape[0]), "rows": rows}


SECTIONS = ("products", "preconditioners", "cache", "folds", "queries", "sweeps", "memory", "curvature", "sharding", "kfac",
            "precision")


# -------------------------------------------------------------------------------------- report


def _markdown(res) -> str:
    m, cfg = res["machine"], res["config"]
    lines = [f"# cif_jax benchmarks: `{res['config_name']}`", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} cores, {m['memory_gib']} GiB), {m['platform']} "
             f"{m['device']} x{m['num_devices']}; jax {m['jax']}, cif_jax {m['cif_jax']}. Run {res['date']}"
             + (f"; load average at the end {m['load_average']} (other work running beside it inflates seconds)."
                if "load_average" in m else "."),
             f"Command: `{res['command']}`" + (
                 "." if set(res["sections"]) <= set(res.get("ran", res["sections"])) else
                 f" (it ran {', '.join(res['ran'])}; the other sections are kept from earlier runs of this "
                 "config, each with its own `run_date` in the JSON where recorded)."),
             f"Workload: {cfg['dataset']} + {cfg['model']}, N = {res['N']}, p = {res['p']:,}, float32, damping "
             f"{cfg['damping']:g}, true relative residual {cfg['rtol']:g}, {cfg['batch_size']} examples per chunk.", ""]
    s = res["sections"]
    if "products" in s:
        p = s["products"]
        lines += ["## Products", "", "| ratio | value |", "| --- | --- |",
                  f"| one GGN product / one full-batch gradient (same N) | {p['ggn_product_over_gradient']:.2f} |",
                  f"| per-example gradient throughput / full-batch gradient throughput | "
                  f"{p['per_example_throughput_over_full_batch']:.2f} |", "",
                  "| block k | per-vector cost / k = 1 | XLA temp memory |", "| --- | --- | --- |"]
        lines += [f"| {r['k']} | {r['per_vector_vs_k1']:.2f} | {r['temp_bytes'] / 2**20:.0f} MiB |"
                  for r in p["block_products"]]
        lines.append("")
    if "preconditioners" in s:
        lines += ["## Preconditioners", "", f"{s['preconditioners']['num_rhs']} fold right-hand sides (K = 50).", "",
                  "| preconditioner | mean CG iterations | / plain | time per solve (s) | build (s) | products | "
                  "kappa estimate |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in s["preconditioners"]["rows"]:
            kappa = r.get("condition_estimate")
            lines.append(f"| {r['preconditioner']} | {r['mean_iterations']:.1f} | {r['iterations_vs_plain']:.2f} | "
                         f"{r['seconds_per_solve']:.2f} | {r['build_seconds']:.1f} | {r.get('products', '')} | "
                         f"{'' if kappa is None else f'{kappa:.3g}'} |")
        lines.append("")
    if "cache" in s:
        c = s["cache"]
        lines += ["## Cache build against one plain solve", "",
                  f"One plain single-RHS solve: {c['one_plain_solve_seconds']:.2f} s, "
                  f"{c['one_plain_solve_iterations']} iterations (the paper pays about C of these per cache). Everything "
                  "timed compiled; the shared Nystrom build (rank "
                  f"{c['rank']}) took {c['rows'][0]['preconditioner_seconds']:.1f} s"
                  + (f" (first build, compiling: {c['nystrom_first_build_seconds']:.1f} s)"
                     if "nystrom_first_build_seconds" in c else "") + ".", "",
                  "| C | preconditioner | (build + preconditioner) / one plain solve | build alone / one plain solve | "
                  "mean iterations | max residual |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['C']} | {r['preconditioner']} | {r['total_over_one_plain_solve']:.2f} | "
                  f"{r['cache_over_one_plain_solve_excluding_preconditioner']:.2f} | {r['mean_iterations']:.1f} | "
                  f"{r['max_residual']:.2g} |" for r in c["rows"]]
        lines.append("")
    if "folds" in s:
        f = s["folds"]
        lines += ["## The K = 50 + 100 fold workload", "",
                  "| comparison | ratio |", "| --- | --- |",
                  f"| IF serial, plain (the paper's way; extrapolated from {f['if_serial_sample_folds']} folds) / CiF "
                  f"| {f['speedup_vs_serial_plain']:.2f} |",
                  f"| IF with shared Nystrom (r = {f['rank']}) and blocks / CiF | {f['speedup_vs_fair']:.2f} |",
                  f"| IF serial plain / IF shared+blocked | {f['fair_vs_serial']:.2f} |", "",
                  f"CiF {f['cif_seconds']:.1f} s end to end (C = {f['C']}, preconditioner included); agreement with "
                  "IF: " + ", ".join(f"K = {k}: Pearson {v['pearson']:.3f}, Spearman {v['spearman']:.3f}"
                                      for k, v in f["agreement"].items()) + ".", ""]
    if "queries" in s:
        q = s["queries"]
        lines += ["## Queries", "", f"Subsets of {q['subset_size']} examples.", "",
                  "| workload | queries per second |", "| --- | --- |"]
        for key, v in q.items():
            if isinstance(v, dict):
                lines.append(f"| {key} | {v['queries_per_second']:,.0f} |")
        lines.append("")
    if "sweeps" in s:
        w = s["sweeps"]
        lines += ["## Growth (see the PNG)", "", "| N | GGN product (s) | per-example pass (s) |", "| --- | --- | --- |"]
        lines += [f"| {r['N']} | {r['ggn_product_seconds']:.3f} | {r['per_example_pass_seconds']:.3f} |" for r in w["N"]]
        lines += ["", "| model | p | GGN product / gradient | per-example pass / gradient |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['p']:,} | {r['ggn_product_seconds'] / r['full_gradient_seconds']:.2f} | "
                  f"{r['per_example_pass_seconds'] / r['full_gradient_seconds']:.2f} |" for r in w["p"]]
        lines += ["", "| C | cache build (s) | solves (s) |", "| --- | --- | --- |"]
        lines += [f"| {r['C']} | {r['build_seconds']:.1f} | {r['solve_seconds']:.1f} |" for r in w["C"]]
        lines += ["", "| Q | seconds |", "| --- | --- |"] + [f"| {r['Q']:,} | {r['seconds']:.4f} |" for r in w["Q"]]
        lines.append("")
    if "memory" in s:
        lines += ["## Memory of a cache build", "", s["memory"]["note"] + ".", "",
                  "| N | peak RSS (MiB) | above baseline (MiB) | (N, p) gradients would be (MiB) |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {r['N']} | {r['peak_bytes'] / 2**20:.0f} | {r['growth_bytes'] / 2**20:.0f} | "
                  f"{r['grads_matrix_bytes'] / 2**20:.0f} |" for r in s["memory"]["rows"]]
        lines.append("")
    if "curvature" in s:
        cv = s["curvature"]
        lines += ["## Curvature on a subsample", "",
                  f"CiF fold scores (K = {cv['K']}, C = {cv['C']}) with the GGN from M uniformly drawn examples, "
                  "against M = N.", "", "| M | Pearson | Spearman | response rel. diff. |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['M']} | {r['pearson_vs_full']:.3f} | {r['spearman_vs_full']:.3f} | "
                  f"{r['response_rel_diff_vs_full']:.3f} |" for r in cv["rows"]]
        lines.append("")
    if "kfac" in s:
        k = s["kfac"]
        lines += ["## K-FAC and EK-FAC", "",
                  f"{k['num_rhs']} fold right-hand sides (K = 50), exact solves to the true residual; build times warm "
                  "(a second build), the first build's in the JSON.", "",
                  "| preconditioner | mean CG iterations | / plain | time per solve (s) | build (s) |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['preconditioner']} | {r['mean_iterations']:.1f} | {r['iterations_vs_plain']:.2f} | "
                  f"{r['seconds_per_solve']:.2f} | {r['build_seconds']:.1f} |" for r in k["rows"]]
        lines += ["", f"Approximate estimators (no CG) against the exact damped-GGN influence on all {k['num_folds']} "
                  f"folds (fold score: loss change of the fold; exact: {k['exact_seconds']:.1f} s with a rank-200 "
                  "Nystrom preconditioner, gradients included).", "",
                  "| estimator | Spearman | Pearson | median score ratio | solution rel. error | total (s) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {e['estimator']} | {e['spearman']:.3f} | {e['pearson']:.3f} | {e['median_score_ratio']:.2f} | "
                  f"{e['solution_rel_error']:.3f} | {e['total_seconds']:.1f} |" for e in k["estimators"]]
        whitened = [r for r in k["rows"] if "whitened_top" in r]
        if whitened:
            lines += ["", "Rows \"Nystrom r of the (e)kfac-whitened operator\": S = (P/lambda)^(-1/2), a rank-r "
                      "Nystrom sketch of S (I + GGN/lambda) S deflates its top eigenvalues (split preconditioning). "
                      "Rows \"(e)kfac on its complement\": the exact inverse on the Nystrom subspace of the GGN, "
                      "(E)K-FAC on the orthogonal complement. The whitened operator's largest sketched eigenvalues "
                      "are only " + ", ".join(f"{r['whitened_top']:.3g}" for r in whitened) + " (plain operator: "
                      "up to 1 + s_1/lambda); what K-FAC leaves for CG is at the small end, which a top-r "
                      "sketch cannot correct."]
        lines.append("")
    if "precision" in s:
        pr = s["precision"]
        lines += ["## Mixed precision", "",
                  f"{pr['num_rhs']} fold right-hand sides; `product_dtype` runs the CG products in the lower precision, "
                  "restarts (iterative refinement) start from the true residual in the task's dtype, which is the "
                  "residual reported.", "",
                  "| task | products | rtol | mean iterations | max true residual | converged | time / full precision |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['task_dtype']} | {r['product_dtype']} | {r['rtol']:g} | {r['mean_iterations']:.0f} | "
                  f"{r['max_residual']:.2g} | {r['converged']}/{pr['num_rhs']} | {r['time_vs_full_precision']:.2f} |"
                  for r in pr["rows"]]
        lines.append("")
    if "sharding" in s:
        lines += ["## Sharding", "", "```", json.dumps(s["sharding"], indent=1)[:3000], "```", ""]
    return "\n".join(lines)


def _plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = res["sections"].get("sweeps")
    if not w:
        return
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].plot([r["N"] for r in w["N"]], [r["ggn_product_seconds"] for r in w["N"]], "o-", label="GGN product")
    axes[0].plot([r["N"] for r in w["N"]], [r["per_example_pass_seconds"] for r in w["N"]], "s-",
                 label="per-example pass")
    axes[0].set(xlabel="N", ylabel="seconds", title="cost vs N")
    axes[0].legend()
    axes[1].plot([r["p"] for r in w["p"]], [r["ggn_product_seconds"] for r in w["p"]], "o-", label="GGN product")
    axes[1].plot([r["p"] for r in w["p"]], [r["full_gradient_seconds"] for r in w["p"]], "s-", label="gradient")
    axes[1].set(xlabel="p", xscale="log", ylabel="seconds", title="cost vs p")
    axes[1].legend()
    axes[2].plot([r["C"] for r in w["C"]], [r["build_seconds"] for r in w["C"]], "o-", label="cache build")
    axes[2].plot([r["C"] for r in w["C"]], [r["solve_seconds"] for r in w["C"]], "s-", label="solves")
    axes[2].set(xlabel="C", ylabel="seconds", title="cache cost vs C")
    axes[2].legend()
    axes[3].loglog([r["Q"] for r in w["Q"]], [r["seconds"] for r in w["Q"]], "o-")
    axes[3].set(xlabel="Q", ylabel="seconds", title="loss queries from alphas vs Q")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="quick")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]
    import warnings

    # Compile-only warm-up calls stop after one step and would warn; every timed solve's
    # largest true residual is recorded in the results instead.
    warnings.filterwarnings("ignore", message=".*did not reach the requested tolerance")
    if args.memory_child:
        _memory_child(cfg["dataset"], cfg["model"], args.memory_child, args.config)
        return 0
    os.makedirs(RESULTS, exist_ok=True)
    tag = f"{args.config}-{jax.devices()[0].platform}"
    json_path = os.path.join(RESULTS, f"{tag}.json")
    previous = {}
    if args.only and os.path.exists(json_path):
        with open(json_path) as f:
            previous = json.load(f).get("sections", {})
    task, _ = trained_task(cfg["dataset"], cfg["model"])
    log(f"{args.config}: {cfg['dataset']} + {cfg['model']}, N = {task.num_examples}, p = {task.num_params:,}")
    state = {}
    wanted = args.only or SECTIONS
    # Sections that need a cache or a preconditioner from an earlier one pull it in.
    needs = {"folds": "cache", "queries": "cache", "sweeps": "cache", "cache": None}
    order = [s for s in SECTIONS if s in wanted or any(needs.get(w) == s for w in wanted)]
    sections = dict(previous)
    start_all = time.perf_counter()
    for name in order:
        log(f"section {name}")
        start = time.perf_counter()
        fn = globals()[f"section_{name}"]
        out = fn(task, cfg, state, args.config) if name == "memory" else fn(task, cfg, state)
        out["section_seconds"] = time.perf_counter() - start
        out["run_date"] = time.strftime("%Y-%m-%d")
        sections[name] = out
    res = {"config_name": args.config, "config": cfg, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
           "command": "python benchmarks/run.py --config " + args.config + (" --only " + " ".join(args.only)
                                                                              if args.only else ""),
           "N": task.num_examples, "p": task.num_params, "total_seconds": time.perf_counter() - start_all,
           "ran": list(order),
           "sections": sections}
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, default=float)
    os.replace(tmp, json_path)
    with open(os.path.join(RESULTS, f"{tag}.md"), "w") as f:
        f.write(_markdown(res))
    _plot(res, os.path.join(RESULTS, f"{tag}-sweeps.png"))
    log(f"wrote {json_path} and .md in {res['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
