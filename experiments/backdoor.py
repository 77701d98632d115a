"""Backdoor group retrieval (paper sec. 5.5, Fig. 4): find the poisoned groups by influence on the attack.

The training set is split into G disjoint groups; 10% of them are poisoned: every
member gets a patch trigger and the label 0. A model trained on it (the main
job's protocol, LeNet-5) learns the backdoor. The target is the mean loss of
triggered test images of the other classes, labelled 0 (the attack); a group
that helped the attack raises that loss when removed, so groups are ranked by
their helpfulness to the target (the library's sign: positive = helpful):

* CiF: ``cj.loss_delta(cache, groups, g_target)`` from one cache;
* IF (per example, summed over the group): ``g_i . H~^{-1} g_target / N``, one solve;
* Grad-Dot and TRAK (ridge 10, about 1e-5 of its float32 kernel's top eigenvalue), summed over the group (``groups=``), averaged over the
  target images.

Two regimes: a fixed full-intensity patch in the bottom-left corner, and a
low-contrast patch at a random location per image. A third, a control, flips the
poisoned groups' labels to 0 without any trigger and keeps the random regime's
target: if the methods find those groups as well, the label flip alone (a
mislabelled example is influential on any 0-labelled target) explains the
retrieval, not the trigger. Reported per regime: the
attack success rate (triggered non-0 test images classified 0), recall against
the number of groups inspected (log scale), PR-AUC (average precision) and
Recall@k, averaged over seeds {0, 10, 100}.

    python experiments/backdoor.py --quick     # digits (8x8), G = 143
    python experiments/backdoor.py             # mnist5k (28x28), G = 500
"""

from __future__ import annotations

import time

import _common as ec
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.metrics import average_precision_score

import cif_jax as cj
from cif_jax.workloads import data as cdata
from cif_jax.workloads import models as cmodels
from cif_jax.workloads import training
from cif_jax.workloads.training import TRAINING

REGIMES = ("fixed", "random-low-contrast", "label-flip-only")


def add_trigger(x, regime, rng, *, size, intensity):
    """Images (n, H, W, 1) with the trigger: a size x size patch."""
    x = np.array(x, copy=True)
    n, h, w = x.shape[:3]
    if regime == "fixed":
        x[:, h - size:, :size, :] = 1.0  # bottom-left, full intensity
        return x
    rows = rng.integers(0, h - size + 1, n)
    cols = rng.integers(0, w - size + 1, n)
    for j in range(n):
        patch = x[j, rows[j]:rows[j] + size, cols[j]:cols[j] + size, :]
        x[j, rows[j]:rows[j] + size, cols[j]:cols[j] + size, :] = np.clip(patch + intensity, 0.0, 1.0)
    return x


def recall_curve(scores, poisoned):
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(poisoned[order])
    return hits / poisoned.sum()


