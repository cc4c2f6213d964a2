"""Layer 1: continuous Lyapunov solvers and the OU flow (e^{-At} and its noise integral).

Every solver here solves

    A X + X Aᵀ = Q

for a *stable* A, meaning every eigenvalue of A has a positive real part (so that
-A is Hurwitz and dX = -A X dt + ... is mean-reverting). This is SciPy's sign
convention (`scipy.linalg.solve_continuous_lyapunov(A, Q)`); python-control's
`lyap(A, Q)` solves A X + X Aᵀ + Q = 0 instead, i.e. the opposite sign of Q.

Derivatives never go through the eigenvectors or the iterations: the solve is
wrapped in `jax.lax.custom_linear_solve`, so its JVP and VJP are themselves
Lyapunov solves (the adjoint equation Aᵀ Y + Y A = W), which stays finite and
exact for repeated eigenvalues (an isotropic Hessian, say).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

__all__ = [
    "LyapunovStatus",
    "lyapunov",
    "ou_flow",
    "as_float_array",
    "is_symmetric",
]

_KRON_MAX_DIM = 8  # "auto" uses the direct Kronecker solve up to this dimension.


class LyapunovStatus(enum.IntEnum):
    """Status codes returned by [`jaxou.lyapunov`][] with `throw=False`."""

    SUCCESS = 0
    UNSTABLE = 1  # an eigenvalue of A has a non-positive real part
    NOT_CONVERGED = 2  # the sign iteration did not converge (A near-unstable?)


_STATUS_MESSAGE = (
    "lyapunov: the drift matrix A is not stable (an eigenvalue has a non-positive "
    "real part), so A X + X Aᵀ = Q has no stationary solution; or the general "
    "solver did not converge. Pass throw=False to get a status instead."
)


# ---------------------------------------------------------------------------
# Input handling shared by the whole package.


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


def _common_float_dtype(name_a: str, a: Array, name_b: str, b: Array):
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


# ---------------------------------------------------------------------------
# The three solvers, each for a single (d, d) problem, returning (X, status).


def _eigh_solve(A: Array, Q: Array) -> tuple[Array, Array]:
    """Symmetric A = V Λ Vᵀ: X = V [(Vᵀ Q V)_ij / (λ_i + λ_j)] Vᵀ."""
    # jnp.linalg.eigh symmetrises its input itself ((A + Aᵀ)/2, symmetrize_input=True),
    # so no second copy here; the result is bit-for-bit the same as symmetrising twice.
    lam, V = jnp.linalg.eigh(A)
    Qt = V.T @ Q @ V
    X = V @ (Qt / (lam[:, None] + lam[None, :])) @ V.T
    status = jnp.where(lam[0] > 0, LyapunovStatus.SUCCESS, LyapunovStatus.UNSTABLE)
    return X, status.astype(jnp.int32)


def _kron_solve(A: Array, Q: Array) -> tuple[Array, Array]:
    """Direct solve of (A ⊗ I + I ⊗ A) vec(X) = vec(Q) (row-major vec), O(d⁶).

    A second right-hand side solves A P + P Aᵀ = I with the same factorisation:
    by Lyapunov's theorem A is stable iff P is positive definite, which a
    Cholesky factorisation tells.
    """
    d = A.shape[-1]
    eye = jnp.eye(d, dtype=A.dtype)
    M = jnp.kron(A, eye) + jnp.kron(eye, A)
    rhs = jnp.stack([Q.reshape(-1), eye.reshape(-1)], axis=-1)
    sol = jnp.linalg.solve(M, rhs)
    X = sol[:, 0].reshape(d, d)
    P = sol[:, 1].reshape(d, d)
    chol = jnp.linalg.cholesky(0.5 * (P + P.T))
    stable = jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.diagonal(chol) > 0)
    status = jnp.where(stable, LyapunovStatus.SUCCESS, LyapunovStatus.UNSTABLE)
    return X, status.astype(jnp.int32)


def _sign_solve(A: Array, Q: Array, max_iter: int = 100) -> tuple[Array, Array]:
    """Matrix-sign-function Newton iteration (Roberts 1980; Benner & Quintana-Ortí
    1999), using only LU factorisations and products, so it runs on GPU/TPU.

    With Z = [[A, -Q], [0, -Aᵀ]], sign(Z) = [[I, -2X], [0, -I]]; the Newton step
    Z ← (Z + Z⁻¹)/2 in block form is

        A ← (c A + A⁻¹/c) / 2,    Q ← (c Q + A⁻¹ Q A⁻ᵀ / c) / 2,

    with determinant scaling c = |det A|^(-1/d) while far from convergence. A
    tends to sign(A), which is I exactly when A is stable, and Q to 2X.
    """
    d = A.shape[-1]
    eye = jnp.eye(d, dtype=A.dtype)
    eps = jnp.finfo(A.dtype).eps
    tol = 10 * d * eps

    def cond(state):
        k, _, _, err, prev_err = state
        # Stop on convergence, or when quadratic convergence stalls at rounding level.
        stalled = (err < 1e-3) & (err > 0.5 * prev_err)
        return (k < max_iter) & (err > tol) & ~stalled

    def body(state):
        k, Ak, Qk, err, _ = state
        lu, piv = jax.scipy.linalg.lu_factor(Ak)  # the one LU of the iteration
        Ainv = jax.scipy.linalg.lu_solve((lu, piv), eye)
        logdet = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(lu))))
        c = jnp.where(err > 1e-2, jnp.exp(-logdet / d), 1.0).astype(A.dtype)
        Anew = 0.5 * (c * Ak + Ainv / c)
        Qnew = 0.5 * (c * Qk + Ainv @ Qk @ Ainv.T / c)
        new_err = jnp.linalg.norm(Anew - Ak) / jnp.maximum(jnp.linalg.norm(Anew), 1)
        return k + 1, Anew, Qnew, new_err.astype(A.dtype), err

    init = (0, A, Q, jnp.asarray(jnp.inf, A.dtype), jnp.asarray(jnp.inf, A.dtype))
    k, Ak, Qk, err, _ = lax.while_loop(cond, body, init)
    stable = jnp.linalg.norm(Ak - eye) < 0.5 * jnp.sqrt(d)
    converged = err < 1e-3
    status = jnp.where(
        ~jnp.all(jnp.isfinite(Ak)) | (converged & ~stable),
        LyapunovStatus.UNSTABLE,
        jnp.where(converged, LyapunovStatus.SUCCESS, LyapunovStatus.NOT_CONVERGED),
    )
    return 0.5 * Qk, status.astype(jnp.int32)


_SOLVERS: dict[str, Callable[[Array, Array], tuple[Array, Array]]] = {
    "eigh": _eigh_solve,
    "kron": _kron_solve,
    "sign": _sign_solve,
}


def _solve_one(A: Array, Q: Array, method: str) -> tuple[Array, Array]:
    """One (d, d) problem with an implicitly differentiated solve."""
    solver = _SOLVERS[method]

    def matvec(X):
        return A @ X + X @ A.T

    if method == "eigh":
        # L(X) = AX + XAᵀ is self-adjoint (Frobenius inner product) for symmetric A.
        return lax.custom_linear_solve(
            matvec, Q, lambda _, b: solver(A, b), symmetric=True, has_aux=True
        )
    return lax.custom_linear_solve(
        matvec,
        Q,
        lambda _, b: solver(A, b),
        lambda _, b: solver(A.T, b),
        has_aux=True,
    )


@functools.partial(jax.jit, static_argnames="method")
def _solve_batch(A: Array, Q: Array, method: str) -> tuple[Array, Array]:
    # Jitted so that eager calls (the common interactive use) hit the compile cache.
    return jax.vmap(lambda a, q: _solve_one(a, q, method))(A, Q)


def lyapunov(
    A: Float[ArrayLike, "*batch d d"],
    Q: Float[ArrayLike, "*batch d d"],
    *,
    method: Literal["auto", "eigh", "sign", "kron"] = "auto",
    throw: bool = True,
) -> Float[Array, "*batch d d"] | tuple[Float[Array, "*batch d d"], Int[Array, "*batch"]]:
    r"""Solve the continuous Lyapunov equation $A X + X A^\top = Q$.

    This is SciPy's convention (`scipy.linalg.solve_continuous_lyapunov(A, Q)`).
    Note that python-control's `lyap(A, Q)` solves $A X + X A^\top + Q = 0$, the
    opposite sign of $Q$. For an OU process $dX = -A(X-\mu)dt + G\,dW$ the
    stationary covariance is `lyapunov(A, G @ G.T)`.

    $A$ must be *stable*: every eigenvalue has a positive real part. Then the
    solution is unique, $X = \int_0^\infty e^{-At} Q e^{-A^\top t} dt$, and it is
    symmetric (positive semi-definite) when $Q$ is.

    Works under `jax.jit`, `jax.vmap` and `jax.grad`; leading batch dimensions of
    `A` and `Q` broadcast against each other. Derivatives use the adjoint equation
    $A^\top Y + Y A = W$ through `jax.lax.custom_linear_solve`, never the
    eigenvectors or the iterations, so repeated eigenvalues are harmless.

    **Arguments:**

    - `A`: the drift matrix, shape `[*batch, d, d]`, stable.
    - `Q`: the right-hand side, shape `[*batch, d, d]`.
    - `method`:
        - `"eigh"`: symmetric $A = V\Lambda V^\top$,
          $X = V[(V^\top Q V)_{ij}/(\lambda_i+\lambda_j)]V^\top$. Uses the
          symmetric part of `A`. Fastest.
        - `"sign"`: any stable $A$; the scaled Newton iteration for the matrix
          sign function of $[[A, -Q], [0, -A^\top]]$ (Roberts 1980), only LU
          factorisations and products, so it runs on GPU and TPU; stops on
          convergence (quadratic) or when rounding stalls it.
        - `"kron"`: the direct $d^2 \times d^2$ Kronecker solve; a reference for
          small $d$ ($O(d^6)$ work).
        - `"auto"` (default): `"eigh"` if `A` is symmetric (up to a few ulps),
          otherwise `"kron"` for $d \le 8$ and `"sign"` above. With concrete inputs
          the choice is made in Python; under `jit` both branches are compiled and
          a `lax.cond` on the symmetry of the whole batch picks one at run time.
    - `throw`: if `True` (default), an unstable `A` raises an error (also under
      `jit`, through `equinox.error_if`). If `False`, return `(X, status)` where
      `status` (shape `batch`) holds [`jaxou.LyapunovStatus`][] codes and `X` is
      not meaningful where `status != 0`.

    **Returns:**

    `X` of shape `[*batch, d, d]` and dtype of the inputs; `(X, status)` if
    `throw=False`.

    **Raises:**

    - `ValueError` for non-square or mismatched shapes, or an unknown `method`.
    - `TypeError` for complex inputs or mismatched float dtypes.
    - `equinox.EquinoxRuntimeError` (at run time) if `A` is not stable.

    **References:** R. H. Bartels & G. W. Stewart (1972), Solution of the matrix
    equation AX + XB = C; J. D. Roberts (1980), Linear model reduction and solution
    of the algebraic Riccati equation by use of the sign function; P. Benner &
    E. S. Quintana-Ortí (1999), Solving stable generalized Lyapunov equations with
    the matrix sign function.
    """
    if method not in ("auto", "eigh", "sign", "kron"):
        raise ValueError(
            f"lyapunov: unknown method {method!r}; use 'auto', 'eigh', 'sign' or 'kron'"
        )
    A = as_float_array(A, "A")
    Q = as_float_array(Q, "Q")
    for name, M in (("A", A), ("Q", Q)):
        if M.ndim < 2 or M.shape[-1] != M.shape[-2]:
            raise ValueError(f"lyapunov: {name} must be [..., d, d] square, got {M.shape}")
    if A.shape[-1] != Q.shape[-1]:
        raise ValueError(f"lyapunov: A is {A.shape[-2:]} but Q is {Q.shape[-2:]}")
    _common_float_dtype("A", A, "Q", Q)
    try:
        batch = jnp.broadcast_shapes(A.shape[:-2], Q.shape[:-2])
    except ValueError:
        raise ValueError(
            f"lyapunov: batch shapes of A {A.shape[:-2]} and Q {Q.shape[:-2]} do not broadcast"
        ) from None
    d = A.shape[-1]
    A = jnp.broadcast_to(A, batch + (d, d)).reshape(-1, d, d)
    Q = jnp.broadcast_to(Q, batch + (d, d)).reshape(-1, d, d)

    general = "kron" if d <= _KRON_MAX_DIM else "sign"
    if method == "auto":
        if isinstance(A, jax.core.Tracer):
            X, status = lax.cond(
                jnp.all(is_symmetric(A)),
                lambda a, q: _solve_batch(a, q, "eigh"),
                lambda a, q: _solve_batch(a, q, general),
                A,
                Q,
            )
        else:
            chosen = "eigh" if bool(jnp.all(is_symmetric(A))) else general
            X, status = _solve_batch(A, Q, chosen)
    else:
        X, status = _solve_batch(A, Q, method)
    X = X.reshape(batch + (d, d))
    status = status.reshape(batch)
    if throw:
        X = eqx.error_if(X, status != LyapunovStatus.SUCCESS, _STATUS_MESSAGE)
        return X
    return X, status


# ---------------------------------------------------------------------------
# The OU flow over a time t: F = e^{-At} and Σ_t = ∫_0^t e^{-As} D e^{-Aᵀs} ds.


def _flow_symmetric(A: Array, D: Array, t: Array) -> tuple[Array, Array]:
    """Symmetric A = V Λ Vᵀ. In the eigenbasis
    (Σ_t)_ij = D̃_ij (1 - e^{-(λ_i+λ_j) t}) / (λ_i+λ_j), written with expm1 so that
    it keeps full relative accuracy for tiny t, and equals the stationary
    covariance for t = inf."""
    lam, V = jnp.linalg.eigh(0.5 * (A + A.T))
    s = lam[:, None] + lam[None, :]
    # -expm1(-s t)/s; at t = inf this is 1/s exactly.
    g = jnp.where(jnp.isinf(t), 1.0 / s, -jnp.expm1(-s * jnp.where(jnp.isinf(t), 0, t)) / s)
    F = (V * jnp.exp(-lam * t)[None, :]) @ V.T
    Sigma = V @ ((V.T @ D @ V) * g) @ V.T
    Sigma = eqx.error_if(
        Sigma,
        jnp.isinf(t) & ~(lam[0] > 0),
        "the drift matrix is not positive definite: there is no stationary law",
    )
    return F, Sigma


def _flow_general(A: Array, D: Array, t: Array) -> tuple[Array, Array]:
    """General stable A. For ||A|| t ≤ 2: Van Loan's block exponential
    expm([[-A, D], [0, Aᵀ]] t) = [[F, G], [0, e^{Aᵀt}]], Σ_t = G Fᵀ, accurate for
    tiny t. For larger t: Σ_t = Σ∞ - F Σ∞ Fᵀ, where there is no cancellation.

    Reference: C. F. Van Loan (1978), Computing integrals involving the matrix
    exponential, IEEE TAC 23(3).
    """
    d = A.shape[-1]
    norm_t = jnp.max(jnp.sum(jnp.abs(A), axis=0)) * jnp.where(jnp.isinf(t), 0, t)
    small = (norm_t <= 2.0) & ~jnp.isinf(t)
    t_fin = jnp.where(jnp.isinf(t), 0, t)
    # Clip the time in the Van Loan branch so that e^{Aᵀt} never overflows there.
    t_vl = jnp.where(small, t_fin, 0)
    block = jnp.block([[-A, D], [jnp.zeros_like(A), A.T]]) * t_vl
    E = jax.scipy.linalg.expm(block)
    F_vl = E[:d, :d]
    Sigma_vl = E[:d, d:] @ F_vl.T
    F_big = jnp.where(jnp.isinf(t), 0, jax.scipy.linalg.expm(-A * t_fin))
    S_inf = lyapunov(A, D, method="sign" if d > _KRON_MAX_DIM else "kron")
    Sigma_big = S_inf - F_big @ S_inf @ F_big.T
    F = jnp.where(small, F_vl, F_big)
    Sigma = jnp.where(small, Sigma_vl, Sigma_big)
    return F, Sigma


def ou_flow(
    A: Float[ArrayLike, "d d"],
    D: Float[ArrayLike, "d d"],
    t: Float[ArrayLike, ""],
    *,
    symmetric: bool | None = None,
) -> tuple[Float[Array, "d d"], Float[Array, "d d"]]:
    r"""The flow of $dX = -A X dt + G dW$ (with $D = GG^\top$) over a time $t$:
    $F = e^{-At}$ and $\Sigma_t = \int_0^t e^{-As} D e^{-A^\top s} ds$, so that
    $X_t \mid X_0 \sim N(F X_0, \Sigma_t)$. $t = \infty$ gives $F = 0$ and the
    stationary covariance. Accurate for tiny $t$ too (no $\Sigma_\infty -
    F\Sigma_\infty F^\top$ cancellation). Returns `(F, Σ_t)`, the latter
    symmetrised.

    `symmetric`: whether `A` is symmetric (then an eigendecomposition gives both
    closed-form); `None` decides from concrete values, or at run time under `jit`.
    """
    A = as_float_array(A, "A")
    D = as_float_array(D, "D")
    t = jnp.asarray(t, dtype=A.dtype)
    if symmetric is None:
        if isinstance(A, jax.core.Tracer):
            F, S = lax.cond(is_symmetric(A), _flow_symmetric, _flow_general, A, D, t)
        else:
            symmetric = bool(is_symmetric(A))
    if symmetric is not None:
        F, S = (_flow_symmetric if symmetric else _flow_general)(A, D, t)
    return F, 0.5 * (S + S.T)


# ---------------------------------------------------------------------------
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
