"""Seed 003's selection (sec. 5.1, app. E.2) under its own training protocol, with a validation target.

``experiments/selection.py`` retrained every selection for a fixed 1,500
full-batch steps whatever its size, used weight decay 1e-3, and took the test set
as the target, so the selection saw the data that scores it. The document trains
theta_0 and every selection "with the same training configuration": mini-batch SGD
for a number of **epochs** (its Table 3 MLP row: SGD, no momentum, learning rate
0.01, weight decay 0.01, batch 64, 200 epochs; E.2's own values were lost). Here:

* theta_0: a two-hidden-layer ReLU MLP (``--hidden``, float64) trained on a pool of
  P training examples drawn by a fixed permutation (``cif_jax.evaluation.training.train``),
  as E.2 does: the candidates are the examples theta_0 was trained on, and "adding" one
  scores it against the model that has already seen it (``setting="add"``: ``-F + I``);
* the **target** f is the mean loss on V validation examples drawn from the same
  permutation, outside the pool; the test set only scores the retrained models;
* terms over the whole pool on the damped GGN (operator damping = weight decay +
  ``--damping``): F, F + B, F + I, F + I + B (``cj.second_order_terms``) and CiF's
  F + I (C = ``--clusters``); each selects m examples to add (greedy, nested);
  random draws one selection per seed;
* each selection is retrained from scratch **by epochs** with the same recipe
  (``cj.retrain``, one call per seed from that seed's initialisation), and scored by
  its test loss and accuracy, its validation loss, and the class entropy of the
  selected examples.

Cells are resumable (``results/selection_protocol-<dataset>.cells.json``): the
terms and greedy orders in one, the retraining of each seed in its own.

    python experiments/selection_protocol.py --quick    # digits, pool 600, 100 epochs
    python experiments/selection_protocol.py            # mnist5k, pool 1,000, 200 epochs
"""

from __future__ import annotations

import time

import jax

jax.config.update("jax_enable_x64", True)

import _common as ec  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from selection import class_entropy  # noqa: E402

import cif_jax as cj  # noqa: E402
from cif_jax.evaluation.training import train  # noqa: E402
from cif_jax.workloads import data as cdata  # noqa: E402
from cif_jax.workloads import models as cmodels  # noqa: E402


def loss(outputs, targets):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)


