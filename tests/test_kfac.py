"""K-FAC and EK-FAC against hand computations and dense references (float64).

References are built without the library's layer capture: layer inputs (im2col
patches by explicit loops), pre-activation Jacobians by ``jax.jacrev`` of
hand-written pieces of the network, output Hessians in closed form, the dense
GGN from explicit per-example Jacobians. The problems: the tanh MLP of
tests/_models.py (a plain-function task), a small CNN written with flax nnx
(im2col convolutions with and without bias, ReLU, max-pooling, GroupNorm whose
parameters get a diagonal block, a dense layer), the same two-layer network
through the nnx, linen and Equinox adapters, and a one-layer linear model with a
weighted squared loss, where the Kronecker factorisation is exact.
"""

import functools
import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import (
    BATCH,
    LAM,
    NUM_CLUSTERS,
    REG_SCALE,
    RTOL,
    SKETCH_DIM,
    N,
    ce_output_hessian,
    cross_entropy,
    dense_solve,
    linear_apply,
    masks_of,
    mlp_problem,
    random_subsets,
    row_rel_err,
    softmax_problem,
    weighted_squared_error,
)
from flax import nnx
from jax.flatten_util import ravel_pytree

import cif_jax as cj
from cif_jax.solvers.precondition import inverse_fn
from cif_jax.workloads import models as cmodels

SOLVE_TOL = 1e-9  # as tests/test_precondition.py: RTOL = 1e-12 on condition numbers <= ~500
FACTOR_TOL = 1e-12  # float64 sums of N products of O(1) terms


# -- problems -------------------------------------------------------------------------------------


class SmallCNN(nnx.Module):
    """6x6x1 -> conv 3@3x3 (pad 1, bias) - ReLU - pool -> conv 4@2x2 (no bias) - GroupNorm - tanh -> fc 3."""

    def __init__(self, rngs):
        kw = dict(param_dtype=jnp.float64, rngs=rngs)
        self.conv1 = cmodels.Conv2d(1, 3, 3, padding=1, **kw)
        self.conv2 = cmodels.Conv2d(3, 4, 2, padding=0, use_bias=False, **kw)
        self.norm = nnx.GroupNorm(4, num_groups=2, **kw)
        self.fc = nnx.Linear(16, 3, **kw)

    def pre1(self, x):
        return self.conv1(x)

    def from1(self, z1):
        return self.from2(self.conv2(cmodels.max_pool_2x2(jax.nn.relu(z1))))

    def from2(self, z2):
        h = jnp.tanh(self.norm(z2))
        return self.fc(h.reshape(h.shape[0], -1))

    def __call__(self, x):
        return self.from1(self.pre1(x))


