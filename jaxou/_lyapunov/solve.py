"""`jaxou.lyapunov`: dense Lyapunov solves with leading batch dimensions."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._misc import is_concrete, is_symmetric
from .auto import AutoLyapunov
from .base import (
    AbstractLyapunovSolver,
    LyapunovResult,
    LyapunovSolution,
    default_rtol,
    failure_messages,
)
from .dense import check_dense
from .sign import MatrixSign

__all__ = ["lyapunov"]


@eqx.filter_jit
def _solve_many(solver: AbstractLyapunovSolver, A: Array, Q: Array) -> LyapunovSolution:
    """`solver.solve` over a leading batch dimension. Jitted so that eager calls (the
    common interactive use) hit the compile cache."""
    run = lambda s, a, q: jax.vmap(s.solve)(a, q)
    if isinstance(solver, AutoLyapunov):
        # One choice for the whole batch (vmapping the per-problem choice would
        # turn its lax.cond into a select that runs both solvers).
        return solver._dispatch(A, Q, run)
    return run(solver, A, Q)


def _messages(solver: AbstractLyapunovSolver, sol: LyapunovSolution, dtype, d: int) -> list[str]:
    """The error messages, with the residual and the batch index of the first
    failure when the values are known (outside `jit`)."""
    name = type(solver).__name__
    if isinstance(solver, AutoLyapunov):
        name = "the solver chosen by AutoLyapunov"
    rtol = default_rtol(dtype, d) if solver.rtol is None else solver.rtol
    steps = solver.max_steps if isinstance(solver, (MatrixSign, AutoLyapunov)) else None
    if not is_concrete(sol.result):
        msgs = failure_messages(name, rtol, max_steps=steps)
    else:
        result = np.asarray(sol.result)
        first = np.unravel_index(int(np.argmax(result != 0)), result.shape)
        where = f" (batch index {tuple(int(i) for i in first)})" if result.ndim else ""
        residual = float(np.asarray(sol.residual)[first])
        msgs = failure_messages(name, rtol, max_steps=steps, residual=residual, where=where)
    return ["lyapunov: " + m for m in msgs]


def lyapunov(
    A: Float[ArrayLike, "*batch d d"],
    Q: Float[ArrayLike, "*batch d d"],
    *,
    solver: AbstractLyapunovSolver = AutoLyapunov(),  # noqa: B008 (immutable Module)
    throw: bool = True,
) -> Float[Array, "*batch d d"]:
    r"""Solve the continuous Lyapunov equation $A X + X A^\top = Q$.

    This is SciPy's convention (`scipy.linalg.solve_continuous_lyapunov(A, Q)`).
    Note that python-control's `lyap(A, Q)` solves $A X + X A^\top + Q = 0$, the
    opposite sign of $Q$. For an OU process $dX = -A(X-\mu)dt + G\,dW$ the
    stationary covariance is `lyapunov(A, G @ G.T)`.

    $A$ must be *stable*: every eigenvalue has a positive real part. Then the
    solution is unique, $X = \int_0^\infty e^{-At} Q e^{-A^\top t} dt$, and it is
    symmetric (positive semi-definite) when $Q$ is.

    Works under `jax.jit`, `jax.vmap` and `jax.grad`; leading batch dimensions of
    `A` and `Q` broadcast against each other (the solver's `solve` is vmapped over
    them). Derivatives use the adjoint equation $A^\top Y + Y A = W$ through
    `jax.lax.custom_linear_solve`, never the eigenvectors or the iterations, so
    repeated eigenvalues are harmless.

    Every solver checks its answer: it measures the relative residual
    $\|AX + XA^\top - Q\|_F / (2\|A\|_F\|X\|_F + \|Q\|_F)$ and reports a
    [`jaxou.LyapunovResult`][] other than `SUCCESSFUL` when the residual is above
    its `rtol`, when $A$ is not stable, or when an iteration did not converge.

    **Arguments:**

    - `A`: the drift matrix, shape `[*batch, d, d]`, stable.
    - `Q`: the right-hand side, shape `[*batch, d, d]`.
    - `solver`: a [`jaxou.AbstractLyapunovSolver`][]: [`jaxou.AutoLyapunov`][]
      (default: [`jaxou.Eigh`][] for symmetric $A$, else [`jaxou.Kronecker`][] for
      $d \le 8$ and [`jaxou.MatrixSign`][] above), or one of those by name.
    - `throw`: if `True` (default), a result other than `SUCCESSFUL` raises an
      error naming it (also under `jit`, through `equinox.error_if`). If `False`,
      `X` is `NaN` wherever the result is not `SUCCESSFUL` (per batch element).
      To get the result codes and residuals themselves, call the solver:
      `solver.solve(A, Q)` returns a [`jaxou.LyapunovSolution`][] (use `jax.vmap`
      over a batch).

    **Returns:**

    `X` of shape `[*batch, d, d]` and dtype of the inputs, whatever the options.

    **Raises:**

    - `ValueError` for non-square or mismatched shapes, batch shapes that do not
      broadcast, or non-finite entries in `A` or `Q` (checked when the values are
      concrete).
    - `TypeError` for complex inputs, mismatched float dtypes, or a `solver` that
      is not an [`jaxou.AbstractLyapunovSolver`][].
    - `equinox.EquinoxRuntimeError` (at run time, `throw=True`) if $A$ is not
      stable, an iteration did not converge, or the residual check failed; the
      message names which, and quotes the residual outside `jit`.

    **References:** R. H. Bartels & G. W. Stewart (1972), Solution of the matrix
    equation AX + XB = C; J. D. Roberts (1980), Linear model reduction and solution
    of the algebraic Riccati equation by use of the sign function; P. Benner &
    E. S. Quintana-Ortí (1999), Solving stable generalized Lyapunov equations with
    the matrix sign function.
    """
    if not isinstance(solver, AbstractLyapunovSolver):
        raise TypeError(
            f"lyapunov: solver must be a jaxou.AbstractLyapunovSolver such as "
            f"jaxou.AutoLyapunov() or jaxou.MatrixSign(), got {solver!r}"
        )
    A, Q = check_dense(A, Q, "lyapunov", batched=True)
    try:
        batch = jnp.broadcast_shapes(A.shape[:-2], Q.shape[:-2])
    except ValueError:
        raise ValueError(
            f"lyapunov: batch shapes of A {A.shape[:-2]} and Q {Q.shape[:-2]} do not broadcast"
        ) from None
    d = A.shape[-1]
    A = jnp.broadcast_to(A, batch + (d, d)).reshape(-1, d, d)
    Q = jnp.broadcast_to(Q, batch + (d, d)).reshape(-1, d, d)
    if isinstance(solver, AutoLyapunov) and is_concrete(A):
        solver = solver.select(d, bool(jnp.all(is_symmetric(A))))
    sol = _solve_many(solver, A, Q)
    sol = jax.tree_util.tree_map(lambda x: x.reshape(batch + x.shape[1:]), sol)
    X, failed = sol.value, sol.result != LyapunovResult.SUCCESSFUL
    if not throw:
        return jnp.where(failed[..., None, None], jnp.nan, X)
    if not is_concrete(A, Q):
        finite = jnp.all(jnp.isfinite(A)) & jnp.all(jnp.isfinite(Q))
        X = eqx.error_if(X, ~finite, "lyapunov: A or Q has non-finite entries (NaN or inf)")
    first = sol.result.reshape(-1)[jnp.argmax(failed.reshape(-1))]
    return eqx.branched_error_if(X, jnp.any(failed), first, _messages(solver, sol, X.dtype, d))
