"""Front end: the `jaxou` configuration file (TOML), its schema and its validation.

A configuration is a TOML file with one table a concern:

```toml
[problem]   dim, seed
[init]      std, mean
[pretrain]  lr, batch_size, duration, n_samples, hessian_min_eig, hessian_max_eig,
            noise_scale, noise_power, noise_random, minimum_norm
            (or explicit: hessian = [[...]], noise_cov = [[...]], minimum = [...])
[finetune]  lr, batch_size, duration, n_samples, shift, rotation, scale, noise_scale
            (or explicit: hessian, noise_cov, minimum)
[bound]     delta, kind, empirical_risk_source, empirical_risk_target
[output]    dir, plot
[simulate]  n_paths, dt, method, seed, chunk_size        (used by `jaxou simulate`)
```

Every key is optional; what is left out takes the default below (`examples/default.toml`
spells all of them out). Everything is checked here, before any numerical work:
unknown keys (with the closest valid name suggested), types, ranges, shapes,
symmetry and definiteness of explicit matrices, and keys that contradict each
other. Each failure is one [`ConfigError`][] whose message names the field.

To extend the schema (a new subcommand's table, a new option), add a [`Field`][] to
[`SCHEMA`][] (and, for rules that relate several fields, a line to
[`_check_cross_fields`][]). Nothing else needs to change: loading, `--set`
overrides, defaults, `Config.to_dict()` and the error messages follow the schema.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ConfigError",
    "Field",
    "Section",
    "Config",
    "SCHEMA",
    "SIMULATE_METHODS",
    "BOUND_KINDS",
    "ALIASES",
    "default_config",
    "load_config",
    "parse_override",
]

SIMULATE_METHODS = ("euler", "exact", "heun", "milstein", "shark", "sra1", "sea")
BOUND_KINDS = ("mcallester", "kl")


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming the field."""


# ---------------------------------------------------------------------------
# Schema.


@dataclass(frozen=True)
class Field:
    """One configuration key.

    - `kind`: `"int"`, `"float"`, `"duration"` (a float `>= 0` or `inf`), `"str"`,
      `"bool"`, `"vector"` (`[d]`), `"matrix"` (`[d, d]`, symmetric).
    - `default`: the value when the key is absent (`None`: unset/automatic).
    - `gt`, `ge`, `lt`, `le`: bounds for numbers; `choices` for strings.
    - `definite`: for matrices, `"pd"` (positive definite) or `"psd"`.
    - `replaces`: for explicit arrays, the generative keys of the same table that
      they make meaningless (setting both is an error).
    """

    kind: str
    default: Any
    help: str
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None
    definite: str | None = None
    replaces: tuple[str, ...] = ()


def _stage_fields(
    lr: float, batch_size: int, duration: float, n_samples: int, which: str
) -> dict[str, Field]:
    return {
        "lr": Field("float", lr, f"learning rate η of {which}", gt=0),
        "batch_size": Field("int", batch_size, f"batch size B of {which}", gt=0),
        "duration": Field(
            "duration",
            duration,
            f"duration of {which} in continuous time t = lr × steps (inf: to stationarity)",
        ),
        "n_samples": Field(
            "int", n_samples, f"number of training examples of {which} (N in the bound)", ge=1
        ),
    }


def _explicit_fields(hessian_replaces: tuple, noise_replaces: tuple, min_replaces: tuple):
    return {
        "hessian": Field(
            "matrix",
            None,
            "explicit Hessian H (d × d, symmetric positive definite)",
            definite="pd",
            replaces=hessian_replaces,
        ),
        "noise_cov": Field(
            "matrix",
            None,
            "explicit per-example gradient-noise covariance C (d × d, symmetric PSD)",
            definite="psd",
            replaces=noise_replaces,
        ),
        "minimum": Field("vector", None, "explicit minimum θ* (length d)", replaces=min_replaces),
    }


