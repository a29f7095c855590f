"""The Helm chart, the kustomize manifests, the Dockerfiles and the hack/ scripts, without a cluster.

Real tools only: helm v3.22.0 and kubectl v1.36.3 built from their Go modules (hack/build-tool.sh),
hadolint and shellcheck from PyPI (the dev extra), a real PromQL parser for the alert rules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from _chart_support import (  # noqa: E402 - the support module lives beside the integration tests
    CHART,
    DISCOVERY_GRANTS,
    LEADER_ELECTION_GRANTS,
    MANIFESTS,
    OPERATOR_NAMESPACED_GRANTS,
    ROOT,
    Doc,
    helm,
    kustomize,
    of_kind,
    one,
    render,
    rules_as_grants,
    template_args,
)

MONITORING = {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}}


def container(documents: list[Doc]) -> Doc:
    deployment = one(documents, "Deployment", "conveyor-operator")
    (operator,) = deployment["spec"]["template"]["spec"]["containers"]
    return operator


def env_of(c: Doc) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


# ---------------------------------------------------------------- one source of truth


def test_chart_crds_are_exact_copies_of_crds() -> None:
    sources = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    copies = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml") if p.name != "kustomization.yaml"}
    assert sources, "crds/ holds no CRD"
    assert sorted(copies) == sorted(sources), "charts/conveyor/crds/ and crds/ hold different files: make chart-crds"
    drifted = [name for name in sources if copies[name] != sources[name]]
    assert not drifted, f"charts/conveyor/crds/{drifted} differ from crds/: run make chart-crds (hack/sync-chart.sh)"


def test_kustomize_base_is_the_chart_rendering() -> None:
    # hack/sync-chart.sh --check renders the chart afresh and compares every copy.
    done = subprocess.run([str(ROOT / "hack" / "sync-chart.sh"), "--check"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def test_helm_installs_the_crds_from_the_chart() -> None:
    crds = of_kind(render(include_crds=True), "CustomResourceDefinition")
    names = sorted(c["metadata"]["name"] for c in crds)
    assert names == ["batchpredictions.conveyor.dev", "mlpipelines.conveyor.dev", "modeldeployments.conveyor.dev"]


# ---------------------------------------------------------------- lint and values schema


@pytest.mark.parametrize(
    "values",
    [{}, {"watch": {"namespaces": ["team-a", "team-b"]}}, MONITORING],
    ids=["defaults", "namespaced", "monitoring"],
)
def test_helm_lint_strict_passes(values: dict[str, Any], tmp_path: Path) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values:
        (tmp_path / "v.yaml").write_text(yaml.safe_dump(values))
        args += ["-f", str(tmp_path / "v.yaml")]
    done = helm(*args, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


BAD_VALUES = [
    ({"operator": {"logLevel": "verbose"}}, "logLevel"),
    ({"operator": {"defaultKServeMode": "Serverless"}}, "defaultKServeMode"),
    ({"operator": {"prometheusUrl": "prometheus:9090"}}, "prometheusUrl"),
    ({"replicas": 11}, "replicas"),
    ({"watch": {"namespaces": ["Team_A"]}}, "namespaces"),
    ({"watch": {"namespaces": "team-a"}}, "namespaces"),
    ({"image": {"digest": "latest"}}, "digest"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"resources": {"requests": {"cpu": "lots", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}}, "cpu"),
    # null removes the default: a pod without a memory request is refused.
    ({"resources": {"requests": {"memory": None}}}, "memory"),
    ({"metrics": {"port": 70000}}, "port"),
    ({"serviceMonitor": {"enabled": True, "interval": "often"}}, "interval"),
    ({"prometheusRule": {"driftThreshold": 0}}, "driftThreshold"),
    ({"operatr": {"logLevel": "info"}}, "operatr"),
    ({"rbac": {"create": "yes"}}, "create"),
]


@pytest.mark.parametrize(("values", "field"), BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_bad_values_fail_and_name_the_field(values: dict[str, Any], field: str) -> None:
    done = helm(*template_args(values), check=False)
    assert done.returncode != 0, f"helm accepted {values}"
    assert "values don't meet the specifications of the schema" in done.stderr, done.stderr
    assert field in done.stderr, f"the error does not name {field!r}:\n{done.stderr}"


def test_service_monitor_without_the_service_is_refused() -> None:
    done = helm(*template_args({"serviceMonitor": {"enabled": True}, "metrics": {"service": {"enabled": False}}}), check=False)
    assert done.returncode != 0
    assert "serviceMonitor.enabled needs metrics.service.enabled" in done.stderr


# ---------------------------------------------------------------- the operator Deployment


def test_operator_pod_is_hardened() -> None:
    documents = render()
    pod = one(documents, "Deployment", "conveyor-operator")["spec"]["template"]["spec"]
    c = container(documents)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    # A read-only root needs a writable /tmp for Python and fsspec.
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    assert pod["serviceAccountName"] == "conveyor-operator"


def test_probes_and_metrics_port_match_the_operator_settings() -> None:
    c = container(render({"metrics": {"port": 9100}, "health": {"port": 9101}}))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 9100, "health": 9101}
    env = env_of(c)
    # The operator reads these (python -m conveyor.operator --help): the ports it listens on must be
    # the ones the probes and the Service use.
    assert env["CONVEYOR_METRICS_PORT"] == "9100"
    assert env["CONVEYOR_LIVENESS_PORT"] == "9101"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_operator_settings_come_from_values() -> None:
    c = container(
        render(
            {
                "image": {"repository": "registry.example/conveyor-operator", "tag": "1.2.3"},
                "operator": {"logLevel": "debug", "prometheusUrl": "http://prom.example:9090", "defaultKServeMode": "Standard"},
            }
        )
    )
    assert c["image"] == "registry.example/conveyor-operator:1.2.3"
    env = env_of(c)
    assert env["CONVEYOR_LOG_LEVEL"] == "debug"
    assert env["CONVEYOR_PROMETHEUS_URL"] == "http://prom.example:9090"
    assert env["CONVEYOR_DEFAULT_KSERVE_MODE"] == "Standard"
    digest = "sha256:" + "a" * 64
    assert container(render({"image": {"digest": digest}}))["image"] == f"ghcr.io/conveyor-ml/conveyor-operator@{digest}"


def test_operator_arguments_parse_with_the_operator_cli() -> None:
    # The chart's args must be flags `python -m conveyor.operator` accepts, in both scopes.
    from conveyor.operator.__main__ import parse_args

    cluster = parse_args(container(render())["args"])
    assert cluster.all_namespaces and not cluster.namespace and not cluster.leader_elect
    scoped = parse_args(container(render({"watch": {"namespaces": ["team-a", "team-b"]}}))["args"])
    assert scoped.namespace == ["team-a", "team-b"]


def test_registry_volume_is_mounted_read_only_when_named() -> None:
    documents = render({"registry": {"persistentVolumeClaim": "models", "mountPath": "/models"}})
    pod = one(documents, "Deployment", "conveyor-operator")["spec"]["template"]["spec"]
    (mount,) = [m for m in container(documents)["volumeMounts"] if m["name"] == "registry"]
    assert mount == {"name": "registry", "mountPath": "/models", "readOnly": True}
    (volume,) = [v for v in pod["volumes"] if v["name"] == "registry"]
    assert volume["persistentVolumeClaim"]["claimName"] == "models"


def test_registry_credentials_from_a_secret_or_workload_identity() -> None:
    """The operator reads an s3:// or gs:// registry with a Secret's keys as its environment, or with
    its ServiceAccount's cloud identity (IRSA, GKE Workload Identity); by default with neither."""
    assert "envFrom" not in container(render({}))
    documents = render({"registry": {"credentialsSecret": "registry-credentials"}})
    assert container(documents)["envFrom"] == [{"secretRef": {"name": "registry-credentials"}}]
    identity = {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/conveyor",
                "iam.gke.io/gcp-service-account": "conveyor@project.iam.gserviceaccount.com"}
    sa = one(render({"serviceAccount": {"annotations": identity}}), "ServiceAccount", "conveyor-operator")
    assert sa["metadata"]["annotations"] == identity


