"""Conversions between representations."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array

from .base import DENSE_LIMIT, AbstractOperator
from .dense import Dense
from .diagonal import Diagonal
from .lowrank import DiagonalPlusLowRank

__all__ = ["as_dplr", "densify"]


def as_dplr(x: AbstractOperator) -> DiagonalPlusLowRank | None:
    """A [`jaxou.DiagonalPlusLowRank`][] view of a structured operator (a
    `Diagonal` has rank 0); `None` for a dense one."""
    if isinstance(x, DiagonalPlusLowRank):
        return x
    if isinstance(x, Diagonal):
        z = jnp.zeros((x.dim, 0), x.dtype)
        return DiagonalPlusLowRank(x.diagonal, z, jnp.zeros((0, 0), x.dtype))
    return None


def densify(x: Array | AbstractOperator, what: str) -> Array:
    """The dense matrix of `x` where no structured algorithm exists for `what`;
    refuses above `DENSE_LIMIT` with an error naming the missing algorithm."""
    if not isinstance(x, AbstractOperator):
        return x
    if isinstance(x, Dense):
        return x.matrix
    if x.dim > DENSE_LIMIT:
        raise ValueError(
            f"{what} has no structured algorithm for a {type(x).__name__} operator yet, and "
            f"d = {x.dim} is above the dense fallback's limit of {DENSE_LIMIT} "
            "(a d x d matrix would be formed)"
        )
    return x.as_matrix()
