"""STRIDE: per-subset low-rank logit steering on frozen features, per-example scores by Lasso.

A baseline that avoids parameter space. On the frozen activations ``h(x)`` of
one layer and the frozen logits ``z(x)``, STRIDE (sec. 3, Alg. 1, app. A, E.1)
learns one small operator per training subset ``S_k``,

$$
\\Delta_k(x) = A_k^\\top \\phi(h(x)), \\qquad
\\phi(h) = V_2\\, \\mathrm{relu}(V_1 h + c_1) + c_2,
$$

with ``A_k`` of shape (r, C) and the encoder ``phi`` shared by all subsets,
so that the steered logits ``z + Delta_k`` fit ``S_k`` (fidelity, eq. 1) and
stay close to ``z`` off it (stability, eq. 2), while the subset responses
``ybar_k`` (eq. 3) stay near a linear function of the membership (eq. 4):

$$
L = \\frac1K \\sum_k \\big(\\mathrm{fid}_k + \\lambda_{stab}\\, \\mathrm{stab}_k\\big)
    + \\lambda_{lin} \\lVert (I - P)\\, \\bar y \\rVert^2 \\qquad \\text{(eqs. 5-6)},
$$

``P = X_s (X_s^T X_s + g I)^{-1} X_s^T`` the ridge projector of the sketched
membership ``X_s = X R`` (eq. 13). For a test point, the response of operator
k is ``y_k = (A_k^T phi(h))[class]`` (Alg. 1 l. 9) and the per-example
scores ``w`` solve the Lasso ``min 1/2 ||y - X w||^2 + alpha ||w||_1``
(:func:`cif_jax.estimators.lasso`). App. E.1's activation steering
(``steer="activation"``) shifts the features instead, ``h + B(h)^T a_k``, and
reads the shift of the logits through the rest of the network.

Sign: ``w_i > 0`` when example i raises the class logit (helpful), the
library's convention; :func:`cif_jax.evaluation.lds` predicts the loss of a subset S' by
``-sum_{i in S'} w_i``.

References:
    "STRIDE: training data attribution in activation space": sec. 3 (eqs. 1-6), Alg. 1,
    app. A, B.1-B.2, E.1 (eq. 13), F.2, Table 4 (defaults).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ..cif.sketch import jl_projection
from ..core import checks as _checks
from ..core.checks import as_key
from ..core.chunks import chunk_map
from ..core.task import Task
from .lasso import LassoSolution, lasso

__all__ = [
    "StrideOperators",
    "nnx_feature_fn",
    "stride_features",
    "stride_fit",
    "stride_responses",
    "stride_scores",
    "stride_subsets",
]

_HI = lax.Precision.HIGHEST
_ENCODERS = ("mlp", "linear")
_LINEARITY = ("subset", "example")
_STEER = ("logit", "activation")


class StrideOperators(NamedTuple):
    """The learned STRIDE operators (:func:`stride_fit`).

    Attributes:
        encoder: parameters of the shared encoder ``phi``: ``{"V1" (d, hidden),
            "c1" (hidden,), "V2" (hidden, r), "c2" (r,)}`` for ``"mlp"``,
            ``{"U" (d, r), "u" (r,)}`` for ``"linear"`` (row-vector layout,
            ``phi(h) = h @ U + u``).
        A: the per-subset coefficients: ``(K, r, C)``, ``Delta_k(x) = A_k^T phi(h(x))``
            (logit steering), or ``(K, r)``, ``Delta_k(x) = f(h + B(h)^T a_k) - f(h)``
            with ``B(h)`` phi's ``r * d`` outputs as an (r, d) basis (activation
            steering, app. E.1).
        membership: ``(K, N)`` the 0/1 membership matrix X, in the features' dtype.
        coverage: ``(N,)`` int32, how many subsets hold each example.
        loss_history: ``(num_steps,)`` the loss (eqs. 5-6) before each step.
        settings: the settings of the fit (encoder, rank, steps, ...).
        seconds: wall-clock seconds of the fit.
        head: the network after the feature layer, ``head(H_rows) -> logits``,
            for activation steering; None for logit steering.
    """

    encoder: PyTree
    A: Float[Array, "k r ..."]
    membership: Float[Array, "k n"]
    coverage: Int[Array, " n"]
    loss_history: Float[Array, " t"]
    settings: dict
    seconds: float
    head: Callable | None = None


# -- features ---------------------------------------------------------------------


class _NnxFeatures(eqx.Module):
    graphdef: Any = eqx.field(static=True)
    rest: Any
    layer: int = eqx.field(static=True)

    def __call__(self, params, x):
        from flax import nnx

        return nnx.merge(self.graphdef, params, self.rest).features(x, layer=self.layer)


def nnx_feature_fn(model, *, layer: int = -1) -> Callable:
    """``feature_fn(params, x) -> (B, d)`` for a ``flax.nnx`` model with a ``features`` method.

    ``params`` are those of ``Task.from_nnx(model, ...)`` (the ``nnx.Param``
    leaves), so the features follow the task's snapshot. The library's
    :class:`~cif_jax.workloads.models.MLP` and :class:`~cif_jax.workloads.models.LeNet5` return the
    post-ReLU output of hidden layer ``layer`` (``-1``: the penultimate layer,
    STRIDE app. B.1).
    """
    from flax import nnx

    if not callable(getattr(model, "features", None)):
        raise TypeError(f"`model` must be an nnx module with a `features(x, *, layer)` method (as cif_jax.workloads.models.MLP "
                        f"and LeNet5), got {type(model).__name__}.")
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"`layer` must be an int (-1: the penultimate layer), got {layer!r}.")
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return _NnxFeatures(graphdef, rest, int(layer))


@eqx.filter_jit
def _features(task: Task, feature_fn, inputs, batch_size):
    def chunk(x):
        return feature_fn(task.params, x), task.apply_fn(task.params, x)

    return chunk_map(chunk, inputs, batch_size)


def stride_features(
    task: Task, inputs: PyTree[Array], *, feature_fn: Callable, batch_size: int | None = None
) -> tuple[Float[Array, "n d"], Float[Array, "n c"]]:
    """Frozen features ``H = feature_fn(params, inputs)`` and logits ``Z = apply_fn(params, inputs)``.

    Computed in chunks of ``batch_size`` under one jit. For logistic
    regression the features are the inputs (``feature_fn=lambda p, x: x``);
    for the nnx models use :func:`nnx_feature_fn`.

    Args:
        task: the model snapshot (its ``params`` and ``apply_fn``).
        inputs: inputs with leading dimension n (training or test points).
        feature_fn: ``feature_fn(params, x_batch) -> (B, d)``.
        batch_size: examples per chunk (None: chosen for a memory budget, see :func:`cif_jax.core.chunks.budget_batch_size`).

    Returns:
        ``(H, Z)`` of shapes ``(n, d)`` and ``(n, C)``.
    """
    _checks.task(task)
    if not callable(feature_fn):
        raise TypeError("`feature_fn` must be callable: feature_fn(params, x_batch) -> (B, d) features.")
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    leaves = jax.tree_util.tree_leaves(inputs)
    if not leaves or any(np.ndim(a) < 1 for a in leaves) or len({np.shape(a)[0] for a in leaves}) != 1:
        raise ValueError("`inputs` must be an array (or pytree of arrays) with one leading example dimension.")
    inputs = jax.tree_util.tree_map(jnp.asarray, inputs)
    head = jax.tree_util.tree_map(lambda a: a[:2], inputs)
    try:
        h = jax.eval_shape(feature_fn, task.params, head)
    except Exception as err:
        raise ValueError(f"`feature_fn(task.params, inputs[:2])` failed; check that it fits the task: {err}") from err
    z = jax.eval_shape(task.apply_fn, task.params, head)
    if getattr(h, "ndim", None) != 2:
        raise ValueError(f"`feature_fn` must return (B, d) features; got {getattr(h, 'shape', type(h))}. Flatten "
                         "them inside feature_fn.")
    if getattr(z, "ndim", None) != 2:
        raise ValueError(f"`task.apply_fn` must return (B, C) logits for STRIDE; got {getattr(z, 'shape', type(z))}.")
    return _features(task, feature_fn, inputs, batch_size)


# -- subsets ------------------------------------------------------------------------


def stride_subsets(key: PRNGKeyArray, num_examples: int, *, num_subsets: int, subset_size: int) -> Int[Array, "k m"]:
    """K subsets of size m, in rounds that each cover all N examples (app. B.2).

    Round j draws ``perm_j = permutation(fold_in(key, j), N)`` and cuts it into
    ``ceil(N / m)`` blocks ``perm_j[(b m + t) mod N]``, ``t < m`` (the last block
    wraps around to the start when m does not divide N); the first
    ``num_subsets`` blocks over the rounds are kept.

    Args:
        key: PRNG key.
        num_examples: N.
        num_subsets: K, with ``K m >= N`` so that the first round is complete.
        subset_size: m, at most N.

    Returns:
        ``(K, m)`` int32 indices.
    """
    key = as_key(key)
    n = _checks.positive_int(num_examples, "num_examples")
    k = _checks.positive_int(num_subsets, "num_subsets")
    m = _checks.positive_int(subset_size, "subset_size")
    if m > n:
        raise ValueError(f"`subset_size` ({m}) must be at most `num_examples` ({n}); pass a smaller subset_size.")
    if k * m < n:
        raise ValueError(f"`num_subsets * subset_size` = {k * m} < N = {n}: some examples would be in no subset; "
                         f"pass num_subsets >= {math.ceil(n / m)}.")
    return _subsets(key, n, k, m)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _subsets(key, n, k, m):
    blocks = math.ceil(n / m)
    rounds = math.ceil(k / blocks)
    perms = jax.vmap(lambda j: jax.random.permutation(jax.random.fold_in(key, j), n))(jnp.arange(rounds))
    pos = (np.arange(blocks)[:, None] * m + np.arange(m)[None, :]) % n
    return perms[:, pos].reshape(rounds * blocks, m)[:k].astype(jnp.int32)


# -- operators -------------------------------------------------------------------------


def _init_encoder(key, kind: str, d: int, hidden: int, width: int, dtype):
    """The encoder's parameters; ``width`` outputs (r for logit steering, r d for activation steering)."""
    init = jax.nn.initializers.lecun_normal()
    k1, k2 = jax.random.split(key)
    if kind == "linear":
        return {"U": init(k1, (d, width), dtype), "u": jnp.zeros(width, dtype)}
    return {"V1": init(k1, (d, hidden), dtype), "c1": jnp.zeros(hidden, dtype),
            "V2": init(k2, (hidden, width), dtype), "c2": jnp.zeros(width, dtype)}


