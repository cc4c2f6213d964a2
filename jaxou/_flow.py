"""The OU flow over a time t: F = e^{-At} and Σ_t = ∫_0^t e^{-As} D e^{-Aᵀs} ds."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from ._lyapunov import _KRON_MAX_DIM, lyapunov
from ._misc import as_float_array, is_symmetric


def _flow_symmetric(A: Array, D: Array, t: Array) -> tuple[Array, Array]:
    """Symmetric A = V Λ Vᵀ. In the eigenbasis
    (Σ_t)_ij = D̃_ij (1 - e^{-(λ_i+λ_j) t}) / (λ_i+λ_j), written with expm1 so that
    it keeps full relative accuracy for tiny t, and equals the stationary
    covariance for t = inf."""
    lam, V = jnp.linalg.eigh(0.5 * (A + A.T))
    s = lam[:, None] + lam[None, :]
    # -expm1(-s t)/s; at t = inf this is 1/s exactly.
    g = jnp.where(jnp.isinf(t), 1.0 / s, -jnp.expm1(-s * jnp.where(jnp.isinf(t), 0, t)) / s)
    F = (V * jnp.exp(-lam * t)[None, :]) @ V.T
    Sigma = V @ ((V.T @ D @ V) * g) @ V.T
    Sigma = eqx.error_if(
        Sigma,
        jnp.isinf(t) & ~(lam[0] > 0),
        "the drift matrix is not positive definite: there is no stationary law",
    )
    return F, Sigma


def _flow_general(A: Array, D: Array, t: Array) -> tuple[Array, Array]:
    """General stable A. For ||A|| t ≤ 2: Van Loan's block exponential
    expm([[-A, D], [0, Aᵀ]] t) = [[F, G], [0, e^{Aᵀt}]], Σ_t = G Fᵀ, accurate for
    tiny t. For larger t: Σ_t = Σ∞ - F Σ∞ Fᵀ, where there is no cancellation.

    Reference: C. F. Van Loan (1978), Computing integrals involving the matrix
    exponential, IEEE TAC 23(3).
    """
    d = A.shape[-1]
    norm_t = jnp.max(jnp.sum(jnp.abs(A), axis=0)) * jnp.where(jnp.isinf(t), 0, t)
    small = (norm_t <= 2.0) & ~jnp.isinf(t)
    t_fin = jnp.where(jnp.isinf(t), 0, t)
    # Clip the time in the Van Loan branch so that e^{Aᵀt} never overflows there.
    t_vl = jnp.where(small, t_fin, 0)
    block = jnp.block([[-A, D], [jnp.zeros_like(A), A.T]]) * t_vl
    E = jax.scipy.linalg.expm(block)
    F_vl = E[:d, :d]
    Sigma_vl = E[:d, d:] @ F_vl.T
    F_big = jnp.where(jnp.isinf(t), 0, jax.scipy.linalg.expm(-A * t_fin))
    S_inf = lyapunov(A, D, method="sign" if d > _KRON_MAX_DIM else "kron")
    Sigma_big = S_inf - F_big @ S_inf @ F_big.T
    F = jnp.where(small, F_vl, F_big)
    Sigma = jnp.where(small, Sigma_vl, Sigma_big)
    return F, Sigma


def ou_flow(
    A: Float[ArrayLike, "d d"],
    D: Float[ArrayLike, "d d"],
    t: Float[ArrayLike, ""],
    *,
    symmetric: bool | None = None,
) -> tuple[Float[Array, "d d"], Float[Array, "d d"]]:
    r"""The flow of $dX = -A X dt + G dW$ (with $D = GG^\top$) over a time $t$:
    $F = e^{-At}$ and $\Sigma_t = \int_0^t e^{-As} D e^{-A^\top s} ds$, so that
    $X_t \mid X_0 \sim N(F X_0, \Sigma_t)$. $t = \infty$ gives $F = 0$ and the
    stationary covariance. Accurate for tiny $t$ too (no $\Sigma_\infty -
    F\Sigma_\infty F^\top$ cancellation). Returns `(F, Σ_t)`, the latter
    symmetrised.

    `symmetric`: whether `A` is symmetric (then an eigendecomposition gives both
    closed-form); `None` decides from concrete values, or at run time under `jit`.
    """
    A = as_float_array(A, "A")
    D = as_float_array(D, "D")
    t = jnp.asarray(t, dtype=A.dtype)
    if symmetric is None:
        if isinstance(A, jax.core.Tracer):
            F, S = lax.cond(is_symmetric(A), _flow_symmetric, _flow_general, A, D, t)
        else:
            symmetric = bool(is_symmetric(A))
    if symmetric is not None:
        F, S = (_flow_symmetric if symmetric else _flow_general)(A, D, t)
    return F, 0.5 * (S + S.T)

