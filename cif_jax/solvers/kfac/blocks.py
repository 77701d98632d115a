"""Kronecker-factored blocks of the undamped GGN: the preconditioner object and its damped inverses."""

from __future__ import annotations

import hashlib
import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from ...core import checks as _checks
from ..precondition import Preconditioner

#: Default examples per chunk of the factor passes (as the Jacobi preconditioner's).
DEFAULT_BATCH_SIZE = 64
_HIGHEST = lax.Precision.HIGHEST

# ------------------------------------------------------------------------------------------ the objects


class _Layout:
    """Where the blocks live in the flat parameter vector (static, hashable by content).

    ``perm`` lists flat positions: first each block's ``(out, in)`` matrix
    row-major, then the positions with a diagonal block, ascending.
    """

    def __init__(self, perm: np.ndarray, shapes: tuple[tuple[int, int], ...]):
        self.perm = np.asarray(perm, np.int64)
        self.inverse = np.argsort(self.perm)
        self.shapes = tuple((int(o), int(i)) for o, i in shapes)
        digest = hashlib.sha256(self.perm.tobytes() + repr(self.shapes).encode()).hexdigest()
        self._key = digest

    @property
    def num_diagonal(self) -> int:
        return self.perm.size - sum(o * i for o, i in self.shapes)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Layout) and other._key == self._key

    def __repr__(self):
        return f"_Layout(blocks={self.shapes}, diagonal={self.num_diagonal})"


class KFACPreconditioner(Preconditioner):
    """Kronecker-factored blocks of the undamped GGN (K-FAC, or EK-FAC with ``scalings``).

    One block per layer found (see the module docstring), the exact GGN diagonal
    for every other parameter. Stores undamped quantities, so one build serves any
    damping; pass it as ``cif_jax.CG(preconditioner=...)`` to :func:`cif_jax.solve_ggn`,
    :func:`cif_jax.estimators.influence` or :func:`cif_jax.build_cache`, or use it as an
    approximate inverse with :func:`cif_jax.ekfac_solve` / :func:`cif_jax.ekfac_influence`.

    Attributes:
        input_factors: per block, A (in x in), the bias column last when there is one.
        output_factors: per block, G (out x out).
        input_bases, input_eigenvalues: eigendecompositions ``A = Q_A diag(e_A) Q_A^T``
            (eigenvalues clipped at 0).
        output_bases, output_eigenvalues: the same for G.
        scalings: EK-FAC's per-entry second moments (out x in) in the eigenbasis, or
            None for K-FAC.
        diagonal: the GGN diagonal of the parameters in no block, in ``layout`` order
            (ascending flat position).
        layout: the flat positions of the blocks and of the diagonal part.
        layers: one description per block.
        num_params: p.
        fingerprint, curvature, seconds: as :class:`cif_jax.JacobiPreconditioner`.
    """

    input_factors: tuple
    output_factors: tuple
    input_bases: tuple
    input_eigenvalues: tuple
    output_bases: tuple
    output_eigenvalues: tuple
    scalings: tuple | None
    diagonal: Float[Array, " d"]
    layout: _Layout = eqx.field(static=True)
    layers: tuple = eqx.field(static=True)
    num_params: int = eqx.field(static=True)
    fingerprint: str = eqx.field(static=True)
    curvature: str = eqx.field(static=True)
    seconds: float = eqx.field(static=True)

    @property
    def eigen_corrected(self) -> bool:
        """True for EK-FAC."""
        return self.scalings is not None

    @property
    def kind(self) -> str:
        """``"ekfac"`` or ``"kfac"``."""
        return "ekfac" if self.eigen_corrected else "kfac"

    @property
    def size(self) -> int:
        return self.num_params

    def describe(self) -> str:
        return self.kind

    def inverse(self, damping):
        return inverse(self, damping)

    def check_damping(self, damping: float) -> float:
        return check_damping(self, damping)

    def damped_eigenvalues(self, damping: float) -> list:
        """Per block, the (out, in) eigenvalues of the damped block in its Kronecker eigenbasis."""
        lam = _checks.damping(damping)
        return [np.asarray(d) for d in _block_denominators(self, jnp.asarray(lam, self.diagonal.dtype))]


