"""The README is the newcomer's first page: its example runs, its links resolve, and CI
runs exactly the test command it gives."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_ten_line_example_runs():
    match = re.search(r"## Ten lines\n\n```python\n(.*?)```", README, re.S)
    assert match, "README has no '## Ten lines' python block"
    code = match.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 16
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # discrepancy, bound and a finite gradient were printed
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("KLDecomposition(") and lines[1].startswith("TwoStageBound(")
    grad = float(lines[-1])
    assert grad == grad and abs(grad) < float("inf")


def test_local_links_resolve():
    targets = re.findall(r"\]\(([^)\s]+)\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert local, "README links to nothing local"
    missing = [t for t in local if not (ROOT / t.split("#")[0]).exists()]
    assert missing == [], f"README links to missing files: {missing}"


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert len(blocks) >= 2, "README must give the set-up command and the test command"
    setup, test = blocks[0].strip(), blocks[1].strip()
    assert "jaxou run" in setup and "pip install" in setup
    assert "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test in ci.splitlines(), f"CI does not run the README's test command {test!r}"
