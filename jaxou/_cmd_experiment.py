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

  1. train a model to its minimum with Optax on a source and a target domain
     (data shipped inside scikit-learn; nothing is downloaded),
  2. measure the Hessian H, the per-example gradient covariance C and θ* of both
     (dense matrices, or operators for a network of 126,090 parameters),
  3. run real SGD over many seeds at once (pre-train on the source, fine-tune on the
     target over a grid of lr and B),
  4. compare SGD's laws with the OU predictions, the generalization gap with the
     PAC-Bayes bound and the domain discrepancy (0-1 loss, held-out target data),
     and say where the OU model fails.

The studies:
  digits       logistic regression and a small MLP on PCA features (dense path);
               writes report.json, covariances.png, gap_vs_lr_over_b.png,
               bound_vs_gap.png
  digits-mlp   a tanh MLP of 126,090 parameters on the raw pixels, operators only
               (no d x d matrix): variances along top-Hessian and random directions,
               bound and discrepancy against the gap over 12 (lr, B), time and peak
               memory of each step; writes report.json, digits_mlp.png

Writes into the output directory (default results/experiment-NAME/).

examples:
  jaxou experiment --list
  jaxou experiment digits --quick --out /tmp/digits
  jaxou experiment digits-mlp --quick --out /tmp/digits-mlp
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME", help="the study to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the studies and exit")
    parser.add_argument(
        "--quick", action="store_true", help="a small version (about a minute; for tests)"
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