SCHEMA: dict[str, dict[str, Field]] = {
    "problem": {
        "dim": Field("int", 50, "dimension d of the parameter space", ge=1),
        "seed": Field("int", 0, "seed of the random problem (eigenvectors, noise, shift)", ge=0),
    },
    "init": {
        "std": Field("float", 0.1, "σ0 of the initialisation law N(mean, σ0² I)", gt=0),
        "mean": Field("vector", None, "mean of the initialisation law (default: zeros)"),
    },
    "pretrain": {
        **_stage_fields(0.05, 128, 200.0, 1_000_000, "pre-training"),
        "hessian_min_eig": Field(
            "float", 1e-3, "smallest Hessian eigenvalue (spectrum log-spaced)", gt=0
        ),
        "hessian_max_eig": Field("float", 10.0, "largest Hessian eigenvalue", gt=0),
        "noise_scale": Field(
            "float", 1.0, "overall scale of the gradient-noise covariance C", gt=0
        ),
        "noise_power": Field(
            "float",
            0.5,
            "C = scale · (V Λ^power Vᵀ + random · PSD): power 1 makes C ∝ H "
            "(isotropic stationary law); any other power does not",
        ),
        "noise_random": Field(
            "float",
            0.2,
            "weight of the random PSD part of C, relative to the mean aligned eigenvalue",
            ge=0,
        ),
        "minimum_norm": Field(
            "float", 1.0, "norm of the pre-training minimum θ*_S (random direction)", ge=0
        ),
        **_explicit_fields(
            ("hessian_min_eig", "hessian_max_eig"),
            ("noise_scale", "noise_power", "noise_random"),
            ("minimum_norm",),
        ),
    },
    "finetune": {
        **_stage_fields(0.01, 32, 20.0, 10_000, "fine-tuning"),
        "shift": Field(
            "float", 0.3, "norm of the shift θ*_T - θ*_S of the minimum (random direction)", ge=0
        ),
        "rotation": Field(
            "float",
            0.3,
            "angle (radians) of the rotation R = expm(angle · K), K a random skew matrix of "
            "spectral norm 1; H_T = scale · R H_S Rᵀ",
            ge=0,
        ),
        "scale": Field(
            "float", 1.5, "rescaling of the target Hessian, H_T = scale · R H_S Rᵀ", gt=0
        ),
        "noise_scale": Field(
            "float", 1.0, "rescaling of the target noise covariance, C_T = scale · R C_S Rᵀ", gt=0
        ),
        **_explicit_fields(("rotation", "scale"), ("noise_scale",), ("shift",)),
    },
    "bound": {
        "delta": Field(
            "float", 0.05, "confidence: the bounds hold with probability ≥ 1 - δ", gt=0, lt=1
        ),
        "kind": Field(
            "str",
            "mcallester",
            "PAC-Bayes bound that decides the dominant stage",
            choices=BOUND_KINDS,
        ),
        "empirical_risk_source": Field(
            "float", 0.0, "empirical risk on the source sample, in [0, 1]", ge=0, le=1
        ),
        "empirical_risk_target": Field(
            "float", 0.0, "empirical risk on the target sample, in [0, 1]", ge=0, le=1
        ),
    },
    "output": {
        "dir": Field("str", "results", "output directory (created if needed, never emptied)"),
        "plot": Field("bool", True, "draw stationary_laws.png"),
    },
    "simulate": {
        "n_paths": Field("int", 4096, "number of Monte Carlo paths", ge=1),
        "dt": Field("float", 0.01, "time step of the solver (continuous time)", gt=0),
        "method": Field("str", "euler", "solver", choices=SIMULATE_METHODS),
        "dtype": Field(
            "str",
            "float32",
            "precision of the simulated paths and streamed statistics (the analytic "
            "laws and the comparison are always float64); float32 is 4-5x faster",
            choices=("float32", "float64"),
        ),
        "seed": Field("int", 0, "seed of the Monte Carlo key", ge=0),
        "chunk_size": Field(
            "int", None, "paths simulated at once (default: all, or what fits)", ge=1
        ),
    },
    # Used by `jaxou sweep`. Each key is an axis of the grid (a list of values);
    # axes left out keep the value of the problem's tables. With no axis at all,
    # the default grid is fine-tuning lr × batch size × n_samples.
    "sweep": {
        "pretrain_lr": Field("vector", None, "axis: pre-training learning rates"),
        "pretrain_batch_size": Field("vector", None, "axis: pre-training batch sizes"),
        "finetune_lr": Field("vector", None, "axis: fine-tuning learning rates"),
        "finetune_batch_size": Field("vector", None, "axis: fine-tuning batch sizes"),
        "n_source": Field("vector", None, "axis: source sample sizes N_S"),
        "n_target": Field("vector", None, "axis: target sample sizes N_T"),
        "delta": Field("vector", None, "axis: confidences δ, each in (0, 1)"),
        "empirical_risk_source": Field("vector", None, "axis: source empirical risks"),
        "empirical_risk_target": Field("vector", None, "axis: target empirical risks"),
        "target_shift": Field("vector", None, "axis: norms of the shift θ*_T - θ*_S"),
        "target_hessian_scale": Field("vector", None, "axis: scales c of H_T = c H_T(base)"),
        "chunk_size": Field(
            "int", None, "grid points per chunk (one progress step, one resumable file)", ge=1
        ),
    },
}


