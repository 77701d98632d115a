"""The factor build, Nystrom against sampled pseudo-gradients, side by side in one run (issue #31).

    python benchmarks/factor_build.py                     # digits LeNet-5 and MLP, ranks 256 and 1024
    python benchmarks/factor_build.py --mnist5k           # MNIST-5k LeNet-5 too (about an hour on one core)
    python benchmarks/factor_build.py --only-mnist5k --ranks 1024 --builds "nystrom,exact columns, power 0" \
        --output benchmarks/results/factor-build-mnist5k-cpu.json

For each model and rank r, on the same trained model and operator (damping 1e-3):

* the units: one GGN-vector product (a block of 16 products, per vector) and one
  per-example gradient pass over the data, timed warm;
* ``cj.nystrom_preconditioner`` at rank r (the library's build: r GGN products in blocks
  of 32, no error iterations), and with one subspace iteration (2r products);
* ``cj.sampled_preconditioner`` at rank r: the exact output-Hessian factor columns
  (q vector-Jacobian products per example and pass) with ``power_iters`` 0 and 1 (2 or
  3 passes; the digits rows in ``factor-build-cpu.json`` were made before the
  eigenvalue pass was dropped for the exact columns, with one pass more), and one Gaussian draw per example (power 1);
* each build timed on its first call (compilation included: a build is done once per
  model) and, for the digits models, again warm; its cost also in product units;
* the accuracy of each against the exact operator: ``||GGN - U diag(s) U^T||_2`` by a
  block power iteration (8 rounds of 16 products, the same key for all), relative to
  the largest eigenvalue, and ``s_r / lambda``.

What the factors feed (the every-query estimator, the self terms) is measured by
``experiments/every_query.py --factors sampled``. Each finished cell is written to
``benchmarks/results/factor-build-cpu.json`` at once; a rerun skips it. The Markdown
table is written beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import machine, timed, trained_task

import cif_jax as cj
from cif_jax.core.checkpoint import atomic_write
from cif_jax.core.ggn import apply_undamped
from cif_jax.core.gradients import per_example_grads_pass
from cif_jax.solvers.precondition import block_error_estimate

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LAM, BATCH = 1e-3, 512


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def units(task):
    """Seconds of one GGN-vector product (in a block of 16) and of one per-example gradient pass, warm."""
    v = jax.random.normal(jax.random.key(0), (16, task.num_params), task.dtype)
    t_block, _ = timed(lambda: apply_undamped(task, BATCH, v, None), repeats=3)
    t_grads, _ = timed(lambda: per_example_grads_pass(task, BATCH), repeats=2)
    return {"product_seconds": t_block / 16, "gradient_pass_seconds": t_grads}


def quality(op, pre):
    """Spectral error of the factors against the exact operator, relative to the top eigenvalue."""
    err = float(block_error_estimate(op, pre.basis, pre.eigenvalues, key=jax.random.key(99), iters=8, block=16))
    s = np.asarray(pre.eigenvalues, np.float64)
    return {"spectral_error": err, "relative_error": err / float(s[0]), "top_eigenvalue": float(s[0]),
            "tail_over_lambda": float(s[-1]) / LAM, "rank": int(s.size)}


def builders(op, rank):
    key = jax.random.key(7)
    return {
        "nystrom": lambda: cj.nystrom_preconditioner(op, key=key, rank=rank, error_iters=0, rhs_batch_size=32),
        "nystrom, power 1": lambda: cj.nystrom_preconditioner(op, key=key, rank=rank, error_iters=0,
                                                              rhs_batch_size=32, power_iters=1),
        "exact columns, power 0": lambda: cj.sampled_preconditioner(op, key=key, rank=rank, power_iters=0,
                                                                    samples="exact"),
        "exact columns, power 1": lambda: cj.sampled_preconditioner(op, key=key, rank=rank, power_iters=1,
                                                                    samples="exact"),
        "1 draw, power 1": lambda: cj.sampled_preconditioner(op, key=key, rank=rank, power_iters=1),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mnist5k", action="store_true", help="add MNIST-5k LeNet-5")
    p.add_argument("--ranks", default="256,1024")
    p.add_argument("--builds", default=None,
                   help="comma-separated builds to run (default: all), e.g. 'nystrom,exact columns, power 0' "
                        "is read as the names 'nystrom' and 'exact columns, power 0'")
    p.add_argument("--only-mnist5k", action="store_true", help="MNIST-5k LeNet-5 alone")
    p.add_argument("--output", default=os.path.join(RESULTS, "factor-build-cpu.json"))
    args = p.parse_args()
    workloads = [("digits", "lenet5"), ("digits", "mlp")] + ([("mnist5k", "lenet5")] if args.mnist5k else [])
    if args.only_mnist5k:
        workloads = [("mnist5k", "lenet5")]
    names = list(builders(None, 1))
    wanted = names if args.builds is None else [n for n in names if n in args.builds]
    if args.builds is not None and not wanted:
        raise SystemExit(f"--builds names none of {names}")
    ranks = [int(r) for r in args.ranks.split(",")]
    out = json.load(open(args.output)) if os.path.exists(args.output) else {"cells": {}}
    out["machine"] = machine()

    def save():
        atomic_write(args.output, lambda f: f.write(json.dumps(out, indent=2).encode()))
        write_markdown(out, args.output.replace(".json", ".md"))

    for dataset, model in workloads:
        task, _ = trained_task(dataset, model)
        op = cj.DampedGGN(task, damping=LAM, batch_size=BATCH)
        name = f"{dataset}/{model}"
        if f"{name}/units" not in out["cells"]:
            out["cells"][f"{name}/units"] = {**units(task), "num_examples": task.num_examples,
                                             "num_params": task.num_params}
            save()
        u = out["cells"][f"{name}/units"]
        log(f"{name}: N = {task.num_examples}, p = {task.num_params:,}; product {u['product_seconds']:.3f} s, "
            f"gradient pass {u['gradient_pass_seconds']:.2f} s")
        for rank in ranks:
            for method, build in builders(op, rank).items():
                key = f"{name}/r={rank}/{method}"
                if key in out["cells"] or method not in wanted:
                    continue
                t0 = time.perf_counter()
                pre = jax.block_until_ready(build())
                cold = time.perf_counter() - t0
                warm = timed(build, repeats=1, warmup=False)[0] if dataset == "digits" else None
                cell = {"cold_seconds": cold, "warm_seconds": warm,
                        "cold_in_products": cold / u["product_seconds"], **quality(op, pre)}
                out["cells"][key] = cell
                save()
                log(f"  r = {rank}, {method}: {cold:.1f} s cold ({cell['cold_in_products']:.0f} products), "
                    f"warm {warm if warm is None else round(warm, 1)} s; ||E|| / s_1 = {cell['relative_error']:.3g}, "
                    f"s_r / lambda = {cell['tail_over_lambda']:.3g}")
    log(f"wrote {args.output}")


def write_markdown(out, path):
    m = out["machine"]
    lines = ["# The factor build: Nystrom (r GGN products) against sampled pseudo-gradients (a few passes)", "",
             f"Damping {LAM:g}, chunks of {BATCH}; one run on {m.get('cpu', 'this machine')} "
             f"({m.get('cpus_usable', '?')} usable cores). `benchmarks/factor_build.py`; cold = first call, "
             "compilation included; products = cold seconds over one GGN-vector product's. The error is "
             "`||GGN - U diag(s) U^T||_2` by block power iteration, relative to the top eigenvalue.", "",
             "| model | rank | build | cold (s) | warm (s) | in products | error / s_1 | s_r / lambda |",
             "|---|---|---|---|---|---|---|---|"]
    for key, c in out["cells"].items():
        if key.endswith("/units"):
            continue
        dataset, model, rank, method = key.split("/")
        warm = "" if c["warm_seconds"] is None else f"{c['warm_seconds']:.1f}"
        lines.append(f"| {dataset} {model} | {rank[2:]} | {method} | {c['cold_seconds']:.1f} | {warm} | "
                     f"{c['cold_in_products']:.0f} | {c['relative_error']:.3g} | {c['tail_over_lambda']:.3g} |")
    lines += ["", "Units (warm):", ""]
    for key, c in out["cells"].items():
        if key.endswith("/units"):
            lines.append(f"- {key[:-6]}: N = {c['num_examples']}, p = {c['num_params']:,}; one GGN-vector product "
                         f"{c['product_seconds']:.3f} s, one per-example gradient pass {c['gradient_pass_seconds']:.2f} s")
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


if __name__ == "__main__":
    main()
