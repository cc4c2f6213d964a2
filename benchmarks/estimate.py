"""Benchmark: a real network of 126,090 parameters from the data to the two-stage bound,
through the operator path (no d × d matrix).

    .venv/bin/python benchmarks/estimate.py            # full run (d = 126,090)
    .venv/bin/python benchmarks/estimate.py --quick    # smoke run (a small network)

The network, data and split are those of `jaxou experiment digits-mlp`: a tanh MLP
64 → 384 → 256 → 10 on scikit-learn's digits, source = thin strokes, target = thick
strokes (250 training images). Steps, each timed, with the process's peak resident
memory after it (`resource.getrusage`, which only grows):

1. L-BFGS to the source minimum θ*_S (`jaxou.train_to_minimum`);
2. H_S (`jaxou.LanczosHessian`, rank 20, 100 probes) and C_S
   (`jaxou.SketchedNoise`, rank 100: with N_S = 1,174 examples the exact factor's
   rank makes the stationary solve's right-hand side 1,214 columns wide, and the
   solve passed 16 GB);
3. the same on the target, from θ*_S, with C_T = `jaxou.ExactNoise()` (rank 250);
4. the two-stage bound (`jaxou.two_stage_bound`) of the model: initial law
   N(θ*_S, σ₀² I), pre-training for T₁, fine-tuning for T₂.

Accuracy before time: the Lanczos pairs' residuals ‖Hu − λu‖/λ from fresh
Hessian-vector products, the gradient norms at the minima, the noise factor's trace
against a streamed sum of squared centred gradients.

Baseline (the issue's measurement, same run): the previous estimation code
(`jaxou/_estimate.py` at commit 36cca79: the data closed over, Lanczos "lowrank"
noise) for steps 1–2, with its time, peak memory and XLA's "Constant folding"
alarms. Each pipeline runs in its own process (peak memory per pipeline).
Results: benchmarks/results/estimate.{json,md,png} (estimate_quick.* with --quick).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, machine_info, setup_threads  # noqa: E402

BLAS = setup_threads(sys.argv)

import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE_COMMIT = "36cca79"
SIZES = {
    "full": {
        "hidden": [384, 256],
        "train_steps": 500,
        "rank": 20,
        "probes": 100,
        "source_noise_rank": 100,
    },
    "quick": {
        "hidden": [16, 16],
        "train_steps": 50,
        "rank": 5,
        "probes": 20,
        "source_noise_rank": 20,
    },
}
TIMEOUT = 3600
# A child whose resident memory passes this is killed and reported (the machine is
# shared; the target is 12 GB).
MEMORY_LIMIT_GB = 14.0


class Steps:
    def __init__(self):
        self.rows = []

    def run(self, name, fn, *args, **kwargs):
        import jax

        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        self.rows.append(
            {
                "step": name,
                "seconds": time.perf_counter() - t0,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
        return out


def _data():
    import numpy as np

    from jaxou.experiments import digits, digits_mlp

    split = digits.ink_split(digits_mlp.N_TARGET_TRAIN, np.random.default_rng(0))
    return {k: (split["x"][split[k]], split["y"][split[k]]) for k in ("source", "target_train")}


def estimate_stages(size: dict, data: dict, steps: Steps) -> dict:
    """Steps 1–3 of the module docstring: the minimum, H and C of both stages, each
    step timed by `steps`; returns the `jaxou.estimate_stage` results by stage."""
    import jax

    import jaxou
    from jaxou.experiments import digits_mlp as dm

    params = dm.mlp_init(jax.random.key(0), tuple(size["hidden"]))
    noises = {
        "source": ("sketched", jaxou.SketchedNoise(rank=size["source_noise_rank"])),
        "target": ("exact factor", jaxou.ExactNoise()),
    }
    est = {}
    for i, (name, sample) in enumerate(
        (("source", data["source"]), ("target", data["target_train"]))
    ):
        m = steps.run(
            f"{name}: L-BFGS, {size['train_steps']} steps",
            jaxou.train_to_minimum,
            dm.mlp_loss,
            params,
            sample,
            steps=size["train_steps"],
        )
        params = m.params
        est[name] = steps.run(
            f"{name}: H (Lanczos + Hutchinson), C ({noises[name][0]})",
            jaxou.estimate_stage,
            dm.mlp_loss,
            params,
            sample,
            jaxou.LanczosHessian(rank=size["rank"], probes=size["probes"], floor=dm.REG),
            noises[name][1],
            lr=1.0,
            batch_size=1.0,
            train_steps=0,
            key=jax.random.key(1 + i),
        )
    return est


def child_new(size: dict) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxou
    from jaxou.experiments import digits_mlp as dm

    jax.config.update("jax_enable_x64", True)
    steps = Steps()
    data = steps.run("data (digits split)", _data)
    est = estimate_stages(size, data, steps)
    out = {
        name: _accuracy(est[name], dm.mlp_loss, data[key])
        for name, key in (("source", "source"), ("target", "target_train"))
    }
    d = est["source"].stage.dim
    out["dim"] = d
    out["noise_ranks"] = [est[k].stage.noise_cov.rank for k in ("source", "target")]

    def bound():
        s, t = est["source"].stage, est["target"].stage
        lam_s = float(jnp.max(jnp.diag(s.hessian.core)))
        lam_t = float(jnp.max(jnp.diag(t.hessian.core)))
        stage_s = jaxou.SGDStage(s.hessian, s.noise_cov, s.minimum, 0.1 / lam_s, 32)
        stage_t = jaxou.SGDStage(t.hessian, t.noise_cov, t.minimum, 0.1 / lam_t, 32)
        init = jaxou.Gaussian(s.minimum, jaxou.Diagonal(jnp.full(d, dm.INIT_STD**2)))
        model = jaxou.TwoStage(init, stage_s, stage_t, 100.0, 100.0)
        b = jaxou.two_stage_bound(
            model, data["source"][0].shape[0], data["target_train"][0].shape[0], kind="kl"
        )
        return {
            "finetune_kl": float(b.finetune_kl.total),
            "finetune_bound": float(b.finetune_bound),
        }

    try:
        out["two_stage_bound"] = steps.run("two-stage bound (TwoStage, two_stage_bound)", bound)
    except (ValueError, TypeError) as err:
        out["two_stage_bound_error"] = " ".join(str(err).split())
    out["steps"] = steps.rows
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in steps.rows)
    out["total_s"] = sum(r["seconds"] for r in steps.rows)
    return out


def _accuracy(est, loss, sample) -> dict:
    """Independent checks of the estimates: Lanczos residuals from fresh
    Hessian-vector products; the noise factor's trace against a streamed sum."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    stage = est.stage
    theta, unravel = stage.minimum, est.unravel
    x, y = (jnp.asarray(a) for a in sample)

    def mean_loss(t, x, y):
        return jnp.mean(jax.vmap(lambda a, b: loss(unravel(t), a, b))(x, y))

    # The data are arguments of these programs (closing over them would make XLA
    # constant-fold the sample).
    hvp = jax.jit(
        lambda v, t0, x, y: jax.jvp(lambda t: jax.grad(mean_loss)(t, x, y), (t0,), (v,))[1]
    )
    U, lam = stage.hessian.factor, jnp.diag(stage.hessian.core)
    res = [
        float(jnp.linalg.norm(hvp(U[:, j], theta, x, y) - lam[j] * U[:, j]) / lam[j])
        for j in range(U.shape[1])
    ]
    g = jax.jit(jax.vmap(jax.grad(lambda t, a, b: loss(unravel(t), a, b)), in_axes=(None, 0, 0)))
    total, mean = 0.0, jnp.zeros_like(theta)
    for i in range(0, x.shape[0], 64):  # two streamed passes: the mean, then squares
        mean = mean + jnp.sum(g(theta, x[i : i + 64], y[i : i + 64]), 0)
    mean = mean / x.shape[0]
    for i in range(0, x.shape[0], 64):
        total += float(jnp.sum((g(theta, x[i : i + 64], y[i : i + 64]) - mean) ** 2))
    trace = float(stage.noise_cov.trace())
    return {
        "grad_norm": float(est.grad_norm),
        "lanczos_relative_residual_max": max(res),
        "lanczos_top_eigenvalues": np.asarray(lam).tolist(),
        "noise_trace": trace,
        "noise_trace_rel_error": abs(trace - total / x.shape[0]) / trace,
        "hutchinson_floored": int(est.hessian_floored),
        "hutchinson_relative_stderr_median": float(
            np.median(np.asarray(est.hessian_stderr) / np.abs(np.asarray(stage.hessian.diagonal)))
        ),
    }


