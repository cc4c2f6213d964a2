r"""Layer 7: estimation. The inputs of the OU model, measured on a real model
trained on real data with Optax.

Given a per-example loss $\ell(\theta; x, y)$ and a sample $(x_i, y_i)_{i\le N}$,
the training loss is $L(\theta) = \frac1N\sum_i \ell(\theta; x_i, y_i)$ and

- the minimum $\theta^* = \arg\min L$ ([`jaxou.train_to_minimum`][]),
- the Hessian $H = \nabla^2 L(\theta^*)$ ([`jaxou.estimate_hessian`][]): dense
  through `jax.hessian`, or Lanczos on Hessian-vector products for the top
  eigenpairs plus a Hutchinson estimate of the remaining diagonal,
- the per-example gradient covariance $C = \frac1N\sum_i (g_i - \bar g)
  (g_i - \bar g)^\top$, $g_i = \nabla\ell(\theta^*; x_i, y_i)$
  ([`jaxou.estimate_noise_cov`][]): with mini-batches of $B$ examples drawn
  uniformly *with replacement*, the mini-batch gradient has covariance exactly
  $C/B$ (without replacement, $\frac{N-B}{N-1}C/B$),
- the [`jaxou.SGDStage`][] they define ([`jaxou.estimate_stage`][]).

Parameters may be any pytree, an Equinox module included: the inexact-array
leaves are flattened into one vector $\theta\in\mathbb R^d$
(`jax.flatten_util.ravel_pytree`) and every function here returns, or takes,
the `unravel` function that maps $\theta$ back.

The large-$d$ path returns [`jaxou.LowRankPlusDiagonal`][] factors
$U\,\mathrm{diag}(\lambda)\,U^\top + \mathrm{diag}(r)$ (there is no structured
matrix type in jaxou yet; `to_dense()` builds the matrix where one is needed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._sgd import SGDStage

__all__ = [
    "LowRankPlusDiagonal",
    "Minimum",
    "StageEstimate",
    "flatten_params",
    "train_to_minimum",
    "estimate_hessian",
    "estimate_noise_cov",
    "estimate_stage",
    "per_example_grads",
    "lanczos",
    "hutchinson_diagonal",
    "sgd_stationary_cov",
    "sample_sgd",
]

LossFn = Callable[[Any, Any, Any], Array]


# ---------------------------------------------------------------------------
# Flattening.


def flatten_params(params) -> tuple[Float[Array, " d"], Callable[[Array], Any]]:
    """`(theta, unravel)`: the inexact-array leaves of `params` (a pytree or an
    Equinox module) as one vector, and the function that rebuilds `params` from
    such a vector (the other leaves are kept as they are)."""
    arrays, static = eqx.partition(params, eqx.is_inexact_array)
    theta, unravel_arrays = ravel_pytree(arrays)
    if theta.size == 0:
        raise ValueError("params has no floating-point array leaves to estimate")

    def unravel(vector):
        return eqx.combine(unravel_arrays(vector), static)

    return theta, unravel


def _check_data(data, name: str = "data") -> tuple[tuple, int]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{name} must be a pair (x, y) of arrays with a leading example axis")
    x, y = (jnp.asarray(a) for a in data)
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: x and y need the same leading (example) dimension, got {x.shape}, {y.shape}"
        )
    if x.shape[0] < 1:
        raise ValueError(f"{name} is empty")
    return (x, y), int(x.shape[0])


def _flat_loss(loss_fn: LossFn, unravel) -> Callable[[Array, Array, Array], Array]:
    def f(theta, x, y):
        return loss_fn(unravel(theta), x, y)

    return f


def _mean_loss(loss_fn: LossFn, unravel, data) -> Callable[[Array], Array]:
    f = _flat_loss(loss_fn, unravel)
    x, y = data

    def L(theta):
        return jnp.mean(jax.vmap(f, in_axes=(None, 0, 0))(theta, x, y))

    return L


# ---------------------------------------------------------------------------
# Training.


class Minimum(NamedTuple):
    r"""The result of [`jaxou.train_to_minimum`][].

    - `params`: the parameters reached, with the structure of the input `params`.
    - `loss`: the training loss $L$ there.
    - `grad_norm`: $\|\nabla L\|$ there (full batch): check it before trusting the
      minimum.
    - `losses`: the loss at each step (full batch), or of each mini-batch.
    """

    params: Any  # same structure as the input params
    loss: Array  # training loss at the end
    grad_norm: Array  # |∇L| at the end (full batch)
    losses: Array  # the loss at each step (full batch) or of each mini-batch


def train_to_minimum(
    loss_fn: LossFn,
    params,
    data,
    *,
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 500,
    batch_size: int | None = None,
    key: PRNGKeyArray | None = None,
) -> Minimum:
    r"""Minimise $L(\theta) = \frac1N\sum_i\ell(\theta; x_i, y_i)$ with Optax.

    **Arguments:**

    - `loss_fn`: the per-example loss `loss_fn(params, x, y) -> scalar` (put any
      regulariser in it: $\ell + \frac\lambda2|\theta|^2$).
    - `params`: the starting point (a pytree or an Equinox module).
    - `data`: `(x, y)`, arrays with a leading example axis.
    - `optimizer`: any Optax transformation. The default is full-batch L-BFGS
      (`optax.lbfgs()`, with its zoom line search), which reaches the minimum to
      near machine precision on smooth problems; transformations that take
      `value`, `grad`, `value_fn` receive them.
    - `steps`: optimizer steps (one `lax.scan`, one compilation).
    - `batch_size`: `None` for the full batch; otherwise mini-batches drawn
      uniformly with replacement from `key`.

    **Returns:** a [`jaxou.Minimum`][] `(params, loss, grad_norm, losses)`;
    check `grad_norm` before trusting the minimum.
    """
    data, n = _check_data(data)
    if steps < 0:
        raise ValueError(f"train_to_minimum: steps must be >= 0, got {steps}")
    if batch_size is not None:
        if not 1 <= batch_size:
            raise ValueError(f"train_to_minimum: batch_size must be >= 1, got {batch_size}")
        if key is None:
            raise ValueError("train_to_minimum: mini-batch training needs a key")
    if optimizer is None:
        optimizer = optax.lbfgs()
    optimizer = optax.with_extra_args_support(optimizer)
    theta0, unravel = flatten_params(params)
    if key is None:
        key = jax.random.key(0)
    theta, losses = _train(loss_fn, unravel, optimizer, theta0, data, key, steps, batch_size)
    L = _mean_loss(loss_fn, unravel, data)
    loss, grad = _value_and_grad(L, theta)
    return Minimum(unravel(theta), loss, jnp.linalg.norm(grad), losses)


@eqx.filter_jit
def _value_and_grad(L, theta):
    return jax.value_and_grad(L)(theta)


@eqx.filter_jit
def _train(loss_fn, unravel, optimizer, theta0, data, key, steps, batch_size):
    x, y = data
    n = x.shape[0]
    f = _flat_loss(loss_fn, unravel)

    def batch_loss(theta, xb, yb):
        return jnp.mean(jax.vmap(f, in_axes=(None, 0, 0))(theta, xb, yb))

    state = optimizer.init(theta0)

    def step(carry, k):
        theta, state = carry
        if batch_size is None:
            xb, yb = x, y
        else:
            idx = jax.random.randint(k, (batch_size,), 0, n)
            xb, yb = x[idx], y[idx]
        value_fn = lambda t: batch_loss(t, xb, yb)  # noqa: E731
        value, grad = jax.value_and_grad(value_fn)(theta)
        updates, state = optimizer.update(
            grad, state, theta, value=value, grad=grad, value_fn=value_fn
        )
        return (optax.apply_updates(theta, updates), state), value

    keys = jax.random.split(key, steps)
    (theta, _), losses = jax.lax.scan(step, (theta0, state), keys)
    return theta, losses


# ---------------------------------------------------------------------------
# Krylov and stochastic estimators.


class LowRankPlusDiagonal(NamedTuple):
    r"""$M \approx U\,\mathrm{diag}(\lambda)\,U^\top + \mathrm{diag}(r)$: the top
    eigenpairs $(\lambda, U)$ (decreasing) and the diagonal $r$ of the rest
    $M - U\mathrm{diag}(\lambda)U^\top$. `residual_stderr` is the standard error
    of each entry of $r$ (zero where $r$ is exact)."""

    vectors: Float[Array, "d k"]
    values: Float[Array, " k"]
    residual_diagonal: Float[Array, " d"]
    residual_stderr: Float[Array, " d"]

    def diagonal(self) -> Float[Array, " d"]:
        """The estimate of diag(M)."""
        return jnp.sum(self.vectors**2 * self.values, axis=-1) + self.residual_diagonal

    def to_dense(self) -> Float[Array, "d d"]:
        """The dense $d\\times d$ matrix (for small enough d)."""
        M = (self.vectors * self.values) @ self.vectors.T
        return M + jnp.diag(self.residual_diagonal)


def lanczos(
    matvec: Callable[[Array], Array],
    dim: int,
    k: int,
    *,
    key: PRNGKeyArray,
    iterations: int | None = None,
    dtype=None,
) -> tuple[Float[Array, " k"], Float[Array, "d k"]]:
    r"""The top-`k` eigenpairs (largest algebraic eigenvalues, decreasing) of a
    symmetric linear operator given by `matvec`, by the Lanczos iteration with
    full re-orthogonalisation (classical Gram–Schmidt applied twice, which keeps
    the Krylov basis orthogonal to rounding; Golub & Van Loan, *Matrix
    Computations*, §10.1). `iterations` defaults to `min(dim, max(2k, k + 40))`;
    with `iterations == dim` the result is exact up to rounding. A breakdown
    (an invariant subspace found) restarts from a fresh random vector
    orthogonalised against the basis.

    **Returns:** `(values [k], vectors [d, k])`.
    """
    if not 1 <= k <= dim:
        raise ValueError(f"lanczos: k must lie in [1, {dim}], got {k}")
    m = iterations if iterations is not None else min(dim, max(2 * k, k + 40))
    if not k <= m <= dim:
        raise ValueError(f"lanczos: iterations must lie in [{k}, {dim}], got {m}")
    dtype = dtype if dtype is not None else jnp.result_type(float)
    return _lanczos(matvec, dim, k, m, key, dtype)


@eqx.filter_jit
def _lanczos(matvec, dim, k, m, key, dtype):
    randoms = jax.random.normal(key, (m, dim), dtype)
    Q = jnp.zeros((m + 1, dim), dtype)
    q0 = randoms[0] / jnp.linalg.norm(randoms[0])
    Q = Q.at[0].set(q0)
    alphas = jnp.zeros(m, dtype)
    betas = jnp.zeros(m, dtype)
    eps = jnp.finfo(dtype).eps

    def orth(Q, w, j):
        # Project out q_0..q_j (rows beyond j are zero, so the full product is fine).
        mask = (jnp.arange(m + 1) <= j).astype(dtype)
        for _ in range(2):
            w = w - ((Q @ w) * mask) @ Q
        return w

    def body(j, carry):
        Q, alphas, betas, scale = carry
        q = Q[j]
        w = matvec(q)
        alpha = q @ w
        scale = jnp.maximum(scale, jnp.abs(alpha))
        w = orth(Q, w, j)
        beta = jnp.linalg.norm(w)
        broke = beta <= 1e3 * eps * jnp.maximum(scale, 1e-300) * math.sqrt(dim)
        fresh = orth(Q, randoms[(j + 1) % m], j)
        nxt = jnp.where(broke, fresh / jnp.linalg.norm(fresh), w / jnp.where(broke, 1, beta))
        Q = Q.at[j + 1].set(nxt)
        alphas = alphas.at[j].set(alpha)
        betas = betas.at[j].set(jnp.where(broke, 0.0, beta))
        return Q, alphas, betas, scale

    Q, alphas, betas, _ = jax.lax.fori_loop(0, m, body, (Q, alphas, betas, jnp.zeros((), dtype)))
    T = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    theta, S = jnp.linalg.eigh(T)
    order = jnp.argsort(-theta)[:k]
    values = theta[order]
    vectors = Q[:m].T @ S[:, order]
    vectors = vectors / jnp.linalg.norm(vectors, axis=0)
    return values, vectors


def hutchinson_diagonal(
    matvec: Callable[[Array], Array],
    dim: int,
    *,
    key: PRNGKeyArray,
    n_probes: int = 100,
    dtype=None,
) -> tuple[Float[Array, " d"], Float[Array, " d"]]:
    r"""Hutchinson's estimate of $\mathrm{diag}(M)$: $\frac1n\sum_p z_p\odot Mz_p$
    with Rademacher probes $z_p$ (Bekas, Kokiopoulou & Saad 2007, *An estimator
    for the diagonal of a matrix*). Unbiased: $E[z_i(Mz)_i] = M_{ii}$, with
    variance $\sum_{j\ne i}M_{ij}^2$ per probe.

    **Returns:** `(diagonal [d], stderr [d])`, the standard error being the
    sample standard deviation over probes divided by $\sqrt n$.
    """
    if n_probes < 2:
        raise ValueError(f"hutchinson_diagonal: n_probes must be >= 2, got {n_probes}")
    dtype = dtype if dtype is not None else jnp.result_type(float)
    return _hutchinson(matvec, dim, key, n_probes, dtype)


@eqx.filter_jit
def _hutchinson(matvec, dim, key, n_probes, dtype):
    z = jax.random.rademacher(key, (n_probes, dim), dtype)
    samples = z * jax.lax.map(matvec, z)
    mean = jnp.mean(samples, 0)
    stderr = jnp.std(samples, 0, ddof=1) / math.sqrt(n_probes)
    return mean, stderr


# ---------------------------------------------------------------------------
# Hessian and gradient covariance.


def _hvp(L, theta):
    grad = jax.grad(L)

    def matvec(v):
        return jax.jvp(grad, (theta,), (v,))[1]

    return matvec


def estimate_hessian(
    loss_fn: LossFn,
    params,
    data,
    *,
    method: Literal["dense", "lanczos"] = "dense",
    k: int = 20,
    n_probes: int = 100,
    iterations: int | None = None,
    key: PRNGKeyArray | None = None,
) -> Float[Array, "d d"] | LowRankPlusDiagonal:
    r"""The Hessian $H = \nabla^2 L(\theta)$ of the mean training loss at `params`
    (in the flattened coordinates of [`jaxou.flatten_params`][]).

    - `method="dense"`: `jax.hessian` (forward-over-reverse), symmetrised; `[d, d]`.
    - `method="lanczos"`: the top-`k` eigenpairs by [`jaxou.lanczos`][] on
      Hessian-vector products (`jax.jvp` of `jax.grad`, never forming $H$), and
      the diagonal of the rest $H - U\Lambda U^\top$ by Hutchinson's estimator
      with `n_probes` probes (deflation removes the largest terms of the
      estimator's variance); a [`jaxou.LowRankPlusDiagonal`][]. `key` is needed.
    """
    data, _ = _check_data(data)
    theta, unravel = flatten_params(params)
    L = _mean_loss(loss_fn, unravel, data)
    if method == "dense":
        return _dense_hessian(L, theta)
    if method != "lanczos":
        raise ValueError(f"estimate_hessian: unknown method {method!r}; use 'dense' or 'lanczos'")
    if key is None:
        raise ValueError("estimate_hessian: method='lanczos' needs a key")
    d = theta.size
    k1, k2 = jax.random.split(key)
    matvec = _hvp(L, theta)
    values, vectors = lanczos(matvec, d, k, key=k1, iterations=iterations, dtype=theta.dtype)

    def deflated(v):
        return matvec(v) - vectors @ (values * (vectors.T @ v))

    diag, stderr = hutchinson_diagonal(deflated, d, key=k2, n_probes=n_probes, dtype=theta.dtype)
    return LowRankPlusDiagonal(vectors, values, diag, stderr)


@eqx.filter_jit
def _dense_hessian(L, theta):
    H = jax.hessian(L)(theta)
    return 0.5 * (H + H.T)


def per_example_grads(loss_fn: LossFn, params, data) -> Float[Array, "n d"]:
    """The per-example gradients $g_i = \\nabla\\ell(\\theta; x_i, y_i)$, `[N, d]`
    (`jax.vmap` of `jax.grad`), in the flattened coordinates."""
    data, _ = _check_data(data)
    theta, unravel = flatten_params(params)
    return _per_example_grads(_flat_loss(loss_fn, unravel), theta, data)


@eqx.filter_jit
def _per_example_grads(f, theta, data):
    x, y = data
    return jax.vmap(jax.grad(f), in_axes=(None, 0, 0))(theta, x, y)


def estimate_noise_cov(
    loss_fn: LossFn,
    params,
    data,
    *,
    method: Literal["dense", "lowrank"] = "dense",
    k: int = 20,
    key: PRNGKeyArray | None = None,
) -> Float[Array, "d d"] | LowRankPlusDiagonal:
    r"""The per-example gradient covariance $C = \frac1N\sum_i(g_i-\bar g)
    (g_i-\bar g)^\top$ at `params` (population normalisation $1/N$: the
    covariance of one example drawn uniformly from the sample, so that a
    mini-batch of $B$ drawn with replacement has gradient covariance $C/B$).

    - `method="dense"`: `[d, d]`.
    - `method="lowrank"`: the top-`k` eigenpairs (Lanczos on $v\mapsto
      G_c^\top G_c v/N$, $G_c$ the centred gradients) and the *exact* residual
      diagonal $\mathrm{diag}(C) - \sum_j\lambda_j u_j^2$; a
      [`jaxou.LowRankPlusDiagonal`][] (its `residual_stderr` is zero).
    """
    data, n = _check_data(data)
    G = per_example_grads(loss_fn, params, data)
    if method == "dense":
        return _dense_cov(G)
    if method != "lowrank":
        raise ValueError(f"estimate_noise_cov: unknown method {method!r}; use 'dense' or 'lowrank'")
    d = G.shape[1]
    key = jax.random.key(0) if key is None else key
    Gc = G - jnp.mean(G, 0)
    if not 1 <= k <= min(d, n):
        raise ValueError(f"estimate_noise_cov: k must lie in [1, min(d, N) = {min(d, n)}], got {k}")
    iterations = min(d, n, max(2 * k, k + 40))
    values, vectors = lanczos(_CovMatvec(Gc), d, k, key=key, iterations=iterations, dtype=G.dtype)
    diag = jnp.mean(Gc**2, 0) - jnp.sum(vectors**2 * values, -1)
    return LowRankPlusDiagonal(vectors, values, diag, jnp.zeros_like(diag))


class _CovMatvec(eqx.Module):
    Gc: Array

    def __call__(self, v):
        return self.Gc.T @ (self.Gc @ v) / self.Gc.shape[0]


@eqx.filter_jit
def _dense_cov(G):
    Gc = G - jnp.mean(G, 0)
    C = Gc.T @ Gc / G.shape[0]
    return 0.5 * (C + C.T)


# ---------------------------------------------------------------------------
# The stage.


class StageEstimate(NamedTuple):
    r"""The result of [`jaxou.estimate_stage`][].

    - `stage`: the [`jaxou.SGDStage`][] $(H, C, \theta^*, \eta, B)$, with dense
      matrices.
    - `unravel`: the function that maps a flat vector $\theta$ back to `params`.
    - `params`: the minimum, with the structure of the input `params`.
    - `hessian`, `noise_cov`: what [`jaxou.estimate_hessian`][] and
      [`jaxou.estimate_noise_cov`][] returned (dense, or
      [`jaxou.LowRankPlusDiagonal`][] factors).
    - `grad_norm`: $\|\nabla L(\theta^*)\|$, how close $\theta^*$ is to a
      stationary point.
    """

    stage: SGDStage  # H, C, θ*, lr, B (dense)
    unravel: Callable[[Array], Any]  # θ ↦ params
    params: Any  # the minimum, as params
    hessian: Array | LowRankPlusDiagonal  # what estimate_hessian returned
    noise_cov: Array | LowRankPlusDiagonal  # what estimate_noise_cov returned
    grad_norm: Array  # |∇L(θ*)|: how close θ* is to a stationary point


def estimate_stage(
    loss_fn: LossFn,
    params,
    data,
    *,
    lr: float,
    batch_size: float,
    train_steps: int = 500,
    optimizer: optax.GradientTransformation | None = None,
    hessian_method: Literal["dense", "lanczos"] = "dense",
    noise_method: Literal["dense", "lowrank"] = "dense",
    k: int = 20,
    n_probes: int = 100,
    key: PRNGKeyArray | None = None,
) -> StageEstimate:
    r"""Measure one SGD stage: train to the minimum (`train_steps` full-batch
    steps of `optimizer`, default L-BFGS; `train_steps=0` takes `params` as the
    minimum), then $H$ and $C$ there, and build the [`jaxou.SGDStage`][]
    $(H, C, \theta^*, \eta, B)$.

    With the structured methods the stage holds the dense reconstructions
    `to_dense()` of the low-rank-plus-diagonal factors (the Lyapunov solve of
    `SGDStage` is dense); the factors themselves are in the result.

    **Raises:** `ValueError` from `SGDStage` when the estimated Hessian is not
    positive definite (not a strict local minimum: add L2 regularisation, or
    train longer).
    """
    if train_steps > 0:
        params = train_to_minimum(
            loss_fn, params, data, optimizer=optimizer, steps=train_steps
        ).params
    theta, unravel = flatten_params(params)
    data, _ = _check_data(data)
    key = jax.random.key(0) if key is None else key
    k1, k2 = jax.random.split(key)
    H = estimate_hessian(
        loss_fn, params, data, method=hessian_method, k=k, n_probes=n_probes, key=k1
    )
    C = estimate_noise_cov(loss_fn, params, data, method=noise_method, k=k, key=k2)
    Hd = H.to_dense() if isinstance(H, LowRankPlusDiagonal) else H
    Cd = C.to_dense() if isinstance(C, LowRankPlusDiagonal) else C
    Cd = 0.5 * (Cd + Cd.T)
    _, grad = _value_and_grad(_mean_loss(loss_fn, unravel, data), theta)
    stage = SGDStage(Hd, Cd, theta, lr, batch_size)
    return StageEstimate(stage, unravel, params, H, C, jnp.linalg.norm(grad))


def sgd_stationary_cov(
    hessian: Float[ArrayLike, "d d"],
    noise_cov: Float[ArrayLike, "d d"],
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
    for $\eta\lambda_{\max} < 2$ (NaN/negative entries beyond).
    """
    H = jnp.asarray(hessian)
    C = jnp.asarray(noise_cov, H.dtype)
    lam, V = jnp.linalg.eigh(H)
    Ct = V.T @ C @ V
    denom = lam[:, None] + lam[None, :] - lr * lam[:, None] * lam[None, :]
    S = V @ ((lr / batch_size) * Ct / denom) @ V.T
    return 0.5 * (S + S.T)


# ---------------------------------------------------------------------------
# Real SGD, many seeds at once.


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

    `lr` and `steps` are traced (a grid over them compiles once);
    `batch_size` fixes a shape and compiles once per value.
    """
    data, n = _check_data(data)
    initial = jnp.asarray(initial)
    if initial.ndim != 2:
        raise ValueError(f"sample_sgd: initial must be [seeds, d], got {initial.shape}")
    if batch_size < 1:
        raise ValueError(f"sample_sgd: batch_size must be >= 1, got {batch_size}")
    keys = jax.random.split(key, initial.shape[0])
    lr = jnp.asarray(lr, initial.dtype)
    return _sample_sgd(
        loss_fn, unravel, initial, data, lr, int(batch_size), jnp.asarray(steps), keys
    )


@eqx.filter_jit
def _sample_sgd(loss_fn, unravel, initial, data, lr, batch_size, steps, keys):
    x, y = data
    n = x.shape[0]
    f = _flat_loss(loss_fn, unravel)
    optimizer = optax.sgd(lr)

    def batch_loss(theta, xb, yb):
        return jnp.mean(jax.vmap(f, in_axes=(None, 0, 0))(theta, xb, yb))

    def one_seed(theta0, key):
        def body(i, carry):
            theta, state = carry
            idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, n)
            grad = jax.grad(batch_loss)(theta, x[idx], y[idx])
            updates, state = optimizer.update(grad, state, theta)
            return optax.apply_updates(theta, updates), state

        theta, _ = jax.lax.fori_loop(0, steps, body, (theta0, optimizer.init(theta0)))
        return theta

    return jax.vmap(one_seed)(initial, keys)
