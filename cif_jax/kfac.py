"""Kronecker-factored preconditioners (K-FAC, EK-FAC) for the damped-GGN solves, and an EK-FAC estimator.

The GGN we solve with is ``(1/N) sum_i J_i^T W_i J_i``. For a layer whose
pre-activations are a matrix product ``z_t = W a_t`` (+ b) of its inputs
``a_t`` (one per position t: one for a dense layer, one per output pixel for a
convolution written as im2col patches times a kernel matrix), the GGN block of
``W`` is, with ``W_i = L_i L_i^T`` and ``g_itk = dz_t/d(outputs)^T L_ik``
(column k of the output-Hessian factor propagated back to the layer's
pre-activations),

.. math::

    \\mathrm{GGN}_{WW} = \\frac1N \\sum_i \\sum_k \\mathrm{vec}(D_{ik}) \\mathrm{vec}(D_{ik})^\\top,
    \\qquad D_{ik} = \\sum_t g_{itk} a_{it}^\\top .

**K-FAC** (Martens and Grosse 2015, eq. (1) and section 3; for convolutions
Grosse and Martens 2016, KFC, eqs. (11)-(12)) approximates it by ``G (x) A`` with

.. math::

    A = \\frac1N \\sum_i \\sum_t \\bar a_{it} \\bar a_{it}^\\top,
    \\qquad G = \\frac1N \\sum_i \\frac1{T} \\sum_t \\sum_k g_{itk} g_{itk}^\\top,

``a-bar = [a, 1]`` when a bias is added to the product (the bias is the last
column of ``[W, b]``), T the number of positions (1 for a dense layer; KFC's
"spatially uncorrelated derivatives" give ``T Omega (x) Gamma = A (x) G``).
The ``L_ik`` are the exact factors of the output Hessian (Botev, Ritter and
Barber 2017, "KFLR"), not sampled labels, so that the factors describe the same
GGN as the CG operator. The damped block is the factored Tikhonov form of
Martens and Grosse (2015, section 6.3),

.. math::

    (G + \\tfrac{\\sqrt\\lambda}{\\pi} I) \\otimes (A + \\pi \\sqrt\\lambda\\, I),
    \\qquad \\pi = \\sqrt{\\frac{\\mathrm{tr}(A)/\\dim A}{\\mathrm{tr}(G)/\\dim G}},

applied to a weight-shaped block ``V`` (out x in) as
``(G + sqrt(lambda)/pi I)^{-1} V (A + pi sqrt(lambda) I)^{-1}`` through the
eigendecompositions of A and G.

**EK-FAC** (George et al. 2018, eq. (11); Grosse et al. 2023, section 2.2.3)
keeps the Kronecker eigenbasis ``Q_G (x) Q_A`` and re-estimates the eigenvalues
exactly in it: ``s_oj = (1/N) sum_i sum_k ((Q_G^T D_ik Q_A)_oj)^2``, the diagonal
of the GGN block in that basis; the damped block is
``(Q_G (x) Q_A) (diag(s) + lambda) (Q_G (x) Q_A)^T``. On a one-layer linear
model with squared loss the Kronecker factorisation is exact and EK-FAC is the
damped GGN.

Parameters that are in no K-FAC block (normalisation scales, embeddings, ...)
get the exact GGN diagonal (a Jacobi block). Everything is estimated from one
pass over the data (two for EK-FAC), one vector-Jacobian product per example and
output, as :func:`cif_jax.jacobi_preconditioner`.

**Finding the layers.** ``kfac-jax`` (0.0.8, the newest on PyPI) was tried
first: it installs (with distrax, tfp-nightly and chex) but crashes on jax
0.10.2 (its jaxpr interpreter unpacks ``Primitive.get_bind_params`` as a
``(subfuns, params)`` pair, which jax no longer returns); with that patched it
tags LeNet-5's dense layers but not our im2col convolutions (they get diagonal
blocks), and it estimates curvature only for the loss families it can register,
not for an arbitrary ``Task.loss_fn`` whose output Hessian we get by autodiff.
So the layers are found here, model-agnostically, in the jaxpr of
``task.apply_fn`` for one example: a layer is a ``dot_general`` with one
contracting dimension whose one operand is a whole parameter leaf (possibly
reshaped, transposed or cast: an im2col kernel ``(kh, kw, cin, cout) ->
(kh*kw*cin, cout)``) used nowhere else, and whose other operand is the layer
input; or a ``conv_general_dilated`` (no groups, no input dilation) with a whole
parameter leaf as its kernel, whose inputs are then the patches
(``lax.conv_general_dilated_patches``, checked against the convolution on random
operands before use). A bias is a parameter vector added, broadcast along the
output features, to that product and used nowhere else. The jaxpr is then
evaluated with a zero perturbation added to each product (its
vector-Jacobian product gives the ``g``) and the product's input recorded (the
``a``); the evaluation is checked against ``apply_fn`` before use. This works for
any :class:`cif_jax.Task` (``from_nnx``, ``from_linen``, ``from_equinox`` or
plain functions). Parameter arrays of two or more dimensions used any other way
get a diagonal block, with a warning; models in which no layer is found fall
back to Jacobi with a warning.

References:
    Martens and Grosse, "Optimizing neural networks with Kronecker-factored approximate
    curvature", ICML 2015. https://arxiv.org/abs/1503.05671
    Grosse and Martens, "A Kronecker-factored approximate Fisher matrix for convolution
    layers", ICML 2016. https://arxiv.org/abs/1602.01407
    Botev, Ritter and Barber, "Practical Gauss-Newton optimisation for deep learning",
    ICML 2017. https://arxiv.org/abs/1706.03662
    George, Laurent, Bouthillier, Ballas and Vincent, "Fast approximate natural gradient
    descent in a Kronecker-factored eigenbasis", NeurIPS 2018. https://arxiv.org/abs/1806.03884
    Grosse et al., "Studying large language model generalization with influence
    functions", 2023. https://arxiv.org/abs/2308.03296
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import operator
import time
import warnings

import equinox as eqx
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from . import _checks
from . import curvature as _curvature
from ._chunks import chunk_sum
from .precondition import Preconditioner, _jacobi
from .task import Task, fingerprint

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
    :func:`cif_jax.influence` or :func:`cif_jax.build_cache`, or use it as an
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

    The factor lambda matches :func:`cif_jax.precondition.inverse_fn`'s normalisation for
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


def _top_directions(pre: KFACPreconditioner, rank: int) -> np.ndarray:
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


# ---------------------------------------------------------------------------------- finding the layers


class _Untaggable(Exception):
    """No K-FAC layer could be found (the message says why)."""


def _is_var(v) -> bool:
    return not isinstance(v, jex.core.Literal)


def _relayout(eqn, idx: np.ndarray):
    """The index array of a pure relayout's output from its operand's, or None for any other op."""
    name = eqn.primitive.name
    p = eqn.params
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if name in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
        res = idx
    elif name == "reshape":
        if p.get("dimensions") is not None:
            return None
        res = idx.reshape(tuple(p["new_sizes"]))
    elif name == "transpose":
        res = np.transpose(idx, tuple(p["permutation"]))
    elif name == "squeeze":
        res = np.squeeze(idx, axis=tuple(p["dimensions"]))
    elif name == "expand_dims":
        res = np.expand_dims(idx, tuple(p["dimensions"]))
    elif name == "broadcast_in_dim":
        shape = tuple(p["shape"])
        expanded = [1] * len(shape)
        for d, s in zip(p["broadcast_dimensions"], idx.shape):
            expanded[int(d)] = s
        res = np.broadcast_to(idx.reshape(expanded), shape)
    else:
        return None
    return res if tuple(res.shape) == out_shape else None


class _Scan:
    """Walks a jaxpr (into nested ``jit`` calls) to find the products of inputs with parameter matrices.

    Provenance of a variable: ``("param", leaf, idx)`` when it is a relayout of
    parameter leaf ``leaf`` (``idx`` holds, per element, its flat position in the
    leaf), or ``("dot", layer, feat)`` when it is a relayout of layer ``layer``'s
    product (``feat`` holds each element's output feature).
    """

    def __init__(self, leaf_sizes):
        self.leaf_sizes = leaf_sizes
        self.layers: list[dict] = []
        self.tainted: set[int] = set()

    def taint(self, prov):
        if prov is not None and prov[0] == "param":
            self.tainted.add(prov[1])

    def run(self, jaxpr, prov: dict, path: tuple):
        uses: dict = {}
        for eqn in jaxpr.eqns:
            for v in eqn.invars:
                if _is_var(v):
                    uses[v] = uses.get(v, 0) + 1
        for v in jaxpr.outvars:
            if _is_var(v):
                uses[v] = uses.get(v, 0) + 1
        for k, eqn in enumerate(jaxpr.eqns):
            ins = [prov.get(v) if _is_var(v) else None for v in eqn.invars]
            if all(pv is None for pv in ins):
                continue
            name = eqn.primitive.name
            handled = False
            if len(eqn.invars) == 1 and len(eqn.outvars) == 1 and uses.get(eqn.invars[0]) == 1:
                idx = _relayout(eqn, ins[0][2])
                if idx is not None:
                    prov[eqn.outvars[0]] = (ins[0][0], ins[0][1], idx)
                    handled = True
            elif name == "dot_general":
                handled = self._dot(eqn, ins, uses, prov, path + (k,))
            elif name == "conv_general_dilated":
                handled = self._conv(eqn, ins, uses, prov, path + (k,))
            elif name == "add":
                handled = self._bias(eqn, ins, uses)
            elif name in ("jit", "pjit") and isinstance(eqn.params.get("jaxpr"), jex.core.ClosedJaxpr):
                inner = eqn.params["jaxpr"].jaxpr
                inner_prov = {}
                for v, pv, iv in zip(eqn.invars, ins, inner.invars):
                    if pv is None:
                        continue
                    if uses.get(v) != 1:
                        self.taint(pv)
                        continue
                    inner_prov[iv] = pv
                self.run(inner, inner_prov, path + (k,))
                handled = True
            if not handled:
                for pv in ins:
                    self.taint(pv)
        for v in jaxpr.outvars:
            if _is_var(v):
                self.taint(prov.get(v))

    def _dot(self, eqn, ins, uses, prov, path) -> bool:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if len(lb) or len(rb) or len(lc) != 1 or len(rc) != 1:
            return False
        kinds = [None if pv is None else pv[0] for pv in ins]
        if kinds.count("param") != 1:
            return False
        kp = kinds.index("param")
        _, leaf, idx = ins[kp]
        if uses.get(eqn.invars[kp]) != 1 or idx.ndim != 2:
            return False
        size = self.leaf_sizes[leaf]
        if idx.size != size or not np.array_equal(np.sort(idx.reshape(-1)), np.arange(size)):
            return False  # not a whole leaf used once
        kc = int((lc, rc)[kp][0])
        ac = int((lc, rc)[1 - kp][0])
        kernel_index = idx.T if kc == 0 else idx  # (out, in): W[o, i]
        din = kernel_index.shape[1]
        act_shape = tuple(eqn.invars[1 - kp].aval.shape)
        # dot_general's output: the free dimensions of lhs, then those of rhs.
        feature_axis = len(eqn.outvars[0].aval.shape) - 1 if kp == 1 else 0
        self._add(prov, eqn, path, leaf, kernel_index, feature_axis, operator.itemgetter(1 - kp), ac,
                  int(np.prod(act_shape)) // din)
        return True

    def _add(self, prov, eqn, path, leaf, kernel_index, feature_axis, act_fn, act_axis, positions):
        """Records a layer: the product at ``path``, its output features along ``feature_axis``.

        ``act_fn(invals)`` gives the layer input from the product's operands, its features along ``act_axis``.
        """
        dout, din = kernel_index.shape
        out_shape = tuple(eqn.outvars[0].aval.shape)
        shape = [1] * len(out_shape)
        shape[feature_axis] = dout
        feat = np.broadcast_to(np.arange(dout).reshape(shape), out_shape)
        self.layers.append(dict(
            path=path, kernel=leaf, kernel_index=np.ascontiguousarray(kernel_index), bias=None, bias_index=None,
            act_fn=act_fn, act_axis=act_axis, feature_axis=feature_axis, positions=positions, out_shape=out_shape,
            out_dtype=eqn.outvars[0].aval.dtype, din=din, dout=dout,
        ))
        prov[eqn.outvars[0]] = ("dot", len(self.layers) - 1, feat)

    def _conv(self, eqn, ins, uses, prov, path) -> bool:
        """A convolution with a parameter kernel: its layer inputs are the patches (KFC)."""
        p = eqn.params
        if p["feature_group_count"] != 1 or p["batch_group_count"] != 1 or any(d != 1 for d in p["lhs_dilation"]):
            return False
        if ins[0] is not None or ins[1] is None or ins[1][0] != "param" or uses.get(eqn.invars[1]) != 1:
            return False
        _, leaf, idx = ins[1]
        size = self.leaf_sizes[leaf]
        if idx.size != size or not np.array_equal(np.sort(idx.reshape(-1)), np.arange(size)):
            return False
        dn = p["dimension_numbers"]
        rhs_spec, out_spec = tuple(dn.rhs_spec), tuple(dn.out_spec)
        # Patches from lax.conv_general_dilated_patches put the features channel-major, then the
        # window in the kernel's spatial order: the kernel as a matrix is (I, *spatial) x O.
        order = (rhs_spec[1], *rhs_spec[2:], rhs_spec[0])
        kernel_index = np.transpose(idx, order).reshape(-1, idx.shape[rhs_spec[0]]).T  # (out, in)
        patches = functools.partial(
            lax.conv_general_dilated_patches,
            filter_shape=tuple(idx.shape[d] for d in rhs_spec[2:]), window_strides=p["window_strides"],
            padding=p["padding"], rhs_dilation=p["rhs_dilation"], dimension_numbers=dn, precision=_HIGHEST,
        )
        if not _conv_patches_agree(eqn, patches, order, out_spec[1]):
            return False
        out_shape = tuple(eqn.outvars[0].aval.shape)
        self._add(prov, eqn, path, leaf, kernel_index, out_spec[1], lambda invals: patches(invals[0]), out_spec[1],
                  int(np.prod(out_shape)) // kernel_index.shape[0])
        return True


    def _bias(self, eqn, ins, uses) -> bool:
        kinds = [None if pv is None else pv[0] for pv in ins]
        if sorted(kinds, key=str) != ["dot", "param"]:
            return False
        dot_pos, par_pos = kinds.index("dot"), kinds.index("param")
        if uses.get(eqn.invars[dot_pos]) != 1 or uses.get(eqn.invars[par_pos]) != 1:
            return False
        layer = self.layers[ins[dot_pos][1]]
        leaf, bidx = ins[par_pos][1], ins[par_pos][2]
        dout = layer["dout"]
        if layer["bias"] is not None or self.leaf_sizes[leaf] != dout:
            return False
        out_shape = tuple(eqn.outvars[0].aval.shape)
        try:
            feat = np.broadcast_to(ins[dot_pos][2], out_shape).reshape(-1)
            bidx = np.broadcast_to(bidx, out_shape).reshape(-1)
        except ValueError:
            return False
        mapping = np.full(dout, -1)
        mapping[feat] = bidx
        if not np.array_equal(mapping[feat], bidx) or not np.array_equal(np.sort(mapping), np.arange(dout)):
            return False
        layer["bias"], layer["bias_index"] = leaf, mapping
        return True


def _conv_patches_agree(eqn, patches, order, feature_axis) -> bool:
    """Checks, on random operands of the convolution's shapes, that it equals patches times the kernel matrix."""
    lhs_aval, rhs_aval = eqn.invars[0].aval, eqn.invars[1].aval
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=lhs_aval.shape), lhs_aval.dtype)
    rhs = rng.normal(size=rhs_aval.shape).astype(np.dtype(rhs_aval.dtype))
    p = eqn.params
    try:
        want = lax.conv_general_dilated(lhs, jnp.asarray(rhs), p["window_strides"], p["padding"], p["lhs_dilation"],
                                        p["rhs_dilation"], p["dimension_numbers"], precision=_HIGHEST)
        mat = jnp.asarray(np.transpose(rhs, order).reshape(-1, rhs.shape[order[-1]]))
        got = jnp.moveaxis(jnp.matmul(jnp.moveaxis(patches(lhs), feature_axis, -1), mat, precision=_HIGHEST), -1,
                           feature_axis)
    except Exception:
        return False
    tol = 1e3 * float(jnp.finfo(want.dtype).eps) * (float(jnp.max(jnp.abs(want))) + 1.0)
    return got.shape == want.shape and float(jnp.max(jnp.abs(got - want))) <= tol


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # jax < 0.7 returned (subfuns, params)
        subfuns, params = params
        invals = [*subfuns, *invals]
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None) or contextlib.nullcontext()
    with ctx:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _evaluate(jaxpr, consts, args, prefix, dots, calls, eps, acts):
    """Evaluates ``jaxpr``, adding ``eps[l]`` to layer l's product and recording its input in ``acts[l]``."""
    env = {}

    def read(v):
        return v.val if not _is_var(v) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for k, eqn in enumerate(jaxpr.eqns):
        path = prefix + (k,)
        invals = [read(v) for v in eqn.invars]
        if path in dots:
            layer, act_fn = dots[path]
            acts[layer] = act_fn(invals)
            out = [_bind(eqn, invals)[0] + eps[layer]]
        elif path in calls:
            closed = eqn.params["jaxpr"]
            out = _evaluate(closed.jaxpr, closed.consts, invals, path, dots, calls, eps, acts)
        else:
            out = _bind(eqn, invals)
        for v, val in zip(eqn.outvars, out):
            env[v] = val
    return [read(v) for v in jaxpr.outvars]


