"""Solve time for a block of right-hand sides: one device vs 2 forced host devices vs 2 processes.

``python benchmarks/bench_sharding.py`` prints a JSON dict (``main()`` returns it).
The workload is per-query IF on LeNet-5 / scikit-learn digits (N = 1,438,
p = 19,754, float32; trained as ``cif-jax cv`` trains it): ``--num-rhs`` gradient
sums of random folds of N/50 examples, solved by ``cif_jax.solve_ggn`` at
damping 1e-3 to a true relative residual of 1e-3, GGN products in chunks of 512
examples. Configurations, each in a fresh process so that the device count is
set before jax starts:

* ``single``: one CPU device, all systems in one block (the plain path);
* ``devices_rhs`` / ``devices_data``: ``XLA_FLAGS=--xla_force_host_platform_device_count=2``,
  systems spread over the 2 devices (half each), or examples spread with a psum;
* ``processes_rhs`` / ``processes_data``: the same over 2 processes joined by
  ``jax.distributed.initialize`` (gloo), one CPU device each, via
  ``benchmarks/multihost_solve.py``.

Every configuration compiles with a one-step solve first (the solver settings are
traced, so the timed solve reuses the program), then times ``--repeats`` solves
(median). ``speedup_*`` is the single-device time over the configuration's time
(above 1: faster); ``speedup_per_iteration`` divides each time by the most CG
iterations any system took first (float32 rounding moves those counts between
layouts). ``vs_single`` is the largest relative difference of a solution
from the single-device one (both meet rtol, so differences of order rtol are
expected in float32). Forced host devices and processes share this machine's
cores: on a CPU that a single device already keeps busy, expect no speedup;
the figures show what the sharding costs, not what more hardware would give.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import multihost_solve  # noqa: E402


def _inner(args) -> None:
    """One configuration in this process; writes its timings and solutions."""
    import jax

    import cif_jax as cj

    task, rhs = multihost_solve.lenet_problem(args.num_rhs)
    settings = dict(damping=args.damping, batch_size=args.batch_size, warn=False)
    runs = {"single": {}}
    if args.inner == "devices":
        runs = {"rhs": dict(mesh=cj.solver_mesh())}
        if not args.skip_data:
            runs["data"] = dict(mesh=jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",)))
    report = {"devices": len(jax.devices())}
    arrays = {}
    for name, kw in runs.items():
        jax.block_until_ready(cj.solve_ggn(task, rhs, solver=cj.CG(rtol=args.rtol, max_steps=1, preconditioner=None), **settings, **kw).solutions)  # compile
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = cj.solve_ggn(task, rhs, solver=cj.CG(rtol=args.rtol, max_steps=args.max_steps, preconditioner=None), **settings, **kw)
            jax.block_until_ready(out.solutions)
            times.append(time.perf_counter() - start)
        report[f"seconds_{name}"] = float(np.median(times))
        report[f"steps_{name}"] = np.asarray(out.num_steps).tolist()
        report[f"max_residual_{name}"] = float(np.max(np.asarray(out.residuals)))
        arrays[name] = np.asarray(out.solutions)
    np.savez(args.out + ".npz", **arrays)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f)


def _run_inner(mode: str, args, out: str, devices: int) -> tuple[dict, dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--inner", mode, "--out", out, "--num-rhs", str(args.num_rhs),
           "--repeats", str(args.repeats), "--damping", repr(args.damping), "--rtol", repr(args.rtol),
           "--batch-size", str(args.batch_size), "--max-steps", str(args.max_steps)]
    cmd += ["--skip-data"] if args.skip_data else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"benchmark configuration {mode!r} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    with open(out + ".json") as f:
        report = json.load(f)
    return report, dict(np.load(out + ".npz"))


def _rel_rows(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-rhs", type=int, default=16, help="right-hand sides (even: halves per device)")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=512, help="examples per chunk of a GGN product")
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1, help="timed solves per configuration (median)")
    parser.add_argument("--skip-data", action="store_true", help="only spread the right-hand sides")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--inner", choices=("single", "devices"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark; ``argv`` as on the command line (None: the defaults, not ``sys.argv``)."""
    args = _parser().parse_args([] if argv is None else argv)
    if args.inner:
        _inner(args)
        return {}
    if args.num_rhs < 2 or args.num_rhs % 2:
        raise SystemExit("--num-rhs must be even (each of 2 devices or processes holds half).")
    from common import machine

    result = {
        "benchmark": "sharded solves: single device vs 2 forced host devices vs 2 processes",
        "workload": {"model": "lenet5", "dataset": "digits", "num_rhs": args.num_rhs, "damping": args.damping,
                     "rtol": args.rtol, "batch_size": args.batch_size, "dtype": "float32", "repeats": args.repeats},
        "machine": machine(),
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        single, single_x = _run_inner("single", args, os.path.join(tmp, "single"), 1)
        devices, devices_x = _run_inner("devices", args, os.path.join(tmp, "devices"), 2)
    procs = multihost_solve.launch("lenet", num_rhs=args.num_rhs, repeats=args.repeats, skip_data=args.skip_data,
                                   skip_alone=True, batch_size=args.batch_size, damping=args.damping,
                                   rtol=args.rtol, max_steps=args.max_steps, timeout=3600, keep_arrays=True)
    base = single["seconds_single"]
    seconds = {"single": base, "devices_rhs": devices["seconds_rhs"],
               "processes_rhs": procs["processes"][0]["seconds_rhs_sharded"]}
    solutions = {"devices_rhs": devices_x["rhs"], "processes_rhs": procs["arrays"]["rhs_sharded"]}
    steps = {"single": single["steps_single"], "devices_rhs": devices["steps_rhs"],
             "processes_rhs": procs["processes"][0]["steps_rhs_sharded"]}
    if not args.skip_data:
        seconds["devices_data"] = devices["seconds_data"]
        solutions["devices_data"] = devices_x["data"]
        steps["devices_data"] = devices["steps_data"]
        seconds["processes_data"] = procs["processes"][0]["seconds_data_sharded"]
        solutions["processes_data"] = procs["arrays"]["data_sharded"]
        steps["processes_data"] = procs["processes"][0]["steps_data_sharded"]
    result["seconds"] = seconds
    result["speedup"] = {k: base / v for k, v in seconds.items() if k != "single"}
    result["vs_single"] = {k: _rel_rows(v, single_x["single"]) for k, v in solutions.items()}
    result["max_steps_per_system"] = {k: int(max(v)) for k, v in steps.items()}
    # A block loops until its slowest system stops, and float32 rounding moves iteration counts
    # by several steps between layouts: per-iteration speedup factors that out.
    per_step = {k: seconds[k] / result["max_steps_per_system"][k] for k in seconds}
    result["speedup_per_iteration"] = {k: per_step["single"] / v for k, v in per_step.items() if k != "single"}
    result["processes_agree"] = procs["processes_agree"]
    result["total_seconds"] = time.perf_counter() - start
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
