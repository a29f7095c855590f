"""Pure builders: spec in, child manifest out (RayJob, run ConfigMap, InferenceService)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from conveyor.operator.controller import children
from conveyor.operator.controller.validation import InvalidSpecError
from conveyor.operator.mlpipeline import build as builders
from conveyor.operator.mlpipeline.build import build_rayjob, build_run_configmap
from conveyor.operator.mlpipeline.validate import validate_pipeline
from conveyor.operator.modeldeployment.build import build_inference_service
from conveyor.operator.modeldeployment.validate import validate_deployment
from conveyor.runtime.spec import MLPipelineSpec, ModelDeploymentSpec, RunConfig

# The pinned third-party CRDs, where hack/local-cluster.sh caches them or in the Go module cache.
_CRD_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "conveyor" / "crds-kuberay-v1.6.0-kserve-v0.20.0"
_GOMOD = Path(os.environ.get("GOMODCACHE", Path.home() / "go" / "pkg" / "mod")) / "github.com"
KSERVE_CRD = (
    _CRD_CACHE / "serving.kserve.io_inferenceservices.yaml",
    _GOMOD / "kserve/kserve@v0.20.0/config/crd/full/serving.kserve.io_inferenceservices.yaml",
)
RAYJOB_CRD = (
    _CRD_CACHE / "ray.io_rayjobs.yaml",
    _GOMOD / "ray-project/kuberay/ray-operator@v1.6.0/config/crd/bases/ray.io_rayjobs.yaml",
)


@functools.cache
def crd_schema(candidates: tuple[Path, ...], version: str) -> dict[str, Any]:
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        pytest.skip(f"pinned CRD not downloaded yet (hack/local-cluster.sh up fetches it): {candidates[0].name}")
    with open(path) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


def pipeline_obj(name: str = "fraud", **spec: Any) -> dict[str, Any]:
    base = {
        "data": {"source": {"uri": "builtin://fraud", "format": "builtin"}},
        "registry": {"uri": "file:///tmp/registry", "modelName": "fraud"},
    }
    base.update(spec)
    return {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "MLPipeline",
        "metadata": {"name": name, "namespace": "ml", "uid": "uid-p", "generation": 1},
        "spec": base,
    }


def deployment_obj(name: str = "fraud", **spec: Any) -> dict[str, Any]:
    base = {"model": {"registryUri": "file:///tmp/registry", "name": "fraud"}}
    base.update(spec)
    return {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "ml", "uid": "uid-d", "generation": 1},
        "spec": base,
    }


def rayjob_for(obj: dict[str, Any], run: int = 3) -> dict[str, Any]:
    """Validate, then build: what the reconciler does."""
    spec = MLPipelineSpec.model_validate(obj["spec"])
    validate_pipeline(obj, spec, run)
    return build_rayjob(obj, spec, run)


def isvc_for(obj: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """Validate, then build: what the reconciler does."""
    spec = ModelDeploymentSpec.model_validate(obj["spec"])
    validate_deployment(spec)
    return build_inference_service(obj, spec, **kw)


V1 = ("v1", "file:///tmp/registry/fraud/v1")
V2 = ("v2", "file:///tmp/registry/fraud/v2")


# ---------------------------------------------------------------- RayJob


def test_rayjob_identity_owner_and_labels() -> None:
    rj = rayjob_for(pipeline_obj(), run=3)
    meta = rj["metadata"]
    assert (rj["apiVersion"], rj["kind"]) == ("ray.io/v1", "RayJob")
    assert meta["name"] == "fraud-3" and meta["namespace"] == "ml"
    assert meta["labels"][builders.LABEL_PIPELINE] == "fraud" and meta["labels"][builders.LABEL_RUN] == "3"
    [owner] = meta["ownerReferences"]
    assert owner == {
        "apiVersion": "conveyor.dev/v1alpha1",
        "kind": "MLPipeline",
        "name": "fraud",
        "uid": "uid-p",
        "controller": True,
        "blockOwnerDeletion": True,
    }


@pytest.mark.parametrize(
    ("training", "check"),
    [
        pytest.param({}, lambda s: s["backoffLimit"] == 0 and "activeDeadlineSeconds" not in s, id="defaults"),
        pytest.param(
            {"activeDeadlineSeconds": 3600, "backoffLimit": 2, "ttlSecondsAfterFinished": 60},
            lambda s: (s["activeDeadlineSeconds"], s["backoffLimit"], s["ttlSecondsAfterFinished"]) == (3600, 2, 60),
            id="deadline-retries-ttl",
        ),
        pytest.param({}, lambda s: s["shutdownAfterJobFinishes"] is True, id="shutdown-after-finish"),
        pytest.param(
            {"rayVersion": "2.55.1", "image": "repo/rt:1"},
            lambda s: s["rayClusterSpec"]["rayVersion"] == "2.55.1"
            and s["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "repo/rt:1",
            id="ray-version-image",
        ),
        pytest.param(
            {"numWorkers": 3, "useGpu": True},
            lambda s: [(g["groupName"], g["replicas"], g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")) for g in s["rayClusterSpec"]["workerGroupSpecs"]]
            == [("workers", 3, 1)],
            id="num-workers-use-gpu",
        ),
        pytest.param(
            {"numWorkers": 2},
            lambda s: "nvidia.com/gpu" not in s["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"],
            id="cpu-only-no-gpu-limit",
        ),
    ],
)
def test_rayjob_spec_table(training: dict[str, Any], check: Any) -> None:
    rj = rayjob_for(pipeline_obj(training=training))
    assert check(rj["spec"]), json.dumps(rj["spec"], indent=1)


def test_rayjob_gpu_pool_placement() -> None:
    training = {
        "headGroup": {"cpu": "2", "memory": "4Gi"},
        "workerGroups": [
            {
                "name": "gpu",
                "replicas": 2,
                "cpu": "8",
                "memory": "32Gi",
                "gpus": 4,
                "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
            {"name": "cpu", "replicas": 1},
        ],
    }
    spec = rayjob_for(pipeline_obj(training=training))["spec"]["rayClusterSpec"]
    gpu, cpu = spec["workerGroupSpecs"]
    pod = gpu["template"]["spec"]
    assert (gpu["groupName"], gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == ("gpu", 2, 2, 2)
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi"},
        "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 4},
    }
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nodeSelector" not in cpu["template"]["spec"] and "tolerations" not in cpu["template"]["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert head == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}


def test_rayjob_entrypoint_reads_the_mounted_run_config() -> None:
    rj = rayjob_for(pipeline_obj(), run=7)
    assert rj["spec"]["entrypoint"] == "python -m conveyor.runtime.train --config /etc/conveyor/run.json --exit-zero-when-reported"
    cluster = rj["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert pod["volumes"] == [{"name": "run-config", "configMap": {"name": "fraud-7-config"}}]
        assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/etc/conveyor"


@pytest.mark.parametrize(("queue", "expect_label"), [(None, False), ("team-a", True)])
def test_rayjob_kueue_queue_label_and_suspend_left_to_kueue(queue: str | None, expect_label: bool) -> None:
    training = {"queue": queue} if queue else {}
    rj = rayjob_for(pipeline_obj(training=training))
    assert (builders.LABEL_KUEUE_QUEUE in rj["metadata"]["labels"]) is expect_label
    if expect_label:
        assert rj["metadata"]["labels"][builders.LABEL_KUEUE_QUEUE] == "team-a"
    assert "suspend" not in rj["spec"]  # Kueue owns it


@pytest.mark.parametrize(
    ("name", "training", "field"),
    [
        ("p" * 41, {}, "metadata.name"),
        ("fraud", {"workerGroups": [{"name": "a"}, {"name": "a"}]}, "spec.training.workerGroups[1].name"),
    ],
)
def test_rayjob_invalid_specs_name_the_field(name: str, training: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpecError) as e:
        rayjob_for(pipeline_obj(name, training=training))
    assert e.value.field == field


def test_run_configmap_holds_runconfig_owned_by_rayjob() -> None:
    obj = pipeline_obj(evaluation={"metric": "f1Macro", "threshold": 0.8})
    spec = MLPipelineSpec.model_validate(obj["spec"])
    rj = build_rayjob(obj, spec, 4)
    rj["metadata"]["uid"] = "uid-rj"
    cm = build_run_configmap(obj, spec, 4, rj)
    assert cm["metadata"]["name"] == "fraud-4-config"
    [owner] = cm["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("RayJob", "fraud-4", "uid-rj", False)
    config = RunConfig.model_validate_json(cm["data"]["run.json"])
    assert (config.pipeline, config.namespace, config.run) == ("fraud", "ml", 4)
    assert config.evaluation.metric == "f1Macro" and config.registry.model_name == "fraud"
    assert config.deployed is None


@pytest.mark.parametrize("must_beat", [True, False])
def test_run_config_names_the_deployed_package_only_for_must_beat_deployed(must_beat: bool) -> None:
    from conveyor.runtime.spec import DeployedModel

    obj = pipeline_obj(evaluation={"metric": "accuracy", "threshold": 0.8, "mustBeatDeployed": must_beat})
    spec = MLPipelineSpec.model_validate(obj["spec"])
    serving = DeployedModel(version="v3", package_uri="s3://models/fraud/v3")
    rj = build_rayjob(obj, spec, 4)
    rj["metadata"]["uid"] = "uid-rj"
    cm = build_run_configmap(obj, spec, 4, rj, serving)
    raw = json.loads(cm["data"]["run.json"])
    if must_beat:
        assert raw["deployed"] == {"version": "v3", "packageUri": "s3://models/fraud/v3"}
    else:
        assert "deployed" not in raw


def test_rayjob_fits_the_pinned_kuberay_schema() -> None:
    """Every field we emit exists in KubeRay v1.6.0's RayJob schema (a typo would be pruned silently)."""
    schema = crd_schema(RAYJOB_CRD, "v1")
    rj = rayjob_for(pipeline_obj(training={"workerGroups": [{"name": "g", "gpus": 1, "tolerations": [{"key": "k", "operator": "Exists"}]}]}))
    _assert_fits(rj["spec"], schema["properties"]["spec"], "spec")


