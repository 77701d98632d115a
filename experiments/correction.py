"""The self-influence correction (issue #17): every estimator of ``t_i`` against the exact one.

For each model, the reference is exact: ``x_i = H~^{-1} g_i`` for every training
example (N preconditioned CG solves, cached under ``benchmarks/_work``), from which the
exact ``t_i = g_i . (x_i - v_c(i)) / N`` of any partition, per-query IF's fold scores
``(1/(N|S|)) (sum_S g)^T (sum_S x)`` (K = 50, 100) and its cross-fold matrix follow.
For every cache (C in {1, 10, 50}, raw and unit-normalised sketches) it reports fold
agreement with IF (Pearson, Spearman, median CiF/IF) of

* the paper's estimator (eq. 11),
* the exact correction,
* the Nystrom estimate at ranks 64, 128, 256 (``g^T M d / N``, no solve),
* the calibrated estimate (that Nystrom estimate times the mean ratio over m draws
  proportional to the estimate, m in {16, 32, 64}), over 20 independent draws,

and the cross-fold workload (remove fold t, evaluate fold v != t), where no correction
applies. It also splits the Nystrom estimate into its subspace and complement parts to
show where its upward bias comes from. Resumable: each finished cell is written to the
JSON at once and skipped on restart.

    python experiments/correction.py --quick            # digits: LeNet-5 and MLP
    python experiments/correction.py --models lenet5    # mnist5k (N = 4,000 exact solves: hours on 2 cores;
                                                        # resumes chunk by chunk)
"""

from __future__ import annotations

import json
import os
import time

import _common as ec
import jax
import jax.numpy as jnp
import numpy as np

from cif_jax.cif import correction as ccorr
from cif_jax.workloads import stats

