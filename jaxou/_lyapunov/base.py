r"""The abstract Lyapunov solver, its solution and its result codes.

Every solver solves the continuous Lyapunov equation

$$A X + X A^\top = Q$$

for a *stable* $A$ (every eigenvalue has a positive real part). This is SciPy's
sign convention (`scipy.linalg.solve_continuous_lyapunov(A, Q)`); python-control's
`lyap(A, Q)` solves $A X + X A^\top + Q = 0$ instead.

Nothing here assumes dense matrices: a solver decides what it takes as `A` and `Q`
(arrays, or operators for the large-scale solvers) and what its `value` is (an
array, or an operator such as a low-rank factorisation). What every solver shares
is the contract of [`jaxou.LyapunovSolution`][]: a result code, and the relative
residual it measured on what it returns.
"""

from __future__ import annotations

import abc
import enum
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PyTree

__all__ = [
    "AbstractLyapunovSolver",
    "LyapunovResult",
    "LyapunovSolution",
    "check_rtol",
    "default_rtol",
    "failure_messages",
]


class LyapunovResult(enum.IntEnum):
    r"""What a Lyapunov solve returned, as stored in
    [`LyapunovSolution.result`][jaxou.LyapunovSolution] (an `int32` array).

    - `SUCCESSFUL` (0): the solution passed the solver's own residual check.
    - `UNSTABLE` (1): $A$ is not stable (an eigenvalue has a non-positive real
      part), so $AX + XA^\top = Q$ has no stationary solution.
    - `NOT_CONVERGED` (2): an iterative solver used up its `max_steps`.
    - `INACCURATE` (3): the solver's a-posteriori check failed: the relative
      residual $\|AX + XA^\top - Q\|_F / (2\|A\|_F\|X\|_F + \|Q\|_F)$ is
      above the solver's `rtol` (or is NaN: non-finite inputs or an overflow).
    """

    SUCCESSFUL = 0
    UNSTABLE = 1
    NOT_CONVERGED = 2
    INACCURATE = 3


class LyapunovSolution(eqx.Module):
    r"""The outcome of one [`AbstractLyapunovSolver.solve`][jaxou.AbstractLyapunovSolver]
    (or of many, with leading batch dimensions, under `jax.vmap`).

    **Attributes:**

    - `value`: $X$, whatever the solver returns (a `[d, d]` array for the dense
      solvers). Not meaningful unless `result` is `SUCCESSFUL`.
    - `result`: an `int32` array holding a [`jaxou.LyapunovResult`][];
      `LyapunovResult(int(result))` names it.
    - `residual`: the relative residual
      $\|AX + XA^\top - Q\|_F / (2\|A\|_F\|X\|_F + \|Q\|_F)$ of `value`, measured
      after solving (a normwise backward error: $X$ solves exactly an equation whose
      data are perturbed by about this much, relatively).
    """

    value: PyTree[Any]
    result: Int[Array, "*batch"]
    residual: Float[Array, "*batch"]


class AbstractLyapunovSolver(eqx.Module):
    r"""The base class of every solver of $AX + XA^\top = Q$.

    A solver is an immutable configuration (an `equinox.Module`); its
    [`solve`][jaxou.AbstractLyapunovSolver.solve] solves one unbatched problem and
    returns a [`jaxou.LyapunovSolution`][] that says whether to trust it.
    [`jaxou.lyapunov`][] takes a solver, batches it over leading dimensions and
    turns a non-`SUCCESSFUL` result into an error.

    Every solver checks what it returns: it measures the relative residual of its
    answer and reports `INACCURATE` when that exceeds its `rtol`, so that a solver
    never returns a wrong answer silently.

    **Attributes:**

    - `rtol`: the largest relative residual the solver accepts as `SUCCESSFUL`;
      `None` (the default of every concrete solver) means
      $\min(1000\,d\,\varepsilon, \sqrt\varepsilon)$ for the machine epsilon
      $\varepsilon$ of the inputs' dtype: $2.2\cdot10^{-13}\,d$ in float64,
      $3.5\cdot10^{-4}$ in float32 (see the guide for why).

    Subclasses decide which `A` and `Q` they take (dense arrays for
    [`jaxou.Eigh`][], [`jaxou.MatrixSign`][], [`jaxou.Kronecker`][]; operators for
    large-scale solvers) and what the solution's `value` is.
    """

    rtol: eqx.AbstractVar[float | None]

    @abc.abstractmethod
    def solve(self, A: Any, Q: Any) -> LyapunovSolution:
        """Solve one problem $AX + XA^\top = Q$ (no batch dimensions).

        **Arguments:**

        - `A`: the stable matrix (or operator) $A$.
        - `Q`: the right-hand side $Q$.

        **Returns:**

        A [`jaxou.LyapunovSolution`][]: the solution, its result code and its
        relative residual.

        **Raises:**

        `ValueError`/`TypeError` for inputs of the wrong kind or shape, or with
        non-finite entries (when the values are concrete). Never for an unstable or
        ill-conditioned `A`: that is what the result code is for.
        """


