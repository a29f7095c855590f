"""The model registry: versioned, immutable model packages under ``<registry>/<model>/v<N>/``.

Storage goes through fsspec (plain paths and ``file://`` here; ``s3://``/``gs://`` with the extras).
A version is committed atomically and never overwritten:

- everything is written under ``<model>/.staging-<uuid>/``, ``package.json`` (the manifest with the
  sha256 of every other file) last;
- on a local filesystem the staging directory is renamed to ``v<N>``; the rename fails when ``v<N>``
  already holds anything, and the writer then tries ``N+1``, so two runs registering at once get two
  versions;
- on object stores, which have no atomic rename, ``v<N>/.claim`` is created with create-if-absent
  (mode ``xb``) first; whoever creates it owns ``v<N>`` and uploads the files, ``package.json`` last.

A directory counts as a committed version only if its ``package.json`` is valid, names that version and
every file it lists is there with the recorded size and sha256. A partial or corrupt directory is
skipped by ``versions()`` and refused by ``open_package``.

Beside the versions the registry keeps small records, each one object written whole (a local file is
written under a temporary name and renamed; an object store's PUT is atomic):

- ``<model>/.runs/<namespace>.<pipeline>-<run>.json``: a training run's outcome record (``Registered``,
  ``DataValidationFailed`` or ``Failed``, the data-validation report, metrics, the version or why none),
  which the operator reads instead of log text (a real RayJob's status carries only an exit code);
- ``<model>/.rejected/<version>.json``: a version that failed the evaluation gate; ``latest`` never
  resolves to it;
- ``<model>/.feedback/<version>/part-<time>-<id>.jsonl``: ground truth sent to the predictors of that
  version (each row: request id, the inputs, the prediction, the label), append-only: every feedback
  call adds a part, written whole, so nothing is lost when a replica restarts or scales to zero;
- ``<model>/.served/<version>/<yyyymmddhh>/part-<time>-<writer>.jsonl``: the served-request log (by UTC
  hour, so a lookup lists only the newest hours), what every predictor
  process of that version answered (one line per request: ``id``, ``inputs`` (the raw rows; none for
  images), ``predictions``, ``version``, ``time``), append-only. Each process buffers its answers and
  writes one part every flush interval (``CONVEYOR_SERVED_LOG_FLUSH_S``, default 1 s), sooner when the
  buffer fills, and on shutdown; ``<time>`` (nanoseconds, zero-padded) orders the parts, ``<writer>``
  (host, pid, random) keeps processes apart. The feedback endpoint of any replica and process looks a
  request id up there when its own memory lacks it (reading the newest parts, with a bounded index),
  then in the other versions' logs (a canary's route sends feedback to either version's predictors).

Importing this module and ``Registry.read_metadata`` need no torch or ray (the operator uses them);
``ModelPackage.load_model`` imports torch when called.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from conveyor.runtime.package.features import FittedTransforms

# Version 2 added the manifest's modelKind (what the predictor loads); a version 1 package, which has
# none, holds TorchScript. Version 3 writes torch models as ``torch-export``: ``model.pt2`` (an
# ExportedProgram, torch.export.save) plus, where the model allows, ``model.onnx``. Older versions stay
# readable (a TorchScript ``model.pt`` still loads).
FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)
MANIFEST = "package.json"
# The weights' file for each model kind: torch.export (torch models), TorchScript (packages written
# before format 3, and custom models torch.export cannot take) or XGBoost's UBJSON booster.
MODEL_FILES = {"torch-export": "model.pt2", "torchscript": "model.pt", "xgboost": "model.ubj"}
# Optional beside model.pt2: the same graph for onnxruntime.
ONNX_FILE = "model.onnx"
DEFAULT_MODEL_KIND = "torchscript"  # what a package whose manifest names no modelKind holds
REQUIRED_FILES = (
    "model.pt",
    "transforms.json",
    "schema.json",
    "profile.json",
    "metrics.json",
    "lineage.json",
)


def required_files(model_kind: str = DEFAULT_MODEL_KIND) -> tuple[str, ...]:
    """The files a package of ``model_kind`` must hold (REQUIRED_FILES is a TorchScript package's)."""
    if model_kind not in MODEL_FILES:
        raise PackageError(f"modelKind {model_kind!r} is not one of {sorted(MODEL_FILES)}")
    return (MODEL_FILES[model_kind], *REQUIRED_FILES[1:])
_VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")
_MODEL_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,251}[a-z0-9])?$")
_MAX_COMMIT_ATTEMPTS = 1000

