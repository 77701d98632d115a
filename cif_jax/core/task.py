"""The influence task: a model, a loss, a parameter snapshot and its training data.

Everything in cif_jax takes a :class:`Task`. It holds a pure function of the
parameters (``apply_fn(params, x_batch) -> outputs``), a per-example loss
(``loss_fn(outputs, targets_batch) -> losses``), the snapshot ``theta_0`` and the
training set. Parameter-space vectors are flat, in
``jax.flatten_util.ravel_pytree(params)`` order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree


class Task(eqx.Module):
    """A model snapshot and its training data, the input of every influence function.

    Attributes:
        apply_fn: ``apply_fn(params, x_batch) -> outputs`` with outputs of shape
            ``(B, q)`` (more trailing dimensions are allowed). Must be a pure
            function of ``params`` (no dropout, no running statistics), and each
            example's output must depend on that example alone: per-example
            gradients, chunked passes and GGN products assume it. Batch
            normalisation in training mode breaks it; the adapters refuse it (the
            forward pass would update state) with the fix (evaluate in inference
            mode), but a hand-written ``apply_fn`` that normalises over its batch
            is not detected, and its influence numbers change with ``batch_size``.
        loss_fn: ``loss_fn(outputs, targets_batch) -> losses`` of shape ``(B,)``, one
            loss per example, e.g.
            ``optax.softmax_cross_entropy_with_integer_labels``. It must be twice
            differentiable in ``outputs``; its Hessian in the outputs is the ``W_i``
            of the Gauss-Newton matrix (paper eq. 1).
        params: the parameter pytree ``theta_0``.
        inputs: the training inputs, an array (or pytree of arrays) with leading
            dimension N.
        targets: the training targets, leading dimension N.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> import cif_jax as cj
        >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
        >>> apply_fn = lambda p, x: x @ p["w"] + p["b"]
        >>> task = cj.Task(apply_fn, optax.softmax_cross_entropy_with_integer_labels,
        ...                params, jnp.ones((5, 3)), jnp.zeros(5, jnp.int32))
        >>> task.num_examples, task.num_params
        (5, 8)
    """

    apply_fn: Callable
    loss_fn: Callable
    params: PyTree
    inputs: PyTree[Array]
    targets: PyTree[Array]

    def __init__(self, apply_fn, loss_fn, params, inputs, targets):
        if not callable(apply_fn):
            raise TypeError("`Task(apply_fn=...)` must be callable: apply_fn(params, x_batch) -> outputs.")
        if not callable(loss_fn):
            raise TypeError(
                "`Task(loss_fn=...)` must be callable: loss_fn(outputs, targets_batch) -> per-example losses (B,)."
            )
        leaves = jax.tree_util.tree_leaves(params)
        if not leaves:
            raise ValueError("`Task(params=...)` has no array leaves: there is nothing to differentiate.")
        for leaf in leaves:
            if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
                raise TypeError(
                    "`Task(params=...)` must hold only floating-point arrays; found dtype "
                    f"{jnp.asarray(leaf).dtype}. Split integer state out of the params (e.g. with "
                    "`Task.from_nnx`, which keeps only `nnx.Param` leaves)."
                )
        self.apply_fn = apply_fn
        self.loss_fn = loss_fn
        self.params = params
        self.inputs = jax.tree_util.tree_map(jnp.asarray, inputs)
        self.targets = jax.tree_util.tree_map(jnp.asarray, targets)
        n_in = _leading_dims(self.inputs, "inputs")
        n_tg = _leading_dims(self.targets, "targets")
        if n_in != n_tg:
            raise ValueError(
                f"`Task`: inputs hold {n_in} examples but targets hold {n_tg}; they must have the same "
                "leading dimension."
            )
        if n_in < 1:
            raise ValueError("`Task`: the training set is empty (N = 0).")

    # -- sizes ---------------------------------------------------------------------

    @property
    def num_examples(self) -> int:
        """N, the number of training examples."""
        return _leading_dims(self.inputs, "inputs")

    @property
    def num_params(self) -> int:
        """p, the number of scalar parameters."""
        return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(self.params)))

    @property
    def dtype(self):
        """The dtype of flat parameter vectors (that of ``ravel_pytree(params)``)."""
        return jnp.result_type(*jax.tree_util.tree_leaves(self.params))

    def flat_params(self) -> tuple[Array, Callable]:
        """``(theta_0 flat, unravel)`` as ``jax.flatten_util.ravel_pytree`` gives them."""
        return ravel_pytree(self.params)

    # -- adapters ------------------------------------------------------------------

    @classmethod
    def from_nnx(cls, model, loss_fn, inputs, targets) -> Task:
        """Builds a task from a ``flax.nnx`` module.

        The parameters are the module's ``nnx.Param`` leaves; any other state is
        held fixed. The module must be pure in its forward pass at the snapshot
        (eval mode: no dropout, no running-statistics update).
        """
        from flax import nnx

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls(_NnxApply(graphdef, rest), loss_fn, params, inputs, targets)

    @classmethod
    def from_linen(cls, module, variables, loss_fn, inputs, targets, *, collection: str = "params") -> Task:
        """Builds a task from a ``flax.linen`` module and its variables.

        ``variables[collection]`` are the parameters; other collections (e.g.
        ``batch_stats`` used in eval mode) are held fixed.
        """
        if collection not in variables:
            raise ValueError(
                f"`Task.from_linen`: variables have no {collection!r} collection "
                f"(found {sorted(variables)}); pass collection=..."
            )
        params = variables[collection]
        rest = {k: v for k, v in variables.items() if k != collection}
        return cls(_LinenApply(module, rest, collection), loss_fn, params, inputs, targets)

    @classmethod
    def from_equinox(cls, model, loss_fn, inputs, targets) -> Task:
        """Builds a task from an Equinox model whose ``__call__`` takes one example.

        The parameters are the model's inexact-array leaves; the model is
        batched with ``jax.vmap`` as Equinox layers expect.
        """
        params, static = eqx.partition(model, eqx.is_inexact_array)
        return cls(_EqxApply(static), loss_fn, params, inputs, targets)


class _NnxApply(eqx.Module):
    graphdef: Any = eqx.field(static=True)
    rest: Any

    def __call__(self, params, x):
        from flax import nnx

        return nnx.merge(self.graphdef, params, self.rest)(x)


class _LinenApply(eqx.Module):
    module: Any = eqx.field(static=True)
    rest: Any
    collection: str = eqx.field(static=True)

    def __call__(self, params, x):
        return self.module.apply({**self.rest, self.collection: params}, x)


class _EqxApply(eqx.Module):
    static: Any

    def __call__(self, params, x):
        model = eqx.combine(params, self.static)
        return jax.vmap(model)(x)


def take_examples(task: Task, indices) -> Task:
    """The same model and params on the examples ``indices`` only (inputs and targets gathered)."""
    idx = jnp.asarray(indices)
    take = lambda tree: jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), tree)
    return Task(task.apply_fn, task.loss_fn, task.params, take(task.inputs), take(task.targets))


def _leading_dims(tree, name: str) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"`Task({name}=...)` is empty.")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) > 0 else None for leaf in leaves}
    if None in sizes:
        raise ValueError(f"`Task({name}=...)` must be batched: every array needs a leading example dimension.")
    if len(sizes) != 1:
        raise ValueError(f"`Task({name}=...)` leaves disagree on the number of examples: {sorted(sizes)}.")
    return sizes.pop()


def fingerprint(task: Task) -> str:
    """A SHA-256 fingerprint of a task's parameters and data (structure, shapes, dtypes, values).

    Caches store it, so that a cache is never used with another model or data set.
    """
    import hashlib

    h = hashlib.sha256()
    for name, tree in (("params", task.params), ("inputs", task.inputs), ("targets", task.targets)):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        h.update(name.encode())
        h.update(str(treedef).encode())
        for leaf in leaves:
            arr = np.asarray(leaf)
            h.update(f"{arr.shape}{arr.dtype}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()