@functools.cache
def cnn():
    """(task, model, dense GGN with LAM, per-example output Hessians)."""
    rng = np.random.default_rng(5)
    model = SmallCNN(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    noisy = jax.tree_util.tree_map(lambda a: a + 0.3 * rng.normal(size=a.shape), state)
    nnx.update(model, noisy)
    x = jnp.asarray(rng.normal(size=(24, 6, 6, 1)))
    y = jnp.asarray(rng.integers(0, 3, 24), jnp.int32)
    task = cj.Task.from_nnx(model, cross_entropy, x, y)
    return task, model, *dense_ggn(task)


def _op(task, **kwargs):
    """The damped GGN at LAM; without `batch_size` its factor passes take chunks of 64 >= N (one chunk)."""
    return cj.DampedGGN(task, damping=LAM, **kwargs)


@functools.cache
def built(which, kind):
    """The suite's shared preconditioners (unchunked builds; chunking is checked once, on the MLP)."""
    task = mlp_problem().task if which == "mlp" else cnn()[0]
    build = cj.kfac_preconditioner if kind == "kfac" else cj.ekfac_preconditioner
    return build(_op(task))


def dense_ggn(task, weights=None):
    """``sum_i w_i J_i^T W_i J_i / sum w + LAM I`` from per-example Jacobians (jacfwd) and closed-form W_i."""
    flat, unravel = ravel_pytree(task.params)
    n = task.num_examples

    def out(fp, xi):
        return task.apply_fn(unravel(fp), xi[None])[0]

    jac = np.asarray(jax.jit(jax.vmap(jax.jacfwd(out), in_axes=(None, 0)))(flat, task.inputs))
    logits = np.asarray(task.apply_fn(task.params, task.inputs))
    hess = np.stack([ce_output_hessian(z, t) for z, t in zip(logits, np.asarray(task.targets))])
    w = np.ones(n) if weights is None else weights
    ggn = np.einsum("n,nqi,nqr,nrj->ij", w, jac, hess, jac) / w.sum() + LAM * np.eye(flat.size)
    return ggn, hess


def patches(x, k, pad):
    """im2col by loops: (N, Ho, Wo, k*k*C), features ordered (kh, kw, C) like the kernel's rows."""
    x = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n, h, w, c = x.shape
    ho, wo = h - k + 1, w - k + 1
    out = np.zeros((n, ho, wo, k * k * c))
    for r in range(ho):
        for s in range(wo):
            out[:, r, s] = x[:, r : r + k, s : s + k, :].reshape(n, -1)
    return out


def hand_factors(inputs, jz, hess, bias, weights=None):
    """A = mean_i sum_t a a^T (ones column with a bias), G = mean_i (1/T) sum_t Jz_t^T W_i Jz_t.

    inputs: (N, T, in); jz: (N, q, T, out) Jacobians of the outputs in the pre-activations.
    """
    n, t, _ = inputs.shape
    w = np.ones(n) if weights is None else weights
    if bias:
        inputs = np.concatenate([inputs, np.ones((n, t, 1))], axis=2)
    a = np.einsum("n,nti,ntj->ij", w, inputs, inputs) / w.sum()
    g = np.einsum("n,nkto,nkl,nltp->op", w, jz, hess, jz) / (t * w.sum())
    return a, g


def _jz(fn, z):
    """(N, q, T, out): per-example Jacobians of fn (batched) in z (N, ..., out)."""
    def one(zi):
        return fn(zi[None])[0]

    jac = np.asarray(jax.jit(jax.vmap(jax.jacrev(one)))(jnp.asarray(z)))
    n, q = jac.shape[:2]
    return jac.reshape(n, q, -1, z.shape[-1])


def _blocks(pre, dense):
    """Per block, the (out*in, out*in) sub-matrix of a dense p x p matrix, and the diagonal part's positions."""
    perm, start, out = pre.layout.perm, 0, []
    for o, i in pre.layout.shapes:
        idx = perm[start : start + o * i]
        out.append(dense[np.ix_(idx, idx)])
        start += o * i
    return out, perm[start:]


def _pi(a, g):
    return np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))


def dense_preconditioner(pre, lam):
    """The damped block-diagonal approximation as a dense p x p matrix, from the stored factors."""
    p = pre.num_params
    out = np.zeros((p, p))
    perm, start = pre.layout.perm, 0
    for b, (o, i) in enumerate(pre.layout.shapes):
        idx = perm[start : start + o * i]
        start += o * i
        a, g = np.asarray(pre.input_factors[b]), np.asarray(pre.output_factors[b])
        if pre.scalings is None:
            pi, root = _pi(a, g), np.sqrt(lam)
            block = np.kron(g + root / pi * np.eye(o), a + pi * root * np.eye(i))
        else:
            q = np.kron(np.asarray(pre.output_bases[b]), np.asarray(pre.input_bases[b]))
            block = q @ np.diag(np.asarray(pre.scalings[b]).reshape(-1) + lam) @ q.T
        out[np.ix_(idx, idx)] = block
    rest = perm[start:]
    out[rest, rest] = np.asarray(pre.diagonal) + lam
    return out


# -- the factors ------------------------------------------------------------------------------------


