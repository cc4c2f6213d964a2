"""Cholesky factorisation and triangular solves written as matrix products, for many
small matrices at once (vmapped over a grid of points)."""

from __future__ import annotations

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float

# Cholesky factorisation and triangular solves written as matrix products, for
# many small matrices at once (vmapped over a grid of points).
#
# jaxlib's batched LAPACK custom calls on CPU factor one matrix per call at about
# 1 GFLOP/s and block threads of XLA's pool (two at once deadlocked on a 2-core
# machine); a column-by-column `fori_loop` avoids both but streams the whole
# [batch, d, d] array through memory d times, and reverse mode through it stores
# one d × d carry per column. These are the recursive (blocked) algorithms LAPACK
# itself uses (F. Gustavson 1997, Recursion leads to automatic variable blocking
# for dense linear-algebra algorithms; E. Elmroth et al. 2004, SIAM Review 46(1)):
# split in halves, recurse, and update the trailing block with one matrix product;
# below a few columns, a `fori_loop` on the small block (unrolled scalar code there
# makes XLA's compile time explode: minutes at d = 64). The arithmetic is that of
# the classical algorithms reordered, so they are backward stable like LAPACK's
# `potrf`/`trsm`. The recursion unrolls at trace time, `vmap` turns the products
# into batched matrix products, and the small kernels carry their own derivative
# rules, so a gradient costs a small multiple of the forward pass.

# Below these sizes the loops take over. Measured on a 2-core CPU (256 KL pairs,
# d = 16, 50, 64, 128): Cholesky blocks of 16 instead of 8 run as fast or faster
# and compile 10–40 % sooner (fewer loops to compile); solve blocks of 32 compile
# sooner still but run 30 % slower at d = 64.
_CHOL_BLOCK = 16
_SOLVE_BLOCK = 16


def _batched(fn, *args):
    """fn on single [n, n] blocks, vmapped over any leading batch dimensions."""
    for _ in range(args[0].ndim - 2):
        fn = jax.vmap(fn)
    return fn(*args)


