"""Pure builders: a spec in, the child manifest out. No I/O, no cluster; unit-tested table-style.

- `build_rayjob(pipeline, spec, run)` -> the KubeRay RayJob (ray.io/v1) of run N of a pipeline.
- `build_run_configmap(pipeline, spec, run, rayjob_uid)` -> the ConfigMap holding that run's
  `RunConfig` as `run.json`, owned by the RayJob (collected with it).
- `build_inference_service(deployment, spec, stable=..., candidate=..., weight=...)` -> the KServe
  InferenceService (serving.kserve.io/v1beta1) serving `stable`, with `candidate` beside it at `weight`
  percent of the traffic.

Canary in the two KServe deployment modes (checked against the pinned KServe v0.20.0 CRD):
- Knative: one predictor, whose `storageUri` is the candidate, with `predictor.canaryTrafficPercent:
  weight`; Knative keeps the previous rolled-out revision (the stable one) on the rest of the traffic.
  The stable version is therefore not named in the spec: it is whatever revision last rolled out.
- Standard: KServe v0.20.0 has `spec.canary[]` (`{predictor: {name, ...}, trafficPercent}`, Standard
  mode only). The stable predictor gets `predictor.name: <stable version>` (its Deployment is
  `<isvc>-<version>-predictor`), the candidate is `canary[0]` with `predictor.name: <candidate version>`
  and its own container (KServe merges it over the stable predictor and gives it fixed replicas, so
  the canary entry sets no autoscaling fields, as KServe's validation requires). Promotion, per KServe,
  sets `predictor.name` to the candidate's and drops the canary entry: that is what this builder emits
  for (stable=candidate, candidate=None).

The predictor is the conveyor runtime image running `python -m conveyor.runtime.serve` as KServe's
custom container (`kserve-container`); `STORAGE_URI` makes KServe's storage initializer fetch the
registry version into /mnt/models before the server starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from conveyor.runtime.spec import (
    API_VERSION,
    DEFAULT_KSERVE_MODE,
    HeadGroup,
    MLPipelineSpec,
    ModelDeploymentSpec,
    RunConfig,
    Toleration,
    WorkerGroup,
)

FIELD_MANAGER = "conveyor-operator"

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "conveyor"
LABEL_PIPELINE = "conveyor.dev/pipeline"
LABEL_RUN = "conveyor.dev/run"
LABEL_DEPLOYMENT = "conveyor.dev/model-deployment"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_APPLIED_HASH = "conveyor.dev/applied-hash"
ANNOTATION_STABLE_VERSION = "conveyor.dev/stable-version"
ANNOTATION_CANDIDATE_VERSION = "conveyor.dev/candidate-version"
ANNOTATION_RUN_CONFIG = "conveyor.dev/run-config"
# What a run was started from, on its RayJob, so a RayJob adopted after a crash (before the pipeline's
# status recorded it) tells which spec and which rerun request it already serves.
ANNOTATION_SPEC_HASH = "conveyor.dev/spec-hash"
ANNOTATION_SPEC_GENERATION = "conveyor.dev/spec-generation"
ANNOTATION_TRIGGER = "conveyor.dev/trigger"
ANNOTATION_RERUN = "conveyor.dev/rerun"

# Spec fields whose change does not ask for retraining.
NON_TRAINING_FIELDS = ("triggers", "deploy", "runsHistoryLimit", "suspend")

KSERVE_DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
KSERVE_AUTOSCALER_CLASS = "serving.kserve.io/autoscalerClass"
KNATIVE_AUTOSCALER_CLASS = "autoscaling.knative.dev/class"

RUN_CONFIG_DIR = "/etc/conveyor"
RUN_CONFIG_FILE = "run.json"
MODEL_DIR = "/mnt/models"
PREDICTOR_PORT = 8080

# KubeRay derives the RayCluster and submitter Job names from the RayJob name; its validation
# refuses RayJob names longer than this.
MAX_RAYJOB_NAME = 47
# Leaves room for '-' and a run number of up to six digits.
MAX_PIPELINE_NAME = 40


class InvalidSpecError(ValueError):
    """A spec that passed the CRD schema but cannot be turned into a child; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def owner_reference(owner: dict[str, Any], *, controller: bool = True) -> dict[str, Any]:
    """An owner reference; the controller one blocks foreground deletion of its owner until collected
    (setting it needs `update` on the owner's `finalizers` subresource where the apiserver enforces it)."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner.get("apiVersion", API_VERSION),
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": controller,
        "blockOwnerDeletion": controller,
    }


def manifest_hash(manifest: dict[str, Any]) -> str:
    """Stable digest of what we apply (stored on the child, so an unchanged child is never re-applied)."""
    body = {k: v for k, v in manifest.items() if k != "metadata"}
    meta = {k: v for k, v in manifest.get("metadata", {}).items() if k != "annotations"}
    annotations = {
        k: v for k, v in manifest.get("metadata", {}).get("annotations", {}).items() if k != ANNOTATION_APPLIED_HASH
    }
    blob = json.dumps({"body": body, "meta": meta, "annotations": annotations}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def spec_hash(spec: dict[str, Any]) -> str:
    """Digest of the training-relevant part of an MLPipeline spec (a change starts a new run)."""
    relevant = {k: v for k, v in spec.items() if k not in NON_TRAINING_FIELDS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _stamp(manifest: dict[str, Any]) -> dict[str, Any]:
    manifest["metadata"].setdefault("annotations", {})[ANNOTATION_APPLIED_HASH] = manifest_hash(manifest)
    return manifest


def _tolerations(tolerations: list[Toleration]) -> list[dict[str, Any]]:
    return [t.to_api() for t in tolerations]


# ---------------------------------------------------------------- MLPipeline -> RayJob


def rayjob_name(pipeline: str, run: int) -> str:
    return f"{pipeline}-{run}"


def run_configmap_name(pipeline: str, run: int) -> str:
    return f"{pipeline}-{run}-config"


def run_labels(pipeline: str, run: int) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_PIPELINE: pipeline, LABEL_RUN: str(run)}


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
    container: dict[str, Any], config_map: str, node_selector: dict[str, str], tolerations: list[Toleration]
) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "run-config", "configMap": {"name": config_map}}],
    }
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod["tolerations"] = _tolerations(tolerations)
    return {"spec": pod}


def worker_groups(spec: MLPipelineSpec) -> list[WorkerGroup]:
    """The explicit worker groups, or one group of `numWorkers` replicas (one GPU each with useGpu)."""
    t = spec.training
    if t.worker_groups:
        return list(t.worker_groups)
    return [WorkerGroup(name="workers", replicas=t.num_workers, gpus=1 if t.use_gpu else 0)]


def build_rayjob(pipeline: dict[str, Any], spec: MLPipelineSpec, run: int, trigger: str = "") -> dict[str, Any]:
    """The RayJob of run `run`: the cluster from spec.training, the entrypoint training with run.json."""
    meta = pipeline["metadata"]
    name = rayjob_name(meta["name"], run)
    if len(meta["name"]) > MAX_PIPELINE_NAME or len(name) > MAX_RAYJOB_NAME:
        raise InvalidSpecError(
            "metadata.name",
            f"RayJob names <pipeline>-<run> must fit KubeRay's {MAX_RAYJOB_NAME} characters; "
            f"use a pipeline name of at most {MAX_PIPELINE_NAME} characters",
        )
    t = spec.training
    groups = worker_groups(spec)
    seen: set[str] = set()
    for i, g in enumerate(groups):
        if g.name in seen:
            raise InvalidSpecError(f"spec.training.workerGroups[{i}].name", f"group name {g.name!r} is used twice")
        seen.add(g.name)
    config_map = run_configmap_name(meta["name"], run)
    head: HeadGroup = t.head_group
    labels = run_labels(meta["name"], run)
    if t.queue:
        labels[LABEL_KUEUE_QUEUE] = t.queue
    job_spec: dict[str, Any] = {
        "entrypoint": f"python -m conveyor.runtime.train --config {RUN_CONFIG_DIR}/{RUN_CONFIG_FILE}",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": t.ttl_seconds_after_finished,
        "backoffLimit": t.backoff_limit,
        "rayClusterSpec": {
            "rayVersion": t.ray_version,
            "headGroupSpec": {
                "rayStartParams": {"dashboard-host": "0.0.0.0"},
                "template": _pod_template(
                    _ray_container("ray-head", t.image, head.cpu, head.memory, 0),
                    config_map,
                    head.node_selector,
                    head.tolerations,
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
                        _ray_container("ray-worker", t.image, g.cpu, g.memory, g.gpus),
                        config_map,
                        g.node_selector,
                        g.tolerations,
                    ),
                }
                for g in groups
            ],
        },
    }
    if t.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = t.active_deadline_seconds
    # With a Kueue queue, Kueue's webhook suspends the job and admits it: we never set `suspend`, so
    # the field stays Kueue's.
    return _stamp(
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": run_annotations(pipeline, config_map, trigger),
                "ownerReferences": [owner_reference(pipeline)],
            },
            "spec": job_spec,
        }
    )


def run_annotations(pipeline: dict[str, Any], config_map: str, trigger: str) -> dict[str, str]:
    meta = pipeline["metadata"]
    annotations = {
        ANNOTATION_RUN_CONFIG: config_map,
        ANNOTATION_SPEC_HASH: spec_hash(pipeline.get("spec") or {}),
        ANNOTATION_SPEC_GENERATION: str(meta.get("generation", "")),
    }
    if trigger:
        annotations[ANNOTATION_TRIGGER] = trigger
    token = (meta.get("annotations") or {}).get(ANNOTATION_RERUN)
    if token:
        annotations[ANNOTATION_RERUN] = token
    return annotations


def build_run_config(pipeline: dict[str, Any], spec: MLPipelineSpec, run: int) -> RunConfig:
    meta = pipeline["metadata"]
    return RunConfig.for_run(spec, pipeline=meta["name"], namespace=meta["namespace"], run=run)


def build_run_configmap(
    pipeline: dict[str, Any], spec: MLPipelineSpec, run: int, rayjob: dict[str, Any]
) -> dict[str, Any]:
    """run.json for `python -m conveyor.runtime.train --config`, owned by the run's RayJob."""
    meta = pipeline["metadata"]
    config = build_run_config(pipeline, spec, run)
    return _stamp(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": run_configmap_name(meta["name"], run),
                "namespace": meta["namespace"],
                "labels": run_labels(meta["name"], run),
                "ownerReferences": [owner_reference(rayjob, controller=False)],
            },
            "data": {RUN_CONFIG_FILE: json.dumps(config.to_api(), indent=2, sort_keys=True)},
        }
    )


