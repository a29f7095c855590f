"""The chart against the real local control plane (kube-apiserver + etcd + kube-controller-manager).

`helm template` output passes a server-side dry-run apply, `helm install` creates everything the
chart declares, and the operator, run as the chart's ServiceAccount (a token the apiserver issued
through the TokenRequest API), reconciles an MLPipeline and a ModelDeployment with no request
forbidden, while that identity is refused what the chart does not grant (Secrets, Pods, deletes of
users' objects, other namespaces). No kubelet runs here: the operator runs as a local process with
exactly the pod's arguments and environment from the rendered Deployment, and the test plays KubeRay
by patching the RayJob's status.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from _chart_support import (
    CHART,
    DISCOVERY_GRANTS,
    MANIFESTS,
    OPERATOR_NAMESPACED_GRANTS,
    ROOT,
    docs,
    helm,
    kustomize,
    lua_health,
    one,
    render,
    render_text,
)

pytestmark = pytest.mark.cluster

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60.0, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(kubectl: Kubectl, *args: str) -> dict[str, Any] | None:
    done = kubectl("get", *args, "-o", "json", check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


# ---------------------------------------------------------------- rendering against the apiserver


@pytest.fixture
def scratch_namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"chart-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.mark.parametrize(
    "values",
    [{}, {"serviceAccount": {"annotations": {"team": "ml"}}, "registry": {"persistentVolumeClaim": "models"}}],
    ids=["defaults", "registry-volume"],
)
def test_helm_template_passes_server_side_dry_run(kubectl: Kubectl, scratch_namespace: str, values: dict) -> None:
    release = f"dry-{uuid.uuid4().hex[:6]}"
    values = {**values, "watch": {"namespaces": [scratch_namespace]}} if values else values
    text = render_text(values, release=release, namespace=scratch_namespace, include_crds=True)
    done = kubectl(
        "apply", "--server-side", "--dry-run=server", "--force-conflicts", "--field-manager=helm-dry-run",
        "-n", scratch_namespace, "-f", "-", input=text, check=False,
    )
    assert done.returncode == 0, done.stderr
    applied = [ln for ln in done.stdout.splitlines() if "(server dry run)" in ln]
    assert len(applied) == len(docs(text)), done.stdout


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_kustomize_overlay_passes_server_side_dry_run(kubectl: Kubectl, scratch_namespace: str, overlay: str) -> None:
    documents = kustomize(MANIFESTS / overlay)
    (namespace,) = [d["metadata"]["name"] for d in documents if d["kind"] == "Namespace"]
    # A dry run creates no namespace, so objects inside a new one would be NotFound; the overlay's own
    # namespace may be in use on this shared control plane. Dry-run the same objects in a scratch one.
    text = yaml.safe_dump_all(documents).replace(f"namespace: {namespace}\n", f"namespace: {scratch_namespace}\n")
    text = text.replace(f"name: {namespace}\n", f"name: {scratch_namespace}\n")
    moved = docs(text)
    assert sum(d["metadata"].get("namespace") == scratch_namespace for d in moved) >= 3
    done = kubectl(
        "apply", "--server-side", "--dry-run=server", "--force-conflicts", "--field-manager=kustomize-dry-run",
        "-f", "-", input=text, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(server dry run)") == len(documents)


# ---------------------------------------------------------------- helm install


@dataclass
class Release:
    name: str
    namespace: str  # where the operator, its ServiceAccount and the release live
    watched: str  # the namespace the operator is limited to
    other: str  # a namespace it must not touch
    service_account: str
    kubeconfig: str  # admin
    values: dict[str, Any]
    install_output: str


@pytest.fixture(scope="module")
def release(kubectl: Kubectl, kubeconfig: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    suffix = uuid.uuid4().hex[:6]
    namespaces = [f"conveyor-{suffix}", f"ml-{suffix}", f"other-{suffix}"]
    for ns in namespaces:
        kubectl("create", "namespace", ns)
    name = f"rel-{suffix}"
    values = {"watch": {"namespaces": [namespaces[1]]}, "operator": {"logLevel": "debug"}}
    values_path = tmp_path_factory.mktemp("release") / "values.yaml"
    values_path.write_text(yaml.safe_dump(values))
    installed = helm("install", name, str(CHART), "--namespace", namespaces[0], "--kubeconfig", kubeconfig, "-f", str(values_path))
    try:
        yield Release(
            name=name,
            namespace=namespaces[0],
            watched=namespaces[1],
            other=namespaces[2],
            service_account=f"{name}-conveyor-operator",
            kubeconfig=kubeconfig,
            values=values,
            install_output=installed.stdout,
        )
    finally:
        helm("uninstall", name, "--namespace", namespaces[0], "--kubeconfig", kubeconfig, check=False)
        for ns in namespaces:
            kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_helm_install_creates_everything_the_chart_declares(kubectl: Kubectl, release: Release) -> None:
    status = json.loads(helm("status", release.name, "-n", release.namespace, "--kubeconfig", release.kubeconfig, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    manifest = docs(helm("get", "manifest", release.name, "-n", release.namespace, "--kubeconfig", release.kubeconfig).stdout)
    kinds = sorted({d["kind"] for d in manifest})
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]
    for declared in manifest:
        meta = declared["metadata"]
        args = [declared["kind"].lower(), meta["name"]] + (["-n", meta["namespace"]] if "namespace" in meta else [])
        live = get_json(kubectl, *args)
        assert live is not None, f"{declared['kind']} {meta['name']} was not created"
        assert live["metadata"]["labels"]["app.kubernetes.io/instance"] == release.name
    deployment = get_json(kubectl, "deployment", f"{release.name}-conveyor-operator", "-n", release.namespace)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == release.service_account
    # The role lives where the operator works, not where it is installed.
    assert get_json(kubectl, "role", release.service_account, "-n", release.watched) is not None
    assert get_json(kubectl, "role", release.service_account, "-n", release.namespace) is None
    # NOTES.txt tells the user what to do next.
    assert f"rollout status deployment/{release.name}-conveyor-operator" in release.install_output
    assert f"watches the namespaces: {release.watched}" in release.install_output


# ---------------------------------------------------------------- the chart's identity


@pytest.fixture(scope="module")
def sa_kubeconfig(kubectl: Kubectl, release: Release, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A kubeconfig holding a token the apiserver issued for the chart's ServiceAccount (TokenRequest)."""
    token = kubectl("create", "token", release.service_account, "-n", release.namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(Path(release.kubeconfig).read_text())
    cluster = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "conveyor-operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": "conveyor-operator"}}],
        "current-context": "operator",
    }
    path = tmp_path_factory.mktemp("sa") / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def as_operator(kubectl: Kubectl, sa_kubeconfig: str) -> Kubectl:
    def run(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return kubectl("--kubeconfig", sa_kubeconfig, *args, **kwargs)

    return run


def can_i(as_operator: Kubectl, verb: str, group: str, resource: str, namespace: str | None) -> bool:
    """The apiserver's own answer (a SelfSubjectAccessReview with the group spelled out), not `kubectl auth
    can-i`, which answers "no" for a resource type the cluster does not serve (Kueue's Workloads here)."""
    plural, _, subresource = resource.partition("/")
    attributes = {"verb": verb, "group": group, "resource": plural, "subresource": subresource}
    if namespace:
        attributes["namespace"] = namespace
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
              "spec": {"resourceAttributes": attributes}}
    done = as_operator("create", "-f", "-", "-o", "json", input=json.dumps(review))
    return bool(json.loads(done.stdout)["status"].get("allowed"))


