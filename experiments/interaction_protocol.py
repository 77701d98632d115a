"""Seed 003 under its document's protocol: fixed weight decay, damping swept alone, cold-start truth.

``experiments/interaction.py`` tied the weight decay to the damping (every damping row
was another model), took warm-start retraining as the truth, used the GGN as the
target curvature only, and ran 30 groups on digits. The document (Interaction-Aware
Influence Functions for Group Attribution) fixes the weight decay at 0.01 (Table 3,
app. E.1), sweeps the damping alone (app. F), retrains **from scratch** (E.1, "Ground
truth"), and reads ``H_f`` as the target's Hessian (eq. 6, C.4). Here, per model
(multinomial logistic regression; an MLP with two hidden layers, widths ``--hidden``:
the document's were lost) and seed:

* ``base/<model>/seed<s>``: theta_0 trained from the seed's initial parameters
  (full-batch, ``--steps`` steps, weight decay ``--weight-decay``, objective / N), and
  the **noise floor**: theta_0' trained the same way from another initialisation
  (seed + 1000); ``|f(theta_0') - f(theta_0)|`` against the spread of the truths;
* ``truth/<model>/seed<s>``: 50 groups (an anchor and its nearest neighbours in
  softmax space, size 20), each retrained without the group **from the same
  initialisation** as theta_0; truth = ``f(theta_{-S}) - f(theta_0)``, f the mean test loss;
* ``est/<model>/seed<s>/lam<l>``: per group, the exact ``delta_S`` (one CG solve on the
  damped GGN of the objective: operator damping = weight decay + lambda, since the
  regulariser's curvature is part of the objective's), F = ``grad f . delta_S``,
  I = ``delta_S^T H_f delta_S / 2`` with ``H_f`` the target's GGN and its Hessian,
  F + B (Basu et al.), F + I + B, CiF's F + I (C = 10, 50), and TRAK and TracIn summed
  over each group; the Spearman of each against the truth.

The groups and the truth do not depend on lambda, so every damping row reads one
truth. Cells are resumable (``results/interaction_protocol-<dataset>.cells.json``).

    python experiments/interaction_protocol.py --quick            # digits, 30 groups
    python experiments/interaction_protocol.py --models lr        # mnist5k, 50 groups
"""

from __future__ import annotations

import time

import jax

jax.config.update("jax_enable_x64", True)

import _common as ec  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from lds import loss  # noqa: E402
from scipy.stats import pearsonr, spearmanr  # noqa: E402

import cif_jax as cj  # noqa: E402
from cif_jax.workloads import data as cdata  # noqa: E402

MODELS = ("lr", "mlp")


def network(params, x):
    """Logistic regression (``w1, b1``) or a ReLU MLP (``w1, b1, ..., wL, bL``)."""
    depth = len(params) // 2
    for j in range(1, depth):
        x = jax.nn.relu(x @ params[f"w{j}"] + params[f"b{j}"][None, :])
    return x @ params[f"w{depth}"] + params[f"b{depth}"][None, :]


def initial(model, key, d, k, hidden):
    """Random initial parameters, ``N(0, 1/fan_in)`` weights and zero biases (LR too, so the noise floor of
    logistic regression measures optimisation error)."""
    sizes = [d, k] if model == "lr" else [d, *hidden, k]
    params = {}
    for j in range(1, len(sizes)):
        key, sub = jax.random.split(key)
        params[f"w{j}"] = jax.random.normal(sub, (sizes[j - 1], sizes[j]), jnp.float64) / np.sqrt(sizes[j - 1])
        params[f"b{j}"] = jnp.zeros(sizes[j], jnp.float64)
    return params


def test_loss(params, xt, yt):
    return float(jnp.mean(loss(network(params, xt), yt)))


def train(init, keep, data, args, num_steps=None):
    x, y = data[:2]
    start = cj.Task(network, loss, init, x, y)
    return cj.train_many(start, keep, num_steps=num_steps or args.steps, learning_rate=args.learning_rate,
                         weight_decay=args.weight_decay, normalization="all")


def first(models):
    return jax.tree_util.tree_map(lambda a: a[0], models.params)


def base_model(cells, model, seed, data, args):
    """theta_0 from the seed's initialisation (recomputed on resume: full-batch training is deterministic, and its
    test loss is checked against the stored one) and the noise-floor cell."""
    x, y, xt, yt = data
    n, d = x.shape
    k = int(np.max(np.asarray(y))) + 1
    init = initial(model, jax.random.key(seed), d, k, args.hidden)
    t = time.perf_counter()
    params = first(train(init, np.ones((1, n), bool), data, args))
    seconds = time.perf_counter() - t
    f0 = test_loss(params, xt, yt)

    def run():
        other = first(train(initial(model, jax.random.key(seed + 1000), d, k, args.hidden), np.ones((1, n), bool),
                            data, args))
        grad = jax.grad(lambda p: jnp.mean(loss(network(p, x), y)) + args.weight_decay / 2 * sum(
            jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(p)))(params)
        acc = float(jnp.mean(jnp.argmax(network(params, xt), 1) == yt))
        return {"f0": f0, "test_accuracy": acc, "seconds": seconds,
                "grad_norm": float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(grad)[0])),
                "f0_other_init": test_loss(other, xt, yt)}

    got = cells(f"base/{model}/seed{seed}", run)
    if not np.isclose(got["f0"], f0, rtol=1e-9, atol=1e-12):
        raise SystemExit(f"base/{model}/seed{seed}: theta_0's test loss {f0!r} differs from the stored "
                         f"{got['f0']!r}; another machine or library version retrained it. Use another --output.")
    return init, params, got


