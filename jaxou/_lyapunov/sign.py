"""The matrix-sign-function solver, for any stable A, on any device."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .base import AbstractLyapunovSolver, LyapunovResult, LyapunovSolution, check_rtol
from .dense import check_dense, dense_solution

__all__ = ["MatrixSign"]


def _sign_kernel(A: Array, Q: Array, max_steps) -> tuple[Array, Array]:
    """Newton's iteration for the sign of Z = [[A, -Q], [0, -Aᵀ]]: sign(Z) =
    [[I, -2X], [0, -I]] when A is stable. In block form the step Z ← (Z + Z⁻¹)/2 is

        A ← (c A + A⁻¹/c) / 2,    Q ← (c Q + A⁻¹ Q A⁻ᵀ / c) / 2,

    with determinant scaling c = |det A|^(-1/d) while far from convergence. A tends
    to sign(A), whose eigenvalues are ±1 (+1 for each stable eigenvalue), and Q to 2X.
    """
    d = A.shape[-1]
    eye = jnp.eye(d, dtype=A.dtype)
    tol = 10 * d * jnp.finfo(A.dtype).eps

    def converged(err, prev_err):
        # At the tolerance, or quadratic convergence stalled at rounding level.
        return (err <= tol) | ((err < 1e-3) & (err > 0.5 * prev_err))

    def cond(state):
        k, _, _, err, prev_err = state
        return (k < max_steps) & ~converged(err, prev_err)

    def body(state):
        k, Ak, Qk, err, _ = state
        lu, piv = jax.scipy.linalg.lu_factor(Ak)  # the one LU of the iteration
        Ainv = jax.scipy.linalg.lu_solve((lu, piv), eye)
        logdet = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(lu))))
        c = jnp.where(err > 1e-2, jnp.exp(-logdet / d), 1.0).astype(A.dtype)
        Anew = 0.5 * (c * Ak + Ainv / c)
        Qnew = 0.5 * (c * Qk + Ainv @ Qk @ Ainv.T / c)
        new_err = jnp.linalg.norm(Anew - Ak) / jnp.maximum(jnp.linalg.norm(Anew), 1)
        return k + 1, Anew, Qnew, new_err.astype(A.dtype), err

    inf = jnp.asarray(jnp.inf, A.dtype)
    _, Ak, Qk, err, prev_err = lax.while_loop(cond, body, (0, A, Q, inf, inf))
    # The trace of sign(A) is (#stable - #unstable eigenvalues): d iff A is stable.
    stable = jnp.trace(Ak) > d - 1
    # A singular iterate: A has an eigenvalue on the imaginary axis (or at zero).
    singular = ~(jnp.all(jnp.isfinite(Ak)) & jnp.all(jnp.isfinite(Qk)))
    done = converged(err, prev_err)
    result = jnp.where(
        singular | (done & ~stable),
        LyapunovResult.UNSTABLE,
        jnp.where(done, LyapunovResult.SUCCESSFUL, LyapunovResult.NOT_CONVERGED),
    )
    return 0.5 * Qk, result.astype(jnp.int32)


class MatrixSign(AbstractLyapunovSolver):
    r"""Any stable $A$: the scaled Newton iteration for the matrix sign function of
    $\begin{bmatrix}A & -Q\\ 0 & -A^\top\end{bmatrix}$ (Roberts 1980; Benner &
    Quintana-Ortí 1999).

    Only LU factorisations and matrix products, so it runs well on GPUs and TPUs
    (no Schur form, no non-symmetric eigendecomposition); one LU and about four
    products per step, quadratic convergence, typically 8–15 steps. It stops at
    convergence or when rounding stalls it.

    It is not backward stable: for a nearly singular $A$ (an isolated eigenvalue
    close to zero, say) its residual can be orders of magnitude above that of a
    Bartels–Stewart solve. Its residual check catches that and reports
    `INACCURATE`; [`jaxou.Kronecker`][] (small $d$) or [`jaxou.Eigh`][]
    (symmetric $A$) are then the solvers to use.

    **Arguments:**

    - `max_steps`: the most Newton steps; running out of them is
      `NOT_CONVERGED` (an eigenvalue of $A$ close to the imaginary axis).
    - `rtol`: the largest relative residual accepted as `SUCCESSFUL`; `None`
      (default) for $\min(1000\,d\,\varepsilon, \sqrt\varepsilon)$.

    **References:** J. D. Roberts (1980), Linear model reduction and solution of
    the algebraic Riccati equation by use of the sign function, *International
    Journal of Control* 32(4); P. Benner & E. S. Quintana-Ortí (1999), Solving
    stable generalized Lyapunov equations with the matrix sign function,
    *Numerical Algorithms* 20.
    """

    max_steps: int = 100
    rtol: float | None = None

    def __check_init__(self):
        check_rtol("MatrixSign", self.rtol)
        if isinstance(self.max_steps, int) and self.max_steps < 1:
            raise ValueError(f"MatrixSign: max_steps must be >= 1, got {self.max_steps}")

    def solve(self, A: Float[ArrayLike, "d d"], Q: Float[ArrayLike, "d d"]) -> LyapunovSolution:
        A, Q = check_dense(A, Q, "MatrixSign.solve")
        return _sign_solve(A, Q, self.max_steps, self.rtol)


@eqx.filter_jit
def _sign_solve(A: Array, Q: Array, max_steps: int, rtol: float | None) -> LyapunovSolution:
    # Jitted so that eager calls hit the compile cache.
    return dense_solution(lambda a, q: _sign_kernel(a, q, max_steps), A, Q, rtol)
