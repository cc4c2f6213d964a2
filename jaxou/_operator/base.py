"""The abstract covariance operator: a symmetric d × d matrix known through its algebra."""

from __future__ import annotations

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["AbstractOperator", "DENSE_LIMIT"]

# Where no structured algorithm exists, an operator of at most this dimension falls
# back to dense algebra (a d × d float64 matrix of 32 MB); above it jaxou refuses
# with an error that names the missing algorithm.
DENSE_LIMIT = 2048


class AbstractOperator(eqx.Module):
    r"""A symmetric $d \times d$ matrix (a Hessian, a covariance) represented by
    what the Gaussian algebra needs rather than by its entries.

    Concrete operators: [`jaxou.Dense`][], [`jaxou.Diagonal`][] and
    [`jaxou.DiagonalPlusLowRank`][]. Each knows its own matrix-vector products,
    solves, log-determinant, trace, diagonal and square-root factor, so that the
    code above (Gaussians, SGD stages, bounds) never asks which kind of matrix it
    holds. `as_matrix()` gives the dense matrix, for small $d$.
    """

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """The dimension $d$."""

    @property
    @abc.abstractmethod
    def dtype(self):
        """The floating dtype."""

    @abc.abstractmethod
    def mv(self, x: Float[Array, " d *k"]) -> Float[Array, " d *k"]:
        """$M x$ for a vector `[d]` or a block of columns `[d, k]`."""

    @abc.abstractmethod
    def solve(self, x: Float[Array, " d *k"]) -> Float[Array, " d *k"]:
        """$M^{-1} x$ for a vector `[d]` or a block of columns `[d, k]` (positive
        definite $M$)."""

    @abc.abstractmethod
    def logdet(self) -> Float[Array, ""]:
        r"""$\ln\det M$ (positive definite $M$)."""

    @abc.abstractmethod
    def trace(self) -> Float[Array, ""]:
        r"""$\mathrm{tr}\,M$."""

    @abc.abstractmethod
    def diagonal_values(self) -> Float[Array, " d"]:
        """The diagonal entries $M_{ii}$."""

    @abc.abstractmethod
    def as_matrix(self) -> Float[Array, "d d"]:
        """The dense $d \\times d$ matrix (for small $d$ and for tests)."""

    @abc.abstractmethod
    def scale(self, c: Float[Array, ""]) -> AbstractOperator:
        """$c M$ for a scalar $c$, in the same representation."""

    @abc.abstractmethod
    def root_mv(self, z: Float[Array, " *n r"]) -> Float[Array, " *n d"]:
        r"""$R z$ for a factor $R$ with $R R^\top = M$ ($M$ positive semi-definite),
        applied to each row of `z`: the map that turns standard normal draws into
        draws of $N(0, M)$. `z` has `root_width` columns."""

    @property
    @abc.abstractmethod
    def root_width(self) -> int:
        """The number of columns of the factor $R$ of `root_mv`."""

    @abc.abstractmethod
    def check(self, name: str, *, definite: bool) -> None:
        """Eager value checks (concrete values only; a no-op under `jit`): finite
        entries, symmetry, and positive (semi-)definiteness where it is cheap to
        tell. Raises `ValueError` naming `name`."""

    def quad(self, x: Float[Array, " d"]) -> Float[Array, ""]:
        r"""$x^\top M^{-1} x$."""
        return jnp.dot(x, self.solve(x))
