"""Layer 2: multivariate Gaussians, their KL divergence (split into its two parts),
Wasserstein-2 distance, log-density and sampling."""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._misc import as_float_array, is_concrete
from ._numerics import expm1mx as _phi
from ._operator import (
    DENSE_LIMIT,
    AbstractOperator,
    Dense,
    Diagonal,
    DiagonalPlusLowRank,
    as_dplr,
    check_matrix,
    densify,
    psd_sqrt,
)
from ._operator.lowrank import (
    _diagonal_core,
    weighted_gram,
    weighted_sq_norms,
    weighted_sym_gram,
)

__all__ = ["Gaussian", "KLDecomposition", "kl", "kl_parts", "w2"]


class KLDecomposition(NamedTuple):
    """A Gaussian KL divergence and its two parts: `total = covariance + shift`."""

    total: Array
    covariance: Array
    shift: Array


class Gaussian(eqx.Module):
    r"""A multivariate normal law $N(\mu, \Sigma)$.

    The covariance is a dense array, with optional leading batch dimensions
    shared by `mean` and `cov`, or an operator ([`jaxou.Diagonal`][],
    [`jaxou.DiagonalPlusLowRank`][], [`jaxou.Dense`][]) for large $d$ (then a single
    law: `mean` is `[d]`). [`jaxou.kl`][], [`jaxou.kl_parts`][], [`jaxou.w2`][],
    `log_prob` and `sample` dispatch on the representation; a `Dense` operator is
    stored as its array.

    **Arguments:**

    - `mean`: $\mu$, shape `[*batch, d]`.
    - `cov`: $\Sigma$, symmetric positive semi-definite: an array `[*batch, d, d]`
      or an operator (positive definite wherever a density, a KL or a log-density
      is asked).

    **Raises:** `ValueError` if the shapes do not fit, or (for concrete values)
    for non-finite entries, a non-symmetric or an indefinite covariance (checked by
    an eigendecomposition where it is cheap: up to about $2\cdot10^9$ flops);
    `TypeError` for mismatched float dtypes or complex inputs.
    """

    mean: Float[Array, "*batch d"]
    cov: Float[Array, "*batch d d"] | AbstractOperator

    def __init__(
        self,
        mean: Float[ArrayLike, "*batch d"],
        cov: Float[ArrayLike, "*batch d d"] | AbstractOperator,
    ):
        mean = as_float_array(mean, "mean")
        if mean.ndim < 1:
            raise ValueError(f"Gaussian: mean must be [..., d], got shape {mean.shape}")
        if is_concrete(mean) and not np.all(np.isfinite(np.asarray(mean))):
            raise ValueError("Gaussian: mean has non-finite entries (NaN or inf)")
        if isinstance(cov, Dense):
            cov = cov.matrix
        if isinstance(cov, AbstractOperator):
            if mean.shape != (cov.dim,):
                raise ValueError(
                    f"Gaussian: a {type(cov).__name__} covariance of dimension {cov.dim} needs "
                    f"a mean of shape ({cov.dim},), got {mean.shape}"
                )
            if mean.dtype != cov.dtype:
                raise TypeError(f"Gaussian: mean is {mean.dtype} but cov is {cov.dtype}")
            cov.check("Gaussian: cov", definite=False)
            self.mean, self.cov = mean, cov
            return
        cov = as_float_array(cov, "cov")
        if cov.ndim < 2 or cov.shape[-1] != cov.shape[-2]:
            raise ValueError(f"Gaussian: cov must be [..., d, d], got shape {cov.shape}")
        if cov.shape[-1] != mean.shape[-1]:
            raise ValueError(
                f"Gaussian: mean has dimension {mean.shape[-1]} but cov is {cov.shape[-2:]}"
            )
        if mean.dtype != cov.dtype:
            raise TypeError(f"Gaussian: mean is {mean.dtype} but cov is {cov.dtype}; use one dtype")
        try:
            batch = jnp.broadcast_shapes(mean.shape[:-1], cov.shape[:-2])
        except ValueError:
            raise ValueError(
                f"Gaussian: batch shapes of mean {mean.shape[:-1]} and cov "
                f"{cov.shape[:-2]} do not broadcast"
            ) from None
        check_matrix("Gaussian: cov", cov, definite=False)
        d = mean.shape[-1]
        self.mean = jnp.broadcast_to(mean, batch + (d,))
        self.cov = jnp.broadcast_to(cov, batch + (d, d))

    @property
    def dim(self) -> int:
        """The dimension d."""
        return self.mean.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The leading batch dimensions."""
        return self.mean.shape[:-1]

    @property
    def is_dense(self) -> bool:
        """Whether the covariance is held as a dense array."""
        return not isinstance(self.cov, AbstractOperator)

    def cov_matrix(self) -> Float[Array, "*batch d d"]:
        """The covariance as a dense array (an operator's `as_matrix()`, refused
        above jaxou's dense limit)."""
        return densify(self.cov, "Gaussian.cov_matrix")

    @classmethod
    def point(cls, x: Float[ArrayLike, "*batch d"]) -> Gaussian:
        """The point mass at `x` (a Gaussian with zero covariance)."""
        x = as_float_array(x, "x")
        return cls(x, jnp.zeros(x.shape + x.shape[-1:], x.dtype))

    @classmethod
    def isotropic(cls, mean: Float[ArrayLike, "*batch d"], std: float) -> Gaussian:
        """$N(\\mu, \\sigma^2 I)$ with a dense covariance (for large $d$ use
        `Gaussian(mean, jaxou.Diagonal(jnp.full(d, std**2)))`)."""
        mean = as_float_array(mean, "mean")
        if not std > 0:
            raise ValueError(f"Gaussian.isotropic: std must be > 0, got {std}")
        d = mean.shape[-1]
        return cls(mean, (std**2) * jnp.eye(d, dtype=mean.dtype))

    def log_prob(self, x: Float[ArrayLike, "*shape d"]) -> Float[Array, "*shape"]:
        r"""$\log N(x; \mu, \Sigma) = -\frac12[d\ln 2\pi + \ln\det\Sigma +
        (x-\mu)^\top\Sigma^{-1}(x-\mu)]$, through a Cholesky factor (dense) or the
        operator's own solve and log-determinant."""
        x = jnp.asarray(x, self.mean.dtype)
        diff = x - self.mean
        const = self.dim * math.log(2 * math.pi)
        if isinstance(self.cov, AbstractOperator):
            flat = diff.reshape(-1, self.dim)
            quad = jnp.sum(flat * self.cov.solve(flat.T).T, -1).reshape(diff.shape[:-1])
            return -0.5 * (const + self.cov.logdet() + quad)
        L = jnp.linalg.cholesky(self.cov)
        z = jax.scipy.linalg.solve_triangular(L, diff[..., None], lower=True)[..., 0]
        logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), axis=-1)
        return -0.5 * (const + logdet + jnp.sum(z**2, -1))

    def sample(
        self, key: PRNGKeyArray, shape: tuple[int, ...] = ()
    ) -> Float[Array, "*shape *batch d"]:
        r"""Draw samples $\mu + R z$, $z \sim N(0, I)$, with $R R^\top = \Sigma$: the
        symmetric square root for a dense covariance (through `eigh`, so singular
        covariances, point masses included, work), the operator's own factor
        otherwise. Output shape `shape + batch_shape + (d,)`."""
        if isinstance(self.cov, AbstractOperator):
            z = jax.random.normal(key, shape + (self.cov.root_width,), self.mean.dtype)
            return self.mean + self.cov.root_mv(z)
        z = jax.random.normal(key, shape + self.mean.shape, self.mean.dtype)
        return self.mean + jnp.einsum("...ij,...j->...i", psd_sqrt(self.cov), z)

    def kl(self, other: Gaussian) -> Float[Array, "*batch"]:
        """KL(self ‖ other); see [`jaxou.kl`][]."""
        return kl_parts(self, other).total


