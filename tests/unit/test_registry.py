"""The model registry: atomic, immutable versions; partial or corrupt directories never count."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.runtime.package.features import FeatureSchema, fit_transforms
from conveyor.runtime.package.registry import PackageError, Registry, StagingArea, open_package


def _writer(tag: str, transforms: dict | None = None):
    """A package whose files are real JSON (the registry never parses model.pt)."""

    def write(area: StagingArea) -> dict:
        area.write_bytes("model.pt", f"weights of {tag}".encode() * 100)
        area.write_json(
            "transforms.json", transforms or {"formatVersion": 1, "kind": "tabular", "features": []}
        )
        area.write_json("schema.json", {"kind": "tabular", "features": [], "task": "classification"})
        area.write_json("profile.json", {"rows": 10, "features": {}})
        area.write_json("metrics.json", {"accuracy": 0.9, "tag": tag})
        area.write_json("lineage.json", {"run": tag})
        return {"task": "classification", "architecture": "mlp"}

    return write


def test_versions_are_numbered_in_order_and_readable(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path), "fraud")
    assert reg.versions() == [] and reg.latest() is None
    assert reg.register(_writer("a")) == "v1"
    assert reg.register(_writer("b")) == "v2"
    assert reg.versions() == ["v1", "v2"] and reg.latest() == "v2"

    meta = reg.read_metadata("v1")
    assert meta["version"] == "v1" and meta["model"] == "fraud"
    assert meta["metrics"]["tag"] == "a" and meta["lineage"]["run"] == "a"
    assert meta["architecture"] == "mlp" and meta["uri"] == f"{tmp_path}/fraud/v1"
    assert reg.read_metadata("latest")["metrics"]["tag"] == "b"
    # Nothing is left behind in staging.
    assert sorted(p.name for p in (tmp_path / "fraud").iterdir()) == ["v1", "v2"]


def test_file_uri_and_package_round_trip(tmp_path: Path) -> None:
    reg = Registry(f"file://{tmp_path}", "digits")
    version = reg.register(_writer("a"))
    pkg = open_package(reg.package_uri(version))
    assert pkg.version == "v1" and pkg.metrics["tag"] == "a" and pkg.task == "classification"
    assert pkg.manifest["files"].keys() >= {"model.pt", "schema.json", "transforms.json"}


def test_existing_version_is_never_overwritten(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path), "m")
    reg.register(_writer("first"))
    before = (tmp_path / "m" / "v1" / "metrics.json").read_bytes()
    # Even a directory that is NOT a committed version keeps its number: the next commit skips it.
    (tmp_path / "m" / "v2").mkdir()
    (tmp_path / "m" / "v2" / "stray.txt").write_text("someone else's partial write")
    assert reg.register(_writer("second")) == "v3"
    assert (tmp_path / "m" / "v1" / "metrics.json").read_bytes() == before
    assert (tmp_path / "m" / "v2" / "stray.txt").exists()
    assert reg.versions() == ["v1", "v3"]


def test_writer_failure_commits_nothing(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path), "m")

    def broken(area: StagingArea) -> None:
        area.write_bytes("model.pt", b"x")
        raise RuntimeError("evaluation crashed")

    with pytest.raises(RuntimeError, match="evaluation crashed"):
        reg.register(broken)

    def incomplete(area: StagingArea) -> None:
        area.write_bytes("model.pt", b"x")

    with pytest.raises(PackageError, match="missing"):
        reg.register(incomplete)
    assert reg.versions() == []
    assert list((tmp_path / "m").iterdir()) == []


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / "package.json").unlink(), "no package.json"),
        (lambda d: (d / "package.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "model.pt").unlink(), "model.pt is missing"),
        (lambda d: (d / "model.pt").write_bytes((d / "model.pt").read_bytes()[:10]), "partial write"),
        (
            lambda d: (d / "model.pt").write_bytes(b"X" + (d / "model.pt").read_bytes()[1:]),
            "does not match its sha256",
        ),
        (
            lambda d: (d / "package.json").write_text(
                json.dumps({**json.loads((d / "package.json").read_text()), "version": "v7"})
            ),
            "names version 'v7'",
        ),
    ],
    ids=["no-manifest", "bad-manifest", "missing-file", "truncated-file", "flipped-byte", "wrong-version"],
)
def test_partial_or_corrupt_version_is_not_committed(tmp_path: Path, damage, reason: str) -> None:
    reg = Registry(str(tmp_path), "m")
    reg.register(_writer("good"))
    reg.register(_writer("victim"))
    assert reg.versions() == ["v1", "v2"]  # also fills the verification cache
    damage(tmp_path / "m" / "v2")

    assert reg.versions() == ["v1"]
    assert reg.latest() == "v1"
    with pytest.raises(PackageError, match=reason) as err:
        open_package(reg.package_uri("v2"))
    assert str(tmp_path / "m" / "v2") in str(err.value)
    with pytest.raises(PackageError):
        reg.read_metadata("v2")


def test_staging_directory_is_not_a_version(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path), "m")
    staging = tmp_path / "m" / ".staging-crashed"
    staging.mkdir(parents=True)
    (staging / "model.pt").write_bytes(b"half")
    assert reg.versions() == []
    assert reg.register(_writer("a")) == "v1"


def test_bad_names_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="modelName"):
        Registry(str(tmp_path), "../escape")
    reg = Registry(str(tmp_path), "m")
    with pytest.raises(PackageError, match="no committed version"):
        reg.read_metadata("latest")
    with pytest.raises(PackageError, match="must be 'latest' or v<N>"):
        reg.read_metadata("7")


def _register_many(root: str, tag: str, count: int, barrier) -> list[str]:
    reg = Registry(root, "race")
    barrier.wait(timeout=60)
    return [reg.register(_writer(f"{tag}-{i}")) for i in range(count)]


def test_concurrent_registration_gets_distinct_versions(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            results = [
                pool.apply_async(_register_many, (str(tmp_path), tag, 8, barrier)) for tag in ("a", "b")
            ]
            got = [r.get(timeout=120) for r in results]
    all_versions = got[0] + got[1]
    assert len(set(all_versions)) == 16, got
    reg = Registry(str(tmp_path), "race")
    assert reg.versions() == [f"v{n}" for n in range(1, 17)]
    # Each version holds exactly the package its writer wrote (no mixing of files between writers).
    for tag, versions in zip(("a", "b"), got, strict=True):
        for i, v in enumerate(versions):
            assert reg.read_metadata(v)["metrics"]["tag"] == f"{tag}-{i}"


def test_object_store_path_uses_create_if_absent(tmp_path: Path) -> None:
    # fsspec's in-memory filesystem has no rename: the registry claims v<N> with an exclusive marker.
    reg = Registry("memory://conveyor-test-registry", "m")
    try:
        reg.fs.makedirs(reg.model_path + "/v1", exist_ok=True)
        reg.fs.pipe_file(reg.model_path + "/v1/.claim", b"another writer")
        assert reg.register(_writer("a")) == "v2"
        assert reg.versions() == ["v2"]
        assert open_package(reg.package_uri("v2")).metrics["tag"] == "a"
    finally:
        reg.fs.rm(reg.model_path, recursive=True)


def test_transforms_round_trip_through_the_registry(tmp_path: Path) -> None:
    rows = [{"amount": float(i), "kind": "ab"[i % 2]} for i in range(20)]
    feats = [FeatureSchema("amount", "float"), FeatureSchema("kind", "string")]
    fitted = fit_transforms(
        rows, feats, [{"type": "standardize", "columns": ["amount"]}, {"type": "oneHot", "columns": ["kind"]}]
    )
    reg = Registry(str(tmp_path), "m")
    version = reg.register(_writer("t", fitted.to_json()))
    loaded = open_package(reg.package_uri(version)).transforms
    probe = [{"amount": 3.5, "kind": "b"}, {"amount": -1.0, "kind": "zzz"}]
    assert loaded.output_columns == fitted.output_columns
    assert (loaded.apply(probe) == fitted.apply(probe)).all()


def test_read_metadata_needs_no_torch(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path), "m")
    reg.register(_writer("a"))
    code = (
        "import sys; from conveyor.runtime.package.registry import Registry; "
        f"m = Registry({str(tmp_path)!r}, 'm').read_metadata('latest'); "
        "assert m['metrics']['tag'] == 'a'; "
        "heavy = [k for k in ('torch', 'ray', 'pandas') if k in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_run_records_are_written_whole_and_replaced_by_a_retry(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path), "fraud")
    assert reg.read_run_record("ml", "fraud", 1) is None
    reg.write_run_record("ml", "fraud", 1, {"outcome": "Failed", "message": "attempt 1"})
    reg.write_run_record("ml", "fraud", 1, {"outcome": "Registered", "version": "v1"})
    record = reg.read_run_record("ml", "fraud", 1)
    assert record == {"outcome": "Registered", "version": "v1", "namespace": "ml", "pipeline": "fraud", "run": 1}
    assert reg.read_run_record("ml", "fraud", 2) is None and reg.read_run_record("other", "fraud", 1) is None
    # Written aside then renamed: no temporary file is left, and records never count as versions.
    assert [p.name for p in (tmp_path / "fraud" / ".runs").iterdir()] == ["ml.fraud-1.json"]
    assert reg.versions() == []


def test_a_rejected_version_is_never_latest(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path), "fraud")
    reg.register(_writer("a"))
    reg.register(_writer("b"))
    reg.reject("v2", "accuracy=0.5 is below the threshold 0.9")
    assert reg.latest() == "v1" and reg.resolve("latest") == "v1"
    assert reg.rejected() == {"v2": "accuracy=0.5 is below the threshold 0.9"}
    # Still there to read (lineage, a person's comparison), just never chosen by `latest`.
    assert reg.versions() == ["v1", "v2"] and reg.read_metadata("v2")["metrics"]["tag"] == "b"
    assert reg.register(_writer("c")) == "v3" and reg.latest() == "v3"
    reg.reject("v1", "x")
    reg.reject("v3", "y")
    with pytest.raises(PackageError):
        reg.resolve("latest")


def test_feedback_parts_are_appended_whole_and_read_back_in_order(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path), "fraud")
    assert reg.read_feedback() == []
    reg.append_feedback("v1", [{"id": "a", "label": "1", "inputs": {"amount": 3.5}}])
    reg.append_feedback("v1", [{"id": "b", "label": "0"}, {"id": "b", "label": "1"}])
    reg.append_feedback("v2", [{"id": "c", "label": "0"}])
    assert [r["id"] for r in reg.read_feedback(["v1"])] == ["a", "b", "b"]
    assert [r["id"] for r in reg.read_feedback()] == ["a", "b", "b", "c"]
    assert reg.read_feedback(["v1"])[0]["inputs"] == {"amount": 3.5}
    parts = list((tmp_path / "fraud" / ".feedback" / "v1").iterdir())
    assert len(parts) == 2 and all(p.suffix == ".jsonl" for p in parts)  # no temporary file left behind
    assert reg.versions() == []
