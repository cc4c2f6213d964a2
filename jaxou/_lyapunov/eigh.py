"""The eigendecomposition solver, for symmetric A."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .base import (
    AbstractLyapunovSolver,
    LyapunovResult,
    LyapunovSolution,
    check_rtol,
    default_rtol,
)
from .dense import check_dense, dense_solution

__all__ = ["Eigh"]


def _eigh_kernel(A: Array, Q: Array) -> tuple[Array, Array]:
    """A = V Λ Vᵀ (its symmetric part): X = V [(Vᵀ Q V)_ij / (λ_i + λ_j)] Vᵀ."""
    # jnp.linalg.eigh symmetrises its input itself ((A + Aᵀ)/2, symmetrize_input=True).
    lam, V = jnp.linalg.eigh(A)
    Qt = V.T @ Q @ V
    X = V @ (Qt / (lam[:, None] + lam[None, :])) @ V.T
    # Symmetric A is stable iff it is positive definite.
    result = jnp.where(lam[0] > 0, LyapunovResult.SUCCESSFUL, LyapunovResult.UNSTABLE)
    return X, result.astype(jnp.int32)


class Eigh(AbstractLyapunovSolver):
    r"""Symmetric $A = V\Lambda V^\top$:
    $X = V\big[(V^\top Q V)_{ij} / (\lambda_i + \lambda_j)\big] V^\top$.

    One symmetric eigendecomposition and four products, $O(d^3)$; the fastest
    solver, and backward stable. It reads only the symmetric part of $A$, but its
    residual check uses $A$ itself, so a non-symmetric $A$ (beyond `rtol`) comes
    back `INACCURATE` rather than as the solution of a different equation. Its
    result is `UNSTABLE` when $A$ (symmetric) is not positive definite.

    **Arguments:**

    - `rtol`: the largest relative residual accepted as `SUCCESSFUL`; `None`
      (default) for $\min(1000\,d\,\varepsilon, \sqrt\varepsilon)$.
    """

    rtol: float | None = None

    def __check_init__(self):
        check_rtol("Eigh", self.rtol)

    def solve(self, A: Float[ArrayLike, "d d"], Q: Float[ArrayLike, "d d"]) -> LyapunovSolution:
        A, Q = check_dense(A, Q, "Eigh.solve")
        return _eigh_solve(A, Q, self.rtol)


@eqx.filter_jit
def _eigh_solve(A: Array, Q: Array, rtol: float | None) -> LyapunovSolution:
    # Jitted so that eager calls hit the compile cache.
    # L(X) = AX + XAᵀ is self-adjoint (Frobenius inner product) for symmetric A.
    sol = dense_solution(_eigh_kernel, A, Q, rtol, self_adjoint=True)
    # An indefinite symmetric part says nothing about the stability of a
    # non-symmetric A: then the result is INACCURATE, not UNSTABLE.
    rtol = default_rtol(A.dtype, A.shape[-1]) if rtol is None else rtol
    asym = jnp.linalg.norm(A - A.T) / jnp.maximum(2 * jnp.linalg.norm(A), jnp.finfo(A.dtype).tiny)
    unfounded = (sol.result == LyapunovResult.UNSTABLE) & (asym > rtol)
    result = jnp.where(unfounded, LyapunovResult.INACCURATE, sol.result).astype(jnp.int32)
    return eqx.tree_at(lambda s: s.result, sol, result)
