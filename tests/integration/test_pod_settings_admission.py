"""Pod settings (spec.training.pod, a Ray group's pod, spec.predictor.pod) as the real apiserver admits
them: a full set is stored as written, a bad one is refused naming the field, and `kubectl explain`
documents them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
FULL = {
    "serviceAccountName": "trainer",
    "env": [{"name": "LOG_LEVEL", "value": "debug"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tokens", "key": "token", "optional": True}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
    "envFrom": [{"secretRef": {"name": "registry-credentials"}}, {"configMapRef": {"name": "settings"}, "prefix": "APP_"}],
    "imagePullSecrets": [{"name": "ghcr"}],
    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 50, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}},
    "priorityClassName": "high",
    "labels": {"team": "fraud"},
    "annotations": {"example.com/owner": "ml-platform"},
    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
    "containerSecurityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                 "capabilities": {"drop": ["ALL"]}},
}


def _sample(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "manifests" / "samples" / name).read_text())


def _apply(kubectl, namespace: str, obj: dict[str, Any]):
    return kubectl("apply", "--server-side", "--field-manager=test", "-n", namespace, "-f", "-",
                   input=json.dumps(obj), check=False)


def test_full_pod_settings_are_stored_as_written(kubectl, namespace) -> None:
    pipeline = _sample("mlpipeline-digits.yaml")
    pipeline["spec"]["training"]["pod"] = FULL
    pipeline["spec"]["training"]["headGroup"] = {"pod": {"priorityClassName": "head"}}
    deployment = _sample("modeldeployment-digits.yaml")
    deployment["spec"]["predictor"]["pod"] = FULL
    for obj, path in ((pipeline, ("training", "pod")), (deployment, ("predictor", "pod"))):
        proc = _apply(kubectl, namespace, obj)
        assert proc.returncode == 0, proc.stderr
        stored = json.loads(kubectl("get", obj["kind"].lower(), obj["metadata"]["name"], "-n", namespace, "-o", "json").stdout)
        assert stored["spec"][path[0]][path[1]] == FULL


def _set(path: str, value: Any):
    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = obj
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[last] = value
    return mutate


PIPELINE, DEPLOYMENT = "mlpipeline-digits.yaml", "modeldeployment-digits.yaml"
INVALID = [
    ("envfrom-both-refs", PIPELINE,
     _set("spec.training.pod", {"envFrom": [{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]}),
     "spec.training.pod.envFrom[0]", "exactly one of secretRef or configMapRef"),
    ("env-value-and-valuefrom", DEPLOYMENT,
     _set("spec.predictor.pod", {"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}),
     "spec.predictor.pod.env[0]", "not both"),
    ("env-repeated", PIPELINE,
     _set("spec.training.pod", {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}),
     "spec.training.pod.env", 'duplicate entries for key [name="A"]'),
    ("valuefrom-two-sources", DEPLOYMENT,
     _set("spec.predictor.pod", {"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"},
                                                                     "fieldRef": {"fieldPath": "metadata.name"}}}]}),
     "spec.predictor.pod.env[0].valueFrom", "exactly one of secretKeyRef, configMapKeyRef, fieldRef"),
    ("service-account-not-a-name", PIPELINE, _set("spec.training.pod", {"serviceAccountName": "Trainer_SA"}),
     "spec.training.pod.serviceAccountName", "should match"),
    ("our-label-prefix", DEPLOYMENT, _set("spec.predictor.pod", {"labels": {"conveyor.dev/run": "1"}}),
     "spec.predictor.pod.labels", "not under conveyor.dev/"),
    ("seccomp-localhost-without-profile", PIPELINE,
     _set("spec.training.workerGroups", [{"name": "w", "pod": {"securityContext": {"seccompProfile": {"type": "Localhost"}}}}]),
     "spec.training.workerGroups[0].pod.securityContext.seccompProfile", "localhostProfile is set exactly when type is Localhost"),
    ("negative-uid", DEPLOYMENT, _set("spec.predictor.pod", {"containerSecurityContext": {"runAsUser": -1}}),
     "spec.predictor.pod.containerSecurityContext.runAsUser", "greater than or equal to 0"),
]


@pytest.mark.parametrize(("sample", "mutate", "field", "words"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_bad_pod_settings_are_refused_naming_the_field(kubectl, namespace, sample, mutate, field, words) -> None:
    obj = copy.deepcopy(_sample(sample))
    mutate(obj)
    proc = _apply(kubectl, namespace, obj)
    assert proc.returncode != 0, f"accepted: {json.dumps(obj['spec'])}"
    assert field in proc.stderr and words in proc.stderr, proc.stderr


def test_explain_documents_the_pod_settings(kubectl) -> None:
    out = kubectl("explain", "mlpipeline.spec.training.pod").stdout
    assert "serviceAccountName" in out and "envFrom" in out and "laid over" in out
    out = kubectl("explain", "modeldeployment.spec.predictor.pod.envFrom").stdout
    assert "AWS_ACCESS_KEY_ID" in out
