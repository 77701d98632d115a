"""Table 3: system profile of IF and CiF on a K-fold workload (K = 50 + 100 = 150 queries by default).

For each cache size C: cache storage (4 C p bytes for float32 responses; the
measured ``responses.nbytes`` beside it), offline overhead (gradients + sketch +
k-means; cluster means and the library's scatter pass reported apart), the C
IHVP solves, total build, per-query latency (one fold's CiF loss change, from
answering all folds) and the total time of the workload. For IF: no storage,
seconds per query (one solve + its evaluation gradient, timed on ``--if-folds``
folds) and the workload total (per-query time x queries; extrapolated when
``--if-folds`` is below the number of queries, which the JSON says).

    python experiments/system_profile.py --quick   # digits / LeNet-5, C in 10 50, plain CG
    python experiments/system_profile.py           # mnist5k / LeNet-5, C in 10 50 100, library defaults
"""

from __future__ import annotations

import _common as ec
import numpy as np


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--clusters", type=int, nargs="+", default=None, help="quick: 10 50; full: 10 50 100 500")
    p.add_argument("--k", type=int, nargs="+", default=[50, 100])
    p.add_argument("--if-folds", type=int, default=None, help="IF folds timed (quick 16; full: all)")
    p.add_argument("--sketch-dim", type=int, default=32)
    p.add_argument("--solvers", nargs="+", default=None, choices=("default", "plain", "nystrom"),
                   help="default: the library's (cj.CG(), preconditioner 'auto', per call); plain: CG without a "
                        "preconditioner; nystrom: one shared Nystrom (quick: plain; full: default)")
    args = ec.finish_args(p.parse_args())
    clusters = args.clusters or ([10, 50] if args.quick else [10, 50, 100])
    solvers = args.solvers or (["plain"] if args.quick else ["default"])
    settings = {**{k: v for k, v in vars(args).items() if k != "output"}, "clusters": clusters,
                "solvers": solvers}
    store = ec.Cells("system_profile", args, settings)
    task, ds = ec.trained_task(args.dataset, args.model, seed=args.seed)
    n, num_params = task.num_examples, task.num_params
    print(f"{args.dataset}/{args.model}: N = {n}, p = {num_params:,}")
    folds = [f for k in args.k for f in ec.folds_for(n, k, args.seed)]
    q = len(folds)
    if_n = min(args.if_folds or (16 if args.quick else q), q)
    rng = np.random.default_rng(args.seed)
    if_sel = [folds[i] for i in np.sort(rng.choice(q, if_n, replace=False))]

    rows = []
    for solver in solvers:
        needed = [f"{solver}/IF"] + [f"{solver}/C{c}" for c in clusters]
        if solver == "nystrom":
            pre, pre_info = ec.shared_nystrom(store, task, args, f"{solver}/preconditioner", needed)
        else:
            pre, pre_info = ("auto" if solver == "default" else None), {"kind": solver, "seconds": 0.0}

        def if_cell():
            # Compile the solve once, untimed, on as many folds as are timed (the same shapes).
            ec.if_fold_scores(task, if_sel, args, pre)
            _, info = ec.if_fold_scores(task, if_sel, args, pre)
            per_query = info["seconds"] / if_n
            return {"method": "IF", "solver": solver, "C": None, "storage_bytes": 0,
                    "per_query_seconds": per_query, "total_seconds": per_query * q + pre_info["seconds"],
                    "if_queries_timed": if_n, "extrapolated": if_n < q, "mean_steps": info["mean_steps"],
                    "preconditioner_seconds": pre_info["seconds"]}

        rows.append(store(f"{solver}/IF", if_cell))
        print(f"[{solver}] IF: {rows[-1]['per_query_seconds']:.2f} s per query, total "
              f"{rows[-1]['total_seconds']:.1f} s for {q} queries")

        def cif_cell(c):
            cache, warns = ec.build_cache(task, args, num_clusters=c, sketch_dim=args.sketch_dim, preconditioner=pre)
            ec.cif_fold_scores(cache, task, folds, args)  # compile the query path once, untimed
            _, q_secs = ec.cif_fold_scores(cache, task, folds, args)
            t = ec.cache_timing(cache)
            overhead = t["gradients+sketch"] + t["kmeans"]
            build = t["total"] + pre_info["seconds"]
            return {"method": "CiF", "solver": solver, "C": c, "storage_bytes": 4 * c * num_params,
                    "responses_nbytes": int(cache.responses.nbytes), "overhead_seconds": overhead,
                    "means_seconds": t["cluster means"], "scatter_seconds": t["scatter"],
                    "solves_seconds": t["solves"], "correction_seconds": t.get("correction", 0.0),
                    "build_seconds": build, "cache_solver": cache.solver,
                    "preconditioner_seconds": pre_info["seconds"], "per_query_seconds": q_secs / q,
                    "total_seconds": build + q_secs, "timings": t, "warnings": warns}

        for c in clusters:
            rows.append(store(f"{solver}/C{c}", lambda c=c: cif_cell(c)))
            r = rows[-1]
            print(f"[{solver}] CiF C = {c}: storage {r['storage_bytes'] / 2**20:.2f} MiB, overhead "
                  f"{r['overhead_seconds']:.1f} s, solves {r['solves_seconds']:.1f} s, build {r['build_seconds']:.1f} s, "
                  f"{r['per_query_seconds'] * 1e3:.2f} ms per query")
    result = {**ec.task_info(task, ds, args), "sketch_dim": args.sketch_dim, "K": args.k, "queries": q,
              "clusters": clusters, "rows": rows, "cell_runs": store.runs}
    ec.write("system_profile", args, result)
    _plot(result, args)


def _plot(r, args):
    plt = ec.pyplot()
    cif = [x for x in r["rows"] if x["method"] == "CiF"]
    ifs = {x["solver"]: x for x in r["rows"] if x["method"] == "IF"}
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    labels = [f"{x['solver']}\nC={x['C']}" for x in cif]
    pos = np.arange(len(cif))
    bottom = np.zeros(len(cif))
    phases = ["shared preconditioner"] + [k for k in dict.fromkeys(k for x in cif for k in x["timings"]) if k != "total"]
    for phase in phases:
        vals = np.asarray([x["preconditioner_seconds"] if phase == "shared preconditioner"
                           else x["timings"].get(phase, 0.0) for x in cif])
        if vals.any():
            ax.bar(pos, vals, 0.6, bottom=bottom, label=phase)
            bottom += vals
    for i, x in enumerate(cif):
        ax.hlines(ifs[x["solver"]]["total_seconds"], i - 0.35, i + 0.35, colors="k", linestyles="--")
    ax.set_xticks(pos, labels)
    ax.set_ylabel("seconds")
    ax.set_title(f"CiF build vs IF total for {r['queries']} queries (dashed), {r['dataset']}/{r['model']}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ec.figure_path("system_profile", args), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