def test_mlp_factors_equal_the_hand_computation():
    prob = mlp_problem()  # tanh(x w1 + b1) w2 + b2, a plain-function task
    pre = built("mlp", "kfac")
    p = {k: np.asarray(v) for k, v in prob.task.params.items()}
    x = np.asarray(prob.task.inputs)
    h = np.tanh(x @ p["w1"] + p["b1"])
    # Jacobians of the outputs in the pre-activations: identity for the last layer,
    # w2^T diag(1 - h^2) for the hidden one.
    jz2 = np.broadcast_to(np.eye(3), (N, 3, 3))[:, :, None, :]
    jz1 = np.einsum("jk,nj->nkj", p["w2"], 1 - h**2)[:, :, None, :]
    refs = [hand_factors(x[:, None], jz1, prob.out_hess, True), hand_factors(h[:, None], jz2, prob.out_hess, True)]
    assert len(pre.layers) == 2 and pre.layout.num_diagonal == 0
    for b, (a, g) in enumerate(refs):
        np.testing.assert_allclose(np.asarray(pre.input_factors[b]), a, rtol=FACTOR_TOL, atol=FACTOR_TOL)
        np.testing.assert_allclose(np.asarray(pre.output_factors[b]), g, rtol=FACTOR_TOL, atol=FACTOR_TOL)
    # The chunking leaves them unchanged.
    chunked = cj.kfac_preconditioner(_op(prob.task, batch_size=BATCH))
    np.testing.assert_allclose(np.asarray(chunked.output_factors[0]), refs[0][1], rtol=FACTOR_TOL, atol=FACTOR_TOL)


def test_cnn_factors_equal_the_hand_computation():
    task, model, ggn, hess = cnn()
    pre = built("cnn", "kfac")
    x = np.asarray(task.inputs)
    z1 = model.pre1(jnp.asarray(x))
    h1 = cmodels.max_pool_2x2(jax.nn.relu(z1))
    z2 = model.conv2(h1)
    feats = jnp.tanh(model.norm(z2)).reshape(x.shape[0], -1)
    refs = [
        hand_factors(patches(x, 3, 1).reshape(24, 36, 9), _jz(model.from1, z1), hess, True),
        hand_factors(patches(h1, 2, 0).reshape(24, 4, 12), _jz(model.from2, z2), hess, False),
        hand_factors(np.asarray(feats)[:, None], np.broadcast_to(np.eye(3), (24, 3, 3))[:, :, None, :], hess, True),
    ]
    assert [s for s in pre.layout.shapes] == [(3, 10), (4, 12), (3, 17)]
    for b, (a, g) in enumerate(refs):
        np.testing.assert_allclose(np.asarray(pre.input_factors[b]), a, rtol=FACTOR_TOL, atol=FACTOR_TOL)
        np.testing.assert_allclose(np.asarray(pre.output_factors[b]), g, rtol=FACTOR_TOL, atol=FACTOR_TOL)
    # GroupNorm's scale and bias (8 parameters) are in no block: their exact GGN diagonal.
    _, rest = _blocks(pre, ggn)
    assert rest.size == 8
    np.testing.assert_allclose(np.asarray(pre.diagonal), np.diag(ggn)[rest] - LAM, rtol=FACTOR_TOL, atol=1e-15)


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_ekfac_scalings_are_the_ggn_diagonal_in_the_kronecker_eigenbasis(which):
    ggn = mlp_problem().ggn if which == "mlp" else cnn()[2]
    pre = built(which, "ekfac")
    blocks, _ = _blocks(pre, ggn - LAM * np.eye(ggn.shape[0]))
    for b, block in enumerate(blocks):
        q = np.kron(np.asarray(pre.output_bases[b]), np.asarray(pre.input_bases[b]))
        want = np.diag(q.T @ block @ q)
        np.testing.assert_allclose(np.asarray(pre.scalings[b]).reshape(-1), want, rtol=1e-10, atol=1e-14)
        # The bases are those of the K-FAC factors.
        a = np.asarray(pre.input_factors[b])
        qa = np.asarray(pre.input_bases[b])
        np.testing.assert_allclose(qa @ np.diag(np.asarray(pre.input_eigenvalues[b])) @ qa.T, a, atol=1e-12)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_inverse_is_the_dense_block_diagonal_inverse(kind):
    pre = built("cnn", kind)
    dense = dense_preconditioner(pre, LAM)
    r = np.random.default_rng(0).normal(size=(3, pre.num_params))
    # inverse_fn is normalised for the scaled system I + GGN / lambda: lambda P^{-1}.
    got = np.asarray(inverse_fn(pre, LAM)(jnp.asarray(r)))
    want = LAM * np.linalg.solve(dense, r.T).T
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    # ekfac_solve is P^{-1}, unnormalised.
    np.testing.assert_allclose(np.asarray(cj.ekfac_solve(pre, r, damping=LAM)), want / LAM, rtol=1e-10,
                               atol=1e-12 * np.abs(want).max() / LAM)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_inverse_sqrt_is_the_symmetric_root_of_the_dense_inverse(kind):
    from cif_jax.solvers.kfac import inverse_sqrt

    pre = built("cnn", kind)
    dense = dense_preconditioner(pre, LAM) / LAM  # P / lambda, the scaled system's preconditioner
    evals, evecs = np.linalg.eigh(dense)
    want = evecs @ np.diag(evals**-0.5) @ evecs.T
    got = np.asarray(inverse_sqrt(pre, LAM)(jnp.eye(pre.num_params, dtype=jnp.float64)))
    # float64, a few hundred parameters and condition numbers below 1e4: rounding is ~1e-12 of the largest entry.
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11 * np.abs(want).max())