def test_token_is_the_chart_service_account(as_operator: Kubectl, release: Release) -> None:
    review = json.loads(as_operator("auth", "whoami", "-o", "json").stdout)
    assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{release.namespace}:{release.service_account}"


def test_identity_may_do_everything_the_operator_does(as_operator: Kubectl, release: Release) -> None:
    refused = [g for g in sorted(OPERATOR_NAMESPACED_GRANTS) if not can_i(as_operator, g[2], g[0], g[1], release.watched)]
    assert not refused, f"the chart does not grant in the watched namespace: {refused}"
    refused = [g for g in sorted(DISCOVERY_GRANTS) if not can_i(as_operator, g[2], g[0], g[1], None)]
    assert not refused, f"the chart does not grant cluster-wide: {refused}"


NOT_GRANTED = [
    ("get", "", "secrets"),
    ("list", "", "secrets"),
    ("create", "", "pods"),
    ("delete", "", "configmaps"),
    ("get", "", "configmaps"),
    ("patch", "conveyor.dev", "mlpipelines"),
    ("delete", "conveyor.dev", "mlpipelines"),
    ("update", "conveyor.dev", "modeldeployments/status"),
    ("create", "conveyor.dev", "modeldeployments"),
    ("create", "ray.io", "rayclusters"),
    ("create", "apps", "deployments"),
    ("create", "rbac.authorization.k8s.io", "rolebindings"),
    ("create", "", "serviceaccounts/token"),
]


@pytest.mark.parametrize(("verb", "group", "resource"), NOT_GRANTED, ids=[f"{v}-{r}" for v, _, r in NOT_GRANTED])
def test_identity_is_refused_what_the_chart_does_not_grant(as_operator: Kubectl, release: Release, verb: str, group: str, resource: str) -> None:
    assert not can_i(as_operator, verb, group, resource, release.watched)