# ---------------------------------------------------------------- ModelDeployment -> InferenceService


_NAME_UNSAFE = re.compile(r"[^a-z0-9-]+")


def predictor_name(version: str) -> str:
    """A DNS-label-safe predictor name for a version (KServe names Deployments after it)."""
    slug = _NAME_UNSAFE.sub("-", version.lower()).strip("-")
    if not slug:
        raise InvalidSpecError("spec.model.version", f"version {version!r} has no usable characters")
    return slug[:20]


def _predictor_container(
    deployment: dict[str, Any], spec: ModelDeploymentSpec, storage_uri: str, version: str
) -> dict[str, Any]:
    p = spec.predictor
    resources: dict[str, Any] = {}
    requests = p.resources.requests.to_api()
    limits = p.resources.limits.to_api()
    if p.gpus:
        limits["nvidia.com/gpu"] = p.gpus
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    name = deployment["metadata"]["name"]
    container: dict[str, Any] = {
        "name": "kserve-container",
        "image": p.image,
        "command": ["python", "-m", "conveyor.runtime.serve"],
        "args": [
            "--model-dir", MODEL_DIR,
            "--name", name,
            "--http-port", str(PREDICTOR_PORT),
            "--max-batch-size", str(p.batching.max_batch_size),
            "--max-latency-ms", str(p.batching.max_latency_ms),
            "--drift-method", spec.monitoring.drift.method,
        ],
        # STORAGE_URI: KServe's storage initializer fetches it into MODEL_DIR. The server answers both
        # protocols; CONVEYOR_PROTOCOL tells it (and people) which one clients are meant to use.
        "env": [
            {"name": "STORAGE_URI", "value": storage_uri},
            {"name": "CONVEYOR_MODEL_VERSION", "value": version},
            {"name": "CONVEYOR_PROTOCOL", "value": p.protocol},
        ],
        "ports": [{"containerPort": PREDICTOR_PORT, "protocol": "TCP"}],
    }
    if resources:
        container["resources"] = resources
    return container


