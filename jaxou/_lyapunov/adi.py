r"""Low-rank ADI for large Lyapunov equations with structured data.

Solves $H X + X H = Q$ for $H = \mathrm{diag}(h) + U\Lambda U^\top$ (symmetric
positive definite; $U$ `[d, k]` any columns, $\Lambda$ symmetric, possibly
indefinite) and $Q = \mathrm{diag}(q) + ZSZ^\top$ ($Z$ `[d, m]`, $S$ symmetric,
possibly indefinite), without forming a $d \times d$ matrix.

**Split.** $D_0 = \mathrm{diag}(q/2h)$ solves the diagonal part exactly
($\mathrm{diag}(h)D_0 + D_0\mathrm{diag}(h) = \mathrm{diag}(q)$), so
$X = D_0 + \Delta$ with

$$H\Delta + \Delta H = F = ZSZ^\top - (U\Lambda U^\top D_0 + D_0U\Lambda U^\top)
= B_F T_F B_F^\top,$$

$B_F = [Z, U, D_0U]$, $T_F = \mathrm{diag}(S, [[0, -\Lambda], [-\Lambda, 0]])$: a
symmetric indefinite right-hand side of rank at most $m + 2k$, and
$HX + XH - Q = H\Delta + \Delta H - F$ exactly.

**ADI in LDLᵀ form** (Lang, Mena & Saak 2015; Benner, Kürschner & Saak 2013;
M-M.E.S.S. `mess_lradi`). With real shifts $p_j > 0$ and $W_0 = B_F$:

$$V_j = (H + p_jI)^{-1}W_{j-1},\quad W_j = W_{j-1} - 2p_jV_j,\quad
\Delta_j = \Delta_{j-1} + 2p_j V_jT_FV_j^\top,$$

and the residual is exactly $H\Delta_j + \Delta_jH - F = -W_jT_FW_j^\top$, whose
Frobenius norm costs an $(m+2k)^2$ Gram matrix. The shifted solves use Woodbury's
identity, $O(d(m+2k)k)$ each. $W_j = r_j(H)B_F$ with
$r_j(x) = \prod_i (x - p_i)/(x + p_i)$, so
$\|W_jT_FW_j^\top\|_F \le \max_{x \in [a, b]} r_j(x)^2\,\|F\|_F$ for any interval
$[a, b]$ holding the spectrum of $H$.

**Shifts.** Zolotarev's optimal real shifts for $[a, b]$ (Wachspress 1962;
$p_i = b\,\mathrm{dn}((2i-1)K/(2J), k)$, $k = \sqrt{1-(a/b)^2}$), their number $J$
chosen before the first step as the smallest for which the bound above meets half
the tolerance. $a$ and $b$ are rigorous: Weyl's inequalities on
$\mathrm{diag}(h) + U\Lambda U^\top$ and on its whitened form
$\mathrm{diag}(h)^{1/2}(I + \tilde U\Lambda\tilde U^\top)\mathrm{diag}(h)^{1/2}$, from
$k \times k$ eigenvalue problems; the second also decides whether $H$ is positive
definite at all.

**Rank.** The blocks $\sqrt{2p_j}V_j$ accumulate in a
[`LowRankAccumulator`](lowrank.py) and are compressed (by eigenvalues of the
projected $\Delta$, scored by what dropping them does to the residual,
$\|HE + EH\|_F$) at the end, and earlier whenever `max_rank` columns are reached
(without `max_rank`: past `lowrank.auto_width` columns, while that is at most
$d/2$).
The score needs $G_2 = (HZ)^\top(HZ)$ for the factor $Z$ of blocks $b_j$; it comes
without another pass over $d$ from the recurrence itself: $Hb_j = \sqrt{2p_j}W_j +
p_jb_j$ and $W_j = W_c - \sum_{l} \sqrt{2p_l}b_l$ (the blocks since $W_c$, the
right-hand side factor or the $W$ of the last compression), so
$HZ_b = Z_bL + W_cE$ with small $L$, $E$, and $G_2$ follows from $Z^\top Z$,
$W_c^\top Z$ and $W_c^\top W_c$ (see `_ResidualGram`).

**Reported residual.** $\|W_JT_FW_J^\top\|_F$ plus the bounds of every
compression, over $\|Q\|_F$: an upper bound of the true relative residual
$\|HX + XH - Q\|_F/\|Q\|_F$ in exact arithmetic. Rounding is what it cannot see
(the shifted solves have condition numbers up to $\kappa(H)$; a float32 factor
carries $\varepsilon\|\cdot\|$ errors), so the returned $X$ is also probed: with
16 Gaussian vectors $\omega_i$, $\hat s^2 = \frac1{16}\sum_i\|R\omega_i\|^2$ is an
unbiased estimate of $\|R\|_F^2$ (computed in float64) and $\hat s/\sqrt3$ a
lower confidence bound of $\|R\|_F$ (it exceeds it with probability about
$10^{-4}$). The reported residual is the larger of the two.
"""

