"""Tiny float64 problems with dense references built independently of cif_jax.

Each problem is a :class:`cif_jax.Task` plus references computed without the
library's machinery (no ``example_grads_fn``, no ``jax.linearize`` /
``linear_transpose`` products, no CG):

* ``grads``: per-example gradients from ``jax.grad`` of a one-example loss, called
  in a Python loop;
* ``jac``: per-example output Jacobians ``J_i`` (closed form for the linear
  model, ``jax.jacfwd`` of the one-example model output otherwise);
* ``out_hess``: ``W_i``, the loss Hessian in the outputs, in closed form
  (``diag(s) - s s^T`` for softmax cross-entropy, ``diag(scale)`` for the
  weighted squared error);
* ``ggn``: the damped GGN ``(1/N) sum_i J_i^T W_i J_i + LAM I`` as a dense matrix.

All references are numpy float64, built from the task's own (possibly
float32-rounded) values. Model and loss functions live at module level so that
every test file hands the same function objects to ``eqx.filter_jit``; with
shared sizes and settings (``N``, ``NUM_CLUSTERS == NUM_QUERIES``, ``LAM``,
``RTOL``) the compiled programs are reused across the whole suite.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import cif_jax as cj

N = 48  # training examples; not a multiple of BATCH, so chunked passes end with a short chunk
BATCH = 7
RHS_BATCH = 2  # 5 systems in blocks of 2: the last block is zero-padded
NUM_CLUSTERS = 5
NUM_QUERIES = 5  # == NUM_CLUSTERS: the cache's C solves and IF's Q solves share one compiled program
SKETCH_DIM = 4
LAM = 1e-2
RTOL = 1e-12  # float64 solves: CG on p <= 57 unknowns gets there in ~2p steps
IN_DIM, NUM_CLASSES, HIDDEN = 5, 3, 6
REG_SCALE = np.array([[1.0, 3.0]])  # (1, q): per-output weights of the squared error, W = diag(scale)

PROBLEMS = ("softmax", "mlp", "regression")


# -- models and losses handed to cif_jax (batched) ------------------------------------


def linear_apply(params, x):
    return x @ params["w"] + params["b"][None, :]


def mlp_apply(params, x):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    return hidden @ params["w2"] + params["b2"][None, :]


def cross_entropy(outputs, targets):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)


def weighted_squared_error(outputs, targets):
    return 0.5 * jnp.sum(jnp.asarray(REG_SCALE, outputs.dtype) * (outputs - targets) ** 2, axis=-1)


# -- one-example references (never batched through cif_jax) ---------------------------


def ce_single(z, y):
    return jax.nn.logsumexp(z) - z[y]


def ce_output_grad(z, y):
    s = np.exp(z - z.max())
    s /= s.sum()
    s[y] -= 1.0
    return s


def ce_output_hessian(z, y):
    s = np.exp(z - z.max())
    s /= s.sum()
    return np.diag(s) - np.outer(s, s)


def se_single(o, y):
    return 0.5 * jnp.sum(jnp.asarray(REG_SCALE[0], o.dtype) * (o - y) ** 2)


def se_output_grad(o, y):
    return REG_SCALE[0] * (o - y)


def se_output_hessian(o, y):
    return np.diag(REG_SCALE[0])


class Problem(NamedTuple):
    name: str
    task: cj.Task
    flat: np.ndarray  # (p,) theta_0 in float64
    grads: np.ndarray  # (N, p) g_i
    jac: np.ndarray  # (N, q, p) J_i
    out_hess: np.ndarray  # (N, q, q) W_i
    ggn: np.ndarray  # (p, p) damped GGN, LAM included

    @property
    def num_params(self):
        return self.flat.shape[0]


def _loop_grads(single_loss: Callable, flat, xs, ys) -> np.ndarray:
    grad = jax.jit(jax.grad(single_loss))
    return np.stack([np.asarray(grad(flat, xs[i], ys[i])) for i in range(xs.shape[0])])


def _finish(name, task, flat, grads, jac, out_hess) -> Problem:
    n = jac.shape[0]
    ggn = np.einsum("nqi,nqr,nrj->ij", jac, out_hess, jac) / n + LAM * np.eye(flat.shape[0])
    return Problem(name, task, np.asarray(flat), grads, jac, out_hess, ggn)


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, dtype)), tree)


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


@functools.cache
def softmax_problem(dtype: str = "float64") -> Problem:
    """Multinomial logistic regression: logits ``x W + b``, closed-form J_i and W_i."""
    rng = np.random.default_rng(0)
    d, k = IN_DIM, NUM_CLASSES
    x = _cast(rng.normal(size=(N, d)), dtype)
    y = jnp.asarray(rng.integers(0, k, N), jnp.int32)
    params = _cast({"w": 0.5 * rng.normal(size=(d, k)), "b": 0.1 * rng.normal(size=k)}, dtype)
    task = cj.Task(linear_apply, cross_entropy, params, x, y)

    x64, p64 = _f64(x), _f64(params)
    flat, unravel = ravel_pytree(jax.tree_util.tree_map(jnp.asarray, p64))
    # ravel_pytree flattens dict keys in sorted order: [b (k), w (d*k, row-major)].
    # z_j = sum_a x_a w[a, j] + b_j, so dz_j/db_l = delta_jl, dz_j/dw[a, l] = x_a delta_jl.
    eye = np.eye(k)
    jac = np.concatenate(
        [np.broadcast_to(eye, (N, k, k)), np.einsum("na,jl->njal", x64, eye).reshape(N, k, d * k)], axis=2
    )
    logits = x64 @ p64["w"] + p64["b"][None, :]
    out_hess = np.stack([ce_output_hessian(z, yi) for z, yi in zip(logits, np.asarray(y))])

    def single(fl, xi, yi):
        p = unravel(fl)
        return ce_single(xi @ p["w"] + p["b"], yi)

    grads = _loop_grads(single, flat, jnp.asarray(x64), y)
    return _finish("softmax", task, flat, grads, jac, out_hess)


def _mlp_params(rng, q):
    return {
        "w1": rng.normal(size=(IN_DIM, HIDDEN)) / np.sqrt(IN_DIM),
        "b1": 0.1 * rng.normal(size=HIDDEN),
        "w2": rng.normal(size=(HIDDEN, q)) / np.sqrt(HIDDEN),
        "b2": 0.1 * rng.normal(size=q),
    }


def _mlp_single(unravel):
    def out(fl, xi):
        p = unravel(fl)
        return jnp.tanh(xi @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    return out


@functools.cache
def mlp_problem() -> Problem:
    """A tanh MLP classifier: J_i by ``jax.jacfwd`` per example, closed-form softmax W_i."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(N, IN_DIM)))
    y = jnp.asarray(rng.integers(0, NUM_CLASSES, N), jnp.int32)
    params = _cast(_mlp_params(rng, NUM_CLASSES), "float64")
    task = cj.Task(mlp_apply, cross_entropy, params, x, y)

    flat, unravel = ravel_pytree(params)
    out = _mlp_single(unravel)
    jac = np.asarray(jax.jit(jax.vmap(jax.jacfwd(out), in_axes=(None, 0)))(flat, x))
    logits = np.asarray(jax.vmap(out, in_axes=(None, 0))(flat, x))
    out_hess = np.stack([ce_output_hessian(z, yi) for z, yi in zip(logits, np.asarray(y))])
    grads = _loop_grads(lambda fl, xi, yi: ce_single(out(fl, xi), yi), flat, x, y)
    return _finish("mlp", task, flat, grads, jac, out_hess)


