"""Front end: the `jaxou` command line.

Each subcommand lives in its own module `jaxou/_cmd_<name>.py`, which exposes

- `HELP`: a one-line summary (shown by `jaxou --help`),
- `DESCRIPTION` (optional): the longer text of `jaxou <name> --help`,
- `add_arguments(parser)`: its options, on an `argparse` parser that already has
  the common options `--quiet` and `--debug`,
- `run(args) -> int`: the work; returns the exit code.

and is registered by adding its name to [`COMMANDS`][]. Command modules import
JAX (and Matplotlib) inside `run`, so `jaxou --help` stays instant.

Errors: a [`jaxou._config.ConfigError`][] becomes `jaxou: config error: ...`,
the library's `ValueError`/`TypeError`/`equinox.EquinoxRuntimeError` become
`jaxou: error: ...`; one line on stderr, exit code 2, no traceback unless
`--debug`. Failing to write outputs is exit code 1.

This module also holds the helpers every command shares: [`Progress`][],
[`write_atomic`][], [`check_output_dir`][], [`jsonable`][].
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import IO, Any

from ._config import ConfigError

__all__ = [
    "COMMANDS",
    "main",
    "build_parser",
    "Progress",
    "write_atomic",
    "check_output_dir",
    "jsonable",
    "enable_x64",
    "library_message",
    "add_config_arguments",
    "load_command_config",
]

# The subcommands, in the order `jaxou --help` lists them. Add yours here.
COMMANDS: list[str] = ["run", "simulate", "experiment", "sweep"]

EXIT_OK = 0
EXIT_FAILURE = 1  # could not write outputs, internal error
EXIT_USAGE = 2  # bad configuration or arguments, invalid problem

_EPILOG = (
    "Run `jaxou <command> --help` for the options of a command. "
    "Exit codes: 0 success, 1 failure to write results (or an internal error), "
    "2 bad configuration or invalid problem."
)


def _version() -> str:
    from . import __version__

    return __version__


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    group.add_argument(
        "--debug",
        action="store_true",
        help="show the full Python traceback on errors (for bug reports)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The `jaxou` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="jaxou",
        description=(
            "jaxou: the two-stage Ornstein–Uhlenbeck model of pre-training and "
            "fine-tuning. SGD near a minimum is an OU process; each stage settles "
            "into a Gaussian stationary law, and a PAC-Bayes argument bounds the "
            "risk of each stage."
        ),
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"jaxou {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    common = _common_parser()
    for name in COMMANDS:
        module = importlib.import_module(f"jaxou._cmd_{name}")
        p = sub.add_parser(
            name,
            parents=[common],
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def enable_x64() -> None:
    """The command line computes in float64 (the library itself never switches
    x64 on; an application may)."""
    import jax

    jax.config.update("jax_enable_x64", True)


# ---------------------------------------------------------------------------
# Error reporting.


def _one_line(text: str) -> str:
    return " ".join(text.split())


def library_message(err: BaseException) -> str | None:
    """The readable part of a library error, or None if it is not one."""
    if isinstance(err, (ValueError, TypeError)):
        return _one_line(str(err)) or type(err).__name__
    name = type(err).__name__
    if name in ("EquinoxRuntimeError", "XlaRuntimeError", "JaxRuntimeError"):
        # Equinox's message is buried in a long explanation; keep the line that
        # names the failed check.
        match = re.search(r"EquinoxRuntimeError: (.+)", str(err))
        if match:
            return _one_line(match.group(1))
        if name == "EquinoxRuntimeError":
            return _one_line(str(err).strip().splitlines()[0])
    return None


def _report(prefix: str, message: str) -> None:
    print(f"jaxou: {prefix}{message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jaxou` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = getattr(args, "debug", False)
    # One OpenBLAS thread unless the user chose otherwise: jaxlib's batched LAPACK
    # kernels already run on XLA's thread pool, and a threaded OpenBLAS under them
    # oversubscribes small machines and can deadlock the pool (benchmarks/README.md).
    # OpenBLAS reads this when SciPy's LAPACK is first used, which is after this line.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _show_warning
            enable_x64()
            return int(args._run(args))
    except ConfigError as err:
        if debug:
            raise
        _report("config error: ", _one_line(str(err)))
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        _report("", "interrupted")
        return 130
    except OSError as err:
        if debug:
            raise
        where = f" {err.filename!r}" if getattr(err, "filename", None) else ""
        _report("error: ", f"cannot write{where}: {err.strerror or err}")
        return EXIT_FAILURE
    except Exception as err:
        if debug:
            raise
        message = library_message(err)
        if message is not None:
            _report("error: ", message)
            return EXIT_USAGE
        _report(
            "internal error: ",
            f"{type(err).__name__}: {_one_line(str(err))[:300]} "
            "(rerun with --debug for the traceback, and please report it)",
        )
        return EXIT_FAILURE


# ---------------------------------------------------------------------------
# Helpers shared by the commands.


def add_config_arguments(parser: argparse.ArgumentParser, *, set_example: str) -> None:
    """The options every config-driven command shares: `CONFIG.toml`, `--out` and
    repeatable `--set TABLE.KEY=VALUE` overrides."""
    parser.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG.toml",
        help="configuration file (TOML); without it, the embedded default problem",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="output directory (overrides output.dir; default: results)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help=f"override one config key, VALUE in TOML syntax (repeatable), e.g. {set_example}",
    )


def load_command_config(args: argparse.Namespace):
    """Load and validate the config of a command built with
    [`add_config_arguments`][], and check that its output directory is usable.
    Returns `(config, out_dir)`; raises `ConfigError` before any work."""
    from ._config import load_config, parse_override

    overrides = [parse_override(text) for text in args.overrides]
    if args.out is not None:
        overrides.append(("output", "dir", args.out))
    config = load_config(args.config, overrides)
    check_output_dir(config.output.dir)
    return config, config.output.dir


class Progress:
    """Short progress messages on stderr: `with progress("solving"): ...` prints
    `jaxou: solving ... done (1.2 s)`. Silent when `quiet`."""

    def __init__(self, quiet: bool = False, stream: IO[str] | None = None):
        self.quiet = quiet
        self.stream = stream

    def _out(self) -> IO[str]:
        return self.stream if self.stream is not None else sys.stderr

    def info(self, message: str) -> None:
        if not self.quiet:
            print(f"jaxou: {message}", file=self._out(), flush=True)

    def warn(self, message: str) -> None:
        """Warnings are printed even when quiet."""
        print(f"jaxou: warning: {message}", file=self._out(), flush=True)

    def __call__(self, step: str) -> _Step:
        return _Step(self, step)


class _Step:
    current: "_Step | None" = None  # the step whose line is open (for warnings)

    def __init__(self, progress: Progress, step: str):
        self.progress = progress
        self.step = step
        self.broken = False  # a warning was printed inside the step's line

    def __enter__(self):
        self.t0 = time.perf_counter()
        if not self.progress.quiet:
            print(f"jaxou: {self.step} ...", end="", file=self.progress._out(), flush=True)
            _Step.current = self
        return self

    def __exit__(self, exc_type, exc, tb):
        if _Step.current is self:
            _Step.current = None
        if not self.progress.quiet:
            status = "done" if exc_type is None else "failed"
            dt = time.perf_counter() - self.t0
            again = f"jaxou: {self.step} ..." if self.broken else ""
            print(f"{again} {status} ({dt:.1f} s)", file=self.progress._out(), flush=True)
        return False


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` of the command line: `jaxou: warning: ...` on a line
    of its own (ending an open progress line first), without the source line that
    Python's default shows (the console script's `sys.exit(main())`)."""
    step = _Step.current
    if step is not None and not step.broken:
        print(file=step.progress._out(), flush=True)
        step.broken = True
    print(f"jaxou: warning: {_one_line(str(message))}", file=sys.stderr, flush=True)


