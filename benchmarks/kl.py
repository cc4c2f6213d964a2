"""Benchmark: batched Gaussian KL divergence, KL(N(m_p, S_p) ‖ N(m_q, S_q)).

    .venv/bin/python benchmarks/kl.py            # full run (1024 pairs, about two minutes)
    .venv/bin/python benchmarks/kl.py --quick    # smoke run (128 pairs, 2 repeats)

Options: `--blas-threads N|default` (default 1, see `_common.py`), `--sizes 8 64`,
`--dtypes float64 float32`, `--tag NAME`, `--timeout S`.

Implementations, on the same pairs:

- `jaxou kl`: `jax.jit(jaxou.kl)` on two batched `jaxou.Gaussian`s.
- `jaxou kl, two-Cholesky form`: the formulation `kl_parts` used before this
  benchmark (two separate batched Cholesky calls), kept here for comparison. It
  runs in its own child process because on this machine it can hang (see below).
- `numpy/scipy loop`: per pair `cho_factor`, `cho_solve` (trace and Mahalanobis
  term), `slogdet`.
- `torch kl_divergence`: `torch.distributions.kl_divergence` of two batched
  `MultivariateNormal(mean, covariance_matrix, validate_args=False)`, timing the
  construction (which factorises) too. Skipped with a note if torch is absent.
- components of `jaxou kl` (for the profile): one batched Cholesky of the 2 x batch
  stacked covariances, and the batched triangular solve.

Each (dtype, d, group) runs in a child process with a timeout (a hang is reported
as a hang); inside a child all implementations are timed interleaved after a
warm-up, ratios are against the loop of the same child. Accuracy (max relative
error against the float64 loop) is checked before any time is reported.

Writes benchmarks/results/<tag>.{json,md,png} (tag defaults to "kl").
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
# FLOP floor per pair: two Cholesky factorisations (d³/3 each) and L_q⁻¹ L_p with a
# triangular right-hand side (d³/3); the mean term and the sums are O(d²).
FLOPS_PER_D3 = 1.0


def _pairs(d: int, batch: int, seed: int = 0):
    r = np.random.default_rng(seed + d)

    def spd():
        M = r.standard_normal((batch, d, d))
        return M @ np.swapaxes(M, -1, -2) / d + 0.5 * np.eye(d)

    return spd(), spd(), r.standard_normal((batch, d)), r.standard_normal((batch, d))


def _loop_kl(Sp, Sq, mp, mq):
    import scipy.linalg as sla

    d = Sp.shape[-1]
    out = np.empty(len(Sp), dtype=Sp.dtype)
    for i in range(len(Sp)):
        c = sla.cho_factor(Sq[i], lower=True)
        diff = mq[i] - mp[i]
        tr = np.trace(sla.cho_solve(c, Sp[i]))
        maha = diff @ sla.cho_solve(c, diff)
        logdet_q = 2 * np.sum(np.log(np.diag(c[0])))
        logdet_p = np.linalg.slogdet(Sp[i])[1]
        out[i] = 0.5 * (tr - d + maha + logdet_q - logdet_p)
    return out


def _two_cholesky_kl(Sp, Sq, mp, mq):
    """kl_parts as it was before this benchmark: two independent batched Cholesky
    calls (total only)."""
    import jax
    import jax.numpy as jnp

    from jaxou._gaussian import _phi

    d = Sp.shape[-1]
    Lp = jnp.linalg.cholesky(Sp)
    Lq = jnp.linalg.cholesky(Sq)
    rhs = jnp.concatenate([Lp, (mp - mq)[..., None]], axis=-1)
    sol = jax.lax.linalg.triangular_solve(Lq, rhs, left_side=True, lower=True)
    M, z = sol[..., :d], sol[..., d]
    lr = jnp.log(jnp.diagonal(Lp, axis1=-2, axis2=-1)) - jnp.log(
        jnp.diagonal(Lq, axis1=-2, axis2=-1)
    )
    cov = 0.5 * (jnp.sum(_phi(2 * lr), -1) + jnp.sum(jnp.tril(M, k=-1) ** 2, (-2, -1)))
    return cov + 0.5 * jnp.sum(z**2, -1)


def _child(kind: str, dtype: str, d: int, batch: int, repeats: int) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import jaxou

    Sp64, Sq64, mp64, mq64 = _pairs(d, batch)
    ref = _loop_kl(Sp64, Sq64, mp64, mq64)
    Sp, Sq, mp, mq = (x.astype(dtype) for x in (Sp64, Sq64, mp64, mq64))
    jSp, jSq, jmp, jmq = (jnp.asarray(x) for x in (Sp, Sq, mp, mq))
    P, Q = jaxou.Gaussian(jmp, jSp), jaxou.Gaussian(jmq, jSq)
    notes = []

    def relerr(x):
        x = np.asarray(x, np.float64)
        return float(np.max(np.abs(x - ref) / np.abs(ref)))

    fns = {"numpy/scipy loop": lambda: _loop_kl(Sp, Sq, mp, mq)}
    accuracy = {"numpy/scipy loop": relerr(_loop_kl(Sp, Sq, mp, mq))}
    if kind == "main":
        f = jax.jit(jaxou.kl)
        accuracy["jaxou kl"] = relerr(f(P, Q))
        fns["jaxou kl"] = lambda: jax.block_until_ready(f(P, Q))
        try:
            import torch
        except ImportError:
            torch = None
            notes.append("torch not installed: torch baseline skipped")
            print("note: torch not installed, skipping the torch baseline", file=sys.stderr)
        if torch is not None:
            tSp, tSq, tmp, tmq = (
                torch.from_numpy(np.ascontiguousarray(x)) for x in (Sp, Sq, mp, mq)
            )
            MVN = torch.distributions.MultivariateNormal

            def torch_kl():
                p = MVN(tmp, covariance_matrix=tSp, validate_args=False)
                q = MVN(tmq, covariance_matrix=tSq, validate_args=False)
                return torch.distributions.kl_divergence(p, q)

            accuracy["torch kl_divergence"] = relerr(torch_kl().numpy())
            fns["torch kl_divergence"] = torch_kl
            notes.append(f"torch threads: {torch.get_num_threads()}")
        # components of jaxou kl, for the profile
        chol = jax.jit(lambda a, b: jnp.linalg.cholesky(jnp.stack([a, b])))
        L = chol(jSp, jSq)
        rhs = jnp.concatenate([L[0], (jmp - jmq)[..., None]], axis=-1)
        tri = jax.jit(
            lambda lo, b: jax.lax.linalg.triangular_solve(lo, b, left_side=True, lower=True)
        )
        fns["  component: batched cholesky (2 x batch)"] = lambda: jax.block_until_ready(
            chol(jSp, jSq)
        )
        fns["  component: batched triangular solve"] = lambda: jax.block_until_ready(tri(L[1], rhs))
    else:  # "old"
        g = jax.jit(_two_cholesky_kl)
        accuracy["jaxou kl, two-Cholesky form"] = relerr(g(jSp, jSq, jmp, jmq))
        fns["jaxou kl, two-Cholesky form"] = lambda: jax.block_until_ready(g(jSp, jSq, jmp, jmq))
    stats = _common.interleaved(fns, repeats, no_warmup=("numpy/scipy loop",))
    return {"accuracy": accuracy, "timing": stats, "notes": notes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--blas-threads", default="1")
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 64])
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    p.add_argument("--kinds", nargs="+", default=["main", "old"])
    p.add_argument("--tag", default="kl")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--child", nargs=5, metavar=("KIND", "DTYPE", "D", "BATCH", "REPEATS"))
    args = p.parse_args()
    if args.child:
        import json

        kind, dtype, d, batch, repeats = args.child
        print(json.dumps(_child(kind, dtype, int(d), int(batch), int(repeats))))
        return

    batch = 128 if args.quick else 1024
    results = []
    for dtype in args.dtypes:
        for d in args.sizes:
            repeats = 2 if args.quick else {8: 21}.get(d, 9)
            for kind in args.kinds:
                timeout = args.timeout or (30 if args.quick else 60 if kind == "old" else 150)
                child = ["--blas-threads", BLAS_THREADS, "--child", kind, dtype, str(d)]
                r = _common.run_child(
                    os.path.abspath(__file__), child + [str(batch), str(repeats)], timeout
                )
                r.update(kind=kind, dtype=dtype, d=d, batch=batch, repeats=repeats)
                results.append(r)
                if r["status"] == "ok":
                    summary = ", ".join(
                        f"{k.strip()} {_common.fmt_time(v['median'])}"
                        + (f" (err {r['accuracy'][k]:.1e})" if k in r["accuracy"] else "")
                        for k, v in r["timing"].items()
                    )
                else:
                    summary = r["status"] + " " + r.get("stderr_tail", "")[-300:]
                print(f"[{dtype} d={d} {kind}] {summary}", flush=True)

    info = _common.machine_info(BLAS_THREADS)
    gflops = _common.dgemm_gflops(BLAS_THREADS)
    rate = gflops * (info["cores"] if BLAS_THREADS == "1" else 1) * 1e9
    floors = {
        str(d): {
            "flops": FLOPS_PER_D3 * d**3 * batch,
            "seconds": FLOPS_PER_D3 * d**3 * batch / rate,
        }
        for d in args.sizes
    }
    payload = {
        "benchmark": "kl",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": info,
        "dgemm_gflops_measured": gflops,
        "flop_floor": floors,
        "tolerance": TOL,
        "results": results,
    }
    _common.write_json(args.tag, payload)

    rows = [
        "| dtype | d | implementation | median | IQR | max rel. error | × loop | × FLOP floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["status"] != "ok":
            note = r["status"]
            if note == "timeout":
                note = f"HANG/timeout (killed after {r['timeout_s']:.0f} s)"
            rows.append(f"| {r['dtype']} | {r['d']} | {r['kind']} | {note} | | | | |")
            continue
        base = r["timing"]["numpy/scipy loop"]["median"]
        floor = floors[str(r["d"])]["seconds"]
        for name, t in r["timing"].items():
            if name == "numpy/scipy loop" and r["kind"] != "main":
                continue
            err = r["accuracy"].get(name)
            ok = err is None or err <= TOL[r["dtype"]] or name == "numpy/scipy loop"
            ratio = f"{base / t['median']:.2f}" if ok else "inaccurate"
            rows.append(
                f"| {r['dtype']} | {r['d']} | {name.strip()} | {_common.fmt_time(t['median'])} | "
                f"{_common.fmt_time(t['q1'])}–{_common.fmt_time(t['q3'])} | "
                f"{'' if err is None else f'{err:.1e}'} | {ratio} | "
                f"{t['median'] / floor:.0f} |"
            )
    notes = sorted({n for r in results for n in r.get("notes", [])})
    md = [
        f"# Gaussian KL benchmark ({args.tag})",
        "",
        f"`{payload['command']}` — {info['date']}, {info['cpu']} ({info['cores']} cores), "
        f"jax {info['jax']}, numpy {info['numpy']}, scipy {info['scipy']}, torch "
        f"{info['torch']}, BLAS threads {BLAS_THREADS}, {batch} pairs, load avg at start "
        f"{info['loadavg_1min_at_start']:.2f}.",
        "",
        "Median over interleaved repeats after warm-up; × loop is against the NumPy/SciPy "
        "loop timed in the same child process. FLOP floor: ~d³ per pair at the measured "
        f"GEMM rate ({gflops:.1f} GFLOP/s per call × cores): "
        + ", ".join(f"d={d}: {_common.fmt_time(v['seconds'])}" for d, v in floors.items())
        + ".",
        "",
        *rows,
        "",
        *(f"- {n}" for n in notes),
        "",
    ]
    _common.write_text(f"{args.tag}.md", "\n".join(md))
    _plot(results, os.path.join(_common.RESULTS, f"{args.tag}.png"), batch, floors)
    print("\n".join(md))


def _plot(results, path, batch, floors) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(r["dtype"], r["d"]) for r in results if r["kind"] == "main"]
    names: list = []
    for r in results:
        if r["status"] == "ok":
            names += [n for n in r["timing"] if n not in names]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for i, (dt, d) in enumerate(cases):
            for r in results:
                if (r["dtype"], r["d"]) == (dt, d) and r["status"] == "ok" and name in r["timing"]:
                    t = r["timing"][name]
                    xs.append(i + j * width)
                    ys.append(t["median"])
                    lo.append(t["median"] - t["min"])
                    hi.append(t["max"] - t["median"])
                    break
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name.strip())
    for i, (_, d) in enumerate(cases):
        ax.hlines(floors[str(d)]["seconds"], i - 0.05, i + 0.85, colors="k", linestyles=":")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{dt}\nd={d}" for dt, d in cases])
    ax.set_yscale("log")
    ax.set_ylabel(f"seconds per {batch} pairs (median, min–max)")
    ax.set_title("Batched Gaussian KL (dotted: FLOP floor)")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