def _autoscaling(spec: ModelDeploymentSpec) -> tuple[dict[str, Any], dict[str, str]]:
    """Predictor autoscaling fields and the autoscaler class annotations for the deployment mode."""
    a = spec.autoscaling
    mode = spec.rollout.mode or DEFAULT_KSERVE_MODE
    if a.min_replicas > a.max_replicas:
        raise InvalidSpecError("spec.autoscaling.minReplicas", "must not exceed spec.autoscaling.maxReplicas")
    fields: dict[str, Any] = {
        "minReplicas": a.min_replicas,
        "maxReplicas": a.max_replicas,
        "scaleMetric": a.metric,
        "scaleTarget": a.target,
    }
    if mode == "Knative":
        if a.metric == "cpu":
            # Knative's own HPA class scales on CPU; KPA only on concurrency and rps.
            return fields, {KNATIVE_AUTOSCALER_CLASS: "hpa.autoscaling.knative.dev"}
        return fields, {KNATIVE_AUTOSCALER_CLASS: "kpa.autoscaling.knative.dev"}
    # Standard mode: Kubernetes HPA, which KServe v0.20.0 allows only on cpu or memory, never at 0.
    if a.min_replicas < 1:
        raise InvalidSpecError(
            "spec.autoscaling.minReplicas", "scale to zero (0) needs spec.rollout.mode Knative; use 1 or more"
        )
    if a.metric != "cpu":
        raise InvalidSpecError(
            "spec.autoscaling.metric",
            f"{a.metric!r} is not supported in Standard mode (KServe's HPA autoscaler scales on cpu); "
            "use metric cpu, or rollout.mode Knative",
        )
    if a.target > 100:
        raise InvalidSpecError("spec.autoscaling.target", "for metric cpu it is a utilisation percentage (1..100)")
    return fields, {KSERVE_AUTOSCALER_CLASS: "hpa"}


