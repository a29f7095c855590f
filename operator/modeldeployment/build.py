"""The child of a ModelDeployment, pure: the KServe InferenceService (serving.kserve.io/v1beta1).

`build_inference_service(deployment, spec, stable=..., candidate=..., weight=...)` serves `stable`
(version, storage URI), with `candidate` beside it at `weight` percent of the traffic. It assumes a
spec that `validate.validate_deployment` accepted.

Canary in the two KServe deployment modes (checked against the pinned KServe v0.20.0 CRD):
- Knative: one predictor, whose `storageUri` is the candidate, with `predictor.canaryTrafficPercent:
  weight`; Knative keeps the previous rolled-out revision (the stable one) on the rest of the traffic.
  The stable version is therefore not named in the spec: it is whatever revision last rolled out.
- Standard: KServe v0.20.0 has `spec.canary[]` (`{predictor: {name, ...}, trafficPercent}`, Standard
  mode only). The stable predictor gets `predictor.name: <stable version>` (its Deployment is
  `<isvc>-<version>-predictor`), the candidate is `canary[0]` with `predictor.name: <candidate version>`
  and its own container (KServe merges it over the stable predictor). Autoscaling of the canary:
  KServe v0.20.0's validation (`validateCanarySpecs`) refuses maxReplicas, scaleMetric, scaleTarget and
  autoScaling on a canary ("canary uses fixed replicas") and allows only `minReplicas`, at most the
  stable predictor's; its controller then runs the canary at that fixed count (default
  ceil(stable minReplicas x trafficPercent / 100)) and takes as many from the stable predictor's
  minimum. So the most of the deployment's autoscaling a canary can get is its share of
  `autoscaling.minReplicas`: this builder sets `minReplicas: max(1, ceil(minReplicas x weight / 100))`
  explicitly (the same count KServe would pick, never 0, visible in the spec); the stable predictor
  keeps the full autoscaling. Promotion, per KServe, sets `predictor.name` to the candidate's and
  drops the canary entry: that is what this builder emits for (stable=candidate, candidate=None).
  KServe v0.20.0 does not split Standard-mode traffic by weight (its source, and the real controller
  in tests/placement/test_kserve.py): `trafficPercent` sizes the canary's replicas, and the Gateway API
  HTTPRoute it writes (`enableGatewayApi`) has the stable predictor's Service as its one backend at
  every step. So with `cluster_local=True` the InferenceService is labelled
  `networking.kserve.io/visibility: cluster-local` (KServe then writes no route) and the operator's own
  weighted HTTPRoute (route.py) exposes it.

Shadow (`strategy: shadow`), the same in both modes and without a mesh: the candidate is a second
InferenceService, `<name>-shadow` (`shadow_service_name`), serving the candidate under the model name
`<name>-shadow` with no traffic of its own (in Standard mode labelled cluster-local: KServe writes no
HTTPRoute or Ingress for it, and reports its cluster address, `status.address.url`); the stable predictor's container gets `CONVEYOR_SHADOW_*`
env (`ShadowTarget`: the shadow's address as KServe reports it, its model name and version, the share
and timeout) and mirrors that share of its requests there (runtime/serving/shadow.py). Changing the env
rolls the stable predictor's pods (Knative: a new revision of the same version, which takes the
traffic once Ready).

The predictor is the conveyor runtime image running `python -m conveyor.runtime.serve` as KServe's
custom container (`kserve-container`); `STORAGE_URI` makes KServe's storage initializer fetch the
registry version into /mnt/models before the server starts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from conveyor.operator.controller.children import (
    LABEL_MANAGED_BY,
    MANAGED_BY,
    owner_reference,
    stamp,
    tolerations_to_api,
)
from conveyor.operator.controller.pods import predictor_with_settings
from conveyor.runtime.spec import DEFAULT_KSERVE_MODE, ModelDeploymentSpec

LABEL_DEPLOYMENT = "conveyor.dev/model-deployment"
ANNOTATION_STABLE_VERSION = "conveyor.dev/stable-version"
ANNOTATION_CANDIDATE_VERSION = "conveyor.dev/candidate-version"

KSERVE_DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
KSERVE_AUTOSCALER_CLASS = "serving.kserve.io/autoscalerClass"
KNATIVE_AUTOSCALER_CLASS = "autoscaling.knative.dev/class"
# KServe's label that keeps an InferenceService off the gateway (no HTTPRoute, no Ingress).
KSERVE_VISIBILITY = "networking.kserve.io/visibility"
CLUSTER_LOCAL = "cluster-local"

MODEL_DIR = "/mnt/models"
SHADOW_SUFFIX = "-shadow"
ANNOTATION_SHADOW_OF = "conveyor.dev/shadow-of"
PREDICTOR_PORT = 8080
PREDICTOR_GRPC_PORT = 8081  # KServe's gRPC default
MAX_DEFAULT_WORKERS = 16


_NAME_UNSAFE = re.compile(r"[^a-z0-9-]+")


def predictor_name(version: str) -> str:
    """A DNS-label-safe predictor name for a version (KServe names Deployments after it)."""
    return _NAME_UNSAFE.sub("-", version.lower()).strip("-")[:20]


@dataclass(frozen=True)
class ShadowTarget:
    """Where the stable predictor mirrors requests (strategy shadow)."""

    url: str  # the shadow InferenceService's address
    model: str  # the model name it serves under
    version: str
    percent: int
    timeout_ms: int

    def env(self) -> list[dict[str, str]]:
        return [{"name": "CONVEYOR_SHADOW_URL", "value": self.url},
                {"name": "CONVEYOR_SHADOW_MODEL", "value": self.model},
                {"name": "CONVEYOR_SHADOW_VERSION", "value": self.version},
                {"name": "CONVEYOR_SHADOW_PERCENT", "value": str(self.percent)},
                {"name": "CONVEYOR_SHADOW_TIMEOUT_MS", "value": str(self.timeout_ms)}]


def shadow_service_name(deployment_name: str) -> str:
    return deployment_name + SHADOW_SUFFIX


def predictor_workers(spec: ModelDeploymentSpec) -> int:
    """Server processes per replica: ``predictor.workers``, else one per whole CPU of the limit (then the
    request), at least 1: one process's event loop keeps about one core busy."""
    p = spec.predictor
    if p.workers:
        return p.workers
    cpu = str(p.resources.limits.cpu or p.resources.requests.cpu or "").strip()
    if not cpu:
        return 1
    return max(1, min(MAX_DEFAULT_WORKERS, int(quantity(cpu))))


