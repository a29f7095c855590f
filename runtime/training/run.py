"""The training run: ``python -m conveyor.runtime.train --config run.json``.

``run.json`` is a ``conveyor.runtime.spec.RunConfig`` (what the operator derives from an MLPipeline).
The run:

1. ingests the source with Ray Data (``data.load_dataset``);
2. validates it against the data contract (every violation reported; on failure the process exits 2
   with the report as its message and nothing is written to the registry);
3. splits it (seeded, stratified for classification), profiles the training split and fits the
   declared feature transforms on it only;
4. trains with Ray Train's TorchTrainer: DDP across ``training.numWorkers``, GPU with mixed precision
   when ``training.useGpu`` is set and the cluster has GPUs, CPU otherwise; seeded; metrics reported each
   epoch (a worker's shard that fits in ``CONVEYOR_SHARD_CACHE_BYTES``, default 1 GiB, is streamed
   once and then reshuffled in memory); a checkpoint under ``checkpointUri`` (default
   ``<registry>/<model>/.checkpoints``) after every epoch, or at most every
   ``CONVEYOR_CHECKPOINT_INTERVAL_S`` seconds when that is set (always after the last), so a retried
   job (same pipeline and run) resumes from its last checkpoint; a run that registered leaves a marker
   instead, and its retry returns that version;
5. evaluates the exported model (torch.export's program: what serving runs) on the held-out split and,
   when the run config names the version deployed now (``deployed``, for mustBeatDeployed), that
   version's package on the same raw test rows (``evaluate.evaluate_deployed``, recorded as ``metrics.deployed``);
6. registers the package atomically as the next version (``registry.Registry.register``).

It registers the model whether or not the evaluation gate passed: the gate's result is in
``metrics.json`` (``gate``), and the operator, which also knows the deployed version, decides. Exit codes:
0 registered, 2 data validation failed, 1 any other error. ``--result PATH`` writes the outcome as JSON.

Every outcome is also recorded in the registry under the run's name (``Registry.write_run_record``):
that record, not the log, is how the operator learns what happened. A data-contract violation is
deterministic, so retrying it is pointless; with ``--exit-zero-when-reported`` (what the operator's
RayJob runs) the process exits 0 once the violation is recorded, so KubeRay's ``backoffLimit`` does not
retry it, and the operator fails the run from the record. Other failures exit 1 and are retried.

For tests and samples, ``train_and_register(config)`` runs the same steps in-process and returns the
package URI (a local Ray is started when none is running).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.runtime.package import profile
from conveyor.runtime.package.registry import PackageError, Registry, StagingArea
from conveyor.runtime.package.validation import DataValidationError
from conveyor.runtime.spec import RunConfig
from conveyor.runtime.training import evaluate
from conveyor.runtime.training.loop import checkpoint_storage, fit, run_name
from conveyor.runtime.training.prepare import prepare_data

log = logging.getLogger("conveyor.train")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INVALID_DATA = 2


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS (inside a RayJob) or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    from ray.data import DataContext

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)
    DataContext.get_current().enable_progress_bars = False


def _predict(module: Any, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(module(torch.from_numpy(x[i : i + batch_size])).float().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 1), dtype=np.float32)


def _packages() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("conveyor", "torch", "torchvision", "ray", "numpy", "pandas", "scikit-learn", "xgboost"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            if name == "conveyor":  # run from a source tree rather than an installed distribution
                out[name] = "unknown (source tree)"
    return out


@dataclass
class RunResult:
    version: str
    package_uri: str
    metrics: dict[str, Any]
    gate: dict[str, Any]
    data_validation: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "outcome": "Registered",
            "version": self.version,
            "packageUri": self.package_uri,
            "metrics": {k: v for k, v in self.metrics.items() if k not in ("history", "gate")},
            "gate": self.gate,
        }
        if self.data_validation is not None:
            out["dataValidation"] = self.data_validation
        return out


def run(config: RunConfig) -> RunResult:
    """The whole run (see the module docstring); Ray must be initialised (``ensure_ray``). Its outcome,
    whichever it is, is recorded in the registry under the run's name."""
    registry = Registry(config.registry.uri, config.registry.model_name)  # bad names fail before any work
    try:
        result = _run(config, registry)
    except DataValidationError as e:
        _record(
            config,
            registry,
            {"outcome": "DataValidationFailed", "message": str(e), "dataValidation": e.report.to_json()},
        )
        raise
    except Exception as e:
        _record(config, registry, {"outcome": "Failed", "message": f"{type(e).__name__}: {e}"[:4000]})
        raise
    _record(config, registry, result.to_json())
    return result


def _record(config: RunConfig, registry: Registry, record: dict[str, Any]) -> None:
    try:
        registry.write_run_record(config.namespace, config.pipeline, config.run, _finite(record))
    except Exception:  # the run's own error matters more than the record's; the log keeps both
        log.exception("could not record the run's outcome in %s", registry.uri)
        raise


