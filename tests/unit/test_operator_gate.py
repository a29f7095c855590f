"""The evaluation gate and finding a run's version, against a real file:// registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conveyor.operator.mlpipeline.gate import evaluate_gate, find_run_version, numeric_metrics
from conveyor.runtime.package.registry import Registry
from conveyor.runtime.spec import EvaluationSpec


def meta(**metrics: Any) -> dict[str, Any]:
    return {"metrics": metrics}


def pair(value: float, *, metric: str = "accuracy", version: str = "v1", error: str = "", **deployed: float) -> dict[str, Any]:
    """A candidate's metadata as a run with mustBeatDeployed records it: its own metric and the deployed
    version's figures on the same test split (metrics.json `deployed`)."""
    scored: dict[str, Any] = {"version": version, "packageUri": f"file:///r/fraud/{version}"}
    scored.update({"error": error} if error else {"testSamples": 400, "metrics": deployed})
    return {"metrics": {metric: value, "deployed": scored}}


@pytest.mark.parametrize(
    ("evaluation", "candidate", "deployed", "passed", "reason"),
    [
        ({"metric": "accuracy", "threshold": 0.9}, meta(accuracy=0.95), None, True, "Passed"),
        ({"metric": "accuracy", "threshold": 0.9}, meta(accuracy=0.9), None, True, "Passed"),
        ({"metric": "accuracy", "threshold": 0.9}, meta(accuracy=0.85), None, False, "BelowThreshold"),
        ({"metric": "rmse", "threshold": 2.0}, meta(rmse=1.5), None, True, "Passed"),
        ({"metric": "rmse", "threshold": 2.0}, meta(rmse=2.5), None, False, "BelowThreshold"),
        ({"metric": "f1Macro", "threshold": 0.5}, meta(accuracy=0.9), None, False, "MetricMissing"),
        ({"metric": "accuracy", "threshold": 0.5}, meta(accuracy=float("nan")), None, False, "MetricMissing"),
        # must beat the deployed version by the margin, both measured by the run on its own test split
        ({"metric": "accuracy", "threshold": 0.5, "mustBeatDeployed": True, "margin": 0.01}, pair(0.92, accuracy=0.90), "v1", True, "Passed"),
        ({"metric": "accuracy", "threshold": 0.5, "mustBeatDeployed": True, "margin": 0.05}, pair(0.92, accuracy=0.90), "v1", False, "DidNotBeatDeployed"),
        ({"metric": "mae", "threshold": 9, "mustBeatDeployed": True, "margin": 0.1}, pair(1.0, metric="mae", mae=1.2), "v1", True, "Passed"),
        ({"metric": "mae", "threshold": 9, "mustBeatDeployed": True, "margin": 0.1}, pair(1.15, metric="mae", mae=1.2), "v1", False, "DidNotBeatDeployed"),
        # the run could not score the deployed package: never a pass
        ({"metric": "accuracy", "threshold": 0.5, "mustBeatDeployed": True}, pair(0.92, error="cannot be read: boom"), "v1", False, "DeployedUnreadable"),
        ({"metric": "accuracy", "threshold": 0.5, "mustBeatDeployed": True}, pair(0.92, rmse=0.1), "v1", False, "DeployedUnreadable"),
        # the run scored another version (the deployment moved on since it started), or none
        ({"metric": "accuracy", "threshold": 0.5, "mustBeatDeployed": True}, pair(0.92, version="v0", accuracy=0.5), "v1", False, "DeployedNotEvaluated"),
        ({"metric": "accuracy", "threshold": 0.5, "mustBeatDeployed": True}, meta(accuracy=0.92), "v1", False, "DeployedNotEvaluated"),
        # nothing deployed: nothing to beat
        ({"metric": "accuracy", "threshold": 0.5, "mustBeatDeployed": True, "margin": 0.5}, meta(accuracy=0.6), None, True, "Passed"),
        # below its own threshold: that reason first
        ({"metric": "accuracy", "threshold": 0.95, "mustBeatDeployed": True}, pair(0.92, accuracy=0.5), "v1", False, "BelowThreshold"),
        # not asked to beat it
        ({"metric": "accuracy", "threshold": 0.5}, pair(0.6, accuracy=0.99), "v1", True, "Passed"),
        # evaluation.metrics[]: every requirement must pass too (recall of the positive class beside ROC AUC)
        ({"metric": "rocAuc", "threshold": 0.85, "metrics": [{"metric": "recall", "threshold": 0.5}]}, meta(rocAuc=0.9, recall=0.6), None, True, "Passed"),
        ({"metric": "rocAuc", "threshold": 0.85, "metrics": [{"metric": "recall", "threshold": 0.5}]}, meta(rocAuc=0.9, recall=0.2), None, False, "BelowThreshold"),
        ({"metric": "rocAuc", "threshold": 0.85, "metrics": [{"metric": "recall", "threshold": 0.5}]}, meta(rocAuc=0.8, recall=0.9), None, False, "BelowThreshold"),
        ({"metric": "accuracy", "threshold": 0.5, "metrics": [{"metric": "recall", "class": "fraud", "threshold": 0.5}]}, {"metrics": {"accuracy": 0.9, "recall:fraud": 0.7}}, None, True, "Passed"),
        ({"metric": "accuracy", "threshold": 0.5, "metrics": [{"metric": "recall", "class": "fraud", "threshold": 0.5}]}, meta(accuracy=0.9, recall=0.7), None, False, "MetricMissing"),
        ({"metric": "accuracy", "threshold": 0.5, "metrics": [{"metric": "mae", "threshold": 2}]}, meta(accuracy=0.9, mae=3), None, False, "BelowThreshold"),
    ],
)
def test_gate_table(evaluation: dict[str, Any], candidate: dict[str, Any], deployed: str | None, passed: bool, reason: str) -> None:
    result = evaluate_gate(EvaluationSpec.model_validate(evaluation), candidate, deployed_version=deployed)
    assert (result.passed, result.reason) == (passed, reason), result.message
    assert result.metric in result.message or reason.startswith("Deployed")
    if reason in ("DidNotBeatDeployed", "Passed") and deployed and evaluation.get("mustBeatDeployed"):
        assert "400 rows" in result.message and result.baseline_value is not None  # on the run's own split