from __future__ import annotations

import dataclasses
import functools

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._misc import is_concrete
from .._operator import Diagonal, DiagonalPlusLowRank
from .base import AbstractLyapunovSolver, LyapunovResult, LyapunovSolution, check_rtol
from .lowrank import LowRankAccumulator, auto_width, lowrank_fro

__all__ = ["ADIStats", "LowRankADI", "zolotarev_shifts", "zolotarev_error"]

_MAX_SHIFTS = 64


# ---------------------------------------------------------------------------
# Shifts


def _jacobi_dn(u: float, kp: float) -> tuple[float, float]:
    """dn(u, k) and K(k) by the arithmetic-geometric mean (Abramowitz & Stegun
    16.4), with the complementary modulus k' = sqrt(1 - k²) given directly, so that
    k' = a/b near 0 (a wide interval) loses no digits."""
    a, b, c = [1.0], kp, [np.sqrt(max(1.0 - kp * kp, 0.0))]
    while abs(c[-1]) > 1e-17 and len(a) < 60:
        a_next, c_next = 0.5 * (a[-1] + b), 0.5 * (a[-1] - b)
        b = np.sqrt(a[-1] * b)
        a.append(a_next)
        c.append(c_next)
    n = len(a) - 1
    phi = [2.0**n * a[-1] * u]
    for i in range(n, 0, -1):
        phi.append(0.5 * (phi[-1] + np.arcsin(c[i] * np.sin(phi[-1]) / a[i])))
    phi0, phi1 = phi[-1], phi[-2] if n else phi[-1]
    return float(np.cos(phi0) / np.cos(phi1 - phi0)), float(np.pi / (2 * a[-1]))


def zolotarev_shifts(a: float, b: float, num: int) -> np.ndarray:
    r"""The `num` real shifts $p_i$ minimising $\max_{x\in[a,b]}\prod_i|x-p_i|/(x+p_i)$
    (Zolotarev's problem; the ADI parameters of Wachspress 1962):
    $p_i = b\,\mathrm{dn}\big(\tfrac{(2i-1)K}{2J}, k\big)$, $k' = a/b$. Largest first."""
    if not 0 < a <= b:
        raise ValueError(f"zolotarev_shifts: need 0 < a <= b, got a={a}, b={b}")
    if a == b:
        return np.full(num, float(a))
    _, K = _jacobi_dn(0.0, a / b)
    return np.array(
        [b * _jacobi_dn((2 * i - 1) * K / (2 * num), a / b)[0] for i in range(1, num + 1)]
    )


def zolotarev_error(a: float, b: float, shifts: np.ndarray) -> float:
    r"""$\max_{x \in [a, b]}\prod_i |x - p_i|/(x + p_i)$, on 4,000 log-spaced points
    and the ends (the product equioscillates, so the grid misses little)."""
    x = np.concatenate([[a, b], np.geomspace(a, b, 4000)])
    ratio = np.abs((x[:, None] - shifts[None, :]) / (x[:, None] + shifts[None, :]))
    return float(np.max(np.prod(ratio, axis=1)))


def _num_shifts(a: float, b: float, reduction: float) -> tuple[int, np.ndarray]:
    """The smallest J whose Zolotarev bound squared is within `reduction`."""
    for J in range(1, _MAX_SHIFTS + 1):
        shifts = zolotarev_shifts(a, b, J)
        if zolotarev_error(a, b, shifts) ** 2 <= reduction:
            return J, shifts
    return _MAX_SHIFTS, zolotarev_shifts(a, b, _MAX_SHIFTS)


# ---------------------------------------------------------------------------
# Inputs


def _parts(name: str, M) -> tuple[np.ndarray, Array, Array]:
    if isinstance(M, Diagonal):
        z = jnp.zeros((M.dim, 0), M.dtype)
        return M.diagonal, z, jnp.zeros((0, 0), M.dtype)
    if isinstance(M, DiagonalPlusLowRank):
        return M.diagonal, M.factor, M.core
    raise TypeError(
        f"LowRankADI.solve: {name} must be a jaxou.DiagonalPlusLowRank or jaxou.Diagonal "
        f"operator, got {type(M).__name__} (dense arrays go to jaxou.lyapunov)"
    )


