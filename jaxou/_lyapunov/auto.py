"""The automatic choice of a dense solver."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .._misc import is_concrete, is_symmetric
from .base import AbstractLyapunovSolver, LyapunovSolution, check_rtol
from .dense import check_dense
from .eigh import Eigh
from .kron import Kronecker
from .sign import MatrixSign

__all__ = ["AutoLyapunov", "KRON_MAX_DIM"]

# Up to this dimension the direct Kronecker solve (O(d⁶)) is faster than the
# matrix-sign iteration; measured in benchmarks/lyapunov.py (d = 8: Kronecker
# about as fast as MatrixSign, both far ahead of a SciPy loop).
KRON_MAX_DIM = 8

_T = TypeVar("_T")


class AutoLyapunov(AbstractLyapunovSolver):
    r"""The default: [`jaxou.Eigh`][] if $A$ is symmetric (to a few ulps),
    otherwise [`jaxou.Kronecker`][] for $d \le 8$ and [`jaxou.MatrixSign`][] above.

    With concrete inputs the choice is made in Python and one solver is compiled.
    Under `jit` the values are unknown: both the symmetric and the general solver
    are compiled, and a `lax.cond` on the symmetry of $A$ (of the whole batch, in
    [`jaxou.lyapunov`][]) picks one at run time; a batch mixing symmetric and
    non-symmetric matrices takes the general solver for all of them. Name the
    solver under `jit` when you know it.

    **Arguments:**

    - `rtol`: passed on to the chosen solver (`None`: its default).
    - `max_steps`: passed on to [`jaxou.MatrixSign`][].
    """

    rtol: float | None = None
    max_steps: int = 100

    def __check_init__(self):
        check_rtol("AutoLyapunov", self.rtol)

    def select(self, d: int, symmetric: bool) -> AbstractLyapunovSolver:
        """The solver used for a `[d, d]` problem whose `A` is (or is not)
        symmetric."""
        if symmetric:
            return Eigh(rtol=self.rtol)
        if d <= KRON_MAX_DIM:
            return Kronecker(rtol=self.rtol)
        return MatrixSign(max_steps=self.max_steps, rtol=self.rtol)

    def _dispatch(
        self, A: Array, Q: Array, run: Callable[[AbstractLyapunovSolver, Array, Array], _T]
    ) -> _T:
        """`run(solver, A, Q)` with the solver chosen for `A` (which may carry
        leading batch dimensions: one choice for all of them)."""
        d = A.shape[-1]
        symmetric = jnp.all(is_symmetric(A))
        if is_concrete(A):
            return run(self.select(d, bool(symmetric)), A, Q)
        return lax.cond(
            symmetric,
            lambda a, q: run(self.select(d, True), a, q),
            lambda a, q: run(self.select(d, False), a, q),
            A,
            Q,
        )

    def solve(self, A: Float[ArrayLike, "d d"], Q: Float[ArrayLike, "d d"]) -> LyapunovSolution:
        A, Q = check_dense(A, Q, "AutoLyapunov.solve")
        return self._dispatch(A, Q, lambda solver, a, q: solver.solve(a, q))
