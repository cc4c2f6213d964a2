"""A Griffe extension that smooths two Markdown habits of jaxou's docstrings.

The docstrings are read as Markdown (they are not Google or NumPy style). Two
constructs read well as plain text but not as Python-Markdown + arithmatex:

1. Display math in the middle of a paragraph or list item, `text: $$x$$`:
   arithmatex only treats `$$ ... $$` as display math when it forms a block of its
   own, so inside a paragraph the outer `$` would show literally. It becomes inline
   math in display style, `$\\displaystyle x$`.
2. A list that starts right under a paragraph line, with no blank line between:
   Python-Markdown then reads `- item` as text. A blank line is inserted.

Nothing else is touched, and fenced code is left alone. The docs build is strict,
and `tests/test_docs.py` checks that no stray `$` survives in the rendered pages.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_FENCE = re.compile(r"^\s*(```|~~~)")
_LIST_ITEM = re.compile(r"^([-*+]|\d+[.)])\s")
_DOLLAR = re.compile(r"(?<!\\)\$\$?")  # `$$` opens or closes once
_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.DOTALL)


def _display_math_inline(paragraph: str) -> str:
    """`$$x$$` that is not a block of its own -> `$\\displaystyle x$`."""
    text = paragraph.strip()
    if text.startswith("$$") and text.endswith("$$") and text.count("$$") == 2:
        return paragraph  # a display block: arithmatex handles it
    return _DISPLAY.sub(lambda m: "$\\displaystyle " + m.group(1).strip() + "$", paragraph)


def normalise(doc: str) -> str:
    """Apply both rules to a docstring (idempotent)."""
    # Split into fenced code and prose; only the prose is changed.
    pieces: list[tuple[bool, list[str]]] = []
    in_fence = False
    for line in doc.split("\n"):
        if _FENCE.match(line):
            if not in_fence:
                pieces.append((True, [line]))
                in_fence = True
            else:
                pieces[-1][1].append(line)
                in_fence = False
            continue
        if in_fence:
            pieces[-1][1].append(line)
        elif pieces and not pieces[-1][0]:
            pieces[-1][1].append(line)
        else:
            pieces.append((False, [line]))
    out: list[str] = []
    for is_code, lines in pieces:
        if is_code:
            out.extend(lines)
            continue
        # Rule 2: a top-level list item right under a top-level prose line.
        # A line inside an open `$...$` (a formula broken over lines, say
        # `- 2\,\mathrm{tr}...`) is math, not a list item.
        fixed: list[str] = []
        dollars = 0  # unescaped `$` seen so far in the current paragraph
        for line in lines:
            prev = fixed[-1] if fixed else ""
            if not line.strip():
                dollars = 0
            elif (
                _LIST_ITEM.match(line)
                and dollars % 2 == 0
                and prev.strip()
                and not prev[:1].isspace()
                and not _LIST_ITEM.match(prev)
            ):
                fixed.append("")
            dollars += len(_DOLLAR.findall(line))
            fixed.append(line)
        # Rule 1, paragraph by paragraph (blank-line separated).
        text = "\n".join(fixed)
        parts = re.split(r"(\n[ \t]*\n)", text)
        out.append("".join(p if i % 2 else _display_math_inline(p) for i, p in enumerate(parts)))
    return "\n".join(out)


class MarkdownDocstrings(griffe.Extension):
    """Normalise every docstring Griffe loads (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = normalise(obj.docstring.value)