# Kubernetes quantity suffixes (binary, then decimal SI); the CRD admits any quantity (isQuantity).
_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def quantity(text: str) -> float:
    """A Kubernetes quantity's value (``500m`` -> 0.5, ``2`` -> 2.0, ``1k`` -> 1000.0, ``1e3m`` -> 1.0; an
    exponent is digits after e/E, a bare trailing ``E`` is exa).
    Not kubernetes.utils.parse_quantity: the operator's process keeps the kubernetes client unimportable
    (operator/__main__.py)."""
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return float(text)


def predictor_ports(protocol: str) -> list[dict[str, Any]]:
    """The container's ports: KServe routes to the first (its Service's port 80; Knative allows only one).
    For grpc-v2 that is the gRPC port, named h2c so KServe and Knative speak HTTP/2 to it (KServe v0.20
    marks it appProtocol kubernetes.io/h2c); REST (metrics, feedback) stays on 8080 inside the pod."""
    if protocol == "grpc-v2":
        return [{"name": "h2c", "containerPort": PREDICTOR_GRPC_PORT, "protocol": "TCP"}]
    return [{"containerPort": PREDICTOR_PORT, "protocol": "TCP"}]


def _predictor_container(
    deployment: dict[str, Any], spec: ModelDeploymentSpec, storage_uri: str, version: str, model_name: str | None = None
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
    name = model_name or deployment["metadata"]["name"]
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
            "--workers", str(predictor_workers(spec)),
            *(["--grpc-port", str(PREDICTOR_GRPC_PORT)] if p.protocol == "grpc-v2" else []),
            *(
                ["--explain", "--explain-max-instances", str(p.explain.max_instances),
                 "--explain-steps", str(p.explain.steps)]
                if p.explain.enabled
                else []
            ),
        ],
        # STORAGE_URI: KServe's storage initializer fetches it into MODEL_DIR. The server answers both
        # protocols; CONVEYOR_PROTOCOL tells it (and people) which one clients are meant to use.
        "env": [
            {"name": "STORAGE_URI", "value": storage_uri},
            {"name": "CONVEYOR_MODEL_VERSION", "value": version},
            {"name": "CONVEYOR_PROTOCOL", "value": p.protocol},
            # Ground truth is appended to the model's feedback dataset in registry storage (MODEL_DIR is a copy).
            {"name": "CONVEYOR_FEEDBACK_URI", "value": f"{spec.model.registry_uri.rstrip('/')}/{spec.model.name}"},
        ],
        "ports": predictor_ports(p.protocol),
    }
    if resources:
        container["resources"] = resources
    return container


