r"""The training objective as a pytree: a per-example loss, the map from the flat
parameter vector back to the parameters, and the data, in chunks.

The data are *fields* of [`Objective`][], so that every compiled program of the
estimation layer takes them as arguments: nothing is closed over, XLA never
constant-folds the sample, and the size of a compiled program (and its compilation
time) does not grow with the number of examples $N$. The examples are stored as
`[n_chunks, chunk, ...]`, padded with copies of the first example of weight zero,
and every sum over examples is a `lax.scan` over chunks, so that the memory of a
gradient, a Hessian-vector product or a block of per-example gradients is bounded
by the chunk size, not by $N$.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

__all__ = ["Objective", "Unravel", "check_data", "flatten_params", "make_objective"]

LossFn = Callable[[Any, Any, Any], Array]

# With chunk_size=None, a chunk holds as many examples as fit a [chunk, d] block of
# per-example gradients of this many numbers (256 MB in float64): d = 126,090 gives
# chunks of 266 examples, d = 2,000 chunks of 16,777 (every sample of that size in one).
CHUNK_NUMBERS = 2**25


class Unravel(eqx.Module):
    """The map from a flat parameter vector back to the parameters' pytree. A
    module (not a closure), so that two calls of [`jaxou.flatten_params`][] on
    parameters of one structure give equal maps and compiled programs are reused."""

    unravel_arrays: Callable[[Array], Any]
    static: Any

    def __call__(self, vector: Float[Array, " d"]) -> Any:
        return eqx.combine(self.unravel_arrays(vector), self.static)


def flatten_params(params) -> tuple[Float[Array, " d"], Unravel]:
    """`(theta, unravel)`: the inexact-array leaves of `params` (a pytree or an
    Equinox module) as one vector, and the function that rebuilds `params` from
    such a vector (the other leaves are kept as they are).

    **Raises:** `ValueError` if `params` has no floating-point array leaves.
    """
    arrays, static = eqx.partition(params, eqx.is_inexact_array)
    theta, unravel_arrays = ravel_pytree(arrays)
    if theta.size == 0:
        raise ValueError("params has no floating-point array leaves to estimate")
    return theta, Unravel(unravel_arrays, static)


def check_data(data, name: str = "data") -> tuple[Array, Array]:
    """`(x, y)` as arrays with one leading example axis; errors name `name`."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{name} must be a pair (x, y) of arrays with a leading example axis")
    x, y = (jnp.asarray(a) for a in data)
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: x and y need the same leading (example) dimension, got {x.shape}, {y.shape}"
        )
    if x.shape[0] < 1:
        raise ValueError(f"{name} is empty")
    return x, y


def _chunked(a: Array, n_chunks: int, chunk: int) -> Array:
    pad = n_chunks * chunk - a.shape[0]
    if pad:
        a = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad,) + a.shape[1:])])
    return a.reshape((n_chunks, chunk) + a.shape[1:])


class Objective(eqx.Module):
    r"""$L(\theta) = \frac1N\sum_i \ell(\theta; x_i, y_i)$ with its data as array
    leaves. `weight[c, j]` is $1/N$ for a real example and 0 for padding."""

    loss_fn: LossFn = eqx.field(static=True)
    n_examples: int = eqx.field(static=True)
    unravel: Unravel
    x: Array
    y: Array
    weight: Array

    def example_loss(self, theta: Array, x: Array, y: Array) -> Array:
        """$\\ell(\\theta; x, y)$ for one example."""
        return self.loss_fn(self.unravel(theta), x, y)

    def batch_loss(self, theta: Array, x: Array, y: Array) -> Array:
        """The mean loss over a batch `(x, y)` of examples."""
        return jnp.mean(jax.vmap(self.example_loss, in_axes=(None, 0, 0))(theta, x, y))

    def examples(self) -> tuple[Array, Array]:
        """The `N` examples `(x, y)` without padding (a slice of the chunks)."""
        flat = lambda a: a.reshape((-1,) + a.shape[2:])[: self.n_examples]  # noqa: E731
        return flat(self.x), flat(self.y)

    def _chunk_loss(self, theta, x, y, w):
        return jnp.sum(w * jax.vmap(self.example_loss, in_axes=(None, 0, 0))(theta, x, y))

    def over_chunks(self, fn, init):
        """Σ over chunks of `fn(x_c, y_c, w_c)` (a pytree), one chunk at a time."""

        def body(acc, chunk):
            return jax.tree.map(jnp.add, acc, fn(*chunk)), None

        return jax.lax.scan(body, init, (self.x, self.y, self.weight))[0]

    def value_and_grad(self, theta: Float[Array, " d"]) -> tuple[Array, Array]:
        """$(L(\\theta), \\nabla L(\\theta))$, accumulated chunk by chunk."""
        vg = jax.value_and_grad(self._chunk_loss)
        zero = (jnp.zeros((), theta.dtype), jnp.zeros_like(theta))
        return self.over_chunks(lambda x, y, w: vg(theta, x, y, w), zero)

    def loss(self, theta: Float[Array, " d"]) -> Array:
        """$L(\\theta)$ (differentiable; its gradient holds every chunk's residuals:
        use [`value_and_grad`][] where memory matters)."""
        zero = jnp.zeros((), theta.dtype)
        return self.over_chunks(lambda x, y, w: self._chunk_loss(theta, x, y, w), zero)

    def hvp(self, theta: Float[Array, " d"], v: Float[Array, " d"]) -> Float[Array, " d"]:
        r"""$\nabla^2L(\theta)\,v$ (forward over reverse, chunk by chunk; `jax.vmap`
        it over a block of vectors to serve the whole block in one pass over the
        data)."""

        def one(x, y, w):
            grad = lambda t: jax.grad(self._chunk_loss)(t, x, y, w)  # noqa: E731
            return jax.jvp(grad, (theta,), (v,))[1]

        return self.over_chunks(one, jnp.zeros_like(v))

    def chunk_grads(self, theta: Float[Array, " d"], x, y, w) -> tuple[Array, Array]:
        """The per-example gradients of one chunk `[chunk, d]` and its mask
        (1 for real examples, 0 for padding)."""
        g = jax.vmap(jax.grad(self.example_loss), in_axes=(None, 0, 0))(theta, x, y)
        mask = (w > 0).astype(g.dtype)
        return g * mask[:, None], mask


def make_objective(
    loss_fn: LossFn, unravel: Unravel, data, chunk_size: int | None, dtype, dim: int
) -> Objective:
    """The [`Objective`][] of `loss_fn` on `data` in chunks of at most `chunk_size`
    examples (`None`: as many as keep a `[chunk, dim]` block under `CHUNK_NUMBERS`
    numbers), as few chunks as that allows, of equal size, with weights of the
    parameters' `dtype`."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if chunk_size is None:
        chunk_size = max(1, CHUNK_NUMBERS // dim)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    x, y = check_data(data)
    n = x.shape[0]
    n_chunks = math.ceil(n / chunk_size)
    chunk = math.ceil(n / n_chunks)
    weight = np.zeros(n_chunks * chunk)
    weight[:n] = 1 / n
    weight = jnp.asarray(weight.reshape(n_chunks, chunk), dtype)
    return Objective(
        loss_fn, n, unravel, _chunked(x, n_chunks, chunk), _chunked(y, n_chunks, chunk), weight
    )