def test_identity_cannot_read_secrets_or_work_outside_its_namespaces(kubectl: Kubectl, as_operator: Kubectl, release: Release) -> None:
    kubectl("create", "secret", "generic", "registry-credentials", "-n", release.watched, "--from-literal=key=s3cr3t")
    denied = as_operator("get", "secret", "registry-credentials", "-n", release.watched, check=False)
    assert denied.returncode != 0 and "Forbidden" in denied.stderr, denied.stderr
    assert "s3cr3t" not in denied.stdout
    for verb, group, resource in sorted(OPERATOR_NAMESPACED_GRANTS):
        assert not can_i(as_operator, verb, group, resource, release.other), (verb, group, resource, release.other)
    elsewhere = as_operator("get", "rayjobs.ray.io", "-n", release.other, check=False)
    assert elsewhere.returncode != 0 and "Forbidden" in elsewhere.stderr


# ---------------------------------------------------------------- the operator as the chart runs it


def _sample(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "manifests" / "samples" / name).read_text())


def _commit_model_version(registry_uri: str, model: str) -> str:
    """A committed version in a real registry (the operator reads metadata only, so the weights are a stand-in)."""
    from conveyor.runtime.package.registry import REQUIRED_FILES, Registry

    def write(area: Any) -> dict[str, Any]:
        for name in REQUIRED_FILES:
            if name.endswith(".json"):
                area.write_json(name, {"accuracy": 0.95} if name == "metrics.json" else {})
            else:
                area.write_bytes(name, b"not a real model: the operator never loads weights")
        return {"task": "classification", "architecture": "mlp"}

    return Registry(registry_uri, model).register(write)