def _phi(enc, H):
    """The shared encoder on rows of H: ``h U + u`` or ``relu(h V1 + c1) V2 + c2``."""
    if "U" in enc:
        return jnp.matmul(H, enc["U"], precision=_HI) + enc["u"][None, :]
    hid = jax.nn.relu(jnp.matmul(H, enc["V1"], precision=_HI) + enc["c1"][None, :])
    return jnp.matmul(hid, enc["V2"], precision=_HI) + enc["c2"][None, :]


def _sketch(query_ids, indices, R, num_subsets: int):
    """Eq. (13): ``Xs_k = sum_{i in S_k} R_i``, streamed over the (subset, member) pairs (= X R)."""
    return jax.ops.segment_sum(R[indices], query_ids, num_segments=num_subsets)


def _residual_projector(Xs, lin_ridge):
    """``I - P``, ``P = Xs (Xs^T Xs + g I)^{-1} Xs^T``, ``g = lin_ridge tr(Xs^T Xs) / s`` (eq. 4), by SVD."""
    s = Xs.shape[1]
    U, S, _ = jnp.linalg.svd(Xs, full_matrices=False)
    S2 = S * S
    g = lin_ridge * jnp.sum(S2) / s
    shrink = jnp.where(S2 + g > 0, S2 / jnp.where(S2 + g > 0, S2 + g, 1), 0)
    P = jnp.matmul(U * shrink[None, :], U.T, precision=_HI)
    return jnp.eye(Xs.shape[0], dtype=Xs.dtype) - P


