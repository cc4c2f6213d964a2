"""Real-data studies: measure the OU model's inputs (H, C, θ*) on a model trained with
Optax on data shipped inside a package, run real SGD over many seeds, and test the
model's predictions against it (`jaxou experiment NAME`).

Each study is a module here with `TITLE`, `DESCRIPTION` and
`run(*, quick, seeds, progress) -> (report: dict, figures: dict[name, png bytes])`;
it is registered in [`EXPERIMENTS`][].
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXPERIMENTS", "load"]

# name -> module (imported lazily, so that listing them needs neither JAX nor sklearn).
EXPERIMENTS: dict[str, str] = {
    "digits": "jaxou.experiments.digits",
    "digits-mlp": "jaxou.experiments.digits_mlp",
}


def load(name: str) -> ModuleType:
    """The module of study `name`; `KeyError` for an unknown name."""
    return importlib.import_module(EXPERIMENTS[name])
