"""Dense symmetric matrices: the operator, the one PSD square root and the eager checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._misc import as_float_array, is_concrete
from .base import AbstractOperator

__all__ = ["Dense", "psd_factor", "psd_sqrt", "check_matrix"]

# Eager definiteness checks cost an eigendecomposition; above this many flops
# (batch × d³) only the cheap checks run.
_EIG_CHECK_FLOPS = 2e9


def psd_factor(M: Float[Array, "*batch d d"]) -> tuple[Array, Array]:
    r"""`(R, V)` with $R = V\Lambda^{1/2}$, $M = V\Lambda V^\top$: a square-root
    factor ($RR^\top = M$) of a symmetric positive semi-definite matrix, through
    `eigh` (negative rounding-level eigenvalues clipped to 0), so singular matrices,
    point masses included, are fine."""
    lam, V = jnp.linalg.eigh(M)
    return V * jnp.sqrt(jnp.clip(lam, 0))[..., None, :], V


def psd_sqrt(M: Float[Array, "*batch d d"]) -> Float[Array, "*batch d d"]:
    r"""The symmetric positive semi-definite square root $M^{1/2} = V\Lambda^{1/2}
    V^\top$ (see `psd_factor`)."""
    R, V = psd_factor(M)
    return R @ jnp.swapaxes(V, -1, -2)


def check_matrix(name: str, M: Array, *, definite: bool) -> None:
    """Eager value checks of a concrete symmetric matrix (or batch of them): finite
    entries, symmetry, positive definiteness (`definite=True`) or
    semi-definiteness. A no-op for traced values. Raises `ValueError` naming `name`."""
    if not is_concrete(M):
        return
    Mn = np.asarray(M)
    if not np.all(np.isfinite(Mn)):
        raise ValueError(f"{name} has non-finite entries (NaN or inf)")
    if Mn.size == 0:
        return
    d = Mn.shape[-1]
    scale = max(float(np.max(np.abs(Mn))), np.finfo(Mn.dtype).tiny)
    eps = np.finfo(Mn.dtype).eps
    asym = float(np.max(np.abs(Mn - np.swapaxes(Mn, -1, -2))))
    if asym > 1e3 * eps * scale:
        raise ValueError(f"{name} is not symmetric (max |M - Mᵀ| = {asym:.3g})")
    if Mn.size // d * d * d > _EIG_CHECK_FLOPS:
        return
    lam = np.linalg.eigvalsh(0.5 * (Mn + np.swapaxes(Mn, -1, -2)))
    smallest = float(np.min(lam))
    if definite and not smallest > 0:
        raise ValueError(f"{name} is not positive definite (smallest eigenvalue {smallest:.3g})")
    if not definite and smallest < -10 * d * eps * scale:
        raise ValueError(
            f"{name} is not positive semi-definite (smallest eigenvalue {smallest:.3g})"
        )


class Dense(AbstractOperator):
    r"""A symmetric matrix held densely: `matrix` `[d, d]`.

    Solves and log-determinants go through a Cholesky factor, the square-root
    factor through `eigh` (`root_mv`), so that positive
    semi-definite matrices can be sampled from.

    **Arguments:**

    - `matrix`: the symmetric `[d, d]` matrix.

    **Raises:** `ValueError` if `matrix` is not square.
    """

    matrix: Float[Array, "d d"]

    def __init__(self, matrix: Float[ArrayLike, "d d"]):
        matrix = as_float_array(matrix, "matrix")
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Dense: matrix must be [d, d], got shape {matrix.shape}")
        self.matrix = matrix

    @property
    def dim(self) -> int:
        return self.matrix.shape[-1]

    @property
    def dtype(self):
        return self.matrix.dtype

    def mv(self, x):
        return self.matrix @ x

    def solve(self, x):
        factor = jax.scipy.linalg.cho_factor(self.matrix, lower=True)
        return jax.scipy.linalg.cho_solve(factor, x)

    def logdet(self):
        L = jnp.linalg.cholesky(self.matrix)
        return 2 * jnp.sum(jnp.log(jnp.diagonal(L)))

    def trace(self):
        return jnp.trace(self.matrix)

    def diagonal_values(self):
        return jnp.diagonal(self.matrix)

    def as_matrix(self):
        return self.matrix

    def scale(self, c):
        return Dense(c * self.matrix)

    @property
    def root_width(self) -> int:
        return self.dim

    def root_mv(self, z):
        return z @ psd_sqrt(self.matrix)  # the root is symmetric

    def check(self, name: str, *, definite: bool) -> None:
        check_matrix(name, self.matrix, definite=definite)