@dataclass
class RunningOperator:
    process: subprocess.Popen[str]
    log_path: Path
    metrics_port: int
    liveness_port: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def operator_as_chart(release: Release, sa_kubeconfig: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningOperator]:
    documents = render(release.values, release=release.name, namespace=release.namespace)
    pod = one(documents, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    metrics_port, liveness_port = free_port(), free_port()
    # The pod's ports are taken on a shared host; everything else is the pod's environment.
    env.update(
        CONVEYOR_METRICS_PORT=str(metrics_port),
        CONVEYOR_LIVENESS_PORT=str(liveness_port),
        CONVEYOR_BIND="127.0.0.1",
        POD_NAME="conveyor-operator-test",
        POD_NAMESPACE=release.namespace,
    )
    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    command = [sys.executable, "-m", "conveyor.operator", *container["args"]]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            env={**os.environ, **env, "KUBECONFIG": sa_kubeconfig},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
    running = RunningOperator(process, log_path, metrics_port, liveness_port)
    try:
        wait_for("the operator's liveness endpoint", lambda: _http_ok(f"http://127.0.0.1:{liveness_port}/healthz") or process.poll() is not None, 60)
        assert process.poll() is None, f"the operator exited ({process.returncode}):\n{running.log()[-4000:]}"
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_operator_reconciles_as_the_chart_identity_with_nothing_forbidden(
    kubectl: Kubectl, release: Release, operator_as_chart: RunningOperator, tmp_path: Path
) -> None:
    ns = release.watched
    registry = f"file://{tmp_path / 'registry'}"
    version = _commit_model_version(registry, "digits")

    deployment = _sample("modeldeployment-digits.yaml")
    deployment["spec"]["model"].update(registryUri=registry, version=version)
    deployment["spec"]["model"].pop("pipeline", None)
    deployment["spec"]["monitoring"].pop("retrainPipeline", None)
    pipeline = _sample("mlpipeline-digits.yaml")
    pipeline["spec"]["registry"]["uri"] = registry
    pipeline["spec"]["training"]["backoffLimit"] = 0  # one attempt: the failure below is final
    for obj in (deployment, pipeline):
        kubectl("apply", "--server-side", "--field-manager=test", "-n", ns, "-f", "-", input=json.dumps(obj))

    # ModelDeployment -> InferenceService (server-side apply: create), status written.
    isvc = wait_for("the InferenceService", lambda: get_json(kubectl, "inferenceservices.serving.kserve.io", "digits", "-n", ns))
    assert isvc["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    md = wait_for(
        "the ModelDeployment's status",
        lambda: (o := get_json(kubectl, "modeldeployments.conveyor.dev", "digits", "-n", ns))
        and (o.get("status") or {}).get("observedGeneration") == o["metadata"]["generation"]
        and o,
    )
    assert {c["type"] for c in md["status"]["conditions"]} >= {"Ready", "Progressing", "Degraded"}
    # Argo CD's health check on the status the operator really wrote: KServe has not reported yet.
    assert lua_health("modeldeployment.lua", md)[0] == "Progressing"
    # Play KServe: the InferenceService becomes ready; the deployment must report Healthy.
    kubectl(
        "patch", "inferenceservices.serving.kserve.io", "digits", "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {
            "observedGeneration": isvc["metadata"]["generation"],
            "url": f"http://digits.{ns}.example.com",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-22T10:00:00Z"}],
        }}),
    )
    md = wait_for(
        "the ModelDeployment Ready",
        lambda: (o := get_json(kubectl, "modeldeployments.conveyor.dev", "digits", "-n", ns))
        and any(c["type"] == "Ready" and c["status"] == "True" for c in (o.get("status") or {}).get("conditions", []))
        and o,
    )
    assert lua_health("modeldeployment.lua", md) == ("Healthy", f"Serving {version} at http://digits.{ns}.example.com")

    # MLPipeline -> RayJob run 1 and its ConfigMap.
    rayjob = wait_for("RayJob digits-1", lambda: get_json(kubectl, "rayjobs.ray.io", "digits-1", "-n", ns))
    assert rayjob["metadata"]["ownerReferences"][0]["kind"] == "MLPipeline"
    wait_for(
        "the run's ConfigMap",
        lambda: any(
            cm["metadata"].get("labels", {}).get("conveyor.dev/pipeline") == "digits"
            for cm in (get_json(kubectl, "configmaps", "-n", ns) or {}).get("items", [])
        ),
    )
    # Play KubeRay: the job fails; the operator must record the run and post an Event.
    kubectl(
        "patch", "rayjobs.ray.io", "digits-1", "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed", "message": "OOMKilled", "failed": 1}}),
    )
    mlp = wait_for(
        "run 1 recorded as Failed",
        lambda: (o := get_json(kubectl, "mlpipelines.conveyor.dev", "digits", "-n", ns))
        and [r for r in (o.get("status") or {}).get("runs", []) if r.get("run") == 1 and r.get("outcome") == "Failed"]
        and o,
        timeout=90,
    )
    assert mlp["status"]["observedGeneration"] == mlp["metadata"]["generation"]
    health, message = lua_health("mlpipeline.lua", mlp)
    assert health == "Degraded" and "OOMKilled" in message, (health, message, mlp["status"].get("conditions"))
    events = wait_for(
        "Events from the operator",
        lambda: [
            e for e in (get_json(kubectl, "events", "-n", ns) or {}).get("items", [])
            if e["involvedObject"].get("kind") in {"MLPipeline", "ModelDeployment"}
        ],
    )
    assert {e["involvedObject"]["kind"] for e in events} == {"MLPipeline", "ModelDeployment"}

    # Nothing the operator asked was refused: its own request counter and its log agree.
    metrics = _metrics(operator_as_chart.metrics_port)
    requests = [ln for ln in metrics.splitlines() if ln.startswith("conveyor_api_requests_total{")]
    assert requests, "the operator counted no API request"
    assert not [ln for ln in requests if 'code="403"' in ln], requests
    log = operator_as_chart.log()
    # A refused request shows as Forbidden or as an HTTP 403 status; a bare "403" can be a resourceVersion.
    assert "orbidden" not in log and not re.search(r"(status|code)\W{0,3}403\b", log), log[-4000:]
    assert operator_as_chart.process.poll() is None, log[-4000:]


def test_bad_values_fail_at_install_and_create_nothing(release: Release) -> None:
    name = f"bad-{uuid.uuid4().hex[:6]}"
    done = helm(
        "install", name, str(CHART), "--namespace", release.namespace, "--kubeconfig", release.kubeconfig,
        "--set", "operator.defaultKServeMode=Serverless", check=False,
    )
    assert done.returncode != 0
    assert "defaultKServeMode" in done.stderr and "Knative" in done.stderr, done.stderr
    listed = helm("list", "-n", release.namespace, "--kubeconfig", release.kubeconfig, "-q").stdout.split()
    assert name not in listed


def test_helm_upgrade_changes_the_operator_settings(kubectl: Kubectl, release: Release) -> None:
    helm(
        "upgrade", release.name, str(CHART), "--namespace", release.namespace, "--kubeconfig", release.kubeconfig,
        "--reuse-values", "--set", "operator.logLevel=warning",
    )
    live = get_json(kubectl, "deployment", f"{release.name}-conveyor-operator", "-n", release.namespace)
    (container,) = live["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CONVEYOR_LOG_LEVEL"] == "warning"
    assert container["args"] == [f"--namespace={release.watched}"]
    history = json.loads(helm("history", release.name, "-n", release.namespace, "--kubeconfig", release.kubeconfig, "-o", "json").stdout)
    assert [h["status"] for h in history][-1] == "deployed" and len(history) == 2