def kl_parts(p: Gaussian, q: Gaussian) -> KLDecomposition:
    r"""KL(p ‖ q) between Gaussians and its two parts:

    $$\mathrm{KL} = \underbrace{\tfrac12[\mathrm{tr}(\Sigma_q^{-1}\Sigma_p) - d
    - \ln\det(\Sigma_q^{-1}\Sigma_p)]}_{\text{covariance}} +
    \underbrace{\tfrac12(\mu_p-\mu_q)^\top\Sigma_q^{-1}(\mu_p-\mu_q)}_{\text{shift}}.$$

    Computed through Cholesky factors $L_p, L_q$: with $M = L_q^{-1} L_p$ (lower
    triangular), the covariance part is
    $\frac12[\sum_i \varphi(2\ln M_{ii}) + \sum_{i>j} M_{ij}^2]$ with
    $\varphi(u) = e^u - 1 - u$, a sum of non-negative terms, so there is no
    cancellation and tiny divergences keep their relative accuracy. The shift
    part is $\frac12\|L_q^{-1}(\mu_p-\mu_q)\|^2$; both triangular solves share one
    call.

    **Singular laws.** A covariance with an eigenvalue at or below
    $\epsilon_d\,\lambda_{\max}$, $\epsilon_d = 10\,d\,\varepsilon$ of the dtype
    (`support_rtol`; $2.2\cdot10^{-15}d$ in float64), is singular: its law lives
    on $\mu + \mathrm{range}(\Sigma)$. Detected from the Cholesky pivots (one
    `lax.cond`, so regular inputs pay nothing more), the KL is then taken on the
    common support with pseudo-determinants: with $R$ an orthonormal basis of
    $\mathrm{range}(\Sigma_q)$ ($r$ columns) and $\Lambda_r$ its eigenvalues, it is
    the KL of the $r$-dimensional laws $N(R^\top\mu_p, R^\top\Sigma_pR)$ and
    $N(R^\top\mu_q, \Lambda_r)$. It is $+\infty$, with a warning that says why for
    concrete inputs, where the supports differ ($\Sigma_p$ has mass outside
    $\mathrm{range}(\Sigma_q)$, or is singular inside it) or where the mean shift
    leaves the support. Structured covariances that are singular go through the
    same dense computation (up to jaxou's dense limit).

    Structured covariances ([`jaxou.Diagonal`][], [`jaxou.DiagonalPlusLowRank`][])
    go through the Woodbury identity instead, in $O(dm^2)$ (see
    `_kl_parts_structured`); a structured law against a dense one is compared
    densely (up to jaxou's dense limit).

    **Returns:** a [`jaxou.KLDecomposition`][] `(total, covariance, shift)`, each
    of the broadcast batch shape.

    **Raises:** `ValueError` for different dimensions; `TypeError` for different
    dtypes or arguments that are not `Gaussian`s.
    """
    for name, x in (("p", p), ("q", q)):
        if not isinstance(x, Gaussian):
            raise TypeError(f"kl: {name} must be a jaxou.Gaussian, got {type(x).__name__}")
    if p.dim != q.dim:
        raise ValueError(f"kl: dimensions differ, p has d={p.dim} and q has d={q.dim}")
    if p.mean.dtype != q.mean.dtype:
        raise TypeError(f"kl: p is {p.mean.dtype} but q is {q.mean.dtype}")
    if p.is_dense and q.is_dense:
        return _with_reason(_kl_parts(p.mean, p.cov, q.mean, q.cov), p, q)
    P = as_dplr(p.cov) if not p.is_dense else None
    Q = as_dplr(q.cov) if not q.is_dense else None
    if P is not None and Q is not None:
        if is_concrete(P.diagonal, Q.diagonal):
            P, Q = P.with_positive_diagonal(), Q.with_positive_diagonal()
        parts, smallest = _kl_parts_structured(p.mean, P, q.mean, Q)
        tol = support_rtol(p.dim, p.mean.dtype)
        if not is_concrete(smallest) or float(smallest) > tol:
            return parts
        if p.dim > DENSE_LIMIT:
            eps = float(jnp.finfo(p.mean.dtype).eps)
            raise ValueError(
                f"kl: a covariance is numerically singular at d = {p.dim}: the smallest "
                f"eigenvalue of its whitened form is {float(smallest):.3g} of the largest, "
                f"at or below the support tolerance 10·d·ε = {tol:.3g} "
                f"({p.mean.dtype}, ε = {eps:.3g}). The KL on a common support needs the "
                f"dense computation, limited to d <= {DENSE_LIMIT}. If the laws are not "
                "meant to be singular, their condition number is beyond what this dtype "
                "resolves: use float64 (or regularise the covariances)."
            )
    # A dense operator, or a numerically singular structured one: densely.
    what = "kl with a singular or dense operator"
    dense_p, dense_q = densify(p.cov, what), densify(q.cov, what)
    return _with_reason(_kl_parts(p.mean, dense_p, q.mean, dense_q), p, q)


