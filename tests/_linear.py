"""Closed-form numpy references for multinomial logistic regression ``z = x W + b``.

Used by the baseline tests (attribution, retraining, LDS). Nothing here calls
cif_jax: Jacobians, gradients, losses and the GGN are written out by hand, in
``ravel_pytree`` order of ``{"b": (k,), "w": (d, k)}``: ``[b, w row-major]``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from _models import cross_entropy, linear_apply

import cif_jax as cj


def blobs(n: int, *, seed: int = 0, d: int = 3, k: int = 3, num_eval: int = 20):
    """Gaussian blobs around k random centres: a task at ``W = 0, b = 0`` and evaluation data."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    y, ye = rng.integers(0, k, n), rng.integers(0, k, num_eval)
    x, xe = centres[y] + rng.normal(size=(n, d)), centres[ye] + rng.normal(size=(num_eval, d))
    init = {"w": jnp.zeros((d, k)), "b": jnp.zeros(k)}
    task = cj.Task(linear_apply, cross_entropy, init, jnp.asarray(x), jnp.asarray(y, jnp.int32))
    return task, jnp.asarray(xe), jnp.asarray(ye, jnp.int32)


def unflatten(flat, d: int, k: int) -> dict:
    flat = np.asarray(flat, np.float64)
    return {"b": flat[:k], "w": flat[k:].reshape(d, k)}


def jac(x, k: int) -> np.ndarray:
    """(n, k, p) output Jacobians: dz_j/db_l = delta_jl, dz_j/dw[a, l] = x_a delta_jl."""
    x = np.asarray(x, np.float64)
    n, d = x.shape
    eye = np.eye(k)
    return np.concatenate([np.broadcast_to(eye, (n, k, k)), np.einsum("na,jl->njal", x, eye).reshape(n, k, d * k)],
                          axis=2)


def logits(params, x) -> np.ndarray:
    return np.asarray(x, np.float64) @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64)


def softmax(z) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ce_losses(params, x, y) -> np.ndarray:
    z = logits(params, x)
    top = z.max(axis=1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return lse - z[np.arange(len(z)), np.asarray(y)]


def loss_grads(params, x, y) -> np.ndarray:
    """(n, p) per-example gradients ``J_i^T (softmax(z_i) - e_{y_i})``."""
    s = softmax(logits(params, x))
    s[np.arange(len(s)), np.asarray(y)] -= 1.0
    return np.einsum("nkp,nk->np", jac(x, s.shape[1]), s)


def ggn(params, x) -> np.ndarray:
    """(p, p) ``(1/n) sum_i J_i^T (diag(s_i) - s_i s_i^T) J_i``: the Hessian of the mean loss."""
    s = softmax(logits(params, x))
    w = np.einsum("nk,kl->nkl", s, np.eye(s.shape[1])) - np.einsum("nk,nl->nkl", s, s)
    j = jac(x, s.shape[1])
    return np.einsum("nki,nkl,nlj->ij", j, w, j) / len(s)
