"""Damped-GGN solvers: ``H~ x = b`` for many right-hand sides, with true residuals.

Every solve in cif_jax (the C cluster systems of a cache, paper eq. 8; the Q
per-query systems of IF, eq. 3; the correction's calibration systems) goes
through one solver object, passed as ``solver=``: :class:`CG` (the default),
:class:`cif_jax.LiSSA`, or :class:`LineaxSolver`. A solver is an immutable
settings object, like lineax's; :meth:`AbstractSolver.solve` solves a block of
right-hand sides on a damped-GGN operator (:class:`cif_jax.DampedGGN`, which holds
the task, damping, curvature sample, chunks and mesh) and returns a
:class:`SolveResult` whose residuals are recomputed after the solve, whatever the
solver: ``solver.solve(operator, rhs)``, as lineax's ``linear_solve(operator, b,
solver)``.

:class:`CG` runs block conjugate gradients (:mod:`cif_jax.solvers.cg`). Its
``preconditioner`` is ``"auto"`` by default: a cost model
(:func:`cif_jax.solvers.precondition.auto_nystrom`) picks plain CG or a Nystrom
preconditioner, and its rank, from the number of systems and the spectrum a
small probe sketch sees. :meth:`CG.prepare` makes that choice (or builds the
named preconditioner) once, so that several solves can share it.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import warnings
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ..core import checkpoint as _checkpoint
from ..core import checks as _checks
from ..core.checks import as_key
from ..core.chunks import row_blocks
from ..core.ggn import ggn_block_fn
from ..core.task import Task
from . import distributed as _distributed
from . import jacobi as _jacobi
from . import kfac as _kfac
from . import precondition as _precondition
from .cg import balanced_block, check_product_dtype, inner_rtol, low_precision, solve_system
from .operator import DampedGGN, GGNKernel, check_operator
from .precondition import NystromPreconditioner, Preconditioner

#: The PRNG key of a randomized preconditioner build when the caller passes none.
DEFAULT_KEY_SEED = 0


class SolveResult(NamedTuple):
    """Solutions of ``H~ x = b`` with their true residuals.

    Attributes:
        solutions: (R, p) the solutions x.
        residuals: (R,) true relative residuals ``||b - H~ x||_2 / ||b||_2`` (0 for b = 0),
            recomputed after the solve (paper eq. 9).
        num_steps: (R,) iterations spent, restarts included.
        converged: (R,) whether ``||b - H~ x||_2 <= rtol ||b||_2 + atol``.
    """

    solutions: Float[Array, "r p"]
    residuals: Float[Array, " r"]
    num_steps: Int[Array, " r"]
    converged: Bool[Array, " r"]


class AbstractSolver(eqx.Module):
    """The interface every solver implements (:class:`CG`, :class:`cif_jax.LiSSA`, :class:`LineaxSolver`).

    Every solver has fields ``rtol`` and ``atol`` that judge its results: a system
    has converged when its true residual satisfies ``||b - H~ x||_2 <= rtol ||b||_2
    + atol`` (paper eq. 9).
    """

    @property
    @abc.abstractmethod
    def step_budget(self) -> int:
        """The most iterations one system may take (recorded in a cache)."""

    @abc.abstractmethod
    def solve(self, operator: DampedGGN, rhs, *, key=None, progress: bool = False, warn: bool = True) -> SolveResult:
        """Solves ``H~ x_r = b_r`` for every row of ``rhs``; residuals are recomputed after the solve.

        Args:
            operator: the damped GGN (:class:`cif_jax.DampedGGN`). Its mesh, if any, is
                for solvers that support one (:attr:`supports_mesh`).
            rhs: (R, p) right-hand sides.
            key: PRNG key of randomized preconditioner builds (None: a fixed key).
            progress: show progress.
            warn: warn when some system misses the tolerance.
        """

    @abc.abstractmethod
    def describe(self) -> str:
        """A short stable description of the settings (recorded in a cache)."""

    def prepare(self, operator: DampedGGN, num_systems: int, *, key=None, progress: bool = False) -> AbstractSolver:
        """This solver with everything it builds from the operator built (a preconditioner); itself by default."""
        return self

    @property
    def prepared(self) -> bool:
        """Whether :meth:`prepare` has nothing left to build."""
        return True

    @property
    def supports_mesh(self) -> bool:
        """Whether :meth:`solve` takes an operator with a ``mesh``."""
        return False

    def built_preconditioner(self) -> Preconditioner | None:
        """The built preconditioner this solver uses, if any (None by default).

        A cache asks it for low-rank factors (:meth:`Preconditioner.low_rank`) before
        building its own.
        """
        return None

    def adopt(self, preconditioner: Preconditioner) -> AbstractSolver:
        """This solver using ``preconditioner`` where it would otherwise build its own; itself by default.

        A cache passes the low-rank factors it built, which then precondition its solves too.
        """
        return self

    def check_mesh(self, operator: DampedGGN) -> None:
        """Raises when ``operator`` has a mesh and this solver cannot spread its solves over one."""
        if operator.mesh is not None and not self.supports_mesh:
            raise ValueError(f"`mesh` applies to cif_jax.CG; {type(self).__name__} runs on one device. Drop it or "
                             "use cif_jax.CG().")

    def _judge(self, result: SolveResult, rhs, warn: bool, what: str, hint: str) -> SolveResult:
        """``result`` with ``converged`` from its true residuals (``rhs=None``: as it is), warning on a miss."""
        if rhs is not None:
            bnorm = jnp.linalg.norm(jnp.asarray(rhs, result.solutions.dtype), axis=1)
            result = result._replace(converged=result.residuals * bnorm <= self.rtol * bnorm + self.atol)
        ok = result.converged
        if warn and not bool(ok.all()):
            bad = np.flatnonzero(~np.asarray(ok))
            warnings.warn(
                f"{bad.size} of {ok.size} {what} solves did not reach the requested tolerance (rtol={self.rtol:g}, "
                f"atol={self.atol:g}): largest true relative residual {float(result.residuals.max()):.3g} (systems "
                f"{bad[:10].tolist()}). {hint} The residuals are stored and enter the error bound.",
                stacklevel=4,
            )
        return result


def _build_jacobi(operator, **_):
    return _jacobi.build_jacobi(operator), ""


def _build_kfac(eigen_corrected):
    def build(operator, **_):
        return _kfac.build_kfac(operator, eigen_corrected), ""

    return build


def _build_auto(force: bool):
    def build(operator, *, num_systems, rtol, key, rhs_batch_size, max_rank, progress):
        return _precondition.auto_nystrom(
            operator, num_systems=num_systems, rtol=rtol, key=key, rhs_batch_size=rhs_batch_size or 16,
            max_rank=max_rank, progress=progress, force=force)

    return build


#: The preconditioners :class:`CG` builds by name.
BUILDERS = {
    "auto": _build_auto(force=False),
    "nystrom": _build_auto(force=True),
    "jacobi": _build_jacobi,
    "kfac": _build_kfac(False),
    "ekfac": _build_kfac(True),
}


class CG(AbstractSolver):
    """Block conjugate gradients on the damped GGN, with true-residual restarts (the default solver).

    Each system runs its own CG iteration (its own step sizes and stopping rule);
    a block of systems shares one pass over the data per iteration. After CG the
    true residual is recomputed and CG restarts from the iterate while it misses
    the tolerance.

    Attributes:
        rtol, atol: stop when ``||b - H~ x||_2 <= rtol ||b||_2 + atol`` (paper eq. 9).
            In float32 CG stalls near 1e-6; ask for less.
        max_steps: iterations per system, restarts included.
        max_restarts: restarts from the current iterate while the recomputed true
            residual is above tolerance.
        rhs_batch_size: at most this many systems solved together per block (default
            16; None: all). Memory grows with it; on a CPU a block of 16 costs 0.9x
            16 single products, and larger blocks cost more per vector. The systems
            are split into equal blocks (50 with at most 16 per block: 4 blocks of
            13), the last zero-padded.
        preconditioner: ``"auto"`` (default: plain CG or a Nystrom preconditioner,
            and its rank, chosen by a cost model from the number of systems and a
            probe of the spectrum; see :func:`cif_jax.solvers.precondition.auto_nystrom`),
            ``"nystrom"`` (always Nystrom, rank by the same model), ``"jacobi"``,
            ``"kfac"``, ``"ekfac"``, None or ``"none"`` (plain CG), or a built
            :class:`cif_jax.solvers.precondition.Preconditioner` for this task and curvature.
            It changes the iteration count, not the tolerance.
        product_dtype: a floating dtype of lower precision than the task's to run the
            CG iterations' GGN products in (None: the task's). The solve becomes
            mixed-precision iterative refinement: each CG pass runs on the cheap
            products to relative tolerance sqrt(eps) of ``product_dtype``, every
            restart starts from the true residual in the task's dtype, and the
            reported residuals are those of full precision. Each refinement counts
            as a restart. A refinement that does not lower the true residual is
            undone and ends that system's refinement.
        max_rank: the largest Nystrom rank ``"auto"`` and ``"nystrom"`` consider.
        choice: set by :meth:`prepare`: what ``"auto"`` chose, and why.

    Example:
        >>> solver = cj.CG(rtol=1e-5).prepare(cj.DampedGGN(task, damping=1e-3), num_systems=160)
        >>> cache = cj.build_cache(task, num_clusters=10, sketch_dim=32, damping=1e-3, key=key, solver=solver)
        >>> deltas = cj.influence(task, folds, damping=1e-3, solver=solver)  # the same preconditioner
    """

    rtol: float = eqx.field(static=True, default=1e-4)
    atol: float = eqx.field(static=True, default=0.0)
    max_steps: int = eqx.field(static=True, default=1000)
    max_restarts: int = eqx.field(static=True, default=3)
    rhs_batch_size: int | None = eqx.field(static=True, default=16)
    preconditioner: object = "auto"
    product_dtype: object = eqx.field(static=True, default=None)
    max_rank: int = eqx.field(static=True, default=_precondition.DEFAULT_MAX_RANK)
    choice: str = eqx.field(static=True, default="")

    def __check_init__(self):
        _checks.solver_settings(self.rtol, self.atol, self.max_steps, self.max_restarts)
        _checks.positive_int(self.rhs_batch_size, "CG.rhs_batch_size", allow_none=True)
        _checks.positive_int(self.max_rank, "CG.max_rank")
        pre = self.preconditioner
        if isinstance(pre, str):
            if pre != "none" and pre not in BUILDERS:
                raise ValueError(f"`CG.preconditioner` must be one of {['none', *BUILDERS]}, None or a built "
                                 f"preconditioner; got {pre!r}.")
        elif pre is not None and not isinstance(pre, Preconditioner):
            raise TypeError(f"`CG.preconditioner` must be one of {['none', *BUILDERS]}, None or a built "
                            f"preconditioner (cif_jax.nystrom_preconditioner(...), ...); got {type(pre).__name__}.")
        if self.product_dtype is not None:
            check_product_dtype(self.product_dtype, jnp.float64)

    @property
    def step_budget(self) -> int:
        return self.max_steps

    @property
    def supports_mesh(self) -> bool:
        return True

    @property
    def prepared(self) -> bool:
        """Whether the preconditioner is settled (built, or none): :meth:`prepare` has nothing left to do."""
        return not isinstance(self.preconditioner, str) or self.preconditioner == "none"

    def describe(self) -> str:
        pre = self.preconditioner
        name = "none" if pre is None else pre if isinstance(pre, str) else pre.describe()
        extra = "" if self.product_dtype is None else f",product_dtype={jnp.dtype(self.product_dtype).name}"
        return (f"cg(rtol={self.rtol:g},atol={self.atol:g},max_steps={self.max_steps},"
                f"max_restarts={self.max_restarts},preconditioner={name}{extra})")

    def built_preconditioner(self):
        return self.preconditioner if isinstance(self.preconditioner, Preconditioner) else None

    def adopt(self, preconditioner):
        if isinstance(self.preconditioner, str) and self.preconditioner in ("auto", "nystrom"):
            return dataclasses.replace(self, preconditioner=preconditioner, choice="shared Nystrom factors")
        return self

    def prepare(self, operator, num_systems, *, key=None, progress=False):
        """This CG with its preconditioner built (or ``"auto"`` decided) for ``operator``; a settled one as is.

        Args:
            operator: the :class:`cif_jax.DampedGGN` of the solves it will serve (a
                preconditioner belongs to one task and curvature sample).
            num_systems: how many systems it will solve (``"auto"`` weighs its build
                against this many solves; pass the total when it serves several calls).
            key: PRNG key of the Nystrom sketch (None: ``jax.random.key(0)``).
            progress: show progress.
        """
        if self.prepared:
            return self if self.preconditioner != "none" else dataclasses.replace(self, preconditioner=None)
        operator = check_operator(operator)
        num_systems = _checks.positive_int(num_systems, "num_systems")
        key = jax.random.key(DEFAULT_KEY_SEED) if key is None else as_key(key)
        built, note = BUILDERS[self.preconditioner](
            operator, num_systems=num_systems, rtol=self.rtol, key=key, rhs_batch_size=self.rhs_batch_size,
            max_rank=self.max_rank, progress=progress)
        return dataclasses.replace(self, preconditioner=built, choice=note or self.preconditioner)

    def solve(self, operator, rhs, *, key=None, progress=False, warn=True):
        operator = check_operator(operator)
        rhs = operator.rows(rhs)
        _distributed.finite_rows(rhs, "right-hand sides", what="row")
        rhs = rhs.astype(operator.dtype)
        product_dtype = check_product_dtype(self.product_dtype, operator.dtype)
        solver = self.prepare(operator, rhs.shape[0], key=key, progress=progress)
        pre = solver.preconditioner
        if pre is not None:
            pre = pre.check(operator).for_jit()
        settings = (self.rtol, self.atol, self.max_steps, self.max_restarts)
        plan = operator.plan
        if plan is None:
            x, res, steps, ok = _solve_local(operator.kernel(), rhs, settings, self.rhs_batch_size, progress, pre,
                                             product_dtype)
        else:
            x, res, steps, ok = _distributed.solve_rows(plan, operator.kernel(), rhs, settings, self.rhs_batch_size,
                                                        progress, pre, product_dtype)
        hint = (f"Raise `max_steps` (now {self.max_steps}), increase `damping`, or loosen `rtol`"
                + (" (float32 CG stalls near 1e-6)." if rhs.dtype == jnp.float32 else "."))
        # The kernel judged convergence on the unscaled residuals (rhs may be a global array here).
        return self._judge(SolveResult(x, res, steps, ok), None, warn, "CG", hint)


def _two_norm(tree):
    """The 2-norm of a pytree (lineax's stopping test with this norm is the paper's eq. 9)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree_util.tree_leaves(tree)))


