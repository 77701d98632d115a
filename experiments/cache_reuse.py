"""Table 1: one CiF cache per C answers both K = 50 and K = 100 fold workloads.

IF pays one damped-GGN solve per fold (150 in all); CiF builds one cache per C
(sketch, k-means, means, C solves) and answers both workloads from it. Reports IF
time, CiF time, speedup and fold-level Pearson/Spearman with 95% bootstrap
percentile intervals, for plain CG (the paper's way) and, with ``--solvers plain
nystrom``, with one Nystrom preconditioner shared by every IF and CiF solve (its
build time is counted in both totals).

Every cache answers with both estimators: the corrected one (the library default:
the paper's score plus the cached self-influence terms of the fold's members,
issue #17) and the paper's (eq. 11). The cross-fold workload of the paper's
section 5.4 (remove fold t, evaluate fold v != t: no overlap, no correction, the
clusters alone answer) comes free from the same solves and the same alphas.

    python experiments/cache_reuse.py --quick     # digits / LeNet-5, rtol 1e-3
    python experiments/cache_reuse.py             # mnist5k / LeNet-5, rtol 1e-4
    python experiments/cache_reuse.py --dataset cifar10 --data-dir DIR   # paper's setting, GPU
"""

from __future__ import annotations

import _common as ec
import numpy as np


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--clusters", type=int, nargs="+", default=[10, 50])
    p.add_argument("--k", type=int, nargs="+", default=[50, 100])
    p.add_argument("--sketch-dim", type=int, default=32)
    p.add_argument("--bootstrap", type=int, default=10_000)
    p.add_argument("--solvers", nargs="+", default=None, choices=("plain", "nystrom"),
                   help="plain CG (the paper) and/or a shared Nystrom preconditioner (default: both)")
    args = ec.finish_args(p.parse_args())
    solvers = args.solvers or ["plain", "nystrom"]
    task, ds = ec.trained_task(args.dataset, args.model, seed=args.seed)
    n = task.num_examples
    print(f"{args.dataset}/{args.model}: N = {n}, p = {task.num_params:,}")
    folds = {k: ec.folds_for(n, k, args.seed) for k in args.k}

    runs = []
    for solver in solvers:
        pre, pre_info = (None, {"kind": "none", "seconds": 0.0}) if solver == "plain" else ec.nystrom(task, args)
        ifs, if_info, if_mat = {}, {}, {}
        for k in args.k:
            ifs[k], if_info[k], if_mat[k] = ec.if_fold_scores(task, folds[k], args, pre, return_matrix=True)
            print(f"[{solver}] IF K = {k}: {if_info[k]['seconds']:.1f} s, max residual {if_info[k]['max_residual']:.2g}")
        if_total = sum(x["seconds"] for x in if_info.values()) + pre_info["seconds"]
        for c in args.clusters:
            cache, warns = ec.build_cache(task, args, num_clusters=c, sketch_dim=args.sketch_dim, preconditioner=pre)
            timing = ec.cache_timing(cache)
            per_k, query = [], 0.0
            for k in args.k:
                cif, paper, matrix, secs = ec.cif_fold_estimators(cache, task, folds[k], args)
                query += secs
                corr = ec.correlations(cif, ifs[k], resamples=args.bootstrap, seed=args.seed)
                corr_paper = ec.correlations(paper, ifs[k], resamples=args.bootstrap, seed=args.seed)
                per_k.append({"K": k, "cif_query_seconds": secs, "if_seconds": if_info[k]["seconds"],
                              "if_max_residual": if_info[k]["max_residual"],
                              "if_mean_steps": if_info[k]["mean_steps"], **corr,
                              "median_ratio": float(np.median(cif / ifs[k])),
                              "paper": {**corr_paper, "median_ratio": float(np.median(paper / ifs[k]))},
                              "cross_fold": ec.off_diagonal_agreement(matrix, if_mat[k]),
                              "fold_scores_cif": cif.tolist(), "fold_scores_paper": paper.tolist(),
                              "fold_scores_if": ifs[k].tolist()})
            cif_total = timing["total"] + query + pre_info["seconds"]
            row = {"solver": solver, "preconditioner": pre_info, "C": c, "if_seconds_total": if_total,
                   "cif_seconds_total": cif_total, "cif_build_seconds": timing["total"], "cif_timings": timing,
                   "speedup": if_total / cif_total, "cache_max_residual": float(np.max(cache.residuals)),
                   "cluster_sizes": np.asarray(cache.cluster_sizes).tolist(), "warnings": warns, "per_k": per_k,
                   "correction": {"method": cache.correction.method, "scale": float(cache.correction.scale),
                                  "scale_stderr": float(cache.correction.scale_stderr)}}
            runs.append(row)
            print(f"[{solver}] C = {c}: IF {if_total:.1f} s, CiF {cif_total:.1f} s, speedup {row['speedup']:.1f}x; "
                  + "; ".join(f"K={x['K']}: corrected {x['pearson']['value']:.3f}/{x['spearman']['value']:.3f} "
                              f"(paper {x['paper']['pearson']['value']:.3f}/{x['paper']['spearman']['value']:.3f}, "
                              f"cross-fold {x['cross_fold']['pearson']:.3f}/{x['cross_fold']['spearman']:.3f})"
                              for x in per_k))

    result = {**ec.task_info(task, ds, args), "sketch_dim": args.sketch_dim, "bootstrap": args.bootstrap,
              "K": args.k, "clusters": args.clusters,
              "timing_note": "IF time: the solves of all sum(K) folds (+ the shared preconditioner's build); CiF "
                             "time: one cache build per C + the queries of every K (+ the same preconditioner). "
                             "Both include their own JIT compilation, as `cif-jax cv`.",
              "runs": runs}
    ec.write("cache_reuse", args, result)
    _plot(result, args)