def build_inference_service(
    deployment: dict[str, Any],
    spec: ModelDeploymentSpec,
    *,
    stable: tuple[str, str],
    candidate: tuple[str, str] | None = None,
    weight: int = 0,
) -> dict[str, Any]:
    """The InferenceService serving `stable` (version, storage URI), with `candidate` at `weight`%.

    `candidate=None` serves `stable` alone. See the module docstring for how each mode splits traffic.
    """
    if candidate is not None and not 0 <= weight <= 100:
        raise InvalidSpecError("canaryWeight", f"must lie within 0..100, got {weight}")
    if candidate is not None and candidate[0] == stable[0]:
        candidate = None
    meta = deployment["metadata"]
    mode = spec.rollout.mode or DEFAULT_KSERVE_MODE
    scaling, class_annotations = _autoscaling(spec)
    annotations = {KSERVE_DEPLOYMENT_MODE: mode, **class_annotations, ANNOTATION_STABLE_VERSION: stable[0]}
    if candidate is not None:
        annotations[ANNOTATION_CANDIDATE_VERSION] = candidate[0]

    def placement(predictor: dict[str, Any]) -> dict[str, Any]:
        if spec.predictor.node_selector:
            predictor["nodeSelector"] = dict(spec.predictor.node_selector)
        if spec.predictor.tolerations:
            predictor["tolerations"] = _tolerations(spec.predictor.tolerations)
        return predictor

    isvc_spec: dict[str, Any]
    if mode == "Knative":
        version, uri = candidate if candidate is not None else stable
        predictor = placement({**scaling, "containers": [_predictor_container(deployment, spec, uri, version)]})
        if candidate is not None:
            predictor["canaryTrafficPercent"] = weight
        isvc_spec = {"predictor": predictor}
    else:
        predictor = placement(
            {
                "name": predictor_name(stable[0]),
                **scaling,
                "containers": [_predictor_container(deployment, spec, stable[1], stable[0])],
            }
        )
        isvc_spec = {"predictor": predictor}
        if candidate is not None:
            isvc_spec["canary"] = [
                {
                    "predictor": {
                        "name": predictor_name(candidate[0]),
                        "containers": [_predictor_container(deployment, spec, candidate[1], candidate[0])],
                    },
                    "trafficPercent": weight,
                }
            ]
    return _stamp(
        {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_DEPLOYMENT: meta["name"]},
                "annotations": annotations,
                "ownerReferences": [owner_reference(deployment)],
            },
            "spec": isvc_spec,
        }
    )
