"""The CRDs as a user meets them: installed and established on a real kube-apiserver, every sample
applies, `kubectl explain` teaches the API, and bad objects are rejected naming the field."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))

CRDS = [
    "mlpipelines.conveyor.dev",
    "modeldeployments.conveyor.dev",
    "batchpredictions.conveyor.dev",
    "rayjobs.ray.io",
    "rayclusters.ray.io",
    "inferenceservices.serving.kserve.io",
]


def _sample(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "manifests" / "samples" / name).read_text())


def _apply(kubectl, namespace: str, obj: dict[str, Any], *, check: bool = False):
    return kubectl(
        "apply", "--server-side", "--field-manager=test", "-n", namespace, "-f", "-",
        input=json.dumps(obj), check=check,
    )


def test_all_five_crds_are_established(kubectl) -> None:
    for name in CRDS:
        crd = json.loads(kubectl("get", "crd", name, "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True", (name, conditions)
        assert conditions.get("NamesAccepted") == "True", (name, conditions)


def test_category_ml_lists_both_kinds_with_printer_columns(kubectl, namespace) -> None:
    _apply(kubectl, namespace, _sample("mlpipeline-digits.yaml"), check=True)
    _apply(kubectl, namespace, _sample("modeldeployment-digits.yaml"), check=True)
    out = kubectl("get", "ml", "-n", namespace).stdout
    assert "mlpipeline.conveyor.dev/digits" in out
    assert "modeldeployment.conveyor.dev/digits" in out
    header = kubectl("get", "mdep", "-n", namespace).stdout.splitlines()[0].split()
    assert header[:6] == ["NAME", "READY", "STABLE", "CANARY", "WEIGHT", "PHASE"]
    header = kubectl("get", "mlp", "-n", namespace).stdout.splitlines()[0].split()
    assert header[:5] == ["NAME", "PHASE", "RUN", "LATEST", "METRIC"]


def test_batch_prediction_lists_under_ml_with_printer_columns(kubectl, namespace) -> None:
    _apply(kubectl, namespace, _sample(BATCH), check=True)
    assert "batchprediction.conveyor.dev/fraud-nightly" in kubectl("get", "ml", "-n", namespace).stdout
    header = kubectl("get", "bp", "-n", namespace).stdout.splitlines()[0].split()
    assert header[:6] == ["NAME", "PHASE", "RUN", "VERSION", "SCORED", "REJECTED"]
    out = kubectl("explain", "batchprediction.spec.input.idColumns").stdout
    assert "joined back to its row" in out


def test_explain_documents_the_fields(kubectl) -> None:
    out = kubectl("explain", "mlpipeline.spec.training.workerGroups").stdout
    assert "nvidia.com/gpu per worker pod" in out
    out = kubectl("explain", "modeldeployment.spec.rollout.steps").stdout
    assert "strictly rising" in out


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_every_sample_applies_and_gets_defaults(kubectl, namespace, path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} holds no object"
    for doc in docs:
        proc = _apply(kubectl, namespace, doc)
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"
        stored = json.loads(
            kubectl("get", doc["kind"].lower(), doc["metadata"]["name"], "-n", namespace, "-o", "json").stdout
        )
        if doc["kind"] == "MLPipeline":
            assert stored["spec"]["runsHistoryLimit"] >= 1
            assert stored["spec"]["data"]["split"]["testFraction"] > 0
        elif doc["kind"] == "BatchPrediction":
            assert stored["spec"]["suspend"] is False and stored["spec"]["ray"]["workerGroups"][0]["gpus"] == 0
            assert stored["spec"]["model"]["version"] == "latest" and stored["spec"]["input"]["format"] == "parquet"
        else:
            assert stored["spec"]["rollout"]["interval"]
            assert stored["spec"]["predictor"]["protocol"] in ("v1", "v2")


Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    def mutate(obj: dict[str, Any]) -> None:
        keys = path.split(".")
        node = obj
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value

    return mutate


def _delete(path: str) -> Mutation:
    def mutate(obj: dict[str, Any]) -> None:
        keys = path.split(".")
        node = obj
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return mutate


def _both(*mutations: Mutation) -> Mutation:
    def mutate(obj: dict[str, Any]) -> None:
        for m in mutations:
            m(obj)

    return mutate


PIPELINE = "mlpipeline-digits.yaml"
DEPLOYMENT = "modeldeployment-digits.yaml"
BATCH = "batchprediction-fraud.yaml"

# (sample, mutation, field path the error must name, words of the message)
INVALID = [
    ("missing-registry", PIPELINE, _delete("spec.registry"), "spec.registry", "Required value"),
    ("bad-source-scheme", PIPELINE, _set("spec.data.source.uri", "ftp://host/data.csv"), "spec.data.source.uri", "should match"),
    ("builtin-format-with-file", PIPELINE, _set("spec.data.source.uri", "file:///data/x.parquet"), "spec.data.source", "builtin://"),
    ("column-min-above-max", PIPELINE,
     _set("spec.data.contract.columns", [{"name": "amount", "min": 10, "max": 1}]),
     "spec.data.contract.columns[0]", "min must not exceed max"),
    ("duplicate-column", PIPELINE,
     _set("spec.data.contract.columns", [{"name": "a"}, {"name": "a"}]),
     "spec.data.contract.columns", "duplicate entries"),
    ("test-fraction-too-big", PIPELINE, _set("spec.data.split.testFraction", 0.9), "spec.data.split.testFraction", "less than or equal to 0.5"),
    ("clip-without-bounds", PIPELINE,
     _set("spec.features", {"transforms": [{"type": "clip", "columns": ["amount"]}]}),
     "spec.features.transforms[0]", "clip transform needs min, max or both"),
    ("bucketize-descending", PIPELINE,
     _set("spec.features", {"transforms": [{"type": "bucketize", "columns": ["hour"], "boundaries": [18, 6]}]}),
     "spec.features.transforms[0].boundaries", "ascending"),
    ("negative-gpus", PIPELINE, _set("spec.training.workerGroups.0.gpus", -1), "spec.training.workerGroups[0].gpus", "greater than or equal to 0"),
    ("cpu-not-a-quantity", PIPELINE, _set("spec.training.workerGroups.0.cpu", "lots"), "spec.training.workerGroups[0].cpu", "quantity"),
    ("gpu-without-gpu-workers", PIPELINE, _set("spec.training.useGpu", True), "spec.training.useGpu", "gpus > 0"),
    ("accuracy-threshold-above-1", PIPELINE, _set("spec.evaluation.threshold", 1.5), "spec.evaluation.threshold", "within 0..1"),
    ("regression-with-accuracy", PIPELINE, _set("spec.data.task", "regression"), "spec.evaluation.metric", "rmse or mae"),
    ("class-of-a-classless-metric", PIPELINE,
     _set("spec.evaluation.metrics", [{"metric": "rocAuc", "class": "1", "threshold": 0.8}]),
     "spec.evaluation.metrics[0].class", "precision, recall and f1 only"),
    ("recall-requirement-above-1", PIPELINE,
     _set("spec.evaluation.metrics", [{"metric": "recall", "threshold": 1.5}]),
     "spec.evaluation.metrics[0].threshold", "within 0..1"),
    ("custom-without-module", PIPELINE, _set("spec.training.model", {"architecture": "custom"}),
     "spec.training.model.module", "architecture custom needs module"),
    ("module-without-custom", PIPELINE,
     _set("spec.training.model", {"architecture": "mlp", "module": "acme.models:build"}),
     "spec.training.model.module", "module applies to architecture custom only"),
    ("module-not-importable-name", PIPELINE,
     _set("spec.training.model", {"architecture": "custom", "module": "acme/models.py"}),
     "spec.training.model.module", "should match"),
    ("error-metric-required-of-a-classifier", PIPELINE,
     _set("spec.evaluation.metrics", [{"metric": "rmse", "threshold": 3}]),
     "spec.evaluation.metrics", "rmse or mae for task regression"),
    ("cron-not-cron", PIPELINE, _set("spec.triggers.schedule", "every monday"), "spec.triggers.schedule", "should match"),
    ("zero-learning-rate", PIPELINE, _set("spec.training.hyperparameters.learningRate", 0), "spec.training.hyperparameters.learningRate", "greater than 0"),
    ("drift-trigger-without-deploy", PIPELINE, _delete("spec.deploy"), "spec.triggers.onDrift", "needs spec.deploy"),
    ("min-above-max-replicas", DEPLOYMENT,
     _set("spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2}),
     "spec.autoscaling.minReplicas", "must not exceed autoscaling.maxReplicas"),
    ("steps-falling", DEPLOYMENT, _set("spec.rollout.steps", [50, 10]), "spec.rollout.steps", "must rise"),
    ("step-zero", DEPLOYMENT, _set("spec.rollout.steps", [0, 50]), "spec.rollout.steps[0]", "greater than or equal to 1"),
    ("step-over-100", DEPLOYMENT, _set("spec.rollout.steps", [10, 150]), "spec.rollout.steps[1]", "less than or equal to 100"),
    ("step-repeated", DEPLOYMENT, _set("spec.rollout.steps", [10, 10, 100]), "spec.rollout.steps", "duplicate entries"),
    ("scale-to-zero-in-standard", DEPLOYMENT, _set("spec.rollout.mode", "Standard"), "spec.autoscaling.minReplicas", "scale to zero"),
    ("version-not-vN", DEPLOYMENT, _set("spec.model.version", "3"), "spec.model.version", "should match"),
    ("success-rate-above-1", DEPLOYMENT, _set("spec.rollout.analysis.minSuccessRate", 1.5), "spec.rollout.analysis.minSuccessRate", "less than or equal to 1"),
    ("check-without-bounds", DEPLOYMENT,
     _set("spec.rollout.analysis.checks", [{"name": "errors", "query": "sum(rate(x[1m]))"}]),
     "spec.rollout.analysis.checks[0]", "needs min, max or both"),
    ("zero-drift-threshold", DEPLOYMENT, _set("spec.monitoring.drift.threshold", 0), "spec.monitoring.drift.threshold", "greater than 0"),
    ("requests-above-limits", DEPLOYMENT,
     _set("spec.predictor.resources", {"requests": {"cpu": "4"}, "limits": {"cpu": "1"}}),
     "spec.predictor.resources.requests.cpu", "must not exceed resources.limits.cpu"),
    ("interval-prose", DEPLOYMENT, _set("spec.rollout.interval", "5 minutes"), "spec.rollout.interval", "should match"),
    ("unknown-protocol", DEPLOYMENT, _set("spec.predictor.protocol", "v3"), "spec.predictor.protocol", "Unsupported value"),
    ("negative-predictor-gpus", DEPLOYMENT, _set("spec.predictor.gpus", -1), "spec.predictor.gpus", "greater than or equal to 0"),
    ("concurrency-metric-in-standard", DEPLOYMENT,
     _both(_set("spec.rollout.mode", "Standard"), _set("spec.autoscaling", {"minReplicas": 1, "maxReplicas": 2})),
     "spec.autoscaling.metric", "set autoscaling.metric to cpu"),
    ("scale-to-zero-on-cpu", DEPLOYMENT,
     _set("spec.autoscaling", {"minReplicas": 0, "maxReplicas": 2, "metric": "cpu", "target": 70}),
     "spec.autoscaling.minReplicas", "cannot scale to zero"),
    # Hostile specs: names that would not fit downstream, paths that escape, sizes beyond reason.
    ("pipeline-name-too-long", PIPELINE, _set("metadata.name", "p" * 41), "metadata.name", "at most 40 characters"),
    ("deployment-name-too-long", DEPLOYMENT, _set("metadata.name", "d" * 46), "metadata.name", "at most 45 characters"),
    ("deployment-name-not-dns-1035", DEPLOYMENT, _set("metadata.name", "1fraud"), "metadata.name", "start with a letter"),
    ("registry-uri-escapes", PIPELINE, _set("spec.registry.uri", "file:///models/../etc"), "spec.registry.uri", ". or .. path segments"),
    ("model-registry-uri-escapes", DEPLOYMENT, _set("spec.model.registryUri", "s3://bucket/models/.."), "spec.model.registryUri", ". or .. path segments"),
    ("model-name-is-a-path", PIPELINE, _set("spec.registry.modelName", "../etc"), "spec.registry.modelName", "should match"),
    ("absolute-model-name", DEPLOYMENT, _set("spec.model.name", "/etc/passwd"), "spec.model.name", "should match"),
    ("image-beyond-sane-length", DEPLOYMENT, _set("spec.predictor.image", "r/" + "x" * 5000), "spec.predictor.image", "Too long"),
    ("query-beyond-sane-length", DEPLOYMENT,
     _set("spec.rollout.analysis.checks", [{"name": "q", "query": "x" * 5000, "max": 1}]),
     "spec.rollout.analysis.checks[0].query", "Too long"),
    ("cron-never-fires", PIPELINE, _set("spec.triggers.schedule", "0 0 30 2 *"), "spec.triggers.schedule", "never fires"),
    ("cron-with-seconds", PIPELINE, _set("spec.triggers.schedule", "* * * * * *"), "spec.triggers.schedule", "should match"),
    ("node-selector-value-not-a-label", DEPLOYMENT,
     _set("spec.predictor.nodeSelector", {"pool": "gpu pool!"}), "spec.predictor.nodeSelector.pool", "should match"),
    ("node-selector-key-not-a-label", PIPELINE,
     _set("spec.training.workerGroups.0.nodeSelector", {"bad key": "x"}), "spec.training.workerGroups[0].nodeSelector", "label keys"),
    ("batch-two-models", BATCH, _set("spec.model.modelDeployment", "fraud"), "spec.model", "exactly one of"),
    ("batch-no-model", BATCH, _delete("spec.model.pipeline"), "spec.model", "exactly one of"),
    ("batch-registry-without-name", BATCH,
     _set("spec.model", {"registryUri": "s3://conveyor/models"}), "spec.model.name", "goes with model.registryUri"),
    ("batch-version-with-pipeline", BATCH, _set("spec.model.version", "v3"), "spec.model.version", "pins a registry version"),
    ("batch-output-not-a-uri", BATCH, _set("spec.output.uri", "scores/today"), "spec.output.uri", "should match"),
    ("batch-output-escapes", BATCH, _set("spec.output.uri", "s3://conveyor/scores/../models"), "spec.output.uri", ". or .. path segments"),
    ("batch-missing-input", BATCH, _delete("spec.input"), "spec.input", "Required value"),
    ("batch-format-unknown", BATCH, _set("spec.input.format", "xlsx"), "spec.input.format", "Unsupported value"),
    ("batch-id-column-twice", BATCH, _set("spec.input.idColumns", ["txn_id", "txn_id"]), "spec.input.idColumns", "duplicate entries"),
    ("batch-cron-not-cron", BATCH, _set("spec.schedule", "nightly"), "spec.schedule", "should match"),
    ("batch-gpu-without-gpu-workers", BATCH, _set("spec.ray.useGpu", True), "spec.ray.useGpu", "gpus > 0"),
    ("batch-zero-batch-size", BATCH, _set("spec.batchSize", 0), "spec.batchSize", "greater than or equal to 1"),
    ("batch-name-too-long", BATCH, _set("metadata.name", "b" * 35), "metadata.name", "at most 34 characters"),
]


@pytest.mark.parametrize(
    ("sample", "mutate", "field", "words"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_object_is_rejected_naming_the_field(kubectl, namespace, sample, mutate, field, words) -> None:
    obj = copy.deepcopy(_sample(sample))
    mutate(obj)
    proc = _apply(kubectl, namespace, obj)
    assert proc.returncode != 0, f"the apiserver accepted an invalid object: {json.dumps(obj['spec'])}"
    assert field in proc.stderr, proc.stderr
    assert words in proc.stderr, proc.stderr
    # Nothing was stored.
    got = kubectl("get", obj["kind"].lower(), obj["metadata"]["name"], "-n", namespace, check=False)
    assert got.returncode != 0


IMMUTABLE = [
    ("registry", PIPELINE, _set("spec.registry.modelName", "digits-v2"), "spec.registry", "registry is immutable"),
    ("task", PIPELINE,
     _both(_set("spec.data.task", "regression"), _set("spec.evaluation.metric", "rmse"), _set("spec.evaluation.threshold", 2.0),
           _set("spec.evaluation.mustBeatDeployed", False)),
     "spec.data.task", "data.task is immutable"),
    ("mode", DEPLOYMENT,
     _both(_set("spec.rollout.mode", "Standard"),
           _set("spec.autoscaling", {"minReplicas": 1, "maxReplicas": 2, "metric": "cpu", "target": 70})),
     "spec.rollout.mode", "rollout.mode is immutable"),
    ("mode-removed", DEPLOYMENT, _delete("spec.rollout.mode"), "spec.rollout", "rollout.mode cannot be removed once set"),
]


@pytest.mark.parametrize(
    ("sample", "mutate", "field", "words"), [c[1:] for c in IMMUTABLE], ids=[c[0] for c in IMMUTABLE]
)
def test_fields_fixed_at_creation_cannot_change(kubectl, namespace, sample, mutate, field, words) -> None:
    obj = _sample(sample)
    _apply(kubectl, namespace, obj, check=True)
    changed = copy.deepcopy(obj)
    mutate(changed)
    proc = _apply(kubectl, namespace, changed)
    assert proc.returncode != 0, "the apiserver accepted a change to an immutable field"
    assert field in proc.stderr and words in proc.stderr, proc.stderr
