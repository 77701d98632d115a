"""Linear datamodeling score (LDS) of IF, CiF, Grad-Dot, TracIn, TRAK and STRIDE (issue #6 exp. 8, #8 exp. 1).

M random 50% subsets of the training set are drawn (``cj.random_subsets``); a
model is trained from scratch on each, for several seeds, in one vmapped program
(``cj.subset_losses``), and every method's summed attributions predict those
models' per-example test losses. LDS = Spearman across subsets, averaged over
test examples (``cj.lds``; TRAK, Park et al. 2023, eq. 4). Every method runs on
the same base model theta_0 (trained on all N the same way, seed 0):

* IF: ``score(z, i) = (1/N) g_z . H~^{-1} g_i`` (one damped-GGN solve per test point);
* CiF (C = 10, 50): the same with ``g_i`` replaced by its cluster's response,
  ``alpha_{c(i)}(z) / N`` (paper eq. 11), from one cache. The test points are not
  training points, so no evaluation set overlaps a removed set: no self term applies;
* CiF (C = 10, 50) "default": the library's default cache and estimator, the
  clusters plus each example's deviation through the low-rank factors
  (``cj.example_scores``);
* Grad-Dot ``g_z . g_i``; TracIn over 4 checkpoints of the (deterministic,
  full-batch) training trajectory, weighted by the learning rate times the steps
  each checkpoint stands for; TRAK (one checkpoint, JL dimension d);
* STRIDE (seed 004): operators on frozen features (LR: the inputs; MLP: the
  hidden layer), K subsets of size m, per-example scores by Lasso with the test
  labels as classes.

Models: multinomial logistic regression (L2 = damping, so the damped GGN is the
Hessian of the training objective) and a one-hidden-layer ReLU MLP, float64.

    python experiments/lds.py --quick     # digits, M = 64 subsets, 100 test points
    python experiments/lds.py             # mnist5k, M = 100, 200 test points

Published (dattri's benchmark, full MNIST, 60k training images): LDS about 0.80
for CG-based IF with logistic regression and about 0.26 with an MLP. STRIDE's
document reports 0.116 on MNIST with its own metric (app. C.1), not this subset LDS.
"""

from __future__ import annotations

import itertools
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import _common as ec  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import cif_jax as cj  # noqa: E402
from cif_jax.workloads import data as cdata  # noqa: E402

RETRAIN_PIECE = 10  # subsets retrained per resumable cell


def linear(params, x):
    return x @ params["w1"] + params["b1"][None, :]


def mlp(params, x):
    return mlp_hidden(params, x) @ params["w2"] + params["b2"][None, :]


def mlp_hidden(params, x):
    return jax.nn.relu(x @ params["w1"] + params["b1"][None, :])


def loss(outputs, targets):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)


def init_params(key, sizes, zero=False):
    params = {}
    for j, (a, b) in enumerate(itertools.pairwise(sizes), start=1):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (a, b), jnp.float64) / np.sqrt(a)
        params[f"w{j}"] = jnp.zeros_like(w) if zero else w
        params[f"b{j}"] = jnp.zeros(b, jnp.float64)
    return params


def timed(fn):
    """``(result, seconds)`` of one call, compilation included."""
    seconds, out = ec.timed(fn, warmup=False)
    return out, seconds


