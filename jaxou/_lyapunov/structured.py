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

__all__ = [
    "exact_structured_solve",
    "has_constant_diagonal",
    "positive_diagonal",
    "stationary_operator",
]


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


def _failure(what: str, solution, solver) -> ValueError:
    from .base import LyapunovResult

    result = LyapunovResult(int(solution.result))
    return ValueError(
        f"{what}: {type(solver).__name__} returned {result.name} (relative residual "
        f"{float(solution.residual):.3g}); see jaxou.LyapunovResult"
    )


def stationary_operator(H: AbstractOperator, C: AbstractOperator, solver=None):
    """The solution X of H X + X H = C for operator inputs: exact where a closed form
    applies (module docstring), otherwise `solver` (default `LowRankADI()`); a
    `Dense` or a non-positive diagonal part of H falls back to a dense solve up to
    jaxou's dense limit. Raises `ValueError` naming the result when the solver does
    not succeed."""
    from .adi import LowRankADI

    if solver is None:
        exact = exact_structured_solve(H, C)
        if exact is not None:
            return exact
    structured = as_dplr(H) is not None and as_dplr(C) is not None
    if structured and (solver is not None or positive_diagonal(H)):
        solver = LowRankADI() if solver is None else solver
        solution = solver.solve(H, C)
        if int(solution.result) != 0:
            raise _failure("the stationary law", solution, solver)
        return solution.value
    from . import Eigh, lyapunov  # the dense fallback

    what = "the stationary law (a Hessian whose diagonal part is not positive)"
    return sym(lyapunov(densify(H, what), densify(C, what), solver=Eigh()))


def positive_diagonal(H: AbstractOperator) -> bool:
    Hl = as_dplr(H)
    return Hl is not None and is_concrete(Hl.diagonal) and bool(np.all(np.asarray(Hl.diagonal) > 0))