# ---------------------------------------------------------------- InferenceService


def test_isvc_identity_owner_and_predictor() -> None:
    isvc = isvc_for(deployment_obj(predictor={"image": "repo/rt:2", "protocol": "v1", "batching": {"maxBatchSize": 64}}), stable=V1)
    assert (isvc["apiVersion"], isvc["kind"], isvc["metadata"]["name"]) == (
        "serving.kserve.io/v1beta1",
        "InferenceService",
        "fraud",
    )
    assert isvc["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    [container] = isvc["spec"]["predictor"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["name"] == "kserve-container" and container["image"] == "repo/rt:2"
    assert env["STORAGE_URI"] == "file:///tmp/registry/fraud/v1"
    assert env["CONVEYOR_PROTOCOL"] == "v1"
    assert container["command"][-1] == "conveyor.runtime.serve"
    args = container["args"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags == {
        "--model-dir": "/mnt/models",
        "--name": "fraud",
        "--http-port": "8080",
        "--max-batch-size": "64",
        "--max-latency-ms": "5",
        "--drift-method": "psi",
        "--workers": "1",  # no CPU limit: one process
    }
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    # The predictor's own parser accepts exactly these flags.
    from conveyor.runtime.serve import build_parser

    parsed = build_parser().parse_args(args)
    assert (parsed.model_dir, parsed.max_batch_size) == ("/mnt/models", 64)


@pytest.mark.parametrize(
    ("predictor", "workers"),
    [
        ({}, "1"),
        ({"resources": {"limits": {"cpu": "4"}}}, "4"),
        ({"resources": {"limits": {"cpu": "1500m"}}}, "1"),
        ({"resources": {"limits": {"cpu": "2.5"}}}, "2"),
        ({"resources": {"limits": {"cpu": "3e3m"}}}, "3"),
        ({"resources": {"limits": {"cpu": "1k"}}}, "16"),  # any quantity the CRD admits; capped
        ({"resources": {"requests": {"cpu": "2"}}}, "2"),
        ({"workers": 3, "resources": {"limits": {"cpu": "8"}}}, "3"),
    ],
)
def test_predictor_workers_default_from_the_cpu_limit(predictor: dict, workers: str) -> None:
    [container] = isvc_for(deployment_obj(predictor=predictor), stable=V1)["spec"]["predictor"]["containers"]
    args = container["args"]
    assert args[args.index("--workers") + 1] == workers


def test_predictor_explain_turns_on_the_explain_route_with_its_bounds() -> None:
    from conveyor.runtime.serve import build_parser

    explain = {"enabled": True, "maxInstances": 4, "steps": 16}
    [container] = isvc_for(deployment_obj(predictor={"explain": explain}), stable=V1)["spec"]["predictor"]["containers"]
    parsed = build_parser().parse_args(container["args"])
    assert (parsed.explain, parsed.explain_max_instances, parsed.explain_steps) == (True, 4, 16)
    [off] = isvc_for(deployment_obj(), stable=V1)["spec"]["predictor"]["containers"]
    assert build_parser().parse_args(off["args"]).explain is False


def test_grpc_v2_exposes_the_grpc_port_named_h2c() -> None:
    [container] = isvc_for(deployment_obj(predictor={"protocol": "grpc-v2"}), stable=V1)["spec"]["predictor"]["containers"]
    assert container["ports"] == [{"name": "h2c", "containerPort": 8081, "protocol": "TCP"}]
    args = container["args"]
    assert args[args.index("--grpc-port") + 1] == "8081"
    from conveyor.runtime.serve import build_parser

    assert build_parser().parse_args(args).grpc_port == 8081


@pytest.mark.parametrize(
    ("spec", "annotations", "scaling"),
    [
        pytest.param(
            {},
            {"serving.kserve.io/deploymentMode": "Knative", "autoscaling.knative.dev/class": "kpa.autoscaling.knative.dev"},
            {"minReplicas": 1, "maxReplicas": 3, "scaleMetric": "concurrency", "scaleTarget": 10},
            id="knative-defaults",
        ),
        pytest.param(
            {"autoscaling": {"minReplicas": 0, "maxReplicas": 5, "metric": "rps", "target": 50}},
            {"serving.kserve.io/deploymentMode": "Knative", "autoscaling.knative.dev/class": "kpa.autoscaling.knative.dev"},
            {"minReplicas": 0, "maxReplicas": 5, "scaleMetric": "rps", "scaleTarget": 50},
            id="knative-scale-to-zero-rps",
        ),
        pytest.param(
            {"rollout": {"mode": "Standard"}, "autoscaling": {"minReplicas": 2, "maxReplicas": 4, "metric": "cpu", "target": 70}},
            {"serving.kserve.io/deploymentMode": "Standard", "serving.kserve.io/autoscalerClass": "hpa"},
            {"minReplicas": 2, "maxReplicas": 4, "scaleMetric": "cpu", "scaleTarget": 70},
            id="standard-hpa-cpu",
        ),
    ],
)
def test_isvc_mode_and_autoscaling(spec: dict[str, Any], annotations: dict[str, str], scaling: dict[str, Any]) -> None:
    isvc = isvc_for(deployment_obj(**spec), stable=V1)
    for k, v in annotations.items():
        assert isvc["metadata"]["annotations"][k] == v
    predictor = isvc["spec"]["predictor"]
    assert {k: predictor[k] for k in scaling} == scaling


def test_isvc_resources_gpus_and_placement() -> None:
    isvc = isvc_for(
        deployment_obj(
            predictor={
                "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
                "gpus": 1,
                "nodeSelector": {"pool": "gpu"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            }
        ),
        stable=V1,
    )
    predictor = isvc["spec"]["predictor"]
    assert predictor["containers"][0]["resources"] == {
        "requests": {"cpu": "1", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": "2Gi", "nvidia.com/gpu": 1},
    }
    assert predictor["nodeSelector"] == {"pool": "gpu"}
    assert predictor["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]


@pytest.mark.parametrize(
    ("candidate", "weight", "uri", "canary_percent"),
    [
        (None, 0, V1[1], None),
        (V2, 10, V2[1], 10),
        (V2, 50, V2[1], 50),
        (V1, 30, V1[1], None),  # a candidate equal to stable is no canary
    ],
)
def test_isvc_canary_knative(candidate: tuple[str, str] | None, weight: int, uri: str, canary_percent: int | None) -> None:
    isvc = isvc_for(deployment_obj(), stable=V1, candidate=candidate, weight=weight)
    predictor = isvc["spec"]["predictor"]
    env = {e["name"]: e["value"] for e in predictor["containers"][0]["env"]}
    assert env["STORAGE_URI"] == uri
    assert predictor.get("canaryTrafficPercent") == canary_percent
    assert "canary" not in isvc["spec"] and "name" not in predictor


@pytest.mark.parametrize(("candidate", "weight"), [(None, 0), (V2, 10), (V2, 0)])
def test_isvc_canary_standard(candidate: tuple[str, str] | None, weight: int) -> None:
    obj = deployment_obj(rollout={"mode": "Standard"}, autoscaling={"metric": "cpu", "target": 80})
    isvc = isvc_for(obj, stable=V1, candidate=candidate, weight=weight)
    predictor = isvc["spec"]["predictor"]
    assert predictor["name"] == "v1"
    assert {e["name"]: e["value"] for e in predictor["containers"][0]["env"]}["STORAGE_URI"] == V1[1]
    assert "canaryTrafficPercent" not in predictor
    if candidate is None:
        assert "canary" not in isvc["spec"]
        return
    [canary] = isvc["spec"]["canary"]
    assert canary["trafficPercent"] == weight
    assert canary["predictor"]["name"] == "v2"
    # KServe v0.20.0 refuses autoscaling fields on a canary but minReplicas, at most the stable one's:
    # the canary runs its share of the deployment's minimum (never 0), as KServe's controller would.
    assert not {"maxReplicas", "scaleMetric", "scaleTarget", "autoScaling"} & canary["predictor"].keys()
    assert 1 <= canary["predictor"]["minReplicas"] <= predictor["minReplicas"]
    assert {e["name"]: e["value"] for e in canary["predictor"]["containers"][0]["env"]}["STORAGE_URI"] == V2[1]


@pytest.mark.parametrize(("weight", "replicas"), [(10, 1), (25, 1), (50, 2), (100, 4)])
def test_isvc_standard_canary_takes_its_share_of_the_minimum(weight: int, replicas: int) -> None:
    obj = deployment_obj(rollout={"mode": "Standard"}, autoscaling={"metric": "cpu", "target": 80, "minReplicas": 4, "maxReplicas": 8})
    isvc = isvc_for(obj, stable=V1, candidate=V2, weight=weight)
    assert isvc["spec"]["canary"][0]["predictor"]["minReplicas"] == replicas
    assert (isvc["spec"]["predictor"]["minReplicas"], isvc["spec"]["predictor"]["maxReplicas"]) == (4, 8)


def test_isvc_standard_promotion_renames_the_stable_predictor() -> None:
    """KServe: promote by setting predictor.name to the canary's and dropping the canary entry."""
    obj = deployment_obj(rollout={"mode": "Standard"}, autoscaling={"metric": "cpu", "target": 80})
    promoted = isvc_for(obj, stable=V2)
    assert promoted["spec"]["predictor"]["name"] == "v2" and "canary" not in promoted["spec"]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"rollout": {"mode": "Standard"}}, "spec.autoscaling.metric"),  # concurrency: not HPA's
        ({"rollout": {"mode": "Standard"}, "autoscaling": {"metric": "cpu", "minReplicas": 0}}, "spec.autoscaling.minReplicas"),
        ({"autoscaling": {"minReplicas": 4, "maxReplicas": 2}}, "spec.autoscaling.minReplicas"),
    ],
)
def test_isvc_invalid_specs_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpecError) as e:
        isvc_for(deployment_obj(**spec), stable=V1)
    assert e.value.field == field


