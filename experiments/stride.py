"""STRIDE beside IF, CiF, TRAK, Grad-Dot and TracIn (issue #8: LDS, ablations, mislabels, leakage, counterfactual, cost).

STRIDE (seed 004) fits one low-rank logit-steering operator per training subset
on a frozen layer's activations and splits the subset responses into per-example
scores by Lasso (``cj.stride_fit``, ``cj.stride_scores``). Every method here
attributes the same base model theta_0, trained full-batch (``cj.train_many``,
weight decay = damping, so the damped GGN is the Gauss-Newton part of the
training objective's Hessian) in float64:

1. **LDS and ablations** (Tables 1, 6-7): the subset LDS of ``experiments/lds.py``
   (M random half subsets retrained, ``cj.lds``) for logistic regression and a
   two-hidden-layer MLP; STRIDE with K = 50 and 200 subsets of m = 100, and the
   ablations lambda_stab = lambda_lin = 0, the first hidden layer's features, a
   Lasso intercept, one partition (K = ceil(N / m): each example in exactly one
   subset, so examples sharing a block cannot be told apart), and a response read
   as the change of the class log-probability instead of the class logit.
2. **Mislabels** (Table 10): a random 10% of the training labels moved to another
   class, the model retrained; score_i = sum over the clean test points of
   attribution to their label; the |F| lowest flagged; precision = recall.
3. **Leakage** (Table 12): copies of 10 test points added to the training set,
   retrained; the rank of each copy among all training examples (0 = top).
4. **Counterfactual** (Table 8): for correctly classified test points, remove the
   k most helpful examples by each method (ClassRandom: k random examples of the
   point's class), retrain from the same initialisation, report the drop of the
   true-class probability.
5. **Cost** (Prop. 1, Table 5): setup and per-query seconds against the MLP width,
   as ratios to STRIDE (second, compiled call of each).

    python experiments/stride.py --quick    # digits, about 16 min on 2 cores (--parts lds mislabel ... for a subset)
    python experiments/stride.py            # mnist5k, the document's MLP 784-512-256-10

Published (STRIDE, MNIST): its own LDS (app. C.1, not this subset LDS) 0.116 vs
TracIn 0.103, EK-FAC 0.105; ablation lambda_stab = lambda_lin = 0: 0.149, first
layer: -0.012; mislabel precision 0.921 (EK-FAC 0.853, TracIn 0.785); leakage
rank 0 for all methods; counterfactual drop at k = 1000: 0.811 (EK-FAC 0.737,
TracIn 0.728, ClassRandom 0.538).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import _common as ec  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from lds import init_params, loss, timed  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import cif_jax as cj  # noqa: E402
from cif_jax.workloads import data as cdata  # noqa: E402

PUBLISHED = {
    "lds (document's metric, MNIST)": {"STRIDE": 0.116, "TracIn": 0.103, "EK-FAC": 0.105},
    "ablation lds": {"lambda_stab = lambda_lin = 0": 0.149, "first layer": -0.012},
    "mislabel precision": {"STRIDE": 0.921, "EK-FAC": 0.853, "TracIn": 0.785},
    "leakage mean rank": {"STRIDE": 0.0, "EK-FAC": 0.0, "TracIn": 0.0},
    "counterfactual drop, k = 1000": {"STRIDE": 0.811, "EK-FAC": 0.737, "TracIn": 0.728, "ClassRandom": 0.538},
}


# -- models -------------------------------------------------------------------------


def network(params, x):
    """A ReLU MLP over ``params = {w1, b1, ..., wL, bL}`` (L = 1: logistic regression)."""
    depth = len(params) // 2
    return hidden(params, x, depth - 1) @ params[f"w{depth}"] + params[f"b{depth}"][None, :]


def hidden(params, x, layer):
    """The post-ReLU output of hidden layer ``layer`` (1-based; 0: the inputs)."""
    for j in range(1, layer + 1):
        x = jax.nn.relu(x @ params[f"w{j}"] + params[f"b{j}"][None, :])
    return x


def train(x, y, sizes, settings, *, seed, keep=None, lam, checkpoints=False):
    """theta_0 (and, with ``checkpoints``, the 4 TracIn checkpoints of the full-batch trajectory)."""
    zero = len(sizes) == 2
    start = cj.Task(network, loss, init_params(jax.random.key(seed), sizes, zero=zero), x, y)
    keep = np.ones((1, x.shape[0]), bool) if keep is None else keep
    kw = dict(learning_rate=settings["learning_rate"], weight_decay=lam)
    marks = [settings["steps"] * j // 4 for j in range(1, 5)] if checkpoints else [settings["steps"]]
    ckpts = [jax.tree_util.tree_map(lambda a: a[0], cj.train_many(start, keep, num_steps=t, **kw).params)
             for t in marks]
    lrs = [settings["learning_rate"] * (b - a) for a, b in zip([0] + marks[:-1], marks)]
    return start, ckpts, lrs


# -- attribution methods ------------------------------------------------------------


def stride_ops(task, x, settings, *, layer, num_subsets, seed=11, **fit):
    feats = lambda prm, xx: hidden(prm, xx, layer)
    H, Z = cj.stride_features(task, x, feature_fn=feats)
    subs = cj.stride_subsets(jax.random.key(seed), x.shape[0], num_subsets=num_subsets,
                             subset_size=settings["stride_subset_size"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identical columns / uncovered examples: recorded below
        ops = cj.stride_fit(H, Z, task.targets, subs, key=jax.random.key(seed + 1),
                            num_steps=settings["stride_steps"], **fit)
    return ops, feats


def stride_method(ops, feats, task, xt, yt, *, response="logit", **lasso):
    """(Q, N) STRIDE scores for classes yt.

    ``response="logit"``: the class logit shift (Alg. 1 l. 9); ``"logprob"``: the
    shift of the class log-probability, ``log softmax(z + Delta_k)[y] - log softmax(z)[y]``,
    which ignores a shift common to all logits.
    """
    Ht, Zt = cj.stride_features(task, xt, feature_fn=feats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if response == "logit":
            return np.asarray(cj.stride_scores(ops, Ht, classes=yt, **lasso).coef)
        q, num_classes = Zt.shape
        delta = jnp.stack([cj.stride_responses(ops, Ht, classes=np.full(q, c)) for c in range(num_classes)], -1)
        lp = jax.nn.log_softmax(Zt[:, None, :] + delta, -1) - jax.nn.log_softmax(Zt, -1)[:, None, :]
        Y = jnp.take_along_axis(lp, jnp.asarray(yt)[:, None, None], axis=2)[..., 0]
        return np.asarray(cj.lasso(ops.membership, Y, **lasso).coef)


def test_grads(task, xt, yt, summed):
    g = cj.per_example_grads(cj.Task(task.apply_fn, task.loss_fn, task.params, xt, yt))
    return g.sum(axis=0, keepdims=True) if summed else g


def if_scores(task, xt, yt, lam, args, summed=False):
    g_train = cj.per_example_grads(task)
    g_test = test_grads(task, xt, yt, summed)
    sol = cj.solve_ggn(task, g_test, damping=lam, solver=cj.CG(rtol=1e-8, max_steps=args.max_steps)).solutions
    out = np.asarray(sol @ g_train.T) / task.num_examples
    return out[0] if summed else out


def cif_scores(task, xt, yt, lam, args, clusters, summed=False):
    cache = cj.build_cache(task, correction=None, num_clusters=clusters, sketch_dim=32, damping=lam, solver=cj.CG(rtol=1e-8, max_steps=args.max_steps), key=jax.random.key(clusters), normalize_sketches=True)
    g_test = test_grads(task, xt, yt, summed)
    out = np.asarray(cj.cluster_alphas(cache, g_test).clusters)[:, np.asarray(cache.assignments)] / task.num_examples
    return out[0] if summed else out


def baseline_scores(task, xt, yt, lam, args, *, ckpts, lrs, settings, which, summed=False):
    """The (Q, N) score matrices of the named baselines (library sign: positive = helpful).

    ``summed``: the (N,) sums over the Q test points instead; IF and CiF then use
    one solve (alphas) of the summed test gradient, by linearity.
    """
    out, secs = {}, {}
    for name in which:
        if name == "IF":
            fn = lambda: if_scores(task, xt, yt, lam, args, summed=summed)
        elif name.startswith("CiF"):
            c = int(name.split("=")[1])
            fn = lambda c=c: cif_scores(task, xt, yt, lam, args, c, summed=summed)
        elif name == "TRAK":
            fn = lambda: cj.trak(task, xt, yt, sketch_dim=settings["trak_dim"], key=jax.random.key(7),
                                 ridge=1e-6)
        elif name == "Grad-Dot":
            fn = lambda: cj.grad_dot(task, xt, yt)
        elif name == "TracIn":
            fn = lambda: cj.tracin(task, xt, yt, checkpoints=ckpts, learning_rates=lrs)
        else:
            raise ValueError(name)
        s, secs[name] = timed(fn)
        s = np.asarray(s)
        out[name] = s.sum(axis=0) if summed and s.ndim == 2 else s
    return out, secs


# -- 1. LDS and ablations -----------------------------------------------------------


def lds_part(name, x, y, xt, yt, args, settings):
    n, d = x.shape
    k = int(np.max(np.asarray(y))) + 1
    lam = args.damping
    sizes = [d, k] if name == "lr" else [d, *settings["hidden"], k]
    start, ckpts, lrs = train(x, y, sizes, settings, seed=args.seed, lam=lam, checkpoints=True)
    task = cj.Task(network, loss, ckpts[-1], x, y)
    seeds = 1 if name == "lr" else settings["seeds"]
    inits = None if name == "lr" else jax.vmap(lambda kk: init_params(kk, sizes))(
        jax.random.split(jax.random.key(args.seed + 1), seeds))
    keep = cj.random_subsets(jax.random.key(3), settings["subsets"], n)
    losses, t_retrain = timed(lambda: cj.subset_losses(
        start, keep, xt, yt, init_params=inits, stacked_init=inits is not None, model_batch_size=64,
        num_steps=settings["steps"], learning_rate=settings["learning_rate"], weight_decay=lam))
    print(f"[lds {name}] p = {task.num_params}, retrained {settings['subsets']} x {seeds} in {t_retrain:.0f} s",
          flush=True)
    scores, seconds = baseline_scores(task, xt, yt, lam, args, ckpts=ckpts, lrs=lrs, settings=settings,
                                      which=["IF", "TRAK", "TracIn"])
    top = 0 if name == "lr" else len(settings["hidden"])
    m = settings["stride_subset_size"]
    fits = {"K=50": dict(layer=top, num_subsets=50), "K=200": dict(layer=top, num_subsets=200),
            "lambda_stab=lambda_lin=0": dict(layer=top, num_subsets=50, lambda_stab=0.0, lambda_lin=0.0),
            f"one partition (K={math.ceil(n / m)})": dict(layer=top, num_subsets=math.ceil(n / m))}
    if name != "lr":
        fits["first hidden layer"] = dict(layer=1, num_subsets=50)
    diagnostics = {}
    for label, fit in fits.items():
        (ops, feats), t_fit = timed(lambda fit=fit: stride_ops(task, x, settings, **fit))
        variants = {label: {}}
        if label == "K=50":
            variants["K=50, fit_intercept"] = {"fit_intercept": True}
            variants["K=50, log-prob response"] = {"response": "logprob"}
        for vlabel, kw in variants.items():
            s, t_q = timed(lambda kw=kw: stride_method(ops, feats, task, xt, yt, **kw))
            scores[f"STRIDE {vlabel}"], seconds[f"STRIDE {vlabel}"] = s, t_fit + t_q
        if label in ("K=50", "K=200"):
            diagnostics[label] = diagnose(ops, feats, task, xt, yt, scores["IF"], keep, np.asarray(losses))
    rows = {}
    for method, s in scores.items():
        res = cj.lds(s, keep, np.asarray(losses))
        per = np.asarray(res.per_example)
        rows[method] = {"lds_spearman": float(res.score), "lds_std": float(np.nanstd(per)),
                        "seconds": seconds[method]}
        print(f"[lds {name}] {method:36s} LDS {res.score:6.3f} +- {np.nanstd(per):.3f} ({seconds[method]:.1f} s)",
              flush=True)
    for label, dg in diagnostics.items():
        print(f"[lds {name}] STRIDE {label} diagnostics: " + ", ".join(f"{k} {v:.3f}" for k, v in dg.items()),
              flush=True)
    return {"model": name, "sizes": sizes, "num_params": int(task.num_params), "seeds": seeds,
            "retrain_seconds": t_retrain, "methods": rows, "stride_diagnostics": diagnostics}


def diagnose(ops, feats, task, xt, yt, if_scores_, keep, losses):
    """Where STRIDE's LDS is lost: in the operators' subset responses, or in the Lasso readout?

    * ``response_vs_IF_subset_sum``: Spearman, across the K training subsets, of the
      steering response y_k(q) with IF's prediction for the same subset,
      sum_{i in S_k} IF(q, i), averaged over test points q;
    * ``lds_min_norm_readout``: the LDS of the minimum-norm least-squares split of the
      same responses (dense, no sparsity), instead of the Lasso;
    * ``lds_IF_through_subsets``: the LDS of IF's own subset sums passed through the
      same Lasso: what the readout can keep of a perfect subset signal.
    """
    Ht, _ = cj.stride_features(task, xt, feature_fn=feats)
    Y = np.asarray(cj.stride_responses(ops, Ht, classes=yt))  # (Q, K)
    X = np.asarray(ops.membership)  # (K, N)
    R = if_scores_ @ X.T  # (Q, K) IF subset sums
    rho = np.nanmean([spearmanr(Y[q], R[q]).statistic for q in range(Y.shape[0])])
    w_min = np.linalg.lstsq(X, Y.T, rcond=None)[0].T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w_if = np.asarray(cj.lasso(ops.membership, jnp.asarray(R)).coef)
    return {"response_vs_IF_subset_sum": float(rho),
            "lds_min_norm_readout": float(cj.lds(w_min, keep, losses).score),
            "lds_IF_through_subsets": float(cj.lds(w_if, keep, losses).score)}


# -- 2-4. mislabels, leakage, counterfactual ------------------------------------------------


def mislabel_part(x, y, xt, yt, args, settings):
    n, d = x.shape
    k = int(np.max(np.asarray(y))) + 1
    rng = np.random.default_rng(args.seed + 5)
    flipped = rng.choice(n, size=n // 10, replace=False)
    y_noisy = np.asarray(y).copy()
    y_noisy[flipped] = (y_noisy[flipped] + rng.integers(1, k, size=flipped.size)) % k
    y_noisy = jnp.asarray(y_noisy, jnp.int32)
    sizes = [d, *settings["hidden"], k]
    _, ckpts, lrs = train(x, y_noisy, sizes, settings, seed=args.seed, lam=args.damping, checkpoints=True)
    task = cj.Task(network, loss, ckpts[-1], x, y_noisy)
    acc = float(jnp.mean(jnp.argmax(network(task.params, xt), 1) == yt))
    scores, seconds = baseline_scores(task, xt, yt, args.damping, args, ckpts=ckpts, lrs=lrs, settings=settings,
                                      which=["IF", "CiF C=10", "CiF C=50", "TRAK", "Grad-Dot", "TracIn"], summed=True)
    (ops, feats), t_fit = timed(lambda: stride_ops(task, x, settings, layer=len(settings["hidden"]),
                                                   num_subsets=settings["stride_big_k"]))
    scores["STRIDE"], t_q = timed(lambda: stride_method(ops, feats, task, xt, yt).sum(axis=0))
    seconds["STRIDE"] = t_fit + t_q
    # Self-influence (issue #17): the score of S = V = {i}, no test points; flag the largest.
    # IF: N exact solves; CiF: one cache, the corrected estimate g_i . v_c(i) / N + t_i and the
    # paper's g_i . v_c(i) / N alone.
    def if_self():
        g = cj.per_example_grads(task)
        sol = cj.solve_ggn(task, g, damping=args.damping, solver=cj.CG(rtol=1e-8, max_steps=args.max_steps, rhs_batch_size=256)).solutions
        return jnp.sum(g * sol, axis=1) / n

    scores["IF self"], seconds["IF self"] = timed(if_self)
    for c in (10, 50):
        cache, t_build = timed(lambda c=c: cj.build_cache(task, num_clusters=c, sketch_dim=32, damping=args.damping,
                                                          solver=cj.CG(rtol=1e-8, max_steps=args.max_steps), key=jax.random.key(c),
                                                          normalize_sketches=True))
        scores[f"CiF self C={c}"], t_q = timed(lambda cache=cache: cj.self_influence(cache, task))
        seconds[f"CiF self C={c}"] = t_build + t_q
        scores[f"CiF self C={c} paper"], t_q = timed(lambda cache=cache: cj.self_influence(cache, task,
                                                                                           estimator="paper"))
        seconds[f"CiF self C={c} paper"] = t_build + t_q
    truth = np.zeros(n, bool)
    truth[flipped] = True
    rows = {}
    for method, s in scores.items():
        s = np.asarray(s)
        # Test-influence methods flag the most harmful examples (lowest scores); self-influence the largest.
        flagged = np.argsort(-s if " self" in method else s, kind="stable")[:flipped.size]
        rows[method] = {"precision": float(truth[flagged].mean()), "seconds": seconds[method]}
        print(f"[mislabel] {method:10s} precision {rows[method]['precision']:.3f} ({seconds[method]:.1f} s)",
              flush=True)
    return {"num_flipped": int(flipped.size), "test_accuracy_noisy_model": acc,
            "stride_subsets": settings["stride_big_k"], "methods": rows}


def leakage_part(x, y, xt, yt, args, settings):
    n, d = x.shape
    k = int(np.max(np.asarray(y))) + 1
    leak = np.arange(10)
    x2 = jnp.concatenate([x, xt[leak]])
    y2 = jnp.concatenate([y, yt[leak]])
    sizes = [d, *settings["hidden"], k]
    _, ckpts, lrs = train(x2, y2, sizes, settings, seed=args.seed, lam=args.damping, checkpoints=True)
    task = cj.Task(network, loss, ckpts[-1], x2, y2)
    scores, seconds = baseline_scores(task, xt[leak], yt[leak], args.damping, args, ckpts=ckpts, lrs=lrs,
                                      settings=settings, which=["IF", "TRAK", "Grad-Dot", "TracIn"])
    (ops, feats), t_fit = timed(lambda: stride_ops(task, x2, settings, layer=len(settings["hidden"]),
                                                   num_subsets=settings["stride_big_k"]))
    scores["STRIDE"], t_q = timed(lambda: stride_method(ops, feats, task, xt[leak], yt[leak]))
    seconds["STRIDE"] = t_fit + t_q
    rows = {}
    for method, s in scores.items():
        s = np.asarray(s)
        # rank of the copy (index n + j) among all training examples, 0 = the top score; ties count against it
        ranks = np.array([int(np.sum(s[j] >= s[j, n + j])) - 1 for j in leak])
        rows[method] = {"mean_rank": float(ranks.mean()), "top1": float(np.mean(ranks == 0)),
                        "ranks": ranks.tolist(), "seconds": seconds[method]}
        print(f"[leakage] {method:10s} mean rank {ranks.mean():7.1f} top-1 {np.mean(ranks == 0):.2f}", flush=True)
    return {"num_leaked": int(leak.size), "stride_subsets": settings["stride_big_k"], "methods": rows}


def counterfactual_part(x, y, xt, yt, args, settings):
    n, d = x.shape
    k = int(np.max(np.asarray(y))) + 1
    sizes = [d, *settings["hidden"], k]
    start, ckpts, lrs = train(x, y, sizes, settings, seed=args.seed, lam=args.damping, checkpoints=True)
    task = cj.Task(network, loss, ckpts[-1], x, y)
    probs = jax.nn.softmax(network(task.params, xt), -1)
    correct = np.flatnonzero(np.asarray(jnp.argmax(probs, 1) == yt))
    points = correct[:settings["counterfactual_points"]]
    scores, _ = baseline_scores(task, xt[points], yt[points], args.damping, args, ckpts=ckpts, lrs=lrs,
                                settings=settings, which=["IF", "TRAK", "TracIn"])
    ops, feats = stride_ops(task, x, settings, layer=len(settings["hidden"]), num_subsets=settings["stride_big_k"])
    scores["STRIDE"] = stride_method(ops, feats, task, xt[points], yt[points])
    rng = np.random.default_rng(args.seed + 9)
    labels = np.asarray(y)
    masks, index = [], []
    for j, q in enumerate(points):
        for kk in settings["counterfactual_k"]:
            for method in [*scores, "ClassRandom"]:
                if method == "ClassRandom":
                    same = np.flatnonzero(labels == int(yt[q]))
                    drop = rng.choice(same, size=min(kk, same.size), replace=False)
                else:
                    drop = np.argsort(-scores[method][j], kind="stable")[:kk]
                keep = np.ones(n, bool)
                keep[drop] = False
                masks.append(keep)
                index.append((method, kk, j))
    models, t_re = timed(lambda: cj.train_many(start, np.stack(masks), num_steps=settings["steps"],
                                               learning_rate=settings["learning_rate"], weight_decay=args.damping,
                                               model_batch_size=32))
    after = jax.vmap(lambda prm: jax.nn.softmax(network(prm, xt[points]), -1))(models.params)
    rows: dict = {}
    for m_i, (method, kk, j) in enumerate(index):
        q = points[j]
        drop = float(probs[q, yt[q]] - after[m_i, j, yt[q]])
        rows.setdefault(method, {}).setdefault(f"k={kk}", []).append(drop)
    table = {m: {kk: float(np.mean(v)) for kk, v in r.items()} for m, r in rows.items()}
    for m, r in table.items():
        print(f"[counterfactual] {m:12s} " + "  ".join(f"{kk}: {v:.3f}" for kk, v in r.items()), flush=True)
    return {"test_points": points.tolist(), "k": settings["counterfactual_k"], "retrain_seconds": t_re,
            "mean_probability_drop": table, "per_point": rows}


# -- 5. cost ----------------------------------------------------------------------------------


def cost_part(x, y, xt, yt, args, settings):
    n, d = x.shape
    k = int(np.max(np.asarray(y))) + 1
    q = xt.shape[0]
    short = {**settings, "steps": 300}
    rows = []
    for width in settings["cost_widths"]:
        sizes = [d, width, k]
        _, ckpts, _ = train(x, y, sizes, short, seed=args.seed, lam=args.damping)
        task = cj.Task(network, loss, ckpts[-1], x, y)
        feats = lambda prm, xx: hidden(prm, xx, 1)
        test = cj.Task(network, loss, task.params, xt, yt)
        lam = args.damping

        def stride_setup():
            H, Z = cj.stride_features(task, x, feature_fn=feats)
            subs = cj.stride_subsets(jax.random.key(11), n, num_subsets=50, subset_size=settings["stride_subset_size"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # K = 50 <= sketch_dim: as the document's default
                return cj.stride_fit(H, Z, y, subs, key=jax.random.key(12), num_steps=settings["stride_steps"])

        def stride_query(ops):
            Ht, _ = cj.stride_features(task, xt, feature_fn=feats)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cj.stride_scores(ops, Ht, classes=yt).coef

        def cif_setup():
            return cj.build_cache(task, correction=None, num_clusters=50, sketch_dim=32, damping=lam, solver=cj.CG(rtol=1e-6, max_steps=args.max_steps), key=jax.random.key(0))

        def warm(fn):  # the second call: compiled
            fn()
            return timed(fn)

        timing = {}
        ops, timing["STRIDE setup"] = warm(stride_setup)
        _, timing["STRIDE query"] = warm(lambda: stride_query(ops))
        g_train, timing["IF setup"] = warm(lambda: cj.per_example_grads(task))
        _, timing["IF query"] = warm(lambda: cj.solve_ggn(task, cj.per_example_grads(test), damping=lam, solver=cj.CG(rtol=1e-6, max_steps=args.max_steps)).solutions @ g_train.T)
        cache, timing["CiF setup"] = warm(cif_setup)
        _, timing["CiF query"] = warm(lambda: cj.cluster_alphas(cache, cj.per_example_grads(test)))
        _, timing["TRAK setup+query"] = warm(lambda: cj.trak(task, xt, yt, sketch_dim=settings["trak_dim"],
                                                             key=jax.random.key(7), ridge=1e-6))
        per_query = {m: t / q for m, t in timing.items() if "query" in m}
        row = {"width": width, "num_params": int(task.num_params), "seconds": timing,
               "seconds_per_query": per_query,
               "ratio_to_stride": {"setup": {m: timing[f"{m} setup"] / timing["STRIDE setup"]
                                             for m in ["IF", "CiF"]},
                                   "query": {m: timing[f"{m} query"] / timing["STRIDE query"]
                                             for m in ["IF", "CiF"]},
                                   "TRAK total": timing["TRAK setup+query"] / (timing["STRIDE setup"]
                                                                               + timing["STRIDE query"])}}
        rows.append(row)
        print(f"[cost] width {width} p {task.num_params}: " + ", ".join(f"{m} {t:.2f}s" for m, t in timing.items()),
              flush=True)
    return {"queries": int(q), "rows": rows}


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["lds", "mislabel", "leakage", "counterfactual", "cost"])
    args = ec.finish_args(p.parse_args(), quick_dataset="digits", full_dataset="mnist5k")
    q = args.quick
    settings = {"hidden": [64, 32] if q else [512, 256], "subsets": 32 if q else 100, "seeds": 2 if q else 3,
                "test_points": 50 if q else 200, "steps": 1000, "learning_rate": 0.1, "trak_dim": 256 if q else 1024,
                "stride_subset_size": 100, "stride_steps": 250, "stride_big_k": 200 if q else 1000,
                "counterfactual_points": 3 if q else 10, "counterfactual_k": [50, 100] if q else [50, 100, 500, 1000],
                "cost_widths": [32, 128, 512] if q else [256, 512, 1024, 2048]}
    ds = cdata.load_dataset(args.dataset, seed=args.seed)
    x = jnp.asarray(ds.x_train.reshape(ds.x_train.shape[0], -1), jnp.float64)
    y = jnp.asarray(ds.y_train, jnp.int32)
    xt_all = jnp.asarray(ds.x_test.reshape(ds.x_test.shape[0], -1), jnp.float64)
    yt_all = jnp.asarray(ds.y_test, jnp.int32)
    pick = np.random.default_rng(args.seed).permutation(xt_all.shape[0])
    xt, yt = xt_all[pick[:settings["test_points"]]], yt_all[pick[:settings["test_points"]]]
    held = pick[:500]  # the mislabel experiment's clean held-out points (all of digits' 359)
    out = {"settings": {"dataset": args.dataset, "num_train": int(x.shape[0]), "dtype": "float64",
                        "damping": args.damping, **settings},
           "published": PUBLISHED, "results": {}}
    t0 = time.perf_counter()
    if "lds" in args.parts:
        out["results"]["lds"] = [lds_part(m, x, y, xt, yt, args, settings) for m in ["lr", "mlp"]]
    if "mislabel" in args.parts:
        out["results"]["mislabel"] = mislabel_part(x, y, xt_all[held], yt_all[held], args, settings)
    if "leakage" in args.parts:
        out["results"]["leakage"] = leakage_part(x, y, xt, yt, args, settings)
    if "counterfactual" in args.parts:
        out["results"]["counterfactual"] = counterfactual_part(x, y, xt, yt, args, settings)
    if "cost" in args.parts:
        out["results"]["cost"] = cost_part(x, y, xt, yt, args, settings)
    out["total_seconds"] = time.perf_counter() - t0
    previous = os.path.join(args.output, f"{ec.stem('stride', args)}.json")
    if os.path.exists(previous):  # keep the parts not rerun
        with open(previous) as f:
            old = json.load(f)
        if old.get("settings") == out["settings"]:
            out["results"] = {**old["results"], **out["results"]}
            out["total_seconds"] += old.get("total_seconds", 0.0)
    ec.write("stride", args, out)
    plot(out, args)


def plot(out, args):
    plt = ec.pyplot()
    res = out["results"]
    panels = [p for p in ["lds", "mislabel", "counterfactual", "cost"] if p in res]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, part in zip(axes[0], panels):
        if part == "lds":
            for j, r in enumerate(res["lds"]):
                names = list(r["methods"])
                ax.barh(np.arange(len(names)) + 0.4 * j, [r["methods"][m]["lds_spearman"] for m in names], 0.4,
                        label=r["model"])
            ax.set_yticks(np.arange(len(names)) + 0.2, names, fontsize=7)
            ax.set(xlabel="subset LDS (Spearman)", title="LDS and ablations")
            ax.legend()
        elif part == "mislabel":
            names = list(res["mislabel"]["methods"])
            ax.bar(names, [res["mislabel"]["methods"][m]["precision"] for m in names])
            ax.tick_params(axis="x", rotation=45)
            ax.set(ylabel="precision at |F|", title="mislabel detection (10%)")
        elif part == "counterfactual":
            for m, r in res["counterfactual"]["mean_probability_drop"].items():
                ax.plot([int(k[2:]) for k in r], list(r.values()), "o-", label=m)
            ax.set(xlabel="k removed", ylabel="true-class probability drop", title="counterfactual")
            ax.legend()
        else:
            rows = res["cost"]["rows"]
            w = [r["width"] for r in rows]
            for m in ["STRIDE", "IF", "CiF"]:
                ax.loglog(w, [r["seconds"][f"{m} setup"] + r["seconds"][f"{m} query"] for r in rows], "o-", label=m)
            ax.loglog(w, [r["seconds"]["TRAK setup+query"] for r in rows], "o-", label="TRAK")
            ax.set(xlabel="MLP width", ylabel="setup + all queries (s)", title="cost against width")
            ax.legend()
    fig.tight_layout()
    fig.savefig(ec.figure_path("stride", args))


if __name__ == "__main__":
    main()
