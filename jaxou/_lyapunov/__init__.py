"""Layer 1: continuous Lyapunov solvers and the OU flow (e^{-At} and its noise integral).

Every solver here solves

    A X + X Aᵀ = Q

for a *stable* A, meaning every eigenvalue of A has a positive real part (so that
-A is Hurwitz and dX = -A X dt + ... is mean-reverting). This is SciPy's sign
convention (`scipy.linalg.solve_continuous_lyapunov(A, Q)`); python-control's
`lyap(A, Q)` solves A X + X Aᵀ + Q = 0 instead, i.e. the opposite sign of Q.

Derivatives never go through the eigenvectors or the iterations: the solve is
wrapped in `jax.lax.custom_linear_solve`, so its JVP and VJP are themselves
Lyapunov solves (the adjoint equation Aᵀ Y + Y A = W), which stays finite and
exact for repeated eigenvalues (an isotropic Hessian, say).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from .._misc import as_float_array, common_float_dtype, is_symmetric

__all__ = [
    "LyapunovStatus",
    "lyapunov",
]

_KRON_MAX_DIM = 8  # "auto" uses the direct Kronecker solve up to this dimension.


class LyapunovStatus(enum.IntEnum):
    """Status codes returned by [`jaxou.lyapunov`][] with `throw=False`."""

    SUCCESS = 0
    UNSTABLE = 1  # an eigenvalue of A has a non-positive real part
    NOT_CONVERGED = 2  # the sign iteration did not converge (A near-unstable?)


_STATUS_MESSAGE = (
    "lyapunov: the drift matrix A is not stable (an eigenvalue has a non-positive "
    "real part), so A X + X Aᵀ = Q has no stationary solution; or the general "
    "solver did not converge. Pass throw=False to get a status instead."
)



# ---------------------------------------------------------------------------
# The three solvers, each for a single (d, d) problem, returning (X, status).


def _eigh_solve(A: Array, Q: Array) -> tuple[Array, Array]:
    """Symmetric A = V Λ Vᵀ: X = V [(Vᵀ Q V)_ij / (λ_i + λ_j)] Vᵀ."""
    # jnp.linalg.eigh symmetrises its input itself ((A + Aᵀ)/2, symmetrize_input=True),
    # so no second copy here; the result is bit-for-bit the same as symmetrising twice.
    lam, V = jnp.linalg.eigh(A)
    Qt = V.T @ Q @ V
    X = V @ (Qt / (lam[:, None] + lam[None, :])) @ V.T
    status = jnp.where(lam[0] > 0, LyapunovStatus.SUCCESS, LyapunovStatus.UNSTABLE)
    return X, status.astype(jnp.int32)


def _kron_solve(A: Array, Q: Array) -> tuple[Array, Array]:
    """Direct solve of (A ⊗ I + I ⊗ A) vec(X) = vec(Q) (row-major vec), O(d⁶).

    A second right-hand side solves A P + P Aᵀ = I with the same factorisation:
    by Lyapunov's theorem A is stable iff P is positive definite, which a
    Cholesky factorisation tells.
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
    status = jnp.where(stable, LyapunovStatus.SUCCESS, LyapunovStatus.UNSTABLE)
    return X, status.astype(jnp.int32)


