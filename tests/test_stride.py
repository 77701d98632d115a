"""STRIDE (issue #8): subsets, features, the operator loss against numpy, scores, bad input."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cif_jax as cj
from cif_jax.estimators import stride as st
from cif_jax.workloads.models import MLP, LeNet5

N, D, C = 12, 3, 3


def _tiny(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    H = rng.normal(size=(N, D)).astype(dtype)
    Z = (H @ rng.normal(size=(D, C))).astype(dtype)
    y = rng.integers(0, C, N).astype(np.int32)
    return H, Z, y


TINY = dict(rank=2, hidden_dim=4, batch_size=None, lambda_stab=0.7, lambda_lin=2.0, sketch_dim=3, lin_ridge=1e-2,
            learning_rate=0.05)


def _subsets(key=0):
    return np.asarray(cj.stride_subsets(jax.random.key(key), N, num_subsets=12, subset_size=4))


# -- numpy reference for eqs. (1)-(6) ---------------------------------------------------


def _np_logsoftmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_phi(enc, H):
    enc = {k: np.asarray(v, np.float64) for k, v in enc.items()}
    if "U" in enc:
        return H @ enc["U"] + enc["u"]
    return np.maximum(H @ enc["V1"] + enc["c1"], 0) @ enc["V2"] + enc["c2"]


def _np_projector(mask, key, s, ridge):
    """Eq. (4) with the inverse written out; R from the documented key schedule."""
    _, k_sketch, _ = jax.random.split(key, 3)
    R = np.asarray(cj.jl_projection(k_sketch, s, mask.shape[1], dtype=jnp.float64)).T
    Xs = mask.astype(np.float64) @ R
    g = ridge * np.trace(Xs.T @ Xs) / s
    return Xs @ np.linalg.inv(Xs.T @ Xs + g * np.eye(s)) @ Xs.T


def _np_terms(enc, A, H, Z, y, mask):
    phi = _np_phi(enc, H)
    A = np.asarray(A, np.float64)
    top = Z.argmax(axis=1)
    fid, stab, ybar = [], [], []
    for k in range(mask.shape[0]):
        delta = phi @ A[k]
        ls1 = _np_logsoftmax(Z + delta)
        ls0 = _np_logsoftmax(Z)
        s, r = mask[k], ~mask[k]
        fid.append(-ls1[s, y[s]].mean())
        stab.append((np.exp(ls0[r]) * (ls0[r] - ls1[r])).sum(axis=1).mean())
        ybar.append(delta[s, top[s]].mean())
    return np.array(fid), np.array(stab), np.array(ybar)


def _np_loss(enc, A, H, Z, y, mask, P, lambda_stab, lambda_lin):
    fid, stab, ybar = _np_terms(enc, A, H, Z, y, mask)
    res = ybar - P @ ybar
    return np.mean(fid + lambda_stab * stab) + lambda_lin * res @ res, (fid, stab, ybar)


def _mask(subsets, n=N):
    m = np.zeros((len(subsets), n), bool)
    m[np.arange(len(subsets))[:, None], subsets] = True
    return m


# -- subsets -----------------------------------------------------------------------------


def test_subsets_rounds_cover_every_example():
    S = np.asarray(cj.stride_subsets(jax.random.key(0), 40, num_subsets=14, subset_size=10))
    assert S.shape == (14, 10) and S.dtype == np.int32
    for j in range(3):  # three complete rounds of 4 blocks: each example exactly once per round
        np.testing.assert_array_equal(np.sort(S[4 * j:4 * j + 4].ravel()), np.arange(40))
    assert len({tuple(np.sort(S[0])), tuple(np.sort(S[4]))}) == 2  # rounds are different permutations
    # m does not divide N: the last block of a round wraps to the start of the same permutation.
    S = np.asarray(cj.stride_subsets(jax.random.key(1), 43, num_subsets=10, subset_size=10))
    for j in range(2):
        block = S[5 * j:5 * j + 5]
        assert set(block.ravel()) == set(range(43))
        perm = np.concatenate(block)[:43]
        np.testing.assert_array_equal(block[-1], np.concatenate([perm, perm])[40:50])
    assert all(len(set(row)) == 10 for row in S)
    # Determinism by key.
    a = cj.stride_subsets(jax.random.key(5), 43, num_subsets=10, subset_size=10)
    np.testing.assert_array_equal(a, cj.stride_subsets(jax.random.key(5), 43, num_subsets=10, subset_size=10))
    assert not np.array_equal(a, cj.stride_subsets(jax.random.key(6), 43, num_subsets=10, subset_size=10))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(num_subsets=3, subset_size=10), "num_subsets >= 4"), (dict(num_subsets=5, subset_size=41), "subset_size"),
     (dict(num_subsets=0, subset_size=10), "num_subsets")],
)
def test_subsets_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cj.stride_subsets(jax.random.key(0), 40, **kwargs)


# -- features ------------------------------------------------------------------------------


def test_nnx_features_and_chunking():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(7, 4, 4, 1)))
    model = MLP(rngs=nnx.Rngs(0), in_features=16, hidden=(6, 5), num_classes=3, param_dtype=jnp.float64)
    h0 = jax.nn.relu(model.hidden_layers[0](x.reshape(7, -1)))
    np.testing.assert_allclose(model.features(x, layer=0), h0, rtol=1e-12)
    np.testing.assert_allclose(model.features(x), jax.nn.relu(model.hidden_layers[1](h0)), rtol=1e-12)
    task = cj.Task.from_nnx(model, optax.softmax_cross_entropy_with_integer_labels, x, jnp.zeros(7, jnp.int32))
    H, Z = cj.stride_features(task, x, feature_fn=cj.nnx_feature_fn(model))
    assert H.shape == (7, 5) and Z.shape == (7, 3) and H.dtype == jnp.float64
    np.testing.assert_allclose(H, model.features(x), rtol=1e-12)
    np.testing.assert_allclose(Z, model(x), rtol=1e-12)
    H3, Z3 = cj.stride_features(task, x, feature_fn=cj.nnx_feature_fn(model), batch_size=3)
    np.testing.assert_allclose(H3, H, rtol=1e-12)
    np.testing.assert_allclose(Z3, Z, rtol=1e-12)
    lenet = LeNet5(rngs=nnx.Rngs(0), in_shape=(8, 8, 1), num_classes=10)
    xi = jnp.ones((2, 8, 8, 1), jnp.float32)
    assert lenet.features(xi).shape == (2, 84) and lenet.features(xi, layer=2).shape == (2, 120)
    with pytest.raises(ValueError, match="layer"):
        lenet.features(xi, layer=4)
    with pytest.raises(ValueError, match="flattened inputs"):
        MLP(rngs=nnx.Rngs(0), in_features=16, hidden=(), num_classes=3).features(x)


# -- the operator loss ---------------------------------------------------------------------


def test_loss_terms_match_numpy_at_init_and_after_steps():
    H, Z, y = _tiny()
    S = _subsets()
    mask = _mask(S)
    key = jax.random.key(7)
    P = _np_projector(mask, key, TINY["sketch_dim"], TINY["lin_ridge"])
    ops1 = cj.stride_fit(H, Z, y, S, key=key, num_steps=1, **TINY)
    ops3 = cj.stride_fit(H, Z, y, S, key=key, num_steps=3, **TINY)
    # At init A = 0: fid_k is the frozen cross-entropy on S_k, stab = lin = 0.
    init, (fid, stab, ybar) = _np_loss(ops1.encoder, jnp.zeros_like(ops1.A), H, Z, y, mask, P, 0.7, 2.0)
    np.testing.assert_allclose(stab, 0.0)
    np.testing.assert_allclose(ops1.loss_history[0], init, rtol=1e-12)
    # After one step the loss is recorded as step 2's loss of the same (deterministic) run.
    after, (fid, stab, ybar) = _np_loss(ops1.encoder, ops1.A, H, Z, y, mask, P, 0.7, 2.0)
    assert np.all(stab > 0) and np.abs(ybar).max() > 0
    np.testing.assert_allclose(ops3.loss_history[1], after, rtol=1e-10)  # measured ~1e-15
    # The library's per-subset terms equal numpy's.
    keys = jax.random.split(jax.random.key(0), 12)
    got = st._loss_terms(ops1.encoder, ops1.A, jnp.asarray(H), jnp.asarray(Z), jnp.asarray(y), jnp.asarray(mask),
                         keys, None, None)
    for g, w in zip(got, (fid, stab, ybar)):
        np.testing.assert_allclose(g, w, rtol=1e-10)
    assert ops3.loss_history[2] < ops3.loss_history[0]
    # Shapes and dtypes.
    assert ops3.A.shape == (12, 2, C) and ops3.membership.shape == (12, N) and ops3.loss_history.shape == (3,)
    assert ops3.A.dtype == ops3.membership.dtype == ops3.loss_history.dtype == jnp.float64
    np.testing.assert_array_equal(ops3.membership, mask)
    np.testing.assert_array_equal(ops3.coverage, mask.sum(0))


def test_linearity_term_and_sketch_eq13():
    H, Z, y = _tiny(1)
    S = _subsets(1)
    mask = _mask(S)
    key = jax.random.key(3)
    _, k_sketch, _ = jax.random.split(key, 3)
    R = cj.jl_projection(k_sketch, 3, N, dtype=jnp.float64).T
    from cif_jax.core import checks as _checks

    subs = _checks.subsets(S, N)
    Xs = st._sketch(jnp.asarray(subs.query_ids), jnp.asarray(subs.indices), R, 12)
    np.testing.assert_allclose(Xs, mask @ np.asarray(R), rtol=1e-12)
    resid = np.asarray(st._residual_projector(Xs, jnp.asarray(1e-2)))
    P = _np_projector(mask, key, 3, 1e-2)
    np.testing.assert_allclose(resid, np.eye(12) - P, atol=1e-10)
    ybar = np.random.default_rng(0).normal(size=12)
    np.testing.assert_allclose(np.sum((resid @ ybar) ** 2), np.sum((ybar - P @ ybar) ** 2), rtol=1e-10)


def _np_example_lin(enc, A, H, Z, mask, key, s, ridge):
    """Eq. (4) per subset, as it types: rows ``R[S_k]`` (|S_k| x s), ``y_k`` the members' responses."""
    _, k_sketch, _ = jax.random.split(key, 3)
    R = np.asarray(cj.jl_projection(k_sketch, s, mask.shape[1], dtype=jnp.float64)).T
    phi, A, top = _np_phi(enc, H), np.asarray(A, np.float64), Z.argmax(axis=1)
    lins = []
    for k in range(mask.shape[0]):
        members = np.flatnonzero(mask[k])
        Xk = R[members]
        g = ridge * np.trace(Xk.T @ Xk) / s
        yk = (phi[members] @ A[k])[np.arange(members.size), top[members]]
        res = Xk @ np.linalg.solve(Xk.T @ Xk + g * np.eye(s), Xk.T @ yk) - yk
        lins.append(res @ res)
    return np.mean(lins)


