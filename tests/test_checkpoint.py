"""Resumable cache builds and per-query IF runs (``checkpoint_dir=``).

The reference is an uninterrupted build without a directory: a resumed build must
equal it to the solver's tolerance (float64, rtol 1e-10, so 1e-8 relative on the
responses leaves room for the different blocking of one short block). A build
killed by SIGKILL in the middle of its solves (a child process that kills itself
right after a known block reaches the disk) must resume from the blocks it wrote,
without rewriting them.
"""

import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _checkpoint_setup import NUM_CLUSTERS, SOLVER, build
from _models import mlp_problem, rel_err

import cif_jax as cj
from cif_jax.core import checkpoint as ckpt_module
from cif_jax.solvers import solve as solve_module

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-8


@pytest.fixture(scope="module")
def reference():
    return build(None)


def _files(directory):
    return {name: (os.stat(os.path.join(directory, name)).st_mtime_ns, os.stat(os.path.join(directory, name)).st_ino)
            for name in sorted(os.listdir(directory))}


def _same_cache(got, want, tol=TOL):
    np.testing.assert_array_equal(got.assignments, want.assignments)
    np.testing.assert_array_equal(got.cluster_sizes, want.cluster_sizes)
    assert rel_err(got.means, want.means) < 1e-12
    assert rel_err(got.responses, want.responses) < tol
    assert rel_err(got.correction.values, want.correction.values) < tol
    assert float(got.correction.scale) == pytest.approx(float(want.correction.scale), rel=tol)
    assert rel_err(got.correction.remainder, want.correction.remainder) < tol
    # The factors and the per-example coordinates come from stored phases (or the same products): exact.
    np.testing.assert_array_equal(got.lowrank.basis, want.lowrank.basis)
    np.testing.assert_array_equal(got.lowrank.coords, want.lowrank.coords)
    np.testing.assert_array_equal(got.lowrank.tail_norms, want.lowrank.tail_norms)
    assert got.fingerprint == want.fingerprint and got.solver == want.solver
    assert np.all(np.asarray(got.residuals) <= SOLVER.rtol)


def test_checkpointed_build_equals_plain_and_second_call_only_reads(tmp_path, reference):
    first = build(tmp_path)
    _same_cache(first, reference)
    files = _files(tmp_path)
    blocks = [f for f in files if f.startswith("solves1-")]
    assert len(blocks) == 20, blocks  # 24 + 16 systems in blocks of 2
    # (plain CG is prepared already: no preconditioner phase)
    for phase in ("manifest.json", "sketch.npz", "kmeans.npz", "means.npz", "nystrom.npz", "terms.npz"):
        assert phase in files
    second = build(tmp_path)
    assert _files(tmp_path) == files  # nothing recomputed, nothing rewritten
    np.testing.assert_array_equal(second.responses, first.responses)
    np.testing.assert_array_equal(second.correction.values, first.correction.values)


def test_resume_recomputes_only_what_is_missing(tmp_path, reference):
    build(tmp_path)
    files = _files(tmp_path)
    removed = sorted(f for f in files if f.startswith("solves1-"))[-3:] + ["terms.npz"]
    for name in removed:
        os.remove(tmp_path / name)
    resumed = build(tmp_path)
    after = _files(tmp_path)
    assert set(after) == set(files)
    assert all(after[f] == files[f] for f in files if f not in removed)
    _same_cache(resumed, reference)