def _gumbel_pick(key, allowed, size: int):
    """``size`` indices drawn without replacement among ``allowed`` (Gumbel top-k) and their validity."""
    g = jax.random.gumbel(key, allowed.shape, dtype=jnp.float32)
    _, idx = lax.top_k(jnp.where(allowed, g, -jnp.inf), size)
    return idx, allowed[idx]


def _shift(phi_rows, A_k, H_rows, head):
    """``Delta_k`` on rows: ``A_k^T phi(h)`` (logit steering, ``head`` None), or ``f(h + s_k(h)) - f(h)`` with
    ``s_k(h) = B(h)^T a_k`` and ``B(h)`` phi's ``r d`` outputs as an (r, d) basis (activation steering, app. E.1)."""
    if head is None:
        return jnp.matmul(phi_rows, A_k, precision=_HI)
    basis = phi_rows.reshape(phi_rows.shape[0], A_k.shape[0], H_rows.shape[1])
    steer = jnp.einsum("brd,r->bd", basis, A_k, precision=_HI)
    return head(H_rows + steer) - head(H_rows)


def _subset_terms(phi_all, A_k, mask_k, key_k, Z, labels, top, H, head, b_s, b_r):
    """``(fid_k, stab_k, ybar_k)`` of eqs. (1)-(3) for one subset."""
    if b_s is None:
        idx_s = idx_r = slice(None)
        w_s, w_r = mask_k, ~mask_k
    else:
        ks, kr = jax.random.split(key_k)
        idx_s, w_s = _gumbel_pick(ks, mask_k, b_s)
        idx_r, w_r = _gumbel_pick(kr, ~mask_k, b_r)
    dtype = phi_all.dtype
    w_s, w_r = w_s.astype(dtype), w_r.astype(dtype)
    # Fidelity (eq. 1) and the subset response (eq. 3) on the members.
    delta = _shift(phi_all[idx_s], A_k, H[idx_s], head)
    logits = Z[idx_s] + delta
    ce = jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, labels[idx_s][:, None], axis=1)[:, 0]
    fid = jnp.sum(w_s * ce) / jnp.sum(w_s)
    ybar = jnp.sum(w_s * jnp.take_along_axis(delta, top[idx_s][:, None], axis=1)[:, 0]) / jnp.sum(w_s)
    # Stability (eq. 2) on the complement: KL(softmax(z) || softmax(z + Delta)).
    z_r = Z[idx_r]
    logp0 = jax.nn.log_softmax(z_r, axis=1)
    logp1 = jax.nn.log_softmax(z_r + _shift(phi_all[idx_r], A_k, H[idx_r], head), axis=1)
    kl = jnp.sum(jnp.exp(logp0) * (logp0 - logp1), axis=1)
    stab = jnp.sum(w_r * kl) / jnp.sum(w_r)
    return fid, stab, ybar


