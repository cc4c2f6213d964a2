r"""Gradient-noise estimators. The per-example gradient covariance at $\theta$ is

$$C = \frac1N\sum_i (g_i - \bar g)(g_i - \bar g)^\top = Z Z^\top,\qquad
Z = \frac{1}{\sqrt N}\,G_c^\top,$$

$g_i = \nabla\ell(\theta; x_i, y_i)$, $G_c$ the centred gradients `[N, d]`: a
matrix of rank at most $N - 1$, held exactly by its factor $Z$ `[d, N]`
([`jaxou.ExactNoise`][]), densely ([`jaxou.DenseNoise`][]), or by its top
eigenpairs from a streamed sketch that never holds $G$ ([`jaxou.SketchedNoise`][]).
"""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._operator import AbstractOperator, Dense, DiagonalPlusLowRank
from ._hessian import DENSE_MAX_DIM
from ._objective import Objective
from ._warn import warn

__all__ = [
    "AbstractNoiseEstimator",
    "DenseNoise",
    "ExactNoise",
    "SketchedNoise",
    "centred_grads",
]


@eqx.filter_jit
def _per_example_grads(objective: Objective, theta: Array) -> Array:
    """`[N, d]`, one chunk of per-example gradients at a time."""
    grads = jax.lax.map(
        lambda c: objective.chunk_grads(theta, *c)[0], (objective.x, objective.y, objective.weight)
    )
    return grads.reshape(-1, theta.size)[: objective.n_examples]


@eqx.filter_jit
def centred_grads(objective: Objective, theta: Array) -> Array:
    r"""$G_c/\sqrt N$, `[N, d]`: the centred per-example gradients, scaled so that
    $C = (G_c/\sqrt N)^\top (G_c/\sqrt N)$."""
    G = _per_example_grads(objective, theta)
    return (G - jnp.mean(G, 0)) / math.sqrt(objective.n_examples)


@eqx.filter_jit
def _exact_factor(objective: Objective, theta: Array) -> Array:
    """Z = G_cᵀ/√N, `[d, N]`: the mean gradient in one streamed pass, then each
    chunk centred, scaled and transposed as it is computed (G is never held
    uncentred beside Z)."""
    n = objective.n_examples
    mean = _mean_grad(objective, theta)

    def chunk(c):
        g, mask = objective.chunk_grads(theta, *c)
        return ((g - mean) * (mask / math.sqrt(n))[:, None]).T

    Z = jax.lax.map(chunk, (objective.x, objective.y, objective.weight))  # [chunks, d, chunk]
    return jnp.moveaxis(Z, 0, 1).reshape(theta.size, -1)[:, :n]


def _mean_grad(objective: Objective, theta: Array) -> Array:
    """ḡ = (1/N) Σ g_i, one chunk at a time."""
    total = objective.over_chunks(
        lambda x, y, w: jnp.sum(objective.chunk_grads(theta, x, y, w)[0], 0),
        jnp.zeros_like(theta),
    )
    return total / objective.n_examples


class AbstractNoiseEstimator(eqx.Module):
    r"""How [`jaxou.estimate_noise_cov`][] measures the per-example gradient
    covariance $C$: [`jaxou.DenseNoise`][], [`jaxou.ExactNoise`][] or
    [`jaxou.SketchedNoise`][]."""

    @property
    @abc.abstractmethod
    def randomized(self) -> bool:
        """Whether the estimator needs a PRNG key."""

    @abc.abstractmethod
    def check(self, dim: int, n_examples: int) -> None:
        """Raise `ValueError` (before any work) if the options do not fit."""

    @abc.abstractmethod
    def estimate(
        self, objective: Objective, theta: Float[Array, " d"], key: PRNGKeyArray | None
    ) -> AbstractOperator:
        """The estimate of $C$ at `theta`."""


class DenseNoise(AbstractNoiseEstimator):
    r"""$C$ as a [`jaxou.Dense`][] operator, $G_c^\top G_c/N$ (symmetrised): for $d$
    up to a few thousand.

    **Raises** (from [`jaxou.estimate_noise_cov`][]): `ValueError` above
    $d = 32768$; use [`jaxou.ExactNoise`][] or [`jaxou.SketchedNoise`][]."""

    randomized = False

    def check(self, dim: int, n_examples: int) -> None:
        if dim > DENSE_MAX_DIM:
            raise ValueError(
                f"DenseNoise: d = {dim} is above {DENSE_MAX_DIM}; use jaxou.ExactNoise "
                "(the exact low-rank factor) or jaxou.SketchedNoise"
            )

    def estimate(self, objective, theta, key):
        return Dense(_dense_cov(centred_grads(objective, theta)))


@jax.jit
def _dense_cov(Z):
    C = Z.T @ Z
    return 0.5 * (C + C.T)


