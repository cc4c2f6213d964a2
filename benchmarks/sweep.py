"""Benchmark of `jaxou.evaluate` / `jaxou.sensitivity` and of operator stages.

    .venv/bin/python benchmarks/sweep.py            # full run
    .venv/bin/python benchmarks/sweep.py --quick    # smoke run

1. A grid of 10⁵ points at d = 64 (finite durations, the default problem's
   shape): time of `jaxou.evaluate` (warm, median of repeats), against a
   SciPy/NumPy loop over a sample of the same grid (extrapolated), as a ratio;
   also the cost per point without deduplication of the law parameters.
2. The cost of a gradient (reverse mode, every hyperparameter, `jax.grad`
   through `jaxou.evaluate`) relative to the forward evaluation, on the same
   distinct points (interleaved rounds), and of every sensitivity (forward mode).
3. Operator stages (low-rank plus diagonal Hessian with a constant diagonal:
   the exact structured solve) at d = 10⁴, 10⁵, 10⁶, through `jaxou.SGDStage`
   and `jaxou.two_stage_bound`: time and peak memory (each size in its own
   process). The general case (a non-constant diagonal) is the large-scale
   solver's, benchmarked in `benchmarks/large_lyapunov.py`.

Accuracy is checked before any time is reported. Results (with machine and
versions) go to benchmarks/results/sweep.{json,md,png} (sweep_quick.* with
--quick).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.min(times)), float(np.max(times))


# ---------------------------------------------------------------------------
# The reference: SciPy/NumPy, one point at a time.


def _scipy_point(H_S, C_S, th_S, H_T0, C_T, th_T0, s0, t1, t2, h):
    import scipy.linalg as sl

    d = H_S.shape[0]
    rs = h["pretrain_lr"] / h["pretrain_batch_size"]
    rt = h["finetune_lr"] / h["finetune_batch_size"]
    H_T = h["target_hessian_scale"] * H_T0
    u = (th_T0 - th_S) / np.linalg.norm(th_T0 - th_S)
    th_T = th_S + h["target_shift"] * u
    Sig_S = sl.solve_continuous_lyapunov(H_S, rs * C_S)
    Sig_T = sl.solve_continuous_lyapunov(H_T, rt * C_T)
    F1 = sl.expm(-H_S * t1)
    P = F1 @ (s0**2 * np.eye(d)) @ F1.T + Sig_S - F1 @ Sig_S @ F1.T
    m1 = th_S + F1 @ (np.zeros(d) - th_S)
    F2 = sl.expm(-H_T * t2)
    Q = F2 @ P @ F2.T + Sig_T - F2 @ Sig_T @ F2.T
    m2 = th_T + F2 @ (m1 - th_T)

    def kl(mp, Sp, mq, Sq):
        M = np.linalg.solve(Sq, Sp)
        diff = mp - mq
        return 0.5 * (np.trace(M) - d - np.linalg.slogdet(M)[1] + diff @ np.linalg.solve(Sq, diff))

    kl1 = kl(m1, P, np.zeros(d), s0**2 * np.eye(d))
    kl2 = kl(m2, Q, m1, P)

    def term(k, n):
        return math.sqrt((k + math.log(2 * math.sqrt(n) / h["delta"])) / (2 * n))

    return term(kl1, h["n_source"]) + term(kl2, h["n_target"])


# ---------------------------------------------------------------------------


def grid_benchmark(quick: bool) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import jaxou
    from jaxou._config import load_config
    from jaxou._problem import build_problem
    from jaxou._sweep import _resolve

    d = 16 if quick else 64
    model, info = build_problem(load_config(None, [("problem", "dim", d)]))
    axes = dict(
        finetune_lr=np.logspace(-3.5, -1, 10 if quick else 20),
        finetune_batch_size=np.logspace(0.5, 2.5, 5 if quick else 10),
        n_target=np.logspace(2, 5, 5 if quick else 25),
        delta=np.array([0.01, 0.05, 0.1, 0.2]),
        empirical_risk_target=np.linspace(0, 0.2, 5),
    )
    g = jaxou.grid(**axes)
    hyper = jaxou.Hyperparameters(**g.given(), n_source=1e6)
    n = int(np.prod([len(v) for v in axes.values()]))
    print(f"[grid] d = {d}, {n} points", flush=True)

    # Accuracy first: the fast path against the plain path and SciPy on a sample.
    result = jaxou.evaluate(model, hyper)
    jax.block_until_ready(result.total_term)
    h, shape = _resolve(model, hyper)
    flat = {k: np.asarray(v).ravel() for k, v in h.items()}
    rng = np.random.default_rng(0)
    sample = rng.choice(n, size=8 if quick else 40, replace=False)
    H_S, C_S, th_S = (
        np.asarray(x)
        for x in (model.pretrain.hessian, model.pretrain.noise_cov, model.pretrain.minimum)
    )
    H_T, C_T, th_T = (
        np.asarray(x)
        for x in (model.finetune.hessian, model.finetune.noise_cov, model.finetune.minimum)
    )
    args = (H_S, C_S, th_S, H_T, C_T, th_T, 0.1, float(model.t_pretrain), float(model.t_finetune))
    total = np.asarray(result.total_term).ravel()
    t0 = time.perf_counter()
    ref = np.array([_scipy_point(*args, {k: v[i] for k, v in flat.items()}) for i in sample])
    scipy_per_point = (time.perf_counter() - t0) / len(sample)
    acc_scipy = float(np.max(np.abs(total[sample] - ref) / np.abs(ref)))
    plain = jaxou.evaluate(
        model, jaxou.Hyperparameters(**{k: v[sample] for k, v in flat.items()}), method="plain"
    )
    acc_plain = float(
        np.max(np.abs(total[sample] - np.asarray(plain.total_term)) / np.asarray(plain.total_term))
    )
    print(f"[grid] max rel. error vs SciPy {acc_scipy:.2e}, vs plain path {acc_plain:.2e}")
    assert acc_scipy < 1e-8 and acc_plain < 1e-10

    repeats = 3 if quick else 5
    t_grid = _median_time(
        lambda: jax.block_until_ready(jaxou.evaluate(model, hyper).total_term), repeats
    )
    print(f"[grid] evaluate: {t_grid[0]:.3f} s for {n} points", flush=True)

    # Every point distinct (no shared law parameters): cost per point.
    m = 512 if quick else 4096
    distinct = jaxou.Hyperparameters(
        finetune_lr=rng.uniform(1e-3, 1e-1, m),
        finetune_batch_size=rng.uniform(2, 256, m),
        target_hessian_scale=rng.uniform(0.5, 2, m),
        target_shift=rng.uniform(0, 1, m),
        n_target=rng.uniform(100, 1e5, m),
        n_source=1e6,
    )
    jax.block_until_ready(jaxou.evaluate(model, distinct, dedupe=False).total_term)
    t_distinct = _median_time(
        lambda: jax.block_until_ready(jaxou.evaluate(model, distinct, dedupe=False).total_term),
        3,
    )
    per_point = t_distinct[0] / m
    print(f"[grid] distinct points: {1e6 * per_point:.0f} µs/point", flush=True)

    # Gradient (reverse mode, every hyperparameter) against the forward pass, both
    # through the public `jaxou.evaluate` (jit-compiled as wholes), on the first
    # distinct points; interleaved rounds, so that both see the same machine load.
    mg = 128 if quick else 256
    hd, _ = _resolve(model, distinct)
    hd = {k: jnp.asarray(v)[:mg] for k, v in hd.items()}

    def forward(hh):
        return jnp.sum(jaxou.evaluate(model, jaxou.Hyperparameters(**hh), dedupe=False).total_term)

    few = jaxou.Hyperparameters(**hd)
    fns = {
        "forward": jax.jit(forward),
        "gradient": jax.jit(jax.grad(forward)),
        # every term × every hyperparameter, forward mode
        "sensitivity": lambda hh: jaxou.sensitivity(model, few)["total_term"]["finetune_lr"],
    }
    for f in fns.values():
        jax.block_until_ready(f(hd))
    times = {k: [] for k in fns}
    for _ in range(3 if quick else 7):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(hd))
            times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    rounds = np.asarray(times["gradient"]) / np.asarray(times["forward"])
    print(
        f"[grad] forward {med['forward']:.3f} s, gradient {med['gradient']:.3f} s, "
        f"ratio {med['gradient'] / med['forward']:.2f} (rounds {rounds.min():.2f}–"
        f"{rounds.max():.2f}); all sensitivities {med['sensitivity']:.3f} s",
        flush=True,
    )
    scipy_total = scipy_per_point * n
    return {
        "dim": d,
        "points": n,
        "axes": {k: len(v) for k, v in axes.items()},
        "accuracy_vs_scipy_max_rel": acc_scipy,
        "accuracy_vs_plain_max_rel": acc_plain,
        "evaluate_s": {"median": t_grid[0], "min": t_grid[1], "max": t_grid[2]},
        "scipy_loop_per_point_s": scipy_per_point,
        "scipy_loop_sample": len(sample),
        "scipy_loop_extrapolated_s": scipy_total,
        "speedup_vs_scipy": scipy_total / t_grid[0],
        "distinct_points": m,
        "distinct_per_point_s": per_point,
        "distinct_speedup_vs_scipy_per_point": scipy_per_point / per_point,
        "distinct_extrapolated_to_grid_s": per_point * n,
        "gradient_points": mg,
        "forward_s": med["forward"],
        "gradient_s": med["gradient"],
        "gradient_over_forward": med["gradient"] / med["forward"],
        "gradient_over_forward_rounds": [float(rounds.min()), float(rounds.max())],
        "sensitivity_all_terms_all_hyper_s": med["sensitivity"],
        "sensitivity_over_forward": med["sensitivity"] / med["forward"],
    }


STRUCTURED_CHILD = r"""
import json, sys, time
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
import jaxou
d, k = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
U = np.linalg.qr(rng.standard_normal((d, k)))[0]
lam = np.logspace(2, 0, k)
H_S = jaxou.DiagonalPlusLowRank(np.full(d, 0.01), U, np.diag(lam))
C_S = jaxou.DiagonalPlusLowRank(rng.uniform(0.5, 1.0, d), U, np.diag(0.5 * lam))
H_T = jaxou.DiagonalPlusLowRank(np.full(d, 0.015), U, np.diag(1.5 * lam))
def once():
    src = jaxou.SGDStage(H_S, C_S, jnp.zeros(d), 0.05, 128)
    tgt = jaxou.SGDStage(H_T, C_S, 1e-3 * jnp.ones(d), 0.01, 32)
    init = jaxou.Gaussian(jnp.zeros(d), jaxou.Diagonal(jnp.full(d, 0.01)))
    b = jaxou.two_stage_bound(jaxou.TwoStage(init, src, tgt), 1e7, 1e4)
    return float(b.finetune_bound)
