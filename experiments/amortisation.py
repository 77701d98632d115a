"""Fig. 3: speedup of CiF over IF as a function of the cluster budget C and the query count Q.

Measured components, per solver setting:

* ``t_IHVP``: seconds per per-query IF solve, from IF on ``--if-folds`` real
  fold queries solved in blocks of ``--rhs-batch-size`` as ``cif-jax cv`` does;
* for each C, a real cache build: ``t_over`` = gradients+sketch + k-means +
  cluster means (+ the scatter pass the library adds for the bound, reported
  apart), and the C cluster solves;
* ``t_lin``: seconds per CiF query, from answering ``--queries`` fold queries.

The speedup at (C, Q) is ``Q t_IHVP / (build(C) + Q t_lin)`` with every term
measured above (Q is a grid, not Q separate runs); the break-even line is the
paper's ``Q = C + t_over / t_IHVP`` (with ``t_over`` averaged over C) and the
exact measured crossing ``Q* = build(C) / (t_IHVP - t_lin)`` is drawn beside it.

    python experiments/amortisation.py --quick   # digits / LeNet-5, plain CG, C in 5 10 20
    python experiments/amortisation.py           # mnist5k / LeNet-5, C in 10..500, plain + Nystrom
"""

from __future__ import annotations

import _common as ec
import numpy as np


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--clusters", type=int, nargs="+", default=None, help="quick: 5 10 20; full: 10 50 100 500")
    p.add_argument("--if-folds", type=int, default=None, help="IF queries timed (quick 16, full 64)")
    p.add_argument("--queries", type=int, default=100, help="fold queries answered to time t_lin (K)")
    p.add_argument("--sketch-dim", type=int, default=32)
    p.add_argument("--solvers", nargs="+", default=None, choices=("plain", "nystrom"),
                   help="quick: plain; full: plain nystrom")
    args = ec.finish_args(p.parse_args())
    clusters = args.clusters or ([5, 10, 20] if args.quick else [10, 50, 100, 500])
    if_folds = args.if_folds or (16 if args.quick else 64)
    solvers = args.solvers or (["plain"] if args.quick else ["plain", "nystrom"])
    task, ds = ec.trained_task(args.dataset, args.model, seed=args.seed)
    n = task.num_examples
    print(f"{args.dataset}/{args.model}: N = {n}, p = {task.num_params:,}")
    queries = ec.folds_for(n, args.queries, args.seed)
    rng = np.random.default_rng(args.seed)
    if_queries = [queries[i] for i in np.sort(rng.choice(len(queries), min(if_folds, len(queries)), replace=False))]

    settings = []
    for solver in solvers:
        pre, pre_info = (None, {"kind": "none", "seconds": 0.0}) if solver == "plain" else ec.nystrom(task, args)
        ec.if_fold_scores(task, if_queries[:1], args, pre)  # compile the solve once, untimed
        _, if_info = ec.if_fold_scores(task, if_queries, args, pre)
        t_ihvp = if_info["seconds"] / len(if_queries)
        print(f"[{solver}] t_IHVP = {t_ihvp:.3f} s per query ({len(if_queries)} queries)")
        builds = []
        for c in clusters:
            cache, warns = ec.build_cache(task, args, num_clusters=c, sketch_dim=args.sketch_dim, preconditioner=pre)
            ec.cif_fold_scores(cache, task, queries, args)  # compile the query path once, untimed
            _, q_secs = ec.cif_fold_scores(cache, task, queries, args)
            t = ec.cache_timing(cache)
            t_over = t["gradients+sketch"] + t["kmeans"] + t["cluster means"]
            build = t["total"] + pre_info["seconds"]
            builds.append({"C": c, "timings": t, "t_over": t_over, "t_solves": t["solves"],
                           "t_solve_per_cluster": t["solves"] / c, "build_seconds": build,
                           "t_lin": q_secs / len(queries), "measured_breakeven_Q": build / (t_ihvp - q_secs /
                                                                                            len(queries)),
                           "warnings": warns})
            print(f"[{solver}] C = {c}: t_over {t_over:.1f} s, solves {t['solves']:.1f} s "
                  f"({t['solves'] / c:.2f} s each), t_lin {q_secs / len(queries) * 1e3:.2f} ms")
        t_over_mean = float(np.mean([b["t_over"] for b in builds]))
        settings.append({"solver": solver, "preconditioner": pre_info, "t_ihvp": t_ihvp, "if": if_info,
                         "t_over_mean": t_over_mean, "paper_breakeven_offset": t_over_mean / t_ihvp,
                         "builds": builds})
        print(f"[{solver}] break-even Q = C + t_over/t_IHVP = C + {t_over_mean / t_ihvp:.1f}")

    q_grid = np.unique(np.round(np.logspace(0, np.log10(max(5000, 20 * max(clusters))), 40)).astype(int))
    for s in settings:
        s["q_grid"] = q_grid.tolist()
        s["speedup"] = [[q * s["t_ihvp"] / (b["build_seconds"] + q * b["t_lin"]) for q in q_grid] for b in s["builds"]]
    result = {**ec.task_info(task, ds, args), "sketch_dim": args.sketch_dim, "clusters": clusters,
              "if_queries_timed": len(if_queries), "t_lin_queries": len(queries), "settings": settings,
              "note": "speedup(C, Q) = Q t_IHVP / (build(C) + Q t_lin), each term measured; build includes "
                      "the scatter pass and, for nystrom, the preconditioner's build."}
    ec.write("amortisation", args, result)
    _plot(result, args)


def _plot(r, args):
    plt = ec.pyplot()
    from matplotlib.colors import TwoSlopeNorm

    fig, axes = plt.subplots(1, len(r["settings"]), figsize=(5.5 * len(r["settings"]), 4.2), squeeze=False)
    for ax, s in zip(axes[0], r["settings"]):
        cs = np.asarray(r["clusters"])
        q = np.asarray(s["q_grid"])
        sp = np.asarray(s["speedup"])
        norm = TwoSlopeNorm(vcenter=1.0, vmin=min(sp.min(), 0.5), vmax=max(sp.max(), 2.0))
        mesh = ax.pcolormesh(q, np.arange(len(cs)), sp, cmap="RdBu", norm=norm, shading="nearest")
        ax.set_xscale("log")
        ax.set_yticks(np.arange(len(cs)), [str(c) for c in cs])
        ax.plot(cs + s["paper_breakeven_offset"], np.arange(len(cs)), "k--", label="Q = C + t_over/t_IHVP")
        ax.plot([b["measured_breakeven_Q"] for b in s["builds"]], np.arange(len(cs)), "k:", label="measured Q*")
        ax.set_xlabel("queries Q")
        ax.set_ylabel("cluster budget C")
        ax.set_title(f"{s['solver']} CG: t_IHVP {s['t_ihvp']:.2f} s, t_over {s['t_over_mean']:.1f} s", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        fig.colorbar(mesh, ax=ax, label="speedup IF/CiF")
    fig.suptitle(f"Amortisation ({r['dataset']}/{r['model']}, rtol {r['rtol']:g})")
    fig.tight_layout()
    fig.savefig(ec.figure_path("amortisation", args), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
