"""Interaction-aware data selection (seed 003, sec. 5.1 and app. E.2): greedy F + I against F, F + B and random.

A two-hidden-layer ReLU MLP (float64) is trained on a candidate pool P drawn by
a fixed permutation of the training set; that model is theta_0 and the pool is
its training set (as the document's app. E.2). The target f is the mean test
loss. Each method selects m examples of P to *add* (``setting="add"``:
``-F + I``), the selection is retrained from scratch (full-batch, several
seeds, vmapped) and scored by its test loss and the class entropy of the
selected examples:

* random: uniform without replacement (one draw per seed);
* F: top-m by first-order influence (greedy with no pair term);
* F + B: greedy on Basu's second-order correction (``cj.second_order_terms``);
* F + I: greedy on the interaction-aware objective (``cj.greedy_select`` on
  ``cj.interaction_terms``), seed 003's Algorithm 1;
* F + I + B;
* F + I (cache): the same greedy on CiF cache terms (``cj.cache_interaction_terms``),
  with the cache's first-order term (cluster means: every member of a cluster
  scores the same) or the exact one (``first_order="exact"``, one more solve).

Greedy selections are nested, so one run to the largest budget gives every
budget (the document selects "in increments" from the same pool).

    python experiments/selection.py --quick

The document (MNIST, FashionMNIST; its pool size and widths were lost in
extraction): F + I best at every budget, F below random, F and F + B collapse
onto few classes while F + I matches random's class entropy.
"""

from __future__ import annotations

import time

import jax

jax.config.update("jax_enable_x64", True)

import _common as ec  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from lds import init_params, loss  # noqa: E402

import cif_jax as cj  # noqa: E402
from cif_jax.workloads import data as cdata  # noqa: E402


def mlp(params, x):
    h = jax.nn.relu(x @ params["w1"] + params["b1"][None, :])
    h = jax.nn.relu(h @ params["w2"] + params["b2"][None, :])
    return h @ params["w3"] + params["b3"][None, :]