def _split(n: int, block: int) -> int:
    """Where to split n columns: a multiple of the block size, near the middle."""
    half = -(-n // 2)
    return min(n - 1, block * -(-half // block))


def _cholesky_loop(A: Array) -> Array:
    """Left-looking Cholesky of one small block, column by column."""
    A = jnp.asarray(A)
    n = A.shape[-1]
    idx = jnp.arange(n)

    def body(j, L):
        v = A[:, j] - L @ L[j]  # L[j] is zero from column j on
        ljj = jnp.sqrt(v[j])
        col = jnp.where(idx > j, v / ljj, jnp.where(idx == j, ljj, 0))
        return L.at[:, j].set(col)

    return lax.fori_loop(0, n, body, jnp.zeros_like(A))


def _solve_lower_loop(L: Array, B: Array) -> Array:
    """Forward substitution on one small block, row by row."""
    n = L.shape[-1]
    L, B = jnp.tril(L), jnp.asarray(B)

    def body(i, X):
        row = (B[i] - L[i] @ X) / L[i, i]  # X[i:] is still zero
        return X.at[i].set(row)

    return lax.fori_loop(0, n, body, jnp.zeros_like(B))


def _lower_sym(T: Array) -> Array:
    """The symmetric matrix whose lower triangle is that of T (what a function
    that reads only the lower triangle sees of a perturbation T)."""
    low = jnp.tril(T)
    return low + jnp.tril(T, -1).T


# The two small kernels carry their own derivatives, written with the same small
# loops: reverse mode through a `fori_loop` would store the whole block at every
# step, while the rules below are linear maps that JAX transposes directly.
@jax.custom_jvp
def _cholesky_block(A: Array) -> Array:
    return _cholesky_loop(A)


@_cholesky_block.defjvp
def _cholesky_block_jvp(primals, tangents):
    # dL = L Φ(L⁻¹ dA L⁻ᵀ), Φ = lower triangle with the diagonal halved
    # (I. Murray 2016, Differentiation of the Cholesky decomposition, eq. 9).
    (A,), (dA,) = primals, tangents
    L = _cholesky_loop(A)
    Y = _solve_lower_loop(L, _lower_sym(dA))
    Z = _solve_lower_loop(L, Y.T)
    phi = jnp.tril(Z, -1) + 0.5 * jnp.diag(jnp.diagonal(Z))
    return L, L @ phi


@jax.custom_jvp
def _solve_lower_block(L: Array, B: Array) -> Array:
    return _solve_lower_loop(L, B)


def _solve_lower_block_jvp(primals, tangents):
    # L X = B  ⇒  L dX = dB - dL X. A constant L (a fixed prior's factor) or B
    # comes as a symbolic zero and costs nothing.
    (L, B), (dL, dB) = primals, tangents
    X = _solve_lower_loop(L, B)
    zero = jax.custom_derivatives.SymbolicZero
    if isinstance(dL, zero) and isinstance(dB, zero):
        return X, jnp.zeros_like(X)
    rhs = jnp.zeros_like(X) if isinstance(dB, zero) else dB
    if not isinstance(dL, zero):
        rhs = rhs - jnp.tril(dL) @ X
    return X, _solve_lower_loop(L, rhs)


_solve_lower_block.defjvp(_solve_lower_block_jvp, symbolic_zeros=True)


def matmul_cholesky(A: Float[Array, "*batch n n"]) -> Float[Array, "*batch n n"]:
    """The lower Cholesky factor L (A = L Lᵀ) of a symmetric positive definite A,
    by recursive blocking into matrix products (see above). Reads the lower
    triangle only. A non-positive-definite input gives NaN (a square root of a
    negative pivot), as LAPACK's `potrf` reports failure."""
    n = A.shape[-1]
    if n <= _CHOL_BLOCK:
        return _batched(_cholesky_block, A)
    n1 = _split(n, _CHOL_BLOCK)
    L11 = matmul_cholesky(A[..., :n1, :n1])
    # L21 = A21 L11⁻ᵀ, i.e. L11 L21ᵀ = A21ᵀ.
    L21 = jnp.swapaxes(matmul_solve_lower(L11, jnp.swapaxes(A[..., n1:, :n1], -1, -2)), -1, -2)
    L22 = matmul_cholesky(A[..., n1:, n1:] - L21 @ jnp.swapaxes(L21, -1, -2))
    zero = jnp.zeros(A.shape[:-2] + (n1, n - n1), A.dtype)
    top = jnp.concatenate([L11, zero], axis=-1)
    bottom = jnp.concatenate([L21, L22], axis=-1)
    return jnp.concatenate([top, bottom], axis=-2)


def matmul_solve_lower(
    L: Float[Array, "*batch n n"], B: Float[Array, "*batch n m"]
) -> Float[Array, "*batch n m"]:
    """X with L X = B for a lower triangular L (its upper triangle is ignored),
    by recursive blocking into matrix products (forward substitution reordered)."""
    n = L.shape[-1]
    if n <= _SOLVE_BLOCK:
        return _batched(_solve_lower_block, L, B)
    n1 = _split(n, _SOLVE_BLOCK)
    X1 = matmul_solve_lower(L[..., :n1, :n1], B[..., :n1, :])
    X2 = matmul_solve_lower(L[..., n1:, n1:], B[..., n1:, :] - L[..., n1:, :n1] @ X1)
    return jnp.concatenate([X1, X2], axis=-2)


def matmul_solve_lower_tri(
    L: Float[Array, "*batch n n"],
    R: Float[Array, "*batch n n"],
    E: Float[Array, "*batch n m"],
) -> tuple[Float[Array, "*batch n n"], Float[Array, "*batch n m"]]:
    """`(X, Y)` with L X = R and L Y = E, for lower triangular L and R (so X is
    lower triangular; upper triangles are ignored) and a dense E: the blocks
    above the diagonal of X are known to be zero and never computed, a third of
    the work of a dense solve (e.g. L_q⁻¹ L_p for a KL divergence)."""
    n = L.shape[-1]
    if n <= _SOLVE_BLOCK:
        sol = matmul_solve_lower(L, jnp.concatenate([jnp.tril(R), E], axis=-1))
        return sol[..., :n], sol[..., n:]
    n1 = _split(n, _SOLVE_BLOCK)
    X11, Y1 = matmul_solve_lower_tri(L[..., :n1, :n1], R[..., :n1, :n1], E[..., :n1, :])
    rhs = jnp.concatenate([R[..., n1:, :n1], E[..., n1:, :]], axis=-1) - L[
        ..., n1:, :n1
    ] @ jnp.concatenate([X11, Y1], axis=-1)
    X22, rest = matmul_solve_lower_tri(L[..., n1:, n1:], R[..., n1:, n1:], rhs)
    X21, Y2 = rest[..., :n1], rest[..., n1:]
    zero = jnp.zeros(L.shape[:-2] + (n1, n - n1), L.dtype)
    X = jnp.concatenate(
        [jnp.concatenate([X11, zero], axis=-1), jnp.concatenate([X21, X22], axis=-1)], axis=-2
    )
    return X, jnp.concatenate([Y1, Y2], axis=-2)