# ---------------------------------------------------------------------------
# The validated configuration.


class Section(Mapping):
    """One validated table: attribute and mapping access (`cfg.pretrain.lr`,
    `cfg.pretrain["lr"]`); `is_set(key)` says whether the user gave the key."""

    def __init__(self, name: str, values: dict[str, Any], given: frozenset[str]):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_given", frozenset(given))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"config table [{self._name}] has no key {key!r}") from None

    def __setattr__(self, key, value):
        raise AttributeError("configuration sections are read-only")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def is_set(self, key: str) -> bool:
        return key in self._given

    def __repr__(self) -> str:
        return f"Section({self._name!r}, {self._values!r})"


@dataclass(frozen=True)
class Config:
    """A validated configuration: one [`Section`][] per table of [`SCHEMA`][]."""

    sections: dict[str, Section]
    source: str | None = None  # the file it came from, if any
    given: dict[str, dict[str, Any]] = field(default_factory=dict)  # raw user input

    def __getattr__(self, name: str) -> Section:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    def to_dict(self, *, arrays: bool = False) -> dict[str, dict[str, Any]]:
        """Plain values (for JSON); explicit arrays appear as `"<explicit d×d>"`
        unless `arrays=True`."""
        out: dict[str, dict[str, Any]] = {}
        for name, sec in self.sections.items():
            table = {}
            for key, value in sec.items():
                if isinstance(value, np.ndarray):
                    value = (
                        value.tolist()
                        if arrays
                        else f"<explicit {'×'.join(map(str, value.shape))}>"
                    )
                table[key] = value
            out[name] = table
        return out


# ---------------------------------------------------------------------------
# Value checks, one field at a time.


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"{type(value).__name__} {value!r}"


def _fmt(x: float) -> str:
    return f"{x:g}"


def _check_bounds(name: str, x: float, spec: Field) -> None:
    if spec.gt is not None and not x > spec.gt:
        raise ConfigError(f"{name} must be > {_fmt(spec.gt)}, got {_fmt(x)}")
    if spec.ge is not None and not x >= spec.ge:
        raise ConfigError(f"{name} must be >= {_fmt(spec.ge)}, got {_fmt(x)}")
    if spec.lt is not None and not x < spec.lt:
        raise ConfigError(f"{name} must be < {_fmt(spec.lt)}, got {_fmt(x)}")
    if spec.le is not None and not x <= spec.le:
        raise ConfigError(f"{name} must be <= {_fmt(spec.le)}, got {_fmt(x)}")


def _as_number(name: str, value: Any, what: str = "a number") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be {what}, got {_describe(value)}")
    return float(value)


def _as_array(name: str, value: Any, ndim: int) -> np.ndarray:
    shape_word = "a vector (an array of numbers)" if ndim == 1 else "a matrix (an array of rows)"
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be {shape_word}, got {_describe(value)}")
    rows = value if ndim == 2 else [value]
    if ndim == 2:
        for i, row in enumerate(rows):
            if not isinstance(row, list):
                raise ConfigError(f"{name} must be {shape_word}; row {i} is {_describe(row)}")
        lengths = {len(row) for row in rows}
        if len(lengths) > 1:
            raise ConfigError(f"{name} has rows of different lengths {sorted(lengths)}")
    for row in rows:
        for x in row:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise ConfigError(f"{name} must contain numbers only, found {_describe(x)}")
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 0:
        raise ConfigError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name} has non-finite entries")
    return arr


def _check_matrix(name: str, M: np.ndarray, definite: str | None) -> None:
    if M.shape[0] != M.shape[1]:
        raise ConfigError(f"{name} must be square, got {M.shape[0]}×{M.shape[1]}")
    scale = max(float(np.max(np.abs(M))), np.finfo(np.float64).tiny)
    asym = float(np.max(np.abs(M - M.T)))
    if asym > 1e-10 * scale:
        raise ConfigError(f"{name} is not symmetric (max |M - Mᵀ| = {asym:.3g})")
    lam = np.linalg.eigvalsh(0.5 * (M + M.T))
    if definite == "pd" and not lam[0] > 0:
        raise ConfigError(
            f"{name} is not positive definite (smallest eigenvalue {lam[0]:.3g}); "
            "the loss must be strictly convex at the minimum"
        )
    if definite == "psd" and lam[0] < -1e-12 * M.shape[0] * scale:
        raise ConfigError(
            f"{name} is not positive semi-definite (smallest eigenvalue {lam[0]:.3g})"
        )


