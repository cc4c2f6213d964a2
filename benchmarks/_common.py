"""Shared helpers for the jaxou benchmarks: BLAS thread setup, interleaved timing,
running a case in a child process with a timeout, machine information, output.

Import this module BEFORE numpy, scipy or jax: `setup_threads` must set
OPENBLAS_NUM_THREADS before OpenBLAS is loaded. Why it matters on this machine
(2 cores, jax 0.10.2, SciPy's OpenBLAS 0.3.30, which jaxlib's CPU LAPACK kernels
call): jaxlib splits a batched LAPACK call (eigh, cholesky, lu, ...) over XLA's
intra-op thread pool (`jax::ParallelBatchMap`), so each pool thread calls
OpenBLAS; with OpenBLAS threads on as well, 2 pool threads x 2 BLAS threads
oversubscribe 2 cores (batched eigh at d = 64 ran 5-10x slower under load) and
we saw hangs with every thread idle. Default here: one BLAS thread for every
implementation, SciPy's loop included (`--blas-threads` changes it).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def setup_threads(argv: list[str]) -> str:
    """Set the BLAS thread count from `--blas-threads N` (default 1) before any
    numerical library loads; returns the value as a string ("default" = unset)."""
    n = "1"
    if "--blas-threads" in argv:
        n = argv[argv.index("--blas-threads") + 1]
    if n != "default":
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = n
    return n


def interleaved(fns: dict, repeats: int, warmup: int = 1, no_warmup: tuple = ()) -> dict:
    """Time each callable `repeats` times, round-robin (so that load from other
    processes hits every variant alike), after `warmup` calls each. Each callable
    must block until its result is ready. Returns per-variant statistics in
    seconds: median, q1, q3, min, max, n, and the raw times. Names in `no_warmup`
    (plain NumPy/SciPy loops, nothing to compile) skip the warm-up."""
    import numpy as np

    for k, f in fns.items():
        for _ in range(0 if k in no_warmup else warmup):
            f()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    out = {}
    for k, v in times.items():
        a = np.asarray(v)
        out[k] = {
            "median": float(np.median(a)),
            "q1": float(np.quantile(a, 0.25)),
            "q3": float(np.quantile(a, 0.75)),
            "min": float(a.min()),
            "max": float(a.max()),
            "n": len(v),
            "times": [float(x) for x in v],
        }
    return out


def run_child(script: str, args: list[str], timeout: float) -> dict:
    """Run `python script args` in a child process; it must print one JSON object
    on its last stdout line. A child that runs past `timeout` seconds is killed
    and reported as {"status": "timeout"} (a hang is reported as a hang)."""
    cmd = [sys.executable, script, *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout, "args": args}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {
            "status": "error",
            "returncode": proc.returncode,
            "stderr_tail": proc.stderr[-2000:],
            "args": args,
        }
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.setdefault("status", "ok")
    out["child_wall_s"] = wall
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def dgemm_gflops(threads_note: str) -> float:
    """Measured float64 GEMM rate (GFLOP/s) of NumPy's BLAS on 512 x 512 with the
    current thread setting: a practical ceiling for the FLOP-floor estimates."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((512, 512))
    a @ a
    best = min(_timeit(lambda: a @ a) for _ in range(5))
    return 2 * 512**3 / best / 1e9


def _timeit(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def machine_info(blas_threads: str) -> dict:
    import jax
    import jaxlib
    import numpy as np
    import scipy

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jax_backend": jax.default_backend(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch_version,
        "blas_threads": blas_threads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_1min_at_start": os.getloadavg()[0],
    }


def write_json(name: str, payload: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def write_text(name: str, text: str) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"
