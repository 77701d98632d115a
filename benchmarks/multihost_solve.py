"""Sharded damped-GGN solves under multi-controller JAX: 2 local CPU processes against one.

Run ``python benchmarks/multihost_solve.py`` (no arguments): it starts two worker
processes of itself on this machine, each with one CPU device, joined by
``jax.distributed.initialize`` (gloo collectives), and checks that they give the
single-process results. Each worker

* holds only its half of the right-hand sides and builds the global (R, p) array
  with ``jax.make_array_from_process_local_data``, then solves with
  ``cif_jax.solve_ggn(..., mesh=cif_jax.solver_mesh())`` (systems spread over the
  two processes, no communication during CG);
* solves again with the examples spread over the processes
  (``solver_mesh(data_shards=2)``, ``data_axis="data"``: the GGN products are summed
  across processes by a ``psum`` every CG step), the right-hand sides given whole;
* process 0 then solves the same systems alone on its own device (``mesh=None``):
  the reference.

The launcher compares the workers' results with each other and with the
references and prints a JSON summary (exit status 1 on a mismatch). ``--problem
small`` is a float64 tanh MLP with a dense GGN reference built here from explicit
Jacobians; ``--problem lenet`` is LeNet-5 on scikit-learn's digits (float32),
timed, for ``benchmarks/bench_sharding.py``.

On a cluster the workers are started by the scheduler instead (see README,
"Scaling out"); ``--worker`` with ``--coordinator``, ``--num-processes`` and
``--process-id`` is that entry point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL_N, SMALL_IN, SMALL_HIDDEN, SMALL_CLASSES = 47, 5, 8, 3  # N odd: the data shards are uneven
SMALL_DAMPING, SMALL_RTOL = 1e-2, 1e-12
LENET_DAMPING, LENET_RTOL = 1e-3, 1e-3


# ----------------------------------------------------------------------------------------- problems


def _small_apply(params, x):
    import jax.numpy as jnp

    return jnp.tanh(x @ params["w1"] + params["b1"][None, :]) @ params["w2"] + params["b2"][None, :]


def _cross_entropy(outputs, targets):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)


def small_problem():
    """A float64 tanh-MLP task and its dense damped GGN, from explicit Jacobians (no cif_jax products)."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import cif_jax as cj

    rng = np.random.default_rng(0)
    x = rng.normal(size=(SMALL_N, SMALL_IN))
    y = rng.integers(0, SMALL_CLASSES, SMALL_N).astype(np.int32)
    params = {
        "w1": rng.normal(size=(SMALL_IN, SMALL_HIDDEN)) / np.sqrt(SMALL_IN),
        "b1": 0.1 * rng.normal(size=SMALL_HIDDEN),
        "w2": rng.normal(size=(SMALL_HIDDEN, SMALL_CLASSES)) / np.sqrt(SMALL_HIDDEN),
        "b2": 0.1 * rng.normal(size=SMALL_CLASSES),
    }
    params = jax.tree_util.tree_map(jnp.asarray, params)
    task = cj.Task(_small_apply, _cross_entropy, params, jnp.asarray(x), jnp.asarray(y))

    flat, unravel = ravel_pytree(params)
    out = lambda fl, xi: _small_apply(unravel(fl), xi[None])[0]
    jac = np.asarray(jax.vmap(jax.jacfwd(out), in_axes=(None, 0))(flat, jnp.asarray(x)))  # (N, q, p)
    logits = np.asarray(jax.vmap(out, in_axes=(None, 0))(flat, jnp.asarray(x)))
    s = np.exp(logits - logits.max(axis=1, keepdims=True))
    s /= s.sum(axis=1, keepdims=True)
    hess = np.einsum("nq,qr->nqr", s, np.eye(SMALL_CLASSES)) - np.einsum("nq,nr->nqr", s, s)
    ggn = np.einsum("nqi,nqr,nrj->ij", jac, hess, jac) / SMALL_N + SMALL_DAMPING * np.eye(flat.size)
    return task, ggn


