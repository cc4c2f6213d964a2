"""Front end: figures. Matplotlib is imported inside the functions (Agg canvas,
no pyplot, no global backend switch), so `import jaxou` never loads it."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

__all__ = [
    "projection_plane",
    "plot_stationary_laws",
    "cell_edges",
    "format_number",
    "plot_grid_heatmap",
    "plot_simulation",
    "to_png",
    "new_figure",
]

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


def new_figure(width: float, height: float):
    """A Matplotlib figure on an Agg canvas (no pyplot state), constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig) -> bytes:
    """The figure as PNG bytes (110 dpi)."""
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Tiny grids can leave constrained layout no room; the figure is still fine.
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def format_number(x: float, *, scientific: bool | None = None) -> str:
    """A number as a reader writes it: `10⁶` for an exact power of ten beyond 10³,
    `3162` for an integer, `3.16×10⁻⁴` for a small or large value, else 3
    significant digits. `scientific=True` writes every power of ten as one
    (`10⁻³`, `3.16×10⁻³`), for the ticks of an axis that needs it somewhere."""
    x = float(x)
    if x == 0 or not np.isfinite(x):
        return f"{x:g}"
    exponent = int(np.floor(np.log10(abs(x)) + 1e-12))
    mantissa = x / 10.0**exponent
    power = "10" + str(exponent).translate(_SUPERSCRIPT)
    if scientific is None:
        scientific = abs(exponent) > 3 and not (x == round(x) and abs(x) < 1e6 and exponent > 0)
        if abs(exponent) > 3 and np.isclose(abs(mantissa), 1, rtol=1e-9, atol=0):
            scientific = True
    if not scientific:
        return str(int(round(x))) if x == round(x) and abs(x) < 1e6 else f"{x:.3g}"
    if np.isclose(abs(mantissa), 1, rtol=1e-9, atol=0):
        return ("-" if x < 0 else "") + power
    return f"{mantissa:.3g}×{power}"


def format_ticks(values: Sequence[float]) -> list[str]:
    """`format_number` for every value of an axis, all in scientific notation when
    one of them needs it."""
    superscripts = set(_SUPERSCRIPT.values())
    scientific = any(ord(c) in superscripts for v in values for c in format_number(v))
    return [format_number(v, scientific=scientific) for v in values]


def cell_edges(values: Sequence[float], log: bool) -> np.ndarray:
    """The edges of cells centred on the sorted grid `values` (`n + 1` of them): the
    midpoints between neighbours (geometric means on a log axis) and, at both ends,
    the first and last cells as wide as their neighbours. One value gets a cell of
    a factor 2 (log) or ±0.5 around it."""
    v = np.asarray(values, np.float64)
    if log:
        return np.exp(cell_edges(np.log(v), False)) if v.size > 1 else v[[0, 0]] * [0.5, 2.0]
    if v.size == 1:
        return v[[0, 0]] + [-0.5, 0.5]
    mid = 0.5 * (v[1:] + v[:-1])
    return np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]])


def plot_grid_heatmap(
    x: np.ndarray,
    y: np.ndarray,
    values: np.ndarray,
    signs: np.ndarray,
    *,
    labels: tuple[str, str, str],
    title: str,
) -> bytes:
    """A heatmap of `values [len(y), len(x)]` with one cell centred on each grid
    point (log axes for positive axes spanning more than a decade), the value and
    the sign in `signs` (`+`/`−`) written in each cell, in black or white after the
    cell's brightness. `labels`: x, y and colour-bar labels."""
    fig = new_figure(7.5, 5.2)
    ax = fig.subplots()
    log = [bool(np.all(a > 0) and a.max() / a.min() > 10) for a in (x, y)]
    mesh = ax.pcolormesh(cell_edges(x, log[0]), cell_edges(y, log[1]), values, cmap="viridis")
    fig.colorbar(mesh, ax=ax, label=labels[2])
    for i in range(len(y)):
        for j in range(len(x)):
            r, g, b, _ = mesh.cmap(mesh.norm(values[i, j]))
            colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            text = f"{values[i, j]:.3g}\n{'+' if signs[i, j] > 0 else '−'}"
            ax.text(x[j], y[i], text, ha="center", va="center", color=colour, fontsize=8)
    ax.set_xscale("log" if log[0] else "linear")
    ax.set_yscale("log" if log[1] else "linear")
    ax.set_xticks(x, format_ticks(x))
    ax.set_yticks(y, format_ticks(y))
    ax.minorticks_off()
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title, fontsize=9)
    return to_png(fig)


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


