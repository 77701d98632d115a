"""Side-by-side benchmark against pyDVL and kronfluence on the main job's fold workload (issue #9, item 4).

Workload: LeNet-5 on ``mnist5k`` (N = 5,000, p = 61,706, float32, trained as
``cif-jax cv`` trains it), damped GGN with damping 1e-3, the 150 fold queries of
K = 50 and K = 100 (``cif_jax.workloads.folds.kfold_indices(N, K, seed=K)``), fold score
``Delta l(S_k; S_k) = (1/N) g_V^T H~^{-1} sum_{i in S_k} g_i``, true relative
residual 1e-4.

One command runs both sides, one after the other on the same machine:

1. ours (this environment): the exact fold scores (per-query IF, block CG on the
   true damped GGN with each preconditioner) and CiF with C = 10 and 50 end to end
   (gradients, sketch, k-means, solves, all 150 fold scores), timed after
   compilation;
2. the peers (the optional environment of ``setup.sh``, in a subprocess):
   pyDVL's best CG setting on a correct GGN operator and kronfluence's EK-FAC, on
   the same weights exported to PyTorch (logits checked first).

Then every method's fold scores are compared with our exact IF (Spearman) and
the figures are written to ``benchmarks/results/peers-cpu.{json,md}``.

    bash benchmarks/peers/setup.sh          # once: the peers' venv (torch CPU, pyDVL, kronfluence)
    python benchmarks/peers/run.py          # about 55 min on 2 CPU cores

Runs whose full length would take hours (plain CG, pyDVL) are timed on a stated
sample of folds and extrapolated; the results say which.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import cif_jax as cj  # noqa: E402
from benchmarks.common import WORKDIR, machine, timed, trained_task  # noqa: E402
from cif_jax.workloads import folds as cfolds  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
PEERS_PYTHON = os.path.join(HERE, ".venv", "bin", "python")


def log(msg):
    print(f"[ours] {msg}", flush=True)


def export(task, folds, path):
    """Weights (our flax layout), inputs, labels, folds and reference logits for the torch side."""
    arrays = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(task.params)[0]:
        arrays[f"{p[0].key}.{p[1].key}"] = np.asarray(leaf)
    arrays["x"] = np.asarray(task.inputs, np.float32)
    arrays["y"] = np.asarray(task.targets, np.int32)
    arrays["fold_index"] = np.concatenate(folds).astype(np.int64)
    arrays["fold_start"] = np.cumsum([0] + [len(f) for f in folds]).astype(np.int64)
    arrays["ref_logits"] = np.asarray(task.apply_fn(task.params, task.inputs[:512]), np.float32)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def if_scores(task, folds, args, pre):
    res = cj.influence_solve(task, folds, damping=args.damping, solver=cj.CG(rtol=args.rtol, max_steps=args.max_steps, rhs_batch_size=args.rhs_block, preconditioner=pre), batch_size=args.batch_size)
    g = cj.mean_subset_gradients(task, folds, batch_size=args.batch_size)
    return np.asarray(jnp.sum(res.solutions * g, axis=1)), res


def ours(task, folds, args):
    """Our methods on the fold workload: timings (seconds, including compilation where stated) and fold scores."""
    out = {}
    kw = dict(damping=args.damping, batch_size=args.batch_size)
    # Preconditioner builds: timed on their first call, compilation included (a build is done once per model).
    pres = {"none": (None, 0.0)}
    op = cj.DampedGGN(task, **kw)
    t, pre = timed(lambda: cj.nystrom_preconditioner(op, key=jax.random.key(1), rank="auto",
                                                     rhs_batch_size=args.rhs_block), warmup=False)
    pres["nystrom"] = (pre, t)
    log(f"nystrom preconditioner built in {t:.1f} s, rank {pre.rank} (compilation included)")
    t, pre = timed(lambda: cj.kfac_preconditioner(op), warmup=False)
    pres["kfac"] = (pre, t)
    log(f"kfac preconditioner built in {t:.1f} s (compilation included)")
    # Solves: compiled first on one block with max_steps=1, so the timings below are runs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one step does not converge: this only compiles
        for pre, _ in pres.values():
            for block in (folds[: args.rhs_block], folds[: args.sample_folds]):
                cj.influence_solve(task, block, damping=args.damping, solver=cj.CG(rtol=args.rtol, max_steps=1, rhs_batch_size=args.rhs_block, preconditioner=pre), batch_size=args.batch_size)
    cj.mean_subset_gradients(task, folds, batch_size=args.batch_size)
    cj.mean_subset_gradients(task, folds[: args.sample_folds], batch_size=args.batch_size)

    # The exact reference: every fold, Nystrom-preconditioned block CG to the true residual.
    t, (exact, res) = timed(lambda: if_scores(task, folds, args, pres["nystrom"][0]), warmup=False)
    out["IF nystrom"] = {"seconds": t + pres["nystrom"][1], "build_seconds": pres["nystrom"][1], "folds_timed":
                         len(folds), "mean_iterations": float(np.mean(res.num_steps)),
                         "max_true_residual": float(np.max(res.residuals)), "extrapolated": False}
    log(f"IF nystrom: {out['IF nystrom']['seconds']:.1f} s, {np.mean(res.num_steps):.1f} iterations")
    # The other preconditioners: a sample of folds, extrapolated to all (a GGN product costs the same
    # for every right-hand side, so the time is linear in the number of folds at a fixed iteration count).
    sample = folds[: args.sample_folds]
    for name in ("none", "kfac"):
        pre, t_build = pres[name]
        t, (s, res) = timed(lambda pre=pre: if_scores(task, sample, args, pre), warmup=False)
        out[f"IF {name}"] = {"seconds": t * len(folds) / len(sample) + t_build, "build_seconds": t_build,
                             "folds_timed": len(sample), "mean_iterations": float(np.mean(res.num_steps)),
                             "max_true_residual": float(np.max(res.residuals)), "extrapolated": True,
                             "max_rel_diff_vs_exact": float(np.max(np.abs(s - exact[:len(sample)])
                                                                   / np.abs(exact[:len(sample)])))}
        log(f"IF {name}: ~{out[f'IF {name}']['seconds']:.1f} s (extrapolated from {len(sample)} folds), "
            f"{np.mean(res.num_steps):.1f} iterations")

    # CiF end to end: gradients, sketch, k-means, solves and all fold scores (+ the preconditioner build),
    # first call: compilation included.
    scores = {"IF nystrom": exact}
    plain = [(args.clusters[0], "none")] if args.cif_plain else []
    for c, name in [(c, "nystrom") for c in args.clusters] + plain:
        pre, t_build = pres[name]

        def run(c=c, pre=pre):
            cache = cj.build_cache(task, num_clusters=c, sketch_dim=32, key=jax.random.key(0), solver=cj.CG(rtol=args.rtol, max_steps=args.max_steps, rhs_batch_size=args.rhs_block, preconditioner=pre), **kw)
            return cj.fold_loss_delta(cache, task, folds, batch_size=args.batch_size), cache

        t, (s, cache) = timed(run, warmup=False)
        label = f"CiF C={c} {name}"
        scores[label] = np.asarray(s)
        out[label] = {"seconds": t + t_build, "build_seconds": t_build, "extrapolated": False,
                      "compilation_included": True, "cache_timings": {k: float(v) for k, v in cache.timings}}
        log(f"{label}: {out[label]['seconds']:.1f} s")
    return out, scores


def ours_defaults(task, folds, args):
    """Our methods with every solver setting at its default (``solver=None``: ``cj.CG()``, preconditioner "auto").

    First calls, compilation and the preconditioner's build or choice included: what a user who passes only
    ``damping`` and ``batch_size`` pays.
    """
    out, scores = {}, {}
    kw = dict(damping=args.damping, batch_size=args.batch_size)

    def if_run():
        solver = cj.CG().prepare(cj.DampedGGN(task, **kw), len(folds))  # what influence_solve does inside
        res = cj.influence_solve(task, folds, solver=solver, **kw)
        g = cj.mean_subset_gradients(task, folds, batch_size=args.batch_size)
        return np.asarray(jnp.sum(res.solutions * g, axis=1)), res, solver

    t, (exact, res, solver) = timed(if_run, warmup=False)
    out["IF (defaults)"] = {"seconds": t, "extrapolated": False, "compilation_included": True,
                            "solver": solver.describe(), "choice": solver.choice,
                            "mean_iterations": float(np.mean(res.num_steps)),
                            "max_true_residual": float(np.max(res.residuals))}
    scores["IF (defaults)"] = exact
    log(f"IF (defaults): {t:.1f} s, {solver.choice}, {np.mean(res.num_steps):.1f} iterations")
    for c in args.clusters:
        def run(c=c):
            cache = cj.build_cache(task, num_clusters=c, sketch_dim=32, key=jax.random.key(0), **kw)
            return cj.fold_loss_delta(cache, task, folds, batch_size=args.batch_size), cache

        t, (s, cache) = timed(run, warmup=False)
        label = f"CiF C={c} (defaults)"
        scores[label] = np.asarray(s)
        scores[f"CiF C={c} (defaults), paper's estimator"] = np.asarray(
            cj.fold_loss_delta(cache, task, folds, batch_size=args.batch_size, estimator="paper"))
        out[label] = {"seconds": t, "extrapolated": False, "compilation_included": True, "solver": cache.solver,
                      "cache_timings": {k: float(v) for k, v in cache.timings}}
        out[f"CiF C={c} (defaults), paper's estimator"] = {"seconds": t, "extrapolated": False,
                                                           "note": "the same cache, estimator=paper"}
        log(f"{label}: {t:.1f} s ({cache.solver})")
    return out, scores


def ekfac_estimator(task, folds, args):
    """Our APPROXIMATE EK-FAC estimator (kronfluence's method, ``cj.ekfac_influence``): no CG, no residual control."""
    def run():
        pre = cj.ekfac_preconditioner(cj.DampedGGN(task, damping=args.damping, batch_size=args.batch_size))
        delta = cj.ekfac_influence(task, folds, damping=args.damping, preconditioner=pre, batch_size=args.batch_size)
        g = cj.mean_subset_gradients(task, folds, batch_size=args.batch_size)
        return jnp.sum(delta * g, axis=1)

    t, s = timed(run, warmup=False)  # first call: compilation included
    log(f"EK-FAC estimator (approximate): {t:.1f} s")
    return {"seconds": t, "extrapolated": False, "compilation_included": True, "approximate": True}, np.asarray(s)


def markdown(result) -> str:
    m = result["machine"]
    settings = "at each library's defaults" if "--defaults" in result.get("command", "") else "tuned"
    lines = [f"# Peer benchmark, {settings}: fold workload, LeNet-5 on mnist5k", "",
             f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB, {m['platform']}; "
             f"jax {m['jax']}; peers: torch {result.get('peers', {}).get('torch', '-')}, pyDVL "
             f"{result.get('peers', {}).get('pydvl', '-')}, kronfluence {result.get('peers', {}).get('kronfluence', '-')}. "
             f"Load average at the end: {result['load_average']}."
             + (f" Pinned to {m['cpus_usable']} of the {m['cpu_count']} cores (`taskset`), both sides; PyTorch's "
                f"threads: OMP_NUM_THREADS={result.get('omp_num_threads') or 'unset'}."
                if m.get("cpus_usable") and m["cpus_usable"] < m["cpu_count"] else "")
             + (f" {result['run_notes']}" if result.get("run_notes") else ""), "",
             f"N = {result['num_train']}, p = {result['num_params']}, {result['num_folds']} folds (K = 50 and 100), "
             f"damping {result['damping']}, true relative residual {result['rtol']}.", "",
             "| method | seconds (all folds) | vs our fastest exact IF | Spearman vs exact IF | note |",
             "|---|---|---|---|---|"]
    best_if = min(v["seconds"] for k, v in result["methods"].items() if k.startswith("IF "))
    for k, v in result["methods"].items():
        if v.get("approximate"):
            k = k + " *"
        note = []
        if v.get("extrapolated"):
            note.append(f"extrapolated from {v.get('folds_timed')} folds")
        if "mean_iterations" in v:
            note.append(f"{v['mean_iterations']:.1f} CG iterations")
        if "max_true_residual" in v:
            note.append(f"max residual {v['max_true_residual']:.1e}")
        if "median_ratio_to_exact" in v:
            note.append(f"median score ratio {v['median_ratio_to_exact']:.2f}")
        sp = v.get("spearman_vs_exact")
        lines.append(f"| {k} | {v['seconds']:.1f} | {v['seconds'] / best_if:.2f} | "
                     f"{'-' if sp is None else f'{sp:.3f}'} | {'; '.join(note)} |")
    lines += ["", "\\* approximate: no CG, no residual control (the Kronecker-factored inverse in place of the "
              "damped GGN's). Ours include XLA compilation where a row is a first call (preconditioner builds, CiF).",
              "", "Targets: our per-query IF at least 3x faster than pyDVL's best; CiF C = 10 end to end "
              "no slower than kronfluence with fold Spearman at least 0.97.", ""]
    for t, v in result.get("targets", {}).items():
        lines.append(f"- {t}: {v}")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--rhs-block", type=int, default=16)
    p.add_argument("--clusters", type=int, nargs="+", default=[10, 50])
    p.add_argument("--sample-folds", type=int, default=2,
                   help="folds solved with plain and K-FAC-preconditioned CG, then extrapolated to all")
    p.add_argument("--cif-plain", action="store_true", help="also time CiF C = clusters[0] with plain CG")
    p.add_argument("--pydvl-solves", type=int, default=3)
    p.add_argument("--peers-python", default=PEERS_PYTHON)
    p.add_argument("--skip-peers", nargs="*", default=[], choices=["pydvl", "kronfluence"])
    p.add_argument("--output", default=RESULTS)
    p.add_argument("--defaults", action="store_true",
                   help="our IF and CiF at the library's default solver settings only, then the peers; written "
                        "to peers-defaults-cpu.{json,md}")
    p.add_argument("--approx-only", action="store_true",
                   help="only add our EK-FAC estimator's row to an existing peers-cpu.json of this machine")
    args = p.parse_args()

    task, _ = trained_task(args.dataset, "lenet5")
    n = task.num_examples
    folds = [f for k in (50, 100) for f in cfolds.kfold_indices(n, k, seed=k)]
    if args.approx_only:  # add our EK-FAC estimator's row to an existing result of this machine
        with open(os.path.join(args.output, "peers-cpu.json")) as f:
            result = json.load(f)
        row, s = ekfac_estimator(task, folds, args)
        exact = np.asarray(result["fold_scores"]["IF nystrom"])
        row["spearman_vs_exact"] = float(spearmanr(s, exact).statistic)
        row["median_ratio_to_exact"] = float(np.median(s / exact))
        result["methods"]["EK-FAC estimator (ours, approximate)"] = row
        result["fold_scores"]["EK-FAC estimator (ours, approximate)"] = s.tolist()
        result["load_average_approx_row"] = [round(v, 2) for v in os.getloadavg()]
        write(result, args)
        return
    os.makedirs(WORKDIR, exist_ok=True)
    path = os.path.join(WORKDIR, f"peers-{args.dataset}.npz")
    export(task, folds, path)
    log(f"exported {path}; N = {n}, p = {task.num_params}, {len(folds)} folds")
    if args.defaults:
        methods, scores = ours_defaults(task, folds, args)
    else:
        methods, scores = ours(task, folds, args)
        row, scores["EK-FAC estimator (ours, approximate)"] = ekfac_estimator(task, folds, args)
        methods["EK-FAC estimator (ours, approximate)"] = row

    peers = {}
    if not os.path.exists(args.peers_python):
        log(f"no peers environment at {args.peers_python}: run `bash benchmarks/peers/setup.sh` first")
    elif len(args.skip_peers) < 2:
        peer_json = os.path.join(WORKDIR, f"peers-{args.dataset}-torch.json")
        cmd = [args.peers_python, os.path.join(HERE, "torch_side.py"), "--export", path, "--output", peer_json,
               "--damping", str(args.damping), "--rtol", str(args.rtol), "--max-steps", str(args.max_steps),
               "--pydvl-solves", str(args.pydvl_solves), "--chunk", str(args.batch_size)]
        if args.skip_peers:
            cmd += ["--skip", *args.skip_peers]
        subprocess.run(cmd, check=True)
        with open(peer_json) as f:
            peers = json.load(f)
    exact = scores["IF (defaults)" if args.defaults else "IF nystrom"]
    if "pydvl_cg_nystrom" in peers:
        pv = peers["pydvl_cg_nystrom"]
        methods[f"pyDVL CG + Nystrom (rank {pv['nystrom_rank']})"] = {
            "seconds": pv["extrapolated_total_seconds"], "extrapolated": True, "folds_timed": pv["solves_timed"],
            "build_seconds": pv["fit_seconds"], "seconds_per_solve": pv["seconds_per_solve"],
            "mean_iterations": float(np.mean([r["iterations"] for r in pv["rows"]])),
            "max_true_residual": float(np.max([r["true_relative_residual"] for r in pv["rows"]])),
            "max_rel_diff_vs_exact": float(np.max([abs(r["score"] - exact[r["fold"]]) / abs(exact[r["fold"]])
                                                   for r in pv["rows"]]))}
    if "kronfluence_ekfac" in peers:
        kf = peers["kronfluence_ekfac"]
        scores["kronfluence EK-FAC"] = np.asarray(kf["scores"])
        methods["kronfluence EK-FAC"] = {"seconds": kf["total_seconds"], "build_seconds": kf["fit_seconds"],
                                         "extrapolated": False}
    for k, s in scores.items():
        if k in methods:
            methods[k]["spearman_vs_exact"] = float(spearmanr(s, exact).statistic)
            methods[k]["median_ratio_to_exact"] = float(np.median(s / exact))
    targets = {}
    pv_key = next((k for k in methods if k.startswith("pyDVL")), None)
    if pv_key:
        best_if = min(v["seconds"] for k, v in methods.items() if k.startswith("IF "))
        targets["IF >= 3x faster than pyDVL's best"] = (f"{methods[pv_key]['seconds'] / best_if:.1f}x "
                                                       f"({'met' if methods[pv_key]['seconds'] >= 3 * best_if else 'missed'})")
    if "kronfluence EK-FAC" in methods:
        kf_s = methods["kronfluence EK-FAC"]["seconds"]
        for k in (k for k in methods if k.startswith("CiF C=10") and "paper" not in k):
            v = methods[k]
            ok = v["seconds"] <= kf_s and v["spearman_vs_exact"] >= 0.97
            targets[f"{k} vs kronfluence"] = (f"{v['seconds']:.1f} s vs {kf_s:.1f} s, Spearman "
                                              f"{v['spearman_vs_exact']:.3f} ({'met' if ok else 'missed'})")
    result = {"benchmark": "peers", "machine": machine(), "load_average": [round(v, 2) for v in os.getloadavg()],
              "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dataset": args.dataset, "num_train": n,
              "num_params": int(task.num_params), "num_folds": len(folds), "damping": args.damping,
              "rtol": args.rtol, "peers": {k: v for k, v in peers.items() if not isinstance(v, dict)},
              "command": "python benchmarks/peers/run.py " + " ".join(sys.argv[1:]),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "methods": methods, "targets": targets,
              "fold_scores": {k: np.asarray(v).tolist() for k, v in scores.items()}}
    write(result, args)


def write(result, args):
    os.makedirs(args.output, exist_ok=True)
    stem = "peers-defaults-cpu" if getattr(args, "defaults", False) else "peers-cpu"
    for name, text in ((f"{stem}.json", json.dumps(result, indent=2)), (f"{stem}.md", markdown(result))):
        tmp = os.path.join(args.output, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(args.output, name))
    print(markdown(result))


if __name__ == "__main__":
    main()