def _autoscaling(spec: ModelDeploymentSpec) -> tuple[dict[str, Any], dict[str, str]]:
    """Predictor autoscaling fields and the autoscaler class annotations for the deployment mode."""
    a = spec.autoscaling
    mode = spec.rollout.mode or DEFAULT_KSERVE_MODE
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
    # Standard mode: Kubernetes HPA (validate.py refuses what KServe v0.20.0 does not allow).
    return fields, {KSERVE_AUTOSCALER_CLASS: "hpa"}


def _isvc_spec(
    deployment: dict[str, Any],
    spec: ModelDeploymentSpec,
    scaling: dict[str, Any],
    stable: tuple[str, str],
    candidate: tuple[str, str] | None,
    weight: int,
    shadow: ShadowTarget | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """The predictor (and canary) of each mode; see the module docstring."""

    def container(version: str, uri: str) -> dict[str, Any]:
        out = _predictor_container(deployment, spec, uri, version, model_name)
        if shadow is not None and candidate is None:
            out["env"] += shadow.env()
        return out

    def placement(predictor: dict[str, Any]) -> dict[str, Any]:
        if spec.predictor.node_selector:
            predictor["nodeSelector"] = dict(spec.predictor.node_selector)
        if spec.predictor.tolerations:
            predictor["tolerations"] = tolerations_to_api(spec.predictor.tolerations)
        return predictor_with_settings(predictor, spec.predictor.pod)

    if (spec.rollout.mode or DEFAULT_KSERVE_MODE) == "Knative":
        version, uri = candidate if candidate is not None else stable
        predictor = placement({**scaling, "containers": [container(version, uri)]})
        if candidate is not None:
            predictor["canaryTrafficPercent"] = weight
        return {"predictor": predictor}
    predictor = placement(
        {"name": predictor_name(stable[0]), **scaling, "containers": [container(stable[0], stable[1])]}
    )
    isvc_spec: dict[str, Any] = {"predictor": predictor}
    if candidate is not None:
        isvc_spec["canary"] = [
            {
                # KServe merges the canary over the stable predictor, but a container list is replaced
                # whole: the canary's container carries the pod settings' env itself.
                "predictor": predictor_with_settings(
                    {
                        "name": predictor_name(candidate[0]),
                        "minReplicas": canary_replicas(spec, weight),
                        "containers": [_predictor_container(deployment, spec, candidate[1], candidate[0])],
                    },
                    spec.predictor.pod,
                ),
                "trafficPercent": weight,
            }
        ]
    return isvc_spec


def canary_replicas(spec: ModelDeploymentSpec, weight: int) -> int:
    """The Standard-mode canary's fixed replica count: its share of the deployment's minimum (see the
    module docstring for why KServe allows nothing more)."""
    return max(1, math.ceil(spec.autoscaling.min_replicas * weight / 100))


def build_inference_service(
    deployment: dict[str, Any],
    spec: ModelDeploymentSpec,
    *,
    stable: tuple[str, str],
    candidate: tuple[str, str] | None = None,
    weight: int = 0,
    shadow: ShadowTarget | None = None,
    cluster_local: bool = False,
) -> dict[str, Any]:
    """The InferenceService serving `stable` (version, storage URI), with `candidate` at `weight`%.

    `candidate=None` serves `stable` alone (mirroring to `shadow` when given). See the module docstring
    for how each mode splits traffic; `cluster_local`: KServe does not expose it (the operator's route does).
    """
    if candidate is not None and candidate[0] == stable[0]:
        candidate = None
    meta = deployment["metadata"]
    mode = spec.rollout.mode or DEFAULT_KSERVE_MODE
    scaling, class_annotations = _autoscaling(spec)
    annotations = {KSERVE_DEPLOYMENT_MODE: mode, **class_annotations, ANNOTATION_STABLE_VERSION: stable[0]}
    if candidate is not None:
        annotations[ANNOTATION_CANDIDATE_VERSION] = candidate[0]

    isvc_spec = _isvc_spec(deployment, spec, scaling, stable, candidate, weight, shadow)
    labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_DEPLOYMENT: meta["name"]}
    if cluster_local:
        labels[KSERVE_VISIBILITY] = CLUSTER_LOCAL
    return stamp(
        {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [owner_reference(deployment)],
            },
            "spec": isvc_spec,
        }
    )


