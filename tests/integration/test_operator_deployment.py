"""ModelDeployment -> InferenceService with the operator running for real; the test plays KServe."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from _operator_support import (
    GATEWAY_API,
    Cluster,
    OperatorProcess,
    backends,
    deployment_spec,
    route,
    train,
    wait_for,
    wait_until,
)

pytestmark = pytest.mark.cluster

MDEP = "modeldeployments"


@pytest.fixture
def registry(tmp_path: Path, namespace: str) -> str:
    uri = f"file://{tmp_path}/registry"
    for run in (1, 2):  # v1 and v2, as two training runs would have committed them
        train(uri, "fraud", pipeline="offline", namespace=namespace, run=run, accuracy=0.9 + run / 100)
    return uri


def env(predictor: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in predictor["containers"][0]["env"]}


def cond(cluster: Cluster, name: str, type_: str) -> tuple[str, str] | None:
    c = cluster.condition(MDEP, name, type_)
    return (c["status"], c["reason"]) if c else None


KNATIVE_READY = {
    "url": "http://fraud.ns.example.com",
    "observedGeneration": 1,
    "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
}


def test_pinned_version_serves_and_mirrors_readiness(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    cluster.create(
        MDEP,
        "fraud",
        deployment_spec(
            registry,
            "v1",
            predictor={"gpus": 1, "nodeSelector": {"pool": "gpu"}, "resources": {"limits": {"cpu": "2", "memory": "4Gi"}}},
            autoscaling={"minReplicas": 0, "maxReplicas": 4, "metric": "rps", "target": 20},
        ),
    )
    isvc = wait_for("InferenceService", lambda: cluster.isvc("fraud"))
    meta, predictor = isvc["metadata"], isvc["spec"]["predictor"]
    assert meta["ownerReferences"][0]["kind"] == "ModelDeployment"
    assert meta["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["scaleMetric"], predictor["scaleTarget"]) == (0, 4, "rps", 20)
    assert predictor["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 1}
    assert predictor["nodeSelector"] == {"pool": "gpu"}
    assert env(predictor)["STORAGE_URI"] == f"{registry}/fraud/v1"
    assert wait_for("Ready False while KServe works", lambda: cond(cluster, "fraud", "Ready") == ("False", "InferenceServiceNotReady"))

    cluster.kserve_sets("fraud", KNATIVE_READY)
    assert wait_for("Ready", lambda: cond(cluster, "fraud", "Ready") == ("True", "InferenceServiceReady"))
    status = cluster.status(MDEP, "fraud")
    assert (status["url"], status["stableVersion"], status["rolloutPhase"]) == ("http://fraud.ns.example.com", "v1", "Stable")
    assert status["traffic"] == [{"version": "v1", "percent": 100, "tag": "stable"}]
    assert cond(cluster, "fraud", "Progressing") == ("False", "RolloutComplete")
    assert cond(cluster, "fraud", "Degraded") == ("False", "AsExpected")
    assert status["observedGeneration"] == 1

    # Settled: nothing more is written, however long we wait. (The baseline once the counter stops moving:
    # the status just read may be in the apiserver a moment before the operator has counted its write.)
    writes = operator.settled_writes()
    rv = cluster.isvc("fraud")["metadata"]["resourceVersion"]
    md_rv = cluster.get(MDEP, "fraud")["metadata"]["resourceVersion"]
    time.sleep(3)
    assert operator.writes() == writes
    assert cluster.isvc("fraud")["metadata"]["resourceVersion"] == rv
    assert cluster.get(MDEP, "fraud")["metadata"]["resourceVersion"] == md_rv


def test_canary_knative(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    cluster.create(MDEP, "fraud", deployment_spec(registry, "v1", rollout={"steps": [10, 50, 100]}))
    wait_for("v1 served", lambda: env(cluster.isvc("fraud")["spec"]["predictor"])["STORAGE_URI"].endswith("/v1"))
    cluster.kserve_sets("fraud", KNATIVE_READY)
    wait_for("Ready", lambda: cond(cluster, "fraud", "Ready") == ("True", "InferenceServiceReady"))
    # Git bumps the version: v2 becomes the canary at the first step.
    cluster.patch(MDEP, "fraud", {"spec": {"model": {"version": "v2"}}})
    predictor = wait_until(
        "canaryTrafficPercent", lambda: cluster.isvc("fraud")["spec"]["predictor"], lambda p: p.get("canaryTrafficPercent")
    )
    assert predictor["canaryTrafficPercent"] == 10 and env(predictor)["STORAGE_URI"] == f"{registry}/fraud/v2"
    status = wait_until("canary status", lambda: cluster.status(MDEP, "fraud"), lambda s: s.get("canaryVersion"))
    assert (status["stableVersion"], status["canaryVersion"], status["canaryWeight"], status["rolloutPhase"]) == (
        "v1", "v2", 10, "Progressing"
    )
    assert cond(cluster, "fraud", "Progressing") == ("True", "CanaryInProgress")
    # KServe reports the split between the two revisions.
    cluster.kserve_sets(
        "fraud",
        {
            "observedGeneration": 2,
            "components": {"predictor": {"traffic": [
                {"revisionName": "fraud-predictor-00002", "percent": 10, "latestRevision": True},
                {"revisionName": "fraud-predictor-00001", "percent": 90, "latestRevision": False, "tag": "prev"},
            ]}},
        },
    )
    traffic = wait_until("observed traffic", lambda: cluster.status(MDEP, "fraud")["traffic"], lambda t: t[0].get("revision"))
    assert {(t["version"], t["percent"], t["tag"]) for t in traffic} == {("v2", 10, "canary"), ("v1", 90, "stable")}


def test_canary_standard_uses_spec_canary_behind_a_watched_route(
    cluster: Cluster, operator: OperatorProcess, registry: str
) -> None:
    """Standard mode: the canary is a `spec.canary[]` entry; the split is the operator's HTTPRoute, which
    status.traffic reports and which is watched: deleted or edited out of band it is restored at once (the
    resync is at its 10 minutes here), a route KServe wrote is deleted, and a route event that changes
    nothing the operator owns writes nothing."""
    spec = deployment_spec(
        registry,
        "v1",
        rollout={"mode": "Standard", "steps": [25, 100]},
        autoscaling={"minReplicas": 2, "maxReplicas": 4, "metric": "cpu", "target": 70},
    )
    cluster.create(MDEP, "fraud", spec)
    isvc = wait_for("InferenceService", lambda: cluster.isvc("fraud"))
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
    assert isvc["spec"]["predictor"]["name"] == "v1"
    cluster.patch(MDEP, "fraud", {"spec": {"model": {"version": "v2"}}})
    canary = wait_for("spec.canary", lambda: cluster.isvc("fraud")["spec"].get("canary"))
    assert canary[0]["trafficPercent"] == 25 and canary[0]["predictor"]["name"] == "v2"
    assert env(canary[0]["predictor"])["STORAGE_URI"] == f"{registry}/fraud/v2"
    stable = cluster.isvc("fraud")["spec"]["predictor"]
    assert stable["name"] == "v1" and env(stable)["STORAGE_URI"] == f"{registry}/fraud/v1"
    cluster.kserve_sets(
        "fraud",
        {
            "url": "http://fraud.ns.example.com",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "canaryStatuses": [{"name": "v2", "trafficPercent": 25, "ready": True}],
        },
    )
    # The split the gateway serves: the operator's route (route.py), each version's predictor Service.
    traffic = wait_until(
        "observed split", lambda: cluster.status(MDEP, "fraud")["traffic"], lambda t: any(x.get("revision") for x in t)
    )
    assert {(t["version"], t["percent"], t["revision"]) for t in traffic} == {
        ("v1", 75, "fraud-v1-predictor"),
        ("v2", 25, "fraud-v2-predictor"),
    }
    route_is_restored_from_the_watch(cluster, operator, [("fraud-v1-predictor", 75), ("fraud-v2-predictor", 25)])


RESTORE_TIMEOUT = 20.0  # seconds; the resync would take 600


def route_is_restored_from_the_watch(cluster: Cluster, operator: OperatorProcess, split: list[tuple[str, int]]) -> None:
    first = wait_until("the operator's route", lambda: route(cluster), lambda r: r is not None and backends(r) == split)
    assert first is not None
    host = first["spec"]["hostnames"]
    # Deleted: it comes back (a new object) with the same backends, host and gateway.
    cluster.custom.delete_namespaced_custom_object(*GATEWAY_API, cluster.ns, "httproutes", "fraud-traffic")
    again = wait_for(
        "the route restored after its deletion",
        lambda: (r := route(cluster)) is not None and r["metadata"]["uid"] != first["metadata"]["uid"] and r,
        timeout=RESTORE_TIMEOUT,
    )
    assert again["spec"] == first["spec"]
    # Pointed at another host: put back.
    cluster.custom.patch_namespaced_custom_object(
        *GATEWAY_API, cluster.ns, "httproutes", "fraud-traffic", {"spec": {"hostnames": ["elsewhere.example.com"]}}
    )
    wait_until("the route's host put back", lambda: route(cluster), lambda r: r is not None and r["spec"]["hostnames"] == host,
               timeout=RESTORE_TIMEOUT)
    # A route KServe wrote for the InferenceService (before it was labelled cluster-local): deleted.
    isvc = cluster.isvc("fraud")
    theirs = {
        "apiVersion": "/".join(GATEWAY_API),
        "kind": "HTTPRoute",
        "metadata": {
            "name": "fraud",
            "labels": {"conveyor.dev/model-deployment": "fraud", "app.kubernetes.io/managed-by": "conveyor"},
            "ownerReferences": [{"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                                 "name": "fraud", "uid": isvc["metadata"]["uid"], "controller": True}],
        },
        "spec": {"rules": [{"backendRefs": [{"name": "fraud-v1-predictor", "port": 80}]}]},
    }
    cluster.custom.create_namespaced_custom_object(*GATEWAY_API, cluster.ns, "httproutes", theirs)
    wait_for("KServe's route deleted", lambda: route(cluster, "fraud") is None, timeout=RESTORE_TIMEOUT)
    # A route event that changes nothing the operator owns: reconciled, nothing written.
    writes = operator.settled_writes()
    reconciles = operator.metric("conveyor_reconcile_total", kind="ModelDeployment")
    cluster.custom.patch_namespaced_custom_object(
        *GATEWAY_API, cluster.ns, "httproutes", "fraud-traffic", {"metadata": {"labels": {"team": "fraud"}}}
    )
    wait_for(
        "the route event's reconcile",
        lambda: operator.metric("conveyor_reconcile_total", kind="ModelDeployment") > reconciles,
        timeout=RESTORE_TIMEOUT,
    )
    assert operator.settled_writes() == writes
    assert backends(route(cluster) or {"spec": {"rules": []}}) == split


def test_immediate_strategy_and_missing_version(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    cluster.create(MDEP, "fraud", deployment_spec(registry, "v1", rollout={"strategy": "immediate"}))
    wait_for("v1", lambda: env(cluster.isvc("fraud")["spec"]["predictor"])["STORAGE_URI"].endswith("/v1"))
    cluster.patch(MDEP, "fraud", {"spec": {"model": {"version": "v2"}}})
    predictor = wait_until(
        "v2 replaces v1", lambda: cluster.isvc("fraud")["spec"]["predictor"], lambda p: env(p)["STORAGE_URI"].endswith("/v2")
    )
    assert "canaryTrafficPercent" not in predictor
    # A version that was never committed: Degraded, and the InferenceService keeps serving v2.
    cluster.patch(MDEP, "fraud", {"spec": {"model": {"version": "v7"}}})
    assert wait_for("Degraded", lambda: cond(cluster, "fraud", "Degraded") == ("True", "VersionNotFound"))
    assert env(cluster.isvc("fraud")["spec"]["predictor"])["STORAGE_URI"].endswith("/v2")
    cluster.event("fraud", "Warning", "VersionNotFound")


def test_drift_of_the_child_is_put_back(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    """Someone edits the InferenceService by hand: the operator re-applies its own fields."""
    cluster.create(MDEP, "fraud", deployment_spec(registry, "v1"))
    wait_for("InferenceService", lambda: cluster.isvc("fraud"))
    cluster.custom.patch_namespaced_custom_object(
        "serving.kserve.io", "v1beta1", cluster.ns, "inferenceservices", "fraud",
        {"spec": {"predictor": {"maxReplicas": 99}}},
    )
    assert wait_for("restored", lambda: cluster.isvc("fraud")["spec"]["predictor"]["maxReplicas"] == 3)


def test_latest_without_pipeline_follows_the_registry(kubeconfig: str, cluster: Cluster, registry: str) -> None:
    op = OperatorProcess(kubeconfig, cluster.ns, "--registry-poll-seconds", "1").start()
    try:
        cluster.create(MDEP, "fraud", deployment_spec(registry, rollout={"strategy": "immediate"}))
        wait_for("newest version v2", lambda: env(cluster.isvc("fraud")["spec"]["predictor"])["STORAGE_URI"].endswith("/v2"))
        train(registry, "fraud", pipeline="offline", namespace=cluster.ns, run=3, accuracy=0.95)
        wait_for("v3 picked up", lambda: env(cluster.isvc("fraud")["spec"]["predictor"])["STORAGE_URI"].endswith("/v3"))
        # The status write follows the InferenceService's apply in the same reconcile.
        assert wait_for("status v3", lambda: cluster.status(MDEP, "fraud")["stableVersion"] == "v3")
    finally:
        op.stop()
        print(op.logs())


def test_unreachable_registry_scheme_is_an_invalid_spec(cluster: Cluster, operator: OperatorProcess, registry: str) -> None:
    """gs:// passes the schema, but this install has no gcsfs: a False condition naming the field, once."""
    cluster.create(MDEP, "fraud", deployment_spec("gs://models-bucket/registry", "v1"))
    accepted = wait_for("Accepted=False", lambda: cluster.condition(MDEP, "fraud", "Accepted"))
    assert (accepted["status"], accepted["reason"]) == ("False", "InvalidSpec")
    assert "spec.model.registryUri" in accepted["message"] and "gcsfs" in accepted["message"]
    errors = operator.metric("conveyor_reconcile_errors_total")
    time.sleep(2)
    assert operator.metric("conveyor_reconcile_errors_total") == errors == 0
    assert not cluster.exists(lambda: cluster.isvc("fraud"))
