"""Flax linen: find mislabelled training examples by their self-influence, from one CiF cache.

    python examples/linen_mislabels.py

Wine data (scikit-learn, bundled), 10% of the training labels flipped on purpose, a
linen MLP trained with optax. An example's self-influence (how much removing it
changes its own loss) is large when the model has had to bend to fit it; the
cache answers it for every example at once (`cj.self_influence`, the default
estimator). We report how many of the flipped labels are among the top-ranked.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_wine

import cif_jax as cj


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(16)(x)))


def main(steps: int = 1500, flip_fraction: float = 0.1, seed: int = 0):
    x, y = load_wine(return_X_y=True)
    x = jnp.asarray((x - x.mean(0)) / x.std(0), jnp.float32)
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(y), int(flip_fraction * len(y)), replace=False)
    y = y.copy()
    y[flipped] = (y[flipped] + rng.integers(1, 3, flipped.size)) % 3  # a different class
    y = jnp.asarray(y, jnp.int32)

    module = MLP()
    variables = module.init(jax.random.key(seed), x[:1])
    optimizer = optax.adam(1e-2)
    state = optimizer.init(variables)

    @jax.jit
    def step(variables, state):
        def loss(v):
            return optax.softmax_cross_entropy_with_integer_labels(module.apply(v, x), y).mean()

        value, grads = jax.value_and_grad(loss)(variables)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(variables, updates), state, value

    for _ in range(steps):
        variables, state, value = step(variables, state)
    print(f"trained: mean loss {float(value):.4f} with {flipped.size} flipped labels")

    task = cj.Task.from_linen(module, variables, optax.softmax_cross_entropy_with_integer_labels, x, y)
    cache = cj.build_cache(task, num_clusters=10, sketch_dim=16, damping=1e-3, key=jax.random.key(1))
    scores = np.asarray(cj.self_influence(cache, task))
    top = np.argsort(-scores)[: flipped.size]
    found = np.intersect1d(top, flipped).size
    print(f"flipped labels among the {flipped.size} largest self-influences: {found} "
          f"(chance: {flipped.size ** 2 / len(y):.1f})")
    return found, flipped.size


if __name__ == "__main__":
    main()
