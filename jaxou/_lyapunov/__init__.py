"""Layer 1: continuous Lyapunov solvers, A X + X Aᵀ = Q, as objects.

- `base.py`: the abstract solver, its solution and the result codes.
- `dense.py`: what the dense solvers share (input checks, implicit
  differentiation, the residual check).
- `eigh.py`, `sign.py`, `kron.py`: the dense solvers; `auto.py` chooses one.
- `solve.py`: `lyapunov`, the batched dense entry point.
- `structured.py`: exact closed forms for operator inputs, and the operator
  stationary and finite-time laws that `SGDStage` uses.
- `adi.py`, `lowrank.py`: the large-scale low-rank ADI solver and its compressed
  factor; `expm.py`: the flow e^{-tH} and finite-time covariances at scale.
"""

from .adi import ADIStats as ADIStats, LowRankADI as LowRankADI
from .auto import AutoLyapunov as AutoLyapunov
from .base import (
    AbstractLyapunovSolver as AbstractLyapunovSolver,
    LyapunovResult as LyapunovResult,
    LyapunovSolution as LyapunovSolution,
)
from .eigh import Eigh as Eigh
from .expm import finite_time_cov as finite_time_cov, flow_operator as flow_operator
from .kron import Kronecker as Kronecker
from .sign import MatrixSign as MatrixSign
from .solve import lyapunov as lyapunov

__all__ = [
    "ADIStats",
    "LowRankADI",
    "finite_time_cov",
    "flow_operator",
    "AbstractLyapunovSolver",
    "AutoLyapunov",
    "Eigh",
    "Kronecker",
    "LyapunovResult",
    "LyapunovSolution",
    "MatrixSign",
    "lyapunov",
]
