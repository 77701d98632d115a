"""Where a default cache build's time goes, phase by phase, in seconds and in GGN-product equivalents.

For each workload (digits LeNet-5 and MLP, MNIST-5k LeNet-5 by default) one process:

1. times one damped-GGN product, warm, per vector in blocks of 1, 8 and 64 vectors (64: about the
   width the factor build uses): the *product unit* below is the per-vector cost in a block of 64;
2. builds the library's default cache (C = 10, d = 32, damping 1e-3, everything else at its
   default) twice: cold (compilation included, as a user meets it) and warm (the same call again);
3. records each phase's seconds and the same divided by the product unit, beside the products the
   phase is known to make: the factor build's rank (the doublings of ``rank="auto"`` reuse every
   product), the factor-error estimate's power iterations, and the solves' CG steps times systems
   (C clusters plus the correction's calibration systems).

Each finished workload is written at once (``benchmarks/results/build-phases-cpu.json``) and a
rerun skips it; the table goes to ``build-phases-cpu.md``.

    taskset -c 0 python benchmarks/build_phases.py            # all three workloads
    python benchmarks/build_phases.py --workloads digits/mlp  # one
    python benchmarks/build_phases.py --factors columns --tag columns  # the factors from the exact columns
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

import cif_jax as cj  # noqa: E402
from cif_jax.cif import correction as _correction  # noqa: E402
from cif_jax.cif import lowrank as _lowrank  # noqa: E402
from cif_jax.workloads.runs import machine, timed, trained_task, write_json  # noqa: E402

BLOCK = 64
#: Block widths whose per-vector product cost is timed.
WIDTHS = (1, 8, BLOCK)
DAMPING = 1e-3


def build(task, factors="auto"):
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = cj.build_cache(task, num_clusters=10, sketch_dim=32, damping=DAMPING, key=jax.random.key(0),
                               correction=cj.CalibratedCorrection(factors=factors))
    jax.block_until_ready(cache.responses)
    steps = [int(s) for s in cache.num_steps]
    return {"seconds": time.perf_counter() - t, "timing": dict(cache.timings), "rank": int(cache.lowrank.rank),
            "cg_steps": steps, "note": cache.lowrank.note}


def workload(name: str, workdir: str, factors: str = "auto") -> dict:
    dataset, model = name.split("/")
    task, _ = trained_task(dataset, model, workdir=workdir)
    op = cj.DampedGGN(task, damping=DAMPING)
    p = task.num_params
    vecs = jax.random.normal(jax.random.key(1), (BLOCK, p), task.dtype)
    # Median of 3 warm calls after one that compiles.
    per_vector = {k: timed(lambda k=k: op.apply(vecs[:k]), repeats=3)[0] / k for k in WIDTHS}
    unit, single = per_vector[BLOCK], per_vector[1]
    print(f"[{name}] N = {task.num_examples}, p = {p}: product per vector "
          + ", ".join(f"{v * 1e3:.2f} ms in a block of {k}" for k, v in per_vector.items()), flush=True)
    runs = {}
    for kind in ("cold", "warm"):
        runs[kind] = build(task, factors)
        print(f"[{name}] {kind} build {runs[kind]['seconds']:.1f} s: {runs[kind]['timing']}", flush=True)
    warm = runs["warm"]
    systems = 10 + _correction.DEFAULT_NUM_SAMPLES
    columns = "factors=columns" in warm["note"] or "exact columns (predicted" in warm["note"]
    known = {"nystrom": "2 column passes" if columns else warm["rank"], "factor error": f"{_lowrank.ERROR_ITERS} x a block of up to 32",
             "solves": max(warm["cg_steps"]) * systems}
    return {"num_examples": int(task.num_examples), "num_params": int(p), "product_seconds_in_block": unit,
            "product_seconds_alone": single, "product_seconds_per_vector": {str(k): v for k, v in per_vector.items()},
            "block": BLOCK, "systems": systems, "known_products": known, **runs}


def table(results: dict) -> list[str]:
    lines = ["| workload | phase | cold s | warm s | warm, in products | products it makes |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        unit = r["product_seconds_in_block"]
        for phase, warm in r["warm"]["timing"].items():
            cold = r["cold"]["timing"].get(phase, float("nan"))
            known = r["known_products"].get(phase, "")
            lines.append(f"| {name} | {phase} | {cold:.1f} | {warm:.1f} | {warm / unit:.0f} | {known} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["digits/lenet5", "digits/mlp", "mnist5k/lenet5"])
    ap.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--tag", default="", help="results go to build-phases-<tag>-cpu.* (a run after a change)")
    ap.add_argument("--factors", default="auto", choices=["auto", "products", "columns"],
                    help="the correction's factor build (the library's default: auto)")
    args = ap.parse_args()
    stem = "build-phases" + (f"-{args.tag}" if args.tag else "") + "-cpu"
    path = os.path.join(args.output, stem + ".json")
    done = json.load(open(path))["results"] if os.path.exists(path) else {}
    for name in args.workloads:
        if name in done:
            print(f"[{name}] done earlier; skipped")
            continue
        done[name] = {**workload(name, os.path.join(ROOT, "benchmarks", "_work"), args.factors), "machine": machine(),
                      "factors": args.factors,
                      "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        write_json(path, {"benchmark": "build_phases", "damping": DAMPING, "results": done})
    lines = ["# Where a default cache build's time goes" + (f" ({args.tag})" if args.tag else ""), "",
             f"C = 10, d = 32, damping {DAMPING:g}, the correction's factors built by `factors={args.factors!r}`, "
             "every other setting at the library's default; one process per "
             "workload, the build run twice (cold: compilation included; warm: the same call again). 'In products' "
             f"divides the warm seconds by one damped-GGN product per vector, timed warm in a block of {BLOCK} in the "
             "same process. 'Products it makes': the factor rank (the doublings reuse every product), the factor-error "
             "power iterations, and the solves' largest CG step count times their systems (C + calibration). "
             f"From `benchmarks/results/{stem}.json`.", ""]
    lines += table(done)
    lines += [""] + [f"- {name}: N = {r['num_examples']}, p = {r['num_params']}, rank {r['warm']['rank']}, CG steps "
                     f"{sorted(set(r['warm']['cg_steps']))}, product {r['product_seconds_in_block'] * 1e3:.2f} ms per "
                     f"vector in a block of {BLOCK} ({r['product_seconds_alone'] * 1e3:.1f} ms alone); "
                     + (f"factors built from {r['warm']['note'].partition('; built from ')[2]}; "
                        if "; built from " in r["warm"]["note"] else "")
                     + f"{r['machine'].get('cpu', '')}, {r['finished']}" for name, r in done.items()] + [""]
    with open(os.path.join(args.output, stem + ".md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