def child_old(size: dict) -> dict:
    """Steps 1–2 with the estimation code of the baseline commit."""
    import importlib.util
    import tempfile

    import jax

    jax.config.update("jax_enable_x64", True)
    src = subprocess.run(
        ["git", "show", f"{BASELINE_COMMIT}:jaxou/_estimate.py"],
        cwd=os.path.dirname(HERE),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("from ._sgd import SGDStage", "from jaxou import SGDStage")
    path = os.path.join(tempfile.mkdtemp(), "old_estimate.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("old_estimate", path)
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_estimate"] = old  # dataclasses (Equinox modules) look it up
    spec.loader.exec_module(old)
    from jaxou.experiments import digits_mlp as dm

    steps = Steps()
    data = steps.run("data (digits split)", _data)
    params = dm.mlp_init(jax.random.key(0), tuple(size["hidden"]))
    sample = data["source"]
    m = steps.run(
        f"source: L-BFGS, {size['train_steps']} steps",
        old.train_to_minimum,
        dm.mlp_loss,
        params,
        sample,
        steps=size["train_steps"],
    )

    def estimate():
        H = old.estimate_hessian(
            dm.mlp_loss,
            m.params,
            sample,
            method="lanczos",
            k=size["rank"],
            n_probes=size["probes"],
            key=jax.random.key(1),
        )
        C = old.estimate_noise_cov(dm.mlp_loss, m.params, sample, method="lowrank", k=size["rank"])
        return H, C

    H, _ = steps.run("source: H (Lanczos + Hutchinson), C (Lanczos 'lowrank')", estimate)
    return {
        "steps": steps.rows,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in steps.rows),
        "total_s": sum(r["seconds"] for r in steps.rows),
        "lanczos_top_eigenvalues": [float(v) for v in H.values],
        "grad_norm": float(m.grad_norm),
    }


def _run_child(which: str, size_name: str) -> dict:
    """Run one pipeline in a child process, polling its resident memory: past
    `MEMORY_LIMIT_GB` (or `TIMEOUT`) it is killed and reported as such."""
    cmd = [sys.executable, __file__, "--child", which, "--size", size_name, "--blas-threads", BLAS]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        peak = 0.0
        while proc.poll() is None:
            time.sleep(1)
            peak = max(peak, _rss_gb(proc.pid))
            killed = "memory" if peak > MEMORY_LIMIT_GB else None
            if time.perf_counter() - t0 > TIMEOUT:
                killed = "timeout"
            if killed:
                proc.kill()
                proc.wait()
                err.seek(0)
                return {
                    "status": killed,
                    "rss_gb_at_kill": peak,
                    "after_s": time.perf_counter() - t0,
                    "stderr_tail": err.read()[-2000:],
                }
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        return {"status": "error", "returncode": proc.returncode, "stderr_tail": stderr[-3000:]}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["status"] = "ok"
    result["wall_s"] = time.perf_counter() - t0
    result["constant_folding_alarms"] = stderr.count("Constant folding")
    return result


def _rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _markdown(payload: dict) -> str:
    m, size = payload["machine"], payload["size"]
    new, old = payload["new"], payload["baseline"]
    lines = [
        f"# Estimation benchmark ({payload['size_name']})",
        "",
        f"`python benchmarks/estimate.py{' --quick' if payload['size_name'] == 'quick' else ''}`"
        f" — {m['date']}, {m['cpu']} ({m['cores']} cores), jax {m['jax']}, numpy {m['numpy']},"
        f" scipy {m['scipy']}, BLAS threads {m['blas_threads']}, load avg at start"
        f" {m['loadavg_1min_at_start']:.2f}. Network: tanh MLP 64 → "
        f"{' → '.join(map(str, size['hidden']))} → 10, d = {new.get('dim', 0):,}, float64.",
        "",
        "Peak memory is the process's resident-set peak after the step (it only grows).",
        "",
    ]
    for title, res in (
        ("jaxou (operators, data as arguments)", new),
        (f"baseline: estimation code at {BASELINE_COMMIT}", old),
    ):
        lines += [f"## {title}", ""]
        if res.get("status") != "ok":
            detail = {k: v for k, v in res.items() if k != "stderr_tail"}
            lines += [f"status: {res.get('status')} {json.dumps(detail)}", ""]
            lines += ["```", res.get("stderr_tail", ""), "```", ""]
            continue
        lines += ["| step | time | peak memory |", "|---|---|---|"]
        for r in res["steps"]:
            lines.append(
                f"| {r['step']} | {r['seconds']:.1f} s | {r['peak_rss_mb'] / 1024:.2f} GB |"
            )
        lines += [
            "",
            f"Total {res['total_s']:.1f} s (process wall {res['wall_s']:.1f} s with start-up), "
            f"peak {res['peak_rss_mb'] / 1024:.2f} GB; XLA 'Constant folding' alarms: "
            f"{res['constant_folding_alarms']}.",
            "",
        ]
    if new.get("status") == "ok":
        est = sum(r["seconds"] for r in new["steps"] if "bound" not in r["step"])
        bound = [r for r in new["steps"] if "bound" in r["step"]]
        lines += [
            "## Against the targets (10 minutes, 12 GB)",
            "",
            f"- data to the two-stage bound: {new['total_s'] / 60:.1f} min "
            f"({'met' if new['total_s'] < 600 else 'not met'}), peak "
            f"{new['peak_rss_mb'] / 1024:.1f} GB "
            f"({'met' if new['peak_rss_mb'] < 12 * 1024 else 'not met'}); measured with a "
            f"load average of {m['loadavg_1min_at_start']:.1f} on {m['cores']} cores;",
            f"- estimation (minima, H, C of both stages): {est:.0f} s;",
        ]
        if bound:
            lines.append(
                f"- the laws and the bound (two stationary solves by jaxou.LowRankADI, two "
                f"finite-time laws, two KL divergences): {bound[0]['seconds']:.0f} s."
            )
        lines.append("")
        lines += ["## Accuracy (jaxou)", ""]
        for name in ("source", "target"):
            a = new[name]
            lines.append(
                f"- {name}: |∇L| = {a['grad_norm']:.2e}; Lanczos max ‖Hu − λu‖/λ = "
                f"{a['lanczos_relative_residual_max']:.1e}; noise trace relative error "
                f"{a['noise_trace_rel_error']:.1e}; Hutchinson median relative standard error "
                f"{a['hutchinson_relative_stderr_median']:.2f}, {a['hutchinson_floored']} entries "
                "floored"
            )
        if "two_stage_bound" in new:
            b = new["two_stage_bound"]
            lines.append(
                f"- two-stage bound: KL(fine ‖ pre) = {b['finetune_kl']:.4g}, "
                f"fine-tuning bound {b['finetune_bound']:.4g}"
            )
        else:
            lines.append(f"- two-stage bound: not computed: {new.get('two_stage_bound_error')}")
        lines.append("")
    return "\n".join(lines)


def _plot(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    for j, (name, res) in enumerate((("jaxou", payload["new"]), ("baseline", payload["baseline"]))):
        if res.get("status") != "ok":
            continue
        labels = [r["step"] for r in res["steps"]]
        y = [i + 0.4 * j for i in range(len(labels))]
        axes[0].barh(y, [r["seconds"] for r in res["steps"]], height=0.4, label=name)
        axes[1].barh(y, [r["peak_rss_mb"] / 1024 for r in res["steps"]], height=0.4, label=name)
        if j == 0:
            for ax in axes:
                ax.set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0].set_xlabel("seconds")
    axes[1].set_xlabel("peak resident memory after the step (GB)")
    for ax in axes:
        ax.invert_yaxis()
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"d = {payload['new'].get('dim', 0):,}: data to the two-stage bound", fontsize=10)
    fig.savefig(path, dpi=100)


