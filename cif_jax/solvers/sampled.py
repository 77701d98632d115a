"""Low-rank factors of the GGN from sampled pseudo-gradients: a few data passes instead of r products.

The GGN is an expectation over outputs drawn from the loss's curvature. With
``W_i = L_i L_i^T`` (the loss Hessian in the outputs of example i, factored
here by an unpivoted Cholesky that zeroes a vanishing pivot) and ``z ~ N(0, I)``,
the pseudo-gradient ``h_i = J_i^T L_i z`` has ``E[h_i h_i^T] = J_i^T W_i J_i``,
so ``F = (1/N) sum_i h_i h_i^T`` is an unbiased estimate of the GGN (for the
softmax cross-entropy this is the Fisher with labels drawn from the model, as
kronfluence draws them). Each ``h_i`` is one vector-Jacobian product, like a
per-example gradient; ``F Q`` for a block Q of r vectors is then two matrix
products per chunk of examples, ``H^T (H Q)``, instead of r GGN products.

:func:`sampled_preconditioner` builds a rank-r factorisation in
``3 + power_iters`` passes over the data (``2 + power_iters`` with ``samples="exact"``):

1. the range: ``X = H^T Omega`` (Omega an N x r Gaussian matrix), ``Q = qr(X)``;
2. ``Y = F Q`` (one pass each, ``power_iters`` more times with ``Q = qr(Y)``),
   and the stable Nystrom factorisation of ``(Q, Y)`` (as
   :func:`cif_jax.nystrom_preconditioner`): a basis ``U``;
3. with drawn pseudo-gradients, the eigenvalues measured again in that basis from
   fresh draws, ``s_k = (1/N) sum_i (u_k . h'_i)^2``: unbiased for ``u_k^T GGN u_k``,
   without the upward bias of the values the basis was chosen to maximise (EK-FAC's
   correction, Grosse et al. 2023, in a learnt basis instead of a Kronecker one).

With ``samples="exact"`` the pseudo-gradients are the q columns ``J_i^T L_i e_a``
of every example, whose outer products sum to the GGN exactly: step 2's ``Y`` is
then the exact ``GGN Q`` and the Nystrom eigenvalues are those of the product
build, so step 3 is skipped (``2 + power_iters`` passes). The range pass makes the
basis better than a product build's at the same rank: its test matrix is already
``A^T Omega`` with ``GGN = A^T A / N``, half a subspace iteration.

The result is a :class:`cif_jax.NystromPreconditioner` of the operator: pass it to
:class:`cif_jax.CG`, and a cache built with that solver takes its factors for the
correction and the per-example coordinates.
"""

from __future__ import annotations

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ..core import checks as _checks
from ..core.checks import as_key
from ..core.chunks import DEFAULT_MEMORY_BUDGET, chunk_sum
from ..core.curvature import weighted_examples
from ..core.ggn import as_batch_of_one
from .operator import DampedGGN, check_operator
from .precondition import NystromPreconditioner, _nystrom_factor