def check_output_dir(path: str) -> None:
    """Raise a ConfigError now (before any work) if `path` cannot become an
    output directory: it is a file, or its nearest existing ancestor is not a
    writable directory."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"output.dir {path!r} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"output.dir {path!r} is not writable")
        return
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"output.dir {path!r} cannot be created ({parent!r} is not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir {path!r} cannot be created ({parent!r} is not writable)")


def write_atomic(path: str, write: Callable[[IO[bytes]], None] | bytes) -> None:
    """Write a file atomically: into a temporary file in the same directory, then
    `os.replace` onto `path`. A reader never sees half a file, and a failure
    leaves the previous file untouched. `write` is the bytes, or a function that
    writes into a binary file object."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, bytes):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def jsonable(x: Any) -> Any:
    """Plain JSON values: NumPy/JAX scalars become floats, ints, bools; arrays
    become lists; non-finite floats become the strings "inf", "-inf", "nan" (so
    the output is strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if x is None or isinstance(x, (str, bool)):
        return x
    if hasattr(x, "shape") and getattr(x, "shape", ()) != ():
        import numpy as np

        return jsonable(np.asarray(x).tolist())
    if hasattr(x, "dtype"):
        import numpy as np

        x = np.asarray(x).item()
        if isinstance(x, bool):
            return x
    if isinstance(x, int):
        return x
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