def _plot(r, args):
    plt = ec.pyplot()
    runs = [x for x in r["runs"] if x["solver"] == r["runs"][0]["solver"]]
    fig, axes = plt.subplots(len(runs), len(r["K"]), figsize=(4.2 * len(r["K"]), 3.8 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs):
        for ax, x in zip(row, run["per_k"]):
            a, b = np.asarray(x["fold_scores_if"]), np.asarray(x["fold_scores_cif"])
            c = np.asarray(x["fold_scores_paper"])
            ax.scatter(a, c, s=8, c="tab:gray", label="paper (eq. 11)")
            ax.scatter(a, b, s=10, label="corrected")
            ax.legend(fontsize=7, loc="upper left")
            lo, hi = min(a.min(), b.min(), c.min()), max(a.max(), b.max(), c.max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set_xlabel("IF fold loss change")
            ax.set_ylabel("CiF fold loss change")
            ax.set_title(f"C={run['C']}, K={x['K']}: r={x['pearson']['value']:.3f}, rho={x['spearman']['value']:.3f}",
                         fontsize=9)
    fig.suptitle(f"Cache reuse ({r['dataset']}/{r['model']}, {runs[0]['solver']} CG, rtol {r['rtol']:g})")
    fig.tight_layout()
    fig.savefig(ec.figure_path("cache_reuse", args, "-scatter"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    labels = [f"{x['solver']}\nC={x['C']}" for x in r["runs"]]
    pos = np.arange(len(labels))
    ax.bar(pos - 0.2, [x["if_seconds_total"] for x in r["runs"]], 0.4, label="IF (all folds)", color="tab:gray")
    ax.bar(pos + 0.2, [x["cif_seconds_total"] for x in r["runs"]], 0.4, label="CiF (build + queries)",
           color="tab:blue")
    for i, x in enumerate(r["runs"]):
        ax.text(i, max(x["if_seconds_total"], x["cif_seconds_total"]), f"{x['speedup']:.1f}x", ha="center",
                va="bottom")
    ax.set_xticks(pos, labels)
    ax.set_ylabel("seconds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ec.figure_path("cache_reuse", args, "-times"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
