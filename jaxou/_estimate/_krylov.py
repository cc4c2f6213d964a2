r"""Matrix-free estimators of a symmetric operator given by its matrix-vector
products: the top eigenpairs (Lanczos) and the diagonal (Hutchinson)."""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

__all__ = ["lanczos", "hutchinson_diagonal", "PROBE_BLOCK"]

# Hutchinson probes served by one vmapped block of matrix-vector products.
PROBE_BLOCK = 16


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
    Computations*, §10.1). A breakdown (an invariant subspace found) restarts from
    a fresh random vector orthogonalised against the basis.

    `matvec` is best an `eqx.Module` holding its arrays as fields (so that they
    enter the compiled program as arguments, not as constants).

    **Arguments:**

    - `matvec`: $v \mapsto Mv$, `[d] -> [d]`.
    - `dim`: $d$.
    - `k`: the number of eigenpairs, $1 \le k \le d$.
    - `key`: the starting vector's key.
    - `iterations`: Lanczos steps $m$, $k \le m \le d$; default
      `min(dim, max(2k, k + 40))`. With $m = d$ the result is exact up to rounding.
    - `dtype`: the floating dtype (default: JAX's default float).

    **Returns:** `(values [k], vectors [d, k])`.

    **Raises:** `ValueError` for `k` or `iterations` out of range.
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
    Q = Q.at[0].set(randoms[0] / jnp.linalg.norm(randoms[0]))
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

    zeros = jnp.zeros(m, dtype)
    Q, alphas, betas, _ = jax.lax.fori_loop(0, m, body, (Q, zeros, zeros, jnp.zeros((), dtype)))
    T = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    theta, S = jnp.linalg.eigh(T)
    order = jnp.argsort(-theta)[:k]
    vectors = Q[:m].T @ S[:, order]
    return theta[order], vectors / jnp.linalg.norm(vectors, axis=0)


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
    variance $\sum_{j\ne i}M_{ij}^2$ per probe. The probes go through `matvec` in
    vmapped blocks of 16.

    **Arguments:**

    - `matvec`: $v \mapsto Mv$, `[d] -> [d]` (vmappable).
    - `dim`: $d$.
    - `key`: the probes' key.
    - `n_probes`: $n \ge 2$.
    - `dtype`: the floating dtype (default: JAX's default float).

    **Returns:** `(diagonal [d], stderr [d])`, the standard error of each entry being
    the sample standard deviation over probes divided by $\sqrt n$.

    **Raises:** `ValueError` if `n_probes < 2`.
    """
    if n_probes < 2:
        raise ValueError(f"hutchinson_diagonal: n_probes must be >= 2, got {n_probes}")
    dtype = dtype if dtype is not None else jnp.result_type(float)
    return _hutchinson(matvec, dim, key, n_probes, dtype)


@eqx.filter_jit
def _hutchinson(matvec, dim, key, n_probes, dtype):
    z = jax.random.rademacher(key, (n_probes, dim), dtype)
    samples = z * jax.lax.map(matvec, z, batch_size=min(PROBE_BLOCK, n_probes))
    mean = jnp.mean(samples, 0)
    stderr = jnp.std(samples, 0, ddof=1) / math.sqrt(n_probes)
    return mean, stderr
