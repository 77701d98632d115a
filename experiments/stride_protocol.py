"""STRIDE under its own protocol (issue #19, item 8): the document's LDS (app. C.1) and mislabel test (C.2).

``experiments/stride.py`` compares STRIDE with the parameter-space methods on the
*subset* LDS of TRAK (``cj.lds``) with full-batch float64 training. This script
instead follows the STRIDE document (seed 004) wherever it is specific:

* **Base model** (its Tables 2-3): the MLP 784-512-256-10, Adam, learning rate
  1e-3, batch 64 (the short last batch kept: PyTorch's ``drop_last=False``),
  20 epochs, no weight decay, PyTorch's ``nn.Linear`` initialisation, float32.
  On MNIST-5k (N = 4,000), not the document's full MNIST (N = 60,000): its K = 50
  subsets of 100 could not even cover 60,000 examples.
* **STRIDE** (its Table 4, MNIST column, and app. B.2): penultimate features (256),
  rank 32, learning rate 5e-3, 250 iterations, lambda_lin = 10, lambda_stab = 1,
  K = 50 subsets of |S_k| = 100 (``cj.stride_fit`` defaults); the response is the
  shift of the predicted class's logit (its Alg. 1) and the Lasso splits it.
* **LDS** (its app. C.1): for a test point z, the Spearman correlation across the
  N training examples of the scores with the per-example "linearised influence".
  The document does not say how that reference is obtained; we estimate it by a
  linear datamodel (``cj.datamodel_lds``: the difference of the mean test loss of
  the models trained without and with each example) from M models retrained,
  with the base recipe, on random halves of the training set (every retraining
  starts from the base model's initialisation; only the data order differs). The
  split-half reliability of that reference gives about the expected score of a
  perfect method (``ceiling``); it is reported.
* **Mislabels** (its app. C.2 and Table 10): a random 10% of the training labels
  moved to another class, the base model retrained on them; precision = recall
  at the |F| flagged. The document does not say over which test points the scores
  are taken: here they are summed over 500 clean test points. Its C.2 writes
  ``top_M(w)`` and its D.4 "high *negative* influence"; we follow D.4 (the most
  negative flagged; self-influence scores, where large is suspicious, flag the largest).
* **Baselines** as in its tables: TracIn at the final checkpoint only (the
  document: "effectively reducing it to a gradient similarity metric"), and its
  "EKFAC" both as its E.2 describes it (a diagonal Fisher from 1,000 training
  examples, ``v = g / (F_diag + eps)``, eps = damping: "diag-Fisher (E.2)") and
  as the name says (``cj.ekfac_preconditioner`` / ``cj.ekfac_solve``, damping
  1e-3: "EK-FAC"); beside them
  the exact damped-GGN IF and CiF (C = 50; the paper's and the corrected estimator
  agree for test points outside the training set, and differ for the
  self-influence flags of the mislabel test, where both are given).

STRIDE's Lasso has no stated penalty; ``cj.lasso``'s default (alpha = 1e-2 of
the smallest alpha that zeroes every coefficient, per test point, no intercept)
is used. STRIDE's diagnosis, if it stays near chance: its subset responses
against the true subset effects (the datamodel summed over each subset), the
Lasso readout of those true subset effects (what any method that sees the
training set through K = 50 subset responses can keep), and the number of
distinct membership columns (examples in the same subsets cannot be told apart).

    python experiments/stride_protocol.py --quick   # digits, small MLP, few retrainings
    python experiments/stride_protocol.py           # mnist5k (resumable: results/stride_protocol-mnist5k.cells.json)

Published (STRIDE, MNIST): LDS Spearman STRIDE 0.116, TracIn 0.103, EK-FAC 0.105;
"No LDS loss" ablation 0.149; first layer -0.012; mislabel precision STRIDE
0.921, EK-FAC 0.853, TracIn 0.785.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import warnings

import _common as ec
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.stats import spearmanr

import cif_jax as cj
from cif_jax.core.checkpoint import atomic_write
from cif_jax.workloads import data as cdata

PUBLISHED = {
    "lds spearman": {"STRIDE": 0.116, "TracIn": 0.103, "EK-FAC": 0.105},
    "ablation lds spearman": {"STRIDE no LDS loss": 0.149, "STRIDE first layer": -0.012},
    "mislabel precision": {"STRIDE": 0.921, "EK-FAC": 0.853, "TracIn": 0.785},
}


# -- the document's base model and its training recipe -------------------------------------


def init_mlp(key, sizes):
    """PyTorch ``nn.Linear`` initialisation: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    params = {}
    for j, (a, b) in enumerate(itertools.pairwise(sizes), start=1):
        key, kw, kb = jax.random.split(key, 3)
        bound = 1.0 / np.sqrt(a)
        params[f"w{j}"] = jax.random.uniform(kw, (a, b), jnp.float32, -bound, bound)
        params[f"b{j}"] = jax.random.uniform(kb, (b,), jnp.float32, -bound, bound)
    return params


