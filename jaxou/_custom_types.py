"""jaxtyping aliases used across the package."""

from jaxtyping import Array, ArrayLike, Float, Int

Matrix = Float[Array, "*batch d d"]
Vector = Float[Array, "*batch d"]
Status = Int[Array, "*batch"]
MatrixLike = Float[ArrayLike, "*batch d d"]
VectorLike = Float[ArrayLike, "*batch d"]
