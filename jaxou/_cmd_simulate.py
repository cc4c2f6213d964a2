"""`jaxou simulate`: Monte Carlo simulation of the two-stage problem, checked
against the analytic laws, chunk by chunk and resumable; writes
`simulate_summary.json`, `simulate_arrays.npz` and `simulate.png`."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run", "solver_for"]

HELP = "simulate the two-stage problem by Monte Carlo and compare with the analytic laws"

DESCRIPTION = """\
Simulate many SGD trajectories of the two-stage OU model (pre-training on
[0, T1], then fine-tuning on [T1, T1 + T2], the same paths) through Diffrax, with
the mean and covariance streamed at evenly spaced times, and compare them with
the analytic laws: the KL of the empirical Gaussian fit to the exact marginal
(against the KL a perfect sampler shows with this many paths) and the largest
deviation of a mean or variance entry in standard errors.

Settings come from the [simulate] table of CONFIG (n_paths, dt, method, dtype,
seed, chunk_size); both durations must be finite. method is one of euler
(jaxou.FusedEuler), exact (jaxou.ExactOU: no discretisation error), heun, shark,
sra1, sea (Diffrax's solvers of those names) and milstein (the same scheme as
euler for additive noise).

Writes into the output directory (created if needed; never emptied):
  simulate_summary.json   settings, timings, KL and z-scores at the stage ends
  simulate_arrays.npz     ts, empirical and analytic means/covariances, KL curve
  simulate.png            mean and variance over time against the analytic curves,
                          and the KL-to-analytic curve
  simulate_chunks/        finished chunks of paths (resume state)

Interrupted? Run the same command again: finished chunks are kept and skipped.
A different configuration in the same directory is refused (use --fresh to
discard the old chunks, or another --out).

examples:
  jaxou simulate
  jaxou simulate examples/default.toml --set simulate.method='"exact"'
  jaxou simulate --set simulate.n_paths=100000 --set simulate.chunk_size=20000
  jaxou simulate --set simulate.n_paths=1024 --set simulate.dt=0.05 --saves 21