def _check_inputs(A, Q) -> tuple[tuple, tuple]:
    """Types, shapes, dtypes, finite entries and symmetric cores, before any work."""
    hp, qp = _parts("A", A), _parts("Q", Q)
    if not is_concrete(*hp, *qp):
        raise ValueError(
            "LowRankADI.solve runs an eager loop over ADI steps (its rank is decided on "
            "the way); call it outside jax.jit / jax.vmap"
        )
    if A.dim != Q.dim:
        raise ValueError(f"LowRankADI.solve: A is {A.dim} x {A.dim} but Q is {Q.dim} x {Q.dim}")
    if A.dtype != Q.dtype:
        raise TypeError(
            f"LowRankADI.solve: A has dtype {A.dtype} but Q has dtype {Q.dtype}; cast them "
            "to one floating dtype (jaxou never downcasts silently)"
        )
    for name, parts in (("A", hp), ("Q", qp)):
        for part, x in zip(("diagonal", "factor", "core"), parts):
            if not np.all(np.isfinite(np.asarray(x))):
                raise ValueError(f"LowRankADI.solve: {name} has non-finite entries in its {part}")
        core = np.asarray(parts[2])
        scale = max(float(np.max(np.abs(core), initial=0.0)), np.finfo(core.dtype).tiny)
        if core.size and np.max(np.abs(core - core.T)) > 1e3 * np.finfo(core.dtype).eps * scale:
            raise ValueError(f"LowRankADI.solve: the core of {name} is not symmetric")
    return hp, qp


def _spectral_interval(h: np.ndarray, U: np.ndarray, lam: np.ndarray) -> tuple[float, float]:
    r"""Rigorous $[a, b] \ni \lambda(H)$, $H = \mathrm{diag}(h) + U\Lambda U^\top$,
    $h > 0$; $a \le 0$ means $H$ is not positive definite (exactly: the whitened
    test $1 + \min\tau > 0$ is necessary and sufficient)."""
    h_min, h_max = float(h.min()), float(h.max())
    if U.shape[1] == 0:
        return h_min, h_max

    def spectrum(gram):  # eigenvalues of G^{1/2} Λ G^{1/2} (the nonzero ones of U Λ Uᵀ)
        g, E = np.linalg.eigh(0.5 * (gram + gram.T))
        root = (E * np.sqrt(np.clip(g, 0, None))) @ E.T
        return np.linalg.eigvalsh(root @ lam @ root)

    mu = spectrum(U.T @ U)
    tau = spectrum(U.T @ (U / h[:, None]))
    if not 1 + tau.min() > 0:
        return h_min * (1 + float(tau.min())), h_max  # a ≤ 0: not positive definite
    a = max(h_min + min(0.0, float(mu.min())), h_min * (1 + min(0.0, float(tau.min()))))
    return a, h_max + max(0.0, float(mu.max()))


def _rhs_norm(q: Array, Z: Array, S: Array) -> float:
    r"""$\|\mathrm{diag}(q) + ZSZ^\top\|_F$ in $O(dm^2)$."""
    qn = np.asarray(q, np.float64)
    if Z.shape[1] == 0:
        return float(np.linalg.norm(qn))
    Zn, Sn = np.asarray(Z, np.float64), np.asarray(S, np.float64)
    cross = 2 * float(np.sum(qn[:, None] * (Zn @ Sn) * Zn))
    total = float(qn @ qn) + cross + lowrank_fro(Zn.T @ Zn, Sn) ** 2
    return float(np.sqrt(max(total, 0.0)))


# ---------------------------------------------------------------------------
# The iteration


def _adi_step(xp, h, U, lam, W, p, base):
    r"""$V = (H + pI)^{-1}W$ by Woodbury, $(D + U\Lambda U^\top)^{-1} =
    D^{-1} - D^{-1}U(I + \Lambda U^\top D^{-1}U)^{-1}\Lambda U^\top D^{-1}$ with
    $D = \mathrm{diag}(h) + pI$ (no inverse of $\Lambda$, which may be singular);
    then $W - 2pV$ and its Gram matrix, the block $b = \sqrt{2p}\,V$ and
    $W_c^\top b$ (`base` = $W_c$, for `_ResidualGram`). `xp` is `jax.numpy`
    (compiled, the input dtype) or `numpy` (float64, for float32 inputs: see
    `_run`)."""
    hp = (h + p)[:, None]
    V = W / hp
    if U.shape[1]:
        Ud = U / hp
        M = xp.eye(U.shape[1], dtype=W.dtype) + lam @ (U.T @ Ud)
        V = V - Ud @ xp.linalg.solve(M, lam @ (U.T @ V))
    W = W - 2 * p * V
    block = xp.sqrt(2 * p) * V
    return block, W, W.T @ W, base.T @ block


