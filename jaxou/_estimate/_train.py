"""Training to the minimum with Optax."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PRNGKeyArray

from ._objective import LossFn, Objective, flatten_params, make_objective

__all__ = ["Minimum", "train_to_minimum", "grad_norm"]


class Minimum(NamedTuple):
    r"""The result of [`jaxou.train_to_minimum`][].

    - `params`: the parameters reached, with the structure of the input `params`.
    - `loss`: the training loss $L$ there.
    - `grad_norm`: $\|\nabla L\|$ there (full batch): check it before trusting the
      minimum.
    - `losses`: the loss at each step (full batch), or of each mini-batch.
    """

    params: Any
    loss: Array
    grad_norm: Array
    losses: Array


def train_to_minimum(
    loss_fn: LossFn,
    params,
    data,
    *,
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 500,
    batch_size: int | None = None,
    key: PRNGKeyArray | None = None,
    chunk_size: int | None = None,
) -> Minimum:
    r"""Minimise $L(\theta) = \frac1N\sum_i\ell(\theta; x_i, y_i)$ with Optax.

    **Arguments:**

    - `loss_fn`: the per-example loss `loss_fn(params, x, y) -> scalar` (put any
      regulariser in it: $\ell + \frac\lambda2|\theta|^2$).
    - `params`: the starting point (a pytree or an Equinox module).
    - `data`: `(x, y)`, arrays with a leading example axis. They enter the
      compiled program as arguments (a new sample of the same shape reuses it).
    - `optimizer`: any Optax transformation. The default is full-batch L-BFGS
      (`optax.lbfgs()`, with its zoom line search), which reaches the minimum to
      near machine precision on smooth problems; transformations that take
      `value`, `grad`, `value_fn` receive them.
    - `steps`: optimizer steps (one `lax.scan`, one compilation).
    - `batch_size`: `None` for the full batch; otherwise mini-batches drawn
      uniformly with replacement from `key`.
    - `chunk_size`: examples per chunk of the full-batch loss and of the final
      gradient (`None`: as [`jaxou.estimate_hessian`][] chooses).

    **Returns:** a [`jaxou.Minimum`][] `(params, loss, grad_norm, losses)`;
    check `grad_norm` before trusting the minimum.

    **Raises:** `ValueError` for negative `steps`, a `batch_size` below 1 or
    mini-batches without a `key`; `TypeError`/`ValueError` for malformed `data`.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"train_to_minimum: steps must be an integer >= 0, got {steps!r}")
    if batch_size is not None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"train_to_minimum: batch_size must be >= 1, got {batch_size!r}")
        if key is None:
            raise ValueError("train_to_minimum: mini-batch training needs a key")
    theta0, unravel = flatten_params(params)
    objective = make_objective(loss_fn, unravel, data, chunk_size, theta0.dtype, theta0.size)
    optimizer = _with_extra_args(_default_optimizer() if optimizer is None else optimizer)
    key = jax.random.key(0) if key is None else key  # unused by full-batch training
    theta, losses = _train(objective, optimizer, theta0, key, steps, batch_size)
    loss, grad = _value_and_grad(objective, theta)
    return Minimum(unravel(theta), loss, jnp.linalg.norm(grad), losses)


@functools.cache
def _default_optimizer() -> optax.GradientTransformation:
    return optax.lbfgs()


@functools.lru_cache(maxsize=64)
def _with_extra_args(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """One wrapper per optimizer, so that a second call reuses the compiled program
    (the optimizer's functions are static arguments, compared by identity)."""
    return optax.with_extra_args_support(optimizer)


@eqx.filter_jit
def _value_and_grad(objective: Objective, theta: Array):
    return objective.value_and_grad(theta)


def grad_norm(objective: Objective, theta: Array) -> Array:
    r"""$\|\nabla L(\theta)\|$ (chunked)."""
    return jnp.linalg.norm(_value_and_grad(objective, theta)[1])


@eqx.filter_jit
def _train(objective, optimizer, theta0, key, steps, batch_size):
    x, y = objective.examples()
    n = objective.n_examples

    def step(carry, k):
        theta, state = carry
        if batch_size is None:
            value_fn = objective.loss
        else:
            idx = jax.random.randint(k, (batch_size,), 0, n)
            value_fn = lambda t: objective.batch_loss(t, x[idx], y[idx])  # noqa: E731
        value, grad = jax.value_and_grad(value_fn)(theta)
        updates, state = optimizer.update(
            grad, state, theta, value=value, grad=grad, value_fn=value_fn
        )
        return (optax.apply_updates(theta, updates), state), value

    keys = jax.random.split(key, steps)
    (theta, _), losses = jax.lax.scan(step, (theta0, optimizer.init(theta0)), keys)
    return theta, losses
