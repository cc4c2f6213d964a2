"""Layer 6 at realistic dimension: structured Hessians and noise covariances.

Nothing here forms a d × d matrix: d = 10⁶ fits in memory and runs in seconds.

Representations (all symmetric):

- [`jaxou.DiagonalMatrix`][]: $\\mathrm{diag}(h)$.
- [`jaxou.LowRankDiagonal`][]: $U\\,\\mathrm{diag}(\\lambda)\\,U^\\top + \\mathrm{diag}(h)$
  with $U$ `[d, k]` orthonormal: the top-k eigenpairs of a Hessian (Lanczos) plus
  a diagonal remainder.
- [`jaxou.DiagonalPlusLowRank`][]: $\\mathrm{diag}(g) + Z S Z^\\top$ with any factor
  `Z` `[d, m]` and symmetric core `S` `[m, m]`: what stationary covariances come
  out as. Log-determinants, solves and KL divergences go through the matrix
  determinant lemma and Woodbury's identity on the whitened form
  $D^{1/2}(I + Q\\,\\mathrm{diag}(\\tau)Q^\\top)D^{1/2}$, computed from the
  m × m Gram matrix of $D^{-1/2}Z$ (matrix products over d, then m × m
  eigendecompositions: $O(dm^2)$, no thin QR).

## The stationary covariance $H\\Sigma + \\Sigma H = (\\eta/B)\\,C$

- **Exact**: $H$ and $C$ both diagonal: $\\Sigma = (\\eta/B)\\,C/(2h)$.
- **Exact**: $H = h_0 I + U\\Lambda U^\\top$ (a constant diagonal remainder) and
  any $C = \\mathrm{diag}(c) + ZSZ^\\top$. In the basis $[U, U_\\perp]$, $H$ is
  $\\mathrm{diag}(\\Lambda + h_0, h_0 I)$, so with $M = U^\\top C U$ and
  $Y = (I - UU^\\top)\\,C\\,U$:
  $$\\Sigma/(\\eta/B) = \\frac{C}{2h_0} + U\\Big(G\\circ M - \\frac{M}{2h_0}\\Big)U^\\top
  + U A Y^\\top + Y A U^\\top,$$
  $G_{ij} = 1/(\\lambda_i+\\lambda_j+2h_0)$, $A = \\mathrm{diag}(1/(\\lambda_i+2h_0) -
  1/(2h_0))$: diagonal plus low rank ($m + 2k$), exact.
- **Approximate** (no closed form): $H = U\\Lambda U^\\top + \\mathrm{diag}(h)$ with a
  non-constant $h$ and a noise that does not commute with $H$: a truncated Neumann
  series around $\\bar h I + U\\Lambda U^\\top$, $\\bar h$ the midrange of $h$, whose
  relative Frobenius error is at most $\\rho^{n+1}$ after $n$ corrections,
  $\\rho = (h_{\\max}-h_{\\min})/(h_{\\max}+h_{\\min})$ (when $\\Lambda \\ge 0$).
  [`jaxou.structured_stationary`][] states the series and the bound, and refuses
  requests whose bound is not small; `structured_error_bound` evaluates the bound
  before any work.

Stages here are stationary ($t = \\infty$): the pre-trained law is the source's
stationary law $\\pi_S$, the fine-tuned law the target's $\\pi_T$.
"""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._bounds import TwoStageBound, stage_bounds
from ._gaussian import KLDecomposition
from ._misc import as_float_array
from ._numerics import expm1mx

__all__ = [
    "DiagonalMatrix",
    "LowRankDiagonal",
    "DiagonalPlusLowRank",
    "StructuredGaussian",
    "structured_stationary",
    "structured_error_bound",
    "structured_kl",
    "structured_two_stage_bound",
]


def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


