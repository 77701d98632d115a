"""Interaction-aware group influence: a second-order expansion of the target
("Interaction-Aware Influence Functions for Group Attribution").

Summed influences miss how the members of a group interact. Expanding a scalar
target ``f`` (here the mean loss of an evaluation task V) to second order around
``theta_0`` along the removal response ``delta_S = sum_{i in S} delta_i``,
``delta_i = (1/N) H~^{-1} g_i`` (:func:`cif_jax.estimators.influence`):

$$
\\Delta f(S) \\approx F + I, \\qquad F = \\nabla f^\\top \\delta_S, \\qquad
I = \\tfrac12 \\delta_S^\\top H_f \\delta_S = \\tfrac12 \\sum_{i, j \\in S} I_{ij},
\\quad I_{ij} = \\delta_i^\\top H_f \\delta_j,
$$

with ``H_f`` the target's curvature at ``theta_0`` (the interaction paper, eqs. 5-9; its
equations were lost in extraction, so the forms here are rebuilt from its text:
removal ``F + I``, addition ``-F + I``). Every builder returns
:class:`InteractionTerms` ``(first_order, coords, curved)`` with ``first_order_i
= grad f . delta_i`` and ``I_ij = coords_i . curved_j``, so that a group's value is
``F = sigma sum_i first_order_i`` and ``I = 1/2 (sum_i coords_i) . (sum_i curved_i)``:

* :func:`interaction_terms`: exact, ``coords_i = delta_i``, ``curved_i = H_f delta_i``
  (one damped-GGN solve per candidate);
* :func:`cache_interaction_terms`: from a CiF cache, ``coords_i = onehot(c(i))``,
  ``curved_i = K[c(i)] / N^2`` with ``K_cc' = v_c . H_f v_c'``: C products with
  ``H_f``, then O(|S| + C^2) per group. It is exactly ``F + I`` at CiF's
  ``hat delta_S`` (CiF eq. 10).

:func:`second_order_terms` writes the ``F + B`` baseline (Basu et al.), alone or
with I, as the same pair terms, so that it too ranks groups and drives
:func:`greedy_select`, the interaction-aware greedy selection (the interaction paper,
Algorithm 1, sec. 5.1).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

from ..cif.cache import InfluenceCache
from ..core import checks as _checks
from ..core.ggn import ggn_matvec_fn
from ..core.gradients import subset_gradient_sums
from ..core.task import Task, take_examples
from ..solvers.operator import DampedGGN
from ..solvers.solve import check_solver, solve_ggn
from .influence import influence

KINDS = ("ggn", "hessian")
SETTINGS = {"remove": 1.0, "add": -1.0}


class InteractionTerms(NamedTuple):
    """Per-candidate terms of the second-order group influence.

    Attributes:
        first_order: (P,) ``grad f . delta_i`` (removal sign).
        coords: (P, k) with ``I_ij = coords_i . curved_j``.
        curved: (P, k).
    """

    first_order: Float[Array, " p"]
    coords: Float[Array, "p k"]
    curved: Float[Array, "p k"]


def _check_target(target, task: Task | None = None) -> None:
    _checks.task(target)
    if task is None:
        return
    a, _ = ravel_pytree(task.params)
    b, _ = ravel_pytree(target.params)
    if (jax.tree_util.tree_structure(task.params) != jax.tree_util.tree_structure(target.params)
            or a.shape != b.shape or not bool(jnp.array_equal(a, b))):
        raise ValueError(
            "`target` must be a Task of the same model snapshot as `task` (same params), on the evaluation data: "
            "build it with the training task's apply_fn, loss_fn and params and the evaluation inputs/targets."
        )


def _target_matvec(target: Task, kind: str, batch_size):
    if kind == "ggn":
        return ggn_matvec_fn(target, batch_size=batch_size)
    flat, unravel = ravel_pytree(target.params)

    def mean_loss(fp):
        return jnp.mean(target.loss_fn(target.apply_fn(unravel(fp), target.inputs), target.targets))

    grad = jax.grad(mean_loss)
    return lambda v: jax.jvp(grad, (flat,), (v,))[1]


def target_gradient(target: Task) -> Float[Array, " p"]:
    """``grad f`` at the snapshot, f the mean loss of ``target``."""
    flat, unravel = ravel_pytree(target.params)

    def mean_loss(fp):
        return jnp.mean(target.loss_fn(target.apply_fn(unravel(fp), target.inputs), target.targets))

    return jax.jit(jax.grad(mean_loss))(flat)


def target_curvature(target: Task, *, kind: str = "ggn", batch_size: int | None = None) -> lx.FunctionLinearOperator:
    """``H_f``, the undamped curvature of the target's mean loss, as a lineax operator.

    Args:
        target: a :class:`cif_jax.Task` on the evaluation data (f = its mean loss).
        kind: ``"ggn"`` (PSD, the default: the paper's eq. 6 is written with the
            target's Hessian, and its practical section replaces the Hessians by
            damped Gauss-Newton approximations; the GGN keeps ``I >= 0``) or
            ``"hessian"`` (forward-over-reverse, exact, indefinite in general).
        batch_size: examples per chunk of the GGN product (``"ggn"`` only).

    Returns:
        A ``lineax.FunctionLinearOperator`` on flat (p,) vectors (tagged symmetric,
        and PSD for ``"ggn"``).
    """
    _check_target(target)
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    flat, _ = ravel_pytree(target.params)
    tags = (lx.symmetric_tag, lx.positive_semidefinite_tag) if kind == "ggn" else (lx.symmetric_tag,)
    return lx.FunctionLinearOperator(_target_matvec(target, kind, batch_size),
                                     jax.ShapeDtypeStruct(flat.shape, flat.dtype), tags=tags)


@eqx.filter_jit
def _apply_rows(target, kind, batch_size, rows):
    return jax.vmap(_target_matvec(target, kind, batch_size))(rows)


def interaction_terms(
    task: Task,
    target: Task,
    indices,
    *,
    damping: float,
    kind: str = "ggn",
    solver=None,
    batch_size: int | None = None,
    method: str = "exact",
) -> InteractionTerms:
    """Exact terms for candidates ``indices``: ``coords_i = delta_i``, ``curved_i = H_f delta_i``.

    One damped-GGN solve per candidate (as :func:`cif_jax.estimators.influence`, same
    settings), then one ``H_f`` product per candidate.

    Args:
        task: the training task (the model snapshot and its N examples).
        target: a task on the evaluation data with the same params.
        indices: (P,) distinct training example indices, the candidate pool.
        damping, solver, batch_size: as :func:`cif_jax.estimators.influence`.
        kind: ``H_f`` as :func:`target_curvature`.
        method: ``"exact"`` (|P| solves, k = p) or ``"target_factors"`` (the same
            terms from ``|V| q`` solves, q the model outputs, k = |V| q: with the GGN
            ``H_f = (1/|V|) J_V^T W J_V``, ``R = H~^{-1} J_V^T``, ``coords_i = R^T g_i / N
            = J_V delta_i``, ``curved_i = W coords_i / |V|``, ``first_order_i = r . coords_i
            / |V|`` with r the output gradients of the target loss; cheaper when
            ``|V| q << |P|``; ``kind="ggn"`` only).

    Returns:
        :class:`InteractionTerms` with k = p (exact) or |V| q (target factors).
    """
    _checks.task(task)
    _check_target(target, task)
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    if method not in ("exact", "target_factors"):
        raise ValueError(f"`method` must be 'exact' or 'target_factors', got {method!r}.")
    if method == "target_factors" and kind != "ggn":
        raise ValueError("method='target_factors' factors the target's GGN; use kind='ggn' or method='exact'.")
    idx = _candidate_indices(indices, task.num_examples)
    solver = check_solver(solver)
    if method == "target_factors":
        from ..core.gradients import per_example_grads

        jt, w, r = _target_factors(target)  # (|V| q, p), (|V|, q, q), (|V|, q)
        rt = solve_ggn(task, jt, damping=damping, solver=solver, batch_size=batch_size).solutions  # R^T
        g = per_example_grads(take_examples(task, idx), batch_size=batch_size)
        nv, q = r.shape
        coords = g @ rt.T / jnp.asarray(task.num_examples, g.dtype)
        curved = jnp.einsum("vab,pvb->pva", w, coords.reshape(-1, nv, q)).reshape(coords.shape) / nv
        first = coords @ r.reshape(-1).astype(coords.dtype) / nv
        return InteractionTerms(first, coords, curved)
    deltas = influence(task, [np.array([i]) for i in idx], damping=damping, solver=solver, batch_size=batch_size)
    curved = _apply_rows(target, kind, batch_size, deltas)
    first = deltas @ target_gradient(target).astype(deltas.dtype)
    return InteractionTerms(first, deltas, curved)


@eqx.filter_jit
def _target_factors(target: Task):
    """Rows ``J_v^T e_a`` (|V| q, p), output Hessians W_v (|V|, q, q), output gradients r_v (|V|, q)."""
    from ..core.ggn import as_batch_of_one

    flat, unravel = ravel_pytree(target.params)

    def one(x, y):
        out, vjp = jax.vjp(lambda fp: target.apply_fn(unravel(fp), as_batch_of_one(x))[0], flat)
        m = out.size
        loss_one = lambda o: target.loss_fn(o.reshape(out.shape)[None], as_batch_of_one(y))[0]
        rows = jax.vmap(lambda e: vjp(e.reshape(out.shape))[0])(jnp.eye(m, dtype=out.dtype))
        return rows, jax.hessian(loss_one)(out.reshape(-1)), jax.grad(loss_one)(out.reshape(-1))

    rows, w, r = jax.vmap(one)(target.inputs, target.targets)
    return rows.reshape(-1, flat.shape[0]), w, r


def _candidate_indices(indices, n: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError(f"`indices` must be a non-empty 1-D array of example indices; got shape {idx.shape}.")
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"`indices` must hold integers; got dtype {idx.dtype}.")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"`indices` must lie in [0, N) = [0, {n}); got [{idx.min()}, {idx.max()}].")
    if np.unique(idx).size != idx.size:
        raise ValueError("`indices` repeats examples; give each candidate once.")
    return idx


def cache_interaction_terms(
    cache: InfluenceCache,
    target: Task,
    *,
    first_order: str = "cache",
    task: Task | None = None,
    kind: str = "ggn",
    batch_size: int | None = None,
    solver=None,
) -> InteractionTerms:
    """Terms for all N training examples from a CiF cache (C products with ``H_f``).

    ``K_cc' = v_c . H_f v_c'`` (symmetrised), ``coords_i = onehot(c(i))``,
    ``curved_i = K[c(i)] / N^2``; ``first_order="cache"``: ``alpha_c(i)(f) / N``
    (CiF eq. 11, no solve), ``"exact"``: ``g_i . u_f / N`` with ``u_f = H~^{-1} grad f``
    (one solve; needs ``task``).

    Args:
        cache: an :class:`cif_jax.InfluenceCache`.
        target: a task on the evaluation data with the cache's params.
        first_order: ``"cache"`` or ``"exact"``.
        task: the training task the cache was built from (checked by fingerprint);
            required for ``"exact"``.
        kind: ``H_f`` as :func:`target_curvature`.
        batch_size: examples per chunk.
        solver: the solver of the ``"exact"`` solve (None: ``cif_jax.CG()``).

    Returns:
        :class:`InteractionTerms` with P = N, k = C.
    """
    if not isinstance(cache, InfluenceCache):
        raise TypeError(f"`cache` must be a `cif_jax.InfluenceCache`, got {type(cache).__name__}.")
    if first_order not in ("cache", "exact"):
        raise ValueError(f"`first_order` must be 'cache' or 'exact', got {first_order!r}.")
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    _check_target(target, task)
    if target.num_params != cache.num_params:
        raise ValueError(f"`target` has p = {target.num_params} parameters but the cache p = {cache.num_params}.")
    operator = None if task is None else DampedGGN(task, damping=cache.damping, batch_size=batch_size)
    if operator is not None and operator.fingerprint != cache.fingerprint:
        raise ValueError("`task` is not the task this cache was built from (fingerprint differs).")
    if first_order == "exact" and task is None:
        raise ValueError("first_order='exact' needs the training `task` (for g_i and the solve).")
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    n = cache.num_examples
    v = cache.responses
    hv = _apply_rows(target, kind, batch_size, v)
    k = v @ hv.T
    k = 0.5 * (k + k.T)
    grad_f = target_gradient(target).astype(v.dtype)
    nn = jnp.asarray(n, v.dtype)
    if first_order == "cache":
        first = (v @ grad_f)[cache.assignments] / nn
    else:
        from ..core.gradients import per_example_grads

        u = check_solver(solver).solve(operator, grad_f[None, :]).solutions[0]
        first = per_example_grads(task, batch_size=batch_size) @ u / nn
    coords = jax.nn.one_hot(cache.assignments, cache.num_clusters, dtype=v.dtype)
    curved = k[cache.assignments] / (nn * nn)
    return InteractionTerms(first, coords, curved)


def _check_terms(terms) -> InteractionTerms:
    if not isinstance(terms, InteractionTerms):
        raise TypeError(f"`terms` must be a `cif_jax.InteractionTerms`, got {type(terms).__name__}.")
    f, c, d = (jnp.asarray(a) for a in terms)
    if f.ndim != 1 or c.ndim != 2 or d.shape != c.shape or c.shape[0] != f.shape[0]:
        raise ValueError(f"`terms` shapes must be first_order (P,), coords (P, k), curved (P, k); got {f.shape}, "
                         f"{c.shape}, {d.shape}.")
    return InteractionTerms(f, c, d)


def _sigma(setting: str) -> float:
    if setting not in SETTINGS:
        raise ValueError(f"`setting` must be one of {tuple(SETTINGS)}, got {setting!r}.")
    return SETTINGS[setting]


@jax.jit
def _group(first, coords, curved, query_ids, indices, sigma, num_queries_like):
    q = num_queries_like.shape[0]
    fsum = jax.ops.segment_sum(first[indices], query_ids, num_segments=q)
    csum = jax.ops.segment_sum(coords[indices], query_ids, num_segments=q)
    dsum = jax.ops.segment_sum(curved[indices], query_ids, num_segments=q)
    f = sigma * fsum
    i = 0.5 * jnp.sum(csum * dsum, axis=1)
    return f, i, f + i


def group_influence(terms: InteractionTerms, subsets, *, setting: str = "remove"):
    """Second-order change of the target when each group is removed (or added).

    ``F = sigma sum_{i in S} first_order_i`` (sigma = +1 removal, -1 addition),
    ``I = 1/2 (sum_{i in S} coords_i) . (sum_{i in S} curved_i)``; with cache terms
    this is ``m^T K m / (2 N^2)``, O(|S| + C^2) per group.

    Args:
        terms: :class:`InteractionTerms` over a pool of P candidates.
        subsets: groups as positions in the pool: a (Q, P) boolean mask, a (Q, m)
            integer array, or a list of integer arrays.
        setting: ``"remove"`` or ``"add"``.

    Returns:
        ``(first_order, interaction, total)``, each (Q,).
    """
    terms = _check_terms(terms)
    sigma = _sigma(setting)
    subs = _checks.subsets(subsets, terms.first_order.shape[0])
    q = int(subs.sizes.shape[0])
    return _group(terms.first_order, terms.coords, terms.curved, jnp.asarray(subs.query_ids),
                  jnp.asarray(subs.indices), jnp.asarray(sigma, terms.first_order.dtype), jnp.zeros(q))


@functools.partial(jax.jit, static_argnames=("budget",))
def _greedy(first, coords, curved, excluded, sigma, budget):
    self_terms = 0.5 * jnp.sum(coords * curved, axis=1)

    def step(t, state):
        acc, taken, chosen, scores, objective, total = state
        score = sigma * first + coords @ acc + self_terms
        score = jnp.where(taken, jnp.inf, score)
        z = jnp.argmin(score)  # first minimum: ties go to the lowest index
        total = total + score[z]
        return (acc + curved[z], taken.at[z].set(True), chosen.at[t].set(z.astype(jnp.int32)), scores.at[t].set(score[z]),
                objective.at[t].set(total), total)

    init = (jnp.zeros(coords.shape[1], coords.dtype), excluded, jnp.zeros(budget, jnp.int32),
            jnp.zeros(budget, first.dtype), jnp.zeros(budget, first.dtype), jnp.zeros((), first.dtype))
    _, _, chosen, scores, objective, _ = jax.lax.fori_loop(0, budget, step, init)
    return chosen, scores, objective


def greedy_select(terms: InteractionTerms, *, budget: int, setting: str = "add", exclude=None):
    """Interaction-aware greedy selection (the interaction paper, Algorithm 1): minimise the target's change.

    With ``s_z = 1/2 coords_z . curved_z`` and ``acc = sum`` of the chosen
    ``curved``, each step takes the unchosen z minimising the marginal change
    ``D(z | S) = sigma first_order_z + coords_z . acc + s_z`` (ties: the lowest
    index), the exact change of ``F + I`` when z joins S (H_f symmetric). One jitted
    ``lax.fori_loop``, O(budget P k).

    Args:
        terms: :class:`InteractionTerms` over the candidate pool.
        budget: examples to select, at most the candidates not excluded.
        setting: ``"add"`` (select data to add; sigma = -1) or ``"remove"``.
        exclude: optional positions in the pool never to select.

    Returns:
        ``(indices, scores, objective)``, each (budget,): positions in the pool in
        the order chosen, their marginal changes, and ``F + I`` of the selection so
        far after each step.
    """
    terms = _check_terms(terms)
    sigma = _sigma(setting)
    budget = _checks.positive_int(budget, "budget")
    p = terms.first_order.shape[0]
    excluded = np.zeros(p, bool)
    if exclude is not None:
        ex = np.asarray(exclude)
        if ex.ndim != 1 or not np.issubdtype(ex.dtype, np.integer) or (ex.size and (ex.min() < 0 or ex.max() >= p)):
            raise ValueError(f"`exclude` must be a 1-D integer array of positions in [0, {p}).")
        excluded[ex] = True
    if budget > p - excluded.sum():
        raise ValueError(f"`budget` = {budget} exceeds the {p - int(excluded.sum())} candidates not excluded.")
    return _greedy(terms.first_order, terms.coords, terms.curved, jnp.asarray(excluded),
                   jnp.asarray(sigma, terms.first_order.dtype), budget)


class InteractionErrorBound(NamedTuple):
    """Output of :func:`interaction_error_bound`, each (Q,) except ``target_norm``.

    Attributes:
        bound: ``||H_f||_2 (||hat delta_S|| ||e|| + ||e||^2 / 2)``, bounding
            ``|I(delta_S) - I(hat delta_S)|`` given ``||e|| <= delta_error``.
        delta_error: the bound on ``||e|| = ||delta_S - hat delta_S||`` (CiF eq. 13:
            scatter term + solver term).
        hat_norm: ``||hat delta_S||``.
        target_norm: () ``||H_f||_2`` estimated by power iteration.
    """

    bound: Float[Array, " q"]
    delta_error: Float[Array, " q"]
    hat_norm: Float[Array, " q"]
    target_norm: Float[Array, ""]


@eqx.filter_jit
def _power_norm(target, kind, batch_size, key, iters):
    mv = _target_matvec(target, kind, batch_size)
    flat, _ = ravel_pytree(target.params)
    v = jax.random.normal(key, flat.shape, flat.dtype)
    v = v / jnp.linalg.norm(v)

    def step(_, v):
        w = mv(v)
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(w.dtype).tiny)

    v = jax.lax.fori_loop(0, iters, step, v)
    return jnp.linalg.norm(mv(v))


def interaction_error_bound(
    cache: InfluenceCache,
    target: Task,
    subsets,
    *,
    task: Task | None = None,
    kind: str = "ggn",
    key=None,
    power_iters: int = 100,
    batch_size: int | None = None,
) -> InteractionErrorBound:
    """How far the cache's interaction term can be from the exact one (item 6 of the design).

    With ``e = delta_S - hat delta_S``,
    ``I(delta_S) - I(hat delta_S) = hat delta_S^T H_f e + 1/2 e^T H_f e``, so
    ``|I(delta_S) - I(hat delta_S)| <= ||H_f||_2 (||hat delta_S|| ||e|| + ||e||^2 / 2)``
    with ``||e||`` bounded by CiF's eq. (13) (:func:`cif_jax.subset_error_bound`,
    exact scatter with ``task``, the looser triangle form without). ``||H_f||_2`` is a
    power-iteration estimate (from below: converged to its reported digits for a
    PSD ``H_f`` with a gap; raise ``power_iters`` otherwise). Lost in the cache:
    within-cluster scatter in the self terms ``I_ii``; same-cluster candidates tie.

    Returns:
        :class:`InteractionErrorBound`.
    """
    from ..cif.bounds import subset_error_bound
    from ..cif.queries import param_delta
    from ..core.checks import as_key

    if not isinstance(cache, InfluenceCache):
        raise TypeError(f"`cache` must be a `cif_jax.InfluenceCache`, got {type(cache).__name__}.")
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    _check_target(target, task)
    power_iters = _checks.positive_int(power_iters, "power_iters")
    key = jax.random.key(0) if key is None else as_key(key)
    scatter, solver = subset_error_bound(cache, subsets, task=task, batch_size=batch_size)
    e = scatter + solver
    hat = jnp.linalg.norm(param_delta(cache, subsets), axis=1)
    norm = _power_norm(target, kind, batch_size, key, power_iters)
    return InteractionErrorBound(norm * (hat * e + 0.5 * e * e), e, hat, norm)


class SecondOrderInfluence(NamedTuple):
    """Output of :func:`second_order_group_influence`, each (Q,) or (Q, p).

    Attributes:
        first_order: F = grad f . delta_S.
        correction: B = (1/N) u_f^T H_S delta_S, u_f = H~^{-1} grad f.
        total: F + B = grad f . (delta_S + (1/N) H~^{-1} H_S delta_S).
        param_change: (Q, p) the second-order response delta_S + (1/N) H~^{-1} H_S delta_S.
    """

    first_order: Float[Array, " q"]
    correction: Float[Array, " q"]
    total: Float[Array, " q"]
    param_change: Float[Array, "q p"]


def second_order_group_influence(
    task: Task,
    target: Task,
    subsets,
    *,
    damping: float,
    solver=None,
    batch_size: int | None = None,
) -> SecondOrderInfluence:
    """The F + B baseline: Basu, You and Feizi's second-order group influence, without third derivatives.

    The removal response gains the term of the group's own curvature,
    ``delta_S + (1/N) H~^{-1} H_S delta_S`` with ``H_S = sum_{i in S} J_i^T W_i J_i``,
    and the target's change ``F + B``, ``B = (1/N) u_f^T H_S delta_S``. (The interaction paper compares with it; its formula is not printed there, this form is inferred.)
    Costs 2Q + 1 damped-GGN solves.

    References:
        Basu, You and Feizi, "On second-order group influence functions for black-box
        predictions", ICML 2020; "Interaction-Aware Influence Functions for Group Attribution", sec. 4.
    """
    from ..core.curvature import CurvatureSample

    _checks.task(task)
    _check_target(target, task)
    subs = _checks.subsets(subsets, task.num_examples)
    operator = DampedGGN(task, damping=damping, batch_size=batch_size)
    # 2Q + 1 systems in three calls: one preconditioner decision for all of them.
    solver = check_solver(solver).prepare(operator, 2 * subs.sizes.size + 1)
    sums = subset_gradient_sums(task, subsets, batch_size=batch_size)
    n = jnp.asarray(task.num_examples, sums.dtype)
    deltas = solver.solve(operator, sums).solutions / n  # (Q, p): per-query IF on the same operator
    starts = np.concatenate([[0], np.cumsum(subs.sizes)])
    hsd = []
    for q in range(subs.sizes.size):
        members = subs.indices[starts[q]:starts[q + 1]]
        sample = CurvatureSample(jnp.asarray(members, jnp.int32), jnp.ones(members.size, deltas.dtype))
        # ggn_matvec_fn averages over the sample; H_S is the sum.
        hsd.append(_sample_product(task, sample, batch_size, deltas[q]) * members.size)
    hsd = jnp.stack(hsd)
    grad_f = target_gradient(target).astype(deltas.dtype)
    u_f = solver.solve(operator, grad_f[None, :]).solutions[0]
    extra = solver.solve(operator, hsd).solutions / n
    first = deltas @ grad_f
    correction = hsd @ u_f / n
    return SecondOrderInfluence(first, correction, first + correction, deltas + extra)


def second_order_terms(
    task: Task,
    target: Task,
    indices,
    *,
    damping: float,
    interaction: bool = False,
    kind: str = "ggn",
    solver=None,
    batch_size: int | None = None,
) -> InteractionTerms:
    """Basu's correction (``F + B``), optionally with the interaction term (``F + I + B``), as pair terms.

    The correction of :func:`second_order_group_influence` is itself pairwise,
    ``B(S) = (1/N) u_f^T H_S delta_S = sum_{i, j in S} h_i . delta_j`` with
    ``h_i = (1/N) J_i^T W_i J_i u_f`` and ``u_f = H~^{-1} grad f``. Symmetrised,
    ``coords_i = [h_i, delta_i]``, ``curved_i = [delta_i, h_i]`` give ``1/2 sum_{i,j}
    coords_i . curved_j = B(S)`` exactly, so :func:`group_influence` and
    :func:`greedy_select` evaluate ``F + B`` (and, with ``interaction=True``,
    ``F + I + B``: ``coords_i = [delta_i, h_i, delta_i]``, ``curved_i = [H_f delta_i,
    delta_i, h_i]``) on any group without new solves. B is quadratic in the
    removal weights, so it keeps its sign under addition, as I does.

    Costs the |P| + 1 solves of :func:`interaction_terms` plus one solve and
    |P| per-example GGN products; k = 2p (3p with the interaction).

    Args:
        task, target, indices, damping, kind, solver, batch_size: as
            :func:`interaction_terms` (exact).
        interaction: include the interaction paper's term I.

    Returns:
        :class:`InteractionTerms` whose ``group_influence`` is ``(F, B, F + B)`` or
        ``(F, I + B, F + I + B)``.
    """
    _checks.task(task)
    _check_target(target, task)
    idx = _candidate_indices(indices, task.num_examples)
    operator = DampedGGN(task, damping=damping, batch_size=batch_size)
    lam = operator.damping
    solver = check_solver(solver).prepare(operator, idx.size + 1)
    exact = interaction_terms(task, target, indices, damping=lam, kind=kind, solver=solver, batch_size=batch_size)
    grad_f = target_gradient(target).astype(exact.coords.dtype)
    u_f = solver.solve(operator, grad_f[None, :]).solutions[0]
    h = _per_example_products(take_examples(task, idx), u_f, batch_size) / jnp.asarray(task.num_examples, u_f.dtype)
    delta = exact.coords
    if interaction:
        return InteractionTerms(exact.first_order, jnp.concatenate([delta, h, delta], axis=1),
                                jnp.concatenate([exact.curved, delta, h], axis=1))
    return InteractionTerms(exact.first_order, jnp.concatenate([h, delta], axis=1),
                            jnp.concatenate([delta, h], axis=1))


@eqx.filter_jit
def _per_example_products(task: Task, v, batch_size):
    """Rows ``J_i^T W_i J_i v`` for every example of ``task``, (N, p)."""
    from ..core.ggn import as_batch_of_one, output_hvp

    flat, unravel = ravel_pytree(task.params)

    def one(xy):
        x, y = xy
        out, jvp_fn = jax.linearize(lambda fp: task.apply_fn(unravel(fp), as_batch_of_one(x)), flat)
        wjv = output_hvp(task.loss_fn, out[0], y, jvp_fn(v)[0])
        (row,) = jax.linear_transpose(jvp_fn, flat)(wjv[None])
        return row

    return jax.lax.map(one, (task.inputs, task.targets), batch_size=batch_size)


@eqx.filter_jit
def _sample_product(task, sample, batch_size, v):
    return ggn_matvec_fn(task, batch_size=batch_size, curvature=sample)(v)
