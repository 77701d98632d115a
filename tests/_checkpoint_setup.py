"""The task and settings of the kill-and-resume test, shared by the test and its child process."""

import warnings

import jax

jax.config.update("jax_enable_x64", True)

from _models import mlp_problem  # noqa: E402

import cif_jax as cj  # noqa: E402

NUM_CLUSTERS = 24
# Blocks of 2 systems: 24 cluster systems + 16 calibration systems make 20 blocks.
SOLVER = cj.CG(rtol=1e-10, rhs_batch_size=2, preconditioner=None)


def build(directory=None, **overrides):
    settings = dict(num_clusters=NUM_CLUSTERS, sketch_dim=8, damping=1e-2, key=jax.random.key(3), solver=SOLVER,
                    correction="calibrated", batch_size=16)
    settings.update(overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="one cluster holds", category=UserWarning)
        return cj.build_cache(mlp_problem().task, checkpoint_dir=directory, **settings)
