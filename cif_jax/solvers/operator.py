"""The damped GGN as a value: the operator every solve, preconditioner and cache is built on.

:class:`DampedGGN` holds what defines ``H~ = (1/N) sum_i J_i^T W_i J_i + lambda I``
(paper eqs. 1-2): the task, the damping, the curvature sample, and how its
products run (examples per chunk, the devices of a mesh). It checks them and
fingerprints the task once, when it is made; a solver then takes it whole, as
lineax's ``linear_solve(operator, b, solver)`` does:

    >>> op = cj.DampedGGN(task, damping=1e-3, batch_size=256)
    >>> result = cj.CG(rtol=1e-5).solve(op, rhs)
    >>> pre = cj.nystrom_preconditioner(op, key=key, rank=128)

The public entry points (:func:`cif_jax.solve_ggn`, :func:`cif_jax.influence`,
:func:`cif_jax.build_cache`) keep ``(task, damping=..., ...)`` as the convenient
form and make the operator themselves.

Inside jitted code the operator travels as its :class:`GGNKernel` (the arrays and
the damping as a traced scalar, without the fingerprint), so that a new damping or
a new model snapshot of the same shapes reuses the compiled program.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

from ..core import checks as _checks
from ..core import curvature as _curvature
from ..core.curvature import CurvatureSample
from ..core.ggn import ggn_block_fn, ggn_matvec_fn
from ..core.task import Task, fingerprint
from . import distributed as _distributed


class GGNKernel(eqx.Module):
    """What a jitted product needs of a :class:`DampedGGN`: the task, lambda as an array, the sample, the chunks.

    Made by :meth:`DampedGGN.kernel`; it is a pytree whose only static field is
    ``batch_size``, so jitted functions that take it compile once per shape.
    """

    task: Task
    damping: Array
    curvature: CurvatureSample | None
    batch_size: int | None = eqx.field(static=True)

    def undamped(self):
        """``mv(v) -> GGN v`` for one flat (p,) vector, traceable (vmap it over a block)."""
        return ggn_matvec_fn(self.task, batch_size=self.batch_size, curvature=self.curvature)

    def damped(self):
        """``mv(v) -> H~ v = GGN v + lambda v`` for one flat (p,) vector, traceable."""
        mv = self.undamped()
        return lambda v: mv(v) + self.damping.astype(v.dtype) * v

    def undamped_block(self):
        """``mv(V) -> GGN V`` for a (k, p) block, traceable: one data pass, the chunks sized for the block."""
        return ggn_block_fn(self.task, batch_size=self.batch_size, curvature=self.curvature)

    def damped_block(self):
        """``mv(V) -> H~ V`` for a (k, p) block, traceable."""
        mv = self.undamped_block()
        return lambda vs: mv(vs) + self.damping.astype(vs.dtype) * vs


class DampedGGN(eqx.Module):
    """The damped Generalised Gauss-Newton operator of a task, checked once (paper eqs. 1-2).

    ``H~ v = (1/N) sum_i J_i^T W_i J_i v + lambda v``, matrix-free, on flat (p,)
    vectors in ``ravel_pytree(params)`` order. ``W_i`` is the Hessian of ``loss_fn``
    in the model outputs (autodiff); for ``H~`` to be positive definite the loss must
    be convex in the outputs (cross-entropy, squared error, ...).

    Args:
        task: the model snapshot and training data.
        damping: lambda > 0.
        curvature: a :class:`cif_jax.CurvatureSample`: the GGN of a weighted subset of
            the examples (None: all N, equal weights).
        batch_size: examples per chunk of each product (None: chosen for a memory budget, see :func:`cif_jax.core.chunks.budget_batch_size`). Only memory
            and speed depend on it.
        mesh: a ``jax.sharding.Mesh`` that :class:`cif_jax.CG` spreads its solves over
            (see :func:`cif_jax.solve_ggn`); None: one device.

    Attributes:
        fingerprint: :func:`cif_jax.fingerprint` of the task, computed once here;
            preconditioners and caches built on the operator record it.

    Raises:
        ValueError, TypeError: on a bad task, damping, sample, batch size or mesh,
            naming the argument.

    Example:
        >>> op = cj.DampedGGN(task, damping=1e-3)
        >>> hv = op.apply(vectors)  # (k, p) -> (k, p), one data pass
        >>> x = lineax.linear_solve(op.as_lineax(), b, lineax.CG(rtol=1e-6, atol=1e-6)).value
    """

    task: Task
    damping: float = eqx.field(static=True)
    curvature: CurvatureSample | None
    batch_size: int | None = eqx.field(static=True)
    mesh: object = eqx.field(static=True)
    fingerprint: str = eqx.field(static=True)

    def __init__(self, task: Task, *, damping: float, curvature=None, batch_size: int | None = None, mesh=None):
        _checks.task(task)
        self.damping = _checks.damping(damping)
        self.batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
        self.curvature = _curvature.check(curvature, task.num_examples, task.dtype)
        plan = _distributed.check_mesh(mesh)
        if plan is not None:
            _distributed.check_task(plan, task, self.curvature)
        self.mesh = mesh
        self.task = task
        self.fingerprint = fingerprint(task)

    @property
    def num_params(self) -> int:
        """p, the length of the vectors it acts on."""
        return self.task.num_params

    @property
    def num_examples(self) -> int:
        """N, the training examples of the task (the sample may use fewer)."""
        return self.task.num_examples

    @property
    def dtype(self):
        """The floating dtype of the parameters, of every vector it acts on."""
        return self.task.dtype

    @property
    def curvature_size(self) -> int:
        """The examples whose GGN it is: N, or the sample's size."""
        return self.num_examples if self.curvature is None else int(self.curvature.indices.shape[0])

    @property
    def plan(self):
        """How a mesh spreads the solves (None without a mesh)."""
        return _distributed.check_mesh(self.mesh)

    def describe_curvature(self) -> str:
        """``"full"`` or the curvature sample's identifier (recorded in caches and preconditioners)."""
        return _curvature.describe(self.curvature)

    def kernel(self) -> GGNKernel:
        """The jit-friendly view of this operator (see :class:`GGNKernel`)."""
        return GGNKernel(self.task, jnp.asarray(self.damping, self.dtype), self.curvature, self.batch_size)

    def rows(self, rhs, name: str = "rhs"):
        """``rhs`` as an (R, p) array of right-hand sides, with a clear error for any other shape."""
        rhs = _distributed.as_rows(rhs)
        p = self.num_params
        if rhs.ndim != 2 or rhs.shape[1] != p:
            raise ValueError(f"`{name}` must have shape (R, p) = (R, {p}); got {rhs.shape}.")
        if rhs.shape[0] == 0:
            raise ValueError(f"`{name}` has no rows: nothing to solve.")
        return rhs

    def apply(self, vectors: Float[Array, "k p"]) -> Float[Array, "k p"]:
        """``H~ v`` for each row v of ``vectors`` (k, p), jitted; one data pass serves all k."""
        vectors = jnp.asarray(vectors)
        p = self.num_params
        if vectors.ndim != 2 or vectors.shape[1] != p:
            raise ValueError(f"`vectors` must have shape (k, p) = (k, {p}); got {vectors.shape}.")
        return _apply_damped(self.kernel(), vectors.astype(self.dtype))

    def as_lineax(self) -> lx.FunctionLinearOperator:
        """This operator as a ``lineax.FunctionLinearOperator`` tagged symmetric and positive semidefinite.

        ``op.mv(v)`` applies ``H~`` to one flat (p,) vector; ``lineax.CG`` accepts it. Wrap
        calls in ``jax.jit`` (or use it inside ``lineax.linear_solve``) for speed.
        """
        flat, _ = ravel_pytree(self.task.params)
        structure = jax.ShapeDtypeStruct(flat.shape, flat.dtype)
        return lx.FunctionLinearOperator(self.kernel().damped(), structure,
                                         tags=(lx.symmetric_tag, lx.positive_semidefinite_tag))


@eqx.filter_jit
def _apply_damped(kernel: GGNKernel, vectors):
    return kernel.damped_block()(vectors)


def check_operator(operator) -> DampedGGN:
    """``operator=``: a :class:`DampedGGN` (a clear error for a task or anything else)."""
    if isinstance(operator, DampedGGN):
        return operator
    if isinstance(operator, Task):
        raise TypeError("pass the operator, not the task: cif_jax.DampedGGN(task, damping=..., batch_size=..., "
                        "curvature=...), or use the convenient form cif_jax.solve_ggn(task, rhs, damping=...).")
    raise TypeError(f"`operator` must be a cif_jax.DampedGGN(task, damping=...); got {type(operator).__name__}.")