def plot_simulation(
    arrays: dict, floor: tuple[float, float], t_pretrain: float, title: str
) -> bytes:
    """Three panels of a two-stage simulation against its exact laws: the mean and
    the variance over time of the coordinates that move most (lines: exact, dots:
    Monte Carlo) and the KL of the empirical Gaussian fit to the exact law, with
    the value a perfect sampler shows (`floor`: mean and sd, drawn ± 2 sd).

    **Arguments:** `arrays`: `ts`, `mean`, `cov`, `analytic_mean`, `analytic_cov`,
    `kl` (as `jaxou simulate` writes them); `t_pretrain`: the end of pre-training;
    `title`: the figure's title.

    **Returns:** the PNG file's bytes.
    """
    from matplotlib.lines import Line2D

    ts = arrays["ts"]
    mean, am = arrays["mean"], arrays["analytic_mean"]
    var = np.diagonal(arrays["cov"], axis1=-2, axis2=-1)
    av = np.diagonal(arrays["analytic_cov"], axis1=-2, axis2=-1)
    # The coordinates that move the most, so that the curves are visible.
    coords = np.argsort(-np.ptp(am, axis=0))[:4]
    fig = new_figure(15, 4.8)
    axes = fig.subplots(1, 3)
    for i, c in enumerate(coords):
        axes[0].plot(ts, am[:, c], color=f"C{i}", lw=1, label=f"θ[{c}]")
        axes[0].plot(ts, mean[:, c], "o", color=f"C{i}", ms=2)
        axes[1].plot(ts, av[:, c], color=f"C{i}", lw=1, label=f"θ[{c}]")
        axes[1].plot(ts, var[:, c], "o", color=f"C{i}", ms=2)
    axes[1].plot(ts, av.mean(1), "k-", lw=1.5, label="average over all coordinates")
    axes[1].plot(ts, var.mean(1), "ko", ms=2)
    style = [
        Line2D([], [], color="gray", lw=1, label="exact law (line)"),
        Line2D([], [], color="gray", marker="o", ls="", ms=3, label="Monte Carlo (dots)"),
    ]
    for ax in axes[:2]:
        handles, _ = ax.get_legend_handles_labels()
        loc = "best" if ax is axes[0] else "upper right"
        ax.legend(handles=handles + style, fontsize=7, loc=loc)
    axes[1].set_yscale("log")
    kl = arrays["kl"]
    axes[2].plot(ts[1:], kl[1:], "C3.-", ms=3, lw=1, label="KL(Monte Carlo fit ‖ exact law)")
    axes[2].axhline(floor[0], color="k", ls="--", lw=1, label="expected for a perfect sampler")
    axes[2].axhspan(
        floor[0] - 2 * floor[1], floor[0] + 2 * floor[1], color="gray", alpha=0.2, label="± 2 sd"
    )
    axes[2].legend(fontsize=7, loc="best")
    titles = (
        "mean of the coordinates that move most",
        "variance (log scale)",
        "KL of the Gaussian fit to the exact law",
    )
    for ax, text in zip(axes, titles):
        ax.axvline(t_pretrain, color="gray", ls=":", lw=1)
        ax.set_xlabel("t = lr × steps (dotted line: end of pre-training)")
        ax.set_title(text, fontsize=10)
    fig.suptitle(title, fontsize=11)
    return to_png(fig)
