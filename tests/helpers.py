"""Random problem generators and comparison helpers shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    same_structure = jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(y)
    return same_structure and all(
        np.allclose(a, b, rtol=rtol, atol=atol)
        for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y))
    )


def random_orthogonal(rng, d):
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    return Q * np.sign(np.diag(R))


def random_spd(rng, d, cond=10.0, *, smallest=None):
    """Symmetric positive definite, eigenvalues log-spaced over `cond`, largest 1."""
    V = random_orthogonal(rng, d)
    lam = np.logspace(0, -np.log10(cond), d) if d > 1 else np.ones(1)
    if smallest is not None:
        lam = lam * smallest / lam.min()
    M = (V * lam) @ V.T
    return 0.5 * (M + M.T)


def random_psd(rng, d, rank=None):
    rank = d if rank is None else rank
    B = rng.standard_normal((d, rank)) / np.sqrt(max(rank, 1))
    return B @ B.T


def random_stable(rng, d, cond=10.0, skew=1.0):
    """Non-symmetric A with A + Aᵀ positive definite, hence stable; the symmetric
    part has condition number `cond`, the skew part a comparable scale."""
    S = random_spd(rng, d, cond)
    K = rng.standard_normal((d, d))
    K = skew * (K - K.T) / (2 * np.sqrt(d))
    return S + K


def rel_err(x, ref):
    return float(np.linalg.norm(np.asarray(x) - ref) / np.linalg.norm(ref))


def central_diff(f, x, direction, h=1e-6):
    x = np.asarray(x, dtype=np.float64)
    return (f(x + h * direction) - f(x - h * direction)) / (2 * h)


def f32(x):
    return jnp.asarray(x, jnp.float32)