def _block_denominators(pre: KFACPreconditioner, lam):
    """Per block, the eigenvalues (out, in) of the damped block: K-FAC's factored Tikhonov or EK-FAC's."""
    out = []
    for b in range(len(pre.layout.shapes)):
        if pre.scalings is not None:
            out.append(pre.scalings[b] + lam)
            continue
        e_a, e_g = pre.input_eigenvalues[b], pre.output_eigenvalues[b]
        mean_a = jnp.sum(e_a) / e_a.shape[0]
        mean_g = jnp.sum(e_g) / e_g.shape[0]
        ok = (mean_a > 0) & (mean_g > 0)
        # pi of Martens and Grosse (2015, section 6.3); 1 when a factor is zero (its block is
        # zero, and any split of the damping gives lambda I).
        pi = jnp.where(ok, jnp.sqrt(jnp.where(ok, mean_a / jnp.where(ok, mean_g, 1), 1)), 1)
        root = jnp.sqrt(lam)
        out.append((e_g + root / pi)[:, None] * (e_a + pi * root)[None, :])
    return out


def _scaled_power(pre: KFACPreconditioner, lam, exponent: float):
    """``R -> (P / lambda)^exponent R`` on the rows of R, through the blocks' Kronecker eigenbases; traceable."""
    perm, inv = pre.layout.perm, pre.layout.inverse

    def power(d, lam_):  # (d / lambda)^exponent; a plain division for the inverse
        return lam_ / d if exponent == -1.0 else (d / lam_) ** exponent

    def apply(r):
        lam_ = jnp.asarray(lam, r.dtype)
        x = r[:, perm]
        denominators = _block_denominators(pre, lam_)
        parts = []
        start = 0
        for b, (dout, din) in enumerate(pre.layout.shapes):
            n = dout * din
            v = x[:, start : start + n].reshape(-1, dout, din)
            start += n
            qg, qa = pre.output_bases[b], pre.input_bases[b]
            vt = jnp.einsum("jo,kji,il->kol", qg, v, qa, precision=_HIGHEST)
            vt = vt * power(denominators[b], lam_)[None]
            parts.append(jnp.einsum("oj,kjl,il->koi", qg, vt, qa, precision=_HIGHEST).reshape(-1, n))
        parts.append(x[:, start:] * power(pre.diagonal + lam_, lam_)[None, :])
        return jnp.concatenate(parts, axis=1)[:, inv]

    return apply


def inverse(pre: KFACPreconditioner, lam):
    """``R -> lambda P^{-1} R`` on the rows of R, P the damped block-diagonal approximation; traceable.

    The factor lambda matches :func:`cif_jax.solvers.precondition.inverse_fn`'s normalisation for
    the scaled system ``I + GGN / lambda`` (a direction with zero curvature is left
    unchanged).
    """
    return _scaled_power(pre, lam, -1.0)


def inverse_sqrt(pre: KFACPreconditioner, lam):
    """``R -> (P / lambda)^{-1/2} R`` on the rows of R, the symmetric square root of :func:`inverse`; traceable.

    For split preconditioning: ``S (I + GGN / lambda) S`` with this S is the
    (E)K-FAC-whitened operator whose spectrum K-FAC leaves for CG (``benchmarks/run.py``,
    section ``kfac``, sketches it with Nystrom to measure a low-rank correction).
    """
    return _scaled_power(pre, lam, -0.5)


