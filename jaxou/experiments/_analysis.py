"""Comparing samples of real SGD with the OU model's predicted laws, and the figures."""

from __future__ import annotations

import io
import math

import numpy as np

from .._plot import _ellipse

__all__ = [
    "discrete_marginal",
    "compare_law",
    "excess_kurtosis",
    "plot_covariances",
    "plot_grid",
]


def discrete_marginal(H, C, minimum, lr, batch_size, mean0, cov0, steps):
    """The law of *discrete* SGD on the quadratic model after `steps` steps from
    N(mean0, cov0): with M = I - ηH, mean θ* + Mⁿ(m0 - θ*) and covariance
    Mⁿ S0 Mⁿᵀ + Σd - Mⁿ Σd Mⁿᵀ, Σd the discrete stationary covariance (see
    `jaxou.sgd_stationary_cov`). Exact for a quadratic loss with constant noise."""
    lam, V = np.linalg.eigh(H)
    Ct = V.T @ C @ V
    denom = lam[:, None] + lam[None, :] - lr * lam[:, None] * lam[None, :]
    Sd = (lr / batch_size) * Ct / denom
    with np.errstate(over="ignore", invalid="ignore"):
        f = (1 - lr * lam) ** steps
    m = V.T @ (mean0 - minimum)
    S0 = V.T @ cov0 @ V
    F = f[:, None] * f[None, :]
    mean = minimum + V @ (f * m)
    cov = V @ (F * S0 + Sd - F * Sd) @ V.T
    return mean, 0.5 * (cov + cov.T)


def _gauss_kl(m1, S1, m2, S2) -> float:
    """KL(N(m1, S1) ‖ N(m2, S2)) in float64 NumPy (Cholesky; inf if not definite)."""
    d = m1.size
    try:
        L2 = np.linalg.cholesky(S2)
        L1 = np.linalg.cholesky(S1)
    except np.linalg.LinAlgError:
        return math.inf
    M = np.linalg.solve(L2, L1)
    z = np.linalg.solve(L2, m1 - m2)
    logdet = 2 * (np.sum(np.log(np.diag(L2))) - np.sum(np.log(np.diag(L1))))
    return 0.5 * (np.sum(M**2) - d + logdet + z @ z)


def compare_law(samples, mean, cov, *, rng, project=None) -> dict:
    """Empirical law of `samples` [S, d] (independent seeds) against the predicted
    N(mean, cov):

    - `cov_rel_frobenius`: |Σ̂ - Σ|_F / |Σ|_F,
    - `kl_empirical_predicted`: KL(N(m̂, Σ̂) ‖ N(μ, Σ)) of the Gaussian fit,
    - `mean_offset_se_max`: max over coordinates of |m̂_i - μ_i| / (σ̂_i/√S),
    - `mean_offset_chi2_z`: (S (m̂-μ)ᵀ Σ⁻¹ (m̂-μ) - d)/√(2d), ~N(0,1) if the
      prediction is right,
    - the same two matrix numbers for S samples drawn from the predicted law
      itself (`*_sampling_floor`): what a perfect prediction would score.

    `project` [d, k] restricts the comparison to a subspace first.
    """
    X = np.asarray(samples, np.float64)
    mean = np.asarray(mean, np.float64)
    cov = np.asarray(cov, np.float64)
    if project is not None:
        X, mean, cov = X @ project, mean @ project, project.T @ cov @ project
    S, d = X.shape
    m = X.mean(0)
    E = np.cov(X.T, bias=False).reshape(d, d)
    rel = np.linalg.norm(E - cov) / np.linalg.norm(cov)
    kl = _gauss_kl(m, E, mean, cov)
    sd = np.sqrt(np.clip(np.diag(E), 1e-300, None))
    offset = np.abs(m - mean) / (sd / math.sqrt(S))
    try:
        L = np.linalg.cholesky(cov)
        z = np.linalg.solve(L, m - mean)
        chi2 = float(S * z @ z)
    except np.linalg.LinAlgError:
        chi2 = math.inf
    # The sampling floor: the same statistics for S draws from the prediction.
    lam, V = np.linalg.eigh(cov)
    Y = mean + (rng.standard_normal((S, d)) * np.sqrt(np.clip(lam, 0, None))) @ V.T
    Ey = np.cov(Y.T).reshape(d, d)
    return {
        "n_seeds": S,
        "dim": d,
        "cov_rel_frobenius": rel,
        "cov_rel_frobenius_sampling_floor": np.linalg.norm(Ey - cov) / np.linalg.norm(cov),
        "kl_empirical_predicted": kl,
        "kl_sampling_floor": _gauss_kl(Y.mean(0), Ey, mean, cov),
        "mean_offset_se_max": float(offset.max()),
        "mean_offset_chi2_z": (chi2 - d) / math.sqrt(2 * d),
        "trace_ratio_empirical_predicted": float(np.trace(E) / np.trace(cov)),
    }


