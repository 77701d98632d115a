"""STRIDE (issue #8): subsets, features, the operator loss against numpy, scores, bad input."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cif_jax as cj
from cif_jax import stride as st
from cif_jax.models import LeNet5, MLP

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
    from cif_jax import _checks

    subs = _checks.subsets(S, N)
    Xs = st._sketch(jnp.asarray(subs.query_ids), jnp.asarray(subs.indices), R, 12)
    np.testing.assert_allclose(Xs, mask @ np.asarray(R), rtol=1e-12)
    resid = np.asarray(st._residual_projector(Xs, jnp.asarray(1e-2)))
    P = _np_projector(mask, key, 3, 1e-2)
    np.testing.assert_allclose(resid, np.eye(12) - P, atol=1e-10)
    ybar = np.random.default_rng(0).normal(size=12)
    np.testing.assert_allclose(np.sum((resid @ ybar) ** 2), np.sum((ybar - P @ ybar) ** 2), rtol=1e-10)


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
