"""mkdocs hooks: the parts of the site that are generated from the code at build time.

Pages hold markers (HTML comments, invisible if a hook ever fails to run):

- `<!-- jaxou:config TABLE -->`: the fields of one table of the configuration
  schema (`jaxou._config.SCHEMA`): key, type and range, default, meaning.
  `<!-- jaxou:config-rest -->` adds every table not placed by name, so that a new
  table shows up in the reference even before someone writes its introduction.
- `<!-- jaxou:cli -->`, `<!-- jaxou:cli COMMAND -->`: the `--help` text of `jaxou`
  or of a subcommand, from the real parser (`jaxou._cli.build_parser`).
- `<!-- jaxou:api-index -->`: a table of the API pages (in the order of the nav)
  and the names each one documents (its `::: jaxou.NAME` entries).
- `<!-- jaxou:experiments -->`: the registered real-data studies and their titles.
- `<!-- jaxou:example FILE -->`: a file of `examples/`, in a TOML code block.
- `<!-- jaxou:benchmark NAME -->`: `benchmarks/results/NAME.md` (headings moved
  two levels down) and its plot `NAME.png`, which `on_files` adds to the site.

Links of the form `[text](repo:PATH)` point at a file of the repository that is
not part of the site (a notebook, an example): with `repo_url` set in mkdocs.yml
they go to `REPO_URL/blob/main/PATH`, otherwise to PATH relative to the built site
(`site/` sits at the repository root). They are never validated or required, so
the build does not depend on those files.

The schema and the parser are plain Python (importing `jaxou` loads JAX, but
nothing is compiled). An unknown marker, table or subcommand, or a missing file,
stops the build with a message naming it.
"""

from __future__ import annotations

import ast
import math
import os
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLES = ROOT / "examples"
BENCH_IMG = "img/benchmarks"  # where the benchmark plots land in the site

_REPO_LINK = re.compile(r"\[([^\]]+)\]\(repo:([^)\s]+)\)")
_MARKER = re.compile(r"^<!--\s*jaxou:([a-z-]+)(?:\s+(\S+))?\s*-->[ \t]*$", re.MULTILINE)


