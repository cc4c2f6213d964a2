"""`jaxou experiment NAME`: a real-data study end to end (estimate H, C, θ* with Optax,
run real SGD over many seeds, test the OU model's predictions), written to
`report.json` and figures."""

from __future__ import annotations

import argparse
import json
import os

from ._config import ConfigError

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run"]

HELP = "run a real-data study: estimate H, C, θ* and test the OU predictions against SGD"

DESCRIPTION = """\
Run a real-data study end to end:

  1. train a small model to its minimum with Optax on a source and a target domain
     (data shipped inside scikit-learn; nothing is downloaded),
  2. measure the Hessian H, the per-example gradient covariance C and θ* of both,
  3. run real SGD over many seeds at once (pre-train on the source, fine-tune on the
     target over a grid of lr/B, one large-lr point included),
  4. compare SGD's laws with the OU predictions (covariance error, KL, mean offset in
     standard errors), the generalization gap with lr/B and with the PAC-Bayes bound
     (0-1 loss, held-out target data), and say where the OU model fails.

Writes into the output directory (default results/experiment-NAME/):
  report.json             every number (strict JSON)
  covariances.png         empirical against predicted covariance spectra and ellipses
  gap_vs_lr_over_b.png    generalization gap against lr/B
  bound_vs_gap.png        the bound against the gap

examples:
  jaxou experiment --list
  jaxou experiment digits --quick --out /tmp/digits
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME", help="the study to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the studies and exit")
    parser.add_argument(
        "--quick", action="store_true", help="a small version (under a minute; for tests)"
    )
    parser.add_argument(
        "--out", metavar="DIR", help="output directory (default results/experiment-NAME)"
    )
    parser.add_argument("--seeds", type=int, metavar="S", help="SGD seeds (default: the study's)")
    parser.add_argument("--no-plot", action="store_true", help="write report.json only")


def run(args: argparse.Namespace) -> int:
    import sys

    from ._cli import Progress, check_output_dir, jsonable, write_atomic
    from .experiments import EXPERIMENTS, load

    if args.list:
        for name in EXPERIMENTS:
            print(f"{name}\t{load(name).TITLE}")
        return 0
    if args.name is None:
        raise ConfigError(f"give a study NAME (available: {', '.join(EXPERIMENTS)})")
    if args.name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {args.name!r}; available: {', '.join(EXPERIMENTS)}")
    if args.seeds is not None and args.seeds < 16:
        raise ConfigError(f"--seeds must be >= 16, got {args.seeds}")
    out_dir = (
        args.out if args.out is not None else os.path.join("results", f"experiment-{args.name}")
    )
    check_output_dir(out_dir)
    progress = Progress(quiet=args.quiet)
    study = load(args.name)
    progress.info(f"experiment {args.name}{' (quick)' if args.quick else ''}: {study.TITLE}")
    report, figures = study.run(quick=args.quick, seeds=args.seeds, progress=progress)
    text = json.dumps(jsonable(report), indent=2, allow_nan=False)
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, "report.json"), (text + "\n").encode())
    written = ["report.json"]
    if not args.no_plot:
        for name, png in figures.items():
            write_atomic(os.path.join(out_dir, name), png)
            written.append(name)
    for note in report.get("ou_model_failures", []):
        progress.info(f"OU model: {note}")
    progress.info(f"wrote {', '.join(written)} to {out_dir}{os.sep}")
    sys.stdout.flush()
    return 0
