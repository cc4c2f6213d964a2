r"""The public estimation functions: $H$, $C$ and the stage they define."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from .._operator import AbstractOperator
from .._sgd import SGDStage
from ._hessian import AbstractHessianEstimator, HessianEstimate
from ._noise import AbstractNoiseEstimator, _per_example_grads
from ._objective import LossFn, Objective, flatten_params, make_objective
from ._train import grad_norm, train_to_minimum

__all__ = [
    "estimate_hessian",
    "estimate_noise_cov",
    "estimate_stage",
    "per_example_grads",
    "StageEstimate",
]


def _setup(loss_fn, params, data, chunk_size) -> tuple[Objective, Array]:
    theta, unravel = flatten_params(params)
    return make_objective(loss_fn, unravel, data, chunk_size, theta.dtype, theta.size), theta


def _check_estimator(name, estimator, kind, key, *sizes) -> None:
    if not isinstance(estimator, kind):
        raise TypeError(
            f"{name} must be an instance of jaxou.{kind.__name__}, got {type(estimator).__name__}"
        )
    estimator.check(*sizes)
    if estimator.randomized and key is None:
        raise ValueError(f"{type(estimator).__name__} is randomized and needs a key")


def _hessian(objective, theta, estimator, key) -> HessianEstimate:
    _check_estimator("hessian_estimator", estimator, AbstractHessianEstimator, key, theta.size)
    return estimator.estimate(objective, theta, key)


def _noise(objective, theta, estimator, key) -> AbstractOperator:
    _check_estimator(
        "noise_estimator", estimator, AbstractNoiseEstimator, key, theta.size, objective.n_examples
    )
    return estimator.estimate(objective, theta, key)


def estimate_hessian(
    loss_fn: LossFn,
    params,
    data,
    estimator: AbstractHessianEstimator,
    *,
    key: PRNGKeyArray | None = None,
    chunk_size: int | None = None,
) -> AbstractOperator:
    r"""The Hessian $H = \nabla^2 L(\theta)$ of the mean training loss
    $L(\theta) = \frac1N\sum_i\ell(\theta; x_i, y_i)$ at `params`, in the flattened
    coordinates of [`jaxou.flatten_params`][], as an operator.

    **Arguments:**

    - `loss_fn`: the per-example loss `loss_fn(params, x, y) -> scalar`.
    - `params`: where to measure (a pytree or an Equinox module).
    - `data`: `(x, y)`, arrays with a leading example axis; arguments of every
      compiled program (never constants), summed one chunk at a time.
    - `estimator`: [`jaxou.DenseHessian`][]`()` (a [`jaxou.Dense`][]) or
      [`jaxou.LanczosHessian`][]`(rank=..., probes=...)` (a
      [`jaxou.DiagonalPlusLowRank`][]; may warn, see its rule for unresolved
      diagonal entries).
    - `key`: for randomized estimators.
    - `chunk_size`: examples per chunk of every sum over examples; `None` (default)
      takes as many as keep a `[chunk, d]` block of per-example gradients under
      $2^{25}$ numbers (256 MB in float64).

    **Returns:** the operator. [`jaxou.estimate_stage`][] also returns the
    standard errors of a Lanczos Hessian's diagonal.

    **Raises:** `TypeError` for an estimator that is not one; `ValueError` for
    options that do not fit $d$, or a randomized estimator without a `key`.
    """
    objective, theta = _setup(loss_fn, params, data, chunk_size)
    return _hessian(objective, theta, estimator, key).operator


def estimate_noise_cov(
    loss_fn: LossFn,
    params,
    data,
    estimator: AbstractNoiseEstimator,
    *,
    key: PRNGKeyArray | None = None,
    chunk_size: int | None = None,
) -> AbstractOperator:
    r"""The per-example gradient covariance $C = \frac1N\sum_i(g_i-\bar g)
    (g_i-\bar g)^\top$, $g_i = \nabla\ell(\theta; x_i, y_i)$, at `params`, as an
    operator. Population normalisation $1/N$: the covariance of one example drawn
    uniformly from the sample, so that a mini-batch of $B$ drawn *with
    replacement* has gradient covariance exactly $C/B$ (without replacement,
    $\frac{N-B}{N-1}C/B$).

    **Arguments:**

    - `loss_fn`, `params`, `data`, `key`, `chunk_size`: as for
      [`jaxou.estimate_hessian`][].
    - `estimator`: [`jaxou.DenseNoise`][]`()` (a [`jaxou.Dense`][]),
      [`jaxou.ExactNoise`][]`()` (the exact factor, a
      [`jaxou.DiagonalPlusLowRank`][] of rank $N$ with a zero diagonal) or
      [`jaxou.SketchedNoise`][]`(rank=...)` (top eigenpairs plus the exact residual
      diagonal, streamed).

    **Returns:** the operator.

    **Raises:** as [`jaxou.estimate_hessian`][].
    """
    objective, theta = _setup(loss_fn, params, data, chunk_size)
    return _noise(objective, theta, estimator, key)


def per_example_grads(
    loss_fn: LossFn, params, data, *, chunk_size: int | None = None
) -> Float[Array, "n d"]:
    r"""The per-example gradients $g_i = \nabla\ell(\theta; x_i, y_i)$, `[N, d]`,
    in the flattened coordinates, computed one chunk of `chunk_size` examples at a
    time."""
    objective, theta = _setup(loss_fn, params, data, chunk_size)
    return _per_example_grads(objective, theta)


class StageEstimate(NamedTuple):
    r"""The result of [`jaxou.estimate_stage`][].

    - `stage`: the [`jaxou.SGDStage`][] $(H, C, \theta^*, \eta, B)$, its
      `hessian` and `noise_cov` the estimators' operators.
    - `unravel`: the function that maps a flat vector $\theta$ back to `params`.
    - `params`: the minimum, with the structure of the input `params`.
    - `grad_norm`: $\|\nabla L(\theta^*)\|$, how close $\theta^*$ is to a
      stationary point.
    - `hessian_stderr`: the standard error of each entry of the Hessian's
      diagonal part (zeros for [`jaxou.DenseHessian`][]).
    - `hessian_floored`: how many diagonal entries the rule of
      [`jaxou.LanczosHessian`][] raised.
    """

    stage: SGDStage
    unravel: Callable[[Array], Any]
    params: Any
    grad_norm: Array
    hessian_stderr: Array
    hessian_floored: int


def estimate_stage(
    loss_fn: LossFn,
    params,
    data,
    hessian_estimator: AbstractHessianEstimator,
    noise_estimator: AbstractNoiseEstimator,
    *,
    lr: float,
    batch_size: float,
    train_steps: int = 500,
    optimizer: optax.GradientTransformation | None = None,
    key: PRNGKeyArray | None = None,
    chunk_size: int | None = None,
) -> StageEstimate:
    r"""Measure one SGD stage: train to the minimum (`train_steps` full-batch steps
    of `optimizer`, default L-BFGS; `train_steps=0` takes `params` as the
    minimum), measure $H$ and $C$ there with the two estimators, and build the
    [`jaxou.SGDStage`][] $(H, C, \theta^*, \eta, B)$ of their operators (nothing
    is densified that the estimators did not make dense).

    **Arguments:** `loss_fn`, `params`, `data`, `key`, `chunk_size` as for
    [`jaxou.estimate_hessian`][]; the two estimators; `lr`, `batch_size` of the
    stage; `train_steps` and `optimizer` as for [`jaxou.train_to_minimum`][].

    **Returns:** a [`jaxou.StageEstimate`][].

    **Raises:** as [`jaxou.estimate_hessian`][], before any training; `ValueError`
    from `SGDStage` when the estimated Hessian is not positive definite (not a
    strict local minimum: add L2 regularisation, or train longer).
    """
    objective, theta = _setup(loss_fn, params, data, chunk_size)
    _check_estimator(
        "hessian_estimator", hessian_estimator, AbstractHessianEstimator, key, theta.size
    )
    _check_estimator(
        "noise_estimator",
        noise_estimator,
        AbstractNoiseEstimator,
        key,
        theta.size,
        objective.n_examples,
    )
    if train_steps > 0:
        params = train_to_minimum(
            loss_fn, params, data, optimizer=optimizer, steps=train_steps, chunk_size=chunk_size
        ).params
    theta, unravel = flatten_params(params)
    k1, k2 = jax.random.split(key) if key is not None else (None, None)
    h = _hessian(objective, theta, hessian_estimator, k1)
    C = _noise(objective, theta, noise_estimator, k2)
    stage = SGDStage(h.operator, C, theta, lr, batch_size)
    return StageEstimate(
        stage, unravel, params, grad_norm(objective, theta), h.diagonal_stderr, h.n_floored
    )
