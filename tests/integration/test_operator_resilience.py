"""The operator under the things production does to it: restarts, deletions, its own endpoints."""

from __future__ import annotations

import signal
import time
import urllib.request
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

pytestmark = pytest.mark.cluster

MLP = "mlpipelines"
MDEP = "modeldeployments"


def outcome(cluster: Cluster, n: int) -> str | None:
    return next((r["outcome"] for r in cluster.status(MLP, "fraud").get("runs") or [] if r["run"] == n), None)


def test_restart_mid_run_picks_up_without_a_second_rayjob(
    kubeconfig: str, cluster: Cluster, registry: str
) -> None:
    first = OperatorProcess(kubeconfig, cluster.ns).start()
    try:
        cluster.create(MLP, "fraud", pipeline_spec(registry))
        wait_for("RayJob fraud-1", lambda: cluster.rayjob("fraud-1"))
        wait_for("run 1 recorded", lambda: outcome(cluster, 1) == "Pending")
    finally:
        first.stop(signal.SIGKILL)  # no goodbye: a crash, an eviction
    # While the operator is down, KubeRay moves on.
    cluster.kuberay_sets("fraud-1", jobDeploymentStatus="Running", jobStatus="RUNNING")
    second = OperatorProcess(kubeconfig, cluster.ns).start()
    try:
        assert wait_for("run 1 running after restart", lambda: outcome(cluster, 1) == "Running")
        train(registry, "fraud", pipeline="fraud", namespace=cluster.ns, run=1, accuracy=0.99)
        cluster.kuberay_sets("fraud-1", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
        assert wait_for("run 1 succeeded", lambda: outcome(cluster, 1) == "Succeeded")
        assert [r["metadata"]["name"] for r in cluster.rayjobs()] == ["fraud-1"]
        status = cluster.status(MLP, "fraud")
        assert status["lastRun"] == 1 and len(status["runs"]) == 1
        # The restarted operator created nothing: only reads and the status writes.
        assert second.metric("conveyor_api_requests_total", verb="POST", resource="RayJob") == 0
        assert second.metric("conveyor_api_requests_total", verb="PATCH", resource="RayJob") == 0
    finally:
        second.stop()
        print(second.logs())


def test_restart_between_rayjob_and_status_adopts_the_orphan(
    kubeconfig: str, cluster: Cluster, registry: str
) -> None:
    """The RayJob exists, the status never recorded it (the crash came between the two writes)."""
    cluster.create(MLP, "fraud", pipeline_spec(registry))
    pipeline = cluster.get(MLP, "fraud")
    orphan = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": "fraud-1",
            "labels": {
                "app.kubernetes.io/managed-by": "conveyor",
                "conveyor.dev/pipeline": "fraud",
                "conveyor.dev/run": "1",
            },
            "ownerReferences": [
                {
                    "apiVersion": "conveyor.dev/v1alpha1",
                    "kind": "MLPipeline",
                    "name": "fraud",
                    "uid": pipeline["metadata"]["uid"],
                }
            ],
        },
        "spec": {
            "entrypoint": "python -m conveyor.runtime.train --config /etc/conveyor/run.json",
            "rayClusterSpec": {
                "headGroupSpec": {"template": {"spec": {"containers": [{"name": "ray-head", "image": "x"}]}}}
            },
        },
    }
    cluster.custom.create_namespaced_custom_object("ray.io", "v1", cluster.ns, "rayjobs", orphan)
    op = OperatorProcess(kubeconfig, cluster.ns).start()
    try:
        assert wait_for("run 1 adopted", lambda: outcome(cluster, 1) == "Pending")
        time.sleep(1.5)
        assert [r["metadata"]["name"] for r in cluster.rayjobs()] == ["fraud-1"]
        assert cluster.status(MLP, "fraud")["lastRun"] == 1
    finally:
        op.stop()
        print(op.logs())


def test_deletion_collects_children(kubeconfig: str, cluster: Cluster, registry: str) -> None:
    """Owner references, honoured by the real kube-controller-manager's garbage collector."""
    train(registry, "fraud", pipeline="x", namespace=cluster.ns, run=1, accuracy=0.9)
    op = OperatorProcess(kubeconfig, cluster.ns).start()
    try:
        cluster.create(MLP, "fraud", pipeline_spec(registry))
        cluster.create(MDEP, "fraud", deployment_spec(registry, "v1"))
        wait_for("RayJob", lambda: cluster.rayjob("fraud-1"))
        wait_for("ConfigMap", lambda: cluster.core.read_namespaced_config_map("fraud-1-config", cluster.ns))
        wait_for("InferenceService", lambda: cluster.isvc("fraud"))
        cluster.delete(MLP, "fraud")
        cluster.delete(MDEP, "fraud")
        wait_for(
            "RayJob collected", lambda: not cluster.exists(lambda: cluster.rayjob("fraud-1")), timeout=60
        )
        wait_for(
            "ConfigMap collected",
            lambda: (
                not cluster.exists(
                    lambda: cluster.core.read_namespaced_config_map("fraud-1-config", cluster.ns)
                )
            ),
            timeout=60,
        )
        wait_for(
            "InferenceService collected",
            lambda: not cluster.exists(lambda: cluster.isvc("fraud")),
            timeout=60,
        )
        assert op.alive()
    finally:
        op.stop()
        print(op.logs())