def _parse_args():
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small network (smoke run)")
    parser.add_argument(
        "--markdown-only",
        action="store_true",
        help="rewrite the Markdown table from the saved JSON results; run nothing",
    )
    parser.add_argument(
        "--blas-threads", default="1", help="BLAS threads (default 1; 'default' leaves it unset)"
    )
    parser.add_argument("--child", choices=("new", "old"), help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=tuple(SIZES), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    if args.markdown_only:  # rewrite the table from the saved results
        stem = "estimate_quick" if args.quick else "estimate"
        with open(os.path.join(RESULTS, f"{stem}.json")) as f:
            payload = json.load(f)
        with open(os.path.join(RESULTS, f"{stem}.md"), "w") as f:
            f.write(_markdown(payload))
        return
    if args.child:
        size = SIZES[args.size]
        out = child_new(size) if args.child == "new" else child_old(size)
        print(json.dumps(out))
        return
    size_name = "quick" if args.quick else "full"
    payload = {"size_name": size_name, "size": SIZES[size_name], "machine": machine_info(BLAS)}
    payload["new"] = _run_child("new", size_name)
    payload["baseline"] = _run_child("old", size_name)
    stem = "estimate" if size_name == "full" else "estimate_quick"
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{stem}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(RESULTS, f"{stem}.md"), "w") as f:
        f.write(_markdown(payload))
    _plot(payload, os.path.join(RESULTS, f"{stem}.png"))
    print(_markdown(payload))


if __name__ == "__main__":
    main()