def truth_cell(cells, model, seed, init, params, data, args, groups):
    x, y, xt, yt = data
    n = x.shape[0]

    def run():
        rng = np.random.default_rng([args.seed, seed, MODELS.index(model)])
        probs = np.asarray(jax.nn.softmax(network(params, x), axis=1))
        anchors = rng.choice(n, size=groups, replace=False)
        sets = [np.sort(np.argsort(np.linalg.norm(probs - probs[a][None, :], axis=1))[: args.group_size])
                for a in anchors]
        keep = np.ones((groups, n), bool)
        for q, s in enumerate(sets):
            keep[q, s] = False
        t = time.perf_counter()
        re = train(init, keep, data, args)  # cold start: the same initialisation as theta_0
        f0 = test_loss(params, xt, yt)
        truth = [test_loss(jax.tree_util.tree_map(lambda a: a[q], re.params), xt, yt) - f0 for q in range(groups)]
        return {"groups": [s.tolist() for s in sets], "truth": truth, "seconds": time.perf_counter() - t,
                "max_grad_norm": float(np.asarray(re.grad_norm).max())}

    return cells(f"truth/{model}/seed{seed}", run)


def baselines(task, target, sets, args, ckpts, marks):
    """TRAK and TracIn summed over each group (no damping: one cell per base model)."""
    xt, yt = target.inputs, target.targets
    out, seconds = {}, {}
    t = time.perf_counter()
    out["TRAK"] = np.asarray(cj.trak(task, xt, yt, sketch_dim=256, key=jax.random.key(7), ridge=1e-6,
                                     groups=sets)).mean(axis=0)
    seconds["TRAK"] = time.perf_counter() - t
    t = time.perf_counter()
    lrs = [args.learning_rate * (b - a) for a, b in zip([0] + marks[:-1], marks)]
    out["TracIn"] = np.asarray(cj.tracin(task, xt, yt, checkpoints=ckpts, learning_rates=lrs,
                                         groups=sets)).mean(axis=0)
    seconds["TracIn"] = time.perf_counter() - t
    return {"predictions": {k: v.tolist() for k, v in out.items()}, "seconds": seconds}


def estimates(task, target, sets, lam_op):
    """Every damped method's prediction of the target's change per group (removal sign: positive = f rises)."""
    out, seconds = {}, {}
    t = time.perf_counter()
    deltas = cj.influence(task, sets, damping=lam_op, solver=cj.CG(rtol=1e-10))  # (Q, p), delta_S
    grad_f = cj.target_gradient(target)
    f_ = np.asarray(deltas @ grad_f)
    out["F"] = f_
    seconds["F"] = time.perf_counter() - t
    for kind in ("ggn", "hessian"):
        t = time.perf_counter()
        hf = jax.vmap(cj.target_curvature(target, kind=kind).mv)(deltas)
        i_ = 0.5 * np.asarray(jnp.sum(deltas * hf, axis=1))
        out[f"F+I ({kind})"] = f_ + i_
        out[f"I ({kind})"] = i_
        seconds[f"F+I ({kind})"] = seconds["F"] + time.perf_counter() - t
    t = time.perf_counter()
    fb = cj.second_order_group_influence(task, target, sets, damping=lam_op, solver=cj.CG(rtol=1e-10))
    seconds["F+B"] = time.perf_counter() - t
    out["F+B"] = np.asarray(fb.total)
    for kind in ("ggn", "hessian"):
        out[f"F+I+B ({kind})"] = out[f"F+I ({kind})"] + np.asarray(fb.correction)
    for c in (10, 50):
        t = time.perf_counter()
        cache = cj.build_cache(task, correction=None, num_clusters=c, sketch_dim=32, damping=lam_op,
                               key=jax.random.key(c), solver=cj.CG(rtol=1e-10), normalize_sketches=True)
        ct = cj.cache_interaction_terms(cache, target, task=task)
        out[f"CiF F+I (C={c})"] = np.asarray(cj.group_influence(ct, sets)[2])
        seconds[f"CiF F+I (C={c})"] = time.perf_counter() - t
    return {k: v.tolist() for k, v in out.items()}, seconds


