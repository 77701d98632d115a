"""Correlation matrix of LOO retraining, IF, CiF and PBRF on fold-level loss changes (paper Fig. 2, 6, 7).

For K-fold partitions (K = 50 and K = 500), each method predicts every fold's
``Delta l(S_k; S_k)``: the change of fold k's mean loss when fold k is removed.

* LOO: cold-start retraining without the fold, the base model's protocol and
  initialisation (``cj.train_many``: full-batch heavy-ball steps, all K models
  in one vmapped program, mean over the kept examples);
* IF: ``g_{S_k} . Delta theta_{S_k}``, one damped-GGN CG solve per fold;
* CiF: one cache (C = 10, d = 32, unit-normalised sketches), then
  ``cj.fold_loss_delta`` for all folds: the corrected estimator (the library's default,
  issue #17) and, from the same cache, the paper's (eq. 11, ``estimator="paper"``), which
  omits each member's self term; both are charged the cache's build time;
* PBRF (Bae et al. 2022): ``cj.pbrf`` from theta_0, a fixed number of Adam steps
  per fold, the fold's loss at ``theta_0 + Delta theta``.

The figure puts Spearman in the upper triangle, Pearson in the lower and each
method's end-to-end seconds (everything it needs, compilation included) on the
diagonal. Retraining must be cheap for K = 500 folds, so the models here are a
one-hidden-layer ReLU MLP (default) or multinomial logistic regression trained
full-batch in float64; the paper's are LeNet/CNNs on MNIST-10% and CIFAR-10.

    python experiments/correlation.py --quick     # digits
    python experiments/correlation.py             # mnist5k
"""

from __future__ import annotations

import time

import jax

jax.config.update("jax_enable_x64", True)

import _common as ec  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from lds import init_params, linear, loss, mlp  # noqa: E402

import cif_jax as cj  # noqa: E402
from cif_jax.workloads import data as cdata  # noqa: E402

METHODS = ("LOO", "IF", "CiF", "CiF paper", "PBRF")