class _Model:
    """The layers of a task's model, and its forward pass with perturbed products and recorded inputs."""

    def __init__(self, task: Task):
        leaves, treedef = jax.tree_util.tree_flatten(task.params)
        self.leaf_shapes = [tuple(np.shape(leaf)) for leaf in leaves]
        self.leaf_sizes = [int(np.prod(s)) for s in self.leaf_shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.leaf_sizes)]).astype(np.int64)
        x1 = jax.tree_util.tree_map(lambda a: a[:1], task.inputs)

        def fn(leaf_values, x):
            return task.apply_fn(jax.tree_util.tree_unflatten(treedef, leaf_values), x)

        try:
            closed = jax.make_jaxpr(fn)(list(leaves), x1)
        except Exception as err:
            raise _Untaggable(f"tracing apply_fn to a jaxpr failed ({type(err).__name__}: {err})") from err
        jaxpr = closed.jaxpr
        if len(jaxpr.outvars) != 1:
            raise _Untaggable("apply_fn returns a pytree of several arrays; K-FAC handles one output array")
        self.closed = closed
        scan = _Scan(self.leaf_sizes)
        prov = {v: ("param", j, np.arange(self.leaf_sizes[j]).reshape(self.leaf_shapes[j]))
                for j, v in enumerate(jaxpr.invars[: len(leaves)])}
        scan.run(jaxpr, prov, ())
        layers = [dict(layer) for layer in scan.layers if layer["kernel"] not in scan.tainted]
        for layer in layers:
            if layer["bias"] is not None and layer["bias"] in scan.tainted:
                layer["bias"], layer["bias_index"] = None, None
        if not layers:
            raise _Untaggable(
                "no product of a layer input with a parameter matrix used once (a dense layer or a convolution: "
                "jnp.dot/matmul/lax.dot_general, lax.conv_general_dilated) was found in apply_fn"
            )
        names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(task.params)[0]]
        for layer in layers:
            bias = "" if layer["bias"] is None else f" + {names[layer['bias']]}"
            layer["name"] = (f"{names[layer['kernel']]}{bias}: A {layer['din'] + (layer['bias'] is not None)}^2, "
                             f"G {layer['dout']}^2, {layer['positions']} position(s)")
        self.layers = layers
        self.dots = {layer["path"]: (i, layer["act_fn"]) for i, layer in enumerate(layers)}
        self.calls = {layer["path"][:d] for layer in layers for d in range(1, len(layer["path"]))}
        in_blocks = {layer["kernel"] for layer in layers} | {layer["bias"] for layer in layers} - {None}
        self.diag_leaves = [j for j in range(len(leaves)) if j not in in_blocks]
        self.unfactored = [names[j] for j in self.diag_leaves if len(self.leaf_shapes[j]) >= 2]
        self.leaves = leaves

    # -- layout ------------------------------------------------------------------------------

    def block_index(self, layer) -> np.ndarray:
        """(out, in) flat positions of ``[W, b]`` of a layer."""
        idx = self.offsets[layer["kernel"]] + layer["kernel_index"]
        if layer["bias"] is not None:
            idx = np.concatenate([idx, (self.offsets[layer["bias"]] + layer["bias_index"])[:, None]], axis=1)
        return idx

    def layout(self) -> _Layout:
        blocks = [self.block_index(layer) for layer in self.layers]
        diag = [np.arange(self.offsets[j], self.offsets[j + 1]) for j in self.diag_leaves]
        perm = np.concatenate([b.reshape(-1) for b in blocks] + diag + [np.zeros(0, np.int64)])
        if not np.array_equal(np.sort(perm), np.arange(self.offsets[-1])):
            raise _Untaggable("the layers found do not partition the parameters (internal check)")
        return _Layout(perm, tuple(b.shape for b in blocks))

    # -- the forward pass ----------------------------------------------------------------------

    def forward(self, leaf_values, x_leaves, eps):
        """Outputs for one example (batch of 1) and the recorded layer inputs."""
        acts = [None] * len(self.layers)
        out = _evaluate(self.closed.jaxpr, self.closed.consts, [*leaf_values, *x_leaves], (), self.dots,
                        self.calls, eps, acts)
        return out[0], acts

    def zero_perturbations(self):
        return [jnp.zeros(layer["out_shape"], layer["out_dtype"]) for layer in self.layers]

    def check_forward(self, task: Task):
        """The evaluation with zero perturbations reproduces ``apply_fn`` on the first example."""
        x1 = jax.tree_util.tree_map(lambda a: a[:1], task.inputs)
        want = jnp.asarray(task.apply_fn(task.params, x1))
        got, _ = jax.jit(self.forward)(self.leaves, jax.tree_util.tree_leaves(x1), self.zero_perturbations())
        scale = float(jnp.max(jnp.abs(want))) + 1.0
        tol = 1e3 * float(jnp.finfo(want.dtype).eps) * scale
        if got.shape != want.shape or not float(jnp.max(jnp.abs(got - want))) <= tol:
            raise _Untaggable("re-evaluating apply_fn's jaxpr did not reproduce its outputs")

    # -- per-example statistics ----------------------------------------------------------------

    def _inputs(self, layer, act):
        """(T, in) layer inputs, with the bias column of ones."""
        a = jnp.moveaxis(act, layer["act_axis"], -1).reshape(-1, layer["din"])
        if layer["bias"] is not None:
            a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
        return a

    def _grads(self, layer, ct):
        """(m, T, out) output-side factors from the perturbation cotangents (m, *product shape)."""
        g = jnp.moveaxis(ct, 1 + layer["feature_axis"], -1)
        return g.reshape(g.shape[0], -1, layer["dout"])

    def example_factors(self, task: Task, leaf_values, x, y):
        """For one example: layer inputs (T, in) and output factors (m, T, out); GGN diagonal of other leaves."""
        x1 = jax.tree_util.tree_map(lambda a: a[None], x)
        y1 = jax.tree_util.tree_map(lambda a: a[None], y)
        x_leaves = jax.tree_util.tree_leaves(x1)
        diag_values = [leaf_values[j] for j in self.diag_leaves]

        def f(diag_vals, eps):
            values = list(leaf_values)
            for j, v in zip(self.diag_leaves, diag_vals):
                values[j] = v
            return self.forward(values, x_leaves, eps)

        out, vjp_fn, acts = jax.vjp(f, diag_values, self.zero_perturbations(), has_aux=True)
        root = _output_hessian_root(task.loss_fn, out, y1)
        d_diag, d_eps = jax.vmap(vjp_fn)(root.T.reshape((-1,) + out.shape))
        inputs = [self._inputs(layer, a) for layer, a in zip(self.layers, acts)]
        grads = [self._grads(layer, ct) for layer, ct in zip(self.layers, d_eps)]
        diag = [jnp.sum(jnp.square(d), axis=0).reshape(-1) for d in d_diag]
        diag = jnp.concatenate(diag) if diag else jnp.zeros((0,), out.dtype)
        return inputs, grads, diag