def lenet_problem(num_rhs: int, seed: int = 0):
    """LeNet-5 on scikit-learn's digits (N = 1,438), trained as ``cif-jax cv`` does; fold gradient sums."""
    import optax

    import cif_jax as cj
    from cif_jax.workloads import data as cdata
    from cif_jax.workloads import models as cmodels
    from cif_jax.workloads import training
    from cif_jax.workloads.training import TRAINING

    ds = cdata.load_dataset("digits", seed=seed)
    config = cmodels.model_config("lenet5", in_shape=ds.x_train.shape[1:], num_classes=ds.num_classes)
    epochs, lr, schedule = TRAINING["digits"]
    ckpt = os.path.join(HERE, "_work", f"digits-lenet5-seed{seed}-e{epochs}.ckpt")
    if os.path.exists(ckpt):
        net = training.load_checkpoint(ckpt, config=config)
    else:
        net = cmodels.build_from_config(config, seed=seed)
        net, _ = training.train(net, ds.x_train, ds.y_train, epochs=epochs, learning_rate=lr, schedule=schedule,
                                seed=seed)
        if int(os.environ.get("CIF_JAX_PROCESS_ID", "0")) == 0:
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            training.save_checkpoint(ckpt, net, config=config, metadata={"epochs": epochs, "seed": seed})
    task = cj.Task.from_nnx(net, optax.softmax_cross_entropy_with_integer_labels, ds.x_train, ds.y_train)
    # The right-hand sides of per-query IF on K = 50 folds: gradient sums of random folds.
    n = task.num_examples
    rng = np.random.default_rng(seed)
    mask = np.zeros((num_rhs, n), bool)
    for q in range(num_rhs):
        mask[q, rng.choice(n, size=n // 50, replace=False)] = True
    return task, np.asarray(cj.subset_gradient_sums(task, mask, batch_size=256))


# ------------------------------------------------------------------------------------------- worker


def _rel_rows(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)))


def worker(args) -> None:
    import jax

    # CPU collectives between processes (the default CPU client has none): gloo ships with jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.problem == "small":
        jax.config.update("jax_enable_x64", True)
    if args.coordinator is None:  # on a cluster: SLURM, Open MPI or a TPU pod slice tell JAX who is who
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import cif_jax as cj

    me, count = jax.process_index(), jax.process_count()
    report = {"process": me, "processes": count, "devices": len(jax.devices()),
              "local_devices": len(jax.local_devices())}
    if args.problem == "small":
        task, ggn = small_problem()
        rhs = np.random.default_rng(1).normal(size=(args.num_rhs, task.num_params))
        damping, rtol = SMALL_DAMPING, SMALL_RTOL
    else:
        task, rhs = lenet_problem(args.num_rhs)
        ggn = None
        damping, rtol = LENET_DAMPING, LENET_RTOL
    damping = damping if args.damping is None else args.damping
    rtol = rtol if args.rtol is None else args.rtol
    batch_size, max_steps = args.batch_size, args.max_steps
    settings = dict(damping=damping, batch_size=batch_size, warn=False)
    if args.num_rhs % count:
        raise SystemExit(f"--num-rhs {args.num_rhs} must be a multiple of the {count} processes.")

    # This process's rows only: the global (R, p) array is assembled from every process's part.
    mesh = cj.solver_mesh()
    per = args.num_rhs // count
    local_rows = rhs[me * per : (me + 1) * per].astype(np.dtype(task.dtype))
    global_rhs = jax.make_array_from_process_local_data(NamedSharding(mesh, P("rhs")), local_rows, rhs.shape)
    report["rhs_local_rows"] = [int(s.data.shape[0]) for s in global_rhs.addressable_shards]

    def timed_run(name, fn):
        """``fn(max_steps)`` once with one CG step (compiles: the settings are traced), then timed."""
        jax.block_until_ready(fn(1).solutions)
        times = []
        for _ in range(max(args.repeats, 1)):
            start = time.perf_counter()
            out = fn(max_steps)
            jax.block_until_ready(out.solutions)
            times.append(time.perf_counter() - start)
        report[f"seconds_{name}"] = float(np.median(times))
        report[f"steps_{name}"] = np.asarray(out.num_steps).tolist()
        return out

    sharded = timed_run("rhs_sharded", lambda k: cj.solve_ggn(task, global_rhs, mesh=mesh, solver=cj.CG(rtol=rtol, max_steps=k, preconditioner=None), **settings))
    arrays = {"rhs_sharded": np.asarray(sharded.solutions), "residuals_rhs_sharded": np.asarray(sharded.residuals)}
    if not args.skip_data:
        data_mesh = cj.solver_mesh(data_shards=count)
        by_data = timed_run("data_sharded", lambda k: cj.solve_ggn(task, rhs, mesh=data_mesh, solver=cj.CG(rtol=rtol, max_steps=k, preconditioner=None), **settings))
        arrays["data_sharded"] = np.asarray(by_data.solutions)
        arrays["residuals_data_sharded"] = np.asarray(by_data.residuals)
    if not args.skip_alone and me == 0:  # the reference: one process alone, on its own device
        alone = timed_run("one_process", lambda k: cj.solve_ggn(task, rhs, solver=cj.CG(rtol=rtol, max_steps=k, preconditioner=None), **settings))
        arrays["alone"] = np.asarray(alone.solutions)
        arrays["residuals_alone"] = np.asarray(alone.residuals)
    if args.problem == "small" and "alone" in arrays:
        arrays["dense"] = np.linalg.solve(ggn, rhs.T).T
    np.savez(os.path.join(args.out, f"process{me}.npz"), **arrays)
    with open(os.path.join(args.out, f"process{me}.json"), "w") as f:
        json.dump(report, f)
    jax.distributed.shutdown()