def test_per_example_linearity_matches_numpy():
    H, Z, y = _tiny(4)
    S = _subsets(4)  # 12 subsets of 4 members; sketch_dim 3 < 4
    mask = _mask(S)
    key = jax.random.key(5)
    kw = {**TINY, "linearity": "example"}
    ops1 = cj.stride_fit(H, Z, y, S, key=key, num_steps=1, **kw)
    ops3 = cj.stride_fit(H, Z, y, S, key=key, num_steps=3, **kw)
    assert ops3.settings["linearity"] == "example"
    # At init A = 0: every response is 0, so the term is 0 and the loss is the subset reading's.
    sub = cj.stride_fit(H, Z, y, S, key=key, num_steps=1, **TINY)
    np.testing.assert_allclose(ops1.loss_history[0], sub.loss_history[0], rtol=1e-12)
    # After one step: fid and stab as before, and the mean over k of ||X~_k (X~_k^T X~_k + g I)^-1 X~_k^T y_k - y_k||^2.
    fid, stab, _ = _np_terms(ops1.encoder, ops1.A, H, Z, y, mask)
    lin = _np_example_lin(ops1.encoder, ops1.A, H, Z, mask, key, TINY["sketch_dim"], TINY["lin_ridge"])
    assert lin > 0
    want = np.mean(fid + TINY["lambda_stab"] * stab) + TINY["lambda_lin"] * lin
    np.testing.assert_allclose(ops3.loss_history[1], want, rtol=1e-10)
    # A list of subsets of unequal sizes is padded, and padding adds nothing.
    uneven = [np.arange(5), np.arange(5, 9), np.array([9, 10, 11, 0])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one round: identical membership columns, as intended here
        ops = cj.stride_fit(H, Z, y, uneven, key=key, num_steps=2, **kw)
        one = cj.stride_fit(H, Z, y, uneven, key=key, num_steps=1, **kw)
    m = np.zeros((3, N), bool)
    for k, s_k in enumerate(uneven):
        m[k, s_k] = True
    fid, stab, _ = _np_terms(one.encoder, one.A, H, Z, y, m)
    lin = _np_example_lin(one.encoder, one.A, H, Z, m, key, TINY["sketch_dim"], TINY["lin_ridge"])
    np.testing.assert_allclose(ops.loss_history[1], np.mean(fid + TINY["lambda_stab"] * stab) + TINY["lambda_lin"] * lin,
                               rtol=1e-10)
    # With minibatches the fidelity and stability terms see a batch, the linearity term every member:
    # the loss's change with lambda_lin is lambda_lin times the all-member numpy term.
    from cif_jax.core import checks as _checks

    subs = _checks.subsets(S, N)
    members, valid = (jnp.asarray(a) for a in st._member_table(subs, 12))
    _, resid, _ = st._setup(key, jnp.asarray(subs.query_ids), jnp.asarray(subs.indices), members, valid,
                            jnp.asarray(TINY["lin_ridge"]), kind="mlp", d=D, hidden=4, rank=2, num_classes=C,
                            num_examples=N, num_subsets=12, sketch_dim=TINY["sketch_dim"], dtype=jnp.dtype("float64"),
                            linearity="example")
    keys = jax.random.split(jax.random.key(2), 12)
    args = ((ops1.encoder, ops1.A), jnp.asarray(H), jnp.asarray(Z), jnp.asarray(y), jnp.asarray(mask), keys, resid,
            members, valid, jnp.asarray(0.7))
    with_lin = st._loss(*args, jnp.asarray(2.0), b_s=2, b_r=2)
    without = st._loss(*args, jnp.asarray(0.0), b_s=2, b_r=2)
    lin = _np_example_lin(ops1.encoder, ops1.A, H, Z, mask, key, TINY["sketch_dim"], TINY["lin_ridge"])
    np.testing.assert_allclose(with_lin - without, 2.0 * lin, rtol=1e-10)
    with pytest.raises(ValueError, match="linearity"):
        cj.stride_fit(H, Z, y, S, key=key, num_steps=1, **{**TINY, "linearity": "member"})
    with pytest.warns(UserWarning, match="at most 4 <= sketch_dim = 4"):
        cj.stride_fit(H, Z, y, S, key=key, num_steps=1, **{**kw, "sketch_dim": 4})


# -- app. E.1: activation steering through the rest of the network ------------------------------


def _tiny_head(seed=6):
    """A nonlinear head ``f(h) = relu(h W1 + b1) W2 + b2`` (so activation steering is not logit steering),
    its numpy twin, and features whose logits it gives."""
    rng = np.random.default_rng(seed)
    W1, b1, W2, b2 = rng.normal(size=(D, 5)), rng.normal(size=5), rng.normal(size=(5, C)), rng.normal(size=C)

    def f(params, h):
        w1, c1, w2, c2 = params
        return jax.nn.relu(h @ w1 + c1[None, :]) @ w2 + c2[None, :]

    head = jax.tree_util.Partial(f, tuple(jnp.asarray(a) for a in (W1, b1, W2, b2)))
    H = rng.normal(size=(N, D))
    y = rng.integers(0, C, N).astype(np.int32)
    return H, np.asarray(head(jnp.asarray(H))), y, head, lambda h: np.maximum(h @ W1 + b1, 0) @ W2 + b2


def _np_act_delta(enc, a_k, H, head_np):
    """``head(h + B(h)^T a_k) - head(h)``, ``B(h)`` the (r, d) reshape of phi(h)."""
    a_k = np.asarray(a_k, np.float64)
    basis = _np_phi(enc, H).reshape(H.shape[0], a_k.size, H.shape[1])
    return head_np(H + np.einsum("brd,r->bd", basis, a_k)) - head_np(H)


def _np_act_loss(enc, A, H, Z, y, mask, P, head_np, lambda_stab, lambda_lin):
    top = Z.argmax(axis=1)
    fid, stab, ybar = [], [], []
    for k in range(mask.shape[0]):
        delta = _np_act_delta(enc, A[k], H, head_np)
        ls1, ls0 = _np_logsoftmax(Z + delta), _np_logsoftmax(Z)
        s, r = mask[k], ~mask[k]
        fid.append(-ls1[s, y[s]].mean())
        stab.append((np.exp(ls0[r]) * (ls0[r] - ls1[r])).sum(axis=1).mean())
        ybar.append(delta[s, top[s]].mean())
    ybar = np.array(ybar)
    res = ybar - P @ ybar
    return np.mean(np.array(fid) + lambda_stab * np.array(stab)) + lambda_lin * res @ res


def test_activation_steering_matches_numpy():
    H, Z, y, head, head_np = _tiny_head()
    S = _subsets(5)
    mask = _mask(S)
    key = jax.random.key(8)
    kw = {**TINY, "steer": "activation", "head": head}
    ops1 = cj.stride_fit(H, Z, y, S, key=key, num_steps=1, **kw)
    ops3 = cj.stride_fit(H, Z, y, S, key=key, num_steps=3, **kw)
    # phi has r d outputs (the basis B(h)), one coefficient vector a_k in R^r per subset.
    assert ops3.encoder["V2"].shape == (4, 2 * D) and ops3.A.shape == (12, 2)
    assert ops3.settings["steer"] == "activation" and ops3.head is head
    # At init a_k = 0: no shift, the loss is the logit reading's (frozen cross-entropy on S_k).
    logit = cj.stride_fit(H, Z, y, S, key=key, num_steps=1, **TINY)
    np.testing.assert_allclose(ops1.loss_history[0], logit.loss_history[0], rtol=1e-12)
    # After one step: eqs. (1)-(6) with Delta_k = f(h + B(h)^T a_k) - f(h), written out.
    P = _np_projector(mask, key, TINY["sketch_dim"], TINY["lin_ridge"])
    want = _np_act_loss(ops1.encoder, ops1.A, H, Z, y, mask, P, head_np, 0.7, 2.0)
    np.testing.assert_allclose(ops3.loss_history[1], want, rtol=1e-10)
    assert ops3.loss_history[2] < ops3.loss_history[0]
    # The responses read the class logit's shift through the head, per subset.
    rng = np.random.default_rng(1)
    Ht, ct = rng.normal(size=(5, D)), rng.integers(0, C, 5)
    Y = np.asarray(cj.stride_responses(ops3, Ht, classes=ct))
    want = np.stack([_np_act_delta(ops3.encoder, ops3.A[k], Ht, head_np)[np.arange(5), ct] for k in range(12)], 1)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(Y, want, rtol=1e-10, atol=1e-13)
    sol = cj.stride_scores(ops3, Ht, classes=ct)
    assert sol.coef.shape == (5, N) and np.isfinite(np.asarray(sol.coef)).all()
    # The per-example linearity term reads the same shifts, member by member: eq. (4) per subset with
    # y_k = Delta_k(x_i)[argmax z_i] over its members, written out.
    ex = {**kw, "linearity": "example"}
    e1 = cj.stride_fit(H, Z, y, S, key=key, num_steps=1, **ex)
    e3 = cj.stride_fit(H, Z, y, S, key=key, num_steps=3, **ex)
    _, k_sketch, _ = jax.random.split(key, 3)
    R = np.asarray(cj.jl_projection(k_sketch, TINY["sketch_dim"], N, dtype=jnp.float64)).T
    top, lins = Z.argmax(axis=1), []
    for k in range(12):
        members = np.flatnonzero(mask[k])
        Xk = R[members]
        g = TINY["lin_ridge"] * np.trace(Xk.T @ Xk) / TINY["sketch_dim"]
        yk = _np_act_delta(e1.encoder, e1.A[k], H[members], head_np)[np.arange(members.size), top[members]]
        res = Xk @ np.linalg.solve(Xk.T @ Xk + g * np.eye(TINY["sketch_dim"]), Xk.T @ yk) - yk
        lins.append(res @ res)
    assert np.mean(lins) > 0
    no_lin = _np_act_loss(e1.encoder, e1.A, H, Z, y, mask, P, head_np, 0.7, 0.0)
    np.testing.assert_allclose(e3.loss_history[1], no_lin + 2.0 * np.mean(lins), rtol=1e-10)


def test_activation_steering_with_an_affine_head_is_a_logit_shift():
    """At the penultimate layer f(h) = h W + b, so the shift is (B(h)^T a_k) W, linear in a_k and free of b:
    a logit steering whose map is constrained to pass through W. The responses are exactly that product."""
    H, Z, y = _tiny(9)
    rng = np.random.default_rng(9)
    W, b = rng.normal(size=(D, C)), rng.normal(size=C)
    head = jax.tree_util.Partial(lambda p, h: h @ p[0] + p[1][None, :], (jnp.asarray(W), jnp.asarray(b)))
    Z = H @ W + b
    ops = cj.stride_fit(H, Z, y, _subsets(9), key=jax.random.key(2), num_steps=4, steer="activation", head=head,
                        **TINY)
    basis = _np_phi(ops.encoder, H).reshape(N, 2, D)
    A = np.asarray(ops.A)
    Y = np.asarray(cj.stride_responses(ops, H, classes=y))
    want = np.einsum("nrd,kr,dc->nkc", basis, A, W)[np.arange(N), :, y]
    np.testing.assert_allclose(Y, want, rtol=1e-10, atol=1e-13)


def test_activation_steering_bad_input():
    H, Z, y, head, _ = _tiny_head()
    S = _subsets(5)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="needs `head`"):
        cj.stride_fit(H, Z, y, S, key=key, steer="activation", **TINY)
    with pytest.raises(ValueError, match="only with steer='activation'"):
        cj.stride_fit(H, Z, y, S, key=key, head=head, **TINY)
    with pytest.raises(ValueError, match="`steer`"):
        cj.stride_fit(H, Z, y, S, key=key, steer="features", head=head, **TINY)
    with pytest.raises(ValueError, match="does not reproduce"):
        cj.stride_fit(H, Z + 1.0, y, S, key=key, steer="activation", head=head, **TINY)
    with pytest.raises(ValueError, match="shape"):
        cj.stride_fit(H, Z, y, S, key=key, steer="activation", head=lambda h: h[:, :2], **TINY)