@functools.partial(jax.jit, donate_argnums=(3, 6))  # W, panel
def _adi_step_jax(h, U, lam, W, p, base, panel, slot):
    """`_adi_step`, its block written into columns [slot·n, (slot+1)·n) of `panel`
    in place (so that a panel of several steps needs no concatenation)."""
    block, W, WtW, cross = _adi_step(jnp, h, U, lam, W, p, base)
    panel = lax.dynamic_update_slice_in_dim(panel, block, slot * W.shape[1], 1)
    return W, WtW, cross, panel


@functools.partial(jax.jit, donate_argnums=3, static_argnums=6)  # W; width
def _adi_step_jax_new(h, U, lam, W, p, base, width):
    """`_adi_step` whose block starts a new panel of `width` columns (the rest
    zero), written in one pass: no separate zero fill of a GB-sized buffer."""
    block, W, WtW, cross = _adi_step(jnp, h, U, lam, W, p, base)
    pad = jnp.zeros((block.shape[0], width - block.shape[1]), block.dtype)
    return W, WtW, cross, jnp.concatenate([block, pad], axis=1)


def _hessian_mv(h, U, lam, x):
    """(diag(h) + U Λ Uᵀ) x for a block x [d, n] (NumPy or JAX arrays)."""
    return h[:, None] * x + U @ (lam @ (U.T @ x))


_PROBES = 16  # random probes of the a-posteriori residual check
_PROBE_ROWS = 65536  # row block of the float64 products with a float32 factor


def _lowrank_mv(xp, Y, theta, w):
    """Y diag(θ) Yᵀ w, in the dtype of w; with NumPy, by row blocks of Y (a float32
    Y is converted one block at a time, never as a whole)."""
    if xp is not np:
        return Y @ (theta[:, None] * (Y.T @ w))
    c = sum(
        np.asarray(Y[i : i + _PROBE_ROWS], w.dtype).T @ w[i : i + _PROBE_ROWS]
        for i in range(0, Y.shape[0], _PROBE_ROWS)
    )
    c = theta[:, None] * c
    out = np.empty_like(w)
    for i in range(0, Y.shape[0], _PROBE_ROWS):
        out[i : i + _PROBE_ROWS] = np.asarray(Y[i : i + _PROBE_ROWS], w.dtype) @ c
    return out


def _probe(xp, hess, rhs, D0, Y, theta, omega):
    """‖R ω‖_F² / s for the residual R = HX + XH - Q of X = D₀ + YΘYᵀ, ω [d, s]."""
    q, Z, S = rhs
    H = lambda w: _hessian_mv(*hess, w)
    X = lambda w: D0[:, None] * w + _lowrank_mv(xp, Y, theta, w)
    R = H(X(omega)) + X(H(omega)) - q[:, None] * omega - Z @ (S @ (Z.T @ omega))
    return xp.sum(R * R) / omega.shape[1]


_probe_jax = jax.jit(functools.partial(_probe, jnp))


def _probe_residual(hess, rhs, D0, Y, theta, rhs_norm: float) -> float:
    """ŝ/(√3‖Q‖_F): ŝ² the mean of ‖Rω‖² over 16 Gaussian probes, an unbiased
    estimate of ‖R‖_F² with ŝ² ≤ 3‖R‖_F² except with probability about 1e-4
    (χ²₁₆/16 > 3), so that ŝ/√3 is a lower confidence bound of the true residual. It
    catches what the ADI bound cannot see: rounding in the solves and in the stored
    factor (float32). Computed in float64 (NumPy for float32 inputs)."""
    if rhs_norm == 0:
        return 0.0
    wide = np.finfo(D0.dtype).bits < 64
    d = D0.shape[0]
    omega = np.random.default_rng(0).standard_normal((d, _PROBES))
    if wide:
        as64 = lambda xs: tuple(np.asarray(x, np.float64) for x in xs)
        est = _probe(
            np,
            as64(hess),
            as64(rhs),
            np.asarray(D0, np.float64),
            Y,
            np.asarray(theta, np.float64),
            omega,
        )
    else:
        est = _probe_jax(
            hess, rhs, D0, Y, jnp.asarray(theta, D0.dtype), jnp.asarray(omega, D0.dtype)
        )
    return float(np.sqrt(max(float(est), 0.0) / 3)) / rhs_norm


