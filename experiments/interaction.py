"""Interaction-aware group influence (seed 003): faithfulness against retraining, and class pairs.

Multinomial logistic regression on scikit-learn's digits (float64, L2 = damping,
so the damped GGN is the Hessian of the training objective), target f = mean
test loss.

* Faithfulness (seed 003, sec. 4): G groups, each an anchor training example and
  its nearest neighbours in softmax-probability space (size 20: the document's
  size was lost). Truth: retraining without S (``cj.train_many``, warm start,
  objective divided by N as in eq. 3), ``f(theta_{-S}) - f(theta_0)``. Spearman
  of F, F + B (Basu et al.), F + I (exact), F + I + B, and F + I from CiF caches
  (C = 10, 50) against the truth, for each damping.
* Class pairs (seed 003, Fig. 2): mean I_ij over pairs of training examples by
  class pair, on a pool of examples.

    python experiments/interaction.py --quick

The document reports F + I best everywhere (margins lost in extraction) and F + B
unstable. The greedy-selection experiment (its sec. 5.1) is experiments/selection.py.
"""

from __future__ import annotations

import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from scipy.stats import pearsonr, spearmanr  # noqa: E402

import cif_jax as cj  # noqa: E402
from cif_jax import data as cdata  # noqa: E402

import _common as ec  # noqa: E402


def linear(params, x):
    return x @ params["w"] + params["b"][None, :]