@functools.cache
def regression_problem() -> Problem:
    """A tanh MLP with two outputs and a weighted squared error: W_i = diag(1, 3)."""
    rng = np.random.default_rng(2)
    q = REG_SCALE.shape[1]
    x = jnp.asarray(rng.normal(size=(N, IN_DIM)))
    y = jnp.asarray(rng.normal(size=(N, q)))
    params = _cast(_mlp_params(rng, q), "float64")
    task = cj.Task(mlp_apply, weighted_squared_error, params, x, y)

    flat, unravel = ravel_pytree(params)
    out = _mlp_single(unravel)
    jac = np.asarray(jax.jit(jax.vmap(jax.jacfwd(out), in_axes=(None, 0)))(flat, x))
    out_hess = np.broadcast_to(np.diag(REG_SCALE[0]), (N, q, q))
    grads = _loop_grads(lambda fl, xi, yi: se_single(out(fl, xi), yi), flat, x, y)
    return _finish("regression", task, flat, grads, jac, out_hess)


def get_problem(name: str) -> Problem:
    return {"softmax": softmax_problem, "mlp": mlp_problem, "regression": regression_problem}[name]()


def output_grads(problem: Problem) -> np.ndarray:
    """(N, q) closed-form gradients of the loss in the outputs, for the chain-rule check."""
    task = problem.task
    outputs = np.asarray(task.apply_fn(_f64(task.params), _f64(task.inputs)))
    targets = np.asarray(task.targets)
    fn = se_output_grad if problem.name == "regression" else ce_output_grad
    return np.stack([fn(o, t) for o, t in zip(outputs, targets)])