@dataclasses.dataclass(frozen=True)
class ADIStats:
    """What a [`jaxou.LowRankADI`][] solve did (plain Python numbers).

    - `steps`: ADI steps taken; `num_shifts`: $J$; `shifts`: the cycle of shifts.
    - `interval`: $(a, b)$, the bounds on the spectrum of $H$ the shifts were made for.
    - `rank`: columns of the returned factor.
    - `adi_residual`: $\\|W_JT_FW_J^\\top\\|_F/\\|Q\\|_F$ after the last step;
      `truncation_residual`: the compressions' bound, same scale; their sum is the
      solution's `residual`.
    - `history`: the relative ADI residual after each step.
    - `rhs_norm`: $\\|Q\\|_F$; `predicted`: the a-priori bound on the relative ADI
      residual after one cycle of shifts.
    - `probe_residual`: the a-posteriori check, a lower confidence bound of the true
      relative residual from 16 random probes (see `solve`).
    """

    steps: int
    num_shifts: int
    shifts: tuple[float, ...]
    interval: tuple[float, float]
    rank: int
    adi_residual: float
    truncation_residual: float
    history: tuple[float, ...]
    rhs_norm: float
    predicted: float
    probe_residual: float


class LowRankADI(AbstractLyapunovSolver):
    r"""Low-rank ADI for $HX + XH = Q$ with operator data: $H$ a
    [`jaxou.DiagonalPlusLowRank`][] (or [`jaxou.Diagonal`][]) that is symmetric
    positive definite with a positive diagonal part, $Q$ a
    [`jaxou.DiagonalPlusLowRank`][] or [`jaxou.Diagonal`][] (any symmetric one:
    indefinite cores and zero diagonal entries are fine). No $d \times d$ matrix is
    formed; the solution is $X = D_0 + YΘY^\top$, a
    [`jaxou.DiagonalPlusLowRank`][] with $D_0 = \mathrm{diag}(q/2h)$ and a diagonal
    core $Θ$. See the module docstring (and the large-scale guide) for the method.

    The solve runs a Python loop over ADI steps (the rank is decided on the way),
    each step a few compiled kernels over $d$: call it eagerly, not under `jit`.
    Memory: the factor (at most `max_rank` columns, or one column block of
    $m + 2k$ per step), a panel of two blocks being filled, $W$ and its copy
    $W_c$, and small matrices; returning the factor copies it once (a peak of
    twice the returned rank). At $d = 10^6$, $m + 2k = 90$, rtol $10^{-6}$:
    about 14 GB with `max_rank=1260`, 17 GB without (measured).

    **Attributes:**

    - `rtol`: the tolerance on the relative residual
      $\|HX + XH - Q\|_F/\|Q\|_F$ (half for the ADI iteration, the rest for the
      compression); `None` (default) is $\sqrt\varepsilon$ of the dtype
      ($1.5\cdot10^{-8}$ in float64, $3.5\cdot10^{-4}$ in float32). The reported
      `residual` is this relative residual: the larger of the iteration's bound and
      a probed lower confidence bound (module docstring); it is never smaller than
      the normwise backward error of the other solvers. In float32 the shifted
      solves run in float64 (NumPy) and the factor is stored in float32, which
      limits the attainable residual to about $10^{-4}$ for $\kappa(H) \le 10^3$
      (measured); beyond, expect `INACCURATE`.
    - `max_steps`: the most ADI steps (default 100); `NOT_CONVERGED` past it.
    - `max_rank`: the most columns the factor may hold at any time (the memory
      bound); `None` (default): no fixed bound (past 2,048 columns, or twice the
      last compression's rank plus two panels, the iteration compresses in the
      loop, while that is at most $d/2$). When it binds the compression drops what
      it must, the bound on what it dropped enters the residual, and the result is
      `INACCURATE` if that exceeds `rtol`. At least twice $m + 2k$.
    - `num_shifts`: the number $J$ of Zolotarev shifts in a cycle; `None`
      (default) chooses the smallest $J$ whose a-priori bound meets half the
      tolerance.

    **Returns** (of `solve`): a [`jaxou.LyapunovSolution`][] whose `value` is the
    [`jaxou.DiagonalPlusLowRank`][] $X$; `result` is `UNSTABLE` for an $H$ that is
    not positive definite, `NOT_CONVERGED` after `max_steps`, `INACCURATE` when
    the reported residual exceeds `rtol` (a `max_rank` that forced a compression
    past the tolerance, or rounding). `solve_with_stats` also
    returns an [`jaxou.ADIStats`][].

    **Raises:** `TypeError` for inputs that are not `Diagonal` or
    `DiagonalPlusLowRank` operators, or of different dtypes; `ValueError` for
    mismatched dimensions, non-finite entries, non-symmetric cores, a diagonal part
    of $H$ with non-positive entries (while $H$ itself may be positive definite:
    the split needs $h > 0$), or a call under `jit`.

    **References:** E. L. Wachspress (1962), Optimum alternating-direction-implicit
    iteration parameters for a model problem; J.-R. Li & J. White (2002), Low rank
    solution of Lyapunov equations; P. Benner, P. Kürschner & J. Saak (2013),
    Efficient handling of complex shift parameters in the low-rank ADI method;
    N. Lang, H. Mena & J. Saak (2015), On the benefits of the LDLᵀ factorization
    for large-scale differential matrix equation solvers.
    """

    rtol: float | None = None
    max_steps: int = eqx.field(static=True, default=100)
    max_rank: int | None = eqx.field(static=True, default=None)
    num_shifts: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        check_rtol("LowRankADI", self.rtol)
        for name in ("max_steps", "max_rank", "num_shifts"):
            value = getattr(self, name)
            if value is None and name != "max_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"LowRankADI: {name} must be a positive int, got {value!r}")

    def solve(self, A, Q) -> LyapunovSolution:
        """Solve $AX + XA = Q$; see the class docstring."""
        return self.solve_with_stats(A, Q)[0]

    def solve_with_stats(self, A, Q) -> tuple[LyapunovSolution, ADIStats]:
        """`solve`, and an [`jaxou.ADIStats`][] of what the iteration did."""
        (h, U, lam), (q, Z, S) = _check_inputs(A, Q)
        dtype = A.dtype
        rtol = float(np.sqrt(np.finfo(dtype).eps)) if self.rtol is None else float(self.rtol)
        n_rhs = Z.shape[1] + 2 * U.shape[1]
        if self.max_rank is not None and self.max_rank < 2 * n_rhs:
            raise ValueError(
                f"LowRankADI: max_rank={self.max_rank} is below twice the rank of the "
                f"right-hand side F (m + 2k = {n_rhs}); the iteration needs room for one "
                "block beside the compressed factor"
            )
        hn = np.asarray(h, np.float64)
        Un, lamn = np.asarray(U, np.float64), np.asarray(lam, np.float64)
        if np.any(hn <= 0):
            Hii = hn + np.sum((Un @ lamn) * Un, axis=1)
            if np.all(Hii > 0):
                i = int(np.argmin(hn))
                raise ValueError(
                    "LowRankADI: the diagonal part of A must be positive (the split "
                    f"X = diag(q/2h) + Δ divides by it); it has {hn[i]:.3g} at index {i}"
                )
            return _failure(A, dtype, LyapunovResult.UNSTABLE)
        a, b = _spectral_interval(hn, Un, lamn)
        if not a > 0:
            return _failure(A, dtype, LyapunovResult.UNSTABLE)
        return _run(self, (h, U, lam), (q, Z, S), (a, b), rtol)