HIGHEST = jax.lax.Precision.HIGHEST
#: ``factors="auto"`` of a cache's correction takes GGN products without a probe for models with more
#: outputs per example than this: each column pass costs q vector-Jacobian products per example and
#: holds q length-p columns per example of a chunk.
MAX_COLUMN_OUTPUTS = 64
#: Examples in the column passes' timed chunk (:func:`factor_build_costs`), at most a pass's own chunk.
#: The products are timed on four times as many, in the operator's own chunks: a GGN product's time
#: is far from linear in a small chunk (on digits LeNet-5, 32 examples predicted half of what a
#: product over all 1,438 took).
PROBE_EXAMPLES = 32
#: ``factors="auto"`` takes the columns unless their predicted time exceeds the products' by more than
#: this factor: at the same rank their factors are better (spectral error 8-20x smaller on digits and
#: MNIST-5k LeNet-5), which also shortens the cache's CG solves (digits LeNet-5: 1.5 s against 2.3 s),
#: and a near tie should not flip with timing noise between two builds of one model.
COLUMN_PREFERENCE = 1.25
#: ``factors="auto"`` takes products with no probe when ``r * m * p`` (rank, curvature examples,
#: parameters) is below this: such a product build is a few seconds at most, and compiling the probe
#: would cost about as much (the test suite's small models build hundreds of caches).
TRIVIAL_PRODUCT_WORK = 1e9
#: Each probe chunk is timed until its runs add up to this many seconds (at least three runs; the median
#: is kept): one product chunk on digits LeNet-5 takes about 25 ms, and single runs of it predicted
#: the product build anywhere from 14 to 29 s.
PROBE_MIN_SECONDS = 0.25
#: ``factors="auto"`` takes products without timing the columns when the products are predicted to
#: take less than this many seconds: compiling the column probe alone costs seconds (2-7 s on the
#: digits models), more than it could save.
PRODUCTS_FLOOR_SECONDS = 10.0
#: With ``batch_size=None`` a pass's chunk holds at most this many bytes of pseudo-gradients (counted
#: three times: the columns, their weighted copy and the vector-Jacobian products' intermediates).
#: The (p, r) blocks every chunk adds to are not counted: they exist whatever the chunk.
CHUNK_BUDGET = DEFAULT_MEMORY_BUDGET


def pass_batch_size(operator: DampedGGN, samples) -> int:
    """Examples per chunk of a pass: the operator's ``batch_size``, or for None the largest power of
    two whose ``3 * B * S`` pseudo-gradients of length p fit :data:`CHUNK_BUDGET` (S = samples, or q
    for ``"exact"``), at most the curvature's size."""
    m = operator.curvature_size
    if operator.batch_size is not None:
        return min(operator.batch_size, m)
    per = samples if samples != "exact" else num_outputs(operator.task)
    fits = max(CHUNK_BUDGET // (3 * per * operator.num_params * jnp.dtype(operator.dtype).itemsize), 1)
    return int(min(2 ** int(np.log2(fits)), m))


def psd_factor(w):
    """``L`` (lower triangular) with ``L L^T = W`` for a symmetric PSD ``W`` (q x q), traceable.

    Unpivoted Cholesky; a pivot at or below ``q eps tr(W)`` (a singular direction,
    e.g. the softmax's all-ones null vector) gets a zero column.
    """
    q = w.shape[0]
    tiny = q * jnp.finfo(w.dtype).eps * jnp.maximum(jnp.trace(w), jnp.finfo(w.dtype).tiny)
    rows = jnp.arange(q)

    def body(j, low):
        d = w[j, j] - jnp.sum(low[j] ** 2)
        ok = d > tiny
        dj = jnp.sqrt(jnp.where(ok, d, 1))
        col = (w[:, j] - low @ low[j]) / dj
        col = jnp.where(rows > j, col, 0).at[j].set(dj)
        return low.at[:, j].set(jnp.where(ok, col, 0))

    return jax.lax.fori_loop(0, q, body, jnp.zeros_like(w))


def _pseudo_grads_fn(task, samples):
    """``h(flat, x, y, key) -> (S, p)``: one example's pseudo-gradients ``J^T L z``, ``z ~ N(0, I)`` (S = samples
    draws), or, with ``samples="exact"``, the q columns ``J^T L e_a`` (S = q: their outer products sum to
    ``J^T W J`` exactly)."""
    _, unravel = ravel_pytree(task.params)
    one = as_batch_of_one

    def example(flat, x, y, key):
        out, vjp = jax.vjp(lambda fp: task.apply_fn(unravel(fp), one(x))[0], flat)
        o = out.reshape(-1)
        w = jax.hessian(lambda v: task.loss_fn(v.reshape(out.shape)[None], one(y))[0])(o)
        low = psd_factor((w + w.T) / 2)
        if samples == "exact":
            z = jnp.eye(o.size, dtype=o.dtype)
        else:
            z = jax.random.normal(key, (samples, o.size), o.dtype) / np.sqrt(samples)
        return jax.vmap(lambda c: vjp((c @ low.T).reshape(out.shape))[0])(z)

    return example


def _data(operator: DampedGGN):
    """``(inputs, targets, indices, sqrt-weights, total weight)`` of the examples that define the GGN."""
    task, sample = operator.task, operator.curvature
    x, y, w = weighted_examples(task, sample, task.dtype)
    idx = jnp.arange(task.num_examples) if sample is None else sample.indices
    return x, y, idx, jnp.sqrt(w), float(jnp.sum(w))


def _chunks(task, data, key, samples: int, batch_size: int, reduce):
    """``sum over chunks of reduce(H, indices)``, ``H`` the chunk's weighted pseudo-gradients (B * samples, p)."""
    flat, _ = ravel_pytree(task.params)
    per_example = jax.vmap(_pseudo_grads_fn(task, samples), in_axes=(None, 0, 0, 0))

    def chunk(c):
        cx, cy, ci, csw = c
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ci)
        h = per_example(flat, cx, cy, keys) * csw[:, None, None].astype(flat.dtype)  # (B, S, p)
        return reduce(h.reshape(-1, h.shape[-1]), ci)

    return chunk_sum(chunk, data, batch_size)


