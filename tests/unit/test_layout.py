"""The import layout: `conveyor.operator` lives in operator/, and nothing shadows the standard library's
`operator`, even for a `python -m ...` started from the repository root (where the cwd is on sys.path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_in_root(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_stdlib_operator_is_not_shadowed_from_the_repo_root() -> None:
    origin = _run_in_root("import operator, sys; print(operator.__file__); assert operator.eq(1, 1)")
    assert not origin.startswith(str(ROOT)), origin


def test_conveyor_packages_import_from_their_folders() -> None:
    out = _run_in_root(
        "import conveyor.operator, conveyor.runtime.spec as s; "
        "print(list(conveyor.operator.__path__)[0]); print(s.__file__)"
    )
    operator_path, spec_path = out.splitlines()
    assert Path(operator_path) == ROOT / "operator"
    assert Path(spec_path) == ROOT / "runtime" / "spec.py"


def test_python_dash_m_works_from_the_repo_root() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_operator_import_closure_has_no_torch_ray_or_kserve() -> None:
    # Every module under operator/ (found by walking the folder, so new ones are covered), plus the
    # torch-free runtime parts the operator imports: none may pull in the training or serving stack.
    code = (
        "import importlib, pkgutil, sys\n"
        "import conveyor.operator as op\n"
        "names = [m.name for m in pkgutil.walk_packages(op.__path__, 'conveyor.operator.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "import conveyor.runtime.spec, conveyor.runtime.package.registry\n"
        "heavy = sorted(n for n in ('torch', 'ray', 'kserve', 'torchvision') if n in sys.modules)\n"
        "print(len(names), heavy)\n"
    )
    modules, heavy = _run_in_root(code).split(" ", 1)
    assert int(modules) > 1, "found no modules under operator/"
    assert heavy == "[]", f"the operator's import closure pulls in {heavy}"


def test_the_operator_process_does_not_load_the_kubernetes_client() -> None:
    # kopf would import the official client (~37 MiB resident) only to recognise its objects; the
    # operator talks to the API with its own client, so `python -m conveyor.operator` keeps it out.
    code = (
        "import sys\n"
        "import conveyor.operator.__main__\n"
        "import kopf\n"
        "print(sys.modules.get('kubernetes'))\n"
    )
    assert _run_in_root(code) == "None", "the operator process imported the kubernetes client"


def test_every_package_folder_ships_in_the_wheel() -> None:
    """pyproject.toml lists the packages (the folders map onto conveyor.*): a folder left out would be
    missing from the images while every test on the editable install still passed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {
        "conveyor." + str(init.parent.relative_to(ROOT)).replace("/", ".")
        for top in ("operator", "runtime")
        for init in (ROOT / top).rglob("*.py")
        if "__pycache__" not in init.parts
    }
    assert folders <= listed, sorted(folders - listed)
