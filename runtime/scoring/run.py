"""One batch run of a BatchPrediction: score a data set with a registry version, write Parquet.

An input small enough for one process (``DRIVER_MAX_BYTES``, see ``score``) is read with pyarrow and
scored in the driver's process; a larger one is read by Ray Data (``conveyor.runtime.training.data.
load_dataset``: every URI and format training reads) and scored by a pool of Ray Data actors. Either way
one ``BatchScorer`` (a ``ScoringModel``: the predictor's own transform, forward pass and decision rule)
scores batch by batch, columnar (numpy in, Arrow out). A batch whose rows all pass the model's input
schema is transformed at once; otherwise it is halved until the rows the fitted transforms refuse are
found, and those go to the rejects with the transforms' own message (the 400 the predictor would have
answered). Rejected rows never fail the run.

Output (see ``conveyor.runtime.package.outputs``): predictions and rejects are written under a staging
folder, committed as ``run-<N>`` and marked complete by ``_SUCCESS``; the outcome record (rows scored
and rejected, the model version, the input's drift against the training profile, the duration) goes
to ``_runs/run-<N>.json`` for the operator, also when the run fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.runtime.package import drift as drifts
from conveyor.runtime.package.outputs import PREDICTIONS, REJECTS, BatchOutputs
from conveyor.runtime.package.registry import Registry
from conveyor.runtime.spec import BatchRunConfig

log = logging.getLogger("conveyor.batch")

REASON = "reason"
ROW = "row"
PREDICTION = "prediction"
PROBABILITIES = "probabilities"
MODEL_VERSION = "model_version"
# One JSON object per scored batch (its drift bin counts), on the batch's first row: summed by the driver.
_BINS = "_drift_bins"
DRIFT_FEATURES_REPORTED = 5


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


class BatchScorer:
    """Scores batches with one loaded version: in the driver's process, or as a Ray Data actor (the model
    loads once per actor). Everything per batch is columnar (Arrow out, numpy in): no per-row Python
    except for the rows a batch rejects."""

    def __init__(self, package_uri: str, id_columns: list[str], batch_size: int = 1024) -> None:
        from conveyor.runtime.serving.model import ScoringModel

        self.model = ScoringModel.open(package_uri, "cpu")
        self.id_columns = id_columns
        self.batch_size = max(1, batch_size)
        t = self.model.package.transforms
        self.features = [t.image_field] if t.kind == "image" else [f.name for f in t.features]
        self.references = drifts.references(self.model.package.profile)

    def _model_input(self, frame: Any) -> Any:
        if self.model.kind == "image":
            return np.stack([np.asarray(v, dtype=np.float32) for v in frame[self.features[0]]])
        missing = [f for f in self.features if f not in frame.columns]
        if missing:
            raise ValueError(f"feature(s) {missing} missing from the input")
        return {f: frame[f].to_numpy() for f in self.features}

    def _transform_rows(self, frame: Any, offset: int = 0) -> tuple[list[np.ndarray], dict[int, str]]:
        """The model input of the rows that pass (in order) and each failing row's reason by position.
        A batch the transforms refuse is halved until the refused rows are found alone: a bad row costs
        log2(batch) transforms, not one transform per row of its batch."""
        try:
            return [self.model.transform(self._model_input(frame))], {}
        except ValueError as e:
            if len(frame) == 1:
                return [], {offset: str(e)}
        half = len(frame) // 2
        xs, reasons = self._transform_rows(frame.iloc[:half], offset)
        xs2, reasons2 = self._transform_rows(frame.iloc[half:], offset + half)
        return xs + xs2, {**reasons, **reasons2}

    def _forward(self, x: np.ndarray) -> np.ndarray:
        """The forward pass in slices of the run's batchSize (the rows one pass takes)."""
        if len(x) <= self.batch_size:
            return self.model.forward(x)
        return np.concatenate(
            [self.model.forward(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        )

    def score(self, frame: Any) -> tuple[Any, dict[str, dict[str, int]]]:
        """The batch's output (an Arrow table: id columns, prediction, probabilities, model version, and
        for rejected rows the reason and the row) and its drift bin counts."""
        import pyarrow as pa

        n = len(frame)
        xs, reasons = self._transform_rows(frame)
        bad = np.zeros(n, dtype=bool)
        bad[list(reasons)] = True
        good = np.flatnonzero(~bad)
        scores = self._forward(np.concatenate(xs)) if xs else None
        answers = self.model.answers(scores) if scores is not None else []
        columns: dict[str, Any] = {
            c: pa.Array.from_pandas(frame[c]) for c in self.id_columns if c in frame.columns
        }
        mask = pa.array(bad) if reasons else None
        if self.model.task == "classification":
            labels = np.full(n, "", dtype=object)
            labels[good] = answers
            columns[PREDICTION] = pa.array(labels, pa.string(), mask=bad if reasons else None)
            k = len(self.model.classes or [])
            probs = np.zeros((n, k), dtype=np.float32)
            if scores is not None:
                probs[good] = scores
            offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
            columns[PROBABILITIES] = pa.ListArray.from_arrays(offsets, pa.array(probs.ravel()), mask=mask)
        else:
            values = np.zeros(n, dtype=np.float64)
            values[good] = answers
            columns[PREDICTION] = pa.array(values, mask=bad if reasons else None)
        columns[MODEL_VERSION] = pa.array(np.full(n, self.model.version, dtype=object), pa.string())
        row_text = np.full(n, None, dtype=object)
        reason_text = np.full(n, None, dtype=object)
        for i, why in reasons.items():
            reason_text[i] = why
            row_text[i] = json.dumps({k: _jsonable(v) for k, v in frame.iloc[i].items()}, default=str)
        columns[REASON] = pa.array(reason_text, pa.string())
        columns[ROW] = pa.array(row_text, pa.string())
        kept = frame if not reasons else frame.iloc[good]
        return pa.table(columns), self._bins(kept, answers)

    def __call__(self, frame: Any) -> Any:
        """Ray Data's entry (the actor pool): the output table with the batch's bin counts on its first row."""
        import pyarrow as pa

        table, bins = self.score(frame)
        bins_text = [json.dumps(bins)] + [None] * (table.num_rows - 1)
        return table.append_column(_BINS, pa.array(bins_text, pa.string()))

    def _bins(self, frame: Any, answers: list[Any]) -> dict[str, dict[str, int]]:
        """The batch's drift bin counts per profiled feature (and prediction), as the predictor counts:
        numeric columns binned at once, categorical ones counted per distinct value."""
        from conveyor.runtime.package.profile import image_stats

        if self.model.kind == "image" and len(frame):
            t = self.model.package.transforms
            columns: dict[str, Any] = image_stats(self._model_input(frame), scale=t.scale)
        else:
            columns = {f: frame[f].to_numpy() for f in self.features if f in frame.columns}
        columns[drifts.PREDICTION] = np.asarray(answers)
        return {
            name: _bin_counts(entry, columns[name])
            for name, entry in self.references.items()
            if name in columns
        }


def _bin_counts(entry: dict[str, Any], values: Any) -> dict[str, int]:
    """``drifts.bin_counts`` of ``values``; a categorical column counted once per distinct value (the
    same keys and counts, without a Python step per row)."""
    import pandas as pd

    if entry.get("kind") == "numeric":
        return drifts.bin_counts(entry, values)
    out: Counter[str] = Counter()
    for value, count in pd.Series(values, dtype=object).value_counts(dropna=True).items():
        for key, n in drifts.bin_counts(entry, [value]).items():
            out[key] += n * int(count)
    return dict(out)


def _drift(references: dict[str, Any], batches: list[dict[str, dict[str, int]]]) -> dict[str, Any]:
    """PSI of the whole input against the training profile, from the summed bin counts."""
    totals: dict[str, Counter[str]] = {}
    for batch in batches:
        for name, counts in batch.items():
            totals.setdefault(name, Counter()).update(counts)
    scores = {
        name: drifts.score_counts(references[name], counts, "psi")
        for name, counts in totals.items()
        if name in references
    }
    scored = sorted(((s, n) for n, s in scores.items() if s is not None), reverse=True)
    return {
        "method": "psi",
        "score": round(scored[0][0], 6) if scored else None,
        "features": [{"name": n, "score": round(s, 6)} for s, n in scored[:DRIFT_FEATURES_REPORTED]],
    }


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def score(config: BatchRunConfig, *, concurrency: int = 1) -> dict[str, Any]:
    """Run the batch; the outcome record (also written to ``_runs/run-<N>.json`` and ``_SUCCESS``).

    Where it scores (the stated rule): an input of at most ``DRIVER_MAX_BYTES`` on storage (Parquet, CSV
    or a builtin) scored by one scorer (``concurrency`` 1, the default) is read with pyarrow and scored in
    the driver's own process, streamed chunk by chunk, the model loaded once: at that size Ray Data's
    read tasks, a scoring actor (one more process loading torch and the package) and the object-store
    copies cost more than the scoring itself (100k fraud rows score in a third of a second in process,
    and took 24 s through one actor). Larger inputs, image folders, or more scorers go to Ray Data: it
    reads the input across the cluster and an actor pool of ``concurrency`` scorers scores it.
    """
    from conveyor.runtime.training.data import load_dataset

    started = time.time()
    registry = Registry(config.registry_uri, config.model_name)
    version = registry.resolve(config.version)
    package_uri = registry.package_uri(version)
    outputs = BatchOutputs(config.output.uri)
    staging_uri, staging_path = outputs.staging(config.run)
    try:
        if concurrency <= 1 and _fits_the_driver(config.input):
            total, reasons, bins, references = _score_in_driver(config, package_uri, outputs, staging_path)
        else:
            ds = load_dataset(config.input)
            total, reasons, bins = _score_on_actors(
                ds, config, package_uri, outputs, staging_path, concurrency
            )
            references = drifts.references(registry.open(version, verify=False).profile)
        rows_rejected = sum(reasons.values())
        rows_scored = total - rows_rejected
        finished = time.time()
        record = {
            "outcome": "Succeeded",
            "run": config.run,
            "modelVersion": version,
            "modelUri": package_uri,
            "rowsScored": rows_scored,
            "rowsRejected": rows_rejected,
            "rejectReasons": [{"reason": r[:300], "rows": n} for r, n in reasons.most_common(3)],
            "output": outputs.run_uri(config.run),
            "startTime": _rfc3339(started),
            "completionTime": _rfc3339(finished),
            "durationSeconds": round(finished - started, 3),
            "drift": _drift(references, bins),
        }
        outputs.commit(config.run, staging_path, record)
    except BaseException:
        outputs.discard(staging_path)
        raise
    outputs.write_record(config.run, record)
    log.info(
        "run %d: %d rows scored, %d rejected, output %s",
        config.run,
        rows_scored,
        rows_rejected,
        record["output"],
    )
    return record


# Rows the driver reads at a time (the forward pass still takes spec.batchSize rows at once):
# large enough that per-batch costs vanish, small enough to keep memory flat (~10 MB of fraud rows).
DRIVER_CHUNK_ROWS = 65536


# Inputs up to this size on storage are read and scored in the driver's process (see ``score``): about
# 40 million fraud rows as Parquet, 10 minutes of one core; beyond it, spreading over a cluster pays.
DRIVER_MAX_BYTES = 2 * 2**30


def _fits_the_driver(source: Any) -> bool:
    import fsspec

    if source.format == "builtin" or source.uri.startswith("builtin://"):
        return True
    if source.format not in ("parquet", "csv"):
        return False
    fs, path = fsspec.core.url_to_fs(source.uri)
    return int(fs.du(path)) <= DRIVER_MAX_BYTES


def _driver_frames(source: Any, chunk: int) -> Any:
    """The input as pandas frames of at most ``chunk`` rows, read with pyarrow in this process (the same
    files Ray Data would read: ``_``- and ``.``-prefixed ones skipped)."""
    if source.format == "builtin" or source.uri.startswith("builtin://"):
        from conveyor.runtime.training.data import builtin_frame

        frame = builtin_frame(source.uri)
        for i in range(0, len(frame), chunk):
            yield frame.iloc[i : i + chunk].reset_index(drop=True)
        return
    import fsspec
    import pyarrow.dataset as pads
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(source.uri)
    arrow_fs = None
    if not isinstance(fs, LocalFileSystem):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        arrow_fs = PyFileSystem(FSSpecHandler(fs))
    dataset = pads.dataset(path, format=source.format, filesystem=arrow_fs)
    for batch in dataset.to_batches(batch_size=chunk):
        if batch.num_rows:
            yield batch.to_pandas()


def _score_in_driver(
    config: BatchRunConfig, package_uri: str, outputs: BatchOutputs, staging_path: str
) -> tuple[int, Counter[str], list[dict[str, Any]], dict[str, Any]]:
    """Score chunk by chunk in this process; predictions and rejects each one Parquet file (a row group
    a chunk)."""
    scorer = BatchScorer(package_uri, list(config.input.id_columns), config.batch_size)
    writers = _Writers(outputs, staging_path)
    reasons: Counter[str] = Counter()
    bins: list[dict[str, Any]] = []
    total = 0
    try:
        for frame in _driver_frames(config.input, max(config.batch_size, DRIVER_CHUNK_ROWS)):
            table, counts = scorer.score(frame)
            total += table.num_rows
            bins.append(counts)
            rejected = _rejected(table)
            reasons.update(rejected[REASON].to_pylist())
            writers.write(PREDICTIONS, _accepted(table))
            writers.write(REJECTS, rejected)
    finally:
        writers.close()
    return total, reasons, bins, scorer.references


def _score_on_actors(
    ds: Any,
    config: BatchRunConfig,
    package_uri: str,
    outputs: BatchOutputs,
    staging_path: str,
    concurrency: int,
) -> tuple[int, Counter[str], list[dict[str, Any]]]:
    from ray.data import ActorPoolStrategy

    scored = ds.map_batches(
        BatchScorer,
        fn_constructor_kwargs={
            "package_uri": package_uri, "id_columns": list(config.input.id_columns), "batch_size": config.batch_size,
        },
        batch_format="pandas",
        batch_size=max(config.batch_size, DRIVER_CHUNK_ROWS // concurrency),
        compute=ActorPoolStrategy(size=concurrency),  # each actor loads the model once
    ).materialize()  # fmt: skip
    # One pass over the small columns, batch by batch (row by row is ~1 ms a row in Ray Data).
    reasons: Counter[str] = Counter()
    bins: list[dict[str, Any]] = []
    total = 0
    for b in scored.select_columns([REASON, _BINS]).iter_batches(batch_format="pyarrow", batch_size=None):
        total += b.num_rows
        reasons.update(r for r in b[REASON].to_pylist() if r is not None)
        bins.extend(json.loads(v) for v in b[_BINS].to_pylist() if v is not None)
    fs = _arrow_fs(outputs)
    scored.map_batches(_accepted, batch_format="pyarrow").write_parquet(
        f"{staging_path}/{PREDICTIONS}", filesystem=fs
    )
    if sum(reasons.values()):
        scored.map_batches(_rejected, batch_format="pyarrow").write_parquet(
            f"{staging_path}/{REJECTS}", filesystem=fs
        )
    return total, reasons, bins


class _Writers:
    """One Parquet file per output (predictions, rejects) under the staging folder, opened on first rows."""

    def __init__(self, outputs: BatchOutputs, staging_path: str) -> None:
        self.outputs, self.staging_path = outputs, staging_path
        self.open: dict[str, Any] = {}

    def write(self, name: str, table: Any) -> None:
        import pyarrow.parquet as pq

        if table.num_rows == 0:
            return
        writer = self.open.get(name)
        if writer is None:
            self.outputs.fs.makedirs(f"{self.staging_path}/{name}", exist_ok=True)
            sink = self.outputs.fs.open(f"{self.staging_path}/{name}/part-00000.parquet", "wb")
            writer = self.open[name] = (pq.ParquetWriter(sink, table.schema), sink)
        writer[0].write_table(table.cast(writer[0].schema))

    def close(self) -> None:
        for writer, sink in self.open.values():
            writer.close()
            sink.close()
        self.open.clear()


def _arrow_fs(outputs: BatchOutputs) -> Any:
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(outputs.fs, LocalFileSystem):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(outputs.fs))


def _accepted(table: Any) -> Any:
    import pyarrow.compute as pc

    if table[REASON].null_count != table.num_rows:
        table = table.filter(pc.is_null(table[REASON]))
    return table.drop_columns([c for c in (REASON, ROW, _BINS) if c in table.column_names])


def _rejected(table: Any) -> Any:
    import pyarrow.compute as pc

    rows = table.filter(pc.is_valid(table[REASON]))
    return rows.drop_columns(
        [c for c in (PREDICTION, PROBABILITIES, MODEL_VERSION, _BINS) if c in rows.column_names]
    )


def load_config(path: str) -> BatchRunConfig:
    return BatchRunConfig.model_validate(json.loads(Path(path).read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conveyor.runtime.batch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="run.json (a BatchRunConfig)")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="scoring actors (each loads the model once)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from conveyor.runtime.training.run import ensure_ray

    config = load_config(args.config)
    started = time.time()
    try:
        if args.concurrency > 1 or not _fits_the_driver(config.input):
            ensure_ray()  # the driver-only path needs no Ray at all (on a busy machine its start can time out)
        record = score(config, concurrency=args.concurrency)
    except Exception as e:
        log.exception("batch run failed")
        try:
            BatchOutputs(config.output.uri).write_record(
                config.run,
                {
                    "outcome": "Failed",
                    "run": config.run,
                    "message": f"{type(e).__name__}: {e}"[:2000],
                    "startTime": _rfc3339(started),
                    "completionTime": _rfc3339(time.time()),
                },
            )
        except Exception:  # noqa: BLE001 - the job's own failure is what matters; KubeRay reports it
            log.exception("could not record the failure")
        return 1
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
