"""Appendix B.1, Fig. 5: fold-level agreement of CiF with IF over the cache hyperparameters (C, d).

For every K, IF is solved once per fold; for every (C, d) one cache is built and
answers the folds of every K. Pearson and Spearman over the folds are drawn as
heatmaps (x: C, y: d), one row per K. A second pass clusters unit-normalised
sketches instead of raw ones (``--normalized-dims``) to compare the two.

Each cell reports the corrected estimator (issue #17), the paper's (eq. 11), the
library default (``estimator="hybrid"``, with the shared preconditioner's factors),
and the cross-fold workload (remove fold t, evaluate fold v != t), where no self term
applies: there the paper's estimator has the clustering alone (that is where C, d
and the normalisation are judged) and the default adds the deviations.

One Nystrom preconditioner is shared by every IF and CiF solve (timing is not
the point here; results agree within the CG tolerance).

    python experiments/robustness.py --quick   # digits: C {10,50} x d {32,128}, K {5,100}
    python experiments/robustness.py           # mnist5k: C {10,50,100} x d {32,128}, K {50,100,250}, raw + unit
"""

from __future__ import annotations

import _common as ec
import numpy as np


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--clusters", type=int, nargs="+", default=None)
    p.add_argument("--dims", type=int, nargs="+", default=None)
    p.add_argument("--k", type=int, nargs="+", default=None)
    p.add_argument("--normalized-dims", type=int, nargs="+", default=None,
                   help="sketch dims at which unit-normalised sketches are also clustered (quick: 32; full: all)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    args = ec.finish_args(p.parse_args())
    clusters = args.clusters or ([10, 50] if args.quick else [10, 50, 100])
    dims = args.dims or [32, 128]
    ks = args.k or ([5, 100] if args.quick else [50, 100, 250])
    norm_dims = args.normalized_dims or ([32] if args.quick else dims)
    settings = {**{k: v for k, v in vars(args).items() if k != "output"}, "clusters": clusters, "dims": dims,
                "k": ks, "normalized_dims": norm_dims}
    store = ec.Cells("robustness", args, settings)
    task, ds = ec.trained_task(args.dataset, args.model, seed=args.seed)
    store.check_model("model", task)
    n = task.num_examples
    print(f"{args.dataset}/{args.model}: N = {n}, p = {task.num_params:,}; C {clusters}, d {dims}, K {ks}")
    grid = [(normalize, d, c) for normalize, dim_list in ((False, dims), (True, norm_dims))
            for d in dim_list for c in clusters if c <= n]
    needed = [f"IF/K{k}" for k in ks] + [_key(*g) + "/every-query" for g in grid]
    pre, pre_info = ec.shared_nystrom(store, task, args, "preconditioner", needed)
    print(f"shared Nystrom preconditioner: rank {pre_info['rank']}, {pre_info['seconds']:.1f} s")
    folds = {k: ec.folds_for(n, k, args.seed) for k in ks}

    def if_cell(k):
        scores, info, matrix = ec.if_fold_scores(task, folds[k], args, pre, return_matrix=True)
        print(f"IF K = {k}: {info['seconds']:.1f} s, max residual {info['max_residual']:.2g}")
        return {**info, "scores": scores.tolist(), "matrix": matrix.tolist()}

    ifs = {k: store(f"IF/K{k}", lambda k=k: if_cell(k)) for k in ks}

    def cache_cell(normalize, d, c):
        cache, warns = ec.build_cache(task, args, num_clusters=c, sketch_dim=d, normalize=normalize,
                                      preconditioner=pre)
        sizes = np.asarray(cache.cluster_sizes)
        out = []
        for k in ks:
            if_scores, if_mat = np.asarray(ifs[k]["scores"]), np.asarray(ifs[k]["matrix"])
            est = ec.cif_fold_estimators(cache, task, folds[k], args)
            cif, paper, matrix = est.corrected, est.paper, est.paper_matrix
            out.append({"normalized": normalize, "d": d, "C": c, "K": k,
                        **ec.correlations(cif, if_scores, resamples=args.bootstrap, seed=args.seed),
                        "median_ratio": float(np.median(cif / if_scores)),
                        "paper": {**ec.correlations(paper, if_scores, resamples=args.bootstrap, seed=args.seed),
                                  "median_ratio": float(np.median(paper / if_scores))},
                        "cross_fold": ec.off_diagonal_agreement(matrix, if_mat) if k > 2 else None,
                        "default": {**ec.correlations(est.default, if_scores, resamples=args.bootstrap,
                                                      seed=args.seed),
                                    "cross_fold": ec.off_diagonal_agreement(est.default_matrix, if_mat)
                                    if k > 2 else None, "rank": cache.lowrank.rank},
                        "largest_cluster_share": float(sizes.max() / n),
                        "scatter_trace": float(cache.scatter_trace),
                        "build_seconds": ec.cache_timing(cache)["total"], "warnings": warns})
        print(f"{'unit' if normalize else 'raw '} d = {d:3d}, C = {c:3d} (largest cluster "
              f"{sizes.max() / n:.0%}): " + ", ".join(
                  f"K={x['K']} {x['pearson']['value']:.3f}/{x['spearman']['value']:.3f} (paper "
                  f"{x['paper']['pearson']['value']:.3f}/{x['paper']['spearman']['value']:.3f}"
                  + (f", cross {x['cross_fold']['pearson']:.3f}/{x['cross_fold']['spearman']:.3f})"
                     if x["cross_fold"] else ")")
                  for x in out))
        return out

    # Keys of caches with the per-example coordinates (the older cells, without the default
    # estimator, stay in the cells file under the bare keys).
    cells = [x for g in grid for x in store(_key(*g) + "/every-query", lambda g=g: cache_cell(*g))]
    result = {**ec.task_info(task, ds, args), "preconditioner": pre_info, "clusters": clusters, "dims": dims,
              "K": ks, "normalized_dims": norm_dims, "bootstrap": args.bootstrap,
              "if": {str(k): {key: v for key, v in ifs[k].items() if key not in ("scores", "matrix")} for k in ks},
              "cells": cells, "cell_runs": store.runs}
    ec.write("robustness", args, result)
    _plot(result, args)


def _key(normalize, d, c):
    return f"{'unit' if normalize else 'raw'}/d{d}/C{c}"


def _plot(r, args):
    plt = ec.pyplot()
    ks, cs, ds_ = r["K"], r["clusters"], r["dims"]
    for normalize, dims in ((False, ds_), (True, r["normalized_dims"])):
        panels = (("corrected", "pearson"), ("corrected", "spearman"), ("paper", "pearson"), ("paper", "spearman"),
                  ("cross-fold", "pearson"), ("cross-fold", "spearman"), ("default cross-fold", "spearman"))
        fig, axes = plt.subplots(len(ks), len(panels),
                                 figsize=(3.0 + 1.0 * len(cs) * len(panels), 1.2 + (0.5 * len(dims) + 1.0) * len(ks)),
                                 squeeze=False, constrained_layout=True)
        for row, k in zip(axes, ks):
            for ax, (which, metric) in zip(row, panels):
                grid = np.full((len(dims), len(cs)), np.nan)
                for x in r["cells"]:
                    if x["normalized"] == normalize and x["K"] == k and x["d"] in dims:
                        if which == "corrected":
                            val = x[metric]["value"]
                        elif which == "paper":
                            val = x["paper"][metric]["value"]
                        elif which == "cross-fold":
                            val = x["cross_fold"][metric] if x["cross_fold"] else np.nan
                        else:
                            cross = x.get("default", {}).get("cross_fold")
                            val = cross[metric] if cross else np.nan
                        grid[dims.index(x["d"]), cs.index(x["C"])] = val
                im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
                for i in range(len(dims)):
                    for j in range(len(cs)):
                        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="w" if grid[i, j] < 0.6 else "k")
                ax.set_xticks(range(len(cs)), [str(c) for c in cs])
                ax.set_yticks(range(len(dims)), [str(d) for d in dims])
                ax.set_title(f"K = {k}: {which} {metric}", fontsize=9)
                ax.set_xlabel("C")
                ax.set_ylabel("d")
        fig.colorbar(im, ax=axes, shrink=0.6)
        fig.suptitle(f"CiF vs IF, {'unit-normalised' if normalize else 'raw'} sketches ({r['dataset']}/{r['model']})",
                     fontsize=10)
        fig.savefig(ec.figure_path("robustness", args, "-normalized" if normalize else "-raw"), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
