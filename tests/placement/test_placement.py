"""Where the runs' pods really land: every sample MLPipeline, reconciled by the real operator, through the
real KubeRay operator, bound by the real kube-scheduler to kwok's node pools, in a namespace whose
restricted Pod Security Standard the apiserver's own PodSecurity admission enforces.

Training does not run here (kwok only plays the kubelet's pod status): this tier checks placement.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from _operator_support import Cluster, OperatorProcess, wait_for, wait_until
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.placement

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "manifests" / "samples").glob("mlpipeline-*.yaml"))
GPU = "nvidia.com/gpu"


def _pool(core: client.CoreV1Api, node: str) -> str:
    return core.read_node(node).metadata.labels["conveyor.dev/pool"]


def _gpus(pod: client.V1Pod) -> int:
    limits = pod.spec.containers[0].resources.limits or {}
    return int(limits.get(GPU, 0))


def test_the_namespace_enforces_the_restricted_standard(placement_cluster: Cluster) -> None:
    """The tier's premise: a pod without the restricted securityContext is refused by the apiserver."""
    pod = {"metadata": {"name": "bare"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    with pytest.raises(ApiException) as refused:
        placement_cluster.core.create_namespaced_pod(placement_cluster.ns, pod)
    assert refused.value.status == 403
    assert 'violates PodSecurity "restricted' in json.loads(refused.value.body)["message"]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_each_samples_run_is_placed_on_its_pool(
    sample: Path, placement_cluster: Cluster, placement_operator: OperatorProcess, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    manifest: dict[str, Any] = yaml.safe_load(sample.read_text())
    name, spec = manifest["metadata"]["name"], manifest["spec"]
    spec["registry"]["uri"] = f"file://{tmp_path}/registry"  # the sample's path is a cluster volume's
    queue = spec["training"].get("queue")
    if queue:  # a sample queued through Kueue: its LocalQueue, on a ClusterQueue with room for it
        _kueue_queue(placement_cluster, queue, request.addfinalizer)
    placement_cluster.create("mlpipelines", name, spec)

    rayjob = wait_for("the run's RayJob", lambda: next(iter(placement_cluster.rayjobs()), None), timeout=60)
    rj_name = rayjob["metadata"]["name"]
    # The real KubeRay accepts it (no ValidationFailed) and makes its RayCluster.
    rayjob = wait_until(
        "KubeRay to give the RayJob a RayCluster",
        lambda: placement_cluster.rayjob(rj_name),
        lambda rj: (rj.get("status") or {}).get("rayClusterName") or (rj.get("status") or {}).get("jobDeploymentStatus") == "ValidationFailed",
        timeout=60,
    )
    assert rayjob["status"].get("jobDeploymentStatus") != "ValidationFailed", rayjob["status"]

    groups = {"head": 1} | {g["groupName"]: g["replicas"] for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    cluster_name = rayjob["status"]["rayClusterName"]
    core = placement_cluster.core

    def bound_pods() -> list[client.V1Pod] | None:
        # The RayJob's current cluster: KubeRay makes a new one for each retry, and attempts fail here
        # (no Ray runs in kwok's pods; measured: failed=2 and a second cluster within the wait).
        current = (placement_cluster.rayjob(rj_name).get("status") or {}).get("rayClusterName") or cluster_name
        pods = core.list_namespaced_pod(placement_cluster.ns, label_selector=f"ray.io/cluster={current}").items
        ready = [p for p in pods if p.spec.node_name and p.status.phase == "Running"]
        return ready if len(ready) == sum(groups.values()) else None

    pods = wait_for(f"{sum(groups.values())} Ray pods bound and Running", bound_pods, timeout=90)
    for pod in pods:
        pool = _pool(core, pod.spec.node_name)
        is_head = pod.metadata.labels.get("ray.io/node-type") == "head"
        # GPU workers only on the GPU pool; the head (and CPU workers) on the CPU pool: the GPU
        # nodes' taint keeps everything that does not tolerate it away.
        want = "gpu" if _gpus(pod) else "cpu"
        assert pool == want, f"{pod.metadata.name} ({'head' if is_head else 'worker'}) landed on the {pool} pool"
        if is_head:
            assert pool == "cpu"
    if any(_gpus(p) for p in pods):
        assert sum(_gpus(p) for p in pods) == sum(
            g["replicas"] * g.get("gpus", 0) for g in spec["training"].get("workerGroups", [])
        )
    # The run is seen from the MLPipeline: it names its RayJob and is under way.
    run = wait_until(
        "the MLPipeline's run",
        lambda: (placement_cluster.status("mlpipelines", name).get("runs") or [None])[-1],
        lambda r: r is not None and r.get("rayJob") == rj_name,
    )
    assert run["outcome"] in ("Pending", "Running"), run


def _kueue_queue(cluster: Cluster, queue: str, finalizer: Any) -> None:
    api = "kueue.x-k8s.io/v1beta2"
    group, version = api.split("/")
    flavor, cq = f"{cluster.ns}-flavor", f"{cluster.ns}-cq"
    quota = [{"name": "cpu", "nominalQuota": "200"}, {"name": "memory", "nominalQuota": "1Ti"},
             {"name": GPU, "nominalQuota": "64"}]
    cluster.custom.create_cluster_custom_object(group, version, "resourceflavors",
                                                {"apiVersion": api, "kind": "ResourceFlavor", "metadata": {"name": flavor}})
    cluster.custom.create_cluster_custom_object(group, version, "clusterqueues", {
        "apiVersion": api, "kind": "ClusterQueue", "metadata": {"name": cq},
        "spec": {"namespaceSelector": {}, "resourceGroups": [{"coveredResources": ["cpu", "memory", GPU],
                                                                "flavors": [{"name": flavor, "resources": quota}]}]},
    })
    cluster.custom.create_namespaced_custom_object(group, version, cluster.ns, "localqueues",
                                                   {"apiVersion": api, "kind": "LocalQueue", "metadata": {"name": queue},
                                                    "spec": {"clusterQueue": cq}})
    # A workload that reaches a ClusterQueue before Kueue made it Active waits for a requeue: start after.
    wait_for("the ClusterQueue to be Active", lambda: any(
        c["type"] == "Active" and c["status"] == "True"
        for c in (cluster.custom.get_cluster_custom_object(group, version, "clusterqueues", cq).get("status") or {})
        .get("conditions") or []), timeout=60)

    def remove() -> None:
        for plural, obj in (("clusterqueues", cq), ("resourceflavors", flavor)):
            with contextlib.suppress(ApiException):
                cluster.custom.delete_cluster_custom_object(group, version, plural, obj)

    finalizer(remove)


def _small_pipeline(registry: str, **training: Any) -> dict[str, Any]:
    return {
        "data": {"source": {"uri": "builtin://fraud", "format": "builtin"}},
        "registry": {"uri": registry, "modelName": "fraud"},
        "evaluation": {"metric": "accuracy", "threshold": 0.9},
        "training": {"numWorkers": 1, **training},
    }


def test_a_run_that_cannot_start_says_why_within_a_minute(
    placement_cluster: Cluster, placement_operator: OperatorProcess, tmp_path: Path
) -> None:
    """Pods the namespace's Pod Security forbids, and GPU workers no node can hold: each run stays pending
    with the cluster's own reason in its status and one Warning event, instead of Running for ever."""
    registry = f"file://{tmp_path}/registry"
    gpu = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}
    cases = {
        # The user's own container securityContext replaces the restricted default: refused at admission.
        "escalates": (_small_pipeline(registry, pod={"containerSecurityContext": {"allowPrivilegeEscalation": True}}),
                      "PodsForbidden", "allowPrivilegeEscalation"),
        # 8 GPUs a worker, on nodes of 4: the scheduler says so.
        "too-big": (_small_pipeline(registry, workerGroups=[{"name": "gpu", "replicas": 1, "gpus": 8, "tolerations": [gpu]}]),
                    "Unschedulable", GPU),
    }
    for name, (spec, _, _) in cases.items():
        placement_cluster.create("mlpipelines", name, spec)
    for name, (_, reason, says) in cases.items():
        run = wait_until(
            f"{name}'s run to say why it cannot start",
            lambda name=name: (placement_cluster.status("mlpipelines", name).get("runs") or [{}])[-1],
            lambda r, reason=reason: r.get("reason") == reason,
            timeout=60,
        )
        assert run["outcome"] == "Pending" and says in run["message"], run
        warnings = [e for e in placement_cluster.events(name) if e[0] == "Warning" and e[1] == "RunCannotStart"]
        assert len(warnings) == 1 and reason in warnings[0][2], warnings
        trained = placement_cluster.condition("mlpipelines", name, "Trained")
        assert trained is not None and trained["reason"] == reason