def _output_hessian_root(loss_fn, out, y1):
    """L with ``L L^T`` = the loss Hessian in the (flattened) outputs, by eigendecomposition."""
    m = out.size

    def loss_one(o):
        return loss_fn(o.reshape(out.shape), y1)[0]

    hess = jax.hessian(loss_one)(out.reshape(-1)).reshape(m, m)
    evals, evecs = jnp.linalg.eigh((hess + hess.T) / 2)
    return evecs * jnp.sqrt(jnp.maximum(evals, 0))[None, :]


def _data(task: Task, curvature, dtype):
    if curvature is None:
        return (task.inputs, task.targets, jnp.ones(task.num_examples, dtype))
    take = lambda tree: jax.tree_util.tree_map(lambda a: jnp.take(a, curvature.indices, axis=0), tree)
    return (take(task.inputs), take(task.targets), curvature.weights.astype(dtype))


def _factor_pass(model: _Model, task: Task, batch_size, curvature):
    """Weighted means of A, G per layer and of the diagonal of the other leaves."""
    dtype = task.dtype
    data = _data(task, curvature, dtype)

    def run(leaf_values, data):
        def example(x, y, w):
            inputs, grads, diag = model.example_factors(task, leaf_values, x, y)
            a_f = [w * jnp.matmul(a.T, a, precision=_HIGHEST) for a in inputs]
            g_f = [w * jnp.einsum("kto,ktj->oj", g, g, precision=_HIGHEST) / g.shape[1] for g in grads]
            return a_f, g_f, w * diag

        total = chunk_sum(lambda c: jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), jax.vmap(example)(*c)),
                          data, batch_size)
        return jax.tree_util.tree_map(lambda s: s / jnp.sum(data[2]), total)

    return jax.jit(run)(model.leaves, data)