# ----------------------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(problem: str = "small", *, num_rhs: int = 6, repeats: int = 1, skip_data: bool = False,
           skip_alone: bool = False, batch_size: int | None = None, damping: float | None = None,
           rtol: float | None = None, max_steps: int = 1000, timeout: float = 300.0, keep_arrays: bool = False) -> dict:
    """Runs the two workers on this machine and compares their results; returns the summary.

    ``keep_arrays``: also return process 0's arrays (solutions, residuals) under ``"arrays"``.
    """
    num_processes = 2
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)  # one CPU device per process
        env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
        coordinator = f"127.0.0.1:{_free_port()}"
        procs = []
        for i in range(num_processes):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--coordinator", coordinator,
                   "--num-processes", str(num_processes), "--process-id", str(i), "--out", out, "--problem", problem,
                   "--num-rhs", str(num_rhs), "--repeats", str(repeats)]
            cmd += ["--skip-data"] if skip_data else []
            cmd += ["--skip-alone"] if skip_alone else []
            cmd += [] if batch_size is None else ["--batch-size", str(batch_size)]
            cmd += [] if damping is None else ["--damping", repr(damping)]
            cmd += [] if rtol is None else ["--rtol", repr(rtol)]
            cmd += ["--max-steps", str(max_steps)]
            procs.append(subprocess.Popen(cmd, env=dict(env, CIF_JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        start = time.perf_counter()
        logs = []
        for proc in procs:
            try:
                logs.append(proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))[0])
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                raise RuntimeError(f"the workers did not finish within {timeout:.0f} s") from None
        wall = time.perf_counter() - start
        failed = [(i, p.returncode, log[-3000:]) for i, (p, log) in enumerate(zip(procs, logs)) if p.returncode]
        if failed:
            details = "\n".join(f"process {i} (exit {rc}):\n{log}" for i, rc, log in failed)
            raise RuntimeError("worker(s) failed:\n" + details)
        reports = [json.load(open(os.path.join(out, f"process{i}.json"))) for i in range(num_processes)]
        arrays = [dict(np.load(os.path.join(out, f"process{i}.npz"))) for i in range(num_processes)]
    first = arrays[0]
    summary = {
        "problem": problem,
        "num_rhs": num_rhs,
        "processes": reports,
        "wall_seconds": wall,
        # Every process receives the whole result: the copies must be the same array.
        "processes_agree": all(np.array_equal(a[k], first[k]) for a in arrays[1:] for k in a),
        "max_residual": float(max(first[k].max() for k in first if k.startswith("residuals"))),
    }
    pairs = [("rhs_sharded", "alone"), ("data_sharded", "alone"), ("alone", "dense"), ("rhs_sharded", "dense"),
             ("data_sharded", "dense")]
    for a, b in pairs:
        if a in first and b in first:
            summary[f"{a}_vs_{b}"] = _rel_rows(first[a], first[b])
    if keep_arrays:
        summary["arrays"] = first
    return summary


def main(argv: list[str] | None = None) -> dict | None:
    """The command line; ``argv`` None means the defaults, not ``sys.argv``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", choices=("small", "lenet"), default="small")
    parser.add_argument("--num-rhs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after a one-step warm-up (median)")
    parser.add_argument("--damping", type=float, default=None)
    parser.add_argument("--rtol", type=float, default=None)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--skip-alone", action="store_true", help="skip the one-process reference solve")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per chunk of a GGN product")
    parser.add_argument("--skip-data", action="store_true", help="skip the run with examples sharded")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest relative difference accepted between sharded and one-process solutions "
                             "(default 1e-8 for the float64 small problem; lenet: reported, not checked)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--out", default=".")
    args = parser.parse_args([] if argv is None else argv)
    if args.worker:
        worker(args)
        return None
    summary = launch(args.problem, num_rhs=args.num_rhs, repeats=args.repeats, skip_data=args.skip_data,
                     skip_alone=args.skip_alone, batch_size=args.batch_size, damping=args.damping, rtol=args.rtol,
                     max_steps=args.max_steps)
    print(json.dumps(summary, indent=1))
    tolerance = args.tolerance if args.tolerance is not None else (1e-8 if args.problem == "small" else math.inf)
    diffs = [v for k, v in summary.items() if k.endswith("_vs_alone")]
    if not summary["processes_agree"] or max(diffs, default=0.0) > tolerance:
        print(f"MISMATCH: the processes disagree, or sharded results differ from one process by more than "
              f"{tolerance:g}", file=sys.stderr)
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