def summary(cells):
    rows = {}
    for key, v in cells.values.items():
        if not key.startswith("est/"):
            continue
        _, model, seed, lam = key.split("/")
        truth = np.asarray(cells.values[f"truth/{model}/{seed}"]["truth"])
        base = cells.values[f"base/{model}/{seed}"]
        free = cells.values.get(f"baselines/{model}/{seed}", {}).get("predictions", {})
        for name, pred in {**v["predictions"], **free}.items():
            if name.startswith("I ("):
                continue
            rows.setdefault(model, {}).setdefault(lam[3:], {}).setdefault(name, []).append(
                float(spearmanr(pred, truth).statistic))
        rows[model][lam[3:]].setdefault("_floor_over_truth", []).append(
            abs(base["f0_other_init"] - base["f0"]) / float(np.median(np.abs(truth))))
    return {model: {lam: {name: {"mean": float(np.mean(v)), "std": float(np.std(v)), "seeds": len(v)}
                          for name, v in by.items()} for lam, by in lams.items()} for model, lams in rows.items()}


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--groups", type=int, default=None, help="groups (quick 30, full 50)")
    p.add_argument("--group-size", type=int, default=20)
    p.add_argument("--dampings", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1],
                   help="lambda, added to the weight decay in the operator")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seeds", type=int, default=3, help="MLP base models (LR: one)")
    p.add_argument("--hidden", type=int, nargs="+", default=[32, 32], help="MLP widths")
    p.add_argument("--steps", type=int, default=3000, help="full-batch steps of every (re)training")
    p.add_argument("--learning-rate", type=float, default=0.1)
    args = ec.finish_args(p.parse_args(), quick_dataset="digits", full_dataset="mnist5k")
    groups = args.groups or (30 if args.quick else 50)
    cells = ec.Cells("interaction_protocol", args, {k: v for k, v in vars(args).items()
                                                    if k not in ("output", "models", "dampings", "seeds")})
    ds = cdata.load_dataset(args.dataset, seed=args.seed)
    x = jnp.asarray(ds.x_train.reshape(ds.x_train.shape[0], -1), jnp.float64)
    y = jnp.asarray(ds.y_train, jnp.int32)
    xt = jnp.asarray(ds.x_test.reshape(ds.x_test.shape[0], -1), jnp.float64)
    yt = jnp.asarray(ds.y_test, jnp.int32)
    data = (x, y, xt, yt)
    n = x.shape[0]
    for model in args.models:
        for seed in range(1 if model == "lr" else args.seeds):
            seed = args.seed + seed
            init, params, base = base_model(cells, model, seed, data, args)
            truth = truth_cell(cells, model, seed, init, params, data, args, groups)
            spread = float(np.median(np.abs(truth["truth"])))
            print(f"{model} seed {seed}: f0 {base['f0']:.4f} (grad {base['grad_norm']:.1e}), noise floor "
                  f"|f0' - f0| = {abs(base['f0_other_init'] - base['f0']):.2e} against median |truth| "
                  f"{spread:.2e}; retraining {truth['seconds']:.0f} s, max grad {truth['max_grad_norm']:.1e}",
                  flush=True)
            sets = [np.asarray(s) for s in truth["groups"]]
            task = cj.Task(network, loss, params, x, y)
            target = cj.Task(network, loss, params, xt, yt)
            marks = [args.steps * j // 4 for j in range(1, 5)]

            def run_baselines():  # TracIn's checkpoints along theta_0's (deterministic) trajectory
                ckpts = [first(train(init, np.ones((1, n), bool), data, args, t)) for t in marks[:-1]] + [params]
                return baselines(task, target, sets, args, ckpts, marks)

            free = cells(f"baselines/{model}/seed{seed}", run_baselines)
            for lam in args.dampings:
                def run(lam=lam):
                    preds, seconds = estimates(task, target, sets, args.weight_decay + lam)
                    return {"operator_damping": args.weight_decay + lam, "predictions": preds, "seconds": seconds}

                est = cells(f"est/{model}/seed{seed}/lam{lam:g}", run)
                est = {**est, "predictions": {**est["predictions"], **free["predictions"]}}
                t_ = np.asarray(truth["truth"])
                print(f"  lambda {lam:g}: " + ", ".join(
                    f"{m} {spearmanr(v, t_).statistic:.3f}" for m, v in est["predictions"].items()
                    if not m.startswith("I (")), flush=True)
    out = {"settings": {"dataset": args.dataset, "models": args.models, "mlp_hidden": args.hidden,
                        "weight_decay": args.weight_decay, "dampings": args.dampings, "groups": groups,
                        "group_size": args.group_size, "steps": args.steps, "learning_rate": args.learning_rate,
                        "dtype": "float64", "num_train": int(n), "seed": args.seed},
           "summary": summary(cells),
           "pearson": {k: {m: float(pearsonr(v, cells.values[f"truth/{k.split('/')[1]}/{k.split('/')[2]}"]["truth"])
                                    .statistic) for m, v in e["predictions"].items()}
                       for k, e in cells.values.items() if k.startswith(("est/", "baselines/"))},
           "cells": {k: v for k, v in cells.values.items() if not k.startswith("est/")}, "cell_runs": cells.runs}
    ec.write("interaction_protocol", args, out)


if __name__ == "__main__":
    main()
