r"""The OU flow at scale: $e^{-tH}$ for $H = \mathrm{diag}(h) + U\Lambda U^\top$ as a
diagonal-plus-low-rank operator, and the finite-time covariance
$\Sigma(t) = \Sigma_\infty + e^{-tH}(\Sigma_0 - \Sigma_\infty)e^{-tH}$.

**$e^{-tH}$ by a rational approximation.** The Carathéodory–Fejér (CF)
approximation $r_n(x) = \sum_k c_k/(x - z_k)$ of type $(n-1, n)$ to $e^{-x}$ on
$[0, \infty)$ (Trefethen, Weideman & Schmelzer 2006; computed here from their
algorithm, Fig. 4.1 of the paper) has a uniform error of about $9.3^{-n}$: about
$10^{-13}$ at $n = 14$ (float64), $2\cdot10^{-8}$ at $n = 8$ (float32); the error
actually measured on a fine grid of $[0, 10^4]$ is in `cf_rational`. Because $tH$
and $t\,\mathrm{diag}(h)$ are symmetric with spectra in $[0, \infty)$,
$\|r_n(tH) - e^{-tH}\|_2$ is at most that error, however stiff $H$ is and
whatever $t$. Each term is a shifted solve, and Woodbury's identity
$(tH - z)^{-1} = R - RU(I + t\Lambda U^\top RU)^{-1}t\Lambda U^\top R$,
$R = (t\,\mathrm{diag}(h) - z)^{-1}$ diagonal, makes the difference low-rank:

$$e^{-tH} \approx \mathrm{diag}(e^{-th}) - \sum_k c_k A_kN_kA_k^\top,\qquad
A_k = RU,\quad N_k = (I + t\Lambda U^\top R U)^{-1}t\Lambda,$$

the exact $e^{-th}$ on the diagonal and $r_n(tH) - r_n(t\,\mathrm{diag}(h))$ for
the rest (error at most twice $r_n$'s). With the poles in conjugate pairs the sum
is real, of rank $nk$: [`jaxou.flow_operator`][] returns it as a
[`jaxou.DiagonalPlusLowRank`][]. (Duhamel's formula says the same thing: $e^{-tH}$
is $e^{-t\,\mathrm{diag}(h)}$ plus a correction that only the $k$ directions of $U$
drive; the rational approximation makes that correction an explicit factor.)

**$\Sigma(t)$.** With $\Phi = E + P$ ($E = \mathrm{diag}(e^{-th})$,
$P = \mathcal U\mathcal M\mathcal U^\top$) and
$\Sigma_0 - \Sigma_\infty = \mathrm{diag}(g) + Z_LS_LZ_L^\top$:

$$\Phi(\Sigma_0 - \Sigma_\infty)\Phi = \mathrm{diag}(ge^{-2th})
+ [\mathcal V, \mathcal U]\begin{bmatrix}0 & \mathcal M\\ \mathcal M &
\mathcal M\mathcal U^\top\mathrm{diag}(g)\,\mathcal U\mathcal M\end{bmatrix}
[\mathcal V, \mathcal U]^\top + (\Phi Z_L)S_L(\Phi Z_L)^\top,$$

$\mathcal V = \mathrm{diag}(ge^{-th})\,\mathcal U$. The low-rank pieces (with
$\Sigma_\infty$'s own) go through a compression
([`LowRankAccumulator`](lowrank.py)) that drops what is below `rtol` of the
low-rank part's Frobenius norm.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float
from scipy.linalg import hankel, svd

from .._misc import is_concrete
from .._operator import Diagonal, DiagonalPlusLowRank
from .adi import _spectral_interval
from .lowrank import LowRankAccumulator

__all__ = ["cf_rational", "finite_time_cov", "flow_operator"]


# ---------------------------------------------------------------------------
# The CF rational approximation of e^{-x} on [0, inf)


@functools.cache
def cf_rational(n: int) -> tuple[np.ndarray, np.ndarray, float]:
    r"""Poles $z_k$ and residues $c_k$ of the CF approximation
    $e^{-x} \approx \sum_k c_k/(x - z_k)$ on $[0, \infty)$ (type $(n-1, n)$; only
    the poles with $\mathrm{Im}\,z_k > 0$, each standing for its conjugate pair),
    and the largest error measured on $[0, 10^4]$.

    Trefethen, Weideman & Schmelzer (2006), Talbot quadratures and rational
    approximations, BIT 46, Fig. 4.1: the CF approximation of $e^{y}$ on
    $(-\infty, 0]$, transplanted to the unit disc, from the SVD of a Hankel matrix of
    Chebyshev coefficients; here $x = -y$. Valid for $n \le 16$ in float64.
    """
    K, nf, scale = 75, 1024, 9.0
    w = np.exp(2j * np.pi * np.arange(nf) / nf)
    F = np.exp(scale * (w.real - 1) / (w.real + 1 + 1e-16))
    c = np.real(np.fft.fft(F)) / nf
    f = np.polyval(c[K::-1], w)
    U, S, Vh = svd(hankel(c[1 : K + 1]))
    u, v = U[::-1, n], Vh[n, :]
    pad = np.zeros(nf - K)
    b = np.fft.fft(np.concatenate([u, pad])) / np.fft.fft(np.concatenate([v, pad]))
    rt = f - S[n] * w**K * b
    roots = np.roots(v)
    qk = roots[np.abs(roots) > 1]
    pt = rt * np.polyval(np.poly(qk), w)
    ptc = np.real(np.fft.fft(pt) / nf)[n::-1]
    ck = np.array(
        [np.polyval(ptc, q) / np.polyval(np.poly(np.delete(qk, i)), q) for i, q in enumerate(qk)]
    )
    zk = scale * (qk - 1) ** 2 / (qk + 1) ** 2
    ck = 4 * ck * zk / (qk**2 - 1)
    # e^{y} ≈ Σ ck/(y - zk), y = -x:  e^{-x} ≈ Σ (-ck)/(x - (-zk)).
    poles, residues = -zk, -ck
    upper = poles.imag > 0
    if 2 * int(np.sum(upper)) != n:
        raise ValueError(f"cf_rational: degree {n} is beyond the algorithm's float64 range")
    x = np.concatenate([[0.0], np.geomspace(1e-10, 1e4, 20000)])
    approx = 2 * np.real(np.sum(residues[upper] / (x[:, None] - poles[upper]), axis=1))
    error = float(np.max(np.abs(approx - np.exp(-x))))
    return poles[upper], residues[upper], error


def _degree(dtype) -> int:
    return 14 if np.finfo(dtype).bits >= 64 else 8


@jax.jit
def _pole_term(h: Array, U: Array, lam: Array, t: Array, z: Array, c: Array):
    """For one pole pair: [A_r, A_i] (d × 2k) and the real core of
    -2 Re(c A N Aᵀ) (2k × 2k), A = (t h - z)⁻¹ U, N = (I + tΛUᵀA)⁻¹ tΛ: the pair's
    share of r(tH) - r(t diag(h)) (Woodbury)."""
    ctype = jnp.result_type(h.dtype, jnp.complex64)
    R = 1 / (t * h.astype(ctype) - z)
    A = R[:, None] * U.astype(ctype)
    k = U.shape[1]
    tl = (t * lam).astype(ctype)
    M = -c * jnp.linalg.solve(jnp.eye(k, dtype=ctype) + tl @ (U.T.astype(ctype) @ A), tl)
    M = 0.5 * (M + M.T)  # complex symmetric
    core = 2 * jnp.block([[M.real, -M.imag], [-M.imag, -M.real]])
    return jnp.concatenate([A.real, A.imag], axis=1).astype(h.dtype), core.astype(h.dtype)


def _hessian_parts(hessian) -> tuple[Array, Array, Array]:
    if isinstance(hessian, Diagonal):
        return (
            hessian.diagonal,
            jnp.zeros((hessian.dim, 0), hessian.dtype),
            jnp.zeros((0, 0), hessian.dtype),
        )
    if isinstance(hessian, DiagonalPlusLowRank):
        return hessian.diagonal, hessian.factor, hessian.core
    raise TypeError(
        "hessian must be a jaxou.DiagonalPlusLowRank or jaxou.Diagonal operator, got "
        f"{type(hessian).__name__}"
    )


def _check_hessian(where: str, hessian) -> tuple[Array, Array, Array]:
    h, U, lam = _hessian_parts(hessian)
    if not is_concrete(h, U, lam):
        raise ValueError(
            f"{where} runs eagerly (its rank is decided from values); call it outside jax.jit"
        )
    for part, x in (("diagonal", h), ("factor", U), ("core", lam)):
        if not np.all(np.isfinite(np.asarray(x))):
            raise ValueError(f"{where}: hessian has non-finite entries in its {part}")
    hn = np.asarray(h, np.float64)
    if np.any(hn <= 0):
        raise ValueError(f"{where}: the diagonal part of hessian must be positive")
    a, _ = _spectral_interval(hn, np.asarray(U, np.float64), np.asarray(lam, np.float64))
    if not a > 0:
        raise ValueError(f"{where}: hessian is not positive definite")
    return h, U, lam


def flow_operator(
    hessian: DiagonalPlusLowRank | Diagonal, t: float | Float[ArrayLike, ""]
) -> DiagonalPlusLowRank:
    r"""$e^{-tH}$ for a symmetric positive definite
    $H = \mathrm{diag}(h) + U\Lambda U^\top$, as the [`jaxou.DiagonalPlusLowRank`][]
    $\mathrm{diag}(e^{-th}) + \mathcal U\mathcal M\mathcal U^\top$ of rank $nk$
    ($n = 14$ poles in float64, 8 in float32; see the module docstring). Its error
    in the spectral norm is at most twice `cf_rational(n)[2]` (about $2\cdot10^{-13}$
    in float64, $5\cdot10^{-8}$ in float32) plus rounding, for every $t \ge 0$. Use
    `.mv(x)` for $e^{-tH}x$ (the mean of the OU law at time $t$). A diagonal $H$
    gives the exact $\mathrm{diag}(e^{-th})$ (rank 0); so does $t = 0$.

    **Arguments:**

    - `hessian`: $H$, a [`jaxou.DiagonalPlusLowRank`][] or [`jaxou.Diagonal`][] with
      a positive diagonal part, positive definite.
    - `t`: the time, $t \ge 0$ (`inf` gives 0).

    **Raises:** `TypeError` for another type of `hessian`; `ValueError` for a
    negative or NaN `t`, non-finite entries, an $H$ that is not positive definite or
    has a non-positive diagonal entry, or a call under `jit`.
    """
    h, U, lam = _check_hessian("flow_operator", hessian)
    t = _check_time("flow_operator", t)
    dtype, d = h.dtype, h.shape[0]
    if math.isinf(t):
        return DiagonalPlusLowRank(jnp.zeros_like(h), jnp.zeros((d, 0), dtype))
    if t == 0 or U.shape[1] == 0:
        return DiagonalPlusLowRank(jnp.exp(-t * h), jnp.zeros((d, 0), dtype))
    poles, residues, _ = cf_rational(_degree(dtype))
    factors, cores = [], []
    ctype = jnp.result_type(dtype, jnp.complex64)
    for z, c in zip(poles, residues):
        A, core = _pole_term(
            h, U, lam, jnp.asarray(t, dtype), jnp.asarray(z, ctype), jnp.asarray(c, ctype)
        )
        factors.append(A)
        cores.append(core)
    core = jax.scipy.linalg.block_diag(*cores)
    return DiagonalPlusLowRank(jnp.exp(-t * h), jnp.concatenate(factors, axis=1), core)


def _check_time(where: str, t) -> float:
    if not is_concrete(t):
        raise ValueError(f"{where}: t must be a concrete number (it runs eagerly)")
    t = float(np.asarray(t))
    if not t >= 0:
        raise ValueError(f"{where}: t must be >= 0 (or inf), got {t}")
    return t


def _cov_parts(name: str, M, d: int, dtype) -> tuple[Array, Array, np.ndarray]:
    if isinstance(M, Diagonal):
        parts = (M.diagonal, jnp.zeros((d, 0), dtype), np.zeros((0, 0)))
    elif isinstance(M, DiagonalPlusLowRank):
        parts = (M.diagonal, M.factor, np.asarray(M.core, np.float64))
    else:
        raise TypeError(
            f"finite_time_cov: {name} must be a jaxou.DiagonalPlusLowRank or jaxou.Diagonal "
            f"operator, got {type(M).__name__}"
        )
    if M.dim != d:
        raise ValueError(f"finite_time_cov: {name} is {M.dim} x {M.dim} but hessian is {d} x {d}")
    if M.dtype != dtype:
        raise TypeError(f"finite_time_cov: {name} has dtype {M.dtype} but hessian has {dtype}")
    for part, x in zip(("diagonal", "factor", "core"), parts):
        if not np.all(np.isfinite(np.asarray(x))):
            raise ValueError(f"finite_time_cov: {name} has non-finite entries in its {part}")
    return parts


def finite_time_cov(
    hessian: DiagonalPlusLowRank | Diagonal,
    stationary: DiagonalPlusLowRank | Diagonal,
    initial: DiagonalPlusLowRank | Diagonal,
    t: float | Float[ArrayLike, ""],
    *,
    rtol: float | None = None,
    max_rank: int | None = None,
) -> DiagonalPlusLowRank:
    r"""The covariance at time $t$ of the OU process $d\theta = -H(\theta -
    \theta^*)dt + (\cdot)\,dW$ started from covariance $\Sigma_0$:
    $\Sigma(t) = \Sigma_\infty + e^{-tH}(\Sigma_0 - \Sigma_\infty)e^{-tH}$, as a
    [`jaxou.DiagonalPlusLowRank`][] with the exact diagonal part
    $\mathrm{diag}(\sigma_\infty + (\sigma_0 - \sigma_\infty)e^{-2th})$ and a
    compressed low-rank part with a diagonal core. No $d \times d$ matrix is formed.

    **Accuracy.** The result differs from the exact $\Sigma(t)$ (for the given
    $\Sigma_\infty$) by at most (Frobenius) `rtol` times the Frobenius norm of its
    low-rank part (the compression), plus about $4\epsilon_n\|\Sigma_0 -
    \Sigma_\infty\|_F$ from $e^{-tH}$ ($\epsilon_n$ = `cf_rational(n)[2]`, see
    [`jaxou.flow_operator`][]). An error $E_\infty$ in $\Sigma_\infty$ (from a
    [`jaxou.LowRankADI`][] solve, say) adds at most $2\|E_\infty\|_F$.

    **Arguments:**

    - `hessian`: $H$ ([`jaxou.DiagonalPlusLowRank`][] or [`jaxou.Diagonal`][],
      positive definite with a positive diagonal part).
    - `stationary`: $\Sigma_\infty$ (the solution of $H\Sigma + \Sigma H = (\eta/B)C$,
      e.g. `LowRankADI().solve(H, C).value`).
    - `initial`: $\Sigma_0$: isotropic `Diagonal(jnp.full(d, sigma**2))`, diagonal,
      or diagonal plus low rank.
    - `t`: the time $t \ge 0$ (in units of learning rate × steps); `inf` returns
      `stationary`.
    - `rtol`: the compression tolerance, relative to the Frobenius norm of the
      low-rank part; `None` (default) is $\sqrt\varepsilon$ of the dtype.
    - `max_rank`: the most columns held at any time (memory); `None`: no bound. When
      it binds, more is dropped than `rtol` allows.

    **Returns:** $\Sigma(t)$, a [`jaxou.DiagonalPlusLowRank`][].

    **Raises:** `TypeError` for operands of other types or dtypes; `ValueError` for
    mismatched dimensions, non-finite entries, a negative or NaN `t`, an $H$ that
    is not positive definite, or a call under `jit`.
    """
    h, U, lam = _check_hessian("finite_time_cov", hessian)
    t = _check_time("finite_time_cov", t)
    d, dtype = h.shape[0], h.dtype
    s_inf, Z_inf, S_inf = _cov_parts("stationary", stationary, d, dtype)
    s0, Z0, S0 = _cov_parts("initial", initial, d, dtype)
    rtol = float(np.sqrt(np.finfo(dtype).eps)) if rtol is None else float(rtol)
    if not 0 < rtol < 1:
        raise ValueError(f"finite_time_cov: rtol must be in (0, 1), got {rtol}")
    if math.isinf(t):
        return DiagonalPlusLowRank(s_inf, Z_inf, jnp.asarray(S_inf, dtype))
    flow = flow_operator(hessian, t)
    g = s0 - s_inf
    blocks = [(Z_inf, S_inf), (_apply(flow, Z0), S0), (_apply(flow, Z_inf), -S_inf)]
    if flow.rank:
        Ucal, Mcal = flow.factor, np.asarray(flow.core, np.float64)
        V = (g * flow.diagonal)[:, None] * Ucal
        inner = Mcal @ np.asarray(Ucal.T @ (g[:, None] * Ucal), np.float64) @ Mcal
        n = Ucal.shape[1]
        blocks.append(
            (
                jnp.concatenate([V, Ucal], axis=1),
                np.block([[np.zeros((n, n)), Mcal], [Mcal, inner]]),
            )
        )
    diagonal = s_inf + g * flow.diagonal**2
    factor, theta = _compress_blocks(blocks, d, dtype, rtol, max_rank)
    return DiagonalPlusLowRank(diagonal, factor, jnp.diag(jnp.asarray(theta, dtype)))


def _apply(flow: DiagonalPlusLowRank, Z: Array) -> Array:
    return flow.mv(Z) if Z.shape[1] else Z


def _compress_blocks(blocks, d, dtype, rtol, max_rank) -> tuple[Array, np.ndarray]:
    """Σ V T Vᵀ over the blocks, compressed to `rtol` of its Frobenius norm (within
    `max_rank` columns at any time)."""
    blocks = [(V, np.asarray(T, np.float64)) for V, T in blocks if V.shape[1]]
    panel = 128
    acc = LowRankAccumulator(d, dtype, panel)
    used, spare = 0.0, 0.5
    for V, T in blocks:
        width = -(-V.shape[1] // panel) * panel
        if max_rank is not None and acc.width + width > max_rank and acc.width:
            # Part of the tolerance, measured against what is held so far.
            used += acc.compress(
                0.25 * spare * rtol * acc.fro(), max_width=max(max_rank - width, 0)
            )
            spare *= 0.5
        acc.append(V, T)
    budget = max(rtol * acc.fro() - used, 0.0)
    acc.compress(budget, max_width=max_rank)
    return acc.factor()
