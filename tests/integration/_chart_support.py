"""Shared by the chart and manifest tests: the pinned helm and kubectl, rendering the chart, YAML docs.

helm is built from hack/tools/helm by hack/build-tool.sh (cached outside the clone; minutes the first
time, then instant). kubectl is the pinned one the local control plane already built
(hack/local-cluster.sh bin-dir), else hack/build-tool.sh builds the same release.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "conveyor"
MANIFESTS = ROOT / "manifests"
BUILD_TOOL = ROOT / "hack" / "build-tool.sh"
LOCAL_CLUSTER = ROOT / "hack" / "local-cluster.sh"

HEALTH_DIR = MANIFESTS / "argocd" / "health"

Doc = dict[str, Any]


@functools.cache
def tool(name: str) -> str:
    """Path of a pinned tool binary, building it on first use."""
    done = subprocess.run([str(BUILD_TOOL), name], capture_output=True, text=True, timeout=3000)
    if done.returncode != 0:
        raise RuntimeError(f"hack/build-tool.sh {name} failed:\n{done.stderr[-4000:]}")
    return done.stdout.strip().splitlines()[-1]


@functools.cache
def kubectl_binary() -> str:
    if LOCAL_CLUSTER.exists():
        done = subprocess.run([str(LOCAL_CLUSTER), "bin-dir"], capture_output=True, text=True, timeout=60)
        candidate = Path(done.stdout.strip()) / "kubectl"
        if done.returncode == 0 and os.access(candidate, os.X_OK):
            return str(candidate)
    return tool("kubectl")


@functools.cache
def _helm_home() -> str:
    # Helm keeps repositories and plugins under these; a private set keeps tests off the user's own.
    return tempfile.mkdtemp(prefix="conveyor-helm-")


def helm(*args: str, check: bool = True, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    home = _helm_home()
    env = {
        **os.environ,
        "HELM_CACHE_HOME": f"{home}/cache",
        "HELM_CONFIG_HOME": f"{home}/config",
        "HELM_DATA_HOME": f"{home}/data",
    }
    done = subprocess.run([tool("helm"), *args], capture_output=True, text=True, env=env, input=input, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done


def values_file(values: dict[str, Any], directory: Path) -> str:
    path = directory / f"values-{len(list(directory.glob('values-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def template_args(
    values: dict[str, Any] | None = None,
    *,
    release: str = "conveyor",
    namespace: str = "conveyor-system",
    include_crds: bool = False,
) -> list[str]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    if include_crds:
        args.append("--include-crds")
    if values:
        directory = Path(tempfile.mkdtemp(prefix="conveyor-values-"))
        args += ["-f", values_file(values, directory)]
    return args


def render_text(values: dict[str, Any] | None = None, **kwargs: Any) -> str:
    return helm(*template_args(values, **kwargs)).stdout


def render(values: dict[str, Any] | None = None, **kwargs: Any) -> list[Doc]:
    return docs(render_text(values, **kwargs))


def docs(text: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(text) if d]


def of_kind(documents: list[Doc], kind: str) -> list[Doc]:
    return [d for d in documents if d.get("kind") == kind]


def one(documents: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in of_kind(documents, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def kustomize(path: Path) -> list[Doc]:
    done = subprocess.run(
        [kubectl_binary(), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{done.stderr}"
    return docs(done.stdout)


def rules_as_grants(rules: list[Doc]) -> set[tuple[str, str, str]]:
    """RBAC rules flattened to (apiGroup, resource, verb) triples."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


# What the operator does with the API (operator/*/reconcile.py and controller/client.py, plus kopf's own watches),
# as (apiGroup, resource, verb). The chart must grant exactly this: a verb more is a privilege the
# operator never uses, a verb less breaks a reconcile.
OPERATOR_NAMESPACED_GRANTS: set[tuple[str, str, str]] = {
    ("conveyor.dev", "mlpipelines", "get"),
    ("conveyor.dev", "mlpipelines", "list"),
    ("conveyor.dev", "mlpipelines", "watch"),
    ("conveyor.dev", "modeldeployments", "get"),
    ("conveyor.dev", "modeldeployments", "list"),
    ("conveyor.dev", "modeldeployments", "watch"),
    ("conveyor.dev", "mlpipelines/status", "patch"),
    ("conveyor.dev", "modeldeployments/status", "patch"),
    ("conveyor.dev", "mlpipelines/finalizers", "update"),
    ("conveyor.dev", "modeldeployments/finalizers", "update"),
    ("conveyor.dev", "batchpredictions", "get"),
    ("conveyor.dev", "batchpredictions", "list"),
    ("conveyor.dev", "batchpredictions", "watch"),
    ("conveyor.dev", "batchpredictions/status", "patch"),
    ("conveyor.dev", "batchpredictions/finalizers", "update"),
    ("ray.io", "rayjobs", "get"),
    ("ray.io", "rayjobs", "list"),
    ("ray.io", "rayjobs", "watch"),
    ("ray.io", "rayjobs", "create"),
    ("ray.io", "rayjobs", "patch"),
    ("ray.io", "rayjobs", "delete"),
    ("ray.io", "rayclusters", "get"),
    ("kueue.x-k8s.io", "workloads", "list"),
    ("serving.kserve.io", "inferenceservices", "list"),
    ("serving.kserve.io", "inferenceservices", "watch"),
    ("serving.kserve.io", "inferenceservices", "create"),
    ("serving.kserve.io", "inferenceservices", "patch"),
    ("serving.kserve.io", "inferenceservices", "delete"),  # a shadow's own InferenceService, when it ends
    # Standard mode's weighted route (modeldeployment/route.py): listed and watched by label (kopf, where
    # the API serves the Gateway API), server-side applied (create and patch), deleted when off, and
    # KServe's earlier routes deleted.
    ("gateway.networking.k8s.io", "httproutes", "list"),
    ("gateway.networking.k8s.io", "httproutes", "watch"),
    ("gateway.networking.k8s.io", "httproutes", "create"),
    ("gateway.networking.k8s.io", "httproutes", "patch"),
    ("gateway.networking.k8s.io", "httproutes", "delete"),
    ("", "configmaps", "create"),
    ("", "configmaps", "patch"),
    ("", "events", "create"),
    ("", "events", "list"),
}
# kopf notices namespaces and CRDs appearing while it runs (rbac.clusterDiscovery).
DISCOVERY_GRANTS: set[tuple[str, str, str]] = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
}
# Leader election among the replicas: one Lease in the release namespace (leaderElection.enabled).
LEADER_ELECTION_GRANTS: set[tuple[str, str, str]] = {
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "update"),
}


def lua_literal(value: Any) -> str:
    """A Lua table constructor for a JSON-like value (what Argo CD hands a health script as `obj`)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid Lua escapes for this text
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{json.dumps(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot express {type(value).__name__} in Lua")


def lua_health(script: str, obj: Doc, interpreter: str = "lua5.4") -> tuple[str, str]:
    """(status, message) of an Argo CD health script run by a real Lua interpreter on `obj`."""
    program = (
        f"obj = {lua_literal(obj)}\n"
        f"local hs = dofile({json.dumps(str(HEALTH_DIR / script))})\n"
        "io.write(hs.status, '\\n', hs.message or '')\n"
    )
    done = subprocess.run([interpreter, "-"], input=program, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{interpreter} failed on {script}: {done.stderr}"
    status, _, message = done.stdout.partition("\n")
    return status, message