def test_applied_hash_changes_with_content_only() -> None:
    a = isvc_for(deployment_obj(), stable=V1)
    b = isvc_for(deployment_obj(), stable=V1)
    c = isvc_for(deployment_obj(), stable=V1, candidate=V2, weight=10)
    h = children.ANNOTATION_APPLIED_HASH
    assert a["metadata"]["annotations"][h] == b["metadata"]["annotations"][h]
    assert a["metadata"]["annotations"][h] != c["metadata"]["annotations"][h]


@pytest.mark.parametrize("mode", ["Knative", "Standard"])
def test_isvc_fits_the_pinned_kserve_schema(mode: str) -> None:
    schema = crd_schema(KSERVE_CRD, "v1beta1")
    extra = {"autoscaling": {"metric": "cpu", "target": 80}} if mode == "Standard" else {}
    obj = deployment_obj(rollout={"mode": mode}, predictor={"gpus": 1, "tolerations": [{"key": "a", "operator": "Exists"}]}, **extra)
    isvc = isvc_for(obj, stable=V1, candidate=V2, weight=20)
    _assert_fits(isvc["spec"], schema["properties"]["spec"], "spec")


def _assert_fits(value: Any, schema: dict[str, Any], path: str) -> None:
    if "properties" in schema and isinstance(value, dict):
        for k, v in value.items():
            assert k in schema["properties"] or "additionalProperties" in schema, f"{path}.{k} is not in the schema"
            _assert_fits(v, schema["properties"].get(k, schema.get("additionalProperties") or {}), f"{path}.{k}")
    elif schema.get("type") == "array" and isinstance(value, list):
        for i, item in enumerate(value):
            _assert_fits(item, schema.get("items") or {}, f"{path}[{i}]")


