"""Build a cache once, save it, and answer queries from it in another process.

    python examples/save_and_query.py

The cache file is versioned and checksummed; loading it with the task checks that
it belongs to that model and data (a fingerprint), so a cache is never used with
the wrong model. The second process rebuilds the same task (same training, same
data) and only loads: no gradients of the cache's phases, no solves.
"""

import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_wine

import cif_jax as cj


def make_task():
    """A softmax regression on the wine data, trained by full-batch gradient descent (deterministic)."""
    x, y = load_wine(return_X_y=True)
    x = jnp.asarray((x - x.mean(0)) / x.std(0), jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    params = {"w": jnp.zeros((13, 3)), "b": jnp.zeros(3)}
    apply = lambda p, x: x @ p["w"] + p["b"][None, :]
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()
    grad = jax.jit(jax.grad(lambda p: loss(p) + 1e-3 * jnp.sum(p["w"] ** 2)))
    for _ in range(300):
        params = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grad(params))
    return cj.Task(apply, optax.softmax_cross_entropy_with_integer_labels, params, x, y)


FOLDS = [np.arange(k, 178, 10) for k in range(10)]  # ten interleaved folds of the 178 examples


def answer(path):
    task = make_task()
    cache = cj.load_cache(path, task=task)  # refused if the file is damaged or belongs to another task
    return np.asarray(cj.fold_loss_delta(cache, task, FOLDS))


def main():
    task = make_task()
    cache = cj.build_cache(task, num_clusters=8, sketch_dim=8, damping=1e-2, key=jax.random.key(0))
    here = np.asarray(cj.fold_loss_delta(cache, task, FOLDS))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "wine-cache.npz")
        cj.save_cache(path, cache)
        # The other process trains in the same precision as this one, or its task would differ
        # (and the fingerprint check would refuse the cache, as it should).
        env = dict(os.environ, JAX_ENABLE_X64=str(bool(jax.config.jax_enable_x64)))
        run = subprocess.run([sys.executable, __file__, "--answer", path], capture_output=True, text=True, env=env)
        if run.returncode:
            raise RuntimeError(f"the answering process failed:\n{run.stderr[-2000:]}")
        out = run.stdout
    there = np.array([float(v) for v in out.split()])
    print("fold scores here:   ", np.round(here, 5).tolist())
    print("from the saved file:", np.round(there, 5).tolist())
    print(f"largest difference {np.max(np.abs(here - there)):.2e}")
    return here, there


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--answer":
        print(" ".join(repr(float(v)) for v in answer(sys.argv[2])))
    else:
        main()
