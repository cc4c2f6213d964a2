"""jaxtyping aliases used across the package."""

from typing import Union

import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

Scalar = Float[Array, ""]
ScalarLike = Union[float, int, Float[ArrayLike, ""]]
Matrix = Float[Array, "*batch d d"]
Vector = Float[Array, "*batch d"]
Status = Int[Array, "*batch"]
RealLike = Union[float, int, np.ndarray, Array]

__all__ = [
    "Array",
    "ArrayLike",
    "Bool",
    "Float",
    "Int",
    "Matrix",
    "RealLike",
    "Scalar",
    "ScalarLike",
    "Status",
    "Vector",
]
