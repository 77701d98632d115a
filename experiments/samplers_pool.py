"""Seed 002 under its own mechanism: each sampled pool's own curvature, deterministic LiSSA to a tolerance.

The document (Faithful and Fast Influence Function via Advanced Sampling) computes the
Hessian estimate on the selected subset only and runs LiSSA until
``||I_{k+1} - I_k|| <= delta``: a sampler saves time when its subset's curvature
lets the recursion reach the tolerance in fewer steps, and memory because the
subset is small. ``experiments/samplers_lissa.py`` drew 32-example minibatches from
the pool instead, so its step cost could not depend on the sampler and its stopping
rule never fired. Here, per cell (one sampler, pool size M, seed, damping):

* **LiSSA on the pool's full curvature** every step (``cj.lissa(..., batch_size=None)``
  on ``cj.DampedGGN(task, damping, curvature=pool)``, deterministic), the scale from
  the pool operator's power iteration, stopped when the relative increment falls below
  ``--tol``. Recorded: steps to tolerance, the recursion's warm seconds, the scale, the
  pool's and the full set's relative residuals, the **XLA scratch of the recursion**
  (``memory_analysis().temp_size_in_bytes`` of its compiled program, at the chunk that
  ran and with the whole pool in one chunk), and the error of each class's solution
  against the full set's exact one (``reference/<damping>``: CG to 1e-6), so that a
  faster sampler that captured less curvature shows as such;
* **class removal** ``theta_0 + Delta theta_c`` for every class c: the removed class's
  test accuracy and loss and the macro-F1 on the other classes, against retraining
  without c (``retrain``). At dampings 0.1 and 0.01 no first-order step removes a class
  here, so the ``cg/<damping>`` cells (default 1e-3) solve each pool's curvature by CG,
  where the step does move the removed class;
* the feature samplers cluster the trained model's **penultimate features** (LeNet-5's
  fc2, as the document's intrinsic features), not raw pixels.

Cells are resumable (``results/samplers_pool-<dataset>.cells.json``); the reference
solutions, too big for JSON, sit in ``benchmarks/_work`` with their sha256 in the cell
and are recomputed if missing. Run in one process: its peak resident set is not a
per-cell figure and is not recorded.

    python experiments/samplers_pool.py --quick                  # digits LeNet-5, classes 0 3 8
    python experiments/samplers_pool.py --parts lissa --seeds 3  # mnist5k LeNet-5, all classes
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings

import _common as ec
import jax
import jax.numpy as jnp
import numpy as np
import samplers_lissa as sl

import cif_jax as cj
from cif_jax.core.checkpoint import atomic_write
from cif_jax.solvers import lissa as L

SAMPLERS = ("uniform", "logit", "feature-topk (penultimate)", "feature-weighted (penultimate)")


def penultimate(task):
    """The trained model's penultimate features (LeNet-5 fc2, 84 wide) for every training example."""
    feats = cj.nnx_feature_fn(_model(task), layer=-1)
    H, _ = cj.stride_features(task, task.inputs, feature_fn=feats, batch_size=512)
    return np.asarray(H)


def _model(task):
    from flax import nnx

    return nnx.merge(task.apply_fn.graphdef, task.params, task.apply_fn.rest)


