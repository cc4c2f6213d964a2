"""`jaxou run`: solve a two-stage problem end to end (stationary laws, laws at
the end of each stage, domain discrepancy, PAC-Bayes bounds) and write
`summary.json`, `arrays.npz` and `stationary_laws.png`."""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import sys
from typing import Any

from ._config import BOUND_KINDS, Config, ConfigError

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run", "solve", "summarise", "format_summary"]

HELP = "solve a two-stage problem (the embedded default, or a TOML config) end to end"

DESCRIPTION = """\
Solve the two-stage OU model of pre-training and fine-tuning exactly:

  - the stationary law N(θ*, Σ∞) of each stage (H Σ∞ + Σ∞ H = (lr/B) C),
  - the laws reached at the end of pre-training and of fine-tuning,
  - the domain discrepancy KL(π_T ‖ π_S) = covariance part + shift part,
  - each stage's KL and PAC-Bayes bound ("mcallester" and "kl"), and which
    stage dominates.

Without CONFIG it solves an embedded default problem of realistic shape
(d = 50, Hessian spectrum log-spaced in [1e-3, 10], anisotropic gradient noise,
a rotated, rescaled and shifted target; examples/default.toml spells it out).
A CONFIG file overrides any default; --set overrides single keys.

Writes into the output directory (created if needed; never emptied):
  summary.json         every number of the summary
  arrays.npz           Hessians, noise covariances, minima, the laws' means and covariances
  stationary_laws.png  the laws as 1σ/2σ ellipses, and their covariance spectra

Everything is validated before any computation, and the files are written
only once everything has been computed, each one atomically.

examples:
  jaxou run
  jaxou run examples/default.toml --out results/default
  jaxou run --set problem.dim=10 --set finetune.duration=inf --json
"""

