"""A container's environment as a kubelet would build it: `envFrom` (Secrets, ConfigMaps), then `env`.

Part of the local executor (a development stand-in): the processes it starts in place of pods get the
variables the pod spec names, read from the real apiserver, so credentials reach training and serving
the way they do on a cluster (an s3:// registry's keys from a Secret, never from the test's own
environment). Like the kubelet: `env` wins over `envFrom`; a missing Secret, ConfigMap or key that is
not `optional` is an error (the kubelet's CreateContainerConfigError); only the downward-API fields a
local process can know (`metadata.name`, `metadata.namespace`) are resolved.
"""

from __future__ import annotations

import base64
from typing import Any


class PodEnvError(ValueError):
    """A Secret, ConfigMap or key the container needs is missing (the pod would not start)."""


def _read(core: Any, kind: str, name: str, namespace: str, optional: bool) -> dict[str, str] | None:
    from kubernetes.client.exceptions import ApiException

    try:
        if kind == "Secret":
            obj = core.read_namespaced_secret(name, namespace)
            return {k: base64.b64decode(v).decode() for k, v in (obj.data or {}).items()}
        obj = core.read_namespaced_config_map(name, namespace)
        return dict(obj.data or {})
    except ApiException as e:
        if e.status == 404 and optional:
            return None
        if e.status == 404:
            raise PodEnvError(f"{kind} {namespace}/{name} not found") from e
        raise


def _value_from(core: Any, source: dict[str, Any], namespace: str, pod_name: str) -> str | None:
    for field, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
        ref = source.get(field)
        if ref is None:
            continue
        data = _read(core, kind, ref["name"], namespace, bool(ref.get("optional")))
        if data is None or ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise PodEnvError(f"key {ref['key']} not in {kind} {namespace}/{ref['name']}")
        return data[ref["key"]]
    path = (source.get("fieldRef") or {}).get("fieldPath")
    return {"metadata.namespace": namespace, "metadata.name": pod_name}.get(path or "")


def container_env(core: Any, container: dict[str, Any], namespace: str, pod_name: str = "") -> dict[str, str]:
    """The variables a kubelet would give `container` (a core/v1 Container) in `namespace`."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        for field, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
            ref = source.get(field)
            if ref is not None:
                data = _read(core, kind, ref["name"], namespace, bool(ref.get("optional"))) or {}
                env |= {f"{source.get('prefix', '')}{k}": v for k, v in data.items()}
    for var in container.get("env") or []:
        if "valueFrom" in var:
            value = _value_from(core, var["valueFrom"], namespace, pod_name)
            if value is not None:
                env[var["name"]] = value
        else:
            env[var["name"]] = var.get("value", "")
    return env