def test_metrics_and_liveness_endpoints(kubeconfig: str, cluster: Cluster, registry: str) -> None:
    op = OperatorProcess(kubeconfig, cluster.ns).start()
    try:
        cluster.create(MLP, "fraud", pipeline_spec(registry))
        wait_for("RayJob", lambda: cluster.rayjob("fraud-1"))
        m = wait_until("active run gauge", op.metrics, lambda m: m.get("conveyor_active_runs") == 1.0)
        assert m['conveyor_reconcile_total{kind="MLPipeline",result="ok"}'] >= 1
        assert m['conveyor_reconcile_duration_seconds_count{kind="MLPipeline"}'] >= 1
        assert op.metric("conveyor_api_requests_total", verb="POST", resource="RayJob") == 1  # the one create
        assert op.metric("conveyor_api_requests_total", verb="PATCH", resource="ConfigMap") == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{op.liveness_port}/healthz", timeout=5) as r:
            assert r.status == 200 and b"queued" in r.read()
    finally:
        op.stop()


def test_status_write_conflict_rereads_and_retries(
    kubeconfig: str, cluster: Cluster, registry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """409s from the real apiserver. Someone else changed only the metadata since our read: the status is
    written on the re-read copy (it records what the reconcile did). Someone else changed the status: nothing
    is written over it, the object is re-read and the reconcile asked to run again."""
    import asyncio

    import kopf

    from conveyor.operator.controller.children import FIELD_MANAGER
    from conveyor.operator.controller.client import ApiClient, connection_info
    from conveyor.operator.controller.manager import Operator
    from conveyor.operator.controller.status import write_status
    from conveyor.operator.controller.workqueue import Requeue
    from conveyor.operator.mlpipeline.reconcile import reconcile_pipeline

    monkeypatch.setenv("KUBECONFIG", kubeconfig)
    stale = cluster.create(MLP, "fraud", pipeline_spec(registry))
    cluster.patch(MLP, "fraud", {"metadata": {"labels": {"team": "risk"}}})  # someone else writes meanwhile
    key = (cluster.ns, "fraud")

    async def main() -> None:
        op = Operator(client=ApiClient(connection_info(kopf.OperatorSettings()), field_manager=FIELD_MANAGER))
        try:
            op.pipelines.remember(stale)
            assert await write_status(op.client, op.pipelines, stale, {"phase": "Pending"})
            ours = op.pipelines.get(key)
            assert ours is not None and ours["metadata"]["labels"] == {"team": "risk"}
            assert ours["status"]["phase"] == "Pending"
            cluster.custom.patch_namespaced_custom_object_status(
                "conveyor.dev", "v1alpha1", cluster.ns, "mlpipelines", "fraud", {"status": {"phase": "Failed"}}
            )  # another writer of status (there should be none): not overwritten
            with pytest.raises(Requeue):
                await write_status(op.client, op.pipelines, ours, {"phase": "Running"})
            fresh = op.pipelines.get(key)
            assert fresh is not None and fresh["status"]["phase"] == "Failed"  # re-read
            await reconcile_pipeline(op, key)  # the retry succeeds on the fresh copy
        finally:
            await op.stop()  # waits for the events it posts in the background, closes the client

    asyncio.run(main())
    assert cluster.status(MLP, "fraud")["lastRun"] == 1
    assert cluster.get(MLP, "fraud")["metadata"]["labels"] == {"team": "risk"}
    assert [r["metadata"]["name"] for r in cluster.rayjobs()] == ["fraud-1"]


def test_namespace_flag_limits_what_the_operator_touches(
    kubeconfig: str, kube_api: Any, cluster: Cluster, registry: str
) -> None:
    import uuid

    from kubernetes import client

    other = Cluster(kube_api, f"t-other-{uuid.uuid4().hex[:8]}")
    client.CoreV1Api(kube_api).create_namespace({"metadata": {"name": other.ns}})
    op = OperatorProcess(kubeconfig, cluster.ns).start()
    try:
        other.create(MLP, "fraud", pipeline_spec(registry))
        cluster.create(MLP, "fraud", pipeline_spec(registry))
        wait_for("RayJob in the watched namespace", lambda: cluster.rayjob("fraud-1"))
        time.sleep(1.5)
        assert other.rayjobs() == [] and other.status(MLP, "fraud") == {}
    finally:
        op.stop()
        client.CoreV1Api(kube_api).delete_namespace(other.ns)
