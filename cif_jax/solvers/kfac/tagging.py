"""Finding the dense and convolution layers of ``apply_fn`` in its jaxpr, and their inputs."""

from __future__ import annotations

import contextlib
import functools
import operator

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax

from ...core.task import Task
from .blocks import _HIGHEST, _Layout

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