def build_shadow_service(
    deployment: dict[str, Any], spec: ModelDeploymentSpec, candidate: tuple[str, str], *, cluster_local: bool = False
) -> dict[str, Any]:
    """The shadow InferenceService: `candidate` (version, storage URI) alone, under the model name
    `<name>-shadow`, receiving only what the stable predictor mirrors (see the module docstring);
    `cluster_local`: KServe exposes it on no gateway (it takes no traffic of its own)."""
    meta = deployment["metadata"]
    name = shadow_service_name(meta["name"])
    mode = spec.rollout.mode or DEFAULT_KSERVE_MODE
    scaling, class_annotations = _autoscaling(spec)
    labels = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_DEPLOYMENT: meta["name"]}
    if cluster_local:
        labels[KSERVE_VISIBILITY] = CLUSTER_LOCAL
    return stamp(
        {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": {KSERVE_DEPLOYMENT_MODE: mode, **class_annotations,
                                ANNOTATION_STABLE_VERSION: candidate[0], ANNOTATION_SHADOW_OF: meta["name"]},
                "ownerReferences": [owner_reference(deployment)],
            },
            "spec": _isvc_spec(deployment, spec, scaling, candidate, None, 0, model_name=name),
        }
    )


ANNOTATION_EXPERIMENT = "conveyor.dev/experiment-versions"


def build_experiment_service(
    deployment: dict[str, Any],
    spec: ModelDeploymentSpec,
    versions: list[tuple[str, str, int]],
    cluster_local: bool = False,
) -> dict[str, Any]:
    """An A/B/N split (strategy abn): `versions` (version, storage URI, weight) at fixed weights.

    Standard: the first version is the predictor, every other one a `spec.canary[]` entry with its
    `trafficPercent` (the predictor keeps the rest). Knative: two versions only (validate.py), as KServe's
    canary: the second as the latest revision at `canaryTrafficPercent`, the first as the previous one."""
    (v0, u0, _), (v1, u1, w1) = versions[0], versions[1]
    isvc = build_inference_service(
        deployment, spec, stable=(v0, u0), candidate=(v1, u1), weight=w1, cluster_local=cluster_local
    )
    isvc["metadata"]["annotations"][ANNOTATION_EXPERIMENT] = ",".join(f"{v}:{w}" for v, _, w in versions)
    if (spec.rollout.mode or DEFAULT_KSERVE_MODE) != "Knative":
        for version, uri, weight in versions[2:]:
            isvc["spec"]["canary"].append({
                "predictor": predictor_with_settings(
                    {"name": predictor_name(version), "minReplicas": canary_replicas(spec, weight),
                     "containers": [_predictor_container(deployment, spec, uri, version)]},
                    spec.predictor.pod),
                "trafficPercent": weight,
            })
    return stamp(isvc)
