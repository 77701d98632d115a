"""Where LiSSA's peak memory comes from, with and without a curvature pool (issue #19, seed 002).

``experiments/samplers_lissa.py`` found pooled LiSSA cells peaking *higher* than
LiSSA on all N examples (2.5-2.6 GiB against 1.8 GiB on MNIST-5k LeNet-5), the
opposite of what a pool is for. This script splits a cell into its parts and
measures each part's peak resident set (``ru_maxrss``) in a fresh process, so
that one part's memory does not hide another's:

* ``base``: imports, the trained task loaded, one forward pass (no right-hand sides);
* ``loop/<pool>``: LiSSA's recursion alone (``depth`` steps, minibatches of
  ``--lissa-batch``), no residual check;
* ``residual/full``: the library's true-residual check without a pool (the
  damped GGN of all N examples);
* ``residual/both``: the same with a pool, which also checks against the pool's
  damped GGN (both in one program, as ``cif_jax.lissa`` does);
* ``lissa/<pool>``: the whole ``cif_jax.lissa`` call, as the experiment makes it.

``<pool>`` is ``full`` (no pool) or ``uniform`` (``--pool-size`` examples).
Right-hand sides are ``--num-rhs`` class gradient sums, as in the experiment
(one per class). Two figures per part: the peak resident set of the whole
process in MiB (host memory, Linux ``ru_maxrss``; it includes computing the
right-hand sides and compiling, so it is noisy by a few hundred MiB between
runs), and XLA's own figure for the compiled program's scratch buffers
(``memory_analysis().temp_size_in_bytes``), the clean one. Written with the
library's git commit to ``benchmarks/results/lissa-pool-memory-<platform>.{json,md}``;
``--baseline`` puts an earlier run's figures beside (e.g. before a change).

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

PARTS = ("base", "loop/full", "loop/uniform", "residual/full", "residual/both", "lissa/full", "lissa/uniform")


def _child(part: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from common import trained_task

    import cif_jax as cj
    from cif_jax.solvers import lissa as L

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
        use_pool = part.endswith("uniform") or part.endswith("both")
        idx, w = L._pool(task, pool if use_pool else None)
        if part.startswith("lissa/"):
            op = cj.DampedGGN(task, damping=args.damping, curvature=pool if use_pool else None,
                              batch_size=args.chunk)
            res = cj.lissa(op, rhs, scale=args.scale, depth=args.depth, key=jax.random.key(0),
                           batch_size=args.lissa_batch, tol=0.0)
            jax.block_until_ready(res.solutions)
        else:
            if part.startswith("loop/"):
                def fn(b):
                    return L._one_repeat(task, b, idx, w, lam, jnp.asarray(args.scale, task.dtype), args.depth,
                                         jnp.asarray(0.0, task.dtype), args.lissa_batch, jax.random.key(0),
                                         args.chunk)[0]
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
    p.add_argument("--output", default=None, help="JSON path (default results/lissa-pool-memory-<platform>.json)")
    args = p.parse_args(argv)
    if args.part is not None:
        print("RESULT " + json.dumps(_child(args.part, args)))
        return {}
    from common import machine

    from cif_jax.core.checkpoint import atomic_write
    from cif_jax.workloads.runs import write_json

    baseline = None
    if args.baseline is not None:  # read first: a bad path fails before any measurement
        with open(args.baseline) as f:
            baseline = json.load(f)
        differ = {k: (v, baseline["settings"].get(k)) for k, v in vars(args).items()
                  if k not in ("part", "parts", "output", "baseline") and baseline["settings"].get(k) != v}
        if differ:
            raise SystemExit(f"--baseline ran another workload; these settings differ (this run, baseline): {differ}")
    rows = {}
    for part in args.parts:
        cmd = [sys.executable, os.path.abspath(__file__), "--part", part]
        for k, v in vars(args).items():
            if k not in ("part", "parts", "output", "baseline"):
                cmd += [f"--{k.replace('_', '-')}", str(v)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"part {part!r} failed:\n{proc.stderr[-3000:]}")
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"part {part!r} printed no result:\n{proc.stdout[-2000:]}")
        rows[part] = json.loads(lines[-1][len("RESULT "):])
        r = rows[part]
        extra = "" if "xla_temp_mib" not in r else (
            f"  (after compile {r['peak_rss_after_compile_mib']:6.0f} MiB, XLA temp {_fmt(r['xla_temp_mib']):>6} MiB)")
        print(f"{part:>16}: {r['peak_rss_mib']:8.0f} MiB  {r['seconds']:7.1f} s{extra}", flush=True)
    base = rows.get("base", {}).get("peak_rss_mib")
    if base is not None:
        for r in rows.values():
            r["above_base_mib"] = r["peak_rss_mib"] - base
    info = machine()
    if args.output is None:
        args.output = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"lissa-pool-memory-{info['platform']}.json")
    result = {"machine": info, "library_commit": _commit(), "argv": sys.argv[1:] if argv is None else argv,
              "settings": {k: v for k, v in vars(args).items() if k not in ("part", "output", "baseline")},
              "parts": rows}
    if baseline is not None:
        result["baseline"] = {"path": os.path.relpath(args.baseline, os.path.dirname(args.output)),
                              "library_commit": baseline.get("library_commit"), "parts": baseline["parts"]}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    write_json(args.output, result)
    markdown = _markdown(result, baseline)
    atomic_write(os.path.splitext(args.output)[0] + ".md", lambda f: f.write(markdown.encode()))
    return result


def _fmt(v) -> str:
    return "" if v is None else f"{v:,.0f}"


def _commit() -> str | None:
    """The imported library's git commit (``+dirty`` with uncommitted changes), or None outside a checkout."""
    import cif_jax

    root = os.path.dirname(os.path.dirname(os.path.abspath(cif_jax.__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "cif_jax"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _markdown(result, baseline) -> str:
    """The run as a table (peak resident MiB, XLA scratch MiB), beside a baseline run when given."""
    m, st = result["machine"], result["settings"]
    head = "| part | peak MiB | XLA scratch MiB |"
    rule = "|---|---|---|"
    if baseline is not None:
        head += " peak MiB, baseline | XLA scratch MiB, baseline |"
        rule += "---|---|"
    lines = ["# Where LiSSA's memory goes (`benchmarks/lissa_pool_memory.py`)", "",
             f"{st['dataset']} {st['model']}, {st['num_rhs']} right-hand sides, pool of {st['pool_size']} "
             f"(uniform), minibatch {st['lissa_batch']}, chunks of {st['chunk']}, depth {st['depth']}; each part "
             f"in a fresh process. Machine: {m.get('cpu')} ({m.get('cpus_usable')} usable core(s)), jax "
             f"{m.get('jax')}, cif_jax {m.get('cif_jax')} at {result.get('library_commit')}, load {m.get('load_average')}."
             + ("" if baseline is None else f" Baseline: {baseline.get('library_commit') or 'an earlier run'}."),
             "", head, rule]
    for part, r in result["parts"].items():
        row = f"| {part} | {_fmt(r['peak_rss_mib'])} | {_fmt(r.get('xla_temp_mib'))} |"
        if baseline is not None:
            b = baseline["parts"].get(part, {})
            row += f" {_fmt(b.get('peak_rss_mib'))} | {_fmt(b.get('xla_temp_mib'))} |"
        lines.append(row)
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