def test_rayjob_records_what_the_run_was_started_from() -> None:
    obj = pipeline_obj()
    obj["metadata"]["annotations"] = {"conveyor.dev/rerun": "tok"}
    annotations = build_rayjob(obj, MLPipelineSpec.model_validate(obj["spec"]), 2, "Rerun")["metadata"]["annotations"]
    assert annotations[builders.ANNOTATION_SPEC_HASH] == builders.spec_hash(obj["spec"])
    assert (annotations[builders.ANNOTATION_TRIGGER], annotations[builders.ANNOTATION_RERUN]) == ("Rerun", "tok")
    assert annotations[builders.ANNOTATION_SPEC_GENERATION] == "1"


# ---------------------------------------------------------------- pod settings (both kinds)

POD = {
    "serviceAccountName": "trainer",
    "env": [{"name": "LOG_LEVEL", "value": "debug"}, {"name": "STORAGE_URI", "value": "s3://not/ours"}],
    "envFrom": [{"secretRef": {"name": "registry-credentials"}}],
    "imagePullSecrets": [{"name": "ghcr"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}},
    "priorityClassName": "training-high",
    "labels": {"team": "fraud"},
    "annotations": {"example.com/cost-center": "42"},
    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
    "containerSecurityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
}


def _ray_templates(rj: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rj["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def test_rayjob_pods_carry_the_pod_settings() -> None:
    rj = rayjob_for(pipeline_obj(training={"pod": POD, "workerGroups": [{"name": "gpu", "gpus": 1}]}))
    for template in _ray_templates(rj):
        pod, container = template["spec"], template["spec"]["containers"][0]
        assert pod["serviceAccountName"] == "trainer" and pod["priorityClassName"] == "training-high"
        assert pod["imagePullSecrets"] == [{"name": "ghcr"}] and pod["affinity"] == POD["affinity"]
        assert pod["securityContext"]["runAsUser"] == 1000
        assert template["metadata"] == {"labels": {"team": "fraud"}, "annotations": {"example.com/cost-center": "42"}}
        assert container["envFrom"] == [{"secretRef": {"name": "registry-credentials"}}]
        assert {"name": "LOG_LEVEL", "value": "debug"} in container["env"]
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert container["volumeMounts"][0]["name"] == "run-config"  # our own fields stay


def test_a_ray_group_lays_its_pod_settings_over_the_trainings() -> None:
    training = {
        "pod": {"serviceAccountName": "trainer", "labels": {"team": "fraud", "tier": "cpu"},
                "env": [{"name": "A", "value": "1"}], "envFrom": [{"secretRef": {"name": "s3"}}]},
        "headGroup": {"pod": {"priorityClassName": "head"}},
        "workerGroups": [{"name": "gpu", "gpus": 1, "pod": {
            "serviceAccountName": "gpu-trainer", "labels": {"tier": "gpu"}, "env": [{"name": "A", "value": "2"}],
            "envFrom": [{"configMapRef": {"name": "nccl"}}]}}],
    }
    head, worker = _ray_templates(rayjob_for(pipeline_obj(training=training)))
    assert (head["spec"]["serviceAccountName"], head["spec"]["priorityClassName"]) == ("trainer", "head")
    assert head["metadata"]["labels"] == {"team": "fraud", "tier": "cpu"}
    assert worker["spec"]["serviceAccountName"] == "gpu-trainer" and "priorityClassName" not in worker["spec"]
    assert worker["metadata"]["labels"] == {"team": "fraud", "tier": "gpu"}
    assert worker["spec"]["containers"][0]["env"] == [{"name": "A", "value": "2"}]
    assert worker["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3"}}, {"configMapRef": {"name": "nccl"}}]