# ---------------------------------------------------------------- RBAC


def test_cluster_wide_rbac_grants_exactly_what_the_operator_uses() -> None:
    documents = render()
    role = one(documents, "ClusterRole", "conveyor-operator")
    assert rules_as_grants(role["rules"]) == OPERATOR_NAMESPACED_GRANTS | DISCOVERY_GRANTS
    binding = one(documents, "ClusterRoleBinding", "conveyor-operator")
    assert binding["roleRef"]["name"] == "conveyor-operator"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "conveyor-operator", "namespace": "conveyor-system"}]
    # Namespaced: only the leader-election Lease, in the release namespace.
    (lease_role,) = of_kind(documents, "Role")
    assert lease_role["metadata"]["namespace"] == "conveyor-system"
    assert rules_as_grants(lease_role["rules"]) == LEADER_ELECTION_GRANTS
    (lease_binding,) = of_kind(documents, "RoleBinding")
    assert lease_binding["roleRef"]["name"] == lease_role["metadata"]["name"]
    without_election = render({"leaderElection": {"enabled": False}, "replicas": 1})
    assert not of_kind(without_election, "Role") and not of_kind(without_election, "RoleBinding")


def test_namespaced_rbac_grants_only_in_the_watched_namespaces() -> None:
    documents = render({"watch": {"namespaces": ["team-a", "team-b"]}, "leaderElection": {"enabled": False}})
    roles = of_kind(documents, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert rules_as_grants(role["rules"]) == OPERATOR_NAMESPACED_GRANTS
    bindings = of_kind(documents, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    # Cluster-wide: only kopf's read of namespaces and CRDs.
    (cluster_role,) = of_kind(documents, "ClusterRole")
    assert rules_as_grants(cluster_role["rules"]) == DISCOVERY_GRANTS

    without_discovery = render({"watch": {"namespaces": ["team-a"]}, "rbac": {"clusterDiscovery": False}})
    assert not of_kind(without_discovery, "ClusterRole") and not of_kind(without_discovery, "ClusterRoleBinding")


@pytest.mark.parametrize("values", [{}, {"watch": {"namespaces": ["a"]}}], ids=["cluster", "namespaced"])
def test_rbac_never_grants_wildcards_or_secrets(values: dict[str, Any]) -> None:
    for role in of_kind(render(values), "ClusterRole") + of_kind(render(values), "Role"):
        for group, resource, verb in rules_as_grants(role["rules"]):
            assert "*" not in (group, resource, verb), role["metadata"]["name"]
            assert resource not in {"secrets", "pods", "pods/exec", "serviceaccounts/token"}, (resource, verb)
            assert verb not in {"escalate", "bind", "impersonate"}


def test_rbac_can_be_left_to_the_platform() -> None:
    documents = render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "platform-sa"}})
    assert not [d for d in documents if d["kind"] in {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"}]
    pod = one(documents, "Deployment", "conveyor-operator")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "platform-sa"


# ---------------------------------------------------------------- monitoring


def test_monitoring_objects_only_when_asked() -> None:
    kinds = {d["kind"] for d in render()}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert not [d for d in of_kind(render(), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    documents = render(MONITORING)
    monitor = one(documents, "ServiceMonitor")
    service = one(documents, "Service", "conveyor-operator-metrics")
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= one(documents, "Deployment")["spec"]["template"]["metadata"]["labels"].items()


def _alerts(values: dict[str, Any] | None = None) -> dict[str, Doc]:
    rule = one(render({**MONITORING, **(values or {})}), "PrometheusRule")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def _dashboard() -> Doc:
    cm = [d for d in of_kind(render(MONITORING), "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")][0]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    return json.loads(cm["data"]["conveyor.json"])


def test_alerts_cover_the_four_failures_and_parse_as_promql() -> None:
    import promql_parser as promql
    alerts = _alerts({"prometheusRule": {"enabled": True, "driftThreshold": 0.35, "operatorDownFor": "7m"}})
    assert set(alerts) == {"ConveyorTrainingFailed", "ConveyorRolloutRolledBack", "ConveyorDriftOverThreshold", "ConveyorOperatorDown"}
    for name, alert in alerts.items():
        promql.parse(alert["expr"])  # raises ValueError naming the syntax error
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert alert["annotations"]["summary"], name
    assert "> 0.35" in alerts["ConveyorDriftOverThreshold"]["expr"]
    assert alerts["ConveyorOperatorDown"]["for"] == "7m"
    # The job label Prometheus gives the operator's targets is the metrics Service's name.
    assert 'job="conveyor-operator-metrics"' in alerts["ConveyorOperatorDown"]["expr"]


def test_dashboard_is_valid_grafana_json_with_parsable_queries() -> None:
    import promql_parser as promql
    dashboard = _dashboard()
    assert dashboard["uid"] == "conveyor-overview" and dashboard["panels"]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            promql.parse(target["expr"])


# Metrics the alerts name before their exporter exists; each entry says who adds it. The test fails
# once the metric appears, so this list cannot go stale.
AWAITED_METRICS: dict[str, str] = {}


def test_every_metric_in_alerts_and_dashboard_is_exported_by_conveyor() -> None:
    queries = [a["expr"] for a in _alerts().values()]
    queries += [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for q in queries for m in re.findall(r"\bconveyor_[a-z_]+", q)}
    source = "\n".join(p.read_text() for d in ("operator", "runtime") for p in (ROOT / d).rglob("*.py"))
    defined = set(re.findall(r"[\"'](conveyor_[a-z_]+)[\"']", source))
    for awaited, owner in AWAITED_METRICS.items():
        assert awaited not in defined, f"{awaited} is exported now ({owner}): drop it from AWAITED_METRICS"
        used.discard(awaited)
    assert used <= defined, f"alerts/dashboard query metrics nobody exports: {sorted(used - defined)}"


# ---------------------------------------------------------------- kustomize and Argo CD


def _namespaced(documents: list[Doc]) -> list[Doc]:
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    return [d for d in documents if d["kind"] not in cluster_scoped]


@pytest.mark.parametrize(("overlay", "namespace", "image"), [
    ("base", "conveyor-system", "ghcr.io/conveyor-ml/conveyor-operator:0.1.0"),
    ("overlays/dev", "conveyor-dev", "conveyor-operator:dev"),
    ("overlays/prod", "conveyor-system", "ghcr.io/conveyor-ml/conveyor-operator:0.1.0"),
])
def test_kustomize_builds(overlay: str, namespace: str, image: str) -> None:
    documents = kustomize(MANIFESTS / overlay)
    assert sorted(c["metadata"]["name"] for c in of_kind(documents, "CustomResourceDefinition")) == [
        "batchpredictions.conveyor.dev", "mlpipelines.conveyor.dev", "modeldeployments.conveyor.dev",
    ]
    assert [n["metadata"]["name"] for n in of_kind(documents, "Namespace")] == [namespace]
    assert {d["metadata"]["namespace"] for d in _namespaced(documents)} == {namespace}
    # The binding must follow the ServiceAccount into the overlay's namespace, or the operator has no rights.
    (binding,) = of_kind(documents, "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == namespace
    assert container(documents)["image"] == image


def test_dev_and_prod_overlays_change_what_they_say() -> None:
    dev, prod = container(kustomize(MANIFESTS / "overlays/dev")), container(kustomize(MANIFESTS / "overlays/prod"))
    assert env_of(dev)["CONVEYOR_LOG_LEVEL"] == "debug" and env_of(prod)["CONVEYOR_LOG_LEVEL"] == "info"
    assert dev["imagePullPolicy"] == "Never"
    assert prod["resources"]["limits"]["memory"] == "1Gi"
    # A patch replaces one setting, the rest of the chart's environment stays.
    assert "CONVEYOR_METRICS_PORT" in env_of(dev) and "CONVEYOR_METRICS_PORT" in env_of(prod)


def test_argocd_config_embeds_the_tested_lua_health_checks() -> None:
    (cm,) = kustomize(MANIFESTS / "argocd")
    assert (cm["metadata"]["name"], cm["metadata"]["namespace"]) == ("argocd-cm", "argocd")
    health = MANIFESTS / "argocd" / "health"
    assert cm["data"] == {
        "resource.customizations.health.conveyor.dev_MLPipeline": (health / "mlpipeline.lua").read_text(),
        "resource.customizations.health.conveyor.dev_ModelDeployment": (health / "modeldeployment.lua").read_text(),
    }


def test_argocd_application_installs_this_chart_with_valid_values() -> None:
    app = yaml.safe_load((MANIFESTS / "argocd" / "application.yaml").read_text())
    source = app["spec"]["source"]
    assert (ROOT / source["path"] / "Chart.yaml").exists()
    documents = render(source["helm"]["valuesObject"])  # the schema accepts what the example sets
    assert one(documents, "PrometheusRule") and one(documents, "ServiceMonitor")
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]


# ---------------------------------------------------------------- images and scripts


DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def _venv_tool(name: str) -> str:
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, f"{name} is not installed: pip install -e '.[dev]' brings it"
    return found


def test_dockerfiles_pass_hadolint() -> None:
    assert [p.name for p in DOCKERFILES] == ["operator.Dockerfile", "runtime.Dockerfile"]
    done = subprocess.run([_venv_tool("hadolint"), *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_multi_stage_pinned_and_non_root(dockerfile: Path) -> None:
    lines = [ln.strip() for ln in dockerfile.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    base = next(ln for ln in lines if ln.startswith("ARG PYTHON_IMAGE="))
    assert re.fullmatch(r"ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+", base), base
    stages = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(stages) >= 2, "build and run stages"
    final = lines[lines.index(stages[-1]):]
    users = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) > 0, users


def test_operator_image_uid_matches_the_chart() -> None:
    pod = one(render(), "Deployment", "conveyor-operator")["spec"]["template"]["spec"]
    text = (ROOT / "docker" / "operator.Dockerfile").read_text()
    assert f"USER {pod['securityContext']['runAsUser']}:" in text


@pytest.mark.parametrize("script", ["kind-up.sh", "build-tool.sh", "sync-chart.sh", "prometheus.sh"])
def test_scripts_are_shellcheck_clean(script: str) -> None:
    done = subprocess.run([_venv_tool("shellcheck"), str(ROOT / "hack" / script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout


def test_helm_is_the_pinned_release_cached_outside_the_clone() -> None:
    done = subprocess.run([str(ROOT / "hack" / "build-tool.sh"), "--path", "helm"], capture_output=True, text=True, timeout=60)
    path = Path(done.stdout.strip())
    assert done.returncode == 0 and path.is_file()
    assert ROOT not in path.parents
    assert path.parent.name == "helm-v3.22.0"
    assert helm("version", "--short").stdout.startswith("v3.22.0")
    # Stamped with its client libraries' Kubernetes release (not helm's 1.20 fallback), helm renders
    # the chart's kubeVersion >=1.30 by default and refuses an older cluster.
    assert helm("template", "x", str(CHART), check=False).returncode == 0
    old = helm("template", "x", str(CHART), "--kube-version", "1.29.0", check=False)
    assert old.returncode != 0 and "kubeVersion" in old.stderr, old.stderr


def test_pod_monitor_selects_the_predictors_of_conveyors_inference_services() -> None:
    from conveyor.operator.controller.children import LABEL_MANAGED_BY, MANAGED_BY
    from conveyor.operator.modeldeployment.build import PREDICTOR_PORT

    assert not of_kind(render(), "PodMonitor")
    monitor = one(render({"podMonitor": {"enabled": True, "namespaces": ["team-a"]}}), "PodMonitor")
    selector = monitor["spec"]["selector"]
    # The labels a predictor pod carries: the InferenceService's own (the operator's), which KServe
    # copies onto it, plus KServe's (pkg/controller/v1beta1/inferenceservice/components/predictor.go).
    pod = {LABEL_MANAGED_BY: MANAGED_BY, "serving.kserve.io/inferenceservice": "fraud", "component": "predictor"}
    assert selector["matchLabels"].items() <= pod.items()
    assert all(e["key"] in pod for e in selector["matchExpressions"] if e["operator"] == "Exists")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["targetPort"] == PREDICTOR_PORT and endpoint["path"] == "/metrics"
    relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert relabel["namespace"] == ["__meta_kubernetes_namespace"]
    everywhere = one(render({"podMonitor": {"enabled": True}}), "PodMonitor")
    assert everywhere["spec"]["namespaceSelector"] == {"any": True}
