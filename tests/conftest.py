"""Test configuration: float64 everywhere unless a test asks for float32.

As in lineax's suite, x64 is enabled so that comparisons with dense references
can use tight tolerances, and implicit rank promotion raises.
"""

import os

# XLA's optimisation passes are most of this suite's time: its problems are small, so
# compiling them costs far more than running them (test_lowrank on one core: 143 s,
# 100 s with the passes off, 32 s with every program already compiled). The suite
# compiles with most passes off; set CIF_JAX_TESTS_OPTIMIZED=1 to run it as users
# compile. The environment variable, not jax.config, so that the suite's
# subprocesses (the CLI, the examples, the two-process checks) inherit it. The tests
# that measure memory turn the passes back on (test_memory in its subprocess, the
# others with the `xla_optimized` fixture), since the fusions decide what is
# materialised.
if os.environ.get("CIF_JAX_TESTS_OPTIMIZED", "") != "1":
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Drops JAX's compiled programs after every test module.

    XLA:CPU's compiler (jaxlib 0.10.2) has segfaulted in ``backend_compile_and_load``
    late in long runs of this suite, each time in a different test and never when
    those tests ran alone; every crash came after hundreds of compilations in one
    process. Clearing the caches between modules keeps that state small; modules
    share no compiled programs worth keeping. The suite also runs in one process per
    core (``pytest -n auto --dist loadfile``, pytest-xdist: each file in one worker, so
    module fixtures are built once), which halves each process's compilations; on 2
    cores it ran the suite in 12.7 minutes, where one process had done 39% in 17.
    """
    yield
    jax.clear_caches()


@pytest.fixture
def xla_optimized():
    """XLA's passes on for one test (the suite turns most of them off): for tests that read a compiled
    program's memory, which depends on what the fusions materialise. Read at compile time."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def getkey():
    """Returns a function that hands out fresh, deterministic PRNG keys."""
    counter = iter(range(10**6))

    def _getkey():
        return jax.random.key(next(counter))

    return _getkey
