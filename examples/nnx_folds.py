"""Flax nnx: train in your own optax loop, build a CiF cache, rank cross-validation folds, check against IF.

    python examples/nnx_folds.py

Digits (scikit-learn's bundled 8x8 images), a small MLP, 30 folds of the training
set: which fold, removed, would change its own loss most? CiF answers all folds from
one cache; per-query IF (one damped-GGN solve per fold) checks a few of them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import cif_jax as cj


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 32, rngs=rngs)
        self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def main(num_train: int = 1000, epochs: int = 200, num_folds: int = 30, checked: int = 5):
    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x[:num_train] / 16.0, jnp.float32), jnp.asarray(y[:num_train], jnp.int32)
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    for _ in range(epochs):
        final = step(model, optimizer)
    print(f"trained: mean loss {float(final):.4f}")

    task = cj.Task.from_nnx(model, optax.softmax_cross_entropy_with_integer_labels, x, y)
    cache = cj.build_cache(task, num_clusters=10, sketch_dim=32, damping=1e-3, key=jax.random.key(0),
                           batch_size=500)
    print(f"cache: {cache.num_clusters} clusters, solver {cache.solver}")
    folds = np.array_split(np.random.default_rng(0).permutation(num_train), num_folds)
    scores = np.asarray(cj.fold_loss_delta(cache, task, folds, batch_size=500))
    ranking = np.argsort(-scores)
    print("folds whose removal raises their own loss most:", ranking[:5].tolist())

    exact = cj.influence(task, [folds[i] for i in ranking[:checked]], damping=1e-3, batch_size=500)
    g = cj.mean_subset_gradients(task, [folds[i] for i in ranking[:checked]], batch_size=500)
    if_scores = np.asarray(jnp.sum(exact * g, axis=1))
    ratio = scores[ranking[:checked]] / if_scores
    print(f"CiF / IF on the top {checked} folds: {np.round(ratio, 3).tolist()}")
    return scores, if_scores, ratio


if __name__ == "__main__":
    main()