def _with_reason(parts: KLDecomposition, p: Gaussian, q: Gaussian) -> KLDecomposition:
    """Warn, with the reason, when a concrete KL is infinite."""
    if is_concrete(parts.total) and not np.all(np.isfinite(np.asarray(parts.total))):
        reason = _support_reason(p.mean, p.cov_matrix(), q.mean, q.cov_matrix())
        if reason is not None:
            warnings.warn(f"kl: KL(p ‖ q) = inf: {reason}", stacklevel=3)
    return parts


@eqx.filter_jit
def _kl_parts_structured(mp, P: DiagonalPlusLowRank, mq, Q: DiagonalPlusLowRank) -> KLDecomposition:
    r"""KL between $\Sigma_p = D_p + Z_pS_pZ_p^\top$ and $\Sigma_q = D_q +
    Z_qS_qZ_q^\top$, with $A = D_q^{-1}Z_q$ and $\Sigma_q^{-1} = D_q^{-1} - AKA^\top$
    (Woodbury; `DiagonalPlusLowRank.whitened`): the covariance part is
    $\frac12[\sum_i\varphi(\ln(g_{p,i}/g_{q,i})) + \mathrm{tr}(S_p Z_p^\top
    D_q^{-1}Z_p) - \mathrm{tr}(K A^\top\Sigma_p A) - \sum\ln(1+\tau_p) +
    \sum\ln(1+\tau_q)]$, $\varphi(u) = e^u-1-u$: the diagonal parts, which carry
    the $O(d)$ bulk, enter through $\varphi$ without cancellation. Every pass over
    $d$ is a matrix product over row blocks (no `[d, m]` temporary); the rest is
    $m \times m$."""
    gp, gq = P.diagonal, Q.diagonal
    wp, wq = P.whitened(basis=False), Q.whitened(basis=False)
    iq = 1 / gq
    diag_part = jnp.sum(_phi(jnp.log(gp) - jnp.log(gq)))
    if _diagonal_core(P.core):  # tr(S_p Z_pᵀD_q⁻¹Z_p) needs only column norms
        tr_low = jnp.sum(jnp.diag(P.core) * weighted_sq_norms(P.factor, iq))
    else:
        tr_low = jnp.sum(weighted_sym_gram(P.factor, iq) * P.core)
    AZ = weighted_gram(Q.factor, iq, P.factor)  # Aᵀ Z_p
    APA = weighted_sym_gram(Q.factor, gp * iq * iq) + AZ @ P.core @ AZ.T  # Aᵀ Σ_p A
    tr_corr = jnp.sum(wq.inner * APA)
    logdets = jnp.sum(jnp.log1p(wq.tau)) - jnp.sum(jnp.log1p(wp.tau))
    cov = 0.5 * (diag_part + tr_low - tr_corr + logdets)
    diff = mp - mq
    z = weighted_gram(Q.factor, iq, diff[:, None])[:, 0]
    shift = 0.5 * (jnp.sum(diff**2 / gq) - z @ wq.inner @ z)
    # The smallest eigenvalue of each whitened covariance I + Q diag(τ) Qᵀ, relative
    # to the largest: at or below support_rtol the law is singular.
    smallest = jnp.minimum(_relative_floor(wp.tau), _relative_floor(wq.tau))
    return KLDecomposition(cov + shift, cov, shift), smallest


