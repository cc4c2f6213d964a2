"""Real SGD over many seeds at once, and the discrete-time stationary covariance of
SGD on the quadratic model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._operator import AbstractOperator, densify
from ._objective import LossFn, Objective, Unravel, check_data, make_objective

__all__ = ["sample_sgd", "sgd_stationary_cov"]


def sgd_stationary_cov(
    hessian: Float[ArrayLike, "d d"] | AbstractOperator,
    noise_cov: Float[ArrayLike, "d d"] | AbstractOperator,
    lr: float,
    batch_size: float,
) -> Float[Array, "d d"]:
    r"""The stationary covariance of *discrete* SGD on the quadratic model,
    $\theta_{n+1} = \theta_n - \eta H(\theta_n-\theta^*) + \eta\,\xi_n$,
    $\mathrm{Cov}\,\xi_n = C/B$: the discrete Lyapunov equation
    $\Sigma = (I-\eta H)\Sigma(I-\eta H)^\top + (\eta^2/B)\,C$. In the
    eigenbasis $H = V\Lambda V^\top$, $\tilde C = V^\top CV$:

    $$\tilde\Sigma_{ij} = \frac{(\eta/B)\,\tilde C_{ij}}{\lambda_i+\lambda_j-
    \eta\lambda_i\lambda_j},$$

    against $(\eta/B)\tilde C_{ij}/(\lambda_i+\lambda_j)$ for the continuous OU
    model: the two differ at $O(\eta\lambda)$, and the discrete one exists only
    for $\eta\lambda_{\max} < 2$ (NaN/negative entries beyond). Dense: operators
    are densified (up to the dense fallback's size limit).
    """
    H = jnp.asarray(densify(hessian, "sgd_stationary_cov"))
    C = jnp.asarray(densify(noise_cov, "sgd_stationary_cov"), H.dtype)
    lam, V = jnp.linalg.eigh(H)
    Ct = V.T @ C @ V
    denom = lam[:, None] + lam[None, :] - lr * lam[:, None] * lam[None, :]
    S = V @ ((lr / batch_size) * Ct / denom) @ V.T
    return 0.5 * (S + S.T)


def sample_sgd(
    loss_fn: LossFn,
    initial: Float[ArrayLike, "seeds d"],
    data,
    *,
    unravel: Callable[[Array], Any],
    lr: float | Float[ArrayLike, ""],
    batch_size: int,
    steps: int | Array,
    key: PRNGKeyArray,
) -> Float[Array, "seeds d"]:
    r"""Run real SGD (`optax.sgd(lr)`) from each row of `initial` with its own
    key, all seeds at once (`jax.vmap` over seeds of one `lax.fori_loop` over
    steps), and return each seed's parameters after `steps` steps (flattened).
    Each step draws a mini-batch of `batch_size` examples uniformly with
    replacement, so that the mini-batch gradient noise has covariance $C/B$.

    The data, `lr` and `steps` are arguments of the compiled program (a grid over
    `lr` and `steps`, or a new sample of the same shape, compiles once);
    `batch_size` fixes a shape and compiles once per value.

    **Arguments:**

    - `loss_fn`: the per-example loss `loss_fn(params, x, y)`.
    - `initial`: the starting points, `[seeds, d]` (flattened parameters).
    - `data`: `(x, y)` with a leading example axis.
    - `unravel`: the map from a flat vector to `params` ([`jaxou.flatten_params`][]).
    - `lr`, `batch_size`, `steps`: SGD's learning rate, batch size and step count.
    - `key`: split into one key per seed.

    **Returns:** the parameters after `steps` steps, `[seeds, d]`.
    """
    initial = jnp.asarray(initial)
    if initial.ndim != 2:
        raise ValueError(f"sample_sgd: initial must be [seeds, d], got {initial.shape}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"sample_sgd: batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(unravel, Unravel):
        unravel = _Wrapped(unravel)
    x, y = check_data(data)
    objective = make_objective(
        loss_fn, unravel, (x, y), x.shape[0], initial.dtype, initial.shape[1]
    )
    keys = jax.random.split(key, initial.shape[0])
    lr = jnp.asarray(lr, initial.dtype)
    return _sample_sgd(objective, initial, lr, batch_size, jnp.asarray(steps), keys)


class _Wrapped(eqx.Module):
    """A user's own unravel function (hashed by identity)."""

    fn: Callable = eqx.field(static=True)

    def __call__(self, vector):
        return self.fn(vector)


@eqx.filter_jit
def _sample_sgd(objective: Objective, initial, lr, batch_size, steps, keys):
    x, y = objective.examples()
    n = objective.n_examples
    optimizer = optax.sgd(lr)

    def one_seed(theta0, key):
        def body(i, carry):
            theta, state = carry
            idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, n)
            grad = jax.grad(objective.batch_loss)(theta, x[idx], y[idx])
            updates, state = optimizer.update(grad, state, theta)
            return optax.apply_updates(theta, updates), state

        theta, _ = jax.lax.fori_loop(0, steps, body, (theta0, optimizer.init(theta0)))
        return theta

    return jax.vmap(one_seed)(initial, keys)
