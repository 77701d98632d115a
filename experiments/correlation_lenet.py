"""Fig. 2/6/7 with LeNet-5: fold-level agreement of leave-fold-out retraining, IF, both CiF estimators and PBRF.

The paper compares methods against retraining on a CNN. Here the model is the main
job's LeNet-5 (28x28 on mnist5k, p = 61,706) trained by the main job's protocol
(``cif_jax.workloads.training.TRAINING``: mini-batch SGD). For K folds (K = 50),
every method predicts each fold's ``Delta l(S_k; S_k)``, the change of fold k's mean
loss when fold k is removed:

* LOO: cold-start retraining without the fold, with the base model's protocol, its
  initialisation and its data-order seed (one retraining per fold);
* IF: one damped-GGN solve per fold, at the library's defaults;
* CiF: one cache (C = 10, d = 32, the library's defaults), the corrected estimator
  and the paper's (eq. 11) from the same cache;
* PBRF (Bae et al. 2022): ``cj.pbrf``, Adam steps from theta_0 per fold.

Retraining a network with SGD is itself noisy: removing a fold changes every
mini-batch after it. The **noise floor** measures that: the base model retrained
on all the data with another data-order seed (nothing removed) changes each fold's
loss too, and the correlation of LOO with a method cannot exceed what that noise
allows. Reported: the correlation matrix (upper Spearman, lower Pearson), each
method's seconds, and the noise floor's spread beside LOO's.

Every retraining and every method is one resumable cell
(``experiments/results/correlation_lenet-<dataset>.cells.json``).

    python experiments/correlation_lenet.py --quick   # digits LeNet-5 (8x8), K = 50
    python experiments/correlation_lenet.py           # mnist5k LeNet-5 (28x28), K = 50
"""

from __future__ import annotations

import time

import _common as ec
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.stats import spearmanr

import cif_jax as cj
from cif_jax.workloads import models as cmodels
from cif_jax.workloads import training
from cif_jax.workloads.training import TRAINING

METHODS = ("LOO", "IF", "CiF", "CiF paper", "PBRF")


def fold_losses(net, x, y, folds):
    """Mean cross-entropy of each fold's own examples under ``net``, (K,)."""
    logits = np.asarray(net(jnp.asarray(x)))
    z = logits - logits.max(axis=1, keepdims=True)
    losses = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), np.asarray(y)]
    return np.array([losses[f].mean() for f in folds])


