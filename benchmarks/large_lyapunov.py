"""Benchmark: the large-scale Lyapunov solver (LowRankADI) and the finite-time laws
at scale (finite_time_cov), float64, on this machine.

    .venv/bin/python benchmarks/large_lyapunov.py                 # everything
    .venv/bin/python benchmarks/large_lyapunov.py --parts accuracy
    .venv/bin/python benchmarks/large_lyapunov.py --parts scale --sizes 10000 100000

Problems (the recipe of tests/test_adi.py): H = diag(h) + U Λ Uᵀ with h log-spread
over `spread` (10^3), U [d, k] Gaussian / √d (not orthonormal), Λ = diag(U[0.5, 5]);
C = diag(c) + Z S Zᵀ with c ~ U[0.5, 1.5] and 10 % of it zero, Z [d, m] Gaussian,
S indefinite (a quarter of the columns carry a negative weight that the diagonal
dominates, so C is PSD); k = 20, m = 50; η/B = 1 (the solve is linear in it).

Parts:

- `accuracy` (d = 2,000): Σ∞ from LowRankADI(rtol) against SciPy's dense
  `solve_continuous_lyapunov` (relative Frobenius error, the true relative
  residual beside the reported one), the rank and the time (first call, which
  compiles, and a second call); Σ(t) from `finite_time_cov` at t = 0.1, 10, 1000
  from Σ₀ = 0.5 I against the dense Σ∞ + e^{-Ht}(Σ₀ - Σ∞)e^{-Ht} with
  scipy.linalg.expm.
- `scale` (d = 10^4, 10^5, 10^6): one child process per (d, rtol): wall time of
  the solve (first call: compilation included), peak resident memory of the
  child (ru_maxrss, problem data included), steps, rank, the reported residual
  and its parts. Larger d cannot be checked densely; the reported residual is an
  upper bound of the true one in exact arithmetic, and the random probe (a lower
  confidence bound of the true residual, in float64) is recorded beside it.

Writes benchmarks/results/large_lyapunov.{json,md}.
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import _common  # noqa: E402  (must come before numpy/scipy/jax: sets BLAS threads)

BLAS_THREADS = _common.setup_threads(sys.argv)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

K, M, SPREAD = 20, 50, 1e3


def make_problem(d: int, seed: int = 0, zeros: float = 0.1):
    """(h, U, Λ, c, Z, S) as NumPy float64 arrays (module docstring); a fraction
    `zeros` of c is zero."""
    rng = np.random.default_rng(seed)
    h = np.exp(rng.uniform(np.log(1 / SPREAD), 0, d))
    h[:2] = 1 / SPREAD, 1.0
    U = rng.standard_normal((d, K)) / np.sqrt(d)
    lam = np.diag(rng.uniform(0.5, 5, K))
    c = rng.uniform(0.5, 1.5, d)
    c[rng.random(d) < zeros] = 0
    m1, m2 = M - M // 4, M // 4
    Z1 = rng.standard_normal((d, m1)) / np.sqrt(m1)
    Z2 = rng.standard_normal((d, m2)) * (c > 0)[:, None] / np.sqrt(d)
    delta = 0.5 * c[c > 0].min() / np.linalg.norm(Z2, 2) ** 2
    Z = np.concatenate([Z1, Z2], axis=1)
    S = np.diag(np.concatenate([np.ones(m1), -delta * np.ones(m2)]))
    return h, U, lam, c, Z, S


def _operators(d: int):
    import jax

    jax.config.update("jax_enable_x64", True)
    from jaxou._operator import DiagonalPlusLowRank

    h, U, lam, c, Z, S = make_problem(d)
    return DiagonalPlusLowRank(h, U, lam), DiagonalPlusLowRank(c, Z, S), (h, U, lam, c, Z, S)


def _stats_dict(stats, sol) -> dict:
    from jaxou._lyapunov.base import LyapunovResult

    return {
        "result": LyapunovResult(int(sol.result)).name,
        "residual": float(sol.residual),
        "adi_residual": stats.adi_residual,
        "truncation_residual": stats.truncation_residual,
        "probe_residual": stats.probe_residual,
        "predicted_adi_residual": stats.predicted,
        "steps": stats.steps,
        "num_shifts": stats.num_shifts,
        "rank": stats.rank,
        "interval": list(stats.interval),
    }


def child_accuracy(args) -> dict:
    """d = 2,000 against SciPy and expm."""
    import jax.numpy as jnp
    import scipy.linalg as sl

    from jaxou._lyapunov.adi import LowRankADI
    from jaxou._lyapunov.expm import finite_time_cov
    from jaxou._operator import Diagonal

    d = 2000
    H, C, (h, U, lam, c, Z, S) = _operators(d)
    Hd, Cd = np.diag(h) + U @ lam @ U.T, np.diag(c) + Z @ S @ Z.T
    t0 = time.perf_counter()
    X_ref = sl.solve_continuous_lyapunov(Hd, Cd)
    scipy_s = time.perf_counter() - t0
    out = {"d": d, "scipy_s": scipy_s, "rtol": args.rtol}
    solver = LowRankADI(rtol=args.rtol)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        sol, stats = solver.solve_with_stats(H, C)
        sol.value.factor.block_until_ready()
        times.append(time.perf_counter() - t0)
    X = np.asarray(sol.value.as_matrix())
    out.update(_stats_dict(stats, sol))
    out["adi_first_s"], out["adi_second_s"] = times
    out["frobenius_error"] = float(np.linalg.norm(X - X_ref) / np.linalg.norm(X_ref))
    out["true_residual"] = float(np.linalg.norm(Hd @ X + X @ Hd - Cd) / np.linalg.norm(Cd))
    S0 = Diagonal(jnp.full(d, 0.5))
    out["finite_time"] = []
    for t in (0.1, 10.0, 1000.0):
        E = sl.expm(-t * Hd)
        ref = X_ref + E @ (0.5 * np.eye(d) - X_ref) @ E
        t0 = time.perf_counter()
        St = finite_time_cov(H, sol.value, S0, t, rtol=args.ft_rtol)
        St.factor.block_until_ready()
        elapsed = time.perf_counter() - t0
        err = float(np.linalg.norm(np.asarray(St.as_matrix()) - ref) / np.linalg.norm(ref))
        out["finite_time"].append({"t": t, "error": err, "rank": St.rank, "time_s": elapsed})
    return out


def child_scale(args) -> dict:
    from jaxou._lyapunov.adi import LowRankADI

    t0 = time.perf_counter()
    H, C, _ = _operators(args.d)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sol, stats = LowRankADI(rtol=args.rtol, max_rank=args.max_rank).solve_with_stats(H, C)
    sol.value.factor.block_until_ready()
    solve_s = time.perf_counter() - t0
    out = {"d": args.d, "rtol": args.rtol, "max_rank": args.max_rank, "setup_s": setup_s}
    out.update(_stats_dict(stats, sol))
    out["solve_s"] = solve_s
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    out["factor_gb"] = stats.rank * args.d * 8 / 1e9
    return out


def _load_aligned(path: str) -> np.ndarray:
    """`np.load`, into a 64-byte aligned buffer: JAX adopts such an array without a
    copy (`jax.dlpack.from_dlpack`), while `np.load`'s own (16-byte aligned) array
    would be copied, 6 GB more at d = 10^6."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
        size = int(np.prod(shape)) * dtype.itemsize
        raw = np.empty(size + 64, np.uint8)
        start = (-raw.ctypes.data) % 64
        out = raw[start : start + size].view(dtype).reshape(shape)
        f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    return out


