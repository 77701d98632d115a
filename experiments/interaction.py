"""Interaction-aware group influence (seed 003): faithfulness against retraining, and class pairs.

Multinomial logistic regression and a one-hidden-layer ReLU MLP (3 base models
from 3 seeds) on digits (quick) or mnist5k (float64, L2 = damping, so the damped
GGN is the Gauss-Newton part of the training objective's Hessian), target
f = mean test loss, dampings 1e-4 .. 1e-1.

* Faithfulness (seed 003, sec. 4): G groups, each an anchor training example and
  its nearest neighbours in softmax-probability space (size 20: the document's
  size was lost). Truth: retraining without S (``cj.train_many``, warm start,
  objective divided by N as in eq. 3), ``f(theta_{-S}) - f(theta_0)``. Spearman
  of F, F + B (Basu et al.), F + I (exact), F + I + B, F + I from CiF caches
  (C = 10, 50), and TRAK and TracIn summed over each group, against the truth.
* Class pairs (seed 003, Fig. 2; LR): mean I_ij over pairs of training examples
  by class pair, on a pool of examples.

    python experiments/interaction.py --quick     # digits, 30 groups (about 30 min on 2 cores)
    python experiments/interaction.py             # mnist5k, 50 groups

The document reports F + I best everywhere (margins lost in extraction) and F + B
unstable. The greedy-selection experiment (its sec. 5.1) is experiments/selection.py.
"""

from __future__ import annotations

import time

import jax

jax.config.update("jax_enable_x64", True)

import _common as ec  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from lds import loss, mlp  # noqa: E402
from scipy.stats import pearsonr, spearmanr  # noqa: E402

import cif_jax as cj  # noqa: E402
from cif_jax.workloads import data as cdata  # noqa: E402


def linear(params, x):
    return x @ params["w"] + params["b"][None, :]


def initial(model, key, d, k, hidden):
    if model == "lr":  # convex: the start is irrelevant
        return linear, {"w": jnp.zeros((d, k)), "b": jnp.zeros(k)}
    k1, k2 = jax.random.split(key)
    return mlp, {"w1": jax.random.normal(k1, (d, hidden)) / np.sqrt(d), "b1": jnp.zeros(hidden),
                 "w2": jax.random.normal(k2, (hidden, k)) / np.sqrt(hidden), "b2": jnp.zeros(k)}