class LineaxSolver(AbstractSolver):
    """A lineax solver on the damped GGN, vmapped over the right-hand sides, with true residuals and restarts.

    The lineax solver (e.g. ``lineax.CG``, ``lineax.GMRES``) solves the scaled
    systems ``(I + GGN / lambda) y = b / ||b||`` that :class:`CG` solves, each
    system in its own iteration (``jax.vmap`` over a block of right-hand sides).
    After it, the true residual of ``H~ x = b`` is recomputed; systems above
    ``rtol ||b|| + atol`` are solved again for the residual (at most
    ``max_restarts`` times). :meth:`cg` configures ``lineax.CG`` so that its own
    stopping test is eq. 9 (2-norm, relative to ``||b||``), since lineax's default
    test is elementwise.

    Attributes:
        solver: the lineax solver (an ``lineax.AbstractLinearSolver`` that works on a
            matrix-free positive semidefinite operator).
        rtol, atol: judge the result: ``||b - H~ x||_2 <= rtol ||b||_2 + atol``.
        max_restarts: solves of the residual system while the true residual misses it.
        rhs_batch_size: systems per vmapped block (None: all).
        preconditioner: None or a built :class:`cif_jax.solvers.precondition.Preconditioner`,
            passed to lineax as ``options["preconditioner"]``.

    Example:
        >>> solver = cj.LineaxSolver.cg(rtol=1e-4, max_steps=1000)
        >>> solver = cj.LineaxSolver(lineax.GMRES(rtol=1e-6, atol=1e-6), rtol=1e-4)
    """

    solver: object
    rtol: float = eqx.field(static=True, default=1e-4)
    atol: float = eqx.field(static=True, default=0.0)
    max_restarts: int = eqx.field(static=True, default=3)
    rhs_batch_size: int | None = eqx.field(static=True, default=None)
    preconditioner: object = None

    def __check_init__(self):
        import lineax as lx

        if not isinstance(self.solver, lx.AbstractLinearSolver):
            raise TypeError(f"`LineaxSolver.solver` must be a lineax solver such as lineax.CG(...); got "
                            f"{type(self.solver).__name__}.")
        _checks.solver_settings(self.rtol, self.atol, 1, self.max_restarts)
        _checks.positive_int(self.rhs_batch_size, "LineaxSolver.rhs_batch_size", allow_none=True)
        if self.preconditioner is not None and not isinstance(self.preconditioner, Preconditioner):
            raise TypeError("`LineaxSolver.preconditioner` must be None or a built preconditioner; got "
                            f"{type(self.preconditioner).__name__}.")

    @classmethod
    def cg(cls, *, rtol: float = 1e-4, max_steps: int = 1000, max_restarts: int = 3, rhs_batch_size=None,
           preconditioner=None, stabilise_every: int | None = None) -> LineaxSolver:
        """``lineax.CG`` whose stopping test is eq. 9: 2-norm, ``rtol`` relative to ``||b||``.

        On the normalised scaled system, lineax's test with ``rtol=0``, ``atol=rtol``
        and a 2-norm is ``||r||_2 <= rtol``. ``stabilise_every=None`` keeps the
        recursive residual (replacing it periodically made float32 CG diverge on
        ill-conditioned GGNs; the true residual is checked afterwards instead).
        """
        import lineax as lx

        _checks.solver_settings(rtol, 0.0, max_steps, max_restarts)
        inner = lx.CG(rtol=0.0, atol=rtol, norm=_two_norm, stabilise_every=stabilise_every, max_steps=max_steps)
        return cls(inner, rtol=rtol, atol=0.0, max_restarts=max_restarts, rhs_batch_size=rhs_batch_size,
                   preconditioner=preconditioner)

    @property
    def step_budget(self) -> int:
        steps = getattr(self.solver, "max_steps", None)
        return -1 if steps is None else int(steps) * (self.max_restarts + 1)

    def describe(self) -> str:
        pre = "none" if self.preconditioner is None else self.preconditioner.describe()
        return (f"lineax({type(self.solver).__name__},rtol={self.rtol:g},atol={self.atol:g},"
                f"max_restarts={self.max_restarts},preconditioner={pre})")

    def built_preconditioner(self):
        return self.preconditioner

    def solve(self, operator, rhs, *, key=None, progress=False, warn=True):
        operator = check_operator(operator)
        self.check_mesh(operator)
        rhs = operator.rows(rhs)
        _checks.finite_rows(rhs, "right-hand sides", what="row")
        rhs = rhs.astype(operator.dtype)
        pre = self.preconditioner
        if pre is not None:
            pre = pre.check(operator).for_jit()
        kernel = operator.kernel()
        settings = (jnp.asarray(self.rtol, rhs.dtype), jnp.asarray(self.atol, rhs.dtype))
        x, res, steps = _in_blocks(rhs, self.rhs_batch_size, lambda chunk: _lineax_block(
            kernel, chunk, *settings, self.solver, pre, self.max_restarts), progress, "lineax solves")
        result = SolveResult(x, res, steps, jnp.ones(res.shape, bool))
        return self._judge(result, rhs, warn, "lineax", "Raise the lineax solver's `max_steps`, increase "
                           "`damping`, or loosen `rtol`.")


