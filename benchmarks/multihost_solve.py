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
* with ``--problem small`` also runs ``cif_jax.influence`` sharded;
* solves the same systems alone on its own device (``mesh=None``): the reference.

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
    from cif_jax import data as cdata
    from cif_jax import models as cmodels
    from cif_jax import training
    from cif_jax.cli import TRAINING

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
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import cif_jax as cj

    me, count = jax.process_index(), jax.process_count()
    report = {"process": me, "processes": count, "devices": len(jax.devices()),
              "local_devices": len(jax.local_devices())}
    if args.problem == "small":
        task, ggn = small_problem()
        rhs = np.random.default_rng(1).normal(size=(args.num_rhs, task.num_params))
        damping, rtol, batch_size = SMALL_DAMPING, SMALL_RTOL, args.batch_size
    else:
        task, rhs = lenet_problem(args.num_rhs)
        ggn = None
        damping, rtol, batch_size = LENET_DAMPING, LENET_RTOL, args.batch_size
    settings = dict(damping=damping, rtol=rtol, batch_size=batch_size, warn=False)
    if args.num_rhs % count:
        raise SystemExit(f"--num-rhs {args.num_rhs} must be a multiple of the {count} processes.")

    # This process's rows only: the global (R, p) array is assembled from every process's part.
    mesh = cj.solver_mesh()
    per = args.num_rhs // count
    local_rows = rhs[me * per : (me + 1) * per].astype(np.dtype(task.dtype))
    global_rhs = jax.make_array_from_process_local_data(NamedSharding(mesh, P("rhs")), local_rows, rhs.shape)
    report["rhs_local_rows"] = [int(s.data.shape[0]) for s in global_rhs.addressable_shards]

    def timed(name, fn):
        """Runs ``fn``; records the first call (compilation included) and the median of the repeats."""
        start = time.perf_counter()
        out = fn()
        jax.block_until_ready(out.solutions)
        report[f"first_call_seconds_{name}"] = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn()
            jax.block_until_ready(out.solutions)
            times.append(time.perf_counter() - start)
        if times:
            report[f"seconds_{name}"] = float(np.median(times))
        return out

    sharded = timed("rhs_sharded", lambda: cj.solve_ggn(task, global_rhs, mesh=mesh, **settings))
    alone = timed("one_process", lambda: cj.solve_ggn(task, rhs, **settings))
    arrays = {"rhs_sharded": np.asarray(sharded.solutions), "alone": np.asarray(alone.solutions),
              "residuals_rhs_sharded": np.asarray(sharded.residuals), "residuals_alone": np.asarray(alone.residuals),
              "steps_rhs_sharded": np.asarray(sharded.num_steps), "steps_alone": np.asarray(alone.num_steps)}
    if not args.skip_data:
        data_mesh = cj.solver_mesh(data_shards=count)
        by_data = timed(
            "data_sharded", lambda: cj.solve_ggn(task, rhs, mesh=data_mesh, rhs_axis=None, data_axis="data", **settings))
        arrays["data_sharded"] = np.asarray(by_data.solutions)
        arrays["residuals_data_sharded"] = np.asarray(by_data.residuals)
    if args.problem == "small":
        arrays["dense"] = np.linalg.solve(ggn, rhs.T).T
        folds = [np.arange(q, SMALL_N, 5) for q in range(args.num_rhs)]
        kw = dict(damping=damping, rtol=rtol, batch_size=batch_size)
        start = time.perf_counter()
        arrays["influence_sharded"] = np.asarray(cj.influence(task, folds, mesh=mesh, **kw))
        arrays["influence_alone"] = np.asarray(cj.influence(task, folds, **kw))
        report["first_call_seconds_influence"] = time.perf_counter() - start
    np.savez(os.path.join(args.out, f"process{me}.npz"), **arrays)
    with open(os.path.join(args.out, f"process{me}.json"), "w") as f:
        json.dump(report, f)
    jax.distributed.shutdown()


# ----------------------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(problem: str = "small", *, num_rhs: int = 6, repeats: int = 0, skip_data: bool = False,
           batch_size: int | None = None, timeout: float = 300.0) -> dict:
    """Runs the two workers on this machine and compares their results; returns the summary."""
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
            if skip_data:
                cmd.append("--skip-data")
            if batch_size is not None:
                cmd += ["--batch-size", str(batch_size)]
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
            raise RuntimeError("worker(s) failed:\n" + "\n".join(f"process {i} (exit {rc}):\n{log}" for i, rc, log in failed))
        reports = [json.load(open(os.path.join(out, f"process{i}.json"))) for i in range(num_processes)]
        arrays = [dict(np.load(os.path.join(out, f"process{i}.npz"))) for i in range(num_processes)]
    first = arrays[0]
    summary = {
        "problem": problem,
        "num_rhs": num_rhs,
        "processes": reports,
        "wall_seconds": wall,
        # Every process receives the whole result: the two copies must be the same array.
        "processes_agree": all(np.array_equal(a[k], first[k]) for a in arrays[1:] for k in first),
        "rhs_sharded_vs_alone": _rel_rows(first["rhs_sharded"], first["alone"]),
        "steps_rhs_sharded": first["steps_rhs_sharded"].tolist(),
        "steps_alone": first["steps_alone"].tolist(),
        "max_residual": float(max(first[k].max() for k in first if k.startswith("residuals"))),
    }
    if "data_sharded" in first:
        summary["data_sharded_vs_alone"] = _rel_rows(first["data_sharded"], first["alone"])
    if "dense" in first:
        summary["alone_vs_dense"] = _rel_rows(first["alone"], first["dense"])
        summary["rhs_sharded_vs_dense"] = _rel_rows(first["rhs_sharded"], first["dense"])
        summary["data_sharded_vs_dense"] = _rel_rows(first["data_sharded"], first["dense"])
        summary["influence_sharded_vs_alone"] = _rel_rows(first["influence_sharded"], first["influence_alone"])
    return summary


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", choices=("small", "lenet"), default="small")
    parser.add_argument("--num-rhs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=0, help="timed repetitions after a warm-up (0: one run)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per chunk of a GGN product")
    parser.add_argument("--skip-data", action="store_true", help="skip the run with examples sharded")
    parser.add_argument("--tolerance", type=float, default=1e-8,
                        help="largest relative difference accepted between sharded and one-process solutions")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    summary = launch(args.problem, num_rhs=args.num_rhs, repeats=args.repeats, skip_data=args.skip_data,
                     batch_size=args.batch_size)
    print(json.dumps(summary, indent=1))
    diffs = [v for k, v in summary.items() if k.endswith("_vs_alone")]
    if not summary["processes_agree"] or max(diffs) > args.tolerance:
        print(f"MISMATCH: sharded results differ from one process by more than {args.tolerance:g}", file=sys.stderr)
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