def build(d, hidden, k, seed):
    from flax import nnx

    return cmodels.MLP(rngs=nnx.Rngs(seed), in_features=d, hidden=tuple(hidden), num_classes=k,
                       param_dtype=jnp.float64)


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--pool", type=int, default=None, help="candidate pool size (quick 600, full 1000)")
    p.add_argument("--validation", type=int, default=None, help="validation examples, the target (quick 300, full 1000)")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden widths (quick 32 16, full 128 64)")
    p.add_argument("--budgets", type=int, nargs="+", default=[10, 20, 50, 100, 200])
    p.add_argument("--seeds", type=int, default=5, help="retraining seeds per selection")
    p.add_argument("--epochs", type=int, default=None, help="epochs of theta_0 and every retraining (quick 100, full 200)")
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--sgd-batch", type=int, default=64)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clusters", type=int, default=50, help="C of the cache variant")
    p.set_defaults(rtol=1e-8)  # float64 solves: tighter than the float32 experiments' default
    args = ec.finish_args(p.parse_args(), quick_dataset="digits", full_dataset="mnist5k")
    pool_size = args.pool or (600 if args.quick else 1000)
    num_val = args.validation or (300 if args.quick else 1000)
    hidden = args.hidden or ([32, 16] if args.quick else [128, 64])
    epochs = args.epochs or (100 if args.quick else 200)
    rtol = args.rtol
    cells = ec.Cells("selection_protocol", args, {k: v for k, v in vars(args).items() if k not in ("output", "seeds")})
    ds = cdata.load_dataset(args.dataset, seed=args.seed)
    perm = np.random.default_rng(args.seed).permutation(ds.x_train.shape[0])
    if pool_size + num_val > perm.size:
        raise SystemExit(f"--pool {pool_size} + --validation {num_val} exceed the {perm.size} training examples")
    flat = ds.x_train.reshape(ds.x_train.shape[0], -1)
    pool, val = perm[:pool_size], perm[pool_size:pool_size + num_val]
    x, y = jnp.asarray(flat[pool], jnp.float64), jnp.asarray(ds.y_train[pool], jnp.int32)
    xv, yv = jnp.asarray(flat[val], jnp.float64), jnp.asarray(ds.y_train[val], jnp.int32)
    xt = jnp.asarray(ds.x_test.reshape(ds.x_test.shape[0], -1), jnp.float64)
    yt = jnp.asarray(ds.y_test, jnp.int32)
    n, d = x.shape
    k = ds.num_classes
    budgets = sorted(b for b in args.budgets if b < n)
    top = budgets[-1]
    recipe = dict(epochs=epochs, learning_rate=args.learning_rate, batch_size=args.sgd_batch, momentum=0.0,
                  weight_decay=args.weight_decay)

    t0 = time.perf_counter()
    model, _ = train(build(d, hidden, k, args.seed), x, y, seed=args.seed, progress=False, **recipe)
    base_seconds = time.perf_counter() - t0
    task = cj.Task.from_nnx(model, loss, x, y)
    target = cj.Task.from_nnx(model, loss, xv, yv)
    cells.check_model("theta_0", task)

    def mean_loss(xx, yy):
        return float(jnp.mean(loss(task.apply_fn(task.params, xx), yy)))

    base = {"test_loss": mean_loss(xt, yt), "validation_loss": mean_loss(xv, yv), "seconds": base_seconds,
            "test_accuracy": float(jnp.mean(jnp.argmax(task.apply_fn(task.params, xt), 1) == yt))}
    print(f"theta_0: pool {n}, p = {task.num_params}, test loss {base['test_loss']:.4f}, validation loss "
          f"{base['validation_loss']:.4f} ({base_seconds:.0f} s)", flush=True)
    lam = args.weight_decay + args.damping

    def select():
        t = time.perf_counter()
        full = cj.second_order_terms(task, target, np.arange(n), damping=lam, interaction=True,
                                     solver=cj.CG(rtol=rtol, max_steps=args.max_steps, rhs_batch_size=None))
        q = task.num_params
        first = full.first_order
        zeros = jnp.zeros((n, 1), first.dtype)
        terms = {"F": cj.InteractionTerms(first, zeros, zeros),
                 "F+B": cj.InteractionTerms(first, full.coords[:, q:], full.curved[:, q:]),
                 "F+I": cj.InteractionTerms(first, full.coords[:, :q], full.curved[:, :q]),
                 "F+I+B": full}
        exact_seconds = time.perf_counter() - t
        t = time.perf_counter()
        cache = cj.build_cache(task, correction=None, num_clusters=args.clusters, sketch_dim=32, damping=lam,
                               solver=cj.CG(rtol=rtol, max_steps=args.max_steps), key=jax.random.key(args.seed + 1),
                               normalize_sketches=True)
        terms[f"F+I (cache C={args.clusters})"] = cj.cache_interaction_terms(cache, target, task=task)
        cache_seconds = time.perf_counter() - t
        orders = {name: np.asarray(cj.greedy_select(tm, budget=top, setting="add")[0]).tolist()
                  for name, tm in terms.items()}
        predicted = {name: [float(np.asarray(cj.group_influence(terms["F+I"], [np.asarray(o[:b])],
                                                                setting="add")[2])[0]) for b in budgets]
                     for name, o in orders.items()}
        return {"orders": orders, "predicted_F_plus_I": predicted, "exact_terms_seconds": exact_seconds,
                "cache_terms_seconds": cache_seconds}

    sel = cells("select", select)
    print(f"terms: exact {sel['exact_terms_seconds']:.0f} s, cache {sel['cache_terms_seconds']:.0f} s", flush=True)
    names = [*sel["orders"], "random"]
    labels = np.asarray(y)
    table = {name: {b: [] for b in budgets} for name in names}
    for s in range(args.seeds):
        def run(s=s):
            rng = np.random.default_rng([args.seed, s])
            chosen = {**{nm: np.asarray(o) for nm, o in sel["orders"].items()}, "random": rng.permutation(n)[:top]}
            rows, removal = [], []
            for nm in names:
                for b in budgets:
                    mask = np.ones(n, bool)
                    mask[chosen[nm][:b]] = False  # cj.retrain removes; it keeps the selection
                    removal.append(mask)
                    rows.append((nm, b, chosen[nm][:b]))
            t = time.perf_counter()
            res = cj.retrain(lambda: build(d, hidden, k, 1000 + s), x, y, np.stack(removal),
                             eval_inputs=jnp.concatenate([xt, xv]), eval_targets=jnp.concatenate([yt, yv]),
                             seed=s, base_model=model, **recipe)
            losses = np.asarray(res.eval_losses)
            te, va = losses[:, :xt.shape[0]], losses[:, xt.shape[0]:]
            out = {"seconds": time.perf_counter() - t, "rows": []}
            for j, (nm, b, idx) in enumerate(rows):
                out["rows"].append({"method": nm, "budget": b, "test_loss": float(te[j].mean()),
                                    "validation_loss": float(va[j].mean()),
                                    "class_entropy": class_entropy(labels[idx], k),
                                    "classes_covered": int(np.unique(labels[idx]).size)})
            return out

        got = cells(f"retrain/seed{s}", run)
        for r in got["rows"]:
            table[r["method"]][r["budget"]].append(r)
        print(f"seed {s}: retrained {len(got['rows'])} selections in {got['seconds']:.0f} s", flush=True)
    results = {}
    for nm in names:
        results[nm] = []
        for b in budgets:
            rs = table[nm][b]
            tl = np.array([r["test_loss"] for r in rs])
            results[nm].append({"budget": b, "seeds": len(rs), "test_loss_mean": float(tl.mean()),
                                "test_loss_std": float(tl.std(ddof=1)) if tl.size > 1 else 0.0,
                                "validation_loss_mean": float(np.mean([r["validation_loss"] for r in rs])),
                                "class_entropy": float(np.mean([r["class_entropy"] for r in rs])),
                                "classes_covered": float(np.mean([r["classes_covered"] for r in rs]))})
        print(nm.ljust(22) + "  ".join(f"m={r['budget']}: {r['test_loss_mean']:.3f} (H {r['class_entropy']:.2f})"
                                        for r in results[nm]), flush=True)
    wins = {o: [results["F+I"][j]["test_loss_mean"] < results[o][j]["test_loss_mean"] for j in range(len(budgets))]
            for o in names if o != "F+I"}
    ec.write("selection_protocol", args, {
        "settings": {"dataset": args.dataset, "model": f"MLP {[d, *hidden, k]}", "dtype": "float64", "pool": n,
                     "validation": num_val, "num_params": int(task.num_params), "operator_damping": lam, "rtol": rtol,
                     "budgets": budgets, "seeds": args.seeds, "recipe": recipe, "clusters": args.clusters,
                     "seed": args.seed, "target": "mean validation loss (outside the pool)",
                     "retraining": "cj.retrain: mini-batch SGD by epochs, cold start from each seed's init"},
        "base": base, "seconds": {k_: sel[k_] for k_ in ("exact_terms_seconds", "cache_terms_seconds")},
        "results": results, "f_plus_i_wins": wins, "cell_runs": cells.runs})


if __name__ == "__main__":
    main()