# Verified versions, keyed by where they live and the files' size/mtime, so listing versions again
# does not re-hash unchanged weights.
_verified: dict[tuple[str, str, str], dict[str, Any]] = {}


class PackageError(Exception):
    """A model package is missing, partial or corrupt, or cannot be committed; the message names the
    path and the reason."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def package_uri(registry_uri: str, model_name: str, version: str) -> str:
    """Where a version's package lives: ``<registry>/<model>/<version>`` (no storage access)."""
    return _join(registry_uri.rstrip("/"), model_name, version)


def _plain(obj: Any) -> Any:
    """JSON for numpy scalars (their Python value) and anything else (its text)."""
    item = getattr(obj, "item", None)
    return item() if callable(item) else str(obj)


def _fs_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    # No listings cache: object-store filesystems (s3fs, gcsfs) otherwise keep a folder's listing for
    # good, and a long-lived reader (the operator) would never see a version committed after it looked.
    fs, path = fsspec.core.url_to_fs(uri, use_listings_cache=False)
    return fs, path.rstrip("/") if path != "/" else path


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    p = fs.protocol
    return p if isinstance(p, str) else p[0]


def run_record_name(namespace: str, pipeline: str, run: int) -> str:
    """The name a run's outcome record is kept under (the run's checkpoint directory has the same)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{namespace}.{pipeline}-{run}")


def write_json_atomically(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """Readers see the old object or the new one, never a part (local: write aside, then rename)."""
    write_bytes_atomically(fs, path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode())


def write_bytes_atomically(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """As write_json_atomically, for any bytes."""
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)  # one PUT: object stores never show a partial object
        return
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- verification


def _fingerprint(fs: fsspec.AbstractFileSystem, path: str, names: list[str]) -> str:
    parts = []
    for name in names:
        info = fs.info(_join(path, name))
        stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created")
        parts.append(f"{name}:{info.get('size')}:{stamp}")
    return "|".join(parts)


def _check_package(fs: fsspec.AbstractFileSystem, path: str, *, deep: bool = True) -> dict[str, Any]:
    """The manifest of the committed package at ``path``; PackageError naming path and reason otherwise."""
    where = f"{_protocol(fs)}://{path}" if _protocol(fs) not in ("file", "local") else path
    try:
        raw = fs.cat_file(_join(path, MANIFEST))
    except FileNotFoundError as e:
        raise PackageError(f"{where}: no {MANIFEST}; not a committed model version") from e
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise PackageError(f"{where}: {MANIFEST} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("formatVersion") not in READABLE_FORMAT_VERSIONS:
        raise PackageError(f"{where}: {MANIFEST} formatVersion must be one of {READABLE_FORMAT_VERSIONS}")
    dirname = path.rstrip("/").rsplit("/", 1)[-1]
    if manifest.get("version") != dirname:
        raise PackageError(
            f"{where}: {MANIFEST} names version {manifest.get('version')!r}, the directory is {dirname!r}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise PackageError(f"{where}: {MANIFEST} has no files map")
    try:
        missing = [f for f in required_files(manifest.get("modelKind", DEFAULT_MODEL_KIND)) if f not in files]
    except PackageError as e:
        raise PackageError(f"{where}: {e}") from e
    if missing:
        raise PackageError(f"{where}: {MANIFEST} does not list {missing}")
    sizes = manifest.get("sizes", {})
    names = sorted(files)
    for name in names:
        p = _join(path, name)
        if not fs.exists(p):
            raise PackageError(f"{where}: {name} is missing (partial version)")
        if name in sizes and fs.size(p) != sizes[name]:
            raise PackageError(
                f"{where}: {name} is {fs.size(p)} bytes, the manifest says {sizes[name]} (partial write)"
            )
    if not deep:
        return manifest
    key = (_protocol(fs), path, _fingerprint(fs, path, [*names, MANIFEST]))
    if key in _verified:
        return _verified[key]
    for name in names:
        if _sha256(fs.cat_file(_join(path, name))) != files[name]:
            raise PackageError(f"{where}: {name} does not match its sha256 in {MANIFEST} (corrupt)")
    _verified[key] = manifest
    return manifest


# ---------------------------------------------------------------- reading


@dataclass
class ModelPackage:
    """A committed model version, its metadata loaded; the weights load on demand."""

    uri: str
    version: str
    manifest: dict[str, Any]
    schema: dict[str, Any]
    transforms: FittedTransforms
    profile: dict[str, Any]
    metrics: dict[str, Any]
    lineage: dict[str, Any]

    @property
    def task(self) -> str:
        return self.manifest.get("task") or self.schema.get("task", "classification")

    @property
    def classes(self) -> list[str] | None:
        return self.schema.get("classes")

    @property
    def model_kind(self) -> str:
        return str(self.manifest.get("modelKind", DEFAULT_MODEL_KIND))

    def read_file(self, name: str) -> bytes:
        """One file of the package, checked against its sha256 in the manifest."""
        if name not in self.manifest["files"]:
            raise PackageError(f"{self.uri}: the package has no {name}")
        fs, path = _fs_for(self.uri)
        data = fs.cat_file(_join(path, name))
        if self.manifest["files"].get(name) != _sha256(data):
            raise PackageError(f"{self.uri}: {name} does not match its sha256 in {MANIFEST} (corrupt)")
        return data

    @property
    def has_onnx(self) -> bool:
        return self.model_kind == "torch-export" and ONNX_FILE in self.manifest["files"]

    def load_model(self, device: str = "cpu") -> Any:
        """The torch module in eval mode on ``device``: the ExportedProgram's module (``torch.export.load``,
        format 3) or the TorchScript module (``torch.jit.load``, older packages); for an XGBoost package
        a ``BoosterModel`` (numpy in, probabilities or values out)."""
        data = self.read_file(MODEL_FILES[self.model_kind])
        if self.model_kind == "xgboost":
            from conveyor.runtime.package.booster import BoosterModel

            return BoosterModel.from_bytes(data, task=self.task, classes=len(self.classes or []))
        import torch

        if self.model_kind == "torch-export":
            # The exported graph was traced in eval mode (dropout off, batch-norm on running stats);
            # its module has no train/eval switch to call.
            return torch.export.load(io.BytesIO(data)).module().to(device)
        module = torch.jit.load(io.BytesIO(data), map_location=device)
        module.eval()
        return module


def _read_json(
    fs: fsspec.AbstractFileSystem, path: str, name: str, manifest: Mapping[str, Any], uri: str
) -> Any:
    data = fs.cat_file(_join(path, name))
    expected = manifest["files"].get(name)
    if expected is not None and _sha256(data) != expected:
        raise PackageError(f"{uri}: {name} does not match its sha256 in {MANIFEST} (corrupt)")
    try:
        return json.loads(data)
    except ValueError as e:
        raise PackageError(f"{uri}: {name} is not valid JSON ({e})") from e


def open_package(uri: str, *, verify: bool = True) -> ModelPackage:
    """Open the committed version at ``uri`` (``<registry>/<model>/v<N>``).

    With ``verify`` every file's sha256 is checked against the manifest. Raises PackageError naming the
    path and the reason when the version is missing, partial or corrupt.
    """
    fs, path = _fs_for(uri)
    manifest = _check_package(fs, path, deep=verify)
    try:
        transforms = FittedTransforms.from_json(_read_json(fs, path, "transforms.json", manifest, uri))
    except (KeyError, ValueError) as e:
        if isinstance(e, PackageError):
            raise
        raise PackageError(f"{uri}: transforms.json is invalid ({e})") from e
    return ModelPackage(
        uri=uri,
        version=manifest["version"],
        manifest=manifest,
        schema=_read_json(fs, path, "schema.json", manifest, uri),
        transforms=transforms,
        profile=_read_json(fs, path, "profile.json", manifest, uri),
        metrics=_read_json(fs, path, "metrics.json", manifest, uri),
        lineage=_read_json(fs, path, "lineage.json", manifest, uri),
    )


# ---------------------------------------------------------------- writing


class StagingArea:
    """Where a package's files are written before the commit; records each file's sha256 and size."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs = fs
        self.path = path
        self.files: dict[str, str] = {}
        self.sizes: dict[str, int] = {}

    def write_bytes(self, name: str, data: bytes) -> None:
        if "/" in name or name in (MANIFEST, "", ".", "..") or name.startswith("."):
            raise PackageError(f"{self.path}: {name!r} is not a file name a package may hold")
        with self.fs.open(_join(self.path, name), "wb") as f:
            f.write(data)
        self.files[name] = _sha256(data)
        self.sizes[name] = len(data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode())


