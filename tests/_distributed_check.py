"""Sharded solves on forced host devices, run by tests/test_distributed.py in a subprocess.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax
starts, so this runs in its own process; it prints one JSON object with the
largest relative differences between the sharded results, the single-device
results and the dense references of tests/_models.py. The test file asserts
on them.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import (  # noqa: E402
    BATCH,
    LAM,
    RHS_BATCH,
    RTOL,
    SKETCH_DIM,
    dense_influence,
    dense_means,
    dense_solve,
    masks_of,
    mlp_problem,
    random_subsets,
    row_rel_err,
)

import cif_jax as cj  # noqa: E402

#: A curvature sample of 15 examples: uneven over 2 data shards.
SAMPLE_IDX = np.arange(1, 46, 3)
SAMPLE_W = np.linspace(0.5, 2.0, SAMPLE_IDX.size)


def _solve(task, rhs, *, rhs_batch_size=None, preconditioner=None, **kw):
    return cj.solve_ggn(task, rhs, damping=LAM, solver=cj.CG(rtol=RTOL, rhs_batch_size=rhs_batch_size,
                                                             preconditioner=preconditioner), **kw)


def _compare(out, sharded, single, dense, prefix):
    out[f"{prefix}_vs_single"] = row_rel_err(sharded.solutions, single.solutions)
    out[f"{prefix}_vs_dense"] = row_rel_err(sharded.solutions, dense)
    out[f"{prefix}_single_vs_dense"] = row_rel_err(single.solutions, dense)
    out[f"{prefix}_max_residual"] = float(np.max(np.asarray(sharded.residuals)))
    out[f"{prefix}_converged"] = bool(np.all(np.asarray(sharded.converged)))
    out[f"{prefix}_steps"] = np.asarray(sharded.num_steps).tolist()
    out[f"{prefix}_single_steps"] = np.asarray(single.num_steps).tolist()
    out[f"{prefix}_on_default_device"] = sharded.solutions.devices() == {jax.local_devices()[0]}


def main() -> dict:
    devices = jax.devices()
    out = {"num_devices": len(devices)}
    problem = mlp_problem()
    task = problem.task
    rng = np.random.default_rng(3)
    rhs = rng.normal(size=(5, problem.num_params))  # 5 systems on 2 devices: 3 + 2, then blocks of 2
    rhs_mesh = Mesh(np.array(devices[:2]), ("rhs",))
    data_mesh = Mesh(np.array(devices[:2]), ("data",))

    # 1. Right-hand sides over 2 devices, 2 systems per device per call (padding at both levels).
    single = _solve(task, rhs, rhs_batch_size=RHS_BATCH)
    sharded = _solve(task, rhs, rhs_batch_size=RHS_BATCH, mesh=rhs_mesh)
    _compare(out, sharded, single, dense_solve(problem.ggn, rhs), "rhs")

    # 2. Per-query IF with the Q systems over the devices (same compiled solves as 1).
    subsets = random_subsets()
    want = dense_influence(problem, masks_of(subsets))
    got = cj.influence(task, subsets, damping=LAM, solver=cj.CG(rtol=RTOL, rhs_batch_size=RHS_BATCH), mesh=rhs_mesh, progress=True)
    ref = cj.influence(task, subsets, damping=LAM, solver=cj.CG(rtol=RTOL, rhs_batch_size=RHS_BATCH))
    out["influence_vs_single"] = row_rel_err(got, ref)
    out["influence_vs_dense"] = row_rel_err(got, want)

    # 3. The cache: the C = 5 cluster solves over 2 devices (same compiled solves as 1).
    kw = dict(num_clusters=5, sketch_dim=SKETCH_DIM, damping=LAM, key=jax.random.key(0),
              solver=cj.CG(rtol=RTOL, rhs_batch_size=RHS_BATCH))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="one cluster holds", category=UserWarning)
        plain = cj.build_cache(task, **kw)
        sharded = cj.build_cache(task, mesh=rhs_mesh, **kw)
    out["cache_same_assignments"] = bool(np.array_equal(np.asarray(plain.assignments),
                                                        np.asarray(sharded.assignments)))
    out["cache_vs_single"] = row_rel_err(sharded.responses, plain.responses)
    out["cache_vs_dense"] = row_rel_err(sharded.responses,
                                        dense_solve(problem.ggn, dense_means(problem.grads, sharded.assignments, 5)))
    out["cache_max_residual"] = float(np.max(np.asarray(sharded.residuals)))

    # 4. A 2 x 2 mesh (systems x examples) with a curvature sample of 15 (8 + 7 and a zero-weight pad,
    # in chunks of 7) and the Jacobi preconditioner: the two rhs groups loop independently while each
    # psums within its own data group.
    sample = cj.CurvatureSample(jnp.asarray(SAMPLE_IDX), jnp.asarray(SAMPLE_W))
    ggn_s = np.einsum("n,nqi,nqr,nrj->ij", SAMPLE_W, problem.jac[SAMPLE_IDX], problem.out_hess[SAMPLE_IDX],
                      problem.jac[SAMPLE_IDX]) / SAMPLE_W.sum() + LAM * np.eye(problem.num_params)
    pre = cj.jacobi_preconditioner(cj.DampedGGN(task, damping=LAM, curvature=sample))
    grid = Mesh(np.array(devices[:4]).reshape(2, 2), ("rhs", "data"))
    single = _solve(task, rhs, curvature=sample, preconditioner=pre, batch_size=BATCH)
    sharded = _solve(task, rhs, curvature=sample, preconditioner=pre, batch_size=BATCH, mesh=grid)
    _compare(out, sharded, single, dense_solve(ggn_s, rhs), "grid")

    # 5. A right-hand side of NaNs is refused on the sharded path too.
    bad = rhs.copy()
    bad[3, 0] = np.nan
    try:
        _solve(task, bad, mesh=rhs_mesh)
        out["nan_refused"] = ""
    except ValueError as err:
        out["nan_refused"] = str(err)

    # 6. A mesh axis of 2 devices named neither "rhs" nor "data" is refused.
    try:
        _solve(task, rhs, mesh=Mesh(np.array(devices[:4]).reshape(2, 2), ("rhs", "model")))
        out["unnamed_axis_refused"] = ""
    except ValueError as err:
        out["unnamed_axis_refused"] = str(err)
    one = cj.Task(task.apply_fn, task.loss_fn, task.params, task.inputs[:1], task.targets[:1])
    try:
        _solve(one, rhs, mesh=data_mesh)
        out["too_few_examples_refused"] = ""
    except ValueError as err:
        out["too_few_examples_refused"] = str(err)
    return out


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missed tolerance must not pass silently
        result = main()
    print("RESULT " + json.dumps(result))
