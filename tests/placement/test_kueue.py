"""Kueue holds a run its ClusterQueue has no room for, and the MLPipeline says so: the real Kueue manager
(hack/placement.sh), its webhook suspending the operator's RayJob at creation and its scheduler admitting
it once the run before it finished, with the real KubeRay and kube-scheduler placing what it admits.

Training does not run in this tier (kwok plays the pods), so no Ray job ever reports its end: the test
plays the first run's finish by writing its RayJob's status as KubeRay would once the Ray job succeeded
(jobDeploymentStatus Complete, jobStatus SUCCEEDED). Kueue reads that status to release the quota.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from _operator_support import Cluster, OperatorProcess, wait_until
from kubernetes import client
from kubernetes.client.rest import ApiException

from conveyor.operator.mlpipeline.build import build_rayjob
from conveyor.runtime.spec import MLPipelineSpec

pytestmark = pytest.mark.placement

KUEUE = ("kueue.x-k8s.io", "v1beta2")
API = "/".join(KUEUE)


def _spec(registry: str, queue: str, **training: Any) -> dict[str, Any]:
    return {
        "data": {"source": {"uri": "builtin://fraud", "format": "builtin"}},
        "registry": {"uri": registry, "modelName": "fraud"},
        "evaluation": {"metric": "accuracy", "threshold": 0.9},
        "training": {"numWorkers": 1, "queue": queue, **training},
    }


# The first run holds its place: a GPU worker wanting 8 GPUs, on nodes of 4, is never scheduled, so its
# Ray cluster never comes up and its RayJob never ends by itself (kwok would otherwise complete the
# submitter pod and KubeRay end the job within a minute).
HELD = {"workerGroups": [{"name": "gpu", "replicas": 1, "gpus": 8,
                          "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}]}


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _requested_cpu(spec: dict[str, Any]) -> float:
    """The CPU one run's RayJob asks Kueue for: its head, workers and submitter pod (the operator's own build)."""
    obj = {"apiVersion": "conveyor.dev/v1alpha1", "kind": "MLPipeline", "metadata": {"name": "x", "namespace": "x", "uid": "x"}}
    rj = build_rayjob({**obj, "spec": spec}, MLPipelineSpec.model_validate(spec), 1)["spec"]
    pods = [(1, rj["rayClusterSpec"]["headGroupSpec"]["template"]), (1, rj["submitterPodTemplate"])]
    pods += [(g["replicas"], g["template"]) for g in rj["rayClusterSpec"]["workerGroupSpecs"]]
    return sum(n * sum(_cpu(c["resources"]["requests"]["cpu"]) for c in t["spec"]["containers"]) for n, t in pods)


@pytest.fixture
def local_queue(placement_api: Any, restricted_namespace: str, tmp_path: Path) -> Iterator[str]:
    """A LocalQueue in the test's namespace on a ClusterQueue with room for one small run, not two."""
    custom = client.CustomObjectsApi(placement_api)
    one_run = _requested_cpu(_spec(f"file://{tmp_path}/r", "team", **HELD))
    flavor, cq = f"{restricted_namespace}-flavor", f"{restricted_namespace}-cq"
    custom.create_cluster_custom_object(*KUEUE, "resourceflavors", {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": flavor}})
    custom.create_cluster_custom_object(*KUEUE, "clusterqueues", {
        "apiVersion": API,
        "kind": "ClusterQueue",
        "metadata": {"name": cq},
        "spec": {
            "namespaceSelector": {},
            "resourceGroups": [{
                "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                "flavors": [{"name": flavor, "resources": [
                    {"name": "cpu", "nominalQuota": f"{int(one_run * 1.5 * 1000)}m"},
                    {"name": "memory", "nominalQuota": "256Gi"},
                    {"name": "nvidia.com/gpu", "nominalQuota": "64"},
                ]}],
            }],
        },
    })
    custom.create_namespaced_custom_object(*KUEUE, restricted_namespace, "localqueues",
                                           {"apiVersion": API, "kind": "LocalQueue", "metadata": {"name": "team"}, "spec": {"clusterQueue": cq}})
    try:
        yield "team"
    finally:
        for plural, name in (("clusterqueues", cq), ("resourceflavors", flavor)):
            with contextlib.suppress(ApiException):
                custom.delete_cluster_custom_object(*KUEUE, plural, name)