def run(regime, seed, ds, args, settings, methods=("CiF", "IF (summed)", "Grad-Dot", "TRAK")):
    """One regime and seed: the poisoned model trained, then each of ``methods`` scores the groups.
    ``"CiF"`` is the paper's estimator (eq. 11, no correction); ``"CiF default"`` the library's default cache
    and estimator (the clusters, each member's deviation through the low-rank factors)."""
    rng = np.random.default_rng(seed)
    n = ds.x_train.shape[0]
    groups = np.array_split(rng.permutation(n), settings["groups"])
    num_poison = max(1, settings["groups"] // 10)
    poisoned = np.zeros(len(groups), bool)
    poisoned[rng.choice(len(groups), num_poison, replace=False)] = True
    members = np.concatenate([g for g, p in zip(groups, poisoned) if p])
    x = np.array(ds.x_train, copy=True)
    y = np.array(ds.y_train, copy=True)
    if regime != "label-flip-only":
        x[members] = add_trigger(x[members], regime, rng, size=settings["patch"], intensity=settings["intensity"])
    y[members] = 0

    epochs, lr, schedule = TRAINING[args.dataset]
    config = cmodels.model_config(args.model, in_shape=x.shape[1:], num_classes=ds.num_classes)
    net = cmodels.build_from_config(config, seed=seed)
    net, _ = training.train(net, x, y, epochs=epochs, learning_rate=lr, schedule=schedule, seed=seed, progress=False)
    task = cj.Task.from_nnx(net, optax.softmax_cross_entropy_with_integer_labels, jnp.asarray(x), jnp.asarray(y))

    clean = ds.y_test != 0
    trigger = "random-low-contrast" if regime == "label-flip-only" else regime
    xt = add_trigger(ds.x_test[clean], trigger, rng, size=settings["patch"], intensity=settings["intensity"])
    logits = np.asarray(task.apply_fn(task.params, jnp.asarray(xt)))
    asr = float((logits.argmax(1) == 0).mean())
    _, clean_acc = training.evaluate(net, ds.x_test, ds.y_test)
    pick = rng.permutation(xt.shape[0])[: settings["targets"]]
    xt, yt = jnp.asarray(xt[pick]), jnp.zeros(pick.size, jnp.int32)
    target = cj.Task(task.apply_fn, task.loss_fn, task.params, xt, yt)
    g_target = cj.target_gradient(target)

    caches = {}

    def cif(correction, estimator=None):
        if correction not in caches:
            caches[correction] = cj.build_cache(
                task, num_clusters=settings["clusters"], sketch_dim=32, key=jax.random.key(seed),
                normalize_sketches=True, **({} if correction else {"correction": None}), **ec.solver_kwargs(args, "auto"))
        kw = {} if estimator is None else {"estimator": estimator}
        return np.asarray(cj.loss_delta(caches[correction], groups, g_target, **kw))

    def if_summed():
        u = cj.solve_ggn(task, g_target[None, :], **ec.solver_kwargs(args, "auto")).solutions[0]
        per_example = np.asarray(cj.per_example_grads(task, batch_size=args.batch_size) @ u) / n
        return np.array([per_example[g].sum() for g in groups])

    compute = {
        "CiF": lambda: cif(False),
        "CiF default": lambda: cif(True),
        "CiF default cache, paper's estimator": lambda: cif(True, "paper"),
        "IF (summed)": if_summed,
        "Grad-Dot": lambda: np.asarray(cj.grad_dot(task, xt, yt, groups=groups, batch_size=args.batch_size)).mean(0),
        "TRAK": lambda: np.asarray(cj.trak(task, xt, yt, sketch_dim=settings["trak_dim"], key=jax.random.key(seed + 1),
                                           ridge=settings["trak_ridge"], groups=groups,
                                           batch_size=args.batch_size)).mean(0),
    }
    scores, seconds = {}, {}
    for name in methods:
        t = time.perf_counter()
        scores[name] = compute[name]()
        seconds[name] = time.perf_counter() - t

    out = {"regime": regime, "seed": seed, "attack_success_rate": asr, "clean_accuracy": float(clean_acc),
           "num_poisoned_groups": int(num_poison), "methods": {}}
    for name, s in scores.items():
        curve = recall_curve(s, poisoned)
        out["methods"][name] = {"pr_auc": float(average_precision_score(poisoned, s)),
                                "recall_at_k": {str(k): float(curve[min(k, len(curve)) - 1])
                                                for k in settings["recall_at"]},
                                "recall_curve": curve.tolist(), "seconds": seconds[name]}
    print(f"{regime} seed {seed}: ASR {asr:.3f}, clean acc {clean_acc:.3f}; " + ", ".join(
        f"{m} PR-AUC {r['pr_auc']:.3f}" for m, r in out["methods"].items()), flush=True)
    return out


def main():
    p = ec.parser(__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=None, help="G (quick 143, full 500)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 10, 100])
    p.add_argument("--clusters", type=int, default=50)
    p.add_argument("--targets", type=int, default=64, help="triggered test images in the target")
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    p.add_argument("--with-default", action="store_true",
                   help="also the library's default cache and estimator ('CiF default'), each in its own cell "
                        "beside the regime's (the model retrained as there; its accuracy and ASR must match)")
    args = ec.finish_args(p.parse_args())
    ds = cdata.load_dataset(args.dataset, seed=0)
    small = ds.x_train.shape[1] <= 8
    settings = {"groups": args.groups or (143 if args.quick else 500), "clusters": args.clusters,
                "patch": 2 if small else 4, "intensity": 0.3, "targets": args.targets,
                "trak_dim": 512 if args.quick else 2048,
                # float32 kernels need a ridge to be invertible: digits (d = 512, top eigenvalue ~1e6) takes 10;
                # mnist5k (d = 2048, top eigenvalue 3.3e6) needs about 1e-3 of the top, as cj.trak's check says.
                "trak_ridge": 10.0 if args.quick else 3000.0}
    settings["recall_at"] = [settings["groups"] // 10, settings["groups"] // 5, settings["groups"] // 2]
    skip = ("output", "regimes", "with_default")  # not settings: they choose which cells run
    cells = ec.Cells("backdoor", args, {**{k: v for k, v in vars(args).items() if k not in skip}, **settings})
    runs = []
    for regime in args.regimes:
        for seed in args.seeds:
            r = cells(f"{regime}/seed{seed}", lambda regime=regime, seed=seed: run(regime, seed, ds, args, settings))
            if args.with_default:
                # The model is retrained here: the default, the paper's estimator from the same cache and IF on
                # the same model, whether or not it equals the regime cell's.
                d = cells(f"{regime}/seed{seed}/default", lambda regime=regime, seed=seed: run(
                    regime, seed, ds, args, settings,
                    methods=("CiF default", "CiF default cache, paper's estimator", "IF (summed)")))
                same = all(d[k] == r[k] for k in ("attack_success_rate", "clean_accuracy"))
                if not same:
                    print(f"{regime} seed {seed}: the retrained model differs (ASR {d['attack_success_rate']:.4f} vs "
                          f"{r['attack_success_rate']:.4f}, clean accuracy {d['clean_accuracy']:.4f} vs "
                          f"{r['clean_accuracy']:.4f}); the default cell's rows score its own model", flush=True)
                extra = {(k if k != "IF (summed)" else "IF (summed), the default cell's model"): v
                         for k, v in d["methods"].items()}
                r = {**r, "methods": {**r["methods"], **extra}, "default_model_matches": same,
                     "default_model": {k: d[k] for k in ("attack_success_rate", "clean_accuracy")}}
            runs.append(r)
    summary = {}
    for regime in args.regimes:
        rs = [r for r in runs if r["regime"] == regime]
        summary[regime] = {"attack_success_rate": float(np.mean([r["attack_success_rate"] for r in rs])),
                           "clean_accuracy": float(np.mean([r["clean_accuracy"] for r in rs])), "methods": {}}
        for name in rs[0]["methods"]:
            summary[regime]["methods"][name] = {
                "pr_auc": float(np.mean([r["methods"][name]["pr_auc"] for r in rs])),
                "pr_auc_std": float(np.std([r["methods"][name]["pr_auc"] for r in rs])),
                "recall_at_k": {k: float(np.mean([r["methods"][name]["recall_at_k"][k] for r in rs]))
                                for k in rs[0]["methods"][name]["recall_at_k"]},
                "seconds": float(np.mean([r["methods"][name]["seconds"] for r in rs]))}
    out = {"settings": {"dataset": args.dataset, "model": args.model, "damping": args.damping, "rtol": args.rtol,
                        "seeds": args.seeds, **settings}, "summary": summary, "runs": runs,
           "cell_runs": cells.runs}
    # A run of some regimes only is written beside the full run's file, never over it.
    stem = "backdoor" if set(args.regimes) == set(REGIMES) else "backdoor_" + "_".join(args.regimes)
    ec.write(stem, args, out)

    plt = ec.pyplot()
    fig, axes = plt.subplots(1, len(args.regimes), figsize=(5.5 * len(args.regimes), 4), squeeze=False)
    for ax, regime in zip(axes[0], args.regimes):
        rs = [r for r in runs if r["regime"] == regime]
        for name in rs[0]["methods"]:
            curve = np.mean([r["methods"][name]["recall_curve"] for r in rs], axis=0)
            ax.plot(np.arange(1, curve.size + 1), curve, label=f"{name} (PR-AUC "
                    f"{summary[regime]['methods'][name]['pr_auc']:.2f})")
        ax.set_xscale("log")
        ax.set(xlabel="groups inspected", ylabel="recall of poisoned groups",
               title=f"{regime} trigger (ASR {summary[regime]['attack_success_rate']:.2f})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ec.figure_path(stem, args))


if __name__ == "__main__":
    main()