def _relative_floor(tau: Array) -> Array:
    return (1 + jnp.min(tau, initial=0)) / (1 + jnp.max(tau, initial=0))


# One compiled program (eagerly, a dozen small operations each paid for its own
# compilation on first use: about 2 s); inlined under an outer `jax.jit`.
def support_rtol(d: int, dtype) -> float:
    """The eigenvalue tolerance of singular laws: an eigenvalue of a covariance at or
    below `support_rtol × λ_max` counts as zero (10 d ε of the dtype)."""
    return 10 * d * float(jnp.finfo(dtype).eps)


def _kl_degenerate(diff, p_cov, q_cov) -> KLDecomposition:
    r"""KL between possibly singular Gaussians, on their common support.

    With $\Sigma_q = V\Lambda V^\top$ and $R$ the eigenvectors whose eigenvalues
    exceed `support_rtol` × $\lambda_{\max}$ (rank $r$), the KL is finite iff $p$
    has the same support: $\Sigma_p$ has no mass outside $\mathrm{range}(R)$, is
    nonsingular inside it, and $\mu_p - \mu_q \in \mathrm{range}(R)$. Then, with
    $\mu_i$ the eigenvalues of $\Lambda_r^{-1/2}R^\top\Sigma_pR\Lambda_r^{-1/2}$,
    $\mathrm{KL} = \frac12\sum_i\varphi(\ln\mu_i) + \frac12\sum_{i\le r}
    (R^\top(\mu_p-\mu_q))_i^2/\lambda_i$ (pseudo-determinants: the terms are
    those of the $r$-dimensional law); otherwise it is $+\infty$."""
    d = diff.shape[-1]
    rtol = support_rtol(d, diff.dtype)
    lam, V = jnp.linalg.eigh(q_cov)
    keep = lam > rtol * jnp.maximum(lam[..., -1:], jnp.finfo(lam.dtype).tiny)
    both = keep[..., :, None] & keep[..., None, :]
    Pp = jnp.swapaxes(V, -1, -2) @ p_cov @ V
    scale_p = jnp.maximum(jnp.trace(p_cov, axis1=-2, axis2=-1), jnp.finfo(lam.dtype).tiny)
    leak = jnp.sum(jnp.where(both, 0, jnp.abs(Pp)), (-2, -1)) > rtol * scale_p
    root = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1)), 0)
    eye = jnp.eye(d, dtype=lam.dtype)
    M = jnp.where(both, Pp * root[..., :, None] * root[..., None, :], eye)
    mu = jnp.linalg.eigvalsh(M)
    collapsed = jnp.min(mu, -1) <= rtol * jnp.max(mu, -1)
    cov_part = 0.5 * jnp.sum(_phi(jnp.log(jnp.where(mu > 0, mu, 1))), -1)
    z = jnp.einsum("...ji,...j->...i", V, diff)
    off = jnp.sum(jnp.where(keep, 0, z**2), -1) > rtol**2 * jnp.maximum(jnp.sum(diff**2, -1), 0)
    shift = 0.5 * jnp.sum((z * root) ** 2, -1)
    inf = jnp.asarray(jnp.inf, cov_part.dtype)
    cov_part = jnp.where(leak | collapsed, inf, cov_part)
    shift = jnp.where(off, inf, shift)
    return KLDecomposition(cov_part + shift, cov_part, shift)