def _failure(A, dtype, result: LyapunovResult) -> tuple[LyapunovSolution, ADIStats]:
    nan = jnp.full((A.dim,), jnp.nan, dtype)
    value = DiagonalPlusLowRank(nan, jnp.zeros((A.dim, 0), dtype))
    stats = ADIStats(0, 0, (), (np.nan, np.nan), 0, np.nan, np.nan, (), np.nan, np.nan, np.nan)
    sol = LyapunovSolution(value, jnp.asarray(result, jnp.int32), jnp.asarray(jnp.nan, dtype))
    return sol, stats


def _rhs_factor(h, U, lam, q, Z, S) -> tuple[Array, Array, np.ndarray, float]:
    """D₀ = q/2h and F = B T Bᵀ (see the module docstring), with B's columns
    compressed to the eigenvectors of F and T = diag(eigenvalues of F).

    [Z, U, D₀U] with its off-diagonal core is badly balanced (the columns D₀U are
    as large as q/h while F is not: its core couples them to U); ADI blocks built
    from it would represent Δ with terms far larger than Δ, and their cancellation
    would cost digits in every later compression. The eigen-form costs one Gram
    matrix of m + 2k columns; it drops directions of F only up to (m + 2k)ε‖F‖_F,
    returned last (it enters the residual bound)."""
    D0 = q / (2 * h)
    m, k = Z.shape[1], U.shape[1]
    T = np.zeros((m + 2 * k, m + 2 * k))
    T[:m, :m] = np.asarray(S, np.float64)
    T[m : m + k, m + k :] = -np.asarray(lam, np.float64)
    T[m + k :, m : m + k] = -np.asarray(lam, np.float64)
    B = jnp.concatenate([Z, U, D0[:, None] * U], axis=1)
    if B.shape[1] == 0:
        return D0, B, T, 0.0
    norms = np.sqrt(np.sum(np.asarray(B, np.float64) ** 2, axis=0))
    scale = np.where(norms > 0, 1 / np.where(norms > 0, norms, 1), 0.0)
    acc = LowRankAccumulator(h.shape[0], h.dtype, B.shape[1])
    acc.append(B * jnp.asarray(scale, h.dtype), T * np.outer(norms, norms))
    eps = float(np.finfo(h.dtype).eps)
    dropped = acc.compress(B.shape[1] * eps * acc.fro())
    factor, theta = acc.factor()
    return D0, factor, np.diag(theta), dropped


