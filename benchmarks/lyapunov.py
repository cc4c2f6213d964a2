"""Benchmark: batched continuous Lyapunov solves, A X + X Aᵀ = Q.

    .venv/bin/python benchmarks/lyapunov.py            # full run (batch 256, a few minutes)
    .venv/bin/python benchmarks/lyapunov.py --quick    # smoke run (batch 32, 2 repeats)

Options: `--blas-threads N|default` (default 1, see `_common.py` for why),
`--sizes 8 64 256`, `--dtypes float64 float32`, `--tag NAME` (output file stem),
`--timeout S` (per child process).

Implementations, each timed on the same batch of problems:

- `jaxou eigh`: `jax.jit(lambda A, Q: jaxou.lyapunov(A, Q, solver=jaxou.Eigh()))`
  (symmetric A; leading batch dimension, no Python loop).
- `jaxou auto`: the same with the default `solver=jaxou.AutoLyapunov()` (under jit:
  a symmetry check and a `lax.cond` over the symmetric and general solvers).
- `scipy loop`: `[scipy.linalg.solve_continuous_lyapunov(a, q) for a, q in ...]`.
- `jax solve_sylvester (schur|eigen)`: `jax.jit(jax.scipy.linalg.solve_sylvester)`
  on the batch, with B = Aᵀ.
- general A (non-symmetric, d <= 8 only): `jaxou sign` (`jaxou.MatrixSign()`),
  `jaxou kron` (`jaxou.Kronecker()`) against the SciPy loop on the same
  non-symmetric problems.

Every jaxou solver checks its own answer (a relative residual, two matrix products
per problem) and the jitted calls raise if a check fails; that cost is in the times.

Each (dtype, d, group) runs in its own child process with a timeout, so that a
hang (seen on this 2-core machine with batched LAPACK calls running concurrently
in one XLA program, e.g. `solve_sylvester(method="eigen")`) is reported as a hang
instead of stopping the run. Inside a child, every implementation and the SciPy
loop are timed interleaved (round-robin) after a warm-up call, and the ratio is
taken against the SciPy loop of the same child. Accuracy (max over the batch of
‖X - X_ref‖_F / ‖X_ref‖_F, X_ref from the SciPy loop in float64) is checked before
any time is reported; a variant that fails its tolerance is marked, not ranked.

Writes benchmarks/results/<tag>.{json,md,png} (tag defaults to "lyapunov").
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import _common  # noqa: E402  (must come before numpy/scipy/jax: sets BLAS threads)

BLAS_THREADS = _common.setup_threads(sys.argv)

import argparse  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

TOL = {"float64": 1e-9, "float32": 1e-3}
# Rough FLOP count of the eigh path per problem: syevd with vectors (tridiagonal
# reduction 4/3 d³, forming Q 4/3 d³, divide and conquer plus back-transform ~ 2 d³)
# plus the four d x d products of V [Vᵀ Q V ∘ S] Vᵀ (8 d³): ~ 12.7 d³.
FLOPS_PER_D3 = 4 / 3 + 4 / 3 + 2 + 8


def _problems(d: int, batch: int, symmetric: bool, seed: int = 0):
    r = np.random.default_rng(seed + d)
    M = r.standard_normal((batch, d, d))
    A = M @ np.swapaxes(M, -1, -2) / d + np.eye(d)
    if not symmetric:
        N1 = r.standard_normal((batch, d, d)) / np.sqrt(d)
        N2 = r.standard_normal((batch, d, d)) / np.sqrt(d)
        # symmetric part stays >= 0.8 I (stable); a skew part makes A non-normal.
        A = A + 0.1 * N1 + 0.5 * (N2 - np.swapaxes(N2, -1, -2))
    G = r.standard_normal((batch, d, d))
    Q = G @ np.swapaxes(G, -1, -2) / d
    return A, Q


def _child(kind: str, dtype: str, d: int, batch: int, repeats: int) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import scipy.linalg as sla

    import jaxou

    symmetric = kind != "general"
    A64, Q64 = _problems(d, batch, symmetric)
    A, Q = A64.astype(dtype), Q64.astype(dtype)
    Aj, Qj = jnp.asarray(A), jnp.asarray(Q)
    ref = np.stack([sla.solve_continuous_lyapunov(a, q) for a, q in zip(A64, Q64)])

    def scipy_loop():
        return [sla.solve_continuous_lyapunov(a, q) for a, q in zip(A, Q)]

    jitted = {}
    if kind == "jaxou":
        jitted["jaxou eigh"] = jax.jit(lambda a, q: jaxou.lyapunov(a, q, solver=jaxou.Eigh()))
        jitted["jaxou auto"] = jax.jit(lambda a, q: jaxou.lyapunov(a, q))
    elif kind == "general":
        sign, kron = jaxou.MatrixSign(), jaxou.Kronecker()
        jitted["jaxou sign"] = jax.jit(lambda a, q: jaxou.lyapunov(a, q, solver=sign))
        jitted["jaxou kron"] = jax.jit(lambda a, q: jaxou.lyapunov(a, q, solver=kron))
    else:  # "schur" or "eigen"
        method = kind
        jitted[f"jax solve_sylvester ({method})"] = jax.jit(
            lambda a, q: jax.scipy.linalg.solve_sylvester(
                a, jnp.swapaxes(a, -1, -2), q, method=method
            )
        )

    def relerr(X):
        X = np.asarray(X, np.float64)
        num = np.linalg.norm(X - ref, axis=(-2, -1))
        return float(np.max(num / np.linalg.norm(ref, axis=(-2, -1))))

    # in float64 the timed loop is the reference itself (error 0 by construction)
    accuracy = {"scipy loop": 0.0 if dtype == "float64" else relerr(np.stack(scipy_loop()))}
    fns = {"scipy loop": scipy_loop}
    for name, f in jitted.items():
        accuracy[name] = relerr(f(Aj, Qj))  # also the compile + first call
        fns[name] = lambda f=f: jax.block_until_ready(f(Aj, Qj))
    stats = _common.interleaved(fns, repeats, no_warmup=("scipy loop",))
    return {"accuracy": accuracy, "timing": stats}


def _table_rows(results: list[dict]) -> list[str]:
    rows = [
        "| dtype | d | problem | implementation | median | IQR | rel. error | × SciPy loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        prob = "general A" if r["kind"] == "general" else "symmetric A"
        if r["status"] != "ok":
            note = r["status"]
            if r["status"] == "timeout":
                note = f"HANG/timeout (killed after {r['timeout_s']:.0f} s)"
            rows.append(f"| {r['dtype']} | {r['d']} | {prob} | {r['kind']} | {note} | | | |")
            continue
        base = r["timing"]["scipy loop"]["median"]
        for name, t in r["timing"].items():
            if name == "scipy loop" and r["kind"] not in ("jaxou", "general"):
                continue  # the same baseline is listed once per (dtype, d, problem)
            err = r["accuracy"][name]
            ok = err <= TOL[r["dtype"]] or name == "scipy loop"
            ratio = f"{base / t['median']:.2f}" if ok else "inaccurate"
            iqr = f"{_common.fmt_time(t['q1'])}–{_common.fmt_time(t['q3'])}"
            rows.append(
                f"| {r['dtype']} | {r['d']} | {prob} | {name} | "
                f"{_common.fmt_time(t['median'])} | {iqr} | {err:.1e} | {ratio} |"
            )
    return rows


def _plot(results: list[dict], path: str, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in results}, reverse=True)
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.5), squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        series: dict = {}
        for r in results:
            if r["dtype"] != dt or r["status"] != "ok":
                continue
            tag = " [general A]" if r["kind"] == "general" else ""
            for name, t in r["timing"].items():
                if name == "scipy loop" and r["kind"] in ("schur", "eigen"):
                    continue
                series.setdefault(name + tag, {})[r["d"]] = t
        for name, pts in sorted(series.items()):
            ds = sorted(pts)
            med = np.array([pts[x]["median"] for x in ds])
            lo = med - np.array([pts[x]["min"] for x in ds])
            hi = np.array([pts[x]["max"] for x in ds]) - med
            ax.errorbar(ds, med, yerr=[lo, hi], marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("d")
        ax.set_ylabel(f"seconds per batch of {batch} (median, min–max)")
        ax.set_title(f"Lyapunov solves, {dt}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--blas-threads", default="1")
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    p.add_argument("--kinds", nargs="+", default=["jaxou", "general", "schur", "eigen"])
    p.add_argument("--tag", default="lyapunov")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--child", nargs=5, metavar=("KIND", "DTYPE", "D", "BATCH", "REPEATS"))
    args = p.parse_args()
    if args.child:
        kind, dtype, d, batch, repeats = args.child
        import json

        print(json.dumps(_child(kind, dtype, int(d), int(batch), int(repeats))))
        return

    batch = 32 if args.quick else 256
    sizes = args.sizes if (args.sizes != [8, 64, 256] or not args.quick) else [8, 64]
    results = []
    for dtype in args.dtypes:
        for d in sizes:
            repeats = 2 if args.quick else {8: 21, 64: 9}.get(d, 2)
            for kind in args.kinds:
                if kind == "general" and d > 8:
                    continue
                if kind in ("schur", "eigen") and d > 64:
                    # Not run at d = 256: in a --quick run (batch 32) solve_sylvester
                    # "schur" took 9.3 s per call in float32 and did not finish in
                    # 240 s in float64; "eigen" already hangs at d = 64.
                    results.append(
                        dict(kind=kind, dtype=dtype, d=d, batch=batch, status="not run (too slow)")
                    )
                    continue
                timeout = args.timeout or (45 if kind == "eigen" else 400 if d > 64 else 90)
                child = ["--blas-threads", BLAS_THREADS, "--child", kind, dtype, str(d)]
                child += [str(batch), str(repeats)]
                r = _common.run_child(os.path.abspath(__file__), child, timeout)
                r.update(kind=kind, dtype=dtype, d=d, batch=batch, repeats=repeats)
                results.append(r)
                if r["status"] == "ok":
                    summary = ", ".join(
                        f"{k} {_common.fmt_time(v['median'])} (err {r['accuracy'][k]:.1e})"
                        for k, v in r["timing"].items()
                    )
                else:
                    summary = r["status"] + " " + r.get("stderr_tail", "")[-300:]
                print(f"[{dtype} d={d} {kind}] {summary}", flush=True)

    info = _common.machine_info(BLAS_THREADS)
    gflops = _common.dgemm_gflops(BLAS_THREADS)
    floors = {}
    for d in sizes:
        flops = FLOPS_PER_D3 * d**3 * batch
        # ceiling: measured one-thread-per-core GEMM rate x cores
        rate = gflops * (info["cores"] if BLAS_THREADS == "1" else 1) * 1e9
        floors[str(d)] = {"flops": flops, "seconds_at_gemm_rate": flops / rate}
    payload = {
        "benchmark": "lyapunov",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": info,
        "dgemm_gflops_measured": gflops,
        "eigh_path_flop_floor": floors,
        "tolerance": TOL,
        "results": results,
    }
    _common.write_json(args.tag, payload)
    md = [
        f"# Lyapunov benchmark ({args.tag})",
        "",
        f"`{payload['command']}` — {info['date']}, {info['cpu']} ({info['cores']} cores), "
        f"jax {info['jax']}, numpy {info['numpy']}, scipy {info['scipy']}, "
        f"BLAS threads {BLAS_THREADS}, batch {batch}, load avg at start "
        f"{info['loadavg_1min_at_start']:.2f}.",
        "",
        "Median over interleaved repeats after warm-up; the ratio is against the SciPy loop "
        "timed in the same child process. Rel. error: max over the batch of "
        "‖X − X_scipy,f64‖_F / ‖X_scipy,f64‖_F.",
        "",
        *_table_rows(results),
        "",
        f"FLOP floor of the eigh path (~{FLOPS_PER_D3:.1f} d³ per problem, at the measured "
        f"GEMM rate {gflops:.1f} GFLOP/s per BLAS call × cores): "
        + ", ".join(
            f"d={d}: {_common.fmt_time(v['seconds_at_gemm_rate'])}" for d, v in floors.items()
        ),
        "",
    ]
    _common.write_text(f"{args.tag}.md", "\n".join(md))
    _plot(results, os.path.join(_common.RESULTS, f"{args.tag}.png"), batch)
    print("\n".join(md))


if __name__ == "__main__":
    main()
