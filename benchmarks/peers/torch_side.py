"""The peers' side of the benchmark: pyDVL 0.10 and kronfluence 1.0.1 on the exported LeNet-5.

Runs in the optional peers environment (``benchmarks/peers/setup.sh``), never in
ours: it imports torch, pyDVL and kronfluence only. It reads the export written
by ``benchmarks/peers/run.py`` (weights, data, folds and reference logits of our
trained LeNet-5), rebuilds the same network in PyTorch, checks that its logits
agree with ours, and times

* pyDVL's best setting on a correct damped-GGN operator (pyDVL's own
  "Gauss-Newton" operator is the empirical Fisher and its Hessian operator is
  indefinite on a ReLU network): ``CgOperator`` with a fitted
  ``NystroemPreconditioner`` of rank ``--nystrom-rank``, on a stated number of
  fold right-hand sides, extrapolated to all folds;
* kronfluence's EK-FAC: factors fitted once, then one aggregated pairwise score
  per fold (query = the fold, train = the fold, both gradients summed).

Writes one JSON file of timings, iterations, true residuals and fold scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class LeNet5(nn.Module):
    """The same network as ``cif_jax.workloads.models.LeNet5`` on 28x28x1 (kernel 5, paddings 2 and 0)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def load_model(export) -> LeNet5:
    """Our flax layout (NHWC kernels (kh, kw, cin, cout); dense (in, out); flatten in (h, w, c)) to torch's."""
    net = LeNet5()
    sd = {}
    for name in ("conv1", "conv2"):
        sd[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(export[f"{name}.kernel"].transpose(3, 2, 0, 1)))
        sd[f"{name}.bias"] = torch.from_numpy(export[f"{name}.bias"])
    w1 = export["fc1.kernel"].reshape(5, 5, 16, 120).transpose(2, 0, 1, 3).reshape(400, 120)
    sd["fc1.weight"] = torch.from_numpy(np.ascontiguousarray(w1.T))
    sd["fc1.bias"] = torch.from_numpy(export["fc1.bias"])
    for name in ("fc2", "fc3"):
        sd[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(export[f"{name}.kernel"].T))
        sd[f"{name}.bias"] = torch.from_numpy(export[f"{name}.bias"])
    net.load_state_dict(sd)
    return net.eval()


class GGNOperator:
    """The damped GGN's undamped part, ``(1/N) sum_i J_i^T (diag p_i - p_i p_i^T) J_i``, matrix-free.

    Written against pyDVL's ``TensorOperator`` interface (built by :func:`pydvl_operator`).
    """

    def __init__(self, model, x, chunk):
        self.model, self.x, self.chunk = model, x, chunk
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        self.num_products = 0

    def unflatten(self, flat):
        out, start = {}, 0
        for n, s in zip(self.names, self.shapes):
            size = int(np.prod(s))
            out[n] = flat[start:start + size].reshape(s)
            start += size
        return out

    def logits(self, flat, xb):
        return torch.func.functional_call(self.model, self.unflatten(flat), (xb,))

    def apply_vec(self, v):
        self.num_products += 1
        out = torch.zeros_like(v)
        n = self.x.shape[0]
        for s in range(0, n, self.chunk):
            xb = self.x[s:s + self.chunk]
            z, u = torch.func.jvp(lambda t: self.logits(t, xb), (self.theta,), (v,))
            p = torch.softmax(z, -1)
            wu = p * u - p * (p * u).sum(-1, keepdim=True)
            _, vjp = torch.func.vjp(lambda t: self.logits(t, xb), self.theta)
            out += vjp(wu)[0]
        return out / n


def pydvl_operator(ggn):
    from pydvl.influence.torch.base import TensorOperator

    class Op(TensorOperator):
        @property
        def input_size(self):
            return ggn.theta.numel()

        @property
        def device(self):
            return ggn.theta.device

        @property
        def dtype(self):
            return ggn.theta.dtype

        def to(self, device):
            return self

        def _apply_to_vec(self, vec):
            return ggn.apply_vec(vec)

        def _apply_to_mat(self, mat):
            return torch.stack([ggn.apply_vec(row) for row in mat])

    return Op()


def fold_gradient_sums(model, x, y, folds):
    """sum_{i in S} g_i and the fold's mean gradient g_V, for each fold (flat, parameter order)."""
    params = dict(model.named_parameters())

    def loss_sum(p, xb, yb):
        return F.cross_entropy(torch.func.functional_call(model, p, (xb,)), yb, reduction="sum")

    sums, means = [], []
    for f in folds:
        g = torch.func.grad(loss_sum)({k: v.detach() for k, v in params.items()}, x[f], y[f])
        flat = torch.cat([g[n].reshape(-1) for n, _ in model.named_parameters()])
        sums.append(flat)
        means.append(flat / len(f))
    return torch.stack(sums), torch.stack(means)