def _support_reason(p_mean, p_cov, q_mean, q_cov) -> str | None:
    """Why KL(p ‖ q) is infinite, for concrete singular inputs (or None)."""
    parts = _kl_degenerate(jnp.asarray(p_mean - q_mean), jnp.asarray(p_cov), jnp.asarray(q_cov))
    if np.all(np.isfinite(np.asarray(parts.total))):
        return None
    if not np.all(np.isfinite(np.asarray(parts.covariance))):
        return (
            "the supports of p and q differ (the range of p's covariance is not that of "
            "q's, up to eigenvalues below support_rtol × the largest)"
        )
    return "the mean shift leaves the support of q (the range of its covariance)"


@jax.jit
def _kl_parts(p_mean, p_cov, q_mean, q_cov) -> KLDecomposition:
    d = p_mean.shape[-1]
    batch = jnp.broadcast_shapes(p_mean.shape[:-1], q_mean.shape[:-1])
    covs = jnp.stack(
        [jnp.broadcast_to(p_cov, batch + (d, d)), jnp.broadcast_to(q_cov, batch + (d, d))]
    )
    diff = jnp.broadcast_to(p_mean - q_mean, batch + (d,))
    # Both factors come from ONE batched Cholesky call, with nothing else left to run
    # beside it. jaxlib's CPU LAPACK kernels split a batch over XLA's intra-op
    # thread pool and block a pool thread while they wait (jax::ParallelBatchMap):
    # two such calls, or one call next to other pool work, can starve a small pool
    # and hang for ever (seen on 2 cores with jax 0.10.2, in the two-Cholesky form
    # this replaces). One call also pays the per-call overhead once. The barrier
    # makes `diff` ready before the factorisation starts; values are unchanged.
    covs, diff = jax.lax.optimization_barrier((covs, diff))
    L = jnp.linalg.cholesky(covs)
    Lp, Lq = L[0], L[1]
    rhs = jnp.concatenate([Lp, diff[..., None]], axis=-1)
    sol = jax.lax.linalg.triangular_solve(Lq, rhs, left_side=True, lower=True)
    M = sol[..., :d]
    z = sol[..., d]
    log_ratio = jnp.log(jnp.diagonal(Lp, axis1=-2, axis2=-1)) - jnp.log(
        jnp.diagonal(Lq, axis1=-2, axis2=-1)
    )
    off = jnp.tril(M, k=-1)
    cov_part = 0.5 * (jnp.sum(_phi(2 * log_ratio), -1) + jnp.sum(off**2, (-2, -1)))
    shift = 0.5 * jnp.sum(z**2, -1)
    regular = KLDecomposition(cov_part + shift, cov_part, shift)
    # A numerically singular covariance (a Cholesky pivot² at or below support_rtol
    # × the largest diagonal entry, or a failed factorisation): the law lives on a
    # subspace, and the KL is taken there (pseudo-determinants) or is +inf.
    pivots = jnp.diagonal(L, axis1=-2, axis2=-1) ** 2
    scale = jnp.max(jnp.diagonal(covs, axis1=-2, axis2=-1), -1, keepdims=True)
    singular = ~jnp.all(pivots > support_rtol(d, p_mean.dtype) * scale)
    return jax.lax.cond(
        singular,
        lambda: _kl_degenerate(diff, covs[0], covs[1]),
        lambda: regular,
    )


