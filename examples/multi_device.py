"""Several devices: the cache's C solves spread over a device mesh, with the same answers as one device.

    python examples/multi_device.py

Without GPUs, XLA can split the CPU into host devices (`--xla_force_host_platform_device_count`); the flag must be
set before jax is imported, which this script does when it is run directly. The mesh's axis "rhs" spreads the
cluster systems (each device runs its own CG on its share); an axis "data" would also spread the examples of every
GGN product. On GPUs or TPUs the same code spreads the work over real devices.
"""

import os

if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax
import jax.numpy as jnp
import optax
from sklearn.datasets import load_digits

import cif_jax as cj


def main(num_train: int = 600, num_clusters: int = 16):
    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x[:num_train] / 16.0, jnp.float32), jnp.asarray(y[:num_train], jnp.int32)
    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
    apply = lambda p, x: x @ p["w"] + p["b"][None, :]
    grad = jax.jit(jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()))
    for _ in range(200):
        params = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grad(params))
    task = cj.Task(apply, optax.softmax_cross_entropy_with_integer_labels, params, x, y)

    mesh = cj.solver_mesh()  # every device on the axis "rhs"
    print(f"{len(jax.devices())} devices: {[str(d) for d in jax.devices()]}")
    settings = dict(num_clusters=num_clusters, sketch_dim=16, damping=1e-3, key=jax.random.key(0), correction=None)
    spread = cj.build_cache(task, mesh=mesh, **settings)
    alone = cj.build_cache(task, **settings)
    gap = float(jnp.max(jnp.linalg.norm(spread.responses - alone.responses, axis=1)
                        / jnp.linalg.norm(alone.responses, axis=1)))
    print(f"responses on {len(jax.devices())} devices against one: largest relative difference {gap:.2e} "
          f"(both solved to a true residual of {spread.rtol:g})")
    return len(jax.devices()), gap


if __name__ == "__main__":
    main()