def _scaling_pass(model: _Model, task: Task, batch_size, curvature, input_bases, output_bases):
    """EK-FAC's second moments of the per-example, per-output block gradients in the Kronecker eigenbasis."""
    data = _data(task, curvature, task.dtype)

    def run(leaf_values, data, qa, qg):
        def example(x, y, w):
            inputs, grads, _ = model.example_factors(task, leaf_values, x, y)
            out = []
            for a, g, q_a, q_g in zip(inputs, grads, qa, qg):
                ar = jnp.matmul(a, q_a, precision=_HIGHEST)  # (T, in)
                gr = jnp.einsum("kto,oj->ktj", g, q_g, precision=_HIGHEST)  # (m, T, out)
                d = jnp.einsum("kto,ti->koi", gr, ar, precision=_HIGHEST)  # (m, out, in): Q_G^T D Q_A
                out.append(w * jnp.sum(jnp.square(d), axis=0))
            return out

        total = chunk_sum(lambda c: jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), jax.vmap(example)(*c)),
                          data, batch_size)
        return jax.tree_util.tree_map(lambda s: s / jnp.sum(data[2]), total)

    return jax.jit(run)(model.leaves, data, list(input_bases), list(output_bases))


@jax.jit
def _eigh(m):
    evals, evecs = jnp.linalg.eigh((m + m.T) / 2)
    return jnp.maximum(evals, 0), evecs


