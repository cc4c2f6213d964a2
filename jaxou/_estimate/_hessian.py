r"""Hessian estimators: dense (every Hessian-vector product against the identity)
and Lanczos plus Hutchinson (a diagonal-plus-low-rank operator)."""

from __future__ import annotations

import abc
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._operator import AbstractOperator, Dense, DiagonalPlusLowRank
from ._krylov import PROBE_BLOCK, hutchinson_diagonal, lanczos
from ._objective import Objective
from ._warn import warn

__all__ = [
    "AbstractHessianEstimator",
    "DenseHessian",
    "LanczosHessian",
    "HessianEstimate",
    "DENSE_MAX_DIM",
]

# A dense d × d float64 matrix above this dimension takes more than 8.6 GB.
DENSE_MAX_DIM = 32768


class HessianEstimate(NamedTuple):
    """What a Hessian estimator returns: the `operator`, the standard error of each
    entry of its diagonal part `diagonal_stderr` (zeros where it is exact), and the
    number of diagonal entries `n_floored` that the estimator's stated rule raised."""

    operator: AbstractOperator
    diagonal_stderr: Float[Array, " d"]
    n_floored: int


class _HessianMatvec(eqx.Module):
    """v ↦ ∇²L(θ) v, with the objective's data as array leaves."""

    objective: Objective
    theta: Array

    def __call__(self, v):
        return self.objective.hvp(self.theta, v)


class _Deflated(eqx.Module):
    """v ↦ (M − U diag(λ) Uᵀ) v."""

    matvec: _HessianMatvec
    values: Array
    vectors: Array

    def __call__(self, v):
        return self.matvec(v) - self.vectors @ (self.values * (self.vectors.T @ v))


class AbstractHessianEstimator(eqx.Module):
    r"""How [`jaxou.estimate_hessian`][] measures $H = \nabla^2L(\theta)$:
    [`jaxou.DenseHessian`][] or [`jaxou.LanczosHessian`][]."""

    @property
    @abc.abstractmethod
    def randomized(self) -> bool:
        """Whether the estimator needs a PRNG key."""

    @abc.abstractmethod
    def check(self, dim: int) -> None:
        """Raise `ValueError` (before any work) if the options do not fit $d$."""

    @abc.abstractmethod
    def estimate(
        self, objective: Objective, theta: Float[Array, " d"], key: PRNGKeyArray | None
    ) -> HessianEstimate:
        """The estimate at `theta` of the objective's Hessian."""


class DenseHessian(AbstractHessianEstimator):
    r"""The exact Hessian as a [`jaxou.Dense`][] operator: $d$ Hessian-vector
    products (forward over reverse) against the columns of the identity, in vmapped
    blocks, symmetrised. Memory $O(d^2)$: for $d$ up to a few thousand.

    **Raises** (from [`jaxou.estimate_hessian`][]): `ValueError` above $d = 32768$
    (a float64 $d\times d$ matrix of over 8.6 GB); use [`jaxou.LanczosHessian`][].
    """

    randomized = False

    def check(self, dim: int) -> None:
        if dim > DENSE_MAX_DIM:
            raise ValueError(
                f"DenseHessian: d = {dim} is above {DENSE_MAX_DIM} (a dense d x d matrix of "
                f"{dim * dim * 8 / 1e9:.0f} GB in float64); use jaxou.LanczosHessian"
            )

    def estimate(self, objective, theta, key):
        H = _dense_hessian(_HessianMatvec(objective, theta))
        return HessianEstimate(Dense(H), jnp.zeros_like(theta), 0)


@eqx.filter_jit
def _dense_hessian(matvec: _HessianMatvec) -> Array:
    eye = jnp.eye(matvec.theta.size, dtype=matvec.theta.dtype)
    H = jax.lax.map(matvec, eye, batch_size=PROBE_BLOCK)
    return 0.5 * (H + H.T)