def kl(p: Gaussian, q: Gaussian) -> Float[Array, "*batch"]:
    r"""KL(p ‖ q) between two Gaussians (batch dimensions broadcast).

    $\mathrm{KL}(N(\mu_p,\Sigma_p)\,\|\,N(\mu_q,\Sigma_q)) = \frac12[\mathrm{tr}
    (\Sigma_q^{-1}\Sigma_p) - d - \ln\det(\Sigma_q^{-1}\Sigma_p) + (\mu_p-\mu_q)^\top
    \Sigma_q^{-1}(\mu_p-\mu_q)]$. Both covariances must be positive definite
    (otherwise the result is NaN or infinite). See [`jaxou.kl_parts`][] for the
    split into covariance and shift parts.
    """
    return kl_parts(p, q).total


def w2(p: Gaussian, q: Gaussian) -> Float[Array, "*batch"]:
    r"""The Wasserstein-2 distance between Gaussians:

    $W_2^2 = \|\mu_p-\mu_q\|^2 + \mathrm{tr}\,\Sigma_p + \mathrm{tr}\,\Sigma_q
    - 2\,\mathrm{tr}\,(\Sigma_p^{1/2}\Sigma_q\Sigma_p^{1/2})^{1/2}$

    (Dowson & Landau 1982; Givens & Shortt 1984). The square roots go through
    `eigh` (positive semi-definite covariances are fine; `jax.scipy.linalg.sqrtm`
    would be CPU-only). Returns $W_2$, not its square.

    Two [`jaxou.Diagonal`][] covariances commute and have the closed form
    $\|\mu_p-\mu_q\|^2 + \sum_i(\sqrt{a_i}-\sqrt{b_i})^2$ at any $d$; other
    operator pairs have no closed form and are computed densely up to jaxou's dense
    limit ($d \le 2048$), with a `ValueError` above it.
    """
    if p.dim != q.dim:
        raise ValueError(f"w2: dimensions differ, p has d={p.dim} and q has d={q.dim}")
    if isinstance(p.cov, Diagonal) and isinstance(q.cov, Diagonal):
        # Commuting covariances: the cross term is Σ √(a_i b_i).
        roots = jnp.sqrt(jnp.clip(p.cov.diagonal, 0)) - jnp.sqrt(jnp.clip(q.cov.diagonal, 0))
        return jnp.sqrt(jnp.sum((p.mean - q.mean) ** 2) + jnp.sum(roots**2))
    if not (p.is_dense and q.is_dense) and p.dim > DENSE_LIMIT:
        raise ValueError(
            f"w2: no closed form for a {type(p.cov).__name__} and a {type(q.cov).__name__} "
            f"covariance at d = {p.dim} (the dense formula needs d <= {DENSE_LIMIT}); "
            "two Diagonal covariances have one"
        )
    p_cov, q_cov = densify(p.cov, "w2"), densify(q.cov, "w2")
    root_p = psd_sqrt(p_cov)
    inner = root_p @ q_cov @ root_p
    inner = 0.5 * (inner + jnp.swapaxes(inner, -1, -2))
    lam = jnp.linalg.eigvalsh(inner)
    cross = jnp.sum(jnp.sqrt(jnp.clip(lam, 0)), -1)
    tr = jnp.trace(p_cov, axis1=-2, axis2=-1) + jnp.trace(q_cov, axis1=-2, axis2=-1)
    sq = jnp.sum((p.mean - q.mean) ** 2, -1) + tr - 2 * cross
    return jnp.sqrt(jnp.clip(sq, 0))
