"""`Task.from_nnx`, `Task.from_linen`, `Task.from_equinox` against a hand-written pure function.

The same two-layer tanh network (weights K1, b1, K2, b2, a fixed output offset
for the flax models) is built in each framework with weights set explicitly,
and written by hand as a function of a dict of arrays. The hand version's
gradients and Jacobians are mapped, leaf by leaf through each leaf's path, into
the ``ravel_pytree`` order of the adapter's params: that order is the library's
contract for flat parameter vectors.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import (
    LAM,
    RTOL,
    N,
    ce_output_hessian,
    ce_single,
    cross_entropy,
    dense_solve,
    masks_of,
    random_subsets,
    row_rel_err,
)
from flax import nnx

import cif_jax as cj

IN, HIDDEN, OUT = 3, 5, 3
_rng = np.random.default_rng(11)
WEIGHTS = {
    "k1": _rng.normal(size=(IN, HIDDEN)) / np.sqrt(IN),
    "b1": 0.1 * _rng.normal(size=HIDDEN),
    "k2": _rng.normal(size=(HIDDEN, OUT)) / np.sqrt(HIDDEN),
    "b2": 0.1 * _rng.normal(size=OUT),
}
OFFSET = np.array([0.5, -0.25, 1.0])  # held-fixed, non-parameter state of the flax models
X = _rng.normal(size=(N, IN))
Y = _rng.integers(0, OUT, N).astype(np.int32)


def hand_output(w, x, offset):
    """One example, by hand: tanh(x K1 + b1) K2 + b2 + offset."""
    return jnp.tanh(x @ w["k1"] + w["b1"]) @ w["k2"] + w["b2"] + offset


# -- the three framework versions -------------------------------------------------------------


class Offset(nnx.Variable):
    pass


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(IN, HIDDEN, param_dtype=jnp.float64, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, OUT, param_dtype=jnp.float64, rngs=rngs)
        self.offset = Offset(jnp.zeros(OUT))

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x))) + self.offset[...][None, :]


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        offset = self.variable("consts", "offset", jnp.zeros, (OUT,))
        hidden = jnp.tanh(nn.Dense(HIDDEN, param_dtype=jnp.float64, name="hidden")(x))
        return nn.Dense(OUT, param_dtype=jnp.float64, name="out")(hidden) + offset.value[None, :]


def _nnx_task():
    model = NnxMLP(nnx.Rngs(0))
    model.hidden.kernel = nnx.Param(jnp.asarray(WEIGHTS["k1"]))
    model.hidden.bias = nnx.Param(jnp.asarray(WEIGHTS["b1"]))
    model.out.kernel = nnx.Param(jnp.asarray(WEIGHTS["k2"]))
    model.out.bias = nnx.Param(jnp.asarray(WEIGHTS["b2"]))
    model.offset = Offset(jnp.asarray(OFFSET))
    task = cj.Task.from_nnx(model, cross_entropy, X, Y)
    layout = {("hidden", "kernel"): ("k1", False), ("hidden", "bias"): ("b1", False),
              ("out", "kernel"): ("k2", False), ("out", "bias"): ("b2", False)}
    return task, layout, OFFSET


def _linen_task():
    module = LinenMLP()
    variables = {
        "params": {"hidden": {"kernel": jnp.asarray(WEIGHTS["k1"]), "bias": jnp.asarray(WEIGHTS["b1"])},
                   "out": {"kernel": jnp.asarray(WEIGHTS["k2"]), "bias": jnp.asarray(WEIGHTS["b2"])}},
        "consts": {"offset": jnp.asarray(OFFSET)},
    }
    init = module.init(jax.random.key(0), jnp.asarray(X[:2]))
    assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(variables)
    task = cj.Task.from_linen(module, variables, cross_entropy, X, Y)
    layout = {("hidden", "kernel"): ("k1", False), ("hidden", "bias"): ("b1", False),
              ("out", "kernel"): ("k2", False), ("out", "bias"): ("b2", False)}
    return task, layout, OFFSET


def _equinox_task():
    model = eqx.nn.MLP(IN, OUT, HIDDEN, depth=1, activation=jnp.tanh, key=jax.random.key(0))
    # eqx.nn.Linear computes weight @ x + bias, weight of shape (out, in): K transposed.
    model = eqx.tree_at(
        lambda m: (m.layers[0].weight, m.layers[0].bias, m.layers[1].weight, m.layers[1].bias),
        model,
        tuple(jnp.asarray(a) for a in (WEIGHTS["k1"].T, WEIGHTS["b1"], WEIGHTS["k2"].T, WEIGHTS["b2"])),
    )
    task = cj.Task.from_equinox(model, cross_entropy, X, Y)
    layout = {("layers", "0", "weight"): ("k1", True), ("layers", "0", "bias"): ("b1", False),
              ("layers", "1", "weight"): ("k2", True), ("layers", "1", "bias"): ("b2", False)}
    return task, layout, np.zeros(OUT)


@pytest.fixture(scope="module", params=["nnx", "linen", "equinox"])
def adapter(request):
    return {"nnx": _nnx_task, "linen": _linen_task, "equinox": _equinox_task}[request.param]()


# -- references -------------------------------------------------------------------------------


def _names(path):
    out = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            out.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            out.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            out.append(str(entry.idx))
    return tuple(name for name in out if name != "value")  # nnx.Variable keeps its array in `.value`


def _to_adapter_order(task, layout, per_example):
    """Concatenates hand-layout arrays (N, ..., leaf shape) into the adapter's ravel_pytree order."""
    blocks = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(task.params)[0]:
        name, transposed = layout[_names(path)]
        block = np.asarray(per_example[name])
        if transposed:
            block = np.swapaxes(block, -1, -2)
        lead = block.shape[: block.ndim - np.ndim(leaf)]
        assert block.shape[len(lead):] == np.shape(leaf), (path, block.shape, np.shape(leaf))
        blocks.append(block.reshape(*lead, -1))
    return np.concatenate(blocks, axis=-1)