def _check_value(name: str, value: Any, spec: Field) -> Any:
    """Check one user value against its field; return the normalised value."""
    kind = spec.kind
    if kind == "float":
        x = _as_number(name, value)
        if not math.isfinite(x):
            raise ConfigError(f"{name} must be finite, got {_fmt(x)}")
        _check_bounds(name, x, spec)
        return x
    if kind == "duration":
        if isinstance(value, str) and value.strip().lower() in ("inf", "infinity", "+inf"):
            value = math.inf
        x = _as_number(name, value, 'a number >= 0 or inf (TOML: inf, or "inf")')
        if math.isnan(x) or x < 0:
            raise ConfigError(f"{name} must be >= 0 or inf, got {_fmt(x)}")
        return x
    if kind == "int":
        x = _as_number(name, value, "an integer")
        if not math.isfinite(x) or x != int(x):
            raise ConfigError(f"{name} must be an integer, got {_fmt(x)}")
        _check_bounds(name, x, spec)
        return int(x)
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {_describe(value)}")
        if spec.choices is not None and value not in spec.choices:
            close = difflib.get_close_matches(value, spec.choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{name} must be one of {', '.join(map(repr, spec.choices))}, got {value!r}{hint}"
            )
        if not value:
            raise ConfigError(f"{name} must not be empty")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {_describe(value)}")
        return value
    if kind == "vector":
        return _as_array(name, value, 1)
    if kind == "matrix":
        M = _as_array(name, value, 2)
        _check_matrix(name, M, spec.definite)
        return M
    raise AssertionError(f"unknown field kind {kind!r}")  # a schema bug, not a user error


# ---------------------------------------------------------------------------
# Rules relating several fields.


def _check_cross_fields(sections: dict[str, dict[str, Any]], given: dict[str, set]) -> None:
    # Explicit arrays against the generative keys they replace.
    for table, fields in SCHEMA.items():
        for key, spec in fields.items():
            if key in given[table]:
                for other in spec.replaces:
                    if other in given[table]:
                        raise ConfigError(
                            f"{table}.{other} cannot be combined with {table}.{key} "
                            f"(the explicit {key} replaces it); remove one of them"
                        )
    # One dimension for every explicit array.
    dims = {}
    if "dim" in given["problem"]:
        dims["problem.dim"] = sections["problem"]["dim"]
    for table, key in [
        ("init", "mean"),
        ("pretrain", "hessian"),
        ("pretrain", "noise_cov"),
        ("pretrain", "minimum"),
        ("finetune", "hessian"),
        ("finetune", "noise_cov"),
        ("finetune", "minimum"),
    ]:
        value = sections[table][key]
        if value is not None:
            dims[f"{table}.{key}"] = value.shape[0]
    if len(set(dims.values())) > 1:
        (first, d0), *rest = dims.items()
        other, d1 = next((k, v) for k, v in rest if v != d0)
        raise ConfigError(
            f"{other} has dimension {d1} but {first} is {d0}; all arrays must share one dimension"
        )
    if dims and "dim" not in given["problem"]:
        sections["problem"]["dim"] = next(iter(dims.values()))
    pre = sections["pretrain"]
    if pre["hessian"] is None and not pre["hessian_max_eig"] >= pre["hessian_min_eig"]:
        raise ConfigError(
            f"pretrain.hessian_max_eig must be >= pretrain.hessian_min_eig "
            f"({_fmt(pre['hessian_min_eig'])}), got {_fmt(pre['hessian_max_eig'])}"
        )
    if sections["output"]["dir"] is not None:
        out = sections["output"]["dir"]
        if os.path.exists(out) and not os.path.isdir(out):
            raise ConfigError(f"output.dir {out!r} exists and is not a directory")


# ---------------------------------------------------------------------------
# Loading.


# Names people reach for, mapped to ours (checked before the spelling distance).
ALIASES = {
    "learning_rate": "lr",
    "eta": "lr",
    "step_size": "lr",
    "batch": "batch_size",
    "bs": "batch_size",
    "b": "batch_size",
    "t": "duration",
    "time": "duration",
    "t_pretrain": "duration",
    "t_finetune": "duration",
    "n": "n_samples",
    "n_source": "n_samples",
    "n_target": "n_samples",
    "sigma0": "std",
    "sigma": "std",
    "d": "dim",
    "dimension": "dim",
    "h": "hessian",
    "c": "noise_cov",
    "noise": "noise_cov",
    "theta_star": "minimum",
    "min": "minimum",
    "out": "dir",
    "output_dir": "dir",
    "confidence": "delta",
    "paths": "n_paths",
    "solver": "method",
}