class LanczosHessian(AbstractHessianEstimator):
    r"""$H \approx \mathrm{diag}(h) + U\,\mathrm{diag}(\lambda)\,U^\top$, a
    [`jaxou.DiagonalPlusLowRank`][], never forming $H$:

    - $(\lambda, U)$, the top-`rank` eigenpairs, by [`jaxou.lanczos`][] on
      Hessian-vector products;
    - $h$, the diagonal of the rest $H - U\Lambda U^\top$, by Hutchinson's
      estimator ([`jaxou.hutchinson_diagonal`][]) with `probes` Rademacher probes
      on the deflated products (deflation removes the largest terms of the
      estimator's variance), with a standard error $s_i$ for each entry.

    **The rule for unresolved entries.** The Woodbury algebra of the operator needs
    $h > 0$, and an estimate may fall near or below zero by chance. An entry is
    *unresolved* when it lies below its own standard error, $h_i < s_i$ (negative
    ones included); resolved entries are kept as measured. Never a silent clamp:

    - with `floor` $= f > 0$ (a lower bound for the curvature that the estimator
      could not measure: the strength $\lambda_2$ of an L2 regulariser
      $\frac{\lambda_2}2|\theta|^2$ in the loss, which adds $\lambda_2$ to every
      diagonal entry), the unresolved entries below $f$ are set to $f$;
    - with `floor=None`, the unresolved entries are set to $s_i$ (the smallest value
      resolved from zero); an entry with $h_i \le 0$ and $s_i = 0$ (a parameter with
      no curvature at all) raises `ValueError`, since no positive value is
      consistent with it.

    Either way a `UserWarning` says how many entries were raised, and how many of
    them lay more than two standard errors below the value they were raised to (a
    sign that `floor` is too high, or that $\theta$ is not a minimum). With enough
    probes no entry is unresolved and nothing changes.

    **Arguments:**

    - `rank`: $k$, the number of eigenpairs ($1 \le k \le d$).
    - `probes`: Hutchinson's probes ($\ge 2$); the standard errors fall as
      $1/\sqrt{\text{probes}}$.
    - `iterations`: Lanczos steps (default `min(d, max(2k, k + 40))`).
    - `floor`: $f > 0$ or `None`, see above.
    """

    rank: int = eqx.field(static=True, default=20)
    probes: int = eqx.field(static=True, default=100)
    iterations: int | None = eqx.field(static=True, default=None)
    floor: float | None = eqx.field(static=True, default=None)

    randomized = True

    def __check_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LanczosHessian: rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.probes, int) or self.probes < 2:
            raise ValueError(f"LanczosHessian: probes must be an integer >= 2, got {self.probes!r}")
        if self.floor is not None and not float(self.floor) > 0:
            raise ValueError(f"LanczosHessian: floor must be > 0 or None, got {self.floor!r}")

    def check(self, dim: int) -> None:
        if self.rank > dim:
            raise ValueError(f"LanczosHessian: rank must be <= d = {dim}, got {self.rank}")
        if self.iterations is not None and not self.rank <= self.iterations <= dim:
            raise ValueError(
                f"LanczosHessian: iterations must lie in [rank, d] = [{self.rank}, {dim}], "
                f"got {self.iterations}"
            )

    def estimate(self, objective, theta, key):
        d, dtype = theta.size, theta.dtype
        k1, k2 = jax.random.split(key)
        matvec = _HessianMatvec(objective, theta)
        values, vectors = lanczos(
            matvec, d, self.rank, key=k1, iterations=self.iterations, dtype=dtype
        )
        diag, stderr = hutchinson_diagonal(
            _Deflated(matvec, values, vectors), d, key=k2, n_probes=self.probes, dtype=dtype
        )
        diag, n_floored = floor_diagonal(diag, stderr, self.floor)
        return HessianEstimate(
            DiagonalPlusLowRank(diag, vectors, jnp.diag(values)), stderr, n_floored
        )


def floor_diagonal(
    diag: Float[Array, " d"], stderr: Float[Array, " d"], floor: float | None
) -> tuple[Float[Array, " d"], int]:
    """The rule of [`jaxou.LanczosHessian`][] for unresolved entries (below their
    standard errors): returns the new diagonal and the number of entries raised,
    and warns when there are any."""
    h, s = np.asarray(diag), np.asarray(stderr)
    unresolved = h < s
    if floor is None:
        dead = (h <= 0) & (s == 0)
        if np.any(dead):
            raise ValueError(
                f"LanczosHessian: {int(dead.sum())} diagonal entries of the Hessian are "
                "exactly <= 0 with zero standard error (parameters with no curvature); "
                "add an L2 regulariser to the loss and pass its strength as floor="
            )
        low, target, to = unresolved, s, "their standard errors"
    else:
        low, target, to = unresolved & (h < floor), np.full_like(h, floor), f"floor={floor:g}"
    n = int(low.sum())
    if n:
        significant = int(np.sum(low & (target - h > 2 * s)))
        warn(
            f"LanczosHessian: {n} of {h.size} entries of Hutchinson's diagonal were below "
            f"their standard errors (unresolved) and were set to {to} ({significant} of "
            "them by more than 2 standard errors)"
        )
    return jnp.asarray(np.where(low, target, h), diag.dtype), n
