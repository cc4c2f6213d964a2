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
  $D^{1/2}(I + Q\\,\\mathrm{diag}(\\tau)Q^\\top)D^{1/2}$ (one thin QR and one
  m × m eigendecomposition, $O(dm^2)$).

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
  non-constant $h$ and a noise that does not commute with $H$. We split
  $H = H_0 + E$ with $H_0 = \\bar h I + U\\Lambda U^\\top$, $\\bar h$ the midrange of
  $h$, $E = \\mathrm{diag}(h - \\bar h)$, and take `corrections` steps of the
  Neumann series of $(\\mathcal L_0 + \\mathcal L_E)^{-1}$,
  $\\Sigma_{n+1} = -\\mathcal L_0^{-1}(E\\Sigma_n + \\Sigma_n E)$ (each exact by the
  formula above, each still diagonal plus low rank). The series converges since
  $\\|\\mathcal L_0^{-1}\\mathcal L_E\\| \\le \\rho = (h_{\\max}-h_{\\min})/(h_{\\max}+h_{\\min})
  < 1$; the relative error after $n$ corrections is $O(\\rho^{n+1})$. The tests and
  the benchmark measure it against the dense solution.

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

from ._bounds import TwoStageBound, pac_bayes_bound
from ._gaussian import KLDecomposition
from ._linalg import as_float_array
from ._numerics import expm1mx

