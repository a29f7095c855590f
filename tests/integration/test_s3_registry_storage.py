"""The registry on a real S3 API (versitygw, hack/s3.sh's server): versions committed by another process
(a training pod) become visible to a long-lived reader (the operator), and a reader with the wrong
credentials gets the storage's refusal, not an empty registry."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hack" / "devstack"))

from conveyor_devstack.s3 import S3Error, S3Server  # noqa: E402 - the development stand-ins live under hack/

from conveyor.operator.controller.validation import validate_registry  # noqa: E402
from conveyor.runtime.package.registry import Registry  # noqa: E402

BUCKET = "models"

# A training pod's part, in its own process: commit one version (files are real JSON; model.pt is opaque).
REGISTER = """
import sys
from conveyor.runtime.package.registry import Registry

def write(area):
    area.write_bytes("model.pt", b"weights" * 100)
    area.write_json("transforms.json", {"formatVersion": 1, "kind": "tabular", "features": []})
    area.write_json("schema.json", {"kind": "tabular", "features": [], "task": "classification"})
    area.write_json("profile.json", {"rows": 10, "features": {}})
    area.write_json("metrics.json", {"accuracy": 0.9})
    area.write_json("lineage.json", {"run": 1})
    return {"task": "classification", "architecture": "mlp"}

print(Registry(sys.argv[1], "fraud").register(write))
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        server = S3Server.start(tmp_path_factory.mktemp("s3"))
    except S3Error as e:
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return s3.env()


def _register(uri: str, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-c", REGISTER, uri], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_a_long_lived_reader_sees_versions_committed_after_it_looked(s3_env, request) -> None:
    uri = f"s3://{BUCKET}/{request.node.name}"
    reader = Registry(uri, "fraud")
    assert reader.versions() == [] and reader.latest() is None
    assert _register(uri, s3_env) == "v1"
    assert reader.versions() == ["v1"]
    assert _register(uri, s3_env) == "v2"
    assert reader.versions() == ["v1", "v2"] and reader.latest() == "v2"
    assert reader.read_metadata("v2")["uri"] == f"{uri}/fraud/v2"


def test_wrong_credentials_are_named_not_taken_for_an_empty_registry(s3_env, request, monkeypatch) -> None:
    uri = f"s3://{BUCKET}/{request.node.name}"
    _register(uri, s3_env)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a new process, as far as credentials go
    try:
        message = validate_registry(Registry, uri, "fraud", "spec.registry.uri")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert message is not None and message.startswith("spec.registry.uri: the operator cannot read")
    assert "PermissionError" in message and "signature" in message