def test_factors_on_a_curvature_sample():
    prob = mlp_problem()
    idx = np.arange(1, N, 3)
    w = np.linspace(0.5, 2.0, idx.size)
    sample = cj.CurvatureSample(jnp.asarray(idx), jnp.asarray(w))
    pre = cj.kfac_preconditioner(_op(prob.task, batch_size=BATCH, curvature=sample))
    p = {k: np.asarray(v) for k, v in prob.task.params.items()}
    x = np.asarray(prob.task.inputs)[idx]
    h = np.tanh(x @ p["w1"] + p["b1"])
    jz1 = np.einsum("jk,nj->nkj", p["w2"], 1 - h**2)[:, :, None, :]
    a, g = hand_factors(x[:, None], jz1, prob.out_hess[idx], True, weights=w)
    np.testing.assert_allclose(np.asarray(pre.input_factors[0]), a, rtol=FACTOR_TOL, atol=FACTOR_TOL)
    np.testing.assert_allclose(np.asarray(pre.output_factors[0]), g, rtol=FACTOR_TOL, atol=FACTOR_TOL)
    assert pre.curvature == cj.core.curvature.describe(sample)
    with pytest.raises(ValueError, match="curvature"):
        cj.solve_ggn(prob.task, jnp.asarray(prob.grads[:2]), damping=LAM, solver=cj.CG(preconditioner=pre))


# -- adapters -----------------------------------------------------------------------------------------

IN, HIDDEN, OUT = 3, 5, 3


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(IN, HIDDEN, param_dtype=jnp.float64, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, OUT, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(OUT, param_dtype=jnp.float64)(jnp.tanh(nn.Dense(HIDDEN, param_dtype=jnp.float64)(x)))


def _adapter_task(adapter):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(N, IN)))
    y = jnp.asarray(rng.integers(0, OUT, N), jnp.int32)
    if adapter == "nnx":
        return cj.Task.from_nnx(_NnxNet(nnx.Rngs(0)), cross_entropy, x, y)
    if adapter == "lax-conv":
        model = _LaxConvNet(nnx.Rngs(0))
        nnx.update(model, jax.tree_util.tree_map(lambda a: a + 0.2 * rng.normal(size=a.shape),
                                                 nnx.state(model, nnx.Param)))
        return cj.Task.from_nnx(model, cross_entropy, jnp.asarray(rng.normal(size=(N, 5, 6, 1))), y)
    if adapter == "linen":
        net = _LinenNet()
        return cj.Task.from_linen(net, net.init(jax.random.key(0), x[:1]), cross_entropy, x, y)
    net = eqx.nn.MLP(IN, OUT, HIDDEN, depth=1, activation=jnp.tanh, key=jax.random.key(0))
    net = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, net)
    return cj.Task.from_equinox(net, cross_entropy, x, y)  # Linear is weight @ x (out, in), vmapped