def _closest(word: str, candidates) -> str | None:
    candidates = list(candidates)
    alias = ALIASES.get(word.lower())
    if alias in candidates:
        return alias
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def _validate(raw: Mapping[str, Any], source: str | None) -> Config:
    if not isinstance(raw, Mapping):
        raise ConfigError("the configuration must be a TOML document of tables")
    for table, content in raw.items():
        if table not in SCHEMA:
            owners = [t for t, fields in SCHEMA.items() if table in fields]
            if owners and not isinstance(content, dict):
                raise ConfigError(
                    f"top-level key {table!r} must be inside a table (did you mean "
                    f"[{owners[0]}] {table}?)"
                )
            close = _closest(table, SCHEMA)
            hint = f" (did you mean [{close}]?)" if close else ""
            valid = ", ".join(f"[{t}]" for t in SCHEMA)
            raise ConfigError(f"unknown table [{table}]{hint}; valid tables: {valid}")
        if not isinstance(content, dict):
            raise ConfigError(f"{table} must be a table ([{table}]), got {_describe(content)}")
        for key in content:
            if key not in SCHEMA[table]:
                close = _closest(key, SCHEMA[table])
                if close is not None:
                    hint = f" (did you mean {table}.{close}?)"
                else:
                    # The key may belong to another table.
                    owners = [t for t, fields in SCHEMA.items() if key in fields]
                    valid = ", ".join(SCHEMA[table])
                    hint = (
                        f" (it belongs in {' or '.join(f'[{o}]' for o in owners)})"
                        if owners
                        else f"; valid keys of [{table}]: {valid}"
                    )
                raise ConfigError(f"unknown key {table}.{key}{hint}")
    sections: dict[str, dict[str, Any]] = {}
    given: dict[str, set] = {}
    for table, fields in SCHEMA.items():
        content = raw.get(table, {})
        values = {}
        for key, spec in fields.items():
            if key in content:
                values[key] = _check_value(f"{table}.{key}", content[key], spec)
            else:
                values[key] = spec.default
        sections[table] = values
        given[table] = set(content)
    _check_cross_fields(sections, given)
    return Config(
        {t: Section(t, v, frozenset(given[t])) for t, v in sections.items()},
        source=source,
        given={t: dict(c) for t, c in raw.items()},
    )


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(
                "reading TOML needs Python >= 3.11 or the 'tomli' package (pip install tomli)"
            ) from None
    return tomllib


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse a command-line override `table.key=value` (the value in TOML syntax;
    a bare word is taken as a string) into `(table, key, value)`."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like table.key=value")
    path, value_text = text.split("=", 1)
    path = path.strip()
    if path.count(".") != 1 or not all(path.split(".")):
        owners = [f"{t}.{path}" for t, fields in SCHEMA.items() if path in fields]
        hint = f" (e.g. {' or '.join(owners)})" if owners else ""
        raise ConfigError(
            f"override {text!r}: the key must look like table.key, got {path!r}{hint}"
        )
    table, key = path.split(".")
    tomllib = _toml()
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return table, key, value


def _merge(raw: dict, overrides) -> dict:
    merged = {t: (dict(c) if isinstance(c, dict) else c) for t, c in raw.items()}
    for table, key, value in overrides:
        current = merged.setdefault(table, {})
        if not isinstance(current, dict):
            raise ConfigError(f"cannot override {table}.{key}: {table} is not a table")
        current[key] = value
    return merged


def default_config() -> Config:
    """The embedded default problem (what `jaxou run` solves without a file)."""
    return _validate({}, None)


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[tuple[str, str, Any]] | None = None,
) -> Config:
    """Read and validate a configuration.

    **Arguments:**

    - `path`: a TOML file, or `None` for the embedded defaults.
    - `overrides`: `(table, key, value)` triples applied on top of the file (the
      command line's `--set` and `--out`), validated like the file's values.

    **Raises:** [`ConfigError`][] with a one-line message naming the field.
    """
    raw: dict = {}
    source = None
    if path is not None:
        source = os.fspath(path)
        tomllib = _toml()
        try:
            with open(source, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {source!r} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {source!r} is a directory") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {source!r}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {source!r} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source} is not valid TOML: {e}") from None
    raw = _merge(raw, overrides or [])
    return _validate(raw, source)
