"""Small helpers every layer may use: array conversion and checks, dtype rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

__all__ = ["as_float_array", "common_float_dtype", "is_concrete", "is_symmetric"]


def as_float_array(x: ArrayLike, name: str) -> Array:
    """Convert `x` to a floating JAX array; integers and bools go to the default
    float dtype, complex inputs are refused. Never downcasts a float."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        dtype = x.dtype
    else:
        dtype = np.asarray(x).dtype
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"{name}: complex dtype {dtype} is not supported; pass reals")
    if not (
        jnp.issubdtype(dtype, jnp.floating)
        or jnp.issubdtype(dtype, jnp.integer)
        or jnp.issubdtype(dtype, jnp.bool_)
    ):
        raise TypeError(f"{name}: expected a numeric array, got dtype {dtype}")
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.asarray(x)
    return jnp.asarray(x, dtype=jnp.result_type(float))


def common_float_dtype(name_a: str, a: Array, name_b: str, b: Array):
    if a.dtype != b.dtype:
        raise TypeError(
            f"{name_a} has dtype {a.dtype} but {name_b} has dtype {b.dtype}; "
            "cast them to one floating dtype (jaxou never downcasts silently)"
        )
    return a.dtype


def is_symmetric(A: Array) -> Array:
    """True where A equals its transpose up to a few ulps (A of shape [..., d, d])."""
    eps = jnp.finfo(A.dtype).eps
    scale = jnp.max(jnp.abs(A), axis=(-2, -1))
    asym = jnp.max(jnp.abs(A - jnp.swapaxes(A, -1, -2)), axis=(-2, -1))
    return asym <= 8 * A.shape[-1] * eps * scale


def is_concrete(*xs) -> bool:
    """True when none of `xs` is a tracer (values can be checked eagerly)."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_range(name: str, x, lo, hi, lo_open: bool, hi_open: bool):
    """`x`, checked to lie in the interval (lo, hi) with the given open ends: a
    `ValueError` naming `name` for concrete values, `eqx.error_if` at run time for
    traced ones. Decided on the comparison itself: inside `jax.jit` it is traced
    even for constant inputs."""
    import equinox as eqx

    ok = ((x > lo) if lo_open else (x >= lo)) & ((x < hi) if hi_open else (x <= hi))
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    msg = f"{name} must lie in {interval}"
    if not isinstance(ok, jax.core.Tracer):
        bad = ~np.asarray(ok)
        if np.any(bad):
            raise ValueError(f"{msg}; got {np.asarray(x)[bad].ravel()[:3].tolist()}")
        return x
    return eqx.error_if(x, ~ok, msg)