StagingWriter = Callable[[StagingArea], Mapping[str, Any] | None]


class Registry:
    """The versions of one model in one registry (``<uri>/<model_name>/v<N>``)."""

    def __init__(self, uri: str, model_name: str) -> None:
        if not _MODEL_NAME_RE.match(model_name):
            raise ValueError(
                f"registry.modelName {model_name!r} must be lower-case letters, digits, '.', '_' or '-', "
                "starting and ending with a letter or digit"
            )
        self.uri = uri.rstrip("/")
        self.model_name = model_name
        self.fs, root = _fs_for(uri)
        self.model_path = _join(root, model_name)

    def package_uri(self, version: str) -> str:
        return package_uri(self.uri, self.model_name, version)

    def _version_dirs(self) -> dict[int, str]:
        """Every ``v<N>`` directory, committed or not."""
        try:
            entries = self.fs.ls(self.model_path, detail=False)
        except FileNotFoundError:
            return {}
        out = {}
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            m = _VERSION_RE.match(name)
            if m:
                out[int(m.group(1))] = name
        return out

    def versions(self, *, verify: bool = True) -> list[str]:
        """Committed versions, oldest first (``verify``: check every file's sha256, cached while unchanged)."""
        committed = []
        for _n, name in sorted(self._version_dirs().items()):
            try:
                _check_package(self.fs, _join(self.model_path, name), deep=verify)
            except (PackageError, OSError):
                continue
            committed.append(name)
        return committed

    def latest(self) -> str | None:
        """The newest committed version that was not rejected by the evaluation gate."""
        rejected = self.rejected()
        versions = [v for v in self.versions() if v not in rejected]
        return versions[-1] if versions else None

    # ---- records beside the versions (see the module docstring)

    def _record_path(self, kind: str, name: str) -> str:
        if "/" in name or name.startswith("."):
            raise PackageError(f"{name!r} is not a record name")
        return _join(self.model_path, kind, f"{name}.json")

    def _read_record(self, path: str) -> dict[str, Any] | None:
        try:
            obj = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise PackageError(f"{path}: not valid JSON ({e})") from e
        return obj if isinstance(obj, dict) else None

    def write_run_record(self, namespace: str, pipeline: str, run: int, record: Mapping[str, Any]) -> None:
        """Record a training run's outcome (replacing an earlier attempt's)."""
        body = {**record, "namespace": namespace, "pipeline": pipeline, "run": run}
        write_json_atomically(self.fs, self._record_path(".runs", run_record_name(namespace, pipeline, run)), body)

    def read_run_record(self, namespace: str, pipeline: str, run: int) -> dict[str, Any] | None:
        """The run's outcome record, or None when the run wrote none (yet)."""
        return self._read_record(self._record_path(".runs", run_record_name(namespace, pipeline, run)))

    def reject(self, version: str, reason: str) -> None:
        """Mark a version as failed by the evaluation gate: it stays readable, ``latest`` skips it."""
        if not _VERSION_RE.match(version):
            raise PackageError(f"version {version!r} must be v<N>")
        write_json_atomically(self.fs, self._record_path(".rejected", version), {"version": version, "reason": reason})

    def append_feedback(self, version: str, rows: list[Mapping[str, Any]]) -> str:
        """Add a part (JSON lines) to ``version``'s feedback dataset; returns its path."""
        if not _VERSION_RE.match(version):
            raise PackageError(f"version {version!r} must be v<N>")
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.jsonl"
        path = _join(self.model_path, ".feedback", version, name)
        body = b"".join(json.dumps(r, sort_keys=True, allow_nan=False, default=str).encode() + b"\n" for r in rows)
        write_bytes_atomically(self.fs, path, body)
        return path

    def append_served(self, version: str, writer: str, records: list[Mapping[str, Any]]) -> str:
        """Add a part (JSON lines, one request each) to ``version``'s served-request log; returns its path."""
        if not _VERSION_RE.match(version):
            raise PackageError(f"version {version!r} must be v<N>")
        now = time.time_ns()
        hour = time.strftime("%Y%m%d%H", time.gmtime(now / 1e9))
        name = f"part-{now:020d}-{re.sub(r'[^A-Za-z0-9_.-]', '-', writer)}.jsonl"
        body = b"".join(json.dumps(r, default=_plain).encode() + b"\n" for r in records)
        path = _join(self.model_path, ".served", version, hour, name)
        write_bytes_atomically(self.fs, path, body)
        return path

    def served_parts(self, version: str, newest: int = 4096) -> list[str]:
        """The ``newest`` parts of ``version``'s served-request log, oldest first (paths for
        ``read_served_part``); only the newest hours' folders are listed."""
        try:
            hours = sorted(
                e for e in self.fs.ls(_join(self.model_path, ".served", version), detail=False)
                if re.fullmatch(r"[0-9]{10}", e.rstrip("/").rsplit("/", 1)[-1])
            )
        except FileNotFoundError:
            return []
        parts: list[str] = []
        for hour in reversed(hours):
            try:
                entries = self.fs.ls(hour, detail=False)
            except FileNotFoundError:  # expired meanwhile
                continue
            found = [e for e in entries if e.rsplit("/", 1)[-1].startswith("part-") and e.endswith(".jsonl")]
            parts = sorted(found, key=lambda e: e.rsplit("/", 1)[-1]) + parts
            if len(parts) >= newest:
                break
        return parts[-newest:]

    def served_versions(self) -> list[str]:
        """The versions with a served-request log, oldest first."""
        try:
            entries = self.fs.ls(_join(self.model_path, ".served"), detail=False)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted((n for n in names if _VERSION_RE.match(n)), key=lambda n: int(n[1:]))

    def read_served_part(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.fs.cat_file(path).splitlines() if line.strip()]

    def read_feedback(self, versions: list[str] | None = None) -> list[dict[str, Any]]:
        """Every feedback row of ``versions`` (all versions when None), oldest part first."""
        root = _join(self.model_path, ".feedback")
        try:
            found = [e for e in self.fs.ls(root, detail=False) if _VERSION_RE.match(e.rstrip("/").rsplit("/", 1)[-1])]
        except FileNotFoundError:
            return []
        wanted = [e for e in found if versions is None or e.rstrip("/").rsplit("/", 1)[-1] in versions]
        parts = sorted(
            (e for d in wanted for e in self.fs.ls(d, detail=False) if e.endswith(".jsonl")),
            key=lambda e: e.rsplit("/", 1)[-1],
        )
        rows: list[dict[str, Any]] = []
        for part in parts:
            rows.extend(json.loads(line) for line in self.fs.cat_file(part).splitlines() if line.strip())
        return rows

    def rejected(self) -> dict[str, str]:
        """Rejected versions and why."""
        try:
            entries = self.fs.ls(_join(self.model_path, ".rejected"), detail=False)
        except FileNotFoundError:
            return {}
        out = {}
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(".json") and _VERSION_RE.match(name[:-5]):
                record = self._read_record(entry) or {}
                out[name[:-5]] = str(record.get("reason", ""))
        return out

    def resolve(self, version: str) -> str:
        """``latest`` -> the newest committed version; ``v<N>`` as is (PackageError if there is none)."""
        if version == "latest":
            latest = self.latest()
            if latest is None:
                raise PackageError(
                    f"{self.package_uri('')}: no committed version of model {self.model_name!r}"
                )
            return latest
        if not _VERSION_RE.match(version):
            raise PackageError(f"version {version!r} must be 'latest' or v<N> (v1, v2, ...)")
        return version

    def read_metadata(self, version: str) -> dict[str, Any]:
        """package.json plus ``metrics`` and ``lineage`` of a committed version, and its ``uri``.

        Cheap and torch-free (the operator gates and deploys on it). PackageError if not committed.
        """
        version = self.resolve(version)
        uri = self.package_uri(version)
        path = _join(self.model_path, version)
        manifest = _check_package(self.fs, path, deep=True)
        return {
            **manifest,
            "uri": uri,
            "metrics": _read_json(self.fs, path, "metrics.json", manifest, uri),
            "lineage": _read_json(self.fs, path, "lineage.json", manifest, uri),
        }

    def read_json(self, version: str, name: str) -> Any:
        """One JSON file of a committed version (``profile.json``, ``schema.json``), checked against its
        sha256; torch-free (the operator measures drift and checks schemas with them)."""
        version = self.resolve(version)
        path = _join(self.model_path, version)
        manifest = _check_package(self.fs, path, deep=False)
        if name not in manifest["files"]:
            raise PackageError(f"{self.package_uri(version)}: the package has no {name}")
        return _read_json(self.fs, path, name, manifest, self.package_uri(version))

    def open(self, version: str = "latest", *, verify: bool = True) -> ModelPackage:
        return open_package(self.package_uri(self.resolve(version)), verify=verify)

    def register(self, staging_writer: StagingWriter) -> str:
        """Commit a new version and return its name (``v<N>``); never overwrites an existing one.

        ``staging_writer(area)`` writes the package files with ``area.write_bytes``/``write_json`` and may
        return extra manifest fields (``task``, ``architecture``). If it raises, nothing is committed.
        """
        staging_path = _join(self.model_path, f".staging-{uuid.uuid4().hex}")
        self.fs.makedirs(staging_path, exist_ok=True)
        area = StagingArea(self.fs, staging_path)
        try:
            extra = dict(staging_writer(area) or {})
            extra.setdefault("modelKind", DEFAULT_MODEL_KIND)
            missing = [f for f in required_files(extra["modelKind"]) if f not in area.files]
            if missing:
                raise PackageError(f"{staging_path}: the package is missing {missing}; nothing was committed")
            return self._commit(area, extra)
        finally:
            if self.fs.exists(staging_path):
                with contextlib.suppress(OSError):
                    self.fs.rm(staging_path, recursive=True)

    def _manifest(self, area: StagingArea, version: str, extra: Mapping[str, Any]) -> bytes:
        manifest = {
            **extra,
            "formatVersion": FORMAT_VERSION,
            "model": self.model_name,
            "version": version,
            "files": dict(sorted(area.files.items())),
            "sizes": dict(sorted(area.sizes.items())),
        }
        return json.dumps(manifest, indent=2, sort_keys=True).encode()

    def _commit(self, area: StagingArea, extra: Mapping[str, Any]) -> str:
        local = isinstance(self.fs, LocalFileSystem)
        tried = 0
        for _ in range(_MAX_COMMIT_ATTEMPTS):
            n = max([tried, *self._version_dirs()]) + 1
            tried = n
            version = f"v{n}"
            target = _join(self.model_path, version)
            manifest = self._manifest(area, version, extra)
            if local:
                # package.json last, then one rename: readers see all of v<N> or nothing.
                with open(_join(area.path, MANIFEST), "wb") as f:
                    f.write(manifest)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.rename(area.path, target)
                except OSError as e:
                    if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                        continue
                    raise PackageError(f"{target}: cannot commit the version ({e})") from e
                return version
            # Object stores: claim v<N> with a create-if-absent marker, then upload, package.json last.
            try:
                with self.fs.open(_join(target, ".claim"), "xb") as f:
                    f.write(area.path.encode())
            except FileExistsError:
                continue
            except (ValueError, NotImplementedError) as e:
                raise PackageError(
                    f"{target}: this storage does not support create-if-absent writes, needed to commit safely ({e})"
                ) from e
            for name in area.files:
                self.fs.copy(_join(area.path, name), _join(target, name))
            self.fs.pipe_file(_join(target, MANIFEST), manifest)
            return version
        raise PackageError(
            f"{self.model_path}: could not find a free version after {_MAX_COMMIT_ATTEMPTS} attempts"
        )