def loss(outputs, targets):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=None, help="groups (quick 30, full 50)")
    p.add_argument("--group-size", type=int, default=20)
    p.add_argument("--dampings", type=float, nargs="+", default=None, help="quick: 1e-3 1e-2; full: 1e-4 .. 1e-1")
    p.add_argument("--pair-pool", type=int, default=300)
    p.add_argument("--steps", type=int, default=3000, help="full-batch steps of every (re)training")
    args = ec.finish_args(p.parse_args(), quick_dataset="digits", full_dataset="digits")
    groups = args.groups or (30 if args.quick else 50)
    dampings = args.dampings or ([1e-3, 1e-2] if args.quick else [1e-4, 1e-3, 1e-2, 1e-1])
    ds = cdata.load_dataset(args.dataset, seed=args.seed)
    x = jnp.asarray(ds.x_train.reshape(ds.x_train.shape[0], -1), jnp.float64)
    y = jnp.asarray(ds.y_train, jnp.int32)
    xt = jnp.asarray(ds.x_test.reshape(ds.x_test.shape[0], -1), jnp.float64)
    yt = jnp.asarray(ds.y_test, jnp.int32)
    n, d = x.shape
    k = ds.num_classes
    zeros = {"w": jnp.zeros((d, k)), "b": jnp.zeros(k)}
    rng = np.random.default_rng(args.seed)
    results = []
    for lam in dampings:
        t0 = time.perf_counter()
        start = cj.Task(linear, loss, zeros, x, y)
        base = cj.train_many(start, np.ones((1, n), bool), num_steps=args.steps, learning_rate=0.1,
                             weight_decay=lam, normalization="all")
        params = jax.tree_util.tree_map(lambda a: a[0], base.params)
        task = cj.Task(linear, loss, params, x, y)
        target = cj.Task(linear, loss, params, xt, yt)
        f0 = float(jnp.mean(loss(linear(params, xt), yt)))

        # Groups: anchor + nearest neighbours in softmax space.
        probs = np.asarray(jax.nn.softmax(linear(params, x), axis=1))
        anchors = rng.choice(n, size=groups, replace=False)
        sets = [np.argsort(np.linalg.norm(probs - probs[a][None, :], axis=1))[: args.group_size] for a in anchors]

        # Truth: retrain without each group (warm start, objective / N, L2 = lam).
        keep = np.ones((groups, n), bool)
        for q, s in enumerate(sets):
            keep[q, s] = False
        re = cj.train_many(task, keep, num_steps=args.steps, learning_rate=0.1, weight_decay=lam,
                           normalization="all")
        truth = np.array([float(jnp.mean(loss(linear(jax.tree_util.tree_map(lambda a: a[q], re.params), xt), yt)))
                          - f0 for q in range(groups)])
        retrain_seconds = time.perf_counter() - t0

        pool = np.unique(np.concatenate(sets))
        pos = {int(i): j for j, i in enumerate(pool)}
        local = [np.array([pos[int(i)] for i in s]) for s in sets]
        t1 = time.perf_counter()
        terms = cj.interaction_terms(task, target, pool, damping=lam, rtol=1e-10)
        f_, i_, fi = (np.asarray(a) for a in cj.group_influence(terms, local))
        exact_seconds = time.perf_counter() - t1
        t2 = time.perf_counter()
        fb = cj.second_order_group_influence(task, target, sets, damping=lam, rtol=1e-10)
        fb_seconds = time.perf_counter() - t2
        preds = {"F": f_, "F+B": np.asarray(fb.total), "F+I": fi, "F+I+B": fi + np.asarray(fb.correction)}
        for c in (10, 50):
            cache = cj.build_cache(task, num_clusters=c, sketch_dim=32, damping=lam, key=jax.random.key(c),
                                   rtol=1e-10, normalize_sketches=True)
            ct = cj.cache_interaction_terms(cache, target, task=task)
            preds[f"CiF F+I (C={c})"] = np.asarray(cj.group_influence(ct, sets)[2])
            bound = cj.interaction_error_bound(cache, target, sets, task=task)
            preds_err = np.abs(np.asarray(cj.group_influence(ct, sets)[1]) - i_)
            results.append({"damping": lam, "C": c, "interaction_error_mean": float(preds_err.mean()),
                            "interaction_bound_mean": float(np.asarray(bound.bound).mean()),
                            "bound_holds": bool(np.all(preds_err <= np.asarray(bound.bound)))})
        row = {"damping": lam, "groups": groups, "group_size": args.group_size,
               "base_grad_norm": float(np.asarray(base.grad_norm)[0]),
               "retrain_max_grad_norm": float(np.asarray(re.grad_norm).max()),
               "truth_mean": float(truth.mean()), "retrain_seconds": retrain_seconds,
               "exact_terms_seconds": exact_seconds, "fb_seconds": fb_seconds, "methods": {}}
        for name, v in preds.items():
            row["methods"][name] = {"spearman": float(spearmanr(v, truth).statistic),
                                    "pearson": float(pearsonr(v, truth).statistic),
                                    "mean_abs_error": float(np.mean(np.abs(v - truth)))}
        print(f"damping {lam:g}: " + ", ".join(f"{m} {r['spearman']:.3f}" for m, r in row["methods"].items()),
              flush=True)

        # Class pairs: mean I_ij per class pair on a pool.
        pair_pool = rng.choice(n, size=min(args.pair_pool, n), replace=False)
        pt = cj.interaction_terms(task, target, pair_pool, damping=lam, rtol=1e-10)
        pair = np.asarray(pt.coords) @ np.asarray(pt.curved).T
        labels = np.asarray(y)[pair_pool]
        mat = np.full((k, k), np.nan)
        for a in range(k):
            for b in range(k):
                block = pair[np.ix_(labels == a, labels == b)]
                if a == b:
                    block = block[~np.eye(block.shape[0], dtype=bool)]
                mat[a, b] = block.mean() if block.size else np.nan
        off = mat[~np.eye(k, dtype=bool)]
        row["class_pairs"] = {"matrix": mat.tolist(), "same_class_mean": float(np.nanmean(np.diag(mat))),
                              "cross_class_mean": float(np.nanmean(off)),
                              "lowest_pair": [int(v) for v in np.unravel_index(np.nanargmin(mat), mat.shape)],
                              "highest_pair": [int(v) for v in np.unravel_index(np.nanargmax(mat), mat.shape)]}
        row["class_pairs_matrix_for_plot"] = mat
        results.append(row)

    plot_rows = [r for r in results if "methods" in r]
    out = {"settings": {"dataset": args.dataset, "model": "multinomial logistic regression", "dtype": "float64",
                        "num_train": int(n), "num_params": int(d * k + k), "dampings": dampings,
                        "groups": groups, "group_size": args.group_size, "steps": args.steps,
                        "pair_pool": args.pair_pool, "seed": args.seed},
           "faithfulness": [{kk: v for kk, v in r.items() if kk != "class_pairs_matrix_for_plot"} for r in plot_rows],
           "cache_interaction_error": [r for r in results if "methods" not in r]}
    ec.write("interaction", args, out)
    plt = ec.pyplot()
    fig, axes = plt.subplots(1, 1 + len(plot_rows), figsize=(5 * (1 + len(plot_rows)), 4))
    names = list(plot_rows[0]["methods"])
    for j, r in enumerate(plot_rows):
        axes[0].plot(names, [r["methods"][m]["spearman"] for m in names], "o-", label=f"damping {r['damping']:g}")
        im = axes[1 + j].imshow(r["class_pairs_matrix_for_plot"], cmap="viridis")
        axes[1 + j].set(title=f"mean I_ij by class pair (damping {r['damping']:g})", xlabel="class", ylabel="class")
        fig.colorbar(im, ax=axes[1 + j])
    axes[0].set(ylabel="Spearman vs retraining", title="group faithfulness")
    axes[0].tick_params(axis="x", rotation=45)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(ec.figure_path("interaction", args))


if __name__ == "__main__":
    main()