class DiagonalPlusLowRank(eqx.Module):
    r"""$M = \mathrm{diag}(g) + Z S Z^\top$, `diagonal` $g$ `[d]`, `factor` $Z$
    `[d, m]`, `core` $S$ `[m, m]` symmetric (m may be 0)."""

    diagonal: Float[Array, " d"]
    factor: Float[Array, "d m"]
    core: Float[Array, "m m"]

    @property
    def dim(self) -> int:
        return self.diagonal.shape[0]

    def as_dplr(self) -> DiagonalPlusLowRank:
        return self

    def matvec(self, v: Float[Array, " d"]) -> Float[Array, " d"]:
        return self.diagonal * v + self.factor @ (self.core @ (self.factor.T @ v))

    def dense(self) -> Float[Array, "d d"]:
        """The d × d matrix (for tests at small d)."""
        return jnp.diag(self.diagonal) + self.factor @ self.core @ self.factor.T

    def trace(self) -> Array:
        return jnp.sum(self.diagonal) + jnp.sum((self.factor.T @ self.factor) * self.core)

    def whitened(self) -> tuple[Array, Array, Array]:
        r"""$(g, Q, \tau)$ with $M = g^{1/2}(I + Q\mathrm{diag}(\tau)Q^\top)g^{1/2}$,
        $Q$ `[d, m]` orthonormal. Needs $g > 0$."""
        root = jnp.sqrt(self.diagonal)
        if self.factor.shape[1] == 0:
            return self.diagonal, self.factor, jnp.zeros((0,), self.diagonal.dtype)
        Q, R = jnp.linalg.qr(self.factor / root[:, None])
        T = R @ self.core @ R.T
        tau, V = jnp.linalg.eigh(0.5 * (T + T.T))
        return self.diagonal, Q @ V, tau

    def _woodbury(self) -> tuple[Array, Array, Array]:
        r"""$(\tau, K, A)$ from $m \times m$ algebra on the Gram matrix
        $G = \tilde Z^\top\tilde Z = Z^\top A$, $\tilde Z = D^{-1/2}Z$, $A = D^{-1}Z$
        (matrix products over d: no thin QR, which costs about 20× more at
        d = 10⁶):

        - $\tau$: the eigenvalues of $G^{1/2}SG^{1/2}$, the same nonzero spectrum
          as $\tilde Z S\tilde Z^\top$ (those of `whitened`);
        - $K = S - SG^{1/2}(I + G^{1/2}SG^{1/2})^{-1}G^{1/2}S = S(I + GS)^{-1}$, so
          that $M^{-1} = D^{-1} - AKA^\top$ (Woodbury, written without inverting
          $S$ or $G$, which may be singular)."""
        A = self.factor / self.diagonal[:, None]
        if self.factor.shape[1] == 0:
            return jnp.zeros((0,), self.diagonal.dtype), self.core, A
        gamma, E = jnp.linalg.eigh(_sym(self.factor.T @ A))
        G_half = (E * jnp.sqrt(jnp.maximum(gamma, 0))) @ E.T
        tau, V = jnp.linalg.eigh(_sym(G_half @ self.core @ G_half))
        W = self.core @ G_half @ V
        return tau, _sym(self.core - (W / (1 + tau)) @ W.T), A

    def logdet(self) -> Array:
        tau, _, _ = self._woodbury()
        return jnp.sum(jnp.log(self.diagonal)) + jnp.sum(jnp.log1p(tau))

    def solve(self, v: Float[Array, " d"]) -> Float[Array, " d"]:
        _, K, A = self._woodbury()
        return v / self.diagonal - A @ (K @ (A.T @ v))


def _sym(M: Array) -> Array:
    return 0.5 * (M + M.T)


def _check_pd(name: str, M: DiagonalPlusLowRank, definite: bool = True) -> None:
    """Eager check (concrete values only) that M is positive definite."""
    if not _concrete(M.diagonal, M.factor, M.core):
        return
    g = np.asarray(M.diagonal)
    if not np.all(np.isfinite(g)):
        raise ValueError(f"{name} has non-finite diagonal entries")
    if np.min(g) <= 0:
        i = int(np.argmin(g))
        raise ValueError(
            f"{name} is not positive definite: its diagonal part has the entry {g[i]:.3g} "
            f"at index {i} (structured matrices need a positive diagonal)"
        )
    if M.factor.shape[1]:
        tau, _, _ = M._woodbury()
        tmin = float(np.min(np.asarray(tau)))
        if not tmin > -1:
            raise ValueError(
                f"{name} is not positive definite (its low-rank part makes an eigenvalue "
                f"of the whitened matrix {1 + tmin:.3g} <= 0)"
            )


class DiagonalMatrix(eqx.Module):
    r"""$\mathrm{diag}(h)$, `diagonal` `[d]`."""

    diagonal: Float[Array, " d"]

    def __init__(self, diagonal: Float[ArrayLike, " d"]):
        diagonal = as_float_array(diagonal, "diagonal")
        if diagonal.ndim != 1:
            raise ValueError(f"DiagonalMatrix: diagonal must be [d], got shape {diagonal.shape}")
        self.diagonal = diagonal

    @property
    def dim(self) -> int:
        return self.diagonal.shape[0]

    def as_dplr(self) -> DiagonalPlusLowRank:
        z = jnp.zeros((self.dim, 0), self.diagonal.dtype)
        return DiagonalPlusLowRank(self.diagonal, z, jnp.zeros((0, 0), self.diagonal.dtype))

    def matvec(self, v):
        return self.diagonal * v

    def dense(self):
        return jnp.diag(self.diagonal)

    def logdet(self):
        return jnp.sum(jnp.log(self.diagonal))

    def solve(self, v):
        return v / self.diagonal