def fold_losses(task, params_flat, folds):
    """Mean loss of each fold's own examples at each fold's parameters, (K,)."""
    _, unravel = ravel_pytree(task.params)
    out = []
    for k, idx in enumerate(folds):
        prm = unravel(params_flat[k])
        out.append(float(jnp.mean(loss(task.apply_fn(prm, task.inputs[idx]), task.targets[idx]))))
    return np.array(out)


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.set_defaults(model="mlp")
    p.add_argument("--folds", type=int, nargs="+", default=[50, 500])
    p.add_argument("--hidden", type=int, default=None, help="MLP width (quick 32, full 128)")
    p.add_argument("--steps", type=int, default=1500, help="full-batch steps of every (re)training")
    p.add_argument("--learning-rate", type=float, default=0.1)
    p.add_argument("--pbrf-steps", type=int, default=200)
    p.add_argument("--pbrf-lr", type=float, default=1e-3)
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--sketch-dim", type=int, default=32)
    args = ec.finish_args(p.parse_args(), quick_dataset="digits", full_dataset="mnist5k")
    if args.model not in ("mlp", "lr"):
        p.error("--model must be mlp or lr here (retraining is vmapped full-batch)")
    rtol = 1e-8  # float64 throughout
    ds = cdata.load_dataset(args.dataset, seed=args.seed)
    x = jnp.asarray(ds.x_train.reshape(ds.x_train.shape[0], -1), jnp.float64)
    y = jnp.asarray(ds.y_train, jnp.int32)
    n, d = x.shape
    k_out = ds.num_classes
    hidden = args.hidden or (32 if args.quick else 128)
    if args.model == "mlp":
        apply, sizes = mlp, [d, hidden, k_out]
        init = init_params(jax.random.key(args.seed), sizes)
    else:
        apply, sizes = linear, [d, k_out]
        init = init_params(jax.random.key(args.seed), sizes, zero=True)
    train_kw = dict(num_steps=args.steps, learning_rate=args.learning_rate, weight_decay=args.damping)
    start = cj.Task(apply, loss, init, x, y)
    t0 = time.perf_counter()
    base = cj.train_many(start, np.ones((1, n), bool), **train_kw)
    base_seconds = time.perf_counter() - t0
    params = jax.tree_util.tree_map(lambda a: a[0], base.params)
    task = cj.Task(apply, loss, params, x, y)
    flat0, _ = ravel_pytree(params)
    print(f"base: p = {task.num_params}, grad norm {float(base.grad_norm[0]):.1e} ({base_seconds:.0f} s)", flush=True)

    runs = []
    for num_folds in args.folds:
        folds = ec.folds_for(n, num_folds, args.seed)
        base_fold = fold_losses(task, jnp.tile(flat0, (num_folds, 1)), folds)
        scores, seconds = {}, {}

        t = time.perf_counter()
        keep = np.ones((num_folds, n), bool)
        for j, idx in enumerate(folds):
            keep[j, idx] = False
        re = cj.train_many(start, keep, model_batch_size=64, **train_kw)
        re_flat = jax.vmap(lambda prm: ravel_pytree(prm)[0])(re.params)
        scores["LOO"] = fold_losses(task, re_flat, folds) - base_fold
        seconds["LOO"] = time.perf_counter() - t
        retrain_grad = float(np.asarray(re.grad_norm).max())

        t = time.perf_counter()
        res = cj.influence_solve(task, folds, damping=args.damping, solver=cj.CG(rtol=rtol, max_steps=args.max_steps))
        g_eval = cj.mean_subset_gradients(task, folds)
        scores["IF"] = np.asarray((res.solutions * g_eval).sum(axis=1))
        seconds["IF"] = time.perf_counter() - t

        t = time.perf_counter()
        cache = cj.build_cache(task, num_clusters=args.clusters, sketch_dim=args.sketch_dim, damping=args.damping,
                               solver=cj.CG(rtol=rtol, max_steps=args.max_steps), key=jax.random.key(args.seed),
                               normalize_sketches=True)
        scores["CiF"] = np.asarray(cj.fold_loss_delta(cache, task, folds))
        seconds["CiF"] = time.perf_counter() - t
        t = time.perf_counter()
        scores["CiF paper"] = np.asarray(cj.fold_loss_delta(cache, task, folds, estimator="paper"))
        seconds["CiF paper"] = seconds["CiF"] + time.perf_counter() - t

        t = time.perf_counter()
        pb = cj.pbrf(task, folds, damping=args.damping, optimizer=optax.adam(args.pbrf_lr),
                     num_steps=args.pbrf_steps, subset_batch_size=64)
        scores["PBRF"] = fold_losses(task, flat0[None, :] + pb.param_delta, folds) - base_fold
        seconds["PBRF"] = time.perf_counter() - t

        mat = ec.correlation_matrix(scores, METHODS)
        print(f"K = {num_folds}: " + ", ".join(f"{m} {seconds[m]:.0f} s" for m in METHODS), flush=True)
        print("  Spearman vs LOO: " + ", ".join(f"{m} {mat[0, j]:.3f}" for j, m in enumerate(METHODS) if j), flush=True)
        runs.append({"folds": num_folds, "fold_size": float(np.mean([len(f) for f in folds])),
                     "matrix_upper_spearman_lower_pearson": mat.tolist(), "seconds": seconds,
                     "if_max_residual": float(np.max(res.residuals)), "retrain_max_grad_norm": retrain_grad,
                     "scores": {m: scores[m].tolist() for m in METHODS}})

    out = {"settings": {"dataset": args.dataset, "model": f"{args.model} {sizes}", "dtype": "float64",
                        "num_train": int(n), "num_params": int(task.num_params), "damping": args.damping,
                        "rtol": rtol, "steps": args.steps, "learning_rate": args.learning_rate,
                        "pbrf_steps": args.pbrf_steps, "pbrf_lr": args.pbrf_lr, "clusters": args.clusters,
                        "sketch_dim": args.sketch_dim, "seed": args.seed},
           "base_grad_norm": float(base.grad_norm[0]), "runs": runs}
    ec.write("correlation", args, out)

    plt = ec.pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 5.2), squeeze=False)
    for ax, r in zip(axes[0], runs):
        mat = np.array(r["matrix_upper_spearman_lower_pearson"])
        shown = mat.copy()
        np.fill_diagonal(shown, np.nan)
        im = ax.imshow(shown, vmin=-1, vmax=1, cmap="RdBu_r")
        for a in range(len(METHODS)):
            for b in range(len(METHODS)):
                text = f"{r['seconds'][METHODS[a]]:.0f} s" if a == b else f"{mat[a, b]:.2f}"
                ax.text(b, a, text, ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(METHODS)), METHODS)
        ax.set_yticks(range(len(METHODS)), METHODS)
        ax.set_title(f"K = {r['folds']} (upper Spearman, lower Pearson)")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(ec.figure_path("correlation", args))


if __name__ == "__main__":
    main()
