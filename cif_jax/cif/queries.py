"""Online CiF queries: recombine cached responses (paper eqs. 10-11) and the low-rank deviations.

Three estimators answer a loss query ``Delta l(S; V)`` from one cache (``estimator=``):

* ``"hybrid"`` (the default): the exact cluster part of eq. (11), plus the deviations
  ``g_i - mu_c(i)`` of the removed examples through the low-rank inverse
  (:mod:`cif_jax.cif.lowrank`), plus, over ``S cap V``, the part of each member's self
  term those two miss (:mod:`cif_jax.cif.correction`). It answers every query: held-out
  points, other folds, the removed set itself. O(|S| r + C) per query, or O(|S|) once an
  evaluation gradient's per-example scores are formed (:func:`example_scores`).
* ``"corrected"``: eq. (11) plus the whole self terms over ``S cap V``; for folds scored on
  themselves it is as good, elsewhere it is eq. (11).
* ``"paper"``: eq. (11) alone, ``(1/N) sum_c m_c(S) alpha_c(V)``: reproduces the paper's tables.

Each is an :class:`Estimator` value (``estimator=`` takes it or its name); the query
functions read only its fields, so another estimator is another value. A query S enters
the cluster part only through its cluster counts ``m_c(S)``.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ..core import checks as _checks
from ..core.gradients import gradient_sums_pass, raise_on_bad, streamed_map
from ..core.task import Task, take_examples
from .cache import InfluenceCache

HIGHEST = jax.lax.Precision.HIGHEST

class Estimator(eqx.Module):
    """How a loss query combines what the cache holds: a small immutable value with behaviour.

    Every query function takes ``estimator=`` as one of these or as its name. The three the
    library defines differ in two choices, and the query functions read only these fields:

    Attributes:
        name: what ``estimator=`` may be spelled as (``"hybrid"``, ``"corrected"``, ``"paper"``).
        deviations: carry each removed example's deviation ``g_i - mu_c(i)`` through the
            cache's low-rank factors (a cache without factors answers without them).
        self_terms: add the self terms over ``S cap V`` (needs a cache with a correction):
            the remainder the deviations miss when ``deviations``, else the whole ``t_i``.
    """

    name: str = eqx.field(static=True)
    deviations: bool = eqx.field(static=True)
    self_terms: bool = eqx.field(static=True)

    def uses_deviations(self, cache) -> bool:
        """Whether this query adds the low-rank deviations (the estimator asks and the cache has factors)."""
        return self.deviations and _rank(cache) > 0

    def self_values(self, terms):
        """The per-example scalars added over ``S cap V``: the remainder (with deviations) or the whole ``t_i``."""
        return terms.remainder if self.deviations else terms.values


#: The default: the clusters' exact solves, the low-rank deviations and the self terms' remainder.
HYBRID = Estimator("hybrid", deviations=True, self_terms=True)
#: The paper's eq. 11 plus the whole self terms over the overlap.
CORRECTED = Estimator("corrected", deviations=False, self_terms=True)
#: The paper's eq. 11 alone.
PAPER = Estimator("paper", deviations=False, self_terms=False)
#: The loss-query estimators by name, the default first.
ESTIMATORS = {e.name: e for e in (HYBRID, CORRECTED, PAPER)}
#: Members per chunk when summing deviation coordinates per query (bounds the gather's memory).
_MEMBER_CHUNK = 1 << 16


def check_estimator(estimator) -> Estimator:
    """``estimator=`` as an :class:`Estimator`: one, or the name of one of :data:`ESTIMATORS`."""
    if isinstance(estimator, Estimator):
        return estimator
    if isinstance(estimator, str) and estimator in ESTIMATORS:
        return ESTIMATORS[estimator]
    raise ValueError(
        f"`estimator` must be one of {tuple(ESTIMATORS)} or a `cif_jax.Estimator`: 'hybrid' (default: clusters, "
        "low-rank deviations and self terms; every query), 'corrected' (the paper's eq. 11 plus the self terms) or "
        f"'paper' (eq. 11 alone); got {estimator!r}."
    )


class Alphas(eqx.Module):
    """What a loss query needs of its evaluation gradients, computed once per gradient.

    Attributes:
        clusters: (C,) or (Q, C) ``alpha_c(V) = g_V . v_c`` (paper eq. 11).
        coords: (r,) or (Q, r) ``(diag(s) + lambda)^{-1} U^T g_V``: the evaluation gradient in the
            cache's low-rank factors (width 0 for a cache without factors).
    """

    clusters: Float[Array, "... c"]
    coords: Float[Array, "... r"]


@jax.jit
def _counts(assignments, query_ids, indices, zeros):
    return zeros.at[query_ids, assignments[indices]].add(1)


def cluster_counts(cache: InfluenceCache, subsets) -> Int[Array, "q c"]:
    """``m_c(S)``, the number of members of each subset in each cluster: (Q, C) int32.

    Computed from the flat (query, index) pairs by one scatter-add, O(sum |S|).
    """
    subs = _checks.subsets(subsets, cache.num_examples)
    zeros = jnp.zeros((subs.sizes.size, cache.num_clusters), jnp.int32)
    return _counts(cache.assignments, jnp.asarray(subs.query_ids), jnp.asarray(subs.indices), zeros)


@jax.jit
def _recombine(counts, responses, n):
    return jnp.matmul(counts.astype(responses.dtype), responses, precision=HIGHEST) / n


def param_delta(cache: InfluenceCache, subsets) -> Float[Array, "q p"]:
    """CiF parameter change on removing each subset (paper eq. 10).

    $$
    \\hat\\Delta\\theta_S = \\frac{1}{N} \\sum_c m_c(S) v_c
    $$

    Returns:
        (Q, p) flat parameter changes; compare with :func:`cif_jax.estimators.influence`.
    """
    counts = cluster_counts(cache, subsets)
    n = jnp.asarray(cache.num_examples, cache.responses.dtype)
    return _recombine(counts, cache.responses, n)


def _eval_matrix(cache: InfluenceCache, eval_grads, num_queries: int | None):
    g = jnp.asarray(eval_grads)
    p = cache.num_params
    if g.ndim == 1:
        if g.shape[0] != p:
            raise ValueError(f"`eval_grads` must have shape (p,) = ({p},) or (Q, p); got {g.shape}.")
    elif g.ndim == 2:
        if g.shape[1] != p or (num_queries is not None and g.shape[0] != num_queries):
            want = f"({num_queries}, {p})" if num_queries is not None else f"(Q, {p})"
            raise ValueError(f"`eval_grads` must have shape (p,) or {want}; got {g.shape}.")
    else:
        raise ValueError(f"`eval_grads` must be 1-D (p,) or 2-D (Q, p); got shape {g.shape}.")
    _checks.finite_rows(g.reshape(-1, p), "eval_grads", what="row")
    return g.astype(cache.responses.dtype)


@jax.jit
def _alphas(responses, g):
    return jnp.matmul(g, responses.T, precision=HIGHEST)


@jax.jit
def _eval_coords(lowrank, damping, g):
    return lowrank.eval_coords(g, damping)


def _make_alphas(cache: InfluenceCache, g) -> Alphas:
    if cache.lowrank is None:
        coords = jnp.zeros((*g.shape[:-1], 0), g.dtype)
    else:
        coords = _eval_coords(cache.lowrank, jnp.asarray(cache.damping, g.dtype), g)
    return Alphas(clusters=_alphas(cache.responses, g), coords=coords)


def cluster_alphas(cache: InfluenceCache, eval_grads) -> Alphas:
    """What every loss query of these evaluation gradients needs, computed once: an :class:`Alphas`.

    ``alpha_c(V) = g_V . v_c`` (paper eq. 11) and the gradient's low-rank coordinates
    ``(diag(s) + lambda)^{-1} U^T g_V``: O(p (C + r)) per gradient.

    Args:
        eval_grads: (p,) one evaluation gradient, or (Q, p) one per query.

    Returns:
        An `Alphas` with leading shape () or (Q,).
    """
    return _make_alphas(cache, _eval_matrix(cache, eval_grads, None))


def _rank(cache: InfluenceCache) -> int:
    return 0 if cache.lowrank is None else cache.lowrank.rank


def _alpha_matrix(cache, alphas, num_queries, estimator: Estimator = PAPER) -> Alphas:
    """``alphas`` as an :class:`Alphas` with 1 (shared) or Q rows; a bare (C,) / (Q, C) array carries no coordinates."""
    c, r = cache.num_clusters, _rank(cache)
    if isinstance(alphas, Alphas):
        a, b = jnp.asarray(alphas.clusters), jnp.asarray(alphas.coords)
        if b.shape[-1:] != (r,) or b.shape[:-1] != a.shape[:-1]:
            raise ValueError(f"`alphas.coords` has shape {b.shape}; this cache has rank {r}, so it must be "
                             f"{(*a.shape[:-1], r)}. Compute the alphas with this cache (`cj.cluster_alphas`).")
    else:
        a = jnp.asarray(alphas)
        if estimator.deviations and r > 0:
            raise ValueError(
                "`alphas` is a bare array of cluster alphas, but the default estimator ('hybrid') also needs each "
                "evaluation gradient's low-rank coordinates. Pass what `cj.cluster_alphas(cache, eval_grads)` or "
                "`cj.fold_alphas(...)` returns (an `Alphas`), or `estimator='paper'` / 'corrected' for the "
                "clusters alone."
            )
        b = jnp.zeros((*a.shape[:-1], 0) if a.ndim else (0,), a.dtype)
    if a.ndim == 1 and a.shape[0] == c:
        return Alphas(a[None, :], b[None, :])  # shared by all queries; never broadcast to (Q, C)
    if a.ndim == 2 and a.shape == (num_queries, c):
        return Alphas(a, b)
    raise ValueError(f"`alphas` must have shape (C,) = ({c},) or (Q, C) = ({num_queries}, {c}); got {a.shape}.")


@functools.partial(jax.jit, static_argnums=3)
def _from_alphas(assignments, query_ids, indices, num_queries, alphas, n):
    # Per member: alpha_{c(i)} (shared) or alpha_{q, c(i)} (per query); summed per query.
    # Equals (1/N) sum_c m_c(S) alpha_c without forming the (Q, C) counts: O(sum |S|).
    clusters = assignments[indices]
    vals = alphas[0, clusters] if alphas.shape[0] == 1 else alphas[query_ids, clusters]
    return jax.ops.segment_sum(vals, query_ids, num_segments=num_queries) / n


def _terms(cache: InfluenceCache):
    if cache.correction is None:
        raise ValueError(
            "this cache holds no self-influence correction (built with `correction=None`, or read from a file of "
            "an older format), so it cannot score queries whose evaluation set overlaps the removed set. Rebuild "
            "it with `build_cache(..., correction='calibrated')`, or pass `estimator='paper'` for the paper's "
            "estimator (eq. 11), which omits the self terms."
        )
    return cache.correction


def _self_terms(cache: InfluenceCache, estimator: Estimator):
    """The per-example scalars a query adds over ``S cap V``: the remainder (hybrid) or the whole ``t_i``."""
    return estimator.self_values(_terms(cache))


def _eval_subsets(cache: InfluenceCache, eval_sets, num_queries: int):
    if eval_sets is None:
        return None
    ev = _checks.subsets(eval_sets, cache.num_examples, name="eval_sets")
    if ev.sizes.size not in (1, num_queries):
        raise ValueError(
            f"`eval_sets` must hold one evaluation set shared by all queries or one per query ({num_queries}); "
            f"got {ev.sizes.size}."
        )
    return ev


def overlap_correction(cache: InfluenceCache, subsets, eval_sets, *, estimator: str | Estimator = "hybrid") -> Float[Array, " q"]:
    """The self-influence correction ``(1/|V|) sum_{i in S cap V} t_i`` of each query, O(|S| + |V|).

    ``V`` is the query's evaluation set, given as training-example indices, and its
    evaluation gradient is taken to be the gradient of the mean loss over V (as in
    :func:`mean_subset_gradients`). :func:`loss_delta` adds it when given ``eval_sets``.

    Args:
        subsets: Q removed sets S.
        eval_sets: one evaluation set shared by all queries, or Q of them (same forms as
            ``subsets``: a list of index arrays, a (Q, m) integer array or a boolean mask).
        estimator: ``"hybrid"`` (default): the part of each self term the low-rank
            deviations miss (:attr:`cif_jax.CorrectionTerms.remainder`); ``"corrected"``: the
            whole self term ``t_i`` (:attr:`cif_jax.CorrectionTerms.values`), which is what
            eq. (11) misses.

    Returns:
        (Q,) corrections, 0 for a query whose S and V do not overlap.
    """
    estimator = check_estimator(estimator)
    if not estimator.self_terms:
        raise ValueError(f"`estimator={estimator.name!r}` adds no self terms; use 'hybrid' or 'corrected'.")
    subs = _checks.subsets(subsets, cache.num_examples)
    q = int(subs.sizes.size)
    return _overlap(cache, subs, _eval_subsets(cache, eval_sets, q), estimator)


def _overlap(cache: InfluenceCache, subs, ev, estimator: Estimator) -> Float[Array, " q"]:
    """Sum of the self terms over ``S cap V`` divided by ``|V|``; ``ev`` None means V = S."""
    t = _self_terms(cache, estimator)
    q = int(subs.sizes.size)
    in_v = in_eval_sets(subs, ev)
    ids, idx = subs.query_ids[in_v], subs.indices[in_v]
    size_v = subs.sizes if ev is None else np.broadcast_to(ev.sizes, (q,))
    sums = jax.ops.segment_sum(t[jnp.asarray(idx)], jnp.asarray(ids), num_segments=q)
    return sums / jnp.asarray(size_v, t.dtype)


def in_eval_sets(subs, ev) -> np.ndarray:
    """For each (query, member) pair of ``subs``: is the member in that query's evaluation set?

    O((|S| + |V|) log) over all queries: a shared set is matched by index alone; per-query sets
    by (query, index) keys. ``ev`` None means V = S.
    """
    if ev is None:
        return np.ones(subs.indices.size, bool)
    if ev.sizes.size == 1:
        return np.isin(subs.indices, ev.indices, assume_unique=False)
    n = subs.num_examples
    keys_s = subs.query_ids.astype(np.int64) * n + subs.indices
    keys_v = ev.query_ids.astype(np.int64) * n + ev.indices
    return np.isin(keys_s, keys_v, assume_unique=True)


def loss_delta_from_alphas(cache: InfluenceCache, subsets, alphas, *, eval_sets=None,
                           estimator: str | Estimator = "hybrid") -> Float[Array, " q"]:
    """The loss change of each query from precomputed :class:`Alphas`, O(|S| r + C) (O(|S|) for shared alphas).

    Args:
        subsets: Q subsets.
        alphas: an :class:`Alphas` with leading shape () (shared by all queries) or (Q,)
            (e.g. the K folds of :func:`fold_alphas`), as :func:`cluster_alphas` returns;
            or, for ``estimator="paper"`` / ``"corrected"`` or a cache without factors, a
            bare (C,) or (Q, C) array of ``alpha_c``.
        eval_sets: the training examples each evaluation gradient averages over (see
            :func:`overlap_correction`), to add the self terms over ``S cap V``. None: no
            overlap is known, nothing is added.
        estimator: ``"hybrid"`` (default), ``"corrected"`` or ``"paper"`` (eq. 11); see
            :mod:`cif_jax.cif.queries`.
    """
    estimator = check_estimator(estimator)
    subs = _checks.subsets(subsets, cache.num_examples)
    q = int(subs.sizes.size)
    a = _alpha_matrix(cache, alphas, q, estimator)
    ev = _eval_subsets(cache, eval_sets, q)
    if estimator.self_terms and ev is not None:
        _terms(cache)  # refuse before any work
    return _scores(cache, subs, a, ev, estimator)


@functools.partial(jax.jit, static_argnums=3)
def _dev_sums_chunk(dev_coords, query_ids, indices, num_queries):
    return jax.ops.segment_sum(dev_coords[indices], query_ids, num_segments=num_queries)


def deviation_sums(cache: InfluenceCache, subs) -> Float[Array, "q r"]:
    """``U^T sum_{i in S} (g_i - mu_c(i))`` per query, (Q, r): O(|S| r), in chunks of members."""
    q = int(subs.sizes.size)
    low = cache.lowrank
    dev = low.deviation_coords(cache.assignments)
    out = jnp.zeros((q, low.rank), dev.dtype)
    ids, idx = np.asarray(subs.query_ids), np.asarray(subs.indices)
    for start in range(0, idx.size, _MEMBER_CHUNK):
        i, j = ids[start:start + _MEMBER_CHUNK], idx[start:start + _MEMBER_CHUNK]
        if i.size < _MEMBER_CHUNK and idx.size > _MEMBER_CHUNK:  # one compiled shape: pad, dropped below
            i = np.concatenate([i, np.full(_MEMBER_CHUNK - i.size, q)])
            j = np.concatenate([j, np.zeros(_MEMBER_CHUNK - j.size, j.dtype)])
        out = out + _dev_sums_chunk(dev, jnp.asarray(i), jnp.asarray(j), q)
    return out


@jax.jit
def _shared_example_scores(assignments, dev_coords, clusters, coords, n):
    return (clusters[assignments] + jnp.matmul(dev_coords, coords, precision=HIGHEST)) / n


def _scores(cache: InfluenceCache, subs, alphas: Alphas, ev, estimator: Estimator) -> Float[Array, " q"]:
    """The loss change from (1 or Q)-row alphas, plus the self terms over ``S cap V`` when ``ev`` is given."""
    q = int(subs.sizes.size)
    n = jnp.asarray(cache.num_examples, alphas.clusters.dtype)
    ids, idx = jnp.asarray(subs.query_ids), jnp.asarray(subs.indices)
    low = estimator.uses_deviations(cache)
    if low and alphas.clusters.shape[0] == 1:
        # One evaluation gradient: its per-example scores once (O(N r)), then O(|S|) per query.
        per = _shared_example_scores(cache.assignments, cache.lowrank.deviation_coords(cache.assignments),
                                     alphas.clusters[0], alphas.coords[0], n)
        out = jax.ops.segment_sum(per[idx], ids, num_segments=q)
    else:
        out = _from_alphas(cache.assignments, ids, idx, q, alphas.clusters, n)
        if low:
            out = out + jnp.sum(deviation_sums(cache, subs) * alphas.coords, axis=1) / n
    if estimator.self_terms and ev is not None:
        out = out + _overlap(cache, subs, ev, estimator).astype(out.dtype)
    return out


def loss_delta(cache: InfluenceCache, subsets, eval_grads, *, eval_sets=None,
               estimator: str | Estimator = "hybrid") -> Float[Array, " q"]:
    """CiF first-order change of the evaluation loss on removing each subset.

    $$
    \\Delta\\hat\\ell(S; V) = \\frac{1}{N} \\sum_c m_c(S)\\, \\alpha_c(V)
    + \\frac{1}{N} (U^\\top g_V)^\\top (\\mathrm{diag}(s) + \\lambda I)^{-1} \\sum_{i \\in S} U^\\top d_i
    + \\frac{1}{|V|} \\sum_{i \\in S \\cap V} r_i
    $$

    (the default ``estimator="hybrid"``: eq. (11), the deviations ``d_i = g_i - mu_c(i)``
    through the cache's low-rank factors, and the self-term remainders ``r_i``).
    Positive: removing S raises the loss on V (S was helpful to V). When the
    evaluation set holds training examples and you say which (``eval_sets``), the
    self terms over ``S cap V`` are added (:mod:`cif_jax.cif.correction`); a bare
    evaluation gradient means no overlap is known, and nothing is added.

    Args:
        subsets: Q subsets.
        eval_grads: (p,) gradient of the evaluation loss shared by all queries, or
            (Q, p) one per query.
        eval_sets: the training examples whose mean loss each ``eval_grads`` row is the
            gradient of: one set shared by all queries or one per query (None: unknown).
        estimator: ``"hybrid"`` (default), ``"corrected"`` (eq. 11 plus the whole self
            terms) or ``"paper"`` (eq. 11 alone); see :mod:`cif_jax.cif.queries`.

    Returns:
        (Q,) loss changes.
    """
    estimator = check_estimator(estimator)
    subs = _checks.subsets(subsets, cache.num_examples)
    q = int(subs.sizes.size)
    g = _eval_matrix(cache, eval_grads, q)
    ev = _eval_subsets(cache, eval_sets, q)
    if ev is not None and g.ndim == 1 and ev.sizes.size > 1:
        raise ValueError(
            f"one evaluation gradient (shape ({cache.num_params},)) was given with {ev.sizes.size} evaluation sets: "
            "give one gradient per query, (Q, p), or one evaluation set shared by all queries."
        )
    if estimator.self_terms and ev is not None:
        _terms(cache)  # refuse before any work
    return _scores(cache, subs, _alpha_matrix(cache, _make_alphas(cache, g), q, estimator), ev, estimator)


def example_scores(cache: InfluenceCache, eval_grads, *, estimator: str | Estimator = "hybrid") -> Float[Array, "... n"]:
    """Per-example scores ``(1/N) g_V^T H~^{-1} g_i`` for every training example, from the cache (no solve).

    Row q, column i is the loss change on evaluation gradient q when example i alone is
    removed, as kronfluence's pairwise scores and TRAK's scores are used: a subset's
    score is the sum of its members' (for an evaluation set that holds no removed
    example), so LDS, "which training examples help this test point" and triage come
    from these rows. The self terms are not included: for a training example scored on
    itself use :func:`self_influence`.

    Args:
        eval_grads: (p,) or (Q, p) evaluation gradients, or an :class:`Alphas` computed from them.
        estimator: ``"hybrid"`` (default: the cluster response plus the low-rank deviation)
            or ``"paper"`` (the cluster response alone, the same for every member of a cluster).

    Returns:
        (N,) or (Q, N). Cost O(p (C + r)) per gradient and O(N r) per row.
    """
    estimator = check_estimator(estimator)
    if estimator.self_terms and not estimator.deviations:
        raise ValueError(f"`estimator={estimator.name!r}` differs from 'paper' only in self terms, which per-example scores "
                         "of evaluation gradients do not include; use 'hybrid' or 'paper'.")
    if isinstance(eval_grads, Alphas):
        alphas = eval_grads
        _alpha_matrix(cache, alphas, None if alphas.clusters.ndim == 1 else alphas.clusters.shape[0])
    else:
        alphas = _make_alphas(cache, _eval_matrix(cache, eval_grads, None))
    single = alphas.clusters.ndim == 1
    a, b = jnp.atleast_2d(alphas.clusters), jnp.atleast_2d(alphas.coords)
    n = jnp.asarray(cache.num_examples, a.dtype)
    out = a[:, cache.assignments] / n
    if estimator.uses_deviations(cache):
        dev = cache.lowrank.deviation_coords(cache.assignments)
        out = out + jnp.matmul(b, dev.T, precision=HIGHEST) / n
    return out[0] if single else out


def _check_task(cache: InfluenceCache, task: Task) -> None:
    from ..core.task import fingerprint

    if task.num_examples != cache.num_examples or task.num_params != cache.num_params:
        raise ValueError(
            f"this cache was built for N = {cache.num_examples}, p = {cache.num_params}; the task has N = "
            f"{task.num_examples}, p = {task.num_params}. Build a cache for this task."
        )
    if fingerprint(task) != cache.fingerprint:
        raise ValueError(
            "this cache was built from other parameters or data than this task (fingerprint mismatch). "
            "Rebuild the cache for this model snapshot, or pass the task it was built from."
        )


def mean_subset_gradients(task: Task, subsets, *, batch_size: int | None = None) -> Float[Array, "q p"]:
    """The gradient of the mean loss over each subset, ``(1/|S|) sum_{i in S} g_i``, streamed."""
    _checks.task(task)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    subs = _checks.subsets(subsets, task.num_examples)
    sums, bad = gradient_sums_pass(task, jnp.asarray(subs.mask.T), batch_size)
    raise_on_bad(bad)
    return sums / jnp.asarray(subs.sizes, sums.dtype)[:, None]


def fold_alphas(cache: InfluenceCache, task: Task, folds, *, batch_size: int | None = None) -> Alphas:
    """The :class:`Alphas` of each fold's mean-loss gradient, for leave-fold-out workloads (section 3.3).

    ``g_{S_k}`` is the gradient of the mean loss over fold k (the held-out fold is the
    evaluation set V = S_k); ``clusters`` is the K x C matrix ``alpha_c(S_k) = g_{S_k} . v_c``
    and ``coords`` its (K, r) low-rank coordinates. One streamed gradient pass serves all
    K folds; each fold query then costs O(|S_k| (r + 1) + C) in :func:`loss_delta_from_alphas`.
    """
    _check_task(cache, task)
    return _fold_alphas(cache, task, folds, batch_size)


def _fold_alphas(cache: InfluenceCache, task: Task, folds, batch_size) -> Alphas:
    """:func:`fold_alphas` for a task already checked against the cache (one fingerprint per query)."""
    g = mean_subset_gradients(task, folds, batch_size=batch_size)
    return _make_alphas(cache, g.astype(cache.responses.dtype))


def fold_loss_delta(cache: InfluenceCache, task: Task, folds, *, batch_size: int | None = None,
                    estimator: str | Estimator = "hybrid") -> Float[Array, " k"]:
    """CiF change of each fold's mean loss when that fold is removed from training: ``Delta l(S_k; S_k)``.

    The evaluation set is the removed fold itself (V = S), so the members' self terms
    ``g_i^T H~^{-1} g_i``, which eq. (11) loses, are added back: by default
    (``estimator="hybrid"``) through the low-rank deviations and the remainders,
    with ``"corrected"`` as whole self terms; ``"paper"`` gives eq. (11).

    Args:
        task: the task the cache was built from.
        folds: K folds (a list of index arrays, a (K, m) integer array or a (K, N) boolean mask).
        batch_size: examples per chunk of the gradient pass.
        estimator: ``"hybrid"``, ``"corrected"`` or ``"paper"`` (see :mod:`cif_jax.cif.queries`).

    Returns:
        (K,) loss changes.
    """
    estimator = check_estimator(estimator)
    _check_task(cache, task)
    if estimator.self_terms:
        _terms(cache)  # refuse before the gradient pass
    subs = _checks.subsets(folds, cache.num_examples)
    alphas = _fold_alphas(cache, task, folds, batch_size)
    out = _scores(cache, subs, alphas, None, estimator)
    if estimator.self_terms:
        out = out + _overlap(cache, subs, None, estimator).astype(out.dtype)
    return out


def fold_matrix(cache: InfluenceCache, task: Task, folds, *, batch_size: int | None = None,
                estimator: str | Estimator = "hybrid") -> Float[Array, "k k"]:
    """``M[t, v]``: the change of fold v's mean loss when fold t is removed, for every pair.

    The off-diagonal entries are the cross-fold protocol of the paper's section 5.4
    (evaluate on fold v after removing fold t != v): the evaluation set does not
    overlap the removed set, so no self term applies. The default estimator answers
    them with the clusters and the low-rank deviations; ``"paper"`` and ``"corrected"``
    with the clusters alone. The diagonal is :func:`fold_loss_delta`. Cost: one
    gradient pass for the fold :class:`Alphas`, then a K x (C + r) by (C + r) x K product.
    Folds must not overlap.

    Args:
        task: the task the cache was built from.
        folds: K disjoint folds.
        batch_size: examples per chunk of the gradient pass.
        estimator: ``"hybrid"``, ``"corrected"`` or ``"paper"`` (see :mod:`cif_jax.cif.queries`).
    """
    estimator = check_estimator(estimator)
    subs = _checks.subsets(folds, cache.num_examples)
    if np.unique(subs.indices).size != subs.indices.size:
        raise ValueError("`folds` overlap: the fold matrix needs disjoint folds (a partition or part of one).")
    _check_task(cache, task)
    if estimator.self_terms:
        _terms(cache)
    alphas = _fold_alphas(cache, task, folds, batch_size)
    counts = cluster_counts(cache, folds).astype(alphas.clusters.dtype)
    n = jnp.asarray(cache.num_examples, counts.dtype)
    out = jnp.matmul(counts, alphas.clusters.T, precision=HIGHEST) / n
    if estimator.uses_deviations(cache):
        out = out + jnp.matmul(deviation_sums(cache, subs), alphas.coords.T, precision=HIGHEST) / n
    if estimator.self_terms:
        out = out + jnp.diag(_overlap(cache, subs, None, estimator).astype(out.dtype))
    return out


@eqx.filter_jit
def _cluster_dots(task, assignments, responses, batch_size):
    return streamed_map(task, lambda g, a: jnp.sum(g * responses[a], axis=1), assignments, batch_size)


def self_influence(cache: InfluenceCache, task: Task, indices=None, *, estimator: str | Estimator = "hybrid",
                   batch_size: int | None = None) -> Float[Array, " m"]:
    """CiF self-influence ``(1/N) g_i^T H~^{-1} g_i`` of training examples: the score of S = V = {i}.

    Positive: removing example i raises its own loss. Large values flag examples the
    model fits only by memorising them (mislabels, outliers). The default estimate is
    ``(g_i . v_c(i) + (U^T g_i)^T (diag(s) + lambda)^{-1} U^T d_i) / N + r_i``;
    ``"corrected"`` gives ``g_i . v_c(i) / N + t_i`` and ``"paper"`` the paper's
    ``g_i . v_c(i) / N`` (:mod:`cif_jax.cif.correction`). One streamed gradient pass over
    the requested examples.

    Args:
        task: the task the cache was built from.
        indices: example indices (None: all N).
        estimator: ``"hybrid"``, ``"corrected"`` or ``"paper"`` (see :mod:`cif_jax.cif.queries`).
        batch_size: examples per chunk of the gradient pass.
    """
    estimator = check_estimator(estimator)
    _check_task(cache, task)
    if estimator.self_terms:
        _terms(cache)
    batch_size = _checks.positive_int(batch_size, "batch_size", allow_none=True)
    n = cache.num_examples
    if indices is None:
        idx = np.arange(n)
    else:
        idx = np.asarray(indices)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or idx.size == 0:
            raise ValueError(f"`indices` must be a non-empty 1-D integer array; got shape {idx.shape}, dtype "
                             f"{idx.dtype}.")
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"`indices` out of range [0, {n}): {idx[(idx < 0) | (idx >= n)][:10].tolist()}.")
    sub = task if indices is None else take_examples(task, idx)
    dots, bad = _cluster_dots(sub, cache.assignments[jnp.asarray(idx)], cache.responses, batch_size)
    raise_on_bad(bad)
    out = dots / jnp.asarray(n, dots.dtype)
    if not estimator.self_terms:
        return out
    jdx = jnp.asarray(idx)
    if estimator.uses_deviations(cache):
        low = cache.lowrank
        dev = low.coords[jdx] - low.mean_coords[cache.assignments[jdx]]
        w = low.weights(cache.damping)
        out = out + jnp.sum(low.coords[jdx] * dev * w[None, :], axis=1).astype(out.dtype) / n
    return out + _self_terms(cache, estimator)[jdx].astype(out.dtype)