def faithfulness(model, seed, lam, data, args, rng, *, groups, results):
    """One base model (model, seed, damping): every method's group predictions against retraining."""
    x, y, xt, yt = data
    n, d = x.shape
    k = int(np.max(np.asarray(y))) + 1
    apply, init = initial(model, jax.random.key(seed), d, k, args.hidden)
    t0 = time.perf_counter()
    start = cj.Task(apply, loss, init, x, y)
    # theta_0 and the TracIn checkpoints: full-batch GD is deterministic, so training for t steps
    # is the trajectory's checkpoint at step t.
    marks = [args.steps * j // 4 for j in range(1, 5)]
    ckpts = [jax.tree_util.tree_map(lambda a: a[0], cj.train_many(
        start, np.ones((1, n), bool), num_steps=t, learning_rate=0.1, weight_decay=lam,
        normalization="all").params) for t in marks]
    params = ckpts[-1]
    task = cj.Task(apply, loss, params, x, y)
    target = cj.Task(apply, loss, params, xt, yt)
    f0 = float(jnp.mean(loss(apply(params, xt), yt)))
    base_grad = float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(jax.grad(
        lambda prm: jnp.mean(loss(apply(prm, x), y)) + lam / 2 * sum(
            jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(prm)))(params))[0]))

    # Groups: anchor + nearest neighbours in softmax space.
    probs = np.asarray(jax.nn.softmax(apply(params, x), axis=1))
    anchors = rng.choice(n, size=groups, replace=False)
    sets = [np.argsort(np.linalg.norm(probs - probs[a][None, :], axis=1))[: args.group_size] for a in anchors]

    # Truth: retrain without each group (warm start, objective / N, L2 = lam).
    keep = np.ones((groups, n), bool)
    for q, s in enumerate(sets):
        keep[q, s] = False
    re = cj.train_many(task, keep, num_steps=args.steps, learning_rate=0.1, weight_decay=lam, normalization="all")
    truth = np.array([float(jnp.mean(loss(apply(jax.tree_util.tree_map(lambda a: a[q], re.params), xt), yt)))
                      - f0 for q in range(groups)])
    retrain_seconds = time.perf_counter() - t0

    pool = np.unique(np.concatenate(sets))
    pos = {int(i): j for j, i in enumerate(pool)}
    local = [np.array([pos[int(i)] for i in s]) for s in sets]
    t1 = time.perf_counter()
    terms = cj.interaction_terms(task, target, pool, damping=lam, solver=cj.CG(rtol=1e-10))
    f_, i_, fi = (np.asarray(a) for a in cj.group_influence(terms, local))
    exact_seconds = time.perf_counter() - t1
    t2 = time.perf_counter()
    fb = cj.second_order_group_influence(task, target, sets, damping=lam, solver=cj.CG(rtol=1e-10))
    fb_seconds = time.perf_counter() - t2
    preds = {"F": f_, "F+B": np.asarray(fb.total), "F+I": fi, "F+I+B": fi + np.asarray(fb.correction)}
    for c in (10, 50):
        cache = cj.build_cache(task, correction=None, num_clusters=c, sketch_dim=32, damping=lam, key=jax.random.key(c),
                               solver=cj.CG(rtol=1e-10), normalize_sketches=True)
        ct = cj.cache_interaction_terms(cache, target, task=task)
        preds[f"CiF F+I (C={c})"] = np.asarray(cj.group_influence(ct, sets)[2])
        bound = cj.interaction_error_bound(cache, target, sets, task=task)
        preds_err = np.abs(np.asarray(cj.group_influence(ct, sets)[1]) - i_)
        results.append({"model": model, "seed": seed, "damping": lam, "C": c,
                        "interaction_error_mean": float(preds_err.mean()),
                        "interaction_bound_mean": float(np.asarray(bound.bound).mean()),
                        "bound_holds": bool(np.all(preds_err <= np.asarray(bound.bound)))})
    # Per-example baselines summed over each group, on the mean test loss (positive = helpful,
    # so removal is predicted to raise f: the same sign as F).
    preds["TRAK"] = np.asarray(cj.trak(task, xt, yt, sketch_dim=256, key=jax.random.key(7), ridge=1e-6,
                                       groups=sets)).mean(axis=0)
    lrs = [0.1 * (b - a) for a, b in zip([0] + marks[:-1], marks)]
    preds["TracIn"] = np.asarray(cj.tracin(task, xt, yt, checkpoints=ckpts, learning_rates=lrs,
                                           groups=sets)).mean(axis=0)
    row = {"model": model, "seed": seed, "damping": lam, "groups": groups, "group_size": args.group_size,
           "num_params": int(task.num_params), "base_grad_norm": base_grad,
           "retrain_max_grad_norm": float(np.asarray(re.grad_norm).max()),
           "truth_mean": float(truth.mean()), "retrain_seconds": retrain_seconds,
           "exact_terms_seconds": exact_seconds, "fb_seconds": fb_seconds, "methods": {}}
    for name, v in preds.items():
        row["methods"][name] = {"spearman": float(spearmanr(v, truth).statistic),
                                "pearson": float(pearsonr(v, truth).statistic),
                                "mean_abs_error": float(np.mean(np.abs(v - truth)))}
    print(f"{model} seed {seed} damping {lam:g}: " + ", ".join(
        f"{m} {r['spearman']:.3f}" for m, r in row["methods"].items()), flush=True)
    if model == "lr":
        row["class_pairs"], row["class_pairs_matrix_for_plot"] = class_pairs(task, target, y, k, lam, rng, args)
    results.append(row)


