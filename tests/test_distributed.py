"""Sharded solves (cif_jax.solvers.distributed): forced host devices and two processes against one device.

The multi-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count``
before jax starts, and the multi-process ones ``jax.distributed.initialize``, so
both run in subprocesses (tests/_distributed_check.py and
benchmarks/multihost_solve.py) that report differences as JSON; the assertions
are here. References: the single-device solves of the same systems and the dense
solves of tests/_models.py.
"""

import importlib
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from _models import LAM, NUM_CLUSTERS, RTOL, SKETCH_DIM, softmax_problem
from jax.sharding import Mesh

import cif_jax as cj
from cif_jax.solvers import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: As tests/test_precondition.py: float64 CG to RTOL = 1e-12 on condition numbers <= ~500.
SOLVE_TOL = 1e-9


def _one_device_mesh(name="rhs"):
    return Mesh(np.array(jax.devices()[:1]), (name,))


# -- validation, before any work ----------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Every solve, data pass and the sharded solve fail the test if they start."""

    def forbidden(*args, **kwargs):
        raise AssertionError("expensive work started before the input was validated")

    for module, names in {
        "cif_jax.solvers.solve": ("_solve_block",),
        "cif_jax.solvers.distributed": ("solve_rows", "_sharded_block"),
        "cif_jax.cif.cache": ("_sketch_pass", "_means_pass", "nystrom_preconditioner"),
        "cif_jax.solvers.precondition": ("auto_nystrom", "_products"),
    "cif_jax.solvers.jacobi": ("build_jacobi",),
        "cif_jax.cif.correction": ("_terms_pass",),
        "cif_jax.estimators.influence": ("gradient_sums_pass",),
    }.items():
        mod = importlib.import_module(module)
        for name in names:
            monkeypatch.setattr(mod, name, forbidden)


def _calls(task, rhs):
    """Every public entry point that takes ``mesh=``, with the given sharding keywords."""
    return [
        lambda **kw: cj.solve_ggn(task, rhs, damping=LAM, **kw),
        lambda **kw: cj.influence(task, [np.arange(3)], damping=LAM, **kw),
        lambda **kw: cj.influence_solve(task, [np.arange(3)], damping=LAM, **kw),
        lambda **kw: cj.build_cache(task, num_clusters=NUM_CLUSTERS, sketch_dim=SKETCH_DIM, damping=LAM,
                                    key=jax.random.key(0), **kw),
    ]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mesh="gpu"), TypeError, "must be a `jax.sharding.Mesh`"),
        (dict(mesh="named", names=("batch",)), ValueError, r"the mesh has axes \('batch',\).*'rhs'"),
    ],
)
def test_mesh_arguments_are_checked_before_any_work(no_work, kwargs, error, match):
    problem = softmax_problem()
    if kwargs.get("mesh") == "named":
        kwargs = dict(mesh=_one_device_mesh(kwargs["names"][0]))
    for call in _calls(problem.task, problem.grads[:2]):
        with pytest.raises(error, match=match):
            call(**kwargs)


def test_solver_mesh_shapes_and_checks():
    mesh = cj.solver_mesh()
    assert mesh.axis_names == ("rhs", "data")
    assert dict(mesh.shape) == {"rhs": len(jax.devices()), "data": 1}
    with pytest.raises(ValueError, match="must divide the number of devices"):
        cj.solver_mesh(data_shards=len(jax.devices()) + 1)


# -- layouts: every row and every example exactly once -------------------------------------------


@pytest.mark.parametrize("num, shards, block", [(5, 2, None), (5, 2, 2), (1, 2, None), (16, 4, 3), (7, 3, 1)])
def test_rhs_layout_places_every_row_once(num, shards, block):
    source, position, num_blocks, size = distributed._layout(num, shards, block)
    per = math.ceil(num / shards)
    assert source.shape == (num_blocks, shards * size)
    flat = source.reshape(-1)
    assert sorted(flat[flat >= 0].tolist()) == list(range(num))  # no row dropped, none twice
    np.testing.assert_array_equal(flat[position], np.arange(num))  # the inverse map
    # Device k holds the contiguous rows [k * per, (k + 1) * per): at most ceil(num / shards) each.
    by_device = source.reshape(num_blocks, shards, size).transpose(1, 0, 2).reshape(shards, -1)
    for k, rows in enumerate(by_device):
        real = rows[rows >= 0]
        np.testing.assert_array_equal(real, np.arange(k * per, min((k + 1) * per, num)))
    assert size <= (per if block is None else block)
    # As few blocks as `block` allows, and less padding per device than one block.
    assert num_blocks == (1 if block is None else math.ceil(per / block))
    assert num_blocks * size - per < num_blocks


@pytest.mark.parametrize("num, cap, want", [(50, 16, 13), (48, 16, 16), (5, 2, 2), (7, 3, 3), (10, None, 10),
                                            (3, 8, 3), (17, 16, 9)])
def test_balanced_blocks(num, cap, want):
    from cif_jax.solvers.cg import balanced_block

    assert balanced_block(num, cap) == want