class LowRankDiagonal(eqx.Module):
    r"""$U\,\mathrm{diag}(\lambda)\,U^\top + \mathrm{diag}(h)$: `basis` $U$ `[d, k]`
    with orthonormal columns, `eigenvalues` $\lambda$ `[k]`, `diagonal` $h$ `[d]`.

    **Raises:** `ValueError` for mismatched shapes or a basis that is not
    orthonormal (checked for concrete inputs).
    """

    basis: Float[Array, "d k"]
    eigenvalues: Float[Array, " k"]
    diagonal: Float[Array, " d"]

    def __init__(self, basis, eigenvalues, diagonal):
        basis = as_float_array(basis, "basis")
        eigenvalues = as_float_array(eigenvalues, "eigenvalues")
        diagonal = as_float_array(diagonal, "diagonal")
        if basis.ndim != 2 or eigenvalues.ndim != 1 or diagonal.ndim != 1:
            raise ValueError(
                "LowRankDiagonal: basis must be [d, k], eigenvalues [k], diagonal [d]; got "
                f"{basis.shape}, {eigenvalues.shape}, {diagonal.shape}"
            )
        d, k = basis.shape
        if eigenvalues.shape[0] != k or diagonal.shape[0] != d:
            raise ValueError(
                f"LowRankDiagonal: basis is {basis.shape} but eigenvalues is "
                f"{eigenvalues.shape} and diagonal {diagonal.shape}"
            )
        if _concrete(basis) and k:
            gram = np.asarray(basis.T @ basis)
            err = float(np.max(np.abs(gram - np.eye(k))))
            if err > 1e-6:
                raise ValueError(
                    "LowRankDiagonal: basis columns must be orthonormal "
                    f"(max |UᵀU - I| = {err:.3g})"
                )
        self.basis = basis
        self.eigenvalues = eigenvalues
        self.diagonal = diagonal

    @property
    def dim(self) -> int:
        return self.diagonal.shape[0]

    def as_dplr(self) -> DiagonalPlusLowRank:
        return DiagonalPlusLowRank(self.diagonal, self.basis, jnp.diag(self.eigenvalues))

    def matvec(self, v):
        return self.diagonal * v + self.basis @ (self.eigenvalues * (self.basis.T @ v))

    def dense(self):
        return self.as_dplr().dense()

    def logdet(self):
        return self.as_dplr().logdet()

    def solve(self, v):
        return self.as_dplr().solve(v)


_Structured = DiagonalMatrix | LowRankDiagonal | DiagonalPlusLowRank


def _as_dplr(name: str, M) -> DiagonalPlusLowRank:
    if not isinstance(M, (DiagonalMatrix, LowRankDiagonal, DiagonalPlusLowRank)):
        raise TypeError(
            f"{name} must be a jaxou.DiagonalMatrix, LowRankDiagonal or DiagonalPlusLowRank, "
            f"got {type(M).__name__}"
        )
    return M.as_dplr()


class StructuredGaussian(eqx.Module):
    """$N(\\mu, \\Sigma)$ with a [`jaxou.DiagonalPlusLowRank`][] covariance."""

    mean: Float[Array, " d"]
    cov: DiagonalPlusLowRank

    @classmethod
    def isotropic(cls, mean: Float[ArrayLike, " d"], std: float) -> StructuredGaussian:
        mean = as_float_array(mean, "mean")
        return cls(mean, DiagonalMatrix(jnp.full(mean.shape, std**2, mean.dtype)).as_dplr())


# ---------------------------------------------------------------------------
# The Lyapunov solve.


def _solve_isotropic_remainder(h0, basis, lam, C: DiagonalPlusLowRank) -> DiagonalPlusLowRank:
    """Exact X with H X + X H = C, H = h0 I + U diag(lam) Uᵀ (see structured_stationary)."""
    U = basis
    CU = C.diagonal[:, None] * U + C.factor @ (C.core @ (C.factor.T @ U))
    M = U.T @ CU
    M = 0.5 * (M + M.T)
    G = 1 / (lam[:, None] + lam[None, :] + 2 * h0)
    K = G * M - M / (2 * h0)
    a = 1 / (lam + 2 * h0) - 1 / (2 * h0)
    Y = CU - U @ M
    m, k = C.factor.shape[1], U.shape[1]
    z = lambda r, c: jnp.zeros((r, c), C.diagonal.dtype)
    core = jnp.block(
        [
            [C.core / (2 * h0), z(m, k), z(m, k)],
            [z(k, m), K, jnp.diag(a)],
            [z(k, m), jnp.diag(a), z(k, k)],
        ]
    )
    return DiagonalPlusLowRank(
        C.diagonal / (2 * h0), jnp.concatenate([C.factor, U, Y], axis=1), core
    )


