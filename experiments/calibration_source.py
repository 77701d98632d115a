"""Where the self terms' calibration comes from: 16 extra exact solves, or the C cluster solves the cache has anyway.

The default correction (``CalibratedCorrection``) rescales the Nystrom estimates of the self terms
``t_i = (1/N) g_i^T H~^{-1} (g_i - mu_c(i))`` by one factor b, fitted from exact solves of 16 drawn
examples: 16 more systems beside the C cluster solves. The cache already holds C exact solves
``v_c = H~^{-1} mu_c``. This script measures whether they could fix the factor instead, for free:

* **cluster scale**: ``b_C = sum_c n_c mu_c.v_c / sum_c n_c mu_c^T M mu_c`` (M the Nystrom inverse the
  raw estimates use), applied to every raw estimate;
* **cluster complement**: the low-rank part kept and only the complement ``(I - UU^T)/lambda`` rescaled,
  its factor fitted the same way.

Each against the exact ``t_i`` of all N examples (``ExactCorrection``: N solves), beside the raw and
the 16-draw estimates: the median relative error per example and the ratio of the sums (the scale
that fold scores on themselves carry). Digits, C = 10, d = 32, damping 1e-3, CG rtol 1e-4, the
library's default factors (rank "auto").

    python experiments/calibration_source.py --quick --model mlp
    python experiments/calibration_source.py --quick            # LeNet-5
"""

from __future__ import annotations

import warnings

import _common as ec
import jax
import numpy as np

import cif_jax as cj


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--clusters", type=int, default=10)
    args = ec.finish_args(p.parse_args())
    task, ds = ec.trained_task(args.dataset, args.model, seed=args.seed)
    lam = args.damping
    kwargs = dict(num_clusters=args.clusters, sketch_dim=32, damping=lam, key=jax.random.key(args.seed),
                  solver=cj.CG(rtol=args.rtol or 1e-4, max_steps=args.max_steps))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dominant-cluster warning
        (cal, t_cal), (ex, t_ex) = [ec.timed(lambda c=c: cj.build_cache(task, correction=c, **kwargs), warmup=False)[::-1]
                                    for c in (cj.CalibratedCorrection(), cj.ExactCorrection())]
    if not np.array_equal(np.asarray(ex.assignments), np.asarray(cal.assignments)):
        raise SystemExit("the two caches clustered differently; their self terms cannot be compared")
    exact = np.asarray(ex.correction.values, np.float64)
    corr, lr = cal.correction, cal.lowrank
    raw, b = np.asarray(corr.raw, np.float64), float(corr.scale)
    low = b * raw - np.asarray(corr.remainder, np.float64)  # (1/N) the low-rank part of each raw estimate
    comp = raw - low  # (1/N) its complement part, at 1/lambda
    mu, v = np.asarray(cal.means, np.float64), np.asarray(cal.responses, np.float64)
    mc, s = np.asarray(lr.mean_coords, np.float64), np.asarray(lr.eigenvalues, np.float64)
    sizes = np.asarray(cal.cluster_sizes, np.float64)
    e_c = np.sum(mu * v, 1)  # exact mu_c^T H~^-1 mu_c
    l_c = np.sum(mc * mc / (s + lam), 1)  # its low-rank part under M
    k_c = (np.sum(mu * mu, 1) - np.sum(mc * mc, 1)) / lam  # its complement part under M
    b_clusters = float(np.sum(sizes * e_c) / np.sum(sizes * (l_c + k_c)))
    beta = float(np.sum(sizes * (e_c - l_c)) / np.sum(sizes * k_c))
    estimates = {"raw (Nystrom, no solve)": raw, "calibrated, 16 drawn solves (default)": b * raw,
                 "cluster scale (no extra solve)": b_clusters * raw,
                 "cluster complement (no extra solve)": low + beta * comp}
    nonzero = exact != 0  # an example alone in its cluster has no deviation and no self term
    rows = {name: {"median_relative_error": float(np.median(np.abs(t - exact)[nonzero] / np.abs(exact[nonzero]))),
                   "sum_ratio": float(np.sum(t) / np.sum(exact)),
                   "pearson": float(np.corrcoef(t, exact)[0, 1])} for name, t in estimates.items()}
    for name, r in rows.items():
        print(f"{name:40s} median rel. error {r['median_relative_error']:.4f}, sum ratio {r['sum_ratio']:.4f}, "
              f"Pearson {r['pearson']:.6f}", flush=True)
    out = {"settings": {**ec.task_info(task, ds, args), "clusters": args.clusters},
           "scale_16_draws": b, "scale_16_draws_stderr": float(corr.scale_stderr), "scale_clusters": b_clusters,
           "scale_clusters_each": (e_c / (l_c + k_c)).tolist(), "complement_factor_clusters": beta,
           "complement_share_of_raw": float(np.sum(comp) / np.sum(raw)), "rank": int(lr.rank),
           "build_seconds": {"calibrated": t_cal, "exact (N solves)": t_ex},
           "calibration_systems_share_of_solves": 16 / (16 + args.clusters), "examples_without_self_term": int((~nonzero).sum()),
           "estimates": rows}
    ec.write(f"calibration_source-{args.model}", args, out)


if __name__ == "__main__":
    main()