def child_two_stage(args) -> dict:
    """Two stages' stationary laws and the KL between them at one tolerance, through
    the public API: `jaxou.LowRankADI(rtol, max_rank).solve` for each stage,
    `jaxou.Gaussian` and `jaxou.kl_parts`. The first factor waits on disk (a `.npy`
    in a temporary folder) while the second stage is solved, so that at most one
    solve's workspace and, for the KL, the two factors are in memory at once."""
    import os
    import tempfile

    import jax

    jax.config.update("jax_enable_x64", True)
    import jaxou

    d, out, rss = args.d, {"d": args.d, "rtol": args.rtol, "max_rank": args.max_rank}, []
    mark = lambda: rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    solver = jaxou.LowRankADI(rtol=args.rtol, max_rank=args.max_rank)
    t_all = time.perf_counter()
    laws, stages = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, seed in enumerate((0, 1)):
            h, U, lam, c, Z, S = make_problem(d, seed=seed, zeros=0.0)
            if i:  # fine-tuning: the same scale of curvature, shifted minimum
                h = h * np.exp(0.2 * np.random.default_rng(7).standard_normal(d))
            H, C = jaxou.DiagonalPlusLowRank(h, U, lam), jaxou.DiagonalPlusLowRank(c, Z, S)
            del h, U, lam, c, Z, S
            t0 = time.perf_counter()
            sol = solver.solve(H, C)
            X = sol.value
            X.factor.block_until_ready()
            mark()
            stages.append(
                {
                    "solve_s": time.perf_counter() - t0,
                    "result": jaxou.LyapunovResult(int(sol.result)).name,
                    "residual": float(sol.residual),
                    "rank": X.rank,
                }
            )
            del sol, H, C
            mean = np.zeros(d) if i == 0 else 0.01 * np.random.default_rng(8).standard_normal(d)
            if i == 0:
                path = os.path.join(tmp, "factor.npy")
                np.save(path, np.asarray(X.factor))
                laws.append((mean, X.diagonal, path, X.core))
            else:
                laws.append((mean, X.diagonal, X.factor, X.core))
            del X
        t0 = time.perf_counter()
        mean1, diag1, path, core1 = laws[0]
        factor1 = jax.dlpack.from_dlpack(_load_aligned(path))  # no copy
        load_s = time.perf_counter() - t0
        pre = jaxou.Gaussian(mean1, jaxou.DiagonalPlusLowRank(diag1, factor1, core1))
        mean2, diag2, factor2, core2 = laws[1]
        fine = jaxou.Gaussian(mean2, jaxou.DiagonalPlusLowRank(diag2, factor2, core2))
        t0 = time.perf_counter()
        parts = jaxou.kl_parts(fine, pre)
        kl = float(parts.total)
        kl_s = time.perf_counter() - t0
        mark()
    out.update(
        {
            "stages": stages,
            "load_s": load_s,
            "kl_s": kl_s,
            "total_s": time.perf_counter() - t_all,
            "kl": kl,
            "kl_covariance": float(parts.covariance),
            "kl_shift": float(parts.shift),
            "peak_rss_gb_after": rss,
            "peak_rss_gb": max(rss),
        }
    )
    return out