def excess_kurtosis(Z) -> tuple[np.ndarray, float]:
    """Excess kurtosis of each column of Z [n, k] (0 for a Gaussian), and its
    standard error under normality, √(24/n)."""
    Z = np.asarray(Z, np.float64)
    Zc = Z - Z.mean(0)
    k = np.mean(Zc**4, 0) / np.mean(Zc**2, 0) ** 2 - 3
    return k, math.sqrt(24 / Z.shape[0])


def _figure(ncols, width=5.2, height=4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def plot_covariances(panels, title: str) -> bytes:
    """One column per panel `(label, samples [S, d], pred_mean, pred_cov,
    discrete_cov or None)`: covariance spectra (empirical against predicted) on top
    of nothing else; plus, below the spectrum, the 1σ/2σ ellipses in the plane of
    the predicted law's top two eigenvectors with the samples."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(panels)
    fig = Figure(figsize=(5.2 * n, 8.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n, squeeze=False)
    for j, (label, X, mean, cov, dcov) in enumerate(panels):
        ax = axes[0, j]
        E = np.cov(np.asarray(X).T)
        for M, style, name in (
            (E, "k.-", "empirical (SGD seeds)"),
            (cov, "C0-", "OU prediction"),
            (dcov, "C1--", "discrete-time quadratic model"),
        ):
            if M is None:
                continue
            s = np.sort(np.linalg.eigvalsh(M))[::-1]
            ax.semilogy(np.arange(1, s.size + 1), np.clip(s, 1e-300, None), style, ms=3, label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("eigenvalue index")
        ax.set_ylabel("covariance eigenvalue")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        ax = axes[1, j]
        lam, V = np.linalg.eigh(cov)
        P = V[:, ::-1][:, :2]
        Y = (np.asarray(X) - mean) @ P
        ax.plot(Y[:, 0], Y[:, 1], ".", color="grey", ms=2, alpha=0.5, label="SGD seeds")
        c2 = P.T @ cov @ P
        e2 = np.cov(Y.T)
        for k, style in ((1, "-"), (2, "--")):
            xy = _ellipse(np.zeros(2), c2, k)
            ax.plot(xy[0], xy[1], "C0" + style, label=f"OU {k}σ")
            xy = _ellipse(Y.mean(0), e2, k)
            ax.plot(xy[0], xy[1], "k" + style, lw=0.8, label=f"empirical {k}σ")
        ax.set_xlabel("top eigenvector of predicted Σ")
        ax.set_ylabel("second eigenvector")
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return _png(fig)


def plot_grid(points, title: str) -> tuple[bytes, bytes]:
    """Two figures from the lr/B grid: the generalization gap against lr/B, and the
    bound against the gap (and against the held-out risk)."""
    x = np.array([p["lr_over_b"] for p in points])
    gap = np.array([p["gap_sgd"] for p in points])
    gap_se = np.array([p["gap_sgd_se"] for p in points])
    bound = np.array([p["bound_kl"] for p in points])
    test = np.array([p["test_risk_sgd"] for p in points])
    large = np.array([p["large_lr"] for p in points])
    fig, (ax,) = _figure(1)
    ax.errorbar(x[~large], gap[~large], 2 * gap_se[~large], fmt="o", label="gap (SGD seeds)")
    if large.any():
        ax.errorbar(x[large], gap[large], 2 * gap_se[large], fmt="rs", label="large lr")
    ax.set_xscale("log")
    ax.set_xlabel("lr / B (fine-tuning)")
    ax.set_ylabel("held-out − train 0-1 risk (Gibbs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    first = _png(fig)
    fig, (ax,) = _figure(1)
    ax.plot(gap, bound, "o", label="kl-PAC-Bayes bound")
    ax.plot(gap, test, "^", label="held-out risk (SGD)")
    if large.any():
        ax.plot(gap[large], bound[large], "rs", mfc="none", ms=10, label="large lr")
    ax.set_xlabel("generalization gap (SGD)")
    ax.set_ylabel("risk")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return first, _png(fig)


def plot_mlp_study(stages, examples, points, title: str) -> bytes:
    """The digits-mlp figure: (1) the top Hessian eigenvalues of both stages;
    (2) empirical against predicted variance along the top Hessian and random
    directions, for the first and last grid settings, with the ±2 sampling-floor
    band; (3) the fine-tuning bound and (4) the domain discrepancy against the
    measured generalization gap over the grid."""
    fig, axes = _figure(4, width=4.6, height=4.2)
    ax = axes[0]
    for name, style in (("source", "C0o-"), ("target", "C1s-")):
        lam = np.sort(np.diag(np.asarray(stages[name].stage.hessian.core)))[::-1]
        ax.semilogy(np.arange(1, lam.size + 1), lam, style, ms=3, label=f"H, {name}")
    ax.set_xlabel("index (Lanczos)")
    ax.set_ylabel("eigenvalue")
    ax.set_title(f"top Hessian eigenvalues (d = {stages['source'].stage.dim:,})", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    shown = [e for e in (examples[0], examples[-1]) if e[1]]
    lo, hi = np.inf, -np.inf
    for j, (label, variances) in enumerate(shown):
        for name, marker in (("top_hessian", "o"), ("random", "^")):
            v = variances[name]
            ax.loglog(
                v["predicted"],
                v["empirical"],
                f"C{j}{marker}",
                ms=4,
                mfc="none",
                label=f"{label}, {name.replace('_', ' ')}",
            )
            lo = min(lo, v["predicted"].min(), v["empirical"].min())
            hi = max(hi, v["predicted"].max(), v["empirical"].max())
            floor = v["sampling_floor_relative_sd"]
    if shown:
        x = np.geomspace(lo, hi, 50)
        ax.plot(x, x, "k-", lw=0.8, label="empirical = predicted")
        ax.fill_between(
            x,
            x * (1 - 2 * floor),
            x * (1 + 2 * floor),
            color="grey",
            alpha=0.2,
            label="±2 sampling floors",
        )
    else:
        ax.text(
            0.5, 0.5, "no prediction\n(see report: law_error)", ha="center", transform=ax.transAxes
        )
    ax.set_xlabel("predicted variance vᵀΣv (OU)")
    ax.set_ylabel("variance of the SGD seeds along v")
    ax.set_title("fine-tuned law along directions v", fontsize=9)
    ax.legend(fontsize=6)
    gap = np.array([p["gap_sgd"] for p in points])
    se = np.array([p["gap_sgd_se"] for p in points])
    bound_field, bound_name = "finetune_bound", "fine-tuning bound (kl, δ = 0.05)"
    bounds = [p.get(bound_field) for p in points]
    if all(b is not None and b > 0.999 for b in bounds):  # saturated: show what it saturates on
        bound_field, bound_name = "finetune_kl", "KL(fine-tuned ‖ pre-trained) (bound = 1)"
    for ax, field, name in (
        (axes[2], bound_field, bound_name),
        (axes[3], "discrepancy", "domain discrepancy KL at t = T₂"),
    ):
        ys = [p.get(field) for p in points]
        if all(y is not None and np.isfinite(y) for y in ys):
            bs = np.array([p["batch_size"] for p in points])
            for b in np.unique(bs):
                m = bs == b
                ax.errorbar(
                    gap[m], np.array(ys)[m], xerr=2 * se[m], fmt="o", ms=4, label=f"B = {b:g}"
                )
            ax.legend(fontsize=7)
        ax.set_xlabel("generalization gap of SGD (held-out − train 0-1 risk)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].grid(alpha=0.3, which="both")
    fig.suptitle(title, fontsize=10)
    return _png(fig)
