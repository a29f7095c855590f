"""The Ray cluster of a RayJob, pure: shared by training runs (MLPipeline `spec.training`) and batch runs
(BatchPrediction `spec.ray`), which carry the same cluster fields (image, rayVersion, headGroup,
workerGroups or numWorkers/useGpu, pod settings). Every pod mounts the run's ConfigMap at
`RUN_CONFIG_DIR`, where the entrypoint reads `run.json`.
"""

from __future__ import annotations

from typing import Any, Protocol

from conveyor.operator.controller.children import tolerations_to_api
from conveyor.operator.controller.pods import pod_template
from conveyor.runtime.spec import HeadGroup, PodSettings, Toleration, WorkerGroup

RUN_CONFIG_DIR = "/etc/conveyor"
RUN_CONFIG_FILE = "run.json"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"


class RayClusterFields(Protocol):
    """What both kinds' cluster sections have (TrainingSpec, BatchRaySpec)."""

    image: str
    ray_version: str
    num_workers: int
    use_gpu: bool
    head_group: HeadGroup
    worker_groups: list[WorkerGroup]
    pod: PodSettings


def _ray_container(name: str, image: str, cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {
        "name": name,
        "image": image,
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
        "volumeMounts": [{"name": "run-config", "mountPath": RUN_CONFIG_DIR, "readOnly": True}],
    }


def _pod_template(
    container: dict[str, Any],
    config_map: str,
    node_selector: dict[str, str],
    tolerations: list[Toleration],
    settings: PodSettings,
) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "run-config", "configMap": {"name": config_map}}],
    }
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod["tolerations"] = tolerations_to_api(tolerations)
    return pod_template(settings, pod)


def submitter_template(cluster: RayClusterFields) -> dict[str, Any]:
    """KubeRay's submitter Job pod (K8sJobMode), which it would otherwise default to a container with no
    securityContext: forbidden in a namespace enforcing the restricted Pod Security Standard, the run
    then waiting for ever. KubeRay fills in the `ray job submit` command; it runs where the head runs."""
    head = cluster.head_group
    container = {
        "name": "ray-job-submitter",
        "image": cluster.image,
        "resources": {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
    }
    pod: dict[str, Any] = {"containers": [container], "restartPolicy": "Never"}
    if head.node_selector:
        pod["nodeSelector"] = dict(head.node_selector)
    if head.tolerations:
        pod["tolerations"] = tolerations_to_api(head.tolerations)
    return pod_template(cluster.pod.overlaid(head.pod), pod)


def worker_groups(cluster: RayClusterFields) -> list[WorkerGroup]:
    """The explicit worker groups, or one group of `numWorkers` replicas (one GPU each with useGpu)."""
    if cluster.worker_groups:
        return list(cluster.worker_groups)
    return [WorkerGroup(name="workers", replicas=cluster.num_workers, gpus=1 if cluster.use_gpu else 0)]


def ray_cluster(cluster: RayClusterFields, config_map: str) -> dict[str, Any]:
    """The RayCluster spec: one head, the worker groups, every pod mounting the run's ConfigMap."""
    head = cluster.head_group
    return {
        "rayVersion": cluster.ray_version,
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0"},
            "template": _pod_template(
                _ray_container("ray-head", cluster.image, head.cpu, head.memory, 0),
                config_map,
                head.node_selector,
                head.tolerations,
                cluster.pod.overlaid(head.pod),
            ),
        },
        "workerGroupSpecs": [
            {
                "groupName": g.name,
                "replicas": g.replicas,
                "minReplicas": g.replicas,
                "maxReplicas": g.replicas,
                "rayStartParams": {},
                "template": _pod_template(
                    _ray_container("ray-worker", cluster.image, g.cpu, g.memory, g.gpus),
                    config_map,
                    g.node_selector,
                    g.tolerations,
                    cluster.pod.overlaid(g.pod),
                ),
            }
            for g in worker_groups(cluster)
        ],
    }