def test_no_pod_settings_leave_the_pods_as_before() -> None:
    for template in _ray_templates(rayjob_for(pipeline_obj())):
        assert set(template) == {"spec"} and "serviceAccountName" not in template["spec"]
        assert "envFrom" not in template["spec"]["containers"][0]


RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                        "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def test_pods_without_a_security_context_meet_the_restricted_pod_security_standard() -> None:
    """Head, workers, KubeRay's submitter and both predictors: admitted where the namespace enforces
    `restricted` (checked against the real apiserver's PodSecurity admission in tests/placement)."""
    rj = rayjob_for(pipeline_obj(training={"workerGroups": [{"name": "gpu", "gpus": 1}]}))
    templates = [*_ray_templates(rj), rj["spec"]["submitterPodTemplate"]]
    obj = deployment_obj(rollout={"mode": "Standard"}, autoscaling={"minReplicas": 1, "metric": "cpu", "target": 80})
    isvc = isvc_for(obj, stable=V1, candidate=V2, weight=20)
    predictors = [isvc["spec"]["predictor"], *(c["predictor"] for c in isvc["spec"]["canary"])]
    for pod in [t["spec"] for t in templates] + predictors:
        assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        assert pod["containers"][0]["securityContext"] == RESTRICTED_CONTAINER
    assert rj["spec"]["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_a_users_security_context_replaces_the_restricted_default() -> None:
    rj = rayjob_for(pipeline_obj(training={"pod": {"securityContext": {"runAsUser": 0},
                                                   "containerSecurityContext": {"privileged": True}}}))
    for template in [*_ray_templates(rj), rj["spec"]["submitterPodTemplate"]]:
        assert template["spec"]["securityContext"] == {"runAsUser": 0}
        assert template["spec"]["containers"][0]["securityContext"] == {"privileged": True}


@pytest.mark.parametrize("mode", ["Knative", "Standard"])
def test_isvc_predictors_carry_the_pod_settings(mode: str) -> None:
    extra = {"autoscaling": {"minReplicas": 1, "metric": "cpu", "target": 80}} if mode == "Standard" else {}
    obj = deployment_obj(rollout={"mode": mode}, predictor={"pod": {**POD, "serviceAccountName": "kserve-s3"}}, **extra)
    isvc = isvc_for(obj, stable=V1, candidate=V2, weight=20)
    predictors = [isvc["spec"]["predictor"]] + [c["predictor"] for c in isvc["spec"].get("canary", [])]
    assert len(predictors) == (2 if mode == "Standard" else 1)
    for p in predictors:
        assert p["serviceAccountName"] == "kserve-s3" and p["priorityClassName"] == "training-high"
        assert p["labels"] == {"team": "fraud"} and p["annotations"] == {"example.com/cost-center": "42"}
        assert p["imagePullSecrets"] == [{"name": "ghcr"}] and p["securityContext"]["fsGroup"] == 1000
        container = p["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "registry-credentials"}}]
        env = {e["name"]: e["value"] for e in container["env"]}
        # The storage URI stays the operator's: a user's variable of the same name cannot redirect the model.
        assert env["LOG_LEVEL"] == "debug" and env["STORAGE_URI"].startswith("file:///tmp/registry/fraud/v")


def test_pod_settings_fit_the_pinned_kuberay_and_kserve_schemas() -> None:
    """Each setting lands where KubeRay v1.6.0 and KServe v0.20.0 read it (a misplaced one would be pruned)."""
    rj = rayjob_for(pipeline_obj(training={"pod": POD, "workerGroups": [{"name": "g", "gpus": 1, "pod": POD}]}))
    _assert_fits(rj["spec"], crd_schema(RAYJOB_CRD, "v1")["properties"]["spec"], "spec")
    for mode, extra in (("Knative", {}), ("Standard", {"autoscaling": {"minReplicas": 1, "metric": "cpu", "target": 80}})):
        obj = deployment_obj(rollout={"mode": mode}, predictor={"pod": POD}, **extra)
        isvc = isvc_for(obj, stable=V1, candidate=V2, weight=20)
        _assert_fits(isvc["spec"], crd_schema(KSERVE_CRD, "v1beta1")["properties"]["spec"], "spec")