@eqx.filter_jit
def _lineax_block(kernel: GGNKernel, rhs, rtol, atol, lsolver, preconditioner, max_restarts):
    import lineax as lx

    lam = kernel.damping.astype(rhs.dtype)
    mv = kernel.undamped()
    block = kernel.undamped_block()
    p, dtype = rhs.shape[1], rhs.dtype
    struct = jax.ShapeDtypeStruct((p,), dtype)
    op = lx.FunctionLinearOperator(lambda y: y + mv(y) / lam, struct, tags=lx.positive_semidefinite_tag)
    options = {}
    if preconditioner is not None:
        minv = preconditioner.inverse(lam)
        options["preconditioner"] = lx.FunctionLinearOperator(lambda r: minv(r[None])[0], struct,
                                                              tags=lx.positive_semidefinite_tag)

    def one(b):
        sol = lx.linear_solve(op, b, lsolver, options=options, throw=False)
        return sol.value, jnp.asarray(sol.stats["num_steps"], jnp.int32)

    bnorm = jnp.linalg.norm(rhs, axis=1)
    scale = jnp.where(bnorm > 0, bnorm, jnp.ones((), dtype))
    bhat = rhs / scale[:, None]
    target = rtol + atol / scale

    def residual(y):  # true residual of H~ x = b, relative to ||b||, with x = ||b|| y / lambda
        x = y * (scale / lam)[:, None]
        return jnp.linalg.norm(rhs - (block(x) + lam * x), axis=1) / scale

    y, steps = jax.vmap(one)(bhat)
    y = jnp.where(jnp.isfinite(y), y, 0)
    res = residual(y)

    def cond(state):
        _, _, res, k = state
        return jnp.any(res > target) & (k < max_restarts)

    def body(state):
        y, steps, res, k = state
        redo = res > target
        r = jnp.where(redo[:, None], bhat - jax.vmap(op.mv)(y), 0)
        dy, more = jax.vmap(one)(r)
        y_new = y + jnp.where(jnp.isfinite(dy), dy, 0)
        res_new = residual(y_new)
        better = redo & (res_new < res)
        return (jnp.where(better[:, None], y_new, y), steps + jnp.where(redo, more, 0),
                jnp.where(better, res_new, res), k + 1)

    y, steps, res, _ = jax.lax.while_loop(cond, body, (y, steps, res, jnp.asarray(0, jnp.int32)))
    return y * (scale / lam)[:, None], res, steps