def run_pydvl(model, x, y, folds, args, log):
    from pydvl.influence.torch.operator import CgOperator
    from pydvl.influence.torch.preconditioner import NystroemPreconditioner

    n = x.shape[0]
    ggn = GGNOperator(model, x, args.chunk)
    op = pydvl_operator(ggn)
    torch.manual_seed(0)
    pre = NystroemPreconditioner(rank=args.nystrom_rank)
    t0 = time.perf_counter()
    pre.fit(op, args.damping)
    t_fit = time.perf_counter() - t0
    fit_products = ggn.num_products
    log(f"pyDVL Nystrom rank {args.nystrom_rank} fitted in {t_fit:.1f} s ({fit_products} GGN products)")
    # pyDVL stops CG when ||r|| < rtol**2 * ||b|| (its tolerance test squares rtol), so rtol = sqrt(target)
    # asks for the target relative residual.
    cg = CgOperator(op, regularization=args.damping, rtol=float(np.sqrt(args.rtol)), atol=0.0,
                    maxiter=args.max_steps, preconditioner=pre)
    sums, means = fold_gradient_sums(model, x, y, folds)
    sample = np.linspace(0, len(folds) - 1, args.pydvl_solves).round().astype(int)
    rows = []
    for j in sample:
        b = sums[j] / n
        before = ggn.num_products
        t0 = time.perf_counter()
        sol = cg.apply(b).reshape(-1)
        t = time.perf_counter() - t0
        resid = float(torch.linalg.norm(b - ggn.apply_vec(sol) - args.damping * sol) / torch.linalg.norm(b))
        rows.append({"fold": int(j), "seconds": t, "iterations": ggn.num_products - before - 1,
                     "true_relative_residual": resid, "score": float(means[j] @ sol)})
        log(f"pyDVL fold {j}: {t:.1f} s, {rows[-1]['iterations']} iterations, true residual {resid:.2e}")
    per_solve = float(np.mean([r["seconds"] for r in rows]))
    return {"nystrom_rank": args.nystrom_rank, "fit_seconds": t_fit, "fit_products": fit_products,
            "solves_timed": len(rows), "seconds_per_solve": per_solve,
            "extrapolated_total_seconds": t_fit + per_solve * len(folds), "rows": rows}


def run_kronfluence(model, x, y, folds, args, log):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    logging.getLogger("kronfluence").setLevel(logging.WARNING)

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:  # the true Fisher (= the GGN of the cross-entropy in expectation)
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

    data = torch.utils.data.TensorDataset(x, y)
    task = ClassificationTask()
    model = prepare_model(model, task)
    out_dir = tempfile.mkdtemp(prefix="kronfluence-")
    try:
        analyzer = Analyzer(analysis_name="peers", model=model, task=task, cpu=True, output_dir=out_dir,
                            disable_tqdm=True)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
        torch.manual_seed(0)
        t0 = time.perf_counter()
        analyzer.fit_all_factors(factors_name="ekfac", dataset=data, per_device_batch_size=args.chunk,
                                 factor_args=FactorArguments(strategy="ekfac"))
        t_fit = time.perf_counter() - t0
        log(f"kronfluence EK-FAC factors in {t_fit:.1f} s")
        score_args = ScoreArguments(damping_factor=args.damping, aggregate_query_gradients=True,
                                    aggregate_train_gradients=True)
        n = x.shape[0]
        scores = []
        t0 = time.perf_counter()
        for j, f in enumerate(folds):
            analyzer.compute_pairwise_scores(scores_name=f"fold{j}", factors_name="ekfac", query_dataset=data,
                                                 train_dataset=data, per_device_query_batch_size=len(f),
                                                 per_device_train_batch_size=len(f), query_indices=[int(i) for i in f],
                                                 train_indices=[int(i) for i in f], score_args=score_args,
                                                 overwrite_output_dir=True)
            s = analyzer.load_pairwise_scores(scores_name=f"fold{j}")
            # sum_{q, i in S} g_q^T H^-1 g_i, scaled as our fold score (1 / (|S| N)) sum_{q, i in S} ...
            scores.append(float(s["all_modules"].sum()) / (len(f) * n))
        t_scores = time.perf_counter() - t0
        log(f"kronfluence fold scores in {t_scores:.1f} s")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"fit_seconds": t_fit, "scores_seconds": t_scores, "total_seconds": t_fit + t_scores, "scores": scores}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--nystrom-rank", type=int, default=200)
    p.add_argument("--pydvl-solves", type=int, default=3, help="fold solves timed, then extrapolated")
    p.add_argument("--chunk", type=int, default=1000)
    p.add_argument("--skip", nargs="*", default=[], choices=["pydvl", "kronfluence"])
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    def log(msg):
        print(f"[peers] {msg}", flush=True)

    ex = np.load(args.export)
    x = torch.from_numpy(np.ascontiguousarray(ex["x"].transpose(0, 3, 1, 2)))
    y = torch.from_numpy(ex["y"].astype(np.int64))
    folds = [ex["fold_index"][ex["fold_start"][j]:ex["fold_start"][j + 1]] for j in range(len(ex["fold_start"]) - 1)]
    model = load_model(ex)
    for prm in model.parameters():
        prm.requires_grad_(False)
    with torch.no_grad():
        logits = model(x[: ex["ref_logits"].shape[0]]).numpy()
    diff = float(np.max(np.abs(logits - ex["ref_logits"])))
    scale = float(np.max(np.abs(ex["ref_logits"])))
    log(f"logits agree to {diff:.2e} (max |logit| {scale:.1f})")
    if diff > 1e-4 * max(1.0, scale):
        raise SystemExit(f"the exported model does not reproduce our logits: max abs difference {diff:.3e}")
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "logits_max_abs_diff": diff,
           "max_abs_logit": scale, "num_params": int(sum(p.numel() for p in model.parameters()))}
    try:
        import pydvl
        out["pydvl"] = pydvl.__version__
    except Exception:
        pass
    try:
        import kronfluence
        out["kronfluence"] = kronfluence.__version__
    except Exception:
        pass
    if "pydvl" not in args.skip:
        out["pydvl_cg_nystrom"] = run_pydvl(model, x, y, folds, args, log)
    if "kronfluence" not in args.skip:
        out["kronfluence_ekfac"] = run_kronfluence(model, x, y, folds, args, log)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=2)
    log(f"wrote {args.output}")


if __name__ == "__main__":
    main()
