"""Warnings attributed to the user's line."""

from __future__ import annotations

import sys
import warnings

__all__ = ["warn"]


def warn(message: str) -> None:
    """`warnings.warn(message, UserWarning)` at the first frame outside jaxou and
    Equinox (whose bound methods add frames), wherever in the library it is raised."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        ("jaxou.", "equinox")
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
