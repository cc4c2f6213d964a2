"""`jaxou simulate`: Monte Carlo simulation of the two-stage problem, checked
against the analytic laws; writes `simulate_summary.json`, `simulate_arrays.npz`
and `simulate.png`."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run"]

HELP = "simulate the two-stage problem by Monte Carlo and compare with the analytic laws"

DESCRIPTION = """\
Simulate many SGD trajectories of the two-stage OU model (pre-training on
[0, T1], then fine-tuning on [T1, T1 + T2], the same paths) through Diffrax, with
the mean and covariance streamed at evenly spaced times, and compare them with
the analytic laws: the KL of the empirical Gaussian fit to the exact marginal
(against the KL a perfect sampler shows with this many paths) and the largest
deviation of a mean or variance entry in standard errors.

Settings come from the [simulate] table of CONFIG (n_paths, dt, method, seed,
chunk_size); both durations must be finite.

Writes into the output directory (created if needed; never emptied):
  simulate_summary.json   settings, timings, KL and z-scores at the stage ends
  simulate_arrays.npz     ts, empirical and analytic means/covariances, KL curve
  simulate.png            mean and variance over time against the analytic curves,
                          and the KL-to-analytic curve

examples:
  jaxou simulate
  jaxou simulate examples/default.toml --set simulate.method=exact
  jaxou simulate --set simulate.n_paths=100000 --set simulate.chunk_size=20000
