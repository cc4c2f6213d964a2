"""Layer 1: continuous Lyapunov solvers, A X + X Aᵀ = Q, as objects.

- `base.py`: the abstract solver, its solution and the result codes.
- `dense.py`: what the dense solvers share (input checks, implicit
  differentiation, the residual check).
- `eigh.py`, `sign.py`, `kron.py`: the dense solvers; `auto.py` chooses one.
- `solve.py`: `lyapunov`, the batched dense entry point.
"""

from .auto import AutoLyapunov as AutoLyapunov
from .base import (
    AbstractLyapunovSolver as AbstractLyapunovSolver,
    LyapunovResult as LyapunovResult,
    LyapunovSolution as LyapunovSolution,
)
from .eigh import Eigh as Eigh
from .kron import Kronecker as Kronecker
from .sign import MatrixSign as MatrixSign
from .solve import lyapunov as lyapunov

__all__ = [
    "AbstractLyapunovSolver",
    "AutoLyapunov",
    "Eigh",
    "Kronecker",
    "LyapunovResult",
    "LyapunovSolution",
    "MatrixSign",
    "lyapunov",
]