def _build(task: Task, batch_size, curvature, eigen_corrected: bool, damping):
    start = time.perf_counter()
    try:
        model = _Model(task)
        model.check_forward(task)
        layout = model.layout()
    except _Untaggable as err:
        name = "EK-FAC" if eigen_corrected else "K-FAC"
        warnings.warn(
            f"{name} cannot factor this model: {err}. Falling back to the Jacobi preconditioner (the exact GGN "
            f"diagonal). {name} needs dense or convolution layers (a matrix product of the layer input with a "
            "parameter matrix, or a convolution with a parameter kernel: e.g. `nnx.Linear`, `nnx.Conv`, "
            "`cif_jax.models.Conv2d`).",
            UserWarning,
            stacklevel=3,
        )
        return _jacobi(task, batch_size, curvature)
    if model.unfactored:
        warnings.warn(
            f"K-FAC factors {len(model.layers)} layer(s); {len(model.unfactored)} parameter array(s) of two or more "
            f"dimensions ({', '.join(model.unfactored[:5])}{', ...' if len(model.unfactored) > 5 else ''}) are not "
            "used as a plain matrix product in apply_fn (e.g. `lax.conv_general_dilated`, an embedding lookup, a "
            "shared weight) and get a diagonal block.",
            UserWarning,
            stacklevel=3,
        )
    a_f, g_f, diag = jax.block_until_ready(_factor_pass(model, task, batch_size, curvature))
    for name, arrays in (("A", a_f), ("G", g_f), ("diagonal", [diag])):
        if not all(bool(jnp.all(jnp.isfinite(a))) for a in arrays):
            raise ValueError(f"the K-FAC factors ({name}) hold NaN or Inf; check the model snapshot and the data.")
    eig_a = [_eigh(a) for a in a_f]
    eig_g = [_eigh(g) for g in g_f]
    scalings = None
    if eigen_corrected:
        scalings = tuple(_scaling_pass(model, task, batch_size, curvature, [q for _, q in eig_a],
                                       [q for _, q in eig_g]))
    jax.block_until_ready((eig_a, eig_g, scalings))
    pre = KFACPreconditioner(
        input_factors=tuple(a_f),
        output_factors=tuple(g_f),
        input_bases=tuple(q for _, q in eig_a),
        input_eigenvalues=tuple(e for e, _ in eig_a),
        output_bases=tuple(q for _, q in eig_g),
        output_eigenvalues=tuple(e for e, _ in eig_g),
        scalings=scalings,
        diagonal=diag,
        layout=layout,
        layers=tuple(layer["name"] for layer in model.layers),
        num_params=task.num_params,
        fingerprint=fingerprint(task),
        curvature=_curvature.describe(curvature),
        seconds=time.perf_counter() - start,
    )
    if damping is not None:
        check_damping(pre, damping)
    return pre


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