def _jaxou():
    """Import the package from this checkout (not an installed copy elsewhere)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import jaxou._cli as cli
    import jaxou._config as config

    return config, cli


# ---------------------------------------------------------------------------
# Configuration reference.


def _literal(value) -> str:
    """A value as it is written in TOML."""
    if value is None:
        return "*unset*"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, float):
        if math.isinf(value):
            return "`inf`"
        return f"`{value:g}`" if abs(value) < 1e6 else f"`{value:.0e}`"
    if isinstance(value, int):
        return f"`{value:_}`" if abs(value) >= 10_000 else f"`{value}`"
    return f"`{value!r}`"


_KIND = {
    "int": "integer",
    "float": "float",
    "duration": "float ≥ 0 or `inf`",
    "str": "string",
    "bool": "boolean",
    "vector": "array `[d]`",
    "matrix": "array `[d, d]`, symmetric",
}


def _type(spec) -> str:
    words = [_KIND.get(spec.kind, spec.kind)]
    for attr, sym in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
        bound = getattr(spec, attr)
        if bound is not None:
            words.append(f"{sym} {bound:g}")
    if spec.choices:
        words = ["one of " + ", ".join(f'`"{c}"`' for c in spec.choices)]
    if spec.definite == "pd":
        words.append("positive definite")
    elif spec.definite == "psd":
        words.append("positive semi-definite")
    return ", ".join(words)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _config_table(name: str, fields) -> str:
    rows = [
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for key, spec in fields.items():
        meaning = spec.help
        if spec.replaces:
            meaning += "; replaces " + ", ".join(f"`{name}.{r}`" for r in spec.replaces)
        anchor = f'<span id="{name}.{key}"></span>'
        rows.append(
            f"| {anchor}`{name}.{key}` | {_cell(_type(spec))} | {_literal(spec.default)} "
            f"| {_cell(meaning)} |"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------------------
# Command line.


def _cli_help(command: str | None) -> str:
    _, cli = _jaxou()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "90"  # argparse wraps at the terminal width: fix it
    try:
        parser = cli.build_parser()
        if command is None:
            text = parser.format_help()
        else:
            if command not in cli.COMMANDS:
                raise PluginError(f"docs: unknown jaxou subcommand {command!r} in a cli marker")
            sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
            text = sub.choices[command].format_help()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "```text\n" + text.rstrip() + "\n```"


def _experiments() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from jaxou.experiments import EXPERIMENTS  # a dict of module names, no JAX

    rows = ["| study | what it is |", "|---|---|"]
    for name, module in EXPERIMENTS.items():
        path = ROOT / (module.replace(".", "/") + ".py")
        title = name
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (
                isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "TITLE" for t in node.targets)
                and isinstance(node.value, ast.Constant)
            ):
                title = node.value.value
        rows.append(f"| `{name}` | {_cell(title)} |")
    return "\n".join(rows)


def _nav_pages(nav) -> list[str]:
    out: list[str] = []
    for item in nav or []:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                out.extend(_nav_pages([value]) if isinstance(value, str) else _nav_pages(value))
    return out


_API_ENTRY = re.compile(r"^:::\s*jaxou\.([A-Za-z_][A-Za-z0-9_]*)\s*$", re.MULTILINE)


def _api_index(page, config) -> str:
    docs = Path(config["docs_dir"])
    here = page.file.src_uri
    rows = ["| page | names |", "|---|---|"]
    for src in _nav_pages(config["nav"]):
        if not src.startswith("api/") or src == here:
            continue
        text = (docs / src).read_text(encoding="utf-8")
        title = re.search(r"^#\s+(.+)$", text, re.MULTILINE)
        names = _API_ENTRY.findall(text)
        link = os.path.relpath(src, os.path.dirname(here) or ".").replace(os.sep, "/")
        refs = ", ".join(f"[`{n}`][jaxou.{n}]" for n in names)
        rows.append(f"| [{title.group(1) if title else src}]({link}) | {refs} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------
# Files from outside docs/.


def _example(name: str) -> str:
    path = EXAMPLES / name
    if not path.is_file():
        raise PluginError(f"docs: examples/{name} does not exist (example marker)")
    return "```toml\n" + path.read_text(encoding="utf-8").rstrip() + "\n```"


def _benchmark(name: str, page) -> str:
    md = RESULTS / f"{name}.md"
    if not md.is_file():
        raise PluginError(f"docs: benchmarks/results/{name}.md does not exist (benchmark marker)")
    text = md.read_text(encoding="utf-8")
    # Two levels down: each result file sits under its own section of the page.
    text = re.sub(r"^(#{1,4}) ", r"##\1 ", text, flags=re.MULTILINE)
    if (RESULTS / f"{name}.png").is_file():
        here = os.path.dirname(page.file.src_uri) or "."
        src = os.path.relpath(f"{BENCH_IMG}/{name}.png", here).replace(os.sep, "/")
        text += f"\n\n![{name} benchmark plot]({src})\n"
    return text


# ---------------------------------------------------------------------------
# Hooks.


def on_files(files: Files, config) -> Files:
    """Add the benchmark plots to the site, straight from benchmarks/results/."""
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"{BENCH_IMG}/{png.name}", abs_src_path=str(png)))
    return files


def _repo_links(markdown: str, page, config) -> str:
    repo_url = (config.get("repo_url") or "").rstrip("/")
    if repo_url:
        base = f"{repo_url}/blob/main/"
    else:
        # page.url is "guides/x/" (directory URLs) or "guides/x.html": one "../" per
        # "/" climbs to the site root, and one more to the repository root, which
        # holds site/.
        base = "../" * (page.url.count("/") + 1)

    def link(match: re.Match) -> str:
        text, path = match.group(1), match.group(2)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        return f'<a href="{base}{path}">{text}</a>'

    return _REPO_LINK.sub(link, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = _repo_links(markdown, page, config)
    if "jaxou:" not in markdown:
        return markdown
    schema = None
    placed: set[str] = set()

    def replace(match: re.Match) -> str:
        nonlocal schema
        kind, arg = match.group(1), match.group(2)
        if kind in ("config", "config-rest"):
            if schema is None:
                schema = _jaxou()[0].SCHEMA
            if kind == "config":
                if arg not in schema:
                    raise PluginError(
                        f"docs: {page.file.src_uri}: no config table [{arg}] in the schema"
                    )
                placed.add(arg)
                return _config_table(arg, schema[arg])
            rest = [t for t in schema if t not in placed]
            return "\n\n".join(f"## `[{t}]`\n\n{_config_table(t, schema[t])}" for t in rest)
        if kind == "cli":
            return _cli_help(arg)
        if kind == "api-index":
            return _api_index(page, config)
        if kind == "experiments":
            return _experiments()
        if kind == "example" and arg:
            return _example(arg)
        if kind == "benchmark" and arg:
            return _benchmark(arg, page)
        raise PluginError(f"docs: {page.file.src_uri}: unknown marker {match.group(0)!r}")

    return _MARKER.sub(replace, markdown)