FILES = ("summary.json", "arrays.npz", "stationary_laws.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._cli import add_config_arguments

    add_config_arguments(parser, set_example="--set pretrain.lr=0.1 --set finetune.duration=inf")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the summary as JSON on stdout (and nothing else on stdout)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw stationary_laws.png")
    parser.add_argument(
        "--mc-paths",
        type=int,
        default=4096,
        metavar="N",
        help="paths of the Monte Carlo check of the end-of-stage laws (exact OU sampler; "
        "default 4096; 0 skips the check)",
    )


# ---------------------------------------------------------------------------
# The numbers: one compiled program.


def _law_stats(jnp, law, eig) -> dict:
    return {
        "trace": jnp.trace(law.cov),
        "eig_min": eig[0],
        "eig_max": eig[-1],
        "mean_norm": jnp.linalg.norm(law.mean),
    }


def _solve_impl(model, n_source, n_target, delta, risk_source, risk_target):
    import jax.numpy as jnp

    from . import domain_discrepancy, kl_parts, two_stage_bound, w2

    source_law = model.pretrain.stationary()
    target_law = model.finetune.stationary()
    pretrained, finetuned = model.laws()
    covs = {
        "source": source_law,
        "target": target_law,
        "pretrained": pretrained,
        "finetuned": finetuned,
    }
    eig = {k: jnp.linalg.eigvalsh(v.cov) for k, v in covs.items()}
    out: dict[str, Any] = {
        "stationary": {
            "source": _law_stats(jnp, source_law, eig["source"]),
            "target": _law_stats(jnp, target_law, eig["target"]),
        },
    }
    end = {}
    for name, law, stage, stationary in (
        ("pretrained", pretrained, model.pretrain, source_law),
        ("finetuned", finetuned, model.finetune, target_law),
    ):
        stats = _law_stats(jnp, law, eig[name])
        stats["distance_to_minimum"] = jnp.linalg.norm(law.mean - stage.minimum)
        stats["kl_to_stationary"] = kl_parts(law, stationary).total
        end[name] = stats
    out["end_of_stage"] = end
    disc = domain_discrepancy(source_law, target_law)
    out["domain_discrepancy"] = {
        "total": disc.total,
        "covariance": disc.covariance,
        "shift": disc.shift,
        "w2": w2(target_law, source_law),
    }
    bounds = {}
    for kind in BOUND_KINDS:
        bounds[kind] = two_stage_bound(
            model,
            n_source,
            n_target,
            delta,
            empirical_risk_source=risk_source,
            empirical_risk_target=risk_target,
            kind=kind,
        )
    out["bounds"] = bounds
    out["laws"] = {k: (v.mean, v.cov) for k, v in covs.items()}
    stages = {"pretrain": model.pretrain, "finetune": model.finetune}
    out["stage_spectra"] = {
        name: {
            "hessian": jnp.linalg.eigvalsh(s.hessian),
            "noise_cov": jnp.linalg.eigvalsh(s.noise_cov),
        }
        for name, s in stages.items()
    }
    return out


@functools.cache
def _compiled_solve():
    # Built once per process (and lazily, so that `jaxou --help` never imports
    # JAX): every run of the same shapes reuses the compiled program.
    import equinox as eqx

    return eqx.filter_jit(_solve_impl)


def solve(model, info) -> dict:
    """Every number of the summary for a [`jaxou.TwoStage`][] model, as NumPy
    (one compiled program; the sample sizes and risks are traced, so a sweep
    over them does not recompile)."""
    import jax
    import numpy as np

    dtype = model.pretrain.hessian.dtype
    result = _compiled_solve()(
        model,
        np.asarray(info.n_source, dtype),
        np.asarray(info.n_target, dtype),
        np.asarray(info.delta, dtype),
        np.asarray(info.empirical_risk_source, dtype),
        np.asarray(info.empirical_risk_target, dtype),
    )
    return jax.tree.map(np.asarray, result)


def _kl_dict(parts) -> dict:
    return {"total": parts.total, "covariance": parts.covariance, "shift": parts.shift}


def _steps(duration: float, lr: float) -> float:
    return math.inf if math.isinf(duration) else duration / lr


def summarise(model, info, numbers: dict) -> dict:
    """The JSON-ready summary (plain Python numbers)."""
    import numpy as np

    from . import __version__
    from ._cli import jsonable

    cfg: Config = info.config
    problem: dict[str, Any] = {
        "dim": info.dim,
        "seed": info.seed,
        "init_std": cfg.init.std,
        "origin": info.origin,
    }
    for name, section, n in (
        ("pretrain", cfg.pretrain, info.n_source),
        ("finetune", cfg.finetune, info.n_target),
    ):
        spec = numbers["stage_spectra"][name]
        problem[name] = {
            "lr": section.lr,
            "batch_size": section.batch_size,
            "duration": section.duration,
            "steps": _steps(section.duration, section.lr),
            "n_samples": n,
            "hessian_eig_min": spec["hessian"][0],
            "hessian_eig_max": spec["hessian"][-1],
            "noise_eig_min": spec["noise_cov"][0],
            "noise_eig_max": spec["noise_cov"][-1],
            "lr_times_max_hessian_eig": section.lr * spec["hessian"][-1],
        }
    problem["finetune"]["shift_norm"] = float(
        np.linalg.norm(np.asarray(model.finetune.minimum) - np.asarray(model.pretrain.minimum))
    )
    if info.rotation is not None:
        problem["finetune"]["rotation_angle"] = cfg.finetune.rotation
    bound: dict[str, Any] = {
        "delta": info.delta,
        "kind": info.kind,
    }
    for stage, n, risk in (
        ("pretrain", info.n_source, info.empirical_risk_source),
        ("finetune", info.n_target, info.empirical_risk_target),
    ):
        b0 = numbers["bounds"][BOUND_KINDS[0]]
        entry: dict[str, Any] = {
            "n_samples": n,
            "empirical_risk": risk,
            "prior": "init" if stage == "pretrain" else "pretrained",
            "posterior": "pretrained" if stage == "pretrain" else "finetuned",
            "kl": _kl_dict(getattr(b0, f"{stage}_kl")),
        }
        entry["bounds"] = {}
        for kind in BOUND_KINDS:
            b = numbers["bounds"][kind]
            entry["bounds"][kind] = {
                "bound": getattr(b, f"{stage}_bound"),
                "term": getattr(b, f"{stage}_term"),
            }
        bound[stage] = entry
    chosen = numbers["bounds"][info.kind]
    t1, t2 = float(chosen.pretrain_term), float(chosen.finetune_term)
    bound["dominant_stage"] = "finetune" if bool(chosen.finetune_dominates) else "pretrain"
    bound["finetune_dominates"] = {k: numbers["bounds"][k].finetune_dominates for k in BOUND_KINDS}
    bound["term_ratio"] = t2 / t1 if t1 > 0 else math.inf
    summary = {
        "jaxou_version": __version__,
        "config_file": cfg.source,
        "config": cfg.to_dict(),
        "problem": problem,
        "stationary": numbers["stationary"],
        "end_of_stage": numbers["end_of_stage"],
        "domain_discrepancy": numbers["domain_discrepancy"],
        "bound": bound,
    }
    return jsonable(summary)


def arrays(model, info, numbers: dict) -> dict:
    """The arrays written to `arrays.npz`."""
    import numpy as np

    out = {}
    for name, stage in (("pretrain", model.pretrain), ("finetune", model.finetune)):
        out[f"{name}_hessian"] = stage.hessian
        out[f"{name}_noise_cov"] = stage.noise_cov
        out[f"{name}_minimum"] = stage.minimum
    out["init_mean"] = model.init.mean
    out["init_cov"] = model.init.cov
    names = {
        "source": "stationary_source",
        "target": "stationary_target",
        "pretrained": "pretrained",
        "finetuned": "finetuned",
    }
    for key, prefix in names.items():
        mean, cov = numbers["laws"][key]
        out[f"{prefix}_mean"] = mean
        out[f"{prefix}_cov"] = cov
    if info.rotation is not None:
        out["rotation"] = info.rotation
    out["durations"] = np.array([float(model.t_pretrain), float(model.t_finetune)])
    return {k: np.asarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------
# The human summary.


def _g(x: Any, digits: int = 4) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    return f"{x:.{digits}g}"


def _table(title: str, headers: tuple[str, str], rows: list[tuple[str, str, str]]) -> list[str]:
    w0 = max([len(title)] + [len(r[0]) + 2 for r in rows])
    w1 = max([len(headers[0])] + [len(r[1]) for r in rows]) + 3
    lines = [f"{title:<{w0}}  {headers[0]:>{w1}}  {headers[1]:>{w1}}"]
    for label, a, b in rows:
        lines.append(f"  {label:<{w0 - 2}}  {a:>{w1}}  {b:>{w1}}")
    return lines


def format_summary(s: dict) -> str:
    """The readable summary printed by `jaxou run`."""
    p, st, end, disc, b = (
        s["problem"],
        s["stationary"],
        s["end_of_stage"],
        s["domain_discrepancy"],
        s["bound"],
    )
    pre, fine = p["pretrain"], p["finetune"]
    where = s["config_file"] or "embedded default problem"
    lines = [f"jaxou run: two-stage OU model, d = {p['dim']}, seed {p['seed']} ({where})", ""]
    lines += _table(
        "Stages",
        ("pre-training", "fine-tuning"),
        [
            (
                "lr / batch size",
                f"{_g(pre['lr'])} / {pre['batch_size']}",
                f"{_g(fine['lr'])} / {fine['batch_size']}",
            ),
            ("duration (lr × steps)", _g(pre["duration"]), _g(fine["duration"])),
            ("SGD steps", _g(pre["steps"], 6), _g(fine["steps"], 6)),
            ("samples N", _g(pre["n_samples"]), _g(fine["n_samples"])),
            (
                "Hessian eigenvalues",
                f"[{_g(pre['hessian_eig_min'], 3)}, {_g(pre['hessian_eig_max'], 3)}]",
                f"[{_g(fine['hessian_eig_min'], 3)}, {_g(fine['hessian_eig_max'], 3)}]",
            ),
            (
                "noise-cov eigenvalues",
                f"[{_g(pre['noise_eig_min'], 3)}, {_g(pre['noise_eig_max'], 3)}]",
                f"[{_g(fine['noise_eig_min'], 3)}, {_g(fine['noise_eig_max'], 3)}]",
            ),
            (
                "lr × λ_max(H)",
                _g(pre["lr_times_max_hessian_eig"], 3),
                _g(fine["lr_times_max_hessian_eig"], 3),
            ),
        ],
    )
    extra = f"init N(0, σ0² I), σ0 = {_g(p['init_std'])}; |θ*_T - θ*_S| = {_g(fine['shift_norm'])}"
    if "rotation_angle" in fine:
        extra += f"; rotation angle {_g(fine['rotation_angle'])} rad"
    lines += [f"  {extra}", ""]

    def law_rows(a: dict, c: dict, mean_label: str) -> list[tuple[str, str, str]]:
        return [
            (mean_label, _g(a["mean_norm"]), _g(c["mean_norm"])),
            ("tr Σ", _g(a["trace"]), _g(c["trace"])),
            ("λ_min(Σ)", _g(a["eig_min"]), _g(c["eig_min"])),
            ("λ_max(Σ)", _g(a["eig_max"]), _g(c["eig_max"])),
            (
                "condition number",
                _g(a["eig_max"] / a["eig_min"], 3) if a["eig_min"] > 0 else "inf",
                _g(c["eig_max"] / c["eig_min"], 3) if c["eig_min"] > 0 else "inf",
            ),
        ]

    lines += _table(
        "Stationary laws N(θ*, Σ∞)",
        ("source", "target"),
        law_rows(st["source"], st["target"], "|θ*|"),
    )
    lines.append("")
    pre_t, fine_t = _g(pre["duration"]), _g(fine["duration"])
    rows = law_rows(end["pretrained"], end["finetuned"], "|mean|")
    rows.insert(
        1,
        (
            "|mean - θ*| (own stage)",
            _g(end["pretrained"]["distance_to_minimum"]),
            _g(end["finetuned"]["distance_to_minimum"]),
        ),
    )
    rows.append(
        (
            "KL(law ‖ stationary)",
            _g(end["pretrained"]["kl_to_stationary"]),
            _g(end["finetuned"]["kl_to_stationary"]),
        )
    )
    lines += _table(
        "Laws at the end of each stage",
        (f"pretrained t={pre_t}", f"finetuned t={fine_t}"),
        rows,
    )
    lines += [
        "",
        "Domain discrepancy KL(π_T ‖ π_S) between the stationary laws",
        f"  total {_g(disc['total'])} = covariance {_g(disc['covariance'])}"
        f" + shift {_g(disc['shift'])};  W2(π_T, π_S) = {_g(disc['w2'])}",
        "",
    ]
    pb, fb = b["pretrain"], b["finetune"]

    def kl_text(e):
        k = e["kl"]
        return f"{_g(k['total'])}"

    lines += _table(
        f"PAC-Bayes bounds (δ = {_g(b['delta'])})",
        ("pre-training", "fine-tuning"),
        [
            ("prior → posterior", "init → pretrained", "pretrained → finetuned"),
            ("KL(posterior ‖ prior)", kl_text(pb), kl_text(fb)),
            (
                "  covariance part",
                _g(pb["kl"]["covariance"]),
                _g(fb["kl"]["covariance"]),
            ),
            ("  shift part", _g(pb["kl"]["shift"]), _g(fb["kl"]["shift"])),
            ("empirical risk", _g(pb["empirical_risk"]), _g(fb["empirical_risk"])),
            (
                "mcallester: term",
                _g(pb["bounds"]["mcallester"]["term"]),
                _g(fb["bounds"]["mcallester"]["term"]),
            ),
            (
                "mcallester: bound",
                _g(pb["bounds"]["mcallester"]["bound"]),
                _g(fb["bounds"]["mcallester"]["bound"]),
            ),
            ("kl-inversion: term", _g(pb["bounds"]["kl"]["term"]), _g(fb["bounds"]["kl"]["term"])),
            (
                "kl-inversion: bound",
                _g(pb["bounds"]["kl"]["bound"]),
                _g(fb["bounds"]["kl"]["bound"]),
            ),
        ],
    )
    kind = b["kind"]
    dom = b["dominant_stage"]
    t_pre, t_fine = pb["bounds"][kind]["term"], fb["bounds"][kind]["term"]
    other = [k for k in BOUND_KINDS if b["finetune_dominates"][k] != (dom == "finetune")]
    lines += [
        "",
        f"→ the {'fine-tuning' if dom == 'finetune' else 'pre-training'} term dominates "
        f"({kind}: {_g(t_fine)} vs {_g(t_pre)}, ratio fine/pre = {_g(b['term_ratio'], 3)})"
        + (f"; the {', '.join(other)} bound says otherwise" if other else ""),
    ]
    mc = s.get("monte_carlo")
    if mc:
        verdict = "agree" if mc["passed"] else "DISAGREE"
        lines += [
            "",
            f"Monte Carlo check ({mc['n_paths']} paths, {mc['method']} sampler, "
            f"{_g(mc['seconds'], 2)} s): empirical and analytic laws {verdict}",
            f"  KL(empirical fit ‖ analytic): pretrained {_g(mc['kl']['pretrained'], 3)}, "
            f"finetuned {_g(mc['kl']['finetuned'], 3)} "
            f"(expected {_g(mc['kl_floor'], 3)} from {mc['n_paths']} samples, "
            f"threshold {_g(mc['kl_threshold'], 3)})",
            f"  largest deviation: mean {_g(mc['max_z_mean'], 3)} SE, "
            f"variance {_g(mc['max_z_var'], 3)} SE (threshold {_g(mc['z_threshold'], 3)} SE)",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The command.


def _nonfinite(summary: dict, prefix: str = "") -> list[str]:
    bad = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if key != "config":
                bad += _nonfinite(value, name + ".")
        elif value == "nan" or (
            value in ("inf", "-inf") and "duration" not in key and "steps" not in key
        ):
            bad.append(name)
    return bad


def _with_hint(err: Exception, model) -> Exception:
    """Add the likely cause to a failure of the solve: a singular noise
    covariance makes a law degenerate (a KL divergence infinite)."""
    import numpy as np

    from ._cli import library_message

    message = library_message(err)
    if message is None:
        return err
    singular = [
        name
        for name, stage in (("pretrain", model.pretrain), ("finetune", model.finetune))
        if np.linalg.eigvalsh(np.asarray(stage.noise_cov))[0] <= 0
    ]
    hint = (
        f" ({' and '.join(f'{n}.noise_cov' for n in singular)} is singular, so a law "
        "degenerates and a KL divergence is infinite; make it positive definite)"
        if singular
        else ""
    )
    return ValueError(f"{message}{hint}")


def run(args: argparse.Namespace) -> int:
    from ._cli import Progress, load_command_config, write_atomic

    progress = Progress(quiet=args.quiet)

    # 1. Validate everything before any numerical work.
    config, out_dir = load_command_config(args)
    if args.mc_paths != 0 and args.mc_paths < 2:
        raise ConfigError(f"--mc-paths must be 0 (no check) or >= 2, got {args.mc_paths}")
    plot = config.output.plot and not args.no_plot

    # 2. Compute everything (nothing is written yet).
    from ._problem import build_problem

    with progress(f"building the problem (d = {config.problem.dim})"):
        model, info = build_problem(config)
    for name, stage in (("pretrain", config.pretrain), ("finetune", config.finetune)):
        if stage.duration == 0:
            progress.info(f"note: {name}.duration = 0, that stage does not move its law")
    with progress("solving (stationary laws, end-of-stage laws, bounds)"):
        try:
            numbers = solve(model, info)
        except Exception as err:
            raise _with_hint(err, model) from err
        summary = summarise(model, info, numbers)
        arrs = arrays(model, info, numbers)
    if args.mc_paths:
        summary["monte_carlo"] = _monte_carlo(model, config, args.mc_paths, progress)
    for name in ("pretrain", "finetune"):
        x = summary["problem"][name]["lr_times_max_hessian_eig"]
        if isinstance(x, float) and x >= 2:
            progress.warn(
                f"{name}: lr × λ_max(H) = {x:.3g} >= 2: discrete SGD would diverge along the "
                "stiffest direction; the OU (small learning rate) model does not describe it"
            )
    bad = _nonfinite(summary)
    if bad:
        progress.warn(
            "non-finite results (a singular covariance?): "
            + ", ".join(bad[:6])
            + (" ..." if len(bad) > 6 else "")
        )
    png = None
    if plot:
        with progress("plotting"):
            png = _figure(summary, arrs, config)
    text = json.dumps(summary, indent=2, allow_nan=False)

    # 3. Write: each file atomically, in a directory that is never emptied.
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, "summary.json"), (text + "\n").encode())
    buffer = io.BytesIO()
    import numpy as np

    np.savez(buffer, **arrs)
    write_atomic(os.path.join(out_dir, "arrays.npz"), buffer.getvalue())
    if png is not None:
        write_atomic(os.path.join(out_dir, "stationary_laws.png"), png)
    written = [f for f in FILES if png is not None or f != "stationary_laws.png"]
    progress.info(f"wrote {', '.join(written)} to {out_dir}{os.sep}")

    if args.json:
        sys.stdout.write(text + "\n")
    else:
        sys.stdout.write(format_summary(summary) + "\n")
    sys.stdout.flush()
    return 0


def _monte_carlo(model, config: Config, n_paths: int, progress) -> dict | None:
    """Sample both stages with the exact OU transition and compare the empirical laws
    at the end of each stage with the analytic ones (`jaxou.monte_carlo_check`),
    as the summary's `monte_carlo` entry."""
    import math
    import time

    import jax

    from ._diagnostics import monte_carlo_check

    if not (math.isfinite(config.pretrain.duration) and math.isfinite(config.finetune.duration)):
        progress.info("Monte Carlo check skipped: a stage runs to stationarity (duration = inf)")
        return None
    with progress(f"Monte Carlo check ({n_paths} paths, exact OU sampler)"):
        start = time.perf_counter()
        check = monte_carlo_check(model, jax.random.key(config.simulate.seed), n_paths=n_paths)
        seconds = time.perf_counter() - start
    out = check._asdict()
    kl = {"pretrained": out.pop("kl_pretrained"), "finetuned": out.pop("kl_finetuned")}
    return {"method": "exact", **out, "kl": kl, "seconds": seconds}


def _figure(summary: dict, arrs: dict, config: Config) -> bytes:
    from ._plot import plot_stationary_laws, projection_plane

    basis, labels = projection_plane(
        arrs["pretrain_minimum"], arrs["finetune_minimum"], arrs["stationary_target_cov"]
    )
    p = summary["problem"]
    laws = [
        ("source stationary π_S", arrs["stationary_source_mean"], arrs["stationary_source_cov"]),
        ("target stationary π_T", arrs["stationary_target_mean"], arrs["stationary_target_cov"]),
        (
            f"pretrained (t = {_g(p['pretrain']['duration'])})",
            arrs["pretrained_mean"],
            arrs["pretrained_cov"],
        ),
        (
            f"finetuned (t = {_g(p['finetune']['duration'])})",
            arrs["finetuned_mean"],
            arrs["finetuned_cov"],
        ),
    ]
    d = summary["domain_discrepancy"]
    title = (
        f"d = {p['dim']}: KL(π_T ‖ π_S) = {_g(d['total'], 3)} "
        f"(covariance {_g(d['covariance'], 3)} + shift {_g(d['shift'], 3)})"
    )
    return plot_stationary_laws(
        laws,
        basis,
        labels,
        minima=[("θ*_S", arrs["pretrain_minimum"]), ("θ*_T", arrs["finetune_minimum"])],
        reference_variance=config.init.std**2,
        title=title,
    )