@pytest.mark.parametrize("count, shards", [(47, 2), (48, 2), (5, 4), (4, 4), (15, 2), (1, 1)])
def test_example_layout_counts_every_example_once(count, shards):
    source, valid = distributed._example_layout(count, shards)
    per = math.ceil(count / shards)
    assert source.shape == valid.shape == (per * shards,)
    assert sorted(source[valid].tolist()) == list(range(count))  # none dropped, none twice
    assert np.all(source[~valid] == 0)  # pads repeat a real example (finite), at weight 0
    real_per_shard = valid.reshape(shards, per).sum(axis=1)
    assert real_per_shard.min() >= 1 and real_per_shard.max() - real_per_shard.min() <= 1


# -- two processes ---------------------------------------------------------------------------------


def _multiprocess_unsupported() -> str | None:
    """Why this platform cannot run multi-process CPU JAX, or None."""
    if sys.platform == "win32":
        return "jaxlib has no CPU collectives between processes on Windows"
    try:
        from jax._src.lib import _jax
    except ImportError:  # private layout changed: try anyway
        return None
    if not hasattr(_jax, "make_gloo_tcp_collectives"):
        return "this jaxlib was built without gloo CPU collectives"
    return None


@pytest.mark.skipif(_multiprocess_unsupported() is not None, reason=str(_multiprocess_unsupported()))
def test_two_processes_equal_one():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import multihost_solve
    finally:
        sys.path.pop(0)
    summary = multihost_solve.launch("small", num_rhs=6, timeout=400)
    for report in summary["processes"]:
        assert report["processes"] == 2 and report["devices"] == 2 and report["local_devices"] == 1
        assert report["rhs_local_rows"] == [3]  # each process held only its half of the systems
    assert summary["processes_agree"]  # both processes hold the same whole result
    # Systems over the processes, and examples over the processes (a psum through gloo).
    assert summary["rhs_sharded_vs_alone"] < SOLVE_TOL  # measured 0
    assert summary["data_sharded_vs_alone"] < SOLVE_TOL  # measured 8e-13
    for key in ("alone_vs_dense", "rhs_sharded_vs_dense", "data_sharded_vs_dense"):
        assert summary[key] < SOLVE_TOL  # measured <= 8.4e-13
    assert summary["max_residual"] <= multihost_solve.SMALL_RTOL


# -- several devices (subprocess) ------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _forced_devices_run():
    """Starts tests/_distributed_check.py at once, so that it runs beside the other tests here."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_distributed_check.py")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def forced_devices(_forced_devices_run):
    stdout, stderr = _forced_devices_run.communicate(timeout=600)
    assert _forced_devices_run.returncode == 0, stdout[-3000:] + stderr[-3000:]
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_subprocess_sees_four_devices(forced_devices):
    assert forced_devices["num_devices"] == 4


@pytest.mark.parametrize("case", ["rhs", "grid"])
def test_sharded_solves_equal_single_device_and_dense(forced_devices, case):
    """rhs: 5 systems over 2 devices in blocks of 2; grid: 2 x 2 devices (systems x examples), a
    curvature sample of 15 examples (uneven over 2 data shards) in chunks of 7, Jacobi preconditioner."""
    got = forced_devices
    assert got[f"{case}_vs_single"] < SOLVE_TOL  # measured <= 1.4e-13
    assert got[f"{case}_vs_dense"] < SOLVE_TOL  # measured <= 8.5e-13
    assert got[f"{case}_single_vs_dense"] < SOLVE_TOL
    assert got[f"{case}_converged"] and got[f"{case}_max_residual"] <= RTOL
    # Each system runs its own CG: iteration counts as on one device, up to rounding.
    assert np.max(np.abs(np.subtract(got[f"{case}_steps"], got[f"{case}_single_steps"]))) <= 3
    # Results come back whole, on the process's default device, like the single-device ones.
    assert got[f"{case}_on_default_device"]


def test_sharded_influence_equals_single_device_and_dense(forced_devices):
    assert forced_devices["influence_vs_single"] < SOLVE_TOL  # measured 0
    assert forced_devices["influence_vs_dense"] < SOLVE_TOL  # measured 3e-12


def test_sharded_cache_equals_the_plain_cache(forced_devices):
    """build_cache with the C = 5 solves over 2 devices: same clusters, same responses."""
    assert forced_devices["cache_same_assignments"]
    assert forced_devices["cache_vs_single"] < SOLVE_TOL
    assert forced_devices["cache_vs_dense"] < SOLVE_TOL
    assert forced_devices["cache_max_residual"] <= RTOL


def test_sharded_path_refuses_bad_input(forced_devices):
    assert "NaN or Inf for 1 row(s), e.g. [3]" in forced_devices["nan_refused"]
    assert "mesh axis 'model' has 2 devices but is neither" in forced_devices["unnamed_axis_refused"]
    # Two data shards need two examples: one would leave a shard with none.
    assert "has 2 devices but there are only 1 training examples" in forced_devices["too_few_examples_refused"]