def class_entropy(labels, num_classes):
    frac = np.bincount(labels, minlength=num_classes) / labels.size
    frac = frac[frac > 0]
    return float(-(frac * np.log(frac)).sum())


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--pool", type=int, default=None, help="candidate pool size (quick 600, full 1000)")
    p.add_argument("--hidden", type=int, nargs=2, default=None, help="hidden widths (quick 32 16, full 128 64)")
    p.add_argument("--budgets", type=int, nargs="+", default=[10, 20, 50, 100, 200])
    p.add_argument("--seeds", type=int, default=5, help="retraining seeds per selection")
    p.add_argument("--steps", type=int, default=1500, help="full-batch steps of every (re)training")
    p.add_argument("--learning-rate", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--clusters", type=int, default=50, help="C of the cache variant")
    args = ec.finish_args(p.parse_args(), quick_dataset="digits", full_dataset="mnist5k")
    pool_size = args.pool or (600 if args.quick else 1000)
    hidden = args.hidden or ([32, 16] if args.quick else [128, 64])
    rtol = args.rtol or 1e-8
    ds = cdata.load_dataset(args.dataset, seed=args.seed)
    perm = np.random.default_rng(args.seed).permutation(ds.x_train.shape[0])[:pool_size]
    x = jnp.asarray(ds.x_train.reshape(ds.x_train.shape[0], -1)[perm], jnp.float64)
    y = jnp.asarray(ds.y_train[perm], jnp.int32)
    xt = jnp.asarray(ds.x_test.reshape(ds.x_test.shape[0], -1), jnp.float64)
    yt = jnp.asarray(ds.y_test, jnp.int32)
    n, d = x.shape
    k = ds.num_classes
    sizes = [d, *hidden, k]
    budgets = sorted(b for b in args.budgets if b <= n)
    top = budgets[-1]
    train_kw = dict(num_steps=args.steps, learning_rate=args.learning_rate, weight_decay=args.weight_decay)

    # theta_0: the MLP trained on the whole pool.
    t0 = time.perf_counter()
    init0 = init_params(jax.random.key(args.seed), sizes)
    base = cj.train_many(cj.Task(mlp, loss, init0, x, y), np.ones((1, n), bool), **train_kw)
    params = jax.tree_util.tree_map(lambda a: a[0], base.params)
    task = cj.Task(mlp, loss, params, x, y)
    target = cj.Task(mlp, loss, params, xt, yt)
    base_loss = float(jnp.mean(loss(mlp(params, xt), yt)))
    base_seconds = time.perf_counter() - t0
    print(f"theta_0: pool {n}, p = {task.num_params}, test loss {base_loss:.4f}, "
          f"grad norm {float(base.grad_norm[0]):.2e} ({base_seconds:.0f} s)", flush=True)

    # Terms over the whole pool: one call gives F, I and B ([delta, h, delta] / [H_f delta, delta, h]).
    t1 = time.perf_counter()
    full = cj.second_order_terms(task, target, np.arange(n), damping=args.damping, interaction=True, solver=cj.CG(rtol=rtol, max_steps=args.max_steps, rhs_batch_size=None))
    terms_seconds = time.perf_counter() - t1
    q = task.num_params
    first = full.first_order
    zeros = jnp.zeros((n, 1), first.dtype)
    terms = {
        "F": cj.InteractionTerms(first, zeros, zeros),
        "F+B": cj.InteractionTerms(first, full.coords[:, q:], full.curved[:, q:]),
        "F+I": cj.InteractionTerms(first, full.coords[:, :q], full.curved[:, :q]),
        "F+I+B": full,
    }
    t2 = time.perf_counter()
    cache = cj.build_cache(task, correction=None, num_clusters=args.clusters, sketch_dim=32, damping=args.damping, solver=cj.CG(rtol=rtol, max_steps=args.max_steps), key=jax.random.key(args.seed + 1), normalize_sketches=True)
    terms[f"F+I (cache C={args.clusters})"] = cj.cache_interaction_terms(cache, target, task=task)
    terms["F+I (cache I, exact F)"] = cj.cache_interaction_terms(cache, target, task=task, first_order="exact")
    cache_seconds = time.perf_counter() - t2
    print(f"terms: exact {terms_seconds:.0f} s, cache {cache_seconds:.0f} s", flush=True)

    selections, objective = {}, {}
    for name, tm in terms.items():
        order, _, obj = cj.greedy_select(tm, budget=top, setting="add")
        selections[name] = [np.asarray(order)] * args.seeds
        objective[name] = np.asarray(obj)
    rng = np.random.default_rng(args.seed + 2)
    selections["random"] = [rng.permutation(n)[:top] for _ in range(args.seeds)]
    # Predicted -F + I of each selection under the exact F + I terms, for reference.
    predicted = {name: [float(np.asarray(cj.group_influence(terms["F+I"], [sel[0][:b]], setting="add")[2])[0])
                        for b in budgets] for name, sel in selections.items()}

    # Retrain every (method, budget, seed) from scratch, vmapped.
    names = list(selections)
    keep, inits, rows = [], [], []
    for name in names:
        for b in budgets:
            for s in range(args.seeds):
                mask = np.zeros(n, bool)
                mask[selections[name][s][:b]] = True
                keep.append(mask)
                inits.append(init_params(jax.random.key(1000 + s), sizes))
                rows.append((name, b, s))
    t3 = time.perf_counter()
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *inits)
    trained = cj.train_many(cj.Task(mlp, loss, init0, x, y), np.stack(keep), init_params=stacked, stacked_init=True,
                            model_batch_size=64, **train_kw)
    test_losses = np.asarray(jax.vmap(lambda prm: jnp.mean(loss(mlp(prm, xt), yt)))(trained.params))
    test_acc = np.asarray(jax.vmap(lambda prm: jnp.mean(jnp.argmax(mlp(prm, xt), 1) == yt))(trained.params))
    retrain_seconds = time.perf_counter() - t3

    labels = np.asarray(y)
    table = {}
    for name in names:
        table[name] = []
        for b in budgets:
            idx = [j for j, r in enumerate(rows) if r[0] == name and r[1] == b]
            ent = [class_entropy(labels[selections[name][s][:b]], k) for s in range(args.seeds)]
            table[name].append({"budget": b, "test_loss_mean": float(test_losses[idx].mean()),
                                "test_loss_std": float(test_losses[idx].std(ddof=1)) if len(idx) > 1 else 0.0,
                                "test_accuracy_mean": float(test_acc[idx].mean()),
                                "class_entropy": float(np.mean(ent)),
                                "classes_covered": float(np.mean([np.unique(labels[selections[name][s][:b]]).size
                                                                  for s in range(args.seeds)])),
                                "predicted_F_plus_I": predicted[name][budgets.index(b)]})
        print(name.ljust(22) + "  ".join(f"m={r['budget']}: {r['test_loss_mean']:.3f} (H {r['class_entropy']:.2f})"
                                        for r in table[name]), flush=True)
    # Does F + I beat each baseline at every budget (mean test loss)?
    wins = {other: [table["F+I"][j]["test_loss_mean"] < table[other][j]["test_loss_mean"] for j in range(len(budgets))]
            for other in names if other != "F+I"}
    out = {"settings": {"dataset": args.dataset, "model": f"MLP {sizes}", "dtype": "float64", "pool": n,
                        "num_params": int(q), "damping": args.damping, "rtol": rtol, "budgets": budgets,
                        "seeds": args.seeds, "steps": args.steps, "learning_rate": args.learning_rate,
                        "weight_decay": args.weight_decay, "clusters": args.clusters, "seed": args.seed,
                        "retraining": "full-batch heavy-ball, cold start, mean over the selected examples"},
           "base": {"test_loss": base_loss, "grad_norm": float(base.grad_norm[0]), "seconds": base_seconds},
           "seconds": {"exact_terms": terms_seconds, "cache_terms": cache_seconds, "retraining": retrain_seconds,
                       "models_retrained": len(rows)},
           "retrain_max_grad_norm": float(np.asarray(trained.grad_norm).max()),
           "results": table, "f_plus_i_wins": wins}
    ec.write("selection", args, out)

    plt = ec.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        r = table[name]
        axes[0].errorbar(budgets, [v["test_loss_mean"] for v in r], yerr=[v["test_loss_std"] for v in r],
                         marker="o", capsize=3, label=name)
        axes[1].plot(budgets, [v["class_entropy"] for v in r], "o-", label=name)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("selected examples m")
    axes[0].set(ylabel="test loss after retraining on S", title=f"selection ({args.dataset}, pool {n})")
    axes[1].set(ylabel="class entropy of S (nats)", title=f"diversity (max ln {k} = {np.log(k):.2f})")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ec.figure_path("selection", args))


if __name__ == "__main__":
    main()