# ------------------------------------------------------------------------------------------- public API


def kfac_preconditioner(
    task: Task, *, batch_size: int | None = DEFAULT_BATCH_SIZE, curvature=None, damping: float | None = None
):
    """Builds the K-FAC preconditioner of the undamped GGN (one pass over the data).

    Per layer found in the model (see :mod:`cif_jax.kfac`), ``A`` from the layer
    inputs and ``G`` from the exact output-Hessian factors propagated to the
    pre-activations; the exact GGN diagonal for the other parameters. In the
    solves, each block is damped by the factored Tikhonov rule with ``pi`` from
    the factors' traces (Martens and Grosse 2015, section 6.3).

    Args:
        task: the model snapshot and training data.
        batch_size: examples per chunk (memory about ``batch_size * outputs * sum of
            layer output sizes``).
        curvature: a :class:`cif_jax.CurvatureSample` (the solves must use the same).
        damping: optional lambda of the solves it will serve: then the damped blocks
            are checked to be invertible in the task's dtype (a clear error if not).

    Returns:
        A :class:`KFACPreconditioner`, or, with a warning, a
        :class:`cif_jax.JacobiPreconditioner` when no layer can be factored.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> import cif_jax as cj
        >>> params = {"w": jnp.ones((3, 2)) / 3, "b": jnp.zeros(2)}
        >>> task = cj.Task(lambda p, x: x @ p["w"] + p["b"], optax.softmax_cross_entropy_with_integer_labels,
        ...                params, jnp.arange(12.0).reshape(4, 3) / 10, jnp.array([0, 1, 0, 1]))
        >>> pre = cj.kfac_preconditioner(task)
        >>> pre.layout.shapes  # one block [W^T, b]: 2 outputs x (3 inputs + bias)
        ((2, 4),)
        >>> x = cj.solve_ggn(task, jnp.ones((1, 8)), damping=1e-3, solver=cj.CG(rtol=1e-5, preconditioner=pre))
        >>> bool(x.converged[0])
        True

    References:
        Martens and Grosse, ICML 2015; Grosse and Martens, ICML 2016; Botev, Ritter
        and Barber, ICML 2017 (see :mod:`cif_jax.kfac`).
    """
    return _public_build(task, batch_size, curvature, damping, eigen_corrected=False)