def hidden(params, x, layer):
    """The post-ReLU output of hidden layer ``layer`` (1-based)."""
    for j in range(1, layer + 1):
        x = jax.nn.relu(x @ params[f"w{j}"] + params[f"b{j}"])
    return x


def network(params, x):
    depth = len(params) // 2
    return hidden(params, x, depth - 1) @ params[f"w{depth}"] + params[f"b{depth}"]


def tail(params, h, layer):
    """The network after hidden layer ``layer``: ``network(x) = tail(hidden(x, layer), layer)`` (STRIDE E.1's f)."""
    depth = len(params) // 2
    for j in range(layer + 1, depth):
        h = jax.nn.relu(h @ params[f"w{j}"] + params[f"b{j}"])
    return h @ params[f"w{depth}"] + params[f"b{depth}"]


def loss(outputs, targets):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)


def train_adam(init, x, y, rows, *, key, settings):
    """Models trained at once (vmapped), model m on examples ``rows[m]`` (equal sizes).

    Adam, ``epochs`` passes in a fresh random order each; every batch's loss is the
    mean over its own examples, the short last batch included as a step of its own
    (PyTorch's ``DataLoader`` with ``drop_last=False``).
    """
    batch, epochs = settings["batch_size"], settings["epochs"]
    num_models, size = rows.shape
    steps = -(-size // batch)
    pad = steps * batch - size
    tx = optax.adam(settings["learning_rate"])

    def one(rows_m, key_m):
        def epoch(carry, k):
            order = jnp.concatenate([jax.random.permutation(k, rows_m), jnp.zeros(pad, rows_m.dtype)])
            weight = jnp.concatenate([jnp.ones(size, jnp.float32), jnp.zeros(pad, jnp.float32)])

            def step(carry, b):
                params, state = carry
                idx = jax.lax.dynamic_slice(order, (b * batch,), (batch,))
                w = jax.lax.dynamic_slice(weight, (b * batch,), (batch,))
                grads = jax.grad(lambda p: jnp.sum(w * loss(network(p, x[idx]), y[idx])) / jnp.sum(w))(params)
                updates, state = tx.update(grads, state, params)
                return (optax.apply_updates(params, updates), state), None

            return jax.lax.scan(step, carry, jnp.arange(steps))[0], None

        final, _ = jax.lax.scan(epoch, (init, tx.init(init)), jax.random.split(key_m, epochs))
        return final[0]

    return jax.jit(jax.vmap(one))(jnp.asarray(rows), jax.random.split(key, num_models))


def test_losses(params, xt, yt):
    return jax.vmap(lambda p: loss(network(p, xt), yt))(params)


# -- attribution methods (all (Q, N), library sign: positive = helpful) ---------------------


def train_grad_products(task, vectors, chunk):
    """``vectors @ g_i`` for every training example, streamed in chunks of ``chunk`` examples."""
    out = []
    for a in range(0, task.num_examples, chunk):
        part = cj.Task(task.apply_fn, task.loss_fn, task.params, task.inputs[a:a + chunk], task.targets[a:a + chunk])
        out.append(np.asarray(vectors @ cj.per_example_grads(part).T))
    return np.concatenate(out, axis=1)


def eval_grads(task, xt, yt):
    return cj.per_example_grads(cj.Task(task.apply_fn, task.loss_fn, task.params, xt, yt))


def stride_fit(task, settings, *, layer, num_subsets, seed=11, **fit):
    feats = lambda prm, xx: hidden(prm, xx, layer)
    if fit.get("steer") == "activation":  # E.1: the features are steered and read through the rest of the network
        fit["head"] = jax.tree_util.Partial(lambda prm, h: tail(prm, h, layer), task.params)
    H, Z = cj.stride_features(task, task.inputs, feature_fn=feats)
    subs = cj.stride_subsets(jax.random.key(seed), task.num_examples, num_subsets=num_subsets,
                             subset_size=settings["stride_subset_size"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops = cj.stride_fit(H, Z, task.targets, subs, key=jax.random.key(seed + 1), **fit)
    for message in sorted({str(w.message) for w in caught}):  # recorded in the log, not hidden
        print(f"  stride_fit warning: {message}", flush=True)
    return ops, feats


def stride_scores(ops, feats, task, xt, *, response="logit"):
    """STRIDE's per-example scores: the Lasso split of the predicted class's steering responses.

    The document's sign: a positive response raises the predicted class's logit, i.e.
    the subset helps the prediction, as the library's positive = helpful.
    ``response="logprob"`` reads the shift of the class log-probability instead.
    """
    Ht, Zt = cj.stride_features(task, xt, feature_fn=feats)
    classes = jnp.argmax(Zt, axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if response == "logit":
            return np.asarray(cj.stride_scores(ops, Ht, classes=classes).coef)
        delta = jnp.stack([cj.stride_responses(ops, Ht, classes=jnp.full_like(classes, c))
                           for c in range(Zt.shape[1])], -1)
        lp = jax.nn.log_softmax(Zt[:, None, :] + delta, -1) - jax.nn.log_softmax(Zt, -1)[:, None, :]
        Y = jnp.take_along_axis(lp, classes[:, None, None], axis=2)[..., 0]
        return np.asarray(cj.lasso(ops.membership, Y).coef)


def stride_fits(top):
    """Each STRIDE row's fit (``top``: the penultimate layer). The ``eq.4 per example`` rows read eq. 4 as it
    types (``linearity="example"``: per subset over its members); ``K=1000`` covers each example 25 times; the
    ``E.1 activation`` rows steer the features, ``h + B(h)^T a_k``, and read the logits through the rest of the
    network (at the penultimate layer that rest is affine, so only the first-layer row can differ in kind)."""
    return {"STRIDE": dict(layer=top, num_subsets=50), "STRIDE K=200": dict(layer=top, num_subsets=200),
            "STRIDE no LDS loss": dict(layer=top, num_subsets=50, lambda_stab=0.0, lambda_lin=0.0),
            "STRIDE first layer": dict(layer=1, num_subsets=50),
            "STRIDE log-prob response": dict(layer=top, num_subsets=50),
            "STRIDE eq.4 per example": dict(layer=top, num_subsets=50, linearity="example"),
            "STRIDE eq.4 per example K=200": dict(layer=top, num_subsets=200, linearity="example"),
            "STRIDE K=1000": dict(layer=top, num_subsets=1000),
            "STRIDE E.1 activation": dict(layer=top, num_subsets=50, steer="activation"),
            "STRIDE E.1 activation first layer": dict(layer=1, num_subsets=50, steer="activation")}


LDS_METHODS = ["STRIDE", "STRIDE K=200", "STRIDE no LDS loss", "STRIDE first layer", "STRIDE log-prob response",
               "TracIn", "diag-Fisher (E.2)", "EK-FAC", "IF", "CiF C=50", "CiF C=50 default", "TRAK"]
MISLABEL_METHODS = ["STRIDE", "STRIDE K=200", "TracIn", "diag-Fisher (E.2)", "EK-FAC", "IF", "CiF C=50",
                    "CiF C=50 default", "TRAK"]


def method_scores(name, task, xt, yt, args, settings):
    n, lam, chunk = task.num_examples, args.damping, settings["grad_chunk"]
    top = len(settings["hidden"])
    if name.startswith("STRIDE"):
        ops, feats = stride_fit(task, settings, **stride_fits(top)[name])
        return stride_scores(ops, feats, task, xt, response="logprob" if "log-prob" in name else "logit")
    g = eval_grads(task, xt, yt)
    if name == "TracIn":  # the document's TracIn: the final checkpoint only, i.e. g_z . g_i
        return train_grad_products(task, g, chunk)
    if name == "diag-Fisher (E.2)":  # the document's E.2: g / (F_diag + eps), F_diag from 1,000 examples
        sample = np.sort(np.random.default_rng(settings["seed"] + 2).choice(n, size=min(1000, n), replace=False))
        part = cj.Task(task.apply_fn, task.loss_fn, task.params, task.inputs[sample], task.targets[sample])
        f_diag = jnp.mean(cj.per_example_grads(part) ** 2, axis=0)
        return train_grad_products(task, g / (f_diag + lam), chunk)
    if name == "EK-FAC":
        pre = cj.ekfac_preconditioner(cj.DampedGGN(task, damping=lam))
        return train_grad_products(task, cj.ekfac_solve(pre, g, damping=lam), chunk) / n
    if name == "IF":
        sol = cj.solve_ggn(task, g, **ec.solver_kwargs(args)).solutions
        return train_grad_products(task, sol, chunk) / n
    if name == "CiF C=50":  # the paper's estimator: every member of a cluster gets its cluster's score
        cache, _ = ec.build_cache(task, args, num_clusters=50, normalize=True, correction=None)
        return np.asarray(cj.cluster_alphas(cache, g).clusters)[:, np.asarray(cache.assignments)] / n
    if name == "CiF C=50 default":  # the library's default: clusters plus each example's low-rank deviation
        cache, _ = ec.build_cache(task, args, num_clusters=50, normalize=True)
        return np.asarray(cj.example_scores(cache, g))
    if name == "TRAK":
        return trak_scores(task, xt, yt, settings)
    raise ValueError(name)


def trak_scores(task, xt, yt, settings):
    """TRAK (one checkpoint, d = ``trak_dim``) with ridge ``rho = 1e-4 tr(Phi^T Phi)``.

    The kernel of a softmax model is singular or nearly so, and its scale depends on
    the model; ``tr(Phi^T Phi)`` is estimated without the projection (the JL sketch
    keeps squared norms in expectation) as the sum of squared norms of the margin
    gradients. If the library still finds the kernel too ill-conditioned, the ridge
    is raised tenfold (the one used is printed and stored with the scores' seconds).
    """
    margin = cj.Task(task.apply_fn, lambda out, t: -cj.trak_margin(out, t), task.params, task.inputs, task.targets)
    chunk = settings["grad_chunk"]
    trace = 0.0
    for a in range(0, task.num_examples, chunk):
        part = cj.Task(margin.apply_fn, margin.loss_fn, margin.params, margin.inputs[a:a + chunk],
                       margin.targets[a:a + chunk])
        trace += float(jnp.sum(cj.per_example_grads(part) ** 2))
    for factor in (1e-4, 1e-3, 1e-2):
        try:
            out = cj.trak(task, xt, yt, sketch_dim=settings["trak_dim"], key=jax.random.key(7), ridge=factor * trace,
                          batch_size=chunk)
        except ValueError as err:
            print(f"  TRAK ridge {factor:g} tr = {factor * trace:.3g}: {err}", flush=True)
            continue
        print(f"  TRAK ridge {factor:g} tr(Phi^T Phi) = {factor * trace:.3g}", flush=True)
        return out
    raise RuntimeError("TRAK's kernel stayed ill-conditioned up to ridge 1e-2 tr(Phi^T Phi)")


class ScoreStore:
    """Score matrices under ``benchmarks/_work/<stem>/`` (atomic .npy files; not committed).

    The seconds of each computation go to the cells file, so that the timing of the
    run that computed a matrix survives a restart on a machine without the matrices.
    """

    def __init__(self, cells, args, tag):
        self.cells, self.tag = cells, tag
        # The folder names a digest of every setting the scores depend on, so that
        # scores of other settings are never read back.
        solver = {k: getattr(args, k) for k in ("rtol", "max_steps", "batch_size", "rhs_batch_size")}
        digest = hashlib.sha256(json.dumps([cells.settings, solver], sort_keys=True).encode()).hexdigest()[:10]
        self.dir = os.path.join(ec.WORKDIR, f"{ec.stem('stride_protocol', args)}-{tag}-{digest}")
        os.makedirs(self.dir, exist_ok=True)

    def __call__(self, name, compute, shape):
        path = os.path.join(self.dir, name.replace(" ", "_").replace("=", "") + ".npy")
        if os.path.exists(path):
            s = np.load(path)
            if s.shape == tuple(shape):
                return s
            print(f"  {path}: shape {s.shape} != {tuple(shape)}; recomputed", flush=True)
        t0 = time.perf_counter()
        s = np.asarray(compute(), np.float64)
        seconds = time.perf_counter() - t0
        if s.shape != tuple(shape):
            raise ValueError(f"{name}: scores of shape {s.shape}, expected {tuple(shape)}")
        atomic_write(path, lambda f: np.save(f, s))
        self.cells.values.pop(f"{self.tag}/seconds/{name}", None)  # this run's seconds replace an older run's
        self.cells(f"{self.tag}/seconds/{name}", lambda: seconds)
        print(f"  {name}: {s.shape} in {seconds:.1f} s", flush=True)
        return s


# -- 1. the document's LDS (C.1) --------------------------------------------------------------


def lds_part(cells, x, y, xt, yt, args, settings):
    n = x.shape[0]
    sizes = [x.shape[1], *settings["hidden"], settings["num_classes"]]
    init = init_mlp(jax.random.key(args.seed), sizes)
    t0 = time.perf_counter()
    base = jax.tree_util.tree_map(lambda a: a[0], train_adam(init, x, y, np.arange(n)[None], key=jax.random.key(
        args.seed + 1), settings=settings))
    base_seconds = time.perf_counter() - t0
    acc = float(jnp.mean(jnp.argmax(network(base, xt), 1) == yt))
    cells("lds/base", lambda: {"seconds": base_seconds, "test_accuracy_on_lds_points": acc})
    task = cj.Task(network, loss, base, x, y)
    print(f"[lds] base model p = {task.num_params}, accuracy on the {xt.shape[0]} test points {acc:.3f}", flush=True)

    # The reference: M models on random halves, in blocks (one cell each), same recipe, own seeds.
    m, block = settings["datamodel_models"], settings["retrain_block"]
    if m % block:
        raise SystemExit(f"--models {m} must be a multiple of the retraining block {block} (finished blocks are reused)")
    keep = np.asarray(cj.random_subsets(jax.random.key(args.seed + 3), m, n))
    rows = np.stack([np.flatnonzero(k) for k in keep])
    for b in range(0, m, block):
        def run(b=b):
            t = time.perf_counter()
            params = train_adam(init, x, y, rows[b:b + block], key=jax.random.fold_in(jax.random.key(args.seed + 4), b),
                                settings=settings)
            out = np.asarray(test_losses(params, xt, yt))
            return {"losses": out.tolist(), "seconds": time.perf_counter() - t}
        got = cells(f"lds/retrain/{b:05d}", run)
        print(f"[lds] retrained models {b}..{b + block - 1} ({got['seconds']:.0f} s)", flush=True)
    losses = np.concatenate([np.asarray(cells.values[f"lds/retrain/{b:05d}"]["losses"]) for b in range(0, m, block)])

    store = ScoreStore(cells, args, "lds")
    names = args.methods or LDS_METHODS
    scores = {nm: store(nm, lambda nm=nm: method_scores(nm, task, xt, yt, args, settings), (xt.shape[0], n))
              for nm in names}
    rng = np.random.default_rng(0)
    scores["random"] = rng.normal(size=(xt.shape[0], n))
    out, ref = {}, None
    for nm, s in scores.items():
        res = cj.datamodel_lds(s, keep, losses, key=jax.random.key(args.seed))
        ref = res
        per = res.per_example
        half = np.sqrt(np.nanvar(per) / np.isfinite(per).sum())
        out[nm] = {"spearman": res.score, "ci95": [res.score - 1.96 * half, res.score + 1.96 * half],
                   "subset_lds": cj.lds(s, keep, losses).score,
                   "seconds": cells.values.get(f"lds/seconds/{nm}")}
        print(f"[lds] {nm:26s} datamodel LDS {res.score:+.3f} +- {1.96 * half:.3f}   subset LDS "
              f"{out[nm]['subset_lds']:+.3f}", flush=True)
    print(f"[lds] reference split-half {ref.split_half:.3f}, ceiling {ref.ceiling:.3f} (M = {m})", flush=True)
    diagnosis = stride_diagnosis(task, xt, settings, ref.datamodel, keep, losses)
    return {"num_params": int(task.num_params), "base_seconds": base_seconds, "test_accuracy": acc,
            "datamodel_models": m, "split_half": ref.split_half, "ceiling": ref.ceiling, "methods": out,
            "stride_diagnosis": diagnosis}


def stride_diagnosis(task, xt, settings, datamodel, keep, losses):
    """Where STRIDE's signal is lost: in the subset responses, or in the K-subset readout?

    * ``response_vs_true_subset_effect``: Spearman across the K subsets of STRIDE's
      response y_k(z) with the datamodel summed over S_k (the reference's own
      subset effect), averaged over z;
    * ``lasso_of_true_subset_effects``: the datamodel LDS of the Lasso split of those
      true subset effects: what a method with perfect subset responses keeps;
    * ``min_norm_of_true_subset_effects``: the same with the dense minimum-norm split;
    * ``covered_share``: examples in at least one subset (all, by construction);
    * ``distinct_columns``: distinct membership columns among the N; examples with the
      same column get the same score from any split of subset responses;
    * ``block_mean_of_reference``: the datamodel LDS of the reference averaged within
      each group of identical columns: the best a subset-level method can do if its
      responses were exact (shares the reference's noise, so an upper estimate).
    """
    ops, feats = stride_fit(task, settings, layer=len(settings["hidden"]), num_subsets=50)
    Ht, Zt = cj.stride_features(task, xt, feature_fn=feats)
    Y = np.asarray(cj.stride_responses(ops, Ht, classes=jnp.argmax(Zt, 1)))  # (Q, K)
    X = np.asarray(ops.membership, np.float64)  # (K, N)
    true = datamodel @ X.T  # (Q, K)
    rho = np.nanmean([spearmanr(Y[q], true[q]).statistic for q in range(Y.shape[0])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w_lasso = np.asarray(cj.lasso(ops.membership, jnp.asarray(true, jnp.float32)).coef)
    w_min = np.linalg.lstsq(X, true.T, rcond=None)[0].T
    got = {"response_vs_true_subset_effect": float(rho),
           "lasso_of_true_subset_effects": cj.datamodel_lds(w_lasso, keep, losses).score,
           "min_norm_of_true_subset_effects": cj.datamodel_lds(w_min, keep, losses).score,
           "covered_share": float((X.sum(0) > 0).mean())}
    _, group = np.unique(X.T, axis=0, return_inverse=True)
    group = group.ravel()
    counts = np.bincount(group)
    means = np.stack([np.bincount(group, weights=row) / counts for row in datamodel])  # (Q, groups)
    got["distinct_columns"] = int(counts.size)
    got["block_mean_of_reference"] = cj.datamodel_lds(means[:, group], keep, losses).score
    print("[lds] STRIDE diagnosis: " + ", ".join(f"{k} {v:.3f}" for k, v in got.items()), flush=True)
    return got


# -- 2. mislabels (C.2, Table 10) ---------------------------------------------------------------


def mislabel_part(cells, x, y, xc, yc, args, settings):
    n, k = x.shape[0], settings["num_classes"]
    rng = np.random.default_rng(args.seed + 5)
    flipped = np.sort(rng.choice(n, size=n // 10, replace=False))
    y_noisy = np.asarray(y).copy()
    y_noisy[flipped] = (y_noisy[flipped] + rng.integers(1, k, size=flipped.size)) % k
    y_noisy = jnp.asarray(y_noisy, jnp.int32)
    sizes = [x.shape[1], *settings["hidden"], k]
    t0 = time.perf_counter()
    base = jax.tree_util.tree_map(lambda a: a[0], train_adam(init_mlp(jax.random.key(args.seed), sizes), x, y_noisy,
                                                             np.arange(n)[None], key=jax.random.key(args.seed + 1),
                                                             settings=settings))
    base_seconds = time.perf_counter() - t0
    task = cj.Task(network, loss, base, x, y_noisy)
    acc = float(jnp.mean(jnp.argmax(network(base, xc), 1) == yc))
    train_logits = network(base, x)
    fits = np.asarray(jnp.argmax(train_logits, 1) == y_noisy)
    train_acc, memorised = float(fits.mean()), float(fits[flipped].mean())
    print(f"[mislabel] {flipped.size} flipped; noisy model: train accuracy (noisy labels) {train_acc:.3f}, "
          f"on the flipped ones {memorised:.3f}, clean test accuracy {acc:.3f}", flush=True)
    store = ScoreStore(cells, args, "mislabel")
    scores = {}
    for nm in args.methods or MISLABEL_METHODS:
        # Summed over the clean test points: one (N,) score per training example.
        scores[nm] = store(nm, lambda nm=nm: method_scores(nm, task, xc, yc, args, settings).sum(axis=0), (n,))
    lam = args.damping

    def ekfac_self():
        pre = cj.ekfac_preconditioner(cj.DampedGGN(task, damping=lam))
        out = []
        for a in range(0, n, settings["grad_chunk"]):
            part = cj.Task(network, loss, base, x[a:a + settings["grad_chunk"]], y_noisy[a:a + settings["grad_chunk"]])
            g = cj.per_example_grads(part)
            out.append(np.asarray(jnp.sum(g * cj.ekfac_solve(pre, g, damping=lam), axis=1)) / n)
        return np.concatenate(out)

    cache = None
    if not args.methods:  # the self-influence rows belong to the full run
        scores["EK-FAC self"] = store("EK-FAC self", ekfac_self, (n,))
        for corrected, nm in [(True, "CiF self C=50"), (False, "CiF self C=50 paper")]:
            def cif_self(corrected=corrected):
                nonlocal cache
                if cache is None:
                    cache, _ = ec.build_cache(task, args, num_clusters=50, normalize=True)
                return cj.self_influence(cache, task, estimator="corrected" if corrected else "paper",
                                         batch_size=args.batch_size)
            scores[nm] = store(nm, cif_self, (n,))
    # No attribution at all: the noisy model's own training loss. It tells how findable the flipped
    # labels are for this model (the ones it has memorised have small losses and small gradients).
    scores["training loss self"] = np.asarray(loss(train_logits, y_noisy), np.float64)
    scores["random"] = np.random.default_rng(1).normal(size=n)
    truth = np.zeros(n, bool)
    truth[flipped] = True
    rows = {}
    for nm, s in scores.items():
        # Test-influence scores flag the most harmful (lowest); self-influence the largest.
        flagged = np.argsort(-s if " self" in nm else s, kind="stable")[:flipped.size]
        p = float(truth[flagged].mean())
        half = 1.96 * np.sqrt(p * (1 - p) / flipped.size)
        rows[nm] = {"precision": p, "ci95": [p - half, p + half], "seconds": cells.values.get(f"mislabel/seconds/{nm}")}
        print(f"[mislabel] {nm:22s} precision {p:.3f} +- {half:.3f}", flush=True)
    return {"num_flipped": int(flipped.size), "clean_test_points": int(xc.shape[0]), "base_seconds": base_seconds,
            "train_accuracy_noisy_labels": train_acc,
            "flipped_memorised": memorised, "clean_test_accuracy": acc, "methods": rows}


# -- driver -----------------------------------------------------------------------------------


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["lds", "mislabel"])
    p.add_argument("--models", type=int, default=None, help="datamodel retrainings M (default 64 quick, 1000 full)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="only these methods (and the cheap rows: random, and the training loss for mislabels), "
                        "written to <name>-<dataset>[-quick].json "
                        "beside the full run's file; the retraining cells are shared. STRIDE rows: "
                        + ", ".join(f"'{m}'" for m in stride_fits(2)))
    p.add_argument("--name", default="stride_protocol_readings",
                   help="with --methods: the results' file name (<name>-<dataset>.json)")
    args = ec.finish_args(p.parse_args(), quick_dataset="digits", full_dataset="mnist5k")
    if args.name != "stride_protocol_readings" and not args.methods:
        raise SystemExit("--name names the file of a --methods run; give --methods too")
    known = set(stride_fits(2)) | set(LDS_METHODS) | set(MISLABEL_METHODS)
    unknown = [m for m in args.methods or [] if m not in known]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {sorted(known)}")
    q = args.quick
    settings = {"hidden": [64, 32] if q else [512, 256], "learning_rate": 1e-3, "batch_size": 64,
                "epochs": 20, "stride_subset_size": 100 if not q else 30,
                "datamodel_models": args.models or (64 if q else 1000), "retrain_block": 16 if q else 50,
                "lds_test_points": 20 if q else 100, "mislabel_test_points": 359 if q else 500,
                "grad_chunk": 500, "trak_dim": 256 if q else 1024, "damping": args.damping, "seed": args.seed}
    ds = cdata.load_dataset(args.dataset, seed=args.seed)
    x = jnp.asarray(ds.x_train.reshape(ds.x_train.shape[0], -1), jnp.float32)
    y = jnp.asarray(ds.y_train, jnp.int32)
    settings["num_classes"] = int(np.max(np.asarray(y))) + 1
    xt_all = jnp.asarray(ds.x_test.reshape(ds.x_test.shape[0], -1), jnp.float32)
    yt_all = jnp.asarray(ds.y_test, jnp.int32)
    pick = np.random.default_rng(args.seed).permutation(xt_all.shape[0])
    # M is left out of the cells' settings: the masks of cj.random_subsets are drawn row by row
    # from one stream, so a larger M keeps the first M rows and a rerun with more models extends
    # the finished retraining blocks.
    cells = ec.Cells("stride_protocol", args, {k: v for k, v in settings.items() if k != "datamodel_models"})
    out = {"settings": {"dataset": args.dataset, "num_train": int(x.shape[0]), "dtype": "float32", **settings},
           "published": PUBLISHED, "results": {}}
    if "lds" in args.parts:
        lp = pick[:settings["lds_test_points"]]
        out["results"]["lds"] = lds_part(cells, x, y, xt_all[lp], yt_all[lp], args, settings)
    if "mislabel" in args.parts:
        mp = pick[:settings["mislabel_test_points"]]
        out["results"]["mislabel"] = mislabel_part(cells, x, y, xt_all[mp], yt_all[mp], args, settings)
    name = args.name if args.methods else "stride_protocol"
    if args.methods:
        out["settings"]["methods"] = list(args.methods)
    ec.write(name, args, out)
    plot(out, args, name)


def plot(out, args, name="stride_protocol"):
    plt = ec.pyplot()
    res = out["results"]
    parts = [p for p in ["lds", "mislabel"] if p in res]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), squeeze=False)
    for ax, part in zip(axes[0], parts):
        rows = res[part]["methods"]
        names = list(rows)
        key = "spearman" if part == "lds" else "precision"
        vals = [rows[m][key] for m in names]
        err = np.array([[v - rows[m]["ci95"][0], rows[m]["ci95"][1] - v] for m, v in zip(names, vals)]).T
        ax.barh(names, vals, xerr=err, color="tab:blue")
        pub = PUBLISHED["lds spearman" if part == "lds" else "mislabel precision"]
        for j, m in enumerate(names):
            if m in pub:
                ax.plot(pub[m], j, "r*", markersize=10, label="published" if m == "STRIDE" else None)
        if part == "lds":
            ax.axvline(res["lds"]["ceiling"], color="gray", ls="--", label="reference ceiling")
            ax.set(xlabel="Spearman with the datamodel (app. C.1)", title=f"LDS, M = {res['lds']['datamodel_models']}")
        else:
            ax.set(xlabel="precision at |F|", title=f"mislabels ({res['mislabel']['num_flipped']} flipped)")
        ax.legend(fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(ec.figure_path(name, args))


if __name__ == "__main__":
    main()
