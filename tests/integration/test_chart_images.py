"""The operator image's install step, done for real outside Docker (Docker cannot run here).

docker/operator.Dockerfile copies pyproject.toml, README.md, operator/ and runtime/ and runs
`pip install .` without the runtime extra. This test does the same in a fresh virtual environment
and checks that the operator starts from it: its CLI parses the chart's arguments and importing it
pulls in neither torch nor Ray (which the operator image does not carry).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _chart_support import ROOT, one, render

pytestmark = pytest.mark.slow

DOCKERFILE = ROOT / "docker" / "operator.Dockerfile"


def copied_paths() -> list[str]:
    """The sources the Dockerfile's build stage copies (COPY <src>... <dest>, --from excluded)."""
    paths: list[str] = []
    for line in DOCKERFILE.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
            paths += [p.rstrip("/") for p in parts[1:-1]]
    return paths


def test_operator_image_install_runs_the_operator_without_torch_or_ray(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    sources = copied_paths()
    assert sorted(sources) == ["README.md", "operator", "pyproject.toml", "runtime"], sources
    for src in sources:
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, context / src, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / src, context / src)
    # The flags, then what is installed: `.` or `".[extras]"` (the operator image has the s3 and gcs extras).
    install = re.search(r'/opt/conveyor/bin/pip install (.*?) "?(\.(?:\[[a-z0-9,]+\])?)"?(?: |$)', DOCKERFILE.read_text(), re.M)
    assert install, "the Dockerfile's pip install line changed: update this test"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", *install.group(1).split(), install.group(2)],
        cwd=context, capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    container = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    probe = (
        "import sys\n"
        "from conveyor.operator.__main__ import parse_args\n"
        f"args = parse_args({container['args']!r})\n"
        "assert args.all_namespaces\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'kserve', 'torchvision') if m in sys.modules)\n"
        "assert not heavy, f'the operator imports {heavy}'\n"
        "print('ok')\n"
    )
    # Run outside the checkout, so only the installed package can be imported.
    done = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-4000:]
    done = subprocess.run([str(python), "-m", "conveyor.operator", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--namespace" in done.stdout, done.stderr[-4000:]