@eqx.filter_jit
def _range_pass(task, data, key, omega_key, rank: int, samples, batch_size: int):
    """``H^T Omega`` (p, r): Omega's rows drawn per example (and pseudo-gradient) from ``omega_key``."""
    def reduce(h, idx):
        per = h.shape[0] // idx.shape[0]
        omega = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(omega_key, i), (per, rank), h.dtype))(idx)
        return jnp.matmul(h.T, omega.reshape(-1, rank), precision=HIGHEST)

    return _chunks(task, data, key, samples, batch_size, reduce)


@eqx.filter_jit
def _apply_pass(task, data, key, q, samples, batch_size: int):
    """``H^T (H Q)`` (p, r) for an orthonormal block ``Q`` (p, r)."""
    return _chunks(task, data, key, samples, batch_size,
                   lambda h, _: jnp.matmul(h.T, jnp.matmul(h, q, precision=HIGHEST), precision=HIGHEST))


@eqx.filter_jit
def _diag_pass(task, data, key, basis, samples, batch_size: int):
    """``sum_i (u_k . h_i)^2`` (r,) for the rows ``u_k`` of ``basis`` (r, p)."""
    return _chunks(task, data, key, samples, batch_size,
                   lambda h, _: jnp.sum(jnp.matmul(h, basis.T, precision=HIGHEST) ** 2, axis=0))


@jax.jit
def _orthonormal(x):
    return jnp.linalg.qr(x)[0]