"""

FILES = ("simulate_summary.json", "simulate_arrays.npz", "simulate.png")
CHUNK_DIR = "simulate_chunks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._cli import add_config_arguments

    add_config_arguments(parser, set_example="--set simulate.dt=0.005")
    parser.add_argument(
        "--saves", type=int, default=101, metavar="K", help="saved times on [0, T1+T2] (>= 2)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="discard chunks of a different earlier simulation"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw simulate.png")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def solver_for(method: str):
    """The solver object of a `simulate.method` name of the configuration."""
    import diffrax

    from ._solvers import ExactOU, FusedEuler

    solvers = {
        "euler": FusedEuler,
        # With additive noise the Milstein correction g'g vanishes: Milstein is Euler.
        "milstein": FusedEuler,
        "exact": ExactOU,
        "heun": diffrax.Heun,
        "shark": diffrax.ShARK,
        "sra1": diffrax.SRA1,
        "sea": diffrax.SEA,
    }
    return solvers[method]()


def _check(args, config) -> None:
    if args.saves < 2:
        raise ValueError(f"--saves must be >= 2, got {args.saves}")
    for name in ("pretrain", "finetune"):
        if getattr(config, name).duration == float("inf"):
            raise ValueError(
                f"{name}.duration is inf: a simulation needs finite durations "
                f"(e.g. --set {name}.duration=200)"
            )


def _simulate(plan, config, args, out_dir: str, progress):
    """Run (or reload) every chunk of `plan`, saving each as it finishes; returns
    the merged Simulation, the seconds spent, and the paths computed this time."""
    import time

    import diffrax

    from . import __version__
    from ._resume import ChunkStore, fingerprint, run_chunks
    from ._simulate import BLOCK, ChunkResult, merge_chunks, run_chunk
    from ._stats import Moments

    cfg = config.to_dict(arrays=True)
    cfg.pop("output", None)
    layout = [plan.n_chunks, plan.blocks_per_chunk, args.saves]
    store = ChunkStore(
        os.path.join(out_dir, CHUNK_DIR),
        fingerprint(cfg, layout, __version__),
        plan.n_chunks,
        what="simulation",
        fresh=args.fresh,
        progress=progress,
    )
    todo = [i for i in range(plan.n_chunks) if i not in store.done()]
    per = plan.blocks_per_chunk * BLOCK
    computed = sum(min(plan.n_paths - i * per, per) for i in todo)
    # Within a chunk, a bar advanced at each saved time (Diffrax's progress meter).
    meter = diffrax.NoProgressMeter() if args.quiet else diffrax.TqdmProgressMeter(1)

    def compute(i: int) -> dict:
        return run_chunk(plan, i, progress_meter=meter).moments._asdict()

    start = time.perf_counter()
    arrays = run_chunks(store, compute, progress=progress)
    seconds = time.perf_counter() - start
    parts = [ChunkResult(Moments(a["count"], a["mean"], a["m2"]), None) for a in arrays]
    return merge_chunks(plan, parts), seconds, computed


def _plan(config, args, progress):
    """The problem, the saved times and the plan of the simulation."""
    import jax
    import numpy as np

    from ._problem import build_problem
    from ._simulate import plan_simulation

    sim_cfg = config.simulate
    with progress(f"building the problem (d = {config.problem.dim})"):
        model, _ = build_problem(config)
    t1, t2 = float(model.t_pretrain), float(model.t_finetune)
    ts = np.union1d(np.linspace(0.0, t1 + t2, args.saves), [t1])
    # The paths run in simulate.dtype; the analytic laws and the comparison stay float64.
    plan = plan_simulation(
        _cast(model, sim_cfg.dtype),
        jax.random.key(int(sim_cfg.seed)),
        n_paths=int(sim_cfg.n_paths),
        dt=float(sim_cfg.dt),
        solver=solver_for(sim_cfg.method),
        ts=ts,
        chunk_size=None if sim_cfg.chunk_size is None else int(sim_cfg.chunk_size),
    )
    return model, ts, plan


def _compare(model, sim, ts) -> dict:
    """The statistics, the exact laws, the KL curve and the z-scores (float64)."""
    import numpy as np

    from ._diagnostics import analytic_marginals

    sim = _cast(sim, "float64")
    laws = analytic_marginals(model, ts)
    z_mean, z_cov = (np.asarray(z) for z in sim.z_scores(laws))
    return dict(
        ts=ts,
        mean=np.asarray(sim.mean),
        cov=np.asarray(sim.cov),
        analytic_mean=np.asarray(laws.mean),
        analytic_cov=np.asarray(laws.cov),
        kl=np.asarray(sim.kl_to(laws)),
        z_mean=z_mean,
        z_var=np.diagonal(z_cov, axis1=-2, axis2=-1),
    )


def run(args: argparse.Namespace) -> int:
    from ._cli import Progress, enable_x64, jsonable, load_command_config, write_atomic

    progress = Progress(quiet=args.quiet)
    config, out_dir = load_command_config(args)
    _check(args, config)
    plot = config.output.plot and not args.no_plot
    sim_cfg = config.simulate

    enable_x64()
    import numpy as np

    from ._diagnostics import kl_fit_floor

    model, ts, plan = _plan(config, args, progress)
    steps = plan.schedule.total_steps
    what = "exact jumps" if sim_cfg.method == "exact" else f"steps of dt {sim_cfg.dt:g}"
    progress.info(
        f"simulating {sim_cfg.n_paths} paths in {plan.n_chunks} chunk(s), method "
        f"{sim_cfg.method} ({steps} {what}), {sim_cfg.dtype}"
    )
    sim, seconds, computed = _simulate(plan, config, args, out_dir, progress)
    with progress("analytic laws and comparison"):
        arrays = _compare(model, sim, ts)
    floor, sd = kl_fit_floor(model.dim, int(sim_cfg.n_paths))
    t1 = float(model.t_pretrain)
    i1 = int(np.searchsorted(ts, t1))
    summary = {
        "settings": {
            **{k: sim_cfg[k] for k in ("n_paths", "dt", "method", "dtype", "seed", "chunk_size")},
            "chunks": plan.n_chunks,
            "dim": model.dim,
            "t_pretrain": t1,
            "t_finetune": float(model.t_finetune),
            "saves": int(ts.size),
            "steps": steps,
        },
        "seconds": seconds,
        "paths_computed": computed,
        "path_steps_per_second": computed * steps / seconds if computed else None,
        "kl_to_analytic": {"pretrained": arrays["kl"][i1], "finetuned": arrays["kl"][-1]},
        "kl_floor": {"mean": floor, "std": sd},
        "max_abs_z": {
            "mean": np.max(np.abs(arrays["z_mean"])),
            "variance": np.max(np.abs(arrays["z_var"])),
        },
        "config_file": config.source,
    }
    png = None
    if plot:
        from ._plot import plot_simulation

        title = (
            f"jaxou simulate: {sim_cfg.n_paths} paths of the two-stage model (d = "
            f"{model.dim}), method {sim_cfg.method} ({steps} {what}), {sim_cfg.dtype}"
        )
        with progress("plotting"):
            png = plot_simulation(arrays, (floor, sd), t1, title)
    summary = jsonable(summary)
    _write(out_dir, summary, arrays, png, write_atomic)
    written = [f for f in FILES if png is not None or f != "simulate.png"]
    progress.info(f"wrote {', '.join(written)} to {out_dir}{os.sep}")
    _report(summary, args.json)
    return 0


def _write(out_dir, summary, arrays, png, write_atomic) -> None:
    import numpy as np

    text = json.dumps(summary, indent=2, allow_nan=False)
    write_atomic(os.path.join(out_dir, "simulate_summary.json"), (text + "\n").encode())
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(os.path.join(out_dir, "simulate_arrays.npz"), buffer.getvalue())
    if png is not None:
        write_atomic(os.path.join(out_dir, "simulate.png"), png)


def _report(s: dict, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(s, indent=2, allow_nan=False) + "\n")
        return
    floor, sd = s["kl_floor"]["mean"], s["kl_floor"]["std"]
    sys.stdout.write(
        f"simulated {s['settings']['n_paths']} paths ({s['paths_computed']} this run, "
        f"{s['seconds']:.1f} s); KL(empirical ‖ analytic) = "
        f"{s['kl_to_analytic']['pretrained']:.4g} (pretrained), "
        f"{s['kl_to_analytic']['finetuned']:.4g} (finetuned); a perfect sampler shows "
        f"{floor:.4g} ± {sd:.2g}; largest |z|: mean {s['max_abs_z']['mean']:.2f}, "
        f"variance {s['max_abs_z']['variance']:.2f}\n"
    )


def _cast(tree, dtype: str):
    """Every floating array of `tree` (a model or a Simulation) in `dtype`."""
    import equinox as eqx
    import jax

    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)
