"""Where LiSSA's peak memory comes from, with and without a curvature pool (issue #19, seed 002).

``experiments/samplers_lissa.py`` found pooled LiSSA cells peaking *higher* than
LiSSA on all N examples (2.5-2.6 GiB against 1.8 GiB on MNIST-5k LeNet-5), the
opposite of what a pool is for. This script splits a cell into its parts and
measures each part's peak resident set (``ru_maxrss``) in a fresh process, so
that one part's memory does not hide another's:

* ``base``: imports, the trained task loaded, one forward pass (no right-hand sides);
* ``loop/<pool>``: LiSSA's recursion alone (``depth`` steps, minibatches of
  ``--lissa-batch``), no residual check;
* ``residual/full``: the true residual against the damped GGN of all N;
* ``residual/pool``: the same against the pool's GGN;
* ``residual/both``: both in one compiled program, as ``cif_jax.lissa`` does;
* ``lissa/<pool>``: the whole ``cif_jax.lissa`` call, as the experiment makes it.

``<pool>`` is ``full`` (no pool) or ``uniform`` (``--pool-size`` examples).
Right-hand sides are ``--num-rhs`` class gradient sums, as in the experiment
(one per class). The figures are peaks of whole processes in MiB; ``- base``
is what the part adds. Written to ``benchmarks/results/lissa-pool-memory-cpu.json``.

    python benchmarks/lissa_pool_memory.py            # mnist5k LeNet-5, 10 rhs, M = 800
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PARTS = ("base", "loop/full", "loop/uniform", "residual/full", "residual/pool", "residual/both",
         "lissa/full", "lissa/uniform")


def _child(part: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from common import trained_task

    import cif_jax as cj
    from cif_jax.baselines import lissa as L

    task, _ = trained_task(args.dataset, args.model)
    jax.block_until_ready(task.apply_fn(task.params, task.inputs[:8]))
    labels = np.asarray(task.targets)
    subsets = [np.flatnonzero(labels == c) for c in range(args.num_rhs)]
    pool = cj.uniform_sample(task.num_examples, size=args.pool_size, key=jax.random.key(0))
    t0 = time.perf_counter()
    out = {}
    if part != "base":
        rhs = cj.subset_gradient_sums(task, subsets, batch_size=args.chunk) / task.num_examples
        lam = jnp.asarray(args.damping, task.dtype)
        use_pool = part.endswith("uniform") or part.endswith("pool") or part.endswith("both")
        idx, w = L._pool(task, pool if use_pool else None)
        if part.startswith("lissa/"):
            res = cj.lissa(task, rhs, damping=args.damping, scale=args.scale, depth=args.depth,
                           key=jax.random.key(0), curvature=pool if use_pool else None,
                           batch_size=args.lissa_batch, chunk_size=args.chunk, tol=0.0)
            jax.block_until_ready(res.solutions)
        else:
            if part.startswith("loop/"):
                def fn(b):
                    return L._one_repeat(task, b, idx, w, lam, jnp.asarray(args.scale, task.dtype), args.depth,
                                         jnp.asarray(0.0, task.dtype), args.lissa_batch, jax.random.key(0),
                                         args.chunk)[0]
            elif part == "residual/pool":
                mv = jax.vmap(L.ggn_matvec_fn(task, batch_size=args.chunk, curvature=cj.CurvatureSample(idx, w)))

                def fn(b):
                    return jnp.linalg.norm(b - mv(b) - lam * b, axis=1)
            else:  # residual/full (idx is None) or residual/both

                def fn(b):
                    return L._residuals(task, b, b, idx, w, lam, args.chunk)

            # XLA's own figure for the program's scratch buffers, then the process peak after compiling and
            # after running: the resident-set peak includes the compiler's, the temp figure does not.
            compiled = jax.jit(fn).lower(rhs).compile()
            mem = compiled.memory_analysis()
            out["xla_temp_mib"] = None if mem is None else mem.temp_size_in_bytes / 2**20
            out["peak_rss_after_compile_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            jax.block_until_ready(compiled(rhs))
    return out | {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t0}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--num-rhs", type=int, default=10)
    p.add_argument("--pool-size", type=int, default=800)
    p.add_argument("--damping", type=float, default=0.1)
    p.add_argument("--scale", type=float, default=50.0, help="LiSSA's scale (large enough not to diverge)")
    p.add_argument("--depth", type=int, default=200)
    p.add_argument("--lissa-batch", type=int, default=32)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--parts", nargs="+", default=list(PARTS))
    p.add_argument("--baseline", default=None,
                   help="an earlier run's JSON (e.g. before a library change), shown beside this one in the .md")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "lissa-pool-memory-cpu.json"))
    args = p.parse_args(argv)
    if args.part is not None:
        print("RESULT " + json.dumps(_child(args.part, args)))
        return {}
    from common import machine

    baseline = None
    if args.baseline is not None:  # read first: a bad path fails before any measurement
        with open(args.baseline) as f:
            baseline = json.load(f)
    rows = {}
    for part in args.parts:
        cmd = [sys.executable, os.path.abspath(__file__), "--part", part]
        for k, v in vars(args).items():
            if k not in ("part", "parts", "output", "baseline"):
                cmd += [f"--{k.replace('_', '-')}", str(v)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"part {part!r} failed:\n{proc.stderr[-3000:]}")
        out = proc.stdout
        rows[part] = json.loads(out.split("RESULT ", 1)[1])
        r = rows[part]
        extra = "" if "xla_temp_mib" not in r else (
            f"  (after compile {r['peak_rss_after_compile_mib']:6.0f} MiB, XLA temp {r['xla_temp_mib'] or 0:6.0f} MiB)")
        print(f"{part:>16}: {r['peak_rss_mib']:8.0f} MiB  {r['seconds']:7.1f} s{extra}", flush=True)
    base = rows.get("base", {}).get("peak_rss_mib")
    if base is not None:
        for r in rows.values():
            r["above_base_mib"] = r["peak_rss_mib"] - base
    result = {"machine": machine(), "argv": sys.argv[1:] if argv is None else argv,
              "settings": {k: v for k, v in vars(args).items() if k not in ("part", "output", "baseline")},
              "parts": rows}
    if baseline is not None:
        result["baseline"] = {"path": os.path.relpath(args.baseline, os.path.dirname(args.output)),
                              "library_commit": baseline.get("library_commit"), "parts": baseline["parts"]}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    for path, text in ((args.output, json.dumps(result, indent=1)),
                       (os.path.splitext(args.output)[0] + ".md", _markdown(result, baseline))):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return result


def _markdown(result, baseline) -> str:
    """The run as a table (peak resident MiB, XLA scratch MiB), beside a baseline run when given."""
    m, st = result["machine"], result["settings"]
    fmt = lambda v: "" if v is None else f"{v:,.0f}"
    head = "| part | peak MiB | XLA scratch MiB |"
    rule = "|---|---|---|"
    if baseline is not None:
        head += " peak MiB, baseline | XLA scratch MiB, baseline |"
        rule += "---|---|"
    lines = ["### Where LiSSA's memory goes (`benchmarks/lissa_pool_memory.py`)", "",
             f"{st['dataset']} {st['model']}, {st['num_rhs']} right-hand sides, pool of {st['pool_size']} "
             f"(uniform), minibatch {st['lissa_batch']}, chunks of {st['chunk']}, depth {st['depth']}; each part "
             f"in a fresh process. Machine: {m.get('cpu')} ({m.get('cpus_usable')} usable core(s)), jax "
             f"{m.get('jax')}, cif_jax {m.get('cif_jax')}, load {m.get('load_average')}."
             + ("" if baseline is None else f" Baseline: {baseline.get('library_commit') or 'an earlier run'}."),
             "", head, rule]
    for part, r in result["parts"].items():
        row = f"| {part} | {fmt(r['peak_rss_mib'])} | {fmt(r.get('xla_temp_mib'))} |"
        if baseline is not None:
            b = baseline["parts"].get(part, {})
            row += f" {fmt(b.get('peak_rss_mib'))} | {fmt(b.get('xla_temp_mib'))} |"
        lines.append(row)
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
