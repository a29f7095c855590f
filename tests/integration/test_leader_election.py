"""Two operator replicas sharing a coordination.k8s.io Lease on the real apiserver: one reconciles, the
other stands by, and when the leader is killed the standby takes over within the lease's 15 s budget
without writing anything twice."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
from _operator_support import Cluster, OperatorProcess, pipeline_spec, wait_for, wait_until
from kubernetes import client

pytestmark = pytest.mark.cluster

MLP = "mlpipelines"


def replica(kubeconfig: str, namespace: str) -> OperatorProcess:
    return OperatorProcess(kubeconfig, namespace, "--leader-elect", "--leader-election-namespace", namespace).start()


def leader_of(replicas: list[OperatorProcess]) -> OperatorProcess:
    return wait_for("one replica leading", lambda: next((r for r in replicas if r.metric("conveyor_leader") == 1), None))


def rayjob_writes(op: OperatorProcess) -> float:
    """RayJob writes by this replica: a run's RayJob is created with POST (a 409 adopts), PATCH updates it."""
    return sum(op.metric("conveyor_api_requests_total", verb=v, resource="RayJob") for v in ("POST", "PATCH"))


def test_one_replica_reconciles_and_the_other_takes_over(kubeconfig: str, kube_api: Any, cluster: Cluster, registry: str) -> None:
    replicas = [replica(kubeconfig, cluster.ns), replica(kubeconfig, cluster.ns)]
    try:
        leader = leader_of(replicas)
        (standby,) = [r for r in replicas if r is not leader]
        cluster.create(MLP, "fraud", pipeline_spec(registry))
        wait_for("RayJob fraud-1", lambda: cluster.rayjob("fraud-1"))
        wait_for("run 1 recorded", lambda: (cluster.status(MLP, "fraud").get("lastRun") == 1) or None)
        assert standby.metric("conveyor_leader") == 0
        assert (rayjob_writes(leader), rayjob_writes(standby)) == (1, 0)
        assert standby.metric("conveyor_api_requests_total", resource="MLPipeline/status") == 0

        lease = client.CoordinationV1Api(kube_api).read_namespaced_lease("conveyor-operator", cluster.ns)
        first_holder = lease.spec.holder_identity
        killed_at = time.monotonic()
        leader.stop(signal.SIGKILL)  # no goodbye: the Lease is not released
        wait_until("the standby leads", lambda: standby.metric("conveyor_leader"), lambda v: v == 1, timeout=30)
        handover = time.monotonic() - killed_at
        assert handover <= 15, f"hand-over took {handover:.1f}s"
        lease = client.CoordinationV1Api(kube_api).read_namespaced_lease("conveyor-operator", cluster.ns)
        assert lease.spec.holder_identity != first_holder and lease.spec.lease_transitions >= 1

        # The new leader carries on from the status: run 1 ends (the test plays KubeRay), a spec change
        # starts run 2, and nothing is created twice.
        cluster.kuberay_sets("fraud-1", jobDeploymentStatus="Failed", jobStatus="FAILED", message="exit code 1")
        wait_for("run 1 failed", lambda: (cluster.status(MLP, "fraud")["runs"][0]["outcome"] == "Failed") or None)
        cluster.patch(MLP, "fraud", {"spec": {"training": {"hyperparameters": {"epochs": 2}}}})
        wait_for("RayJob fraud-2", lambda: cluster.rayjob("fraud-2"))
        assert sorted(r["metadata"]["name"] for r in cluster.rayjobs()) == ["fraud-1", "fraud-2"]
        assert rayjob_writes(standby) == 1
    finally:
        for r in replicas:
            r.stop()
            print(r.logs())