def check_solver(solver) -> AbstractSolver:
    """``solver=``: None (a default :class:`CG`) or a solver object."""
    if solver is None:
        return CG()
    if not isinstance(solver, AbstractSolver):
        raise TypeError(
            f"`solver` must be None or a solver object (cif_jax.CG(...), cif_jax.LiSSA(...), "
            f"cif_jax.LineaxSolver(...)); got {solver!r}."
        )
    return solver


def prepare_checkpointed(solver: AbstractSolver, checkpoint, prepare) -> AbstractSolver:
    """``prepare()`` (the prepared ``solver``), its preconditioner saved in ``checkpoint`` and read back on resume.

    A :class:`CG` that settled on plain CG or on a Nystrom preconditioner is saved
    (the factors, and what "auto" chose); any other preconditioner (Jacobi, K-FAC) is
    rebuilt on resume, which its build's fixed key makes the same.
    """
    name = "preconditioner"
    if isinstance(solver, CG) and name in checkpoint:
        saved = checkpoint.load(name)
        choice = str(saved["__choice__"])
        if "__plain__" in saved:
            return dataclasses.replace(solver, preconditioner=None, choice=choice)
        pre = _checkpoint.module_from_arrays(NystromPreconditioner, saved)
        return dataclasses.replace(solver, preconditioner=pre, choice=choice)
    prepared = prepare()
    if isinstance(prepared, CG) and (prepared.preconditioner is None
                                     or isinstance(prepared.preconditioner, NystromPreconditioner)):
        arrays = {"__choice__": np.asarray(prepared.choice)}
        if prepared.preconditioner is None:
            arrays["__plain__"] = np.asarray(True)
        else:
            arrays.update(_checkpoint.module_arrays(prepared.preconditioner))
        checkpoint.save(name, arrays)
    return prepared