def class_pairs(task, target, y, k, lam, rng, args):
    """Mean I_ij per class pair on a pool of training examples (seed 003, Fig. 2)."""
    n = task.num_examples
    pair_pool = rng.choice(n, size=min(args.pair_pool, n), replace=False)
    pt = cj.interaction_terms(task, target, pair_pool, damping=lam, solver=cj.CG(rtol=1e-10))
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
    return ({"matrix": mat.tolist(), "same_class_mean": float(np.nanmean(np.diag(mat))),
             "cross_class_mean": float(np.nanmean(off)),
             "lowest_pair": [int(v) for v in np.unravel_index(np.nanargmin(mat), mat.shape)],
             "highest_pair": [int(v) for v in np.unravel_index(np.nanargmax(mat), mat.shape)]}, mat)


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["lr", "mlp"], choices=["lr", "mlp"])
    p.add_argument("--groups", type=int, default=None, help="groups (quick 30, full 50)")
    p.add_argument("--group-size", type=int, default=20)
    p.add_argument("--dampings", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1])
    p.add_argument("--seeds", type=int, default=3, help="MLP base models (LR is convex: one)")
    p.add_argument("--hidden", type=int, default=32, help="MLP width")
    p.add_argument("--pair-pool", type=int, default=300)
    p.add_argument("--steps", type=int, default=3000, help="full-batch steps of every (re)training")
    args = ec.finish_args(p.parse_args(), quick_dataset="digits", full_dataset="mnist5k")
    groups = args.groups or (30 if args.quick else 50)
    dampings = args.dampings
    ds = cdata.load_dataset(args.dataset, seed=args.seed)
    x = jnp.asarray(ds.x_train.reshape(ds.x_train.shape[0], -1), jnp.float64)
    y = jnp.asarray(ds.y_train, jnp.int32)
    xt = jnp.asarray(ds.x_test.reshape(ds.x_test.shape[0], -1), jnp.float64)
    yt = jnp.asarray(ds.y_test, jnp.int32)
    n, d = x.shape
    rng = np.random.default_rng(args.seed)
    results = []
    for model in args.models:
        for seed in range(1 if model == "lr" else args.seeds):
            for lam in dampings:
                faithfulness(model, args.seed + seed, lam, (x, y, xt, yt), args, rng, groups=groups,
                             results=results)

    plot_rows = [r for r in results if "methods" in r]
    out = {"settings": {"dataset": args.dataset, "models": args.models, "mlp_hidden": args.hidden, "dtype": "float64",
                        "num_train": int(n), "dampings": dampings, "mlp_seeds": args.seeds,
                        "groups": groups, "group_size": args.group_size, "steps": args.steps,
                        "pair_pool": args.pair_pool, "seed": args.seed},
           "faithfulness": [{kk: v for kk, v in r.items() if kk != "class_pairs_matrix_for_plot"} for r in plot_rows],
           "summary": summary(plot_rows),
           "cache_interaction_error": [r for r in results if "methods" not in r]}
    ec.write("interaction", args, out)
    plot(out["summary"], [r for r in plot_rows if "class_pairs" in r], args)


def summary(rows):
    """Spearman mean and std over seeds, by model and damping."""
    out = {}
    for r in rows:
        for m, v in r["methods"].items():
            out.setdefault(r["model"], {}).setdefault(f"{r['damping']:g}", {}).setdefault(m, []).append(v["spearman"])
    return {model: {lam: {m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "seeds": len(v)}
                          for m, v in by.items()} for lam, by in lams.items()} for model, lams in out.items()}


def plot(summ, pair_rows, args):
    plt = ec.pyplot()
    models = list(summ)
    fig, axes = plt.subplots(1, len(models) + len(pair_rows), figsize=(5 * (len(models) + len(pair_rows)), 4.2),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        for lam, by in summ[model].items():
            names = list(by)
            ax.errorbar(names, [by[m]["mean"] for m in names], yerr=[by[m]["std"] for m in names], fmt="o-",
                        capsize=2, label=f"damping {lam}")
        ax.set(ylabel="Spearman vs retraining", title=f"group faithfulness ({model})")
        ax.tick_params(axis="x", rotation=60)
        ax.legend(fontsize=7)
    for ax, r in zip(axes[0][len(models):], pair_rows):
        im = ax.imshow(r["class_pairs_matrix_for_plot"], cmap="viridis")
        ax.set(title=f"mean I_ij by class pair (LR, damping {r['damping']:g})", xlabel="class", ylabel="class")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(ec.figure_path("interaction", args))


if __name__ == "__main__":
    main()