class _LaxConvNet(nnx.Module):
    """nnx.Conv (lax.conv_general_dilated: stride 2, SAME, kernel dilation) then a dense layer."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 2, (3, 2), strides=2, padding="SAME", kernel_dilation=(1, 2),
                             param_dtype=jnp.float64, rngs=rngs)
        self.out = nnx.Linear(2 * 3 * 3, OUT, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.conv(x))
        return self.out(h.reshape(h.shape[0], -1))


@pytest.mark.parametrize("adapter", ["linen", "equinox", "lax-conv"])  # nnx.Linear: the CNN's dense layer
def test_layers_are_found_through_every_adapter(adapter):
    task = _adapter_task(adapter)
    pre = cj.ekfac_preconditioner(_op(task))
    if adapter == "lax-conv":  # patches of 1 channel x 3 x 2 window, 3 x 3 positions
        assert pre.layout.shapes == ((2, 7), (OUT, 19)) and "9 position(s)" in pre.layers[0]
    else:
        assert sorted(pre.layout.shapes) == sorted([(HIDDEN, IN + 1), (OUT, HIDDEN + 1)])
    assert pre.layout.num_diagonal == 0
    ggn, _ = dense_ggn(task)
    blocks, _ = _blocks(pre, ggn - LAM * np.eye(ggn.shape[0]))
    for b, block in enumerate(blocks):  # the positions of every block are those of its parameters
        q = np.kron(np.asarray(pre.output_bases[b]), np.asarray(pre.input_bases[b]))
        np.testing.assert_allclose(np.asarray(pre.scalings[b]).reshape(-1), np.diag(q.T @ block @ q), rtol=1e-10,
                                   atol=1e-14)


# -- solves --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which, kind", [("mlp", "kfac"), ("mlp", "ekfac"), ("cnn", "kfac-built")])
def test_preconditioned_solves_match_dense(which, kind):
    """Strings are built inside solve_ggn; built objects are shared. Same solutions, same true residuals."""
    if which == "mlp":
        prob = mlp_problem()
        task, ggn, rhs = prob.task, prob.ggn, prob.grads[:5]
    else:
        task, _, ggn, _ = cnn()
        rhs = np.random.default_rng(1).normal(size=(5, task.num_params))
    pre = built(which, kind.split("-")[0]) if kind.endswith("-built") else kind
    chunks = dict(batch_size=BATCH) if which == "mlp" else {}
    block = 2 if which == "mlp" else None
    got = cj.solve_ggn(task, jnp.asarray(rhs), damping=LAM, solver=cj.CG(rtol=RTOL, preconditioner=pre,
                                                                         rhs_batch_size=block), **chunks)
    assert row_rel_err(got.solutions, dense_solve(ggn, rhs)) < SOLVE_TOL
    assert bool(got.converged.all()) and float(got.residuals.max()) <= RTOL


def test_influence_and_cache_take_a_built_kfac_preconditioner():
    prob = mlp_problem()
    pre = built("mlp", "ekfac")
    subsets = random_subsets()
    want = dense_solve(prob.ggn, masks_of(subsets).astype(np.float64) @ prob.grads) / N
    got = cj.influence(prob.task, subsets, damping=LAM, solver=cj.CG(rtol=RTOL, preconditioner=pre), batch_size=BATCH)
    assert row_rel_err(got, want) < SOLVE_TOL
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="one cluster holds", category=UserWarning)
        # The settings of the suite's shared cache (tests/_models.py), with the preconditioner.
        cache = cj.build_cache(prob.task, num_clusters=NUM_CLUSTERS, sketch_dim=SKETCH_DIM, damping=LAM,
                               key=jax.random.key(0), solver=cj.CG(rtol=RTOL, preconditioner=pre))
    assert row_rel_err(cache.responses, dense_solve(prob.ggn, np.asarray(cache.means))) < SOLVE_TOL


# -- the EK-FAC estimator ------------------------------------------------------------------------------


@functools.cache
def linear_squared():
    """One linear layer, weighted squared loss: GGN = diag(REG_SCALE) (x) E[[x,1][x,1]^T], exactly Kronecker."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(N, 4)) + 0.5)
    y = jnp.asarray(rng.normal(size=(N, 2)))
    params = {"w": jnp.asarray(rng.normal(size=(4, 2))), "b": jnp.asarray(rng.normal(size=2))}
    task = cj.Task(linear_apply, weighted_squared_error, params, x, y)
    flat, unravel = ravel_pytree(params)
    grad = jax.jit(jax.grad(lambda fp, xi, yi: weighted_squared_error(linear_apply(unravel(fp), xi[None]), yi[None])[0]))
    grads = np.stack([np.asarray(grad(flat, x[i], y[i])) for i in range(N)])
    # ravel order [b (2), w (4 x 2 row-major)]: J_i = [I, x_i (x) I], W = diag(scale).
    jac = np.concatenate([np.broadcast_to(np.eye(2), (N, 2, 2)),
                          np.einsum("na,jl->njal", np.asarray(x), np.eye(2)).reshape(N, 2, 8)], axis=2)
    return task, grads, jac