def solve_checkpointed(solver: AbstractSolver, operator: DampedGGN, rhs, *, checkpoint, name: str, key=None,
                       progress=False, warn=True) -> SolveResult:
    """``solver.solve`` block by block, each block's :class:`SolveResult` saved in ``checkpoint`` as it finishes.

    The blocks are those the solver would form (:func:`cif_jax.solvers.cg.balanced_block`
    of its ``rhs_batch_size``, times the devices of a mesh's ``"rhs"`` axis), so the
    result equals one uninterrupted solve to the solver's tolerance. A resumed run
    reads the finished blocks and solves the rest. Each block's name carries a
    digest of its right-hand sides, so a block is only ever read back for the very
    systems it solved (other rows, e.g. after a change of ``batch_size`` regrouped
    them, are solved again). ``solver`` should be prepared
    (:meth:`AbstractSolver.prepare`): each block is one call.
    """
    num = int(rhs.shape[0])
    devices, mesh = 1, operator.mesh
    if mesh is not None and "rhs" in mesh.shape:
        devices = int(mesh.shape["rhs"])
    block = min(num, balanced_block(-(-num // devices), getattr(solver, "rhs_batch_size", None)) * devices)
    starts = range(0, num, block)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"{name} (checkpointed)", unit="block", total=math.ceil(num / block))
    parts = []
    for start in starts:
        stop = min(num, start + block)
        parts.append(checkpoint.arrays(
            f"{name}-{start:07d}-{stop:07d}-{_checkpoint.digest(rhs[start:stop])}",
            lambda start=start, stop=stop: solver.solve(
                operator, rhs[start:stop], key=key, progress=False, warn=False)._asdict()))
    result = SolveResult(*(jnp.concatenate([jnp.asarray(part[field]) for part in parts])
                           for field in SolveResult._fields))
    return solver._judge(result, None, warn, type(solver).__name__,
                         "Raise the solver's step budget, increase `damping`, or loosen `rtol`.")


def solve_ggn(
    task: Task,
    rhs: Float[Array, "r p"],
    *,
    damping: float,
    solver: AbstractSolver | None = None,
    batch_size: int | None = None,
    curvature=None,
    mesh=None,
    key=None,
    progress: bool = False,
    warn: bool = True,
) -> SolveResult:
    """Solves ``H~ x_r = b_r`` for every row of ``rhs``, reporting true residuals.

    The convenient form of ``solver.solve(cj.DampedGGN(task, damping=..., ...), rhs)``;
    make the operator once instead when several calls share it.

    The results do not depend on ``batch_size`` or the solver's ``rhs_batch_size``
    beyond float rounding: each system runs its own iteration; blocks only share
    the data passes.

    Args:
        task: the model snapshot and training data.
        rhs: (R, p) right-hand sides (for the cache: cluster means, eq. 8; for IF:
            gradient sums, eq. 3).
        damping: lambda > 0 of eq. (2).
        solver: a solver object (None: ``cif_jax.CG()``, preconditioner ``"auto"``).
        batch_size: examples per chunk of each GGN product (None: chosen for a memory budget, see :func:`cif_jax.core.chunks.budget_batch_size`).
        curvature: a :class:`cif_jax.CurvatureSample`: the GGN of a weighted subset of
            the examples (None: all N).
        mesh: a ``jax.sharding.Mesh`` to spread the solves over (None: one device). The
            rows of ``rhs`` are split over its axis ``"rhs"``, each device running its
            own CG on its share (``rhs_batch_size`` then counts systems per device);
            the examples are split over its axis ``"data"`` (when it has one) and the
            GGN products summed across it. ``rhs`` may be a global array whose rows
            the processes of a multi-process run hold in parts. The results are the
            single-device ones (to the tolerance and float rounding), whole, in every
            process. :func:`cif_jax.solver_mesh` builds such a mesh.
        key: PRNG key of a randomized preconditioner build (None: a fixed key).
        progress: show progress bars.
        warn: warn when some system did not meet the tolerance.

    Returns:
        A `SolveResult`.
    """
    solver = check_solver(solver)
    operator = DampedGGN(task, damping=damping, curvature=curvature, batch_size=batch_size, mesh=mesh)
    return solver.solve(operator, rhs, key=key, progress=progress, warn=warn)


@eqx.filter_jit
def _solve_block(kernel: GGNKernel, rhs, rtol, atol, max_steps, max_restarts, preconditioner=None,
                 product_dtype=None):
    lam = kernel.damping.astype(rhs.dtype)
    build = lambda t: ggn_block_fn(t, batch_size=kernel.batch_size, curvature=kernel.curvature)
    mv = build(kernel.task)
    mv_low = None if product_dtype is None else low_precision(build, kernel.task, product_dtype)
    minv = None if preconditioner is None else preconditioner.inverse(lam)
    return solve_system(mv, minv, rhs, lam, rtol, atol, max_steps, max_restarts,
                        mv_low=mv_low, inner=0.0 if product_dtype is None else inner_rtol(product_dtype))


def _in_blocks(rhs, rhs_batch_size, solve_block, progress, desc):
    """``solve_block`` on equal blocks of the rows of ``rhs`` (the last zero-padded); the outputs' columns joined."""
    num = rhs.shape[0]
    block = balanced_block(num, rhs_batch_size)
    blocks = row_blocks(rhs, block)
    if progress:
        from tqdm.auto import tqdm

        blocks = tqdm(blocks, desc=desc, unit="block", total=math.ceil(num / block))
    parts = [jax.tree_util.tree_map(lambda a, real=real: a[:real], solve_block(chunk)) for chunk, real in blocks]
    return tuple(jnp.concatenate(col) for col in zip(*parts))


def _solve_local(kernel: GGNKernel, rhs, settings, rhs_batch_size, progress, preconditioner, product_dtype=None):
    """The systems in blocks of ``rhs_batch_size`` on one device; ``settings``: ``(rtol, atol, max_steps,
    max_restarts)``."""
    # Settings as arrays (and lambda in the kernel): new values reuse the compiled program.
    rtol, atol, max_steps, max_restarts = settings
    arrays = (jnp.asarray(rtol, rhs.dtype), jnp.asarray(atol, rhs.dtype), jnp.asarray(max_steps, jnp.int32),
              jnp.asarray(max_restarts, jnp.int32))
    return _in_blocks(rhs, rhs_batch_size, lambda chunk: _solve_block(
        kernel, chunk, *arrays, preconditioner, product_dtype), progress, "CG solves")
