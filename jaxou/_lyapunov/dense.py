"""What the dense solvers share: input checks, the implicitly differentiated solve
and the a-posteriori residual check."""

from __future__ import annotations

from collections.abc import Callable

import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from .._misc import as_float_array, common_float_dtype, is_concrete
from .base import LyapunovResult, LyapunovSolution, default_rtol, result_or

__all__ = ["check_dense", "dense_solution", "relative_residual"]

# A kernel solves one (d, d) problem and says whether A looked stable (and, for an
# iteration, whether it converged); it does not check its own accuracy.
Kernel = Callable[[Array, Array], tuple[Array, Int[Array, ""]]]


def check_dense(
    A: Float[ArrayLike, "*batch d d"],
    Q: Float[ArrayLike, "*batch d d"],
    caller: str,
    *,
    batched: bool = False,
) -> tuple[Array, Array]:
    """`A` and `Q` as floating arrays of one dtype and of shape `[d, d]` (`[..., d,
    d]` if `batched`), with a `ValueError`/`TypeError` naming the argument
    otherwise; non-finite entries are refused when the values are concrete (outside
    `jit`)."""
    A = as_float_array(A, f"{caller}: A")
    Q = as_float_array(Q, f"{caller}: Q")
    for name, M in (("A", A), ("Q", Q)):
        if M.ndim < 2 or M.shape[-1] != M.shape[-2]:
            raise ValueError(f"{caller}: {name} must be [..., d, d] square, got {M.shape}")
        if not batched and M.ndim != 2:
            raise ValueError(
                f"{caller}: solves one problem, so {name} must be [d, d], got {M.shape}; "
                "use jaxou.lyapunov (leading batch dimensions) or jax.vmap for many"
            )
    if A.shape[-1] != Q.shape[-1]:
        raise ValueError(f"{caller}: A is {A.shape[-2:]} but Q is {Q.shape[-2:]}")
    common_float_dtype(f"{caller}: A", A, "Q", Q)
    for name, M in (("A", A), ("Q", Q)):
        if is_concrete(M) and not bool(jnp.all(jnp.isfinite(M))):
            bad = int(np.sum(~np.isfinite(np.asarray(M))))
            raise ValueError(f"{caller}: {name} has {bad} non-finite entries (NaN or inf)")
    return A, Q


def relative_residual(
    A: Float[Array, "d d"], Q: Float[Array, "d d"], X: Float[Array, "d d"]
) -> Float[Array, ""]:
    """‖AX + XAᵀ - Q‖_F / (2‖A‖_F‖X‖_F + ‖Q‖_F): two products and three norms.
    Not differentiated (a diagnostic). Zero for A = Q = X = 0; NaN if X is not
    finite."""
    A, Q, X = (lax.stop_gradient(M) for M in (A, Q, X))
    R = A @ X + X @ A.T - Q
    scale = 2 * jnp.linalg.norm(A) * jnp.linalg.norm(X) + jnp.linalg.norm(Q)
    return jnp.linalg.norm(R) / jnp.maximum(scale, jnp.finfo(A.dtype).tiny)


def dense_solution(
    kernel: Kernel, A: Array, Q: Array, rtol: float | None, *, self_adjoint: bool = False
) -> LyapunovSolution:
    """Solve one problem with `kernel`, differentiate it implicitly, and check it.

    The solve is wrapped in `jax.lax.custom_linear_solve` for the operator
    L(X) = AX + XAᵀ, so that its JVP and VJP are themselves solves with `kernel`
    (the adjoint equation AᵀY + YA = W uses `kernel(Aᵀ, ·)`): derivatives never go
    through eigenvectors or iterations, and stay exact for repeated eigenvalues.
    `self_adjoint`: L is self-adjoint (A symmetric), so its transpose is itself.

    The residual of the result is then measured against the `A` and `Q` given
    (never against what the kernel assumed, e.g. the symmetric part of `A`), and
    a relative residual above `rtol` (or NaN) makes the result `INACCURATE`.
    """
    d = A.shape[-1]
    rtol = default_rtol(A.dtype, d) if rtol is None else rtol

    def matvec(X):
        return A @ X + X @ A.T

    if self_adjoint:
        X, result = lax.custom_linear_solve(
            matvec, Q, lambda _, b: kernel(A, b), symmetric=True, has_aux=True
        )
    else:
        X, result = lax.custom_linear_solve(
            matvec, Q, lambda _, b: kernel(A, b), lambda _, b: kernel(A.T, b), has_aux=True
        )
    residual = relative_residual(A, Q, X)
    accurate = jnp.where(residual <= rtol, LyapunovResult.SUCCESSFUL, LyapunovResult.INACCURATE)
    return LyapunovSolution(X, result_or(result, accurate), residual)
