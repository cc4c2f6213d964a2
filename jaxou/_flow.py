r"""The OU flow over a time t: $F = e^{-At}$ and
$\Sigma_t = \int_0^t e^{-As} D e^{-A^\top s} ds$."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from ._lyapunov import AbstractLyapunovSolver, AutoLyapunov, LyapunovResult
from ._lyapunov.base import default_rtol, failure_messages
from ._misc import as_float_array, is_symmetric

__all__ = ["flow_factor", "ou_flow"]

# The general flow halves t until ||A||_1 h <= 1 and doubles back; past this many
# halvings (||A||_1 t > 2^64) it uses the stationary form instead.
_MAX_DOUBLINGS = 64


def flow_factor(s: Float[Array, "*shape"], t: Float[ArrayLike, ""]) -> Float[Array, "*shape"]:
    r"""$\int_0^t e^{-s u} du = (1 - e^{-st})/s$, elementwise, written as
    $-\mathrm{expm1}(-st)/s$ so that it keeps full relative accuracy for tiny $st$;
    $t = \infty$ gives $1/s$ and $s = 0$ gives $t$.

    In the eigenbasis of a symmetric drift $A = V\Lambda V^\top$, the noise integral
    of the OU flow is $(V^\top\Sigma_t V)_{ij} = (V^\top D V)_{ij}\,
    \mathrm{flow\_factor}(\lambda_i + \lambda_j, t)$.
    """
    inf = jnp.isinf(t)
    t_fin = jnp.where(inf, 0, t)
    zero = s == 0
    s_safe = jnp.where(zero, 1, s)
    finite = jnp.where(zero, t_fin, -jnp.expm1(-s_safe * t_fin) / s_safe)
    return jnp.where(inf, jnp.where(zero, jnp.inf, 1 / s_safe), finite)


def _flow_symmetric(A: Array, D: Array, t: Array) -> tuple[Array, Array]:
    """Symmetric A = V Λ Vᵀ: F = V e^{-Λt} Vᵀ and Σ_t = V [D̃ ∘ flow_factor] Vᵀ, in
    closed form for every t (the stationary covariance at t = inf)."""
    lam, V = jnp.linalg.eigh(0.5 * (A + A.T))
    g = flow_factor(lam[:, None] + lam[None, :], t)
    F = (V * jnp.exp(-lam * t)[None, :]) @ V.T
    Sigma = V @ ((V.T @ D @ V) * g) @ V.T
    Sigma = eqx.error_if(
        Sigma,
        jnp.isinf(t) & ~(lam[0] > 0),
        "the drift matrix is not positive definite: there is no stationary law",
    )
    return F, Sigma


def _van_loan(A: Array, D: Array, h: Array) -> tuple[Array, Array]:
    """Van Loan's block exponential expm([[-A, D], [0, Aᵀ]] h) = [[F, G], [0, e^{Aᵀh}]],
    Σ_h = G Fᵀ; accurate for ||A|| h <= 1, tiny h included.

    Reference: C. F. Van Loan (1978), Computing integrals involving the matrix
    exponential, IEEE TAC 23(3)."""
    d = A.shape[-1]
    E = jax.scipy.linalg.expm(jnp.block([[-A, D], [jnp.zeros_like(A), A.T]]) * h)
    F = E[:d, :d]
    return F, E[:d, d:] @ F.T


def _doublings(A: Array, t: Array) -> Array:
    """How many halvings bring ||A||_1 t down to 1 (0 for small t; more than
    `_MAX_DOUBLINGS` for t beyond what the doubling covers)."""
    x = jnp.max(jnp.sum(jnp.abs(A), axis=0)) * t
    k = jnp.ceil(jnp.log2(jnp.where(x > 1, x, 1)))
    return jnp.where(jnp.isfinite(k), k, _MAX_DOUBLINGS + 1).astype(jnp.int32)


def _flow_doubling(A: Array, D: Array, t: Array) -> tuple[Array, Array]:
    """Van Loan over h = t / 2^k, then k doublings Σ_2h = Σ_h + F_h Σ_h F_hᵀ,
    F_2h = F_h²: sums of positive semi-definite terms, so Σ_t keeps its relative
    accuracy at every t, also for a non-normal A whose flow grows before it decays
    (where Σ∞ - F Σ∞ Fᵀ cancels badly). A scan of `lax.cond`s: only k steps run,
    and it is reverse-differentiable."""
    t = jnp.where(jnp.isfinite(t), t, 0)  # t = inf is the other branch's
    k = jnp.minimum(_doublings(A, t), _MAX_DOUBLINGS)
    F, S = _van_loan(A, D, t * jnp.exp2(-k.astype(t.dtype)))  # exact: a power of two

    def step(carry, j):
        double = lambda FS: (FS[0] @ FS[0], FS[1] + FS[0] @ FS[1] @ FS[0].T)
        return lax.cond(j < k, double, lambda FS: FS, carry), None

    (F, S), _ = lax.scan(step, (F, S), jnp.arange(_MAX_DOUBLINGS))
    return F, S


def _beyond_doubling(A: Array, t: Array) -> Array:
    """t = inf, or so large that the doubling does not reach it."""
    return jnp.isinf(t) | (_doublings(A, jnp.where(jnp.isinf(t), 0, t)) > _MAX_DOUBLINGS)


def _flow_stationary(A, D, t, solver: AbstractLyapunovSolver) -> tuple[Array, Array]:
    """t = inf (F = 0, Σ∞), or t beyond the doubling (Σ∞ - F Σ∞ Fᵀ, where F is
    negligible unless A is within 2^-64 ||A|| of unstable)."""
    sol = solver.solve(A, D)
    inf = jnp.isinf(t)
    F = jnp.where(inf, 0, jax.scipy.linalg.expm(-A * jnp.where(inf, 0, t)))
    rtol = default_rtol(A.dtype, A.shape[-1]) if solver.rtol is None else solver.rtol
    msgs = failure_messages(type(solver).__name__, rtol)
    # Checked only where this branch is the one used (under vmap both branches run).
    failed = (sol.result != LyapunovResult.SUCCESSFUL) & _beyond_doubling(A, t)
    S_inf = eqx.branched_error_if(sol.value, failed, sol.result, msgs)
    return F, S_inf - F @ S_inf @ F.T


def _flow_general(A: Array, D: Array, t: Array, solver: AbstractLyapunovSolver):
    """General A: the doubling for finite t, the stationary covariance for t = inf.
    The Lyapunov solve runs only when needed (a finite-time law exists for any A)."""
    return lax.cond(
        _beyond_doubling(A, t),
        lambda a, q, s: _flow_stationary(a, q, s, solver),
        _flow_doubling,
        A,
        D,
        t,
    )


def ou_flow(
    A: Float[ArrayLike, "d d"],
    D: Float[ArrayLike, "d d"],
    t: Float[ArrayLike, ""],
    *,
    symmetric: bool | None = None,
    solver: AbstractLyapunovSolver | None = None,
) -> tuple[Float[Array, "d d"], Float[Array, "d d"]]:
    r"""The flow of $dX = -A X dt + G dW$ (with $D = GG^\top$) over a time $t$:
    $F = e^{-At}$ and $\Sigma_t = \int_0^t e^{-As} D e^{-A^\top s} ds$, so that
    $X_t \mid X_0 \sim N(F X_0, \Sigma_t)$. $t = \infty$ gives $F = 0$ and the
    stationary covariance. Accurate for tiny $t$ and for non-normal $A$ (no
    $\Sigma_\infty - F\Sigma_\infty F^\top$ cancellation). Returns `(F, Σ_t)`, the
    latter symmetrised.

    `symmetric`: whether `A` is symmetric (then an eigendecomposition gives both in
    closed form); `None` decides from concrete values, or at run time under `jit`.
    `solver`: the Lyapunov solver of the general path, used only for the stationary
    covariance ($t = \infty$); `None` for the general choice of
    [`jaxou.AutoLyapunov`][] ([`jaxou.Kronecker`][] for $d \le 8$, else
    [`jaxou.MatrixSign`][]). A failed solve raises at run time.
    """
    A = as_float_array(A, "A")
    D = as_float_array(D, "D")
    t = jnp.asarray(t, dtype=A.dtype)
    if solver is None:
        solver = AutoLyapunov().select(A.shape[-1], symmetric=False)
    if symmetric is None and not isinstance(A, jax.core.Tracer):
        symmetric = bool(is_symmetric(A))
    return _ou_flow(A, D, t, symmetric, solver)


@eqx.filter_jit
def _ou_flow(A, D, t, symmetric: bool | None, solver: AbstractLyapunovSolver):
    # Jitted so that eager calls (OUProcess.marginal, say) hit the compile cache.
    general = lambda a, q, s: _flow_general(a, q, s, solver)
    if symmetric is None:
        F, S = lax.cond(is_symmetric(A), _flow_symmetric, general, A, D, t)
    else:
        F, S = (_flow_symmetric if symmetric else general)(A, D, t)
    return F, 0.5 * (S + S.T)
