"""Theorem 3.1 in practice: measured ||IF - CiF|| against the bound's two terms.

For random subsets S of several sizes m, the measured parameter error
||Delta theta_S - hat Delta theta_S|| of CiF against per-query IF (solved to a
tight reference tolerance) is set beside

* the expected bound of Theorem 3.1 (``cj.error_bound``: scatter + solver term,
  eq. 16/37, for a uniformly random subset of size m), and
* the deterministic per-subset bound of eq. (13) (``cj.subset_error_bound`` with
  the task: the exact scatter term ||sum_{i in S} (g_i - mu_c(i))|| / (lambda N)),

as the cluster budget C and the CiF cache's CG tolerance vary. One Nystrom
preconditioner is shared by every solve (reference IF and all caches): timing is
not measured here, and the solutions do not depend on it beyond the tolerance.

    python experiments/theorem_bound.py --quick   # digits / LeNet-5
    python experiments/theorem_bound.py           # mnist5k / LeNet-5
"""

from __future__ import annotations

import _common as ec
import numpy as np

import cif_jax as cj


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--clusters", type=int, nargs="+", default=None, help="quick: 10 50; full: 10 50 100 500")
    p.add_argument("--cache-rtols", type=float, nargs="+", default=None, help="CiF cache tolerances (default 1e-1 1e-2 1e-3, looser than the reference)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="subset sizes m (default: N/K for K in "
                                                                         "500, 100, 50, 10, 5 that fit)")
    p.add_argument("--subsets", type=int, default=None, help="random subsets per size (quick 6, full 32)")
    p.add_argument("--reference-rtol", type=float, default=1e-4,
                   help="CG tolerance of the reference IF solves (1e-5 stalls in float32 here)")
    p.add_argument("--sketch-dim", type=int, default=32)
    args = ec.finish_args(p.parse_args())
    clusters = args.clusters or ([10, 50] if args.quick else [10, 50, 100, 500])
    rtols = args.cache_rtols or [1e-1, 1e-2, 1e-3]
    per_size = args.subsets or (6 if args.quick else 32)
    task, ds = ec.trained_task(args.dataset, args.model, seed=args.seed)
    n = task.num_examples
    sizes = args.sizes or sorted({max(1, round(n / k)) for k in (500, 100, 50, 10, 5) if n / k >= 1})
    print(f"{args.dataset}/{args.model}: N = {n}, p = {task.num_params:,}; m in {sizes}, {per_size} subsets each")
    pre, pre_info = ec.nystrom(task, args)
    print(f"shared Nystrom preconditioner: rank {pre_info['rank']}, {pre_info['seconds']:.1f} s")

    rng = np.random.default_rng(args.seed)
    subsets, subset_m = [], []
    for m in sizes:
        for _ in range(per_size):
            subsets.append(np.sort(rng.choice(n, m, replace=False)))
            subset_m.append(m)
    subset_m = np.asarray(subset_m)
    args_ref = type(args)(**vars(args))
    args_ref.rtol = args.reference_rtol
    ref = cj.influence_solve(task, subsets, **ec.solver_kwargs(args_ref, pre))
    ref_sol = np.asarray(ref.solutions)
    ref_norm = np.linalg.norm(ref_sol, axis=1)
    print(f"reference IF: {len(subsets)} solves, max true residual {float(np.max(ref.residuals)):.2g}")

    rows = []
    for c in clusters:
        for rtol in rtols:
            args_c = type(args)(**vars(args))
            args_c.rtol = rtol
            cache, warns = ec.build_cache(task, args_c, num_clusters=c, sketch_dim=args.sketch_dim, preconditioner=pre)
            err = np.linalg.norm(np.asarray(cj.param_delta(cache, subsets)) - ref_sol, axis=1)
            exp_scatter, exp_solver = (np.asarray(t) for t in cj.error_bound(cache, np.asarray(sizes)))
            sub_scatter, sub_solver = (np.asarray(t) for t in cj.subset_error_bound(cache, subsets, task=task,
                                                                                   batch_size=args.batch_size))
            per_m = []
            for j, m in enumerate(sizes):
                sel = subset_m == m
                per_m.append({
                    "m": int(m), "measured_mean": float(err[sel].mean()), "measured_max": float(err[sel].max()),
                    "relative_mean": float((err[sel] / ref_norm[sel]).mean()),
                    "expected_bound_scatter": float(exp_scatter[j]), "expected_bound_solver": float(exp_solver[j]),
                    "subset_bound_scatter_mean": float(sub_scatter[sel].mean()),
                    "subset_bound_solver_mean": float(sub_solver[sel].mean()),
                    "subset_bound_holds_all": bool(np.all(err[sel] <= (sub_scatter + sub_solver)[sel] * (1 + 1e-4))),
                })
            rows.append({"C": c, "cache_rtol": rtol, "cache_max_residual": float(np.max(cache.residuals)),
                         "scatter_trace": float(cache.scatter_trace), "warnings": warns, "per_m": per_m})
            print(f"C = {c:4d}, rtol {rtol:g}: " + "; ".join(
                f"m={x['m']}: err {x['measured_mean']:.3g} <= {x['expected_bound_scatter']:.3g} + "
                f"{x['expected_bound_solver']:.3g}" for x in per_m))

    result = {**ec.task_info(task, ds, args), "sketch_dim": args.sketch_dim, "preconditioner": pre_info,
              "reference_rtol": args.reference_rtol, "reference_max_residual": float(np.max(ref.residuals)),
              "sizes": [int(m) for m in sizes], "subsets_per_size": per_size, "clusters": clusters,
              "cache_rtols": rtols, "rows": rows,
              "note": "measured = ||IF_S - CiF_S||_2 with IF_S solved to reference_rtol; expected bound = Theorem "
                      "3.1 (eq. 16/37) for a uniformly random subset of size m; subset bound = eq. (13) with the "
                      "exact scatter term, averaged over the drawn subsets."}
    ec.write("theorem_bound", args, result)
    _plot(result, args)


def _plot(r, args):
    plt = ec.pyplot()
    clusters, rtols = r["clusters"], r["cache_rtols"]
    fig, axes = plt.subplots(1, len(clusters) + 1, figsize=(4.0 * (len(clusters) + 1), 3.8))
    tight = min(rtols)
    for ax, c in zip(axes, clusters):
        row = next(x for x in r["rows"] if x["C"] == c and x["cache_rtol"] == tight)
        m = [x["m"] for x in row["per_m"]]
        ax.loglog(m, [x["measured_mean"] for x in row["per_m"]], "o-", label="measured mean ||IF-CiF||")
        ax.loglog(m, [x["subset_bound_scatter_mean"] + x["subset_bound_solver_mean"] for x in row["per_m"]], "s--",
                  label="per-subset bound (eq. 13)")
        ax.loglog(m, [x["expected_bound_scatter"] + x["expected_bound_solver"] for x in row["per_m"]], "k-",
                  label="Thm 3.1 bound")
        ax.loglog(m, [x["expected_bound_scatter"] for x in row["per_m"]], ":", label="scatter term")
        ax.loglog(m, [max(x["expected_bound_solver"], 1e-12) for x in row["per_m"]], ":", label="solver term")
        ax.set_title(f"C = {c}, cache rtol {tight:g}", fontsize=9)
        ax.set_xlabel("subset size m")
    axes[0].set_ylabel("parameter error")
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    m_mid = r["sizes"][len(r["sizes"]) // 2]
    for c in clusters:
        rows = [x for x in r["rows"] if x["C"] == c]
        pm = [next(y for y in x["per_m"] if y["m"] == m_mid) for x in rows]
        line, = ax.loglog([x["cache_rtol"] for x in rows], [y["measured_mean"] for y in pm], "o-", label=f"C={c}")
        ax.loglog([x["cache_rtol"] for x in rows], [y["expected_bound_solver"] for y in pm], "--",
                  color=line.get_color())
    ax.set_xlabel("cache CG rtol")
    ax.set_title(f"m = {m_mid}: measured (solid), solver term (dashed)", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(f"Theorem 3.1 in practice ({r['dataset']}/{r['model']}, lambda = {r['damping']:g})")
    fig.tight_layout()
    fig.savefig(ec.figure_path("theorem_bound", args), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