def sampled_preconditioner(
    operator: DampedGGN,
    *,
    key,
    rank: int,
    power_iters: int = 1,
    samples: int | str = 1,
    progress: bool = False,
) -> NystromPreconditioner:
    """Rank-r factors ``U diag(s) U^T`` of the undamped GGN from sampled pseudo-gradients (see the module docstring).

    Args:
        operator: a :class:`cif_jax.DampedGGN` (its task, curvature sample and chunks;
            each chunk holds ``batch_size * samples`` pseudo-gradients of length p, and
            ``batch_size=None`` sizes the chunks for them: :func:`pass_batch_size`).
        key: PRNG key of the draws (the range's Gaussian matrix and, for drawn
            pseudo-gradients, two independent sets of them: one for the basis, one for
            the eigenvalues).
        rank: r, at most p.
        power_iters: extra passes ``Q <- qr(F Q)`` before the factorisation (0: the
            range pass alone feeds it).
        samples: pseudo-gradients drawn per example and pass (their mean of outer
            products estimates each example's ``J^T W J``), or ``"exact"``: the q
            columns ``J^T L e_a`` of each example (q = its number of outputs), whose
            outer products sum to ``J^T W J`` exactly, so the factors have no sampling
            noise, at q vector-Jacobian products per example and pass.
        progress: print one line per pass.

    Returns:
        A `cif_jax.NystromPreconditioner` whose ``num_products`` counts the
        passes (``3 + power_iters``; ``2 + power_iters`` for ``"exact"``), each
        about one per-example gradient pass plus two (N, p) x (p, r) matrix
        products, with ``error_estimate`` NaN (a cache estimates it).
    """
    operator = check_operator(operator)
    p = operator.num_params
    rank = _checks.positive_int(rank, "rank")
    if rank > p:
        raise ValueError(f"`rank` = {rank} exceeds the number of parameters p = {p}.")
    if isinstance(power_iters, bool) or not isinstance(power_iters, (int, np.integer)) or power_iters < 0:
        raise ValueError(f"`power_iters` must be an integer >= 0, got {power_iters!r}.")
    if samples != "exact":
        samples = _checks.positive_int(samples, "samples")
    key = as_key(key)
    task = operator.task
    x, y, idx, sw, total = _data(operator)
    data = (x, y, idx, sw)
    basis_key, omega_key, value_key = jax.random.split(key, 3)
    batch = pass_batch_size(operator, samples)
    start = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    q = _orthonormal(_range_pass(task, data, basis_key, omega_key, rank, samples, batch))
    say(f"sampled factors: range pass, {time.perf_counter() - start:.1f} s", flush=True)
    for it in range(power_iters + 1):
        y_block = _apply_pass(task, data, basis_key, q, samples, batch) / total
        if it < power_iters:
            q = _orthonormal(y_block)
        say(f"sampled factors: pass {it + 2}, {time.perf_counter() - start:.1f} s", flush=True)
    ut, values, ok = _nystrom_factor(q.T, y_block.T)
    if not bool(ok):
        raise FloatingPointError("the sampled factorisation failed (Cholesky of Q^T F Q not positive definite); "
                                 "check that the loss is convex in the outputs.")
    passes = power_iters + 2
    if samples != "exact":  # drawn: the eigenvalues again from fresh draws (unbiased in the chosen basis)
        values = _diag_pass(task, data, value_key, ut, samples, batch) / total
        passes += 1
        say(f"sampled factors: eigenvalue pass, {time.perf_counter() - start:.1f} s", flush=True)
    order = jnp.argsort(-values)
    return NystromPreconditioner(
        basis=ut[order], eigenvalues=jnp.maximum(values[order], 0), error_estimate=jnp.asarray(jnp.nan, ut.dtype),
        fingerprint=operator.fingerprint, curvature=operator.describe_curvature(), num_products=passes,
        seconds=time.perf_counter() - start,
        note=f"sampled: rank {rank}, {passes} passes, "
             + ("the exact output-Hessian factor" if samples == "exact" else f"{samples} draw(s) per example"))


def num_outputs(task) -> int:
    """q, the model's outputs per example (from its shapes; nothing is computed)."""
    one = jax.tree_util.tree_map(lambda a: a[:1], task.inputs)
    out = jax.eval_shape(task.apply_fn, task.params, one)
    return int(np.prod(out.shape[1:]))


