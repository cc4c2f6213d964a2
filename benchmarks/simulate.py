"""Benchmark: jaxou.simulate against a hand-written JAX scan loop, the RNG bound,
torchsde, NumPy and sdeint, on OU ensembles (float32, 1000 steps).

    .venv/bin/python benchmarks/simulate.py            # full run (a few minutes)
    .venv/bin/python benchmarks/simulate.py --quick    # smoke run
    .venv/bin/python benchmarks/simulate.py --baseline /tmp/old --quick
        # jaxou.simulate of this tree against another copy of jaxou (e.g. the
        # previous commit: `git worktree add /tmp/old HEAD~1`), interleaved in one
        # run: the speed ratio of each path (Euler fast path, Diffrax solvers, exact)

Every variant integrates dX = -A(X - mu) dt + G dW with Euler–Maruyama at the same
dt from the same start, in two modes: "final" (final state only) and "stats10"
(mean and covariance of the ensemble every 10 steps). Timings are interleaved
(round-robin over variants, `--repeats` rounds), after a warm-up call that also
gives the compile time; we report medians and the spread (min-max). Accuracy is
checked before any time is reported: each JAX variant's final mean/covariance
must agree with the exact law of the Euler chain within 5 standard errors.

Writes benchmarks/results/simulate.{json,md,png}.
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

TORCH_STEP_DIVISOR = 50
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _problem(d: int, seed: int = 0):
    r = np.random.default_rng(seed)
    Q = np.linalg.qr(r.normal(size=(d, d)))[0]
    A = (Q * np.linspace(0.5, 2.0, d)) @ Q.T
    G = 0.3 * np.eye(d) + 0.05 * r.normal(size=(d, d))
    mu = r.normal(size=d)
    return A.astype(np.float32), mu.astype(np.float32), G.astype(np.float32)


def _euler_law(A, mu, G, x0, dt, steps):
    """Exact mean and covariance of the Euler chain (float64)."""
    A, mu, G = (np.asarray(x, np.float64) for x in (A, mu, G))
    M = np.eye(len(mu)) - dt * A
    m, S = np.asarray(x0, np.float64) - mu, np.zeros((len(mu), len(mu)))
    D = dt * G @ G.T
    for _ in range(steps):
        m = M @ m
        S = M @ S @ M.T + D
    return m + mu, S


# ---------------------------------------------------------------------------
# Variants: each is make(...) -> (run() -> (mean, cov) as NumPy, path-steps per call)


def jax_variants(d, n, steps, dt, mode):
    import diffrax
    import jax
    import jax.numpy as jnp

    import jaxou

    A, mu, G = _problem(d)
    Aj, muj, Gj = jnp.asarray(A), jnp.asarray(mu), jnp.asarray(G)
    x0 = np.zeros(d, np.float32)
    T = steps * dt
    every = 10 if mode == "stats10" else steps
    ts = np.arange(1, steps // every + 1) * every * dt if mode == "stats10" else None

    def stats(y):
        m = y.mean(0)
        c = (y - m).T @ (y - m) / (y.shape[0] - 1)
        return m, c

    @jax.jit
    def scan_em(key):
        def outer(y, k):
            def body(y, kk):
                dw = jax.random.normal(kk, y.shape, y.dtype) * jnp.sqrt(jnp.float32(dt))
                return y - dt * (y - muj) @ Aj.T + dw @ Gj.T, None

            y, _ = jax.lax.scan(body, y, jax.random.split(k, every))
            return y, stats(y) if mode == "stats10" else None

        y0 = jnp.zeros((n, d), jnp.float32)
        y, _ = jax.lax.scan(outer, y0, jax.random.split(key, steps // every))
        return stats(y)

    @jax.jit
    def rng_only(key):
        def body(acc, k):
            return acc + jax.random.normal(k, (n, d), jnp.float32), None

        acc, _ = jax.lax.scan(body, jnp.zeros((n, d), jnp.float32), jax.random.split(key, steps))
        return acc.mean(0), jnp.zeros((d, d))

    proc = jaxou.OUProcess(Aj, muj, Gj)

    def jaxou_run(solver):
        def run(key):
            sim = jaxou.simulate(
                proc, key, n_paths=n, dt=dt, t1=T, initial=x0, solver=solver, ts=ts
            )
            return sim.mean[-1], sim.cov[-1]

        return run

    out = {
        "jax_scan": scan_em,
        "jax_rng_only": rng_only,
        "jaxou_euler": jaxou_run(jaxou.FusedEuler()),
        "jaxou_diffrax_euler": jaxou_run(diffrax.Euler()),
    }
    if mode == "final":
        out["jaxou_shark"] = jaxou_run(diffrax.ShARK())
        out["jaxou_exact"] = jaxou_run(jaxou.ExactOU())
    keys = iter(range(10_000))

    def wrap(f):
        def call():
            r = f(jax.random.key(next(keys)))
            return tuple(np.asarray(jax.block_until_ready(x)) for x in r)

        return call

    return {k: wrap(f) for k, f in out.items()}


def torch_variant(d, n, steps, dt, mode, threads):
    """torchsde's batched Euler with its default Brownian path (BrownianInterval).
    It costs ~10-40 ms per step or more, so it runs `steps // 50` steps
    and its rate is per path-step (the timing loop divides by the steps it ran).
    `threads`: torch's intra-op threads for this variant. Both 1 and all CPUs are
    timed and the faster one is the baseline: on this shared 2-core machine torch
    with 2 threads was 2-6× slower than with 1 whenever other work ran
    (its worker threads wait for a core), so a single setting is not a fair
    baseline."""
    import torch
    import torchsde

    A, mu, G = (torch.from_numpy(x) for x in _problem(d))

    class SDE(torch.nn.Module):
        noise_type = "additive"
        sde_type = "ito"

        def f(self, t, y):
            return -(y - mu) @ A.T

        def g(self, t, y):
            return G.expand(y.shape[0], d, d)

    sde = SDE()
    steps = max(10, steps // TORCH_STEP_DIVISOR)
    every = 10 if mode == "stats10" else steps
    ts = torch.linspace(0, steps * dt, steps // every + 1)

    def call():
        torch.set_num_threads(threads)
        with torch.no_grad():
            ys = torchsde.sdeint(sde, torch.zeros(n, d), ts, dt=dt, method="euler")
            if mode == "stats10":
                for y in ys[1:]:
                    m = y.mean(0)
                    _ = (y - m).T @ (y - m)
            y = ys[-1].double().numpy()
        return y.mean(0), np.cov(y.T)

    return call


def numpy_variant(d, n, steps, dt, mode):
    A, mu, G = _problem(d)
    rng = np.random.default_rng(0)
    sq = np.float32(math.sqrt(dt))

    def call():
        y = np.zeros((n, d), np.float32)
        for k in range(steps):
            dw = rng.standard_normal((n, d), np.float32) * sq
            y = y - dt * (y - mu) @ A.T + dw @ G.T
            if mode == "stats10" and (k + 1) % 10 == 0:
                m = y.mean(0)
                _ = (y - m).T @ (y - m)
        return y.mean(0), np.cov(y.T.astype(np.float64))

    return call


def sdeint_rate(d, steps, dt, n_paths=3):
    import sdeint

    A, mu, G = (x.astype(np.float64) for x in _problem(d))
    tspan = np.linspace(0, steps * dt, steps + 1)
    f = lambda y, t: -A @ (y - mu)
    g = lambda y, t: G
    t0 = time.perf_counter()
    for i in range(n_paths):
        sdeint.itoEuler(f, g, np.zeros(d), tspan, generator=np.random.default_rng(i))
    return n_paths * steps / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------
# Generator levers: standard normals per second for the ways of drawing them that
# were tried (d = 2 layout, summed into an accumulator inside a scan, so that each
# variant is one compiled loop and nothing but the draw differs).


def generator_variants(n: int, d: int, steps: int):
    import jax
    import jax.numpy as jnp
    from jax import lax

    from jaxou._solvers import box_muller_f32, paired_normals, threefry2x32

    U = jnp.uint32
    rot = (13, 15, 26, 6, 17, 29, 16, 24)

    def threefry13(k0, k1, x0, x1):  # Threefry-2x32-13 (Salmon et al. 2011, Table 2)
        ks = (k0, k1, k0 ^ k1 ^ U(0x1BD11BDA))
        x0, x1 = x0 + k0, x1 + k1
        for i in range(13):
            x0 = x0 + x1
            x1 = ((x1 << U(rot[i % 8])) | (x1 >> U(32 - rot[i % 8]))) ^ x0
            if i % 4 == 3 or i == 12:
                s = i // 4 + 1
                x0, x1 = x0 + ks[s % 3], x1 + ks[(s + 1) % 3] + U(s)
        return x0, x1

    half = n // 2
    c = jnp.arange(half * d, dtype=U).reshape(half, d)

    def erfinv_normal(w):
        u = (w >> U(8)).astype(jnp.float32) * (2.0**-23) - (1 - 2.0**-24)
        return jnp.float32(math.sqrt(2)) * lax.erf_inv(u)

    def draws(kind):
        def draw(k0, i):
            if kind == "jax_random_normal":
                return jax.random.normal(jax.random.fold_in(k0, i), (n, d), jnp.float32)
            kk = jax.random.key_data(k0).astype(U)
            a, b = (threefry13 if kind.startswith("tf13") else threefry2x32)(kk[0], kk[1], c, i)
            if kind == "tf20_erfinv_concat":  # one normal a word, two words concatenated
                return jnp.concatenate([erfinv_normal(a), erfinv_normal(b)])
            if kind == "tf20_boxmuller_two_outputs":  # both outputs used: hash recomputed
                za, zb = box_muller_f32(a, b)
                return za, zb
            za, zb = box_muller_f32(a, b)
            return lax.complex(za, zb)

        if kind == "tf20_boxmuller_paired_jaxou":
            draw = lambda k0, i: paired_normals(
                jax.random.key_data(k0)[:1].astype(U),
                jax.random.key_data(k0)[1:].astype(U),
                (half, d),
                jnp.float32,
                i,
            )[0]

        @jax.jit
        def run(key):
            def body(acc, i):
                z = draw(key, i.astype(U))
                if isinstance(z, tuple):
                    return (acc[0] + z[0], acc[1] + z[1]), None
                return acc + z, None

            z0 = draw(key, U(0))
            acc0 = jax.tree.map(jnp.zeros_like, z0)
            acc, _ = lax.scan(body, acc0, jnp.arange(steps))
            return acc

        return run

    kinds = [
        "jax_random_normal",
        "tf20_erfinv_concat",
        "tf20_boxmuller_two_outputs",
        "tf20_boxmuller_paired_jaxou",
        "tf13_boxmuller_paired",
    ]
    return {k: draws(k) for k in kinds}


def generator_rates(n=100_000, d=2, steps=200, repeats=3):
    import jax

    variants = generator_variants(n, d, steps)
    times = {k: [] for k in variants}
    for f in variants.values():
        jax.block_until_ready(f(jax.random.key(0)))
    for r in range(repeats):
        for k, f in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(jax.random.key(r + 1)))
            times[k].append(time.perf_counter() - t0)
    return {k: n * d * steps / float(np.median(v)) for k, v in times.items()}


# ---------------------------------------------------------------------------
# Peak memory: streamed statistics over 10^4 steps vs the final state only.

_MEM_SCRIPT = """
import resource, sys, time, numpy as np, jax
import jaxou
sys.path.insert(0, {here!r})
from simulate import _problem
d, n, steps, dt, mode = {d}, {n}, {steps}, {dt}, {mode!r}
A, mu, G = _problem(d)
proc = jaxou.OUProcess(A, mu, G)
ts = None if mode == "final" else np.arange(1, steps // 10 + 1) * 10 * dt
sim = jaxou.simulate(proc, jax.random.key(0), n_paths=n, dt=dt, t1=steps * dt,
                     initial=np.zeros(d, np.float32), ts=ts)
jax.block_until_ready(sim.cov)
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(d, n, steps, dt, mode):
    code = _MEM_SCRIPT.format(here=HERE, d=d, n=n, steps=steps, dt=dt, mode=mode)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kb = [ln for ln in out.stdout.splitlines() if ln.startswith("MAXRSS_KB")][0].split()[1]
    return int(kb) / 1024


# ---------------------------------------------------------------------------


TORCH_NOTE = (
    "torchsde is timed with 1 thread and with all CPUs (rows `torchsde_1thr`, "
    "`torchsde_2thr`) and the ratio uses the faster: on this shared 2-core machine "
    "torch with 2 threads ran 2-6× slower than with 1 (same-run check) while other work ran."
)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:  # pragma: no cover
        return "n/a"


GENERATOR_NOTES = """\
- `jax_random_normal`: JAX's default (Threefry-2x32, 20 rounds, `erfinv` transform).
- `tf20_erfinv_concat`: the same hash and transform written as one fused loop
  (jaxou's previous generator): one normal per 32-bit word, the two output words
  of each hash concatenated.
- `tf20_boxmuller_two_outputs`: Box–Muller (two normals from one hash) written to
  two real arrays: XLA's CPU backend emits each fusion output by output, so the
  hash is computed once per output; little gained.
- `tf20_boxmuller_paired_jaxou` (adopted): the two normals of a hash as the real
  and imaginary part of one complex number, so that one fused loop hashes once per
  pair; sin/cos are short polynomials on a quarter turn, `log` and `sqrt` are
  XLA's vectorised ones. Same hash as JAX (20 rounds). Tests: KS, four moments,
  tail frequencies at 2, 3, 4 σ, the radius and angle laws of a pair,
  correlations across the pair, neighbouring counters, steps and keys
  (`tests/test_simulate.py::test_paired_normals_law`), the transform against its
  float64 formula (`test_box_muller_f32_matches_float64_formula`), and every
  moment test of the engine.
- `tf13_boxmuller_paired`: Threefry-2x32-13, the fewest rounds Salmon et al.
  (SC'11, Table 2) found Crush-resistant. Faster again, but with no safety margin
  over the round count that passes BigCrush, and the Euler step's other costs
  shrink its gain; not adopted.
- Philox-4x32-10 was tried in a scratch benchmark: its 32×32→64-bit products
  go through 64-bit integer multiplies, which AVX2 lacks; it ran slower than
  Threefry-20 here and was not pursued.

The Euler step itself (the adopted path, `solver=jaxou.FusedEuler()`,
`brownian=jaxou.CounterBrownianPath`, the defaults):
each stage is rewritten in the eigenbasis of its noise covariance,
u = Pᵀ(y − μ), du = −PᵀAP u dt + diag(σ) dW (the same law, and the same Euler
chain, as the original coordinates), so the noise is elementwise; the drift is
elementwise too when A and D commute (an SGD stage whose noise shares the
Hessian's eigenvectors), unrolled into d scaled columns for d ≤ 8, and one real
matrix product for larger d. Paths r and r + 128 of each block of 256 share a
complex state entry, so the whole step (hash, Box–Muller, drift, update) is one
vectorised XLA loop per step with no normals materialised (checked in the
optimised HLO: one fusion in the step loop; LLVM IR: 8-wide vectors). Two
pitfalls found on the way: per-step keys derived by extra hashes were fused into
that loop and recomputed for every entry (now the step's start time is the
counter's second word), and a complex-by-complex product of the step size kept
LLVM from vectorising the loop (now two real products).
"""


# ---------------------------------------------------------------------------
# This tree against a baseline copy of jaxou (the previous commit), in one run.
#
# Two worker processes, one importing each copy of jaxou, stay alive through the
# run; the parent sends each case to both in turn (round-robin over rounds, so
# that load from other processes hits both alike) and each worker times its own
# call. A worker speaks the API of its copy: `solver=` objects, or the older
# `method=` strings.

BASELINE_CASES = [
    # (name, d, n_paths, steps, mode, solver); each call takes a few tenths of a second
    ("euler d=2", 2, 65_536, 1000, "final", "euler"),
    ("euler d=16 stats10", 16, 16_384, 1000, "stats10", "euler"),
    ("euler d=16 float64", 16, 8192, 500, "final", "euler64"),
    ("shark d=4", 4, 8192, 500, "final", "shark"),
    ("exact d=16 stats10", 16, 65_536, 1000, "stats10", "exact"),
]


def _worker() -> None:
    """Serve timing requests on stdin/stdout, one JSON object a line."""
    import inspect

    import diffrax
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    import jaxou

    new_api = "solver" in inspect.signature(jaxou.simulate).parameters
    solvers = {"euler": "FusedEuler", "euler64": "FusedEuler", "exact": "ExactOU"}
    print(json.dumps({"jaxou": jaxou.__file__, "new_api": new_api}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        dtype = jnp.float64 if job["solver"] == "euler64" else jnp.float32
        A, mu, G = (jnp.asarray(x, dtype) for x in _problem(job["d"]))
        proc = jaxou.OUProcess(A, mu, G)
        steps, dt = job["steps"], 0.01
        ts = np.arange(1, steps // 10 + 1) * 10 * dt if job["mode"] == "stats10" else None
        name = job["solver"]
        if new_api:
            obj = getattr(jaxou, solvers[name])() if name in solvers else diffrax.ShARK()
            kw = {"solver": obj}
        else:
            kw = {"method": {"euler64": "euler"}.get(name, name)}
        t0 = time.perf_counter()
        sim = jaxou.simulate(
            proc,
            jax.random.key(job["seed"]),
            n_paths=job["n"],
            dt=dt,
            t1=steps * dt,
            initial=jnp.zeros(job["d"], dtype),
            ts=ts,
            **kw,
        )
        jax.block_until_ready(sim.cov)
        seconds = time.perf_counter() - t0
        out = {"seconds": seconds, "mean": np.asarray(sim.mean[-1], np.float64).tolist()}
        print(json.dumps(out), flush=True)


class _Worker:
    def __init__(self, pythonpath: str):
        env = dict(os.environ, PYTHONPATH=pythonpath)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.info = json.loads(self.proc.stdout.readline())

    def run(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def compare_baseline(baseline: str, repeats: int, quick: bool, out_dir: str) -> list[dict]:
    """Time every case of BASELINE_CASES with this tree's jaxou and the baseline's,
    interleaved; check that both give the same statistics first. (`JAXOU_BENCH_NEW`
    replaces this tree by another copy: an A/A run shows the noise of the ratio.)"""
    root = os.environ.get("JAXOU_BENCH_NEW", os.path.dirname(HERE))
    workers = {"baseline": _Worker(os.path.abspath(baseline)), "new": _Worker(root)}
    for k, w in workers.items():
        print(f"{k}: {w.info['jaxou']} ({'solver=' if w.info['new_api'] else 'method='} API)")
    rows = []
    for name, d, n, steps, mode, solver in BASELINE_CASES:
        if quick:
            n //= 2
        job = dict(d=d, n=n, steps=steps, mode=mode, solver=solver, seed=0)
        first = {k: w.run(job) for k, w in workers.items()}  # compiles
        # Same draws, same scheme: the two copies agree to rounding.
        diff = np.max(np.abs(np.subtract(first["new"]["mean"], first["baseline"]["mean"])))
        assert diff < 1e-5, f"{name}: the two copies disagree by {diff:g}"
        times = {k: [] for k in workers}
        for r in range(repeats):
            # ABBA order: neither copy always runs first after the other.
            for k in list(workers)[:: 1 if r % 2 == 0 else -1]:
                times[k].append(workers[k].run(dict(job, seed=r + 1))["seconds"])
        med = {k: float(np.median(v)) for k, v in times.items()}
        ratios = np.asarray(times["baseline"]) / np.asarray(times["new"])
        rows.append(
            dict(
                case=name,
                d=d,
                n_paths=n,
                steps=steps,
                baseline_s=med["baseline"],
                new_s=med["new"],
                speed_ratio=med["baseline"] / med["new"],
                # The fastest call of each: the least disturbed by other processes.
                speed_ratio_best=min(times["baseline"]) / min(times["new"]),
                ratio_min=float(ratios.min()),
                ratio_max=float(ratios.max()),
                first_call_baseline_s=first["baseline"]["seconds"],
                first_call_new_s=first["new"]["seconds"],
            )
        )
        r = rows[-1]
        print(
            f"{name:22s} baseline {r['baseline_s']:.3f} s, new {r['new_s']:.3f} s: speed ratio "
            f"{r['speed_ratio']:.3f} (rounds {r['ratio_min']:.2f}-{r['ratio_max']:.2f}, best "
            f"calls {r['speed_ratio_best']:.3f}); first "
            f"call {r['first_call_baseline_s']:.1f} / {r['first_call_new_s']:.1f} s",
            flush=True,
        )
    for w in workers.values():
        w.close()
    suffix = "_quick" if quick else ""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"simulate_baseline{suffix}.json"), "w") as f:
        meta = dict(
            date=datetime.datetime.now().isoformat(timespec="seconds"),
            machine=platform.platform(),
            cpus=os.cpu_count(),
            baseline=baseline,
            repeats=repeats,
            loadavg=os.getloadavg(),
        )
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="compare jaxou.simulate with the copy of jaxou in DIR (only that)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker()
    if args.baseline:
        repeats = max(args.repeats, 7)
        compare_baseline(args.baseline, repeats, args.quick, args.out)
        return None

    import jax

    steps, dt = (100, 0.01) if args.quick else (1000, 0.01)
    sizes = [(2, 100_000), (16, 4096), (128, 1024)]
    if args.quick:
        sizes = [(2, 4096), (16, 1024)]
    repeats = 2 if args.quick else args.repeats
    rows = []
    for d, n in sizes:
        for mode in ("final", "stats10"):
            variants = jax_variants(d, n, steps, dt, mode)
            cpus = os.cpu_count() or 1
            for threads in sorted({1, cpus}):
                variants[f"torchsde_{threads}thr"] = torch_variant(d, n, steps, dt, mode, threads)
            variants["numpy"] = numpy_variant(d, n, steps, dt, mode)
            A, mu, G = _problem(d)
            m_ref, S_ref = _euler_law(A, mu, G, np.zeros(d), dt, steps)
            compile_s, times = {}, {k: [] for k in variants}
            for name, call in variants.items():
                t0 = time.perf_counter()
                mean, cov = call()
                compile_s[name] = time.perf_counter() - t0
                if (
                    name != "jax_rng_only"
                    and not name.startswith("torchsde")
                    and not name.endswith("exact")
                ):
                    se = np.sqrt(np.diag(S_ref) / n)
                    z = np.max(np.abs(mean - m_ref) / se)
                    assert z < 6, f"{name} (d={d}, n={n}, {mode}): mean off by {z:.1f} SE"
                    rel = np.max(np.abs(np.diag(cov) - np.diag(S_ref)) / np.diag(S_ref))
                    assert rel < 6 * math.sqrt(2 / n) + 1e-3, f"{name}: variance off by {rel:.3g}"
            for _ in range(repeats):
                for name, call in variants.items():
                    t0 = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - t0)
            for name in variants:
                if name.startswith("torchsde"):  # ran fewer steps: rescale per path-step
                    scale = steps / max(10, steps // TORCH_STEP_DIVISOR)
                    times[name] = [t * scale for t in times[name]]
                    compile_s[name] *= scale
                med = float(np.median(times[name]))
                rows.append(
                    dict(
                        d=d,
                        n_paths=n,
                        mode=mode,
                        variant=name,
                        median_s=med,
                        min_s=float(np.min(times[name])),
                        max_s=float(np.max(times[name])),
                        path_steps_per_s=n * steps / med,
                        first_call_s=compile_s[name],
                    )
                )
                print(
                    f"d={d:4d} n={n:6d} {mode:8s} {name:22s} {n * steps / med / 1e6:8.2f} "
                    f"M path-steps/s  (first call {compile_s[name]:.2f} s)",
                    flush=True,
                )
            del variants
    sde_rates = {d: sdeint_rate(d, min(steps, 200), dt) for d, _ in sizes}
    gen_rates = generator_rates(
        n=4096 if args.quick else 100_000, steps=20 if args.quick else 200, repeats=repeats
    )

    mem_steps = 1000 if args.quick else 10_000
    mem = {}
    for mode in ("final", "stats10"):
        mem[mode] = peak_rss_mb(16, 4096, mem_steps, 0.001, mode)
    mem_ratio = mem["stats10"] / mem["final"]

    # Ratios (per size and mode) against the scan loop, torchsde, NumPy, sdeint.
    summary = []
    for d, n in sizes:
        for mode in ("final", "stats10"):
            get = {r["variant"]: r for r in rows if r["d"] == d and r["mode"] == mode}
            e = get["jaxou_euler"]["path_steps_per_s"]
            summary.append(
                dict(
                    d=d,
                    n_paths=n,
                    mode=mode,
                    jaxou_euler_mps=e / 1e6,
                    vs_scan=e / get["jax_scan"]["path_steps_per_s"],
                    vs_rng_bound=e / get["jax_rng_only"]["path_steps_per_s"],
                    vs_diffrax_euler=e / get["jaxou_diffrax_euler"]["path_steps_per_s"],
                    vs_torchsde=e
                    / max(
                        r["path_steps_per_s"] for k, r in get.items() if k.startswith("torchsde")
                    ),
                    vs_numpy=e / get["numpy"]["path_steps_per_s"],
                    vs_sdeint=e / sde_rates[d],
                    first_call_s=get["jaxou_euler"]["first_call_s"],
                )
            )

    import diffrax
    import equinox
    import torch

    meta = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=platform.platform(),
        processor=platform.processor(),
        cpus=os.cpu_count(),
        python=platform.python_version(),
        jax=jax.__version__,
        diffrax=diffrax.__version__,
        equinox=equinox.__version__,
        torch=torch.__version__,
        numpy=np.__version__,
        backend=jax.default_backend(),
        dtype="float32",
        steps=steps,
        dt=dt,
        repeats=repeats,
        quick=args.quick,
        loadavg=os.getloadavg(),
    )
    result = dict(
        meta=meta,
        rows=rows,
        summary=summary,
        sdeint_path_steps_per_s=sde_rates,
        peak_rss_mb=mem,
        peak_rss_ratio_stats_vs_final=mem_ratio,
        peak_rss_steps=mem_steps,
        generator_normals_per_s=gen_rates,
        uptime=_uptime(),
    )
    os.makedirs(args.out, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    with open(os.path.join(args.out, f"simulate{suffix}.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [
        "# jaxou.simulate benchmark",
        "",
        f"{meta['date']}, {meta['machine']}, {meta['cpus']} CPUs, JAX {meta['jax']}, "
        f"Diffrax {meta['diffrax']}, Equinox {meta['equinox']}, torch {meta['torch']}, "
        f"NumPy {meta['numpy']}; float32, {steps} steps, medians of {repeats} interleaved "
        f"rounds; load average at the end {meta['loadavg'][0]:.1f}.",
        "",
        "| d | paths | mode | jaxou Euler (M path-steps/s) | vs scan loop | vs RNG bound "
        "| vs diffrax.Euler | vs torchsde (faster of 1 and all threads) | vs NumPy | vs sdeint "
        "| first call (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['d']} | {s['n_paths']} | {s['mode']} | {s['jaxou_euler_mps']:.2f} | "
            f"{s['vs_scan']:.2f}× | {s['vs_rng_bound']:.2f}× | {s['vs_diffrax_euler']:.2f}× | "
            f"{s['vs_torchsde']:.1f}× | {s['vs_numpy']:.1f}× | {s['vs_sdeint']:.0f}× | "
            f"{s['first_call_s']:.1f} |"
        )
    lines += [
        "",
        TORCH_NOTE,
        "",
        "All variants (M path-steps/s, median [min-max of the per-call rate]):",
        "",
        "| d | paths | mode | variant | M path-steps/s | spread | first call (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["n_paths"] * steps / r["max_s"] / 1e6, r["n_paths"] * steps / r["min_s"] / 1e6
        lines.append(
            f"| {r['d']} | {r['n_paths']} | {r['mode']} | {r['variant']} | "
            f"{r['path_steps_per_s'] / 1e6:.2f} | {lo:.2f}-{hi:.2f} | {r['first_call_s']:.2f} |"
        )
    lines += [
        "",
        "sdeint (one path at a time, extrapolated per path-step): "
        + ", ".join(f"d={d}: {v / 1e6:.4f} M/s" for d, v in sde_rates.items()),
        "",
        f"Peak RSS over {mem_steps} steps (d=16, 4096 paths, subprocesses): final state only "
        f"{mem['final']:.0f} MB, statistics every 10 steps {mem['stats10']:.0f} MB "
        f"(ratio {mem_ratio:.2f}).",
        "",
        f"`uptime` at the end: {result['uptime']}",
        "",
        "## Normal generation: what was tried",
        "",
        "Float32 standard normals per second, each variant one compiled scan that only "
        "draws (d = 2 layout, 100 000 rows, summed into an accumulator), same run:",
        "",
        "| variant | M normals/s | vs jax.random.normal |",
        "|---|---|---|",
    ]
    base = gen_rates["jax_random_normal"]
    for k, v in gen_rates.items():
        lines.append(f"| {k} | {v / 1e6:.1f} | {v / base:.2f}× |")
    lines += ["", GENERATOR_NOTES]
    with open(os.path.join(args.out, f"simulate{suffix}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
        for ax, mode in zip(axes, ("final", "stats10")):
            names = sorted({r["variant"] for r in rows if r["mode"] == mode})
            x = np.arange(len(sizes))
            w = 0.8 / len(names)
            for i, name in enumerate(names):
                vals = [
                    next(
                        r["path_steps_per_s"]
                        for r in rows
                        if r["d"] == d and r["mode"] == mode and r["variant"] == name
                    )
                    / 1e6
                    for d, _ in sizes
                ]
                ax.bar(x + i * w, vals, w, label=name)
            ax.set_xticks(x + 0.4 - w / 2, [f"d={d}\n{n} paths" for d, n in sizes])
            ax.set_yscale("log")
            ax.set_title(f"{mode} ({steps} steps, float32)")
            ax.set_ylabel("M path-steps / s")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, f"simulate{suffix}.png"), dpi=110)
    except Exception as err:  # the plot is a convenience; numbers are in the JSON
        print("plot failed:", err)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
