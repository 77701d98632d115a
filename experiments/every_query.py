"""One cache for every query: the default (hybrid) estimator against per-query IF, beside the paper's.

Three workloads, each against per-query IF with the same operator and tolerance:

* **folds on themselves** (V = S): K = 50 folds, ``Delta l(S_k; S_k)``; Pearson and Spearman over folds;
* **cross-fold** (the paper's section 5.4): remove fold t, score fold v != t; Spearman over the
  K(K-1) pairs;
* **held-out test points against random halves**: 100 random halves of the training set removed,
  each scored on each of ``--test-points`` held-out test points; Spearman over the halves, per
  point, and its median over points. IF here is one solve per test point (``H~`` is symmetric,
  so a half's IF is the sum of its members' scores ``(1/N) g_i . H~^{-1} g_q``), and the same
  solves give the per-example scores ``cj.example_scores`` is compared with (median over
  points of the Spearman over the N training examples).

Each cache cell (C = 10 clusters, d = 32, the library's defaults otherwise) is built at a fixed
factor rank or at ``rank="auto"``; the cell records the rank, the probe's predicted share outside
the factors, ``s_r / lambda``, the build's phase timings and, from the same cache, the three
estimators (``hybrid``, ``corrected``, ``paper``). Every finished cell is written at once; a
rerun resumes.

    python experiments/every_query.py --quick                 # digits LeNet-5
    python experiments/every_query.py --quick --model mlp     # digits MLP
    python experiments/every_query.py                         # MNIST-5k LeNet-5
"""

from __future__ import annotations

import time

import _common as ec
import jax
import jax.numpy as jnp
import numpy as np

import cif_jax as cj
from cif_jax.workloads import stats