def write_package(registry: Registry, run: int, pipeline: str = "fraud", accuracy: float = 0.9) -> str:
    def writer(area: Any) -> dict[str, Any]:
        area.write_bytes("model.pt", b"not-a-real-model")
        for name in ("transforms.json", "schema.json", "profile.json"):
            area.write_json(name, {})
        area.write_json("metrics.json", {"accuracy": accuracy, "confusionMatrix": [[1, 0], [0, 1]], "history": []})
        area.write_json("lineage.json", {"pipeline": pipeline, "namespace": "ml", "run": run})
        return {"task": "classification", "architecture": "mlp"}

    return registry.register(writer)


def test_find_run_version_by_lineage(tmp_path: Path) -> None:
    registry = Registry(f"file://{tmp_path}", "fraud")
    assert write_package(registry, 1) == "v1"
    assert write_package(registry, 2, pipeline="other") == "v2"
    assert write_package(registry, 2, accuracy=0.97) == "v3"
    found = find_run_version(registry, pipeline="fraud", namespace="ml", run=2)
    assert found is not None
    version, metadata = found
    assert version == "v3" and numeric_metrics(metadata) == {"accuracy": 0.97}
    assert find_run_version(registry, pipeline="fraud", namespace="ml", run=7) is None
    assert find_run_version(registry, pipeline="fraud", namespace="other-ns", run=1) is None


def test_an_unreadable_deployed_package_fails_must_beat_deployed(tmp_path: Path) -> None:
    from conveyor.operator.mlpipeline.gate import judge_run

    registry = Registry(f"file://{tmp_path}", "fraud")
    assert write_package(registry, 1, accuracy=0.9) == "v1"
    assert write_package(registry, 2, accuracy=0.99) == "v2"
    (tmp_path / "fraud" / "v1" / "metrics.json").write_text('{"accuracy": 1.0}')  # corrupt: sha256 differs
    evaluation = EvaluationSpec.model_validate({"metric": "accuracy", "threshold": 0.5, "mustBeatDeployed": True})
    outcome = judge_run(registry, evaluation, pipeline="fraud", namespace="ml", run=2, deployed=("v1", registry))
    assert outcome.version == "v2" and outcome.result is not None
    assert (outcome.result.passed, outcome.result.reason) == (False, "DeployedUnreadable")
    assert "v1" in outcome.result.message and "metrics.json" in outcome.result.message


def test_the_deployed_version_is_judged_by_the_run_figures_not_its_own(tmp_path: Path) -> None:
    """v1 recorded 0.80 on its own test split; on run 2's split it scores 0.95: the candidate's 0.93 loses."""
    from conveyor.operator.mlpipeline.gate import judge_run

    registry = Registry(f"file://{tmp_path}", "fraud")
    assert write_package(registry, 1, accuracy=0.80) == "v1"

    def writer(area: Any) -> dict[str, Any]:
        area.write_bytes("model.pt", b"not-a-real-model")
        for name in ("transforms.json", "schema.json", "profile.json"):
            area.write_json(name, {})
        scored = {"version": "v1", "packageUri": registry.package_uri("v1"), "testSamples": 400, "metrics": {"accuracy": 0.95}}
        area.write_json("metrics.json", {"accuracy": 0.93, "deployed": scored})
        area.write_json("lineage.json", {"pipeline": "fraud", "namespace": "ml", "run": 2})
        return {"task": "classification", "architecture": "mlp"}

    assert registry.register(writer) == "v2"
    evaluation = EvaluationSpec.model_validate({"metric": "accuracy", "threshold": 0.5, "mustBeatDeployed": True})
    outcome = judge_run(registry, evaluation, pipeline="fraud", namespace="ml", run=2, deployed=("v1", registry))
    assert outcome.result is not None and (outcome.result.passed, outcome.result.reason) == (False, "DidNotBeatDeployed")
    assert outcome.result.baseline_value == 0.95 and "0.95" in outcome.result.message
    assert "deployed" not in outcome.metrics  # status.runs[].metrics stays scalar