"""

FILES = ("simulate_summary.json", "simulate_arrays.npz", "simulate.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._cli import add_config_arguments

    add_config_arguments(parser, set_example="--set simulate.dt=0.005")
    parser.add_argument(
        "--saves", type=int, default=101, metavar="K", help="saved times on [0, T1+T2] (>= 2)"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw simulate.png")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from ._cli import Progress, enable_x64, jsonable, load_command_config, write_atomic

    progress = Progress(quiet=args.quiet)
    config, out_dir = load_command_config(args)
    if args.saves < 2:
        raise ValueError(f"--saves must be >= 2, got {args.saves}")
    plot = config.output.plot and not args.no_plot
    sim_cfg = config.simulate
    for name in ("pretrain", "finetune"):
        if getattr(config, name).duration == float("inf"):
            raise ValueError(
                f"{name}.duration is inf: a simulation needs finite durations "
                f"(e.g. --set {name}.duration=200)"
            )

    enable_x64()
    import time

    import jax
    import numpy as np

    from ._problem import build_problem
    from ._simulate import analytic_marginals, kl_fit_floor, simulate

    with progress(f"building the problem (d = {config.problem.dim})"):
        model, info = build_problem(config)
    t1, t2 = float(model.t_pretrain), float(model.t_finetune)
    ts = np.union1d(np.linspace(0.0, t1 + t2, args.saves), [t1])
    steps = (
        "exact jumps between saved times"
        if sim_cfg.method == "exact"
        else f"dt {sim_cfg.dt:g}, {int(np.ceil((t1 + t2) / sim_cfg.dt))} steps"
    )
    progress.info(
        f"simulating {sim_cfg.n_paths} paths, method {sim_cfg.method} ({steps}), {sim_cfg.dtype}"
    )
    # The paths run in simulate.dtype; the analytic laws and the comparison stay float64.
    sim_model = _cast(model, sim_cfg.dtype)
    start = time.perf_counter()
    sim = simulate(
        sim_model,
        jax.random.key(int(sim_cfg.seed)),
        n_paths=int(sim_cfg.n_paths),
        dt=float(sim_cfg.dt),
        method=sim_cfg.method,
        ts=ts,
        chunk_size=None if sim_cfg.chunk_size is None else int(sim_cfg.chunk_size),
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - start
    sim = _cast(sim, "float64")
    with progress("analytic laws and comparison"):
        laws = analytic_marginals(model, ts)
        kl_curve = np.asarray(sim.kl_to(laws))
        z_mean, z_cov = (np.asarray(z) for z in sim.z_scores(laws))
        z_var = np.diagonal(z_cov, axis1=-2, axis2=-1)
    d = model.dim
    floor, sd = kl_fit_floor(d, int(sim_cfg.n_paths))
    i1 = int(np.searchsorted(ts, t1))
    summary = {
        "settings": {
            "n_paths": int(sim_cfg.n_paths),
            "dt": float(sim_cfg.dt),
            "method": sim_cfg.method,
            "dtype": sim_cfg.dtype,
            "seed": int(sim_cfg.seed),
            "chunk_size": sim_cfg.chunk_size,
            "dim": d,
            "t_pretrain": t1,
            "t_finetune": t2,
            "saves": int(ts.size),
        },
        "seconds": seconds,
        "path_steps_per_second": float(sim_cfg.n_paths) * np.ceil((t1 + t2) / sim_cfg.dt) / seconds,
        "kl_to_analytic": {"pretrained": kl_curve[i1], "finetuned": kl_curve[-1]},
        "kl_floor": {"mean": floor, "std": sd},
        "max_abs_z": {"mean": np.max(np.abs(z_mean)), "variance": np.max(np.abs(z_var))},
        "config_file": config.source,
    }
    summary = jsonable(summary)
    png = _figure(ts, sim, laws, kl_curve, floor, t1) if plot else None
    text = json.dumps(summary, indent=2, allow_nan=False)

    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, "simulate_summary.json"), (text + "\n").encode())
    buffer = io.BytesIO()
    np.savez(
        buffer,
        ts=ts,
        mean=np.asarray(sim.mean),
        cov=np.asarray(sim.cov),
        analytic_mean=np.asarray(laws.mean),
        analytic_cov=np.asarray(laws.cov),
        kl=kl_curve,
        z_mean=z_mean,
        z_var=z_var,
    )
    write_atomic(os.path.join(out_dir, "simulate_arrays.npz"), buffer.getvalue())
    if png is not None:
        write_atomic(os.path.join(out_dir, "simulate.png"), png)
    written = [f for f in FILES if png is not None or f != "simulate.png"]
    progress.info(f"wrote {', '.join(written)} to {out_dir}{os.sep}")
    if args.json:
        sys.stdout.write(text + "\n")
    else:
        s = summary
        sys.stdout.write(
            f"simulated {s['settings']['n_paths']} paths in {s['seconds']:.1f} s; "
            f"KL(empirical ‖ analytic) = {s['kl_to_analytic']['pretrained']:.4g} "
            f"(pretrained), {s['kl_to_analytic']['finetuned']:.4g} (finetuned); a perfect "
            f"sampler shows {floor:.4g} ± {sd:.2g}; largest |z|: mean "
            f"{s['max_abs_z']['mean']:.2f}, variance {s['max_abs_z']['variance']:.2f}\n"
        )
    return 0


def _cast(tree, dtype: str):
    """Every floating array of `tree` (a model or a Simulation) in `dtype`."""
    import equinox as eqx
    import jax

    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def _figure(ts, sim, laws, kl_curve, floor, t1) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mean, am = np.asarray(sim.mean), np.asarray(laws.mean)
    var = np.diagonal(np.asarray(sim.cov), axis1=-2, axis2=-1)
    av = np.diagonal(np.asarray(laws.cov), axis1=-2, axis2=-1)
    # The coordinates that move the most, so that the curves are visible.
    coords = np.argsort(-np.ptp(am, axis=0))[:4]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, c in enumerate(coords):
        col = f"C{i}"
        axes[0].plot(ts, am[:, c], color=col, lw=1, label=f"θ[{c}] analytic")
        axes[0].plot(ts, mean[:, c], "o", color=col, ms=2, label=f"θ[{c}] Monte Carlo")
        axes[1].plot(ts, av[:, c], color=col, lw=1)
        axes[1].plot(ts, var[:, c], "o", color=col, ms=2)
    axes[1].plot(ts, av.mean(1), "k-", lw=1.5, label="mean variance, analytic")
    axes[1].plot(ts, var.mean(1), "ko", ms=2, label="mean variance, Monte Carlo")
    axes[2].semilogy(ts[1:], np.maximum(kl_curve[1:], 1e-12), "C3.-", ms=3, label="KL(MC ‖ exact)")
    axes[2].axhline(floor, color="k", ls="--", lw=1, label="perfect-sampler floor")
    for ax, title in zip(axes, ("mean", "variance", "KL of the Gaussian fit to the exact law")):
        ax.axvline(t1, color="gray", ls=":", lw=1)
        ax.set_xlabel("t (continuous time; dotted: end of pre-training)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
