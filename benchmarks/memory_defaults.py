"""Peak memory at the defaults: a cache build and per-query IF with ``batch_size=None`` against 256.

The workload of the reliability tour: an MLP of width 512 (p = 38,410) on random 64-dimensional
data with 10 classes, float32; ``build_cache(..., correction=None)`` (C = 10, d = 32, CG rtol 1e-2
capped at 20 steps: memory, not accuracy, is measured) at N = 5,000, 10,000 and 20,000, and
``influence`` on 20 random subsets at N = 5,000. Each call runs in its own process, whose peak
resident memory (``ru_maxrss``, the interpreter and XLA included) is the figure.

    python benchmarks/memory_defaults.py      # -> benchmarks/results/memory-defaults-cpu.{json,md}
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cif_jax.workloads.runs import machine, write_json  # noqa: E402

CHILD = r"""
import resource, sys, time, warnings
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
import cif_jax as cj
what, n, bs = sys.argv[2], int(sys.argv[3]), None if sys.argv[4] == "None" else int(sys.argv[4])
d, h, k = 64, 512, 10
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
y = jnp.asarray(rng.integers(0, k, n))
k1, k2 = jax.random.split(jax.random.key(0))
params = {"w1": jax.random.normal(k1, (d, h)) / 8, "b1": jnp.zeros(h),
          "w2": jax.random.normal(k2, (h, k)) / 20, "b2": jnp.zeros(k)}
apply = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
loss = lambda o, t: -jnp.take_along_axis(jax.nn.log_softmax(o), t[:, None], 1)[:, 0]
task = cj.Task(apply, loss, params, x, y)
solver = cj.CG(rtol=1e-2, max_steps=20)
t = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if what == "build_cache":
        out = cj.build_cache(task, num_clusters=10, sketch_dim=32, damping=1e-3, key=jax.random.key(0),
                             correction=None, solver=solver, batch_size=bs).responses
    else:
        subsets = [np.random.default_rng(i).choice(n, 50, replace=False) for i in range(20)]
        out = cj.influence(task, subsets, damping=1e-3, solver=solver, batch_size=bs)
jax.block_until_ready(out)
print(task.num_params, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter() - t)
"""

CASES = [("build_cache", n, bs) for n in (5_000, 10_000, 20_000) for bs in (None, 256)] + \
        [("influence", 5_000, bs) for bs in (None, 256)]


def main():
    rows = []
    for what, n, bs in CASES:
        out = subprocess.run([sys.executable, "-c", CHILD, ROOT, what, str(n), str(bs)], capture_output=True,
                             text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        p, peak, seconds = out.stdout.split()[-3:]
        rows.append({"call": what, "num_examples": n, "batch_size": bs, "num_params": int(p),
                     "peak_bytes": int(peak), "seconds": float(seconds)})
        print(f"{what} N = {n} batch_size = {bs}: peak {int(peak) / 1e9:.2f} GB, {float(seconds):.1f} s", flush=True)
    result = {"benchmark": "memory_defaults", "rows": rows, "machine": machine(),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    stem = os.path.join(ROOT, "benchmarks", "results", "memory-defaults-cpu")
    write_json(stem + ".json", result)
    lines = ["# Peak memory at the defaults", "",
             "An MLP of width 512 (p = 38,410) on random 64-dimensional data, float32. Each call in its own process; "
             "the figure is that process's peak resident memory, interpreter and XLA included. `build_cache` with "
             "`correction=None`, C = 10, d = 32; `influence` on 20 subsets of 50. From "
             "`benchmarks/results/memory-defaults-cpu.json` (`python benchmarks/memory_defaults.py`).", "",
             "| call | N | `batch_size=None` (the default) | `batch_size=256` |", "|---|---|---|---|"]
    for what, n in dict.fromkeys((r["call"], r["num_examples"]) for r in rows):
        cells = {r["batch_size"]: r for r in rows if r["call"] == what and r["num_examples"] == n}
        lines.append(f"| `{what}` | {n:,} | {cells[None]['peak_bytes'] / 1e9:.2f} GB ({cells[None]['seconds']:.0f} s) "
                     f"| {cells[256]['peak_bytes'] / 1e9:.2f} GB ({cells[256]['seconds']:.0f} s) |")
    m = result["machine"]
    lines += ["", f"Machine: {m.get('cpu')}, {m.get('cpus_usable')} usable cores, jax {m.get('jax')}; "
              f"{result['finished']}.", ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
