"""Benchmark: LowRankADI's in-loop compression without `max_rank` (`auto_width`)
against compressing only at the end, on the stationary laws of a real network.

    .venv/bin/python benchmarks/adi_auto.py --repeats 2   # d = 126,090, about 15 minutes
    .venv/bin/python benchmarks/adi_auto.py --quick       # a small network (the rule is off)

The stages are those of `benchmarks/estimate.py` (the digits MLP at its minima:
`jaxou.LanczosHessian`, sketched source noise, exact target noise). Each stage's
stationary equation H X + X H = C is solved by `jaxou.LowRankADI()` (default
tolerance) twice per repeat, interleaved (after a warm-up solve of each stage;
which mode goes first alternates between repeats), in one process: with the rule (`AUTO_COLUMNS` =
2,048, the default) and without it (`AUTO_COLUMNS` = 10^9: the blocks are held to
the end, the behaviour before the rule). Reported: time, steps, rank, the widest
accumulator, the result and the reported residual of each solve.
Results: benchmarks/results/adi_auto.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

BLAS = _common.setup_threads(sys.argv)

import estimate  # noqa: E402  (its stages)

MODES = {"end only (before)": 10**9, "auto_width (default)": 2048}


def _stages(size: dict) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    est = estimate.estimate_stages(size, estimate._data(), estimate.Steps())
    return {name: e.stage for name, e in est.items()}


def run(size_name: str, repeats: int) -> dict:
    import warnings

    import jax

    import jaxou
    from jaxou._lyapunov import lowrank

    warnings.simplefilter("ignore", UserWarning)  # Hutchinson's floor counts
    stages = _stages(estimate.SIZES[size_name])
    for stage in stages.values():  # warm-up: compile the step kernels of each shape
        jax.block_until_ready(jaxou.LowRankADI(rtol=1e-2).solve(stage.hessian, stage.noise_cov))
    widest = []
    append = lowrank.LowRankAccumulator._append_panel

    def recorded(self, p):
        append(self, p)
        widest[-1] = max(widest[-1], self.width)

    lowrank.LowRankAccumulator._append_panel = recorded
    rows = []
    for rep in range(repeats):
        for name, stage in stages.items():
            # Alternate which mode goes first: the first solve of a stage also pays
            # for fresh memory (14 s of 86 s measured on the --quick target).
            for mode in list(MODES)[:: 1 if rep % 2 == 0 else -1]:
                columns = MODES[mode]
                lowrank.AUTO_COLUMNS = columns
                widest.append(0)
                t0 = time.perf_counter()
                sol, stats = jaxou.LowRankADI().solve_with_stats(stage.hessian, stage.noise_cov)
                jax.block_until_ready(sol.value.factor)
                rows.append(
                    {
                        "repeat": rep,
                        "stage": name,
                        "mode": mode,
                        "seconds": time.perf_counter() - t0,
                        "steps": stats.steps,
                        "rank": stats.rank,
                        "widest": widest[-1],
                        "result": jaxou.LyapunovResult(int(sol.result)).name,
                        "residual": float(sol.residual),
                    }
                )
                print(rows[-1], flush=True)
                del sol
    lowrank.AUTO_COLUMNS = MODES["auto_width (default)"]
    return {"dim": int(stages["source"].dim), "rows": rows}


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        "# LowRankADI: in-loop compression without max_rank (auto_width)",
        "",
        f"`{payload['command']}` — {m.get('date', '')}, {m.get('cpu', '')}, "
        f"{m['cores']} cores, jax {m['jax']}, "
        f"load average {m['loadavg_1min_at_start']:.2f} at start. d = {payload['dim']:,}, "
        "float64, default tolerance (√ε). Stages of `benchmarks/estimate.py`.",
        "",
        "| repeat | stage | mode | time | steps | rank | widest | result | residual |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['repeat']} | {r['stage']} | {r['mode']} | {r['seconds']:.1f} s | {r['steps']} "
            f"| {r['rank']} | {r['widest']:,} | {r['result']} | {r['residual']:.2e} |"
        )
    total = {}
    for r in payload["rows"]:
        total[r["mode"]] = total.get(r["mode"], 0.0) + r["seconds"]
    before, after = total["end only (before)"], total["auto_width (default)"]
    lines += [
        "",
        f"Both stages, all repeats: {before:.0f} s end only, {after:.0f} s with auto_width "
        f"(ratio {before / after:.2f}).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small network")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats (default 1)")
    parser.add_argument("--blas-threads", default="1", help="BLAS threads (default 1)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    machine = _common.machine_info(BLAS)
    payload = {"command": "python " + " ".join(sys.argv), "machine": machine}
    payload.update(run("quick" if args.quick else "full", args.repeats))
    stem = "adi_auto_quick" if args.quick else "adi_auto"
    _common.write_json(stem, payload)
    text = markdown(payload)
    _common.write_text(f"{stem}.md", text)
    print(text)


if __name__ == "__main__":
    main()
