"""`jaxou sweep`: the theory over a grid of hyperparameters, chunk by chunk,
resumable; writes a table (CSV and Parquet), plots and a JSON summary."""

from __future__ import annotations

import argparse
import io
import json
import os

from ._config import BOUND_KINDS

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run", "grid_axes"]

HELP = "evaluate bounds and discrepancies over a hyperparameter grid (resumable)"

DESCRIPTION = """\
Evaluate the two-stage theory at every point of a grid of hyperparameters
(jaxou.evaluate: one compiled program, traced hyperparameters) and the
sensitivity of the bound to the fine-tuning lr, batch size and N_T
(jaxou.sensitivity), chunk by chunk.

The grid is the Cartesian product of the axes in the [sweep] table of CONFIG
(pretrain_lr, pretrain_batch_size, finetune_lr, finetune_batch_size, n_source,
n_target, delta, empirical_risk_source, empirical_risk_target, target_shift,
target_hessian_scale); every other hyperparameter keeps the value of the
problem's tables. Without any axis: fine-tuning lr × batch size × N_T over the
default problem of `jaxou run`.

Writes into the output directory:
  sweep_table.csv, sweep_table.parquet   one row per grid point
  sweep_summary.json                     what the theory predicts, in numbers
  sweep_heatmap.png                      total bound over (lr, B), sign of d/d lr
  sweep_slope.png                        fine-tuning term against N_T, fitted slope
  sweep_sensitivity.png                  median elasticities of the bound
  sweep_chunks/                          finished chunks (resume state)

Interrupted? Run the same command again: finished chunks are kept and skipped.
A different configuration in the same directory is refused (use --fresh to
discard the old chunks, or another --out).

examples:
  jaxou sweep --out results/sweep
  jaxou sweep examples/sweep.toml --out results/sweep
"""

OUTPUTS = (
    "sweep_table.csv",
    "sweep_table.parquet",
    "sweep_summary.json",
    "sweep_heatmap.png",
    "sweep_slope.png",
    "sweep_sensitivity.png",
)
CHUNK_DIR = "sweep_chunks"
SENS_TERMS = ("total_term", "finetune_term")
SENS_WRT = ("finetune_lr", "finetune_batch_size", "n_target")

