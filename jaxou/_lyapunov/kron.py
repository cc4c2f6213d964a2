"""The direct Kronecker solver, for small d."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .base import AbstractLyapunovSolver, LyapunovResult, LyapunovSolution, check_rtol
from .dense import check_dense, dense_solution

__all__ = ["Kronecker"]


def _kron_kernel(A: Array, Q: Array) -> tuple[Array, Array]:
    """Direct solve of (A ⊗ I + I ⊗ A) vec(X) = vec(Q) (row-major vec), O(d⁶).

    A second right-hand side solves A P + P Aᵀ = I with the same factorisation: by
    Lyapunov's theorem A is stable iff P is positive definite, which a Cholesky
    factorisation tells.
    """
    d = A.shape[-1]
    eye = jnp.eye(d, dtype=A.dtype)
    M = jnp.kron(A, eye) + jnp.kron(eye, A)
    rhs = jnp.stack([Q.reshape(-1), eye.reshape(-1)], axis=-1)
    sol = jnp.linalg.solve(M, rhs)
    X = sol[:, 0].reshape(d, d)
    P = sol[:, 1].reshape(d, d)
    chol = jnp.linalg.cholesky(0.5 * (P + P.T))
    stable = jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.diagonal(chol) > 0)
    result = jnp.where(stable, LyapunovResult.SUCCESSFUL, LyapunovResult.UNSTABLE)
    return X, result.astype(jnp.int32)


class Kronecker(AbstractLyapunovSolver):
    r"""Any stable $A$, small $d$: the direct $d^2 \times d^2$ linear system
    $(A \otimes I + I \otimes A)\,\mathrm{vec}\,X = \mathrm{vec}\,Q$, one LU
    factorisation with partial pivoting.

    Backward stable and a reference, but $O(d^6)$ work and $O(d^4)$ memory: for
    $d \le 8$ it is the fastest general solver, beyond a few tens it is too large
    to be useful. A second right-hand side, $AP + PA^\top = I$, tells stability
    (Lyapunov's theorem: $A$ is stable iff $P$ is positive definite).

    **Arguments:**

    - `rtol`: the largest relative residual accepted as `SUCCESSFUL`; `None`
      (default) for $\min(1000\,d\,\varepsilon, \sqrt\varepsilon)$.
    """

    rtol: float | None = None

    def __check_init__(self):
        check_rtol("Kronecker", self.rtol)

    def solve(self, A: Float[ArrayLike, "d d"], Q: Float[ArrayLike, "d d"]) -> LyapunovSolution:
        A, Q = check_dense(A, Q, "Kronecker.solve")
        return _kron_solve(A, Q, self.rtol)


@eqx.filter_jit
def _kron_solve(A: Array, Q: Array, rtol: float | None) -> LyapunovSolution:
    # Jitted so that eager calls hit the compile cache.
    return dense_solution(_kron_kernel, A, Q, rtol)
