"""The documentation site: it builds with `mkdocs build --strict`, the API reference
documents every public name, the configuration reference lists every schema field, the
command-line reference has every subcommand, and no math is left unrendered.

The site is built once per module (about 15 s) into a temporary directory; nothing is
written into the repository.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import jaxou

# The docs tools are in the `test` extra: a missing one is a broken install, not a skip.
for _module in ("mkdocs", "mkdocstrings_handlers.python", "material"):
    if importlib.util.find_spec(_module) is None:
        raise ImportError(f"{_module} is missing: install the test extra, pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API_ENTRY = re.compile(r"^:::\s*jaxou\.([A-Za-z_][A-Za-z0-9_]*)\s*$", re.MULTILINE)


def public_names():
    # The same definition as tests/test_api.py.
    return [
        n
        for n in dir(jaxou)
        if not n.startswith("_") and not isinstance(getattr(jaxou, n), types.ModuleType)
    ]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_jaxou_docs_{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-6000:]}"
    return out


def _page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text(encoding="utf-8")


def _article_text(page_html: str) -> str:
    """The rendered text of a page's article, without code and without math."""
    body = page_html[page_html.find("<article") : page_html.find("</article>")]
    body = re.sub(r"<(code|pre)\b[^>]*>.*?</\1>", " ", body, flags=re.S)
    body = re.sub(r'<(span|div) class="arithmatex">.*?</\1>', " ", body, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", body))


@pytest.mark.slow
def test_site_builds_strict(site):
    for page in ("", "getting-started", "theory", "cli", "configuration", "benchmarks", "api"):
        assert (site / page / "index.html").is_file(), page
    for guide in ("lyapunov", "simulate", "theory-at-scale", "large-scale", "real-training"):
        assert (site / "guides" / guide / "index.html").is_file(), guide
    # The benchmark plots are copied from benchmarks/results/ at build time.
    for png in (ROOT / "benchmarks" / "results").glob("*.png"):
        assert (site / "img" / "benchmarks" / png.name).is_file(), png.name


@pytest.mark.slow
def test_every_public_name_is_in_the_api_reference(site):
    documented: dict[str, str] = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        for name in API_ENTRY.findall(page.read_text(encoding="utf-8")):
            assert name not in documented, f"jaxou.{name} is documented twice"
            documented[name] = page.stem
    missing = sorted(set(public_names()) - set(documented))
    assert not missing, (
        f"public names missing from the API reference: {missing}; add a "
        "'::: jaxou.NAME' line to the right page of docs/api/"
    )
    stale = sorted(set(documented) - set(public_names()))
    assert not stale, f"docs/api/ documents names that jaxou does not export: {stale}"
    # And each one was rendered, with its anchor, on its page.
    for name, page in documented.items():
        where = "api" if page == "index" else f"api/{page}"
        assert f'id="jaxou.{name}"' in _page(site, where), name


@pytest.mark.slow
def test_configuration_reference_lists_every_field(site):
    from jaxou._config import SCHEMA

    page = _page(site, "configuration")
    for table, fields in SCHEMA.items():
        for key in fields:
            assert f'id="{table}.{key}"' in page, f"{table}.{key} missing from the page"


@pytest.mark.slow
def test_cli_reference_has_every_command(site):
    from jaxou._cli import COMMANDS

    text = html.unescape(_page(site, "cli"))
    assert "usage: jaxou [-h]" in text
    for command in COMMANDS:
        assert f"usage: jaxou {command} " in text, command
        assert f'id="jaxou-{command}"' in text, command


@pytest.mark.slow
def test_math_is_rendered_everywhere(site):
    """No `$` or `**` left in the prose of any page: math reached arithmatex and
    Markdown emphasis was parsed (docstrings included)."""
    bad = []
    for path in sorted(site.rglob("*.html")):
        if path.parent.name in ("search", "assets") or path.name == "404.html":
            continue
        for line in _article_text(path.read_text(encoding="utf-8")).splitlines():
            if "$" in line or "**" in line:
                bad.append(f"{path.relative_to(site)}: {line.strip()[:120]}")
    assert not bad, "unrendered Markdown or math:\n" + "\n".join(bad[:20])


def test_docstring_normaliser():
    normalise = _load("griffe_markdown").normalise
    doc = (
        "Bounds:\n\n"
        "- `a` (x):\n  $$R \\le 1 +\n  2;$$\n"
        "- `b`\n\n"
        "**Arguments:** as f, and\n- `terms`: t\n- `wrt`: w\n\n"
        "$$x = y$$\n\n"
        "$a = b\n- c$ stays\n\n"
        "```\n$$code$$\n- code\n```"
    )
    out = normalise(doc)
    assert "$\\displaystyle R \\le 1 +\n  2;$" in out  # display math inside a list item
    assert "and\n\n- `terms`" in out  # a blank line opens the list
    assert "\n$$x = y$$\n" in out  # a display block is left alone
    assert "$a = b\n- c$" in out  # a formula broken over lines is not a list
    assert out.endswith("```\n$$code$$\n- code\n```")  # code is untouched
    assert normalise(out) == out


def test_hooks_refuse_unknown_markers():
    hooks = _load("hooks")
    from mkdocs.exceptions import PluginError

    page = types.SimpleNamespace(file=types.SimpleNamespace(src_uri="x.md"), url="x/")
    config = {"repo_url": None, "docs_dir": str(DOCS), "nav": []}
    for marker in (
        "<!-- jaxou:config nosuchtable -->",
        "<!-- jaxou:cli nosuchcommand -->",
        "<!-- jaxou:benchmark nosuchbenchmark -->",
        "<!-- jaxou:nosuchmarker -->",
    ):
        with pytest.raises(PluginError):
            hooks.on_page_markdown(marker, page, config, None)
    # Repository links go to the repository, relative to the built site.
    out = hooks.on_page_markdown("[nb](repo:notebooks/quickstart.ipynb)", page, config, None)
    assert out == '<a href="../../notebooks/quickstart.ipynb">nb</a>'