DEFAULT_AXES = {
    "finetune_lr": [10**e for e in (-3.5, -3.0, -2.5, -2.0, -1.5, -1.0)],
    "finetune_batch_size": [2.0, 8.0, 32.0, 128.0, 512.0],
    "n_target": [10**e for e in (2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._cli import add_config_arguments

    add_config_arguments(parser, set_example="--set sweep.n_target=[100,1000]")
    parser.add_argument(
        "--fresh", action="store_true", help="discard chunks of a different earlier sweep"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the figures")


def grid_axes(config) -> dict[str, list[float]]:
    """The grid's axes: the [sweep] table's, or the default grid."""
    from ._sweep import HYPERPARAMETERS

    axes = {}
    for name in HYPERPARAMETERS:
        value = config.sweep[name]
        if value is not None:
            axes[name] = [float(x) for x in value]
    return axes or {k: list(v) for k, v in DEFAULT_AXES.items()}


def _check_axes(axes: dict[str, list[float]]) -> None:
    import numpy as np

    from ._config import ConfigError
    from ._misc import check_range
    from ._sweep import _RANGES

    for name, values in axes.items():
        try:
            check_range(f"sweep.{name} values", np.asarray(values, float), *_RANGES[name])
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _fingerprint(config, axes, chunk: int) -> str:
    from . import __version__
    from ._resume import fingerprint

    cfg = config.to_dict(arrays=True)
    cfg.pop("output", None)
    return fingerprint({"config": cfg, "axes": axes, "chunk": chunk, "version": __version__})


def _evaluate_chunk(model, hyper_cols, kind):
    import numpy as np

    from ._sweep import Hyperparameters, evaluate, sensitivity

    hyper = Hyperparameters(**hyper_cols)
    # No deduplication: the number of distinct law parameters differs from chunk to
    # chunk, and each new count would compile a new program (seconds), while
    # evaluating every point of a chunk costs milliseconds.
    cols = evaluate(model, hyper, kind=kind, dedupe=False).columns()
    sens = sensitivity(model, hyper, kind=kind, terms=SENS_TERMS, wrt=SENS_WRT)
    for t in SENS_TERMS:
        for w in SENS_WRT:
            cols[f"d_{t}_d_{w}"] = np.asarray(sens[t][w]).ravel()
    return cols


def _fit_slope(x, y):
    import numpy as np

    ok = (x > 0) & (y > 0)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def summarise(table: dict, axes: dict, shape: tuple, info, kind: str) -> dict:
    """What the theory predicts over the grid, in numbers."""
    import numpy as np

    n = len(table["total_term"])
    out: dict = {
        "points": n,
        "grid_shape": list(shape),
        "axes": axes,
        "kind": kind,
        "total_term": {"min": table["total_term"].min(), "max": table["total_term"].max()},
        "finetune_dominates_fraction": float(np.mean(table["finetune_dominates"])),
    }
    ratio = table["n_target"] / table["n_source"]
    dom = {}
    for r in np.unique(ratio):
        dom[f"{r:.3g}"] = float(np.mean(table["finetune_dominates"][ratio == r]))
    out["finetune_dominates_by_n_target_over_n_source"] = dom
    # d bound / d lr > 0 and d bound / d B < 0: the bound grows with lr/B.
    d_lr = table["d_total_term_d_finetune_lr"]
    d_b = table["d_total_term_d_finetune_batch_size"]
    grows = (d_lr > 0) & (d_b < 0)
    out["bound_grows_with_lr_over_batch"] = {
        "fraction": float(np.mean(grows)),
        "fraction_d_dlr_positive": float(np.mean(d_lr > 0)),
        "explanation": (
            "at stationarity KL(π_T ‖ prior) is convex in η_T/B_T with its minimum where the "
            "fine-tuning noise matches the prior's spread: above it the bound grows with "
            "lr/B, below it (posterior narrower than the prior) it decreases"
        ),
    }
    if "n_target" in axes and len(axes["n_target"]) >= 2:
        k = list(axes).index("n_target")
        term = table["finetune_term"].reshape(shape)
        nt = table["n_target"].reshape(shape)
        lines = np.moveaxis(term, k, -1).reshape(-1, shape[k])
        xs = np.moveaxis(nt, k, -1).reshape(-1, shape[k])
        slopes = np.array([_fit_slope(x, y) for x, y in zip(xs, lines)])
        out["finetune_term_slope_in_n_target"] = {
            "median": float(np.nanmedian(slopes)),
            "min": float(np.nanmin(slopes)),
            "max": float(np.nanmax(slopes)),
            "theory": "-1/2 (O(1/sqrt N), slightly above -1/2 from the ln(2 sqrt N / δ) term)",
        }
    return out


# ---------------------------------------------------------------------------
# Figures (Agg canvas, no pyplot state; see jaxou._plot).

# How the figures name the hyperparameters.
SYMBOLS = {
    "pretrain_lr": "η_S",
    "pretrain_batch_size": "B_S",
    "finetune_lr": "η_T",
    "finetune_batch_size": "B_T",
    "n_source": "N_S",
    "n_target": "N_T",
    "delta": "δ",
    "empirical_risk_source": "R̂_S",
    "empirical_risk_target": "R̂_T",
    "target_shift": "target shift",
    "target_hessian_scale": "target Hessian scale",
}
TERM_NAMES = {"total_term": "total term", "finetune_term": "fine-tuning term"}


def _slice_index(axes, keep):
    """Index into the grid fixing every axis not in `keep` at its middle value."""
    return tuple(slice(None) if k in keep else len(v) // 2 for k, v in axes.items())


def _fixed(axes, keep) -> str:
    """The axes not drawn, at the values the figure fixes them to."""
    from ._plot import format_number

    return ", ".join(
        f"{SYMBOLS[k]} = {format_number(v[len(v) // 2])}" for k, v in axes.items() if k not in keep
    )


def plot_heatmap(table, axes, shape):
    if not ("finetune_lr" in axes and "finetune_batch_size" in axes):
        return None
    import numpy as np

    from ._plot import plot_grid_heatmap

    keep = ("finetune_lr", "finetune_batch_size")
    idx = _slice_index(axes, keep)
    total = table["total_term"].reshape(shape)[idx]
    d_lr = table["d_total_term_d_finetune_lr"].reshape(shape)[idx]
    if list(axes).index("finetune_lr") > list(axes).index("finetune_batch_size"):
        total, d_lr = total.T, d_lr.T
    fixed = _fixed(axes, keep)
    title = (
        "total complexity term of the bound over the fine-tuning lr and batch size\n"
        "+/−: the bound grows/falls with η_T (sign of ∂bound/∂η_T)"
        + (f"; at {fixed}" if fixed else "")
    )
    return plot_grid_heatmap(
        np.asarray(axes["finetune_batch_size"]),
        np.asarray(axes["finetune_lr"]),
        total,
        np.sign(d_lr),
        labels=("fine-tuning batch size B_T", "fine-tuning lr η_T", "total complexity term"),
        title=title,
    )


def plot_slope(table, axes, shape):
    if "n_target" not in axes or len(axes["n_target"]) < 2:
        return None
    import numpy as np

    from ._plot import new_figure, to_png

    idx = _slice_index(axes, ("n_target",))
    nt = table["n_target"].reshape(shape)[idx]
    fig = new_figure(7, 5)
    ax = fig.subplots()
    for name, label, style in (
        ("finetune_term", "fine-tuning term", "o-"),
        ("pretrain_term", "pre-training term", "s--"),
    ):
        y = table[name].reshape(shape)[idx]
        ax.loglog(nt, y, style, label=f"{label} (fitted slope {_fit_slope(nt, y):.3f})")
    # A guide of slope -1/2, below the fine-tuning line so that both stay visible.
    guide = 0.6 * table["finetune_term"].reshape(shape)[idx][0] * np.sqrt(nt[0] / nt)
    ax.loglog(nt, guide, ":", color="gray", label="slope −1/2 (guide)")
    ax.set_xlabel("target sample size N_T")
    ax.set_ylabel("complexity term of the bound")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fixed = _fixed(axes, ("n_target",))
    title = "the O(1/√N_T) slope of the fine-tuning term" + (f"\nat {fixed}" if fixed else "")
    ax.set_title(title, fontsize=9)
    return to_png(fig)


def plot_sensitivity(table):
    import numpy as np

    from ._plot import new_figure, to_png

    fig = new_figure(8, 4.2)
    ax = fig.subplots()
    x = np.arange(len(SENS_WRT))
    width = 0.38
    for k, t in enumerate(SENS_TERMS):
        values = [float(np.median(table[f"d_{t}_d_{w}"] * table[w] / table[t])) for w in SENS_WRT]
        ax.bar(x + (k - 0.5) * width, values, width, label=TERM_NAMES[t])
    names = {
        "finetune_lr": "fine-tuning lr η_T",
        "finetune_batch_size": "fine-tuning batch size B_T",
        "n_target": "target sample size N_T",
    }
    ax.set_xticks(x, [names[w] for w in SENS_WRT])
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("median elasticity (x/f) ∂f/∂x")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(
        "sensitivity of the bound: median over the grid of the relative change of f "
        "per relative change of x",
        fontsize=9,
    )
    return to_png(fig)


# ---------------------------------------------------------------------------
# The command.


def _flat_grid(axes: dict, info, n: int) -> dict:
    """Every grid point as flat columns (C order of the product grid); the
    hyperparameters that are no axis keep the problem's values."""
    import numpy as np

    mesh = np.meshgrid(*[np.asarray(v, float) for v in axes.values()], indexing="ij")
    base = {
        "n_source": float(info.n_source),
        "n_target": float(info.n_target),
        "delta": float(info.delta),
        "empirical_risk_source": float(info.empirical_risk_source),
        "empirical_risk_target": float(info.empirical_risk_target),
    }
    flat = {k: np.full(n, v) for k, v in base.items()}
    flat.update({k: m.ravel() for k, m in zip(axes, mesh)})
    return flat


def run(args: argparse.Namespace) -> int:
    from ._cli import Progress, jsonable, load_command_config, write_atomic
    from ._resume import ChunkStore, run_chunks

    progress = Progress(quiet=args.quiet)
    config, out_dir = load_command_config(args)
    axes = grid_axes(config)
    _check_axes(axes)
    kind = config.bound.kind
    assert kind in BOUND_KINDS

    import numpy as np

    from ._problem import build_problem

    shape = tuple(len(v) for v in axes.values())
    n = int(np.prod(shape))
    chunk = int(config.sweep.chunk_size or min(n, 4096))
    n_chunks = -(-n // chunk)
    with progress(f"building the problem (d = {config.problem.dim})"):
        model, info = build_problem(config)
    store = ChunkStore(
        os.path.join(out_dir, CHUNK_DIR),
        _fingerprint(config, axes, chunk),
        n_chunks,
        what="sweep",
        fresh=args.fresh,
        progress=progress,
    )
    flat = _flat_grid(axes, info, n)
    progress.info(f"grid {' × '.join(map(str, shape))} = {n} points in {n_chunks} chunk(s)")

    def compute(i: int) -> dict:
        lo, hi = i * chunk, min(n, (i + 1) * chunk)
        # Pad the last chunk (repeating its last point): one shape, one compilation.
        take = np.minimum(np.arange(lo, lo + chunk), hi - 1)
        cols = _evaluate_chunk(model, {k: v[take] for k, v in flat.items()}, kind)
        return {k: v[: hi - lo] for k, v in cols.items()}

    parts = run_chunks(store, compute, progress=progress)
    table = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    summary = jsonable({"config_file": config.source, **summarise(table, axes, shape, info, kind)})
    with progress("writing the table (CSV, Parquet)"):
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        arrow = pa.table({k: pa.array(v) for k, v in table.items()})
        buf = io.BytesIO()
        pq.write_table(arrow, buf)
        write_atomic(os.path.join(out_dir, "sweep_table.parquet"), buf.getvalue())
        buf = io.BytesIO()
        pacsv.write_csv(arrow, buf)
        write_atomic(os.path.join(out_dir, "sweep_table.csv"), buf.getvalue())
    if config.output.plot and not args.no_plot:
        with progress("plotting"):
            for name, png in (
                ("sweep_heatmap.png", plot_heatmap(table, axes, shape)),
                ("sweep_slope.png", plot_slope(table, axes, shape)),
                ("sweep_sensitivity.png", plot_sensitivity(table)),
            ):
                if png is not None:
                    write_atomic(os.path.join(out_dir, name), png)
    text = json.dumps(summary, indent=2, allow_nan=False)
    write_atomic(os.path.join(out_dir, "sweep_summary.json"), (text + "\n").encode())
    dom = summary["finetune_dominates_fraction"]
    progress.info(f"fine-tuning term dominates at {100 * dom:.0f}% of the points")
    if "finetune_term_slope_in_n_target" in summary:
        s = summary["finetune_term_slope_in_n_target"]["median"]
        progress.info(f"fitted slope of the fine-tuning term in N_T: {s:.3f} (theory: -1/2)")
    progress.info(f"wrote {out_dir}")
    return 0