def default_rtol(dtype, d: int) -> float:
    r"""The default `rtol` of a solver: $\min(1000\,d\,\varepsilon, \sqrt\varepsilon)$
    for the machine epsilon $\varepsilon$ of `dtype` and dimension $d$.

    A backward-stable solve (Bartels–Stewart as in SciPy, an eigendecomposition of a
    symmetric $A$, an LU solve of the Kronecker system) returns a relative residual
    of a few $\varepsilon$ (measured: at most $4\varepsilon$ on random problems with
    condition numbers up to $10^{12}$, $d \le 256$, float32 and float64); rounding
    in forming the residual itself is bounded by about $d\varepsilon$. The factor
    1000 leaves room for that bound, and for an almost symmetric $A$ (the asymmetry
    [`jaxou.SGDStage`][] tolerates, $10^3\varepsilon$ per entry, gives at most
    $500\,d\,\varepsilon$). Anything larger means the method lost digits that the
    problem's conditioning does not explain. The cap $\sqrt\varepsilon$ (half the
    digits; it applies in float32 from $d = 3$) keeps the check meaningful when
    $d\varepsilon$ is large. Float64: $2.2\cdot10^{-13}\,d$; float32: $3.5\cdot10^{-4}$.
    """
    eps = float(np.finfo(dtype).eps)
    return min(1000.0 * d * eps, float(np.sqrt(eps)))


def failure_messages(
    name: str,
    rtol: float,
    *,
    max_steps: int | None = None,
    residual: float | None = None,
    where: str = "",
) -> list[str]:
    """The error message of each [`LyapunovResult`][jaxou.LyapunovResult], for
    `equinox.branched_error_if` (index = result code). `name` names the solver;
    `residual` (when known, i.e. outside `jit`) is quoted; `where` (e.g. " at batch
    index (2,)") is appended to the subject."""
    value = "above" if residual is None else f"of {residual:.2e}, above"
    steps = "its max_steps" if max_steps is None else f"max_steps={max_steps}"
    return [
        "",
        f"the drift matrix A{where} is not stable (an eigenvalue has a non-positive real "
        "part), so A X + X Aᵀ = Q has no stationary solution: there is no stationary law",
        f"{name} did not converge within {steps} iterations{where}; A is probably close "
        "to unstable (an eigenvalue near the imaginary axis)",
        f"{name} returned a relative residual ‖AX + XAᵀ - Q‖_F / (2‖A‖_F‖X‖_F + ‖Q‖_F) "
        f"{value} its rtol = {rtol:.2e}{where}: A is too ill-conditioned for this solver "
        "(or not symmetric, for Eigh), or A or Q has non-finite entries; try Kronecker() "
        "(small d) or float64, or pass a larger rtol",
    ]


def result_or(result: Array, fallback: Array) -> Array:
    """`result` where it is a failure, else `fallback` (a failure found later)."""
    return jnp.where(result != LyapunovResult.SUCCESSFUL, result, fallback).astype(jnp.int32)


def check_rtol(name: str, rtol) -> None:
    """A concrete `rtol` must be a number in (0, 1); `None` means the default."""
    if rtol is None or not isinstance(rtol, (int, float)):
        return
    if not 0 < rtol < 1:
        raise ValueError(f"{name}: rtol must be in (0, 1) (or None for the default), got {rtol}")