def _run(config: RunConfig, registry: Registry) -> RunResult:
    from conveyor.runtime.training.export import export_model

    done = _already_registered(config, registry)
    if done is not None:
        log.info("run %s already registered %s; nothing to do", run_name(config), done.package_uri)
        return done
    started = time.time()
    prepared = prepare_data(config)
    prepared_at = time.time()
    given = config  # the run's parameters as the user gave them (lineage)
    requested = config.training.model.architecture
    architecture = resolve_architecture(requested, prepared)
    if architecture != requested:
        log.info("architecture %s: %s for this data", requested, architecture)
        model = config.training.model.model_copy(update={"architecture": architecture})
        config = config.model_copy(update={"training": config.training.model_copy(update={"model": model})})
    if config.training.model.architecture == "xgboost":
        from conveyor.runtime.training.trees import fit_trees

        booster, history, facts = fit_trees(config, prepared)
        model_kind, model_files, logits_of = "xgboost", {"model.ubj": booster.to_bytes()}, booster.logits
    else:
        model, history, facts = fit(config, prepared)
        exported = export_model(model, prepared.input_shape)
        model_kind, model_files = exported.model_kind, exported.files
        facts = {**facts, **({"export": exported.notes} if exported.notes else {})}

        def logits_of(x: np.ndarray) -> np.ndarray:
            # Evaluated as serving runs it: the exported program, not the training-time module.
            return _predict(exported.module, x)

    trained_at = time.time()
    log.info("phases: data %.1fs, training %.1fs", prepared_at - started, trained_at - prepared_at)
    # Scored batch by batch on either path (PreparedData.score_batches) and folded into fixed-size tallies,
    # so the driver's memory does not grow with the splits' rows.
    tally: evaluate.ClassificationTally | evaluate.RegressionTally
    if prepared.classes is not None:
        # The decision threshold is chosen on the validation split (on every training row's out-of-fold
        # score when the trees were cross-fitted: facts["decisionThreshold"]) and shipped in schema.json,
        # so the test split judges exactly the rule serving applies.
        threshold = None
        if "decisionThreshold" in facts:
            threshold = facts["decisionThreshold"]
        elif prepared.rows("validation"):
            val_tally = evaluate.ClassificationTally(prepared.classes)
            for out, y in prepared.score_batches(logits_of, "validation"):
                val_tally.add(out, y)
            threshold = val_tally.best_threshold(config.evaluation.metric)
        if threshold is not None:
            prepared.schema["decisionThreshold"] = threshold
        tally = evaluate.ClassificationTally(prepared.classes, threshold)
    else:
        tally = evaluate.RegressionTally(seed=config.training.hyperparameters.seed)
    for out, y in prepared.score_batches(logits_of, "test"):
        tally.add(out, y)
    metrics = tally.metrics()
    metrics.update(
        {
            "trainSamples": prepared.rows("train"),
            "validationSamples": prepared.rows("validation"),
            "testSamples": prepared.rows("test"),
            "history": history,
            **{k: v for k, v in facts.items() if k in ("resumedAfterEpoch", "bestEpoch", "stoppedEarly")},
        }
    )
    if config.deployed is not None:
        # mustBeatDeployed: the deployed version on this run's test rows, so the gate compares like with like.
        metrics["deployed"] = evaluate.evaluate_deployed(
            config.deployed.version,
            config.deployed.package_uri,
            prepared.raw_test_batches(),  # either data path: the raw test split, batch by batch
            label=config.data.label,
            task=config.data.task,
        )
        log.info("deployed %s on this run's test split: %s", config.deployed.version, metrics["deployed"])
    gate = evaluate.gate(metrics, config.evaluation)
    metrics["gate"] = gate
    prof = dict(prepared.profile)
    if isinstance(tally, evaluate.ClassificationTally):
        counts, n = tally.predicted_counts(), max(tally.rows, 1)
        prof["predictionDistribution"] = {
            str(c): float(counts[i]) / n for i, c in enumerate(prepared.classes or [])
        }
    else:
        prof["predictionDistribution"] = profile.numeric_profile_from_summary(tally.predictions)
    lineage = {
        "pipeline": config.pipeline,
        "namespace": config.namespace,
        "run": config.run,
        "dataUri": config.data.source.uri,
        "dataSha256": prepared.data_sha256,
        "parameters": given.to_api(),
        "packages": _packages(),
        "createdAt": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "training": {
            **facts,
            **({"architectureRequested": requested} if requested != architecture else {}),
            "wallSeconds": round(time.time() - started, 3),
        },
    }

    def write(area: StagingArea) -> dict[str, Any]:
        for name, data in model_files.items():
            area.write_bytes(name, data)
        area.write_json("transforms.json", prepared.transforms.to_json())
        area.write_json("schema.json", prepared.schema)
        area.write_json("profile.json", _finite(prof))
        area.write_json("metrics.json", _finite(metrics))
        area.write_json("lineage.json", _finite(lineage))
        return {
            "task": prepared.task,
            "architecture": config.training.model.architecture,
            "modelKind": model_kind,
            "inputShape": prepared.input_shape,
        }

    version = registry.register(write)
    uri = registry.package_uri(version)
    log.info("registered %s (%s %s)", uri, gate["metric"], gate["value"])
    _mark_registered(config, version, uri)
    return RunResult(version, uri, metrics, gate, prepared.validation.to_json())