def _sign_solve(A: Array, Q: Array, max_iter: int = 100) -> tuple[Array, Array]:
    """Matrix-sign-function Newton iteration (Roberts 1980; Benner & Quintana-Ortí
    1999), using only LU factorisations and products, so it runs on GPU/TPU.

    With Z = [[A, -Q], [0, -Aᵀ]], sign(Z) = [[I, -2X], [0, -I]]; the Newton step
    Z ← (Z + Z⁻¹)/2 in block form is

        A ← (c A + A⁻¹/c) / 2,    Q ← (c Q + A⁻¹ Q A⁻ᵀ / c) / 2,

    with determinant scaling c = |det A|^(-1/d) while far from convergence. A
    tends to sign(A), which is I exactly when A is stable, and Q to 2X.
    """
    d = A.shape[-1]
    eye = jnp.eye(d, dtype=A.dtype)
    eps = jnp.finfo(A.dtype).eps
    tol = 10 * d * eps

    def cond(state):
        k, _, _, err, prev_err = state
        # Stop on convergence, or when quadratic convergence stalls at rounding level.
        stalled = (err < 1e-3) & (err > 0.5 * prev_err)
        return (k < max_iter) & (err > tol) & ~stalled

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

    init = (0, A, Q, jnp.asarray(jnp.inf, A.dtype), jnp.asarray(jnp.inf, A.dtype))
    k, Ak, Qk, err, _ = lax.while_loop(cond, body, init)
    stable = jnp.linalg.norm(Ak - eye) < 0.5 * jnp.sqrt(d)
    converged = err < 1e-3
    status = jnp.where(
        ~jnp.all(jnp.isfinite(Ak)) | (converged & ~stable),
        LyapunovStatus.UNSTABLE,
        jnp.where(converged, LyapunovStatus.SUCCESS, LyapunovStatus.NOT_CONVERGED),
    )
    return 0.5 * Qk, status.astype(jnp.int32)


_SOLVERS: dict[str, Callable[[Array, Array], tuple[Array, Array]]] = {
    "eigh": _eigh_solve,
    "kron": _kron_solve,
    "sign": _sign_solve,
}


def _solve_one(A: Array, Q: Array, method: str) -> tuple[Array, Array]:
    """One (d, d) problem with an implicitly differentiated solve."""
    solver = _SOLVERS[method]

    def matvec(X):
        return A @ X + X @ A.T

    if method == "eigh":
        # L(X) = AX + XAᵀ is self-adjoint (Frobenius inner product) for symmetric A.
        return lax.custom_linear_solve(
            matvec, Q, lambda _, b: solver(A, b), symmetric=True, has_aux=True
        )
    return lax.custom_linear_solve(
        matvec,
        Q,
        lambda _, b: solver(A, b),
        lambda _, b: solver(A.T, b),
        has_aux=True,
    )


@functools.partial(jax.jit, static_argnames="method")
def _solve_batch(A: Array, Q: Array, method: str) -> tuple[Array, Array]:
    # Jitted so that eager calls (the common interactive use) hit the compile cache.
    return jax.vmap(lambda a, q: _solve_one(a, q, method))(A, Q)