def run_model(name, x, y, xt, yt, args, settings, rng_seed, cells):
    n, d = x.shape
    k = int(np.max(np.asarray(y))) + 1
    lam = args.damping
    if name == "lr":
        apply, sizes, seeds = linear, [d, k], 1  # convex: one optimum, seeds are irrelevant
        init = init_params(jax.random.key(rng_seed), sizes, zero=True)
        inits = None
    else:
        apply, sizes, seeds = mlp, [d, settings["hidden"], k], settings["seeds"]
        init = init_params(jax.random.key(rng_seed), sizes)
        inits = jax.vmap(lambda kk: init_params(kk, sizes))(jax.random.split(jax.random.key(rng_seed + 1), seeds))
    train_kw = dict(num_steps=settings["steps"], learning_rate=settings["learning_rate"], weight_decay=lam)
    start = cj.Task(apply, loss, init, x, y)

    # theta_0 and the TracIn checkpoints (full-batch GD is deterministic: training
    # for t steps from the same start is the trajectory's checkpoint at step t).
    marks = [settings["steps"] * j // 4 for j in range(1, 5)]
    ckpts = []
    for t in marks:
        m = cj.train_many(start, np.ones((1, n), bool), **{**train_kw, "num_steps": t})
        ckpts.append(jax.tree_util.tree_map(lambda a: a[0], m.params))
    params = ckpts[-1]
    task = cj.Task(apply, loss, params, x, y)
    base_loss = float(jnp.mean(loss(apply(params, xt), yt)))
    base_acc = float(jnp.mean(jnp.argmax(apply(params, xt), 1) == yt))
    print(f"[{name}] p = {task.num_params}, test loss {base_loss:.4f}, accuracy {base_acc:.3f}", flush=True)

    # LDS targets.
    keep = cj.random_subsets(jax.random.key(settings["subset_seed"]), settings["subsets"], n)
    # Retrained in pieces of RETRAIN_PIECE subsets, each its own cell: a run stopped midway
    # (the MLP's 500 models take hours on one core) resumes at the first unfinished piece.
    start_fp = cj.fingerprint(start)
    pieces = []
    for lo in range(0, settings["subsets"], RETRAIN_PIECE):
        def piece(lo=lo):
            out, sec = timed(lambda: cj.subset_losses(
                start, keep[lo:lo + RETRAIN_PIECE], xt, yt, init_params=inits, stacked_init=inits is not None,
                model_batch_size=settings["model_batch_size"], **train_kw))
            print(f"[{name}] retrained subsets {lo}-{lo + out.shape[0] - 1} x {seeds} seeds in {sec:.0f} s",
                  flush=True)
            return {"losses": np.asarray(out).tolist(), "seconds": sec, "start": start_fp}
        pieces.append(cells(f"model/{name}/retrain/{lo}", piece))
        if pieces[-1]["start"] != start_fp:
            raise SystemExit(f"{cells.path}: its retraining pieces for {name!r} started from another model or "
                             "data (fingerprint differs); delete the file or pass another --output")
    losses = np.concatenate([np.asarray(pc["losses"]) for pc in pieces])
    t_retrain = sum(pc["seconds"] for pc in pieces)
    print(f"[{name}] retrained {settings['subsets']} x {seeds} models in {t_retrain:.0f} s", flush=True)

    scores, seconds, factors = {}, {}, {}
    g_train, t_g = timed(lambda: cj.per_example_grads(task))
    g_test, _ = timed(lambda: cj.per_example_grads(cj.Task(apply, loss, params, xt, yt)))
    sol, t_if = timed(lambda: cj.solve_ggn(task, g_test, damping=lam, solver=cj.CG(rtol=args.rtol or 1e-8, max_steps=args.max_steps)).solutions)
    scores["IF"] = np.asarray(sol @ g_train.T) / n
    seconds["IF"] = t_if + t_g
    for c in settings["clusters"]:
        cache, t_c = timed(lambda: cj.build_cache(task, correction=None, num_clusters=c, sketch_dim=32, damping=lam,
                                                  solver=cj.CG(rtol=args.rtol or 1e-8, max_steps=args.max_steps), key=jax.random.key(c), normalize_sketches=True))
        alphas, t_a = timed(lambda: cj.cluster_alphas(cache, g_test))
        scores[f"CiF C={c}"] = np.asarray(alphas.clusters)[:, np.asarray(cache.assignments)] / n
        seconds[f"CiF C={c}"] = t_c + t_a
        # The library's default: the same clusters with the low-rank factors (rank "auto") and the
        # default estimator's per-example scores (test points hold no training example: no self term).
        cache, t_c = timed(lambda: cj.build_cache(task, num_clusters=c, sketch_dim=32, damping=lam,
                                                  solver=cj.CG(rtol=args.rtol or 1e-8, max_steps=args.max_steps),
                                                  key=jax.random.key(c), normalize_sketches=True,
                                                  correction=cj.CalibratedCorrection(max_rank=settings["max_rank"])))
        rows, t_a = timed(lambda: cj.example_scores(cache, g_test))
        scores[f"CiF C={c} default"] = np.asarray(rows)
        seconds[f"CiF C={c} default"] = t_c + t_a
        factors[f"CiF C={c} default"] = {"rank": cache.lowrank.rank, "note": cache.lowrank.note,
                                         "predicted_error": float(cache.lowrank.predicted_error)}
    scores["Grad-Dot"], seconds["Grad-Dot"] = timed(lambda: cj.grad_dot(task, xt, yt))
    lrs = [settings["learning_rate"] * (b - a) for a, b in zip([0] + marks[:-1], marks)]
    scores["TracIn"], seconds["TracIn"] = timed(lambda: cj.tracin(task, xt, yt, checkpoints=ckpts,
                                                                  learning_rates=lrs))
    scores["TRAK"], seconds["TRAK"] = timed(lambda: cj.trak(task, xt, yt, sketch_dim=settings["trak_dim"],
                                                            key=jax.random.key(7), ridge=1e-6))

    # STRIDE on frozen features.
    def stride():
        feats = (lambda prm, xx: xx) if name == "lr" else mlp_hidden
        H, Z = cj.stride_features(task, x, feature_fn=feats)
        Ht, _ = cj.stride_features(task, xt, feature_fn=feats)
        subs = cj.stride_subsets(jax.random.key(11), n, num_subsets=settings["stride_subsets"],
                                 subset_size=settings["stride_subset_size"])
        ops = cj.stride_fit(H, Z, y, subs, key=jax.random.key(12), num_steps=settings["stride_steps"])
        return cj.stride_scores(ops, Ht, classes=yt).coef

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few examples may share every block by chance
        scores["STRIDE"], seconds["STRIDE"] = timed(stride)

    rows = {}
    for method, s in scores.items():
        res = cj.lds(np.asarray(s), keep, losses)
        rows[method] = {"lds_spearman": float(res.score), "lds_std": float(np.nanstd(np.asarray(res.per_example))),
                        "seconds": seconds[method]}
        print(f"[{name}] {method:10s} LDS {rows[method]['lds_spearman']:.3f}  ({seconds[method]:.1f} s)", flush=True)
    # Self-consistency: IF vs CiF per-example scores.
    for c in settings["clusters"]:
        for key in (f"CiF C={c}", f"CiF C={c} default"):
            rows[key]["score_corr_vs_IF"] = float(np.corrcoef(scores["IF"].ravel(), scores[key].ravel())[0, 1])
        rows[f"CiF C={c} default"].update(factors[f"CiF C={c} default"])
    return {"model": name, "sizes": sizes, "num_params": int(task.num_params), "seeds": seeds,
            "test_loss": base_loss, "test_accuracy": base_acc, "retrain_seconds": t_retrain,
            "methods": rows}


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["lr", "mlp"], choices=["lr", "mlp"])
    p.add_argument("--subsets", type=int, default=None, help="M retraining subsets (quick 64, full 100)")
    p.add_argument("--seeds", type=int, default=None, help="MLP seeds per subset (quick 3, full 5)")
    p.add_argument("--test-points", type=int, default=None, help="quick 100, full 200")
    p.add_argument("--hidden", type=int, default=None, help="MLP width (quick 32, full 128)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--learning-rate", type=float, default=0.1)
    p.add_argument("--max-rank", type=int, default=1024,
                   help="max_rank of the default cache's factors (results of another value go to lds-maxrank<r>-*)")
    args = ec.finish_args(p.parse_args(), quick_dataset="digits", full_dataset="mnist5k")
    q = args.quick
    settings = {"subsets": args.subsets or (64 if q else 100), "seeds": args.seeds or (3 if q else 5),
                "test_points": args.test_points or (100 if q else 200), "hidden": args.hidden or (32 if q else 128),
                "steps": args.steps, "learning_rate": args.learning_rate, "subset_seed": 3,
                "clusters": [10, 50], "trak_dim": 256 if q else 1024, "model_batch_size": 64,
                "stride_subsets": 50, "stride_subset_size": 100, "stride_steps": 250,
                "cif_estimators": ["paper", "default"], "max_rank": args.max_rank}
    ds = cdata.load_dataset(args.dataset, seed=args.seed)
    x = jnp.asarray(ds.x_train.reshape(ds.x_train.shape[0], -1), jnp.float64)
    y = jnp.asarray(ds.y_train, jnp.int32)
    pick = np.random.default_rng(args.seed).permutation(ds.x_test.shape[0])[:settings["test_points"]]
    xt = jnp.asarray(ds.x_test.reshape(ds.x_test.shape[0], -1)[pick], jnp.float64)
    yt = jnp.asarray(ds.y_test[pick], jnp.int32)
    name = "lds" if args.max_rank == 1024 else f"lds-maxrank{args.max_rank}"
    cells = ec.Cells(name, args, {**{k: v for k, v in vars(args).items() if k not in ("output", "models")},
                                   **settings})
    results = [cells(f"model/{m}", lambda m=m: run_model(m, x, y, xt, yt, args, settings, args.seed, cells))
               for m in args.models]
    out = {"settings": {"dataset": args.dataset, "num_train": int(x.shape[0]), "dtype": "float64",
                        "damping": args.damping, **settings},
           "published": {"dattri IF (CG), logistic regression, full MNIST": 0.80,
                         "dattri IF (CG), MLP, full MNIST": 0.26},
           "results": results, "cell_runs": cells.runs}
    ec.write(name, args, out)
    plt = ec.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(results[0]["methods"])
    width = 0.8 / len(results)
    for j, r in enumerate(results):
        ax.bar(np.arange(len(names)) + j * width, [r["methods"][m]["lds_spearman"] for m in names], width,
               label=r["model"])
    ax.set_xticks(np.arange(len(names)) + width * (len(results) - 1) / 2, names, rotation=30)
    ax.set(ylabel="LDS (Spearman)", title=f"LDS on {args.dataset} (N = {x.shape[0]})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ec.figure_path(name, args))


if __name__ == "__main__":
    main()
