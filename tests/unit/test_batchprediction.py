"""BatchPrediction: the pure builders and planner, validation, and the reconcile on the in-memory fake API
(what it creates, that a second pass writes nothing, a run's figures taken from its outcome record)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _fake_api import FakeApi

from conveyor.operator.batchprediction.build import (
    LABEL_BATCH,
    ResolvedModel,
    build_rayjob,
    build_run_configmap,
    rayjob_name,
)
from conveyor.operator.batchprediction.plan import MODEL_RESOLVED, ModelResolution, plan_batch
from conveyor.operator.batchprediction.reconcile import reconcile_batch, resolve_model
from conveyor.operator.batchprediction.validate import validate_batch
from conveyor.operator.controller.manager import Operator
from conveyor.operator.controller.validation import InvalidSpecError
from conveyor.operator.mlpipeline.build import build_rayjob as build_training_rayjob
from conveyor.runtime.package.outputs import BatchOutputs
from conveyor.runtime.spec import BatchPredictionSpec, BatchRunConfig, MLPipelineSpec

T = TypeVar("T")
NS = "ml"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
MODEL = ResolvedModel("s3://models", "fraud", "v3")


def batch(output: str = "/data/out", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "BatchPrediction",
        "metadata": {"name": "nightly", "namespace": NS, "uid": "u-1", "generation": 1, "creationTimestamp": "2026-12-01T00:00:00Z"},
        "spec": {
            "model": {"registryUri": "s3://models", "name": "fraud", "version": "v3"},
            "input": {"uri": "s3://data/today.parquet", "idColumns": ["txn_id"]},
            "output": {"uri": output},
            **spec,
        },
    }


def parse(obj: dict[str, Any]) -> BatchPredictionSpec:
    return BatchPredictionSpec.model_validate(obj["spec"])


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def finished(rj: dict[str, Any], job: str = "SUCCEEDED") -> dict[str, Any]:
    rj = json.loads(json.dumps(rj))
    rj["status"] = {"jobDeploymentStatus": "Complete" if job == "SUCCEEDED" else "Failed", "jobStatus": job,
                    "endTime": "2026-12-01T12:05:00Z"}
    return rj


RECORD = {
    "outcome": "Succeeded", "run": 1, "modelVersion": "v3", "rowsScored": 998, "rowsRejected": 2,
    "rejectReasons": [{"reason": "feature 'hour' expects a int value; 1 value is not: 'noon'", "rows": 2}],
    "output": "/data/out/run-1", "durationSeconds": 12.5,
    "drift": {"method": "psi", "score": 0.04, "features": [{"name": "amount", "score": 0.04}]},
}


# ---------------------------------------------------------------- build


def test_rayjob_runs_the_batch_entrypoint_on_the_same_cluster_as_training() -> None:
    obj = batch(ray={"workerGroups": [{"name": "gpu", "replicas": 2, "gpus": 1}], "queue": "team-a", "image": "rt:1"})
    rj = build_rayjob(obj, parse(obj), 4, MODEL, "Schedule")
    assert rj["metadata"]["name"] == "nightly-batch-4"
    assert rj["metadata"]["labels"][LABEL_BATCH] == "nightly"
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert rj["metadata"]["ownerReferences"][0]["kind"] == "BatchPrediction"
    assert rj["spec"]["entrypoint"] == "python -m conveyor.runtime.batch --config /etc/conveyor/run.json"
    assert rj["metadata"]["annotations"]["conveyor.dev/model"] == "s3://models/fraud/v3"
    # The same cluster a training run with the same fields gets (one builder for both kinds).
    training = {"kind": "MLPipeline", "metadata": {"name": "p", "namespace": NS, "uid": "u-2"}, "spec": {
        "data": {"source": {"uri": "builtin://fraud", "format": "builtin"}},
        "registry": {"uri": "s3://models", "modelName": "fraud"},
        "training": {"workerGroups": [{"name": "gpu", "replicas": 2, "gpus": 1}], "image": "rt:1"}}}
    twin = build_training_rayjob(training, MLPipelineSpec.model_validate(training["spec"]), 4)
    strip = json.dumps(rj["spec"]["rayClusterSpec"]).replace("nightly-batch-4-config", "X")
    assert strip == json.dumps(twin["spec"]["rayClusterSpec"]).replace("p-4-config", "X")
    workers = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert [(w["groupName"], w["replicas"]) for w in workers] == [("gpu", 2)]
    assert workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_configmap_holds_the_run_config_the_job_reads() -> None:
    obj = batch(batchSize=256)
    rj = build_rayjob(obj, parse(obj), 1, MODEL)
    rj["metadata"]["uid"] = "rj-1"  # the apiserver's, once created
    cm = build_run_configmap(obj, parse(obj), 1, MODEL, rj)
    assert cm["metadata"]["name"] == "nightly-batch-1-config"
    assert cm["metadata"]["ownerReferences"][0]["kind"] == "RayJob"
    config = BatchRunConfig.model_validate(json.loads(cm["data"]["run.json"]))
    assert (config.registry_uri, config.model_name, config.version, config.run) == ("s3://models", "fraud", "v3", 1)
    assert config.input.id_columns == ["txn_id"] and config.output.uri == "/data/out" and config.batch_size == 256


def test_validate_names_the_field() -> None:
    obj = batch()
    obj["metadata"]["name"] = "x" * 40
    with pytest.raises(InvalidSpecError, match="metadata.name"):
        validate_batch(obj, parse(obj), 1)
    obj = batch(ray={"workerGroups": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(InvalidSpecError, match=r"spec.ray.workerGroups\[1\].name"):
        validate_batch(obj, parse(obj), 1)


# ---------------------------------------------------------------- plan


def test_created_starts_run_one_with_the_resolved_model() -> None:
    obj = batch()
    plan = plan_batch(obj, parse(obj), None, {}, NOW, model=ModelResolution(MODEL))
    assert (plan.start_run, plan.start_trigger, plan.model) == (1, "Created", MODEL)
    run = plan.status["runs"][0]
    assert (run["rayJob"], run["modelVersion"], run["outcome"]) == ("nightly-batch-1", "v3", "Pending")
    assert plan.status["phase"] == "Pending" and condition(plan.status, MODEL_RESOLVED)["status"] == "True"


def test_unresolved_model_starts_nothing_and_says_why() -> None:
    obj = batch()
    plan = plan_batch(obj, parse(obj), None, {}, NOW, model=ModelResolution(None, "spec.model.pipeline: no version yet"))
    assert plan.start_run is None and plan.requeue_after is not None
    resolved = condition(plan.status, MODEL_RESOLVED)
    assert (resolved["status"], resolved["reason"]) == ("False", "ModelUnavailable")
    assert "spec.model.pipeline" in resolved["message"]


def _after_start(obj: dict[str, Any]) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    plan = plan_batch(obj, parse(obj), None, {}, NOW, model=ModelResolution(MODEL))
    obj = {**obj, "status": plan.status}
    return obj, {1: build_rayjob(obj, parse(obj), 1, MODEL)}


def test_finished_run_takes_its_figures_from_the_record() -> None:
    obj, rayjobs = _after_start(batch())
    rayjobs[1] = finished(rayjobs[1])
    plan = plan_batch(obj, parse(obj), None, rayjobs, NOW, model=ModelResolution(MODEL), reports={1: RECORD})
    run = plan.status["runs"][0]
    assert run["outcome"] == "Succeeded"
    assert (run["rowsScored"], run["rowsRejected"], run["output"], run["durationSeconds"]) == (998, 2, "/data/out/run-1", 12.5)
    assert run["drift"]["score"] == 0.04 and "noon" in run["message"]
    assert plan.status["lastOutput"] == "/data/out/run-1" and plan.status["phase"] == "Succeeded"
    assert condition(plan.status, "Succeeded")["status"] == "True"
    assert ("Warning", "RowsRejected") in [(t, r) for t, r, _ in plan.events]
    assert plan.start_run is None  # nothing new is due


def test_succeeded_job_without_a_record_failed() -> None:
    obj, rayjobs = _after_start(batch())
    rayjobs[1] = finished(rayjobs[1])
    plan = plan_batch(obj, parse(obj), None, rayjobs, NOW, model=ModelResolution(MODEL), reports={})
    run = plan.status["runs"][0]
    assert (run["outcome"], run["reason"]) == ("Failed", "NoOutcomeRecord")
    assert condition(plan.status, "Succeeded")["status"] == "False"


def test_failed_job_carries_the_records_message() -> None:
    obj, rayjobs = _after_start(batch())
    rayjobs[1] = finished(rayjobs[1], "FAILED")
    report = {"outcome": "Failed", "message": "FileNotFoundError: data.source.uri 's3://data/today.parquet'"}
    plan = plan_batch(obj, parse(obj), None, rayjobs, NOW, model=ModelResolution(MODEL), reports={1: report})
    run = plan.status["runs"][0]
    assert run["outcome"] == "Failed" and "FileNotFoundError" in run["message"]


def test_schedule_and_rerun_start_new_runs_one_at_a_time() -> None:
    obj, rayjobs = _after_start(batch(schedule="0 * * * *"))
    later = NOW + timedelta(hours=1, minutes=1)
    # A firing while run 1 is active is skipped.
    plan = plan_batch(obj, parse(obj), None, rayjobs, later, model=ModelResolution(MODEL))
    assert plan.start_run is None and ("Normal", "ScheduleSkipped") in [(t, r) for t, r, _ in plan.events]
    rayjobs[1] = finished(rayjobs[1])
    obj = {**obj, "status": plan.status}
    plan = plan_batch(obj, parse(obj), None, rayjobs, later + timedelta(hours=1), model=ModelResolution(MODEL), reports={1: RECORD})
    assert (plan.start_run, plan.start_trigger) == (2, "Schedule")
    assert plan.status["nextScheduleTime"] == "2026-12-01T15:00:00Z"
    # A rerun request after that run ends starts run 3.
    obj = {**obj, "status": plan.status, "metadata": {**obj["metadata"], "annotations": {"conveyor.dev/rerun": "a"}}}
    rayjobs[2] = finished(build_rayjob(obj, parse(obj), 2, MODEL))
    plan = plan_batch(obj, parse(obj), None, rayjobs, later + timedelta(hours=1, minutes=5), model=ModelResolution(MODEL),
                      reports={2: {**RECORD, "run": 2}})
    assert (plan.start_run, plan.start_trigger) == (3, "Rerun")


def test_invalid_spec_refused_with_the_field() -> None:
    obj = batch()
    plan = plan_batch(obj, None, "spec.ray.workerGroups[1].name: used twice", {}, NOW, model=ModelResolution(None, ""))
    accepted = condition(plan.status, "Accepted")
    assert accepted["status"] == "False" and "spec.ray.workerGroups[1].name" in accepted["message"]
    assert plan.start_run is None


# ---------------------------------------------------------------- reconcile (fake API)


def run(fn: Callable[[Operator, FakeApi], Awaitable[T]]) -> T:
    async def main() -> T:
        api = FakeApi()
        op = Operator(client=api, clock=lambda: NOW)
        try:
            return await fn(op, api)
        finally:
            await op.stop()

    return asyncio.run(main())


def test_reconcile_creates_the_run_then_reads_its_record(tmp_path: Path) -> None:
    out = str(tmp_path / "out")

    async def scenario(op: Operator, api: FakeApi) -> None:
        op.batches.remember(api.put(batch(out)))
        await reconcile_batch(op, (NS, "nightly"))
        assert api.writes == [("apply", "RayJob", "nightly-batch-1"), ("apply", "ConfigMap", "nightly-batch-1-config"),
                              ("status", "BatchPrediction", "nightly")]
        op.batches.remember(api.find("BatchPrediction", NS, "nightly"))  # type: ignore[arg-type]
        api.writes.clear()
        await reconcile_batch(op, (NS, "nightly"))
        assert api.writes == []  # a second pass changes nothing
        # The job ends and writes its record next to its output: the next pass takes the figures.
        BatchOutputs(out).write_record(1, {**RECORD, "output": f"{out}/run-1"})
        op.rayjobs.remember(api.put(finished(api.find("RayJob", NS, "nightly-batch-1"))))  # type: ignore[arg-type]
        await reconcile_batch(op, (NS, "nightly"))
        status = api.find("BatchPrediction", NS, "nightly")["status"]  # type: ignore[index]
        assert status["phase"] == "Succeeded" and status["runs"][0]["rowsScored"] == 998
        assert status["lastOutput"] == f"{out}/run-1"

    run(scenario)


def test_model_resolves_from_a_pipeline_or_a_deployment() -> None:
    async def scenario(op: Operator, api: FakeApi) -> None:
        spec = BatchPredictionSpec.model_validate({"model": {"pipeline": "fraud"}, "input": {"uri": "/in"}, "output": {"uri": "/o"}})
        assert resolve_model(op, NS, spec).model is None
        op.pipelines.remember({"apiVersion": "conveyor.dev/v1alpha1", "kind": "MLPipeline", "metadata": {"name": "fraud", "namespace": NS},
                               "spec": {"registry": {"uri": "s3://models", "modelName": "fraud"}}, "status": {}})
        assert "no version that passed" in resolve_model(op, NS, spec).problem
        op.pipelines.remember({"apiVersion": "conveyor.dev/v1alpha1", "kind": "MLPipeline", "metadata": {"name": "fraud", "namespace": NS},
                               "spec": {"registry": {"uri": "s3://models", "modelName": "fraud"}}, "status": {"latestVersion": "v7"}})
        assert resolve_model(op, NS, spec).model == ResolvedModel("s3://models", "fraud", "v7")
        spec = BatchPredictionSpec.model_validate({"model": {"modelDeployment": "fraud"}, "input": {"uri": "/in"}, "output": {"uri": "/o"}})
        op.deployments.remember({"apiVersion": "conveyor.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "fraud", "namespace": NS},
                                 "spec": {"model": {"registryUri": "s3://models", "name": "fraud"}}, "status": {"stableVersion": "v5"}})
        assert resolve_model(op, NS, spec).model == ResolvedModel("s3://models", "fraud", "v5")
        assert rayjob_name("nightly", 2) == "nightly-batch-2"

    run(scenario)
