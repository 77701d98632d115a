"""Test configuration: float64 everywhere unless a test asks for float32.

As in lineax's suite, x64 is enabled so that comparisons with dense references
can use tight tolerances, and implicit rank promotion raises.
"""

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Returns a function that hands out fresh, deterministic PRNG keys."""
    counter = iter(range(10**6))

    def _getkey():
        return jax.random.key(next(counter))

    return _getkey