class ExactNoise(AbstractNoiseEstimator):
    r"""$C$ exactly, as its factor: the [`jaxou.DiagonalPlusLowRank`][]
    $\mathrm{diag}(0) + ZZ^\top$ with $Z = G_c^\top/\sqrt N$ `[d, N]` (identity
    core). Memory $O(Nd)$; the per-example gradients are computed one chunk at a time.

    The diagonal part is zero: $C$ has rank at most $N-1$, and the weights that no
    example's gradient reaches (those fed by always-blank pixels, say) have
    $C_{ii} = 0$ exactly. The large-scale Lyapunov solvers take such a $C$ as it is
    (their split $\Sigma_\infty = \frac\eta B\mathrm{diag}(c/2h) + \Delta$ allows
    zeros in $c$); the Woodbury algebra of a Gaussian needs a positive diagonal,
    which a law with this covariance does not have where no noise reaches.
    """

    randomized = False

    def check(self, dim: int, n_examples: int) -> None:
        pass

    def estimate(self, objective, theta, key):
        return DiagonalPlusLowRank(jnp.zeros_like(theta), _exact_factor(objective, theta))


class SketchedNoise(AbstractNoiseEstimator):
    r"""$C \approx \mathrm{diag}(r) + U\,\mathrm{diag}(\lambda)\,U^\top$, a
    [`jaxou.DiagonalPlusLowRank`][], from passes over the data that never hold
    more than one chunk of per-example gradients:

    - randomized subspace iteration (Halko, Martinsson & Tropp 2011, *Finding
      structure with randomness*, Alg. 4.4) with `rank + oversample` Gaussian test
      vectors and `power_iterations` passes of $Y \leftarrow CQ$, then a
      Rayleigh–Ritz step for the top-`rank` eigenpairs $(\lambda, U)$;
    - $r = \mathrm{diag}(C) - \sum_j \lambda_j u_j^2$, with $\mathrm{diag}(C)$
      exact (two-pass: mean, then centred squares).

    $r$ is the exact diagonal of $C - U\Lambda U^\top$, which is positive
    semi-definite when $U$ spans an invariant subspace; a sketch can miss that by a
    little. Entries of $r$ below zero are set to 0: silently within rounding
    ($10^3\varepsilon\max_i C_{ii}$), otherwise with a `UserWarning` that gives
    their number and the most negative value.

    Passes over the data: `power_iterations + 3`. For $N$ small enough that
    $Nd$ numbers fit, [`jaxou.ExactNoise`][] is exact and cheaper.

    **Arguments:**

    - `rank`: $k$, $1 \le k \le \min(d, N)$.
    - `oversample`: extra test vectors (default 10).
    - `power_iterations`: subspace iterations (default 2).
    """

    rank: int = eqx.field(static=True, default=20)
    oversample: int = eqx.field(static=True, default=10)
    power_iterations: int = eqx.field(static=True, default=2)

    randomized = True

    def __check_init__(self):
        for name in ("rank", "oversample", "power_iterations"):
            value = getattr(self, name)
            low = 1 if name == "rank" else 0
            if not isinstance(value, int) or value < low:
                raise ValueError(
                    f"SketchedNoise: {name} must be an integer >= {low}, got {value!r}"
                )

    def check(self, dim: int, n_examples: int) -> None:
        if self.rank > min(dim, n_examples):
            raise ValueError(
                f"SketchedNoise: rank must be <= min(d, N) = {min(dim, n_examples)}, "
                f"got {self.rank}"
            )

    def estimate(self, objective, theta, key):
        width = min(self.rank + self.oversample, theta.size)
        omega = jax.random.normal(key, (theta.size, width), theta.dtype)
        values, vectors, cdiag = _sketch(objective, theta, omega, self.rank, self.power_iterations)
        resid = np.asarray(cdiag) - np.asarray(jnp.sum(vectors**2 * values, -1))
        rounding = 1e3 * np.finfo(resid.dtype).eps * float(np.max(cdiag, initial=0))
        negative = resid < -rounding
        if np.any(negative):
            warn(
                f"SketchedNoise: {int(negative.sum())} of {resid.size} entries of the residual "
                f"diagonal diag(C) - diag(U Λ Uᵀ) were negative (down to {resid.min():.3g}, "
                f"against max diag(C) = {float(np.max(cdiag)):.3g}); set to 0"
            )
        resid = jnp.asarray(np.maximum(resid, 0), theta.dtype)
        return DiagonalPlusLowRank(resid, vectors, jnp.diag(values))


def _cov_pass(objective: Objective, theta: Array, mean: Array, Q: Array):
    """One pass over the data: $(CQ, \\mathrm{diag}\\,C)$ from the centred
    per-example gradients, one chunk at a time."""
    n = objective.n_examples

    def chunk(x, y, w):
        g, mask = objective.chunk_grads(theta, x, y, w)
        gc = (g - mean) * mask[:, None]
        return gc.T @ (gc @ Q) / n, jnp.sum(gc**2, 0) / n

    zero = (jnp.zeros_like(Q), jnp.zeros_like(theta))
    return objective.over_chunks(chunk, zero)


@eqx.filter_jit
def _sketch(objective, theta, omega, rank, power_iterations):
    mean = _mean_grad(objective, theta)
    Y, cdiag = _cov_pass(objective, theta, mean, omega)

    def power(_, Y):
        return _cov_pass(objective, theta, mean, jnp.linalg.qr(Y)[0])[0]

    Y = jax.lax.fori_loop(0, power_iterations, power, Y)
    Q = jnp.linalg.qr(Y)[0]
    B = Q.T @ _cov_pass(objective, theta, mean, Q)[0]
    lam, V = jnp.linalg.eigh(0.5 * (B + B.T))
    order = jnp.argsort(-lam)[:rank]
    return lam[order], Q @ V[:, order], cdiag