@functools.cache
def cache_for(name: str, dtype: str = "float64", rtol: float = RTOL, num_clusters: int = NUM_CLUSTERS,
              correction=None):
    """The suite's shared caches (built once per session): plain CG and, unless asked, no
    self-influence correction (that is tested in test_correction.py)."""
    problem = get_problem(name) if dtype == "float64" else softmax_problem(dtype)
    with warnings.catch_warnings():
        # Raw sketches of these random problems put a small majority in one cluster;
        # that advice is beside the point here (and the partition is what it is).
        warnings.filterwarnings("ignore", message="one cluster holds", category=UserWarning)
        return cj.build_cache(
            problem.task, num_clusters=num_clusters, sketch_dim=SKETCH_DIM, damping=LAM, key=jax.random.key(0),
            solver=cj.CG(rtol=rtol, preconditioner=None), correction=correction)


# -- dense helpers ----------------------------------------------------------------------


def random_subsets(num: int = NUM_QUERIES, *, seed: int = 0, sizes=(1, 3, 7, 16, 30), n: int = N):
    """``num`` random subsets (sorted index arrays) of the given sizes, cycled."""
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n, size=sizes[q % len(sizes)], replace=False)) for q in range(num)]


def masks_of(subsets, n: int = N) -> np.ndarray:
    mask = np.zeros((len(subsets), n), bool)
    for q, s in enumerate(subsets):
        mask[q, s] = True
    return mask


def random_masks(num: int, size: int, *, seed: int, n: int = N) -> np.ndarray:
    """(num, n) masks of uniformly random subsets of exactly ``size`` members."""
    rng = np.random.default_rng(seed)
    members = np.argsort(rng.random((num, n)), axis=1)[:, :size]
    mask = np.zeros((num, n), bool)
    np.put_along_axis(mask, members, True, axis=1)
    return mask


def dense_residuals(problem: Problem, rhs, x) -> np.ndarray:
    """``||b - H~ x|| / ||b||`` per row (eq. 9) with the problem's dense H~, in float64."""
    rhs, x = np.asarray(rhs, np.float64), np.asarray(x, np.float64)
    return np.linalg.norm(rhs - x @ problem.ggn.T, axis=1) / np.linalg.norm(rhs, axis=1)


def dense_solve(h: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solves h x_r = rhs_r for each row of rhs."""
    return np.linalg.solve(h, np.asarray(rhs, np.float64).T).T


def dense_influence(problem: Problem, mask: np.ndarray) -> np.ndarray:
    """(Q, p) ``(1/N) H~^{-1} sum_{i in S} g_i`` (eq. 3) from the dense GGN and gradients."""
    return dense_solve(problem.ggn, mask.astype(np.float64) @ problem.grads) / problem.grads.shape[0]


def dense_means(grads: np.ndarray, assignments, num_clusters: int) -> np.ndarray:
    a = np.asarray(assignments)
    return np.stack([grads[a == c].mean(axis=0) for c in range(num_clusters)])


def rel_err(got, want) -> float:
    """``||got - want|| / ||want||`` over the whole array, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def row_rel_err(got, want) -> float:
    """The largest per-row relative error of two (R, p) arrays."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)))