def retrain(ds, args, keep, order_seed):
    """The base model's protocol on the examples ``keep``: the same initialisation, data order from ``order_seed``."""
    epochs, lr, schedule = TRAINING[args.dataset]
    config = cmodels.model_config(args.model, in_shape=ds.x_train.shape[1:], num_classes=ds.num_classes)
    net = cmodels.build_from_config(config, seed=args.seed)
    net, _ = training.train(net, ds.x_train[keep], ds.y_train[keep], epochs=epochs, learning_rate=lr,
                            schedule=schedule, seed=order_seed, progress=False)
    return net


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--folds", type=int, default=50)
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--noise-seeds", type=int, nargs="+", default=[1001, 1002],
                   help="data-order seeds of the full-data retrainings that measure the noise floor")
    p.add_argument("--pbrf-steps", type=int, default=100)
    p.add_argument("--pbrf-lr", type=float, default=1e-4)
    p.add_argument("--max-folds", type=int, default=None, help="retrain only the first folds (a partial run)")
    args = ec.finish_args(p.parse_args())
    cells = ec.Cells("correlation_lenet", args, {k: v for k, v in vars(args).items()
                                                  if k not in ("output", "max_folds")})
    task, ds = ec.trained_task(args.dataset, args.model, seed=args.seed)
    n = task.num_examples
    folds = ec.folds_for(n, args.folds, args.seed)
    base_net = training.load_checkpoint(ec.checkpoint_path(args.dataset, args.model, args.seed),
                                        config=cmodels.model_config(args.model, in_shape=ds.x_train.shape[1:],
                                                                    num_classes=ds.num_classes))
    base = fold_losses(base_net, ds.x_train, ds.y_train, folds)
    print(f"{args.dataset}/{args.model}: N = {n}, p = {task.num_params:,}, K = {args.folds}", flush=True)

    def timed_scores(fn):
        t0 = time.perf_counter()
        scores = np.asarray(fn())
        return {"scores": scores.tolist(), "seconds": time.perf_counter() - t0}

    def if_cell():
        scores, info = ec.if_fold_scores(task, folds, args)
        return {"scores": scores.tolist(), **info}

    def cif_cell():
        t0 = time.perf_counter()
        cache, warns = ec.build_cache(task, args, num_clusters=args.clusters)
        est = ec.cif_fold_estimators(cache, task, folds, args)
        corrected, paper = est.corrected, est.paper
        return {"corrected": corrected.tolist(), "paper": paper.tolist(), "seconds": time.perf_counter() - t0,
                "solver": cache.solver, "warnings": warns}

    def pbrf_cell():
        flat0 = jax.flatten_util.ravel_pytree(task.params)[0]
        _, unravel = jax.flatten_util.ravel_pytree(task.params)

        def run():
            pb = cj.pbrf(task, folds, damping=args.damping, optimizer=optax.adam(args.pbrf_lr),
                         num_steps=args.pbrf_steps, subset_batch_size=8, batch_size=args.batch_size)
            out = []
            for k, idx in enumerate(folds):
                prm = unravel(flat0 + pb.param_delta[k])
                z = task.apply_fn(prm, task.inputs[idx])
                out.append(float(jnp.mean(task.loss_fn(z, task.targets[idx]))))
            return np.asarray(out) - base

        return timed_scores(run)

    results = {"IF": cells("IF", if_cell), "CiF": cells("CiF", cif_cell), "PBRF": cells("PBRF", pbrf_cell)}
    print(f"IF {results['IF']['seconds']:.0f} s, CiF {results['CiF']['seconds']:.0f} s, "
          f"PBRF {results['PBRF']['seconds']:.0f} s", flush=True)

    def loo_cell(k):
        keep = np.ones(n, bool)
        keep[folds[k]] = False
        t0 = time.perf_counter()
        net = retrain(ds, args, keep, order_seed=args.seed)
        change = float(fold_losses(net, ds.x_train, ds.y_train, [folds[k]])[0] - base[k])
        return {"change": change, "seconds": time.perf_counter() - t0}

    def noise_cell(seed):
        t0 = time.perf_counter()
        net = retrain(ds, args, np.ones(n, bool), order_seed=seed)
        return {"changes": (fold_losses(net, ds.x_train, ds.y_train, folds) - base).tolist(),
                "seconds": time.perf_counter() - t0}

    noise = [cells(f"noise/order{s}", lambda s=s: noise_cell(s)) for s in args.noise_seeds]
    todo = range(min(args.max_folds or args.folds, args.folds))
    loo = []
    for k in todo:
        loo.append(cells(f"LOO/fold{k:03d}", lambda k=k: loo_cell(k)))
        if k % 5 == 4:
            print(f"LOO: {k + 1} of {len(todo)} folds retrained ({loo[-1]['seconds']:.0f} s each)", flush=True)
    m = len(loo)
    scores = {"LOO": np.array([x["change"] for x in loo]), "IF": np.asarray(results["IF"]["scores"])[:m],
              "CiF": np.asarray(results["CiF"]["corrected"])[:m], "CiF paper": np.asarray(results["CiF"]["paper"])[:m],
              "PBRF": np.asarray(results["PBRF"]["scores"])[:m]}
    seconds = {"LOO": float(sum(x["seconds"] for x in loo)), "IF": results["IF"]["seconds"],
               "CiF": results["CiF"]["seconds"], "CiF paper": results["CiF"]["seconds"],
               "PBRF": results["PBRF"]["seconds"]}
    mat = ec.correlation_matrix(scores, METHODS)
    noise_changes = np.asarray([x["changes"] for x in noise])[:, :m]
    floor = {"noise_std_per_fold": float(noise_changes.std()), "loo_std": float(scores["LOO"].std()),
             "if_std": float(scores["IF"].std()),
             "noise_vs_loo_spearman": [float(spearmanr(c, scores["LOO"]).statistic) for c in noise_changes],
             "noise_vs_if_spearman": [float(spearmanr(c, scores["IF"]).statistic) for c in noise_changes]}
    print("Spearman vs LOO: " + ", ".join(f"{x} {mat[0, j]:.3f}" for j, x in enumerate(METHODS) if j))
    print(f"noise floor: std of a fold's loss change with nothing removed {floor['noise_std_per_fold']:.4g}, "
          f"std of LOO's changes {floor['loo_std']:.4g}, of IF's {floor['if_std']:.4g}")
    out = {**ec.task_info(task, ds, args), "folds": args.folds, "folds_retrained": m, "complete": m == args.folds,
           "clusters": args.clusters, "pbrf_steps": args.pbrf_steps, "pbrf_lr": args.pbrf_lr,
           "matrix_upper_spearman_lower_pearson": mat.tolist(), "methods": list(METHODS), "seconds": seconds,
           "noise_floor": floor, "scores": {k: v.tolist() for k, v in scores.items()},
           "if_max_residual": results["IF"]["max_residual"], "cif_solver": results["CiF"]["solver"],
           "cell_runs": cells.runs}
    ec.write("correlation_lenet", args, out)

    plt = ec.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    shown = mat.copy()
    np.fill_diagonal(shown, np.nan)
    im = axes[0].imshow(shown, vmin=-1, vmax=1, cmap="RdBu_r")
    for a in range(len(METHODS)):
        for b in range(len(METHODS)):
            text = f"{seconds[METHODS[a]]:.0f} s" if a == b else f"{mat[a, b]:.2f}"
            axes[0].text(b, a, text, ha="center", va="center", fontsize=9)
    axes[0].set_xticks(range(len(METHODS)), METHODS)
    axes[0].set_yticks(range(len(METHODS)), METHODS)
    axes[0].set_title(f"K = {args.folds}, {m} folds retrained (upper Spearman, lower Pearson)", fontsize=9)
    fig.colorbar(im, ax=axes[0])
    axes[1].scatter(scores["IF"], scores["LOO"], s=12, label="LOO")
    for j, c in enumerate(noise_changes):
        axes[1].scatter(scores["IF"], c, s=8, alpha=0.5, label=f"retrained, nothing removed (order {args.noise_seeds[j]})")
    axes[1].set(xlabel="IF fold loss change", ylabel="retrained fold loss change")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ec.figure_path("correlation_lenet", args))


if __name__ == "__main__":
    main()