def _anticommutator_diag(e, X: DiagonalPlusLowRank) -> DiagonalPlusLowRank:
    """E X + X E for E = diag(e)."""
    m = X.factor.shape[1]
    zero = jnp.zeros((m, m), X.diagonal.dtype)
    core = jnp.block([[zero, X.core], [X.core, zero]])
    return DiagonalPlusLowRank(
        2 * e * X.diagonal, jnp.concatenate([e[:, None] * X.factor, X.factor], axis=1), core
    )


def _add(a: DiagonalPlusLowRank, b: DiagonalPlusLowRank, sign=1.0) -> DiagonalPlusLowRank:
    ma, mb = a.factor.shape[1], b.factor.shape[1]
    z = jnp.zeros((ma, mb), a.diagonal.dtype)
    core = jnp.block([[a.core, z], [z.T, sign * b.core]])
    return DiagonalPlusLowRank(
        a.diagonal + sign * b.diagonal, jnp.concatenate([a.factor, b.factor], axis=1), core
    )


def _check_corrections(corrections, max_error_bound) -> None:
    if isinstance(corrections, bool) or not isinstance(corrections, (int, np.integer)):
        raise TypeError(
            f"corrections must be a Python int (the number of Neumann-series steps), got "
            f"{type(corrections).__name__}"
        )
    if corrections < 0:
        raise ValueError(f"corrections must be >= 0, got {corrections}")
    if not 0 < max_error_bound <= 1:
        raise ValueError(f"max_error_bound must lie in (0, 1], got {max_error_bound}")


def _neumann_rho(h: Array, lam: Array) -> Array:
    r"""$\rho = \|\mathcal L_0^{-1}\mathcal L_E\|_F$ bound: $(h_{\max}-h_{\min}) /
    (2\mu_0)$ with $\mu_0 = \bar h + \min(0, \min\lambda)$ the smallest eigenvalue
    of $H_0 = \bar hI + U\Lambda U^\top$ (a lower bound when $k = d$); $\infty$ when
    $\mu_0 \le 0$ (the split does not apply)."""
    h_max, h_min = jnp.max(h), jnp.min(h)
    mu0 = 0.5 * (h_max + h_min)
    if lam.shape[0]:
        mu0 = mu0 + jnp.minimum(jnp.min(lam), 0)
    return jnp.where(mu0 > 0, (h_max - h_min) / (2 * jnp.where(mu0 > 0, mu0, 1)), jnp.inf)


def _min_whitened_eigenvalue(M: DiagonalPlusLowRank) -> Array:
    """Smallest eigenvalue of I + Q diag(tau) Qᵀ: M is positive definite iff it is > 0
    (given a positive diagonal)."""
    tau, _, _ = M._woodbury()
    return 1 + jnp.min(tau, initial=jnp.inf)


def _hessian_parts(hessian, dtype):
    d = hessian.dim
    if isinstance(hessian, LowRankDiagonal):
        return hessian.basis, hessian.eigenvalues
    return jnp.zeros((d, 0), dtype), jnp.zeros((0,), dtype)


def structured_error_bound(
    hessian: DiagonalMatrix | LowRankDiagonal,
    noise_cov: _Structured,
    *,
    corrections: int = 1,
) -> Float[Array, ""]:
    r"""The a-priori bound $\rho^{n+1}$ on the relative Frobenius error
    $\|\Sigma_n - \Sigma_\infty\|_F/\|\Sigma_\infty\|_F$ of
    [`jaxou.structured_stationary`][] with `corrections` $= n$; $0$ where that solve
    is exact. Costs $O(d)$: call it before the solve to choose `corrections`.

    $\rho = (h_{\max}-h_{\min})/(h_{\max}+h_{\min}+2\min(0,\lambda_{\min}))$ for
    $H = U\mathrm{diag}(\lambda)U^\top + \mathrm{diag}(h)$ (infinite where the
    denominator is not positive); see [`jaxou.structured_stationary`][] for the
    derivation. Works under `jit` (`corrections` must be static).

    **Arguments:** `hessian`, `noise_cov` and `corrections` as for
    [`jaxou.structured_stationary`][].

    **Returns:** a scalar of the Hessian's dtype.

    **Raises:** `TypeError`/`ValueError` for a wrong `hessian`/`noise_cov` type or a
    negative or non-integer `corrections`.
    """
    if not isinstance(hessian, (DiagonalMatrix, LowRankDiagonal)):
        raise TypeError(
            "hessian must be a jaxou.DiagonalMatrix or LowRankDiagonal, got "
            f"{type(hessian).__name__}"
        )
    C = _as_dplr("noise_cov", noise_cov)
    _check_corrections(corrections, 1.0)
    dtype = hessian.diagonal.dtype
    if isinstance(hessian, DiagonalMatrix) and C.factor.shape[1] == 0:
        return jnp.zeros((), dtype)
    _, lam = _hessian_parts(hessian, dtype)
    return _neumann_rho(hessian.diagonal, lam) ** (corrections + 1)