def ekfac_preconditioner(
    task: Task, *, batch_size: int | None = DEFAULT_BATCH_SIZE, curvature=None, damping: float | None = None
):
    """Builds the EK-FAC preconditioner (K-FAC's eigenbasis, eigenvalues re-estimated; two data passes).

    As :func:`kfac_preconditioner`, plus a second pass that measures the GGN's
    diagonal in each block's Kronecker eigenbasis (George et al. 2018, eq. (11));
    the damped block is ``Q (diag(s) + lambda) Q^T``. It also serves as an
    approximate inverse: :func:`ekfac_solve`, :func:`ekfac_influence`.

    Args:
        task, batch_size, curvature, damping: as :func:`kfac_preconditioner`.

    Returns:
        A :class:`KFACPreconditioner` with ``scalings`` (``kind == "ekfac"``), or a
        :class:`cif_jax.JacobiPreconditioner` with a warning when no layer can be factored.
    """
    return _public_build(task, batch_size, curvature, damping, eigen_corrected=True)


def _public_build(task, batch_size, curvature, damping, *, eigen_corrected):
    _checks.task(task)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    if damping is not None:
        _checks.damping(damping)
    curvature = _curvature.check(curvature, task.num_examples, task.dtype)
    return _build(task, batch_size, curvature, eigen_corrected, damping)