def test_ekfac_influence_is_exact_on_a_linear_model_with_squared_loss():
    task, grads, jac = linear_squared()
    w_out = np.diag(REG_SCALE[0])
    ggn = np.einsum("nqi,qr,nrj->ij", jac, w_out, jac) / N
    pre = cj.ekfac_preconditioner(_op(task))
    # Undamped K-FAC is the GGN itself here.
    block = np.kron(np.asarray(pre.output_factors[0]), np.asarray(pre.input_factors[0]))
    dense_blocks, _ = _blocks(pre, ggn)
    np.testing.assert_allclose(block, dense_blocks[0], rtol=1e-12, atol=1e-14)
    subsets = random_subsets()
    want = dense_solve(ggn + LAM * np.eye(10), masks_of(subsets).astype(np.float64) @ grads) / N
    got = cj.ekfac_influence(task, subsets, damping=LAM, batch_size=BATCH)  # built here, chunked
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    again = cj.ekfac_influence(task, subsets, damping=LAM, preconditioner=pre)
    np.testing.assert_allclose(np.asarray(again), want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    # On a curvature sample: the weighted subset GGN, still exactly Kronecker.
    idx, w = np.arange(0, N, 2), np.linspace(1.0, 3.0, N // 2)
    sample = cj.CurvatureSample(jnp.asarray(idx), jnp.asarray(w))
    ggn_s = np.einsum("n,nqi,qr,nrj->ij", w, jac[idx], w_out, jac[idx]) / w.sum() + LAM * np.eye(10)
    got = cj.ekfac_influence(task, subsets, damping=LAM, curvature=sample)
    want = dense_solve(ggn_s, masks_of(subsets).astype(np.float64) @ grads) / N
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12 * np.abs(want).max())


def test_ekfac_influence_is_approximate_on_an_mlp():
    prob = mlp_problem()
    subsets = random_subsets()
    got = np.asarray(cj.ekfac_influence(prob.task, subsets, damping=LAM, preconditioner=built("mlp", "ekfac")))
    want = dense_solve(prob.ggn, masks_of(subsets).astype(np.float64) @ prob.grads) / N
    # An approximation, not the exact influence: it drops the cross-layer terms of the GGN (here the
    # solutions differ by ~94%; on LeNet-5 the fold scores still rank alike, benchmarks/run.py --only kfac).
    assert np.isfinite(got).all() and row_rel_err(got, want) > 1e-2


def test_float32_is_preserved():
    task = softmax_problem("float32").task
    pre = cj.ekfac_preconditioner(_op(task))
    leaves = jax.tree_util.tree_leaves(pre)
    assert leaves and all(leaf.dtype == jnp.float32 for leaf in leaves)
    x = cj.solve_ggn(task, jnp.ones((1, task.num_params), jnp.float32), damping=LAM, solver=cj.CG(rtol=1e-5, preconditioner=pre))
    assert x.solutions.dtype == jnp.float32 and bool(x.converged[0])


# -- bad input -----------------------------------------------------------------------------------------


def test_unknown_preconditioner_name_is_refused_before_work():
    prob = mlp_problem()
    with pytest.raises(ValueError, match="'kfac', 'ekfac'"):
        cj.solve_ggn(prob.task, jnp.asarray(prob.grads[:1]), damping=LAM, solver=cj.CG(preconditioner="kfca"))
    with pytest.raises(TypeError, match="CG.preconditioner"):
        cj.influence(prob.task, [np.array([0])], damping=LAM, solver=cj.CG(preconditioner=object()))


def test_a_model_without_factorable_layers_falls_back_to_jacobi():
    rng = np.random.default_rng(0)
    params = {"scale": jnp.asarray(rng.normal(size=3)), "shift": jnp.asarray(rng.normal(size=3))}
    task = cj.Task(lambda p, x: x * p["scale"][None, :] + p["shift"][None, :], cross_entropy, params,
                   jnp.asarray(rng.normal(size=(N, 3))), jnp.asarray(rng.integers(0, 3, N), jnp.int32))
    with pytest.warns(UserWarning, match="cannot factor this model.*Falling back to the Jacobi"):
        pre = cj.kfac_preconditioner(_op(task, batch_size=BATCH))
    assert isinstance(pre, cj.JacobiPreconditioner)
    ggn, _ = dense_ggn(task)
    np.testing.assert_allclose(np.asarray(pre.diagonal), np.diag(ggn) - LAM, rtol=1e-12, atol=1e-15)
    with pytest.warns(UserWarning, match="cannot factor"):
        got = cj.solve_ggn(task, jnp.ones((1, 6)), damping=LAM, solver=cj.CG(rtol=RTOL, preconditioner="ekfac"))
    assert row_rel_err(got.solutions, dense_solve(ggn, np.ones((1, 6)))) < SOLVE_TOL


def test_matrices_used_otherwise_get_a_diagonal_block_with_a_warning():
    """An embedding looked up by index is no matrix product: diagonal block; the dense layer after it is factored."""
    rng = np.random.default_rng(4)
    params = {"emb": jnp.asarray(rng.normal(size=(6, 3))), "w": jnp.asarray(rng.normal(size=(3, 3)))}
    task = cj.Task(lambda p, t: jnp.take(p["emb"], t, axis=0) @ p["w"], cross_entropy, params,
                   jnp.asarray(rng.integers(0, 6, N)), jnp.asarray(rng.integers(0, 3, N), jnp.int32))
    with pytest.warns(UserWarning, match=r"1 parameter array\(s\) of two or more dimensions \(\['emb'\]\)"):
        pre = cj.kfac_preconditioner(_op(task))
    assert pre.layout.shapes == ((3, 3),)
    ggn, _ = dense_ggn(task)
    _, rest = _blocks(pre, ggn)
    np.testing.assert_allclose(np.asarray(pre.diagonal), np.diag(ggn)[rest] - LAM, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("damping", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_damping_is_refused_before_work(damping):
    task = mlp_problem().task
    with pytest.raises(ValueError, match="`damping` must be finite and > 0"):
        cj.kfac_preconditioner(cj.DampedGGN(task, damping=damping))  # refused by the operator
    with pytest.raises(ValueError, match="damping"):
        cj.ekfac_influence(task, [np.array([0])], damping=damping)


def test_a_damping_that_makes_a_block_singular_is_refused():
    task = softmax_problem("float32").task
    # K-FAC adds sqrt(lambda) / pi to G, whose zero eigenvalue (softmax) is known to eps * max.
    with pytest.raises(ValueError, match="K-FAC factor singular to float32 precision.*factor G.*raise the damping"):
        cj.kfac_preconditioner(cj.DampedGGN(task, damping=1e-16))
    with pytest.raises(ValueError, match="singular"):  # the builder checks its operator's damping
        cj.ekfac_preconditioner(cj.DampedGGN(task, damping=1e-12))
    pre = cj.ekfac_preconditioner(_op(task))
    with pytest.raises(ValueError, match="singular"):  # and so does a check against another operator
        pre.check(cj.DampedGGN(task, damping=1e-12))
    with pytest.raises(ValueError, match="singular"):
        cj.ekfac_solve(pre, jnp.ones((1, task.num_params)), damping=1e-12)
    with pytest.raises(ValueError, match="singular"):
        cj.ekfac_influence(task, [np.array([0])], damping=1e-12, preconditioner=pre)
    # A damping the blocks can take works.
    assert np.isfinite(np.asarray(cj.ekfac_solve(pre, jnp.ones((1, task.num_params)), damping=LAM))).all()


def test_approximate_solves_check_their_inputs():
    task = mlp_problem().task
    with pytest.raises(TypeError, match="built preconditioner"):
        cj.ekfac_solve(np.eye(task.num_params), jnp.ones((1, task.num_params)), damping=LAM)
    pre = built("mlp", "kfac")
    with pytest.raises(ValueError, match=r"\(R, p\)"):
        cj.ekfac_solve(pre, jnp.ones((1, 3)), damping=LAM)
    other = softmax_problem().task
    with pytest.raises(ValueError, match="acts on"):
        cj.ekfac_influence(other, [np.array([0])], damping=LAM, preconditioner=pre)