def _corrections_needed(rho: float, max_error_bound: float) -> int | None:
    """Smallest n with rho^(n+1) < max_error_bound (None if rho >= 1)."""
    if not rho < 1:
        return None
    n = max(int(np.ceil(np.log(max_error_bound) / np.log(rho))) - 1, 0)
    while rho ** (n + 1) >= max_error_bound:
        n += 1
    return n


def _advice(rho: float, max_error_bound: float) -> str:
    dense = (
        "or solve densely, jaxou.lyapunov(hessian.dense(), lr / batch_size * "
        "noise_cov.dense()), where d x d matrices fit"
    )
    n = _corrections_needed(rho, max_error_bound)
    if n is None:
        return f"rho >= 1, so no number of corrections has a guaranteed error; {dense}"
    if n > 6:
        return (
            f"it would take corrections >= {n}, impractical as the rank doubles with each "
            f"correction; {dense}"
        )
    return f"use corrections >= {n} (the rank doubles with each correction), {dense}"


def structured_stationary(
    hessian: DiagonalMatrix | LowRankDiagonal,
    noise_cov: _Structured,
    minimum: Float[ArrayLike, " d"],
    lr: float | Float[ArrayLike, ""],
    batch_size: float | Float[ArrayLike, ""],
    *,
    corrections: int = 1,
    max_error_bound: float = 0.5,
) -> tuple[StructuredGaussian, bool]:
    r"""The stationary law $N(\theta^*, \Sigma_\infty)$ of an SGD stage,
    $H\Sigma_\infty + \Sigma_\infty H = (\eta/B)\,C$, without forming d × d matrices.

    With $H = U\Lambda U^\top + \mathrm{diag}(h)$ ($U$ orthonormal, `[d, k]`; a
    [`jaxou.DiagonalMatrix`][] has $k = 0$) and $C$ diagonal plus low rank:

    - **Exact** when $H$ and $C$ are both diagonal: $\Sigma_\infty =
      (\eta/B)\,C/(2h)$.
    - **Exact** when $h \equiv h_0$ is constant, for any $C = \mathrm{diag}(c) +
      ZSZ^\top$ of rank $m$: in the basis $[U, U_\perp]$, $H$ is
      $\mathrm{diag}(\Lambda + h_0, h_0 I)$, so with $M = U^\top C U$ and
      $Y = (I - UU^\top)\,C\,U$ the solution is diagonal plus rank $m + 2k$,

        $$\frac{\Sigma_\infty}{\eta/B} = \frac{C}{2h_0} + U\Big(G\circ M -
        \frac{M}{2h_0}\Big)U^\top + U A Y^\top + Y A U^\top,$$

        $G_{ij} = 1/(\lambda_i+\lambda_j+2h_0)$ and
        $A = \mathrm{diag}(1/(\lambda_i+2h_0) - 1/(2h_0))$.
    - **Approximate** otherwise (a non-constant $h$ with a $C$ that does not
      commute with $H$): a truncated Neumann series, as follows.

    Split $H = H_0 + E$ with $H_0 = \bar h I + U\Lambda U^\top$, $\bar h =
    (h_{\max}+h_{\min})/2$ and $E = \mathrm{diag}(h - \bar h)$; write $\mathcal L_0 X
    = H_0X + XH_0$, $\mathcal L_E X = EX + XE$ and $T = \mathcal L_0^{-1}\mathcal
    L_E$. Then $\Sigma_\infty = (I + T)^{-1}\Sigma_0$ with $\Sigma_0 = \mathcal
    L_0^{-1}(\eta/B)C$ (exact, by the formula above), and $n$ = `corrections` terms
    of the Neumann series give

    $$\Sigma_n = \sum_{j=0}^{n} (-T)^j\,\Sigma_0, \qquad
    \Sigma_\infty - \Sigma_n = (-T)^{n+1}\,\Sigma_\infty .$$

    Each term is an exact solve with $H_0$, so $\Sigma_n$ stays diagonal plus low
    rank, but the rank roughly doubles with each correction (20, 76, 204, 476 for
    $n = 0, \dots, 3$ with $m = 4$, $k = 8$). On matrices with the Frobenius inner
    product, $\mathcal L_0$ is symmetric with eigenvalues $\mu_i + \mu_j$ over the
    eigenvalues $\mu$ of $H_0$ (a Kronecker sum; Horn & Johnson, *Topics in Matrix
    Analysis*, 1991, §4.4), all at least $2(\bar h + \min(0, \lambda_{\min}))$,
    and $\|\mathcal L_E X\|_F \le 2\max_i|h_i - \bar h|\,\|X\|_F = (h_{\max} -
    h_{\min})\|X\|_F$. So $\|T\|_F \le \rho$ and

    $$\frac{\|\Sigma_n - \Sigma_\infty\|_F}{\|\Sigma_\infty\|_F} \le \rho^{n+1},
    \qquad \rho = \frac{h_{\max} - h_{\min}}{h_{\max} + h_{\min} +
    2\min(0, \lambda_{\min})},$$

    which is $(h_{\max}-h_{\min})/(h_{\max}+h_{\min})$ for $\Lambda \ge 0$ (a
    Lanczos top-k); $\rho$ is infinite where the denominator is not positive.
    `structured_error_bound` returns the bound in $O(d)$, before any solve.

    Measured against SciPy's dense solution (d = 300, k = 8, m = 4,
    `benchmarks/results/sweep.md`), the relative error for $n = 0, 1, 2, 3$ was
    0.12, 0.018, 0.0031, 0.00054 for $h_{\max}/h_{\min} = 1.5$ ($\rho = 0.2$);
    0.34, 0.14, 0.061, 0.027 for 3 ($\rho = 0.5$); 0.67, 0.49, 0.37, 0.28 for 10
    ($\rho = 0.82$); 0.96, 0.92, 0.89, 0.86 for 100 ($\rho = 0.98$): each below
    $\rho^{n+1}$. Where $\rho^{n+1} \ge 1/2$, KL($\Sigma_n\|\Sigma_\infty$) was
    5.9 nats or more, or undefined (spread 100, one correction: $\Sigma_n$
    indefinite); below $1/2$ it was at most 3.1. Hence the default
    `max_error_bound` of $1/2$, a floor against meaningless results rather than a
    promise of accuracy: for KL divergences accurate to a small fraction of a nat,
    ask for a bound near $10^{-2}$ (measured KL $7\cdot10^{-4}$ at bound $0.008$,
    $0.04$ at bound $0.06$).

    **Arguments:**

    - `hessian`: $H$, a [`jaxou.DiagonalMatrix`][] or [`jaxou.LowRankDiagonal`][],
      positive definite.
    - `noise_cov`: $C$, any structured matrix, positive definite.
    - `minimum`: $\theta^*$, `[d]`.
    - `lr`, `batch_size`: $\eta$ and $B$.
    - `corrections`: $n \ge 0$, the number of Neumann-series terms after
      $\Sigma_0$ (a Python int). Ignored where the solve is exact.
    - `max_error_bound`: in $(0, 1]$; the approximation is refused unless
      $\rho^{n+1}$ is below it (default $1/2$).

    **Returns:** `(law, exact)`: a [`jaxou.StructuredGaussian`][] and whether the
    solve is exact. The exactness is decided from concrete values (under `jit`,
    from the types: a `LowRankDiagonal` Hessian is then treated as approximate,
    with $\rho = 0$ if $h$ is in fact constant).

    **Raises:**

    - `ValueError` naming the argument if `hessian` or `noise_cov` is not positive
      definite, for mismatched dimensions, a `corrections` below 0 or a
      `max_error_bound` outside $(0, 1]$; `TypeError` for a non-integer
      `corrections` or a wrong `hessian`/`noise_cov` type.
    - `ValueError` naming `corrections` and the spread $h_{\max}/h_{\min}$ of the
      Hessian's diagonal, before any solve, when $\rho^{n+1} \ge$
      `max_error_bound`; and, after the solve, when $\Sigma_n$ is not positive
      definite (possible below the bound when $C$ is ill-conditioned: the bound is
      relative to $\|\Sigma_\infty\|_F$, not to its smallest eigenvalue). This
      check costs one $O(d r^2)$ whitening of the rank-$r$ result, as a
      KL divergence does, and only runs for $n \ge 1$ ($\Sigma_0$ is an exact
      solve, so positive definite). The messages suggest more corrections or the
      dense path, [`jaxou.lyapunov`][] on `hessian.dense()`.
    - Under `jit` the same two checks raise `equinox.EquinoxRuntimeError` at run
      time (through `equinox.error_if`).
    """
    if not isinstance(hessian, (DiagonalMatrix, LowRankDiagonal)):
        raise TypeError(
            "hessian must be a jaxou.DiagonalMatrix or LowRankDiagonal, got "
            f"{type(hessian).__name__}"
        )
    C = _as_dplr("noise_cov", noise_cov)
    _check_corrections(corrections, max_error_bound)
    minimum = as_float_array(minimum, "minimum")
    d = hessian.dim
    if C.dim != d or minimum.shape != (d,):
        raise ValueError(
            f"hessian is {d}-dimensional but noise_cov is {C.dim} and minimum {minimum.shape}"
        )
    _check_pd("hessian", hessian.as_dplr())
    _check_pd("noise_cov", C)
    dtype = hessian.diagonal.dtype
    r = jnp.asarray(lr, dtype) / jnp.asarray(batch_size, dtype)
    h = hessian.diagonal
    if isinstance(hessian, DiagonalMatrix) and C.factor.shape[1] == 0:
        cov = DiagonalPlusLowRank(r * C.diagonal / (2 * h), C.factor, C.core)
        return StructuredGaussian(minimum, cov), True
    U, lam = _hessian_parts(hessian, dtype)
    concrete = _concrete(h, lam)
    constant = concrete and bool(np.ptp(np.asarray(h)) == 0)
    h_bar = 0.5 * (jnp.max(h) + jnp.min(h))
    rho = _neumann_rho(h, lam)
    bound = rho ** (corrections + 1)
    refuse = (
        f"structured_stationary: corrections={corrections} is not enough for the spread "
        "of the hessian's diagonal"
    )
    if concrete and not constant:
        rho_f, bound_f = float(rho), float(bound)
        if not bound_f < max_error_bound:
            spread = float(np.max(np.asarray(h)) / np.min(np.asarray(h)))
            raise ValueError(
                f"{refuse} (h_max/h_min = {spread:.3g}, so rho = {rho_f:.3g}): the a-priori "
                f"relative error bound rho^(corrections+1) = {bound_f:.3g} is not below "
                f"max_error_bound = {max_error_bound:g}; {_advice(rho_f, max_error_bound)}"
            )
    elif not concrete:
        h_bar = eqx.error_if(
            h_bar,
            ~(bound < max_error_bound),
            f"{refuse}: the a-priori relative error bound rho^(corrections+1) is not "
            "below max_error_bound; use more corrections or the dense path "
            "(jaxou.lyapunov)",
        )
    X = _solve_isotropic_remainder(h_bar, U, lam, C)
    if not constant:
        e = h - h_bar
        term = X
        for _ in range(corrections):
            term = _solve_isotropic_remainder(h_bar, U, lam, _anticommutator_diag(e, term))
            X = _add(X, term, sign=-1.0) if _ % 2 == 0 else _add(X, term)
    cov = DiagonalPlusLowRank(r * X.diagonal, X.factor, r * X.core)
    if not constant and corrections > 0:
        # Σ_0 is an exact solve (positive definite); a truncated series need not be.
        smallest = _min_whitened_eigenvalue(cov)
        indefinite = (
            f"structured_stationary: the approximation with corrections={corrections} is "
            "not positive definite"
        )
        if _concrete(cov.diagonal, cov.factor, cov.core):
            if not float(smallest) > 0:
                spread = float(np.max(np.asarray(h)) / np.min(np.asarray(h)))
                raise ValueError(
                    f"{indefinite} (smallest eigenvalue of its whitened form "
                    f"{float(smallest):.3g}) although its a-priori error bound "
                    f"{float(bound):.3g} (h_max/h_min = {spread:.3g} in the hessian's "
                    "diagonal) is below max_error_bound: the bound is relative to the "
                    "covariance's Frobenius norm, and an ill-conditioned noise_cov has "
                    "eigenvalues far below it. Use more corrections (each multiplies the "
                    f"bound by rho = {float(rho):.3g}, and doubles the rank) or solve "
                    "densely, jaxou.lyapunov(hessian.dense(), lr / batch_size * "
                    "noise_cov.dense()), where d x d matrices fit"
                )
        else:
            diagonal = eqx.error_if(
                cov.diagonal,
                ~(smallest > 0),
                f"{indefinite}; use more corrections or the dense path (jaxou.lyapunov)",
            )
            cov = DiagonalPlusLowRank(diagonal, cov.factor, cov.core)
    return StructuredGaussian(minimum, cov), constant


