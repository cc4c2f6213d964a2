"""Diagonal matrices."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._misc import as_float_array, is_concrete
from .base import AbstractOperator

__all__ = ["Diagonal", "check_diagonal"]


def _as_column(diagonal: Array, x: Array) -> Array:
    """The diagonal shaped to scale `x` ([d] or [d, k]) row by row."""
    return diagonal if x.ndim == 1 else diagonal[:, None]


def check_diagonal(name: str, g: Array, *, definite: bool) -> None:
    """Eager checks of a concrete diagonal: finite, positive (`definite`) or
    non-negative entries. Raises `ValueError` naming `name` and the first bad index."""
    if not is_concrete(g):
        return
    gn = np.asarray(g)
    if not np.all(np.isfinite(gn)):
        i = int(np.flatnonzero(~np.isfinite(gn))[0])
        raise ValueError(f"{name} has a non-finite diagonal entry ({gn[i]}) at index {i}")
    bad = gn <= 0 if definite else gn < 0
    if gn.size and np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        what = "positive definite" if definite else "positive semi-definite"
        raise ValueError(
            f"{name} is not {what}: its diagonal has the entry {gn[i]:.3g} at index {i}"
        )


class Diagonal(AbstractOperator):
    r"""$\mathrm{diag}(g)$: `diagonal` $g$ `[d]`. An isotropic matrix
    $\sigma^2 I$ is `Diagonal(jnp.full(d, sigma**2))`.

    **Arguments:**

    - `diagonal`: the entries $g$, shape `[d]`.

    **Raises:** `ValueError` if `diagonal` is not a vector.
    """

    diagonal: Float[Array, " d"]

    def __init__(self, diagonal: Float[ArrayLike, " d"]):
        diagonal = as_float_array(diagonal, "diagonal")
        if diagonal.ndim != 1:
            raise ValueError(f"Diagonal: diagonal must be [d], got shape {diagonal.shape}")
        self.diagonal = diagonal

    @property
    def dim(self) -> int:
        return self.diagonal.shape[0]

    @property
    def dtype(self):
        return self.diagonal.dtype

    def mv(self, x):
        return _as_column(self.diagonal, x) * x

    def solve(self, x):
        return x / _as_column(self.diagonal, x)

    def logdet(self):
        return jnp.sum(jnp.log(self.diagonal))

    def trace(self):
        return jnp.sum(self.diagonal)

    def diagonal_values(self):
        return self.diagonal

    def as_matrix(self):
        return jnp.diag(self.diagonal)

    def scale(self, c):
        return Diagonal(c * self.diagonal)

    @property
    def root_width(self) -> int:
        return self.dim

    def root_mv(self, z):
        return z * jnp.sqrt(jnp.clip(self.diagonal, 0))

    def check(self, name: str, *, definite: bool) -> None:
        check_diagonal(name, self.diagonal, definite=definite)