def test_full_batch_equals_none_and_minibatches_train():
    H, Z, y = _tiny(2)
    S = _subsets(2)
    kw = {**TINY, "lambda_lin": 0.5}
    ref = cj.stride_fit(H, Z, y, S, key=jax.random.key(1), num_steps=4, **kw)
    kw["batch_size"] = N
    big = cj.stride_fit(H, Z, y, S, key=jax.random.key(1), num_steps=4, **kw)
    np.testing.assert_allclose(big.loss_history, ref.loss_history, rtol=1e-10)
    np.testing.assert_allclose(big.A, ref.A, atol=1e-10)
    kw["batch_size"] = 3
    a = cj.stride_fit(H, Z, y, S, key=jax.random.key(1), num_steps=60, **kw)
    b = cj.stride_fit(H, Z, y, S, key=jax.random.key(1), num_steps=60, **kw)
    np.testing.assert_array_equal(a.A, b.A)  # same key, same operators
    assert a.loss_history[-10:].mean() < a.loss_history[:10].mean()
    s1 = cj.stride_scores(a, H[:4], classes=y[:4]).coef
    np.testing.assert_array_equal(s1, cj.stride_scores(b, H[:4], classes=y[:4]).coef)
    # Responses are A_k^T phi(h) read at the class (Alg. 1 l. 9).
    Y = cj.stride_responses(a, H[:4], classes=y[:4])
    phi = _np_phi(a.encoder, H[:4])
    want = np.einsum("qr,krq->qk", phi, np.asarray(a.A)[:, :, y[:4]])
    np.testing.assert_allclose(Y, want, rtol=1e-10)


