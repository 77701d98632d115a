"""Solvers at their defaults: the "auto" cost model, the cache-cost targets, lineax against our block CG.

    python benchmarks/solvers.py                       # digits, LeNet-5 and the MLP (~10 min on 2 CPU cores)
    python benchmarks/solvers.py --only lineax         # one section (its figures replace that section's)

Three sections, each comparing side by side in one run on the same trained model,
operator, damping (1e-3) and true tolerance (rtol 1e-4, the library default):

* ``model``: CG iterations measured at Nystrom ranks 0-256 against the cost
  model's predictions (:mod:`cif_jax.solvers.precondition`): plain CG from the rank-32
  probe and its error estimate (what ``preconditioner="auto"`` sees), each rank
  from its own estimated condition number, and each doubling as the model
  predicts it before building it. The ratios measured / unscaled model are the
  model's calibration (``PLAIN_FACTOR``, ``PRECONDITIONED_FACTOR``).
* ``targets``: caches built with every setting at its default (``cj.CG()``, the
  default correction) for C = 10 and 50, timed compiled, as multiples of one plain
  single-vector solve at the same tolerance; also without the correction, where
  the cost model decides alone. The issue's targets: C = 50 at most 8x, C = 10 at
  most 4x.
* ``lineax``: ``cj.LineaxSolver.cg`` (``lineax.CG`` vmapped over the right-hand
  sides, stopping test eq. 9) against ``cj.CG`` on 16 fold right-hand sides, plain
  and with one shared rank-256 Nystrom preconditioner.

Writes ``benchmarks/results/solvers-<platform>.{json,md}`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import machine, timed, trained_task

import cif_jax as cj
from cif_jax.solvers import precondition
from cif_jax.workloads import folds as cfolds

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LAM, RTOL, BATCH = 1e-3, 1e-4, 512
MODELS = ("lenet5", "mlp")
RANKS = (0, 32, 64, 128, 256)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fold_rhs(task, num, seed=0):
    folds = cfolds.kfold_indices(task.num_examples, 50, seed=seed)[:num]
    return cj.subset_gradient_sums(task, folds, batch_size=BATCH)


def solve_timed(task, rhs, solver):
    """Seconds of a compiled solve (a one-step call compiles the same program first) and its result."""
    import dataclasses

    cj.solve_ggn(task, rhs, damping=LAM, batch_size=BATCH, warn=False,
                 solver=dataclasses.replace(solver, max_steps=1) if isinstance(solver, cj.CG) else solver)
    return timed(lambda: cj.solve_ggn(task, rhs, damping=LAM, batch_size=BATCH, solver=solver, warn=False),
                 warmup=False)


def section_model(task, name):
    rhs = fold_rhs(task, 8)
    sketches = {r: cj.nystrom_preconditioner(cj.DampedGGN(task, damping=LAM, batch_size=BATCH), key=jax.random.key(7), rank=r,
                                             error_iters=precondition.ERROR_ITERS) for r in RANKS if r}
    kappa = {r: pre.condition_estimate(LAM) for r, pre in sketches.items()}
    probe = sketches[32]
    rows = []
    for r in RANKS:
        pre = sketches.get(r)
        _, res = solve_timed(task, rhs, cj.CG(rtol=RTOL, preconditioner=pre, rhs_batch_size=8))
        if r == 0:
            predicted = precondition.plain_iterations(probe.eigenvalues, float(probe.error_estimate), LAM, RTOL)
            factor, ahead = precondition.PLAIN_FACTOR, None
        else:
            predicted = precondition.preconditioned_iterations(kappa[r], RTOL)
            factor, ahead = precondition.PRECONDITIONED_FACTOR, None
            if r // 2 in sketches:  # the doubling as the model predicted it from the sketch of half the rank
                half = np.asarray(sketches[r // 2].eigenvalues, np.float64)
                decay = half[-1] / half[r // 4 - 1]
                ahead = precondition.preconditioned_iterations(1 + (kappa[r // 2] - 1) * decay, RTOL)
        rows.append({
            "rank": r,
            "measured_iterations": float(np.mean(np.asarray(res.num_steps))),
            "predicted": predicted,
            "predicted_before_building": ahead,
            "kappa_estimate": kappa.get(r),
            "measured_over_unscaled_model": float(np.mean(np.asarray(res.num_steps))) / (predicted / factor),
            "max_residual": float(np.max(np.asarray(res.residuals))),
        })
        log(f"  {name} rank {r}: {rows[-1]['measured_iterations']:.1f} iterations measured, {predicted:.1f} "
            f"predicted" + ("" if ahead is None else f" ({ahead:.1f} before building it)"))
    return {"rows": rows}


def section_targets(task, name):
    rhs = fold_rhs(task, 2, seed=1)
    plain = cj.CG(rtol=RTOL, preconditioner=None, rhs_batch_size=1)
    t_plain, res = solve_timed(task, rhs[1:2], plain)
    log(f"  {name}: one plain single-vector solve {t_plain:.2f} s, {int(res.num_steps[0])} iterations")
    rows = []
    for correction in ("calibrated", None):
        for c in (10, 50):
            def build(seed):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return cj.build_cache(task, num_clusters=c, sketch_dim=32, damping=LAM, key=jax.random.key(seed),
                                          batch_size=BATCH, correction=correction)

            build(0)  # compile
            start = time.perf_counter()
            cache = jax.block_until_ready(build(1))
            seconds = time.perf_counter() - start
            rows.append({"C": c, "correction": correction or "none", "seconds": seconds,
                         "over_one_plain_solve": seconds / t_plain, "solver": cache.solver,
                         "mean_iterations": float(np.mean(np.asarray(cache.num_steps))),
                         "max_residual": float(np.max(np.asarray(cache.residuals))),
                         "timing": cache.timing,
                         "factors": None if cache.lowrank is None else cache.lowrank.note})
            log(f"  {name} C={c} correction={correction}: {seconds:.1f} s = {seconds / t_plain:.2f}x plain "
                f"({cache.solver})")
    return {"plain_solve_seconds": t_plain, "plain_iterations": int(res.num_steps[0]), "rows": rows}


def section_lineax(task, name):
    rhs = fold_rhs(task, 16, seed=2)
    pre = cj.nystrom_preconditioner(cj.DampedGGN(task, damping=LAM, batch_size=BATCH), key=jax.random.key(3), rank=256,
                                    error_iters=0)
    rows = []
    for label, p in (("plain", None), ("nystrom r=256", pre)):
        for solver_name, solver in (("cj.CG", cj.CG(rtol=RTOL, preconditioner=p, rhs_batch_size=16)),
                                    ("cj.LineaxSolver.cg", cj.LineaxSolver.cg(rtol=RTOL, preconditioner=p,
                                                                              rhs_batch_size=16))):
            if solver_name == "cj.CG":
                t, res = solve_timed(task, rhs, solver)
            else:
                t, res = timed(lambda s=solver: cj.solve_ggn(task, rhs, damping=LAM, batch_size=BATCH, solver=s,
                                                             warn=False))
            rows.append({"preconditioner": label, "solver": solver_name, "seconds": t,
                         "mean_iterations": float(np.mean(np.asarray(res.num_steps))),
                         "max_residual": float(np.max(np.asarray(res.residuals))),
                         "converged": int(np.sum(np.asarray(res.converged)))})
            log(f"  {name} {label} {solver_name}: {t:.2f} s, {rows[-1]['mean_iterations']:.1f} iterations, "
                f"residual {rows[-1]['max_residual']:.2g}")
    return {"rows": rows}


SECTIONS = {"model": section_model, "targets": section_targets, "lineax": section_lineax}


def write_markdown(result, path):
    m = result["machine"]
    lines = ["# Solvers at their defaults", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} cores, {m['memory_gib']} GiB), {m['platform']}; jax {m['jax']}, "
             f"cif_jax {m['cif_jax']}. Load average at the end {m['load_average']}.",
             f"Command: `{result['command']}`. Digits (N = 1,438), damping {LAM:g}, true relative residual "
             f"{RTOL:g}, {BATCH} examples per chunk.", ""]
    for model, sec in result.get("model", {}).items():
        lines += [f"## Cost model: CG iterations measured and predicted ({model})", "",
                  "Rank 0 is plain CG, predicted from the rank-32 probe; rank r from its own estimated condition "
                  "number; the last column is the prediction made from the sketch of half the rank, before building.",
                  "", "| Nystrom rank | kappa estimate | measured | predicted | measured / unscaled model | "
                  "predicted before building |", "| --- | --- | --- | --- | --- | --- |"]
        fmt = lambda v: "" if v is None else f"{v:.1f}"
        lines += [f"| {r['rank']} | {fmt(r['kappa_estimate'])} | {r['measured_iterations']:.1f} | "
                  f"{r['predicted']:.1f} | {r['measured_over_unscaled_model']:.2f} | "
                  f"{fmt(r['predicted_before_building'])} |" for r in sec["rows"]]
        lines += ["", f"Factors in the library: PLAIN_FACTOR = {precondition.PLAIN_FACTOR}, "
                      f"PRECONDITIONED_FACTOR = {precondition.PRECONDITIONED_FACTOR}.", ""]
    for model, sec in result.get("targets", {}).items():
        lines += [f"## Cache cost at the defaults ({model})", "",
                  f"One plain single-vector solve: {sec['plain_solve_seconds']:.2f} s, {sec['plain_iterations']} "
                  "iterations. Caches timed compiled (a first build compiles).", "",
                  "| C | correction | seconds | / one plain solve | solver chosen | factors built from | mean iterations "
                  "| max residual |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        built = lambda r: (r.get("factors") or "").partition("; built from ")[2] or "-"
        lines += [f"| {r['C']} | {r['correction']} | {r['seconds']:.1f} | {r['over_one_plain_solve']:.2f} | "
                  f"`{r['solver']}` | {built(r)} | {r['mean_iterations']:.1f} | {r['max_residual']:.1e} |"
                  for r in sec["rows"]]
        lines.append("")
    for model, sec in result.get("lineax", {}).items():
        lines += [f"## lineax.CG against our block CG ({model}, 16 right-hand sides)", "",
                  "| preconditioner | solver | seconds | mean iterations | max residual | converged |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['preconditioner']} | {r['solver']} | {r['seconds']:.2f} | {r['mean_iterations']:.1f} | "
                  f"{r['max_residual']:.1e} | {r['converged']}/16 |" for r in sec["rows"]]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args(argv)
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"solvers-{jax.default_backend()}.json")
    result = json.load(open(path)) if os.path.exists(path) else {}
    for section in args.only.split(","):
        result[section] = result.get(section, {})
        for model in args.models.split(","):
            task, _ = trained_task("digits", model)
            task = cj.Task(task.apply_fn, task.loss_fn, task.params, jnp.asarray(task.inputs), task.targets)
            log(f"{section}: digits {model}, N = {task.num_examples}, p = {task.num_params:,}")
            result[section][model] = SECTIONS[section](task, model)
            result["machine"] = machine()
            result["command"] = "python benchmarks/solvers.py " + " ".join(argv or sys.argv[1:])
            with open(path + ".tmp", "w") as f:
                json.dump(result, f, indent=1)
            os.replace(path + ".tmp", path)
            write_markdown(result, path[:-5] + ".md")
    log(f"written {path}")


if __name__ == "__main__":
    main()