NUM_HALVES = 100


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--folds", type=int, default=50)
    p.add_argument("--test-points", type=int, default=100)
    p.add_argument("--ranks", default="256,512,1024,auto", help="comma-separated factor ranks; 'auto' for the default")
    p.add_argument("--factors", default="nystrom", choices=["nystrom", "nystrom-power", "sampled"],
                   help="how the cache's factors are built: the library's Nystrom (r GGN products), Nystrom with "
                        "--power-iters subspace iterations, or cj.sampled_preconditioner (a few passes of "
                        "pseudo-gradients); the last two at fixed ranks only")
    p.add_argument("--factor-build", default="auto", choices=["auto", "products", "columns"],
                   help="--factors nystrom: the correction's `factors=` (how the cache builds its factors: "
                        "GGN products, the exact output-Hessian columns, or the faster of the two by a timed probe)")
    p.add_argument("--power-iters", type=int, default=1, help="sampled factors: extra passes")
    p.add_argument("--samples", default="1", help="sampled factors: draws per example and pass, or 'exact'")
    args = ec.finish_args(p.parse_args())
    args.samples = args.samples if args.samples == "exact" else int(args.samples)
    task, ds = ec.trained_task(args.dataset, args.model, seed=args.seed)
    n = task.num_examples
    ranks = [r if r == "auto" else int(r) for r in args.ranks.split(",")]
    settings = {**ec.task_info(task, ds, args), "clusters": args.clusters, "folds": args.folds,
                "test_points": args.test_points, "halves": NUM_HALVES, "reference": "test-point solves"}
    cells = ec.Cells(f"every_query-{args.model}", args, {k: v for k, v in settings.items() if k != "ranks"})
    cells.check_model("model", task)

    folds = ec.folds_for(n, args.folds, args.seed)
    rng = np.random.default_rng(args.seed + 7)
    halves = [np.sort(rng.permutation(n)[: n // 2]) for _ in range(NUM_HALVES)]
    test = cj.Task(task.apply_fn, task.loss_fn, task.params, jnp.asarray(ds.x_test[: args.test_points]),
                   jnp.asarray(ds.y_test[: args.test_points]))
    g_test = cj.per_example_grads(test, batch_size=args.batch_size)

    def fold_reference():
        t0 = time.perf_counter()
        _, info, matrix = ec.if_fold_scores(task, folds, args, return_matrix=True)
        return {"fold_matrix": matrix.tolist(), "seconds": time.perf_counter() - t0, "fold_info": info}

    def point_reference():
        # One solve per test point, x_q = H~^{-1} g_q, then every training example's score
        # (1/N) g_i . x_q: a half's IF is the sum of its members' (H~ is symmetric, so this is
        # per-query IF of each half, from Q solves instead of one per half).
        t0 = time.perf_counter()
        kw = ec.solver_kwargs(args)
        res = cj.solve_ggn(task, g_test, damping=kw["damping"], solver=kw["solver"], batch_size=kw["batch_size"])
        grads = cj.per_example_grads(task, batch_size=args.batch_size)
        scores = np.asarray(jnp.matmul(grads, res.solutions.T)) / n  # (N, points)
        return {"example_scores": scores.T.tolist(), "seconds": time.perf_counter() - t0,
                "max_residual": float(np.max(res.residuals)), "mean_steps": float(np.mean(res.num_steps))}

    ref = cells("IF/folds", fold_reference)
    pts = cells("IF/test-points", point_reference)
    if_matrix = np.asarray(ref["fold_matrix"])
    if_examples = np.asarray(pts["example_scores"])  # (points, N)
    if_held = np.stack([if_examples[:, h].sum(axis=1) for h in halves])  # (halves, points)
    off = ~np.eye(args.folds, dtype=bool)
    print(f"IF: {ref['seconds']:.1f} s for {args.folds} folds, {pts['seconds']:.1f} s for {args.test_points} "
          "test points")

    for rank in ranks:
        if args.factors != "nystrom" and rank == "auto":
            raise SystemExit(f"--factors {args.factors} takes fixed ranks (--ranks 256,1024)")

        def cell(rank=rank):
            correction = cj.CalibratedCorrection(rank=rank, factors=args.factor_build)
            t0 = time.perf_counter()
            pre, factor_seconds = "auto", None
            if args.factors != "nystrom":  # the factors built here, then handed to the cache
                op = cj.DampedGGN(task, damping=args.damping, batch_size=args.batch_size)
                key = jax.random.fold_in(jax.random.key(args.seed), 2)
            if args.factors == "sampled":
                pre = cj.sampled_preconditioner(op, key=key, rank=rank, power_iters=args.power_iters,
                                                samples=args.samples)
            elif args.factors == "nystrom-power":
                pre = cj.nystrom_preconditioner(op, key=key, rank=rank, error_iters=0, power_iters=args.power_iters,
                                                rhs_batch_size=args.rhs_batch_size or 32)
            if args.factors != "nystrom":
                factor_seconds = time.perf_counter() - t0
            cache, warned = ec.build_cache(task, args, num_clusters=args.clusters, correction=correction,
                                           preconditioner=pre)
            build = time.perf_counter() - t0
            low = cache.lowrank
            out = {"build_seconds": build, "timing": ec.cache_timing(cache), "rank": low.rank, "note": low.note,
                   "factors": args.factors, "factor_seconds": factor_seconds,
                   "predicted_error": float(low.predicted_error),
                   "tail_ratio": low.tail_eigenvalue_ratio(args.damping),
                   "error_estimate": float(low.error_estimate), "warnings": warned,
                   "scale": float(cache.correction.scale)}
            for est in ("hybrid", "corrected", "paper"):
                t1 = time.perf_counter()
                m = np.asarray(cj.fold_matrix(cache, task, folds, batch_size=args.batch_size, estimator=est))
                diag, cross = np.diag(m), m[off]
                row = {"self_pearson": stats.pearson(diag, np.diag(if_matrix)),
                       "self_spearman": stats.spearman(diag, np.diag(if_matrix)),
                       "cross_pearson": stats.pearson(cross, if_matrix[off]),
                       "cross_spearman": stats.spearman(cross, if_matrix[off])}
                if est != "corrected":  # held-out points hold no training example: corrected = paper there
                    scores = np.asarray(cj.example_scores(cache, g_test, estimator=est))  # (points, N)
                    held = np.stack([scores[:, h].sum(axis=1) for h in halves])  # (halves, points)
                    per_point = [stats.spearman(held[:, q], if_held[:, q]) for q in range(held.shape[1])]
                    row["held_out_median_spearman"] = float(np.median(per_point))
                    row["held_out_spearman_q10_q90"] = [float(np.quantile(per_point, 0.1)),
                                                        float(np.quantile(per_point, 0.9))]
                    per_example = [stats.spearman(scores[q], if_examples[q]) for q in range(scores.shape[0])]
                    row["example_scores_median_spearman"] = float(np.median(per_example))
                row["query_seconds"] = time.perf_counter() - t1
                out[est] = row
            return out

        key = f"rank={rank}" if rank != "auto" else f"rank=auto,tolerance={cj.cif.lowrank.DEFAULT_TOLERANCE:g}"
        if args.factors == "nystrom" and args.factor_build != "products":  # cells without it: products
            key += f",factors={args.factor_build}"
        if args.factors == "sampled":
            key = f"sampled(power_iters={args.power_iters},samples={args.samples}),{key}"
        elif args.factors == "nystrom-power":
            key = f"nystrom(power_iters={args.power_iters}),{key}"
        r = cells(key, cell)
        h = r["hybrid"]
        print(f"rank {rank} -> {r['rank']} (predicted {r['predicted_error']:.3g}, s_r/lambda {r['tail_ratio']:.3g}), "
              f"build {r['build_seconds']:.1f} s: hybrid self {h['self_spearman']:.3f} cross {h['cross_spearman']:.3f} "
              f"held-out {h['held_out_median_spearman']:.3f} per-example {h['example_scores_median_spearman']:.3f} | paper cross {r['paper']['cross_spearman']:.3f} "
              f"held-out {r['paper']['held_out_median_spearman']:.3f}")
    ec.write(f"every_query-{args.model}", args, {"settings": settings, "cells": cells.values, "runs": cells.runs})


if __name__ == "__main__":
    main()