class _ResidualGram:
    r"""$G_2 = (HZ)^\top(HZ)$ of the accumulated factor $Z = [Z_a, Z_b]$ from small
    matrices (module docstring, **Rank**): $Z_a$ the columns of the last compression
    (their $G_2$ is the accumulator's, rotated), $Z_b$ the blocks since, with
    $HZ_b = Z_bL + W_cE$; the cross terms need $A_w = Z_a^\top W_c$ and
    $A_{hw} = Z_a^\top HW_c$, two passes of $n$ columns per compression."""

    def __init__(self, acc: LowRankAccumulator, hess, base, xp):
        self.acc, self.hess, self.xp = acc, hess, xp
        self._rebase(base)

    def _rebase(self, base) -> None:
        """W_c ← base, the W that the next step starts from."""
        self.base = self.xp.array(base, copy=True)  # W is donated by the next step
        self.base_gram = np.asarray(self.base.T @ self.base, np.float64)
        self.na = self.acc.width
        self.Aw = self.Ahw = np.zeros((0, self.base.shape[1]))
        if self.na:
            self.Aw = self.acc.cross(jnp.asarray(self.base))
            self.Ahw = self.acc.cross(jnp.asarray(_hessian_mv(*self.hess, self.base)))
        self.shifts: list[float] = []
        self.L = np.zeros((0, 0))  # H b_s = √(2p_s) W_c + Σ_l L[l, s] b_l (scalar blocks)
        self.wcoef = np.zeros(0)  # W_now = W_c + Σ_l wcoef[l] b_l
        self.cross: list[np.ndarray] = []  # W_cᵀ b_s

    def append(self, p: float, cross) -> None:
        """Record the block b = √(2p) V of the step with shift p, the next columns
        of the accumulator, and `cross` = W_cᵀ b: W ← W - √(2p) b, and
        H b = √(2p) W + p b with the new W."""
        s = len(self.shifts)
        self.shifts.append(p)
        self.wcoef = np.append(self.wcoef, -np.sqrt(2 * p))
        col = np.sqrt(2 * p) * self.wcoef
        col[s] += p
        self.L = np.pad(self.L, ((0, 1), (0, 1)))
        self.L[:, s] = col
        self.cross.append(np.asarray(cross, np.float64))

    def gram2(self) -> np.ndarray:
        """G₂ for the accumulator's current columns."""
        acc, na, n = self.acc, self.na, self.base_gram.shape[0]
        G = acc.gram
        N = G.shape[0]
        nb = N - na
        eye = np.eye(n)
        L = np.kron(self.L, eye)
        E = np.kron(np.sqrt(2 * np.asarray(self.shifts))[None, :], eye)
        pad = nb - L.shape[0]  # padding columns of the last panel (zero blocks)
        L, E = np.pad(L, ((0, pad), (0, pad))), np.pad(E, ((0, 0), (0, pad)))
        C = np.pad(np.concatenate(self.cross, axis=1), ((0, 0), (0, pad)))
        LtC = L.T @ C.T @ E
        G2bb = L.T @ G[na:, na:] @ L + LtC + LtC.T + E.T @ self.base_gram @ E
        G2 = np.zeros((N, N))
        G2[na:, na:] = G2bb
        if na:
            G2ab = (G[:na, na:] @ L + self.Aw @ E) @ L + self.Ahw @ E
            G2[:na, :na] = acc.gram2 if acc.gram2 is not None else 0.0
            G2[:na, na:], G2[na:, :na] = G2ab, G2ab.T
        return G2

    def compress(self, budget: float, max_width: int | None, W) -> float:
        """Compress the accumulator, scored by the residual; rebase on W (the W the
        next step starts from) unless W is None (the last compression)."""
        if self.acc.width == 0:
            return 0.0
        dropped = self.acc.compress(budget, gram2=self.gram2(), max_width=max_width)
        if W is not None:
            self._rebase(W)
        return dropped


def _flush(acc: LowRankAccumulator, panel, filled: int, T: np.ndarray) -> None:
    """Append a panel of `filled` blocks (the rest zero) with its block-diagonal
    core; at d = 10^6 a panel is over a GB, so it is handed over, not copied."""
    n, P = T.shape[0], acc.panel
    core = np.zeros((P, P))
    for j in range(filled):
        core[j * n : (j + 1) * n, j * n : (j + 1) * n] = T
    acc.append(jnp.asarray(panel, acc.dtype), core)


