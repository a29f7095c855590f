"""Where a BatchPrediction's runs write, torch-free: the batch job writes here, the operator reads.

Layout under the BatchPrediction's ``spec.output.uri`` (any fsspec URI):

- ``run-<N>/predictions/*.parquet``: the scored rows (id columns, prediction, probabilities, model_version)
- ``run-<N>/rejects/*.parquet``: rows that failed the model's input schema, with ``reason``
- ``run-<N>/_SUCCESS``: written last; a run folder without it is not complete (readers skip it)
- ``_staging/run-<N>-<token>/``: where a run writes before it commits
- ``_runs/run-<N>.json``: the run's outcome record (success or failure), what the operator reads

A run commits by moving its staging folder to ``run-<N>`` (a rename on a local or POSIX filesystem; a
copy on object stores, where ``_SUCCESS`` written afterwards is what marks the folder complete, as
Hadoop's and Spark's committers do), then writing ``_SUCCESS`` and the record. Another run's folder is
never touched, so a re-run cannot corrupt an older output.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import fsspec

from conveyor.runtime.package.registry import PackageError, write_json_atomically

SUCCESS = "_SUCCESS"
PREDICTIONS = "predictions"
REJECTS = "rejects"


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


class BatchOutputs:
    """The runs of one BatchPrediction under its output URI."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.fs, path = fsspec.core.url_to_fs(uri)
        self.path = path.rstrip("/")

    def run_uri(self, run: int) -> str:
        return _join(self.uri, f"run-{run}")

    def staging(self, run: int) -> tuple[str, str]:
        """A fresh staging folder for run ``run``: (its URI, its path on the filesystem)."""
        token = uuid.uuid4().hex[:8]
        name = f"run-{run}-{token}"
        path = _join(self.path, "_staging", name)
        self.fs.makedirs(path, exist_ok=True)
        return _join(self.uri, "_staging", name), path

    def complete(self, run: int) -> bool:
        return self.fs.exists(_join(self.path, f"run-{run}", SUCCESS))

    def commit(self, run: int, staging_path: str, record: dict[str, Any]) -> None:
        """Make run ``run``'s staged output visible as ``run-<N>``, then mark it complete."""
        final = _join(self.path, f"run-{run}")
        if self.fs.exists(final):  # an earlier attempt of this run that never completed
            self.fs.rm(final, recursive=True)
        self.fs.mv(staging_path, final, recursive=True)
        write_json_atomically(self.fs, _join(final, SUCCESS), record)

    def discard(self, staging_path: str) -> None:
        if self.fs.exists(staging_path):
            self.fs.rm(staging_path, recursive=True)

    def write_record(self, run: int, record: dict[str, Any]) -> None:
        write_json_atomically(self.fs, _join(self.path, "_runs", f"run-{run}.json"), record)

    def read_record(self, run: int) -> dict[str, Any] | None:
        """The run's outcome record, or None when it wrote none (yet)."""
        path = _join(self.path, "_runs", f"run-{run}.json")
        try:
            obj = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise PackageError(f"{path}: not valid JSON ({e})") from e
        return obj if isinstance(obj, dict) else None