def _md(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        "# Large-scale Lyapunov solves (LowRankADI) and finite-time laws",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {payload['memory_gb']:.0f} GB RAM, "
        f"{m['platform']}; Python {m['python']}, jax {m['jax']}, NumPy {m['numpy']}, "
        f"SciPy {m['scipy']}; BLAS threads {m['blas_threads']}; {m['date']} "
        f"(load average {m['loadavg_1min_at_start']:.1f} at start: the machine is shared).",
        "",
        "Problem: H = diag(h) + UΛUᵀ, h spread over 10^3, k = 20; C = diag(c) + ZSZᵀ, "
        "m = 50, 10 % of c zero, indefinite S (C PSD); float64. Command: "
        f"`{payload['command']}`.",
        "",
    ]
    acc = payload.get("accuracy")
    if acc:
        lines += [
            "## d = 2,000 against SciPy",
            "",
            f"LowRankADI(rtol={acc['rtol']:g}): result {acc['result']}, relative Frobenius "
            f"error **{acc['frobenius_error']:.2e}** against `solve_continuous_lyapunov` "
            f"({acc['scipy_s']:.1f} s); reported residual {acc['residual']:.2e} (ADI "
            f"{acc['adi_residual']:.2e} + compression {acc['truncation_residual']:.2e}), "
            f"true residual {acc['true_residual']:.2e}; {acc['steps']} steps, rank "
            f"{acc['rank']}; {acc['adi_first_s']:.1f} s first call, "
            f"{acc['adi_second_s']:.1f} s second.",
            "",
            "| t | Σ(t) relative Frobenius error | rank | time |",
            "|---|---|---|---|",
        ]
        for r in acc["finite_time"]:
            lines.append(f"| {r['t']:g} | {r['error']:.2e} | {r['rank']} | {r['time_s']:.1f} s |")
        lines.append("")
    rows = payload.get("scale", [])
    if rows:
        lines += [
            "## Growth with d (one child process per row)",
            "",
            "| d | rtol | result | reported residual | probe | steps | rank | "
            "solve time | peak RSS | factor |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r.get("status") != "ok":
                lines.append(
                    f"| {r.get('d')} | {r.get('rtol')} | {r.get('status')} | | | | | | | |"
                )
                continue
            lines.append(
                f"| {r['d']:,} | {r['rtol']:g} | {r['result']} | {r['residual']:.2e} | "
                f"{r['probe_residual']:.1e} | {r['steps']} | {r['rank']} | "
                f"{r['solve_s']:.1f} s | {r['peak_rss_gb']:.2f} GB | {r['factor_gb']:.2f} GB |"
            )
        lines.append("")
    rows = [r for r in payload.get("two_stage", []) if r.get("status") == "ok"]
    if rows:
        lines += [
            "## Two stages and their KL (one child process per tolerance)",
            "",
            "Two stationary laws (stage 2: h scaled by exp(0.2 ξ), new U, Λ, c, Z, S; "
            "c > 0 here: with 10 % of c zero, D₀ = q/2h vanishes on 10^5 coordinates, "
            "which a factor of a few hundred columns cannot cover, so the laws are "
            "numerically singular there and the Woodbury algebra of the KL has no "
            "positive diagonal to work with), each from "
            "`jaxou.LowRankADI(rtol, max_rank).solve`, then `jaxou.kl_parts` (fine-tuned "
            "against pre-trained). The first factor waits on disk while the second "
            "stage is solved.",
            "",
            "| d | rtol | max_rank | stage 1: time, residual, rank | stage 2 | KL time | "
            "total | peak RSS | KL |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            st = [
                f"{s['solve_s']:.0f} s, {s['residual']:.1e} ({s['result']}), {s['rank']}"
                for s in r["stages"]
            ]
            lines.append(
                f"| {r['d']:,} | {r['rtol']:g} | {r['max_rank']} | {st[0]} | {st[1]} | "
                f"{r['kl_s']:.0f} s | **{r['total_s']:.0f} s** | {r['peak_rss_gb']:.1f} GB | "
                f"{r['kl']:.10g} |"
            )
        by_d: dict = {}
        for r in rows:
            by_d.setdefault(r["d"], []).append(r)
        for d, rs in by_d.items():
            rs = sorted(rs, key=lambda r: r["rtol"])
            for a, b in zip(rs[:-1], rs[1:]):
                rel = abs(a["kl"] - b["kl"]) / abs(a["kl"])
                lines.append(
                    f"\nd = {d:,}: KL at rtol {a['rtol']:g} and {b['rtol']:g} differ by "
                    f"**{rel:.1e}** relative."
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", nargs="+", default=["accuracy", "scale"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--rtols", nargs="+", type=float, default=[1e-6])
    parser.add_argument("--rtol", type=float, default=1e-8)
    parser.add_argument("--ft-rtol", type=float, default=1e-10)
    parser.add_argument("--max-rank", type=int, default=None)
    parser.add_argument("--d", type=int)
    parser.add_argument("--child", choices=["accuracy", "scale", "two_stage"])
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--blas-threads", default="1")
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the parts of an earlier run's JSON that are not rerun",
    )
    args = parser.parse_args()
    if args.child:
        fn = {"accuracy": child_accuracy, "scale": child_scale, "two_stage": child_two_stage}
        print(json.dumps(fn[args.child](args)))
        return
    script = __import__("os").path.abspath(__file__)
    payload = {"machine": _common.machine_info(BLAS_THREADS), "command": " ".join(sys.argv)}
    old_path = __import__("os").path.join(_common.RESULTS, "large_lyapunov.json")
    if args.append and __import__("os").path.exists(old_path):
        with open(old_path) as f:
            old = json.load(f)
        commands = old["command"].split("; ") + [payload["command"]]  # each once
        payload["command"] = "; ".join(dict.fromkeys(commands))
        payload.update({k: old[k] for k in ("accuracy", "scale", "two_stage") if k in old})
    payload["memory_gb"] = (
        __import__("os").sysconf("SC_PAGE_SIZE") * __import__("os").sysconf("SC_PHYS_PAGES") / 1e9
    )
    if "accuracy" in args.parts:
        extra = ["--rtol", str(args.rtol), "--ft-rtol", str(args.ft_rtol)]
        payload["accuracy"] = _common.run_child(
            script, ["--child", "accuracy", *extra], args.timeout
        )
        print(json.dumps(payload["accuracy"]), flush=True)
    if "scale" in args.parts:
        # --append keeps the rows that are not rerun; a rerun (d, rtol) is replaced
        rerun = {(d, rtol) for d in args.sizes for rtol in args.rtols}
        payload["scale"] = [
            r for r in payload.get("scale", []) if (r.get("d"), r.get("rtol")) not in rerun
        ]
        for d in args.sizes:
            for rtol in args.rtols:
                extra = ["--d", str(d), "--rtol", str(rtol)]
                if args.max_rank:
                    extra += ["--max-rank", str(args.max_rank)]
                row = _common.run_child(script, ["--child", "scale", *extra], args.timeout)
                row.setdefault("d", d)
                row.setdefault("rtol", rtol)
                payload["scale"].append(row)
                print(json.dumps(row), flush=True)
    if "two_stage" in args.parts:
        payload["two_stage"] = []
        for rtol in args.rtols:
            extra = ["--d", str(args.sizes[-1]), "--rtol", str(rtol)]
            if args.max_rank:
                extra += ["--max-rank", str(args.max_rank)]
            row = _common.run_child(script, ["--child", "two_stage", *extra], args.timeout)
            row.setdefault("d", args.sizes[-1])
            row.setdefault("rtol", rtol)
            payload["two_stage"].append(row)
            print(json.dumps(row), flush=True)
    payload.get("scale", []).sort(key=lambda r: (r.get("d", 0), -r.get("rtol", 0)))
    _common.write_json("large_lyapunov", payload)
    _common.write_text("large_lyapunov.md", _md(payload))


if __name__ == "__main__":
    main()