def _hand_references(task, layout, offset):
    w = {k: jnp.asarray(v) for k, v in WEIGHTS.items()}
    offset = jnp.asarray(offset)

    def loss(wts, x, y):
        return ce_single(hand_output(wts, x, offset), y)

    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(w, jnp.asarray(X), jnp.asarray(Y))
    jac = jax.vmap(jax.jacfwd(hand_output), in_axes=(None, 0, None))(w, jnp.asarray(X), offset)
    logits = np.asarray(jax.vmap(hand_output, in_axes=(None, 0, None))(w, jnp.asarray(X), offset))
    g = _to_adapter_order(task, layout, grads)
    j = _to_adapter_order(task, layout, jac)  # (N, q, p)
    out_hess = np.stack([ce_output_hessian(z, y) for z, y in zip(logits, Y)])
    ggn = np.einsum("nqi,nqr,nrj->ij", j, out_hess, j) / N + LAM * np.eye(g.shape[1])
    return g, ggn


def test_adapter_gradients_match_hand_written(adapter):
    task, layout, offset = adapter
    p = IN * HIDDEN + HIDDEN + HIDDEN * OUT + OUT
    assert task.num_params == p  # the offset is held fixed, not a parameter
    want, _ = _hand_references(task, layout, offset)
    got = cj.per_example_grads(task)
    assert got.shape == (N, p) and got.dtype == jnp.float64
    assert row_rel_err(got, want) < 1e-12


def test_influence_runs_through_adapter(adapter):
    task, layout, offset = adapter
    grads, ggn = _hand_references(task, layout, offset)
    subsets = random_subsets()
    want = dense_solve(ggn, masks_of(subsets).astype(np.float64) @ grads) / N
    got = cj.influence(task, subsets, damping=LAM, solver=cj.CG(rtol=RTOL))
    assert row_rel_err(got, want) < 1e-9


def test_from_linen_names_a_missing_collection():
    with pytest.raises(ValueError, match="no 'weights' collection"):
        cj.Task.from_linen(LinenMLP(), {"params": {}}, cross_entropy, X, Y, collection="weights")
