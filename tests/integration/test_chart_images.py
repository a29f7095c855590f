"""The operator image's install step, done for real outside Docker (Docker cannot run here).

docker/operator.Dockerfile copies pyproject.toml, README.md, operator/ and runtime/ and runs
`pip install .` without the runtime extra. This test does the same in a fresh virtual environment
and checks that the operator starts from it: its CLI parses the chart's arguments and importing it
pulls in neither torch nor Ray (which the operator image does not carry).

The dependencies come from a wheel cache (``~/.cache/conveyor/wheels/operator-image``) with the index
switched off, as a build with a warm cache would; when the cache cannot satisfy the install (first run,
or pyproject.toml asks for something it lacks), it is filled again from the index (``pip wheel``) and the
install repeated. Resolving and downloading from the index on every run took about a minute of the
suite's time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
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


WHEELS = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "conveyor"
    / "wheels"
    / "operator-image"
)


def fill_wheel_cache(python: Path, context: Path, target: str) -> None:
    """WHEELS from the index: every wheel the install of ``target`` needs, and the build backend that
    pyproject.toml names (pip builds the project itself in an isolated environment, from WHEELS too)."""
    backend = tomllib.loads((context / "pyproject.toml").read_text())["build-system"]["requires"]
    WHEELS.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=".fill-", dir=WHEELS.parent))
    done = subprocess.run(
        [str(python), "-m", "pip", "wheel", "-q", "--wheel-dir", str(fresh), target, *backend],
        cwd=context, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    for own in fresh.glob("conveyor-*.whl"):  # the project is always installed from the copied sources
        own.unlink()
    shutil.rmtree(WHEELS, ignore_errors=True)
    fresh.rename(WHEELS)


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
    install = re.search(
        r'/opt/conveyor/bin/pip install (.*?) "?(\.(?:\[[a-z0-9,]+\])?)"?(?: |$)',
        DOCKERFILE.read_text(),
        re.M,
    )
    assert install, "the Dockerfile's pip install line changed: update this test"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"

    def pip_install() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEELS),
             *install.group(1).split(), install.group(2)],
            cwd=context, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip

    done = pip_install() if WHEELS.is_dir() else None
    if done is None or done.returncode != 0:
        fill_wheel_cache(python, context, install.group(2))
        done = pip_install()
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
    done = subprocess.run(
        [str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-4000:]
    done = subprocess.run(
        [str(python), "-m", "conveyor.operator", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "--namespace" in done.stdout, done.stderr[-4000:]
