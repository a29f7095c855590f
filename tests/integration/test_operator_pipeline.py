"""MLPipeline -> RayJob with the operator running for real against the local kube-apiserver.

The test plays KubeRay (patching the RayJob's status) and the training job's last step (committing a
model package through the real registry code); everything else is the real operator.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from _operator_support import (
    Cluster,
    OperatorProcess,
    deployment_spec,
    pipeline_spec,
    train,
    wait_for,
    wait_until,
)

from conveyor.runtime.package.registry import Registry
from conveyor.runtime.spec import RunConfig

pytestmark = pytest.mark.cluster

MLP = "mlpipelines"
MDEP = "modeldeployments"


def run_entry(cluster: Cluster, name: str, n: int) -> dict[str, Any] | None:
    return next((r for r in cluster.status(MLP, name).get("runs") or [] if r["run"] == n), None)


def outcome(cluster: Cluster, name: str, n: int) -> str | None:
    r = run_entry(cluster, name, n)
    return r["outcome"] if r else None


def condition(cluster: Cluster, plural: str, name: str, type_: str) -> tuple[str, str] | None:
    c = cluster.condition(plural, name, type_)
    return (c["status"], c["reason"]) if c else None


def test_run_succeeds_passes_gate_and_hands_over(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    ns = cluster.ns
    cluster.create(MDEP, "fraud", deployment_spec(registry))
    cluster.create(
        MLP,
        "fraud",
        pipeline_spec(
            registry,
            deploy={"modelDeployment": "fraud"},
            training={
                "useGpu": True,
                "workerGroups": [{"name": "gpu", "replicas": 2, "gpus": 1, "nodeSelector": {"pool": "l4"}}],
                "activeDeadlineSeconds": 900,
                "backoffLimit": 1,
            },
        ),
    )
    rj = wait_for("RayJob fraud-1", lambda: cluster.rayjob("fraud-1"))
    assert rj["metadata"]["labels"]["conveyor.dev/pipeline"] == "fraud"
    assert rj["metadata"]["labels"]["conveyor.dev/run"] == "1"
    owner = rj["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("MLPipeline", "fraud", True)
    assert rj["spec"]["activeDeadlineSeconds"] == 900 and rj["spec"]["backoffLimit"] == 1
    workers = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 2
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert workers["template"]["spec"]["nodeSelector"] == {"pool": "l4"}
    # The run's config, as the training entrypoint will read it.
    cm = wait_for("run ConfigMap", lambda: cluster.core.read_namespaced_config_map("fraud-1-config", ns))
    config = RunConfig.model_validate_json(cm.data["run.json"])
    assert (config.pipeline, config.namespace, config.run) == ("fraud", ns, 1)
    assert cm.metadata.owner_references[0].name == "fraud-1"
    assert wait_for("run 1 pending", lambda: outcome(cluster, "fraud", 1) == "Pending")

    cluster.kuberay_sets("fraud-1", jobDeploymentStatus="Running", jobStatus="RUNNING", startTime="2026-01-01T00:00:00Z")
    assert wait_for("run 1 running", lambda: outcome(cluster, "fraud", 1) == "Running")
    assert cluster.status(MLP, "fraud")["phase"] == "Running"

    version = train(registry, "fraud", pipeline="fraud", namespace=ns, run=1, accuracy=0.95, f1Macro=0.9)
    cluster.kuberay_sets("fraud-1", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED", endTime="2026-01-01T00:10:00Z")
    assert wait_for("run 1 succeeded", lambda: outcome(cluster, "fraud", 1) == "Succeeded")
    status = cluster.status(MLP, "fraud")
    run = run_entry(cluster, "fraud", 1)
    assert run is not None
    assert (run["modelVersion"], run["metrics"]["accuracy"], run["deployed"]) == (version, 0.95, True)
    assert run["completionTime"] == "2026-01-01T00:10:00Z"
    assert (status["latestVersion"], status["latestMetric"], status["phase"]) == (version, "accuracy=0.95", "Succeeded")
    for t in ("DataValidated", "Trained", "Registered", "Evaluated", "Succeeded"):
        assert condition(cluster, MLP, "fraud", t)[0] == "True", t
    assert status["observedGeneration"] == cluster.get(MLP, "fraud")["metadata"]["generation"]

    # The deployment follows the pipeline: its InferenceService serves the new version.
    isvc = wait_for("InferenceService", lambda: cluster.isvc("fraud"))
    env = {e["name"]: e["value"] for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
    assert env["STORAGE_URI"] == f"{registry}/fraud/{version}"
    assert wait_for("stable version", lambda: cluster.status(MDEP, "fraud").get("stableVersion") == version)
    wanted = {"RunStarted", "RunSucceeded", "ModelHandedOver", "VersionDeployed"}
    wait_until("events", lambda: {e[1] for e in cluster.events("fraud")}, lambda reasons: wanted <= reasons)
    assert len(cluster.rayjobs()) == 1


def test_training_failure_is_recorded(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    """The run's outcome record in the registry says why; a RayJob's status holds only an exit code."""
    cluster.create(MLP, "fraud", pipeline_spec(registry))
    wait_for("RayJob", lambda: cluster.rayjob("fraud-1"))
    Registry(registry, "fraud").write_run_record(
        cluster.ns, "fraud", 1, {"outcome": "Failed", "message": "RuntimeError: CUDA out of memory"}
    )
    cluster.kuberay_sets("fraud-1", jobDeploymentStatus="Complete", jobStatus="FAILED", message="exit code 1")
    assert wait_for("run failed", lambda: outcome(cluster, "fraud", 1) == "Failed")
    run = run_entry(cluster, "fraud", 1)
    assert run is not None and (run["reason"], run["message"]) == ("JobFailed", "RuntimeError: CUDA out of memory")
    assert condition(cluster, MLP, "fraud", "Trained") == ("False", "JobFailed")
    assert condition(cluster, MLP, "fraud", "DataValidated") == ("Unknown", "NotReported")
    assert condition(cluster, MLP, "fraud", "Succeeded") == ("False", "TrainingFailed")
    assert cluster.status(MLP, "fraud")["phase"] == "Failed" and "latestVersion" not in cluster.status(MLP, "fraud")
    cluster.event("fraud", "Warning", "RunFailed")
    # A failed run is not retried on its own: no new RayJob appears.
    time.sleep(2)
    assert [r["metadata"]["name"] for r in cluster.rayjobs()] == ["fraud-1"]


def test_a_recorded_contract_violation_fails_the_run(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    """The entrypoint records the violation and ends its job successfully (a deterministic failure is not
    worth KubeRay's retries); the operator fails the run from the record."""
    cluster.create(MLP, "fraud", pipeline_spec(registry))
    wait_for("RayJob", lambda: cluster.rayjob("fraud-1"))
    violation = {"column": "amount", "rule": "nullable", "count": 12, "expected": "no nulls", "examples": []}
    Registry(registry, "fraud").write_run_record(
        cluster.ns,
        "fraud",
        1,
        {
            "outcome": "DataValidationFailed",
            "dataValidation": {"source": "builtin://fraud", "rows": 3000, "ok": False, "violations": [violation]},
        },
    )
    cluster.kuberay_sets("fraud-1", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED", endTime="2026-01-01T00:10:00Z")
    assert wait_for("run failed", lambda: outcome(cluster, "fraud", 1) == "Failed")
    run = run_entry(cluster, "fraud", 1)
    assert run is not None and (run["reason"], run["attempts"]) == ("DataContractViolated", 1)
    status, reason = condition(cluster, MLP, "fraud", "DataValidated")
    assert (status, reason) == ("False", "DataContractViolated")
    message = next(x["message"] for x in cluster.status(MLP, "fraud")["conditions"] if x["type"] == "DataValidated")
    assert "column amount: nullable (12 value(s)" in message
    assert condition(cluster, MLP, "fraud", "Registered") == ("False", "NotTrained")
    assert "latestVersion" not in cluster.status(MLP, "fraud")


def test_deadline_failure_wins_over_a_running_job_status(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    """KubeRay issue 2314: jobDeploymentStatus Failed while jobStatus still says RUNNING."""
    cluster.create(MLP, "fraud", pipeline_spec(registry, training={"activeDeadlineSeconds": 60}))
    wait_for("RayJob", lambda: cluster.rayjob("fraud-1"))
    cluster.kuberay_sets(
        "fraud-1", jobDeploymentStatus="Failed", jobStatus="RUNNING", reason="DeadlineExceeded", message="deadline passed", failed=1
    )
    assert wait_for("run failed", lambda: outcome(cluster, "fraud", 1) == "Failed")
    run = run_entry(cluster, "fraud", 1)
    assert run is not None and run["reason"] == "DeadlineExceeded"


def test_gate_failure_deploys_nothing(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    ns = cluster.ns
    cluster.create(MDEP, "fraud", deployment_spec(registry))
    cluster.create(MLP, "fraud", pipeline_spec(registry, deploy={"modelDeployment": "fraud"}))
    wait_for("RayJob", lambda: cluster.rayjob("fraud-1"))
    version = train(registry, "fraud", pipeline="fraud", namespace=ns, run=1, accuracy=0.6)
    cluster.kuberay_sets("fraud-1", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    assert wait_for("gate failed", lambda: outcome(cluster, "fraud", 1) == "GateFailed")
    run = run_entry(cluster, "fraud", 1)
    assert run is not None and (run["reason"], run["modelVersion"]) == ("BelowThreshold", version)
    assert "0.6" in run["message"] and "0.9" in run["message"]
    assert condition(cluster, MLP, "fraud", "Evaluated") == ("False", "BelowThreshold")
    assert condition(cluster, MLP, "fraud", "Registered") == ("True", "Registered")
    assert "latestVersion" not in cluster.status(MLP, "fraud")
    assert wait_for("deployment waits", lambda: condition(cluster, MDEP, "fraud", "Ready") == ("False", "AwaitingModel"))
    assert not cluster.exists(lambda: cluster.isvc("fraud"))


def test_retry_and_rerun(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    ns = cluster.ns
    cluster.create(MLP, "fraud", pipeline_spec(registry, training={"backoffLimit": 2}))
    wait_for("RayJob", lambda: cluster.rayjob("fraud-1"))
    # KubeRay retries a failed attempt itself: the run stays active and counts attempts.
    cluster.kuberay_sets("fraud-1", jobDeploymentStatus="Retrying", jobStatus="FAILED", failed=1)
    assert wait_for("attempt 2", lambda: (run_entry(cluster, "fraud", 1) or {}).get("attempts") == 2)
    assert outcome(cluster, "fraud", 1) == "Running"
    cluster.kuberay_sets("fraud-1", jobDeploymentStatus="Complete", jobStatus="FAILED", failed=3, message="exhausted")
    assert wait_for("run 1 failed", lambda: outcome(cluster, "fraud", 1) == "Failed")
    assert run_entry(cluster, "fraud", 1)["attempts"] == 3  # type: ignore[index]
    # The user asks for another run with the rerun annotation.
    cluster.patch(MLP, "fraud", {"metadata": {"annotations": {"conveyor.dev/rerun": "2026-01-05T10:00"}}})
    wait_for("RayJob fraud-2", lambda: cluster.rayjob("fraud-2"))
    # The RayJob is created before the status that records it is written: wait for the record.
    assert wait_for("run 2 recorded", lambda: run_entry(cluster, "fraud", 2))["trigger"] == "Rerun"
    train(registry, "fraud", pipeline="fraud", namespace=ns, run=2, accuracy=0.97)
    cluster.kuberay_sets("fraud-2", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    assert wait_for("run 2 succeeded", lambda: outcome(cluster, "fraud", 2) == "Succeeded")
    assert cluster.status(MLP, "fraud")["latestVersion"] == "v1"
    # The same annotation value again starts nothing.
    time.sleep(1.5)
    assert sorted(r["metadata"]["name"] for r in cluster.rayjobs()) == ["fraud-1", "fraud-2"]


def test_spec_change_waits_for_the_active_run(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    cluster.create(MLP, "fraud", pipeline_spec(registry))
    wait_for("RayJob", lambda: cluster.rayjob("fraud-1"))
    cluster.kuberay_sets("fraud-1", jobDeploymentStatus="Running", jobStatus="RUNNING")
    cluster.patch(MLP, "fraud", {"spec": {"training": {"hyperparameters": {"epochs": 12}}}})
    time.sleep(2)
    assert [r["metadata"]["name"] for r in cluster.rayjobs()] == ["fraud-1"], "never two active runs"
    cluster.kuberay_sets("fraud-1", jobDeploymentStatus="Complete", jobStatus="FAILED")
    rj2 = wait_for("RayJob fraud-2", lambda: cluster.rayjob("fraud-2"))
    assert wait_for("run 2 recorded", lambda: run_entry(cluster, "fraud", 2))["trigger"] == "SpecChanged"
    cm = cluster.core.read_namespaced_config_map("fraud-2-config", cluster.ns)
    assert json.loads(cm.data["run.json"])["training"]["hyperparameters"]["epochs"] == 12
    assert rj2["metadata"]["labels"]["conveyor.dev/run"] == "2"


def test_schedule_fires(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    cluster.create(MLP, "fraud", pipeline_spec(registry, triggers={"schedule": "* * * * *"}))
    wait_for("RayJob fraud-1", lambda: cluster.rayjob("fraud-1"))
    cluster.kuberay_sets("fraud-1", jobDeploymentStatus="Complete", jobStatus="FAILED")
    nxt = wait_for("nextScheduleTime", lambda: cluster.status(MLP, "fraud").get("nextScheduleTime"))
    # The next minute boundary starts run 2 (waits at most ~60 s).
    wait_for("RayJob fraud-2 from the schedule", lambda: cluster.rayjob("fraud-2"), timeout=75, interval=1)
    # The RayJob is created before the status that records it is written: wait for the record.
    assert wait_for("run 2 recorded", lambda: run_entry(cluster, "fraud", 2))["trigger"] == "Schedule"
    assert cluster.status(MLP, "fraud")["lastScheduleTime"] == nxt


def test_history_limit_deletes_old_runs(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    cluster.create(MLP, "fraud", pipeline_spec(registry, runsHistoryLimit=1))
    for n in (1, 2, 3):
        wait_for(f"RayJob fraud-{n}", lambda n=n: cluster.rayjob(f"fraud-{n}"))
        cluster.kuberay_sets(f"fraud-{n}", jobDeploymentStatus="Complete", jobStatus="FAILED")
        wait_for(f"run {n} failed", lambda n=n: outcome(cluster, "fraud", n) == "Failed")
        if n < 3:
            cluster.patch(MLP, "fraud", {"metadata": {"annotations": {"conveyor.dev/rerun": str(n)}}})
    assert wait_for("old RayJobs deleted", lambda: sorted(r["metadata"]["name"] for r in cluster.rayjobs()) == ["fraud-3"])
    assert [r["run"] for r in cluster.status(MLP, "fraud")["runs"]] == [3]


def test_invalid_spec_is_a_false_condition_without_a_hot_loop(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    # Admission takes what the schema can check (a name too long for a RayJob is refused there now:
    # tests/integration/test_crds.py); a registry this install cannot open only the operator can see.
    name = "fraud"
    cluster.create(MLP, name, pipeline_spec("gs://models-bucket/registry"))
    cond = wait_for("Accepted=False", lambda: cluster.condition(MLP, name, "Accepted"))
    assert (cond["status"], cond["reason"]) == ("False", "InvalidSpec")
    assert "spec.registry.uri" in cond["message"]
    cluster.event(name, "Warning", "InvalidSpec")
    assert cluster.rayjobs() == []
    writes = operator.settled_writes()  # the event just seen may not be counted yet
    before = operator.metrics()
    time.sleep(3)
    after = operator.metrics()
    key = 'conveyor_reconcile_total{kind="MLPipeline",result="ok"}'
    assert after.get(key, 0) - before.get(key, 0) <= 1, "an invalid spec must not be reconciled in a loop"
    assert operator.writes() == writes


def test_second_passing_version_becomes_the_canary_and_must_beat_the_stable_one(
    cluster: Cluster, operator: OperatorProcess, registry: str
) -> None:
    ns = cluster.ns
    cluster.create(MDEP, "fraud", deployment_spec(registry, rollout={"steps": [20, 100]}))
    cluster.create(
        MLP,
        "fraud",
        pipeline_spec(
            registry,
            deploy={"modelDeployment": "fraud"},
            evaluation={"metric": "accuracy", "threshold": 0.8, "mustBeatDeployed": True, "margin": 0.01},
        ),
    )

    def finish(n: int, accuracy: float, expect: str, deployed_accuracy: float | None = None) -> None:
        wait_for(f"RayJob fraud-{n}", lambda: cluster.rayjob(f"fraud-{n}"))
        # The run is told what is deployed (run.json), and records that version's figure on its own split.
        name = f"fraud-{n}-config"
        wait_for(f"ConfigMap {name}", lambda: cluster.exists(lambda: cluster.core.read_namespaced_config_map(name, ns)))
        told = json.loads(cluster.core.read_namespaced_config_map(name, ns).data["run.json"]).get("deployed")
        scored = None
        if deployed_accuracy is not None:
            assert told == {"version": "v1", "packageUri": f"{registry}/fraud/v1"}, told
            scored = {**told, "testSamples": 400, "metrics": {"accuracy": deployed_accuracy}}
        else:
            assert told is None, told
        train(registry, "fraud", pipeline="fraud", namespace=ns, run=n, accuracy=accuracy, deployed=scored)
        cluster.kuberay_sets(f"fraud-{n}", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
        assert wait_for(f"run {n} {expect}", lambda: outcome(cluster, "fraud", n) == expect)

    finish(1, 0.90, "Succeeded")
    assert wait_for("v1 stable", lambda: cluster.status(MDEP, "fraud").get("stableVersion") == "v1")
    # Run 2 beats v1's own figure (0.90, on v1's split) but not v1 + margin on run 2's split (0.90 there
    # too): recorded, deployed nowhere.
    cluster.patch(MLP, "fraud", {"metadata": {"annotations": {"conveyor.dev/rerun": "2"}}})
    finish(2, 0.905, "GateFailed", deployed_accuracy=0.90)
    run2 = run_entry(cluster, "fraud", 2)
    assert run2 is not None and run2["reason"] == "DidNotBeatDeployed" and "v1" in run2["message"]
    assert "400 rows" in run2["message"]
    assert cluster.status(MLP, "fraud")["latestVersion"] == "v1"
    # Run 3 beats it: v3 becomes the canary at the first step, beside v1.
    cluster.patch(MLP, "fraud", {"metadata": {"annotations": {"conveyor.dev/rerun": "3"}}})
    finish(3, 0.95, "Succeeded", deployed_accuracy=0.93)
    status = wait_for("canary", lambda: (s := cluster.status(MDEP, "fraud")).get("canaryVersion") and s)
    assert (status["stableVersion"], status["canaryVersion"], status["canaryWeight"]) == ("v1", "v3", 20)
    predictor = cluster.isvc("fraud")["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 20
    assert {e["name"]: e["value"] for e in predictor["containers"][0]["env"]}["STORAGE_URI"] == f"{registry}/fraud/v3"


def test_pinned_deployment_refuses_the_handover(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    ns = cluster.ns
    train(registry, "fraud", pipeline="older", namespace=ns, run=1, accuracy=0.9)  # v1, pinned below
    cluster.create(MDEP, "fraud", deployment_spec(registry, "v1"))
    cluster.create(MLP, "fraud", pipeline_spec(registry, deploy={"modelDeployment": "fraud"}))
    wait_for("RayJob", lambda: cluster.rayjob("fraud-1"))
    train(registry, "fraud", pipeline="fraud", namespace=ns, run=1, accuracy=0.99)
    cluster.kuberay_sets("fraud-1", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    assert wait_for("run 1 succeeded", lambda: outcome(cluster, "fraud", 1) == "Succeeded")
    assert run_entry(cluster, "fraud", 1)["deployed"] is False  # type: ignore[index]
    cluster.event("fraud", "Warning", "DeploymentPinned")
    time.sleep(1)
    assert cluster.status(MDEP, "fraud")["stableVersion"] == "v1" and "canaryVersion" not in cluster.status(MDEP, "fraud")