def top_directions(pre: KFACPreconditioner, rank: int) -> np.ndarray:
    """(rank, p) orthonormal rows: the eigenvectors of the block-diagonal approximation with the largest eigenvalues.

    Kronecker products ``q_G[:, o] (x) q_A[:, i]`` (eigenvalue ``e_G[o] e_A[i]``, or
    EK-FAC's ``s_oi``) and unit vectors of the diagonal part, ranked together. A
    candidate test matrix for a Nystrom sketch (``benchmarks/run.py``, section
    ``kfac``, measures it against a random one).
    """
    perm = pre.layout.perm
    candidates = []  # (eigenvalue, block or -1, row, column, start)
    start = 0
    for b, (o, i) in enumerate(pre.layout.shapes):
        if pre.scalings is not None:
            ev = np.asarray(pre.scalings[b])
        else:
            ev = np.outer(np.asarray(pre.output_eigenvalues[b]), np.asarray(pre.input_eigenvalues[b]))
        for flat in np.argsort(ev, axis=None)[::-1][:rank]:
            candidates.append((float(ev.flat[flat]), b, flat // i, flat % i, start))
        start += o * i
    diag = np.asarray(pre.diagonal)
    for j in np.argsort(diag)[::-1][:rank]:
        candidates.append((float(diag[j]), -1, j, 0, start))
    candidates.sort(key=lambda c: -c[0])
    rows = np.zeros((min(rank, len(candidates)), pre.num_params), np.dtype(pre.diagonal.dtype))
    for k, (_, b, row, col, st) in enumerate(candidates[: rows.shape[0]]):
        if b < 0:
            rows[k, perm[st + row]] = 1
        else:
            o, i = pre.layout.shapes[b]
            vec = np.outer(np.asarray(pre.output_bases[b])[:, row], np.asarray(pre.input_bases[b])[:, col])
            rows[k, perm[st : st + o * i]] = vec.reshape(-1)
    return rows



def check_damping(pre: KFACPreconditioner, damping: float) -> float:
    """Raises when a damped factor is singular to working precision; returns lambda.

    The damping added to a factor (K-FAC: ``pi sqrt(lambda)`` to A and
    ``sqrt(lambda) / pi`` to G; EK-FAC: lambda to the re-estimated eigenvalues;
    lambda to the diagonal part) must exceed ``eps`` times the factor's largest
    eigenvalue: below that, the damped factor's condition number
    ``(e_max + delta) / delta`` is above ``1 / eps`` and its small eigenvalues,
    known only to ``eps e_max``, decide the inverse.
    """
    lam = _checks.damping(damping)
    dtype = pre.diagonal.dtype
    eps = float(jnp.finfo(dtype).eps)
    root = math.sqrt(lam)
    worst, where = 0.0, ""

    def consider(top, delta, name):
        nonlocal worst, where
        cond = math.inf if not delta > 0 else (top + delta) / delta
        if cond > worst:
            worst, where = cond, name

    for b, name in enumerate(pre.layers):
        if pre.scalings is not None:
            consider(float(jnp.max(pre.scalings[b])), lam, f"{name}, EK-FAC eigenvalues")
            continue
        e_a, e_g = np.asarray(pre.input_eigenvalues[b]), np.asarray(pre.output_eigenvalues[b])
        mean_a, mean_g = float(e_a.mean()), float(e_g.mean())
        pi = math.sqrt(mean_a / mean_g) if mean_a > 0 and mean_g > 0 else 1.0
        consider(float(e_a.max()), pi * root, f"{name}, factor A")
        consider(float(e_g.max()), root / pi, f"{name}, factor G")
    if pre.diagonal.size:
        consider(float(jnp.max(pre.diagonal)), lam, "diagonal block")
    if not worst * eps < 1:
        kind = "EK-FAC" if pre.eigen_corrected else "K-FAC"
        raise ValueError(
            f"`damping` = {lam:g} makes a damped {kind} factor singular to {np.dtype(dtype).name} "
            f"precision ({where}: condition number {worst:.3g} > 1/eps = {1 / eps:.3g}); raise the damping "
            "or use float64 parameters."
        )
    return lam