def factor_build_costs(operator: DampedGGN, *, rank: int, block: int, floor: float = 0.0) -> dict:
    """Predicted seconds of rank-r factors built from GGN products and from the exact columns, from timed chunks.

    Three chunk programs run on examples of the curvature: ``block`` GGN-vector products on
    ``4 b`` of them (chunked as the operator chunks its products), and the column build's two
    passes at rank r (the range pass and the product pass) on ``b`` (``b`` =
    :data:`PROBE_EXAMPLES`, or a column pass's own chunk if smaller; both at most m). Each is
    run once (compiling it), then timed until its runs add up to :data:`PROBE_MIN_SECONDS` (at
    least three times), keeping the median. The predictions scale the chunks to the
    curvature's m examples: ``r / block * m / (4 b) * t_products`` and
    ``m / b * (t_range + t_pass)``. Both are priced at
    rank r: with ``rank="auto"`` the product build may stop at a lower doubling, the column
    build is always made at the cap. Neither counts the factorisations (the same (r, p)
    algebra for both, done once more per doubling by the product build).

    The products are timed first; when they are predicted under ``floor`` seconds the columns
    are not timed (``"columns": None``).

    Returns:
        ``{"products": s, "columns": s or None, "probe_seconds": s}``.
    """
    from ..core.ggn import apply_undamped
    from ..core.task import take_examples

    operator = check_operator(operator)
    task, p = operator.task, operator.num_params
    start = time.perf_counter()
    x, y, idx, sw, _ = _data(operator)
    m = int(idx.shape[0])
    b = min(PROBE_EXAMPLES, pass_batch_size(operator, "exact"))
    b_products = min(4 * b, m)
    sub = take_examples(task, idx[:b_products])
    vectors = jax.random.normal(jax.random.key(0), (block, p), task.dtype)
    basis = jax.random.normal(jax.random.key(1), (p, rank), task.dtype)
    key, omega_key = jax.random.key(2), jax.random.key(3)
    cut = lambda tree: jax.tree_util.tree_map(lambda a: a[:b], tree)
    data = (cut(x), cut(y), idx[:b], sw[:b])

    def clock(fn):
        jax.block_until_ready(fn())  # compile and warm
        times = []
        while len(times) < 3 or (sum(times) < PROBE_MIN_SECONDS and len(times) < 64):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    # the operator's own chunking (its batch_size, or the budget) over the probe's examples
    t_products = clock(lambda: apply_undamped(sub, operator.batch_size, vectors, None))
    products = rank / block * m / b_products * t_products
    if products < floor:
        return {"products": products, "columns": None, "probe_seconds": time.perf_counter() - start}
    t_range = clock(lambda: _range_pass(task, data, key, omega_key, rank, "exact", b))
    t_pass = clock(lambda: _apply_pass(task, data, key, basis, "exact", b))
    return {"products": products, "columns": m / b * (t_range + t_pass),
            "probe_seconds": time.perf_counter() - start}


def choose_factor_build(operator: DampedGGN, *, rank: int, block: int) -> tuple[str, str]:
    """``("products" | "columns", note)``: the faster build of rank-r factors (``factors="auto"``).

    Products without a probe when ``r m p`` is under :data:`TRIVIAL_PRODUCT_WORK` or the model
    has more than :data:`MAX_COLUMN_OUTPUTS` outputs per example, and without timing the
    columns when the products are predicted under :data:`PRODUCTS_FLOOR_SECONDS`; otherwise the
    columns unless :func:`factor_build_costs` predicts them more than
    :data:`COLUMN_PREFERENCE` times slower than the products.
    """
    work = rank * operator.curvature_size * operator.num_params
    if work < TRIVIAL_PRODUCT_WORK:
        return "products", f"GGN products (r m p = {work:.3g}, under {TRIVIAL_PRODUCT_WORK:.0e}: no probe)"
    q = num_outputs(operator.task)
    if q > MAX_COLUMN_OUTPUTS:
        return "products", f"GGN products ({q} outputs per example: more than {MAX_COLUMN_OUTPUTS} for columns)"
    costs = factor_build_costs(operator, rank=rank, block=block, floor=PRODUCTS_FLOOR_SECONDS)
    if costs["columns"] is None:
        return "products", (f"GGN products (predicted {costs['products']:.3g} s at rank {rank}, under "
                            f"{PRODUCTS_FLOOR_SECONDS:g} s: the columns not timed; probe "
                            f"{costs['probe_seconds']:.2g} s)")
    route = "columns" if costs["columns"] <= COLUMN_PREFERENCE * costs["products"] else "products"
    name = {"columns": "exact columns", "products": "GGN products"}[route]
    return route, (f"{name} (predicted {costs['columns']:.3g} s for columns, {costs['products']:.3g} s for "
                   f"products at rank {rank}; probe {costs['probe_seconds']:.2g} s)")