def _terms(phi_all, top, A, Z, labels, mask, keys, H, head, b_s, b_r):
    """Per-subset ``fid (K,), stab (K,), ybar (K,)`` from phi on all N rows and the predicted classes."""
    fn = functools.partial(_subset_terms, head=head, b_s=b_s, b_r=b_r)
    return jax.vmap(fn, in_axes=(None, 0, 0, 0, None, None, None, None))(phi_all, A, mask, keys, Z, labels, top, H)


def _loss_terms(enc, A, H, Z, labels, mask, keys, b_s, b_r, head=None):
    """Per-subset ``fid (K,), stab (K,), ybar (K,)``; phi once on all N rows, gathered per subset."""
    return _terms(_phi(enc, H), jnp.argmax(Z, axis=1), A, Z, labels, mask, keys, H, head, b_s, b_r)


def _member_responses(phi_all, top, A, members, valid, H, head):
    """``(K, m)``: each member's response ``Delta_k(x_i)[argmax z_i]`` (the summands of eq. 3), 0 on padding."""
    delta = jax.vmap(lambda a_k, rows: _shift(phi_all[rows], a_k, H[rows], head))(A, members)
    return jnp.take_along_axis(delta, top[members][..., None], axis=2)[..., 0] * valid.astype(delta.dtype)


def _loss(params, H, Z, labels, mask, keys, resid, members, valid, lambda_stab, lambda_lin, b_s, b_r, head=None):
    """Eqs. (5)-(6): ``mean_k (fid_k + lambda_stab stab_k)`` plus the linearity term: ``lambda_lin ||(I - P)
    ybar||^2`` over the K subset means (``resid`` (K, K)), or ``lambda_lin mean_k ||(I - P_k) y_k||^2`` over
    each subset's member responses (``resid`` (K, m, m): ``linearity="example"``)."""
    enc, A = params
    phi_all, top = _phi(enc, H), jnp.argmax(Z, axis=1)  # once, for every term
    fid, stab, ybar = _terms(phi_all, top, A, Z, labels, mask, keys, H, head, b_s, b_r)
    if resid.ndim == 3:
        y = _member_responses(phi_all, top, A, members, valid, H, head)
        r = jnp.einsum("kij,kj->ki", resid, y, precision=_HI)
        lin = jnp.mean(jnp.sum(r * r, axis=1))
    else:
        r = jnp.matmul(resid, ybar, precision=_HI)
        lin = jnp.sum(r * r)
    return jnp.mean(fid + lambda_stab * stab) + lambda_lin * lin


@functools.partial(jax.jit, static_argnames=("kind", "d", "hidden", "rank", "num_classes", "num_examples",
                                             "num_subsets", "sketch_dim", "dtype", "linearity", "steer"))
def _setup(key, query_ids, indices, members, valid, lin_ridge, *, kind, d, hidden, rank, num_classes, num_examples,
           num_subsets, sketch_dim, dtype, linearity, steer="logit"):
    """Initial ``(phi, A = 0)``, the fixed ``I - P`` of eq. (4) and the batch key, from ``split(key, 3)``.

    Logit steering: phi has r outputs and A is (K, r, C); activation steering: phi has r d outputs (the basis
    B(h), app. E.1) and A is (K, r).

    ``linearity="subset"``: one (K, K) projector of the sketched membership ``X R``; ``"example"``: one
    (m, m) projector per subset of its members' rows ``R[S_k]`` (zero rows on padding), (K, m, m).
    """
    k_init, k_sketch, k_batch = jax.random.split(key, 3)
    R = jl_projection(k_sketch, sketch_dim, num_examples, dtype=dtype).T
    if steer == "activation":
        params = (_init_encoder(k_init, kind, d, hidden, rank * d, dtype), jnp.zeros((num_subsets, rank), dtype))
    else:
        params = (_init_encoder(k_init, kind, d, hidden, rank, dtype), jnp.zeros((num_subsets, rank, num_classes),
                                                                                 dtype))
    if linearity == "example":
        rows = jnp.where(valid[..., None], R[members], 0)
        return params, jax.vmap(_residual_projector, in_axes=(0, None))(rows, lin_ridge), k_batch
    return params, _residual_projector(_sketch(query_ids, indices, R, num_subsets), lin_ridge), k_batch