def _run(solver: LowRankADI, hess, rhs, interval, rtol) -> tuple[LyapunovSolution, ADIStats]:
    """The ADI iteration and the final compression."""
    h, U, lam = hess
    D0, B, T, used = _rhs_factor(h, U, lam, *rhs)
    dtype, d, n = h.dtype, h.shape[0], B.shape[1]
    rhs_norm = _rhs_norm(*rhs)
    target = rtol * rhs_norm
    f_norm = lowrank_fro(np.asarray(B.T @ B, np.float64), T)
    a, b = interval
    if solver.num_shifts is None:
        J, shifts = _num_shifts(a, b, 0.5 * target / max(f_norm, np.finfo(float).tiny))
    else:
        J, shifts = solver.num_shifts, zolotarev_shifts(a, b, solver.num_shifts)
    predicted = zolotarev_error(a, b, shifts) ** 2 * f_norm / max(rhs_norm, np.finfo(float).tiny)
    cap, steps = solver.max_rank, 0
    # Two steps' blocks to a panel: the products of each new panel with the old
    # ones (most of the work at large d) run about 1.3x faster 2(m + 2k) columns
    # wide than m + 2k (measured); a tight max_rank keeps one step a panel.
    g = 2 if cap is None or cap >= 4 * n else 1
    P = g * max(n, 1)
    acc = LowRankAccumulator(d, dtype, P)
    # Float32 inputs: the shifted solves in float64 NumPy (their condition number
    # ‖H‖/p reaches κ(H), and float32 solves left residuals of 1e-2 at κ = 10^4
    # where the ADI recurrence claimed 1e-5); the blocks are then stored in float32.
    wide = np.finfo(dtype).bits < 64
    args = tuple(np.asarray(x, np.float64) for x in (h, U, lam)) if wide else (h, U, lam)
    W = np.asarray(B, np.float64) if wide else B
    gram2 = _ResidualGram(acc, args, W, np if wide else jnp)
    rho, history, converged = f_norm, [], n == 0 or f_norm <= 0.5 * target
    panel, slot = None, 0
    while not converged and steps < solver.max_steps:
        if panel is None:
            if cap is not None and acc.width + P > cap:
                budget = 0.5 * max(0.5 * target - used, 0.0)
                used += gram2.compress(budget, (cap // P - 1) * P, W)
            elif cap is None and acc.width + P > (auto_width(acc.rank, P, d) or np.inf):
                budget = 0.5 * max(0.5 * target - used, 0.0)
                used += gram2.compress(budget, None, W)
            panel = np.zeros((d, P)) if wide else P  # jax: made by the step
        p = float(shifts[steps % J])
        if wide:
            block, W, WtW, cross = _adi_step(np, *args, W, p, gram2.base)
            panel[:, slot * n : (slot + 1) * n] = block
            del block
        elif slot == 0:
            W, WtW, cross, panel = _adi_step_jax_new(*args, W, jnp.asarray(p, dtype), gram2.base, P)
        else:
            W, WtW, cross, panel = _adi_step_jax(
                *args, W, jnp.asarray(p, dtype), gram2.base, panel, slot
            )
        gram2.append(p, cross)
        slot += 1
        rho = lowrank_fro(np.asarray(WtW, np.float64), T)
        if slot == g:
            panel, slot = _flush(acc, panel, slot, T), 0
        steps += 1
        history.append(rho / max(rhs_norm, np.finfo(float).tiny))
        converged = rho <= 0.5 * target
    if panel is not None:
        panel, slot = _flush(acc, panel, slot, T), 0
    del W  # the last compression and the factor's copy need room, not W or W_c
    gram2.base = None
    used += gram2.compress(max(target - rho - used, 0.0), cap, None)
    factor, theta = acc.factor()
    value = DiagonalPlusLowRank(D0, factor, jnp.diag(jnp.asarray(theta, dtype)))
    bound = (rho + used) / max(rhs_norm, np.finfo(float).tiny) if rhs_norm > 0 else 0.0
    probe = _probe_residual(hess, rhs, D0, factor, theta, rhs_norm)
    residual = max(bound, probe)
    if not converged:
        result = LyapunovResult.NOT_CONVERGED
    elif not residual <= rtol:
        result = LyapunovResult.INACCURATE
    else:
        result = LyapunovResult.SUCCESSFUL
    stats = ADIStats(
        steps,
        J,
        tuple(float(s) for s in shifts),
        (a, b),
        factor.shape[1],
        rho / max(rhs_norm, np.finfo(float).tiny),
        used / max(rhs_norm, np.finfo(float).tiny),
        tuple(history),
        rhs_norm,
        float(predicted),
        probe,
    )
    sol = LyapunovSolution(value, jnp.asarray(result, jnp.int32), jnp.asarray(residual, dtype))
    return sol, stats