# ---------------------------------------------------------------------------
# KL divergence and bounds.


def structured_kl(p: StructuredGaussian, q: StructuredGaussian) -> KLDecomposition:
    r"""KL(p ‖ q) between Gaussians with [`jaxou.DiagonalPlusLowRank`][]
    covariances, split like [`jaxou.kl_parts`][], in $O(d m^2)$.

    With $\Sigma_q = D_q + Z_qS_qZ_q^\top$, $A = D_q^{-1}Z_q$ and the Gram matrix
    $G = Z_q^\top A$ (Woodbury: $\Sigma_q^{-1} = D_q^{-1} - AKA^\top$ with
    $K = S_q(I + GS_q)^{-1}$; determinant lemma: $\ln\det\Sigma_q = \sum\ln g_q +
    \sum\ln(1+\tau_q)$, $\tau_q$ the eigenvalues of $G^{1/2}S_qG^{1/2}$) the
    covariance part is
    $\frac12[\sum_i\varphi(\ln(g_{p,i}/g_{q,i})) + \mathrm{tr}(S_p Z_p^\top D_q^{-1}Z_p)
    - \mathrm{tr}(K A^\top\Sigma_p A) - \sum\ln(1+\tau_p) + \sum\ln(1+\tau_q)]$ with
    $\varphi(u) = e^u-1-u$: the diagonal parts, which carry the $O(d)$ bulk, enter
    through $\varphi$ without cancellation. Every pass over d is a matrix product;
    the rest is $m \times m$. Compiled (`jax.jit`) on first use for each shape.
    """
    P, Qc = p.cov, q.cov
    if P.dim != Qc.dim:
        raise ValueError(f"structured_kl: dimensions differ ({P.dim} and {Qc.dim})")
    return _structured_kl(p.mean, P, q.mean, Qc)