def test_float32_kept():
    H, Z, y = _tiny(3, np.float32)
    ops = cj.stride_fit(H, Z, y, _subsets(3), key=jax.random.key(0), num_steps=2, encoder="linear", **{
        k: v for k, v in TINY.items() if k != "hidden_dim"})
    assert ops.A.dtype == ops.loss_history.dtype == ops.encoder["U"].dtype == jnp.float32
    sol = cj.stride_scores(ops, H[:2], classes=y[:2], tol=1e-4)
    assert sol.coef.dtype == jnp.float32 and sol.coef.shape == (2, N)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(Z=np.zeros((N - 1, C))), ValueError, "`Z`"),
        (dict(labels=np.zeros(N - 1, np.int32)), ValueError, "`labels`"),
        (dict(labels=np.full(N, C, np.int32)), ValueError, r"\[0, C\)"),
        (dict(H=np.full((N, D), np.nan)), ValueError, "`H`"),
        (dict(Z=np.full((N, C), np.inf)), ValueError, "`Z`"),
        (dict(subsets=[np.arange(3), np.array([], np.int64)]), ValueError, "empty"),
        (dict(subsets=[np.arange(3), np.array([0, N])]), ValueError, "out of range"),
        (dict(subsets=[np.arange(3), np.array([1, 1])]), ValueError, "repeats"),
        (dict(subsets=[np.arange(N)]), ValueError, "complement"),
        (dict(rank=0), ValueError, "rank"),
        (dict(hidden_dim=0), ValueError, "hidden_dim"),
        (dict(num_steps=0), ValueError, "num_steps"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(sketch_dim=0), ValueError, "sketch_dim"),
        (dict(learning_rate=0.0), ValueError, "learning_rate"),
        (dict(lambda_stab=-1.0), ValueError, "lambda_stab"),
        (dict(lambda_lin=-1.0), ValueError, "lambda_lin"),
        (dict(lin_ridge=-1.0), ValueError, "lin_ridge"),
        (dict(encoder="deep"), ValueError, "encoder"),
    ],
)
def test_fit_bad_input(change, exc, match):
    H, Z, y = _tiny()
    args = dict(H=H, Z=Z, labels=y, subsets=_subsets())
    kw = dict(TINY)
    for k, v in change.items():
        (args if k in args else kw)[k] = v
    with pytest.raises(exc, match=match):
        cj.stride_fit(args["H"], args["Z"], args["labels"], args["subsets"], key=jax.random.key(0), **kw)