def resolve_architecture(requested: str, prepared: Any) -> str:
    """The architecture a run trains: ``requested``, except ``auto``, which picks by the data: ``cnn`` for
    images; for tables, gradient-boosted trees (``xgboost``) when some class is rare (under
    2 * ``loop.RARE_CLASS_FRACTION`` of its even share of the training rows: 20% for two classes), else
    ``mlp``. Measured by
    tests/bench/bench_quality.py: on make_classification with 1% and 5% positives the class-weighted MLP's
    minority F1 is far below HistGradientBoosting's on most data seeds, the trees' level with it, while
    on the small balanced sets (iris, digits) and on regression (diabetes) the MLP is the better one."""
    if requested != "auto":
        return requested
    if prepared.kind == "image":
        return "cnn"
    if prepared.classes is not None:
        from conveyor.runtime.training.loop import RARE_CLASS_FRACTION

        # Rare: under 2 * RARE_CLASS_FRACTION of a class's even share (1/k), so 20% for a binary task,
        # as for class weights, while ten even classes of 10% each (digits) are not rare.
        counts = np.asarray(prepared.train_class_counts(), dtype=np.float64)
        if counts.sum() > 0 and counts.min() / counts.sum() * len(counts) < 2 * RARE_CLASS_FRACTION:
            return "xgboost"
    return "mlp"


def _run_storage(config: RunConfig) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(checkpoint_storage(config))
    return fs, f"{root.rstrip('/')}/{run_name(config)}"


def _mark_registered(config: RunConfig, version: str, uri: str) -> None:
    """The run's checkpoints are no longer needed; the marker left in their place makes a retry of a run
    that already registered (its pod restarted after the commit) return that version, not add another."""
    fs, path = _run_storage(config)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/registered.json", json.dumps({"version": version, "packageUri": uri}).encode())


def _already_registered(config: RunConfig, registry: Registry) -> RunResult | None:
    fs, path = _run_storage(config)
    try:
        marker = json.loads(fs.cat_file(f"{path}/registered.json"))
        meta = registry.read_metadata(marker["version"])
    except (FileNotFoundError, KeyError, ValueError, PackageError):
        return None
    return RunResult(
        marker["version"],
        registry.package_uri(marker["version"]),
        meta["metrics"],
        meta["metrics"].get("gate", {}),
    )


def _finite(obj: Any) -> Any:
    """JSON-safe: NaN/inf become null (a profile of an all-null column, an undefined metric)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def train_and_register(config: RunConfig) -> str:
    """Train, evaluate and register ``config`` in-process; return the package URI
    (``<registry.uri>/<modelName>/v<N>``).

    For tests and samples (e.g. the serving tests need a small real package quickly): starts a local Ray
    when none is running (tests start one first with ``ray.init(num_cpus=2, include_dashboard=False)``).
    ``quick_config("fraud" | "digits", registry_uri)`` gives a small real run (tabular or image) that
    trains in seconds on a CPU. Raises DataValidationError on bad data.
    """
    ensure_ray()
    return run(config).package_uri


def load_config(path: str) -> RunConfig:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    try:
        raw = json.loads(text)
    except ValueError:
        import yaml

        raw = yaml.safe_load(text)
    return RunConfig.model_validate(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conveyor.runtime.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="run.json (a RunConfig), or - for stdin")
    parser.add_argument(
        "--result", help="write the outcome (registered version, metrics or the validation report) here"
    )
    parser.add_argument(
        "--exit-zero-when-reported",
        action="store_true",
        help="exit 0 after a data-contract violation is recorded in the registry (it is deterministic: "
        "a job retry would fail the same way)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    def write_result(obj: dict[str, Any]) -> None:
        if args.result:
            Path(args.result).write_text(json.dumps(_finite(obj), indent=2))

    try:
        config = load_config(args.config)
    except Exception as e:
        print(f"invalid run config {args.config}: {e}", file=sys.stderr)
        write_result({"outcome": "InvalidConfig", "message": str(e)})
        return EXIT_ERROR
    try:
        ensure_ray()
        result = run(config)
    except DataValidationError as e:
        print(str(e), file=sys.stderr)
        write_result({"outcome": "DataValidationFailed", "message": str(e), "report": e.report.to_json()})
        return EXIT_OK if args.exit_zero_when_reported else EXIT_INVALID_DATA
    except Exception as e:
        log.exception("training run failed")
        write_result({"outcome": "Failed", "message": f"{type(e).__name__}: {e}"})
        return EXIT_ERROR
    write_result(result.to_json())
    print(json.dumps(_finite(result.to_json())))
    return EXIT_OK