RANKS = (64, 128, 256)
SAMPLES = (16, 32, 64)
DRAWS = 20


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["lenet5", "mlp"])
    p.add_argument("--clusters", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--k", type=int, nargs="+", default=[50, 100])
    args = ec.finish_args(p.parse_args())
    args.rtol = 1e-4  # the reference solves: the library default, for every setting
    path = os.path.join(args.output, f"{ec.stem('correction', args)}.json")
    done = json.load(open(path)) if os.path.exists(path) else {"cells": {}}
    cells = done["cells"]

    for model in args.models:
        args.model = model
        task, ds = ec.trained_task(args.dataset, model, seed=args.seed)
        n, lam = task.num_examples, args.damping
        print(f"{args.dataset}/{model}: N = {n}, p = {task.num_params:,}", flush=True)
        g, x, ref_info = _reference(task, args)
        folds = {k: ec.folds_for(n, k, args.seed) for k in args.k}
        gs = {k: np.stack([g[f].sum(0) for f in folds[k]]) for k in args.k}
        xs = {k: np.stack([x[f].sum(0) for f in folds[k]]) for k in args.k}
        sizes = {k: np.array([len(f) for f in folds[k]], np.float64) for k in args.k}
        # IF's fold matrix: M[t, v] = g_{S_v}^T Delta theta_{S_t}, g_{S_v} the mean gradient of fold v.
        if_mat = {k: (xs[k] @ gs[k].T) / n / sizes[k][None, :] for k in args.k}
        self_exact = np.einsum("ij,ij->i", g, x) / n
        factors, fac_seconds, pre = {}, {}, None
        for r in RANKS:
            t0 = time.perf_counter()
            pre = jax.block_until_ready(ec.cj.nystrom_preconditioner(
                ec.cj.DampedGGN(task, damping=lam, batch_size=args.batch_size),
                key=jax.random.fold_in(jax.random.key(args.seed), 2), rank=r, error_iters=0, rhs_batch_size=32))
            fac_seconds[r] = time.perf_counter() - t0
            factors[r] = (np.asarray(pre.basis, np.float64), np.asarray(pre.eigenvalues, np.float64))
        # The last (rank-256) factors precondition the cache solves; the partition does not depend on them.
        for c in args.clusters:
            for normalize in (False, True):
                if c == 1 and normalize:
                    continue
                key = f"{args.dataset}/{model}/C={c}/{'normalised' if normalize else 'raw'}"
                if key in cells:
                    print(f"{key}: done", flush=True)
                    continue
                cells[key] = _cell(task, args, g, x, folds, gs, if_mat, self_exact, factors, fac_seconds, c,
                                   normalize, lam, pre)
                cells[key]["reference"] = ref_info
                done.update({**ec.task_info(task, ds, args), "models": args.models, "cells": cells})
                _save(path, args, done)
    _plot(cells, args)


def _save(path, args, result):
    """Writes the JSON after every cell (atomically, see ``ec.write``), so an interrupted run resumes."""
    ec.write("correction", args, {k: v for k, v in result.items() if k not in ("experiment", "quick", "command",
                                                                            "machine", "finished",
                                                                            "load_average_1_5_15min_at_end")})


def _reference(task, args, chunk: int = 256):
    """(G, X): per-example gradients and exact solves ``H~^{-1} g_i`` (float64 copies).

    The solves run in chunks of ``chunk`` examples, each written to ``benchmarks/_work`` as it
    finishes (atomically), so an interrupted run (hours for MNIST-5k) resumes at the next chunk.
    """
    os.makedirs(ec.WORKDIR, exist_ok=True)
    stem = os.path.join(ec.WORKDIR, f"correction-{args.dataset}-{args.model}-seed{args.seed}")
    g = np.asarray(ec.cj.per_example_grads(task, batch_size=args.batch_size), np.float64)
    n = g.shape[0]
    info_path = stem + "-info.json"
    if os.path.exists(stem + "-x.npy") and os.path.exists(info_path):
        return g, np.load(stem + "-x.npy").astype(np.float64), json.load(open(info_path))
    pre = ec.cj.nystrom_preconditioner(ec.cj.DampedGGN(task, damping=args.damping, batch_size=args.batch_size),
                                       key=jax.random.key(1), rank=256, error_iters=0)
    parts, seconds, residuals, steps = [], 0.0, [], []
    for start in range(0, n, chunk):
        part = f"{stem}-x-{start:06d}.npz"
        if not os.path.exists(part):
            t0 = time.perf_counter()
            res = ec.cj.solve_ggn(task, jnp.asarray(g[start:start + chunk], task.dtype), damping=args.damping,
                                  solver=ec.cj.CG(rtol=args.rtol, max_steps=args.max_steps, rhs_batch_size=32, preconditioner=pre), batch_size=args.batch_size,
                                  warn=False)
            tmp = part + ".tmp.npz"
            np.savez(tmp, x=np.asarray(res.solutions), residuals=np.asarray(res.residuals),
                     steps=np.asarray(res.num_steps), seconds=time.perf_counter() - t0)
            os.replace(tmp, part)
            print(f"reference solves {min(start + chunk, n)} / {n}", flush=True)
        with np.load(part) as z:
            parts.append(z["x"])
            residuals.append(z["residuals"])
            steps.append(z["steps"])
            seconds += float(z["seconds"])
    x = np.concatenate(parts)
    residuals, steps = np.concatenate(residuals), np.concatenate(steps)
    info = {"solves": int(n), "seconds": seconds, "rtol": args.rtol, "max_residual": float(residuals.max()),
            "mean_steps": float(steps.mean()), "share_converged": float((residuals <= args.rtol).mean())}
    np.save(stem + "-x.npy", x)  # x first, the info file marks it complete
    with open(info_path, "w") as f:
        json.dump(info, f)
    return g, x.astype(np.float64), info


def _agreement(est, ref):
    return {"pearson": stats.pearson(est, ref), "spearman": stats.spearman(est, ref),
            "median_ratio": float(np.median(est / ref))}


def _cell(task, args, g, x, folds, gs, if_mat, self_exact, factors, fac_seconds, c, normalize, lam, pre):
    n = task.num_examples
    # The paper's cache only (its responses and partition); the estimators are computed here from
    # the exact solves and the Nystrom factors, with the library's own sampling and calibration.
    cache, warns = ec.build_cache(task, args, num_clusters=c, normalize=normalize, seed=args.seed,
                                  preconditioner=pre, correction=None)
    a = np.asarray(cache.assignments)
    v = np.asarray(cache.responses, np.float64)
    mu = np.asarray(cache.means, np.float64)
    d = g - mu[a]
    t_exact = np.einsum("ij,ij->i", g, x - v[a]) / n
    out = {"C": c, "normalised": normalize, "cluster_sizes": np.asarray(cache.cluster_sizes).tolist(),
           "scatter_trace": float(cache.scatter_trace), "estimators": {}, "nystrom_parts": {}}
    counts = {k: np.stack([np.bincount(a[f], minlength=c) for f in folds[k]]) for k in folds}
    sizes = {k: np.array([len(f) for f in folds[k]], np.float64) for k in folds}
    mean_gs = {k: gs[k] / sizes[k][:, None] for k in folds}
    cif_mat = {k: (counts[k] @ v) @ mean_gs[k].T / n for k in folds}

    def fold_report(t):
        rep = {}
        for k in folds:
            corr = np.array([t[f].mean() for f in folds[k]])
            est = np.diag(cif_mat[k]) + corr
            rep[f"K={k}"] = _agreement(est, np.diag(if_mat[k]))
        return rep

    est = out["estimators"]
    est["paper"] = fold_report(np.zeros(n))
    est["exact"] = {**fold_report(t_exact), "sum_ratio": 1.0}
    for k in folds:
        off = ~np.eye(len(folds[k]), dtype=bool)
        out.setdefault("cross_fold", {})[f"K={k}"] = {**_agreement(cif_mat[k][off], if_mat[k][off]),
                                                      "pairs": int(off.sum())}
    for r, (u, s) in factors.items():
        ug, ud = g @ u.T, d @ u.T
        top = (ug * ud / (s + lam)[None, :]).sum(1) / n
        comp = (np.einsum("ij,ij->i", g, d) - (ug * ud).sum(1)) / lam / n
        raw = top + comp
        total = t_exact.sum()
        out["nystrom_parts"][f"rank={r}"] = {
            "build_seconds": fac_seconds[r], "s_r_over_lambda": float(s[-1] / lam),
            "subspace_part_over_exact": float(top.sum() / total), "complement_part_over_exact": float(comp.sum() / total),
            "self_influence_ratio_median": float(np.median((np.einsum("ij,ij->i", ug, ug / (s + lam)[None, :]) / n
                                                             + (np.einsum("ij,ij->i", g, g) - (ug * ug).sum(1))
                                                             / lam / n) / self_exact)),
        }
        est[f"nystrom r={r}"] = {**fold_report(raw), "sum_ratio": float(raw.sum() / total),
                                 "per_example_pearson": stats.pearson(raw, t_exact)}
        for m in SAMPLES:
            ratios, first = [], None
            for draw in range(DRAWS):
                sample = ccorr.draw_sample(jax.random.key(1000 * draw + m), raw, m)
                scale, stderr, _ = ccorr.calibrate(raw, sample, t_exact[sample])
                ratios.append(scale * raw.sum() / total)
                if first is None:
                    first = (scale, stderr)
            est[f"calibrated r={r} m={m}"] = {
                **fold_report(raw * first[0]), "scale": first[0], "scale_stderr": first[1],
                "sum_ratio_over_draws_mean": float(np.mean(ratios)), "sum_ratio_over_draws_std": float(np.std(ratios)),
            }
    line = "; ".join(f"{name}: " + ", ".join(f"{kk} P {vv['pearson']:.3f} S {vv['spearman']:.3f} "
                                            f"med {vv['median_ratio']:.2f}"
                                            for kk, vv in val.items() if kk.startswith("K="))
                     for name, val in est.items() if name in ("paper", "exact", "nystrom r=256",
                                                              "calibrated r=256 m=32"))
    print(f"C={c} {'normalised' if normalize else 'raw'}: {line}", flush=True)
    out["warnings"] = warns
    return out


def _plot(cells, args):
    plt = ec.pyplot()
    keys = [k for k in cells if "/C=10/raw" in k]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        est = cells[key]["estimators"]
        names = ["paper", "exact"] + [f"nystrom r={r}" for r in RANKS] + [f"calibrated r={r} m=32" for r in RANKS]
        vals = [est[nm]["K=50"]["pearson"] for nm in names]
        ratios = [est[nm]["K=50"]["median_ratio"] for nm in names]
        ax.bar(range(len(names)), vals, color="tab:blue")
        for i, r in enumerate(ratios):
            ax.text(i, vals[i], f"{r:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), [nm.replace(" ", "\n") for nm in names], fontsize=7)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("Pearson vs IF (K = 50); labels: median CiF/IF")
        ax.set_title(key, fontsize=9)
    fig.tight_layout()
    fig.savefig(ec.figure_path("correction", args), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