def lyapunov(
    A: Float[ArrayLike, "*batch d d"],
    Q: Float[ArrayLike, "*batch d d"],
    *,
    method: Literal["auto", "eigh", "sign", "kron"] = "auto",
    throw: bool = True,
) -> Float[Array, "*batch d d"] | tuple[Float[Array, "*batch d d"], Int[Array, "*batch"]]:
    r"""Solve the continuous Lyapunov equation $A X + X A^\top = Q$.

    This is SciPy's convention (`scipy.linalg.solve_continuous_lyapunov(A, Q)`).
    Note that python-control's `lyap(A, Q)` solves $A X + X A^\top + Q = 0$, the
    opposite sign of $Q$. For an OU process $dX = -A(X-\mu)dt + G\,dW$ the
    stationary covariance is `lyapunov(A, G @ G.T)`.

    $A$ must be *stable*: every eigenvalue has a positive real part. Then the
    solution is unique, $X = \int_0^\infty e^{-At} Q e^{-A^\top t} dt$, and it is
    symmetric (positive semi-definite) when $Q$ is.

    Works under `jax.jit`, `jax.vmap` and `jax.grad`; leading batch dimensions of
    `A` and `Q` broadcast against each other. Derivatives use the adjoint equation
    $A^\top Y + Y A = W$ through `jax.lax.custom_linear_solve`, never the
    eigenvectors or the iterations, so repeated eigenvalues are harmless.

    **Arguments:**

    - `A`: the drift matrix, shape `[*batch, d, d]`, stable.
    - `Q`: the right-hand side, shape `[*batch, d, d]`.
    - `method`:
        - `"eigh"`: symmetric $A = V\Lambda V^\top$,
          $X = V[(V^\top Q V)_{ij}/(\lambda_i+\lambda_j)]V^\top$. Uses the
          symmetric part of `A`. Fastest.
        - `"sign"`: any stable $A$; the scaled Newton iteration for the matrix
          sign function of $[[A, -Q], [0, -A^\top]]$ (Roberts 1980), only LU
          factorisations and products, so it runs on GPU and TPU; stops on
          convergence (quadratic) or when rounding stalls it.
        - `"kron"`: the direct $d^2 \times d^2$ Kronecker solve; a reference for
          small $d$ ($O(d^6)$ work).
        - `"auto"` (default): `"eigh"` if `A` is symmetric (up to a few ulps),
          otherwise `"kron"` for $d \le 8$ and `"sign"` above. With concrete inputs
          the choice is made in Python; under `jit` both branches are compiled and
          a `lax.cond` on the symmetry of the whole batch picks one at run time.
    - `throw`: if `True` (default), an unstable `A` raises an error (also under
      `jit`, through `equinox.error_if`). If `False`, return `(X, status)` where
      `status` (shape `batch`) holds [`jaxou.LyapunovStatus`][] codes and `X` is
      not meaningful where `status != 0`.

    **Returns:**

    `X` of shape `[*batch, d, d]` and dtype of the inputs; `(X, status)` if
    `throw=False`.

    **Raises:**

    - `ValueError` for non-square or mismatched shapes, or an unknown `method`.
    - `TypeError` for complex inputs or mismatched float dtypes.
    - `equinox.EquinoxRuntimeError` (at run time) if `A` is not stable.

    **References:** R. H. Bartels & G. W. Stewart (1972), Solution of the matrix
    equation AX + XB = C; J. D. Roberts (1980), Linear model reduction and solution
    of the algebraic Riccati equation by use of the sign function; P. Benner &
    E. S. Quintana-Ortí (1999), Solving stable generalized Lyapunov equations with
    the matrix sign function.
    """
    if method not in ("auto", "eigh", "sign", "kron"):
        raise ValueError(
            f"lyapunov: unknown method {method!r}; use 'auto', 'eigh', 'sign' or 'kron'"
        )
    A = as_float_array(A, "A")
    Q = as_float_array(Q, "Q")
    for name, M in (("A", A), ("Q", Q)):
        if M.ndim < 2 or M.shape[-1] != M.shape[-2]:
            raise ValueError(f"lyapunov: {name} must be [..., d, d] square, got {M.shape}")
    if A.shape[-1] != Q.shape[-1]:
        raise ValueError(f"lyapunov: A is {A.shape[-2:]} but Q is {Q.shape[-2:]}")
    common_float_dtype("A", A, "Q", Q)
    try:
        batch = jnp.broadcast_shapes(A.shape[:-2], Q.shape[:-2])
    except ValueError:
        raise ValueError(
            f"lyapunov: batch shapes of A {A.shape[:-2]} and Q {Q.shape[:-2]} do not broadcast"
        ) from None
    d = A.shape[-1]
    A = jnp.broadcast_to(A, batch + (d, d)).reshape(-1, d, d)
    Q = jnp.broadcast_to(Q, batch + (d, d)).reshape(-1, d, d)

    general = "kron" if d <= _KRON_MAX_DIM else "sign"
    if method == "auto":
        if isinstance(A, jax.core.Tracer):
            X, status = lax.cond(
                jnp.all(is_symmetric(A)),
                lambda a, q: _solve_batch(a, q, "eigh"),
                lambda a, q: _solve_batch(a, q, general),
                A,
                Q,
            )
        else:
            chosen = "eigh" if bool(jnp.all(is_symmetric(A))) else general
            X, status = _solve_batch(A, Q, chosen)
    else:
        X, status = _solve_batch(A, Q, method)
    X = X.reshape(batch + (d, d))
    status = status.reshape(batch)
    if throw:
        X = eqx.error_if(X, status != LyapunovStatus.SUCCESS, _STATUS_MESSAGE)
        return X
    return X, status

