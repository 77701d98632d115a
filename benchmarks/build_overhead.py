"""What keeping the per-example coordinates costs: a cache build at one factor rank, before and after.

The every-query cache adds to a build at a given rank: ten power iterations estimating the factors'
error, a probe of 64 deviations, and in the scatter pass the coordinates ``U^T g_i`` and the tail
norms. This script builds the same cache (digits LeNet-5 by default, C = 10, d = 32, damping 1e-3,
CG rtol 1e-3, the calibrated correction at a fixed rank) with the library as it was at a baseline
commit and as it is now, alternating, each build in a fresh process (compilation included, as a user
meets it), and reports the ratio of the medians.

    python benchmarks/build_overhead.py --baseline cd8826a --rank 256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cif_jax.workloads.runs import machine, write_json  # noqa: E402

CHILD = r"""
import json, sys, time, warnings
sys.path.insert(0, sys.argv[1])
import jax, optax
import cif_jax as cj
from cif_jax.workloads import runs
task, _ = runs.trained_task(sys.argv[2], sys.argv[3], workdir=sys.argv[4])
t0 = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    cache = cj.build_cache(task, num_clusters=10, sketch_dim=32, damping=1e-3, key=jax.random.key(0),
                           batch_size=512, solver=cj.CG(rtol=1e-3, rhs_batch_size=16),
                           correction=cj.CalibratedCorrection(rank=int(sys.argv[5])))
jax.block_until_ready(cache.responses)
print(json.dumps({"seconds": time.perf_counter() - t0, "timing": dict(cache.timings),
                  "steps": [int(s) for s in cache.num_steps]}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="cd8826a", help="the commit to compare with")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args()
    workdir = os.path.join(ROOT, "benchmarks", "_work")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        old = os.path.join(tmp, "baseline")
        subprocess.run(["git", "worktree", "add", "--detach", old, args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            runs = {"baseline": [], "now": []}
            for r in range(args.repeats):
                for name, path in (("baseline", old), ("now", ROOT)):
                    out = subprocess.run([sys.executable, "-c", CHILD, path, args.dataset, args.model, workdir,
                                          str(args.rank)], capture_output=True, text=True, check=True)
                    runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(f"repeat {r + 1}/{args.repeats}, {name}: {runs[name][-1]['seconds']:.1f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", old], cwd=ROOT, capture_output=True)
    med = {k: sorted(x["seconds"] for x in v)[len(v) // 2] for k, v in runs.items()}
    result = {"benchmark": "build_overhead", "baseline": args.baseline, "now": head, "dataset": args.dataset,
              "model": args.model, "rank": args.rank, "repeats": args.repeats, "median_seconds": med,
              "ratio_now_over_baseline": med["now"] / med["baseline"], "runs": runs, "machine": machine(),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    stem = os.path.join(args.output, f"build-overhead-{args.dataset}-{args.model}-r{args.rank}-cpu")
    write_json(stem + ".json", result)
    lines = [f"# Cache build at rank {args.rank}: before and after the per-example coordinates",
             "", f"{args.dataset} {args.model}, C = 10, d = 32, damping 1e-3, CG rtol 1e-3, calibrated correction at "
             f"rank {args.rank}; each build in a fresh process, compilation included; {args.repeats} alternating "
             f"repeats on {machine().get('cpu', 'this machine')}.", "",
             "| library | median build (s) | phases of the median run |", "|---|---|---|"]
    for name, commit in (("baseline", args.baseline), ("now", head)):
        runs_sorted = sorted(runs[name], key=lambda x: x["seconds"])
        mid = runs_sorted[len(runs_sorted) // 2]
        phases = ", ".join(f"{k} {v:.1f}" for k, v in mid["timing"].items() if k != "total")
        lines.append(f"| {name} ({commit}) | {med[name]:.1f} | {phases} |")
    lines += ["", f"Ratio now / baseline: **{med['now'] / med['baseline']:.2f}x**.", ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
