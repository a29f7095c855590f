"""Each kind's reconcile (observe -> plan -> act) on an in-memory fake of the API client: what it creates,
that a second pass writes nothing, a 409 on the status write, and adoption of a child made before a crash.
The same paths run against the real kube-apiserver in tests/integration."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _fake_api import FakeApi

from conveyor.operator.controller.manager import Operator
from conveyor.operator.controller.workqueue import Requeue
from conveyor.operator.mlpipeline.build import build_rayjob
from conveyor.operator.mlpipeline.reconcile import reconcile_pipeline
from conveyor.operator.modeldeployment.reconcile import reconcile_deployment
from conveyor.runtime.package.registry import Registry
from conveyor.runtime.spec import MLPipelineSpec

T = TypeVar("T")
NS = "ml"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def run(fn: Callable[[Operator, FakeApi], Awaitable[T]]) -> T:
    async def main() -> T:
        api = FakeApi()
        op = Operator(client=api, clock=lambda: NOW)
        try:
            return await fn(op, api)
        finally:
            await op.stop()

    return asyncio.run(main())


def pipeline(registry: str) -> dict[str, Any]:
    return {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "MLPipeline",
        "metadata": {"name": "fraud", "namespace": NS},
        "spec": {
            "data": {"source": {"uri": "builtin://fraud", "format": "builtin"}},
            "registry": {"uri": registry, "modelName": "fraud"},
            "evaluation": {"metric": "accuracy", "threshold": 0.9},
        },
    }


def deployment(registry: str, version: str) -> dict[str, Any]:
    return {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "fraud", "namespace": NS},
        "spec": {"model": {"registryUri": registry, "name": "fraud", "version": version}},
    }


def commit_version(registry: str) -> str:
    def writer(area: Any) -> dict[str, Any]:
        area.write_bytes("model.pt", b"weights")
        for name in ("transforms.json", "schema.json", "profile.json", "metrics.json", "lineage.json"):
            area.write_json(name, {})
        return {"task": "classification", "architecture": "mlp"}

    return Registry(registry, "fraud").register(writer)


@pytest.fixture
def registry(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'registry'}"


# ---------------------------------------------------------------- MLPipeline


def test_pipeline_create_then_noop(registry: str) -> None:
    async def scenario(op: Operator, api: FakeApi) -> None:
        op.pipelines.remember(api.put(pipeline(registry)))
        await reconcile_pipeline(op, (NS, "fraud"))
        assert api.writes == [
            ("create", "RayJob", "fraud-1"),
            ("apply", "ConfigMap", "fraud-1-config"),
            ("status", "MLPipeline", "fraud"),
        ]
        status = api.find("MLPipeline", NS, "fraud")["status"]  # type: ignore[index]
        assert (
            status["lastRun"] == 1
            and status["runs"][0]["trigger"] == "Created"
            and status["phase"] == "Pending"
        )
        # The watch would now deliver the written objects; a second pass changes nothing and writes nothing.
        op.pipelines.remember(api.find("MLPipeline", NS, "fraud"))  # type: ignore[arg-type]
        api.writes.clear()
        await reconcile_pipeline(op, (NS, "fraud"))
        assert api.writes == []

    run(scenario)


def test_pipeline_status_conflict_on_a_metadata_edit_records_the_run_on_the_fresh_copy(registry: str) -> None:
    """Someone labels the pipeline after our read: the run this reconcile started is recorded anyway (its
    RayJob exists), on the fresh copy, which keeps their label."""

    async def scenario(op: Operator, api: FakeApi) -> None:
        stale = api.put(pipeline(registry))
        api.edit(stale, labels={"team": "risk"})  # someone writes after our read
        op.pipelines.remember(stale)
        await reconcile_pipeline(op, (NS, "fraud"))
        stored = api.find("MLPipeline", NS, "fraud")
        assert stored["status"]["lastRun"] == 1 and stored["metadata"]["labels"] == {"team": "risk"}  # type: ignore[index]
        assert op.pipelines.get((NS, "fraud"))["metadata"]["labels"] == {"team": "risk"}  # type: ignore[index]
        assert [rj["metadata"]["name"] for rj in api.kinds("RayJob")] == ["fraud-1"]

    run(scenario)


def test_pipeline_status_conflict_on_a_status_change_rereads_and_requeues(registry: str) -> None:
    """The status changed after our read (another writer): nothing is written over it; the retry plans
    from the fresh copy."""

    async def scenario(op: Operator, api: FakeApi) -> None:
        stale = api.put(pipeline(registry))
        api.objects[("mlpipelines", NS, "fraud")]["status"] = {"phase": "Pending"}
        api.edit(stale)
        op.pipelines.remember(stale)
        with pytest.raises(Requeue):
            await reconcile_pipeline(op, (NS, "fraud"))
        assert op.pipelines.get((NS, "fraud"))["status"] == {"phase": "Pending"}  # type: ignore[index]
        await reconcile_pipeline(op, (NS, "fraud"))  # the retry plans from the fresh copy
        assert api.find("MLPipeline", NS, "fraud")["status"]["lastRun"] == 1  # type: ignore[index]
        assert [rj["metadata"]["name"] for rj in api.kinds("RayJob")] == ["fraud-1"]

    run(scenario)


def test_pipeline_adopts_a_rayjob_created_before_a_crash(registry: str) -> None:
    """The RayJob exists in the API, but neither the cache nor the status knows it."""

    async def scenario(op: Operator, api: FakeApi) -> None:
        obj = api.put(pipeline(registry))
        api.put(build_rayjob(obj, MLPipelineSpec.model_validate(obj["spec"]), 1, "Created"))
        op.pipelines.remember(obj)
        with pytest.raises(Requeue):  # found while acting: plan again rather than create a second one
            await reconcile_pipeline(op, (NS, "fraud"))
        assert api.writes == []
        await reconcile_pipeline(op, (NS, "fraud"))
        assert ("create", "RayJob", "fraud-1") not in api.writes and (
            "apply",
            "RayJob",
            "fraud-1",
        ) not in api.writes
        status = api.find("MLPipeline", NS, "fraud")["status"]  # type: ignore[index]
        assert status["lastRun"] == 1 and status["runs"][0]["rayJob"] == "fraud-1"
        assert len(api.kinds("RayJob")) == 1
        # Its ConfigMap was never made (the crash came first): created now, or its pods would wait for ever.
        assert api.find("ConfigMap", NS, "fraud-1-config") is not None

    run(scenario)


def test_pipeline_invalid_spec_names_the_field_and_builds_nothing(registry: str) -> None:
    async def scenario(op: Operator, api: FakeApi) -> None:
        obj = pipeline(registry)
        obj["spec"]["training"] = {"workerGroups": [{"name": "a"}, {"name": "a"}]}
        op.pipelines.remember(api.put(obj))
        await reconcile_pipeline(op, (NS, "fraud"))
        assert api.kinds("RayJob") == []
        accepted = next(
            c for c in api.find("MLPipeline", NS, "fraud")["status"]["conditions"] if c["type"] == "Accepted"
        )  # type: ignore[index]
        assert accepted["status"] == "False" and "spec.training.workerGroups[1].name" in accepted["message"]

    run(scenario)


# ---------------------------------------------------------------- ModelDeployment


def test_deployment_create_then_noop(registry: str) -> None:
    version = commit_version(registry)

    async def scenario(op: Operator, api: FakeApi) -> None:
        op.deployments.remember(api.put(deployment(registry, version)))
        await reconcile_deployment(op, (NS, "fraud"))
        assert api.writes == [("apply", "InferenceService", "fraud"), ("status", "ModelDeployment", "fraud")]
        assert api.find("ModelDeployment", NS, "fraud")["status"]["stableVersion"] == version  # type: ignore[index]
        # The next pass sees the InferenceService exist (Ready moves from Updating to KServe's word on it);
        # after that, with nothing changed, a pass writes nothing.
        for _ in range(2):
            op.deployments.remember(api.find("ModelDeployment", NS, "fraud"))  # type: ignore[arg-type]
            api.writes.clear()
            await reconcile_deployment(op, (NS, "fraud"))
        assert api.writes == []

    run(scenario)


def test_deployment_status_conflict_on_a_metadata_edit_records_what_serves(registry: str) -> None:
    """Edited after our read: the InferenceService this reconcile applied serves `version`, and status says
    so, written on the fresh copy."""
    version = commit_version(registry)

    async def scenario(op: Operator, api: FakeApi) -> None:
        stale = api.put(deployment(registry, version))
        api.edit(stale, labels={"team": "risk"})
        op.deployments.remember(stale)
        await reconcile_deployment(op, (NS, "fraud"))
        stored = api.find("ModelDeployment", NS, "fraud")
        assert stored["status"]["stableVersion"] == version  # type: ignore[index]
        assert stored["metadata"]["labels"] == {"team": "risk"}  # type: ignore[index]

    run(scenario)


def test_deployment_status_conflict_on_a_status_change_requeues(registry: str) -> None:
    version = commit_version(registry)

    async def scenario(op: Operator, api: FakeApi) -> None:
        stale = api.put(deployment(registry, version))
        api.objects[("modeldeployments", NS, "fraud")]["status"] = {"rolloutPhase": "Stable"}
        api.edit(stale)
        op.deployments.remember(stale)
        with pytest.raises(Requeue):
            await reconcile_deployment(op, (NS, "fraud"))
        await reconcile_deployment(op, (NS, "fraud"))
        assert api.find("ModelDeployment", NS, "fraud")["status"]["stableVersion"] == version  # type: ignore[index]

    run(scenario)


def test_deployment_adopts_an_unchanged_inference_service(registry: str) -> None:
    """After a restart the InferenceService the operator applied before is in the cache: not re-applied."""
    version = commit_version(registry)

    async def scenario(op: Operator, api: FakeApi) -> None:
        op.deployments.remember(api.put(deployment(registry, version)))
        await reconcile_deployment(op, (NS, "fraud"))
        restarted = Operator(client=api, clock=lambda: NOW)
        restarted.deployments.remember(api.find("ModelDeployment", NS, "fraud"))  # type: ignore[arg-type]
        restarted.isvcs.remember(api.find("InferenceService", NS, "fraud"))  # type: ignore[arg-type]
        api.writes.clear()
        await reconcile_deployment(restarted, (NS, "fraud"))
        assert [w for w in api.writes if w[0] == "apply"] == []
        await restarted.stop()

    run(scenario)


def test_deployment_missing_version_is_degraded_not_applied(registry: str) -> None:
    commit_version(registry)

    async def scenario(op: Operator, api: FakeApi) -> None:
        op.deployments.remember(api.put(deployment(registry, "v9")))
        await reconcile_deployment(op, (NS, "fraud"))
        assert api.kinds("InferenceService") == []
        degraded = next(
            c
            for c in api.find("ModelDeployment", NS, "fraud")["status"]["conditions"]
            if c["type"] == "Degraded"
        )  # type: ignore[index]
        assert (degraded["status"], degraded["reason"]) == ("True", "VersionNotFound")

    run(scenario)
