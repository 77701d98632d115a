"""The CiF influence cache: offline phases I and II of the paper (section 3.3).

Phase I streams per-example gradients in chunks: each chunk is sketched with the
Gaussian JL map (eq. 5) as it is produced, the N sketches are clustered by
k-means (eq. 6), and two more streamed passes give the full-space cluster means
(eq. 7) by segment sums and the within-cluster scatter tr(Sigma_bar) (eq. 15).
The (N, p) gradient matrix is never held: memory is O(C p + B p + N d).
Phase II solves the C damped-GGN systems ``H~ v_c = mu_c`` (eq. 8) and records
their true residuals (eq. 9).
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, UInt

from ..core import checkpoint as _checkpoint
from ..core import checks as _checks
from ..core.gradients import raise_on_bad, streamed_map, streamed_sum
from ..core.phases import PhaseRunner
from ..core.task import Task
from ..solvers import distributed as _distributed
from ..solvers.operator import DampedGGN
from ..solvers.precondition import NystromPreconditioner, block_error_estimate, nystrom_preconditioner
from ..solvers.sampled import choose_factor_build, sampled_preconditioner
from ..solvers.solve import AbstractSolver, prepare_checkpointed, solve_checkpointed
from ..solvers.solve import check_solver as _check_solver
from . import correction as _correction
from . import lowrank as _lowrank
from .correction import AbstractCorrection, CorrectionTerms
from .kmeans import kmeans_fit
from .lowrank import LowRankTerms
from .sketch import DEFAULT_BLOCK_SIZE
from .sketch import sketch as _sketch_rows

#: A cluster holding more than this share of the examples triggers a warning (C > 2).
DOMINANT_CLUSTER_SHARE = 0.5
#: Sketches (N x d) larger than this warn before any work: they stay in memory with the cache.
SKETCH_WARN_BYTES = 2 * 2**30


class InfluenceCache(eqx.Module):
    """A reusable CiF cache (paper section 3.3).

    Array fields (C clusters, N examples, p parameters, d sketch dimension):

    Attributes:
        assignments: (N,) cluster index c(i) of every training example.
        cluster_sizes: (C,) n_c.
        responses: (C, p) v_c, the damped-GGN solves ``H~ v_c = mu_c`` (eq. 8).
        means: (C, p) mu_c, the full-space cluster mean gradients (eq. 7).
        residuals: (C,) rho_c, true relative residuals ``||mu_c - H~ v_c|| / ||mu_c||`` (eq. 9).
        mean_norms: (C,) ||mu_c||.
        num_steps: (C,) CG iterations per cluster.
        cluster_scatter: (C,) ``sum_{i in c} ||g_i - mu_c||^2``.
        scatter_trace: () tr(Sigma_bar) = (1/N) sum_i ||g_i - mu_c(i)||^2 (eq. 15).
        deviation_norms: (N,) ||g_i - mu_c(i)||.
        sketches: (N, d) the JL sketches h_i = Pi g_i (eq. 5) that were clustered.
        centroids: (C, d) k-means centroids in sketch space.
        sketch_key: the raw key data of the JL projection's PRNG key.

    Static fields: ``num_examples``, ``damping``, ``sketch_dim``, ``sketch_block_size``,
    ``normalize_sketches``, solver settings ``rtol``, ``atol``, ``max_steps``,
    ``fingerprint`` (of the params and data it was built from), ``curvature``
    (``"full"`` or the identifier of the :class:`cif_jax.CurvatureSample` whose GGN
    the responses solve), ``timings`` (pairs ``(phase, seconds)``) and ``solver``
    (``"cg"``, or the description of the :class:`cif_jax.LiSSA` that solved).

    ``correction`` holds the per-example self-influence scalars ``t_i`` of
    :mod:`cif_jax.cif.correction` (a :class:`cif_jax.CorrectionTerms`), or None when the
    cache was built with ``correction=None``. ``lowrank`` holds the rank-r factors of the
    GGN and every example's coordinates in them (a :class:`cif_jax.LowRankTerms`), with
    which the default estimator answers queries whose evaluation set is not the removed
    set (:mod:`cif_jax.cif.lowrank`); None when no factors were built (rank 0).
    """

    assignments: Int[Array, " n"]
    cluster_sizes: Int[Array, " c"]
    responses: Float[Array, "c p"]
    means: Float[Array, "c p"]
    residuals: Float[Array, " c"]
    mean_norms: Float[Array, " c"]
    num_steps: Int[Array, " c"]
    cluster_scatter: Float[Array, " c"]
    scatter_trace: Float[Array, ""]
    deviation_norms: Float[Array, " n"]
    sketches: Float[Array, "n d"]
    centroids: Float[Array, "c d"]
    sketch_key: UInt[Array, ...]
    num_examples: int = eqx.field(static=True)
    damping: float = eqx.field(static=True)
    sketch_dim: int = eqx.field(static=True)
    sketch_block_size: int = eqx.field(static=True)
    normalize_sketches: bool = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    fingerprint: str = eqx.field(static=True)
    curvature: str = eqx.field(static=True)
    timings: tuple = eqx.field(static=True)
    solver: str = eqx.field(static=True, default="cg")
    correction: CorrectionTerms | None = None
    lowrank: LowRankTerms | None = None

    @property
    def num_clusters(self) -> int:
        """C."""
        return self.responses.shape[0]

    @property
    def num_params(self) -> int:
        """p."""
        return self.responses.shape[1]

    @property
    def timing(self) -> dict[str, float]:
        """Phase timings in seconds as a dict."""
        return dict(self.timings)

    def nystrom(self) -> NystromPreconditioner | None:
        """The cache's low-rank factors as a :class:`cif_jax.NystromPreconditioner` (None without factors).

        Pass it as ``cif_jax.CG(preconditioner=cache.nystrom())`` to precondition other solves of
        the same operator (per-query IF on the same task) with the factors the cache built.
        """
        low = self.lowrank
        if low is None:
            return None
        return NystromPreconditioner(basis=low.basis, eigenvalues=low.eigenvalues, error_estimate=low.error_estimate,
                                     fingerprint=self.fingerprint, curvature=self.curvature, num_products=0,
                                     seconds=self.timing.get("nystrom", 0.0), note=low.note)


@eqx.filter_jit
def _sketch_pass(task, key, sketch_dim, block_size, batch_size):
    def fn(g, _):
        return _sketch_rows(g, key, sketch_dim, block_size=block_size)

    return streamed_map(task, fn, jnp.zeros(task.num_examples, jnp.int8), batch_size)


@eqx.filter_jit
def _means_pass(task, assignments, num_clusters, batch_size):
    def fn(g, a):
        return jax.ops.segment_sum(g, a, num_segments=num_clusters)

    sums, bad = streamed_sum(task, fn, assignments, batch_size)
    sizes = jnp.zeros(num_clusters, jnp.int32).at[assignments].add(1)
    means = sums / jnp.maximum(sizes, 1).astype(sums.dtype)[:, None]
    return means, sizes, bad


def _check_key(key):
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key, jax.random.key_data(key)
    arr = np.asarray(key) if isinstance(key, (np.ndarray, jax.Array)) else None
    if arr is not None and arr.dtype == np.uint32 and arr.shape == (2,):
        arr = jnp.asarray(arr)
        return jax.random.wrap_key_data(arr), arr
    raise TypeError(f"`key` must be a PRNG key (jax.random.key(seed)), got {type(key).__name__} {getattr(key, 'shape', '')}.")


def build_cache(
    task: Task,
    *,
    num_clusters: int,
    sketch_dim: int,
    damping: float,
    key,
    solver=None,
    batch_size: int | None = None,
    normalize_sketches: bool = False,
    kmeans_max_iters: int = 100,
    kmeans_tol: float = 1e-4,
    sketch_block_size: int = DEFAULT_BLOCK_SIZE,
    curvature=None,
    correction="calibrated",
    progress: bool = False,
    mesh=None,
    checkpoint_dir=None,
) -> InfluenceCache:
    """Builds a CiF cache: sketch, cluster, cluster means, low-rank factors, C damped-GGN solves.

    Paper section 3.3, eqs. (5)-(9). With ``num_clusters == N`` every example is its
    own cluster and the cache reproduces per-query IF (:func:`cif_jax.estimators.influence`).

    Args:
        task: the model snapshot and training data.
        num_clusters: C, 1 <= C <= N.
        sketch_dim: d, the JL sketch dimension (the paper uses 32).
        damping: lambda > 0 (the paper uses 1e-3).
        key: PRNG key; its first split draws the JL projection, the second seeds k-means.
        solver: the solver of the C systems and the correction's (None: ``cif_jax.CG()``).
            Its ``rtol`` bounds the true relative residuals rho_c (eq. 9) the cache stores
            for the bound. With CG's ``preconditioner="auto"`` the correction's Nystrom
            factors also precondition the solves; a solver holding a
            :class:`cif_jax.NystromPreconditioner` lends its factors to the correction.
        batch_size: examples per chunk in every data pass (None: chosen for a memory budget, see :func:`cif_jax.core.chunks.budget_batch_size`).
        normalize_sketches: cluster unit-normalised sketches ``h_i / ||h_i||`` (by
            direction) instead of the raw ones (the paper's).
        kmeans_max_iters: the cap on Lloyd iterations of k-means.
        kmeans_tol: the relative tolerance of the k-means stopping rule (see :func:`cif_jax.kmeans_fit`).
        sketch_block_size: columns of the JL projection per PRNG block (appendix C); default 4,096
            (``cif_jax.cif.sketch.DEFAULT_BLOCK_SIZE``).
        curvature: a :class:`cif_jax.CurvatureSample`: solve with the GGN of a weighted
            subset (paper section 5.6) while gradients and clustering use all N. None: all N.
        correction: ``"calibrated"`` (default, :class:`cif_jax.CalibratedCorrection`),
            ``"nystrom"``, ``"exact"``, a correction object, or None. It decides the
            low-rank factors of the GGN kept with every example's coordinates
            (:mod:`cif_jax.cif.lowrank`; the default estimator needs them) and how the
            self terms of overlapping queries are estimated (:mod:`cif_jax.cif.correction`).
            None: no factors and no correction, only the paper's estimator.
        progress: show progress.
        mesh: spread the C solves (and the examples of the GGN products, over an axis
            ``"data"``) over a ``jax.sharding.Mesh``, as :func:`cif_jax.solve_ggn`.
        checkpoint_dir: a directory that makes the build resumable (None: keep nothing):
            every finished phase and block of solves is written there as it ends, and a
            second call with the same task, settings and key computes only the rest. A
            directory of another task or other settings is refused
            (:class:`cif_jax.CheckpointError`) before any work. Single-process only.
            The docs' settings page says what is stored.

    Returns:
        An `InfluenceCache`, with phase timings in ``cache.timing``.

    Raises:
        ValueError: on invalid settings (before any work) or non-finite gradients.

    References:
        Badó and Fenech, "Clustered Influence Functions", ICML 2026.
    """
    operator = DampedGGN(task, damping=damping, curvature=curvature, batch_size=batch_size, mesh=mesh)
    b = _check_build(task, operator, num_clusters=num_clusters, sketch_dim=sketch_dim, key=key, solver=solver,
                     normalize_sketches=normalize_sketches, kmeans_max_iters=kmeans_max_iters, kmeans_tol=kmeans_tol,
                     sketch_block_size=sketch_block_size, correction=correction, progress=progress)
    fp = operator.fingerprint
    run = PhaseRunner(_open_checkpoint(task, b, checkpoint_dir, fp), progress=progress, total=_num_phases(b),
                      desc="CiF cache")
    sketches, centroids, assignments = _sketch_and_cluster(run, task, b)
    means, sizes = _cluster_means(run, task, b, assignments)
    factors, source, probe, solver = _factors(run, task, b, assignments, means)
    solver = _prepared(run, task, b, solver)
    scatter = run("scatter", lambda: _correction.streamed_terms(task, assignments, means, factors, b.damping,
                                                                b.batch_size), store="terms")
    solved, terms = _solves_and_terms(run, task, b, _solve_fn(run, task, b, solver), assignments, means, scatter,
                                      factors)
    lowrank = _lowrank_terms(run, task, b, probe, factors, source, means, scatter)
    dev_sq = scatter[0]
    return InfluenceCache(
        assignments=assignments, cluster_sizes=sizes, responses=solved.solutions, means=means,
        residuals=solved.residuals, mean_norms=jnp.linalg.norm(means, axis=1), num_steps=solved.num_steps,
        cluster_scatter=jax.ops.segment_sum(dev_sq, assignments, num_segments=b.num_clusters),
        scatter_trace=jnp.sum(dev_sq) / task.num_examples, deviation_norms=jnp.sqrt(dev_sq), sketches=sketches,
        centroids=centroids, sketch_key=b.key_data, num_examples=task.num_examples, damping=b.damping,
        sketch_dim=b.sketch_dim, sketch_block_size=b.sketch_block_size,
        normalize_sketches=b.normalize_sketches, rtol=solver.rtol, atol=solver.atol, max_steps=solver.step_budget,
        fingerprint=fp, curvature=operator.describe_curvature(), timings=run.close(),
        solver=solver.describe(), correction=terms, lowrank=lowrank,
    )


class _Build(NamedTuple):
    """The checked settings of one :func:`build_cache` call."""

    operator: DampedGGN
    num_clusters: int
    sketch_dim: int
    key: jax.Array
    key_data: Array
    solver: AbstractSolver
    normalize_sketches: bool
    kmeans_max_iters: int
    kmeans_tol: float
    sketch_block_size: int
    correction: AbstractCorrection | None
    shared: NystromPreconditioner | None  #: the low-rank factors of the solver's preconditioner, reused
    progress: bool

    @property
    def damping(self) -> float:
        return self.operator.damping

    @property
    def batch_size(self) -> int | None:
        """Examples per chunk of every data pass (the operator's)."""
        return self.operator.batch_size


def _check_build(task, operator: DampedGGN, *, num_clusters, sketch_dim, key, solver, normalize_sketches,
                 kmeans_max_iters, kmeans_tol, sketch_block_size, correction, progress) -> _Build:
    """Every argument of :func:`build_cache` checked, before any work (the operator's when it was made)."""
    n = task.num_examples
    num_clusters = _checks.positive_int(num_clusters, "num_clusters")
    if num_clusters > n:
        raise ValueError(f"`num_clusters` = {num_clusters} exceeds the number of training examples N = {n}.")
    solver = _check_solver(solver)
    key, key_data = _check_key(key)
    solver.check_mesh(operator)
    pre = solver.built_preconditioner()
    shared = None if pre is None else pre.low_rank()
    if shared is not None:
        shared.check(operator)
    sketch_dim = _checks.positive_int(sketch_dim, "sketch_dim")
    if sketch_dim > task.num_params:
        raise ValueError(f"`sketch_dim` = {sketch_dim} exceeds the number of parameters p = {task.num_params}: a JL "
                         "sketch is never useful beyond the gradients' own dimension. Pass `sketch_dim` <= p (the "
                         "paper uses 32).")
    sketch_bytes = n * sketch_dim * jnp.dtype(task.dtype).itemsize
    if sketch_bytes > SKETCH_WARN_BYTES:
        warnings.warn(f"the N x d = {n:,} x {sketch_dim:,} sketches take {sketch_bytes / 2**30:.1f} GiB, held in "
                      "memory with the cache; the paper uses d = 32. Pass a smaller `sketch_dim` if memory is short.",
                      stacklevel=3)
    return _Build(
        operator=operator, num_clusters=num_clusters, sketch_dim=sketch_dim, key=key, key_data=key_data,
        solver=solver, normalize_sketches=bool(normalize_sketches),
        kmeans_max_iters=_checks.positive_int(kmeans_max_iters, "kmeans_max_iters"),
        kmeans_tol=_checks.nonnegative_float(kmeans_tol, "kmeans_tol"),
        sketch_block_size=_checks.positive_int(sketch_block_size, "sketch_block_size"),
        correction=_correction.check(correction), shared=shared, progress=bool(progress))


def _open_checkpoint(task, b: _Build, directory, fp: str):
    """The build's :class:`cif_jax.core.checkpoint.Checkpoint` in ``directory`` (None: none asked for)."""
    if directory is None:
        return None
    _distributed.check_single_process(b.operator.mesh)
    return _checkpoint.Checkpoint(directory, kind="cache", settings={
        "fingerprint": fp, "num_examples": task.num_examples, "num_params": int(task.num_params),
        "dtype": jnp.dtype(task.dtype).name, "num_clusters": b.num_clusters, "sketch_dim": b.sketch_dim,
        "damping": b.damping, "key": np.asarray(b.key_data).tolist(), "normalize_sketches": b.normalize_sketches,
        "kmeans_max_iters": b.kmeans_max_iters, "kmeans_tol": b.kmeans_tol, "sketch_block_size": b.sketch_block_size,
        "curvature": b.operator.describe_curvature(),
        "correction": None if b.correction is None else b.correction.describe(),
        "solver": b.solver.describe(), "solver_arrays": _checkpoint.leaves_digest(b.solver)})


def _builds_factors(b: _Build) -> bool:
    return b.correction is not None and b.correction.rank != 0 and b.shared is None


def _num_phases(b: _Build) -> int:
    """The phases the progress bar counts: sketch, k-means, means, scatter, solves, and the optional ones."""
    builds = _builds_factors(b)
    return 5 + 2 * builds + (not b.solver.prepared and not builds) + (
        0 if b.correction is None else b.correction.num_phases)


def _sketch_and_cluster(run: PhaseRunner, task, b: _Build):
    """Phase I, eqs. (5)-(6): ``(sketches, centroids, assignments)``."""
    sketch_key, kmeans_key = jax.random.split(b.key)
    sketches, bad = run("gradients+sketch", lambda: _sketch_pass(
        task, sketch_key, b.sketch_dim, b.sketch_block_size, b.batch_size), store="sketch")
    raise_on_bad(bad)
    points = sketches
    if b.normalize_sketches:
        norms = jnp.linalg.norm(sketches, axis=1, keepdims=True)
        points = sketches / jnp.where(norms > 0, norms, 1)
    centroids, assignments = run("kmeans", lambda: tuple(kmeans_fit(
        points, b.num_clusters, key=kmeans_key, max_iters=b.kmeans_max_iters, tol=b.kmeans_tol)[:2]), store="kmeans")
    return sketches, centroids, assignments.astype(jnp.int32)


def _cluster_means(run: PhaseRunner, task, b: _Build, assignments):
    """Eq. (7): ``(means, sizes)``, with a warning when one cluster holds most examples."""
    means, sizes, _ = run("cluster means", lambda: _means_pass(task, assignments, b.num_clusters, b.batch_size),
                          store="means")
    n, sizes_np = task.num_examples, np.asarray(sizes)
    if b.num_clusters > 2 and sizes_np.max() > DOMINANT_CLUSTER_SHARE * n:
        warnings.warn(
            f"one cluster holds {int(sizes_np.max())} of {n} examples ({sizes_np.max() / n:.0%}); cluster sizes "
            f"{sorted(sizes_np.tolist(), reverse=True)[:10]}. Raw sketches of well-fit examples are near zero and "
            "fall together; consider `normalize_sketches=True` or more clusters. The scatter term of the bound "
            "reports the cost.",
            stacklevel=3,
        )
    return means, sizes


def _factors(run: PhaseRunner, task, b: _Build, assignments, means):
    """The low-rank factors ``(U^T, s)`` of the GGN (None without a correction or at rank 0), the
    preconditioner they come from, the rank probe, and the solver (now sharing the factors).

    The factors come from the solver's Nystrom preconditioner when it has one; otherwise they are
    built here by the correction's ``factors`` route (:func:`_build_factors`; ``rank="auto"``: the
    smallest doubling whose probe share outside them is at most the correction's tolerance) and then
    precondition the cluster solves too.
    """
    correction, solver, source = b.correction, b.solver, b.shared
    if correction is None or correction.rank == 0:
        return None, source, None, solver
    # A probe of deviations d_i = g_i - mu_c(i): it decides the rank ("auto") and records how
    # much of the deviations the factors hold (cheap: PROBE_SIZE gradients, redone on resume).
    probe = _lowrank.probe_deviations(task, jax.random.fold_in(b.key, 5), assignments, means, b.batch_size,
                                      chunk=correction.probe_chunk)
    if source is None:
        wanted = correction.max_rank if correction.rank == "auto" else correction.rank
        rank = _correction.factor_rank(wanted, task.num_params, jnp.dtype(task.dtype).itemsize)
        if rank < min(wanted, task.num_params):
            warnings.warn(
                f"the correction's Nystrom factors at rank {wanted} would take about "
                f"{4 * wanted * task.num_params * jnp.dtype(task.dtype).itemsize / 2**30:.1f} GiB for p = "
                f"{task.num_params:,}; building at most rank {rank} instead. Pass a smaller `rank` or `max_rank`, a "
                "solver with a built Nystrom preconditioner, or `correction=None`.",
                stacklevel=3,
            )
        source = run("nystrom", lambda: _build_factors(b, solver, probe, rank), store="nystrom",
                     module=NystromPreconditioner)
        solver = solver.adopt(source)  # free: the factors precondition the solves too
    return _correction.nystrom_factors(source, correction.rank), source, probe, solver


def _build_factors(b: _Build, solver, probe, rank: int) -> NystromPreconditioner:
    """The correction's factors at ``rank`` (the cap for ``"auto"``), by its ``factors`` route.

    ``"auto"`` times small chunks of the routes first (:func:`cif_jax.solvers.sampled.choose_factor_build`).
    The column route builds at the cap, and ``rank="auto"`` then keeps the smallest doubling of the
    initial rank whose top eigenpairs meet the probe rule; the product route grows its rank by doubling.
    """
    correction, block = b.correction, getattr(solver, "rhs_batch_size", None) or 32
    key = jax.random.fold_in(b.key, 2)
    accept = _lowrank.probe_rule(probe, b.damping, correction.tolerance)
    initial = min(_lowrank.DEFAULT_INITIAL_RANK, rank)
    route, why = correction.factors, f"factors={correction.factors}"
    if route == "auto":
        route, why = choose_factor_build(b.operator, rank=rank, block=block)
    if route == "products":
        settings = dict(rank="auto", max_rank=rank, initial_rank=initial, accept=accept) \
            if correction.rank == "auto" else dict(rank=rank)
        pre = nystrom_preconditioner(b.operator, key=key, error_iters=0, rhs_batch_size=block,
                                     progress=b.progress, **settings)
    else:
        pre = sampled_preconditioner(b.operator, key=key, rank=rank, power_iters=0, samples="exact",
                                     progress=b.progress)
        if correction.rank == "auto":
            pre = _lowrank.smallest_accepted(pre, initial, accept)
    return dataclasses.replace(pre, note=f"{pre.note or f'rank {pre.rank}'}; built from {why}")


def _num_systems(b: _Build) -> int:
    return b.num_clusters + (0 if b.correction is None else b.correction.num_systems)


def _prepared(run: PhaseRunner, task, b: _Build, solver):
    """The solver with its preconditioner settled for the build's systems (checkpointed)."""
    if solver.prepared:
        return solver

    def prepare():
        return solver.prepare(b.operator, _num_systems(b), key=jax.random.fold_in(b.key, 4))

    ckpt = run.checkpoint
    return run("preconditioner", prepare if ckpt is None else lambda: prepare_checkpointed(solver, ckpt, prepare))


def _solve_fn(run: PhaseRunner, task, b: _Build, solver):
    """``solve(rhs)`` with the build's operator; with a checkpoint, each call's blocks stored under their
    own names, in the (fixed) order of the calls."""
    calls = itertools.count(1)

    def solve(rhs):
        if run.checkpoint is None:
            return solver.solve(b.operator, rhs, progress=b.progress)
        return solve_checkpointed(solver, b.operator, rhs, checkpoint=run.checkpoint, name=f"solves{next(calls)}",
                                  progress=b.progress)

    return solve


def _solves_and_terms(run: PhaseRunner, task, b: _Build, solve, assignments, means, scatter, factors):
    """Eq. (8)-(9): the C cluster solves, joined by the correction's own systems, then its terms."""
    _, grad_norms, low_self, complement, _, _ = scatter
    c, correction = b.num_clusters, b.correction
    if correction is None:
        return run("solves", lambda: solve(means)), None
    ctx = _correction.BuildContext(
        task=task, assignments=assignments, means=means, batch_size=b.batch_size, key=jax.random.fold_in(b.key, 3),
        raw=low_self + complement, low_self=low_self, grad_norms=grad_norms,
        rank=0 if factors is None else int(factors[0].shape[0]), solve=solve, run=run)
    extra, state = correction.systems(ctx)
    solved = run("solves", lambda: solve(means if extra is None else jnp.concatenate([means, extra])))
    own = None if extra is None else jax.tree_util.tree_map(lambda a: a[c:], solved)
    return jax.tree_util.tree_map(lambda a: a[:c], solved), correction.terms(ctx, own, state)


def _lowrank_terms(run: PhaseRunner, task, b: _Build, probe, factors, source, means, scatter):
    """The cache's :class:`LowRankTerms` (None without factors): the factors, every example's
    coordinates, the tail norms, the probe's predicted error and an error estimate of the factors."""
    if factors is None:
        return None
    _, _, _, _, tail_sq, coords = scatter
    basis, eig = factors
    correction, rank = b.correction, int(basis.shape[0])
    predicted = _lowrank.predicted_error(probe, basis, eig, b.damping)
    if correction.rank == "auto" and predicted > correction.tolerance:
        warnings.warn(
            f"the low-rank factors stopped at rank {rank} (the cap: `max_rank`, p or the memory "
            f"limit) with a predicted share {predicted:.3g} of the deviations outside them, above the tolerance "
            f"{correction.tolerance:g}: queries whose evaluation set is not the removed set (held-out points, "
            "other folds) will be answered less accurately. Raise `max_rank` if memory allows, or read the "
            "error with `cj.query_error_bound`.",
            stacklevel=3,
        )
    error = source.error_estimate
    if not bool(jnp.isfinite(error)):  # the factors' own estimate, else a block power iteration
        error = run("factor error", lambda: block_error_estimate(
            b.operator, basis, eig, key=jax.random.fold_in(b.key, 6), iters=_lowrank.ERROR_ITERS,
            block=min(getattr(b.solver, "rhs_batch_size", None) or 32, task.num_params)))
    return LowRankTerms(
        basis=basis, eigenvalues=eig, coords=coords,
        mean_coords=jnp.matmul(means, basis.T, precision=jax.lax.Precision.HIGHEST),
        tail_norms=jnp.sqrt(jnp.maximum(tail_sq, 0)), error_estimate=jnp.asarray(error, eig.dtype),
        predicted_error=jnp.asarray(predicted, eig.dtype),
        note=_lowrank_note(source, rank))


def _lowrank_note(source: NystromPreconditioner, rank: int) -> str:
    """The factors' note: how the rank was chosen (``"auto: rank ..."`` or ``"rank r"``), and how
    they were built when the cache built them (``"; built from ..."``)."""
    how, _, built = source.note.partition("; built from ")
    head = how if how.startswith("auto: rank") and rank == source.rank else f"rank {rank}"
    return f"{head}; built from {built}" if built else head
