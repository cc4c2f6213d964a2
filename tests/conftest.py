import os

# One OpenBLAS thread: jaxlib's batched LAPACK kernels (eigh, cholesky, lu, trsm) split
# a batch over XLA's thread pool and call SciPy's OpenBLAS from each piece; on a small
# machine the two thread pools oversubscribe the cores, and two batched LAPACK calls at
# once can deadlock the pool (seen with gdb on this 2-core machine; see
# benchmarks/README.md). Must be set before OpenBLAS is loaded.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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
