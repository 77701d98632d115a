"""Table 1: one CiF cache per C answers both K = 50 and K = 100 fold workloads.

IF pays one damped-GGN solve per fold (150 in all); CiF builds one cache per C
(sketch, k-means, means, C solves) and answers both workloads from it. Reports IF
time, CiF time, speedup and fold-level Pearson/Spearman with 95% bootstrap
percentile intervals, for plain CG (the paper's way) and, with ``--solvers plain
nystrom``, with one Nystrom preconditioner shared by every IF and CiF solve (its
build time is counted in both totals).

Every cache answers with three estimators: the library default (``estimator="hybrid"``:
the clusters plus each removed example's deviation through the cache's low-rank
factors, and the self terms over the overlap), the corrected one (the paper's score
plus the cached self-influence terms of the fold's members, issue #17) and the
paper's (eq. 11). The cross-fold workload of the paper's section 5.4 (remove fold t,
evaluate fold v != t: no overlap, no self term) comes free from the same solves and
the same alphas; there the paper's estimator has only the clusters, the default the
clusters and the deviations.

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
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training/fold/cache seeds (quick: --seed; full: 0 10 100, the paper's)")
    p.add_argument("--sketch-dim", type=int, default=32)
    p.add_argument("--bootstrap", type=int, default=10_000)
    p.add_argument("--solvers", nargs="+", default=None, choices=("default", "plain", "nystrom"),
                   help="default: the library's (cj.CG(), preconditioner 'auto', per call); plain: CG without "
                        "a preconditioner (the paper's); nystrom: one adaptive-rank Nystrom shared by every IF "
                        "and CiF solve (its build charged to both). Quick: plain nystrom; full: default")
    args = ec.finish_args(p.parse_args())
    solvers = args.solvers or (["plain", "nystrom"] if args.quick else ["default"])
    seeds = args.seeds or ([args.seed] if args.quick else [0, 10, 100])
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "seed", "seeds", "solvers")}
    # A full run with fewer seeds than the paper's three writes files of its own, so that it never
    # replaces the three-seed table.
    name = "cache_reuse" if args.quick or args.seeds is None else "cache_reuse-seeds" + "-".join(map(str, seeds))
    args.name = name
    cells = ec.Cells(name, args, settings)

    runs, info = [], None
    for seed in seeds:
        args.seed = seed
        task, ds = ec.trained_task(args.dataset, args.model, seed=seed)
        cells.check_model(f"seed{seed}", task)
        info = info or ec.task_info(task, ds, args)
        n = task.num_examples
        print(f"{args.dataset}/{args.model} seed {seed}: N = {n}, p = {task.num_params:,}")
        folds = {k: ec.folds_for(n, k, seed) for k in args.k}
        for solver in solvers:
            runs.extend(_solver_runs(cells, task, folds, args, seed, solver))

    result = {**info, "seed": None, "seeds": seeds, "sketch_dim": args.sketch_dim, "bootstrap": args.bootstrap,
              "K": args.k, "clusters": args.clusters, "solvers": solvers,
              "timing_note": "IF time: the solves of all sum(K) folds (+ the shared preconditioner's build); CiF "
                             "time: one cache build per C + the queries of every K (+ the same preconditioner). "
                             "Both include their own JIT compilation, as `cif-jax cv`. Each cell's seconds come "
                             "from the run that computed it (`cell_runs`).",
              "summary": _summary(runs, solvers, args), "runs": runs, "cell_runs": cells.runs}
    ec.write(name, args, result)
    _plot(result, args)


def _solver_runs(cells, task, folds, args, seed, solver):
    """The rows of one (seed, solver): IF on every fold of every K, then one cache per C."""
    prefix = f"seed{seed}/{solver}"
    pre, pre_info = None, {"kind": "plain" if solver == "plain" else "auto", "seconds": 0.0}
    needed = [f"{prefix}/IF/K{k}" for k in args.k] + [f"{prefix}/C{c}/every-query" for c in args.clusters]
    if solver == "nystrom":
        pre, pre_info = ec.shared_nystrom(cells, task, args, f"{prefix}/preconditioner", needed)
    preconditioner = "auto" if solver == "default" else pre

    def if_cell(k):
        scores, if_info, matrix = ec.if_fold_scores(task, folds[k], args, preconditioner, return_matrix=True)
        print(f"[seed {seed}, {solver}] IF K = {k}: {if_info['seconds']:.1f} s, "
              f"max residual {if_info['max_residual']:.2g}, {if_info['mean_steps']:.1f} steps")
        return {**if_info, "scores": scores.tolist(), "matrix": matrix.tolist()}

    ifs = {k: cells(f"{prefix}/IF/K{k}", lambda k=k: if_cell(k)) for k in args.k}
    if_total = sum(x["seconds"] for x in ifs.values()) + pre_info["seconds"]

    def cif_cell(c):
        cache, warns = ec.build_cache(task, args, num_clusters=c, sketch_dim=args.sketch_dim,
                                      preconditioner=preconditioner, seed=seed)
        timing = ec.cache_timing(cache)
        per_k, query = [], 0.0
        for k in args.k:
            if_scores, if_mat = np.asarray(ifs[k]["scores"]), np.asarray(ifs[k]["matrix"])
            est = ec.cif_fold_estimators(cache, task, folds[k], args)
            cif, paper, matrix, secs = est.corrected, est.paper, est.paper_matrix, est.seconds
            query += secs
            per_k.append({"K": k, "cif_query_seconds": secs, "if_seconds": ifs[k]["seconds"],
                          "if_max_residual": ifs[k]["max_residual"], "if_mean_steps": ifs[k]["mean_steps"],
                          **ec.correlations(cif, if_scores, resamples=args.bootstrap, seed=seed),
                          "median_ratio": float(np.median(cif / if_scores)),
                          "paper": {**ec.correlations(paper, if_scores, resamples=args.bootstrap, seed=seed),
                                    "median_ratio": float(np.median(paper / if_scores))},
                          "cross_fold": ec.off_diagonal_agreement(matrix, if_mat),
                          "default": {**ec.correlations(est.default, if_scores, resamples=args.bootstrap, seed=seed),
                                      "cross_fold": ec.off_diagonal_agreement(est.default_matrix, if_mat),
                                      "rank": cache.lowrank.rank, "note": cache.lowrank.note},
                          "fold_scores_cif": cif.tolist(), "fold_scores_paper": paper.tolist(),
                          "fold_scores_if": if_scores.tolist()})
        cif_total = timing["total"] + query + pre_info["seconds"]
        return {"cif_seconds_total": cif_total, "cif_build_seconds": timing["total"], "cif_timings": timing,
                "cache_solver": cache.solver, "cache_max_residual": float(np.max(cache.residuals)),
                "cluster_sizes": np.asarray(cache.cluster_sizes).tolist(), "warnings": warns, "per_k": per_k,
                "correction": {"method": cache.correction.method, "scale": float(cache.correction.scale),
                               "scale_stderr": float(cache.correction.scale_stderr)}}

    rows = []
    for c in args.clusters:
        # The cells of caches without the per-example coordinates (before the every-query estimator)
        # are kept in the cells file under their old keys; these are the current ones.
        cell = cells(f"{prefix}/C{c}/every-query", lambda c=c: cif_cell(c))
        row = {"seed": seed, "solver": solver, "preconditioner": pre_info, "C": c, "if_seconds_total": if_total,
               **cell, "speedup": if_total / cell["cif_seconds_total"]}
        rows.append(row)
        print(f"[seed {seed}, {solver}] C = {c}: IF {if_total:.1f} s, CiF {row['cif_seconds_total']:.1f} s, "
              f"speedup {row['speedup']:.1f}x; "
              + "; ".join(f"K={x['K']}: corrected {x['pearson']['value']:.3f}/{x['spearman']['value']:.3f} "
                          f"(paper {x['paper']['pearson']['value']:.3f}/{x['paper']['spearman']['value']:.3f}, "
                          f"cross-fold {x['cross_fold']['pearson']:.3f}/{x['cross_fold']['spearman']:.3f}; default "
                          f"cross-fold {x['default']['cross_fold']['pearson']:.3f}/"
                          f"{x['default']['cross_fold']['spearman']:.3f})"
                          for x in row["per_k"]))
    return rows


def _summary(runs, solvers, args):
    """Per (solver, C, K): mean and standard deviation over seeds, as the paper's Table 1."""
    out = []
    for solver in solvers:
        for c in args.clusters:
            rows = [r for r in runs if r["solver"] == solver and r["C"] == c]
            for j, k in enumerate(args.k):
                xs = [r["per_k"][j] for r in rows]

                def ms(values):
                    v = np.asarray(values, dtype=float)
                    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}

                out.append({"solver": solver, "C": c, "K": k, "seeds": [r["seed"] for r in rows],
                            "speedup": ms([r["speedup"] for r in rows]),
                            "if_seconds_total": ms([r["if_seconds_total"] for r in rows]),
                            "cif_seconds_total": ms([r["cif_seconds_total"] for r in rows]),
                            "corrected_pearson": ms([x["pearson"]["value"] for x in xs]),
                            "corrected_spearman": ms([x["spearman"]["value"] for x in xs]),
                            "paper_pearson": ms([x["paper"]["pearson"]["value"] for x in xs]),
                            "paper_spearman": ms([x["paper"]["spearman"]["value"] for x in xs]),
                            "cross_fold_pearson": ms([x["cross_fold"]["pearson"] for x in xs]),
                            "cross_fold_spearman": ms([x["cross_fold"]["spearman"] for x in xs]),
                            "default_pearson": ms([x["default"]["pearson"]["value"] for x in xs]),
                            "default_spearman": ms([x["default"]["spearman"]["value"] for x in xs]),
                            "default_cross_fold_pearson": ms([x["default"]["cross_fold"]["pearson"] for x in xs]),
                            "default_cross_fold_spearman": ms([x["default"]["cross_fold"]["spearman"]
                                                               for x in xs]),
                            "default_rank": [x["default"]["rank"] for x in xs]})
    return out


def _plot(r, args):
    plt = ec.pyplot()
    first = r["runs"][0]
    runs = [x for x in r["runs"] if x["solver"] == first["solver"] and x["seed"] == first["seed"]]
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
    fig.savefig(ec.figure_path(args.name, args, "-scatter"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(r["runs"])), 3.6))
    labels = [f"{x['solver']} s{x['seed']}\nC={x['C']}" for x in r["runs"]]
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
    fig.savefig(ec.figure_path(args.name, args, "-times"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
