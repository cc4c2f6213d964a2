r"""Exact structured solutions of $H X + X H = Q$ for operator inputs.

- $H$ and $Q$ both diagonal: $X = Q/(2h)$.
- $H = h_0 I + U\Lambda U^\top$ (a constant diagonal plus low rank; $U$
  orthonormal after whitening) and any $Q = \mathrm{diag}(c) + ZSZ^\top$. In the
  basis $[U, U_\perp]$, $H$ is $\mathrm{diag}(\Lambda + h_0, h_0 I)$, so with
  $M = U^\top Q U$ and $Y = (I - UU^\top)QU$,

  $$X = \frac{Q}{2h_0} + U\Big(G\circ M - \frac{M}{2h_0}\Big)U^\top + U A Y^\top +
  Y A U^\top,$$

  $G_{ij} = 1/(\lambda_i+\lambda_j+2h_0)$, $A = \mathrm{diag}(1/(\lambda_i+2h_0) -
  1/(2h_0))$: diagonal plus low rank ($m + 2k$), exact.

Everything else (a non-constant diagonal with a low-rank part in $H$ or $Q$) is
the large-scale iterative solver's job.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .._misc import is_concrete
from .._operator import AbstractOperator, Diagonal, DiagonalPlusLowRank, as_dplr, densify, sym

__all__ = ["exact_structured_solve", "has_constant_diagonal"]


def has_constant_diagonal(H: DiagonalPlusLowRank) -> bool:
    """Whether the diagonal part of `H` is constant (decided from concrete values;
    `False` under `jit`)."""
    if not is_concrete(H.diagonal):
        return False
    h = np.asarray(H.diagonal)
    return bool(h.size == 0 or np.ptp(h) == 0)


def _isotropic_remainder(h0, U, lam, C: DiagonalPlusLowRank) -> DiagonalPlusLowRank:
    """X with H X + X H = C for H = h0 I + U diag(lam) Uᵀ, U orthonormal."""
    CU = C.mv(U)
    M = sym(U.T @ CU)
    G = 1 / (lam[:, None] + lam[None, :] + 2 * h0)
    K = G * M - M / (2 * h0)
    a = 1 / (lam + 2 * h0) - 1 / (2 * h0)
    Y = CU - U @ M
    m, k = C.rank, U.shape[1]
    z = lambda r, c: jnp.zeros((r, c), C.dtype)
    core = jnp.block(
        [
            [C.core / (2 * h0), z(m, k), z(m, k)],
            [z(k, m), K, jnp.diag(a)],
            [z(k, m), jnp.diag(a), z(k, k)],
        ]
    )
    return DiagonalPlusLowRank(C.diagonal / (2 * h0), jnp.concatenate([C.factor, U, Y], 1), core)


def exact_structured_solve(
    H: AbstractOperator, Q: AbstractOperator
) -> DiagonalPlusLowRank | Diagonal | None:
    """The exact solution of H X + X H = Q where one of the closed forms of the
    module docstring applies (diagonal H and Q; H with a constant diagonal), else
    `None`."""
    if isinstance(H, Diagonal) and isinstance(Q, Diagonal):
        return Diagonal(Q.diagonal / (2 * H.diagonal))
    Hl, Ql = as_dplr(H), as_dplr(Q)
    if Hl is None or Ql is None or not has_constant_diagonal(Hl):
        return None
    h0 = Hl.diagonal[0]
    # H - h0 I = Z S Zᵀ = h0 · Q diag(τ) Qᵀ, from the whitened form of H / h0.
    w = DiagonalPlusLowRank(jnp.ones_like(Hl.diagonal), Hl.factor, Hl.core / h0).whitened()
    return _isotropic_remainder(h0, w.basis, h0 * w.tau, Ql)


def stationary_operator(H: AbstractOperator, D: AbstractOperator):
    """The stationary covariance X of H X + X H = D for operator inputs: exact where
    a closed form applies, otherwise the large-scale solver (dense below jaxou's
    dense limit until then)."""
    exact = exact_structured_solve(H, D)
    if exact is not None:
        return exact
    from . import Eigh, lyapunov  # the dense fallback

    X = lyapunov(densify(H, "the stationary law"), densify(D, "the stationary law"), solver=Eigh())
    return sym(X)


def finite_time_operator(H: AbstractOperator, D: AbstractOperator, minimum, initial, t):
    """The law at time t of dθ = -H(θ - θ*)dt + D^{1/2} dW from `initial` (a
    Gaussian), for operator H and D."""
    from .._flow import ou_flow
    from .._gaussian import Gaussian

    what = "the finite-time law"
    Hd, Dd, S0 = densify(H, what), densify(D, what), densify(initial.cov, what)
    F, St = ou_flow(Hd, Dd, t, symmetric=True)
    mean = minimum + F @ (initial.mean - minimum)
    return Gaussian(mean, sym(F @ S0 @ F.T + St))