@eqx.filter_jit
def _step(params, opt_state, t, data, *, b_s, b_r):
    """One Adam step on (phi, A); step t, subset k draw batches from ``fold_in(fold_in(batches, t), k)``.

    ``data`` ends with the head (None, or a callable whose array leaves are traced and the rest static)."""
    H, Z, labels, mask, resid, members, valid, lambda_stab, lambda_lin, lr, k_batch, head = data
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.fold_in(k_batch, t), jnp.arange(mask.shape[0]))
    loss_fn = functools.partial(_loss, head=head, b_s=b_s, b_r=b_r)
    loss, grads = jax.value_and_grad(loss_fn)(params, H, Z, labels, mask, keys, resid, members, valid, lambda_stab,
                                              lambda_lin)
    updates, opt_state = optax.adam(lr).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _as_features(H, Z, labels):
    H, Z = jnp.asarray(H), jnp.asarray(Z)
    if H.ndim != 2 or not jnp.issubdtype(H.dtype, jnp.floating):
        raise ValueError(f"`H` must be a floating (N, d) feature matrix, got {H.dtype} {H.shape}; see "
                         "`cj.stride_features`.")
    if Z.ndim != 2 or not jnp.issubdtype(Z.dtype, jnp.floating) or Z.shape[0] != H.shape[0]:
        raise ValueError(f"`Z` must be the floating (N, C) frozen logits with N = {H.shape[0]} rows as `H`, got "
                         f"{Z.dtype} {Z.shape}.")
    if Z.shape[1] < 2:
        raise ValueError(f"`Z` must have at least 2 classes (columns), got {Z.shape[1]}.")
    labels = np.asarray(labels)
    if labels.shape != (H.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"`labels` must be ({H.shape[0]},) integer class labels to match `H`, got "
                         f"{labels.dtype} {labels.shape}.")
    if labels.min() < 0 or labels.max() >= Z.shape[1]:
        bad = np.flatnonzero((labels < 0) | (labels >= Z.shape[1]))
        raise ValueError(f"`labels` must lie in [0, C) = [0, {Z.shape[1]}); examples {bad[:10].tolist()} do not.")
    _checks.finite_rows(H, "`H`")
    _checks.finite_rows(Z, "`Z`")
    dtype = jnp.result_type(H.dtype, Z.dtype)
    return H.astype(dtype), Z.astype(dtype), jnp.asarray(labels, jnp.int32)


def _warn_membership(mask_np, sketch_dim: int, lambda_lin: float, linearity: str = "subset"):
    """Warns about memberships the fit cannot use well; returns each example's coverage (subsets holding it)."""
    num_subsets, n = mask_np.shape
    coverage = mask_np.sum(axis=0)
    if (coverage == 0).any():
        bad = np.flatnonzero(coverage == 0)
        warnings.warn(f"stride_fit: {bad.size} example(s) (e.g. {bad[:10].tolist()}) are in no subset; their "
                      "scores will be 0. Use subsets that cover all N (`cj.stride_subsets`).", stacklevel=3)
    if np.unique(mask_np.T, axis=0).shape[0] < n:
        warnings.warn("stride_fit: some examples belong to exactly the same subsets (identical columns of the "
                      "membership X, e.g. a single partition); the Lasso cannot tell them apart. Use several "
                      "rounds (`cj.stride_subsets` with num_subsets * subset_size > N).", stacklevel=3)
    largest = int(mask_np.sum(axis=1).max())
    if lambda_lin > 0 and linearity == "example" and largest <= sketch_dim:
        warnings.warn(f"stride_fit: every subset has at most {largest} <= sketch_dim = {sketch_dim} members: "
                      "each projector P_k of eq. (4) is close to the identity and the linearity term nearly "
                      "vanishes; use sketch_dim below the subset size.", stacklevel=3)
    if lambda_lin > 0 and linearity == "subset" and num_subsets <= sketch_dim:
        warnings.warn(f"stride_fit: K = {num_subsets} <= sketch_dim = {sketch_dim}: the projector P of eq. (4) is "
                      "close to the identity and the linearity term nearly vanishes; use sketch_dim < K.",
                      stacklevel=3)
    return coverage


def _check_head(head, H, Z, rows: int = 256):
    """Activation steering needs the rest of the network: ``head(H) = Z`` on the first rows, else ValueError."""
    if head is None or not callable(head):
        raise ValueError("steer='activation' needs `head`, the network after the feature layer: head(H_rows) -> "
                         "(B, C) logits (a jax.tree_util.Partial of your layers and their parameters).")
    try:
        got = head(H[:rows])
    except Exception as err:
        raise ValueError(f"`head(H[:{rows}])` failed; it must map (B, d) features to (B, C) logits: {err}") from err
    got = jnp.asarray(got)
    want = Z[:rows]
    if got.shape != want.shape:
        raise ValueError(f"`head(H[:{rows}])` has shape {got.shape}; it must return the logits, {want.shape}.")
    err = float(jnp.max(jnp.abs(got.astype(want.dtype) - want)))
    scale = 1.0 + float(jnp.max(jnp.abs(want)))
    if not err <= 1e-4 * scale:
        raise ValueError(f"`head(H)` does not reproduce the frozen logits `Z` (largest difference {err:.3g} on the "
                         f"first {want.shape[0]} rows); pass the layers after the one `H` was taken from, with the "
                         "model's own parameters.")


def _member_table(subs, num_subsets: int):
    """``(members (K, m), valid (K, m))``: subset k's member indices, padded to the largest subset."""
    qi, ix = np.asarray(subs.query_ids), np.asarray(subs.indices)
    order = np.argsort(qi, kind="stable")
    qi, ix = qi[order], ix[order]
    sizes = np.asarray(subs.sizes)
    pos = np.arange(qi.size) - (np.cumsum(sizes) - sizes)[qi]
    members = np.zeros((num_subsets, int(sizes.max())), np.int32)
    valid = np.zeros(members.shape, bool)
    members[qi, pos], valid[qi, pos] = ix, True
    return members, valid