def _as_approximation(preconditioner, lam):
    """Checks that ``preconditioner`` can serve as an approximate inverse at damping ``lam``."""
    if not isinstance(preconditioner, Preconditioner):
        raise TypeError(
            "the approximate inverse needs a built preconditioner (from `cif_jax.ekfac_preconditioner`, "
            f"`cif_jax.kfac_preconditioner`, ...); got {type(preconditioner).__name__}."
        )
    preconditioner.check_damping(lam)
    return preconditioner


@eqx.filter_jit
def _apply_approximate(preconditioner, rhs, lam):
    return preconditioner.approximate_inverse(lam)(rhs)


def ekfac_solve(preconditioner, rhs: Float[Array, "r p"], *, damping: float) -> Float[Array, "r p"]:
    """APPROXIMATE solves ``x_r ~ H~^{-1} b_r`` with the damped (E)K-FAC approximation of the GGN.

    No CG and no residual control: the answer is the (E)K-FAC (or Jacobi)
    approximation's, not the damped GGN's. For exact solves pass the same object
    as ``cif_jax.CG(preconditioner=...)``.

    Args:
        preconditioner: from :func:`ekfac_preconditioner` (EK-FAC: eigenvalues
            ``s + lambda``) or :func:`kfac_preconditioner` (factored Tikhonov damping),
            or a :class:`cif_jax.JacobiPreconditioner`.
        rhs: (R, p) right-hand sides.
        damping: lambda > 0.

    Returns:
        (R, p) approximate solutions.
    """
    lam = _checks.damping(damping)
    _as_approximation(preconditioner, lam)
    rhs = jnp.asarray(rhs)
    p = preconditioner.size
    if rhs.ndim != 2 or rhs.shape[1] != p:
        raise ValueError(f"`rhs` must have shape (R, p) = (R, {p}); got {rhs.shape}.")
    dtype = preconditioner.dtype
    return _apply_approximate(preconditioner, rhs.astype(dtype), jnp.asarray(lam, dtype))


def ekfac_influence(
    task: Task,
    subsets,
    *,
    damping: float,
    preconditioner=None,
    batch_size: int | None = None,
    curvature=None,
) -> Float[Array, "q p"]:
    """APPROXIMATE per-query influence with the EK-FAC inverse in place of the exact damped-GGN solve.

    .. math::

        \\Delta\\theta_S \\approx \\frac1N P^{-1} \\sum_{i \\in S} g_i,
        \\qquad P = (Q_G \\otimes Q_A)(\\mathrm{diag}(s) + \\lambda)(Q_G \\otimes Q_A)^\\top
        \\text{ per block}

    (kronfluence's estimator; Grosse et al. 2023, eq. (19)). It is fast (no CG) but
    not :func:`cif_jax.influence`: it equals it only where the Kronecker
    factorisation is exact (one linear layer, squared loss). Use it when speed
    matters more than exactness, and measure the gap on your model.

    Args:
        task: the model snapshot and training data.
        subsets: as :func:`cif_jax.influence`.
        damping: lambda > 0.
        preconditioner: a built :class:`KFACPreconditioner` (EK-FAC or K-FAC) for this
            task and curvature; None builds EK-FAC here.
        batch_size: examples per chunk of the gradient pass (and of the build).
        curvature: a :class:`cif_jax.CurvatureSample` for the GGN.

    Returns:
        (Q, p) approximate parameter changes, flat in ``ravel_pytree(params)`` order.
    """
    from .gradients import _subset_gradient_sums, raise_on_bad

    _checks.task(task)
    lam = _checks.damping(damping)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    curvature = _curvature.check(curvature, task.num_examples, task.dtype)
    subs = _checks.subsets(subsets, task.num_examples)
    if preconditioner is None:
        preconditioner = _build(task, DEFAULT_BATCH_SIZE if batch_size is None else batch_size, curvature, True,
                                None)
    else:
        preconditioner = _as_approximation(preconditioner, lam).check(task, curvature)
    preconditioner.check_damping(lam)
    sums, bad = _subset_gradient_sums(task, jnp.asarray(subs.mask.T), batch_size)
    raise_on_bad(bad)
    dtype = task.dtype
    out = _apply_approximate(preconditioner, sums.astype(dtype), jnp.asarray(lam, dtype))
    return out / jnp.asarray(task.num_examples, dtype)