def test_killed_build_resumes_from_its_blocks(tmp_path, reference):
    run = subprocess.run([sys.executable, os.path.join(HERE, "_checkpoint_child.py"), str(tmp_path), "5"],
                         cwd=HERE, capture_output=True, text=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, (run.returncode, run.stdout, run.stderr[-2000:])
    files = _files(tmp_path)
    blocks = [f for f in files if f.startswith("solves1-")]
    assert len(blocks) == 5, files
    assert not [f for f in files if f.endswith(ckpt_module.TMP_SUFFIX)]
    resumed = build(tmp_path)
    after = _files(tmp_path)
    assert all(after[f] == files[f] for f in files)  # the killed run's files were read, not rewritten
    assert len([f for f in after if f.startswith("solves1-")]) == 20
    _same_cache(resumed, reference)


@pytest.mark.parametrize("change", ["num_clusters", "damping", "key", "correction", "solver", "task"])
def test_other_settings_or_task_are_refused_before_any_work(tmp_path, change):
    build(tmp_path, num_clusters=4, correction=None)
    before = _files(tmp_path)
    overrides = {"num_clusters": 4, "correction": None}
    if change == "num_clusters":
        overrides["num_clusters"] = 5
    elif change == "damping":
        overrides["damping"] = 2e-2
    elif change == "key":
        overrides["key"] = jax.random.key(4)
    elif change == "correction":
        overrides["correction"] = "exact"
    elif change == "solver":
        overrides["solver"] = cj.CG(rtol=1e-8, rhs_batch_size=2, preconditioner=None)
    with pytest.raises(cj.CheckpointError, match="differs in"):
        if change == "task":
            task = mlp_problem().task
            other = cj.Task(task.apply_fn, task.loss_fn, jax.tree_util.tree_map(lambda a: a * 1.01, task.params),
                            task.inputs, task.targets)
            cj.build_cache(other, num_clusters=4, sketch_dim=8, damping=1e-2, key=jax.random.key(3), solver=SOLVER,
                           correction=None, checkpoint_dir=tmp_path)
        else:
            build(tmp_path, **overrides)
    assert _files(tmp_path) == before


def test_foreign_or_damaged_directories_are_refused(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(cj.CheckpointError, match="not empty"):
        build(foreign, num_clusters=4, correction=None)
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(cj.CheckpointError, match="is a file"):
        build(a_file, num_clusters=4, correction=None)
    # A directory that cannot be created (its parent is a file): the library's error, naming the
    # argument, not a bare OSError (running as root, a read-only folder would not show it).
    with pytest.raises(cj.CheckpointError, match="`checkpoint_dir` .* cannot be written"):
        build(a_file / "sub", num_clusters=4, correction=None)
    good = tmp_path / "good"
    build(good, num_clusters=4, correction=None)
    path = good / "means.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["a00"] = arrays["a00"] + 1.0  # tampered values, old digests
    np.savez(path, **arrays)
    with pytest.raises(cj.CheckpointError, match="SHA-256"):
        build(good, num_clusters=4, correction=None)
    path.unlink()
    build(good, num_clusters=4, correction=None)  # the deleted phase is recomputed
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated zip
    with pytest.raises(cj.CheckpointError, match="cannot be read"):
        build(good, num_clusters=4, correction=None)


def test_influence_checkpoint_resumes_and_refuses_other_subsets(tmp_path):
    task = mlp_problem().task
    rng = np.random.default_rng(0)
    subsets = [rng.choice(48, size=5, replace=False) for _ in range(9)]
    solver = cj.CG(rtol=1e-10, rhs_batch_size=2, preconditioner=None)
    want = cj.influence(task, subsets, damping=1e-2, solver=solver)
    got = cj.influence(task, subsets, damping=1e-2, solver=solver, checkpoint_dir=tmp_path)
    assert rel_err(got, want) < TOL
    files = _files(tmp_path)
    assert len([f for f in files if f.startswith("solves-")]) == 5 and "sums.npz" in files
    os.remove(tmp_path / sorted(f for f in files if f.startswith("solves-"))[-1])
    again = cj.influence_solve(task, subsets, damping=1e-2, solver=solver, checkpoint_dir=tmp_path)
    assert rel_err(again.solutions, want) < TOL and bool(jnp.all(again.converged))
    with pytest.raises(cj.CheckpointError, match="subsets"):
        cj.influence(task, subsets[:8], damping=1e-2, solver=solver, checkpoint_dir=tmp_path)


def test_auto_preconditioner_is_saved_and_restored(tmp_path, monkeypatch):
    task = mlp_problem().task
    rng = np.random.default_rng(1)
    subsets = [rng.choice(48, size=4, replace=False) for _ in range(12)]
    solver = cj.CG(rtol=1e-10, rhs_batch_size=4, preconditioner="nystrom", max_rank=16)
    first = cj.influence_solve(task, subsets, damping=1e-2, solver=solver, checkpoint_dir=tmp_path)
    saved = ckpt_module.Checkpoint(tmp_path, kind="influence", settings=_settings_of(tmp_path)).load("preconditioner")
    assert "field_basis" in saved and str(saved["__choice__"])
    for f in os.listdir(tmp_path):
        if f.startswith("solves-"):
            os.remove(tmp_path / f)

    def no_build(*args, **kwargs):
        raise AssertionError("the preconditioner was rebuilt instead of read back")

    monkeypatch.setitem(solve_module.BUILDERS, "nystrom", no_build)
    second = cj.influence_solve(task, subsets, damping=1e-2, solver=solver, checkpoint_dir=tmp_path)
    # The same preconditioner read back: the same iterations, the same solutions.
    np.testing.assert_array_equal(second.num_steps, first.num_steps)
    assert rel_err(second.solutions, first.solutions) < 1e-12


def _settings_of(directory):
    import json

    with open(os.path.join(directory, "manifest.json")) as f:
        return json.load(f)["settings"]


def test_checkpointed_build_counts_blocks_of_the_solver(tmp_path):
    cache = build(tmp_path, num_clusters=NUM_CLUSTERS, correction=None,
                  solver=cj.CG(rtol=1e-10, rhs_batch_size=5, preconditioner=None))
    blocks = sorted(f.rsplit("-", 1)[0] for f in os.listdir(tmp_path) if f.startswith("solves1-"))
    # 24 systems with at most 5 per block: four blocks of 5 and one of 4 (each name ends with its inputs' digest).
    assert blocks == [f"solves1-{a:07d}-{b:07d}" for a, b in ((0, 5), (5, 10), (10, 15), (15, 20), (20, 24))]
    assert cache.responses.shape[0] == NUM_CLUSTERS


def test_exact_correction_resumes_across_a_change_of_batch_size(tmp_path):
    """The exact correction groups its per-example systems by ``batch_size``; a resume with another
    batch size must not read blocks of other examples (block names carry their inputs' digest)."""
    want = build(None, num_clusters=6, correction="exact")
    build(tmp_path, num_clusters=6, correction="exact", batch_size=16)
    got = build(tmp_path, num_clusters=6, correction="exact", batch_size=None)
    assert rel_err(got.correction.values, want.correction.values) < TOL
    assert rel_err(got.responses, want.responses) < TOL


def test_a_mesh_over_several_processes_is_refused():
    class Device:
        def __init__(self, i):
            self.process_index = i

    class Mesh:
        devices = np.array([Device(0), Device(1)])

    from cif_jax.solvers import distributed

    with pytest.raises(ValueError, match="several processes"):
        distributed.check_single_process(Mesh())
