"""The registry's storage failing under a commit: a full disk, and a filesystem turning read-only between
staging and commit. Either way the error says why, and no partial version is ever visible.

A real filesystem fails here (a small tmpfs mounted for the test: that needs root, as on the CI machine;
elsewhere the test is skipped, and under CI=true it fails instead)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.runtime.package.registry import Registry, StagingArea


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("mounting a tmpfs needs root; CI runs as root")
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "store"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _package(model: bytes):  # noqa: ANN202
    def writer(area: StagingArea) -> dict[str, Any]:
        area.write_bytes("model.pt", model)
        for name in ("transforms.json", "schema.json", "profile.json", "metrics.json", "lineage.json"):
            area.write_json(name, {})
        return {"task": "classification", "architecture": "mlp"}

    return writer


def _visible_versions(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "m").iterdir() if not p.name.startswith("."))


def test_full_disk_commits_nothing_and_says_so(small_fs: Path) -> None:
    reg = Registry(f"file://{small_fs}", "m")
    assert reg.register(_package(b"w" * 1024)) == "v1"
    with pytest.raises(OSError, match="No space left on device"):
        reg.register(_package(b"w" * (1024 * 1024)))  # four times the filesystem
    assert reg.versions() == ["v1"]
    assert _visible_versions(small_fs) == ["v1"]
    assert reg.versions(verify=True) == ["v1"]  # the committed version is intact (sizes and checksums)


def test_storage_turning_read_only_mid_commit_commits_nothing(small_fs: Path) -> None:
    reg = Registry(f"file://{small_fs}", "m")
    model = _package(b"w" * 1024)

    def then_read_only(area: StagingArea) -> dict[str, Any]:
        extra = model(area)
        subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
        return extra

    try:
        with pytest.raises(OSError, match="Read-only file system"):
            reg.register(then_read_only)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    assert reg.versions() == []
    assert _visible_versions(small_fs) == []
    assert reg.register(model) == "v1"  # once the storage is back, the next commit is whole