__all__ = [
    "DiagonalMatrix",
    "LowRankDiagonal",
    "DiagonalPlusLowRank",
    "StructuredGaussian",
    "structured_stationary",
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

    def logdet(self) -> Array:
        g, _, tau = self.whitened()
        return jnp.sum(jnp.log(g)) + jnp.sum(jnp.log1p(tau))

    def solve(self, v: Float[Array, " d"]) -> Float[Array, " d"]:
        g, Q, tau = self.whitened()
        w = v / jnp.sqrt(g)
        w = w - Q @ ((tau / (1 + tau)) * (Q.T @ w))
        return w / jnp.sqrt(g)


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
        _, _, tau = M.whitened()
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
    """Exact X with H X + X H = C, H = h0 I + U diag(lam) Uᵀ (see the module doc)."""
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


def structured_stationary(
    hessian: DiagonalMatrix | LowRankDiagonal,
    noise_cov: _Structured,
    minimum: Float[ArrayLike, " d"],
    lr: float | Float[ArrayLike, ""],
    batch_size: float | Float[ArrayLike, ""],
    *,
    corrections: int = 1,
) -> tuple[StructuredGaussian, bool]:
    r"""The stationary law $N(\theta^*, \Sigma_\infty)$ of an SGD stage,
    $H\Sigma_\infty + \Sigma_\infty H = (\eta/B)\,C$, without forming d × d matrices.

    Exact when $H$ and $C$ are both diagonal, or when $H$'s diagonal remainder is
    constant (any structured $C$); otherwise the Neumann-series approximation of
    the module docstring with `corrections` steps (rank grows as $2^n$).

    **Returns:** `(law, exact)`: a [`jaxou.StructuredGaussian`][] and whether the
    solve is exact. The exactness is decided from concrete values (under `jit`,
    from the types: a `LowRankDiagonal` Hessian is then treated as approximate).

    **Raises:** `ValueError` naming the argument if `hessian` or `noise_cov` is not
    positive definite, or for mismatched dimensions.
    """
    if not isinstance(hessian, (DiagonalMatrix, LowRankDiagonal)):
        raise TypeError(
            "hessian must be a jaxou.DiagonalMatrix or LowRankDiagonal, got "
            f"{type(hessian).__name__}"
        )
    C = _as_dplr("noise_cov", noise_cov)
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
    if isinstance(hessian, LowRankDiagonal):
        U, lam = hessian.basis, hessian.eigenvalues
    else:
        U, lam = jnp.zeros((d, 0), dtype), jnp.zeros((0,), dtype)
    constant = _concrete(h) and bool(np.ptp(np.asarray(h)) == 0)
    h_bar = 0.5 * (jnp.max(h) + jnp.min(h))
    X = _solve_isotropic_remainder(h_bar, U, lam, C)
    if not constant:
        e = h - h_bar
        term = X
        for _ in range(corrections):
            term = _solve_isotropic_remainder(h_bar, U, lam, _anticommutator_diag(e, term))
            X = _add(X, term, sign=-1.0) if _ % 2 == 0 else _add(X, term)
    cov = DiagonalPlusLowRank(r * X.diagonal, X.factor, r * X.core)
    return StructuredGaussian(minimum, cov), constant


# ---------------------------------------------------------------------------
# KL divergence and bounds.


def structured_kl(p: StructuredGaussian, q: StructuredGaussian) -> KLDecomposition:
    r"""KL(p ‖ q) between Gaussians with [`jaxou.DiagonalPlusLowRank`][]
    covariances, split like [`jaxou.kl_parts`][], in $O(d m^2)$.

    With $\Sigma_q = D_q^{1/2}(I + Q\mathrm{diag}(\tau_q)Q^\top)D_q^{1/2}$
    (Woodbury: $\Sigma_q^{-1} = D_q^{-1/2}(I - Q\mathrm{diag}(\tau_q/(1+\tau_q))Q^\top)
    D_q^{-1/2}$; determinant lemma: $\ln\det\Sigma_q = \sum\ln g_q + \sum\ln(1+\tau_q)$)
    the covariance part is
    $\frac12[\sum_i\varphi(\ln(g_{p,i}/g_{q,i})) + \mathrm{tr}(S_p Z_p^\top D_q^{-1}Z_p)
    - \mathrm{tr}(W Y^\top\Sigma_p Y) - \sum\ln(1+\tau_p) + \sum\ln(1+\tau_q)]$ with
    $Y = D_q^{-1/2}Q$, $W = \mathrm{diag}(\tau_q/(1+\tau_q))$, $\varphi(u) = e^u-1-u$:
    the diagonal parts, which carry the $O(d)$ bulk, enter through $\varphi$ without
    cancellation.
    """
    P, Qc = p.cov, q.cov
    if P.dim != Qc.dim:
        raise ValueError(f"structured_kl: dimensions differ ({P.dim} and {Qc.dim})")
    gp, _, tau_p = P.whitened()
    gq, Qq, tau_q = Qc.whitened()
    diag_part = jnp.sum(expm1mx(jnp.log(gp) - jnp.log(gq)))
    ZpD = P.factor / jnp.sqrt(gq)[:, None]
    tr_low = jnp.sum((ZpD.T @ ZpD) * P.core)
    Y = Qq / jnp.sqrt(gq)[:, None]
    YZ = Y.T @ P.factor
    YPY = (Y.T * gp) @ Y + YZ @ P.core @ YZ.T
    w = tau_q / (1 + tau_q)
    tr_corr = jnp.sum(w * jnp.diagonal(YPY))
    cov = 0.5 * (
        diag_part + tr_low - tr_corr - jnp.sum(jnp.log1p(tau_p)) + jnp.sum(jnp.log1p(tau_q))
    )
    diff = p.mean - q.mean
    shift = 0.5 * jnp.dot(diff, Qc.solve(diff))
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
    b1 = pac_bayes_bound(
        kl1.total, n_source, delta, empirical_risk=empirical_risk_source, kind=kind
    )
    b2 = pac_bayes_bound(
        kl2.total, n_target, delta, empirical_risk=empirical_risk_target, kind=kind
    )
    t1 = b1 - jnp.asarray(empirical_risk_source, b1.dtype)
    t2 = b2 - jnp.asarray(empirical_risk_target, b2.dtype)
    return TwoStageBound(kl1, kl2, b1, b2, t1, t2, t2 > t1), kl2
