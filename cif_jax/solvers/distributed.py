"""Sharded solves: the right-hand sides, and optionally the examples, spread over a device mesh.

Every damped-GGN solve of cif_jax (the C cluster systems of a cache, eq. 8; the Q
per-query systems of IF, eq. 3) runs its own CG iteration; systems share only the
operator. Every function that solves takes ``mesh=`` (a ``jax.sharding.Mesh``)
beside ``solver=``, and :class:`cif_jax.CG` spreads the work over its devices
with ``jax.shard_map``:

* **right-hand sides** (the mesh axis ``"rhs"``): the R systems are cut
  into contiguous groups of ``ceil(R / S)`` rows, one per device along the axis
  (S devices). Each device runs block CG on its rows with its own step sizes and
  its own convergence, with no communication at all; ``rhs_batch_size`` is the
  number of systems a device solves together per call (memory per device grows
  with it). Rows that pad a group to the block size are zero systems, which are
  solved at once (x = 0).
* **examples** (the mesh axis ``"data"``, when the mesh has one): the examples that define the GGN (all
  N, or the M of a :class:`cif_jax.CurvatureSample`) are dealt round-robin to the
  D devices along the axis; each computes the weighted sum of
  ``J_i^T W_i J_i v`` over its share and a ``psum`` over the axis adds the
  shares before the division by the total weight. When D does not divide the
  count, the shares are padded with copies of an example at weight 0, which add
  exactly zero: no example is dropped or counted twice. Devices along the data
  axis hold the same systems, agree on every stopping decision (a ``psum`` of
  their flags), and so loop together.

The two compose on a 2-D mesh (``rhs`` x ``data``). Under multi-controller JAX
(``jax.distributed.initialize``) the same code runs in every process on a mesh
of all processes' devices; the right-hand sides may be given as a global
``jax.Array`` whose rows each process holds a part of
(``jax.make_array_from_process_local_data``), or as the same host array in every
process. Results come back to every process whole, as ordinary arrays on its
first local device, equal to the single-device ones to solver tolerance and
float rounding. The task (params and data) is read from every process's own
copy, which must be the same everywhere.

Example (one host, every device solving its share of the systems)::

    mesh = cj.solver_mesh()                      # all devices on the axis "rhs"
    result = cj.solve_ggn(task, rhs, damping=1e-3, mesh=mesh)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..core import checks as _checks
from ..core.curvature import CurvatureSample
from ..core.ggn import ggn_block_fn
from ..core.task import Task
from .cg import balanced_block, inner_rtol, low_precision, solve_system


class MeshPlan(NamedTuple):
    """A validated mesh with the axis that spreads the systems and the one that spreads the examples.

    Attributes:
        mesh: the ``jax.sharding.Mesh``.
        rhs_axis: the mesh axis over which right-hand sides are spread, or None.
        data_axis: the mesh axis over which examples are spread, or None.
    """

    mesh: Mesh
    rhs_axis: str | None
    data_axis: str | None

    @property
    def rhs_shards(self) -> int:
        """S, the devices along ``rhs_axis`` (1 without one)."""
        return 1 if self.rhs_axis is None else int(self.mesh.shape[self.rhs_axis])

    @property
    def data_shards(self) -> int:
        """D, the devices along ``data_axis`` (1 without one)."""
        return 1 if self.data_axis is None else int(self.mesh.shape[self.data_axis])


def solver_mesh(*, data_shards: int = 1, devices=None) -> Mesh:
    """A mesh for sharded solves: axes ``("rhs", "data")`` over ``devices`` (default: all).

    Args:
        data_shards: devices along ``"data"`` (examples); the rest go to ``"rhs"``.
        devices: the devices, in order (default ``jax.devices()``: every process's).

    Returns:
        A ``jax.sharding.Mesh`` of shape ``(len(devices) // data_shards, data_shards)``.
    """
    devices = list(jax.devices() if devices is None else devices)
    data_shards = _checks.positive_int(data_shards, "data_shards")
    if not devices or len(devices) % data_shards:
        raise ValueError(f"`data_shards` = {data_shards} must divide the number of devices ({len(devices)}).")
    return Mesh(np.array(devices, dtype=object).reshape(-1, data_shards), ("rhs", "data"))


#: The mesh axis that spreads the right-hand sides.
RHS_AXIS = "rhs"
#: The mesh axis that spreads the examples of the GGN products.
DATA_AXIS = "data"


def check_single_process(mesh) -> None:
    """Refuses a mesh spanning several processes where each process would decide alone (``checkpoint_dir``).

    A resumable run skips the blocks of solves it finds on its own disk; under
    multi-controller JAX the processes would then make different solve calls and the
    collectives would no longer match.
    """
    if mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1:
        raise ValueError("`checkpoint_dir` is not available with a mesh that spans several processes: each process "
                         "would skip the blocks it finds on its own disk and the collective solves would no longer "
                         "match. Drop `checkpoint_dir`, or run one process per host without a shared mesh.")


def check_mesh(mesh) -> MeshPlan | None:
    """Validates ``mesh=`` on the host; None without a mesh.

    The systems are spread over the mesh axis named ``"rhs"`` and the examples over
    the one named ``"data"``, when the mesh has them (:func:`solver_mesh` builds
    both; a ``"data"`` axis of one device is not used). A mesh with other axis names can be renamed over the same devices:
    ``jax.sharding.Mesh(mesh.devices, ("rhs", "data"))``.
    """
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`mesh` must be a `jax.sharding.Mesh` of concrete devices (e.g. cif_jax.solver_mesh() or "
            f"jax.sharding.Mesh(jax.devices(), ('rhs',))), got {type(mesh).__name__}."
        )
    names = tuple(mesh.axis_names)
    rhs_axis = RHS_AXIS if RHS_AXIS in names else None
    # A data axis of one device spreads nothing: the plain product serves.
    data_axis = DATA_AXIS if DATA_AXIS in names and (mesh.shape[DATA_AXIS] > 1 or rhs_axis is None) else None
    if rhs_axis is None and data_axis is None:
        raise ValueError(
            f"the mesh has axes {names}; the solves spread over an axis named {RHS_AXIS!r} (systems) and/or "
            f"{DATA_AXIS!r} (examples). Rename them over the same devices, e.g. "
            f"jax.sharding.Mesh(mesh.devices, {(RHS_AXIS, DATA_AXIS)[:len(names)]}), or use cif_jax.solver_mesh()."
        )
    for name in names:
        if name not in (rhs_axis, data_axis) and mesh.shape[name] > 1:
            raise ValueError(
                f"mesh axis {name!r} has {mesh.shape[name]} devices but is neither {RHS_AXIS!r} nor {DATA_AXIS!r}: "
                "those devices would repeat the same work. Build the mesh without it."
            )
    return MeshPlan(mesh, rhs_axis, data_axis)


def check_task(plan: MeshPlan, task: Task, curvature: CurvatureSample | None) -> None:
    """Checks that ``task`` (and ``curvature``) can be spread as ``plan`` says; raises with the fix."""
    for leaf in jax.tree_util.tree_leaves((task.params, task.inputs, task.targets)):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise ValueError(
                "the task's params and data must be held whole by every process (host arrays or arrays on local "
                "devices); one of them is a global array spread over processes. Give each process its full copy."
            )
    count = task.num_examples if curvature is None else int(curvature.indices.shape[0])
    if plan.data_shards > count:
        what = "training examples" if curvature is None else "examples in the curvature sample"
        raise ValueError(
            f"`data_axis` {plan.data_axis!r} has {plan.data_shards} devices but there are only {count} {what}; "
            "use a mesh with at most that many devices along the data axis."
        )


def as_rows(rhs):
    """``jnp.asarray(rhs)``, except that a global array spread over processes is kept as it is."""
    if isinstance(rhs, jax.Array):
        return rhs
    return jnp.asarray(rhs)


def finite_rows(rhs, name: str, what: str) -> None:
    """:func:`cif_jax.core.checks.finite_rows`, also for a global array spread over processes."""
    if rhs.is_fully_addressable:
        _checks.finite_rows(rhs, name, what=what)
        return
    ok = np.asarray(_row_flags(rhs))
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raise ValueError(f"{name} contain NaN or Inf for {bad.size} {what}(s), e.g. {bad[:10].tolist()}.")


def _row_flags(rhs):
    replicated = NamedSharding(rhs.sharding.mesh, P()) if isinstance(rhs.sharding, NamedSharding) else None
    if replicated is None:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(jnp.isfinite(rhs).all(axis=1), tiled=True)
    return jax.jit(lambda a: jnp.isfinite(a).all(axis=1), out_shardings=replicated)(rhs)


# ------------------------------------------------------------------------------------------- placement


def _global(value, sharding: NamedSharding):
    """``value`` as a global array laid out by ``sharding``.

    A global array spread over processes is returned as is (the jitted programs
    reshard it). Anything else is taken to be the same in every process: each
    process places the pieces its own devices hold.
    """
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return value
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _example_layout(count: int, shards: int):
    """Round-robin deal of ``count`` examples to ``shards`` devices, shard-major.

    Returns ``(source, valid)``, both of length ``shards * ceil(count / shards)``:
    position ``k * m + s`` (shard k, slot s, m per shard) holds example
    ``s * shards + k``; positions past the end repeat example 0 and are not valid.
    Shard k holds ``ceil((count - k) / shards) >= 1`` real examples when
    ``shards <= count``.
    """
    per = math.ceil(count / shards)
    source = np.arange(per * shards).reshape(per, shards).T.reshape(-1)
    valid = source < count
    return np.where(valid, source, 0), valid


class _Operator(NamedTuple):
    """The GGN's data placed on the mesh: params and preconditioner replicated, examples as the plan says."""

    params: object
    inputs: object
    targets: object
    weights: object  # (M',) weights of the examples (data axis), or of the curvature sample, or None
    indices: object  # (M,) curvature sample indices without a data axis, else None
    total_weight: object  # () sum of the weights of the examples that define the GGN
    preconditioner: object


def _place_operator(plan: MeshPlan, task: Task, curvature, preconditioner, dtype) -> _Operator:
    mesh = plan.mesh
    rep = NamedSharding(mesh, P())
    put = lambda tree, sharding: jax.tree_util.tree_map(lambda a: _global(a, sharding), tree)
    params = put(task.params, rep)
    pre = None if preconditioner is None else put(preconditioner, rep)
    if plan.data_axis is None:
        inputs, targets = put(task.inputs, rep), put(task.targets, rep)
        if curvature is None:
            return _Operator(params, inputs, targets, None, None, None, pre)
        return _Operator(params, inputs, targets, put(curvature.weights, rep), put(curvature.indices, rep), None,
                         pre)
    if curvature is None:
        examples = np.arange(task.num_examples)
        weights = np.ones(task.num_examples, dtype)
    else:
        examples = np.asarray(curvature.indices)
        weights = np.asarray(curvature.weights, dtype)
    source, valid = _example_layout(examples.size, plan.data_shards)
    rows = examples[source]
    shard = NamedSharding(mesh, P(plan.data_axis))
    take = lambda tree: jax.tree_util.tree_map(lambda a: _global(np.asarray(a)[rows], shard), tree)
    placed_w = _global(np.where(valid, weights[source], 0).astype(dtype), shard)
    total = _global(np.asarray(weights.sum(), dtype), rep)
    return _Operator(params, take(task.inputs), take(task.targets), placed_w, None, total, pre)


def _specs(plan: MeshPlan, op: _Operator) -> _Operator:
    """shard_map specs for the fields of a placed :class:`_Operator` (pytree prefixes)."""
    data = P() if plan.data_axis is None else P(plan.data_axis)
    spec = lambda field, s: None if field is None else s
    return _Operator(P(), data, data, spec(op.weights, data), spec(op.indices, P()), spec(op.total_weight, P()),
                     spec(op.preconditioner, P()))


# ------------------------------------------------------------------------------------------- the solve


@eqx.filter_jit
def _sharded_block(plan: MeshPlan, fns, op: _Operator, stack, index, settings, batch_size, product_dtype=None):
    """Solves block ``index`` of ``stack`` (T, S * block, p); rows sharded over the rhs axis.

    ``settings``: ``(lam, rtol, atol, max_steps, max_restarts)`` as replicated arrays,
    so that new values reuse the compiled program.
    """
    apply_fn, loss_fn = fns
    data_axis = plan.data_axis
    rows_spec = P() if plan.rhs_axis is None else P(plan.rhs_axis)

    def per_device(op, stack, index, settings):
        lam = settings[0]
        rhs = lax.dynamic_index_in_dim(stack, index, axis=0, keepdims=False)
        task = Task(apply_fn, loss_fn, op.params, op.inputs, op.targets)
        if data_axis is None:
            curvature = None if op.indices is None else CurvatureSample(op.indices, op.weights)

            def product(t):
                return ggn_block_fn(t, batch_size=batch_size, curvature=curvature)

            any_ = jnp.any
        else:
            local = jnp.arange(op.weights.shape[0], dtype=jnp.int32)
            local_weight = jnp.sum(op.weights)  # > 0: every shard holds a real example

            def product(t):  # sum of this shard's weighted J^T W J v, added over the data axis
                share = ggn_block_fn(t, batch_size=batch_size, curvature=CurvatureSample(local, op.weights))
                return lambda block: lax.psum(share(block) * local_weight.astype(block.dtype), data_axis) \
                    / op.total_weight.astype(block.dtype)

            def any_(flags):  # all devices along the data axis take the same decision
                return lax.psum(jnp.any(flags).astype(jnp.int32), data_axis) > 0

        minv = None if op.preconditioner is None else op.preconditioner.inverse(lam)
        mv_low = None if product_dtype is None else low_precision(product, task, product_dtype)
        return solve_system(product(task), minv, rhs, *settings, any_, mv_low=mv_low,
                             inner=0.0 if product_dtype is None else inner_rtol(product_dtype))

    stack_spec = P() if plan.rhs_axis is None else P(None, plan.rhs_axis)
    fn = jax.shard_map(
        per_device,
        mesh=plan.mesh,
        in_specs=(_specs(plan, op), stack_spec, P(), P()),
        out_specs=(rows_spec,) * 4,
        # Per-device loops with different trip counts: replication is not tracked through them.
        check_vma=False,
    )
    return fn(op, stack, index, settings)


def _layout(num: int, shards: int, rhs_batch_size: int | None):
    """Where row r of the right-hand sides goes: ``(source, position, num_blocks, block)``.

    Device k (of ``shards``) takes rows ``[k * m, (k + 1) * m)``, ``m = ceil(num / shards)``,
    in ``num_blocks`` calls of ``block`` rows. ``source`` (num_blocks, shards * block)
    names the row at each slot (-1: a zero padding system); ``position`` is its
    inverse, the flat slot of each row.
    """
    per = math.ceil(num / shards)
    block = balanced_block(per, rhs_batch_size)
    num_blocks = math.ceil(per / block)
    t, k, s = np.meshgrid(np.arange(num_blocks), np.arange(shards), np.arange(block), indexing="ij")
    local = t * block + s
    row = k * per + local
    source = np.where((local < per) & (row < num), row, -1).reshape(num_blocks, shards * block)
    position = np.empty(num, np.int64)
    flat = source.reshape(-1)
    position[flat[flat >= 0]] = np.flatnonzero(flat >= 0)
    return source, position, num_blocks, block


def solve_rows(plan: MeshPlan, kernel, rhs, settings, rhs_batch_size, progress, preconditioner=None,
               product_dtype=None):
    """The sharded counterpart of the block loop of :func:`cif_jax.solve_ggn` (validated inputs).

    ``kernel``: the operator's :class:`cif_jax.solvers.operator.GGNKernel`; ``settings``:
    ``(rtol, atol, max_steps, max_restarts)``.

    Returns ``(solutions, residuals, num_steps, converged)`` as ordinary arrays on
    this process's first local device, every row in every process.
    """
    mesh = plan.mesh
    num, p = rhs.shape
    dtype = rhs.dtype
    source, position, num_blocks, block = _layout(num, plan.rhs_shards, rhs_batch_size)
    rep = NamedSharding(mesh, P())
    stack_sharding = NamedSharding(mesh, P() if plan.rhs_axis is None else P(None, plan.rhs_axis))

    def arrange(rows, source):
        picked = jnp.take(rows, jnp.maximum(source, 0), axis=0)
        return jnp.where((source >= 0)[..., None], picked, jnp.zeros((), rows.dtype))

    stack = jax.jit(arrange, out_shardings=stack_sharding)(_global(rhs, rep), _global(source, rep))
    task, batch_size = kernel.task, kernel.batch_size
    op = _place_operator(plan, task, kernel.curvature, preconditioner, np.dtype(dtype))
    fns = (task.apply_fn, task.loss_fn)
    rtol, atol, max_steps, max_restarts = settings
    lam = np.asarray(kernel.damping)
    settings = tuple(_global(np.asarray(v, t), rep) for v, t in
                     ((lam, dtype), (rtol, dtype), (atol, dtype), (max_steps, np.int32), (max_restarts, np.int32)))

    blocks = range(num_blocks)
    if progress:
        from tqdm.auto import tqdm

        blocks = tqdm(blocks, desc="CG solves (sharded)", unit="block")
    outs = [
        _sharded_block(plan, fns, op, stack, _global(np.asarray(t, np.int32), rep), settings, batch_size,
                       product_dtype)
        for t in blocks
    ]

    def gather(outs, position):
        return tuple(jnp.take(jnp.concatenate(col), position, axis=0) for col in zip(*outs))

    whole = jax.jit(gather, out_shardings=rep)(outs, _global(position, rep))
    home = jax.local_devices()[0]
    return tuple(jax.device_put(a.addressable_data(0), home) for a in whole)
