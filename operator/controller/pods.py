"""Pod settings (`spec.training.pod`, a Ray group's `pod`, `spec.predictor.pod`) on the pods we ask for.

One place for both kinds, so a RayJob's pod templates and an InferenceService's predictors carry the
same settings the same way. KubeRay (v1.6.0) reads them from a pod template (`template.metadata` and
`template.spec`); KServe (v0.20.0) from the predictor itself, whose spec inlines a PodSpec and adds
`labels` and `annotations`. The main container gets `env`, `envFrom` and its `securityContext`.
"""

from __future__ import annotations

import copy
from typing import Any

from conveyor.runtime.spec import PodSettings

# The restricted Pod Security Standard's demands, as defaults for pods whose settings set no security
# context: a namespace enforcing `pod-security.kubernetes.io/enforce: restricted` forbids any pod without
# them (and KubeRay's or KServe's controller then retries for ever, the run never starting). A user's
# own securityContext replaces ours whole: theirs is the policy their cluster asks for. The images run
# as a numeric non-root user (docker/runtime.Dockerfile), so runAsNonRoot holds without a runAsUser.
RESTRICTED_POD_SECURITY: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def pod_fields(settings: PodSettings) -> dict[str, Any]:
    """The PodSpec fields the settings set (none of them when unset, so defaults stay the cluster's),
    but for the security context: the restricted standard's when the settings have none."""
    fields: dict[str, Any] = {}
    if settings.service_account_name:
        fields["serviceAccountName"] = settings.service_account_name
    if settings.image_pull_secrets:
        fields["imagePullSecrets"] = [dict(s) for s in settings.image_pull_secrets]
    if settings.affinity:
        fields["affinity"] = settings.affinity
    if settings.priority_class_name:
        fields["priorityClassName"] = settings.priority_class_name
    fields["securityContext"] = settings.security_context or copy.deepcopy(RESTRICTED_POD_SECURITY)
    return fields


def pod_metadata(settings: PodSettings) -> dict[str, Any]:
    """The pods' extra labels and annotations (the CRD keeps conveyor.dev/ keys ours)."""
    meta: dict[str, Any] = {}
    if settings.labels:
        meta["labels"] = dict(settings.labels)
    if settings.annotations:
        meta["annotations"] = dict(settings.annotations)
    return meta


def with_container_settings(container: dict[str, Any], settings: PodSettings) -> dict[str, Any]:
    """The main container with the settings' env, envFrom and securityContext. The operator's own
    variables (the model's URI and version, ...) win over a user's of the same name: the pod would
    not work without them."""
    ours = container.get("env") or []
    taken = {e["name"] for e in ours}
    env = [dict(e) for e in settings.env if e["name"] not in taken] + ours
    out = dict(container)
    if env:
        out["env"] = env
    if settings.env_from:
        out["envFrom"] = [dict(e) for e in settings.env_from]
    out["securityContext"] = settings.container_security_context or copy.deepcopy(RESTRICTED_CONTAINER_SECURITY)
    return out


def pod_template(settings: PodSettings, spec: dict[str, Any]) -> dict[str, Any]:
    """A pod template (KubeRay's `template`): `spec` with the settings' PodSpec fields and its first
    container's, and the settings' labels and annotations as the template's metadata."""
    containers = spec.get("containers") or []
    pod = {**spec, **pod_fields(settings)}
    if containers:
        pod["containers"] = [with_container_settings(containers[0], settings), *containers[1:]]
    template: dict[str, Any] = {"spec": pod}
    meta = pod_metadata(settings)
    if meta:
        template["metadata"] = meta
    return template


def predictor_with_settings(predictor: dict[str, Any], settings: PodSettings) -> dict[str, Any]:
    """A KServe predictor (stable or canary) with the settings: PodSpec fields and labels/annotations
    on the predictor, env/envFrom/securityContext on its first container."""
    out = {**predictor, **pod_fields(settings), **pod_metadata(settings)}
    containers = predictor.get("containers") or []
    if containers:
        out["containers"] = [with_container_settings(containers[0], settings), *containers[1:]]
    return out
