"""Layer 2: multivariate Gaussians, their KL divergence (split into its two parts),
Wasserstein-2 distance, log-density and sampling."""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._linalg import as_float_array
from ._numerics import expm1mx as _phi

__all__ = ["Gaussian", "KLDecomposition", "kl", "kl_parts", "w2"]


class KLDecomposition(NamedTuple):
    """A Gaussian KL divergence and its two parts: `total = covariance + shift`."""

    total: Array
    covariance: Array
    shift: Array


class Gaussian(eqx.Module):
    r"""A multivariate normal law $N(\mu, \Sigma)$, with optional leading batch
    dimensions shared by `mean` and `cov`.

    **Arguments:**

    - `mean`: $\mu$, shape `[*batch, d]`.
    - `cov`: $\Sigma$, symmetric positive semi-definite, shape `[*batch, d, d]`
      (positive definite wherever a density, a KL or a log-density is asked).

    **Raises:** `ValueError` if the shapes do not fit; `TypeError` for mismatched
    float dtypes or complex inputs.
    """

    mean: Float[Array, "*batch d"]
    cov: Float[Array, "*batch d d"]

    def __init__(self, mean: Float[ArrayLike, "*batch d"], cov: Float[ArrayLike, "*batch d d"]):
        mean = as_float_array(mean, "mean")
        cov = as_float_array(cov, "cov")
        if mean.ndim < 1:
            raise ValueError(f"Gaussian: mean must be [..., d], got shape {mean.shape}")
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

    @classmethod
    def point(cls, x: Float[ArrayLike, "*batch d"]) -> Gaussian:
        """The point mass at `x` (a Gaussian with zero covariance)."""
        x = as_float_array(x, "x")
        return cls(x, jnp.zeros(x.shape + x.shape[-1:], x.dtype))

    @classmethod
    def isotropic(cls, mean: Float[ArrayLike, "*batch d"], std: float) -> Gaussian:
        """$N(\\mu, \\sigma^2 I)$."""
        mean = as_float_array(mean, "mean")
        if not std > 0:
            raise ValueError(f"Gaussian.isotropic: std must be > 0, got {std}")
        d = mean.shape[-1]
        return cls(mean, (std**2) * jnp.eye(d, dtype=mean.dtype))

    def log_prob(self, x: Float[ArrayLike, "*shape d"]) -> Float[Array, "*shape"]:
        r"""$\log N(x; \mu, \Sigma) = -\frac12[d\ln 2\pi + \ln\det\Sigma +
        (x-\mu)^\top\Sigma^{-1}(x-\mu)]$, through a Cholesky factor."""
        x = jnp.asarray(x, self.mean.dtype)
        L = jnp.linalg.cholesky(self.cov)
        diff = x - self.mean
        z = jax.scipy.linalg.solve_triangular(L, diff[..., None], lower=True)[..., 0]
        logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), axis=-1)
        return -0.5 * (self.dim * math.log(2 * math.pi) + logdet + jnp.sum(z**2, -1))

    def sample(
        self, key: PRNGKeyArray, shape: tuple[int, ...] = ()
    ) -> Float[Array, "*shape *batch d"]:
        r"""Draw samples $\mu + S z$, $z \sim N(0, I)$, with $S S^\top = \Sigma$ the
        symmetric square root (through `eigh`, so that singular covariances, point
        masses included, work). Output shape `shape + batch_shape + (d,)`."""
        lam, V = jnp.linalg.eigh(self.cov)
        root = V * jnp.sqrt(jnp.clip(lam, 0))[..., None, :]
        z = jax.random.normal(key, shape + self.mean.shape, self.mean.dtype)
        return self.mean + jnp.einsum("...ij,...j->...i", root, z)

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

    **Returns:** a [`jaxou.KLDecomposition`][] `(total, covariance, shift)`, each
    of the broadcast batch shape.
    """
    if p.dim != q.dim:
        raise ValueError(f"kl: dimensions differ, p has d={p.dim} and q has d={q.dim}")
    if p.mean.dtype != q.mean.dtype:
        raise TypeError(f"kl: p is {p.mean.dtype} but q is {q.mean.dtype}")
    return _kl_parts(p.mean, p.cov, q.mean, q.cov)


# One compiled program (eagerly, a dozen small operations each paid for its own
# compilation on first use: about 2 s); inlined under an outer `jax.jit`.
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
    return KLDecomposition(cov_part + shift, cov_part, shift)


def kl(p: Gaussian, q: Gaussian) -> Float[Array, "*batch"]:
    r"""KL(p ‖ q) between two Gaussians (batch dimensions broadcast).

    $\mathrm{KL}(N(\mu_p,\Sigma_p)\,\|\,N(\mu_q,\Sigma_q)) = \frac12[\mathrm{tr}
    (\Sigma_q^{-1}\Sigma_p) - d - \ln\det(\Sigma_q^{-1}\Sigma_p) + (\mu_p-\mu_q)^\top
    \Sigma_q^{-1}(\mu_p-\mu_q)]$. Both covariances must be positive definite
    (otherwise the result is NaN or infinite). See [`jaxou.kl_parts`][] for the
    split into covariance and shift parts.
    """
    return kl_parts(p, q).total


def _psd_sqrt(S: Array) -> Array:
    lam, V = jnp.linalg.eigh(S)
    return (V * jnp.sqrt(jnp.clip(lam, 0))[..., None, :]) @ jnp.swapaxes(V, -1, -2)


def w2(p: Gaussian, q: Gaussian) -> Float[Array, "*batch"]:
    r"""The Wasserstein-2 distance between Gaussians:

    $W_2^2 = \|\mu_p-\mu_q\|^2 + \mathrm{tr}\,\Sigma_p + \mathrm{tr}\,\Sigma_q
    - 2\,\mathrm{tr}\,(\Sigma_p^{1/2}\Sigma_q\Sigma_p^{1/2})^{1/2}$

    (Dowson & Landau 1982; Givens & Shortt 1984). The square roots go through
    `eigh` (positive semi-definite covariances are fine; `jax.scipy.linalg.sqrtm`
    would be CPU-only). Returns $W_2$, not its square.
    """
    if p.dim != q.dim:
        raise ValueError(f"w2: dimensions differ, p has d={p.dim} and q has d={q.dim}")
    root_p = _psd_sqrt(p.cov)
    inner = root_p @ q.cov @ root_p
    inner = 0.5 * (inner + jnp.swapaxes(inner, -1, -2))
    lam = jnp.linalg.eigvalsh(inner)
    cross = jnp.sum(jnp.sqrt(jnp.clip(lam, 0)), -1)
    tr = jnp.trace(p.cov, axis1=-2, axis2=-1) + jnp.trace(q.cov, axis1=-2, axis2=-1)
    sq = jnp.sum((p.mean - q.mean) ** 2, -1) + tr - 2 * cross
    return jnp.sqrt(jnp.clip(sq, 0))