t0 = time.perf_counter(); value = once(); first = time.perf_counter() - t0
t0 = time.perf_counter(); once(); second = time.perf_counter() - t0
# VmHWM (peak resident set of this process image; ru_maxrss would carry over the
# parent's peak across fork + exec on Linux).
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"d": d, "k": k, "first_s": first, "second_s": second,
                  "peak_rss_mb": peak, "finetune_bound": value}))
"""


def structured_benchmark(quick: bool) -> list[dict]:
    sizes = [10**4, 10**5] if quick else [10**4, 10**5, 10**6]
    out = []
    for d in sizes:
        proc = subprocess.run(
            [sys.executable, "-c", STRUCTURED_CHILD, str(d), "8"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"[structured] d = {d}: {row['second_s']:.2f} s (first call "
            f"{row['first_s']:.2f} s), peak RSS {row['peak_rss_mb']:.0f} MB",
            flush=True,
        )
        out.append(row)
    return out


def _machine() -> dict:
    import jax
    import scipy

    import jaxou

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "jaxou": jaxou.__version__,
        "device": str(jax.devices()[0]),
    }


def _plot(res: dict) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    a, b, c = fig.subplots(1, 3)
    g = res["grid"]
    a.bar(
        ["jaxou.evaluate", "SciPy loop\n(extrapolated)"],
        [g["evaluate_s"]["median"], g["scipy_loop_extrapolated_s"]],
        color=["C0", "C1"],
    )
    a.set_yscale("log")
    a.set_ylabel("seconds")
    a.set_title(f"{g['points']} grid points, d = {g['dim']}", fontsize=9)
    b.bar(
        ["forward", "gradient\n(reverse)", "all sensitivities\n(forward mode)"],
        [g["forward_s"], g["gradient_s"], g["sensitivity_all_terms_all_hyper_s"]],
        color=["C0", "C2", "C3"],
    )
    b.set_title(f"{g['gradient_points']} distinct points", fontsize=9)
    b.set_ylabel("seconds")
    s = res["structured"]
    c.loglog([r["d"] for r in s], [r["second_s"] for r in s], "o-", label="time (s)")
    c.loglog(
        [r["d"] for r in s], [r["peak_rss_mb"] / 1024 for r in s], "s--", label="peak RSS (GB)"
    )
    c.set_xlabel("d")
    c.legend()
    c.set_title("structured two-stage bound (k = 8)", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _markdown(res: dict) -> str:
    g, m = res["grid"], res["machine"]
    lines = [
        "# jaxou sweep benchmark",
        "",
        f"{m['date']} — {m['platform']}, {m['cpu_count']} CPUs, {m['device']}; "
        f"Python {m['python']}, JAX {m['jax']}, NumPy {m['numpy']}, SciPy {m['scipy']}, "
        f"jaxou {m['jaxou']}. Command: `{res['command']}`.",
        "",
        f"## Grid: {g['points']} points at d = {g['dim']} (finite durations)",
        "",
        f"- accuracy: max relative error of the total term {g['accuracy_vs_scipy_max_rel']:.1e} "
        f"vs SciPy, {g['accuracy_vs_plain_max_rel']:.1e} vs the plain path",
        f"- `jaxou.evaluate`: {g['evaluate_s']['median']:.3f} s median "
        f"(min {g['evaluate_s']['min']:.3f}, max {g['evaluate_s']['max']:.3f})",
        f"- SciPy/NumPy loop: {1e3 * g['scipy_loop_per_point_s']:.2f} ms/point over "
        f"{g['scipy_loop_sample']} points, extrapolated {g['scipy_loop_extrapolated_s']:.0f} s "
        f"→ speed-up **{g['speedup_vs_scipy']:.0f}×**",
        f"- every point distinct (no shared law parameters): "
        f"{1e6 * g['distinct_per_point_s']:.0f} µs/point, "
        f"{g['distinct_speedup_vs_scipy_per_point']:.1f}× the SciPy loop per point "
        f"({g['distinct_extrapolated_to_grid_s']:.0f} s extrapolated to the grid)",
        f"- gradient (reverse mode, all 11 hyperparameters) / forward, on "
        f"{g['gradient_points']} distinct points: "
        f"**{g['gradient_over_forward']:.2f}×** (median of interleaved rounds; per round "
        f"{g['gradient_over_forward_rounds'][0]:.2f}–{g['gradient_over_forward_rounds'][1]:.2f}×); "
        "all 16 terms × 11 hyperparameters "
        f"(forward mode): {g['sensitivity_over_forward']:.1f}×",
        "",
        "## Operator stages (low rank k = 8 plus a constant diagonal: exact structured solve)",
        "",
        "| d | time (s) | first call (s) | peak RSS (MB) |",
        "|---|---|---|---|",
    ]
    for r in res["structured"]:
        lines.append(
            f"| {r['d']:,} | {r['second_s']:.2f} | {r['first_s']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (small sizes)")
    args = parser.parse_args()
    res = {
        "command": "python benchmarks/sweep.py" + (" --quick" if args.quick else ""),
        "machine": _machine(),
        "grid": grid_benchmark(args.quick),
        "structured": structured_benchmark(args.quick),
    }
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, "sweep_quick" if args.quick else "sweep")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(_markdown(res))
    with open(stem + ".png", "wb") as f:
        f.write(_plot(res))
    print(_markdown(res))


if __name__ == "__main__":
    main()
