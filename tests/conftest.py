import zlib

import jax
import numpy as np
import pytest

# References and tests run in float64; float32 tests ask for float32 explicitly.
jax.config.update("jax_enable_x64", True)


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def rng(request):
    # A fresh but reproducible generator per test: seeded from the test's name.
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
