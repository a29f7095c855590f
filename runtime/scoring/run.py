"""One batch run of a BatchPrediction: score a data set with a registry version, write Parquet.

Ray Data reads the input (``conveyor.runtime.training.data.load_dataset``: every URI and format training
reads); a pool of scorers (``BatchScorer``, one ``ScoringModel`` each: the predictor's own transform,
forward pass and decision rule) scores it batch by batch. A batch whose rows all pass the model's input
schema is transformed and scored at once; otherwise each row is tried alone, and the rows the fitted
transforms refuse go to the rejects with the transforms' own message (the 400 the predictor would have
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
    """Scores pandas batches with one loaded version (a Ray Data actor: the model loads once per actor)."""

    def __init__(self, package_uri: str, id_columns: list[str]) -> None:
        from conveyor.runtime.serving.model import ScoringModel

        self.model = ScoringModel.open(package_uri, "cpu")
        self.id_columns = id_columns
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

    def _transform_rows(self, frame: Any) -> tuple[np.ndarray | None, list[str | None]]:
        """The model input of the rows that pass, and each row's reason for failing (None: passed)."""
        try:
            return self.model.transform(self._model_input(frame)), [None] * len(frame)
        except ValueError:
            pass
        xs, reasons = [], []
        for i in range(len(frame)):
            try:
                xs.append(self.model.transform(self._model_input(frame.iloc[i : i + 1])))
                reasons.append(None)
            except ValueError as e:
                reasons.append(str(e))
        return (np.concatenate(xs) if xs else None), reasons

    def __call__(self, frame: Any) -> Any:
        import pandas as pd

        x, reasons = self._transform_rows(frame)
        good = [i for i, r in enumerate(reasons) if r is None]
        out = pd.DataFrame({c: frame[c].to_numpy() for c in self.id_columns if c in frame.columns})
        predictions: list[Any] = [None] * len(frame)
        probabilities: list[Any] = [None] * len(frame)
        if x is not None and good:
            scores = self.model.forward(x)
            for i, answer, row in zip(good, self.model.answers(scores), scores, strict=True):
                predictions[i] = answer
                if self.model.task == "classification":
                    probabilities[i] = row.astype(np.float32).tolist()
        out[PREDICTION] = predictions
        if self.model.task == "classification":
            out[PROBABILITIES] = probabilities
        out[MODEL_VERSION] = self.model.version
        out[REASON] = reasons
        out[ROW] = [
            None if r is None else json.dumps({k: _jsonable(v) for k, v in frame.iloc[i].items()}, default=str)
            for i, r in enumerate(reasons)
        ]
        out[_BINS] = [json.dumps(self._bins(frame.iloc[good], [predictions[i] for i in good]))] + [None] * (len(frame) - 1)
        return out

    def _bins(self, frame: Any, answers: list[Any]) -> dict[str, dict[str, int]]:
        """The batch's drift bin counts per profiled feature (and prediction), as the predictor counts."""
        from conveyor.runtime.package.profile import image_stats

        if self.model.kind == "image" and len(frame):
            t = self.model.package.transforms
            columns: dict[str, Any] = image_stats(self._model_input(frame), scale=t.scale)
        else:
            columns = {f: frame[f].tolist() for f in self.features if f in frame.columns}
        columns[drifts.PREDICTION] = answers
        return {
            name: drifts.bin_counts(entry, columns[name]) for name, entry in self.references.items() if name in columns
        }


def _drift(references: dict[str, Any], batches: list[dict[str, dict[str, int]]]) -> dict[str, Any]:
    """PSI of the whole input against the training profile, from the summed bin counts."""
    totals: dict[str, Counter[str]] = {}
    for batch in batches:
        for name, counts in batch.items():
            totals.setdefault(name, Counter()).update(counts)
    scores = {
        name: drifts.score_counts(references[name], counts, "psi") for name, counts in totals.items() if name in references
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
    """Run the batch; the outcome record (also written to ``_runs/run-<N>.json`` and ``_SUCCESS``)."""
    from conveyor.runtime.training.data import load_dataset

    started = time.time()
    registry = Registry(config.registry_uri, config.model_name)
    version = registry.resolve(config.version)
    package_uri = registry.package_uri(version)
    outputs = BatchOutputs(config.output.uri)
    staging_uri, staging_path = outputs.staging(config.run)
    try:
        from ray.data import ActorPoolStrategy

        ds = load_dataset(config.input)
        scored = ds.map_batches(
            BatchScorer,
            fn_constructor_kwargs={"package_uri": package_uri, "id_columns": list(config.input.id_columns)},
            batch_format="pandas",
            batch_size=config.batch_size,
            compute=ActorPoolStrategy(size=concurrency),  # each actor loads the model once
        ).materialize()
        # One pass over the small columns, batch by batch (row by row is ~1 ms a row in Ray Data).
        reasons: Counter[str] = Counter()
        bins: list[dict[str, Any]] = []
        total = 0
        for b in scored.select_columns([REASON, _BINS]).iter_batches(batch_format="pandas", batch_size=None):
            total += len(b)
            reasons.update(b[REASON].dropna())
            bins.extend(json.loads(v) for v in b[_BINS].dropna())
        rows_rejected = sum(reasons.values())
        rows_scored = total - rows_rejected
        scored.map_batches(_accepted, batch_format="pandas").write_parquet(
            f"{staging_path}/{PREDICTIONS}", filesystem=_arrow_fs(outputs)
        )
        if rows_rejected:
            scored.map_batches(_rejected, batch_format="pandas").write_parquet(
                f"{staging_path}/{REJECTS}", filesystem=_arrow_fs(outputs)
            )
        references = drifts.references(registry.open(version, verify=False).profile)
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
    log.info("run %d: %d rows scored, %d rejected, output %s", config.run, rows_scored, rows_rejected, record["output"])
    return record


def _arrow_fs(outputs: BatchOutputs) -> Any:
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(outputs.fs, LocalFileSystem):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(outputs.fs))


def _accepted(frame: Any) -> Any:
    return frame[frame[REASON].isna()].drop(columns=[REASON, ROW, _BINS])


def _rejected(frame: Any) -> Any:
    keep = [c for c in frame.columns if c not in (PREDICTION, PROBABILITIES, MODEL_VERSION, _BINS)]
    return frame[frame[REASON].notna()][keep]


def load_config(path: str) -> BatchRunConfig:
    return BatchRunConfig.model_validate(json.loads(Path(path).read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conveyor.runtime.batch", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run.json (a BatchRunConfig)")
    parser.add_argument("--concurrency", type=int, default=1, help="scoring actors (each loads the model once)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from conveyor.runtime.training.run import ensure_ray

    config = load_config(args.config)
    started = time.time()
    try:
        ensure_ray()
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