def test_warnings_and_query_checks():
    H, Z, y = _tiny()
    partition = np.arange(N).reshape(3, 4)
    with pytest.warns(UserWarning) as record:
        ops = cj.stride_fit(H, Z, y, partition[:2], key=jax.random.key(0), num_steps=1, **TINY)
    text = " ".join(str(w.message) for w in record)
    assert "in no subset" in text and "identical columns" in text and "sketch_dim" in text
    with pytest.raises(ValueError, match="d = 3"):
        cj.stride_responses(ops, np.zeros((2, 4)), classes=[0, 1])
    with pytest.raises(ValueError, match="classes"):
        cj.stride_responses(ops, H[:2], classes=np.array([0, C]))
    with pytest.raises(ValueError, match="not both"):
        cj.stride_scores(ops, H[:2], classes=y[:2], alpha=1.0, alpha_ratio=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cj.stride_fit(H, Z, y, _subsets(), key=jax.random.key(0), num_steps=1, **TINY)


# -- closed form: a linear encoder of rank d + 1 steers the logits by any affine map ------


def _gaussian_lr_problem():
    """Frozen multinomial LR on 3 overlapping Gaussian classes (d = 5, n = 600), float64."""
    rng = np.random.default_rng(3)
    n, d, c = 600, 5, 3
    y = np.repeat(np.arange(c), n // c).astype(np.int32)
    means = rng.normal(size=(c, d)) * 0.8
    H = means[y] + rng.normal(size=(n, d))
    fit = _np_lr_fit(H, y, c, np.zeros((n, c)), l2=1e-2)
    Z = np.c_[H, np.ones(n)] @ fit.x.reshape(d + 1, c)
    return H, Z, y


def _np_lr_fit(H, y, c, offset, *, l2=0.0, soft=None, soft_weight=0.0, soft_offset=None):
    """argmin over M of mean CE(y, softmax(offset + [H, 1] M)) (+ soft-target CE on other rows), by L-BFGS."""
    from scipy.optimize import minimize

    X = np.c_[H, np.ones(H.shape[0])]

    def fun(m):
        M = m.reshape(X.shape[1], c)
        lp = _np_logsoftmax(offset + X @ M)
        val = -lp[np.arange(y.size), y].mean() + 0.5 * l2 * np.sum(M[:-1] ** 2)
        grad_logits = np.exp(lp)
        grad_logits[np.arange(y.size), y] -= 1.0
        grad = X.T @ grad_logits / y.size + l2 * np.r_[M[:-1], np.zeros((1, c))]
        if soft is not None:
            Hs, p0 = soft
            Xs = np.c_[Hs, np.ones(Hs.shape[0])]
            lq = _np_logsoftmax(soft_offset + Xs @ M)
            val += soft_weight * np.mean(np.sum(p0 * (np.log(p0) - lq), axis=1))
            grad += soft_weight * Xs.T @ (np.exp(lq) - p0) / Hs.shape[0]
        return val, grad.ravel()

    return minimize(fun, np.zeros(X.shape[1] * c), jac=True, method="L-BFGS-B",
                    options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 20000})


def _steered(ops, H, Z, k):
    phi = H @ np.asarray(ops.encoder["U"]) + np.asarray(ops.encoder["u"])[None, :]
    return Z + phi @ np.asarray(ops.A[k])


@pytest.mark.parametrize("lambda_stab", [0.0, 1.0])
def test_linear_encoder_matches_closed_form_refits(lambda_stab):
    """Rank d + 1 reaches every affine logit shift, so each k solves a convex problem scipy solves exactly.

    lambda_stab = 0: subset k's steered model is an unregularised LR refit on S_k
    alone (the frozen logits only reparametrise it); lambda_stab = 1: fid_k + stab_k
    is convex in the affine map M_k, and the loss must reach scipy's optimum.
    Measured here: probabilities 1.2e-3..6.6e-3 (bound 1e-2), fid 7e-7..4e-5 relative
    (bound 1e-4), the lambda_stab = 1 loss 1.8e-6 relative (bound 1e-4).
    """
    H, Z, y = _gaussian_lr_problem()
    n, c = Z.shape
    subsets = np.asarray(cj.stride_subsets(jax.random.key(0), n, num_subsets=3, subset_size=200))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one partition: identical membership columns
        ops = cj.stride_fit(H, Z, y, subsets, key=jax.random.key(1), encoder="linear", rank=6, lambda_lin=0.0,
                            lambda_stab=lambda_stab, batch_size=None, num_steps=3000, learning_rate=1e-2)
    total, want = 0.0, 0.0
    for k, members in enumerate(subsets):
        rest = np.setdiff1d(np.arange(n), members)
        logits = _steered(ops, H, Z, k)
        fid = -_np_logsoftmax(logits[members])[np.arange(members.size), y[members]].mean()
        if lambda_stab == 0.0:
            ref = _np_lr_fit(H[members], y[members], c, np.zeros((members.size, c)))
            assert ref.success, ref.message
            ref_logits = np.c_[H, np.ones(n)] @ ref.x.reshape(-1, c)
            np.testing.assert_allclose(np.exp(_np_logsoftmax(logits)), np.exp(_np_logsoftmax(ref_logits)), atol=1e-2)
            np.testing.assert_allclose(fid, ref.fun, rtol=1e-4)
        else:
            p0 = np.exp(_np_logsoftmax(Z[rest]))
            ref = _np_lr_fit(H[members], y[members], c, Z[members], soft=(H[rest], p0), soft_weight=1.0,
                             soft_offset=Z[rest])
            assert ref.success, ref.message
            lq = _np_logsoftmax(logits[rest])
            total += fid + np.mean(np.sum(p0 * (np.log(p0) - lq), axis=1))
            want += ref.fun
    if lambda_stab == 1.0:
        np.testing.assert_allclose(total / 3, want / 3, rtol=1e-4)  # measured 1.8e-6
        assert total >= want - 1e-9  # scipy's is the minimum


def test_digits_end_to_end_scores_are_finite():
    """Features from a trained nnx MLP on digits, operators, responses and Lasso scores: finite, right shapes."""
    from cif_jax.workloads import data as cdata
    from cif_jax.workloads.training import train

    ds = cdata.load_dataset("digits", seed=0)
    x = np.asarray(ds.x_train[:300].reshape(300, -1), np.float32)
    y = np.asarray(ds.y_train[:300], np.int32)
    model = MLP(rngs=nnx.Rngs(0), in_features=64, hidden=(32, 16), num_classes=10)
    model, _ = train(model, x, y, epochs=5, learning_rate=0.05, batch_size=64, progress=False)
    task = cj.Task.from_nnx(model, optax.softmax_cross_entropy_with_integer_labels, x, y)
    feature_fn = cj.nnx_feature_fn(model)
    H, Z = cj.stride_features(task, x, feature_fn=feature_fn, batch_size=128)
    assert H.shape == (300, 16) and Z.shape == (300, 10)
    subsets = cj.stride_subsets(jax.random.key(0), 300, num_subsets=40, subset_size=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few examples share all 4 rounds' blocks by chance
        ops = cj.stride_fit(H, Z, y, subsets, key=jax.random.key(1), rank=8, num_steps=20, sketch_dim=16)
    xt = np.asarray(ds.x_test[:7].reshape(7, -1), np.float32)
    Ht, Zt = cj.stride_features(task, xt, feature_fn=feature_fn)
    sol = cj.stride_scores(ops, Ht, classes=np.asarray(jnp.argmax(Zt, axis=1)))
    assert sol.coef.shape == (7, 300)
    assert np.all(np.isfinite(np.asarray(sol.coef)))