@eqx.filter_jit
def _structured_kl(mp, P: DiagonalPlusLowRank, mq, Qc: DiagonalPlusLowRank) -> KLDecomposition:
    gp, gq = P.diagonal, Qc.diagonal
    tau_p, _, _ = P._woodbury()
    tau_q, Kq, A = Qc._woodbury()  # Σ_q⁻¹ = D_q⁻¹ - A K_q Aᵀ
    diag_part = jnp.sum(expm1mx(jnp.log(gp) - jnp.log(gq)))
    tr_low = jnp.sum((P.factor.T @ (P.factor / gq[:, None])) * P.core)
    AZ = A.T @ P.factor
    APA = A.T @ (A * gp[:, None]) + AZ @ P.core @ AZ.T  # Aᵀ Σ_p A
    tr_corr = jnp.sum(Kq * APA)
    cov = 0.5 * (
        diag_part + tr_low - tr_corr - jnp.sum(jnp.log1p(tau_p)) + jnp.sum(jnp.log1p(tau_q))
    )
    diff = mp - mq
    z = A.T @ diff
    shift = 0.5 * (jnp.sum(diff**2 / gq) - z @ Kq @ z)
    return KLDecomposition(cov + shift, cov, shift)


def structured_two_stage_bound(
    init: StructuredGaussian,
    source: StructuredGaussian,
    target: StructuredGaussian,
    n_source: Float[ArrayLike, ""],
    n_target: Float[ArrayLike, ""],
    delta: Float[ArrayLike, ""] = 0.05,
    *,
    empirical_risk_source: Float[ArrayLike, ""] = 0.0,
    empirical_risk_target: Float[ArrayLike, ""] = 0.0,
    kind: Literal["mcallester", "kl"] = "mcallester",
) -> tuple[TwoStageBound, KLDecomposition]:
    r"""The two-stage PAC-Bayes bound ([`jaxou.two_stage_bound`][]) for stages run
    to stationarity, with structured laws: stage 1 bounds with
    KL($\pi_S$ ‖ init) and $N_S$, stage 2 with KL($\pi_T$ ‖ $\pi_S$) and $N_T$.

    **Returns:** `(bound, discrepancy)`: a [`jaxou.TwoStageBound`][] and the domain
    discrepancy KL($\pi_T\|\pi_S$) (here equal to the fine-tuning KL).
    """
    kl1 = structured_kl(source, init)
    kl2 = structured_kl(target, source)
    bound = stage_bounds(
        kl1, kl2, n_source, n_target, delta, empirical_risk_source, empirical_risk_target, kind
    )
    return bound, kl2