def _reference_path(cells, args, damping):
    """Named by the run's settings too, so that runs with other settings (``--output``) keep their own."""
    digest = hashlib.sha256(json.dumps(cells.settings, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(ec.WORKDIR, f"{ec.stem('samplers_pool', args)}-{digest}-ref-{damping:g}.npy")


def _sha(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def reference(cells, task, ds, classes, subsets, damping, args):
    """The full set's exact class-removal steps at ``damping`` (CG to ``--ref-rtol``), kept on disk."""
    path = _reference_path(cells, args, damping)

    def run():
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = cj.influence_solve(task, subsets, damping=damping, batch_size=args.batch_size,
                                     solver=cj.CG(rtol=args.ref_rtol, max_steps=args.max_steps))
            x = np.asarray(res.solutions, np.float32)
        os.makedirs(ec.WORKDIR, exist_ok=True)
        atomic_write(path, lambda f: np.save(f, x))
        return {"sha256": _sha(x), "seconds": time.perf_counter() - t, "steps": np.asarray(res.num_steps).tolist(),
                "warnings": [str(w.message)[:300] for w in caught],
                "residuals": np.asarray(res.residuals).tolist(), "metrics": sl._metrics(task, ds, x, classes)}

    got = cells(f"reference/{damping:g}", run)
    if not os.path.exists(path) or _sha(np.load(path)) != got["sha256"]:
        print(f"reference/{damping:g}: solutions missing or changed on disk; recomputing them", flush=True)
        cells.values.pop(f"reference/{damping:g}")
        got = cells(f"reference/{damping:g}", run)
    return np.load(path), got


def _errors(x, ref):
    return (np.linalg.norm(x - ref, axis=1) / np.linalg.norm(ref, axis=1)).tolist()


def _scratch_mib(task, rhs, pool, damping, scale, tol, chunk):
    """XLA's scratch for the deterministic recursion's compiled program, in MiB: the program ``cj.lissa`` runs
    (the task, pool and right-hand sides as arguments, not as constants folded into it), lowered and compiled
    again for its memory analysis."""
    idx, w = L._pool(task, pool)
    dt = task.dtype
    lowered = L._one_repeat.lower(task, rhs.astype(dt), idx, w, jnp.asarray(damping, dt), jnp.asarray(scale, dt),
                                  jnp.asarray(10, jnp.int32), jnp.asarray(tol, dt), None, jax.random.key(0), chunk)
    mem = lowered.compile().compiled.memory_analysis()
    return None if mem is None else mem.temp_size_in_bytes / 2**20


def lissa_cell(task, ds, classes, rhs, ref, damping, sampler, m, seed, features, args):
    t0 = time.perf_counter()
    pool = sl._pool(sampler, m, seed, task, ds, features)
    sample_seconds = time.perf_counter() - t0
    size = task.num_examples if pool is None else int(pool.indices.shape[0])
    op = cj.DampedGGN(task, damping=damping, curvature=pool, batch_size=args.batch_size)
    key = jax.random.key(seed)
    # Warm-up: compiles the power iteration, the recursion (its depth is traced) and the residual check; its
    # scale is the pool operator's 1.5 x top eigenvalue, reused by the timed run.
    t = time.perf_counter()
    warm = cj.lissa(op, rhs, scale="auto", depth=1, key=key, batch_size=None)
    scale = float(warm.scale)
    compile_seconds = time.perf_counter() - t
    t = time.perf_counter()
    res = cj.lissa(op, rhs, scale=scale, depth=args.cap, tol=args.tol, key=key, batch_size=None)
    x = np.asarray(jax.block_until_ready(res.solutions))
    solve_seconds = time.perf_counter() - t
    # The timed call ends with the residual check (Q products on the full set and Q on the pool); time it
    # alone so the recursion's own seconds are known.
    idx, w = L._pool(task, pool)
    t = time.perf_counter()
    jax.block_until_ready(L._residuals(task, rhs, res.solutions, idx, w, jnp.asarray(damping, task.dtype),
                                       args.batch_size))
    check_seconds = time.perf_counter() - t
    steps = np.asarray(res.num_steps)
    return {"pool_size": size, "sample_seconds": sample_seconds, "compile_seconds": compile_seconds,
            "solve_seconds": solve_seconds, "residual_check_seconds": check_seconds,
            "recursion_seconds": solve_seconds - check_seconds, "scale": scale,
            "steps": steps.tolist(), "hit_cap": bool((steps >= args.cap).any()),
            "last_increment": np.asarray(res.last_increment).tolist(),
            "pool_residuals": np.asarray(res.pool_residuals).tolist(), "residuals": np.asarray(res.residuals).tolist(),
            "error_vs_full": _errors(x, ref),
            "xla_temp_mib": _scratch_mib(task, rhs, pool, damping, scale, args.tol, args.batch_size),
            "xla_temp_mib_one_chunk": _scratch_mib(task, rhs, pool, damping, scale, args.tol, size),
            "metrics": sl._metrics(task, ds, x, classes), "seconds": time.perf_counter() - t0}


def cg_cell(task, ds, classes, subsets, ref, damping, sampler, m, seed, features, args):
    t0 = time.perf_counter()
    pool = sl._pool(sampler, m, seed, task, ds, features)
    with warnings.catch_warnings(record=True) as caught:  # kept in the cell, not printed
        warnings.simplefilter("always")
        res = cj.influence_solve(task, subsets, damping=damping, curvature=pool, batch_size=args.batch_size,
                                 solver=cj.CG(rtol=args.cg_rtol, max_steps=args.max_steps))
        x = np.asarray(jax.block_until_ready(res.solutions))
    return {"pool_size": task.num_examples if pool is None else int(pool.indices.shape[0]),
            "solve_seconds_with_compile": time.perf_counter() - t0, "steps": np.asarray(res.num_steps).tolist(),
            "residuals": np.asarray(res.residuals).tolist(), "error_vs_full": _errors(x, ref),
            "warnings": [str(w.message)[:300] for w in caught], "metrics": sl._metrics(task, ds, x, classes)}


def summarise(cells):
    """Per (part, damping, sampler, M): means over seeds, and paired differences against uniform at the same M
    and seed (mean and 2 standard errors)."""
    rows = {}
    for key, r in cells.values.items():
        part, damping, sampler, m, seed = (key.split("/") + [None] * 5)[:5]
        if part not in ("lissa", "cg"):
            continue
        rows[(part, float(damping), sampler, int(m[1:]), int(seed[4:]))] = r
    figures = {"lissa": ("recursion_seconds", "steps", "xla_temp_mib", "error_vs_full", "macro_f1_rest",
                         "self_accuracy"),
               "cg": ("steps", "error_vs_full", "macro_f1_rest", "self_accuracy", "self_loss")}

    def value(r, name):
        if name in ("macro_f1_rest", "self_accuracy", "self_loss"):
            return r["metrics"][name]
        v = r[name]
        return float(np.mean(v)) if isinstance(v, list) else v

    out = []
    for part, damping, sampler, m in sorted({k[:4] for k in rows}, key=lambda g: (g[0], -g[1], g[2], g[3])):
        seeds = sorted(k[4] for k in rows if k[:4] == (part, damping, sampler, m))
        row = {"part": part, "damping": damping, "sampler": sampler, "M": m, "seeds": seeds,
               "pool_size": float(np.mean([rows[(part, damping, sampler, m, s)]["pool_size"] for s in seeds]))}
        for name in figures[part]:
            vals = [value(rows[(part, damping, sampler, m, s)], name) for s in seeds]
            if all(v is not None for v in vals):
                row[name] = float(np.mean(vals))
        paired = [s for s in seeds if (part, damping, "uniform", m, s) in rows]
        if sampler not in ("uniform", "full") and paired:
            rel = {}
            for name in figures[part]:
                a = [value(rows[(part, damping, sampler, m, s)], name) for s in paired]
                b = [value(rows[(part, damping, "uniform", m, s)], name) for s in paired]
                if any(v is None for v in a + b):
                    continue
                d = np.asarray(a) - np.asarray(b)
                se = float(np.std(d, ddof=1) / np.sqrt(d.size)) if d.size > 1 else None
                rel[name] = {"mean_difference": float(d.mean()), "two_se": None if se is None else 2 * se,
                             "relative_to_uniform": float(d.mean() / np.mean(b)) if np.mean(b) else None}
            row["vs_uniform"] = rel
        out.append(row)
    return out


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["lissa", "cg"], choices=["lissa", "cg"])
    p.add_argument("--dampings", type=float, nargs="+", default=[0.1], help="LiSSA's dampings")
    p.add_argument("--cg-damping", type=float, default=1e-3, help="the damping of the CG class-removal cells")
    p.add_argument("--samplers", nargs="+", default=None, help=f"subset of {SAMPLERS} (default all, plus 'full')")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="pool sizes M (quick 100 400; full 200 800 1600)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per sampler and M (quick 2, full 3)")
    p.add_argument("--classes", type=int, nargs="+", default=None)
    p.add_argument("--cap", type=int, default=20_000, help="LiSSA's step cap")
    p.add_argument("--tol", type=float, default=1e-5, help="LiSSA stops when an increment is this small, relative")
    p.add_argument("--cg-rtol", type=float, default=1e-4, help="the CG cells' relative residual on the pool")
    p.add_argument("--ref-rtol", type=float, default=1e-6, help="the full-set reference's relative residual")
    args = ec.finish_args(p.parse_args())
    sizes = args.sizes or ([100, 400] if args.quick else [200, 800, 1600])
    seeds = args.seeds or (2 if args.quick else 3)
    samplers = args.samplers or SAMPLERS
    unknown = sorted(set(samplers) - set(SAMPLERS) - {"full"})
    if unknown:
        raise SystemExit(f"--samplers: unknown {unknown}; known: {list(SAMPLERS)}")
    # Cell keys name part, damping, sampler, M and seed: those lists stay out of the settings, so a run with
    # fewer of them is a slice that a later run extends.
    cells = ec.Cells("samplers_pool", args, {k: v for k, v in vars(args).items()
                                             if k not in ("output", "parts", "dampings", "samplers", "sizes", "seeds")})
    task, ds, classes, subsets = sl._setup(args)
    cells.check_model("base", task)
    features = penultimate(task)
    base = cells("base", lambda: {"metrics": sl._metrics(task, ds, [np.zeros(task.num_params)] * len(classes),
                                                         classes)})

    def retrain():
        t = time.perf_counter()
        return {"metrics": sl.retrain_metrics(task, ds, classes, subsets, args), "seconds": time.perf_counter() - t}

    ret = cells("retrain", retrain)["metrics"]
    print(f"base: macro-F1 rest {base['metrics']['macro_f1_rest']:.4f}, self-acc {base['metrics']['self_accuracy']:.3f}"
          f"; retrain: {ret['macro_f1_rest']:.4f}, {ret['self_accuracy']:.3f}", flush=True)
    rhs = cj.subset_gradient_sums(task, subsets, batch_size=args.batch_size) / task.num_examples
    plan = [("full", 0, 0)] + [(s, m, k) for s in samplers if s != "full" for m in sizes for k in range(seeds)]
    for part in args.parts:
        for damping in (args.dampings if part == "lissa" else [args.cg_damping]):
            ref, got = reference(cells, task, ds, classes, subsets, damping, args)
            print(f"[{part} {damping:g}] reference: {max(got['steps'])} CG steps, F1 rest "
                  f"{got['metrics']['macro_f1_rest']:.4f}, self-acc {got['metrics']['self_accuracy']:.3f}", flush=True)
            for sampler, m, seed in plan:
                key = f"{part}/{damping:g}/{sampler}/M{m}/seed{seed}"
                if part == "lissa":
                    r = cells(key, lambda: lissa_cell(task, ds, classes, rhs, ref, damping, sampler, m, seed,
                                                      features, args))
                    print(f"[lissa {damping:g}] {sampler:31s} M={m:5d} s{seed}: pool {r['pool_size']}, "
                          f"{max(r['steps'])} steps{' (cap)' if r['hit_cap'] else ''}, {r['recursion_seconds']:.1f} s, "
                          f"scale {r['scale']:.3g}, err vs full {np.mean(r['error_vs_full']):.3f}, pool res "
                          f"{max(r['pool_residuals']):.1e}, scratch {r['xla_temp_mib']:.0f} MiB, F1 rest "
                          f"{r['metrics']['macro_f1_rest']:.4f}, self-acc {r['metrics']['self_accuracy']:.3f}",
                          flush=True)
                else:
                    r = cells(key, lambda: cg_cell(task, ds, classes, subsets, ref, damping, sampler, m, seed,
                                                   features, args))
                    print(f"[cg {damping:g}] {sampler:31s} M={m:5d} s{seed}: pool {r['pool_size']}, "
                          f"{max(r['steps'])} steps, err vs full {np.mean(r['error_vs_full']):.3f}, F1 rest "
                          f"{r['metrics']['macro_f1_rest']:.4f}, self-acc {r['metrics']['self_accuracy']:.3f}",
                          flush=True)
    references = {k: {kk: vv for kk, vv in v.items() if kk != "sha256"} for k, v in cells.values.items()
                  if k.startswith("reference/")}
    ec.write("samplers_pool", args, {**ec.task_info(task, ds, args), "classes": classes,
                                     "lissa_tol": args.tol, "lissa_cap": args.cap, "cg_rtol": args.cg_rtol,
                                     "base": base, "retrain": {"metrics": ret}, "references": references,
                                     "summary": summarise(cells), "cell_runs": cells.runs})


if __name__ == "__main__":
    main()
