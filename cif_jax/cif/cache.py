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

import itertools
import time
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, UInt

from ..core import checkpoint as _checkpoint
from ..core import checks as _checks
from ..core import curvature as _curvature
from ..core.gradients import raise_on_bad, streamed_map, streamed_sum
from ..core.task import Task, fingerprint
from ..solvers import distributed as _distributed
from ..solvers.precondition import NystromPreconditioner, block_error_estimate, nystrom_preconditioner
from ..solvers.solve import check_solver as _check_solver
from ..solvers.solve import prepare_checkpointed, solve_checkpointed
from . import correction as _correction
from . import lowrank as _lowrank
from .correction import CalibratedCorrection, CorrectionTerms, ExactCorrection, NystromCorrection
from .kmeans import kmeans_fit
from .lowrank import LowRankTerms
from .sketch import DEFAULT_BLOCK_SIZE
from .sketch import sketch as _sketch_rows

#: A cluster holding more than this share of the examples triggers a warning (C > 2).
DOMINANT_CLUSTER_SHARE = 0.5


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
    """Builds a CiF cache: sketch, cluster, cluster means, C damped-GGN solves.

    Paper section 3.3, eqs. (5)-(9). With ``num_clusters == N`` every example is its
    own cluster and the cache reproduces per-query IF (:func:`cif_jax.baselines.influence`).

    Args:
        task: the model snapshot and training data.
        num_clusters: C, 1 <= C <= N.
        sketch_dim: d, the JL sketch dimension (the paper uses 32).
        damping: lambda > 0 (the paper uses 1e-3).
        key: PRNG key; its first split draws the JL projection, the second seeds k-means.
        solver: the solver of the C systems (and of the correction's), a solver object
            (None: ``cif_jax.CG()``). Its ``rtol`` bounds the true relative residual
            rho_c (eq. 9), which the cache stores for the bound; its settings are
            recorded in ``cache.solver``. With CG's default ``preconditioner="auto"``,
            the Nystrom factors the correction builds also precondition the solves;
            without a correction, the cost model decides (``cache.solver`` says what
            it chose). A prepared solver (:meth:`cif_jax.CG.prepare`) is used as it is.
        batch_size: examples per chunk in every data pass (None: all at once).
        normalize_sketches: cluster unit-normalised sketches h_i / ||h_i|| instead of
            the raw sketches (the paper's default is raw). Raw sketches of a model
            that fits most examples perfectly put those near-zero gradients in one
            cluster; normalising clusters by direction instead.
        kmeans_max_iters, kmeans_tol: Lloyd iteration cap and tolerance.
        sketch_block_size: columns of the JL projection per PRNG block (appendix C).
        curvature: a :class:`cif_jax.CurvatureSample`: solve with the GGN of a weighted
            subset of examples (paper section 5.6) while gradients and clustering use
            all N. None: all N.
        correction: the low-rank factors of the GGN with every example's coordinates in
            them (:mod:`cif_jax.cif.lowrank`), and the estimator of the per-example
            self-influence scalars that queries whose evaluation set overlaps the removed
            set add back (:mod:`cif_jax.cif.correction`): ``"calibrated"`` (default,
            :class:`cif_jax.CalibratedCorrection`: the rank chosen by the spectrum, the self
            terms rescaled by 16 exact per-example solves), ``"nystrom"``, ``"exact"`` (N
            solves), a settings object, or None (no factors, no correction: only the
            paper's estimator is available). The Nystrom factors come from the solver's preconditioner when it is a
            :class:`cif_jax.NystromPreconditioner`; otherwise they are built here (r
            GGN products, about four r x p arrays; the rank is lowered with a warning
            past :data:`cif_jax.cif.correction.MAX_FACTOR_BYTES`), and with CG's
            ``preconditioner="auto"`` they also precondition the C solves. Under a
            ``mesh`` they are built whole in every process, like phase I.
        progress: show progress.
        mesh: spread the C solves of phase II (and the examples of the GGN products,
            over an axis ``"data"``) over the devices of a ``jax.sharding.Mesh``, as
            :func:`cif_jax.solve_ggn`. Phase I runs in every process.
        checkpoint_dir: a directory to make the build resumable (None: keep nothing).
            Each finished phase is written there atomically as it ends: the
            sketches, the k-means assignments, the cluster means, the Nystrom
            factors, the prepared preconditioner, the scatter pass, and every block
            of solved responses with its residuals. A second call with the same
            task, settings and key reads what is there and computes the rest, so an
            interrupted build (a killed job, a lost node) loses at most one phase or
            one block of solves (the cheap steps that are not stored, such as the
            calibration gradients or a Jacobi or K-FAC preconditioner, are redone);
            the result equals an uninterrupted build to the solver's tolerance. A
            directory written for another task (fingerprint) or other settings is
            refused (:class:`cif_jax.CheckpointError`) before any work.
            ``cache.timing`` counts the seconds of this call, reading included. Not
            available with a mesh that spans several processes (the processes would
            have to agree on which blocks to skip).

    Returns:
        An :class:`InfluenceCache`, with phase timings in ``cache.timing``.

    Raises:
        ValueError: on invalid settings (before any work) or non-finite gradients.

    References:
        Badó and Fenech, "Clustered Influence Functions", ICML 2026.
    """
    _checks.task(task)
    n = task.num_examples
    num_clusters = _checks.positive_int(num_clusters, "num_clusters")
    if num_clusters > n:
        raise ValueError(f"`num_clusters` = {num_clusters} exceeds the number of training examples N = {n}.")
    sketch_dim = _checks.positive_int(sketch_dim, "sketch_dim")
    sketch_block_size = _checks.positive_int(sketch_block_size, "sketch_block_size")
    lam = _checks.damping(damping)
    solver = _check_solver(solver)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    kmeans_max_iters = _checks.positive_int(kmeans_max_iters, "kmeans_max_iters")
    kmeans_tol = _checks.nonnegative_float(kmeans_tol, "kmeans_tol")
    key, key_data = _check_key(key)
    sketch_key, kmeans_key = jax.random.split(key)
    curvature = _curvature.check(curvature, n, task.dtype)
    plan = _distributed.check_mesh(mesh)
    if plan is not None:
        _distributed.check_task(plan, task, curvature)
    if mesh is not None and not solver.supports_mesh:
        raise ValueError(f"`mesh` applies to cif_jax.CG; {type(solver).__name__} runs on one device. Drop it or use "
                         "cif_jax.CG().")
    correction = _correction.check(correction)
    shared = solver.nystrom()
    if shared is not None:
        shared.check(task, curvature)

    ckpt = None
    if checkpoint_dir is not None:
        _distributed.check_single_process(mesh)
        ckpt = _checkpoint.Checkpoint(checkpoint_dir, kind="cache", settings={
            "fingerprint": fingerprint(task), "num_examples": n, "num_params": int(task.num_params),
            "dtype": jnp.dtype(task.dtype).name, "num_clusters": num_clusters, "sketch_dim": sketch_dim,
            "damping": lam, "key": np.asarray(key_data).tolist(), "normalize_sketches": bool(normalize_sketches),
            "kmeans_max_iters": kmeans_max_iters, "kmeans_tol": kmeans_tol, "sketch_block_size": sketch_block_size,
            "curvature": _curvature.describe(curvature),
            "correction": None if correction is None else correction.describe(),
            "solver": solver.describe(), "solver_arrays": _checkpoint.leaves_digest(solver)})

    def stored(name, fn):
        """``fn()`` (a tuple of arrays), or its saved value when resuming."""
        if ckpt is None:
            return fn()
        return tuple(None if a is None else jnp.asarray(a) for a in ckpt.arrays_tuple(name, fn))

    timings = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        builds_nystrom = correction is not None and correction.rank != 0 and shared is None
        total = 5 + 2 * builds_nystrom + (not solver.prepared and not builds_nystrom) + (
            correction is not None and not isinstance(correction, NystromCorrection))
        bar = tqdm(total=total, desc="CiF cache", unit="phase")

    def phase(name, fn):
        if bar is not None:
            bar.set_postfix_str(name)
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        timings.append((name, time.perf_counter() - start))
        if bar is not None:
            bar.update(1)
        return out

    sketches, bad = phase("gradients+sketch", lambda: stored("sketch", lambda: _sketch_pass(
        task, sketch_key, sketch_dim, sketch_block_size, batch_size)))
    raise_on_bad(bad)
    points = sketches
    if normalize_sketches:
        norms = jnp.linalg.norm(sketches, axis=1, keepdims=True)
        points = sketches / jnp.where(norms > 0, norms, 1)
    centroids, assignments = phase(
        "kmeans",
        lambda: stored("kmeans", lambda: tuple(kmeans_fit(points, num_clusters, key=kmeans_key,
                                                          max_iters=kmeans_max_iters, tol=kmeans_tol)[:2])),
    )
    assignments = assignments.astype(jnp.int32)
    means, sizes, _ = phase("cluster means", lambda: stored("means", lambda: _means_pass(
        task, assignments, num_clusters, batch_size)))

    sizes_np = np.asarray(sizes)
    if num_clusters > 2 and sizes_np.max() > DOMINANT_CLUSTER_SHARE * n:
        warnings.warn(
            f"one cluster holds {int(sizes_np.max())} of {n} examples ({sizes_np.max() / n:.0%}); cluster sizes "
            f"{sorted(sizes_np.tolist(), reverse=True)[:10]}. Raw sketches of well-fit examples are near zero and "
            "fall together; consider `normalize_sketches=True` or more clusters. The scatter term of the bound "
            "reports the cost.",
            stacklevel=2,
        )

    factors, source, probe = None, shared, None
    if correction is not None and correction.rank != 0:
        # A probe of deviations d_i = g_i - mu_c(i): it decides the rank ("auto") and records how
        # much of the deviations the factors hold (cheap: PROBE_SIZE gradients, redone on resume).
        probe = _lowrank.probe_deviations(task, jax.random.fold_in(key, 5), assignments, means, batch_size,
                                          chunk=getattr(correction, "num_samples", _lowrank.PROBE_CHUNK))
        if source is None:
            itemsize = jnp.dtype(task.dtype).itemsize
            wanted = correction.max_rank if correction.rank == "auto" else correction.rank
            rank = _correction.factor_rank(wanted, task.num_params, itemsize)
            if rank < min(wanted, task.num_params):
                warnings.warn(
                    f"the correction's Nystrom factors at rank {wanted} would take about "
                    f"{4 * wanted * task.num_params * itemsize / 2**30:.1f} GiB for p = {task.num_params:,}; "
                    f"building at most rank {rank} instead. Pass a smaller `rank` or `max_rank`, a solver with a "
                    "built Nystrom preconditioner, or `correction=None`.",
                    stacklevel=2,
                )
            block = getattr(solver, "rhs_batch_size", None) or 32
            if correction.rank == "auto":
                settings = dict(rank="auto", damping=lam, max_rank=rank,
                                initial_rank=min(_lowrank.DEFAULT_INITIAL_RANK, rank),
                                accept=_lowrank.probe_rule(probe, lam, correction.tolerance))
            else:
                settings = dict(rank=rank)

            def build_factors():
                return nystrom_preconditioner(
                    task, key=jax.random.fold_in(key, 2), error_iters=0, batch_size=batch_size,
                    rhs_batch_size=block, curvature=curvature, progress=progress, **settings)

            source = phase("nystrom", build_factors if ckpt is None else lambda: ckpt.module(
                "nystrom", NystromPreconditioner, build_factors))
            solver = solver.share_nystrom(source)  # free: the factors precondition the solves too
        factors = _correction.nystrom_factors(source, correction.rank)
    num_calibration = correction.num_samples if isinstance(correction, CalibratedCorrection) else 0
    if not solver.prepared:
        unprepared = solver

        def prepare():
            return unprepared.prepare(task, damping=lam, num_systems=num_clusters + num_calibration,
                                      batch_size=batch_size, curvature=curvature, key=jax.random.fold_in(key, 4))

        solver = phase("preconditioner",
                       prepare if ckpt is None else lambda: prepare_checkpointed(unprepared, ckpt, prepare))
    solve_calls = itertools.count(1)  # every call's blocks have their own names, in the (fixed) order of the calls

    def solve(rhs):
        if ckpt is None:
            return solver.solve(task, rhs, damping=lam, batch_size=batch_size, curvature=curvature, mesh=mesh,
                                progress=progress)
        return solve_checkpointed(solver, task, rhs, checkpoint=ckpt, name=f"solves{next(solve_calls)}",
                                  damping=lam, batch_size=batch_size, curvature=curvature, mesh=mesh,
                                  progress=progress)

    dev_sq, grad_norms, low_self, complement, tail_sq, coords = phase(
        "scatter", lambda: stored("terms", lambda: _correction.streamed_terms(
            task, assignments, means, factors, lam, batch_size)))
    cluster_scatter = jax.ops.segment_sum(dev_sq, assignments, num_segments=num_clusters)
    raw = low_self + complement
    # The calibration systems (a few per-example deviations) join the C cluster systems in one solve.
    if isinstance(correction, CalibratedCorrection):
        sample = _correction.draw_sample(jax.random.fold_in(key, 3), raw, correction.num_samples)
        extra, inverse = np.unique(sample, return_inverse=True)
        # Padded (repeating one draw) to a fixed count: every build with these settings reuses one
        # compiled gradient pass and one compiled solve, whatever the number of distinct draws.
        extra = np.concatenate([extra, np.full(correction.num_samples - extra.size, extra[0], extra.dtype)])
        g_extra, d_extra = phase("calibration gradients",
                                 lambda: _correction.deviations(task, extra, assignments, means, batch_size))
        rhs = jnp.concatenate([means, d_extra])
    else:
        rhs = means
    solved = phase("solves", lambda: solve(rhs))
    head = lambda a: a[:num_clusters]
    terms = None
    rank = 0 if factors is None else int(factors[0].shape[0])
    if isinstance(correction, CalibratedCorrection):
        t_extra = (jnp.sum(g_extra * solved.solutions[num_clusters:], axis=1) / n)[inverse]
        terms = _correction.calibrated_terms(correction, raw / n, low_self / n, grad_norms, sample, t_extra,
                                             solved.residuals[num_clusters:][inverse], rank)
    elif isinstance(correction, NystromCorrection):
        terms = _correction.nystrom_terms(correction, raw / n, low_self / n, grad_norms, rank)
    elif isinstance(correction, ExactCorrection):
        terms = phase("correction", lambda: _correction.exact_terms(
            correction, task, assignments, means, grad_norms, low_self / n, solve, batch_size, rank))
    lowrank = None
    if factors is not None:
        basis, eig = factors
        predicted = _lowrank.predicted_error(probe, basis, eig, lam)
        if correction.rank == "auto" and predicted > correction.tolerance:
            warnings.warn(
                f"the low-rank factors stopped at rank {int(basis.shape[0])} (the cap: `max_rank`, p or the memory "
                f"limit) with a predicted share {predicted:.3g} of the deviations outside them, above the tolerance "
                f"{correction.tolerance:g}: queries whose evaluation set is not the removed set (held-out points, "
                "other folds) will be answered less accurately. Raise `max_rank` if memory allows, or read the "
                "error with `cj.query_error_bound`.",
                stacklevel=2,
            )
        error = source.error_estimate
        if not bool(jnp.isfinite(error)):  # the factors' own estimate, else a block power iteration
            error = phase("factor error", lambda: block_error_estimate(
                task, basis, eig, key=jax.random.fold_in(key, 6), iters=_lowrank.ERROR_ITERS,
                block=min(getattr(solver, "rhs_batch_size", None) or 32, task.num_params), batch_size=batch_size,
                curvature=curvature))
        lowrank = _lowrank.LowRankTerms(
            basis=basis, eigenvalues=eig, coords=coords,
            mean_coords=jnp.matmul(means, basis.T, precision=jax.lax.Precision.HIGHEST),
            tail_norms=jnp.sqrt(jnp.maximum(tail_sq, 0)), error_estimate=jnp.asarray(error, eig.dtype),
            predicted_error=jnp.asarray(predicted, eig.dtype),
            note=source.note if source.note.startswith("auto: rank") and rank == source.rank else f"rank {rank}")
    solved = jax.tree_util.tree_map(head, solved)
    if bar is not None:
        bar.close()
    timings.append(("total", sum(t for _, t in timings)))
    return InfluenceCache(
        assignments=assignments,
        cluster_sizes=sizes,
        responses=solved.solutions,
        means=means,
        residuals=solved.residuals,
        mean_norms=jnp.linalg.norm(means, axis=1),
        num_steps=solved.num_steps,
        cluster_scatter=cluster_scatter,
        scatter_trace=jnp.sum(dev_sq) / n,
        deviation_norms=jnp.sqrt(dev_sq),
        sketches=sketches,
        centroids=centroids,
        sketch_key=key_data,
        num_examples=n,
        damping=lam,
        sketch_dim=sketch_dim,
        sketch_block_size=sketch_block_size,
        normalize_sketches=bool(normalize_sketches),
        rtol=solver.rtol,
        atol=solver.atol,
        max_steps=solver.step_budget,
        fingerprint=fingerprint(task),
        curvature=_curvature.describe(curvature),
        timings=tuple(timings),
        solver=solver.describe(),
        correction=terms,
        lowrank=lowrank,
    )

