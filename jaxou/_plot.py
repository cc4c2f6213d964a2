"""Front end: figures. Matplotlib is imported inside the functions (Agg canvas,
no pyplot, no global backend switch), so `import jaxou` never loads it."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

__all__ = ["projection_plane", "plot_stationary_laws"]

# One colour per law, in the order the laws are passed.
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def projection_plane(
    source_mean: np.ndarray, target_mean: np.ndarray, target_cov: np.ndarray
) -> tuple[np.ndarray, tuple[str, str]]:
    """An orthonormal basis `[2, d]` of the plane the laws are drawn in, and the
    axis labels: the direction of the shift of the minimum, θ*_T - θ*_S (the shift
    part of the discrepancy), and the leading eigenvector of the target stationary
    covariance orthogonalised against it (where the laws spread most). Without a
    shift: the top two eigenvectors of the target stationary covariance."""
    d = source_mean.shape[-1]
    lam, V = np.linalg.eigh(0.5 * (target_cov + target_cov.T))
    V = V[:, ::-1]  # decreasing variance
    shift = target_mean - source_mean
    norm = np.linalg.norm(shift)
    if d < 2:
        return np.eye(1, d), ("θ", "")
    if not norm > 1e-12 * max(1.0, np.linalg.norm(target_mean)):
        return V[:, :2].T, ("top eigenvector of Σ_T∞", "second eigenvector of Σ_T∞")
    u1 = shift / norm
    for k in range(d):
        u2 = V[:, k] - (V[:, k] @ u1) * u1
        if np.linalg.norm(u2) > 1e-6:
            break
    u2 = u2 / np.linalg.norm(u2)
    return np.stack([u1, u2]), (
        "shift direction (θ*_T - θ*_S)/|θ*_T - θ*_S|",
        "top eigenvector of Σ_T∞ (⊥ shift)",
    )


def _ellipse(mean2: np.ndarray, cov2: np.ndarray, k: float, n: int = 200) -> np.ndarray:
    lam, V = np.linalg.eigh(0.5 * (cov2 + cov2.T))
    root = V * np.sqrt(np.clip(lam, 0, None))[None, :]
    angle = np.linspace(0, 2 * np.pi, n)
    circle = np.stack([np.cos(angle), np.sin(angle)])
    return mean2[:, None] + k * root @ circle


def plot_stationary_laws(
    laws: Sequence[tuple[str, np.ndarray, np.ndarray]],
    basis: np.ndarray,
    axis_labels: tuple[str, str],
    *,
    minima: Sequence[tuple[str, np.ndarray]] = (),
    reference_variance: float | None = None,
    title: str = "",
) -> bytes:
    """Draw Gaussian laws as 1σ (solid) and 2σ (dashed) ellipses projected on the
    plane spanned by the rows of `basis` (left), and their covariance spectra on
    a log scale (right). The first two laws are drawn bold (the stationary laws),
    the others thin.

    **Arguments:** `laws`: `(label, mean [d], cov [d, d])`; `basis`: `[2, d]`
    orthonormal rows; `minima`: `(label, point)` marked with a cross;
    `reference_variance`: a horizontal line on the spectrum panel (σ0²).

    **Returns:** the PNG file's bytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_spec = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    for i, (label, mean, cov) in enumerate(laws):
        colour = _COLOURS[i % len(_COLOURS)]
        width = 2.2 if i < 2 else 1.2
        m2 = basis @ mean
        c2 = basis @ cov @ basis.T
        for k, style in ((1.0, "-"), (2.0, "--")):
            xy = _ellipse(m2, c2, k)
            ax.plot(
                xy[0],
                xy[1],
                style,
                color=colour,
                lw=width if k == 1 else 0.8 * width,
                label=f"{label} (1σ, 2σ)" if k == 1 else None,
            )
        ax.plot(*m2, "o", color=colour, ms=4)
        spectrum = np.sort(np.linalg.eigvalsh(0.5 * (cov + cov.T)))[::-1]
        ax_spec.semilogy(
            np.arange(1, spectrum.size + 1),
            np.clip(spectrum, np.finfo(float).tiny, None),
            "-" if i < 2 else "--",
            marker="." if spectrum.size <= 100 else None,
            color=colour,
            lw=width,
            label=label,
        )
    for j, (label, point) in enumerate(minima):
        p2 = basis @ point
        ax.plot(*p2, "kx" if j == 0 else "k+", ms=10, mew=2, label=label)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    ax.set_title("laws projected on their leading directions", fontsize=10)
    if reference_variance is not None:
        ax_spec.axhline(reference_variance, color="grey", ls=":", label="init σ0²")
    ax_spec.set_xlabel("eigenvalue index (decreasing)")
    ax_spec.set_ylabel("covariance eigenvalue")
    ax_spec.set_title("covariance spectra", fontsize=10)
    ax_spec.grid(alpha=0.3, which="both")
    ax_spec.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    if title:
        fig.suptitle(title, fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