def _train(params, opt_state, data, num_steps: int, b_s, b_r, progress: bool):
    """``num_steps`` Adam steps of the STRIDE objective; ``(params, loss history)``."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc="STRIDE operators", unit="step")
    history = []
    for t in range(num_steps):
        params, opt_state, loss = _step(params, opt_state, jnp.asarray(t, jnp.int32), data, b_s=b_s, b_r=b_r)
        history.append(loss)
        if bar is not None:
            bar.update(1)
    history = jnp.stack(history)
    history.block_until_ready()
    if bar is not None:
        bar.close()
    return params, history


def stride_fit(
    H: Float[Array, "n d"],
    Z: Float[Array, "n c"],
    labels: Int[Array, " n"],
    subsets,
    *,
    key: PRNGKeyArray,
    rank: int = 32,
    hidden_dim: int | None = None,
    encoder: str = "mlp",
    learning_rate: float = 5e-3,
    num_steps: int = 250,
    batch_size: int | None = 64,
    lambda_stab: float = 1.0,
    lambda_lin: float = 10.0,
    sketch_dim: int = 64,
    lin_ridge: float = 1e-3,
    linearity: str = "subset",
    steer: str = "logit",
    head: Callable | None = None,
    progress: bool = False,
) -> StrideOperators:
    """Learns one low-rank logit-steering operator per training subset (STRIDE sec. 3, Alg. 1).

    Minimises (eqs. 5-6)

    $$
    L = \\frac1K \\sum_k \\big(\\mathrm{fid}_k + \\lambda_{stab}\\,\\mathrm{stab}_k\\big)
        + \\lambda_{lin}\\, \\lVert (I - P)\\, \\bar y \\rVert^2
    $$

    over the encoder ``phi`` and ``A`` (init 0) with one ``optax.adam``:
    ``fid_k`` is the mean cross-entropy of ``softmax(z_i + Delta_k(x_i))`` on a
    batch of ``min(b, |S_k|)`` members (eq. 1), ``stab_k`` the mean
    ``KL(softmax(z_j) || softmax(z_j + Delta_k(x_j)))`` on ``b`` non-members
    (eq. 2), ``ybar_k`` the mean of ``Delta_k(x_i)[argmax z_i]`` on the members'
    batch (eq. 3), and ``P`` the fixed ridge projector of the sketch ``Xs = X R``
    (eq. 13, ``R = jl_projection(key_R, s, N).T``, ridge
    ``g = lin_ridge tr(Xs^T Xs) / s``, eq. 4). Batches are drawn without
    replacement (Gumbel top-b); ``batch_size=None`` uses all members and all
    non-members. Keys: ``init, sketch, batches = split(key, 3)``; step t,
    subset k use ``fold_in(fold_in(batches, t), k)``.

    Defaults are the paper's MNIST settings (Table 4); for CIFAR-10 it uses
    rank 64, learning rate 1e-3, 200 steps and ``lambda_lin = 1``.

    Args:
        H: ``(N, d)`` frozen features of the training set (:func:`stride_features`).
        Z: ``(N, C)`` frozen logits.
        labels: ``(N,)`` integer labels in ``[0, C)``.
        subsets: ``(K, m)`` int indices (:func:`stride_subsets`), a ``(K, N)``
            bool mask, or a list of index arrays. No subset may be empty or hold
            all N examples (eq. 2 needs a complement).
        key: PRNG key.
        rank: r, the encoder's output width.
        hidden_dim: the MLP encoder's hidden width (``None``: d, app. F.2).
        encoder: ``"mlp"`` or ``"linear"`` (``phi(h) = U h + u``).
        learning_rate: Adam's step size.
        num_steps: optimisation steps.
        batch_size: b (``None``: full subsets and complements).
        lambda_stab: weight of the stability term.
        lambda_lin: weight of the linearity term.
        sketch_dim: s, columns of the sketch.
        lin_ridge: relative ridge of eq. (4).
        linearity: how eq. (4) is read. ``"subset"``: ``y`` is the K-vector of
            subset means ``ybar_k`` (eq. 3) and ``X~`` the (K, s) sketch ``X R``, one
            term ``lambda_lin ||(I - P) ybar||^2``. ``"example"``: per subset, as
            eq. (4) types it (``X_k`` the |S_k| x N one-hot rows of its members):
            ``y_k`` the |S_k| member responses (the summands of eq. 3, over all
            members, not a batch), ``X~_k = R[S_k]``, and the term
            ``lambda_lin mean_k ||(I - P_k) y_k||^2`` (the ``1/K`` of the other
            terms). It needs subsets larger than ``sketch_dim``.
        steer: where the operators act. ``"logit"``: ``Delta_k = A_k^T phi(h)``
            is added to the frozen logits (sec. 3). ``"activation"`` (app. E.1):
            phi has ``r d`` outputs, read as a basis ``B(h)`` of shape (r, d);
            subset k shifts the features by ``s_k(h) = B(h)^T a_k`` (``a_k`` in
            R^r) and ``Delta_k = head(h + s_k(h)) - head(h)`` replaces the logit
            shift in every term and in the responses. When ``head`` is affine
            (features of the penultimate layer) this is logit steering with a
            constrained ``A_k``; it differs only deeper in the network.
        head: for ``steer="activation"``, the network after the feature layer:
            ``head(H_rows) -> (B, C)`` logits, with ``head(H) = Z``. Pass a
            ``jax.tree_util.Partial`` or an ``equinox.Module`` so that its
            parameters are traced; a plain closure compiles them in as constants.
        progress: show a progress bar.

    Returns:
        :class:`StrideOperators`.

    Warns:
        UserWarning: examples in no subset (their scores will be 0); identical
            columns of the membership (e.g. a single partition: examples of one
            block cannot be told apart); ``K <= sketch_dim`` with ``lambda_lin > 0``
            (the projector is then close to the identity and lin nearly vanishes),
            or with ``linearity="example"`` every subset no larger than ``sketch_dim``.

    Raises:
        ValueError: ``steer="activation"`` without a ``head``, a ``head`` with
            logit steering, or a head that does not reproduce ``Z`` from ``H``
            (checked on the first 256 rows before the fit).
    """
    H, Z, labels = _as_features(H, Z, labels)
    n, d = H.shape
    num_classes = Z.shape[1]
    subs = _checks.subsets(subsets, n)
    full = np.flatnonzero(subs.sizes >= n)
    if full.size:
        raise ValueError(f"`subsets` {full[:10].tolist()} hold all N = {n} examples; the stability term (eq. 2) "
                         "needs a complement: use smaller subsets.")
    key = as_key(key)
    rank = _checks.positive_int(rank, "rank")
    hidden = _checks.positive_int(hidden_dim, "hidden_dim", allow_none=True)
    hidden = d if hidden is None else hidden
    if encoder not in _ENCODERS:
        raise ValueError(f"`encoder` must be one of {_ENCODERS}, got {encoder!r}.")
    if steer not in _STEER:
        raise ValueError(f"`steer` must be one of {_STEER} (shift the logits, or the features through `head`, "
                         f"app. E.1), got {steer!r}.")
    if steer == "activation":
        _check_head(head, H, Z)
    elif head is not None:
        raise ValueError("`head` is used only with steer='activation'; pass steer='activation' to steer the features "
                         "through it, or drop `head` for logit steering.")
    if linearity not in _LINEARITY:
        raise ValueError(f"`linearity` must be one of {_LINEARITY} (eq. 4 over subset means, or per subset over "
                         f"its members), got {linearity!r}.")
    lr = _checks.positive_float(learning_rate, "learning_rate")
    num_steps = _checks.positive_int(num_steps, "num_steps")
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    lambda_stab = _checks.nonnegative_float(lambda_stab, "lambda_stab")
    lambda_lin = _checks.nonnegative_float(lambda_lin, "lambda_lin")
    sketch_dim = _checks.positive_int(sketch_dim, "sketch_dim")
    lin_ridge = _checks.nonnegative_float(lin_ridge, "lin_ridge")

    mask_np = subs.mask
    num_subsets = mask_np.shape[0]
    coverage = _warn_membership(mask_np, sketch_dim, lambda_lin, linearity)
    members, valid = _member_table(subs, num_subsets) if linearity == "example" else (
        np.zeros((num_subsets, 1), np.int32), np.zeros((num_subsets, 1), bool))

    dtype = H.dtype
    b_s = b_r = None
    if batch_size is not None:
        b_s = int(min(batch_size, subs.sizes.max()))
        b_r = int(min(batch_size, n - subs.sizes.min()))
    start = time.perf_counter()
    mask = jnp.asarray(mask_np)
    members, valid = jnp.asarray(members), jnp.asarray(valid)
    params, resid, k_batch = _setup(key, jnp.asarray(subs.query_ids), jnp.asarray(subs.indices), members, valid,
                                    jnp.asarray(lin_ridge, dtype), kind=encoder, d=d, hidden=hidden, rank=rank,
                                    num_classes=num_classes, num_examples=n, num_subsets=num_subsets,
                                    sketch_dim=sketch_dim, dtype=jnp.dtype(dtype), linearity=linearity, steer=steer)
    opt_state = optax.adam(lr).init(params)
    data = (H, Z, labels, mask, resid, members, valid, jnp.asarray(lambda_stab, dtype), jnp.asarray(lambda_lin, dtype),
            jnp.asarray(lr, dtype), k_batch, head)
    params, history = _train(params, opt_state, data, num_steps, b_s, b_r, progress)
    seconds = time.perf_counter() - start
    settings = dict(encoder=encoder, rank=rank, hidden_dim=hidden, learning_rate=lr, num_steps=num_steps,
                    batch_size=batch_size, lambda_stab=lambda_stab, lambda_lin=lambda_lin, sketch_dim=sketch_dim,
                    lin_ridge=lin_ridge, linearity=linearity, steer=steer)
    return StrideOperators(params[0], params[1], mask.astype(dtype), jnp.asarray(coverage, jnp.int32), history,
                           settings, seconds, head)


# -- responses and scores --------------------------------------------------------------


@jax.jit
def _responses(enc, A, H_test, classes):
    phi = _phi(enc, H_test)  # (Q, r)
    A_q = jnp.moveaxis(A[:, :, classes], 2, 0)  # (Q, K, r)
    return jnp.einsum("qr,qkr->qk", phi, A_q, precision=_HI)


def _check_ops(ops, H_test, classes):
    if not isinstance(ops, StrideOperators):
        raise TypeError(f"`ops` must be the `cj.StrideOperators` of `cj.stride_fit`, got {type(ops).__name__}.")
    H_test = jnp.asarray(H_test)
    d = ops.encoder["U" if "U" in ops.encoder else "V1"].shape[0]
    if H_test.ndim != 2 or H_test.shape[1] != d or not jnp.issubdtype(H_test.dtype, jnp.floating):
        raise ValueError(f"`H_test` must be floating (Q, d) features with d = {d} as the training features "
                         f"(same `feature_fn` and layer), got {H_test.dtype} {H_test.shape}.")
    _checks.finite_rows(H_test, "`H_test`", what="test point")
    classes = np.asarray(classes)
    num_classes = ops.A.shape[2] if ops.head is None else jax.eval_shape(ops.head, H_test[:1]).shape[1]
    if classes.shape != (H_test.shape[0],) or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"`classes` must be ({H_test.shape[0]},) integer classes, one per test point, got "
                         f"{classes.dtype} {classes.shape}; the STRIDE paper uses the predicted class argmax z.")
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"`classes` must lie in [0, C) = [0, {num_classes}), got values "
                         f"{classes[(classes < 0) | (classes >= num_classes)][:10].tolist()}.")
    return H_test.astype(ops.A.dtype), jnp.asarray(classes, jnp.int32)


@eqx.filter_jit
def _activation_responses(enc, A, H_test, classes, head):
    """``(Q, K)``: ``(head(h_q + B(h_q)^T a_k) - head(h_q))[classes_q]``, the K subsets in batches (memory Q d each)."""
    basis = _phi(enc, H_test).reshape(H_test.shape[0], A.shape[1], H_test.shape[1])
    base = head(H_test)

    def one(a_k):
        delta = head(H_test + jnp.einsum("qrd,r->qd", basis, a_k, precision=_HI)) - base
        return jnp.take_along_axis(delta, classes[:, None], axis=1)[:, 0]

    return lax.map(one, A, batch_size=min(A.shape[0], 16)).T


def stride_responses(ops: StrideOperators, H_test: Float[Array, "q d"], *, classes) -> Float[Array, "q k"]:
    """Steering responses ``Y[q, k] = Delta_k(x_q)[classes_q]`` (Alg. 1 l. 9): ``(A_k^T phi(h_q))[classes_q]``,
    or ``(head(h_q + B(h_q)^T a_k) - head(h_q))[classes_q]`` for activation steering.

    Args:
        ops: the operators of :func:`stride_fit`.
        H_test: ``(Q, d)`` test features from the same ``feature_fn``.
        classes: ``(Q,)`` the class whose logit shift is read (the paper
            uses the predicted class ``argmax z``; the LDS uses the true label).

    Returns:
        ``(Q, K)`` responses.
    """
    H_test, classes = _check_ops(ops, H_test, classes)
    if ops.head is not None:
        return _activation_responses(ops.encoder, ops.A, H_test, classes, ops.head)
    return _responses(ops.encoder, ops.A, H_test, classes)


def stride_scores(ops: StrideOperators, H_test: Float[Array, "q d"], *, classes, **lasso_settings) -> LassoSolution:
    """Per-example STRIDE scores: the Lasso of the responses on the membership (sec. 3, app. E.1).

    ``cj.lasso(ops.membership, stride_responses(ops, H_test, classes=classes),
    **lasso_settings)``: ``coef[q, i] > 0`` when example i raises the class
    logit of test point q (helpful). :func:`cif_jax.evaluation.lds` predicts the loss of a
    subset S' by ``-sum_{i in S'} coef[q, i]``.

    Args:
        ops: the operators of :func:`stride_fit`.
        H_test: ``(Q, d)`` test features.
        classes: ``(Q,)`` classes read.
        **lasso_settings: ``alpha``, ``alpha_ratio``, ``fit_intercept``, ``tol``,
            ``max_steps`` of :func:`cif_jax.estimators.lasso`.

    Returns:
        :class:`cif_jax.LassoSolution`; ``coef`` holds the ``(Q, N)`` scores.
    """
    allowed = {"alpha", "alpha_ratio", "fit_intercept", "tol", "max_steps"}
    unknown = sorted(set(lasso_settings) - allowed)
    if unknown:
        raise TypeError(f"stride_scores: unknown Lasso setting(s) {unknown}; valid: {sorted(allowed)}.")
    Y = stride_responses(ops, H_test, classes=classes)
    return lasso(ops.membership, Y, **lasso_settings)