def _workload(cluster: Cluster, rayjob: dict[str, Any]) -> dict[str, Any] | None:
    items = cluster.custom.list_namespaced_custom_object(
        *KUEUE, cluster.ns, "workloads", label_selector=f"kueue.x-k8s.io/job-uid={rayjob['metadata']['uid']}"
    )["items"]
    return items[0] if items else None


def _condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def _run(cluster: Cluster, name: str) -> dict[str, Any]:
    return (cluster.status("mlpipelines", name).get("runs") or [{}])[-1]


def test_a_run_without_room_waits_queued_and_is_admitted_when_the_first_finishes(
    placement_cluster: Cluster, placement_operator: OperatorProcess, local_queue: str, tmp_path: Path
) -> None:
    cluster = placement_cluster
    spec = _spec(f"file://{tmp_path}/registry", local_queue)
    cluster.create("mlpipelines", "first", _spec(f"file://{tmp_path}/registry", local_queue, **HELD))
    # Kueue's webhook created it suspended; Kueue admits it (room for one) and unsuspends it.
    first = wait_until("Kueue to admit and unsuspend the first run", lambda: next(iter(cluster.rayjobs()), None),
                       lambda rj: rj is not None and not rj["spec"].get("suspend"), timeout=60)
    assert _condition(_workload(cluster, first), "Admitted").get("status") == "True"
    cluster.create("mlpipelines", "second", spec)

    # The second waits, suspended by Kueue, and the MLPipeline says so in Kueue's words.
    # (Before Kueue first looks at its Workload the message says it waits for the queue to consider it;
    # the operator looks again every 15 s.)
    second_run = wait_until("the second MLPipeline to show its run Queued, in Kueue's words",
                            lambda: _run(cluster, "second"),
                            lambda r: r.get("reason") == "Queued" and "(Pending)" in (r.get("message") or ""),
                            timeout=90)
    assert second_run["outcome"] == "Pending"
    assert "LocalQueue team (Pending)" in second_run["message"] and "insufficient unused quota" in second_run["message"]
    status = cluster.status("mlpipelines", "second")
    assert status["phase"] == "Queued"
    trained = cluster.condition("mlpipelines", "second", "Trained")
    assert trained is not None and trained["reason"] == "Queued" and "insufficient unused quota" in trained["message"]
    cluster.event("second", "Normal", "RunQueued")
    second = cluster.rayjob(second_run["rayJob"])
    assert second["spec"]["suspend"] is True
    reserved = _condition(_workload(cluster, second), "QuotaReserved")
    assert (reserved.get("status"), reserved.get("reason")) == ("False", "Pending")
    pods = [p.metadata.name for p in cluster.core.list_namespaced_pod(cluster.ns).items]
    assert not [p for p in pods if p.startswith(f"{second_run['rayJob']}-")], pods  # nothing of it runs while it waits

    # The first run finishes: played here by writing its RayJob's status as KubeRay would (no Ray job runs).
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def finish() -> bool:
        try:
            cluster.custom.patch_namespaced_custom_object_status(
                "ray.io", "v1", cluster.ns, "rayjobs", first["metadata"]["name"],
                {"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "endTime": now}},
            )
        except ApiException as e:
            if e.status != 409:
                raise
        return (cluster.rayjob(first["metadata"]["name"]).get("status") or {}).get("jobDeploymentStatus") == "Complete"

    wait_until("the first RayJob to read Complete", finish, bool, timeout=30)
    wait_until("Kueue to mark the first Workload Finished", lambda: _workload(cluster, first),
               lambda wl: _condition(wl, "Finished").get("status") == "True", timeout=60)

    # Kueue admits the second: its RayJob is unsuspended, KubeRay makes its cluster, the status follows.
    admitted = wait_until("Kueue to admit the second run", lambda: cluster.rayjob(second_run["rayJob"]),
                          lambda rj: not rj["spec"].get("suspend"), timeout=60)
    assert _condition(_workload(cluster, admitted), "Admitted").get("status") == "True"
    run = wait_until("the second MLPipeline's run to leave the queue", lambda: _run(cluster, "second"),
                     lambda r: r.get("reason") != "Queued", timeout=60)
    assert run["outcome"] in ("Pending", "Running") and cluster.status("mlpipelines", "second")["phase"] != "Queued"
    cluster.event("second", "Normal", "RunAdmitted")
